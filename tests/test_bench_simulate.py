"""``python -m lightning_fhe.bench simulate``: the pieces of its measurement (the whole bench takes minutes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lightning_fhe.bench import simulate_backends as bench


def test_each_site_task_asks_for_a_share_that_fits_in_rays_steps():
    assert bench.site_cpus(2, 32) == 0.0625
    assert bench.site_cpus(2, 3) == pytest.approx(0.6666)  # rounded down: 3 x 0.6667 would not fit in 2
    assert bench.site_cpus(4, 2) == 1.0  # never more than a CPU per site
    assert bench.site_cpus(2, 32) * 32 <= 2


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")
def test_the_process_tree_and_its_memory_are_read_from_proc():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert {os.getpid(), child.pid} <= set(bench.tree(os.getpid()))
        rss, pss = bench.process_memory(os.getpid())
        assert 0 < pss <= rss
        assert bench.process_kind(child.pid) == "other"
    finally:
        child.kill()
        child.wait()
    assert bench.process_memory(child.pid) == (0, 0)  # gone


def test_the_table_has_a_row_per_backend_and_says_whether_the_models_agree():
    kinds = {"site": {"processes": 2, "pss_mb": 700.0}, "server": {"processes": 1, "pss_mb": 180.4}}
    row = {"sites": 2, "rounds": 2, "wall_s": 36.6, "training_s": 3.2, "peak_rss_mb": 1795.2, "peak_pss_mb": 1337.0,
           "processes_at_peak": 3, "at_peak": kinds}  # fmt: skip
    result = {"ray_cpus": 2, "site_cpus": 1.0, "same_global_model": True,
              "rows": [{**row, "backend": "process"}, {**row, "backend": "ray", "wall_s": 63.0}]}  # fmt: skip
    lines = bench.format_table(result).splitlines()
    assert lines[0] == (
        "2 sites, 2 rounds; Ray: a local Ray of 2 CPUs, 1 CPU per site task; the same global model bit for bit: yes"
    )
    assert lines[4] == "| process | 37 | 3 | 1,795 | 1,337 | 3: 2 site 700, 1 server 180 |"
    assert lines[5].startswith("| ray | 63 |")
