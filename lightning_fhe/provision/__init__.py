"""Provisioning: a private CA, TLS certificates and the shared CKKS key, written as one kit per participant.

Run ``python -m lightning_fhe.provision configs/provision.yaml --out kits``; see ``docs/provisioning.md``.
"""

from lightning_fhe.provision.certs import (
    CertificateAuthority,
    CertKeyPair,
    issue_client_cert,
    issue_server_cert,
    make_ca,
)
from lightning_fhe.provision.config import ProvisionConfig, ProvisionConfigError, load_provision_config
from lightning_fhe.provision.kits import (
    KitError,
    KitExistsError,
    ServerKit,
    SiteKit,
    he_fingerprint,
    key_fingerprint,
    load_server_kit,
    load_site_kit,
    provision,
    save_site_key,
    stage_site_key,
    staged_site_key,
)

__all__ = [
    "CertKeyPair",
    "CertificateAuthority",
    "KitError",
    "KitExistsError",
    "ProvisionConfig",
    "ProvisionConfigError",
    "ServerKit",
    "SiteKit",
    "he_fingerprint",
    "issue_client_cert",
    "key_fingerprint",
    "issue_server_cert",
    "load_provision_config",
    "load_server_kit",
    "load_site_kit",
    "make_ca",
    "provision",
    "save_site_key",
    "stage_site_key",
    "staged_site_key",
]
