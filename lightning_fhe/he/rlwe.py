"""A site's encryption and decryption of a chunk without SEAL's encoder, encryptor and decryptor: the same
arithmetic, several times faster.

SEAL's secret-key encryption of a CKKS plaintext at one prime ``q`` is ``c0 = NTT(m) - a*s - NTT(e)``, ``c1 = a``,
where ``m`` is the encoded plaintext, ``a`` the expansion of a fresh public 64-byte seed by BLAKE2Xb, ``s`` the
secret key and ``e`` centred binomial noise; a seeded ciphertext keeps ``c0`` and the seed. Decryption is
``INTT(c0 + c1*s)``, then the decoder. Through TenSEAL's bindings an encryption cost about 1.9 ms a chunk of 8192
values (a Python list for the encoder, the encoder's own FFT and NTT, the encryption, and a save to bytes only to
read the seed back). :class:`SeededCipher` does the same work in about a third of that: numpy's FFT for the encoding
and decoding, and C (``_rlwe.c``) for the noise, the NTTs, the seed expansion and the products.

What stays SEAL's: the keys. What is ours is checked against SEAL in tests/test_rlwe.py: the seed expansion against
SEAL's own (a seeded ciphertext SEAL loads), the NTT against SEAL's transform, the encoding against SEAL's encoder,
and whole ciphertexts by SEAL's decryption. The randomness is the operating system's (``secrets``), as SEAL's comes
from ``std::random_device``: 64 bytes seed a BLAKE2Xb stream whose first 64 bytes are the public seed and whose next
6 bytes a coefficient become the centred binomial noise (standard deviation 3.24, bounded by 21), exactly as SEAL's
bootstrap generator is used.

Where the C extension was not built, :data:`AVAILABLE` is false and sites encrypt and decrypt through SEAL, with the
same results.
"""

from __future__ import annotations

import secrets
from functools import lru_cache

import numpy as np

from lightning_fhe.he.seeded import BLAKE2XB, SEED_BYTES, CiphertextLayout, SeededParts

try:
    from lightning_fhe.he import _rlwe
except ImportError:  # built without a C compiler
    _rlwe = None

AVAILABLE = _rlwe is not None


@lru_cache(maxsize=8)
def ntt_tables(q: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """SEAL's NTT tables for ``q`` and ring dimension ``n``, forward and inverse, each ``(2, n)`` uint64: factors, then
    their Shoup factors ``floor(w * 2**64 / q)``.

    Forward: ``psi**bitrev(k)``, with ``psi`` the smallest primitive ``2n``-th root of unity modulo ``q``, as SEAL
    chooses it. Inverse: ``psi**-bitrev(k)``, and at index 0, which no butterfly uses, ``1/n mod q``.
    """
    psi = minimal_primitive_root(2 * n, q)
    psi_inverse = pow(psi, -1, q)
    bits = n.bit_length() - 1
    forward, inverse = [0] * n, [0] * n
    power, power_inverse = 1, 1
    for i in range(n):
        k = _reverse_bits(i, bits)
        forward[k], inverse[k] = power, power_inverse
        power, power_inverse = power * psi % q, power_inverse * psi_inverse % q
    inverse[0] = pow(n, -1, q)
    return _shoup_table(forward, q), _shoup_table(inverse, q)


def _shoup_table(factors: list[int], q: int) -> np.ndarray:
    table = np.array([factors, [(w << 64) // q for w in factors]], dtype=np.uint64)
    table.flags.writeable = False
    return table


def minimal_primitive_root(degree: int, q: int) -> int:
    """The smallest primitive ``degree``-th root of unity modulo the prime ``q`` (``degree`` a power of two)."""
    if (q - 1) % degree:
        raise ValueError(f"{q} is not 1 modulo {degree}: it has no primitive {degree}-th root of unity")
    for g in range(2, q):
        root = pow(g, (q - 1) // degree, q)
        if pow(root, degree // 2, q) == q - 1:
            break
    square, smallest, power = root * root % q, root, root
    for _ in range(degree // 2):  # the primitive roots are the odd powers of any one of them
        smallest = min(smallest, power)
        power = power * square % q
    return smallest


def _reverse_bits(x: int, bits: int) -> int:
    return int(format(x, f"0{bits}b")[::-1], 2) if bits else 0


class CKKSEncoding:
    """SEAL's CKKS encoding of ``n`` reals (pairs as complex slots) into the ``n`` integer coefficients of a plaintext.

    Slot ``i`` holds the plaintext polynomial's value at ``zeta**(3**i)`` divided by the scale, and its conjugate at
    ``zeta**-(3**i)``, ``zeta = exp(i pi / n)`` (SEAL's ``matrix_reps_index_map``). One FFT of ``n`` points finds the
    coefficients: ``m_j = zeta**-j / n * FFT(W)_j`` with ``W_u`` the value wanted at ``zeta**(2u+1)``.
    """

    def __init__(self, n: int, scale: float) -> None:
        self.n, self.scale = n, scale
        slots = n // 2
        positions = np.empty(slots, dtype=np.int64)
        pos = 1
        for i in range(slots):
            positions[i] = pos
            pos = pos * 3 % (2 * n)
        self._at = (positions - 1) // 2  # W index of zeta**(3**i)
        self._conjugate_at = (2 * n - positions - 1) // 2  # and of its conjugate
        self._twiddle = np.exp(-1j * np.pi * np.arange(n) / n) * (scale / n)
        self._untwiddle = np.exp(1j * np.pi * np.arange(n) / n) * (n / scale)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """The plaintext's coefficients (int64) for ``n`` float64 values."""
        slots = values.view(np.complex128)
        w = np.empty(self.n, dtype=np.complex128)
        w[self._at] = slots
        w[self._conjugate_at] = slots.conj()
        coefficients = (np.fft.fft(w) * self._twiddle).real
        return np.rint(coefficients).astype(np.int64)

    def decode(self, coefficients: np.ndarray) -> np.ndarray:
        """The ``n`` float64 values of a plaintext's coefficients (int64): the inverse of :meth:`encode`, up to the
        rounding. ``m(zeta**(2u+1)) = n * IFFT(m_j * zeta**j)_u``."""
        evaluated = np.fft.ifft(coefficients * self._untwiddle)
        return evaluated[self._at].view(np.float64)  # fancy indexing: a new array, contiguous


class SeededCipher:
    """SEAL's secret-key encryption of chunks at the lowest level, as seeded ciphertexts, and the decryption of sums of
    them. Needs the secret key.

    Example::

        >>> import numpy as np
        >>> from lightning_fhe.he import CKKSParams, HEContext
        >>> cipher = SeededCipher(CiphertextLayout(HEContext.generate(CKKSParams())))
        >>> parts = cipher.encrypt(np.full(8192, 0.5))
        >>> parts.c0.size, parts.prng, len(parts.seed)
        (8192, 1, 64)
        >>> c1 = cipher.layout.second_polynomial([(parts.prng, parts.seed)])
        >>> np.round(cipher.decrypt(parts.c0, c1)[:3], 6)
        array([0.5, 0.5, 0.5])
    """

    def __init__(self, layout: CiphertextLayout) -> None:
        if _rlwe is None:
            raise RuntimeError("lightning_fhe.he._rlwe was not built (no C compiler at install); encrypt with SEAL")
        self.layout = layout
        self.n, self.q = layout.n, layout.q0
        self._encoding = CKKSEncoding(self.n, layout.context.params.scale)
        self._forward, self._inverse = ntt_tables(self.q, self.n)
        self._key = _shoup_table([int(s) for s in secret_key_ntt(layout)], self.q)

    def encrypt(self, values: np.ndarray, bootstrap_seed: bytes | None = None) -> SeededParts:
        """The seeded ciphertext of ``n`` values. ``bootstrap_seed`` (64 bytes) seeds the randomness, the ciphertext's
        public seed and its noise, as SEAL's bootstrap PRNG does; fresh from the operating system unless given."""
        if values.shape != (self.n,):
            raise ValueError(f"a chunk holds {self.n} values, got shape {values.shape}")
        bootstrap_seed = secrets.token_bytes(SEED_BYTES) if bootstrap_seed is None else bootstrap_seed
        c0, seed = np.empty(self.n, dtype=np.uint64), bytearray(SEED_BYTES)
        coefficients = self._encoding.encode(np.ascontiguousarray(values, dtype=np.float64))
        _rlwe.encrypt(c0, seed, coefficients, bootstrap_seed, self._key, self.q, self._forward)
        return SeededParts(c0, BLAKE2XB, bytes(seed))

    def decrypt(self, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
        """The ``n`` decoded values of the ciphertext ``(c0, c1)``, coefficients below ``q``, in NTT form."""
        coefficients = np.empty(self.n, dtype=np.int64)
        _rlwe.decrypt(coefficients, c0, c1, self._key, self.q, self._inverse)
        return self._encoding.decode(coefficients)


def secret_key_ntt(layout: CiphertextLayout) -> np.ndarray:
    """The secret key modulo the first prime, in NTT form: the first ``n`` coefficients of SEAL's key plaintext (``n``
    per prime of the key level, the first prime's first), read one by one, so the key is never serialized."""
    key = layout.context.secret_key().data()
    if key.coeff_count() % layout.n or key.coeff_count() == 0:
        raise ValueError(f"the secret key holds {key.coeff_count()} coefficients, not a multiple of {layout.n}")
    s = np.fromiter((key[i] for i in range(layout.n)), dtype=np.uint64, count=layout.n)
    if (s >= layout.q0).any():
        raise ValueError("the secret key's first polynomial is not reduced modulo the first prime")
    return s
