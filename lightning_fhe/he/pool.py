"""Encryption and decryption on every core: SEAL holds the GIL, so threads would not help; processes do.

:class:`CipherPool` runs :class:`~lightning_fhe.he.codec.UpdateCipher`'s chunk work on worker processes, started
once (a site starts its pool when ``fit`` starts) and fed batches of chunks. Both directions are pipelined and
bounded: :meth:`CipherPool.iter_encrypt` yields upload chunks in order while later batches are still being
encrypted, so an upload that reads it overlaps encryption with the transfer; a :class:`StreamDecryption` takes
global chunks as a download delivers them and writes each chunk's values where they go. At most ``window`` batches
per worker are in flight, so memory stays a few batches whatever the model's size. With one worker everything runs
in the calling process, and nothing is started.

Workers are spawned, not forked: a process that runs gRPC's threads must not fork. A spawned process normally
imports the parent's ``__main__`` first (a training script: Lightning, torch, the data, some 400 MB and seconds per
worker); the workers need none of it, so they are started without it (:func:`_without_main_module`).

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

import multiprocessing
import os
import sys
from collections import deque
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from lightning_fhe.he.codec import CiphertextError, UpdateCipher, ValueSource, num_chunks
from lightning_fhe.he.context import HEContext

_worker_cipher: UpdateCipher | None = None


def _start_worker(context_bytes: bytes) -> None:
    global _worker_cipher
    import tenseal as ts

    _worker_cipher = UpdateCipher(HEContext(ts.context_from(context_bytes)))


def _encrypt_batch(prepared: np.ndarray) -> list[bytes]:
    assert _worker_cipher is not None
    n = _worker_cipher.params.values_per_ciphertext
    return [_worker_cipher.encrypt_chunk(prepared[i : i + n]) for i in range(0, prepared.size, n)]


def _decrypt_batch(frames: list[bytes], participants: int | None) -> list[np.ndarray | CiphertextError]:
    assert _worker_cipher is not None
    return _decrypt_frames(_worker_cipher, frames, participants)


def _decrypt_frames(
    cipher: UpdateCipher, frames: list[bytes], participants: int | None
) -> list[np.ndarray | CiphertextError]:
    """The decoded chunks; a bad one ends the list as its error, so the caller can name the chunk."""
    decoded: list[np.ndarray | CiphertextError] = []
    for frame in frames:
        try:
            decoded.append(cipher.decrypt_chunk(frame, participants))
        except CiphertextError as err:
            decoded.append(err)
            break
    return decoded


@contextmanager
def _without_main_module() -> Iterator[None]:
    """Hides ``__main__``'s name and file while processes are spawned, so they do not import it: multiprocessing
    reads ``__main__.__spec__`` and ``__main__.__file__`` to decide what a spawned child imports first."""
    main = sys.modules.get("__main__")
    spec, has_file, file = getattr(main, "__spec__", None), hasattr(main, "__file__"), getattr(main, "__file__", None)
    try:
        if main is not None:
            main.__spec__ = None
            if has_file:
                del main.__file__
        yield
    finally:
        if main is not None:
            main.__spec__ = spec
            if has_file:
                main.__file__ = file


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class CipherPool:
    """An :class:`UpdateCipher` whose chunks are encrypted and decrypted on ``workers`` processes.

    Args:
        context: the site's context, with the secret key (sent to the workers once, through a pipe).
        workers: processes; default: the cores this process may use. 1 runs everything in this process.
        batch: chunks per task (amortizes the pipe's cost, about 0.05 ms a chunk).
        window: batches in flight at most, per worker.
    """

    def __init__(self, context: HEContext, workers: int | None = None, batch: int = 8, window: int = 3) -> None:
        self.cipher = UpdateCipher(context)
        self.params = context.params
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if batch < 1 or window < 1:
            raise ValueError(f"batch and window must be at least 1, got {batch} and {window}")
        self.batch = batch
        self._in_flight = window * self.workers
        self._pool = None
        if self.workers > 1:
            spawn = multiprocessing.get_context("spawn")
            with _without_main_module():  # the processes start here, and take what to import from __main__ now
                self._pool = spawn.Pool(self.workers, _start_worker, (context.serialize(with_secret_key=True),))

    def iter_encrypt(
        self, values: np.ndarray | ValueSource, weight_fraction: float = 1.0, where: Callable[[int], str] | None = None
    ) -> Iterator[bytes]:
        """Upload chunks of ``values * weight_fraction`` on the grid, in order, as :meth:`UpdateCipher.iter_encrypt`.

        The checks (finite, headroom, share) run before the first chunk is yielded.
        """
        if self._pool is None:
            return self.cipher.iter_encrypt(values, weight_fraction, where)
        return self._ordered(_encrypt_batch, self.cipher.iter_prepared(values, weight_fraction, where, self.batch))

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

        decryption = self.decryption(count, total_weight_fraction, write)
        for frame in chunks:
            decryption.add(frame)
        decryption.finish()
        return out

    def _ordered(self, work, tasks: Iterable) -> Iterator:
        """Results of ``work`` over ``tasks`` in order, flattened, with at most ``window * workers`` in flight."""
        assert self._pool is not None
        pending: deque = deque()
        for task in tasks:
            pending.append(self._pool.apply_async(work, (task,)))
            if len(pending) >= self._in_flight:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> CipherPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamDecryption:
    """Decrypts global chunks as they are added and hands each chunk's averaged values to ``write(start, values)``,
    in order: a download feeds it while the rest is still in transit, and ``write`` puts the values where they go
    (a model's tensors), so no copy of the whole model is made. At most ``window * workers`` batches are pending.
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
        self._pending: deque = deque()
        self._added = self._written = 0

    def add(self, frame: bytes) -> None:
        if self._added >= self._expected:
            raise CiphertextError("index", f"{self._count} values need {self._expected} chunks, got more")
        self._added += 1
        self._batch.append(frame)
        if len(self._batch) >= (self._pool.batch if self._pool._pool is not None else 1):
            self._submit()

    def finish(self) -> None:
        """Waits for the last chunks; raises if fewer arrived than ``count`` values need."""
        if self._batch:
            self._submit()
        while self._pending:
            self._store(self._pending.popleft())
        if self._written != self._expected:
            raise CiphertextError("index", f"{self._count} values need {self._expected} chunks, got {self._written}")

    def _submit(self) -> None:
        batch, self._batch = self._batch, []
        if self._pool._pool is None:
            self._store(batch)
            return
        self._pending.append(self._pool._pool.apply_async(_decrypt_batch, (batch, self._participants)))
        if len(self._pending) >= self._pool._in_flight:
            self._store(self._pending.popleft())

    def _store(self, work) -> None:
        cipher, per_chunk = self._pool.cipher, self._pool.params.values_per_ciphertext
        decoded = _decrypt_frames(cipher, work, self._participants) if isinstance(work, list) else work.get()
        for values in decoded:
            if isinstance(values, CiphertextError):
                raise CiphertextError(values.reason, f"chunk {self._written}: {values}")
            start = self._written * per_chunk
            averaged = cipher.finish(values, self._share)[: max(0, min(per_chunk, self._count - start))]
            self._write(start, averaged)
            self._written += 1

