"""Numba kernel: a direct loop for grouped / depthwise convs.

(Dense convs use a NumPy strided-copy im2col + BLAS, :mod:`dfmpc.engine.conv`.)
It takes an NCHW float32 batch (any strides) and the conv geometry in ONNX
terms: ``pads = (top, left, bottom, right)`` (only top/left are needed here,
the output size ``oh, ow`` already accounts for bottom/right).
Its plain-loop twin lives in :mod:`dfmpc.engine.reference_kernels`.
"""

import os

import numba
import numpy as np
from numba import njit, prange

# OpenMP worker threads spin-wait after each parallel region and steal the cores the
# BLAS threads of the following matmul need (measured: several-fold slowdowns of
# grouped conv + sgemm on 2 cores).  Numba's own "workqueue" pool sleeps instead.  A layer
# chosen by the user (NUMBA_THREADING_LAYER) is respected.
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"


@njit(parallel=True, cache=True, fastmath=False)
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
    """
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
