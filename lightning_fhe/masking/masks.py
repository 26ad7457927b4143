"""Pairwise masks on the first polynomial of a site's ciphertexts: they cancel in the server's sum, and only there.

Site ``i`` adds to the first polynomial ``c0`` of every upload chunk (``N`` coefficients modulo the first prime
``q0``) the mask ``M_i = sum over the other members j of sign(i, j) * KS_ij (mod q0)``, where ``sign(i, j)`` is
``+1`` if ``i < j`` (site names compared as Python ``str``) and ``-1`` otherwise, and ``KS_ij`` is a keystream
(:func:`keystream_mod`) under the seed that only ``i`` and ``j`` share (:mod:`lightning_fhe.masking.keys`). Each
``KS_ij`` enters the sum over the members once with ``+`` and once with ``-``, so the server's sum of first
polynomials, and the decrypted average, are exactly what they are without masks; one site's upload alone is
uniform noise modulo ``q0``, even to someone holding the CKKS secret key, unless every other member colludes.

Both sites of a pair must draw the same keystream for a chunk, so its nonce (:func:`chunk_nonce`) is built only
from what both know before either uploads: the round, the attempt, the members and the chunk's index. It does not
bind a site's own ciphertext seed, which its peers never see before they upload (binding it, the masks would not
cancel). The consequence: a mask must never cover two different ciphertexts, or their difference leaks to whoever
holds the secret key. :class:`PairwiseMasks` refuses that within its lifetime (:class:`MaskReuseError`): the same
bytes may be masked again (same mask, same upload), a new encryption of a chunk needs a new attempt, and a round
older than the newest it masked is refused. Across a restart of the site, the caller must keep that promise.

Example, three sites whose masked chunks add up to the sum of their unmasked ones::

    >>> import numpy as np
    >>> from lightning_fhe.he.frames import decode_upload_chunk, encode_upload_chunk
    >>> q0, n, members = 97, 8, ["a", "b", "c"]
    >>> pair_seeds = {("a", "b"): bytes([1]) * 32, ("a", "c"): bytes([2]) * 32, ("b", "c"): bytes([3]) * 32}
    >>> def masks_of(me):  # what MaskIdentity.pair_seeds gives each site
    ...     seeds = {peer: seed for pair, seed in pair_seeds.items() if me in pair for peer in pair if peer != me}
    ...     return PairwiseMasks(me, seeds, q0, n)
    >>> c0 = np.arange(n, dtype=np.uint64)
    >>> frames = [encode_upload_chunk(c0, prng=1, seed=bytes([i]) * 64) for i in range(3)]
    >>> masked = [masks_of(site).apply(frame, 1, 0, members, 0) for site, frame in zip(members, frames)]
    >>> first = decode_upload_chunk(masked[0], n, q0).c0
    >>> int((first != c0).sum()) >= 6   # one upload alone: noise
    True
    >>> total = sum(decode_upload_chunk(frame, n, q0).c0 for frame in masked) % q0
    >>> total.tolist() == (3 * c0 % q0).tolist()
    True
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from lightning_fhe.he.frames import decode_upload_chunk, encode_upload_chunk
from lightning_fhe.he.modular import add_mod, sub_mod

SEED_BYTES = 32
NONCE_BYTES = 12
_NONCE_LABEL = b"lightning-fhe mask chunk nonce v1\0"
_COUNTER = bytes(4)  # ChaCha20's 32-bit block counter starts at 0, in front of the 96-bit nonce (RFC 8439)
_U64 = np.dtype("<u8")


class MaskReuseError(ValueError):
    """A mask asked for a second, different ciphertext of the same chunk, or for a round older than the newest one.

    Its mask would cover two different ciphertexts, whose difference leaks to anyone with the secret key. Re-send
    the bytes already masked, or wait for the next attempt.
    """


def keystream_mod(seed: bytes, nonce: bytes, q: int, n: int) -> np.ndarray:
    """``n`` values uniform in ``[0, q)`` (uint64), drawn deterministically from ChaCha20.

    The procedure, which both sites of a pair follow bit for bit:

    1. ChaCha20 of RFC 8439 with key ``seed`` (32 bytes), nonce ``nonce`` (12 bytes) and the 32-bit block counter
       starting at 0 (cryptography's 16-byte nonce is 4 zero counter bytes, then ``nonce``), encrypting zeros:
       the raw keystream.
    2. The keystream read as little-endian 64-bit words, in order; each keeps its low ``b = (q - 1).bit_length()``
       bits (for a prime ``q``, the bit length of ``q``).
    3. A word ``>= q`` is dropped (rejection sampling, so what is kept is uniform); the result is the first ``n``
       words kept, in stream order.

    How many words are drawn at a time does not change the result: the stream only continues.

    >>> values = keystream_mod(bytes(32), bytes(12), 97, 1000)
    >>> int(values.max()) < 97, len(values), values.tolist() == keystream_mod(bytes(32), bytes(12), 97, 1000).tolist()
    (True, 1000, True)
    """
    if len(seed) != SEED_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError(f"a keystream takes a {SEED_BYTES}-byte seed and a {NONCE_BYTES}-byte nonce, "
                         f"got {len(seed)} and {len(nonce)}")
    if not 2 <= q < 2**63 or n < 0:
        raise ValueError(f"a keystream takes 2 <= q < 2**63 and n >= 0, got q={q}, n={n}")
    return _keystream_into(np.empty(n, dtype=np.uint64), seed, nonce, q)


def _keystream_into(out: np.ndarray, seed: bytes, nonce: bytes, q: int) -> np.ndarray:
    """:func:`keystream_mod` written into ``out`` (uint64, C-contiguous), its length ``n``."""
    cipher = Cipher(algorithms.ChaCha20(bytes(seed), _COUNTER + bytes(nonce)), mode=None).encryptor()
    bits = (q - 1).bit_length()
    low = np.uint64((1 << bits) - 1)
    n = len(out)
    cipher.update_into(_zeros(8 * n), out.view(np.uint8))  # the first n words, in place
    if sys.byteorder == "big":
        out.byteswap(inplace=True)  # the words are little-endian
    np.bitwise_and(out, low, out=out)
    if n == 0 or out.max() < q:  # rejections are rare for a prime just below 2**b, such as CKKS's first prime
        return out
    kept = out[out < q]
    filled = len(kept)
    out[:filled] = kept
    while filled < n:  # the stream continues: enough for what is missing at the rate q / 2**b, and a little more
        draw = (n - filled) * (1 << bits) // q + 16
        words = np.frombuffer(cipher.update(_zeros(8 * draw)), dtype=_U64) & low
        words = words[words < q][: n - filled]
        out[filled : filled + len(words)] = words
        filled += len(words)
    return out


def _zeros(size: int) -> memoryview:
    """``size`` zero bytes to encrypt, without allocating them anew for every chunk."""
    global _ZERO_BYTES
    if len(_ZERO_BYTES) < size:
        _ZERO_BYTES = bytes(size)
    return memoryview(_ZERO_BYTES)[:size]


_ZERO_BYTES = b""


def chunk_nonce(round_number: int, attempt: int, members: Sequence[str], chunk_index: int) -> bytes:
    """The 12-byte ChaCha20 nonce of one chunk's masks: the first 12 bytes of SHA-256 over

    ``"lightning-fhe mask chunk nonce v1\\0" || u64 round || u64 attempt || u32 number of members ||
    lp(name) for each member in sorted order || u64 chunk_index`` (big-endian; ``lp(x)`` is ``len(x)`` as a u32
    then ``x``, names in UTF-8). Every member computes the same before anyone uploads; a new attempt or another
    set of members gives new masks.

    >>> chunk_nonce(1, 0, ["b", "a"], 7) == chunk_nonce(1, 0, ["a", "b"], 7) != chunk_nonce(1, 1, ["a", "b"], 7)
    True
    """
    for name, value in (("round_number", round_number), ("attempt", attempt), ("chunk_index", chunk_index)):
        if not 0 <= value < 2**64:
            raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    digest = hashlib.sha256(_NONCE_LABEL + struct.pack(">QQI", round_number, attempt, len(members)))
    for name in sorted(members):
        encoded = name.encode()
        digest.update(struct.pack(">I", len(encoded)) + encoded)
    digest.update(struct.pack(">Q", chunk_index))
    return digest.digest()[:NONCE_BYTES]


class PairwiseMasks:
    """One site's masks, added to (and taken off) its upload chunks.

    Args:
        me: this site's name.
        seeds: ``{peer: 32-byte seed}`` for every peer it may share a round with (:meth:`MaskIdentity.pair_seeds`).
        q0: the first prime, the modulus of the coefficients (below ``2**60``, as upload chunks hold them).
        n: coefficients per chunk (the ring dimension ``N``).

    Costs one ChaCha20 keystream of ``8 N`` bytes and one modular addition per peer and chunk.
    """

    def __init__(self, me: str, seeds: Mapping[str, bytes], q0: int, n: int) -> None:
        if me in seeds:
            raise ValueError(f"site {me!r} has a seed with itself; seeds are for its peers")
        short = sorted(peer for peer, seed in seeds.items() if len(seed) != SEED_BYTES)
        if short:
            raise ValueError(f"the seeds of {short} do not take {SEED_BYTES} bytes")
        if not 2 <= q0 <= 2**60 or n < 2 or n % 2:
            raise ValueError(f"expected 2 <= q0 <= 2**60 and an even n >= 2, got q0={q0}, n={n}")
        self.me, self.q0, self.n = me, q0, n
        self._seeds = {peer: bytes(seed) for peer, seed in seeds.items()}
        self._round: int | None = None  # the newest round masked
        self._masked: dict[tuple[int, tuple[str, ...], int], bytes] = {}  # its (attempt, members, chunk): c1 seed

    @property
    def peers(self) -> tuple[str, ...]:
        """The peers this site has seeds for, sorted."""
        return tuple(sorted(self._seeds))

    def mask(
        self, round_number: int, attempt: int, members: Sequence[str], c1_seed: bytes, chunk_index: int
    ) -> np.ndarray:
        """The site's total mask for one chunk (uint64, ``n`` values below ``q0``).

        ``c1_seed`` is the seed of the ciphertext it is for: it does not change the mask (see the module's
        docstring) but is remembered, so that the mask never covers two different ciphertexts.

        Raises:
            ValueError: ``members`` lacks this site, repeats a name, or names a site without a seed.
            MaskReuseError: another ciphertext of this chunk was masked in this round and attempt, or
                ``round_number`` is older than the newest round masked.
        """
        group = self._group(members)
        self._remember(round_number, attempt, group, bytes(c1_seed), chunk_index)
        return self._total(group, chunk_nonce(round_number, attempt, group, chunk_index))

    def apply(self, frame: bytes, round_number: int, attempt: int, members: Sequence[str], chunk_index: int) -> bytes:
        """The upload chunk ``frame`` (:func:`~lightning_fhe.he.frames.encode_upload_chunk`) with the mask added
        to its first polynomial; same PRNG type and seed, new checksum.

        Raises:
            CiphertextError: ``frame`` is not an upload chunk of this ring.
            ValueError, MaskReuseError: as :meth:`mask`.
        """
        chunk = decode_upload_chunk(frame, self.n, self.q0)
        mask = self.mask(round_number, attempt, members, chunk.seed, chunk_index)
        return encode_upload_chunk(add_mod(chunk.c0, mask, self.q0), chunk.prng, chunk.seed)

    def remove(self, frame: bytes, round_number: int, attempt: int, members: Sequence[str], chunk_index: int) -> bytes:
        """The masked chunk ``frame`` without this site's mask: the chunk as it was before :meth:`apply`. For tests
        and for analysing what a coalition that holds this site's seeds could see; remembers nothing."""
        chunk = decode_upload_chunk(frame, self.n, self.q0)
        group = self._group(members)
        mask = self._total(group, chunk_nonce(round_number, attempt, group, chunk_index))
        return encode_upload_chunk(sub_mod(chunk.c0, mask, self.q0), chunk.prng, chunk.seed)

    def _group(self, members: Sequence[str]) -> tuple[str, ...]:
        group = tuple(sorted(members))
        if len(set(group)) != len(group):
            raise ValueError(f"members {list(members)} name a site twice")
        if self.me not in group:
            raise ValueError(f"members {list(members)} do not include this site, {self.me!r}")
        unknown = [site for site in group if site != self.me and site not in self._seeds]
        if unknown:
            raise ValueError(f"site {self.me!r} has no mask seed with {unknown}: their announcements are missing")
        return group

    def _remember(self, round_number: int, attempt: int, group: tuple[str, ...], seed: bytes, chunk: int) -> None:
        if self._round is not None and round_number < self._round:
            raise MaskReuseError(
                f"site {self.me!r} is asked to mask round {round_number} after round {self._round}: a round's "
                "masks are used once"
            )
        if round_number != self._round:
            self._round, self._masked = round_number, {}
        masked = self._masked.setdefault((attempt, group, chunk), seed)
        if masked != seed:
            raise MaskReuseError(
                f"site {self.me!r} already masked another ciphertext of chunk {chunk} in round {round_number}, "
                f"attempt {attempt}: re-send the bytes it masked, or wait for the next attempt"
            )

    def _total(self, group: tuple[str, ...], nonce: bytes) -> np.ndarray:
        plus, minus = _LazySum(self.n, self.q0), _LazySum(self.n, self.q0)
        stream = np.empty(self.n, dtype=np.uint64)
        for peer in group:
            if peer != self.me:
                (plus if self.me < peer else minus).add(_keystream_into(stream, self._seeds[peer], nonce, self.q0))
        return sub_mod(plus.reduced(), minus.reduced(), self.q0)


class _LazySum:
    """A sum modulo ``q`` of arrays below ``q <= 2**60``, reduced only every 15 additions (16 values below ``2**60``
    cannot overflow 64 bits): one numpy pass per addition instead of :func:`~lightning_fhe.he.modular.add_mod`'s
    three."""

    PENDING = 15

    def __init__(self, n: int, q: int) -> None:
        self.total = np.zeros(n, dtype=np.uint64)
        self.q = q
        self.pending = 0  # additions since the last reduction: total < (pending + 1) * q

    def add(self, values: np.ndarray) -> None:
        np.add(self.total, values, out=self.total)
        self.pending += 1
        if self.pending == self.PENDING:
            self.reduced()

    def reduced(self) -> np.ndarray:
        """The sum, below ``q``. From the bound ``(pending + 1) q <= 2 k q``, each step takes off ``k q`` where
        the sum reaches it (add_mod's branch-free minimum: below ``k q``, subtracting it wraps above the sum) and
        halves ``k``, down to 1."""
        k = 1 << (self.pending.bit_length() - 1) if self.pending else 0
        scratch = np.empty_like(self.total)
        while k:
            np.subtract(self.total, np.uint64(k * self.q), out=scratch)
            np.minimum(self.total, scratch, out=self.total)
            k >>= 1
        self.pending = 0
        return self.total
