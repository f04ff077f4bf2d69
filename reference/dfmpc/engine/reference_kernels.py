"""Plain-loop NumPy twins of the fast pooling, matmul, Winograd and blocked conv kernels, used only by tests.

Written for obviousness, not speed: one Python loop per output element,
float64 accumulation.  Geometry as in ONNX: ``pads = (top, left, bottom, right)``.
The convolutions (:func:`dfmpc.engine.conv2d_f32` and its Numba kernels) are
tested against the float64 reference convolution :func:`dfmpc.conv2d` instead.
"""

from __future__ import annotations

import math

import numpy as np


def _out_size(size, k, stride, pb, pe, dilation, ceil_mode=False):
    span = size + pb + pe - dilation * (k - 1) - 1
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pb:
        out -= 1
    return out


def max_pool2d_loops(x, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode=False):
    """Max pooling by explicit loops; x (N, C, H, W) -> (N, C, oh, ow)."""
    n_img, c_in, h, wd = x.shape
    oh = _out_size(h, kernel[0], strides[0], pads[0], pads[2], dilations[0], ceil_mode)
    ow = _out_size(wd, kernel[1], strides[1], pads[1], pads[3], dilations[1], ceil_mode)
    out = np.full((n_img, c_in, oh, ow), -np.inf)
    for n in range(n_img):
        for c in range(c_in):
            for y in range(oh):
                for xo in range(ow):
                    for i in range(kernel[0]):
                        for j in range(kernel[1]):
                            ih = y * strides[0] - pads[0] + i * dilations[0]
                            iw = xo * strides[1] - pads[1] + j * dilations[1]
                            if 0 <= ih < h and 0 <= iw < wd:
                                out[n, c, y, xo] = max(out[n, c, y, xo], x[n, c, ih, iw])
    return out


def avg_pool2d_loops(x, kernel, strides=(1, 1), pads=(0, 0, 0, 0), ceil_mode=False,
                     count_include_pad=False):
    """Average pooling by explicit loops; x (N, C, H, W) -> (N, C, oh, ow).

    The divisor counts input pixels, plus explicit-padding pixels when
    ``count_include_pad`` (pixels beyond the explicit padding, reachable only
    in ceil mode, are never counted).
    """
    n_img, c_in, h, wd = x.shape
    oh = _out_size(h, kernel[0], strides[0], pads[0], pads[2], 1, ceil_mode)
    ow = _out_size(wd, kernel[1], strides[1], pads[1], pads[3], 1, ceil_mode)
    out = np.zeros((n_img, c_in, oh, ow))
    for n in range(n_img):
        for c in range(c_in):
            for y in range(oh):
                for xo in range(ow):
                    total, count = 0.0, 0
                    for i in range(kernel[0]):
                        for j in range(kernel[1]):
                            ih = y * strides[0] - pads[0] + i
                            iw = xo * strides[1] - pads[1] + j
                            inside = 0 <= ih < h and 0 <= iw < wd
                            in_pad = -pads[0] <= ih < h + pads[2] and -pads[1] <= iw < wd + pads[3]
                            if inside:
                                total += x[n, c, ih, iw]
                            if inside or (count_include_pad and in_pad):
                                count += 1
                    out[n, c, y, xo] = total / count
    return out


def matmul_nt_loops(a, b, bias=None, relu=False, res=None):
    """``act(a @ b.T + bias + res)`` by explicit loops (twin of ``kernels_numba.matmul_nt``).

    Parameters
    ----------
    a : ndarray, shape (P, K)
    b : ndarray, shape (O, K)
    bias : ndarray, shape (O,), optional
    relu : bool
    res : ndarray, shape (P, O), optional

    Returns
    -------
    ndarray, shape (P, O), float64
    """
    n_p, n_k = a.shape
    n_o = b.shape[0]
    out = np.zeros((n_p, n_o))
    for p in range(n_p):
        for o in range(n_o):
            acc = 0.0 if bias is None else float(bias[o])
            for k in range(n_k):
                acc += float(a[p, k]) * float(b[o, k])
            if res is not None:
                acc += float(res[p, o])
            out[p, o] = max(acc, 0.0) if relu else acc
    return out


def winograd_conv_loops(x, w, pads=(1, 1, 1, 1), m=4, bias=None):
    """3x3 stride-1 conv by Winograd F(m x m, 3 x 3), tile by tile, in float64 (twin of
    :func:`dfmpc.engine.winograd.conv3x3`).

    Each ``m x m`` output tile of channel ``o`` is ``sum_c A^T [(G g G^T) * (B^T d B)] A``
    (Lavin & Gray 2016, Eq. (8)) with ``g = w[o, c]`` and ``d`` the ``(m+2) x (m+2)`` input
    tile of channel ``c``, written with the matrices of :mod:`dfmpc.engine.winograd`; outputs
    beyond the conv's size are dropped.  In exact arithmetic this is the convolution.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    w : ndarray, shape (O, C, 3, 3)
    pads : (int, int, int, int)
        ``(top, left, bottom, right)``.
    m : {2, 4}
    bias : ndarray, shape (O,), optional

    Returns
    -------
    ndarray, shape (N, O, H + top + bottom - 2, W + left + right - 2), float64
    """
    from .winograd import AT, BT, G

    bt, g, at = BT[m], G[m], AT[m]
    n_img, c_in, h, wd = x.shape
    c_out = w.shape[0]
    pt, pl, pb, pr = pads
    oh, ow = h + pt + pb - 2, wd + pl + pr - 2
    th, tw = -(-oh // m), -(-ow // m)
    xp = np.zeros((n_img, c_in, th * m + 2, tw * m + 2))
    xp[:, :, pt:pt + h, pl:pl + wd] = x
    out = np.zeros((n_img, c_out, th * m, tw * m))
    for n in range(n_img):
        for ty in range(th):
            for tx in range(tw):
                for o in range(c_out):
                    acc = np.zeros((m + 2, m + 2))
                    for c in range(c_in):
                        d = xp[n, c, ty * m:ty * m + m + 2, tx * m:tx * m + m + 2]
                        acc += (g @ w[o, c].astype(np.float64) @ g.T) * (bt @ d @ bt.T)
                    out[n, o, ty * m:(ty + 1) * m, tx * m:(tx + 1) * m] = at @ acc @ at.T
    out = out[:, :, :oh, :ow]
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :, None, None]
    return out


def conv_blocked_loops(xf, shape, wb, taps, strides, out_hw, bias=None, relu=False, res=None):
    """The register-blocked conv by explicit loops, in float64 (twin of
    :func:`dfmpc.engine.blocked.conv_blocked`, same arguments, same memory layouts).

    ``y[p, o] = act(sum_{t, l} xf[base(p) + taps[t] + l] * wb[t, l, o] + bias[o] + res[p, o])``,
    where ``base(p)`` is the offset of output pixel ``p = (n*oh + y)*ow + x``'s top-left tap in
    the flat padded NHWC input: ``((n*Hp + y*sh)*Wp + x*sw)*C``.

    Parameters
    ----------
    xf : ndarray, shape (N*Hp*Wp*C,)
    shape : (int, int, int, int)
        ``(N, Hp, Wp, C)``.
    wb : ndarray, shape (R, L, O')
        :func:`dfmpc.engine.blocked.blocked_weight`, one ``(L, O')`` matrix per run of taps.
    taps : ndarray, shape (R,)
        :func:`dfmpc.engine.blocked.tap_offsets`.
    strides, out_hw : (int, int)
    bias : ndarray, shape (O,), optional
    relu : bool
    res : ndarray, shape (N*oh*ow, O), optional

    Returns
    -------
    ndarray, shape (N*oh*ow, O), float64
        ``O`` is ``len(bias)``, or ``O'`` without a bias.
    """
    n_img, hp, wp, c = shape
    (sh, sw), (oh, ow) = strides, out_hw
    n_o = wb.shape[2] if bias is None else len(bias)
    out = np.zeros((n_img * oh * ow, n_o))
    for p in range(n_img * oh * ow):
        n, y, x = p // (oh * ow), p % (oh * ow) // ow, p % ow
        base = ((n * hp + y * sh) * wp + x * sw) * c
        for o in range(n_o):
            acc = 0.0 if bias is None else float(bias[o])
            for t in range(len(taps)):
                for ci in range(wb.shape[1]):
                    acc += float(xf[base + taps[t] + ci]) * float(wb[t, ci, o])
            if res is not None:
                acc += float(res[p, o])
            out[p, o] = max(acc, 0.0) if relu else acc
    return out


def _bt6_f32(d):
    """B^T d of F(4x4, 3x3) for a column ``d`` of 6 float32 arrays, in the order of operations of
    :func:`dfmpc.engine.winograd._bt6` (so float32 results are bit for bit the same)."""
    d0, d1, d2, d3, d4, d5 = d
    f4, f5, f2 = np.float32(4), np.float32(5), np.float32(2)
    return [f4 * d0 - f5 * d2 + d4, d3 + d4 - f4 * (d1 + d2), d4 - d3 + f4 * (d1 - d2),
            d4 - d2 + f2 * (d3 - d1), d4 - d2 - f2 * (d3 - d1), f4 * d1 - f5 * d3 + d5]


def _at6_f32(m):
    """A^T m of F(4x4, 3x3), in the order of operations of :func:`dfmpc.engine.winograd._at6`."""
    m0, m1, m2, m3, m4, m5 = m
    a, b, c, d = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return [m0 + a + c, b + np.float32(2) * d, a + np.float32(4) * c, b + np.float32(8) * d + m5]


def winograd_f43_input_f32(xp, th, tw):
    """F(4x4, 3x3) input transform of every tile by whole-array float32 NumPy operations (twin of
    :func:`dfmpc.engine.winograd.input_kernel` ``(4, C)``, same order of operations: equal bits).

    Parameters
    ----------
    xp : ndarray, shape (N, Hp, Wp, C), float32
        Padded NHWC input, ``Hp >= 4*th + 2``, ``Wp >= 4*tw + 2``.
    th, tw : int
        Tiles per image along each axis.

    Returns
    -------
    ndarray, shape (N*th*tw, 36, C), float32
        ``V[t, 6*k + l, c] = (B^T d B)[k, l]`` with ``d`` tile ``t``'s 6 x 6 input of channel ``c``.
    """
    n, c = xp.shape[0], xp.shape[3]
    d = np.empty((n, th, tw, 6, 6, c), np.float32)             # d[n, ty, tx, i, j, c]
    for i in range(6):
        for j in range(6):
            d[:, :, :, i, j] = xp[:, i:i + 4 * th:4, j:j + 4 * tw:4]
    s = _bt6_f32([d[:, :, :, i] for i in range(6)])            # (B^T d)[k] over (n, ty, tx, j, c)
    v = [_bt6_f32([s[k][:, :, :, j] for j in range(6)]) for k in range(6)]
    return np.stack([v[k][l] for k in range(6) for l in range(6)], axis=3).reshape(n * th * tw, 36, c)


def winograd_f43_output_f32(M, n, th, tw, out_hw, bias, res=None, relu=False):
    """F(4x4, 3x3) output transform with the epilogue, by whole-array float32 NumPy operations (twin
    of :func:`dfmpc.engine.winograd.output_kernel` ``(4, O)``, same order of operations: equal bits).

    Parameters
    ----------
    M : ndarray, shape (n*th*tw, 36, O), float32
        The products, a 6 x 6 grid per tile.
    n, th, tw : int
        Images and tiles per image along each axis.
    out_hw : (int, int)
    bias : ndarray, shape (O,), float32
    res : ndarray, shape (n, oh, ow, O), float32, optional
    relu : bool

    Returns
    -------
    ndarray, shape (n, oh, ow, O), float32
        ``act((A^T M A) + bias (+ res))``, tiles cropped to ``oh x ow``.
    """
    oh, ow = out_hw
    o = M.shape[2]
    g = M.reshape(n, th, tw, 6, 6, o)
    s = _at6_f32([g[:, :, :, k] for k in range(6)])            # (A^T M)[i] over (n, ty, tx, j, O)
    y = np.empty((n, th, 4, tw, 4, o), np.float32)
    for i in range(4):
        row = _at6_f32([s[i][:, :, :, j] for j in range(6)])
        for j in range(4):
            y[:, :, i, :, j] = row[j]
    y = y.reshape(n, th * 4, tw * 4, o)[:, :oh, :ow] + np.asarray(bias, np.float32)
    if res is not None:
        y = y + res
    return np.maximum(y, np.float32(0)) if relu else y
