"""Real topologies shipped in the onnx wheel, re-randomised, against onnxruntime."""

import os

import numpy as np
import onnx
import pytest

from dfmpc import load_model
from dfmpc.interop import from_onnx

from _onnx_helpers import logits_name, ort_run, randomise, with_outputs

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
RUNNABLE = ["squeezenet", "resnet50", "densenet121", "inception_v2", "vgg19"]
REFUSED = {  # model -> (op type, node names) named in the refusal
    "bvlc_alexnet": "LRN x2: 'n2', 'n6'",
    "zfnet512": "LRN x2: 'n2', 'n6'",
    "inception_v1": "LRN x2: 'n3', 'n8'",
    "shufflenet": "Transpose x16: 'n8', 'n21'",
}
# Both engines compute in float32 with different summation orders through 20-120 layers;
# measured max |diff| / max |logit| is 2e-7 .. 1e-6.  1e-4 relative leaves margin for other
# BLAS builds yet is 10x below the effect of 1% noise on one conv's weights (negative control).
REL_TOL = 1e-4


def _case(name, seed=0):
    model = randomise(onnx.load(os.path.join(LIGHT, f"light_{name}.onnx")), seed)
    graph = from_onnx(model, source=name)
    inp = graph.inputs[0]
    # the files fix the batch at 1 (and a Reshape to (1, K)), so ORT needs batch 1
    x = np.random.default_rng(seed + 1).normal(size=(1,) + graph.input_shapes[inp]).astype(np.float32)
    logits = logits_name(model)
    ref = ort_run(with_outputs(model, [logits]), {inp: x})[0]
    return graph, x, logits, ref


def _rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg19" else n  # vgg19: ~25-40 s
                                  for n in RUNNABLE])
@pytest.mark.usefixtures("blocked_convs")
def test_light_model_matches_onnxruntime(name):
    graph, x, logits, ref = _case(name)
    assert graph.nodes_of("Conv"), "imported graph has convolutions"
    got = graph.run(x, output=logits)
    assert got.shape == ref.shape
    assert _rel_err(got, ref) < REL_TOL
    assert np.abs(ref).max() > 1.0   # logits are not degenerate (the check is not vacuous)


def test_light_bn_nodes_kept():
    graph, *_ = _case("resnet50")
    bns = graph.nodes_of("BatchNormalization")
    assert len(bns) == 53 and all(set(b.params) == {"gamma", "beta", "mean", "var"} for b in bns)


@pytest.mark.usefixtures("blocked_convs")
def test_light_negative_control():
    """1% multiplicative noise on one conv's weights makes the comparison fail."""
    graph, x, logits, ref = _case("squeezenet")
    conv = graph.nodes_of("Conv")[5]
    w = conv.params["W"]
    noise = np.random.default_rng(7).normal(0.0, 0.01, w.shape).astype(np.float32)
    bad = graph.with_params({conv.name: {"W": w * (1 + noise)}})
    assert _rel_err(bad.run(x, output=logits), ref) > 10 * REL_TOL
    assert _rel_err(graph.run(x, output=logits), ref) < REL_TOL


def test_light_file_loads_directly_with_folding():
    """The original file (weights made by ConstantOfShape) loads via load_model as is."""
    g = load_model(os.path.join(LIGHT, "light_squeezenet.onnx"))
    assert len(g.nodes_of("Conv")) == 26 and g.outputs == ["softmaxout_1"]
    assert "data_0" in g.inputs and len(g.inputs) == 1


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_light_model_refused_with_op_and_node_names(name):
    with pytest.raises(ValueError, match="outside the engine's op set") as err:
        load_model(os.path.join(LIGHT, f"light_{name}.onnx"))
    assert REFUSED[name] in str(err.value)
