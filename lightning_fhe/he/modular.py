"""Addition and subtraction of polynomial coefficients modulo the first prime, in place, with numpy.

The server's whole arithmetic under protocol v2: coefficients are below ``q0 < 2**60``, so the sum of two never
overflows 64 bits and one conditional subtraction brings it back below ``q0``. Both are exact, so subtracting what
was added restores a sum bit for bit (how a broken upload is taken back out).

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
