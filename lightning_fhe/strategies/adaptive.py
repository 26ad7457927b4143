"""The adaptive server optimizers of Reddi et al. (ICLR 2021): FedAdam, FedYogi and FedAdagrad.

All three keep a first moment ``m = beta1 * m + (1 - beta1) * delta`` and step ``x += lr * m / (sqrt(v) + tau)``;
they differ in the second moment ``v``:

- FedAdam: ``v = beta2 * v + (1 - beta2) * delta^2``;
- FedYogi: ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``, which grows ``v`` additively, not by decay;
- FedAdagrad: ``v = v + delta^2``.

``m`` and ``v`` start at 0 and are not bias-corrected, as in the paper's Algorithm 2. ``tau`` bounds the step
where ``v`` is tiny: FedAdam's first step is ``lr * 0.1 * d / (0.1 * |d| + tau)`` for a first delta ``d``, about
``lr * sign(d)`` where ``|d|`` is well above ``10 * tau`` and ``lr * 100 * d`` (with ``tau=1e-3``) where it is well
below.
"""

from __future__ import annotations

import numpy as np

from lightning_fhe.strategies.base import Strategy, fraction, positive, zeros_like_once

__all__ = ["FedAdagrad", "FedAdam", "FedYogi"]


class _Adaptive(Strategy):
    state_names = ("m", "v")

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__()
        self.lr = positive("lr", lr)
        self.beta1 = fraction("beta1", beta1)
        self.beta2 = fraction("beta2", beta2)
        self.tau = positive("tau", tau)
        self._m: np.ndarray | None = None
        self._v: np.ndarray | None = None

    def update(self, delta: np.ndarray) -> np.ndarray:
        m = zeros_like_once(self._m, delta, "first moment m")
        v = zeros_like_once(self._v, delta, "second moment v")
        m *= self.beta1
        m += (1.0 - self.beta1) * delta
        self._m = m
        self._v = self._second_moment(v, delta * delta)
        return self.lr * m / (np.sqrt(self._v) + self.tau)

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}


class FedAdam(_Adaptive):
    """Adam on the server: ``v = beta2 * v + (1 - beta2) * delta^2``.

    Example::

        >>> import numpy as np
        >>> strategy = FedAdam(lr=0.1, tau=1e-3)
        >>> strategy.step(np.zeros(2), np.array([0.01, -0.02])).round(6)   # lr * 0.1 d / (0.1 |d| + tau)
        array([ 0.05    , -0.066667])

    Args:
        lr: the server learning rate (Reddi et al. search 10^-3 .. 1; 10^-2 .. 10^-1 is a common start).
        beta1: decay of the first moment.
        beta2: decay of the second moment.
        tau: adaptivity: added to ``sqrt(v)``; larger is closer to momentum SGD.
    """

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        v *= self.beta2
        v += (1.0 - self.beta2) * squared
        return v


class FedYogi(_Adaptive):
    """Yogi on the server: ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``: ``v`` moves towards ``delta^2``
    by a step proportional to ``delta^2``, so it forgets large past updates more slowly than Adam.

    Example::

        >>> import numpy as np
        >>> FedYogi(lr=0.1).step(np.zeros(1), np.array([0.01])).round(6)
        array([0.05])

    Args: as :class:`FedAdam`.
    """

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        v -= (1.0 - self.beta2) * squared * np.sign(v - squared)
        return v


class FedAdagrad(_Adaptive):
    """Adagrad on the server: ``v = v + delta^2`` (``beta2`` is not used).

    Example::

        >>> import numpy as np
        >>> FedAdagrad(lr=0.1).step(np.zeros(1), np.array([0.01])).round(6)
        array([0.009091])

    Args: as :class:`FedAdam`, without ``beta2``.
    """

    name = "fedadagrad"

    def __init__(self, lr: float, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(lr, beta1=beta1, tau=tau)

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        v += squared
        return v

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "tau": self.tau}
