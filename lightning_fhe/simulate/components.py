"""The model and data of a simulated federation, given as ``class_path``/``init_args`` (LightningCLI's convention).

    model:
      class_path: my_package.MyModel          # any LightningModule, importable at every site
      init_args: {hidden: 64, lr: 0.01}
    data:
      class_path: my_package.MyDataModule     # any LightningDataModule that can be told which site it serves
      init_args: {batch_size: 32}
      per_site: {data_fraction: [1.0, 0.5]}   # init args that differ between sites: a list, repeated over them

**The site protocol.** Every site process builds its own data module and must get its own share of the data:

1. if the data module's ``__init__`` takes ``site_index`` and ``num_sites``, they are passed as init args
   (``site_index`` is 0-based: site-1 is 0);
2. otherwise, if it has a method ``partition(site_index, num_sites)``, that is called right after construction;
3. otherwise the simulation refuses to start: every site would train on the same data.

The simulator calls the data module's ``prepare_data()`` once, in its own process, before any site starts (where
a dataset is written or downloaded), then each site runs as under a Trainer. :func:`lightning_fhe.tasks.partition`
holds IID and Dirichlet label splits for classification data.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["ComponentError", "build_data", "build_model", "check_component", "import_class", "site_init_args"]

SITE_ARGS = ("site_index", "num_sites")


class ComponentError(ValueError):
    """A ``model`` or ``data`` block that cannot be built; ``key`` is the dotted place of the fault."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def import_class(path: Any, key: str) -> type:
    """The class a dotted ``module.Class`` path names."""
    if not isinstance(path, str) or "." not in path:
        raise ComponentError(key, f"expected a dotted path such as my_package.MyModel, got {path!r}")
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ComponentError(
            key, f"cannot import {module_name!r} ({err}); is it installed, or in the folder you run from?"
        ) from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise ComponentError(key, f"{module_name!r} has no class {name!r}")
    return cls


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    return {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _takes_any_keyword(cls: type) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def check_component(block: Mapping[str, Any], key: str, *, sites: int | None = None) -> type:
    """Imports ``block["class_path"]`` and checks ``init_args`` (and ``per_site``) against its ``__init__``,
    without building anything. For ``data`` (``sites`` given) the site protocol is checked too."""
    cls = import_class(block.get("class_path"), f"{key}.class_path")
    init_args = block.get("init_args") or {}
    per_site = block.get("per_site") or {}
    if not isinstance(init_args, Mapping):
        raise ComponentError(f"{key}.init_args", f"expected a mapping of argument names to values, got {init_args!r}")
    if not isinstance(per_site, Mapping):
        raise ComponentError(f"{key}.per_site", f"expected a mapping of argument names to lists, got {per_site!r}")
    parameters = _parameters(cls)
    for where, names in ((f"{key}.init_args", init_args), (f"{key}.per_site", per_site)):
        for name in names:
            if name in SITE_ARGS and sites is not None:
                raise ComponentError(f"{where}.{name}", "set by the simulator for each site; remove it")
            if name not in parameters and not _takes_any_keyword(cls):
                close = difflib.get_close_matches(str(name), list(parameters), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ComponentError(
                    f"{where}.{name}",
                    f"{cls.__name__} takes no argument {name!r}; it takes {', '.join(parameters)}{hint}",
                )
    for name, values in per_site.items():
        if not isinstance(values, list) or not values:
            raise ComponentError(
                f"{key}.per_site.{name}", f"expected a non-empty list (repeated over the sites), got {values!r}"
            )
    given = {*init_args, *per_site, *(SITE_ARGS if sites is not None and _told_by_init(cls) else ())}
    missing = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty and n not in given]
    if missing:
        raise ComponentError(f"{key}.init_args.{missing[0]}", f"required by {cls.__name__}")
    if sites is not None and not _told_by_init(cls) and not callable(getattr(cls, "partition", None)):
        raise ComponentError(
            f"{key}.class_path",
            f"{cls.__name__} cannot be told which site it serves, so every site would train on the same data: give "
            "its __init__ site_index and num_sites arguments, or a partition(site_index, num_sites) method "
            "(see docs/experiments.md, 'Your own model and data')",
        )
    return cls


def _told_by_init(cls: type) -> bool:
    return all(name in _parameters(cls) for name in SITE_ARGS)


def site_init_args(block: Mapping[str, Any], site_index: int) -> dict[str, Any]:
    """``init_args`` with this site's ``per_site`` values: a list repeats over the sites."""
    args = dict(block.get("init_args") or {})
    for name, values in (block.get("per_site") or {}).items():
        args[name] = values[site_index % len(values)]
    return args


def build_model(block: Mapping[str, Any]) -> Any:
    """The LightningModule of a ``model`` block."""
    cls = check_component(block, "model")
    return cls(**site_init_args(block, 0))


def build_data(block: Mapping[str, Any], site_index: int, num_sites: int) -> Any:
    """Site ``site_index``'s LightningDataModule of a ``data`` block, told its site by the protocol above."""
    cls = check_component(block, "data", sites=num_sites)
    args = site_init_args(block, site_index)
    if _told_by_init(cls):
        return cls(**args, site_index=site_index, num_sites=num_sites)
    data = cls(**args)
    data.partition(site_index, num_sites)
    return data
