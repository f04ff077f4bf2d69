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

Where c is (``report.pairs[i].form``):

- ``"fold"`` (every pair through a ReLU): the pipeline folds c into the BN after the low layer
  (``fold_into_bn``, exact because c >= 0 and ReLU is positively homogeneous), so no weight carries c
  and every grid above is intact; c is the per-channel factor of the low layer's
  ``BatchNormalization`` (``scale = c gamma``, ``B = c beta`` after re-calibration).
- ``"eq7"`` (through a clip such as ReLU6): the high conv holds ``W~_{:,j} = c_j kQ(W)_{:,j}`` (Eq. (7)),
  a factor on its *input* channels. :func:`factored_grid` divides c out (from the report) and recovers
  the grid of ``kQ(W)``. Where conv B is depthwise its input channel is its output channel, so c is
  **folded into the per-output-channel scale** (``scale_o = c_o max|W| / (2^k - 1)``); otherwise it is
  **kept as a per-input-channel float32 factor**, a ``Mul`` after the ``DequantizeLinear``
  (``<node>.W_input_factor``, shape (1, C, 1, 1), or (O, C/group, 1, 1) for a grouped conv).
"""

from __future__ import annotations

import numpy as np

__all__ = ["integer_grid", "factored_grid", "layer_bits", "layer_input_factors", "INTEGER_TOL", "DEQUANT_RTOL", "INT8_MAX_LEVEL"]

#: Largest |q| an int8 grid symmetric about zero holds.
INT8_MAX_LEVEL = 127
#: How far ``|W_q| n / M`` may be from an integer for ``n`` to count as the grid's step count.
INTEGER_TOL = 1e-3
#: Relative tolerance of ``float32(q * scale)`` against the dequantized weights.
DEQUANT_RTOL = 2.0 ** -22
#: Relative tolerance of ``float32(float32(q * scale) * factor)`` against Eq. (7) weights (at most six roundings).
FACTORED_RTOL = 2.0 ** -21


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


def integer_grid(W_q, name: str = "W", bits: int | None = None, max_level: int = INT8_MAX_LEVEL, verify: bool = True):
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
    verify : bool
        Check that ``float32(q * scale)`` reproduces ``W_q`` (``DEQUANT_RTOL``).

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
    if verify:
        _verify(_dequantize(q, scale), W32, DEQUANT_RTOL, name, "scale * q")
    return q, scale


def _dequantize(q, scale):
    """float32(q * scale) per output channel, as ``DequantizeLinear`` with ``axis=0`` computes it."""
    return (q.reshape(len(q), -1).astype(np.float32) * scale[:, None]).reshape(q.shape)


def _verify(back, W32, rtol, name, what):
    off = np.abs(back.astype(np.float64) - W32) > rtol * np.abs(W32.astype(np.float64))
    if np.any(off):
        raise ValueError(f"{name}: {int(off.sum())} weights are not reproduced by {what} within "
                         f"{rtol:.1e} relative (first at index {np.unravel_index(np.argmax(off), W32.shape)})")


def factored_grid(W_q, c, group: int = 1, name: str = "W", bits: int | None = None):
    """The int8 grid of Eq. (7) weights ``W~_{:,j} = c_j kQ(W)_{:,j}``: c divided out, folded where it can be.

    Parameters
    ----------
    W_q : array_like, shape (O, C/group, kh, kw) or (O, C)
        conv B's weights as the pipeline stores them with ``form="eq7"``.
    c : array_like, shape (C,), c >= 0
        The pair's c (``report.pairs[i].c``).
    group : int
        conv B's groups (``O == group`` and ``C/group == 1``: depthwise).
    name, bits
        As :func:`integer_grid`.

    Returns
    -------
    q : ndarray, int8, W_q's shape
        The grid of ``kQ(W)``; a column with ``c_j = 0`` (all-zero weights) holds the grid's smallest
        positive level, so the layer keeps at most ``2^k`` levels, and its factor or scale is 0.
    scale : ndarray, shape (O,), float32
        Per output channel; times ``c_o`` when conv B is depthwise (c folded into the scale; 0 where c_o = 0).
    factor : ndarray float32 or None
        None when folded; else the per-input-channel factor to multiply the dequantized weights by,
        shape (1, C) / (1, C, 1, 1) (group 1) or (O, C/group, 1, 1) (grouped).

    Raises
    ------
    ValueError
        As :func:`integer_grid`, on ``W_q / c``; or ``float32(float32(q * scale) * factor)`` off ``W_q`` by
        more than ``FACTORED_RTOL`` relative.

    Examples
    --------
    >>> import dfmpc
    >>> rng = np.random.default_rng(0)
    >>> grid, s = dfmpc.dorefa(rng.normal(size=(4, 3, 3, 3)), 6)
    >>> c = np.array([0.5, 0.0, 1.25])
    >>> W_tilde = dfmpc.scale_input_channels(s * grid, c).astype(np.float32)          # Eq. (7)
    >>> q, scale, factor = factored_grid(W_tilde, c, bits=6)
    >>> bool(np.all(q % 2 == 1)), factor.ravel().tolist()         # odd: 2i - 63 (Eq. (6)); c kept as a factor
    (True, [0.5, 0.0, 1.25])
    """
    from ..compensation import scale_input_channels
    W32 = np.asarray(W_q, dtype=np.float32)
    ones = np.ones(W32.shape[:2] + (1,) * (W32.ndim - 2))
    F = scale_input_channels(ones, c, group)                                   # Eq. (7) on ones: (O, C/group, 1, 1)
    W_grid = np.divide(W32.astype(np.float64), F, out=np.zeros(W32.shape), where=F > 0)
    if np.any(W32[np.broadcast_to(F == 0, W32.shape)] != 0):
        raise ValueError(f"{name}: weights are non-zero in an input channel where c = 0; not Eq. (7) of this c")
    q, scale = integer_grid(W_grid, name=name, verify=False)
    dead = np.broadcast_to(F == 0, W32.shape)
    if dead.any():              # c_j = 0 zeroes the column whatever q is: give it a level of the grid, not a new 0
        live = np.abs(q[~dead])
        q = np.where(dead, live[live > 0].min() if np.any(live > 0) else 1, q).astype(np.int8)
    levels = np.unique(q).size
    if bits is not None and levels > 2 ** bits:
        raise ValueError(f"{name}: {levels} distinct levels, more than 2^{bits} = {2 ** bits} for a {bits}-bit layer")
    if W32.shape[1] == 1 and group == len(W32) and W32.ndim == 4:              # depthwise: c_o is per output channel
        scale = (scale * F.reshape(-1)).astype(np.float32)                    # c folded: 0 where c_o = 0
        _verify(_dequantize(q, scale), W32, FACTORED_RTOL, name, "scale * q (c folded into the scale)")
        return q, scale, None
    factor = (F[:1] if group == 1 else F).astype(np.float32)
    _verify(_dequantize(q, scale) * factor, W32, FACTORED_RTOL, name, "scale * q * c")
    return q, scale, factor


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


def layer_input_factors(report) -> dict:
    """conv B name -> c, for every pair whose c the pipeline applied by Eq. (7) (``form == "eq7"``).

    Parameters
    ----------
    report : QuantizationReport

    Returns
    -------
    dict of str to ndarray (C,), float64
    """
    return {p.high: np.asarray(p.c, dtype=np.float64) for p in report.pairs if getattr(p, "form", "fold") == "eq7"}
