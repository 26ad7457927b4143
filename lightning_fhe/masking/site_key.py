"""A CKKS key no one outside the sites holds (``he.key: sites``): made by one site, sealed for each other.

With ``he.key: sites`` provisioning writes no secret key (:mod:`lightning_fhe.provision`). When the federation has
formed, its first member in name order (:func:`~lightning_fhe.proto.sealed_keys.key_sharer`) makes the key from
the kit's CKKS parameters and seals a copy for every other member with ChaCha20-Poly1305 under their pairwise AEAD
key (X25519 between the sites' announced keys, HKDF: :meth:`MaskIdentity.aead_keys`). The server relays the copies
(``ShareSealedKeys``, ``FetchSealedKey``) and cannot open them; a copy it alters fails authentication at its
recipient, which then saves nothing. Each site saves the key into its kit folder
(:func:`~lightning_fhe.provision.save_site_key`) and from then on loads it like a provisioned one.

A sealed copy is ``nonce (12 random bytes) || ChaCha20-Poly1305(key, nonce, secret context, aad)``, where the
secret context is ``HEContext.serialize(with_secret_key=True)`` and (``lp(x)``: ``len(x)`` as a big-endian u32,
then ``x``; strings UTF-8)::

    aad = "lightning-fhe sealed ckks key v1\\0" || federation id (32) || lp(sender) || lp(recipient)
          || lp(key fingerprint)

so a copy opens only for the pair, federation and key it was made for: the server cannot pass one site's copy to
another, or present it as another key.

:func:`obtain_site_key` is the whole exchange after a formed join; :func:`join_and_obtain_site_key` joins first, for
a site whose kit awaits its key (``HEFederation`` calls it before it builds the site's cipher pool).

Example, sealing and opening::

    >>> fed_id, key = bytes(32), bytes(range(32))
    >>> sealed = seal_key(b"secret context", key, fed_id, "site-1", "site-2", "ab" * 32)
    >>> open_key(sealed, key, fed_id, "site-1", "site-2", "ab" * 32)
    b'secret context'
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import tenseal as ts
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from lightning_fhe.client.errors import FederationError
from lightning_fhe.client.retry import WaitLog
from lightning_fhe.he.context import HEContext, HEKeyError
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.masking.keys import MaskIdentity, MaskKeyError, verify_announcements
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.reasons import Reason
from lightning_fhe.proto.sealed_keys import (
    SealedKeyAssembler,
    SealedKeyError,
    key_sharer,
    max_sealed_key_bytes,
    split_sealed_key,
)
from lightning_fhe.proto.wire import mask_key_from_message, mask_key_message, sealed_key_message, sealed_key_piece
from lightning_fhe.provision.kits import SiteKit, key_fingerprint, save_site_key, stage_site_key, staged_site_key

logger = logging.getLogger("lightning_fhe.client")

NONCE_BYTES = 12
TAG_BYTES = 16
_SEAL_LABEL = b"lightning-fhe sealed ckks key v1\0"


class SiteKeyError(FederationError):
    """The sites' CKKS key cannot be made, passed on or trusted here; the message names the site and why."""


def sealing_aad(fed_id: bytes, sender: str, recipient: str, key_fingerprint: str) -> bytes:
    """The associated data a copy is sealed with: it binds the federation, the pair and the key (module docstring)."""
    return _SEAL_LABEL + fed_id + _lp(sender.encode()) + _lp(recipient.encode()) + _lp(key_fingerprint.encode())


def seal_key(
    secret: bytes, aead_key: bytes, fed_id: bytes, sender: str, recipient: str, key_fingerprint: str
) -> bytes:
    """``secret`` (a serialized secret context) sealed for ``recipient``: a fresh random nonce, then the ciphertext
    and its tag."""
    nonce = os.urandom(NONCE_BYTES)
    aad = sealing_aad(fed_id, sender, recipient, key_fingerprint)
    return nonce + ChaCha20Poly1305(aead_key).encrypt(nonce, secret, aad)


def open_key(
    sealed: bytes, aead_key: bytes, fed_id: bytes, sender: str, recipient: str, key_fingerprint: str
) -> bytes:
    """The secret a :func:`seal_key` copy holds.

    Raises:
        SiteKeyError: the copy was altered, or sealed for another pair, federation or key fingerprint.
    """
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise SiteKeyError(
            f"the sealed CKKS key from {sender!r} takes {len(sealed)} bytes, too few to be one",
            grpc.StatusCode.DATA_LOSS,
            Reason.MISMATCH,
        )
    aad = sealing_aad(fed_id, sender, recipient, key_fingerprint)
    try:
        return ChaCha20Poly1305(aead_key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SiteKeyError(
            f"the sealed CKKS key from {sender!r} for {recipient!r} fails authentication: it was altered on its way "
            "(the server relays it), or sealed for another site, federation or key; nothing was saved",
            grpc.StatusCode.DATA_LOSS,
            Reason.MISMATCH,
        ) from None


def check_key_fingerprints(announcements: Iterable[Any], site: str, key_fingerprint: str) -> None:
    """Refuses a federation in which a member announces another CKKS key than the one ``site`` holds.

    ``announcements`` are the members' (the join's ``mask_keys``); an empty fingerprint (a member that has no key
    yet) says nothing. Nothing is checked while ``site`` itself holds no key (``key_fingerprint`` empty).

    Raises:
        SiteKeyError: naming the first member whose fingerprint differs.
    """
    if not key_fingerprint:
        return
    for announcement in announcements:
        theirs = announcement.key_fingerprint
        if theirs and theirs != key_fingerprint:
            raise SiteKeyError(
                f"site {announcement.site!r} holds another CKKS key (key fingerprint {theirs}) than site {site!r} "
                f"({key_fingerprint}): the sites would not decrypt each other's sums. Restore that site's kit folder "
                "(he_context.tenseal and site.yaml) from a backup",
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.MISMATCH,
            )


@dataclass(frozen=True)
class KeyCalls:
    """How :func:`obtain_site_key` reaches the server: the stub and call options of a site's connection.

    Args:
        stub: the ``Aggregator`` stub.
        metadata: per-call metadata (the site's name in insecure mode).
        run: runs a call, riding out outages; with ``waiting``, a deadline that expires returns None (the client's
            retry loop: ``RetryLoop.run``).
        wait_s: how long the server may hold a waiting call.
        timeout_s: a call's deadline beyond that wait.
    """

    stub: Any
    metadata: tuple[tuple[str, str], ...]
    run: Any
    wait_s: float
    timeout_s: float

    @classmethod
    def of(cls, client: Any) -> KeyCalls:
        """The calls of a connected :class:`~lightning_fhe.client.AggregatorClient`."""
        return cls(client._stub, client._metadata, client._retries.run, client.wait_s, client.rpc_timeout_s)


def obtain_site_key(
    calls: KeyCalls,
    kit: SiteKit,
    identity: MaskIdentity,
    members: Sequence[str],
    announcements: Sequence[Any],
    *,
    fed_id: bytes,
    key_timeout_s: float = 600.0,
    log_every_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> SiteKit:
    """After a formed join: this site makes and shares the key (the first member in name order) or fetches its copy;
    either way it saves it into its kit folder and returns the kit reloaded, holding the key.

    Args:
        calls: the connection to the server.
        kit: this site's kit, awaiting its key.
        identity: this site's X25519 key (the one its announcement carries).
        members: the federation's members, from the join.
        announcements: every member's announcement, from the join (``mask_keys``).
        fed_id: the federation id the announcements are signed under
            (:func:`~lightning_fhe.masking.keys.federation_id` of the kit and the server's federation instance).
        key_timeout_s: how long to wait for the first member's copy before giving up.

    Raises:
        SiteKeyError: an announcement that does not verify (the server may have substituted a key), a copy that
            fails authentication or does not hold the key it names, or no copy within ``key_timeout_s``.
        FederationError: the server refused a call.
    """
    site = kit.name
    if not announcements:
        raise SiteKeyError(
            "he.key = sites, but the server relays no mask keys: a member joined without one (masking=False there, "
            "or an older version), so no pair of sites can seal the CKKS key for each other",
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.MISMATCH,
        )
    try:
        public = verify_announcements(announcements, kit.ca_cert, members, fed_id)
    except MaskKeyError as err:
        raise SiteKeyError(
            f"refusing the key exchange: {err}", grpc.StatusCode.PERMISSION_DENIED, Reason.MISMATCH
        ) from None
    if public.get(site) != identity.public_key:
        raise SiteKeyError(
            f"refusing the key exchange: the server relays another key for this site ({site}) than its own; it may "
            "be substituting keys",
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.MISMATCH,
        )
    sharer = key_sharer(members)
    peers = {name: key for name, key in public.items() if name != site}
    if site == sharer:
        return _make_and_share(calls, kit, identity, peers, announcements, fed_id)
    aead_key = identity.aead_keys(site, {sharer: public[sharer]}, fed_id)[sharer]
    fingerprint, sealed = _fetch(calls, kit, sharer, key_timeout_s, log_every_s, clock)
    context = _load_secret(open_key(sealed, aead_key, fed_id, sharer, site, fingerprint), sharer, kit)
    if key_fingerprint(context) != fingerprint:
        raise SiteKeyError(
            f"the CKKS key {sharer!r} sealed for this site is not the key its fingerprint names ({fingerprint}); "
            "nothing was saved",
            grpc.StatusCode.DATA_LOSS,
            Reason.MISMATCH,
        )
    check_key_fingerprints(announcements, site, fingerprint)
    saved = save_site_key(kit.path, context)
    logger.info("saved the CKKS key %s that %s made (he.key = sites) into %s", fingerprint, sharer, kit.path)
    return saved


def join_and_obtain_site_key(
    client: Any,
    encrypted_layout: TensorLayout,
    plaintext_layout: TensorLayout,
    *,
    weight: float,
    rounds: int = 0,
    require_masking: bool = False,
    key_timeout_s: float = 600.0,
) -> SiteKit:
    """For a site whose kit awaits the sites' key: joins with the layouts and weight it will train with (so its
    later join is the same, as the server requires), then :func:`obtain_site_key`. Returns the kit holding the key.

    Args:
        client: a connected :class:`~lightning_fhe.client.AggregatorClient` for this site's kit.
        encrypted_layout, plaintext_layout, weight, rounds: what the site declares at every join.
        require_masking: the site takes part only in a masked federation (its ``masking=True``).
    """
    kit: SiteKit = client.kit
    if not kit.awaits_site_key:
        return kit
    from lightning_fhe.client.masking import SiteMasking  # the key the site masks with: the one it seals with

    calls = KeyCalls.of(client)
    request = pb.JoinRequest(
        weight=float(weight),
        encrypted_layout_json=json.dumps(encrypted_layout.to_dict()),
        plaintext_layout_json=json.dumps(plaintext_layout.to_dict()),
        he_fingerprint=kit.he_fingerprint,
        params_fingerprint=kit.params.fingerprint(),
        max_wait_s=calls.wait_s,
        rounds=rounds,
        require_masking=require_masking,
    )
    def announce(instance: str) -> SiteMasking:
        """This site's signed key for federation ``instance`` (no key fingerprint: it holds no CKKS key yet)."""
        masking = SiteMasking(kit, kit.name, require_masking, kit.min_clients, instance)
        request.mask_key.CopyFrom(mask_key_message(masking.announcement()))
        return masking

    masking = announce(client.status().instance)
    logger.info("he.key = sites: joining to make or fetch the federation's CKKS key")
    while True:
        reply = calls.run(
            "join",
            lambda: calls.stub.Join(request, timeout=calls.wait_s + calls.timeout_s, metadata=calls.metadata),
            waiting=True,
        )
        if reply is not None and reply.federation_instance != masking.instance:
            masking = announce(reply.federation_instance)  # the server restarted afresh: a new federation
            continue
        if reply is not None and reply.formed:
            break
    announcements = [mask_key_from_message(key) for key in reply.mask_keys]
    identity = MaskIdentity.load_or_create(masking.folder)
    return obtain_site_key(
        calls,
        kit,
        identity,
        tuple(reply.members),
        announcements,
        fed_id=masking.federation_id,
        key_timeout_s=key_timeout_s,
    )


# -- internals ---------------------------------------------------------------------------------------------------------


def _make_and_share(
    calls: KeyCalls,
    kit: SiteKit,
    identity: MaskIdentity,
    peers: dict[str, bytes],
    announcements: Sequence[Any],
    fed_id: bytes,
) -> SiteKit:
    """The first member: makes the key (or takes the one it staged before it stopped), stages it, shares a sealed
    copy with every peer, and saves it once the server holds them all."""
    site = kit.name
    context = staged_site_key(kit.path)
    if context is None:
        context = HEContext.generate(kit.params)
        stage_site_key(kit.path, context)
        logger.info("made the federation's CKKS key (he.key = sites; this site is first in name order)")
    fingerprint = key_fingerprint(context)
    check_key_fingerprints(announcements, site, fingerprint)
    secret = context.serialize(with_secret_key=True)
    aead_keys = identity.aead_keys(site, peers, fed_id)
    sealed = {peer: seal_key(secret, aead_keys[peer], fed_id, site, peer, fingerprint) for peer in sorted(peers)}

    def messages() -> Iterator[pb.SealedKey]:
        for peer, copy in sealed.items():
            for piece in split_sealed_key(site, peer, fingerprint, copy):
                yield sealed_key_message(piece)

    reply = calls.run(
        "share the CKKS key",
        lambda: calls.stub.ShareSealedKeys(messages(), timeout=calls.timeout_s, metadata=calls.metadata),
    )
    saved = save_site_key(kit.path, context)
    logger.info("shared the CKKS key %s, sealed for %s (%d stored)", fingerprint, ", ".join(sealed), reply.stored)
    return saved


def _fetch(
    calls: KeyCalls, kit: SiteKit, sharer: str, key_timeout_s: float, log_every_s: float, clock: Callable[[], float]
) -> tuple[str, bytes]:
    """This site's sealed copy and the key fingerprint it names, waiting for ``sharer`` to share it."""
    site = kit.name
    waiting = WaitLog(clock, log_every_s)
    started = clock()
    request = pb.FetchSealedKeyRequest(max_wait_s=calls.wait_s)

    def fetch() -> list[pb.SealedKey]:
        stream = calls.stub.FetchSealedKey(request, timeout=calls.wait_s + calls.timeout_s, metadata=calls.metadata)
        return list(stream)

    while True:
        try:
            messages = calls.run("fetch the CKKS key", fetch, waiting=True)
        except FederationError as err:
            if err.reason is not Reason.KEY_PENDING:
                raise
            messages = None
        if messages is not None:
            break
        if clock() - started > key_timeout_s:
            raise SiteKeyError(
                f"{sharer!r}, the first member in name order, has not shared the CKKS key within {key_timeout_s:g} s: "
                "it makes the key when it joins (he.key = sites); is it running?",
                grpc.StatusCode.DEADLINE_EXCEEDED,
                Reason.KEY_PENDING,
            )
        if waiting.due():
            logger.info("waiting %.0f s for %s to share the CKKS key (he.key = sites)", waiting.elapsed(), sharer)
    assembler = SealedKeyAssembler(sharer, [site], max_sealed_key_bytes(kit.params))
    try:
        for message in messages:
            if message.recipient != site:
                raise SealedKeyError(f"the server sent the copy for {message.recipient!r}, not this site's")
            assembler.add(sealed_key_piece(message))
        share = assembler.finish()
    except SealedKeyError as err:
        raise SiteKeyError(
            f"the server's copy of the CKKS key cannot be one: {err}", grpc.StatusCode.DATA_LOSS, Reason.MISMATCH
        ) from None
    return share.key_fingerprint, share.keys[site]


def _load_secret(secret: bytes, sharer: str, kit: SiteKit) -> HEContext:
    """The context an opened copy holds, checked to be a secret key of the kit's parameters."""
    try:
        context = HEContext(ts.context_from(secret))
    except Exception as err:  # noqa: BLE001 - TenSEAL raises bare exceptions for undecodable bytes
        raise SiteKeyError(
            f"the CKKS key {sharer!r} sealed for this site does not load ({err}); nothing was saved",
            grpc.StatusCode.DATA_LOSS,
            Reason.MISMATCH,
        ) from None
    try:
        context.secret_key()
    except HEKeyError:
        raise SiteKeyError(
            f"{sharer!r} sealed a context without a secret key; nothing was saved",
            grpc.StatusCode.DATA_LOSS,
            Reason.MISMATCH,
        ) from None
    if context.params != replace(kit.params, scheme=context.params.scheme):  # a context does not record the name
        raise SiteKeyError(
            f"{sharer!r} made the CKKS key with parameters {context.params.to_dict()}, not the kit's "
            f"{kit.params.to_dict()}; nothing was saved",
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.MISMATCH,
        )
    return context


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


__all__ = [
    "KeyCalls",
    "SiteKeyError",
    "check_key_fingerprints",
    "join_and_obtain_site_key",
    "obtain_site_key",
    "open_key",
    "seal_key",
    "sealing_aad",
]
