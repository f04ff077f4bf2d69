"""Pairing (paper Fig. 2, Algorithm 1): the patterns come out of the max-low-weights rule."""

import os

import numpy as np
import onnx
import pytest

import dfmpc
from dfmpc.engine import Graph, Node
from dfmpc.engine.builders import resnet_cifar
from dfmpc.pairing import candidate_pairs, find_pairs, merge_affine_into_bn

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


def test_relu6_pairs_in_the_eq7_form_or_is_refused_on_request():
    """ReLU6 (Clip) is not positively homogeneous: chains through it pair in the Eq. (7) form (c on the high
    conv's input channels, derivation 17), ReLU chains in the fold form; with through_clip=False they are
    refused and the reason is reported, as before."""
    g = chain([8, 8, 8, 8], act="Clip")
    p = find_pairs(g)
    assert [(q.low, q.high, q.form) for q in p.pairs] == [("conv2", "conv3", "eq7")]
    assert "Eq. (7)" in p.describe(2, 6) and p.rejected == []
    assert {q.form for q in find_pairs(chain([8, 8, 8, 8])).pairs} == {"fold"}
    p = find_pairs(g, through_clip=False)
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


# ------------------------------------------------------------------ issue 10: the light topologies

LIGHT_PAIRS = {  # model -> (pairs as loaded, pairs after merge_affine_into_bn)
    "vgg19": (0, 0), "densenet121": (0, 58), "inception_v2": (0, 21), "resnet50": (16, 16), "squeezenet": (0, 0)}
LIGHT_REASON = {  # model -> a reason every unpaired conv of that kind must give (as loaded)
    "vgg19": "no BatchNormalization after it", "squeezenet": "no BatchNormalization after it",
    "densenet121": "merge_affine_into_bn", "inception_v2": "merge_affine_into_bn", "resnet50": "residual sum"}
_light_cache = {}


def light(name):
    if name not in _light_cache:
        _light_cache[name] = dfmpc.load_model(os.path.join(LIGHT, f"light_{name}.onnx"))
    return _light_cache[name]


@pytest.mark.parametrize("name", sorted(LIGHT_PAIRS))
def test_light_topologies_pair_or_say_why(name):
    """Issue 10, item 4: on each light topology every conv / Gemm is in a pair or has a reason; the
    pair counts before and after merging the BN's Mul / Add constants are as stated; nothing crashes."""
    g = light(name)
    for graph, expected in zip((g, merge_affine_into_bn(g)), LIGHT_PAIRS[name]):
        p = find_pairs(graph)
        assert len(p.pairs) == expected
        assert set(p.why_unpaired) == set(p.unpaired) and all(p.why_unpaired.values())
        weight_layers = {n.name for n in graph.nodes if n.op in ("Conv", "Gemm")}
        assert {q.low for q in p.pairs} | {q.high for q in p.pairs} | set(p.unpaired) == weight_layers
        for q in p.pairs:                         # every pair is a real chain: low -> BN -> ReLU ... -> high
            low_out, bn_out = graph.node(q.low).outputs[0], graph.node(q.bn).outputs[0]
            assert graph.consumers(low_out)[0].name == q.bn and graph.consumers(bn_out)[0].name == q.act
        assert "alone" in p.describe(2, 6) or not p.unpaired
    reasons = find_pairs(g).why_unpaired.values()
    assert any(LIGHT_REASON[name] in why for why in reasons)


def test_densenet_and_inception_reasons_after_merging():
    """After the merge, DenseNet's growth convs pair (1x1 low, 3x3 high) and Inception's branch ends
    are reported as feeding a concatenation; DenseNet's transition convs have no BN after them."""
    d = find_pairs(merge_affine_into_bn(light("densenet121")))
    dn = merge_affine_into_bn(light("densenet121"))
    assert all(dn.node(q.low).params["W"].shape[2:] == (1, 1) and dn.node(q.high).params["W"].shape[2:] == (3, 3)
               for q in d.pairs)
    assert sum("no BatchNormalization after it" in w for w in d.why_unpaired.values()) == 3
    i = find_pairs(merge_affine_into_bn(light("inception_v2")))
    assert sum("a concatenation" in w for w in i.why_unpaired.values()) >= 8


def _affine_chain(const_add):
    rng = np.random.default_rng(3)
    nodes = [conv("conv0", "x", 1, 4), bn("bn0", "conv0", 4),
             Node("mul0", "Mul", ["bn0"], ["mul0"], {}, {"constant": rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32)}),
             Node("add0", "Add", ["mul0"], ["add0"], {}, {"constant": const_add}),
             Node("act0", "Relu", ["add0"], ["act0"]), conv("conv1", "act0", 4, 4), bn("bn1", "conv1", 4),
             Node("act1", "Relu", ["bn1"], ["act1"]), conv("conv2", "act1", 4, 4)]
    return Graph(nodes, ["x"], ["conv2"], {"x": (1, 6, 6)})


def test_merge_affine_into_bn_is_the_same_function_and_pairs():
    """BN -> Mul(k) -> Add(a) per channel merges into one BN (gamma k, beta k + a): the same outputs
    (float32, 1e-5 relative), and the chain that was reported now pairs. Negative control: an Add
    constant that varies over positions is not per channel and stays (the chain stays unpaired)."""
    rng = np.random.default_rng(4)
    g = _affine_chain(rng.normal(size=(4, 1, 1)).astype(np.float32))
    for n in g.nodes_of("BatchNormalization"):
        n.params.update(gamma=rng.uniform(0.5, 2, 4).astype(np.float32), beta=rng.normal(size=4).astype(np.float32))
    merged = merge_affine_into_bn(g)
    assert {n.op for n in merged.nodes} == {"Conv", "BatchNormalization", "Relu"} and g.nodes_of("Mul")
    x = rng.normal(size=(3, 1, 6, 6)).astype(np.float32)
    y0, y1 = g.run(x), merged.run(x)
    assert np.abs(y1 - y0).max() <= 1e-5 * np.abs(y0).max()
    before, after = find_pairs(g, keep_first_high=False), find_pairs(merged, keep_first_high=False)
    assert "merge_affine_into_bn" in before.why_unpaired["conv0"]
    assert ("conv0", "conv1") in [(q.low, q.high) for q in candidate_pairs(merged)[0]]
    assert "conv0" not in [q.low for q in candidate_pairs(g)[0]] 
    assert "(conv0 -> conv1)" in after.why_unpaired["conv0"]
    spatial = merge_affine_into_bn(_affine_chain(rng.normal(size=(1, 1, 6, 6)).astype(np.float32)))
    assert spatial.nodes_of("Add") and "conv0" not in [q.low for q in candidate_pairs(spatial)[0]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet121", "inception_v2"])
@pytest.mark.usefixtures("blocked_convs")
def test_merged_light_model_computes_the_same(name):
    """merge_affine_into_bn on the light DenseNet-121 / Inception-v2: same logits on one image (1e-4 relative)."""
    g = light(name)
    merged = merge_affine_into_bn(g)
    x = np.random.default_rng(0).normal(size=(1,) + g.input_shapes[g.inputs[0]]).astype(np.float32)
    y0, y1 = g.run(x), merged.run(x)
    assert np.abs(y1 - y0).max() <= 1e-4 * np.abs(y0).max()
