"""A site's update on its way to the server: checked against the round's shape, streamed as it is encrypted, and
kept until the round's global model arrives, to be sent again if the server restarted and lost it.

The kept ciphertext lives in an anonymous temporary file, not in memory: a site's memory then holds no second copy
of its update (about 1.9x the model's fp32 size), whatever the model's size; a resubmission reads it back."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from lightning_fhe.client.errors import FederationError
from lightning_fhe.client.retry import RetryLoop
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.update_shape import UpdateShape
from lightning_fhe.proto.wire import WIRE_DTYPES, plaintext_blocks

logger = logging.getLogger("lightning_fhe.client")  # the whole client logs under one name users configure

Progress = Callable[[int, int], None]
ChunkMask = Callable[[int, bytes], bytes]  # (chunk index, upload frame) -> the frame masked for one attempt


@dataclass(frozen=True)
class SubmitReceipt:
    round: int
    bytes_sent: int
    seconds: float


class KeptUpdate:
    """An update as sent: chunks are pulled from the caller's iterable once, as the first stream needs them, and
    appended to an anonymous temporary file, from which a resubmission reads them back.

    Build it with :meth:`for_round`, which checks the plaintext values against the round's shape; :meth:`close` it
    when it is no longer needed (the file goes with it).
    """

    def __init__(
        self, round_number: int, source: Iterator[bytes], expected_chunks: int, plaintext: np.ndarray, field: str
    ) -> None:
        self.round = round_number
        self.expected_chunks = expected_chunks
        self.plaintext = plaintext  # already in the dtype of ``field``, the PlaintextBlock field it travels in
        self.field = field
        self._source = source
        # Unnamed on disk (unlinked at once where the OS allows), gone when closed or when the process ends.
        self._file = tempfile.TemporaryFile(prefix="lightning_fhe-update-")
        self._spans: list[tuple[int, int]] = []  # (offset, length) of every chunk pulled so far, in the file
        self._stored = 0  # bytes in the file
        self._lock = threading.Lock()  # gRPC reads requests on its own thread; a retry may start a second reader
        self._closed = False
        self.source_error: BaseException | None = None

    @classmethod
    def for_round(cls, shape: UpdateShape, encrypted_chunks: Iterable[bytes], plaintext: np.ndarray) -> KeptUpdate:
        """The update for ``shape.round``; its chunks are counted as they are pulled.

        Raises:
            ValueError: ``plaintext`` does not hold the values the round takes.
        """
        values = np.ascontiguousarray(plaintext, dtype=WIRE_DTYPES[shape.plaintext_field]).reshape(-1)  # as it travels
        if values.size != shape.plaintext_count:
            raise ValueError(
                f"round {shape.round}: plaintext holds {values.size} values; expected {shape.plaintext_count} "
                f"{shape.plaintext_meaning}"
            )
        return cls(shape.round, iter(encrypted_chunks), shape.num_chunks, values, shape.plaintext_field)

    @property
    def ciphertext_bytes(self) -> int:
        """The encrypted chunks' bytes pulled so far (all of them once a stream went through)."""
        return self._stored

    @property
    def nbytes(self) -> int:
        return self._stored + self.plaintext.nbytes

    def close(self) -> None:
        """Drops the kept chunks; a stream still reading ends as if the source had failed."""
        with self._lock:
            self._closed = True
            self._file.close()

    def _chunk(self, index: int) -> bytes | None:
        with self._lock:
            if self._closed:
                self.source_error = self.source_error or RuntimeError(f"round {self.round}: the update was dropped")
                return None
            if index < len(self._spans):
                return _read_at(self._file.fileno(), *self._spans[index])
            if self.source_error is not None:
                return None
            try:
                blob = next(self._source)
                if index == self.expected_chunks - 1 and next(self._source, None) is not None:
                    raise ValueError(
                        f"encrypted_chunks yielded more than the {self.expected_chunks} chunks the encrypted layout "
                        "takes"
                    )
            except StopIteration:
                self.source_error = ValueError(
                    f"encrypted_chunks yielded {index} chunks; the encrypted layout takes {self.expected_chunks}"
                )
                return None
            except BaseException as err:  # the caller's encryption failed (e.g. headroom): end the stream, re-raise
                self.source_error = err
                return None
            blob = bytes(blob)
            _write_at(self._file.fileno(), blob, self._stored)
            self._spans.append((self._stored, len(blob)))
            self._stored += len(blob)
            return blob

    def messages(
        self, progress: Progress | None, attempt: int = 0, mask: ChunkMask | None = None
    ) -> Iterator[pb.UpdatePart]:
        """The update's stream; ``mask`` (masked rounds) masks each chunk for ``attempt`` as it goes out, so the
        kept chunks stay unmasked and a re-collection masks them anew."""
        yield pb.UpdatePart(
            header=pb.UpdateHeader(
                round=self.round, num_chunks=self.expected_chunks, plaintext_count=self.plaintext.size, attempt=attempt
            )
        )
        for offset, data in plaintext_blocks(self.plaintext, self.field):
            yield pb.UpdatePart(plaintext=pb.PlaintextBlock(offset=offset, **{self.field: data}))
        for index in range(self.expected_chunks):
            blob = self._chunk(index)
            if blob is None:
                return  # the server sees an incomplete stream and keeps nothing of it
            if mask is not None:
                blob = mask(index, blob)
            yield pb.UpdatePart(chunk=pb.Chunk(index=index, data=blob))
            if progress is not None:
                progress(index + 1, self.expected_chunks)


def send_update(
    submit: Callable[[Iterator[pb.UpdatePart]], pb.SubmitReply],
    retries: RetryLoop,
    kept: KeptUpdate,
    progress: Progress | None,
    resubmission: bool,
    attempt: int = 0,
    mask: ChunkMask | None = None,
) -> SubmitReceipt:
    """Streams ``kept`` through ``submit`` (the SubmitUpdate call), retried while the server is unavailable;
    masked by ``mask`` for ``attempt`` in masked rounds.

    Raises:
        RoundClosedError, FederationError: refused; or the error the caller's ``encrypted_chunks`` raised.
    """
    started, attempts = time.monotonic(), 0

    def send_once() -> pb.SubmitReply:
        nonlocal attempts
        attempts += 1
        return submit(kept.messages(progress, attempt, mask))

    try:
        retries.run(f"submit round {kept.round}", send_once)
    except FederationError as err:
        if kept.source_error is not None:
            raise kept.source_error from err
        if err.code == grpc.StatusCode.ALREADY_EXISTS and (attempts > 1 or resubmission):
            # An earlier attempt got through and only its reply was lost: the update is recorded.
            logger.info("round %d: the server already has this site's update", kept.round)
        else:
            raise
    return SubmitReceipt(kept.round, kept.nbytes, time.monotonic() - started)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_at(fd: int, offset: int, length: int) -> bytes:
    parts = []
    while length:
        part = os.pread(fd, length, offset)
        if not part:
            raise OSError(f"the kept update's file ended {length} bytes early")
        parts.append(part)
        offset, length = offset + len(part), length - len(part)
    return b"".join(parts) if len(parts) != 1 else parts[0]
