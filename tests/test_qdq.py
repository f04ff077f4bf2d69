"""The deployable integer ONNX (``format="qdq"``): int8 grids recovered from the dequantized weights
(TWN Eq. (3)-(4), DoReFa Eq. (6)), the exported file (onnx.checker, opset 13, per-output-channel
DequantizeLinear), onnxruntime and the engine's import against the float export, and the CLI."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import dfmpc
from dfmpc.engine.builders import resnet_cifar
from dfmpc.interop import load_model, save_model
from dfmpc.interop.onnx_import import dequantize_linear
from dfmpc.interop.qdq import DEQUANT_RTOL, factored_grid, integer_grid, layer_bits
from dfmpc.pipeline import quantize_weights
from strategies import filters, seeds


def _dequantize(q, scale):
    """What DequantizeLinear computes (float32), per output channel."""
    return (q.reshape(len(q), -1).astype(np.float32) * scale[:, None]).reshape(q.shape)


# ------------------------------------------------------------------------------------ the grid

@given(W=filters(max_out=24, max_in=6))
def test_ternary_grid_is_minus_one_zero_one_with_alpha_as_scale(W):
    """Eq. (3)-(4): W_q = alpha W_hat  ->  q = W_hat exactly, scale = alpha in every channel, exact round trip."""
    W_q = quantize_weights(W, 2, "twn")
    W_hat, alpha, _ = dfmpc.ternary(W)
    q, scale = integer_grid(W_q, bits=2)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (len(W),)
    assert set(np.unique(q)) <= {-1, 0, 1}
    if alpha > 0:
        np.testing.assert_array_equal(q, W_hat.astype(np.int8))
        np.testing.assert_array_equal(scale, np.float32(alpha))
    np.testing.assert_array_equal(_dequantize(q, scale), W_q)        # alpha * {-1, 0, 1} is exact in float32


@settings(max_examples=60)
@given(W=filters(max_out=24, max_in=6), k=st.integers(2, 7))
def test_dorefa_grid_is_odd_integers_within_2k_levels(W, k):
    """Eq. (6): W_q = max|W| (-1 + 2i/(2^k-1))  ->  odd q = 2i - (2^k-1) (or a coarser exact grid), <= 2^k levels."""
    W_q = quantize_weights(W, k, "dorefa")
    q, scale = integer_grid(W_q, bits=k)
    assert q.dtype == np.int8 and np.abs(q).max() <= 2 ** k - 1
    assert np.unique(q).size <= 2 ** k
    if np.any(W_q != 0):
        assert np.all(q % 2 == 1), "DoReFa has no zero level: every grid value is odd"
        M = np.abs(W_q).max()
        n = int(np.abs(q).max())
        assert (2 ** k - 1) % n == 0                                    # the grid's step, or a multiple of it
        np.testing.assert_allclose(scale, M / n, rtol=2 ** -23)
    back = _dequantize(q, scale)
    assert np.all(np.abs(back.astype(np.float64) - W_q) <= DEQUANT_RTOL * np.abs(W_q.astype(np.float64)))


def test_a_real_six_bit_layer_uses_all_of_its_grid():
    """On a trained layer the recovered step is max|W| / 63: q runs over the odd integers up to +-63."""
    W = dfmpc.evaluation.load_zoo_model("resnet20").node("/layers/layers.4/conv2/Conv").params["W"]
    q, scale = integer_grid(quantize_weights(W, 6), bits=6)
    assert np.abs(q).max() == 63 and 20 < np.unique(q).size <= 64
    np.testing.assert_allclose(scale, np.abs(W).max() / 63, rtol=1e-7)


@given(seed=seeds, bits=st.integers(2, 8))
def test_a_per_channel_grid_is_recovered_channel_by_channel(seed, bits):
    """A per-channel quantizer (symmetric uniform, one scale per output channel) has no common step."""
    W = np.random.default_rng(seed).normal(size=(6, 4, 3, 3)) * np.geomspace(0.1, 3.0, 6)[:, None, None, None]
    u = dfmpc.uniform(W, bits, symmetric=True, per_channel=True)
    W_q = dfmpc.dequantize(u).astype(np.float32)
    q, scale = integer_grid(W_q)
    back = _dequantize(q, scale)
    assert np.all(np.abs(back.astype(np.float64) - W_q) <= DEQUANT_RTOL * np.abs(W_q.astype(np.float64)))


def test_weights_on_no_int8_grid_are_refused_naming_the_layer():
    """Negative controls: float weights, an 8-bit DoReFa grid (odd q up to 255) and too many levels for ``bits``."""
    W = np.random.default_rng(0).normal(size=(8, 4, 3, 3))
    with pytest.raises(ValueError, match="'conv7'.*not on an integer grid"):
        integer_grid(W.astype(np.float32), name="'conv7'")
    with pytest.raises(ValueError, match="not on an integer grid"):
        integer_grid(quantize_weights(W, 8), name="layer")
    with pytest.raises(ValueError, match="distinct levels, more than 2\\^2"):
        integer_grid(quantize_weights(W, 6), name="layer", bits=2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        integer_grid(np.full((2, 2), np.nan, np.float32))
    q, scale = integer_grid(np.zeros((3, 2), np.float32))                # all-zero layer: q = 0, scale 1
    assert not q.any() and np.all(scale == 1)


# ------------------------------------------------------------------------------------ DequantizeLinear

@given(seed=seeds, shape=st.sampled_from([(5, 3, 3, 3), (7, 4), (4,), (2, 6, 1, 1)]),
       dtype=st.sampled_from([np.int8, np.uint8]), per_axis=st.booleans())
def test_dequantize_linear_agrees_with_onnx_reference_and_onnxruntime(seed, shape, dtype, per_axis):
    """The importer's fold equals onnx.reference (opset 19, its first DequantizeLinear) and onnxruntime (opset 13)."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, size=shape).astype(dtype)
    n = shape[0] if per_axis else 1
    scale = rng.uniform(1e-4, 2.0, n).astype(np.float32)
    zp = rng.integers(info.min, info.max + 1, size=n).astype(dtype)
    if not per_axis:
        scale, zp = scale.reshape(()), zp.reshape(())
    ours = dequantize_linear(x, scale, zp, axis=0)
    for opset, run in ((19, lambda m: ReferenceEvaluator(m).run(None, {})[0]),
                       (13, lambda m: ort.InferenceSession(m.SerializeToString(),
                                                           providers=["CPUExecutionProvider"]).run(None, {})[0])):
        node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], axis=0)
        graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                  initializer=[numpy_helper.from_array(x, "x"), numpy_helper.from_array(scale, "s"),
                                               numpy_helper.from_array(zp, "z")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 7 if opset == 13 else 9
        np.testing.assert_array_equal(ours, run(model))


# ------------------------------------------------------------------------------------ the exported file

@pytest.fixture(scope="module")
def quantized():
    """ResNet-8 (random weights, 16/32/64 channels) at MP2/6 with absorb re-calibration: fast, and its 64-channel
    convs are larger than the importer's skeleton threshold (4096 elements)."""
    g = resnet_cifar(8, seed=3)
    q, report = dfmpc.quantize_network(g, 2, 6, recalibration="absorb")
    return q, report


def _weight_inits(model):
    inits = {t.name: t for t in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            d = dq[n.input[1]]
            out[n.name] = (inits[d.input[0]], numpy_helper.to_array(inits[d.input[1]]), d)
    return out


def test_qdq_file_has_int8_weights_on_their_grids(quantized, tmp_path):
    """onnx.checker passes; every Conv/Gemm weight is int8 through a per-output-channel DequantizeLinear (axis 0);
    <= 3 values in each low (ternary) layer, <= 2^6 in each 6-bit layer."""
    q, report = quantized
    path = tmp_path / "q.onnx"
    save_model(q, path, format="qdq", bits=layer_bits(q, report))
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 13
    weights = _weight_inits(model)
    assert set(weights) == {n.name for n in q.nodes if n.op in ("Conv", "Gemm")}
    lows = {p.low for p in report.pairs}
    assert lows
    for name, (t, scale, dq) in weights.items():
        assert t.data_type == onnx.TensorProto.INT8
        assert [a.i for a in dq.attribute if a.name == "axis"] == [0] and scale.shape == (t.dims[0],)
        levels = np.unique(numpy_helper.to_array(t)).size
        assert levels <= (3 if name in lows else 2 ** 6), name
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 for t in model.graph.initializer)


def test_qdq_runs_in_onnxruntime_and_the_engine_as_the_float_export(quantized, tmp_path):
    """Same logits as the float export up to float32 rounding of the weights (<= 2^-22 relative each)."""
    q, _ = quantized
    save_model(q, tmp_path / "f.onnx")
    save_model(q, tmp_path / "q.onnx", format="qdq")
    x = np.random.default_rng(0).normal(size=(32, 1, 28, 28)).astype(np.float32)

    def ort_run(p):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})[0]
    ref = q.run(x)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ort_run(tmp_path / "q.onnx"), ort_run(tmp_path / "f.onnx"), rtol=0, atol=1e-4 * scale)
    g = load_model(tmp_path / "q.onnx")                              # DequantizeLinear folded on import
    assert {n.op for n in g.nodes} == {n.op for n in q.nodes}
    for n in q.nodes:
        if "W" in n.params:
            np.testing.assert_allclose(g.node(n.name).params["W"], n.params["W"], rtol=DEQUANT_RTOL, atol=0)
    np.testing.assert_allclose(g.run(x), ref, rtol=0, atol=1e-4 * scale)
    np.testing.assert_array_equal(load_model(tmp_path / "f.onnx").run(x), ref)      # control: the float file is exact


def test_qdq_refuses_a_float_graph_and_npz(tmp_path):
    g = resnet_cifar(8, seed=3)
    with pytest.raises(ValueError, match="not on an integer grid"):
        save_model(g, tmp_path / "g.onnx", format="qdq")
    with pytest.raises(ValueError, match="format"):
        save_model(g, tmp_path / "g.npz", format="qdq")
    with pytest.raises(ValueError, match="format: expected one of"):
        save_model(g, tmp_path / "g.onnx", format="int4")
    assert list(tmp_path.iterdir()) == []                            # nothing written


def test_cli_quantize_format_qdq(tmp_path, capsys):
    from dfmpc.cli import main
    src = tmp_path / "m.npz"
    g = resnet_cifar(8, seed=3)
    save_model(g, src)
    out = tmp_path / "m_qdq.onnx"
    assert main(["quantize", str(src), "--recalibration", "absorb", "--format", "qdq", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "qdq"
    model = onnx.load(out)
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == len(g.nodes_of("Conv") + g.nodes_of("Gemm"))
    assert main(["quantize", str(src), "--format", "qdq", "-o", str(tmp_path / "m.q.npz")]) == 2
    assert "--format qdq" in capsys.readouterr().err
    assert not (tmp_path / "m.q.npz").exists()


# ------------------------------------------------------------------------------------ the zoo model

@pytest.mark.slow
def test_zoo_resnet20_mp26_qdq_predicts_as_the_float_export_on_the_test_set(tmp_path):
    """Issue 14's target: ResNet-20 MP2/6 (default DF-MPC) in onnxruntime, QDQ against float export, 10000 images.

    The QDQ weights differ from the float ones by float32 rounding only (<= 2^-22 relative), so a prediction
    may change only where the float export's top-2 logits are nearly tied (margin < 1e-3); measured: none change.
    """
    from dfmpc.evaluation import load_dataset, load_zoo_model
    q, report = dfmpc.quantize_network(load_zoo_model("resnet20"), 2, 6)
    save_model(q, tmp_path / "f.onnx")
    save_model(q, tmp_path / "q.onnx", format="qdq", bits=layer_bits(q, report))
    x, y = load_dataset("fashion-mnist")

    def ort_run(p):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 1000]})[0] for i in range(0, len(x), 1000)])
    lf, lq = ort_run(tmp_path / "f.onnx"), ort_run(tmp_path / "q.onnx")
    changed = lf.argmax(1) != lq.argmax(1)
    top2 = np.sort(lf, axis=1)[:, -2:]
    assert np.all(top2[changed, 1] - top2[changed, 0] < 1e-3)
    assert abs(np.mean(lf.argmax(1) == y) - np.mean(lq.argmax(1) == y)) <= changed.mean()
    for name, (t, _, _) in _weight_inits(onnx.load(tmp_path / "q.onnx")).items():
        assert t.data_type == onnx.TensorProto.INT8
        assert np.unique(numpy_helper.to_array(t)).size <= (3 if name in {p.low for p in report.pairs} else 64)


def test_docstring_examples():
    """integer_grid's examples check Eq. (3)-(4) and (6); dequantize_linear's checks y = (x - zero_point) * scale."""
    import doctest

    import dfmpc.interop.onnx_import
    import dfmpc.interop.qdq
    for module in (dfmpc.interop.qdq, dfmpc.interop.onnx_import):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_qdq_softmax_only_over_the_last_axis(tmp_path):
    """Opset 13 (per-axis DequantizeLinear) Softmax takes one axis: exported when it is the last, refused otherwise."""
    from dfmpc.engine.graph import Graph, Node
    rng = np.random.default_rng(0)
    W_fc = quantize_weights(rng.normal(size=(3, 4)), 6)
    g = Graph([Node("fc", "Gemm", ["x"], ["y"], {}, {"W": W_fc}), Node("sm", "Softmax", ["y"], ["p"], {"axis": 1})],
              ["x"], ["p"], {"x": (4,)})
    save_model(g, tmp_path / "ok.onnx", format="qdq")
    x = rng.normal(size=(5, 4)).astype(np.float32)
    s = ort.InferenceSession(str(tmp_path / "ok.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(s.run(None, {"x": x})[0], g.run(x), rtol=1e-6, atol=1e-7)
    W_conv = quantize_weights(rng.normal(size=(2, 1, 3, 3)), 2)
    g4 = Graph([Node("conv", "Conv", ["x"], ["y"], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1)}, {"W": W_conv}),
                Node("sm", "Softmax", ["y"], ["p"], {"axis": 1})], ["x"], ["p"], {"x": (1, 6, 6)})
    with pytest.raises(ValueError, match="Softmax node 'sm'.*last axis"):
        save_model(g4, tmp_path / "bad.onnx", format="qdq")
    assert not (tmp_path / "bad.onnx").exists()


# ------------------------------------------------------------------------------------ c applied by Eq. (7)

@settings(max_examples=50)
@given(seed=seeds, k=st.integers(2, 7), depthwise=st.booleans(), zeros=st.booleans())
def test_factored_grid_divides_c_out_of_eq7_weights(seed, k, depthwise, zeros):
    """W~_{:,j} = c_j kQ(W)_{:,j} (Eq. (7)): the grid of kQ(W) comes back; c is folded into a depthwise conv's
    scale, else kept as a per-input-channel factor; c_j = 0 columns hold a level of the grid (no new one)."""
    rng = np.random.default_rng(seed)
    O, C = (6, 6) if depthwise else (5, 4)
    W = rng.normal(size=(O, 1 if depthwise else C, 3, 3))
    c = rng.uniform(0.2, 1.8, C)
    if zeros:
        c[rng.integers(C)] = 0.0
    group = C if depthwise else 1
    W_tilde = dfmpc.scale_input_channels(quantize_weights(W, k, "dorefa"), c, group).astype(np.float32)
    q, scale, factor = factored_grid(W_tilde, c, group, bits=k)
    grid_q, _ = integer_grid(quantize_weights(W, k, "dorefa"), bits=k)
    live = np.broadcast_to((c > 0).reshape((-1, 1, 1, 1) if depthwise else (1, -1, 1, 1)), q.shape)
    np.testing.assert_array_equal(q[live], grid_q[live])
    assert np.unique(q).size <= 2 ** k and np.all(q % 2 == 1)          # c_j = 0 columns add no level
    if depthwise:
        assert factor is None
        assert np.all(scale[c == 0] == 0)
        np.testing.assert_allclose(scale[c > 0], (c * np.abs(quantize_weights(W, k, "dorefa")).max() / (2 ** k - 1))[c > 0],
                                   rtol=1e-6)
    else:
        assert factor.shape == (1, C, 1, 1)
        np.testing.assert_array_equal(factor.ravel(), c.astype(np.float32))


def test_factored_grid_refuses_weights_that_are_not_eq7_of_this_c():
    W_tilde = quantize_weights(np.random.default_rng(0).normal(size=(4, 3, 3, 3)), 6)       # c = 1 applied
    with pytest.raises(ValueError, match="c = 0"):
        factored_grid(W_tilde, np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="not on an integer grid|not reproduced"):
        factored_grid(W_tilde, np.array([1.0, 0.37, 1.0]))


def test_qdq_export_of_eq7_pairs_keeps_c_as_an_input_channel_factor(tmp_path):
    """c_form='eq7': conv B carries c on its input channels; with report= the file has one Mul per pair after the
    DequantizeLinear and runs as the float export; without report= the export is refused, naming the layer."""
    q, report = dfmpc.quantize_network(resnet_cifar(8, seed=3), 2, 6, recalibration="absorb", c_form="eq7")
    assert report.pairs and all(p.form == "eq7" for p in report.pairs)
    with pytest.raises(ValueError, match=f"{report.pairs[0].high}.*pass report="):
        save_model(q, tmp_path / "no.onnx", format="qdq")
    save_model(q, tmp_path / "f.onnx")
    save_model(q, tmp_path / "q.onnx", format="qdq", report=report)
    model = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(model, full_check=True)
    muls = [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("_input_factor_mul")]
    assert sorted(n.output[0] for n in muls) == sorted(f"{p.high}.W" for p in report.pairs)
    x = np.random.default_rng(1).normal(size=(16, 1, 28, 28)).astype(np.float32)
    ref = q.run(x)

    def ort_run(p):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(ort_run(tmp_path / "q.onnx"), ort_run(tmp_path / "f.onnx"), rtol=0,
                               atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(load_model(tmp_path / "q.onnx").run(x), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_clip_bounds_are_exported_as_scalars_and_read_back():
    """ONNX Clip takes scalar min / max: a 0-d bound stays 0-d in the export, and the importer reads either form."""
    from dfmpc.engine.graph import Graph, Node
    from dfmpc.interop import from_onnx, to_onnx
    W = quantize_weights(np.random.default_rng(0).normal(size=(2, 1, 3, 3)), 6)
    g = Graph([Node("conv", "Conv", ["x"], ["y"], {"kernel_shape": (3, 3)}, {"W": W}),
               Node("clip", "Clip", ["y"], ["z"], {"min": 0.0, "max": 6.0})], ["x"], ["z"], {"x": (1, 5, 5)})
    for fmt in ("float", "qdq"):
        model = to_onnx(g, fmt)
        bounds = [t for t in model.graph.initializer if t.name.startswith("clip.")]
        assert [list(t.dims) for t in bounds] == [[], []]
        back = from_onnx(model)
        assert back.node("clip").attrs == {"min": 0.0, "max": 6.0}
