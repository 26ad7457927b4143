/* SEAL's secret-key encryption and decryption of one CKKS ciphertext at a single prime, with SEAL's seed expansion.
 *
 * lightning_fhe.he.rlwe documents it and holds the Python side (tables, key, encoding). Each piece is SEAL 4's,
 * bit for bit (tests/test_rlwe.py holds them against SEAL):
 *   - BLAKE2Xb as SEAL's Blake2xbPRNG uses it: the stream is blake2xb(4096 bytes, key = 64-byte seed,
 *     message = u64 counter) for counter 0, 1, 2, ...; with AVX-512 (looked up when the module loads; KERNEL says
 *     which), eight of its output nodes are hashed at once;
 *   - SEAL's sample_poly_uniform: 8 bytes a coefficient, a value >= max_multiple replaced by the stream's next 8
 *     bytes, then reduced mod q (so the result is uniform), already in NTT form;
 *   - SEAL's negacyclic NTT (Harvey's butterflies, root powers in bit-reversed order, output bit-reversed) and its
 *     inverse;
 *   - SEAL's centred binomial noise, 6 bytes a coefficient.
 * encrypt() puts them together as SEAL's encrypt_zero_symmetric plus the plaintext does: c0 = NTT(m + e) - a*s
 * mod q, a = uniform(public seed); decrypt() is INTT(c0 + c1*s), centred. The GIL is released while they compute.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_le64.h"

/* ---- BLAKE2b (RFC 7693) -------------------------------------------------------------------------------------- */

static const uint64_t IV[8] = {
    UINT64_C(0x6a09e667f3bcc908), UINT64_C(0xbb67ae8584caa73b), UINT64_C(0x3c6ef372fe94f82b),
    UINT64_C(0xa54ff53a5f1d36f1), UINT64_C(0x510e527fade682d1), UINT64_C(0x9b05688c2b3e6c1f),
    UINT64_C(0x1f83d9abfb41bd6b), UINT64_C(0x5be0cd19137e2179)};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t rotr64(uint64_t x, int r) { return (x >> r) | (x << (64 - r)); }

static inline uint64_t mulhi(uint64_t a, uint64_t b) { return (uint64_t)(((unsigned __int128)a * b) >> 64); }

/* memset that the compiler may not drop as a dead store before the memory is freed or goes out of scope */
static void wipe(void *p, size_t n) {
    memset(p, 0, n);
    __asm__ __volatile__("" : : "r"(p) : "memory");
}

/* BLAKE2b's twelve rounds over the working vector v: G mixes the four columns, then the four diagonals (RFC 7693,
 * 3.2). G is the mixing function for v's type: one state (G) or eight, a lane each (GV). */
#define ROUNDS(G, v)                                                                                                 \
    for (int r = 0; r < 12; r++) {                                                                                    \
        G(r, 0, v[0], v[4], v[8], v[12]);                                                                            \
        G(r, 1, v[1], v[5], v[9], v[13]);                                                                            \
        G(r, 2, v[2], v[6], v[10], v[14]);                                                                           \
        G(r, 3, v[3], v[7], v[11], v[15]);                                                                           \
        G(r, 4, v[0], v[5], v[10], v[15]);                                                                           \
        G(r, 5, v[1], v[6], v[11], v[12]);                                                                           \
        G(r, 6, v[2], v[7], v[8], v[13]);                                                                            \
        G(r, 7, v[3], v[4], v[9], v[14]);                                                                            \
    }

#define G(r, i, a, b, c, d)                      \
    do {                                         \
        a = a + b + m[SIGMA[r][2 * i]];          \
        d = rotr64(d ^ a, 32);                   \
        c = c + d;                               \
        b = rotr64(b ^ c, 24);                   \
        a = a + b + m[SIGMA[r][2 * i + 1]];      \
        d = rotr64(d ^ a, 16);                   \
        c = c + d;                               \
        b = rotr64(b ^ c, 63);                   \
    } while (0)

/* One compression of a 128-byte block; t is the byte count so far (below 2**64 here), last marks the final block. */
static void compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load_le64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= t;
    if (last) v[14] = ~v[14];
    ROUNDS(G, v);
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* The state after BLAKE2b's parameter block: digest and key length, fanout, depth, leaf length, node offset (for
 * BLAKE2Xb: u32 node offset, u32 XOF length), node depth, inner length; salt and personalization zero. */
static void init_param(uint64_t h[8], int digest, int key, int fanout, int depth, uint32_t leaf, uint32_t offset,
                       uint32_t xof, int inner) {
    uint64_t p0 = (uint64_t)digest | (uint64_t)key << 8 | (uint64_t)fanout << 16 | (uint64_t)depth << 24 |
                  (uint64_t)leaf << 32;
    uint64_t p1 = (uint64_t)offset | (uint64_t)xof << 32;
    uint64_t p2 = (uint64_t)inner << 8;  /* node depth 0 */
    for (int i = 0; i < 8; i++) h[i] = IV[i];
    h[0] ^= p0;
    h[1] ^= p1;
    h[2] ^= p2;
}

#define STREAM_BUFFER 4096  /* SEAL's UniformRandomGenerator buffer: one blake2xb output per refill */

static void store_words(uint8_t *out, const uint64_t h[8]) {
    for (int k = 0; k < 8; k++) store_le64(out + 8 * k, h[k]);
}

/* BLAKE2Xb's output node `offset`: BLAKE2b of the 64-byte root, as a leaf of a tree whose XOF length is 4096. */
static void leaf(uint8_t out[64], const uint8_t block[128], uint32_t offset) {
    uint64_t h[8];
    init_param(h, 64, 0, 0, 0, 64, offset, STREAM_BUFFER, 64);
    compress(h, block, 64, 1);
    store_words(out, h);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_VECTOR 1

/* Eight output nodes at once, offsets first..first+7, one per 64-bit lane: the same message, the same parameters but
 * for the node offset, so the same rounds on eight states. */
__attribute__((target("avx512f"))) static void leaves8(uint8_t out[512], const uint8_t block[128], uint32_t first) {
    __m512i m[16], v[16], h[8];
    uint64_t h0[8], lanes[8][8];
    for (int k = 0; k < 16; k++) m[k] = _mm512_set1_epi64((long long)load_le64(block + 8 * k));
    init_param(h0, 64, 0, 0, 0, 64, 0, STREAM_BUFFER, 64);
    for (int i = 0; i < 8; i++) h[i] = _mm512_set1_epi64((long long)h0[i]);
    h[1] = _mm512_xor_si512(h[1], _mm512_add_epi64(_mm512_set1_epi64(first), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0)));
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = _mm512_set1_epi64((long long)IV[i]);
    }
    v[12] = _mm512_xor_si512(v[12], _mm512_set1_epi64(64));
    v[14] = _mm512_xor_si512(v[14], _mm512_set1_epi64(-1));
#define GV(r, i, a, b, c, d)                                                   \
    do {                                                                       \
        a = _mm512_add_epi64(_mm512_add_epi64(a, b), m[SIGMA[r][2 * i]]);      \
        d = _mm512_ror_epi64(_mm512_xor_si512(d, a), 32);                      \
        c = _mm512_add_epi64(c, d);                                            \
        b = _mm512_ror_epi64(_mm512_xor_si512(b, c), 24);                      \
        a = _mm512_add_epi64(_mm512_add_epi64(a, b), m[SIGMA[r][2 * i + 1]]);  \
        d = _mm512_ror_epi64(_mm512_xor_si512(d, a), 16);                      \
        c = _mm512_add_epi64(c, d);                                            \
        b = _mm512_ror_epi64(_mm512_xor_si512(b, c), 63);                      \
    } while (0)
    ROUNDS(GV, v);
#undef GV
    for (int i = 0; i < 8; i++) {
        _mm512_storeu_si512((void *)lanes[i], _mm512_xor_si512(h[i], _mm512_xor_si512(v[i], v[i + 8])));
    }
    for (int lane = 0; lane < 8; lane++) {
        for (int k = 0; k < 8; k++) store_le64(out + 64 * lane + 8 * k, lanes[k][lane]);
    }
}

static int cpu_has_vector(void) { return __builtin_cpu_supports("avx512f"); }
#else
#define HAVE_VECTOR 0
#endif

static int use_vector = 0;  /* set once when the module loads */

/* blake2xb(out, 4096, &counter, 8, seed, 64), as SEAL's Blake2xbPRNG::refill_buffer calls it. */
static void blake2xb_4096(uint8_t out[STREAM_BUFFER], const uint8_t seed[64], uint64_t counter, int vector) {
    uint64_t root[8];
    uint8_t block[128];
    init_param(root, 64, 64, 1, 1, 0, 0, STREAM_BUFFER, 0);
    memset(block, 0, sizeof block);
    memcpy(block, seed, 64);
    compress(root, block, 128, 0);  /* the key block */
    memset(block, 0, sizeof block);
    store_le64(block, counter);
    compress(root, block, 136, 1);
    memset(block, 0, sizeof block);
    store_words(block, root);
    uint32_t i = 0;
#if HAVE_VECTOR
    if (vector) {
        for (; i < STREAM_BUFFER / 64; i += 8) leaves8(out + 64 * i, block, i);
    }
#endif
    for (; i < STREAM_BUFFER / 64; i++) leaf(out + 64 * i, block, i);
    wipe(block, sizeof block);  /* the root: a bootstrap stream's is secret */
}

/* SEAL's UniformRandomGenerator::generate over the blake2xb stream of one seed. */
typedef struct {
    const uint8_t *seed;
    uint64_t counter;
    size_t head;
    int vector;
    uint8_t buffer[STREAM_BUFFER];
} Stream;

static void stream_init(Stream *s, const uint8_t seed[64], int vector) {
    s->seed = seed;
    s->vector = vector;
    s->counter = 0;
    s->head = STREAM_BUFFER;
}

static void stream_read(Stream *s, uint8_t *out, size_t count) {
    while (count) {
        if (s->head == STREAM_BUFFER) {
            blake2xb_4096(s->buffer, s->seed, s->counter++, s->vector);
            s->head = 0;
        }
        size_t take = STREAM_BUFFER - s->head < count ? STREAM_BUFFER - s->head : count;
        memcpy(out, s->buffer + s->head, take);
        s->head += take;
        out += take;
        count -= take;
    }
}

/* SEAL's sample_poly_uniform for one prime: the polynomial a of a seeded ciphertext, in NTT form. */
static void sample_uniform(uint64_t *a, Py_ssize_t n, const uint8_t seed[64], uint64_t q, int vector) {
    Stream s;
    stream_init(&s, seed, vector);
    stream_read(&s, (uint8_t *)a, (size_t)n * 8);
    const uint64_t max_multiple = UINT64_MAX - UINT64_MAX % q - 1;
    const uint64_t ratio = UINT64_MAX / q;  /* r mod q without a division: the quotient estimate is at most 2 low */
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t r;
#if PY_BIG_ENDIAN
        r = __builtin_bswap64(a[i]);
#else
        r = a[i];
#endif
        while (r >= max_multiple) {
            uint8_t more[8];
            stream_read(&s, more, 8);
            r = load_le64(more);
        }
        r -= mulhi(r, ratio) * q;
        while (r >= q) r -= q;
        a[i] = r;
    }
}

/* ---- arithmetic modulo a prime q < 2**62 ------------------------------------------------------------------------ */


/* x * w mod q in [0, 2q), with w_shoup = floor(w * 2**64 / q) (Shoup's trick: no division). */
static inline uint64_t mul_shoup_lazy(uint64_t x, uint64_t w, uint64_t w_shoup, uint64_t q) {
    return x * w - mulhi(x, w_shoup) * q;
}

/* A table of n factors and their Shoup factors, one after the other: (2, n) uint64 on the Python side. */
typedef struct {
    const uint64_t *w, *shoup;
} Table;

/* SEAL's ntt_negacyclic_harvey: input in [0, q), output in [0, q), bit-reversed order; roots.w[k] = psi**bitrev(k). */
static void ntt_forward(uint64_t *a, Py_ssize_t n, uint64_t q, Table roots) {
    const uint64_t two_q = 2 * q;
    for (Py_ssize_t m = 1, t = n >> 1; m < n; m <<= 1, t >>= 1) {
        for (Py_ssize_t i = 0; i < m; i++) {
            const uint64_t w = roots.w[m + i], ws = roots.shoup[m + i];
            uint64_t *x = a + 2 * i * t, *y = x + t;
            for (Py_ssize_t j = 0; j < t; j++) {
                uint64_t u = x[j];
                u -= u >= two_q ? two_q : 0;
                uint64_t v = mul_shoup_lazy(y[j], w, ws, q);
                x[j] = u + v;
                y[j] = u - v + two_q;
            }
        }
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        uint64_t u = a[j];
        u -= u >= two_q ? two_q : 0;
        a[j] = u >= q ? u - q : u;
    }
}

/* Its inverse (Gentleman-Sande butterflies): input in [0, q), bit-reversed; output in [0, q). inverse.w[k] is
 * psi**-bitrev(k) for k >= 1; inverse.w[0], which no butterfly uses, holds 1/n mod q. */
static void ntt_inverse(uint64_t *a, Py_ssize_t n, uint64_t q, Table inverse) {
    const uint64_t two_q = 2 * q;
    for (Py_ssize_t m = n, t = 1; m > 1; m >>= 1, t <<= 1) {
        const Py_ssize_t h = m >> 1;
        for (Py_ssize_t i = 0; i < h; i++) {
            const uint64_t w = inverse.w[h + i], ws = inverse.shoup[h + i];
            uint64_t *x = a + 2 * i * t, *y = x + t;
            for (Py_ssize_t j = 0; j < t; j++) {
                uint64_t u = x[j], v = y[j];  /* both in [0, 2q) */
                uint64_t sum = u + v;
                x[j] = sum >= two_q ? sum - two_q : sum;
                y[j] = mul_shoup_lazy(u - v + two_q, w, ws, q);
            }
        }
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        uint64_t u = mul_shoup_lazy(a[j], inverse.w[0], inverse.shoup[0], q);
        a[j] = u >= q ? u - q : u;
    }
}

/* c mod q for a signed coefficient; the encoded plaintext's are below q in magnitude, so rarely a division. */
static inline uint64_t reduce_signed(int64_t c, uint64_t q) {
    if (c >= 0) return (uint64_t)c < q ? (uint64_t)c : (uint64_t)c % q;
    uint64_t magnitude = (uint64_t)(-(c + 1)) + 1;  /* |c|, INT64_MIN included */
    magnitude = magnitude < q ? magnitude : magnitude % q;
    return magnitude ? q - magnitude : 0;
}

/* SEAL's sample_poly_cbd for one coefficient: 21 bits' weight minus 21 bits' weight, from 6 bytes of the stream. */
static inline int cbd(const uint8_t x[6]) {
    uint32_t plus = (uint32_t)x[0] | (uint32_t)x[1] << 8 | (uint32_t)(x[2] & 0x1F) << 16;
    uint32_t minus = (uint32_t)x[3] | (uint32_t)x[4] << 8 | (uint32_t)(x[5] & 0x1F) << 16;
    return __builtin_popcount(plus) - __builtin_popcount(minus);
}

static inline uint64_t mul_mod(uint64_t x, Table key, Py_ssize_t i, uint64_t q) {
    uint64_t r = mul_shoup_lazy(x, key.w[i], key.shoup[i], q);
    return r >= q ? r - q : r;
}

/* SEAL's encrypt_zero_symmetric plus the plaintext, with the bootstrap PRNG's seed given: the public seed is the
 * bootstrap stream's first 64 bytes and the noise its next 6 bytes a coefficient, as in SEAL. a is scratch. */
static void encrypt(uint64_t *out, uint8_t public_seed[64], const int64_t *m, const uint8_t bootstrap_seed[64],
                    Table key, Py_ssize_t n, uint64_t q, Table roots, uint64_t *a) {
    Stream bootstrap;
    stream_init(&bootstrap, bootstrap_seed, use_vector);
    stream_read(&bootstrap, public_seed, 64);
    uint8_t *noise = (uint8_t *)a;  /* a's room holds 8n bytes; the noise takes 6n before a is sampled */
    stream_read(&bootstrap, noise, 6 * (size_t)n);
    for (Py_ssize_t i = 0; i < n; i++) {
        int e = cbd(noise + 6 * i);
        uint64_t r = reduce_signed(m[i], q);
        r = e < 0 ? (r >= (uint64_t)(-e) ? r - (uint64_t)(-e) : r + q - (uint64_t)(-e)) : r + (uint64_t)e;
        out[i] = r >= q ? r - q : r;  /* m + e: NTT is linear, so one transform gives NTT(m) + NTT(e) */
    }
    wipe(bootstrap.buffer, sizeof bootstrap.buffer);  /* the noise */
    wipe(noise, 6 * (size_t)n);
    ntt_forward(out, n, q, roots);
    sample_uniform(a, n, public_seed, q, use_vector);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t as = mul_mod(a[i], key, i, q);
        out[i] = out[i] >= as ? out[i] - as : out[i] + q - as;
    }
}

/* out = sum of uniform(seed) over the seeds, modulo q: the second polynomial of a sum of seeded ciphertexts. */
static void uniform_sum(uint64_t *out, Py_ssize_t n, const uint8_t *seeds, Py_ssize_t count, uint64_t q,
                        uint64_t *a) {
    sample_uniform(out, n, seeds, q, use_vector);
    for (Py_ssize_t k = 1; k < count; k++) {
        sample_uniform(a, n, seeds + 64 * k, q, use_vector);
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t t = out[i] + a[i];
            out[i] = t >= q ? t - q : t;
        }
    }
}

/* The plaintext of (c0, c1) as signed coefficients: INTT(c0 + c1*s), centred around 0, as SEAL's decrypt and the
 * CKKS decoder's first step do. work is scratch. */
static void decrypt(int64_t *out, const uint64_t *c0, const uint64_t *c1, Table key, Py_ssize_t n, uint64_t q,
                    Table inverse, uint64_t *work) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t t = c0[i] + mul_mod(c1[i], key, i, q);
        work[i] = t >= q ? t - q : t;
    }
    ntt_inverse(work, n, q, inverse);
    const uint64_t half = q >> 1;
    for (Py_ssize_t i = 0; i < n; i++) out[i] = work[i] > half ? -(int64_t)(q - work[i]) : (int64_t)work[i];
    wipe(work, 8 * n);  /* the plaintext */
}

/* ---- Python ------------------------------------------------------------------------------------------------------ */

typedef struct {
    Py_buffer views[8];
    int count;
} Views;

static void release(Views *v) {
    for (int i = 0; i < v->count; i++) PyBuffer_Release(&v->views[i]);
}

/* n words of scratch for a call whose arguments were all taken (ok); otherwise, or out of memory, NULL with the
 * views released and the error set. */
static uint64_t *scratch(Views *v, int ok, Py_ssize_t n) {
    uint64_t *words = ok ? PyMem_RawMalloc(8 * n) : NULL;
    if (!words) {
        release(v);
        if (ok) PyErr_NoMemory();
    }
    return words;
}

/* Takes a contiguous buffer of exactly `bytes` bytes (any, when bytes < 0); writable when asked. */
static void *take(Views *v, PyObject *obj, Py_ssize_t bytes, int writable, const char *name) {
    Py_buffer *view = &v->views[v->count];
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    v->count++;
    if (bytes >= 0 && view->len != bytes) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, view->len, bytes);
        return NULL;
    }
    return view->buf;
}

/* A (2, n) table: n factors, then their n Shoup factors. */
static int take_table(Views *v, PyObject *obj, Py_ssize_t n, const char *name, Table *table) {
    const uint64_t *data = take(v, obj, 16 * n, 0, name);
    if (!data) return 0;
    table->w = data;
    table->shoup = data + n;
    return 1;
}

static int check_q(unsigned long long q) {
    if (q < 3 || q >= (UINT64_C(1) << 62) || !(q & 1)) {
        PyErr_Format(PyExc_ValueError, "q must be an odd prime below 2**62, got %llu", q);
        return 0;
    }
    return 1;
}

/* The ring dimension of a writable uint64 polynomial `out`, the first view taken; 0 with an error set if wrong. */
static Py_ssize_t ring(Views *v, PyObject *obj, const char *name) {
    if (!take(v, obj, -1, 1, name)) return 0;
    Py_ssize_t bytes = v->views[v->count - 1].len, n = bytes / 8;
    if (bytes % 8 || n < 2 || (n & (n - 1))) {
        PyErr_Format(PyExc_ValueError, "%s must hold a power of two of 8-byte coefficients, got %zd bytes", name,
                     bytes);
        return 0;
    }
    return n;
}

static PyObject *py_uniform(PyObject *self, PyObject *args) {
    PyObject *out_obj, *seed_obj;
    unsigned long long q;
    int vector = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOK|p", &out_obj, &seed_obj, &q, &vector) || !check_q(q)) return NULL;
    Views v = {.count = 0};
    Py_ssize_t n = ring(&v, out_obj, "out");
    const uint8_t *seed = n ? take(&v, seed_obj, 64, 0, "the seed") : NULL;
    if (!seed) {
        release(&v);
        return NULL;
    }
    uint64_t *out = v.views[0].buf;
    Py_BEGIN_ALLOW_THREADS
    sample_uniform(out, n, seed, q, use_vector && vector);
    Py_END_ALLOW_THREADS
    release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_uniform_sum(PyObject *self, PyObject *args) {
    PyObject *out_obj, *seeds_obj;
    unsigned long long q;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOK", &out_obj, &seeds_obj, &q) || !check_q(q)) return NULL;
    Views v = {.count = 0};
    Py_ssize_t n = ring(&v, out_obj, "out");
    const uint8_t *seeds = n ? take(&v, seeds_obj, -1, 0, "the seeds") : NULL;
    Py_ssize_t count = seeds ? v.views[1].len / 64 : 0;
    if (seeds && (count == 0 || v.views[1].len % 64)) {
        PyErr_Format(PyExc_ValueError, "the seeds must be one or more of 64 bytes, got %zd bytes", v.views[1].len);
        seeds = NULL;
    }
    uint64_t *a = scratch(&v, seeds != NULL, n);
    if (!a) return NULL;
    uint64_t *out = v.views[0].buf;
    Py_BEGIN_ALLOW_THREADS
    uniform_sum(out, n, seeds, count, q, a);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(a);
    release(&v);
    Py_RETURN_NONE;
}

static PyObject *transform(PyObject *args, int inverse) {
    PyObject *poly_obj, *table_obj;
    unsigned long long q;
    if (!PyArg_ParseTuple(args, "OKO", &poly_obj, &q, &table_obj) || !check_q(q)) return NULL;
    Views v = {.count = 0};
    Table table;
    Py_ssize_t n = ring(&v, poly_obj, "poly");
    if (!n || !take_table(&v, table_obj, n, "the table", &table)) {
        release(&v);
        return NULL;
    }
    uint64_t *poly = v.views[0].buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (poly[i] >= q) {
            release(&v);
            return PyErr_Format(PyExc_ValueError, "coefficient %zd is not below q", i);
        }
    }
    Py_BEGIN_ALLOW_THREADS
    if (inverse) {
        ntt_inverse(poly, n, q, table);
    } else {
        ntt_forward(poly, n, q, table);
    }
    Py_END_ALLOW_THREADS
    release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_ntt(PyObject *self, PyObject *args) {
    (void)self;
    return transform(args, 0);
}

static PyObject *py_intt(PyObject *self, PyObject *args) {
    (void)self;
    return transform(args, 1);
}

static PyObject *py_encrypt(PyObject *self, PyObject *args) {
    PyObject *out_obj, *seed_obj, *m_obj, *boot_obj, *key_obj, *roots_obj;
    unsigned long long q;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOKO", &out_obj, &seed_obj, &m_obj, &boot_obj, &key_obj, &q, &roots_obj) ||
        !check_q(q)) {
        return NULL;
    }
    Views v = {.count = 0};
    Table key, roots;
    Py_ssize_t n = ring(&v, out_obj, "out");
    uint8_t *public_seed = n ? take(&v, seed_obj, 64, 1, "the public seed") : NULL;
    const int64_t *m = public_seed ? take(&v, m_obj, 8 * n, 0, "the coefficients") : NULL;
    const uint8_t *boot = m ? take(&v, boot_obj, 64, 0, "the bootstrap seed") : NULL;
    int ok = boot && take_table(&v, key_obj, n, "the secret key", &key) &&
             take_table(&v, roots_obj, n, "roots", &roots);
    uint64_t *a = scratch(&v, ok, n);
    if (!a) return NULL;
    uint64_t *out = v.views[0].buf;
    Py_BEGIN_ALLOW_THREADS
    encrypt(out, public_seed, m, boot, key, n, q, roots, a);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(a);
    release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_decrypt(PyObject *self, PyObject *args) {
    PyObject *out_obj, *c0_obj, *c1_obj, *key_obj, *inverse_obj;
    unsigned long long q;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOKO", &out_obj, &c0_obj, &c1_obj, &key_obj, &q, &inverse_obj) || !check_q(q)) {
        return NULL;
    }
    Views v = {.count = 0};
    Table key, inverse;
    Py_ssize_t n = ring(&v, out_obj, "out");
    const uint64_t *c0 = n ? take(&v, c0_obj, 8 * n, 0, "c0") : NULL;
    const uint64_t *c1 = c0 ? take(&v, c1_obj, 8 * n, 0, "c1") : NULL;
    int ok = c1 && take_table(&v, key_obj, n, "the secret key", &key) &&
             take_table(&v, inverse_obj, n, "the inverse table", &inverse);
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        if (c0[i] >= q || c1[i] >= q) {
            PyErr_Format(PyExc_ValueError, "coefficient %zd of the ciphertext is not below q", i);
            ok = 0;
        }
    }
    uint64_t *work = scratch(&v, ok, n);
    if (!work) return NULL;
    int64_t *out = v.views[0].buf;
    Py_BEGIN_ALLOW_THREADS
    decrypt(out, c0, c1, key, n, q, inverse, work);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(work);
    release(&v);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"uniform", py_uniform, METH_VARARGS,
     "uniform(out, seed, q, vector=True): SEAL's uniform polynomial of a 64-byte BLAKE2Xb seed modulo q, into out "
     "(uint64); vector=False forces the scalar BLAKE2b."},
    {"uniform_sum", py_uniform_sum, METH_VARARGS,
     "uniform_sum(out, seeds, q): the sum modulo q of the uniform polynomials of the concatenated 64-byte seeds."},
    {"ntt", py_ntt, METH_VARARGS, "ntt(poly, q, roots): SEAL's forward negacyclic NTT, in place."},
    {"intt", py_intt, METH_VARARGS, "intt(poly, q, inverse): its inverse, in place."},
    {"encrypt", py_encrypt, METH_VARARGS,
     "encrypt(out, public_seed, coefficients, bootstrap_seed, key, q, roots): the first polynomial (into out) and "
     "the public seed (into public_seed) of SEAL's secret-key encryption of the plaintext with these int64 "
     "coefficients."},
    {"decrypt", py_decrypt, METH_VARARGS,
     "decrypt(out, c0, c1, key, q, inverse): the plaintext's coefficients of (c0, c1), centred, into out (int64)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rlwe", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rlwe(void) {
#if HAVE_VECTOR
    use_vector = cpu_has_vector();
#endif
    PyObject *mod = PyModule_Create(&module);
    if (mod && PyModule_AddStringConstant(mod, "KERNEL", use_vector ? "avx512" : "scalar") < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
