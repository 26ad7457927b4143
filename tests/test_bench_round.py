"""``python -m lightning_fhe.bench round``: the seed's Table 2 (per-site encryption, decryption, upload) on loopback.

The end-to-end cases run the real thing (a server process, site processes, mutual TLS, TenSEAL) on the 40,960
parameter ``tiny`` model; the rest check the statistics and the table on made-up numbers.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lightning_fhe.bench import round as bench
from lightning_fhe.he import CKKSParams

REPO = Path(__file__).resolve().parents[1]


def _stat(mean, std):
    return {"mean": mean, "std": std}


def _record(encrypt, decrypt, upload, wait, up_bytes, down_bytes, samples=6, round_s=None, peak=None):
    return {
        "encrypt_s": encrypt,
        "decrypt_s": decrypt,
        "upload_s": upload,
        "wait_s": wait,
        "round_s": round_s or _stat(upload["mean"] + wait["mean"], 0.1),
        "upload_bytes": up_bytes,
        "download_bytes": down_bytes,
        "samples": samples,
        "max_abs_error": 1e-9,
        "seconds": 3.0,
        "peak_rss_above_idle": peak,
        "workers_peak_rss_above_idle": None,
    }


def _result():
    return {
        "model": "segresnet-8",
        "params": 1_176_186,
        "fp32_bytes": 4_704_744,
        "clients": 3,
        "rounds": 2,
        "cpu_count": 2,
        "workers": 1,
        "max_concurrent_uploads": 2,
        "seconds": 12.5,
        "encrypted": _record(
            _stat(0.25, 0.01), _stat(0.1, 0.02), _stat(0.5, 0.1), _stat(1.0, 0.2), 9_470_000, 18_890_000,
            peak=9_000_000,
        ),
        "raw": _record(_stat(None, None), _stat(0.12, 0.001), _stat(0.25, 0.05), _stat(0.8, 0.1), 9_409_488, 9_409_488),
    }


# -- statistics and table ---------------------------------------------------------------------------------------------


def test_summarize_is_mean_and_population_std():
    assert bench.summarize([1.0, 3.0]) == {"mean": 2.0, "std": 1.0}
    assert bench.summarize([0.5]) == {"mean": 0.5, "std": 0.0}
    assert bench.summarize([]) == {"mean": None, "std": None}


def test_aggregate_pools_sites_and_rounds():
    sites = [
        {"samples": {"encrypt_s": [1.0, 2.0], "decrypt_s": [0.1, 0.1], "upload_s": [1.0, 1.0], "wait_s": [2.0, 2.0],
                     "upload_bytes": [100, 100], "download_bytes": [200, 200]}, "max_abs_error": 1e-9},
        {"samples": {"encrypt_s": [3.0, 6.0], "decrypt_s": [0.3, 0.3], "upload_s": [3.0, 3.0], "wait_s": [2.0, 2.0],
                     "upload_bytes": [102, 102], "download_bytes": [200, 200]}, "max_abs_error": 3e-9},
    ]
    record = bench.aggregate(sites)
    assert record["encrypt_s"] == {"mean": 3.0, "std": pytest.approx(np.std([1, 2, 3, 6]))}
    assert record["upload_s"] == {"mean": 2.0, "std": 1.0}
    assert record["wait_s"] == {"mean": 2.0, "std": 0.0}
    assert record["upload_bytes"] == 101 and record["download_bytes"] == 200
    assert record["samples"] == 4 and record["max_abs_error"] == 3e-9
    assert record["round_s"] == {"mean": None, "std": None}  # these sites did not time whole rounds
    assert record["peak_rss_above_idle"] is None  # nor their memory


def test_aggregate_keeps_the_worst_sites_memory_and_checks_compare_within_the_run():
    sites = [
        {"samples": {"round_s": [2.0]}, "max_abs_error": 0.0, "peak_rss_above_idle": 10, "workers_peak_rss_above_idle": 4},
        {"samples": {"round_s": [4.0]}, "max_abs_error": 0.0, "peak_rss_above_idle": 30, "workers_peak_rss_above_idle": 2},
    ]
    record = bench.aggregate(sites)
    assert record["round_s"]["mean"] == 3.0
    assert record["peak_rss_above_idle"] == 30 and record["workers_peak_rss_above_idle"] == 4
    result = _result()
    result["encrypted"]["round_s"], result["raw"]["round_s"] = _stat(2.4, 0.1), _stat(1.0, 0.1)
    checks = bench.checks(result)
    assert checks["round_ratio"] == {"value": pytest.approx(2.4), "max": 2.5, "ok": True}
    assert checks["peak_rss_fp32"] == {"value": pytest.approx(9_000_000 / 4_704_744), "max": 3.0, "ok": True}
    result["encrypted"]["round_s"] = _stat(2.6, 0.1)
    assert not bench.checks(result)["round_ratio"]["ok"]


def test_sites_share_the_cores_out_for_their_cipher_workers():
    assert bench.default_site_workers(2, cores=2) == 1
    assert bench.default_site_workers(1, cores=2) == 2
    assert bench.default_site_workers(30, cores=2) == 1
    assert bench.default_site_workers(2, cores=16) == 8


def test_expected_average_is_the_average_of_the_updates():
    base = np.linspace(-1, 1, 11)
    updates = [bench.site_update(base, i, 3) for i in range(1, 6)]
    np.testing.assert_allclose(bench.expected_average(base, 5, 3), np.mean(updates, axis=0), rtol=0, atol=1e-15)


def test_table_mirrors_the_seeds_table_2():
    table = bench.format_table(_result())
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| setting"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "setting", "clients", "encryption s", "decryption s", "upload s", "wait + download s", "round s",
        "upload MB", "download MB", "peak RSS above idle MB",
    ]
    encrypted = next(line for line in lines if line.startswith("| encrypted"))
    raw = next(line for line in lines if line.startswith("| raw"))
    assert "| 3 | 0.25 ± 0.01 | 0.10 ± 0.02 | 0.50 ± 0.10 | 1.00 ± 0.20 | 1.50 ± 0.10 | 9.47 | 18.89 | 9.0 |" in encrypted
    assert raw.endswith("| 9.41 | 9.41 | - |")  # no memory measured
    assert "| 3 | - | 0.12 ± 0.00 | 0.25 ± 0.05 |" in raw  # nothing to encrypt
    notes = " ".join(table.split())  # the notes under the table are wrapped
    assert "encrypted upload 2.01x, download 4.02x; raw upload 2.00x, download 2.00x" in notes
    assert "upload time 2.00x" in notes
    assert "CONTENTION" in notes and "2 CPU cores" in notes  # the footer says the times include contention
    assert "one of the server's 2 upload slots" in notes
    assert all(len(line) <= 120 for line in lines if not line.startswith("|"))


def test_table_shows_small_times_with_more_digits():
    result = _result()
    result["raw"]["decrypt_s"] = _stat(0.0012, 0.0003)
    assert "0.0012 ± 0.0003" in bench.format_table(result)


def test_run_refuses_bad_arguments():
    with pytest.raises(ValueError, match="at least 1"):
        bench.run("tiny", 0)
    with pytest.raises(ValueError, match="unknown model"):
        bench.run("resnet-50", 2)


def test_command_line_refuses_bad_arguments():
    done = subprocess.run(
        [sys.executable, "-m", "lightning_fhe.bench", "round", "--clients", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "--clients" in done.stderr


# -- end to end -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_sites_one_round_end_to_end(tmp_path):
    out = tmp_path / "round.json"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_fhe.bench", "round", "--clients", "3", "--model", "tiny", "--rounds", "1",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| encrypted | 3 |" in done.stdout and "| raw | 3 |" in done.stdout
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["clients"] == 3 and result["rounds"] == 1
    params = result["params"]
    assert params == 40_960 and result["fp32_bytes"] == 4 * params
    for setting in ("encrypted", "raw"):
        record = result[setting]
        assert record["samples"] == 3  # 3 sites x 1 round
        for key in ("decrypt_s", "upload_s", "wait_s", "round_s") + (("encrypt_s",) if setting == "encrypted" else ()):
            assert record[key]["mean"] > 0 and record[key]["std"] >= 0, (setting, key, record[key])
        assert record["max_abs_error"] < 1e-6  # the global model is the average the sites sent
    assert result["raw"]["encrypt_s"] == {"mean": None, "std": None}

    # Raw updates of a float32 model travel as float32: exactly 4 bytes per parameter each way.
    assert result["raw"]["upload_bytes"] == result["raw"]["download_bytes"] == 4 * params
    # An encrypted update: two reals per complex slot, the first polynomial packed to 60 bits and a seed: 1.875x
    # fp32 and a few bytes per chunk. The global model: the summed first polynomial and the 3 sites' seeds.
    enc = result["encrypted"]
    assert 1.875 <= enc["upload_bytes"] / result["fp32_bytes"] <= 1.88
    assert 1.875 <= enc["download_bytes"] / result["fp32_bytes"] <= 1.90
    assert result["workers"] == bench.default_site_workers(3)
    assert set(result["checks"]) == {"round_ratio", "peak_rss_fp32"}
    assert enc["peak_rss_above_idle"] is not None and enc["peak_rss_above_idle"] >= 0
    chunks = -(-params // CKKSParams().values_per_ciphertext)
    assert chunks == 5 and enc["upload_bytes"] > 0


def _assert_no_site_left():
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()


def test_a_server_that_cannot_start_ends_the_bench_with_its_error():
    started = time.monotonic()
    with pytest.raises(bench.BenchError, match=r"(?s)exited with code 2 before listening.*max_concurrent_uploads"):
        bench.run("tiny", 2, 1, server_overrides=["max_concurrent_uploads=0"], log=lambda m: None)
    assert time.monotonic() - started < 60
    _assert_no_site_left()


@pytest.mark.slow
def test_a_failing_site_ends_the_bench_with_its_error():
    # The server expects site-1 only: site-2's join is refused, and site-1 gets a global model of 1 site, not 2.
    # Whichever fails first, the bench stops and shows that site's error and the server's log.
    with pytest.raises(bench.BenchError, match=r"encrypted: site-\d failed \(exit code 1\)") as caught:
        bench.run("tiny", 2, 1, server_overrides=["clients=[site-1]"], timeout_s=120, log=lambda m: None)
    message = str(caught.value)
    assert "not a member" in message or "closed with 1 of 2 sites" in message or "FederationError" in message
    assert "server log" in message and "Traceback" in message
    _assert_no_site_left()


def test_a_federation_past_its_timeout_is_stopped_instead_of_hanging():
    # The sites wait for a gate that is never opened, so they provably cannot finish, however fast or loaded the
    # machine: the bench's own deadline (not the server's, set far away) must stop both, and name them.
    started = time.monotonic()
    with pytest.raises(
        bench.BenchError, match=r"timed out after 0.5 s with 2 site\(s\) still running \(site-1, site-2\)"
    ):
        bench.run(
            "tiny", 2, 1, timeout_s=0.5, server_overrides=["round_timeout_s=600"], settings=("raw",),
            hold_sites=bench.site_gate(), log=lambda m: None,
        )
    assert time.monotonic() - started < 60
    _assert_no_site_left()
