"""Test helpers: re-randomise the weights of an ONNX model by role, run it with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from dfmpc.interop.onnx_import import fold_constants


def randomise(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Fold constants, then replace every float weight by seeded random values of sensible scale.

    Conv/Gemm weights He-normal on their fan-in, biases N(0, 0.01..0.1),
    BN gamma ~ U(0.5, 1.5), beta, mean ~ N(0, 0.1), var ~ U(0.5, 1.5) (positive),
    Mul constants ~ U(0.5, 1.5), Add constants ~ N(0, 0.1).  Integer constants
    (shapes) are kept.  The result is an ordinary ONNX model that both
    onnxruntime and the engine load, so both see exactly the same weights.
    """
    rng = np.random.default_rng(seed)
    consts, nodes = fold_constants(model)
    new = {}
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for k, name in enumerate(n.input):
            if name not in consts or name in new or consts[name].dtype.kind != "f":
                continue
            shape = consts[name].shape
            op = n.op_type
            if op == "Conv" and k == 1:
                v = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
            elif op in ("Gemm", "MatMul") and k == 1:
                fan_in = shape[1] if attrs.get("transB", 0) else shape[0]
                v = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(1.0 / fan_in))
            elif op == "BatchNormalization":
                v = (rng.uniform(0.5, 1.5, shape) if k in (1, 4) else rng.normal(0, 0.1, shape))
            elif op == "Mul":
                v = rng.uniform(0.5, 1.5, shape)
            else:
                v = rng.normal(0, 0.1 if op != "Gemm" else 0.01, shape)
            new[name] = v.astype(np.float32)
    consts = {**consts, **new}
    init_names = set(consts) | {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input
              if i.name not in init_names and i.name not in {o for n in model.graph.node for o in n.output}]
    g = helper.make_graph(nodes, model.graph.name, inputs, list(model.graph.output),
                          initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    out = helper.make_model(g, opset_imports=list(model.opset_import))
    out.ir_version = max(model.ir_version, 4)   # IR >= 4: initializers need not be graph inputs
    return out


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose graph outputs are ``names`` (any intermediate tensors)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


def ort_run(model: onnx.ModelProto, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run ``model`` with onnxruntime on CPU, all graph optimisations off except the basic ones."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def logits_name(model: onnx.ModelProto) -> str:
    """The tensor feeding a final Softmax (compare logits, not near-uniform probabilities)."""
    out = model.graph.output[0].name
    for n in model.graph.node:
        if out in n.output and n.op_type == "Softmax":
            return n.input[0]
    return out
