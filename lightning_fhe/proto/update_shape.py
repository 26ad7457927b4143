"""The shape of an update for a round, as both ends must see it: how many ciphertext chunks, how many plaintext
values, and which PlaintextBlock field carries them.

- Round 0 carries the initial model, in plaintext: the encrypted part's values, then the plaintext part's, in one
  stream and no chunks. The server takes it as sent (share 1, off the fixed-point grid).
- Rounds 1.. carry the encrypted part as ``num_chunks`` ciphertext chunks and the plaintext part's values, which the
  server weights by the sender's share.
- Plaintext values travel as ``float32_le`` unless a tensor they belong to is float64 (float32 holds float16 and
  bfloat16 exactly), so an unencrypted fp32 model costs its fp32 size on the wire, not twice that.

The site, the client, the server's admission and its federation all ask :func:`update_shape`, so the rule is
decided here once. Pure: no gRPC, no clock.

Example::

    >>> from lightning_fhe.he.layout import TensorLayout, TensorSpec
    >>> from lightning_fhe.he.params import CKKSParams
    >>> encrypted = TensorLayout((TensorSpec("conv.weight", (20000,), "float32"),))
    >>> plaintext = TensorLayout((TensorSpec("norm.weight", (10,), "float64"),))
    >>> initial = update_shape(0, encrypted, plaintext, CKKSParams())
    >>> initial.num_chunks, initial.plaintext_count, initial.plaintext_field, initial.share(0.25)
    (0, 20010, 'float64_le', 1.0)
    >>> later = update_shape(1, encrypted, plaintext, CKKSParams())
    >>> later.num_chunks, later.plaintext_count, later.plaintext_field, later.share(0.25)
    (3, 10, 'float64_le', 0.25)
    >>> update_shape(1, encrypted, TensorLayout(()), CKKSParams()).plaintext_field  # no float64 tensor travels
    'float32_le'
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lightning_fhe.he import codec
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.he.params import CKKSParams

INITIAL_MODEL_ROUND = 0


@dataclass(frozen=True)
class UpdateShape:
    """What an update (and a global model) for ``round`` holds; build it with :func:`update_shape`.

    Args:
        round: the round number (0: the initial model).
        encrypted_layout: the federation's encrypted part.
        plaintext_layout: the federation's plaintext part.
        num_chunks: ciphertext chunks (0 for round 0, and when nothing is encrypted).
        plaintext_count: plaintext values (round 0: the encrypted and the plaintext part's).
        plaintext_field: the PlaintextBlock field the plaintext values travel in, both ways.
        values_per_chunk: encrypted values per ciphertext chunk.
    """

    round: int
    encrypted_layout: TensorLayout = field(repr=False)
    plaintext_layout: TensorLayout = field(repr=False)
    num_chunks: int
    plaintext_count: int
    plaintext_field: str
    values_per_chunk: int

    @property
    def is_initial_model(self) -> bool:
        """Round 0: the initial model, sent in plaintext by one site (or configured on the server)."""
        return self.round == INITIAL_MODEL_ROUND

    @property
    def weighted(self) -> bool:
        """Whether the server weights each update by its site's share and sums on the fixed-point grid; the
        initial model is taken as sent."""
        return not self.is_initial_model

    @property
    def encrypted_count(self) -> int:
        """Values that travel encrypted (0 for round 0, whose encrypted part travels in plaintext)."""
        return 0 if self.is_initial_model else self.encrypted_layout.numel

    @property
    def plaintext_meaning(self) -> str:
        """What the plaintext values are, in words for a message."""
        if self.is_initial_model:
            return "encrypted and plaintext values of the initial model"
        return "values in the plaintext layout"

    def share(self, site_share: float) -> float:
        """The weight the server gives a site's update: its share ``w_i / W``, or 1 for the initial model."""
        return site_share if self.weighted else 1.0

    def locate(self, index: int) -> str:
        """The tensor (and element) plaintext value ``index`` belongs to, for messages."""
        if self.is_initial_model and index < self.encrypted_layout.numel:
            return self.encrypted_layout.locate(index)
        offset = self.encrypted_layout.numel if self.is_initial_model else 0
        return self.plaintext_layout.locate(index - offset)

    def join(self, encrypted: np.ndarray, plaintext: np.ndarray) -> np.ndarray:
        """The whole model as one flat stream, as round 0 carries it: the encrypted part, then the plaintext part.

        >>> from lightning_fhe.he.layout import TensorSpec
        >>> w, b = TensorSpec("w", (2,), "float32"), TensorSpec("b", (1,), "float32")
        >>> shape = update_shape(0, TensorLayout((w,)), TensorLayout((b,)), CKKSParams())
        >>> values = shape.join(np.array([1.0, 1.0]), np.array([0.0]))
        >>> values
        array([1., 1., 0.])
        >>> shape.split(values)
        (array([1., 1.]), array([0.]))
        """
        return np.concatenate([encrypted, plaintext])

    def split(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The encrypted part's and the plaintext part's values of a flat model (the inverse of :meth:`join`).

        Raises:
            ValueError: ``values`` is not the size of the two layouts together.
        """
        expected = self.encrypted_layout.numel + self.plaintext_layout.numel
        if values.size != expected:
            raise ValueError(f"initial model holds {values.size} values; this site's layout has {expected}")
        return values[: self.encrypted_layout.numel], values[self.encrypted_layout.numel :]


def update_shape(
    round_number: int, encrypted_layout: TensorLayout, plaintext_layout: TensorLayout, params: CKKSParams
) -> UpdateShape:
    """The shape of round ``round_number``'s updates and global model in a federation with these layouts."""
    if round_number == INITIAL_MODEL_ROUND:
        chunks, count = 0, encrypted_layout.numel + plaintext_layout.numel
        travelling = (encrypted_layout, plaintext_layout)  # the encrypted part travels in plaintext too
    else:
        chunks, count = codec.num_chunks(encrypted_layout.numel, params), plaintext_layout.numel
        travelling = (plaintext_layout,)
    wide = any(spec.dtype == "float64" for layout in travelling for spec in layout.specs)
    return UpdateShape(
        round=round_number,
        encrypted_layout=encrypted_layout,
        plaintext_layout=plaintext_layout,
        num_chunks=chunks,
        plaintext_count=count,
        plaintext_field="float64_le" if wide else "float32_le",
        values_per_chunk=params.values_per_ciphertext,
    )
