"""``lightning-fhe SUBCOMMAND ...``: the console script; each subcommand is ``python -m lightning_fhe.SUBCOMMAND``."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "provision": "make the CA, TLS certificates and CKKS keys for a federation",
    "server": "run the aggregation server (sums encrypted updates without any key)",
    "bench": "measure what homomorphic encryption costs",
    "simulate": "run a federation (server and sites) on this machine and print the seed's results table",
    "status": "where a federation stands: phase, round, who submitted, time left (site or server kit)",
    "export": "write a closed round's decrypted global model as a torch state dict (site kit)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<10} {help}" for name, help in SUBCOMMANDS.items()]
        print("usage: lightning-fhe SUBCOMMAND [ARGS ...]\n\nsubcommands:\n" + "\n".join(lines))
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"\nlightning-fhe: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(f"lightning_fhe.{argv[0]}")
    if hasattr(module, "__path__"):  # a package: its command line is its __main__
        module = importlib.import_module(f"lightning_fhe.{argv[0]}.__main__")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
