"""The op set: one function per op type, ``f(node, *inputs) -> output``.

Every function reads its attributes from ``node.attrs`` and its weights from
``node.params`` (see :mod:`dfmpc.engine.graph` for the names) and receives
the activation arrays named by ``node.inputs``.  :data:`OPS` maps op type to
function; :data:`SUPPORTED_OPS` is its key set.  Activations are float32,
NCHW (or (N, features) after Flatten).
"""

from __future__ import annotations

import numpy as np

from .conv import conv2d_f32, conv_output_size
from .pooling import avg_pool2d, global_avg_pool, max_pool2d


def _same_pads(x_hw, kernel, strides, dilations, mode):
    """Pads ``(top, left, bottom, right)`` for ONNX auto_pad SAME_UPPER / SAME_LOWER."""
    pads_begin, pads_end = [], []
    for size, k, s, d in zip(x_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, big = total // 2, total - total // 2
        pads_begin.append(small if mode == "SAME_UPPER" else big)
        pads_end.append(big if mode == "SAME_UPPER" else small)
    return (pads_begin[0], pads_begin[1], pads_end[0], pads_end[1])


def _geometry(node, x, kernel):
    a = node.attrs
    strides = tuple(a.get("strides", (1, 1)))
    dilations = tuple(a.get("dilations", (1, 1)))
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x.shape[2:], kernel, strides, dilations, mode)
    else:                                   # NOTSET or VALID (VALID has no pads attribute)
        pads = tuple(a.get("pads", (0, 0, 0, 0)))
    return strides, pads, dilations


def _check_rank(node, x, rank):
    if x.ndim != rank:
        raise ValueError(f"expects a rank-{rank} input, got shape {x.shape}")


def conv(node, x):
    """Conv: x (N, C, H, W) -> (N, O, oh, ow) with params W (O, C/g, kh, kw), B (O,)."""
    _check_rank(node, x, 4)
    w = node.params["W"]
    strides, pads, dilations = _geometry(node, x, w.shape[2:])
    return conv2d_f32(x, w, node.params.get("B"), strides, pads, dilations, node.attrs.get("group", 1))


def batch_norm(node, x):
    """BatchNormalization (inference): gamma (x - mean) / sqrt(var + eps) + beta, per channel axis 1."""
    p = node.params
    if x.ndim < 2 or x.shape[1] != p["gamma"].shape[0]:
        raise ValueError(f"input shape {x.shape} does not have {p['gamma'].shape[0]} channels on axis 1")
    scale = p["gamma"] / np.sqrt(p["var"] + np.float32(node.attrs.get("epsilon", 1e-5)))
    shift = p["beta"] - p["mean"] * scale
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    return (x * scale.reshape(bshape) + shift.reshape(bshape)).astype(np.float32, copy=False)


def relu(node, x):
    """Relu: max(x, 0)."""
    return np.maximum(x, np.float32(0))


def leaky_relu(node, x):
    """LeakyRelu: x where x >= 0, ``alpha * x`` elsewhere (ONNX; ``alpha`` default 0.01)."""
    alpha = np.float32(node.attrs.get("alpha", 0.01))
    return np.where(x >= 0, x, alpha * x).astype(np.float32, copy=False)


def clip(node, x):
    """Clip: min(max(x, min), max); ``min``/``max`` attrs may be None (unbounded). ReLU6 is Clip(0, 6)."""
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    return np.clip(x, None if lo is None else np.float32(lo), None if hi is None else np.float32(hi))


def _elementwise(node, xs, ufunc):
    out = xs[0] if len(xs) > 1 or "constant" in node.params else xs[0].copy()   # always a new array
    for y in xs[1:]:
        out = ufunc(out, y)
    if "constant" in node.params:
        out = ufunc(out, node.params["constant"])
    return out


def add(node, *xs):
    """Add / Sum: elementwise sum of the inputs (numpy broadcasting) plus an optional ``constant``."""
    return _elementwise(node, xs, np.add)


def mul(node, *xs):
    """Mul: elementwise product of the inputs and an optional ``constant``."""
    return _elementwise(node, xs, np.multiply)


def concat(node, *xs):
    """Concat along ``axis``."""
    return np.concatenate(xs, axis=node.attrs["axis"])


def max_pool(node, x):
    """MaxPool: attrs kernel_shape, strides, pads, dilations, ceil_mode, auto_pad."""
    _check_rank(node, x, 4)
    kernel = tuple(node.attrs["kernel_shape"])
    strides, pads, dilations = _geometry(node, x, kernel)
    return max_pool2d(x, kernel, strides, pads, dilations, bool(node.attrs.get("ceil_mode", 0)))


def average_pool(node, x):
    """AveragePool: attrs kernel_shape, strides, pads, ceil_mode, count_include_pad, auto_pad."""
    _check_rank(node, x, 4)
    kernel = tuple(node.attrs["kernel_shape"])
    strides, pads, _ = _geometry(node, x, kernel)
    return avg_pool2d(x, kernel, strides, pads, bool(node.attrs.get("ceil_mode", 0)),
                      bool(node.attrs.get("count_include_pad", 0)))


def global_average_pool(node, x):
    """GlobalAveragePool: (N, C, H, W) -> (N, C, 1, 1)."""
    _check_rank(node, x, 4)
    return global_avg_pool(x)


def flatten(node, x):
    """Flatten: (d0, ..., dk-1, dk, ...) -> (d0*...*dk-1, dk*...) with k = ``axis`` (default 1)."""
    axis = node.attrs.get("axis", 1) % max(x.ndim, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def gemm(node, x):
    """Gemm / MatMul: x (N, in) @ W.T + B with W (out, in), B (out,)."""
    w = node.params["W"]
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"input shape {x.shape} does not match weight {w.shape} (expected (N, {w.shape[1]}))")
    y = x @ w.T
    if "B" in node.params:
        y += node.params["B"]
    return y


def softmax(node, x):
    """Softmax jointly over all axes from ``axis`` (default -1) on, max-subtracted.

    This is ONNX opset-11 semantics ("coerce to 2-D at axis"); for the last
    axis it equals the opset-13 definition.
    """
    axis = tuple(range(node.attrs.get("axis", -1) % x.ndim, x.ndim))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def identity(node, x):
    """Identity and Dropout (inference): return the input."""
    return x


OPS = {
    "Conv": conv,
    "BatchNormalization": batch_norm,
    "Relu": relu,
    "LeakyRelu": leaky_relu,
    "Clip": clip,
    "Add": add,
    "Mul": mul,
    "Concat": concat,
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
    "Flatten": flatten,
    "Gemm": gemm,
    "Softmax": softmax,
    "Identity": identity,
    "Dropout": identity,
}
SUPPORTED_OPS = frozenset(OPS)
