"""What the aggregator keeps in ``state_dir``, so a server killed at any moment resumes where it stopped.

Files::

    federation.json     the members, their weights and W, the layouts, the HE fingerprint, the closed-round counter
    round-0003.agg      round 3's aggregate: the encrypted sum, the plaintext average, total_share, participants

Every file is written to a temporary name in the same folder, flushed to disk (fsync), then renamed over its final
name, and the folder is fsynced: a reader sees the old file or the new one, never half of one. A round's
aggregate is renamed into place before anyone may download it, and that rename is the moment the round counts as
closed: ``last_closed_round`` is the highest aggregate on disk, whatever ``federation.json`` says.

Aggregate file format (little-endian)::

    b"LFHEAGG1"                       magic and format version
    u32 n, n bytes                    header, UTF-8 JSON: round, total_share, participants, num_chunks,
                                      plaintext_count, plaintext_crc32
    num_chunks x (u32 n, n bytes)     the encrypted sum's chunks (each carries its own CRC-32)
    plaintext_count x f64             the plaintext weighted average
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lightning_fhe.server.accumulator import Aggregate
from lightning_fhe.server.membership import Membership

FEDERATION_FILE = "federation.json"
STATE_FORMAT = 1
_MAGIC = b"LFHEAGG1"
_AGGREGATE = re.compile(r"round-(\d{4,})\.agg")
_TMP_PREFIX = ".tmp-"


class StateError(RuntimeError):
    """``state_dir`` holds something this server cannot resume from; the message says what and where."""


@dataclass(frozen=True)
class FederationRecord:
    """``federation.json``: the fixed facts of a formed federation and how far it got."""

    project: str
    he_fingerprint: str
    params: dict[str, Any]
    membership: Membership
    rounds: int
    last_closed_round: int  # -1: not even round 0 (the initial model) closed yet

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "project": self.project,
            "he_fingerprint": self.he_fingerprint,
            "params": self.params,
            **self.membership.to_dict(),
            "rounds": self.rounds,
            "last_closed_round": self.last_closed_round,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederationRecord:
        return cls(
            project=str(data["project"]),
            he_fingerprint=str(data["he_fingerprint"]),
            params=dict(data["params"]),
            membership=Membership.from_dict(data),
            rounds=int(data["rounds"]),
            last_closed_round=int(data["last_closed_round"]),
        )


@dataclass(frozen=True)
class AggregateHeader:
    round: int
    total_share: float
    participants: tuple[str, ...]
    num_chunks: int
    plaintext_count: int
    plaintext_crc32: int


class AggregateReader:
    """Reads an aggregate file lazily: the header at once, chunks and plaintext blocks as they are streamed.

    Serving 16 downloads at once must not load 16 copies of the model, so nothing beyond one block is held.
    An open file stays readable after pruning unlinks it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb")
        try:
            if self._file.read(len(_MAGIC)) != _MAGIC:
                raise StateError(f"{path}: not an aggregate file (bad magic number)")
            data = json.loads(self._read_sized().decode())
            self.header = AggregateHeader(
                round=int(data["round"]),
                total_share=float(data["total_share"]),
                participants=tuple(data["participants"]),
                num_chunks=int(data["num_chunks"]),
                plaintext_count=int(data["plaintext_count"]),
                plaintext_crc32=int(data["plaintext_crc32"]),
            )
        except (ValueError, KeyError, TypeError, struct.error) as err:
            self._file.close()
            raise StateError(f"{path}: unreadable aggregate header ({err})") from None
        except BaseException:
            self._file.close()
            raise

    def _read_sized(self) -> bytes:
        raw = self._file.read(4)
        (size,) = struct.unpack("<I", raw)
        data = self._file.read(size)
        if len(data) != size:
            raise StateError(f"{self.path}: truncated (a record of {size} bytes holds {len(data)})")
        return data

    def iter_chunks(self) -> Iterator[bytes]:
        """The encrypted chunks in order; call once, before :meth:`iter_plaintext`."""
        for _ in range(self.header.num_chunks):
            yield self._read_sized()

    def iter_plaintext(self, block_values: int) -> Iterator[bytes]:
        """The plaintext values as float64 little-endian bytes, ``block_values`` at a time, checked against the CRC."""
        remaining, crc = self.header.plaintext_count, 0
        while remaining:
            n = min(block_values, remaining)
            data = self._file.read(8 * n)
            if len(data) != 8 * n:
                raise StateError(f"{self.path}: truncated plaintext")
            crc = zlib.crc32(data, crc)
            remaining -= n
            if not remaining and crc != self.header.plaintext_crc32:
                raise StateError(f"{self.path}: plaintext does not match its checksum; the file is corrupt")
            yield data

    def read(self) -> Aggregate:
        """The whole aggregate in memory (tests, checks at startup)."""
        chunks = list(self.iter_chunks())
        plaintext = np.frombuffer(b"".join(self.iter_plaintext(1 << 20)), dtype="<f8").astype(np.float64)
        if self._file.read(1):
            raise StateError(f"{self.path}: trailing bytes after the plaintext")
        h = self.header
        return Aggregate(h.round, chunks, plaintext, h.total_share, h.participants)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AggregateReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StateStore:
    """The ``state_dir`` folder: atomic writes of the federation record and of each closed round's aggregate."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def prepare(self) -> None:
        """Creates the folder and removes temporary files a killed server left behind (never complete files)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise StateError(f"state_dir {self.root}: cannot create it ({err.strerror})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StateError(f"state_dir {self.root}: not writable")
        for leftover in self.root.glob(f"{_TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)

    # -- federation record ---------------------------------------------------------------------------------------

    def load_federation(self) -> FederationRecord | None:
        path = self.root / FEDERATION_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != STATE_FORMAT:
                raise StateError(f"{path}: format {data.get('format')!r}, this server reads {STATE_FORMAT}")
            return FederationRecord.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StateError(f"{path}: cannot resume from it ({err}); move state_dir aside to start afresh") from None

    def save_federation(self, record: FederationRecord) -> None:
        self._write_atomically(FEDERATION_FILE, [json.dumps(record.to_dict(), indent=1).encode() + b"\n"])

    # -- aggregates ------------------------------------------------------------------------------------------------

    def aggregate_path(self, round_number: int) -> Path:
        return self.root / f"round-{round_number:04d}.agg"

    def stored_rounds(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _AGGREGATE.fullmatch(p.name)))

    def last_closed_round(self) -> int:
        rounds = self.stored_rounds()
        return rounds[-1] if rounds else -1

    def write_aggregate(self, aggregate: Aggregate) -> int:
        """Writes the aggregate atomically; returns its size in bytes."""
        plaintext = np.ascontiguousarray(aggregate.plaintext, dtype="<f8").tobytes()
        header = {
            "round": aggregate.round,
            "total_share": aggregate.total_share,
            "participants": list(aggregate.participants),
            "num_chunks": len(aggregate.encrypted_chunks),
            "plaintext_count": len(plaintext) // 8,
            "plaintext_crc32": zlib.crc32(plaintext),
        }
        header_bytes = json.dumps(header).encode()

        def parts() -> Iterator[bytes]:
            yield _MAGIC
            yield struct.pack("<I", len(header_bytes)) + header_bytes
            for chunk in aggregate.encrypted_chunks:
                yield struct.pack("<I", len(chunk))
                yield chunk
            yield plaintext

        return self._write_atomically(self.aggregate_path(aggregate.round).name, parts())

    def open_aggregate(self, round_number: int) -> AggregateReader:
        return AggregateReader(self.aggregate_path(round_number))

    def prune(self, keep: int) -> list[int]:
        """Deletes all but the ``keep`` most recent aggregates (0 keeps all); returns the rounds deleted."""
        rounds = self.stored_rounds()
        doomed = rounds[:-keep] if keep > 0 else []
        for r in doomed:
            self.aggregate_path(r).unlink(missing_ok=True)
        return doomed

    # -- atomic writes ---------------------------------------------------------------------------------------------

    def _write_atomically(self, name: str, parts) -> int:
        final = self.root / name
        tmp = self.root / f"{_TMP_PREFIX}{name}.{os.getpid()}"
        size = 0
        try:
            with open(tmp, "wb") as f:
                for part in parts:
                    f.write(part)
                    size += len(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
        return size


def _fsync_dir(path: Path) -> None:
    """Makes a rename durable: the new directory entry is on disk once this returns."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
