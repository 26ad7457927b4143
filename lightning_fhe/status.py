"""``python -m lightning_fhe.status --kit DIR [--server HOST:PORT] [--json]``: where a federation stands, on one screen.

With a site kit it asks the aggregator as that site; with the server kit it asks as the operator (the server's own
certificate and key are the client identity, and the server answers with ``site = "operator"``). It shows the phase,
the round, the members, who submitted the open round and who is missing, the time left before the round closes at
the latest (or fails below quorum), when each member was last heard from, the members that left, and the failure.
It only reads: it never joins, submits or downloads.

Exit status: **0** the federation is running or finished; **1** it failed, or the server refused this kit;
**2** an invalid command line or a kit that does not load; **3** the server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import grpc

from lightning_fhe.client import AggregatorClient, FederationError, RoundStatus, ServerUnavailableError, _round_status
from lightning_fhe.proto import aggregator_pb2 as pb
from lightning_fhe.proto import aggregator_pb2_grpc as pb_grpc
from lightning_fhe.proto.wire import channel_options
from lightning_fhe.provision.kits import SITE_FILES, KitError, ServerKit, SiteKit, load_server_kit, load_site_kit

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def load_kit(path: str | Path) -> SiteKit | ServerKit:
    """A site kit (it holds ``site.yaml``) or the server kit; :class:`KitError` names what is wrong."""
    path = Path(path)
    return load_site_kit(path) if (path / SITE_FILES["config"]).is_file() else load_server_kit(path)


def kit_address(kit: SiteKit | ServerKit) -> str:
    return kit.server_address if isinstance(kit, SiteKit) else kit.address


def fetch_status(kit: SiteKit | ServerKit, server: str | None = None, timeout_s: float = 10.0) -> RoundStatus:
    """Asks the aggregator at ``server`` (default: the kit's address) where the federation stands.

    Raises:
        ServerUnavailableError: no answer within ``timeout_s`` (down, wrong address, or a kit of another run).
        FederationError: the server refused this kit.
    """
    address = server or kit_address(kit)
    if isinstance(kit, SiteKit):
        with AggregatorClient(kit, address, retry_budget_s=timeout_s, rpc_timeout_s=timeout_s) as client:
            return client.status()
    # The operator: the server kit's own certificate and key as the client identity.
    credentials = grpc.ssl_channel_credentials(kit.ca_cert, private_key=kit.key, certificate_chain=kit.cert)
    with grpc.secure_channel(address, credentials, options=channel_options(kit.params)) as channel:
        try:
            reply = pb_grpc.AggregatorStub(channel).GetRoundStatus(
                pb.RoundStatusRequest(), timeout=timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ServerUnavailableError(
                    f"status: no answer from {address} within {timeout_s:g} s ({details})", code
                ) from None
            raise FederationError(f"status: {details} ({code.name if code else 'error'})", code) from None
    return _round_status(reply)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def _names(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names) if names else "none"


def format_status(status: RoundStatus, project: str, address: str, asked_as: str = "") -> str:
    """The one screen ``python -m lightning_fhe.status`` prints; ``asked_as`` names the caller if the server did not."""
    asked_as = status.site or asked_as or "?"
    lines = [f"federation {project!r} at {address} (asked as {asked_as})"]
    if status.phase == "forming":
        lines.append(f"phase:      forming; {len(status.joined)} site(s) joined: {_names(status.joined)}")
    elif status.phase == "open":
        lines.append(
            f"phase:      open, round {status.current_round} of {status.rounds} "
            f"(last closed: {status.last_closed_round})"
        )
    elif status.phase == "finished":
        lines.append(
            f"phase:      finished, all {status.rounds} rounds closed (last closed: {status.last_closed_round})"
        )
    else:
        lines.append(f"phase:      {status.phase} (round {status.current_round} of {status.rounds})")
    if status.members:
        lines.append(f"members:    {len(status.members)}: {_names(status.members)}")
    if status.phase == "open":
        waiting_for = [m for m in status.members if m not in status.submitted and m not in status.left]
        lines.append(
            f"submitted:  {len(status.submitted)} of {len(status.members)}: {_names(status.submitted)}; "
            f"missing: {_names(waiting_for)}"
        )
    if status.phase in ("forming", "open"):
        what = "formation" if status.phase == "forming" else f"round {status.current_round}"
        lines.append(
            f"time left:  {_duration(status.seconds_left)} until {what} closes at the latest "
            "(or fails below quorum)"
        )
    if status.activity:
        seen = ", ".join(f"{a.site} {_duration(a.idle_s)} ago ({a.last_call or '?'})" for a in status.activity)
        lines.append(f"last heard: {seen}")
    lines.append(f"left:       {_names(status.left)}")
    lines.append(f"failure:    {status.failure or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.timeout <= 0:
        print("error: --timeout: expected a number of seconds > 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        kit = load_kit(args.kit)
    except KitError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    address = args.server or kit_address(kit)
    try:
        status = fetch_status(kit, address, args.timeout)
    except ServerUnavailableError as err:
        print(
            f"error: cannot reach the aggregator at {address}: {err}\n"
            "check that the server runs, that the address is right (a server bound to 0.0.0.0 is reached on its "
            "host's name or 127.0.0.1: pass --server HOST:PORT), that the port is open, and that this kit comes "
            "from the same provisioning run as the server's",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except FederationError as err:
        print(f"error: the aggregator at {address} refused: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"project": kit.project, "server": address, **asdict(status)}, indent=2))
    else:
        print(format_status(status, kit.project, address, kit.name if isinstance(kit, SiteKit) else ""))
    return EXIT_FAILED if status.phase == "failed" else EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fhe.status",
        description="Where a federation stands: phase, round, members, who submitted, time left, last activity, "
        "failure. Reads only.",
        epilog="exit status: 0 running or finished, 1 failed (or refused), 2 bad command line or kit, "
        "3 unreachable.\nexample: python -m lightning_fhe.status --kit kits/site-1",
    )
    parser.add_argument("--kit", required=True, help="a site kit, or the server kit (asks as the operator)")
    parser.add_argument("--server", help="HOST:PORT of the aggregator; default: the address in the kit")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
