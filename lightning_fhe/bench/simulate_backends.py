"""Many simulated sites on one machine: the process backend against the Ray backend, in one run.

Runs ``python -m lightning_fhe.simulate`` twice on the same small experiment, with the same seeds: once with
``backend=process`` (the server and one process per site), once with ``backend=ray`` on a local Ray started for
the run with ``--ray-cpus`` CPUs. Each site task asks for ``--ray-cpus / --sites`` CPUs (rounded down to Ray's
0.0001), so that every site runs at once: a site holds its slot for the whole federation, and a local Ray without
room for all of them is refused (docs/experiments.md, "On a Ray cluster"). Ray's CPUs are logical, so both
backends then run the same number of site processes on the same cores.

The experiment is ``configs/experiments/noniid_classification.yaml`` (an MLP of 2.8 k parameters on synthetic
features, every tensor encrypted) with IID shares, ``--sites`` sites and ``--rounds`` rounds of 1 local epoch: the
sites' start-up, memory and the federation's machinery dominate, not training.

Measured for each backend:

- **wall time**: from starting the command to its exit, start-up included (for Ray: starting the local Ray, its
  workers and the actors).
- **training time**: the simulator's own figure (first site's first local epoch to the last site's last
  validation).
- **peak memory**: the command's whole process tree (the simulator, the server, the sites, and for Ray every Ray
  process: GCS, raylet, agents, workers), sampled every ``--sample-s`` seconds from ``/proc`` (Linux); the peak of
  the sum of each process's RSS, and of the sum of each process's PSS (proportional set size: a page shared by k
  processes counts 1/k in each, so the PSS sum is what the tree really occupies; the RSS sum counts shared pages,
  such as the libraries every site maps, once per process).
- **at the peak**: how many processes the tree had at the PSS peak, and their PSS, by kind (the simulator, the
  server, the sites, Ray's workers, raylet, GCS and other Ray processes).

Both runs must reach the same global model (site-1's ``global_model.pt``), bit for bit; the bench checks it.

    python -m lightning_fhe.bench simulate --sites 32 --rounds 2 --ray-cpus 2

It reads the experiment from the repository's ``configs/`` (run it from a checkout, as ``make test`` installs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lightning_fhe.bench.report import log, publish

REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "noniid_classification.yaml"
BACKENDS = ("process", "ray")
RAY_STEP = 1e-4  # Ray's resolution for fractional resources


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", type=int, default=32, help="simulated sites (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of 1 local epoch (default 2)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    parser.add_argument("--samples", type=int, default=12000, help="synthetic samples in all (default 12000)")
    parser.add_argument("--sample-s", type=float, default=0.5, help="memory sampling interval (default 0.5 s)")
    parser.add_argument("--timeout-s", type=float, default=1800, help="each run's limit (default 1800 s)")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")


def run_from_args(args: argparse.Namespace) -> int:
    if args.sites < 1 or args.rounds < 1 or args.ray_cpus < 1:
        print("error: --sites, --rounds and --ray-cpus must be at least 1", file=sys.stderr)
        return 2
    if not REPO_CONFIG.is_file():
        print(f"error: {REPO_CONFIG} not found: run the bench from a checkout of the repository", file=sys.stderr)
        return 2
    result = run(args.sites, args.rounds, args.ray_cpus, args.samples, args.sample_s, args.timeout_s, log=log)
    return publish(result, format_table(result), args.json)


def site_cpus(ray_cpus: int, sites: int) -> float:
    """Each site task's CPUs so that ``sites`` fit in ``ray_cpus``, rounded down to Ray's step (at most 1)."""
    return min(1.0, math.floor(ray_cpus / sites / RAY_STEP + 1e-9) * RAY_STEP)


def run(
    sites: int, rounds: int, ray_cpus: int, samples: int, sample_s: float, timeout_s: float, log=print
) -> dict[str, Any]:
    import torch

    common = [
        f"federation.sites={sites}", f"federation.rounds={rounds}", "federation.local_epochs=1",
        "data.init_args.split=iid", f"data.init_args.num_samples={samples}", f"experiment.timeout_s={timeout_s:g}",
    ]  # fmt: skip
    per_site = site_cpus(ray_cpus, sites)
    on_ray = ["backend=ray", f"ray.num_cpus={ray_cpus}", f"sites.resources.num_cpus={per_site:g}"]
    extra = {"process": [], "ray": on_ray}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lightning-fhe-bench-backends-") as tmp:
        for backend in BACKENDS:
            out = Path(tmp) / backend
            command = [sys.executable, "-m", "lightning_fhe.simulate", str(REPO_CONFIG), *common, *extra[backend],
                       f"experiment.output_dir={out}"]  # fmt: skip
            where = f", {per_site:g} CPU each on a local Ray of {ray_cpus}" if backend == "ray" else ""
            log(f"{backend}: {sites} sites, {rounds} rounds{where}")
            row = measure(command, Path(tmp) / f"{backend}.log", sample_s, timeout_s + 120)
            document = json.loads((out / "results.json").read_text())
            row.update(backend=backend, sites=sites, rounds=rounds,
                       training_s=document["summary"][0]["training_time_s"])  # fmt: skip
            log(f"  {row['wall_s']:.0f} s, peak {row['peak_rss_mb']:.0f} MB RSS / {row['peak_pss_mb']:.0f} MB PSS "
                f"in {row['processes_at_peak']} processes")  # fmt: skip
            rows.append(row)
        models = [torch.load(next((Path(tmp) / b).glob("*/global_model.pt")), weights_only=True) for b in BACKENDS]
    same = models[0].keys() == models[1].keys() and all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    if not same:
        raise RuntimeError("the two backends reached different global models with the same seeds")
    return {
        "bench": "simulate",
        "machine": {"cpus": os.cpu_count()},
        "ray_cpus": ray_cpus,
        "site_cpus": per_site,
        "same_global_model": same,
        "rows": rows,
    }


def measure(command: list[str], log_path: Path, sample_s: float, timeout_s: float) -> dict[str, Any]:
    """Runs ``command`` to its end, sampling its process tree's memory; raises if it fails."""
    peak: dict[str, Any] = {"rss": 0, "pss": 0, "processes": 0, "kinds": {}}
    started = time.monotonic()
    with log_path.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                pids = tree(process.pid)
                memory = [process_memory(pid) for pid in pids]
                pss = sum(m[1] for m in memory)
                if pss > peak["pss"]:
                    kinds: dict[str, list[int]] = {}  # kind -> [processes, PSS]
                    for pid, (_, own) in zip(pids, memory):
                        kind = kinds.setdefault(process_kind(pid), [0, 0])
                        kind[0] += 1
                        kind[1] += own
                    peak.update(pss=pss, processes=len(pids), kinds=kinds)
                peak["rss"] = max(peak["rss"], sum(m[0] for m in memory))
                done.wait(sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
        done.set()
        sampler.join()
    wall = time.monotonic() - started
    if code != 0:
        text = log_path.read_text(errors="replace")
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with {code}:\n{text[-3000:]}")
    return {
        "wall_s": wall,
        "peak_rss_mb": peak["rss"] / 1e6,
        "peak_pss_mb": peak["pss"] / 1e6,
        "processes_at_peak": peak["processes"],
        "at_peak": {kind: {"processes": n, "pss_mb": own / 1e6} for kind, (n, own) in sorted(peak["kinds"].items())},
    }


def tree(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def process_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in bytes, from /proc/PID/smaps_rollup; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def process_kind(pid: int) -> str:
    """What a process of the tree is, in a word: the simulator, the server, a site, or a Ray process."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    for marker, kind in (
        ("lightning_fhe.simulate.site", "site"), ("lightning_fhe.server", "server"),
        ("lightning_fhe.simulate", "simulator"), ("ray::", "ray worker"), ("raylet", "raylet"),
        ("gcs_server", "ray gcs"), ("/ray/", "ray other"),  # agents and monitors: scripts in the ray package
    ):  # fmt: skip
        if marker in args:
            return kind
    return "other"


def format_table(result: dict[str, Any]) -> str:
    first = result["rows"][0]
    heading = (
        f"{first['sites']} sites, {first['rounds']} rounds; Ray: a local Ray of {result['ray_cpus']} CPUs, "
        f"{result['site_cpus']:g} CPU per site task; the same global model bit for bit: "
        f"{'yes' if result['same_global_model'] else 'NO'}"
    )
    columns = (
        "| backend | wall time (s) | training time (s) | peak memory, sum of RSS (MB) | peak memory, sum of PSS (MB) "
        "| at the PSS peak: processes, PSS (MB) |"
    )
    lines = [heading, "", columns, "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        kinds = ", ".join(f"{k['processes']} {kind} {k['pss_mb']:,.0f}" for kind, k in row["at_peak"].items())
        lines.append(
            f"| {row['backend']} | {row['wall_s']:.0f} | {row['training_s']:.0f} | {row['peak_rss_mb']:,.0f} "
            f"| {row['peak_pss_mb']:,.0f} | {row['processes_at_peak']}: {kinds} |"
        )
    return "\n".join(lines)
