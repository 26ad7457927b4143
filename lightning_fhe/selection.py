"""Which tensors of a model state are encrypted, which travel in plaintext, and which never leave the site.

Encrypting costs time and bytes, so the seed (Clara Train 4.0) lets a site encrypt only part of the model: the
whole model, every convolution, or three "key" layers (input, middle, output). Everything else that is federated
is averaged by the server in plaintext. This module turns such a choice into three disjoint lists of state-dict
names. It is pure logic over a state dict (and, optionally, the module that produced it): no Lightning, no
networking, no encryption, so it is cheap to test and every other piece can trust its output.

Example::

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    >>> split = split_tensors(model.state_dict(), "conv", module=model)
    >>> split.encrypted
    ('0.weight', '0.bias', '2.weight', '2.bias')
    >>> split.plaintext
    ('1.weight', '1.bias', '1.running_mean', '1.running_var')
    >>> split.local
    ('1.num_batches_tracked',)
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union, get_args

import torch
from torch import nn

__all__ = [
    "MODES",
    "Selection",
    "SelectionError",
    "TensorSplit",
    "compact_names",
    "conv_layers",
    "describe_encrypted",
    "describe_split",
    "key_layers",
    "split_tensors",
]

Mode = Literal["all", "conv", "key_layers", "none"]
Selection = Union[Mode, Sequence[str]]

MODES: tuple[str, ...] = get_args(Mode)

# Leaf modules that count as convolutions. Lazy and QAT variants subclass these. Wrappers such as MONAI's
# ``Convolution`` (a Sequential holding a ``conv`` child plus norm/act/dropout) are found through their torch leaf,
# so the wrapper's norm layers are not mistaken for part of the convolution.
_CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


class SelectionError(ValueError):
    """A tensor selection that cannot be honoured: unknown mode, unmatched pattern, or nothing to encrypt.

    Raised before anything is encrypted or sent, so a typo never silently turns into plaintext federation.
    """


@dataclass(frozen=True)
class TensorSplit:
    """The three disjoint groups of a state dict, each in state-dict order.

    Attributes:
        encrypted: floating tensors to encrypt; the server only ever adds their ciphertexts.
        plaintext: floating tensors that are federated unencrypted; the server averages them in the clear.
        local: tensors that never leave the site: non-floating ones (e.g. BatchNorm ``num_batches_tracked``, which
            cannot be averaged meaningfully), non-tensor extra state, and floating buffers when
            ``federate_buffers=False``.
    """

    encrypted: tuple[str, ...]
    plaintext: tuple[str, ...]
    local: tuple[str, ...]


def split_tensors(
    state: Mapping[str, torch.Tensor],
    encrypt: Selection = "all",
    *,
    module: nn.Module | None = None,
    buffer_names: Collection[str] = (),
    federate_buffers: bool = True,
) -> TensorSplit:
    """Splits a state dict into encrypted, plaintext and local tensor names.

    Args:
        state: the model state, e.g. ``pl_module.state_dict()``. Its order is kept in every group, so all sites
            (which share the architecture) agree on the layout without exchanging it.
        encrypt: what to encrypt.

            - ``"all"``: every federated floating tensor (the seed's "HE full").
            - ``"none"``: nothing; floating tensors go in plaintext (the seed's raw federated learning baseline).
            - ``"conv"``: every convolution weight and bias, and nothing else (see :func:`conv_layers`).
            - ``"key_layers"``: the first, middle and last convolution, the seed's "three layers"
              (see :func:`key_layers`).
            - a list of patterns: ``fnmatch`` globs on tensor names (``"*.conv.weight"``), or module prefixes
              (``"convInit"``, ``"down_layers.3"``). Each pattern matches a tensor name, or the name of a module
              that owns the tensor, i.e. ``p`` also matches ``p + ".*"``; matching is case-sensitive. Every
              pattern must match at least one tensor.
        module: the module that produced ``state``, with the same names. Optional; when given, convolutions are
            recognised by module type instead of by weight shape, and buffers are read from it.
        buffer_names: names in ``state`` that are buffers rather than parameters (e.g. BatchNorm running stats),
            typically ``{n for n, _ in module.named_buffers()}``. Added to those derived from ``module``.
        federate_buffers: if True, floating buffers are federated like parameters (encrypted when selected, else
            plaintext), so running statistics are averaged too. If False they stay local, as in FedBN.

    Returns:
        A :class:`TensorSplit` whose three groups partition ``state``'s names.

    Raises:
        SelectionError: for an unknown mode, an empty or unmatched pattern, a module whose names do not match the
            state dict, a complex tensor, or when a mode other than ``"none"`` selects nothing to encrypt.
    """
    names = list(state)
    buffers = set(buffer_names)
    if module is not None:
        _check_module_matches(state, module)
        buffers.update(name for name, _ in module.named_buffers(remove_duplicate=False))

    local, federated = _split_local(state, buffers, federate_buffers)
    selected = _select(state, encrypt, module)
    encrypted = tuple(name for name in names if name in federated and name in selected)
    plaintext = tuple(name for name in names if name in federated and name not in selected)

    if not encrypted and encrypt != "none":
        raise SelectionError(_nothing_selected_message(state, encrypt, selected, federate_buffers))
    return TensorSplit(encrypted=encrypted, plaintext=plaintext, local=tuple(n for n in names if n in local))


def conv_layers(state: Mapping[str, torch.Tensor], module: nn.Module | None = None) -> list[tuple[str, ...]]:
    """Lists the convolutions in ``state``, each as the tuple of its tensor names, in state-dict order.

    With ``module``: every ``nn.ConvNd``/``nn.ConvTransposeNd`` leaf (including those inside MONAI wrappers); a
    convolution owns every state entry under its module path, so weight-normalised (parametrized) weights count.
    Without it the shape rule applies: a tensor called ``weight`` with 3 or more dimensions (a ConvNd kernel is
    ``out, in, *kernel``; Linear weights have 2 and norm weights 1), plus the ``bias`` beside it. The shape rule
    cannot see a parametrized conv weight; pass the module for those.

    Note that state-dict order is the order in which modules were registered, which need not be the order in
    which they run.
    """
    order = {name: i for i, name in enumerate(state)}
    if module is not None:
        prefixes = [name for name, sub in module.named_modules(remove_duplicate=False) if isinstance(sub, _CONV_TYPES)]
        groups = [tuple(n for n in state if _under(n, prefix)) for prefix in prefixes]
        # Ordered by first appearance in the state, the order every group is reported in.
        return sorted((g for g in groups if g), key=lambda g: order[g[0]])
    groups_by_prefix: dict[str, list[str]] = {}
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and isinstance(tensor, torch.Tensor) and tensor.ndim >= 3:
            groups_by_prefix[prefix] = [name]
    for name in state:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "bias" and prefix in groups_by_prefix:
            groups_by_prefix[prefix].append(name)
    groups = [tuple(sorted(g, key=order.__getitem__)) for g in groups_by_prefix.values()]
    return sorted(groups, key=lambda g: order[g[0]])


def key_layers(state: Mapping[str, torch.Tensor], module: nn.Module | None = None) -> list[tuple[str, ...]]:
    """The seed's "three layers": input, middle and output convolution, as tuples of tensor names.

    Among the convolutions of :func:`conv_layers` (state-dict order), picks the first, the one at index
    ``len // 2``, and the last; duplicates collapse, so a model with one or two convolutions yields fewer groups.
    For an encoder-decoder the middle of the list falls in the deepest stage, where the widest kernels live. For
    MONAI's SegResNet (init_filters=16, blocks_down=[1,2,2,4], blocks_up=[1,1,1]; 32 convolutions) this is
    ``convInit.conv`` (432 values), ``down_layers.3.2.conv1.conv`` (a 128->128 3x3x3 kernel in the bottleneck,
    442,368 values) and ``conv_final.2.conv`` (weight and bias, 34 values): 442,834 of 4,700,914 parameters,
    1.77 MB. That agrees with the seed's "three layers" message of 43 MB: 17 MB plaintext plus ~1.8 MB at the
    seed's ~15x expansion.
    """
    convs = conv_layers(state, module)
    if not convs:
        return []
    picked: list[tuple[str, ...]] = []
    for group in (convs[0], convs[len(convs) // 2], convs[-1]):
        if group not in picked:
            picked.append(group)
    return picked


def describe_split(split: TensorSplit, state: Mapping[str, torch.Tensor]) -> str:
    """One line for logs: tensors, values and MB (10**6 bytes, at the tensors' own dtypes) per group."""
    parts = []
    for label, group in (("encrypted", split.encrypted), ("plaintext", split.plaintext), ("local", split.local)):
        tensors = [state[name] for name in group if isinstance(state.get(name), torch.Tensor)]
        values = sum(t.numel() for t in tensors)
        megabytes = sum(t.numel() * t.element_size() for t in tensors) / 1e6
        parts.append(f"{label}: {len(group)} tensors, {values:,} values, {megabytes:.2f} MB")
    return "; ".join(parts)


def compact_names(names: Sequence[str], limit: int = 8) -> str:
    """Tensor names grouped by module, ``{a,b}`` for siblings, the middle left out past ``limit`` groups.

    Example::

        >>> compact_names(["conv.weight", "conv.bias", "fc.weight"])
        'conv.{weight,bias}, fc.weight'
        >>> compact_names([f"block.{i}.weight" for i in range(10)], limit=4)
        'block.0.weight, block.1.weight, ... 6 more ..., block.8.weight, block.9.weight'
    """
    groups: list[tuple[str, list[str]]] = []
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if groups and groups[-1][0] == prefix and prefix:
            groups[-1][1].append(leaf)
        else:
            groups.append((prefix, [leaf]))
    shown = [
        (f"{prefix}." if prefix else "") + (leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}")
        for prefix, leaves in groups
    ]
    if len(shown) > limit:
        half = limit // 2
        shown = [*shown[:half], f"... {len(shown) - 2 * half} more ...", *shown[-half:]]
    return ", ".join(shown) if shown else "none"


def describe_encrypted(split: TensorSplit, state: Mapping[str, torch.Tensor]) -> str:
    """One line for the log: how many tensors travel encrypted, their values and bytes, and which they are.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
        >>> describe_encrypted(split_tensors(model.state_dict(), ["0"], module=model), model.state_dict())
        'encrypted: 2 tensors, 10 values, 40 bytes: 0.{weight,bias}; plaintext: 4 tensors; local: 1 tensors'
    """
    tensors = [state[name] for name in split.encrypted]
    values = sum(t.numel() for t in tensors)
    size = sum(t.numel() * t.element_size() for t in tensors)
    return (
        f"encrypted: {len(tensors)} tensors, {values:,} values, {size:,} bytes: {compact_names(split.encrypted)}; "
        f"plaintext: {len(split.plaintext)} tensors; local: {len(split.local)} tensors"
    )


def _split_local(
    state: Mapping[str, torch.Tensor], buffers: set[str], federate_buffers: bool
) -> tuple[set[str], set[str]]:
    """Separates tensors that never leave the site from those that are federated."""
    local: set[str] = set()
    federated: set[str] = set()
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_complex():
            # Averaging would work, but the packer only carries real values; dropping it silently would leave part
            # of the model unfederated.
            raise SelectionError(f"tensor {name!r} is complex ({tensor.dtype}); only real tensors can be federated")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            local.add(name)
        elif name in buffers and not federate_buffers:
            local.add(name)
        else:
            federated.add(name)
    return local, federated


def _select(state: Mapping[str, torch.Tensor], encrypt: Selection, module: nn.Module | None) -> set[str]:
    """Names chosen by ``encrypt``, before non-floating tensors and unfederated buffers are removed."""
    if isinstance(encrypt, str):
        if encrypt == "all":
            return set(state)
        if encrypt == "none":
            return set()
        if encrypt == "conv":
            return {name for group in conv_layers(state, module) for name in group}
        if encrypt == "key_layers":
            return {name for group in key_layers(state, module) for name in group}
        close = difflib.get_close_matches(encrypt.replace("-", "_").lower(), MODES, n=1)
        hint = (
            f"Did you mean {close[0]!r}?"
            if close
            else f"A single name pattern must be passed as a list, e.g. encrypt=[{encrypt!r}]"
        )
        raise SelectionError(
            f"unknown encryption mode {encrypt!r}; expected one of {list(MODES)} or a list of name patterns. {hint}"
        )
    if isinstance(encrypt, Iterable) and not isinstance(encrypt, (bytes, Mapping)):
        return _match_patterns(state, list(encrypt))
    raise SelectionError(
        f"encrypt must be one of {list(MODES)} or a list of name patterns, got {type(encrypt).__name__}"
    )


def _match_patterns(state: Mapping[str, torch.Tensor], patterns: list[object]) -> set[str]:
    """Names matched by any pattern; every pattern must match something, so typos fail loudly."""
    if not patterns:
        raise SelectionError("encrypt is an empty list of patterns; use encrypt='none' to federate without encryption")
    selected: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise SelectionError(f"encrypt patterns must be non-empty strings, got {pattern!r}")
        matched = {name for name in state if _matches(name, pattern)}
        if not matched:
            raise SelectionError(
                f"encrypt pattern {pattern!r} matches none of the {len(state)} tensors; "
                f"available names include {_examples(state)}"
            )
        selected |= matched
    return selected


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a tensor name or any module path above it (so a bare prefix selects a whole module)."""
    pattern = pattern.rstrip(".")
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _under(name: str, prefix: str) -> bool:
    """Whether the state entry ``name`` belongs to the module at path ``prefix`` ("" is the root)."""
    return not prefix or name.startswith(prefix + ".")


def _check_module_matches(state: Mapping[str, torch.Tensor], module: nn.Module) -> None:
    """Refuses a module whose names differ from the state's: conv and buffer detection would silently miss."""
    known = set(module.state_dict(keep_vars=True))
    unknown = [name for name in state if name not in known]
    if unknown:
        raise SelectionError(
            f"{len(unknown)} of {len(state)} state-dict names are not in the given module ({type(module).__name__}), "
            f"e.g. {unknown[:3]}; the module has e.g. {_examples(known)}. Pass the module that produced the state "
            "dict (with the same prefixes)"
        )


def _nothing_selected_message(
    state: Mapping[str, torch.Tensor], encrypt: Selection, selected: set[str], federate_buffers: bool
) -> str:
    what = repr(encrypt) if isinstance(encrypt, str) else f"patterns {list(encrypt)!r}"
    if not selected:
        reason = {
            "conv": "it found no convolution (nn.ConvNd module, or without a module a 'weight' with >= 3 dimensions)",
            "key_layers": "key_layers picks the first, middle and last convolution and the model has none",
        }.get(encrypt if isinstance(encrypt, str) else "", "it selected nothing")
        return (
            f"encrypt={what} selects none of the {len(state)} tensors: {reason}. Pass a list of name patterns "
            f"(available names include {_examples(state)}), 'all', or 'none' to federate without encryption"
        )
    why = "non-floating tensors" if federate_buffers else "non-floating tensors or buffers (federate_buffers=False)"
    return (
        f"encrypt={what} selects {len(selected)} of the {len(state)} tensors, but all of them are {why}, which never "
        "leave the site, so nothing would be encrypted; select floating parameters, or use 'none' explicitly"
    )


def _examples(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]" if names else "[] (the state dict is empty)"
