"""dfmpc.recalibrate_bn: the re-calibration of one conv -> BN on arrays (issue 14 item 5).

Checked against what :func:`dfmpc.quantize_network` computes at every site of a ResNet-20 (through the
Site-level modes of :mod:`dfmpc.recalibration`), and by properties of the formulas it implements:
(S.1)-(S.2) of derivation 15 (``sequential``), (R.3)-(R.5) of derivation 10 (``analytic``, ``data``),
(Q.1) of derivation 01 (``absorb``).
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dfmpc
import dfmpc.pair_recalibration
from dfmpc import recalibration as R
from dfmpc.pipeline import recalibration_sites
from strategies import batchnorms, random_bn, seeds

MODES = ("sequential", "analytic", "absorb", "data")


def test_docstring_example_checks_s1_s2_and_r5():
    result = doctest.testmod(dfmpc.pair_recalibration, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 10


def test_exported_at_the_top_level_and_modes_match_the_pipeline():
    assert dfmpc.recalibrate_bn is dfmpc.pair_recalibration.recalibrate_bn
    assert "recalibrate_bn" in dfmpc.__all__
    assert set(MODES) == set(R.RECALIBRATIONS) == set(R.RECALIBRATION_MODES)


# ------------------------------------------------------------------ agreement with quantize_network

def _close(a, b, atol):
    """|a - b| <= atol elementwise (atol an array: a per-channel scale)."""
    err = np.abs(np.asarray(a) - np.asarray(b))
    assert np.all(err <= atol), f"max |a - b| / atol = {np.max(err / atol):.3g}"


def _record(monkeypatch, mode):
    """Wrap the pipeline's Site-level mode: record each site, the arrays recalibrate_bn needs, and the result."""
    records, original = [], R.RECALIBRATION_MODES[mode]

    def wrapper(ctx, site):
        node = ctx.fp.node(site.conv)
        tensor = node.inputs[0]
        rec = {"site": site, "attrs": dict(node.attrs), "bias": node.params.get("B")}
        if mode == "analytic":
            rec["in_mean"], rec["in_var"] = ctx.moments[tensor]
        if mode == "sequential":                    # the conv's input in the FP net and in the net quantized so far
            rec["X_fp"] = ctx.fp.run(ctx.probes, output=tensor)
            rec["X_q"] = ctx.g.run(ctx.probes, output=tensor)
            rec["n_images"] = ctx.n_images          # the images, then their views (S.5)
        if mode == "data":
            rec["X_q"] = ctx.g.run(ctx.calibration_data, output=tensor)
        rec["bn_hat"] = original(ctx, site)
        records.append(rec)
        return rec["bn_hat"]

    monkeypatch.setitem(R.RECALIBRATION_MODES, mode, wrapper)
    return records


def _recalibrate(rec, mode):
    site, a = rec["site"], rec["attrs"]
    kwargs = {k: rec[k] for k in ("X_fp", "X_q", "in_mean", "in_var", "n_images") if k in rec}
    return dfmpc.recalibrate_bn(site.bn, site.W, site.W_q, mode, stride=tuple(a.get("strides", (1, 1))),
                                padding=tuple(a.get("pads", (0, 0, 0, 0))), groups=a.get("group", 1),
                                dilation=tuple(a.get("dilations", (1, 1))), bias=rec["bias"], **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_agrees_with_quantize_network_at_every_resnet20_site(net, images, monkeypatch, mode):
    """At each of ResNet-20's 21 conv -> BN sites, recalibrate_bn on the site's arrays gives the BN the pipeline
    computes there (before c). ``analytic``/``absorb`` run the same float64 formula: equal to 1e-12. ``sequential``/
    ``data``: the pipeline measures the engine's float32 conv output, recalibrate_bn the float64 dfmpc.conv2d of the
    same inputs; float32 rounding of an output (|rel| ~ 1e-6 for these 3x3x64 sums) moves a mean by ~1e-6 of the
    output's scale: means agree to 1e-4 sigma and sigmahat^2 to 1e-4 relative (seen: <= 5e-6 sigma, <= 2e-6 with
    the engine's Winograd convs)."""
    records = _record(monkeypatch, mode)
    x = images[:8]                      # 8 images: the recording re-runs the network up to each site
    q, report = dfmpc.quantize_network(net, recalibration=mode, probes=x, calibration_data=x)   # 4 views each (S.5)
    assert len(records) == len(recalibration_sites(net, net)) == 21 and len(report.pairs) > 0   # 19 + 2 shortcuts
    for rec in records:
        got, want = _recalibrate(rec, mode), rec["bn_hat"]
        sigma = rec["site"].bn.sigma
        if mode in ("analytic", "absorb"):
            _close(got.mean, want.mean, 1e-12 * sigma)
            np.testing.assert_allclose(got.var, want.var, rtol=1e-12, atol=1e-15)
        else:
            _close(got.mean, want.mean, 1e-4 * sigma)
            np.testing.assert_allclose(got.var + got.eps, want.var + want.eps, rtol=1e-4)
        for f in ("gamma", "beta"):
            np.testing.assert_array_equal(getattr(got, f), getattr(rec["site"].bn, f))
    if mode == "sequential":            # negative control: the check tells modes apart (analytic is not sequential)
        worst = 0.0
        for rec in records:
            site = rec["site"]
            m, v = R.channel_moments(rec["X_fp"])
            ana = dfmpc.recalibrate_bn(site.bn, site.W, site.W_q, "analytic", in_mean=m, in_var=v,
                                       groups=rec["attrs"].get("group", 1))
            worst = max(worst, np.max(np.abs(ana.mean - rec["bn_hat"].mean) / site.bn.sigma))
        assert worst > 1e-2
    # a site that is no pair's low conv keeps its re-calibrated BN as written into the quantized network
    low = {p.low for p in report.pairs}
    rec = next(r for r in records if r["site"].conv not in low)
    bn_node = q.node(rec["site"].bn_node).params
    np.testing.assert_allclose(bn_node["var"], _recalibrate(rec, mode).var.astype(np.float32), rtol=1e-4)


# ------------------------------------------------------------------ properties (float64)

@st.composite
def pair_problems(draw, max_groups=3):
    """(bn, W, W_q, X_fp, X_q, in_mean, in_var, groups, padding): a grouped conv, its ternary W_q, two input batches.

    X_q is X_fp plus drift of a drawn size (0: no earlier layer changed); W has optional all-zero filters."""
    rng = np.random.default_rng(draw(seeds))
    groups = draw(st.integers(1, max_groups))
    Og, Cg, k = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 3]))
    O, C = Og * groups, Cg * groups
    W = rng.normal(size=(O, Cg, k, k))
    if draw(st.booleans()):
        W[rng.uniform(size=O) < 0.3] = 0.0
    W_hat, alpha, _ = dfmpc.ternary(W)
    W_q = alpha * W_hat
    N, H = draw(st.integers(1, 4)), draw(st.integers(k, 6))
    X_fp = rng.normal(size=(N, C, H, H)) * rng.uniform(0.2, 3, (1, C, 1, 1)) + rng.normal(size=(1, C, 1, 1))
    X_q = X_fp + draw(st.sampled_from([0.0, 0.05, 0.5])) * rng.normal(size=X_fp.shape)
    in_mean, in_var = rng.normal(size=C), rng.uniform(0.0, 2.0, C)
    return draw(batchnorms(O)), W, W_q, X_fp, X_q, in_mean, in_var, groups, draw(st.sampled_from([0, 1]))


def _inputs(mode, X_fp, X_q, in_mean, in_var):
    return {"sequential": dict(X_fp=X_fp, X_q=X_q), "analytic": dict(in_mean=in_mean, in_var=in_var),
            "absorb": {}, "data": dict(X_q=X_q)}[mode]


@settings(max_examples=40)
@given(pair_problems())
def test_no_quantization_error_returns_the_trained_statistics(p):
    """W_q = W on the same inputs: (S.1) shifts by 0 and (S.2) scales by 1; so do (R.3), (R.4) -- the identity."""
    bn, W, _, X_fp, _, in_mean, in_var, groups, padding = p
    for mode in ("sequential", "analytic", "absorb"):
        got = dfmpc.recalibrate_bn(bn, W, W, mode, groups=groups, padding=padding,
                                   **_inputs(mode, X_fp, X_fp, in_mean, in_var))
        np.testing.assert_array_equal(got.mean, bn.mean)
        _close(got.var, bn.var, 4 * np.finfo(float).eps * (bn.var + bn.eps))
        assert got.eps == bn.eps and np.array_equal(got.gamma, bn.gamma) and np.array_equal(got.beta, bn.beta)


@settings(max_examples=40)
@given(pair_problems(), st.sampled_from([0.5, 2.0, 3.0]))
def test_scaling_w_q_scales_sigmahat_squared_and_moves_muhat_linearly(p, s):
    """(S.2), (R.4): sigmahat^2 is proportional to ||W_q||^2 (where not clipped at var = 0); (S.1), (R.3): muhat is
    affine in W_q, so muhat(s W_q) = muhat(0) + s (muhat(W_q) - muhat(0))."""
    bn, W, W_q, X_fp, X_q, in_mean, in_var, groups, padding = p
    for mode in ("sequential", "analytic"):
        f = lambda K: dfmpc.recalibrate_bn(bn, W, K, mode, groups=groups, padding=padding,
                                           **_inputs(mode, X_fp, X_q, in_mean, in_var))
        one, scaled, zero = f(W_q), f(s * W_q), f(0 * W_q)
        scale = np.abs(one.mean) + np.abs(zero.mean) + bn.sigma
        _close(scaled.mean, zero.mean + s * (one.mean - zero.mean), 1e-9 * s * scale)
        if mode == "sequential":                                  # the ratio's denominator: v_fp, sum ||W||^2 v
            den = R.channel_moments(dfmpc.conv2d(X_fp, W, padding=padding, groups=groups))[1]
        else:
            den = np.sum((W**2).sum(axis=(2, 3)) * in_var[R.conv_input_groups(W, groups)], axis=1)
        kept = (one.var > 0) & (scaled.var > 0) & (den > 1e-12 * np.max(den, initial=0))   # not the ratio-1 rule
        np.testing.assert_allclose((scaled.var + bn.eps)[kept], s**2 * (one.var + bn.eps)[kept], rtol=1e-9)


@settings(max_examples=40)
@given(pair_problems())
def test_a_grouped_conv_is_its_groups_side_by_side(p):
    """groups = g equals g independent convs (input channels g Cg .. (g+1) Cg - 1 to outputs g Og ..): the
    channel-to-group mapping of the conv and of (R.3)-(R.4) (conv_input_groups)."""
    bn, W, W_q, X_fp, X_q, in_mean, in_var, groups, padding = p
    O, Cg = W.shape[:2]
    Og = O // groups
    for mode in MODES:
        whole = dfmpc.recalibrate_bn(bn, W, W_q, mode, groups=groups, padding=padding,
                                     **_inputs(mode, X_fp, X_q, in_mean, in_var))
        for g in range(groups):
            o, c = slice(g * Og, (g + 1) * Og), slice(g * Cg, (g + 1) * Cg)
            bn_g = dfmpc.BatchNorm(gamma=bn.gamma[o], beta=bn.beta[o], mean=bn.mean[o], var=bn.var[o], eps=bn.eps)
            part = dfmpc.recalibrate_bn(bn_g, W[o], W_q[o], mode, padding=padding,
                                        **_inputs(mode, X_fp[:, c], X_q[:, c], in_mean[c], in_var[c]))
            _close(whole.mean[o], part.mean, 1e-12 * (bn_g.sigma + np.abs(part.mean)))
            np.testing.assert_allclose(whole.var[o], part.var, rtol=1e-12, atol=1e-15)


@settings(max_examples=40)
@given(seeds, st.integers(1, 4), st.integers(1, 3), st.integers(1, 4))
def test_analytic_equals_sequential_where_its_assumptions_are_exact(seed, C, Og, N):
    """A 1x1 conv with one input channel per group and no padding: the output mean is exactly sum (W m) and its
    variance exactly W^2 v, so (R.3)-(R.4) with the batch's own moments equal (S.1)-(S.2) on that batch (same X in
    both networks). Derivations 10 and 15 meet here."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(C * Og, 1, 1, 1))
    W[rng.uniform(size=C * Og) < 0.2] = 0.0                                # zero filters: both give ratio 1
    W_hat, alpha, _ = dfmpc.ternary(W)
    X = rng.normal(size=(N, C, 3, 3)) * rng.uniform(0.2, 3, (1, C, 1, 1)) + rng.normal(size=(1, C, 1, 1))
    bn = random_bn(rng, C * Og)
    m, v = R.channel_moments(X)
    seq = dfmpc.recalibrate_bn(bn, W, alpha * W_hat, "sequential", X_fp=X, X_q=X, groups=C)
    ana = dfmpc.recalibrate_bn(bn, W, alpha * W_hat, "analytic", in_mean=m, in_var=v, groups=C)
    _close(seq.mean, ana.mean, 1e-10 * (bn.sigma + np.abs(ana.mean)))
    np.testing.assert_allclose(seq.var + bn.eps, ana.var + bn.eps, rtol=1e-10)


@settings(max_examples=40)
@given(pair_problems())
def test_sequential_on_the_images_of_the_trained_statistics_equals_data(p):
    """(S.3) exact: when the trained statistics are those of conv(X_fp, W) (eps = 0), the sequential correction lands
    on the statistics the data mode measures on X_q. Negative control: with other trained statistics it does not."""
    bn0, W, W_q, X_fp, X_q, _, _, groups, padding = p
    W = np.where(np.all(W == 0, axis=(1, 2, 3), keepdims=True), 1.0, W)   # v_fp, v_q > 0 in every channel:
    W_q = np.where(np.all(W_q == 0, axis=(1, 2, 3), keepdims=True), W, W_q)  # with eps = 0 a BN needs var > 0
    m_fp, v_fp = R.channel_moments(dfmpc.conv2d(X_fp, W, padding=padding, groups=groups))
    m_q, v_q = R.channel_moments(dfmpc.conv2d(X_q, W_q, padding=padding, groups=groups))
    if np.any(v_fp <= 1e-12 * (1 + m_fp**2)) or np.any(v_q <= 1e-12 * (1 + m_q**2)):
        return                                                           # e.g. a 1x1 output: no variance to measure
    bn = bn0.replace(mean=m_fp, var=v_fp, eps=0.0)
    seq = dfmpc.recalibrate_bn(bn, W, W_q, "sequential", X_fp=X_fp, X_q=X_q, groups=groups, padding=padding)
    dat = dfmpc.recalibrate_bn(bn, W, W_q, "data", X_q=X_q, groups=groups, padding=padding)
    scale = np.sqrt(v_fp) + np.abs(m_fp) + np.abs(dat.mean)
    _close(seq.mean, dat.mean, 1e-9 * scale)
    _close(seq.var, dat.var, 1e-9 * dat.var + 1e-12 * v_fp)
    other = bn.replace(var=4 * v_fp + 1)
    off = dfmpc.recalibrate_bn(other, W, W_q, "sequential", X_fp=X_fp, X_q=X_q, groups=groups, padding=padding)
    assert not np.allclose(off.var, dat.var, rtol=1e-3)


@settings(max_examples=30)
@given(pair_problems())
def test_bias_cancels_in_the_data_free_modes_and_is_measured_by_data(p):
    bn, W, W_q, X_fp, X_q, in_mean, in_var, groups, padding = p
    b = np.random.default_rng(int(abs(bn.beta.sum()) * 1e6) % 2**32).normal(size=W.shape[0]) * 5
    for mode in MODES:
        kw = dict(groups=groups, padding=padding, **_inputs(mode, X_fp, X_q, in_mean, in_var))
        plain, biased = dfmpc.recalibrate_bn(bn, W, W_q, mode, **kw), dfmpc.recalibrate_bn(bn, W, W_q, mode, bias=b, **kw)
        shift = b if mode == "data" else 0.0
        scale = np.abs(plain.mean) + np.abs(b) + bn.sigma
        _close(biased.mean, plain.mean + shift, 1e-12 * scale)
        np.testing.assert_allclose(biased.var + bn.eps, plain.var + bn.eps, rtol=1e-9)


def test_absorb_returns_the_trained_bn_and_inputs_are_not_modified():
    rng = np.random.default_rng(3)
    W, X = rng.normal(size=(4, 2, 3, 3)), rng.normal(size=(2, 2, 5, 5))
    bn = random_bn(rng, 4)
    assert dfmpc.recalibrate_bn(bn, W, 0.5 * W, "absorb") is bn
    copies = [a.copy() for a in (W, X)]
    dfmpc.recalibrate_bn(bn, W, 0.5 * W, "sequential", X_fp=X, X_q=X + 1)
    assert all(np.array_equal(a, c) for a, c in zip((W, X), copies))


# ------------------------------------------------------------------ bad input: clear errors naming the argument

_rng = np.random.default_rng(0)
_W = _rng.normal(size=(4, 2, 3, 3))
_X = _rng.normal(size=(2, 2, 5, 5))
_BN = random_bn(_rng, 4)
_OK = {"sequential": dict(X_fp=_X, X_q=_X), "analytic": dict(in_mean=np.zeros(2), in_var=np.ones(2)),
       "absorb": {}, "data": dict(X_q=_X)}


@pytest.mark.parametrize("mode, change, match", [
    ("bogus", {}, "mode"),
    ("sequential", dict(X_fp=None), "X_fp"),
    ("sequential", dict(X_q=None), "X_q"),
    ("data", dict(X_q=None), "X_q"),
    ("analytic", dict(in_var=None), "in_var"),
    ("analytic", dict(X_q=_X), "X_q"),
    ("absorb", dict(in_mean=np.zeros(2)), "in_mean"),
    ("data", dict(X_fp=_X), "X_fp"),
    ("sequential", dict(X_q=_X[:, :1]), "X_q"),
    ("sequential", dict(X_fp=_X[0]), "X_fp"),
    ("sequential", dict(X_fp=_X[:0]), "X_fp"),
    ("data", dict(X_q=np.where(_X > 1, np.nan, _X)), "X_q"),
    ("analytic", dict(in_mean=np.zeros(3)), "in_mean"),
    ("analytic", dict(in_var=-np.ones(2)), "in_var"),
    ("analytic", dict(in_mean=np.array([0.0, np.inf])), "in_mean"),
    ("sequential", dict(W_q=_W[:, :, :2]), "W_q"),
    ("sequential", dict(W=_W[0]), "W"),
    ("sequential", dict(W=_W[:3], W_q=_W[:3]), "W"),
    ("sequential", dict(groups=3), "groups"),
    ("sequential", dict(groups=0), "groups"),
    ("sequential", dict(bias=np.ones(3)), "bias"),
    ("sequential", dict(stride=0), "stride"),
    ("data", dict(padding=-1), "padding"),
    ("sequential", dict(n_images=0), "n_images"),
    ("sequential", dict(n_images=len(_X) + 1), "n_images"),
    ("sequential", dict(n_images=1, X_q=_X[:1]), "n_images"),
    ("data", dict(n_images=1), "n_images"),
])
def test_bad_input_raises_value_error_naming_the_argument(mode, change, match):
    kwargs = dict(W=_W, W_q=0.5 * _W, **(_OK.get(mode, {})))
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        dfmpc.recalibrate_bn(_BN, kwargs.pop("W"), kwargs.pop("W_q"), mode, **kwargs)


def test_bn_must_be_a_batchnorm():
    with pytest.raises(TypeError, match="bn"):
        dfmpc.recalibrate_bn({"mean": np.zeros(4)}, _W, _W, "absorb")
