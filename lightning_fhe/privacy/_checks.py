"""Argument checks shared by the mechanisms: every message names the argument, so the config layer can prefix it."""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

import numpy as np

__all__ = [
    "PrivacyConfigError",
    "as_update_vector",
    "check_fraction",
    "check_number",
    "check_positive_int",
    "clip_by_l2_norm",
    "l2_norm",
    "share_count",
]


class PrivacyConfigError(ValueError):
    """A privacy option is wrong. ``key`` names it ("clip_norm", or "privacy.gaussian.clip_norm" once the config
    layer has prefixed it), so a user can find the line of YAML to fix."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason

    def under(self, prefix: str) -> PrivacyConfigError:
        """The same error, its key placed under ``prefix`` (``"privacy.gaussian"``)."""
        return PrivacyConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.reason)


def check_number(
    key: str,
    value: object,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """``value`` as a finite float within the given bounds, or a PrivacyConfigError naming ``key``."""
    # bool is an int to Python, but `clip_norm: true` is a typo, not the number 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = ""
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-5` as a string; OmegaConf does not, but plain yaml.safe_load does.
            hint = " (a string: in YAML write numbers unquoted, with a dot, e.g. 1.0e-5)"
        raise PrivacyConfigError(key, f"must be a number, got {value!r}{hint}")
    number = float(value)
    if not math.isfinite(number):
        raise PrivacyConfigError(key, f"must be finite, got {value!r}")
    if gt is not None and not number > gt:
        raise PrivacyConfigError(key, f"must be > {gt:g}, got {value!r}")
    if ge is not None and not number >= ge:
        raise PrivacyConfigError(key, f"must be >= {ge:g}, got {value!r}")
    if lt is not None and not number < lt:
        raise PrivacyConfigError(key, f"must be < {lt:g}, got {value!r}")
    if le is not None and not number <= le:
        raise PrivacyConfigError(key, f"must be <= {le:g}, got {value!r}")
    return number


def check_fraction(key: str, value: object) -> float:
    """A fraction of components in (0, 1]: 0 would share nothing, which is a mistake rather than a setting."""
    return check_number(key, value, gt=0.0, le=1.0)


def check_positive_int(key: str, value: object, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        # 10.0 from a YAML file is meant as 10; 10.5 is not a count.
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            value = int(value)
        else:
            raise PrivacyConfigError(key, f"must be a whole number, got {value!r}")
    low = 0 if allow_zero else 1
    if int(value) < low:
        raise PrivacyConfigError(key, f"must be >= {low}, got {value!r}")
    return int(value)


def share_count(fraction: float, size: int) -> int:
    """How many of ``size`` components a ``fraction`` cap allows: ``max(1, floor(fraction * size))``, at most
    ``size``, and 0 for an empty vector.

    ``fraction`` is read at its shortest decimal value, so 0.29 of 100 is 29, not the 28 that binary floating point
    (0.29 * 100 == 28.999999999999996) would give. At least one component is shared whenever there is one: a cap
    that rounds to zero would make the site silently contribute nothing, which no setting of ``fraction`` in (0, 1]
    means. That minimum is the only case where more than ``fraction`` of the components is shared.
    """
    if size <= 0:
        return 0
    exact = Fraction(repr(float(fraction))) * size
    return min(size, max(1, math.floor(exact)))


def as_update_vector(delta: object) -> np.ndarray:
    """``delta`` as a flat float64 array, refusing shapes and values that would make the privacy maths wrong.

    A NaN or infinity would survive clipping (its norm is not finite) and reach the other sites; it almost always
    means local training diverged, so the error names the first bad index for debugging.
    """
    array = np.asarray(delta)
    if array.ndim != 1:
        raise ValueError(f"delta must be a flat (1-D) vector, got shape {array.shape}; flatten it first")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"delta must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        first = int(bad[0])
        more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
        raise ValueError(
            f"delta[{first}] is {array[first]}{more}: a non-finite update cannot be privatized "
            "(did local training diverge?)"
        )
    return array


def l2_norm(vector: np.ndarray) -> float:
    """The L2 norm, computed on the vector divided by its largest magnitude so that huge finite entries do not
    overflow the sum of squares (which would report inf and make clipping scale the update to zero)."""
    peak = float(np.max(np.abs(vector))) if vector.size else 0.0
    if peak == 0.0:
        return 0.0
    return peak * float(np.linalg.norm(vector / peak))


def clip_by_l2_norm(vector: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """``vector`` scaled down so its L2 norm is at most ``bound`` (a new array), and that norm.

    The result's norm never exceeds ``bound``, not even by a rounding error: the Gaussian mechanism's guarantee
    rests on that bound, so the last ulp is taken off rather than trusted. A zero vector is returned as is (no
    division by its zero norm).
    """
    peak = float(np.max(np.abs(vector))) if vector.size else 0.0
    if peak == 0.0:
        return vector.copy(), 0.0
    unit = vector / peak  # entries in [-1, 1]: the norm below cannot overflow
    unit_norm = float(np.linalg.norm(unit))
    if peak * unit_norm <= bound:
        return vector.copy(), peak * unit_norm
    clipped = unit * (bound / unit_norm)
    norm = float(np.linalg.norm(clipped))
    while norm > bound:
        clipped *= np.nextafter(bound / norm, 0.0)
        norm = float(np.linalg.norm(clipped))
    return clipped, norm
