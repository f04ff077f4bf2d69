"""The staged pipeline: Graph.run / run_many return types, the engine's NodeStream, the
re-calibration registry, and the sequential re-calibration's ratio rule (derivation 15, S.1-S.2)."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import dfmpc
from dfmpc.engine import Graph, Node
from dfmpc.engine.executor import NodeStream
from dfmpc.pipeline import quantize_network, recalibration_sites, prepare
from dfmpc.recalibration import (RECALIBRATION_MODES, RECALIBRATIONS, channel_moments, measured_bn, ratio_bn)


def _two_outputs():
    return Graph([Node("r", "Relu", ["x"], ["a"]), Node("n", "Mul", ["x"], ["b"], params={"constant": np.float32(-1)})],
                 inputs=["x"], outputs=["a", "b"])


def test_run_returns_one_array_and_run_many_a_dict():
    """Graph.run has one return type (ndarray), Graph.run_many another (dict), however many outputs."""
    g = _two_outputs()
    x = np.random.default_rng(1).normal(size=(3, 2, 4, 4)).astype(np.float32)
    a = g.run(x, output="a")
    assert isinstance(a, np.ndarray) and np.array_equal(a, np.maximum(x, 0))
    one = g.run_many(x, outputs=["b"])
    assert isinstance(one, dict) and list(one) == ["b"] and np.array_equal(one["b"], -x)
    both = g.run_many(x)
    assert set(both) == {"a", "b"}
    with pytest.raises(ValueError, match="output="):
        g.run(x)                                   # several graph outputs: name one
    with pytest.raises(ValueError, match="run_many"):
        g.run(x, output=["a"])
    with pytest.raises(ValueError, match="list of tensor names"):
        g.run_many(x, outputs="a")


def test_node_stream_equals_run(net, images):
    """Advancing a NodeStream node by node gives what Graph.run gives for the same tensors.

    Both run inside ``unmeasured()``, as the pipeline runs the stream: with measured kernel choices the
    two (batches of 7 and of 16 images, unfused and BN-folded) may be given different kernels, e.g.
    Winograd F(4x4) against ``blocked``, whose rounding differs by up to 1e-5 of the sum of |w||x|
    (tests/test_engine_winograd.py), more than this test's tolerance, which is for the order of the
    BN folding only."""
    from dfmpc.engine.conv import unmeasured
    names = [n.name for n in net.nodes]
    with unmeasured():
        stream = NodeStream(net, images, batch_size=7)
        ref = net.run_many(images, outputs=[net.node(names[5]).outputs[0], net.node(names[-1]).outputs[0]])
        first, last = stream.advance(names[5]), stream.advance(names[-1])
    np.testing.assert_allclose(first, ref[net.node(names[5]).outputs[0]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, ref[net.node(names[-1]).outputs[0]], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already been passed"):
        stream.advance(names[2])
    with pytest.raises(ValueError, match="no node named"):
        stream.advance("nope")


def test_node_stream_reads_parameters_as_they_are_when_it_arrives(net, images):
    """A change to a later node's parameters before the stream reaches it is seen: the order (S.1)-(S.2) rely on,
    each site measured in the network with every earlier BN already re-calibrated (derivation 15)."""
    g = net.copy()
    bn = g.nodes_of("BatchNormalization")[3]
    conv = g.producer(bn.inputs[0])
    stream = NodeStream(g, images)
    stream.advance(conv.name)
    bn.params["beta"] = bn.params["beta"] + np.float32(5.0)
    out = stream.advance(bn.name)
    # the stream runs chunks of 128 images, g.run its own: the engine may choose another conv kernel
    # (direct, BLAS, Winograd) per chunk shape, each rounding float32 differently (~1e-5 of the scale, 1e-4 here)
    np.testing.assert_allclose(out, g.run(images, output=bn.outputs[0]), rtol=1e-4, atol=1e-4)
    assert not np.allclose(out, net.run(images, output=bn.outputs[0]), atol=1.0)   # negative control


def test_registry_names_every_mode():
    assert tuple(RECALIBRATION_MODES) == RECALIBRATIONS and "sequential" in RECALIBRATIONS


@given(seed=st.integers(0, 2**32 - 1), C=st.integers(1, 16), zeros=st.booleans())
def test_ratio_rule_s1_s2(seed, C, zeros):
    """(S.1)-(S.2): muhat = mu + m_q - m_fp; sigmahat^2 = sigma^2 v_q / v_fp (ratio 1 where v_fp = 0)."""
    rng = np.random.default_rng(seed)
    bn = dfmpc.BatchNorm(gamma=rng.normal(size=C), beta=rng.normal(size=C), mean=rng.normal(size=C),
                         var=rng.uniform(0.01, 3, C), eps=1e-5)
    m_q, m_fp = rng.normal(size=C), rng.normal(size=C)
    v_q, v_fp = rng.uniform(0.1, 2, C), rng.uniform(0.1, 2, C)
    if zeros:
        v_fp[0] = 0.0
    hat = ratio_bn(bn, m_q, v_q, m_fp, v_fp)
    np.testing.assert_allclose(hat.mean, bn.mean + m_q - m_fp, rtol=1e-12, atol=1e-12)
    r = np.where(v_fp > 0, v_q / np.where(v_fp > 0, v_fp, 1), 1.0)
    np.testing.assert_allclose(hat.var + bn.eps, np.maximum((bn.var + bn.eps) * r, bn.eps), rtol=1e-12)
    same = ratio_bn(bn, m_q, v_q, m_q, v_q)          # no drift: the trained statistics come back
    np.testing.assert_allclose(same.mean, bn.mean, atol=1e-12)
    np.testing.assert_allclose(same.var, bn.var, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(hat.gamma, bn.gamma)


def test_ratio_rule_refuses_bad_statistics():
    bn = dfmpc.BatchNorm(gamma=np.ones(3), beta=np.zeros(3), mean=np.zeros(3), var=np.ones(3))
    with pytest.raises(ValueError, match="v_q"):
        ratio_bn(bn, np.zeros(3), -np.ones(3), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="m_fp"):
        ratio_bn(bn, np.zeros(3), np.ones(3), np.zeros(2), np.ones(3))


def test_channel_moments_match_numpy():
    X = np.random.default_rng(3).normal(2.0, 3.0, size=(5, 4, 6, 6)).astype(np.float32)
    m, v = channel_moments(X)
    np.testing.assert_allclose(m, X.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(v, X.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-5)


def test_sequential_on_real_images_equals_data_mode(net, images):
    """With the probes being the calibration images themselves, the sequential ratio rule moves each BN to the
    statistics measured in the quantized network, exactly as the data mode does, up to the FP network's own
    mismatch between its trained statistics and those of the probes (S.3 in derivation 15): checked here on a
    network whose trained BN statistics are replaced by those measured on the same images."""
    fp = prepare(net)
    # make the trained statistics exact for these images (a consistent network)
    for site in recalibration_sites(fp, fp):
        X = fp.run(images, output=fp.node(site.conv).outputs[0])
        bn = measured_bn(site.bn, X)
        fp.node(site.bn_node).params.update(mean=bn.mean.astype(np.float32), var=bn.var.astype(np.float32))
    q_seq, _ = quantize_network(fp, recalibration="sequential", compensation="none", probes=images,
                                probe_views=1)                  # the images themselves, not their views (S.6)
    q_dat, _ = quantize_network(fp, recalibration="data", compensation="none", calibration_data=images)
    for bn in q_seq.nodes_of("BatchNormalization"):
        ref = q_dat.node(bn.name).params
        np.testing.assert_allclose(bn.params["mean"], ref["mean"], rtol=1e-3, atol=1e-3 * (1 + np.abs(ref["mean"]).max()))
        np.testing.assert_allclose(bn.params["var"], ref["var"], rtol=2e-3, atol=1e-4)
    # negative control: the analytic mode does not land on the measured statistics
    q_ana, _ = quantize_network(fp, recalibration="analytic", compensation="none")
    worst = max(np.max(np.abs(np.log((q_ana.node(b.name).params["var"] + 1e-5) / (q_dat.node(b.name).params["var"] + 1e-5))))
                for b in q_seq.nodes_of("BatchNormalization"))
    assert worst > 0.05


def test_sequential_takes_the_mean_shift_on_the_images_and_the_variance_ratio_on_all_views(net, images):
    """S.5 (derivation 15): with probes = the images followed by their views (S.6), the sequential mode
    moves each BN's mean by the images' mean difference (S.1 over the first ``n_images`` rows) and scales its
    variance by the ratio over all rows (S.2); checked at every site against the conv outputs of the two
    networks, computed here with ``Graph.run``. Negative controls: taking the mean over all rows, or the
    variance over the images alone, gives other statistics."""
    from dfmpc.probes import mirrored_views
    from dfmpc.recalibration import RecalibrationContext, recalibrate_sequential
    fp = prepare(net)
    q, _ = quantize_network(fp, recalibration="absorb", compensation="none")      # a quantized network, BNs kept
    x = images[:6]
    V = mirrored_views(x, 4)
    ctx = RecalibrationContext(fp, q, probes=V, n_images=len(x))
    mean_gap, var_gap = [], []
    for site in recalibration_sites(fp, q):
        out = fp.node(site.conv).outputs[0]
        X_fp, X_q = fp.run(V, output=out), q.run(V, output=out)
        got = recalibrate_sequential(ctx, site)
        (m_q, _), (m_fp, _) = channel_moments(X_q[:6]), channel_moments(X_fp[:6])
        (_, v_q), (_, v_fp) = channel_moments(X_q), channel_moments(X_fp)
        want = ratio_bn(site.bn, m_q, v_q, m_fp, v_fp)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.var, want.var, rtol=1e-4, atol=1e-6)
        all_rows = ratio_bn(site.bn, *channel_moments(X_q), *channel_moments(X_fp))
        images_only = ratio_bn(site.bn, *channel_moments(X_q[:6]), *channel_moments(X_fp[:6]))
        mean_gap.append(np.max(np.abs(all_rows.mean - got.mean) / np.sqrt(got.var + 1e-5)))
        var_gap.append(np.max(np.abs(np.log((images_only.var + 1e-5) / (got.var + 1e-5)))))
    assert max(mean_gap) > 0.01 and max(var_gap) > 0.01          # 1% of sigma, 1% in variance
    with pytest.raises(ValueError, match="n_images"):
        RecalibrationContext(fp, q, probes=V, n_images=len(V) + 1)


def test_sequential_report_names_its_probes(net, images):
    q, rep = quantize_network(net, recalibration="sequential", probes=images, probe_views=1)
    assert rep.recalibration == "sequential" and rep.probes == "given (24 images)"
    assert "sequential on given (24 images)" in rep.summary()
    assert quantize_network(net, recalibration="sequential", probes=images)[1].probes == \
        "given (24 images), 4 mirrored views each for the variance"
    with pytest.raises(ValueError, match="probes"):
        quantize_network(net, recalibration="sequential", probes=images.astype(np.float64))
    with pytest.raises(ValueError, match="probes"):
        quantize_network(net, recalibration="sequential", probes="daydreams")


def test_quantize_network_refuses_bad_bits_and_bad_weights(net):
    with pytest.raises(ValueError, match="low_bits <= high_bits"):
        quantize_network(net, 8, 6)
    bad = net.copy()
    conv = bad.nodes_of("Conv")[2]
    conv.params["W"] = conv.params["W"].copy()
    conv.params["W"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=conv.name):
        quantize_network(bad)


def test_low_quantizer_is_an_explicit_choice(net):
    """A 2-bit DoReFa low layer can be asked for; TWN stays the default at 2 bits (Eq. (3)-(4) vs Eq. (6))."""
    q_twn, rep = quantize_network(net, 2, 6, recalibration="absorb", compensation="none")
    q_dor, _ = quantize_network(net, 2, 6, recalibration="absorb", compensation="none", low_quantizer="dorefa")
    low = rep.pairs[0].low
    W = net.node(low).params["W"]
    np.testing.assert_array_equal(q_twn.node(low).params["W"], dfmpc.pipeline.quantize_weights(W, 2, "twn"))
    np.testing.assert_array_equal(q_dor.node(low).params["W"], dfmpc.pipeline.quantize_weights(W, 2, "dorefa"))
    assert not np.array_equal(q_twn.node(low).params["W"], q_dor.node(low).params["W"])
    high = rep.pairs[0].high                                    # high layers are untouched by the choice
    np.testing.assert_array_equal(q_twn.node(high).params["W"], q_dor.node(high).params["W"])
    with pytest.raises(ValueError, match="low_quantizer"):
        quantize_network(net, 3, 6, low_quantizer="twn")
    with pytest.raises(ValueError, match="quantizer"):
        dfmpc.pipeline.quantize_weights(W, 2, "nf4")


def test_probes_are_made_once_per_network_and_seed(net, monkeypatch):
    """The probe cache: same network, kind, n and seed -> one call of make_probes; any change -> a new one."""
    import dfmpc.pipeline as pipeline
    calls = []
    real = pipeline.make_probes

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "make_probes", counting)
    monkeypatch.setattr(pipeline, "_PROBE_CACHE", {})
    for comp in ("none", "dfmpc"):
        quantize_network(net, recalibration="sequential", probes="noise", probe_images=4, compensation=comp)
    assert len(calls) == 1
    quantize_network(net, recalibration="sequential", probes="noise", probe_images=4, seed=1)
    other = net.copy()
    other.nodes_of("Conv")[0].params["W"] = other.nodes_of("Conv")[0].params["W"] * np.float32(1.5)
    quantize_network(other, recalibration="sequential", probes="noise", probe_images=4)
    assert len(calls) == 3                                   # a new seed and a changed weight each make new probes


def test_channel_moments_refuses_a_non_batch():
    with pytest.raises(ValueError, match="X: expected a non-empty batch"):
        channel_moments(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="X: expected a non-empty batch"):
        channel_moments(np.zeros((0, 3, 2, 2), np.float32))
