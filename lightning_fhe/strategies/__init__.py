"""Federated strategies under HE: the server's optimizer step, run by every site on the decrypted average.

- :mod:`~lightning_fhe.strategies.base`: the :class:`Strategy` interface a user can subclass.
- :mod:`~lightning_fhe.strategies.fedavg`: :class:`FedAvg` (server learning rate) and :class:`FedAvgM` (momentum).
- :mod:`~lightning_fhe.strategies.adaptive`: :class:`FedAdam`, :class:`FedYogi`, :class:`FedAdagrad`.
- :mod:`~lightning_fhe.strategies.config`: :func:`strategy_from_config` for YAML.
- :mod:`~lightning_fhe.strategies.replica`: :class:`StrategyReplica`, a site's copy of the server-side state.

Pass one to the callback: ``HEFederation(kit=..., strategy=FedAdam(lr=0.05))``. See ``docs/strategies.md``.
"""

from lightning_fhe.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from lightning_fhe.strategies.base import Strategy, StrategyConfigError
from lightning_fhe.strategies.config import STRATEGIES, strategy_from_config
from lightning_fhe.strategies.fedavg import FedAvg, FedAvgM
from lightning_fhe.strategies.replica import StrategyReplica

__all__ = [
    "STRATEGIES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "Strategy",
    "StrategyConfigError",
    "StrategyReplica",
    "strategy_from_config",
]
