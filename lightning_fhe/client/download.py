"""A round's global model as a site receives it: the header, the summed ciphertext chunks in order, then the
plaintext values, checked for order and completeness as they arrive."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lightning_fhe.client.errors import FederationError
from lightning_fhe.client.upload import Progress
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.wire import block_payload


@dataclass(frozen=True)
class GlobalModel:
    round: int
    encrypted_chunks: list[bytes]  # empty for round 0
    plaintext: np.ndarray  # float64; round 0: concat(encrypted part, plaintext part); else the averaged plaintext part
    total_share: float  # sum of participants' shares (1.0 for round 0)
    participants: tuple[str, ...]
    bytes_received: int
    seconds: float  # the whole fetch: waiting for the round to close, then the download
    download_s: float = 0.0  # the download alone, from the first byte of the global model to the last
    encrypted_layout_json: str = ""  # the federation's layouts as the server sent them ("" from older servers)
    plaintext_layout_json: str = ""


def receive_global_model(
    round_number: int,
    header: pb.GlobalModelHeader,
    parts: Iterable[pb.GlobalModelPart],
    progress: Progress | None,
    started: float,
) -> GlobalModel:
    """Reads the rest of a GetGlobalModel stream whose first message was ``header``.

    Args:
        started: when the fetch began (``time.monotonic()``), waiting included.

    Raises:
        FederationError: a chunk or plaintext block out of order, or a stream that ends early.
    """
    header_at = time.monotonic()
    chunks: list[bytes] = []
    values = np.empty(header.plaintext_count, dtype=np.float64)
    filled, received = 0, 0
    for part in parts:
        kind = part.WhichOneof("part")
        if kind == "chunk":
            if part.chunk.index != len(chunks):
                raise FederationError(f"fetch round {round_number}: chunk {part.chunk.index} arrived out of order")
            chunks.append(part.chunk.data)
            received += len(part.chunk.data)
            if progress is not None:
                progress(len(chunks), header.num_chunks)
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
    if len(chunks) != header.num_chunks or filled != header.plaintext_count:
        raise FederationError(
            f"fetch round {round_number}: incomplete download ({len(chunks)} of {header.num_chunks} chunks, "
            f"{filled} of {header.plaintext_count} plaintext values)"
        )
    return GlobalModel(
        round=header.round,
        encrypted_chunks=chunks,
        plaintext=values,
        total_share=header.total_share,
        participants=tuple(header.participants),
        bytes_received=received,
        seconds=time.monotonic() - started,
        download_s=time.monotonic() - header_at,
        encrypted_layout_json=header.encrypted_layout_json,
        plaintext_layout_json=header.plaintext_layout_json,
    )
