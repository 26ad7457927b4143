"""The aggregator's options (``configs/server.yaml``): loading, ``key=value`` overrides and validation.

Every error names the option (and the file, when there is one), so a user can fix it without reading this code.
Options left unset take their value from the server kit: ``port`` and ``clients``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from lightning_fhe.proto.wire import MAX_SEEDS
from lightning_fhe.yaml_config import read_config

# The options and what each means, in the order --help shows them. The docs repeat this table.
OPTION_HELP: dict[str, str] = {
    "port": "TCP port to listen on; default: the port in the server kit; 0 picks a free one (printed at start)",
    "bind": "address to listen on: 0.0.0.0 (every IPv4 interface, the default), 127.0.0.1, [::] ...",
    "rounds": "number of training rounds (round numbers 1..rounds); round 0 is the initial model",
    "min_clients": "quorum: sites needed to form the federation and to close a round without everyone; "
    "default: a majority of the expected sites, at least 2 (see default_quorum)",
    "clients": "expected site names (certificate common names); default: the sites in the server kit",
    "wait_after_min_s": "once the quorum is reached, seconds to wait for the other sites",
    "round_timeout_s": "seconds after a round opens (or the server starts forming) when it fails below quorum, "
    "or closes at the latest; covers download, local training and upload",
    "state_dir": "folder for the federation record and each closed round's aggregate (resume after a restart)",
    "initial_model": "torch checkpoint (state dict, or Lightning checkpoint with 'state_dict') for round 0; "
    "default: the first site that joins sends its initial weights",
    "max_concurrent_uploads": "updates accumulated at once; more wait (memory stays about one model per slot)",
    "keep_rounds": "most recent aggregates kept in state_dir (0: all)",
    "linger_s": "after the last round (or a failure), seconds to stay up so every site can download; the server "
    "exits earlier once every member fetched the last global model",
    "max_calls_per_site": "calls one site may hold at once (waits, uploads, downloads, status); more are refused "
    "with RESOURCE_EXHAUSTED, so no site can take the threads the others need",
    "stream_idle_s": "seconds an update stream may send nothing before it is cancelled and loses its upload slot",
    "silent_after_s": "seconds without any call from a member after which the server logs a warning (once per silence)",
    "max_model_values": "most values (encrypted and plaintext together) a joining site's layout may declare",
    "seeds_up_to": "a global model carries the participants' seeds (sites rebuild the sum's second polynomial, "
    "65 bytes a site a chunk) up to this many participants, and past it the server's summed second polynomial "
    "(61,440 bytes a chunk, no rebuild); 0: always summed",
    "port_file": "write the bound port to this file once listening (for scripts using port=0)",
}


def default_quorum(expected: int) -> int:
    """``min_clients`` when it is not set: a majority of the ``expected`` sites, and never fewer than 2.

    A majority, so that one dead or stalled site costs a round ``wait_after_min_s``, not ``round_timeout_s``, while
    every global model still averages most of the federation's data. At least 2, because a sum of one update is
    that update: every other site could decrypt it. (With 1 or 2 expected sites that is every site.)
    """
    return min(expected, max(2, expected // 2 + 1))


class ServerConfigError(ValueError):
    """An invalid server option. The message names the file (when there is one) and the option."""


@dataclass(frozen=True)
class ServerConfig:
    """The aggregator's options; see :data:`OPTION_HELP` for each. ``None`` means "take it from the kit"."""

    port: int | None = None
    bind: str = "0.0.0.0"
    rounds: int = 10
    min_clients: int | None = None
    clients: tuple[str, ...] | None = None
    wait_after_min_s: float = 300.0
    round_timeout_s: float = 1800.0
    state_dir: str = "aggregator-state"
    initial_model: str | None = None
    max_concurrent_uploads: int = 2
    keep_rounds: int = 3
    linger_s: float = 30.0
    port_file: str | None = None
    max_calls_per_site: int = 4
    stream_idle_s: float = 60.0
    silent_after_s: float = 300.0
    max_model_values: int = 2**31
    seeds_up_to: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.clients, list):
            object.__setattr__(self, "clients", tuple(self.clients))
        _validate(self)

    def with_kit(self, kit_clients: Sequence[str], kit_port: int) -> ServerConfig:
        """Fills what was left to the kit (``port``, ``clients``) and the quorum default (:func:`default_quorum`)."""
        clients = self.clients if self.clients is not None else tuple(kit_clients)
        resolved = replace(
            self,
            port=self.port if self.port is not None else kit_port,
            clients=clients,
            min_clients=self.min_clients if self.min_clients is not None else default_quorum(len(clients)),
        )
        unknown = [c for c in clients if c not in kit_clients]
        if unknown:
            raise ServerConfigError(
                f"clients: {unknown} have no certificate in this federation's kits (the server kit lists "
                f"{list(kit_clients)}); provision them first"
            )
        return resolved

    @property
    def expected(self) -> tuple[str, ...]:
        if self.clients is None:
            raise ValueError("clients not resolved: call with_kit() first")
        return self.clients

    @property
    def quorum(self) -> int:
        if self.min_clients is None:
            raise ValueError("min_clients not resolved: call with_kit() first")
        return self.min_clients

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["clients"] = list(self.clients) if self.clients is not None else None
        return d


def load_server_config(
    source: str | os.PathLike | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> ServerConfig:
    """Reads and validates the server options.

    Args:
        source: a YAML file, a mapping of the same shape, or None for the defaults.
        overrides: OmegaConf ``key=value`` strings applied on top, e.g. ``["rounds=5", "clients=[a,b]"]``.

    Raises:
        ServerConfigError: the file cannot be read or an option is invalid; the message names it.
    """
    where = "server config" if source is None or isinstance(source, Mapping) else str(source)
    try:
        raw = read_config(source, overrides, ServerConfigError, override_example="rounds=5")
        return _build(raw)
    except ServerConfigError as err:
        raise ServerConfigError(f"{where}: {err}") from None


def _build(raw: Any) -> ServerConfig:
    if not isinstance(raw, dict):
        raise ServerConfigError(f"expected a mapping of options, got {raw!r}")
    known = [f.name for f in fields(ServerConfig)]
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ServerConfigError(f"unknown option(s) {unknown}; expected some of {known}")
    return ServerConfig(**raw)  # __post_init__ makes a clients list a tuple


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _validate(c: ServerConfig) -> None:
    if c.port is not None and not (_is_int(c.port) and 0 <= c.port <= 65535):
        raise ServerConfigError(f"port: expected an integer from 0 to 65535, got {c.port!r}")
    if not isinstance(c.bind, str) or not c.bind:
        raise ServerConfigError(f"bind: expected an address such as 0.0.0.0 or 127.0.0.1, got {c.bind!r}")
    if not (_is_int(c.rounds) and c.rounds >= 1):
        raise ServerConfigError(f"rounds: expected an integer >= 1, got {c.rounds!r}")
    if c.clients is not None:
        if not isinstance(c.clients, tuple) or not c.clients or not all(isinstance(s, str) and s for s in c.clients):
            raise ServerConfigError(f"clients: expected a non-empty list of site names, got {c.clients!r}")
        duplicates = sorted({s for s in c.clients if c.clients.count(s) > 1})
        if duplicates:
            raise ServerConfigError(f"clients: {duplicates} listed more than once")
    if c.min_clients is not None:
        if not (_is_int(c.min_clients) and c.min_clients >= 1):
            raise ServerConfigError(f"min_clients: expected an integer >= 1, got {c.min_clients!r}")
        if c.clients is not None and c.min_clients > len(c.clients):
            raise ServerConfigError(
                f"min_clients: {c.min_clients} is more than the {len(c.clients)} expected sites in clients"
            )
    for name in ("wait_after_min_s", "linger_s"):
        value = getattr(c, name)
        if not (_is_number(value) and value >= 0):
            raise ServerConfigError(f"{name}: expected a number of seconds >= 0, got {value!r}")
    if not (_is_number(c.round_timeout_s) and c.round_timeout_s > 0):
        raise ServerConfigError(f"round_timeout_s: expected a number of seconds > 0, got {c.round_timeout_s!r}")
    if not isinstance(c.state_dir, str) or not c.state_dir:
        raise ServerConfigError(f"state_dir: expected a folder path, got {c.state_dir!r}")
    if c.initial_model is not None and (not isinstance(c.initial_model, str) or not c.initial_model):
        raise ServerConfigError(f"initial_model: expected a checkpoint path or null, got {c.initial_model!r}")
    if not (_is_int(c.max_concurrent_uploads) and c.max_concurrent_uploads >= 1):
        raise ServerConfigError(f"max_concurrent_uploads: expected an integer >= 1, got {c.max_concurrent_uploads!r}")
    if not (_is_int(c.keep_rounds) and c.keep_rounds >= 0):
        raise ServerConfigError(f"keep_rounds: expected an integer >= 0 (0 keeps all), got {c.keep_rounds!r}")
    if not (_is_int(c.max_calls_per_site) and c.max_calls_per_site >= 1):
        raise ServerConfigError(f"max_calls_per_site: expected an integer >= 1, got {c.max_calls_per_site!r}")
    for name in ("stream_idle_s", "silent_after_s"):
        value = getattr(c, name)
        if not (_is_number(value) and value > 0):
            raise ServerConfigError(f"{name}: expected a number of seconds > 0, got {value!r}")
    if not (_is_int(c.max_model_values) and c.max_model_values >= 1):
        raise ServerConfigError(f"max_model_values: expected an integer >= 1, got {c.max_model_values!r}")
    if not (_is_int(c.seeds_up_to) and 0 <= c.seeds_up_to <= MAX_SEEDS):
        raise ServerConfigError(f"seeds_up_to: expected an integer from 0 to {MAX_SEEDS}, got {c.seeds_up_to!r}")
    if c.port_file is not None and (not isinstance(c.port_file, str) or not c.port_file):
        raise ServerConfigError(f"port_file: expected a file path or null, got {c.port_file!r}")
