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

Which kernel runs (``MATMUL = "numba"``, the default):

- 3 kernel rows, column dilation 1, ``kw*C >= 16`` (3x3 convs on >= 6 channels):
  :func:`~dfmpc.engine.kernels_numba.conv3rows_nhwc` reads the runs straight
  from the padded input, so ``cols`` is never written;
- otherwise (1x1, other kernel heights): im2col by one strided NumPy copy,
  a few images at a time so that ``cols`` stays small (``COLS_BYTES``) and in
  cache, then :func:`~dfmpc.engine.kernels_numba.matmul_nt`.

With ``MATMUL = "blas"`` every dense conv is im2col + ``np.matmul`` (BLAS).
"""

from __future__ import annotations

import numpy as np

from numpy.lib.stride_tricks import sliding_window_view

from .kernels_numba import conv3rows_nhwc, conv_grouped, matmul_nt

#: dense-conv kernels: "numba" (compiled for the host CPU's vector width; epilogue fused) or
#: "blas" (im2col + ``np.matmul``).  With OPENBLAS_CORETYPE=Haswell (this project's CI setting)
#: OpenBLAS runs AVX2 kernels; on the AVX-512 benchmark machine the Numba kernels ran
#: ResNet-20's conv shapes 1.3-1.6x faster than that BLAS (benchmarks/engine.py --conv-matmul).
MATMUL = "numba"

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


def _matmul(cols, wm, b, relu, res, out):
    """out (P, O) = act(cols (P, K) @ wm (O, K).T + b (+ res))."""
    if MATMUL == "numba":
        matmul_nt(cols, wm, b, relu, res, out)
        return
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


def _conv_dense(x, w, b, strides, pads, dilations, oh, ow, wt=None, relu=False, residual=None):
    """groups == 1: im2col (NHWC) + float32 matmul with bias (+ReLU), a slice of images at a time;
    returns an NCHW view of NHWC memory."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    pt, pl, pb, pr = pads
    wt = dense_weight(w) if wt is None else wt
    b = np.zeros(o, np.float32) if b is None else np.asarray(b, np.float32)
    xn = x.transpose(0, 2, 3, 1)                            # NHWC view
    out = np.empty((n, oh, ow, o), np.float32)
    res = None
    if residual is not None:                                # (P, O); free if it is NHWC memory
        if residual.shape != (n, o, oh, ow):
            raise ValueError(f"residual has shape {residual.shape}, expected {(n, o, oh, ow)}")
        res = np.ascontiguousarray(residual.transpose(0, 2, 3, 1), dtype=np.float32).reshape(-1, o)
    if kh == kw == 1 and not any(pads):                     # 1x1: the (strided) input is cols
        xs = xn[:, ::strides[0], ::strides[1], :][:, :oh, :ow, :]
        _matmul(np.ascontiguousarray(xs.reshape(-1, c)), wt, b, relu, res, out.reshape(-1, o))
    else:
        if any(pads):
            xp = np.zeros((n, h + pt + pb, wd + pl + pr, c), np.float32)
            xp[:, pt:pt + h, pl:pl + wd, :] = xn
        else:
            xp = xn
        # no im2col: rows read in place; a run shorter than a SIMD vector (e.g. a 1-channel
        # stem: 3 floats) is faster through im2col + matmul_nt (measured 0.48 vs 0.33 ms)
        if kh == 3 and dilations[1] == 1 and kw * c >= 16 and MATMUL == "numba":
            xp = np.ascontiguousarray(xp)
            conv3rows_nhwc(xp.reshape(-1), xp.shape, wt, strides, dilations[0], (oh, ow), b, relu, res,
                           out.reshape(-1, o))
            return out.transpose(0, 3, 1, 2)
        row_bytes = oh * ow * kh * kw * c * 4
        step = max(1, min(n, COLS_BYTES // max(row_bytes, 1)))
        buf = np.empty((step * oh * ow, kh * kw * c), np.float32)
        for s in range(0, n, step):
            m = min(step, n - s)
            cols = im2col_nhwc(xp[s:s + m], (kh, kw), strides, dilations, oh, ow, buf[:m * oh * ow])
            rows = slice(s * oh * ow, (s + m) * oh * ow)
            _matmul(cols, wt, b, relu, None if res is None else res[rows], out.reshape(-1, o)[rows])
    return out.transpose(0, 3, 1, 2)
