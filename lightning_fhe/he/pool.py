"""Encryption and decryption on every core, in processes: threads scale poorly, because the Python and numpy steps
between the kernels that release the GIL (ours in C, numpy's FFT) hold it (two threads decrypted a chunk stream 1.05x
to 1.5x as fast as one, and encrypted it 1.5x to 2.0x, on 2 cores).

:class:`CipherPool` runs :class:`~lightning_fhe.he.codec.UpdateCipher`'s chunk work on worker processes, started
once (a site starts its pool when ``fit`` starts) and fed batches of chunks. Both directions are pipelined and
bounded: :meth:`CipherPool.iter_encrypt` yields upload chunks in order while later batches are still being
encrypted, so an upload that reads it overlaps encryption with the transfer; a :class:`StreamDecryption` takes
global chunks as a download delivers them and writes each batch's values where they go. At most ``window`` batches
per worker are in flight, so memory stays a few batches whatever the model's size. The chunks themselves cross
between the site and its workers through a shared-memory block per upload or download (a slot per batch in
flight), which the next one of the same kind reuses; only the tasks go through pipes. With one worker everything
runs in the calling process, and nothing is started. A worker that dies (killed; out of memory, for one) fails the
upload or download it served with :class:`CipherWorkerError` rather than leaving it waiting, and new workers take
over; workers end with the site's process, however it ends. The workers and their pipes are
:mod:`~lightning_fhe.he.workers`'s.

Example::

    >>> import numpy as np
    >>> from lightning_fhe.he import CKKSParams, HEContext
    >>> from lightning_fhe.he.codec import ChunkSum
    >>> context = HEContext.generate(CKKSParams())
    >>> with CipherPool(context, workers=1) as pool:
    ...     total = ChunkSum.for_context(context, 1)
    ...     total.add(0, next(pool.iter_encrypt(np.array([0.5, -2.0]), 1.0)))
    ...     np.round(pool.decrypt(total.chunks(), count=2, total_weight_fraction=1.0), 6)
    array([ 0.5, -2. ])
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from lightning_fhe.he.codec import CiphertextError, UpdateCipher, ValueSource, check_weight_fraction, num_chunks
from lightning_fhe.he.context import HEContext
from lightning_fhe.he.frames import global_chunk_bytes, upload_chunk_bytes
from lightning_fhe.he.workers import Ticket, WorkerDied, WorkerProcesses

_worker_cipher: UpdateCipher | None = None
_worker_blocks: dict[str, shared_memory.SharedMemory] = {}  # attached, the most recently used last
_ATTACHED = 2  # an upload's block and a download's: the site reuses them operation after operation
DEFAULT_BATCH = 16  # chunks per task


def _start_worker(context_bytes: bytes) -> None:
    global _worker_cipher
    import tenseal as ts

    _worker_cipher = UpdateCipher(HEContext(ts.context_from(context_bytes)))


def _attached(name: str) -> memoryview:
    """The buffer of the site's block ``name``, attached the first time a task names it and kept attached while it
    is one of the last two used (the site reuses its blocks; a block it retired is detached when two others have
    been used since). Spawned workers share the site's resource tracker, so attaching registers nothing new and only
    the site unlinks a block."""
    block = _worker_blocks.pop(name, None)
    if block is None:
        block = shared_memory.SharedMemory(name=name)
        while len(_worker_blocks) >= _ATTACHED:
            _worker_blocks.pop(next(iter(_worker_blocks))).close()
    _worker_blocks[name] = block
    return block.buf


def _floats(buffer: memoryview, offset: int, count: int) -> np.ndarray:
    """``count`` float64 values in ``buffer`` at ``offset``, without a copy."""
    return np.ndarray((count,), dtype=np.float64, buffer=buffer, offset=offset)


def _encrypt_batch(block: str, slot: _Slot, size: int, weight_fraction: float) -> int:
    """Weights the ``size`` values in ``slot``'s input cells and puts them on the grid (:meth:`UpdateCipher.prepare`:
    here, not in the site's process, which the pool's speed-up hinges on), then encrypts them into its output cells.
    Returns the number of chunks."""
    assert _worker_cipher is not None
    buffer, n = _attached(block), _worker_cipher.params.values_per_ciphertext
    count = num_chunks(size, _worker_cipher.params)
    values = _floats(buffer, slot.inputs, count * n)
    _worker_cipher.prepare(values[:size], weight_fraction, out=values)
    for i in range(count):
        start = slot.outputs + i * slot.output_bytes
        _worker_cipher.encrypt_chunk_into(values[i * n : (i + 1) * n], buffer[start : start + slot.output_bytes])
    return count


def _decrypt_batch(
    block: str, slot: _Slot, sizes: list[int], participants: int | None, share: float
) -> tuple[int, CiphertextError] | None:
    """Decrypts the global chunks in ``slot``'s input cells (``sizes``: their bytes) into its output cells, averaged
    (:meth:`UpdateCipher.finish`: here, not in the site's process, which the pool's speed-up hinges on). A bad
    chunk stops the batch and comes back with its place in the batch; the cells before it hold their values."""
    assert _worker_cipher is not None
    buffer, n = _attached(block), _worker_cipher.params.values_per_ciphertext
    for i, size in enumerate(sizes):
        start = slot.inputs + i * slot.input_bytes
        try:
            values = _worker_cipher.decrypt_chunk(buffer[start : start + size], participants)
        except CiphertextError as err:
            return i, err
        _floats(buffer, slot.outputs + i * slot.output_bytes, n)[:] = _worker_cipher.finish(values, share)
    return None


def _decrypt_frames(
    cipher: UpdateCipher, frames: list[bytes], participants: int | None, share: float
) -> tuple[np.ndarray, CiphertextError | None]:
    """The averaged chunks, one row each, up to a bad one, which comes back as the error, so the caller can name
    the chunk."""
    out = np.empty((len(frames), cipher.params.values_per_ciphertext))
    for i, frame in enumerate(frames):
        try:
            out[i] = cipher.finish(cipher.decrypt_chunk(frame, participants), share)
        except CiphertextError as err:
            return out[:i], err
    return out, None


@dataclass(frozen=True)
class _Slot:
    """Where one batch's cells lie in a block: ``batch`` input cells of ``input_bytes``, then as many outputs."""

    inputs: int
    input_bytes: int
    outputs: int
    output_bytes: int


class _Block:
    """One operation's shared memory: a ring of slots, one per batch in flight, each with a cell per chunk for what
    goes to a worker and what comes back. Chunks cross between processes by one copy each way, not pickled through
    pipes: with pipes, bench codec measured 2 workers decrypting 1.0x to 1.7x as fast as 1 on 2 cores; through
    shared memory, 1.5x to 2.5x."""

    def __init__(self, slots: int, batch: int, input_bytes: int, output_bytes: int) -> None:
        self._slot_bytes = batch * (input_bytes + output_bytes)
        self.slots, self.batch, self.input_bytes = slots, batch, input_bytes
        self._output_bytes = output_bytes
        self.shape = (slots, batch, input_bytes, output_bytes)
        self._memory = shared_memory.SharedMemory(create=True, size=slots * self._slot_bytes)
        self.name = self._memory.name
        self.buffer = self._memory.buf

    def slot(self, k: int) -> _Slot:
        inputs = (k % self.slots) * self._slot_bytes
        outputs = inputs + self.batch * self.input_bytes
        return _Slot(inputs, self.input_bytes, outputs, self._output_bytes)

    def close(self) -> None:
        if self._memory is not None:
            self.buffer.release()
            self._memory.close()
            self._memory.unlink()
            self._memory = None


def default_workers(chunks: int | None = None, batch: int = DEFAULT_BATCH) -> int:
    """The cores this process may run on, and no more than there are tasks: ``chunks`` (an update's, if known) in
    tasks of ``batch``. A worker with no task to do would only cost its start (a process, about 0.4 CPU-seconds) and
    its memory: a small model, or an update sent in plaintext, is encrypted and decrypted in the calling process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if chunks is None:
        return cores
    return max(1, min(cores, -(-chunks // batch)))


class CipherWorkerError(RuntimeError):
    """A worker process died (killed; out of memory, for one) while it held chunks: the upload or download it was
    serving cannot finish. The pool starts new workers for the next one."""


class CipherPool:
    """An :class:`UpdateCipher` whose chunks are encrypted and decrypted on ``workers`` processes.

    Args:
        context: the site's context, with the secret key (sent to the workers once, through a pipe).
        workers: processes; default: the cores this process may use. 1 runs everything in this process.
        batch: chunks per task (amortizes a task's round trip).
        window: batches in flight at most, per worker.
    """

    def __init__(
        self, context: HEContext, workers: int | None = None, batch: int = DEFAULT_BATCH, window: int = 3
    ) -> None:
        self.cipher = UpdateCipher(context)
        self.params = context.params
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if batch < 1 or window < 1:
            raise ValueError(f"batch and window must be at least 1, got {batch} and {window}")
        self.batch = batch
        self._in_flight = window * self.workers
        self._pool: WorkerProcesses | None = None
        self._blocks: set[_Block] = set()  # the operations' shared memory not yet given back, closed with the pool
        # A finished operation's block, by shape, for the next one: fresh pages would cost the site's process and
        # every worker a page fault each, about a tenth of the site's own work in an upload.
        self._spare: dict[tuple[int, int, int, int], _Block] = {}
        self._spare_lock = threading.Lock()  # a download's decryption and an upload may run on different threads
        if self.workers > 1:
            self._context_bytes = context.serialize(with_secret_key=True)
            self._start()

    def _start(self) -> None:
        """Starts the workers (:mod:`~lightning_fhe.he.workers`: not ``multiprocessing.Pool``, which waits forever
        for the tasks of a worker that died, and replaces it behind our back by a process importing ``__main__``)."""
        try:
            self._pool = WorkerProcesses(self.workers, _start_worker, (self._context_bytes,))
        except WorkerDied:  # not _result's restart: workers that cannot start would be started forever
            self._pool = None
            raise CipherWorkerError("the cipher worker processes could not start; their error is above") from None

    def _submit(self, work: Callable, *args) -> Ticket:
        assert self._pool is not None
        try:
            return self._pool.submit(work, *args)
        except WorkerDied:
            raise self._restarted() from None

    def _result(self, ticket: Ticket):
        """A task's result; a dead worker raises :class:`CipherWorkerError`, after new workers have started."""
        try:
            return ticket.result()
        except WorkerDied:
            raise self._restarted() from None

    def _restarted(self) -> CipherWorkerError:
        assert self._pool is not None
        self._pool.close()
        self._start()
        return CipherWorkerError(
            "a cipher worker process died while it held chunks (killed, or out of memory?): this upload or download "
            "cannot finish; new workers were started for the next one"
        )

    def iter_encrypt(
        self,
        values: np.ndarray | ValueSource,
        weight_fraction: float = 1.0,
        where: Callable[[int], str] | None = None,
    ) -> Iterator[bytes]:
        """Upload chunks of ``values * weight_fraction`` on the grid, in order, as :meth:`UpdateCipher.iter_encrypt`.

        The checks (finite, headroom, share) run before the first chunk is yielded.
        """
        if self._pool is None:
            return self.cipher.iter_encrypt(values, weight_fraction, where)
        check_weight_fraction(weight_fraction)
        return self._encrypted(self.cipher.iter_checked(values, where, self.batch), weight_fraction)

    def decryption(
        self,
        count: int,
        total_weight_fraction: float,
        write: Callable[[int, np.ndarray], None],
        participants: int | None = None,
    ) -> StreamDecryption:
        """A decryption fed global chunks one by one as a download delivers them; see :class:`StreamDecryption`.

        ``participants``: the sites the download's header names; a chunk that lists another number of seeds is
        refused (None: as many as it lists)."""
        return StreamDecryption(self, count, total_weight_fraction, write, participants)

    def decrypt(self, chunks: Iterable[bytes], count: int, total_weight_fraction: float = 1.0) -> np.ndarray:
        """As :meth:`UpdateCipher.decrypt`: the averaged ``count`` values, on the grid."""
        out = np.empty(count, dtype=np.float64)

        def write(start: int, values: np.ndarray) -> None:
            out[start : start + values.size] = values

        self.decrypt_into(chunks, count, total_weight_fraction, write)
        return out

    def decrypt_into(
        self,
        chunks: Iterable[bytes],
        count: int,
        total_weight_fraction: float,
        write: Callable[[int, np.ndarray], None],
    ) -> None:
        """Decrypts all of ``chunks`` through a :meth:`decryption` that hands the averages to ``write``."""
        decryption = self.decryption(count, total_weight_fraction, write)
        try:
            for frame in chunks:
                decryption.add(frame)
            decryption.finish()
        finally:
            decryption.close()

    def _encrypted(self, pieces: Iterator[np.ndarray], weight_fraction: float) -> Iterator[bytes]:
        """Upload chunks of the checked ``pieces`` (a batch each) weighted by ``weight_fraction``, in order, at most
        ``window * workers`` batches in flight. The block goes back when the last chunk is out, or when the upload
        stops reading."""
        n = self.params.values_per_ciphertext
        frame_bytes = upload_chunk_bytes(n)
        block = self._block(self.batch, 8 * n, frame_bytes)
        pending: deque = deque()

        def collected() -> Iterator[bytes]:
            slot, result = pending.popleft()
            for i in range(self._result(result)):
                start = slot.outputs + i * frame_bytes
                yield bytes(block.buffer[start : start + frame_bytes])

        try:
            for k, piece in enumerate(pieces):
                if len(pending) == block.slots:  # its slot's last batch must be out before this one goes in
                    yield from collected()
                slot = block.slot(k)
                _floats(block.buffer, slot.inputs, piece.size)[:] = piece
                pending.append((slot, self._submit(_encrypt_batch, block.name, slot, piece.size, weight_fraction)))
            while pending:
                yield from collected()
        finally:
            for _, ticket in pending:  # an upload that stopped reading
                ticket.forget()
            self._give_back(block, settled=not pending)

    def _block(self, batch: int, input_bytes: int, output_bytes: int) -> _Block:
        with self._spare_lock:
            block = self._spare.pop((self._in_flight, batch, input_bytes, output_bytes), None)
        block = block or _Block(self._in_flight, batch, input_bytes, output_bytes)
        self._blocks.add(block)
        return block

    def _give_back(self, block: _Block, settled: bool = False) -> None:
        """``settled``: no task of the operation is pending, so no worker writes into the block any more and the
        next operation of its shape may reuse it; otherwise it is retired."""
        self._blocks.discard(block)
        with self._spare_lock:
            if settled and self._pool is not None and block.shape not in self._spare:
                self._spare[block.shape] = block
                return
        block.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()  # a batch at most still running on each worker
            self._pool = None
        with self._spare_lock:
            spare, self._spare = list(self._spare.values()), {}
        for block in list(self._blocks) + spare:
            self._blocks.discard(block)
            block.close()

    def __enter__(self) -> CipherPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamDecryption:
    """Decrypts global chunks as they are added and hands their averaged values to ``write(start, values)``, a batch
    of chunks at a time, in order: a download feeds it while the rest is still in transit, and ``write`` puts the
    values where they go (a model's tensors), so no copy of the whole model is made. ``values`` is valid only
    during the call (with workers, a view of shared memory that the next batch reuses): ``write`` copies what it
    keeps. At most ``window * workers`` batches are pending.

    :meth:`finish` gives its shared memory back, and so does any error it raises; a download that stops midway
    calls :meth:`close`.
    """

    def __init__(
        self,
        pool: CipherPool,
        count: int,
        total_weight_fraction: float,
        write: Callable[[int, np.ndarray], None],
        participants: int | None = None,
    ) -> None:
        if not total_weight_fraction > 0:
            raise ValueError(f"total_weight_fraction must be positive, got {total_weight_fraction}")
        self._pool, self._count, self._share, self._write = pool, count, total_weight_fraction, write
        self._participants = participants
        self._expected = num_chunks(count, pool.params)
        self._batch: list[bytes] = []
        self._pending: deque = deque()  # a batch's frames to decrypt here, or a worker's (slot, size, ticket)
        self._block: _Block | None = None
        self._submitted = self._added = self._written = 0

    def add(self, frame: bytes) -> None:
        if self._added >= self._expected:
            self.close()
            raise CiphertextError("index", f"{self._count} values need {self._expected} chunks, got more")
        self._batch.append(frame)
        self._added += 1
        if len(self._batch) >= self._pool.batch:
            self._closing_on_error(self._submit)

    def finish(self) -> None:
        """Waits for the last chunks; raises if fewer arrived than ``count`` values need."""
        try:
            if self._batch:
                self._submit()
            while self._pending:
                self._store(self._pending.popleft())
        finally:
            self.close()
        if self._written != self._expected:
            raise CiphertextError("index", f"{self._count} values need {self._expected} chunks, got {self._written}")

    def close(self) -> None:
        """Gives the shared memory back; chunks still pending are dropped."""
        if self._block is not None:
            for work in self._pending:
                if not isinstance(work, list):  # a worker's batch
                    _, _, ticket = work
                    ticket.forget()
            self._pool._give_back(self._block, settled=not self._pending)
            self._block = None

    def _closing_on_error(self, step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException:
            self.close()
            raise

    def _submit(self) -> None:
        batch, self._batch = self._batch, []
        if self._pool._pool is None:
            self._store(batch)
            return
        sizes = [len(frame) for frame in batch]
        largest = max(sizes)
        if self._block is None:
            # Every chunk of one sum has the same size; the block holds it, or the summed form if that is larger.
            n = self._pool.params.values_per_ciphertext
            cell = max(largest, global_chunk_bytes(n, 0, summed=True))
            self._block = self._pool._block(self._pool.batch, cell, 8 * n)
        if len(self._pending) == self._block.slots:  # its slot's last batch must be out before this one goes in
            self._store(self._pending.popleft())
        if largest > self._block.input_bytes:  # not one of this sum's chunks: refused here, in order
            self._pending.append(batch)
            return
        slot = self._block.slot(self._submitted)
        self._submitted += 1
        for i, frame in enumerate(batch):
            start = slot.inputs + i * slot.input_bytes
            self._block.buffer[start : start + len(frame)] = frame
        task = self._pool._submit(_decrypt_batch, self._block.name, slot, sizes, self._participants, self._share)
        self._pending.append((slot, len(batch), task))

    def _store(self, work) -> None:
        """Hands a batch's values to ``write`` in one call (once per chunk cost the site's process three times as
        much: a model's tensors are many)."""
        if isinstance(work, list):  # decrypted here: no pool, or chunks that are not of this sum's size
            decoded, failure = _decrypt_frames(self._pool.cipher, work, self._participants, self._share)
        else:
            decoded, failure = self._collected(*work)
        start = self._written * self._pool.params.values_per_ciphertext
        values = decoded.reshape(-1)[: max(0, self._count - start)]
        if values.size:
            self._write(start, values)
        self._written += len(decoded)
        if failure is not None:
            raise CiphertextError(failure.reason, f"chunk {self._written}: {failure}")

    def _collected(self, slot: _Slot, size: int, result) -> tuple[np.ndarray, CiphertextError | None]:
        """A worker's batch: a view of its output cells, a row per chunk (valid until the slot's next batch), up to
        a chunk that failed, and that chunk's error."""
        assert self._block is not None
        failure = self._pool._result(result)
        good = size if failure is None else failure[0]
        n = self._pool.params.values_per_ciphertext
        decoded = _floats(self._block.buffer, slot.outputs, good * n).reshape(good, n)
        return decoded, None if failure is None else failure[1]
