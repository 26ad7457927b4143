"""Encrypted federated learning for PyTorch Lightning."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lightning_fhe.federation import HEFederation

__all__ = ["HEFederation"]


def __getattr__(name: str):
    # Lightning takes seconds to import; the server and provisioning tool never need it.
    if name == "HEFederation":
        from lightning_fhe.federation import HEFederation

        return HEFederation
    raise AttributeError(f"module 'lightning_fhe' has no attribute {name!r}")
