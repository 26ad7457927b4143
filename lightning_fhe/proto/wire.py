"""What the client and the server must agree on beyond the .proto: names, sizes, and gRPC channel options."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lightning_fhe.he.frames import global_chunk_bytes, upload_chunk_bytes
from lightning_fhe.he.params import CKKSParams
from lightning_fhe.masking.announcement import Announcement
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto.sealed_keys import SealedKeyPiece

SERVICE_NAME = "lightning_fhe.v2.Aggregator"
# Most seeds a global chunk may carry (the server's seeds_up_to); past them the server sends the summed polynomial.
MAX_SEEDS = 1024
# In --insecure mode only (no certificate to name the site), the site's name travels as this metadata entry.
SITE_NAME_METADATA = "site_name"
# Trailing metadata entry with a machine-readable refusal reason (lightning_fhe.server.errors.Reason).
REFUSAL_REASON_METADATA = "refusal-reason"
# Plaintext values per PlaintextBlock: 64 KiB, well inside the message limit below.
PLAINTEXT_BLOCK_VALUES = 8192
# Room for the protobuf framing around a chunk (field tags, lengths, the index).
_MESSAGE_SLACK = 16 * 1024


def upload_limit(params: CKKSParams) -> int:
    """Largest message a site sends: one upload chunk or plaintext block and its framing (81,920 bytes for N=8192).

    The server refuses a larger one through gRPC itself (RESOURCE_EXHAUSTED) before any of it is parsed.
    """
    return max(upload_chunk_bytes(params.poly_modulus_degree), 8 * PLAINTEXT_BLOCK_VALUES) + _MESSAGE_SLACK


def download_limit(params: CKKSParams) -> int:
    """Largest message the server sends: a global chunk with :data:`MAX_SEEDS` seeds, or one with the summed
    second polynomial, whichever is larger (144,392 bytes for N=8192)."""
    n = params.poly_modulus_degree
    largest = max(global_chunk_bytes(n, MAX_SEEDS, summed=False), global_chunk_bytes(n, 0, summed=True))
    return max(largest, 8 * PLAINTEXT_BLOCK_VALUES) + _MESSAGE_SLACK


def server_options(params: CKKSParams) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", upload_limit(params)),
        ("grpc.max_send_message_length", download_limit(params)),
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
    return [
        ("grpc.max_receive_message_length", download_limit(params)),
        ("grpc.max_send_message_length", upload_limit(params)),
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


def mask_key_message(key: Announcement) -> pb.MaskAnnouncement:
    return pb.MaskAnnouncement(
        site=key.site,
        certificate=key.certificate,
        public_key=key.public_key,
        signature=key.signature,
        key_fingerprint=key.key_fingerprint,
    )


def mask_key_from_message(message: pb.MaskAnnouncement) -> Announcement:
    return Announcement(
        site=message.site,
        certificate=message.certificate,
        public_key=message.public_key,
        signature=message.signature,
        key_fingerprint=message.key_fingerprint,
    )


def sealed_key_message(piece: SealedKeyPiece) -> pb.SealedKey:
    return pb.SealedKey(
        sender=piece.sender,
        recipient=piece.recipient,
        ciphertext=piece.data,
        key_fingerprint=piece.key_fingerprint,
        offset=piece.offset,
        size=piece.size,
    )


def sealed_key_piece(message: pb.SealedKey) -> SealedKeyPiece:
    return SealedKeyPiece(
        sender=message.sender,
        recipient=message.recipient,
        key_fingerprint=message.key_fingerprint,
        offset=message.offset,
        size=message.size,
        data=message.ciphertext,
    )
