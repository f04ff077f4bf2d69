"""Input validation shared by the math modules.

Every public function checks its array arguments here, so that bad input fails
early with a ``ValueError`` (or ``TypeError``) naming the argument and saying what
was expected, instead of surfacing later as a NaN or a broadcasting error.

Dtype rule (the README's "Dtypes" paragraph): the math functions compute in float64.
:func:`as_float_array` converts integer, boolean and float16 input to float64 explicitly;
float32 and float64 arrays are returned as they are, and each math function says in its
docstring in which dtype it computes and returns. The engine (``dfmpc.engine``) computes in float32.

:func:`check_graph_params` is the network-level check: every parameter of every node finite and
every BatchNorm variance non-negative, with the offending node named.
"""

from __future__ import annotations

import numbers

import numpy as np


def as_float_array(x, name: str, *, ndim=None, min_ndim=None, allow_empty=False, layout: str | None = None) -> np.ndarray:
    """Return ``x`` as a finite floating-point ndarray, or raise naming ``name``.

    Integer, boolean and float16 input is converted to float64 (float16 has too few digits for the
    math); float32 and float64 keep their dtype. ``layout``, if given, is what the ndim message says
    was expected (e.g. ``"OIHW conv weights (4-D)"``).
    """
    try:
        a = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{name}: expected an array of real numbers, got {type(x).__name__}") from exc
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{name}: expected an array of real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{name}: expected real numbers, got complex dtype {a.dtype}")
    if not np.issubdtype(a.dtype, np.floating) or a.dtype == np.float16:
        a = a.astype(np.float64)
    if ndim is not None and a.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        if layout:
            raise ValueError(f"{name}: expected {layout}, got shape {a.shape}")
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


def check_graph_params(graph, what: str = "model") -> None:
    """Raise a ValueError naming the node unless every parameter is finite and every BN variance >= 0.

    Parameters
    ----------
    graph : dfmpc.Graph
    what : str
        How the graph is named in the message (e.g. ``"model"``).

    Raises
    ------
    ValueError
        ``"model: node 'conv1' (Conv): parameter 'W' has 3 NaN/Inf entries; expected finite weights"``, or
        a BatchNormalization node with a negative running variance (``var`` must be >= 0).
    """
    for node in graph.nodes:
        for pname, arr in node.params.items():
            a = np.asarray(arr)
            if a.dtype.kind not in "fiub":
                raise ValueError(f"{what}: node {node.name!r} ({node.op}): parameter {pname!r} has dtype {a.dtype}; "
                                 "expected real numbers")
            if a.dtype.kind == "f":
                bad = a.size - int(np.count_nonzero(np.isfinite(a)))
                if bad:
                    raise ValueError(f"{what}: node {node.name!r} ({node.op}): parameter {pname!r} has {bad} NaN/Inf "
                                     f"entr{'y' if bad == 1 else 'ies'}; expected finite values")
        if node.op == "BatchNormalization" and "var" in node.params:
            var = np.asarray(node.params["var"])
            if var.size and np.min(var) < 0:
                n_neg = int(np.count_nonzero(var < 0))
                raise ValueError(f"{what}: node {node.name!r} (BatchNormalization): running variance 'var' has "
                                 f"{n_neg} negative entr{'y' if n_neg == 1 else 'ies'} (min {float(np.min(var)):.3g}); "
                                 "expected var >= 0")
            eps = node.attrs.get("epsilon", 1e-5)
            if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not np.isfinite(eps) or eps < 0:
                raise ValueError(f"{what}: node {node.name!r} (BatchNormalization): epsilon is {eps!r}; "
                                 "expected a finite number >= 0")
            if var.size and np.min(var + eps) <= 0:
                raise ValueError(f"{what}: node {node.name!r} (BatchNormalization): var + epsilon is 0 for some "
                                 "channel; expected var + epsilon > 0")
