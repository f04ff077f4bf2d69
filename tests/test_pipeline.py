"""Whole-network DF-MPC (pipeline.py) and the re-calibration modes (recalibration.py)."""

import numpy as np
import pytest
import scipy.integrate
from hypothesis import given, settings, strategies as st

import dfmpc
from dfmpc.engine.builders import resnet_cifar
from dfmpc.pipeline import quantize_network, quantize_weights
from dfmpc.recalibration import analytic_bn, bn_of, clipped_gaussian_moments, propagate_moments


def _params(g):
    return {(n, k): v.copy() for n, p in g.params().items() for k, v in p.items()}


@pytest.mark.parametrize("recalibration", ["absorb", "analytic", "data"])
def test_input_graph_never_mutated(net, images, recalibration):
    """quantize_network returns a new graph; every parameter of the input is unchanged."""
    before = _params(net)
    q, rep = quantize_network(net, recalibration=recalibration, calibration_data=images)
    after = _params(net)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert q is not net and rep.recalibration == recalibration


def test_weights_on_their_grids(net):
    """Low convs are ternary (3 values), high convs and unpaired layers DoReFa 6-bit (<= 64 values)."""
    q, rep = quantize_network(net, 2, 6, recalibration="absorb")
    for p in rep.pairs:
        assert len(np.unique(q.node(p.low).params["W"])) <= 3
        assert len(np.unique(q.node(p.high).params["W"])) <= 64
    for name in rep.unpaired:
        assert len(np.unique(q.node(name).params["W"])) <= 64


def test_compensated_graph_equals_next_layer_scaling_eq7(net, images):
    """Folding c into BN^l (what the pipeline does) equals scaling layer l+1's input channels (Eq. (7)), whole network."""
    q_none, _ = quantize_network(net, recalibration="absorb", compensation="none")
    q, rep = quantize_network(net, recalibration="absorb", compensation="dfmpc")
    updates = {}
    for p in rep.pairs:
        bn0, bn1 = q_none.node(p.low.replace("conv", "bn")).params, q.node(p.low.replace("conv", "bn")).params
        c = bn1["gamma"] / bn0["gamma"]                                  # the folded c, recovered
        np.testing.assert_allclose(bn1["beta"], c * bn0["beta"], rtol=1e-5, atol=1e-7)
        updates[p.high] = {"W": dfmpc.scale_input_channels(q_none.node(p.high).params["W"], c)}
    reference = q_none.with_params(updates)                              # hand-built: c in the next layer
    np.testing.assert_allclose(q.run(images), reference.run(images), rtol=1e-4, atol=1e-4)


def test_no_compensation_absorb_is_plain_fake_quant(net, images):
    """MP2/6 'without compensation' with absorb = every weight replaced by its dequantized value, BN untouched."""
    q, rep = quantize_network(net, recalibration="absorb", compensation="none")
    manual = net.with_params({n: {"W": quantize_weights(net.node(n).params["W"], 2 if n in {p.low for p in rep.pairs} else 6)}
                              for n in [x.name for x in net.nodes if x.op in ("Conv", "Gemm")]})
    np.testing.assert_array_equal(q.run(images), manual.run(images))
    assert all(p.c_min == p.c_max == 1.0 for p in rep.pairs)


def test_report_losses_follow_eq22(net):
    """The report's data-free loss never rises after compensation (c minimises Eq. (22))."""
    _, rep = quantize_network(net, recalibration="analytic")
    assert len(rep.pairs) == 9
    assert all(p.loss_after <= p.loss_before * (1 + 1e-9) for p in rep.pairs)
    assert "recalibration=analytic" in rep.summary()


def test_data_recalibration_matches_measured_statistics(net, images):
    """R.5, recalibration='data': each BN after a quantized conv holds the mean/var measured on the quantized network."""
    q, rep = quantize_network(net, recalibration="data", compensation="none", calibration_data=images)
    X = q.run(images, output="layers.4.conv2")
    np.testing.assert_allclose(q.node("layers.4.bn2").params["mean"], X.mean(axis=(0, 2, 3)), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(q.node("layers.4.bn2").params["var"], X.var(axis=(0, 2, 3)), rtol=1e-3, atol=1e-4)


@given(st.floats(-5, 5), st.floats(1e-4, 25), st.sampled_from([(0.0, np.inf), (0.0, 6.0), (-1.0, 2.0)]))
@settings(max_examples=60)
def test_clipped_gaussian_moments_match_quadrature(m, v, bounds):
    """R.2: rectified / clipped Gaussian moments equal numerical integration (scipy.integrate.quad, 1e-6)."""
    lo, hi = bounds
    s = np.sqrt(v)
    pdf = lambda x: np.exp(-0.5 * ((x - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))
    f = lambda x, p: np.clip(x, lo, hi) ** p * pdf(x)
    pts = [m - 12 * s, m + 12 * s]
    e1 = sum(scipy.integrate.quad(f, a, b, args=(1,), points=[c for c in (lo, hi) if a < c < b], limit=200)[0]
             for a, b in [(pts[0], m), (m, pts[1])])
    e2 = sum(scipy.integrate.quad(f, a, b, args=(2,), points=[c for c in (lo, hi) if a < c < b], limit=200)[0]
             for a, b in [(pts[0], m), (m, pts[1])])
    mean, var = clipped_gaussian_moments(np.array([m]), np.array([v]), lo, hi)
    assert mean[0] == pytest.approx(e1, abs=1e-6 * (1 + abs(e1)))
    assert var[0] == pytest.approx(e2 - e1**2, abs=1e-6 * (1 + e2))


def test_analytic_recalibration_is_identity_without_quantization_error(net):
    """R.3, R.4: W_q = W gives muhat = mu, varhat = var (no shift, ratio 1); a known mean shift is reproduced."""
    moments = propagate_moments(net)
    node = net.node("layers.2.conv1")
    bn = bn_of(net.node("layers.2.bn1"))
    W = node.params["W"].astype(float)
    same = analytic_bn(bn, W, W, 1, *moments[node.inputs[0]])
    np.testing.assert_allclose(same.mean, bn.mean, rtol=1e-12)
    np.testing.assert_allclose(same.var, bn.var, rtol=1e-9, atol=1e-12)
    W_shift = W + 0.01                                               # every weight +0.01
    m_in = moments[node.inputs[0]][0]
    shifted = analytic_bn(bn, W, W_shift, 1, *moments[node.inputs[0]])
    np.testing.assert_allclose(shifted.mean - bn.mean, 0.01 * 9 * m_in.sum(), rtol=1e-9)


def test_oracle_compensation_runs_on_whole_network(net, images):
    """compensation='oracle' (data-aware c, Eq. (9)) runs on the whole network and reports c >= 0."""
    q, rep = quantize_network(net, recalibration="absorb", compensation="oracle", calibration_data=images[:8])
    assert len(rep.pairs) == 9 and all(p.c_min >= 0 for p in rep.pairs)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(low_bits=1), ValueError, "low_bits: expected an integer bit-width in \\[2, 16\\]"),
    (dict(high_bits=17), ValueError, "high_bits"),
    (dict(recalibration="magic"), ValueError, "recalibration: expected one of"),
    (dict(compensation="maybe"), ValueError, "compensation: expected one of"),
    (dict(lambda1=-1.0), ValueError, "lambda1"),
    (dict(recalibration="data"), ValueError, "calibration_data: expected a non-empty float32"),
    (dict(compensation="oracle", calibration_data=np.zeros((2, 1, 28, 28))), ValueError, "calibration_data"),
])
def test_bad_arguments(net, kwargs, err, match):
    """Bits out of range, unknown modes, negative lambdas, missing calibration data: clear errors."""
    with pytest.raises(err, match=match):
        quantize_network(net, **kwargs)


def test_bad_graph_type():
    with pytest.raises(TypeError, match="graph: expected a dfmpc Graph"):
        quantize_network({"not": "a graph"})


def test_propagated_moments_match_measured_on_a_consistent_network():
    """R.1, R.2: on a conv-BN-ReLU-conv net whose BN statistics are measured on its own Gaussian input,
    the propagated moments of the second conv's input (post-ReLU) match the measured ones (5%)."""
    from dfmpc.engine import Graph, Node
    rng = np.random.default_rng(0)
    W1 = (rng.normal(size=(8, 3, 1, 1)) * 0.5).astype(np.float32)
    x = rng.normal(size=(4000, 3, 4, 4)).astype(np.float32)
    X1 = np.einsum("oi,nihw->nohw", W1[:, :, 0, 0], x)
    nodes = [Node("conv1", "Conv", ["x"], ["conv1"], {}, {"W": W1}),
             Node("bn1", "BatchNormalization", ["conv1"], ["bn1"], {"epsilon": 1e-5},
                  {"gamma": rng.uniform(0.5, 2, 8).astype(np.float32), "beta": rng.normal(size=8).astype(np.float32),
                   "mean": X1.mean(axis=(0, 2, 3)).astype(np.float32), "var": X1.var(axis=(0, 2, 3)).astype(np.float32)}),
             Node("relu1", "Relu", ["bn1"], ["relu1"]),
             Node("conv2", "Conv", ["relu1"], ["conv2"], {}, {"W": rng.normal(size=(4, 8, 1, 1)).astype(np.float32)})]
    g = Graph(nodes, ["x"], ["conv2"], {"x": (3, 4, 4)})
    m, v = propagate_moments(g)["relu1"]
    A = g.run(x, output="relu1")
    np.testing.assert_allclose(m, A.mean(axis=(0, 2, 3)), rtol=0.05, atol=0.02)
    np.testing.assert_allclose(v, A.var(axis=(0, 2, 3)), rtol=0.05, atol=0.02)


def test_weight_quantizer_hook_is_used_and_checked():
    """weight_quantizer replaces the TWN / DoReFa quantizer for every layer; a wrong shape or a non-callable is refused."""
    from dfmpc.engine.builders import resnet_cifar
    g = resnet_cifar(8, seed=7)
    seen = []

    def q(W, bits, name):
        seen.append((name, bits))
        return np.zeros_like(W)
    out, _ = dfmpc.quantize_network(g, 2, 6, weight_quantizer=q, compensation="none")
    assert {n for n, _ in seen} == {n.name for n in g.nodes if n.op in ("Conv", "Gemm")}
    assert all(not np.any(n.params["W"]) for n in out.nodes if n.op in ("Conv", "Gemm"))
    with pytest.raises(ValueError, match="weight_quantizer: returned shape"):
        dfmpc.quantize_network(g, weight_quantizer=lambda W, b, n: W[:1])
    with pytest.raises(TypeError, match="weight_quantizer"):
        dfmpc.quantize_network(g, weight_quantizer=3)


def test_report_keeps_c_as_folded_into_bn():
    """PairReport.c is the c folded into BN^l (F.a): gamma of the low layer's BN becomes c_j gamma_j."""
    g = resnet_cifar(8, seed=8)
    q, rep = quantize_network(g, 2, 6, recalibration="analytic")
    pairing = dfmpc.find_pairs(g)
    for p, r in zip(pairing.pairs, rep.pairs):
        c = np.asarray(r.c)
        assert r.low == p.low and c.shape == (g.node(p.bn).params["gamma"].size,)
        assert np.allclose(q.node(p.bn).params["gamma"], c * g.node(p.bn).params["gamma"], rtol=1e-5, atol=1e-7)
        assert c.min() == r.c_min and np.isclose(c.mean(), r.c_mean)


def test_pipeline_c_and_report_losses_are_eq27_and_eq22(net):
    """The pipeline's c is Eq. (27) (compensation_coefficients on the same W, W_q, BN), and its reported losses
    are sum_j L_j of Eq. (22) (data_free_loss) at c = 1 and at c, to 1e-9 relative."""
    from dfmpc.recalibration import bn_of
    _, rep = quantize_network(net, recalibration="absorb", compensation="dfmpc")
    for p in rep.pairs:
        W = net.node(p.low).params["W"]
        W_q = quantize_weights(W, 2)
        bn = bn_of(net.node(p.low.replace("conv", "bn")))
        c = dfmpc.compensation_coefficients(W, W_q, bn, bn)
        np.testing.assert_allclose(p.c, c, rtol=1e-12)
        for value, cc in ((p.loss_before, np.ones_like(c)), (p.loss_after, c)):
            L = float(np.sum(dfmpc.data_free_loss(cc, W, W_q, bn, bn)))
            assert abs(value - L) <= 1e-9 * max(L, 1.0)
