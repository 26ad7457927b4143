"""CKKS parameters as a validated config, mirroring the ``he.config`` block of the provisioning YAML."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_fhe.he.fixed_point import GRID_MARGIN_BITS

# Largest total coefficient-modulus size (bits) that keeps 128-bit security for each ring dimension, from the
# HomomorphicEncryption.org standard; SEAL enforces the same table and refuses anything larger.
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

# Smallest gap (bits) between the first prime and the scale. The encrypted sum must stay below
# 2**(first_prime_bits - scale_bits - 1); less than this leaves no room for averaging anything.
MIN_HEADROOM_BITS = 4


class HEConfigError(ValueError):
    """A CKKS parameter set that is malformed or below 128-bit security. The message names the field."""


@dataclass(frozen=True)
class CKKSParams:
    """CKKS encryption parameters.

    Args:
        poly_modulus_degree: ring dimension N; a ciphertext holds N/2 complex slots, so N real values.
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes. Updates are encrypted at the lowest level,
            where only the first prime remains, so the first prime bounds the size of the encrypted sum.
        scale_bits: values are scaled by ``2**scale_bits`` before rounding; it sets the precision and, with the first
            prime, the headroom. Updates are summed on a grid of ``2**-grid_bits`` (``scale_bits - 16``; 6e-8 at
            40), coarse enough that CKKS noise never changes the sum (see :mod:`lightning_fhe.he.fixed_point`).
        scheme: only ``"CKKS"``.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = field(default=(60, 40, 40))
    scale_bits: int = 40
    scheme: str = "CKKS"

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        self._validate()

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], where: str = "he.config") -> CKKSParams:
        """Builds parameters from a mapping such as the YAML ``he.config`` block; unknown keys are errors."""
        if not isinstance(config, Mapping):
            raise HEConfigError(f"{where}: expected a mapping of CKKS parameters, got {type(config).__name__}")
        known = {"poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "scheme"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise HEConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        values = dict(config)
        if "coeff_mod_bit_sizes" in values:
            sizes = values["coeff_mod_bit_sizes"]
            if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
                raise HEConfigError(f"{where}.coeff_mod_bit_sizes: expected a list of integers, got {sizes!r}")
            values["coeff_mod_bit_sizes"] = tuple(sizes)
        try:
            return cls(**values)
        except HEConfigError as err:
            raise HEConfigError(f"{where}.{err}") from None

    def _validate(self) -> None:
        if not isinstance(self.scheme, str) or self.scheme.upper() != "CKKS":
            raise HEConfigError(f"scheme: only CKKS is supported (it encrypts real numbers), got {self.scheme!r}")
        n = self.poly_modulus_degree
        if not _is_int(n) or n not in MAX_COEFF_BITS_128:
            raise HEConfigError(
                f"poly_modulus_degree: must be one of {sorted(MAX_COEFF_BITS_128)}, got {n!r}"
            )
        sizes = self.coeff_mod_bit_sizes
        if len(sizes) < 2 or not all(_is_int(b) for b in sizes):
            raise HEConfigError(
                f"coeff_mod_bit_sizes: expected at least two integer prime sizes such as [60, 40, 40], got {list(sizes)}"
            )
        bad = [b for b in sizes if not 20 <= b <= 60]
        if bad:
            raise HEConfigError(f"coeff_mod_bit_sizes: each prime must be 20 to 60 bits, got {bad}")
        total, limit = sum(sizes), MAX_COEFF_BITS_128[n]
        if total > limit:
            raise HEConfigError(
                f"coeff_mod_bit_sizes: {list(sizes)} add up to {total} bits, but poly_modulus_degree {n} is only "
                f"128-bit secure up to {limit} bits. Use fewer or smaller primes, or a larger poly_modulus_degree "
                f"(for example 8192 with [60, 40, 40])."
            )
        if not _is_int(self.scale_bits) or self.scale_bits < 20:
            raise HEConfigError(f"scale_bits: must be an integer of at least 20, got {self.scale_bits!r}")
        if self.headroom_bits < MIN_HEADROOM_BITS:
            raise HEConfigError(
                f"scale_bits: {self.scale_bits} leaves {self.headroom_bits} bit(s) of headroom under the first "
                f"{sizes[0]}-bit prime; keep scale_bits <= {sizes[0] - MIN_HEADROOM_BITS - 1} so sums of weights fit"
            )

    @property
    def slots(self) -> int:
        """Complex slots per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Real values per ciphertext: two per complex slot."""
        return self.poly_modulus_degree

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def headroom_bits(self) -> int:
        return self.coeff_mod_bit_sizes[0] - self.scale_bits - 1

    @property
    def grid_bits(self) -> int:
        """Share-weighted updates are summed as multiples of ``2**-grid_bits``, encrypted or not."""
        return self.scale_bits - GRID_MARGIN_BITS

    @property
    def max_abs_sum(self) -> float:
        """Bound on any decrypted value: beyond it the sum wraps around the first prime and decrypts to garbage."""
        return float(2**self.headroom_bits)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    def fingerprint(self) -> str:
        """Short stable digest of the parameters, to compare what two parties use."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
