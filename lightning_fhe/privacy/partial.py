"""Partial model sharing: send only the largest components of the update."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from lightning_fhe.privacy._checks import check_fraction, l2_norm, share_count
from lightning_fhe.privacy.base import PrivatizedUpdate, UpdateMechanism, nonzero_fraction

__all__ = ["PartialSharing", "top_magnitudes"]


class PartialSharing(UpdateMechanism):
    """Keep the ``fraction`` of components with the largest ``|delta|``; send the rest as zero.

    Sharing less of the update reveals less of it, and Li et al. (2019) found models still train with a small
    fraction shared. It is **not** differential privacy: the components that are shared are exact, and which ones
    are shared depends on the data without any noise, so :meth:`epsilon` is None. Combine it with the Gaussian
    mechanism (Gaussian first, then this: noise then sparsify, which keeps the Gaussian guarantee) or use the
    sparse vector technique for a formal guarantee.

    How many: ``max(1, floor(fraction * n))`` of ``n`` components (see
    :func:`lightning_fhe.privacy.share_count`), at least one so that a small vector still contributes. Ties in
    ``|delta|`` at the cut are broken by position, lower index first, so the choice is deterministic. Components
    that are themselves zero stay zero, so fewer than that many may be nonzero. No randomness is used.

    Example::

        >>> import numpy as np
        >>> PartialSharing(fraction=0.5).privatize(np.array([0.1, -3.0, 2.0, 0.0]), np.random.default_rng(0)).delta
        array([ 0., -3.,  2.,  0.])

    Args:
        fraction: the cap on the fraction of components shared, in (0, 1]. Smaller reveals less and slows
            convergence: unshared components keep the global value, so this site's progress there waits a round.
    """

    name: ClassVar[str] = "partial"

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self._fraction = check_fraction("fraction", fraction)

    @property
    def fraction(self) -> float:
        return self._fraction

    def _privatize(self, delta: np.ndarray, rng: np.random.Generator) -> PrivatizedUpdate:
        count = share_count(self._fraction, delta.size)
        shared = np.zeros_like(delta)
        if count:
            keep = top_magnitudes(delta, count)
            shared[keep] = delta[keep]
        return PrivatizedUpdate(delta=shared, shared_fraction=nonzero_fraction(shared), clipped_norm=l2_norm(shared))

    def _accounting_parameter(self) -> None:
        return None

    def _epsilon_of(self, runs: Sequence[tuple[float | None, int]], delta: float) -> None:
        return None

    def _describe(self) -> str:
        return f"fraction={self._fraction:g}"


def top_magnitudes(vector: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest ``|vector|`` entries, ties at the cut going to the lower index.

    Linear time (a partition, not a sort: models have millions of components), and deterministic, which
    ``argpartition`` alone is not about ties.
    """
    size = vector.size
    if count >= size:
        return np.arange(size)
    if count <= 0:
        return np.empty(0, dtype=np.intp)
    magnitudes = np.abs(vector)
    cut = np.partition(magnitudes, size - count)[size - count]
    above = np.flatnonzero(magnitudes > cut)
    ties = np.flatnonzero(magnitudes == cut)[: count - above.size]
    return np.concatenate([above, ties])
