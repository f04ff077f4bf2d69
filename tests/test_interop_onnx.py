"""ONNX import of exporter patterns, export round trips, npz, and bad input, all against onnxruntime."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfmpc import Graph, load_model, save_model
from dfmpc.engine.builders import resnet_cifar
from dfmpc.interop import from_onnx, to_onnx

from _onnx_helpers import ort_run

# Small graphs (<= 3 layers, O(1) values): float32 differences between engines are ~1e-6.
ATOL = 1e-4
RNG = np.random.default_rng(0)


def _w(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def _model(nodes, inits, x_shape, out="y", opset=13, extra_inputs=()):
    g = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape), *extra_inputs],
        [helper.make_empty_tensor_value_info(out)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7 if opset <= 13 else 8
    inferred = onnx.shape_inference.infer_shapes(m).graph        # give the output its inferred type
    known = {v.name: v for v in list(inferred.value_info) + list(inferred.output)}
    if out in known and known[out].type.tensor_type.HasField("shape"):
        m.graph.output[0].CopyFrom(known[out])
    else:                                                        # e.g. after a computed Reshape
        m.graph.output[0].CopyFrom(helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, None]))
    return m


def _check_against_ort(model, x, atol=ATOL):
    """Import, run, compare with onnxruntime; then export and compare again (round trip)."""
    graph = from_onnx(model)
    ref = ort_run(model, {"x": x})[0]
    got = graph.run(x)
    np.testing.assert_allclose(got, ref, atol=atol, rtol=1e-5)
    exported = to_onnx(graph)
    np.testing.assert_allclose(ort_run(exported, {graph.inputs[0]: x})[0], got, atol=atol, rtol=1e-5)
    return graph


def _bn_inits(c, prefix="bn"):
    return {f"{prefix}.s": RNG.uniform(0.5, 1.5, c).astype(np.float32), f"{prefix}.b": _w(c, scale=0.1),
            f"{prefix}.m": _w(c, scale=0.1), f"{prefix}.v": RNG.uniform(0.5, 1.5, c).astype(np.float32)}


CONV_VARIANTS = [  # (C, O, k, attrs)
    (3, 4, 3, {"pads": [1, 1, 1, 1]}),
    (3, 4, 3, {"pads": [0, 1, 2, 0], "strides": [2, 1]}),               # asymmetric pads
    (2, 4, 3, {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    (4, 6, 3, {"group": 2, "pads": [1, 1, 1, 1]}),
    (4, 4, 3, {"group": 4, "pads": [1, 0, 1, 0], "strides": [2, 2]}),   # depthwise
    (3, 5, 3, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    (3, 5, 2, {"auto_pad": "SAME_LOWER"}),
    (3, 5, 3, {"auto_pad": "VALID"}),
]


@pytest.mark.parametrize("c,o,k,attrs", CONV_VARIANTS)
@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_relu_variants(c, o, k, attrs, bias):
    g = attrs.get("group", 1)
    inits = {"W": _w(o, c // g, k, k), **_bn_inits(o)}
    ins = ["x", "W"] + (["B"] if bias else [])
    if bias:
        inits["B"] = _w(o)
    nodes = [helper.make_node("Conv", ins, ["c"], **attrs),
             helper.make_node("BatchNormalization", ["c", "bn.s", "bn.b", "bn.m", "bn.v"], ["b"], epsilon=1e-3),
             helper.make_node("Relu", ["b"], ["y"])]
    graph = _check_against_ort(_model(nodes, inits, [2, c, 7, 6]), _w(2, c, 7, 6, scale=1.0))
    bn = graph.nodes_of("BatchNormalization")[0]
    assert bn.attrs["epsilon"] == pytest.approx(1e-3) and bn.params["var"].min() > 0


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ("MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("GlobalAveragePool", {}),
])
def test_pooling(op, attrs):
    _check_against_ort(_model([helper.make_node(op, ["x"], ["y"], **attrs)], {}, [2, 3, 8, 7]),
                       _w(2, 3, 8, 7, scale=1.0))


@pytest.mark.parametrize("pattern", ["flatten", "reshape_static", "reshape_shape_gather"])
@pytest.mark.parametrize("head", ["gemm_transB", "gemm_plain_alpha_beta", "matmul_add"])
def test_classifier_head_patterns(pattern, head):
    """Flatten vs Reshape (static, or Shape->Gather->Unsqueeze->Concat) and Gemm/MatMul variants."""
    nodes, inits = [helper.make_node("GlobalAveragePool", ["x"], ["p"])], {}
    if pattern == "flatten":
        nodes.append(helper.make_node("Flatten", ["p"], ["f"], axis=1))
    elif pattern == "reshape_static":
        inits["shape"] = np.array([-1, 4], np.int64)
        nodes.append(helper.make_node("Reshape", ["p", "shape"], ["f"]))
    else:
        inits.update({"zero": np.array(0, np.int64), "minus1": np.array([-1], np.int64),
                      "ax0": np.array([0], np.int64)})
        nodes += [helper.make_node("Shape", ["p"], ["s"]),
                  helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
                  helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
                  helper.make_node("Concat", ["n1", "minus1"], ["tgt"], axis=0),
                  helper.make_node("Reshape", ["p", "tgt"], ["f"])]
    if head == "gemm_transB":
        inits.update({"W": _w(5, 4), "B": _w(5)})
        nodes.append(helper.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1))
    elif head == "gemm_plain_alpha_beta":
        inits.update({"W": _w(4, 5), "B": _w(1, 5)})
        nodes.append(helper.make_node("Gemm", ["f", "W", "B"], ["y"], alpha=0.5, beta=2.0))
    else:
        inits.update({"W": _w(4, 5), "B": _w(5)})
        nodes += [helper.make_node("MatMul", ["f", "W"], ["mm"]), helper.make_node("Add", ["mm", "B"], ["y"])]
    inits["unused_initializer"] = _w(3)
    # the Shape pattern is exported with a fixed batch (as torch does): batch 2 both at export and run
    graph = _check_against_ort(_model(nodes, inits, [2, 4, 5, 5]), _w(2, 4, 5, 5, scale=1.0))
    assert [n.op for n in graph][-2:] in (["Flatten", "Gemm"], ["Gemm", "Add"])


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [(2, 3), (-1, -2)])
def test_spatial_reduce_mean_is_global_average_pool(opset, keepdims, axes):
    """ReduceMean over H and W (PyTorch's ``x.mean((2, 3))``; axes an attribute before opset 18, an input
    from 18) imports as GlobalAveragePool (+ Flatten when keepdims=0) and matches onnxruntime."""
    inits = {"W": _w(5, 4)}
    if opset >= 18:
        inits["axes"] = np.array(axes, np.int64)
        mean = helper.make_node("ReduceMean", ["x", "axes"], ["p"], keepdims=keepdims, name="m")
    else:
        mean = helper.make_node("ReduceMean", ["x"], ["p"], axes=list(axes), keepdims=keepdims, name="m")
    nodes = [mean] + ([] if keepdims == 0 else [helper.make_node("Flatten", ["p"], ["pf"], axis=1)])
    nodes.append(helper.make_node("Gemm", ["p" if keepdims == 0 else "pf", "W"], ["y"], transB=1))
    graph = _check_against_ort(_model(nodes, inits, [2, 4, 5, 6], opset=opset), _w(2, 4, 5, 6, scale=1.0))
    assert [n.op for n in graph] == ["GlobalAveragePool", "Flatten", "Gemm"]


@pytest.mark.parametrize("axes", [(1,), (1, 2, 3), (3,)])
def test_other_reduce_mean_refused(axes):
    """A mean over channels, or over one spatial axis, is not a global average pool: refused, named."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], axes=list(axes), keepdims=1, name="red")]
    with pytest.raises(ValueError, match=r"node 'red' \(ReduceMean\).*only a mean over the spatial axes"):
        from_onnx(_model(nodes, {}, [1, 3, 4, 4]))


@pytest.mark.parametrize("opset", [11, 13])
def test_normalisation_pad_and_squeeze_patterns(opset):
    """What PyTorch exports for ``(x - m) / s`` inside the model, ``F.pad`` before a conv and
    ``x.squeeze(-1).squeeze(-1)`` / ``x.squeeze()`` after a global pool: imported as Add / Mul constants,
    pads merged into the conv, Flatten; the same outputs as onnxruntime."""
    inits = {"m": np.array(0.286, np.float32), "s": np.array(0.353, np.float32), "w": _w(4, 3, 3, 3),
             "W": _w(5, 4)}
    nodes = [helper.make_node("Sub", ["x", "m"], ["a"]), helper.make_node("Div", ["a", "s"], ["b"])]
    if opset >= 11:
        inits.update({"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)})
        nodes.append(helper.make_node("Pad", ["b", "pads"], ["c"], mode="constant"))
    nodes += [helper.make_node("Conv", ["c", "w"], ["d"], pads=[1, 0, 0, 1]),
              helper.make_node("GlobalAveragePool", ["d"], ["e"])]
    if opset >= 13:
        inits.update({"ax3": np.array([3], np.int64), "ax2": np.array([-1], np.int64)})
        nodes += [helper.make_node("Squeeze", ["e", "ax3"], ["f1"]), helper.make_node("Squeeze", ["f1", "ax2"], ["f"])]
    else:
        nodes.append(helper.make_node("Squeeze", ["e"], ["f"]))            # every axis of size 1
    nodes.append(helper.make_node("Gemm", ["f", "W"], ["y"], transB=1))
    graph = _check_against_ort(_model(nodes, inits, [2, 3, 7, 6], opset=opset), _w(2, 3, 7, 6, scale=1.0))
    assert [n.op for n in graph][:3] == ["Add", "Mul", "Conv"] and "Pad" not in [n.op for n in graph]
    assert tuple(graph.nodes[2].attrs["pads"]) == (2, 2, 2, 2)            # (1+1, 2+0, 2+0, 1+1)
    assert [n.op for n in graph][-2:] == ["Flatten", "Gemm"]


def test_other_sub_div_squeeze_pad_refused():
    """Patterns with no exact engine form are refused, naming the node and what is supported."""
    cases = [
        ([helper.make_node("Sub", ["c", "x"], ["y"], name="rsub")], {"c": np.float32(1)}, "rsub.*activation minus"),
        ([helper.make_node("Div", ["x", "c"], ["y"], name="div0")], {"c": np.zeros(3, np.float32).reshape(1, 3, 1, 1)},
         "div0.*zeros"),
        ([helper.make_node("Squeeze", ["x", "ax"], ["y"], name="sq")], {"ax": np.array([0], np.int64)},
         "sq.*Squeeze of the 1 x 1"),
        ([helper.make_node("Pad", ["x", "p"], ["y"], name="pad", mode="reflect")],
         {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}, "Pad x1: 'pad'"),
    ]
    for nodes, inits, match in cases:
        with pytest.raises(ValueError, match=match):
            from_onnx(_model(nodes, inits, [1, 3, 1, 1] if nodes[0].op_type == "Squeeze" else [1, 3, 4, 4]))


@pytest.mark.parametrize("alpha", [None, 0.2, 1.5])
def test_leaky_relu(alpha):
    """LeakyRelu (ONNX default alpha 0.01 when the attribute is missing) matches onnxruntime and round-trips."""
    kw = {} if alpha is None else {"alpha": alpha}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("LeakyRelu", ["c"], ["y"], **kw)]
    graph = _check_against_ort(_model(nodes, {"w": _w(4, 3, 3, 3)}, [2, 3, 5, 5]), _w(2, 3, 5, 5, scale=1.0))
    assert graph.nodes[-1].attrs["alpha"] == pytest.approx(0.01 if alpha is None else alpha)


def test_residual_concat_clip_dropout_identity_softmax():
    inits = {"W1": _w(4, 3, 3, 3), "W2": _w(4, 3, 1, 1), "W3": _w(3, 8, 1, 1),
             "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32), "ratio": np.array(0.3, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("Clip", ["s", "lo", "hi"], ["r6"]),           # ReLU6
             helper.make_node("Concat", ["r6", "s"], ["cat"], axis=1),
             helper.make_node("Dropout", ["cat", "ratio"], ["d"]),
             helper.make_node("Identity", ["d"], ["i"]),
             helper.make_node("Conv", ["i", "W3"], ["z"]),
             helper.make_node("Sum", ["z", "x", "z"], ["zz"]),
             helper.make_node("Softmax", ["zz"], ["y"], axis=-1)]
    g = _check_against_ort(_model(nodes, inits, [2, 3, 5, 5]), _w(2, 3, 5, 5, scale=2.0))
    assert g.nodes_of("Clip")[0].attrs == {"min": 0.0, "max": 6.0}


def test_legacy_opset_clip_attrs_and_softmax():
    nodes = [helper.make_node("Clip", ["x"], ["c"], min=-1.0, max=2.0),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Softmax", ["f"], ["y"])]
    _check_against_ort(_model(nodes, {}, [2, 3, 2, 2], opset=9), _w(2, 3, 2, 2, scale=3.0))


def test_round_trip_onnx_and_npz_equal_run(tmp_path):
    g = resnet_cifar(8, image_size=12, seed=1)
    x = _w(3, 1, 12, 12, scale=1.0)
    want = g.run(x)
    for suffix in (".onnx", ".npz"):
        path = tmp_path / f"m{suffix}"
        save_model(g, path)
        g2 = load_model(path)
        assert [n.name for n in g2] == [n.name for n in g]
        np.testing.assert_array_equal(g2.run(x), want)   # same kernels, same weights: bit-identical
    np.testing.assert_allclose(ort_run(onnx.load(tmp_path / "m.onnx"), {"input": x})[0], want, atol=ATOL, rtol=1e-5)


def test_export_of_edited_graph_reflects_edit():
    """Negative control for the round trip: an edited BN is what gets exported."""
    g = resnet_cifar(8, image_size=12, seed=1)
    x = _w(2, 1, 12, 12, scale=1.0)
    bn = g.nodes_of("BatchNormalization")[1]
    g2 = g.with_params({bn.name: {"beta": bn.params["beta"] + 1.0}})
    ref2 = ort_run(to_onnx(g2), {"input": x})[0]
    np.testing.assert_allclose(ref2, g2.run(x), atol=ATOL, rtol=1e-5)
    assert np.abs(ref2 - g.run(x)).max() > 100 * ATOL


def test_npz_uses_no_pickle(tmp_path):
    g = resnet_cifar(8, image_size=12)
    save_model(g, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


# ----------------------------------------------------------------- bad input
def test_truncated_and_non_onnx_files(tmp_path):
    g = resnet_cifar(8, image_size=12)
    save_model(g, tmp_path / "good.onnx")
    data = (tmp_path / "good.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.onnx").write_text("this is not a model\n")
    for name in ("trunc.onnx", "text.onnx"):
        with pytest.raises(ValueError, match="ONNX"):
            load_model(tmp_path / name)
    (tmp_path / "bad.npz").write_bytes(data[:100])
    with pytest.raises(ValueError, match="npz"):
        load_model(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="suffix"):
        load_model(tmp_path / "good.pt")


def test_unsupported_op_refused_naming_nodes():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"),
             helper.make_node("LRN", ["a"], ["b"], name="norm1", size=3),
             helper.make_node("Tanh", ["b"], ["c"], name="act"),
             helper.make_node("LRN", ["c"], ["y"], name="norm2", size=3)]
    with pytest.raises(ValueError, match=r"LRN x2: 'norm1', 'norm2'; Tanh x1: 'act'"):
        from_onnx(_model(nodes, {}, [1, 3, 4, 4]))


def test_unconvertible_node_is_named():
    inits = {"shape": np.array([1, 3, 2, 8], np.int64)}
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="shuffle")]
    with pytest.raises(ValueError, match="node 'shuffle' \\(Reshape\\).*not of the flatten kind"):
        from_onnx(_model(nodes, inits, [1, 3, 4, 4]))
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dyn")]
    w_in = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 1, 1])
    with pytest.raises(ValueError, match="node 'dyn' \\(Conv\\).*must be a constant"):
        from_onnx(_model(nodes, {}, [1, 3, 4, 4], extra_inputs=[w_in]))


def test_wrong_input_shape_and_dtype_name_the_argument(tmp_path):
    g = resnet_cifar(8, image_size=12)
    with pytest.raises(ValueError, match=r"input 'input' has shape \(2, 3, 12, 12\), expected \(N, 1, 12, 12\)"):
        g.run(np.zeros((2, 3, 12, 12), np.float32))
    with pytest.raises(TypeError, match="input 'input' must be float32, got float64"):
        g.run(np.zeros((2, 1, 12, 12)))
    with pytest.raises(TypeError, match="Graph"):
        save_model("not a graph", tmp_path / "x.onnx")


def test_nothing_written_on_failure(tmp_path, monkeypatch):
    g = resnet_cifar(8, image_size=12)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"original")
    with pytest.raises(FileExistsError):
        save_model(g, target)                                  # never overwrite silently
    assert target.read_bytes() == b"original"
    with pytest.raises(ValueError, match="suffix"):
        save_model(g, tmp_path / "m.txt")
    with pytest.raises(FileNotFoundError):
        save_model(g, tmp_path / "no_such_dir" / "m.onnx")

    def broken(graph):
        raise ValueError("simulated exporter failure")
    monkeypatch.setattr("dfmpc.interop.onnx_export.to_onnx", broken)
    with pytest.raises(ValueError, match="simulated"):
        save_model(g, target, overwrite=True)
    assert target.read_bytes() == b"original"

    def fail_midway(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr("dfmpc.interop.npz_format.np.savez", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_model(g, tmp_path / "m.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]   # no temp files left
    monkeypatch.undo()
    save_model(g, target, overwrite=True)
    assert isinstance(load_model(target), Graph)


def test_saved_files_get_ordinary_permissions(tmp_path):
    """An atomic write gives what open(path, 'w') would: 0o666 minus the umask for a new file (not the temp
    file's owner-only 0o600), and the replaced file's own mode on overwrite."""
    g = resnet_cifar(8, image_size=12)
    mask = os.umask(0o022)
    try:
        save_model(g, tmp_path / "m.npz")
        assert os.stat(tmp_path / "m.npz").st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "m.npz", 0o640)
        save_model(g, tmp_path / "m.npz", overwrite=True)
        assert os.stat(tmp_path / "m.npz").st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)
