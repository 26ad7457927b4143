"""The round status as a site (or the operator) sees it, parsed from the server's answer, and the "still waiting"
line a site logs from it while a round stays open."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lightning_fhe.client.retry import WaitLog
from lightning_fhe.proto import aggregator_pb2 as pb

logger = logging.getLogger("lightning_fhe.client")  # the whole client logs under one name users configure

_PHASES = {
    pb.RoundStatus.FORMING: "forming",
    pb.RoundStatus.OPEN: "open",
    pb.RoundStatus.FINISHED: "finished",
    pb.RoundStatus.FAILED: "failed",
}


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
    attempt: int = 0  # masked federations: the open round's attempt
    attempt_members: tuple[str, ...] = ()  # ... and the sites that must upload to it
    instance: str = ""  # the federation's random id, which the sites bind their mask keys to


def round_status(message: pb.RoundStatus) -> RoundStatus:
    """The server's RoundStatus message as a :class:`RoundStatus` (an unknown phase reads as "unknown")."""
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
        attempt=message.attempt,
        attempt_members=tuple(message.attempt_members),
        instance=message.federation_instance,
    )


def log_round_wait(round_number: int, status: RoundStatus, waiting: WaitLog) -> None:
    """Says whom round ``round_number`` still waits for, and when the server last heard from each of them."""
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
