"""The provisioning config (``configs/provision.yaml``): loading and validation, with no side effects.

Every error names the offending field as a YAML path (``server.port``, ``clients[2]``, ``he.config.scale_bits``)
and, when the config came from a file, the file, so a user can fix it without reading this code.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lightning_fhe.he.params import CKKSParams, HEConfigError
from lightning_fhe.yaml_config import read_config

SUPPORTED_HE_LIBS = ("tenseal",)

# Who makes the CKKS secret key (he.key): "provisioned", whoever runs provisioning, into every site kit; "sites", the
# sites themselves when the federation forms (lightning_fhe.masking.site_key), so that no one else ever holds it.
KEY_SOURCES = ("provisioned", "sites")

# Kit folders that live next to the site kits in the output folder, so no site may take their names.
RESERVED_NAMES = ("ca", "server")

# Site names become folder names and certificate common names (at most 64 characters in X.509). Requiring a
# letter or digit first keeps them away from hidden folders ('.x'), '..' and names a shell reads as options ('-x').
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

_KEYS = {"project", "server", "clients", "he", "min_clients"}
_SERVER_KEYS = {"host", "port"}
_HE_KEYS = {"lib", "config", "key"}


class ProvisionConfigError(ValueError):
    """An invalid provisioning config. The message names the file (when there is one) and the field."""


@dataclass(frozen=True)
class ProvisionConfig:
    """What to provision: one federation, its aggregator address, its sites and its CKKS parameters.

    Constructing one validates it, so a config built in code (by the simulator, by tests) gets the same checks as
    one read from YAML.

    Args:
        project: federation name; it goes into the certificates' subjects and the kits' YAML.
        host: the name or address sites connect to; the server certificate is issued for it.
        port: the aggregator's TCP port.
        clients: the site names, each one kit folder and one client certificate common name.
        params: the CKKS parameters every participant shares.
        he_key: who makes the CKKS secret key: ``"provisioned"`` (written into every site kit, the default) or
            ``"sites"`` (no kit holds it; the first member in name order makes it when the federation forms and
            sends it to the others sealed under their pairwise keys, see ``docs/provisioning.md``).
        min_clients: written into every site kit: the fewest members a masked round may have for the site to
            upload to it (docs/security.md). Default: a majority of the sites, and at least 2, as the server's
            quorum.
    """

    project: str
    host: str
    port: int
    clients: tuple[str, ...]
    params: CKKSParams = field(default_factory=CKKSParams)
    he_key: str = "provisioned"
    min_clients: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.clients, (list, tuple)):
            object.__setattr__(self, "clients", tuple(self.clients))
        _check_project(self.project)
        _check_host(self.host)
        _check_port(self.port)
        _check_clients(self.clients)
        if self.min_clients is None:
            object.__setattr__(self, "min_clients", min(len(self.clients), max(2, len(self.clients) // 2 + 1)))
        elif not (type(self.min_clients) is int and 1 <= self.min_clients <= len(self.clients)):
            raise ProvisionConfigError(
                f"min_clients: expected an integer from 1 to the {len(self.clients)} sites, got {self.min_clients!r}"
            )
        if not isinstance(self.params, CKKSParams):
            raise ProvisionConfigError(f"he.config: expected CKKSParams, got {type(self.params).__name__}")
        _check_he_key(self.he_key)
        # A lower-case scheme is accepted, but written one way so that fingerprints of equal parameters agree.
        object.__setattr__(self, "params", replace(self.params, scheme=self.params.scheme.upper()))

    @property
    def server_address(self) -> str:
        return grpc_address(self.host, self.port)

    def to_dict(self) -> dict[str, Any]:
        """The config in the shape of ``provision.yaml``, so it can be written back and reloaded."""
        return {
            "project": self.project,
            "server": {"host": self.host, "port": self.port},
            "clients": list(self.clients),
            "he": {"lib": "tenseal", "config": self.params.to_dict(), "key": self.he_key},
            "min_clients": self.min_clients,
        }


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC wants it, with an IPv6 address in brackets."""
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{bracketed}:{port}"


def load_provision_config(
    source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()
) -> ProvisionConfig:
    """Reads and validates a provisioning config.

    Args:
        source: a YAML file path, or a mapping (a dict or an OmegaConf ``DictConfig``) of the same shape.
        overrides: OmegaConf ``key=value`` strings applied on top, e.g. ``["server.port=9443"]``.

    Raises:
        ProvisionConfigError: the file cannot be read or any field is invalid; the message names it.
    """
    where = "provision config" if isinstance(source, Mapping) else str(source)
    try:
        raw = read_config(source, overrides, ProvisionConfigError, override_example="server.port=9443")
        return _build(raw)
    except (ProvisionConfigError, HEConfigError) as err:
        raise ProvisionConfigError(f"{where}: {err}") from None


def _build(raw: Any) -> ProvisionConfig:
    config = _mapping(raw, "the top level", _KEYS)
    server = _mapping(_required(config, "server", ""), "server", _SERVER_KEYS)
    he = _mapping(config.get("he") or {}, "he", _HE_KEYS)
    lib = he.get("lib", "tenseal")
    if lib not in SUPPORTED_HE_LIBS:
        raise ProvisionConfigError(f"he.lib: {lib!r} is not supported; use one of {list(SUPPORTED_HE_LIBS)}")
    params = CKKSParams.from_mapping(he.get("config", {}) or {}, where="he.config")
    clients = _required(config, "clients", "")
    if not isinstance(clients, list):
        raise ProvisionConfigError(f"clients: expected a list of site names, got {clients!r}")
    return ProvisionConfig(
        project=_required(config, "project", ""),
        host=_required(server, "host", "server."),
        port=_required(server, "port", "server."),
        clients=tuple(clients),
        params=params,
        he_key=he.get("key", "provisioned"),
        min_clients=config.get("min_clients"),
    )


def _mapping(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProvisionConfigError(f"{where}: expected a mapping, got {value!r}")
    unknown = sorted(str(k) for k in set(value) - known)
    if unknown:
        prefix = "" if where == "the top level" else f"{where}: "
        raise ProvisionConfigError(f"{prefix}unknown key(s) {unknown}; expected {sorted(known)}")
    return value


def _required(mapping: dict[str, Any], key: str, prefix: str) -> Any:
    if mapping.get(key) is None:
        raise ProvisionConfigError(f"{prefix}{key}: missing")
    return mapping[key]


def _check_project(project: object) -> None:
    if not isinstance(project, str) or not _PROJECT_NAME.fullmatch(project):
        raise ProvisionConfigError(
            f"project: {project!r} is not a valid project name (1 to 64 letters, digits, spaces, '-', '_', '.', "
            "starting with a letter or digit)"
        )


def _check_host(host: object) -> None:
    if not isinstance(host, str) or not host:
        raise ProvisionConfigError(f"server.host: expected the host name or IP address sites connect to, got {host!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        if address.is_unspecified:
            raise ProvisionConfigError(
                f"server.host: {host} means 'listen on every interface', not an address sites can connect to; "
                "give the host name or IP address sites use to reach the server"
            )
        return
    labels = host.split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ProvisionConfigError(
            f"server.host: {host!r} is neither an IP address nor a valid DNS name (letters, digits and '-' in "
            "dot-separated labels)"
        )


def _check_port(port: object) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ProvisionConfigError(f"server.port: expected an integer from 1 to 65535, got {port!r}")


def _check_he_key(he_key: object) -> None:
    if he_key not in KEY_SOURCES:
        raise ProvisionConfigError(
            f"he.key: {he_key!r} is not one of {list(KEY_SOURCES)}: 'provisioned' writes the CKKS secret key into "
            "every site kit; 'sites' writes none, and the sites make it when the federation forms"
        )


def _check_clients(clients: object) -> None:
    if not isinstance(clients, tuple):
        raise ProvisionConfigError(f"clients: expected a list of site names, got {clients!r}")
    if not clients:
        raise ProvisionConfigError("clients: empty; list at least one site name")
    seen: dict[str, int] = {}
    for i, name in enumerate(clients):
        if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
            raise ProvisionConfigError(
                f"clients[{i}]: {name!r} is not a valid site name (letters, digits, '-', '_', '.'; starting with a "
                "letter or digit; at most 64 characters)"
            )
        if name.lower() in RESERVED_NAMES:
            raise ProvisionConfigError(
                f"clients[{i}]: {name!r} is reserved for the {name.lower()} kit folder; choose another site name"
            )
        # Compared without case: each name is a folder, and on macOS or Windows 'Site-1' and 'site-1' are one folder.
        first = seen.setdefault(name.lower(), i)
        if first != i:
            raise ProvisionConfigError(
                f"clients[{i}]: {name!r} duplicates clients[{first}] {clients[first]!r}; site names must be unique "
                "(ignoring case)"
            )


