import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_fhe.he import CKKSParams, HEContext
from lightning_fhe.he.codec import ChunkSum, CiphertextError, HeadroomError, UpdateCipher, num_chunks
from lightning_fhe.he.frames import encode_upload_chunk, upload_chunk_bytes
from lightning_fhe.he.layout import SUPPORTED_DTYPES, TensorLayout
from lightning_fhe.he.seeded import CiphertextLayout

N = 8192


@pytest.fixture(scope="module")
def cipher(site_context) -> UpdateCipher:
    return UpdateCipher(site_context)


def _sum(server_context, updates: list[list[bytes]]) -> ChunkSum:
    total = ChunkSum.for_context(server_context, len(updates[0]))
    for chunks in updates:
        for i, chunk in enumerate(chunks):
            total.add(i, chunk)
    return total


def test_upload_and_download_are_15_16ths_of_twice_fp32(cipher, server_context):
    values = np.random.default_rng(0).normal(0, 0.05, size=3 * N)
    chunks = cipher.encrypt(values)
    assert len(chunks) == num_chunks(values.size, cipher.params) == 3
    assert sum(map(len, chunks)) == 3 * (1 + 4 + 1 + 64 + N * 15 // 2)  # 1.877x fp32
    summed = _sum(server_context, [chunks, chunks])
    assert sum(map(len, summed.chunks())) == 3 * (1 + 4 + 1 + 2 + 2 * 65 + N * 15 // 2)  # 1.879x at 2 sites
    with_polynomial = summed.chunks(summed=CiphertextLayout(server_context))
    assert sum(map(len, with_polynomial)) == 3 * (1 + 4 + 1 + 2 + N * 15)  # 3.75x, whatever the number of sites


@st.composite
def tensors(draw):
    shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
    n = draw(st.integers(1, 5))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return {
        f"t{i}": torch.randn(draw(shapes), generator=generator, dtype=torch.float64).to(
            SUPPORTED_DTYPES[draw(st.sampled_from(sorted(SUPPORTED_DTYPES)))]
        )
        for i in range(n)
    }


@settings(max_examples=25, deadline=None)
@given(tensors())
def test_encrypted_round_trip_restores_every_tensor(cipher, server_context, state):
    layout = TensorLayout.from_tensors(state)
    flat = layout.flatten(state)
    decrypted = cipher.decrypt(_sum(server_context, [cipher.encrypt(flat)]).chunks(), layout.numel)
    np.testing.assert_allclose(decrypted, flat, rtol=0, atol=1e-6)
    restored = layout.unflatten(decrypted)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape
        if tensor.dtype == torch.float64:
            torch.testing.assert_close(restored[name], tensor, rtol=0, atol=1e-6)
        else:  # the decrypted value rounds back to the stored one, or to its neighbour for a half-way value
            eps = torch.finfo(tensor.dtype).eps
            torch.testing.assert_close(restored[name].double(), tensor.double(), rtol=eps, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(
    sites=st.integers(1, 100),
    count=st.integers(1, 2 * N + 3),
    seed=st.integers(0, 2**16),
    dropouts=st.integers(0, 3),
)
def test_weighted_average_of_k_sites_is_exact_within_1e_6(cipher, server_context, sites, count, seed, dropouts):
    rng = np.random.default_rng(seed)
    updates = rng.uniform(-10, 10, size=(sites, count))
    weights = rng.integers(1, 10_000, size=sites).astype(float)
    shares = weights / weights.sum()  # the announced total covers every expected site ...
    present = np.arange(sites)[: max(1, sites - dropouts)]  # ... but some may drop out
    total = _sum(server_context, [cipher.encrypt(updates[k], shares[k]) for k in present])
    average = cipher.decrypt(total.chunks(), count, shares[present].sum())
    exact = np.average(updates[present], axis=0, weights=weights[present])
    assert np.max(np.abs(average - exact)) <= 1e-6


def test_headroom_breach_is_refused_before_encryption_and_names_the_tensor(cipher):
    layout = TensorLayout.from_tensors({"ok": torch.zeros(3), "big": torch.tensor([0.0, 2.0**19])})
    flat = layout.flatten({"ok": torch.zeros(3), "big": torch.tensor([0.0, 2.0**19])})
    with pytest.raises(HeadroomError, match=r"tensor 'big'\[1\] is 524288.*2\^19"):
        cipher.encrypt(flat, where=layout.locate)
    cipher.encrypt(flat * 0.999)  # just inside is fine
    with pytest.raises(HeadroomError, match=r"value 2 is nan"):
        cipher.encrypt(np.array([0.0, 1.0, np.nan]))
    with pytest.raises(ValueError, match=r"weight_fraction must be in \(0, 1\]"):
        cipher.encrypt(np.zeros(3), weight_fraction=1.5)


def _bad_chunks(site_context, good: bytes) -> dict[str, tuple[str, bytes]]:
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    beyond_q0 = np.zeros(N, dtype=np.uint64)
    beyond_q0[5] = 2**60 - 1
    return {
        "flipped body byte": ("corrupt", bytes(flipped)),
        "truncated": ("size", good[:-100]),
        "trailing bytes": ("size", good + b"xx"),
        "empty": ("size", b""),
        "garbage of the right size": (
            "format",
            bytes(np.random.default_rng(1).integers(0, 256, len(good), dtype=np.uint8)),
        ),
        "a coefficient beyond q0": ("range", encode_upload_chunk(beyond_q0, 1, bytes(64))),
        "unknown PRNG": ("format", encode_upload_chunk(np.zeros(N, dtype=np.uint64), 7, bytes(64))),
        "other ring dimension": (
            "size",
            UpdateCipher(HEContext.generate(CKKSParams(poly_modulus_degree=16384))).encrypt(np.zeros(4))[0],
        ),
        "oversized": ("size", good + bytes(upload_chunk_bytes(N))),
    }


def test_bad_chunks_are_rejected_and_leave_the_sum_untouched(cipher, server_context, site_context):
    first = cipher.encrypt(np.full(10, 0.25))
    total = _sum(server_context, [first])
    before = total.chunks()
    for name, (reason, blob) in _bad_chunks(site_context, cipher.encrypt(np.full(10, 0.5))[0]).items():
        with pytest.raises(CiphertextError) as err:
            total.add(0, blob)
        assert err.value.reason == reason, name
        assert total.chunks() == before, name
    with pytest.raises(CiphertextError, match="outside 0..0") as err:
        total.add(1, first[0])
    assert err.value.reason == "index"
    np.testing.assert_allclose(cipher.decrypt(total.chunks(), 10), 0.25, atol=1e-9)


def test_subtracting_an_added_update_restores_the_sum_bit_for_bit(cipher, server_context):
    a, b = cipher.encrypt(np.full(N + 5, 0.1)), cipher.encrypt(np.full(N + 5, -0.3))
    total = _sum(server_context, [a])
    before = total.chunks()
    for i, chunk in enumerate(b):
        total.add(i, chunk)
    assert total.chunks() != before
    for i, chunk in enumerate(b):
        total.subtract(i, chunk)
    assert total.chunks() == before


def test_seeds_and_the_summed_second_polynomial_decrypt_the_same(cipher, server_context):
    total = _sum(server_context, [cipher.encrypt(np.arange(7) / 10, 0.5), cipher.encrypt(np.arange(7) / 5, 0.5)])
    summed = total.chunks(summed=CiphertextLayout(server_context))
    decrypted = cipher.decrypt(summed, 7)
    assert np.array_equal(decrypted, cipher.decrypt(total.chunks(), 7))
    np.testing.assert_allclose(decrypted, np.arange(7) * 0.15, atol=2.0**-cipher.params.grid_bits)
    with pytest.raises(ValueError, match="incomplete"):
        ChunkSum.for_context(server_context, 2).chunks()


def test_decrypt_checks_chunk_count_and_names_the_bad_chunk(cipher, server_context):
    chunks = _sum(server_context, [cipher.encrypt(np.zeros(N + 1))]).chunks()
    with pytest.raises(CiphertextError, match="need 2 chunks, got 1"):
        cipher.decrypt(chunks[:1], N + 1)
    with pytest.raises(CiphertextError, match="chunk 1: .*checksum"):
        cipher.decrypt([chunks[0], chunks[1][:-1] + b"\x00"], N + 1)


def test_server_context_cannot_encrypt_or_decrypt(server_context):
    with pytest.raises(Exception, match="no secret key"):
        UpdateCipher(server_context)
