"""The fixed-point grid that makes an encrypted sum equal, bit for bit, to the plaintext sum of the same updates.

CKKS decryption returns the sum plus noise: a fresh ciphertext decodes with an error of standard deviation about
``3.2 * sqrt(N / 2)`` units of ``2**-scale_bits`` per value (ring dimension N), ``sqrt(K)`` times that for a sum of
K ciphertexts; some 1e-9 with the default parameters. Small as it is, that moves some float32 weights by one unit in
the last place, training amplifies such differences, and an encrypted run drifts away from the same run in
plaintext (by about 1e-4 in Dice over ten rounds of the quickstart).

So every share-weighted value is rounded to a multiple of ``2**-grid_bits`` (:attr:`CKKSParams.grid_bits`) before
it is summed: by a site before it encrypts, by the server for the values a site sends in plaintext. Multiples of the
grid add exactly in float64, in any order, and the decrypted sum is rounded back to the grid, which removes the noise
because the grid step is ``2**GRID_MARGIN_BITS`` CKKS units. Encrypted and plaintext aggregation therefore give the
same global model, and the plaintext sum no longer depends on the order in which the sites' updates arrived.
"""

from __future__ import annotations

import numpy as np

# The grid step in CKKS units (2**-scale_bits). Half a step is 2**15 units, at least 8 standard deviations of the
# decryption noise while N * K <= 2**21 (ring dimension 8192 and up to 256 sites; 32768 and up to 64). Past that a
# value can now and then land one step (6e-8 with the defaults) away from the plaintext sum.
GRID_MARGIN_BITS = 16


def round_to_grid(values: np.ndarray, bits: int) -> np.ndarray:
    """Rounds float64 ``values`` in place to the nearest multiple of ``2**-bits`` and returns them.

    Scaling by a power of two is exact, so the only rounding is to the grid. Sums of the results are exact while
    their magnitude stays below ``2**(53 - bits)`` (2**29 with the defaults; the encrypted range is far smaller).
    """
    if values.dtype != np.float64:
        raise TypeError(f"round_to_grid works in place on float64 values, got {values.dtype}")
    np.multiply(values, 2.0**bits, out=values)
    np.rint(values, out=values)
    np.multiply(values, 2.0**-bits, out=values)
    values += 0.0  # -0.0 (from rounding a small negative value) becomes +0.0, as in a plaintext sum
    return values
