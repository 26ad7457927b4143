"""``python -m lightning_fhe.server --kit DIR [--config FILE] [--insecure] [key=value ...]``.

Prints ``listening on HOST:PORT`` on stdout once serving (the chosen port when ``port=0``), logs to stderr, and
exits 0 once every round closed and the sites fetched the last global model (or ``linger_s`` passed), 1 if the
federation failed or the server cannot start, 2 for an invalid command line or config, 130/143 on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import textwrap
from pathlib import Path

from lightning_fhe.server.config import OPTION_HELP, ServerConfig, ServerConfigError, load_server_config

DEFAULT_CONFIG = "configs/server.yaml"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_server_config(args.config, args.overrides)
    except ServerConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Imported only now so that --help and config errors answer at once, without loading torch and TenSEAL.
    from lightning_fhe.server.app import INSECURE_WARNING, AggregatorServer, limit_malloc_arenas

    limit_malloc_arenas()  # before the threads that allocate exist: see its docstring
    from lightning_fhe.provision.kits import KitError, load_server_kit
    from lightning_fhe.server.initial_model import InitialModelError
    from lightning_fhe.server.store import StateError

    try:
        kit = load_server_kit(args.kit)
        if args.insecure:
            print(f"\n{'!' * 100}\n{INSECURE_WARNING}\n{'!' * 100}\n", file=sys.stderr, flush=True)
        server = AggregatorServer(config, kit, insecure=args.insecure)
    except ServerConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KitError, StateError, InitialModelError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        logging.getLogger("lightning_fhe.server").warning("%s: stopping", signal.Signals(signum).name)
        server.request_stop()  # wakes wait() below, which stops the server

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        port = server.start()
    except (OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"listening on {server.config.bind}:{port}", flush=True)
    if server.config.port_file:
        _write_port_file(Path(server.config.port_file), port)
    code = server.wait()
    if received:
        return 128 + received[0]
    return 1 if code is None else code


def _write_port_file(path: Path, port: int) -> None:
    """Atomically, so a script polling for the file never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".port-")
    with os.fdopen(fd, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    lines = []
    for name, text in OPTION_HELP.items():
        default = getattr(defaults, name)
        suffix = (
            ""
            if default is None
            else f" (default: {default:g})"
            if isinstance(default, float)
            else f" (default: {default})"
        )
        wrapped = textwrap.wrap(text + suffix, width=90)
        lines.append(f"  {name:<23} {wrapped[0]}")
        lines += [f"  {'':<23} {line}" for line in wrapped[1:]]
    options = "\n".join(lines)
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fhe.server",
        description="The lightning_fhe aggregation server: sums the sites' encrypted updates without any key.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"options (key=value, after the config file):\n{options}\n\n"
        "example:\n  python -m lightning_fhe.server --kit kits/server --config configs/server.yaml rounds=20 "
        "min_clients=2\n\nSee docs/server.md.",
    )
    parser.add_argument("--kit", required=True, help="the server kit folder made by python -m lightning_fhe.provision")
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None,
        help=f"server options YAML (default: {DEFAULT_CONFIG} if it exists, else the built-in defaults)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. rounds=5 port=0")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="listen WITHOUT TLS; sites name themselves. Local experiments only, never across a network",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


if __name__ == "__main__":
    sys.exit(main())
