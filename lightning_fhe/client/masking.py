"""A site's side of pairwise masking: its signed key at join, the other members' keys checked, and the masks of
each attempt it uploads to (:mod:`lightning_fhe.masking`).

Everything the server says is checked against what the site holds itself: the members' keys against the CA in the
site's kit (a server that substitutes a key is caught before anything is uploaded), and an attempt's members
against ``min_clients`` from the kit, not from the server.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence

import grpc

from lightning_fhe.client.errors import FederationError, RoundClosedError
from lightning_fhe.client.upload import ChunkMask
from lightning_fhe.he.seeded import CiphertextLayout
from lightning_fhe.masking.announcement import Announcement
from lightning_fhe.masking.keys import MaskIdentity, MaskKeyError, federation_id, verify_announcements
from lightning_fhe.masking.masks import PairwiseMasks
from lightning_fhe.proto.reasons import Reason
from lightning_fhe.provision.kits import SiteKit

logger = logging.getLogger("lightning_fhe.client")

MASKED_LOG = "masked_attempts.json"  # in the federation's folder: the newest attempt this site masked


class SiteMasking:
    """Args:
    kit: the site's kit; its folder keeps the site's X25519 key (``masking/<instance>/mask_x25519.key``, 0600).
    site: the site's name (its certificate's).
    required: take part only in a masked federation.
    min_clients: the fewest members an attempt may have for this site to upload to it.
    instance: the federation's random id, from the server: the key and the record of masked attempts are kept per
        federation (``<kit>/masking/<instance>/``), so that federations run with the same kits never share masks.
    """

    def __init__(self, kit: SiteKit, site: str, required: bool, min_clients: int, instance: str) -> None:
        if not re.fullmatch(r"[0-9a-f]{32}", instance):
            raise FederationError(f"the server names its federation {instance[:40]!r}; expected 32 hex digits")
        self.kit = kit
        self.site = site
        self.required = required
        self.min_clients = min_clients
        self.instance = instance
        self.federation_id = federation_id(kit.ca_cert, kit.he_fingerprint, instance)
        self.folder = kit.path / "masking" / instance
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._identity = MaskIdentity.load_or_create(self.folder)
        self.seeds: dict[str, bytes] = {}  # peer -> pair seed, once accepted: this site's pairwise secrets
        self._masks: PairwiseMasks | None = None
        self._members: tuple[str, ...] = ()
        self._masked_here: set[tuple[int, int, tuple[str, ...]]] = set()  # by this process

    @property
    def active(self) -> bool:
        """Whether the federation this site joined masks its updates."""
        return self._masks is not None

    def announcement(self, key_fingerprint: str = "") -> Announcement:
        return self._identity.announce(self.site, self.kit.cert, self.kit.key, self.federation_id, key_fingerprint)

    def accept(self, members: Sequence[str], masked: bool, keys: Sequence[Announcement]) -> None:
        """Checks the server's answer to the join and derives the pairwise seeds.

        Raises:
            FederationError: a key that is not the member's own (the server may have substituted it), or an
                unmasked federation where this site requires masking.
        """
        if not masked:
            if self.required:
                raise FederationError(
                    "this site requires masking, but the federation formed unmasked: a member joined without a mask "
                    "key (masking=False there), or it has fewer than 3 members and none requires masking",
                    grpc.StatusCode.FAILED_PRECONDITION,
                    Reason.MISMATCH,
                )
            self._masks = None
            return
        try:
            public = verify_announcements(keys, self.kit.ca_cert, members, self.federation_id)
        except MaskKeyError as err:
            raise FederationError(
                f"refusing to upload: {err}", grpc.StatusCode.PERMISSION_DENIED, Reason.MISMATCH
            ) from None
        if public.get(self.site) != self._identity.public_key:
            raise FederationError(
                f"refusing to upload: the server relays another mask key for this site ({self.site}) than its own; "
                "it may be substituting keys",
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.MISMATCH,
            )
        peers = {site: key for site, key in public.items() if site != self.site}
        self.seeds = self._identity.pair_seeds(self.site, peers, self.federation_id)
        layout = CiphertextLayout(self.kit.he_context)
        self._masks = PairwiseMasks(self.site, self.seeds, layout.q0, layout.n)
        self._members = tuple(members)

    def mask_for(self, round_number: int, attempt: int, members: Sequence[str]) -> ChunkMask:
        """The masks of one attempt, after checking it is one this site may upload to.

        Raises:
            FederationError: the attempt has fewer members than this site's ``min_clients``, does not include this
                site, or names a site that is not a member.
        """
        assert self._masks is not None
        members = tuple(members)
        strangers = [m for m in members if m not in self._members]
        if strangers or self.site not in members:
            raise FederationError(
                f"round {round_number} attempt {attempt}: the server names members {', '.join(members)}, which "
                f"{'include non-members ' + ', '.join(strangers) if strangers else 'leave out this site'}",
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.MISMATCH,
            )
        if len(members) < self.min_clients:
            raise FederationError(
                f"refusing to upload to round {round_number} attempt {attempt}: it has {len(members)} member(s) "
                f"({', '.join(members)}), fewer than this site's min_clients={self.min_clients}, so their sum would "
                "tell too much about each of them",
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.MISMATCH,
            )
        self._claim(round_number, attempt, members)
        masks = self._masks

        def mask(index: int, frame: bytes) -> bytes:
            return masks.apply(frame, round_number, attempt, members, index)

        return mask

    def _claim(self, round_number: int, attempt: int, members: tuple[str, ...]) -> None:
        """Records on disk, before anything is sent, that this site masks an update for this attempt; refuses an
        attempt that an earlier process of this site masked already.

        The masks of an attempt depend on nothing but the attempt, so they must never cover two different
        ciphertexts: whoever holds the CKKS key would read the difference of the two. A site that restarted
        encrypts its update anew, so it sits out an attempt it already sent to (the server has that upload, or
        re-collects without it) instead of masking a second ciphertext with the same masks.
        """
        attempt_id = (round_number, attempt, tuple(sorted(members)))
        if attempt_id in self._masked_here:
            return  # the same kept bytes again: the same masked bytes
        path = self.folder / MASKED_LOG
        try:
            last = json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError) as err:
            raise FederationError(f"{path}: unreadable ({err}); it guards against reusing masks, so fix or remove it")
        entry = [round_number, attempt, list(attempt_id[2])]
        if isinstance(last, list) and len(last) == 3 and (round_number, attempt) <= (last[0], last[1]):
            raise RoundClosedError(
                f"round {round_number} attempt {attempt}: an earlier run of this site masked an update for round "
                f"{last[0]} attempt {last[1]}; a new encryption under masks already used would expose the difference, "
                "so this site sits the attempt out"
            )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
        self._masked_here.add(attempt_id)
