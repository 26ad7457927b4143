"""``backend: ray``: one setting on a Ray cluster, or on a local Ray started for the run.

The processes are the process backend's, started from inside Ray: the server, ``python -m lightning_fhe.server``, is
a child process of a Ray actor, and each site, ``python -m lightning_fhe.simulate.site``, a child process of a Ray
task that asks for ``sites.resources``. So a site runs exactly the code it runs at a hospital, and talks to the
server over the same mutual-TLS gRPC; Ray only decides where each one runs.

- **Where the server runs.** Its actor is pinned to the driver's node (the machine that runs the simulator), which
  makes its kit, state and log local files of the driver. It reports that node's IP address, which the server's
  certificate names (besides localhost) and the sites connect to; the server listens on that address.
- **Kits** are provisioned by the driver, in a temporary folder. The server's stays there; each site's travels to
  its task through Ray's object store (the certificate, its TLS key and the CKKS secret key, in memory) and is
  written to a temporary folder on the site's node (mode 0700), deleted when the task ends. Nothing of a kit is
  printed or logged.
- **The output folder** (``experiment.output_dir``) is where every site writes its log, its round records and, for
  site-1, ``global_model.pt``, as in the process backend; the driver follows and collects them there. On a local Ray
  it is simply the driver's folder; on a cluster it must be a path every node sees (a shared file system), and a
  site whose node does not see it fails at once, saying so. So must the data (``prepare_data()`` runs once, in the
  driver).
- **Queued sites.** A site takes part in every round with one long-lived process (its Trainer, optimizer and data
  order live there), so it holds its Ray slot for the whole federation, and a site still in Ray's queue cannot start
  before another finishes, which is after the last round. Hence: every site must fit at once; a local Ray without
  room for them all is refused up front (:func:`room_problem`), with the request that fits; and the server starts
  only once every site task holds its slot, so time spent in Ray's queue (a busy cluster, an autoscaler adding
  nodes, up to ``ray.start_timeout_s``) never counts against the server's formation deadline or round timeouts,
  and no queued site is ever a dropout.
- **Failures.** Site tasks run with ``max_retries=0`` and the server actor with ``max_restarts=0``: a site is never
  submitted twice into one federation. A site or server that fails, or whose Ray task dies, ends the run like a
  failed process does, naming it and showing the end of its log; the other tasks are cancelled, and their
  processes ended with them.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_fhe.provision.config import grpc_address
from lightning_fhe.simulate.config import site_names
from lightning_fhe.simulate.orchestrate import (
    HEARTBEAT_S,
    POLL_S,
    TAIL_LINES,
    ChildProcess,
    Echo,
    SettingRun,
    SimulationError,
    collect,
    failure,
    follow,
    last_line,
    prepare_setting,
    provision_kits,
    read_tail,
    server_command,
    site_command,
    site_environment,
    threads_per_site,
    wait_for_port,
)

__all__ = ["ResourceError", "room_problem", "run_setting_on_ray", "site_request", "site_slots"]

# sites.resources keys that are Ray task options, and the node resources they draw on; other keys are custom resources
RESOURCE_OPTIONS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
SMALLEST_AMOUNT = 1e-4  # Ray's resolution for fractional amounts
STOP_GRACE_S = 10.0  # a cancelled site task stops its process (SIGTERM, then SIGKILL after 5 s) within this


class ResourceError(ValueError):
    """``sites.resources`` that Ray would refuse; ``key`` is the dotted key, ``reason`` what is wrong."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


# ------------------------------------------------------------------------------------------------ pure rules


def site_request(resources: Any) -> dict[str, float]:
    """The node resources each site task holds, by Ray's names: ``{num_cpus: 1, num_gpus: 0.25}`` is
    ``{"CPU": 1.0, "GPU": 0.25}``; another key is a custom resource of that name; amounts of 0 are left out.

    >>> site_request({"num_cpus": 0.0625, "num_gpus": 0, "hospital_a": 1})
    {'CPU': 0.0625, 'hospital_a': 1.0}

    Raises:
        ResourceError: not a mapping, a negative or non-numeric amount, an amount finer than Ray's 0.0001, more
            than one GPU that is not a whole number, or ``CPU``/``GPU`` spelled as a custom resource.
    """
    key = "sites.resources"
    if not isinstance(resources, Mapping) or not resources:
        raise ResourceError(key, f"expected a mapping of Ray resources such as {{num_cpus: 1}}, got {resources!r}")
    request: dict[str, float] = {}
    for option, amount in resources.items():
        where = f"{key}.{option}"
        if not isinstance(option, str) or not option:
            raise ResourceError(key, f"expected resource names, got {option!r}")
        if option in ("CPU", "GPU"):
            raise ResourceError(where, f"write {'num_cpus' if option == 'CPU' else 'num_gpus'}, as in ray.remote()")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount < 0:
            raise ResourceError(where, f"expected a number >= 0, got {amount!r}")
        if 0 < amount < SMALLEST_AMOUNT:
            raise ResourceError(where, f"{amount:g} is finer than Ray's smallest amount, {SMALLEST_AMOUNT:g}")
        if option == "num_gpus" and amount > 1 and amount != int(amount):
            raise ResourceError(where, f"more than one GPU must be a whole number, got {amount:g}")
        if amount:
            request[RESOURCE_OPTIONS.get(option, option)] = float(amount)
    return request


def task_options(request: Mapping[str, float]) -> dict[str, Any]:
    """``ray.remote(...)`` options for a site task holding ``request`` (from :func:`site_request`)."""
    options: dict[str, Any] = {option: request.get(name, 0) for option, name in RESOURCE_OPTIONS.items()}
    options["memory"] = int(options["memory"]) or None
    custom = {name: amount for name, amount in request.items() if name not in RESOURCE_OPTIONS.values()}
    return {**options, **({"resources": custom} if custom else {})}


def site_slots(nodes: Sequence[Mapping[str, float]], request: Mapping[str, float]) -> int | None:
    """How many site tasks holding ``request`` the nodes (each a mapping of its total resources) run at once; a
    task runs on one node, so each node counts for itself. None: no limit (the request asks for nothing).

    >>> site_slots([{"CPU": 1.5}, {"CPU": 1.5}], {"CPU": 1.0})  # 3 CPUs, but a task needs one node's
    2
    """
    if not request:
        return None
    return sum(min(int(node.get(name, 0) / amount + 1e-9) for name, amount in request.items()) for node in nodes)


def room_problem(sites: int, nodes: Sequence[Mapping[str, float]], request: Mapping[str, float]) -> str | None:
    """None when the nodes run all ``sites`` at once; else why they must and what would fit.

    Every site takes part in every round with one process, so it holds its slot until the last round: a site left
    in Ray's queue would wait for a slot that frees only after the federation ended, and the first round would
    wait for it. Ray's CPUs are logical, so a smaller ``num_cpus`` shares the same cores among more sites, as the
    process backend's processes do.
    """
    slots = site_slots(nodes, request)
    if slots is None or slots >= sites:
        return None
    totals = {name: sum(node.get(name, 0) for node in nodes) for name in request}
    asked = ", ".join(f"{name} {amount:g}" for name, amount in request.items())
    has = ", ".join(f"{name} {totals[name]:g}" for name in request)
    options = {name: option for option, name in RESOURCE_OPTIONS.items()}
    changes = []
    for name, amount in request.items():
        fitting = _fitting_amount(sites, nodes, name)
        if fitting < amount:
            key = f"sites.resources.{options.get(name, name)}"
            changes.append(f"{key}={fitting:.4g}" if fitting else f"{key}=0 (no node has enough {name})")
    return (
        f"Ray has room for {slots} of the {sites} sites at once (each site asks for {asked}; the nodes have {has}); "
        f"every site takes part in every round and holds its slot until the last one, so all must run at once: "
        f"set {' and '.join(changes) or 'fewer sites'} (Ray's resources are logical: the sites then share the cores "
        "as the process backend's processes do), or add nodes"
    )


def _fitting_amount(sites: int, nodes: Sequence[Mapping[str, float]], name: str) -> float:
    """The largest amount of ``name``, in Ray's steps, of which the nodes hold ``sites`` tasks at once; 0: none.

    The largest such amount is a node's total divided by a whole number of tasks (rounded down to Ray's step), and
    the number of tasks that fit only falls as the amount grows, so a binary search over those candidates finds it.
    """
    totals = [node.get(name, 0) for node in nodes]
    candidates = sorted(
        {math.floor(total / count / SMALLEST_AMOUNT + 1e-9) * SMALLEST_AMOUNT for total in totals if total > 0
         for count in range(1, sites + 1)} - {0.0}
    )  # fmt: skip
    low, high = 0, len(candidates)  # candidates[:low] fit; candidates[high:] do not
    while low < high:
        middle = (low + high) // 2
        if site_slots(nodes, {name: candidates[middle]}) >= sites:
            low = middle + 1
        else:
            high = middle
    return candidates[low - 1] if low else 0.0


# ------------------------------------------------------------------------------------------------ on the nodes


class ServerProcess:
    """A Ray actor that runs the aggregation server's process on its node (the driver's: see the module's notes)."""

    def __init__(self) -> None:
        self._process: ChildProcess | None = None

    def node_address(self) -> str:
        """The IP address of this node, as the other nodes of the cluster reach it."""
        import ray

        return ray.util.get_node_ip_address()

    def start(self, command: list[str], log_path: str, cwd: str, env: dict[str, str]) -> None:
        self._process = ChildProcess(
            "server", command, Path(log_path), Path(cwd), {**os.environ, **env}, die_with_parent=True
        )

    def exit_code(self) -> int | None:
        return None if self._process is None else self._process.exit_code()

    def stop(self) -> int | None:
        if self._process is None:
            return None
        self._process.stop()
        return self._process.exit_code()


class Rendezvous:
    """A Ray actor where each site task says that it holds its slot, then waits for the server's address.

    Asynchronous, so that a waiting site costs a coroutine of this actor, not a thread or a poll.
    """

    def __init__(self) -> None:
        import asyncio

        self._opened = asyncio.Event()
        self._address: str | None = None
        self._arrived: dict[str, str] = {}

    async def arrive(self, site: str, node: str) -> None:
        self._arrived[site] = node

    async def arrived(self) -> dict[str, str]:
        return dict(self._arrived)

    async def open(self, address: str | None) -> None:
        """The server's ``host:port``, or None: the run is called off and waiting sites return."""
        if not self._opened.is_set():
            self._address = address
            self._opened.set()

    async def server_address(self) -> str | None:
        await self._opened.wait()
        return self._address


def run_site_task(
    site: str,
    index: int,
    kit_files: dict[str, tuple[bytes, int]],
    out_dir: str,
    rendezvous: Any,
    cwd: str,
    python_path: str,
    threads: int,
) -> int | None:
    """A Ray task: site ``index``'s process, run from this node, once the server is up; its exit status (None
    when the run was called off before the server started).

    Raises:
        RuntimeError: the output folder is not on this node.
    """
    import ray

    node = ray.util.get_node_ip_address()
    out = Path(out_dir)
    if not (out / "config.yaml").is_file():
        raise RuntimeError(
            f"{out / 'config.yaml'} is not on this node ({node}): on a Ray cluster, experiment.output_dir must be a "
            "folder that every node sees at the same path (a shared file system)"
        )
    rendezvous.arrive.remote(site, node)
    # Not ray.get(): a task blocked in ray.get() (or ray.wait()) lends its CPUs back to Ray, which would start
    # queued sites in them, and this site would no longer hold its slot. Polling a future keeps it.
    answer = rendezvous.server_address.remote().future()
    while not answer.done():
        time.sleep(POLL_S)
    address = answer.result()
    if address is None:
        return None
    with tempfile.TemporaryDirectory(prefix=f"lightning-fhe-{site}-") as tmp:
        kit = write_kit(kit_files, Path(tmp) / site)
        here = cwd if os.path.isdir(cwd) else tmp  # the driver's folder, as in the process backend, where it exists
        env = {**os.environ, **site_environment(threads, here, python_path)}
        command = site_command(sys.executable, out, index, site, kit, address)
        process = ChildProcess(site, command, out / f"{site}.log", Path(here), env, die_with_parent=True)
        try:
            while (code := process.exit_code()) is None:  # a loop, so that ray.cancel() interrupts it at once
                time.sleep(POLL_S)
            return code
        finally:
            process.stop()


def read_kit(folder: Path) -> dict[str, tuple[bytes, int]]:
    """A kit folder's files by relative path, with their modes: what travels to a site task."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mode & 0o777)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def write_kit(files: Mapping[str, tuple[bytes, int]], folder: Path) -> Path:
    """The kit of :func:`read_kit` written back under ``folder`` (0700), each file with its mode."""
    folder.mkdir(mode=0o700, parents=True)
    for name, (data, mode) in files.items():
        path = folder / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
    return folder


# ------------------------------------------------------------------------------------------------ the driver


class _RayProcessView:
    """What :func:`follow` reads of a process Ray runs: its log, and whether Ray (not the process) ended it."""

    log_path: Path
    _error: str

    @property
    def crashed(self) -> bool:
        """Ended by Ray rather than by its process: the end of its log is not the error."""
        return bool(self._error)

    def describe_exit(self, code: int) -> str:
        return self._error or f"exited with status {code}"

    def tail(self, lines: int = TAIL_LINES) -> str:
        return read_tail(self.log_path, lines)

    def last_line(self) -> str:
        return last_line(self.tail())


class RaySite(_RayProcessView):
    """The driver's view of a site task, shaped like a :class:`ChildProcess` for :func:`follow`."""

    def __init__(self, name: str, ref: Any, log_path: Path) -> None:
        self.name, self.ref, self.log_path = name, ref, log_path
        self._code: int | None = None
        self._error = ""

    def done(self) -> bool:
        import ray

        return self._code is not None or bool(ray.wait([self.ref], timeout=0)[0])

    def exit_code(self) -> int | None:
        import ray
        from ray.exceptions import RayError

        if self._code is None and self.done():
            try:
                code = ray.get(self.ref)
            except RayError as err:
                self._code, self._error = -1, f"failed in its Ray task ({ray_error(err)})"
            else:
                self._code = -1 if code is None else code
                self._error = "was called off before the server started" if code is None else ""
        return self._code


class RayServer(_RayProcessView):
    """The driver's view of the server actor, shaped like a :class:`ChildProcess` for :func:`follow`."""

    name = "server"

    def __init__(self, actor: Any, log_path: Path) -> None:
        self.actor, self.log_path = actor, log_path
        self._error = ""

    def exit_code(self) -> int | None:
        import ray
        from ray.exceptions import RayError

        if self._error:
            return -1
        try:
            return ray.get(self.actor.exit_code.remote())
        except RayError as err:
            self._error = f"failed in its Ray actor ({ray_error(err)})"
            return -1

    def stop(self) -> None:
        import ray
        from ray.exceptions import RayError

        try:
            ray.get(self.actor.stop.remote(), timeout=STOP_GRACE_S)
        except (RayError, TimeoutError):
            pass  # killing the actor below ends its process too (die_with_parent)
        ray.kill(self.actor)


def ray_error(err: BaseException) -> str:
    """A Ray exception in one line: the task's own exception where there is one, else Ray's first line."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def run_setting_on_ray(name: str, config: dict[str, Any], out_dir: Path, echo: Echo = print) -> SettingRun:
    """:func:`~lightning_fhe.simulate.orchestrate.run_setting` with the server and the sites on Ray.

    Connects to ``ray.address`` (a local Ray started for the run when null, shut down after it); a process that is
    already connected to Ray (``ray.init()`` before) keeps its connection.

    Raises:
        SimulationError: Ray has no room for every site, a site waited in Ray's queue past ``ray.start_timeout_s``,
            a process or its Ray task failed, or the setting ran past ``experiment.timeout_s``.
    """
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError as err:
        raise SimulationError(f"[{name}] backend: ray needs the ray package: pip install 'lightning_fhe[ray]' "
                              f"({err})") from None  # fmt: skip

    started = time.monotonic()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = threads_per_site(config)
    config = {**config, "trainer": {**config["trainer"], "num_threads": threads}}
    sites = site_names(config)
    request = site_request(config["sites"]["resources"])
    connected_here = _connect(ray, config, name)
    tasks: list[RaySite] = []
    actors: list[Any] = []
    server: RayServer | None = None
    rendezvous = None
    try:
        problem = room_problem(len(sites), [node["Resources"] for node in ray.nodes() if node["Alive"]], request)
        if problem and config["ray"]["address"] is None:
            raise SimulationError(f"[{name}] {problem}")
        if problem:  # an autoscaler may add nodes: wait for them, up to ray.start_timeout_s
            echo(f"[{name}] for now, {problem}")
        # The server and the rendezvous hold no slot and stay on this node, with the driver's files.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        pinned = {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0, "scheduling_strategy": here}
        actor = ray.remote(ServerProcess).options(**pinned).remote()
        rendezvous = ray.remote(Rendezvous).options(**pinned).remote()
        actors += [actor, rendezvous]
        host = ray.get(actor.node_address.remote())
        with tempfile.TemporaryDirectory(prefix=f"lightning-fhe-{name}-") as tmp:
            work = Path(tmp)
            try:
                provision_kits(config, host, work / "kits")
                prepare_setting(name, config, out_dir, echo)
                site_task = ray.remote(max_retries=0, **task_options(request))(run_site_task)
                for index, site in enumerate(sites):
                    ref = site_task.options(name=f"lightning_fhe {name} {site}").remote(
                        site, index, ray.put(read_kit(work / "kits" / site)), str(out_dir), rendezvous, os.getcwd(),
                        os.environ.get("PYTHONPATH", ""), threads,
                    )  # fmt: skip
                    tasks.append(RaySite(site, ref, out_dir / f"{site}.log"))
                wait_for_slots(name, config, rendezvous, tasks, echo)
                command = server_command(config, work, host, config["ray"]["server_port"])
                actor.start.remote(command, str(out_dir / "server.log"), str(work), {"PYTHONUNBUFFERED": "1"})
                server = RayServer(actor, out_dir / "server.log")
                address = grpc_address(host, wait_for_port(server, work / "port", config, name))
                rendezvous.open.remote(address)
                echo(f"[{name}] server on {address} (mutual TLS, a Ray actor on this node); {len(sites)} site tasks, "
                     f"{threads} thread(s) each")  # fmt: skip
                follow(name, config, server, tasks, out_dir, started, echo)
            finally:
                if rendezvous is not None:
                    rendezvous.open.remote(None)  # sites still waiting for the server return
                stop_sites(tasks)
                if server is not None:
                    server.stop()  # before its kit and state go with the temporary folder
    finally:
        for handle in actors:
            ray.kill(handle)
        if connected_here:
            ray.shutdown()
    return collect(name, config, out_dir, started)


def _connect(ray: Any, config: Mapping[str, Any], name: str) -> bool:
    """Connects to ``ray.address``, or starts a local Ray; False when this process was connected already.

    The sites' processes log to files, so the workers' output is not forwarded to this terminal.
    """
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    address = config["ray"]["address"]
    if address not in (None, "auto"):
        _check_reachable(address, name)
    try:
        if address is None:  # "local": a new Ray even where `ray start` left one running
            ray.init(address="local", num_cpus=config["ray"]["num_cpus"], include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = "start a local Ray" if address is None else f"connect to the Ray cluster at ray.address={address}"
        raise SimulationError(f"[{name}] could not {where}: {type(err).__name__}: {err}") from err
    return True


def _check_reachable(address: str, name: str, timeout_s: float = 10.0) -> None:
    """Fails at once where nothing listens at ``HOST:PORT``, which ``ray.init`` would retry for minutes."""
    host, _, port = address.rpartition(":")  # checked by the config's validation
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise SimulationError(
            f"[{name}] nothing answers at ray.address={address} ({err}): is the Ray head running there "
            "(ray start --head), and is its GCS port open to this machine?"
        ) from None


def wait_for_slots(name: str, config: Mapping[str, Any], rendezvous: Any, tasks: Sequence[RaySite], echo: Echo) -> None:
    """Returns once every site task runs (holds its slot), so that the server's clock starts after Ray's queue.

    Raises:
        SimulationError: a task ended first (e.g. the output folder is not on its node), or some still wait in the
            queue after ``ray.start_timeout_s``.
    """
    import ray

    limit_s = config["ray"]["start_timeout_s"]
    begun = last_news = time.monotonic()
    while True:
        arrived = ray.get(rendezvous.arrived.remote())
        for task in tasks:
            code = task.exit_code()
            if code is not None:
                raise failure(name, task, f"{task.describe_exit(code)} before the server started")
        queued = [task.name for task in tasks if task.name not in arrived]
        if not queued:
            nodes = len(set(arrived.values()))
            echo(f"[{name}] {len(tasks)} site tasks hold their Ray slots on {nodes} node(s); starting the server")
            return
        now = time.monotonic()
        if now - begun > limit_s:
            shown = ", ".join(queued[:5]) + (f" and {len(queued) - 5} more" if len(queued) > 5 else "")
            raise SimulationError(
                f"[{name}] {len(queued)} of {len(tasks)} site tasks still wait in Ray's queue after "
                f"ray.start_timeout_s={limit_s:g} s ({shown}), for sites.resources "
                f"{config['sites']['resources']}: every site must run at once, so the cluster needs room for all of "
                "them; see docs/experiments.md, 'On a Ray cluster'"
            )
        if now - last_news > HEARTBEAT_S:
            echo(f"[{name}] {now - begun:.0f} s: {len(queued)} of {len(tasks)} site tasks wait in Ray's queue")
            last_news = now
        time.sleep(POLL_S)


def stop_sites(tasks: Sequence[RaySite]) -> None:
    """Cancels the site tasks still running: each stops its process (SIGTERM, then SIGKILL) and returns; a task
    that has not within ``STOP_GRACE_S`` is killed with its worker, and its process follows (die_with_parent)."""
    import ray

    pending = [task.ref for task in tasks if not task.done()]
    if not pending:
        return
    for ref in pending:
        ray.cancel(ref)
    _, late = ray.wait(pending, num_returns=len(pending), timeout=STOP_GRACE_S)
    for ref in late:
        ray.cancel(ref, force=True)
