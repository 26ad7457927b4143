"""The server's gate: who may call which method, how many calls one caller may hold, how long a call may wait.

Checked before a request message is read, so a caller that is not entitled to a call costs the server nothing
but the refusal. The rules, in order:

- the operator (a caller presenting the server kit's own certificate) may ask for the round status, nothing else;
- a name that is not an expected site is refused;
- while the federation forms, every expected site may call (the federation itself refuses what needs a member);
- once it formed, only members may: an expected site that missed formation gets no model and no status.

:func:`check_upload_header` refuses an update from its header alone (a member, the open round, not a duplicate, the
sizes the round takes, as :func:`~lightning_fhe.proto.update_shape.update_shape` says), before any of its data is
read.

:class:`CallLimiter` caps the calls one caller holds at once (``max_calls_per_site``), so that with a thread pool
sized from that cap no single site can take the threads the others need. :func:`clamp_wait` makes every wait a
caller asks for finite and bounded.

Pure logic: no clock, no gRPC. (:class:`CallLimiter` holds a lock, since the servicer's threads share it.)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING

from lightning_fhe.he.params import CKKSParams
from lightning_fhe.proto.update_shape import update_shape
from lightning_fhe.server.errors import Reason, Refusal, Status

if TYPE_CHECKING:
    from lightning_fhe.server.membership import Membership
    from lightning_fhe.server.rounds import RoundState

# Waiting calls are answered at least this often, so a site notices a restarted server or a lost update soon.
MAX_WAIT_S = 60.0

# The name the operator's calls are counted and reported under; never a site name (no site certificate is
# trusted for it: the operator is recognized by the server kit's certificate itself).
OPERATOR = "operator"


class Method(str, Enum):
    """The aggregator's calls, named as in the .proto."""

    JOIN = "Join"
    SUBMIT = "SubmitUpdate"
    DOWNLOAD = "GetGlobalModel"
    STATUS = "GetRoundStatus"
    LEAVE = "Leave"
    SHARE_KEYS = "ShareSealedKeys"
    FETCH_KEY = "FetchSealedKey"


def check_caller(
    caller: str,
    method: Method,
    expected: Sequence[str],
    members: Sequence[str] | None,
    is_operator: bool = False,
) -> None:
    """Refuses a call its caller is not entitled to, before anything of the request is read.

    Args:
        caller: the name in the caller's certificate (or insecure-mode metadata).
        method: the call.
        expected: the sites the server expects (``clients``).
        members: the members once the federation formed; None while it forms.
        is_operator: the caller presented the server kit's own certificate.

    Raises:
        Refusal: PERMISSION_DENIED, with ``UNKNOWN_SITE`` or ``NOT_MEMBER``.
    """
    if is_operator:
        if method is not Method.STATUS:
            raise Refusal(
                Status.PERMISSION_DENIED,
                Reason.NOT_MEMBER,
                f"the server kit's certificate may only call {Method.STATUS.value} (the operator's view), "
                f"not {method.value}",
            )
        return
    if caller not in expected:
        raise Refusal(
            Status.PERMISSION_DENIED,
            Reason.UNKNOWN_SITE,
            f"site {caller!r} is not one of the expected sites ({', '.join(expected)})",
        )
    if members is None or caller in members or method is Method.JOIN:
        return  # a Join after formation is refused by the membership, which says why in its own words
    raise Refusal(
        Status.PERMISSION_DENIED,
        Reason.NOT_MEMBER,
        f"site {caller!r} never joined: the federation formed with {', '.join(members)} and members are fixed "
        f"from then on, so it may not call {method.value}",
    )


def check_upload_header(
    site: str,
    round_number: int,
    num_chunks: int,
    plaintext_count: int,
    membership: Membership,
    rounds: int,
    round_state: RoundState | None,
    params: CKKSParams,
    attempt: int = 0,
) -> None:
    """Refuses an update from its header alone, before any of its data is read: who sends it, to which round, a
    duplicate, and the sizes it declares. Reserves nothing.

    Args:
        site: the sender, a name already admitted by :func:`check_caller`.
        round_number, num_chunks, plaintext_count: the update's header.
        membership: the formed federation.
        rounds: the federation's number of training rounds.
        round_state: the open round, or None once every round closed.
        params: the federation's CKKS parameters, which fix the values per ciphertext chunk.
        attempt: the attempt the update is masked for (0: unmasked).
    """
    if site not in membership.members:
        raise Refusal(
            Status.PERMISSION_DENIED,
            Reason.NOT_MEMBER,
            f"site {site!r} never joined: the federation formed with {', '.join(membership.members)} and "
            "members are fixed from then on",
        )
    check_round_exists(round_number, rounds)
    if round_state is None:
        raise Refusal(
            Status.FAILED_PRECONDITION,
            Reason.ROUND_CLOSED,
            f"round {round_number} is closed: the federation finished its {rounds} rounds",
        )
    round_state.check_round(round_number)
    if round_number == 0 and site != membership.initial_model_site:
        raise Refusal(
            Status.PERMISSION_DENIED,
            Reason.NOT_MEMBER,
            f"round 0 is the initial model, which site {membership.initial_model_site!r} sends, not {site!r}",
        )
    round_state.check_upload(site, round_number, attempt)  # a duplicate is refused as such before its sizes are read
    shape = update_shape(round_number, membership.encrypted_layout, membership.plaintext_layout, params)
    if num_chunks != shape.num_chunks:
        raise Refusal(
            Status.INVALID_ARGUMENT,
            Reason.CHUNK_COUNT,
            f"the update declares {num_chunks} ciphertext chunks, but round {round_number} takes "
            f"{shape.num_chunks} ({shape.encrypted_count} encrypted values, {shape.values_per_chunk} per chunk)",
        )
    if plaintext_count != shape.plaintext_count:
        raise Refusal(
            Status.INVALID_ARGUMENT,
            Reason.CHUNK_COUNT,
            f"the update declares {plaintext_count} plaintext values, but there are {shape.plaintext_count} "
            f"{shape.plaintext_meaning}",
        )


def check_round_exists(round_number: int, rounds: int) -> None:
    """Refuses a round number outside 0..rounds."""
    if not 0 <= round_number <= rounds:
        raise Refusal(
            Status.INVALID_ARGUMENT,
            Reason.NO_SUCH_ROUND,
            f"round {round_number} does not exist: the federation runs rounds 1..{rounds} (0: the initial model)",
        )


def clamp_wait(requested: float) -> float:
    """A caller's ``max_wait_s`` as the server honours it: in [0, :data:`MAX_WAIT_S`]; NaN and negatives are 0.

    Clamped rather than refused: a wait is a hint (the caller asks again), and 0 answers at once.
    """
    if math.isnan(requested) or requested <= 0:
        return 0.0
    return min(requested, MAX_WAIT_S)


class CallLimiter:
    """Counts the calls each caller holds; one more than ``max_calls`` is refused at once.

    Args:
        max_calls: the cap per caller (``max_calls_per_site``).
    """

    def __init__(self, max_calls: int) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls must be >= 1, got {max_calls}")
        self.max_calls = max_calls
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def acquire(self, caller: str, method: Method) -> None:
        """Counts one more call of ``caller``, or refuses it with RESOURCE_EXHAUSTED / ``TOO_MANY_CALLS``."""
        with self._lock:
            held = self._held.get(caller, 0)
            if held >= self.max_calls:
                raise Refusal(
                    Status.RESOURCE_EXHAUSTED,
                    Reason.TOO_MANY_CALLS,
                    f"{caller!r} already holds {held} calls, the most one site may (max_calls_per_site="
                    f"{self.max_calls}); this {method.value} is refused: finish or cancel a call first",
                )
            self._held[caller] = held + 1

    def release(self, caller: str) -> None:
        with self._lock:
            held = self._held.get(caller, 0) - 1
            if held > 0:
                self._held[caller] = held
            else:
                self._held.pop(caller, None)

    def held(self, caller: str) -> int:
        with self._lock:
            return self._held.get(caller, 0)

    @contextmanager
    def hold(self, caller: str, method: Method) -> Iterator[None]:
        """One call of ``caller`` for the duration of the block."""
        self.acquire(caller, method)
        try:
            yield
        finally:
            self.release(caller)


def worker_threads(max_calls_per_site: int, expected_sites: int, spare: int = 8) -> int:
    """The gRPC thread pool's size: every site at its cap at once, plus ``spare`` threads for the operator and
    for refusing callers that are not entitled to anything (each refusal holds a thread only for its answer)."""
    return max_calls_per_site * expected_sites + spare
