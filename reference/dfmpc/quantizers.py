"""Weight quantizers: TWN ternary, DoReFa kQ and uniform round-to-nearest.

Each quantizer returns the weights *on the integer grid* together with the factor
the paper drops ("absorbed into BN"), so that

    W_q = scale * W_grid                      (dequantized, "fake-quant" form)

and the two forms of a quantized layer can be compared exactly (see
``compensation.absorb_scale`` and ``data_free_derivations/01_quantizers.md``).

All functions are pure and never modify their input. :func:`ternary` takes the weights of one
layer, OIHW conv (4-D) or (out, in) Gemm (2-D), the two layouts the pipeline and the baselines
quantize; :func:`dorefa` and :func:`uniform` are element-wise maps onto a grid shared by the tensor
(or, per channel, by axis 0) and take any layout with at least one axis.

Dtypes: every function computes in float64 and returns float64, whatever the input's real dtype
(integer, bool, float16 and float32 input is converted to float64 first). Callers that feed the
engine cast the dequantized weights to float32 themselves (``pipeline.quantize_weights``).

Convention for degenerate input: an all-zero tensor quantizes to all zeros with a
scale of 0, so that ``scale * W_grid`` reproduces it exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import as_float_array, check_bits

__all__ = ["ternary", "dorefa", "uniform", "dequantize", "UniformQuant", "TWN_DELTA_FACTOR"]

#: TWN threshold factor: Delta = 0.7 * mean(|W|) (Li & Liu 2016; paper Eq. (3)).
TWN_DELTA_FACTOR = 0.7


def ternary(W):
    """Ternary weights (TWN): ``W_hat = sign(W) * [|W| > Delta]``, ``Delta = 0.7 mean|W|``.

    Layer-wise: one threshold and one scale for the whole tensor.

    Parameters
    ----------
    W : array_like, shape (O, I, kh, kw) (conv) or (O, I) (Gemm)
        Full-precision weights of one layer, any real dtype (computed in float64). Finite, non-empty.
        Other ranks are refused: TWN's threshold is a statistic of one layer, and a 1-D or 5-D array
        is a flattened or stacked tensor.

    Returns
    -------
    W_hat : ndarray, same shape as W, float64
        Values in {-1, 0, +1}: the ternary grid the paper keeps (it drops alpha).
    alpha : float
        ``mean(|W|)`` over the entries with ``|W| > Delta`` (paper Eq. (4)); it is the
        minimiser of ``||W - alpha * W_hat||^2`` for the given ``W_hat``. 0 when
        no entry exceeds the threshold (only possible for an all-zero W).
    delta : float
        The threshold ``Delta = 0.7 * mean(|W|)`` (paper Eq. (3)).

    Raises
    ------
    ValueError
        If W is not 2-D or 4-D, is empty or has NaN/Inf entries.

    References
    ----------
    F. Li, B. Liu, "Ternary Weight Networks", arXiv:1605.04711 (2016).
    J. Chen et al., Pattern Recognition 143 (2023) 109780, Eq. (3)-(4).

    Examples
    --------
    >>> W = np.array([[0.9, -0.05, -0.6, 0.2]])
    >>> W_hat, alpha, delta = ternary(W)
    >>> W_hat
    array([[ 1.,  0., -1.,  0.]])
    >>> bool(np.isclose(delta, 0.7 * np.abs(W).mean())), bool(np.isclose(alpha, 0.75))
    (True, True)
    """
    W = _float64(as_float_array(W, "W", ndim=(2, 4), layout="OIHW conv (4-D) or (out, in) Gemm (2-D) weights"))
    absW = np.abs(W)
    delta = TWN_DELTA_FACTOR * float(absW.mean())            # Eq. (3)
    keep = absW > delta
    W_hat = np.where(keep, np.sign(W), 0.0)                  # Eq. (3)
    alpha = float(absW[keep].mean()) if keep.any() else 0.0  # Eq. (4)
    return W_hat, alpha, delta


def dorefa(W, k):
    """DoReFa k-bit weights: ``kQ(W) = 2/(2^k-1) round((2^k-1)(W/(2 max|W|) + 1/2)) - 1``.

    Layer-wise, paper Eq. (6). The grid has ``2^k`` levels spread evenly over
    ``[-1, 1]``, ``-1 + 2 i / (2^k - 1)`` for ``i = 0 .. 2^k - 1``; it has *no* zero level.
    Ties are rounded half to even (``np.round``, as ``torch.round``).

    Parameters
    ----------
    W : array_like, shape (O, ...)
        Full-precision weights of one layer, any real dtype (computed in float64). Finite, non-empty.
    k : int in [1, 16]
        Bit-width.

    Returns
    -------
    W_grid : ndarray, same shape as W, float64
        ``kQ(W)``, values on the 2^k-level grid in [-1, 1].
    scale : float
        ``max|W|``, the factor the paper drops: ``W_q = scale * W_grid``. An all-zero W
        gives ``W_grid = 0`` and ``scale = 0``.

    Raises
    ------
    ValueError
        Empty or non-finite W; k outside [1, 16].

    References
    ----------
    S. Zhou et al., "DoReFa-Net", arXiv:1606.06160 (2016).
    J. Chen et al., Pattern Recognition 143 (2023) 109780, Eq. (6).

    Examples
    --------
    >>> W_grid, scale = dorefa(np.array([-2.0, -0.1, 0.5, 2.0]), k=2)
    >>> W_grid * 3          # levels -1, -1/3, 1/3, 1
    array([-3., -1.,  1.,  3.])
    >>> scale
    2.0
    """
    W = _float64(as_float_array(W, "W", min_ndim=1))
    k = check_bits(k, "k")
    scale = float(np.abs(W).max())
    if scale == 0.0:
        return np.zeros_like(W), 0.0
    n = 2.0**k - 1.0
    W_grid = 2.0 / n * np.round(n * (W / (2.0 * scale) + 0.5)) - 1.0  # Eq. (6)
    return W_grid, scale


def _float64(a: np.ndarray) -> np.ndarray:
    """The dtype rule of the math modules: compute in float64."""
    return a.astype(np.float64, copy=False)


class UniformQuant(NamedTuple):
    """Result of :func:`uniform`: ``W ~= scale * (grid - zero_point)``.

    ``scale`` and ``zero_point`` broadcast against ``grid``: 0-d for per-tensor,
    shape ``(O, 1, ..., 1)`` for per-channel (one value per output channel).
    ``zero_point`` is 0 for symmetric quantization.
    """

    grid: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray


def uniform(W, bits, symmetric=True, per_channel=False):
    """Uniform round-to-nearest: ``grid = clip(round(W / scale) + zero_point, qmin, qmax)``.

    Symmetric (restricted range): ``qmax = 2^(bits-1) - 1``, grid in ``[-qmax, qmax]``,
    ``scale = max|W| / qmax``, zero point 0. Needs ``bits >= 2``.

    Asymmetric: grid in ``[0, 2^bits - 1]``, the range ``[min(W, 0), max(W, 0)]`` is
    mapped onto it, ``scale = range / (2^bits - 1)`` and the integer
    ``zero_point = round(-min(W, 0) / scale)``, so that 0 is exactly representable.

    Parameters
    ----------
    W : array_like, shape (O, ...)
        Weights, any real dtype (computed in float64). Finite, non-empty.
    bits : int in [1, 16]
        Bit-width (``>= 2`` when symmetric).
    symmetric : bool
        Symmetric (zero point 0) or asymmetric (min/max) range.
    per_channel : bool
        One scale (and zero point) per output channel (axis 0) instead of per tensor.

    Returns
    -------
    UniformQuant
        ``(grid, scale, zero_point)``, float64; grid has W's shape and integer values.
        Inside the clipping range the error ``|W - scale (grid - zero_point)|`` is at
        most ``scale / 2``. A channel (or tensor) that is all zero gets scale 0.

    Raises
    ------
    ValueError
        Empty or non-finite W; bits outside [1, 16]; symmetric with bits = 1.

    Examples
    --------
    >>> q = uniform(np.array([[-1.0, 0.25, 0.5]]), bits=3)
    >>> q.grid, float(q.scale)
    (array([[-3.,  1.,  2.]]), 0.3333333333333333)
    >>> bool(np.all(np.abs(dequantize(q) - [[-1.0, 0.25, 0.5]]) <= q.scale / 2))
    True
    """
    W = _float64(as_float_array(W, "W", min_ndim=1))
    bits = check_bits(bits, "bits")
    if symmetric and bits < 2:
        raise ValueError("bits: symmetric uniform quantization needs bits >= 2 (1 bit leaves only the level 0); "
                         "use symmetric=False or dorefa(W, 1)")
    axes = tuple(range(1, W.ndim)) if per_channel else None
    if symmetric:
        qmin, qmax = -(2.0 ** (bits - 1) - 1.0), 2.0 ** (bits - 1) - 1.0
        scale = np.abs(W).max(axis=axes, keepdims=per_channel) / qmax
        zero_point = np.zeros_like(scale)
    else:
        qmin, qmax = 0.0, 2.0**bits - 1.0
        lo = np.minimum(W.min(axis=axes, keepdims=per_channel), 0.0)
        hi = np.maximum(W.max(axis=axes, keepdims=per_channel), 0.0)
        scale = (hi - lo) / qmax
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.round(-lo / safe), qmin, qmax)
    safe = np.where(scale > 0, scale, 1.0)
    grid = np.clip(np.round(W / safe) + zero_point, qmin, qmax)
    grid = np.where(scale > 0, grid, zero_point)  # all-zero channel: grid at the zero point
    return UniformQuant(grid, np.asarray(scale, dtype=np.float64), np.asarray(zero_point, dtype=np.float64))


def dequantize(q, scale=None, zero_point=0.0):
    """Inverse of :func:`uniform`: ``W_q = scale * (grid - zero_point)``.

    Parameters
    ----------
    q : UniformQuant or array_like, shape (O, ...)
        Either the result of :func:`uniform`, or the grid values.
    scale : array_like, broadcastable to the grid; required when q is a grid
    zero_point : array_like, broadcastable to the grid

    Returns
    -------
    ndarray, same shape as the grid, float64
    """
    if isinstance(q, UniformQuant):
        if scale is not None:
            raise ValueError("scale: pass either a UniformQuant or (grid, scale, zero_point), not both")
        grid, scale, zero_point = q
    else:
        if scale is None:
            raise ValueError("scale: required when q is an array of grid values")
        grid = q
    grid = _float64(as_float_array(grid, "grid", min_ndim=1))
    scale = _float64(as_float_array(scale, "scale", allow_empty=False))
    zero_point = _float64(as_float_array(zero_point, "zero_point"))
    try:
        return scale * (grid - zero_point)
    except ValueError as exc:
        raise ValueError(f"scale/zero_point: shapes {scale.shape}/{zero_point.shape} do not broadcast "
                         f"against grid shape {grid.shape}") from exc
