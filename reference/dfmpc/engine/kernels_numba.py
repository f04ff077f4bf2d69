"""Numba kernels: dense convs (direct 3-row kernel, or the matmul after im2col), grouped convs.

:func:`conv3rows_nhwc` computes a dense conv with 3 kernel rows straight from
the padded NHWC input (no im2col); :func:`matmul_nt` multiplies im2col rows
by the weight rows (the other dense convs of :mod:`dfmpc.engine.conv`).  Both
add the bias (and a residual) and apply ReLU as they write each output, and
both have a serial twin used at one Numba thread.  :func:`conv_grouped` takes
an NCHW float32 batch (any strides) and the conv geometry in ONNX terms:
``pads = (top, left, bottom, right)`` (only top/left are needed here, the
output size ``oh, ow`` already accounts for bottom/right).  Twins (tests
only): the float64 reference convolution :func:`dfmpc.conv2d` (both convs)
and the plain loop :func:`~dfmpc.engine.reference_kernels.matmul_nt_loops`.

Speed notes (ResNet-20, 2-core AMD EPYC Zen 5, AVX-512): LLVM vectorises the
``k`` loops to 16-lane FMAs; the 4 x 4 blocks reach ~170 GFLOP/s when a dot
product is long (C = 64: 576 terms) but ~105 GFLOP/s at C = 16 (144 terms),
where reducing the 16 SIMD partial sums of each output costs as much as the
multiply-adds.  On an AVX2-only machine (AMD EPYC Zen 3, 8 lanes) the same kernels ran
ResNet-20 at ~25 GFLOP/s; :mod:`dfmpc.engine.kernel_choice` therefore measures them against
im2col + BLAS and Winograd (:mod:`dfmpc.engine.winograd`) per conv shape.
"""

import os
import threading

import numba
import numpy as np
from numba import njit, prange

# OpenMP worker threads spin-wait after each parallel region and steal the cores the
# BLAS threads of the following matmul need (measured: several-fold slowdowns of
# grouped conv + sgemm on 2 cores).  Numba's own "workqueue" pool sleeps instead.  A layer
# chosen by the user (NUMBA_THREADING_LAYER) is respected.
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"


#: LLVM may reorder the sums of a dot product (so it can keep 16 lanes of partial sums)
#: and fuse multiply-adds; nothing else of fastmath (no "no NaN / no inf" assumptions).
_DOT_MATH = {"reassoc", "contract"}


def specialised(tag: str, **options):
    """``njit(cache=True, **options)`` for a kernel that a factory makes per shape or variant, its
    function renamed ``<name>_<tag>`` first.

    Numba names the machine code of a function after its qualified name and a counter of the
    process that compiled it. Two kernels of one factory (say the Winograd input transform for 16
    and for 32 channels) compiled by two processes can thus get the same symbol; a later process
    that loads, from the disk cache, kernels that call both runs one body for both (Numba issue
    #10486; here: wrong sums, then a segfault). ``tag`` names the specialisation (e.g. ``"c16"``),
    so that different code never shares a symbol. Tested in ``tests/test_engine_winograd.py``
    (``test_kernels_of_one_factory_compiled_by_two_processes_stay_apart``).
    """
    def decorate(fn):
        fn.__name__ = f"{fn.__name__}_{tag}"
        fn.__qualname__ = f"{fn.__qualname__}_{tag}"
        return njit(cache=True, **options)(fn)
    return decorate


def num_threads() -> int:
    """``numba.get_num_threads()`` of the calling thread, without its per-call locks once Numba's
    thread pool is up (``get_num_threads`` takes two locks on every call to check that; with the
    batch-split workers of :mod:`dfmpc.engine.executor` asking on every conv, they contended).
    Falls back to the public call if Numba's internals differ from those of the pinned version."""
    par = numba.np.ufunc.parallel
    if getattr(par, "_is_initialized", False) and hasattr(par, "_get_num_threads"):
        n = par._get_num_threads()
        if n > 0:
            return n
    return numba.get_num_threads()


@njit(inline="always", fastmath=_DOT_MATH)
def _finish(s, bias, res, p, o, relu):
    """Epilogue of one output: ``act(s + bias[o] (+ res[p, o]))``; ``res`` None or (P, O)."""
    v = s + bias[o]
    if res is not None:
        v += res[p, o]
    return max(v, np.float32(0)) if relu else v


@njit(inline="always", fastmath=_DOT_MATH)
def _dot(a, q, b, o):
    acc = np.float32(0)
    for k in range(a.shape[1]):
        acc += a[q, k] * b[o, k]
    return acc


def matmul_nt(a, b, bias, relu, res, out):
    """``out[p, o] = act(sum_k a[p, k] * b[o, k] + bias[o] + res[p, o])``, act = ReLU or identity.

    Both operands are read along ``k`` (rows of ``a`` and of ``b``, contiguous),
    so each output is a dot product.  Outputs are computed in 4 x 4 blocks: 16
    running sums share every load of ``a`` and ``b``, and LLVM vectorises the
    ``k`` loop over them (with SIMD partial sums, hence ``reassoc``), on the
    vector width of the host CPU.  Rows / columns left over (P or O not a multiple
    of 4) are plain dot products.

    Parameters
    ----------
    a : ndarray, shape (P, K), float32, C-contiguous
        im2col rows, one per output pixel.
    b : ndarray, shape (O, K), float32, C-contiguous
        Weight rows, one per output channel.
    bias : ndarray, shape (O,), float32
    relu : bool
    res : ndarray, shape (P, O), float32, or None
        Residual added before the activation (ResNet's shortcut), or None.
    out : ndarray, shape (P, O), float32
        Written, not read.
    """
    (_matmul_nt_par if num_threads() > 1 else _matmul_nt_ser)(a, b, bias, relu, res, out)


@njit(cache=True, nogil=True, fastmath=_DOT_MATH, boundscheck=False)
def _matmul_rows4(a, b, bias, relu, res, out, p):
    """Rows ``p .. p+3`` of :func:`matmul_nt`."""
    n_k, n_o = a.shape[1], b.shape[0]
    o4 = n_o - n_o % 4
    for o in range(0, o4, 4):
        s00 = s01 = s02 = s03 = np.float32(0)
        s10 = s11 = s12 = s13 = np.float32(0)
        s20 = s21 = s22 = s23 = np.float32(0)
        s30 = s31 = s32 = s33 = np.float32(0)
        for k in range(n_k):
            a0, a1, a2, a3 = a[p, k], a[p + 1, k], a[p + 2, k], a[p + 3, k]
            b0, b1, b2, b3 = b[o, k], b[o + 1, k], b[o + 2, k], b[o + 3, k]
            s00 += a0 * b0; s01 += a0 * b1; s02 += a0 * b2; s03 += a0 * b3  # noqa: E702
            s10 += a1 * b0; s11 += a1 * b1; s12 += a1 * b2; s13 += a1 * b3  # noqa: E702
            s20 += a2 * b0; s21 += a2 * b1; s22 += a2 * b2; s23 += a2 * b3  # noqa: E702
            s30 += a3 * b0; s31 += a3 * b1; s32 += a3 * b2; s33 += a3 * b3  # noqa: E702
        out[p, o] = _finish(s00, bias, res, p, o, relu)
        out[p, o + 1] = _finish(s01, bias, res, p, o + 1, relu)
        out[p, o + 2] = _finish(s02, bias, res, p, o + 2, relu)
        out[p, o + 3] = _finish(s03, bias, res, p, o + 3, relu)
        out[p + 1, o] = _finish(s10, bias, res, p + 1, o, relu)
        out[p + 1, o + 1] = _finish(s11, bias, res, p + 1, o + 1, relu)
        out[p + 1, o + 2] = _finish(s12, bias, res, p + 1, o + 2, relu)
        out[p + 1, o + 3] = _finish(s13, bias, res, p + 1, o + 3, relu)
        out[p + 2, o] = _finish(s20, bias, res, p + 2, o, relu)
        out[p + 2, o + 1] = _finish(s21, bias, res, p + 2, o + 1, relu)
        out[p + 2, o + 2] = _finish(s22, bias, res, p + 2, o + 2, relu)
        out[p + 2, o + 3] = _finish(s23, bias, res, p + 2, o + 3, relu)
        out[p + 3, o] = _finish(s30, bias, res, p + 3, o, relu)
        out[p + 3, o + 1] = _finish(s31, bias, res, p + 3, o + 1, relu)
        out[p + 3, o + 2] = _finish(s32, bias, res, p + 3, o + 2, relu)
        out[p + 3, o + 3] = _finish(s33, bias, res, p + 3, o + 3, relu)
    for q in range(p, p + 4):                           # leftover columns of this block
        for o in range(o4, n_o):
            out[q, o] = _finish(_dot(a, q, b, o), bias, res, q, o, relu)


@njit(cache=True, nogil=True, fastmath=_DOT_MATH, boundscheck=False)
def _matmul_last_rows(a, b, bias, relu, res, out, p4):
    for q in range(p4, a.shape[0]):                         # leftover rows
        for o in range(b.shape[0]):
            out[q, o] = _finish(_dot(a, q, b, o), bias, res, q, o, relu)


@njit(parallel=True, cache=True, nogil=True)
def _matmul_nt_par(a, b, bias, relu, res, out):
    p4 = a.shape[0] - a.shape[0] % 4
    for blk in prange(p4 // 4):
        _matmul_rows4(a, b, bias, relu, res, out, 4 * blk)
    _matmul_last_rows(a, b, bias, relu, res, out, p4)


@njit(cache=True, nogil=True)
def _matmul_nt_ser(a, b, bias, relu, res, out):
    """:func:`_matmul_nt_par` without Numba's thread pool: at one thread, handing each call to
    a pool thread and waiting for it cost ~15% of ResNet-20's run time (loaded 2-core VM)."""
    p4 = a.shape[0] - a.shape[0] % 4
    for blk in range(p4 // 4):
        _matmul_rows4(a, b, bias, relu, res, out, 4 * blk)
    _matmul_last_rows(a, b, bias, relu, res, out, p4)


@njit(inline="always")
def _pixel_base(p, oh, ow, wp, hp, c, sh, sw):
    """Offset in the flat padded NHWC input of the top-left tap of output pixel ``p``."""
    n, rem = p // (oh * ow), p % (oh * ow)
    return ((n * hp + (rem // ow) * sh) * wp + (rem % ow) * sw) * c


@njit(inline="always", fastmath=_DOT_MATH)
def _dot3(xf, base, rs, w, o, run):
    acc = np.float32(0)
    for i in range(3):
        xr, wr = xf[base + i * rs:base + i * rs + run], w[o, i * run:(i + 1) * run]
        for k in range(run):
            acc += xr[k] * wr[k]
    return acc


def conv3rows_nhwc(xf, shape, w, strides, dh, out_hw, bias, relu, res, out):
    """Dense conv with 3 kernel rows and unit column dilation, read from the padded NHWC input.

    For output pixel ``p`` and kernel row ``i``, the taps ``(j, c)`` are one
    contiguous run of ``kw*C`` floats of the padded input, and the matching
    weights are one contiguous run of the weight row ``w[o]`` (order (i, j, c)).
    So each output is the sum of 3 dot products of runs.  As in
    :func:`matmul_nt`, 4 pixels x 4 output channels are computed together (16
    running sums, 3 rows in one loop so the sums are reduced once), vectorised over
    the run.  This is im2col + matmul with the im2col rows never written.

    Parameters
    ----------
    xf : ndarray, shape (N*Hp*Wp*C,), float32
        The padded input in NHWC order, flattened (C-contiguous).
    shape : (int, int, int, int)
        ``(N, Hp, Wp, C)`` of the padded input.
    w : ndarray, shape (O, 3*kw*C), float32, C-contiguous
        Weight rows in (i, j, c) order (:func:`dfmpc.engine.conv.dense_weight`).
    strides : (int, int)
    dh : int
        Row dilation (the column dilation must be 1).
    out_hw : (int, int)
        Output height and width.
    bias : ndarray, shape (O,), float32
    relu : bool
    res : ndarray, shape (N*oh*ow, O), float32, or None
        Residual added before the activation, or None.
    out : ndarray, shape (N*oh*ow, O), float32
        Written, not read (NHWC output).
    """
    f = _conv3rows_par if num_threads() > 1 else _conv3rows_ser
    f(xf, shape, w, strides, dh, out_hw, bias, relu, res, out)


@njit(cache=True, nogil=True, fastmath=_DOT_MATH, boundscheck=False)
def _conv3rows_last_pixels(xf, shape, w, strides, dh, out_hw, bias, relu, res, out, p4):
    n_img, hp, wp, c = shape
    (sh, sw), (oh, ow) = strides, out_hw
    run, rs = w.shape[1] // 3, dh * wp * c
    for q in range(p4, n_img * oh * ow):                    # leftover pixels
        base = _pixel_base(q, oh, ow, wp, hp, c, sh, sw)
        for o in range(w.shape[0]):
            out[q, o] = _finish(_dot3(xf, base, rs, w, o, run), bias, res, q, o, relu)


def _conv3rows_variant(parallel):
    """:func:`conv3rows_nhwc` compiled with (``parallel=True``) or without Numba's thread pool.

    At one thread, handing each call to a pool thread and waiting for it cost ~15% of
    ResNet-20's run time.  The 4-pixel block is written inside the loop rather than
    called: with a per-block function call the C = 16 convs ran at ~80 GFLOP/s instead
    of ~105.  ``parallel`` is read in the body so that the two variants differ in
    their closure, which is how Numba's on-disk cache tells them apart.
    """
    @specialised("par" if parallel else "ser", parallel=parallel, nogil=True, fastmath=_DOT_MATH, boundscheck=False)
    def kernel(xf, shape, w, strides, dh, out_hw, bias, relu, res, out):
        n_img, hp, wp, c = shape
        sh, sw = strides
        oh, ow = out_hw
        n_p, n_o = n_img * oh * ow, w.shape[0]
        run = w.shape[1] // 3                               # kw * C
        rs = dh * wp * c                                    # from one kernel row to the next
        p4, o4 = n_p - n_p % 4, n_o - n_o % 4
        if parallel and p4 < 0:                             # never: see the docstring
            return
        for blk in prange(p4 // 4):
            p = 4 * blk
            b0 = _pixel_base(p, oh, ow, wp, hp, c, sh, sw)
            b1 = _pixel_base(p + 1, oh, ow, wp, hp, c, sh, sw)
            b2 = _pixel_base(p + 2, oh, ow, wp, hp, c, sh, sw)
            b3 = _pixel_base(p + 3, oh, ow, wp, hp, c, sh, sw)
            # the 4 pixels' input runs for kernel rows 0, 1, 2
            x00, x01, x02 = xf[b0:b0 + run], xf[b0 + rs:b0 + rs + run], xf[b0 + 2 * rs:b0 + 2 * rs + run]
            x10, x11, x12 = xf[b1:b1 + run], xf[b1 + rs:b1 + rs + run], xf[b1 + 2 * rs:b1 + 2 * rs + run]
            x20, x21, x22 = xf[b2:b2 + run], xf[b2 + rs:b2 + rs + run], xf[b2 + 2 * rs:b2 + 2 * rs + run]
            x30, x31, x32 = xf[b3:b3 + run], xf[b3 + rs:b3 + rs + run], xf[b3 + 2 * rs:b3 + 2 * rs + run]
            for o in range(0, o4, 4):
                # the 4 output channels' weight runs for kernel rows 0, 1, 2
                w00, w01, w02 = w[o, :run], w[o, run:2 * run], w[o, 2 * run:]
                w10, w11, w12 = w[o + 1, :run], w[o + 1, run:2 * run], w[o + 1, 2 * run:]
                w20, w21, w22 = w[o + 2, :run], w[o + 2, run:2 * run], w[o + 2, 2 * run:]
                w30, w31, w32 = w[o + 3, :run], w[o + 3, run:2 * run], w[o + 3, 2 * run:]
                s00 = s01 = s02 = s03 = np.float32(0)
                s10 = s11 = s12 = s13 = np.float32(0)
                s20 = s21 = s22 = s23 = np.float32(0)
                s30 = s31 = s32 = s33 = np.float32(0)
                for k in range(run):
                    a0, a1, a2, a3 = x00[k], x10[k], x20[k], x30[k]            # kernel row 0
                    c0, c1, c2, c3 = w00[k], w10[k], w20[k], w30[k]
                    e0, e1, e2, e3 = x01[k], x11[k], x21[k], x31[k]            # kernel row 1
                    f0, f1, f2, f3 = w01[k], w11[k], w21[k], w31[k]
                    g0, g1, g2, g3 = x02[k], x12[k], x22[k], x32[k]            # kernel row 2
                    h0, h1, h2, h3 = w02[k], w12[k], w22[k], w32[k]
                    s00 += a0 * c0 + e0 * f0 + g0 * h0
                    s01 += a0 * c1 + e0 * f1 + g0 * h1
                    s02 += a0 * c2 + e0 * f2 + g0 * h2
                    s03 += a0 * c3 + e0 * f3 + g0 * h3
                    s10 += a1 * c0 + e1 * f0 + g1 * h0
                    s11 += a1 * c1 + e1 * f1 + g1 * h1
                    s12 += a1 * c2 + e1 * f2 + g1 * h2
                    s13 += a1 * c3 + e1 * f3 + g1 * h3
                    s20 += a2 * c0 + e2 * f0 + g2 * h0
                    s21 += a2 * c1 + e2 * f1 + g2 * h1
                    s22 += a2 * c2 + e2 * f2 + g2 * h2
                    s23 += a2 * c3 + e2 * f3 + g2 * h3
                    s30 += a3 * c0 + e3 * f0 + g3 * h0
                    s31 += a3 * c1 + e3 * f1 + g3 * h1
                    s32 += a3 * c2 + e3 * f2 + g3 * h2
                    s33 += a3 * c3 + e3 * f3 + g3 * h3
                out[p, o] = _finish(s00, bias, res, p, o, relu)
                out[p, o + 1] = _finish(s01, bias, res, p, o + 1, relu)
                out[p, o + 2] = _finish(s02, bias, res, p, o + 2, relu)
                out[p, o + 3] = _finish(s03, bias, res, p, o + 3, relu)
                out[p + 1, o] = _finish(s10, bias, res, p + 1, o, relu)
                out[p + 1, o + 1] = _finish(s11, bias, res, p + 1, o + 1, relu)
                out[p + 1, o + 2] = _finish(s12, bias, res, p + 1, o + 2, relu)
                out[p + 1, o + 3] = _finish(s13, bias, res, p + 1, o + 3, relu)
                out[p + 2, o] = _finish(s20, bias, res, p + 2, o, relu)
                out[p + 2, o + 1] = _finish(s21, bias, res, p + 2, o + 1, relu)
                out[p + 2, o + 2] = _finish(s22, bias, res, p + 2, o + 2, relu)
                out[p + 2, o + 3] = _finish(s23, bias, res, p + 2, o + 3, relu)
                out[p + 3, o] = _finish(s30, bias, res, p + 3, o, relu)
                out[p + 3, o + 1] = _finish(s31, bias, res, p + 3, o + 1, relu)
                out[p + 3, o + 2] = _finish(s32, bias, res, p + 3, o + 2, relu)
                out[p + 3, o + 3] = _finish(s33, bias, res, p + 3, o + 3, relu)
            for q in range(p, p + 4):                           # leftover channels of this block
                base = _pixel_base(q, oh, ow, wp, hp, c, sh, sw)
                for o in range(o4, n_o):
                    out[q, o] = _finish(_dot3(xf, base, rs, w, o, run), bias, res, q, o, relu)
        _conv3rows_last_pixels(xf, shape, w, strides, dh, out_hw, bias, relu, res, out, p4)

    return kernel


_conv3rows_par = _conv3rows_variant(True)
_conv3rows_ser = _conv3rows_variant(False)


def conv_grouped(x, w, groups, sh, sw, pt, pl, dh, dw, oh, ow):
    """Direct grouped convolution (depthwise when ``groups == C``), no bias.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32
    w : ndarray, shape (O, C // groups, kh, kw), float32
    groups : int
        Number of groups; ``C`` and ``O`` are both multiples of it.
    sh, sw, pt, pl, dh, dw : int
        Strides, top/left padding, dilations.
    oh, ow : int
        Output height and width.

    Returns
    -------
    out : ndarray, shape (N, O, oh, ow), float32

    Notes
    -----
    Each output sums its products in one fixed order on one thread, so the serial variant (one
    Numba thread, e.g. a batch-split worker of :mod:`dfmpc.engine.executor`) and the parallel
    one give the same bits.
    """
    f = _conv_grouped_par if num_threads() > 1 else _conv_grouped_ser
    return f(x, w, groups, sh, sw, pt, pl, dh, dw, oh, ow)


def _conv_grouped_variant(parallel):
    """:func:`conv_grouped` with (``parallel=True``) or without Numba's thread pool: Numba's
    "workqueue" layer aborts the process when two Python threads launch parallel kernels at once,
    so the batch-split workers (one Numba thread each) must run the serial one.  ``parallel`` is
    read in the body so that Numba's on-disk cache tells the variants apart."""
    @specialised("par" if parallel else "ser", parallel=parallel, nogil=True, fastmath=False)
    def kernel(x, w, groups, sh, sw, pt, pl, dh, dw, oh, ow):
        if parallel and oh < 0:                             # never: see the docstring
            return np.zeros((0, 0, 0, 0), dtype=np.float32)
        n_img, c_in, h_in, w_in = x.shape
        c_out, cg, kh, kw = w.shape
        og = c_out // groups
        out = np.zeros((n_img, c_out, oh, ow), dtype=np.float32)
        for t in prange(n_img * c_out):
            n = t // c_out
            o = t % c_out
            g = o // og
            for c in range(cg):
                ci = g * cg + c
                for i in range(kh):
                    for j in range(kw):
                        wv = w[o, c, i, j]
                        for y in range(oh):
                            ih = y * sh - pt + i * dh
                            if ih < 0 or ih >= h_in:
                                continue
                            for xo in range(ow):
                                iw = xo * sw - pl + j * dw
                                if iw >= 0 and iw < w_in:
                                    out[n, o, y, xo] += wv * x[n, ci, ih, iw]
        return out
    return kernel


_conv_grouped_par = _conv_grouped_variant(True)
_conv_grouped_ser = _conv_grouped_variant(False)


@njit(cache=True, nogil=True, boundscheck=False)
def pad_nhwc(x, pt, pl, out):
    """``out[:, pt:pt+H, pl:pl+W, :] = x`` and zero elsewhere, in one pass over ``out``.

    The dense convs pad their NHWC input before every call; NumPy's five slice assignments
    (four borders and the interior, each a strided loop) cost ~0.3-0.7 ms per 16-channel 28x28
    conv of 64 images on a 2-core Zen 3, this about a third of it.

    Parameters
    ----------
    x : ndarray, shape (N, H, W, C), float32, any strides
    pt, pl : int
        Top and left padding (bottom and right follow from ``out``'s shape).
    out : ndarray, shape (N, Hp, Wp, C), float32, C-contiguous, Hp >= pt + H, Wp >= pl + W
        Written, not read.

    Twin: ``np.pad(x, ((0, 0), (pt, Hp - pt - H), (pl, Wp - pl - W), (0, 0)))``
    (``tests/test_engine_arena.py::test_pad_nhwc_equals_np_pad``).
    """
    n_img, h, w, c = x.shape
    hp, wp = out.shape[1], out.shape[2]
    for n in range(n_img):
        for yp in range(hp):
            y = yp - pt
            row = out[n, yp]
            if y < 0 or y >= h:
                for j in range(wp):
                    for k in range(c):
                        row[j, k] = np.float32(0)
                continue
            for j in range(pl):
                for k in range(c):
                    row[j, k] = np.float32(0)
            for j in range(w):
                for k in range(c):
                    row[pl + j, k] = x[n, y, j, k]
            for j in range(pl + w, wp):
                for k in range(c):
                    row[j, k] = np.float32(0)


#: :func:`padded` keeps its buffer between calls up to this size (larger ones are allocated per call)
PAD_SCRATCH_BYTES = 64 << 20

_PAD_LOCAL = threading.local()


def padded(x, pt, pl, hp, wp):
    """``x`` (N, H, W, C) zero-padded to (N, hp, wp, C), ``pt`` rows on top and ``pl`` columns on
    the left, by :func:`pad_nhwc`, in a buffer the calling thread reuses from call to call.

    The result is only valid until the calling thread's next call (a conv's padded input lives
    during that conv only).  A fresh array of a few MB on every conv is new pages from the OS
    (page faults, cold cache; see :func:`dfmpc.engine.winograd._scratch`).  Buffers above
    :data:`PAD_SCRATCH_BYTES` are not kept.
    """
    n, c = x.shape[0], x.shape[3]
    size = n * hp * wp * c
    if size * 4 > PAD_SCRATCH_BYTES:
        out = np.empty((n, hp, wp, c), np.float32)
    else:
        buf = getattr(_PAD_LOCAL, "buf", None)
        if buf is None or buf.size < size:
            buf = _PAD_LOCAL.buf = np.empty(size, np.float32)
        out = buf[:size].reshape(n, hp, wp, c)
    pad_nhwc(x, pt, pl, out)
    return out
