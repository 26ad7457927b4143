"""The shape of a round's update, decided once (lightning_fhe.proto.update_shape) and agreed on by the site's
client and the server's admission."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_fhe.client.upload import KeptUpdate
from lightning_fhe.he.layout import TensorLayout, TensorSpec
from lightning_fhe.he.params import CKKSParams
from lightning_fhe.proto.update_shape import INITIAL_MODEL_ROUND, update_shape
from lightning_fhe.proto.wire import WIRE_DTYPES
from lightning_fhe.server.admission import check_upload_header
from lightning_fhe.server.membership import Membership
from lightning_fhe.server.rounds import QuorumRule, RoundState

PARAMS = CKKSParams()  # 8192 values per chunk


def layout(*specs: tuple[str, int, str]) -> TensorLayout:
    return TensorLayout(tuple(TensorSpec(name, (size,), dtype) for name, size, dtype in specs))


ENCRYPTED = layout(("conv.weight", 16000, "float32"), ("conv.bias", 400, "float16"))
PLAINTEXT = layout(("norm.weight", 6, "float32"), ("norm.bias", 4, "bfloat16"))


def test_round_0_carries_the_whole_initial_model_in_plaintext_taken_as_sent():
    shape = update_shape(INITIAL_MODEL_ROUND, ENCRYPTED, PLAINTEXT, PARAMS)
    assert shape.is_initial_model and not shape.weighted
    assert (shape.num_chunks, shape.plaintext_count, shape.encrypted_count) == (0, 16410, 0)
    assert shape.share(0.25) == 1.0
    assert "initial model" in shape.plaintext_meaning


@pytest.mark.parametrize("round_number", [1, 2, 7])
def test_later_rounds_carry_chunks_of_the_encrypted_part_and_the_plaintext_part_weighted(round_number):
    shape = update_shape(round_number, ENCRYPTED, PLAINTEXT, PARAMS)
    assert not shape.is_initial_model and shape.weighted
    assert (shape.num_chunks, shape.plaintext_count, shape.encrypted_count) == (3, 10, 16400)
    assert shape.values_per_chunk == 8192 and shape.share(0.25) == 0.25
    assert shape.plaintext_meaning == "values in the plaintext layout"


@pytest.mark.parametrize(("values", "chunks"), [(0, 0), (1, 1), (8192, 1), (8193, 2), (3 * 8192, 3)])
def test_chunks_are_the_encrypted_values_over_the_values_per_chunk_rounded_up(values, chunks):
    encrypted = layout(("w", values, "float32")) if values else TensorLayout(())
    assert update_shape(1, encrypted, PLAINTEXT, PARAMS).num_chunks == chunks


def test_plaintext_travels_as_float64_only_when_a_travelling_tensor_is_float64():
    wide_encrypted = layout(("w", 5, "float64"))
    wide_plaintext = layout(("b", 5, "float64"))
    assert update_shape(1, ENCRYPTED, PLAINTEXT, PARAMS).plaintext_field == "float32_le"
    assert update_shape(0, ENCRYPTED, PLAINTEXT, PARAMS).plaintext_field == "float32_le"
    # The encrypted part travels in plaintext only in round 0, so only there does its float64 widen the field.
    assert update_shape(0, wide_encrypted, PLAINTEXT, PARAMS).plaintext_field == "float64_le"
    assert update_shape(1, wide_encrypted, PLAINTEXT, PARAMS).plaintext_field == "float32_le"
    assert update_shape(1, ENCRYPTED, wide_plaintext, PARAMS).plaintext_field == "float64_le"
    for round_number in (0, 1):
        assert update_shape(round_number, wide_encrypted, wide_plaintext, PARAMS).plaintext_field in WIRE_DTYPES


def test_values_are_located_in_the_tensors_the_round_carries():
    initial, later = update_shape(0, ENCRYPTED, PLAINTEXT, PARAMS), update_shape(1, ENCRYPTED, PLAINTEXT, PARAMS)
    assert initial.locate(0) == ENCRYPTED.locate(0)
    assert initial.locate(16400) == PLAINTEXT.locate(0) and initial.locate(16409) == PLAINTEXT.locate(9)
    assert later.locate(0) == PLAINTEXT.locate(0) and later.locate(9) == PLAINTEXT.locate(9)


def test_split_undoes_join_and_refuses_a_model_of_another_size():
    shape = update_shape(0, ENCRYPTED, PLAINTEXT, PARAMS)
    encrypted, plaintext = np.arange(16400, dtype=np.float64), -np.arange(10, dtype=np.float64)
    values = shape.join(encrypted, plaintext)
    assert values.size == shape.plaintext_count
    back = shape.split(values)
    assert np.array_equal(back[0], encrypted) and np.array_equal(back[1], plaintext)
    with pytest.raises(ValueError, match="initial model holds 3 values; this site's layout has 16410"):
        shape.split(np.zeros(3))


def test_shapes_are_equal_values():
    assert update_shape(1, ENCRYPTED, PLAINTEXT, PARAMS) == update_shape(1, ENCRYPTED, PLAINTEXT, PARAMS)
    assert update_shape(1, ENCRYPTED, PLAINTEXT, PARAMS) != update_shape(2, ENCRYPTED, PLAINTEXT, PARAMS)
    assert "conv.weight" not in repr(update_shape(1, ENCRYPTED, PLAINTEXT, PARAMS))  # layouts stay out of logs


@pytest.mark.parametrize("round_number", [0, 1])
def test_the_header_a_site_sends_is_the_one_the_server_admits(round_number):
    shape = update_shape(round_number, ENCRYPTED, PLAINTEXT, PARAMS)
    chunks = [b"x"] * shape.num_chunks
    kept = KeptUpdate.for_round(shape, chunks, np.zeros(shape.plaintext_count))
    header = next(kept.messages(None)).header
    assert (header.round, header.num_chunks, header.plaintext_count) == (
        round_number,
        shape.num_chunks,
        shape.plaintext_count,
    )
    assert kept.plaintext.dtype == WIRE_DTYPES[shape.plaintext_field]
    members = Membership(("a", "b"), (1.0, 3.0), ENCRYPTED, PLAINTEXT, initial_model_site="a")
    state = RoundState(round_number, ("a",) if round_number == 0 else ("a", "b"), QuorumRule(1, 0.0, 60.0), 0.0)
    check_upload_header("a", header.round, header.num_chunks, header.plaintext_count, members, 3, state, PARAMS)


def test_a_site_refuses_plaintext_of_another_size_before_sending():
    shape = update_shape(1, ENCRYPTED, PLAINTEXT, PARAMS)
    with pytest.raises(ValueError, match="round 1: plaintext holds 3 values; expected 10 values in the plaintext"):
        KeptUpdate.for_round(shape, [], np.zeros(3))
