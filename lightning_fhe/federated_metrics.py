"""Federated evaluation: the sites' validation metrics, averaged over the sites like the model, encrypted.

After round ``r`` every site validates the same global model on its own validation data. Those metrics travel,
encrypted, inside the site's round ``r + 1`` update, as one small pseudo-tensor appended to the update's layout
(:data:`METRICS_SPEC`, 48 values); the server adds them with the rest without being able to read them, and every
site decrypts the weighted mean over the sites. Nothing new reaches the server: it sees one more ciphertext slot
range, never a value. (With ``encrypt="none"`` the pseudo-tensor travels in plaintext like the whole model.)

Each of the :data:`MAX_METRICS` rows holds ``(value * present, present, tag * present)``. A metric's row follows from
its name (a hash, the next free row on a collision), so a metric that one site does not log moves no other;
``present`` is 0 for an empty row or a value that is not finite or too large to carry (:data:`LARGEST_VALUE`).
Averaged with the sites' shares ``s_i``, ``value / present`` is
``sum(s_i * v_i) / sum(s_i)`` over the sites that reported that metric: the mean weighted like the model (by the
number of training samples, unless the sites set ``weight``). The tag is a number derived from the metric's name:
if the sites put different metrics in a row, the averaged tag differs from the site's own and the row is dropped,
never reported under a wrong name.

Example::

    >>> import numpy as np
    >>> a = encode_metrics({"val/acc": 0.5, "val/loss": 1.0})
    >>> b = encode_metrics({"val/acc": 0.9, "val/loss": 2.0})
    >>> mean = (3 * a + 1 * b) / 4                  # what the sum decrypts to, for weights 3 and 1
    >>> decode_metrics(mean, ["val/acc", "val/loss"])
    {'val/acc': 0.6, 'val/loss': 1.25}
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from lightning_fhe.he.layout import TensorSpec

__all__ = [
    "LARGEST_VALUE",
    "MAX_METRICS",
    "METRICS_SPEC",
    "METRICS_TENSOR",
    "carried_names",
    "decode_metrics",
    "encode_metrics",
    "metric_rows",
]

#: The pseudo-tensor's name in the update's layout; no module can own a name starting with "__".
METRICS_TENSOR = "__fhe__.validation_metrics"
#: Metrics carried per round; more are left out (the first by sorted name are kept).
MAX_METRICS = 16
#: float32 on the wire, so that with ``encrypt="none"`` the plaintext stream stays float32.
METRICS_SPEC = TensorSpec(METRICS_TENSOR, (MAX_METRICS, 3), "float32")
#: Larger magnitudes are not carried: the encrypted range is |x| < 2^19 with the default parameters.
LARGEST_VALUE = 2.0**17
# Tags are multiples of 2^-13 in (0, 0.5]: far apart compared with the fixed-point grid's 6e-8.
_TAG_STEPS = 2**12
_TAG_TOLERANCE = 2.0**-16


def metric_tag(name: str) -> float:
    """A number in (0, 0.5] derived from ``name``, the same at every site."""
    return (_digest(name) // MAX_METRICS % _TAG_STEPS + 1) / (2 * _TAG_STEPS)  # bits the row did not use


def _digest(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def carried_names(metrics: Mapping[str, float]) -> list[str]:
    """The metrics that fit in the rows: the first :data:`MAX_METRICS` by sorted name."""
    return sorted(metrics)[:MAX_METRICS]


def metric_rows(names: Sequence[str]) -> dict[str, int]:
    """Each carried name's row: its hash modulo the rows, or the next free row (names taken in sorted order)."""
    rows: dict[str, int] = {}
    taken: set[int] = set()
    for name in sorted(names)[:MAX_METRICS]:
        row = _digest(name) % MAX_METRICS
        while row in taken:
            row = (row + 1) % MAX_METRICS
        taken.add(row)
        rows[name] = row
    return rows


def encode_metrics(metrics: Mapping[str, float] | None) -> np.ndarray:
    """The pseudo-tensor's flat float64 values for ``metrics`` (None or empty: every row absent)."""
    rows = np.zeros((MAX_METRICS, 3), dtype=np.float64)
    for name, row in metric_rows(list(metrics or {})).items():
        value = float(metrics[name])
        if math.isfinite(value) and abs(value) < LARGEST_VALUE:
            rows[row] = (value, 1.0, metric_tag(name))
    return rows.reshape(-1)


def decode_metrics(average: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """The weighted means from the decrypted average of the pseudo-tensor; ``names``: the names this site put in
    its rows. Rows no site reported, or whose sites disagreed on the name, are left out."""
    rows = np.asarray(average, dtype=np.float64).reshape(MAX_METRICS, 3)
    means = {}
    for name, row in metric_rows(names).items():
        weighted, present, tag = rows[row]
        if present <= 0:
            continue
        if abs(tag / present - metric_tag(name)) > _TAG_TOLERANCE:
            continue  # another site put another metric in this row
        means[name] = float(weighted / present)
    return means
