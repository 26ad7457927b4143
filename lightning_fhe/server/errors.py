"""Refusals: what the aggregator answers when a request must not change anything.

The federation logic raises :class:`Refusal` without knowing about gRPC; the servicer turns its ``status`` into the
gRPC status code of the same name and sends ``reason`` as trailing metadata, so a client can act on it without
parsing the message. The message is for people: it says what was wrong and where.
"""

from __future__ import annotations

from enum import Enum

from lightning_fhe.proto.reasons import Reason

__all__ = ["Reason", "Refusal", "Status"]


class Status(Enum):
    """The gRPC status codes the aggregator answers with; the names are gRPC's, so the servicer maps them by name."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # the request itself is malformed: bad chunk, wrong count, wrong order
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # well formed, but not now: stale or future round, layout mismatch
    ALREADY_EXISTS = "ALREADY_EXISTS"  # this site's update for this round is already recorded
    PERMISSION_DENIED = "PERMISSION_DENIED"  # this site may not take part (unknown, or not a member)
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no identity at all (insecure mode without a site name)
    NOT_FOUND = "NOT_FOUND"  # a round that does not exist or whose aggregate was pruned
    ABORTED = "ABORTED"  # the round or the federation failed; the message says why
    UNAVAILABLE = "UNAVAILABLE"  # transient: retry with backoff (e.g. the previous stream is still being torn down)
    CANCELLED = "CANCELLED"  # the site went away while the server waited for it
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # this caller holds as many calls as it may; the others are served
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # a stream sent nothing for longer than its idle deadline
    DATA_LOSS = "DATA_LOSS"  # a state file on the server fails its checksum; nothing is served from it


class Refusal(Exception):
    """A request the aggregator refuses; raising it must leave the federation's state as it was."""

    def __init__(self, status: Status, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def message(self) -> str:
        return str(self)
