"""The protocol's refusal vocabulary: why the aggregator refused a call, in words both sides match on.

The server sends a :class:`Reason` value as the ``refusal-reason`` trailing metadata entry of every refusal
(:data:`~lightning_fhe.proto.wire.REFUSAL_REASON_METADATA`); the client reads it back into the same enum, so
neither side compares string literals. The gRPC status says how bad it is; the reason says what it was.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Machine-readable refusal reasons, sent as the ``refusal-reason`` trailing metadata entry."""

    BAD_REQUEST = "bad_request"
    BAD_LAYOUT = "bad_layout"
    BAD_CHUNK = "bad_chunk"
    BAD_PLAINTEXT = "bad_plaintext"
    CHUNK_ORDER = "chunk_order"
    CHUNK_COUNT = "chunk_count"
    INCOMPLETE = "incomplete"
    IDLE = "idle"
    UNKNOWN_SITE = "unknown_site"
    NOT_MEMBER = "not_member"
    NOT_JOINED = "not_joined"
    MISMATCH = "mismatch"
    ROUNDS_MISMATCH = "rounds_mismatch"
    ROUND_CLOSED = "round_closed"
    ROUND_NOT_OPEN = "round_not_open"
    ATTEMPT_CHANGED = "attempt_changed"
    NOT_IN_ATTEMPT = "not_in_attempt"
    DUPLICATE = "duplicate"
    BUSY = "busy"
    TOO_MANY_CALLS = "too_many_calls"
    LEFT = "left"
    FAILED = "failed"
    PRUNED = "pruned"
    NO_SUCH_ROUND = "no_such_round"
    GONE = "gone"
    DATA_LOSS = "data_loss"
    KEY_PENDING = "key_pending"  # he.key = sites: the key's maker has not shared it yet
    NOT_SHARER = "not_sharer"  # he.key = sites: only the first member in name order shares the key

    @classmethod
    def parse(cls, value: str | None) -> Reason | None:
        """The reason a refusal carried, or None (none sent, or one this version does not know)."""
        try:
            return cls(value) if value else None
        except ValueError:
            return None
