"""Register-blocked direct convolution: output channels in SIMD vectors, accumulated in registers.

The dense conv ``y[p, o] = sum_{t, c} x[p + t, c] * W[t, c, o]`` (``p`` an output pixel, ``t`` a
kernel tap, NHWC, padded input) is computed for a block of :data:`PIXELS` pixels x :data:`LANES`
output channels at a time.  For each tap and each input channel, the block's :data:`LANES`
weights ``W[t, c, o0:o0+LANES]`` are one contiguous run (two 8-float AVX2 vectors, one AVX-512
vector), each pixel's input value ``x[p + t, c]`` is broadcast, and :data:`PIXELS` x
:data:`LANES` running sums are updated by fused multiply-adds.  The sums stay in registers for
the whole reduction over taps and channels and are written once, with bias, residual and ReLU
(the epilogue of :mod:`dfmpc.engine.kernels_numba`).  This is the scheme of the direct
"NCHWc" kernels of oneDNN and onnxruntime's MLAS (a vector of output channels times a few
output pixels), written here for NHWC memory; unlike :func:`~dfmpc.engine.kernels_numba.conv3rows_nhwc`,
which vectorises each dot product along the taps and must reduce the SIMD lanes of every
output at the end, no output is ever reduced across lanes.

Numba has no register variables for arrays: the running sums are a small array on the stack
(:func:`_stack_f32`, an ``alloca``), indexed only by compile-time constants once LLVM has
unrolled the lane and pixel loops, so that its scalar-replacement pass keeps them in
registers.  Measured on a 2-core AMD EPYC Zen 3 (AVX2; single thread, batch 16): 75-83
GFLOP/s on ResNet-20's 3x3 convs at 16, 32 and 64 channels, against ~25 for ``conv3rows_nhwc``.

The layout of the weights (:func:`blocked_weight`): ``(kh*kw, C, O')``, ``O'`` = O rounded up
to a multiple of :data:`LANES` with zero filters (their sums are computed and not written).
Any kernel size, stride, dilation and padding (the input arrives padded); groups are not
handled (:mod:`dfmpc.engine.conv` runs grouped convs elsewhere).  Pixels are numbered over
the whole batch (``p = (n*oh + y)*ow + x``), so a block may span rows and images; the last
block repeats the last pixel rather than needing a leftover loop.

Twin (tests): :func:`dfmpc.engine.reference_kernels.conv_blocked_loops` (plain loops, float64)
and the float64 reference convolution :func:`dfmpc.conv2d`.
"""

from __future__ import annotations

import functools

import llvmlite.ir as ir
import numba
import numpy as np
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from .kernels_numba import _DOT_MATH, _finish, num_threads

#: output channels per block: two AVX2 vectors of float32 (one AVX-512 vector)
LANES = 16

#: the filters of one pass over the pixels take at most this many bytes (a share of a 512 KB L2):
#: layers with more filter weights (e.g. 1x1 convs 512 -> 2048) are run in groups of output
#: channels, so that the weights stay in cache while the pixels stream past
WEIGHT_BYTES = 128 << 10

def _compiles_for_avx512() -> bool:
    """Whether Numba compiles for a CPU with AVX-512: the CPU features it compiles for
    (``NUMBA_CPU_FEATURES`` when set, else the host's), which are also part of the key of its
    on-disk cache, so that a kernel compiled with one :data:`PIXELS` is never loaded where the
    other is in force."""
    features = numba.config.CPU_FEATURES
    if features is None:
        import llvmlite.binding as ll
        features = ll.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


#: output pixels per block. AVX2 (16 vector registers of 8 floats): 4, so that 4 x 16 / 8 = 8
#: accumulators, 2 weight vectors and a broadcast input fit. AVX-512 (32 registers of 16 floats):
#: 8, eight one-register accumulators, since four were too few to hide the FMAs' latency (each
#: sum waits for its previous FMA): 1.1-1.25x faster on a Zen 4 (see :func:`_group_blocks`). Each
#: output's sum is the same either way (taps, then channels, in order), and so are the bits.
PIXELS = 8 if _compiles_for_avx512() else 4


@intrinsic
def _stack_f32(typingctx, size):
    """Pointer to ``size`` (a literal int) float32 on the stack of the calling function."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = size.literal_value

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32),
                                   size=ir.Constant(ir.IntType(64), n))

    return types.CPointer(types.float32)(size), codegen


def blocked_weight(w: np.ndarray) -> np.ndarray:
    """Filters (O, C, kh, kw) as the (kh*kw, C, O') float32 array of :func:`conv_blocked`.

    ``O'`` is O rounded up to a multiple of :data:`LANES`; the added filters are zero.
    """
    o, c, kh, kw = w.shape
    op = -(-o // LANES) * LANES
    wb = np.zeros((kh * kw, c, op), np.float32)
    wb[:, :, :o] = w.transpose(2, 3, 1, 0).reshape(kh * kw, c, o)
    return wb


def tap_offsets(kernel, dilations, wp: int, c: int) -> np.ndarray:
    """Offset of each run of taps from a pixel's top-left tap in the flat padded NHWC input of
    width ``wp`` and ``c`` channels.

    With column dilation 1, the ``kw`` taps of kernel row ``i`` are one run of ``kw*c`` contiguous
    floats at ``i*dh*wp*c``, and so are their filter weights (:func:`blocked_weight` viewed as
    ``(kh, kw*C, O')``): ``kh`` runs.  Otherwise each tap ``(i, j)`` (row-major) is a run of ``c``
    floats at ``(i*dh*wp + j*dw) * c``: ``kh*kw`` runs.  Longer runs spread the per-run cost of
    the kernel over more multiply-adds (3x3 convs on 16 channels: 48 instead of 16).
    """
    (kh, kw), (dh, dw) = kernel, dilations
    return _tap_offsets(int(kh), int(kw), int(dh), int(dw), int(wp), int(c))


@functools.lru_cache(maxsize=1024)
def _tap_offsets(kh, kw, dh, dw, wp, c):
    """:func:`tap_offsets`, made once per geometry (a conv call asks for it every time). The array is
    shared by every caller and must not be changed; it stays writeable, since Numba compiles a kernel
    anew for a read-only argument."""
    if dw == 1:
        return np.array([i * dh * wp * c for i in range(kh)], np.int64)
    return np.array([(i * dh * wp + j * dw) * c for i in range(kh) for j in range(kw)], np.int64)


def conv_blocked(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, group=None):
    """Dense conv of a padded NHWC batch by the register-blocked kernel; writes ``out``.

    Parameters
    ----------
    xf : ndarray, shape (N*Hp*Wp*C,), float32
        The padded input in NHWC order, flattened (C-contiguous).
    shape : (int, int, int, int)
        ``(N, Hp, Wp, C)`` of the padded input.
    wb : ndarray, shape (R, L, O'), float32, C-contiguous
        :func:`blocked_weight` of the filters viewed as one ``(L, O')`` matrix per run of taps:
        ``R = len(taps)`` runs of ``L = kh*kw*C / R`` input values.
    taps : ndarray, shape (R,), int64
        :func:`tap_offsets`.
    strides : (int, int)
    out_hw : (int, int)
        Output height and width.
    bias : ndarray, shape (O,), float32
    relu : bool
    res : ndarray, shape (N*oh*ow, O), float32, or None
        Residual added before the activation, or None.
    out : ndarray, shape (N*oh*ow, O), float32
        Written, not read (NHWC output).
    group : int, optional
        Output channels per pass over the pixels, a multiple of :data:`LANES`; default: as many
        as have :data:`WEIGHT_BYTES` of filters.

    Notes
    -----
    Sums run in float32 in the order taps, then channels, per output (each FMA rounds once):
    the rounding of any float32 dot product of ``kh*kw*C`` terms.
    """
    if group is None:
        group = max(LANES, WEIGHT_BYTES // (4 * wb.shape[0] * wb.shape[1] * LANES) * LANES)
    if group % LANES or group <= 0:
        raise ValueError(f"group: expected a positive multiple of {LANES}, got {group}")
    threads = num_threads()
    if threads > 1:
        _conv_blocked_par(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, group, threads)
    else:
        _conv_blocked_ser(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, group)


@njit(cache=True, nogil=True, fastmath=_DOT_MATH, boundscheck=False)
def _blocks(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, group, blk0, blk1):
    """Pixel blocks ``blk0 .. blk1 - 1`` of :func:`conv_blocked`, all output channels, ``group``
    of them at a time."""
    n_o = out.shape[1]
    for g0 in range(0, n_o, group):
        _group_blocks(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, blk0, blk1,
                      g0, min(n_o, g0 + group))


@njit(inline="always")
def _next_pixel(n, y, x, oh, ow):
    """The pixel after ``(n, y, x)`` in batch order (image, row, column): counters instead of a
    division per pixel."""
    x += 1
    if x == ow:
        x = 0
        y += 1
        if y == oh:
            y = 0
            n += 1
    return n, y, x


@njit(cache=True, nogil=True, fastmath=_DOT_MATH, boundscheck=False)
def _group_blocks(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, blk0, blk1, g0, g1):
    """Output channels ``g0 .. g1 - 1`` (``g0`` a multiple of :data:`LANES`) of pixel blocks
    ``blk0 .. blk1 - 1``.

    The pixels' input offsets are carried from block to block by counters (one division at
    ``blk0``, none per block), and a full block (:data:`PIXELS` pixels x :data:`LANES` channels)
    is written by a loop over contiguous runs of ``out``, ``bias`` and ``res`` that LLVM
    vectorises; only the batch's last block and the last channel block of an ``O`` that is not
    a multiple of :data:`LANES` take the element-by-element epilogue.  Per 16-channel 3x3 conv of
    ResNet-20 on 64 images (2-core Zen 3, one thread): 10-25 % faster than computing each pixel's
    offset by division and writing each output alone, and 1.7x on 1x1 and 1-channel convs, whose
    blocks hold few multiply-adds.  Same sums in the same order, so the same bits.

    :data:`PIXELS` = 8 against 4 where Numba compiles for AVX-512 (2-core AMD EPYC Zen 4, one thread,
    64 images, best of 20): ResNet-20's stride-2 3x3 convs 1.20 against 1.34 ms (16 -> 32 channels)
    and 1.09 against 1.27 ms (32 -> 64), its 3x3 convs at 16 and at 64 channels 2.37 against 2.61
    ms and 2.07 against 2.37 ms, the stride-2 1x1 shortcut 0.32 against 0.36 ms. Compiled for
    ``znver3`` (AVX2, :data:`PIXELS` = 4) the kernel times as before.
    """
    n_img, hp, wp, c = shape
    sh, sw = strides
    oh, ow = out_hw
    n_p, n_o = out.shape[0], out.shape[1]
    n_t, run = taps.shape[0], wb.shape[1]
    acc = numba.carray(_stack_f32(128), (PIXELS * LANES,))  # PIXELS * LANES running sums
    p = blk0 * PIXELS
    n, y, x = p // (oh * ow), p % (oh * ow) // ow, p % ow    # the next pixel
    last = (((n_img - 1) * hp + (oh - 1) * sh) * wp + (ow - 1) * sw) * c   # the batch's last pixel
    for blk in range(blk0, blk1):
        p0 = blk * PIXELS
        # the block's pixels; the last block repeats the batch's last pixel
        b0 = ((n * hp + y * sh) * wp + x * sw) * c
        n, y, x = _next_pixel(n, y, x, oh, ow)
        b1 = ((n * hp + y * sh) * wp + x * sw) * c if p0 + 1 < n_p else last
        n, y, x = _next_pixel(n, y, x, oh, ow)
        b2 = ((n * hp + y * sh) * wp + x * sw) * c if p0 + 2 < n_p else last
        n, y, x = _next_pixel(n, y, x, oh, ow)
        b3 = ((n * hp + y * sh) * wp + x * sw) * c if p0 + 3 < n_p else last
        n, y, x = _next_pixel(n, y, x, oh, ow)
        b4, b5, b6, b7 = b0, b1, b2, b3                         # (unused at PIXELS = 4)
        if PIXELS == 8:                                          # a compile-time constant
            b4 = ((n * hp + y * sh) * wp + x * sw) * c if p0 + 4 < n_p else last
            n, y, x = _next_pixel(n, y, x, oh, ow)
            b5 = ((n * hp + y * sh) * wp + x * sw) * c if p0 + 5 < n_p else last
            n, y, x = _next_pixel(n, y, x, oh, ow)
            b6 = ((n * hp + y * sh) * wp + x * sw) * c if p0 + 6 < n_p else last
            n, y, x = _next_pixel(n, y, x, oh, ow)
            b7 = ((n * hp + y * sh) * wp + x * sw) * c if p0 + 7 < n_p else last
            n, y, x = _next_pixel(n, y, x, oh, ow)
        for o0 in range(g0, g1, LANES):
            for k in range(PIXELS * LANES):
                acc[k] = np.float32(0)
            for t in range(n_t):
                d = taps[t]
                x0, x1 = xf[b0 + d:b0 + d + run], xf[b1 + d:b1 + d + run]
                x2, x3 = xf[b2 + d:b2 + d + run], xf[b3 + d:b3 + d + run]
                x4, x5 = xf[b4 + d:b4 + d + run], xf[b5 + d:b5 + d + run]
                x6, x7 = xf[b6 + d:b6 + d + run], xf[b7 + d:b7 + d + run]
                wt = wb[t]
                for ci in range(run):
                    wr = wt[ci, o0:o0 + LANES]
                    v0, v1, v2, v3 = x0[ci], x1[ci], x2[ci], x3[ci]
                    for k in range(LANES):
                        wv = wr[k]
                        acc[k] += v0 * wv
                        acc[LANES + k] += v1 * wv
                        acc[2 * LANES + k] += v2 * wv
                        acc[3 * LANES + k] += v3 * wv
                        if PIXELS == 8:
                            acc[4 * LANES + k] += x4[ci] * wv
                            acc[5 * LANES + k] += x5[ci] * wv
                            acc[6 * LANES + k] += x6[ci] * wv
                            acc[7 * LANES + k] += x7[ci] * wv
            if o0 + LANES <= g1 and p0 + PIXELS <= n_p:     # a full block: vectorised epilogue
                bb = bias[o0:o0 + LANES]
                for i in range(PIXELS):
                    q = p0 + i
                    dst = out[q, o0:o0 + LANES]
                    for k in range(LANES):
                        v = acc[i * LANES + k] + bb[k]
                        if res is not None:
                            v += res[q, o0 + k]
                        dst[k] = max(v, np.float32(0)) if relu else v
            else:
                m = min(LANES, g1 - o0)                   # < LANES only in the last channel block
                for i in range(PIXELS):
                    q = min(p0 + i, n_p - 1)
                    for k in range(LANES):                # constant indices: acc stays in registers
                        if k < m:
                            out[q, o0 + k] = _finish(acc[i * LANES + k], bias, res, q, o0 + k, relu)


@njit(cache=True, nogil=True)
def _conv_blocked_ser(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, group):
    """:func:`conv_blocked` on the calling thread (no hand-off to Numba's pool at one thread); it
    releases the GIL, so that the batch-split workers of :mod:`dfmpc.engine.executor` run at once."""
    n_blk = -(-out.shape[0] // PIXELS)
    _blocks(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, group, 0, n_blk)


@njit(parallel=True, cache=True, nogil=True)
def _conv_blocked_par(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, group, n_th):
    """:func:`conv_blocked` over Numba's threads: the pixel blocks in one contiguous range per
    thread (each range's sums on its own thread's stack)."""
    n_blk = -(-out.shape[0] // PIXELS)
    for t in prange(n_th):
        _blocks(xf, shape, wb, taps, strides, out_hw, bias, relu, res, out, group,
                t * n_blk // n_th, (t + 1) * n_blk // n_th)
