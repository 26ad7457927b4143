"""A site takes its own update out of the sum before it decrypts, and adds its values back: one seed fewer to expand,
and the same bits as decrypting from every seed, whatever the sum holds (masked uploads, a site left out of the
round, an upload kept only in part, the summed download form, a damaged record)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_fhe.he.codec import ChunkSum, UpdateCipher, num_chunks
from lightning_fhe.he.own_share import OwnShare
from lightning_fhe.he.pool import CipherPool
from lightning_fhe.he.seeded import CiphertextLayout
from lightning_fhe.masking import PairwiseMasks

CHUNKS = 3


@pytest.fixture(scope="module")
def cipher(site_context) -> UpdateCipher:
    return UpdateCipher(site_context)


def _updates(sites: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=CHUNKS * n - 11) for _ in range(sites)]


def _sum(cipher, updates, own: OwnShare | None, frames_of=None) -> tuple[ChunkSum, list[list[bytes]]]:
    """Every site encrypts its share of ``updates``; site 0 keeps its own share in ``own``."""
    total, sent = ChunkSum.for_context(cipher.context, CHUNKS), []
    for k, values in enumerate(updates):
        frames = cipher.encrypt(values, 1 / len(updates), keep=own if k == 0 else None)
        sent.append(frames)
        for i, frame in enumerate(frames_of(k, frames) if frames_of else frames):
            total.add(i, frame)
    return total, sent


def _own(cipher) -> OwnShare:
    return OwnShare(cipher.params.values_per_ciphertext, CHUNKS)


@pytest.mark.parametrize("sites", [1, 2, 3])
def test_decrypting_without_the_own_update_gives_the_same_bits_as_from_every_seed(cipher, sites):
    updates = _updates(sites, cipher.params.values_per_ciphertext)
    own = _own(cipher)
    total, _ = _sum(cipher, updates, own)
    count = updates[0].size
    with_own = cipher.decrypt(total.chunks(), count, 1.0, own=own)
    assert np.array_equal(with_own, cipher.decrypt(total.chunks(), count, 1.0))
    assert np.max(np.abs(with_own - sum(updates) / sites)) < 1e-6
    own.close()


def test_the_own_update_is_taken_out_so_one_seed_fewer_is_expanded(cipher, monkeypatch):
    updates = _updates(3, cipher.params.values_per_ciphertext)
    own = _own(cipher)
    total, _ = _sum(cipher, updates, own)
    expanded = []
    rebuild = CiphertextLayout.rebuild

    def counted(self, c0, seeds):
        expanded.append(len(seeds))
        return rebuild(self, c0, seeds)

    monkeypatch.setattr(CiphertextLayout, "rebuild", counted)
    cipher.decrypt(total.chunks(), updates[0].size, 1.0, own=own)
    assert expanded == [2] * CHUNKS
    expanded.clear()
    cipher.decrypt(total.chunks(), updates[0].size, 1.0)
    assert expanded == [3] * CHUNKS
    own.close()


def test_a_site_alone_in_the_sum_needs_no_decryption_at_all(cipher, monkeypatch):
    updates = _updates(1, cipher.params.values_per_ciphertext)
    own = _own(cipher)
    total, _ = _sum(cipher, updates, own)
    monkeypatch.setattr(cipher, "_decryptor", None)  # any decryption would fail
    average = cipher.decrypt(total.chunks(), updates[0].size, 1.0, own=own)
    assert np.max(np.abs(average - updates[0])) < 1e-6
    own.close()


def test_masked_uploads_sum_to_the_same_bits_with_the_unmasked_own_chunk_taken_out(cipher):
    n, q0 = cipher.params.values_per_ciphertext, cipher.layout.q0
    names = ["site-a", "site-b", "site-c"]
    pair = {(a, b): bytes([i]) * 32 for i, (a, b) in enumerate([(x, y) for x in names for y in names if x < y])}
    masks = {
        me: PairwiseMasks(me, {p: pair[tuple(sorted((me, p)))] for p in names if p != me}, q0, n) for me in names
    }
    updates = _updates(3, n, seed=1)
    own = _own(cipher)

    def masked(k: int, frames: list[bytes]) -> list[bytes]:
        return [masks[names[k]].apply(frame, 1, 0, names, i) for i, frame in enumerate(frames)]

    total, _ = _sum(cipher, updates, own, masked)
    count = updates[0].size
    with_own = cipher.decrypt(total.chunks(), count, 1.0, own=own)
    assert np.array_equal(with_own, cipher.decrypt(total.chunks(), count, 1.0))
    assert np.max(np.abs(with_own - sum(updates) / 3)) < 1e-6
    own.close()


def test_an_update_that_is_not_in_the_sum_changes_nothing(cipher):
    n = cipher.params.values_per_ciphertext
    updates = _updates(2, n)
    total, _ = _sum(cipher, updates, None)
    missed = _own(cipher)
    cipher.encrypt(_updates(1, n, seed=7)[0], 0.5, keep=missed)  # sent too late: the round closed without it
    count = updates[0].size
    assert np.array_equal(cipher.decrypt(total.chunks(), count, 1.0, own=missed), cipher.decrypt(total.chunks(), count))
    missed.close()


def test_chunks_an_upload_never_kept_and_damaged_records_decrypt_from_every_seed(cipher):
    updates = _updates(2, cipher.params.values_per_ciphertext)
    own = _own(cipher)
    total, _ = _sum(cipher, updates, own)
    frame_bytes, first = own.frame_bytes, own.record(0)
    partial = _own(cipher)  # an upload that stopped after its first chunk
    list(partial.keep_values([np.frombuffer(first[frame_bytes:], dtype=np.float64)]))
    list(partial.keep_frames([first[:frame_bytes]]))
    assert partial.record(0) == first and partial.record(1) is None
    plain = cipher.decrypt(total.chunks(), updates[0].size)
    assert np.array_equal(cipher.decrypt(total.chunks(), updates[0].size, own=partial), plain)
    damaged = bytearray(first)
    damaged[frame_bytes // 2] ^= 0xFF  # its checksum no longer matches
    chunk = total.chunks()[0]
    assert np.array_equal(cipher.decrypt_chunk(chunk, own=bytes(damaged)), cipher.decrypt_chunk(chunk))
    partial.close()
    own.close()


def test_the_summed_download_form_ignores_the_own_share(cipher, server_context):
    updates = _updates(2, cipher.params.values_per_ciphertext)
    own = _own(cipher)
    total, _ = _sum(cipher, updates, own)
    summed = total.chunks(summed=CiphertextLayout(server_context))
    count = updates[0].size
    assert np.array_equal(cipher.decrypt(summed, count, own=own), cipher.decrypt(total.chunks(), count))
    own.close()


def test_a_pool_of_two_workers_decrypts_with_the_own_share_as_one_process_does(site_context):
    n = site_context.params.values_per_ciphertext
    updates = [np.random.default_rng(k).normal(size=9 * n - 5) for k in range(2)]
    chunks = num_chunks(updates[0].size, site_context.params)
    with CipherPool(site_context, workers=2, batch=2, window=2) as pool:
        own = OwnShare(n, chunks)
        total = ChunkSum.for_context(site_context, chunks)
        for k, values in enumerate(updates):
            for i, frame in enumerate(pool.iter_encrypt(values, 0.5, keep=own if k == 0 else None)):
                total.add(i, frame)
        assert own.record(chunks - 1) is not None
        with_own = pool.decrypt(total.chunks(), updates[0].size, 1.0, own=own)
        assert np.array_equal(with_own, pool.decrypt(total.chunks(), updates[0].size, 1.0))
        assert np.max(np.abs(with_own - (updates[0] + updates[1]) / 2)) < 1e-6
        own.close()


def test_an_own_share_refuses_more_chunks_than_the_update_has_and_frames_of_another_ring(cipher):
    own = OwnShare(cipher.params.values_per_ciphertext, chunks=1)
    with pytest.raises(ValueError, match="no chunk 1"):
        list(own.keep_values([np.zeros(2 * cipher.params.values_per_ciphertext)]))
    with pytest.raises(ValueError, match="takes"):
        list(own.keep_frames([b"short"]))
    own.close()
