"""DF-MPC on a DenseNet-BC (pre-activation, concatenation, transitions): derivation 17, D.1-D.3.

A small DenseNet-BC is built in PyTorch (random init; BN running statistics set by a few batches of
random images in train mode, so they look trained: not 0 / 1), exported to ONNX and imported. What is
checked: the pairs are exactly the 1x1 -> 3x3 of each dense layer (the 1x1 low), every other conv says
why it is in no pair, the moments that reach a 1x1 through a Concat restart at the BN after it, and
quantize_network runs end to end in every re-calibration mode, with an ONNX export onnxruntime agrees with.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# torch 2.13's TorchScript exporter warns that it is deprecated; it is the offline, onnxscript-free path.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
nn, F = torch.nn, torch.nn.functional

import dfmpc  # noqa: E402
from dfmpc.interop.torch_export import graph_from_torch  # noqa: E402
from dfmpc.moments import propagate_moments  # noqa: E402
from dfmpc.pipeline import prepare, quantize_network  # noqa: E402

from _onnx_helpers import ort_run  # noqa: E402

SHAPE = (1, 12, 12)
# float32 engines with different summation orders: 1e-4 of the largest logit (as test_pipeline_graphs.py).
REL_TOL = 1e-4


class DenseLayer(nn.Module):
    """BN -> ReLU -> conv1x1(4k) -> BN -> ReLU -> conv3x3(k).

    ``style="list"`` (torchvision): reads the concatenation of all earlier features, returns its k new
    ones; ``style="chain"`` (the CIFAR form of scripts/train_zoo.py): returns ``cat([x, new], 1)``."""

    def __init__(self, cin, growth, style):
        super().__init__()
        self.style = style
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        inp = torch.cat(x, 1) if self.style == "list" else x
        new = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(inp))))))
        return new if self.style == "list" else torch.cat([x, new], 1)


class DenseBlock(nn.Module):
    def __init__(self, cin, growth, n, style):
        super().__init__()
        self.style = style
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, style) for i in range(n))

    def forward(self, x):
        if self.style == "chain":
            for layer in self.layers:
                x = layer(x)
            return x
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    """BN -> ReLU -> conv1x1 (compression 0.5) -> AvgPool 2."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class DenseNetBC(nn.Module):
    """DenseNet-BC (Huang et al. 2017): 3x3 stem of 2k channels, dense blocks with transitions, BN-ReLU, GAP, FC."""

    def __init__(self, growth=6, layers=(2, 2, 2), classes=10, style="list"):
        super().__init__()
        c = 2 * growth
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        blocks = []
        for i, n in enumerate(layers):
            blocks.append(DenseBlock(c, growth, n, style))
            c += n * growth
            if i < len(layers) - 1:
                blocks.append(Transition(c, c // 2))
                c //= 2
        self.blocks = nn.Sequential(*blocks)
        self.norm, self.fc = nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module", params=["list", "chain"])
def densenet(request):
    """The graph (both concatenation styles), with BN running statistics averaged over 4 train-mode batches
    of random images (seed 0)."""
    torch.manual_seed(0)
    model = DenseNetBC(style=request.param)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None                       # cumulative average: the statistics of what it saw
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, *SHAPE))
    return graph_from_torch(model.eval(), SHAPE)


def _convs(g, k):
    return [n.name for n in g.nodes_of("Conv") if n.params["W"].shape[2:] == (k, k)]


def test_densenet_pairs_are_the_bottleneck_1x1_to_3x3_d1(densenet):
    """D.1: the pairs are exactly (conv1x1 -> conv3x3) of every dense layer, the 1x1 low, c folded (ReLU);
    the stem (read by Concats), the transition convs (no BN after them) and the FC are unpaired, each with
    its reason. The BN statistics are trained-looking (not the 0 / 1 of a fresh BN)."""
    g = prepare(densenet)
    bn = g.nodes_of("BatchNormalization")[0].params
    assert np.abs(bn["mean"]).max() > 1e-2 and np.abs(bn["var"] - 1).max() > 1e-2
    p = dfmpc.find_pairs(g)
    layers = [(f"/blocks/blocks.{b}/layers.{i}/conv1/Conv", f"/blocks/blocks.{b}/layers.{i}/conv2/Conv")
              for b in (0, 2, 4) for i in (0, 1)]
    assert [(q.low, q.high) for q in p.pairs] == layers
    for q in p.pairs:
        assert g.node(q.low).params["W"].shape[2:] == (1, 1) and g.node(q.high).params["W"].shape[2:] == (3, 3)
        assert q.form == "fold" and g.node(q.act).op == "Relu"
        relu = g.producer(g.node(q.low).inputs[0])                              # Concat -> BN -> ReLU -> 1x1
        assert g.producer(g.producer(relu.inputs[0]).inputs[0]).op in ("Concat", "Conv", "AveragePool")
    why = p.why_unpaired
    assert p.unpaired == ["/stem/Conv", "/blocks/blocks.1/conv/Conv", "/blocks/blocks.3/conv/Conv", "/fc/Gemm"]
    assert "read by" in why["/stem/Conv"] and "Concat" in why["/stem/Conv"]
    assert all("no BatchNormalization after it (read by AveragePool" in why[n] for n in p.unpaired[1:3])


def test_densenet_3x3_cannot_be_low_because_of_the_concat_d1(densenet):
    """D.1: a 3x3's output goes into Concat nodes (the inputs of every later layer of its block and the block's
    output), never into a BN of its own, so it cannot be the low conv of a pair: the reason names the Concat.
    Negative control: the same check finds ResNet-8's conv1 (-> BN -> ReLU -> conv2) a low candidate."""
    g = prepare(densenet)
    reasons = {}
    cands, _ = dfmpc.pairing.candidate_pairs(g, reasons)
    threes = [n.name for n in g.nodes_of("Conv") if n.params["W"].shape[2:] == (3, 3) and n.name != "/stem/Conv"]
    assert len(threes) == 6
    for name in threes:
        readers = g.consumers(g.node(name).outputs[0])
        assert name not in {q.low for q in cands} and {r.op for r in readers} == {"Concat"}
        assert "Concat" in reasons[name]
    r = dfmpc.engine.builders.resnet_cifar(8)
    assert "layers.0.conv1" in {q.low for q in dfmpc.pairing.candidate_pairs(r)[0]}


def test_moments_through_a_concat_restart_at_its_bn_d2(densenet):
    """D.2 (the analytic mode's statistics through a Concat, derivation 14): every Concat of the DenseNet-BC is
    read by a BN, so its propagated moments are that BN's running statistics (M.1), not the concatenation of
    the inputs' propagated moments (which differ: negative control); every low 1x1's input moments (ReLU of
    that BN) are finite with positive variance."""
    g = prepare(densenet)
    mom = propagate_moments(g, 0.0, 1.0)
    concats = g.nodes_of("Concat")
    assert len(concats) in (6, 9)                     # chain: one per layer; list: one per layer and block
    differs = False
    for node in concats:
        bn = next(r for r in g.consumers(node.outputs[0]) if r.op == "BatchNormalization")
        m, v = mom[node.outputs[0]]
        assert np.allclose(m, bn.params["mean"]) and np.allclose(v, bn.params["var"])
        m_cat = np.concatenate([mom[t][0] for t in node.inputs])
        differs |= not np.allclose(m, m_cat, rtol=1e-3, atol=1e-3)
    assert differs
    for q in dfmpc.find_pairs(g).pairs:
        m, v = mom[g.node(q.low).inputs[0]]
        assert np.all(np.isfinite(m)) and np.all(v > 0)


@pytest.mark.parametrize("low_bits", [2, 3])
@pytest.mark.parametrize("recalibration", ["absorb", "analytic", "sequential", "data"])
def test_densenet_quantizes_end_to_end_in_every_mode_d3(densenet, recalibration, low_bits):
    """D.3: quantize_network runs on the DenseNet-BC at MP2/6 and MP3/6 (the paper's DenseNet setting) in every
    re-calibration mode: 6 pairs (1x1 low, c folded into its BN: Eq. (27)), finite logits that differ from FP32,
    low 1x1s on the low grid; the input graph is not modified."""
    g = densenet
    before = {n.name: {k: v.copy() for k, v in n.params.items()} for n in g.nodes}
    x = np.random.default_rng(1).normal(size=(16,) + SHAPE).astype(np.float32)
    q, rep = quantize_network(g, low_bits, 6, recalibration=recalibration, probes=x, calibration_data=x)
    assert len(rep.pairs) == 6 and {p.form for p in rep.pairs} == {"fold"}
    assert all(q.node(p.low).params["W"].shape[2:] == (1, 1) for p in rep.pairs)
    levels = {len(np.unique(q.node(p.low).params["W"])) for p in rep.pairs}
    assert max(levels) <= 2 ** low_bits - (1 if low_bits == 2 else 0)
    y = q.run(x)
    assert y.shape == (16, 10) and np.all(np.isfinite(y))
    assert not np.allclose(y, g.run(x), rtol=1e-3, atol=1e-3)
    assert all(np.array_equal(v, before[n.name][k]) for n in g.nodes for k, v in n.params.items())


def test_densenet_export_runs_in_onnxruntime_d3(densenet, tmp_path):
    """D.3: the quantized DenseNet-BC (MP3/6, default re-calibration on given probes) saved as ONNX passes the
    checker and onnxruntime gives the engine's logits (1e-4 of the largest)."""
    onnx = pytest.importorskip("onnx")
    x = np.random.default_rng(2).normal(size=(8,) + SHAPE).astype(np.float32)
    q, _ = quantize_network(densenet, 3, 6, probes=x)
    path = tmp_path / "densenet_mp36.onnx"
    dfmpc.save_model(q, path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ref = q.run(x)
    got = ort_run(model, {q.inputs[0]: x})[0]
    assert np.abs(got - ref).max() <= REL_TOL * np.abs(ref).max()


def test_bns_after_a_concat_are_re_calibrated_by_the_measuring_modes(densenet):
    """Derivation 15, "Which BNs": a BN that reads a Concat (or a conv read by more than it, as the stem in the
    chain style) is a site of its own (``follows_conv`` False).
    ``data`` sets it to the statistics of the Concat's output measured in the network quantized so far
    (to float32 accumulation, 1e-4 relative); ``sequential`` on the same images as probes moves it off
    the trained statistics; ``analytic`` and ``absorb`` keep the trained statistics there.
    Negative control: the quantized Concat's statistics are not the trained ones (so the check is not vacuous)."""
    from dfmpc.pipeline import recalibration_sites
    from dfmpc.recalibration import channel_moments
    g = prepare(densenet)
    sites = recalibration_sites(g, g)
    after_concat = [s for s in sites if not s.follows_conv]
    assert any(g.node(s.conv).op == "Concat" for s in after_concat)
    assert all(g.node(s.conv).op == "Concat" or len(g.consumers(g.node(s.conv).outputs[0])) > 1 for s in after_concat)
    assert len(sites) == len(g.nodes_of("BatchNormalization"))          # no BN reads the graph input here
    x = np.random.default_rng(2).normal(size=(32,) + SHAPE).astype(np.float32)
    q_dat, _ = quantize_network(g, 2, 6, recalibration="data", compensation="none", calibration_data=x)
    q_seq, _ = quantize_network(g, 2, 6, recalibration="sequential", compensation="none", probes=x)
    q_ana, _ = quantize_network(g, 2, 6, recalibration="analytic", compensation="none")
    moved = 0.0
    for s in after_concat:
        m, v = channel_moments(q_dat.run(x, output=q_dat.node(s.conv).outputs[0]))
        p = q_dat.node(s.bn_node).params
        np.testing.assert_allclose(p["mean"], m, rtol=1e-4, atol=1e-4 * (1 + np.abs(m).max()))
        np.testing.assert_allclose(p["var"], v, rtol=1e-4, atol=1e-6)
        moved = max(moved, float(np.max(np.abs(np.log((v + s.bn.eps) / (s.bn.var + s.bn.eps))))))
        assert not np.allclose(q_seq.node(s.bn_node).params["var"], s.bn.var, rtol=1e-3)
        np.testing.assert_array_equal(q_ana.node(s.bn_node).params["var"], g.node(s.bn_node).params["var"])
    assert moved > 0.01
