"""Federated evaluation's pseudo-tensor, directly: weighted means, absent and mismatched rows, limits."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_fhe.federated_metrics import (
    LARGEST_VALUE,
    MAX_METRICS,
    METRICS_SPEC,
    carried_names,
    decode_metrics,
    encode_metrics,
    metric_rows,
)


def average(*sites: tuple[float, dict[str, float]]) -> np.ndarray:
    """What the encrypted sum decrypts to: the weighted mean of the sites' pseudo-tensors."""
    total = sum(weight for weight, _ in sites)
    return sum(weight * encode_metrics(metrics) for weight, metrics in sites) / total


def test_means_are_weighted_over_the_sites_that_reported_each_metric():
    mean = average((64.0, {"val/loss": 1.0, "val/acc": 0.5}), (80.0, {"val/loss": 2.0}))
    means = decode_metrics(mean, carried_names({"val/loss": 0, "val/acc": 0}))
    assert means["val/loss"] == pytest.approx((64 * 1.0 + 80 * 2.0) / 144)
    assert means["val/acc"] == pytest.approx(0.5)  # only the first site reported it


def test_rows_the_sites_filled_with_different_metrics_are_dropped():
    # Two names in the same row (a collision) at two sites: the tags disagree, and the row is not reported.
    names = [f"metric_{i}" for i in range(40)]
    row = {name: metric_rows([name])[name] for name in names}
    first, second = next((a, b) for a in names for b in names if a < b and row[a] == row[b])
    mean = average((1.0, {"x": 1.0, first: 2.0}), (1.0, {"x": 3.0, second: 4.0}))
    assert decode_metrics(mean, ["x", first]) == {"x": 2.0}


def test_values_that_cannot_be_carried_are_left_out():
    mean = average((1.0, {"nan": float("nan"), "huge": LARGEST_VALUE * 2, "fine": -3.5}))
    assert decode_metrics(mean, carried_names({"nan": 0, "huge": 0, "fine": 0})) == {"fine": -3.5}
    assert decode_metrics(average((1.0, {})), ["anything"]) == {}


def test_the_pseudo_tensor_has_a_fixed_size_and_keeps_the_first_metrics_by_name():
    many = {f"m{i:02d}": float(i) for i in range(MAX_METRICS + 4)}
    assert encode_metrics(many).shape == (METRICS_SPEC.numel,) == (MAX_METRICS * 3,)
    assert carried_names(many) == [f"m{i:02d}" for i in range(MAX_METRICS)]
    assert decode_metrics(average((1.0, many)), carried_names(many))["m15"] == 15.0
