"""``python -m lightning_fhe.bench {codec,server-memory,round,simulate} ...``: benchmarks measured as ratios within one
run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_fhe.bench.report import log, publish
from lightning_fhe.models import SEGRESNET_FILTERS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fhe.bench", description="Measure what homomorphic encryption costs, as ratios in one run."
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    codec = sub.add_parser("codec", help="encrypted update size and speed: Clara/NVFlare's way against ours")
    codec.add_argument("--model", default="segresnet-16", choices=sorted(SEGRESNET_FILTERS), help="network whose state dict is encrypted")
    codec.add_argument("--clients", type=int, default=2, help="sites whose updates are averaged (default 2)")
    codec.add_argument("--seed", type=int, default=0)
    codec.add_argument(
        "--workers", type=int, default=None, help="processes that encrypt and decrypt (default: every core it may use)"
    )
    codec.add_argument(
        "--repeat", type=int, default=3, help="runs; each time is the shortest of them, for both codecs (default 3)"
    )
    codec.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    memory = sub.add_parser("server-memory", help="aggregator peak memory: few against many sites uploading at once")
    from lightning_fhe.bench import server_memory

    server_memory.add_arguments(memory)
    round_ = sub.add_parser(
        "round", help="per-site encryption, decryption and upload time, encrypted vs raw (the seed's Table 2)"
    )
    from lightning_fhe.bench import round as round_bench

    round_bench.add_arguments(round_)
    simulate = sub.add_parser(
        "simulate", help="many simulated sites: the process backend against the Ray backend, wall time and memory"
    )
    from lightning_fhe.bench import simulate_backends

    simulate_backends.add_arguments(simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.bench == "server-memory":
        from lightning_fhe.bench import server_memory

        return server_memory.run_from_args(args)
    if args.bench == "round":
        from lightning_fhe.bench import round as round_bench

        return round_bench.run_from_args(args)
    if args.bench == "simulate":
        from lightning_fhe.bench import simulate_backends

        return simulate_backends.run_from_args(args)
    if args.clients < 1:
        _parser().error(f"--clients must be at least 1, got {args.clients}")
    if args.workers is not None and args.workers < 1:
        _parser().error(f"--workers must be at least 1, got {args.workers}")
    from lightning_fhe.bench import codec

    result = codec.run(args.model, args.clients, args.seed, args.workers, log=log, repeat=args.repeat)
    return publish(result, codec.format_table(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
