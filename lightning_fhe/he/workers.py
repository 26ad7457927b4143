"""Worker processes fed through a pipe each: the transport under :class:`~lightning_fhe.he.pool.CipherPool`.

A site's pool sends a few dozen tasks an operation, each a few bytes (the work itself crosses through shared
memory), and its own process is on the operation's critical path: every millisecond it spends on a task's way is one
the workers wait for on a 2-core machine. ``concurrent.futures.ProcessPoolExecutor`` routes each task through three
threads of the calling process (its queue's feeder, the executor's manager, the result reader); here the calling
thread writes a task to its worker's pipe and reads the result back itself, and nothing else runs in between.

Each task goes to the worker with the fewest tasks not yet done, and each worker answers in order, so a result is
read from the one pipe it will come back on. A worker that dies (killed; out of memory) closes its pipe: whoever
waits on it gets :class:`WorkerDied` at once. A worker ends when the calling process closes the pipes or ends,
however it ends: the pipe's end of file tells it.

Workers are spawned, not forked: a process that runs gRPC's threads must not fork. A spawned process normally
imports the parent's ``__main__`` first (a training script: Lightning, torch, the data, some 400 MB and seconds per
worker); these are started without it (:func:`_without_main_module`), so ``initializer`` and the tasks' functions
must live in importable modules, and they and their arguments must pickle.

Example::

    >>> import math
    >>> with WorkerProcesses(2) as workers:
    ...     tickets = [workers.submit(math.factorial, n) for n in range(5)]
    ...     [ticket.result() for ticket in tickets]
    [1, 1, 2, 6, 24]
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


class WorkerDied(RuntimeError):
    """A worker process ended while it held a task, or before it could start."""


def _serve(conn: Connection, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """A worker's life: start, say so, then run tasks in order until the pipe closes."""
    if initializer is not None:
        initializer(*initargs)  # an error goes to stderr and ends the process: the caller reads end of file
    try:
        conn.send(os.getpid())
        while True:
            number, work, args = conn.recv()
            try:
                reply = (number, True, work(*args))
            except Exception as err:  # the caller raises it, as a future would
                reply = (number, False, err)
            try:
                conn.send(reply)
            except (EOFError, OSError):
                raise
            except Exception as err:  # a result that does not pickle: nothing was written yet
                conn.send((number, False, RuntimeError(f"{work.__name__}'s result could not be sent back: {err!r}")))
    except (EOFError, OSError):  # the calling process closed the pipe, or ended
        return


@contextmanager
def _without_main_module() -> Iterator[None]:
    """Hides ``__main__``'s name and file while processes are spawned, so they do not import it: multiprocessing
    reads ``__main__.__spec__`` and ``__main__.__file__`` to decide what a spawned child imports first."""
    main = sys.modules.get("__main__")
    spec, has_file, file = getattr(main, "__spec__", None), hasattr(main, "__file__"), getattr(main, "__file__", None)
    try:
        if main is not None:
            main.__spec__ = None
            if has_file:
                del main.__file__
        yield
    finally:
        if main is not None:
            main.__spec__ = spec
            if has_file:
                main.__file__ = file


class _Worker:
    def __init__(self, spawn: Any, initializer: Callable[..., None] | None, initargs: tuple) -> None:
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=_serve, args=(child, initializer, initargs), daemon=True)
        self.process.start()
        child.close()  # ours open would hide the worker's end of file from us
        self.send_lock, self.receive_lock = threading.Lock(), threading.Lock()
        self.numbers = itertools.count()
        self.arrived: dict[int, tuple[bool, Any]] = {}  # results read while waiting for an earlier task's
        self.forgotten: set[int] = set()
        self.running = 0  # tasks sent whose answers have not been read yet

    def started(self) -> int:
        """Waits for the worker to start; its pid."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise WorkerDied(f"worker process {self.process.pid} ended before it started") from None

    def submit(self, work: Callable, args: tuple) -> int:
        with self.send_lock:
            number = next(self.numbers)
            try:
                self.conn.send((number, work, args))
            except OSError:
                raise WorkerDied(f"worker process {self.process.pid} is gone") from None
            self.running += 1
        return number

    def load(self) -> int:
        """Its tasks not yet done, once the answers already in its pipe are read (without waiting for any)."""
        if self.receive_lock.acquire(blocking=False):
            try:
                while self.running and self.conn.poll():
                    self._read()
            except (EOFError, OSError):
                pass  # dead: whoever asks for its results hears it
            finally:
                self.receive_lock.release()
        return self.running

    def result(self, number: int) -> Any:
        with self.receive_lock:
            while number not in self.arrived:
                try:
                    self._read()
                except (EOFError, OSError):
                    raise WorkerDied(f"worker process {self.process.pid} died while it held a task") from None
            ok, value = self.arrived.pop(number)
        if not ok:
            raise value
        return value

    def _read(self) -> None:
        """Reads the next answer (the receive lock held)."""
        done, ok, value = self.conn.recv()
        self.running -= 1
        if done in self.forgotten:
            self.forgotten.discard(done)
        else:
            self.arrived[done] = (ok, value)

    def forget(self, number: int) -> None:
        with self.receive_lock:
            if self.arrived.pop(number, None) is None:
                self.forgotten.add(number)


@dataclass(frozen=True)
class Ticket:
    """A submitted task, as a future is: its worker (so a ticket of workers since replaced names no new one) and its
    number there."""

    worker: _Worker
    number: int

    def result(self) -> Any:
        """The task's return value, or its exception raised here; :class:`WorkerDied` if its worker died."""
        return self.worker.result(self.number)

    def forget(self) -> None:
        """No one will ask for this task's result: dropped when it arrives."""
        self.worker.forget(self.number)


class WorkerProcesses:
    """``count`` spawned processes that run ``initializer(*initargs)`` once, then tasks.

    :meth:`submit` a task, then ask its :class:`Ticket` for the result (or forget it); tasks may be submitted and their
    results awaited from several threads.
    """

    def __init__(self, count: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        spawn = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        try:
            with _without_main_module():  # a process takes what to import from __main__ when it starts
                for _ in range(count):
                    self._workers.append(_Worker(spawn, initializer, initargs))
            self.pids = [worker.started() for worker in self._workers]
        except BaseException:
            self.close()
            raise
        self._turn = itertools.count()

    def submit(self, work: Callable, *args: Any, to: int | None = None) -> Ticket:
        """Sends ``work(*args)`` to the worker with the fewest tasks not yet done (the next in turn among equals), or
        to worker number ``to``.

        The fewest, not each in turn, as a queue that all workers take from would do: on a shared host one core is
        often slowed down by another tenant, and a worker on it that got every other task would finish last while the
        other waited."""
        if not self._workers:
            raise RuntimeError("the worker processes were closed")
        if to is not None:
            worker = self._workers[to]
        else:
            turn = next(self._turn) % len(self._workers)
            worker = min(self._workers[turn:] + self._workers[:turn], key=_Worker.load)
        return Ticket(worker, worker.submit(work, args))

    def close(self, timeout: float = 10.0) -> None:
        """Ends the workers; each finishes the task it runs (a batch: milliseconds) first."""
        workers, self._workers = self._workers, []
        for worker in workers:  # a closed pipe ends its worker once the task it runs is done
            worker.conn.close()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
