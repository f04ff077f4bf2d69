"""Integer weights for a deployable ONNX: recover ``W_q = scale * q`` with int8 ``q`` from dequantized weights.

The pipeline (:func:`dfmpc.quantize_network`) stores every quantized weight dequantized, in the
fake-quant form ``W_q = s * grid`` (float32), and records no grid or scale per layer: the
:class:`~dfmpc.QuantizationReport` names the low layers and the two bit-widths only. The grid is
recovered here from ``W_q`` itself, exactly, and checked:

- TWN ternary (Eq. (3)-(4)): ``W_q = alpha * W_hat`` with ``W_hat`` in {-1, 0, 1}; recovered as
  ``q = W_hat`` and ``scale = alpha`` (alpha absorbed into the scale).
- DoReFa kQ (Eq. (6)): ``W_q = max|W| * (-1 + 2 i / (2^k - 1))``, ``i = 0 .. 2^k - 1``; recovered as
  ``q = 2 i - (2^k - 1)`` (odd integers in [-(2^k - 1), 2^k - 1]; the grid has no zero level) and
  ``scale = max|W| / (2^k - 1)``. int8 holds this for k <= 7; an 8-bit grid (255 steps each side) does
  not fit and is refused, naming the layer.

How: with ``M = max|W_q|`` the layer's largest magnitude, the smallest ``n`` in 1 .. 127 for which every
``|W_q| n / M`` is an integer (within ``INTEGER_TOL``) gives ``scale = M / n`` and ``q = round(W_q / scale)``.
A wrong ``n`` leaves a fractional part of at least ``1 / n >= 1/127`` on some value, while float32
rounding of a right one moves ``|W_q| n / M`` by at most ``127 * 3 * 2^-24 < 3e-5``, so ``INTEGER_TOL = 1e-3``
separates them. One scale serves the whole layer (both quantizers are layer-wise) and is repeated per
output channel; a layer whose channels have different steps (a per-channel quantizer) is recovered
channel by channel. Either way the result is verified: ``float32(q * float32(scale))`` -- what
``DequantizeLinear`` computes -- must equal ``W_q`` within ``DEQUANT_RTOL = 2^-22`` relative (TWN:
exactly; DoReFa: one rounding of ``M`` times the grid value against a rounding of ``M / n`` and of the
product, at most ``3 * 2^-24``).

Where c is: the pipeline folds c into the BN after the low layer (``fold_into_bn``, exact because
c >= 0 and ReLU is positively homogeneous), so no weight carries c and every grid above is intact; the
high layer's Eq. (7) scaling ``W~_{:,j} = c_j kQ(W)_{:,j}`` would scale its *input* channels, which a
per-output-channel ``DequantizeLinear`` cannot express without leaving the grid. In the exported file c
is therefore the per-channel factor in the low layer's ``BatchNormalization`` (``scale = c gamma``,
``B = c beta`` after re-calibration).
"""

from __future__ import annotations

import numpy as np

__all__ = ["integer_grid", "layer_bits", "INTEGER_TOL", "DEQUANT_RTOL", "INT8_MAX_LEVEL"]

#: Largest |q| an int8 grid symmetric about zero holds.
INT8_MAX_LEVEL = 127
#: How far ``|W_q| n / M`` may be from an integer for ``n`` to count as the grid's step count.
INTEGER_TOL = 1e-3
#: Relative tolerance of ``float32(q * scale)`` against the dequantized weights.
DEQUANT_RTOL = 2.0 ** -22


def _steps(mags: np.ndarray, max_level: int) -> int | None:
    """Smallest n in 1..max_level with every ``mags * n / max(mags)`` an integer, or None."""
    mags = np.unique(mags[mags > 0])
    if mags.size == 0:
        return 1
    if mags.size > max_level:               # n >= number of distinct non-zero magnitudes
        return None
    r = np.arange(1, max_level + 1, dtype=np.float64)[:, None] * (mags / mags[-1])[None, :]
    ok = np.flatnonzero(np.abs(r - np.round(r)).max(axis=1) <= INTEGER_TOL)
    return int(ok[0]) + 1 if ok.size else None


def integer_grid(W_q, name: str = "W", bits: int | None = None, max_level: int = INT8_MAX_LEVEL):
    """The int8 grid and per-output-channel scale of dequantized weights: ``W_q = scale[o] * q[o]``.

    Parameters
    ----------
    W_q : array_like, shape (O, ...)
        One layer's dequantized weights (OIHW conv or (out, in) Gemm), as the pipeline stores them.
    name : str
        The layer, for error messages.
    bits : int, optional
        The layer's bit-width: if given, at most ``2^bits`` distinct levels are allowed (TWN: 3).
    max_level : int
        Largest |q| (127 for int8).

    Returns
    -------
    q : ndarray, same shape as W_q, int8
        The grid: {-1, 0, 1} for TWN, odd integers ``2 i - (2^k - 1)`` for DoReFa kQ.
    scale : ndarray, shape (O,), float32
        Per output channel; ``alpha`` for TWN, ``max|W| / (2^k - 1)`` for DoReFa; 1 for an all-zero layer.

    Raises
    ------
    ValueError
        Empty or non-finite ``W_q``; weights on no integer grid of at most ``max_level`` steps each
        side (not quantized, or an 8-bit grid); more than ``2^bits`` levels; or ``float32(q * scale)``
        off ``W_q`` by more than ``DEQUANT_RTOL`` (each names the layer).

    References
    ----------
    J. Chen et al., Pattern Recognition 143 (2023) 109780, Eq. (3)-(4), (6).
    ONNX ``DequantizeLinear`` (opset 13): ``y = (x - zero_point) * scale`` along ``axis``.

    Examples
    --------
    >>> import dfmpc
    >>> W = np.random.default_rng(0).normal(size=(4, 3, 3, 3))
    >>> grid, s = dfmpc.dorefa(W, 6)                          # Eq. (6): W_q = max|W| kQ(W)
    >>> q, scale = integer_grid((s * grid).astype(np.float32), bits=6)
    >>> bool(np.all(q % 2 == 1)), bool(np.allclose(scale, s / 63))
    (True, True)
    >>> W_hat, alpha, _ = dfmpc.ternary(W)                    # Eq. (3)-(4): W_q = alpha W_hat
    >>> q, scale = integer_grid((alpha * W_hat).astype(np.float32), bits=2)
    >>> bool(np.array_equal(q, W_hat)), bool(np.allclose(scale, alpha))
    (True, True)
    """
    W32 = np.asarray(W_q, dtype=np.float32)
    if W32.ndim < 2 or W32.size == 0:
        raise ValueError(f"{name}: expected non-empty weights of shape (O, ...), got shape {W32.shape}")
    if not np.all(np.isfinite(W32)):
        raise ValueError(f"{name}: weights have NaN or Inf entries")
    W = W32.astype(np.float64).reshape(len(W32), -1)
    M = np.abs(W).max()
    n = _steps(np.abs(W).ravel(), max_level)
    if n is not None:                                     # one step for the layer (TWN, DoReFa)
        step = np.full(len(W), M / n if M > 0 else 1.0)
    else:                                                 # a per-channel quantizer: one step per channel
        step = np.ones(len(W))
        for o, row in enumerate(np.abs(W)):
            n_o = _steps(row, max_level)
            if n_o is None:
                raise ValueError(f"{name}: weights are not on an integer grid of at most {max_level} steps each "
                                 f"side ({np.unique(W).size} distinct values; channel {o} fits none): quantize "
                                 "the graph first (dfmpc.quantize_network), at most 7 bits for an int8 grid")
            if row.max() > 0:
                step[o] = row.max() / n_o
    scale = step.astype(np.float32)
    q = np.round(W / scale.astype(np.float64)[:, None])
    if np.abs(q).max() > max_level:
        raise ValueError(f"{name}: grid needs |q| up to {int(np.abs(q).max())}, more than {max_level}")
    q = q.astype(np.int8).reshape(W32.shape)
    levels = np.unique(q).size
    if bits is not None and levels > 2 ** bits:
        raise ValueError(f"{name}: {levels} distinct levels, more than 2^{bits} = {2 ** bits} for a {bits}-bit layer")
    back = (q.reshape(len(W32), -1).astype(np.float32) * scale[:, None]).reshape(W32.shape)   # DequantizeLinear
    off = np.abs(back.astype(np.float64) - W32) > DEQUANT_RTOL * np.abs(W32.astype(np.float64))
    if np.any(off):
        raise ValueError(f"{name}: {int(off.sum())} weights are not reproduced by scale * q within "
                         f"{DEQUANT_RTOL:.1e} relative (first at index {np.unravel_index(np.argmax(off), W32.shape)})")
    return q, scale


def layer_bits(graph, report) -> dict:
    """Layer name -> bit-width of a :func:`dfmpc.quantize_network` result, from its report.

    The report names the low layer of each pair (``report.pairs[i].low``, at ``report.low_bits``);
    every other Conv / Gemm is at ``report.high_bits``. Pass the result as ``bits`` to
    :func:`dfmpc.save_model` with ``format="qdq"`` to check each layer's number of levels.

    Parameters
    ----------
    graph : Graph
        The quantized graph.
    report : QuantizationReport

    Returns
    -------
    dict of str to int
    """
    bits = {n.name: report.high_bits for n in graph.nodes if n.op in ("Conv", "Gemm")}
    bits.update({p.low: report.low_bits for p in report.pairs})
    return bits
