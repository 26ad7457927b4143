"""Pairwise masks under HE (collusion resistance): each site masks its first polynomials with keystreams it shares
with every other member, so the masks cancel in the server's sum and one upload alone is noise even to a holder of
the CKKS secret key. :mod:`~lightning_fhe.masking.keys` gets the pairs their seeds, :mod:`~lightning_fhe.masking.masks`
draws and applies the masks."""

from lightning_fhe.masking.keys import (
    Announcement,
    MaskIdentity,
    MaskKeyError,
    announcement_message,
    federation_id,
    verify_announcements,
)
from lightning_fhe.masking.masks import (
    MaskReuseError,
    PairwiseMasks,
    chunk_nonce,
    keystream_mod,
)

__all__ = [
    "Announcement",
    "MaskIdentity",
    "MaskKeyError",
    "MaskReuseError",
    "PairwiseMasks",
    "announcement_message",
    "chunk_nonce",
    "federation_id",
    "keystream_mod",
    "verify_announcements",
]
