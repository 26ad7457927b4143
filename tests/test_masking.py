"""Pairwise masks under HE: the masks cancel in the sum exactly, one upload alone is noise, and the keys behind them
come only from announcements that the federation's CA vouches for.

Pure and fast: numpy, ``cryptography`` and one CKKS context (for the real first prime and ring dimension).
"""

from __future__ import annotations

import datetime as dt
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from lightning_fhe.he.codec import ChunkSum, UpdateCipher
from lightning_fhe.he.frames import (
    CiphertextError,
    decode_upload_chunk,
    encode_upload_chunk,
)
from lightning_fhe.he.modular import add_mod, sub_mod
from lightning_fhe.he.seeded import CiphertextLayout
from lightning_fhe.masking import (
    Announcement,
    MaskIdentity,
    MaskKeyError,
    MaskReuseError,
    PairwiseMasks,
    chunk_nonce,
    federation_id,
    keystream_mod,
    verify_announcements,
)
from lightning_fhe.masking.keys import KEY_FILE
from lightning_fhe.provision.certs import issue_client_cert, issue_server_cert, make_ca

FINGERPRINT = "0123456789abcdef0123456789abcdef"
# Names whose str order is not their numeric order, so a sign taken from anything but str order would show.
SITES = ("site-1", "site-10", "site-2", "site_3", "hospital-a")


@pytest.fixture(scope="module")
def layout(site_context) -> CiphertextLayout:
    return CiphertextLayout(site_context)


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


@pytest.fixture(scope="module")
def masks_for(ca, federation, layout):
    """``masks_for(members)``: each member's masks, its seeds derived from the verified announcements."""
    fed_id, _, identities, announcements = federation

    def make(members) -> dict[str, PairwiseMasks]:
        keys = verify_announcements([announcements[s] for s in members], ca.cert_pem, members, fed_id)
        return {
            site: PairwiseMasks(site, identities[site].pair_seeds(site, keys, fed_id), layout.q0, layout.n)
            for site in members
        }

    return make


def _random_frames(layout, rng, count) -> list[bytes]:
    """``count`` upload chunks with random first polynomials below q0 and their own random seeds."""
    return [
        encode_upload_chunk(rng.integers(0, layout.q0, layout.n, dtype=np.uint64), int(rng.integers(1, 3)),
                            rng.bytes(64))
        for _ in range(count)
    ]


def _c0(frame: bytes, layout) -> np.ndarray:
    return decode_upload_chunk(frame, layout.n, layout.q0).c0


def _sum(frames, layout) -> np.ndarray:
    total = np.zeros(layout.n, dtype=np.uint64)
    for frame in frames:
        add_mod(total, _c0(frame, layout), layout.q0)
    return total


# -- the masks cancel in the sum, and only there ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [3, 5])
def test_masked_chunks_sum_to_the_unmasked_sum_exactly(masks_for, layout, size):
    members = list(SITES[:size])
    masks = masks_for(members)
    rng = np.random.default_rng(size)
    for chunk_index in range(3):
        frames = dict(zip(members, _random_frames(layout, rng, size)))
        masked = {s: masks[s].apply(frames[s], 4, 1, members, chunk_index) for s in members}
        assert np.array_equal(_sum(masked.values(), layout), _sum(frames.values(), layout))
        for site in members:  # one upload alone: uniform noise modulo q0
            alone, plain = _c0(masked[site], layout), _c0(frames[site], layout)
            assert (alone != plain).mean() > 0.999
            assert abs(float(np.mean(alone / layout.q0)) - 0.5) < 0.02  # the mean of 8192 uniforms: sd 0.0032, so 6 sd
            mask = (alone.astype(object) - plain.astype(object)) % layout.q0  # the mask itself, also uniform
            assert abs(float(np.mean(mask / layout.q0)) - 0.5) < 0.02  # the mean of 8192 uniforms: sd 0.0032, so 6 sd


def test_a_proper_subset_of_masked_chunks_is_still_masked(masks_for, layout):
    members = list(SITES[:4])
    masks = masks_for(members)
    frames = dict(zip(members, _random_frames(layout, np.random.default_rng(0), 4)))
    masked = {s: masks[s].apply(frames[s], 1, 0, members, 0) for s in members}
    three = members[:3]
    assert (_sum([masked[s] for s in three], layout) != _sum([frames[s] for s in three], layout)).mean() > 0.999


def test_the_decrypted_sum_of_masked_uploads_is_the_unmasked_one_bit_for_bit(masks_for, layout, site_context):
    members = list(SITES[:3])
    masks = masks_for(members)
    cipher = UpdateCipher(site_context)
    rng = np.random.default_rng(1)
    count = layout.n + 100  # two chunks
    uploads = {site: cipher.encrypt(rng.normal(0, 0.1, count), 1 / 3) for site in members}
    plain, masked = ChunkSum.for_context(site_context, 2), ChunkSum.for_context(site_context, 2)
    for site in members:
        for i, frame in enumerate(uploads[site]):
            plain.add(i, frame)
            masked.add(i, masks[site].apply(frame, 2, 0, members, i))
    assert masked.chunks() == plain.chunks()  # the same global chunks, byte for byte
    alone = ChunkSum.for_context(site_context, 2)
    for i, frame in enumerate(uploads[members[0]]):
        alone.add(i, masks[members[0]].apply(frame, 2, 0, members, i))
    noise = cipher.decrypt(alone.chunks(), count, 1.0)  # even with the secret key, one upload decrypts to garbage
    assert np.median(np.abs(noise)) > 1e3


def test_the_mask_changes_with_the_attempt_the_members_and_the_chunk(masks_for, layout):
    members = list(SITES[:3])
    masks = masks_for([*members, SITES[3]])
    me, seed = members[0], bytes(64)
    first = masks[me].mask(1, 0, members, seed, 0)
    for other in (
        masks[me].mask(1, 1, members, seed, 0),
        masks[me].mask(1, 0, [*members, SITES[3]], seed, 0),
        masks[me].mask(1, 0, members, seed, 1),
        masks[me].mask(2, 0, members, seed, 0),
    ):
        assert (other != first).mean() > 0.999


def test_remove_takes_off_what_apply_added(masks_for, layout):
    members = list(SITES[:3])
    masks = masks_for(members)
    (frame,) = _random_frames(layout, np.random.default_rng(2), 1)
    masked = masks[members[1]].apply(frame, 3, 0, members, 5)
    assert masked != frame and len(masked) == len(frame)
    assert masks[members[1]].remove(masked, 3, 0, members, 5) == frame
    assert decode_upload_chunk(masked, layout.n, layout.q0).seed == decode_upload_chunk(frame, layout.n, layout.q0).seed


def test_a_mask_never_covers_two_different_ciphertexts(masks_for, layout):
    members = list(SITES[:3])
    masks = masks_for(members)[members[0]]
    frame, other = _random_frames(layout, np.random.default_rng(3), 2)
    masked = masks.apply(frame, 5, 0, members, 0)
    assert masks.apply(frame, 5, 0, members, 0) == masked  # re-sending the same bytes: the same upload
    with pytest.raises(MaskReuseError, match="chunk 0 in round 5, attempt 0"):
        masks.apply(other, 5, 0, members, 0)
    masks.apply(other, 5, 1, members, 0)  # a new attempt: a new mask
    masks.apply(other, 6, 0, members, 0)  # a new round
    with pytest.raises(MaskReuseError, match="round 5 after round 6"):
        masks.apply(frame, 5, 0, members, 0)


def test_many_peers_on_either_side_give_the_mask_of_the_definition(layout):
    # 40 peers, 20 below and 20 above this site's name: more than a lazily reduced sum holds (15) on either side.
    rng = np.random.default_rng(4)
    peers = {f"site-{i:02d}": rng.bytes(32) for i in range(41) if i != 20}
    masks = PairwiseMasks("site-20", peers, layout.q0, layout.n)
    members = ["site-20", *peers]
    nonce = chunk_nonce(7, 2, members, 3)
    expected = np.zeros(layout.n, dtype=np.uint64)
    for peer, seed in peers.items():
        (add_mod if "site-20" < peer else sub_mod)(expected, keystream_mod(seed, nonce, layout.q0, layout.n), layout.q0)
    assert np.array_equal(masks.mask(7, 2, members, bytes(64), 3), expected)


def test_members_must_include_this_site_and_only_peers_with_seeds(layout):
    masks = PairwiseMasks("a", {"b": bytes(32)}, layout.q0, layout.n)
    for members, match in ((["b"], "do not include this site, 'a'"), (["a", "b", "c"], r"no mask seed with \['c'\]"),
                           (["a", "b", "a"], "name a site twice")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            masks.mask(0, 0, members, bytes(64), 0)
    assert masks.mask(0, 0, ["a"], bytes(64), 0).tolist() == [0] * layout.n  # alone: nothing to mask with
    with pytest.raises(CiphertextError):
        masks.apply(b"\x02" + bytes(10), 0, 0, ["a", "b"], 0)
    with pytest.raises(ValueError, match="seeds are for its peers"):
        PairwiseMasks("a", {"a": bytes(32)}, layout.q0, layout.n)


# -- the keystream and the nonce ---------------------------------------------------------------------------------------


def _reference_keystream(seed: bytes, nonce: bytes, q: int, n: int) -> list[int]:
    """The documented procedure one word at a time, as another implementation would write it."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(4) + nonce), mode=None).encryptor()
    bits, out = (q - 1).bit_length(), []
    while len(out) < n:
        word = int.from_bytes(stream.update(bytes(8)), "little") & ((1 << bits) - 1)
        if word < q:
            out.append(word)
    return out


@pytest.mark.parametrize("q", [97, 2**7, 1152921504606830593])
def test_the_keystream_follows_the_documented_procedure(q):
    seed, nonce = bytes(range(32)), bytes(range(12))
    values = keystream_mod(seed, nonce, q, 3000)
    assert values.dtype == np.uint64 and values.shape == (3000,)
    assert values.tolist() == _reference_keystream(seed, nonce, q, 3000)
    assert np.array_equal(values, keystream_mod(seed, nonce, q, 3000))  # deterministic
    assert np.array_equal(values[:10], keystream_mod(seed, nonce, q, 10))  # a longer draw only continues the stream


def test_rejection_keeps_the_keystream_in_range_and_uniform():
    # 97 keeps 7 bits of each word: about a quarter of the words are 97..127 and must be dropped.
    values = keystream_mod(bytes(32), bytes(12), 97, 97 * 200)
    assert int(values.max()) == 96 and int(values.min()) == 0
    counts = np.bincount(values.astype(np.int64), minlength=97)
    assert counts.min() > 120 and counts.max() < 290  # 200 expected per value
    raw = np.frombuffer(Cipher(algorithms.ChaCha20(bytes(32), bytes(16)), mode=None).encryptor().update(bytes(800)),
                        dtype="<u8") & np.uint64(127)
    assert (raw >= 97).any()  # rejection did happen in this stream
    assert values[:5].tolist() == raw[raw < 97][:5].tolist()


def test_the_keystream_differs_by_seed_and_nonce():
    base = keystream_mod(bytes(32), bytes(12), 2**61 - 1, 64)
    assert not np.array_equal(base, keystream_mod(bytes([1]) + bytes(31), bytes(12), 2**61 - 1, 64))
    assert not np.array_equal(base, keystream_mod(bytes(32), bytes([1]) + bytes(11), 2**61 - 1, 64))
    with pytest.raises(ValueError, match="32-byte seed"):
        keystream_mod(bytes(16), bytes(12), 97, 1)


def test_the_chunk_nonce_binds_every_field_and_not_the_members_order():
    base = chunk_nonce(3, 1, ["b", "a", "c"], 9)
    assert len(base) == 12 and base == chunk_nonce(3, 1, ["a", "b", "c"], 9)
    others = [chunk_nonce(4, 1, ["a", "b", "c"], 9), chunk_nonce(3, 2, ["a", "b", "c"], 9),
              chunk_nonce(3, 1, ["a", "b"], 9), chunk_nonce(3, 1, ["a", "bc"], 9), chunk_nonce(3, 1, ["ab", "c"], 9),
              chunk_nonce(3, 1, ["a", "b", "c"], 10)]  # fmt: skip
    assert len({base, *others}) == 1 + len(others)
    with pytest.raises(ValueError, match="attempt"):
        chunk_nonce(0, -1, ["a"], 0)


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
