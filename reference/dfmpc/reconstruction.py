"""Exact, data-dependent reconstruction of one conv -> BN -> ReLU -> conv pair (verification only).

DF-MPC never looks at data. To check what its data-free c buys, this module computes
on real input activations ``A`` (of layer l) the quantity the paper starts from, the
feature-map loss of layer l+1 (paper Eq. (9)):

    L(c) = sum_t || X~^{l+1}_t - X^{l+1}_t ||^2
    X^{l+1}  = W^{l+1} * ReLU(BN(W^l * A))                    full precision
    X~^{l+1} = W~^{l+1} * ReLU(BN_hat(W_hat^l * A)),  W~^{l+1}_{:,j} = c_j W_hat^{l+1}_{:,j}   Eq. (7)

and the **oracle c**: ``argmin_{c >= 0} L(c)``, a non-negative least-squares problem
because X~^{l+1} is linear in c (``data_free_derivations/09_our_additions.md``).

:func:`conv2d` here is the project's one float64 reference convolution (the definition as one
``np.einsum``); these checks use it, and the engine's float32 convolution
(:func:`dfmpc.engine.conv2d_f32`) is tested against it.
"""

from __future__ import annotations

import numpy as np
import scipy  # scipy.linalg, scipy.optimize load on first use (SciPy's lazy submodules): a light `import dfmpc`

from ._checks import as_float_array
from .compensation import BatchNorm, _check_bn, _check_c

__all__ = ["conv2d", "pair_forward", "feature_map_loss", "oracle_coefficients"]


def _ints(v, n, minimum):
    """``v`` (an int, or a tuple of ``n`` ints) as a tuple of ``n`` ints >= ``minimum``; None if it is not one."""
    t = (v,) * n if isinstance(v, (int, np.integer)) else tuple(v) if isinstance(v, (tuple, list)) else None
    if t is None or len(t) != n or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                           and i >= minimum for i in t):
        return None
    return tuple(int(i) for i in t)


def _geometry(stride, padding, dilation):
    """Check the conv geometry; returns ``(sh, sw), (top, left, bottom, right), (dh, dw)``."""
    s = _ints(stride, 2, 1)
    if s is None:
        raise ValueError(f"stride: expected a positive int or a pair of them, got {stride!r}")
    d = _ints(dilation, 2, 1)
    if d is None:
        raise ValueError(f"dilation: expected a positive int or a pair of them, got {dilation!r}")
    p = _ints(padding, 4, 0) if isinstance(padding, (tuple, list)) and len(padding) == 4 else None
    if p is None:
        ph_pw = _ints(padding, 2, 0)
        if ph_pw is None:
            raise ValueError("padding: expected a non-negative int, a pair (ph, pw) or an ONNX 4-tuple "
                             f"(top, left, bottom, right), got {padding!r}")
        p = ph_pw + ph_pw
    return s, p, d


def conv2d(x, W, stride=1, padding=0, groups=1, *, dilation=1, bias=None):
    """Float64 reference 2-D convolution (cross-correlation, as in ONNX and PyTorch).

    ``y[n, o, h, w] = b[o] + sum_{c, u, v} W[o, c, u, v] x_pad[n, g(o) Cg + c, sh h + dh u, sw w + dw v]``
    with ``Cg = C // groups``, ``g(o) = o // (O // groups)`` and ``x_pad`` the zero-padded input,
    written as a single ``np.einsum`` over strided windows of ``x_pad``.

    The project's one float64 convolution: the feature-map loss and the oracle of this module
    use it, and the engine's float32 convolution :func:`dfmpc.engine.conv2d_f32` (with its
    Numba kernels) is tested against it.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
        Input; converted to float64.
    W : array_like, shape (O, C // groups, kh, kw)
        Filters; converted to float64.
    stride : int or (int, int), >= 1
        ``(sh, sw)``.
    padding : int, (int, int) or (int, int, int, int), >= 0
        Zero padding: ``p`` on every side, ``(ph, pw)`` on top/bottom and left/right, or
        ``(top, left, bottom, right)`` in ONNX order.
    groups : int, >= 1
        Divides C and O; group g maps input channels ``g Cg .. (g+1) Cg - 1`` to outputs
        ``g O/groups .. (g+1) O/groups - 1``.
    dilation : int or (int, int), >= 1
        ``(dh, dw)``: spacing between kernel taps.
    bias : array_like, shape (O,), optional
        Added to every output position of channel o.

    Returns
    -------
    ndarray, shape (N, O, H', W'), float64
        ``H' = (H + top + bottom - dh (kh - 1) - 1) // sh + 1`` and likewise for the width.

    Raises
    ------
    ValueError
        Arrays of the wrong ndim or shape, non-finite values, channels that do not fit ``groups``,
        bad stride/padding/dilation, or a (dilated) kernel larger than the padded input.

    Examples
    --------
    One output value is the inner product of the kernel with one input patch:

    >>> rng = np.random.default_rng(0)
    >>> x, W = rng.normal(size=(1, 2, 5, 5)), rng.normal(size=(3, 2, 3, 3))
    >>> y = conv2d(x, W, stride=2, padding=1)
    >>> y.shape
    (1, 3, 3, 3)
    >>> xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    >>> bool(np.isclose(y[0, 2, 1, 1], np.sum(W[2] * xp[0, :, 2:5, 2:5])))
    True

    With dilation 2 the taps of a 3x3 kernel are two pixels apart:

    >>> y = conv2d(x, W, dilation=2)
    >>> y.shape
    (1, 3, 1, 1)
    >>> bool(np.isclose(y[0, 0, 0, 0], np.sum(W[0] * x[0, :, ::2, ::2])))
    True
    """
    x = as_float_array(x, "x", ndim=4, layout="an NCHW batch (4-D)").astype(np.float64, copy=False)
    W = as_float_array(W, "W", ndim=4, layout="OIHW conv weights (4-D)").astype(np.float64, copy=False)
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = _geometry(stride, padding, dilation)
    N, C, H, Wd = x.shape
    O, Cg, kh, kw = W.shape
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    if C % groups or O % groups or Cg != C // groups:
        raise ValueError(f"W: shape {W.shape} does not fit input channels {C} with groups={groups}")
    if bias is not None:
        bias = as_float_array(bias, "bias", ndim=1).astype(np.float64, copy=False)
        if bias.shape != (O,):
            raise ValueError(f"bias: expected shape ({O},), got {bias.shape}")
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1            # extent of the dilated kernel
    Ho, Wo = (H + pt + pb - span_h) // sh + 1, (Wd + pl + pr - span_w) // sw + 1
    if H + pt + pb < span_h or Wd + pl + pr < span_w:
        raise ValueError(f"W: kernel {kh}x{kw} larger than the padded input {H + pt + pb}x{Wd + pl + pr} "
                         f"(dilation {dh}x{dw})")
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    # win[n, c, h, w, u, v] = xp[n, c, sh h + dh u, sw w + dw v]   (a strided view, nothing copied)
    win = np.lib.stride_tricks.sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    win = win[:, :, :sh * (Ho - 1) + 1:sh, :sw * (Wo - 1) + 1:sw, ::dh, ::dw]
    win = win.reshape(N, groups, Cg, Ho, Wo, kh, kw)
    y = np.einsum("ngchwuv,gocuv->ngohw", win, W.reshape(groups, O // groups, Cg, kh, kw), optimize=True)
    y = y.reshape(N, O, Ho, Wo)
    return y if bias is None else y + bias[:, None, None]


def _activation(A, W, bn, stride, padding):
    """ReLU(BN(W * A)), shape (N, C, H', W')."""
    return np.maximum(bn(conv2d(A, W, stride, padding)), 0.0)


def pair_forward(A, W, bn, W_next, c=None, *, stride=1, padding=0, stride_next=1, padding_next=0):
    """Output of layer l+1 of the pair: ``X^{l+1} = W^{l+1} * (c . ReLU(BN(W^l * A)))``.

    Parameters
    ----------
    A : array_like, shape (N, I, H, W)
        Input activations of layer l (``A^{l-1}``).
    W : array_like, shape (C, I, kh, kw)
        Weights of layer l (full precision or quantized).
    bn : BatchNorm with C channels
    W_next : array_like, shape (O, C, kh', kw')
        Weights of layer l+1.
    c : array_like, shape (C,), >= 0, optional
        Per-channel compensation (Eq. (7)); None means c = 1.
    stride, padding, stride_next, padding_next : int or pair
        Conv settings of layer l and layer l+1.

    Returns
    -------
    ndarray, shape (N, O, H'', W''), float64
    """
    bn = _check_bn(bn, "bn")
    W_next = as_float_array(W_next, "W_next", ndim=4)
    Z = _activation(A, W, bn, stride, padding)
    if W_next.shape[1] != Z.shape[1]:
        raise ValueError(f"W_next: expected {Z.shape[1]} input channels (layer l has {Z.shape[1]} outputs), "
                         f"got shape {W_next.shape}")
    if c is not None:
        Z = Z * _check_c(c, Z.shape[1])[None, :, None, None]
    return conv2d(Z, W_next, stride_next, padding_next)


def _batches(A, batch_size):
    A = as_float_array(A, "A", ndim=4)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    for i in range(0, A.shape[0], batch_size):
        yield A[i:i + batch_size]


def feature_map_loss(A, W, bn, W_next, W_hat, bn_hat, W_next_hat, c=None, *, stride=1, padding=0,
                     stride_next=1, padding_next=0, batch_size=64):
    """True feature-map loss of layer l+1, ``sum_t ||X~^{l+1}_t - X^{l+1}_t||^2`` (paper Eq. (9)).

    Parameters
    ----------
    A : array_like, shape (N, I, H, W)
        Real input activations of layer l.
    W, bn, W_next :
        The full-precision pair: (C, I, kh, kw), BatchNorm(C), (O, C, kh', kw').
    W_hat, bn_hat, W_next_hat :
        The quantized pair (W_hat in the form matching bn_hat), same shapes.
    c : array_like, shape (C,), >= 0, optional
        Compensation; None means c = 1 (no compensation).
    batch_size : int
        Samples per chunk (bounds memory).

    Returns
    -------
    float
        The summed squared error over samples, channels and positions.
    """
    total = 0.0
    kw = dict(stride=stride, padding=padding, stride_next=stride_next, padding_next=padding_next)
    for A_b in _batches(A, batch_size):
        X = pair_forward(A_b, W, bn, W_next, **kw)
        X_tilde = pair_forward(A_b, W_hat, bn_hat, W_next_hat, c, **kw)
        total += float(np.sum((X_tilde - X) ** 2))                   # Eq. (9)
    return total


def oracle_coefficients(A, W, bn, W_next, W_hat, bn_hat, W_next_hat, *, stride=1, padding=0,
                        stride_next=1, padding_next=0, batch_size=64):
    """Oracle compensation ``c* = argmin_{c >= 0} sum_t ||X~^{l+1}_t(c) - X^{l+1}_t||^2``.

    ``X~^{l+1}(c) = sum_j c_j M_j`` with ``M_j = W_hat^{l+1}_{:, j} * Zhat_j`` (the contribution
    of input channel j), so the loss is ``||M c - x||^2``: non-negative least squares. It is
    solved from the Gram matrix ``G = M^T M`` and ``b = M^T x`` (accumulated over batches, so
    memory does not grow with N): with ``G = R^T R`` (R from the eigen-decomposition, valid
    for singular G) and ``R^T d = b``, ``||R c - d||^2`` equals the loss up to a constant,
    and ``scipy.optimize.nnls(R, d)`` gives c*.

    Parameters
    ----------
    Same as :func:`feature_map_loss` (without c).

    Returns
    -------
    c : ndarray, shape (C,), float64, >= 0
        Data-dependent, not data-free: an upper reference for what any c can achieve.
    """
    kw = dict(stride=stride, padding=padding)
    W_next_hat = as_float_array(W_next_hat, "W_next_hat", ndim=4)
    C = W_next_hat.shape[1]
    G = np.zeros((C, C))
    b = np.zeros(C)
    for A_b in _batches(A, batch_size):
        x = pair_forward(A_b, W, bn, W_next, **kw, stride_next=stride_next, padding_next=padding_next)
        Z_hat = _activation(A_b, W_hat, _check_bn(bn_hat, "bn_hat"), **kw)
        if Z_hat.shape[1] != C:
            raise ValueError(f"W_next_hat: expected {Z_hat.shape[1]} input channels, got shape {W_next_hat.shape}")
        M = np.stack([conv2d(Z_hat[:, j:j + 1], W_next_hat[:, j:j + 1], stride_next, padding_next).ravel()
                      for j in range(C)], axis=1)                      # (N O H W, C)
        G += M.T @ M
        b += M.T @ x.ravel()
    e, V = scipy.linalg.eigh(G)
    tol = max(e.max(), 0.0) * C * np.finfo(float).eps
    keep = e > tol
    if not keep.any():                                                 # every M_j == 0: any c is optimal
        return np.ones(C)
    R = np.sqrt(e[keep])[:, None] * V[:, keep].T                       # R^T R = G on its range
    d = (V[:, keep].T @ b) / np.sqrt(e[keep])                          # R^T d = b (b lies in range(G))
    c, _ = scipy.optimize.nnls(R, d)                                  # A3
    return c
