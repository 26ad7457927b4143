"""Kit folders: writing them at provisioning, and loading them in the server and at the sites.

Layout under the output folder::

    ca/      ca.crt, ca.key                   the CA; ca.key stays offline with whoever provisions
    server/  ca.crt, server.crt, server.key,  the aggregator's kit: TLS identity and the CKKS parameters,
             he_params.tenseal, server.yaml   with no key of any kind
    <site>/  ca.crt, client.crt, client.key,  one per site: TLS identity and the CKKS context with the secret key,
             he_context.tenseal, site.yaml    the same secret key at every site

With ``he.key: sites`` no kit holds a secret key: a site kit has ``he_params.tenseal`` (parameters only) instead of
``he_context.tenseal``, and ``site.yaml`` says ``he.key: sites``. The sites make the key when the federation forms
(:mod:`lightning_fhe.masking.site_key`); each saves it into its kit folder with :func:`save_site_key`, which adds
the key's fingerprint to ``site.yaml``, and from then on loads it like a provisioned one.

A loader checks that a kit hangs together (certificate issued by the kit's CA, key matching certificate, HE context
matching the YAML's parameters and fingerprint) so a mixed-up kit fails here, in words, and not later as a TLS
handshake error or as decryptions that come out as noise.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from omegaconf import OmegaConf

from lightning_fhe.he.context import HEContext, HEKeyError, write_private_file
from lightning_fhe.he.params import CKKSParams, HEConfigError
from lightning_fhe.provision.certs import (
    CertificateAuthority,
    CertKeyPair,
    common_name,
    issue_client_cert,
    issue_server_cert,
    make_ca,
)
from lightning_fhe.provision.config import KEY_SOURCES, ProvisionConfig, grpc_address

KIT_FORMAT = 1
CA_FILES = {"cert": "ca.crt", "key": "ca.key"}
SERVER_FILES = {
    "ca_cert": "ca.crt",
    "cert": "server.crt",
    "key": "server.key",
    "he_context": "he_params.tenseal",
    "config": "server.yaml",
}
SITE_FILES = {
    "ca_cert": "ca.crt",
    "cert": "client.crt",
    "key": "client.key",
    "he_context": "he_context.tenseal",
    "config": "site.yaml",
}
# he.key = sites: the parameters a site makes the key from; the key itself goes to SITE_FILES["he_context"].
SITE_PARAMS_FILE = "he_params.tenseal"
_HOW = "run python -m lightning_fhe.provision CONFIG --out DIR to make the kits"
_KEY_FINGERPRINT_LABEL = b"lightning-fhe ckks secret key fingerprint v1\0"


class KitError(ValueError):
    """A kit folder that is missing, incomplete or inconsistent. The message names the path."""


class KitExistsError(KitError):
    """Provisioning would replace existing kits, and ``force`` was not given."""


@dataclass(frozen=True)
class SiteKit:
    """What a site needs: its TLS identity, the server's address, and the shared CKKS secret key.

    With ``he.key: sites`` (``key_source == "sites"``) ``he_context`` is None until the sites made the key and this
    site saved it (:func:`save_site_key`); ``key_fingerprint`` then names it.
    """

    path: Path
    name: str
    project: str
    server_address: str
    ca_cert: bytes
    cert: bytes
    key: bytes = field(repr=False)  # kept out of repr so a logged kit never shows a private key
    he_context: HEContext | None = field(repr=False)
    he_fingerprint: str = ""
    key_id: str = ""
    params: CKKSParams = field(default_factory=CKKSParams)
    key_source: str = "provisioned"  # who made the CKKS secret key: "provisioned" or "sites"
    key_fingerprint: str = ""  # he.key = sites: the saved key's key_fingerprint(); "" before, and when provisioned
    min_clients: int = 2  # the fewest members of a masked round this site uploads to

    @property
    def awaits_site_key(self) -> bool:
        """``he.key: sites`` and this site holds no key yet: it gets one when the federation forms."""
        return self.he_context is None

    def secret_context(self) -> HEContext:
        """The CKKS context with the secret key.

        Raises:
            KitError: ``he.key: sites`` and the sites have not made the key yet (or this site has not saved it).
        """
        if self.he_context is None:
            raise KitError(
                f"{self.path}: no CKKS secret key yet: with he.key: sites the sites make it when the federation forms; "
                "this site gets it when it joins (HEFederation does that before training)"
            )
        return self.he_context


@dataclass(frozen=True)
class ServerKit:
    """What the aggregator needs: its TLS identity, the expected sites and the CKKS parameters (no key)."""

    path: Path
    project: str
    host: str
    port: int
    clients: tuple[str, ...]
    ca_cert: bytes
    cert: bytes
    key: bytes = field(repr=False)
    he_context: HEContext = field(repr=False)
    he_fingerprint: str = ""
    key_id: str = ""
    params: CKKSParams = field(default_factory=CKKSParams)

    @property
    def address(self) -> str:
        return grpc_address(self.host, self.port)


def he_fingerprint(params: CKKSParams, key_id: bytes) -> str:
    """Identifies one federation's CKKS key and parameters, the same in every kit.

    Built from the parameters and a random key id drawn at provisioning, never from the secret key: the fingerprint
    is shown in logs and sent to the server, and must tell nothing about the key. Two kits with equal fingerprints
    come from the same provisioning run; the server can refuse updates made under another key.
    """
    digest = hashlib.sha256(b"lightning-fhe he_fingerprint v1\0")
    digest.update(params.fingerprint().encode())
    digest.update(key_id)
    return digest.hexdigest()[:32]  # 128 bits tell runs apart and stay short enough to compare by eye


def key_fingerprint(context: HEContext) -> str:
    """Names a CKKS secret key (``he.key: sites``): SHA-256 of a domain label and SEAL's serialization of the key.

    Sites compare fingerprints to check they hold the same key, and bind it into the sealing of the key they pass
    on. A hash of a high-entropy secret tells nothing about it. Raises :class:`HEKeyError` for a keyless context.
    """
    secret_key = context.secret_key()
    fd = os.memfd_create("lightning-fhe-secret-key") if hasattr(os, "memfd_create") else -1
    try:
        if fd >= 0:  # in memory: the key never touches the disk
            secret_key.save(f"/proc/self/fd/{fd}")
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                data = f.read()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                secret_key.save(str(Path(tmp) / "key"))
                data = (Path(tmp) / "key").read_bytes()
    finally:
        if fd >= 0:
            os.close(fd)
    return hashlib.sha256(_KEY_FINGERPRINT_LABEL + data).hexdigest()


def save_site_key(path: str | os.PathLike, context: HEContext) -> SiteKit:
    """Saves the CKKS secret key the sites made into a ``he.key: sites`` site kit, and returns the kit reloaded.

    ``he_context.tenseal`` is written first (:func:`stage_site_key`: mode 0600, to a temporary name, flushed, then
    renamed into place), then ``site.yaml`` gets the key's :func:`key_fingerprint` the same way: a kit whose
    ``site.yaml`` names a fingerprint holds the complete key, and one interrupted in between still counts as
    awaiting its key (:func:`staged_site_key` reads what was written).

    Raises:
        KitError: not a ``he.key: sites`` site kit, a context without the secret key or with other parameters, or
            the kit already holds another key.
    """
    path = Path(path)
    kit = stage_site_key(path, context)
    yaml_path = path / SITE_FILES["config"]
    doc = _read_yaml(yaml_path, "site")
    doc["key_fingerprint"] = key_fingerprint(context)
    header = _site_header(kit.name, kit.project, "sites")
    _write_atomically(yaml_path, _yaml_text(header, doc).encode(), private=False)
    return load_site_kit(path)


def stage_site_key(path: str | os.PathLike, context: HEContext) -> SiteKit:
    """Writes the key file of :func:`save_site_key` alone (``site.yaml`` unchanged); returns the kit as it was.

    The site that makes the key stages it before sharing it and saves it once the server holds the shares: stopped
    in between, it shares the same key again next time (:func:`staged_site_key`), never a second one.
    """
    path = Path(path)
    kit = load_site_kit(path)
    if kit.key_source != "sites":
        raise KitError(f"{path}: its CKKS key was provisioned (he.key: {kit.key_source}); nothing to save")
    if not context.has_secret_key:
        raise KitError(f"{path}: the context to save holds no secret key")
    if context.params != replace(kit.params, scheme=context.params.scheme):
        raise KitError(
            f"{path}: the key's CKKS parameters {context.params.to_dict()} differ from the kit's {kit.params.to_dict()}"
        )
    fingerprint = key_fingerprint(context)
    if kit.key_fingerprint and kit.key_fingerprint != fingerprint:
        raise KitError(
            f"{path}: already holds the sites' key {kit.key_fingerprint}; refusing to replace it with {fingerprint}"
        )
    _write_atomically(path / SITE_FILES["he_context"], context.serialize(with_secret_key=True), private=True)
    return kit


def staged_site_key(path: str | os.PathLike) -> HEContext | None:
    """The key :func:`stage_site_key` wrote into a kit still awaiting its key (``site.yaml`` names none yet); None
    when there is none, or it does not load as a secret key of the kit's parameters."""
    path = Path(path)
    kit = load_site_kit(path)
    key_file = path / SITE_FILES["he_context"]
    if not kit.awaits_site_key or not key_file.is_file():
        return None
    try:
        return _load_context(key_file, kit.params, require_secret_key=True, kind="site")
    except KitError:
        return None


def provision(config: ProvisionConfig, out_dir: str | os.PathLike, force: bool = False) -> dict[str, Path]:
    """Writes a new CA, the server kit and one kit per site under ``out_dir``.

    Existing kits are refused unless ``force``, before anything is written. The kits are written into a temporary
    folder inside ``out_dir`` and renamed into place only once all are complete, so an interrupted run leaves the
    old kits (or none), never a half-written one.

    Returns:
        ``{"server": out_dir/"server", site: out_dir/site, ...}``. The CA is in ``out_dir/"ca"``.
    """
    out_dir = Path(out_dir)
    names = ["ca", "server", *config.clients]
    if not force:
        _refuse_existing(out_dir, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-provision-", dir=out_dir))  # mode 0700
    try:
        _write_kits(staging, config)
        _install(staging, out_dir, names, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # also removes the replaced kits, once the new ones are in place
    return {"server": out_dir / "server", **{site: out_dir / site for site in config.clients}}


def load_site_kit(path: str | os.PathLike) -> SiteKit:
    """Loads and checks a site kit; the HE context must hold the secret key (with ``he.key: sites``: once the
    sites made it; before, ``he_context`` is None).

    Raises:
        KitError: a file is missing, or the kit's parts do not belong together.
    """
    path = Path(path)
    yaml_path = path / SITE_FILES["config"]
    common = {k: v for k, v in SITE_FILES.items() if k != "he_context"}
    _check_files(path, "site", common, other=("server", SERVER_FILES["config"]))
    doc = _read_yaml(yaml_path, "site")
    name = _get(doc, "site", str, yaml_path)
    params, key_id, fingerprint = _he_identity(doc, yaml_path)
    source = _key_source(doc, yaml_path)
    site_key_fingerprint = ""
    if source == "provisioned":
        _check_files(path, "site", SITE_FILES, other=("server", SERVER_FILES["config"]))
        he_context = _load_context(path / SITE_FILES["he_context"], params, require_secret_key=True, kind="site")
    else:
        he_context, site_key_fingerprint = _load_site_made_key(path, doc, params)
    ca_cert, cert, key = _load_tls(path, SITE_FILES, kind="site", expected_cn=name)
    return SiteKit(
        path=path,
        name=name,
        project=_get(doc, "project", str, path / SITE_FILES["config"]),
        server_address=_get(doc, "server", str, path / SITE_FILES["config"]),
        ca_cert=ca_cert,
        cert=cert,
        key=key,
        he_context=he_context,
        he_fingerprint=fingerprint,
        key_id=key_id,
        params=params,
        key_source=source,
        key_fingerprint=site_key_fingerprint,
        min_clients=_min_clients(doc, path / SITE_FILES["config"]),
    )


def _min_clients(doc: dict[str, Any], path: Path) -> int:
    value = doc.get("min_clients", 2)  # kits written before masking: the smallest sum that hides a site
    if type(value) is not int or value < 1:
        raise KitError(f"{path}: min_clients must be an integer >= 1, got {value!r}")
    return value


def load_server_kit(path: str | os.PathLike) -> ServerKit:
    """Loads and checks the server kit; the HE context must hold no key.

    Raises:
        KitError: a file is missing, or the kit's parts do not belong together.
    """
    path = Path(path)
    _check_files(path, "server", SERVER_FILES, other=("site", SITE_FILES["config"]))
    yaml_path = path / SERVER_FILES["config"]
    doc = _read_yaml(yaml_path, "server")
    params, key_id, fingerprint = _he_identity(doc, yaml_path)
    he_context = _load_context(path / SERVER_FILES["he_context"], params, require_secret_key=False, kind="server")
    ca_cert, cert, key = _load_tls(path, SERVER_FILES, kind="server", expected_cn=None)
    clients = _get(doc, "clients", list, yaml_path)
    if not clients or not all(isinstance(c, str) for c in clients):
        raise KitError(f"{yaml_path}: clients: expected a non-empty list of site names, got {clients!r}")
    port = _get(doc, "port", int, yaml_path)
    return ServerKit(
        path=path,
        project=_get(doc, "project", str, yaml_path),
        host=_get(doc, "host", str, yaml_path),
        port=port,
        clients=tuple(clients),
        ca_cert=ca_cert,
        cert=cert,
        key=key,
        he_context=he_context,
        he_fingerprint=fingerprint,
        key_id=key_id,
        params=params,
    )


# --- writing ---------------------------------------------------------------------------------------------------------


def _refuse_existing(out_dir: Path, names: list[str]) -> None:
    existing = [name for name in names if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if existing:
        raise KitExistsError(
            f"{out_dir}: kit folder(s) {', '.join(existing)} already exist; nothing was written. Pass --force "
            "(force=True) to replace them: that makes a new CA and a new HE key, so every participant needs its "
            "new kit."
        )


def _write_kits(staging: Path, config: ProvisionConfig) -> None:
    ca = make_ca(config.project)
    # TenSEAL makes no context without a key. With he.key: sites this one's key stays in this process's memory,
    # never serialized: the kits get its parameters only, and the sites make the federation's key themselves.
    site_context = HEContext.generate(config.params)
    # Random, and unrelated to the secret key: see he_fingerprint.
    key_id = secrets.token_bytes(16)
    he = {
        "lib": "tenseal",
        "config": config.params.to_dict(),
        "key": config.he_key,
    }
    identity = {
        "he": he,
        "he_fingerprint": he_fingerprint(config.params, key_id),
        "key_id": key_id.hex(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_ca(_make_dir(staging / "ca"), ca)
    _write_server_kit(_make_dir(staging / "server"), config, ca, site_context.without_keys(), identity)
    site_key = site_context if config.he_key == "provisioned" else site_context.without_keys()
    for site in config.clients:
        _write_site_kit(_make_dir(staging / site), config, site, ca, site_key, identity)


def _make_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)  # kits hold private keys: only the owner may list or open them
    return path


def _write_ca(folder: Path, ca: CertificateAuthority) -> None:
    (folder / CA_FILES["cert"]).write_bytes(ca.cert_pem)
    write_private_file(folder / CA_FILES["key"], ca.key_pem)


def _write_server_kit(
    folder: Path, config: ProvisionConfig, ca: CertificateAuthority, context: HEContext, identity: dict[str, Any]
) -> None:
    pair = issue_server_cert(ca, config.host)
    _write_tls(folder, SERVER_FILES, ca, pair)
    context.save(folder / SERVER_FILES["he_context"], with_secret_key=False)
    doc = {
        "kit": "server",
        "kit_format": KIT_FORMAT,
        "project": config.project,
        "host": config.host,
        "port": config.port,
        "clients": list(config.clients),
        **identity,
        "files": {k: v for k, v in SERVER_FILES.items() if k != "config"},
    }
    header = (
        f"Server kit of federation {config.project!r}, written by python -m lightning_fhe.provision.\n"
        "server.key is the TLS private key. he_params.tenseal holds the CKKS parameters and no key of any kind:\n"
        "the server can add ciphertexts but can neither encrypt nor decrypt."
    )
    _write_yaml(folder / SERVER_FILES["config"], header, doc)  # written last: its presence marks a complete kit


def _write_site_kit(
    folder: Path,
    config: ProvisionConfig,
    site: str,
    ca: CertificateAuthority,
    context: HEContext,
    identity: dict[str, Any],
) -> None:
    pair = issue_client_cert(ca, site)
    _write_tls(folder, SITE_FILES, ca, pair)
    files = {k: v for k, v in SITE_FILES.items() if k != "config"}
    if config.he_key == "provisioned":
        context.save(folder / SITE_FILES["he_context"], with_secret_key=True)
    else:
        context.save(folder / SITE_PARAMS_FILE, with_secret_key=False)
        files["he_params"] = SITE_PARAMS_FILE  # he_context.tenseal appears when the sites made the key
    doc = {
        "kit": "site",
        "kit_format": KIT_FORMAT,
        "project": config.project,
        "site": site,
        "server": config.server_address,
        "min_clients": config.min_clients,
        **identity,
        "files": files,
    }
    _write_yaml(folder / SITE_FILES["config"], _site_header(site, config.project, config.he_key), doc)


def _site_header(site: str, project: str, he_key: str) -> str:
    first = f"Site kit of {site!r} in federation {project!r}, written by python -m lightning_fhe.provision.\n"
    if he_key == "provisioned":
        return first + (
            "Keep this folder private: client.key is the TLS private key and he_context.tenseal the CKKS secret key,\n"
            "which every site shares and the server must never see."
        )
    return first + (
        "Keep this folder private: client.key is the TLS private key. he.key: sites: no one made the CKKS secret\n"
        "key at provisioning; the sites make it when the federation forms, and this site saves it here as\n"
        "he_context.tenseal (key_fingerprint names it). Only the sites ever hold it."
    )


def _write_tls(folder: Path, files: dict[str, str], ca: CertificateAuthority, pair: CertKeyPair) -> None:
    (folder / files["ca_cert"]).write_bytes(ca.cert_pem)
    (folder / files["cert"]).write_bytes(pair.cert_pem)
    write_private_file(folder / files["key"], pair.key_pem)


def _write_yaml(path: Path, header: str, doc: dict[str, Any]) -> None:
    path.write_text(_yaml_text(header, doc))


def _yaml_text(header: str, doc: dict[str, Any]) -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + OmegaConf.to_yaml(OmegaConf.create(doc))


def _write_atomically(path: Path, data: bytes, private: bool) -> None:
    """Writes ``path`` so that a reader finds the old file or the new one, never part of one; ``private``: 0600
    from creation."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if private:
            write_private_file(staging, data)
        else:
            staging.write_bytes(data)
        with open(staging, "rb") as written:
            os.fsync(written.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable
    except OSError:
        pass
    finally:
        os.close(fd)


def _install(staging: Path, out_dir: Path, names: list[str], force: bool) -> None:
    """Renames every staged kit into place; if any rename fails, puts back what was there before."""
    replaced = staging / ".replaced"
    replaced.mkdir()
    moved_aside: list[tuple[Path, Path]] = []
    installed: list[Path] = []
    try:
        for name in names:
            target = out_dir / name
            if target.exists() or target.is_symlink():
                if not force:  # appeared since the check at the start
                    raise KitExistsError(f"{target}: appeared while provisioning; nothing was replaced")
                os.rename(target, replaced / name)
                moved_aside.append((replaced / name, target))
            os.rename(staging / name, target)
            installed.append(target)
    except BaseException:
        for target in installed:
            shutil.rmtree(target, ignore_errors=True)
        for aside, target in moved_aside:
            os.rename(aside, target)
        raise


# --- loading ---------------------------------------------------------------------------------------------------------


def _check_files(path: Path, kind: str, files: dict[str, str], other: tuple[str, str]) -> None:
    if not path.is_dir():
        what = "no such folder" if not path.exists() else "not a folder"
        raise KitError(f"{path} is not a {kind} kit: {what}; {_HOW}")
    missing = [name for name in files.values() if not (path / name).is_file()]
    if not missing:
        return
    other_kind, other_yaml = other
    if files["config"] in missing and (path / other_yaml).is_file():
        raise KitError(f"{path} is not a {kind} kit: it holds {other_yaml}, so it is a {other_kind} kit")
    raise KitError(f"{path} is not a {kind} kit: missing {', '.join(missing)}; {_HOW}")


def _read_yaml(path: Path, kind: str) -> dict[str, Any]:
    try:
        doc = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # unreadable file, or YAML that does not parse
        raise KitError(f"{path}: cannot read the kit file ({str(err).splitlines()[0]})") from err
    if not isinstance(doc, dict) or doc.get("kit") != kind:
        raise KitError(f"{path}: not a {kind} kit file (expected 'kit: {kind}'); {_HOW}")
    if doc.get("kit_format") != KIT_FORMAT:
        raise KitError(
            f"{path}: kit_format {doc.get('kit_format')!r}, this version reads {KIT_FORMAT}; provision the kits again"
        )
    return doc


def _get(doc: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise KitError(f"{path}: {key}: expected {kind.__name__}, got {value!r}")
    return value


def _he_identity(doc: dict[str, Any], path: Path) -> tuple[CKKSParams, str, str]:
    """The kit's CKKS parameters, key id and fingerprint, checked against each other."""
    he = _get(doc, "he", dict, path)
    if he.get("lib") != "tenseal":
        raise KitError(f"{path}: he.lib: {he.get('lib')!r} is not supported; expected 'tenseal'")
    try:
        params = CKKSParams.from_mapping(he.get("config"), where="he.config")
    except HEConfigError as err:
        raise KitError(f"{path}: {err}") from None
    key_id = _get(doc, "key_id", str, path)
    fingerprint = _get(doc, "he_fingerprint", str, path)
    try:
        expected = he_fingerprint(params, bytes.fromhex(key_id))
    except ValueError:
        raise KitError(f"{path}: key_id: expected hexadecimal, got {key_id!r}") from None
    if fingerprint != expected:
        raise KitError(
            f"{path}: he_fingerprint does not match he.config and key_id: the file was edited or mixed up with "
            "another provisioning run's"
        )
    return params, key_id, fingerprint


def _key_source(doc: dict[str, Any], path: Path) -> str:
    source = doc["he"].get("key", "provisioned")  # kits written before he.key: provisioned
    if source not in KEY_SOURCES:
        raise KitError(f"{path}: he.key: {source!r} is not one of {list(KEY_SOURCES)}")
    return source


def _load_site_made_key(path: Path, doc: dict[str, Any], params: CKKSParams) -> tuple[HEContext | None, str]:
    """``he.key: sites``: the key the sites made and this site saved, with its fingerprint; (None, "") before."""
    yaml_path = path / SITE_FILES["config"]
    if not (path / SITE_PARAMS_FILE).is_file():
        raise KitError(f"{path} is not a site kit: missing {SITE_PARAMS_FILE}; {_HOW}")
    _load_context(path / SITE_PARAMS_FILE, params, require_secret_key=False, kind="site")
    fingerprint = doc.get("key_fingerprint")
    key_file = path / SITE_FILES["he_context"]
    if fingerprint is None:
        return None, ""  # no key yet (a key file without a fingerprint: saving it was interrupted)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise KitError(f"{yaml_path}: key_fingerprint: expected the saved key's fingerprint, got {fingerprint!r}")
    if not key_file.is_file():
        raise KitError(
            f"{yaml_path} says this site saved the sites' CKKS key ({fingerprint}), but {key_file.name} is missing: "
            f"restore it from a backup, or delete the key_fingerprint line to fetch this site's sealed copy from the "
            "server again at the next join (the site that made the key has none to fetch)"
        )
    context = _load_context(key_file, params, require_secret_key=True, kind="site")
    if key_fingerprint(context) != fingerprint:
        raise KitError(
            f"{key_file}: does not hold the key {yaml_path.name} names (key_fingerprint {fingerprint}): the file was "
            "replaced or damaged; restore it from a backup"
        )
    return context, fingerprint


def _load_context(path: Path, params: CKKSParams, require_secret_key: bool, kind: str) -> HEContext:
    try:
        context = HEContext.load(path, require_secret_key=require_secret_key)
    except HEKeyError as err:
        raise KitError(f"{path.parent} is not a valid {kind} kit: {err}") from None
    if context.params != replace(params, scheme=context.params.scheme):  # a context file does not record the name
        raise KitError(
            f"{path}: the context's CKKS parameters {context.params.to_dict()} differ from those in the kit's YAML "
            f"{params.to_dict()}: the file comes from another provisioning run"
        )
    return context


def _load_tls(
    folder: Path, files: dict[str, str], kind: str, expected_cn: str | None
) -> tuple[bytes, bytes, bytes]:
    """The CA certificate, certificate and key, checked to belong together."""
    ca_pem, cert_pem, key_pem = ((folder / files[name]).read_bytes() for name in ("ca_cert", "cert", "key"))
    cert_path = folder / files["cert"]
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise KitError(f"{folder} is not a valid {kind} kit: a certificate or key does not parse ({err})") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        reason = str(err) or "the signature does not verify"
        raise KitError(f"{cert_path}: not issued by the kit's {files['ca_cert']} ({reason})") from None
    if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise KitError(f"{folder / files['key']}: does not belong to {cert_path}")
    if expected_cn is not None and common_name(cert) != expected_cn:
        raise KitError(f"{cert_path}: issued to {common_name(cert)!r}, but the kit is for site {expected_cn!r}")
    return ca_pem, cert_pem, key_pem


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
