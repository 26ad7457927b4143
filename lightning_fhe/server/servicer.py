"""The gRPC face of :class:`~lightning_fhe.server.federation.Federation`: identify the site, translate, stream.

Thin on purpose: every decision is the federation's. This module turns protobuf messages into the federation's
dataclasses, a :class:`~lightning_fhe.server.errors.Refusal` into the gRPC status of the same name (with the
reason as trailing metadata), and aggregates on disk into a stream of parts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc
import numpy as np

from lightning_fhe.he.layout import LayoutError, TensorLayout
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto import aggregator_pb2_grpc as pb_grpc
from lightning_fhe.proto.wire import (
    PLAINTEXT_BLOCK_VALUES,
    REFUSAL_REASON_METADATA,
    SITE_NAME_METADATA,
    WIRE_DTYPES,
    block_payload,
)
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.federation import (
    ChunkPart,
    Federation,
    Phase,
    PlaintextPart,
    StatusView,
    UploadHeader,
    UploadPart,
)
from lightning_fhe.server.membership import SiteDeclaration
from lightning_fhe.server.store import StateError

logger = logging.getLogger("lightning_fhe.server")

# Waiting calls are answered at least this often, so a site notices a restarted server or a lost update soon.
MAX_WAIT_S = 60.0

_PHASES = {
    Phase.FORMING: pb.RoundStatus.FORMING,
    Phase.OPEN: pb.RoundStatus.OPEN,
    Phase.FINISHED: pb.RoundStatus.FINISHED,
    Phase.FAILED: pb.RoundStatus.FAILED,
}


def _abort(context: grpc.ServicerContext, refusal: Refusal) -> None:
    context.set_trailing_metadata(((REFUSAL_REASON_METADATA, refusal.reason.value),))
    context.abort(grpc.StatusCode[refusal.status.name], refusal.message)


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """Args:
    federation: the federation this server runs.
    insecure: no TLS: sites name themselves in the ``site_name`` metadata entry (local experiments only).
    """

    def __init__(self, federation: Federation, insecure: bool = False) -> None:
        self.federation = federation
        self.insecure = insecure

    def _site(self, context: grpc.ServicerContext) -> str:
        """The calling site's name: its certificate's common name (the CA check happened in the TLS handshake)."""
        if self.insecure:
            names = [v for k, v in context.invocation_metadata() if k == SITE_NAME_METADATA]
            if not names or not names[0]:
                raise Refusal(
                    Status.UNAUTHENTICATED,
                    Reason.BAD_REQUEST,
                    f"the server runs without TLS (--insecure): name the site in the {SITE_NAME_METADATA!r} metadata",
                )
            return str(names[0])
        names = context.auth_context().get("x509_common_name") or []
        if not names:
            raise Refusal(
                Status.UNAUTHENTICATED,
                Reason.BAD_REQUEST,
                "no client certificate: connect with the site kit's certificate",
            )
        return names[0].decode()

    # -- Join -------------------------------------------------------------------------------------------------------

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        try:
            site = self._site(context)
            declaration = SiteDeclaration(
                weight=request.weight,
                encrypted_layout=_layout(request.encrypted_layout_json, "encrypted_layout_json"),
                plaintext_layout=_layout(request.plaintext_layout_json, "plaintext_layout_json"),
                he_fingerprint=request.he_fingerprint,
                params_fingerprint=request.params_fingerprint,
            )
            result = self.federation.join(site, declaration, _wait(request.max_wait_s), context.is_active)
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
        )

    # -- SubmitUpdate -----------------------------------------------------------------------------------------------

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdatePart], context: grpc.ServicerContext) -> pb.SubmitReply:
        try:
            site = self._site(context)
            result = self.federation.submit(site, _update_parts(request_iterator), context.is_active)
        except Refusal as refusal:
            _abort(context, refusal)
        except grpc.RpcError:
            # The site went away mid-stream (the federation has already taken its chunks back out).
            _abort(context, Refusal(Status.CANCELLED, Reason.GONE, "the update stream broke; nothing of it was kept"))
        return pb.SubmitReply(
            round=result.round, bytes_received=result.bytes_received, submitted=result.submitted, members=result.members
        )

    # -- GetGlobalModel ---------------------------------------------------------------------------------------------

    def GetGlobalModel(
        self, request: pb.GlobalModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GlobalModelPart]:
        try:
            site = self._site(context)
            found = self.federation.open_global(site, request.round, _wait(request.max_wait_s), context.is_active)
        except Refusal as refusal:
            _abort(context, refusal)
        if isinstance(found, StatusView):
            yield pb.GlobalModelPart(pending=_status_message(found))
            return
        sent, complete = 0, False
        with found as reader:
            try:
                h = reader.header
                yield pb.GlobalModelPart(
                    header=pb.GlobalModelHeader(
                        round=h.round,
                        num_chunks=h.num_chunks,
                        plaintext_count=h.plaintext_count,
                        total_share=h.total_share,
                        participants=h.participants,
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
        try:
            remaining = self.federation.leave(self._site(context), request.why)
        except Refusal as refusal:
            _abort(context, refusal)
        return pb.LeaveReply(members_left=remaining)

    # -- GetRoundStatus ---------------------------------------------------------------------------------------------

    def GetRoundStatus(self, request: pb.RoundStatusRequest, context: grpc.ServicerContext) -> pb.RoundStatus:
        try:
            return _status_message(self.federation.status(self._site(context)))
        except Refusal as refusal:
            _abort(context, refusal)
        raise AssertionError("unreachable")


def _wait(requested: float) -> float:
    return min(max(requested, 0.0), MAX_WAIT_S)


def _layout(text: str, field: str) -> TensorLayout:
    try:
        return TensorLayout.from_dict(json.loads(text) if text else {"tensors": []})
    except (ValueError, LayoutError) as err:
        raise Refusal(Status.INVALID_ARGUMENT, Reason.BAD_REQUEST, f"{field}: not a tensor layout ({err})") from None


def _update_parts(messages: Iterator[pb.UpdatePart]) -> Iterator[UploadPart]:
    for message in messages:
        kind = message.WhichOneof("part")
        if kind == "header":
            h = message.header
            yield UploadHeader(h.round, h.num_chunks, h.plaintext_count)
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
        left=view.left,
    )
