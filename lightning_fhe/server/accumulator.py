"""One round's running sum, fed chunk by chunk as updates arrive, so memory stays about one model.

Encrypted chunks go straight into the round's :class:`~lightning_fhe.he.codec.CiphertextSum`. A stream that
breaks midway is taken back out by ciphertext subtraction, which is exact modular arithmetic: the sum ends bit for
bit as if the stream had never been sent. That needs the stream's own chunk blobs until it commits (seeded, about
half the size of the sum's ciphertexts); the server bounds how many streams are accumulated at once, so this
stays independent of the number of sites.

Plaintext tensors (those a site sends unencrypted) are staged per stream and added, times the site's share, at
commit: floating-point sums do not subtract back exactly. Weighted plaintext values are rounded to the same
fixed-point grid as encrypted ones (:mod:`lightning_fhe.he.fixed_point`), so both parts of the global model are the
exact, order-independent sums the sites would get without encryption.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lightning_fhe.he.codec import CiphertextError, CiphertextSum
from lightning_fhe.he.context import HEContext
from lightning_fhe.he.fixed_point import round_to_grid
from lightning_fhe.server.errors import Reason, Refusal, Status

_FLOAT64 = np.dtype("<f8")
# Round 0's initial model is taken as it is (off the grid); it must still be a model a float32 tensor can hold.
INITIAL_MODEL_LIMIT = float(np.finfo(np.float32).max)


def plaintext_limit(grid_bits: int | None) -> float:
    """The largest magnitude a plaintext value may have: below ``2**(53 - grid_bits)`` multiples of the grid add
    exactly in float64 (shares sum to at most 1, so the weighted sum stays below it too); round 0 (``None``):
    the float32 range."""
    return INITIAL_MODEL_LIMIT if grid_bits is None else float(2 ** (53 - grid_bits))


@dataclass(frozen=True)
class Aggregate:
    """A closed round's global model.

    Args:
        round: the round number (0: the initial model).
        encrypted_chunks: the sum of the participants' encrypted (share-weighted) updates, one blob per chunk.
        plaintext: float64; the weighted average of the plaintext parts (already divided by ``total_share``).
        total_share: the participants' summed shares; sites divide the decrypted sum by it.
        participants: the sites whose update is in the sum.
    """

    round: int
    encrypted_chunks: list[bytes]
    plaintext: np.ndarray
    total_share: float
    participants: tuple[str, ...]


def _bad(reason: Reason, message: str) -> Refusal:
    return Refusal(Status.INVALID_ARGUMENT, reason, message)


class Upload:
    """One site's update arriving on one stream: plaintext values first, then chunks ``0..n-1`` in order."""

    def __init__(self, accumulator: RoundAccumulator, site: str, share: float) -> None:
        self._accumulator = accumulator
        self.site = site
        self.share = share
        self._plaintext = np.zeros(accumulator.plaintext_count, dtype=np.float64)
        self._plaintext_filled = 0
        self._added: list[bytes] = []  # this stream's chunks already in the round's sum, to take back out on abort
        self.bytes_received = 0
        self.state = "open"  # open -> committed | aborted

    @property
    def chunks_received(self) -> int:
        return len(self._added)

    def _require_open(self) -> None:
        if self.state != "open":
            raise RuntimeError(f"upload of {self.site} is {self.state}")

    def add_plaintext(self, offset: int, data: bytes, dtype: np.dtype = _FLOAT64) -> None:
        """Stages the plaintext values in ``data`` (little-endian ``dtype``: float64, or float32 for models that are
        float32 or narrower) starting at value ``offset``."""
        self._require_open()
        count = self._accumulator.plaintext_count
        if self._added:
            raise _bad(Reason.CHUNK_ORDER, "plaintext values arrived after ciphertext chunks; send them first")
        if len(data) % dtype.itemsize:
            raise _bad(
                Reason.BAD_PLAINTEXT,
                f"plaintext block at value {offset} holds {len(data)} bytes, not a multiple of {dtype.itemsize} "
                f"({dtype.name})",
            )
        if offset != self._plaintext_filled:
            raise _bad(
                Reason.CHUNK_ORDER,
                f"plaintext block starts at value {offset}, but {self._plaintext_filled} values arrived so far; blocks "
                "must come in order without gaps",
            )
        values = np.frombuffer(data, dtype=dtype).astype(np.float64)
        end = offset + values.size
        if end > count:
            raise _bad(
                Reason.CHUNK_COUNT, f"plaintext block ends at value {end}, beyond the {count} plaintext values declared"
            )
        finite = np.isfinite(values)
        if not finite.all():
            i = int(np.argmin(finite))
            where = self._accumulator.describe_plaintext(offset + i)
            raise _bad(
                Reason.BAD_PLAINTEXT, f"plaintext value {offset + i} ({where}) is {values[i]}; values must be finite"
            )
        limit, grid_bits = self._accumulator.plaintext_limit, self._accumulator.grid_bits
        too_large = np.abs(values) > limit if grid_bits is None else np.abs(values) >= limit
        if too_large.any():
            i = int(np.argmax(too_large))
            where = self._accumulator.describe_plaintext(offset + i)
            bound = "|x| <= float32 max" if grid_bits is None else f"|x| < 2^{53 - grid_bits}"
            raise _bad(
                Reason.BAD_PLAINTEXT,
                f"plaintext value {offset + i} ({where}) is {values[i]:.6g}, outside the range the server sums exactly "
                f"({bound} = {limit:.6g}); nothing of this update was kept",
            )
        self._plaintext[offset:end] = values
        self._plaintext_filled = end
        self.bytes_received += len(data)

    def add_chunk(self, index: int, blob: bytes) -> None:
        """Adds ciphertext chunk ``index`` to the round's sum; a bad chunk is refused and changes nothing."""
        self._require_open()
        accumulator = self._accumulator
        expected = len(self._added)
        if self._plaintext_filled != accumulator.plaintext_count:
            raise _bad(
                Reason.CHUNK_ORDER,
                f"chunk {index} arrived after {self._plaintext_filled} of the {accumulator.plaintext_count} plaintext "
                "values; plaintext values come first",
            )
        if index >= accumulator.num_chunks:
            raise _bad(
                Reason.CHUNK_COUNT,
                f"chunk {index} is beyond the {accumulator.num_chunks} chunks of the encrypted layout",
            )
        if index != expected:
            raise _bad(
                Reason.CHUNK_ORDER,
                f"chunk {index} arrived where chunk {expected} was expected; chunks must come in order "
                f"0..{accumulator.num_chunks - 1}",
            )
        try:
            accumulator.cipher_sum.add(index, blob)
        except CiphertextError as err:
            raise _bad(Reason.BAD_CHUNK, f"chunk {index}: {err}") from None
        self._added.append(blob)
        self.bytes_received += len(blob)

    def missing(self) -> str | None:
        """What is still missing for this update to be complete, or None."""
        accumulator = self._accumulator
        if self._plaintext_filled != accumulator.plaintext_count:
            return f"{self._plaintext_filled} of {accumulator.plaintext_count} plaintext values"
        if len(self._added) != accumulator.num_chunks:
            return f"{len(self._added)} of {accumulator.num_chunks} chunks"
        return None

    def commit(self) -> None:
        """Makes the update part of the round: its plaintext part, weighted, joins the plaintext sum."""
        self._require_open()
        missing = self.missing()
        if missing:
            raise _bad(Reason.INCOMPLETE, f"the update stream ended after {missing}; nothing of it was kept")
        accumulator = self._accumulator
        weighted = self.share * self._plaintext
        if accumulator.grid_bits is not None:
            round_to_grid(weighted, accumulator.grid_bits)
        accumulator.plaintext_sum += weighted
        accumulator.shares.append(self.share)
        # Exact and so independent of arrival order: a running sum of floats is not.
        accumulator.total_share = math.fsum(accumulator.shares)
        accumulator.participants.append(self.site)
        accumulator.active.discard(self)
        self._added.clear()
        self._plaintext = np.empty(0)
        self.state = "committed"

    def abort(self) -> None:
        """Takes this stream's chunks back out of the sum; idempotent."""
        if self.state != "open":
            return
        accumulator = self._accumulator
        accumulator.active.discard(self)
        if self._added:
            if not accumulator.participants and not any(u._added for u in accumulator.active):
                # Nothing else is in the sum: start afresh rather than leave a zero ciphertext where none was.
                accumulator.cipher_sum = CiphertextSum(accumulator.context, accumulator.num_chunks)
            else:
                for index in reversed(range(len(self._added))):
                    accumulator.cipher_sum.subtract(index, self._added[index])
        self._added.clear()
        self._plaintext = np.empty(0)
        self.state = "aborted"


class RoundAccumulator:
    """The running sum of one round.

    Args:
        context: the server's keyless HE context.
        num_chunks: ciphertext chunks per update (0 when nothing is encrypted, and for round 0).
        plaintext_count: plaintext values per update.
        describe_plaintext: names the tensor element at a plaintext position, for error messages.
        on_grid: round weighted plaintext values to the context's fixed-point grid, as sites do before encrypting;
            off only for round 0, whose single initial model is taken as it is.
    """

    def __init__(
        self,
        context: HEContext,
        num_chunks: int,
        plaintext_count: int,
        describe_plaintext: Callable[[int], str] = lambda i: f"value {i}",
        on_grid: bool = True,
    ) -> None:
        self.context = context
        self.num_chunks = num_chunks
        self.plaintext_count = plaintext_count
        self.describe_plaintext = describe_plaintext
        self.grid_bits = context.params.grid_bits if on_grid else None
        self.plaintext_limit = plaintext_limit(self.grid_bits)
        self.cipher_sum = CiphertextSum(context, num_chunks)
        self.plaintext_sum = np.zeros(plaintext_count, dtype=np.float64)
        self.total_share = 0.0
        self.shares: list[float] = []  # in the order of ``participants``
        self.participants: list[str] = []
        self.active: set[Upload] = set()

    def begin(self, site: str, share: float) -> Upload:
        if site in self.participants:
            raise ValueError(f"{site} already contributed to this round")
        upload = Upload(self, site, share)
        self.active.add(upload)
        return upload

    def abort_all(self) -> list[Upload]:
        """Takes every unfinished stream back out (when the round closes or fails under them)."""
        aborted = list(self.active)
        for upload in aborted:
            upload.abort()
        return aborted

    def result(self, round_number: int) -> Aggregate:
        """The round's global model; unfinished streams must have been aborted first."""
        if self.active:
            raise RuntimeError("streams still arriving; abort them before taking the result")
        if not self.participants:
            raise ValueError("no update was recorded in this round")
        total_share = math.fsum(self.shares)
        return Aggregate(
            round=round_number,
            encrypted_chunks=self.cipher_sum.chunks(),
            plaintext=self.plaintext_sum / total_share,
            total_share=total_share,
            participants=tuple(self.participants),
        )

    def digest(self) -> str:
        """A fingerprint of everything the round has accumulated, to check that a refusal changed nothing."""
        h = hashlib.sha256()
        try:
            for blob in self.cipher_sum.chunks():
                h.update(blob)
        except ValueError:  # some positions never added: only a fresh sum is incomplete outside an upload
            h.update(b"incomplete")
        h.update(self.plaintext_sum.tobytes())
        h.update(repr((self.total_share, self.participants)).encode())
        return h.hexdigest()
