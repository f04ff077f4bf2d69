"""Re-calibration of one quantized conv's BN, on arrays: the layer-level entry point (issue 14).

:func:`dfmpc.quantize_network` re-calibrates every BN after a quantized conv while it walks the
graph (:mod:`dfmpc.recalibration`, one function per mode on graph nodes). :func:`recalibrate_bn`
is the same step for one conv -> BN on plain arrays, for a porter who holds ``W``, ``W_q``, the
trained BN and the conv's inputs, and no dfmpc graph. It runs the project's float64 convolution
(:func:`dfmpc.conv2d`) where a mode needs the conv's output and applies the mode's formula from
:mod:`dfmpc.recalibration`, so the two cannot drift apart.

Imports NumPy / SciPy-level modules only (``import dfmpc`` stays free of Numba and ONNX).
"""

from __future__ import annotations

import numpy as np

from ._checks import as_float_array
from .compensation import _check_bn
from .recalibration import RECALIBRATIONS, analytic_bn, measured_bn, ratio_bn, view_moments
from .reconstruction import conv2d

__all__ = ["recalibrate_bn"]

#: mode -> the keyword arguments it reads (every other one of X_fp, X_q, in_mean, in_var must be None).
_INPUTS = {
    "sequential": ("X_fp", "X_q"),
    "analytic": ("in_mean", "in_var"),
    "absorb": (),
    "data": ("X_q",),
}


def _input_batch(X, name, C):
    X = as_float_array(X, name, ndim=4, layout="the conv's input batch (N, C, H, W)")
    if X.shape[1] != C:
        raise ValueError(f"{name}: expected {C} input channels (W.shape[1] * groups), got shape {X.shape}")
    return X


def _input_moment(a, name, C):
    a = as_float_array(a, name, ndim=(0, 1)).astype(np.float64, copy=False)
    if a.ndim == 1 and a.shape != (C,):
        raise ValueError(f"{name}: expected a scalar or shape ({C},) (the conv's input channels), got {a.shape}")
    return np.broadcast_to(a, (C,))


def recalibrate_bn(bn, W, W_q, mode, *, X_fp=None, X_q=None, in_mean=None, in_var=None,
                   stride=1, padding=0, groups=1, dilation=1, bias=None, n_images=None):
    """Re-calibrated statistics ``muhat``, ``sigmahat`` of the BN after one quantized conv.

    Quantizing ``W`` to ``W_q`` changes the statistics of the conv's output, which the trained BN
    normalises; the paper re-calibrates them ("by recalibrating", Sec. 4) without saying how
    without data. Each ``mode`` is one reading, as in :func:`dfmpc.quantize_network`:

    ``"sequential"`` (data-free, the pipeline's default; derivation 15)
        ``X_fp``, ``X_q``: the conv's input on the same probe images, in the full-precision network
        and in the network quantized so far. With ``m_fp, v_fp`` the per-channel mean and variance of
        ``conv(X_fp, W)`` and ``m_q, v_q`` those of ``conv(X_q, W_q)``::

            muhat_o      = mu_o + (m_q_o - m_fp_o)                          (S.1)
            sigmahat_o^2 = sigma_o^2 * v_q_o / v_fp_o  (1 where v_fp_o = 0)  (S.2)

        With ``n_images``, the batches are probe images followed by their views (the pipeline's
        default, :func:`dfmpc.probes.make_views`): the means of S.1 are taken over the
        first ``n_images`` rows, the variances of S.2 over all rows (S.5).

    ``"analytic"`` (data-free; derivation 10)
        ``in_mean``, ``in_var``: expected moments ``m_i, v_i`` of the conv's input in the
        full-precision network::

            muhat_o      = mu_o + sum_i (sum_uv (W_q - W)[o, i, u, v]) m_i                     (R.3)
            sigmahat_o^2 = sigma_o^2 * sum_i ||W_q[o, i]||^2 v_i / sum_i ||W[o, i]||^2 v_i     (R.4)

        (ratio 1 where the denominator is 0; ``i`` runs over the input channels of o's group).
    ``"absorb"`` (data-free; derivation 01, Q.1)
        The trained statistics: with dequantized weights ``W_q`` the quantizer's scale is already
        absorbed, so ``bn`` is returned as it is.
    ``"data"`` (not data-free, the upper reference; derivation 10, R.5)
        ``X_q``: the conv's input on real images in the network quantized so far; ``muhat``,
        ``sigmahat^2 - eps`` are the measured per-channel mean and (biased) variance of
        ``conv(X_q, W_q) + bias``.

    Parameters
    ----------
    bn : BatchNorm with O channels
        The trained BN after the full-precision conv (``mu = bn.mean``, ``sigma^2 = bn.var + bn.eps``).
    W, W_q : array_like, shape (O, C // groups, kh, kw)
        Full-precision and dequantized (fake-quant) OIHW weights; any real dtype, used in float64.
    mode : {"sequential", "analytic", "absorb", "data"}
    X_fp : array_like, shape (N, C, H, W), optional
        ``"sequential"`` only: the conv's input batch in the full-precision network.
    X_q : array_like, shape (N', C, H, W), optional
        ``"sequential"`` and ``"data"``: the conv's input batch in the network quantized so far.
    in_mean, in_var : float or array_like, shape (C,), optional
        ``"analytic"`` only: mean and variance (>= 0) of each input channel (scalars broadcast).
    stride, padding, groups, dilation : as in :func:`dfmpc.conv2d`
        Geometry of the conv (``padding``: int, ``(ph, pw)`` or ONNX ``(top, left, bottom, right)``);
        ``groups`` also maps input channels to outputs in ``"analytic"``.
    bias : array_like, shape (O,), optional
        The conv's bias. It cancels in ``"sequential"`` and ``"analytic"``; in ``"data"`` it is part of
        the measured mean (as a BN after a biased conv sees it).
    n_images : int, optional
        ``"sequential"`` only: how many of the first rows of ``X_fp`` and ``X_q`` (which then hold the
        same number of rows) are the probe images themselves (S.5); None: all rows (S.1-S.2).

    Returns
    -------
    BatchNorm
        ``gamma``, ``beta``, ``eps`` of ``bn``; ``mean = muhat``, ``var = max(sigmahat^2 - eps, 0)``
        (float64, shape (O,)). ``bn`` itself is not modified.

    Raises
    ------
    TypeError
        ``bn`` is not a :class:`dfmpc.BatchNorm`; an array argument holds no real numbers.
    ValueError
        Unknown ``mode``; an input the mode needs is missing or one it does not read is given;
        ``W``, ``W_q`` not 4-D or of different shapes, or O differing from ``bn``'s channels;
        ``groups`` not dividing O; an input batch not 4-D, empty, or with the wrong number of
        channels; ``n_images`` not in [1, N] or given with batches of different lengths; ``in_var < 0``;
        NaN/Inf anywhere; a bad conv geometry (from :func:`dfmpc.conv2d`).
        Each message names the argument.

    See Also
    --------
    dfmpc.recalibration.ratio_bn, dfmpc.recalibration.analytic_bn, dfmpc.recalibration.measured_bn :
        the formulas, on statistics.
    dfmpc.compensation_coefficients : the next step, c of Eq. (27) from ``bn`` and the result.

    References
    ----------
    J. Chen et al., Pattern Recognition 143 (2023) 109780, Sec. 4 (BNhat^l of Eq. (22)).
    ``data_free_derivations/15_sequential_recalibration.md`` (S.1-S.3, S.5),
    ``data_free_derivations/10_analytic_recalibration.md`` (R.3-R.5),
    ``data_free_derivations/01_quantizers.md`` (Q.1).

    Examples
    --------
    Sequential: the re-calibrated BN moves the trained mean by the probes' mean shift and scales
    the variance by their variance ratio (S.1, S.2):

    >>> import dfmpc
    >>> rng = np.random.default_rng(0)
    >>> W = rng.normal(size=(4, 3, 3, 3))
    >>> W_hat, alpha, _ = dfmpc.ternary(W)
    >>> W_q = alpha * W_hat                                       # dequantized ternary weights
    >>> bn = dfmpc.BatchNorm(gamma=np.ones(4), beta=np.zeros(4), mean=rng.normal(size=4),
    ...                      var=rng.uniform(0.5, 2, 4))
    >>> X_fp = rng.normal(size=(8, 3, 6, 6))
    >>> X_q = X_fp + 0.1 * rng.normal(size=X_fp.shape)          # drifted by the layers before
    >>> bn_hat = dfmpc.recalibrate_bn(bn, W, W_q, "sequential", X_fp=X_fp, X_q=X_q, padding=1)
    >>> Y_fp, Y_q = dfmpc.conv2d(X_fp, W, padding=1), dfmpc.conv2d(X_q, W_q, padding=1)
    >>> m_fp, v_fp = Y_fp.mean(axis=(0, 2, 3)), Y_fp.var(axis=(0, 2, 3))
    >>> m_q, v_q = Y_q.mean(axis=(0, 2, 3)), Y_q.var(axis=(0, 2, 3))
    >>> bool(np.allclose(bn_hat.mean, bn.mean + m_q - m_fp))                        # (S.1)
    True
    >>> bool(np.allclose(bn_hat.var + bn.eps, (bn.var + bn.eps) * v_q / v_fp))       # (S.2)
    True

    Data: measured on the images themselves, the re-calibrated BN normalises the quantized conv's
    output to mean 0 and variance ``gamma^2 var / (var + eps)`` (R.5):

    >>> bn_data = dfmpc.recalibrate_bn(bn, W, W_q, "data", X_q=X_q, padding=1)
    >>> Z = bn_data(Y_q)
    >>> bool(np.allclose(Z.mean(axis=(0, 2, 3)), 0))
    True
    """
    bn = _check_bn(bn, "bn")
    if mode not in _INPUTS:
        raise ValueError(f"mode: expected one of {RECALIBRATIONS}, got {mode!r}")
    if n_images is not None and mode != "sequential":
        raise ValueError(f"n_images: mode={mode!r} does not read it (only 'sequential' does); pass None")
    given = {"X_fp": X_fp, "X_q": X_q, "in_mean": in_mean, "in_var": in_var}
    for name, value in given.items():
        if name in _INPUTS[mode] and value is None:
            raise ValueError(f"{name}: mode={mode!r} needs it ({', '.join(_INPUTS[mode])}), got None")
        if name not in _INPUTS[mode] and value is not None:
            needs = ", ".join(_INPUTS[mode]) or "no input"
            raise ValueError(f"{name}: mode={mode!r} does not read it (it takes {needs}); pass None")
    W = as_float_array(W, "W", ndim=4, layout="OIHW conv weights (4-D)").astype(np.float64, copy=False)
    W_q = as_float_array(W_q, "W_q", ndim=4, layout="OIHW conv weights (4-D)").astype(np.float64, copy=False)
    if W_q.shape != W.shape:
        raise ValueError(f"W_q: expected the shape of W {W.shape}, got {W_q.shape}")
    O = W.shape[0]
    if O != bn.channels:
        raise ValueError(f"W: {O} output channels, but bn has {bn.channels}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1 or O % groups:
        raise ValueError(f"groups: expected a positive int dividing the {O} output channels, got {groups!r}")
    if bias is not None:
        bias = as_float_array(bias, "bias", ndim=1).astype(np.float64, copy=False)
        if bias.shape != (O,):
            raise ValueError(f"bias: expected shape ({O},), got {bias.shape}")
    C = W.shape[1] * int(groups)
    conv = lambda X, K: conv2d(X, K, stride, padding, int(groups), dilation=dilation, bias=bias)

    if mode == "absorb":
        return bn                                                        # derivation 01, Q.1
    if mode == "analytic":
        m, v = _input_moment(in_mean, "in_mean", C), _input_moment(in_var, "in_var", C)
        if np.any(v < 0):
            raise ValueError(f"in_var: expected variances >= 0, got min {v.min():.3g}")
        return analytic_bn(bn, W, W_q, int(groups), m, v)                # derivation 10, R.3-R.4
    X_q = _input_batch(X_q, "X_q", C)
    if mode == "data":
        return measured_bn(bn, conv(X_q, W_q))                           # derivation 10, R.5
    X_fp = _input_batch(X_fp, "X_fp", C)
    if n_images is not None and len(X_q) != len(X_fp):
        raise ValueError(f"n_images: needs X_fp and X_q of the same length (the same probes), got {len(X_fp)} and "
                         f"{len(X_q)}")
    m_q, v_q = view_moments(conv(X_q, W_q), n_images)                    # S.5 (S.1-S.2 when n_images is None)
    m_fp, v_fp = view_moments(conv(X_fp, W), n_images)
    return ratio_bn(bn, m_q, v_q, m_fp, v_fp)                            # derivation 15, S.1-S.2, S.5
