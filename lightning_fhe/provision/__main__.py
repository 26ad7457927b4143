"""``python -m lightning_fhe.provision CONFIG [key=value ...] --out DIR [--force]``.

Exit status: 0 on success, 2 for an invalid config or command line, 1 when the kits cannot be written (existing
kits without ``--force``, an unwritable folder). Errors are one ``error: ...`` line, never a traceback: the user
needs the field to fix, not our stack.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_fhe.provision.config import ProvisionConfig, ProvisionConfigError, load_provision_config
from lightning_fhe.provision.kits import SERVER_FILES, SITE_FILES, SITE_PARAMS_FILE, load_server_kit, provision


def main(argv: list[str] | None = None) -> int:
    # Intermixed, so overrides may come after --out as well as before it.
    args = _parser().parse_intermixed_args(argv)
    try:
        config = load_provision_config(args.config, args.overrides)
    except ProvisionConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        kits = provision(config, args.out, force=args.force)
        fingerprint = load_server_kit(kits["server"]).he_fingerprint  # re-read: proves the kit loads
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(config, Path(args.out), fingerprint))
    return 0


def summary(config: ProvisionConfig, out: Path, fingerprint: str) -> str:
    """What was written and where each secret is, so whoever provisions hands each party the right folder."""
    width = max(len(name) for name in ("server", *config.clients)) + 2
    files = dict(SITE_FILES)
    if config.he_key == "sites":
        files["he_context"] = SITE_PARAMS_FILE
    site_files = ", ".join(files.values())
    lines = [
        f"Provisioned federation {config.project!r} in {out}/ (HE fingerprint {fingerprint}):",
        f"  {'ca/':<{width}} ca.crt, ca.key: the CA private key; keep it offline, give it to no one",
        f"  {'server/':<{width}} for the aggregator at {config.server_address}: {', '.join(SERVER_FILES.values())}",
        f"  {'':<{width}} server.key is its TLS key; he_params.tenseal holds CKKS parameters only, no key of any kind",
    ]
    lines += [f"  {site + '/':<{width}} for site {site} only: {site_files}" for site in config.clients]
    if config.he_key == "provisioned":
        what = "he_context.tenseal is the CKKS SECRET key, the same at every site"
    else:
        what = (
            "he.key: sites, so no kit holds a CKKS secret key (he_params.tenseal: parameters only); the sites make it "
            "when the federation forms"
        )
    lines += [
        f"  {'':<{width}} client.key is each site's TLS key; {what}",
        "Copy each kit to its participant over a secure channel. Private keys are mode 0600.",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fhe.provision",
        description="Make the CA, TLS certificates and the shared CKKS key of a federation, one kit folder per "
        "participant.",
        epilog="example: python -m lightning_fhe.provision configs/provision.yaml --out kits "
        "server.host=fl.example.org",
    )
    parser.add_argument("config", help="provisioning YAML, e.g. configs/provision.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf overrides, e.g. server.port=9443")
    parser.add_argument("--out", required=True, help="folder to write the kits into (created if missing)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing kits: a new CA and HE key, so every kit must be redistributed",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
