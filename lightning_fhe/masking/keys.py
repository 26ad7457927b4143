"""The keys behind pairwise masks: one X25519 key pair per site, announced under its TLS certificate.

Every pair of sites needs a seed that only the two of them know, while they talk only through the server. Each site
has an X25519 key pair (:class:`MaskIdentity`) and announces its public key signed with its TLS client key
(:meth:`MaskIdentity.announce`); the server relays the announcements; every site checks them against the
federation's CA (:func:`verify_announcements`) and derives one seed per peer (:meth:`MaskIdentity.pair_seeds`). A
server that swaps a public key for its own cannot sign the swap, so it cannot sit in the middle of a pair.

Everything is bound to the federation (:func:`federation_id`: the CA certificate and the CKKS key's fingerprint,
which every kit of one provisioning run holds and the server cannot change), so a seed or a signature of one
federation is worthless in another, even where a site reuses its key file.

Bytes that both sides must build alike (all integers big-endian; ``lp(x)`` is ``len(x)`` as a u32 then ``x``)::

    federation id      SHA-256( "lightning-fhe federation id v1\\0" || DER(CA certificate) || he_fingerprint )
    signed message     "lightning-fhe mask announcement v1\\0" || federation id (32) || lp(site) || public key (32)
                       || lp(key_fingerprint)                                      ECDSA P-256 with SHA-256
    pair seed          HKDF-SHA256(ikm = X25519(mine, theirs), salt = federation id, length 32,
                       info = "lightning-fhe mask pair seed v1\\0" || lp(a) || lp(b) || key(a) || key(b))
    AEAD key           the same with info label "lightning-fhe mask aead key v1\\0"

where ``a < b`` are the pair's two site names (Python's ``str`` order) and strings are UTF-8.

Example, two sites that derive the same seed::

    >>> fed = bytes(32)
    >>> alice, bob = MaskIdentity.generate(), MaskIdentity.generate()
    >>> seeds_a = alice.pair_seeds("alice", {"bob": bob.public_key}, fed)
    >>> seeds_b = bob.pair_seeds("bob", {"alice": alice.public_key}, fed)
    >>> seeds_a["bob"] == seeds_b["alice"], len(seeds_a["bob"])
    (True, 32)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID

from lightning_fhe.he.context import write_private_file
from lightning_fhe.masking.announcement import Announcement
from lightning_fhe.provision.certs import common_name

KEY_FILE = "mask_x25519.key"
KEY_BYTES = 32
FEDERATION_ID_BYTES = 32
SEED_BYTES = 32
_FEDERATION_LABEL = b"lightning-fhe federation id v1\0"
_ANNOUNCE_LABEL = b"lightning-fhe mask announcement v1\0"
_SEED_LABEL = b"lightning-fhe mask pair seed v1\0"
_AEAD_LABEL = b"lightning-fhe mask aead key v1\0"
_SUBSTITUTED = "the server may have substituted a key"


class MaskKeyError(ValueError):
    """A mask key, key file or announcement that must not be used; the message names the site (or file) and why."""


def federation_id(ca_cert_pem: bytes, he_fingerprint: str, instance: str = "") -> bytes:
    """32 bytes naming one provisioning run: every kit of the run computes the same, the server cannot change it;
    with ``instance`` (the random id the server draws for each new federation), one federation of that run, so that
    the masks of one never repeat in another made with the same kits.

    >>> from lightning_fhe.provision.certs import make_ca
    >>> ca = make_ca("spleen-fl")
    >>> len(federation_id(ca.cert_pem, "0123abcd")), federation_id(ca.cert_pem, "a") == federation_id(ca.cert_pem, "b")
    (32, False)
    """
    der = x509.load_pem_x509_certificate(ca_cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(_FEDERATION_LABEL + der + _lp(he_fingerprint.encode()) + _lp(instance.encode())).digest()


def announcement_message(fed_id: bytes, site: str, public_key: bytes, key_fingerprint: str = "") -> bytes:
    """The exact bytes a site signs to announce ``public_key`` (see the module's docstring)."""
    return _ANNOUNCE_LABEL + fed_id + _lp(site.encode()) + public_key + _lp(key_fingerprint.encode())


class MaskIdentity:
    """A site's X25519 key pair for pairwise masks, kept next to its kit (``mask_x25519.key``, PEM PKCS#8, 0600).

    Args:
        private_key: the key pair; :meth:`load_or_create` is how a site gets it.
    """

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._key = private_key
        self._public_key = private_key.public_key().public_bytes_raw()

    @property
    def public_key(self) -> bytes:
        """The 32-byte raw X25519 public key, what :meth:`announce` signs."""
        return self._public_key

    def __repr__(self) -> str:
        return f"MaskIdentity(public_key={self.public_key.hex()})"

    @classmethod
    def generate(cls) -> MaskIdentity:
        """A new key pair, in memory only."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, folder: Path) -> MaskIdentity:
        """Reads ``folder/mask_x25519.key``, or creates it (mode 0600) with a new key pair.

        Creation is atomic: the key is written and flushed to a temporary file, then linked into place, so a crash
        leaves either no key file or a complete one, and of two processes creating it at once both end up with the
        one that was linked first.

        Raises:
            MaskKeyError: the file exists but does not hold an X25519 private key (the message names the path).
        """
        path = Path(folder) / KEY_FILE
        if not path.exists():
            _create(path, X25519PrivateKey.generate())
        return cls(_load(path))

    def announce(
        self, site: str, cert_pem: bytes, tls_key_pem: bytes, fed_id: bytes, key_fingerprint: str = ""
    ) -> Announcement:
        """This site's public key signed with its TLS client key (``cert_pem``, ``tls_key_pem`` from its kit).

        Raises:
            MaskKeyError: the TLS key is not an ECDSA key, does not belong to the certificate, or the certificate
                is not issued to ``site``.
        """
        _check_fed_id(fed_id)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            tls_key = serialization.load_pem_private_key(tls_key_pem, password=None)
        except (ValueError, TypeError) as err:
            raise MaskKeyError(f"site {site!r}: its TLS certificate or key does not parse ({err})") from None
        if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
            raise MaskKeyError(f"site {site!r}: its TLS key is a {type(tls_key).__name__}, expected an ECDSA key")
        if tls_key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
            raise MaskKeyError(f"site {site!r}: its TLS key does not belong to its certificate")
        if common_name(cert) != site:
            raise MaskKeyError(f"site {site!r}: its certificate is issued to {common_name(cert)!r}")
        message = announcement_message(fed_id, site, self.public_key, key_fingerprint)
        signature = tls_key.sign(message, ec.ECDSA(hashes.SHA256()))
        return Announcement(site, cert_pem, self.public_key, signature, key_fingerprint)

    def pair_seeds(self, me: str, peers: Mapping[str, bytes], fed_id: bytes) -> dict[str, bytes]:
        """One 32-byte seed per peer, from X25519 with the peer's public key and HKDF-SHA256.

        ``peers`` maps each peer's name to its verified public key (:func:`verify_announcements`' result); an entry
        for ``me`` is skipped if it is this identity's own key. The peer derives the same seed for ``me``.

        Raises:
            MaskKeyError: a peer's key is malformed or of low order (an all-zero shared secret), or the entry for
                ``me`` is not this identity's key.
        """
        return self._derive(_SEED_LABEL, me, peers, fed_id)

    def aead_keys(self, me: str, peers: Mapping[str, bytes], fed_id: bytes) -> dict[str, bytes]:
        """One 32-byte ChaCha20Poly1305 key per peer, derived like :meth:`pair_seeds` under another label, so it is
        independent of the mask seed (to send a site-generated CKKS key to a peer)."""
        return self._derive(_AEAD_LABEL, me, peers, fed_id)

    def _derive(self, label: bytes, me: str, peers: Mapping[str, bytes], fed_id: bytes) -> dict[str, bytes]:
        _check_fed_id(fed_id)
        derived = {}
        for peer, public_key in peers.items():
            if peer == me:
                if bytes(public_key) != self.public_key:
                    raise MaskKeyError(
                        f"site {me!r}: the key announced for this site is not its own (a new {KEY_FILE} since the "
                        f"announcement, or {_SUBSTITUTED})"
                    )
                continue
            secret = self._exchange(peer, bytes(public_key))
            (a, key_a), (b, key_b) = sorted([(me, self.public_key), (peer, bytes(public_key))])
            info = label + _lp(a.encode()) + _lp(b.encode()) + key_a + key_b
            derived[peer] = HKDF(hashes.SHA256(), SEED_BYTES, salt=fed_id, info=info).derive(secret)
        return derived

    def _exchange(self, peer: str, public_key: bytes) -> bytes:
        try:
            secret = self._key.exchange(X25519PublicKey.from_public_bytes(public_key))
        except ValueError:  # wrong length, or OpenSSL's refusal of an all-zero result (a low-order point)
            secret = bytes(KEY_BYTES)
        if len(public_key) != KEY_BYTES or not any(secret):
            raise MaskKeyError(
                f"site {peer!r}: its mask public key ({len(public_key)} bytes) is not a usable X25519 key (a low-order "
                f"point gives an all-zero shared secret); {_SUBSTITUTED}"
            )
        return secret


def verify_announcements(
    announcements: Iterable[Announcement],
    ca_cert_pem: bytes,
    members: Sequence[str],
    fed_id: bytes,
    now: dt.datetime | None = None,
) -> dict[str, bytes]:
    """Checks the server's relay of the members' announcements; returns ``{site: public_key}`` for every member.

    Each member must have exactly one announcement, whose certificate the federation's CA issued directly, valid at
    ``now`` (default: the current time), to a site (common name ``site``, client authentication, neither a CA nor a
    server certificate), and whose signature verifies over :func:`announcement_message`.

    Raises:
        MaskKeyError: on the first announcement that fails, naming its site; a member without an announcement, one
            announced twice, or an announcement of a site that is not a member.
    """
    _check_fed_id(fed_id)
    if len(set(members)) != len(members):
        twice = sorted({m for m in members if list(members).count(m) > 1})
        raise MaskKeyError(f"site {twice[0]!r} is listed twice among the members {list(members)}")
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    now = dt.datetime.now(dt.timezone.utc) if now is None else now
    now = now if now.tzinfo is not None else now.replace(tzinfo=dt.timezone.utc)
    keys: dict[str, bytes] = {}
    for announcement in announcements:
        site = announcement.site
        if site not in members:
            raise MaskKeyError(f"site {site!r} is announced but is not a member {sorted(members)}; {_SUBSTITUTED}")
        if site in keys:
            raise MaskKeyError(f"site {site!r} is announced twice; {_SUBSTITUTED}")
        keys[site] = _verified(announcement, ca, fed_id, now)
    missing = [site for site in members if site not in keys]
    if missing:
        raise MaskKeyError(f"site {missing[0]!r} has no announcement (missing: {missing}); {_SUBSTITUTED}")
    return {site: keys[site] for site in members}


def _verified(announcement: Announcement, ca: x509.Certificate, fed_id: bytes, now: dt.datetime) -> bytes:
    """The announcement's public key, once its certificate and signature check out."""
    site = announcement.site

    def refuse(reason: str) -> MaskKeyError:
        return MaskKeyError(f"site {site!r}: {reason}; {_SUBSTITUTED}")

    try:
        cert = x509.load_pem_x509_certificate(announcement.certificate)
    except ValueError as err:
        raise refuse(f"its certificate does not parse ({err})") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        reason = str(err) or "the signature does not verify"
        raise refuse(f"its certificate is not issued by the federation's CA ({reason})") from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise refuse(
            f"its certificate is valid from {cert.not_valid_before_utc} to {cert.not_valid_after_utc}, not at {now}"
        )
    if common_name(cert) != site:
        raise refuse(f"its certificate is issued to {common_name(cert)!r}")
    if _is_ca(cert):
        raise refuse("its certificate is a CA certificate")
    usage = _extended_usage(cert)
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage or ExtendedKeyUsageOID.SERVER_AUTH in usage:
        raise refuse("its certificate is not a site's (client authentication only)")
    if len(announcement.public_key) != KEY_BYTES:
        raise refuse(f"its public key takes {len(announcement.public_key)} bytes, not {KEY_BYTES}")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise refuse(f"its certificate holds a {type(public).__name__}, expected an ECDSA key")
    message = announcement_message(fed_id, site, announcement.public_key, announcement.key_fingerprint)
    try:
        public.verify(announcement.signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise refuse("the signature over its mask key does not verify") from None
    return bytes(announcement.public_key)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _extended_usage(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _check_fed_id(fed_id: bytes) -> None:
    if len(fed_id) != FEDERATION_ID_BYTES:
        raise ValueError(f"a federation id takes {FEDERATION_ID_BYTES} bytes, got {len(fed_id)}")


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _create(path: Path, key: X25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_private_file(staging, pem)
        with open(staging, "rb") as written:
            os.fsync(written.fileno())
        try:
            os.link(staging, path)  # fails if another process linked its key first: that one is loaded instead
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a rename, which a racing process could overwrite
            if not path.exists():
                os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _load(path: Path) -> X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise MaskKeyError(
            f"{path}: not a PEM private key ({str(err).splitlines()[0] if str(err) else 'unreadable'}); remove it to "
            "make a new mask key (the site then announces the new one)"
        ) from None
    if not isinstance(key, X25519PrivateKey):
        raise MaskKeyError(f"{path}: holds a {type(key).__name__}, not an X25519 mask key")
    return key


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
