"""Tensor selection: which names are encrypted, sent in plaintext or kept local, on the seed's SegResNet and toys."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.networks.blocks import Convolution
from monai.networks.nets import SegResNet
from torch import nn

from lightning_fhe.selection import (
    MODES,
    SelectionError,
    TensorSplit,
    conv_layers,
    describe_split,
    key_layers,
    split_tensors,
)

# The seed's model (DESIGN.md section 2).
SEGRESNET_TENSORS = 83
SEGRESNET_PARAMETERS = 4_700_914
KEY_LAYER_NAMES = (
    "convInit.conv.weight",
    "down_layers.3.2.conv1.conv.weight",
    "conv_final.2.conv.weight",
    "conv_final.2.conv.bias",
)


@pytest.fixture(scope="module")
def segresnet() -> SegResNet:
    # Built once: construction is the slow part of this file.
    torch.manual_seed(0)
    return SegResNet(
        spatial_dims=3, init_filters=16, in_channels=1, out_channels=2, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1]
    )


@pytest.fixture(scope="module")
def seg_state(segresnet: SegResNet) -> dict[str, torch.Tensor]:
    return segresnet.state_dict()


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def assert_partition(split: TensorSplit, state: dict[str, torch.Tensor]) -> None:
    groups = (split.encrypted, split.plaintext, split.local)
    names = [n for g in groups for n in g]
    assert len(names) == len(set(names)), "groups overlap"
    assert set(names) == set(state), "groups do not cover the state dict"
    order = {n: i for i, n in enumerate(state)}
    for group in groups:
        assert list(group) == sorted(group, key=order.__getitem__), "a group is not in state-dict order"


# SegResNet, the seed's model ------------------------------------------------------------------------------------


def test_segresnet_matches_the_design_facts(seg_state: dict[str, torch.Tensor]) -> None:
    assert len(seg_state) == SEGRESNET_TENSORS
    assert sum(t.numel() for t in seg_state.values()) == SEGRESNET_PARAMETERS


@pytest.mark.parametrize("use_module", [True, False])
def test_all_encrypts_every_floating_tensor(segresnet, seg_state, use_module: bool) -> None:
    split = split_tensors(seg_state, "all", module=segresnet if use_module else None)
    assert split.encrypted == tuple(n for n, t in seg_state.items() if t.is_floating_point())
    assert split.encrypted == tuple(seg_state)  # GroupNorm has no buffers: nothing is local
    assert split.plaintext == split.local == ()


def test_none_sends_everything_in_plaintext(segresnet, seg_state) -> None:
    split = split_tensors(seg_state, "none", module=segresnet)
    assert split.encrypted == ()
    assert split.plaintext == tuple(seg_state)
    assert split.local == ()


@pytest.mark.parametrize("use_module", [True, False])
def test_conv_is_every_convolution_and_nothing_else(segresnet, seg_state, use_module: bool) -> None:
    expected = tuple(
        f"{module_name}.{param_name}"
        for module_name, module in segresnet.named_modules()
        if isinstance(module, nn.Conv3d)
        for param_name, _ in module.named_parameters(recurse=False)
    )
    split = split_tensors(seg_state, "conv", module=segresnet if use_module else None)
    assert split.encrypted == expected
    assert len(split.encrypted) == 33  # 32 conv weights + conv_final's bias
    assert not [n for n in split.encrypted if "norm" in n]
    assert "conv_final.0.weight" in split.plaintext  # a GroupNorm inside conv_final, not a convolution
    assert all("norm" in n or n.startswith("conv_final.0.") for n in split.plaintext)
    assert_partition(split, seg_state)


@pytest.mark.parametrize("use_module", [True, False])
def test_key_layers_are_input_bottleneck_and_output(segresnet, seg_state, use_module: bool) -> None:
    module = segresnet if use_module else None
    assert key_layers(seg_state, module) == [
        ("convInit.conv.weight",),
        ("down_layers.3.2.conv1.conv.weight",),
        ("conv_final.2.conv.weight", "conv_final.2.conv.bias"),
    ]
    split = split_tensors(seg_state, "key_layers", module=module)
    assert split.encrypted == KEY_LAYER_NAMES
    assert [seg_state[n].numel() for n in split.encrypted] == [432, 442_368, 32, 2]
    assert sum(seg_state[n].numel() for n in split.encrypted) == 442_834
    assert len(split.plaintext) == SEGRESNET_TENSORS - 4
    assert_partition(split, seg_state)


def test_conv_layers_finds_all_32_segresnet_convolutions_in_state_order(segresnet, seg_state) -> None:
    with_module = conv_layers(seg_state, segresnet)
    assert with_module == conv_layers(seg_state)
    assert len(with_module) == 32
    assert with_module[0] == ("convInit.conv.weight",)
    assert with_module[-1] == ("conv_final.2.conv.weight", "conv_final.2.conv.bias")


def test_describe_split_reports_counts_and_megabytes(seg_state) -> None:
    text = describe_split(split_tensors(seg_state, "key_layers"), seg_state)
    assert "encrypted: 4 tensors, 442,834 values, 1.77 MB" in text
    assert "plaintext: 79 tensors, 4,258,080 values, 17.03 MB" in text
    assert "local: 0 tensors" in text


# A tiny MLP with BatchNorm: buffers and non-floating tensors ---------------------------------------------------------


def test_conv_on_a_model_without_convolutions_is_an_error() -> None:
    model = tiny_mlp()
    with pytest.raises(SelectionError, match=r"encrypt='conv' selects none of the 9 tensors.*no convolution"):
        split_tensors(model.state_dict(), "conv", module=model)
    with pytest.raises(SelectionError, match=r"'key_layers' selects none of the 9 tensors"):
        split_tensors(model.state_dict(), "key_layers")


def test_all_federates_buffers_when_asked() -> None:
    model = tiny_mlp()
    split = split_tensors(model.state_dict(), "all", module=model, federate_buffers=True)
    assert split.encrypted == (
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "3.weight", "3.bias"
    )
    assert split.plaintext == ()
    assert split.local == ("1.num_batches_tracked",)


def test_all_keeps_buffers_local_when_not_federated() -> None:
    model = tiny_mlp()
    split = split_tensors(model.state_dict(), "all", module=model, federate_buffers=False)
    assert split.encrypted == ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
    assert split.local == ("1.running_mean", "1.running_var", "1.num_batches_tracked")


def test_buffer_names_without_module_behave_like_the_module() -> None:
    model = tiny_mlp()
    buffers = {n for n, _ in model.named_buffers()}
    for federate in (True, False):
        by_names = split_tensors(model.state_dict(), "all", buffer_names=buffers, federate_buffers=federate)
        assert by_names == split_tensors(model.state_dict(), "all", module=model, federate_buffers=federate)


@pytest.mark.parametrize("encrypt", ["all", "none", ["1.*"], ["*"]])
@pytest.mark.parametrize("federate_buffers", [True, False])
def test_num_batches_tracked_is_always_local(encrypt, federate_buffers: bool) -> None:
    model = tiny_mlp()
    split = split_tensors(model.state_dict(), encrypt, module=model, federate_buffers=federate_buffers)
    assert "1.num_batches_tracked" in split.local
    assert_partition(split, model.state_dict())


def test_unfederated_buffers_in_none_mode_stay_local() -> None:
    model = tiny_mlp()
    split = split_tensors(model.state_dict(), "none", module=model, federate_buffers=False)
    assert split.encrypted == ()
    assert split.plaintext == ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")


def test_selecting_only_local_tensors_is_an_error() -> None:
    model = tiny_mlp()
    with pytest.raises(SelectionError, match="never leave the site"):
        split_tensors(model.state_dict(), ["1.running_*"], module=model, federate_buffers=False)


def test_monai_convolution_wrapper_selects_the_conv_not_its_norm() -> None:
    model = nn.Sequential(
        Convolution(spatial_dims=2, in_channels=1, out_channels=4, norm="batch", act="relu", bias=True),
        nn.ConvTranspose2d(4, 2, 2),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    model(torch.zeros(2, 1, 5, 5))  # materialise the lazy layer
    state = model.state_dict()
    expected = ("0.conv.weight", "0.conv.bias", "1.weight", "1.bias")
    assert split_tensors(state, "conv", module=model).encrypted == expected
    assert split_tensors(state, "conv").encrypted == expected  # the shape rule agrees
    assert split_tensors(state, "key_layers", module=model).encrypted == expected  # two convs: first and last


def test_shape_rule_and_module_rule_differ_only_where_the_module_knows_better() -> None:
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 2, 3))
    model = nn.Sequential(conv, nn.Linear(2, 2))
    state = model.state_dict()
    by_module = split_tensors(state, "conv", module=model).encrypted
    assert by_module == tuple(n for n in state if n.startswith("0."))
    assert "0.parametrizations.weight.original1" in by_module
    # Without the module only the bias is recognisable as belonging to a conv: no 'weight' of ndim >= 3.
    with pytest.raises(SelectionError):
        split_tensors(state, "conv")


# Patterns -----------------------------------------------------------------------------------------------------------


def test_glob_patterns_select_matching_names(seg_state) -> None:
    split = split_tensors(seg_state, ["convInit.*", "conv_final.*"])
    assert split.encrypted == (
        "convInit.conv.weight",
        "conv_final.0.weight",
        "conv_final.0.bias",
        "conv_final.2.conv.weight",
        "conv_final.2.conv.bias",
    )
    assert split_tensors(seg_state, ["*.bias"]).encrypted == tuple(n for n in seg_state if n.endswith(".bias"))


def test_plain_prefixes_select_whole_modules(seg_state) -> None:
    by_prefix = split_tensors(seg_state, ["convInit", "conv_final."])
    by_glob = split_tensors(seg_state, ["convInit.*", "conv_final.*"])
    assert by_prefix == by_glob
    assert split_tensors(seg_state, ["down_layers.3.2"]).encrypted == tuple(
        n for n in seg_state if n.startswith("down_layers.3.2.")
    )


def test_a_prefix_stops_at_a_name_boundary() -> None:
    state = OrderedDict((name, torch.zeros(2)) for name in ["layer.1.weight", "layer.10.weight", "layer.1x"])
    assert split_tensors(state, ["layer.1"]).encrypted == ("layer.1.weight",)


def test_patterns_keep_state_dict_order_whatever_their_own_order(seg_state) -> None:
    patterns = ["conv_final.*", "up_samples.*", "convInit", "down_layers.0.*"]
    split = split_tensors(seg_state, patterns)
    assert split.encrypted[0] == "convInit.conv.weight"
    assert split.encrypted[-1] == "conv_final.2.conv.bias"
    assert_partition(split, seg_state)


def test_an_unmatched_pattern_names_itself_and_shows_available_names(seg_state) -> None:
    with pytest.raises(SelectionError) as err:
        split_tensors(seg_state, ["convInit.*", "convinit.*"])  # matching is case-sensitive
    message = str(err.value)
    assert "'convinit.*'" in message
    assert "83 tensors" in message
    assert "'convInit.conv.weight'" in message


@pytest.mark.parametrize("bad", [[], [""], [3]])
def test_empty_or_malformed_pattern_lists_are_errors(seg_state, bad) -> None:
    with pytest.raises(SelectionError, match="pattern"):
        split_tensors(seg_state, bad)


# Modes and inputs -------------------------------------------------------------------------------------------------


def test_an_unknown_mode_lists_the_valid_ones(seg_state) -> None:
    with pytest.raises(SelectionError) as err:
        split_tensors(seg_state, "everything")
    for mode in MODES:
        assert repr(mode) in str(err.value)


def test_a_near_miss_mode_gets_a_suggestion_and_a_bare_pattern_a_hint(seg_state) -> None:
    with pytest.raises(SelectionError, match="Did you mean 'key_layers'"):
        split_tensors(seg_state, "key-layers")
    with pytest.raises(SelectionError, match=r"passed as a list, e\.g\. encrypt=\['convInit\.\*'\]"):
        split_tensors(seg_state, "convInit.*")


def test_a_module_that_does_not_match_the_state_is_an_error(segresnet, seg_state) -> None:
    prefixed = OrderedDict((f"model.{n}", t) for n, t in seg_state.items())
    with pytest.raises(SelectionError, match="not in the given module"):
        split_tensors(prefixed, "conv", module=segresnet)


def test_complex_tensors_are_refused() -> None:
    with pytest.raises(SelectionError, match="complex"):
        split_tensors({"w": torch.zeros(2, dtype=torch.complex64)}, "all")


def test_non_tensor_extra_state_stays_local() -> None:
    state = OrderedDict([("w", torch.zeros(2)), ("_extra_state", {"step": 3})])
    split = split_tensors(state, "all")  # type: ignore[arg-type]
    assert split.encrypted == ("w",)
    assert split.local == ("_extra_state",)


def test_empty_state() -> None:
    assert split_tensors({}, "none") == TensorSplit((), (), ())
    with pytest.raises(SelectionError, match="the state dict is empty"):
        split_tensors({}, "all")


# Property: the three groups always partition the state dict ----------------------------------------------------


_PROPERTY_MODEL = nn.Sequential(
    nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Linear(3, 2)
)
_PROPERTY_STATE = _PROPERTY_MODEL.state_dict()
_PROPERTY_PATTERNS = sorted(
    set(_PROPERTY_STATE)
    | {n.rpartition(".")[0] for n in _PROPERTY_STATE}
    | {"*.weight", "*.bias", "1.running_*", "*", "?.*"}
)


@settings(max_examples=150, deadline=None)
@given(
    patterns=st.lists(st.sampled_from(_PROPERTY_PATTERNS), min_size=1, max_size=6),
    federate_buffers=st.booleans(),
    use_module=st.booleans(),
)
def test_groups_partition_the_state_for_any_pattern_subset(
    patterns: list[str], federate_buffers: bool, use_module: bool
) -> None:
    module = _PROPERTY_MODEL if use_module else None
    buffer_names = () if use_module else {n for n, _ in _PROPERTY_MODEL.named_buffers()}
    try:
        split = split_tensors(
            _PROPERTY_STATE, patterns, module=module, buffer_names=buffer_names, federate_buffers=federate_buffers
        )
    except SelectionError as err:
        # The only acceptable failure: every matched tensor is one that never leaves the site.
        assert "never leave the site" in str(err)
        return
    assert_partition(split, _PROPERTY_STATE)
    assert split.encrypted, "a successful non-'none' split encrypts something"
    assert "1.num_batches_tracked" in split.local
    assert ("1.running_mean" in split.local) is (not federate_buffers)
