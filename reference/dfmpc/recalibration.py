"""Re-calibrating muhat and sigmahat of a quantized conv's BN: one function per named mode.

The paper completes its solution "by recalibrating" the BN statistics of the quantized layer
and never says how without data (derivation 10 states the gap). Four clearly named readings,
each a function ``mode(ctx, site) -> BatchNorm`` registered in :data:`RECALIBRATION_MODES`:

``sequential`` data-free (the default): probe inputs made from the network alone
               (:mod:`dfmpc.probes`) are carried through the full-precision network and through
               the network quantized so far; each BN's trained statistics are moved by the probes'
               mean difference and scaled by their variance ratio
               (``data_free_derivations/15_sequential_recalibration.md``, S.1-S.2); the ratio is
               taken over the images and their views, the difference over the images alone (S.5).
``analytic``   data-free: expected input moments propagated from the previous BNs under a
               Gaussian / rectified-Gaussian assumption (as DFQ's bias correction does), giving the
               shift of the conv output's mean and an estimate of its variance ratio
               (``data_free_derivations/10_analytic_recalibration.md``, R.3-R.4).
``absorb``     data-free, scale only: the quantizer's dropped factor is absorbed
               (``muhat = mu / s``, ``sigmahat = sigma / s``); in the fake-quant form used by the
               pipeline (dequantized weights) this is simply the original BN (derivation 01, Q.1).
``data``       re-measure the quantized conv's output mean and variance on N real images in the
               network quantized so far: not data-free, the upper reference (derivation 10, R.5).

Labels ``R.x`` are derivation 10's, ``S.x`` derivation 15's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .compensation import BatchNorm

if TYPE_CHECKING:                     # annotations only: `import dfmpc` stays free of the engine (issue 14)
    from .engine.graph import Graph, Node


def __getattr__(name):
    """``propagate_moments``, ``clipped_gaussian_moments`` (derivation 14) load :mod:`dfmpc.moments` on first use."""
    if name in ("clipped_gaussian_moments", "propagate_moments"):
        from . import moments
        return getattr(moments, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["RECALIBRATIONS", "RECALIBRATION_MODES", "clipped_gaussian_moments", "propagate_moments", "analytic_bn",
           "measured_bn", "ratio_bn", "channel_moments", "bn_of", "conv_input_groups", "Site", "RecalibrationContext"]

RECALIBRATIONS = ("absorb", "analytic", "sequential", "data")


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
    shift = np.sum((W_q - W).sum(axis=(2, 3)) * m, axis=1)              # derivation 10, R.3
    num, den = np.sum((W_q**2).sum(axis=(2, 3)) * v, axis=1), np.sum((W**2).sum(axis=(2, 3)) * v, axis=1)
    ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    sigma2_hat = (bn.var + bn.eps) * ratio                               # derivation 10, R.4
    return bn.replace(mean=bn.mean + shift, var=np.maximum(sigma2_hat - bn.eps, 0.0))


def measured_bn(bn: BatchNorm, X_q) -> BatchNorm:
    """BN whose mean and variance are re-measured on the quantized conv's output ``X_q`` (N, C, H, W)."""
    X_q = np.asarray(X_q, dtype=np.float64)
    axes = (0,) + tuple(range(2, X_q.ndim))
    return bn.replace(mean=X_q.mean(axis=axes), var=X_q.var(axis=axes))


# ----------------------------------------------------------------------------------------------
# Sequential re-calibration (derivation 15) and the mode registry used by quantize_network.

def ratio_bn(bn: BatchNorm, m_q, v_q, m_fp, v_fp) -> BatchNorm:
    """BN of a quantized conv from probe statistics, as a correction of the trained statistics.

    The probe inputs go through the full-precision network (conv output moments ``m_fp, v_fp``)
    and through the network quantized so far (``m_q, v_q``). The trained BN statistics are moved
    by the probes' difference in mean and scaled by their ratio of variances:

    ``muhat = mu + (m_q - m_fp)``  (S.1),
    ``sigmahat^2 = sigma^2 * v_q / v_fp``  (S.2), ratio 1 where ``v_fp`` is 0
    (``data_free_derivations/15_sequential_recalibration.md``).

    Parameters
    ----------
    bn : BatchNorm with C channels
        The trained BN after the full-precision conv.
    m_q, v_q, m_fp, v_fp : array_like, shape (C,)
        Per-channel mean and variance of the conv's output on the probe inputs, in the quantized
        network built so far and in the full-precision network.

    Returns
    -------
    BatchNorm
        ``mean = muhat``, ``var = max(sigmahat^2 - eps, 0)``; gamma, beta unchanged.

    Raises
    ------
    ValueError
        An argument's shape is not (C,), or a variance is negative or not finite.
    """
    m_q, v_q, m_fp, v_fp = (np.asarray(a, dtype=np.float64) for a in (m_q, v_q, m_fp, v_fp))
    for name, a in (("m_q", m_q), ("v_q", v_q), ("m_fp", m_fp), ("v_fp", v_fp)):
        if a.shape != (bn.channels,) or not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: expected {bn.channels} finite values, got shape {a.shape}")
    if np.any(v_q < 0) or np.any(v_fp < 0):
        raise ValueError("v_q, v_fp: variances must be >= 0")
    tiny = np.finfo(np.float64).tiny
    ratio = np.where(v_fp > tiny, v_q / np.maximum(v_fp, tiny), 1.0)
    sigma2_hat = (bn.var + bn.eps) * ratio                               # derivation 15, S.2
    return bn.replace(mean=bn.mean + (m_q - m_fp), var=np.maximum(sigma2_hat - bn.eps, 0.0))   # derivation 15, S.1


def channel_moments(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased) variance of a batch ``X`` (N, C, ...), in float64: two (C,) arrays.

    Raises
    ------
    ValueError
        ``X`` has fewer than 2 dimensions or no samples.
    """
    X = np.asarray(X)
    if X.ndim < 2 or X.shape[0] == 0:
        raise ValueError(f"X: expected a non-empty batch (N, C, ...), got shape {X.shape}")
    axes = (0,) + tuple(range(2, X.ndim))
    mean = X.mean(axis=axes, dtype=np.float64)
    shape = (1, -1) + (1,) * (X.ndim - 2)
    var = np.square(X - mean.reshape(shape).astype(X.dtype), dtype=np.float64).mean(axis=axes)
    return mean, var


def view_moments(X, n_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """S.5's moments of a batch of probe images followed by their views: the per-channel mean over
    the first ``n_images`` rows (the images) and the (biased) variance over all rows, in float64.

    Parameters
    ----------
    X : ndarray, shape (M, C, ...)
    n_images : int in [1, M], or None (all M rows: :func:`channel_moments`)

    Returns
    -------
    mean, var : ndarray, shape (C,), float64

    Raises
    ------
    ValueError
        ``X`` has fewer than 2 dimensions or no samples, or ``n_images`` is outside [1, M].

    References
    ----------
    ``data_free_derivations/15_sequential_recalibration.md``, S.5.
    """
    mean, var = channel_moments(X)
    if n_images is None or n_images == len(X):
        return mean, var
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or not 1 <= n_images <= len(X):
        raise ValueError(f"n_images: expected an int in [1, {len(X)}] (the rows of the batch), got {n_images!r}")
    return channel_moments(X[:n_images])[0], var                       # S.5: S.1 on the images, S.2 on all rows


class Site:
    """One BN to re-calibrate and the node that computes its input, as a mode sees it (read-only record).

    Attributes
    ----------
    conv : str
        Name of the node whose output the BN reads (same in the full-precision and the quantized
        graph): a quantized conv, or, for a BN after a Concat or Add, that node.
    bn_node : str
        Name of the BatchNormalization node.
    bn : BatchNorm
        The trained (full-precision) statistics, float64.
    W, W_q : ndarray, shape (O, C/group, kh, kw), or None
        Full-precision and dequantized weights; None when the producer is not a conv read only by
        the BN (:attr:`follows_conv` is False).
    group : int or None
    """

    def __init__(self, conv, bn_node, bn, W, W_q, group):
        self.conv, self.bn_node, self.bn, self.W, self.W_q, self.group = conv, bn_node, bn, W, W_q, group

    @property
    def follows_conv(self) -> bool:
        """True for the paper's case, a conv whose only reader is this BN (W and W_q are set)."""
        return self.W is not None


class RecalibrationContext:
    """What the modes share while :func:`dfmpc.quantize_network` walks the network (state accumulates).

    Parameters
    ----------
    fp : Graph
        The full-precision network (never changed).
    g : Graph
        The network being quantized; its BN nodes are updated site by site, in topological order.
    input_mean, input_var : float or (C,)
        Moments of the network input (``analytic``).
    calibration_data : ndarray (N, C, H, W) float32 or None
        Real images (``data`` only).
    probes : ndarray (M, C, H, W) float32 or None
        Data-free probe inputs (``sequential``; :mod:`dfmpc.probes`): the probe images, then their
        views (:func:`dfmpc.probes.make_views`: mirror images or shifted copies), if any.
    n_images : int or None
        How many of the first rows of ``probes`` are the probe images themselves (the mean shift S.1 is
        taken over them, the variance ratio S.2 over all M rows; derivation 15, S.5). None: all M.
    """

    def __init__(self, fp, g, input_mean=0.0, input_var=1.0, calibration_data=None, probes=None, n_images=None):
        self.fp, self.g = fp, g
        self.input_mean, self.input_var = input_mean, input_var
        self.calibration_data, self.probes = calibration_data, probes
        if probes is not None and n_images is not None and not 1 <= n_images <= len(probes):
            raise ValueError(f"n_images: expected 1 to {len(probes)} (the rows of probes), got {n_images}")
        self.n_images = None if probes is None else (len(probes) if n_images is None else int(n_images))
        self._moments = None
        self._streams = {}

    @property
    def moments(self):
        """Per-tensor input moments of the full-precision network (:func:`propagate_moments`), computed once."""
        if self._moments is None:
            from .moments import propagate_moments
            self._moments = propagate_moments(self.fp, self.input_mean, self.input_var)
        return self._moments

    def stream(self, which: str):
        """A :class:`~dfmpc.engine.executor.NodeStream`: ``"data_q"``, ``"probe_q"`` or ``"probe_fp"``."""
        from .engine.executor import NodeStream
        if which not in self._streams:
            x = self.calibration_data if which == "data_q" else self.probes
            if x is None:
                raise ValueError(f"re-calibration needs {'calibration_data' if which == 'data_q' else 'probes'}")
            self._streams[which] = NodeStream(self.g if which.endswith("_q") else self.fp, x)
        return self._streams[which]


def recalibrate_absorb(ctx: RecalibrationContext, site: Site) -> BatchNorm:
    """``absorb``: the trained statistics, with the quantizer's scale absorbed (derivation 01, Q.1)."""
    return site.bn


def recalibrate_analytic(ctx: RecalibrationContext, site: Site) -> BatchNorm:
    """``analytic``: moments propagated through the full-precision network (derivation 10, R.3-R.4).

    R.3-R.4 are a conv's; a BN after a Concat or Add keeps its trained statistics here.
    """
    if not site.follows_conv:
        return site.bn
    in_mean, in_var = ctx.moments[ctx.fp.node(site.conv).inputs[0]]
    return analytic_bn(site.bn, site.W, site.W_q, site.group, in_mean, in_var)


def recalibrate_data(ctx: RecalibrationContext, site: Site) -> BatchNorm:
    """``data`` (not data-free): statistics re-measured on real images in the network quantized so far (derivation 10, R.5)."""
    return measured_bn(site.bn, ctx.stream("data_q").advance(site.conv))


def recalibrate_sequential(ctx: RecalibrationContext, site: Site) -> BatchNorm:
    """``sequential`` (data-free): the probe ratio (derivation 15, S.1-S.2) through the network quantized so far,
    the mean shift over the probe images and the variance ratio over them and their views (S.5)."""
    m_q, v_q = view_moments(ctx.stream("probe_q").advance(site.conv), ctx.n_images)       # S.5
    m_fp, v_fp = view_moments(ctx.stream("probe_fp").advance(site.conv), ctx.n_images)
    return ratio_bn(site.bn, m_q, v_q, m_fp, v_fp)


#: name -> mode(ctx, site) -> BatchNorm; ``data`` is the only one that reads real images.
RECALIBRATION_MODES = {
    "absorb": recalibrate_absorb,
    "analytic": recalibrate_analytic,
    "sequential": recalibrate_sequential,
    "data": recalibrate_data,
}
