"""2-D convolution, NCHW x OIHW, with ONNX geometry (asymmetric pads, dilation, groups).

Dense convs (``groups == 1``) are im2col + one float32 matmul, with bias,
residual and ReLU applied as each output is written; grouped and depthwise
convs use a direct Numba loop, where im2col would mostly copy zeros.
:func:`conv2d_f32` is the engine's one convolution; its float64 twin, which the
tests compare it and every kernel below against, is :func:`dfmpc.conv2d`.

Memory layout of the dense path (the shapes stay NCHW): the input is read as
NHWC (``x.transpose(0, 2, 3, 1)``, free when ``x`` came from this function),
and im2col builds ``cols`` of shape (pixels, kh*kw*C) whose row for one
output pixel is its receptive field in (i, j, c) order, so that, in NHWC,
kernel row ``i`` is a single run of ``kw*C`` contiguous floats of the padded
input.  ``cols @ Wm.T`` with the weight matrix ``Wm`` of shape (O, kh*kw*C)
(:func:`dense_weight`) is then the output in NHWC, which is returned as an
(N, O, oh, ow) view: no transposes on the way in or out.

Which kernel runs (:data:`KERNEL`, default ``"auto"``): for each conv shape the fastest of
the applicable kernels below, measured on the machine at hand the first time the shape is
seen and remembered on disk per CPU (:mod:`dfmpc.engine.kernel_choice`):

- ``"direct"``, the Numba kernels: for 3 kernel rows, column dilation 1 and ``kw*C >= 16``
  (3x3 convs on >= 6 channels), :func:`~dfmpc.engine.kernels_numba.conv3rows_nhwc` reads the
  runs straight from the padded input, so ``cols`` is never written; otherwise (1x1, other
  kernel heights) im2col by one strided NumPy copy, a few images at a time so that ``cols``
  stays small (``COLS_BYTES``) and in cache, then :func:`~dfmpc.engine.kernels_numba.matmul_nt`;
- ``"blocked"``: the register-blocked direct kernel, :mod:`dfmpc.engine.blocked` (16 output
  channels x 4 pixels, 8 on AVX-512 (:data:`~dfmpc.engine.blocked.PIXELS`), of running sums kept in
  SIMD registers over all taps and channels), any
  kernel size, stride, dilation; the filters' layout cached per weight array;
- ``"im2col_blas"``: im2col as above + ``np.matmul`` (BLAS);
- ``"winograd_f2"``, ``"winograd_f4"`` (3x3, stride 1, dilation 1 only): Winograd
  F(2x2, 3x3) / F(4x4, 3x3), :mod:`dfmpc.engine.winograd`, with the filters' transform
  cached per weight array and the element-wise products as one batched ``np.matmul`` (BLAS);
- ``"winograd_f4_numba"``: the same F(4x4, 3x3) with the products made by a register-blocked
  Numba loop (:func:`~dfmpc.engine.winograd.products_kernel`; output channels a multiple of 16),
  which beats BLAS on the many small products of narrow layers.

Memory: the output of a dense conv comes from the calling thread's arena when the executor runs
the graph (:mod:`dfmpc.engine.arena`: the arrays of dropped tensors are reused), the padded input
and the im2col rows from buffers the calling thread keeps between calls
(:func:`~dfmpc.engine.kernels_numba.padded`, :func:`_scratch_cols`): a fresh array of a few MB per
conv is new pages from the OS, which cost about a fifth of ResNet-20's forward pass on 64-image
chunks (2-core Zen 3).

Threads: the kernels use ``numba.get_num_threads()`` threads (``NUMBA_NUM_THREADS``);
the direct and blocked kernels through Numba's pool, Winograd by running half of its tile blocks on a
second Python thread (its kernels and ``np.matmul`` release the GIL), im2col + BLAS through
the BLAS library's threads.  :func:`dfmpc.engine.executor.run_graph` instead splits a batch of
several chunks across Python threads that each run at one Numba thread
(``numba.set_num_threads`` is per thread): everything here is then called from several threads
at once.  For that the serial kernels release the GIL (``nogil``), the filter-layout cache and
the kernel measurement are locked (one measurement at a time, :data:`kernel_choice.MEASURE_LOCK`),
and BLAS products that OpenBLAS would thread are made one at a time
(:data:`~dfmpc.engine.winograd.BLAS_LOCK`).
"""

from __future__ import annotations

import numpy as np

import contextlib
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numba
from numpy.lib.stride_tricks import sliding_window_view

from . import arena, blocked, kernel_choice, winograd
from .kernels_numba import conv3rows_nhwc, conv_grouped, matmul_nt, num_threads, padded

#: dense-conv kernel: "auto" (measured per shape, :mod:`dfmpc.engine.kernel_choice`), or one of
#: :data:`DENSE_KERNELS` for every dense conv (a Winograd name falls back to "direct" where it
#: does not apply).  Benchmarks and tests set it; ``benchmarks/engine.py --conv-kernel``.
KERNEL = "auto"

#: the dense-conv kernels, in the order they are measured ("direct" first: the others are
#: checked against it)
DENSE_KERNELS = ("direct", "blocked", "im2col_blas", "winograd_f2", "winograd_f4", "winograd_f4_numba")

#: target size of one im2col buffer; measured on ResNet-20 (2-core Zen 5, OpenBLAS):
#: 1-4 MB keep cols in L2/L3 next to the matmul; 14 MB (32 images at 28x28x16) ran 1.5x slower
COLS_BYTES = 2 << 20


def conv_output_size(size: int, k: int, stride: int, pad_begin: int, pad_end: int,
                     dilation: int, ceil_mode: bool = False) -> int:
    """Output length along one axis: floor((size + pads - dilation*(k-1) - 1) / stride) + 1.

    With ``ceil_mode`` (pooling only) the division rounds up, but the last
    window must still start inside the input or the begin padding.
    """
    span = size + pad_begin + pad_end - dilation * (k - 1) - 1
    if span < 0:
        return 0
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def conv2d_f32(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
               strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups: int = 1, *,
               wt: np.ndarray | None = None, relu: bool = False,
               residual: np.ndarray | None = None) -> np.ndarray:
    """The engine's float32 convolution of a batch with a filter bank (cross-correlation, as in ONNX).

    Same arithmetic as the float64 reference :func:`dfmpc.conv2d` (``conv2d(x, w, strides, pads,
    groups, dilation=dilations, bias=b)``), which the tests compare it with.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32
    w : ndarray, shape (O, C // groups, kh, kw), float32
    b : ndarray, shape (O,), float32, optional
    strides : (int, int)
    pads : (int, int, int, int)
        ``(top, left, bottom, right)``, ONNX order.
    dilations : (int, int)
    groups : int
    wt : ndarray, shape (O, kh*kw*C), optional
        ``dense_weight(w)``, precomputed by callers that run the same conv on many chunks.
    relu : bool
        Apply ReLU to the result (fused into the bias pass).
    residual : ndarray, shape (N, O, oh, ow), float32, optional
        Added to the conv output before the ReLU (a ResNet block's shortcut), in the
        same pass: ``relu(conv(x) + b + residual)``.

    Returns
    -------
    ndarray, shape (N, O, oh, ow), float32
        For dense convs a view of NHWC memory (``y.transpose(0, 2, 3, 1)`` is contiguous).

    Raises
    ------
    ValueError
        Channel counts inconsistent with ``groups``, or an empty output.

    Examples
    --------
    >>> y = conv2d_f32(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 3, 3), np.float32), pads=(1, 1, 1, 1))
    >>> y[0, 0]
    array([[4., 6., 4.],
           [6., 9., 6.],
           [4., 6., 4.]], dtype=float32)
    """
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"input has {c} channels and weight {w.shape} with groups={groups}: "
                         f"expected C = {cg}*{groups} and O divisible by groups")
    sh, sw = strides
    pt, pl, pb, pr = pads
    dh, dw = dilations
    oh = conv_output_size(h, kh, sh, pt, pb, dh)
    ow = conv_output_size(wd, kw, sw, pl, pr, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {h}x{wd} is too small for kernel {kh}x{kw} "
                         f"(pads {pads}, dilations {dilations})")
    if groups == 1:
        return _conv_dense(x, w, b, (sh, sw), pads, (dh, dw), oh, ow, wt, relu, residual)
    out = conv_grouped(x, np.ascontiguousarray(w), groups, sh, sw, pt, pl, dh, dw, oh, ow)
    if b is not None:
        out += b[None, :, None, None]
    if residual is not None:
        out += residual
    if relu:
        np.maximum(out, np.float32(0), out=out)
    return out



def dense_weight(w: np.ndarray) -> np.ndarray:
    """Weight (O, C, kh, kw) as the (O, kh*kw*C) float32 matrix whose rows meet im2col rows."""
    o = w.shape[0]
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(o, -1), dtype=np.float32)


def _matmul(cols, wm, b, relu, res, out, blas):
    """out (P, O) = act(cols (P, K) @ wm (O, K).T + b (+ res)), by Numba or (``blas``) np.matmul."""
    if not blas:
        matmul_nt(cols, wm, b, relu, res, out)
        return
    if cols.shape[0] * cols.shape[1] * wm.shape[0] > winograd.BLAS_SERIAL_MNK:
        with winograd.BLAS_LOCK:                        # a threaded sgemm: one Python thread at a time
            np.matmul(cols, wm.T, out=out)
    else:
        np.matmul(cols, wm.T, out=out)
    out += b
    if res is not None:
        out += res
    if relu:
        np.maximum(out, np.float32(0), out=out)


def im2col_nhwc(xp: np.ndarray, kernel, strides, dilations, oh: int, ow: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """Unfold conv windows of a padded NHWC batch into rows.

    Parameters
    ----------
    xp : ndarray, shape (N, Hp, Wp, C), float32
        Input already padded (any strides).
    kernel, strides, dilations : (int, int)
    oh, ow : int
        Output height and width.
    out : ndarray, shape (N*oh*ow, kh*kw*C), optional
        Buffer to fill (C-contiguous).

    Returns
    -------
    ndarray, shape (N*oh*ow, kh*kw*C), float32
        Row ``(n*oh + y)*ow + x`` is ``xp[n, y*sh + i*dh, x*sw + j*dw, c]`` at
        column ``(i*kw + j)*C + c``: one strided copy, no Python loop.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    n, c = xp.shape[0], xp.shape[3]
    if out is None:
        out = np.empty((n * oh * ow, kh * kw * c), np.float32)
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
    win = win[:, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, :, ::dh, ::dw]   # (N, oh, ow, C, kh, kw)
    out.reshape(n, oh, ow, kh, kw, c)[...] = win.transpose(0, 1, 2, 4, 5, 3)
    return out


#: convs with fewer multiply-adds per call than this run :func:`small_conv_kernel`, not the
#: kernel measured fastest: below it a conv takes too little time for a timing to mean much.
#: 2^22 since 2026-12-06 (fourteenth session; it was 2^24): ResNet-20's 1-channel stem on a
#: 64-image chunk (2^22.8) is then measured, and on a Zen 4 takes ``winograd_f4_numba`` at 0.76 ms
#: per chunk instead of 2.1 ms for ``direct``; its 1x1 shortcuts (2^22.6) are measured too.
#: The quantization pipeline and the distillation never measure (:func:`unmeasured`): the kernels
#: round differently, the descent steps amplify it (``dfmpc demo``: 91.22 % vs 91.48 % for
#: "sequential re-calibration only" between the direct kernel and a measured mix), and a choice
#: made by timing would make the quantized model depend on the machine's load.
#: The blocked kernel's result does not depend on the thread count.
MEASURE_MIN_MACS = 1 << 22

_UNMEASURED = threading.local()


@contextlib.contextmanager
def unmeasured():
    """Within this block, on the calling thread, every dense conv runs :func:`small_conv_kernel`'s
    kernel whatever its size: no timing, and no choice read from the machine's kernel-choice file.

    The quantization pipeline and the probe distillation run inside it, so that their result
    depends on the weights and the seed only, not on which kernel won a timing on this machine
    (the kernels round differently and the distillation's descent amplifies it). Most of
    ResNet-20's convs on 8 probe images are above :data:`MEASURE_MIN_MACS`, as are VGG-small's,
    whose probes differed between two checkouts with different choice files before this.
    Re-entrant; other threads (e.g. an evaluation running beside it) are not affected, except the
    engine's own batch-split workers, which carry the setting of the thread that called it.

    Examples
    --------
    >>> x = np.ones((64, 64, 28, 28), np.float32); w = np.ones((64, 64, 3, 3), np.float32)
    >>> with unmeasured():
    ...     y = conv2d_f32(x, w, pads=(1, 1, 1, 1))          # 2^31 multiply-adds, not measured
    >>> float(y[0, 0, 1, 1]), float(y[0, 0, 0, 0])
    (576.0, 256.0)
    """
    depth = getattr(_UNMEASURED, "depth", 0)
    _UNMEASURED.depth = depth + 1
    try:
        yield
    finally:
        _UNMEASURED.depth = depth


def is_unmeasured() -> bool:
    """True inside :func:`unmeasured` on the calling thread."""
    return getattr(_UNMEASURED, "depth", 0) > 0

#: the candidates are measured on the first images of the batch, about this many multiply-adds
MEASURE_MACS = 1 << 25

#: im2col + BLAS must measure this many times faster than the Numba kernels to be chosen, at any
#: thread count: OpenBLAS's worker threads spin after each product and take the cores the Numba
#: kernels that follow need, which timing one conv alone does not see.  Measured in ResNet-20 on
#: 500-image batches (2 threads, loaded 2-core Zen 3): the 64-channel 7x7 convs, chosen as
#: im2col + BLAS at 5.3 ms vs 8.3 ms for ``blocked`` on 18 images, took 4.5 s of a 10.8 s run over
#: 2000 images.  It applies at one Numba thread too (since 2026-12-06): the executor's batch-split
#: workers each run at one Numba thread, beside each other, and OpenBLAS still threads their
#: products; with the stride-2 convs of the shipped ResNet-20 on BLAS, a 10,000-image evaluation
#: at two threads took 11.0-13.5 s, with them on ``blocked`` 8.3-9.4 s (alternating, one process).
#: One setting for both keeps the choices, and so the bits, the same at one and at two threads.
BLAS_HANDICAP = 2.0


def applicable_kernels(kernel, strides, dilations, out_hw=None, out_channels=None) -> tuple[str, ...]:
    """The dense-conv kernels that can compute a conv of this geometry.

    Winograd applies to 3x3, stride 1, dilation 1; ``"winograd_f4_numba"`` (its products by
    :func:`~dfmpc.engine.winograd.products_kernel`) also needs a multiple of 16 output channels,
    checked when ``out_channels`` is given.  With ``out_hw`` given (the measured candidates),
    F(2x2, 3x3) is only tried where F(4x4, 3x3)'s tiles overhang the output by 20 % more than its
    own (e.g. 14 x 14: 16 x 16 vs 14 x 14), so that fewer kernels are compiled.
    """
    if not (tuple(kernel) == (3, 3) and tuple(strides) == (1, 1) and tuple(dilations) == (1, 1)):
        return DENSE_KERNELS[:3]
    names = DENSE_KERNELS
    if out_channels is not None and out_channels % winograd.PRODUCT_LANES:
        names = tuple(k for k in names if k != "winograd_f4_numba")
    if out_hw is None:
        return names
    oh, ow = out_hw
    area = [-(-oh // m) * m * -(-ow // m) * m for m in (2, 4)]
    return names if area[1] > 1.2 * area[0] else tuple(k for k in names if k != "winograd_f2")


def small_conv_kernel(c: int, o: int, kernel) -> str:
    """The kernel of a conv too small to measure: ``"blocked"`` when each output sums at least
    16 products and there are at least 8 output channels (most of a block's lanes used), else
    ``"direct"``."""
    return "blocked" if c * kernel[0] * kernel[1] >= 16 and o >= 8 else "direct"


def _conv_dense(x, w, b, strides, pads, dilations, oh, ow, wt=None, relu=False, residual=None):
    """groups == 1: the kernel chosen for this shape (:data:`KERNEL`); returns an NCHW view of
    NHWC memory."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    b = np.zeros(o, np.float32) if b is None else np.asarray(b, np.float32)
    res = None
    if residual is not None:                                # NHWC; free if it is NHWC memory
        if residual.shape != (n, o, oh, ow):
            raise ValueError(f"residual has shape {residual.shape}, expected {(n, o, oh, ow)}")
        res = np.ascontiguousarray(residual.transpose(0, 2, 3, 1), dtype=np.float32)
    if n == 0:
        return np.empty((0, oh, ow, o), np.float32).transpose(0, 3, 1, 2)
    xn = x.transpose(0, 2, 3, 1)                            # NHWC view
    names = applicable_kernels((kh, kw), strides, dilations, out_channels=o)
    threads = num_threads()

    def run(name):
        return _run_dense(name, xn, w, wt, b, strides, pads, dilations, oh, ow, relu, res, threads)

    if KERNEL != "auto":
        return run(KERNEL if KERNEL in names else "direct").transpose(0, 3, 1, 2)
    macs_per_image = oh * ow * o * c * kh * kw
    if n * macs_per_image < MEASURE_MIN_MACS or is_unmeasured():
        return run(small_conv_kernel(c, o, (kh, kw))).transpose(0, 3, 1, 2)
    key = kernel_choice.shape_key(x.shape, w.shape, tuple(strides), tuple(pads), tuple(dilations), threads)
    name = kernel_choice.lookup(key)
    if name not in names:
        # first time this shape is seen: measure on the first few images; the candidates must
        # agree with "direct" to within a bound far above float32 rounding (Winograd F(4x4)'s
        # is ~2e-6 of it, tests/test_engine_winograd.py) yet far below what a bug produces.
        # One thread measures at a time (the batch-split workers of dfmpc.engine.executor meet
        # the same shapes together): the others wait, then read its choice
        with kernel_choice.MEASURE_LOCK:
            name = kernel_choice.lookup(key)
            if name not in names:
                k = max(1, min(n, MEASURE_MACS // macs_per_image))
                xs, rs = xn[:k], None if res is None else res[:k]
                scale = float(np.abs(xs).max(initial=0.0)) * float(np.abs(w).reshape(o, -1).sum(axis=1).max()) + 1.0
                cands = {kn: (lambda kn=kn: _run_dense(kn, xs, w, wt, b, strides, pads, dilations, oh, ow, relu,
                                                      rs, threads))
                         for kn in applicable_kernels((kh, kw), strides, dilations, (oh, ow), o)}
                name, y = kernel_choice.choose(key, cands, "direct", 1e-3 * scale,
                                               {"im2col_blas": BLAS_HANDICAP})
                if k == n:
                    return y.transpose(0, 3, 1, 2)
    return run(name).transpose(0, 3, 1, 2)


def _run_dense(name, xn, w, wt, b, strides, pads, dilations, oh, ow, relu, res, threads):
    """One dense conv by kernel ``name``; returns the output (N, oh, ow, O), NHWC, C-contiguous."""
    n, h, wd, c = xn.shape
    o, _, kh, kw = w.shape
    pt, pl, pb, pr = pads
    if name.startswith("winograd"):
        m = 2 if name == "winograd_f2" else 4
        U = _cached_weight(w, m, lambda v: winograd.weight_transform(v, m))
        return winograd.conv3x3(xn, U, b, pads, (oh, ow), m, relu, res, out=arena.empty((n, oh, ow, o)),
                                pool=_pool() if threads > 1 else None,
                                products="numba" if name == "winograd_f4_numba" else "blas")
    blas = name == "im2col_blas"
    wt = dense_weight(w) if wt is None else wt
    out = arena.empty((n, oh, ow, o))
    res2 = None if res is None else res.reshape(-1, o)
    if kh == kw == 1 and not any(pads) and name != "blocked":   # 1x1: the (strided) input is cols
        xs = xn[:, ::strides[0], ::strides[1], :][:, :oh, :ow, :]
        _matmul(np.ascontiguousarray(xs.reshape(-1, c)), wt, b, relu, res2, out.reshape(-1, o), blas)
        return out
    if any(pads):                                           # padded copy in a reused scratch buffer
        xp = padded(xn, pt, pl, h + pt + pb, wd + pl + pr)
    else:
        xp = xn
    if name == "blocked":
        wb = _cached_weight(w, "blocked", blocked.blocked_weight)
        if dilations[1] == 1 and kw * c < BLOCKED_MIN_RUN and kh * kw > 1:
            # runs of a few floats (a 1-channel stem: 3): the per-run cost of the kernel
            # outweighs its multiply-adds; im2col makes one run of kh*kw*C per pixel (the
            # same products summed in the same order: taps, then channels), read as a 1x1 conv
            cols = im2col_nhwc(xp, (kh, kw), strides, dilations, oh, ow, _scratch_cols((n * oh * ow, kh * kw * c)))
            shape1 = (n, oh, ow, kh * kw * c)
            blocked.conv_blocked(cols.reshape(-1), shape1, wb.reshape(1, -1, wb.shape[2]),
                                 np.zeros(1, np.int64), (1, 1), (oh, ow), b, relu, res2, out.reshape(-1, o))
            return out
        xp = np.ascontiguousarray(xp)
        taps = blocked.tap_offsets((kh, kw), dilations, xp.shape[2], c)
        blocked.conv_blocked(xp.reshape(-1), xp.shape, wb.reshape(len(taps), -1, wb.shape[2]),
                             taps, strides, (oh, ow), b, relu, res2, out.reshape(-1, o))
        return out
    # no im2col: rows read in place; a run shorter than a SIMD vector (e.g. a 1-channel
    # stem: 3 floats) is faster through im2col + matmul_nt (measured 0.48 vs 0.33 ms)
    if kh == 3 and dilations[1] == 1 and kw * c >= 16 and not blas:
        xp = np.ascontiguousarray(xp)
        conv3rows_nhwc(xp.reshape(-1), xp.shape, wt, strides, dilations[0], (oh, ow), b, relu, res2,
                       out.reshape(-1, o))
        return out
    row_bytes = oh * ow * kh * kw * c * 4
    step = max(1, min(n, COLS_BYTES // max(row_bytes, 1)))
    buf = _scratch_cols((step * oh * ow, kh * kw * c))
    for s in range(0, n, step):
        m = min(step, n - s)
        cols = im2col_nhwc(xp[s:s + m], (kh, kw), strides, dilations, oh, ow, buf[:m * oh * ow])
        rows = slice(s * oh * ow, (s + m) * oh * ow)
        _matmul(cols, wt, b, relu, None if res2 is None else res2[rows], out.reshape(-1, o)[rows], blas)
    return out


#: the blocked kernel runs a conv whose kernel rows are runs of fewer than this many floats
#: (``kw*C``, e.g. 3 for a 3x3 conv on one channel) as im2col + a 1x1 blocked conv: ResNet-20's
#: 1-channel stem on 64 images took 1.4 ms instead of 4-6 ms (2-core Zen 3, one thread)
BLOCKED_MIN_RUN = 8

# Filter layouts of the Winograd and blocked kernels, one per weight array and kernel.  Keyed by the
# array's id and checked against a copy of the weights, so that an array changed in place is
# transformed anew.
_U_CACHE: dict = {}
_U_LOCK = threading.Lock()


_COLS_LOCAL = threading.local()

#: :func:`_scratch_cols` keeps its buffer between calls up to this size
COLS_SCRATCH_BYTES = 64 << 20


def _scratch_cols(shape):
    """A C-contiguous float32 array of ``shape`` for im2col rows, in memory the calling thread
    reuses from call to call (the rows live during one conv call; a fresh array each call is new
    pages from the OS).  Separate from the padded input's buffer
    (:func:`dfmpc.engine.kernels_numba.padded`), which is read while the rows are written."""
    size = int(np.prod(shape))
    if size * 4 > COLS_SCRATCH_BYTES:
        return np.empty(shape, np.float32)
    buf = getattr(_COLS_LOCAL, "buf", None)
    if buf is None or buf.size < size:
        buf = _COLS_LOCAL.buf = np.empty(size, np.float32)
    return buf[:size].reshape(shape)


_FROZEN = weakref.WeakValueDictionary()


def freeze(w: np.ndarray) -> np.ndarray:
    """Make ``w`` read-only and let the kernels use its cached layouts without checking it for
    in-place changes (for weights private to their caller, as the executor's BN-folded ones);
    returns ``w``."""
    w.flags.writeable = False
    _FROZEN[id(w)] = w
    return w


def _cached_weight(w, tag, make):
    """``make(w)``, cached under ``(id(w), tag)`` while ``w`` lives and is unchanged."""
    key = (id(w), tag)
    with _U_LOCK:
        hit = _U_CACHE.get(key)
    if hit is not None:
        ref, w_copy, U = hit
        # an array frozen by its owner (the executor's BN-folded weights, private to one run)
        # cannot have changed: no comparison, which cost ~20-50 us per conv call
        if ref() is w and (_FROZEN.get(id(w)) is w or np.array_equal(w_copy, w)):
            return U
    U = make(w)
    try:
        ref = weakref.ref(w, lambda _, key=key: _U_CACHE.pop(key, None))
    except TypeError:                                       # not weak-referenceable: no caching
        return U
    with _U_LOCK:
        _U_CACHE[key] = (ref, np.array(w, np.float32, copy=True), U)
    return U


_POOL = None
_POOL_PID = None


def _pool():
    """One extra worker thread for the kernels that split their work in two (Winograd); a new one
    in a forked child process (the parent's thread does not exist there)."""
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfmpc-conv")
        _POOL_PID = os.getpid()
    return _POOL
