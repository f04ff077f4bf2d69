"""Winograd minimal filtering F(m x m, 3 x 3) for dense 3x3 stride-1 convs, NHWC, float32.

A 3x3 conv of an ``(m+2) x (m+2)`` input tile ``d`` (one channel) with a filter ``g`` is
(Lavin & Gray 2016, Eq. (8)):

    Y = A^T [ (G g G^T) * (B^T d B) ] A            (``*``: element-wise, over an alpha x alpha grid)

with ``alpha = m + 2`` and constant matrices ``B, G, A`` (:data:`BT`, :data:`G`, :data:`AT`).
Summed over input channels, the element-wise products become, for each of the alpha^2 grid
points ``xi``, one matrix product over channels:

    M[xi] (T, O) = V[xi] (T, C) @ U[xi] (C, O)     V = B^T d B per tile,  U = G g G^T per filter

which this module hands to BLAS as one batched ``np.matmul`` (alpha^2 products), or, for a multiple of
16 output channels, to its own register-blocked loop (:func:`products_kernel`), which is faster on the
small products of narrow layers.  The input
transform (``V``) and the output transform (``Y = A^T M A``, with the bias, a residual and ReLU
applied as each output is written) are Numba kernels vectorised over the channels, which are
contiguous in NHWC memory.  Multiplies per output pixel and channel pair: 9 direct,
``alpha^2 / m^2`` here: 4 for F(2x2, 3x3) (2.25x fewer), 2.25 for F(4x4, 3x3) (4x fewer).

Rounding: the transforms' constants grow with m, and so does the float32 error. Measured against
the float64 reference :func:`dfmpc.conv2d`, relative to the largest sum of ``|w| |x|`` of an output
(random data, C = 8..64; ``tests/test_engine_winograd.py`` states the bounds it checks): the direct
float32 kernel <= 6e-8 (about one float32 epsilon), F(2x2, 3x3) <= 1.3e-7 (~2x the direct
kernel's), F(4x4, 3x3) <= 1.7e-6 (~25x: its transforms multiply by up to 8 and by 1/24).

Twin: :func:`dfmpc.engine.reference_kernels.winograd_conv_loops` (plain loops, float64) and the
reference convolution :func:`dfmpc.conv2d`.

References
----------
A. Lavin and S. Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016.
"""

from __future__ import annotations

import contextlib
import math
import threading
import types

import numba
import numpy as np
from numba import njit

from .blocked import _stack_f32
from .kernels_numba import _DOT_MATH, padded, specialised

#: B^T, G, A^T of F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray 2016, Sec. 4.1 and 4.2),
#: interpolation points 0, 1, -1 (m = 2) and 0, 1, -1, 2, -2 (m = 4), plus infinity.
BT = {
    2: np.array([[1, 0, -1, 0],
                 [0, 1, 1, 0],
                 [0, -1, 1, 0],
                 [0, 1, 0, -1]], np.float64),
    4: np.array([[4, 0, -5, 0, 1, 0],
                 [0, -4, -4, 1, 1, 0],
                 [0, 4, -4, -1, 1, 0],
                 [0, -2, -1, 2, 1, 0],
                 [0, 2, -1, -2, 1, 0],
                 [0, 4, 0, -5, 0, 1]], np.float64),
}
G = {
    2: np.array([[1, 0, 0],
                 [1 / 2, 1 / 2, 1 / 2],
                 [1 / 2, -1 / 2, 1 / 2],
                 [0, 0, 1]], np.float64),
    4: np.array([[1 / 4, 0, 0],
                 [-1 / 6, -1 / 6, -1 / 6],
                 [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6],
                 [1 / 24, -1 / 12, 1 / 6],
                 [0, 0, 1]], np.float64),
}
AT = {
    2: np.array([[1, 1, 1, 0],
                 [0, 1, -1, -1]], np.float64),
    4: np.array([[1, 1, 1, 1, 1, 0],
                 [0, 1, -1, 2, -2, 0],
                 [0, 1, 1, 4, 4, 0],
                 [0, 1, -1, 8, -8, 1]], np.float64),
}


def weight_transform(w: np.ndarray, m: int) -> np.ndarray:
    """``U[xi] = (G g G^T)`` for every filter, as alpha^2 matrices (C, O), float32.

    Parameters
    ----------
    w : ndarray, shape (O, C, 3, 3)
    m : {2, 4}
        Output tile size.

    Returns
    -------
    ndarray, shape ((m+2)**2, C, O), float32
        ``U[i*alpha + j, c, o] = (G w[o, c] G^T)[i, j]``, computed in float64.

    Examples
    --------
    The defining identity on one tile: ``A^T [(G g G^T) * (B^T d B)] A`` is the 3x3 correlation.

    >>> rng = np.random.default_rng(0)
    >>> g, d = rng.normal(size=(3, 3)), rng.normal(size=(6, 6))
    >>> U = weight_transform(g[None, None], 4)[:, 0, 0].reshape(6, 6)
    >>> Y = AT[4] @ (U * (BT[4] @ d @ BT[4].T)) @ AT[4].T
    >>> direct = [[(g * d[i:i + 3, j:j + 3]).sum() for j in range(4)] for i in range(4)]
    >>> np.allclose(Y, direct, atol=1e-5)
    True
    """
    g = G[m]
    u = np.einsum("ik,ockl,jl->ijco", g, np.asarray(w, np.float64), g, optimize=True)
    a = m + 2
    return np.ascontiguousarray(u.reshape(a * a, w.shape[1], w.shape[0]), dtype=np.float32)


def tile_counts(oh: int, ow: int, m: int) -> tuple[int, int]:
    """Tiles per image along each axis: ``ceil(oh / m), ceil(ow / m)``."""
    return -(-oh // m), -(-ow // m)


# ----------------------------------------------------------------------------------------------
# F(2x2, 3x3): alpha = 4

@njit
def _bt4(d):
    """B^T d for one column d of 4 (F(2x2, 3x3))."""
    d0, d1, d2, d3 = d
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit
def _at4(m):
    """A^T m for one column m of 4 (F(2x2, 3x3))."""
    m0, m1, m2, m3 = m
    return m0 + m1 + m2, m1 - m2 - m3


# F(4x4, 3x3): alpha = 6

@njit
def _bt6(d):
    """B^T d for one column d of 6 (F(4x4, 3x3))."""
    d0, d1, d2, d3, d4, d5 = d
    return (np.float32(4) * d0 - np.float32(5) * d2 + d4,
            d3 + d4 - np.float32(4) * (d1 + d2),
            d4 - d3 + np.float32(4) * (d1 - d2),
            d4 - d2 + np.float32(2) * (d3 - d1),
            d4 - d2 - np.float32(2) * (d3 - d1),
            np.float32(4) * d1 - np.float32(5) * d3 + d5)


@njit
def _at6(m):
    """A^T m for one column m of 6 (F(4x4, 3x3))."""
    m0, m1, m2, m3, m4, m5 = m
    a, b = m1 + m2, m1 - m2
    c, d = m3 + m4, m3 - m4
    return (m0 + a + c,
            b + np.float32(2) * d,
            a + np.float32(4) * c,
            b + np.float32(8) * d + m5)



@njit
def _tile_origin(t, th, tw, m):
    """Image and top-left output pixel of tile ``t`` (tiles numbered image by image, row-major)."""
    n, r = t // (th * tw), t % (th * tw)
    return n, (r // tw) * m, (r % tw) * m


@njit
def _act(v, relu):
    return max(v, np.float32(0)) if relu else v


# ----------------------------------------------------------------------------------------------
# Kernels.  The channel count is a compile-time constant (one kernel per m and C, made by the
# factories below and cached by Numba on disk): every access of the inner channel loop is then a
# constant distance from a few base pointers, so LLVM vectorises that loop after a handful of
# run-time overlap checks (with C a run-time value it gave up: "too many memory checks needed").
# Layouts: ``xf`` the zero-padded NHWC input, flat; ``vf`` the transformed tiles (T, alpha^2, C),
# flat, tile-major; ``mf`` the products (T, alpha^2, O), flat; ``out`` / ``res`` NHWC, flat.

_KERNELS = {}
_NO_RES = np.empty(0, np.float32)        # "no residual" for the output kernels (one compiled variant)


_KERNELS_LOCK = threading.RLock()      # the batch-split workers may ask for a kernel at once; re-entered
#                                        when the blocks kernel makes the three it calls


def _kernel(key, factory, size):
    k = _KERNELS.get(key)
    if k is None:
        with _KERNELS_LOCK:
            k = _KERNELS.get(key)
            if k is None:
                k = _KERNELS[key] = factory(size)
    return k


def input_kernel(m: int, c: int):
    """The compiled input transform of F(m x m, 3x3) for ``c`` channels (see :func:`_input_f43`)."""
    return _kernel(("in", m, c), _input_f23 if m == 2 else _input_f43, c)


def output_kernel(m: int, o: int):
    """The compiled output transform of F(m x m, 3x3) for ``o`` channels (see :func:`_output_f43`)."""
    return _kernel(("out", m, o), _output_f23 if m == 2 else _output_f43, o)


def _channel_block(c: int) -> int:
    """Channels per pass of the F(4x4, 3x3) transforms: the largest divisor of ``c`` up to 64 (their
    intermediate ``c_block x 36`` values live in a fixed stack buffer)."""
    return max(d for d in range(1, min(c, 64) + 1) if c % d == 0)


@njit(inline="always")
def _bt6_store(d0, d1, d2, d3, d4, d5, dst, i, step):
    """``dst[i + k*step] = (B^T d)[k]`` for one column ``d`` of 6 (F(4x4, 3x3)); the same
    expressions as :func:`_bt6`."""
    dst[i] = np.float32(4) * d0 - np.float32(5) * d2 + d4
    dst[i + step] = d3 + d4 - np.float32(4) * (d1 + d2)
    dst[i + 2 * step] = d4 - d3 + np.float32(4) * (d1 - d2)
    dst[i + 3 * step] = d4 - d2 + np.float32(2) * (d3 - d1)
    dst[i + 4 * step] = d4 - d2 - np.float32(2) * (d3 - d1)
    dst[i + 5 * step] = np.float32(4) * d1 - np.float32(5) * d3 + d5


def _input_f43(C):
    """F(4x4, 3x3) input transform for C channels:
    ``kernel(xf, shape, th, tw, t0, t1, vf, pt=0, pl=0)`` sets ``vf[q, 6*k + l, c] = (B^T d B)[k, l]``
    for the tiles ``t = t0 + q < t1``, where ``d = xp[n, 4*ty : 4*ty + 6, 4*tx : 4*tx + 6, c]`` and
    ``xp`` is the input ``xf`` reshaped to ``shape = (N, H, W, C)``, shifted by ``pt`` rows and
    ``pl`` columns of zeros and extended by zeros below and to the right as far as the tiles
    reach: the padding is read, not copied.  A tile that overlaps the padding reads its pixels
    column by column, a row in the padding from a stack buffer of zeros, and a column in the
    padding is a column of zeros: the same values, so the same bits, as a copy of the tile with its
    zeros (which this kernel made before, at 2-3x the time: on a 2-core AMD EPYC Zen 4, one thread,
    64 images, 0.31 against 0.56 ms for 16 channels at 28 x 28, 0.08 against 0.22 ms for 64
    channels at 7 x 7, where every tile reaches into the padding).

    Vectorised over the channels by LLVM's loop vectoriser (Numba leaves its SLP vectoriser off):
    the innermost loops run over :func:`_channel_block` channels and write either a stack buffer
    (``B^T d``, which cannot alias the arrays) or one output array at constant distances (C is a
    compile-time constant), so no run-time overlap checks are needed.  The expressions and their
    order are those of :func:`_bt6`, so the bits are those of a scalar loop.  On a 2-core AMD EPYC
    (AVX2, LLVM ``znver1``; one thread), 16 channels at 28 x 28, 64 images: 1.3-1.5 ms instead of
    3.0 ms for the scalar-compiled kernel before (the 32- and 64-channel shapes ran about as fast
    before).
    """
    CB = _channel_block(C)

    @specialised(f"in4_c{C}", nogil=True, boundscheck=False)
    def kernel(xf, shape, th, tw, t0, t1, vf, pt=0, pl=0):
        h, wd = shape[1], shape[2]
        rs, a2c = wd * C, 36 * C
        s = numba.carray(_stack_f32(2304), (2304,))          # B^T d, order (k, j, c), <= 36 * 64
        z = numba.carray(_stack_f32(64), (64,))              # the padding: a row of zeros, <= 64 channels
        for c in range(CB):
            z[c] = np.float32(0)
        zero = np.float32(0)
        for q in range(t1 - t0):
            n, y, x = _tile_origin(t0 + q, th, tw, 4)
            ry, rx = y - pt, x - pl                           # the tile's top-left input pixel
            inside = ry >= 0 and ry + 6 <= h and rx >= 0 and rx + 6 <= wd
            b = ((n * h + ry) * wd + rx) * C
            v = vf[q * a2c:(q + 1) * a2c]
            for c0 in range(0, C, CB):
                if inside:                                    # rows of the tile, from channel c0
                    e = b + c0
                    r0, r1, r2 = xf[e:e + 6 * C], xf[e + rs:e + rs + 6 * C], xf[e + 2 * rs:e + 2 * rs + 6 * C]
                    r3, r4 = xf[e + 3 * rs:e + 3 * rs + 6 * C], xf[e + 4 * rs:e + 4 * rs + 6 * C]
                    r5 = xf[e + 5 * rs:e + 5 * rs + 6 * C]
                    for j in range(6):                        # columns: B^T d[:, j]
                        for c in range(CB):
                            u = j * C + c
                            _bt6_store(r0[u], r1[u], r2[u], r3[u], r4[u], r5[u], s, j * CB + c, 6 * CB)
                else:                                         # a border tile: the padding's pixels are zeros
                    for j in range(6):
                        col = rx + j
                        if 0 <= col < wd:                     # its six pixels, a row outside read from z
                            p = ((n * h + ry) * wd + col) * C + c0
                            a0 = xf[p:p + CB] if 0 <= ry < h else z[:CB]
                            a1 = xf[p + rs:p + rs + CB] if 0 <= ry + 1 < h else z[:CB]
                            a2 = xf[p + 2 * rs:p + 2 * rs + CB] if 0 <= ry + 2 < h else z[:CB]
                            a3 = xf[p + 3 * rs:p + 3 * rs + CB] if 0 <= ry + 3 < h else z[:CB]
                            a4 = xf[p + 4 * rs:p + 4 * rs + CB] if 0 <= ry + 4 < h else z[:CB]
                            a5 = xf[p + 5 * rs:p + 5 * rs + CB] if 0 <= ry + 5 < h else z[:CB]
                            for c in range(CB):
                                _bt6_store(a0[c], a1[c], a2[c], a3[c], a4[c], a5[c], s, j * CB + c, 6 * CB)
                        else:                                 # a column of padding
                            for c in range(CB):
                                _bt6_store(zero, zero, zero, zero, zero, zero, s, j * CB + c, 6 * CB)
                for k in range(6):                            # rows: (B^T d)[k, :] B
                    dst = v[6 * k * C + c0:6 * k * C + c0 + 6 * C]
                    for c in range(CB):
                        w = 6 * k * CB + c
                        _bt6_store(s[w], s[w + CB], s[w + 2 * CB], s[w + 3 * CB], s[w + 4 * CB],
                                   s[w + 5 * CB], dst, c, C)
    return kernel


def _input_f23(C):
    """F(2x2, 3x3) input transform for C channels; as :func:`_input_f43` with 4 x 4 input tiles
    ``d = xp[n, 2*ty : 2*ty + 4, 2*tx : 2*tx + 4, c]`` (``Hp >= 2*th + 2``, ``Wp >= 2*tw + 2``)."""
    @specialised(f"in2_c{C}", nogil=True, boundscheck=False)
    def kernel(xf, shape, th, tw, t0, t1, vf):
        hp, wp = shape[1], shape[2]
        rs, run, a2c = wp * C, 4 * C, 16 * C
        s = np.empty(a2c, np.float32)
        for q in range(t1 - t0):
            n, y, x = _tile_origin(t0 + q, th, tw, 2)
            b = ((n * hp + y) * wp + x) * C
            r0, r1 = xf[b:b + run], xf[b + rs:b + rs + run]
            r2, r3 = xf[b + 2 * rs:b + 2 * rs + run], xf[b + 3 * rs:b + 3 * rs + run]
            for j in range(4):
                for c in range(C):
                    u = j * C + c
                    t = _bt4((r0[u], r1[u], r2[u], r3[u]))
                    for k in range(4):
                        s[(4 * k + j) * C + c] = t[k]
            v = vf[q * a2c:(q + 1) * a2c]
            for k in range(4):
                w = s[4 * k * C:4 * (k + 1) * C]
                for c in range(C):
                    t = _bt4((w[c], w[C + c], w[2 * C + c], w[3 * C + c]))
                    for l in range(4):
                        v[(4 * k + l) * C + c] = t[l]
    return kernel


def _output_f43(O):
    """F(4x4, 3x3) output transform for O channels:
    ``kernel(mf, th, tw, t0, t1, out_hw, bias, res, relu, out)`` writes, for the tiles
    ``t = t0 + q < t1``, ``out[n, 4*ty + i, 4*tx + j, o] = act((A^T M A)[i, j] + bias[o] (+ res))``
    with ``M = mf[q, :, o]`` as a 6 x 6 grid; ``out`` and ``res`` are flat NHWC of shape
    ``(N, oh, ow, O)`` (``res`` empty: no residual), ``out_hw = (oh, ow)``; pixels beyond
    ``oh, ow`` are not written.

    Vectorised over the channels as :func:`_input_f43` (``A^T M`` in a stack buffer); the
    expressions and their order are those of :func:`_at6` and the epilogue
    ``act(t + bias (+ res))``, so the bits are those of a scalar loop.  Same machine, one thread,
    16 channels at 28 x 28, 64 images: 1.6-1.7 ms instead of 3.1 ms.  An edge tile (past the
    bottom or right of the output) makes only its rows inside, one at a time, and writes only its
    columns inside: 0.07 against 0.19 ms before for 64 channels at 7 x 7, where 3 tiles in 4 are
    edge tiles, 0.17 against 0.25 ms for 32 channels at 14 x 14 (2-core AMD EPYC Zen 4, one thread,
    64 images).
    """
    OB = _channel_block(O)

    @specialised(f"out4_o{O}", nogil=True, boundscheck=False)
    def kernel(mf, th, tw, t0, t1, out_hw, bias, res, relu, out):
        oh, ow = out_hw
        a2o = 36 * O
        s = numba.carray(_stack_f32(1536), (1536,))          # A^T M, order (i, j, o), <= 24 * 64
        e = numba.carray(_stack_f32(256), (256,))           # one row of an edge tile, <= 4 * 64
        for q in range(t1 - t0):
            n, y, x = _tile_origin(t0 + q, th, tw, 4)
            mq = mf[q * a2o:(q + 1) * a2o]
            full = y + 4 <= oh and x + 4 <= ow
            for o0 in range(0, O, OB):
                for j in range(6):                            # columns: A^T M[:, j]
                    mj = mq[j * O + o0:j * O + o0 + 30 * O + OB]
                    for o in range(OB):
                        u0, u1, u2, u3 = _at6((mj[o], mj[6 * O + o], mj[12 * O + o], mj[18 * O + o],
                                               mj[24 * O + o], mj[30 * O + o]))
                        s[j * OB + o] = u0
                        s[(6 + j) * OB + o] = u1
                        s[(12 + j) * OB + o] = u2
                        s[(18 + j) * OB + o] = u3
                bb = bias[o0:o0 + OB]
                if full:
                    for i in range(4):                        # rows: (A^T M)[i, :] A
                        ob = ((n * oh + y + i) * ow + x) * O + o0
                        dst = out[ob:ob + 3 * O + OB]
                        if res.size == 0:
                            for o in range(OB):
                                w = 6 * i * OB + o
                                u0, u1, u2, u3 = _at6((s[w], s[w + OB], s[w + 2 * OB], s[w + 3 * OB],
                                                       s[w + 4 * OB], s[w + 5 * OB]))
                                dst[o] = _act(u0 + bb[o], relu)
                                dst[O + o] = _act(u1 + bb[o], relu)
                                dst[2 * O + o] = _act(u2 + bb[o], relu)
                                dst[3 * O + o] = _act(u3 + bb[o], relu)
                        else:
                            rr = res[ob:ob + 3 * O + OB]
                            for o in range(OB):
                                w = 6 * i * OB + o
                                u0, u1, u2, u3 = _at6((s[w], s[w + OB], s[w + 2 * OB], s[w + 3 * OB],
                                                       s[w + 4 * OB], s[w + 5 * OB]))
                                dst[o] = _act(u0 + bb[o] + rr[o], relu)
                                dst[O + o] = _act(u1 + bb[o] + rr[O + o], relu)
                                dst[2 * O + o] = _act(u2 + bb[o] + rr[2 * O + o], relu)
                                dst[3 * O + o] = _act(u3 + bb[o] + rr[3 * O + o], relu)
                else:                                         # an edge tile: only its rows and columns inside
                    ncol = min(4, ow - x)
                    for i in range(min(4, oh - y)):
                        for o in range(OB):
                            w = 6 * i * OB + o
                            u0, u1, u2, u3 = _at6((s[w], s[w + OB], s[w + 2 * OB], s[w + 3 * OB],
                                                   s[w + 4 * OB], s[w + 5 * OB]))
                            e[o] = u0
                            e[OB + o] = u1
                            e[2 * OB + o] = u2
                            e[3 * OB + o] = u3
                        ob = ((n * oh + y + i) * ow + x) * O + o0
                        for j in range(ncol):
                            dst = out[ob + j * O:ob + j * O + OB]
                            ej = e[j * OB:(j + 1) * OB]
                            if res.size == 0:
                                for o in range(OB):
                                    dst[o] = _act(ej[o] + bb[o], relu)
                            else:
                                rr = res[ob + j * O:ob + j * O + OB]
                                for o in range(OB):
                                    dst[o] = _act(ej[o] + bb[o] + rr[o], relu)
    return kernel


def _output_f23(O):
    """F(2x2, 3x3) output transform for O channels; as :func:`_output_f43` with 2 x 2 output
    tiles from a 4 x 4 grid ``M = mf[q, :, o]``."""
    @specialised(f"out2_o{O}", nogil=True, boundscheck=False)
    def kernel(mf, th, tw, t0, t1, out_hw, bias, res, relu, out):
        oh, ow = out_hw
        a2o = 16 * O
        s = np.empty(8 * O, np.float32)
        e = np.empty(4 * O, np.float32)
        for q in range(t1 - t0):
            n, y, x = _tile_origin(t0 + q, th, tw, 2)
            mq = mf[q * a2o:(q + 1) * a2o]
            for j in range(4):
                for o in range(O):
                    t = _at4((mq[j * O + o], mq[(4 + j) * O + o], mq[(8 + j) * O + o], mq[(12 + j) * O + o]))
                    for i in range(2):
                        s[(4 * i + j) * O + o] = t[i]
            full = y + 2 <= oh and x + 2 <= ow
            for i in range(2):
                w = s[4 * i * O:4 * (i + 1) * O]
                if full:
                    b = ((n * oh + y + i) * ow + x) * O
                    dst = out[b:b + 2 * O]
                    if res.size == 0:
                        for o in range(O):
                            t = _at4((w[o], w[O + o], w[2 * O + o], w[3 * O + o]))
                            for j in range(2):
                                dst[j * O + o] = _act(t[j] + bias[o], relu)
                    else:
                        rr = res[b:b + 2 * O]
                        for o in range(O):
                            t = _at4((w[o], w[O + o], w[2 * O + o], w[3 * O + o]))
                            for j in range(2):
                                dst[j * O + o] = _act(t[j] + bias[o] + rr[j * O + o], relu)
                else:
                    for o in range(O):
                        t = _at4((w[o], w[O + o], w[2 * O + o], w[3 * O + o]))
                        for j in range(2):
                            e[(2 * i + j) * O + o] = t[j]
            if not full:
                for i in range(min(2, oh - y)):
                    for j in range(min(2, ow - x)):
                        b = ((n * oh + y + i) * ow + x + j) * O
                        for o in range(O):
                            v = e[(2 * i + j) * O + o] + bias[o]
                            if res.size:
                                v += res[b + o]
                            out[b + o] = _act(v, relu)
    return kernel


#: output channels x tiles of running sums held in registers by :func:`products_kernel`: two AVX2
#: vectors (one AVX-512 vector) of channels for each of 4 tiles, 8 accumulators, as in
#: :mod:`dfmpc.engine.blocked`
PRODUCT_LANES, PRODUCT_TILES = 16, 4


def products_kernel(a2: int, c: int, o: int):
    """The compiled element-wise products of F(m x m, 3x3) for ``a2 = (m+2)^2`` grid points, ``c``
    input and ``o`` output channels (``o`` a multiple of :data:`PRODUCT_LANES`); see :func:`_products`."""
    if o % PRODUCT_LANES:
        raise ValueError(f"o: the products kernel needs a multiple of {PRODUCT_LANES} output channels, got {o}")
    return _kernel(("products", a2, c, o), _products, (a2, c, o))


def _products(shape):
    """``kernel(vf, uf, mf, k)``: ``M[t, xi] = V[t, xi] @ U[xi]`` for the tiles ``t < k`` and every
    grid point ``xi``, with ``V`` (T, A2, C), ``U`` (A2, C, O) and ``M`` (T, A2, O) passed flat
    (``vf``, ``uf``, ``mf``; ``T >= k``).

    The same products as the batched ``np.matmul`` of :func:`conv3x3` (its twin in the tests), by a
    register-blocked loop in place of BLAS: for 4 tiles and 16 output channels at a time, the 64
    running sums stay in SIMD registers over the C input channels (a stack buffer indexed by
    constants, kept in registers by LLVM's scalar replacement, as in :mod:`dfmpc.engine.blocked`).
    A2, C and O are compile-time constants and the indices unsigned, so the loop over C carries no
    bounds or negative-index arithmetic. The sums run over C in order, as one dot product each:
    float32 rounding of the same size as BLAS's, not the same bits.
    Why: ResNet-20's products are many small matrices (C = O = 16-64, 50-230 tiles), where
    OpenBLAS's sgemm ran at 7-18 GFLOP/s on a 2-core AMD EPYC (``znver1``, one thread) and this
    loop at 21-34 (21-23 and 31-33 in a slow and a fast phase of the host's load; measured in the
    same process, alternating with BLAS).
    """
    A2, C, O = shape
    L, P = PRODUCT_LANES, PRODUCT_TILES

    @specialised(f"a{A2}_c{C}_o{O}", nogil=True, fastmath=_DOT_MATH, boundscheck=False)
    def kernel(vf, uf, mf, k):
        acc = numba.carray(_stack_f32(64), (64,))             # P x L running sums
        for t0 in range(0, k, P):
            t1, t2, t3 = min(t0 + 1, k - 1), min(t0 + 2, k - 1), min(t0 + 3, k - 1)   # the last block repeats
            for xi in range(A2):
                r0, r1 = np.uint64((t0 * A2 + xi) * C), np.uint64((t1 * A2 + xi) * C)
                r2, r3 = np.uint64((t2 * A2 + xi) * C), np.uint64((t3 * A2 + xi) * C)
                for o0 in range(0, O, L):
                    for j in range(P * L):
                        acc[j] = np.float32(0)
                    ub = np.uint64(xi * C * O + o0)
                    for ci in range(C):
                        c = np.uint64(ci)
                        v0, v1, v2, v3 = vf[r0 + c], vf[r1 + c], vf[r2 + c], vf[r3 + c]
                        uc = ub + c * np.uint64(O)
                        for j in range(L):
                            u = uf[uc + np.uint64(j)]
                            acc[j] += v0 * u
                            acc[L + j] += v1 * u
                            acc[2 * L + j] += v2 * u
                            acc[3 * L + j] += v3 * u
                    for i in range(P):
                        if t0 + i < k:
                            mb = np.uint64(((t0 + i) * A2 + xi) * O + o0)
                            for j in range(L):
                                mf[mb + np.uint64(j)] = acc[i * L + j]
    return kernel


def blocks_kernel(m: int, c: int, o: int):
    """The compiled loop over tile blocks of F(m x m, 3x3) with Numba products (see :func:`_blocks`)."""
    return _kernel(("blocks", m, c, o), _blocks, (m, c, o))


def _blocks(shape):
    """``kernel(xf, shape, th, tw, t_lo, t_hi, tb, vf, uf, mf, out_hw, bias, res, relu, out, pt, pl)``: the
    tiles ``t_lo .. t_hi - 1``, ``tb`` at a time, each block through the input transform, the products
    (:func:`products_kernel`) and the output transform, as :func:`conv3x3`'s Python loop does with BLAS
    products. One call per conv instead of three per block: each call of a Numba kernel from Python
    takes the GIL for a few microseconds, and at 64 images the 16-channel convs of ResNet-20 have 55
    blocks (``pt``, ``pl``: see :func:`_input_f43`; ignored for m = 2). Same kernels, same order, same bits.

    The three kernels it calls are globals of the compiled function (:func:`_with_globals`), not
    closure variables: Numba keys its on-disk cache by the pickled closure, and a dispatcher pickles
    with an identifier new in every process, so a closure over them was compiled again (about 0.5 s
    per shape) and saved again, as one more cache file, by every process. Each kernel is named after
    its shape (:func:`~dfmpc.engine.kernels_numba.specialised`), so that a process which loads
    several from the cache runs each with its own callees.
    """
    m, C, O = shape
    calls = dict(_kin=input_kernel(m, C), _kmul=products_kernel((m + 2) ** 2, C, O), _kout=output_kernel(m, O))
    if m == 4:
        def kernel(xf, shape, th, tw, t_lo, t_hi, tb, vf, uf, mf, out_hw, bias, res, relu, out, pt, pl):
            if shape[3] != C or bias.shape[0] != O:
                raise ValueError("the blocks kernel was made for other channel counts")
            for t0 in range(t_lo, t_hi, tb):
                t1 = min(t0 + tb, t_hi)
                _kin(xf, shape, th, tw, t0, t1, vf, pt, pl)               # noqa: F821 (bound as a global)
                _kmul(vf, uf, mf, t1 - t0)                                # noqa: F821
                _kout(mf, th, tw, t0, t1, out_hw, bias, res, relu, out)   # noqa: F821
    else:
        def kernel(xf, shape, th, tw, t_lo, t_hi, tb, vf, uf, mf, out_hw, bias, res, relu, out, pt, pl):
            if shape[3] != C or bias.shape[0] != O:
                raise ValueError("the blocks kernel was made for other channel counts")
            for t0 in range(t_lo, t_hi, tb):
                t1 = min(t0 + tb, t_hi)
                _kin(xf, shape, th, tw, t0, t1, vf)                       # noqa: F821
                _kmul(vf, uf, mf, t1 - t0)                                # noqa: F821
                _kout(mf, th, tw, t0, t1, out_hw, bias, res, relu, out)   # noqa: F821
    return specialised(f"m{m}_c{C}_o{O}", nogil=True)(_with_globals(kernel, calls))


def _with_globals(fn, names):
    """A copy of the function ``fn`` that sees ``names`` (a dict) among its globals; same code,
    closure, name and defaults. Numba reads a global dispatcher as a constant when it compiles, and
    leaves globals out of its cache key (code and closure only)."""
    g = dict(fn.__globals__)
    g.update(names)
    out = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__qualname__, out.__module__ = fn.__qualname__, fn.__module__
    return out


def conv3x3(xn, U, bias, pads, out_hw, m, relu=False, res=None, out=None, block=None, pool=None,
            products="blas"):
    """Dense 3x3 stride-1 conv of an NHWC batch by F(m x m, 3x3), block of tiles by block of tiles.

    Parameters
    ----------
    xn : ndarray, shape (N, H, W, C), float32
        Input in NHWC order (any strides).
    U : ndarray, shape ((m+2)**2, C, O), float32
        :func:`weight_transform` of the filters.
    bias : ndarray, shape (O,), float32
    pads : (int, int, int, int)
        ``(top, left, bottom, right)``.
    out_hw : (int, int)
        ``(oh, ow) = (H + top + bottom - 2, W + left + right - 2)``.
    m : {2, 4}
    relu : bool
    res : ndarray, shape (N, oh, ow, O), float32, C-contiguous, optional
        Added before the activation.
    out : ndarray, shape (N, oh, ow, O), float32, C-contiguous, optional
        Written (allocated when None).
    block : int, optional
        Tiles per block (input transform, products and output transform run block by block, so
        that the transformed tiles stay in cache); default :func:`default_block`.
    pool : concurrent.futures.Executor, optional
        When given, the blocks are split in two halves and one half runs on ``pool`` (the kernels
        release the GIL, and so does ``np.matmul``).
    products : {"blas", "numba"}
        How the element-wise products ``M[xi] = V[xi] U[xi]`` are made: one batched ``np.matmul``
        (BLAS), or :func:`products_kernel` (needs O a multiple of :data:`PRODUCT_LANES`).

    Returns
    -------
    ndarray, shape (N, oh, ow, O), float32

    Examples
    --------
    Y = A^T [U * V] A is the 3x3 convolution: with all-ones filters each output is the sum of
    its 3x3 window (up to float32 rounding of the transforms).

    >>> x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    >>> U = weight_transform(np.ones((2, 1, 3, 3), np.float32), 4)
    >>> y = conv3x3(x, U, np.zeros(2, np.float32), (0, 0, 0, 0), (2, 2), 4)
    >>> np.allclose(y[0, :, :, 0], [[0+1+2+4+5+6+8+9+10, 54], [81, 90]], atol=1e-4)
    True
    """
    n, h, wd, c = xn.shape
    a2, o = U.shape[0], U.shape[2]
    if products not in ("blas", "numba"):
        raise ValueError(f"products must be 'blas' or 'numba', got {products!r}")
    oh, ow = out_hw
    th, tw = tile_counts(oh, ow, m)
    pt, pl = pads[0], pads[1]
    if m == 4 and xn.flags.c_contiguous:
        xp, shift = xn, (pt, pl)                      # the F(4x4) input kernel reads the padding
    else:
        xp, shift = padded(xn, pt, pl, th * m + 2, tw * m + 2), (0, 0)   # covers H + pads, every tile
    xf = xp.reshape(-1)
    if out is None:
        out = np.empty((n, oh, ow, o), np.float32)
    of = out.reshape(-1)
    rf = _NO_RES if res is None else res.reshape(-1)
    kin, kout = input_kernel(m, c), output_kernel(m, o)
    n_t = n * th * tw
    tb = block or default_block(m, c, o)
    kmul = products_kernel(a2, c, o) if products == "numba" else None
    if pool is not None and kmul is None:
        # two threads each calling sgemm: keep every product below OpenBLAS's threshold for
        # threading it (M*N*K <= 4 * 65536), or both threads wait for the one BLAS worker
        # (measured: F(2x2, 3x3) at C = O = 64 and 128-tile blocks ran 300x slower)
        tb = min(tb, max(8, BLAS_SERIAL_MNK // (c * o)))
    tb = min(n_t, tb)
    # a product that OpenBLAS would thread is made by one Python thread at a time (BLAS_LOCK):
    # the batch-split workers of dfmpc.engine.executor each run this function at once
    lock = BLAS_LOCK if kmul is None and tb * c * o > BLAS_SERIAL_MNK else contextlib.nullcontext()
    uf = U.reshape(-1) if kmul is not None else None

    def run(t_lo, t_hi):
        V, M = _scratch((tb, a2, c), (tb, a2, o))
        vf, mf = V.reshape(-1), M.reshape(-1)
        if kmul is not None:                      # the whole loop in one Numba call
            blocks_kernel(m, c, o)(xf, xp.shape, th, tw, t_lo, t_hi, tb, vf, uf, mf, (oh, ow), bias, rf,
                                   relu, of, shift[0], shift[1])
            return
        for t0 in range(t_lo, t_hi, tb):
            t1 = min(t0 + tb, t_hi)
            k = t1 - t0
            if m == 4:
                kin(xf, xp.shape, th, tw, t0, t1, vf, shift[0], shift[1])
            else:
                kin(xf, xp.shape, th, tw, t0, t1, vf)
            with lock:
                np.matmul(V[:k].transpose(1, 0, 2), U, out=M[:k].transpose(1, 0, 2))  # M[xi] = V[xi] U[xi]
            kout(mf, th, tw, t0, t1, (oh, ow), bias, rf, relu, of)

    n_blocks = -(-n_t // tb)
    if pool is None or n_blocks < 2:
        run(0, n_t)
    else:
        half = (n_blocks // 2) * tb
        job = pool.submit(run, half, n_t)
        run(0, half)
        job.result()
    return out


_LOCAL = threading.local()


def _scratch(shape_v, shape_m):
    """Two float32 work arrays of these shapes, in memory kept by the calling thread between calls:
    a fresh ``np.empty`` of this size is new pages from the OS on every call (page faults, cold
    cache), which cost as much as the products themselves (measured in ResNet-20: 0.2-0.9 ms per
    block of 227 tiles against 0.16 ms for the same product on reused memory)."""
    nv, nm = math.prod(shape_v), math.prod(shape_m)          # (np.prod on a tuple: ~5 us, GIL held)
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < nv + nm:
        buf = _LOCAL.buf = np.empty(nv + nm, np.float32)
    return buf[:nv].reshape(shape_v), buf[nv:nv + nm].reshape(shape_m)


#: OpenBLAS runs a matrix product on one thread when M*N*K <= this (SMP_THRESHOLD_MIN *
#: GEMM_MULTITHREAD_THRESHOLD, interface/gemm.c)
BLAS_SERIAL_MNK = 4 * 65536

#: held around every BLAS product of the engine larger than :data:`BLAS_SERIAL_MNK` (here and in
#: :mod:`dfmpc.engine.conv`): two Python threads each calling a threaded sgemm at once can wait on
#: one BLAS worker (measured: 300x slower at one shape), so such products run one at a time;
#: smaller ones run on the calling thread inside OpenBLAS and need no lock
BLAS_LOCK = threading.Lock()


def default_block(m: int, c: int, o: int) -> int:
    """Tiles per block: the transformed tiles and their products (``(m+2)^2 (C + O)`` floats per
    tile) take about 1 MB, and at least 16 tiles."""
    return max(16, (1 << 20) // ((m + 2) ** 2 * (c + o) * 4))
