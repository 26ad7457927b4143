"""Validation under federation, on the Lightning side: only global models are validated, and what a validation of
a global model logged is kept for federated evaluation.

With ``local_epochs > 1`` a Trainer that validates every epoch would measure local models in most epochs, and
``ModelCheckpoint`` or ``EarlyStopping`` could keep or stop on one of them. :class:`HEFederation` exchanges right
before the epoch's validation, so validating every ``local_epochs``-th epoch (``check_val_every_n_epoch``) measures
exactly the global models; :func:`validation_every` checks the Trainer's setting against that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["GlobalValidation", "ValidationScheduleError", "logging_step", "validation_every", "validation_metrics"]


class ValidationScheduleError(ValueError):
    """The Trainer would validate local models between two exchanges."""


def validation_every(local_epochs: int, check_val_every_n_epoch: int | None, val_check_interval: Any) -> int:
    """The ``check_val_every_n_epoch`` to run with: the Trainer's when it validates only global models, and
    ``local_epochs`` in place of Lightning's default of 1.

    Example::

        >>> validation_every(3, 1, 1.0)     # Lightning's default: every epoch -> every round
        3
        >>> validation_every(3, 6, 1.0)     # every second round: fine
        6
        >>> validation_every(3, 2, 1.0)
        Traceback (most recent call last):
        ...
        lightning_fhe.evaluation.ValidationScheduleError: check_val_every_n_epoch=2 would validate local models: ...

    Raises:
        ValidationScheduleError: the Trainer would validate between exchanges: ``check_val_every_n_epoch`` not a
            multiple of ``local_epochs``, validation by steps (``check_val_every_n_epoch=None``), or more than once
            per epoch (``val_check_interval`` other than 1.0).
    """
    if local_epochs == 1:
        return check_val_every_n_epoch if check_val_every_n_epoch is not None else 1
    fix = (
        f"Set check_val_every_n_epoch to a multiple of local_epochs (e.g. {local_epochs}), or leave it at the "
        "default 1, which HEFederation turns into local_epochs"
    )
    if check_val_every_n_epoch is None:
        raise ValidationScheduleError(
            f"check_val_every_n_epoch=None validates every val_check_interval={val_check_interval!r} steps, which "
            f"measures local models between exchanges (local_epochs={local_epochs}). {fix}"
        )
    if not (isinstance(val_check_interval, float) and val_check_interval == 1.0) and val_check_interval != 1:
        raise ValidationScheduleError(
            f"val_check_interval={val_check_interval!r} validates within the epoch, before the exchange, i.e. local "
            f"models (local_epochs={local_epochs}). Leave val_check_interval at 1.0"
        )
    if check_val_every_n_epoch == 1:
        return local_epochs
    if check_val_every_n_epoch % local_epochs:
        raise ValidationScheduleError(
            f"check_val_every_n_epoch={check_val_every_n_epoch} would validate local models: with "
            f"local_epochs={local_epochs} the global model exists only after every {_ordinal(local_epochs)} epoch. "
            f"{fix}"
        )
    return check_val_every_n_epoch


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def validation_metrics(trainer: Any) -> dict[str, float]:
    """The scalar metrics the validation that just ended logged (call from ``on_validation_end``).

    Lightning keeps them in the validation loop's result collection (``trainer._results`` while it runs); the
    public ``callback_metrics`` mixes them with training metrics. Names of non-scalar values are left out.
    """
    results = getattr(trainer, "_results", None)
    metrics = results.metrics(False)["callback"] if results is not None else trainer.callback_metrics
    out = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):  # a tensor of several values
            continue
        out[str(name)] = number
    return out


def logging_step(trainer: Any) -> int:
    """The step Lightning's loggers file the metrics logged now under (the optimizer steps taken, which during the
    epoch-end validation is one below ``global_step`` for some loops): metrics logged at it share the row."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


@dataclass(frozen=True)
class GlobalValidation:
    """What a site's validation of round ``round``'s global model logged, at ``step``, awaiting the next upload."""

    round: int
    step: int
    metrics: Mapping[str, float]
