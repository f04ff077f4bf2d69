"""dfmpc.autodiff: every vector-Jacobian product against central finite differences (float64), the fast
kernels against their plain-loop twins, and whole-graph input gradients against PyTorch autograd.

Finite-difference check (used throughout): for f(x) = <op(x), R> with a random R, the VJP gives
g = J^T R = grad f; for random directions v, <g, v> must equal (f(x + h v) - f(x - h v)) / (2h).
In float64 with h = 1e-5 the central difference is exact for the piecewise-linear ops (away from
kinks) and off by O(h^2) otherwise, so the tolerance is 1e-6 relative to sum |g| |v|. Inputs of
ReLU / Clip / MaxPool are kept >= 1e-2 away from kinks and ties, so no difference straddles one.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfmpc import autodiff as ad
from dfmpc.engine import Graph, Node
from dfmpc.engine.conv import conv_output_size
from dfmpc.engine.ops import OPS
from dfmpc.engine.reference_kernels import avg_pool2d_loops, max_pool2d_loops
from dfmpc.reconstruction import conv2d as reference_conv2d

H_FD = 1e-5
RTOL = 1e-6


def fd_mismatch(f, x, g, rng, directions=3):
    """max over random directions v of |<g, v> - central difference| / (sum |g||v| + 1e-12)."""
    worst = 0.0
    for _ in range(directions):
        v = rng.standard_normal(x.shape)
        fd = (f(x + H_FD * v) - f(x - H_FD * v)) / (2 * H_FD)
        worst = max(worst, abs(float(np.sum(g * v)) - fd) / (float(np.sum(np.abs(g * v))) + 1e-12))
    return worst


def node_check(node, xs, rng, which=0, vjp=None):
    """FD mismatch of the VJP of ``node`` w.r.t. input ``which`` (float64), for f = <y, R>."""
    rule = ad.RULES[node.op]
    y, ctx = rule.forward(node, *xs)
    R = rng.standard_normal(y.shape)
    g = (vjp or rule.vjp)(node, ctx, R)[which]
    assert g.shape == xs[which].shape

    def f(z):
        args = list(xs)
        args[which] = z
        return float(np.sum(rule.forward(node, *args)[0] * R))
    return fd_mismatch(f, xs[which], g, rng)


def away_from_zero(rng, shape, gap=1e-2):
    """Normal entries pushed at least ``gap`` away from 0 (no ReLU kink within the FD step)."""
    x = rng.standard_normal(shape)
    return np.sign(x) * (np.abs(x) + gap)


def distinct_values(rng, shape, gap=1e-2):
    """All entries distinct by >= ``gap`` (no max-pool tie within the FD step), shuffled."""
    return (rng.permutation(int(np.prod(shape))) * gap - 0.5 * gap * np.prod(shape)).reshape(shape) \
        + rng.uniform(0, gap / 10)


def f64_params(**arrays):
    return {k: np.asarray(v, np.float64) for k, v in arrays.items()}


# ------------------------------------------------------------------------ geometries

@st.composite
def conv_cases(draw):
    """(x shape, W shape, strides, pads, dilations, groups, seed) with a non-empty output."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups > 1
    cg = 1 if depthwise else draw(st.integers(1, 3))
    og = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - pads[0] - pads[2]), 7))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - pads[1] - pads[3]), 7))
    n = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    return (n, cg * groups, h, w), (og * groups, cg, kh, kw), (sh, sw), pads, (dh, dw), groups, seed


@st.composite
def pool_cases(draw, dilation=True):
    """(x shape, kernel, strides, pads, dilations, ceil_mode, seed); pads < kernel (ONNX requires it)."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if dilation else (1, 1)
    pads = (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)),
            draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)))
    h = draw(st.integers(dh * (kh - 1) + 1, 7))
    w = draw(st.integers(dw * (kw - 1) + 1, 7))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w)
    return shape, (kh, kw), (sh, sw), pads, (dh, dw), draw(st.booleans()), draw(st.integers(0, 2**32 - 1))


def conv_node(W, strides, pads, dilations, groups, B=None):
    params = {"W": W} if B is None else {"W": W, "B": B}
    return Node("conv", "Conv", ["x"], ["y"], {"strides": strides, "pads": pads, "dilations": dilations,
                                                  "group": groups}, params)


# ------------------------------------------------------------------------ V.1 Conv

@settings(max_examples=50)
@given(conv_cases())
def test_conv_vjp_matches_finite_differences(case):
    """V.1: the conv VJP (col2im, float64) is J^T gy: agrees with central differences, any geometry."""
    x_shape, w_shape, strides, pads, dilations, groups, seed = case
    rng = np.random.default_rng(seed)
    x, W, B = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    assert node_check(conv_node(W, strides, pads, dilations, groups, B), [x], rng) < RTOL


def test_conv_vjp_negative_control():
    """V.1 negative control: the same check fails for a VJP with the kernel not flipped (a plain conv of gy)."""
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    node = conv_node(W, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert node_check(node, [x], rng) < RTOL

    def wrong(node, ctx, gy):
        Wt = np.ascontiguousarray(node.params["W"].transpose(1, 0, 2, 3))      # channels swapped, not flipped
        return (ad.conv_forward(gy, Wt, None, (1, 1), (1, 1, 1, 1), (1, 1), 1),)
    assert node_check(node, [x], rng, vjp=wrong) > 1e-3


@settings(max_examples=40)
@given(conv_cases())
def test_conv_vjp_fast_paths_match_the_loop_twin(case):
    """V.1, V.1': col2im (float64) and the transposed engine convs (float32, one per stride phase, any pads) both
    equal the plain-loop VJP."""
    x_shape, w_shape, strides, pads, dilations, groups, seed = case
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(w_shape)
    oh = conv_output_size(x_shape[2], w_shape[2], strides[0], pads[0], pads[2], dilations[0])
    ow = conv_output_size(x_shape[3], w_shape[3], strides[1], pads[1], pads[3], dilations[1])
    gy = rng.standard_normal((x_shape[0], w_shape[0], oh, ow))
    ref = ad.conv_vjp_loops(gy, W, x_shape, strides, pads, dilations, groups)
    np.testing.assert_allclose(ad.conv_vjp(gy, W, x_shape, strides, pads, dilations, groups, method="col2im"),
                               ref, rtol=1e-10, atol=1e-10)
    fast = ad.conv_vjp(gy.astype(np.float32), W.astype(np.float32), x_shape, strides, pads, dilations, groups,
                       method="transposed")
    assert fast.dtype == np.float32 and fast.shape == x_shape
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-4 * (1 + np.abs(ref).max()))


@settings(max_examples=40)
@given(conv_cases())
def test_conv_forward_matches_the_loop_twin_and_the_engine(case):
    """V.1's forward: the im2col conv (float64) equals the reference dfmpc.conv2d; in float32 it equals the engine's Conv op."""
    x_shape, w_shape, strides, pads, dilations, groups, seed = case
    rng = np.random.default_rng(seed)
    x, W, B = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    y = ad.conv_forward(x, W, B, strides, pads, dilations, groups, method="im2col")
    np.testing.assert_allclose(y, reference_conv2d(x, W, strides, pads, groups, dilation=dilations, bias=B),
                               rtol=1e-10, atol=1e-10)
    node = conv_node(W.astype(np.float32), strides, pads, dilations, groups, B.astype(np.float32))
    y32 = ad.conv_forward(x.astype(np.float32), W.astype(np.float32), B.astype(np.float32), strides, pads,
                          dilations, groups, method="im2col")
    np.testing.assert_allclose(y32, OPS["Conv"](node, x.astype(np.float32)), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ V.2-V.4 BN, Relu, Clip

@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.sampled_from([2, 4]))
def test_bn_relu_clip_vjps_match_finite_differences(seed, C, ndim):
    """V.2 (BN, eval mode: affine per channel), V.3 (Relu), V.4 (Clip), V.13 (LeakyRelu) against central differences."""
    rng = np.random.default_rng(seed)
    shape = (2, C) + (3, 4)[:ndim - 2]
    bn = Node("bn", "BatchNormalization", ["x"], ["y"], {"epsilon": 1e-3},
              f64_params(gamma=rng.normal(size=C), beta=rng.normal(size=C), mean=rng.normal(size=C),
                         var=rng.uniform(0.1, 2, C)))
    assert node_check(bn, [rng.standard_normal(shape)], rng) < RTOL
    assert node_check(Node("r", "Relu", ["x"], ["y"]), [away_from_zero(rng, shape)], rng) < RTOL
    lo, hi = sorted(rng.uniform(-1, 1, 2))
    hi += 0.1
    x = away_from_zero(rng, shape)
    x = np.where(np.abs(x - lo) < 1e-2, x + 2e-2, x)
    x = np.where(np.abs(x - hi) < 1e-2, x + 2e-2, x)
    for attrs in ({"min": lo, "max": hi}, {"min": lo}, {"max": hi}, {"min": 0.0, "max": 6.0}):
        assert node_check(Node("c", "Clip", ["x"], ["y"], attrs), [x * 4], rng) < RTOL
    for alpha in (0.01, 0.2, 1.0):                                          # V.13
        assert node_check(Node("l", "LeakyRelu", ["x"], ["y"], {"alpha": alpha}), [away_from_zero(rng, shape)],
                          rng) < RTOL


def test_leaky_relu_vjp_negative_control():
    """V.13 negative control: ReLU's mask (slope 0 below zero) in place of alpha fails the check."""
    rng = np.random.default_rng(2)
    node = Node("l", "LeakyRelu", ["x"], ["y"], {"alpha": 0.2})
    x = away_from_zero(rng, (2, 3, 4, 4))
    assert node_check(node, [x], rng) < RTOL
    assert node_check(node, [x], rng, vjp=lambda node, slope, gy: (gy * (slope == 1),)) > 1e-3


def test_relu_vjp_negative_control():
    """V.3 negative control: passing gy through unmasked (identity instead of ReLU) fails the check."""
    rng = np.random.default_rng(1)
    node = Node("r", "Relu", ["x"], ["y"])
    x = away_from_zero(rng, (2, 3, 4, 4))
    assert node_check(node, [x], rng) < RTOL
    assert node_check(node, [x], rng, vjp=lambda node, ctx, gy: (gy,)) > 1e-3


# ------------------------------------------------------------------------ V.5-V.7 pooling

@settings(max_examples=50)
@given(pool_cases())
def test_max_pool_vjp_matches_finite_differences_and_loops(case):
    """V.5: max-pool VJP routes gy to each window's maximum: central differences and the loop twin agree."""
    shape, kernel, strides, pads, dilations, ceil, seed = case
    rng = np.random.default_rng(seed)
    x = distinct_values(rng, shape)
    node = Node("mp", "MaxPool", ["x"], ["y"], {"kernel_shape": kernel, "strides": strides, "pads": pads,
                                                  "dilations": dilations, "ceil_mode": int(ceil)})
    assert node_check(node, [x], rng) < RTOL
    y, arg = ad.max_pool_forward(x, kernel, strides, pads, dilations, ceil)
    np.testing.assert_array_equal(y, max_pool2d_loops(x, kernel, strides, pads, dilations, ceil))
    gy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(ad.max_pool_vjp(gy, arg, shape, kernel, strides, pads, dilations, ceil),
                               ad.max_pool_vjp_loops(gy, x, kernel, strides, pads, dilations, ceil), rtol=1e-12, atol=1e-12)


@settings(max_examples=50)
@given(pool_cases(dilation=False), st.booleans())
def test_avg_pool_vjp_matches_finite_differences_and_loops(case, count_include_pad):
    """V.6: average-pool VJP spreads gy / count over each window: central differences and the loop twin agree."""
    shape, kernel, strides, pads, _, ceil, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    node = Node("ap", "AveragePool", ["x"], ["y"], {"kernel_shape": kernel, "strides": strides, "pads": pads,
                                                      "ceil_mode": int(ceil), "count_include_pad": int(count_include_pad)})
    assert node_check(node, [x], rng) < RTOL
    y = ad.avg_pool_forward(x, kernel, strides, pads, ceil, count_include_pad)
    np.testing.assert_allclose(y, avg_pool2d_loops(x, kernel, strides, pads, ceil, count_include_pad), rtol=1e-12)
    gy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(ad.avg_pool_vjp(gy, shape, kernel, strides, pads, ceil, count_include_pad),
                               ad.avg_pool_vjp_loops(gy, shape, kernel, strides, pads, ceil, count_include_pad),
                               rtol=1e-12, atol=1e-12)


def test_pool_vjp_negative_control():
    """V.5 / V.6 negative control: max-pool gradient sent to the window's last element, and average-pool
    gradient without the 1/count, both fail the finite-difference check."""
    rng = np.random.default_rng(2)
    x = distinct_values(rng, (1, 2, 6, 6))
    mp = Node("mp", "MaxPool", ["x"], ["y"], {"kernel_shape": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)})
    assert node_check(mp, [x], rng) < RTOL

    def last(node, ctx, gy):
        arg, *geom = ctx
        return (ad.max_pool_vjp(gy, np.full_like(arg, 8), *geom),)
    assert node_check(mp, [x], rng, vjp=last) > 1e-3
    ap = Node("ap", "AveragePool", ["x"], ["y"], {"kernel_shape": (2, 2), "strides": (2, 2)})
    assert node_check(ap, [x], rng) < RTOL
    assert node_check(ap, [x], rng, vjp=lambda node, ctx, gy: (ad.avg_pool_vjp(gy * 4, *ctx),)) > 1e-3


@given(st.integers(0, 2**32 - 1))
def test_gap_flatten_gemm_identity_vjps_match_finite_differences(seed):
    """V.7 (GlobalAveragePool), V.10 (Flatten), V.11 (Gemm), V.12 (Identity / Dropout) against central differences."""
    rng = np.random.default_rng(seed)
    n, c, h, w = rng.integers(1, 3), rng.integers(1, 4), rng.integers(1, 5), rng.integers(1, 5)
    x = rng.standard_normal((n, c, h, w))
    assert node_check(Node("gap", "GlobalAveragePool", ["x"], ["y"]), [x], rng) < RTOL
    for axis in (1, 2, 3):
        assert node_check(Node("fl", "Flatten", ["x"], ["y"], {"axis": axis}), [x], rng) < RTOL
    W, B = rng.standard_normal((5, c * h * w)), rng.standard_normal(5)
    gemm = Node("fc", "Gemm", ["x"], ["y"], {}, {"W": W, "B": B})
    assert node_check(gemm, [x.reshape(n, -1)], rng) < RTOL
    for op in ("Identity", "Dropout"):
        assert node_check(Node("i", op, ["x"], ["y"]), [x], rng) < RTOL


# ------------------------------------------------------------------------ V.8-V.9 Add, Mul, Concat

@given(st.integers(0, 2**32 - 1), st.sampled_from(["same", "channel", "scalar", "constant"]))
def test_add_mul_concat_vjps_match_finite_differences(seed, bshape):
    """V.8 (Add / Mul with broadcasting: gradients summed back over broadcast axes) and V.9 (Concat)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2, 3, 4, 5))
    other = {"same": (2, 3, 4, 5), "channel": (1, 3, 1, 1), "scalar": (1,), "constant": None}[bshape]
    for op in ("Add", "Mul"):
        if other is None:
            node = Node("e", op, ["a"], ["y"], {}, {"constant": rng.standard_normal((1, 3, 1, 1))})
            assert node_check(node, [a], rng) < RTOL
            continue
        b = rng.standard_normal(other)
        node = Node("e", op, ["a", "b"], ["y"])
        assert node_check(node, [a, b], rng, which=0) < RTOL
        assert node_check(node, [a, b], rng, which=1) < RTOL
    parts = [rng.standard_normal((2, k, 4, 5)) for k in (1, 3, 2)]
    cat = Node("cat", "Concat", ["p", "q", "r"], ["y"], {"axis": 1})
    for which in range(3):
        assert node_check(cat, parts, rng, which=which) < RTOL


def test_unbroadcast_negative_control():
    """V.8 negative control: an Add VJP that does not sum over the broadcast axes fails (wrong shape / value)."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((1, 3, 1, 1))
    node = Node("e", "Add", ["a", "b"], ["y"])
    assert node_check(node, [a, b], rng, which=1) < RTOL
    mean_not_sum = lambda node, ctx, gy: (gy, gy.mean(axis=(0, 2, 3), keepdims=True))
    assert node_check(node, [a, b], rng, which=1, vjp=mean_not_sum) > 1e-3


# ------------------------------------------------------------------------ whole graphs

def small_graph(rng, dtype=np.float64):
    """A graph with every differentiable op on the way: convs (strided, grouped, depthwise), BN, ReLU,
    Clip, MaxPool, AveragePool, Concat, Add, Mul, LeakyRelu, GAP, Flatten, Gemm, Identity."""
    p = lambda *s: rng.standard_normal(s).astype(dtype) * 0.5

    def bn(name, x, c):
        return Node(name, "BatchNormalization", [x], [name], {"epsilon": 1e-5},
                    {"gamma": p(c) + 1, "beta": p(c), "mean": p(c), "var": (np.abs(p(c)) + 0.5).astype(dtype)})
    nodes = [
        Node("c1", "Conv", ["x"], ["c1"], {"pads": (1, 1, 1, 1)}, {"W": p(6, 2, 3, 3), "B": p(6)}),
        bn("b1", "c1", 6), Node("r1", "Relu", ["b1"], ["r1"]),
        Node("dw", "Conv", ["r1"], ["dw"], {"pads": (1, 1, 1, 1), "group": 6, "strides": (2, 2)}, {"W": p(6, 1, 3, 3)}),
        bn("b2", "dw", 6), Node("k2", "Clip", ["b2"], ["k2"], {"min": 0.0, "max": 6.0}),
        Node("mp", "MaxPool", ["r1"], ["mp"], {"kernel_shape": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}),
        Node("ap", "AveragePool", ["r1"], ["ap"], {"kernel_shape": (2, 2), "strides": (2, 2)}),
        Node("cat", "Concat", ["k2", "mp", "ap"], ["cat"], {"axis": 1}),
        Node("g", "Conv", ["cat"], ["g"], {"group": 3}, {"W": p(9, 6, 1, 1)}),
        bn("b3", "g", 9), Node("id", "Identity", ["b3"], ["id"]),
        Node("sc", "Conv", ["cat"], ["sc"], {}, {"W": p(9, 18, 1, 1)}),
        Node("add", "Add", ["id", "sc"], ["add"]), Node("mul", "Mul", ["add"], ["mul"], {}, {"constant": p(1, 9, 1, 1)}),
        Node("r3", "LeakyRelu", ["mul"], ["r3"], {"alpha": 0.1}), Node("gap", "GlobalAveragePool", ["r3"], ["gap"]),
        Node("fl", "Flatten", ["gap"], ["fl"], {"axis": 1}), Node("fc", "Gemm", ["fl"], ["out"], {}, {"W": p(4, 9), "B": p(4)}),
    ]
    return Graph(nodes, ["x"], ["out"], {"x": (2, 8, 8)})


def test_whole_graph_gradient_matches_finite_differences():
    """V.1-V.12 chained (chain rule over the tape, fan-out summed): input gradient of
    f = sum_t <t, R_t> over several tensors of a graph with every op, against central differences."""
    rng = np.random.default_rng(4)
    g = small_graph(rng)
    x = rng.standard_normal((2, 2, 8, 8))
    targets = ["c1", "dw", "g", "out"]
    tape = ad.record(g, x, targets)
    R = {t: rng.standard_normal(tape.values[t].shape) for t in targets}
    gx = ad.input_gradient(tape, R)
    f = lambda z: sum(float(np.sum(ad.record(g, z, targets).values[t] * R[t])) for t in targets)
    assert fd_mismatch(f, x, gx, rng) < RTOL
    np.testing.assert_allclose(tape.values["out"], g.run(x.astype(np.float32)), rtol=1e-4, atol=1e-4)


def test_record_refuses_an_op_without_vjp_naming_it():
    """An op with no VJP on the way to a target raises ValueError naming the op and the node; beyond the
    targets it is not needed and not refused."""
    g = Graph([Node("s", "Softmax", ["x"], ["s"], {"axis": 1}), Node("r", "Relu", ["s"], ["y"]),
               Node("r2", "Relu", ["x"], ["z"])], ["x"], ["y", "z"])
    x = np.ones((1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"Softmax.*'s'"):
        ad.record(g, x, ["y"])
    assert ad.record(g, x, ["z"]).values["z"].shape == x.shape
    with pytest.raises(ValueError, match="targets"):
        ad.record(g, x, ["nope"])
    with pytest.raises(TypeError, match="x"):
        ad.record(g, x.astype(np.int64), ["z"])
    with pytest.raises(ValueError, match="method"):
        ad.conv_vjp(np.ones((1, 1, 2, 2)), np.ones((1, 1, 1, 1)), (1, 1, 2, 2), method="fft")


def _torch_module(graph):
    """A PyTorch function running ``graph`` (the ops of small_graph and the zoo) for autograd."""
    import torch
    import torch.nn.functional as F

    def run(x, targets):
        env = {graph.inputs[0]: x}
        for n in graph.nodes:
            a, p = n.attrs, {k: torch.as_tensor(v) for k, v in n.params.items()}
            xs = [env[t] for t in n.inputs]
            if n.op == "Conv":
                pt, pl, pb, pr = a.get("pads", (0, 0, 0, 0))
                y = F.conv2d(F.pad(xs[0], (pl, pr, pt, pb)), p["W"], p.get("B"), tuple(a.get("strides", (1, 1))),
                             0, tuple(a.get("dilations", (1, 1))), a.get("group", 1))
            elif n.op == "BatchNormalization":
                y = F.batch_norm(xs[0], p["mean"], p["var"], p["gamma"], p["beta"], False, 0.0, a.get("epsilon", 1e-5))
            elif n.op == "Relu":
                y = F.relu(xs[0])
            elif n.op == "Clip":
                y = torch.clamp(xs[0], a.get("min"), a.get("max"))
            elif n.op == "LeakyRelu":
                y = F.leaky_relu(xs[0], a.get("alpha", 0.01))
            elif n.op == "MaxPool":
                pt, pl, pb, pr = a.get("pads", (0, 0, 0, 0))
                y = F.max_pool2d(F.pad(xs[0], (pl, pr, pt, pb), value=-float("inf")), tuple(a["kernel_shape"]),
                                 tuple(a.get("strides", (1, 1))))
            elif n.op == "AveragePool":
                y = F.avg_pool2d(xs[0], tuple(a["kernel_shape"]), tuple(a.get("strides", (1, 1))))
            elif n.op == "Concat":
                y = torch.cat(xs, dim=a["axis"])
            elif n.op == "Add":
                y = sum(xs[1:], xs[0]) + (p["constant"] if "constant" in p else 0)
            elif n.op == "Mul":
                y = xs[0] * p["constant"]
            elif n.op == "GlobalAveragePool":
                y = xs[0].mean(dim=(2, 3), keepdim=True)
            elif n.op == "Flatten":
                y = torch.flatten(xs[0], 1)
            elif n.op == "Gemm":
                y = xs[0] @ p["W"].T + p.get("B", 0)
            elif n.op in ("Identity", "Dropout"):
                y = xs[0]
            else:                                                              # pragma: no cover
                raise NotImplementedError(n.op)
            env[n.outputs[0]] = y
        return [env[t] for t in targets]
    return run


def _check_against_torch(g, x, rng):
    """Values of every BN input and the outputs, and the input gradient of sum_t <t, R_t>, vs torch (float64)."""
    import torch
    g64 = Graph([Node(n.name, n.op, n.inputs, n.outputs, n.attrs, f64_params(**n.params)) for n in g.nodes],
                g.inputs, g.outputs, g.input_shapes)
    targets = [n.inputs[0] for n in g64.nodes_of("BatchNormalization")] + g64.outputs
    tape = ad.record(g64, x, targets)
    R = {t: rng.standard_normal(tape.values[t].shape) for t in targets}
    gx = ad.input_gradient(tape, R)
    xt = torch.tensor(x, requires_grad=True)
    outs = _torch_module(g64)(xt, targets)
    for t, o in zip(targets, outs):
        np.testing.assert_allclose(tape.values[t], o.detach().numpy(), rtol=1e-10, atol=1e-10)
    sum(torch.sum(o * torch.as_tensor(R[t])) for t, o in zip(targets, outs)).backward()
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-9, atol=1e-9 * np.abs(gx).max())


def test_whole_graph_gradient_matches_torch_autograd():
    """V.1-V.12 chained, against PyTorch autograd in float64 (tolerance 1e-9 of the largest entry): the
    small graph with every op; input gradient of sum_t <t, R_t> over every BN input and the output."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    _check_against_torch(small_graph(rng), rng.standard_normal((2, 2, 8, 8)), rng)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "resnet_bottleneck", "vgg_small", "mobilenetv2_small"])
def test_zoo_gradient_matches_torch_autograd(arch):
    """V.1-V.12 chained on the zoo's networks (ResNet, bottleneck, VGG with MaxPool, MobileNetV2 with
    depthwise convs and Clip) against PyTorch autograd in float64."""
    pytest.importorskip("torch")
    from dfmpc.evaluation import load_zoo_model
    rng = np.random.default_rng(7)
    _check_against_torch(load_zoo_model(arch), rng.standard_normal((2, 1, 28, 28)), rng)


@pytest.mark.slow          # ~20 s: gradients through the zoo's ResNet-20 in float32 and float64
def test_float32_tape_matches_float64():
    """The float32 path (engine conv kernels forward, transposed conv V.1' backward) gives the float64
    input gradient of the zoo's ResNet-20 to within 1% in norm."""
    from dfmpc.evaluation import load_zoo_model
    rng = np.random.default_rng(6)
    g = load_zoo_model("resnet20")
    g64 = Graph([Node(n.name, n.op, n.inputs, n.outputs, n.attrs, f64_params(**n.params)) for n in g.nodes],
                g.inputs, g.outputs, g.input_shapes)
    x = rng.standard_normal((3, 1, 28, 28))
    targets = [n.inputs[0] for n in g.nodes_of("BatchNormalization")]
    R = {t: rng.standard_normal(v.shape) for t, v in ad.record(g64, x, targets).values.items()}
    g64x = ad.input_gradient(ad.record(g64, x, targets), R)
    g32x = ad.input_gradient(ad.record(g, x.astype(np.float32), targets), {t: r.astype(np.float32) for t, r in R.items()})
    assert g32x.dtype == np.float32
    # a few ReLU decisions flip where a float32 pre-activation is within rounding of 0, so the check is
    # on the relative norm of the difference (measured 2e-3), not elementwise
    assert np.linalg.norm(g32x - g64x) < 1e-2 * np.linalg.norm(g64x)


def _record_by_rules(graph, x, targets):
    """The tape's forward and backward by calling each op's rule afresh (no prepared Program state)."""
    nodes = ad._needed_nodes(graph, targets)
    env, ctx = {graph.inputs[0]: x}, {}
    for n in nodes:
        env[n.outputs[0]], ctx[n.name] = ad.RULES[n.op].forward(n, *[env[t] for t in n.inputs])

    def backward(seeds):
        grads = dict(seeds)
        for n in reversed(nodes):
            gy = grads.pop(n.outputs[0], None)
            if gy is not None:
                for t, gx in zip(n.inputs, ad.RULES[n.op].vjp(n, ctx[n.name], gy)):
                    grads[t] = gx if t not in grads else grads[t] + gx
        return grads[graph.inputs[0]]
    return {t: env[t] for t in targets}, backward


@pytest.mark.parametrize("arch", ["resnet20", "resnet_bottleneck"])
def test_program_equals_the_rules_bit_for_bit(arch):
    """A Program (geometry, float32 weight matrices, V.1' phases and BN scale prepared once, reused over
    calls) gives bit-identical values and input gradients to the per-call rules, in float32, on two
    batches in a row."""
    from dfmpc.evaluation import load_zoo_model
    rng = np.random.default_rng(8)
    g = load_zoo_model(arch)
    targets = [n.inputs[0] for n in g.nodes_of("BatchNormalization")]
    prog = ad.Program(g, targets)
    for _ in range(2):
        x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
        tape = prog.record(x)
        values, backward = _record_by_rules(g, x, targets)
        seeds = {t: rng.standard_normal(v.shape).astype(np.float32) for t, v in values.items()}
        for t in targets:
            np.testing.assert_array_equal(tape.values[t], values[t])
        gx = ad.input_gradient(tape, seeds)
        assert gx.dtype == np.float32
        np.testing.assert_array_equal(gx, backward(seeds))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_fused_bn_relu_kernels_equal_their_numpy_twins(layout):
    """V.2-V.3 fused float32 kernels (one pass each: BN forward, ReLU forward with its mask, and
    acc + where(mask, gy, 0) * scale) equal the NumPy expressions of the rules bit for bit, for
    NCHW views of NHWC memory (the engine's layout) and plain NCHW arrays (NumPy fallback)."""
    rng = np.random.default_rng(9)

    def batch():
        a = rng.standard_normal((3, 5, 4, 6)).astype(np.float32)
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) if layout == "nhwc" else a
    x, gy, acc = batch(), batch(), batch()
    scale, shift = rng.standard_normal(5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    np.testing.assert_array_equal(ad.bn_forward_rows(x, scale, shift), ad.bn_forward_numpy(x, scale, shift))
    y, m = ad.relu_forward_rows(x)
    y0, m0 = ad.relu_forward_numpy(x)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(m, m0)
    flat = rng.standard_normal((7, 3)).astype(np.float32)                 # after Flatten / Gemm
    for a, b in zip(ad.relu_forward_rows(flat), ad.relu_forward_numpy(flat)):
        np.testing.assert_array_equal(a, b)
    for mask in (None, m):
        for a in (None, acc):
            np.testing.assert_array_equal(ad.masked_scale_vjp(gy, mask, scale, a),
                                          ad.masked_scale_vjp_numpy(gy, mask, scale, a))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 5), w=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1), zeros=st.sampled_from([0.0, 0.3, 1.0]),
       layout=st.sampled_from(["nhwc", "nchw"]), threads=st.sampled_from([1, 2]))
def test_row_kernels_serial_parallel_and_fused_equal_their_numpy_twins(n, c, h, w, seed, zeros, layout,
                                                                       threads):
    """V.2-V.3 float32 row kernels, bit for bit: the serial (one-thread, no Numba pool) and the pool
    variant of each give the same bits, and BN + ReLU in one pass (bn_relu_forward_rows, the tape's
    form for a BN read only by a ReLU) and V.3 alone (masked_vjp) equal the rules' NumPy expressions,
    at 1 and 2 Numba threads, with exact zeros, signed zeros and values that BN maps to exactly 0."""
    import numba
    rng = np.random.default_rng(seed)

    def batch():
        a = rng.standard_normal((n, c, h, w)).astype(np.float32)
        a[rng.uniform(size=a.shape) < zeros] = 0.0
        a[rng.uniform(size=a.shape) < 0.1] = -0.0
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) if layout == "nhwc" else a
    x, gy, acc = batch(), batch(), batch()
    scale = rng.standard_normal(c).astype(np.float32)
    shift = (-scale * x[0, :, 0, 0]).astype(np.float32)          # x[0, :, 0, 0] -> exactly 0 where exact
    mask = rng.uniform(size=x.shape) < 0.5
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        y, m = ad.bn_relu_forward_rows(x, scale, shift)
        y0, m0 = ad.bn_relu_forward_numpy(x, scale, shift)
        np.testing.assert_array_equal(y, y0)
        np.testing.assert_array_equal(m, m0)
        assert np.array_equal(np.signbit(y), np.signbit(y0))
        np.testing.assert_array_equal(ad.masked_vjp(gy, mask), ad.masked_vjp_numpy(gy, mask))
        np.testing.assert_array_equal(ad.masked_vjp(gy.reshape(n, -1), mask.reshape(n, -1)),
                                      ad.masked_vjp_numpy(gy.reshape(n, -1), mask.reshape(n, -1)))
        seed = ad.AffineSeed(acc, shift, scale)                  # D.3's seed, formed inside V.2's pass
        np.testing.assert_array_equal(seed.value(), ad.bn_forward_numpy(acc, shift, scale))
        for mk in (None, mask):
            np.testing.assert_array_equal(ad.masked_scale_vjp(gy, mk, scale, seed),
                                          ad.masked_scale_vjp_numpy(gy, mk, scale, seed.value()))
    finally:
        numba.set_num_threads(before)
    r = ad._nhwc_rows(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))
    g2 = ad._nhwc_rows(np.ascontiguousarray(gy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))
    m2 = np.ascontiguousarray(mask.transpose(0, 2, 3, 1)).reshape(-1, c)
    a2 = np.ascontiguousarray(acc.transpose(0, 2, 3, 1)).reshape(-1, c)
    outs = {}
    for v in ("par", "ser"):
        o = {k: np.empty(r.shape, np.float32) for k in ("aff", "ar", "relu", "mk", "ms", "msa")}
        mk = {k: np.empty(r.shape, np.bool_) for k in ("ar", "relu")}
        getattr(ad, "_affine_rows_" + v)(r, scale, shift, o["aff"])
        getattr(ad, "_affine_relu_rows_" + v)(r, scale, shift, o["ar"], mk["ar"])
        getattr(ad, "_relu_rows_" + v)(r, o["relu"], mk["relu"])
        getattr(ad, "_masked_rows_" + v)(g2, m2, o["mk"])
        getattr(ad, "_masked_scale_rows_" + v)(g2, m2, scale, a2, o["ms"])
        getattr(ad, "_masked_scale_affine_rows_" + v)(g2, m2, scale, r, shift, scale, o["msa"])
        outs[v] = (o, mk)
    for k in outs["par"][0]:
        assert outs["par"][0][k].view(np.uint32).tolist() == outs["ser"][0][k].view(np.uint32).tolist(), k
    for k in outs["par"][1]:
        np.testing.assert_array_equal(outs["par"][1][k], outs["ser"][1][k])
    np.testing.assert_array_equal(outs["ser"][0]["ar"], np.maximum(outs["ser"][0]["aff"], 0))
    seed = np.empty(r.shape, np.float32)
    ad._affine_rows_ser(r, shift, scale, seed)
    o = np.empty(r.shape, np.float32)
    ad._masked_scale_rows_ser(g2, m2, scale, seed, o)
    assert o.view(np.uint32).tolist() == outs["ser"][0]["msa"].view(np.uint32).tolist()


def test_bn_relu_fusion_is_used_and_a_second_reader_prevents_it():
    """The tape fuses a BN with the ReLU that alone reads it (V.2 then V.3 in one pass, as ResNet-20's
    conv1 -> bn1 -> relu), and not a BN whose output a second node also reads (negative control: the
    fused step would hide the BN output from that reader); both give the rules' values and input
    gradients bit for bit, also with D.3's seeds given as AffineSeed."""
    rng = np.random.default_rng(12)
    C = 3

    def p(*s):
        return rng.standard_normal(s).astype(np.float32)
    bn = {"gamma": p(C), "beta": p(C), "mean": p(C), "var": np.abs(p(C)) + 0.5}
    nodes = [Node("conv", "Conv", ["x"], ["z"], {"pads": [1, 1, 1, 1]}, {"W": p(C, 2, 3, 3)}),
             Node("bn", "BatchNormalization", ["z"], ["b"], {}, bn),
             Node("relu", "Relu", ["b"], ["r"], {}, {}),
             Node("conv2", "Conv", ["r"], ["z2"], {}, {"W": p(C, C, 1, 1)})]
    for second_reader in (False, True):
        extra = [Node("add", "Add", ["z2", "b"], ["s"], {}, {})] if second_reader else []
        g = Graph(nodes + extra, ["x"], ["s" if second_reader else "z2"], {"x": (2, 5, 5)})
        targets = ["z", "s" if second_reader else "z2"]
        prog = ad.Program(g, targets)
        assert prog._fused_bn == (set() if second_reader else {"b"})
        x = p(2, 2, 5, 5)
        tape = prog.record(x)
        values, backward = _record_by_rules(g, x, targets)
        seeds = {t: p(*values[t].shape) for t in targets}
        for t in targets:
            np.testing.assert_array_equal(tape.values[t], values[t])
        np.testing.assert_array_equal(ad.input_gradient(tape, seeds), backward(seeds))
        # D.3's seeds given as AffineSeed (formed inside the BN's pass, or where another reader needs them)
        b, c = p(C), p(C)
        lazy = {"z": ad.AffineSeed(tape.values["z"], b, c), targets[1]: seeds[targets[1]]}
        formed = {"z": ad.bn_forward_numpy(values["z"], b, c), targets[1]: seeds[targets[1]]}
        np.testing.assert_array_equal(ad.input_gradient(tape, lazy), backward(formed))
