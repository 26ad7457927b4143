"""The seed's Table 2 on loopback: per-site encryption, decryption and upload time, encrypted against raw updates.

Clara Train 4.0's blog (Table 2) reports, per client and for up to 30 clients, the mean and standard deviation of
the time to encrypt a model update, to decrypt the global model and to upload, with homomorphic encryption and
with raw (plaintext) updates. This bench runs the same exchange for real, twice in one run:

* **encrypted**: every floating tensor of the model is encrypted with our codec, on the site's
  :class:`~lightning_fhe.he.pool.CipherPool`; the plaintext layout is empty.
* **raw**: the same tensors are sent in plaintext (encrypted layout empty, everything in the plaintext layout):
  plain federated averaging through the same server.

Each setting is one federation: ``python -m lightning_fhe.server`` as its own process, listening on 127.0.0.1 at a
free port, with mutual TLS from kits made by the provisioning tool, and K sites, each its own process (SEAL holds
the GIL, so threads would serialize; processes are also what real sites are). The sites join, the first sends the
initial model (round 0, not measured), then for every round each site runs what
:class:`~lightning_fhe.site.FederatedSite` runs (:func:`~lightning_fhe.site.send_encrypted` and
:func:`~lightning_fhe.site.fetch_decrypted`):

* uploads its update while the pool encrypts it, read from the model's tensors a chunk's worth at a time (the
  ``AggregatorClient.submit`` call, which includes waiting for one of the server's ``max_concurrent_uploads``
  upload slots); "encryption" is the time the upload waited for encrypted chunks;
* waits for the round to close and downloads the global model, whose chunks the pool decrypts as they arrive,
  straight into new tensors: "wait + download"; "decryption" is the time the download waited for decryption.
  For raw updates the plaintext is cut back into named tensors (``TensorLayout.unflatten``), and nothing is
  encrypted;
* "round" is all of it, end to end, per site: the figure the issue compares (encrypted <= 2.5x raw).

Each site also reports its peak resident memory during the rounds above its idle level (joined, model loaded,
pool started): the issue asks for less than 3x the model's fp32 size.

Means and standard deviations (population, ddof=0) are over all sites and rounds. Bytes are the payload as the
client counts it: ciphertext chunks and plaintext values, without gRPC/TLS framing. The model is float32, so raw
updates go as float32 (4 bytes per parameter); an encrypted update is about 1.88x that (two reals per complex CKKS
slot, the first polynomial packed to 60 bits plus a seed), and the encrypted global model about 1.9x (the summed
first polynomial plus the participants' seeds), against 1x for the raw average.

**Contention.** The seed measured clients on separate machines. Here the K sites and the server share this
machine's cores: every site encrypts at the same moment of a round, so with K sites on C cores each encryption
takes about K/C times its uncontended time (each site gets C/K cipher workers by default, ``--workers``), and the upload and wait times include the server's own CPU work and
the queue for upload slots. Compare encrypted against raw within one run, not absolute times against the seed.

    python -m lightning_fhe.bench round --clients 30 --model segresnet-8 --rounds 2 --json round.json

The sites need the client, and through :mod:`lightning_fhe.he.layout` torch (1 s and ~160 MB of private memory to
import, measured). They import it once, in a ``forkserver`` process, and are forked from it: a site starts in
milliseconds and shares those pages copy-on-write. 30 sites of segresnet-8 (2 rounds, both settings) took 45 s and
about 3 GB of memory with the server, on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_fhe.client import AggregatorClient
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.models import SEGRESNET_FILTERS
from lightning_fhe.provision import ProvisionConfig, load_site_kit, provision
from lightning_fhe.bench.report import log, publish

SETTINGS = ("encrypted", "raw")
TIMES = ("encrypt_s", "decrypt_s", "upload_s", "wait_s", "round_s")
# The checks, within one run: a site's whole encrypted round against the raw one, and its peak memory
# above idle against the model's fp32 size.
MAX_ROUND_RATIO = 2.5
MAX_PEAK_RSS_FP32 = 3.0

# A model without MONAI: two tensors, 40,960 parameters (exactly 5 ciphertexts). For tests and quick looks.
TINY_MODEL = "tiny"
TINY_SHAPES = {"conv.weight": (64, 632), "conv.bias": (512,)}
MODELS = (*sorted(SEGRESNET_FILTERS), TINY_MODEL)


class BenchError(RuntimeError):
    """A site or the server failed, or the run timed out; the message holds the error and the server's log."""


# -- one site (its own process) ---------------------------------------------------------------------------------------


def site_update(base: np.ndarray, index: int, round_number: int) -> np.ndarray:
    """What site ``index`` sends in a round: different for every site and round, with a known average."""
    return base * (1.0 + 0.01 * index) + 0.001 * round_number


def expected_average(base: np.ndarray, clients: int, round_number: int) -> np.ndarray:
    """The equal-weight average of :func:`site_update` over sites ``1..clients``."""
    return site_update(base, (clients + 1) / 2, round_number)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _site_process(spec: dict[str, Any]) -> None:
    """Entry point of one site process: runs :func:`_run_site` and writes its result (or its error) as JSON."""
    out = Path(spec["result"])
    try:
        result = _run_site(spec)
    except BaseException as err:  # noqa: BLE001 - reported by the parent, with the traceback
        _write_json(out, {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
        sys.exit(1)
    _write_json(out, result)


def _run_site(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lightning_fhe.he.pool import CipherPool
    from lightning_fhe.proto.update_shape import update_shape
    from lightning_fhe.site import LayoutValues, fetch_decrypted, send_encrypted

    torch.set_num_threads(1)  # K sites on C cores: one thread each (unflatten is the only torch work)
    if spec.get("gate") is not None:
        spec["gate"].wait()  # held until the caller opens it (see run's hold_sites)
    encrypted = spec["setting"] == "encrypted"
    index, clients = spec["index"], spec["clients"]
    layout = TensorLayout.from_dict(spec["layout"])
    empty = TensorLayout(())
    layouts = (layout, empty) if encrypted else (empty, layout)
    kit = load_site_kit(spec["kit"])
    samples: dict[str, list] = {k: [] for k in (*TIMES, "round_s", "upload_bytes", "download_bytes")}
    max_error = 0.0
    # The raw setting runs the same path with nothing to encrypt (a pool of one worker starts no process).
    pool = CipherPool(kit.he_context, workers=spec["workers"] if encrypted else 1)
    with AggregatorClient(
        kit, spec["address"], retry_budget_s=spec["retry_budget_s"], rpc_timeout_s=spec["timeout_s"]
    ) as client, pool:
        info = client.join(1.0, *layouts)
        if info.send_initial_model:
            client.submit(0, [], np.load(spec["base"]))
        base = layout.unflatten(client.fetch_global(0).plaintext)  # the initial model, as every site loads it
        model = {name: tensor.clone() for name, tensor in base.items()}  # what local training changes in place
        memory = PeakMemory.start()  # idle: joined, model loaded, pool started; before round 1
        for r in range(info.current_round, info.rounds + 1):
            train_locally(model, base, index, r)
            shape = update_shape(r, *layouts, kit.params)
            started = time.perf_counter()
            if encrypted:
                sent = send_encrypted(client, pool, shape, LayoutValues(layout, model), np.zeros(0), info.share)
            else:  # as FederatedSite sends its plaintext layout
                sent = send_encrypted(client, pool, shape, np.zeros(0), layout.flatten(model), info.share)
            uploaded = time.perf_counter()
            received = fetch_decrypted(client, pool, shape)
            unflatten_start = time.perf_counter()
            global_model = {**layouts[1].unflatten(received.model.plaintext), **received.encrypted}
            done = time.perf_counter()
            samples["encrypt_s"].append(sent.encrypt_s)
            samples["upload_s"].append(uploaded - started)
            samples["wait_s"].append(unflatten_start - uploaded)
            samples["decrypt_s"].append(received.decrypt_s + done - unflatten_start)
            samples["round_s"].append(done - started)
            samples["upload_bytes"].append(sent.receipt.bytes_sent)
            samples["download_bytes"].append(received.model.bytes_received)
            if len(received.model.participants) != clients:
                raise BenchError(f"round {r} closed with {len(received.model.participants)} of {clients} sites")
            max_error = max(max_error, global_error(global_model, base, clients, r))
            del sent, received, global_model
        peak = memory.peak_above_idle()
    return {"site": kit.name, "samples": samples, "max_abs_error": max_error, **peak}


def train_locally(model: dict[str, Any], base: dict[str, Any], index: int, round_number: int) -> None:
    """:func:`site_update` of the initial model, written into ``model``'s tensors in place (float32 arithmetic, no
    temporary), so the stand-in for training adds nothing to the site's peak memory."""
    for name, tensor in model.items():
        tensor.copy_(base[name]).mul_(1.0 + 0.01 * index).add_(0.001 * round_number)


def global_error(global_model: dict[str, Any], base: dict[str, Any], clients: int, round_number: int) -> float:
    """The largest distance of the global model from :func:`expected_average`, in float64, a piece at a time (so the
    check adds nothing to the site's peak memory either)."""
    scale, piece = 1.0 + 0.01 * (clients + 1) / 2, 1 << 16
    error = 0.0
    for name, tensor in global_model.items():
        for got, start in zip(tensor.reshape(-1).split(piece), base[name].reshape(-1).split(piece)):
            expected = start.double() * scale + 0.001 * round_number
            error = max(error, float((got.double() - expected).abs().max()))
    return error


class PeakMemory:
    """A site's resident memory above its idle level: the peak (VmHWM, reset at the start) of this process, and
    separately of its pool's worker processes, minus their resident memory at the start. Linux only (/proc);
    elsewhere the figures are None."""

    def __init__(self, pids: list[int], idle: dict[int, int]) -> None:
        self.pids, self.idle = pids, idle

    @classmethod
    def start(cls) -> PeakMemory:
        pids = [os.getpid(), *(p.pid for p in multiprocessing.active_children())]
        idle: dict[int, int] = {}
        try:
            for pid in pids:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
                idle[pid] = _proc_kib(pid, "VmRSS") * 1024
        except OSError:
            idle = {}
        return cls(pids, idle)

    def peak_above_idle(self) -> dict[str, int | None]:
        if not self.idle:
            return {"peak_rss_above_idle": None, "workers_peak_rss_above_idle": None, "idle_rss": None}
        above = {pid: _proc_kib(pid, "VmHWM") * 1024 - self.idle[pid] for pid in self.pids}
        site = self.pids[0]
        workers = [v for pid, v in above.items() if pid != site]
        return {
            "peak_rss_above_idle": above[site],
            # Each worker's own peak, added up: an upper bound, since they need not peak at the same moment.
            "workers_peak_rss_above_idle": sum(workers) if workers else None,
            "idle_rss": self.idle[site],
        }


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/{pid}/status has no {field}")


# -- the parent ------------------------------------------------------------------------------------------------------


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Mean and (population) standard deviation; ``{"mean": None, "std": None}`` when there are no values."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(a.mean()), "std": float(a.std())}


def aggregate(site_results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One setting's record from its sites' samples: mean and std of every time, mean bytes per site and round."""
    pooled: dict[str, list] = {}
    for result in site_results:
        for key, values in result["samples"].items():
            pooled.setdefault(key, []).extend(values)
    record: dict[str, Any] = {key: summarize(pooled.get(key, [])) for key in TIMES}
    for key in ("upload_bytes", "download_bytes"):
        values = pooled.get(key, [])
        record[key] = int(round(float(np.mean(values)))) if values else 0
    record["samples"] = len(pooled.get("upload_s", []))
    record["max_abs_error"] = max((r["max_abs_error"] for r in site_results), default=0.0)
    for key in ("peak_rss_above_idle", "workers_peak_rss_above_idle"):  # the worst site's
        values = [r[key] for r in site_results if r.get(key) is not None]
        record[key] = max(values) if values else None
    return record


def checks(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, as ratios within this run: ``round_ratio`` (the encrypted round's mean over the raw
    one's, <= 2.5) and ``peak_rss_fp32`` (the worst encrypted site's peak RSS above idle over the model's fp32
    size, < 3), each with whether it passes (None when it could not be measured)."""
    out: dict[str, Any] = {}
    enc, raw = result.get("encrypted"), result.get("raw")
    if enc and raw and enc["round_s"]["mean"] and raw["round_s"]["mean"]:
        ratio = enc["round_s"]["mean"] / raw["round_s"]["mean"]
        out["round_ratio"] = {"value": ratio, "max": MAX_ROUND_RATIO, "ok": ratio <= MAX_ROUND_RATIO}
    if enc and enc.get("peak_rss_above_idle") is not None:
        ratio = enc["peak_rss_above_idle"] / result["fp32_bytes"]
        out["peak_rss_fp32"] = {"value": ratio, "max": MAX_PEAK_RSS_FP32, "ok": ratio < MAX_PEAK_RSS_FP32}
    return out


def model_state(model: str, seed: int = 0) -> tuple[TensorLayout, np.ndarray]:
    """The layout of the model's floating tensors and their values as one float64 vector."""
    if model == TINY_MODEL:
        rng = np.random.default_rng(seed)
        layout = TensorLayout.from_dict({"tensors": [[n, list(s), "float32"] for n, s in TINY_SHAPES.items()]})
        return layout, rng.normal(0.0, 0.05, layout.numel).astype(np.float32).astype(np.float64)
    import torch

    from lightning_fhe.models import build_model

    torch.manual_seed(seed)
    state = {k: v for k, v in build_model(model).state_dict().items() if v.is_floating_point()}
    layout = TensorLayout.from_tensors(state)
    return layout, layout.flatten(state)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return text[-chars:]


def start_loopback_server(
    kit: Path, workdir: Path, name: str, options: Sequence[str], log_path: Path
) -> tuple[subprocess.Popen, str]:
    """``python -m lightning_fhe.server`` on a free loopback port with the built-in defaults and ``options``,
    logging to ``log_path``.

    Returns the process and its address once it listens. Raises :class:`BenchError` with the log's tail if it exits
    first or does not listen within 120 s.
    """
    port_file = workdir / f"port-{name}"
    empty = workdir / "empty.yaml"  # the built-in defaults, whatever configs/server.yaml says
    empty.write_text("{}\n")
    command = [sys.executable, "-m", "lightning_fhe.server", "--kit", str(kit), "--config", str(empty)]
    command += ["port=0", "bind=127.0.0.1", f"state_dir={workdir / ('state-' + name)}", f"port_file={port_file}"]
    command += list(options)
    with open(log_path, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if server.poll() is not None:
            raise BenchError(
                f"{name}: the server exited with code {server.returncode} before listening:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            server.kill()
            server.wait()
            raise BenchError(f"{name}: the server did not listen within 120 s:\n{_tail(log_path)}")
        time.sleep(0.05)
    return server, f"127.0.0.1:{int(port_file.read_text())}"


class _Federation:
    """One server process and its K site processes; :meth:`close` ends whatever still runs."""

    def __init__(self, workdir: Path, kits: Path, setting: str) -> None:
        self.workdir, self.kits, self.setting = workdir, kits, setting
        self.server: subprocess.Popen | None = None
        self.sites: list[multiprocessing.process.BaseProcess] = []
        self.log = workdir / f"server-{setting}.log"

    def start_server(self, rounds: int, timeout_s: float, overrides: Sequence[str]) -> str:
        options = [f"rounds={rounds}", "keep_rounds=1", "linger_s=30", f"round_timeout_s={timeout_s}", *overrides]
        kit = self.kits / "server"
        self.server, address = start_loopback_server(kit, self.workdir, self.setting, options, self.log)
        return address

    def run_sites(self, context, specs: list[dict[str, Any]], timeout_s: float, log: Callable[[str], None]) -> float:
        """Starts the sites, waits for all of them and the server; returns the wall time. Fails fast, never hangs."""
        started = time.monotonic()
        for spec in specs:
            # Not daemonic: a site starts its cipher pool's processes (close() ends the sites whatever happens).
            process = context.Process(target=_site_process, args=(spec,), name=f"site-{spec['index']}", daemon=False)
            process.start()
            self.sites.append(process)
        deadline, last_note = started + timeout_s, started
        while True:
            failed = [(p, s) for p, s in zip(self.sites, specs) if p.exitcode not in (None, 0)]
            if failed:
                process, spec = failed[0]
                raise BenchError(
                    f"{self.setting}: {process.name} failed (exit code {process.exitcode}): {self._site_error(spec)}\n"
                    f"server log (last lines):\n{_tail(self.log)}"
                )
            if all(p.exitcode == 0 for p in self.sites):
                break
            if self.server.poll() is not None:
                time.sleep(1.0)  # a site that saw the server go may still be writing why
                failed = [(p, s) for p, s in zip(self.sites, specs) if p.exitcode not in (None, 0)]
                why = f"; {failed[0][0].name}: {self._site_error(failed[0][1])}" if failed else ""
                raise BenchError(
                    f"{self.setting}: the server exited with code {self.server.returncode} while sites were still "
                    f"running{why}\nserver log (last lines):\n{_tail(self.log)}"
                )
            now = time.monotonic()
            if now > deadline:
                running = [p.name for p in self.sites if p.exitcode is None]
                raise BenchError(
                    f"{self.setting}: timed out after {timeout_s:g} s with {len(running)} site(s) still running "
                    f"({', '.join(running[:5])}{'...' if len(running) > 5 else ''})\n"
                    f"server log (last lines):\n{_tail(self.log)}"
                )
            if now - last_note > 30:
                done = sum(p.exitcode == 0 for p in self.sites)
                log(f"  {self.setting}: {done}/{len(self.sites)} sites done after {now - started:.0f} s")
                last_note = now
            time.sleep(0.1)
        seconds = time.monotonic() - started
        try:
            code = self.server.wait(60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.setting}: the server did not exit after the last round:\n{_tail(self.log)}")
        if code != 0:
            raise BenchError(f"{self.setting}: the server exited with code {code}:\n{_tail(self.log)}")
        return seconds

    @staticmethod
    def _site_error(spec: dict[str, Any]) -> str:
        try:
            data = json.loads(Path(spec["result"]).read_text())
        except (OSError, ValueError):
            return "(it wrote no error: killed?)"
        return data.get("error", "(no error recorded)") + "\n" + data.get("traceback", "")

    def close(self) -> None:
        for p in self.sites:
            if p.exitcode is None:
                p.terminate()
        for p in self.sites:
            p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join(5)
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


def _upload_slots(overrides: Sequence[str]) -> int | str:
    """The server's ``max_concurrent_uploads`` under these overrides (the last one wins), for the table."""
    from lightning_fhe.server.config import ServerConfig

    value: int | str = ServerConfig().max_concurrent_uploads
    for option in overrides:
        key, _, text = option.partition("=")
        if key.strip() == "max_concurrent_uploads":
            value = int(text) if text.strip().isdigit() else text
    return value


def _context():
    """Sites are forked from a forkserver that imported this module (client, TenSEAL, torch) once."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def site_gate() -> Any:
    """An event the site processes can wait on (see :func:`run`'s ``hold_sites``), from their start method."""
    return _context().Event()


def run(
    model: str = "segresnet-8",
    clients: int = 2,
    rounds: int = 2,
    *,
    timeout_s: float = 900.0,
    server_overrides: Sequence[str] = (),
    settings: Sequence[str] = SETTINGS,
    workers: int | None = None,
    hold_sites: Any = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs one federation per setting with ``clients`` site processes for ``rounds`` rounds; the JSON record.

    Args:
        timeout_s: limit on each federation (sites and server); beyond it the bench fails with what still runs.
        server_overrides: extra ``key=value`` options for the server (``max_concurrent_uploads=4`` ...).
        workers: each encrypted site's cipher pool processes; default: this machine's cores shared out among the
            sites (:func:`default_site_workers`).
        hold_sites: an event from :func:`site_gate`: every site process waits for it before it joins. A caller
            that never sets it gets sites that provably cannot finish (how the timeout is tested).

    Raises:
        BenchError: a site or the server failed, or a federation ran past ``timeout_s``.
    """
    if clients < 1 or rounds < 1:
        raise ValueError(f"clients and rounds must be at least 1, got {clients} and {rounds}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {list(MODELS)}")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise ValueError(f"settings must be some of {list(SETTINGS)}, got {list(settings)}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    workers = default_site_workers(clients) if workers is None else workers
    started = time.monotonic()
    layout, base = model_state(model)
    fp32_bytes = layout.numel * 4
    log(f"round bench: {model}, {layout.numel:,} parameters ({fp32_bytes / 1e6:.1f} MB fp32), {clients} site "
        f"processes, {rounds} round(s), {os.cpu_count()} CPU cores, {workers} cipher worker(s) per site")
    context = _context()
    result: dict[str, Any] = {
        "model": model,
        "params": layout.numel,
        "fp32_bytes": fp32_bytes,
        "clients": clients,
        "rounds": rounds,
        "cpu_count": os.cpu_count(),
        "workers": workers,
        "server_overrides": list(server_overrides),
        "max_concurrent_uploads": _upload_slots(server_overrides),
    }
    with tempfile.TemporaryDirectory(prefix="lfhe-bench-round-") as tmp:
        workdir = Path(tmp)
        names = tuple(f"site-{i}" for i in range(1, clients + 1))
        kits = provision(ProvisionConfig("bench-round", "localhost", 8443, names), workdir / "kits")
        np.save(workdir / "base.npy", base)
        for setting in settings:
            federation = _Federation(workdir, workdir / "kits", setting)
            try:
                address = federation.start_server(rounds, timeout_s, server_overrides)
                log(f"  {setting}: server at {address}; starting {clients} sites")
                specs = [
                    {
                        "setting": setting,
                        "index": i,
                        "clients": clients,
                        "kit": str(kits[name]),
                        "address": address,
                        "layout": layout.to_dict(),
                        "base": str(workdir / "base.npy"),
                        "result": str(workdir / f"{setting}-{name}.json"),
                        "timeout_s": timeout_s,
                        "retry_budget_s": 30.0,
                        "workers": workers,
                        "gate": hold_sites,
                    }
                    for i, name in enumerate(names, start=1)
                ]
                seconds = federation.run_sites(context, specs, timeout_s, log)
            finally:
                federation.close()
            record = aggregate([json.loads(Path(s["result"]).read_text()) for s in specs])
            record["seconds"] = seconds
            if setting == "raw":
                record["encrypt_s"] = summarize([])  # nothing is encrypted
            result[setting] = record
            log(f"  {setting}: {seconds:.1f} s for {clients} sites x {rounds} round(s)")
    result["checks"] = checks(result)
    result["seconds"] = time.monotonic() - started
    return result


def default_site_workers(clients: int, cores: int | None = None) -> int:
    """Cipher workers per site: the cores shared out among the sites. The sites encrypt at the same moment of every
    round, so K sites with C workers each on C cores would only queue for the same cores (and pay K*C processes'
    memory); a site alone on the machine gets every core."""
    from lightning_fhe.he.pool import default_workers

    return max(1, (default_workers() if cores is None else cores) // clients)


# -- output ---------------------------------------------------------------------------------------------------------


def _cell(stat: dict[str, float | None], digits: int = 2) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _digits(result: dict[str, Any]) -> int:
    """Enough decimals that the smallest mean time shows at least two significant digits (2 to 4)."""
    means = [
        result[s][k]["mean"] for s in SETTINGS if s in result for k in TIMES if result[s][k]["mean"] not in (None, 0)
    ]
    smallest = min(means, default=1.0)
    return int(min(4, max(2, 1 - math.floor(math.log10(smallest)))))


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def format_table(result: dict[str, Any]) -> str:
    mb = 1e6
    digits = _digits(result)
    settings = [s for s in SETTINGS if s in result]
    samples = result[settings[0]]["samples"]
    title = (
        f"The seed's Table 2 on loopback: {result['model']}, {result['params']:,} parameters "
        f"({result['fp32_bytes'] / mb:.1f} MB fp32), {result['clients']} site processes, {result['rounds']} round(s), "
        "one server process, mutual TLS on 127.0.0.1"
    )
    lines = [
        textwrap.fill(title, width=120),
        "",
        "| setting | clients | encryption s | decryption s | upload s | wait + download s | round s | upload MB | "
        "download MB | peak RSS above idle MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in settings:
        r = result[s]
        lines.append(
            f"| {s} | {result['clients']} | {_cell(r['encrypt_s'], digits)} | {_cell(r['decrypt_s'], digits)} | "
            f"{_cell(r['upload_s'], digits)} | {_cell(r['wait_s'], digits)} | {_cell(r['round_s'], digits)} | "
            f"{r['upload_bytes'] / mb:.2f} | {r['download_bytes'] / mb:.2f} | {_megabytes(r.get('peak_rss_above_idle'))} |"
        )
    fp32 = result["fp32_bytes"]
    notes = [
        f"mean ± standard deviation (ddof=0) over {samples} samples ({result['clients']} sites x {result['rounds']} "
        "round(s)); bytes per site and round: ciphertext chunks and float32 plaintext values, without gRPC/TLS framing",
    ]
    sizes = [
        f"{s} upload {result[s]['upload_bytes'] / fp32:.2f}x, download {result[s]['download_bytes'] / fp32:.2f}x"
        for s in settings
    ]
    notes.append("vs fp32: " + "; ".join(sizes))
    if len(settings) == 2:
        enc, raw = result["encrypted"], result["raw"]
        upload = enc["upload_s"]["mean"] / raw["upload_s"]["mean"] if raw["upload_s"]["mean"] else float("nan")
        notes.append(
            f"encrypted vs raw: upload time {upload:.2f}x, "
            f"upload bytes {enc['upload_bytes'] / raw['upload_bytes']:.2f}x, "
            f"download bytes {enc['download_bytes'] / raw['download_bytes']:.2f}x"
        )
    slots = result.get("max_concurrent_uploads", "?")
    what = {"round_ratio": "encrypted round / raw round", "peak_rss_fp32": "site peak RSS above idle / fp32 model"}
    for name, check in result.get("checks", {}).items():
        bound = "<=" if name == "round_ratio" else "<"
        verdict = "ok" if check["ok"] else "FAILED"
        notes.append(f"check {what.get(name, name)}: {check['value']:.2f}x (target {bound} {check['max']:g}x): {verdict}")
    workers_peak = ", ".join(f"{s} {_megabytes(result[s].get('workers_peak_rss_above_idle'))} MB" for s in settings)
    notes += [
        "raw: nothing is encrypted; its decryption column is the unflattening into tensors alone",
        f"encryption runs while the upload streams and decryption while the download arrives "
        f"({result.get('workers', '?')} cipher worker(s) per encrypted site): encryption = the time the upload waited "
        "for encrypted chunks (within upload), decryption = the time the download waited for decryption; round = the "
        "whole exchange per site (upload, wait, download, decryption), end to end",
        f"upload = the submit call, including the wait for one of the server's {slots} upload slots "
        "(max_concurrent_uploads); wait + download = from the end of the submit until the global model is in and "
        "decrypted (it waits for the slowest site)",
        "peak RSS above idle: the worst site process's peak resident memory during the rounds above its own after "
        f"joining and loading the model; its cipher workers' own peaks, added up, apart: {workers_peak}",
        f"CONTENTION: the {result['clients']} sites and the server share this machine's {result['cpu_count']} CPU "
        "cores and encrypt at the same moments, so per-site times include waiting for a core (the seed measured "
        "separate machines); compare encrypted with raw, not absolute times with the seed",
        "max abs error of the global model: "
        + ", ".join(f"{s} {result[s]['max_abs_error']:.1e}" for s in settings)
        + f"; wall time {result['seconds']:.1f} s ("
        + ", ".join(f"{s} {result[s]['seconds']:.1f} s" for s in settings)
        + ")",
    ]
    lines += ["", *(textwrap.fill(note, width=120, subsequent_indent="  ") for note in notes)]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, for ``python -m lightning_fhe.bench round``."""
    parser.add_argument("--clients", type=int, default=2, help="number of site processes (default 2)")
    parser.add_argument(
        "--model",
        default="segresnet-8",
        choices=MODELS,
        help=f"network whose state dict the sites send (default segresnet-8; {TINY_MODEL}: 40,960 parameters)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds per setting (default 2)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="cipher worker processes per encrypted site (default: the cores shared out among the sites)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each setting may take (default 900)")
    parser.add_argument(
        "--server-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra server option, e.g. max_concurrent_uploads=4 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")


def run_from_args(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.rounds < 1 or args.timeout <= 0 or (args.workers is not None and args.workers < 1):
        print("error: --clients, --rounds and --workers must be at least 1, --timeout positive", file=sys.stderr)
        return 2

    try:
        result = run(
            args.model,
            args.clients,
            args.rounds,
            timeout_s=args.timeout,
            server_overrides=args.server_option,
            workers=args.workers,
            log=log,
        )
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return publish(result, format_table(result), args.json)
