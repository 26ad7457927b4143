"""SEAL's ciphertexts at the lowest level, taken apart into numbers and put back together.

A ciphertext made with the secret key is ``(c0, a)`` with ``c0 = -a*s + m + e`` and ``a`` expanded from a public
64-byte seed by SEAL's PRNG; SEAL serializes it as ``c0`` plus the seed. A sum of such ciphertexts is
``(sum c0_i, sum a_i)``: the first polynomials add as integers modulo the first prime ``q0``, and the second one is
rebuilt by anyone who has the seeds, bit for bit as SEAL would sum it. So a site uploads ``c0`` and its seed, the
server adds integers, and a site rebuilds the ciphertext of the sum to decrypt it (protocol v2, docs/protocol.md).

SEAL 4's serialization (little-endian; every object starts with a 16-byte header: magic ``0xA15E``, header size,
version, compression mode, reserved, total size), as a ciphertext at the lowest level holds it::

    73 bytes   parms_id (4 x u64), is_ntt_form (u8), size (u64), N (u64), coeff_modulus_size (u64), scale (f64),
               correction factor (u64)
    DynArray   16-byte header, u64 count, count x u64: c0 (seeded, count = N) or c0 || c1 (count = 2N)
    PRNG info  seeded only: 16-byte header, u8 PRNG type, 64-byte seed

The body after the first header may be compressed (zstd or zlib); everything this module writes is not, so SEAL
loads it without decompressing.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as sealapi
import zstandard

from lightning_fhe.he.context import HEContext
from lightning_fhe.he.seal_io import thread_buffer

try:
    from lightning_fhe.he import _rlwe
except ImportError:  # built without a C compiler: SEAL expands every seed
    _rlwe = None

SEED_BYTES = 64
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compression, reserved, total size
_MAGIC = 0xA15E
_META = struct.Struct("<4QB3QdQ")
_COUNT = struct.Struct("<Q")
_NONE, _ZLIB, _ZSTD = 0, 1, 2
BLAKE2XB = 1  # SEAL's prng_type of a BLAKE2Xb seed (2: SHAKE256)
_VERSION = (sealapi.Serialization.SEALHeader().version_major, sealapi.Serialization.SEALHeader().version_minor)
_U64 = np.dtype("<u8")


class SealFormatError(ValueError):
    """Bytes that are not a ciphertext of this federation at the lowest level; the message says what differs."""


@dataclass(frozen=True)
class SeededParts:
    """What a seeded ciphertext consists of: its first polynomial and the seed of its second."""

    c0: np.ndarray  # uint64, N coefficients below q0, in SEAL's NTT form
    prng: int  # SEAL's prng_type of the seed (1: BLAKE2Xb, 2: SHAKE256)
    seed: bytes  # 64 bytes


class CiphertextLayout:
    """Splits and builds SEAL ciphertexts of one context at its lowest level, where a ciphertext holds one prime.

    Needs no key: the server uses it to expand seeds when it sends the summed second polynomial.

    Example::

        >>> from lightning_fhe.he import CKKSParams, HEContext
        >>> layout = CiphertextLayout(HEContext.generate(CKKSParams()))
        >>> layout.q0.bit_length(), layout.n
        (60, 8192)
    """

    def __init__(self, context: HEContext) -> None:
        self.context = context
        seal_context = context.seal_context
        data = seal_context.last_context_data()
        moduli = data.parms().coeff_modulus()
        if len(moduli) != 1:
            raise ValueError(f"the lowest level holds {len(moduli)} primes; protocol v2 needs exactly one")
        self.q0: int = int(moduli[0].value())
        self.n: int = context.params.poly_modulus_degree
        parms_id = [int(x) for x in seal_context.last_parms_id()]
        self._meta = _META.pack(*parms_id, 1, 2, self.n, 1, context.params.scale, 1)
        self._evaluator = sealapi.Evaluator(seal_context)

    # -- taking apart ------------------------------------------------------------------------------------------------

    def split_seeded(self, blob: bytes) -> SeededParts:
        """The parts of a seeded ciphertext as SEAL saved it (any compression). Raises :class:`SealFormatError`."""
        body = _body(blob)
        n = self.n
        array_bytes = _HEADER.size + _COUNT.size + 8 * n
        expected = _META.size + array_bytes + _HEADER.size + 1 + SEED_BYTES
        if len(body) != expected:
            raise SealFormatError(
                f"a seeded ciphertext of N={n} at the lowest level takes {expected} bytes, this one {len(body)}"
            )
        self._check_meta(body)
        (count,) = _COUNT.unpack_from(body, _META.size + _HEADER.size)
        if count != n:
            raise SealFormatError(f"the ciphertext holds {count} coefficients; a seeded one at the lowest level {n}")
        c0 = np.frombuffer(body, dtype=_U64, count=n, offset=_META.size + _HEADER.size + _COUNT.size)
        c0 = c0.astype(np.uint64, copy=False)
        info = _META.size + array_bytes + _HEADER.size
        return SeededParts(c0, body[info], bytes(body[info + 1 : info + 1 + SEED_BYTES]))

    def split_full(self, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        """``(c0, c1)`` of a ciphertext SEAL saved in full (any compression)."""
        body = _body(blob)
        n = self.n
        expected = _META.size + _HEADER.size + _COUNT.size + 16 * n
        if len(body) != expected:
            raise SealFormatError(
                f"a ciphertext of N={n} at the lowest level takes {expected} bytes, this one {len(body)}"
            )
        self._check_meta(body)
        both = np.frombuffer(body, dtype=_U64, count=2 * n, offset=_META.size + _HEADER.size + _COUNT.size)
        return both[:n].astype(np.uint64), both[n:].astype(np.uint64)

    def _check_meta(self, body: bytes) -> None:
        meta = body[: _META.size]
        if meta != self._meta:
            got = _META.unpack(meta)
            raise SealFormatError(
                "the ciphertext is not at this federation's lowest level with its scale "
                f"(size {got[5]}, N {got[6]}, primes {got[7]}, scale 2^{np.log2(got[8]):.2f}, NTT form {got[4]})"
            )

    # -- putting together ------------------------------------------------------------------------------------------

    def seeded_bytes(self, c0: np.ndarray, prng: int, seed: bytes) -> bytes:
        """SEAL's uncompressed serialization of the seeded ciphertext ``(c0, PRG(seed))``."""
        if len(seed) != SEED_BYTES:
            raise SealFormatError(f"a seed takes {SEED_BYTES} bytes, got {len(seed)}")
        info = _seal_header(_HEADER.size + 1 + SEED_BYTES) + bytes([prng]) + seed
        return self._blob(c0, info)

    def full_bytes(self, c0: np.ndarray, c1: np.ndarray) -> bytes:
        """SEAL's uncompressed serialization of the ciphertext ``(c0, c1)``."""
        return self._blob(np.concatenate([c0, c1]), b"")

    def _blob(self, coefficients: np.ndarray, tail: bytes) -> bytes:
        array = coefficients.astype(_U64, copy=False).tobytes()
        body = (
            self._meta
            + _seal_header(_HEADER.size + _COUNT.size + len(array))
            + _COUNT.pack(coefficients.size)
            + array
            + tail
        )
        return _seal_header(_HEADER.size + len(body)) + body

    def load(self, blob: bytes) -> sealapi.Ciphertext:
        ciphertext = sealapi.Ciphertext(self.context.seal_context)
        try:
            thread_buffer().load(ciphertext, self.context.seal_context, blob)
        except (RuntimeError, ValueError) as err:
            raise SealFormatError(f"SEAL refused the ciphertext: {err}") from None
        return ciphertext

    def rebuild(self, c0: np.ndarray, seeds: list[tuple[int, bytes]]) -> sealapi.Ciphertext:
        """The ciphertext ``(c0, sum of PRG(seed))``: a sum of seeded ciphertexts from its first polynomials' sum and
        the seeds, equal bit for bit to SEAL's own sum of them."""
        if not seeds:
            raise SealFormatError("a sum of ciphertexts needs at least one seed")
        (prng, seed), rest = seeds[0], seeds[1:]
        total = self.load(self.seeded_bytes(c0, prng, seed))
        zero = np.zeros(self.n, dtype=np.uint64)
        for prng, seed in rest:
            self._evaluator.add_inplace(total, self.load(self.seeded_bytes(zero, prng, seed)))
        return total

    def second_polynomial(self, seeds: list[tuple[int, bytes]]) -> np.ndarray:
        """``sum of PRG(seed) mod q0`` as numbers: the second polynomial of the sum of the ciphertexts with these
        seeds, for a site that decrypts the sum or a server that sends it summed.

        BLAKE2Xb seeds are expanded by ``_rlwe.c`` where it was built (SEAL's expansion bit for bit, about five times
        faster: tests/test_rlwe.py), any others by SEAL.
        """
        if not seeds:
            raise SealFormatError("a sum of ciphertexts needs at least one seed")
        if _rlwe is not None and all(prng == BLAKE2XB for prng, _ in seeds):
            total = np.empty(self.n, dtype=np.uint64)
            _rlwe.uniform_sum(total, b"".join(seed for _, seed in seeds), self.q0)
            return total
        rebuilt = self.rebuild(np.zeros(self.n, dtype=np.uint64), seeds)
        return self.split_full(thread_buffer().dump(rebuilt))[1]


def _seal_header(total: int, compression: int = _NONE) -> bytes:
    return _HEADER.pack(_MAGIC, _HEADER.size, *_VERSION, compression, 0, total)


_local = threading.local()


def _zstd() -> zstandard.ZstdDecompressor:
    """This thread's decompressor: making one costs five times what decompressing a ciphertext does."""
    decompressor = getattr(_local, "zstd", None)
    if decompressor is None:
        decompressor = _local.zstd = zstandard.ZstdDecompressor()
    return decompressor


def _body(blob: bytes) -> bytes:
    if len(blob) < _HEADER.size:
        raise SealFormatError(f"{len(blob)} bytes are too few for a SEAL object")
    magic, header_size, _, _, compression, _, total = _HEADER.unpack_from(blob)
    if magic != _MAGIC or header_size != _HEADER.size:
        raise SealFormatError("not a SEAL object (bad magic number)")
    if total != len(blob):
        raise SealFormatError(f"the SEAL header declares {total} bytes but the object holds {len(blob)}")
    payload = blob[_HEADER.size :]
    limit = 1 << 24  # far above a ciphertext of N=32768 at one prime; a decompression bomb stops here
    try:
        if compression == _NONE:
            return payload
        if compression == _ZSTD:
            return _zstd().decompress(payload, max_output_size=limit)
        if compression == _ZLIB:
            inflater = zlib.decompressobj()
            out = inflater.decompress(payload, limit)
            if inflater.unconsumed_tail:
                raise SealFormatError("the compressed SEAL object is larger than any ciphertext")
            return out
    except (zstandard.ZstdError, zlib.error) as err:
        raise SealFormatError(f"the SEAL object does not decompress ({err})") from None
    raise SealFormatError(f"unknown SEAL compression mode {compression}")
