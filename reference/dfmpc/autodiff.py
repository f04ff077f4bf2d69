"""Input gradients through an engine graph: a NumPy reverse pass, one vector-Jacobian product per op.

Used by :mod:`dfmpc.probes` to distil probe images (gradient of a loss on BN inputs with respect to
the network input). Only gradients with respect to *activations* are formed, never with respect to
weights: the network is fixed, the input is optimised.

Each supported op type has a rule ``(forward, vjp)`` in :data:`RULES`:

- ``forward(node, *xs) -> (y, ctx)``: the op's output, as the engine computes it, plus what its VJP
  needs (shapes, a ReLU mask, max-pool winners); works in the dtype of ``xs`` (float32 for the
  engine, float64 for the finite-difference tests).
- ``vjp(node, ctx, gy) -> tuple``: for an upstream gradient ``gy = dL/dy`` (shape of ``y``), the
  gradients ``dL/dx_i = J_i^T gy`` for each input ``x_i`` (shape of ``x_i``).

:func:`record` runs the part of a graph that a set of target tensors depends on and keeps each
node's ``ctx`` (a *tape*); :func:`input_gradient` sweeps it backwards from gradients given at the
target tensors. An op without a rule raises ``ValueError`` naming the op and the node, before any
work is done. The formulas are derived in ``data_free_derivations/16_probe_inputs.md`` (rules
V.1-V.12) and checked against central finite differences and PyTorch autograd in
``tests/test_backward.py``.

Layout. Arguments and results are NCHW, as everywhere in the engine. The dense convolution works
on NHWC memory (im2col rows over ``(i, j, c)``, one BLAS matmul) and returns an NCHW *view* of NHWC
memory, as :func:`dfmpc.engine.conv2d_f32` does; elementwise NumPy ops keep that memory order, so a
chain of convs never transposes. The vectorised kernels (:func:`conv_forward`, :func:`conv_vjp`,
:func:`max_pool_vjp`, :func:`avg_pool_vjp`) each have a plain-loop twin at the end of this module
(``*_loops``), used only by the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numba
import numpy as np
from numba import prange
from numpy.lib.stride_tricks import sliding_window_view

from .engine.conv import conv2d_f32 as _engine_conv2d
from .engine.conv import conv_output_size
from .engine.conv import dense_weight as _dense_weight
from .engine.conv import freeze as _freeze
from .engine.graph import Graph, Node
from .engine.kernels_numba import num_threads as _num_threads
from .engine.kernels_numba import specialised
from .engine.ops import _geometry

__all__ = ["RULES", "Tape", "Program", "record", "input_gradient", "conv_forward", "conv_vjp", "max_pool_forward",
           "max_pool_vjp", "avg_pool_forward", "avg_pool_vjp", "unbroadcast"]


# ----------------------------------------------------------------------------- convolution

def _pad_nhwc(xn: np.ndarray, pads) -> np.ndarray:
    """Zero-pad an NHWC array by ``pads = (top, left, bottom, right)`` (no copy when all zero)."""
    pt, pl, pb, pr = pads
    if not any(pads):
        return xn
    n, h, w, c = xn.shape
    xp = np.zeros((n, h + pt + pb, w + pl + pr, c), xn.dtype)
    xp[:, pt:pt + h, pl:pl + w, :] = xn
    return xp


def _grouped_weight(W: np.ndarray, groups: int) -> np.ndarray:
    """W (O, Cg, kh, kw) as (G, O/G, kh*kw, Cg): the weight matrix of each group, im2col order (i, j, c)."""
    o, cg, kh, kw = W.shape
    return W.reshape(groups, o // groups, cg, kh * kw).transpose(0, 1, 3, 2)


def conv_forward(x: np.ndarray, W: np.ndarray, B: np.ndarray | None = None, strides=(1, 1),
                 pads=(0, 0, 0, 0), dilations=(1, 1), groups: int = 1, method: str = "auto") -> np.ndarray:
    """Convolution (cross-correlation, ONNX geometry): im2col + one matmul per group (BLAS), or the engine's.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    W : ndarray, shape (O, C / groups, kh, kw)
    B : ndarray, shape (O,), optional
    strides, dilations : (int, int)
    pads : (int, int, int, int)
        ``(top, left, bottom, right)``.
    groups : int
        ``C`` and ``O`` divisible by it; ``groups = C`` is a depthwise conv.
    method : {"auto", "im2col", "engine"}
        ``im2col``: this module's im2col + matmul, any float dtype. ``engine``: float32 only,
        :func:`dfmpc.engine.conv2d_f32` (Numba kernels, tested against the float64 reference
        :func:`dfmpc.conv2d`).
        ``auto``: ``engine`` for float32 input, else ``im2col``.

    Returns
    -------
    ndarray, shape (N, O, oh, ow), dtype of x
        An NCHW view of NHWC memory for dense convs (``y.transpose(0, 2, 3, 1)`` is contiguous).

    Raises
    ------
    ValueError
        Channel counts inconsistent with ``groups``, an empty output, or an unknown ``method``.
    """
    if method not in ("auto", "im2col", "engine"):
        raise ValueError(f"method: expected 'auto', 'im2col' or 'engine', got {method!r}")
    if method == "engine" or (method == "auto" and x.dtype == np.float32):
        return _engine_conv2d(x.astype(np.float32, copy=False), np.ascontiguousarray(W, dtype=np.float32),
                              None if B is None else np.asarray(B, np.float32), tuple(strides), tuple(pads),
                              tuple(dilations), groups)
    n, c, h, wd = x.shape
    o, cg, kh, kw = W.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"input has {c} channels and weight {W.shape} with groups={groups}: "
                         f"expected C = {cg}*{groups} and O divisible by groups")
    (sh, sw), (dh, dw) = strides, dilations
    pt, pl, pb, pr = pads
    oh = conv_output_size(h, kh, sh, pt, pb, dh)
    ow = conv_output_size(wd, kw, sw, pl, pr, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {h}x{wd} is too small for kernel {kh}x{kw} (pads {pads}, dilations {dilations})")
    W = W.astype(x.dtype, copy=False)
    xp = _pad_nhwc(x.transpose(0, 2, 3, 1), pads)
    P = n * oh * ow
    if kh == kw == 1:
        cols = np.ascontiguousarray(xp[:, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, :]).reshape(P, c)
    else:
        win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
        win = win[:, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, :, ::dh, ::dw]      # (N, oh, ow, C, kh, kw)
        cols = np.empty((n, oh, ow, kh, kw, c), x.dtype)
        cols[...] = win.transpose(0, 1, 2, 4, 5, 3)
        cols = cols.reshape(P, kh * kw * c)                                           # rows (i, j, c)
    if groups == 1:
        y = cols @ W.transpose(0, 2, 3, 1).reshape(o, -1).T                           # (P, O)
    else:
        Wg = _grouped_weight(W, groups)                                               # (G, Og, k, Cg)
        y = np.einsum("pkgc,gokc->pgo", cols.reshape(P, kh * kw, groups, cg), Wg, optimize=True)
        y = y.reshape(P, o)
    if B is not None:
        y += B.astype(x.dtype, copy=False)
    return y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)


def _axis_phases(size: int, k: int, s: int, p: int, d: int, out: int):
    """V.1' along one axis: the stride-1 correlations that make up the transposed convolution.

    Input positions ``u = a + s u'`` of one residue ``a`` (a *phase*) receive gradient only from the
    kernel taps ``i`` with ``(a + p - i d) % s == 0``, from ``gy`` row ``y = u' + (a + p - i d) / s``.
    Those taps, ordered by increasing offset (decreasing ``i``), are ``len(taps)`` rows ``d / gcd(s, d)``
    apart, so the phase is a stride-1 correlation of ``gy`` (rows ``lo .. hi``, zero-padded by
    ``pad_lo`` / ``pad_hi``) with the taps of the flipped kernel.

    Parameters
    ----------
    size, k, s, p, d, out : int
        Input length, kernel length, stride, begin pad, dilation and output length of the forward conv.

    Returns
    -------
    list of tuple
        One ``(a, taps, dilation, lo, hi, pad_lo, pad_hi, rows)`` per residue ``a < min(s, size)``:
        ``taps`` the kernel indices (list, possibly empty: that phase's gradient is zero), ``rows`` the
        number of positions ``a, a + s, ... < size``. When ``hi < lo`` no ``gy`` row is read.
    """
    g = math.gcd(s, d)
    phases = []
    for a in range(min(s, size)):
        taps = [i for i in range(k - 1, -1, -1) if (a + p - i * d) % s == 0]
        rows = len(range(a, size, s))
        if not taps:
            phases.append((a, taps, 1, 0, -1, 0, 0, rows))
            continue
        dil = d // g
        start = (a + p - taps[0] * d) // s                   # gy row of output u' = 0, first tap
        last = rows - 1 + start + (len(taps) - 1) * dil      # gy row of the last output, last tap
        phases.append((a, taps, dil, max(start, 0), min(last, out - 1), max(-start, 0),
                       max(0, last - (out - 1)), rows))
    return phases


class _TransposedConv:
    """V.1' for one conv geometry: per phase (residue of the input position modulo the stride), the
    sub-kernel of the flipped, channel-swapped weight and the crop / pads of ``gy``, prepared once.

    For stride 1 there is one phase: the transposed convolution with the whole flipped kernel. For
    stride s it is s^2 phases whose kernels together hold each tap once (a 3x3 stride-2 conv: 1x1,
    1x2, 2x1 and 2x2), so no multiply-add meets an inserted zero.

    Parameters
    ----------
    W : ndarray, shape (O, C / groups, kh, kw)
    x_shape : tuple (N, C, H, W)
    gy_hw : (int, int)
        Output height and width of the forward conv.
    strides, pads, dilations, groups
        The forward conv's geometry.
    """

    def __init__(self, W, x_shape, gy_hw, strides, pads, dilations, groups):
        o, cg, kh, kw = W.shape
        og = o // groups
        _, c, h, wd = x_shape
        self.x_shape, self.strides, self.groups = tuple(x_shape), tuple(strides), groups
        Wt = W.reshape(groups, og, cg, kh, kw).transpose(0, 2, 1, 3, 4).reshape(groups * cg, og, kh, kw)
        rows = _axis_phases(h, kh, strides[0], pads[0], dilations[0], gy_hw[0])
        cols = _axis_phases(wd, kw, strides[1], pads[1], dilations[1], gy_hw[1])
        self.phases, self.complete = [], True
        for a, ti, dh, r0, r1, pt, pb, _ in rows:
            for b, tj, dw, c0, c1, pl, pr, _ in cols:
                if not ti or not tj or r1 < r0 or c1 < c0:
                    self.complete = False                   # this phase's gradient is zero
                    continue
                Wp = _freeze(np.array(Wt[:, :, ti][:, :, :, tj], dtype=np.float32, order="C"))   # private
                self.phases.append((a, b, slice(r0, r1 + 1), slice(c0, c1 + 1), (pt, pl, pb, pr), (dh, dw),
                                    Wp, _dense_weight(Wp) if groups == 1 else None))

    def __call__(self, gy: np.ndarray) -> np.ndarray:
        """gx (N, C, H, W) float32 (an NCHW view of NHWC memory for dense convs) of gy (N, O, oh, ow)."""
        gy = gy.astype(np.float32, copy=False)
        n, c, h, wd = self.x_shape
        sh, sw = self.strides
        if len(self.phases) == 1 and self.complete and sh == sw == 1:
            _, _, rs, cs, q, dil, Wp, wt = self.phases[0]
            return _engine_conv2d(gy[:, :, rs, cs], Wp, None, (1, 1), q, dil, self.groups, wt=wt)
        gxn = (np.empty if self.complete else np.zeros)((n, h, wd, c), np.float32)
        for a, b, rs, cs, q, dil, Wp, wt in self.phases:
            ph = _engine_conv2d(gy[:, :, rs, cs], Wp, None, (1, 1), q, dil, self.groups, wt=wt)
            gxn[:, a::sh, b::sw, :] = ph.transpose(0, 2, 3, 1)
        return gxn.transpose(0, 3, 1, 2)


def conv_vjp(gy: np.ndarray, W: np.ndarray, x_shape, strides=(1, 1), pads=(0, 0, 0, 0),
             dilations=(1, 1), groups: int = 1, method: str = "auto") -> np.ndarray:
    """Gradient of a convolution with respect to its input (V.1): the transposed convolution of ``gy``.

    ``gx[n, g*Cg + c, u, v] = sum_{o in group g, i, j, y, x : y*sh - pt + i*dh = u, x*sw - pl + j*dw = v}
    W[o, c, i, j] gy[n, o, y, x]``, computed either as ``gcols = gy W`` (one matmul per group)
    followed by col2im (one strided add per kernel offset), or (V.1') as stride-1 convolutions of
    ``gy`` with the kernel flipped in space and its in/out channels swapped per group, one per
    residue of the input position modulo the stride (sub-pixel phases, :class:`_TransposedConv`), run
    by the engine's float32 kernels.

    Parameters
    ----------
    gy : ndarray, shape (N, O, oh, ow)
        Gradient with respect to the conv output.
    W : ndarray, shape (O, C / groups, kh, kw)
    x_shape : tuple (N, C, H, W)
        Shape of the conv input.
    strides, dilations : (int, int)
    pads : (int, int, int, int)
    groups : int
    method : {"auto", "col2im", "transposed"}
        ``col2im``: any float dtype. ``transposed``: float32 only (V.1', any geometry).
        ``auto``: ``transposed`` for float32 ``gy``, else ``col2im``.

    Returns
    -------
    ndarray, shape (N, C, H, W), dtype of gy
        An NCHW view of NHWC memory for dense convs. The bias has no effect on it.

    Raises
    ------
    ValueError
        Unknown ``method``.
    """
    if method not in ("auto", "col2im", "transposed"):
        raise ValueError(f"method: expected 'auto', 'col2im' or 'transposed', got {method!r}")
    if method == "transposed" or (method == "auto" and gy.dtype == np.float32):
        return _TransposedConv(W, x_shape, gy.shape[2:], strides, pads, dilations, groups)(gy)
    n, c, h, wd = x_shape
    o, cg, kh, kw = W.shape
    _, _, oh, ow = gy.shape
    (sh, sw), (dh, dw) = strides, dilations
    pt, pl, pb, pr = pads
    W = W.astype(gy.dtype, copy=False)
    P = n * oh * ow
    g2 = np.ascontiguousarray(gy.transpose(0, 2, 3, 1)).reshape(P, o)
    if groups == 1:
        gcols = g2 @ W.transpose(0, 2, 3, 1).reshape(o, -1)                          # (P, kh*kw*C)
    else:
        gcols = np.einsum("pgo,gokc->pkgc", g2.reshape(P, groups, o // groups), _grouped_weight(W, groups),
                          optimize=True)
    gcols = gcols.reshape(n, oh, ow, kh, kw, c)
    gxp = np.zeros((n, h + pt + pb, wd + pl + pr, c), gy.dtype)
    for i in range(kh):
        for j in range(kw):
            gxp[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw, :] += gcols[:, :, :, i, j, :]
    gx = gxp[:, pt:pt + h, pl:pl + wd, :] if any(pads) else gxp
    return np.ascontiguousarray(gx).transpose(0, 3, 1, 2)


# ----------------------------------------------------------------------------- pooling

def _pool_geometry(x_shape, kernel, strides, pads, dilations, ceil_mode):
    """Output size and padded extent of a pooling window grid (as :mod:`dfmpc.engine.pooling`)."""
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = kernel, strides, pads, dilations
    oh = conv_output_size(h, kh, sh, pt, pb, dh, ceil_mode)
    ow = conv_output_size(w, kw, sw, pl, pr, dw, ceil_mode)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {h}x{w} is too small for pooling kernel {kh}x{kw} with pads {pads}")
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    hp = max(h + pt + pb, (oh - 1) * sh + eh)
    wp = max(w + pl + pr, (ow - 1) * sw + ew)
    return oh, ow, hp, wp


def _pool_windows(x, kernel, strides, pads, dilations, ceil_mode, fill):
    """(windows (N, C, oh, ow, kh, kw), (oh, ow, hp, wp)) over ``x`` padded with ``fill``."""
    n, c, h, w = x.shape
    oh, ow, hp, wp = _pool_geometry(x.shape, kernel, strides, pads, dilations, ceil_mode)
    (kh, kw), (sh, sw), (pt, pl, _, _), (dh, dw) = kernel, strides, pads, dilations
    xp = np.full((n, c, hp, wp), fill, dtype=x.dtype)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    win = sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    return win[:, :, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, ::dh, ::dw], (oh, ow, hp, wp)


def max_pool_forward(x, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode=False):
    """Max pooling and the winner of each window.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel, strides, dilations : (int, int)
    pads : (int, int, int, int)
        Padding never wins.
    ceil_mode : bool

    Returns
    -------
    y : ndarray, shape (N, C, oh, ow)
    arg : ndarray, shape (N, C, oh, ow), int
        Flat index ``i*kw + j`` of the first maximum in each window (row-major, as PyTorch).
    """
    win, _ = _pool_windows(x, kernel, strides, pads, dilations, ceil_mode, -np.inf)
    n, c, oh, ow, kh, kw = win.shape
    flat = win.reshape(n, c, oh, ow, kh * kw)
    arg = flat.argmax(axis=-1)
    y = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    return y, arg


def max_pool_vjp(gy, arg, x_shape, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                 ceil_mode=False):
    """Gradient of max pooling (V.5): each window's ``gy`` goes to its winner; overlapping windows add.

    Parameters
    ----------
    gy : ndarray, shape (N, C, oh, ow)
    arg : ndarray, shape (N, C, oh, ow), int
        From :func:`max_pool_forward`.
    x_shape : tuple (N, C, H, W)
    kernel, strides, pads, dilations, ceil_mode
        As in the forward.

    Returns
    -------
    ndarray, shape (N, C, H, W), dtype of gy
    """
    n, c, h, w = x_shape
    oh, ow, hp, wp = _pool_geometry(x_shape, kernel, strides, pads, dilations, ceil_mode)
    (kh, kw), (sh, sw), (pt, pl, _, _), (dh, dw) = kernel, strides, pads, dilations
    gxp = np.zeros((n, c, hp, wp), gy.dtype)
    for i in range(kh):
        for j in range(kw):
            gxp[:, :, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw] += \
                np.where(arg == i * kw + j, gy, 0)
    return gxp[:, :, pt:pt + h, pl:pl + w]


def _avg_pool_count(x_shape, kernel, strides, pads, ceil_mode, count_include_pad):
    """Divisor of each average-pool window, shape (1, 1, oh, ow) (as :func:`dfmpc.engine.avg_pool2d`)."""
    n, c, h, w = x_shape
    oh, ow, hp, wp = _pool_geometry(x_shape, kernel, strides, pads, (1, 1), ceil_mode)
    pt, pl, pb, pr = pads
    mask = np.zeros((1, 1, hp, wp))
    if count_include_pad:
        mask[:, :, :h + pt + pb, :w + pl + pr] = 1.0
    else:
        mask[:, :, pt:pt + h, pl:pl + w] = 1.0
    win = sliding_window_view(mask, tuple(kernel), axis=(2, 3))[:, :, :(oh - 1) * strides[0] + 1:strides[0],
                                                                :(ow - 1) * strides[1] + 1:strides[1]]
    return win.sum(axis=(4, 5))


def avg_pool_forward(x, kernel, strides=(1, 1), pads=(0, 0, 0, 0), ceil_mode=False, count_include_pad=False):
    """Average pooling, ONNX semantics (:func:`dfmpc.engine.avg_pool2d`), in the dtype of ``x``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel, strides : (int, int)
    pads : (int, int, int, int)
    ceil_mode, count_include_pad : bool

    Returns
    -------
    ndarray, shape (N, C, oh, ow)
    """
    win, _ = _pool_windows(x, kernel, strides, pads, (1, 1), ceil_mode, 0.0)
    count = _avg_pool_count(x.shape, kernel, strides, pads, ceil_mode, count_include_pad)
    return (win.sum(axis=(4, 5)) / count).astype(x.dtype, copy=False)


def avg_pool_vjp(gy, x_shape, kernel, strides=(1, 1), pads=(0, 0, 0, 0), ceil_mode=False,
                 count_include_pad=False):
    """Gradient of average pooling (V.6): ``gy / count`` spread over each window; padding dropped.

    Parameters
    ----------
    gy : ndarray, shape (N, C, oh, ow)
    x_shape : tuple (N, C, H, W)
    kernel, strides, pads, ceil_mode, count_include_pad
        As in the forward.

    Returns
    -------
    ndarray, shape (N, C, H, W), dtype of gy
    """
    n, c, h, w = x_shape
    oh, ow, hp, wp = _pool_geometry(x_shape, kernel, strides, pads, (1, 1), ceil_mode)
    (kh, kw), (sh, sw), (pt, pl, _, _) = kernel, strides, pads
    g = (gy / _avg_pool_count(x_shape, kernel, strides, pads, ceil_mode, count_include_pad)).astype(gy.dtype)
    gxp = np.zeros((n, c, hp, wp), gy.dtype)
    for i in range(kh):
        for j in range(kw):
            gxp[:, :, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw] += g
    return gxp[:, :, pt:pt + h, pl:pl + w]


def unbroadcast(g: np.ndarray, shape) -> np.ndarray:
    """Sum ``g`` over the axes NumPy broadcasting added or stretched, back to ``shape`` (V.8).

    Parameters
    ----------
    g : ndarray
        A gradient of the broadcast result.
    shape : tuple
        Shape of the operand before broadcasting.

    Returns
    -------
    ndarray, shape ``shape``
    """
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead > 0 else g
    axes = tuple(a for a, s in enumerate(shape) if s == 1 and g.shape[a] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


# ----------------------------------------------------------------------------- the rules

def _conv_rule_forward(node, x):
    if x.ndim != 4:
        raise ValueError(f"expects a rank-4 input, got shape {x.shape}")
    W = node.params["W"]
    strides, pads, dilations = _geometry(node, x, W.shape[2:])
    groups = node.attrs.get("group", 1)
    y = conv_forward(x, W, node.params.get("B"), strides, pads, dilations, groups)
    return y, (x.shape, strides, pads, dilations, groups)


def _conv_rule_vjp(node, ctx, gy):
    x_shape, strides, pads, dilations, groups = ctx
    return (conv_vjp(gy, node.params["W"], x_shape, strides, pads, dilations, groups),)


def _bn_scale_shift(node, dtype):
    p = node.params
    scale = p["gamma"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + float(node.attrs.get("epsilon", 1e-5)))
    shift = p["beta"].astype(np.float64) - p["mean"].astype(np.float64) * scale
    return scale.astype(dtype), shift.astype(dtype)


def _bn_forward(node, x):
    if x.ndim < 2 or x.shape[1] != node.params["gamma"].shape[0]:
        raise ValueError(f"input shape {x.shape} does not have {node.params['gamma'].shape[0]} channels on axis 1")
    scale, shift = _bn_scale_shift(node, x.dtype)
    b = (1, -1) + (1,) * (x.ndim - 2)
    y = x * scale.reshape(b)
    y += shift.reshape(b)
    return y, scale.reshape(b)


def _bn_vjp(node, scale, gy):                                 # V.2: eval-mode BN is affine per channel
    return (gy * scale,)


def _relu_forward(node, x):
    return np.maximum(x, x.dtype.type(0)), x > 0


def _mask_vjp(node, mask, gy):                                # V.3 / V.4: gy where the op is the identity
    return (np.where(mask, gy, gy.dtype.type(0)),)


def _leaky_relu_forward(node, x):
    alpha = x.dtype.type(node.attrs.get("alpha", 0.01))
    slope = np.where(x >= 0, x.dtype.type(1), alpha)              # dy/dx: 1, or alpha below 0
    return x * slope, slope


def _slope_vjp(node, slope, gy):                              # V.13: gy times the local slope
    return (gy * slope,)


def _clip_forward(node, x):
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    y = np.clip(x, None if lo is None else x.dtype.type(lo), None if hi is None else x.dtype.type(hi))
    mask = np.ones(x.shape, bool)
    if lo is not None:
        mask &= x >= lo
    if hi is not None:
        mask &= x <= hi
    return y, mask


def _max_pool_forward(node, x):
    if x.ndim != 4:
        raise ValueError(f"expects a rank-4 input, got shape {x.shape}")
    kernel = tuple(node.attrs["kernel_shape"])
    strides, pads, dilations = _geometry(node, x, kernel)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    y, arg = max_pool_forward(x, kernel, strides, pads, dilations, ceil)
    return y, (arg, x.shape, kernel, strides, pads, dilations, ceil)


def _max_pool_vjp(node, ctx, gy):
    arg, *geom = ctx
    return (max_pool_vjp(gy, arg, *geom),)


def _avg_pool_forward(node, x):
    if x.ndim != 4:
        raise ValueError(f"expects a rank-4 input, got shape {x.shape}")
    kernel = tuple(node.attrs["kernel_shape"])
    strides, pads, _ = _geometry(node, x, kernel)
    geom = (kernel, strides, pads, bool(node.attrs.get("ceil_mode", 0)),
            bool(node.attrs.get("count_include_pad", 0)))
    return avg_pool_forward(x, *geom), (x.shape,) + geom


def _avg_pool_vjp(node, ctx, gy):
    return (avg_pool_vjp(gy, *ctx),)


def _gap_forward(node, x):
    if x.ndim != 4:
        raise ValueError(f"expects a rank-4 input, got shape {x.shape}")
    return x.mean(axis=(2, 3), keepdims=True), x.shape


def _gap_vjp(node, x_shape, gy):                              # V.7
    return (np.broadcast_to(gy / (x_shape[2] * x_shape[3]), x_shape),)


def _add_forward(node, *xs):
    y = xs[0]
    for z in xs[1:]:
        y = y + z
    if "constant" in node.params:
        y = y + node.params["constant"].astype(y.dtype)
    return y, [x.shape for x in xs]


def _add_vjp(node, shapes, gy):                               # V.8
    return tuple(unbroadcast(gy, s) for s in shapes)


def _mul_forward(node, *xs):
    y = xs[0]
    for z in xs[1:]:
        y = y * z
    const = node.params.get("constant")
    if const is not None:
        y = y * const.astype(y.dtype)
    return y, xs


def _mul_vjp(node, xs, gy):                                   # product rule
    const = node.params.get("constant")
    out = []
    for i, x in enumerate(xs):
        g = gy if const is None else gy * const.astype(gy.dtype)
        for k, z in enumerate(xs):
            if k != i:
                g = g * z
        out.append(unbroadcast(g, x.shape))
    return tuple(out)


def _concat_forward(node, *xs):
    axis = node.attrs["axis"]
    return np.concatenate(xs, axis=axis), (axis, [x.shape[axis] for x in xs])


def _concat_vjp(node, ctx, gy):                               # V.9
    axis, sizes = ctx
    return tuple(np.split(gy, np.cumsum(sizes)[:-1], axis=axis))


def _flatten_forward(node, x):
    axis = node.attrs.get("axis", 1) % max(x.ndim, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1), x.shape


def _reshape_vjp(node, x_shape, gy):                          # V.10
    return (gy.reshape(x_shape),)


def _gemm_forward(node, x):
    W = node.params["W"]
    if x.ndim != 2 or x.shape[1] != W.shape[1]:
        raise ValueError(f"input shape {x.shape} does not match weight {W.shape} (expected (N, {W.shape[1]}))")
    y = x @ W.T.astype(x.dtype, copy=False)
    if "B" in node.params:
        y = y + node.params["B"].astype(x.dtype)
    return y, None


def _gemm_vjp(node, ctx, gy):                                 # V.11
    return (gy @ node.params["W"].astype(gy.dtype, copy=False),)


def _identity_forward(node, x):
    return x, None


def _identity_vjp(node, ctx, gy):                             # V.12
    return (gy,)


@dataclass(frozen=True)
class Rule:
    """The forward (with saved context) and the vector-Jacobian product of one op type."""

    forward: Callable
    vjp: Callable


#: op type -> Rule; the op set that :func:`record` and :func:`input_gradient` can differentiate.
RULES: dict[str, Rule] = {
    "Conv": Rule(_conv_rule_forward, _conv_rule_vjp),
    "BatchNormalization": Rule(_bn_forward, _bn_vjp),
    "Relu": Rule(_relu_forward, _mask_vjp),
    "Clip": Rule(_clip_forward, _mask_vjp),
    "LeakyRelu": Rule(_leaky_relu_forward, _slope_vjp),
    "MaxPool": Rule(_max_pool_forward, _max_pool_vjp),
    "AveragePool": Rule(_avg_pool_forward, _avg_pool_vjp),
    "GlobalAveragePool": Rule(_gap_forward, _gap_vjp),
    "Add": Rule(_add_forward, _add_vjp),
    "Mul": Rule(_mul_forward, _mul_vjp),
    "Concat": Rule(_concat_forward, _concat_vjp),
    "Flatten": Rule(_flatten_forward, _reshape_vjp),
    "Gemm": Rule(_gemm_forward, _gemm_vjp),
    "Identity": Rule(_identity_forward, _identity_vjp),
    "Dropout": Rule(_identity_forward, _identity_vjp),
}


# ----------------------------------------------------------------------------- fused float32 kernels

def _nhwc_rows(a):
    """An (N, C, H, W) array whose memory is NHWC (C-contiguous after ``transpose(0, 2, 3, 1)``) as its
    (N*H*W, C) rows, a view; None for any other layout."""
    if a.ndim != 4:
        return None
    t = a.transpose(0, 2, 3, 1)
    return t.reshape(-1, a.shape[1]) if t.flags.c_contiguous else None


def _rows_variant(parallel):
    """The one-pass float32 row kernels of V.2-V.3, with (``parallel=True``) or without Numba's thread
    pool. Distillation runs them at one Numba thread (each part of its batch on a worker thread,
    :data:`dfmpc.probes.DISTILL_THREADS`), where handing each call to the pool costs more than the
    loop (as the engine found for its kernels: ``engine/kernels_numba.py``). ``parallel`` is read in
    each body so that Numba's on-disk cache tells the variants apart. Both variants make the same
    operations per element, so the same bits."""

    @specialised("par" if parallel else "ser", parallel=parallel, nogil=True)
    def affine(x, scale, shift, out):                   # pragma: no cover (compiled)
        if parallel and x.shape[0] < 0:                 # never: see the docstring
            return
        for p in prange(x.shape[0]):
            for c in range(x.shape[1]):
                v = x[p, c] * scale[c]
                out[p, c] = v + shift[c]

    @specialised("par" if parallel else "ser", parallel=parallel, nogil=True)
    def affine_relu(x, scale, shift, out, mask):        # pragma: no cover (compiled)
        if parallel and x.shape[0] < 0:                 # never: see the docstring
            return
        for p in prange(x.shape[0]):
            for c in range(x.shape[1]):
                v = x[p, c] * scale[c]
                v = v + shift[c]
                pos = v > 0
                mask[p, c] = pos
                out[p, c] = v if pos else np.float32(0)

    @specialised("par" if parallel else "ser", parallel=parallel, nogil=True)
    def relu(x, out, mask):                             # pragma: no cover (compiled)
        if parallel and x.shape[0] < 0:                 # never: see the docstring
            return
        for p in prange(x.shape[0]):
            for c in range(x.shape[1]):
                v = x[p, c]
                pos = v > 0
                mask[p, c] = pos
                out[p, c] = v if pos else np.float32(0)

    @specialised("par" if parallel else "ser", parallel=parallel, nogil=True)
    def masked(gy, mask, out):                          # pragma: no cover (compiled)
        if parallel and gy.shape[0] < 0:                # never: see the docstring
            return
        for p in prange(gy.shape[0]):
            for c in range(gy.shape[1]):
                out[p, c] = gy[p, c] if mask[p, c] else np.float32(0)

    @specialised("par" if parallel else "ser", parallel=parallel, nogil=True)
    def masked_scale(gy, mask, scale, acc, out):        # pragma: no cover (compiled)
        if parallel and gy.shape[0] < 0:                # never: see the docstring
            return
        use_acc, use_mask = acc.shape[0] > 0, mask.shape[0] > 0
        for p in prange(gy.shape[0]):
            for c in range(gy.shape[1]):
                v = gy[p, c] * scale[c] if (not use_mask or mask[p, c]) else np.float32(0)
                out[p, c] = acc[p, c] + v if use_acc else v

    @specialised("par" if parallel else "ser", parallel=parallel, nogil=True)
    def masked_scale_affine(gy, mask, scale, z, b, c0, out):   # pragma: no cover (compiled)
        if parallel and gy.shape[0] < 0:                # never: see the docstring
            return
        use_mask = mask.shape[0] > 0
        for p in prange(gy.shape[0]):
            for c in range(gy.shape[1]):
                a = z[p, c] * b[c]
                a = a + c0[c]
                v = gy[p, c] * scale[c] if (not use_mask or mask[p, c]) else np.float32(0)
                out[p, c] = a + v

    return affine, affine_relu, relu, masked, masked_scale, masked_scale_affine


#: ``out[p, c] = x[p, c] * scale[c] + shift[c]``, rounded after each operation (as NumPy); x, out (P, K)
#: ``_affine_relu_rows``: the same, then ``out = max(out, 0)`` and ``mask = out > 0`` (BN then ReLU, one pass)
#: ``_relu_rows(x, out, mask)``: ``out = max(x, 0)``, ``mask = x > 0``, one pass
#: ``_masked_rows(gy, mask, out)``: ``out = where(mask, gy, 0)`` (V.3)
#: ``_masked_scale_rows(gy, mask, scale, acc, out)``: ``out = acc + (gy * scale if mask else 0)``;
#: ``acc`` of shape (0, 0): no accumulator; ``mask`` of shape (0, 0): all true (V.3, V.2, the chain rule's sum)
#: ``_masked_scale_affine_rows(gy, mask, scale, z, b, c0, out)``: the same with ``acc = z * b + c0`` formed
#: in the pass (an :class:`AffineSeed`)
(_affine_rows_par, _affine_relu_rows_par, _relu_rows_par, _masked_rows_par,
 _masked_scale_rows_par, _masked_scale_affine_rows_par) = _rows_variant(True)
(_affine_rows_ser, _affine_relu_rows_ser, _relu_rows_ser, _masked_rows_ser,
 _masked_scale_rows_ser, _masked_scale_affine_rows_ser) = _rows_variant(False)


def _pick(par, ser):
    """The row kernel for the current Numba thread count (the serial one at one thread)."""
    def run(*args):
        return (par if _num_threads() > 1 else ser)(*args)
    run.__name__, run.__doc__ = par.__name__, f"{par.__name__}: the pool variant at 2+ Numba threads, else the serial one."
    return run


_affine_rows = _pick(_affine_rows_par, _affine_rows_ser)
_affine_relu_rows = _pick(_affine_relu_rows_par, _affine_relu_rows_ser)
_relu_rows = _pick(_relu_rows_par, _relu_rows_ser)
_masked_rows = _pick(_masked_rows_par, _masked_rows_ser)
_masked_scale_rows = _pick(_masked_scale_rows_par, _masked_scale_rows_ser)
_masked_scale_affine_rows = _pick(_masked_scale_affine_rows_par, _masked_scale_affine_rows_ser)


def bn_forward_rows(x, scale, shift):
    """V.2's forward in one pass: ``x * scale + shift`` per channel (axis 1), float32 NHWC-memory batches.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32
    scale, shift : ndarray, shape (C,), float32

    Returns
    -------
    ndarray, shape (N, C, H, W), float32
        Equal to ``x * scale[:, None, None] + shift[:, None, None]`` bit for bit (twin:
        :func:`bn_forward_numpy`); an NCHW view of NHWC memory when ``x`` is one.
    """
    rows = _nhwc_rows(x)
    if rows is None:
        return bn_forward_numpy(x, scale, shift)
    n, c, h, w = x.shape
    out = np.empty((n, h, w, c), np.float32)
    _affine_rows(rows, scale, shift, out.reshape(-1, c))
    return out.transpose(0, 3, 1, 2)


def bn_forward_numpy(x, scale, shift):
    """Twin of :func:`bn_forward_rows`: NumPy broadcasting, any layout and dtype."""
    b = (1, -1) + (1,) * (x.ndim - 2)
    y = x * scale.reshape(b)
    y += shift.reshape(b)
    return y


def relu_forward_rows(x):
    """V.3's forward in one pass: ``(max(x, 0), x > 0)`` for a float32 array of any layout.

    Parameters
    ----------
    x : ndarray, float32

    Returns
    -------
    y : ndarray, float32, shape and memory order of x (for C- or NHWC-contiguous x)
    mask : ndarray, bool, same shape
        Equal to NumPy's ``np.maximum(x, 0), x > 0`` (twin: :func:`relu_forward_numpy`).
    """
    rows = _nhwc_rows(x)
    if rows is not None:
        n, c, h, w = x.shape
        y, m = np.empty((n, h, w, c), np.float32), np.empty((n, h, w, c), np.bool_)
        _relu_rows(rows, y.reshape(-1, c), m.reshape(-1, c))
        return y.transpose(0, 3, 1, 2), m.transpose(0, 3, 1, 2)
    if x.flags.c_contiguous and x.ndim >= 1:
        y, m = np.empty(x.shape, np.float32), np.empty(x.shape, np.bool_)
        k = x.shape[-1] if x.ndim > 1 else x.size
        _relu_rows(x.reshape(-1, k), y.reshape(-1, k), m.reshape(-1, k))
        return y, m
    return relu_forward_numpy(x)


def relu_forward_numpy(x):
    """Twin of :func:`relu_forward_rows`."""
    return np.maximum(x, x.dtype.type(0)), x > 0


def bn_relu_forward_rows(x, scale, shift):
    """V.2's forward then V.3's in one pass: ``y = max(x * scale + shift, 0)`` and its mask, for a BN
    whose output only a ReLU reads (the tape never keeps the BN output then).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32
    scale, shift : ndarray, shape (C,), float32

    Returns
    -------
    y : ndarray, shape (N, C, H, W), float32
    mask : ndarray of bool, shape (N, C, H, W)
        Equal bit for bit to :func:`relu_forward_rows` of :func:`bn_forward_rows` (twin:
        :func:`bn_relu_forward_numpy`): the affine value is rounded to float32 before it is compared
        with 0; NCHW views of NHWC memory when ``x`` is one.

    Example
    -------
    >>> x = np.array([[[[-1.0]], [[2.0]]]], np.float32)
    >>> y, m = bn_relu_forward_rows(x, np.float32([2, 1]), np.float32([1, -3]))
    >>> y.ravel().tolist(), m.ravel().tolist()         # max(x * scale + shift, 0)
    ([0.0, 0.0], [False, False])
    """
    rows = _nhwc_rows(x)
    if rows is None:
        return bn_relu_forward_numpy(x, scale, shift)
    n, c, h, w = x.shape
    y, m = np.empty((n, h, w, c), np.float32), np.empty((n, h, w, c), np.bool_)
    _affine_relu_rows(rows, scale, shift, y.reshape(-1, c), m.reshape(-1, c))
    return y.transpose(0, 3, 1, 2), m.transpose(0, 3, 1, 2)


def bn_relu_forward_numpy(x, scale, shift):
    """Twin of :func:`bn_relu_forward_rows`: the two rules' NumPy expressions one after the other."""
    return relu_forward_numpy(bn_forward_numpy(x, scale, shift))


def masked_vjp(gy, mask):
    """V.3 (and V.4) in one pass: ``where(mask, gy, 0)`` for float32 ``gy`` and a bool mask of one layout.

    Parameters
    ----------
    gy : ndarray, float32
    mask : ndarray of bool, gy's shape

    Returns
    -------
    ndarray, float32, gy's shape
        Equal bit for bit to ``np.where(mask, gy, 0)`` (twin: :func:`masked_vjp_numpy`).
    """
    g2, m2 = _nhwc_rows(gy), _nhwc_rows(mask)
    if g2 is not None and m2 is not None:
        n, c, h, w = gy.shape
        out = np.empty((n, h, w, c), np.float32)
        _masked_rows(g2, m2, out.reshape(-1, c))
        return out.transpose(0, 3, 1, 2)
    if gy.dtype == np.float32 and gy.size > 0 and gy.flags.c_contiguous and mask.flags.c_contiguous \
            and gy.shape == mask.shape:
        out = np.empty(gy.shape, np.float32)
        k = gy.shape[-1] if gy.ndim > 1 else gy.size
        _masked_rows(gy.reshape(-1, k), mask.reshape(-1, k), out.reshape(-1, k))
        return out
    return masked_vjp_numpy(gy, mask)


def masked_vjp_numpy(gy, mask):
    """Twin of :func:`masked_vjp`."""
    return np.where(mask, gy, gy.dtype.type(0))


_NONE2 = np.zeros((0, 0), np.float32)
_NOMASK = np.zeros((0, 0), np.bool_)


def masked_scale_vjp(gy, mask, scale, acc=None):
    """V.3 then V.2 then the chain rule's sum, one pass: ``acc + where(mask, gy, 0) * scale``.

    Parameters
    ----------
    gy : ndarray, shape (N, C, H, W), float32
        Gradient at the ReLU output (or at the BN output when ``mask`` is None).
    mask : ndarray of bool, shape (N, C, H, W), or None
        The ReLU's ``x > 0`` (None: no ReLU).
    scale : ndarray, shape (C,), float32
        BN's per-channel scale.
    acc : ndarray, shape (N, C, H, W), float32, or AffineSeed, optional
        Gradient already accumulated at the BN input; added first. An :class:`AffineSeed` is formed
        in the same pass (``acc.value()`` bit for bit).

    Returns
    -------
    ndarray, shape (N, C, H, W), float32
        Equal bit for bit to ``acc + np.where(mask, gy, 0) * scale[:, None, None]`` (twin:
        :func:`masked_scale_vjp_numpy`); an NCHW view of NHWC memory.
    """
    g2 = _nhwc_rows(gy)
    m2 = None if mask is None else _nhwc_rows(mask)
    if isinstance(acc, AffineSeed):
        z2 = _nhwc_rows(acc.z)
        if g2 is None or (mask is not None and m2 is None) or z2 is None:
            return masked_scale_vjp_numpy(gy, mask, scale, acc.value())
        n, c, h, w = gy.shape
        out = np.empty((n, h, w, c), np.float32)
        _masked_scale_affine_rows(g2, _NOMASK if m2 is None else m2, scale, z2, acc.b, acc.c, out.reshape(-1, c))
        return out.transpose(0, 3, 1, 2)
    a2 = None if acc is None else _nhwc_rows(acc)
    if g2 is None or (mask is not None and m2 is None) or (acc is not None and a2 is None):
        return masked_scale_vjp_numpy(gy, mask, scale, acc)
    n, c, h, w = gy.shape
    out = np.empty((n, h, w, c), np.float32)
    _masked_scale_rows(g2, _NOMASK if m2 is None else m2, scale, _NONE2 if a2 is None else a2, out.reshape(-1, c))
    return out.transpose(0, 3, 1, 2)


def masked_scale_vjp_numpy(gy, mask, scale, acc=None):
    """Twin of :func:`masked_scale_vjp`: the rules' NumPy expressions in the same order."""
    g = gy if mask is None else np.where(mask, gy, gy.dtype.type(0))
    g = g * scale.reshape((1, -1) + (1,) * (gy.ndim - 2))
    return g if acc is None else acc + g


class AffineSeed:
    """A seed gradient for :func:`input_gradient` given as ``z * b + c`` per channel (axis 1), formed
    only where it is used: the BN that reads ``z`` adds it in its own V.2 pass (D.3's ``dL/dz`` is
    affine in the BN input ``z``; data_free_derivations/16_probe_inputs.md).

    Parameters
    ----------
    z : ndarray, shape (N, C, H, W), float32
    b, c : ndarray, shape (C,), float32

    Example
    -------
    >>> z = np.arange(4, dtype=np.float32).reshape(1, 2, 1, 2)
    >>> AffineSeed(z, np.float32([1, 2]), np.float32([0, 1])).value().ravel().tolist()   # z b + c
    [0.0, 1.0, 5.0, 7.0]
    """

    __slots__ = ("z", "b", "c", "shape", "dtype")

    def __init__(self, z, b, c):
        self.z, self.b, self.c, self.shape, self.dtype = z, b, c, z.shape, z.dtype

    def value(self):
        """The gradient as an array, :func:`bn_forward_rows` ``(z, b, c)``."""
        return bn_forward_rows(self.z, self.b, self.c)


def _formed(g):
    """An :class:`AffineSeed` as its array; any other gradient as it is."""
    return g.value() if isinstance(g, AffineSeed) else g


class _Masked:
    """A ReLU's input gradient not yet formed, ``where(mask, gy, 0)``: the BN before it fuses it into V.2."""

    __slots__ = ("gy", "mask")

    def __init__(self, gy, mask):
        self.gy, self.mask = gy, mask

    def value(self):
        return np.where(self.mask, self.gy, self.gy.dtype.type(0))


class _BNReLU:
    """A BN output that only a ReLU reads, formed together with that ReLU's output and mask
    (:func:`bn_relu_forward_rows`); the ReLU's step hands them on."""

    __slots__ = ("y", "mask", "shape")

    def __init__(self, y, mask):
        self.y, self.mask, self.shape = y, mask, y.shape


# ----------------------------------------------------------------------------- tape

@dataclass
class Tape:
    """What :func:`record` kept: the nodes run (topological order), each node's context, the targets.

    Attributes
    ----------
    graph : Graph
    input_name : str
    input_shape : tuple (N, C, H, W)
    nodes : list of Node
        The nodes the targets depend on, in topological order.
    ctx : dict of str to object
        Node name -> the context its rule's forward saved.
    values : dict of str to ndarray
        Target tensor name -> its value.
    program : Program, optional
        The program that recorded the tape.
    steps : list, optional
        The program's prepared forward / VJP of each node (used by :func:`input_gradient`).
    """

    graph: Graph
    input_name: str
    input_shape: tuple
    nodes: list[Node]
    ctx: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    program: object = None
    steps: list = None


def _needed_nodes(graph: Graph, targets) -> list[Node]:
    """Nodes whose outputs the targets depend on, in topological order."""
    need = set(targets)
    chosen = []
    for node in reversed(graph.nodes):
        if any(t in need for t in node.outputs):
            chosen.append(node)
            need.update(node.inputs)
    return chosen[::-1]


class _Step:
    """One node of a :class:`Program` for one input shape and dtype: its rule's forward and VJP, with
    what does not depend on the values (geometry, float32 weight matrices, BN scale) computed once."""

    def __init__(self, node: Node, x_shapes, dtype, lazy_relu: bool = False, fuse_relu: bool = False):
        self.node, self.rule = node, RULES[node.op]
        self.forward, self.vjp, self.vjp_acc = self._generic_forward, self._generic_vjp, None
        if node.op == "Conv" and dtype == np.float32 and len(x_shapes[0]) == 4:
            self._prepare_conv(x_shapes[0])
        elif node.op == "BatchNormalization" and len(x_shapes[0]) >= 2 \
                and x_shapes[0][1] == node.params["gamma"].shape[0]:
            scale, shift = _bn_scale_shift(node, dtype)
            b = (1, -1) + (1,) * (len(x_shapes[0]) - 2)
            self.scale_c, self.shift_c = scale, shift
            self.scale, self.shift = scale.reshape(b), shift.reshape(b)
            self.forward, self.vjp = self._bn_forward, self._bn_vjp
            if dtype == np.float32 and len(x_shapes[0]) == 4:
                self.forward, self.vjp_acc = self._bn_forward_rows, self._bn_vjp_acc
                if fuse_relu:                                   # its only reader is a lazy ReLU
                    self.forward = self._bn_relu_forward_rows
        elif node.op == "Relu" and dtype == np.float32:
            self.lazy = lazy_relu
            self.forward, self.vjp = self._relu_forward, self._relu_vjp

    def _generic_forward(self, *xs):
        return self.rule.forward(self.node, *xs)

    def _generic_vjp(self, ctx, gy):
        return self.rule.vjp(self.node, ctx, gy)

    # Conv, float32: the engine conv with the weight matrix made once; V.1' prepared once
    def _prepare_conv(self, x_shape):
        node, W = self.node, self.node.params["W"]

        class _Shape:                                           # _geometry reads only x.shape
            shape = tuple(x_shape)
        strides, pads, dilations = _geometry(node, _Shape, W.shape[2:])
        groups = node.attrs.get("group", 1)
        oh = conv_output_size(x_shape[2], W.shape[2], strides[0], pads[0], pads[2], dilations[0])
        ow = conv_output_size(x_shape[3], W.shape[3], strides[1], pads[1], pads[3], dilations[1])
        if oh <= 0 or ow <= 0 or x_shape[1] != W.shape[1] * groups or W.shape[0] % groups:
            return                                              # the generic rule raises the error
        self.W32 = _freeze(np.array(W, dtype=np.float32, order="C"))   # a private copy: no per-call check
        B = node.params.get("B")
        self.B32 = None if B is None else np.asarray(B, np.float32)
        self.wt = _dense_weight(self.W32) if groups == 1 else None
        self.geom = (tuple(x_shape), tuple(strides), tuple(pads), tuple(dilations), groups)
        self.transposed = _TransposedConv(self.W32, x_shape, (oh, ow), strides, pads, dilations, groups)
        self.forward, self.vjp = self._conv_forward, self._conv_vjp

    def _conv_forward(self, x):
        _, strides, pads, dilations, groups = self.geom
        return _engine_conv2d(x, self.W32, self.B32, strides, pads, dilations, groups, wt=self.wt), self.geom

    def _conv_vjp(self, ctx, gy):
        return (self.transposed(gy),)

    def _bn_forward(self, x):                                    # as _bn_forward, scale and shift made once
        y = x * self.scale
        y += self.shift
        return y, self.scale

    def _bn_vjp(self, scale, gy):
        return (gy * scale,)

    def _bn_forward_rows(self, x):                               # float32: one pass (bn_forward_rows)
        return bn_forward_rows(x, self.scale_c, self.shift_c), self.scale

    def _bn_relu_forward_rows(self, x):                          # float32: BN and the ReLU after it, one pass
        return _BNReLU(*bn_relu_forward_rows(x, self.scale_c, self.shift_c)), self.scale

    def _bn_vjp_acc(self, ctx, gy, acc):
        """V.2 (after V.3 when gy is a ReLU's _Masked gradient) added to ``acc`` (or None), one pass."""
        if isinstance(gy, _Masked):
            return masked_scale_vjp(gy.gy, gy.mask, self.scale_c, acc)
        return masked_scale_vjp(gy, None, self.scale_c, acc)     # acc: an array, AffineSeed or None

    def _relu_forward(self, x):
        if isinstance(x, _BNReLU):                               # formed by the BN before it
            return x.y, x.mask
        return relu_forward_rows(x)

    def _relu_vjp(self, mask, gy):                               # V.3, left to the BN before it if lazy
        return (_Masked(gy, mask),) if self.lazy else (masked_vjp(gy, mask),)


class Program:
    """The part of a graph that some target tensors depend on, prepared for many :meth:`record` calls.

    :func:`record` and :func:`input_gradient` on a program's tapes give the same values as building
    everything per call; the program keeps, per input shape and dtype, each node's geometry, the
    float32 weight matrices of the convs (forward and V.1'), and BN's scale and shift.

    Parameters
    ----------
    graph : Graph
        A single-input graph. Not modified; its weights are read when a shape is first recorded.
    targets : list of str
        Tensor names to compute and keep (any tensors of the graph, not the input).

    Raises
    ------
    ValueError
        A graph with several inputs, an unknown target, or an op on the way without a rule in
        :data:`RULES` (the message names the op and the node).
    """

    def __init__(self, graph: Graph, targets):
        if len(graph.inputs) != 1:
            raise ValueError(f"graph: expected one input, got {graph.inputs}")
        targets = list(targets)
        produced = {t for n in graph.nodes for t in n.outputs}
        unknown = [t for t in targets if t not in produced]
        if unknown:
            raise ValueError(f"targets: unknown tensors {unknown}")
        nodes = _needed_nodes(graph, targets)
        missing = [n for n in nodes if n.op not in RULES]
        if missing:
            raise ValueError("no vector-Jacobian product for " + ", ".join(f"op {n.op} (node {n.name!r})"
                                                                            for n in missing)
                             + f"; differentiable ops: {sorted(RULES)}")
        self.graph, self.targets, self.nodes = graph, targets, nodes
        self.input_name = graph.inputs[0]
        last_use = {}
        for i, n in enumerate(nodes):
            for t in n.inputs:
                last_use[t] = i
        keep = set(targets)
        # per node: the input tensors whose last reader it is (dropped from memory after it runs)
        self._drop = [[t for t in dict.fromkeys(n.inputs) if last_use[t] == i and t not in keep]
                      for i, n in enumerate(nodes)]
        self._produced = {n.outputs[0] for n in nodes}
        # a ReLU that alone reads a BN's output leaves its VJP to the BN (fused V.3 + V.2)
        readers = {}
        for n in nodes:
            for t in n.inputs:
                readers[t] = readers.get(t, 0) + 1
        bn_out = {n.outputs[0] for n in nodes if n.op == "BatchNormalization"}
        self._lazy_relu = {n.name for n in nodes if n.op == "Relu" and n.inputs[0] in bn_out
                           and readers[n.inputs[0]] == 1 and n.inputs[0] not in keep}
        # the BN before such a ReLU forms the ReLU's output and mask in its own pass
        self._fused_bn = {n.inputs[0] for n in nodes if n.name in self._lazy_relu}
        self._steps = {}                                        # (shape, dtype) -> list of _Step

    def record(self, x: np.ndarray) -> Tape:
        """Run the program on ``x``; see :func:`record`.

        Parameters
        ----------
        x : ndarray, shape (N, C, H, W), float32 or float64

        Returns
        -------
        Tape
        """
        if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
            raise TypeError(f"x: expected a float32 or float64 ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
        key = (x.shape, x.dtype)
        steps = self._steps.get(key)
        tape = Tape(self.graph, self.input_name, x.shape, self.nodes, program=self)
        env = {self.input_name: x}
        new = steps is None
        if new:
            steps = []
        for i, node in enumerate(self.nodes):
            xs = [env[t] for t in node.inputs]
            try:
                if new:
                    steps.append(_Step(node, [v.shape for v in xs], x.dtype, node.name in self._lazy_relu,
                                       node.outputs[0] in self._fused_bn))
                y, ctx = steps[i].forward(*xs)
            except (ValueError, TypeError) as err:
                raise ValueError(f"node {node.name!r} ({node.op}) on input shapes "
                                 f"{[v.shape for v in xs]}: {err}") from err
            tape.ctx[node.name] = ctx
            env[node.outputs[0]] = y
            for t in self._drop[i]:
                env.pop(t, None)
        if new:
            self._steps[key] = steps
        tape.values = {t: env[t] for t in self.targets}
        tape.steps = steps
        return tape


def record(graph: Graph, x: np.ndarray, targets) -> Tape:
    """Run the part of ``graph`` that ``targets`` depend on, keeping what the backward pass needs.

    A one-off :class:`Program`; build a program once to record many batches.

    Parameters
    ----------
    graph : Graph
        A single-input graph. Not modified.
    x : ndarray, shape (N, C, H, W), float32 or float64
        The input batch (one chunk: everything is kept in memory).
    targets : list of str
        Tensor names to compute and keep (any tensors of the graph, not the input).

    Returns
    -------
    Tape
        ``tape.values[t]`` is the value of target ``t`` (shape as the engine gives it).

    Raises
    ------
    ValueError
        A graph with several inputs, an unknown target, an op on the way without a rule in
        :data:`RULES` (the message names the op and the node), or a node failing on its input.
    TypeError
        ``x`` is not a float32 / float64 ndarray.
    """
    if len(graph.inputs) != 1:
        raise ValueError(f"graph: expected one input, got {graph.inputs}")
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x: expected a float32 or float64 ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
    return Program(graph, targets).record(x)


def input_gradient(tape: Tape, seeds: dict) -> np.ndarray:
    """Reverse sweep: the gradient at the graph input given gradients at some recorded tensors.

    For a scalar ``L`` that depends on the input only through the seeded tensors ``t``, with
    ``seeds[t] = dL/dt`` (the partial derivative of L's *direct* dependence on t), returns ``dL/dx``:
    each node, last to first, adds ``J^T gy`` of its inputs into their accumulated gradients (chain
    rule; a tensor read by several nodes sums their contributions).

    Parameters
    ----------
    tape : Tape
        From :func:`record` or :meth:`Program.record`.
    seeds : dict of str to ndarray or AffineSeed
        Tensor name (one of the tape's targets or any tensor its nodes produce) -> gradient of that
        tensor's shape (an :class:`AffineSeed` is formed inside the pass of the BN that reads it).

    Returns
    -------
    ndarray, shape (N, C, H, W)
        ``dL/dx``, zeros if no seed depends on the input.

    Raises
    ------
    ValueError
        A seed for a tensor the tape did not compute, or of the wrong shape.
    """
    produced = tape.program._produced if tape.program is not None else {n.outputs[0] for n in tape.nodes}
    grads = {}
    for t, g in seeds.items():
        if t not in produced:
            raise ValueError(f"seeds: tensor {t!r} was not computed by the tape")
        if t in tape.values and (g.shape if isinstance(g, AffineSeed) else np.shape(g)) != tape.values[t].shape:
            raise ValueError(f"seeds: gradient for {t!r} has shape {np.shape(g)}, expected {tape.values[t].shape}")
        grads[t] = g
    steps = getattr(tape, "steps", None)
    for i in range(len(tape.nodes) - 1, -1, -1):
        node = tape.nodes[i]
        gy = grads.pop(node.outputs[0], None)
        if gy is None:
            continue
        ctx = tape.ctx[node.name]
        gy = _formed(gy)
        if steps is not None and steps[i].vjp_acc is not None:       # one input; adds into its gradient
            t = node.inputs[0]
            grads[t] = steps[i].vjp_acc(ctx, gy, grads.get(t))
            continue
        if isinstance(gy, _Masked):                                   # pragma: no cover (not made otherwise)
            gy = gy.value()
        gxs = steps[i].vjp(ctx, gy) if steps is not None else RULES[node.op].vjp(node, ctx, gy)
        for t, gx in zip(node.inputs, gxs):
            grads[t] = gx if t not in grads else _formed(grads[t]) + gx
    g = _formed(grads.get(tape.input_name))
    if g is None:
        return np.zeros(tape.input_shape, dtype=next(iter(seeds.values())).dtype if seeds else np.float32)
    return np.ascontiguousarray(g)


# ----------------------------------------------------------------------------- plain-loop twins (tests)

def conv_vjp_loops(gy, W, x_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1):
    """Twin of :func:`conv_vjp` by explicit loops over every output and kernel tap (float64)."""
    n_img, c_in, h, wd = x_shape
    c_out, cg, kh, kw = W.shape
    og = c_out // groups
    _, _, oh, ow = gy.shape
    gx = np.zeros(x_shape)
    for n in range(n_img):
        for o in range(c_out):
            g = o // og
            for y in range(oh):
                for xo in range(ow):
                    for c in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                u = y * strides[0] - pads[0] + i * dilations[0]
                                v = xo * strides[1] - pads[1] + j * dilations[1]
                                if 0 <= u < h and 0 <= v < wd:
                                    gx[n, g * cg + c, u, v] += float(W[o, c, i, j]) * float(gy[n, o, y, xo])
    return gx


def max_pool_vjp_loops(gy, x, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode=False):
    """Twin of :func:`max_pool_vjp` by explicit loops: each window's first maximum takes its gradient."""
    n_img, c_in, h, wd = x.shape
    _, _, oh, ow = gy.shape
    gx = np.zeros(x.shape)
    for n in range(n_img):
        for c in range(c_in):
            for y in range(oh):
                for xo in range(ow):
                    best, where = -np.inf, None
                    for i in range(kernel[0]):
                        for j in range(kernel[1]):
                            u = y * strides[0] - pads[0] + i * dilations[0]
                            v = xo * strides[1] - pads[1] + j * dilations[1]
                            if 0 <= u < h and 0 <= v < wd and x[n, c, u, v] > best:
                                best, where = x[n, c, u, v], (u, v)
                    if where is not None:
                        gx[n, c, where[0], where[1]] += gy[n, c, y, xo]
    return gx


def avg_pool_vjp_loops(gy, x_shape, kernel, strides=(1, 1), pads=(0, 0, 0, 0), ceil_mode=False,
                       count_include_pad=False):
    """Twin of :func:`avg_pool_vjp` by explicit loops: count each window's divisor, spread gy over it."""
    n_img, c_in, h, wd = x_shape
    _, _, oh, ow = gy.shape
    gx = np.zeros(x_shape)
    for y in range(oh):
        for xo in range(ow):
            taps, count = [], 0
            for i in range(kernel[0]):
                for j in range(kernel[1]):
                    u = y * strides[0] - pads[0] + i
                    v = xo * strides[1] - pads[1] + j
                    inside = 0 <= u < h and 0 <= v < wd
                    in_pad = -pads[0] <= u < h + pads[2] and -pads[1] <= v < wd + pads[3]
                    count += inside or (count_include_pad and in_pad)
                    if inside:
                        taps.append((u, v))
            for u, v in taps:
                gx[:, :, u, v] += gy[:, :, y, xo] / count
    return gx
