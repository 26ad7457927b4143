/* Adds 60-bit packed coefficients into a sum modulo q, in one pass over each: the server's work on a chunk; and
 * packs them, a site's.
 *
 * lightning_fhe.he.modular.add_packed_mod and add_checked_mod document the addition and hold the numpy versions,
 * which are the reference (the tests compare them). Packing (lightning_fhe.he.packing): coefficients a, b become
 * the 120-bit little-endian integer a | b << 60, written as 15 bytes. A coefficient not below q stops the addition,
 * and what was added before it is taken back out, so a refused chunk changes nothing; add_checked also checks the
 * chunk's CRC-32 in the same pass, and takes everything back out on a mismatch. The GIL is released while a loop
 * runs: the server adds on many threads. Where the CPU has AVX-512 (F, BW and VBMI) and PCLMULQDQ, looked up when
 * the module loads (KERNEL says which loop runs), eight coefficients go at a time, and the scalar loop does the rest
 * of a chunk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_le64.h"

#define MASK60 ((UINT64_C(1) << 60) - 1)

static inline void pair(const unsigned char *p, uint64_t *a, uint64_t *b) {
    /* bytes 0..7 hold a and b's low 4 bits; bytes 7..14 hold bits 56..119, that is b shifted left by 4 */
    *a = load_le64(p) & MASK60;
    *b = load_le64(p + 7) >> 4;
}

static inline uint64_t add_mod(uint64_t t, uint64_t v, uint64_t q) {
    t += v;  /* both below q < 2**63: no overflow */
    return t >= q ? t - q : t;
}

static inline uint64_t sub_mod(uint64_t t, uint64_t v, uint64_t q) { return t >= v ? t - v : t + (q - v); }

/* zlib's CRC-32 (reflected polynomial 0xEDB88320), a byte at a time: the reference, and the last bytes of the
 * folded CRC below. ``state`` is the register, zlib's CRC inverted. */
static uint32_t crc_table[256];

static void crc_table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? (c >> 1) ^ UINT32_C(0xEDB88320) : c >> 1;
        }
        crc_table[i] = c;
    }
}

static uint32_t crc_bytes(uint32_t state, const unsigned char *p, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) {
        state = crc_table[(state ^ p[i]) & 0xff] ^ (state >> 8);
    }
    return state;
}

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
#define VECTOR_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi")))

typedef struct {
    __m512i bytes, shifts, mask, qs;
} Group;

VECTOR_TARGET static inline Group group_constants(uint64_t q) {
    Group g;
    g.bytes = _mm512_set_epi8(
        59, 58, 57, 56, 55, 54, 53, 52, 52, 51, 50, 49, 48, 47, 46, 45,
        44, 43, 42, 41, 40, 39, 38, 37, 37, 36, 35, 34, 33, 32, 31, 30,
        29, 28, 27, 26, 25, 24, 23, 22, 22, 21, 20, 19, 18, 17, 16, 15,
        14, 13, 12, 11, 10, 9, 8, 7, 7, 6, 5, 4, 3, 2, 1, 0);
    g.shifts = _mm512_set_epi64(4, 0, 4, 0, 4, 0, 4, 0);
    g.mask = _mm512_set1_epi64((long long)MASK60);
    g.qs = _mm512_set1_epi64((long long)q);
    return g;
}

/* Pairs i..i+3; 0 and nothing changed when a coefficient is not below q. */
VECTOR_TARGET static inline int apply_group(const Group *g, unsigned char *out, const unsigned char *in, Py_ssize_t i,
                                            int subtract) {
    const __mmask64 sixty = (UINT64_C(1) << 60) - 1; /* a masked load never reads past the chunk's end */
    __m512i packed = _mm512_maskz_loadu_epi8(sixty, in + 15 * i);
    __m512i v = _mm512_and_si512(_mm512_srlv_epi64(_mm512_permutexvar_epi8(g->bytes, packed), g->shifts), g->mask);
    if (_mm512_cmpge_epu64_mask(v, g->qs)) {
        return 0;
    }
    __m512i t = _mm512_loadu_si512(out + 16 * i);
    if (subtract) {
        t = _mm512_sub_epi64(t, v);
        t = _mm512_min_epu64(t, _mm512_add_epi64(t, g->qs)); /* where it borrowed, + q is the smaller */
    } else {
        t = _mm512_add_epi64(t, v);
        t = _mm512_min_epu64(t, _mm512_sub_epi64(t, g->qs)); /* where below q, - q wraps to the larger */
    }
    _mm512_storeu_si512(out + 16 * i, t);
    return 1;
}

VECTOR_TARGET static Py_ssize_t apply_avx512(unsigned char *out, const unsigned char *in, Py_ssize_t start,
                                             Py_ssize_t stop, uint64_t q, int subtract) {
    const Group g = group_constants(q);
    Py_ssize_t i = start;
    for (; i + 4 <= stop && apply_group(&g, out, in, i, subtract); i += 4) {
    }
    return apply(out, in, i, stop, q, subtract);
}

/* The same CRC-32 folded by carry-less multiplication (Intel's "Fast CRC Computation for Generic Polynomials Using
 * PCLMULQDQ"), 64 bytes a step in four 128-bit lanes, so that the server checks a chunk in the same pass that adds
 * it: each chunk is then read from memory once, where the CRC and the addition used to read it once each. The
 * constants are bit-reflected x^k mod P shifted left by one, for the fold distances k: 4 x 128 +/- 32 (k1, k2),
 * 128 +/- 32 (k3, k4), 64 (k5); then P itself and floor(x^64 / P) for the Barrett reduction to 32 bits
 * (tests/test_packing.py derives them). */
#define FOLD_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi,pclmul,sse4.1")))

typedef struct {
    __m128i x[4];
} Fold;

FOLD_TARGET static inline __m128i load128(const unsigned char *p) { return _mm_loadu_si128((const __m128i *)p); }

/* x * x^(distance) folded onto the next 128 bits: k holds the constants for the low and the high 64 bits of x. */
FOLD_TARGET static inline __m128i fold16(__m128i x, __m128i k, __m128i next) {
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next);
}

FOLD_TARGET static inline void fold_begin(Fold *f, const unsigned char *p, uint32_t state) {
    f->x[0] = _mm_xor_si128(load128(p), _mm_cvtsi32_si128((int)state));
    for (int k = 1; k < 4; k++) {
        f->x[k] = load128(p + 16 * k);
    }
}

FOLD_TARGET static inline void fold_step(Fold *f, const unsigned char *p) {
    const __m128i k1k2 = _mm_set_epi64x(INT64_C(0x1c6e41596), INT64_C(0x154442bd4));
    for (int k = 0; k < 4; k++) {
        f->x[k] = fold16(f->x[k], k1k2, load128(p + 16 * k));
    }
}

/* The register after the folded bytes and then ``len`` more at ``p``. */
FOLD_TARGET static uint32_t fold_end(Fold *f, const unsigned char *p, Py_ssize_t len) {
    const __m128i k3k4 = _mm_set_epi64x(INT64_C(0x0ccaa009e), INT64_C(0x1751997d0));
    const __m128i k5 = _mm_set_epi64x(0, INT64_C(0x163cd6124));
    const __m128i poly = _mm_set_epi64x(INT64_C(0x1f7011641), INT64_C(0x1db710641)); /* mu, P */
    const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
    __m128i x = f->x[0];
    for (int k = 1; k < 4; k++) {
        x = fold16(x, k3k4, f->x[k]);
    }
    for (; len >= 16; p += 16, len -= 16) {
        x = fold16(x, k3k4, load128(p));
    }
    /* 128 bits to 64, then Barrett's reduction to 32 */
    x = _mm_xor_si128(_mm_srli_si128(x, 8), _mm_clmulepi64_si128(x, k3k4, 0x10));
    x = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x, low32), k5, 0x00), _mm_srli_si128(x, 4));
    __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x, low32), poly, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), poly, 0x00);
    x = _mm_xor_si128(x, t);
    return crc_bytes((uint32_t)_mm_extract_epi32(x, 1), p, len);
}

/* add_checked's loop. Each step folds 64 bytes into the CRC and adds a group of four pairs (60 bytes), so that the
 * multiplications fill the time the addition waits for the sum's memory; the order does not matter, since a
 * mismatch takes everything back out. Returns as apply() does; *state is the CRC register of the whole body, *added
 * the pairs that were added. */
FOLD_TARGET static Py_ssize_t fold_and_apply(unsigned char *out, const unsigned char *body, Py_ssize_t len,
                                             Py_ssize_t packed_at, Py_ssize_t pairs, uint64_t q, int subtract,
                                             uint32_t *state, Py_ssize_t *added) {
    const unsigned char *in = body + packed_at;
    const Group g = group_constants(q);
    Fold f;
    fold_begin(&f, body, UINT32_C(0xFFFFFFFF));
    Py_ssize_t pos = 64, i = 0;
    for (; pos + 64 <= len && i + 4 <= pairs && apply_group(&g, out, in, i, subtract); pos += 64, i += 4) {
        fold_step(&f, body + pos);
    }
    for (; pos + 64 <= len; pos += 64) {
        fold_step(&f, body + pos);
    }
    *state = fold_end(&f, body + pos, len - pos);
    Py_ssize_t bad = apply_avx512(out, in, i, pairs, q, subtract);
    *added = bad < 0 ? pairs : bad / 2;
    return bad;
}

static int have_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("pclmul") &&
           __builtin_cpu_supports("sse4.1");
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
        first_bad = apply_avx512(total.buf, packed.buf, 0, n / 2, q, subtract);
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

static PyObject *add_checked(PyObject *self, PyObject *args) {
    Py_buffer total, body;
    Py_ssize_t packed_at;
    unsigned long crc;
    unsigned long long q;
    int subtract, vector = 1;
    if (!PyArg_ParseTuple(args, "w*y*nkKp|p", &total, &body, &packed_at, &crc, &q, &subtract, &vector)) {
        return NULL;
    }
    Py_ssize_t n = total.len / 8, pairs = n / 2;
    Py_ssize_t bad = -1, added = 0;
    PyObject *result = NULL;
    if (total.len % 8 || n % 2 || packed_at < 0 || body.len != packed_at + pairs * 15 || body.len < 64 || q == 0 ||
        q >> 63) {
        PyErr_Format(PyExc_ValueError,
                     "add_checked: a sum of %zd bytes (uint64, an even count) takes a body of %zd bytes (64 or "
                     "more) whose packed coefficients start at %zd, got %zd; q=%llu",
                     total.len, packed_at + pairs * 15, packed_at, body.len, q);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    uint32_t state;
#if HAVE_VECTOR
    if (vector && vector_kernel) {
        bad = fold_and_apply(total.buf, body.buf, body.len, packed_at, pairs, q, subtract, &state, &added);
    } else
#endif
    {
        /* the reference order: the whole checksum first, then the addition */
        state = crc_bytes(UINT32_C(0xFFFFFFFF), body.buf, body.len);
        if ((uint32_t)~state == (uint32_t)crc) {
            bad = apply(total.buf, (const unsigned char *)body.buf + packed_at, 0, pairs, q, subtract);
            added = bad < 0 ? pairs : bad / 2;
        }
    }
    if ((uint32_t)~state != (uint32_t)crc) {
        bad = -2;
    }
    if (bad != -1) {
        apply(total.buf, (const unsigned char *)body.buf + packed_at, 0, added, q, !subtract);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
done:
    PyBuffer_Release(&total);
    PyBuffer_Release(&body);
    return result;
}

/* A site's side: packs coefficients as pair() reads them. Bytes 0..7 take a | b << 60 and bytes 7..14 take
 * (a | b << 60) >> 56; byte 7 is written twice, with the same value. */
static PyObject *pack60(PyObject *self, PyObject *args) {
    Py_buffer out, values;
    if (!PyArg_ParseTuple(args, "w*y*", &out, &values)) {
        return NULL;
    }
    Py_ssize_t n = values.len / 8, first_bad = -1;
    PyObject *result = NULL;
    if (values.len % 8 || n % 2 || out.len != n / 2 * 15) {
        PyErr_Format(PyExc_ValueError, "pack60: %zd bytes of uint64 values (an even count) take %zd bytes, got %zd",
                     values.len, n / 2 * 15, out.len);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *in = values.buf;
    unsigned char *o = out.buf;
    for (Py_ssize_t i = 0; i < n / 2; i++) {
        uint64_t a, b; /* the values are numpy's, in the machine's byte order */
        memcpy(&a, in + 16 * i, 8);
        memcpy(&b, in + 16 * i + 8, 8);
        if ((a | b) >> 60) {
            first_bad = 2 * i + !(a >> 60);
            break;
        }
        store_le64(o + 15 * i, a | b << 60);
        store_le64(o + 15 * i + 7, a >> 56 | b << 4);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(first_bad);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&values);
    return result;
}

static PyMethodDef methods[] = {
    {"add_packed", add_packed, METH_VARARGS,
     "add_packed(total, packed, q, subtract, vector=True) -> -1, or the index of the first coefficient >= q (nothing "
     "changed). vector=False keeps to the scalar loop where the CPU has AVX-512 (for tests)."},
    {"pack60", pack60, METH_VARARGS,
     "pack60(out, values) -> -1, or the index of the first value not below 2**60 (out is then partly written). "
     "values: uint64, an even count; out: exactly 15 bytes per pair."},
    {"add_checked", add_checked, METH_VARARGS,
     "add_checked(total, body, packed_at, crc, q, subtract, vector=True) -> add_packed(total, body[packed_at:], q, "
     "subtract) where zlib.crc32(body) == crc; else -2 and nothing changed. One pass over body where the CPU has "
     "AVX-512 and PCLMULQDQ; vector=False checks the whole body a byte at a time first (for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_packed", NULL, -1, methods};

PyMODINIT_FUNC PyInit__packed(void) {
    crc_table_init();
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
