"""When the server last heard from each site, and who has been silent too long: pure logic, time passed in.

The federation notes every call (join, upload, download, status) here; the status view reports it, and the timer
asks :meth:`ActivityLog.newly_silent` which members to warn about, once per silence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class MemberActivity:
    site: str
    idle_s: float  # seconds since the server last heard from it
    last_call: str  # "join", "upload", "download" or "status"


@dataclass
class _Heard:
    at: float
    call: str
    warned: bool = False  # the silence since ``at`` was reported


class ActivityLog:
    """The last call from each site.

    Example::

        >>> log = ActivityLog(started_at=0.0)
        >>> log.heard("a", "join", now=1.0)
        >>> [s.site for s in log.newly_silent(("a", "b"), now=400.0, after_s=300.0)]
        ['a', 'b']
        >>> log.newly_silent(("a", "b"), now=500.0, after_s=300.0), log.heard("a", "upload", now=501.0)
        ([], 500.0)

    Args:
        started_at: when the server started; a member not heard from since counts as silent from then.
    """

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self._heard: dict[str, _Heard] = {}

    def heard(self, site: str, call: str, now: float) -> float | None:
        """Notes a call from ``site``; returns how long it had been silent if that silence was reported, else None."""
        previous = self._heard.get(site)
        self._heard[site] = _Heard(now, call)
        return now - previous.at if previous is not None and previous.warned else None

    def of(self, sites: Iterable[str], now: float) -> tuple[MemberActivity, ...]:
        """What is known of ``sites`` (those never heard from are left out), in their order."""
        return tuple(
            MemberActivity(s, now - self._heard[s].at, self._heard[s].call) for s in sites if s in self._heard
        )

    def newly_silent(self, sites: Iterable[str], now: float, after_s: float) -> list[MemberActivity]:
        """The ``sites`` silent for ``after_s`` whose silence was not reported yet; each is reported once."""
        silent = []
        for site in sites:
            heard = self._heard.setdefault(site, _Heard(self.started_at, "none since the server started"))
            if not heard.warned and now - heard.at >= after_s:
                heard.warned = True
                silent.append(MemberActivity(site, now - heard.at, heard.call))
        return silent
