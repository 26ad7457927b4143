"""A round's global model as a site receives it: the header, the summed ciphertext chunks in order, then the
plaintext values, checked for order and completeness as they arrive.

The chunks go to a :class:`ChunkConsumer` as they arrive when the site gives one (its decryption, so that the
download and the decryption overlap and no list of ciphertexts is kept), or into a list otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lightning_fhe.client.errors import FederationError
from lightning_fhe.client.upload import Progress
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.wire import block_payload


class ChunkConsumer(Protocol):
    """Takes a global model's encrypted chunks one by one, in order, as the download delivers them."""

    def add(self, frame: bytes) -> None: ...

    def finish(self) -> None:
        """All chunks were added (called once, when the stream is complete)."""
        ...

    def close(self) -> None:
        """Gives back what the consumer holds; called last, whether the download completed or broke off."""
        ...


@dataclass(frozen=True)
class IncomingGlobalModel:
    """What a download announces before its first chunk: enough to set up the chunks' consumer."""

    round: int
    num_chunks: int
    total_share: float  # sum of participants' shares (1.0 for round 0)
    participants: tuple[str, ...]


@dataclass(frozen=True)
class GlobalModel:
    round: int
    encrypted_chunks: list[bytes]  # empty for round 0, and when a ChunkConsumer took them
    plaintext: np.ndarray  # float64; round 0: concat(encrypted part, plaintext part); else the averaged plaintext part
    total_share: float  # sum of participants' shares (1.0 for round 0)
    participants: tuple[str, ...]
    bytes_received: int
    seconds: float  # the whole fetch: waiting for the round to close, then the download
    download_s: float = 0.0  # the download alone, from the first byte of the global model to the last (a consumer's
    # time on the chunks as they arrive included; the time its finish() takes is in neither)
    encrypted_layout_json: str = ""  # the federation's layouts as the server sent them ("" from older servers)
    plaintext_layout_json: str = ""


def receive_global_model(
    round_number: int,
    header: pb.GlobalModelHeader,
    parts: Iterable[pb.GlobalModelPart],
    progress: Progress | None,
    started: float,
    chunks_into: Callable[[IncomingGlobalModel], ChunkConsumer] | None = None,
) -> GlobalModel:
    """Reads the rest of a GetGlobalModel stream whose first message was ``header``.

    Args:
        started: when the fetch began (``time.monotonic()``), waiting included.
        chunks_into: makes the consumer the chunks go to as they arrive (see
            :meth:`~lightning_fhe.client.AggregatorClient.fetch_global`); None: they are collected in a list.

    Raises:
        FederationError: a chunk or plaintext block out of order, or a stream that ends early.
    """
    header_at = time.monotonic()
    incoming = IncomingGlobalModel(header.round, header.num_chunks, header.total_share, tuple(header.participants))
    consumer = chunks_into(incoming) if chunks_into is not None else None
    try:
        chunks: list[bytes] = []
        values = np.empty(header.plaintext_count, dtype=np.float64)
        filled, received, arrived = 0, 0, 0
        for part in parts:
            kind = part.WhichOneof("part")
            if kind == "chunk":
                if part.chunk.index != arrived:
                    raise FederationError(f"fetch round {round_number}: chunk {part.chunk.index} arrived out of order")
                if consumer is not None:
                    consumer.add(part.chunk.data)
                else:
                    chunks.append(part.chunk.data)
                arrived += 1
                received += len(part.chunk.data)
                if progress is not None:
                    progress(arrived, header.num_chunks)
            elif kind == "plaintext":
                data, dtype = block_payload(part.plaintext)
                block = np.frombuffer(data, dtype=dtype)
                if part.plaintext.offset != filled or filled + block.size > values.size:
                    raise FederationError(
                        f"fetch round {round_number}: plaintext block at {part.plaintext.offset} out of order"
                    )
                values[filled : filled + block.size] = block
                filled += block.size
                received += len(data)
        if arrived != header.num_chunks or filled != header.plaintext_count:
            raise FederationError(
                f"fetch round {round_number}: incomplete download ({arrived} of {header.num_chunks} chunks, "
                f"{filled} of {header.plaintext_count} plaintext values)"
            )
        received_at = time.monotonic()
        if consumer is not None:
            consumer.finish()
    finally:
        if consumer is not None:
            consumer.close()
    return GlobalModel(
        round=header.round,
        encrypted_chunks=chunks,
        plaintext=values,
        total_share=header.total_share,
        participants=tuple(header.participants),
        bytes_received=received,
        seconds=received_at - started,
        download_s=received_at - header_at,
        encrypted_layout_json=header.encrypted_layout_json,
        plaintext_layout_json=header.plaintext_layout_json,
    )
