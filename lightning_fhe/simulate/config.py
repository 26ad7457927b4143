"""Experiment configs for ``python -m lightning_fhe.simulate``: loading, merging, overrides and validation.

An experiment file names the file it builds on with a ``base:`` key (a path relative to the file itself); the
loader merges the chain oldest first (``configs/base.yaml``, then each file that builds on it), then the
``key=value`` overrides of the command line. ``configs/base.yaml`` holds every key, with a comment, so it is the
reference for what a key means.

Validation happens here, before any process starts, because a typo found after provisioning a federation and
starting a server wastes minutes and its message would arrive from a subprocess. Every error names the key as a
dotted path and the file (or ``command line``) that set it:

    configs/experiments/quickstart.yaml: federation.rounds: expected an integer >= 1, got 0
    command line: unknown key 'federation.round' (did you mean 'federation.rounds'?)

``compare`` holds named overlays (``raw: {federation: {encrypt: none}}``); a compared setting is the experiment
with one overlay merged on top, validated like the experiment itself.

``model`` and ``data`` name any LightningModule and LightningDataModule by ``class_path`` and ``init_args``
(:mod:`~lightning_fhe.simulate.components`); validation imports them, checks the arguments against their
``__init__`` and builds each once, so a wrong argument fails here with the key that set it.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_fhe.yaml_config import malformed_override, omegaconf_message, yaml_message

__all__ = [
    "COMMAND_LINE",
    "SCHEMA",
    "ConfigError",
    "Experiment",
    "load_experiment",
    "merge",
    "setting_label",
    "site_names",
    "validate",
]

COMMAND_LINE = "command line"

# An experiment name becomes a folder name and the provisioned project name (see provision/config.py).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ENCRYPT_MODES = ("all", "conv", "key_layers", "none")
BACKENDS = ("process", "ray")


class ConfigError(ValueError):
    """An invalid experiment config; the message names the file (or ``command line``) and the dotted key."""


# ------------------------------------------------------------------------------------------------ value checks
# A check returns None when the value is fine, else what was expected, phrased to follow "key: ".

Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def integer(minimum: int = 0) -> Check:
    return lambda v: None if _is_int(v) and v >= minimum else f"expected an integer >= {minimum}, got {v!r}"


def number(
    low: float | None = None, high: float | None = None, *, open_low: bool = False, open_high: bool = False
) -> Check:
    lo = "" if low is None else ("(" if open_low else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if open_high else "]")
    wanted = f"a number in {lo or '(-inf'}, {hi or 'inf)'}"

    def check(v: Any) -> str | None:
        ok = _is_number(v)
        if ok and low is not None:
            ok = v > low if open_low else v >= low
        if ok and high is not None:
            ok = v < high if open_high else v <= high
        hint = " (write 1.0e-5, not 1e-5, which YAML reads as a string)" if isinstance(v, str) else ""
        return None if ok else f"expected {wanted}, got {v!r}{hint}"

    return check


def choice(*options: Any) -> Check:
    return lambda v: None if any(v == o and type(v) is type(o) for o in options) else (
        f"expected one of {', '.join(map(repr, options))}, got {v!r}"
    )


def string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"expected a non-empty string, got {v!r}"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"expected true or false, got {v!r}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else (None if check(v) is None else f"{check(v)} (or null)")


def either(*checks: Check) -> Check:
    def check(v: Any) -> str | None:
        errors = [c(v) for c in checks]
        if any(e is None for e in errors):
            return None
        wanted = [e.split(", got ")[0].removeprefix("expected ") for e in errors if e]
        return f"expected {' or '.join(wanted)}, got {v!r}"

    return check


def list_of(item: Check, length: int | None = None, what: str = "") -> Check:
    def check(v: Any) -> str | None:
        size = f"{length} " if length else ""
        wrong_shape = not isinstance(v, list) or not v or (length is not None and len(v) != length)
        if wrong_shape or any(item(element) for element in v):
            return f"expected a list of {size}{what}, got {v!r}"
        return None

    return check


def name(v: Any) -> str | None:
    return None if isinstance(v, str) and _NAME.fullmatch(v) else (
        f"expected 1 to 64 letters, digits, '_', '.', '-' starting with a letter or digit, got {v!r}"
    )


def encrypt(v: Any) -> str | None:
    if v in ENCRYPT_MODES or (isinstance(v, list) and v and all(isinstance(p, str) and p for p in v)):
        return None
    return f"expected one of {', '.join(ENCRYPT_MODES)} or a list of name patterns, got {v!r}"


class FreeForm:
    """A subtree whose keys another module checks (the CKKS parameters, the privacy mechanisms)."""


FREE = FreeForm()
OPTIONAL = FreeForm()  # free-form, and may be left out (a model's or data module's init_args and per_site)

# Every key an experiment may set, mirroring configs/base.yaml, which explains each.
SCHEMA: dict[str, Any] = {
    "experiment": {
        "name": name,
        "seed": integer(0),
        "output_dir": optional(string),
        "timeout_s": number(0, open_low=True),
        "metric": string,
        "metric_mode": choice("max", "min"),
    },
    "federation": {
        "sites": integer(1),
        "rounds": integer(1),
        "local_epochs": integer(1),
        "encrypt": encrypt,
        "strategy": FREE,
        "weight": optional(number(0, open_low=True)),
        "optimizer_state": choice("keep", "reset"),
        "fedprox_mu": number(0),
        "federate_buffers": boolean,
        "masking": optional(boolean),
        "min_clients": optional(integer(1)),
        "wait_after_min_s": number(0),
        "round_timeout_s": number(0, open_low=True),
    },
    "he": {"lib": choice("tenseal"), "config": FREE, "key": choice("provisioned", "sites")},
    "data": {"class_path": string, "init_args": OPTIONAL, "per_site": OPTIONAL},
    "model": {"class_path": string, "init_args": OPTIONAL},
    "trainer": {
        "accelerator": string,
        "devices": either(integer(1), choice("auto")),
        "precision": either(string, integer(16)),
        "deterministic": either(boolean, choice("warn")),
        "num_threads": optional(integer(1)),
    },
    "privacy": FREE,
    "privacy_delta": number(0.0, 1.0, open_low=True, open_high=True),
    "backend": choice(*BACKENDS),
    "ray": {
        "address": optional(string),
        "num_cpus": optional(integer(1)),
        "server_port": integer(0),
        "start_timeout_s": number(0, open_low=True),
    },
    "sites": {"resources": FREE},  # checked by _validate_backend: Ray's resource names and amounts
    "compare": FREE,  # name -> overlay; each overlay is checked against SCHEMA without "compare"
}

BASE_KEY = "base"


# ------------------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class Layer:
    """One source of values, kept apart until validated so that errors can name the file that set a key."""

    source: str  # a file path, or COMMAND_LINE
    values: dict[str, Any]


@dataclass(frozen=True)
class Experiment:
    """A validated experiment: its config (without ``compare``) and the named overlays it may be compared under.

    ``config`` is plain Python containers, interpolations resolved, ready for ``OmegaConf.create`` or YAML.
    """

    config: dict[str, Any]
    overlays: dict[str, dict[str, Any]]
    layers: tuple[Layer, ...]
    unresolved: dict[str, Any]  # the merged layers before interpolation, so overlays may interpolate too

    @property
    def name(self) -> str:
        return self.config["experiment"]["name"]

    def setting(self, overlay: str) -> dict[str, Any]:
        """The experiment with one named overlay merged on top, validated."""
        if overlay not in self.overlays:
            raise ConfigError(
                f"--compare {overlay}: no such setting under 'compare'; defined: {', '.join(self.overlays) or 'none'}"
                f"{_suggest(overlay, self.overlays)}"
            )
        where = f"compare.{overlay}"
        merged = _resolve(merge(self.unresolved, self.overlays[overlay] or {}), where)
        _check_complete(merged, SCHEMA, where, "")
        validate(merged, self.layers, overlay=where)
        return merged


def load_experiment(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Experiment:
    """Reads an experiment file and its ``base:`` chain, applies ``key=value`` overrides, and validates it all.

    Raises:
        ConfigError: a file is missing or not YAML, a key is unknown or a value invalid; the message names the
            file (or ``command line``) and the dotted key.
    """
    layers = [*_file_chain(Path(path)), _override_layer(overrides)]
    merged: dict[str, Any] = {}
    for layer in layers:
        _check_keys(layer.values, SCHEMA, layer.source, "")
        merged = merge(merged, layer.values)
    overlays = merged.pop("compare", None) or {}
    config = _resolve(merged, str(path))
    _check_complete(config, SCHEMA, str(path), "")
    validate(config, layers)
    experiment = Experiment(config=config, overlays=overlays, layers=tuple(layers), unresolved=merged)
    for overlay in overlays:  # a broken overlay should fail now, not after the settings before it have run
        experiment.setting(overlay)
    return experiment


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``: mappings merge key by key, anything else is replaced.

    Exceptions: a ``privacy`` or ``strategy`` block that names other mechanisms (strategies) replaces the one
    below it, since two in one mapping would be an error; a ``model`` or ``data`` block with another
    ``class_path`` replaces the one below it with its ``init_args``, whose names belong to the other class.
    """
    result = dict(base)
    for key, value in update.items():
        below = result.get(key)
        both_mappings = isinstance(below, dict) and isinstance(value, dict)
        replaced = both_mappings and (
            (key in ("privacy", "strategy") and set(below) != set(value))
            or ("class_path" in value and value["class_path"] != below.get("class_path"))
        )
        if both_mappings and not replaced:
            result[key] = merge(below, value)
        else:
            result[key] = value
    return result


def _resolve(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Interpolations (``${federation.rounds}``) resolved, and '???' (a value the user must give) refused."""
    try:
        config = OmegaConf.create(values)
        missing = sorted(OmegaConf.missing_keys(config))
        if missing:
            raise ConfigError(
                f"{where}: {missing[0]}: required and not set (it is '???'); give it on the command line, "
                f"e.g. {missing[0]}=..."
            )
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {omegaconf_message(err)}") from None


def _file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[Layer]:
    """The files ``path`` builds on (``base:``), oldest first, then ``path`` itself."""
    source = str(path)
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"{source}: 'base' chain loops back to this file")
    if not path.is_file():
        raise ConfigError(f"{source}: {'no such config file' if not path.exists() else 'not a file'}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{source}: cannot read the file ({err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {yaml_message(err)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(values).__name__}")
    base = values.pop(BASE_KEY, None)
    chain: list[Layer] = []
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{source}: base: expected the path of the file this one builds on, got {base!r}")
        chain = _file_chain(path.parent / base, (*seen, resolved))
    # Round-trip through OmegaConf so that a file's values are typed exactly as the merged config's will be.
    try:
        values = OmegaConf.to_container(OmegaConf.create(values), resolve=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {omegaconf_message(err)}") from None
    return [*chain, Layer(source, values)]


def _override_layer(overrides: Sequence[str]) -> Layer:
    bad = malformed_override(overrides)
    if bad is not None:
        raise ConfigError(f"{COMMAND_LINE}: {bad!r}: expected key=value, e.g. federation.rounds=3")
    if any(o.split("=", 1)[0].strip() == BASE_KEY for o in overrides):
        raise ConfigError(f"{COMMAND_LINE}: 'base' can only be set in a file; pass that file instead")
    try:
        values = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{COMMAND_LINE}: {omegaconf_message(err)}") from None
    return Layer(COMMAND_LINE, values)


# ------------------------------------------------------------------------------------------------ validation


def _check_keys(values: Any, schema: Any, source: str, prefix: str) -> None:
    """Unknown keys in one layer are errors naming that layer: a typo silently ignored is a wrong experiment."""
    if isinstance(schema, FreeForm):
        if prefix == "compare." and values is not None:
            _check_overlays(values, source)
        return
    if not isinstance(schema, dict):
        return
    if not isinstance(values, dict):
        if values is None and prefix:
            return  # "data.synthetic: null" is caught as a missing key by _check_complete
        raise ConfigError(f"{source}: {prefix or 'the top level'}: expected a mapping of keys, got {values!r}")
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(
                f"{source}: unknown key '{dotted}'{_suggest(key, schema, prefix)}; see configs/base.yaml for every key"
            )
        _check_keys(value, schema[key], source, f"{dotted}.")


def _check_overlays(overlays: Any, source: str) -> None:
    if not isinstance(overlays, dict):
        raise ConfigError(f"{source}: compare: expected a mapping of setting name -> overlay, got {overlays!r}")
    for overlay, values in overlays.items():
        where = f"compare.{overlay}"
        problem = name(overlay)
        if problem:
            raise ConfigError(f"{source}: {where}: a setting name is {problem.removeprefix('expected ')}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping of keys to override, got {values!r}")
        for key in values:
            if key in ("compare", "experiment"):
                raise ConfigError(f"{source}: {where}.{key}: an overlay cannot change '{key}'")
        _check_keys(values, SCHEMA, f"{source}: {where}", "")


def _check_complete(config: dict[str, Any], schema: dict[str, Any], source: str, prefix: str) -> None:
    """Every key of the schema must be set somewhere (base.yaml sets them all), so no default hides in code."""
    for key, sub in schema.items():
        dotted = f"{prefix}{key}"
        if key == "compare" or sub is OPTIONAL:
            continue
        if key not in config:
            raise ConfigError(f"{source}: {dotted}: missing; does the file build on configs/base.yaml ('base:')?")
        if isinstance(sub, dict):
            if not isinstance(config[key], dict):
                raise ConfigError(f"{source}: {dotted}: expected a mapping of keys, got {config[key]!r}")
            _check_complete(config[key], sub, source, f"{dotted}.")


def validate(config: dict[str, Any], layers: Sequence[Layer] = (), overlay: str = "") -> None:
    """Checks every value and the rules between values; errors name the key and the layer that set it last.

    ``overlay`` names the compared setting being checked (``compare.raw``), whose own values win over the rest.
    """

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{_origin(key, layers, overlay)}: {key}: {problem}")

    for key, check, value in _leaves(config, SCHEMA, ""):
        problem = check(value)
        if problem:
            fail(key, problem)

    federation = config["federation"]
    if federation["min_clients"] is not None and federation["min_clients"] > federation["sites"]:
        fail("federation.min_clients", f"{federation['min_clients']} is more than the {federation['sites']} sites")

    _validate_backend(config, fail)
    _validate_he(config, fail)
    _validate_privacy(config, fail)
    _validate_strategy(config, fail)
    _validate_components(config, fail)


def _leaves(values: dict[str, Any], schema: dict[str, Any], prefix: str):
    for key, sub in schema.items():
        if isinstance(sub, FreeForm) or key not in values:
            continue
        if isinstance(sub, dict):
            yield from _leaves(values[key], sub, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", sub, values[key]


def _validate_backend(config: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    """``backend: ray`` needs the ray package (imported only then) and a resource request Ray accepts; the Ray keys
    mean nothing to the process backend, so setting them there is a mistake worth naming."""
    ray_config = config["ray"]
    if config["backend"] == "process":
        for key in ("address", "num_cpus", "server_port"):
            if ray_config[key] not in (None, 0):
                fail(f"ray.{key}", "set, but backend is 'process'; add backend=ray to run the sites on Ray")
        return
    address = ray_config["address"]
    if address is not None and address.startswith("ray://"):
        fail(
            "ray.address",
            f"{address}: Ray Client addresses are not supported: the server runs on the driver's node, which must be "
            "a node of the cluster; run the simulator on one (ray.address=auto, or the head's HOST:PORT)",
        )
    host, _, port = (address or "").rpartition(":")
    if address not in (None, "auto") and (not host or not port.isdigit()):
        fail("ray.address", f"expected auto or HOST:PORT (the head's GCS port, 6379 by default), got {address!r}")
    if ray_config["server_port"] > 65535:
        fail("ray.server_port", f"expected a TCP port, 0 to 65535 (0: any free port), got {ray_config['server_port']}")
    if address is not None and ray_config["num_cpus"] is not None:
        fail("ray.num_cpus", "only for a local Ray started for the run (ray.address: null); a cluster's nodes "
                             "declare their own CPUs")  # fmt: skip
    from lightning_fhe.simulate.ray_backend import ResourceError, site_request

    try:
        site_request(config["sites"]["resources"])
    except ResourceError as err:
        fail(err.key, err.reason)
    if importlib.util.find_spec("ray") is None:
        fail("backend", "ray needs the ray package, which is not installed: pip install 'lightning_fhe[ray]'")


def _validate_he(config: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    from lightning_fhe.he.params import CKKSParams, HEConfigError

    try:
        CKKSParams.from_mapping(config["he"]["config"] or {}, where="he.config")
    except HEConfigError as err:
        key, _, problem = str(err).partition(": ")
        fail(key, problem)


def _validate_privacy(config: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    if not config["privacy"]:
        return
    from lightning_fhe.privacy import PrivacyConfigError, mechanism_from_config

    try:
        mechanism_from_config(config["privacy"], rounds=config["federation"]["rounds"])
    except PrivacyConfigError as err:
        fail(err.key, err.reason)


def _validate_strategy(config: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    from lightning_fhe.strategies import StrategyConfigError, strategy_from_config

    try:
        strategy_from_config(config["federation"]["strategy"], prefix="federation.strategy")
    except StrategyConfigError as err:
        fail(err.key, err.reason)


def _validate_components(config: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    """Imports the model and data classes, checks their arguments and builds each once (site-1's data module)."""
    from lightning_fhe.simulate.components import ComponentError, build_data, build_model

    sites = config["federation"]["sites"]
    lists = [len(v) for v in (config["data"].get("per_site") or {}).values() if isinstance(v, list)]
    builds = [("model", "", lambda: build_model(config["model"]))]
    for site in range(min(sites, max(lists, default=1))):  # each distinct per_site combination once
        builds.append(("data", f" (site-{site + 1}'s)", lambda site=site: build_data(config["data"], site, sites)))
    for key, whose, build in builds:
        try:
            build()
        except ComponentError as err:
            fail(err.key, err.reason)
        except Exception as err:  # noqa: BLE001 - the class's own check of its arguments, in its own words
            cls = config[key]["class_path"]
            fail(key, f"{cls}(...) refused its arguments{whose}: {type(err).__name__}: {err}")


def _origin(key: str, layers: Sequence[Layer], overlay: str) -> str:
    """The last layer that set ``key`` (or a key above it): the line the user should look at."""
    parts = key.replace("[", ".[").split(".")
    if overlay:  # an overlay's own values win in the merge, so it is the origin wherever it sets the key
        for layer in reversed(layers):
            if _sets(layer.values, [*overlay.split("."), *parts]):
                return f"{layer.source}: {overlay}"
    for layer in reversed(layers):
        if _sets(layer.values, parts):
            return layer.source
    return layers[-1].source if layers else "config"


def _sets(values: Any, parts: list[str]) -> bool:
    for part in parts:
        if part.startswith("["):
            return True  # a list element: whoever set the list set it
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def _suggest(key: str, choices: Sequence[str] | Mapping[str, Any], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


# ------------------------------------------------------------------------------------------------ naming


def setting_label(config: Mapping[str, Any]) -> str:
    """What a single (not compared) run is called in the table: the seed's names for its encryption modes, and
    the strategy and privacy mechanisms when set."""
    encrypt_mode = config["federation"]["encrypt"]
    label = {"none": "raw", "all": "he_full", "conv": "he_conv", "key_layers": "he_key_layers"}.get(
        encrypt_mode if isinstance(encrypt_mode, str) else "", "he_custom"
    )
    strategy = config["federation"].get("strategy")
    if strategy:
        label += "+" + (strategy if isinstance(strategy, str) else str(next(iter(strategy))))
    privacy = config.get("privacy")
    if privacy:
        stages = privacy if isinstance(privacy, list) else [privacy]
        label += "+" + "+".join(str(next(iter(stage))) for stage in stages if isinstance(stage, dict) and stage)
    return label


def site_names(config: Mapping[str, Any]) -> list[str]:
    """The provisioned site names, ``site-1`` .. ``site-N``: site index i is ``site-{i+1}``."""
    return [f"site-{i + 1}" for i in range(config["federation"]["sites"])]
