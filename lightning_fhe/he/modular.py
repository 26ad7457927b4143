"""Addition and subtraction of polynomial coefficients modulo the first prime, in place.

The server's whole arithmetic under protocol v2: coefficients are below ``q0 < 2**60``, so the sum of two never
overflows 64 bits and one conditional subtraction brings it back below ``q0``. Both are exact, so subtracting what
was added restores a sum bit for bit (how a broken upload is taken back out).

:func:`add_packed_mod` adds a chunk's coefficients as they arrive, still packed, in one pass of a small C loop
(``_packed.c``, built with the package) that unpacks, checks and adds, eight coefficients at a time where the CPU has
AVX-512 (:data:`KERNEL`): numpy's version of the same (:func:`numpy_add_packed_mod`) reads the chunk three times and
the sum twice, and took the server about three times as long.

Example::

    >>> import numpy as np
    >>> q = 97
    >>> total = np.array([90, 5], dtype=np.uint64)
    >>> add_mod(total, np.array([10, 1], dtype=np.uint64), q).tolist()
    [3, 6]
    >>> sub_mod(total, np.array([10, 1], dtype=np.uint64), q).tolist()
    [90, 5]
"""

from __future__ import annotations

import numpy as np

from lightning_fhe.he.packing import unpack60


def add_mod(total: np.ndarray, values: np.ndarray, q: int) -> np.ndarray:
    """``total = (total + values) mod q`` in place, for uint64 arrays whose entries are below ``q < 2**63``."""
    np.add(total, values, out=total)
    # Without a branch (ten times faster than a masked subtraction): where the sum is below q, subtracting q wraps
    # around 2**64 to a larger number, so the minimum keeps the sum; elsewhere it keeps the sum minus q.
    np.minimum(total, total - np.uint64(q), out=total)
    return total


def sub_mod(total: np.ndarray, values: np.ndarray, q: int) -> np.ndarray:
    """``total = (total - values) mod q`` in place, for uint64 arrays whose entries are below ``q < 2**63``."""
    np.subtract(total, values, out=total)
    # Where it borrowed, the difference wrapped around 2**64 and adding q wraps it back below q (the smaller one);
    # elsewhere adding q gives the larger one.
    np.minimum(total, total + np.uint64(q), out=total)
    return total


try:  # ISA-L's CRC-32 is zlib's checksum, ten times faster: zlib's was most of the server's work on a chunk
    from isal.isal_zlib import crc32
except ImportError:  # a platform without isal's wheels
    from zlib import crc32

try:
    from lightning_fhe.he._packed import KERNEL as _COMPILED_KERNEL
    from lightning_fhe.he._packed import add_checked as _compiled_add_checked
    from lightning_fhe.he._packed import add_packed as _compiled_add_packed
except ImportError:  # installed without a C compiler: numpy does the same, several times slower
    _compiled_add_packed, _compiled_add_checked, _COMPILED_KERNEL = None, None, "numpy"

COMPILED = _compiled_add_packed is not None
#: The loop that adds a chunk: "avx512" (eight coefficients at a time, its checksum in the same pass), "scalar" (C, a
#: CPU without AVX-512 and PCLMULQDQ), "numpy".
KERNEL: str = _COMPILED_KERNEL
#: What :func:`add_checked_mod` returns for a body whose checksum does not match.
CORRUPT = -2


def add_packed_mod(total: np.ndarray, packed: bytes | memoryview, q: int, subtract: bool = False) -> int | None:
    """``total = (total +/- unpack60(packed)) mod q`` in place, unless a coefficient is not below ``q``: then
    ``total`` is left as it was and that coefficient's index comes back (None when all were added).

    ``total`` is a contiguous uint64 array whose entries are below ``q < 2**63``; ``packed`` holds ``total.size``
    coefficients as :func:`~lightning_fhe.he.packing.pack60` writes them. The server's work on a chunk: one pass that
    checks and adds, in C where the package was built with it (:data:`COMPILED`), else numpy's same arithmetic.
    """
    if _compiled_add_packed is not None:
        bad = _compiled_add_packed(total, packed, q, subtract)
        return None if bad < 0 else bad
    return numpy_add_packed_mod(total, packed, q, subtract)


def add_checked_mod(
    total: np.ndarray, body: bytes | memoryview, packed_at: int, crc: int, q: int, subtract: bool = False
) -> int | None:
    """:func:`add_packed_mod` of ``body[packed_at:]`` if ``crc`` is zlib's CRC-32 of all of ``body``; else
    :data:`CORRUPT`, and ``total`` as it was.

    The server's work on an upload chunk. With the AVX-512 kernel the checksum is folded (PCLMULQDQ) in the same pass
    that adds, and a mismatch takes the addition back out: the chunk is read from memory once, which made the
    server's aggregation 1.3x faster than a checksum pass followed by the addition. Elsewhere the checksum comes
    first. ``body`` is at least 64 bytes.
    """
    if KERNEL == "avx512":
        bad = _compiled_add_checked(total, body, packed_at, crc, q, subtract)
        return None if bad == -1 else bad
    return checksum_then_add_mod(total, body, packed_at, crc, q, subtract)


def checksum_then_add_mod(
    total: np.ndarray, body: bytes | memoryview, packed_at: int, crc: int, q: int, subtract: bool = False
) -> int | None:
    """:func:`add_checked_mod` in two passes, the checksum first: where the CPU lacks AVX-512, and the reference the
    one pass is tested against."""
    if crc32(body) != crc:
        return CORRUPT
    return add_packed_mod(total, memoryview(body)[packed_at:], q, subtract)


def numpy_add_packed_mod(total: np.ndarray, packed: bytes | memoryview, q: int, subtract: bool = False) -> int | None:
    """:func:`add_packed_mod` in numpy: the reference the compiled version is tested against."""
    values = unpack60(packed, total.size)
    bad = first_not_below(values, q)
    if bad is None:
        (sub_mod if subtract else add_mod)(total, values, q)
    return bad


def first_not_below(values: np.ndarray, q: int) -> int | None:
    """The index of the first of ``values`` (uint64) that is not below ``q``, or None when all are."""
    if values.size and values.max() >= q:  # a reduction: no mask of the chunk's size unless one is over
        return int(np.argmax(values >= np.uint64(q)))
    return None
