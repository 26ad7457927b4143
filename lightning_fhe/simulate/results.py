"""From the sites' per-round records to the seed's Table 1: pure functions, no processes, no files but the writers.

Definitions (docs/experiments.md repeats them):

- **Message size (MB)**: the mean over sites and rounds of the bytes one site uploads in one round (ciphertexts,
  plaintext tensors and framing), divided by 1e6. The seed's 19 MB raw and 283 MB HE-full are this quantity.
  **vs fp32** divides it by the size of the model's floating tensors as float32 (the seed's raw 19 MB), **vs raw**
  by the raw setting's message size.
- **Training time**: wall-clock time of the federation, from the first site starting its first local epoch
  (after joining and loading the round-0 model) to the last site finishing its last round's validation. Process
  start-up, data caching and provisioning are not included.
- **Best <metric>**: the best value (``experiment.metric``, highest or lowest by ``experiment.metric_mode``) of
  the global model's validation over the rounds, measured by site-1 right after each round (the seed's "best global
  Dice"; with a validation set common to all sites every site measures the same); **best round** is its round.
- **Sites' mean** (per round): the weighted mean over the sites of their own validations of that round's global
  model, which each site decrypted from the next round's updates (federated evaluation, ``fhe/global/<metric>``);
  none for the last round, whose validations no later update carries.
- **Relative increase in training time**: ``training time / raw's training time - 1``, when the comparison
  includes a setting named ``raw``.
- Per round, averaged over sites: **training** (the local epochs, up to the exchange), **encryption**,
  **transfer** (the upload and the download of the global model), **waiting** (for the other sites, between the
  two), **decryption** and **validation**.
- **Epsilon**: the largest over sites of the last round's reported epsilon (None without a formal guarantee);
  **fraction shared**: the mean over sites and rounds of the fraction of the update each site shared.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE",
    "RoundSummary",
    "SettingSummary",
    "compare_to_baseline",
    "format_duration",
    "format_round_table",
    "format_table",
    "round_summaries",
    "summarize",
    "write_results",
]

BASELINE = "raw"  # the setting others are compared with, as in the seed's table
MB = 1e6


@dataclass(frozen=True)
class RoundSummary:
    """One round of one setting, averaged over the sites that recorded it."""

    setting: str
    round: int
    metric: float | None  # site-1's validation of the global model after this round (experiment.metric)
    sites_mean: float | None  # the sites' weighted mean of their validations of it (federated evaluation)
    sites: int
    participants: int
    train_s: float
    encrypt_s: float
    transfer_s: float
    wait_s: float
    decrypt_s: float
    val_s: float
    round_s: float  # first local epoch's start to the end of validation
    upload_mb: float
    download_mb: float
    epsilon: float | None
    shared_fraction: float | None


@dataclass(frozen=True)
class SettingSummary:
    """One row of the table."""

    setting: str
    sites: int
    rounds: int
    message_mb: float
    model_fp32_mb: float
    training_time_s: float
    best_metric: float | None
    best_round: int | None
    first_metric: float | None
    last_metric: float | None
    mean_encrypt_s: float
    mean_decrypt_s: float
    epsilon: float | None
    shared_fraction: float | None
    privacy: bool = False  # the setting configured a privacy mechanism
    message_ratio: float | None = None  # message size / raw's
    relative_time_increase: float | None = None  # training time / raw's - 1


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _first_site(records: Sequence[Mapping[str, Any]]) -> int:
    return min(record["site_index"] for record in records)


def round_summaries(setting: str, records: Sequence[Mapping[str, Any]]) -> list[RoundSummary]:
    """Per-round means over sites. ``records``: the sites' JSON lines (see ``simulate/site.py``)."""
    if not records:
        return []
    first = _first_site(records)
    # Round r's record carries the sites' means for round r - 1's global model.
    means = {
        int(r["round"]) - 1: r["global_metrics"].get(r.get("metric_name", ""))
        for r in records
        if r["site_index"] == first and r.get("global_metrics")
    }
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for record in records:
        by_round.setdefault(int(record["round"]), []).append(record)
    summaries = []
    for round_number in sorted(by_round):
        rows = by_round[round_number]
        reference = next((r for r in rows if r["site_index"] == first), rows[0])
        epsilons = [r["epsilon"] for r in rows if r.get("epsilon") is not None]
        fractions = [r["shared_fraction"] for r in rows if r.get("shared_fraction") is not None]
        summaries.append(
            RoundSummary(
                setting=setting,
                round=round_number,
                metric=reference["metric"],
                sites_mean=means.get(round_number),
                sites=len(rows),
                participants=max(len(r["participants"]) for r in rows),
                train_s=_mean(r["train_s"] for r in rows),
                encrypt_s=_mean(r["encrypt_s"] for r in rows),
                transfer_s=_mean(r["upload_s"] + r["download_s"] for r in rows),
                wait_s=_mean(r["wait_s"] for r in rows),
                decrypt_s=_mean(r["decrypt_s"] for r in rows),
                val_s=_mean(r["val_s"] for r in rows),
                round_s=_mean(r["round_end"] - r["round_start"] for r in rows),
                upload_mb=_mean(r["upload_bytes"] for r in rows) / MB,
                download_mb=_mean(r["download_bytes"] for r in rows) / MB,
                epsilon=max(epsilons) if epsilons else None,
                shared_fraction=_mean(fractions) if fractions else None,
            )
        )
    return summaries


def summarize(
    setting: str, records: Sequence[Mapping[str, Any]], *, privacy: bool = False, mode: str = "max"
) -> SettingSummary:
    """One table row from all sites' records of one setting (``privacy``: whether it configured a mechanism;
    ``mode``: whether the highest or the lowest metric is best)."""
    if not records:
        raise ValueError(f"{setting}: no rounds were recorded")
    rounds = round_summaries(setting, records)
    scored = [r for r in rounds if r.metric is not None and not math.isnan(r.metric)]
    sign = 1 if mode == "max" else -1
    best = max(scored, key=lambda r: sign * r.metric) if scored else None  # the earliest round wins a tie
    last_round = rounds[-1].round
    final_epsilons = [r["epsilon"] for r in records if r["round"] == last_round and r.get("epsilon") is not None]
    fractions = [r["shared_fraction"] for r in records if r.get("shared_fraction") is not None]
    return SettingSummary(
        setting=setting,
        sites=len({r["site_index"] for r in records}),
        rounds=len(rounds),
        message_mb=_mean(r["upload_bytes"] for r in records) / MB,
        model_fp32_mb=_mean(r.get("model_fp32_bytes", 0) for r in records) / MB,
        training_time_s=max(r["round_end"] for r in records) - min(r["round_start"] for r in records),
        best_metric=best.metric if best else None,
        best_round=best.round if best else None,
        first_metric=rounds[0].metric,
        last_metric=rounds[-1].metric,
        mean_encrypt_s=_mean(r["encrypt_s"] for r in records),
        mean_decrypt_s=_mean(r["decrypt_s"] for r in records),
        epsilon=max(final_epsilons) if final_epsilons else None,
        shared_fraction=_mean(fractions) if fractions else None,
        privacy=privacy,
    )


def compare_to_baseline(summaries: Sequence[SettingSummary], baseline: str = BASELINE) -> list[SettingSummary]:
    """Fills the ratios to the baseline setting, when it was run; otherwise returns the rows unchanged."""
    base = next((s for s in summaries if s.setting == baseline), None)
    if base is None:
        return list(summaries)
    return [
        dataclasses.replace(
            s,
            message_ratio=s.message_mb / base.message_mb if base.message_mb else None,
            relative_time_increase=s.training_time_s / base.training_time_s - 1 if base.training_time_s else None,
        )
        for s in summaries
    ]


# ------------------------------------------------------------------------------------------------ formatting


def format_duration(seconds: float) -> str:
    """H:MM:SS, as the seed's table writes training time."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(summaries: Sequence[SettingSummary], metric: str = "Dice") -> str:
    """The seed's Table 1 columns as a markdown table; columns relative to raw and privacy columns when they apply.
    ``metric`` names the best-metric column (the seed's "best global Dice")."""
    with_baseline = any(s.message_ratio is not None for s in summaries)
    with_privacy = any(s.privacy for s in summaries)
    header = ["setting", "message size (MB)", "vs fp32"]
    header += ["vs raw"] if with_baseline else []
    header += ["sites", "training time", f"best global {metric}", "best round"]
    header += ["training time vs raw"] if with_baseline else []
    header += ["epsilon", "fraction shared"] if with_privacy else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        vs_fp32 = f"{s.message_mb / s.model_fp32_mb:.2f}x" if s.model_fp32_mb else "-"
        row = [s.setting, _number(s.message_mb, 2), vs_fp32]
        if with_baseline:
            row.append("-" if s.message_ratio is None else f"{s.message_ratio:.2f}x")
        row += [str(s.sites), format_duration(s.training_time_s), _number(s.best_metric, 4), str(s.best_round or "-")]
        if with_baseline:
            increase = s.relative_time_increase
            row.append("-" if increase is None or s.setting == BASELINE else f"{increase * 100:+.1f}%")
        if with_privacy:
            row += ["-" if s.epsilon is None else f"{s.epsilon:.3g}", _number(s.shared_fraction, 3)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_round_table(rounds: Mapping[str, Sequence[RoundSummary]], metric: str = "Dice") -> str:
    """A markdown table, one row per round, one column per setting: site-1's ``metric`` and, in brackets, the
    sites' weighted mean (federated evaluation) where one was carried."""
    settings = list(rounds)
    numbers = sorted({r.round for summaries in rounds.values() for r in summaries})
    by_round = {name: {r.round: r for r in summaries} for name, summaries in rounds.items()}
    lines = [
        f"| round | {' | '.join(settings)} |",
        "|---|" + "---|" * len(settings),
    ]
    for number in numbers:
        cells = []
        for name in settings:
            r = by_round[name].get(number)
            cell = "-" if r is None else _number(r.metric, 4)
            if r is not None and r.sites_mean is not None:
                cell += f" ({_number(r.sites_mean, 4)})"
            cells.append(cell)
        lines.append(f"| {number} | {' | '.join(cells)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ files


def write_results(
    out_dir: Path,
    document: Mapping[str, Any],
    rounds: Mapping[str, Sequence[RoundSummary]],
    summaries: Sequence[SettingSummary],
    metric: str = "Dice",
) -> list[Path]:
    """``results.json`` (``document`` plus rounds and summary), ``results.csv`` (one row per setting and round)
    and ``summary.csv`` (the table, one row per setting)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        **document,
        "rounds": {setting: [dataclasses.asdict(r) for r in rs] for setting, rs in rounds.items()},
        "summary": [{**dataclasses.asdict(s), "training_time": format_duration(s.training_time_s)} for s in summaries],
        "table": format_table(summaries, metric),
    }
    paths = [out_dir / "results.json", out_dir / "results.csv", out_dir / "summary.csv"]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    _write_csv(paths[1], [dataclasses.asdict(r) for rs in rounds.values() for r in rs], RoundSummary)
    _write_csv(paths[2], [dataclasses.asdict(s) for s in summaries], SettingSummary)
    return paths


def _write_csv(path: Path, rows: list[dict[str, Any]], kind: type) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(kind)])
        writer.writeheader()
        writer.writerows(rows)
