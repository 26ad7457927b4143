"""A site's side of one federation, without Lightning: pack, encrypt, exchange, decrypt.

:class:`~lightning_fhe.federation.HEFederation` drives this from Trainer hooks; anything else (a plain PyTorch
loop, a test) can drive it the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from lightning_fhe.client import (
    AggregatorClient,
    FederationError,
    GlobalModel,
    JoinInfo,
    RoundClosedError,
    SubmitReceipt,
)
from lightning_fhe.federated_metrics import METRICS_SPEC, carried_names, decode_metrics, encode_metrics
from lightning_fhe.he.codec import UpdateCipher, num_chunks
from lightning_fhe.he.context import HEContext
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.privacy import UpdateMechanism
from lightning_fhe.selection import TensorSplit
from lightning_fhe.strategies import FedAvg, Strategy, StrategyReplica

Progress = Callable[[str, int, int], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundMetrics:
    """What one round cost this site."""

    round: int
    participants: tuple[str, ...]
    encrypt_s: float
    upload_s: float
    wait_s: float  # for the other sites: from the end of the upload until the round's global model starts to arrive
    download_s: float
    decrypt_s: float
    upload_bytes: int
    download_bytes: int
    encrypted_values: int  # how many values travelled encrypted ...
    ciphertext_bytes: int  # ... in how many bytes of ciphertext (the rest of upload_bytes is plaintext and framing)
    shared_fraction: float = 1.0  # fraction of the update's components sent (below 1 with partial sharing or SVT)
    epsilon: float | None = None  # this site's cumulative privacy loss, when its mechanism gives a formal one
    # The weighted means over the sites of their validation metrics of the previous round's global model
    # (federated evaluation); empty when no site sent any.
    global_metrics: Mapping[str, float] = field(default_factory=dict)

    def as_log_dict(self) -> dict[str, float]:
        return {
            "fhe/round": float(self.round),
            "fhe/encrypt_s": self.encrypt_s,
            "fhe/upload_s": self.upload_s,
            "fhe/wait_s": self.wait_s,
            "fhe/download_s": self.download_s,
            "fhe/decrypt_s": self.decrypt_s,
            "fhe/upload_bytes": float(self.upload_bytes),
            "fhe/download_bytes": float(self.download_bytes),
            "fhe/ciphertext_bytes": float(self.ciphertext_bytes),
            "fhe/participants": float(len(self.participants)),
            "privacy/shared_fraction": self.shared_fraction,
        } | ({} if self.epsilon is None else {"privacy/epsilon": self.epsilon})

    def summary(self, rounds: int) -> str:
        mb = 1e6
        return (
            f"fhe round {self.round}/{rounds}: {len(self.participants)} site(s); encrypt {self.encrypt_s:.2f} s, "
            f"upload {self.upload_bytes / mb:.1f} MB in {self.upload_s:.2f} s, wait {self.wait_s:.2f} s, "
            f"download {self.download_bytes / mb:.1f} MB in {self.download_s:.2f} s, decrypt {self.decrypt_s:.2f} s"
        )


class FederatedSite:
    """One site's federation session: it owns the layouts, the cipher, the client and the strategy's replica.

    The update a site sends is its model's federated tensors (encrypted part, then plaintext part) and, appended
    to the encrypted part (to the plaintext part under ``encrypt="none"``), the pseudo-tensor that carries its
    validation metrics (:mod:`lightning_fhe.federated_metrics`). After decryption the strategy turns the average
    into the next global model (:class:`~lightning_fhe.strategies.StrategyReplica`).

    Args:
        client: a connected :class:`~lightning_fhe.client.AggregatorClient`.
        he_context: the site kit's CKKS context (with the secret key).
        split: which tensors are encrypted, sent in plaintext, or kept local.
        state: the model's state dict, to fix shapes and dtypes.
        privacy: a mechanism applied to the update (its difference from the last global model) before encryption.
        privacy_delta: the delta at which the mechanism's epsilon is reported.
        strategy: the server optimizer step every site runs on the decrypted average; default plain FedAvg.
        optimized: the federated tensors the strategy steps (the parameters); the others (floating buffers) take
            the average as is. Default: every federated tensor.
        federated_metrics: carry validation metrics in the update (every site of a federation must agree: the
            layout differs).
    """

    def __init__(
        self,
        client: AggregatorClient,
        he_context: HEContext,
        split: TensorSplit,
        state: Mapping[str, torch.Tensor],
        privacy: UpdateMechanism | None = None,
        privacy_delta: float = 1e-5,
        strategy: Strategy | None = None,
        optimized: Collection[str] | None = None,
        federated_metrics: bool = True,
    ) -> None:
        self.client = client
        self.cipher = UpdateCipher(he_context)
        self.encrypted_layout = TensorLayout.from_tensors(state, split.encrypted)
        self.plaintext_layout = TensorLayout.from_tensors(state, split.plaintext)
        # The metrics ride with the encrypted tensors when there are any: the server must not see them.
        self._metrics_in = "" if not federated_metrics else "encrypted" if split.encrypted else "plaintext"
        self.wire_encrypted = _appended(self.encrypted_layout, self._metrics_in == "encrypted")
        self.wire_plaintext = _appended(self.plaintext_layout, self._metrics_in == "plaintext")
        stepped = set(split.encrypted) | set(split.plaintext) if optimized is None else set(optimized)
        specs = (*self.encrypted_layout.specs, *self.plaintext_layout.specs)
        mask = np.concatenate([np.full(spec.numel, spec.name in stepped) for spec in specs] or [np.zeros(0, bool)])
        self.replica = StrategyReplica(strategy or FedAvg(), mask, to_model=self._as_loaded)
        self.privacy = privacy
        self.privacy_delta = privacy_delta
        self.info: JoinInfo | None = None
        # Noise must be unpredictable to anyone else: a fresh OS-seeded generator, never a configured seed.
        self._rng = np.random.default_rng()

    def join(
        self,
        weight: float,
        state: Mapping[str, torch.Tensor],
        rounds: int = 0,
        check: Callable[[JoinInfo], None] | None = None,
    ) -> JoinInfo:
        """Joins and, when the server asks this site for the first global model, sends its initial state.

        Args:
            rounds: the rounds this site will train (0: the server's), for the server to check before recording.
            check: called with the join's answer before the initial state is sent; raising stops it from being sent.
        """
        info = self.client.join(weight, self.wire_encrypted, self.wire_plaintext, rounds=rounds)
        if check is not None:
            check(info)
        self.info = info
        if self.info.send_initial_model:
            self.client.submit(0, iter(()), np.concatenate(self._wire(self._flatten(state), None)))
        return self.info

    def global_state(self, round: int, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """The global model after ``round`` (0: the initial model), as this site's strategy made it.

        The server holds averages, not global models: for a strategy with state (anything but plain FedAvg) the
        global model of ``round`` is the replica's. When the replica is behind (restored from an older checkpoint,
        or not at all), it replays the rounds in between from the server's aggregates.
        """
        replica = self.replica
        if replica.round == round and replica.reference is not None:  # restored from this site's checkpoint
            return self._unflatten(replica.reference)
        if round == 0 or replica.strategy.memoryless:
            replica.start(round, self._fetch_average(round, progress))
            return self._unflatten(replica.reference)
        if replica.round is not None and replica.round > round:
            raise ValueError(f"the strategy's state is from round {replica.round}, after round {round}")
        first = 0 if replica.round is None else replica.round + 1
        try:
            if replica.round is None:
                replica.start(0, self._fetch_average(0, progress))
                first = 1
            for past in range(first, round + 1):
                replica.advance(past, self._fetch_average(past, progress))
        except FederationError as err:
            raise FederationError(
                f"{replica.strategy!r} keeps state across rounds, so this site rebuilds the global model of round "
                f"{round} by replaying rounds {first}..{round} from the server's aggregates, and that failed ({err}). "
                "Resume from a checkpoint of a later round (HEFederation's state holds the strategy's), or run the "
                "server with keep_rounds=0 to keep every aggregate",
                code=err.code,
                reason=err.reason,
            ) from err
        log.info("replayed rounds %d..%d of %r to rebuild the global model", first, round, replica.strategy)
        return self._unflatten(replica.reference)

    def _fetch_average(self, round: int, progress: Progress | None) -> np.ndarray:
        average, _ = self._decode(self.client.fetch_global(round, progress=_bind(progress, "download")))
        return average

    def _flatten(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The model's federated tensors as one float64 stream: encrypted part, then plaintext part."""
        return np.concatenate([self.encrypted_layout.flatten(state), self.plaintext_layout.flatten(state)])

    def _unflatten(self, values: np.ndarray) -> dict[str, torch.Tensor]:
        cut = self.encrypted_layout.numel
        return {**self.encrypted_layout.unflatten(values[:cut]), **self.plaintext_layout.unflatten(values[cut:])}

    def _as_loaded(self, values: np.ndarray) -> np.ndarray:
        """``values`` as the model holds them once loaded: rounded to each tensor's dtype."""
        return self._flatten(self._unflatten(values))

    def _wire(self, values: np.ndarray, metrics: Mapping[str, float] | None) -> tuple[np.ndarray, np.ndarray]:
        """The encrypted and plaintext streams of an update: the model's values with the metrics appended."""
        encrypted, plaintext = np.split(values, [self.encrypted_layout.numel])
        carried = encode_metrics(metrics)
        if self._metrics_in == "encrypted":
            encrypted = np.concatenate([encrypted, carried])
        elif self._metrics_in == "plaintext":
            plaintext = np.concatenate([plaintext, carried])
        return encrypted, plaintext

    def _privatize(self, local: np.ndarray) -> tuple[np.ndarray, float, float | None]:
        """The values to send instead of ``local``: the last global model plus the privatized update.

        Every site starts the round from the same global model, so averaging ``global + d_i`` is averaging the
        updates ``d_i``; a component sent as zero update keeps the global value there.
        """
        if self.privacy is None:
            return local, 1.0, None
        reference = self.replica.reference
        if reference is None:
            raise RuntimeError("privacy needs the global model the round started from; load it with global_state()")
        released = self.privacy.privatize(local - reference, self._rng)
        return reference + released.delta, released.shared_fraction, self.privacy.spent(self.privacy_delta)

    def exchange(
        self,
        round: int,
        state: Mapping[str, torch.Tensor],
        progress: Progress | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> tuple[dict[str, torch.Tensor], RoundMetrics]:
        """Encrypts this site's selected tensors, submits them for ``round`` and returns the global model.

        ``metrics``: this site's validation metrics of the previous round's global model, to be averaged over the
        sites with this update; the means come back in the returned ``RoundMetrics.global_metrics``.
        """
        if self.info is None:
            raise RuntimeError("join() before exchange()")
        values, shared_fraction, epsilon = self._privatize(self._flatten(state))
        names = carried_names(metrics or {})
        encrypted, plaintext = self._wire(values, metrics)
        start = time.perf_counter()
        chunks, total = [], num_chunks(encrypted.size, self.cipher.params)
        for chunk in self.cipher.iter_encrypt(encrypted, self.info.share, where=self.wire_encrypted.locate):
            chunks.append(chunk)
            if progress is not None:
                progress("encrypt", len(chunks), total)
        encrypt_s = time.perf_counter() - start
        try:
            receipt = self.client.submit(round, chunks, plaintext, progress=_bind(progress, "upload"))
        except RoundClosedError as err:
            # Too slow for this round: it closed at quorum without us. Our local work is dropped, and we carry on
            # from the global model like everyone else.
            log.warning("round %d closed before this site's update arrived (%s); loading its global model", round, err)
            receipt = SubmitReceipt(round=round, bytes_sent=0, seconds=0.0)
        model = self.client.fetch_global(round, progress=_bind(progress, "download"))
        start = time.perf_counter()
        average, carried = self._decode(model)
        tensors = self._unflatten(self.replica.advance(round, average))
        metrics = RoundMetrics(
            round=round,
            participants=model.participants,
            encrypt_s=encrypt_s,
            upload_s=receipt.seconds,
            wait_s=model.seconds - model.download_s,
            download_s=model.download_s,
            decrypt_s=time.perf_counter() - start,
            upload_bytes=receipt.bytes_sent,
            download_bytes=model.bytes_received,
            encrypted_values=self.encrypted_layout.numel,
            ciphertext_bytes=sum(map(len, chunks)),
            shared_fraction=shared_fraction,
            epsilon=epsilon,
            global_metrics={} if carried is None else decode_metrics(carried, names),
        )
        return tensors, metrics

    def _decode(self, model: GlobalModel) -> tuple[np.ndarray, np.ndarray | None]:
        """The average of the model's federated values (float64, as loaded) and of the metrics pseudo-tensor."""
        wire_encrypted, wire_plaintext = self.wire_encrypted, self.wire_plaintext
        if model.round == 0:  # the initial model travels in plaintext: encrypted part, then plaintext part
            values = model.plaintext
            if values.size != wire_encrypted.numel + wire_plaintext.numel:
                raise ValueError(
                    f"initial model holds {values.size} values; this site's layout has "
                    f"{wire_encrypted.numel + wire_plaintext.numel}"
                )
            encrypted, plaintext = np.split(np.asarray(values, dtype=np.float64), [wire_encrypted.numel])
        else:
            plaintext = np.asarray(model.plaintext, dtype=np.float64)
            encrypted = np.zeros(0)
            if wire_encrypted.numel:
                encrypted = self.cipher.decrypt(model.encrypted_chunks, wire_encrypted.numel, model.total_share)
        cut_encrypted, cut_plaintext = self.encrypted_layout.numel, self.plaintext_layout.numel
        average = self._as_loaded(np.concatenate([encrypted[:cut_encrypted], plaintext[:cut_plaintext]]))
        carried = {"encrypted": encrypted[cut_encrypted:], "plaintext": plaintext[cut_plaintext:]}.get(self._metrics_in)
        return average, carried


def _appended(layout: TensorLayout, metrics: bool) -> TensorLayout:
    return TensorLayout((*layout.specs, METRICS_SPEC)) if metrics else layout


def _bind(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    return None if progress is None else (lambda done, total: progress(what, done, total))
