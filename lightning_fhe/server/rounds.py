"""When a round closes: the quorum rule and one round's submissions, as pure logic with time passed in.

The same rule decides federation formation ("round 0" of membership: who joined) and every training round (who
submitted): close as soon as every expected site arrived; once ``min_clients`` arrived, wait ``wait_after_min_s``
more for the rest, then close; if the quorum is still missing ``timeout_s`` after the start, fail. ``timeout_s``
also caps the grace period, so a round never lasts longer than it. A member that left (the Leave call) is no longer
waited for: the round closes once every remaining member arrived, and fails at once when fewer members remain than
the quorum.

A masked federation (:mod:`lightning_fhe.masking`) cannot close a round with a subset of the members it opened
with: each update carries masks that cancel only in the sum over the attempt's members. Where an unmasked round
would close without someone, a masked one is re-collected instead (:attr:`Outcome.RECOLLECT`): attempt ``t + 1``
opens among the sites that did upload to attempt ``t``, each uploads its kept update again under masks for the new
member set, and attempt ``t`` is dropped. It never reveals a mask.

Nothing here reads a clock, sleeps or locks: callers pass ``now`` (seconds on any monotonic clock), which is what
lets the tests walk through hours of rounds in microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from lightning_fhe.server.errors import Reason, Refusal, Status


class Outcome(Enum):
    WAIT = "wait"
    CLOSE = "close"
    FAIL = "fail"
    RECOLLECT = "recollect"  # masked: open the next attempt among the sites that uploaded to this one


@dataclass(frozen=True)
class Decision:
    """What to do now: wait (until ``wake_at`` at the latest), close, or fail; ``why`` is for logs and sites."""

    outcome: Outcome
    why: str
    wake_at: float | None = None


@dataclass(frozen=True)
class QuorumRule:
    """Args:
    min_clients: arrivals needed for the round to close without everyone.
    wait_after_min_s: once the quorum is reached, how long to wait for the others.
    timeout_s: from the start, when a round below quorum fails (and when one above it closes at the latest).
    """

    min_clients: int
    wait_after_min_s: float
    timeout_s: float

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be at least 1, got {self.min_clients}")
        if self.wait_after_min_s < 0 or self.timeout_s <= 0:
            raise ValueError(
                f"wait_after_min_s must be >= 0 and timeout_s > 0, got {self.wait_after_min_s} and {self.timeout_s}"
            )

    def decide(self, expected: int, arrivals: Iterable[float], opened_at: float, now: float) -> Decision:
        """Args:
        expected: how many sites may arrive.
        arrivals: when each arrived site arrived (any order).
        opened_at: when the round started.
        now: the current time, on the same clock.
        """
        times = sorted(arrivals)
        count, quorum = len(times), min(self.min_clients, expected)
        deadline = opened_at + self.timeout_s
        if expected > 0 and count >= expected:
            return Decision(Outcome.CLOSE, f"all {expected} expected site(s) arrived")
        if count >= quorum > 0:
            grace_end = min(times[quorum - 1] + self.wait_after_min_s, deadline)
            if now >= grace_end:
                if grace_end == deadline:
                    why = (
                        f"timeout_s={self.timeout_s:g} passed with {count} of {expected} site(s), at or above the "
                        f"quorum of {quorum}"
                    )
                else:
                    why = (
                        f"the quorum of {quorum} (min_clients) was reached and "
                        f"wait_after_min_s={self.wait_after_min_s:g} passed with {count} of {expected} site(s)"
                    )
                return Decision(Outcome.CLOSE, why)
            return Decision(
                Outcome.WAIT, f"quorum reached, waiting for the others until +{grace_end - opened_at:.1f} s", grace_end
            )
        if now >= deadline:
            return Decision(
                Outcome.FAIL,
                f"timeout_s={self.timeout_s:g} passed with {count} of {expected} site(s); min_clients is {quorum}",
            )
        return Decision(Outcome.WAIT, f"{count} of {expected} site(s), quorum {quorum}", deadline)


class RoundState:
    """One round's submissions: which members may submit, who is uploading, who submitted, when it closes.

    Example::

        >>> state = RoundState(2, ("a", "b", "c"), QuorumRule(2, 10.0, 600.0), opened_at=0.0)
        >>> state.start_upload("a", round_number=2); state.finish_upload("a", recorded=True, now=5.0)
        >>> state.start_upload("b", round_number=2); state.finish_upload("b", recorded=True, now=7.0)
        >>> state.decide(now=16.9).outcome, state.decide(now=17.0).outcome
        (<Outcome.WAIT: 'wait'>, <Outcome.CLOSE: 'close'>)
    """

    def __init__(
        self, number: int, members: Sequence[str], rule: QuorumRule, opened_at: float, masked: bool = False
    ) -> None:
        self.number = number
        self.members = tuple(members)
        self.rule = rule
        self.opened_at = opened_at
        self.masked = masked
        self.attempt = 1
        self.attempt_members = self.members  # whose masks cancel in this attempt's sum
        self.submitted: dict[str, float] = {}  # site -> when its update was recorded (in this attempt)
        self.uploading: set[str] = set()
        self.left: set[str] = set()  # members that left: no longer waited for, refused if they submit

    @property
    def remaining(self) -> tuple[str, ...]:
        """The attempt's members still taking part, in the members' order."""
        return tuple(site for site in self.attempt_members if site not in self.left)

    def next_attempt(self, now: float) -> tuple[str, ...]:
        """Opens the next attempt among the sites that uploaded to this one and are still taking part; returns them.

        Their updates are dropped (the caller discards the sum): each sends its update again, masked for the new
        members. The attempt has its own ``timeout_s`` from ``now``.
        """
        if not self.masked:
            raise RuntimeError("only a masked round is re-collected")
        self.attempt_members = tuple(site for site in self.remaining if site in self.submitted)
        self.attempt += 1
        self.submitted.clear()
        self.opened_at = now
        return self.attempt_members

    def leave(self, site: str) -> None:
        """``site`` takes part no further: the round stops waiting for it (an update it already sent stays in)."""
        if site in self.members:
            self.left.add(site)

    def check_round(self, round_number: int) -> None:
        """Refuses a round number other than this round's: stale (closed, or replayed) or not open yet."""
        if round_number < self.number:
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.ROUND_CLOSED,
                f"round {round_number} is closed (current round {self.number})",
            )
        if round_number > self.number:
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.ROUND_NOT_OPEN,
                f"round {round_number} is not open yet (current round {self.number})",
            )

    def start_upload(self, site: str, round_number: int, attempt: int | None = None) -> None:
        """Reserves ``site``'s submission for this round, or refuses it without changing anything."""
        self.check_upload(site, round_number, attempt)
        self.uploading.add(site)

    def check_attempt(self, attempt: int) -> None:
        """Refuses an upload masked for another attempt than the open one (masked rounds; 0 elsewhere)."""
        if attempt == (self.attempt if self.masked else 0):
            return
        if not self.masked:
            raise Refusal(
                Status.INVALID_ARGUMENT,
                Reason.BAD_REQUEST,
                f"the update names attempt {attempt}, but this federation is not masked (attempt must be 0)",
            )
        raise Refusal(
            Status.FAILED_PRECONDITION,
            Reason.ATTEMPT_CHANGED,
            f"the update is masked for attempt {attempt} of round {self.number}, but attempt {self.attempt} is open "
            f"(members {', '.join(self.attempt_members)}): mask it for those and send it again",
        )

    def check_upload(self, site: str, round_number: int, attempt: int | None = None) -> None:
        """Refuses what :meth:`start_upload` would refuse (wrong round or attempt, not a member, duplicate, busy),
        reserving nothing. ``attempt`` None: not checked."""
        self.check_round(round_number)
        if site in self.left:
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.LEFT,
                f"site {site!r} left the federation and takes part in no further round (round {self.number})",
            )
        if site not in self.members:
            raise Refusal(
                Status.PERMISSION_DENIED,
                Reason.NOT_MEMBER,
                f"site {site!r} may not submit to round {self.number}; its members are {', '.join(self.members)}",
            )
        if attempt is not None:
            self.check_attempt(attempt)
        if site not in self.attempt_members:
            raise Refusal(
                Status.FAILED_PRECONDITION,
                Reason.NOT_IN_ATTEMPT,
                f"site {site!r} is not in attempt {self.attempt} of round {self.number}: it is re-collected among "
                f"{', '.join(self.attempt_members)}, the sites that uploaded to attempt {self.attempt - 1}",
            )
        if site in self.submitted:
            raise Refusal(
                Status.ALREADY_EXISTS,
                Reason.DUPLICATE,
                f"site {site!r} already submitted its update for round {self.number}",
            )
        if site in self.uploading:
            # Most likely the site's previous stream broke and the server has not noticed yet: worth a retry.
            raise Refusal(
                Status.UNAVAILABLE,
                Reason.BUSY,
                f"an update from site {site!r} for round {self.number} is still arriving on another stream; retry "
                "once it ends",
            )

    def finish_upload(self, site: str, recorded: bool, now: float) -> None:
        """Ends ``site``'s upload; ``recorded`` says whether its update is now part of the round's sum."""
        self.uploading.discard(site)
        if recorded:
            self.submitted[site] = now

    def decide(self, now: float) -> Decision:
        remaining = self.remaining
        quorum = min(self.rule.min_clients, len(self.members))
        if len(remaining) < quorum and (self.left or self.attempt > 1):
            after = f"after {', '.join(sorted(self.left))} left" if self.left else f"in attempt {self.attempt}"
            why = f"{len(remaining)} member(s) remain {after}, fewer than the quorum of {quorum} (min_clients)"
            return Decision(Outcome.FAIL, why)
        # Only the remaining members' arrivals count towards "everyone is here"; one that left after submitting
        # stays in the sum (its share is in total_share) but is not waited for.
        arrivals = [t for site, t in self.submitted.items() if site not in self.left]
        decision = self.rule.decide(len(remaining), arrivals, self.opened_at, now)
        if not self.masked or decision.outcome is not Outcome.CLOSE or set(self.submitted) == set(self.attempt_members):
            return decision
        # Masks cancel only over every member of the attempt: re-collect among those who uploaded, never reveal.
        missing = [site for site in self.attempt_members if site not in self.submitted]
        return Decision(
            Outcome.RECOLLECT,
            f"{decision.why}; attempt {self.attempt} lacks {', '.join(missing)}, so its masks do not cancel: "
            f"re-collecting among {', '.join(s for s in remaining if s in self.submitted)}",
        )

    @property
    def participants(self) -> tuple[str, ...]:
        """The sites whose update is recorded, in the members' order."""
        return tuple(site for site in self.members if site in self.submitted)
