"""he.key = sites end to end: the first member in name order makes the CKKS key and seals it for the others, the
server relays copies it cannot open, each site saves the key into its kit folder and federates with it, a restarted
site works from its saved key, and neither a tampering relay nor a site holding another key gets through.

Real kits (``he.key: sites``), a real server over loopback gRPC with mutual TLS, real TenSEAL keys.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import tenseal as ts
from test_server_support import (
    ENCRYPTED,
    PLAINTEXT,
    WEIGHTS,
    Site,
    join_request_for,
    site_channel,
    start_server,
    status_of,
    stub,
    update_of,
)

from lightning_fhe.client import AggregatorClient, FederationError
from lightning_fhe.he.context import HEContext
from lightning_fhe.masking.announcement import Announcement
from lightning_fhe.masking.keys import KEY_FILE, MaskIdentity, federation_id
from lightning_fhe.masking.site_key import (
    KeyCalls,
    SiteKeyError,
    check_key_fingerprints,
    join_and_obtain_site_key,
    obtain_site_key,
    open_key,
    seal_key,
    sealing_aad,
)
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.reasons import Reason
from lightning_fhe.proto.wire import mask_key_message
from lightning_fhe.provision import (
    KitError,
    key_fingerprint,
    load_provision_config,
    load_site_kit,
    provision,
    save_site_key,
)
from lightning_fhe.server.store import SEALED_KEYS_FILE

REPO = Path(__file__).resolve().parents[1]
FED_ID = bytes(range(32))
AEAD_KEY = bytes(32)
FP = "ab" * 32


def provision_sites_key(out: Path, sites: tuple[str, ...]) -> Path:
    overrides = ["he.key=sites", f"clients=[{','.join(sites)}]"]
    provision(load_provision_config(REPO / "configs" / "provision.yaml", overrides), out)
    return out


# -- sealing -----------------------------------------------------------------------------------------------------------


def test_a_sealed_key_opens_only_for_its_pair_federation_and_key():
    sealed = seal_key(b"secret", AEAD_KEY, FED_ID, "site-1", "site-2", FP)
    assert len(sealed) == 12 + len(b"secret") + 16
    assert sealed != seal_key(b"secret", AEAD_KEY, FED_ID, "site-1", "site-2", FP)  # a fresh nonce every time
    assert open_key(sealed, AEAD_KEY, FED_ID, "site-1", "site-2", FP) == b"secret"
    for other in (
        dict(sender="site-3"),
        dict(recipient="site-3"),
        dict(key_fingerprint="cd" * 32),
        dict(fed_id=bytes(32)),
        dict(aead_key=bytes([1]) * 32),
    ):
        args = dict(aead_key=AEAD_KEY, fed_id=FED_ID, sender="site-1", recipient="site-2", key_fingerprint=FP) | other
        with pytest.raises(SiteKeyError, match="fails authentication: it was altered on its way"):
            open_key(sealed, **args)
    for i in (0, 12, len(sealed) - 1):  # the nonce, the ciphertext, the tag
        flipped = bytearray(sealed)
        flipped[i] ^= 1
        with pytest.raises(SiteKeyError, match="nothing was saved"):
            open_key(bytes(flipped), AEAD_KEY, FED_ID, "site-1", "site-2", FP)
    with pytest.raises(SiteKeyError, match="too few to be one"):
        open_key(sealed[:27], AEAD_KEY, FED_ID, "site-1", "site-2", FP)


def test_the_associated_data_cannot_be_shifted_between_names():
    assert sealing_aad(FED_ID, "a", "bc", FP) != sealing_aad(FED_ID, "ab", "c", FP)
    assert sealing_aad(FED_ID, "a", "b", FP).startswith(b"lightning-fhe sealed ckks key v1\0" + FED_ID)


def announced(site: str, fingerprint: str) -> Announcement:
    return Announcement(site, b"pem", bytes(32), b"sig", fingerprint)


def test_every_announced_fingerprint_must_be_the_sites_own():
    keys = [announced("site-1", FP), announced("site-2", ""), announced("site-3", "cd" * 32)]
    check_key_fingerprints(keys, "site-2", "")  # no key yet: nothing to compare
    check_key_fingerprints(keys[:2], "site-2", FP)
    with pytest.raises(SiteKeyError, match="site 'site-3' holds another CKKS key \\(key fingerprint cdcd"):
        check_key_fingerprints(keys, "site-1", FP)


# -- over the network --------------------------------------------------------------------------------------------------


class Tampering:
    """A relay between a site and the server that flips one byte of every sealed key it passes on."""

    def __init__(self, stub, at: int = 5000) -> None:
        self._stub, self.at = stub, at

    def __getattr__(self, name):
        return getattr(self._stub, name)

    def FetchSealedKey(self, request, **options):
        for message in self._stub.FetchSealedKey(request, **options):
            if message.offset <= self.at < message.offset + len(message.ciphertext):
                data = bytearray(message.ciphertext)
                data[self.at - message.offset] ^= 0x01
                message = pb.SealedKey(
                    sender=message.sender,
                    recipient=message.recipient,
                    ciphertext=bytes(data),
                    key_fingerprint=message.key_fingerprint,
                    offset=message.offset,
                    size=message.size,
                )
            yield message


def fed_id_of(kit, address: str) -> bytes:
    """The federation id the sites sign under: the kit's, and the instance the server drew for this federation."""
    return federation_id(kit.ca_cert, kit.he_fingerprint, status_of(kit, address).federation_instance)


def join_request(kit, identity: MaskIdentity, fed_id: bytes, key_fingerprint: str = "", max_wait_s: float = 30.0):
    request = join_request_for(kit, weight=WEIGHTS[kit.name], max_wait_s=max_wait_s)
    key = identity.announce(kit.name, kit.cert, kit.key, fed_id, key_fingerprint)
    request.mask_key.CopyFrom(mask_key_message(key))
    return request


def obtain_all(kits: Path, names, address: str, clients: dict | None = None) -> dict:
    """Every site joins and obtains the key at once, as HEFederation does before it builds its cipher pool."""
    results: dict = {}

    def run(name):
        try:
            with AggregatorClient(kits / name, address) as client:
                results[name] = join_and_obtain_site_key(client, ENCRYPTED, PLAINTEXT, weight=WEIGHTS[name])
        except BaseException as err:  # noqa: BLE001 - reported below
            results[name] = err

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    errors = {n: r for n, r in results.items() if isinstance(r, BaseException)}
    assert not errors, errors
    return results


def secret_key_bytes(context: HEContext) -> bytes:
    """SEAL's own serialization of the secret key: what any copy of the key, in any file, contains."""
    fd = os.memfd_create("secret-key")
    try:
        context.secret_key().save(f"/proc/self/fd/{fd}")
        return Path(f"/proc/self/fd/{fd}").read_bytes()
    finally:
        os.close(fd)


@pytest.mark.parametrize("names", [("site-1", "site-2"), ("site-2", "site-1", "site-3")], ids=["2 sites", "3 sites"])
def test_sites_make_the_key_federate_with_it_and_no_one_else_holds_it(tmp_path, names):
    """2 sites federate unmasked, 3 masked (every member announced a key); a site restarts before round 2."""
    kits = provision_sites_key(tmp_path / "kits", tuple(sorted(names)))
    server = start_server(kits, tmp_path / "state", rounds=2)
    address = f"127.0.0.1:{server.port}"
    try:
        obtained = obtain_all(kits, names, address)
        fingerprints = {kit.key_fingerprint for kit in obtained.values()}
        assert len(fingerprints) == 1 and "" not in fingerprints
        key_files = {(kits / name / "he_context.tenseal").read_bytes() for name in names}
        assert len(key_files) == 1  # the same key, saved byte for byte alike
        for name in names:
            assert (kits / name / "he_context.tenseal").stat().st_mode & 0o777 == 0o600
            assert {load_site_kit(kits / name).key_fingerprint} == fingerprints
        restarted = "site-2"  # it stops after round 1 and comes back from its kit folder alone

        sites = [Site(load_site_kit(kits / name), address) for name in names]

        def restart_after_round_1(site: Site, round_number: int) -> None:
            if site.name == restarted and round_number == 2:
                raise _Restart

        run_sites_with_restart(sites, restart_after_round_1, kits, address)
        assert server.wait(timeout=30) == 0
    finally:
        server.stop()
    decrypted = {site.name: {r: site.decrypted[r] for r in (1, 2)} for site in sites}
    for r in (1, 2):
        for site in sites:
            site.check_round(r, names)
            np.testing.assert_array_equal(decrypted[site.name][r], decrypted[names[0]][r])  # the same global model
    # What is outside the sites' kit folders: the CA, the server's kit and state_dir. No secret key anywhere there.
    key = HEContext(ts.context_from(next(iter(key_files))))
    raw = secret_key_bytes(key)
    secret_context = next(iter(key_files))
    outside = [p for p in (kits / "ca").rglob("*")] + [p for p in (kits / "server").rglob("*")]
    outside += list((tmp_path / "state").rglob("*"))
    outside = [p for p in outside if p.is_file()]
    assert (tmp_path / "state" / SEALED_KEYS_FILE) in outside
    windows = [raw[i : i + 32] for i in range(1000, len(raw), len(raw) // 16)] + [secret_context[2000:2064]]
    assert all(window in secret_context for window in windows)  # the search would find the key where it is
    for path in outside:
        data = path.read_bytes()
        assert secret_context not in data and not any(window in data for window in windows), path
        if path.suffix == ".tenseal":
            assert not ts.context_from(data).has_secret_key(), path
    for name in names:  # in the site kits, only he_context.tenseal holds it
        for path in (p for p in (kits / name).rglob("*") if p.is_file()):
            if path.name != "he_context.tenseal":
                assert not any(window in path.read_bytes() for window in windows), path
            if path.name == "he_params.tenseal":
                assert not ts.context_from(path.read_bytes()).has_secret_key()


class _Restart(Exception):
    pass


def run_sites_with_restart(sites, before_submit, kits: Path, address: str) -> None:
    """``run_sites``, except that a site whose ``before_submit`` raises ``_Restart`` drops its connection and
    resumes from its kit folder, reloaded from disk (the key included), with a new client."""

    def run(site: Site) -> None:
        site.run(before_submit=before_submit)
        if isinstance(site.error, _Restart):
            site.error = None
            site.kit = load_site_kit(kits / site.name)  # the key from its saved file
            site.cipher = type(site.cipher)(site.kit.he_context)
            resume(site)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
        assert not t.is_alive()
    for s in sites:
        if s.error is not None:
            raise AssertionError(f"{s.name} failed: {s.error!r}") from s.error


def resume(site: Site) -> None:
    try:
        with site.client() as client:
            info = client.join(WEIGHTS[site.name], ENCRYPTED, PLAINTEXT)
            assert info.current_round == 2, info
            for r in range(info.current_round, info.rounds + 1):
                client.submit(r, site.chunks(r, info.share), update_of(site.name, r)[1])
                model = client.fetch_global(r)
                site.models[r] = model
                site.decrypted[r] = site.cipher.decrypt(model.encrypted_chunks, ENCRYPTED.numel, model.total_share)
    except BaseException as err:  # noqa: BLE001 - reported by the test
        site.error = err


def test_a_tampering_relay_is_caught_and_nothing_is_saved(tmp_path):
    names = ("site-1", "site-2")
    kits = provision_sites_key(tmp_path / "kits", names)
    server = start_server(kits, tmp_path / "state", rounds=1)
    address = f"127.0.0.1:{server.port}"
    try:
        identities = {name: MaskIdentity.load_or_create(kits / name) for name in names}
        kit = {name: load_site_kit(kits / name) for name in names}
        fed_id = fed_id_of(kit["site-1"], address)
        replies = {}

        def join(name):
            with site_channel(kit[name], address) as channel:
                replies[name] = stub(channel).Join(join_request(kit[name], identities[name], fed_id), timeout=60)

        threads = [threading.Thread(target=join, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        reply = replies["site-2"]
        announcements = [Announcement(k.site, k.certificate, k.public_key, k.signature, k.key_fingerprint)
                         for k in reply.mask_keys]
        with AggregatorClient(kit["site-1"], address) as client:  # the maker shares through the honest server
            made = obtain_site_key(KeyCalls.of(client), kit["site-1"], identities["site-1"], reply.members,
                                   announcements, fed_id=fed_id)
        with AggregatorClient(kit["site-2"], address) as client:
            calls = KeyCalls.of(client)
            with pytest.raises(SiteKeyError, match="'site-1' for 'site-2' fails authentication.*nothing was saved"):
                obtain_site_key(replace(calls, stub=Tampering(calls.stub)), kit["site-2"], identities["site-2"],
                                reply.members, announcements, fed_id=fed_id)
            assert load_site_kit(kits / "site-2").awaits_site_key
            assert not (kits / "site-2" / "he_context.tenseal").exists()
            got = obtain_site_key(
                calls, kit["site-2"], identities["site-2"], reply.members, announcements, fed_id=fed_id
            )
        assert got.key_fingerprint == made.key_fingerprint
    finally:
        server.stop()


def test_a_site_holding_another_key_is_refused(tmp_path):
    names = ("site-1", "site-2")
    kits = provision_sites_key(tmp_path / "kits", names)
    server = start_server(kits, tmp_path / "state", rounds=1)
    address = f"127.0.0.1:{server.port}"
    try:
        obtained = obtain_all(kits, names, address)
        shared = obtained["site-1"].key_fingerprint
        folder = kits / "site-2"
        original = {name: (folder / name).read_bytes() for name in ("he_context.tenseal", "site.yaml")}
        # A key file replaced by hand: the kit no longer loads, before anything reaches the server.
        other = HEContext.generate(obtained["site-2"].params)
        (folder / "he_context.tenseal").write_bytes(other.serialize(True))
        with pytest.raises(KitError, match="does not hold the key site.yaml names"):
            load_site_kit(folder)
        # A consistent kit with another key (as if site-2 had made its own): the server refuses its join.
        (folder / "site.yaml").write_text(original["site.yaml"].decode().replace(shared, key_fingerprint(other)))
        tampered = load_site_kit(folder)
        assert tampered.key_fingerprint == key_fingerprint(other) != shared
        identity = MaskIdentity.load_or_create(folder)
        fed_id = fed_id_of(tampered, address)
        with site_channel(tampered, address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                stub(channel).Join(join_request(tampered, identity, fed_id, tampered.key_fingerprint), timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"site 'site-2' holds another CKKS key (key fingerprint {tampered.key_fingerprint})" in (
            info.value.details()
        )
        assert f"than the one 'site-1' made for the federation ({shared})" in info.value.details()
        with AggregatorClient(tampered, address) as client:  # the client announces the key its kit holds
            with pytest.raises(FederationError, match="site 'site-2' holds another CKKS key") as refused:
                client.join(WEIGHTS["site-2"], ENCRYPTED, PLAINTEXT)
        assert refused.value.reason is Reason.MISMATCH
        # The same check at a site, should a server relay it: site-1 refuses to work beside site-2.
        with pytest.raises(SiteKeyError, match="site 'site-2' holds another CKKS key"):
            check_key_fingerprints([announced("site-2", tampered.key_fingerprint)], "site-1", shared)
        for name, data in original.items():
            (folder / name).write_bytes(data)
        restored = load_site_kit(folder)
        with site_channel(restored, address) as channel:
            reply = stub(channel).Join(join_request(restored, identity, fed_id, restored.key_fingerprint), timeout=30)
        assert [k.key_fingerprint for k in reply.mask_keys if k.site == "site-2"] == [shared]
    finally:
        server.stop()


def test_the_maker_stopped_before_sharing_shares_the_same_key_next_time(tmp_path):
    """The key is staged in the kit before it is shared and confirmed in site.yaml after: a maker that stopped in
    between shares the staged key, never a second one."""
    names = ("site-1", "site-2")
    kits = provision_sites_key(tmp_path / "kits", names)
    staged = HEContext.generate(load_site_kit(kits / "site-1").params)
    (kits / "site-1" / "he_context.tenseal").write_bytes(staged.serialize(True))  # as stage_site_key leaves it
    server = start_server(kits, tmp_path / "state", rounds=1)
    try:
        obtained = obtain_all(kits, names, f"127.0.0.1:{server.port}")
    finally:
        server.stop()
    assert {kit.key_fingerprint for kit in obtained.values()} == {key_fingerprint(staged)}


def test_without_every_members_mask_key_there_is_no_key_exchange(tmp_path):
    names = ("site-1", "site-2")
    kits = provision_sites_key(tmp_path / "kits", names)
    server = start_server(kits, tmp_path / "state", rounds=1)
    address = f"127.0.0.1:{server.port}"
    try:
        errors = {}

        def plain_join():  # site-1 joins as a site that does not mask: no announcement
            with AggregatorClient(kits / "site-1", address, masking=False) as client:
                client.join(WEIGHTS["site-1"], ENCRYPTED, PLAINTEXT)

        thread = threading.Thread(target=plain_join)
        thread.start()
        with AggregatorClient(kits / "site-2", address) as client:
            with pytest.raises(SiteKeyError, match="the server relays no mask keys: a member joined without one") as e:
                join_and_obtain_site_key(client, ENCRYPTED, PLAINTEXT, weight=WEIGHTS["site-2"])
            errors["site-2"] = e.value
        thread.join(30)
        assert errors["site-2"].reason is Reason.MISMATCH and isinstance(errors["site-2"], FederationError)
        assert load_site_kit(kits / "site-2").awaits_site_key
        assert list((kits / "site-2").glob(f"masking/*/{KEY_FILE}"))  # its X25519 key stays: it announced it
    finally:
        server.stop()


def test_an_already_saved_key_needs_no_exchange(tmp_path):
    kits = provision_sites_key(tmp_path / "kits", ("site-1",))
    kit = save_site_key(kits / "site-1", HEContext.generate(load_site_kit(kits / "site-1").params))

    class NoServer:
        kit = None

    NoServer.kit = kit
    assert join_and_obtain_site_key(NoServer(), ENCRYPTED, PLAINTEXT, weight=1.0) is kit



@pytest.mark.slow
def test_hefederation_gets_the_sites_key_before_it_trains(tmp_path):
    """The callback in real site processes: kits without a key, two rounds, the exact average at both sites."""
    from test_federation_e2e import assert_rounds_average, federate

    kits = provision_sites_key(tmp_path / "kits", ("site-1", "site-2"))
    results = federate(kits, tmp_path, {"site-1": ["--seed", "0"], "site-2": ["--seed", "1"]}, rounds=2)
    assert_rounds_average(results, {"site-1": 64.0, "site-2": 80.0}, rounds=2)
    keys = {(kits / name / "he_context.tenseal").read_bytes() for name in ("site-1", "site-2")}
    assert len(keys) == 1 and not load_site_kit(kits / "site-2").awaits_site_key
