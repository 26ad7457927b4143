"""The gRPC face of :class:`~lightning_fhe.server.federation.Federation`: identify the site, translate, stream.

Thin on purpose: every decision is the federation's or :mod:`~lightning_fhe.server.admission`'s. This module
identifies the caller from its TLS peer and applies the admission rules before it reads any request message
(:meth:`AggregatorServicer._admitted`), turns protobuf messages into the federation's dataclasses, a
:class:`~lightning_fhe.server.errors.Refusal` into the gRPC status of the same name (with the reason as trailing
metadata), and aggregates on disk into a stream of parts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lightning_fhe.he.layout import LayoutError, TensorLayout
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto import aggregator_pb2_grpc as pb_grpc
from lightning_fhe.proto.sealed_keys import (
    SealedKeyAssembler,
    SealedKeyError,
    max_sealed_key_bytes,
    split_sealed_key,
)
from lightning_fhe.proto.wire import (
    PLAINTEXT_BLOCK_VALUES,
    REFUSAL_REASON_METADATA,
    SITE_NAME_METADATA,
    WIRE_DTYPES,
    block_payload,
    mask_key_from_message,
    mask_key_message,
    sealed_key_message,
    sealed_key_piece,
)
from lightning_fhe.server.admission import MAX_WAIT_S, OPERATOR, CallLimiter, Method
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.federation import Federation
from lightning_fhe.server.membership import SiteDeclaration
from lightning_fhe.server.messages import ChunkPart, Phase, PlaintextPart, StatusView, UploadHeader, UploadPart
from lightning_fhe.server.store import StateError

logger = logging.getLogger("lightning_fhe.server")

__all__ = ["MAX_WAIT_S", "AggregatorServicer"]

_PHASES = {
    Phase.FORMING: pb.RoundStatus.FORMING,
    Phase.OPEN: pb.RoundStatus.OPEN,
    Phase.FINISHED: pb.RoundStatus.FINISHED,
    Phase.FAILED: pb.RoundStatus.FAILED,
}


def _abort(context: grpc.ServicerContext, refusal: Refusal) -> None:
    context.set_trailing_metadata(((REFUSAL_REASON_METADATA, refusal.reason.value),))
    context.abort(grpc.StatusCode[refusal.status.name], refusal.message)


@dataclass(frozen=True)
class Caller:
    """Who is calling: a site's certificate name, or the operator (the server kit's own certificate)."""

    name: str
    is_operator: bool = False


def _certificate_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """Args:
    federation: the federation this server runs.
    insecure: no TLS: sites name themselves in the ``site_name`` metadata entry (local experiments only).
    server_cert: the server kit's certificate (PEM); a caller presenting it is the operator.
    """

    def __init__(self, federation: Federation, insecure: bool = False, server_cert: bytes | None = None) -> None:
        self.federation = federation
        self.insecure = insecure
        self._server_der = _certificate_der(server_cert) if server_cert else None
        self.limiter = CallLimiter(federation.config.max_calls_per_site)

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        """The caller, from its TLS peer (the CA check happened in the handshake): its certificate's common name,
        or the operator when it presents the server kit's own certificate (compared whole, never by name)."""
        if self.insecure:
            names = [v for k, v in context.invocation_metadata() if k == SITE_NAME_METADATA]
            if not names or not names[0]:
                raise Refusal(
                    Status.UNAUTHENTICATED,
                    Reason.BAD_REQUEST,
                    f"the server runs without TLS (--insecure): name the site in the {SITE_NAME_METADATA!r} metadata",
                )
            return Caller(str(names[0]))
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert") or []
        if self._server_der is not None and pems:
            try:
                if _certificate_der(pems[0]) == self._server_der:
                    return Caller(OPERATOR, is_operator=True)
            except ValueError:  # not a certificate we can parse: identified by its name below, like any other
                pass
        names = auth.get("x509_common_name") or []
        if not names:
            raise Refusal(
                Status.UNAUTHENTICATED,
                Reason.BAD_REQUEST,
                "no client certificate: connect with the site kit's certificate",
            )
        return Caller(names[0].decode(errors="replace"))

    @contextmanager
    def _admitted(self, context: grpc.ServicerContext, method: Method) -> Iterator[Caller]:
        """The caller, admitted to ``method`` and counted against ``max_calls_per_site`` for the block; refused
        (and the call aborted) before anything of its request is read otherwise."""
        try:
            caller = self._caller(context)
            self.federation.admit(caller.name, method, caller.is_operator)
            self.limiter.acquire(caller.name, method)
        except Refusal as refusal:
            if refusal.status is Status.RESOURCE_EXHAUSTED:
                logger.warning("%s", refusal.message)
            _abort(context, refusal)
        try:
            yield caller
        finally:
            self.limiter.release(caller.name)

    # -- Join -------------------------------------------------------------------------------------------------------

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        with self._admitted(context, Method.JOIN) as caller:
            try:
                max_values = self.federation.config.max_model_values
                encrypted = _layout(request.encrypted_layout_json, "encrypted_layout_json", max_values)
                declaration = SiteDeclaration(
                    weight=request.weight,
                    encrypted_layout=encrypted,
                    # One budget for both: the encrypted tensors count against max_model_values first.
                    plaintext_layout=_layout(
                        request.plaintext_layout_json, "plaintext_layout_json", max_values - encrypted.numel
                    ),
                    he_fingerprint=request.he_fingerprint,
                    params_fingerprint=request.params_fingerprint,
                    rounds=request.rounds,
                    mask_key=mask_key_from_message(request.mask_key) if request.HasField("mask_key") else None,
                    require_masking=request.require_masking,
                )
                result = self.federation.join(caller.name, declaration, request.max_wait_s, context.is_active)
            except Refusal as refusal:
                _abort(context, refusal)
        return pb.JoinReply(
            formed=result.formed,
            site=result.site,
            members=result.members,
            total_weight=result.total_weight,
            share=result.share,
            rounds=result.rounds,
            current_round=result.current_round,
            send_initial_model=result.send_initial_model,
            joined=result.joined,
            expected=result.expected,
            masked=result.masked,
            mask_keys=[mask_key_message(key) for key in result.mask_keys],
            federation_instance=result.instance,
        )

    # -- SubmitUpdate -----------------------------------------------------------------------------------------------

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdatePart], context: grpc.ServicerContext) -> pb.SubmitReply:
        with self._admitted(context, Method.SUBMIT) as caller:
            stream = IdleDeadlineStream(request_iterator, self.federation.config.stream_idle_s)
            try:
                result = self.federation.submit(caller.name, _update_parts(stream), context.is_active, stream.cancel)
            except Refusal as refusal:
                if refusal.reason is Reason.IDLE:
                    logger.warning("update stream from %s: %s", caller.name, refusal.message)
                _abort(context, refusal)
            except grpc.RpcError:
                # The site went away mid-stream (the federation has already taken its chunks back out).
                _abort(
                    context, Refusal(Status.CANCELLED, Reason.GONE, "the update stream broke; nothing of it was kept")
                )
            finally:
                stream.close()
        return pb.SubmitReply(
            round=result.round, bytes_received=result.bytes_received, submitted=result.submitted, members=result.members
        )

    # -- GetGlobalModel ---------------------------------------------------------------------------------------------

    def GetGlobalModel(
        self, request: pb.GlobalModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GlobalModelPart]:
        with self._admitted(context, Method.DOWNLOAD) as caller:
            yield from self._global_model(caller.name, request, context)

    def _global_model(
        self, site: str, request: pb.GlobalModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GlobalModelPart]:
        try:
            found = self.federation.open_global(site, request.round, request.max_wait_s, context.is_active)
        except Refusal as refusal:
            _abort(context, refusal)
        if isinstance(found, StatusView):
            yield pb.GlobalModelPart(pending=_status_message(found))
            return
        sent, complete = 0, False
        with found as reader:
            try:
                h, membership = reader.header, self.federation.membership
                yield pb.GlobalModelPart(
                    header=pb.GlobalModelHeader(
                        round=h.round,
                        num_chunks=h.num_chunks,
                        plaintext_count=h.plaintext_count,
                        total_share=h.total_share,
                        participants=h.participants,
                        # The federation's layouts name and shape the tensors (python -m lightning_fhe.export).
                        encrypted_layout_json=json.dumps(membership.encrypted_layout.to_dict()) if membership else "",
                        plaintext_layout_json=json.dumps(membership.plaintext_layout.to_dict()) if membership else "",
                    )
                )
                for index, blob in enumerate(reader.iter_chunks()):
                    sent += len(blob)
                    yield pb.GlobalModelPart(chunk=pb.Chunk(index=index, data=blob))
                offset, field = 0, self.federation.plaintext_field(h.round)
                for block in reader.iter_plaintext(PLAINTEXT_BLOCK_VALUES):
                    values = np.frombuffer(block, dtype="<f8").astype(WIRE_DTYPES[field], copy=False)
                    sent += values.nbytes
                    yield pb.GlobalModelPart(plaintext=pb.PlaintextBlock(offset=offset, **{field: values.tobytes()}))
                    offset += values.size
                complete = True
            except StateError as err:
                logger.error("%s", err)
                context.abort(
                    grpc.StatusCode.DATA_LOSS, f"round {request.round}'s aggregate on the server is damaged: {err}"
                )
            finally:
                self.federation.note_download(site, request.round, sent, complete)

    # -- Leave ------------------------------------------------------------------------------------------------------

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        with self._admitted(context, Method.LEAVE) as caller:
            try:
                remaining = self.federation.leave(caller.name, request.why)
            except Refusal as refusal:
                _abort(context, refusal)
        return pb.LeaveReply(members_left=remaining)

    # -- ShareSealedKeys, FetchSealedKey (he.key = sites) -----------------------------------------------------------

    def ShareSealedKeys(
        self, request_iterator: Iterator[pb.SealedKey], context: grpc.ServicerContext
    ) -> pb.SealedKeysReply:
        with self._admitted(context, Method.SHARE_KEYS) as caller:
            stream = IdleDeadlineStream(request_iterator, self.federation.config.stream_idle_s)
            try:
                members = self.federation.check_key_sharer(caller.name)  # before any piece is read
                assembler = SealedKeyAssembler(caller.name, members, max_sealed_key_bytes(self.federation.params))
                try:
                    for message in stream:
                        assembler.add(sealed_key_piece(message))
                    share = assembler.finish()
                except SealedKeyError as err:
                    raise Refusal(Status.INVALID_ARGUMENT, Reason.BAD_REQUEST, f"sealed keys: {err}") from None
                stored = self.federation.share_sealed_keys(caller.name, share)
            except Refusal as refusal:
                _abort(context, refusal)
            except grpc.RpcError:
                _abort(context, Refusal(Status.CANCELLED, Reason.GONE, "the stream broke; nothing of it was kept"))
            finally:
                stream.close()
        return pb.SealedKeysReply(stored=stored)

    def FetchSealedKey(
        self, request: pb.FetchSealedKeyRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SealedKey]:
        with self._admitted(context, Method.FETCH_KEY) as caller:
            try:
                share, sealed = self.federation.fetch_sealed_key(caller.name, request.max_wait_s, context.is_active)
            except Refusal as refusal:
                _abort(context, refusal)
            for piece in split_sealed_key(share.sender, caller.name, share.key_fingerprint, sealed):
                yield sealed_key_message(piece)

    # -- GetRoundStatus ---------------------------------------------------------------------------------------------

    def GetRoundStatus(self, request: pb.RoundStatusRequest, context: grpc.ServicerContext) -> pb.RoundStatus:
        with self._admitted(context, Method.STATUS) as caller:
            try:
                return _status_message(self.federation.status(caller.name, operator=caller.is_operator))
            except Refusal as refusal:
                _abort(context, refusal)
        raise AssertionError("unreachable")


T = TypeVar("T")
_NOTHING = object()


class IdleDeadlineStream(Generic[T]):
    """A request stream that gives up on a sender who sends nothing for ``idle_s`` seconds, or when cancelled.

    gRPC's request iterator blocks in ``next`` with no timeout, and another thread cannot make it return with a
    status of the server's choosing (``context.abort`` only works in the handler's thread; ``context.cancel``
    ends the call as CANCELLED, with no reason). So a helper thread does the blocking ``next``, one message at a
    time and only when the handler asks (gRPC flow control still holds a sender back while its update waits for a
    slot), and the handler waits for it with a deadline. On the deadline, or :meth:`cancel`, the handler gets a
    :class:`Refusal` it answers like any other; the helper ends when the call does.
    """

    def __init__(self, messages: Iterator[T], idle_s: float) -> None:
        self._messages = messages
        self.idle_s = idle_s
        self._cond = threading.Condition()
        self._wanted = False
        self._closed = False
        self._item: object = _NOTHING
        self._ended = False
        self._error: BaseException | None = None
        self._cancelled: Refusal | None = None
        self._thread: threading.Thread | None = None

    def __iter__(self) -> IdleDeadlineStream[T]:
        return self

    def __next__(self) -> T:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._read, name="aggregator-stream", daemon=True)
                self._thread.start()
            self._wanted = True
            self._cond.notify_all()
            deadline = time.monotonic() + self.idle_s
            while self._item is _NOTHING and not self._ended and self._error is None and self._cancelled is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._closed = True
                    raise Refusal(
                        Status.DEADLINE_EXCEEDED,
                        Reason.IDLE,
                        f"the stream sent nothing for {self.idle_s:g} s (stream_idle_s); it is cancelled and "
                        "nothing of it was kept",
                    )
                self._cond.wait(remaining)
            if self._cancelled is not None:
                raise self._cancelled
            if self._item is not _NOTHING:
                item, self._item = self._item, _NOTHING
                return item  # type: ignore[return-value]
            if self._error is not None:
                raise self._error
            raise StopIteration

    def cancel(self, refusal: Refusal) -> None:
        """Makes the handler's pending or next read raise ``refusal``; never blocks (called under the federation's
        lock)."""
        with self._cond:
            if self._cancelled is None:
                self._cancelled = refusal
            self._cond.notify_all()

    def close(self) -> None:
        """The handler is done: the helper reads no further (it ends once the call has ended)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _read(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._wanted = False
            try:
                item = next(self._messages)
            except StopIteration:
                with self._cond:
                    self._ended = True
                    self._cond.notify_all()
                return
            except BaseException as err:  # noqa: BLE001 - handed to the handler's thread, which raises it
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self._item = item
                self._cond.notify_all()


def _layout(text: str, field: str, max_values: int) -> TensorLayout:
    try:
        return TensorLayout.from_json(text, max_values)
    except LayoutError as err:
        raise Refusal(Status.INVALID_ARGUMENT, Reason.BAD_LAYOUT, f"{field}: {err}") from None


def _update_parts(messages: Iterator[pb.UpdatePart]) -> Iterator[UploadPart]:
    for message in messages:
        kind = message.WhichOneof("part")
        if kind == "header":
            h = message.header
            yield UploadHeader(h.round, h.num_chunks, h.plaintext_count, h.attempt)
        elif kind == "chunk":
            yield ChunkPart(message.chunk.index, message.chunk.data)
        elif kind == "plaintext":
            data, dtype = block_payload(message.plaintext)
            yield PlaintextPart(message.plaintext.offset, data, dtype)
        else:
            raise Refusal(
                Status.INVALID_ARGUMENT, Reason.BAD_REQUEST, "an empty UpdatePart (no header, plaintext or chunk)"
            )


def _status_message(view: StatusView) -> pb.RoundStatus:
    return pb.RoundStatus(
        phase=_PHASES[view.phase],
        current_round=view.current_round,
        rounds=view.rounds,
        last_closed_round=view.last_closed_round,
        members=view.members,
        submitted=view.submitted,
        this_site_submitted=view.this_site_submitted,
        failure=view.failure,
        joined=view.joined,
        site=view.site,
        seconds_left=view.seconds_left,
        activity=[pb.MemberActivity(site=a.site, idle_s=a.idle_s, last_call=a.last_call) for a in view.activity],
        left=view.left,
        attempt=view.attempt,
        attempt_members=view.attempt_members,
        federation_instance=view.instance,
    )
