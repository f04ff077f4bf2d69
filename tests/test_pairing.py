"""Pairing (paper Fig. 2, Algorithm 1): the patterns come out of the max-low-weights rule."""

import os

import numpy as np
import onnx
import pytest

import dfmpc
from dfmpc.engine import Graph, Node
from dfmpc.engine.builders import resnet_cifar
from dfmpc.pairing import candidate_pairs, find_pairs

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def conv(name, x, cin, cout, k=3, group=1, rng=np.random.default_rng(0)):
    W = rng.normal(size=(cout, cin // group, k, k)).astype(np.float32)
    return Node(name, "Conv", [x], [name], {"pads": (k // 2,) * 4, "group": group}, {"W": W})


def bn(name, x, c):
    return Node(name, "BatchNormalization", [x], [name], {"epsilon": 1e-5},
                {"gamma": np.ones(c, np.float32), "beta": np.zeros(c, np.float32),
                 "mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)})


def chain(widths, act="Relu", pool_after=()):
    """A plain VGG-style chain conv-BN-act(-MaxPool) x len(widths), then GAP + FC."""
    nodes, x, cin = [], "x", 1
    for i, c in enumerate(widths):
        nodes += [conv(f"conv{i}", x, cin, c), bn(f"bn{i}", f"conv{i}", c)]
        attrs = {"min": 0.0, "max": 6.0} if act == "Clip" else {}
        nodes.append(Node(f"act{i}", act, [f"bn{i}"], [f"act{i}"], attrs))
        x, cin = f"act{i}", c
        if i in pool_after:
            nodes.append(Node(f"pool{i}", "MaxPool", [x], [f"pool{i}"], {"kernel_shape": (2, 2), "strides": (2, 2)}))
            x = f"pool{i}"
    nodes += [Node("gap", "GlobalAveragePool", [x], ["gap"]), Node("flat", "Flatten", ["gap"], ["flat"]),
              Node("fc", "Gemm", ["flat"], ["fc"], {}, {"W": np.ones((10, cin), np.float32)})]
    return Graph(nodes, ["x"], ["fc"], {"x": (1, 16, 16)})


def test_resnet_basic_block_pattern():
    """Fig. 2, basic block: conv1 low, conv2 high; stem, shortcut convs and FC unpaired."""
    g = resnet_cifar(20)
    p = find_pairs(g)
    assert [(q.low, q.high) for q in p.pairs] == [(f"layers.{i}.conv1", f"layers.{i}.conv2") for i in range(9)]
    assert p.unpaired == ["stem.0", "layers.3.shortcut.0", "layers.6.shortcut.0", "fc"]


def test_resnet56_pattern():
    """Fig. 2 on ResNet-56: 27 blocks, each conv1 low / conv2 high."""
    p = find_pairs(resnet_cifar(56))
    assert len(p.pairs) == 27 and all(q.low.endswith("conv1") and q.high.endswith("conv2") for q in p.pairs)


def test_bottleneck_pattern_on_real_resnet50_topology():
    """Fig. 2, bottleneck: the 3x3 is low, its following 1x1 high (ONNX light ResNet-50 topology)."""
    g = dfmpc.load_model(os.path.join(LIGHT, "light_resnet50.onnx"))
    p = find_pairs(g)
    assert len(p.pairs) == 16                                      # one per bottleneck block
    assert all(g.node(q.low).params["W"].shape[2:] == (3, 3) for q in p.pairs)
    assert all(g.node(q.high).params["W"].shape[2:] == (1, 1) for q in p.pairs)


def test_plain_chain_alternates_and_keeps_first_high():
    """Fig. 2, plain chain: (low, high) alternate; the stem conv is never low by default; pooling may sit between."""
    g = chain([16, 16, 32, 32, 64, 64], pool_after=(1, 3))
    p = find_pairs(g)
    assert [(q.low, q.high) for q in p.pairs] == [("conv2", "conv3"), ("conv4", "conv5")]
    assert p.unpaired == ["conv0", "conv1", "fc"]
    p_all = find_pairs(g, keep_first_high=False)          # with the stem allowed: the max-weight choice changes
    lows = sum(g.node(q.low).params["W"].size for q in p_all.pairs)
    assert lows >= sum(g.node(q.low).params["W"].size for q in p.pairs)


def test_max_weight_choice_beats_greedy_on_a_path():
    """The DP picks the pairing with most low-bit weights, not the first candidate (greedy would take conv1)."""
    g = chain([4, 8, 64, 64])          # conv1->conv2 has few weights at low, conv2->conv3 many
    p = find_pairs(g)
    assert [(q.low, q.high) for q in p.pairs] == [("conv2", "conv3")]


def test_relu6_is_refused_with_reason():
    """ReLU6 (Clip) is not positively homogeneous: no pair through it, and the reason is reported."""
    g = chain([8, 8, 8, 8], act="Clip")
    p = find_pairs(g)
    assert p.pairs == []
    assert p.rejected and all("not positively homogeneous" in why for _, why in p.rejected)
    assert "not paired" in p.describe(2, 6)


def test_explicit_pairs_validated():
    """An explicit assignment is used as given; an impossible pair is refused naming the candidates."""
    g = resnet_cifar(20)
    p = find_pairs(g, pairs=[("layers.0.conv1", "layers.0.conv2")])
    assert len(p.pairs) == 1 and "layers.1.conv1" in p.unpaired
    with pytest.raises(ValueError, match="is not a conv -> BN -> ReLU -> conv chain"):
        find_pairs(g, pairs=[("layers.0.conv2", "layers.1.conv1")])     # conv2 feeds the residual add
    with pytest.raises(ValueError, match="expected \\(low conv, high conv\\)"):
        find_pairs(g, pairs=["layers.0.conv1"])


def test_candidates_need_single_consumers():
    """A conv whose ReLU output also feeds a shortcut is not a candidate (the stem of a ResNet)."""
    cands, _ = candidate_pairs(resnet_cifar(20))
    assert "stem.0" not in {c.low for c in cands}
