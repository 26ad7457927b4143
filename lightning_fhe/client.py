"""The sites' side of the aggregation protocol: join, submit an update, fetch a global model.

TLS comes from the site kit (the site's certificate names it to the server). Calls that find the server
unavailable are retried with exponential backoff for up to ``retry_budget_s`` of continuous outage, so a server
restart is ridden out; :meth:`AggregatorClient.close` (from any thread) ends those retries and any call in flight at
once. While it waits (for the federation to form, for a round to close, for the server to come back) the client logs
what it waits for on the ``lightning_fhe.client`` logger at INFO, at least every ``log_every_s``. A site keeps its
last update in memory until that round's global model arrives: if the
server restarted and lost it, :meth:`AggregatorClient.fetch_global` submits it again by itself.

Example::

    with AggregatorClient("kits/site-1") as client:
        info = client.join(weight=1200, encrypted_layout=enc_layout, plaintext_layout=plain_layout)
        if info.send_initial_model:
            client.submit(0, [], np.concatenate([enc_layout.flatten(state), plain_layout.flatten(state)]))
        start = client.fetch_global(0)                        # every site starts from these weights
        for r in range(info.current_round, info.rounds + 1):
            ...                                                # train locally
            chunks = cipher.iter_encrypt(enc_layout.flatten(state), weight_fraction=info.share)
            client.submit(r, chunks, plain_layout.flatten(state))   # encryption and upload overlap
            model = client.fetch_global(r)
            update = cipher.decrypt(model.encrypted_chunks, enc_layout.numel, model.total_share)
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

from lightning_fhe.he.codec import num_chunks
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto import aggregator_pb2_grpc as pb_grpc
from lightning_fhe.proto.reasons import Reason
from lightning_fhe.proto.wire import (
    REFUSAL_REASON_METADATA,
    SITE_NAME_METADATA,
    WIRE_DTYPES,
    block_payload,
    channel_options,
    plaintext_blocks,
    plaintext_field,
)
from lightning_fhe.provision.kits import SiteKit, load_site_kit

logger = logging.getLogger("lightning_fhe.client")

T = TypeVar("T")
Progress = Callable[[int, int], None]

_PHASES = {
    pb.RoundStatus.FORMING: "forming",
    pb.RoundStatus.OPEN: "open",
    pb.RoundStatus.FINISHED: "finished",
    pb.RoundStatus.FAILED: "failed",
}


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


@dataclass(frozen=True)
class JoinInfo:
    site: str  # name from the certificate
    members: tuple[str, ...]  # fixed at formation
    total_weight: float  # W
    share: float  # this site's w_i / W
    rounds: int  # total number of rounds (round numbers 1..rounds)
    current_round: int  # the round open for submissions (1 after formation; >1 after a restart)
    send_initial_model: bool  # this site must submit its initial state as round 0 (plaintext)


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


@dataclass(frozen=True)
class SubmitReceipt:
    round: int
    bytes_sent: int
    seconds: float


@dataclass(frozen=True)
class MemberActivity:
    site: str
    idle_s: float  # seconds since the server last heard from this member
    last_call: str  # "join", "upload", "download" or "status"


@dataclass(frozen=True)
class RoundStatus:
    phase: str  # "forming", "open", "finished" or "failed"
    current_round: int  # the round open for submissions (rounds + 1 once finished)
    rounds: int
    last_closed_round: int  # -1 when none
    members: tuple[str, ...]
    submitted: tuple[str, ...]  # whose update for current_round is recorded
    this_site_submitted: bool  # False after a server restart lost it: submit again (fetch_global does)
    failure: str  # why the federation failed, when phase == "failed"
    joined: tuple[str, ...]  # while forming
    seconds_left: float = 0.0  # until formation or the open round fails (below quorum) or closes at the latest
    activity: tuple[MemberActivity, ...] = ()  # when the server last heard from each member
    left: tuple[str, ...] = ()  # members that left (Leave) and take part in no further round
    site: str = ""  # who asked, as the server saw it: the site's name, or "operator"


class _KeptUpdate:
    """An update as sent: chunks are pulled from the caller's iterable once and kept for resubmission."""

    def __init__(
        self, round_number: int, source: Iterator[bytes], expected_chunks: int, plaintext: np.ndarray, field: str
    ) -> None:
        self.round = round_number
        self.expected_chunks = expected_chunks
        self.plaintext = plaintext  # already in the dtype of ``field``, the PlaintextBlock field it travels in
        self.field = field
        self._source = source
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()  # gRPC reads requests on its own thread; a retry may start a second reader
        self.source_error: BaseException | None = None

    @property
    def nbytes(self) -> int:
        return sum(map(len, self._chunks)) + self.plaintext.nbytes

    def _chunk(self, index: int) -> bytes | None:
        with self._lock:
            if index < len(self._chunks):
                return self._chunks[index]
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
            self._chunks.append(bytes(blob))
            return self._chunks[-1]

    def messages(self, progress: Progress | None) -> Iterator[pb.UpdatePart]:
        yield pb.UpdatePart(
            header=pb.UpdateHeader(
                round=self.round, num_chunks=self.expected_chunks, plaintext_count=self.plaintext.size
            )
        )
        for offset, data in plaintext_blocks(self.plaintext, self.field):
            yield pb.UpdatePart(plaintext=pb.PlaintextBlock(offset=offset, **{self.field: data}))
        for index in range(self.expected_chunks):
            blob = self._chunk(index)
            if blob is None:
                return  # the server sees an incomplete stream and keeps nothing of it
            yield pb.UpdatePart(chunk=pb.Chunk(index=index, data=blob))
            if progress is not None:
                progress(index + 1, self.expected_chunks)


class AggregatorClient:
    """A site's connection to the aggregator.

    Args:
        kit: the site kit (folder or loaded :class:`SiteKit`): TLS identity, CA, server address, HE fingerprint.
        server: ``host:port`` to connect to; default: the address in the kit.
        insecure: connect without TLS, to a server started with ``--insecure``. Local experiments only.
        site_name: with ``insecure`` only: the name to give (default: the kit's); with TLS the certificate names
            the site.
        retry_budget_s: how long to keep retrying while the server is unavailable before giving up.
        rpc_timeout_s: deadline of each call (beyond the time the server may wait for a round to close).
        wait_s: how long the server may hold a waiting call (join, download) before answering "not yet".
        log_every_s: while waiting or retrying, log what for at least this often (also caps ``wait_s``).
        clock: seconds on a monotonic clock, for the outage budget and the log cadence; tests pass a fake one.
    """

    def __init__(
        self,
        kit: SiteKit | str | os.PathLike,
        server: str | None = None,
        *,
        insecure: bool = False,
        site_name: str | None = None,
        retry_budget_s: float = 60.0,
        rpc_timeout_s: float = 600.0,
        wait_s: float = 30.0,
        log_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kit = kit if isinstance(kit, SiteKit) else load_site_kit(kit)
        if site_name is not None and not insecure:
            raise ValueError("site_name is only for insecure mode: with TLS, the site kit's certificate names the site")
        self.site = site_name or self.kit.name
        self.server = server or self.kit.server_address
        self.retry_budget_s = retry_budget_s
        self.rpc_timeout_s = rpc_timeout_s
        self.wait_s = min(wait_s, rpc_timeout_s, log_every_s)  # a waiting call returns in time for the next log line
        self.log_every_s = log_every_s
        self._clock = clock
        self._closed = threading.Event()  # set by close(): retries and waits end at once
        options = channel_options(self.kit.params)
        if insecure:
            logger.warning("connecting to %s WITHOUT TLS (insecure mode): local experiments only", self.server)
            self._channel = grpc.insecure_channel(self.server, options=options)
            self._metadata: tuple[tuple[str, str], ...] = ((SITE_NAME_METADATA, self.site),)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.kit.ca_cert, private_key=self.kit.key, certificate_chain=self.kit.cert
            )
            self._channel = grpc.secure_channel(self.server, credentials, options=options)
            self._metadata = ()
        self._stub = pb_grpc.AggregatorStub(self._channel)
        self._layouts: tuple[TensorLayout, TensorLayout] | None = None
        self._kept: dict[int, _KeptUpdate] = {}

    # -- the calls --------------------------------------------------------------------------------------------------

    def join(
        self, weight: float, encrypted_layout: TensorLayout, plaintext_layout: TensorLayout, rounds: int = 0
    ) -> JoinInfo:
        """Joins (or, after a restart, joins again) and blocks until the federation has formed.

        Args:
            rounds: the rounds this site will train, checked by the server before anything is recorded; 0: any.

        Raises:
            FederationError: refused (unknown site, layout or key mismatch, rounds mismatch
                (``Reason.ROUNDS_MISMATCH``), ...) or formation failed.
            ServerUnavailableError: the server was unavailable for ``retry_budget_s``.
        """
        request = pb.JoinRequest(
            weight=float(weight),
            encrypted_layout_json=json.dumps(encrypted_layout.to_dict()),
            plaintext_layout_json=json.dumps(plaintext_layout.to_dict()),
            he_fingerprint=self.kit.he_fingerprint,
            params_fingerprint=self.kit.params.fingerprint(),
            max_wait_s=self.wait_s,
            rounds=rounds,
        )
        waiting = _WaitLog(self._clock, self.log_every_s)
        while True:
            reply = self._with_retries(
                "join",
                lambda: self._stub.Join(request, timeout=self.wait_s + self.rpc_timeout_s, metadata=self._metadata),
                waiting=True,
            )
            if reply is None or not reply.formed:
                if reply is not None and waiting.due():
                    self._log_forming(reply, waiting)
                continue
            self._layouts = (encrypted_layout, plaintext_layout)
            return JoinInfo(
                site=reply.site,
                members=tuple(reply.members),
                total_weight=reply.total_weight,
                share=reply.share,
                rounds=reply.rounds,
                current_round=reply.current_round,
                send_initial_model=reply.send_initial_model,
            )

    def submit(
        self,
        round: int,
        encrypted_chunks: Iterable[bytes],
        plaintext: np.ndarray,
        *,
        progress: Progress | None = None,
    ) -> SubmitReceipt:
        """Streams this site's update for ``round`` as ``encrypted_chunks`` yields it (encryption and upload overlap).

        Args:
            round: the round (0: the initial model, plaintext only, ``encrypted_chunks`` empty).
            encrypted_chunks: framed ciphertexts of the share-weighted encrypted part, in order.
            plaintext: this site's plaintext-part values, unweighted (the server weights them); for round 0 the
                concatenation of the encrypted-part and plaintext-part values.
            progress: called with ``(chunks sent, chunks in all)``.

        The update is kept until :meth:`fetch_global` of the same round returns, to be submitted again if the
        server restarts and loses it.

        Raises:
            RoundClosedError: the round closed before the update was recorded.
            FederationError: refused (duplicate, wrong sizes, bad chunk, ...); the message says what was wrong.
            ValueError: the sizes do not match the layouts given to :meth:`join`.
        """
        expected_chunks, expected_values = self._sizes(round)
        field = plaintext_field(round, *self._layouts)
        values = np.ascontiguousarray(plaintext, dtype=WIRE_DTYPES[field]).reshape(-1)  # kept as it travels
        if values.size != expected_values:
            what = "encrypted and plaintext values of the initial model" if round == 0 else "plaintext-layout values"
            raise ValueError(f"round {round}: plaintext holds {values.size} values; expected {expected_values} {what}")
        kept = _KeptUpdate(round, iter(encrypted_chunks), expected_chunks, values, field)
        self._kept = {r: k for r, k in self._kept.items() if r > round}
        self._kept[round] = kept
        try:
            return self._send(kept, progress, resubmission=False)
        except BaseException:
            del self._kept[round]  # refused or not sent: nothing to submit again later
            raise

    def fetch_global(self, round: int, *, progress: Progress | None = None) -> GlobalModel:
        """Waits for ``round`` to close and downloads its global model.

        Submits this site's kept update again if the server says it is not recorded (the server restarted).

        Raises:
            FederationError: the round failed (the message says why), or the round does not exist.
        """
        started = time.monotonic()
        waiting = _WaitLog(self._clock, self.log_every_s)
        while True:
            outcome = self._with_retries(
                f"fetch round {round}", lambda: self._download(round, progress, started), waiting=True
            )
            if isinstance(outcome, GlobalModel):
                self._kept = {r: k for r, k in self._kept.items() if r > round}
                return outcome
            if outcome is not None:
                self._resubmit_if_lost(round, outcome)
                if waiting.due():
                    _log_round_wait(round, outcome, waiting)

    def status(self) -> RoundStatus:
        reply = self._with_retries(
            "status",
            lambda: self._stub.GetRoundStatus(
                pb.RoundStatusRequest(), timeout=self.rpc_timeout_s, metadata=self._metadata
            ),
        )
        return _round_status(reply)

    def leave(self, why: str, timeout_s: float = 10.0) -> tuple[str, ...]:
        """Tells the server this site takes part in no further round, so the others stop waiting for it.

        One attempt, no retries: it runs while the site stops. Returns the members still taking part.
        """
        reply = self._stub.Leave(pb.LeaveRequest(why=why), timeout=timeout_s, metadata=self._metadata)
        return tuple(reply.members_left)

    def close(self) -> None:
        """Closes the connection; a call waiting or retrying on another thread ends with :class:`ClientClosedError`."""
        self._closed.set()
        self._channel.close()

    def __enter__(self) -> AggregatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------------------------

    def _sizes(self, round_number: int) -> tuple[int, int]:
        if self._layouts is None:
            raise RuntimeError("join() first: the layouts given there fix the sizes of every update")
        encrypted, plaintext = self._layouts
        if round_number == 0:
            return 0, encrypted.numel + plaintext.numel
        return num_chunks(encrypted.numel, self.kit.params), plaintext.numel

    def _send(self, kept: _KeptUpdate, progress: Progress | None, resubmission: bool) -> SubmitReceipt:
        started, attempts = time.monotonic(), 0

        def attempt() -> pb.SubmitReply:
            nonlocal attempts
            attempts += 1
            return self._stub.SubmitUpdate(kept.messages(progress), timeout=self.rpc_timeout_s, metadata=self._metadata)

        try:
            self._with_retries(f"submit round {kept.round}", attempt)
        except FederationError as err:
            if kept.source_error is not None:
                raise kept.source_error from err
            if err.code == grpc.StatusCode.ALREADY_EXISTS and (attempts > 1 or resubmission):
                # An earlier attempt got through and only its reply was lost: the update is recorded.
                logger.info("round %d: the server already has this site's update", kept.round)
            else:
                raise
        return SubmitReceipt(kept.round, kept.nbytes, time.monotonic() - started)

    def _resubmit_if_lost(self, round_number: int, status: RoundStatus) -> None:
        kept = self._kept.get(round_number)
        if status.phase == "failed":
            raise FederationError(status.failure or "the federation failed", grpc.StatusCode.ABORTED, Reason.FAILED)
        if kept is None or status.phase != "open" or status.current_round != round_number or status.this_site_submitted:
            return
        logger.warning(
            "round %d: the server does not have this site's update (it restarted); submitting it again", round_number
        )
        try:
            self._send(kept, None, resubmission=True)
        except RoundClosedError:
            pass  # closed meanwhile without it; the global model will say who took part

    def _download(self, round_number: int, progress: Progress | None, started: float) -> GlobalModel | RoundStatus:
        if round_number in self._kept:
            # Before waiting: a restarted server has forgotten what this site sent (cheap when nothing happened).
            self._resubmit_if_lost(round_number, self.status())
        stream = self._stub.GetGlobalModel(
            pb.GlobalModelRequest(round=round_number, max_wait_s=self.wait_s),
            timeout=self.wait_s + self.rpc_timeout_s,
            metadata=self._metadata,
        )
        first = next(stream, None)
        if first is None:
            raise FederationError(f"fetch round {round_number}: the server sent nothing")
        if first.WhichOneof("part") == "pending":
            stream.cancel()  # nothing else follows; release the call now
            return _round_status(first.pending)
        header, header_at = first.header, time.monotonic()
        chunks: list[bytes] = []
        values = np.empty(header.plaintext_count, dtype=np.float64)
        filled, received = 0, 0
        for part in stream:
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

    def _with_retries(self, what: str, call: Callable[[], T], waiting: bool = False) -> T | None:
        """Runs ``call``, retrying UNAVAILABLE with exponential backoff for up to ``retry_budget_s``.

        With ``waiting``, a deadline that expires returns None (the caller asks again) instead of failing.
        """
        outage_started: float | None = None
        delay = 0.2
        log = _WaitLog(self._clock, self.log_every_s)
        while True:
            self._raise_if_closed(what)
            try:
                return call()
            except (grpc.RpcError, ValueError) as err:  # ValueError: the channel was closed under the call
                self._raise_if_closed(what)
                if not isinstance(err, grpc.RpcError):
                    raise
                code, details = _code_and_details(err)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and waiting:
                    return None
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise _federation_error(what, err) from None
                now = self._clock()
                outage_started = outage_started if outage_started is not None else now
                left = self.retry_budget_s - (now - outage_started)
                if left <= 0:
                    raise ServerUnavailableError(
                        f"{what}: the aggregator at {self.server} was unavailable for {self.retry_budget_s:g} s "
                        f"({details}). Is it running, is the address right, and does its kit come from the same "
                        "provisioning run as this site's?",
                        code,
                    ) from None
                if log.due():
                    logger.info(
                        "%s: the aggregator at %s is unavailable since %.0f s (%s); retrying until the budget "
                        "(retry_budget_s=%g) runs out in %.0f s",
                        what,
                        self.server,
                        now - outage_started,
                        details,
                        self.retry_budget_s,
                        left,
                    )
                if self._closed.wait(min(delay, left) * random.uniform(0.8, 1.0)):
                    self._raise_if_closed(what)
                delay = min(delay * 2, 5.0)

    def _raise_if_closed(self, what: str) -> None:
        if self._closed.is_set():
            raise ClientClosedError(f"{what}: the client was closed (the site is stopping)", grpc.StatusCode.CANCELLED)

    def _log_forming(self, reply: pb.JoinReply, waiting: _WaitLog) -> None:
        joined = ""
        try:  # the names are worth one cheap call; the count alone must do if it fails
            answer = self._stub.GetRoundStatus(pb.RoundStatusRequest(), timeout=5, metadata=self._metadata)
            status = _round_status(answer)
            if status.joined:
                joined = f" ({', '.join(status.joined)})"
        except grpc.RpcError:
            pass
        logger.info(
            "waiting for the federation to form since %.0f s: %d of %d site(s) joined%s",
            waiting.elapsed(),
            reply.joined,
            reply.expected,
            joined,
        )


def _code_and_details(err: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    if isinstance(err, grpc.Call):
        return err.code(), err.details() or str(err)
    return None, str(err)


def _federation_error(what: str, err: grpc.RpcError) -> FederationError:
    code, details = _code_and_details(err)
    reason = None
    if isinstance(err, grpc.Call):
        for key, value in err.trailing_metadata() or ():
            if key == REFUSAL_REASON_METADATA:
                reason = Reason.parse(value)
    cls = RoundClosedError if reason is Reason.ROUND_CLOSED else FederationError
    name = code.name if code is not None else "error"
    return cls(f"{what}: {details} ({name})", code, reason)


def _round_status(message: pb.RoundStatus) -> RoundStatus:
    return RoundStatus(
        phase=_PHASES.get(message.phase, "unknown"),
        current_round=message.current_round,
        rounds=message.rounds,
        last_closed_round=message.last_closed_round,
        members=tuple(message.members),
        submitted=tuple(message.submitted),
        this_site_submitted=message.this_site_submitted,
        failure=message.failure,
        joined=tuple(message.joined),
        seconds_left=message.seconds_left,
        activity=tuple(MemberActivity(a.site, a.idle_s, a.last_call) for a in message.activity),
        left=tuple(message.left),
        site=message.site,
    )


class _WaitLog:
    """When the next "still waiting" line is due: the first at once, then every ``every_s`` on ``clock``."""

    def __init__(self, clock: Callable[[], float], every_s: float) -> None:
        self._clock, self.every_s = clock, every_s
        self.started = clock()
        self._next: float | None = None

    def due(self) -> bool:
        now = self._clock()
        if self._next is not None and now < self._next:
            return False
        self._next = now + self.every_s
        return True

    def elapsed(self) -> float:
        return self._clock() - self.started


def _log_round_wait(round_number: int, status: RoundStatus, waiting: _WaitLog) -> None:
    if status.phase == "forming":
        logger.info("round %d: waiting since %.0f s; the federation is still forming", round_number, waiting.elapsed())
        return
    if status.current_round != round_number:
        return  # closed meanwhile: the global model comes with the next call
    left = set(status.left)
    missing = [m for m in status.members if m not in status.submitted and m not in left]
    idle = {a.site: (a.idle_s, a.last_call) for a in status.activity}
    described = [
        f"{m} (last heard {idle[m][0]:.0f} s ago: {idle[m][1]})" if m in idle and idle[m][1] else m for m in missing
    ]
    logger.info(
        "round %d: waiting since %.0f s for %s; submitted: %s%s%s",
        round_number,
        waiting.elapsed(),
        ", ".join(described) or "the round to close",
        ", ".join(status.submitted) or "none",
        f"; left: {', '.join(status.left)}" if status.left else "",
        f"; the round closes or fails within {status.seconds_left:.0f} s" if status.seconds_left > 0 else "",
    )
