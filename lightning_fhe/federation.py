"""HEFederation: the Lightning callback that trains any LightningModule in an encrypted federation."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_fhe.client import FederationError
from lightning_fhe.evaluation import (
    GlobalValidation,
    ValidationScheduleError,
    logging_step,
    validation_every,
    validation_metrics,
)
from lightning_fhe.privacy import UpdateMechanism, mechanism_from_config
from lightning_fhe.proto.reasons import Reason
from lightning_fhe.selection import Selection, describe_encrypted, split_tensors
from lightning_fhe.site import FederatedSite, RoundMetrics
from lightning_fhe.strategies import Strategy, StrategyConfigError, strategy_from_config

if TYPE_CHECKING:
    from lightning_fhe.client import JoinInfo
    from lightning_fhe.provision import SiteKit

OPTIMIZER_STATE = ("keep", "reset")
T = TypeVar("T")


class FederationSetupError(RuntimeError):
    """The federation cannot start: bad arguments, kit, layout or server. Raised before training wastes time."""


class HEFederation(Callback):
    r"""Trains the Trainer's LightningModule in a federation whose server sees only ciphertexts.

    Every ``local_epochs`` epochs, at the end of the training part of the epoch and before its validation, the
    site encrypts the selected tensors with CKKS, sends them to the aggregation server, waits for the round to
    close, decrypts the global average, runs the federation's ``strategy`` on it (FedAvg by default: the average
    itself; FedAdam and the others: a server optimizer step that every site computes identically) and loads the
    result into the model. The validation that follows therefore measures the global model; with
    ``local_epochs > 1`` the Trainer validates every ``local_epochs``-th epoch only (its default
    ``check_val_every_n_epoch=1`` becomes ``local_epochs``; a value that would validate local models is refused).
    Each site's validation metrics of a global model travel, encrypted, with its next update, and every site logs
    their weighted mean over the sites as ``fhe/global/<metric>``. When the last round is done, training stops. The
    model, the optimizer and the Trainer stay the same objects throughout, so optimizer and scheduler state carry
    over between rounds.

    Under DDP (or any multi-process strategy) only global rank 0 talks to the server; the global weights reach the
    other ranks through ``trainer.strategy.broadcast``.

    If the Trainer stops before the last round (``max_steps``, ``max_time``, early stopping, an exception), the
    callback warns and tells the server that this site leaves, so the other sites stop waiting for it. A SIGTERM
    while the site waits for the server (or retries it) ends the site at once. The callback's checkpointed state is
    keyed on the site's name and the kit's HE fingerprint, never on the kit's path, so a resumed site may find its
    kit anywhere.

    Example::

        import lightning as L
        from lightning.pytorch.demos.boring_classes import BoringModel
        from lightning_fhe import HEFederation

        from lightning_fhe.strategies import FedAdam

        federation = HEFederation(kit="kits/site-1", local_epochs=2, strategy=FedAdam(lr=0.05))
        trainer = L.Trainer(max_epochs=6, callbacks=[federation])  # 3 rounds of 2 local epochs
        trainer.fit(BoringModel())

    Args:
        kit: the site kit folder written by ``python -m lightning_fhe.provision`` (certificates and CKKS secret key;
            with ``he.key: sites`` the site saves the key the sites make into it when it first joins).
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
        strategy: the server optimizer step every site runs on the decrypted average: a
            :class:`~lightning_fhe.strategies.Strategy` (``FedAvg``, ``FedAvgM``, ``FedAdam``, ``FedYogi``,
            ``FedAdagrad`` or a subclass) or its YAML form, ``"fedavgm"`` or ``{"fedadam": {"lr": 0.05}}``. Every
            site must run the same one. Default: FedAvg, the weighted average itself. Floating buffers (BatchNorm
            statistics) always take the average. See ``docs/strategies.md``.
        federated_metrics: send this site's validation metrics of each global model, encrypted, with the next
            update, and log the weighted means over the sites as ``fhe/global/<metric>``. Every site must agree.
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
        progress: show progress bars for uploads (encrypted as they go) and downloads (decrypted as they arrive) on
            a terminal (global rank 0 only).
        he_workers: processes that encrypt and decrypt the updates (SEAL holds the GIL, so threads would not help);
            default: every core this process may use, but no more than the encrypted update's tasks of 16 chunks
            (8192 values each: a model of under 131,072 encrypted values starts none); 1: in the training process
            itself. They start once per fit, when the site joins (on global rank 0 only), and end when fit ends, also
            on an exception. Set it lower when several sites or other work share the machine's cores.
        masking: pairwise masks on the encrypted update, so that the server together with other sites (or with
            whoever provisioned the key) cannot read this site's update; only the sum of a round's members decrypts
            (``docs/security.md``). None: on when every member masks and there are 3 or more sites; True: join only
            a masked federation (also with 2 sites); False: never (the federation then runs unmasked).
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
        he_workers: int | None = None,
        strategy: Strategy | str | Mapping[str, Any] | None = None,
        federated_metrics: bool = True,
        masking: bool | None = None,
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
        if he_workers is not None and not _is_positive_int(he_workers):
            raise ValueError(f"he_workers must be a positive integer or None (every core), got {he_workers!r}")
        self.privacy = privacy if isinstance(privacy, UpdateMechanism) else mechanism_from_config(privacy, rounds=rounds)
        try:
            self.strategy = strategy_from_config(strategy)
        except StrategyConfigError as err:
            raise ValueError(str(err)) from None
        self.federated_metrics = bool(federated_metrics)
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
        self.he_workers = he_workers
        if masking not in (None, True, False):
            raise ValueError(f"masking must be None (auto), True or False, got {masking!r}")
        self.masking = masking

        self.history: list[RoundMetrics] = []  # one entry per round this process took part in (rank 0)
        self._completed_round = 0  # checkpointed: the last round whose global model is loaded
        self._epochs_in_round = 0  # checkpointed: local epochs trained since that round
        self._epoch_done = -1  # the epoch whose end was already handled (hooks can fire twice per epoch)
        self._site: FederatedSite | None = None
        self._kit: SiteKit | None = None  # loaded on rank 0 when fit starts
        self._proximal_reference: dict[str, torch.Tensor] = {}
        self._identity: tuple[str, str] | None = None  # (site name, HE fingerprint) from the kit, read once
        self._left = False  # this site told the server it leaves (or tried to)
        self._log_handler: logging.Handler | None = None
        self._strategy_state: dict[str, Any] | None = None  # checkpointed replica state, until the site exists
        self._validated: GlobalValidation | None = None  # the last global model's validation, for the next upload

    @property
    @override
    def state_key(self) -> str:
        # What identifies this site's place in the federation, never the kit's path: a resumed site may be given
        # the same kit as an absolute path or through a symlink (Lightning restores state only on an equal key).
        identity = self._kit_identity()
        if identity is None:  # no readable kit: on_fit_start says why before any state matters
            return self._generate_state_key(kit=str(self.kit))
        return self._generate_state_key(site=identity[0], he_fingerprint=identity[1])

    # ----------------------------------------------------------------------------------------------- lifecycle

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Fail before any data is loaded: the cheapest place to say the kit or selection is wrong. Not in setup(),
        # which runs before LightningModule.setup and configure_model, where a model may build its layers.
        if trainer.is_global_zero:
            self._kit = self._check_kit()
            self._show_client_log()
        self._split(pl_module.state_dict(), pl_module)
        self._validate_global_models_only(trainer)

    def _validate_global_models_only(self, trainer: Trainer) -> None:
        try:
            every = validation_every(self.local_epochs, trainer.check_val_every_n_epoch, trainer.val_check_interval)
        except ValidationScheduleError as err:
            raise FederationSetupError(str(err)) from None
        if every != trainer.check_val_every_n_epoch:
            rank_zero_info(
                f"fhe: validating every {every} epochs, right after each round's exchange, so that every validation "
                f"(and ModelCheckpoint, EarlyStopping) sees a global model (check_val_every_n_epoch was 1)"
            )
            trainer.check_val_every_n_epoch = every

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Right after an exchange the model is that round's global model: what federated evaluation averages.
        if trainer.sanity_checking or not self.federated_metrics or self._epochs_in_round or not self._completed_round:
            return
        self._validated = GlobalValidation(self._completed_round, logging_step(trainer), validation_metrics(trainer))

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning hands load_state_dict only the state saved under an equal state_key, and silently drops the rest:
        # a site would then start over at the server's round, a round short, while the others wait for it.
        states = checkpoint.get("callbacks") or {}
        key = self.state_key
        if key in states:
            return
        others = [k for k in states if isinstance(k, str) and k.startswith(type(self).__qualname__)]
        if not others:
            rank_zero_warn(
                f"the checkpoint holds no {type(self).__qualname__} state: this site starts from the server's "
                "current round, not from where the checkpoint stopped"
            )
            return
        legacy = [k for k in others if "'kit':" in k]  # keyed on the kit path by earlier versions
        if len(others) == 1 and legacy:
            rank_zero_warn(
                f"the checkpoint's federation state was saved under the old key {legacy[0]}; using it as {key}"
            )
            self.load_state_dict(states[legacy[0]])
            return
        raise FederationSetupError(
            f"the checkpoint's federation state belongs to {', '.join(others)}, not to this site and kit ({key}): "
            "resume with the kit the checkpoint was made with, or start without ckpt_path"
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        started = self._on_rank_zero(
            trainer,
            lambda: self._start(trainer, pl_module),
            lambda error: FederationSetupError(f"rank 0 failed to join: {error}"),
        )
        state, self._completed_round, self._epochs_in_round, self.rounds = started
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
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._leave_if_short(trainer, f"{type(exception).__name__}: {exception}" if str(exception) else repr(exception))
        self._close()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._leave_if_short(trainer, _why_stopped(trainer))
        self._close()

    def _close(self) -> None:
        if self._site is not None:
            self._strategy_state = self._site.replica.state_dict()  # a checkpoint saved after fit still holds it
            self._site.close()  # the cipher pool's processes and the connection
            self._site = None
        self._kit = None
        if self._log_handler is not None:
            logging.getLogger("lightning_fhe").removeHandler(self._log_handler)
            self._log_handler = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"completed_round": self._completed_round, "epochs_in_round": self._epochs_in_round}
        if self.privacy is not None:  # the privacy already spent must survive a restart
            state["privacy"] = self.privacy.state_dict()
        strategy_state = self._site.replica.state_dict() if self._site is not None else self._strategy_state
        if strategy_state is not None:  # the strategy's moments and the global model it made: the server has neither
            state["strategy"] = _as_tensors(strategy_state)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._completed_round = int(state_dict["completed_round"])
        self._epochs_in_round = int(state_dict["epochs_in_round"])
        if self.privacy is not None and "privacy" in state_dict:
            self.privacy.load_state_dict(state_dict["privacy"])
        if "strategy" in state_dict:
            self._strategy_state = _as_arrays(state_dict["strategy"])

    # ----------------------------------------------------------------------------------------------- rounds

    def _end_of_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_done == trainer.current_epoch or self._completed_round >= (self.rounds or 0):
            return
        self._epoch_done = trainer.current_epoch
        self._epochs_in_round += 1
        if self._epochs_in_round < self.local_epochs:
            return
        round = self._completed_round + 1

        def exchange() -> dict[str, torch.Tensor]:
            # state_dict() tensors may live on an accelerator: flattening copies only the shared ones to the CPU.
            state = pl_module.state_dict()
            validated = self._validated if self._validated and self._validated.round == round - 1 else None
            tensors, metrics = self._site.exchange(
                round, state, progress=self._progress_bar(trainer), metrics=validated.metrics if validated else None
            )
            self.history.append(metrics)
            for logger in trainer.loggers:
                logger.log_metrics(metrics.as_log_dict(), step=trainer.global_step)
                if validated and metrics.global_metrics:  # at the step of the validation they describe
                    means = {f"fhe/global/{name}": value for name, value in metrics.global_metrics.items()}
                    logger.log_metrics(means, step=validated.step)
            rank_zero_info(metrics.summary(self.rounds))
            return tensors

        tensors = self._on_rank_zero(trainer, exchange, lambda e: RuntimeError(f"rank 0 failed in round {round}: {e}"))
        self._load_global(trainer, pl_module, tensors)
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

    def _on_rank_zero(
        self, trainer: Trainer, run: Callable[[], T], other_ranks_error: Callable[[BaseException], Exception]
    ) -> T:
        """Runs ``run`` on global rank 0 only and broadcasts its result, or its error, which every rank then raises
        (rank 0 the error itself, the others ``other_ranks_error(error)``): no rank is left waiting in a broadcast."""
        outcome: Any = None
        if trainer.is_global_zero:
            try:
                with _sigterm_ends_waiting():
                    outcome = ("ok", run())
            except Exception as err:  # every rank must leave the broadcast below, so errors travel too
                outcome = ("error", err)
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if outcome[0] == "error":
            raise outcome[1] if trainer.is_global_zero else other_ranks_error(outcome[1])
        return outcome[1]

    def _leave_if_short(self, trainer: Trainer, why: str) -> None:
        """Fit ended before the last round: says so, and tells the server this site leaves, so nobody waits for it."""
        if self._site is None or self._site.info is None or self._left or not trainer.is_global_zero or not self.rounds:
            return  # nothing to leave: rank 0 never joined (a setup error), or not rank 0
        if self._completed_round >= self.rounds:
            return
        self._left = True
        message = (
            f"the Trainer stopped after round {self._completed_round} of the {self.rounds} rounds the federation "
            f"runs ({why}); this site leaves the federation and takes part in no further round"
        )
        rank_zero_warn(message)
        try:
            remaining = self._site.client.leave(f"stopped after round {self._completed_round} of {self.rounds}: {why}")
            rank_zero_info(f"fhe: left the federation; {len(remaining)} site(s) go on: {', '.join(remaining)}")
        except Exception as err:  # noqa: BLE001 - the server may be gone; stopping must go on
            rank_zero_warn(f"could not tell the server that this site leaves: {err}")

    def _show_client_log(self) -> None:
        # Lightning configures only its own loggers: without a handler, the client's INFO lines (waiting, retrying)
        # would not show, and outside a terminal a waiting site would print nothing at all.
        package = logging.getLogger("lightning_fhe")
        if self._log_handler is None and not package.hasHandlers():
            self._log_handler = logging.StreamHandler(sys.stderr)
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
            package.addHandler(self._log_handler)
            if package.level == logging.NOTSET or package.level > logging.INFO:
                package.setLevel(logging.INFO)

    def _kit_identity(self) -> tuple[str, str] | None:
        if self._identity is None:
            import yaml

            try:
                doc = yaml.safe_load((self.kit / "site.yaml").read_text())
                self._identity = (str(self.site_name or doc["site"]), str(doc["he_fingerprint"]))
            except (OSError, yaml.YAMLError, KeyError, TypeError):
                return None
        return self._identity

    def _check_kit(self):
        from lightning_fhe.provision import KitError, load_site_kit

        keyless = not (self.kit / "he_context.tenseal").exists() and not (self.kit / "he_params.tenseal").exists()
        if self.insecure and keyless:  # (a he.key = sites kit holds he_params.tenseal until the sites made the key)
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

        # Everything this site can check is checked before anything is sent: a refused site uploads nothing.
        kit = self._kit if self._kit is not None else self._check_kit()
        weight = float(self.weight) if self.weight is not None else self._default_weight(trainer)
        state = pl_module.state_dict()
        split = self._split(state, pl_module)
        planned = self._planned_rounds(trainer)
        if kit.awaits_site_key:  # he.key = sites, and this site has no key yet: the sites make it at formation
            kit = self._obtain_site_key(kit, weight, split, state, planned, trainer)
        client = AggregatorClient(
            kit,
            self.server,
            insecure=self.insecure,
            site_name=self.site_name,
            retry_budget_s=self.retry_budget_s,
            masking=self.masking,
        )
        try:
            self._site = FederatedSite(
                client,
                kit.he_context,
                split,
                state,
                self.privacy,
                self.privacy_delta,
                strategy=self.strategy,
                optimized={name for name, _ in pl_module.named_parameters()},
                federated_metrics=self.federated_metrics,
                workers=self.he_workers,
            )
        except BaseException:
            client.close()
            raise
        if self._strategy_state is not None:
            try:
                self._site.replica.load_state_dict(self._strategy_state)
            except ValueError as err:
                raise FederationSetupError(f"the checkpoint's strategy state cannot be used: {err}") from None
        rank_zero_info(f"fhe: {describe_encrypted(split, state)}; strategy {self.strategy!r}")
        rounds = planned

        def check(joined: JoinInfo) -> None:  # before the initial model goes out
            nonlocal rounds
            rounds = self._rounds(trainer, joined.rounds)

        try:
            info = self._site.join(weight, state, rounds=planned, check=check)
        except FederationError as err:
            if err.reason is not Reason.ROUNDS_MISMATCH:
                raise
            raise FederationSetupError(self._rounds_mismatch(trainer, planned, err)) from None
        # A restarted site resumes from the last closed round; a fresh one from the initial model (round 0).
        completed = max(0, info.current_round - 1)
        if self._completed_round > completed:
            raise FederationSetupError(
                f"the checkpoint says round {self._completed_round} was completed, but the server is at round "
                f"{info.current_round}: the server's state_dir does not belong to this checkpoint"
            )
        epochs_in_round = self._epochs_in_round if completed == self._completed_round else 0
        # Fetched even when resuming mid-round: FedProx and the privacy mechanisms measure updates from it.
        tensors = self._site.global_state(completed, progress=self._progress_bar(trainer))
        rank_zero_info(
            f"fhe: joined as {info.site!r} ({len(info.members)} sites, share {info.share:.3f}); "
            f"starting from the global model of round {completed}, {rounds} rounds of {self.local_epochs} epoch(s)"
        )
        return tensors, completed, epochs_in_round, rounds

    def _obtain_site_key(self, kit, weight: float, split, state, planned: int, trainer: Trainer):
        """Joins with what this site will train with, gets the sites' CKKS key (``docs/provisioning.md``) and
        returns its kit, reloaded with the key; the join that follows is the same, as the server requires."""
        from lightning_fhe.client import AggregatorClient
        from lightning_fhe.masking.site_key import join_and_obtain_site_key
        from lightning_fhe.site import wire_layouts

        rank_zero_info(f"fhe: {kit.path} holds no CKKS key yet (he.key: sites); joining to get it")
        with AggregatorClient(
            kit, self.server, insecure=self.insecure, site_name=self.site_name, retry_budget_s=self.retry_budget_s
        ) as client:
            layouts = wire_layouts(split, state, self.federated_metrics)
            try:
                kit = join_and_obtain_site_key(
                    client, *layouts, weight=weight, rounds=planned, require_masking=self.masking is True
                )
            except FederationError as err:
                if err.reason is not Reason.ROUNDS_MISMATCH:
                    raise
                raise FederationSetupError(self._rounds_mismatch(trainer, planned, err)) from None
        rank_zero_info(f"fhe: saved the sites' CKKS key {kit.key_fingerprint} into {kit.path}")
        return kit

    def _planned_rounds(self, trainer: Trainer) -> int:
        """The rounds this site will train, told to the server when joining; 0: not fixed here (the server's)."""
        max_epochs = _max_epochs(trainer)
        rounds = self.rounds
        if rounds is None and max_epochs is not None:
            rounds = max_epochs // self.local_epochs
        if rounds is not None and max_epochs is not None and max_epochs < rounds * self.local_epochs:
            raise FederationSetupError(
                f"max_epochs={max_epochs} is too few for {rounds} rounds of {self.local_epochs} local epoch(s)"
            )
        if rounds == 0:
            raise FederationSetupError(
                f"max_epochs={max_epochs} is fewer than local_epochs={self.local_epochs}: not even one round"
            )
        return rounds or 0

    def _mismatch_message(self, trainer: Trainer, server_rounds: int | None, rounds: int) -> str:
        max_epochs = _max_epochs(trainer)
        how = "rounds=" if self.rounds is not None else f"max_epochs={max_epochs} // local_epochs="
        server = f"the server runs {server_rounds} rounds" if server_rounds else "the server runs other rounds"
        hint = f", e.g. max_epochs={server_rounds * self.local_epochs}" if server_rounds else ""
        return (
            f"{server}, but this site would run {rounds} ({how}"
            f"{self.rounds if self.rounds is not None else self.local_epochs}); make them agree{hint}"
        )

    def _rounds_mismatch(self, trainer: Trainer, planned: int, err: FederationError) -> str:
        server_rounds = None
        try:  # the refusal's words are the server's; the number is worth one more call
            server_rounds = self._site.client.status().rounds or None
        except Exception:  # noqa: BLE001 - the message then does without it
            pass
        return f"{self._mismatch_message(trainer, server_rounds, planned)} (the server refused to join: {err})"

    def _rounds(self, trainer: Trainer, server_rounds: int) -> int:
        """The rounds to run: this site's plan (checked against max_epochs there), which must be the server's."""
        rounds = self._planned_rounds(trainer) or server_rounds
        if rounds != server_rounds:
            raise FederationSetupError(self._mismatch_message(trainer, server_rounds, rounds))
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


def _max_epochs(trainer: Trainer) -> int | None:
    return trainer.max_epochs if trainer.max_epochs not in (None, -1) else None


def _why_stopped(trainer: Trainer) -> str:
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return f"max_steps={trainer.max_steps} reached"
    if trainer.interrupted:
        return "interrupted"
    return "trainer.should_stop was set (early stopping, max_time or user code)"


@contextlib.contextmanager
def _sigterm_ends_waiting() -> Iterator[None]:
    """While rank 0 waits for the server (or retries it), SIGTERM ends the site at once.

    Lightning's own SIGTERM handler only notes the signal for the training loop to act on at the next batch, which
    a site blocked in a call or in its retry budget never reaches. Here the previous handler still runs first, then
    ``SystemExit(143)`` (128 + SIGTERM) ends the wait; ``on_exception`` tells the server this site leaves.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def is_last_batch(trainer: Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` ends the epoch: where :class:`HEFederation` exchanges in a round's last epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _as_tensors(state: Any) -> Any:
    """numpy arrays as torch tensors, so the checkpoint loads with ``torch.load(weights_only=True)``."""
    import numpy as np

    if isinstance(state, np.ndarray):
        return torch.from_numpy(state.copy())
    if isinstance(state, dict):
        return {key: _as_tensors(value) for key, value in state.items()}
    return state


def _as_arrays(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().double().numpy()
    if isinstance(state, dict):
        return {key: _as_arrays(value) for key, value in state.items()}
    return state
