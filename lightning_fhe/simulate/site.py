"""One simulated site, in its own process as at a hospital.

``python -m lightning_fhe.simulate.site CONFIG --site-index I --kit DIR --server HOST:PORT --out FILE
[--model-out MODEL]``

CONFIG is one setting's resolved config (written by the orchestrator). The site builds the ``model`` and its
share of the ``data`` (:mod:`~lightning_fhe.simulate.components`) and trains them with an
:class:`~lightning_fhe.HEFederation` callback, validating only right after each round, so every validation
measures the global model. It appends one JSON line per round to FILE as the round ends, which is also how the
orchestrator follows progress: ``metric`` is its own validation of that round's global model
(``experiment.metric``), ``global_metrics`` the sites' weighted means for the round before (federated evaluation).
With ``--model-out`` it saves its model's state dict after the last round, which is the last global model as the
site loaded it (tensors the federation keeps local, if any, are this site's own), with ``torch.save``.

Seeds: ``experiment.seed`` right before the model is built, so every site starts from the same weights whoever
joins first (the server takes the first joiner's as round 0), and ``experiment.seed + 1 + site index`` for the
site's own patches and shuffling, so raw and encrypted runs see the same data in the same order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_fhe import HEFederation
from lightning_fhe.federation import is_last_batch
from lightning_fhe.simulate.components import build_data, build_model

__all__ = ["RoundRecorder", "main", "run_site"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_fhe.simulate.site", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="one setting's resolved config, as written by the orchestrator")
    parser.add_argument("--site-index", type=int, required=True, help="0-based: site-1 is index 0")
    parser.add_argument("--kit", required=True, help="this site's kit folder")
    parser.add_argument("--server", required=True, help="the aggregator's host:port")
    parser.add_argument("--out", required=True, help="JSON lines file: one record per round")
    parser.add_argument("--model-out", help="where to save the model after the last round (torch.save)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    model_out = Path(args.model_out) if args.model_out else None
    run_site(config, args.site_index, Path(args.kit), args.server, Path(args.out), model_out)
    return 0


def run_site(
    config: dict[str, Any], site_index: int, kit: Path, server: str, out: Path, model_out: Path | None = None
) -> None:
    """Trains this site's share in the federation to the last round, recording each round into ``out``, and saves
    the model after the last round (the last global model) to ``model_out`` when given."""
    experiment, federation_config = config["experiment"], config["federation"]
    data, trainer_config = config["data"], config["trainer"]
    if trainer_config["num_threads"]:
        torch.set_num_threads(trainer_config["num_threads"])

    L.seed_everything(experiment["seed"], verbose=False)
    model = build_model(config["model"])
    datamodule = build_data(data, site_index, federation_config["sites"])
    L.seed_everything(experiment["seed"] + 1 + site_index, verbose=False)

    federation = HEFederation(
        kit=kit,
        server=server,
        local_epochs=federation_config["local_epochs"],
        rounds=federation_config["rounds"],
        encrypt=federation_config["encrypt"],
        weight=federation_config["weight"],
        federate_buffers=federation_config["federate_buffers"],
        optimizer_state=federation_config["optimizer_state"],
        fedprox_mu=federation_config["fedprox_mu"],
        privacy=config["privacy"],  # the YAML form: HEFederation builds the mechanism, with rounds for its budget
        privacy_delta=config["privacy_delta"],
        progress=False,  # a log file, not a terminal
        # The sites encrypt and decrypt at the same moments of every round, so each gets the cores the orchestrator
        # shares out to it for training (trainer.num_threads: cores // sites), not every core: K sites with C
        # workers each on C cores only queue for the same cores and hold K*C processes' memory. With 2 sites on 2
        # cores that is 1, which runs the cipher in the training process and starts no worker at all.
        he_workers=trainer_config["num_threads"] or None,
        strategy=federation_config["strategy"],
        masking=federation_config["masking"],
    )
    recorder = RoundRecorder(federation, out, site=kit.name, site_index=site_index, metric=experiment["metric"])
    trainer = L.Trainer(
        max_epochs=federation_config["rounds"] * federation_config["local_epochs"],
        # Validation only in the last epoch of each round, right after the exchange: the global model's Dice.
        check_val_every_n_epoch=federation_config["local_epochs"],
        num_sanity_val_steps=0,
        accelerator=trainer_config["accelerator"],
        devices=trainer_config["devices"],
        precision=trainer_config["precision"],
        deterministic=trainer_config["deterministic"],
        callbacks=[recorder, federation],  # the recorder first: it sees the end of training before the exchange
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out.parent,
    )
    trainer.fit(model, datamodule=datamodule)
    if len(recorder.rounds) != federation_config["rounds"]:
        raise RuntimeError(f"training ended after {len(recorder.rounds)} of {federation_config['rounds']} rounds")
    if model_out is not None:
        partial = model_out.with_name(model_out.name + ".partial")
        torch.save({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}, partial)
        partial.replace(model_out)  # whole or not at all


class RoundRecorder(Callback):
    """Times each round's local training and validation, and writes them with the callback's RoundMetrics.

    Timestamps are wall-clock (``time.time()``) so that the orchestrator can line sites up against each other.
    """

    def __init__(self, federation: HEFederation, out: Path, site: str, site_index: int, metric: str) -> None:
        self.federation, self.out, self.site, self.site_index = federation, out, site, site_index
        self.metric = metric
        self.rounds: list[dict[str, Any]] = []
        self._round_start: float | None = None
        self._train_end = self._val_start = self._val_end = 0.0
        self._value: float | None = None
        self._fp32_bytes = 0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The model's floating tensors as fp32: what "19 MB" means in the seed, the yardstick for message sizes.
        self._fp32_bytes = sum(4 * t.numel() for t in pl_module.state_dict().values() if t.is_floating_point())

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._round_start is None:
            self._round_start = time.time()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if is_last_batch(trainer, batch_idx):  # in a round's last epoch, the exchange follows this batch
            self._train_end = time.time()

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.time()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_end = time.time()
        value = trainer.callback_metrics.get(self.metric)
        self._value = None if value is None else float(value)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 runs the epoch's validation before this hook, so a round that ended is complete here.
        history = self.federation.history
        if self._round_start is None or len(history) <= len(self.rounds):
            return  # a local epoch inside a round
        metrics = history[-1]
        validated = self._val_end >= self._train_end
        record = {
            "site": self.site,
            "site_index": self.site_index,
            "round": metrics.round,
            "metric_name": self.metric,
            "metric": self._value if validated else None,
            "round_start": self._round_start,
            "train_end": self._train_end,
            "round_end": time.time(),
            "train_s": self._train_end - self._round_start,
            "val_s": self._val_end - self._val_start if validated else 0.0,
            "model_fp32_bytes": self._fp32_bytes,
            **_metrics_dict(metrics),
        }
        self.rounds.append(record)
        with self.out.open("a") as f:  # one line per round as it ends: the orchestrator follows this file
            f.write(json.dumps(record) + "\n")
        self._round_start, self._value = None, None


def _metrics_dict(metrics: Any) -> dict[str, Any]:
    """RoundMetrics as JSON, whatever fields this version has (epsilon and shared_fraction are recent)."""
    values = dataclasses.asdict(metrics)
    values["participants"] = list(values.get("participants", ()))
    values["global_metrics"] = dict(values.get("global_metrics", {}))  # of the round before this one
    values.setdefault("epsilon", None)
    values.setdefault("shared_fraction", None)
    return values


if __name__ == "__main__":
    sys.exit(main())
