"""A site's own encryption (lightning_fhe.he.rlwe and _rlwe.c) held against SEAL, piece by piece and whole.

SEAL is the oracle throughout: its BLAKE2Xb PRNG for the seed expansion and the noise stream, its loading of seeded
ciphertexts for the uniform polynomial, its encoder for the encoding and the NTT, its decryptor for whole
ciphertexts. Nothing here compares the C code with a copy of itself.
"""

from __future__ import annotations

import doctest
import struct

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from lightning_fhe.he import CKKSParams, HEContext
from lightning_fhe.he.codec import ChunkSum, UpdateCipher
from lightning_fhe.he.fixed_point import round_to_grid
from lightning_fhe.he.seal_io import thread_buffer
from lightning_fhe.he.seeded import CiphertextLayout, _body

rlwe = pytest.importorskip("lightning_fhe.he.rlwe")
if not rlwe.AVAILABLE:
    pytest.skip("lightning_fhe.he._rlwe was not built", allow_module_level=True)
from lightning_fhe.he import _rlwe  # noqa: E402

N = 8192


@pytest.fixture(scope="module")
def layout(site_context) -> CiphertextLayout:
    return CiphertextLayout(site_context)


@pytest.fixture(scope="module")
def encryptor(layout) -> rlwe.SeededCipher:
    return rlwe.SeededCipher(layout)


@pytest.fixture(scope="module")
def seal(site_context):
    seal_context = site_context.seal_context
    return (
        sealapi.CKKSEncoder(seal_context),
        sealapi.Decryptor(seal_context, site_context.secret_key()),
        seal_context.last_parms_id(),
    )


def _seal_stream(seed: bytes, count: int) -> bytes:
    """The first ``count`` bytes of SEAL's own BLAKE2Xb PRNG for ``seed``."""
    prng = sealapi.Blake2xbPRNG(list(struct.unpack("<8Q", seed)))
    words = -(-count // 4)
    return b"".join(struct.pack("<I", prng.generate()) for _ in range(words))[:count]


def _seal_decrypt(layout, seal, parts) -> np.ndarray:
    encoder, decryptor, _ = seal
    plaintext = sealapi.Plaintext()
    decryptor.decrypt(layout.load(layout.seeded_bytes(parts.c0, parts.prng, parts.seed)), plaintext)
    return np.array(encoder.decode_complex(plaintext)).view(np.float64)


@pytest.mark.parametrize("vector", [True, False], ids=["kernel", "scalar"])
def test_uniform_polynomial_is_the_one_seal_expands_from_the_seed(layout, vector):
    rng = np.random.default_rng(0)
    for _ in range(3):
        seed = rng.bytes(64)
        ours = np.empty(N, dtype=np.uint64)
        _rlwe.uniform(ours, seed, layout.q0, vector)
        seals = layout.split_full(thread_buffer().dump(layout.rebuild(np.zeros(N, np.uint64), [(1, seed)])))[1]
        np.testing.assert_array_equal(ours, seals)


def test_uniform_redraws_values_above_the_largest_multiple_as_seal_does():
    # q a little above 2**61: one 64-bit draw in eight is refused and replaced by the stream's next 8 bytes, a path
    # the federation's 60-bit prime (refusing about one draw in 2**46) never takes. The reference is SEAL's
    # sample_poly_uniform, transcribed, over SEAL's own stream.
    q, n = (1 << 61) + 1, 1024
    seed = bytes(range(64))
    stream = _seal_stream(seed, 8 * n + 8 * 400)
    draws = list(struct.unpack(f"<{len(stream) // 8}Q", stream))
    max_multiple = (2**64 - 1) - (2**64 - 1) % q - 1
    expected, extra, redrawn = [], n, 0
    for value in draws[:n]:
        while value >= max_multiple:
            value, extra, redrawn = draws[extra], extra + 1, redrawn + 1
        expected.append(value % q)
    ours = np.empty(n, dtype=np.uint64)
    _rlwe.uniform(ours, seed, q)
    assert redrawn > 50
    assert ours.tolist() == expected


def test_ntt_evaluates_at_the_odd_powers_of_psi_in_bit_reversed_order_and_intt_undoes_it():
    q, n = 7681, 16  # 7681 = 1 + 15 * 2**9: has 32nd roots of unity
    forward, inverse = rlwe.ntt_tables(q, n)
    psi = rlwe.minimal_primitive_root(2 * n, q)
    assert pow(psi, n, q) == q - 1 and all(pow(r, n, q) != q - 1 for r in range(2, psi))
    poly = np.random.default_rng(1).integers(0, q, n).astype(np.uint64)
    transformed = poly.copy()
    _rlwe.ntt(transformed, q, forward)
    bits = n.bit_length() - 1
    for k in range(n):
        point = pow(psi, 2 * int(format(k, f"0{bits}b")[::-1], 2) + 1, q)
        assert int(transformed[k]) == sum(int(c) * pow(point, j, q) for j, c in enumerate(poly)) % q
    _rlwe.intt(transformed, q, inverse)
    np.testing.assert_array_equal(transformed, poly)


def _seal_inverse_ntt(layout, values: np.ndarray) -> np.ndarray:
    """SEAL's inverse NTT of ``values``: loaded as the first polynomial of a ciphertext (a second one of ones, as SEAL
    refuses a transparent ciphertext) and transformed by SEAL."""
    ciphertext = layout.load(layout.full_bytes(values, np.ones(N, dtype=np.uint64)))
    sealapi.Evaluator(layout.context.seal_context).transform_from_ntt_inplace(ciphertext)
    body = _body(thread_buffer().dump(ciphertext))
    return np.frombuffer(body, dtype="<u8", count=N, offset=len(body) - 16 * N).astype(np.uint64)


def test_ntt_is_seals_and_encoding_is_seals_encoder_to_the_last_unit(layout, encryptor, seal):
    encoder, _, parms_id = seal
    q, rng = layout.q0, np.random.default_rng(2)
    # an update's values, on the grid or not, and values far larger, whose coefficients reach 2**57
    for values, exact in ((rng.normal(0, 0.1, N), True), (round_to_grid(rng.uniform(-1, 1, N), 24), True),
                          (rng.normal(0, 1000.0, N), False)):
        plaintext = sealapi.Plaintext()
        encoder.encode(values.view(np.complex128).tolist(), parms_id, layout.context.params.scale, plaintext)
        seals_ntt = np.array([plaintext[i] for i in range(N)], dtype=np.uint64)
        seals = _seal_inverse_ntt(layout, seals_ntt)
        transformed = seals.copy()
        _rlwe.ntt(transformed, q, rlwe.ntt_tables(q, N)[0])
        np.testing.assert_array_equal(transformed, seals_ntt)  # the NTT: integers, so always bit for bit
        _rlwe.intt(transformed, q, rlwe.ntt_tables(q, N)[1])
        np.testing.assert_array_equal(transformed, seals)
        seals_signed = np.where(seals > q // 2, seals.astype(object) - q, seals.astype(object)).astype(np.int64)
        ours = encryptor._encoding.encode(values)
        # the encoding: two FFTs in floating point, so a coefficient may round the other way; never by more than 1
        assert np.abs(ours - seals_signed).max() <= (0 if exact else 1)


def test_ciphertext_is_seals_construction_with_cbd_noise_from_the_bootstrap_stream(layout, encryptor):
    # c0 = NTT(m + e) - a*s with the public seed the bootstrap stream's first 64 bytes and e its next 6 bytes a
    # coefficient through SEAL's centred binomial sampler: rebuilt here from SEAL's own PRNG.
    q, bootstrap = layout.q0, bytes(range(100, 164))
    values = np.random.default_rng(3).normal(0, 0.5, N)
    parts = encryptor.encrypt(values, bootstrap_seed=bootstrap)
    stream = _seal_stream(bootstrap, 64 + 6 * N)
    assert parts.seed == stream[:64] and parts.prng == rlwe.BLAKE2XB
    x = np.frombuffer(stream[64:], dtype=np.uint8).reshape(N, 6).copy()
    x[:, 2] &= 0x1F
    x[:, 5] &= 0x1F
    weights = np.unpackbits(x, axis=1).reshape(N, 6, 8).sum(axis=2, dtype=np.int64)
    noise = weights[:, :3].sum(axis=1) - weights[:, 3:].sum(axis=1)
    assert noise.min() >= -21 and noise.max() <= 21 and abs(noise.mean()) < 0.15 and 9.8 < noise.var() < 11.2
    expected = np.array([(int(m) + int(e)) % q for m, e in zip(encryptor._encoding.encode(values), noise)], np.uint64)
    _rlwe.ntt(expected, q, rlwe.ntt_tables(q, N)[0])
    a = np.empty(N, dtype=np.uint64)
    _rlwe.uniform(a, parts.seed, q)
    s = rlwe.secret_key_ntt(layout)
    c0 = [(int(m) - int(ai) * int(si)) % q for m, ai, si in zip(expected, a, s)]
    assert parts.c0.tolist() == c0


def test_seal_decrypts_our_ciphertexts_to_the_values(layout, encryptor, seal):
    rng = np.random.default_rng(4)
    limit = layout.context.params.max_abs_sum
    for values in (rng.normal(0, 0.1, N), rng.uniform(-limit, limit, N) * 0.99, np.zeros(N)):
        np.testing.assert_allclose(_seal_decrypt(layout, seal, encryptor.encrypt(values)), values, rtol=0, atol=1e-6)


def test_every_encryption_is_fresh_unless_seeded(encryptor):
    values = np.ones(N)
    first, second = encryptor.encrypt(values), encryptor.encrypt(values)
    assert first.seed != second.seed and not np.array_equal(first.c0, second.c0)
    same = [encryptor.encrypt(values, bootstrap_seed=bytes(64)) for _ in range(2)]
    assert same[0].seed == same[1].seed and np.array_equal(same[0].c0, same[1].c0)


def test_sites_encrypting_through_seal_and_through_rlwe_sum_to_the_plaintext_average(site_context):
    ours, seals = UpdateCipher(site_context), UpdateCipher(site_context, through_seal=True)
    assert (ours.encryptor, seals.encryptor) == ("rlwe", "seal")
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 0.1, 3 * N - 7), rng.normal(0, 0.1, 3 * N - 7)
    total = ChunkSum.for_context(site_context, 3)
    for i, frame in enumerate(ours.encrypt(a, weight_fraction=0.25)):
        total.add(i, frame)
    for i, frame in enumerate(seals.encrypt(b, weight_fraction=0.75)):
        total.add(i, frame)
    grid = site_context.params.grid_bits
    expected = round_to_grid(round_to_grid(a * 0.25, grid) + round_to_grid(b * 0.75, grid), grid)
    np.testing.assert_array_equal(ours.decrypt(total.chunks(), a.size), expected)


def test_second_polynomial_of_many_seeds_is_seals_rebuilt_sum(layout):
    seeds = [(1, np.random.default_rng(k).bytes(64)) for k in range(5)]
    seals = layout.split_full(thread_buffer().dump(layout.rebuild(np.zeros(N, np.uint64), seeds)))[1]
    np.testing.assert_array_equal(layout.second_polynomial(seeds), seals)


def test_decrypts_seals_ciphertexts_and_sums_as_seals_decryptor_does(layout, encryptor, seal, site_context):
    through_seal = UpdateCipher(site_context, through_seal=True)
    rng = np.random.default_rng(7)
    blobs = [through_seal.encrypt(rng.normal(0, 0.1, N))[0] for _ in range(3)]
    total = ChunkSum.for_context(site_context, 1)
    for blob in blobs:
        total.add(0, blob)
    for frame in (total.chunks()[0], total.chunks(summed=layout)[0]):
        np.testing.assert_allclose(
            UpdateCipher(site_context).decrypt_chunk(frame), through_seal.decrypt_chunk(frame), rtol=0, atol=1e-12
        )


def test_bad_arguments_are_refused_with_what_was_wrong(layout, encryptor):
    q = layout.q0
    with pytest.raises(ValueError, match="a chunk holds 8192 values"):
        encryptor.encrypt(np.zeros(100))
    with pytest.raises(ValueError, match="the seed holds 63 bytes, expected 64"):
        _rlwe.uniform(np.empty(N, np.uint64), bytes(63), q)
    with pytest.raises(ValueError, match="odd prime below 2\\*\\*62"):
        _rlwe.uniform(np.empty(N, np.uint64), bytes(64), 1 << 62)
    with pytest.raises(ValueError, match="poly must hold a power of two of 8-byte coefficients, got 96 bytes"):
        _rlwe.ntt(np.zeros(12, np.uint64), q, np.zeros((2, 12), np.uint64))
    with pytest.raises(ValueError, match="the table holds 128 bytes, expected 256"):
        _rlwe.ntt(np.zeros(16, np.uint64), q, np.zeros((2, 8), np.uint64))
    with pytest.raises(ValueError, match="coefficient 3 is not below q"):
        _rlwe.intt(np.array([0, 0, 0, q, 0, 0, 0, 0], np.uint64), q, np.zeros((2, 8), np.uint64))
    c0, c1, key = np.zeros(N, np.uint64), np.full(N, q, np.uint64), encryptor._key
    with pytest.raises(ValueError, match="coefficient 0 of the ciphertext is not below q"):
        _rlwe.decrypt(np.empty(N, np.int64), c0, c1, key, q, rlwe.ntt_tables(q, N)[1])
    with pytest.raises(ValueError, match="the seeds must be one or more of 64 bytes, got 65 bytes"):
        _rlwe.uniform_sum(np.empty(N, np.uint64), bytes(65), q)
    with pytest.raises(ValueError, match="not 1 modulo"):
        rlwe.minimal_primitive_root(1024, 7681)
    with pytest.raises(BufferError, match="not writable"):
        _rlwe.uniform(np.empty(N, np.uint64).data.toreadonly(), bytes(64), q)


def test_needs_the_secret_key(site_context):
    with pytest.raises(Exception, match="secret key"):
        rlwe.SeededCipher(CiphertextLayout(site_context.without_keys()))


def test_a_larger_ring():
    context = HEContext.generate(CKKSParams(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 40, 40, 60)))
    layout = CiphertextLayout(context)
    values = np.random.default_rng(6).normal(0, 1, 16384)
    parts = rlwe.SeededCipher(layout).encrypt(values)
    encoder = sealapi.CKKSEncoder(context.seal_context)
    plaintext = sealapi.Plaintext()
    sealapi.Decryptor(context.seal_context, context.secret_key()).decrypt(
        layout.load(layout.seeded_bytes(parts.c0, parts.prng, parts.seed)), plaintext
    )
    np.testing.assert_allclose(np.array(encoder.decode_complex(plaintext)).view(np.float64), values, atol=1e-6)


def test_the_docstring_example_runs():  # here, not in test_docstring_examples: it needs the extension
    result = doctest.testmod(rlwe, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
