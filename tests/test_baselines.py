"""Baselines on the same weights as DF-MPC: RTN, OCS weight splitting, the method registry, compare()."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dfmpc
from dfmpc.baselines import DEFAULT_METHODS, METHODS, get_method
from dfmpc.baselines.common import layer_bits, rtn_weights
from dfmpc.baselines.ocs import split_channels, split_network, splittable_layers
from dfmpc.baselines.rtn import rtn
from dfmpc.compare import compare, format_table
from dfmpc.engine.builders import resnet_cifar
from dfmpc.engine.graph import Graph, Node
from dfmpc.evaluation import load_zoo_model, zoo_manifest
from strategies import FLOAT32_TINY, uniform_arrays

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 1, 28, 28)).astype(np.float32)


def params_of(g):
    return {n.name: {k: v.copy() for k, v in n.params.items()} for n in g.nodes}


def same_params(g, snapshot):
    return all(np.array_equal(n.params[k], snapshot[n.name][k]) for n in g.nodes for k in n.params)


def vgg_chain(seed=0, act="Relu"):
    """conv -> BN -> act -> MaxPool -> conv -> BN -> act -> GAP -> Flatten -> Gemm, random BN statistics
    (act: ReLU, or LeakyRelu(0.1), elementwise like it, so OCS duplicates its channels as exactly)."""
    r = np.random.default_rng(seed)
    f32 = lambda *s, scale=1.0: (scale * r.normal(size=s)).astype(np.float32)

    def bn(name, x, y, C):
        return Node(name, "BatchNormalization", [x], [y], {"epsilon": 1e-5},
                    {"gamma": r.uniform(0.5, 1.5, C).astype(np.float32), "beta": f32(C, scale=0.3),
                     "mean": f32(C, scale=0.3), "var": r.uniform(0.5, 2, C).astype(np.float32)})
    nodes = [Node("c1", "Conv", ["x"], ["a1"], {"pads": (1, 1, 1, 1)}, {"W": f32(8, 1, 3, 3)}),
             bn("b1", "a1", "n1", 8), Node("r1", act, ["n1"], ["h1"], {"alpha": 0.1} if act == "LeakyRelu" else {}),
             Node("p1", "MaxPool", ["h1"], ["m1"], {"kernel_shape": (2, 2), "strides": (2, 2)}),
             Node("c2", "Conv", ["m1"], ["a2"], {"pads": (1, 1, 1, 1)}, {"W": f32(12, 8, 3, 3, scale=0.3)}),
             bn("b2", "a2", "n2", 12), Node("r2", act, ["n2"], ["h2"], {"alpha": 0.1} if act == "LeakyRelu" else {}),
             Node("gap", "GlobalAveragePool", ["h2"], ["g"]), Node("fl", "Flatten", ["g"], ["f"]),
             Node("fc", "Gemm", ["f"], ["y"], {}, {"W": f32(10, 12, scale=0.3), "B": f32(10, scale=0.1)})]
    return Graph(nodes, ["x"], ["y"], {"x": (1, 28, 28)})


# ----------------------------------------------------------------------------------------- RTN
@settings(max_examples=50)
@given(uniform_arrays(st.tuples(st.integers(1, 6), st.integers(1, 5), st.just(3), st.just(3)), -10.0, 10.0,
                      tiny=FLOAT32_TINY),   # rtn_weights returns float32
       st.integers(2, 8), st.booleans())
def test_rtn_error_within_half_step(W, bits, per_channel):
    """RTN: every weight within half a step s/2 of its value, s = max|W| / (2^(b-1) - 1), and on the grid."""
    W_q = rtn_weights(W, bits, per_channel).astype(np.float64)
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(W).max(axis=(1, 2, 3), keepdims=True) / qmax if per_channel else np.abs(W).max() / qmax
    assert np.all(np.abs(W_q - W) <= s / 2 * (1 + 1e-5) + 1e-6)
    k = np.divide(W_q, s, out=np.zeros_like(W_q), where=np.broadcast_to(s, W.shape) > 0)
    assert np.allclose(k, np.round(k), atol=1e-3) and np.all(np.abs(k) <= qmax + 1e-3)


def test_rtn_network_uses_dfmpc_bit_assignment():
    """rtn quantizes the low conv of each DF-MPC pair to 3 levels and every other layer finer; input untouched."""
    g = resnet_cifar(20, seed=1)
    snap = params_of(g)
    q, info = rtn(g, 2, 6)
    assert same_params(g, snap)
    pairing, bits = layer_bits(g, 2, 6)
    assert info["low_layers"] == sorted(pairing.low) and len(pairing.low) == 9
    for name, b in bits.items():
        levels = len(np.unique(q.node(name).params["W"]))
        assert (levels <= 3) if b == 2 else (levels > 3)


def test_rtn_channel_no_worse_than_per_tensor_per_layer():
    """Per-channel scales never have a larger max error per output channel than one per-tensor scale (half step)."""
    W = RNG.normal(size=(16, 8, 3, 3)) * RNG.uniform(0.1, 3, size=(16, 1, 1, 1))
    e_t = np.abs(rtn_weights(W, 4) - W).reshape(16, -1).max(axis=1)
    e_c = np.abs(rtn_weights(W, 4, per_channel=True) - W).reshape(16, -1).max(axis=1)
    bound_t = np.abs(W).max() / 7 / 2
    assert np.all(e_c <= np.abs(W).reshape(16, -1).max(axis=1) / 7 / 2 + 1e-6) and np.all(e_t <= bound_t + 1e-6)
    assert e_c.mean() < e_t.mean()


# ----------------------------------------------------------------------------------------- OCS
@settings(max_examples=60)
@given(uniform_arrays(st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3)), -5.0, 5.0),
       st.integers(0, 8))
def test_ocs_split_is_exact_and_halves_the_outlier(W, n):
    """OCS-split: W[:, j] x_j = (W[:, j]/2) x_j + (W[:, j]/2) x_j, so the split layer's output is unchanged;
    the largest |w| never grows, and it halves when the first split happens."""
    W_s, source = split_channels(W, n)
    C = W.shape[1]
    assert W_s.shape == (W.shape[0], C + n, *W.shape[2:]) and source.shape == (n,)
    x = np.random.default_rng(1).normal(size=(C,) + W.shape[2:])
    x_s = np.concatenate([x, x[source]])
    assert np.allclose(np.tensordot(W_s, x_s, W.ndim - 1), np.tensordot(W, x, W.ndim - 1), atol=1e-9)
    assert np.abs(W_s).max() <= np.abs(W).max()
    if n == 1:    # one split: the channel holding the largest |w| is halved
        col = int(np.argmax(np.abs(W).reshape(W.shape[0], C, -1).max(axis=(0, 2))))
        rest = np.delete(np.abs(W), col, axis=1)
        expect = max(np.abs(W).max() / 2, rest.max() if rest.size else 0.0)
        assert np.abs(W_s).max() == pytest.approx(expect)


def test_ocs_split_negative_control():
    """OCS-split negative control: without re-reading the duplicated channels the output changes, so the check can fail."""
    W = np.array([[4.0, 1.0], [-1.0, 0.5]])
    W_s, source = split_channels(W, 1)
    x = np.array([3.0, -2.0])
    assert not np.allclose(W_s @ np.concatenate([x, np.zeros(1)]), W @ x)


@pytest.mark.parametrize("builder", [lambda: resnet_cifar(20, seed=2), vgg_chain, lambda: vgg_chain(act="LeakyRelu")],
                         ids=["resnet20", "vgg_chain", "vgg_chain_leaky"])
def test_ocs_network_keeps_fp32_output(builder):
    """OCS-split on a whole graph: duplicating producer rows and BN channels leaves the FP32 output unchanged
    (float32, within 1e-5 of max |logit|), grows each split layer by ceil(0.05 C), and does not touch the input."""
    g = builder()
    snap = params_of(g)
    s, info = split_network(g, 0.05)
    assert same_params(g, snap) and info["split"]
    ref, out = g.run(X), s.run(X)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    for name, n in info["split"].items():
        C = g.node(name).params["W"].shape[1]
        assert n == int(np.ceil(0.05 * C)) and s.node(name).params["W"].shape[1] == C + n


def test_ocs_finds_the_gemm_behind_global_pooling_and_refuses_the_stem():
    chains, refused = splittable_layers(vgg_chain())
    assert {c.layer for c in chains} == {"c2", "fc"}
    assert [r[0] for r in refused] == ["c1"] and "graph input" in refused[0][1]


def test_ocs_expand_ratio_checked():
    with pytest.raises(ValueError, match="expand_ratio"):
        split_network(vgg_chain(), 1.5)
    with pytest.raises(ValueError, match="n_split"):
        split_channels(np.ones((2, 2)), -1)


# ------------------------------------------------------------------------------ registry, compare
@pytest.mark.slow          # ~30 s: the sequential re-calibration methods distil probe images
def test_every_method_never_mutates_and_keeps_the_bit_assignment():
    """Every registered method leaves its input graph unchanged and returns a runnable graph of the same outputs."""
    g = resnet_cifar(8, seed=4)
    snap = params_of(g)
    cal = RNG.normal(size=(8, 1, 28, 28)).astype(np.float32)
    for name, m in METHODS.items():
        q, info = m.run(g, 2, 6, calibration_data=None if m.data_free else cal)
        assert same_params(g, snap), name
        assert q.run(X[:2]).shape == (2, 10), name
        assert isinstance(info, dict)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(zoo_manifest()))
def test_every_method_runs_or_refuses_on_every_zoo_model(arch, monkeypatch):
    """On every zoo model each method returns a network of unchanged output shape, or refuses with a message.
    (What runs is checked here, not accuracy: the sequential methods' probes get a 5-step budget.)"""
    import dfmpc.pipeline
    real = dfmpc.pipeline.make_probes
    monkeypatch.setattr(dfmpc.pipeline, "make_probes",
                        lambda *a, **k: real(*a, **{**k, "iterations": 5, "tolerance": None}))
    monkeypatch.setattr(dfmpc.pipeline, "_PROBE_CACHE", {})
    g = load_zoo_model(arch)
    cal = RNG.normal(size=(8, 1, 28, 28)).astype(np.float32)
    rows = compare(g, X, np.zeros(len(X), int), DEFAULT_METHODS, 2, 6, calibration_data=cal)
    assert [r["method"] for r in rows] == ["fp32", *DEFAULT_METHODS]
    for r in rows:
        assert (r["accuracy"] is not None) != bool(r["error"]), r


def test_compare_refuses_data_aware_method_without_images_and_unknown_names():
    g = resnet_cifar(8, seed=5)
    rows = compare(g, X, np.zeros(len(X), int), ["rtn", "oracle"])
    assert rows[2]["error"] and "not data-free" in rows[2]["error"] and rows[2]["accuracy"] is None
    assert rows[1]["error"] is None and rows[1]["seconds"] >= 0
    assert "refused" in format_table(rows)
    with pytest.raises(ValueError, match="unknown method 'gptq'"):
        compare(g, X, np.zeros(len(X), int), ["rtn", "gptq"])
    with pytest.raises(ValueError, match="methods"):
        get_method("nope")


@pytest.mark.slow          # ~20 s: dfmpc+squant distils probe images for the sequential re-calibration
def test_dfmpc_squant_keeps_low_layers_ternary_and_high_layers_on_the_dorefa_grid():
    """dfmpc+squant: the low convs stay TWN ternary; the high-bit layers take only DoReFa levels."""
    g = resnet_cifar(8, seed=6)
    q, info = METHODS["dfmpc+squant"].run(g, 2, 6)
    pairing, bits = layer_bits(g, 2, 6)
    for name in bits:
        W_q = q.node(name).params["W"].astype(np.float64)
        if name in pairing.low:
            assert len(np.unique(W_q)) <= 3
        else:
            _, s = dfmpc.dorefa(g.node(name).params["W"], 6)
            k = (W_q / s + 1) / 2 * 63                 # DoReFa level index, Eq. (6)
            assert np.allclose(k, np.round(k), atol=1e-3)
