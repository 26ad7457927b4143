"""``python -m lightning_fhe.export --kit SITE_KIT --out model.pt [--round N] [--server HOST:PORT]``: the global model.

Downloads the last closed round's global model (or round ``N``'s) as a member site, decrypts it with the kit's key,
and writes it as a plain ``torch.save`` dict of named tensors, shaped and typed as in the federation's layouts (the
server sends them with the model), loadable with ``torch.load(path, weights_only=True)`` and then
``model.load_state_dict(state, strict=False)`` (tensors the sites kept local are not in it). Round 0 is the
initial model. The file is written atomically and mode 0600: a global model is what the federation produced, and
it can memorise training data.

It only downloads: it never joins, submits or leaves. It refuses, with a message, a round that has not closed yet,
a round the server no longer keeps, a site that is not a member, and a kit without the CKKS secret key.

Exit status: **0** written; **1** refused; **2** an invalid command line or a kit that does not load (the server kit
holds no key); **3** the server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lightning_fhe.client import AggregatorClient, FederationError, GlobalModel, ServerUnavailableError
from lightning_fhe.proto.reasons import Reason
from lightning_fhe.provision.kits import KitError, SiteKit, load_site_kit

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class ExportError(RuntimeError):
    """The global model cannot be exported (round not closed, pruned, not a member, ...); the message says why."""


@dataclass(frozen=True)
class ExportResult:
    round: int
    path: Path
    tensors: int
    values: int
    participants: tuple[str, ...]


def decode_global_model(model: GlobalModel, kit: SiteKit) -> dict:
    """The named tensors of a downloaded global model, decrypted with the kit's key, in the layouts' dtypes."""
    from lightning_fhe.federated_metrics import METRICS_TENSOR
    from lightning_fhe.he.codec import UpdateCipher
    from lightning_fhe.he.layout import LayoutError, TensorLayout

    if not model.encrypted_layout_json and not model.plaintext_layout_json:
        raise ExportError(
            f"round {model.round}: the server sent no tensor layouts with the model (it predates them); "
            "upgrade the server"
        )
    try:
        encrypted = TensorLayout.from_dict(json.loads(model.encrypted_layout_json or '{"tensors": []}'))
        plaintext = TensorLayout.from_dict(json.loads(model.plaintext_layout_json or '{"tensors": []}'))
    except (ValueError, LayoutError) as err:
        raise ExportError(f"round {model.round}: the server sent layouts that cannot be read ({err})") from None
    try:
        if model.round == 0:  # the initial model travels in plaintext: encrypted part, then plaintext part
            values = model.plaintext
            if values.size != encrypted.numel + plaintext.numel:
                raise LayoutError(f"initial model holds {values.size} values; the layouts have "
                                  f"{encrypted.numel + plaintext.numel}")
            cut = encrypted.numel
            tensors = {**encrypted.unflatten(values[:cut]), **plaintext.unflatten(values[cut:])}
        else:
            tensors = {}
            if encrypted.numel:
                cipher = UpdateCipher(_secret_context(kit))
                average = cipher.decrypt(model.encrypted_chunks, encrypted.numel, model.total_share)
                tensors.update(encrypted.unflatten(average))
            tensors.update(plaintext.unflatten(model.plaintext))
    except (ValueError, LayoutError) as err:
        raise ExportError(f"round {model.round}: the global model does not match its layouts ({err})") from None
    tensors.pop(METRICS_TENSOR, None)  # the sites' averaged validation metrics ride in the update; not a weight
    return tensors


def _secret_context(kit: SiteKit):
    try:
        return kit.secret_context()
    except KitError as err:  # he.key = sites, before the sites made the key: not a layout problem
        raise ExportError(str(err)) from None


def save_atomically(tensors: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path`` (mode 0600), flushed, then renamed over it."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_global_model(
    kit: SiteKit | str | os.PathLike,
    out: str | os.PathLike,
    round: int | None = None,
    server: str | None = None,
    timeout_s: float = 30.0,
) -> ExportResult:
    """Writes round ``round``'s global model (default: the last closed round) to ``out``.

    Raises:
        ExportError: refused: not closed yet, no longer kept, not a member, the federation still forming.
        ServerUnavailableError: no answer within ``timeout_s``.
        KitError: the kit does not load, or holds no CKKS secret key (the server kit).
    """
    kit = kit if isinstance(kit, SiteKit) else load_site_kit(kit)
    out = Path(out)
    # wait_s=0: a closed round is served at once, and this command never waits for one to close.
    with AggregatorClient(kit, server, retry_budget_s=timeout_s, rpc_timeout_s=timeout_s, wait_s=0.0) as client:
        try:
            status = client.status()
        except ServerUnavailableError:
            raise
        except FederationError as err:
            if Reason.parse(err.reason) in (Reason.NOT_MEMBER, Reason.UNKNOWN_SITE):
                raise ExportError(f"site {kit.name} is not a member of this federation ({err})") from None
            raise ExportError(f"the aggregator refused site {kit.name}: {err}") from None
        if status.phase == "forming":
            raise ExportError("the federation is still forming: no round has closed yet")
        if kit.name not in status.members:
            raise ExportError(
                f"site {kit.name} is not a member of this federation (members: {', '.join(status.members)}); "
                "only members get its global models"
            )
        last = status.last_closed_round
        chosen = last if round is None else round
        if chosen < 0 or chosen > status.rounds:
            what = "no round has closed yet" if round is None else f"round {round} does not exist"
            raise ExportError(f"{what}: the federation runs rounds 1..{status.rounds} (0: the initial model)")
        if chosen > last:
            raise ExportError(
                f"round {chosen} has not closed yet: the last closed round is {last} "
                f"(the federation is {status.phase}, round {status.current_round} open)"
            )
        try:
            model = client.fetch_global(chosen)
        except FederationError as err:
            if Reason.parse(err.reason) is Reason.PRUNED:
                raise ExportError(
                    f"round {chosen}'s global model is no longer kept on the server (its keep_rounds option); "
                    f"the latest is round {last}"
                ) from None
            raise ExportError(f"round {chosen}: {err}") from None
    tensors = decode_global_model(model, kit)
    save_atomically(tensors, out)
    return ExportResult(chosen, out, len(tensors), sum(t.numel() for t in tensors.values()), model.participants)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.round is not None and args.round < 0:
        print("error: --round: expected a round number >= 0", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout <= 0:
        print("error: --timeout: expected a number of seconds > 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        kit = load_site_kit(args.kit)
    except KitError as err:
        print(
            f"error: {err} (export needs a site kit: only sites hold the key that decrypts the model)", file=sys.stderr
        )
        return EXIT_USAGE
    address = args.server or kit.server_address
    try:
        result = export_global_model(kit, args.out, args.round, address, args.timeout)
    except ServerUnavailableError as err:
        print(
            f"error: cannot reach the aggregator at {address}: {err}\ncheck that the server runs and the address is "
            "right (--server HOST:PORT)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except (ExportError, FederationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as err:
        print(f"error: cannot write {args.out}: {err}", file=sys.stderr)
        return EXIT_REFUSED
    print(
        f"round {result.round}'s global model ({result.tensors} tensors, {result.values:,} values, from "
        f"{', '.join(result.participants) or 'the initial model'}) written to {result.path}"
    )
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fhe.export",
        description="Write a closed round's decrypted global model as a torch state dict. Downloads only.",
        epilog="exit status: 0 written, 1 refused, 2 bad command line or kit, 3 unreachable.\n"
        "example: python -m lightning_fhe.export --kit kits/site-1 --out global.pt",
    )
    parser.add_argument("--kit", required=True, help="this site's kit (it holds the CKKS key that decrypts)")
    parser.add_argument("--out", required=True, type=Path, help="file to write (torch.save of a dict of tensors)")
    parser.add_argument("--round", type=int, help="round to export (0: the initial model); default: the last closed")
    parser.add_argument("--server", help="HOST:PORT of the aggregator; default: the address in the kit")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
