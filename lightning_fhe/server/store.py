"""What the aggregator keeps in ``state_dir``, so a server killed at any moment resumes where it stopped.

Files::

    federation.json     the members, their weights and W, the layouts, the HE fingerprint, the closed-round counter
    round-0003.agg      round 3's aggregate: the global chunks, the plaintext average, total_share, participants
    sealed_keys.json    he.key = sites: the CKKS key's sealed copies, one per member but its maker (ciphertexts the
                        server cannot open), so that a restarted server still hands them out

Every file is written to a temporary name in the same folder, flushed to disk (fsync), then renamed over its final
name, and the folder is fsynced: a reader sees the old file or the new one, never half of one. A round's
aggregate is renamed into place before anyone may download it, and that rename is the moment the round counts as
closed: ``last_closed_round`` is the highest aggregate on disk, whatever ``federation.json`` says.

Aggregate file format (little-endian)::

    b"LFHEAGG3"                       magic and format version
    u32 n, n bytes                    header, UTF-8 JSON: round, total_share, participants, num_chunks,
                                      plaintext_count, body_sha256
    32 bytes                          SHA-256 of the header's n bytes
    num_chunks x (u32 n, n bytes)     the global chunks, as downloads send them (protocol v2, each with its CRC-32)
    plaintext_count x f64             the plaintext weighted average

Every state file carries a SHA-256 checksum, because an edited ``total_share`` or member weight would otherwise be
served as a silently wrong model: ``federation.json`` holds one over the canonical JSON of its other fields, an
aggregate one over its header (checked when the file is opened) and one over its body (checked as the last block is
read, before it is sent). Format 3 (protocol v2's chunks) reads no older state. ``sealed_keys.json`` holds one over
its canonical JSON as well (its copies are also sealed: a recipient detects any change to its own).

The folder is kept private (0700; a folder of someone else's is refused) and every file is written 0600: the
aggregates hold plaintext averages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from lightning_fhe.proto.sealed_keys import SealedKeyShare
from lightning_fhe.server.accumulator import Aggregate
from lightning_fhe.server.membership import Membership

FEDERATION_FILE = "federation.json"
SEALED_KEYS_FILE = "sealed_keys.json"
SEALED_KEYS_FORMAT = 1
STATE_FORMAT = 3
_MAGIC = b"LFHEAGG3"
_AGGREGATE = re.compile(r"round-(\d{4,})\.agg")
_TMP_PREFIX = ".tmp-"
T = TypeVar("T")


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
    instance: str = ""  # random, drawn when this state began: binds the sites' masks to this federation alone

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "project": self.project,
            "he_fingerprint": self.he_fingerprint,
            "params": self.params,
            **self.membership.to_dict(),
            "rounds": self.rounds,
            "last_closed_round": self.last_closed_round,
            "instance": self.instance,
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
            instance=str(data.get("instance", "")),
        )


@dataclass(frozen=True)
class AggregateHeader:
    round: int
    total_share: float
    participants: tuple[str, ...]
    num_chunks: int
    plaintext_count: int
    body_sha256: str


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
            raw = self._read_sized()
            if hashlib.sha256(raw).digest() != self._file.read(32):
                raise StateError(f"{path}: the header does not match its checksum; the file was altered or is corrupt")
            data = json.loads(raw.decode())
            self.header = AggregateHeader(
                round=int(data["round"]),
                total_share=float(data["total_share"]),
                participants=tuple(data["participants"]),
                num_chunks=int(data["num_chunks"]),
                plaintext_count=int(data["plaintext_count"]),
                body_sha256=str(data["body_sha256"]),
            )
            self._body = hashlib.sha256()
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
            blob = self._read_sized()
            self._body.update(struct.pack("<I", len(blob)))
            self._body.update(blob)
            yield blob
        if not self.header.plaintext_count:
            self._check_body()

    def iter_plaintext(self, block_values: int) -> Iterator[bytes]:
        """The plaintext values as float64 little-endian bytes, ``block_values`` at a time; the body's checksum is
        checked before the last block is yielded, so a damaged file is never served whole."""
        remaining = self.header.plaintext_count
        while remaining:
            n = min(block_values, remaining)
            data = self._file.read(8 * n)
            if len(data) != 8 * n:
                raise StateError(f"{self.path}: truncated plaintext")
            self._body.update(data)
            remaining -= n
            if not remaining:
                self._check_body()
            yield data

    def _check_body(self) -> None:
        if self._body.hexdigest() != self.header.body_sha256:
            raise StateError(f"{self.path}: the chunks and plaintext do not match their checksum; the file is corrupt")

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
        info = self.root.stat()
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise StateError(
                f"state_dir {self.root}: owned by uid {info.st_uid}, not by this server's user ({os.getuid()}); "
                "aggregates hold plaintext averages, so the folder must be the server's own"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            try:
                self.root.chmod(0o700)  # a pre-existing folder may be readable by others
            except OSError as err:
                raise StateError(f"state_dir {self.root}: cannot make it private (0700): {err.strerror}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StateError(f"state_dir {self.root}: not writable")
        for leftover in self.root.glob(f"{_TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)

    # -- federation record ---------------------------------------------------------------------------------------

    def load_federation(self) -> FederationRecord | None:
        return self._load_checksummed(
            FEDERATION_FILE,
            STATE_FORMAT,
            FederationRecord.from_dict,
            restore="restore it, or move state_dir aside to start afresh",
            afresh="; move state_dir aside to start afresh",
        )

    def save_federation(self, record: FederationRecord) -> None:
        self._save_checksummed(FEDERATION_FILE, record.to_dict())

    # -- sealed keys (he.key = sites) ------------------------------------------------------------------------------

    def load_sealed_keys(self) -> SealedKeyShare | None:
        return self._load_checksummed(
            SEALED_KEYS_FILE,
            SEALED_KEYS_FORMAT,
            SealedKeyShare.from_dict,
            restore="restore it: without it the sites that have not fetched the CKKS key yet cannot get it",
        )

    def save_sealed_keys(self, share: SealedKeyShare) -> None:
        self._save_checksummed(SEALED_KEYS_FILE, {"format": SEALED_KEYS_FORMAT, **share.to_dict()})

    # -- checksummed JSON files ------------------------------------------------------------------------------------

    def _load_checksummed(
        self, name: str, expected_format: int, parse: Callable[[dict[str, Any]], T], restore: str, afresh: str = ""
    ) -> T | None:
        """The file's parsed content, or None when there is none; StateError when it is of another format, fails
        its checksum or does not parse. ``restore`` says what to do about a failed checksum, ``afresh`` is added to
        the other errors."""
        path = self.root / name
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            if data.get("format") != expected_format:
                raise StateError(f"{path}: format {data.get('format')!r}, this server reads {expected_format}{afresh}")
            checksum = data.pop("sha256", None)
            if checksum != _canonical_sha256(data):
                raise StateError(f"{path}: does not match its checksum; it was edited or is corrupt ({restore})")
            return parse(data)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StateError(f"{path}: cannot resume from it ({err}){afresh}") from None

    def _save_checksummed(self, name: str, data: dict[str, Any]) -> None:
        data["sha256"] = _canonical_sha256(data)
        self._write_atomically(name, [json.dumps(data, indent=1).encode() + b"\n"])

    # -- aggregates ------------------------------------------------------------------------------------------------

    def aggregate_path(self, round_number: int) -> Path:
        return self.root / f"round-{round_number:04d}.agg"

    def stored_rounds(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _AGGREGATE.fullmatch(p.name)))

    def last_closed_round(self) -> int:
        rounds = self.stored_rounds()
        return rounds[-1] if rounds else -1

    def write_aggregate(self, aggregate: Aggregate) -> int:
        """Writes the aggregate atomically, reading its chunks once (they may be made as they are read); returns its
        size in bytes."""
        plaintext = aggregate.plaintext
        blocks = plaintext.blocks() if hasattr(plaintext, "blocks") else [np.asarray(plaintext)]
        body = hashlib.sha256()

        def header(body_sha256: str) -> bytes:
            data = {
                "round": aggregate.round,
                "total_share": aggregate.total_share,
                "participants": list(aggregate.participants),
                "num_chunks": len(aggregate.encrypted_chunks),
                "plaintext_count": int(plaintext.size),
                "body_sha256": body_sha256,
            }
            raw = json.dumps(data).encode()
            return _MAGIC + struct.pack("<I", len(raw)) + raw + hashlib.sha256(raw).digest()

        def parts() -> Iterator[bytes]:
            yield header("0" * 64)  # the same length as the real one, written over it once the body is hashed
            for chunk in aggregate.encrypted_chunks:
                sized = struct.pack("<I", len(chunk)) + chunk
                body.update(sized)
                yield sized
            for block in blocks:
                data = np.ascontiguousarray(block, dtype="<f8").tobytes()
                body.update(data)
                yield data

        return self._write_atomically(
            self.aggregate_path(aggregate.round).name, parts(), head=lambda: header(body.hexdigest())
        )

    def open_aggregate(self, round_number: int) -> AggregateReader:
        return AggregateReader(self.aggregate_path(round_number))

    def prune(self, keep: int) -> list[int]:
        """Deletes all but the ``keep`` most recent aggregates (0 keeps all); returns the rounds deleted."""
        rounds = self.stored_rounds()
        doomed = rounds[:-keep] if keep > 0 else []
        for r in doomed:
            self.aggregate_path(r).unlink(missing_ok=True)
        return doomed

    def check_resumable(self, record: FederationRecord, rounds: int) -> int:
        """The last closed round to resume from; refuses aggregates this federation cannot have written, a damaged
        last one, and ``rounds`` other than those of a finished federation.

        A round's aggregate is renamed into place just before the record says it closed, so at most one round more
        than the record may be on disk; none beyond ``rounds``; each file's header must name its own round.
        """
        on_disk = self.stored_rounds()
        last_closed = max([record.last_closed_round, *on_disk])
        finished = last_closed >= record.rounds
        if finished and rounds != record.rounds:
            raise StateError(
                f"state_dir {self.root} holds a federation that finished its {record.rounds} rounds; this server "
                f"is configured with rounds={rounds}. A finished federation is not extended: start the server with "
                f"rounds={record.rounds} to serve its last model, or use another state_dir for a new federation"
            )
        beyond = [r for r in on_disk if r > rounds or r > record.last_closed_round + 1]
        if beyond:
            raise StateError(
                f"state_dir {self.root}: {self.aggregate_path(beyond[0]).name} is beyond what this federation "
                f"closed (round {record.last_closed_round} of rounds={rounds}); it was not written by this server: "
                "remove it"
            )
        for r in on_disk:
            try:
                with self.open_aggregate(r) as reader:
                    if reader.header.round != r:
                        raise StateError(
                            f"{reader.path}: its header says round {reader.header.round}; the file was renamed or "
                            "planted: remove it"
                        )
                    if r == last_closed:  # the one a restarted federation serves first: check it whole
                        for _ in reader.iter_chunks():
                            pass
                        for _ in reader.iter_plaintext(1 << 16):
                            pass
            except OSError as err:
                raise StateError(f"cannot resume: round {r}'s aggregate is unreadable ({err})") from None
        if last_closed >= 0 and last_closed not in on_disk:
            raise StateError(
                f"cannot resume: {self.aggregate_path(last_closed).name}, the last closed round's "
                "aggregate, is missing from state_dir"
            )
        return last_closed

    # -- atomic writes ---------------------------------------------------------------------------------------------

    def _write_atomically(self, name: str, parts, head=None) -> int:
        """Writes ``parts`` to ``name`` atomically; ``head``, when given, is called after the last part and its bytes
        are written over the file's start (a header that sums up what followed)."""
        final = self.root / name
        tmp = self.root / f"{_TMP_PREFIX}{name}.{os.getpid()}"
        size = 0
        try:
            # 0600 from creation (not after): aggregates hold plaintext averages, whatever the umask.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    f.write(part)
                    size += len(part)
                if head is not None:
                    f.seek(0)
                    f.write(head())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
        return size


def _canonical_sha256(data: dict[str, Any]) -> str:
    """SHA-256 of ``data`` as canonical JSON (sorted keys, no spaces), so formatting does not change it."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
