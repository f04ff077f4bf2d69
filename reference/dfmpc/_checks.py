"""Input validation shared by the math modules.

Every public function checks its array arguments here, so that bad input fails
early with a ``ValueError`` (or ``TypeError``) naming the argument and saying what
was expected, instead of surfacing later as a NaN or a broadcasting error.
"""

from __future__ import annotations

import numbers

import numpy as np


def as_float_array(x, name: str, *, ndim=None, min_ndim=None, allow_empty=False) -> np.ndarray:
    """Return ``x`` as a finite floating-point ndarray, or raise naming ``name``.

    Integer and boolean input is converted to float64; float16/32/64 keep their dtype.
    """
    try:
        a = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{name}: expected an array of real numbers, got {type(x).__name__}") from exc
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{name}: expected an array of real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{name}: expected real numbers, got complex dtype {a.dtype}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if ndim is not None and a.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected an array with ndim {ndim}, got shape {a.shape}")
    if min_ndim is not None and a.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimension(s), got shape {a.shape}")
    if a.size == 0 and not allow_empty:
        raise ValueError(f"{name}: expected a non-empty array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/Inf entr{'y' if bad == 1 else 'ies'}")
    return a


def check_bits(k, name: str, lo: int = 1, hi: int = 16) -> int:
    """Return ``k`` as an int in ``[lo, hi]``, or raise naming ``name``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name}: expected an integer bit-width in [{lo}, {hi}], got {k!r}")
    if not lo <= int(k) <= hi:
        raise ValueError(f"{name}: expected an integer bit-width in [{lo}, {hi}], got {k}")
    return int(k)


def check_scalar(x, name: str, *, min_value=None, allow_equal=True) -> float:
    """Return ``x`` as a finite Python float, optionally bounded below."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {x!r}")
    v = float(x)
    if not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    if min_value is not None and (v < min_value or (v == min_value and not allow_equal)):
        op = ">=" if allow_equal else ">"
        raise ValueError(f"{name}: expected a number {op} {min_value}, got {v}")
    return v
