"""A site's replica of the server-side strategy: the same state, fed the same decrypted averages.

Every site of a round decrypts the same average and holds the same reference, so every replica computes the same
next global model. The replica keeps the reference as the model holds it (rounded to each tensor's dtype by
``to_model``), so the next round's ``delta`` is measured from exactly what was trained from, and a site that
restarts from a checkpoint has it back bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lightning_fhe.strategies.base import Strategy

__all__ = ["StrategyReplica"]


class StrategyReplica:
    """The strategy, its state, and the global model it produced last.

    Example::

        >>> import numpy as np
        >>> from lightning_fhe.strategies import FedAvgM
        >>> replica = StrategyReplica(FedAvgM(lr=1.0, momentum=0.5), optimized=np.array([True, False]))
        >>> replica.start(0, np.array([0.0, 0.0]))          # the initial model: a parameter and a buffer
        >>> replica.advance(1, np.array([1.0, 5.0]))          # the buffer takes the average, never a step
        array([1., 5.])
        >>> replica.advance(2, np.array([2.0, 6.0]))          # momentum: m = 0.5 * 1 + 1
        array([2.5, 6. ])

    Args:
        strategy: the step to run on the federated parameters.
        optimized: one flag per flat federated value: True for parameters, which the strategy steps; False for
            floating buffers (BatchNorm statistics), which take the average as is.
        to_model: what loading values into the model does to them (rounding to each tensor's dtype); identity by
            default.
    """

    def __init__(
        self,
        strategy: Strategy,
        optimized: np.ndarray,
        to_model: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.strategy = strategy
        self.optimized = np.asarray(optimized, dtype=bool)
        self.to_model = to_model or (lambda values: np.array(values, dtype=np.float64))
        self.round: int | None = None  # the round whose global model ``reference`` is (0: the initial model)
        self.reference: np.ndarray | None = None

    def start(self, round: int, values: np.ndarray) -> None:
        """Takes ``values`` as the global model of ``round`` (the initial model at 0, or the server's aggregate of a
        later round for a memoryless strategy)."""
        self.round, self.reference = round, self._checked(self.to_model(values))

    def advance(self, round: int, average: np.ndarray) -> np.ndarray:
        """The global model of ``round`` from its decrypted average; it becomes the next round's reference."""
        if self.round is None or self.reference is None:
            raise RuntimeError("start() the replica from a global model before advancing it")
        if round != self.round + 1:
            raise ValueError(f"the replica holds the global model of round {self.round}; it cannot step to {round}")
        average = self._checked(np.asarray(average, dtype=np.float64))
        following = average.copy()
        if self.optimized.any():
            following[self.optimized] = self.strategy.step(self.reference[self.optimized], average[self.optimized])
        self.round, self.reference = round, self.to_model(following)
        return self.reference

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.name,
            "round": self.round,
            "reference": None if self.reference is None else self.reference.copy(),
            "state": self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["strategy"] != self.strategy.name:
            raise ValueError(
                f"the saved federation state was made with strategy {state['strategy']!r}, this site runs "
                f"{self.strategy.name!r}: every site and every restart must use the same strategy"
            )
        self.round = None if state["round"] is None else int(state["round"])
        self.reference = None if state["reference"] is None else self._checked(np.array(state["reference"], np.float64))
        self.strategy.load_state_dict(state["state"])

    def _checked(self, values: np.ndarray) -> np.ndarray:
        if values.shape != self.optimized.shape:
            raise ValueError(
                f"{values.size} federated values, but the replica was built for {self.optimized.size}: "
                "the model's federated tensors changed"
            )
        return values
