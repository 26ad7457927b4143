"""The layout of an update: which named tensors, in which order, with which shapes and dtypes.

Packing needs the tensors as one flat stream; unpacking needs to cut the stream back and restore every tensor's
name, shape and dtype exactly. Two parties can only add their streams if their layouts agree, so the layout has a
fingerprint that travels instead of the layout itself.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from math import prod
from typing import Any

import numpy as np
import torch

from lightning_fhe.he.params import CKKSParams

# float64 holds every value of these exactly, so a stream of float64 round-trips them bit for bit.
SUPPORTED_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class LayoutError(ValueError):
    """Tensors that do not match the layout, or a layout that cannot be built. The message names the tensor."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class TensorLayout:
    """Ordered tensor specs; the order is the order of the flat stream.

    Example::

        >>> import torch
        >>> state = {"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.float16)}
        >>> layout = TensorLayout.from_tensors(state)
        >>> layout.numel
        9
        >>> restored = layout.unflatten(layout.flatten(state))
        >>> restored["b"].dtype, restored["w"].shape
        (torch.float16, torch.Size([2, 3]))
    """

    specs: tuple[TensorSpec, ...]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], names: list[str] | tuple[str, ...] | None = None):
        """The layout of ``tensors`` (in mapping order, or the order of ``names``)."""
        names = list(tensors) if names is None else list(names)
        specs = []
        for name in names:
            if name not in tensors:
                raise LayoutError(f"tensor {name!r} is not in the state dict")
            tensor = tensors[name]
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in SUPPORTED_DTYPES:
                raise LayoutError(
                    f"tensor {name!r} has dtype {tensor.dtype}; only floating tensors {sorted(SUPPORTED_DTYPES)} "
                    f"can be averaged (integer buffers stay local)"
                )
            specs.append(TensorSpec(name, tuple(tensor.shape), dtype))
        return cls(tuple(specs))

    @cached_property
    def _offsets(self) -> list[int]:
        offsets = [0]
        for spec in self.specs:
            offsets.append(offsets[-1] + spec.numel)
        return offsets

    @property
    def numel(self) -> int:
        return self._offsets[-1]

    def locate(self, index: int) -> str:
        """Names the tensor element at position ``index`` of the flat stream, for error messages."""
        i = bisect_right(self._offsets, index) - 1
        spec = self.specs[i]
        flat = index - self._offsets[i]
        position = np.unravel_index(flat, spec.shape) if spec.shape else ()
        return f"tensor {spec.name!r}{list(map(int, position))}"

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        """One float64 stream of the layout's tensors, checked against names, shapes and dtypes."""
        out = np.empty(self.numel, dtype=np.float64)
        for spec, start, end in zip(self.specs, self._offsets, self._offsets[1:]):
            tensor = tensors.get(spec.name)
            if tensor is None:
                raise LayoutError(f"tensor {spec.name!r} of the layout is missing")
            if tuple(tensor.shape) != spec.shape or str(tensor.dtype).removeprefix("torch.") != spec.dtype:
                raise LayoutError(
                    f"tensor {spec.name!r} is {tensor.dtype} {tuple(tensor.shape)}; the layout expects "
                    f"{spec.dtype} {spec.shape}"
                )
            out[start:end] = tensor.detach().to("cpu", torch.float64).reshape(-1).numpy()
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """The named tensors back from a flat stream, in their own shapes and dtypes."""
        flat = np.asarray(flat)
        if flat.shape != (self.numel,):
            raise LayoutError(f"stream holds {flat.size} values; the layout has {self.numel}")
        source = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float64))
        return {
            spec.name: source[start:end].reshape(spec.shape).to(SUPPORTED_DTYPES[spec.dtype]).clone()
            for spec, start, end in zip(self.specs, self._offsets, self._offsets[1:])
        }

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": [[s.name, list(s.shape), s.dtype] for s in self.specs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorLayout:
        try:
            specs = tuple(TensorSpec(str(n), tuple(int(d) for d in shape), str(dt)) for n, shape, dt in data["tensors"])
        except (KeyError, TypeError, ValueError) as err:
            raise LayoutError(f"malformed layout description: {err}") from None
        for spec in specs:
            if spec.dtype not in SUPPORTED_DTYPES:
                raise LayoutError(f"tensor {spec.name!r}: unsupported dtype {spec.dtype!r}")
        return cls(specs)

    def fingerprint(self, params: CKKSParams | None = None) -> str:
        """Digest of names, shapes, dtypes (and the CKKS parameters, for the encrypted part)."""
        payload = {"layout": self.to_dict(), "params": params.to_dict() if params else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
