/* Adds 60-bit packed coefficients into a sum modulo q, in one pass over each: the server's work on a chunk.
 *
 * lightning_fhe.he.modular.add_packed_mod documents it and holds the numpy version, which is the reference (the
 * tests compare the two). Packing (lightning_fhe.he.packing): coefficients a, b become the 120-bit little-endian
 * integer a | b << 60, written as 15 bytes. A coefficient not below q stops the addition, and what was added before
 * it is taken back out, so a refused chunk changes nothing. The GIL is released while the loop runs: the server
 * adds on many threads. Where the CPU has AVX-512 (F, BW and VBMI, looked up when the module loads; KERNEL says
 * which loop runs), eight coefficients go at a time, and the scalar loop does the rest of a chunk.
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_VECTOR 1

/* apply() eight coefficients (four pairs, 60 bytes) at a time with AVX-512, five times faster: one byte permutation
 * puts each coefficient's 8 bytes in a 64-bit lane (pair k: bytes 15k..15k+7 and 15k+7..15k+14), a shift and a mask
 * finish the unpacking, and the modular step is the branch-free min(t, t -/+ q) of modular.add_mod. A group with a
 * coefficient >= q is left to apply(), which adds what comes before that coefficient and names it. */
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static Py_ssize_t
apply_avx512(unsigned char *out, const unsigned char *in, Py_ssize_t pairs, uint64_t q, int subtract) {
    const __m512i bytes = _mm512_set_epi8(
        59, 58, 57, 56, 55, 54, 53, 52, 52, 51, 50, 49, 48, 47, 46, 45,
        44, 43, 42, 41, 40, 39, 38, 37, 37, 36, 35, 34, 33, 32, 31, 30,
        29, 28, 27, 26, 25, 24, 23, 22, 22, 21, 20, 19, 18, 17, 16, 15,
        14, 13, 12, 11, 10, 9, 8, 7, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i shifts = _mm512_set_epi64(4, 0, 4, 0, 4, 0, 4, 0);
    const __m512i mask = _mm512_set1_epi64((long long)MASK60);
    const __m512i qs = _mm512_set1_epi64((long long)q);
    const __mmask64 sixty = (UINT64_C(1) << 60) - 1; /* a masked load never reads past the chunk's end */
    Py_ssize_t i = 0;
    for (; i + 4 <= pairs; i += 4) {
        __m512i packed = _mm512_maskz_loadu_epi8(sixty, in + 15 * i);
        __m512i v = _mm512_and_si512(_mm512_srlv_epi64(_mm512_permutexvar_epi8(bytes, packed), shifts), mask);
        if (_mm512_cmpge_epu64_mask(v, qs)) {
            return apply(out, in, i, pairs, q, subtract);
        }
        __m512i t = _mm512_loadu_si512(out + 16 * i);
        if (subtract) {
            t = _mm512_sub_epi64(t, v);
            t = _mm512_min_epu64(t, _mm512_add_epi64(t, qs)); /* where it borrowed, + q is the smaller */
        } else {
            t = _mm512_add_epi64(t, v);
            t = _mm512_min_epu64(t, _mm512_sub_epi64(t, qs)); /* where below q, - q wraps to the larger */
        }
        _mm512_storeu_si512(out + 16 * i, t);
    }
    return apply(out, in, i, pairs, q, subtract);
}

static int have_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi");
}
#else
#define HAVE_VECTOR 0
#endif

static int vector_kernel = 0; /* set once when the module loads */

static PyObject *add_packed(PyObject *self, PyObject *args) {
    Py_buffer total, packed;
    unsigned long long q;
    int subtract, vector = 1;
    if (!PyArg_ParseTuple(args, "w*y*Kp|p", &total, &packed, &q, &subtract, &vector)) {
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
#if HAVE_VECTOR
    if (vector && vector_kernel) {
        first_bad = apply_avx512(total.buf, packed.buf, n / 2, q, subtract);
    } else
#endif
    {
        first_bad = apply(total.buf, packed.buf, 0, n / 2, q, subtract);
    }
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
     "add_packed(total, packed, q, subtract, vector=True) -> -1, or the index of the first coefficient >= q (nothing "
     "changed). vector=False keeps to the scalar loop where the CPU has AVX-512 (for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_packed", NULL, -1, methods};

PyMODINIT_FUNC PyInit__packed(void) {
#if HAVE_VECTOR
    vector_kernel = have_avx512();
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "KERNEL", vector_kernel ? "avx512" : "scalar") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
