"""Add HEFederation to a Trainer you already have.

The training code below is ordinary Lightning; the federation is the one callback in ``callbacks=[...]``.

As one site of a real federation (the server runs elsewhere: ``python -m lightning_fhe.server --kit kits/server``):

    python examples/federate_existing_trainer.py --kit kits/site-1

Everything on this machine, to try it (provisions a throw-away federation, starts the aggregator, runs two sites):

    python examples/federate_existing_trainer.py --local
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from lightning_fhe import HEFederation

ROUNDS, LOCAL_EPOCHS = 3, 2


def train(kit: str, server: str | None, seed: int) -> None:
    L.seed_everything(seed)
    model = BoringModel()  # your LightningModule, unchanged
    data = DataLoader(RandomDataset(32, 256), batch_size=16)  # this site's own data
    trainer = L.Trainer(
        max_epochs=ROUNDS * LOCAL_EPOCHS,
        accelerator="cpu",
        callbacks=[HEFederation(kit=kit, server=server, local_epochs=LOCAL_EPOCHS, encrypt="all")],
        enable_progress_bar=False,
    )
    trainer.fit(model, data)
    print(f"{kit}: federated training done after {trainer.current_epoch} epochs")


def run_locally() -> None:
    from lightning_fhe.provision import load_provision_config, load_server_kit, provision
    from lightning_fhe.server.app import AggregatorServer
    from lightning_fhe.server.config import load_server_config

    with tempfile.TemporaryDirectory() as tmp:
        config = load_provision_config(
            {"project": "example", "server": {"host": "localhost", "port": 8443}, "clients": ["site-1", "site-2"],
             "he": {"lib": "tenseal", "config": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40],
                                                 "scale_bits": 40, "scheme": "CKKS"}}}
        )
        provision(config, Path(tmp) / "kits")
        server = AggregatorServer(
            load_server_config(None, ["port=0", "bind=127.0.0.1", f"state_dir={tmp}/state", f"rounds={ROUNDS}", "linger_s=2"]),
            load_server_kit(Path(tmp) / "kits" / "server"),
        )
        address = f"localhost:{server.start()}"
        other = subprocess.Popen([sys.executable, __file__, "--kit", f"{tmp}/kits/site-2", "--server", address, "--seed", "1"])
        train(f"{tmp}/kits/site-1", address, seed=0)
        if other.wait() != 0:
            sys.exit("site-2 failed")
        server.wait(timeout=30)
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit", help="this site's kit folder (from python -m lightning_fhe.provision)")
    parser.add_argument("--server", help="host:port of the aggregator (default: the kit's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local", action="store_true", help="run a whole two-site federation on this machine")
    args = parser.parse_args()
    if args.local:
        run_locally()
    elif args.kit:
        train(args.kit, args.server, args.seed)
    else:
        parser.error("give --kit (one site of a real federation) or --local (try it on this machine)")
