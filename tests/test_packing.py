"""The numbers of protocol v2: 60-bit packing of coefficients, and their addition and subtraction modulo q0.

Checked against Python's own integers, which cannot overflow: numpy, and the server's compiled addition of packed
coefficients (lightning_fhe/he/_packed.c) beside numpy's version of it.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_fhe.he import modular
from lightning_fhe.he.modular import add_mod, numpy_add_packed_mod, sub_mod
from lightning_fhe.he.packing import PackingError, numpy_pack60_into, pack60, pack60_into, packed_size, unpack60

BELOW_2_60 = st.integers(0, 2**60 - 1)
# A prime of 60 bits, as the first prime of the seed's parameters is: sums of two coefficients reach 2**61.
Q0_60_BITS = 2**60 - 93


def _even_lists(elements, max_pairs=40):
    return st.lists(st.tuples(elements, elements), max_size=max_pairs).map(lambda pairs: [v for p in pairs for v in p])


def _u64(values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


# -- packing -----------------------------------------------------------------------------------------------------------


@given(_even_lists(BELOW_2_60))
def test_unpacking_gives_back_what_was_packed(values):
    packed = pack60(_u64(values))
    assert len(packed) == packed_size(len(values)) == 15 * len(values) // 2
    unpacked = unpack60(packed, len(values))
    assert unpacked.dtype == np.uint64
    assert unpacked.tolist() == values


def test_packing_the_extremes_keeps_every_bit():
    values = [0, 2**60 - 1, 2**60 - 1, 0, 1 << 59, 1, 0x0123456789ABCDE, 0xFEDCBA987654321]
    assert unpack60(pack60(_u64(values)), len(values)).tolist() == values


def test_two_coefficients_are_one_little_endian_120_bit_integer():
    a, b = 0x0ABCDEF012345678, 0x0876543210FEDCBA
    assert pack60(_u64([a, b])) == (a | b << 60).to_bytes(15, "little")


@given(_even_lists(BELOW_2_60, max_pairs=8), st.data())
def test_a_coefficient_of_60_bits_or_more_is_refused_by_its_position(values, data):
    values = values or [0, 0]
    i = data.draw(st.integers(0, len(values) - 1))
    values[i] = data.draw(st.integers(2**60, 2**64 - 1))
    with pytest.raises(PackingError, match=f"coefficient {i} is {values[i]}, not below 2\\*\\*60"):
        pack60(_u64(values))


def test_odd_counts_other_dtypes_and_wrong_lengths_are_refused():
    with pytest.raises(PackingError, match="even number"):
        pack60(_u64([1, 2, 3]))
    with pytest.raises(PackingError, match="even number"):
        packed_size(-2)
    with pytest.raises(PackingError, match="uint64"):
        pack60(np.array([1, 2], dtype=np.int64))
    packed = pack60(_u64([1, 2, 3, 4]))
    for data in (packed[:-1], packed + b"\0", b""):
        with pytest.raises(PackingError, match="4 packed coefficients take 30 bytes"):
            unpack60(data, 4)


def test_nothing_packs_to_nothing():
    assert pack60(_u64([])) == b""
    assert unpack60(b"", 0).size == 0


@given(_even_lists(st.integers(0, 2**64 - 1)))
def test_the_compiled_packing_writes_numpy_s_bytes_and_refuses_the_same_coefficient(values):
    if not modular.COMPILED:
        pytest.skip("the package was built without a C compiler: numpy packs")
    from lightning_fhe.he import _packed

    by_numpy, compiled = bytearray(packed_size(len(values))), bytearray(packed_size(len(values)))
    bad = numpy_pack60_into(by_numpy, _u64(values))
    assert _packed.pack60(compiled, _u64(values)) == bad
    if bad < 0:
        assert compiled == by_numpy
    else:
        assert values[bad] >= 2**60 and all(v < 2**60 for v in values[:bad])


def test_packing_into_a_buffer_of_another_size_is_refused():
    with pytest.raises(PackingError, match="4 coefficients pack into 30 bytes, the buffer holds 29"):
        pack60_into(bytearray(29), _u64([1, 2, 3, 4]))


# -- arithmetic modulo q0 ----------------------------------------------------------------------------------------------


@st.composite
def _operands(draw, max_q=2**63 - 1):
    """A modulus and two arrays of residues below it, sometimes at the 60-bit prime's edge where sums pass 2**60."""
    q = draw(st.one_of(st.just(Q0_60_BITS), st.integers(2, max_q)))
    residues = st.one_of(st.integers(0, q - 1), st.integers(max(0, q - 3), q - 1))
    size = draw(st.integers(0, 32))
    a = draw(st.lists(residues, min_size=size, max_size=size))
    b = draw(st.lists(residues, min_size=size, max_size=size))
    return q, a, b


@given(_operands())
def test_add_mod_is_python_integer_addition_mod_q(operands):
    q, a, b = operands
    total = _u64(a)
    assert add_mod(total, _u64(b), q) is total
    assert total.tolist() == [(x + y) % q for x, y in zip(a, b)]


@given(_operands())
def test_sub_mod_is_python_integer_subtraction_mod_q(operands):
    q, a, b = operands
    total = _u64(a)
    assert sub_mod(total, _u64(b), q) is total
    assert total.tolist() == [(x - y) % q for x, y in zip(a, b)]


@given(_operands())
def test_subtracting_what_was_added_restores_the_sum_bit_for_bit(operands):
    q, a, b = operands
    total = _u64(a)
    sub_mod(add_mod(total, _u64(b), q), _u64(b), q)
    assert total.tolist() == a
    add_mod(sub_mod(total, _u64(b), q), _u64(b), q)
    assert total.tolist() == a


def test_many_60_bit_terms_sum_as_python_integers_do():
    rng = np.random.default_rng(0)
    terms = [rng.integers(0, Q0_60_BITS, size=1000, dtype=np.uint64) for _ in range(50)]
    total = np.zeros(1000, dtype=np.uint64)
    for t in terms:
        add_mod(total, t, Q0_60_BITS)
    expected = [sum(int(t[i]) for t in terms) % Q0_60_BITS for i in range(1000)]
    assert total.tolist() == expected
    for t in reversed(terms):
        sub_mod(total, t, Q0_60_BITS)
    assert not total.any()


# -- the server's addition of packed coefficients ---------------------------------------------------------------------


def _compiled(total, packed, q, subtract=False, vector=True):
    if not modular.COMPILED:
        pytest.skip("the package was built without a C compiler: the server adds with numpy")
    from lightning_fhe.he import _packed

    bad = _packed.add_packed(total, packed, q, subtract, vector)
    return None if bad < 0 else bad


def _compiled_scalar(total, packed, q, subtract=False):
    return _compiled(total, packed, q, subtract, vector=False)


# The compiled addition runs its AVX-512 loop where the CPU has one (_packed.KERNEL) and its scalar loop for the last
# pairs of every chunk; vector=False runs the scalar loop alone.
ADDERS = pytest.mark.parametrize(
    "add_packed",
    [numpy_add_packed_mod, _compiled, _compiled_scalar],
    ids=["numpy", "compiled", "compiled-scalar"],
)


@ADDERS
@given(_operands(max_q=2**60), st.booleans())
def test_adding_packed_coefficients_is_python_integer_arithmetic_mod_q(add_packed, operands, subtract):
    q, a, b = operands
    b = b[: len(b) // 2 * 2]
    a = a[: len(b)]
    total = _u64(a)
    assert add_packed(total, pack60(_u64(b)), q, subtract) is None
    sign = -1 if subtract else 1
    assert total.tolist() == [(x + sign * y) % q for x, y in zip(a, b)]


@ADDERS
@given(_operands(max_q=2**60 - 1), st.data())
def test_a_packed_coefficient_not_below_q_is_named_and_changes_nothing(add_packed, operands, data):
    q, a, b = operands
    if len(b) < 2:
        b, a = [0, 0], [0, 0]
    b, a = b[: len(b) // 2 * 2], a[: len(b) // 2 * 2]
    bad = data.draw(st.integers(0, len(b) - 1))
    b[bad] = data.draw(st.integers(q, 2**60 - 1))
    for subtract in (False, True):
        total = _u64(a)
        assert add_packed(total, pack60(_u64(b)), q, subtract) == bad
        assert total.tolist() == a  # the pairs before it, added in passing, were taken back out


@ADDERS
def test_a_sum_and_its_packed_chunk_of_the_wrong_sizes_are_refused(add_packed):
    with pytest.raises((ValueError, PackingError)):
        add_packed(np.zeros(4, dtype=np.uint64), pack60(np.zeros(2, dtype=np.uint64)), Q0_60_BITS)


def test_the_compiled_addition_sums_many_chunks_as_numpy_does():
    rng = np.random.default_rng(1)
    chunks = [pack60(rng.integers(0, Q0_60_BITS, size=8192, dtype=np.uint64)) for _ in range(20)]
    by_numpy, compiled, scalar = (np.zeros(8192, dtype=np.uint64) for _ in range(3))
    for chunk in chunks:
        numpy_add_packed_mod(by_numpy, chunk, Q0_60_BITS)
        _compiled(compiled, chunk, Q0_60_BITS)
        _compiled_scalar(scalar, chunk, Q0_60_BITS)
    assert np.array_equal(by_numpy, compiled)
    assert np.array_equal(by_numpy, scalar)


# -- the checksum in the same pass ------------------------------------------------------------------------------------


def _compiled_checked(total, body, packed_at, crc, q, subtract=False, vector=True):
    if not modular.COMPILED:
        pytest.skip("the package was built without a C compiler: the server adds with numpy")
    from lightning_fhe.he import _packed

    bad = _packed.add_checked(total, body, packed_at, crc, q, subtract, vector)
    return None if bad == -1 else bad


def _compiled_checked_scalar(total, body, packed_at, crc, q, subtract=False):
    return _compiled_checked(total, body, packed_at, crc, q, subtract, vector=False)


# The one pass (where the CPU has AVX-512 and PCLMULQDQ), the compiled checksum a byte at a time before the scalar
# addition, and ISA-L's checksum before the addition (modular.checksum_then_add_mod, what a CPU without them runs).
CHECKED_ADDERS = pytest.mark.parametrize(
    "add_checked",
    [_compiled_checked, _compiled_checked_scalar, modular.checksum_then_add_mod],
    ids=["compiled", "compiled-scalar", "checksum-first"],
)


def _bodies(max_pairs=70):
    """A head of any length (an upload chunk's is its 65-byte seed entry) and the coefficients packed after it, at
    least 64 bytes in all; long enough for many 64-byte folds and a tail."""
    values = _even_lists(st.integers(0, Q0_60_BITS - 1), max_pairs)
    return st.tuples(st.binary(max_size=130), values).filter(lambda hv: len(hv[0]) + 15 * len(hv[1]) // 2 >= 64)


@CHECKED_ADDERS
@given(_bodies(), st.booleans(), st.data())
def test_a_checked_addition_adds_when_the_checksum_matches_and_changes_nothing_otherwise(
    add_checked, head_values, subtract, data
):
    head, values = head_values
    body = head + pack60(_u64(values))
    crc = zlib.crc32(body)
    start = data.draw(st.lists(st.integers(0, Q0_60_BITS - 1), min_size=len(values), max_size=len(values)))
    total = _u64(start)
    assert add_checked(total, body, len(head), crc, Q0_60_BITS, subtract) is None
    sign = -1 if subtract else 1
    assert total.tolist() == [(x + sign * y) % Q0_60_BITS for x, y in zip(start, values)]

    total = _u64(start)
    flipped = bytearray(body)
    flipped[data.draw(st.integers(0, len(body) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    assert add_checked(total, bytes(flipped), len(head), crc, Q0_60_BITS, subtract) == modular.CORRUPT
    assert add_checked(total, body, len(head), crc ^ 1, Q0_60_BITS, subtract) == modular.CORRUPT
    assert total.tolist() == start


@CHECKED_ADDERS
@given(_bodies(), st.data())
def test_a_checked_addition_names_a_coefficient_not_below_q_unless_the_checksum_fails_first(
    add_checked, head_values, data
):
    head, values = head_values
    if not values:
        values = [0, 0]
    bad = data.draw(st.integers(0, len(values) - 1))
    values[bad] = data.draw(st.integers(Q0_60_BITS, 2**60 - 1))
    body = head + pack60(_u64(values))
    total = np.zeros(len(values), dtype=np.uint64)
    assert add_checked(total, body, len(head), zlib.crc32(body), Q0_60_BITS) == bad
    assert add_checked(total, body, len(head), zlib.crc32(body) ^ 1, Q0_60_BITS) == modular.CORRUPT
    assert not total.any()


def test_the_checked_addition_of_whole_chunks_is_the_checksum_and_numpy_s_addition():
    rng = np.random.default_rng(2)
    adders = [_compiled_checked, _compiled_checked_scalar, modular.checksum_then_add_mod]
    totals = [np.zeros(8192, dtype=np.uint64) for _ in adders]
    by_numpy = np.zeros(8192, dtype=np.uint64)
    for _ in range(10):
        packed = pack60(rng.integers(0, Q0_60_BITS, size=8192, dtype=np.uint64))
        body = rng.bytes(65) + packed  # an upload chunk's: a seed entry, then the first polynomial
        numpy_add_packed_mod(by_numpy, packed, Q0_60_BITS)
        for add_checked, total in zip(adders, totals):
            assert add_checked(total, body, 65, zlib.crc32(body), Q0_60_BITS) is None
    for total in totals:
        assert np.array_equal(total, by_numpy)


def test_the_folding_constants_are_the_powers_of_x_the_crc_folds_by():
    """_packed.c folds zlib's CRC-32 by carry-less multiplication with constants derived here: x^k mod P bit-reflected
    and shifted left by one for the fold distances, and P and floor(x^64 / P) reflected for Barrett's reduction."""
    poly = 1 << 32 | 0x04C11DB7

    def x_pow_mod(k: int) -> int:
        r = 1
        for _ in range(k):
            r <<= 1
            r ^= poly if r >> 32 else 0
        return r

    def reflected(v: int, bits: int) -> int:
        return int(f"{v:0{bits}b}"[::-1], 2)

    def folding(k: int) -> int:
        return reflected(x_pow_mod(k) << 32, 64) << 1

    quotient, rest = 0, 1 << 64
    while rest.bit_length() >= poly.bit_length():
        shift = rest.bit_length() - poly.bit_length()
        quotient, rest = quotient | 1 << shift, rest ^ poly << shift
    constants = [folding(4 * 128 + 32), folding(4 * 128 - 32), folding(128 + 32), folding(128 - 32), folding(64)]
    constants += [reflected(poly, 33), reflected(quotient, 33)]
    source = (Path(modular.__file__).parent / "_packed.c").read_text().lower()
    for constant in constants:
        assert f"0x{constant:09x}" in source
