"""The bytes of one encrypted chunk under protocol v2, up (a site's ciphertext) and down (the sum), and their checks.

No SEAL and no key: the server parses, checks and adds chunks with numpy (and a small C loop that checks and adds,
:func:`~lightning_fhe.he.modular.add_checked_mod`). A chunk carries ``N``
values (``N/2`` complex slots of two reals). Little-endian throughout; ``P(x)`` is
:func:`~lightning_fhe.he.packing.pack60` of ``N`` coefficients (``15 * N / 2`` bytes, 61,440 for N=8192)::

    upload chunk (a site's seeded ciphertext)        global chunk (the participants' sum)
      u8   format = 2                                  u8   format = 2
      u32  CRC-32 of everything after it               u32  CRC-32 of everything after it
      u8   PRNG type (SEAL: 1 BLAKE2Xb, 2 SHAKE256)    u8   second polynomial: 0 seeds, 1 summed
      64   seed of the second polynomial               u16  K, seeds that follow (0 when summed)
      P(c0) first polynomial                           K x (u8 PRNG type, 64-byte seed), participants' order
                                                       P(sum c1 mod q0), only when summed
                                                       P(sum c0 mod q0)

The leading format byte tells a later format apart; the CRC-32 catches corruption in transit or on the server's
disk (TLS guards against tampering in transit).

Example::

    >>> import numpy as np
    >>> c0 = np.arange(8, dtype=np.uint64)
    >>> frame = encode_upload_chunk(c0, prng=1, seed=bytes(64))
    >>> len(frame) == upload_chunk_bytes(8)
    True
    >>> decode_upload_chunk(frame, n=8, q0=97).c0.tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from lightning_fhe.he.modular import CORRUPT, add_checked_mod, crc32, first_not_below
from lightning_fhe.he.packing import PackingError, pack60, pack60_into, packed_size, unpack60

FORMAT = 2
SEED_BYTES = 64
SEED_ENTRY_BYTES = 1 + SEED_BYTES
PRNG_TYPES = (1, 2)  # SEAL's prng_type: blake2xb, shake256
SEEDS, SUMMED = 0, 1
_UPLOAD_HEAD = 1 + 4 + SEED_ENTRY_BYTES
_GLOBAL_HEAD = 1 + 4 + 1 + 2


class CiphertextError(ValueError):
    """A chunk that must not be used. ``reason`` is one of ``REASONS``; the message says what was wrong."""

    REASONS = ("corrupt", "format", "size", "range", "index")

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # raised in a worker process, re-raised in the site's
        return type(self), (self.reason, str(self))


@dataclass(frozen=True, slots=True)
class UploadChunk:
    """A site's chunk: its first polynomial, and the seed entry (SEAL's PRNG type and the 64-byte seed) that names its
    second."""

    seed_entry: bytes  # as a global chunk lists it
    c0: np.ndarray  # uint64, N coefficients below q0

    @property
    def prng(self) -> int:
        return self.seed_entry[0]

    @property
    def seed(self) -> bytes:
        return self.seed_entry[1:]


@dataclass(frozen=True)
class GlobalChunk:
    c0: np.ndarray  # uint64: the participants' summed first polynomials
    seeds: tuple[tuple[int, bytes], ...]  # (PRNG type, seed) per participant; empty when ``c1`` is given
    c1: np.ndarray | None  # the summed second polynomial, when the server sent it instead of the seeds


def upload_chunk_bytes(n: int) -> int:
    """The exact size of an upload chunk of ring dimension ``n``."""
    return _UPLOAD_HEAD + packed_size(n)


def global_chunk_bytes(n: int, participants: int, summed: bool) -> int:
    """The exact size of a global chunk of ``participants`` sites' sum."""
    if summed:
        return _GLOBAL_HEAD + 2 * packed_size(n)
    return _GLOBAL_HEAD + participants * SEED_ENTRY_BYTES + packed_size(n)


def encode_upload_chunk(c0: np.ndarray, prng: int, seed: bytes) -> bytes:
    frame = bytearray(upload_chunk_bytes(c0.size))
    encode_upload_chunk_into(frame, c0, prng, seed)
    return bytes(frame)


def encode_upload_chunk_into(out: bytearray | memoryview, c0: np.ndarray, prng: int, seed: bytes) -> None:
    """:func:`encode_upload_chunk` into ``out``, exactly :func:`upload_chunk_bytes` long: a site's worker writes its
    chunks straight into shared memory."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed takes {SEED_BYTES} bytes, got {len(seed)}")
    if len(out) != upload_chunk_bytes(c0.size):
        raise ValueError(f"an upload chunk of N={c0.size} takes {upload_chunk_bytes(c0.size)} bytes, not {len(out)}")
    frame = memoryview(out)
    pack60_into(frame[_UPLOAD_HEAD:], c0)
    frame[5] = prng
    frame[6:_UPLOAD_HEAD] = seed
    struct.pack_into("<BI", frame, 0, FORMAT, crc32(frame[5:]))


def decode_upload_chunk(frame: bytes, n: int, q0: int) -> UploadChunk:
    """Parses and checks an upload chunk: size, format, checksum, PRNG type, every coefficient below ``q0``."""
    _check_upload_size(frame, n)
    body = _unframed(frame)
    if body[0] not in PRNG_TYPES:
        raise _wrong_prng(body[0])
    return UploadChunk(bytes(body[:SEED_ENTRY_BYTES]), _coefficients(body[SEED_ENTRY_BYTES:], n, q0))


def upload_seed_entry(frame: bytes, n: int) -> bytes:
    """An upload chunk's seed entry (PRNG type and seed), its size checked, nothing else: the server keeps it
    beside the chunk before :func:`add_upload_chunk` checks the rest."""
    _check_upload_size(frame, n)
    return bytes(frame[_UPLOAD_HEAD - SEED_ENTRY_BYTES : _UPLOAD_HEAD])


def add_upload_chunk(total: np.ndarray, frame: bytes, n: int, q0: int, subtract: bool = False) -> bytes:
    """``total = (total +/- c0) mod q0`` in place, ``c0`` the first polynomial of the upload chunk ``frame``: the
    server's addition. Returns the chunk's seed entry.

    The chunk is checked as :func:`decode_upload_chunk` checks it (size, format, checksum, PRNG type, every
    coefficient below ``q0``) in the same pass that adds it (:func:`~lightning_fhe.he.modular.add_checked_mod`); a
    bad chunk raises :class:`CiphertextError` and leaves ``total`` as it was.
    """
    _check_upload_size(frame, n)
    version, checksum = struct.unpack_from("<BI", frame)
    if version != FORMAT:
        raise _wrong_format(version)
    body = memoryview(frame)[5:]
    if body[0] not in PRNG_TYPES:
        raise _corrupt() if crc32(body) != checksum else _wrong_prng(body[0])
    bad = add_checked_mod(total, body, SEED_ENTRY_BYTES, checksum, q0, subtract)
    if bad == CORRUPT:
        raise _corrupt()
    if bad is not None:
        at = SEED_ENTRY_BYTES + bad // 2 * 15
        raise _out_of_range(bad, int(unpack60(body[at : at + 15], 2)[bad % 2]), q0)
    return bytes(body[:SEED_ENTRY_BYTES])


def encode_global_chunk(
    c0: np.ndarray, seeds: list[bytes] | tuple[bytes, ...] = (), c1: np.ndarray | None = None
) -> bytes:
    """A global chunk: ``seeds`` are the participants' 65-byte seed entries; or ``c1``, their summed second
    polynomial, instead."""
    if c1 is not None:
        if seeds:
            raise ValueError("a global chunk carries the seeds or the summed second polynomial, not both")
        return _framed(struct.pack("<BH", SUMMED, 0) + pack60(c1) + pack60(c0))
    if any(len(s) != SEED_ENTRY_BYTES for s in seeds):
        raise ValueError(f"each seed entry takes {SEED_ENTRY_BYTES} bytes (PRNG type and seed)")
    return _framed(struct.pack("<BH", SEEDS, len(seeds)) + b"".join(seeds) + pack60(c0))


def decode_global_chunk(frame: bytes, n: int, q0: int, participants: int | None = None) -> GlobalChunk:
    """Parses and checks a global chunk of ``participants`` sites' sum (None: as many as it lists)."""
    if len(frame) < _GLOBAL_HEAD:
        raise CiphertextError("size", f"global chunk of {len(frame)} bytes is too short")
    body = _unframed(frame)
    kind, count = struct.unpack_from("<BH", body)
    participants = count if participants is None else participants
    if kind not in (SEEDS, SUMMED):
        raise CiphertextError("format", f"global chunk names second-polynomial kind {kind}; known: 0 seeds, 1 summed")
    expected = global_chunk_bytes(n, participants, kind == SUMMED)
    if len(frame) != expected or (kind == SEEDS and count != participants):
        raise CiphertextError(
            "size",
            f"global chunk of {len(frame)} bytes with {count} seeds; the sum of {participants} participants takes "
            f"{expected} bytes",
        )
    rest = body[3:]
    if kind == SUMMED:
        size = packed_size(n)
        return GlobalChunk(_coefficients(rest[size:], n, q0), (), _coefficients(rest[:size], n, q0))
    seeds = []
    for i in range(count):
        entry = rest[i * SEED_ENTRY_BYTES : (i + 1) * SEED_ENTRY_BYTES]
        if entry[0] not in PRNG_TYPES:
            raise CiphertextError("format", f"seed {i} names PRNG type {entry[0]}; SEAL's are {PRNG_TYPES}")
        seeds.append((entry[0], bytes(entry[1:])))
    return GlobalChunk(_coefficients(rest[count * SEED_ENTRY_BYTES :], n, q0), tuple(seeds), None)


def _framed(body: bytes) -> bytes:
    return struct.pack("<BI", FORMAT, crc32(body)) + body


def _check_upload_size(frame: bytes, n: int) -> None:
    expected = upload_chunk_bytes(n)
    if len(frame) != expected:
        raise CiphertextError("size", f"chunk of {len(frame)} bytes; an upload chunk of N={n} takes {expected}")


def _unframed(frame: bytes) -> memoryview:
    version, checksum = struct.unpack_from("<BI", frame)
    if version != FORMAT:
        raise _wrong_format(version)
    body = memoryview(frame)[5:]
    if crc32(body) != checksum:
        raise _corrupt()
    return body


def _wrong_format(version: int) -> CiphertextError:
    return CiphertextError("format", f"chunk format {version}; this version reads format {FORMAT}")


def _corrupt() -> CiphertextError:
    return CiphertextError("corrupt", "chunk bytes do not match their checksum: corrupted in transit or storage")


def _wrong_prng(prng: int) -> CiphertextError:
    return CiphertextError("format", f"chunk names PRNG type {prng}; SEAL's are {PRNG_TYPES}")


def _coefficients(data: memoryview, n: int, q0: int) -> np.ndarray:
    try:
        values = unpack60(data, n)
    except PackingError as err:
        raise CiphertextError("size", str(err)) from None
    bad = first_not_below(values, q0)
    if bad is not None:
        raise _out_of_range(bad, int(values[bad]), q0)
    return values


def _out_of_range(index: int, value: int, q0: int) -> CiphertextError:
    return CiphertextError("range", f"coefficient {index} is {value}, not below the first prime {q0}: not a ciphertext")
