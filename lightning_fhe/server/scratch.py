"""Rows of bytes in an anonymous file: what the server holds per round lives on disk, not in its memory.

A round's encrypted sum, each upload's undo record and each participant's seeds are as large as the model (or a
fraction of it), so the server would only handle models that fit in RAM several times over if it kept them in
memory. They are rows in temporary files in ``state_dir`` instead, read and written with ``pread``/``pwrite``: the
kernel's page cache serves them at memory speed while there is room, and none of it counts as the server's own
memory (a memory map's touched pages would). The files are unlinked at creation, so a crash leaves nothing behind.

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


class ScratchRows:
    """``rows`` fixed-size rows of ``row_bytes`` in an unlinked file in ``directory``; unwritten rows read as zeros."""

    def __init__(self, directory: str | os.PathLike, rows: int, row_bytes: int) -> None:
        if rows < 0 or row_bytes < 1:
            raise ValueError(f"rows must be >= 0 and row_bytes >= 1, got {rows} and {row_bytes}")
        self.rows, self.row_bytes = rows, row_bytes
        self._file = tempfile.TemporaryFile(dir=Path(directory), prefix=".scratch-")
        self._fd = self._file.fileno()
        os.ftruncate(self._fd, rows * row_bytes)  # sparse: costs no disk until written

    def _check(self, index: int) -> None:
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} is outside 0..{self.rows - 1}")

    def read(self, index: int) -> bytes:
        self._check(index)
        data = os.pread(self._fd, self.row_bytes, index * self.row_bytes)
        if len(data) != self.row_bytes:
            raise OSError(f"scratch file truncated at row {index}")
        return data

    def write(self, index: int, data: bytes) -> None:
        self._check(index)
        if len(data) != self.row_bytes:
            raise ValueError(f"a row takes {self.row_bytes} bytes, got {len(data)}")
        view = memoryview(data)
        offset = index * self.row_bytes
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        self._file.close()
