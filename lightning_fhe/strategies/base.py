"""The interface every federated strategy implements: one server optimizer step on the global model.

A keyless aggregator can only add ciphertexts, so it cannot run an optimizer on the average. Every site, though,
decrypts the same average and starts each round from the same global model; if every site runs the same step on
the same numbers, every site reaches the same next global model. That step is a :class:`Strategy`: pure numpy
float64 elementwise arithmetic (never a device kernel, never a reduction whose order could vary), so the bits
agree on every machine.

Terms, per federated floating parameter (Reddi et al., "Adaptive Federated Optimization", ICLR 2021):

- ``x_g(r-1)``: the global model round ``r`` started from (the *reference*);
- ``x_avg(r)``: the weighted average of the sites' models that the server's sum decrypts to;
- ``delta = x_avg(r) - x_g(r-1)``: the pseudo-gradient (minus), which each strategy turns into a step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

__all__ = ["Strategy", "StrategyConfigError"]


class StrategyConfigError(ValueError):
    """A strategy's arguments, or its YAML block, cannot be used. ``key`` is the dotted place of the fault."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class Strategy(ABC):
    """One server optimizer step, run identically at every site after decryption.

    Subclasses implement :meth:`update` (the change to apply, from ``delta``) and keep any state they need in
    float64 arrays, saved by :meth:`state_dict` so that a resumed site continues bit for bit. State arrays start
    at zero on the first call; their size is then fixed.

    Example::

        >>> import numpy as np
        >>> class HalfStep(Strategy):
        ...     name = "half_step"
        ...     def update(self, delta):
        ...         return 0.5 * delta
        >>> HalfStep().step(np.array([1.0, 2.0]), np.array([3.0, 2.0]))
        array([2., 2.])
    """

    #: The key that names the strategy in YAML (``strategy: {fedadam: {lr: 0.05}}``).
    name: ClassVar[str] = ""
    #: The state arrays, each kept as attribute ``_<name>`` (None until the first step creates it).
    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.rounds_applied = 0  # steps taken: a resumed site checks it against the round it resumes from

    @property
    def memoryless(self) -> bool:
        """True when the next global model is the decrypted average itself (plain FedAvg): then a site needs no
        saved state to rejoin, the server's aggregate is the global model."""
        return False

    @abstractmethod
    def update(self, delta: np.ndarray) -> np.ndarray:
        """The change to add to the reference, from ``delta = x_avg - x_g`` (float64, one entry per value)."""

    def step(self, reference: np.ndarray, average: np.ndarray) -> np.ndarray:
        """The next global values from the round's reference ``x_g(r-1)`` and decrypted average ``x_avg(r)``."""
        reference = np.asarray(reference, dtype=np.float64)
        average = np.asarray(average, dtype=np.float64)
        if reference.shape != average.shape:
            raise ValueError(f"reference has shape {reference.shape}, average {average.shape}: they must match")
        change = self.update(average - reference)
        self.rounds_applied += 1
        return reference + change

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue exactly: the step count and the state arrays."""
        arrays = {name: getattr(self, f"_{name}", None) for name in self.state_names}
        return {"rounds_applied": self.rounds_applied, **{k: v.copy() for k, v in arrays.items() if v is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_applied = int(state["rounds_applied"])
        for name in self.state_names:
            value = state.get(name)
            setattr(self, f"_{name}", None if value is None else np.array(value, dtype=np.float64))

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    def hyperparameters(self) -> dict[str, float]:
        """The constructor's arguments, for logs and results."""
        return {}


def positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise StrategyConfigError(key, f"must be a positive number, got {value!r}")
    return float(value)


def fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise StrategyConfigError(key, f"must be a number in [0, 1), got {value!r}")
    return float(value)


def zeros_like_once(current: np.ndarray | None, delta: np.ndarray, what: str) -> np.ndarray:
    """The state array ``current``, created at zero on the first round; a later size change is an error."""
    if current is None:
        return np.zeros_like(delta)
    if current.shape != delta.shape:
        raise ValueError(
            f"the strategy's {what} holds {current.size} values but this round's update has {delta.size}: "
            "the model changed shape since the state was saved"
        )
    return current
