"""Streaming accumulation with real CKKS ciphertexts: sums as chunks arrive, exact undo of broken streams."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lightning_fhe.he.codec import UpdateCipher, num_chunks
from lightning_fhe.server.accumulator import RoundAccumulator
from lightning_fhe.server.errors import Reason, Refusal, Status

COUNT = 20_000  # 3 chunks of 8192 values
PLAIN = 5


@pytest.fixture(scope="module")
def cipher(site_context) -> UpdateCipher:
    return UpdateCipher(site_context)


@pytest.fixture(scope="module")
def updates(cipher):
    rng = np.random.default_rng(0)
    shares = [0.5, 0.3, 0.2]
    values = [rng.normal(0, 0.05, COUNT) for _ in shares]
    plain = [rng.normal(0, 1, PLAIN) for _ in shares]
    chunks = [cipher.encrypt(v, weight_fraction=s) for v, s in zip(values, shares)]
    return shares, values, plain, chunks


def new_accumulator(server_context) -> RoundAccumulator:
    return RoundAccumulator(server_context, num_chunks(COUNT, server_context.params), PLAIN)


def send(acc, site, share, chunks, plain, stop_after=None):
    upload = acc.begin(site, share)
    upload.add_plaintext(0, plain.astype("<f8").tobytes())
    for i, blob in enumerate(chunks):
        if stop_after is not None and i == stop_after:
            return upload
        upload.add_chunk(i, blob)
    return upload


def test_the_sum_decrypts_to_the_weighted_average(server_context, cipher, updates):
    shares, values, plain, chunks = updates
    acc = new_accumulator(server_context)
    for site, share, c, p in zip("abc", shares, chunks, plain):
        send(acc, site, share, c, p).commit()
    aggregate = acc.result(4)
    assert aggregate.participants == ("a", "b", "c") and aggregate.total_share == pytest.approx(1.0)
    expected = sum(s * v for s, v in zip(shares, values))
    decrypted = cipher.decrypt(aggregate.encrypted_chunks, COUNT, aggregate.total_share)
    assert np.abs(decrypted - expected).max() < 1e-6
    np.testing.assert_allclose(aggregate.plaintext, sum(s * p for s, p in zip(shares, plain)), rtol=0, atol=1e-7)


def test_values_sent_in_plaintext_and_encrypted_average_to_the_same_bits(server_context, cipher, updates):
    """What makes an encrypted federation train exactly like the same federation in plaintext."""
    shares, values, _, chunks = updates
    acc = RoundAccumulator(server_context, len(chunks[0]), COUNT)
    for site, share, v, c in zip("cab", shares[::-1], values[::-1], chunks[::-1]):
        send(acc, site, share, c, v).commit()
    aggregate = acc.result(2)
    decrypted = cipher.decrypt(aggregate.encrypted_chunks, COUNT, aggregate.total_share)
    assert np.array_equal(decrypted, aggregate.plaintext)


def test_a_broken_stream_is_taken_back_out_bit_for_bit(server_context, updates):
    shares, _, plain, chunks = updates
    acc = new_accumulator(server_context)
    send(acc, "a", shares[0], chunks[0], plain[0]).commit()
    before = acc.digest()
    broken = send(acc, "b", shares[1], chunks[1], plain[1], stop_after=2)
    assert acc.digest() != before  # two chunks are in the sum now
    broken.abort()
    assert acc.digest() == before
    send(acc, "b", shares[1], chunks[1], plain[1]).commit()  # and the site may submit again


def test_a_broken_first_stream_leaves_a_fresh_sum(server_context, updates):
    shares, _, plain, chunks = updates
    acc = new_accumulator(server_context)
    fresh = acc.digest()
    send(acc, "a", shares[0], chunks[0], plain[0], stop_after=1).abort()
    assert acc.digest() == fresh


def test_two_interleaved_streams_one_broken(server_context, cipher, updates):
    shares, values, plain, chunks = updates
    acc = new_accumulator(server_context)
    a, b = acc.begin("a", shares[0]), acc.begin("b", shares[1])
    a.add_plaintext(0, plain[0].tobytes())
    b.add_plaintext(0, plain[1].tobytes())
    for i in range(3):
        a.add_chunk(i, chunks[0][i])
        if i < 2:
            b.add_chunk(i, chunks[1][i])
    b.abort()
    a.commit()
    aggregate = acc.result(1)
    assert aggregate.participants == ("a",)
    decrypted = cipher.decrypt(aggregate.encrypted_chunks, COUNT, aggregate.total_share)
    assert np.abs(decrypted - values[0]).max() < 1e-6


def refused(call, *args) -> Refusal:
    with pytest.raises(Refusal) as info:
        call(*args)
    assert info.value.status is Status.INVALID_ARGUMENT
    return info.value


def test_chunk_errors_name_the_chunk_and_change_nothing(server_context, updates):
    shares, _, plain, chunks = updates
    acc = new_accumulator(server_context)
    send(acc, "a", shares[0], chunks[0], plain[0]).commit()
    before = acc.digest()
    upload = send(acc, "b", shares[1], chunks[1], plain[1], stop_after=1)
    corrupt = bytearray(chunks[1][1])
    corrupt[100] ^= 0xFF
    err = refused(upload.add_chunk, 1, bytes(corrupt))
    assert err.reason is Reason.BAD_CHUNK and str(err).startswith("chunk 1: ") and "checksum" in str(err)
    err = refused(upload.add_chunk, 2, chunks[1][2])
    assert err.reason is Reason.CHUNK_ORDER and "chunk 2 arrived where chunk 1 was expected" in str(err)
    err = refused(upload.add_chunk, 3, chunks[1][2])
    assert err.reason is Reason.CHUNK_COUNT and "beyond the 3 chunks" in str(err)
    err = refused(upload.commit)
    assert err.reason is Reason.INCOMPLETE and "1 of 3 chunks" in str(err)
    upload.abort()
    assert acc.digest() == before


def test_plaintext_errors(server_context, updates):
    acc = new_accumulator(server_context)
    upload = acc.begin("a", 0.5)
    assert "multiple of 8" in str(refused(upload.add_plaintext, 0, b"1234567"))
    assert "starts at value 2" in str(refused(upload.add_plaintext, 2, np.zeros(1).tobytes()))
    assert "beyond the 5 plaintext values" in str(refused(upload.add_plaintext, 0, np.zeros(6).tobytes()))
    err = refused(upload.add_plaintext, 0, np.array([1.0, np.nan]).tobytes())
    assert "plaintext value 1 (value 1) is nan" in str(err)
    err = refused(upload.add_chunk, 0, updates[3][0][0])
    assert err.reason is Reason.CHUNK_ORDER and "plaintext values come first" in str(err)


def test_plaintext_only_rounds_need_no_ciphertext(server_context):
    acc = RoundAccumulator(server_context, 0, 3)
    upload = acc.begin("a", 1.0)
    upload.add_plaintext(0, np.array([1.0, 2.0]).tobytes())
    upload.add_plaintext(2, np.array([3.0]).tobytes())
    upload.commit()
    aggregate = acc.result(0)
    assert list(aggregate.encrypted_chunks) == [] and np.asarray(aggregate.plaintext).tolist() == [1.0, 2.0, 3.0]


# -- plaintext values and shares (defects 8 and 10) ------------------------------------------------------------------


def test_plaintext_values_beyond_the_exact_range_are_refused(server_context):
    accumulator = RoundAccumulator(server_context, 0, 3)
    upload = accumulator.begin("a", 0.5)
    before = accumulator.digest()
    with pytest.raises(Refusal) as info:
        upload.add_plaintext(0, np.array([1.0, -1e308, 2.0]).tobytes())
    assert info.value.reason is Reason.BAD_PLAINTEXT and "plaintext value 1 (value 1) is -1e+308" in info.value.message
    with pytest.raises(Refusal, match=r"\|x\| < 2\^29"):
        upload.add_plaintext(0, np.array([0.0, 2.0**29, 0.0]).tobytes())
    assert accumulator.digest() == before
    upload.add_plaintext(0, np.array([1e8, -(2.0**29 - 1), 3.0]).tobytes())
    upload.commit()
    assert np.isfinite(accumulator.result(1).plaintext).all()


def test_the_initial_model_must_fit_in_float32(server_context):
    accumulator = RoundAccumulator(server_context, 0, 2, on_grid=False)
    upload = accumulator.begin("a", 1.0)
    with pytest.raises(Refusal, match=r"plaintext value 0 \(value 0\) is 1e\+39.*float32 max"):
        upload.add_plaintext(0, np.array([1e39, 0.0]).tobytes())
    upload.add_plaintext(0, np.array([3e38, 1e9]).tobytes())  # off the grid, but a float32 model holds it
    upload.commit()


def test_total_share_does_not_depend_on_arrival_order(server_context):
    weights = [1.0, 2.0, 5.0, 3.0, 7.0]
    total = math.fsum(weights)
    shares = [w / total for w in weights]
    seen = set()
    for order in itertools.permutations(range(len(shares))):
        accumulator = RoundAccumulator(server_context, 0, 1)
        for i in order:
            upload = accumulator.begin(f"s{i}", shares[i])
            upload.add_plaintext(0, np.array([1.0]).tobytes())
            upload.commit()
        aggregate = accumulator.result(1)
        seen.add((aggregate.total_share, np.asarray(aggregate.plaintext).tobytes()))
    # One result whatever the order; the shares' exact sum, rounded once (a running sum gives 1 - 2^-53 for some).
    assert len(seen) == 1 and next(iter(seen))[0] == math.fsum(shares) == 1.0


def test_past_seeds_up_to_the_server_sends_the_summed_second_polynomial(server_context, cipher, updates):
    """The two forms of a global chunk decrypt to the same bits; the summed one no longer grows with the sites."""
    shares, values, plain, chunks = updates
    results = {}
    for seeds_up_to in (3, 2):
        acc = RoundAccumulator(server_context, len(chunks[0]), PLAIN, seeds_up_to=seeds_up_to)
        for site, share, c, p in zip("abc", shares, chunks, plain):
            send(acc, site, share, c, p).commit()
        aggregate = acc.result(1)
        frames = list(aggregate.encrypted_chunks)
        results[seeds_up_to] = cipher.decrypt(frames, COUNT, aggregate.total_share)
        n = server_context.params.poly_modulus_degree
        assert len(frames[0]) == (8 + 3 * 65 + n * 15 // 2 if seeds_up_to == 3 else 8 + n * 15)
        acc.close()
    assert np.array_equal(results[3], results[2])
