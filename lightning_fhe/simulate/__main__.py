"""``python -m lightning_fhe.simulate CONFIG [key=value ...] [--compare SETTING ...]``.

Runs the experiment once (or once per compared setting, one after the other), prints the seed's Table 1 for what
ran, the metric per round side by side, and writes ``results.json``, ``results.csv``, ``summary.csv``,
``metric_per_round.png`` and ``time_per_round.png`` to the output folder (``experiment.output_dir``, default
``runs/<name>-<timestamp>/``).

Exit status: 0 when every setting finished; 1 when a process of the federation (or, with ``backend=ray``, its Ray
task) failed or a setting timed out (its error and the end of its log are shown), or Ray could not run every site;
2 for an invalid command line or config.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

from lightning_fhe.simulate.config import ConfigError, load_experiment, setting_label


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    # `--compare raw he_full federation.rounds=2` : argparse cannot tell where the names end, "=" can.
    compare = [name for name in args.compare or [] if "=" not in name]
    overrides = [*args.overrides, *(name for name in args.compare or [] if "=" in name)]
    if args.compare is not None and not compare:
        print("error: --compare needs at least one setting name, e.g. --compare raw he_full", file=sys.stderr)
        return 2
    try:
        experiment = load_experiment(args.config, overrides)
        settings = {name: experiment.setting(name) for name in compare} or {
            setting_label(experiment.config): experiment.config
        }
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from lightning_fhe.simulate.orchestrate import SimulationError, run_setting
    from lightning_fhe.simulate.plots import write_plots
    from lightning_fhe.simulate.results import (
        compare_to_baseline,
        format_round_table,
        format_table,
        round_summaries,
        summarize,
        write_results,
    )

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(experiment.config["experiment"]["output_dir"] or Path("runs") / f"{experiment.name}-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = experiment.config
    print(
        f"{experiment.name}: {', '.join(settings)}; {config['federation']['sites']} sites, "
        f"{config['federation']['rounds']} rounds x {config['federation']['local_epochs']} local epochs -> {out_dir}",
        flush=True,
    )
    started = time.monotonic()
    runs = []
    for name, setting_config in settings.items():
        try:
            runs.append(run_setting(name, setting_config, out_dir / name, echo=_echo))
        except SimulationError as err:
            if err.log_path is not None:
                print(f"\n--- last lines of {err.log_path} ---\n{err.log_tail}\n---", file=sys.stderr)
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; every process of the federation was stopped", file=sys.stderr)
            return 130

    metric, mode = config["experiment"]["metric"], config["experiment"]["metric_mode"]
    rounds = {run.name: round_summaries(run.name, run.records) for run in runs}
    summaries = compare_to_baseline(
        [summarize(run.name, run.records, privacy=bool(run.config["privacy"]), mode=mode) for run in runs]
    )
    document = {
        "experiment": experiment.name,
        "command": " ".join(["python -m lightning_fhe.simulate", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "wall_s": time.monotonic() - started,
        "config": experiment.config,
        "compare": experiment.overlays,
        "settings": {run.name: {"config": run.config, "wall_s": run.wall_s, "records": run.records} for run in runs},
    }
    files = write_results(out_dir, document, rounds, summaries, metric)
    files += write_plots(rounds, out_dir, title=experiment.name, metric=metric)
    print()
    print(format_table(summaries, metric))
    print(f"\n{metric} of the global model per round (site-1's; in brackets the sites' weighted mean):\n")
    print(format_round_table(rounds, metric))
    wall = ", ".join(f"{run.name} {run.wall_s:.0f} s" for run in runs)
    print(f"\nwall time with start-up: {wall}; total {time.monotonic() - started:.0f} s")
    print("wrote " + ", ".join(str(path) for path in files))
    return 0


def _echo(line: str) -> None:
    print(line, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fhe.simulate",
        description="Simulate an encrypted federation on this machine: a server and one process per site over "
        "mutual-TLS loopback (or, with backend=ray, on a Ray cluster), with the seed's results table and plots.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m lightning_fhe.simulate configs/experiments/quickstart.yaml\n"
        "  python -m lightning_fhe.simulate configs/experiments/quickstart.yaml federation.rounds=3\n"
        "  python -m lightning_fhe.simulate configs/experiments/quickstart.yaml --compare raw he_full he_conv "
        "he_key_layers\n"
        "  python -m lightning_fhe.simulate configs/experiments/noniid_classification.yaml --compare fedavg fedadam "
        "fedyogi\n"
        "  python -m lightning_fhe.simulate configs/experiments/quickstart.yaml backend=ray ray.address=auto\n\n"
        "See docs/experiments.md for every key.",
    )
    parser.add_argument("config", help="experiment YAML, e.g. configs/experiments/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. federation.sites=4")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="SETTING",
        help="run these settings (names under 'compare' in the config) one after the other and compare them",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
