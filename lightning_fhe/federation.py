"""HEFederation: the Lightning callback that trains any LightningModule in an encrypted federation."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_fhe.privacy import UpdateMechanism, mechanism_from_config
from lightning_fhe.selection import Selection, split_tensors
from lightning_fhe.site import FederatedSite, RoundMetrics

if TYPE_CHECKING:
    from lightning_fhe.provision import SiteKit

OPTIMIZER_STATE = ("keep", "reset")


class FederationSetupError(RuntimeError):
    """The federation cannot start: bad arguments, kit, layout or server. Raised before training wastes time."""


class HEFederation(Callback):
    r"""Trains the Trainer's LightningModule in a federation whose server sees only ciphertexts.

    Every ``local_epochs`` epochs, at the end of the training part of the epoch and before its validation, the
    site encrypts the selected tensors with CKKS, sends them to the aggregation server, waits for the round to
    close, decrypts the global average and loads it into the model. The validation that follows therefore measures
    the global model. When the last round is done, training stops. The model, the optimizer and the Trainer stay
    the same objects throughout, so optimizer and scheduler state carry over between rounds.

    Under DDP (or any multi-process strategy) only global rank 0 talks to the server; the global weights reach the
    other ranks through ``trainer.strategy.broadcast``.

    Example::

        import lightning as L
        from lightning.pytorch.demos.boring_classes import BoringModel
        from lightning_fhe import HEFederation

        federation = HEFederation(kit="kits/site-1", local_epochs=2)
        trainer = L.Trainer(max_epochs=6, callbacks=[federation])  # 3 rounds of 2 local epochs
        trainer.fit(BoringModel())

    Args:
        kit: the site kit folder written by ``python -m lightning_fhe.provision`` (certificates and CKKS secret key).
        server: ``"host:port"`` of the aggregator; default: the address in the kit's ``site.yaml``.
        local_epochs: training epochs between two exchanges (one round).
        rounds: number of rounds; default: ``max_epochs // local_epochs``. Must match the server's ``rounds``.
        encrypt: which tensors travel encrypted: ``"all"``, ``"conv"`` (convolution weights and biases),
            ``"key_layers"`` (first, middle and last convolution), ``"none"`` (plain federated averaging), or a list
            of glob patterns over state-dict names. The other floating tensors travel in plaintext.
        weight: this site's weight in the average; default: the number of training samples
            (``len(train_dataloader.dataset)``). An int or float for anything else.
        federate_buffers: average floating buffers (BatchNorm running statistics) too; integer buffers such as
            ``num_batches_tracked`` always stay local.
        optimizer_state: ``"keep"`` the optimizer state (momentum, Adam moments) across rounds, or ``"reset"`` it
            after every global model is loaded.
        fedprox_mu: FedProx's proximal coefficient: adds ``mu * (w - w_global)`` to the gradient of every federated
            parameter, keeping local training close to the last global model. 0 turns it off.
        insecure: connect without TLS, to a server started with ``--insecure``. For local experiments only.
        site_name: this site's name when ``insecure`` (there is no certificate to name it).
        privacy: applied to this site's update (its difference from the last global model) before encryption:
            an :class:`~lightning_fhe.privacy.UpdateMechanism` or its YAML form, e.g.
            ``{"gaussian": {"clip_norm": 1.0, "noise_multiplier": 1.0}}``, ``{"partial": {"fraction": 0.1}}``,
            ``{"svt": {...}}`` or a list of those. See ``docs/privacy.md``.
        privacy_delta: the delta at which ``privacy/epsilon`` is reported.
        retry_budget_s: how long to keep retrying an unreachable server before failing.
        progress: show progress bars for encryption, uploads and downloads on a terminal (global rank 0 only).
    """

    def __init__(
        self,
        kit: str | os.PathLike,
        server: str | None = None,
        local_epochs: int = 1,
        rounds: int | None = None,
        encrypt: Selection = "all",
        weight: float | None = None,
        federate_buffers: bool = True,
        optimizer_state: Literal["keep", "reset"] = "keep",
        fedprox_mu: float = 0.0,
        insecure: bool = False,
        site_name: str | None = None,
        privacy: UpdateMechanism | Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        privacy_delta: float = 1e-5,
        retry_budget_s: float = 60.0,
        progress: bool = True,
    ) -> None:
        if not _is_positive_int(local_epochs):
            raise ValueError(f"local_epochs must be a positive integer, got {local_epochs!r}")
        if rounds is not None and not _is_positive_int(rounds):
            raise ValueError(f"rounds must be a positive integer or None, got {rounds!r}")
        if weight is not None and not (isinstance(weight, (int, float)) and weight > 0):
            raise ValueError(f"weight must be a positive number or None (number of training samples), got {weight!r}")
        if optimizer_state not in OPTIMIZER_STATE:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE}, got {optimizer_state!r}")
        if not fedprox_mu >= 0:
            raise ValueError(f"fedprox_mu must be >= 0, got {fedprox_mu!r}")
        if not 0 < privacy_delta < 1:
            raise ValueError(f"privacy_delta must be in (0, 1), got {privacy_delta!r}")
        self.privacy = privacy if isinstance(privacy, UpdateMechanism) else mechanism_from_config(privacy, rounds=rounds)
        self.privacy_delta = privacy_delta
        self.kit = Path(kit)
        self.server = server
        self.local_epochs = local_epochs
        self.rounds = rounds
        self.encrypt = encrypt
        self.weight = weight
        self.federate_buffers = federate_buffers
        self.optimizer_state = optimizer_state
        self.fedprox_mu = float(fedprox_mu)
        self.insecure = insecure
        self.site_name = site_name
        self.retry_budget_s = retry_budget_s
        self.progress = progress

        self.history: list[RoundMetrics] = []  # one entry per round this process took part in (rank 0)
        self._completed_round = 0  # checkpointed: the last round whose global model is loaded
        self._epochs_in_round = 0  # checkpointed: local epochs trained since that round
        self._epoch_done = -1  # the epoch whose end was already handled (hooks can fire twice per epoch)
        self._site: FederatedSite | None = None
        self._kit: SiteKit | None = None  # loaded on rank 0 when fit starts
        self._proximal_reference: dict[str, torch.Tensor] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(kit=str(self.kit), encrypt=str(self.encrypt))

    # ----------------------------------------------------------------------------------------------- lifecycle

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Fail before any data is loaded: the cheapest place to say the kit or selection is wrong. Not in setup(),
        # which runs before LightningModule.setup and configure_model, where a model may build its layers.
        if trainer.is_global_zero:
            self._kit = self._check_kit()
        self._split(pl_module.state_dict(), pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        outcome: Any = None
        if trainer.is_global_zero:
            try:
                outcome = ("ok", self._start(trainer, pl_module))
            except Exception as err:  # every rank must leave the broadcast below, so errors travel too
                outcome = ("error", err)
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if outcome[0] == "error":
            error = outcome[1]
            raise error if trainer.is_global_zero else FederationSetupError(f"rank 0 failed to join: {error}")
        state, self._completed_round, self._epochs_in_round, self.rounds = outcome[1]
        # Resumed mid-round from a checkpoint: the model's weights already descend from this round's global model,
        # and loading it again would throw the round's finished local epochs away.
        self._load_global(trainer, pl_module, state, into_model=self._epochs_in_round == 0)
        if self._completed_round >= self.rounds:
            trainer.should_stop = True

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The epoch's validation runs right after its last batch, before on_train_epoch_end; exchanging here
        # means that validation measures the global model.
        if is_last_batch(trainer, batch_idx):
            self._end_of_epoch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_of_epoch(trainer, pl_module)  # epochs cut short (max_steps, a -1 from on_train_batch_start)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self.fedprox_mu or not self._proximal_reference:
            return
        with torch.no_grad():
            for name, parameter in pl_module.named_parameters():
                reference = self._proximal_reference.get(name)
                if reference is not None and parameter.grad is not None:
                    parameter.grad.add_(parameter - reference, alpha=self.fedprox_mu)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._site is not None:
            self._site.client.close()
            self._site = None
        self._kit = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"completed_round": self._completed_round, "epochs_in_round": self._epochs_in_round}
        if self.privacy is not None:  # the privacy already spent must survive a restart
            state["privacy"] = self.privacy.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._completed_round = int(state_dict["completed_round"])
        self._epochs_in_round = int(state_dict["epochs_in_round"])
        if self.privacy is not None and "privacy" in state_dict:
            self.privacy.load_state_dict(state_dict["privacy"])

    # ----------------------------------------------------------------------------------------------- rounds

    def _end_of_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_done == trainer.current_epoch or self._completed_round >= (self.rounds or 0):
            return
        self._epoch_done = trainer.current_epoch
        self._epochs_in_round += 1
        if self._epochs_in_round < self.local_epochs:
            return
        round = self._completed_round + 1
        outcome: Any = None
        if trainer.is_global_zero:
            try:
                # state_dict() tensors may live on an accelerator: flattening copies only the shared ones to the CPU.
                state = pl_module.state_dict()
                tensors, metrics = self._site.exchange(round, state, progress=self._progress_bar(trainer))
                self.history.append(metrics)
                for logger in trainer.loggers:
                    logger.log_metrics(metrics.as_log_dict(), step=trainer.global_step)
                rank_zero_info(metrics.summary(self.rounds))
                outcome = ("ok", tensors)
            except Exception as err:
                outcome = ("error", err)
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if outcome[0] == "error":
            error = outcome[1]
            raise error if trainer.is_global_zero else RuntimeError(f"rank 0 failed in round {round}: {error}")
        self._load_global(trainer, pl_module, outcome[1])
        self._completed_round, self._epochs_in_round = round, 0
        if self.optimizer_state == "reset":
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
        if round >= self.rounds:
            trainer.should_stop = True

    def _load_global(
        self, trainer: Trainer, pl_module: LightningModule, tensors: dict[str, torch.Tensor], into_model: bool = True
    ) -> None:
        if into_model:
            merged = {**pl_module.state_dict(), **tensors}
            pl_module.load_state_dict(merged, strict=True)  # copies in place: the optimizer keeps its parameters
        if self.fedprox_mu:  # the proximal term pulls towards the global model, loaded or not
            parameters = dict(pl_module.named_parameters())
            self._proximal_reference = {
                name: tensor.to(parameters[name].device, parameters[name].dtype)
                for name, tensor in tensors.items()
                if name in parameters and parameters[name].requires_grad
            }

    # ----------------------------------------------------------------------------------------------- rank 0

    def _check_kit(self):
        from lightning_fhe.provision import KitError, load_site_kit

        if self.insecure and not (self.kit / "he_context.tenseal").exists():
            raise FederationSetupError(f"{self.kit}: no he_context.tenseal; even --insecure needs the CKKS secret key")
        try:
            return load_site_kit(self.kit)
        except KitError as err:
            raise FederationSetupError(str(err)) from None

    def _split(self, state: Mapping[str, torch.Tensor], pl_module: LightningModule):
        from lightning_fhe.selection import SelectionError

        try:
            return split_tensors(state, self.encrypt, module=pl_module, federate_buffers=self.federate_buffers)
        except SelectionError as err:
            raise FederationSetupError(f"encrypt={self.encrypt!r}: {err}") from None

    def _default_weight(self, trainer: Trainer) -> float:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        try:
            return float(len(dataset))
        except TypeError:
            raise FederationSetupError(
                "cannot count the training samples (the train dataloader has no sized dataset); "
                "pass HEFederation(weight=...) explicitly"
            ) from None

    def _start(self, trainer: Trainer, pl_module: LightningModule):
        """Connects, joins, checks rounds against the Trainer, and returns the global state to start from."""
        from lightning_fhe.client import AggregatorClient

        kit = self._kit if self._kit is not None else self._check_kit()
        weight = float(self.weight) if self.weight is not None else self._default_weight(trainer)
        state = pl_module.state_dict()
        client = AggregatorClient(
            kit,
            self.server,
            insecure=self.insecure,
            site_name=self.site_name,
            retry_budget_s=self.retry_budget_s,
        )
        split = self._split(state, pl_module)
        self._site = FederatedSite(client, kit.he_context, split, state, self.privacy, self.privacy_delta)
        info = self._site.join(weight, state)
        rounds = self._rounds(trainer, info.rounds)
        # A restarted site resumes from the last closed round; a fresh one from the initial model (round 0).
        completed = max(0, info.current_round - 1)
        if self._completed_round > completed:
            raise FederationSetupError(
                f"the checkpoint says round {self._completed_round} was completed, but the server is at round "
                f"{info.current_round}: the server's state_dir does not belong to this checkpoint"
            )
        epochs_in_round = self._epochs_in_round if completed == self._completed_round else 0
        # Fetched even when resuming mid-round: FedProx and the privacy mechanisms measure updates from it.
        tensors, _ = self._site.global_state(completed, progress=self._progress_bar(trainer))
        rank_zero_info(
            f"fhe: joined as {info.site!r} ({len(info.members)} sites, share {info.share:.3f}); "
            f"starting from the global model of round {completed}, {rounds} rounds of {self.local_epochs} epoch(s)"
        )
        return tensors, completed, epochs_in_round, rounds

    def _rounds(self, trainer: Trainer, server_rounds: int) -> int:
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        rounds = self.rounds
        if rounds is None and max_epochs is not None:
            rounds = max_epochs // self.local_epochs
        if rounds is None:
            rounds = server_rounds
        if rounds != server_rounds:
            how = "rounds=" if self.rounds is not None else f"max_epochs={max_epochs} // local_epochs="
            raise FederationSetupError(
                f"the server runs {server_rounds} rounds, but this site would run {rounds} ({how}"
                f"{self.rounds if self.rounds is not None else self.local_epochs}); make them agree, e.g. "
                f"max_epochs={server_rounds * self.local_epochs}"
            )
        if max_epochs is not None and max_epochs < rounds * self.local_epochs:
            raise FederationSetupError(
                f"max_epochs={max_epochs} is too few for {rounds} rounds of {self.local_epochs} local epoch(s)"
            )
        return rounds

    def _progress_bar(self, trainer: Trainer):
        if not (self.progress and trainer.is_global_zero and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        bars: dict[str, tqdm] = {}

        def update(what: str, done: int, total: int) -> None:
            bar = bars.get(what)
            if bar is None:
                bar = bars[what] = tqdm(total=total, desc=f"fhe {what}", unit="chunk", leave=False, file=sys.stderr)
            bar.n = done
            bar.refresh()
            if done >= total:
                bar.close()

        return update


def is_last_batch(trainer: Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` ends the epoch: where :class:`HEFederation` exchanges in a round's last epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
