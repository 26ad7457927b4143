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
    modulus = np.uint64(q)
    np.add(total, values, out=total)
    np.subtract(total, modulus, out=total, where=total >= modulus)
    return total


def sub_mod(total: np.ndarray, values: np.ndarray, q: int) -> np.ndarray:
    """``total = (total - values) mod q`` in place, for uint64 arrays whose entries are below ``q < 2**63``."""
    modulus = np.uint64(q)
    borrow = total < values
    np.subtract(total, values, out=total)  # wraps around 2**64 where it borrows; adding q wraps it back
    np.add(total, modulus, out=total, where=borrow)
    return total
