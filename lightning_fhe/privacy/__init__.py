"""Differential privacy and partial sharing for a site's update, applied before it is encrypted.

HE hides each site's update from the server, but the global model that every site decrypts, and the final model
that is released, can still remember patients. The mechanisms here change what a site sends so that they cannot,
or not as much: see ``docs/privacy.md`` for what each one protects against and what it costs.

They are pure: a flat float64 ``delta = local - global`` and a ``numpy.random.Generator`` in, a
:class:`PrivatizedUpdate` out; no torch, Lightning or networking (Opacus, for the Gaussian accounting, is imported
only when an epsilon is computed). The site then sends ``global + update.delta``, encrypted as before.

Example::

    >>> import numpy as np
    >>> from lightning_fhe.privacy import mechanism_from_config
    >>> mechanism = mechanism_from_config([{"gaussian": {"clip_norm": 1.0, "noise_multiplier": 1.0}},
    ...                                     {"partial": {"fraction": 0.1}}])
    >>> update = mechanism.privatize(np.ones(100), np.random.default_rng(0))
    >>> update.shared_fraction, update.clipped_norm
    (0.1, 1.0)
"""

from lightning_fhe.privacy._checks import PrivacyConfigError, clip_by_l2_norm, share_count
from lightning_fhe.privacy.base import PrivatizedUpdate, UpdateMechanism
from lightning_fhe.privacy.chain import PrivacyChain
from lightning_fhe.privacy.config import MECHANISMS, mechanism_from_config
from lightning_fhe.privacy.gaussian import ACCOUNTANTS, GaussianMechanism
from lightning_fhe.privacy.partial import PartialSharing
from lightning_fhe.privacy.svt import SparseVectorTechnique, SvtBudget

__all__ = [
    "ACCOUNTANTS",
    "MECHANISMS",
    "GaussianMechanism",
    "PartialSharing",
    "PrivacyChain",
    "PrivacyConfigError",
    "PrivatizedUpdate",
    "SparseVectorTechnique",
    "SvtBudget",
    "UpdateMechanism",
    "clip_by_l2_norm",
    "mechanism_from_config",
    "share_count",
]
