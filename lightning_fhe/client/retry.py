"""Riding out a server outage: a call that finds the server UNAVAILABLE is tried again, with exponential backoff,
for up to ``retry_budget_s`` of continuous outage; closing the client ends the retrying at once.

While it retries (and while a caller waits for the federation to form or a round to close) the client says what it
waits for on the ``lightning_fhe.client`` logger at INFO, at least every ``log_every_s`` (:class:`WaitLog`).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import TypeVar

import grpc

from lightning_fhe.client.errors import ClientClosedError, ServerUnavailableError, code_and_details, federation_error

logger = logging.getLogger("lightning_fhe.client")  # the whole client logs under one name users configure

T = TypeVar("T")


class WaitLog:
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


class RetryLoop:
    """Runs a site's calls, retrying UNAVAILABLE until ``budget_s`` of outage, or until ``closed`` is set.

    Args:
        server: the server's address, for messages.
        budget_s: how long an outage may last before :class:`ServerUnavailableError` (``retry_budget_s``).
        log_every_s: the cadence of the "unavailable since" lines.
        clock: seconds on a monotonic clock, for the budget and the cadence.
        closed: set by the client's ``close()``; a call retrying or about to start raises :class:`ClientClosedError`.
    """

    def __init__(
        self,
        server: str,
        budget_s: float,
        log_every_s: float,
        clock: Callable[[], float],
        closed: threading.Event,
    ) -> None:
        self.server = server
        self.budget_s = budget_s
        self.log_every_s = log_every_s
        self._clock = clock
        self._closed = closed

    def run(self, what: str, call: Callable[[], T], waiting: bool = False) -> T | None:
        """Runs ``call``, retrying UNAVAILABLE with exponential backoff for up to ``budget_s``.

        With ``waiting``, a deadline that expires returns None (the caller asks again) instead of failing.
        """
        outage_started: float | None = None
        delay = 0.2
        log = WaitLog(self._clock, self.log_every_s)
        while True:
            self.raise_if_closed(what)
            try:
                return call()
            except (grpc.RpcError, ValueError) as err:  # ValueError: the channel was closed under the call
                self.raise_if_closed(what)
                if not isinstance(err, grpc.RpcError):
                    raise
                code, details = code_and_details(err)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and waiting:
                    return None
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise federation_error(what, err) from None
                now = self._clock()
                outage_started = outage_started if outage_started is not None else now
                left = self.budget_s - (now - outage_started)
                if left <= 0:
                    raise ServerUnavailableError(
                        f"{what}: the aggregator at {self.server} was unavailable for {self.budget_s:g} s "
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
                        self.budget_s,
                        left,
                    )
                if self._closed.wait(min(delay, left) * random.uniform(0.8, 1.0)):
                    self.raise_if_closed(what)
                delay = min(delay * 2, 5.0)

    def raise_if_closed(self, what: str) -> None:
        if self._closed.is_set():
            raise ClientClosedError(f"{what}: the client was closed (the site is stopping)", grpc.StatusCode.CANCELLED)
