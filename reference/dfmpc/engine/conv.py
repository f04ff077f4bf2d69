"""2-D convolution, NCHW x OIHW, with ONNX geometry (asymmetric pads, dilation, groups).

Dense convs (``groups == 1``) are im2col (Numba) + one float32 BLAS matmul;
grouped and depthwise convs use a direct Numba loop, where im2col would
mostly copy zeros.  The plain-loop twin is
:func:`dfmpc.engine.reference_kernels.conv2d_loops`.
"""

from __future__ import annotations

import numpy as np

from .kernels_numba import conv_grouped, im2col


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


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
           strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups: int = 1) -> np.ndarray:
    """Convolve a batch with a filter bank (cross-correlation, as in ONNX and PyTorch).

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

    Returns
    -------
    ndarray, shape (N, O, oh, ow), float32
        May be a non-contiguous view (memory laid out as (O, N, oh, ow)).

    Raises
    ------
    ValueError
        Channel counts inconsistent with ``groups``, or an empty output.

    Example
    -------
    >>> y = conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 3, 3), np.float32), pads=(1, 1, 1, 1))
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
        cols = im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow)
        out = w.reshape(o, -1) @ cols                       # (O, N*oh*ow): one BLAS sgemm
        if b is not None:
            out += b[:, None]
        return out.reshape(o, n, oh, ow).transpose(1, 0, 2, 3)
    out = conv_grouped(x, np.ascontiguousarray(w), groups, sh, sw, pt, pl, dh, dw, oh, ow)
    if b is not None:
        out += b[None, :, None, None]
    return out
