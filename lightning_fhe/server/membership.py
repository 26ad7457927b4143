"""Who is in the federation: sites join with a weight and their layouts; formation fixes the members.

Formation is "round 0" of membership. It closes under the same :class:`~lightning_fhe.server.rounds.QuorumRule` as
a training round: when every expected site joined, or ``min_clients`` joined and ``wait_after_min_s`` passed. At
that moment the members and their total weight ``W`` are fixed: each site scales its encrypted update by its share
``w_i / W`` (the server cannot multiply ciphertexts), so ``W`` must never change afterwards.

Pure logic: no clock, no locks, no gRPC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.masking.announcement import Announcement, AnnouncementError
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.rounds import Decision, QuorumRule


@dataclass(frozen=True)
class SiteDeclaration:
    """What a site declares when it joins.

    Args:
        weight: its weight ``w_i`` (typically its number of training samples), > 0.
        encrypted_layout: the tensors it encrypts, in stream order.
        plaintext_layout: the tensors it sends unencrypted, in stream order.
        he_fingerprint: its kit's HE fingerprint (same provisioning run as the server's kit).
        params_fingerprint: the fingerprint of its CKKS parameters.
        rounds: the number of rounds the site means to train; 0: whatever the server runs.
        mask_key: its signed pairwise-mask key; None: it does not mask.
        require_masking: it takes part only in a masked federation (else masking follows :func:`masked_by`).
    """

    weight: float
    encrypted_layout: TensorLayout
    plaintext_layout: TensorLayout
    he_fingerprint: str
    params_fingerprint: str
    rounds: int = 0
    mask_key: Announcement | None = None
    require_masking: bool = False


MIN_SITES_TO_MASK = 3  # with 2 sites the sum itself tells each site the other's update; see docs/security.md


def masked_by(declarations: Sequence[SiteDeclaration]) -> bool:
    """Whether a federation of these members masks its updates: every member sent a mask key, and there are at
    least :data:`MIN_SITES_TO_MASK` of them or one asked for masking (it also guards against the server together
    with the provisioning party, with 2 sites)."""
    if not declarations or any(d.mask_key is None for d in declarations):
        return False
    return len(declarations) >= MIN_SITES_TO_MASK or any(d.require_masking for d in declarations)


def layout_difference(kind: str, ours: TensorLayout, theirs: TensorLayout) -> str | None:
    """Says where two layouts differ, in words naming the first differing tensor; None when equal."""
    if ours == theirs:
        return None
    for i, (a, b) in enumerate(zip(theirs.specs, ours.specs)):
        if a != b:
            return (
                f"{kind} tensor {i} is {a.name!r} {a.dtype} {list(a.shape)} at this site but {b.name!r} {b.dtype} "
                f"{list(b.shape)} in the federation"
            )
    longer = theirs if len(theirs.specs) > len(ours.specs) else ours
    extra = longer.specs[min(len(theirs.specs), len(ours.specs))].name
    return (
        f"{kind} layout has {len(theirs.specs)} tensors at this site but {len(ours.specs)} in the federation "
        f"(first extra: {extra!r})"
    )


@dataclass(frozen=True)
class Membership:
    """The federation as fixed at formation: members in join order, their weights and the shared layouts."""

    members: tuple[str, ...]
    weights: tuple[float, ...]
    encrypted_layout: TensorLayout
    plaintext_layout: TensorLayout
    initial_model_site: str | None  # the site that sends round 0, or None when the server has initial_model
    # Every member's announcement, in members' order, when every member sent one (masked or not: he.key = sites
    # needs them to seal the CKKS key); else empty.
    mask_keys: tuple[Announcement, ...] = ()
    masked: bool = False  # updates are masked (masked_by the members' declarations); implies mask_keys

    @property
    def total_weight(self) -> float:
        return math.fsum(self.weights)  # finite: check_total_weight refused every join that would overflow it

    def weight(self, site: str) -> float:
        return self.weights[self.members.index(site)]

    def share(self, site: str) -> float:
        """``w_i / W``: what the site multiplies its encrypted update by, and what the server weights plaintext with."""
        return self.weight(site) / self.total_weight

    def check_rejoin(self, site: str, declaration: SiteDeclaration) -> None:
        """A member that restarts joins again; it must declare what it declared at formation."""
        if site not in self.members:
            raise Refusal(
                Status.PERMISSION_DENIED,
                Reason.NOT_MEMBER,
                f"site {site!r} is not a member: the federation formed with {', '.join(self.members)} and members "
                "are fixed from then on",
            )
        if declaration.weight != self.weight(site):
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.MISMATCH,
                f"site {site!r} joined with weight {self.weight(site):g}; it now declares {declaration.weight:g}, but "
                "weights are fixed when the federation forms",
            )
        check_layouts(declaration, self.encrypted_layout, self.plaintext_layout)
        if not self.mask_keys:
            return
        announced = self.mask_keys[self.members.index(site)]
        if declaration.mask_key is None:
            if not self.masked:
                return  # its announcement from formation stays; an unmasked federation needs no new one
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.MISMATCH,
                f"site {site!r} joined without a mask key, but the federation masks its updates (it formed with one "
                "from every member): keep masking on at this site",
            )
        check_mask_key(site, declaration.mask_key)
        if self.masked and declaration.mask_key.public_key != announced.public_key:
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.MISMATCH,
                f"site {site!r} presents another mask key than at formation; the other members' masks are made with "
                "the first one: restore the site's kit folder (mask_x25519.key)",
            )

    def with_mask_key(self, key: Announcement) -> Membership:
        """The membership with ``key`` in place of its site's announcement (e.g. a new key fingerprint after a
        restart; in a masked federation the public key is the same, :meth:`check_rejoin` refuses another)."""
        keys = tuple(key if old.site == key.site else old for old in self.mask_keys)
        return replace(self, mask_keys=keys)

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": [{"name": m, "weight": w} for m, w in zip(self.members, self.weights)],
            "total_weight": self.total_weight,
            "encrypted_layout": self.encrypted_layout.to_dict(),
            "plaintext_layout": self.plaintext_layout.to_dict(),
            "initial_model_site": self.initial_model_site,
            "mask_keys": [key.to_dict() for key in self.mask_keys],
            "masked": self.masked,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Membership:
        mask_keys = tuple(Announcement.from_dict(key) for key in data.get("mask_keys", ()))
        return cls(
            members=tuple(str(m["name"]) for m in data["members"]),
            weights=tuple(float(m["weight"]) for m in data["members"]),
            # Checked when the site joined, against the max_model_values of that time: only the form counts here.
            encrypted_layout=TensorLayout.from_dict(data["encrypted_layout"], max_values=2**62),
            plaintext_layout=TensorLayout.from_dict(data["plaintext_layout"], max_values=2**62),
            initial_model_site=data.get("initial_model_site"),
            mask_keys=mask_keys,
            masked=bool(data.get("masked", bool(mask_keys))),  # records before "masked" kept keys only when masked
        )


def check_mask_key(site: str, key: Announcement) -> None:
    try:
        key.check_form(site)
    except AnnouncementError as err:
        raise Refusal(Status.INVALID_ARGUMENT, Reason.BAD_REQUEST, f"site {site!r}: {err}") from None


def check_layouts(declaration: SiteDeclaration, encrypted: TensorLayout, plaintext: TensorLayout) -> None:
    for kind, ours, theirs in (
        ("encrypted", encrypted, declaration.encrypted_layout),
        ("plaintext", plaintext, declaration.plaintext_layout),
    ):
        difference = layout_difference(kind, ours, theirs)
        if difference:
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.MISMATCH,
                f"layout mismatch: {difference}; every site must select the same tensors of the same model",
            )


class Formation:
    """Sites joining until the members are fixed.

    Example::

        >>> from lightning_fhe.he.layout import TensorLayout
        >>> empty = TensorLayout(())
        >>> formation = Formation(("a", "b"), QuorumRule(2, 0.0, 60.0), opened_at=0.0, he_fingerprint="f",
        ...                       params_fingerprint="p")
        >>> for site, weight in (("a", 3.0), ("b", 1.0)):
        ...     formation.join(site, SiteDeclaration(weight, empty, empty, "f", "p"), now=1.0)
        >>> formation.decide(now=1.0).outcome.value, formation.close(server_has_initial_model=False).share("a")
        ('close', 0.75)
    """

    def __init__(
        self,
        expected: Sequence[str],
        rule: QuorumRule,
        opened_at: float,
        he_fingerprint: str,
        params_fingerprint: str,
    ) -> None:
        self.expected = tuple(expected)
        self.rule = rule
        self.opened_at = opened_at
        self.he_fingerprint = he_fingerprint
        self.params_fingerprint = params_fingerprint
        self.joined: dict[str, tuple[SiteDeclaration, float]] = {}  # insertion order is join order

    @property
    def layouts(self) -> tuple[TensorLayout, TensorLayout] | None:
        """The layouts every site must have: those of the first site that joined."""
        if not self.joined:
            return None
        first, _ = next(iter(self.joined.values()))
        return first.encrypted_layout, first.plaintext_layout

    def sets_layouts(self, site: str) -> bool:
        """Whether this site's join (re)defines the layouts: the first join, or the lone first site joining again
        (it may have restarted with another model)."""
        return not self.joined or (len(self.joined) == 1 and site in self.joined)

    def check(self, site: str, declaration: SiteDeclaration, rounds: int = 0) -> None:
        """Refuses a join that must not be recorded, without changing anything.

        ``rounds``: the server's number of rounds (0: not checked).
        """
        check_identity(site, declaration, self.expected, self.he_fingerprint, self.params_fingerprint, rounds)
        if declaration.mask_key is not None:
            check_mask_key(site, declaration.mask_key)
        if not self.sets_layouts(site):
            check_layouts(declaration, *self.layouts)
        weights = [d.weight for s, (d, _) in self.joined.items() if s != site] + [declaration.weight]
        check_total_weight(site, declaration.weight, weights)

    def join(self, site: str, declaration: SiteDeclaration, now: float, rounds: int = 0) -> None:
        """Records (or, for a site that joins again before formation closes, updates) a site's declaration."""
        self.check(site, declaration, rounds)
        previous = self.joined.get(site)
        self.joined[site] = (declaration, previous[1] if previous else now)

    def decide(self, now: float) -> Decision:
        return self.rule.decide(len(self.expected), [t for _, t in self.joined.values()], self.opened_at, now)

    def close(self, server_has_initial_model: bool) -> Membership:
        """Fixes the members (in join order) and their weights."""
        if not self.joined:
            raise ValueError("no site joined: a federation needs at least one member")
        members = tuple(self.joined)
        layouts = self.layouts
        assert layouts is not None
        last = members[-1]
        check_total_weight(last, self.joined[last][0].weight, [d.weight for d, _ in self.joined.values()])
        declarations = [self.joined[m][0] for m in members]
        announced = all(d.mask_key is not None for d in declarations)
        return Membership(
            members=members,
            weights=tuple(self.joined[m][0].weight for m in members),
            encrypted_layout=layouts[0],
            plaintext_layout=layouts[1],
            initial_model_site=None if server_has_initial_model else members[0],
            mask_keys=tuple(d.mask_key for d in declarations if d.mask_key is not None) if announced else (),
            masked=masked_by(declarations),
        )


def check_total_weight(site: str, weight: float, weights: Sequence[float]) -> None:
    """Refuses the weight that would make ``W`` (the sum of ``weights``, ``weight`` among them) unusable: infinite,
    or so large that some member's share ``w_i / W`` is 0 and its update would vanish from the average."""
    try:
        total = math.fsum(weights)
    except OverflowError:  # fsum raises where a plain sum would give inf
        total = math.inf
    if not math.isfinite(total) or not all(w / total > 0 for w in weights):
        raise Refusal(
            Status.INVALID_ARGUMENT,
            Reason.BAD_REQUEST,
            f"weight {weight:g} of site {site!r} is too large: with the weights already joined "
            f"({', '.join(f'{w:g}' for w in weights)}) the total weight W "
            f"{'overflows' if not math.isfinite(total) else 'leaves a share w_i/W of 0'}; use sample counts or "
            "another scale for every site's weight",
        )


def check_identity(
    site: str,
    declaration: SiteDeclaration,
    expected: Sequence[str],
    he_fingerprint: str,
    params_fingerprint: str,
    rounds: int = 0,
) -> None:
    """The checks that hold before and after formation: expected site, valid weight, same key, parameters and
    number of rounds (``rounds``: the server's; 0 skips that check)."""
    if site not in expected:
        raise Refusal(
            Status.PERMISSION_DENIED,
            Reason.UNKNOWN_SITE,
            f"site {site!r} is not one of the expected sites ({', '.join(expected)}); the server's 'clients' "
            "option lists them",
        )
    if rounds and declaration.rounds and declaration.rounds != rounds:
        raise Refusal(
            Status.FAILED_PRECONDITION,
            Reason.ROUNDS_MISMATCH,
            f"site {site!r} means to train {declaration.rounds} rounds, but the server runs {rounds}: give the site "
            f"rounds={rounds} (or leave it unset to take the server's), or restart the server with "
            f"rounds={declaration.rounds}",
        )
    weight = declaration.weight
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise Refusal(
            Status.INVALID_ARGUMENT,
            Reason.BAD_REQUEST,
            f"weight must be a finite number > 0 (e.g. the sample count), got {weight!r}",
        )
    if declaration.he_fingerprint != he_fingerprint:
        raise Refusal(
            Status.FAILED_PRECONDITION,
            Reason.MISMATCH,
            f"HE fingerprint mismatch: this site's kit has {declaration.he_fingerprint!r}, the server's "
            f"{he_fingerprint!r}; the kits come from different provisioning runs",
        )
    if declaration.params_fingerprint != params_fingerprint:
        raise Refusal(
            Status.FAILED_PRECONDITION,
            Reason.MISMATCH,
            f"CKKS parameters mismatch: this site's parameters have fingerprint {declaration.params_fingerprint!r}, "
            f"the server's {params_fingerprint!r}",
        )
