"""FedAvg with a server learning rate, and FedAvgM (server momentum)."""

from __future__ import annotations

import numpy as np

from lightning_fhe.strategies.base import Strategy, fraction, positive, zeros_like_once

__all__ = ["FedAvg", "FedAvgM"]


class FedAvg(Strategy):
    """``x += lr * delta``. With ``lr=1`` (the default) the global model is the weighted average itself.

    Example::

        >>> import numpy as np
        >>> FedAvg(lr=0.5).step(np.array([0.0, 1.0]), np.array([1.0, 3.0]))
        array([0.5, 2. ])

    Args:
        lr: the server learning rate; 1.0 is McMahan et al.'s FedAvg.
    """

    name = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = positive("lr", lr)

    @property
    def memoryless(self) -> bool:
        return self.lr == 1.0

    def step(self, reference: np.ndarray, average: np.ndarray) -> np.ndarray:
        if self.lr == 1.0:  # x_g + (x_avg - x_g) can differ from x_avg in the last bit; the average is exact
            self.rounds_applied += 1
            return np.array(average, dtype=np.float64)
        return super().step(reference, average)

    def update(self, delta: np.ndarray) -> np.ndarray:
        return self.lr * delta

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}


class FedAvgM(Strategy):
    """Server momentum (Hsu et al., 2019): ``m = momentum * m + delta; x += lr * m``, with ``m`` starting at 0.

    Example::

        >>> import numpy as np
        >>> strategy = FedAvgM(lr=1.0, momentum=0.5)
        >>> x = strategy.step(np.zeros(1), np.ones(1))      # m = 1
        >>> strategy.step(x, x + 1.0)                        # m = 0.5 * 1 + 1
        array([2.5])

    Args:
        lr: the server learning rate.
        momentum: how much of the last step carries into the next, in [0, 1).
    """

    name = "fedavgm"
    state_names = ("m",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr = positive("lr", lr)
        self.momentum = fraction("momentum", momentum)
        self._m: np.ndarray | None = None

    def update(self, delta: np.ndarray) -> np.ndarray:
        m = zeros_like_once(self._m, delta, "momentum")
        m *= self.momentum
        m += delta
        self._m = m
        return self.lr * m

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}
