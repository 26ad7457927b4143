"""Sealed CKKS keys on the wire (``he.key: sites``): who shares, how large a copy may be, and its pieces.

The first member in name order makes the federation's CKKS secret key and sends each other member a copy sealed
under their pairwise key (:mod:`lightning_fhe.masking.site_key`); the server stores the copies and hands each
member its own. A copy (about 160 KB for N=8192) is larger than one gRPC message may be, so it travels as
``SealedKey`` pieces of at most :data:`PIECE_BYTES`, each copy's pieces in order from offset 0. Server and sites
check what they receive with the same :class:`SealedKeyAssembler`.

Pure logic: no gRPC (the servicer converts messages to :class:`SealedKeyPiece`).

Example::

    >>> pieces = list(split_sealed_key("a", "b", "f" * 64, bytes(100_000)))
    >>> [(p.offset, len(p.data)) for p in pieces]
    [(0, 65536), (65536, 34464)]
    >>> assembler = SealedKeyAssembler("a", ["b"], max_bytes=200_000)
    >>> for piece in pieces:
    ...     assembler.add(piece)
    >>> share = assembler.finish()
    >>> share.sender, len(share.keys["b"])
    ('a', 100000)
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_fhe.he.params import CKKSParams

PIECE_BYTES = 64 * 1024  # ciphertext bytes per SealedKey message: well inside upload_limit and download_limit
MAX_FINGERPRINT_CHARS = 128  # as an announcement's key_fingerprint


class SealedKeyError(ValueError):
    """Pieces of sealed keys that cannot be what they claim: the message says which and why."""


def key_sharer(members: Sequence[str]) -> str:
    """The member that makes the CKKS key and shares it: the first in name order (Python's ``str`` order, i.e. by
    Unicode code point), so every site and the server agree without asking anyone.

    >>> key_sharer(("site-2", "site-10", "site-1"))
    'site-1'
    """
    if not members:
        raise ValueError("no members: nobody makes the key")
    return min(members)


def max_sealed_key_bytes(params: CKKSParams) -> int:
    """The largest sealed copy accepted for ``params``: twice the secret key's raw size (N coefficients of 8 bytes
    for each prime) plus 64 KiB. A serialized secret context takes 160,019 to 164,110 bytes for N=8192 with
    [60, 40, 40] (20 keys measured, TenSEAL 0.3.18), so this cap (458,752 bytes) leaves room for 2.8 times that."""
    return 2 * 8 * params.poly_modulus_degree * len(params.coeff_mod_bit_sizes) + 64 * 1024


@dataclass(frozen=True)
class SealedKeyPiece:
    """``data`` is bytes ``[offset, offset + len(data))`` of the copy sealed by ``sender`` for ``recipient``, whose
    whole size is ``size``."""

    sender: str
    recipient: str
    key_fingerprint: str
    offset: int
    size: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class SealedKeyShare:
    """What the key's maker shared: one sealed copy per other member, all of the key ``key_fingerprint``."""

    sender: str
    key_fingerprint: str
    keys: Mapping[str, bytes] = field(repr=False)  # recipient -> sealed copy

    def same_key(self, other: SealedKeyShare) -> bool:
        """Whether ``other`` shares the same key with the same members (its copies may differ: fresh nonces)."""
        return (self.sender, self.key_fingerprint, set(self.keys)) == (
            other.sender,
            other.key_fingerprint,
            set(other.keys),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "key_fingerprint": self.key_fingerprint,
            "keys": {recipient: base64.b64encode(data).decode() for recipient, data in sorted(self.keys.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SealedKeyShare:
        return cls(
            sender=str(data["sender"]),
            key_fingerprint=str(data["key_fingerprint"]),
            keys={str(r): base64.b64decode(k, validate=True) for r, k in dict(data["keys"]).items()},
        )


def split_sealed_key(sender: str, recipient: str, key_fingerprint: str, sealed: bytes) -> Iterator[SealedKeyPiece]:
    """A sealed copy as the pieces that carry it, in order (one empty piece for an empty copy)."""
    offset = 0
    while True:
        data = sealed[offset : offset + PIECE_BYTES]
        yield SealedKeyPiece(sender, recipient, key_fingerprint, offset, len(sealed), data)
        offset += len(data)
        if offset >= len(sealed):
            return


class SealedKeyAssembler:
    """Reassembles sealed copies from their pieces, refusing anything they cannot be.

    Args:
        sender: who must have sealed them (the key's maker).
        recipients: the members each of whom must get exactly one copy (never the sender).
        max_bytes: the largest copy accepted (:func:`max_sealed_key_bytes`).

    Raises (from :meth:`add` and :meth:`finish`):
        SealedKeyError: another sender, a recipient that is not expected (the sender itself included), a missing,
            empty or changing key fingerprint, a piece out of order or beyond its copy, a copy over ``max_bytes``, a
            second copy for one recipient, or (at the end) a copy incomplete or missing.
    """

    def __init__(self, sender: str, recipients: Collection[str], max_bytes: int) -> None:
        self.sender = sender
        self.recipients = tuple(r for r in recipients if r != sender)
        self.max_bytes = max_bytes
        self.key_fingerprint: str | None = None
        self._sizes: dict[str, int] = {}
        self._parts: dict[str, list[bytes]] = {}
        self._received: dict[str, int] = {}

    def add(self, piece: SealedKeyPiece) -> None:
        if piece.sender != self.sender:
            raise SealedKeyError(
                f"a sealed key from {piece.sender!r}; only {self.sender!r}, the first member in name order, makes and "
                "shares the key"
            )
        if piece.recipient not in self.recipients:
            raise SealedKeyError(
                f"a sealed key for {piece.recipient!r}, which is not one of the other members "
                f"({', '.join(self.recipients) or 'none'})"
            )
        fingerprint = piece.key_fingerprint
        if not fingerprint or len(fingerprint) > MAX_FINGERPRINT_CHARS:
            raise SealedKeyError(f"a key fingerprint of 1 to {MAX_FINGERPRINT_CHARS} characters is expected")
        if self.key_fingerprint is None:
            self.key_fingerprint = fingerprint
        elif fingerprint != self.key_fingerprint:
            raise SealedKeyError(
                f"the sealed keys name two keys ({self.key_fingerprint} and {fingerprint}); one key is shared"
            )
        recipient = piece.recipient
        size = self._sizes.setdefault(recipient, piece.size)
        received = self._received.get(recipient, 0)
        if piece.size != size:
            raise SealedKeyError(f"the sealed key for {recipient!r} changes its size from {size} to {piece.size}")
        if not 0 < size <= self.max_bytes:
            raise SealedKeyError(
                f"the sealed key for {recipient!r} takes {size} bytes; 1 to {self.max_bytes} are accepted for these "
                "CKKS parameters"
            )
        if received == size and recipient in self._parts:
            raise SealedKeyError(f"a second sealed key for {recipient!r}; each member gets one")
        if piece.offset != received:
            raise SealedKeyError(
                f"a piece of the sealed key for {recipient!r} at offset {piece.offset}, where {received} was expected; "
                "pieces come in order"
            )
        if not 0 < len(piece.data) <= PIECE_BYTES or received + len(piece.data) > size:
            raise SealedKeyError(
                f"a piece of {len(piece.data)} bytes at offset {piece.offset} of the sealed key for {recipient!r} "
                f"({size} bytes); pieces take 1 to {PIECE_BYTES} bytes and end within their key"
            )
        self._parts.setdefault(recipient, []).append(piece.data)
        self._received[recipient] = received + len(piece.data)

    def finish(self) -> SealedKeyShare:
        if not self.recipients:
            raise SealedKeyError(f"{self.sender!r} is the only member: there is nobody to share the key with")
        incomplete = [r for r in self.recipients if self._received.get(r, 0) != self._sizes.get(r, -1)]
        if incomplete:
            raise SealedKeyError(
                f"no complete sealed key for {', '.join(repr(r) for r in incomplete)}; each other member gets one"
            )
        assert self.key_fingerprint is not None
        keys = {r: b"".join(self._parts[r]) for r in self.recipients}
        return SealedKeyShare(self.sender, self.key_fingerprint, keys)
