"""Build a strategy from the ``strategy:`` block of a YAML config (or HEFederation's ``strategy=`` argument).

Accepted shapes::

    strategy: fedavg                      # a name: its defaults (FedAdam, FedYogi, FedAdagrad need lr)
    strategy: {fedadam: {lr: 0.05}}       # a name and its options: the constructor's arguments
    strategy: null                        # FedAvg(lr=1.0), the weighted average itself
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from lightning_fhe.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from lightning_fhe.strategies.base import Strategy, StrategyConfigError
from lightning_fhe.strategies.fedavg import FedAvg, FedAvgM

__all__ = ["STRATEGIES", "strategy_from_config"]

#: The strategies a config can name, by key.
STRATEGIES: Mapping[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)}

_EXAMPLE = "{fedadam: {lr: 0.05}}"


def strategy_from_config(config: Strategy | str | Mapping[str, Any] | None, *, prefix: str = "strategy") -> Strategy:
    """The strategy ``config`` describes: a :class:`Strategy` (returned as is), a name, ``{name: {options}}``, or
    None for plain FedAvg.

    Example::

        >>> strategy_from_config({"fedadam": {"lr": 0.05}})
        FedAdam(lr=0.05, beta1=0.9, beta2=0.99, tau=0.001)
        >>> strategy_from_config({"fedadam": {"lr": 0.05, "beta": 0.9}})
        Traceback (most recent call last):
        ...
        lightning_fhe.strategies.base.StrategyConfigError: strategy.fedadam.beta: unknown option; expected one of ...

    Raises:
        StrategyConfigError: the message names the dotted key at fault, e.g. ``strategy.fedadam.lr: required``.
    """
    if isinstance(config, Strategy):
        return config
    if config is None:
        return FedAvg()
    if isinstance(config, str):
        return _build(config, {}, prefix)
    if isinstance(config, Mapping) and len(config) == 1:
        ((kind, options),) = config.items()
        if options is None:  # `fedavgm:` with nothing under it
            options = {}
        if not isinstance(options, Mapping):
            raise StrategyConfigError(f"{prefix}.{kind}", f"expected a mapping of options, got {options!r}")
        return _build(str(kind), options, prefix)
    raise StrategyConfigError(
        prefix, f"expected a strategy name ({', '.join(STRATEGIES)}) or one name with its options such as "
        f"{_EXAMPLE}, got {config!r}"
    )  # fmt: skip


def _build(kind: str, options: Mapping[str, Any], prefix: str) -> Strategy:
    key = f"{prefix}.{kind}"
    cls = STRATEGIES.get(kind.lower())
    if cls is None:
        raise StrategyConfigError(key, f"unknown strategy; expected one of {', '.join(STRATEGIES)}{_suggest(kind)}")
    parameters = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    for name in options:
        if name not in parameters:
            close = difflib.get_close_matches(str(name), parameters, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise StrategyConfigError(f"{key}.{name}", f"unknown option; expected one of {', '.join(parameters)}{hint}")
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name != "self" and parameter.default is inspect.Parameter.empty and name not in options:
            raise StrategyConfigError(f"{key}.{name}", f"required, e.g. {{{kind}: {{{name}: 0.01}}}}")
    try:
        return cls(**{str(name): value for name, value in options.items()})
    except StrategyConfigError as err:
        raise StrategyConfigError(f"{key}.{err.key}", err.reason) from None


def _suggest(kind: str) -> str:
    close = difflib.get_close_matches(kind.lower(), list(STRATEGIES), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
