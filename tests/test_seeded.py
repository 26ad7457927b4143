"""SEAL's ciphertexts taken apart and rebuilt (protocol v2), against SEAL's own arithmetic, bit for bit.

The server adds first polynomials modulo q0 and keeps the seeds; a site rebuilds the ciphertext of the sum. These
tests hold that rebuilt ciphertext against the one SEAL's ``Evaluator.add_inplace`` makes from the same seeded
ciphertexts, and the decrypted sum against the plaintext sum of the same updates on the fixed-point grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from lightning_fhe.he import CKKSParams, HEContext
from lightning_fhe.he.codec import ChunkSum, CiphertextError, UpdateCipher
from lightning_fhe.he.fixed_point import round_to_grid
from lightning_fhe.he.frames import decode_global_chunk
from lightning_fhe.he.modular import add_mod
from lightning_fhe.he.seal_io import thread_buffer
from lightning_fhe.he.seeded import CiphertextLayout, SealFormatError


@pytest.fixture(scope="module")
def layout(site_context) -> CiphertextLayout:
    return CiphertextLayout(site_context)


@pytest.fixture(scope="module")
def cipher(site_context) -> UpdateCipher:
    return UpdateCipher(site_context)


def _seal_seeded_blobs(context: HEContext, count: int, seed: int = 0) -> list[bytes]:
    """``count`` seeded ciphertexts of random values, serialized by SEAL itself (with its default compression)."""
    seal_context = context.seal_context
    encoder = sealapi.CKKSEncoder(seal_context)
    encryptor = sealapi.Encryptor(seal_context, context.secret_key())
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(count):
        plaintext = sealapi.Plaintext()
        values = rng.normal(0, 0.1, encoder.slot_count()).tolist()
        encoder.encode(values, seal_context.last_parms_id(), context.params.scale, plaintext)
        blobs.append(thread_buffer().dump(encryptor.encrypt_symmetric(plaintext)))
    return blobs


def _polynomials(layout: CiphertextLayout, ciphertext) -> tuple[np.ndarray, np.ndarray]:
    return layout.split_full(thread_buffer().dump(ciphertext))


def _seal_sum(layout: CiphertextLayout, blobs: list[bytes]):
    """The old server's way: SEAL loads every seeded ciphertext (expanding its seed) and adds them."""
    evaluator = sealapi.Evaluator(layout.context.seal_context)
    total = layout.load(blobs[0])
    for blob in blobs[1:]:
        evaluator.add_inplace(total, layout.load(blob))
    return total


def _decrypt(context: HEContext, ciphertext) -> np.ndarray:
    plaintext = sealapi.Plaintext()
    sealapi.Decryptor(context.seal_context, context.secret_key()).decrypt(ciphertext, plaintext)
    return np.array(sealapi.CKKSEncoder(context.seal_context).decode_double(plaintext))


# -- taking apart and putting back -------------------------------------------------------------------------------------


def test_the_layout_is_one_60_bit_prime_of_the_ring(layout):
    assert layout.n == 8192
    assert layout.q0.bit_length() == 60
    assert layout.q0 % (2 * layout.n) == 1  # an NTT-friendly prime


def test_a_seeded_ciphertext_comes_apart_and_back_together_as_the_same_ciphertext(site_context, layout):
    (blob,) = _seal_seeded_blobs(site_context, 1)
    parts = layout.split_seeded(blob)
    assert parts.c0.dtype == np.uint64 and parts.c0.size == layout.n
    assert int(parts.c0.max()) < layout.q0
    assert parts.prng in (1, 2) and len(parts.seed) == 64
    rebuilt = layout.seeded_bytes(parts.c0, parts.prng, parts.seed)
    again = layout.split_seeded(rebuilt)
    assert (again.c0.tolist(), again.prng, again.seed) == (parts.c0.tolist(), parts.prng, parts.seed)
    original, copy = _polynomials(layout, layout.load(blob)), _polynomials(layout, layout.load(rebuilt))
    assert np.array_equal(original[0], copy[0]) and np.array_equal(original[1], copy[1])


def test_a_full_ciphertext_comes_apart_and_back_together(site_context, layout):
    c0, c1 = _polynomials(layout, _seal_sum(layout, _seal_seeded_blobs(site_context, 2)))
    again = _polynomials(layout, layout.load(layout.full_bytes(c0, c1)))
    assert np.array_equal(again[0], c0) and np.array_equal(again[1], c1)


@pytest.mark.parametrize("sites", [1, 2, 5])
def test_the_rebuilt_sum_is_seal_s_own_sum_bit_for_bit(site_context, layout, sites):
    blobs = _seal_seeded_blobs(site_context, sites, seed=sites)
    parts = [layout.split_seeded(b) for b in blobs]
    c0_sum = np.zeros(layout.n, dtype=np.uint64)
    for p in parts:
        add_mod(c0_sum, p.c0, layout.q0)  # what the server does, without SEAL
    rebuilt = layout.rebuild(c0_sum, [(p.prng, p.seed) for p in parts])
    seal_c0, seal_c1 = _polynomials(layout, _seal_sum(layout, blobs))
    ours_c0, ours_c1 = _polynomials(layout, rebuilt)
    assert np.array_equal(ours_c0, seal_c0)
    assert np.array_equal(ours_c1, seal_c1)
    assert np.array_equal(layout.second_polynomial([(p.prng, p.seed) for p in parts]), seal_c1)
    assert np.array_equal(_decrypt(site_context, rebuilt), _decrypt(site_context, _seal_sum(layout, blobs)))


def test_rebuilding_needs_a_seed(layout):
    with pytest.raises(SealFormatError, match="at least one seed"):
        layout.rebuild(np.zeros(layout.n, dtype=np.uint64), [])


def test_bytes_that_are_not_a_seeded_ciphertext_of_this_federation_are_refused(site_context, layout):
    (blob,) = _seal_seeded_blobs(site_context, 1)
    seeded = layout.seeded_bytes(*vars(layout.split_seeded(blob)).values())
    with pytest.raises(SealFormatError, match="too few"):
        layout.split_seeded(seeded[:10])
    with pytest.raises(SealFormatError, match="bad magic"):
        layout.split_seeded(b"\0\0" + seeded[2:])
    with pytest.raises(SealFormatError, match="declares"):
        layout.split_seeded(seeded + b"\0")
    with pytest.raises(SealFormatError, match="takes"):
        layout.split_full(seeded)
    with pytest.raises(SealFormatError, match="64 bytes"):
        layout.seeded_bytes(np.zeros(layout.n, dtype=np.uint64), 1, bytes(10))
    other = CiphertextLayout(HEContext.generate(CKKSParams(scale_bits=50)))
    with pytest.raises(SealFormatError, match="scale 2\\^40"):
        other.split_seeded(seeded)


# -- the protocol: sites encrypt, the server adds integers, a site decrypts the sum ------------------------------------


def _sites(cipher: UpdateCipher, sites: int, count: int, seed: int = 0):
    """Each site's share and upload chunks, and the plaintext FedAvg sum of the same updates on the grid."""
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.ones(sites))
    plaintext_sum = np.zeros(count)
    uploads = []
    for share in shares:
        values = rng.normal(0, 0.1, count)
        uploads.append(cipher.encrypt(values, share))
        plaintext_sum += round_to_grid(share * values, cipher.params.grid_bits)
    return shares, uploads, plaintext_sum


def _summed(context: HEContext, uploads: list[list[bytes]]) -> ChunkSum:
    total = ChunkSum.for_context(context, len(uploads[0]))
    for chunks in uploads:
        for i, chunk in enumerate(chunks):
            total.add(i, chunk)
    return total


@pytest.mark.parametrize("sites", [1, 2, 5])
def test_the_decrypted_sum_of_k_sites_is_the_plaintext_sum_exactly(site_context, cipher, sites):
    count = cipher.params.values_per_ciphertext + 100  # a partial last chunk too
    shares, uploads, plaintext_sum = _sites(cipher, sites, count, seed=sites)
    total = _summed(site_context.without_keys(), uploads)
    decrypted = cipher.decrypt(total.chunks(), count, float(shares.sum()))
    assert np.array_equal(decrypted, plaintext_sum / float(shares.sum()))


def test_seeds_and_the_summed_second_polynomial_decrypt_identically(site_context, cipher):
    count = 2 * cipher.params.values_per_ciphertext
    shares, uploads, plaintext_sum = _sites(cipher, 3, count, seed=7)
    total = _summed(site_context.without_keys(), uploads)
    with_seeds, summed = total.chunks(), total.chunks(summed=CiphertextLayout(site_context.without_keys()))
    assert all(len(s) < len(w) for s, w in zip(with_seeds, summed))  # 3 seeds are smaller than a polynomial
    for seeds_frame, summed_frame in zip(with_seeds, summed):
        assert np.array_equal(cipher.decrypt_chunk(seeds_frame), cipher.decrypt_chunk(summed_frame))
    assert np.array_equal(cipher.decrypt(summed, count, float(shares.sum())), plaintext_sum / float(shares.sum()))


def test_taking_an_upload_back_out_restores_the_sum_bit_for_bit(site_context, cipher):
    count = cipher.params.values_per_ciphertext
    _, uploads, _ = _sites(cipher, 3, count, seed=3)
    total = _summed(site_context, uploads[:2])
    before = total.chunks()
    total.add(0, uploads[2][0])
    assert total.chunks() != before
    total.subtract(0, uploads[2][0])
    assert total.chunks() == before
    with pytest.raises(ValueError, match="never added"):
        total.subtract(0, uploads[2][0])


def test_the_sum_refuses_a_bad_chunk_and_stays_unchanged(site_context, cipher):
    (chunk,) = cipher.encrypt(np.ones(10))
    total = ChunkSum.for_context(site_context, 1)
    total.add(0, chunk)
    before = total.chunks()
    corrupt = bytearray(chunk)
    corrupt[-1] ^= 1
    for index, frame, reason in ((0, bytes(corrupt), "corrupt"), (1, chunk, "index"), (0, chunk[:-1], "size")):
        with pytest.raises(CiphertextError) as caught:
            total.add(index, frame)
        assert caught.value.reason == reason
    assert total.chunks() == before
    with pytest.raises(ValueError, match="incomplete"):
        ChunkSum.for_context(site_context, 2).chunks()


def test_a_global_chunk_lists_the_participants_seeds_in_upload_order(site_context, cipher, layout):
    uploads = [cipher.encrypt(np.full(4, float(k))) for k in range(3)]
    (frame,) = _summed(site_context, uploads).chunks()
    listed = decode_global_chunk(frame, layout.n, layout.q0).seeds
    assert [bytes([p]) + s for p, s in listed] == [chunks[0][5:70] for chunks in uploads]
