"""Moment rules (derivation 14, M.1-M.13) against Monte Carlo through the engine's own ops.

Every rule is checked the same way: draw an input with known per-channel moments (fixed seed,
NumPy), run a one-node graph on it with the engine, measure the per-channel mean and variance of
the output over samples and positions, and compare with :func:`dfmpc.moments.propagate_moments`.

Tolerance (stated, not guessed): the per-sample spatial averages ``a_n = mean_p y[n, c, p]`` and
``b_n = mean_p y[n, c, p]^2`` are independent across the N samples whatever the spatial
correlation, so their standard errors are ``sd(a) / sqrt(N)`` and ``sd(b) / sqrt(N)``; the variance
``b - a^2`` gets ``se_b + 2 |a| se_a`` (a bound on its delta-method standard error). A rule passes
when every channel is within Z = 5 standard errors (probability of a false failure per channel
below 6e-7); its negative control (a plausible wrong rule) must be off by more than Z on some
channel, so the check is not vacuous at that sample size.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st

import dfmpc
from dfmpc.engine import Graph, Node, SUPPORTED_OPS
from dfmpc.moments import (MOMENT_RULES, Assumptions, clipped_gaussian_moments, max_of_gaussians_moments,
                           propagate_moments, tensor_shapes)

Z = 5.0
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = ["vgg19", "densenet121", "inception_v2", "resnet50", "squeezenet"]


# ----------------------------------------------------------------------------- helpers

def measured(Y):
    """Per-channel mean, variance and their standard errors over samples (axis 0) and positions."""
    Y = np.asarray(Y, dtype=np.float64)
    N, C = Y.shape[:2]
    Y = Y.reshape(N, C, -1)
    a, b = Y.mean(axis=2), (Y**2).mean(axis=2)
    mean, second = a.mean(axis=0), b.mean(axis=0)
    se_a, se_b = a.std(axis=0, ddof=1) / np.sqrt(N), b.std(axis=0, ddof=1) / np.sqrt(N)
    return mean, second - mean**2, se_a, se_b + 2 * np.abs(mean) * se_a


def z_scores(rule, Y):
    """Largest |rule - measured| in standard errors, for the mean and the variance."""
    mean, var, se_m, se_v = measured(Y)
    rm, rv = rule
    zm = np.abs(rm - mean) / np.maximum(se_m, 1e-12)
    zv = np.abs(rv - var) / np.maximum(se_v, 1e-12)
    return float(zm.max()), float(zv.max())


def run(g, x, name=None):
    """One tensor of ``g`` on ``x`` (works with ``Graph.run(x, output=)`` and the older ``outputs=[...]``)."""
    name = g.outputs[0] if name is None else name
    try:
        return g.run(x, output=name)
    except TypeError:
        return g.run(x, outputs=[name])


def run_many(g, x, names):
    """Several tensors of ``g`` as a dict."""
    if hasattr(g, "run_many"):
        return g.run_many(x, outputs=names)
    return g.run(x, outputs=names)


def one_node(node, shape, extra_inputs=()):
    inputs = [node.inputs[0]] + list(extra_inputs)
    return Graph([node], inputs, node.outputs, {t: shape for t in inputs})


def gaussian(rng, N, shape, m, v):
    """(N, C, ...) float32 with channel c ~ N(m_c, v_c), independent everywhere."""
    bshape = (1, -1) + (1,) * (len(shape) - 1)
    x = m.reshape(bshape) + np.sqrt(v).reshape(bshape) * rng.standard_normal((N,) + tuple(shape))
    return x.astype(np.float32)


def channel_moments(rng, C, mean_scale=1.0):
    return rng.normal(0, mean_scale, C), rng.uniform(0.3, 2.0, C)


def block_equicorrelated(rng, N, C, H, W, k, rho, m, v):
    """Channel c ~ N(m_c, v_c); elements of one k x k block (same sample, channel) have correlation rho,
    different blocks are independent (the model of M.8 / M.9 for non-overlapping windows)."""
    z0 = rng.standard_normal((N, C, H // k, W // k)).repeat(k, axis=2).repeat(k, axis=3)
    z = np.sqrt(rho) * z0 + np.sqrt(1 - rho) * rng.standard_normal((N, C, H, W))
    return (m[None, :, None, None] + np.sqrt(v)[None, :, None, None] * z).astype(np.float32)


# ----------------------------------------------------------------------------- coverage and errors

def test_a_rule_for_every_engine_op():
    """M.0, item 1 of issue 10: MOMENT_RULES covers the engine's whole op set, and nothing else."""
    assert set(MOMENT_RULES) == set(SUPPORTED_OPS)


def test_op_without_rule_is_a_value_error_naming_op_and_node(monkeypatch):
    """M.0, item 2 of issue 10: an op with no rule raises ValueError (never KeyError) naming the op type
    and the node (the rule is removed from the registry to make one)."""
    g = Graph([Node("r", "Relu", ["x"], ["r"]), Node("m", "Mul", ["r"], ["m"], {}, {"constant": np.float32(2)})],
              ["x"], ["m"], {"x": (2, 3, 3)})
    monkeypatch.delitem(MOMENT_RULES, "Mul")
    with pytest.raises(ValueError, match=r"no moment rule for node 'm' \(Mul\)"):
        propagate_moments(g)


def test_mul_after_relu_no_longer_fails_and_no_node_is_skipped():
    """M.0, M.6: the issue's KeyError 'm': a Mul after a ReLU now has moments, and every tensor gets an entry."""
    g = Graph([Node("r", "Relu", ["x"], ["r"]), Node("m", "Mul", ["r"], ["m"], {}, {"constant": np.float32(2)})],
              ["x"], ["m"], {"x": (2, 3, 3)})
    mo = propagate_moments(g)
    assert set(mo) == {"x", "r", "m"}
    r_mean, r_var = clipped_gaussian_moments(np.zeros(2), np.ones(2))
    np.testing.assert_allclose(mo["m"][0], 2 * r_mean, rtol=1e-12)
    np.testing.assert_allclose(mo["m"][1], 4 * r_var, rtol=1e-12)


def test_bad_inputs_are_value_errors_naming_the_node():
    """M.0: a Flatten that would mix the batch axis, an input of unknown shape, an impossible assumption:
    ValueErrors naming the node / input."""
    g = Graph([Node("fl", "Flatten", ["x"], ["f"], {"axis": 2}),
               Node("fc", "Gemm", ["f"], ["y"], {}, {"W": np.ones((2, 9), np.float32)})], ["x"], ["y"], {"x": (2, 3, 3)})
    with pytest.raises(ValueError, match="'fl' \\(Flatten\\).*mixes the batch axis"):
        propagate_moments(g)
    g2 = Graph([Node("r", "Relu", ["x"], ["r"])], ["x"], ["r"])
    with pytest.raises(ValueError, match="input 'x'.*input_shapes"):
        propagate_moments(g2)
    with pytest.raises(ValueError, match="spatial_correlation"):
        Assumptions(spatial_correlation=1.5)


# ----------------------------------------------------------------------------- M.2 Conv

def _conv_case(rng, C, O, group, k, stride, pad, dil, H, W):
    Wt = rng.normal(0, 1, (O, C // group, k, k)).astype(np.float32)
    B = rng.normal(0, 0.5, O).astype(np.float32)
    return Node("c", "Conv", ["x"], ["y"], {"strides": (stride, stride), "pads": (pad,) * 4,
                                             "dilations": (dil, dil), "group": group}, {"W": Wt, "B": B})


def _unpadded_conv_rule(node, m, v):
    """Negative control: the rule before derivation 14 (padding ignored)."""
    W = node.params["W"].astype(float)
    g = node.attrs["group"]
    O, Cg = W.shape[:2]
    idx = (np.arange(O)[:, None] // (O // g)) * Cg + np.arange(Cg)[None, :]
    return (np.sum(W.sum(axis=(2, 3)) * m[idx], axis=1) + node.params["B"],
            np.sum((W**2).sum(axis=(2, 3)) * v[idx], axis=1))


@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["dense", "grouped", "depthwise"]),
       k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), dil=st.sampled_from([1, 2]),
       H=st.integers(4, 9), rectified=st.booleans())
@settings(max_examples=12)
def test_conv_rule_matches_monte_carlo(seed, kind, k, stride, dil, H, rectified):
    """M.2: dense, grouped and depthwise convs with zero padding, strides and dilations: the rule is
    within Z standard errors of the measured per-channel moments (Gaussian or rectified inputs)."""
    rng = np.random.default_rng(seed)
    C, group, O = {"dense": (4, 1, 6), "grouped": (4, 2, 6), "depthwise": (4, 4, 8)}[kind]
    pad = (dil * (k - 1)) // 2
    if H + 2 * pad < dil * (k - 1) + 1:
        H = dil * (k - 1) + 1
    node = _conv_case(rng, C, O, group, k, stride, pad, dil, H, H)
    m, v = channel_moments(rng, C)
    nodes = [node]
    if rectified:                                    # the conv reads ReLU(X): a non-Gaussian input
        nodes = [Node("relu", "Relu", ["x"], ["r"]), Node("c", "Conv", ["r"], ["y"], node.attrs, node.params)]
    g = Graph(nodes, ["x"], ["y"], {"x": (C, H, H)})
    x = gaussian(rng, 2000, (C, H, H), m, v)
    Y = run(g, x, "y")
    assert max(z_scores(propagate_moments(g, m, v)["y"], Y)) < Z


def test_conv_padding_negative_control():
    """M.2 negative control: ignoring the zero padding (the rule before derivation 14) is off by far
    more than Z standard errors on a 5x5 conv with padding 2 over a 6x6 map and a nonzero input mean,
    while the padding-exact rule passes; depthwise is checked the same way."""
    rng = np.random.default_rng(1)
    for C, group, O in [(3, 1, 4), (4, 4, 4)]:
        node = _conv_case(rng, C, O, group, 5, 1, 2, 1, 6, 6)
        m, v = rng.uniform(1.0, 2.0, C), rng.uniform(0.5, 1.0, C)
        g = one_node(node, (C, 6, 6))
        Y = run(g, gaussian(rng, 3000, (C, 6, 6), m, v))
        assert max(z_scores(propagate_moments(g, m, v)["y"], Y)) < Z
        assert max(z_scores(_unpadded_conv_rule(node, m, v), Y)) > 4 * Z


def test_conv_auto_pad_same_upper():
    """M.2 with auto_pad SAME_UPPER (asymmetric pads taken from the engine's geometry)."""
    rng = np.random.default_rng(2)
    node = Node("c", "Conv", ["x"], ["y"], {"auto_pad": "SAME_UPPER", "strides": (2, 2)},
                {"W": rng.normal(size=(5, 3, 4, 4)).astype(np.float32)})
    g = one_node(node, (3, 7, 7))
    m, v = rng.uniform(0.5, 1.5, 3), rng.uniform(0.5, 1.0, 3)
    Y = run(g, gaussian(rng, 3000, (3, 7, 7), m, v))
    assert Y.shape[2:] == (4, 4)
    assert max(z_scores(propagate_moments(g, m, v)["y"], Y)) < Z


# ----------------------------------------------------------------------------- M.3, M.4, M.13

@pytest.mark.parametrize("op, attrs", [("BatchNormalization", {"epsilon": 1e-3}), ("Relu", {}),
                                       ("Clip", {"min": 0.0, "max": 1.0}), ("Clip", {"min": -0.5, "max": None}),
                                       ("LeakyRelu", {"alpha": 0.1}), ("LeakyRelu", {"alpha": 0.5}),
                                       ("Identity", {}), ("Dropout", {})])
def test_elementwise_rules_match_monte_carlo(op, attrs):
    """M.3 (BN affine), M.4 (clipped Gaussian on a Gaussian input), M.14 (LeakyRelu), M.13 (pass-through)."""
    rng = np.random.default_rng(3)
    C = 5
    params = {}
    if op == "BatchNormalization":
        params = {"gamma": rng.uniform(0.5, 2, C), "beta": rng.normal(size=C), "mean": rng.normal(size=C),
                  "var": rng.uniform(0.5, 2, C)}
        params = {k: p.astype(np.float32) for k, p in params.items()}
    g = one_node(Node("n", op, ["x"], ["y"], attrs, params), (C, 4, 4))
    m, v = channel_moments(rng, C)
    Y = run(g, gaussian(rng, 4000, (C, 4, 4), m, v))
    assert max(z_scores(propagate_moments(g, m, v)["y"], Y)) < Z


def test_leaky_relu_rule_negative_control():
    """M.14 negative control: ReLU's moments (dropping the alpha branch) miss a LeakyRelu(0.5)'s Monte Carlo."""
    rng = np.random.default_rng(4)
    C = 5
    g = one_node(Node("n", "LeakyRelu", ["x"], ["y"], {"alpha": 0.5}), (C, 4, 4))
    m, v = channel_moments(rng, C)
    Y = run(g, gaussian(rng, 4000, (C, 4, 4), m, v))
    assert max(z_scores(propagate_moments(g, m, v)["y"], Y)) < Z
    wrong = clipped_gaussian_moments(m, v, 0.0, np.inf)
    assert max(z_scores(wrong, Y)) > 3 * Z


# ----------------------------------------------------------------------------- M.5 Add, M.6 Mul

def _two_inputs(rng, N, shape, m1, v1, m2, v2, rho):
    """Two tensors, per element correlation rho between them (same channel and position)."""
    z1 = rng.standard_normal((N,) + shape)
    z2 = rho * z1 + np.sqrt(1 - rho**2) * rng.standard_normal((N,) + shape)
    b = (1, -1, 1, 1)
    x1 = m1.reshape(b) + np.sqrt(v1).reshape(b) * z1
    x2 = m2.reshape(b) + np.sqrt(v2).reshape(b) * z2
    return x1.astype(np.float32), x2.astype(np.float32)


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_add_rule_with_branch_correlation(rho):
    """M.5: two branches with per-element correlation rho; the rule with branch_correlation = rho
    passes; the independence rule fails when rho = 0.6 (negative control)."""
    rng = np.random.default_rng(4)
    C, shape = 4, (4, 5, 5)
    g = Graph([Node("a", "Add", ["x1", "x2"], ["y"])], ["x1", "x2"], ["y"], {"x1": shape, "x2": shape})
    m1, v1 = channel_moments(rng, C)
    m2, v2 = channel_moments(rng, C)
    x1, x2 = _two_inputs(rng, 4000, shape, m1, v1, m2, v2, rho)
    Y = run(g, {"x1": x1, "x2": x2})
    # two inputs with different moments: pass them through a BN-free graph by giving each its own
    shapes = tensor_shapes(g)
    from dfmpc.moments import RuleInput, add_moments
    rule = add_moments(g.node("a"), RuleInput([(m1, v1), (m2, v2)], [shapes["x1"], shapes["x2"]], shapes["y"],
                                              Assumptions(branch_correlation=rho)))
    assert max(z_scores(rule, Y)) < Z
    if rho > 0:
        indep = add_moments(g.node("a"), RuleInput([(m1, v1), (m2, v2)], [shape, shape], shape))
        assert z_scores(indep, Y)[1] > 4 * Z


@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("const_shape", [(), (4, 1, 1), (1, 4, 3, 3), (3,)])
def test_constant_add_and_mul_exact_per_channel(op, const_shape):
    """M.5, M.6: a constant (scalar, per channel, or varying over positions) adds / scales exactly;
    for a position-varying constant the spatial spread enters the per-channel variance."""
    rng = np.random.default_rng(5)
    C, shape = 4, (4, 3, 3)
    const = rng.uniform(0.5, 2.0, const_shape).astype(np.float32)
    g = one_node(Node("n", op, ["x"], ["y"], {}, {"constant": const}), shape)
    m, v = channel_moments(rng, C)
    Y = run(g, gaussian(rng, 4000, shape, m, v))
    assert max(z_scores(propagate_moments(g, m, v)["y"], Y)) < Z
    if const.ndim == 4:             # negative control: the channel-average constant ignores the spread
        k = np.broadcast_to(const, (1,) + shape)[0].reshape(C, -1)
        wrong = ((m + k.mean(1), v) if op == "Add" else (m * k.mean(1), (v + m**2) * k.mean(1) ** 2 - (m * k.mean(1)) ** 2))
        assert max(z_scores(wrong, Y)) > Z


def test_mul_of_two_independent_activations():
    """M.6: the product of independent activations: E = m1 m2, E[y^2] = (v1 + m1^2)(v2 + m2^2)."""
    rng = np.random.default_rng(6)
    C, shape = 4, (4, 3, 3)
    g = Graph([Node("p", "Mul", ["x1", "x2"], ["y"])], ["x1", "x2"], ["y"], {"x1": shape, "x2": shape})
    m, v = channel_moments(rng, C)
    x1, x2 = _two_inputs(rng, 4000, shape, m, v, m, v, 0.0)
    Y = run(g, {"x1": x1, "x2": x2})
    assert max(z_scores(propagate_moments(g, m, v)["y"], Y)) < Z


# ----------------------------------------------------------------------------- M.7 Concat

@pytest.mark.parametrize("axis", [1, 2, -1])
def test_concat_rule(axis):
    """M.7: channels concatenate; a spatial concat is a mixture weighted by the parts' shares
    (negative control: the unweighted mixture, with shares 2 : 6, fails)."""
    rng = np.random.default_rng(7)
    C = 3
    s1, s2 = (C, 2, 2), ((C, 6, 2) if axis == 2 else (C, 2, 6) if axis == -1 else (C + 2, 2, 2))
    from dfmpc.moments import RuleInput, concat_moments
    node = Node("cat", "Concat", ["a", "b"], ["y"], {"axis": axis})
    g = Graph([node], ["a", "b"], ["y"], {"a": s1, "b": s2})
    (m1, v1), (m2, v2) = channel_moments(rng, s1[0], 2.0), channel_moments(rng, s2[0], 2.0)
    Y = run(g, {"a": gaussian(rng, 3000, s1, m1, v1), "b": gaussian(rng, 3000, s2, m2, v2)})
    shapes = tensor_shapes(g)
    rule = concat_moments(node, RuleInput([(m1, v1), (m2, v2)], [s1, s2], shapes["y"]))
    assert shapes["y"] == Y.shape[1:]
    assert max(z_scores(rule, Y)) < Z
    if axis != 1:
        mean = (m1 + m2) / 2
        wrong = (mean, (v1 + m1**2 + v2 + m2**2) / 2 - mean**2)
        assert max(z_scores(wrong, Y)) > Z


# ----------------------------------------------------------------------------- M.8 MaxPool

def test_max_of_gaussians_known_values():
    """M.8 quadrature: max of 2 and 3 iid N(0, 1) has mean 1/sqrt(pi), 3/(2 sqrt(pi)), and max of 2
    has variance 1 - 1/pi (closed forms); rho = 1 or n = 1 is the input (or its clip). 1e-7."""
    m, v = max_of_gaussians_moments(np.zeros(1), np.ones(1), 2, 0.0)
    assert m[0] == pytest.approx(1 / np.sqrt(np.pi), abs=1e-7) and v[0] == pytest.approx(1 - 1 / np.pi, abs=1e-7)
    m3, _ = max_of_gaussians_moments(np.zeros(1), np.ones(1), 3, 0.0)
    assert m3[0] == pytest.approx(1.5 / np.sqrt(np.pi), abs=1e-7)
    # equicorrelated: mean m + s sqrt(1 - rho) e1(n), var v (rho + (1 - rho) var(M_n))
    mr, vr = max_of_gaussians_moments(np.array([0.5]), np.array([4.0]), 2, 0.3)
    assert mr[0] == pytest.approx(0.5 + 2 * np.sqrt(0.7) / np.sqrt(np.pi), abs=1e-7)
    assert vr[0] == pytest.approx(4 * (0.3 + 0.7 * (1 - 1 / np.pi)), abs=1e-6)
    np.testing.assert_allclose(max_of_gaussians_moments(np.array([0.2]), np.array([2.0]), 9, 1.0, 0.0, np.inf),
                               clipped_gaussian_moments(np.array([0.2]), np.array([2.0])), rtol=1e-12)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 12), rho=st.floats(0.0, 1.0),
       clip=st.sampled_from([(-np.inf, np.inf), (0.0, np.inf), (0.0, 6.0)]))
@settings(max_examples=40)
def test_max_pool_mean_between_its_bounds(seed, n, rho, clip):
    """M.8 (Slepian): the mean of the (clipped) max for rho in [0, 1] lies between rho = 1 and rho = 0,
    and is nonincreasing in rho."""
    rng = np.random.default_rng(seed)
    m, v = rng.normal(0, 2, 6), rng.uniform(0.01, 4, 6)
    lo, hi = clip
    at = lambda r: max_of_gaussians_moments(m, v, n, r, lo, hi)[0]
    top, mid, low, more = at(0.0), at(rho), at(1.0), at(min(1.0, rho + 0.1))
    assert np.all(low <= mid + 1e-9) and np.all(mid <= top + 1e-9) and np.all(more <= mid + 1e-9)


def test_max_pool_independent_with_padding_and_overlap():
    """M.8, rho = 0: 3x3 windows, stride 2, padding 1 (border windows hold 4 or 6 elements) on a
    rectified input (Relu -> MaxPool: max of clip = clip of max). Negative control: every window
    taken as full (9 elements, padding ignored) is off by more than Z."""
    rng = np.random.default_rng(8)
    C, shape = 4, (4, 6, 6)
    pool = {"kernel_shape": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}
    g = Graph([Node("r", "Relu", ["x"], ["r"]), Node("p", "MaxPool", ["r"], ["y"], pool)], ["x"], ["y"], {"x": shape})
    m, v = channel_moments(rng, C)
    Y = run(g, gaussian(rng, 4000, shape, m, v))
    rule = propagate_moments(g, m, v, assumptions=Assumptions(spatial_correlation=0.0))["y"]
    assert max(z_scores(rule, Y)) < Z
    full = max_of_gaussians_moments(m, v, 9, 0.0, 0.0, np.inf)
    assert max(z_scores(full, Y)) > Z


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_max_pool_equicorrelated_windows(rho):
    """M.8: 2x2 windows whose elements have correlation rho (Gaussian input, no clip); the rule at rho
    passes, the rule at the wrong extreme (rho = 1 for 0, 0 for 0.5) fails."""
    rng = np.random.default_rng(9)
    C = 4
    m, v = channel_moments(rng, C)
    g = one_node(Node("p", "MaxPool", ["x"], ["y"], {"kernel_shape": (2, 2), "strides": (2, 2)}), (C, 6, 6))
    Y = run(g, block_equicorrelated(rng, 4000, C, 6, 6, 2, rho, m, v))
    assert max(z_scores(propagate_moments(g, m, v, assumptions=Assumptions(rho))["y"], Y)) < Z
    wrong = 1.0 if rho == 0 else 0.0
    assert max(z_scores(propagate_moments(g, m, v, assumptions=Assumptions(wrong))["y"], Y)) > Z


# ----------------------------------------------------------------------------- M.9 average pooling

@pytest.mark.parametrize("rho", [0.0, 0.7])
def test_average_pool_equicorrelated_windows(rho):
    """M.9: 3x3 windows, stride 3, correlation rho inside a window; negative control: the other
    extreme (var / 9 for correlated maps, var unchanged for independent ones) fails."""
    rng = np.random.default_rng(10)
    C = 4
    m, v = channel_moments(rng, C)
    g = one_node(Node("p", "AveragePool", ["x"], ["y"], {"kernel_shape": (3, 3), "strides": (3, 3)}), (C, 6, 6))
    Y = run(g, block_equicorrelated(rng, 4000, C, 6, 6, 3, rho, m, v))
    assert max(z_scores(propagate_moments(g, m, v, assumptions=Assumptions(rho))["y"], Y)) < Z
    wrong = 1.0 if rho == 0 else 0.0
    assert z_scores(propagate_moments(g, m, v, assumptions=Assumptions(wrong))["y"], Y)[1] > Z


@pytest.mark.parametrize("include", [0, 1])
def test_average_pool_padding_and_count_include_pad(include):
    """M.9, rho = 0, 3x3 stride 1 padding 1, ceil mode off: border windows hold 4 or 6 inputs; with
    count_include_pad the divisor stays 9 and the mean drops at the borders. Negative control: the
    other divisor convention fails."""
    rng = np.random.default_rng(11)
    C = 4
    m, v = rng.uniform(1, 2, C), rng.uniform(0.3, 1, C)
    attrs = {"kernel_shape": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1), "count_include_pad": include}
    g = one_node(Node("p", "AveragePool", ["x"], ["y"], attrs), (C, 5, 5))
    Y = run(g, gaussian(rng, 4000, (C, 5, 5), m, v))
    a0 = Assumptions(spatial_correlation=0.0)
    assert max(z_scores(propagate_moments(g, m, v, assumptions=a0)["y"], Y)) < Z
    other = one_node(Node("p", "AveragePool", ["x"], ["y"], {**attrs, "count_include_pad": 1 - include}), (C, 5, 5))
    assert max(z_scores(propagate_moments(other, m, v, assumptions=a0)["y"], Y)) > Z


def test_average_pool_ceil_mode():
    """M.9 with ceil_mode: the overhanging windows divide by their input elements only."""
    rng = np.random.default_rng(12)
    C = 3
    m, v = rng.uniform(1, 2, C), rng.uniform(0.3, 1, C)
    attrs = {"kernel_shape": (3, 3), "strides": (2, 2), "ceil_mode": 1}
    g = one_node(Node("p", "AveragePool", ["x"], ["y"], attrs), (C, 6, 6))
    Y = run(g, gaussian(rng, 4000, (C, 6, 6), m, v))
    assert Y.shape[2:] == tensor_shapes(g)["y"][1:] == (3, 3)
    assert max(z_scores(propagate_moments(g, m, v, assumptions=Assumptions(0.0))["y"], Y)) < Z


@pytest.mark.parametrize("rho", [0.0, 0.4, 1.0])
def test_global_average_pool(rho):
    """M.9 for GAP over 8x8: var (rho + (1 - rho) / 64). Negative controls: var / 64 (independent
    positions) fails on a correlated map, var unchanged fails on a partly correlated one."""
    rng = np.random.default_rng(13)
    C = 4
    m, v = channel_moments(rng, C)
    g = one_node(Node("p", "GlobalAveragePool", ["x"], ["y"]), (C, 8, 8))
    Y = run(g, block_equicorrelated(rng, 4000, C, 8, 8, 8, rho, m, v))
    assert max(z_scores(propagate_moments(g, m, v, assumptions=Assumptions(rho))["y"], Y)) < Z
    if rho > 0:
        assert z_scores((m, v / 64), Y)[1] > Z
    if rho < 1:
        assert z_scores((m, v), Y)[1] > Z


# ----------------------------------------------------------------------------- M.10 Flatten, M.11 Gemm

def test_flatten_repeats_channels_over_positions():
    """M.10: feature c H W + p carries channel c's moments (channel-major). Negative control: the
    position-major order (np.tile) fails."""
    rng = np.random.default_rng(14)
    C, shape = 3, (3, 2, 3)
    g = one_node(Node("f", "Flatten", ["x"], ["y"], {"axis": 1}), shape)
    m, v = rng.normal(0, 3, C), rng.uniform(0.2, 3, C)
    Y = run(g, gaussian(rng, 3000, shape, m, v))
    rule = propagate_moments(g, m, v)["y"]
    assert rule[0].shape == (18,)
    assert max(z_scores(rule, Y[:, :, None])) < Z
    assert max(z_scores((np.tile(m, 6), np.tile(v, 6)), Y[:, :, None])) > Z


def test_flatten_then_gemm_has_the_gemm_shape():
    """M.10, M.11, and the VGG-19 failure of issue 10 (512 per-channel moments reached a Gemm expecting
    25,088 inputs): Flatten -> Gemm gets C H W features and the Gemm output matches Monte Carlo on
    independent features. Negative control: the per-channel moments tiled position-major."""
    rng = np.random.default_rng(15)
    C, shape = 3, (3, 4, 4)
    W = rng.normal(0, 0.3, (7, 48))
    nodes = [Node("f", "Flatten", ["x"], ["f"]),
             Node("fc", "Gemm", ["f"], ["y"], {}, {"W": W.astype(np.float32), "B": rng.normal(size=7).astype(np.float32)})]
    g = Graph(nodes, ["x"], ["y"], {"x": shape})
    m, v = rng.normal(0, 2, C), rng.uniform(0.2, 2, C)
    Y = run(g, gaussian(rng, 4000, shape, m, v))
    rule = propagate_moments(g, m, v)["y"]
    assert max(z_scores(rule, Y[:, :, None])) < Z
    wrong = (W @ np.tile(m, 16) + g.node("fc").params["B"], (W**2) @ np.tile(v, 16))
    assert max(z_scores(wrong, Y[:, :, None])) > Z


# ----------------------------------------------------------------------------- M.12 Softmax

def test_softmax_ratio_of_expectations():
    """M.12 on 1000 independent Gaussian logits: the mean within Z standard errors plus the neglected
    second-order term (3 x the squared coefficient of variation of the denominator, computed here and
    below 1%); the variance within 10%. Negative control: softmax of the means (no v / 2) fails."""
    rng = np.random.default_rng(16)
    F = 1000
    m, v = rng.normal(0, 0.5, F), rng.uniform(0.1, 1.0, F)
    g = one_node(Node("s", "Softmax", ["x"], ["y"], {"axis": 1}), (F,))
    Y = run(g, gaussian(rng, 3000, (F,), m, v)).astype(np.float64)
    rm, rv = propagate_moments(g, m, v)["y"]
    a = np.exp(m + v / 2)
    cv2 = np.sum(a**2 * np.expm1(v)) / a.sum() ** 2                     # CV^2 of the denominator
    assert cv2 < 0.01 / 3
    mean, var, se_m, se_v = measured(Y[:, :, None])
    assert np.all(np.abs(rm - mean) <= Z * se_m + 3 * cv2 * rm)
    assert np.median(np.abs(rv / var - 1)) < 0.1
    wrong = np.exp(m) / np.exp(m).sum()
    assert np.any(np.abs(wrong - mean) > Z * se_m + 3 * cv2 * wrong)


def test_softmax_exchangeable_mean_is_exact_and_variance_bounded():
    """M.12: softmax within each channel over positions has mean exactly 1 / (H W); the variance never
    exceeds mu (1 - mu), the bound for a variable in [0, 1], even for huge input variances."""
    g = one_node(Node("s", "Softmax", ["x"], ["y"], {"axis": 2}), (2, 3, 4))
    mo = propagate_moments(g, np.array([0.0, 5.0]), np.array([1.0, 1e4]))["y"]
    np.testing.assert_allclose(mo[0], 1 / 12, rtol=1e-12)
    assert np.all(np.isfinite(mo[1])) and np.all(mo[1] <= mo[0] * (1 - mo[0]) + 1e-15)


# ----------------------------------------------------------------------------- M.1 BN statistics

def test_tensor_read_by_bn_takes_its_running_statistics():
    """M.1: a Concat read by a BN (DenseNet) takes the BN's running mean / var; so does a conv output
    (R.1); a tensor not read by a BN keeps its propagated moments."""
    rng = np.random.default_rng(17)
    bn = lambda name, x, c: Node(name, "BatchNormalization", [x], [name], {"epsilon": 1e-5},
                                 {"gamma": np.ones(c, np.float32), "beta": np.zeros(c, np.float32),
                                  "mean": rng.normal(size=c).astype(np.float32),
                                  "var": rng.uniform(1, 2, c).astype(np.float32)})
    nodes = [Node("c", "Conv", ["x"], ["c"], {"pads": (1,) * 4}, {"W": rng.normal(size=(4, 2, 3, 3)).astype(np.float32)}),
             bn("bn1", "c", 4), Node("r", "Relu", ["bn1"], ["r"]),
             Node("cat", "Concat", ["x", "r"], ["cat"], {"axis": 1}), bn("bn2", "cat", 6)]
    g = Graph(nodes, ["x"], ["bn2"], {"x": (2, 5, 5)})
    mo = propagate_moments(g)
    for t, b in [("c", "bn1"), ("cat", "bn2")]:
        np.testing.assert_array_equal(mo[t][0], g.node(b).params["mean"].astype(float))
        np.testing.assert_array_equal(mo[t][1], g.node(b).params["var"].astype(float))
    np.testing.assert_allclose(mo["r"][0], clipped_gaussian_moments(*mo["bn1"])[0], rtol=1e-12)


# ----------------------------------------------------------------------------- shapes and the light models

def test_tensor_shapes_match_the_engine_on_a_graph_with_every_op():
    """M.0: the shape pass agrees with running the engine, on a graph that uses every op of the engine,
    and every tensor gets finite moments."""
    rng = np.random.default_rng(18)
    f32 = lambda *s: rng.normal(size=s).astype(np.float32)
    bnp = {"gamma": f32(4), "beta": f32(4), "mean": f32(4), "var": np.ones(4, np.float32)}
    nodes = [Node("c", "Conv", ["x"], ["c"], {"pads": (1, 1, 1, 1), "strides": (2, 2)}, {"W": f32(4, 3, 3, 3)}),
             Node("bn", "BatchNormalization", ["c"], ["bn"], {"epsilon": 1e-5}, bnp),
             Node("r", "Relu", ["bn"], ["r"]), Node("cl", "Clip", ["r"], ["cl"], {"min": 0.0, "max": 6.0}),
             Node("mp", "MaxPool", ["cl"], ["mp"], {"kernel_shape": (3, 3), "strides": (2, 2), "ceil_mode": 1}),
             Node("ap", "AveragePool", ["cl"], ["ap"], {"kernel_shape": (2, 2), "strides": (2, 2)}),
             Node("cat", "Concat", ["mp", "ap"], ["cat"], {"axis": 1}),
             Node("mul", "Mul", ["cat"], ["mul"], {}, {"constant": f32(8, 1, 1)}),
             Node("add", "Add", ["mul", "cat"], ["add"], {}, {"constant": f32(1)}),
             Node("id", "Identity", ["add"], ["id"]), Node("lr", "LeakyRelu", ["id"], ["lr"], {"alpha": 0.1}),
             Node("do", "Dropout", ["lr"], ["do"]),
             Node("gap", "GlobalAveragePool", ["do"], ["gap"]), Node("fl", "Flatten", ["do"], ["fl"]),
             Node("fc", "Gemm", ["fl"], ["fc"], {}, {"W": f32(5, 32)}), Node("sm", "Softmax", ["fc"], ["sm"], {"axis": 1})]
    g = Graph(nodes, ["x"], ["sm", "gap"], {"x": (3, 9, 9)})
    shapes = tensor_shapes(g)
    got = run_many(g, np.zeros((1, 3, 9, 9), np.float32), [n.outputs[0] for n in nodes])
    assert {n.op for n in nodes} == set(SUPPORTED_OPS)
    assert all(shapes[t] == got[t].shape[1:] for t in got)
    mo = propagate_moments(g)
    assert all(np.all(np.isfinite(mo[t][0])) and np.all(np.isfinite(mo[t][1])) for t in shapes)


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_models_get_finite_moments_for_every_tensor(name):
    """M.0, issue 10: propagate_moments runs on each light topology (VGG-19's Flatten -> Gemm of 25,088
    features, DenseNet's and Inception's Mul / Add constants and Concats, SqueezeNet's Softmax) and
    yields finite moments of the right length for every tensor."""
    g = dfmpc.load_model(os.path.join(LIGHT, f"light_{name}.onnx"))
    shapes = tensor_shapes(g)
    mo = propagate_moments(g)
    assert set(mo) == set(shapes) == set(g.inputs) | {t for n in g.nodes for t in n.outputs}
    for t, (m, v) in mo.items():
        assert m.shape == v.shape == (shapes[t][0],), t
        assert np.all(np.isfinite(m)) and np.all(np.isfinite(v)) and np.all(v >= 0), t


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_MODELS)
@pytest.mark.usefixtures("blocked_convs")
def test_light_model_shapes_match_the_engine(name):
    """The shape pass agrees with the engine's output shapes on the light topologies (one image)."""
    g = dfmpc.load_model(os.path.join(LIGHT, f"light_{name}.onnx"))
    shapes = tensor_shapes(g)
    x = np.zeros((1,) + shapes[g.inputs[0]], np.float32)
    names = [n.outputs[0] for n in g.nodes]
    got = run_many(g, x, names)
    assert all(shapes[t] == got[t].shape[1:] for t in names)
