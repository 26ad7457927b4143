/* Little-endian 64-bit words at any byte address, whatever the machine's byte order: the wire's and SEAL's PRNG
 * stream's. Shared by _packed.c and _rlwe.c. */
#ifndef LIGHTNING_FHE_LE64_H
#define LIGHTNING_FHE_LE64_H

#include <stdint.h>
#include <string.h>

static inline uint64_t load_le64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if PY_BIG_ENDIAN
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void store_le64(unsigned char *p, uint64_t v) {
#if PY_BIG_ENDIAN
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

#endif
