"""Data-free moments: the per-channel mean and variance of every tensor, one rule per op.

``propagate_moments(graph)`` walks the graph in topological order and gives each tensor a pair
``(mean, var)`` of float64 arrays: one entry per channel for an (N, C, H, W) tensor (the average over
samples *and* positions, which is what a BN's running statistics measure), one per feature for an
(N, F) tensor. No data is used: the moments come from the network's own BN statistics
(``data_free_derivations/10_analytic_recalibration.md`` R.1) and, between BNs, from one rule per
op type, each derived in ``data_free_derivations/14_moment_rules.md`` (labels M.1 ...):

=====================  ====================================================================  =====
op                     rule                                                                  label
=====================  ====================================================================  =====
Conv                   exact spatial average under independence, zero padding included      M.2
BatchNormalization     per-channel affine map                                                M.3
Relu, Clip             clipped Gaussian (derivation 10, R.2)                                 M.4
LeakyRelu              rectified Gaussian of x and of -x, combined                           M.14
Add (Sum)              means add; variances add plus a stated branch correlation             M.5
Mul                    constant: exact per-channel average; two activations: independent     M.6
Concat                 channel axis: concatenate; spatial axis: mixture                      M.7
MaxPool                max of the window's Gaussian elements, equicorrelated (rho)           M.8
AveragePool, GAP       mean of the window's elements, equicorrelated (rho)                   M.9
Flatten                per-channel moments repeated over positions (channel-major)           M.10
Gemm                   independent inputs                                                    M.11
Softmax                ratio of expectations (lognormal numerator)                           M.12
Identity, Dropout      pass through (inference)                                              M.13
=====================  ====================================================================  =====

A tensor read by a BatchNormalization takes that BN's running statistics (M.1, which generalises
R.1 from "a conv followed by BN" to any tensor a BN reads, e.g. a DenseNet concatenation): they were
measured on that tensor in training, so they beat anything propagated. An op with no rule raises
``ValueError`` naming the op type and the node; no node is ever skipped.

The two correlation assumptions are explicit arguments (:class:`Assumptions`):
``spatial_correlation`` (rho between the elements of one pooling window; default 1, the bound that
keeps the moments of pooling at their input's, as before this module) and ``branch_correlation``
(between the inputs of an Add; default 0, independent branches).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
from scipy.special import ndtr  # standard normal CDF

from .engine.conv import conv_output_size
from .engine.graph import Graph, Node
from .engine.ops import _geometry

__all__ = ["Assumptions", "MOMENT_RULES", "RuleInput", "propagate_moments", "tensor_shapes",
           "clipped_gaussian_moments", "max_of_gaussians_moments", "window_counts", "tap_masks"]

Moments = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Assumptions:
    """The correlation assumptions the rules need and the data cannot give (derivation 14, M.0).

    Attributes
    ----------
    spatial_correlation : float in [0, 1]
        rho: correlation between two elements of one pooling window (same sample, same channel).
        1 (default): fully correlated, pooling keeps its input's moments (the lower bound of a
        max-pool's mean, the upper bound of an average-pool's variance); 0: independent (the
        opposite bounds).
    branch_correlation : float in [-1, 1]
        Correlation between the inputs of an Add / Sum, per channel; 0 (default): independent.
    """

    spatial_correlation: float = 1.0
    branch_correlation: float = 0.0

    def __post_init__(self):
        if not 0.0 <= float(self.spatial_correlation) <= 1.0:
            raise ValueError(f"spatial_correlation: expected a value in [0, 1], got {self.spatial_correlation}")
        if not -1.0 <= float(self.branch_correlation) <= 1.0:
            raise ValueError(f"branch_correlation: expected a value in [-1, 1], got {self.branch_correlation}")


@dataclass(frozen=True)
class RuleInput:
    """What a rule sees of its node's inputs.

    Attributes
    ----------
    moments : list of (mean, var)
        One pair per activation input: float64 arrays of shape (C,) (4-D) or (F,) (2-D).
    shapes : list of tuple
        The inputs' shapes without the batch axis, e.g. (C, H, W) or (F,).
    out_shape : tuple
        The output's shape without the batch axis.
    assumptions : Assumptions
    clipped_source : (mean, var, lo, hi) or None
        For MaxPool only: when its input is ``clip(X, lo, hi)`` of a Relu / Clip node, the moments
        of the Gaussian X (so that max(clip(X)) = clip(max(X)) can be used, M.8).
    """

    moments: list
    shapes: list
    out_shape: tuple
    assumptions: Assumptions = Assumptions()
    clipped_source: tuple | None = None


# ----------------------------------------------------------------------------- shared math

def _phi(z):
    return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def clipped_gaussian_moments(m, v, lo=0.0, hi=np.inf):
    """Mean and variance of ``clip(X, lo, hi)`` for ``X ~ N(m, v)``, elementwise (derivation 10, R.2).

    ``lo = 0, hi = inf`` is ReLU (the rectified Gaussian); ``lo = 0, hi = 6`` is ReLU6;
    ``lo = -inf, hi = inf`` returns ``(m, v)``.

    Parameters
    ----------
    m, v : array_like, same shape (e.g. (C,))
        Mean and variance of X (v >= 0; v = 0 gives the clipped constant).
    lo, hi : float, lo < hi (may be -inf / inf)

    Returns
    -------
    mean, var : ndarray, the shape of ``m``, float64
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


def tap_masks(size: int, k: int, stride: int, pad_begin: int, dilation: int, out: int,
              pad_end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis: which kernel taps of each output position read the input (M.2, M.8, M.9).

    Parameters
    ----------
    size : int
        Input length along the axis.
    k, stride, pad_begin, dilation : int
        Kernel length and geometry.
    out : int
        Output length (from :func:`dfmpc.engine.conv.conv_output_size`; ceil mode included).
    pad_end : int, optional
        End padding; used only for the second mask.

    Returns
    -------
    inside : ndarray, shape (out, k), bool
        Tap u of output t reads an input element (not padding).
    in_padded : ndarray, shape (out, k), bool
        Tap u of output t lies in the input or its explicit padding (not in ceil-mode overhang);
        the divisor of AveragePool with ``count_include_pad``.
    """
    pos = np.arange(out)[:, None] * stride - pad_begin + np.arange(k)[None, :] * dilation
    inside = (pos >= 0) & (pos < size)
    end = size + (pad_begin if pad_end is None else pad_end)
    in_padded = (pos >= -pad_begin) & (pos < end)
    return inside, in_padded


def window_counts(rows: np.ndarray, cols: np.ndarray, rows_div=None, cols_div=None):
    """Distinct (elements, divisor) per pooling window over all output positions, with frequencies.

    Parameters
    ----------
    rows, cols : ndarray, shapes (oh, kh) and (ow, kw), bool
        :func:`tap_masks` ``inside`` along H and W.
    rows_div, cols_div : ndarray, same shapes, bool, optional
        The taps counted in the divisor (default: ``rows``, ``cols``).

    Returns
    -------
    n : ndarray, shape (P,), int
        Elements of the input in the window.
    d : ndarray, shape (P,), int
        Divisor of the window (= n unless other masks are given).
    w : ndarray, shape (P,), float64
        Fraction of the oh * ow output positions with that (n, d); sums to 1.
    """
    rows_div = rows if rows_div is None else rows_div
    cols_div = cols if cols_div is None else cols_div
    n = np.outer(rows.sum(1), cols.sum(1)).ravel()
    d = np.outer(rows_div.sum(1), cols_div.sum(1)).ravel()
    pairs, counts = np.unique(np.stack([n, d], axis=1), axis=0, return_counts=True)
    return pairs[:, 0], pairs[:, 1], counts / counts.sum()


#: quadrature grid for the maximum of n standard normals (M.8): t in [-10, 12], step 2.5e-3
_T = np.linspace(-10.0, 12.0, 8801)
_DT = _T[1] - _T[0]


def _trapezoid(f, axis=-1):
    return (f.sum(axis=axis) - 0.5 * (np.take(f, 0, axis=axis) + np.take(f, -1, axis=axis))) * _DT


def max_of_gaussians_moments(m, v, n: int, rho: float, lo: float = -np.inf, hi: float = np.inf):
    """Mean and variance of ``clip(max_{k<=n} X_k, lo, hi)``, X_k ~ N(m, v) equicorrelated with rho (M.8).

    Write ``X_k = m + s (sqrt(rho) Z_0 + sqrt(1 - rho) Z_k)`` with independent standard normals; then
    ``max_k X_k = m + s sqrt(rho) Z_0 + s sqrt(1 - rho) M_n`` with ``M_n`` the maximum of n
    independent standard normals (density ``n phi(t) Phi(t)^(n-1)``). Given ``M_n = t`` the maximum is
    Gaussian, N(m + s sqrt(1 - rho) t, v rho), so its clipped moments are R.2; one quadrature over t
    (trapezoid, step 2.5e-3 on [-10, 12]) gives the rest. Since clip is nondecreasing,
    ``max_k clip(X_k) = clip(max_k X_k)``: the same formula is the max-pool of a ReLU / ReLU6 output.

    Parameters
    ----------
    m, v : array_like, shape (C,)
        Mean and variance of the Gaussian X (before the clip).
    n : int >= 1
        Elements in the window.
    rho : float in [0, 1]
    lo, hi : float
        Clip bounds (``-inf, inf``: no clip; ``0, inf``: ReLU).

    Returns
    -------
    mean, var : ndarray, shape (C,), float64

    Raises
    ------
    ValueError
        n < 1 or rho outside [0, 1].
    """
    if int(n) < 1:
        raise ValueError(f"n: expected a window of >= 1 elements, got {n}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho: expected a value in [0, 1], got {rho}")
    m = np.asarray(m, dtype=np.float64)
    v = np.maximum(np.asarray(v, dtype=np.float64), 0.0)
    if n == 1 or rho == 1.0:
        return clipped_gaussian_moments(m, v, lo, hi)
    s = np.sqrt(v)
    f = n * _phi(_T) * ndtr(_T) ** (n - 1)                                  # density of M_n
    mu_t = m[..., None] + (s * np.sqrt(1.0 - rho))[..., None] * _T          # E[max | M_n = t]
    cm, cv = clipped_gaussian_moments(mu_t, np.broadcast_to((v * rho)[..., None], mu_t.shape), lo, hi)
    mean = _trapezoid(f * cm)
    second = _trapezoid(f * (cv + cm**2))
    return mean, np.maximum(second - mean**2, 0.0)


def _input_channel_index(W: np.ndarray, group: int) -> np.ndarray:
    """(O, C/group): the input channel that weight W[o, i] reads."""
    O, Cg = W.shape[:2]
    return (np.arange(O)[:, None] // (O // group)) * Cg + np.arange(Cg)[None, :]


def _broadcast_constant(const, shape):
    """A constant of an Add / Mul broadcast against one sample of ``shape`` (no batch axis)."""
    c = np.asarray(const, dtype=np.float64)
    full = np.broadcast_shapes((1,) + tuple(shape), c.shape)
    if full[1:] != tuple(shape):
        raise ValueError(f"constant of shape {c.shape} would change the tensor's shape {tuple(shape)}")
    return np.broadcast_to(c, full).reshape(tuple(shape))


def _per_channel(a, shape):
    """Mean of a per-sample array of ``shape`` over everything but the channel (first) axis."""
    return a.reshape(shape[0], -1).mean(axis=1) if len(shape) > 1 else a


# ----------------------------------------------------------------------------- the rules

def conv_moments(node: Node, x: RuleInput) -> Moments:
    """Conv (dense, grouped, depthwise), with zero padding counted exactly (M.2).

    Input channels independent of each other and over positions, each with the per-channel
    (mean, var) of ``x``; padding contributes exact zeros. For output channel o at position p,
    with T_p the taps that read the input,
    ``E[y_p] = b_o + sum_{(u,v) in T_p} M[o,u,v]``, ``Var[y_p] = sum_{(u,v) in T_p} Q[o,u,v]``,
    ``M[o,u,v] = sum_i W[o,i,u,v] m_i``, ``Q[o,u,v] = sum_i W[o,i,u,v]^2 v_i``.
    The output moments are the spatial averages ``mean_o = avg_p E[y_p]`` and
    ``var_o = avg_p (Var[y_p] + E[y_p]^2) - mean_o^2``; T_p is a product of a row set and a column
    set, so the average runs over the few distinct (row set, column set) pairs.

    Parameters
    ----------
    node : Node
        Conv with params W (O, C/group, kh, kw), optional B (O,); attrs strides, pads, dilations,
        group, auto_pad.
    x : RuleInput
        One input with moments (C,), (C,) and shape (C, H, W); out_shape (O, oh, ow).

    Returns
    -------
    mean, var : ndarray, shape (O,), float64

    Raises
    ------
    ValueError
        The input is not (C, H, W) with C = group * W.shape[1].
    """
    (m, v), shape = x.moments[0], x.shapes[0]
    W = node.params["W"].astype(np.float64)
    group = int(node.attrs.get("group", 1))
    if len(shape) != 3 or shape[0] != group * W.shape[1]:
        raise ValueError(f"input shape {shape} does not match weight {W.shape} with group={group}")
    B = node.params.get("B")
    B = np.zeros(W.shape[0]) if B is None else B.astype(np.float64)
    strides, pads, dil = _geometry(node, SimpleNamespace(shape=(1,) + tuple(shape)), W.shape[2:])
    rows, _ = tap_masks(shape[1], W.shape[2], strides[0], pads[0], dil[0], x.out_shape[1])
    cols, _ = tap_masks(shape[2], W.shape[3], strides[1], pads[1], dil[1], x.out_shape[2])
    idx = _input_channel_index(W, group)
    M = np.einsum("oiuv,oi->ouv", W, m[idx])
    Q = np.einsum("oiuv,oi->ouv", W**2, v[idx])
    R, wr = np.unique(rows.astype(np.float64), axis=0, return_counts=True)
    K, wc = np.unique(cols.astype(np.float64), axis=0, return_counts=True)
    wr, wc = wr / rows.shape[0], wc / cols.shape[0]
    E = B[:, None, None] + np.einsum("ru,ouv,cv->orc", R, M, K)          # E[y_p] per (row set, col set)
    V = np.einsum("ru,ouv,cv->orc", R, Q, K)                             # Var[y_p]
    mean = np.einsum("orc,r,c->o", E, wr, wc)
    second = np.einsum("orc,r,c->o", V + E**2, wr, wc)
    return mean, np.maximum(second - mean**2, 0.0)


def batch_norm_moments(node: Node, x: RuleInput) -> Moments:
    """BatchNormalization, inference: ``y = gamma (x - mu) / sqrt(var + eps) + beta`` per channel (M.3).

    Parameters
    ----------
    node : Node
        params gamma, beta, mean, var (C,); attr epsilon.
    x : RuleInput
        One input, moments (C,).

    Returns
    -------
    mean, var : ndarray, shape (C,): ``a (m - mu) + beta`` and ``a^2 v`` with ``a = gamma / sigma``.

    Raises
    ------
    ValueError
        The input does not have C channels.
    """
    m, v = x.moments[0]
    p = {k: node.params[k].astype(np.float64) for k in ("gamma", "beta", "mean", "var")}
    if m.shape != p["gamma"].shape:
        raise ValueError(f"input moments for {m.shape[0]} channels, the BN has {p['gamma'].shape[0]}")
    a = p["gamma"] / np.sqrt(p["var"] + float(node.attrs.get("epsilon", 1e-5)))
    return a * (m - p["mean"]) + p["beta"], a**2 * v


def relu_moments(node: Node, x: RuleInput) -> Moments:
    """Relu: the rectified Gaussian, R.2 with lo = 0, hi = inf (M.4; the input taken as Gaussian).

    Parameters
    ----------
    node : Node
    x : RuleInput
        One input, moments (C,) or (F,).

    Returns
    -------
    mean, var : ndarray, the input's shape.
    """
    return clipped_gaussian_moments(*x.moments[0], 0.0, np.inf)


def leaky_relu_moments(node: Node, x: RuleInput) -> Moments:
    """LeakyRelu(alpha) of a Gaussian input (M.14): ``f(X) = ReLU(X) - alpha ReLU(-X)``, whose two terms
    are never both non-zero, so ``E f = E ReLU(X) - alpha E ReLU(-X)`` and
    ``E f^2 = E ReLU(X)^2 + alpha^2 E ReLU(-X)^2``, each from R.2 (-X ~ N(-m, v)).

    Parameters
    ----------
    node : Node
        attr ``alpha`` (default 0.01).
    x : RuleInput
        One input, moments (C,) or (F,).

    Returns
    -------
    mean, var : ndarray, the input's shape.

    Examples
    --------
    alpha = 1 is the identity:

    >>> node = Node("l", "LeakyRelu", ["x"], ["y"], {"alpha": 1.0})
    >>> m, v = leaky_relu_moments(node, RuleInput([(np.array([0.3]), np.array([2.0]))], [(1,)], (1,)))
    >>> np.allclose(m, 0.3), np.allclose(v, 2.0)
    (True, True)
    """
    alpha = float(node.attrs.get("alpha", 0.01))
    m, v = (np.asarray(a, dtype=np.float64) for a in x.moments[0])
    mp, vp = clipped_gaussian_moments(m, v, 0.0, np.inf)                 # ReLU(X)
    mn, vn = clipped_gaussian_moments(-m, v, 0.0, np.inf)                # ReLU(-X)
    mean = mp - alpha * mn                                               # M.14
    second = (vp + mp**2) + alpha**2 * (vn + mn**2)
    return mean, np.maximum(second - mean**2, 0.0)


def clip_moments(node: Node, x: RuleInput) -> Moments:
    """Clip(min, max) (ReLU6 = Clip(0, 6)): the clipped Gaussian R.2 (M.4); None bounds are infinite.

    Parameters
    ----------
    node : Node
        attrs min, max (float or None).
    x : RuleInput
        One input, moments (C,) or (F,).

    Returns
    -------
    mean, var : ndarray, the input's shape.
    """
    lo, hi = _clip_bounds(node)
    return clipped_gaussian_moments(*x.moments[0], lo, hi)


def _clip_bounds(node):
    if node.op == "Relu":
        return 0.0, np.inf
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    return (-np.inf if lo is None else float(lo)), (np.inf if hi is None else float(hi))


def add_moments(node: Node, x: RuleInput) -> Moments:
    """Add / Sum of activations and an optional constant (M.5).

    Means add. Variances: every pair of inputs has correlation ``rho_b`` =
    ``x.assumptions.branch_correlation`` per channel (0: independent branches), so
    ``var = sum_i v_i + 2 rho_b sum_{i<j} sqrt(v_i v_j)``. A constant k (broadcast over the sample)
    adds its per-channel average to the mean and the spatial variance of ``m + k`` to the variance,
    exactly: ``var_c = v_c + avg_p (k_cp - avg_p k_cp)^2``.

    Parameters
    ----------
    node : Node
        optional param ``constant``.
    x : RuleInput
        One or more inputs with moments of equal length (or length 1, broadcast), same shapes.

    Returns
    -------
    mean, var : ndarray, shape (C,) or (F,)

    Raises
    ------
    ValueError
        Inputs whose moments cannot be broadcast (different channel counts).
    """
    try:
        means = np.broadcast_arrays(*[mv[0] for mv in x.moments])
        sds = np.broadcast_arrays(*[np.sqrt(np.maximum(mv[1], 0.0)) for mv in x.moments])
    except ValueError:
        raise ValueError(f"inputs with {[mv[0].shape[0] for mv in x.moments]} channels cannot be added") from None
    mean = np.sum(means, axis=0)
    rho = x.assumptions.branch_correlation
    var = np.sum(np.square(sds), axis=0) + rho * (np.sum(sds, axis=0) ** 2 - np.sum(np.square(sds), axis=0))
    if "constant" in node.params:
        k = _broadcast_constant(node.params["constant"], x.out_shape)
        kc = _per_channel(k, x.out_shape)
        spread = _per_channel((k - _expand(kc, x.out_shape)) ** 2, x.out_shape)
        mean, var = mean + kc, var + spread
    return mean, np.maximum(var, 0.0)


def _expand(a, shape):
    return a.reshape((-1,) + (1,) * (len(shape) - 1)) * np.ones(shape) if len(shape) > 1 else a


def mul_moments(node: Node, x: RuleInput) -> Moments:
    """Mul: by a constant (exact per-channel average) and / or of independent activations (M.6).

    A constant k broadcast over the sample: ``mean_c = m_c avg_p k_cp``,
    ``second_c = (v_c + m_c^2) avg_p k_cp^2``. Several activations, taken independent:
    ``E[prod x_i] = prod m_i``, ``E[prod x_i^2] = prod (v_i + m_i^2)``.

    Parameters
    ----------
    node : Node
        optional param ``constant``.
    x : RuleInput
        One or more inputs, moments of equal length (or 1).

    Returns
    -------
    mean, var : ndarray, shape (C,) or (F,)

    Raises
    ------
    ValueError
        Moments of different lengths.
    """
    try:
        means = np.broadcast_arrays(*[mv[0] for mv in x.moments])
        vars_ = np.broadcast_arrays(*[mv[1] for mv in x.moments])
    except ValueError:
        raise ValueError(f"inputs with {[mv[0].shape[0] for mv in x.moments]} channels cannot be multiplied") from None
    mean = np.prod(means, axis=0)
    second = np.prod([v + m**2 for m, v in zip(means, vars_)], axis=0)
    if "constant" in node.params:
        k = _broadcast_constant(node.params["constant"], x.out_shape)
        mean = mean * _per_channel(k, x.out_shape)
        second = second * _per_channel(k**2, x.out_shape)
    return mean, np.maximum(second - mean**2, 0.0)


def concat_moments(node: Node, x: RuleInput) -> Moments:
    """Concat (M.7): along the channel / feature axis the moments concatenate; along a spatial axis
    each channel is a mixture of its parts, weighted by their share of the positions.

    Parameters
    ----------
    node : Node
        attr axis (of the batched tensor; 0, the batch axis, is refused).
    x : RuleInput
        Inputs with shapes that agree off the axis.

    Returns
    -------
    mean, var : ndarray, shape (sum C_i,) on the channel axis, else (C,)

    Raises
    ------
    ValueError
        axis 0 (samples would mix with an unknown weight).
    """
    rank = len(x.out_shape) + 1
    axis = int(node.attrs.get("axis", 1)) % rank
    if axis == 0:
        raise ValueError("Concat along the batch axis: the moments of the result depend on the batch sizes")
    if axis == 1:
        return (np.concatenate([mv[0] for mv in x.moments]), np.concatenate([mv[1] for mv in x.moments]))
    share = np.array([s[axis - 1] for s in x.shapes], dtype=np.float64)
    share = share / share.sum()
    mean = sum(w * mv[0] for w, mv in zip(share, x.moments))
    second = sum(w * (mv[1] + mv[0] ** 2) for w, mv in zip(share, x.moments))
    return mean, np.maximum(second - mean**2, 0.0)


def _pool_geometry(node, x):
    shape = x.shapes[0]
    if len(shape) != 3:
        raise ValueError(f"expects a (C, H, W) input, got {shape}")
    kernel = tuple(node.attrs["kernel_shape"])
    strides, pads, dil = _geometry(node, SimpleNamespace(shape=(1,) + tuple(shape)), kernel)
    if node.op == "AveragePool":
        dil = (1, 1)
    axes = [tap_masks(shape[1 + a], kernel[a], strides[a], pads[a], dil[a], x.out_shape[1 + a], pads[2 + a])
            for a in range(2)]
    return axes


def max_pool_moments(node: Node, x: RuleInput) -> Moments:
    """MaxPool (M.8): the maximum of the window's elements, equicorrelated Gaussians.

    Each window holds n input elements (fewer at padded borders: padding is -inf and never wins),
    taken N(m, v) with pairwise correlation rho = ``x.assumptions.spatial_correlation``; the output
    moments are :func:`max_of_gaussians_moments` averaged over the windows' n (a mixture). When
    the input is ``clip(X)`` of a Relu / Clip (``x.clipped_source``), the maximum is taken of the
    Gaussian X and then clipped (exact, clip being nondecreasing). rho = 1 returns the input moments;
    by Slepian's inequality the mean for any 0 <= rho' <= 1 lies between rho = 1 and rho = 0.

    Parameters
    ----------
    node : Node
        attrs kernel_shape, strides, pads, dilations, ceil_mode, auto_pad.
    x : RuleInput
        One input (C, H, W), moments (C,); optional ``clipped_source``.

    Returns
    -------
    mean, var : ndarray, shape (C,)

    Raises
    ------
    ValueError
        The input is not (C, H, W).
    """
    (rows, _), (cols, _) = _pool_geometry(node, x)
    n, _, w = window_counts(rows, cols)
    if x.clipped_source is not None:
        m, v, lo, hi = x.clipped_source
    else:
        (m, v), lo, hi = x.moments[0], -np.inf, np.inf
    rho = float(x.assumptions.spatial_correlation)
    mean, second = 0.0, 0.0
    for nk, wk in zip(n, w):
        a, b = max_of_gaussians_moments(m, v, int(nk), rho, lo, hi)
        mean, second = mean + wk * a, second + wk * (b + a**2)
    return mean, np.maximum(second - mean**2, 0.0)


def _mean_of_window_moments(m, v, n, d, w, rho):
    """Mixture over windows of (sum of n equicorrelated elements) / d."""
    mean = np.einsum("p,c->c", w * n / d, m)
    var_k = v[None, :] * ((n * (1 - rho) + n**2 * rho) / d**2)[:, None]      # (P, C)
    mean_k = m[None, :] * (n / d)[:, None]
    second = np.einsum("p,pc->c", w, var_k + mean_k**2)
    return mean, np.maximum(second - mean**2, 0.0)


def average_pool_moments(node: Node, x: RuleInput) -> Moments:
    """AveragePool (M.9): a window of n input elements summed and divided by d, equicorrelated.

    d = n, or with ``count_include_pad`` the window's taps inside the input plus its explicit
    padding. Per window ``E = m n / d``, ``Var = v (n (1 - rho) + n^2 rho) / d^2``; the output
    moments are the mixture over the windows. rho = 1 keeps v (for d = n), rho = 0 gives v / n.

    Parameters
    ----------
    node : Node
        attrs kernel_shape, strides, pads, ceil_mode, count_include_pad, auto_pad.
    x : RuleInput
        One input (C, H, W), moments (C,).

    Returns
    -------
    mean, var : ndarray, shape (C,)

    Raises
    ------
    ValueError
        The input is not (C, H, W).
    """
    (rows, rows_pad), (cols, cols_pad) = _pool_geometry(node, x)
    inc = bool(node.attrs.get("count_include_pad", 0))
    n, d, w = window_counts(rows, cols, rows_pad if inc else None, cols_pad if inc else None)
    m, v = x.moments[0]
    return _mean_of_window_moments(m, v, n.astype(float), d.astype(float), w, float(x.assumptions.spatial_correlation))


def global_average_pool_moments(node: Node, x: RuleInput) -> Moments:
    """GlobalAveragePool (M.9): one window of all H W positions, equicorrelated with rho.

    ``mean = m``, ``var = v (rho + (1 - rho) / (H W))``.

    Parameters
    ----------
    node : Node
    x : RuleInput
        One input (C, H, W), moments (C,).

    Returns
    -------
    mean, var : ndarray, shape (C,)

    Raises
    ------
    ValueError
        The input is not (C, H, W).
    """
    shape = x.shapes[0]
    if len(shape) != 3:
        raise ValueError(f"expects a (C, H, W) input, got {shape}")
    hw = float(shape[1] * shape[2])
    m, v = x.moments[0]
    return _mean_of_window_moments(m, v, np.array([hw]), np.array([hw]), np.array([1.0]),
                                   float(x.assumptions.spatial_correlation))


def flatten_moments(node: Node, x: RuleInput) -> Moments:
    """Flatten (and a flatten-kind Reshape, which the importer turns into Flatten) (M.10).

    (N, C, H, W) -> (N, C H W) is channel-major, so feature ``c H W + p`` takes channel c's
    moments: each channel's (mean, var) repeated H W times. A 2-D input passes through.

    Parameters
    ----------
    node : Node
        attr axis (1, or any axis whose leading sample dimensions are all 1).
    x : RuleInput
        One input, shape (C, H, W) or (F,).

    Returns
    -------
    mean, var : ndarray, shape (C H W,)

    Raises
    ------
    ValueError
        An axis that would fold sample dimensions into the batch axis (axis 0, or axis > 1 with
        leading dimensions > 1).
    """
    shape = x.shapes[0]
    axis = int(node.attrs.get("axis", 1)) % (len(shape) + 1)
    if axis == 0 or int(np.prod(shape[:axis - 1])) != 1:
        raise ValueError(f"Flatten(axis={node.attrs.get('axis', 1)}) of {shape} mixes the batch axis with features")
    m, v = x.moments[0]
    reps = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return np.repeat(m, reps), np.repeat(v, reps)


def gemm_moments(node: Node, x: RuleInput) -> Moments:
    """Gemm / MatMul ``y = x W^T + b`` with independent input features (M.11).

    ``mean = W m + b``, ``var = (W * W) v``.

    Parameters
    ----------
    node : Node
        params W (out, in), optional B (out,).
    x : RuleInput
        One input, moments (in,).

    Returns
    -------
    mean, var : ndarray, shape (out,)

    Raises
    ------
    ValueError
        Moments of length other than ``in``.
    """
    m, v = x.moments[0]
    W = node.params["W"]
    if m.shape != (W.shape[1],):
        raise ValueError(f"input moments for {m.shape[0]} features, weight {W.shape} expects {W.shape[1]}")
    B = node.params.get("B")
    mean, var = np.empty(W.shape[0]), np.empty(W.shape[0])
    for i in range(0, W.shape[0], 256):                  # float64 in row blocks (VGG's W is 4096 x 25088)
        Wb = W[i:i + 256].astype(np.float64)
        mean[i:i + 256], var[i:i + 256] = Wb @ m, (Wb * Wb) @ v
    return mean + (0.0 if B is None else B.astype(np.float64)), var


def softmax_moments(node: Node, x: RuleInput) -> Moments:
    """Softmax over all axes from ``axis`` on (M.12): ratio of expectations, lognormal numerators.

    With the inputs Gaussian and independent, ``E[exp x_j] = exp(m_j + v_j / 2) = a_j``; for many
    comparable terms the denominator ``D = sum_k exp x_k`` concentrates at ``sum_k a_k``, giving
    ``E[s_j] ~ a_j / sum_k a_k`` and ``Var[s_j] ~ (a_j / sum_k a_k)^2 (exp(v_j) - 1)``, capped at
    ``mu (1 - mu)`` (the largest variance of a variable in [0, 1]). Exact for the mean when the
    features are exchangeable (E[s_j] = 1 / F). An approximation: its error grows when one feature
    carries a large share of the denominator (stated in derivation 14).

    Parameters
    ----------
    node : Node
        attr axis (default -1).
    x : RuleInput
        One input, shape (F,) or (C, H, W).

    Returns
    -------
    mean, var : ndarray, the input moments' shape

    Raises
    ------
    ValueError
        axis 0 (the batch axis).
    """
    shape = x.shapes[0]
    rank = len(shape) + 1
    axis = int(node.attrs.get("axis", -1)) % rank
    if axis == 0:
        raise ValueError("Softmax over the batch axis")
    m, v = x.moments[0]
    la = m + v / 2                                                   # log E[exp x]
    if len(shape) == 1 or axis == 1:                                 # joint over channels (and positions)
        reps = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        log_d = np.log(reps) + np.logaddexp.reduce(la)
        mean = np.exp(la - log_d)
    else:                                                             # within each channel, F positions alike
        mean = np.full_like(m, 1.0 / float(np.prod(shape[axis - 1:])))
    with np.errstate(divide="ignore"):                   # log(0) = -inf is fine: exp gives 0
        log_var = 2 * np.log(mean) + v + np.log(-np.expm1(-np.maximum(v, 1e-300)))
        log_cap = np.log(mean * (1 - mean))              # Var <= mu (1 - mu) for a variable in [0, 1]
    return mean, np.exp(np.minimum(log_var, log_cap))


def identity_moments(node: Node, x: RuleInput) -> Moments:
    """Identity, and Dropout at inference: the input moments, unchanged (M.13).

    Parameters
    ----------
    node : Node
    x : RuleInput
        One input.

    Returns
    -------
    mean, var : ndarray, the input's (copies).
    """
    m, v = x.moments[0]
    return m.copy(), v.copy()


#: op type -> rule(node, RuleInput) -> (mean, var); covers dfmpc.engine.SUPPORTED_OPS
MOMENT_RULES: dict[str, Callable[[Node, RuleInput], Moments]] = {
    "Conv": conv_moments,
    "BatchNormalization": batch_norm_moments,
    "Relu": relu_moments,
    "Clip": clip_moments,
    "LeakyRelu": leaky_relu_moments,
    "Add": add_moments,
    "Mul": mul_moments,
    "Concat": concat_moments,
    "MaxPool": max_pool_moments,
    "AveragePool": average_pool_moments,
    "GlobalAveragePool": global_average_pool_moments,
    "Flatten": flatten_moments,
    "Gemm": gemm_moments,
    "Softmax": softmax_moments,
    "Identity": identity_moments,
    "Dropout": identity_moments,
}


# ----------------------------------------------------------------------------- shapes

def _out_shape(node: Node, shapes: list) -> tuple:
    """Shape of one sample of ``node``'s output, from its inputs' (no batch axis)."""
    op, s = node.op, tuple(shapes[0])
    if op == "Conv":
        W = node.params["W"]
        if len(s) != 3:
            raise ValueError(f"expects a (C, H, W) input, got {s}")
        strides, pads, dil = _geometry(node, SimpleNamespace(shape=(1,) + s), W.shape[2:])
        return (W.shape[0],) + tuple(conv_output_size(s[1 + a], W.shape[2 + a], strides[a], pads[a], pads[2 + a],
                                                      dil[a]) for a in range(2))
    if op in ("MaxPool", "AveragePool"):
        if len(s) != 3:
            raise ValueError(f"expects a (C, H, W) input, got {s}")
        kernel = tuple(node.attrs["kernel_shape"])
        strides, pads, dil = _geometry(node, SimpleNamespace(shape=(1,) + s), kernel)
        dil = (1, 1) if op == "AveragePool" else dil
        ceil = bool(node.attrs.get("ceil_mode", 0))
        out = tuple(conv_output_size(s[1 + a], kernel[a], strides[a], pads[a], pads[2 + a], dil[a], ceil)
                    for a in range(2))
        if min(out) <= 0:
            raise ValueError(f"input {s} is too small for kernel {kernel}")
        return (s[0],) + out
    if op == "GlobalAveragePool":
        return (s[0], 1, 1)
    if op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % (len(s) + 1)
        return (int(np.prod(s[max(axis - 1, 0):])),)
    if op == "Gemm":
        return (node.params["W"].shape[0],)
    if op == "Concat":
        axis = int(node.attrs["axis"]) % (len(s) + 1)
        if axis == 0:
            return s
        out = list(s)
        out[axis - 1] = sum(t[axis - 1] for t in shapes)
        return tuple(out)
    if op in ("Add", "Mul"):
        full = [(1,) + tuple(t) for t in shapes]
        if "constant" in node.params:
            full.append(node.params["constant"].shape)
        return tuple(np.broadcast_shapes(*full)[1:])
    return s                                                    # elementwise ops and Softmax


def tensor_shapes(graph: Graph) -> dict:
    """Shape of one sample of every tensor (no batch axis), from ``graph.input_shapes`` alone.

    Parameters
    ----------
    graph : Graph
        Every input must have a fully known shape in ``graph.input_shapes``.

    Returns
    -------
    dict of tensor name -> tuple of int, e.g. ``{"x": (3, 32, 32), "fc": (10,)}``

    Raises
    ------
    ValueError
        An input without a known shape, or a node whose inputs cannot have the shapes it needs
        (the message names the node and its op type).
    """
    shapes = {}
    for name in graph.inputs:
        s = graph.input_shapes.get(name)
        if s is None or any(d is None for d in s):
            raise ValueError(f"input {name!r}: the moments need its shape without the batch axis, e.g. (C, H, W); "
                             f"graph.input_shapes gives {s!r}")
        shapes[name] = tuple(int(d) for d in s)
    for node in graph.nodes:
        try:
            shapes[node.outputs[0]] = _out_shape(node, [shapes[t] for t in node.inputs])
        except ValueError as err:
            raise ValueError(f"node {node.name!r} ({node.op}): {err}") from err
    return shapes


# ----------------------------------------------------------------------------- the walk

def _bn_statistics(node: Node) -> Moments:
    return node.params["mean"].astype(np.float64), node.params["var"].astype(np.float64)


def propagate_moments(graph: Graph, input_mean=0.0, input_var=1.0, *,
                      assumptions: Assumptions | None = None) -> dict:
    """Per-channel (mean, var) of every tensor, from the network's own BN statistics (no data).

    Walks the nodes in topological order and applies :data:`MOMENT_RULES` (derivation 14). A tensor
    that a BatchNormalization reads takes that BN's running mean and variance instead (M.1; for a
    conv followed by BN this is derivation 10's R.1); if several BNs read it, the first one in
    topological order.

    Parameters
    ----------
    graph : Graph
        With ``input_shapes`` known for every input.
    input_mean, input_var : float or array_like (C,)
        Moments of the (normalised) network input, per channel; 0 and 1 for standardised images.
    assumptions : Assumptions, optional
        The pooling and branch correlations (default: ``Assumptions()``: rho = 1 within pooling
        windows, independent Add branches).

    Returns
    -------
    dict of tensor name -> (mean, var)
        float64 arrays of shape (C,) for (N, C, H, W) tensors and (F,) for (N, F) tensors; an entry
        for every tensor of the graph.

    Raises
    ------
    ValueError
        An op with no moment rule (naming the op type and the node), an input without a known
        shape, or a node whose inputs do not fit it (naming the node).
    """
    assumptions = Assumptions() if assumptions is None else assumptions
    missing = [f"{n.name!r} ({n.op})" for n in graph.nodes if n.op not in MOMENT_RULES]
    if missing:
        raise ValueError("no moment rule for node " + ", ".join(missing)
                         + f"; rules exist for {sorted(MOMENT_RULES)}")
    shapes = tensor_shapes(graph)
    moments = {}
    for name in graph.inputs:
        C = shapes[name][0]
        try:
            moments[name] = tuple(np.broadcast_to(np.asarray(a, dtype=np.float64), (C,)).copy()
                                  for a in (input_mean, input_var))
        except ValueError:
            raise ValueError(f"input_mean / input_var: expected a scalar or {C} values for input {name!r}") from None
    bn_readers = {}
    for node in graph.nodes:
        if node.op == "BatchNormalization":
            bn_readers.setdefault(node.inputs[0], node)
    producers = {t: n for n in graph.nodes for t in n.outputs}
    for node in graph.nodes:
        src = producers.get(node.inputs[0]) if node.op == "MaxPool" else None
        clipped = None
        if src is not None and src.op in ("Relu", "Clip"):
            clipped = moments[src.inputs[0]] + _clip_bounds(src)
        x = RuleInput([moments[t] for t in node.inputs], [shapes[t] for t in node.inputs],
                      shapes[node.outputs[0]], assumptions, clipped)
        try:
            mean, var = MOMENT_RULES[node.op](node, x)                          # M.2 - M.13
        except ValueError as err:
            raise ValueError(f"moments of node {node.name!r} ({node.op}): {err}") from err
        out = node.outputs[0]
        if out in bn_readers:
            mean, var = _bn_statistics(bn_readers[out])                        # M.1 (R.1)
        moments[out] = (np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64))
    return moments
