"""X.509 certificates for the federation's mutual TLS: a private CA, the server's certificate, one per site.

Everything is ECDSA P-256 with SHA-256: key generation takes microseconds (RSA-3072 takes a second or more per key),
and every TLS stack gRPC uses accepts it. Keys and certificates travel as PEM bytes, which is what
``grpc.ssl_server_credentials`` and ``grpc.ssl_channel_credentials`` take.

Example, two independent CAs as a server test needs them::

    >>> ours, theirs = make_ca("spleen-fl"), make_ca("intruder")
    >>> stranger = issue_client_cert(theirs, "site-1")   # same name, wrong CA: the server must refuse it
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
# 825 days: the longest validity macOS and iOS accept for a TLS server certificate, even from a private CA.
LEAF_DAYS = 825
# Back-dated a little, so a participant whose clock runs a few minutes slow does not reject a fresh certificate.
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertKeyPair:
    """A certificate and its private key, both PEM. The key is kept out of ``repr`` so logs never show it."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with its private key: what issues the server's and the sites' certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """Reloads a CA written by provisioning (``ca/ca.crt``, ``ca/ca.key``), to issue certificates for new sites."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"the CA key is a {type(key).__name__}, expected an ECDSA key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise ValueError("the CA key does not belong to the CA certificate")
        return cls(cert, key)


def make_ca(name: str, days: int = CA_DAYS) -> CertificateAuthority:
    """A new self-signed CA named ``name``; it may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(f"{name} CA", organization=name)
    builder = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return CertificateAuthority(builder.sign(key, hashes.SHA256()), key)


def issue_server_cert(ca: CertificateAuthority, host: str, days: int = LEAF_DAYS) -> CertKeyPair:
    """A TLS server certificate for ``host`` (a DNS name or an IP address).

    The names also cover ``localhost``, 127.0.0.1 and ::1, so the same kit serves a simulation on one machine.
    """
    names: list[x509.GeneralName] = []
    for entry in (host, "localhost", "127.0.0.1", "::1"):
        name = _general_name(entry)
        if name not in names:
            names.append(name)
    return _issue(
        ca,
        common_name=host,
        # clientAuth too: the operator calls the server's status with the server kit's own certificate.
        usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
        alt_names=x509.SubjectAlternativeName(names),
    )


def issue_client_cert(ca: CertificateAuthority, name: str, days: int = LEAF_DAYS) -> CertKeyPair:
    """A TLS client certificate whose subject common name is the site ``name``: how the server identifies a site.

    It has no subject alternative name on purpose: gRPC reports a peer's SANs instead of its common name when it
    has any, and site names such as ``site_1`` are not DNS names.
    """
    return _issue(ca, common_name=name, usage=[ExtendedKeyUsageOID.CLIENT_AUTH], days=days)


def common_name(cert: x509.Certificate) -> str:
    """The subject common name: a site's identity."""
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attributes[0].value) if attributes else ""


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PEM PKCS#8 without a passphrase: gRPC cannot prompt for one, so the file's 0600 mode protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    ca: CertificateAuthority,
    common_name: str,
    usage: list[x509.ObjectIdentifier],
    days: int,
    alt_names: x509.SubjectAlternativeName | None = None,
) -> CertKeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    organization = _organization(ca.cert)
    builder = (
        _builder(_name(common_name, organization), ca.cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,  # ECDHE handshakes sign with the leaf key
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if alt_names is not None:
        builder = builder.add_extension(alt_names, critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return CertKeyPair(cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key))


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    # X.509 caps both attributes at 64 characters; a longer CN would make the certificate unparseable to some stacks.
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization[:64]))
    return x509.Name(attributes)


def _organization(cert: x509.Certificate) -> str | None:
    attributes = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(attributes[0].value) if attributes else None


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
