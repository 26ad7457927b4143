"""Encryption and decryption on every core: SEAL holds the GIL, so threads would not help; processes do.

:class:`CipherPool` runs :class:`~lightning_fhe.he.codec.UpdateCipher`'s chunk work on worker processes, started
once (a site starts its pool when ``fit`` starts) and fed batches of chunks. Both directions are pipelined and
bounded: :meth:`CipherPool.iter_encrypt` yields upload chunks in order while later batches are still being
encrypted, so an upload that reads it overlaps encryption with the transfer; :meth:`CipherPool.iter_decrypt` takes
global chunks as a download yields them. At most ``window`` batches are in flight, so memory stays a few batches
whatever the model's size. With one worker everything runs in the calling process, and nothing is started.

Workers are spawned, not forked: a process that runs gRPC's threads must not fork.

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
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from lightning_fhe.he.codec import CiphertextError, UpdateCipher, num_chunks
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


def _decrypt_batch(frames: list[bytes]) -> list[np.ndarray]:
    assert _worker_cipher is not None
    return [_worker_cipher.decrypt_chunk(frame) for frame in frames]


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
            self._pool = spawn.Pool(self.workers, _start_worker, (context.serialize(with_secret_key=True),))

    def iter_encrypt(
        self, values: np.ndarray, weight_fraction: float = 1.0, where: Callable[[int], str] | None = None
    ) -> Iterator[bytes]:
        """Upload chunks of ``values * weight_fraction`` on the grid, in order, as :meth:`UpdateCipher.iter_encrypt`.

        The checks (finite, headroom, share) run before the first chunk is yielded.
        """
        prepared = self.cipher.prepare(values, weight_fraction, where)
        if self._pool is None:
            return (self.cipher.encrypt_chunk(piece) for piece in self._pieces(prepared, 1))
        return self._ordered(_encrypt_batch, self._pieces(prepared, self.batch))

    def iter_decrypt(self, frames: Iterable[bytes]) -> Iterator[np.ndarray]:
        """The ``N`` decoded values of each global chunk, in order, as ``frames`` arrive."""
        if self._pool is None:
            decoded = (self.cipher.decrypt_chunk(frame) for frame in frames)
        else:
            decoded = self._ordered(_decrypt_batch, _batched(frames, self.batch))
        index = 0
        try:
            for values in decoded:
                yield values
                index += 1
        except CiphertextError as err:
            raise CiphertextError(err.reason, f"chunk {index}: {err}") from None

    def decrypt(self, chunks: Iterable[bytes], count: int, total_weight_fraction: float = 1.0) -> np.ndarray:
        """As :meth:`UpdateCipher.decrypt`: the averaged ``count`` values, on the grid."""
        expected = num_chunks(count, self.params)
        per_chunk = self.params.values_per_ciphertext
        out = np.empty(expected * per_chunk, dtype=np.float64)
        received = 0
        for i, decoded in enumerate(self.iter_decrypt(chunks)):
            if i >= expected:
                raise CiphertextError("index", f"{count} values need {expected} chunks, got more")
            out[i * per_chunk : (i + 1) * per_chunk] = decoded
            received = i + 1
        if received != expected:
            raise CiphertextError("index", f"{count} values need {expected} chunks, got {received}")
        return self.cipher.finish(out, total_weight_fraction)[:count]

    def _pieces(self, prepared: np.ndarray, chunks_per_piece: int) -> Iterator[np.ndarray]:
        step = chunks_per_piece * self.params.values_per_ciphertext
        for start in range(0, prepared.size, step):
            yield prepared[start : start + step]

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


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
