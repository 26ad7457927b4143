"""Anonymous files: what the server holds per round lives on disk, not in its memory.

A round's encrypted sum, each upload's undo record, each participant's seeds, and the plaintext values sent
unencrypted are as large as the model (or a fraction of it), so the server would only handle models that fit in RAM
several times over if it kept them in memory. They live in temporary files in ``state_dir`` instead, read and
written with ``pread``/``pwrite``: the kernel's page cache serves them at memory speed while there is room, and
none of it counts as the server's own memory (a memory map's touched pages would). The files are unlinked at
creation, so a crash leaves nothing behind.

Example::

    >>> import tempfile
    >>> rows = ScratchRows(tempfile.gettempdir(), rows=3, row_bytes=4)
    >>> rows.write(1, b"abcd")
    >>> rows.read(1), rows.read(0)
    (b'abcd', b'\\x00\\x00\\x00\\x00')
    >>> rows.close()
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class ScratchFile:
    """``size`` bytes in an unlinked file in ``directory``, zeros until written (sparse: no disk until then)."""

    def __init__(self, directory: str | os.PathLike, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = size
        self._file = tempfile.TemporaryFile(dir=Path(directory), prefix=".scratch-")
        self._fd = self._file.fileno()
        os.ftruncate(self._fd, size)

    def read(self, offset: int, size: int) -> bytes:
        if not (0 <= offset and offset + size <= self.size):
            raise IndexError(f"bytes {offset}..{offset + size} are outside the scratch file's {self.size}")
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise OSError(f"scratch file truncated at byte {offset + len(data)}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        if not (0 <= offset and offset + len(data) <= self.size):
            raise IndexError(f"bytes {offset}..{offset + len(data)} are outside the scratch file's {self.size}")
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        self._file.close()


class ScratchRows:
    """``rows`` rows of ``row_bytes`` each in a :class:`ScratchFile`; unwritten rows read as zeros."""

    def __init__(self, directory: str | os.PathLike, rows: int, row_bytes: int) -> None:
        if rows < 0 or row_bytes < 1:
            raise ValueError(f"rows must be >= 0 and row_bytes >= 1, got {rows} and {row_bytes}")
        self.rows, self.row_bytes = rows, row_bytes
        self._file = ScratchFile(directory, rows * row_bytes)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} is outside 0..{self.rows - 1}")

    def read(self, index: int) -> bytes:
        self._check(index)
        return self._file.read(index * self.row_bytes, self.row_bytes)

    def write(self, index: int, data: bytes) -> None:
        self._check(index)
        if len(data) != self.row_bytes:
            raise ValueError(f"a row takes {self.row_bytes} bytes, got {len(data)}")
        self._file.write(index * self.row_bytes, data)

    def close(self) -> None:
        self._file.close()
