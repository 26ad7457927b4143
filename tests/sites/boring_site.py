"""One federated site for the end-to-end tests: Lightning's BoringModel (or a small conv net) with HEFederation.

Run as its own process (`python tests/sites/boring_site.py --kit ... --out ...`), like a real site. It records the
state of the model right before and right after each round's exchange, and what the callback measured, to --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_fhe import HEFederation


class AdamBoringModel(BoringModel):
    """BoringModel with Adam, whose per-parameter state shows whether optimizer state survived a round."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class ConvBoringModel(BoringModel):
    """A small conv net, so "conv" and "key_layers" have something to select."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Sequential(
            torch.nn.Unflatten(1, (2, 16)),
            torch.nn.Conv1d(2, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv1d(4, 4, 3, padding=1),
            torch.nn.BatchNorm1d(4),
            torch.nn.Conv1d(4, 4, 3, padding=1),
            torch.nn.Conv1d(4, 4, 3, padding=1),
            torch.nn.Conv1d(4, 4, 3, padding=1),
            torch.nn.Flatten(),
            torch.nn.Linear(64, 2),
        )


class ValidatingBoringModel(BoringModel):
    """BoringModel that logs its validation loss and mean output, for federated evaluation."""

    def validation_step(self, batch, batch_idx):
        output = self(batch)
        self.log("valid/loss", self.loss(output), on_epoch=True)
        self.log("valid/mean_output", output.mean(), on_epoch=True)


class RoundRecorder(Callback):
    """Placed before and after HEFederation in the callback list, it sees the model on both sides of a round."""

    def __init__(self, records: dict, when: str) -> None:
        self.records, self.when = records, when

    def on_train_start(self, trainer, pl_module):
        if self.when == "after":  # right after HEFederation loaded the first global model
            self.records["start"] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 >= trainer.num_training_batches:
            entry = self.records.setdefault(trainer.current_epoch, {})
            entry[self.when] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            entry[f"{self.when}_optimizer_entries"] = len(trainer.optimizers[0].state)


class CrashAfterRound(Callback):
    """Checkpoints once the given round is done, then dies without a goodbye, like a site losing power."""

    def __init__(self, federation: HEFederation, round: int, epochs: int, path: str) -> None:
        self.federation, self.at, self.path = federation, (round, epochs), path

    def on_train_epoch_end(self, trainer, pl_module):
        state = self.federation.state_dict()
        if (state["completed_round"], state["epochs_in_round"]) == self.at:
            trainer.save_checkpoint(self.path)
            os._exit(3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kit", required=True)
    parser.add_argument("--server")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight", type=float)
    parser.add_argument("--encrypt", default="all")
    parser.add_argument("--model", choices=["boring", "adam", "conv", "validating"], default="boring")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--optimizer-state", default="keep")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--privacy", type=json.loads, help="HEFederation's privacy option, as JSON")
    parser.add_argument("--fedprox-mu", type=float, default=0.0)
    parser.add_argument("--crash-after-round", type=int, help="save a checkpoint after this round, then die")
    parser.add_argument("--crash-after-epochs", type=int, default=0, help="... and this many local epochs more")
    parser.add_argument("--checkpoint", help="where --crash-after-round saves, and what a restart resumes from")
    parser.add_argument("--max-steps", type=int, default=-1, help="the Trainer's max_steps: stop before the last round")
    parser.add_argument("--retry-budget-s", type=float, default=60.0)
    parser.add_argument("--he-workers", type=int, help="HEFederation's he_workers (default: every core)")
    parser.add_argument("--fl-strategy", type=json.loads, help="HEFederation's strategy option, as JSON")
    parser.add_argument("--masking", type=json.loads, help="HEFederation's masking option: null, true or false")
    parser.add_argument("--csv", help="validate each round on this site's own data and log to a CSVLogger here")
    args = parser.parse_args()

    # Same initial weights at every site whoever joins first, so runs are comparable; each site's own data.
    L.seed_everything(0)
    models = {
        "boring": BoringModel, "adam": AdamBoringModel, "conv": ConvBoringModel, "validating": ValidatingBoringModel
    }
    model = models[args.model]()
    L.seed_everything(args.seed + 1)
    data = DataLoader(RandomDataset(32, 64 + 16 * args.seed), batch_size=8)
    validation = DataLoader(RandomDataset(32, 16 + 8 * args.seed), batch_size=8)  # each site's own
    records: dict = {}
    encrypt = args.encrypt.split(",") if "," in args.encrypt or "*" in args.encrypt else args.encrypt
    federation = HEFederation(
        kit=args.kit,
        server=args.server,
        local_epochs=args.local_epochs,
        encrypt=encrypt,
        weight=args.weight,
        optimizer_state=args.optimizer_state,
        privacy=args.privacy,
        fedprox_mu=args.fedprox_mu,
        retry_budget_s=args.retry_budget_s,
        progress=False,
        he_workers=args.he_workers,
        strategy=args.fl_strategy,
        masking=args.masking,
    )
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        callbacks=[RoundRecorder(records, "before"), federation, RoundRecorder(records, "after")]
        + ([CrashAfterRound(federation, args.crash_after_round, args.crash_after_epochs, args.checkpoint)] if args.crash_after_round else []),
        logger=CSVLogger(args.csv, name="", version="") if args.csv else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=None if args.csv else 0,
        num_sanity_val_steps=0,
    )
    resume = args.checkpoint if args.checkpoint and Path(args.checkpoint).exists() else None
    trainer.fit(model, train_dataloaders=data, val_dataloaders=validation if args.csv else None, ckpt_path=resume)
    if trainer.is_global_zero:
        history = [vars(m) | {"participants": list(m.participants)} for m in federation.history]
        torch.save({"records": records, "history": history, "rank_state": None}, Path(args.out))
    else:  # the test checks that the other DDP rank ends with the same weights
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(args.out + f".rank{trainer.global_rank}"))


if __name__ == "__main__":
    main()
