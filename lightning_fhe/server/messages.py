"""The federation's requests and answers, free of gRPC: the servicer translates them to and from protobuf, and
:class:`~lightning_fhe.server.federation.Federation` takes and returns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from lightning_fhe.masking.announcement import Announcement
from lightning_fhe.server.activity import MemberActivity


class Phase(Enum):
    FORMING = "forming"
    OPEN = "open"
    FINISHED = "finished"
    FAILED = "failed"


# -- requests and answers, free of gRPC ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadHeader:
    """First message of an update: its round and sizes, checked against the layout before anything is read."""

    round: int
    num_chunks: int
    plaintext_count: int
    attempt: int = 0  # masked federations: the attempt the update's masks were made for


@dataclass(frozen=True)
class ChunkPart:
    index: int
    data: bytes


@dataclass(frozen=True)
class PlaintextPart:
    offset: int  # in values
    data: bytes  # little-endian values of ``dtype``
    dtype: np.dtype = np.dtype("<f8")


UploadPart = UploadHeader | ChunkPart | PlaintextPart


@dataclass(frozen=True)
class JoinResult:
    formed: bool  # False: still forming when the wait ended; join again
    site: str
    joined: int
    expected: int
    members: tuple[str, ...] = ()
    total_weight: float = 0.0
    share: float = 0.0
    rounds: int = 0
    current_round: int = 0
    send_initial_model: bool = False
    mask_keys: tuple[Announcement, ...] = ()  # every member's signed mask key, when every member sent one
    masked: bool = False  # updates are masked
    instance: str = ""  # this federation's random id


@dataclass(frozen=True)
class SubmitResult:
    round: int
    bytes_received: int
    submitted: int  # updates recorded in this round so far, this one included
    members: int


@dataclass(frozen=True)
class StatusView:
    phase: Phase
    current_round: int  # the round open for submissions; rounds + 1 once finished
    rounds: int
    last_closed_round: int  # -1 when none
    members: tuple[str, ...]
    submitted: tuple[str, ...]  # whose update for current_round is recorded
    this_site_submitted: bool
    failure: str
    joined: tuple[str, ...] = ()  # while forming
    site: str = ""  # who asked: a site's name, or "operator"
    seconds_left: float = 0.0  # until formation or the open round fails or closes at the latest; 0 when none is
    activity: tuple[MemberActivity, ...] = ()  # the members (the joined sites while forming), when last heard from
    left: tuple[str, ...] = ()  # members that left (Leave)
    attempt: int = 0  # masked federations: the open round's attempt
    attempt_members: tuple[str, ...] = ()  # ... and the sites whose masks cancel in it
    instance: str = ""  # this federation's random id (the sites bind their masks to it)
