"""``he.key = sites``: the rules by which the server relays the CKKS key the sites make, which it cannot open.

The first member in name order makes the key and shares it once, sealed for every other member; each of them
fetches its own copy; a member that announces another key fingerprint than the shared one is refused. Pure logic:
the federation locks, waits and writes ``state_dir`` around it.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_fhe.masking.announcement import Announcement
from lightning_fhe.proto.sealed_keys import SealedKeyShare, key_sharer
from lightning_fhe.server.errors import Reason, Refusal, Status


class KeyRelay:
    """The sealed copies the key's maker shared (``share``), or None until it has."""

    def __init__(self, share: SealedKeyShare | None = None) -> None:
        self.share = share

    @staticmethod
    def fits(share: SealedKeyShare, members: Sequence[str]) -> bool:
        """Whether ``share`` is what a federation of ``members`` takes: from the first in name order, one sealed
        copy for every other member."""
        sharer = key_sharer(members)
        return share.sender == sharer and set(share.keys) == set(members) - {sharer}

    @staticmethod
    def check_sharer(site: str, members: Sequence[str]) -> None:
        """Refuses ``site`` unless it is the first member in name order, the one that makes the key."""
        sharer = key_sharer(members)
        if site != sharer:
            raise Refusal(
                Status.PERMISSION_DENIED,
                Reason.NOT_SHARER,
                f"site {site!r} may not share the CKKS key: {sharer!r}, the first member in name order, makes it",
            )

    def accept(self, site: str, share: SealedKeyShare, members: Sequence[str]) -> bool:
        """Checks a share from ``site``: True if it is to be stored, False if the same key was shared before (the
        first copies stay). Another key is refused (ALREADY_EXISTS): members that fetched the first would hold a
        different key than the others."""
        self.check_sharer(site, members)
        if self.share is not None:
            if self.share.same_key(share):
                return False
            raise Refusal(
                Status.ALREADY_EXISTS,
                Reason.DUPLICATE,
                f"the CKKS key was already shared (key fingerprint {self.share.key_fingerprint}); {site!r} sends "
                f"another ({share.key_fingerprint}): members that fetched the first would hold a different key",
            )
        if share.sender != site or not self.fits(share, members):
            raise Refusal(
                Status.INVALID_ARGUMENT,
                Reason.BAD_REQUEST,
                f"the sealed keys must come from {site!r} for every other member ({', '.join(members)})",
            )
        return True

    def copy_for(self, site: str, members: Sequence[str]) -> bytes | None:
        """``site``'s sealed copy, or None while the key's maker has not shared it."""
        sharer = key_sharer(members)
        if site == sharer:
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.BAD_REQUEST,
                f"site {site!r} is the first member in name order: it makes the CKKS key, and has no copy to fetch",
            )
        if self.share is None:
            return None
        if site not in self.share.keys:  # every member but the sharer gets one: a damaged state_dir
            raise Refusal(Status.NOT_FOUND, Reason.BAD_REQUEST, f"no sealed key for {site!r} is stored")
        return self.share.keys[site]

    def pending(self, members: Sequence[str]) -> Refusal:
        return Refusal(
            Status.NOT_FOUND,
            Reason.KEY_PENDING,
            f"{key_sharer(members)!r}, the first member in name order, has not shared the CKKS key yet; ask again",
        )

    def check_fingerprint(self, site: str, key: Announcement | None) -> None:
        """Refuses a member that announces another CKKS key than the one the sites made."""
        shared = self.share
        if shared is None or key is None or not key.key_fingerprint or key.key_fingerprint == shared.key_fingerprint:
            return
        raise Refusal(
            Status.FAILED_PRECONDITION,
            Reason.MISMATCH,
            f"site {site!r} holds another CKKS key (key fingerprint {key.key_fingerprint}) than the one "
            f"{shared.sender!r} made for the federation ({shared.key_fingerprint}): its he_context.tenseal and "
            "site.yaml were replaced; restore the site's kit folder from a backup",
        )
