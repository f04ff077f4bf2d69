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
from scipy.special import ndtr  # standard normal CDF

from .compensation import BatchNorm
from .engine.graph import Graph, Node

__all__ = ["RECALIBRATIONS", "clipped_gaussian_moments", "propagate_moments", "analytic_bn", "measured_bn",
           "bn_of", "conv_input_groups"]

RECALIBRATIONS = ("absorb", "analytic", "data")


def bn_of(node: Node) -> BatchNorm:
    """The BatchNorm record of a BatchNormalization node (float64 copy)."""
    p = node.params
    return BatchNorm(gamma=p["gamma"].astype(np.float64), beta=p["beta"].astype(np.float64),
                     mean=p["mean"].astype(np.float64), var=p["var"].astype(np.float64),
                     eps=float(node.attrs.get("epsilon", 1e-5)))


def _phi(z):
    return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def clipped_gaussian_moments(m, v, lo=0.0, hi=np.inf):
    """Mean and variance of ``clip(X, lo, hi)`` for ``X ~ N(m, v)``, elementwise.

    ``lo = 0, hi = inf`` is ReLU (the rectified Gaussian); ``lo = 0, hi = 6`` is ReLU6.

    Parameters
    ----------
    m, v : array_like, shape (C,)
        Mean and variance of X (v >= 0; v = 0 gives the clipped constant).
    lo, hi : float, lo < hi (may be -inf / inf)

    Returns
    -------
    mean, var : ndarray, shape (C,)
    """
    m = np.asarray(m, dtype=np.float64)
    v = np.maximum(np.asarray(v, dtype=np.float64), 0.0)
    s = np.sqrt(v)
    safe = np.where(s > 0, s, 1.0)
    a = np.where(s > 0, (lo - m) / safe, np.where(m < lo, np.inf, -np.inf))
    b = np.where(s > 0, (hi - m) / safe, np.where(m > hi, -np.inf, np.inf))
    Pa, Pb = ndtr(a), ndtr(b)
    pa = np.where(np.isfinite(a), _phi(np.where(np.isfinite(a), a, 0.0)), 0.0)
    pb = np.where(np.isfinite(b), _phi(np.where(np.isfinite(b), b, 0.0)), 0.0)
    lo_t = 0.0 if not np.isfinite(lo) else lo      # lo * P(X < lo); 0 when lo = -inf
    hi_t = 0.0 if not np.isfinite(hi) else hi
    mid = Pb - Pa                                   # P(lo <= X <= hi)
    # E[X 1{lo<=X<=hi}] = m mid + s (phi(a) - phi(b));  E[X^2 1{..}] = (m^2 + v) mid + s((lo + m) phi(a) - (hi + m) phi(b))
    e1_mid = m * mid + s * (pa - pb)
    e2_mid = (m * m + v) * mid + s * ((np.where(np.isfinite(a), lo_t, 0.0) + m) * pa
                                      - (np.where(np.isfinite(b), hi_t, 0.0) + m) * pb)
    mean = lo_t * Pa + e1_mid + hi_t * (1 - Pb)                       # R.2
    second = lo_t**2 * Pa + e2_mid + hi_t**2 * (1 - Pb)
    return mean, np.maximum(second - mean**2, 0.0)


def conv_input_groups(W: np.ndarray, group: int) -> np.ndarray:
    """Index array (O, C/group): input channel of the graph tensor read by weight W[o, i]."""
    O, Cg = W.shape[:2]
    Og = O // group
    return (np.arange(O)[:, None] // Og) * Cg + np.arange(Cg)[None, :]


def _conv_moments(W, B, group, m, v):
    idx = conv_input_groups(W, group)
    S, Q = W.sum(axis=(2, 3)), (W**2).sum(axis=(2, 3))
    mean = np.sum(S * m[idx], axis=1) + (0.0 if B is None else B)
    return mean, np.sum(Q * v[idx], axis=1)


def propagate_moments(graph: Graph, input_mean=0.0, input_var=1.0) -> dict:
    """Per-channel (mean, var) of every tensor, from the network's own BN statistics (no data).

    Assumptions (documented in derivation 10): inputs independent across channels and positions;
    a BN output is Gaussian; zero padding ignored. A conv followed by BN takes the BN's running
    statistics (measured in training) as its output moments; other ops propagate: ReLU / Clip by
    the clipped Gaussian, Add by summing means and variances, pooling passes through.

    Parameters
    ----------
    graph : Graph
    input_mean, input_var : float or array_like (C,)
        Moments of the (normalised) network input; 0 and 1 for standardised images.

    Returns
    -------
    dict of tensor name -> (mean (C,), var (C,)), float64
    """
    moments = {}
    for name in graph.inputs:
        shape = graph.input_shapes.get(name)
        C = shape[0] if shape and shape[0] else next(
            n.params["W"].shape[1] * n.attrs.get("group", 1) for n in graph.nodes_of("Conv") if name in n.inputs)
        moments[name] = (np.broadcast_to(np.asarray(input_mean, float), (C,)).copy(),
                         np.broadcast_to(np.asarray(input_var, float), (C,)).copy())
    for node in graph.nodes:
        if not all(t in moments for t in node.inputs):
            continue
        ins = [moments[t] for t in node.inputs]
        out = None
        if node.op == "Conv":
            cons = graph.consumers(node.outputs[0])
            if len(cons) == 1 and cons[0].op == "BatchNormalization":
                p = cons[0].params
                out = (p["mean"].astype(float), p["var"].astype(float))   # R.1
            else:
                W = node.params["W"].astype(float)
                B = node.params.get("B")
                out = _conv_moments(W, None if B is None else B.astype(float), node.attrs.get("group", 1), *ins[0])
        elif node.op == "BatchNormalization":
            bn = bn_of(node)
            a = bn.gamma / bn.sigma
            out = (a * (ins[0][0] - bn.mean) + bn.beta, a**2 * ins[0][1])
        elif node.op == "Relu":
            out = clipped_gaussian_moments(*ins[0], 0.0, np.inf)
        elif node.op == "Clip":
            lo, hi = node.attrs.get("min"), node.attrs.get("max")
            out = clipped_gaussian_moments(*ins[0], -np.inf if lo is None else lo, np.inf if hi is None else hi)
        elif node.op == "Add" and len(ins) == 2 and ins[0][0].shape == ins[1][0].shape:
            out = (ins[0][0] + ins[1][0], ins[0][1] + ins[1][1])
        elif node.op == "Concat" and node.attrs.get("axis", 1) == 1:
            out = (np.concatenate([i[0] for i in ins]), np.concatenate([i[1] for i in ins]))
        elif node.op in ("MaxPool", "AveragePool", "GlobalAveragePool", "Identity", "Dropout", "Flatten"):
            out = ins[0]
        elif node.op == "Gemm":
            W = node.params["W"].astype(float)
            out = (W @ ins[0][0] + node.params.get("B", 0.0), (W**2) @ ins[0][1])
        if out is not None:
            moments[node.outputs[0]] = out
    return moments


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
