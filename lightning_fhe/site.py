"""A site's side of one federation, without Lightning: pack, encrypt, exchange, decrypt.

:class:`~lightning_fhe.federation.HEFederation` drives this from Trainer hooks; anything else (a plain PyTorch
loop, a test) can drive it the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from lightning_fhe.client import AggregatorClient, GlobalModel, JoinInfo, RoundClosedError, SubmitReceipt
from lightning_fhe.he.codec import UpdateCipher
from lightning_fhe.he.context import HEContext
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.privacy import UpdateMechanism
from lightning_fhe.proto.update_shape import INITIAL_MODEL_ROUND, UpdateShape, update_shape
from lightning_fhe.selection import TensorSplit

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
    """One site's federation session: it owns the layouts, the cipher and the client.

    Args:
        client: a connected :class:`~lightning_fhe.client.AggregatorClient`.
        he_context: the site kit's CKKS context (with the secret key).
        split: which tensors are encrypted, sent in plaintext, or kept local.
        state: the model's state dict, to fix shapes and dtypes.
        privacy: a mechanism applied to the update (its difference from the last global model) before encryption.
        privacy_delta: the delta at which the mechanism's epsilon is reported.
    """

    def __init__(
        self,
        client: AggregatorClient,
        he_context: HEContext,
        split: TensorSplit,
        state: Mapping[str, torch.Tensor],
        privacy: UpdateMechanism | None = None,
        privacy_delta: float = 1e-5,
    ) -> None:
        self.client = client
        self.cipher = UpdateCipher(he_context)
        self.encrypted_layout = TensorLayout.from_tensors(state, split.encrypted)
        self.plaintext_layout = TensorLayout.from_tensors(state, split.plaintext)
        self.privacy = privacy
        self.privacy_delta = privacy_delta
        self.info: JoinInfo | None = None
        self._global: np.ndarray | None = None  # the last global model, flat: encrypted part, then plaintext part
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
        info = self.client.join(weight, self.encrypted_layout, self.plaintext_layout, rounds=rounds)
        if check is not None:
            check(info)
        self.info = info
        if self.info.send_initial_model:
            self.client.submit(INITIAL_MODEL_ROUND, iter(()), self._flatten(state))
        return self.info

    def global_state(self, round: int, progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], GlobalModel]:
        """The global model after ``round`` (0: the initial model), decrypted into named tensors."""
        model = self.client.fetch_global(round, progress=_bind(progress, "download"))
        return self._decode(model), model

    def _shape(self, round_number: int) -> UpdateShape:
        return update_shape(round_number, self.encrypted_layout, self.plaintext_layout, self.cipher.params)

    def _flatten(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The whole model, flat, as the initial model travels: the encrypted part, then the plaintext part."""
        initial = self._shape(INITIAL_MODEL_ROUND)
        return initial.join(self.encrypted_layout.flatten(state), self.plaintext_layout.flatten(state))

    def _privatize(self, local: np.ndarray) -> tuple[np.ndarray, float, float | None]:
        """The values to send instead of ``local``: the last global model plus the privatized update.

        Every site starts the round from the same global model, so averaging ``global + d_i`` is averaging the
        updates ``d_i``; a component sent as zero update keeps the global value there.
        """
        if self.privacy is None:
            return local, 1.0, None
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
        values, shared_fraction, epsilon = self._privatize(self._flatten(state))
        encrypted, plaintext = shape.split(values)
        start = time.perf_counter()
        chunks, total = [], shape.num_chunks
        for chunk in self.cipher.iter_encrypt(encrypted, self.info.share, where=self.encrypted_layout.locate):
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
        tensors = self._decode(model)
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
        )
        return tensors, metrics

    def _decode(self, model: GlobalModel) -> dict[str, torch.Tensor]:
        encrypted, plaintext = self.encrypted_layout, self.plaintext_layout
        shape = self._shape(model.round)
        if shape.is_initial_model:  # in plaintext: the encrypted part, then the plaintext part
            encrypted_values, plaintext_values = shape.split(model.plaintext)
            tensors = {**encrypted.unflatten(encrypted_values), **plaintext.unflatten(plaintext_values)}
        else:
            tensors = plaintext.unflatten(model.plaintext)
            if encrypted.numel:
                average = self.cipher.decrypt(model.encrypted_chunks, encrypted.numel, model.total_share)
                tensors.update(encrypted.unflatten(average))
        if self.privacy is not None:
            # What was loaded, in the tensors' own dtypes: the reference the next round's update is measured from.
            self._global = self._flatten(tensors)
        return tensors


def _bind(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    return None if progress is None else (lambda done, total: progress(what, done, total))
