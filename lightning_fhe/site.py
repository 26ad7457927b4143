"""A site's side of one federation, without Lightning: pack, encrypt, exchange, decrypt.

:class:`~lightning_fhe.federation.HEFederation` drives this from Trainer hooks; anything else (a plain PyTorch
loop, a test) can drive it the same way.

Both directions are pipelined through the site's :class:`~lightning_fhe.he.pool.CipherPool`
(:func:`send_encrypted`, :func:`fetch_decrypted`): the upload streams chunks as the pool encrypts them, read a
chunk's worth at a time from the model's own tensors, and the download hands each global chunk to the pool as it
arrives, which writes its average straight into the new tensors. So a round costs about the longer of the
cryptography and the transfer, not their sum, and the site holds no flat copy of its update and no list of
ciphertexts (the update kept for a resubmission is in a temporary file).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_fhe.client import (
    AggregatorClient,
    ChunkConsumer,
    GlobalModel,
    IncomingGlobalModel,
    JoinInfo,
    RoundClosedError,
    SubmitReceipt,
)
from lightning_fhe.he.codec import ValueSource
from lightning_fhe.he.context import HEContext
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.he.pool import CipherPool
from lightning_fhe.privacy import UpdateMechanism
from lightning_fhe.proto.update_shape import INITIAL_MODEL_ROUND, UpdateShape, update_shape
from lightning_fhe.selection import TensorSplit

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
    """One site's federation session: it owns the layouts, the cipher pool and the client.

    Args:
        client: a connected :class:`~lightning_fhe.client.AggregatorClient`.
        he_context: the site kit's CKKS context (with the secret key).
        split: which tensors are encrypted, sent in plaintext, or kept local.
        state: the model's state dict, to fix shapes and dtypes.
        privacy: a mechanism applied to the update (its difference from the last global model) before encryption.
        privacy_delta: the delta at which the mechanism's epsilon is reported.
        workers: processes that encrypt and decrypt (:class:`~lightning_fhe.he.pool.CipherPool`), started here
            and ended by :meth:`close`; default: every core this process may use; 1: in this process.
    """

    def __init__(
        self,
        client: AggregatorClient,
        he_context: HEContext,
        split: TensorSplit,
        state: Mapping[str, torch.Tensor],
        privacy: UpdateMechanism | None = None,
        privacy_delta: float = 1e-5,
        workers: int | None = None,
    ) -> None:
        self.client = client
        self.encrypted_layout = TensorLayout.from_tensors(state, split.encrypted)
        self.plaintext_layout = TensorLayout.from_tensors(state, split.plaintext)
        self.privacy = privacy
        self.privacy_delta = privacy_delta
        self.info: JoinInfo | None = None
        self._global: np.ndarray | None = None  # the last global model, flat: encrypted part, then plaintext part
        # Noise must be unpredictable to anyone else: a fresh OS-seeded generator, never a configured seed.
        self._rng = np.random.default_rng()
        self.params = he_context.params
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
        info = self.client.join(weight, self.encrypted_layout, self.plaintext_layout, rounds=rounds)
        if check is not None:
            check(info)
        self.info = info
        if self.info.send_initial_model:
            self.client.submit(INITIAL_MODEL_ROUND, iter(()), self._flatten(state))
        return self.info

    def global_state(self, round: int, progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], GlobalModel]:
        """The global model after ``round`` (0: the initial model), decrypted into named tensors."""
        received = fetch_decrypted(self.client, self.pool, self._shape(round), _bind(progress, "download"))
        return self._tensors(received), received.model

    def _shape(self, round_number: int) -> UpdateShape:
        return update_shape(round_number, self.encrypted_layout, self.plaintext_layout, self.params)

    def _flatten(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The whole model, flat, as the initial model travels: the encrypted part, then the plaintext part."""
        initial = self._shape(INITIAL_MODEL_ROUND)
        return initial.join(self.encrypted_layout.flatten(state), self.plaintext_layout.flatten(state))

    def _privatize(self, local: np.ndarray) -> tuple[np.ndarray, float, float | None]:
        """The values to send instead of ``local``: the last global model plus the privatized update.

        Every site starts the round from the same global model, so averaging ``global + d_i`` is averaging the
        updates ``d_i``; a component sent as zero update keeps the global value there.
        """
        if self._global is None:
            raise RuntimeError("privacy needs the global model the round started from; load it with global_state()")
        released = self.privacy.privatize(local - self._global, self._rng)
        return self._global + released.delta, released.shared_fraction, self.privacy.spent(self.privacy_delta)

    def exchange(
        self, round: int, state: Mapping[str, torch.Tensor], progress: Progress | None = None
    ) -> tuple[dict[str, torch.Tensor], RoundMetrics]:
        """Encrypts this site's selected tensors, submits them for ``round`` and returns the global model."""
        if self.info is None:
            raise RuntimeError("join() before exchange()")
        shape = self._shape(round)
        started = time.perf_counter()
        shared_fraction, epsilon = 1.0, None
        if self.privacy is None:  # read from the tensors a chunk's worth at a time: no flat copy of the update
            encrypted: np.ndarray | ValueSource = LayoutValues(self.encrypted_layout, state)
            plaintext = self.plaintext_layout.flatten(state)
        else:  # the mechanisms work on the flat update
            values, shared_fraction, epsilon = self._privatize(self._flatten(state))
            encrypted, plaintext = shape.split(values)
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
        received = fetch_decrypted(self.client, self.pool, shape, _bind(progress, "download"))
        tensors = self._tensors(received)
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
        )
        return tensors, metrics

    def _tensors(self, received: ReceivedModel) -> dict[str, torch.Tensor]:
        """The global model's named tensors; with privacy, also kept flat as the next round's reference."""
        shape = self._shape(received.model.round)
        if shape.is_initial_model:  # in plaintext: the encrypted part, then the plaintext part
            encrypted_values, plaintext_values = shape.split(received.model.plaintext)
            tensors = {
                **self.encrypted_layout.unflatten(encrypted_values),
                **self.plaintext_layout.unflatten(plaintext_values),
            }
        else:
            tensors = {**self.plaintext_layout.unflatten(received.model.plaintext), **received.encrypted}
        if self.privacy is not None:
            # What was loaded, in the tensors' own dtypes: the reference the next round's update is measured from.
            self._global = self._flatten(tensors)
        return tensors


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


def fetch_decrypted(
    client: AggregatorClient,
    pool: CipherPool,
    shape: UpdateShape,
    progress: Callable[[int, int], None] | None = None,
) -> ReceivedModel:
    """Fetches round ``shape.round``'s global model; its chunks are decrypted as they arrive, each chunk's
    average written straight into the encrypted layout's tensors, in their own dtypes."""
    layout = shape.encrypted_layout
    attempt: dict[str, Any] = {}
    decrypt_s = 0.0

    def chunks_into(incoming: IncomingGlobalModel) -> ChunkConsumer:
        # Called once per download attempt: a retried download starts over in fresh tensors.
        tensors = attempt["tensors"] = layout.empty()
        decryption = pool.decryption(
            layout.numel, incoming.total_share, lambda start, values: layout.write(tensors, start, values)
        )
        return _TimedConsumer(decryption, on_time)

    def on_time(seconds: float) -> None:
        nonlocal decrypt_s
        decrypt_s += seconds

    encrypted = not shape.is_initial_model and layout.numel > 0
    model = client.fetch_global(shape.round, progress=progress, chunks_into=chunks_into if encrypted else None)
    return ReceivedModel(model, attempt.get("tensors", {}), decrypt_s)


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


def _bind(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    return None if progress is None else (lambda done, total: progress(what, done, total))
