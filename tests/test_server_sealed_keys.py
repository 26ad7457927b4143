"""The server's part of he.key = sites, without a network: announcements kept for the key exchange, and the sealed
copies of the CKKS key shared once by the first member in name order, stored in state_dir, fetched by each other
member (its own copy only), with every hostile input refused before anything is stored."""

from __future__ import annotations

import json
import stat
import threading
from dataclasses import replace

import grpc
import pytest
from test_server_support import provision_kits, site_channel, start_server, stub

from lightning_fhe.he.layout import TensorLayout, TensorSpec
from lightning_fhe.he.params import CKKSParams
from lightning_fhe.masking.announcement import Announcement
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.sealed_keys import (
    PIECE_BYTES,
    SealedKeyAssembler,
    SealedKeyError,
    SealedKeyPiece,
    SealedKeyShare,
    key_sharer,
    max_sealed_key_bytes,
    split_sealed_key,
)
from lightning_fhe.proto.wire import mask_key_message
from lightning_fhe.provision import load_server_kit, load_site_kit
from lightning_fhe.server.config import ServerConfig
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.federation import Federation
from lightning_fhe.server.membership import Membership, SiteDeclaration
from lightning_fhe.server.messages import Phase
from lightning_fhe.server.store import SEALED_KEYS_FILE, StateError, StateStore

ENCRYPTED = TensorLayout((TensorSpec("w", (10,), "float32"),))
PLAINTEXT = TensorLayout(())
FP = "f" * 64


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def announcement(site: str, key_fingerprint: str = "", public: bytes | None = None) -> Announcement:
    public = public if public is not None else bytes([len(site)]) + site.encode().ljust(31, b".")[:31]
    return Announcement(site, b"-----BEGIN CERTIFICATE-----", public, b"s" * 64, key_fingerprint)


def declaration(site, server_context, key: Announcement | None | str = "announce", weight: float = 1.0):
    mask_key = announcement(site) if key == "announce" else key
    return SiteDeclaration(weight, ENCRYPTED, PLAINTEXT, "he-fp", server_context.params.fingerprint(), 0, mask_key)


def make_federation(tmp_path, server_context, clock, sites=("b", "a", "c")) -> Federation:
    config = ServerConfig(rounds=2, min_clients=len(sites), round_timeout_s=100.0).with_kit(sites, 0)
    return Federation(config, server_context, "he-fp", "test", StateStore(tmp_path / "state"), None, clock)


def formed(tmp_path, server_context, clock, sites=("b", "a", "c")) -> Federation:
    fed = make_federation(tmp_path, server_context, clock, sites)
    for site in sites:
        fed.join(site, declaration(site, server_context))
    assert fed.phase is Phase.OPEN
    return fed


def share_of(sender: str, recipients, fingerprint: str = FP, size: int = 1000) -> SealedKeyShare:
    return SealedKeyShare(sender, fingerprint, {r: bytes([i + 1]) * size for i, r in enumerate(recipients)})


def refusal(call, *args, **kwargs) -> Refusal:
    with pytest.raises(Refusal) as info:
        call(*args, **kwargs)
    return info.value


@pytest.fixture()
def clock():
    return FakeClock()


# -- announcements and masking -----------------------------------------------------------------------------------------


def test_announcements_are_kept_whenever_every_member_sent_one(tmp_path, server_context, clock):
    two = formed(tmp_path / "2", server_context, clock, sites=("a", "b"))
    assert not two.membership.masked and [k.site for k in two.membership.mask_keys] == ["a", "b"]
    result = two.join("a", declaration("a", server_context))
    assert not result.masked and [k.site for k in result.mask_keys] == ["a", "b"]
    three = formed(tmp_path / "3", server_context, clock)
    assert three.membership.masked and len(three.membership.mask_keys) == 3
    fed = make_federation(tmp_path / "none", server_context, clock, sites=("a", "b", "c"))
    for site in ("a", "b", "c"):
        fed.join(site, declaration(site, server_context, key=None if site == "b" else "announce"))
    assert not fed.membership.masked and fed.membership.mask_keys == ()


def test_the_record_keeps_masked_apart_and_reads_records_from_before(tmp_path, server_context, clock):
    membership = formed(tmp_path, server_context, clock, sites=("a", "b")).membership
    data = membership.to_dict()
    assert data["masked"] is False and Membership.from_dict(data) == membership
    del data["masked"]  # written before it existed: keys were kept only in masked federations
    assert Membership.from_dict(data).masked is True
    data["mask_keys"] = []
    assert Membership.from_dict(data).masked is False


def test_a_rejoin_of_an_unmasked_federation_may_renew_its_announcement(tmp_path, server_context, clock):
    fed = formed(tmp_path, server_context, clock, sites=("a", "b"))
    fed.join("a", declaration("a", server_context, key=None))  # no new announcement: the old one stays
    assert fed.membership.mask_keys[0] == announcement("a")
    renewed = announcement("a", key_fingerprint=FP, public=b"n" * 32)
    fed.join("a", declaration("a", server_context, key=renewed))
    assert fed.membership.mask_keys[0] == renewed
    assert StateStore(tmp_path / "state").load_federation().membership.mask_keys[0] == renewed
    masked = formed(tmp_path / "m", server_context, clock)
    err = refusal(masked.join, "a", declaration("a", server_context, key=announcement("a", public=b"n" * 32)))
    assert err.reason is Reason.MISMATCH and "another mask key than at formation" in err.message


# -- sharing -----------------------------------------------------------------------------------------------------------


def test_only_the_first_member_in_name_order_shares_once_formed(tmp_path, server_context, clock):
    assert key_sharer(("b", "a", "c")) == "a" and key_sharer(("site-2", "site-10")) == "site-10"
    fed = make_federation(tmp_path, server_context, clock)
    fed.join("a", declaration("a", server_context))
    err = refusal(fed.check_key_sharer, "a")
    assert (err.status, err.reason) == (Status.FAILED_PRECONDITION, Reason.NOT_JOINED)
    for site in ("b", "c"):
        fed.join(site, declaration(site, server_context))
    assert fed.check_key_sharer("a") == ("a", "b", "c")
    for site in ("b", "c"):
        err = refusal(fed.check_key_sharer, site)
        assert (err.status, err.reason) == (Status.PERMISSION_DENIED, Reason.NOT_SHARER)
        assert "'a', the first member in name order, makes it" in err.message
        assert refusal(fed.share_sealed_keys, site, share_of(site, ["a", "c"])).reason is Reason.NOT_SHARER
    assert fed.key_relay.share is None


def test_a_share_is_stored_in_state_dir_and_survives_a_restart(tmp_path, server_context, clock):
    fed = formed(tmp_path, server_context, clock)
    share = share_of("a", ["b", "c"])
    assert fed.share_sealed_keys("a", share) == 2
    path = tmp_path / "state" / SEALED_KEYS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    restarted = make_federation(tmp_path, server_context, clock)
    assert restarted.key_relay.share == share
    assert restarted.fetch_sealed_key("c") == (share, share.keys["c"])


def test_sharing_again_is_idempotent_for_the_same_key_and_refused_for_another(tmp_path, server_context, clock):
    fed = formed(tmp_path, server_context, clock)
    first = share_of("a", ["b", "c"])
    fed.share_sealed_keys("a", first)
    again = share_of("a", ["b", "c"], size=999)  # the same key sealed again: other nonces, other bytes
    assert fed.share_sealed_keys("a", again) == 2
    assert fed.key_relay.share == first  # the copies stored first stay: some member may have fetched one
    err = refusal(fed.share_sealed_keys, "a", share_of("a", ["b", "c"], fingerprint="e" * 64))
    assert (err.status, err.reason) == (Status.ALREADY_EXISTS, Reason.DUPLICATE)
    assert "already shared (key fingerprint fff" in err.message and fed.key_relay.share == first


def test_a_share_must_cover_exactly_the_other_members(tmp_path, server_context, clock):
    fed = formed(tmp_path, server_context, clock)
    for bad in (share_of("a", ["b"]), share_of("a", ["b", "c", "d"]), share_of("a", ["a", "b", "c"])):
        assert refusal(fed.share_sealed_keys, "a", bad).reason is Reason.BAD_REQUEST
    assert fed.key_relay.share is None and not (tmp_path / "state" / SEALED_KEYS_FILE).exists()


def test_a_damaged_or_foreign_sealed_keys_file_stops_the_server(tmp_path, server_context, clock):
    fed = formed(tmp_path, server_context, clock)
    fed.share_sealed_keys("a", share_of("a", ["b", "c"]))
    path = tmp_path / "state" / SEALED_KEYS_FILE
    text = path.read_text()
    path.write_text(text.replace('"sender": "a"', '"sender": "b"'))
    with pytest.raises(StateError, match="does not match its checksum"):
        make_federation(tmp_path, server_context, clock)
    StateStore(tmp_path / "state").save_sealed_keys(share_of("b", ["a", "c"]))
    with pytest.raises(StateError, match="does not fit the members b, a, c"):
        make_federation(tmp_path, server_context, clock)
    for damaged, why in (("[]", "not a JSON object"), ('{"format": 9}', "format 9, this server reads 1")):
        path.write_text(damaged)
        with pytest.raises(StateError, match=why):
            make_federation(tmp_path, server_context, clock)


# -- fetching ----------------------------------------------------------------------------------------------------------


def test_a_member_fetches_its_own_copy_once_shared(tmp_path, server_context, clock):
    fed = formed(tmp_path, server_context, clock)
    err = refusal(fed.fetch_sealed_key, "b", max_wait_s=0)
    assert (err.status, err.reason) == (Status.NOT_FOUND, Reason.KEY_PENDING)
    assert "'a', the first member in name order, has not shared the CKKS key yet" in err.message
    err = refusal(fed.fetch_sealed_key, "a")
    assert err.status is Status.FAILED_PRECONDITION and "it makes the CKKS key, and has no copy" in err.message
    share = share_of("a", ["b", "c"])
    got = {}
    waiter = threading.Thread(target=lambda: got.update(c=fed.fetch_sealed_key("c", max_wait_s=30)))
    waiter.start()
    fed.share_sealed_keys("a", share)
    waiter.join(10)
    assert got["c"] == (share, share.keys["c"])
    assert fed.fetch_sealed_key("b") == (share, share.keys["b"])


def test_fetching_while_forming_or_after_failure_is_refused(tmp_path, server_context, clock):
    fed = make_federation(tmp_path, server_context, clock)
    fed.join("b", declaration("b", server_context))
    assert refusal(fed.fetch_sealed_key, "b").reason is Reason.NOT_JOINED
    clock.now += 1000
    fed.tick()
    assert refusal(fed.fetch_sealed_key, "b").reason is Reason.FAILED


def test_a_member_announcing_another_key_is_refused_at_join(tmp_path, server_context, clock):
    fed = formed(tmp_path, server_context, clock)
    other = declaration("c", server_context, key=announcement("c", key_fingerprint="e" * 64))
    fed.join("c", other)  # before the key is shared nothing says which key is the federation's
    fed.share_sealed_keys("a", share_of("a", ["b", "c"]))
    err = refusal(fed.join, "c", other)
    assert (err.status, err.reason) == (Status.FAILED_PRECONDITION, Reason.MISMATCH)
    assert f"site 'c' holds another CKKS key (key fingerprint {'e' * 64}) than the one 'a' made" in err.message
    fed.join("c", declaration("c", server_context, key=announcement("c", key_fingerprint=FP)))
    fed.join("b", declaration("b", server_context))  # no fingerprint yet: a site that has not fetched its key


# -- the pieces --------------------------------------------------------------------------------------------------------


def pieces(sender="a", recipient="b", size=150_000, fingerprint=FP):
    return list(split_sealed_key(sender, recipient, fingerprint, bytes(size)))


def assemble(*groups, recipients=("a", "b", "c"), max_bytes=200_000) -> SealedKeyShare:
    assembler = SealedKeyAssembler("a", recipients, max_bytes)
    for group in groups:
        for piece in group:
            assembler.add(piece)
    return assembler.finish()


def test_pieces_reassemble_into_one_copy_per_other_member():
    share = assemble(pieces(recipient="b"), pieces(recipient="c", size=10))
    assert share.sender == "a" and share.key_fingerprint == FP and sorted(share.keys) == ["b", "c"]
    assert len(share.keys["b"]) == 150_000 and [len(p.data) for p in pieces()] == [PIECE_BYTES, PIECE_BYTES, 18928]
    assert max_sealed_key_bytes(CKKSParams()) == 458_752


@pytest.mark.parametrize(
    "groups, words",
    [
        ((pieces(sender="b"),), "a sealed key from 'b'; only 'a'"),
        ((pieces(recipient="a"),), "for 'a', which is not one of the other members"),
        ((pieces(recipient="d"),), "for 'd', which is not one of the other members"),
        ((pieces(fingerprint=""),), "a key fingerprint of 1 to 128 characters"),
        ((pieces(fingerprint="x" * 129),), "a key fingerprint of 1 to 128 characters"),
        ((pieces(), pieces(recipient="c", fingerprint="e" * 64)), "name two keys"),
        ((pieces(size=300_000),), "takes 300000 bytes; 1 to 200000 are accepted"),
        ((pieces()[1:],), "at offset 65536, where 0 was expected"),
        ((pieces()[:1] + pieces()[2:],), "at offset 131072, where 65536 was expected"),
        ((pieces(), pieces()[:1]), "a second sealed key for 'b'"),
        ((pieces(),), "no complete sealed key for 'c'"),
        ((pieces()[:2], pieces(recipient="c")), "no complete sealed key for 'b'"),
        (([replace(pieces()[0], data=bytes(PIECE_BYTES + 1), size=200_000)],), "pieces take 1 to 65536 bytes"),
        (([replace(pieces()[-1], data=bytes(20_000))],), "at offset 131072"),
        (([replace(pieces(size=10)[0], size=5)],), "end within their key"),
        (([pieces()[0], replace(pieces()[1], size=140_000)],), "changes its size from 150000 to 140000"),
    ],
)
def test_pieces_that_cannot_be_a_share_are_refused(groups, words):
    with pytest.raises(SealedKeyError, match=words):
        assemble(*groups)


def test_a_lone_member_has_nobody_to_share_with():
    with pytest.raises(SealedKeyError, match="the only member"):
        SealedKeyAssembler("a", ["a"], 100).finish()


def test_a_piece_is_a_piece_of_its_copy():
    piece = SealedKeyPiece("a", "b", FP, 0, 10, bytes(10))
    assert "data" not in repr(piece)


# -- over gRPC with mutual TLS -----------------------------------------------------------------------------------------


def test_the_calls_over_grpc_are_for_members_and_refuse_hostile_streams(tmp_path):
    kits = provision_kits(tmp_path / "kits", ("site-1", "site-2", "site-3"))
    server = start_server(kits, tmp_path / "state", rounds=1, clients="[site-1,site-2]")
    address = f"127.0.0.1:{server.port}"
    kit = {name: load_site_kit(kits / name) for name in ("site-1", "site-2", "site-3")}

    def call(name, method, request, **options):
        with site_channel(kit[name], address) as channel:
            reply = getattr(stub(channel), method)(request, timeout=20, **options)
            return list(reply) if method == "FetchSealedKey" else reply

    def refused(name, method, request) -> tuple:
        with pytest.raises(grpc.RpcError) as info:
            call(name, method, request)
        reason = dict(info.value.trailing_metadata() or ()).get("refusal-reason")
        return info.value.code(), reason, info.value.details()

    def messages(*groups):
        return iter([
            pb.SealedKey(sender=p.sender, recipient=p.recipient, ciphertext=p.data, key_fingerprint=p.key_fingerprint,
                         offset=p.offset, size=p.size)
            for group in groups for p in group
        ])

    try:
        assert refused("site-1", "FetchSealedKey", pb.FetchSealedKeyRequest())[:2] == (
            grpc.StatusCode.FAILED_PRECONDITION, "not_joined")
        assert refused("site-3", "FetchSealedKey", pb.FetchSealedKeyRequest())[:2] == (
            grpc.StatusCode.PERMISSION_DENIED, "unknown_site")
        for name in ("site-2", "site-1"):
            request = pb.JoinRequest(
                weight=1.0,
                encrypted_layout_json=json.dumps(ENCRYPTED.to_dict()),
                plaintext_layout_json=json.dumps(PLAINTEXT.to_dict()),
                he_fingerprint=kit[name].he_fingerprint,
                params_fingerprint=kit[name].params.fingerprint(),
                max_wait_s=0 if name == "site-2" else 20,
            )
            request.mask_key.CopyFrom(mask_key_message(replace(announcement(name), certificate=kit[name].cert)))
            reply = call(name, "Join", request)
        assert reply.formed and not reply.masked and [k.site for k in reply.mask_keys] == ["site-2", "site-1"]
        code, reason, words = refused("site-2", "ShareSealedKeys", messages(pieces("site-2", "site-1")))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "not_sharer") and "'site-1'" in words
        code, reason, words = refused("site-1", "ShareSealedKeys", messages(pieces("site-1", "site-1")))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_request") and "not one of the other" in words
        too_big = pieces("site-1", "site-2", size=max_sealed_key_bytes(kit["site-1"].params) + 1)
        assert refused("site-1", "ShareSealedKeys", messages(too_big))[1] == "bad_request"
        code, reason, words = refused("site-2", "FetchSealedKey", pb.FetchSealedKeyRequest(max_wait_s=0.1))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "key_pending")
        assert call("site-1", "ShareSealedKeys", messages(pieces("site-1", "site-2"))).stored == 1
        got = call("site-2", "FetchSealedKey", pb.FetchSealedKeyRequest(max_wait_s=float("nan")))
        assert [(m.sender, m.recipient, m.key_fingerprint, m.offset, m.size) for m in got] == [
            ("site-1", "site-2", FP, offset, 150_000) for offset in (0, PIECE_BYTES, 2 * PIECE_BYTES)
        ]
        assert b"".join(m.ciphertext for m in got) == bytes(150_000)
        with site_channel(kit["site-1"], address, key=load_server_kit(kits / "server").key,
                          cert=load_server_kit(kits / "server").cert) as channel:  # the operator
            with pytest.raises(grpc.RpcError) as info:
                list(stub(channel).FetchSealedKey(pb.FetchSealedKeyRequest(), timeout=10))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop()
