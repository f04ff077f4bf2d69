"""Re-calibrating muhat and sigmahat of a quantized conv's BN: ``absorb``, ``analytic`` or ``data``.

The paper completes its solution "by recalibrating" the BN statistics of the quantized layer
and never says how without data (DESIGN.md Sec. 3). Three clearly named readings:

``absorb``   data-free, scale only: the quantizer's dropped factor is absorbed
             (``muhat = mu / s``, ``sigmahat = sigma / s``); in the fake-quant form used by the
             pipeline (dequantized weights) this is simply the original BN.
``analytic`` data-free: expected input moments propagated from the previous BNs under a
             Gaussian / rectified-Gaussian assumption (as DFQ's bias correction does), giving the
             shift of the conv output's mean and an estimate of its variance ratio
             (``data_free_derivations/10_analytic_recalibration.md``).
``data``     re-measure the quantized conv's output mean and variance on N real images: not
             data-free, the upper reference.
"""

from __future__ import annotations

import numpy as np

from .compensation import BatchNorm
from .engine.graph import Graph, Node
from .moments import clipped_gaussian_moments, propagate_moments  # noqa: F401 (derivation 14)

__all__ = ["RECALIBRATIONS", "clipped_gaussian_moments", "propagate_moments", "analytic_bn", "measured_bn",
           "bn_of", "conv_input_groups"]

RECALIBRATIONS = ("absorb", "analytic", "data")


def bn_of(node: Node) -> BatchNorm:
    """The BatchNorm record of a BatchNormalization node (float64 copy)."""
    p = node.params
    return BatchNorm(gamma=p["gamma"].astype(np.float64), beta=p["beta"].astype(np.float64),
                     mean=p["mean"].astype(np.float64), var=p["var"].astype(np.float64),
                     eps=float(node.attrs.get("epsilon", 1e-5)))


def conv_input_groups(W: np.ndarray, group: int) -> np.ndarray:
    """Index array (O, C/group): input channel of the graph tensor read by weight W[o, i]."""
    O, Cg = W.shape[:2]
    Og = O // group
    return (np.arange(O)[:, None] // Og) * Cg + np.arange(Cg)[None, :]


def analytic_bn(bn: BatchNorm, W, W_q, group: int, in_mean, in_var) -> BatchNorm:
    """Data-free BN for a quantized conv: shift muhat by the expected output change, scale the variance.

    ``muhat_o = mu_o + sum_i (sum_uv (W_q - W)[o, i]) m_i`` and
    ``varhat_o = var_o * sum_i ||W_q[o, i]||^2 v_i / sum_i ||W[o, i]||^2 v_i`` (ratio 1 when the
    denominator is 0), with the input moments ``m, v`` of the full-precision network.

    Parameters
    ----------
    bn : BatchNorm with O channels, the BN after the full-precision conv
    W, W_q : ndarray, shape (O, C/group, kh, kw)
        Full-precision and dequantized weights.
    group : int
    in_mean, in_var : ndarray, shape (C,)
        Moments of the conv's input (from :func:`propagate_moments`).
    """
    W, W_q = np.asarray(W, float), np.asarray(W_q, float)
    idx = conv_input_groups(W, group)
    m, v = np.asarray(in_mean, float)[idx], np.asarray(in_var, float)[idx]
    shift = np.sum((W_q - W).sum(axis=(2, 3)) * m, axis=1)              # R.3
    num, den = np.sum((W_q**2).sum(axis=(2, 3)) * v, axis=1), np.sum((W**2).sum(axis=(2, 3)) * v, axis=1)
    ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    sigma2_hat = (bn.var + bn.eps) * ratio                               # R.4
    return bn.replace(mean=bn.mean + shift, var=np.maximum(sigma2_hat - bn.eps, 0.0))


def measured_bn(bn: BatchNorm, X_q) -> BatchNorm:
    """BN whose mean and variance are re-measured on the quantized conv's output ``X_q`` (N, C, H, W)."""
    X_q = np.asarray(X_q, dtype=np.float64)
    axes = (0,) + tuple(range(2, X_q.ndim))
    return bn.replace(mean=X_q.mean(axis=axes), var=X_q.var(axis=axes))
