"""What the client and the server must agree on beyond the .proto: names, sizes, and gRPC channel options."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lightning_fhe.he.codec import max_chunk_bytes
from lightning_fhe.he.params import CKKSParams

SERVICE_NAME = "lightning_fhe.v1.Aggregator"
# In --insecure mode only (no certificate to name the site), the site's name travels as this metadata entry.
SITE_NAME_METADATA = "site_name"
# Trailing metadata entry with a machine-readable refusal reason (lightning_fhe.server.errors.Reason).
REFUSAL_REASON_METADATA = "refusal-reason"
# Plaintext values per PlaintextBlock: 64 KiB, well inside the message limit below.
PLAINTEXT_BLOCK_VALUES = 8192
# Room for the protobuf framing around a chunk (field tags, lengths, the index).
_MESSAGE_SLACK = 16 * 1024


def message_limit(params: CKKSParams) -> int:
    """Largest gRPC message either side accepts: one ciphertext chunk and its framing (about 148 KB for N=8192).

    A larger message is refused by gRPC itself (RESOURCE_EXHAUSTED) before any of it is parsed.
    """
    return max(max_chunk_bytes(params), 8 * PLAINTEXT_BLOCK_VALUES) + _MESSAGE_SLACK


def server_options(params: CKKSParams) -> list[tuple[str, int]]:
    limit = message_limit(params)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # A second server on the same port must fail, not share it (gRPC sets SO_REUSEPORT by default on Linux).
        ("grpc.so_reuseport", 0),
        # Notice dead peers (a site that lost power mid-upload) within about a minute.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        # Fixed flow-control windows: an upload waiting for its slot holds at most a window of data in the
        # server, whatever the number of sites (BDP probing would grow the windows to several MB each).
        ("grpc.http2.bdp_probe", 0),
        # Each connection's TCP read buffer grows with its throughput, up to 4 MB by default: 16 sites uploading
        # at once held ~50 MB in them (measured with segresnet-8; 256 KB keeps loopback throughput unchanged).
        ("grpc.experimental.tcp_max_read_chunk_size", 256 * 1024),
    ]


def channel_options(params: CKKSParams) -> list[tuple[str, int]]:
    limit = message_limit(params)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after a server restart; our own retry loop does the backing off.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.enable_retries", 0),
    ]


# The PlaintextBlock fields and the dtype of their values; which one a round's values take is
# :func:`lightning_fhe.proto.update_shape.update_shape`'s to say.
WIRE_DTYPES = {"float32_le": np.dtype("<f4"), "float64_le": np.dtype("<f8")}


def plaintext_blocks(values: np.ndarray, field: str = "float64_le") -> Iterator[tuple[int, bytes]]:
    """``(offset, little-endian bytes)`` blocks of at most :data:`PLAINTEXT_BLOCK_VALUES` values, in the dtype
    of PlaintextBlock ``field``."""
    flat = np.ascontiguousarray(values, dtype=WIRE_DTYPES[field]).reshape(-1)
    for start in range(0, flat.size, PLAINTEXT_BLOCK_VALUES):
        yield start, flat[start : start + PLAINTEXT_BLOCK_VALUES].tobytes()


def block_payload(block) -> tuple[bytes, np.dtype]:
    """A received PlaintextBlock's bytes and their dtype (an empty block reads as float64)."""
    field = block.WhichOneof("values") or "float64_le"
    return getattr(block, field), WIRE_DTYPES[field]
