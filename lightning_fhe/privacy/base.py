"""The interface every update mechanism implements, and what it returns.

A site's update is the flat difference ``delta = local_weights - global_weights``. A mechanism turns it into the
delta the site actually sends (as ``global + privatized.delta``, encrypted as before). Because every site starts a
round from the same global weights, the server's average is ``global + average(privatized deltas)``; a component a
mechanism sends as zero leaves the site's vote for the previous global value there.

Mechanisms are small classes behind one interface, as Flower's strategies are, and are pure: numpy in, numpy out,
randomness only from the ``numpy.random.Generator`` the caller passes, so a seeded run is reproducible.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from lightning_fhe.privacy._checks import as_update_vector, check_number, check_positive_int

__all__ = ["PrivatizedUpdate", "UpdateMechanism"]

# (accounting parameter, releases) runs, oldest first; see UpdateMechanism.state_dict.
Ledger = list[tuple[float | None, int]]


@dataclass(frozen=True, eq=False)
class PrivatizedUpdate:
    """What a mechanism made of one update.

    Attributes:
        delta: what to add to the global weights before encrypting. Read-only, so that an update kept for a retry
            is re-sent exactly: privatizing the same data again with fresh noise would be a second release.
        shared_fraction: fraction of components whose delta is nonzero (about 1.0 after Gaussian noise; 0.0 for an
            empty vector), for logs and for checking a sparsity setting does what was meant.
        clipped_norm: L2 norm of what the mechanism would have sent without its noise (after clipping and
            selection), for logs; watching it against the clip bound tells whether the bound is too tight.
    """

    delta: np.ndarray
    shared_fraction: float
    clipped_norm: float | None

    def __post_init__(self) -> None:
        if not isinstance(self.delta, np.ndarray) or self.delta.ndim != 1 or self.delta.dtype != np.float64:
            raise TypeError("PrivatizedUpdate.delta must be a 1-D float64 numpy array")
        if not 0.0 <= self.shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction must be in [0, 1], got {self.shared_fraction}")
        self.delta.flags.writeable = False


def nonzero_fraction(vector: np.ndarray) -> float:
    return float(np.count_nonzero(vector)) / vector.size if vector.size else 0.0


class UpdateMechanism(ABC):
    """A way of privatizing one site's update before it is encrypted.

    Subclasses implement :meth:`_privatize` (the maths) and :meth:`_epsilon_of` (the accounting); this class
    checks the input, keeps the ledger of releases, and gives both a public face.

    Every call to :meth:`privatize` counts as one release of this site's data, because the caller may send it: on
    a retry, send the same :class:`PrivatizedUpdate` again instead of privatizing the same update twice.
    """

    #: Short name used in configs, logs and checkpoints ("gaussian", "partial", ...).
    name: ClassVar[str]

    #: Whether the guarantee is (epsilon, delta) rather than pure epsilon, so that a chain knows which of its
    #: stages need a share of delta.
    needs_delta: ClassVar[bool] = False

    def __init__(self) -> None:
        self._ledger: Ledger = []

    # -- releasing -------------------------------------------------------------------------------------------

    def privatize(self, delta: np.ndarray, rng: np.random.Generator) -> PrivatizedUpdate:
        """Privatize one update (``local - global`` as a flat vector) and record the release.

        Raises:
            ValueError: ``delta`` is not a flat real vector, or holds NaN/inf (the message names the index).
            TypeError: ``rng`` is not a ``numpy.random.Generator``.
        """
        if not isinstance(rng, np.random.Generator):
            # Generator only: the legacy RandomState draws differently and is often the global one other code shares.
            raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng)}")
        vector = as_update_vector(delta)
        update = self._privatize(vector, rng)
        self._record_release()
        return update

    @abstractmethod
    def _privatize(self, delta: np.ndarray, rng: np.random.Generator) -> PrivatizedUpdate:
        """The mechanism itself, on a checked finite float64 vector that it must not modify."""

    # -- accounting ------------------------------------------------------------------------------------------

    def epsilon(self, rounds: int, delta: float) -> float | None:
        """Cumulative privacy loss epsilon after ``rounds`` releases by this site with the current settings, at
        failure probability ``delta``; None when the mechanism gives no formal guarantee.

        What the guarantee is about (which neighbouring inputs) is stated by each mechanism.
        """
        rounds = check_positive_int("rounds", rounds, allow_zero=True)
        delta = check_number("delta", delta, ge=0.0, lt=1.0)
        if rounds == 0:
            return None if self._accounting_parameter() is None else 0.0
        return self._epsilon_of([(self._accounting_parameter(), rounds)], delta)

    def spent(self, delta: float) -> float | None:
        """Privacy loss of the releases actually made so far (including those restored from a checkpoint, under
        the settings they were made with); None when the mechanism gives no formal guarantee."""
        delta = check_number("delta", delta, ge=0.0, lt=1.0)
        if self._accounting_parameter() is None:
            return None
        runs = [(param, count) for param, count in self._ledger if count > 0]
        if not runs:
            return 0.0
        return self._epsilon_of(runs, delta)

    @property
    def rounds_released(self) -> int:
        """How many updates this mechanism has privatized, checkpoints included."""
        return sum(count for _, count in self._ledger)

    @abstractmethod
    def _accounting_parameter(self) -> float | None:
        """The one number the privacy loss of a release depends on (the noise multiplier, the per-round epsilon),
        or None for a mechanism without a formal guarantee. Releases are ledgered under it, so a run resumed with
        different settings is still accounted correctly."""

    @abstractmethod
    def _epsilon_of(self, runs: Sequence[tuple[float | None, int]], delta: float) -> float | None:
        """Privacy loss of ``runs`` (accounting parameter, releases) composed, at ``delta``."""

    def _record_release(self) -> None:
        parameter = self._accounting_parameter()
        if self._ledger and self._ledger[-1][0] == parameter:
            self._ledger[-1] = (parameter, self._ledger[-1][1] + 1)
        else:
            self._ledger.append((parameter, 1))

    # -- checkpoints -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What must survive a checkpoint: the ledger of releases, as plain Python (YAML/torch.save friendly).

        Settings themselves come from the config on resume; only the accounting of what was already released
        cannot be rebuilt from it.
        """
        return {"mechanism": self.name, "ledger": [[param, count] for param, count in self._ledger]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the ledger from :meth:`state_dict`. Refuses a checkpoint of another mechanism, whose releases
        this one could not account for."""
        if not isinstance(state, Mapping) or state.get("mechanism") != self.name:
            found = state.get("mechanism") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"checkpoint holds privacy state of {found!r}, not {self.name!r}")
        ledger = _read_ledger(state.get("ledger"))
        if self._accounting_parameter() is not None and any(param is None for param, _ in ledger):
            raise ValueError(f"checkpoint privacy ledger of {self.name!r} has releases without their parameter")
        self._ledger = ledger

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return ""


def _read_ledger(raw: object) -> Ledger:
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ValueError(f"checkpoint privacy ledger must be a list, got {raw!r}")
    ledger: Ledger = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)) or len(entry) != 2:
            raise ValueError(f"checkpoint privacy ledger[{i}] must be [parameter, releases], got {entry!r}")
        param, count = entry
        if param is not None:
            param = check_number(f"ledger[{i}][0]", param, gt=0.0)
        count = check_positive_int(f"ledger[{i}][1]", count, allow_zero=True)
        ledger.append((param, count))
    return ledger
