"""A site's side of one federation, without Lightning: pack, encrypt, exchange, decrypt.

:class:`~lightning_fhe.federation.HEFederation` drives this from Trainer hooks; anything else (a plain PyTorch
loop, a test) can drive it the same way.

Both directions are pipelined through the site's :class:`~lightning_fhe.he.pool.CipherPool`
(:func:`send_encrypted`, :func:`fetch_decrypted`): the upload streams chunks as the pool encrypts them, and the
download hands each global chunk to the pool as it arrives. So a round costs about the longer of the cryptography
and the transfer, not their sum, and the site holds no list of ciphertexts (the update kept for a resubmission is
in a temporary file). The strategy's replica works on the flat float64 model; :func:`fetch_decrypted` writes into
tensors instead, for a caller that needs no replica (``bench round``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_fhe.client import (
    AggregatorClient,
    ChunkConsumer,
    FederationError,
    GlobalModel,
    IncomingGlobalModel,
    JoinInfo,
    RoundClosedError,
    SubmitReceipt,
)
from lightning_fhe.federated_metrics import METRICS_SPEC, carried_names, decode_metrics, encode_metrics
from lightning_fhe.he.codec import ValueSource, num_chunks
from lightning_fhe.he.context import HEContext
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.he.pool import CipherPool, default_workers
from lightning_fhe.privacy import UpdateMechanism
from lightning_fhe.proto.update_shape import INITIAL_MODEL_ROUND, UpdateShape, update_shape
from lightning_fhe.selection import TensorSplit
from lightning_fhe.strategies import FedAvg, Strategy, StrategyReplica

Progress = Callable[[str, int, int], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundMetrics:
    """What one round cost this site.

    Encryption overlaps the upload and decryption the download, so the times overlap too: ``encrypt_s`` is the
    part of ``upload_s`` the upload spent waiting for the pool to produce chunks (the headroom check included),
    and ``decrypt_s`` the time the download spent waiting for the pool to decrypt (while chunks arrived, which is
    part of ``download_s``, and after the last one). ``round_s`` is the whole exchange, end to end.
    """

    round: int
    participants: tuple[str, ...]
    encrypt_s: float  # the upload's wait for encrypted chunks (within upload_s)
    upload_s: float
    wait_s: float  # for the other sites: from the end of the upload until the round's global model starts to arrive
    download_s: float
    decrypt_s: float  # the download's wait for decryption (mostly within download_s; the rest after it)
    upload_bytes: int
    download_bytes: int
    encrypted_values: int  # how many values travelled encrypted ...
    ciphertext_bytes: int  # ... in how many bytes of ciphertext (the rest of upload_bytes is plaintext and framing)
    shared_fraction: float = 1.0  # fraction of the update's components sent (below 1 with partial sharing or SVT)
    epsilon: float | None = None  # this site's cumulative privacy loss, when its mechanism gives a formal one
    round_s: float = 0.0  # the whole exchange: from reading the update to the global model's tensors decrypted
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
            "fhe/round_s": self.round_s,
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
    """One site's federation session: it owns the layouts, the cipher pool, the client and the strategy's replica.

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
        workers: processes that encrypt and decrypt (:class:`~lightning_fhe.he.pool.CipherPool`), started here
            and ended by :meth:`close`; default: every core this process may use, but no more than the encrypted
            update's tasks of 16 chunks (a small model, or an update in plaintext, starts none); 1: in this process.
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
        workers: int | None = None,
    ) -> None:
        self.client = client
        self.params = he_context.params
        self.encrypted_layout = TensorLayout.from_tensors(state, split.encrypted)
        self.plaintext_layout = TensorLayout.from_tensors(state, split.plaintext)
        # The metrics ride with the encrypted tensors when there are any: the server must not see them.
        self._metrics_in = "" if not federated_metrics else "encrypted" if split.encrypted else "plaintext"
        self.wire_encrypted, self.wire_plaintext = wire_layouts(split, state, federated_metrics)
        stepped = set(split.encrypted) | set(split.plaintext) if optimized is None else set(optimized)
        specs = (*self.encrypted_layout.specs, *self.plaintext_layout.specs)
        mask = np.concatenate([np.full(spec.numel, spec.name in stepped) for spec in specs] or [np.zeros(0, bool)])
        self.replica = StrategyReplica(strategy or FedAvg(), mask, to_model=self._as_loaded)
        self.privacy = privacy
        self.privacy_delta = privacy_delta
        self.info: JoinInfo | None = None
        # Noise must be unpredictable to anyone else: a fresh OS-seeded generator, never a configured seed.
        self._rng = np.random.default_rng()
        if workers is None:  # every core that has chunks to work on
            workers = default_workers(num_chunks(self.wire_encrypted.numel, self.params))
        # Last, so that nothing can fail once its worker processes are running (close() ends them).
        self.pool = CipherPool(he_context, workers=workers)

    def close(self) -> None:
        """Ends the pool's processes and the client's connection."""
        try:
            self.pool.close()
        finally:
            self.client.close()

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
            initial = self._shape(INITIAL_MODEL_ROUND)
            self.client.submit(INITIAL_MODEL_ROUND, iter(()), initial.join(*self._wire(self._flatten(state), None)))
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
        average, _ = self._decode(fetch_flat(self.client, self.pool, self._shape(round), _bind(progress, "download")))
        return average

    def _shape(self, round_number: int) -> UpdateShape:
        """What an update of ``round_number`` carries: the wire layouts (the model's, and the metrics)."""
        return update_shape(round_number, self.wire_encrypted, self.wire_plaintext, self.params)

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
        shape = self._shape(round)
        started = time.perf_counter()
        values, shared_fraction, epsilon = self._privatize(self._flatten(state))
        names = carried_names(metrics or {})
        encrypted, plaintext = self._wire(values, metrics)
        del values
        try:
            sent = send_encrypted(
                self.client, self.pool, shape, encrypted, plaintext, self.info.share, _bind(progress, "upload")
            )
            receipt, encrypt_s, ciphertext_bytes = sent.receipt, sent.encrypt_s, sent.ciphertext_bytes
        except RoundClosedError as err:
            # Too slow for this round: it closed at quorum without us. Our local work is dropped, and we carry on
            # from the global model like everyone else.
            log.warning("round %d closed before this site's update arrived (%s); loading its global model", round, err)
            receipt, encrypt_s, ciphertext_bytes = SubmitReceipt(round=round, bytes_sent=0, seconds=0.0), 0.0, 0
        del encrypted
        received = fetch_flat(self.client, self.pool, shape, _bind(progress, "download"))
        average, carried = self._decode(received)
        tensors = self._unflatten(self.replica.advance(round, average))
        model = received.model
        metrics = RoundMetrics(
            round=round,
            participants=model.participants,
            encrypt_s=encrypt_s,
            upload_s=receipt.seconds,
            wait_s=model.seconds - model.download_s,
            download_s=model.download_s,
            decrypt_s=received.decrypt_s,
            upload_bytes=receipt.bytes_sent,
            download_bytes=model.bytes_received,
            encrypted_values=self.encrypted_layout.numel,
            ciphertext_bytes=ciphertext_bytes,
            shared_fraction=shared_fraction,
            epsilon=epsilon,
            round_s=time.perf_counter() - started,
            global_metrics={} if carried is None else decode_metrics(carried, names),
        )
        return tensors, metrics

    def _decode(self, received: ReceivedFlat) -> tuple[np.ndarray, np.ndarray | None]:
        """The average of the model's federated values (float64, as loaded) and of the metrics pseudo-tensor."""
        model = received.model
        shape = self._shape(model.round)
        if shape.is_initial_model:  # the initial model travels in plaintext: encrypted part, then plaintext part
            encrypted, plaintext = shape.split(np.asarray(model.plaintext, dtype=np.float64))
        else:
            plaintext = np.asarray(model.plaintext, dtype=np.float64)
            encrypted = received.encrypted
        cut_encrypted, cut_plaintext = self.encrypted_layout.numel, self.plaintext_layout.numel
        average = self._as_loaded(np.concatenate([encrypted[:cut_encrypted], plaintext[:cut_plaintext]]))
        carried = {"encrypted": encrypted[cut_encrypted:], "plaintext": plaintext[cut_plaintext:]}.get(self._metrics_in)
        return average, carried


# -- the pipelined exchange (shared with bench round) ---------------------------------------------------------------


@dataclass(frozen=True)
class LayoutValues:
    """A :class:`~lightning_fhe.he.codec.ValueSource` over a model's tensors in a layout's order: the pool reads
    them a chunk's worth at a time, so no flat float64 copy of the update is ever made."""

    layout: TensorLayout
    tensors: Mapping[str, torch.Tensor]

    @property
    def size(self) -> int:
        return self.layout.numel

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.layout.read(self.tensors, start, stop)


@dataclass(frozen=True)
class SentUpdate:
    receipt: SubmitReceipt
    encrypt_s: float  # the time the upload spent waiting for the pool's chunks (the headroom check included)
    ciphertext_bytes: int


def send_encrypted(
    client: AggregatorClient,
    pool: CipherPool,
    shape: UpdateShape,
    encrypted: np.ndarray | ValueSource,
    plaintext: np.ndarray,
    share: float,
    progress: Callable[[int, int], None] | None = None,
) -> SentUpdate:
    """Submits round ``shape.round``'s update; the pool encrypts ``encrypted`` (weighted by ``share``) while the
    upload streams it, a few batches ahead, in order.

    Raises:
        HeadroomError: a value cannot be encrypted (checked before anything is sent).
        RoundClosedError, FederationError: as :meth:`~lightning_fhe.client.AggregatorClient.submit`.
    """
    started = time.perf_counter()
    chunks = pool.iter_encrypt(encrypted, share, where=shape.encrypted_layout.locate)  # checks every value first
    timed = _TimedChunks(chunks, time.perf_counter() - started)
    receipt = client.submit(shape.round, timed, plaintext, progress=progress)
    return SentUpdate(receipt, timed.seconds, timed.bytes)


@dataclass(frozen=True)
class ReceivedModel:
    model: GlobalModel
    encrypted: dict[str, torch.Tensor]  # the encrypted layout's tensors, decrypted and averaged ({} for round 0)
    decrypt_s: float  # the time the download waited for the pool to decrypt, during it and after its last chunk


@dataclass(frozen=True)
class ReceivedFlat:
    model: GlobalModel
    encrypted: np.ndarray  # the encrypted layout's values, decrypted and averaged, float64 (empty for round 0)
    decrypt_s: float  # the time the download waited for the pool to decrypt, during it and after its last chunk


def fetch_decrypted(
    client: AggregatorClient,
    pool: CipherPool,
    shape: UpdateShape,
    progress: Callable[[int, int], None] | None = None,
) -> ReceivedModel:
    """Fetches round ``shape.round``'s global model; its chunks are decrypted as they arrive, their averages
    written straight into the encrypted layout's tensors, a batch of chunks at a time, in their own dtypes."""
    layout = shape.encrypted_layout

    def new_tensors() -> tuple[dict[str, torch.Tensor], Callable[[int, np.ndarray], None]]:
        tensors = layout.empty()
        return tensors, lambda start, values: layout.write(tensors, start, values)

    model, tensors, decrypt_s = _fetch(client, pool, shape, progress, new_tensors)
    return ReceivedModel(model, tensors if tensors is not None else {}, decrypt_s)


def fetch_flat(
    client: AggregatorClient,
    pool: CipherPool,
    shape: UpdateShape,
    progress: Callable[[int, int], None] | None = None,
) -> ReceivedFlat:
    """As :func:`fetch_decrypted`, into one float64 array of the encrypted layout's values (what a strategy needs)."""

    def new_array() -> tuple[np.ndarray, Callable[[int, np.ndarray], None]]:
        flat = np.empty(shape.encrypted_layout.numel, dtype=np.float64)

        def write(start: int, values: np.ndarray) -> None:
            flat[start : start + values.size] = values

        return flat, write

    model, flat, decrypt_s = _fetch(client, pool, shape, progress, new_array)
    return ReceivedFlat(model, flat if flat is not None else np.zeros(0), decrypt_s)


def _fetch(client, pool, shape, progress, new_output):
    """The global model, its encrypted part decrypted while it arrives into ``new_output()``'s first item (a new
    one per download attempt: a retried download starts over), and the time spent waiting for decryption."""
    layout = shape.encrypted_layout
    attempt: dict[str, Any] = {}
    decrypt_s = 0.0

    def chunks_into(incoming: IncomingGlobalModel) -> ChunkConsumer:
        attempt["output"], write = new_output()
        decryption = pool.decryption(layout.numel, incoming.total_share, write, len(incoming.participants))
        return _TimedConsumer(decryption, on_time)

    def on_time(seconds: float) -> None:
        nonlocal decrypt_s
        decrypt_s += seconds

    encrypted = not shape.is_initial_model and layout.numel > 0
    model = client.fetch_global(shape.round, progress=progress, chunks_into=chunks_into if encrypted else None)
    return model, attempt.get("output"), decrypt_s


class _TimedChunks:
    """The pool's chunks as the upload pulls them, timing the waits and counting the bytes."""

    def __init__(self, chunks: Iterator[bytes], seconds: float) -> None:
        self._chunks, self.seconds, self.bytes = chunks, seconds, 0

    def __iter__(self) -> _TimedChunks:
        return self

    def __next__(self) -> bytes:
        start = time.perf_counter()
        try:
            chunk = next(self._chunks)
        finally:
            self.seconds += time.perf_counter() - start
        self.bytes += len(chunk)
        return chunk


class _TimedConsumer:
    """A :class:`~lightning_fhe.client.ChunkConsumer` that reports the time spent in the one it wraps."""

    def __init__(self, consumer: ChunkConsumer, on_time: Callable[[float], None]) -> None:
        self._consumer, self._on_time = consumer, on_time

    def add(self, frame: bytes) -> None:
        start = time.perf_counter()
        try:
            self._consumer.add(frame)
        finally:
            self._on_time(time.perf_counter() - start)

    def finish(self) -> None:
        start = time.perf_counter()
        try:
            self._consumer.finish()
        finally:
            self._on_time(time.perf_counter() - start)

    def close(self) -> None:
        self._consumer.close()


def wire_layouts(
    split: TensorSplit, state: Mapping[str, torch.Tensor], federated_metrics: bool = True
) -> tuple[TensorLayout, TensorLayout]:
    """The (encrypted, plaintext) layouts a site declares when it joins: its federated tensors and, with
    ``federated_metrics``, the pseudo-tensor carrying its validation metrics, with the encrypted tensors when there
    are any (the server must not see them)."""
    metrics_in = "" if not federated_metrics else "encrypted" if split.encrypted else "plaintext"
    return (
        _appended(TensorLayout.from_tensors(state, split.encrypted), metrics_in == "encrypted"),
        _appended(TensorLayout.from_tensors(state, split.plaintext), metrics_in == "plaintext"),
    )


def _appended(layout: TensorLayout, metrics: bool) -> TensorLayout:
    return TensorLayout((*layout.specs, METRICS_SPEC)) if metrics else layout


def _bind(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    return None if progress is None else (lambda done, total: progress(what, done, total))
