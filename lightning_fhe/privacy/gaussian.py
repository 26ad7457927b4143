"""The Gaussian mechanism on a whole update: clip its L2 norm, add isotropic Gaussian noise."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import numpy as np

from lightning_fhe.privacy._checks import PrivacyConfigError, check_number, check_positive_int, clip_by_l2_norm
from lightning_fhe.privacy.base import PrivatizedUpdate, UpdateMechanism, nonzero_fraction

__all__ = ["ACCOUNTANTS", "GaussianMechanism"]

#: Opacus accountants that may account this mechanism. "rdp" (Renyi DP, the default, what Opacus and most papers
#: report) is a valid upper bound; "prv" (privacy random variables) is tighter, within Opacus's 0.01 error.
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

# Every round, every site releases: no subsampling, so no amplification. Naming it keeps the accountant calls honest.
_SAMPLE_RATE = 1.0


class GaussianMechanism(UpdateMechanism):
    """Clip the update to L2 norm ``clip_norm`` (C), then add ``N(0, (noise_multiplier * C)^2)`` to every component.

    This is the mechanism of DP-FedAvg (McMahan et al., 2018) with the noise added by the site itself. Its guarantee:
    after ``r`` rounds, whoever sees what the site sent (the other sites, who decrypt the global model, and anyone
    who gets the final model) cannot tell the site's real updates from updates that differ from them by at most C
    in L2 norm, in particular from the site sending no change at all, beyond (epsilon, delta) as returned by
    :meth:`epsilon`. This is the add/remove neighbouring relation of site-level DP, and protects every patient of
    the site at once. For the "replace" relation (any dataset of the site against any other), two clipped updates
    can be 2C apart: account with ``noise_multiplier / 2``.

    Accounting is Opacus's, with ``sample_rate=1.0`` (the site takes part in every round) and one step per round.

    Example::

        >>> import numpy as np
        >>> mechanism = GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0)
        >>> update = mechanism.privatize(np.full(4, 10.0), np.random.default_rng(0))
        >>> update.clipped_norm
        1.0
        >>> round(mechanism.epsilon(rounds=10, delta=1e-5), 2)
        19.05

    Args:
        clip_norm: C, the L2 bound on the update, in the units of the weights. An update longer than C is scaled
            down to C (its direction kept). Too small and every update is shrunk (slow convergence); too large and
            the noise, proportional to C, drowns it. Watch ``clipped_norm`` in the logs.
        noise_multiplier: sigma, the noise standard deviation in units of C. Give this or ``target_epsilon``.
        target_epsilon: the epsilon the site may spend over ``rounds`` rounds; sigma is then the smallest Opacus
            finds that stays within it (its binary search stops within 0.01 below the target).
        target_delta: the delta that goes with ``target_epsilon``. Keep it below 1 / (number of patients).
        rounds: how many rounds ``target_epsilon`` must last. Required with ``target_epsilon``, refused without it.
        accountant: the Opacus accountant, ``"rdp"`` or ``"prv"`` (see :data:`ACCOUNTANTS`). Opacus's ``"gdp"`` is
            refused: it is a central-limit approximation for subsampled training, marked experimental, and can
            underestimate epsilon.
    """

    name: ClassVar[str] = "gaussian"
    needs_delta: ClassVar[bool] = True

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float | None = None,
        *,
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,
        rounds: int | None = None,
        accountant: str = "rdp",
    ) -> None:
        super().__init__()
        self._clip_norm = check_number("clip_norm", clip_norm, gt=0.0)
        self._target_delta = check_number("target_delta", target_delta, gt=0.0, lt=1.0)
        if accountant == "gdp":
            raise PrivacyConfigError(
                "accountant", "'gdp' is refused: Opacus marks it experimental and it can underestimate epsilon; "
                f"use one of {', '.join(ACCOUNTANTS)}"
            )
        if accountant not in ACCOUNTANTS:
            raise PrivacyConfigError("accountant", f"must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
        self._accountant = accountant

        if (noise_multiplier is None) == (target_epsilon is None):
            raise PrivacyConfigError(
                "noise_multiplier",
                "give exactly one of noise_multiplier (sigma itself) or target_epsilon (sigma derived from a budget)",
            )
        self._target_epsilon: float | None = None
        self._rounds: int | None = None
        if noise_multiplier is not None:
            if rounds is not None:
                raise PrivacyConfigError("rounds", "only used with target_epsilon; noise_multiplier fixes sigma itself")
            self._noise_multiplier = check_number("noise_multiplier", noise_multiplier, gt=0.0)
        else:
            self._target_epsilon = check_number("target_epsilon", target_epsilon, gt=0.0)
            if rounds is None:
                raise PrivacyConfigError("rounds", "required with target_epsilon: the number of rounds it must last")
            self._rounds = check_positive_int("rounds", rounds)
            self._noise_multiplier = self._sigma_for_budget()

    @property
    def clip_norm(self) -> float:
        return self._clip_norm

    @property
    def noise_multiplier(self) -> float:
        """sigma: given, or derived from ``target_epsilon`` at construction."""
        return self._noise_multiplier

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise on each component: sigma * C."""
        return self._noise_multiplier * self._clip_norm

    @property
    def target_epsilon(self) -> float | None:
        return self._target_epsilon

    @property
    def target_delta(self) -> float:
        return self._target_delta

    @property
    def rounds(self) -> int | None:
        return self._rounds

    @property
    def accountant(self) -> str:
        return self._accountant

    def _sigma_for_budget(self) -> float:
        from opacus.accountants.utils import get_noise_multiplier

        assert self._target_epsilon is not None and self._rounds is not None
        try:
            # The search probes sigmas up to 1e6, where Opacus warns that its alphas are too few; that is about the
            # probe, not the sigma returned.
            with _quiet_accountant(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                sigma = get_noise_multiplier(
                    target_epsilon=self._target_epsilon,
                    target_delta=self._target_delta,
                    sample_rate=_SAMPLE_RATE,
                    steps=self._rounds,
                    accountant=self._accountant,
                )
        except ValueError as error:  # Opacus gives up beyond sigma = 1e6 with "The privacy budget is too low."
            raise PrivacyConfigError(
                "target_epsilon",
                f"{self._target_epsilon:g} cannot be met over {self._rounds} rounds at delta {self._target_delta:g} "
                f"with any noise multiplier up to 1e6 ({error})",
            ) from error
        return float(sigma)

    def _privatize(self, delta: np.ndarray, rng: np.random.Generator) -> PrivatizedUpdate:
        clipped, norm = clip_by_l2_norm(delta, self._clip_norm)
        noisy = clipped + rng.normal(0.0, self.noise_std, size=delta.size)
        return PrivatizedUpdate(delta=noisy, shared_fraction=nonzero_fraction(noisy), clipped_norm=norm)

    def _accounting_parameter(self) -> float:
        return self._noise_multiplier

    def _epsilon_of(self, runs: Sequence[tuple[float | None, int]], delta: float) -> float:
        if delta <= 0.0:
            raise PrivacyConfigError("delta", "must be > 0: the Gaussian mechanism has no pure (delta = 0) guarantee")
        from opacus.accountants import create_accountant

        accountant = create_accountant(mechanism=self._accountant)
        # Opacus's own format; setting it directly is what its get_noise_multiplier does too.
        accountant.history = [(float(sigma), _SAMPLE_RATE, int(count)) for sigma, count in runs if sigma is not None]
        with _quiet_accountant():
            return float(accountant.get_epsilon(delta=delta))

    def _describe(self) -> str:
        budget = (
            f", target_epsilon={self._target_epsilon:g}, target_delta={self._target_delta:g}, rounds={self._rounds}"
            if self._target_epsilon is not None
            else ""
        )
        return (
            f"clip_norm={self._clip_norm:g}, noise_multiplier={self._noise_multiplier:g}{budget}, "
            f"accountant={self._accountant!r}"
        )


@contextmanager
def _quiet_accountant() -> Iterator[None]:
    # At sample_rate 1.0 the PRV accountant evaluates log(1 - q) = log(0) on a branch it then discards; numpy's
    # divide-by-zero warning is noise, not a problem with the result.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
