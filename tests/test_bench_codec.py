"""``python -m lightning_fhe.bench codec``: the record's keys, its byte counts, and the table, on a small state dict.

Timings are not checked (benchmarks report ratios, never timed tests); sizes and exactness are.
"""

from __future__ import annotations

import pytest
import torch

from lightning_fhe.bench import codec
from lightning_fhe.bench.__main__ import _parser
from lightning_fhe.he.frames import global_chunk_bytes, upload_chunk_bytes

CHUNK = 8192  # values per ciphertext with the seed's parameters


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    state = {
        "conv.weight": torch.randn(16, 8, 3, 3, 3) * 0.05, "conv.bias": torch.zeros(16), "norm.weight": torch.ones(9000)
    }
    return codec.measure(state, "small", clients=3, workers=2, log=lambda message: None)


def test_the_record_keeps_the_old_keys_and_adds_the_new_ones(result):
    assert {"raw_bytes", "workers", "clients", "baseline", "lightning_fhe"} <= result.keys()
    assert {"upload_bytes", "encrypt_s", "decrypt_s", "aggregate_s_per_client"} <= result["baseline"].keys()
    assert {
        "upload_bytes", "download_bytes", "encrypt_s", "decrypt_s", "aggregate_s_per_client", "max_abs_error",
        "rebuild_s", "encrypt_s_one_worker", "decrypt_s_one_worker", "summed", "mask_s", "mask_vs_encrypt",
    } <= result["lightning_fhe"].keys()  # fmt: skip
    assert {"download_bytes", "decrypt_s"} <= result["lightning_fhe"]["summed"].keys()
    assert result["lightning_fhe"]["ceiling"].keys() == {"encrypt_s_one", "encrypt_s", "decrypt_s_one", "decrypt_s"}
    assert result["workers"] == 2 and result["clients"] == 3


def test_the_byte_counts_are_the_wire_format_s(result):
    values = 16 * 8 * 27 + 16 + 9000
    chunks = -(-values // CHUNK)
    assert result["params"] == values and result["raw_bytes"] == 4 * values
    ours = result["lightning_fhe"]
    assert ours["upload_bytes"] == chunks * upload_chunk_bytes(CHUNK)
    assert ours["download_bytes"] == chunks * global_chunk_bytes(CHUNK, 3, summed=False)
    assert ours["summed"]["download_bytes"] == chunks * global_chunk_bytes(CHUNK, 3, summed=True)


def test_the_average_is_the_plaintext_fedavg_on_the_grid(result):
    ours = result["lightning_fhe"]
    assert ours["equals_plaintext_average"] and ours["summed"]["equals_plaintext_average"]
    assert ours["max_abs_error"] <= codec.TARGETS["max_abs_error"]


def test_repeated_runs_keep_each_times_shortest_and_the_worst_error(result):
    slower = {**result, "baseline": {**result["baseline"], "encrypt_s": 99.0}}
    worse = {**result["lightning_fhe"], "max_abs_error": 1.0, "equals_plaintext_average": False, "encrypt_s": 99.0}
    best = codec.best_of([slower, {**result, "lightning_fhe": worse}])
    assert best["repeat"] == 2
    assert best["baseline"]["encrypt_s"] == result["baseline"]["encrypt_s"]  # each time on its own
    assert best["lightning_fhe"]["encrypt_s"] == result["lightning_fhe"]["encrypt_s"]
    assert best["lightning_fhe"]["max_abs_error"] == 1.0 and not best["lightning_fhe"]["equals_plaintext_average"]
    assert best["lightning_fhe"]["upload_bytes"] == result["lightning_fhe"]["upload_bytes"]


def test_the_table_shows_every_target(result):
    table = codec.format_table(result)
    for line in ("upload vs fp32", "download vs fp32, 3 sites", "encrypt speed-up", "decrypt speed-up",
                 "pool speed-up, encrypt", "pool speed-up, decrypt", "aggregation speed-up vs SEAL",
                 "same bits as plaintext FedAvg", "same bits, summed download", "download: summed",
                 "pairwise masks, one site with 2 peers", "server aggregation per site update: ours (",
                 "the machine's limit: 2 processes sharing nothing"):  # fmt: skip
        assert line in table
    assert "decrypt speed-up vs baseline at 3 sites: " in table and "target, 5x, is for 2 sites" in table
    two_sites = codec.format_table({**result, "clients": 2})
    assert "decrypt speed-up vs baseline           " in two_sites and "at 2 sites" not in two_sites
    one_worker = codec.format_table({**result, "workers": 1})
    assert "pool speed-up" not in one_worker and "machine's limit" not in one_worker  # nothing to compare against


def test_the_download_target_depends_on_the_number_of_sites():
    assert codec.download_target(2) == 1.90 and codec.download_target(30) == 2.10


def test_workers_is_an_option():
    args = _parser().parse_args(["codec", "--workers", "1", "--clients", "30"])
    assert (args.workers, args.clients) == (1, 30)
    assert _parser().parse_args(["codec"]).workers is None
