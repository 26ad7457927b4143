"""The running aggregator: a gRPC server with mutual TLS, health checking, and the federation's timer.

Example (what the tests do; ``python -m lightning_fhe.server`` does the same from the command line)::

    server = AggregatorServer(load_server_config(None, ["port=0", "bind=127.0.0.1"]), load_server_kit("kits/server"))
    port = server.start()
    exit_code = server.wait()      # returns once the federation finished (or failed) and linger_s passed
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lightning_fhe.proto import aggregator_pb2_grpc as pb_grpc
from lightning_fhe.proto.wire import SERVICE_NAME, server_options
from lightning_fhe.provision.config import grpc_address
from lightning_fhe.provision.kits import ServerKit
from lightning_fhe.server.admission import worker_threads
from lightning_fhe.server.config import ServerConfig
from lightning_fhe.server.federation import Federation
from lightning_fhe.server.initial_model import load_initial_state
from lightning_fhe.server.messages import Phase
from lightning_fhe.server.peak_memory import peak_rss_bytes
from lightning_fhe.server.servicer import AggregatorServicer
from lightning_fhe.server.store import StateStore

logger = logging.getLogger("lightning_fhe.server")

INSECURE_WARNING = (
    "WARNING: --insecure: the aggregator listens WITHOUT TLS. Anyone who can reach the port can join as any "
    "site, read the encrypted updates and global models, and send updates. Use it only for local experiments, "
    "never across a network."
)


class AggregatorServer:
    """The aggregator in this process.

    Args:
        config: the options (unresolved ``port`` and ``clients`` come from the kit).
        kit: the server kit (TLS identity, CKKS parameters without any key, expected sites).
        insecure: listen without TLS; sites then name themselves in metadata. Local experiments only.
        clock: the federation's clock (tests only).
    """

    def __init__(
        self,
        config: ServerConfig,
        kit: ServerKit,
        *,
        insecure: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config.with_kit(kit.clients, kit.port)
        self.kit = kit
        self.insecure = insecure
        initial_state = load_initial_state(self.config.initial_model) if self.config.initial_model else None
        self.federation = Federation(
            self.config,
            kit.he_context,
            kit.he_fingerprint,
            kit.project,
            StateStore(self.config.state_dir),
            initial_state,
            clock,
        )
        # Every site may hold max_calls_per_site calls at once, and no more (the servicer refuses the next one), so
        # with this many threads no site can take the threads the others need, whatever it opens.
        workers = worker_threads(self.config.max_calls_per_site, len(self.config.expected))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aggregator"),
            options=server_options(kit.params),
            # A backstop on calls queued for a thread (each costs memory): refused callers hold a thread only for
            # their refusal, so the queue stays short unless the server is flooded; then RESOURCE_EXHAUSTED.
            maximum_concurrent_rpcs=4 * workers,
        )
        self._servicer = AggregatorServicer(self.federation, insecure, server_cert=None if insecure else kit.cert)
        pb_grpc.add_AggregatorServicer_to_server(self._servicer, self._server)
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._stopped = threading.Event()
        self._exit_code: int | None = None
        self._timer: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> int:
        """Binds and starts serving; returns the port (the chosen one when ``port`` is 0)."""
        limit_malloc_arenas()
        address = grpc_address(self.config.bind, self.config.port)
        if self.insecure:
            logger.warning(INSECURE_WARNING)
            port = self._server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(self.kit.key, self.kit.cert)],
                root_certificates=self.kit.ca_cert,
                require_client_auth=True,  # no certificate, or one from another CA: the handshake fails
            )
            port = self._server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {address}: the port is in use or the address is not local")
        self._server.start()
        self.port = port
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._timer = threading.Thread(target=self._run_timer, name="aggregator-timer", daemon=True)
        self._timer.start()
        logger.info(
            "aggregator for %r listening on %s:%d (%s), state in %s",
            self.kit.project,
            self.config.bind,
            port,
            "INSECURE, no TLS" if self.insecure else "mutual TLS",
            self.config.state_dir,
        )
        return port

    def _run_timer(self) -> None:
        """Closes rounds at their deadlines and ends the server once the federation is over and linger_s passed."""
        while not self._stopped.is_set():
            try:
                self.federation.tick()
                if self.federation.phase in (Phase.FINISHED, Phase.FAILED):
                    self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                code = self.federation.exit_code()
            except Exception:  # a bug here must not leave a server that never closes rounds, silently
                logger.exception("the round timer failed; stopping the server")
                code = 1
            if code is not None:
                self._exit_code = code
                self._stopped.set()
                break
            self._stopped.wait(self.federation.seconds_to_next_event(cap=0.5))

    def wait(self, timeout: float | None = None) -> int | None:
        """Blocks until the federation is over (exit code 0 finished, 1 failed), then stops the server.

        Returns None if ``timeout`` passed first (the server keeps running).
        """
        if not self._stopped.wait(timeout):
            return None
        self.stop()
        logger.info("server stopped; peak memory (RSS high-water mark) %.1f MB", peak_rss_bytes() / 1e6)
        return self._exit_code

    def request_stop(self) -> None:
        """Makes :meth:`wait` return (None as exit code) and stop the server; safe from a signal handler."""
        self._stopped.set()

    def stop(self, grace: float = 2.0) -> None:
        """Stops serving (idempotent); calls in flight get ``grace`` seconds to finish."""
        self._stopped.set()
        self._server.stop(grace).wait()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(timeout=5)

    def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            self._health.set(service, status)

    def __enter__(self) -> AggregatorServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas, so memory stays flat in the number of sites.

    glibc gives each thread that allocates concurrently its own arena (up to 8 per core) and keeps freed memory in
    it. Every site's stream runs on its own gRPC thread and allocates a stream of ~65 KB messages, so with 16 sites
    the server held several MB more per site in idle arenas (``python -m lightning_fhe.bench.server_memory``,
    segresnet-8: peak 510 MB uncapped against about 400 MB with two arenas). SEAL and the GIL serialize the work
    anyway, so fewer arenas cost no speed. Only affects arenas created from now on, so it is called before the
    server's threads start; ``MALLOC_ARENA_MAX`` in the environment takes precedence.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass


_M_ARENA_MAX = -8  # from glibc's malloc.h
