"""60-bit packing of polynomial coefficients: two coefficients below ``2**60`` in 15 bytes instead of 16.

A ciphertext at the lowest level holds its coefficients modulo the first prime, which has at most 60 bits (SEAL's
limit for a prime), so the top four bits of every 64-bit word are zero. Dropping them saves 1/16 of every byte on
the wire: the last saving there is for one 60-bit prime and two reals per slot.

Layout: coefficients ``a`` (even position) and ``b`` (odd position) become the 120-bit little-endian integer
``a | b << 60``, written as 15 bytes.

Example::

    >>> import numpy as np
    >>> values = np.array([1, 2**60 - 1, 12345, 0], dtype=np.uint64)
    >>> packed = pack60(values)
    >>> len(packed), packed_size(4)
    (30, 30)
    >>> unpack60(packed, 4).tolist() == values.tolist()
    True
"""

from __future__ import annotations

import numpy as np

BITS = 60
_MASK = np.uint64((1 << BITS) - 1)
_U64 = np.dtype("<u8")


class PackingError(ValueError):
    """Coefficients that cannot be packed, or bytes that do not hold the coefficients they should."""


def packed_size(count: int) -> int:
    """Bytes that ``count`` packed coefficients take; ``count`` must be even."""
    if count < 0 or count % 2:
        raise PackingError(f"60-bit packing takes an even number of coefficients, got {count}")
    return count // 2 * 15


def pack60(values: np.ndarray) -> bytes:
    """``values`` (uint64, each below ``2**60``, an even count) as ``15 * len(values) / 2`` bytes."""
    values = np.asarray(values)
    if values.dtype != np.uint64:
        raise PackingError(f"60-bit packing takes uint64 coefficients, got {values.dtype}")
    pairs = packed_size(values.size) // 15
    if values.size and int(values.max()) >> BITS:
        i = int(np.argmax(values >> np.uint64(BITS)))
        raise PackingError(f"coefficient {i} is {int(values[i])}, not below 2**60")
    v = values.reshape(pairs, 2)
    words = np.empty((pairs, 2), dtype=_U64)
    np.bitwise_or(v[:, 0], v[:, 1] << np.uint64(BITS), out=words[:, 0])
    np.right_shift(v[:, 1], np.uint64(64 - BITS), out=words[:, 1])
    return words.view(np.uint8).reshape(pairs, 16)[:, :15].tobytes()


def unpack60(data: bytes | memoryview, count: int) -> np.ndarray:
    """The ``count`` coefficients packed in ``data`` (exactly :func:`packed_size` bytes), as uint64."""
    size = packed_size(count)
    if len(data) != size:
        raise PackingError(f"{count} packed coefficients take {size} bytes, got {len(data)}")
    pairs = count // 2
    out = np.empty((pairs, 2), dtype=np.uint64)
    if pairs:
        # Two overlapping 8-byte reads per 15-byte pair, no copy: bytes 0..7 hold a and b's low 4 bits, bytes 7..14
        # hold bits 56..119, that is b shifted left by 4.
        low = np.ndarray((pairs,), dtype=_U64, buffer=data, offset=0, strides=(15,))
        high = np.ndarray((pairs,), dtype=_U64, buffer=data, offset=7, strides=(15,))
        np.bitwise_and(low, _MASK, out=out[:, 0])
        np.right_shift(high, np.uint64(64 - BITS), out=out[:, 1])
    return out.reshape(count)
