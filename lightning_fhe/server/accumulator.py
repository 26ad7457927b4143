"""One round's running sum, fed chunk by chunk as updates arrive; it lives on disk, so any model size fits.

Protocol v2: an upload chunk is a ciphertext's first polynomial and the seed of its second
(:mod:`lightning_fhe.he.frames`). The server checks it (size, format, checksum, every coefficient below the first
prime ``q0``), adds the first polynomial to the round's sum modulo ``q0`` with numpy, and keeps the seed: no SEAL,
no key. The sum, each stream's undo record and each participant's seeds are rows of scratch files in ``state_dir``
(:mod:`lightning_fhe.scratch`), so the server's memory stays a few chunks whatever the model's size. A stream
that breaks midway is taken back out by modular subtraction, which is exact: the sum ends bit for bit as if the
stream had never been sent.

At the close, each global chunk carries the summed first polynomial and either the participants' seeds, from
which every site rebuilds the sum's second polynomial, or (past ``seeds_up_to`` participants, when rebuilding would
cost the sites more than the bytes it saves) that second polynomial summed by the server.

Plaintext tensors (those a site sends unencrypted) are staged per stream and added, times the site's share, at
commit: floating-point sums do not subtract back exactly. Weighted plaintext values are rounded to the same
fixed-point grid as encrypted ones (:mod:`lightning_fhe.he.fixed_point`), so both parts of the global model are the
exact, order-independent sums the sites would get without encryption.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_fhe.he.context import HEContext
from lightning_fhe.he.fixed_point import round_to_grid
from lightning_fhe.he.frames import (
    SEED_ENTRY_BYTES,
    CiphertextError,
    add_upload_chunk,
    encode_global_chunk,
    upload_chunk_bytes,
    upload_seed_entry,
)
from lightning_fhe.he.seeded import CiphertextLayout
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.scratch import ScratchFile, ScratchRows

_U64 = np.dtype("<u8")
# Participants up to which a global chunk carries the seeds rather than the summed second polynomial (server option).
DEFAULT_SEEDS_UP_TO = 16

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
        encrypted_chunks: the global chunks (:mod:`lightning_fhe.he.frames`) of the participants' encrypted,
            share-weighted updates: a list, or the accumulator's lazy :class:`GlobalChunks`.
        plaintext: float64; the weighted average of the plaintext parts (already divided by ``total_share``): an
            array, or the accumulator's :class:`PlaintextAverage`, read from disk block by block.
        total_share: the participants' summed shares; sites divide the decrypted sum by it.
        participants: the sites whose update is in the sum.
    """

    round: int
    encrypted_chunks: Sequence[bytes]
    plaintext: np.ndarray | PlaintextAverage
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
        self._plaintext = accumulator.plaintext_scratch()  # staged as float64, weighted and summed at commit
        self._plaintext_filled = 0
        self._added = 0  # chunks of this stream already in the round's sum
        # This stream's chunks as received, to take back out on abort, and its seeds, kept once it commits.
        self._undo = accumulator.scratch(upload_chunk_bytes(accumulator.layout.n))
        self.seeds = accumulator.scratch(SEED_ENTRY_BYTES)
        self.bytes_received = 0
        self.state = "open"  # open -> committed | aborted

    @property
    def chunks_received(self) -> int:
        return self._added

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
        self._plaintext.write(8 * offset, values.astype(_FLOAT64, copy=False).tobytes())
        self._plaintext_filled = end
        self.bytes_received += len(data)

    def add_chunk(self, index: int, blob: bytes) -> None:
        """Adds ciphertext chunk ``index`` to the round's sum; a bad chunk is refused and changes nothing."""
        self._require_open()
        accumulator = self._accumulator
        expected = self._added
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
            seed_entry = upload_seed_entry(blob, accumulator.layout.n)
            self._undo.write(index, blob)
            self.seeds.write(index, seed_entry)
            accumulator.add_to_sum(index, blob)  # checks the rest of the chunk, and changes nothing if it is bad
        except CiphertextError as err:
            raise _bad(Reason.BAD_CHUNK, f"chunk {index}: {err}") from None
        self._added += 1
        self.bytes_received += len(blob)

    def missing(self) -> str | None:
        """What is still missing for this update to be complete, or None."""
        accumulator = self._accumulator
        if self._plaintext_filled != accumulator.plaintext_count:
            return f"{self._plaintext_filled} of {accumulator.plaintext_count} plaintext values"
        if self._added != accumulator.num_chunks:
            return f"{self._added} of {accumulator.num_chunks} chunks"
        return None

    def commit(self) -> None:
        """Makes the update part of the round: its plaintext part, weighted, joins the plaintext sum."""
        self._require_open()
        missing = self.missing()
        if missing:
            raise _bad(Reason.INCOMPLETE, f"the update stream ended after {missing}; nothing of it was kept")
        accumulator = self._accumulator
        for start, block in _blocks(self._plaintext, accumulator.plaintext_count):
            weighted = self.share * block
            if accumulator.grid_bits is not None:
                round_to_grid(weighted, accumulator.grid_bits)
            accumulator.add_plaintext(start, weighted)
        accumulator.shares.append(self.share)
        # Exact and so independent of arrival order: a running sum of floats is not.
        accumulator.total_share = math.fsum(accumulator.shares)
        accumulator.participants.append(self.site)
        accumulator.seeds.append(self.seeds)
        accumulator.active.discard(self)
        self._undo.close()
        self._plaintext.close()
        self.state = "committed"

    def abort(self) -> None:
        """Takes this stream's chunks back out of the sum; idempotent."""
        if self.state != "open":
            return
        accumulator = self._accumulator
        accumulator.active.discard(self)
        for index in reversed(range(self._added)):
            accumulator.subtract_from_sum(index, self._undo.read(index))
        self._added = 0
        self._undo.close()
        self.seeds.close()
        self._plaintext.close()
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
        scratch_dir: where the sum and the seeds live while the round is open (the server's ``state_dir``).
        seeds_up_to: global chunks carry the participants' seeds up to this many participants, else the summed
            second polynomial.
    """

    def __init__(
        self,
        context: HEContext,
        num_chunks: int,
        plaintext_count: int,
        describe_plaintext: Callable[[int], str] = lambda i: f"value {i}",
        on_grid: bool = True,
        scratch_dir: str | os.PathLike | None = None,
        seeds_up_to: int = DEFAULT_SEEDS_UP_TO,
    ) -> None:
        self.context = context
        self.layout = CiphertextLayout(context)
        self.num_chunks = num_chunks
        self.plaintext_count = plaintext_count
        self.describe_plaintext = describe_plaintext
        self.grid_bits = context.params.grid_bits if on_grid else None
        self.plaintext_limit = plaintext_limit(self.grid_bits)
        self.scratch_dir = scratch_dir if scratch_dir is not None else tempfile.gettempdir()
        self.seeds_up_to = seeds_up_to
        self._sum = self.scratch(8 * self.layout.n)
        self._plaintext_sum = self.plaintext_scratch()
        self.total_share = 0.0
        self.shares: list[float] = []  # in the order of ``participants``
        self.participants: list[str] = []
        self.seeds: list[ScratchRows] = []  # each participant's seed entries, in the order of ``participants``
        self.active: set[Upload] = set()

    def scratch(self, row_bytes: int) -> ScratchRows:
        """Rows for each of the round's chunks, on disk."""
        return ScratchRows(self.scratch_dir, self.num_chunks, row_bytes)

    def plaintext_scratch(self) -> ScratchFile:
        """Room for one float64 per plaintext value, on disk."""
        return ScratchFile(self.scratch_dir, 8 * self.plaintext_count)

    def add_plaintext(self, start: int, weighted: np.ndarray) -> None:
        total = np.frombuffer(self._plaintext_sum.read(8 * start, weighted.nbytes), dtype=_FLOAT64) + weighted
        self._plaintext_sum.write(8 * start, total.tobytes())

    def add_to_sum(self, index: int, frame: bytes, subtract: bool = False) -> None:
        row = bytearray(self._sum.read(index))
        add_upload_chunk(np.frombuffer(row, dtype=_U64), frame, self.layout.n, self.layout.q0, subtract)
        self._sum.write(index, row)

    def subtract_from_sum(self, index: int, frame: bytes) -> None:
        self.add_to_sum(index, frame, subtract=True)

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
        """The round's global model; unfinished streams must have been aborted first. Its chunks are read from the
        scratch files as they are written out: :meth:`close` only after that."""
        if self.active:
            raise RuntimeError("streams still arriving; abort them before taking the result")
        if not self.participants:
            raise ValueError("no update was recorded in this round")
        total_share = math.fsum(self.shares)
        return Aggregate(
            round=round_number,
            encrypted_chunks=GlobalChunks(self),
            plaintext=PlaintextAverage(self._plaintext_sum, self.plaintext_count, total_share),
            total_share=total_share,
            participants=tuple(self.participants),
        )

    def global_chunk(self, index: int) -> bytes:
        c0 = np.frombuffer(self._sum.read(index), dtype=_U64)
        entries = [seeds.read(index) for seeds in self.seeds]
        if len(entries) <= self.seeds_up_to:
            return encode_global_chunk(c0, entries)
        return encode_global_chunk(c0, c1=self.layout.second_polynomial([(e[0], e[1:]) for e in entries]))

    def close(self) -> None:
        """Releases the scratch files (the round is written out, or failed)."""
        self.abort_all()
        for scratch in (self._sum, self._plaintext_sum, *self.seeds):
            scratch.close()

    def digest(self) -> str:
        """A fingerprint of everything the round has accumulated, to check that a refusal changed nothing."""
        h = hashlib.sha256()
        for index in range(self.num_chunks):
            h.update(self._sum.read(index))
            for seeds in self.seeds:
                h.update(seeds.read(index))
        for _, block in _blocks(self._plaintext_sum, self.plaintext_count):
            h.update(block.tobytes())
        h.update(repr((self.total_share, self.participants)).encode())
        return h.hexdigest()


class GlobalChunks(Sequence[bytes]):
    """A closed round's global chunks, made from the scratch files one at a time as they are read."""

    def __init__(self, accumulator: RoundAccumulator) -> None:
        self._accumulator = accumulator

    def __len__(self) -> int:
        return self._accumulator.num_chunks

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._accumulator.global_chunk(index)

    def __iter__(self) -> Iterator[bytes]:
        return (self._accumulator.global_chunk(i) for i in range(len(self)))


class PlaintextAverage:
    """A closed round's plaintext average, read from the scratch file and divided block by block as it is written
    out; ``np.asarray`` gives it whole (tests)."""

    def __init__(self, total: ScratchFile, count: int, total_share: float) -> None:
        self._total, self.size, self.total_share = total, count, total_share

    def blocks(self) -> Iterator[np.ndarray]:
        for _, block in _blocks(self._total, self.size):
            yield block / self.total_share

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate([np.zeros(0), *self.blocks()])
        return whole if dtype is None else whole.astype(dtype)


def _blocks(scratch: ScratchFile, count: int, block: int = 1 << 16) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, float64 values)`` of the first ``count`` values in ``scratch``, ``block`` at a time."""
    for start in range(0, count, block):
        n = min(block, count - start)
        yield start, np.frombuffer(scratch.read(8 * start, 8 * n), dtype=_FLOAT64).copy()
