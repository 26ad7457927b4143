"""A site's own part of a round's sum, kept from its upload, so that decrypting the sum expands one seed fewer.

A global chunk of K sites holds ``C0 = sum of c0_i`` and the K seeds. Take the site's own ``c0`` and seed out, and
what is left is the sum of the other K-1 sites' ciphertexts: it decrypts to their values, and the site adds its own
back, which it had before it encrypted them. SEAL then expands K-1 seeds instead of K: at 2 sites decryption took
about 18% less time (measured in one process and with 2 workers). The result is the same, bit for bit, once rounded
to the fixed-point grid: the site's own values lie on the grid exactly, and the others' noise is what it was.

Per chunk, the site keeps its upload frame as the pool made it (before any pairwise mask: the masks of a round's
participants cancel in ``C0`` whoever takes what out of it) and the ``N`` values it encrypted, in an anonymous
temporary file (:class:`~lightning_fhe.scratch.ScratchFile`) rather than in memory: 126 KB a chunk, 72 MB for a
model of 4.7 M encrypted values, written as the upload leaves and read back once as the download arrives. A chunk
whose seeds do not name the site's (its update missed the round) decrypts from all of its seeds, as without.

Example::

    >>> import numpy as np
    >>> from lightning_fhe.he import CKKSParams, HEContext
    >>> from lightning_fhe.he.codec import ChunkSum, UpdateCipher
    >>> cipher = UpdateCipher(HEContext.generate(CKKSParams()))
    >>> mine = OwnShare(cipher.params.values_per_ciphertext, chunks=1)
    >>> total = ChunkSum.for_context(cipher.context, 1)
    >>> total.add(0, cipher.encrypt(np.full(8192, 0.5), keep=mine)[0])
    >>> total.add(0, cipher.encrypt(np.full(8192, 0.25))[0])
    >>> decoded = cipher.decrypt_chunk(total.chunks()[0], own=mine.record(0))
    >>> float(np.round(decoded[0], 6))
    0.75
    >>> mine.close()
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from lightning_fhe.he.frames import upload_chunk_bytes
from lightning_fhe.scratch import ScratchFile


class OwnShare:
    """This site's upload frames and encrypted values of one round, ``chunks`` chunks of ``n`` values each.

    An encryption fills it (``iter_encrypt(..., keep=own)`` of :class:`~lightning_fhe.he.codec.UpdateCipher` and
    :class:`~lightning_fhe.he.pool.CipherPool`, through :meth:`kept`); a decryption takes each chunk's
    :meth:`record`. :meth:`close` it after the download (the file goes with it).
    """

    def __init__(self, n: int, chunks: int, directory: str | None = None) -> None:
        self.n, self.chunks = n, chunks
        self.frame_bytes = upload_chunk_bytes(n)
        self.record_bytes = self.frame_bytes + 8 * n
        self._file = ScratchFile(directory or tempfile.gettempdir(), chunks * self.record_bytes)
        self._frames = self._values = 0  # chunks kept so far, of each

    def kept(
        self, pieces: Iterable[np.ndarray], encrypt: Callable[[Iterator[np.ndarray]], Iterator[bytes]]
    ) -> Iterator[bytes]:
        """``encrypt(pieces)``, keeping the prepared pieces' values on their way in and the frames on their way out."""
        return self.keep_frames(encrypt(self.keep_values(pieces)))

    def keep_values(self, pieces: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Passes the prepared pieces (whole chunks of values each) through, keeping a copy of each chunk's."""
        for piece in pieces:
            for values in np.asarray(piece, dtype=np.float64).reshape(-1, self.n):
                self._write(self._values, self.frame_bytes, memoryview(values).cast("B"))
                self._values += 1
            yield piece

    def keep_frames(self, frames: Iterable[bytes]) -> Iterator[bytes]:
        """Passes the upload frames through, keeping a copy of each."""
        for frame in frames:
            if len(frame) != self.frame_bytes:
                raise ValueError(f"an upload frame of N={self.n} takes {self.frame_bytes} bytes, got {len(frame)}")
            self._write(self._frames, 0, frame)
            self._frames += 1
            yield frame

    def record(self, index: int) -> bytes | None:
        """Chunk ``index``'s upload frame followed by its ``n`` values (float64), or None when it was not kept (an
        upload that stopped before it)."""
        if not 0 <= index < min(self._frames, self._values):
            return None
        return self._file.read(index * self.record_bytes, self.record_bytes)

    def close(self) -> None:
        self._file.close()

    def _write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        if index >= self.chunks:
            raise ValueError(f"an update of {self.chunks} chunks has no chunk {index}")
        self._file.write(index * self.record_bytes + offset, data)
