"""The bytes of protocol v2's chunks: what is written reads back, and every malformed chunk is refused with its reason.

Pure numpy with a small ring (N=8) and the seed's 60-bit first prime, so hypothesis can try many frames quickly.
"""

from __future__ import annotations

import pickle
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_fhe.he.frames import (
    FORMAT,
    SEED_ENTRY_BYTES,
    CiphertextError,
    add_upload_chunk,
    decode_global_chunk,
    decode_upload_chunk,
    encode_global_chunk,
    encode_upload_chunk,
    global_chunk_bytes,
    upload_chunk_bytes,
)
from lightning_fhe.he.packing import pack60

N = 8
Q0 = 1152921504606830593  # the first prime of the seed's parameters (60 bits, 1 mod 2N)

coefficients = st.lists(st.integers(0, Q0 - 1), min_size=N, max_size=N).map(lambda v: np.array(v, dtype=np.uint64))
prngs = st.sampled_from([1, 2])
seeds = st.binary(min_size=64, max_size=64)
seed_entries = st.tuples(prngs, seeds).map(lambda e: bytes([e[0]]) + e[1])


def _reframed(body: bytes) -> bytes:
    """A frame around ``body`` with a valid checksum: what a buggy or hostile sender would send."""
    return struct.pack("<BI", FORMAT, zlib.crc32(body)) + body


def _refused(reason: str, decode, frame: bytes, match: str | None = None) -> CiphertextError:
    with pytest.raises(CiphertextError, match=match) as caught:
        decode(frame)
    assert caught.value.reason == reason
    assert reason in CiphertextError.REASONS
    return caught.value


def _upload(frame):
    return decode_upload_chunk(frame, N, Q0)


def _added(frame):
    """The server's path: the chunk added to a sum, which a refused chunk leaves as it was."""
    total = np.arange(N, dtype=np.uint64) * 1000
    try:
        return add_upload_chunk(total, frame, N, Q0)
    except CiphertextError:
        assert total.tolist() == [1000 * i for i in range(N)]
        raise


UPLOAD_READERS = pytest.mark.parametrize("read", [_upload, _added], ids=["decode", "add"])


def _global(frame, participants=None):
    return decode_global_chunk(frame, N, Q0, participants)


# -- round trips -------------------------------------------------------------------------------------------------------


@given(coefficients, prngs, seeds)
def test_an_upload_chunk_reads_back_as_written(c0, prng, seed):
    frame = encode_upload_chunk(c0, prng, seed)
    assert len(frame) == upload_chunk_bytes(N) == 1 + 4 + 1 + 64 + 15 * N // 2
    chunk = _upload(frame)
    assert chunk.c0.tolist() == c0.tolist()
    assert (chunk.prng, chunk.seed) == (prng, seed)
    assert chunk.seed_entry == bytes([prng]) + seed


@given(coefficients, coefficients, prngs, seeds, st.booleans())
def test_the_server_adds_an_upload_chunk_modulo_q0_and_keeps_its_seed_entry(total, c0, prng, seed, subtract):
    frame = encode_upload_chunk(c0, prng, seed)
    expected = [(int(t) + (-1 if subtract else 1) * int(c)) % Q0 for t, c in zip(total, c0)]
    assert add_upload_chunk(total, frame, N, Q0, subtract) == bytes([prng]) + seed
    assert total.tolist() == expected


@given(coefficients, st.lists(seed_entries, min_size=1, max_size=5))
def test_a_global_chunk_with_seeds_reads_back_as_written(c0, entries):
    frame = encode_global_chunk(c0, entries)
    assert len(frame) == global_chunk_bytes(N, len(entries), summed=False)
    for participants in (None, len(entries)):
        chunk = _global(frame, participants)
        assert chunk.c0.tolist() == c0.tolist()
        assert chunk.c1 is None
        assert [bytes([p]) + s for p, s in chunk.seeds] == entries


@given(coefficients, coefficients, st.integers(1, 300))
def test_a_global_chunk_with_the_summed_second_polynomial_reads_back_as_written(c0, c1, participants):
    frame = encode_global_chunk(c0, c1=c1)
    assert len(frame) == global_chunk_bytes(N, participants, summed=True)  # the same size whatever the count
    chunk = _global(frame, participants)
    assert (chunk.c0.tolist(), chunk.c1.tolist(), chunk.seeds) == (c0.tolist(), c1.tolist(), ())


def test_a_global_chunk_carries_seeds_or_the_second_polynomial_never_both():
    c = np.zeros(N, dtype=np.uint64)
    with pytest.raises(ValueError, match="not both"):
        encode_global_chunk(c, [bytes(SEED_ENTRY_BYTES)], c1=c)
    with pytest.raises(ValueError, match="65 bytes"):
        encode_global_chunk(c, [bytes(64)])
    with pytest.raises(ValueError, match="64 bytes"):
        encode_upload_chunk(c, 1, bytes(63))


# -- refusals: upload chunks -------------------------------------------------------------------------------------------


@UPLOAD_READERS
@given(coefficients, prngs, seeds, st.integers(-upload_chunk_bytes(N), 40).filter(bool))
def test_an_upload_chunk_of_the_wrong_size_is_refused(read, c0, prng, seed, change):
    frame = encode_upload_chunk(c0, prng, seed)
    frame = frame[:change] if change < 0 else frame + bytes(change)
    _refused("size", read, frame, match=f"chunk of {len(frame)} bytes")


@given(coefficients, prngs, seeds, st.integers(0, 255).filter(lambda b: b != FORMAT))
def test_a_chunk_in_another_format_is_refused(c0, prng, seed, version):
    upload = bytearray(encode_upload_chunk(c0, prng, seed))
    upload[0] = version
    _refused("format", _upload, bytes(upload), match=f"chunk format {version}")
    _refused("format", _added, bytes(upload), match=f"chunk format {version}")
    download = bytearray(encode_global_chunk(c0, [bytes([prng]) + seed]))
    download[0] = version
    _refused("format", _global, bytes(download), match=f"chunk format {version}")


@UPLOAD_READERS
@given(coefficients, prngs, seeds, st.data())
def test_any_flipped_bit_after_the_format_byte_is_caught(read, c0, prng, seed, data):
    frame = bytearray(encode_upload_chunk(c0, prng, seed))
    position = data.draw(st.integers(1, len(frame) - 1))  # the checksum itself included
    frame[position] ^= 1 << data.draw(st.integers(0, 7))
    _refused("corrupt", read, bytes(frame), match="checksum")


@UPLOAD_READERS
@given(coefficients, seeds, st.integers(0, 255).filter(lambda p: p not in (1, 2)))
def test_an_unknown_prng_type_is_refused(read, c0, seed, prng):
    frame = _reframed(bytes([prng]) + seed + pack60(c0))
    _refused("format", read, frame, match=f"PRNG type {prng}")


@UPLOAD_READERS
@given(coefficients, prngs, seeds, st.integers(0, N - 1), st.integers(Q0, 2**60 - 1))
def test_a_coefficient_not_below_q0_is_refused_by_its_position(read, c0, prng, seed, i, value):
    c0[i] = value
    frame = _reframed(bytes([prng]) + seed + pack60(c0))
    _refused("range", read, frame, match=f"coefficient {i} is {value}, not below the first prime")


# -- refusals: global chunks -------------------------------------------------------------------------------------------


@given(coefficients, st.lists(seed_entries, min_size=1, max_size=4), st.data())
def test_a_global_chunk_is_refused_when_corrupt_cut_or_for_another_number_of_sites(c0, entries, data):
    frame = encode_global_chunk(c0, entries)
    flipped = bytearray(frame)
    flipped[data.draw(st.integers(1, len(frame) - 1))] ^= 0x80
    _refused("corrupt", _global, bytes(flipped))
    _refused("corrupt", _global, frame[:-1])  # the size follows from the header, so the checksum sees a cut first
    _refused("size", _global, _reframed(frame[5:-1]), match="bytes with")
    _refused("size", _global, _reframed(frame[5:] + bytes(1)), match="bytes with")
    _refused("size", _global, frame[:7], match="too short")
    _refused("size", lambda f: _global(f, len(entries) + 1), frame, match=f"with {len(entries)} seeds")


def test_a_global_chunk_with_a_bad_seed_an_unknown_kind_or_a_coefficient_not_below_q0_is_refused():
    c0 = np.arange(N, dtype=np.uint64)
    good = bytes([2]) + bytes(64)
    bad_seed = struct.pack("<BH", 0, 2) + good + bytes([3]) + bytes(64) + pack60(c0)
    _refused("format", _global, _reframed(bad_seed), match="seed 1 names PRNG type 3")
    unknown_kind = struct.pack("<BH", 7, 1) + good + pack60(c0)
    _refused("format", _global, _reframed(unknown_kind), match="kind 7")
    over = c0.copy()
    over[3] = Q0
    _refused("range", _global, _reframed(struct.pack("<BH", 0, 1) + good + pack60(over)), match="coefficient 3")
    # When summed, the first polynomial travels last: a bad coefficient in either one is refused.
    _refused("range", _global, _reframed(struct.pack("<BH", 1, 0) + pack60(over) + pack60(c0)), match="coefficient 3")
    _refused("range", _global, _reframed(struct.pack("<BH", 1, 0) + pack60(c0) + pack60(over)), match="coefficient 3")


def test_the_error_keeps_its_reason_across_processes():
    """A worker process raises it; the pool re-raises it in the site's process, reason included."""
    err = pickle.loads(pickle.dumps(CiphertextError("range", "coefficient 3 is too large")))
    assert (type(err), err.reason, str(err)) == (CiphertextError, "range", "coefficient 3 is too large")
