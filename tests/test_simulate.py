"""python -m lightning_fhe.simulate: results from records (pure, fast), then real federations of processes (slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_fhe.simulate.__main__ import main
from lightning_fhe.simulate.orchestrate import RecordFollower, format_progress, threads_per_site
from lightning_fhe.simulate.plots import write_plots
from lightning_fhe.simulate.results import (
    compare_to_baseline,
    format_duration,
    format_round_table,
    format_table,
    round_summaries,
    summarize,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "experiments" / "quickstart.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records(
    *,
    sites: int = 2,
    rounds: int = 3,
    dice: tuple[float, ...] = (0.5, 0.7, 0.6),
    upload_bytes: int = 2_000_000,
    round_s: float = 10.0,
    epsilon: float | None = None,
    shared_fraction: float = 1.0,
) -> list[dict]:
    """What the site processes write: one record per site and round, as simulate/site.py does."""
    out = []
    for site in range(sites):
        for r in range(1, rounds + 1):
            start = 1000.0 + (r - 1) * round_s + site * 0.5  # site-2 starts later and ends later
            out.append(
                {
                    "site": f"site-{site + 1}", "site_index": site, "round": r,
                    "metric_name": "val/dice",
                    "metric": dice[r - 1] if site == 0 else dice[r - 1] + 0.001,  # site-1's is the one reported
                    # the sites' weighted mean for the round before, carried by this round's updates
                    "global_metrics": {} if r == 1 else {"val/dice": dice[r - 2] + 0.0005},
                    "round_start": start, "train_end": start + 6.0, "round_end": start + round_s,
                    "train_s": 6.0, "val_s": 1.0, "encrypt_s": 0.5, "upload_s": 0.25 + site, "wait_s": 0.75,
                    "download_s": 0.125,
                    "decrypt_s": 0.25, "upload_bytes": upload_bytes + site * 1000, "download_bytes": 2 * upload_bytes,
                    "participants": [f"site-{i + 1}" for i in range(sites)], "model_fp32_bytes": 1_000_000,
                    "epsilon": None if epsilon is None else epsilon * r, "shared_fraction": shared_fraction,
                }  # fmt: skip
            )
    return out


# ------------------------------------------------------------------------------------------------ results (pure)


def test_round_summaries_average_over_sites_and_take_site_1s_dice():
    rounds = round_summaries("he_full", records())
    assert [r.round for r in rounds] == [1, 2, 3]
    first = rounds[0]
    assert first.metric == 0.5  # site-1's, not site-2's 0.501
    assert first.sites_mean == 0.5005  # from round 2's records
    assert rounds[-1].sites_mean is None  # no later update carries the last round's
    assert first.sites == first.participants == 2
    assert first.transfer_s == pytest.approx((0.25 + 0.125 + 1.25 + 0.125) / 2)  # upload + download, mean over sites
    assert first.wait_s == 0.75
    assert (first.train_s, first.encrypt_s, first.decrypt_s, first.val_s, first.round_s) == (6.0, 0.5, 0.25, 1.0, 10.0)
    assert first.upload_mb == pytest.approx(2.0005)
    assert first.epsilon is None and first.shared_fraction == 1.0


def test_summary_is_one_row_of_the_seeds_table():
    summary = summarize("he_full", records())
    assert summary.sites == 2 and summary.rounds == 3
    assert summary.message_mb == pytest.approx(2.0005)
    assert summary.model_fp32_mb == 1.0
    assert summary.training_time_s == pytest.approx(3 * 10.0 + 0.5)  # first start to last end, across sites
    assert (summary.best_metric, summary.best_round) == (0.7, 2)
    assert (summary.first_metric, summary.last_metric) == (0.5, 0.6)
    assert summarize("loss", records(), mode="min").best_round == 1
    assert summary.mean_encrypt_s == 0.5 and summary.mean_decrypt_s == 0.25
    assert summary.message_ratio is None and summary.relative_time_increase is None
    assert summarize("x", records(dice=(0.7, 0.7, 0.7))).best_round == 1  # a tie goes to the earliest round


def test_settings_are_compared_with_raw():
    rows = compare_to_baseline(
        [
            summarize("raw", records(upload_bytes=1_000_000, round_s=10.0)),
            summarize("he_full", records(upload_bytes=2_000_000, round_s=12.0)),
        ]
    )
    raw, he = rows
    assert raw.message_ratio == pytest.approx(1.0) and raw.relative_time_increase == pytest.approx(0.0)
    assert he.message_ratio == pytest.approx(2.0005 / 1.0005)
    assert he.relative_time_increase == pytest.approx(36.5 / 30.5 - 1)
    no_raw = [summarize("he_full", records())]
    assert compare_to_baseline(no_raw) == no_raw


def test_table_has_the_seeds_columns_and_the_comparison():
    rows = compare_to_baseline(
        [summarize("raw", records(upload_bytes=1_000_000)), summarize("he_full", records(round_s=12.0))]
    )
    lines = format_table(rows).splitlines()
    assert lines[0] == (
        "| setting | message size (MB) | vs fp32 | vs raw | sites | training time | best global Dice | best round "
        "| training time vs raw |"
    )
    assert lines[2] == "| raw | 1.00 | 1.00x | 1.00x | 2 | 0:00:30 | 0.7000 | 2 | - |"
    assert lines[3] == "| he_full | 2.00 | 2.00x | 2.00x | 2 | 0:00:36 | 0.7000 | 2 | +19.7% |"
    alone = format_table([summarize("he_full", records())]).splitlines()
    assert "vs raw" not in alone[0] and "epsilon" not in alone[0]
    assert alone[2] == "| he_full | 2.00 | 2.00x | 2 | 0:00:30 | 0.7000 | 2 |"


def test_privacy_columns_appear_when_a_setting_has_privacy():
    rows = [
        summarize("he_full", records()),
        summarize("dp_gaussian", records(epsilon=1.5), privacy=True),
        summarize("partial_10", records(shared_fraction=0.1), privacy=True),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].endswith("| epsilon | fraction shared |")
    assert lines[2].endswith("| - | 1.000 |")  # no privacy: no epsilon, everything shared
    assert lines[3].endswith("| 4.5 | 1.000 |")  # the last round's epsilon (1.5 x 3 rounds)
    assert lines[4].endswith("| - | 0.100 |")  # partial sharing has no formal epsilon


def test_durations_and_the_metric_per_round():
    assert format_duration(0.4) == "0:00:00"
    assert format_duration(3661.2) == "1:01:01"
    assert format_duration(21_446) == "5:57:26"
    table = format_round_table({name: round_summaries(name, records()) for name in ("fedavg", "fedadam")}, "val/dice")
    assert table.splitlines() == [
        "| round | fedavg | fedadam |",
        "|---|---|---|",
        "| 1 | 0.5000 (0.5005) | 0.5000 (0.5005) |",
        "| 2 | 0.7000 (0.7005) | 0.7000 (0.7005) |",
        "| 3 | 0.6000 | 0.6000 |",
    ]
    assert "round 2/3: val/dice 0.7000, 2 sites | site-1: train 6.0 s" in format_progress(records()[1], 3)


def test_results_files_and_plots(tmp_path):
    rounds = {"raw": round_summaries("raw", records()), "he_full": round_summaries("he_full", records())}
    summaries = compare_to_baseline([summarize(name, records()) for name in rounds])
    paths = write_results(tmp_path, {"experiment": "test"}, rounds, summaries)
    paths += write_plots(rounds, tmp_path, title="test")
    assert [p.name for p in paths] == [
        "results.json", "results.csv", "summary.csv", "metric_per_round.png", "time_per_round.png"
    ]  # fmt: skip
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["experiment"] == "test"
    assert [row["setting"] for row in document["summary"]] == ["raw", "he_full"]
    assert document["summary"][0]["training_time"] == "0:00:30"
    assert document["table"] == format_table(summaries)
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["setting"], row["round"]) for row in rows] == [(s, str(r)) for s in rounds for r in (1, 2, 3)]
    with (tmp_path / "summary.csv").open() as f:
        assert [row["setting"] for row in csv.DictReader(f)] == ["raw", "he_full"]
    for name in ("metric_per_round.png", "time_per_round.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_record_follower_waits_for_complete_lines(tmp_path):
    path = tmp_path / "site-1.jsonl"
    follower = RecordFollower(path)
    assert follower.new_records() == []  # not written yet
    path.write_text('{"round": 1}\n{"round": ')
    assert follower.new_records() == [{"round": 1}]
    with path.open("a") as f:
        f.write('2}\n')
    assert follower.new_records() == [{"round": 2}]
    assert follower.new_records() == []


def test_threads_are_shared_out_among_sites():
    config = {"trainer": {"num_threads": None}, "federation": {"sites": 2}}
    assert threads_per_site(config, cores=2) == 1
    assert threads_per_site(config, cores=16) == 8
    assert threads_per_site({**config, "federation": {"sites": 8}}, cores=2) == 1
    assert threads_per_site({**config, "trainer": {"num_threads": 3}}, cores=2) == 3


def test_command_line_errors_exit_2_before_anything_starts(tmp_path, capsys):
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such config file" in capsys.readouterr().err
    assert main([str(QUICKSTART), "federation.rounds=0"]) == 2
    assert "command line: federation.rounds: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main([str(QUICKSTART), "--compare", "raw", "he_fulll"]) == 2
    assert "did you mean 'he_full'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ end to end


def tiny(tmp_path: Path) -> list[str]:
    """Overrides that make the quickstart take seconds: 8 volumes of 32^3, 2 rounds of 1 local epoch."""
    return [
        "federation.rounds=2",
        "federation.local_epochs=1",
        "data.init_args.synthetic.num_cases=8",
        "data.init_args.synthetic.size=[32,32,32]",
        f"data.init_args.synthetic.cache_dir={tmp_path / 'data'}",
        "experiment.output_dir=out",  # relative: to the working folder, which simulate() sets to tmp_path
        "experiment.timeout_s=300",
    ]


def simulate(*args: str, cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_fhe.simulate", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )  # fmt: skip


@pytest.mark.slow
def test_compare_raw_and_he_full_end_to_end(tmp_path):
    result = simulate(str(QUICKSTART), *tiny(tmp_path), "--compare", "raw", "he_full", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    # progress, prefixed with the setting, then the table
    assert "[raw] round 1/2: val/dice" in result.stdout and "[he_full] round 2/2: val/dice" in result.stdout
    assert "| setting | message size (MB) | vs fp32 | vs raw | sites | training time |" in result.stdout
    assert "| raw |" in result.stdout and "| he_full |" in result.stdout

    document = json.loads((out / "results.json").read_text())
    raw, he = document["summary"]
    assert (raw["setting"], he["setting"]) == ("raw", "he_full")
    assert raw["sites"] == he["sites"] == 2 and raw["rounds"] == he["rounds"] == 2
    # The bound: HE-full messages at most 2.1x raw (the seed's were 15x).
    assert he["message_mb"] <= 2.1 * raw["message_mb"]
    assert he["message_mb"] <= 2.1 * he["model_fp32_mb"]
    assert he["relative_time_increase"] is not None
    # Same seeds, same data: on the fixed-point grid, encryption's ~1e-9 noise vanishes and the global models, hence
    # their Dice, are the same bit for bit (without the grid they drift apart by about 1e-4 within ten rounds).
    raw_dice = [r["metric"] for r in document["rounds"]["raw"]]
    he_dice = [r["metric"] for r in document["rounds"]["he_full"]]
    assert len(raw_dice) == 2 and all(0.0 <= d <= 1.0 for d in raw_dice)
    assert he_dice == raw_dice
    # Federated evaluation: round 1's Dice, as the sites' weighted mean (both validate the same cases).
    assert document["rounds"]["he_full"][0]["sites_mean"] == pytest.approx(he_dice[0], abs=1e-6)

    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4  # 2 settings x 2 rounds
    for name in ("metric_per_round.png", "time_per_round.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    for setting in ("raw", "he_full"):
        written = {p.name for p in (out / setting).iterdir()}
        assert {"config.yaml", "server.log", "site-1.log", "site-2.jsonl"} <= written
    assert not list((out / "he_full").glob("**/*.tenseal"))  # kits (secret key) stay in a temporary folder


@pytest.mark.slow
def test_a_failing_site_ends_the_run_quickly_with_its_error(tmp_path):
    empty = tmp_path / "not-a-dataset"
    empty.mkdir()
    started = time.monotonic()
    result = simulate(str(QUICKSTART), *tiny(tmp_path), f"data.init_args.root={empty}", cwd=tmp_path, timeout=120)
    assert time.monotonic() - started < 90
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: [he_full] site-") and "exited with status 1" in last
    assert f"MSD dataset.json not found: {empty / 'dataset.json'}" in last
    assert "--- last lines of" in result.stderr  # the site's log, for the traceback
