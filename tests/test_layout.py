import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_fhe.he.layout import SUPPORTED_DTYPES, LayoutError, TensorLayout

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from(sorted(SUPPORTED_DTYPES))


@st.composite
def state_dicts(draw):
    n = draw(st.integers(1, 6))
    names = draw(st.lists(st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,3}){0,2}", fullmatch=True), min_size=n, max_size=n, unique=True))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(draw(shapes), generator=generator, dtype=torch.float64) * 10).to(SUPPORTED_DTYPES[draw(dtypes)])
        for name in names
    }


@settings(max_examples=60, deadline=None)
@given(state_dicts())
def test_flatten_unflatten_restores_names_shapes_dtypes_and_values_exactly(state):
    layout = TensorLayout.from_tensors(state)
    restored = layout.unflatten(layout.flatten(state))
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype
        assert restored[name].shape == tensor.shape
        assert torch.equal(restored[name], tensor)


@settings(max_examples=30, deadline=None)
@given(state_dicts())
def test_layout_survives_its_wire_description(state):
    layout = TensorLayout.from_tensors(state)
    again = TensorLayout.from_dict(layout.to_dict())
    assert again == layout and again.fingerprint() == layout.fingerprint()


def test_fingerprint_changes_with_name_shape_dtype_and_params():
    from lightning_fhe.he import CKKSParams

    base = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    fp = TensorLayout.from_tensors(base).fingerprint(CKKSParams())
    variants = [
        {"a": torch.zeros(2, 3), "c": torch.zeros(4)},
        {"a": torch.zeros(3, 2), "b": torch.zeros(4)},
        {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16)},
        {"b": torch.zeros(4), "a": torch.zeros(2, 3)},
    ]
    for variant in variants:
        assert TensorLayout.from_tensors(variant).fingerprint(CKKSParams()) != fp
    assert TensorLayout.from_tensors(base).fingerprint(CKKSParams(scale_bits=30)) != fp


def test_mismatches_name_the_tensor():
    layout = TensorLayout.from_tensors({"w": torch.zeros(2, 2), "b": torch.zeros(2)})
    with pytest.raises(LayoutError, match="'b' of the layout is missing"):
        layout.flatten({"w": torch.zeros(2, 2)})
    with pytest.raises(LayoutError, match=r"'w' is torch.float32 \(4,\)"):
        layout.flatten({"w": torch.zeros(4), "b": torch.zeros(2)})
    with pytest.raises(LayoutError, match="holds 5 values; the layout has 6"):
        layout.unflatten(np.zeros(5))
    with pytest.raises(LayoutError, match="integer buffers stay local"):
        TensorLayout.from_tensors({"steps": torch.tensor(3)})


def test_locate_names_the_element():
    layout = TensorLayout.from_tensors({"w": torch.zeros(2, 3), "s": torch.zeros(()), "b": torch.zeros(2)})
    assert layout.locate(0) == "tensor 'w'[0, 0]"
    assert layout.locate(5) == "tensor 'w'[1, 2]"
    assert layout.locate(6) == "tensor 's'[]"
    assert layout.locate(8) == "tensor 'b'[1]"


@settings(max_examples=40, deadline=None)
@given(state_dicts(), st.integers(1, 7))
def test_writing_the_stream_a_piece_at_a_time_gives_the_tensors_unflatten_gives(state, piece):
    """As a download does, a batch of chunks at a time, wherever the pieces cut the tensors."""
    layout = TensorLayout.from_tensors(state)
    stream = layout.flatten(state) * 1.000001  # not already representable in every dtype
    expected, tensors = layout.unflatten(stream), layout.empty()
    for start in range(0, stream.size, piece):
        layout.write(tensors, start, stream[start : start + piece])
    for name in state:
        assert torch.equal(tensors[name], expected[name]), name
