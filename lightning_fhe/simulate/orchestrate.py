"""Runs one setting of an experiment: a provisioned federation of real processes on this machine.

For each setting: provision a CA, TLS certificates and a CKKS key into a temporary folder, start
``python -m lightning_fhe.server`` on a free loopback port, then one ``python -m lightning_fhe.simulate.site``
per site, all talking mutual TLS over 127.0.0.1 exactly as across hospitals. Every process logs to a file in the
setting's output folder, so nothing can block on a full pipe and a failure can be shown afterwards.

The loop here only watches: it prints site-1's round records as they appear (and a line every half minute when
nothing happens), and it ends the run as soon as any process exits with an error, the server dies, or the
setting's ``experiment.timeout_s`` passes. Then every other process is stopped, so a failure never turns into a
hang, and the error names the process and shows the end of its log.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from lightning_fhe.simulate.config import site_names

__all__ = ["GLOBAL_MODEL", "SimulationError", "prepare_data", "run_setting", "threads_per_site"]

Echo = Callable[[str], None]

TAIL_LINES = 40
POLL_S = 0.5
HEARTBEAT_S = 30.0
SERVER_START_S = 120.0  # importing torch and TenSEAL on a busy machine can take a while
SERVER_EXIT_S = 30.0  # after the last site finished: the server exits once every site fetched the last model
SERVER_LINGER_S = 10  # how long the server keeps serving after the last round; sites fetch within seconds here
GLOBAL_MODEL = "global_model.pt"  # site-1's model after the last round, in the setting's output folder


class SimulationError(RuntimeError):
    """A process of the simulated federation failed, or the run timed out.

    ``log_tail`` holds the last lines of the failed process's log, ``log_path`` the whole log.
    """

    def __init__(self, message: str, log_tail: str = "", log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_tail = log_tail
        self.log_path = log_path


def threads_per_site(config: Mapping[str, Any], cores: int | None = None) -> int:
    """``trainer.num_threads``, or the machine's cores shared out among the sites: several sites each using every
    core would slow all of them down (and make timings meaningless). On Ray (``backend: ray``) a site's share is
    the whole CPUs its task holds (``sites.resources.num_cpus``), at least 1."""
    configured = config["trainer"]["num_threads"]
    if configured:
        return int(configured)
    if config.get("backend") == "ray":
        return max(1, math.floor(config["sites"]["resources"].get("num_cpus") or 0))
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // config["federation"]["sites"])


def prepare_data(config: Mapping[str, Any], echo: Echo = print) -> None:
    """Runs the data module's ``prepare_data()`` once, here, before any site starts (where a dataset is written or
    downloaded), so that the sites only read it and never race to write it."""
    from lightning_fhe.simulate.components import build_data

    data = build_data(config["data"], 0, config["federation"]["sites"])
    echo(f"preparing the data: {config['data']['class_path']}.prepare_data()")
    data.prepare_data()


# ------------------------------------------------------------------------------------------------ processes


# `python -c DIE_WITH_PARENT PARENT_PID COMMAND...`: asks Linux to SIGTERM this process when the one that started it
# dies (PR_SET_PDEATHSIG, which survives exec), then becomes COMMAND. A Ray worker killed by Ray (ray.cancel with
# force, a node's memory monitor) runs no cleanup, and its site or server must not outlive it.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "sys.exit(1) if os.getppid() != int(sys.argv[1]) else os.execv(sys.argv[2], sys.argv[2:])\n"
)


class ChildProcess:
    """A process of the federation, writing stdout and stderr to one log file.

    ``die_with_parent`` (Linux): the process is ended when the one that started it dies, whatever killed it.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        cwd: Path,
        env: Mapping[str, str],
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log: TextIO = log_path.open("w")
        command = list(command)
        if die_with_parent and sys.platform == "linux":
            command = [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *command]
        # A session of its own: Ctrl-C in the terminal reaches only the orchestrator, which stops the children
        # in order instead of every process dying at once mid-write.
        self.popen = subprocess.Popen(
            command, cwd=cwd, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; only this process, by its id."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def describe_exit(self, code: int) -> str:
        return f"exited with status {code}"

    def tail(self, lines: int = TAIL_LINES) -> str:
        if not self._log.closed:
            self._log.flush()
        return read_tail(self.log_path, lines)

    def last_line(self) -> str:
        """The last line of the log that says something: usually the exception of a failed process."""
        return last_line(self.tail())


def read_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file; "" when there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


class RecordFollower:
    """Reads the JSON lines a site appends, as they arrive; a partial last line waits for the next read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        try:
            with self.path.open() as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return []
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def read_records(path: Path) -> list[dict[str, Any]]:
    return RecordFollower(path).new_records()


# ------------------------------------------------------------------------------------------------ one setting


@dataclass(frozen=True)
class SettingRun:
    """What one setting produced: every site's round records, and the wall time including start-up."""

    name: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    wall_s: float


def run_setting(name: str, config: dict[str, Any], out_dir: Path, echo: Echo = print) -> SettingRun:
    """Provisions, starts the server and the sites, follows them to the end and returns their records.

    ``config`` is the setting's validated config. Logs and the config the sites read go to ``out_dir``; kits and
    the server's state go to a temporary folder, deleted afterwards (they hold a secret key and are useless after).

    With ``backend: ray`` the same processes run inside Ray tasks and an actor
    (:mod:`~lightning_fhe.simulate.ray_backend`); the results are the same files.

    Raises:
        SimulationError: a process failed or the setting ran past ``experiment.timeout_s``.
    """
    if config.get("backend") == "ray":
        from lightning_fhe.simulate.ray_backend import run_setting_on_ray

        return run_setting_on_ray(name, config, out_dir, echo)
    started = time.monotonic()
    out_dir = out_dir.resolve()  # the processes run in a temporary folder, where a relative path means nothing
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = threads_per_site(config)
    config = {**config, "trainer": {**config["trainer"], "num_threads": threads}}
    sites = site_names(config)
    processes: list[ChildProcess] = []
    with tempfile.TemporaryDirectory(prefix=f"lightning-fhe-{name}-") as tmp:
        work = Path(tmp)
        provision_kits(config, "localhost", work / "kits")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            server = ChildProcess("server", server_command(config, work, "127.0.0.1"), out_dir / "server.log",
                                  work, env)  # fmt: skip
            processes.append(server)
            # While the server imports torch and TenSEAL: the data, so that sites only ever read it.
            prepare_setting(name, config, out_dir, echo)
            port = wait_for_port(server, work / "port", config, name)
            echo(f"[{name}] server on 127.0.0.1:{port} (mutual TLS); {len(sites)} sites, {threads} thread(s) each")
            # The sites run where the simulation was started, with that folder importable: a class_path such as
            # my_task.MyModel and relative paths in init_args mean there what they mean here.
            here = os.getcwd()
            site_env = {**env, **site_environment(threads, here, env.get("PYTHONPATH", ""))}
            for index, site in enumerate(sites):
                command = site_command(sys.executable, out_dir, index, site, work / "kits" / site, f"localhost:{port}")
                processes.append(ChildProcess(site, command, out_dir / f"{site}.log", Path(here), site_env))
            follow(name, config, server, processes[1:], out_dir, started, echo)
        finally:
            for process in reversed(processes):
                process.stop()
    return collect(name, config, out_dir, started)


def provision_kits(config: Mapping[str, Any], host: str, kits: Path) -> None:
    """A CA, the server's certificate for ``host`` (and localhost), one certificate and the CKKS key per site."""
    from lightning_fhe.provision import load_provision_config, provision

    provision(
        load_provision_config(
            {"project": config["experiment"]["name"], "server": {"host": host, "port": 8443},
             "clients": site_names(config), "he": config["he"]}
        ),
        kits,
    )  # fmt: skip


def prepare_setting(name: str, config: Mapping[str, Any], out_dir: Path, echo: Echo) -> None:
    """The data prepared once, and the config the sites read written to ``out_dir/config.yaml``."""
    try:
        prepare_data(config, echo)
    except Exception as err:  # e.g. the cache folder holds something else
        raise SimulationError(f"[{name}] {config['data']['class_path']}.prepare_data() failed: {err}") from err
    (out_dir / "config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False))


def collect(name: str, config: dict[str, Any], out_dir: Path, started: float) -> SettingRun:
    """Every site's round records, as the sites wrote them to ``out_dir``."""
    records = [record for site in site_names(config) for record in read_records(out_dir / f"{site}.jsonl")]
    return SettingRun(name=name, config=config, records=records, wall_s=time.monotonic() - started)


def site_environment(threads: int, cwd: str, python_path: str) -> dict[str, str]:
    """What a site's process needs in its environment: its share of threads, and ``cwd`` importable."""
    return {
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(p for p in (cwd, python_path) if p),
    }


def site_command(python: str, out_dir: Path, index: int, site: str, kit: Path, server: str) -> list[str]:
    """``python -m lightning_fhe.simulate.site`` for site ``index``: it reads ``out_dir/config.yaml`` and writes its
    round records to ``out_dir/<site>.jsonl``; site-1 also saves its model after the last round (the last global
    model) to ``out_dir/global_model.pt``."""
    command = [
        python, "-m", "lightning_fhe.simulate.site", str(out_dir / "config.yaml"), "--site-index", str(index),
        "--kit", str(kit), "--server", server, "--out", str(out_dir / f"{site}.jsonl"),
    ]  # fmt: skip
    if index == 0:
        command += ["--model-out", str(out_dir / GLOBAL_MODEL)]
    return command


def server_command(config: Mapping[str, Any], work: Path, bind: str, port: int = 0) -> list[str]:
    """``python -m lightning_fhe.server`` for a setting, listening on ``bind`` at ``port`` (0: a free port), which it
    writes to ``work/port``, with its kit and state under ``work``. Started in ``work``, where no
    configs/server.yaml can slip in its own options."""
    federation = config["federation"]
    options = {
        "port": port,
        "port_file": work / "port",
        "bind": bind,
        "state_dir": work / "state",
        "rounds": federation["rounds"],
        "wait_after_min_s": federation["wait_after_min_s"],
        "round_timeout_s": federation["round_timeout_s"],
        "linger_s": SERVER_LINGER_S,
        # null means every site: an experiment compares settings, so every round must hold the same sites (the
        # server's own default, a majority, is for real federations).
        "min_clients": federation["sites"] if federation["min_clients"] is None else federation["min_clients"],
    }
    command = [sys.executable, "-m", "lightning_fhe.server", "--kit", str(work / "kits" / "server")]
    return command + [f"{key}={value}" for key, value in options.items()]


def wait_for_port(server: Any, port_file: Path, config: Mapping[str, Any], name: str) -> int:
    limit_s = min(SERVER_START_S, config["experiment"]["timeout_s"])
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if port_file.is_file():
            return int(port_file.read_text())
        if server.exit_code() is not None:
            raise failure(name, server, f"{server.describe_exit(server.exit_code())} before listening")
        time.sleep(0.1)
    raise failure(name, server, f"was not listening after {limit_s:.0f} s")


def follow(
    name: str,
    config: Mapping[str, Any],
    server: Any,
    sites: Sequence[Any],
    out_dir: Path,
    started: float,
    echo: Echo,
) -> None:
    """Watches until every site exited 0; raises at the first failure or at the timeout.

    ``server`` and ``sites`` are :class:`ChildProcess` or anything with its ``name``, ``log_path``, ``exit_code()``,
    ``describe_exit()``, ``tail()`` and ``last_line()`` (the Ray backend's tasks and actor)."""
    rounds = config["federation"]["rounds"]
    timeout_s = config["experiment"]["timeout_s"]
    follower = RecordFollower(out_dir / f"{sites[0].name}.jsonl")
    last_news = time.monotonic()
    next_round = 1
    while True:
        done = all(site.exit_code() == 0 for site in sites)  # before reading, so no last record is missed
        for record in follower.new_records():
            echo(f"[{name}] {format_progress(record, rounds)} | {time.monotonic() - started:.0f} s")
            next_round, last_news = record["round"] + 1, time.monotonic()
        # Sites first: when a site dies the server soon fails its round too, but the site's error is the cause.
        # The server exiting 0 is normal (the last model was fetched); the sites then validate it and exit.
        for process in (*sites, server):
            code = process.exit_code()
            if code not in (None, 0):
                raise failure(name, process, process.describe_exit(code))
        if done:
            break
        now = time.monotonic()
        if now - started > timeout_s:
            late = next((site for site in sites if site.exit_code() is None), server)
            raise failure(name, late, f"did not finish within experiment.timeout_s={timeout_s:g} s", "its last line")
        if now - last_news > HEARTBEAT_S:
            said = sites[0].last_line()[:90]
            echo(f"[{name}] {now - started:.0f} s: waiting for round {next_round} ({sites[0].name}: {said})")
            last_news = now
        time.sleep(POLL_S)
    deadline = time.monotonic() + SERVER_EXIT_S
    while server.exit_code() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if server.exit_code() not in (None, 0):
        raise failure(name, server, f"{server.describe_exit(server.exit_code())} after the sites finished")


def failure(setting: str, process: Any, what: str, last_is: str = "") -> SimulationError:
    """The error for ``process``; its log's last line is usually the exception that ended it, unless something
    else ended the process (``crashed``: its Ray task or actor died)."""
    last = process.last_line()
    last_is = last_is or ("its log ends" if getattr(process, "crashed", False) else "")
    return SimulationError(
        f"[{setting}] {process.name} {what}" + (f"; {last_is}: {last}" if last_is else f": {last}" if last else ""),
        log_tail=process.tail(),
        log_path=process.log_path,
    )


def format_progress(record: Mapping[str, Any], rounds: int) -> str:
    """One round as site-1 saw it."""
    value = "-" if record.get("metric") is None else f"{record['metric']:.4f}"
    return (
        f"round {record['round']}/{rounds}: {record.get('metric_name', 'metric')} {value}, "
        f"{len(record['participants'])} sites | "
        f"{record['site']}: train {record['train_s']:.1f} s, encrypt {record['encrypt_s']:.2f} s, "
        f"upload {record['upload_bytes'] / 1e6:.2f} MB in {record['upload_s']:.2f} s, wait {record['wait_s']:.2f} s, "
        f"decrypt {record['decrypt_s']:.2f} s"
    )
