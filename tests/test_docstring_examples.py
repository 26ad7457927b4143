"""The examples in the pure modules' docstrings run, so they stay true to the code."""

import doctest
import importlib

import pytest

MODULES = [
    "lightning_fhe.evaluation",
    "lightning_fhe.federated_metrics",
    "lightning_fhe.he.codec",
    "lightning_fhe.he.frames",
    "lightning_fhe.he.layout",
    "lightning_fhe.he.modular",
    "lightning_fhe.he.packing",
    "lightning_fhe.he.pool",
    "lightning_fhe.he.seeded",
    "lightning_fhe.masking.keys",
    "lightning_fhe.masking.masks",
    "lightning_fhe.masking.site_key",
    "lightning_fhe.proto.sealed_keys",
    "lightning_fhe.proto.update_shape",
    "lightning_fhe.selection",
    "lightning_fhe.server.activity",
    "lightning_fhe.server.membership",
    "lightning_fhe.server.rounds",
    "lightning_fhe.simulate.ray_backend",
    "lightning_fhe.strategies.adaptive",
    "lightning_fhe.strategies.base",
    "lightning_fhe.strategies.config",
    "lightning_fhe.strategies.fedavg",
    "lightning_fhe.strategies.replica",
    "lightning_fhe.tasks.partition",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
