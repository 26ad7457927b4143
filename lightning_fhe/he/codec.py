"""The compact CKKS codec for model updates (protocol v2).

A site's selected tensors arrive here as one flat float64 stream. Pairs of reals become one complex CKKS slot, so
a ciphertext of ring dimension N carries N values; each is encrypted with the secret key at the lowest modulus
level, where SEAL keeps the second polynomial as a 64-byte seed. The site sends the first polynomial, packed to 60
bits a coefficient, and the seed (:mod:`lightning_fhe.he.frames`): 1.875 bytes on the wire per fp32 byte.

The server adds the first polynomials as integers modulo the first prime and keeps the seeds
(:class:`ChunkSum`, pure numpy, no key, no SEAL); a site rebuilds the ciphertext of the sum from it and the
participants' seeds (:class:`~lightning_fhe.he.seeded.CiphertextLayout`), bit for bit SEAL's own sum, and decrypts.
Weighting happens before encryption (each site multiplies its update by its share ``w_i / W`` of the announced
total weight, and rounds it to the fixed-point grid of :mod:`lightning_fhe.he.fixed_point`); the decrypted sum is
rounded back to that grid, which removes the CKKS noise, and divided by the total share of the sites that took part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tenseal.sealapi as sealapi

from lightning_fhe.he import rlwe
from lightning_fhe.he.context import HEContext
from lightning_fhe.he.fixed_point import round_to_grid
from lightning_fhe.he.frames import (
    CiphertextError,
    add_upload_chunk,
    decode_global_chunk,
    encode_global_chunk,
    encode_upload_chunk_into,
    upload_chunk_bytes,
    upload_seed_entry,
)
from lightning_fhe.he.params import CKKSParams
from lightning_fhe.he.seal_io import thread_buffer
from lightning_fhe.he.seeded import CiphertextLayout, SealFormatError

__all__ = ["ChunkSum", "CiphertextError", "HeadroomError", "UpdateCipher", "ValueSource", "as_source", "num_chunks"]


class ValueSource(Protocol):
    """``size`` values to encrypt, read a piece at a time (so a large model is never copied whole)."""

    size: int

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values ``start:stop`` as float64."""
        ...


@dataclass(frozen=True)
class ArraySource:
    values: np.ndarray

    @property
    def size(self) -> int:
        return self.values.size

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.values[start:stop], dtype=np.float64)


def as_source(values: np.ndarray | ValueSource) -> ValueSource:
    if hasattr(values, "read"):
        return values  # type: ignore[return-value]
    return ArraySource(np.asarray(values, dtype=np.float64).ravel())


def check_weight_fraction(weight_fraction: float) -> None:
    if not 0.0 < weight_fraction <= 1.0:
        raise ValueError(
            "weight_fraction must be in (0, 1] (this site's weight over the federation's total), "
            f"got {weight_fraction}"
        )


class HeadroomError(ValueError):
    """An update whose encrypted sum could wrap around the modulus and decrypt to garbage."""


def num_chunks(count: int, params: CKKSParams) -> int:
    """How many ciphertexts carry ``count`` real values."""
    return -(-count // params.values_per_ciphertext)


class UpdateCipher:
    """A site's encryption and decryption of flat updates, one chunk of ``N`` values at a time. Needs the secret key.

    Example::

        >>> import numpy as np
        >>> from lightning_fhe.he import CKKSParams, HEContext
        >>> cipher = UpdateCipher(HEContext.generate(CKKSParams()))
        >>> total = ChunkSum.for_context(cipher.context, 1)
        >>> total.add(0, cipher.encrypt(np.array([0.25, -1.5, 3.0]), weight_fraction=0.5)[0])
        >>> np.round(cipher.decrypt(total.chunks(), count=3, total_weight_fraction=0.5), 6)
        array([ 0.25, -1.5 ,  3.  ])
    """

    def __init__(self, context: HEContext, through_seal: bool = False) -> None:
        """``through_seal`` encrypts and decrypts with SEAL's encoder, encryptor and decryptor even where
        :mod:`~lightning_fhe.he.rlwe` (the same arithmetic, several times faster) was built."""
        self.context = context
        self.params = context.params
        self.layout = CiphertextLayout(context)
        seal_context = context.seal_context
        key = context.secret_key()
        self._encoder = sealapi.CKKSEncoder(seal_context)
        self._encryptor = sealapi.Encryptor(seal_context, key)
        self._seeded = None if through_seal or not rlwe.AVAILABLE else rlwe.SeededCipher(self.layout)
        self._decryptor = sealapi.Decryptor(seal_context, key)
        self._parms_id = seal_context.last_parms_id()

    def check_headroom(self, values: np.ndarray, where: Callable[[int], str] | None = None) -> None:
        """Refuses values whose weighted sum over the sites could overflow the first prime.

        Sites multiply by weight shares that add up to at most 1, so the sum is a convex combination: it cannot
        exceed the largest magnitude any one site sends. Checking each site's own values is therefore enough.
        """
        limit = self.params.max_abs_sum
        # Two passes and no temporary where all is well (NaN fails both comparisons); the site's process makes this
        # check over every value before its first chunk goes, so it is on the upload's path.
        if values.size == 0 or (values.max() < limit and -values.min() < limit):
            return
        where = where or (lambda i: f"value {i}")
        finite = np.isfinite(values)
        if not finite.all():
            i = int(np.argmin(finite))
            raise HeadroomError(f"{where(i)} is {values[i]}: an update must be finite to be encrypted")
        i = int(np.argmax(np.abs(values)))
        if abs(values[i]) >= limit:
            p = self.params
            raise HeadroomError(
                f"{where(i)} is {values[i]:.6g}, beyond the encrypted range |x| < 2^{p.headroom_bits} = {limit:.0f} "
                f"(first prime {p.coeff_mod_bit_sizes[0]} bits, scale_bits {p.scale_bits}); the sum would wrap around "
                f"and decrypt to garbage. Lower scale_bits, or send this tensor unencrypted."
            )

    def iter_prepared(
        self,
        values: np.ndarray | ValueSource,
        weight_fraction: float = 1.0,
        where: Callable[[int], str] | None = None,
        chunks_per_piece: int = 1,
    ) -> Iterator[np.ndarray]:
        """``values * weight_fraction`` on the fixed-point grid, zero-padded to whole chunks, ``chunks_per_piece``
        chunks at a time: a chunk's worth of memory, whatever the update's size.

        ``values`` is an array, or a :class:`ValueSource` that reads them a piece at a time (a model's tensors).
        ``weight_fraction`` is this site's share ``w_i / W`` of the announced total weight, in (0, 1]. Every value
        is checked (finite, within the headroom) before the first piece is yielded.
        """
        check_weight_fraction(weight_fraction)
        pieces = self.iter_checked(values, where, chunks_per_piece)
        return (self.prepare(piece, weight_fraction) for piece in pieces)

    def iter_checked(
        self, values: np.ndarray | ValueSource, where: Callable[[int], str] | None = None, chunks_per_piece: int = 1
    ) -> Iterator[np.ndarray]:
        """The values as they are, ``chunks_per_piece`` chunks at a time, once every one of them was checked (finite,
        within the headroom): nothing of a refused update is encrypted or sent. :meth:`prepare` weights a piece."""
        source = as_source(values)
        where = where or (lambda i: f"value {i}")
        step = chunks_per_piece * self.params.values_per_ciphertext
        pieces = range(0, source.size, step)
        for start in pieces:
            self.check_headroom(source.read(start, min(start + step, source.size)), lambda i, s=start: where(s + i))
        return (source.read(start, min(start + step, source.size)) for start in pieces)

    def prepare(self, piece: np.ndarray, weight_fraction: float, out: np.ndarray | None = None) -> np.ndarray:
        """``piece * weight_fraction`` on the fixed-point grid, zero-padded to whole chunks, into ``out`` (of that
        size; it may begin with ``piece`` itself) or a new array."""
        size = num_chunks(piece.size, self.params) * self.params.values_per_ciphertext
        # empty, not zeros: calloc's fresh pages cost more than the multiply (bench codec's site process)
        out = np.empty(size) if out is None else out
        np.multiply(piece, weight_fraction, out=out[: piece.size])
        out[piece.size :] = 0.0
        return round_to_grid(out, self.params.grid_bits)

    def encrypt_chunk(self, values: np.ndarray) -> bytes:
        """One upload chunk (:mod:`~lightning_fhe.he.frames`) of ``N`` prepared values."""
        frame = bytearray(self.chunk_bytes)
        self.encrypt_chunk_into(values, frame)
        return bytes(frame)

    def encrypt_chunk_into(self, values: np.ndarray, out: bytearray | memoryview) -> None:
        """:meth:`encrypt_chunk` into ``out``, :attr:`chunk_bytes` long (a worker's cell of shared memory)."""
        if self._seeded is not None:
            parts = self._seeded.encrypt(values)
        else:
            plaintext = sealapi.Plaintext()
            # A list converts to SEAL's vector faster than pybind11 walks a numpy array.
            self._encoder.encode(values.view(np.complex128).tolist(), self._parms_id, self.params.scale, plaintext)
            parts = self.layout.split_seeded(thread_buffer().dump(self._encryptor.encrypt_symmetric(plaintext)))
        encode_upload_chunk_into(out, parts.c0, parts.prng, parts.seed)

    @property
    def chunk_bytes(self) -> int:
        """The size of an upload chunk."""
        return upload_chunk_bytes(self.layout.n)

    @property
    def encryptor(self) -> str:
        """Which code encrypts and decrypts: ``"rlwe"`` (:mod:`~lightning_fhe.he.rlwe`) or ``"seal"``."""
        return "seal" if self._seeded is None else "rlwe"

    def iter_encrypt(
        self,
        values: np.ndarray | ValueSource,
        weight_fraction: float = 1.0,
        where: Callable[[int], str] | None = None,
    ) -> Iterator[bytes]:
        """Yields upload chunks of ``values * weight_fraction`` on the fixed-point grid, one per ``N`` values."""
        return (self.encrypt_chunk(piece) for piece in self.iter_prepared(values, weight_fraction, where))

    def encrypt(
        self,
        values: np.ndarray,
        weight_fraction: float = 1.0,
        where: Callable[[int], str] | None = None,
    ) -> list[bytes]:
        return list(self.iter_encrypt(values, weight_fraction, where))

    def decrypt_chunk(self, frame: bytes, participants: int | None = None) -> np.ndarray:
        """The ``N`` raw decoded values of one global chunk (the share-weighted sum, before rounding to the grid).

        Rebuilds the ciphertext of the sum from the summed first polynomial and the participants' seeds (or takes
        the summed second polynomial), then decrypts it.
        """
        chunk = decode_global_chunk(frame, self.layout.n, self.layout.q0, participants)
        if self._seeded is None:
            return self._seal_decrypt(chunk.c0, chunk.c1, list(chunk.seeds))
        try:
            c1 = chunk.c1 if chunk.c1 is not None else self.layout.second_polynomial(list(chunk.seeds))
        except SealFormatError as err:
            raise CiphertextError("format", str(err)) from None
        return self._seeded.decrypt(chunk.c0, c1)

    def _seal_decrypt(self, c0: np.ndarray, c1: np.ndarray | None, seeds: list[tuple[int, bytes]]) -> np.ndarray:
        try:
            if c1 is not None:
                ciphertext = self.layout.load(self.layout.full_bytes(c0, c1))
            else:
                ciphertext = self.layout.rebuild(c0, seeds)
        except SealFormatError as err:
            raise CiphertextError("format", str(err)) from None
        plaintext = sealapi.Plaintext()
        self._decryptor.decrypt(ciphertext, plaintext)
        slots = self._encoder.decode_complex(plaintext)
        return np.fromiter(slots, dtype=np.complex128, count=self.params.slots).view(np.float64)

    def finish(self, decoded: np.ndarray, total_weight_fraction: float) -> np.ndarray:
        """Decoded sums (in place) back on the fixed-point grid, divided by the participants' total share."""
        if not total_weight_fraction > 0:
            raise ValueError(f"total_weight_fraction must be positive, got {total_weight_fraction}")
        round_to_grid(decoded, self.params.grid_bits)
        decoded /= total_weight_fraction
        return decoded

    def decrypt(
        self,
        chunks: Sequence[bytes],
        count: int,
        total_weight_fraction: float = 1.0,
        participants: int | None = None,
    ) -> np.ndarray:
        """Decrypts a sum of updates, rounds it to the fixed-point grid and divides it by ``total_weight_fraction``:
        the same ``count`` values as the plaintext sum of those updates, divided the same way.

        ``total_weight_fraction`` is the summed share of the sites that took part (1.0 when all did).
        """
        expected = num_chunks(count, self.params)
        if len(chunks) != expected:
            raise CiphertextError("index", f"{count} values need {expected} chunks, got {len(chunks)}")
        per_chunk = self.params.values_per_ciphertext
        out = np.empty(expected * per_chunk, dtype=np.float64)
        for i, frame in enumerate(chunks):
            try:
                out[i * per_chunk : (i + 1) * per_chunk] = self.decrypt_chunk(frame, participants)
            except CiphertextError as err:
                raise CiphertextError(err.reason, f"chunk {i}: {err}") from None
        return self.finish(out, total_weight_fraction)[:count]


class ChunkSum:
    """A keyless sum of upload chunks in memory: first polynomials modulo ``q0``, the seeds kept in order.

    The server's arithmetic (its own sum lives on disk, :mod:`lightning_fhe.server.accumulator`); here for tests,
    benchmarks and anyone who sums a few updates. Subtracting a chunk that was added restores the sum bit for bit.
    """

    def __init__(self, n: int, q0: int, num_chunks: int) -> None:
        if num_chunks < 0:
            raise ValueError(f"num_chunks must be >= 0, got {num_chunks}")
        self.n, self.q0 = n, q0
        self._c0 = np.zeros((num_chunks, n), dtype=np.uint64)
        self._seeds: list[list[bytes]] = [[] for _ in range(num_chunks)]

    @classmethod
    def for_context(cls, context: HEContext, num_chunks: int) -> ChunkSum:
        layout = CiphertextLayout(context)
        return cls(layout.n, layout.q0, num_chunks)

    @property
    def num_chunks(self) -> int:
        return len(self._seeds)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_chunks:
            raise CiphertextError("index", f"chunk index {index} is outside 0..{self.num_chunks - 1}")

    def add(self, index: int, frame: bytes) -> None:
        """Adds one upload chunk at ``index``; a bad chunk raises :class:`CiphertextError` and changes nothing."""
        self._check_index(index)
        self._seeds[index].append(add_upload_chunk(self._c0[index], frame, self.n, self.q0))

    def subtract(self, index: int, frame: bytes) -> None:
        """Takes back a chunk that :meth:`add` accepted before."""
        self._check_index(index)
        seed_entry = upload_seed_entry(frame, self.n)
        if seed_entry not in self._seeds[index]:
            raise ValueError(f"chunk {index} was never added, so it cannot be subtracted")
        add_upload_chunk(self._c0[index], frame, self.n, self.q0, subtract=True)
        self._seeds[index].remove(seed_entry)

    def chunks(self, summed: CiphertextLayout | None = None) -> list[bytes]:
        """The global chunks: the seeds, or with ``summed`` (a layout to expand them) the summed second polynomial."""
        missing = [i for i, seeds in enumerate(self._seeds) if not seeds]
        if missing:
            raise ValueError(f"sum is incomplete: chunks {missing[:5]}{'...' if len(missing) > 5 else ''} missing")
        if summed is None:
            return [encode_global_chunk(c0, seeds) for c0, seeds in zip(self._c0, self._seeds)]
        return [
            encode_global_chunk(c0, c1=summed.second_polynomial([(s[0], s[1:]) for s in seeds]))
            for c0, seeds in zip(self._c0, self._seeds)
        ]
