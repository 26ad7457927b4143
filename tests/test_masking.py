"""The keys behind pairwise masks: pair seeds agree on both sides, and come only from announcements that the
federation's CA vouches for.
"""

from __future__ import annotations

import datetime as dt
import stat

import pytest

from lightning_fhe.masking import (
    Announcement,
    MaskIdentity,
    MaskKeyError,
    federation_id,
    verify_announcements,
)
from lightning_fhe.masking.keys import KEY_FILE
from lightning_fhe.provision.certs import issue_client_cert, issue_server_cert, make_ca

FINGERPRINT = "0123456789abcdef0123456789abcdef"
# Names whose str order is not their numeric order, so a sign taken from anything but str order would show.
SITES = ("site-1", "site-10", "site-2", "site_3", "hospital-a")


@pytest.fixture(scope="module")
def ca():
    return make_ca("spleen-fl")


@pytest.fixture(scope="module")
def federation(ca):
    """Every site's TLS identity and mask identity, their announcements, and the federation id."""
    fed_id = federation_id(ca.cert_pem, FINGERPRINT)
    tls = {site: issue_client_cert(ca, site) for site in SITES}
    identities = {site: MaskIdentity.generate() for site in SITES}
    announcements = {
        site: identities[site].announce(site, tls[site].cert_pem, tls[site].key_pem, fed_id) for site in SITES
    }
    return fed_id, tls, identities, announcements


# -- pair seeds --------------------------------------------------------------------------------------------------------


def test_pair_seeds_agree_on_both_sides_and_differ_by_pair_and_federation(ca, federation):
    fed_id, _, identities, _ = federation
    keys = {site: identities[site].public_key for site in SITES}
    seeds = {site: identities[site].pair_seeds(site, keys, fed_id) for site in SITES}
    for a in SITES:
        assert set(seeds[a]) == set(SITES) - {a}  # its own entry skipped
        for b in seeds[a]:
            assert seeds[a][b] == seeds[b][a] and len(seeds[a][b]) == 32
    all_seeds = [seeds[a][b] for a in SITES for b in seeds[a] if a < b]
    assert len(set(all_seeds)) == len(all_seeds)
    other_fed = federation_id(ca.cert_pem, "another fingerprint")
    assert identities[SITES[0]].pair_seeds(SITES[0], keys, other_fed)[SITES[1]] != seeds[SITES[0]][SITES[1]]
    aead = identities[SITES[0]].aead_keys(SITES[0], keys, fed_id)
    assert aead[SITES[1]] == identities[SITES[1]].aead_keys(SITES[1], keys, fed_id)[SITES[0]]
    assert aead[SITES[1]] != seeds[SITES[0]][SITES[1]]


def test_a_low_order_or_malformed_peer_key_is_refused():
    me = MaskIdentity.generate()
    for bad in (bytes(32), bytes([1]) + bytes(31), bytes(31)):
        with pytest.raises(MaskKeyError, match="site 'mallory'.*substituted"):
            me.pair_seeds("alice", {"mallory": bad}, bytes(32))


def test_the_entry_for_this_site_must_be_its_own_key():
    me = MaskIdentity.generate()
    with pytest.raises(MaskKeyError, match="site 'alice': the key announced for this site is not its own"):
        me.pair_seeds("alice", {"alice": MaskIdentity.generate().public_key}, bytes(32))


def test_the_federation_id_depends_on_the_ca_and_the_fingerprint(ca):
    fed_id = federation_id(ca.cert_pem, FINGERPRINT)
    assert len(fed_id) == 32 and fed_id == federation_id(ca.cert_pem, FINGERPRINT)
    assert fed_id != federation_id(make_ca("spleen-fl").cert_pem, FINGERPRINT)
    assert fed_id != federation_id(ca.cert_pem, FINGERPRINT[:-1] + "0")


# -- announcements -----------------------------------------------------------------------------------------------------


def test_good_announcements_give_every_members_key(ca, federation):
    fed_id, _, identities, announcements = federation
    members = list(SITES[:4])
    keys = verify_announcements(reversed([announcements[s] for s in members]), ca.cert_pem, members, fed_id)
    assert list(keys) == members and all(keys[s] == identities[s].public_key for s in members)


def test_an_announcement_with_its_own_ckks_key_fingerprint_is_covered_by_the_signature(ca, federation):
    fed_id, tls, identities, _ = federation
    site = SITES[0]
    own = identities[site].announce(site, tls[site].cert_pem, tls[site].key_pem, fed_id, key_fingerprint="abc")
    assert verify_announcements([own], ca.cert_pem, [site], fed_id) == {site: identities[site].public_key}
    changed = Announcement(site, own.certificate, own.public_key, own.signature, key_fingerprint="abd")
    with pytest.raises(MaskKeyError, match=f"site '{site}': the signature .* does not verify"):
        verify_announcements([changed], ca.cert_pem, [site], fed_id)


def _refused(announcements, ca_pem, members, fed_id, match, now=None):
    with pytest.raises(MaskKeyError, match=match) as caught:
        verify_announcements(announcements, ca_pem, members, fed_id, now)
    assert "the server may have substituted a key" in str(caught.value)


def test_a_substituted_public_key_is_refused(ca, federation):
    fed_id, _, _, announcements = federation
    members = list(SITES[:3])
    good = [announcements[s] for s in members]
    swapped = Announcement(members[1], good[1].certificate, MaskIdentity.generate().public_key, good[1].signature)
    _refused([good[0], swapped, good[2]], ca.cert_pem, members, fed_id, f"site '{members[1]}': the signature")
    stolen = Announcement(members[1], good[1].certificate, good[0].public_key, good[1].signature)
    _refused([good[0], stolen, good[2]], ca.cert_pem, members, fed_id, f"site '{members[1]}': the signature")


def test_an_announcement_of_another_federation_is_refused(ca, federation):
    _, _, _, announcements = federation
    other = federation_id(ca.cert_pem, "another provisioning run")
    _refused([announcements[SITES[0]]], ca.cert_pem, [SITES[0]], other, f"site '{SITES[0]}': the signature")


def test_a_certificate_from_another_ca_is_refused(ca, federation):
    fed_id, _, _, announcements = federation
    intruder = issue_client_cert(make_ca("spleen-fl"), SITES[1])  # same name, same organisation, wrong CA
    forged = MaskIdentity.generate().announce(SITES[1], intruder.cert_pem, intruder.key_pem, fed_id)
    _refused([announcements[SITES[0]], forged], ca.cert_pem, list(SITES[:2]), fed_id,
             f"site '{SITES[1]}': its certificate is not issued by the federation's CA")


def test_a_certificate_of_another_site_or_of_the_server_is_refused(ca, federation):
    fed_id, _, _, announcements = federation
    a, b = SITES[:2]
    posing = Announcement(a, announcements[b].certificate, announcements[b].public_key, announcements[b].signature)
    _refused([posing, announcements[b]], ca.cert_pem, [a, b], fed_id, f"site '{a}': its certificate is issued to '{b}'")
    server = issue_server_cert(ca, a)  # a server whose host name is a site's name
    as_site = MaskIdentity.generate().announce(a, server.cert_pem, server.key_pem, fed_id)
    _refused([as_site], ca.cert_pem, [a], fed_id, f"site '{a}': its certificate is not a site's")


def test_an_expired_certificate_is_refused(ca, federation):
    fed_id, _, _, announcements = federation
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=5000)
    _refused([announcements[SITES[0]]], ca.cert_pem, [SITES[0]], fed_id, f"site '{SITES[0]}': its certificate is valid",
             now=later)


def test_a_missing_duplicate_or_extra_announcement_is_refused(ca, federation):
    fed_id, _, _, announcements = federation
    a, b, c = SITES[:3]
    _refused([announcements[a], announcements[c]], ca.cert_pem, [a, b, c], fed_id, f"site '{b}' has no announcement")
    _refused([announcements[a], announcements[b], announcements[a]], ca.cert_pem, [a, b], fed_id,
             f"site '{a}' is announced twice")
    _refused([announcements[a], announcements[c]], ca.cert_pem, [a], fed_id, f"site '{c}' is announced but is not")


def test_announce_refuses_a_tls_key_of_another_certificate(federation):
    fed_id, tls, identities, _ = federation
    a, b = SITES[:2]
    with pytest.raises(MaskKeyError, match=f"site '{a}': its TLS key does not belong"):
        identities[a].announce(a, tls[a].cert_pem, tls[b].key_pem, fed_id)
    with pytest.raises(MaskKeyError, match=f"site '{a}': its certificate is issued to '{b}'"):
        identities[a].announce(a, tls[b].cert_pem, tls[b].key_pem, fed_id)


# -- the key file ------------------------------------------------------------------------------------------------------


def test_the_key_file_is_private_and_reloads_the_same_key(tmp_path):
    created = MaskIdentity.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert MaskIdentity.load_or_create(tmp_path).public_key == created.public_key
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no staging file left behind
    assert len(created.public_key) == 32 and created.public_key.hex() in repr(created)


def test_a_corrupt_key_file_is_refused_naming_the_path(tmp_path):
    path = tmp_path / KEY_FILE
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n")
    with pytest.raises(MaskKeyError, match=str(path)):
        MaskIdentity.load_or_create(tmp_path)
    path.write_bytes(make_ca("x").key_pem)  # a key, but not an X25519 one
    with pytest.raises(MaskKeyError, match=f"{path}: holds a .*, not an X25519 mask key"):
        MaskIdentity.load_or_create(tmp_path)
