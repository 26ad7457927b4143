"""The compact CKKS codec for model updates.

A site's selected tensors arrive here as one flat float64 stream. Pairs of reals become one complex CKKS slot, so
a ciphertext of ring dimension N carries N values; each ciphertext is encrypted with the secret key at the lowest
modulus level, where SEAL stores half of it as a 64-byte seed. That is about 2 bytes on the wire per fp32 byte.

The server adds ciphertexts without any key (:class:`CiphertextSum`). Aggregation needs addition only, so the
lowest level, which cannot multiply, loses nothing. Weighting happens before encryption (each site multiplies
its update by its share ``w_i / W`` of the announced total weight, and rounds it to the fixed-point grid of
:mod:`lightning_fhe.he.fixed_point`); the decrypted sum is rounded back to that grid, which removes the CKKS noise,
and divided by the total share of the sites that took part.

Every chunk on the wire is ``crc32 || SEAL bytes``: a CRC-32 of the SEAL bytes, then SEAL's own serialization.
SEAL itself loads a ciphertext with flipped body bytes without complaint, so the checksum is what notices.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tenseal.sealapi as sealapi

from lightning_fhe.he.context import HEContext
from lightning_fhe.he.fixed_point import round_to_grid
from lightning_fhe.he.params import CKKSParams
from lightning_fhe.he.seal_io import thread_buffer

CHECKSUM_BYTES = 4
_SEAL_MAGIC = b"\x5e\xa1"  # SEALHeader.magic 0xA15E, little-endian
_SEAL_HEADER_BYTES = 16


class HeadroomError(ValueError):
    """An update whose encrypted sum could wrap around the modulus and decrypt to garbage."""


class CiphertextError(ValueError):
    """A ciphertext chunk that must not be used. ``reason`` is one of ``REASONS``; the message says what was wrong."""

    REASONS = ("corrupt", "parameters", "level", "scale", "size", "index")

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def num_chunks(count: int, params: CKKSParams) -> int:
    """How many ciphertexts carry ``count`` real values."""
    return -(-count // params.values_per_ciphertext)


def max_chunk_bytes(params: CKKSParams) -> int:
    """Upper bound on one serialized chunk: two polynomials at the lowest level, plus headers and checksum."""
    return 2 * params.poly_modulus_degree * 8 + 1024 + CHECKSUM_BYTES


def _checksum(data: bytes | memoryview) -> bytes:
    # CRC-32 catches accidental corruption at a tenth of a cryptographic hash's cost; TLS guards against tampering.
    return struct.pack("<I", zlib.crc32(data))


def frame(seal_bytes: bytes) -> bytes:
    return _checksum(seal_bytes) + seal_bytes


def load_ciphertext(context: HEContext, blob: bytes) -> sealapi.Ciphertext:
    """Parses and validates one framed chunk: checksum, size, parameters, lowest level, scale, two polynomials.

    Raises :class:`CiphertextError` and changes nothing on failure.
    """
    params = context.params
    if len(blob) > max_chunk_bytes(params):
        raise CiphertextError(
            "size", f"chunk of {len(blob)} bytes exceeds the {max_chunk_bytes(params)} bytes a ciphertext can take"
        )
    if len(blob) < CHECKSUM_BYTES + _SEAL_HEADER_BYTES:
        raise CiphertextError("corrupt", f"chunk of {len(blob)} bytes is too short to hold a ciphertext")
    body = memoryview(blob)[CHECKSUM_BYTES:]
    if _checksum(body) != blob[:CHECKSUM_BYTES]:
        raise CiphertextError("corrupt", "chunk bytes do not match their checksum: corrupted in transit or storage")
    if bytes(body[:2]) != _SEAL_MAGIC:
        raise CiphertextError("corrupt", "chunk is not a SEAL object (bad magic number)")
    (declared,) = struct.unpack_from("<Q", body, 8)
    if declared != len(body):
        raise CiphertextError("corrupt", f"SEAL header declares {declared} bytes but the chunk holds {len(body)}")
    seal_context = context.seal_context
    ciphertext = sealapi.Ciphertext(seal_context)
    try:
        thread_buffer().load(ciphertext, seal_context, bytes(body))
    except (RuntimeError, ValueError) as err:
        raise CiphertextError(
            "parameters",
            f"chunk cannot be read under the federation's CKKS parameters {params.to_dict()}: it was made with "
            f"other parameters or is corrupt (SEAL: {err})",
        ) from None
    if ciphertext.parms_id() != seal_context.last_parms_id():
        level = seal_context.get_context_data(ciphertext.parms_id()).chain_index()
        raise CiphertextError(
            "level", f"chunk is at modulus level {level}; updates must be encrypted at the lowest level (0)"
        )
    if ciphertext.scale != params.scale:
        raise CiphertextError(
            "scale", f"chunk has scale 2^{np.log2(ciphertext.scale):.2f}; the federation uses 2^{params.scale_bits}"
        )
    if ciphertext.size() != 2:
        raise CiphertextError("size", f"chunk has {ciphertext.size()} polynomials; a fresh sum has 2")
    return ciphertext


def dump_ciphertext(ciphertext) -> bytes:
    return frame(thread_buffer().dump(ciphertext))


class UpdateCipher:
    """A site's encryption and decryption of flat updates. Needs the secret key.

    Example::

        >>> import numpy as np
        >>> from lightning_fhe.he import CKKSParams, HEContext
        >>> cipher = UpdateCipher(HEContext.generate(CKKSParams()))
        >>> chunks = cipher.encrypt(np.array([0.25, -1.5, 3.0]), weight_fraction=0.5)
        >>> np.round(cipher.decrypt(chunks, count=3, total_weight_fraction=0.5), 6)
        array([ 0.25, -1.5 ,  3.  ])
    """

    def __init__(self, context: HEContext) -> None:
        self.context = context
        self.params = context.params
        seal_context = context.seal_context
        key = context.secret_key()
        self._encoder = sealapi.CKKSEncoder(seal_context)
        self._encryptor = sealapi.Encryptor(seal_context, key)
        self._decryptor = sealapi.Decryptor(seal_context, key)

    def check_headroom(self, values: np.ndarray, where: Callable[[int], str] | None = None) -> None:
        """Refuses values whose weighted sum over the sites could overflow the first prime.

        Sites multiply by weight shares that add up to at most 1, so the sum is a convex combination: it cannot
        exceed the largest magnitude any one site sends. Checking each site's own values is therefore enough.
        """
        where = where or (lambda i: f"value {i}")
        finite = np.isfinite(values)
        if not finite.all():
            i = int(np.argmin(finite))
            raise HeadroomError(f"{where(i)} is {values[i]}: an update must be finite to be encrypted")
        if values.size == 0:
            return
        i = int(np.argmax(np.abs(values)))
        limit = self.params.max_abs_sum
        if abs(values[i]) >= limit:
            p = self.params
            raise HeadroomError(
                f"{where(i)} is {values[i]:.6g}, beyond the encrypted range |x| < 2^{p.headroom_bits} = {limit:.0f} "
                f"(first prime {p.coeff_mod_bit_sizes[0]} bits, scale_bits {p.scale_bits}); the sum would wrap around "
                f"and decrypt to garbage. Lower scale_bits, or send this tensor unencrypted."
            )

    def iter_encrypt(
        self, values: np.ndarray, weight_fraction: float = 1.0, where: Callable[[int], str] | None = None
    ) -> Iterator[bytes]:
        """Yields framed seeded ciphertexts of ``values * weight_fraction`` on the fixed-point grid, one per ``N``
        values.

        ``weight_fraction`` is this site's share ``w_i / W`` of the announced total weight, in (0, 1].
        """
        if not 0.0 < weight_fraction <= 1.0:
            raise ValueError(
                f"weight_fraction must be in (0, 1] (this site's weight over the federation's total), got {weight_fraction}"
            )
        values = np.asarray(values, dtype=np.float64).ravel()
        self.check_headroom(values, where)
        per_chunk = self.params.values_per_ciphertext
        padded = np.zeros(num_chunks(values.size, self.params) * per_chunk, dtype=np.float64)
        np.multiply(values, weight_fraction, out=padded[: values.size])
        round_to_grid(padded, self.params.grid_bits)
        slots = padded.view(np.complex128)  # (x0, x1), (x2, x3), ... : two reals per complex slot
        parms_id = self.context.seal_context.last_parms_id()
        plaintext, buffer, half = sealapi.Plaintext(), thread_buffer(), per_chunk // 2
        for start in range(0, slots.size, half):
            # A list converts to SEAL's vector faster than pybind11 walks a numpy array.
            self._encoder.encode(slots[start : start + half].tolist(), parms_id, self.params.scale, plaintext)
            yield frame(buffer.dump(self._encryptor.encrypt_symmetric(plaintext)))

    def encrypt(
        self, values: np.ndarray, weight_fraction: float = 1.0, where: Callable[[int], str] | None = None
    ) -> list[bytes]:
        return list(self.iter_encrypt(values, weight_fraction, where))

    def decrypt(self, chunks: Sequence[bytes], count: int, total_weight_fraction: float = 1.0) -> np.ndarray:
        """Decrypts a sum of updates, rounds it to the fixed-point grid and divides it by ``total_weight_fraction``:
        the same ``count`` values as the plaintext sum of those updates, divided the same way.

        ``total_weight_fraction`` is the summed share of the sites that took part (1.0 when all did).
        """
        expected = num_chunks(count, self.params)
        if len(chunks) != expected:
            raise CiphertextError("index", f"{count} values need {expected} chunks, got {len(chunks)}")
        if not total_weight_fraction > 0:
            raise ValueError(f"total_weight_fraction must be positive, got {total_weight_fraction}")
        out = np.empty(expected * self.params.values_per_ciphertext, dtype=np.float64)
        slots = out.view(np.complex128)
        half = self.params.slots
        plaintext = sealapi.Plaintext()
        for i, blob in enumerate(chunks):
            try:
                ciphertext = load_ciphertext(self.context, blob)
            except CiphertextError as err:
                raise CiphertextError(err.reason, f"chunk {i}: {err}") from None
            self._decryptor.decrypt(ciphertext, plaintext)
            slots[i * half : (i + 1) * half] = self._encoder.decode_complex(plaintext)
        result = round_to_grid(out, self.params.grid_bits)[:count]
        result /= total_weight_fraction
        return result


class CiphertextSum:
    """The server's running sum of encrypted updates, chunk by chunk. Holds no key.

    Adding and subtracting ciphertexts is exact modular arithmetic, so :meth:`subtract` of a chunk that was added
    restores the sum bit for bit: how a stream that breaks midway is taken back out.
    """

    def __init__(self, context: HEContext, num_chunks: int) -> None:
        if num_chunks < 0:
            raise ValueError(f"num_chunks must be >= 0, got {num_chunks}")
        self.context = context
        self._evaluator = sealapi.Evaluator(context.seal_context)
        self._sums: list[sealapi.Ciphertext | None] = [None] * num_chunks

    @property
    def num_chunks(self) -> int:
        return len(self._sums)

    def check(self, index: int, blob: bytes) -> sealapi.Ciphertext:
        """Validates a chunk for position ``index`` without touching the sum."""
        if not 0 <= index < len(self._sums):
            raise CiphertextError("index", f"chunk index {index} is outside 0..{len(self._sums) - 1}")
        return load_ciphertext(self.context, blob)

    def add(self, index: int, blob: bytes) -> None:
        """Adds one chunk at ``index``; a bad chunk raises :class:`CiphertextError` and leaves the sum as it was."""
        ciphertext = self.check(index, blob)
        current = self._sums[index]
        if current is None:
            self._sums[index] = ciphertext
        else:
            self._evaluator.add_inplace(current, ciphertext)

    def subtract(self, index: int, blob: bytes) -> None:
        """Takes back a chunk that :meth:`add` accepted before."""
        ciphertext = self.check(index, blob)
        current = self._sums[index]
        if current is None:
            raise ValueError(f"chunk {index} was never added, so it cannot be subtracted")
        self._evaluator.sub_inplace(current, ciphertext)

    def chunks(self) -> list[bytes]:
        """The framed sum, one blob per chunk. Every position must have been added at least once."""
        missing = [i for i, c in enumerate(self._sums) if c is None]
        if missing:
            raise ValueError(f"sum is incomplete: chunks {missing[:5]}{'...' if len(missing) > 5 else ''} missing")
        return [dump_ciphertext(c) for c in self._sums]

    @classmethod
    def from_chunks(cls, context: HEContext, blobs: Sequence[bytes]) -> CiphertextSum:
        """Rebuilds a sum from :meth:`chunks` output, for instance after a server restart."""
        total = cls(context, len(blobs))
        for i, blob in enumerate(blobs):
            total.add(i, blob)
        return total
