"""Exact, data-dependent reconstruction of one conv -> BN -> ReLU -> conv pair (verification only).

DF-MPC never looks at data. To check what its data-free c buys, this module computes
on real input activations ``A`` (of layer l) the quantity the paper starts from, the
feature-map loss of layer l+1 (paper Eq. (9)):

    L(c) = sum_t || X~^{l+1}_t - X^{l+1}_t ||^2
    X^{l+1}  = W^{l+1} * ReLU(BN(W^l * A))                    full precision
    X~^{l+1} = W~^{l+1} * ReLU(BN_hat(W_hat^l * A)),  W~^{l+1}_{:,j} = c_j W_hat^{l+1}_{:,j}   Eq. (7)

and the **oracle c**: ``argmin_{c >= 0} L(c)``, a non-negative least-squares problem
because X~^{l+1} is linear in c (``data_free_derivations/09_our_additions.md``).

The small float64 ``conv2d`` here (im2col + one matmul per group) is for these checks;
the inference engine has its own float32 kernels.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.optimize

from ._checks import as_float_array
from .compensation import BatchNorm, _check_bn, _check_c

__all__ = ["conv2d", "pair_forward", "feature_map_loss", "oracle_coefficients"]


def _pair(v, name):
    t = (v, v) if np.isscalar(v) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in t):
        raise ValueError(f"{name}: expected a non-negative int or a pair of them, got {v!r}")
    return int(t[0]), int(t[1])


def conv2d(x, W, stride=1, padding=0, groups=1):
    """2-D cross-correlation ``y[n, o] = sum_{i, u, v} W[o, i, u, v] x_pad[n, i, s h + u, s w + v]``.

    Zero padding, no dilation; float64 im2col + matmul, one per group.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
    W : array_like, shape (O, C // groups, kh, kw)
    stride, padding : int or (int, int)
    groups : int, divides C and O

    Returns
    -------
    ndarray, shape (N, O, H', W'), float64
        ``H' = (H + 2 ph - kh) // sh + 1`` and likewise for the width.

    Raises
    ------
    ValueError
        Shapes that do not fit, non-finite values, a kernel larger than the padded input.

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
    """
    x = as_float_array(x, "x", ndim=4).astype(np.float64, copy=False)
    W = as_float_array(W, "W", ndim=4).astype(np.float64, copy=False)
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding")
    if sh == 0 or sw == 0:
        raise ValueError(f"stride: expected >= 1, got {stride!r}")
    N, C, H, Wd = x.shape
    O, Cg, kh, kw = W.shape
    if groups < 1 or C % groups or O % groups or Cg != C // groups:
        raise ValueError(f"W: shape {W.shape} does not fit input channels {C} with groups={groups}")
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (Wd + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"W: kernel {kh}x{kw} larger than the padded input {H + 2 * ph}x{Wd + 2 * pw}")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    # im2col: cols[n, c, u, v, h, w] = xp[n, c, sh*h + u, sw*w + v]
    cols = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :Ho, :Wo]
    cols = cols.transpose(0, 2, 3, 1, 4, 5)                      # (N, Ho, Wo, C, kh, kw)
    Og = O // groups
    out = np.empty((N, Ho, Wo, O))
    for g in range(groups):
        patch = cols[:, :, :, g * Cg:(g + 1) * Cg].reshape(N * Ho * Wo, Cg * kh * kw)
        out[..., g * Og:(g + 1) * Og] = (patch @ W[g * Og:(g + 1) * Og].reshape(Og, -1).T).reshape(N, Ho, Wo, Og)
    return out.transpose(0, 3, 1, 2)


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
