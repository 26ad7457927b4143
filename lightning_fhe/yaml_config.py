"""Reading a YAML config with ``key=value`` overrides through OmegaConf, with one-line errors that name the key.

Shared by the provisioning, server and experiment configs; each validates the resulting containers itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def read_config(
    source: str | os.PathLike | Mapping[str, Any] | None,
    overrides: Sequence[str],
    error: type[Exception],
    override_example: str,
) -> Any:
    """The config as plain Python containers, overrides merged and interpolations resolved.

    Args:
        source: a YAML file, a mapping (a dict or an OmegaConf ``DictConfig``), or None for an empty config.
        overrides: OmegaConf ``key=value`` strings applied on top.
        error: raised, with a one-line message, for anything that cannot be read.
        override_example: a well-formed override for this config, shown when one is malformed.
    """
    try:
        if source is None:
            base = OmegaConf.create({})
        elif isinstance(source, Mapping):
            base = source if isinstance(source, DictConfig) else OmegaConf.create(dict(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise error("no such config file" if not path.exists() else "not a file")
            base = OmegaConf.load(path)
        if overrides:
            bad = malformed_override(overrides)
            if bad is not None:
                raise error(f"override {bad!r}: expected key=value, e.g. {override_example}")
            try:
                dotlist = OmegaConf.from_dotlist(list(overrides))
            except OmegaConfBaseException as err:
                raise error(f"overrides: {omegaconf_message(err)}") from None
            except yaml.YAMLError as err:  # a value such as '[' : the override is at fault, not the file
                raise error(f"overrides: not valid YAML: {yaml_message(err)}") from None
            base = OmegaConf.merge(base, dotlist)
        return OmegaConf.to_container(base, resolve=True, throw_on_missing=True)
    except error:
        raise
    except OmegaConfBaseException as err:
        raise error(omegaconf_message(err)) from None
    except OSError as err:
        raise error(f"cannot read the file ({err.strerror})") from None
    except yaml.YAMLError as err:  # the parser's errors reach us unwrapped by omegaconf
        raise error(f"not valid YAML: {yaml_message(err)}") from None
    except UnicodeDecodeError:
        raise error("not a YAML file (it is not UTF-8 text)") from None


def malformed_override(overrides: Sequence[str]) -> str | None:
    """The first override that is not ``key=value`` with a non-empty key, or None."""
    return next((o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()), None)


def omegaconf_message(err: OmegaConfBaseException) -> str:
    """OmegaConf's message, led by the key it concerns, which it keeps apart from the text."""
    key = getattr(err, "full_key", None)
    message = _first_line(err)
    return f"{key}: {message}" if key and not message.startswith(f"{key}:") else message


def yaml_message(err: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is; its first line alone ('while parsing a flow node') says neither."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
