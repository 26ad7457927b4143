"""The fixed-point grid: encrypted sums decrypt to exactly the plaintext sum, whatever the CKKS noise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lightning_fhe.he import CKKSParams, HEContext
from lightning_fhe.he.codec import ChunkSum, UpdateCipher
from lightning_fhe.he.fixed_point import round_to_grid

BITS = 24
STEP = 2.0**-BITS


@given(arrays(np.float64, 64, elements=st.floats(-1e6, 1e6)))
def test_values_land_on_the_nearest_grid_point(values):
    rounded = round_to_grid(values.copy(), BITS)
    assert np.all(np.abs(rounded - values) <= STEP / 2)
    assert np.array_equal(np.rint(rounded / STEP) * STEP, rounded)  # multiples of the step


def test_rounding_works_in_place_gives_no_negative_zero_and_wants_float64():
    values = np.array([-1e-9, -0.3, 0.3])
    assert round_to_grid(values, BITS) is values
    assert not np.signbit(values[0])
    assert values[2] == -values[1] == round(0.3 * 2**BITS) * STEP
    with pytest.raises(TypeError, match="float64"):
        round_to_grid(np.zeros(3, dtype=np.float32), BITS)


def test_grid_sums_do_not_depend_on_the_order():
    rng = np.random.default_rng(1)
    terms = [round_to_grid(rng.normal(0, 0.1, 10_000) * s, BITS) for s in rng.dirichlet(np.ones(30))]
    forward, backward = np.zeros(10_000), np.zeros(10_000)
    for t in terms:
        forward += t
    for t in reversed(terms):
        backward += t
    assert np.array_equal(forward, backward)


@pytest.mark.parametrize("scale_bits", [40, 50])
def test_an_encrypted_sum_of_30_sites_decrypts_to_the_plaintext_sum_bit_for_bit(scale_bits, site_context):
    """The noise CKKS adds grows with the number of ciphertexts summed; 30 sites stay well inside half a step."""
    if scale_bits != site_context.params.scale_bits:
        site_context = HEContext.generate(CKKSParams(scale_bits=scale_bits))
    cipher, bits = UpdateCipher(site_context), scale_bits - 16
    assert cipher.params.grid_bits == bits
    rng = np.random.default_rng(2)
    count = 2 * cipher.params.values_per_ciphertext
    shares = rng.dirichlet(np.ones(30))
    updates = [rng.normal(0, 0.1, count) for _ in shares]
    total = ChunkSum.for_context(site_context.without_keys(), 2)
    plaintext_sum = np.zeros(count)
    for share, values in zip(shares, updates):
        for i, chunk in enumerate(cipher.encrypt(values, share)):
            total.add(i, chunk)
        plaintext_sum += round_to_grid(share * values, bits)
    total_share = float(shares.sum())
    decrypted = cipher.decrypt(total.chunks(), count, total_share)
    assert np.array_equal(decrypted, plaintext_sum / total_share)
    exact = sum(s * v for s, v in zip(shares, updates)) / total_share
    assert np.abs(decrypted - exact).max() <= 30 * 2.0**-bits / 2
