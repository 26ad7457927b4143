"""Provisioning: kit contents and permissions, certificates, HE key separation, refusals, loaders and the CLI."""

from __future__ import annotations

import copy
import ipaddress
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tenseal as ts
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lightning_fhe.he.params import CKKSParams
from lightning_fhe.provision import (
    CertificateAuthority,
    KitError,
    KitExistsError,
    ProvisionConfig,
    ProvisionConfigError,
    he_fingerprint,
    issue_client_cert,
    issue_server_cert,
    load_provision_config,
    load_server_kit,
    load_site_kit,
    make_ca,
    provision,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "provision.yaml"
SITES = ("site-1", "site-2", "site_3")
SERVER_FILES = ("ca.crt", "server.crt", "server.key", "he_params.tenseal", "server.yaml")
SITE_FILES = ("ca.crt", "client.crt", "client.key", "he_context.tenseal", "site.yaml")

VALID = {
    "project": "spleen-fl",
    "server": {"host": "localhost", "port": 8443},
    "clients": ["site-1", "site-2"],
    "he": {
        "lib": "tenseal",
        "config": {
            "poly_modulus_degree": 8192,
            "coeff_mod_bit_sizes": [60, 40, 40],
            "scale_bits": 40,
            "scheme": "CKKS",
        },
    },
}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One provisioning run of the shipped config (plus a third site, by override) shared by the read-only tests."""
    config = load_provision_config(CONFIG_FILE, [f"clients=[{','.join(SITES)}]"])
    out = tmp_path_factory.mktemp("kits")
    kits = provision(config, out)
    assert kits == {"server": out / "server", **{site: out / site for site in SITES}}
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_fhe.provision", *args], capture_output=True, text=True, timeout=60
    )


# --- what is written --------------------------------------------------------------------------------------------------


def test_writes_every_expected_file(out: Path) -> None:
    assert sorted(p.name for p in (out / "server").iterdir()) == sorted(SERVER_FILES)
    for site in SITES:
        assert sorted(p.name for p in (out / site).iterdir()) == sorted(SITE_FILES)
    assert sorted(p.name for p in (out / "ca").iterdir()) == ["ca.crt", "ca.key"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["ca", "server", *SITES])  # no staging folder left


def test_private_files_are_owner_only(out: Path) -> None:
    private = [out / "ca" / "ca.key", out / "server" / "server.key"]
    private += [out / site / name for site in SITES for name in ("client.key", "he_context.tenseal")]
    for path in private:
        assert _mode(path) == 0o600, path
    for folder in ["ca", "server", *SITES]:
        assert _mode(out / folder) == 0o700, folder


def test_server_gets_no_key_and_sites_share_one_secret_key(out: Path) -> None:
    server = ts.context_from((out / "server" / "he_params.tenseal").read_bytes())
    assert not server.is_private()
    assert not server.has_secret_key()
    assert not server.has_galois_keys() and not server.has_relin_keys()
    site_bytes = {(out / site / "he_context.tenseal").read_bytes() for site in SITES}
    assert len(site_bytes) == 1
    site = ts.context_from(site_bytes.pop())
    assert site.is_private() and site.has_secret_key()


def test_server_context_sums_what_sites_encrypt_and_another_site_decrypts(out: Path) -> None:
    site1 = ts.context_from((out / "site-1" / "he_context.tenseal").read_bytes())
    site2 = ts.context_from((out / "site_3" / "he_context.tenseal").read_bytes())
    server = ts.context_from((out / "server" / "he_params.tenseal").read_bytes())
    a = ts.ckks_vector(site1, [1.0, 2.0, 3.0]).serialize()
    b = ts.ckks_vector(site2, [0.5, -1.0, 4.0]).serialize()
    total = ts.ckks_vector_from(server, a) + ts.ckks_vector_from(server, b)
    decrypted = ts.ckks_vector_from(site2, total.serialize()).decrypt()
    assert decrypted == pytest.approx([1.5, 1.0, 7.0], abs=1e-4)


def test_kit_yaml_holds_the_same_fingerprint_everywhere(out: Path) -> None:
    server = load_server_kit(out / "server")
    sites = [load_site_kit(out / site) for site in SITES]
    assert {kit.he_fingerprint for kit in sites} == {server.he_fingerprint}
    assert {kit.key_id for kit in sites} == {server.key_id}
    assert len(bytes.fromhex(server.key_id)) == 16
    # Nothing in the fingerprint comes from the key: it is the documented digest of parameters and key id.
    assert server.he_fingerprint == he_fingerprint(server.params, bytes.fromhex(server.key_id))


# --- certificates -----------------------------------------------------------------------------------------------------


def test_ca_is_a_self_signed_signing_only_ca(out: Path) -> None:
    ca = _cert(out / "ca" / "ca.crt")
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    for kit in ["server", *SITES]:
        assert (out / kit / "ca.crt").read_bytes() == (out / "ca" / "ca.crt").read_bytes()
    reloaded = CertificateAuthority.from_pem((out / "ca" / "ca.crt").read_bytes(), (out / "ca" / "ca.key").read_bytes())
    assert reloaded.cert == ca


def test_server_certificate_names_and_usage(out: Path) -> None:
    ca, cert = _cert(out / "ca" / "ca.crt"), _cert(out / "server" / "server.crt")
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # clientAuth too, so the operator can call GetRoundStatus with the server kit's certificate (docs/server.md)
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize(
    ("host", "dns", "ips"),
    [
        ("fl.example.org", ["fl.example.org", "localhost"], {"127.0.0.1", "::1"}),
        ("10.1.2.3", ["localhost"], {"10.1.2.3", "127.0.0.1", "::1"}),
        ("fd00::7", ["localhost"], {"fd00::7", "127.0.0.1", "::1"}),
    ],
)
def test_server_certificate_covers_the_configured_host(host: str, dns: list[str], ips: set[str]) -> None:
    ca = make_ca("p")
    cert = issue_server_cert(ca, host).cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == dns
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(ip) for ip in ips}


def test_client_certificates_name_their_site(out: Path) -> None:
    ca = _cert(out / "ca" / "ca.crt")
    for site in SITES:
        cert = _cert(out / site / "client.crt")
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == site
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.public_key().public_numbers().curve.name == "secp256r1"


@pytest.mark.parametrize("other_ca_name", ["intruder", "spleen-fl"])
def test_certificate_from_another_ca_does_not_verify(out: Path, other_ca_name: str) -> None:
    # Same project name too: the issuer names then match and only the signature tells the CAs apart.
    ca = _cert(out / "ca" / "ca.crt")
    stranger = issue_client_cert(make_ca(other_ca_name), "site-1")
    assert stranger.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-1"
    with pytest.raises((ValueError, InvalidSignature)):
        stranger.cert.verify_directly_issued_by(ca)
    assert b"PRIVATE KEY" in stranger.key_pem and "PRIVATE" not in repr(stranger)


# --- refusing to overwrite --------------------------------------------------------------------------------------------


def test_existing_kits_need_force_and_are_left_untouched(tmp_path: Path) -> None:
    config = load_provision_config(VALID)
    provision(config, tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(KitExistsError, match=r"ca, server, site-1, site-2 already exist.*--force"):
        provision(config, tmp_path)
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca", "server", "site-1", "site-2"]

    provision(config, tmp_path, force=True)
    after = _snapshot(tmp_path)
    assert after.keys() == before.keys()
    assert after["ca/ca.crt"] != before["ca/ca.crt"]
    assert after["site-1/he_context.tenseal"] != before["site-1/he_context.tenseal"]
    assert load_site_kit(tmp_path / "site-2").he_fingerprint == load_server_kit(tmp_path / "server").he_fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca", "server", "site-1", "site-2"]


def test_one_existing_site_folder_stops_everything(tmp_path: Path) -> None:
    (tmp_path / "site-2").mkdir()
    (tmp_path / "site-2" / "notes.txt").write_text("mine")
    with pytest.raises(KitExistsError, match="site-2"):
        provision(load_provision_config(VALID), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-2"]
    assert (tmp_path / "site-2" / "notes.txt").read_text() == "mine"


# --- config validation ------------------------------------------------------------------------------------------------


def _with(path: str, value: object) -> dict:
    config = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_with("server.port", 0), "server.port: expected an integer from 1 to 65535, got 0"),
        (_with("server.port", 70000), "server.port: expected an integer from 1 to 65535, got 70000"),
        (_with("server.port", "8443"), "server.port"),
        (_with("server.host", "0.0.0.0"), "server.host"),
        (_with("server.host", "bad host"), "server.host"),
        (_with("clients", []), "clients: empty"),
        (_with("clients", ["site-1", "site-2", "site-1"]), "clients[2]: 'site-1' duplicates clients[0]"),
        (_with("clients", ["site-1", "Site-1"]), "clients[1]: 'Site-1' duplicates clients[0]"),
        (
            _with("clients", ["site-1", "site-2", "site 1"]),
            "clients[2]: 'site 1' is not a valid site name (letters, digits, '-', '_', '.'",
        ),
        (_with("clients", ["..", "a"]), "clients[0]"),
        (_with("clients", ["server"]), "clients[0]: 'server' is reserved"),
        (_with("clients", "site-1"), "clients: expected a list"),
        (_with("he.config.poly_modulus_degree", 4096), "128-bit"),
        (_with("he.config.scheme", "BFV"), "he.config.scheme"),
        (_with("he.lib", "seal"), "he.lib: 'seal' is not supported"),
        (_with("project", ""), "project"),
        (_with("extra", 1), "unknown key(s) ['extra']"),
        (_with("server", {"host": "localhost"}), "server.port: missing"),
    ],
)
def test_bad_configs_name_the_field(config: dict, message: str) -> None:
    with pytest.raises(ProvisionConfigError) as info:
        load_provision_config(config)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_small_ring_is_refused_for_security_in_words() -> None:
    refusal = r"he\.config\.coeff_mod_bit_sizes: .*poly_modulus_degree 4096 is only 128-bit secure"
    with pytest.raises(ProvisionConfigError, match=refusal):
        load_provision_config(_with("he.config.poly_modulus_degree", 4096))


def test_config_file_and_overrides(tmp_path: Path) -> None:
    config = load_provision_config(CONFIG_FILE, ["server.port=9443", "clients=[a,b,c]", "server.host=10.0.0.1"])
    assert config == ProvisionConfig("spleen-fl", "10.0.0.1", 9443, ("a", "b", "c"), CKKSParams())
    assert load_provision_config(CONFIG_FILE).clients == ("site-1", "site-2")
    with pytest.raises(ProvisionConfigError, match=r"provision\.yaml: server\.port"):
        load_provision_config(CONFIG_FILE, ["server.port=-1"])
    with pytest.raises(ProvisionConfigError, match="expected key=value"):
        load_provision_config(CONFIG_FILE, ["server.port"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("project: [unclosed\n")
    with pytest.raises(ProvisionConfigError, match=r"broken\.yaml: not valid YAML: .* line 2"):
        load_provision_config(broken)
    with pytest.raises(ProvisionConfigError, match="no such config file"):
        load_provision_config(tmp_path / "missing.yaml")


def test_config_built_in_code_is_validated_too() -> None:
    with pytest.raises(ProvisionConfigError, match="server.port"):
        ProvisionConfig("p", "localhost", 0, ("a",))
    assert ProvisionConfig("p", "::1", 8443, ["a"]).server_address == "[::1]:8443"


# --- loading kits -----------------------------------------------------------------------------------------------------


def test_kits_load_back(out: Path) -> None:
    server = load_server_kit(out / "server")
    assert (server.host, server.port, server.clients, server.address) == ("localhost", 8443, SITES, "localhost:8443")
    assert server.key == (out / "server" / "server.key").read_bytes()
    assert server.cert == (out / "server" / "server.crt").read_bytes()
    assert not server.he_context.has_secret_key
    assert server.params == CKKSParams()
    assert "PRIVATE" not in repr(server)

    site = load_site_kit(out / "site_3")
    assert (site.name, site.project, site.server_address) == ("site_3", "spleen-fl", "localhost:8443")
    assert site.ca_cert == server.ca_cert
    assert site.key == (out / "site_3" / "client.key").read_bytes()
    assert site.he_context.has_secret_key
    assert site.params == server.params


def test_loaders_explain_what_is_missing_or_wrong(out: Path, tmp_path: Path) -> None:
    with pytest.raises(KitError, match=r"nowhere is not a site kit: no such folder; run python -m lightning_fhe"):
        load_site_kit(tmp_path / "nowhere")

    kit = tmp_path / "site-1"
    shutil.copytree(out / "site-1", kit)
    (kit / "client.key").unlink()
    with pytest.raises(KitError, match=r"site-1 is not a site kit: missing client\.key; run python -m lightning_fhe"):
        load_site_kit(kit)

    with pytest.raises(KitError, match="it holds server.yaml, so it is a server kit"):
        load_site_kit(out / "server")
    with pytest.raises(KitError, match="it holds site.yaml, so it is a site kit"):
        load_server_kit(out / "site-2")

    # Each file present but wrong: the server's keyless context, another site's certificate, a foreign CA.
    shutil.copy(out / "site-1" / "client.key", kit / "client.key")
    shutil.copy(out / "server" / "he_params.tenseal", kit / "he_context.tenseal")
    with pytest.raises(KitError, match="holds no secret key"):
        load_site_kit(kit)
    shutil.copy(out / "site-1" / "he_context.tenseal", kit / "he_context.tenseal")
    shutil.copy(out / "site-2" / "client.crt", kit / "client.crt")
    with pytest.raises(KitError, match=r"client\.key: does not belong to"):
        load_site_kit(kit)
    shutil.copy(out / "site-2" / "client.key", kit / "client.key")
    with pytest.raises(KitError, match=r"issued to 'site-2', but the kit is for site 'site-1'"):
        load_site_kit(kit)
    stranger = issue_client_cert(make_ca("spleen-fl"), "site-1")
    (kit / "client.crt").write_bytes(stranger.cert_pem)
    (kit / "client.key").write_bytes(stranger.key_pem)
    with pytest.raises(KitError, match=r"client\.crt: not issued by the kit's ca\.crt"):
        load_site_kit(kit)

    server = tmp_path / "server"
    shutil.copytree(out / "server", server)
    shutil.copy(out / "site-1" / "he_context.tenseal", server / "he_params.tenseal")
    with pytest.raises(KitError, match="holds a secret key"):
        load_server_kit(server)
    shutil.copy(out / "server" / "he_params.tenseal", server / "he_params.tenseal")
    lines = (server / "server.yaml").read_text().splitlines()
    lines = [("key_id: '00112233445566778899aabbccddeeff'" if line.startswith("key_id:") else line) for line in lines]
    (server / "server.yaml").write_text("\n".join(lines))
    with pytest.raises(KitError, match="he_fingerprint does not match"):
        load_server_kit(server)


# --- command line -----------------------------------------------------------------------------------------------------


def test_cli_writes_kits_and_summarises(tmp_path: Path) -> None:
    result = _run_cli(str(CONFIG_FILE), "--out", str(tmp_path / "kits"), "server.port=9443")
    assert result.returncode == 0, result.stderr
    assert "server/" in result.stdout and "no key of any kind" in result.stdout
    assert "site-1/" in result.stdout and "SECRET key" in result.stdout
    assert load_server_kit(tmp_path / "kits" / "server").port == 9443

    again = _run_cli(str(CONFIG_FILE), "--out", str(tmp_path / "kits"))
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and "--force" in again.stderr and "Traceback" not in again.stderr


def test_cli_bad_config_exits_2_with_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "provision.yaml"
    bad.write_text(CONFIG_FILE.read_text().replace("port: 8443", "port: 99999"))
    result = _run_cli(str(bad), "--out", str(tmp_path / "kits"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad}: server.port: expected an integer from 1 to 65535, got 99999")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "kits").exists()


def test_lightning_fhe_provision_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_fhe.cli", "provision", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "--force" in result.stdout
