"""SpleenSegmentation trained for real (briefly) on synthetic Task09 data: logging, metric wiring, determinism."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

pytest.importorskip("nibabel", reason="reading MSD NIfTI volumes needs nibabel")

from lightning_fhe.tasks import MSDDataModule, SpleenSegmentation, write_synthetic_msd  # noqa: E402

# The settings recommended for quick demos (see the report in the tasks package): 12 cases of 48^3, 32^3
# patches, SegResNet with 8 initial filters, Adam at 3e-3. Cheap enough for a CPU, and Dice climbs within epochs.
QUICK_DATA = {"num_cases": 12, "size": (48, 48, 48)}
QUICK_LOADER = {"patch_size": 32, "samples_per_volume": 2, "batch_size": 1, "val_fraction": 0.25, "cache": True}
QUICK_MODEL = {"init_filters": 8, "lr": 3e-3, "roi_size": 32, "loss": "dice"}


class DiceHistory(L.Callback):
    """Collects ``val/dice`` after every real validation (``on_validation_end`` runs after the module logged)."""

    def __init__(self) -> None:
        self.dice: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.dice.append(float(trainer.callback_metrics["val/dice"]))


def _trainer(max_epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_msd(tmp_path_factory.mktemp("spleen") / "Task09_Spleen", 6, size=(32, 32, 32), seed=0)


def _small_datamodule(root: Path, **kwargs) -> MSDDataModule:
    args = {"patch_size": 16, "samples_per_volume": 2, "batch_size": 2, "val_fraction": 0.34, "cache": True}
    return MSDDataModule(root, 0, 1, **{**args, **kwargs})


def test_short_fit_logs_train_loss_and_val_dice(small_root: Path) -> None:
    L.seed_everything(0)
    model = SpleenSegmentation(init_filters=8, lr=3e-3, roi_size=16)
    history = DiceHistory()
    trainer = _trainer(2, callbacks=[history])
    trainer.fit(model, datamodule=_small_datamodule(small_root))

    assert len(history.dice) == 2
    assert all(0.0 <= d <= 1.0 for d in history.dice)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


def test_hyperparameters_are_saved_and_rebuild_the_model() -> None:
    model = SpleenSegmentation(init_filters=8, lr=2e-3, roi_size=(32, 32, 16), loss="dicece")
    assert model.hparams.init_filters == 8 and model.hparams.lr == 2e-3 and model.hparams.loss == "dicece"
    twin = SpleenSegmentation(**model.hparams)
    assert twin.roi_size == (32, 32, 16)
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kwargs", [{"init_filters": 4}, {"init_filters": 12}, {"loss": "focal"}])
def test_bad_model_arguments_are_refused_clearly(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="multiple of 8|loss"):
        SpleenSegmentation(**kwargs)


class _Threshold(nn.Module):
    """A stand-in network that segments by intensity: the synthetic spleen is brighter than its background."""

    def __init__(self, invert: bool = False) -> None:
        super().__init__()
        self.sign = -1.0 if invert else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Spheres lie at >= 40 HU (>= 0.44 after the CT window), background at <= 0 HU (<= 0.26).
        foreground = self.sign * (x - 0.35) * 100.0
        return torch.cat([-foreground, foreground], dim=1)


@pytest.mark.parametrize(("invert", "expected"), [(False, 1.0), (True, 0.0)])
def test_val_dice_is_foreground_dice_over_whole_volumes(small_root: Path, invert: bool, expected: float) -> None:
    model = SpleenSegmentation(init_filters=8, roi_size=16)
    model.net = _Threshold(invert)
    # Default preprocessing (Spacingd, window, crop) on purpose: it must keep labels aligned with their images.
    dm = MSDDataModule(small_root, 0, 1, patch_size=16, val_fraction=0.34)
    (metrics,) = _trainer(1).validate(model, datamodule=dm, verbose=False)
    assert metrics["val/dice"] == pytest.approx(expected, abs=1e-3)


def test_training_is_deterministic_under_seed_everything(small_root: Path) -> None:
    def run() -> tuple[dict[str, torch.Tensor], float]:
        L.seed_everything(123)
        model = SpleenSegmentation(init_filters=8, lr=3e-3, roi_size=16)
        trainer = _trainer(1, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=_small_datamodule(small_root))
        return model.state_dict(), float(trainer.callback_metrics["val/dice"])

    (first, dice_1), (second, dice_2) = run(), run()
    assert dice_1 == dice_2
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_dice_improves_over_a_few_epochs(tmp_path: Path) -> None:
    """The property the federated demo relies on: with the quick settings, later epochs score higher Dice."""
    root = write_synthetic_msd(tmp_path / "Task09_Spleen", seed=0, **QUICK_DATA)
    L.seed_everything(0)
    history = DiceHistory()
    start = time.perf_counter()
    _trainer(8, callbacks=[history], num_sanity_val_steps=0).fit(
        SpleenSegmentation(**QUICK_MODEL), datamodule=MSDDataModule(root, 0, 1, **QUICK_LOADER)
    )
    print(f"dice per epoch {[round(d, 3) for d in history.dice]} in {time.perf_counter() - start:.1f} s")

    assert len(history.dice) == 8
    assert history.dice[-1] >= history.dice[0] + 0.15
    assert max(history.dice[-3:]) > 0.75
