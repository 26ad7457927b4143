"""The end-to-end tests' site processes (``tests/sites/boring_site.py``), forked from one that has already imported
Lightning.

A site's imports alone (Lightning, torch, and what they pull in: torchmetrics, scipy, sympy) took 7.1 s and 7.3
CPU-seconds on this project's 2-core machine; a whole federation of two BoringModel sites for 3 rounds, 7.9 s and
15.0 CPU-seconds. So each site here is forked from a process that imported those modules once and runs nothing else
(multiprocessing's forkserver), instead of started from scratch. It is still a process of its own, with its own
sockets, threads, Trainer and cipher workers, running ``boring_site.py`` as ``__main__`` with its command line. (The
suite took 670 s and 693 s before, 531 s after, in runs on one machine.)

:func:`start_site` answers with a :class:`SiteProcess`, which offers the part of ``subprocess.Popen`` the tests use;
the site's output (stdout and stderr) goes to a file beside its other files, and comes back as text.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SITE = Path(__file__).resolve().parent / "sites" / "boring_site.py"

# What boring_site.py imports, loaded once in the fork server. (Python 3.11's fork server ignores the caller's
# sys.path, so it preloads installed modules only; boring_site.py itself is cheap once these are in.)
_PRELOAD = [
    "lightning.pytorch",
    "lightning.pytorch.demos.boring_classes",
    "lightning.pytorch.loggers",
    "lightning_fhe.federation",
]
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(_PRELOAD)


def _run(argv: list[str], output: str, cwd: str | None) -> None:
    """A forked site: its output to ``output``, then ``boring_site.py`` as ``__main__`` with ``argv``."""
    fd = os.open(output, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = [str(SITE), *argv]
    sys.path.insert(0, str(SITE.parent))
    runpy.run_path(str(SITE), run_name="__main__")


class SiteProcess:
    """A forked site, as much of a ``subprocess.Popen`` as the tests need."""

    def __init__(self, argv: list[str], output: Path, cwd: str | os.PathLike | None) -> None:
        self._output = output  # created before the site starts, so that its lines can be read from the start
        self._process = _FORKS.Process(target=_run, args=(list(argv), str(output), cwd and str(cwd)))
        self._process.start()
        self.pid = self._process.pid
        self.args = [str(SITE), *argv]

    @property
    def returncode(self) -> int | None:
        """The exit status once it ended (negative: the signal that ended it), else None."""
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """Waits for it to end; its output."""
        self.wait(timeout)
        return self.output(), None

    def output(self) -> str:
        """What it has written so far."""
        return self._output.read_text(errors="replace")

    @property
    def stdout(self) -> Iterator[str]:
        """Its output's lines as they are written, until it ends (what iterating a Popen's pipe gives)."""
        pending = b""
        with open(self._output, "rb") as output:
            while True:
                ended = self.returncode is not None  # before reading: all it wrote is in the file by then
                *lines, pending = (pending + output.read()).split(b"\n")
                yield from (line.decode(errors="replace") + "\n" for line in lines)
                if ended:
                    if pending:
                        yield pending.decode(errors="replace")
                    return
                time.sleep(0.05)

    def send_signal(self, signal: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal)

    def kill(self) -> None:
        if self.returncode is None:
            self._process.kill()
            self._process.join(10)


def start_site(argv: list[str], logs: Path, name: str, cwd: str | os.PathLike | None = None) -> SiteProcess:
    """Starts ``boring_site.py argv`` in a forked process, in ``cwd``; its output goes to a new file in ``logs``,
    ``<name>-1.log`` for the first site of that name, ``<name>-2.log`` for a restart."""
    number = 1
    while True:
        output = logs / f"{name}-{number}.log"
        try:
            os.close(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            number += 1
            continue
        return SiteProcess(argv, output, cwd)
