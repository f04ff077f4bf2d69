"""Max and average pooling over NCHW batches, vectorised with strided window views.

ONNX geometry: ``pads = (top, left, bottom, right)``, dilations, ``ceil_mode``;
average pooling divides by the number of input pixels in the window
(``count_include_pad=False``, the ONNX default) or by the number of input +
explicit-padding pixels (``count_include_pad=True``).  Plain-loop twins:
:mod:`dfmpc.engine.reference_kernels`.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .conv import conv_output_size


def _windows(x: np.ndarray, kernel, strides, pads, dilations, ceil_mode: bool, fill: float):
    """Return windows of shape (N, C, oh, ow, kh, kw) over ``x`` padded with ``fill``."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = kernel, strides, pads, dilations
    oh = conv_output_size(h, kh, sh, pt, pb, dh, ceil_mode)
    ow = conv_output_size(w, kw, sw, pl, pr, dw, ceil_mode)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {h}x{w} is too small for pooling kernel {kh}x{kw} with pads {pads}")
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1           # dilated window extent
    hp = max(h + pt + pb, (oh - 1) * sh + eh)               # ceil_mode may need extra rows
    wp = max(w + pl + pr, (ow - 1) * sw + ew)
    xp = np.full((n, c, hp, wp), fill, dtype=x.dtype)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    win = sliding_window_view(xp, (eh, ew), axis=(2, 3))
    return win[:, :, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, ::dh, ::dw], (hp, wp)


def max_pool2d(x: np.ndarray, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
               ceil_mode: bool = False) -> np.ndarray:
    """Max pooling.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32
    kernel, strides, dilations : (int, int)
    pads : (int, int, int, int)
        ``(top, left, bottom, right)``; padding never wins the max.
    ceil_mode : bool

    Returns
    -------
    ndarray, shape (N, C, oh, ow), float32

    Example
    -------
    >>> max_pool2d(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4), (2, 2), (2, 2))[0, 0]
    array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """
    win, _ = _windows(x, kernel, strides, pads, dilations, ceil_mode, -np.inf)
    return win.max(axis=(4, 5))


def avg_pool2d(x: np.ndarray, kernel, strides=(1, 1), pads=(0, 0, 0, 0), ceil_mode: bool = False,
               count_include_pad: bool = False) -> np.ndarray:
    """Average pooling.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32
    kernel, strides : (int, int)
    pads : (int, int, int, int)
        ``(top, left, bottom, right)``.
    ceil_mode : bool
    count_include_pad : bool
        Count explicit padding pixels in the divisor (never the extra ceil-mode ones).

    Returns
    -------
    ndarray, shape (N, C, oh, ow), float32
    """
    n, c, h, w = x.shape
    win, (hp, wp) = _windows(x, kernel, strides, pads, (1, 1), ceil_mode, 0.0)
    pt, pl, pb, pr = pads
    mask = np.zeros((1, 1, hp, wp), dtype=np.float32)
    if count_include_pad:
        mask[:, :, :h + pt + pb, :w + pl + pr] = 1.0
    else:
        mask[:, :, pt:pt + h, pl:pl + w] = 1.0
    count, _ = _windows(mask, kernel, strides, (0, 0, 0, 0), (1, 1), False, 0.0)
    total = win.sum(axis=(4, 5), dtype=np.float32)
    count = count.sum(axis=(4, 5))[:, :, :total.shape[2], :total.shape[3]]
    return total / count


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1)."""
    return x.mean(axis=(2, 3), keepdims=True, dtype=np.float32)
