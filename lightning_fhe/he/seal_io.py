"""Moving SEAL objects to and from ``bytes``.

TenSEAL's ``sealapi`` objects only ``save(path)`` and ``load(context, path)``. An anonymous in-memory file
(``memfd_create``, reached as ``/proc/self/fd/N``) gives them a path without touching the disk.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path


class SealBuffer:
    """A reusable in-memory file for one thread's SEAL saves and loads."""

    def __init__(self) -> None:
        if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
            self._fd = os.memfd_create("lightning_fhe", os.MFD_CLOEXEC)
            self._path = f"/proc/self/fd/{self._fd}"
        else:  # macOS and friends: a private temporary file instead
            self._fd, self._path = tempfile.mkstemp(prefix="lightning_fhe-")

    def dump(self, seal_object) -> bytes:
        """Serializes anything with ``save(path)``: ciphertexts, seeded ciphertexts, plaintexts."""
        os.ftruncate(self._fd, 0)
        seal_object.save(self._path)
        return os.pread(self._fd, os.fstat(self._fd).st_size, 0)

    def load(self, seal_object, seal_context, data: bytes) -> None:
        """Fills ``seal_object`` (for example a fresh ``Ciphertext``) from ``data``."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        seal_object.load(seal_context, self._path)

    def __del__(self) -> None:
        try:
            os.close(self._fd)
            if not self._path.startswith("/proc/"):
                os.unlink(self._path)
        except (OSError, AttributeError):
            pass


_local = threading.local()


def thread_buffer() -> SealBuffer:
    """This thread's buffer: SEAL calls hold the GIL, but gRPC servers run handlers on many threads."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = SealBuffer()
    return buffer
