"""The graph IR: construction checks, queries, copies, parameter replacement, chunked running."""

import numpy as np
import pytest

from dfmpc.engine import Graph, Node
from dfmpc.engine.builders import conv_flops, resnet_cifar


def _tiny():
    rng = np.random.default_rng(0)
    nodes = [
        Node("conv", "Conv", ["x"], ["c"], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1)},
             {"W": rng.normal(size=(4, 2, 3, 3)).astype(np.float32)}),
        Node("bn", "BatchNormalization", ["c"], ["b"], {"epsilon": 1e-5},
             {"gamma": np.ones(4, np.float32), "beta": np.zeros(4, np.float32),
              "mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}),
        Node("relu", "Relu", ["b"], ["y"]),
    ]
    return Graph(nodes[::-1], ["x"], ["y"], {"x": (2, 5, 5)})   # given out of order on purpose


def test_topological_order_and_queries():
    g = _tiny()
    assert [n.name for n in g] == ["conv", "bn", "relu"]
    assert g.producer("c").name == "conv" and g.producer("x") is None
    assert [n.name for n in g.consumers("c")] == ["bn"]
    assert [n.name for n in g.nodes_of("BatchNormalization")] == ["bn"]
    assert "bn: BatchNormalization(c) -> b" in repr(g)


def test_construction_errors():
    relu = Node("r", "Relu", ["x"], ["y"])
    with pytest.raises(ValueError, match="duplicate node names"):
        Graph([relu, Node("r", "Relu", ["y"], ["z"])], ["x"], ["z"])
    with pytest.raises(ValueError, match="never produced"):
        Graph([Node("r", "Relu", ["missing"], ["y"])], ["x"], ["y"])
    with pytest.raises(ValueError, match="cycle"):
        Graph([Node("a", "Add", ["x", "q"], ["p"]), Node("b", "Relu", ["p"], ["q"])], ["x"], ["q"])
    with pytest.raises(ValueError, match=r"unsupported ops: 'lrn' \(LRN\)"):
        Graph([Node("lrn", "LRN", ["x"], ["y"])], ["x"], ["y"])


def test_copy_is_deep_and_with_params_leaves_original():
    g = _tiny()
    g2 = g.copy()
    g2.node("bn").params["gamma"][:] = 5
    assert g.node("bn").params["gamma"][0] == 1
    x = np.random.default_rng(1).normal(size=(3, 2, 5, 5)).astype(np.float32)
    g3 = g.with_params({"bn": {"gamma": np.full(4, 2.0)}})
    assert g.node("bn").params["gamma"][0] == 1 and g3.node("bn").params["gamma"].dtype == np.float32
    # ReLU is positively homogeneous and beta = mean = 0, so doubling gamma doubles the output
    np.testing.assert_allclose(g3.run(x), 2 * g.run(x), rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        g.with_params({"bn": {"gamma": np.ones(3)}})
    with pytest.raises(KeyError, match="no parameter 'W'"):
        g.with_params({"bn": {"W": np.ones(4)}})


def test_run_chunking_and_intermediates():
    g = resnet_cifar(8, image_size=12, seed=3)
    x = np.random.default_rng(0).normal(size=(7, 1, 12, 12)).astype(np.float32)
    full = g.run(x, batch_size=64)
    # chunked runs differ only by BLAS summation order: ~1e-6 relative on O(10) logits
    np.testing.assert_allclose(g.run(x, batch_size=3), full, rtol=1e-5, atol=1e-4)
    out = g.run_many(x, outputs=["stem.1", "logits"])
    assert out["stem.1"].shape == (7, 16, 12, 12) and out["logits"].shape == (7, 10)


def test_run_rejects_bad_inputs():
    g = _tiny()
    with pytest.raises(TypeError, match="float32"):
        g.run(np.zeros((1, 2, 5, 5)))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        g.run([[0.0]])
    with pytest.raises(ValueError, match=r"input 'x' has shape \(1, 3, 5, 5\), expected \(N, 2, 5, 5\)"):
        g.run(np.zeros((1, 3, 5, 5), np.float32))
    g.input_shapes = {}
    with pytest.raises(ValueError, match="node 'conv' \\(Conv\\)"):
        g.run(np.zeros((1, 3, 5, 5), np.float32))


def test_resnet_builder():
    g = resnet_cifar(20)
    assert len(g.nodes_of("Conv")) == 21 and len(g.nodes_of("BatchNormalization")) == 21
    assert g.node("layers.3.shortcut.0").attrs["strides"] == (2, 2)
    assert conv_flops(g, (1, 28, 28)) > 5e7
    with pytest.raises(ValueError, match="6n"):
        resnet_cifar(21)


def test_fused_execution_equals_unfused():
    """The run-time Conv+BN(+ReLU) fusion changes only float32 rounding.

    Requesting every BN output as an output switches the fusion off for those nodes.
    """
    g = resnet_cifar(8, image_size=12, seed=5)
    x = np.random.default_rng(2).normal(size=(4, 1, 12, 12)).astype(np.float32)
    fused = g.run(x)
    bn_outs = [n.outputs[0] for n in g.nodes_of("BatchNormalization")]
    unfused = g.run_many(x, outputs=bn_outs + ["logits"])
    # folding BN into the conv reorders a handful of float32 products: ~1e-6 relative
    np.testing.assert_allclose(fused, unfused["logits"], rtol=1e-4, atol=1e-4 * np.abs(fused).max())
    # the BN outputs really were computed by the BN op: they equal BN applied by hand
    bn = g.nodes_of("BatchNormalization")[0]
    conv_out = g.run_many(x, outputs=[bn.inputs[0], bn.outputs[0]])
    p = bn.params
    want = ((conv_out[bn.inputs[0]] - p["mean"][:, None, None]) / np.sqrt(p["var"][:, None, None] + 1e-5)
            * p["gamma"][:, None, None] + p["beta"][:, None, None])
    np.testing.assert_allclose(conv_out[bn.outputs[0]], want, rtol=1e-5, atol=1e-5)


def test_run_never_mutates_inputs_or_params():
    g = resnet_cifar(8, image_size=12, seed=5)
    before = {n.name: {k: v.copy() for k, v in n.params.items()} for n in g}
    x = np.random.default_rng(2).normal(size=(3, 1, 12, 12)).astype(np.float32)
    x0 = x.copy()
    g.run(x, batch_size=2)
    np.testing.assert_array_equal(x, x0)
    for n in g:
        for k, v in n.params.items():
            np.testing.assert_array_equal(v, before[n.name][k])


def test_inplace_add_and_relu_keep_shared_tensors():
    """Add and Relu run in place only on tensors nobody else reads: asking for the
    Add inputs as outputs (or reading one twice) must not change any result."""
    rng = np.random.default_rng(4)
    w = {"W": rng.normal(size=(3, 2, 3, 3)).astype(np.float32)}
    nodes = [
        Node("c1", "Conv", ["x"], ["a"], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1)}, w),
        Node("c2", "Conv", ["x"], ["b"], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1)}, w),
        Node("add", "Add", ["a", "b"], ["s"]),
        Node("relu", "Relu", ["s"], ["r"]),
        Node("add2", "Add", ["r", "a2"], ["y"]),
        Node("c3", "Conv", ["x"], ["a2"], {"kernel_shape": (1, 1)},
             {"W": rng.normal(size=(3, 2, 1, 1)).astype(np.float32)}),
    ]
    g = Graph(nodes, ["x"], ["y"], {"x": (2, 5, 5)})
    x = rng.normal(size=(4, 2, 5, 5)).astype(np.float32)
    inter = g.run_many(x, outputs=["a", "b", "s", "a2", "y"])
    np.testing.assert_array_equal(inter["a"], inter["b"])            # same conv twice
    np.testing.assert_allclose(inter["s"], 2 * inter["a"], rtol=1e-6)
    np.testing.assert_allclose(inter["y"], np.maximum(inter["s"], 0) + inter["a2"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g.run(x), inter["y"], rtol=1e-6, atol=1e-6)


def test_conv_bn_add_relu_fusion_matches_unfused():
    """Conv -> BN -> Add -> Relu runs as one conv with the residual in its epilogue; the result
    equals the node-by-node run (fusion off by requesting the BN output), also when the
    residual broadcasts (then the executor falls back to a separate Add)."""
    rng = np.random.default_rng(7)

    def bn(name, src, dst, c):
        return Node(name, "BatchNormalization", [src], [dst], {"epsilon": 1e-5},
                    {"gamma": rng.uniform(0.5, 2, c).astype(np.float32), "beta": rng.normal(size=c).astype(np.float32),
                     "mean": rng.normal(size=c).astype(np.float32), "var": rng.uniform(0.5, 2, c).astype(np.float32)})

    for residual_pool in (False, True):
        nodes = [
            Node("c1", "Conv", ["x"], ["a"], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1)},
                 {"W": rng.normal(size=(5, 3, 3, 3)).astype(np.float32)}),
            bn("b1", "a", "ab", 5),
            Node("sc", "Conv", ["x"], ["s"], {"kernel_shape": (1, 1)}, {"W": rng.normal(size=(5, 3, 1, 1)).astype(np.float32)}),
        ]
        if residual_pool:
            nodes.append(Node("gap", "GlobalAveragePool", ["s"], ["r"]))
        nodes += [Node("add", "Add", ["ab", "r" if residual_pool else "s"], ["y0"]), Node("relu", "Relu", ["y0"], ["y"])]
        g = Graph(nodes, ["x"], ["y"], {"x": (3, 6, 6)})
        x = rng.normal(size=(5, 3, 6, 6)).astype(np.float32)
        fused = g.run(x, batch_size=2)
        unfused = g.run_many(x, outputs=["ab", "y"])
        np.testing.assert_allclose(fused, unfused["y"], rtol=1e-5, atol=1e-5)
        assert (fused >= 0).all() and (fused == 0).any()


@pytest.mark.parametrize("edit", ["W", "var", "epsilon", "new array"])
def test_folded_weights_are_reused_until_a_parameter_changes(edit):
    """The executor keeps the BN-folded weights of a conv between calls (so that the kernels' layouts of
    them are kept too) and folds anew when the conv's or the BN's parameters change, in place or by a new
    array; negative control: after the edit the output is not the stale one, it equals a fresh copy's."""
    from dfmpc.engine import executor
    g = _tiny()
    x = np.random.default_rng(1).normal(size=(3, 2, 5, 5)).astype(np.float32)
    first = g.run(x)
    conv, bn = g.node("conv"), g.node("bn")
    kept = executor._FOLDED[(id(conv), id(bn))][2]
    np.testing.assert_array_equal(g.run(x), first)
    assert executor._FOLDED[(id(conv), id(bn))][2] is kept           # reused, not folded again
    if edit == "W":
        conv.params["W"] *= -1                                        # in place
    elif edit == "var":
        bn.params["var"][0] = 4.0
    elif edit == "epsilon":
        bn.attrs["epsilon"] = 0.5
    else:
        bn.params["gamma"] = np.full(4, 2.0, np.float32)
    got = g.run(x)
    assert executor._FOLDED[(id(conv), id(bn))][2] is not kept
    assert not np.allclose(got, first)
    np.testing.assert_array_equal(got, g.copy().run(x))
