"""A site's connection to the aggregator: :class:`AggregatorClient` and the answer to its join, :class:`JoinInfo`.

The calls are thin: the retrying lives in :mod:`~lightning_fhe.client.retry`, the update's stream in
:mod:`~lightning_fhe.client.upload`, the global model's in :mod:`~lightning_fhe.client.download`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from lightning_fhe.client.download import ChunkConsumer, GlobalModel, IncomingGlobalModel, receive_global_model
from lightning_fhe.client.errors import FederationError, RoundClosedError
from lightning_fhe.client.masking import SiteMasking
from lightning_fhe.client.retry import RetryLoop, WaitLog
from lightning_fhe.client.status import RoundStatus, log_round_wait, round_status
from lightning_fhe.client.upload import KeptUpdate, Progress, SubmitReceipt, send_update
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto import aggregator_pb2_grpc as pb_grpc
from lightning_fhe.proto.reasons import Reason
from lightning_fhe.proto.update_shape import UpdateShape, update_shape
from lightning_fhe.proto.wire import (
    SITE_NAME_METADATA,
    channel_options,
    mask_key_from_message,
    mask_key_message,
)
from lightning_fhe.provision.kits import SiteKit, load_site_kit

logger = logging.getLogger("lightning_fhe.client")  # the whole client logs under one name users configure


@dataclass(frozen=True)
class JoinInfo:
    site: str  # name from the certificate
    members: tuple[str, ...]  # fixed at formation
    total_weight: float  # W
    share: float  # this site's w_i / W
    rounds: int  # total number of rounds (round numbers 1..rounds)
    current_round: int  # the round open for submissions (1 after formation; >1 after a restart)
    send_initial_model: bool  # this site must submit its initial state as round 0 (plaintext)
    masked: bool = False  # updates carry pairwise masks (lightning_fhe.masking); rounds may be re-collected


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
        masking: pairwise masks, so that no coalition of the server with other sites reads this site's update
            (docs/security.md). None: when every member masks and there are 3 or more; True: only in a masked
            federation; False: never (a federation masks only when every member does).
        min_clients: the fewest members a masked round may have for this site to upload to it; default: the kit's.
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
        masking: bool | None = None,
        min_clients: int | None = None,
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
        self._retries = RetryLoop(self.server, retry_budget_s, log_every_s, clock, self._closed)
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
        self._kept: dict[int, KeptUpdate] = {}
        self._masking_setting = masking
        self._min_clients = self.kit.min_clients if min_clients is None else min_clients
        self._masking: SiteMasking | None = None  # made at join: it keeps the site's X25519 key in the kit folder
        self._masked_for: dict[int, tuple[int, tuple[str, ...]]] = {}  # round -> (attempt, members) last sent

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
        if self._masking_setting is not False:
            try:
                instance = self.status().instance
            except FederationError:
                instance = None  # refused (e.g. formed without this site): the join says why in its own words
            if instance is not None:
                self._announce(request, instance)
        waiting = WaitLog(self._clock, self.log_every_s)
        while True:
            reply = self._retries.run(
                "join",
                lambda: self._stub.Join(request, timeout=self.wait_s + self.rpc_timeout_s, metadata=self._metadata),
                waiting=True,
            )
            if reply is not None and self._masking is not None and reply.federation_instance != self._masking.instance:
                self._announce(request, reply.federation_instance)  # the server restarted afresh: a new federation
                continue
            if reply is None or not reply.formed:
                if reply is not None and waiting.due():
                    self._log_forming(reply, waiting)
                continue
            self._layouts = (encrypted_layout, plaintext_layout)
            if self._masking is not None:
                from lightning_fhe.masking.site_key import check_key_fingerprints  # (it imports this package)

                keys = [mask_key_from_message(key) for key in reply.mask_keys]
                check_key_fingerprints(keys, self.site, self.kit.key_fingerprint)  # he.key = sites: one key for all
                self._masking.accept(tuple(reply.members), reply.masked, keys)
            return JoinInfo(
                site=reply.site,
                members=tuple(reply.members),
                total_weight=reply.total_weight,
                share=reply.share,
                rounds=reply.rounds,
                current_round=reply.current_round,
                send_initial_model=reply.send_initial_model,
                masked=reply.masked,
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
        kept = KeptUpdate.for_round(self._shape(round), encrypted_chunks, plaintext)
        self._forget_kept(up_to=round)
        self._kept[round] = kept
        try:
            if not self._masks_round(round):
                return self._send(kept, progress, resubmission=False)
            while True:
                status = self._open_attempt(round)
                if status.this_site_submitted:
                    # Sent before this process started (a restart): that upload counts; a second encryption would
                    # go out under the same masks.
                    logger.info("round %d: the server already has this site's update; not sending another", round)
                    return SubmitReceipt(round, 0, 0.0)
                try:
                    return self._send(kept, progress, resubmission=False, status=status)
                except FederationError as err:
                    if err.reason is not Reason.ATTEMPT_CHANGED or kept.source_error is not None:
                        raise
                    # re-collected meanwhile: mask for the new attempt and send again
        except BaseException:
            self._kept.pop(round).close()  # refused or not sent: nothing to submit again later
            raise

    def fetch_global(
        self,
        round: int,
        *,
        progress: Progress | None = None,
        chunks_into: Callable[[IncomingGlobalModel], ChunkConsumer] | None = None,
    ) -> GlobalModel:
        """Waits for ``round`` to close and downloads its global model.

        Submits this site's kept update again if the server says it is not recorded (the server restarted).

        Args:
            progress: called with ``(chunks received, chunks in all)``.
            chunks_into: where the encrypted chunks go as they arrive, instead of a list in memory: called once per
                download attempt, when the global model's header is in, with what is coming; it returns a
                :class:`~lightning_fhe.client.download.ChunkConsumer` whose ``add`` takes each chunk in order and
                whose ``finish`` is called once all arrived (e.g. a
                :class:`~lightning_fhe.he.pool.StreamDecryption`, which decrypts while the rest is in transit). A
                download that breaks and is retried drops its consumer and asks for a new one, which gets every
                chunk again from the first. The returned model's ``encrypted_chunks`` is then empty.

        Raises:
            FederationError: the round failed (the message says why), or the round does not exist.
        """
        started = time.monotonic()
        waiting = WaitLog(self._clock, self.log_every_s)
        while True:
            outcome = self._retries.run(
                f"fetch round {round}", lambda: self._download(round, progress, started, chunks_into), waiting=True
            )
            if isinstance(outcome, GlobalModel):
                self._check_masked_sum(outcome)
                self._forget_kept(up_to=round)
                return outcome
            if outcome is not None:
                self._resubmit_if_lost(round, outcome)
                if waiting.due():
                    log_round_wait(round, outcome, waiting)

    def status(self) -> RoundStatus:
        reply = self._retries.run(
            "status",
            lambda: self._stub.GetRoundStatus(
                pb.RoundStatusRequest(), timeout=self.rpc_timeout_s, metadata=self._metadata
            ),
        )
        return round_status(reply)

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
        self._forget_kept(up_to=None)

    def __enter__(self) -> AggregatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------------------------

    def _shape(self, round_number: int) -> UpdateShape:
        if self._layouts is None:
            raise RuntimeError("join() first: the layouts given there fix the sizes of every update")
        return update_shape(round_number, *self._layouts, self.kit.params)

    def _forget_kept(self, up_to: int | None) -> None:
        """Closes the kept updates of rounds up to ``up_to`` (None: all), whose files then go."""
        for r in [r for r in self._kept if up_to is None or r <= up_to]:
            self._kept.pop(r).close()

    def _announce(self, request: pb.JoinRequest, instance: str) -> None:
        """Puts this site's signed mask key for federation ``instance`` into ``request``."""
        if self._masking is None or self._masking.instance != instance:
            self._masking = SiteMasking(self.kit, self.site, self._masking_setting is True, self._min_clients, instance)
        request.mask_key.CopyFrom(mask_key_message(self._masking.announcement(self.kit.key_fingerprint)))
        request.require_masking = self._masking.required

    def _open_attempt(self, round_number: int) -> RoundStatus:
        """The status of a masked round this site may upload to now. Nothing is ever sent unmasked, not even to a
        round that will refuse it.

        Raises:
            RoundClosedError: the round closed, or its open attempt leaves this site out.
        """
        status = self.status()
        if status.phase != "open" or status.current_round != round_number:
            raise RoundClosedError(
                f"round {round_number} is no longer open (the server is {status.phase} at round "
                f"{status.current_round})"
            )
        if self.site not in status.attempt_members:
            raise RoundClosedError(
                f"round {round_number} is re-collected (attempt {status.attempt}) among "
                f"{', '.join(status.attempt_members)}, without this site"
            )
        return status

    def _masks_round(self, round_number: int) -> bool:
        return self._masking is not None and self._masking.active and round_number > 0

    def _send(
        self, kept: KeptUpdate, progress: Progress | None, resubmission: bool, status: RoundStatus | None = None
    ) -> SubmitReceipt:
        """Streams ``kept``; in a masked round, masked for the attempt ``status`` names."""
        def submit(messages: Iterator[pb.UpdatePart]) -> pb.SubmitReply:
            return self._stub.SubmitUpdate(messages, timeout=self.rpc_timeout_s, metadata=self._metadata)

        if status is None:
            return send_update(submit, self._retries, kept, progress, resubmission)
        assert self._masking is not None
        mask = self._masking.mask_for(kept.round, status.attempt, status.attempt_members)
        self._masked_for[kept.round] = (status.attempt, status.attempt_members)
        if status.attempt > 1:
            logger.warning(
                "round %d: re-collected, attempt %d among %s; sending this site's update again under their masks",
                kept.round,
                status.attempt,
                ", ".join(status.attempt_members),
            )
        return send_update(submit, self._retries, kept, progress, resubmission, status.attempt, mask)

    def _resubmit_if_lost(self, round_number: int, status: RoundStatus) -> None:
        kept = self._kept.get(round_number)
        if status.phase == "failed":
            raise FederationError(status.failure or "the federation failed", grpc.StatusCode.ABORTED, Reason.FAILED)
        if kept is None or status.phase != "open" or status.current_round != round_number or status.this_site_submitted:
            return
        masked = self._masks_round(round_number)
        if masked and self.site not in status.attempt_members:
            sent = self._masked_for.get(round_number)
            if sent is not None and sent[0] < status.attempt:
                logger.warning(
                    "round %d: attempt %d leaves this site out, though it sent its update to attempt %d: the upload "
                    "was lost, or the server is isolating sites (docs/security.md, 'What a lying server can do')",
                    round_number,
                    status.attempt,
                    sent[0],
                )
                self._masked_for[round_number] = (status.attempt, ())
            return
        if not masked or self._masked_for.get(round_number, (0,))[0] == status.attempt:
            logger.warning(
                "round %d: the server does not have this site's update (it restarted); submitting it again",
                round_number,
            )
        try:
            self._send(kept, None, resubmission=True, status=status if masked else None)
        except RoundClosedError:
            pass  # closed meanwhile without it; the global model will say who took part

    def _check_masked_sum(self, model: GlobalModel) -> None:
        """A masked sum decrypts only over the members the masks were made for: refuse any other."""
        sent = self._masked_for.pop(model.round, None)
        if not self._masks_round(model.round) or sent is None or self.site not in model.participants:
            return
        if set(model.participants) != set(sent[1]):
            raise FederationError(
                f"round {model.round}: the server's sum lists {', '.join(model.participants)}, but this site masked "
                f"its update for attempt {sent[0]} among {', '.join(sent[1])}; the masks do not cancel in that sum",
                grpc.StatusCode.DATA_LOSS,
                Reason.MISMATCH,
            )

    def _download(
        self,
        round_number: int,
        progress: Progress | None,
        started: float,
        chunks_into: Callable[[IncomingGlobalModel], ChunkConsumer] | None,
    ) -> GlobalModel | RoundStatus:
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
            return round_status(first.pending)
        try:
            return receive_global_model(round_number, first.header, stream, progress, started, chunks_into)
        except BaseException:
            stream.cancel()  # a consumer that failed, or a broken stream: release the call before anything else
            raise

    def _log_forming(self, reply: pb.JoinReply, waiting: WaitLog) -> None:
        joined = ""
        try:  # the names are worth one cheap call; the count alone must do if it fails
            answer = self._stub.GetRoundStatus(pb.RoundStatusRequest(), timeout=5, metadata=self._metadata)
            status = round_status(answer)
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
