"""DF-MPC pairs through ReLU6 / Clip: c applied by the paper's Eq. (7) on the high conv (derivation 17).

Float64 for the math checks (tolerances 1e-12 relative, from a few dozen products of O(1) numbers),
float32 for the engine (1e-5 relative to the largest output: one conv's worth of reordered sums).
Each check that could be vacuous has a negative control.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dfmpc
from dfmpc.compensation import fold_into_bn, scale_input_channels
from dfmpc.engine import Graph, Node
from dfmpc.engine.builders import _Builder, resnet_cifar
from dfmpc.pairing import candidate_pairs, find_pairs, positively_homogeneous
from dfmpc.pipeline import quantize_network, quantize_weights
from strategies import random_bn, seeds, uniform_arrays

relu = lambda x: np.maximum(x, 0.0)
relu6 = lambda x: np.clip(x, 0.0, 6.0)
ACTS = {"relu": relu, "relu6": relu6, "clip(-1, 2)": lambda x: np.clip(x, -1.0, 2.0), "identity": lambda x: x}


def _c(rng, C):
    """c >= 0 with exact zeros, ones and values on both sides of 1."""
    c = rng.uniform(0.0, 2.5, C)
    c[rng.uniform(size=C) < 0.15] = 0.0
    c[rng.uniform(size=C) < 0.15] = 1.0
    return c


# ------------------------------------------------------------------------------- E.1, H.1: the two forms

@settings(max_examples=60)
@given(seeds, st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.sampled_from([1, 3]),
       st.sampled_from(["dense", "grouped", "depthwise"]), st.sampled_from(sorted(ACTS)))
def test_eq7_equals_scaling_the_activation_output_e1(seed, N, C, mult, k, kind, act):
    """E.1 / Eq. (7): W~ = scale_input_channels(W, c, group) convolved with act(z) equals W convolved with
    c_j act(z)_j, for every activation (ReLU, ReLU6, a clip with a negative bound, identity), dense, grouped
    and depthwise convs, c >= 0 with zeros (float64, 1e-12 relative)."""
    rng = np.random.default_rng(seed)
    group = {"dense": 1, "depthwise": C, "grouped": next(d for d in (3, 2, 1) if C % d == 0)}[kind]
    O = group * mult
    W = rng.normal(size=(O, C // group, k, k))
    z = rng.normal(size=(N, C, 5, 5)) * 8.0                      # |z| up to ~30: the clips are active
    c = _c(rng, C)
    A = ACTS[act](z)
    lhs = dfmpc.conv2d(A, scale_input_channels(W, c, group), padding=k // 2, groups=group)
    rhs = dfmpc.conv2d(c[None, :, None, None] * A, W, padding=k // 2, groups=group)
    assert np.allclose(lhs, rhs, rtol=1e-12, atol=1e-12 * np.abs(rhs).max())


def test_eq7_grouped_negative_control_e1():
    """E.1 negative control: ignoring the groups (scaling W[:, i] by c_i, the dense rule) is wrong for a
    depthwise conv, so the grouped index is what makes Eq. (7) exact there."""
    rng = np.random.default_rng(0)
    C = 4
    W, c = rng.normal(size=(C, 1, 3, 3)), np.array([0.5, 1.0, 2.0, 0.0])
    A = relu6(rng.normal(size=(2, C, 5, 5)) * 8.0)
    rhs = dfmpc.conv2d(c[None, :, None, None] * A, W, padding=1, groups=C)
    dense_rule = W * c[0]                                       # the (O, 1) weights all read "input column 0"
    assert not np.allclose(dfmpc.conv2d(A, dense_rule, padding=1, groups=C), rhs)
    assert np.allclose(dfmpc.conv2d(A, scale_input_channels(W, c, C), padding=1, groups=C), rhs)


@settings(max_examples=40)
@given(seeds, st.integers(1, 6))
def test_fold_equals_eq7_through_relu_h1(seed, C):
    """H.1 / F.a: through a ReLU, folding c into BN^l equals Eq. (7) on layer l+1 (float64, 1e-12 relative)."""
    rng = np.random.default_rng(seed)
    bn, c = random_bn(rng, C), _c(rng, C)
    x, W = rng.normal(size=(2, C, 5, 5)) * 3.0, rng.normal(size=(3, C, 3, 3))
    folded = dfmpc.conv2d(relu(fold_into_bn(bn, c)(x)), W, padding=1)
    eq7 = dfmpc.conv2d(relu(bn(x)), scale_input_channels(W, c), padding=1)
    assert np.allclose(folded, eq7, rtol=1e-12, atol=1e-12 * np.abs(eq7).max())


@settings(max_examples=40)
@given(seeds, st.integers(1, 6))
def test_fold_through_relu6_is_not_eq7_negative_control_h1(seed, C):
    """H.1 negative control: through ReLU6 the fold differs from Eq. (7) as soon as some c_j != 1 meets a
    pre-activation above the clip level 6 min(1, c_j) (here forced: BN outputs of size ~10 and c_0 = 2)."""
    rng = np.random.default_rng(seed)
    bn, c = random_bn(rng, C), _c(rng, C)
    c[0] = 2.0
    x, W = rng.normal(size=(2, C, 5, 5)) * 30.0, rng.normal(size=(3, C, 3, 3))
    folded = relu6(fold_into_bn(bn, c)(x))
    eq7 = c[None, :, None, None] * relu6(bn(x))
    clipping = (c[None, :, None, None] * bn(x) > 6.0 * np.minimum(1.0, c)[None, :, None, None]) & (c != 1)[None, :, None, None]
    assert clipping.any()
    assert np.abs(folded - eq7)[clipping].max() > 1e-3          # where the clip acts, the two forms disagree
    assert np.allclose(folded[~clipping], eq7[~clipping], rtol=1e-12, atol=1e-12)   # and nowhere else


def test_positively_homogeneous_classifies_clips_h1():
    """H.1: Clip(lo, hi) is positively homogeneous exactly when each bound is 0 or missing; the classifier
    agrees with f(c x) = c f(x) checked numerically (ReLU6 and Clip(-1, 2) fail it, ReLU passes)."""
    x = np.linspace(-20, 20, 401)
    for attrs, expected in [({"min": 0.0, "max": 6.0}, False), ({"min": 0.0, "max": None}, True),
                            ({"min": None, "max": None}, True), ({"min": -1.0, "max": 2.0}, False),
                            ({"min": 0.0, "max": float("inf")}, True), ({"min": None, "max": 0.0}, True)]:
        lo, hi = attrs["min"], attrs["max"]
        f = lambda v: np.clip(v, -np.inf if lo is None else lo, np.inf if hi is None else hi)
        numeric = all(np.allclose(f(c * x), c * f(x)) for c in (0.0, 0.5, 2.0))
        assert positively_homogeneous(Node("a", "Clip", ["x"], ["y"], attrs)) is expected is numeric, attrs
    assert positively_homogeneous(Node("a", "Relu", ["x"], ["y"]))


# ------------------------------------------------------------------------------- C.1-C.3: Lemma 2 through a clip

@given(st.data(), st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple), st.floats(0.0, 20.0),
       st.sampled_from([(0.0, 6.0), (-1.0, 2.0), (0.0, 1.0)]))
def test_lemma2_through_a_clip_holds_with_the_clip_term_c1(data, shape, c, bounds):
    """C.1: for c >= 0, |c clip(a) - clip(b)| <= max(|c a - b|, |c - 1| M), M = max(|lo|, |hi|)
    (a, b in [-30, 30] with zeros, ties, one sign and the end points; float slack 1e-12 relative)."""
    lo, hi = bounds
    a, b = data.draw(uniform_arrays(shape, -30.0, 30.0)), data.draw(uniform_arrays(shape, -30.0, 30.0))
    clip = lambda v: np.clip(v, lo, hi)
    lhs = np.abs(c * clip(a) - clip(b))
    rhs = np.maximum(np.abs(c * a - b), abs(c - 1.0) * max(abs(lo), abs(hi)))
    assert np.all(lhs <= rhs + 1e-12 * (1.0 + np.abs(c * a) + np.abs(b)))


def test_lemma2_as_stated_fails_through_relu6_negative_control_c1():
    """C.1 negative control: Lemma 2 as stated, |c ReLU6(a) - ReLU6(b)| <= |c a - b|, is false through ReLU6
    (c = 2, a = 6, b = 12: 6 > 0), and on random points the clip term is needed for a sizeable share."""
    assert abs(2 * relu6(6.0) - relu6(12.0)) > abs(2 * 6.0 - 12.0)
    rng = np.random.default_rng(0)
    a = rng.normal(size=10_000) * 6.0
    b = 1.3 * a + rng.normal(size=10_000)
    assert np.mean(np.abs(1.3 * relu6(a) - relu6(b)) > np.abs(1.3 * a - b) + 1e-12) > 0.05


@given(st.data(), st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple), st.floats(0.0, 20.0))
def test_lemma2_as_stated_holds_below_the_clip_c3(data, shape, c):
    """C.3: where neither pre-activation exceeds the clip level (a, b <= 6), Lemma 2 holds as stated through
    ReLU6: |c ReLU6(a) - ReLU6(b)| <= |c a - b| for every c >= 0."""
    a, b = data.draw(uniform_arrays(shape, -30.0, 6.0)), data.draw(uniform_arrays(shape, -30.0, 6.0))
    lhs = np.abs(c * relu6(a) - relu6(b))
    assert np.all(lhs <= np.abs(c * a - b) + 1e-12 * (1.0 + np.abs(c * a) + np.abs(b)))


@settings(max_examples=30)
@given(seeds, st.integers(1, 6), st.sampled_from([1, 3]))
def test_per_channel_bound_through_relu6_c2(seed, C, k):
    """C.2: for a conv -> BN -> ReLU6 layer and its quantized twin, ||c_j A~_j - A_j||^2 <=
    ||Gamma_j * A^{l-1} + Theta_j||^2 + M^2 (c_j - 1)^2 P_j, with P_j the positions where a clip acts
    (computed, float64), for the closed-form c of Eq. (27) and for random c >= 0."""
    rng = np.random.default_rng(seed)
    I = 3
    W = rng.normal(size=(C, I, k, k))
    W_hat, alpha, _ = dfmpc.ternary(W)
    bn = random_bn(rng, C)
    bn_hat = dfmpc.absorb_scale(bn, alpha) if alpha > 0 else bn
    x = relu(rng.normal(size=(2, I, 6, 6)) * 4.0)
    b = bn(dfmpc.conv2d(x, W, padding=k // 2))                  # full-precision pre-activation
    a = bn_hat(dfmpc.conv2d(x, W_hat, padding=k // 2))          # quantized pre-activation
    for c in (dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat, 0.5, 0.0), _c(rng, C)):
        cc = c[None, :, None, None]
        err = np.sum((cc * relu6(a) - relu6(b)) ** 2, axis=(0, 2, 3))
        lin = np.sum((cc * a - b) ** 2, axis=(0, 2, 3))         # = ||Gamma_j * A + Theta_j||^2 (BN is affine)
        active = np.sum((a > 6.0) | (b > 6.0), axis=(0, 2, 3))   # C.3: elsewhere Lemma 2 holds as stated
        assert np.all(err <= lin + 36.0 * (c - 1.0) ** 2 * active + 1e-9 * (1.0 + lin))


# ------------------------------------------------------------------------------- pairing

def _inverted_residual_net(seed=0, act="Clip"):
    """stem conv-BN-act, then expand 1x1 -> BN -> act -> depthwise 3x3 -> BN -> act -> project 1x1 -> BN,
    then conv-BN-ReLU -> conv-BN-ReLU (a ReLU pair), GAP, FC: MobileNetV2's pattern with one ReLU chain."""
    b = _Builder(seed)
    kw = {"min": 0.0, "max": 6.0} if act == "Clip" else {}
    t = b.op("a0", act, [b.bn("bn0", b.conv("stem", "x", 3, 16, 3), 16)], **kw)
    t = b.op("a1", act, [b.bn("bn1", b.conv("expand", t, 16, 48, 1), 48)], **kw)     # 768 weights
    t = b.op("a2", act, [b.bn("bn2", b.conv("dw", t, 48, 48, 3, groups=48), 48)], **kw)   # 432 weights
    t = b.bn("bn3", b.conv("project", t, 48, 16, 1), 16)
    t = b.op("r4", "Relu", [b.bn("bn4", b.conv("c4", t, 16, 16, 3), 16)])
    t = b.op("r5", "Relu", [b.bn("bn5", b.conv("c5", t, 16, 16, 3), 16)])
    t = b.linear("fc", b.op("fl", "Flatten", [b.op("gap", "GlobalAveragePool", [t])], axis=1), 16, 10)
    for n in b.nodes:                                 # BN outputs of size ~10: ReLU6 clips a real share
        if n.op == "BatchNormalization":
            n.params["beta"] = (n.params["beta"] + 3.0).astype(np.float32)
            n.params["gamma"] = (n.params["gamma"] * 4.0).astype(np.float32)
    return Graph(b.nodes, inputs=["x"], outputs=[t], input_shapes={"x": (3, 8, 8)})


def test_pairs_through_relu6_use_eq7_and_relu_pairs_fold_h1():
    """H.1 in the pairing: the expand -> depthwise chain through ReLU6 is a pair of form 'eq7' (the 1x1 has
    more weights than the depthwise, so it is the low one), the ReLU chain a pair of form 'fold'; the
    description names the Eq. (7) form."""
    g = _inverted_residual_net()
    p = find_pairs(g)
    assert [(q.low, q.high, q.form) for q in p.pairs] == [("expand", "dw", "eq7"), ("c4", "c5", "fold")]
    assert "Eq. (7)" in p.describe(2, 6) and p.rejected == []


def test_candidate_pairs_still_refuses_clip_by_default_h1():
    """H.1: without through_clip (DFQ's equalisation, which moves a scale into the activation's input)
    ReLU6 chains are rejected with the reason, and find_pairs(through_clip=False) is the old pairing."""
    g = _inverted_residual_net()
    cands, rejected = candidate_pairs(g)
    assert [(q.low, q.high) for q in cands] == [("c4", "c5")]
    assert {name for name, _ in rejected} == {"stem", "expand", "dw"}
    assert all("not positively homogeneous" in why for _, why in rejected)
    p = find_pairs(g, through_clip=False)
    assert [(q.low, q.high) for q in p.pairs] == [("c4", "c5")] and len(p.rejected) == 3


# ------------------------------------------------------------------------------- the pipeline

def test_pipeline_applies_c_by_eq7_on_the_high_conv_e1():
    """E.1 in the pipeline (absorb, so BN statistics stay the trained ones): for the ReLU6 pair the high conv
    holds scale_input_channels(kQ(W), c, group) with c from the report and BN^A is unchanged; for the ReLU pair
    c is folded into BN^A and its high conv stays on its grid; the report names each form."""
    g = _inverted_residual_net()
    q, rep = quantize_network(g, 2, 6, recalibration="absorb")
    by_low = {r.low: r for r in rep.pairs}
    assert {lo: r.form for lo, r in by_low.items()} == {"expand": "eq7", "c4": "fold"}
    c = np.array(by_low["expand"].c)
    assert not np.allclose(c, 1.0)
    want = scale_input_channels(quantize_weights(g.node("dw").params["W"], 6), c, 48).astype(np.float32)
    assert np.array_equal(q.node("dw").params["W"], want)
    for k in ("gamma", "beta", "mean", "var"):
        assert np.array_equal(q.node("bn1").params[k], g.node("bn1").params[k])
    c4 = np.array(by_low["c4"].c)
    assert np.allclose(q.node("bn4").params["gamma"], c4 * g.node("bn4").params["gamma"], rtol=1e-6)
    assert np.array_equal(q.node("c5").params["W"], quantize_weights(g.node("c5").params["W"], 6))
    assert "Eq. (7)" in rep.summary()


def test_eq7_network_equals_c_after_the_clip_e1():
    """E.1 on the whole quantized network: the network with c in the depthwise weights computes the same as
    the plain-grid network with an explicit per-channel Mul by c after the ReLU6 (float32, 1e-5 of the largest
    logit); negative control: the same network with c folded into BN^A before the ReLU6 does not."""
    g = _inverted_residual_net()
    q, rep = quantize_network(g, 2, 6, recalibration="absorb")
    c = np.array(next(r.c for r in rep.pairs if r.form == "eq7"), np.float32)
    plain = q.copy()
    plain.node("dw").params["W"] = quantize_weights(g.node("dw").params["W"], 6)
    nodes, mul = [], Node("mul_c", "Mul", ["a1"], ["a1c"], {}, {"constant": c.reshape(1, -1, 1, 1)})
    for n in plain.copy().nodes:
        if n.name == "dw":
            n.inputs = ["a1c"]
            nodes.append(mul)
        nodes.append(n)
    explicit = Graph(nodes, plain.inputs, plain.outputs, plain.input_shapes)
    x = np.random.default_rng(1).normal(size=(8, 3, 8, 8)).astype(np.float32)
    y, y_explicit = q.run(x), explicit.run(x)
    assert np.abs(y - y_explicit).max() <= 1e-5 * np.abs(y).max()
    folded = plain.copy()                                    # c folded into BN^A, then ReLU6: not the same
    bn = dfmpc.recalibration.bn_of(folded.node("bn1"))
    dfmpc.pipeline.write_bn(folded, "bn1", fold_into_bn(bn, c))
    assert np.abs(folded.run(x) - y).max() > 1e-3 * np.abs(y).max()


@pytest.mark.parametrize("recalibration", ["absorb", "analytic", "sequential", "data"])
def test_eq7_everywhere_equals_folding_through_relu_f_a(recalibration):
    """F.a / E.1: on a ReLU network (ResNet-8), c_form='eq7' (c on every high conv's input channels) gives the
    same network as the default fold into BN^A, in every re-calibration mode (float32, 1e-4 of the largest
    logit: re-calibration re-measures statistics through slightly different rounding), and the same c."""
    g = resnet_cifar(8, image_size=12)
    x = np.random.default_rng(2).normal(size=(16, 1, 12, 12)).astype(np.float32)
    kw = dict(recalibration=recalibration, probes=x, calibration_data=x)
    q_fold, r_fold = quantize_network(g, 2, 6, **kw)
    q_eq7, r_eq7 = quantize_network(g, 2, 6, c_form="eq7", **kw)
    assert {p.form for p in r_fold.pairs} == {"fold"} and {p.form for p in r_eq7.pairs} == {"eq7"}
    assert np.allclose(np.concatenate([p.c for p in r_fold.pairs]), np.concatenate([p.c for p in r_eq7.pairs]),
                       rtol=1e-4, atol=1e-6)
    y_fold, y_eq7 = q_fold.run(x), q_eq7.run(x)
    assert np.abs(y_fold - y_eq7).max() <= 1e-4 * np.abs(y_fold).max()
    assert any(not np.array_equal(q_fold.node(p.high).params["W"], q_eq7.node(p.high).params["W"])
               for p in r_eq7.pairs)                         # the forms really differ in where c is stored


def test_bad_c_form_and_oracle_through_clip_refused():
    """c_form must be one of C_FORMS; the oracle c (verification code modelling ReLU) refuses a ReLU6 pair,
    naming it."""
    g = _inverted_residual_net()
    with pytest.raises(ValueError, match="c_form: expected one of"):
        quantize_network(g, 2, 6, recalibration="absorb", c_form="fold-everywhere")
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="expand -> dw has activation Clip"):
        quantize_network(g, 2, 6, recalibration="absorb", compensation="oracle", calibration_data=x)


# ------------------------------------------------------------------------------- the zoo MobileNetV2

@pytest.mark.slow
def test_zoo_mobilenet_pairs_grid_and_onnxruntime_e1(tmp_path):
    """E.1 on the trained mobilenetv2_small at MP2/6 (default re-calibration on 32 noise probes, to bound the time):
    8 ReLU6 pairs of form 'eq7' with c != 1; each high conv holds its 6-bit DoReFa grid times c on its input
    channels (W~_{:,j} / c_j = kQ(W)_{:,j}, float32 rounding; negative control: W~ itself is off that grid);
    the saved ONNX model gives the engine's top-1 on 256 shipped test images in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    from dfmpc.evaluation import load_dataset, load_zoo_model
    g = load_zoo_model("mobilenetv2_small")
    q, rep = quantize_network(g, 2, 6, probes="noise", probe_images=32)
    assert len(rep.pairs) == 8 and {p.form for p in rep.pairs} == {"eq7"}
    for p in rep.pairs:
        c, B = np.array(p.c), q.node(p.high)
        assert np.abs(c - 1).max() > 0.05
        grid = quantize_weights(g.node(p.high).params["W"], 6)
        group = B.attrs.get("group", 1)
        assert np.allclose(B.params["W"], scale_input_channels(grid, c, group), rtol=1e-6, atol=0)
        assert not np.allclose(B.params["W"], grid, rtol=1e-3, atol=0)
    path = tmp_path / "mnv2_mp26.onnx"
    dfmpc.save_model(q, path)
    x = load_dataset("fashion-mnist")[0][:256]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, ref = sess.run(None, {q.inputs[0]: x})[0], q.run(x)
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


# ------------------------------------------------------------------------------- L.1: through a LeakyReLU

def leaky(v, alpha):
    return np.where(v >= 0, v, alpha * v)


@given(st.data(), st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple), st.floats(0.0, 20.0),
       st.floats(-1.0, 1.0))
def test_lemma2_holds_through_a_leaky_relu_l1(data, shape, c, alpha):
    """L.1: for |alpha| <= 1 and c >= 0, |c f(a) - f(b)| <= |c a - b| with f = LeakyRelu(alpha) (a, b in
    [-30, 30] with zeros, ties, one sign and the end points; float slack 1e-12 relative), and f(c a) = c f(a)."""
    a, b = data.draw(uniform_arrays(shape, -30.0, 30.0)), data.draw(uniform_arrays(shape, -30.0, 30.0))
    lhs = np.abs(c * leaky(a, alpha) - leaky(b, alpha))
    assert np.all(lhs <= np.abs(c * a - b) + 1e-12 * (1.0 + np.abs(c * a) + np.abs(b)))
    np.testing.assert_allclose(leaky(c * a, alpha), c * leaky(a, alpha), rtol=1e-12, atol=1e-12)


def test_lemma2_fails_through_a_steep_leaky_relu_negative_control_l1():
    """L.1 negative control: with alpha = 3 (not 1-Lipschitz) the bound fails (c = 1, a = -1, b = -2: 3 > 1),
    and on random points for a sizeable share."""
    assert abs(leaky(-1.0, 3.0) - leaky(-2.0, 3.0)) > abs(-1.0 - -2.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=10_000), rng.normal(size=10_000)
    assert np.mean(np.abs(0.8 * leaky(a, 3.0) - leaky(b, 3.0)) > np.abs(0.8 * a - b) + 1e-12) > 0.1


def _leaky_net(alpha, seed=0):
    """conv-BN-LeakyRelu -> conv-BN-LeakyRelu -> conv-BN-LeakyRelu -> GAP -> FC (two candidate pairs)."""
    b = _Builder(seed)
    t = "x"
    for i, (c, o) in enumerate([(3, 16), (16, 16), (16, 16)]):
        t = b.op(f"a{i}", "LeakyRelu", [b.bn(f"bn{i}", b.conv(f"c{i}", t, c, o, 3), o)], alpha=alpha)
    t = b.linear("fc", b.op("fl", "Flatten", [b.op("gap", "GlobalAveragePool", [t])], axis=1), 16, 10)
    return Graph(b.nodes, inputs=["x"], outputs=[t], input_shapes={"x": (3, 8, 8)})


def test_pairs_fold_through_leaky_relu_and_refuse_alpha_above_one_l1():
    """L.1 / H.1 in the pairing: LeakyRelu is positively homogeneous for any alpha (numerically checked), so
    its chains pair with c folded into BN^l; with |alpha| > 1 they do not pair, and the reason names L.1."""
    x = np.linspace(-20, 20, 401)
    for alpha in (0.01, 0.2, 1.0, 3.0):
        node = Node("a", "LeakyRelu", ["x"], ["y"], {"alpha": alpha})
        assert positively_homogeneous(node) and all(np.allclose(leaky(c * x, alpha), c * leaky(x, alpha))
                                                    for c in (0.0, 0.5, 2.0))
    p = find_pairs(_leaky_net(0.1))
    assert [(q.low, q.high, q.form) for q in p.pairs] == [("c1", "c2", "fold")]
    steep = find_pairs(_leaky_net(3.0))
    assert steep.pairs == [] and "L.1" in steep.why_unpaired["c1"] and "|alpha| > 1" in steep.why_unpaired["c1"]


@pytest.mark.parametrize("recalibration", ["absorb", "analytic", "sequential", "data"])
def test_leaky_relu_graph_quantizes_and_runs_in_onnxruntime_l1(recalibration, tmp_path):
    """L.1 end to end: a LeakyRelu network quantizes in every re-calibration mode (the default's probes are
    distilled through V.13; analytic uses M.14), c is folded into BN^l (the high conv stays on its grid), and
    the saved ONNX model gives our engine's outputs in onnxruntime (1e-4 relative)."""
    import onnx
    from _onnx_helpers import ort_run
    g = _leaky_net(0.1)
    x = np.random.default_rng(3).normal(size=(16, 3, 8, 8)).astype(np.float32)
    q, rep = quantize_network(g, 2, 6, recalibration=recalibration, calibration_data=x, probe_iterations=20)
    assert [(p.low, p.high, p.form) for p in rep.pairs] == [("c1", "c2", "fold")]
    assert len(np.unique(q.node("c1").params["W"])) <= 3
    path = tmp_path / "leaky.onnx"
    dfmpc.save_model(q, path)
    ref, got = q.run(x), ort_run(onnx.load(str(path)), {"x": x})[0]
    assert np.all(np.isfinite(got)) and float(np.abs(got - ref).max() / np.abs(ref).max()) < 1e-4
