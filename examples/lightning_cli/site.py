"""One federated site driven by LightningCLI: the Trainer, the model, the data and HEFederation all from YAML.

    pip install "lightning_fhe[cli]"
    python examples/lightning_cli/site.py fit --config examples/lightning_cli/site-1.yaml

Nothing here knows about federation: ``HEFederation`` is one of ``trainer.callbacks`` in the YAML, with its
arguments (``strategy`` included) as ``init_args``. See docs/callback.md, "From a LightningCLI config".
"""

from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI()  # model and data are given by class_path in the config


if __name__ == "__main__":
    main()
