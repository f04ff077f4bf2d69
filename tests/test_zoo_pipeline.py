"""DF-MPC on the shipped, trained zoo models: pairing patterns (paper Fig. 2) and the demo's figures."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import dfmpc
from dfmpc.cli import main
from dfmpc.evaluation import load_zoo_model, zoo_manifest

ROOT = Path(__file__).resolve().parent.parent
ZOO = zoo_manifest()


def need(arch):
    """The shipped zoo model ``arch``; its absence is a packaging break and fails the test (never a skip)."""
    assert arch in ZOO, f"zoo model {arch!r} is missing from dfmpc/zoo/models.json (shipped: {sorted(ZOO)})"
    return load_zoo_model(arch)


def test_zoo_ships_every_model_the_readme_reports():
    """The package data holds the zoo models, and each loads (a packaging break fails here, not skips)."""
    assert sorted(ZOO) == ["densenet", "mobilenetv2", "mobilenetv2_small", "resnet18", "resnet20", "resnet56",
                           "resnet_bottleneck", "vgg16", "vgg_small"]
    for arch in ZOO:
        assert len(need(arch).nodes) > 0


def test_resnet20_pairs_conv1_low_conv2_high():
    """Fig. 2, basic block on the trained ResNet-20: conv1 ternary, conv2 6-bit; stem, shortcuts, FC alone."""
    g = need("resnet20")
    p = dfmpc.find_pairs(g)
    assert [(q.low, q.high) for q in p.pairs] == [
        (f"/layers/layers.{i}/conv1/Conv", f"/layers/layers.{i}/conv2/Conv") for i in range(9)]
    assert p.unpaired == ["/stem/stem.0/Conv", "/layers/layers.3/shortcut/shortcut.0/Conv",
                          "/layers/layers.6/shortcut/shortcut.0/Conv", "/fc/Gemm"]


def test_vgg_small_pairs_alternate_through_pooling():
    """Fig. 2, plain chain on the trained VGG-small: (features.7, features.10), (features.14, features.17)."""
    g = need("vgg_small")
    p = dfmpc.find_pairs(g)
    assert [(q.low, q.high) for q in p.pairs] == [("/features/features.7/Conv", "/features/features.10/Conv"),
                                                  ("/features/features.14/Conv", "/features/features.17/Conv")]


def test_vgg16_pairs_alternate_and_the_stem_stays_high():
    """Fig. 2, plain chain on the trained VGG-16-BN (13 convs): the first conv stays high (keep_first_high), the
    other twelve pair as (low, high) in order, across the max-pools; the classifier after Flatten stays alone."""
    g = need("vgg16")
    p = dfmpc.find_pairs(g)
    convs = [n.name for n in g.nodes if n.op == "Conv"]
    assert len(convs) == 13
    assert [(q.low, q.high) for q in p.pairs] == list(zip(convs[1::2], convs[2::2]))
    assert p.unpaired == [convs[0], "/fc/Gemm"]


def test_densenet_pairs_each_dense_layer_1x1_low_3x3_high():
    """Fig. 2 and D.1 (derivation 17) on the trained DenseNet-BC-40: inside each of the 18 dense layers BN-ReLU-conv1x1-BN-ReLU-conv3x3,
    the 1x1 (reading the Concat of all earlier outputs) is low and the 3x3 high; the stem, the three transition
    1x1 convs (their output feeds a pool and Concats, not a single conv) and the classifier stay alone."""
    g = need("densenet")
    p = dfmpc.find_pairs(g)
    assert len(p.pairs) == 18 and {q.form for q in p.pairs} == {"fold"}
    for q in p.pairs:
        assert q.low.endswith("/conv1/Conv") and q.high == q.low.replace("/conv1/", "/conv2/")
        assert g.node(q.low).params["W"].shape[2:] == (1, 1)
        assert g.node(q.high).params["W"].shape[2:] == (3, 3)
    assert p.unpaired == ["/features/features.0/Conv", "/features/features.7/conv/Conv",
                          "/features/features.14/conv/Conv", "/fc/Gemm"]


def test_bottleneck_pairs_3x3_low():
    """Fig. 2, bottleneck on the trained bottleneck ResNet: every low conv is a 3x3, every high conv a 1x1."""
    g = need("resnet_bottleneck")
    p = dfmpc.find_pairs(g)
    assert p.pairs
    assert all(g.node(q.low).params["W"].shape[2:] == (3, 3) for q in p.pairs)
    assert all(g.node(q.high).params["W"].shape[2:] == (1, 1) for q in p.pairs)


@pytest.mark.parametrize("arch", ["mobilenetv2_small", "mobilenetv2"])
def test_mobilenet_relu6_pairs_in_the_eq7_form(arch):
    """ReLU6 chains of the trained MobileNetV2-style nets pair in the Eq. (7) form (derivation 17): every pair
    goes through a Clip and carries c on its high conv's input channels; with through_clip=False they are reported and not paired."""
    g = need(arch)
    p = dfmpc.find_pairs(g)
    assert p.pairs and {g.node(q.act).op for q in p.pairs} == {"Clip"} and {q.form for q in p.pairs} == {"eq7"}
    old = dfmpc.find_pairs(g, through_clip=False)
    assert old.pairs == [] and all("positively homogeneous" in why for _, why in old.rejected)


def _readme_demo_figures():
    block = README_DEMO.search((ROOT / "README.md").read_text()).group(1)
    return [float(v) / 100 for v in re.findall(r"(\d+\.\d\d)%", block)]


README_DEMO = re.compile(r"## The main job.*?```\n(.*?)```", re.S)


@pytest.mark.slow
def test_demo_json_matches_readme_and_dfmpc_beats_no_compensation(capsys):
    """`dfmpc demo --json` on ResNet-20: DF-MPC > no compensation, and every figure equals the README's (+-0.002)."""
    need("resnet20")
    assert main(["demo", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dfmpc"] > res["no_compensation"]
    fp32, none, analytic, sequential, dfmpc_acc = _readme_demo_figures()
    # Evaluation is deterministic; the tolerance (20 of 10,000 images) only absorbs BLAS differences across CPUs
    # (and the float32 rounding of the distilled probes, seeded).
    assert res["recalibration"] == "sequential"
    for key, ref in [("fp32", fp32), ("no_compensation", none), ("analytic_only", analytic),
                     ("recalibration_only", sequential), ("dfmpc", dfmpc_acc)]:
        assert res[key] == pytest.approx(ref, abs=0.002), key
    assert res["fp32"] == pytest.approx(ZOO["resnet20"]["fp32_test_accuracy_engine"], abs=1e-9)
