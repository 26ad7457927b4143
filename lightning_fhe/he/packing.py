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

try:
    from lightning_fhe.he._packed import pack60 as _compiled_pack60
except ImportError:  # installed without a C compiler
    _compiled_pack60 = None

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
    values = _uint64(values)
    out = bytearray(packed_size(values.size))
    pack60_into(out, values)
    return bytes(out)


def pack60_into(out: bytearray | memoryview, values: np.ndarray) -> None:
    """:func:`pack60` into ``out``, a writable buffer of exactly :func:`packed_size` bytes: a site's worker packs its
    chunks straight into shared memory. In C where the package was built with it (``_packed.c``: 5 to 8 us for 8192
    coefficients), else numpy's same layout (49 us)."""
    values = _uint64(values)
    size = packed_size(values.size)
    if len(out) != size:
        raise PackingError(f"{values.size} coefficients pack into {size} bytes, the buffer holds {len(out)}")
    if _compiled_pack60 is not None:
        bad = _compiled_pack60(out, np.ascontiguousarray(values))
    else:
        bad = numpy_pack60_into(out, values)
    if bad >= 0:
        raise PackingError(f"coefficient {bad} is {int(values[bad])}, not below 2**60")


def numpy_pack60_into(out: bytearray | memoryview, values: np.ndarray) -> int:
    """:func:`pack60_into` in numpy, the reference the compiled one is tested against: -1, or the index of the
    first value not below ``2**60`` (nothing written then)."""
    if values.size and int(values.max()) >> BITS:
        return int(np.argmax(values >= np.uint64(1 << BITS)))  # the first one, not the largest
    pairs = values.size // 2
    v = values.reshape(pairs, 2)
    words = np.empty((pairs, 2), dtype=_U64)
    np.bitwise_or(v[:, 0], v[:, 1] << np.uint64(BITS), out=words[:, 0])
    np.right_shift(v[:, 1], np.uint64(64 - BITS), out=words[:, 1])
    np.frombuffer(out, dtype=np.uint8).reshape(pairs, 15)[:] = words.view(np.uint8).reshape(pairs, 16)[:, :15]
    return -1


def _uint64(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != np.uint64:
        raise PackingError(f"60-bit packing takes uint64 coefficients, got {values.dtype}")
    return values


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
