"""Build a mechanism from the ``privacy:`` block of a YAML config.

Accepted shapes (the ``privacy:`` key itself is the caller's)::

    privacy:                              # or null / {} / []: no mechanism
      gaussian: {clip_norm: 1.0, noise_multiplier: 0.8}

    privacy:
      gaussian: {clip_norm: 1.0, target_epsilon: 8.0, target_delta: 1.0e-5}   # rounds from the experiment

    privacy:
      partial: {fraction: 0.1}

    privacy:
      svt: {fraction: 0.1, epsilon: 1.0, clip_bound: 0.01}

    privacy:                              # a list: applied in this order
      - gaussian: {clip_norm: 1.0, noise_multiplier: 0.8}
      - partial: {fraction: 0.1}

Option names are the constructors' argument names. One mechanism per mapping: YAML mappings have no reliable
order, so several mechanisms go in a list, whose order is the order they are applied in.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_fhe.privacy._checks import PrivacyConfigError, check_positive_int
from lightning_fhe.privacy.base import UpdateMechanism
from lightning_fhe.privacy.chain import PrivacyChain
from lightning_fhe.privacy.gaussian import GaussianMechanism
from lightning_fhe.privacy.partial import PartialSharing
from lightning_fhe.privacy.svt import SparseVectorTechnique

__all__ = ["MECHANISMS", "mechanism_from_config"]

#: The mechanisms a config can name, by key.
MECHANISMS: Mapping[str, type[UpdateMechanism]] = {
    GaussianMechanism.name: GaussianMechanism,
    PartialSharing.name: PartialSharing,
    SparseVectorTechnique.name: SparseVectorTechnique,
}

_EXAMPLE = "{gaussian: {clip_norm: 1.0, noise_multiplier: 0.8}}"


def mechanism_from_config(
    config: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    *,
    rounds: int | None = None,
    prefix: str = "privacy",
) -> UpdateMechanism | None:
    """The mechanism a ``privacy:`` config block describes, or None when it describes none.

    Args:
        config: the block (a plain dict or list, or OmegaConf's DictConfig/ListConfig), in one of the shapes in
            this module's docstring. None, ``{}`` and ``[]`` mean no mechanism.
        rounds: the number of federated rounds of the experiment, used as the Gaussian mechanism's ``rounds``
            when its block sets ``target_epsilon`` without ``rounds``, so a budget lasts the whole run.
        prefix: how errors name the block's place in the config.

    Raises:
        PrivacyConfigError: the block is malformed; the message names the key, e.g.
            ``privacy.gaussian.clip_norm: must be > 0, got -1``.
    """
    if rounds is not None:
        rounds = check_positive_int("rounds", rounds)
    if config is None:
        return None
    if isinstance(config, Mapping):
        return _mechanism(config, prefix, rounds) if config else None
    if isinstance(config, Sequence) and not isinstance(config, (str, bytes)):
        stages = [_mechanism(entry, f"{prefix}[{i}]", rounds) for i, entry in enumerate(config)]
        if not stages:
            return None
        return stages[0] if len(stages) == 1 else PrivacyChain(stages)
    raise PrivacyConfigError(prefix, f"expected a mechanism such as {_EXAMPLE}, or a list of them, got {config!r}")


def _mechanism(entry: object, path: str, rounds: int | None) -> UpdateMechanism:
    if not isinstance(entry, Mapping) or not entry:
        raise PrivacyConfigError(path, f"expected one mechanism such as {_EXAMPLE}, got {entry!r}")
    if len(entry) != 1:
        keys = ", ".join(str(key) for key in entry)
        raise PrivacyConfigError(
            path,
            f"one mechanism per mapping, got {keys}; to apply several, list them in the order to apply, "
            "e.g. [{gaussian: {...}}, {partial: {...}}]",
        )
    ((kind, options),) = entry.items()
    key = f"{path}.{kind}"
    if kind not in MECHANISMS:
        raise PrivacyConfigError(
            key, f"unknown mechanism; expected one of {', '.join(MECHANISMS)}{_suggest(kind, MECHANISMS)}"
        )
    if options is None:  # `partial:` with nothing under it
        options = {}
    if not isinstance(options, Mapping):
        raise PrivacyConfigError(key, f"expected a mapping of options, got {options!r}")

    cls = MECHANISMS[kind]
    parameters = {
        name: parameter
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    kwargs: dict[str, Any] = {}
    for name, value in options.items():
        if name not in parameters:
            raise PrivacyConfigError(
                f"{key}.{name}", f"unknown option; expected one of {', '.join(parameters)}{_suggest(name, parameters)}"
            )
        kwargs[str(name)] = value
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and name not in kwargs:
            raise PrivacyConfigError(f"{key}.{name}", "required")
    if cls is GaussianMechanism and "target_epsilon" in kwargs and "rounds" not in kwargs and rounds is not None:
        kwargs["rounds"] = rounds
    try:
        return cls(**kwargs)
    except PrivacyConfigError as error:
        raise error.under(key) from None


def _suggest(name: object, choices: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
