/* Adds 60-bit packed coefficients into a sum modulo q, in one pass over each: the server's work on a chunk.
 *
 * lightning_fhe.he.modular.add_packed_mod documents it and holds the numpy version, which is the reference (the
 * tests compare the two). Packing (lightning_fhe.he.packing): coefficients a, b become the 120-bit little-endian
 * integer a | b << 60, written as 15 bytes. A coefficient not below q stops the addition, and what was added before
 * it is taken back out, so a refused chunk changes nothing. The GIL is released while the loop runs: the server
 * adds on many threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MASK60 ((UINT64_C(1) << 60) - 1)

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if PY_BIG_ENDIAN
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void pair(const unsigned char *p, uint64_t *a, uint64_t *b) {
    /* bytes 0..7 hold a and b's low 4 bits; bytes 7..14 hold bits 56..119, that is b shifted left by 4 */
    *a = load64(p) & MASK60;
    *b = load64(p + 7) >> 4;
}

static inline uint64_t add_mod(uint64_t t, uint64_t v, uint64_t q) {
    t += v;  /* both below q < 2**63: no overflow */
    return t >= q ? t - q : t;
}

static inline uint64_t sub_mod(uint64_t t, uint64_t v, uint64_t q) { return t >= v ? t - v : t + (q - v); }

/* total[i] (+/-)= coefficient i for the pairs [start, stop); stops at the first coefficient >= q and returns its
 * index, having changed only the pairs before it (the caller takes those back out); -1 when all were added. */
static Py_ssize_t apply(unsigned char *out, const unsigned char *in, Py_ssize_t start, Py_ssize_t stop, uint64_t q,
                        int subtract) {
    for (Py_ssize_t i = start; i < stop; i++) {
        uint64_t v[2], t[2];
        pair(in + 15 * i, &v[0], &v[1]);
        if (v[0] >= q || v[1] >= q) {
            return 2 * i + (v[0] < q);
        }
        memcpy(t, out + 16 * i, 16);
        for (int k = 0; k < 2; k++) {
            t[k] = subtract ? sub_mod(t[k], v[k], q) : add_mod(t[k], v[k], q);
        }
        memcpy(out + 16 * i, t, 16);
    }
    return -1;
}

static PyObject *add_packed(PyObject *self, PyObject *args) {
    Py_buffer total, packed;
    unsigned long long q;
    int subtract;
    if (!PyArg_ParseTuple(args, "w*y*Kp", &total, &packed, &q, &subtract)) {
        return NULL;
    }
    Py_ssize_t n = total.len / 8;
    Py_ssize_t first_bad = -1;
    PyObject *result = NULL;
    if (total.len % 8 || n % 2 || packed.len != n / 2 * 15 || q == 0 || q >> 63) {
        PyErr_Format(PyExc_ValueError,
                     "add_packed: a sum of %zd bytes (uint64, an even count) takes %zd packed bytes, got %zd; q=%llu",
                     total.len, n / 2 * 15, packed.len, q);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    /* One pass: a chunk is almost always good. A bad one is found midway, and what was added before it is taken
     * back out, exactly (modular addition and subtraction undo each other), so a refused chunk changes nothing. */
    first_bad = apply(total.buf, packed.buf, 0, n / 2, q, subtract);
    if (first_bad >= 0) {
        apply(total.buf, packed.buf, 0, first_bad / 2, q, !subtract);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(first_bad);
done:
    PyBuffer_Release(&total);
    PyBuffer_Release(&packed);
    return result;
}

static PyMethodDef methods[] = {
    {"add_packed", add_packed, METH_VARARGS,
     "add_packed(total, packed, q, subtract) -> -1, or the index of the first coefficient >= q (nothing changed)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_packed", NULL, -1, methods};

PyMODINIT_FUNC PyInit__packed(void) { return PyModule_Create(&module); }
