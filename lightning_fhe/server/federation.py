"""The federation as the aggregator runs it: formation, the open round, its running sum, and the state on disk.

This is where the pure pieces meet: :class:`~lightning_fhe.server.membership.Formation` and
:class:`~lightning_fhe.server.rounds.RoundState` decide, :class:`~lightning_fhe.server.accumulator.RoundAccumulator`
sums, :class:`~lightning_fhe.server.store.StateStore` persists. It adds one lock, the clock, and waiting (a Join
until the federation forms, a download until its round closes). It knows nothing of gRPC: requests come in and
answers leave as the dataclasses of :mod:`~lightning_fhe.server.messages`, refusals as
:class:`~lightning_fhe.server.errors.Refusal`, which the servicer translates. Tests drive it directly with a fake
clock.

Life cycle: FORMING (sites join) -> OPEN (round 0 when a site sends the initial model, then rounds 1..rounds)
-> FINISHED, or FAILED when formation or a round misses its quorum at the timeout. A failed federation is not
recorded as such: restarting the server reopens the failed round, with every earlier round still on disk.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from lightning_fhe.he.context import HEContext
from lightning_fhe.proto.sealed_keys import SealedKeyShare
from lightning_fhe.proto.update_shape import UpdateShape, update_shape
from lightning_fhe.server.accumulator import Aggregate, RoundAccumulator, Upload
from lightning_fhe.server.activity import ActivityLog, MemberActivity
from lightning_fhe.server.admission import (
    OPERATOR,
    Method,
    check_caller,
    check_round_exists,
    check_upload_header,
    clamp_wait,
)
from lightning_fhe.server.config import ServerConfig
from lightning_fhe.server.errors import Reason, Refusal, Status
from lightning_fhe.server.initial_model import InitialModelError, flatten_initial_state
from lightning_fhe.server.key_relay import KeyRelay
from lightning_fhe.server.membership import Formation, Membership, SiteDeclaration, check_identity
from lightning_fhe.server.messages import (
    ChunkPart,
    JoinResult,
    Phase,
    PlaintextPart,
    StatusView,
    SubmitResult,
    UploadHeader,
    UploadPart,
)
from lightning_fhe.server.peak_memory import peak_rss_bytes
from lightning_fhe.server.rounds import Decision, Outcome, QuorumRule, RoundState
from lightning_fhe.server.store import AggregateReader, FederationRecord, StateError, StateStore

logger = logging.getLogger("lightning_fhe.server")

# How often a waiting call looks up whether its caller is still there.
_POLL_S = 0.25


@dataclass
class _RoundStats:
    opened_at: float
    bytes_in: int = 0
    bytes_out: int = 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class Federation:
    """One federation, driven by the servicer's threads and a timer thread calling :meth:`tick`.

    Args:
        config: the options, resolved against the kit (:meth:`ServerConfig.with_kit`).
        context: the server's keyless HE context.
        he_fingerprint: the server kit's HE fingerprint; sites must present the same.
        project: the federation's name, recorded in ``state_dir``.
        store: where the federation record and aggregates live.
        initial_state: the configured initial model's state dict, or None (a site sends it).
        clock: seconds on a monotonic clock; tests pass a fake one.
    """

    def __init__(
        self,
        config: ServerConfig,
        context: HEContext,
        he_fingerprint: str,
        project: str,
        store: StateStore,
        initial_state: Mapping[str, torch.Tensor] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.context = context
        self.params = context.params
        self.he_fingerprint = he_fingerprint
        self.params_fingerprint = self.params.fingerprint()
        self.project = project
        self.store = store
        self._initial_state = initial_state
        self._initial_values: np.ndarray | None = None
        self._clock = clock
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_uploads)
        self._rule = QuorumRule(config.quorum, config.wait_after_min_s, config.round_timeout_s)

        self.phase = Phase.FORMING
        self.formation: Formation | None = None
        self.membership: Membership | None = None
        self.round: RoundState | None = None
        self.accumulator: RoundAccumulator | None = None
        self.last_closed_round = -1
        self.failure = ""
        self.ended_at: float | None = None
        self.fetched_final: set[str] = set()
        # Members that left (site -> why). Kept in memory only: after a restart a departed site is waited for again,
        # but no longer than the quorum's grace period or round_timeout_s, as for any member that stays away.
        self.left: dict[str, str] = {}
        self._stats = _RoundStats(opened_at=clock())
        self._last_close_why = ""
        self._activity = ActivityLog(started_at=clock())
        self._stream_cancels: set[Callable[[Refusal], None]] = set()  # of the uploads reading their stream
        self.key_relay = KeyRelay()  # he.key = sites: the CKKS key's sealed copies, once shared
        self._restore()

    # -- start-up ---------------------------------------------------------------------------------------------------

    def _restore(self) -> None:
        store, now = self.store, self._clock()
        store.prepare()
        record = store.load_federation()
        # A new federation gets a new id, so that the sites' masks of one never repeat in another made with the
        # same kits; a resumed one keeps its own (or, recorded before ids existed, gets one now).
        self.instance = record.instance if record is not None and record.instance else secrets.token_hex(16)
        if record is None:
            if store.stored_rounds():
                raise StateError(
                    f"state_dir {store.root} holds round aggregates but no federation.json; it was not written by "
                    "this server, or was damaged: move it aside to start afresh"
                )
            self.formation = Formation(
                self.config.expected, self._rule, now, self.he_fingerprint, self.params_fingerprint
            )
            logger.info(
                "forming the federation: expecting %s (quorum %d, round_timeout_s=%g)",
                ", ".join(self.config.expected),
                min(self.config.quorum, len(self.config.expected)),
                self.config.round_timeout_s,
            )
            return
        if record.he_fingerprint != self.he_fingerprint:
            raise StateError(
                f"state_dir {store.root} belongs to a federation with HE fingerprint {record.he_fingerprint}, but "
                f"this server kit has {self.he_fingerprint}: use another state_dir, or the matching kit"
            )
        membership = record.membership
        self.last_closed_round = store.check_resumable(record, self.config.rounds)
        sealed = store.load_sealed_keys()
        if sealed is not None and not KeyRelay.fits(sealed, membership.members):
            raise StateError(
                f"state_dir {store.root}: the sealed keys are from {sealed.sender!r} for "
                f"{', '.join(sealed.keys)}, which does not fit the members {', '.join(membership.members)}: "
                "the file belongs to another federation; remove it"
            )
        self.key_relay = KeyRelay(sealed)
        if self.last_closed_round < 0 and self._initial_state is None and membership.initial_model_site is None:
            # Formed with a configured initial model that is no longer configured: a member sends it instead.
            membership = replace(membership, initial_model_site=membership.members[0])
        self.membership = membership
        dropped = [m for m in membership.members if m not in self.config.expected]
        if dropped:
            logger.warning("members %s are no longer in 'clients' and will be refused", ", ".join(dropped))
        logger.info(
            "resuming federation %r from %s: members %s, last closed round %d of %d",
            record.project,
            store.root,
            ", ".join(membership.members),
            self.last_closed_round,
            self.config.rounds,
        )
        with self._cond:  # no other thread runs yet, but _finish notifies, which needs the lock
            self.phase = Phase.OPEN
            if self.last_closed_round < 0 and self._initial_state is not None:
                self._write_initial_model()  # saves the record too
            else:
                self._save_record()
            if self.last_closed_round >= self.config.rounds:
                self._finish(now)
            else:
                self._open_round(self.last_closed_round + 1, now)

    # -- joining ----------------------------------------------------------------------------------------------------

    def join(
        self,
        site: str,
        declaration: SiteDeclaration,
        max_wait_s: float = 0.0,
        is_active: Callable[[], bool] = lambda: True,
    ) -> JoinResult:
        """Records a site's join, then waits up to ``max_wait_s`` for the federation to form."""
        max_wait_s = clamp_wait(max_wait_s)
        with self._cond:
            now = self._clock()
            self._tick_locked(now)
            self._refuse_if_failed()
            self._note_heard(site, "join", now)
            if self.phase is Phase.FORMING:
                assert self.formation is not None
                self.formation.check(site, declaration, self.config.rounds)
                joined = self.formation.joined
                layouts = (declaration.encrypted_layout, declaration.plaintext_layout)
                defines_layouts = self.formation.sets_layouts(site) and layouts != self.formation.layouts
                if self._initial_state is not None and defines_layouts:
                    # The first site's layouts become the federation's: check the configured model fits them now
                    # (once: a waiting site asks again every max_wait_s with the same layouts).
                    self._initial_values = self._flatten_initial(declaration)
                first_time = site not in joined
                self.formation.join(site, declaration, now, self.config.rounds)
                if first_time:  # a waiting site asks again every max_wait_s: log it once
                    expected = len(self.formation.expected)
                    logger.info("site %s joined (weight %g): %d of %d", site, declaration.weight, len(joined), expected)
                self._tick_locked(now)
            else:
                check_identity(
                    site,
                    declaration,
                    self.config.expected,
                    self.he_fingerprint,
                    self.params_fingerprint,
                    self.config.rounds,
                )
                assert self.membership is not None
                self.membership.check_rejoin(site, declaration)
                self.key_relay.check_fingerprint(site, declaration.mask_key)
                self._renew_mask_key(site, declaration)
                logger.info("member %s joined again", site)
            deadline = now + max_wait_s
            while self.phase is Phase.FORMING:
                remaining = deadline - self._clock()
                if remaining <= 0 or not is_active():
                    assert self.formation is not None
                    return JoinResult(
                        False, site, len(self.formation.joined), len(self.formation.expected), instance=self.instance
                    )
                self._cond.wait(min(remaining, _POLL_S))
            self._refuse_if_failed()
            return self._join_result(site)

    def _renew_mask_key(self, site: str, declaration: SiteDeclaration) -> None:
        """Keeps a rejoining member's announcement (same key, checked) when it changed, e.g. its key fingerprint."""
        membership = self.membership
        assert membership is not None
        key = declaration.mask_key
        if not membership.mask_keys or key is None or key == membership.mask_keys[membership.members.index(site)]:
            return
        self.membership = membership.with_mask_key(key)
        self._save_record()

    # -- the sites' CKKS key (he.key = sites) -----------------------------------------------------------------------

    def check_key_sharer(self, site: str) -> tuple[str, ...]:
        """Refuses ``site`` unless it may share the CKKS key now (it is the first member in name order of the formed
        federation); returns the members, who get one sealed copy each but the sharer."""
        with self._cond:
            now = self._clock()
            self._tick_locked(now)
            self._refuse_if_failed()
            self._note_heard(site, "key", now)
            members = self._formed_members("share the CKKS key")
            KeyRelay.check_sharer(site, members)
            return members

    def share_sealed_keys(self, site: str, share: SealedKeyShare) -> int:
        """Stores the sealed copies of the CKKS key (one per other member, checked by the caller's
        :class:`~lightning_fhe.proto.sealed_keys.SealedKeyAssembler`) in ``state_dir``; returns how many it holds.
        Once per federation (:meth:`KeyRelay.accept`)."""
        with self._cond:
            members = self.check_key_sharer(site)
            if not self.key_relay.accept(site, share, members):
                logger.info("site %s shared key %s again; the first copies stay", site, share.key_fingerprint)
                return len(share.keys)
            try:
                self.store.save_sealed_keys(share)
            except OSError as err:
                raise Refusal(
                    Status.UNAVAILABLE, Reason.BUSY, f"cannot write the sealed keys to state_dir: {err}; try again"
                ) from None
            self.key_relay.share = share
            logger.info(
                "site %s shared the CKKS key %s, sealed for %s", site, share.key_fingerprint, ", ".join(share.keys)
            )
            self._cond.notify_all()
            return len(share.keys)

    def fetch_sealed_key(
        self, site: str, max_wait_s: float = 0.0, is_active: Callable[[], bool] = lambda: True
    ) -> tuple[SealedKeyShare, bytes]:
        """This member's sealed copy of the CKKS key (with the share it belongs to), waiting up to ``max_wait_s``
        for the key's maker to share it; NOT_FOUND (``key_pending``) if it has not by then."""
        max_wait_s = clamp_wait(max_wait_s)
        with self._cond:
            now = self._clock()
            self._tick_locked(now)
            self._refuse_if_failed()
            self._note_heard(site, "key", now)
            members = self._formed_members("fetch the CKKS key")
            deadline = now + max_wait_s
            while True:
                copy = self.key_relay.copy_for(site, members)
                if copy is not None:
                    assert self.key_relay.share is not None
                    return self.key_relay.share, copy
                self._refuse_if_failed()
                remaining = deadline - self._clock()
                if remaining <= 0 or not is_active():
                    raise self.key_relay.pending(members)
                self._cond.wait(min(remaining, _POLL_S))

    def _formed_members(self, what: str) -> tuple[str, ...]:
        if self.phase is Phase.FORMING or self.membership is None:
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.NOT_JOINED,
                f"the federation is still forming: its members {what} once it formed",
            )
        return self.membership.members

    def _flatten_initial(self, declaration: SiteDeclaration) -> np.ndarray:
        assert self._initial_state is not None
        try:
            return flatten_initial_state(
                self._initial_state,
                declaration.encrypted_layout,
                declaration.plaintext_layout,
                str(self.config.initial_model),
            )
        except InitialModelError as err:
            logger.error("%s", err)
            raise Refusal(Status.FAILED_PRECONDITION, Reason.MISMATCH, str(err)) from None

    def _join_result(self, site: str) -> JoinResult:
        membership = self.membership
        assert membership is not None  # and site is a member: every joined site is one, check_rejoin refused others
        return JoinResult(
            formed=True,
            site=site,
            joined=len(membership.members),
            expected=len(self.config.expected),
            members=membership.members,
            total_weight=membership.total_weight,
            share=membership.share(site),
            rounds=self.config.rounds,
            current_round=max(self.current_round, 1),
            send_initial_model=self.last_closed_round < 0 and membership.initial_model_site == site,
            mask_keys=membership.mask_keys,
            masked=membership.masked,
            instance=self.instance,
        )

    # -- submitting -------------------------------------------------------------------------------------------------

    def submit(
        self,
        site: str,
        parts: Iterator[UploadPart],
        is_active: Callable[[], bool] = lambda: True,
        cancel: Callable[[Refusal], None] | None = None,
    ) -> SubmitResult:
        """Accumulates one update as its parts arrive; on any refusal or a broken stream, nothing of it remains.

        ``parts`` is read outside the lock (it blocks on the network); each part is added under it. ``cancel``
        makes a read of ``parts`` that is blocked, or the next one, raise the refusal it is given: the federation
        calls it when the round closes or fails, so a stream that stalled loses its slot then at the latest.
        """
        header = next(parts, None)
        if not isinstance(header, UploadHeader):
            raise Refusal(
                Status.INVALID_ARGUMENT,
                Reason.BAD_REQUEST,
                "an update stream must start with its header (round and sizes)",
            )
        with self._cond:
            now = self._clock()
            self._tick_locked(now)
            self._note_heard(site, "upload", now)
            round_state = self._reserve_submission(site, header)
            if cancel is not None:
                self._stream_cancels.add(cancel)
        recorded = False
        try:
            self._acquire_slot(site, header, is_active)
            try:
                with self._cond:
                    self._check_still_open(header)
                    assert self.accumulator is not None and self.membership is not None
                    share = self._update_shape(header.round).share(self.membership.share(site))
                    upload = self.accumulator.begin(site, share)
                try:
                    for part in parts:
                        with self._cond:
                            self._check_alive(upload, header)
                            if isinstance(part, ChunkPart):
                                upload.add_chunk(part.index, part.data)
                            elif isinstance(part, PlaintextPart):
                                upload.add_plaintext(part.offset, part.data, part.dtype)
                            else:
                                raise Refusal(
                                    Status.INVALID_ARGUMENT, Reason.BAD_REQUEST, "a second header in one update stream"
                                )
                            self._stats.bytes_in += len(part.data)
                    with self._cond:
                        self._check_alive(upload, header)
                        upload.commit()
                        now = self._clock()
                        round_state.finish_upload(site, recorded=True, now=now)
                        recorded = True
                        submitted = len(round_state.submitted)
                        logger.info(
                            "round %d: update from %s recorded (%s), %d of %d",
                            header.round,
                            site,
                            _mb(upload.bytes_received),
                            submitted,
                            len(round_state.members),
                        )
                        result = SubmitResult(header.round, upload.bytes_received, submitted, len(round_state.members))
                        self._tick_locked(now)
                        return result
                except BaseException as err:
                    with self._cond:
                        if upload.state == "open":
                            received = upload.chunks_received
                            upload.abort()
                            why = err.message if isinstance(err, Refusal) else "the stream broke"
                            logger.warning(
                                "round %d: update from %s discarded after %d chunks: %s",
                                header.round,
                                site,
                                received,
                                why,
                            )
                    raise
            finally:
                self._slots.release()
        finally:
            with self._cond:
                if cancel is not None:
                    self._stream_cancels.discard(cancel)
                self._note_heard(site, "upload", self._clock())
                if not recorded:
                    round_state.finish_upload(site, recorded=False, now=self._clock())
                    self._cond.notify_all()

    def _reserve_submission(self, site: str, header: UploadHeader) -> RoundState:
        """Every check that needs no data: who, which round, duplicate, sizes. Marks the site as uploading."""
        self._refuse_if_failed()
        self._check_known(site)
        if self.phase is Phase.FORMING:
            assert self.formation is not None
            joined = site in self.formation.joined
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.ROUND_NOT_OPEN if joined else Reason.NOT_JOINED,
                f"round {header.round} is not open yet: the federation is still forming"
                + ("" if joined else f", and site {site!r} has not joined"),
            )
        assert self.membership is not None
        round_state = self.round
        check_upload_header(
            site,
            header.round,
            header.num_chunks,
            header.plaintext_count,
            self.membership,
            self.config.rounds,
            round_state if self.phase is not Phase.FINISHED else None,
            self.params,
            header.attempt,
        )
        assert round_state is not None
        round_state.start_upload(site, header.round, header.attempt)
        return round_state

    def _acquire_slot(self, site: str, header: UploadHeader, is_active: Callable[[], bool]) -> None:
        """Waits for one of ``max_concurrent_uploads`` slots; the sender is held back by gRPC flow control."""
        while not self._slots.acquire(timeout=_POLL_S):
            if not is_active():
                raise Refusal(
                    Status.CANCELLED, Reason.GONE, f"site {site!r} went away while its update waited for an upload slot"
                )
            with self._cond:
                self._check_still_open(header)

    def _check_still_open(self, header: UploadHeader) -> None:
        self._refuse_if_failed()
        round_number = header.round
        if self.round is None or self.round.number != round_number:
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.ROUND_CLOSED,
                f"round {round_number} closed while this update waited ({self._last_close_why}); it is not included",
            )
        if self.round.masked:
            self.round.check_attempt(header.attempt)

    def _check_alive(self, upload: Upload, header: UploadHeader) -> None:
        if upload.state == "aborted":
            self._refuse_if_failed()
            if self.round is not None and self.round.number == header.round:
                self.round.check_attempt(header.attempt)  # re-collected while it arrived
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.ROUND_CLOSED,
                f"round {header.round} closed while this update was arriving ({self._last_close_why}); "
                "it is not included",
            )

    # -- downloading ------------------------------------------------------------------------------------------------

    def open_global(
        self,
        site: str,
        round_number: int,
        max_wait_s: float = 0.0,
        is_active: Callable[[], bool] = lambda: True,
    ) -> AggregateReader | StatusView:
        """The stored aggregate of ``round_number`` once it is on disk, or the status if it is still open after
        ``max_wait_s`` (the site asks again). Members only: an expected site that missed formation gets nothing."""
        max_wait_s = clamp_wait(max_wait_s)
        with self._cond:
            now = self._clock()
            self._tick_locked(now)
            self._admit_locked(site, Method.DOWNLOAD)
            self._note_heard(site, "download", now)
            if self.phase is Phase.FORMING:
                raise Refusal(
                    Status.FAILED_PRECONDITION, Reason.NOT_JOINED, "the federation is still forming: join first"
                )
            check_round_exists(round_number, self.config.rounds)
            deadline = now + max_wait_s
            attempt = self.round.attempt if self.round is not None else 0
            while True:
                if round_number <= self.last_closed_round:
                    if not self.store.aggregate_path(round_number).exists():
                        raise Refusal(
                            Status.NOT_FOUND,
                            Reason.PRUNED,
                            f"round {round_number}'s aggregate is no longer kept "
                            f"(keep_rounds={self.config.keep_rounds}); "
                            f"the latest is round {self.last_closed_round}",
                        )
                    try:
                        return self.store.open_aggregate(round_number)
                    except StateError as err:  # its header fails the checksum: serve nothing from it
                        logger.error("%s", err)
                        raise Refusal(
                            Status.DATA_LOSS,
                            Reason.DATA_LOSS,
                            f"round {round_number}'s aggregate on the server is damaged: {err}",
                        ) from None
                self._refuse_if_failed()
                remaining = deadline - self._clock()
                recollected = self.round is not None and self.round.attempt != attempt  # its members upload again
                if remaining <= 0 or not is_active() or recollected:
                    return self._status_locked(site)
                self._cond.wait(min(remaining, _POLL_S))

    def note_download(self, site: str, round_number: int, nbytes: int, complete: bool) -> None:
        """Counts bytes sent; a member that fetched the last global model lets the server exit sooner."""
        with self._cond:
            self._stats.bytes_out += nbytes
            self._note_heard(site, "download", self._clock())
            if complete and round_number == self.config.rounds:
                self.fetched_final.add(site)
                self._cond.notify_all()

    # -- leaving ----------------------------------------------------------------------------------------------------

    def leave(self, site: str, why: str) -> tuple[str, ...]:
        """Records that member ``site`` takes part in no further round; returns the members still taking part.

        The open round stops waiting for it (it closes once every remaining member submitted, or fails at once if
        fewer than the quorum remain), and later rounds open without it. Leaving twice is harmless.
        """
        with self._cond:
            now = self._clock()
            self._tick_locked(now)
            self._check_known(site)
            if self.membership is None or site not in self.membership.members:
                raise Refusal(
                    Status.PERMISSION_DENIED,
                    Reason.NOT_MEMBER,
                    f"site {site!r} is not a member of the federation"
                    + (" (it is still forming)" if self.phase is Phase.FORMING else ""),
                )
            if site not in self.left:
                self.left[site] = why[:500]  # a site's words, for the log: bounded
                logger.warning("member %s left the federation: %s", site, self.left[site] or "no reason given")
                if self.round is not None:
                    self.round.leave(site)
                    self._tick_locked(now)
                self._cond.notify_all()
            return tuple(m for m in self.membership.members if m not in self.left)

    # -- status -----------------------------------------------------------------------------------------------------

    def status(self, site: str, operator: bool = False) -> StatusView:
        """The round status as ``site`` may see it (members only), or the operator's full view."""
        with self._cond:
            now = self._clock()
            self._tick_locked(now)
            self._admit_locked(site, Method.STATUS, operator)
            if operator:
                return self._status_locked(OPERATOR, now)
            self._note_heard(site, "status", now)
            return self._status_locked(site, now)

    def admit(self, caller: str, method: Method, operator: bool = False) -> None:
        """Refuses ``caller`` at once if it may not call ``method`` now (see :func:`admission.check_caller`)."""
        with self._cond:
            self._admit_locked(caller, method, operator)

    def _admit_locked(self, caller: str, method: Method, operator: bool = False) -> None:
        formed = self.membership is not None and self.phase is not Phase.FORMING
        members = self.membership.members if formed and self.membership is not None else None
        check_caller(caller, method, self.config.expected, members, operator)

    def _note_heard(self, site: str, call: str, now: float) -> None:
        if site in self.config.expected:
            silence = self._activity.heard(site, call, now)
            if silence is not None:
                logger.info("member %s is heard from again (%s) after %.0f s", site, call, silence)

    def _activity_locked(self, now: float) -> tuple[MemberActivity, ...]:
        if self.phase is Phase.FORMING and self.formation is not None:
            return self._activity.of(self.formation.joined, now)
        return self._activity.of(self.membership.members if self.membership else (), now)

    def _seconds_left_locked(self, now: float) -> float:
        if self.phase is Phase.FORMING and self.formation is not None:
            started, timeout = self.formation.opened_at, self.formation.rule.timeout_s
        elif self.phase is Phase.OPEN and self.round is not None:
            started, timeout = self.round.opened_at, self.round.rule.timeout_s
        else:
            return 0.0
        return max(0.0, started + timeout - now)

    def _warn_silent_locked(self, now: float) -> None:
        """Logs each member silent for ``silent_after_s``, once per silence: whom, since when, what is awaited."""
        if self.phase is not Phase.OPEN or self.membership is None:
            return
        present = [m for m in self.membership.members if m not in self.left]  # a site that left is silent, rightly
        for silent in self._activity.newly_silent(present, now, self.config.silent_after_s):
            waiting = ""
            if self.round is not None:
                pending = [m for m in self.round.members if m not in self.round.participants]
                waiting = f"; round {self.round.number} waits for {', '.join(pending) or 'nobody'}"
            logger.warning(
                "member %s has not been heard from for %.0f s (silent_after_s=%g; last call: %s)%s, "
                "%.0f s before the round times out",
                silent.site,
                silent.idle_s,
                self.config.silent_after_s,
                silent.last_call,
                waiting,
                self._seconds_left_locked(now),
            )

    def plaintext_field(self, round_number: int) -> str:
        """How round ``round_number``'s plaintext values travel: float32 unless the model holds float64 tensors."""
        if self.membership is None:
            return "float64_le"
        return self._update_shape(round_number).plaintext_field

    def _update_shape(self, round_number: int) -> UpdateShape:
        """What round ``round_number``'s updates and global model hold, in the formed federation's layouts."""
        membership = self.membership
        assert membership is not None
        return update_shape(round_number, membership.encrypted_layout, membership.plaintext_layout, self.params)

    @property
    def current_round(self) -> int:
        if self.round is not None:
            return self.round.number
        return self.config.rounds + 1 if self.phase is Phase.FINISHED else max(self.last_closed_round + 1, 0)

    def _status_locked(self, site: str, now: float | None = None) -> StatusView:
        now = self._clock() if now is None else now
        submitted = self.round.participants if self.round is not None else ()
        masked = self.round if self.round is not None and self.round.masked else None
        return StatusView(
            phase=self.phase,
            current_round=self.current_round,
            rounds=self.config.rounds,
            last_closed_round=self.last_closed_round,
            members=self.membership.members if self.membership else (),
            submitted=submitted,
            this_site_submitted=site in submitted,
            failure=self.failure,
            joined=tuple(self.formation.joined) if self.phase is Phase.FORMING and self.formation else (),
            site=site,
            seconds_left=self._seconds_left_locked(now),
            activity=self._activity_locked(now),
            left=tuple(m for m in self.membership.members if m in self.left) if self.membership else (),
            attempt=masked.attempt if masked else 0,
            attempt_members=masked.attempt_members if masked else (),
            instance=self.instance,
        )

    def _check_known(self, site: str) -> None:
        if site not in self.config.expected:
            raise Refusal(
                Status.PERMISSION_DENIED,
                Reason.UNKNOWN_SITE,
                f"site {site!r} is not one of the expected sites ({', '.join(self.config.expected)})",
            )

    def _refuse_if_failed(self) -> None:
        if self.phase is Phase.FAILED:
            raise Refusal(Status.ABORTED, Reason.FAILED, self.failure)

    def uploads_in_progress(self) -> dict[str, int]:
        """Sites whose update is being accumulated right now, and how many of its chunks are in the sum."""
        with self._cond:
            if self.accumulator is None:
                return {}
            return {upload.site: upload.chunks_received for upload in self.accumulator.active}

    def snapshot(self) -> tuple:
        """Everything a refusal must leave unchanged: phase, round, who submitted, the sum's digest (for tests)."""
        with self._cond:
            return (
                self.phase,
                self.current_round,
                self.last_closed_round,
                self.round.participants if self.round else (),
                self.accumulator.digest() if self.accumulator else "",
                tuple(self.formation.joined) if self.formation and self.phase is Phase.FORMING else (),
            )

    # -- time -------------------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Closes or fails formation or the open round when their time has come; the server calls it regularly."""
        with self._cond:
            now = self._clock()
            self._tick_locked(now)
            self._warn_silent_locked(now)

    def seconds_to_next_event(self, cap: float = 1.0) -> float:
        with self._cond:
            now = self._clock()
            decision = self._decide(now)
            wake = decision.wake_at if decision else None
            if self.ended_at is not None:
                wake = self.ended_at + self.config.linger_s
            return cap if wake is None else max(0.0, min(cap, wake - now))

    def exit_code(self) -> int | None:
        """0 once finished and every member fetched the last model (or linger_s passed); 1 after a failure and
        linger_s; None while running."""
        with self._cond:
            if self.ended_at is None:
                return None
            lingered = self._clock() >= self.ended_at + self.config.linger_s
            if self.phase is Phase.FINISHED:
                members = set(self.membership.members) - set(self.left) if self.membership else set()
                return 0 if lingered or members <= self.fetched_final else None
            return 1 if lingered else None

    def _decide(self, now: float) -> Decision | None:
        if self.phase is Phase.FORMING and self.formation is not None:
            return self.formation.decide(now)
        if self.phase is Phase.OPEN and self.round is not None:
            return self.round.decide(now)
        return None

    def _tick_locked(self, now: float) -> None:
        decision = self._decide(now)
        if decision is None or decision.outcome is Outcome.WAIT:
            return
        if self.phase is Phase.FORMING:
            if decision.outcome is Outcome.CLOSE:
                self._close_formation(decision, now)
            else:
                assert self.formation is not None
                joined = ", ".join(self.formation.joined) or "none"
                self._fail(f"the federation could not form: {decision.why} (joined: {joined})", now)
        elif decision.outcome is Outcome.CLOSE:
            self._close_round(decision, now)
        elif decision.outcome is Outcome.RECOLLECT:
            self._recollect(decision, now)
        else:
            assert self.round is not None
            submitted = ", ".join(self.round.participants) or "none"
            self._fail(f"round {self.round.number} failed: {decision.why} (submitted: {submitted})", now)

    # -- transitions ------------------------------------------------------------------------------------------------

    def _close_formation(self, decision: Decision, now: float) -> None:
        assert self.formation is not None
        try:
            membership = self.formation.close(server_has_initial_model=self._initial_values is not None)
        except Exception as err:
            logger.exception("formation could not close")
            self._fail(f"the federation could not form: {err}", now)
            return
        self.membership = membership
        self.formation = None
        membership = self.membership
        logger.info(
            "federation formed (%s): members %s, total weight %g",
            decision.why,
            ", ".join(f"{m} ({w:g})" for m, w in zip(membership.members, membership.weights)),
            membership.total_weight,
        )
        self.phase = Phase.OPEN
        try:
            self._save_record()
            if self._initial_values is not None:
                self._write_initial_model()
        except OSError as err:
            self._fail(f"cannot write to state_dir {self.store.root}: {err}", now)
            return
        self._open_round(self.last_closed_round + 1, now)
        self._cond.notify_all()

    def _write_initial_model(self) -> None:
        assert self.membership is not None
        values = self._initial_values
        if values is None:
            assert self._initial_state is not None
            m = self.membership
            values = flatten_initial_state(
                self._initial_state, m.encrypted_layout, m.plaintext_layout, str(self.config.initial_model)
            )
        size = self.store.write_aggregate(Aggregate(0, [], values, 1.0, ()))
        self._initial_values = None
        self.last_closed_round = 0
        self._save_record()
        logger.info("round 0 (initial model from %s) stored: %s", self.config.initial_model, _mb(size))

    def _open_round(self, number: int, now: float) -> None:
        membership = self.membership
        assert membership is not None
        shape = self._update_shape(number)
        if shape.is_initial_model:
            assert membership.initial_model_site is not None
            members: tuple[str, ...] = (membership.initial_model_site,)
            rule = QuorumRule(1, 0.0, self.config.round_timeout_s)
        else:
            members = tuple(m for m in membership.members if m in self.config.expected)
            rule = self._rule
        accumulator = self._new_accumulator(shape)
        masked = membership.masked and not shape.is_initial_model
        self.round = RoundState(number, members, rule, now, masked=masked)
        for site in self.left:
            self.round.leave(site)
        self.accumulator = accumulator
        self._stats = _RoundStats(opened_at=now)
        waited = self.round.remaining
        what = f"the initial model from {members[0]}" if shape.is_initial_model else f"updates from {', '.join(waited)}"
        logger.info("round %d open: waiting for %s", number, what)

    def _new_accumulator(self, shape: UpdateShape) -> RoundAccumulator:
        return RoundAccumulator(
            self.context,
            shape.num_chunks,
            shape.plaintext_count,
            shape.locate,
            on_grid=shape.weighted,
            scratch_dir=self.store.root,
            seeds_up_to=self.config.seeds_up_to,
        )

    def _recollect(self, decision: Decision, now: float) -> None:
        """Drops the open attempt's sum and opens the next among the sites that uploaded to it (masked rounds)."""
        round_state, accumulator = self.round, self.accumulator
        assert round_state is not None and accumulator is not None
        refusal = Refusal(
            Status.FAILED_PRECONDITION,
            Reason.ATTEMPT_CHANGED,
            f"attempt {round_state.attempt} of round {round_state.number} was given up ({decision.why}); "
            "send the update again for the next attempt",
        )
        accumulator.abort_all()
        self._cancel_streams_locked(refusal)
        accumulator.close()
        self.accumulator = self._new_accumulator(self._update_shape(round_state.number))
        members = round_state.next_attempt(now)
        logger.warning(
            "round %d: %s; attempt %d waits for %s",
            round_state.number,
            decision.why,
            round_state.attempt,
            ", ".join(members),
        )
        self._cond.notify_all()

    def _close_round(self, decision: Decision, now: float) -> None:
        round_state, accumulator, membership = self.round, self.accumulator, self.membership
        assert round_state is not None and accumulator is not None and membership is not None
        number = round_state.number
        self._last_close_why = decision.why
        accumulator.abort_all()  # streams still arriving are excluded, exactly: their chunks come back out
        self._cancel_streams_locked(
            Refusal(
                Status.FAILED_PRECONDITION,
                Reason.ROUND_CLOSED,
                f"round {number} closed while this update was arriving ({decision.why}); it is not included",
            )
        )
        aggregate = accumulator.result(number)
        # Listed in the members' order, not the order uploads finished: the same federation gives the same list.
        aggregate = replace(
            aggregate, participants=tuple(m for m in round_state.members if m in aggregate.participants)
        )
        try:
            size = self.store.write_aggregate(aggregate)
            self.last_closed_round = number
            self._save_record()
        except OSError as err:
            self._fail(f"round {number} could not be stored in state_dir {self.store.root}: {err}", now)
            return
        finally:
            accumulator.close()  # its scratch files: the aggregate is on disk, or the round failed
        pruned = self.store.prune(self.config.keep_rounds)
        stats = self._stats
        missing = [m for m in round_state.members if m not in aggregate.participants]
        logger.info(
            "round %d closed: %d/%d sites (%s)%s, in %s, out %s, %.1f s, stored %s, peak RSS %s; %s",
            number,
            len(aggregate.participants),
            len(round_state.members),
            ", ".join(aggregate.participants),
            f", missing {', '.join(missing)}" if missing else "",
            _mb(stats.bytes_in),
            _mb(stats.bytes_out),
            now - stats.opened_at,
            _mb(size),
            _mb(peak_rss_bytes()),
            decision.why,
        )
        if pruned:
            logger.debug("pruned aggregates of rounds %s", pruned)
        self.round = self.accumulator = None
        if number >= self.config.rounds:
            self._finish(now)
        else:
            self._open_round(number + 1, now)
        self._cond.notify_all()

    def _finish(self, now: float) -> None:
        self.phase = Phase.FINISHED
        self.round = self.accumulator = None
        self.ended_at = now
        logger.info(
            "federation finished its %d rounds; serving the last global model for up to linger_s=%g s",
            self.config.rounds,
            self.config.linger_s,
        )
        self._cond.notify_all()

    def _fail(self, why: str, now: float) -> None:
        if self.accumulator is not None:
            self.accumulator.close()
        self.phase = Phase.FAILED
        self.failure = why
        self.ended_at = now
        self.round = self.accumulator = None
        self._cancel_streams_locked(Refusal(Status.ABORTED, Reason.FAILED, why))
        logger.error(
            "%s; the server stops after linger_s=%g s (restart it to retry the round)", why, self.config.linger_s
        )
        self._cond.notify_all()

    def _cancel_streams_locked(self, refusal: Refusal) -> None:
        """Unblocks every upload still reading its stream: a stalled one must not keep its slot past its round."""
        for cancel in list(self._stream_cancels):
            cancel(refusal)

    def _save_record(self) -> None:
        assert self.membership is not None
        self.store.save_federation(
            FederationRecord(
                project=self.project,
                he_fingerprint=self.he_fingerprint,
                params=self.params.to_dict(),
                membership=self.membership,
                rounds=self.config.rounds,
                last_closed_round=self.last_closed_round,
                instance=self.instance,
            )
        )

