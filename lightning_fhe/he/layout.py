"""The layout of an update: which named tensors, in which order, with which shapes and dtypes.

Packing needs the tensors as one flat stream; unpacking needs to cut the stream back and restore every tensor's
name, shape and dtype exactly. Two parties can only add their streams if their layouts agree, so the layout has a
fingerprint that travels instead of the layout itself.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from collections.abc import Iterator, Mapping
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


# Limits on a layout a site declares (it arrives over the network). A real model's layout JSON is some bytes per
# tensor; these bound what parsing and checking it may cost, far above any real model.
MAX_LAYOUT_JSON_BYTES = 4 << 20
MAX_TENSOR_NAME_CHARS = 1024
MAX_TENSOR_DIMS = 64
DEFAULT_MAX_VALUES = 2**31


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
            tensor = self._check(spec, tensors.get(spec.name))
            _to_float64(tensor.detach().reshape(-1), out[start:end])
        return out

    def _check(self, spec: TensorSpec, tensor: torch.Tensor | None) -> torch.Tensor:
        if tensor is None:
            raise LayoutError(f"tensor {spec.name!r} of the layout is missing")
        if tuple(tensor.shape) != spec.shape or str(tensor.dtype).removeprefix("torch.") != spec.dtype:
            raise LayoutError(
                f"tensor {spec.name!r} is {tensor.dtype} {tuple(tensor.shape)}; the layout expects "
                f"{spec.dtype} {spec.shape}"
            )
        return tensor

    def _spans(self, start: int, stop: int) -> Iterator[tuple[TensorSpec, int, int, int]]:
        """``(spec, from, to, at)``: elements ``from:to`` of the tensor ``spec`` hold stream positions from ``at``."""
        if not 0 <= start <= stop <= self.numel:
            raise LayoutError(f"values {start}..{stop} are outside the stream's {self.numel}")
        i = bisect_right(self._offsets, start) - 1
        while start < stop:
            spec, base = self.specs[i], self._offsets[i]
            end = min(stop, self._offsets[i + 1])
            if end > start:
                yield spec, start - base, end - base, start
            start, i = end, i + 1

    def read(self, tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> np.ndarray:
        """Values ``start:stop`` of :meth:`flatten`'s stream, without making the whole stream (a chunk at a time)."""
        out = np.empty(stop - start, dtype=np.float64)
        for spec, a, b, at in self._spans(start, stop):
            tensor = self._check(spec, tensors.get(spec.name)).detach().reshape(-1)[a:b]
            _to_float64(tensor, out[at - start : at - start + b - a])
        return out

    def empty(self) -> dict[str, torch.Tensor]:
        """The layout's tensors, uninitialized: for :meth:`write` to fill a piece at a time."""
        return {spec.name: torch.empty(spec.shape, dtype=SUPPORTED_DTYPES[spec.dtype]) for spec in self.specs}

    def write(self, tensors: Mapping[str, torch.Tensor], start: int, values: np.ndarray) -> None:
        """Stores ``values`` (float64) as stream positions ``start...`` of ``tensors``, each in its own dtype."""
        values = np.asarray(values, dtype=np.float64)
        for spec, a, b, at in self._spans(start, start + values.size):
            _from_float64(values[at - start : at - start + b - a], tensors[spec.name].view(-1)[a:b])

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
    def from_dict(cls, data: Any, max_values: int = DEFAULT_MAX_VALUES) -> TensorLayout:
        """The layout ``data`` describes (``{"tensors": [[name, shape, dtype], ...]}``), checked in full.

        Raises :class:`LayoutError` naming the tensor (index and name) and what is wrong: anything but that exact
        shape, an empty, overlong or repeated name, a dimension that is not an integer >= 0, an unsupported dtype,
        or more than ``max_values`` values in one tensor or in all.
        """
        if not isinstance(data, Mapping) or set(data) != {"tensors"} or not isinstance(data["tensors"], list):
            raise LayoutError('expected {"tensors": [[name, shape, dtype], ...]}')
        specs, names, total = [], set(), 0
        for i, entry in enumerate(data["tensors"]):
            if not (isinstance(entry, list) and len(entry) == 3):
                raise LayoutError(f"tensor {i}: expected [name, shape, dtype], got {_short(entry)}")
            name, shape, dtype = entry
            if not isinstance(name, str) or not name or len(name) > MAX_TENSOR_NAME_CHARS:
                raise LayoutError(
                    f"tensor {i}: the name must be a non-empty string of at most {MAX_TENSOR_NAME_CHARS} characters, "
                    f"got {_short(name)}"
                )
            where = f"tensor {i} ({name!r})"
            if name in names:
                raise LayoutError(f"{where}: the name appears twice")
            names.add(name)
            if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS:
                raise LayoutError(f"{where}: the shape must be a list of at most {MAX_TENSOR_DIMS} dimensions")
            for d in shape:
                if not (isinstance(d, int) and not isinstance(d, bool) and d >= 0):
                    raise LayoutError(f"{where}: dimension {_short(d)} in shape {_short(shape)} is not an integer >= 0")
            if dtype not in SUPPORTED_DTYPES:
                supported = sorted(SUPPORTED_DTYPES)
                raise LayoutError(f"{where}: unsupported dtype {_short(dtype)}; expected one of {supported}")
            numel = prod(shape)
            total += numel
            if numel > max_values or total > max_values:
                raise LayoutError(
                    f"{where}: shape {shape} brings the layout to {total} values, more than the {max_values} allowed "
                    "(the server's max_model_values)"
                )
            specs.append(TensorSpec(name, tuple(shape), dtype))
        return cls(tuple(specs))

    @classmethod
    def from_json(cls, text: str, max_values: int = DEFAULT_MAX_VALUES) -> TensorLayout:
        """:meth:`from_dict` of JSON text that came over the network, bounded in size and depth; "" is empty."""
        if not text:
            return cls(())
        if len(text) > MAX_LAYOUT_JSON_BYTES:
            raise LayoutError(f"{len(text)} characters of JSON, more than the {MAX_LAYOUT_JSON_BYTES} allowed")
        try:
            data = json.loads(text)
        except RecursionError:  # Python's parser recurses once per nesting level
            raise LayoutError("the JSON is nested too deep for a layout") from None
        except ValueError as err:
            raise LayoutError(f"not JSON ({err})") from None
        return cls.from_dict(data, max_values)

    def fingerprint(self, params: CKKSParams | None = None) -> str:
        """Digest of names, shapes, dtypes (and the CKKS parameters, for the encrypted part)."""
        payload = {"layout": self.to_dict(), "params": params.to_dict() if params else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _short(value: Any) -> str:
    """``repr`` cut to a length an error message can carry."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Conversions between a tensor's dtype and float64 go through numpy, on the calling thread, wherever numpy has the
# dtype: torch hands a copy of more than 32768 values to its intra-op threads, which then keep spinning on the cores
# that the cipher workers need (bench codec: with torch's 2 threads a site's decryption into tensors took 0.32 s with
# 2 workers and 0.33 to 0.52 s with 1; with numpy, 0.16 s and 0.25 s).
def _numpy_view(tensor: torch.Tensor) -> np.ndarray | None:
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 or tensor.requires_grad:
        return None
    return tensor.numpy()


def _to_float64(tensor: torch.Tensor, out: np.ndarray) -> None:
    view = _numpy_view(tensor)
    out[:] = view if view is not None else tensor.to("cpu", torch.float64).numpy()


def _from_float64(values: np.ndarray, tensor: torch.Tensor) -> None:
    view = _numpy_view(tensor)
    if view is not None:
        view[:] = values
    else:
        tensor.copy_(torch.from_numpy(np.ascontiguousarray(values)))
