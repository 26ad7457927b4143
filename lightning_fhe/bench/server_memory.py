"""Peak memory of the aggregator: few against many sites uploading at once, and small against large models.

The server sums each update into the round's running sum as its chunks arrive, in scratch files in its
``state_dir`` (protocol v2: integers modulo the first prime, no SEAL), and accumulates at most
``max_concurrent_uploads`` streams at a time, so its memory should stay a few chunks whatever the number of sites
and the model's size. This runs the real thing: ``python -m lightning_fhe.server`` as its own process (so its
memory is its alone) over mutual TLS on loopback, and K sites in this process, each encrypting its update with
the federation's key while uploading it. The server reports its own peak RSS (``getrusage`` high-water mark) when
it exits.

    python -m lightning_fhe.bench.server_memory --model segresnet-8 --sites 2 16
    python -m lightning_fhe.bench.server_memory --params 10M 100M --sites 4

With ``--params`` the model is a float32 vector of that many values. Encrypting 100 M values four times would take
minutes and measure the sites, not the server, so each site encrypts its first 64 chunks for real and sends them
over and over to fill the update: every chunk the server checks and adds is a genuine ciphertext, and the
decryption of the first 64 chunks of the global model is checked against the true average.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from lightning_fhe.client import AggregatorClient
from lightning_fhe.he.codec import UpdateCipher, num_chunks
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.models import SEGRESNET_FILTERS
from lightning_fhe.provision import ProvisionConfig, load_site_kit, provision
from lightning_fhe.bench.report import log, publish
from lightning_fhe.bench.round import expected_average, model_state, site_update, start_loopback_server

# The issues' acceptance targets: peak server memory with the most sites over that with the fewest; and peak memory
# above the idle server with the largest model over that with the smallest.
TARGET_GROWTH = 1.5
TARGET_PARAMS_GROWTH = 1.2
# With --params, the chunks each site encrypts for real (and repeats).
REAL_CHUNKS = 64


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory from /proc (Linux); 0 where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024 * 1.048576  # kB -> MB (10^6 bytes)
    except OSError:
        pass
    return 0.0


def _site(
    kit_dir: Path, address: str, layout: TensorLayout, base: np.ndarray, index: int, rounds: int, out: dict
) -> None:
    """One site: join, round 0 if told to, then upload and download every round; checks its first decryption.

    ``base`` may be shorter than the layout (``--params``): its chunks are then repeated to fill the update.
    """
    empty = TensorLayout(())
    kit = load_site_kit(kit_dir)
    cipher = UpdateCipher(kit.he_context)
    total_chunks = num_chunks(layout.numel, kit.params)
    try:
        with AggregatorClient(kit, address, retry_budget_s=120, rpc_timeout_s=1200) as client:
            info = client.join(1.0, layout, empty)
            if info.send_initial_model:
                client.submit(0, [], np.resize(base, layout.numel))
            client.fetch_global(0)
            for r in range(info.current_round, rounds + 1):
                values = site_update(base, index, r)  # every site different, the average known
                if base.size == layout.numel:
                    chunks = cipher.iter_encrypt(values, info.share)
                else:
                    real = cipher.encrypt(values, info.share)
                    chunks = (real[i % len(real)] for i in range(total_chunks))
                receipt = client.submit(r, chunks, np.zeros(0))
                model = client.fetch_global(r)
                out.setdefault("upload_mb", receipt.bytes_sent / 1e6)
                out.setdefault("download_mb", model.bytes_received / 1e6)
                if index == 1 and r == 1:
                    checked = num_chunks(base.size, kit.params)
                    decrypted = cipher.decrypt(model.encrypted_chunks[:checked], base.size, model.total_share)
                    out["decrypted"] = decrypted
                del model
    except BaseException as err:  # reported by the caller
        out["error"] = err


def measure(
    layout: TensorLayout, base: np.ndarray, sites: int, rounds: int, workdir: Path, log=print
) -> dict[str, Any]:
    """Runs one federation of ``sites`` sites for ``rounds`` rounds and returns the server's memory."""
    names = [f"site-{i}" for i in range(1, sites + 1)]
    kits = provision(ProvisionConfig("bench", "localhost", 8443, tuple(names)), workdir / "kits")
    server_log = workdir / "server.log"
    options = [f"rounds={rounds}", "linger_s=60", "keep_rounds=1"]
    server, address = start_loopback_server(kits["server"], workdir, "memory", options, server_log)
    try:
        idle_mb = _rss_mb(server.pid)
        log(f"  {sites} sites: server up at {address}, {idle_mb:.0f} MB resident; running {rounds} round(s)")
        results: dict[int, dict] = {i: {} for i in range(1, sites + 1)}
        started = time.monotonic()
        threads = [
            threading.Thread(target=_site, args=(kits[name], address, layout, base, i, rounds, results[i]), daemon=True)
            for i, name in zip(results, names)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        code = server.wait(120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = server_log.read_text()
    errors = [f"site-{i}: {r['error']!r}" for i, r in results.items() if "error" in r]
    if errors or code != 0:
        raise RuntimeError(f"the federation did not complete (server exit {code}): {errors}\n{text[-3000:]}")
    peak = re.search(r"peak memory \(RSS high-water mark\) ([\d.]+) MB", text)
    if peak is None:
        raise RuntimeError(f"the server did not report its peak memory:\n{text[-3000:]}")
    expected = expected_average(base, sites, 1)  # of the chunks site-1 decrypted
    error = float(np.abs(results[1]["decrypted"] - expected).max())
    return {
        "sites": sites,
        "values": layout.numel,
        "upload_mb": results[1]["upload_mb"],
        "download_mb": results[1]["download_mb"],
        "idle_rss_mb": idle_mb,
        "peak_rss_mb": float(peak.group(1)),
        "seconds": seconds,
        "max_abs_error": error,
        "round_summaries": re.findall(r"round \d+ closed: .*", text),
    }


def params_state(params: int, seed: int = 0) -> tuple[TensorLayout, np.ndarray]:
    """A float32 vector of ``params`` values, and the values of its first :data:`REAL_CHUNKS` chunks."""
    layout = TensorLayout.from_dict({"tensors": [["weights", [params], "float32"]]})
    rng = np.random.default_rng(seed)
    real = min(params, REAL_CHUNKS * 8192)
    return layout, rng.normal(0.0, 0.05, real).astype(np.float32).astype(np.float64)


def run(
    model: str = "segresnet-8",
    sites: tuple[int, ...] = (2, 16),
    rounds: int = 2,
    log=print,
    params: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Compares federation sizes ``sites`` on ``model``; with ``params``, model sizes at ``sites[0]`` sites."""
    if params:
        sizes = ", ".join(f"{p:,}" for p in params)
        log(f"server memory: float32 models of {sizes} values, {sites[0]} sites, {rounds} round(s)")
        runs = [(params_state(p), sites[0]) for p in params]
    else:
        log(f"server memory: {model}, {list(sites)} sites, {rounds} round(s) each")
        state = model_state(model)
        runs = [(state, k) for k in sites]
    measurements = []
    for (layout, base), k in runs:
        with tempfile.TemporaryDirectory(prefix="lfhe-server-memory-") as tmp:
            measurements.append(measure(layout, base, k, rounds, Path(tmp), log))
    first, last = measurements[0], measurements[-1]
    growth = last["peak_rss_mb"] / first["peak_rss_mb"]
    above_idle = (last["peak_rss_mb"] - last["idle_rss_mb"]) / max(first["peak_rss_mb"] - first["idle_rss_mb"], 1e-9)
    return {
        "model": f"float32 x {'/'.join(f'{p:,}' for p in params)}" if params else model,
        "compares": "params" if params else "sites",
        "rounds": rounds,
        "measurements": measurements,
        "growth": growth,
        "growth_above_idle": above_idle,
        "target_growth": TARGET_PARAMS_GROWTH if params else TARGET_GROWTH,
        "cpu_count": os.cpu_count(),
    }


def format_table(result: dict[str, Any]) -> str:
    m = result["measurements"]
    lines = [
        f"Aggregator peak memory, {result['model']} ({m[0]['values']:,} encrypted values), "
        f"{result['rounds']} round(s), server in its own process, mutual TLS on loopback",
        "",
        "| values | sites | upload per site | global model | server idle RSS | server peak RSS | peak - idle "
        "| wall time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in m:
        lines.append(
            f"| {row['values']:,} | {row['sites']} | {row['upload_mb']:.1f} MB | {row['download_mb']:.1f} MB | "
            f"{row['idle_rss_mb']:.0f} MB | {row['peak_rss_mb']:.0f} MB | "
            f"{row['peak_rss_mb'] - row['idle_rss_mb']:.0f} MB | {row['seconds']:.1f} s |"
        )
    if result.get("compares") == "params":
        ok = "meets" if result["growth_above_idle"] <= result["target_growth"] else "MISSES"
        verdict = (
            f"peak RSS above the idle server, {m[-1]['values']:,} / {m[0]['values']:,} values: "
            f"{result['growth_above_idle']:.2f}x ({ok} the <= {result['target_growth']}x target); peak RSS: "
            f"{result['growth']:.2f}x"
        )
    else:
        ok = "meets" if result["growth"] <= result["target_growth"] else "MISSES"
        verdict = (
            f"peak RSS {m[-1]['sites']} sites / {m[0]['sites']} sites: {result['growth']:.2f}x ({ok} the <= "
            f"{result['target_growth']}x target); growth above the idle server: {result['growth_above_idle']:.2f}x"
        )
    lines += [
        "",
        verdict,
        f"largest decryption error of the global model (site-1, round 1): {max(r['max_abs_error'] for r in m):.1e}",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, for ``python -m lightning_fhe.bench server-memory`` as well as this module's own ``main``."""
    parser.add_argument(
        "--model", default="segresnet-8", choices=sorted(SEGRESNET_FILTERS), help="network whose updates the sites send"
    )
    parser.add_argument(
        "--sites", type=int, nargs="+", default=[2, 16], help="federation sizes to compare (default: 2 16)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds per federation (default 2)")
    parser.add_argument(
        "--params",
        type=_count,
        nargs="+",
        default=[],
        help="compare float32 models of these sizes (e.g. 10M 100M) at the first --sites count, instead of --model",
    )
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")


def _count(text: str) -> int:
    """``10M``, ``1.5G``, ``250k`` or a plain number of values."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of values (e.g. 10M, 250k, 1000)") from None
    if not (value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: a number of values must be a whole number >= 1")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fhe.bench.server_memory", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    if min(args.sites) < 1 or args.rounds < 1:
        print("error: --sites and --rounds must be at least 1", file=sys.stderr)
        return 2

    result = run(args.model, tuple(args.sites), args.rounds, log=log, params=tuple(args.params))
    return publish(result, format_table(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
