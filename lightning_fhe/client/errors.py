"""What a site's calls raise: the server's refusals and the failures around them, as one exception family.

A refusal's gRPC status and the server's machine-readable :class:`~lightning_fhe.proto.reasons.Reason` (sent as
trailing metadata) travel with the exception, so a caller can tell a late update from a broken one.
"""

from __future__ import annotations

import grpc

from lightning_fhe.proto.reasons import Reason
from lightning_fhe.proto.wire import REFUSAL_REASON_METADATA


class FederationError(RuntimeError):
    """The server refused a request, or the federation failed. ``code`` is the gRPC status, ``reason`` the server's
    machine-readable refusal :class:`~lightning_fhe.proto.reasons.Reason`, when it sent one this version knows."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class ServerUnavailableError(FederationError):
    """The server could not be reached for ``retry_budget_s`` (down, unreachable, or the TLS handshake fails)."""


class ClientClosedError(FederationError):
    """:meth:`AggregatorClient.close` was called (e.g. on SIGTERM) while a call was waiting or retrying."""


class RoundClosedError(FederationError):
    """The round closed before this update was recorded (too late, or a replay); its global model is out there."""


def code_and_details(err: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    """A failed call's status code and the server's words (None and the error's text when it has no status)."""
    if isinstance(err, grpc.Call):
        return err.code(), err.details() or str(err)
    return None, str(err)


def federation_error(what: str, err: grpc.RpcError) -> FederationError:
    """The exception a failed call ``what`` raises: :class:`RoundClosedError` when the server says the round
    closed, else :class:`FederationError`, with the status and the refusal reason."""
    code, details = code_and_details(err)
    reason = None
    if isinstance(err, grpc.Call):
        for key, value in err.trailing_metadata() or ():
            if key == REFUSAL_REASON_METADATA:
                reason = Reason.parse(value)
    cls = RoundClosedError if reason is Reason.ROUND_CLOSED else FederationError
    name = code.name if code is not None else "error"
    return cls(f"{what}: {details} ({name})", code, reason)
