"""Several mechanisms, one after the other."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from lightning_fhe.privacy._checks import PrivacyConfigError, check_number, check_positive_int
from lightning_fhe.privacy.base import PrivatizedUpdate, UpdateMechanism, nonzero_fraction

__all__ = ["PrivacyChain"]


class PrivacyChain(UpdateMechanism):
    """Apply ``mechanisms`` in order, each to the previous one's output.

    Order matters. Gaussian then partial sharing adds noise, then sends only the largest noisy components: the
    Gaussian guarantee holds (what follows it is post-processing) and the update is sparse. Partial sharing then
    Gaussian would add noise to the zeros too and send a dense update.

    Accounting is deliberately conservative. A chain's output is a post-processing of each earlier stage's output,
    so its true loss is often that of one stage alone; :meth:`epsilon` reports the basic-composition sum of the
    stages that give a guarantee (None if none does), which always bounds it. The delta is split evenly among the
    stages with an (epsilon, delta) guarantee, so the sum holds at the delta asked for.

    ``clipped_norm`` is the first stage's (the update after its clipping, before any noise); ``shared_fraction``
    is the final output's.

    Example::

        >>> from lightning_fhe.privacy import GaussianMechanism, PartialSharing
        >>> chain = PrivacyChain([GaussianMechanism(clip_norm=1.0, noise_multiplier=1.0), PartialSharing(0.1)])
        >>> chain.epsilon(rounds=10, delta=1e-5) == chain.stages[0].epsilon(rounds=10, delta=1e-5)
        True

    Args:
        mechanisms: the stages, at least one, applied first to last.
    """

    name: ClassVar[str] = "chain"

    def __init__(self, mechanisms: Sequence[UpdateMechanism]) -> None:
        super().__init__()
        if isinstance(mechanisms, UpdateMechanism) or not isinstance(mechanisms, Sequence):
            raise PrivacyConfigError("mechanisms", f"must be a list of mechanisms, got {mechanisms!r}")
        if not mechanisms:
            raise PrivacyConfigError("mechanisms", "must hold at least one mechanism")
        for i, mechanism in enumerate(mechanisms):
            if not isinstance(mechanism, UpdateMechanism):
                raise PrivacyConfigError(f"mechanisms[{i}]", f"must be an UpdateMechanism, got {mechanism!r}")
        self._stages: tuple[UpdateMechanism, ...] = tuple(mechanisms)

    @property
    def stages(self) -> tuple[UpdateMechanism, ...]:
        return self._stages

    @property
    def needs_delta(self) -> bool:  # type: ignore[override]
        return any(stage.needs_delta for stage in self._stages)

    def _privatize(self, delta: np.ndarray, rng: np.random.Generator) -> PrivatizedUpdate:
        current = delta
        first_norm: float | None = None
        for index, stage in enumerate(self._stages):
            update = stage.privatize(current, rng)
            if index == 0:
                first_norm = update.clipped_norm
            current = update.delta
        return PrivatizedUpdate(delta=current, shared_fraction=nonzero_fraction(current), clipped_norm=first_norm)

    def epsilon(self, rounds: int, delta: float) -> float | None:
        rounds = check_positive_int("rounds", rounds, allow_zero=True)
        delta = check_number("delta", delta, ge=0.0, lt=1.0)
        return self._compose(lambda stage, share: stage.epsilon(rounds, share), delta)

    def spent(self, delta: float) -> float | None:
        delta = check_number("delta", delta, ge=0.0, lt=1.0)
        return self._compose(lambda stage, share: stage.spent(share), delta)

    def _compose(self, loss: Callable[[UpdateMechanism, float], float | None], delta: float) -> float | None:
        sharing = sum(1 for stage in self._stages if stage.needs_delta)
        share = delta / sharing if sharing else delta
        losses = [loss(stage, share if stage.needs_delta else delta) for stage in self._stages]
        formal = [value for value in losses if value is not None]
        return float(sum(formal)) if formal else None

    def _accounting_parameter(self) -> None:
        # The chain's own ledger only counts releases; the stages keep the ones that carry privacy loss.
        return None

    def _epsilon_of(self, runs: Sequence[tuple[float | None, int]], delta: float) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["stages"] = [stage.state_dict() for stage in self._stages]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        stages = state.get("stages") if isinstance(state, Mapping) else None
        if not isinstance(stages, Sequence) or len(stages) != len(self._stages):
            found = _stage_names(stages)
            raise ValueError(
                f"checkpoint holds privacy stages {found!r}, this chain has {[s.name for s in self._stages]!r}; "
                "their releases cannot be accounted for under another chain"
            )
        # All or nothing: a checkpoint that fails halfway must not leave some stages restored and others not.
        before = self.state_dict()
        try:
            super().load_state_dict(state)
            for stage, stage_state in zip(self._stages, stages):
                stage.load_state_dict(stage_state)
        except (ValueError, TypeError):
            super().load_state_dict(before)
            for stage, stage_state in zip(self._stages, before["stages"]):
                stage.load_state_dict(stage_state)
            raise

    def _describe(self) -> str:
        return "[" + ", ".join(repr(stage) for stage in self._stages) + "]"


def _stage_names(stages: object) -> object:
    if isinstance(stages, Sequence) and not isinstance(stages, (str, bytes)):
        return [stage.get("mechanism") if isinstance(stage, Mapping) else stage for stage in stages]
    return stages
