"""DFQ baseline (reference/dfmpc/baselines/dfq.py); labels refer to data_free_derivations/11_dfq.md."""

import doctest

import numpy as np
import pytest

import dfmpc.baselines.dfq as dfq_module
from dfmpc import Graph, Node
from dfmpc.baselines.common import layer_bits, quantize_layers, rtn_weights
from dfmpc.baselines.dfq import (absorb_high_bias, bias_correction, channel_ranges, cross_layer_equalize, dfq,
                                 dfq_objective, equalization_scales)
from dfmpc.engine.builders import resnet_cifar
from dfmpc.evaluation import load_zoo_model, zoo_manifest
from dfmpc.pairing import candidate_pairs
from dfmpc.reconstruction import conv2d

# Tolerances: float32 graphs are compared relative to max|output|; 1e-5 is ~100 float32 ulps of
# accumulated rounding through 20 layers (measured: <= 4e-7), far below any real change (>= 1e-2).
REL_TOL = 1e-5


# --------------------------------------------------------------------------- helpers
def _conv(name, x, W, pads=0, group=1, B=None):
    k = W.shape[2]
    params = {"W": W.astype(np.float32)}
    if B is not None:
        params["B"] = B.astype(np.float32)
    return Node(name, "Conv", [x], [name], {"kernel_shape": (k, k), "strides": (1, 1), "pads": (pads,) * 4,
                                            "dilations": (1, 1), "group": group}, params)


def _bn(name, x, rng, C, beta_loc=0.0):
    params = {"gamma": rng.uniform(0.5, 1.5, C), "beta": rng.normal(beta_loc, 0.3, C),
              "mean": rng.normal(0.0, 0.5, C), "var": rng.uniform(0.2, 2.0, C)}
    return Node(name, "BatchNormalization", [x], [name], {"epsilon": 1e-5},
                {k: v.astype(np.float32) for k, v in params.items()})


def _weights(rng, O, Cg, k):
    """He-normal weights with row and column scales spread over two decades (something to equalize)."""
    W = rng.normal(0, np.sqrt(2 / (Cg * k * k)), (O, Cg, k, k))
    return W * np.exp(rng.normal(0, 1.2, O))[:, None, None, None] * np.exp(rng.normal(0, 1.2, Cg))[None, :, None, None]


def vgg_like(seed=0):
    """conv0 -> BN -> ReLU -> MaxPool -> conv1 (group 2) -> BN -> ReLU -> conv2 (depthwise) -> BN -> ReLU
    -> conv3 (1x1, with bias) -> BN -> ReLU -> GAP -> Flatten -> Gemm: three CLE chains."""
    r = np.random.default_rng(seed)
    nodes = [_conv("conv0", "input", _weights(r, 8, 3, 3), pads=1), _bn("bn0", "conv0", r, 8),
             Node("relu0", "Relu", ["bn0"], ["relu0"]),
             Node("pool0", "MaxPool", ["relu0"], ["pool0"], {"kernel_shape": (2, 2), "strides": (2, 2)}),
             _conv("conv1", "pool0", _weights(r, 16, 4, 3), pads=1, group=2), _bn("bn1", "conv1", r, 16),
             Node("relu1", "Relu", ["bn1"], ["relu1"]),
             _conv("conv2", "relu1", _weights(r, 16, 1, 3), pads=1, group=16), _bn("bn2", "conv2", r, 16),
             Node("relu2", "Relu", ["bn2"], ["relu2"]),
             _conv("conv3", "relu2", _weights(r, 8, 16, 1), B=r.normal(0, 0.5, 8)), _bn("bn3", "conv3", r, 8),
             Node("relu3", "Relu", ["bn3"], ["relu3"]),
             Node("gap", "GlobalAveragePool", ["relu3"], ["gap"]), Node("flat", "Flatten", ["gap"], ["flat"], {"axis": 1}),
             Node("fc", "Gemm", ["flat"], ["logits"], {}, {"W": r.normal(0, 0.3, (5, 8)).astype(np.float32),
                                                          "B": np.zeros(5, np.float32)})]
    return Graph(nodes, ["input"], ["logits"], {"input": (3, 12, 12)}, name="vgg_like")


def two_conv(seed=0, pads_b=0, bn_after=False, C_in=4, C=6, O=5):
    """input -> conv0 (1x1) -> bn0 -> relu -> conv1 (3x3, pads_b) [-> bn1]: one chain."""
    r = np.random.default_rng(seed)
    nodes = [_conv("conv0", "input", _weights(r, C, C_in, 1)), _bn("bn0", "conv0", r, C),
             Node("relu", "Relu", ["bn0"], ["relu"]), _conv("conv1", "relu", _weights(r, O, C, 3), pads=pads_b)]
    out = "conv1"
    if bn_after:
        nodes.append(_bn("bn1", "conv1", r, O))
        out = "bn1"
    return Graph(nodes, ["input"], [out], {"input": (C_in, 10, 10)}, name="two_conv")


def _params(g):
    return {(n.name, k): v.copy() for n in g.nodes for k, v in n.params.items()} | \
           {(n.name, "attrs"): dict(n.attrs) for n in g.nodes}


def _same_params(a, b):
    return a.keys() == b.keys() and all(
        (a[k] == b[k]) if isinstance(a[k], dict) else np.array_equal(a[k], b[k]) for k in a)


def _rel_diff(g1, g2, x):
    y1, y2 = g1.run(x), g2.run(x)
    return float(np.abs(y1 - y2).max() / np.abs(y1).max())


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


# --------------------------------------------------------------------------- docstrings
def test_docstring_examples_hold():
    """The examples of dfq.py run and hold (each checks CLE.1, CLE.3, HBA.1 or BC.2 on a network).

    tests/test_doctests.py lists its modules explicitly and does not collect dfq.py, so it is run here."""
    result = doctest.testmod(dfq_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 10


# --------------------------------------------------------------------------- CLE
def test_equalization_scales_equalize_ranges_and_handle_zeros():
    """CLE.1: s_i = sqrt(r1_i / r2_i) makes r1_i / s_i == r2_i s_i == sqrt(r1_i r2_i); zero ranges give s_i = 1."""
    r = np.random.default_rng(0)
    r1, r2 = r.lognormal(0, 2, 50), r.lognormal(0, 2, 50)
    r1[:3], r2[3:6], r1[6], r2[6] = 0.0, 0.0, 0.0, 0.0
    s = equalization_scales(r1, r2)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    assert np.all(s[:7] == 1.0)
    np.testing.assert_allclose(r1[7:] / s[7:], np.sqrt(r1[7:] * r2[7:]), rtol=1e-12)
    np.testing.assert_allclose(r2[7:] * s[7:], np.sqrt(r1[7:] * r2[7:]), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_cle_keeps_resnet20_output_and_negative_control(seed):
    """CLE.2: the equalized ResNet-20 computes the same function (float32, max diff <= 1e-5 max|logit|);
    keeping the old BN parameters (no BN update) instead changes it by > 1e-3 max|logit| (100x the
    tolerance; the random He-normal net is nearly equalized already, so s is close to 1)."""
    g = resnet_cifar(20, seed=seed)
    ge, info = cross_layer_equalize(g)
    assert info["converged"] and info["equalized_chains"] == len(candidate_pairs(g)[0]) == 9
    x = _images(6, (1, 28, 28), seed)
    assert _rel_diff(g, ge, x) <= REL_TOL
    no_bn_update = ge.copy()
    for p in candidate_pairs(g)[0]:
        no_bn_update.node(p.bn).params = {k: v.copy() for k, v in g.node(p.bn).params.items()}
        no_bn_update.node(p.bn).attrs = dict(g.node(p.bn).attrs)
    assert _rel_diff(g, no_bn_update, x) > 1e-3


def test_cle_keeps_vgg_like_output_with_maxpool_grouped_and_depthwise_convs():
    """CLE.2 through MaxPool, a grouped conv B, a depthwise conv as B then as A, and a conv-A bias:
    same function to 1e-5 max|logit|; the BN updates are the exact ones (gamma, beta, mean / s,
    var + eps over s^2, epsilon 0); without the BN update (negative control) the output changes > 1e-2."""
    g = vgg_like(0)
    ge, info = cross_layer_equalize(g, iterations=200)
    assert info["equalized_chains"] == 3 and info["converged"] and info["skipped"] == []
    x = _images(8, (3, 12, 12))
    assert _rel_diff(g, ge, x) <= REL_TOL
    no_bn_update = ge.copy()
    for bn in ("bn0", "bn1", "bn2"):
        no_bn_update.node(bn).params = {k: v.copy() for k, v in g.node(bn).params.items()}
    assert _rel_diff(g, no_bn_update, x) > 1e-2
    s = info["scales"]["conv2->conv3"]
    assert np.max(np.abs(np.log(s))) > 0.5                       # something was actually equalized
    bn, bn_e = g.node("bn2").params, ge.node("bn2").params
    for k in ("gamma", "beta", "mean"):
        np.testing.assert_allclose(bn_e[k], bn[k].astype(float) / s, rtol=1e-6)
    np.testing.assert_allclose(bn_e["var"], (bn["var"].astype(float) + 1e-5) / s**2, rtol=1e-6)
    assert ge.node("bn2").attrs["epsilon"] == 0.0 and g.node("bn2").attrs["epsilon"] == 1e-5
    s3 = info["scales"]["conv1->conv2"]
    np.testing.assert_allclose(ge.node("conv2").params["W"],
                               g.node("conv2").params["W"].astype(float) * s3[:, None, None, None]
                               / s[:, None, None, None], rtol=1e-6)


def test_cle_bn_update_is_exact_in_float64():
    """CLE.2 in float64: BN'(x / s) == BN(x) / s for gamma', beta', mean' = ./s, var' = (var + eps)/s^2, eps' = 0."""
    r = np.random.default_rng(3)
    C = 7
    gamma, beta, mean, var, eps = r.uniform(.5, 2, C), r.normal(0, 1, C), r.normal(0, 1, C), r.uniform(1e-6, 2, C), 1e-3
    s = r.lognormal(0, 2, C)
    x = r.normal(0, 3, (100, C))
    bn = gamma * (x - mean) / np.sqrt(var + eps) + beta
    bn_new = (gamma / s) * (x / s - mean / s) / np.sqrt((var + eps) / s**2 + 0.0) + beta / s
    np.testing.assert_allclose(bn_new, bn / s, rtol=1e-12, atol=1e-12)
    keep_eps = (gamma / s) * (x / s - mean / s) / np.sqrt(var / s**2 + eps) + beta / s   # negative control
    assert np.max(np.abs(keep_eps - bn / s)) > 1e-3


def test_cle_two_conv_chain_ranges_equal_after_one_sweep_and_objective_is_maximal():
    """CLE.1, CLE.3 on one chain: after one sweep r1'_i == r2'_i == sqrt(r1_i r2_i) (rtol 1e-6, float32
    storage); DFQ's objective did not decrease and no random positive rescaling of the result beats it."""
    g = two_conv(1)
    p = candidate_pairs(g)[0][0]
    r1, r2 = channel_ranges(g, p)
    ge, info = cross_layer_equalize(g, iterations=1)
    e1, e2 = channel_ranges(ge, p)
    np.testing.assert_allclose(e1, e2, rtol=1e-6)
    np.testing.assert_allclose(e1, np.sqrt(r1 * r2), rtol=1e-6)
    best = dfq_objective(e1, e2)
    assert best >= dfq_objective(r1, r2) and best > dfq_objective(r1, r2) + 0.1
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = rng.lognormal(0, 1, e1.shape)
        assert dfq_objective(e1 / t, e2 * t) <= best + 1e-9
    ge2, info2 = cross_layer_equalize(g)
    assert info2["converged"] and info2["iterations"] == 2    # the second sweep finds s == 1


@pytest.mark.parametrize("make", [lambda: resnet_cifar(20, seed=2), lambda: vgg_like(1)], ids=["resnet20", "vgg_like"])
def test_cle_longer_chains_equal_ranges_after_convergence_objective_not_decreased(make):
    """CLE.1, CLE.3 with shared convs: after the sweeps converge (tol 1e-6) every chain has r1' == r2'
    (rtol 1e-5) and the sum of DFQ's objective over the chains did not decrease."""
    g = make()
    chains = candidate_pairs(g)[0]
    ge, info = cross_layer_equalize(g, iterations=300, tol=1e-6)
    assert info["converged"]
    for p in chains:
        e1, e2 = channel_ranges(ge, p)
        np.testing.assert_allclose(e1, e2, rtol=1e-5)
    before = sum(dfq_objective(*channel_ranges(g, p)) for p in chains)
    after = sum(dfq_objective(*channel_ranges(ge, p)) for p in chains)
    assert after >= before


# --------------------------------------------------------------------------- high-bias absorption
def _hba_case(pads_b):
    """A chain where every BN output is within 1 std of beta (|z| <= 1 < 3): HBA's assumption holds."""
    r = np.random.default_rng(5)
    W0 = r.normal(0, 1, (6, 3, 1, 1))
    nodes = [_conv("conv0", "input", W0),
             Node("bn0", "BatchNormalization", ["conv0"], ["bn0"], {"epsilon": 1e-5}, {
                 "gamma": r.uniform(0.5, 1.0, 6).astype(np.float32) * np.array([1, -1] * 3, np.float32),
                 "beta": np.linspace(1.0, 6.0, 6).astype(np.float32),
                 "mean": np.zeros(6, np.float32),
                 "var": (np.abs(W0).sum(axis=(1, 2, 3)) ** 2).astype(np.float32)}),   # |x| <= 1 => |z| <= 1
             Node("relu", "Relu", ["bn0"], ["relu"]),
             Node("pool", "MaxPool", ["relu"], ["pool"], {"kernel_shape": (2, 2), "strides": (2, 2)}),
             _conv("conv1", "pool", r.normal(0, 0.3, (4, 6, 3, 3)), pads=pads_b)]
    return Graph(nodes, ["input"], ["conv1"], {"input": (3, 12, 12)})


def test_high_bias_absorption_exact_when_assumptions_hold_and_beta_as_specified():
    """HBA.1, HBA.2: with every pre-activation >= c and no zero padding in conv B, absorbing
    c = max(0, beta - 3|gamma|) leaves the output unchanged (1e-5 max|output|), beta' = beta - c and
    conv B gets the bias sum_i sum_uv W_B[:, i] c_i; with padding in conv B (negative control) it changes."""
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, 12, 12)).astype(np.float32)
    g = _hba_case(0)
    ga = absorb_high_bias(g, n_sigma=3.0)
    gamma, beta = g.node("bn0").params["gamma"].astype(float), g.node("bn0").params["beta"].astype(float)
    c = np.maximum(0, beta - 3 * np.abs(gamma))
    assert np.sum(c > 0) >= 4 and np.any(c == 0)
    np.testing.assert_allclose(ga.node("bn0").params["beta"], beta - c, rtol=1e-6, atol=1e-6)
    WB = g.node("conv1").params["W"].astype(float)
    np.testing.assert_allclose(ga.node("conv1").params["B"], np.einsum("oiuv,i->o", WB, c), rtol=1e-5)
    assert "B" not in g.node("conv1").params                  # input untouched
    assert _rel_diff(g, ga, x) <= REL_TOL
    g_pad = _hba_case(1)
    assert _rel_diff(g_pad, absorb_high_bias(g_pad), x) > 1e-2


# --------------------------------------------------------------------------- bias correction
def _monte_carlo_errors(g_fp, g_q, N=3000, seed=0):
    """Per-image mean output error (N, O) of conv1 [+ bn1] on inputs drawn exactly from BC.1's model:
    x_i = ReLU(h_i), h_i ~ N(beta_i, gamma_i^2 var_i / (var_i + eps)) independent per channel and position."""
    bn = g_fp.node("bn0").params
    gamma, beta, var = (bn[k].astype(float) for k in ("gamma", "beta", "var"))
    std = np.abs(gamma) * np.sqrt(var / (var + g_fp.node("bn0").attrs["epsilon"]))
    r = np.random.default_rng(seed)
    x = np.maximum(r.normal(beta[None, :, None, None], std[None, :, None, None], (N, len(beta), 10, 10)), 0.0)

    def out(g):
        conv = g.node("conv1")
        y = conv2d(x, conv.params["W"].astype(float)) + conv.params.get("B", np.zeros(1)).astype(float)[None, :, None, None]
        if "bn1" in [n.name for n in g.nodes]:
            p = g.node("bn1").params
            a = p["gamma"].astype(float) / np.sqrt(p["var"].astype(float) + g.node("bn1").attrs["epsilon"])
            y = a[None, :, None, None] * (y - p["mean"].astype(float)[None, :, None, None]) \
                + p["beta"].astype(float)[None, :, None, None]
        return y
    return (out(g_q) - out(g_fp)).mean(axis=(2, 3))


@pytest.mark.parametrize("bn_after", [False, True], ids=["into_bias", "into_bn_mean"])
def test_bias_correction_zero_expected_error_monte_carlo(bn_after):
    """BC.1, BC.2 (bias correction): with inputs drawn from the BN-Gaussian model (rectified Gaussians,
    conv without padding), after correction the mean output error of every channel is within 4 standard
    errors of 0 (N = 3000 images); before it, some channel is > 20 standard errors away (negative control)."""
    g = two_conv(2, bn_after=bn_after)
    g_q = quantize_layers(g, {"conv0": 16, "conv1": 2}, lambda W, b, name: rtn_weights(W, b))
    g_q.node("conv0").params["W"] = g.node("conv0").params["W"].copy()   # only conv1 quantized
    g_c = bias_correction(g, g_q)
    before, after = _monte_carlo_errors(g, g_q), _monte_carlo_errors(g, g_c)
    se = lambda e: e.std(axis=0, ddof=1) / np.sqrt(len(e))
    assert np.all(np.abs(after.mean(axis=0)) <= 4 * se(after))
    assert np.max(np.abs(before.mean(axis=0)) / se(before)) > 20
    if bn_after:
        assert "B" not in g_c.node("conv1").params             # went into the BN mean
    else:
        assert "bn1" not in [n.name for n in g_c.nodes] and "B" in g_c.node("conv1").params


@pytest.mark.parametrize("bits", [2, 3])
def test_bias_correction_uses_the_actual_bit_width(bits):
    """BC.2 (bias correction) uses the actual quantized weights: the applied bias change equals
    sum (W_q - W) E[x] at `bits` (1e-5), and a correction computed from 8-bit weights would leave a mean
    error > 10 standard errors in the Monte Carlo check, while the applied one leaves <= 4."""
    g = two_conv(4)
    g_q = quantize_layers(g, {"conv0": 16, "conv1": bits}, lambda W, b, name: rtn_weights(W, b))
    g_q.node("conv0").params["W"] = g.node("conv0").params["W"].copy()
    g_c = bias_correction(g, g_q)
    from dfmpc.recalibration import propagate_moments
    m = propagate_moments(g)["relu"][0]
    W = g.node("conv1").params["W"].astype(float)
    eps_actual = np.einsum("oiuv,i->o", g_q.node("conv1").params["W"].astype(float) - W, m)
    eps_8bit = np.einsum("oiuv,i->o", rtn_weights(W, 8).astype(float) - W, m)
    np.testing.assert_allclose(-g_c.node("conv1").params["B"].astype(float), eps_actual, atol=1e-5)
    err = _monte_carlo_errors(g, g_q, seed=1)                       # uncorrected error per image
    se = err.std(axis=0, ddof=1) / np.sqrt(len(err))
    assert np.all(np.abs(err.mean(axis=0) - eps_actual) <= 4 * se)
    assert np.max(np.abs(err.mean(axis=0) - eps_8bit) / se) > 10


def test_bias_correction_identity_without_quantization():
    """BC.2 (bias correction) with W_q == W changes nothing."""
    g = resnet_cifar(8, seed=0)
    assert _same_params(_params(bias_correction(g, g.copy())), _params(g))


# --------------------------------------------------------------------------- whole method, zoo
@pytest.mark.parametrize("name", sorted(zoo_manifest()))
def test_dfq_on_every_zoo_model_without_mutating_it(name):
    """CLE.2 on the zoo: dfq runs, never mutates the input, keeps DF-MPC's bit assignment; CLE keeps the
    FP32 output (8 images, 1e-5 max|logit|); ReLU6 chains (mobilenetv2_small) are skipped with the reason."""
    g = load_zoo_model(name)
    before = _params(g)
    gq, info = dfq(g, 2, 6)
    ge, cle = cross_layer_equalize(g)
    assert _same_params(_params(g), before)
    assert info["method"] == "dfq" and info["bits"] == layer_bits(g, 2, 6)[1]
    x = _images(8, (1, 28, 28))
    y = gq.run(x)
    assert y.shape == (8, 10) and np.all(np.isfinite(y))
    assert _rel_diff(g, ge, x) <= REL_TOL
    cands, rejected = candidate_pairs(g)
    assert info["equalized_chains"] == len(cands) and len(info["skipped"]) == len(rejected)
    if rejected:
        assert all("Clip" in why for _, why in info["skipped"])
    else:
        assert info["equalized_chains"] > 0 and info["converged"]
    assert len(info["bias_corrected"]) == len(info["bits"]) and info["uncorrected"] == []


def test_dfq_without_cle_and_correction_is_plain_rtn():
    """With equalize=False and correct_bias=False dfq is the per-tensor RTN at the same bits (CLE.1 off),
    so dfq minus rtn is what DFQ adds; with both on the weights differ."""
    g = resnet_cifar(8, seed=1)
    gq, info = dfq(g, 2, 6, equalize=False, correct_bias=False)
    ref = quantize_layers(g, layer_bits(g, 2, 6)[1], lambda W, b, name: rtn_weights(W, b, per_channel=False))
    assert _same_params(_params(gq), _params(ref))
    gq2, _ = dfq(g, 2, 6, absorb_bias=True)
    assert not np.array_equal(gq2.node("layers.0.conv1").params["W"], ref.node("layers.0.conv1").params["W"])


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_argument():
    """Bad input fails with a TypeError / ValueError naming the argument (CLE.1 inputs and the rest)."""
    g = resnet_cifar(8, seed=0)
    cases = [
        (lambda: equalization_scales([1, 2], [1, 2, 3]), ValueError, "r1, r2"),
        (lambda: equalization_scales([1, -2], [1, 2]), ValueError, "r1"),
        (lambda: equalization_scales([1, np.nan], [1, 2]), ValueError, "r1"),
        (lambda: equalization_scales([[1.0]], [[1.0]]), ValueError, "r1"),
        (lambda: cross_layer_equalize("g"), TypeError, "graph"),
        (lambda: cross_layer_equalize(g, iterations=0), ValueError, "iterations"),
        (lambda: cross_layer_equalize(g, iterations=1.5), TypeError, "iterations"),
        (lambda: cross_layer_equalize(g, tol=-1.0), ValueError, "tol"),
        (lambda: absorb_high_bias(g, n_sigma=-1.0), ValueError, "n_sigma"),
        (lambda: absorb_high_bias(None), TypeError, "graph"),
        (lambda: bias_correction(g, "q"), TypeError, "graph_q"),
        (lambda: bias_correction(g, resnet_cifar(14, seed=0)), ValueError, "graph_q"),
        (lambda: bias_correction(g, g, input_var=-1.0), ValueError, "input_var"),
        (lambda: dfq(g, 1, 6), ValueError, "low_bits"),
        (lambda: dfq(g, 2, 6, correct_bias="yes"), TypeError, "correct_bias"),
        (lambda: dfq([], 2, 6), TypeError, "graph"),
    ]
    for call, exc, word in cases:
        with pytest.raises(exc, match=word):
            call()
