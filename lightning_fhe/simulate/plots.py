"""The two figures of a simulation: the global model's metric per round, and where each round's time went.

Drawn with matplotlib's Agg backend (files only, no display), so they work on a headless server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning_fhe.simulate.results import RoundSummary

__all__ = ["TIME_PARTS", "plot_metric", "plot_round_times", "write_plots"]

# (RoundSummary field, legend label); results.py defines each part.
TIME_PARTS: tuple[tuple[str, str], ...] = (
    ("train_s", "training"),
    ("encrypt_s", "encryption"),
    ("transfer_s", "transfer (upload, download)"),
    ("wait_s", "waiting for the other sites"),
    ("decrypt_s", "decryption"),
    ("val_s", "validation"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def plot_metric(
    rounds: Mapping[str, Sequence[RoundSummary]], path: Path, title: str = "", metric: str = "Dice"
) -> Path:
    """The global model's validation ``metric`` after each round (site-1's), one line per setting."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setting, summaries in rounds.items():
        points = [(r.round, r.metric) for r in summaries if r.metric is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=setting)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"global model's {metric}")
    ax.set_title(f"{title}: {metric} per round" if title else f"{metric} per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_round_times(rounds: Mapping[str, Sequence[RoundSummary]], path: Path, title: str = "") -> Path:
    """Stacked bars per round (mean over sites): training, encryption, transfer, waiting, decryption, validation.

    One panel per setting, sharing the time axis, so settings compare at a glance.
    """
    plt = _pyplot()
    settings = list(rounds)
    fig, axes = plt.subplots(
        1, len(settings), figsize=(max(6.0, 3.6 * len(settings)), 5.0), sharey=True, squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, setting in zip(axes[0], settings):
        summaries = rounds[setting]
        xs = [r.round for r in summaries]
        bottom = [0.0] * len(summaries)
        for (field, label), color in zip(TIME_PARTS, colors):
            heights = [getattr(r, field) for r in summaries]
            ax.bar(xs, heights, bottom=bottom, label=label, color=color, width=0.8)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(setting)
        ax.set_xlabel("round")
        ax.set_xticks(xs if len(xs) <= 20 else xs[:: max(1, len(xs) // 10)])
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("seconds per round (mean over sites)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize="small", frameon=False)
    if title:
        fig.suptitle(f"{title}: time per round")
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # room for the two-row legend below the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(
    rounds: Mapping[str, Sequence[RoundSummary]], out_dir: Path, title: str = "", metric: str = "Dice"
) -> list[Path]:
    """``metric_per_round.png`` and ``time_per_round.png`` in ``out_dir``."""
    return [
        plot_metric(rounds, out_dir / "metric_per_round.png", title, metric),
        plot_round_times(rounds, out_dir / "time_per_round.png", title),
    ]
