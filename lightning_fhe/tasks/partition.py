"""Splitting a labelled dataset among sites: IID, or non-IID by a Dirichlet distribution over labels.

The Dirichlet split is the usual benchmark of non-IID federated learning (Hsu et al., 2019): for every class, the
shares of its samples that go to the sites are drawn from ``Dirichlet(alpha, ..., alpha)``. A large ``alpha``
(100) gives nearly IID sites; ``alpha = 0.3`` gives sites dominated by a few classes each. Pure numpy, seeded, so
every site's process computes the same split and takes its own part.

Example::

    >>> import numpy as np
    >>> labels = np.repeat(np.arange(4), 25)                      # 4 classes of 25 samples
    >>> parts = dirichlet_partition(labels, num_sites=3, alpha=0.3, seed=0)
    >>> sorted(np.concatenate(parts).tolist()) == list(range(100))  # disjoint, and nothing is lost
    True
    >>> [len(p) for p in iid_partition(10, num_sites=3, seed=0)]
    [4, 3, 3]
"""

from __future__ import annotations

import numpy as np

__all__ = ["PartitionError", "dirichlet_partition", "iid_partition"]

_TRIES = 1000


class PartitionError(ValueError):
    """A split that cannot be made as asked."""


def _check_sites(num_sites: int, num_samples: int) -> None:
    if not isinstance(num_sites, int) or num_sites < 1:
        raise PartitionError(f"num_sites must be a positive integer, got {num_sites!r}")
    if num_samples < num_sites:
        raise PartitionError(f"{num_samples} samples cannot be split among {num_sites} sites")


def iid_partition(num_samples: int, num_sites: int, seed: int = 0) -> list[np.ndarray]:
    """Sample indices shuffled and dealt into ``num_sites`` parts whose sizes differ by at most one."""
    _check_sites(num_sites, num_samples)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def dirichlet_partition(
    labels: np.ndarray, num_sites: int, alpha: float, seed: int = 0, min_samples: int = 1
) -> list[np.ndarray]:
    """Sample indices per site, each class's samples shared out by proportions drawn from ``Dirichlet(alpha)``.

    Draws again (up to 1000 times, seeded) until every site holds at least ``min_samples`` samples.

    Raises:
        PartitionError: bad arguments, or no draw gave every site ``min_samples`` (lower it, or raise alpha).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be one label per sample (1-D), got shape {labels.shape}")
    _check_sites(num_sites, labels.size)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise PartitionError(f"alpha must be a positive number, got {alpha!r}")
    if min_samples * num_sites > labels.size:
        raise PartitionError(f"{labels.size} samples cannot give each of {num_sites} sites {min_samples}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_sites, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(int)
            for site, piece in enumerate(np.split(members, cuts)):
                parts[site].append(piece)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(map(len, merged)) >= min_samples:
            return merged
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) split in {_TRIES} draws gave each of {num_sites} sites {min_samples} samples; "
        "raise alpha, lower min_samples, or use more samples"
    )
