"""The configured first global model (``initial_model``): a torch checkpoint flattened with the sites' layouts.

Round 0's global model is plaintext only: ``concat(encrypted-part values, plaintext-part values)`` in float64, in
the layouts' order, so that every site starts round 1 from identical weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lightning_fhe.he.layout import LayoutError, TensorLayout


class InitialModelError(ValueError):
    """The configured initial model cannot be read, or does not fit the federation's layouts."""


def load_initial_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a plain ``torch.save(model.state_dict())`` or a Lightning checkpoint.

    Only tensors and plain containers are unpickled (``weights_only``): a checkpoint is code otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise InitialModelError(f"initial_model {path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad or unsafe pickle
        raise InitialModelError(
            f"initial_model {path}: cannot load it as a weights-only torch checkpoint ({str(err).splitlines()[0]}); "
            "save the model's state_dict() with torch.save"
        ) from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]  # a Lightning checkpoint
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InitialModelError(
            f"initial_model {path}: expected a state dict of tensors (or a Lightning checkpoint with 'state_dict')"
        )
    return dict(data)


def flatten_initial_state(
    state: Mapping[str, torch.Tensor], encrypted: TensorLayout, plaintext: TensorLayout, source: str
) -> np.ndarray:
    """Round 0's plaintext: the encrypted-part values, then the plaintext-part values, as float64."""
    try:
        return np.concatenate([encrypted.flatten(state), plaintext.flatten(state)])
    except LayoutError as err:
        raise InitialModelError(f"the server's initial_model {source} does not fit the sites' layout: {err}") from None
