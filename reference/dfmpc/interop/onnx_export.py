"""Graph -> ONNX (opset 11, or 13 for QDQ), checked with ``onnx.checker`` before anything is written.

Each parameter becomes an initializer named ``<node name>.<param name>``;
activation tensor names are kept.  ``Gemm`` is written with ``transB=1``
(W is (out, in)); BatchNormalization stays a BatchNormalization node.  Opset
11 is used because its Softmax ("over all axes from ``axis`` on") is exactly
the engine's.  The batch axis of every input is symbolic (``"N"``).

``format="qdq"`` writes every Conv / Gemm weight as an int8 initializer ``<node>.W_quantized``
with a per-output-channel ``DequantizeLinear`` (``axis=0``, float32 ``<node>.W_scale``, int8 zero
point 0) whose output ``<node>.W`` feeds the node: the grid and scale are recovered from the
dequantized weights and verified by :func:`dfmpc.interop.qdq.integer_grid` (TWN {-1, 0, 1} with
alpha in the scale; DoReFa odd integers with ``max|W| / (2^k - 1)``; c stays folded in the low
layer's BN, or, where the pipeline applied it by Eq. (7) (``report=``), is folded into a depthwise
conv B's scale or kept as a per-input-channel ``Mul`` after the ``DequantizeLinear``). Per-axis ``DequantizeLinear`` needs opset 13, whose Softmax is over the last axis
only, so a Softmax is exported there only when its axis is the last one.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..engine.graph import Graph
from ._atomic import write_atomically
from .qdq import factored_grid, integer_grid, layer_bits, layer_input_factors

OPSET = 11
IR_VERSION = 6
#: QDQ export: per-axis DequantizeLinear exists from opset 13 (IR version 7).
OPSET_QDQ = 13
IR_VERSION_QDQ = 7
#: ``format`` values of :func:`to_onnx`: dequantized float32 weights, or int8 weights + DequantizeLinear.
FORMATS = ("float", "qdq")


def to_onnx(graph: Graph, format: str = "float", bits: dict | None = None, report=None) -> onnx.ModelProto:
    """Convert a :class:`Graph` into a checked ``onnx.ModelProto``.

    Parameters
    ----------
    graph : Graph
    format : {"float", "qdq"}
        ``"float"``: float32 weights, opset 11. ``"qdq"``: int8 Conv / Gemm weights, each with a
        per-output-channel ``DequantizeLinear``, opset 13 (see the module docstring).
    bits : dict of str to int, optional
        ``"qdq"`` only: layer name -> bit-width; such a layer may hold at most ``2^bits`` levels.
    report : QuantizationReport, optional
        ``"qdq"`` only: the report of :func:`dfmpc.quantize_network` that made ``graph``; gives every
        layer's bit-width (``bits`` entries override) and the c of the pairs it applied by Eq. (7),
        which :func:`dfmpc.interop.qdq.factored_grid` divides out of conv B. Needed when a pair went
        through a ReLU6.

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    ValueError
        Unknown ``format``; the resulting model fails ``onnx.checker`` (names the problem); for
        ``"qdq"``, a weight on no int8 grid or with too many levels, or a Softmax not over the last
        axis (each names the node).
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    qdq = format == "qdq"
    factors = {}
    if report is not None:
        bits = {**layer_bits(graph, report), **(bits or {})}
        factors = layer_input_factors(report)
    bits = dict(bits or {})
    nodes, inits = [], []

    def init(node, key, array):
        name = f"{node.name}.{key}"
        a = np.asarray(array, dtype=np.float32)          # a 0-d Clip bound stays 0-d (ascontiguousarray makes it 1-D)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a) if a.ndim else a, name))
        return name

    def weight(node):
        if not qdq:
            return init(node, "W", node.params["W"])
        label, factor = f"node {node.name!r}", None
        try:
            if node.name in factors:                      # c applied by Eq. (7): divided out, folded or kept
                q, scale, factor = factored_grid(node.params["W"], factors[node.name], node.attrs.get("group", 1),
                                                 name=label, bits=bits.get(node.name))
            else:
                q, scale = integer_grid(node.params["W"], name=label, bits=bits.get(node.name))
        except ValueError as err:
            hint = "" if report is not None else " (if c was applied by Eq. (7), through a ReLU6, pass report=)"
            raise ValueError(f"format='qdq': {err}{hint}") from err
        name = f"{node.name}.W"
        deq = name if factor is None else f"{name}_dequantized"
        inits.extend([numpy_helper.from_array(q, f"{name}_quantized"),
                      numpy_helper.from_array(scale, f"{name}_scale"),
                      numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_zero_point")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                      [deq], name=f"{name}_dequantize", axis=0))
        if factor is not None:                            # Eq. (7): W~_{:,j} = c_j kQ(W)_{:,j}
            inits.append(numpy_helper.from_array(factor, f"{name}_input_factor"))
            nodes.append(helper.make_node("Mul", [deq, f"{name}_input_factor"], [name], name=f"{name}_input_factor_mul"))
        return name

    for n in graph.nodes:
        a, p = n.attrs, n.params
        ins, extra = list(n.inputs), {}
        op = n.op
        if op == "Conv":
            ins += [weight(n)] + ([init(n, "B", p["B"])] if "B" in p else [])
            extra = {k: list(a[k]) if isinstance(a.get(k), tuple) else a[k]
                     for k in ("kernel_shape", "strides", "dilations", "group") if k in a}
            extra.update(_pads(a))
        elif op == "BatchNormalization":
            ins += [init(n, k, p[k]) for k in ("gamma", "beta", "mean", "var")]
            extra = {"epsilon": float(a.get("epsilon", 1e-5))}
        elif op == "LeakyRelu":
            extra = {"alpha": float(a.get("alpha", 0.01))}
        elif op == "Clip":
            ins += [init(n, "min", np.float32(-np.inf if a.get("min") is None else a["min"])),
                    init(n, "max", np.float32(np.inf if a.get("max") is None else a["max"]))]
        elif op in ("Add", "Mul"):
            if "constant" in p:
                ins.append(init(n, "constant", p["constant"]))
            if op == "Add" and len(ins) > 2:
                op = "Sum"
            elif len(ins) > 2:                               # Mul is binary: chain it
                acc = ins[0]
                for k, t in enumerate(ins[1:-1]):
                    tmp = f"{n.name}.partial{k}"
                    nodes.append(helper.make_node("Mul", [acc, t], [tmp], name=tmp))
                    acc = tmp
                ins = [acc, ins[-1]]
            elif len(ins) == 1:
                op = "Identity"
        elif op in ("MaxPool", "AveragePool"):
            extra = {"kernel_shape": list(a["kernel_shape"]), "strides": list(a.get("strides", (1, 1))),
                     "ceil_mode": int(a.get("ceil_mode", 0))}
            if op == "MaxPool" and tuple(a.get("dilations", (1, 1))) != (1, 1):
                extra["dilations"] = list(a["dilations"])
            if op == "AveragePool":
                extra["count_include_pad"] = int(a.get("count_include_pad", 0))
            extra.update(_pads(a))
        elif op == "Gemm":
            ins += [weight(n)] + ([init(n, "B", p["B"])] if "B" in p else [])
            extra = {"transB": 1}
        elif op in ("Concat", "Flatten", "Softmax"):
            extra = {"axis": int(a.get("axis", 1 if op == "Flatten" else -1))}
        nodes.append(helper.make_node(op, ins, list(n.outputs), name=n.name, **extra))

    def value_info(name, shape):
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                             None if shape is None else ["N", *shape])

    g = helper.make_graph(nodes, graph.name,
                          [value_info(i, graph.input_shapes.get(i)) for i in graph.inputs],
                          [value_info(o, None) for o in graph.outputs], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET_QDQ if qdq else OPSET)],
                              producer_name="dfmpc")
    model.ir_version = IR_VERSION_QDQ if qdq else IR_VERSION
    _fill_output_shapes(model)
    if qdq:
        _check_softmax_last_axis(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise ValueError(f"exported model fails the ONNX checker: {err}") from err
    return model


def _fill_output_shapes(model: onnx.ModelProto) -> None:
    """Give every graph output the (symbolic-batch) shape found by ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    known = {v.name: v for v in list(inferred.value_info) + list(inferred.output)}
    for out in model.graph.output:
        v = known.get(out.name)
        if v is not None and v.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(v.type)
        elif out.name in {i.name for i in model.graph.input}:
            out.type.CopyFrom(next(i.type for i in model.graph.input if i.name == out.name))
        else:
            raise ValueError(f"cannot infer the shape of graph output {out.name!r} for export")


def _check_softmax_last_axis(model: onnx.ModelProto) -> None:
    """Opset 13 Softmax is over one axis: the engine's "all axes from ``axis`` on" is that only for the last."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in list(inferred.value_info) + list(inferred.input)
            if v.type.tensor_type.HasField("shape")}
    for n in model.graph.node:
        if n.op_type == "Softmax":
            axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
            r = rank.get(n.input[0])
            if axis != -1 and (r is None or axis % r != r - 1):
                raise ValueError(f"format='qdq': Softmax node {n.name!r} is over axes {axis}.. of a rank-{r} tensor; "
                                 "opset 13 (needed for per-channel DequantizeLinear) takes the last axis only")


def _pads(a) -> dict:
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return {"auto_pad": mode}
    return {"pads": list(a.get("pads", (0, 0, 0, 0)))}


def save_onnx(graph: Graph, path: str | os.PathLike, overwrite: bool = False, format: str = "float",
              bits: dict | None = None, report=None) -> None:
    """Write ``graph`` as an ONNX file, atomically (nothing is written on failure).

    Parameters
    ----------
    graph : Graph
    path : str or PathLike
    overwrite : bool
        Replace an existing file (default: refuse with FileExistsError).
    format : {"float", "qdq"}
        Float32 weights, or int8 weights with per-channel DequantizeLinear (:func:`to_onnx`).
    bits : dict of str to int, optional
        ``"qdq"``: layer name -> bit-width, checked (at most ``2^bits`` levels).
    report : QuantizationReport, optional
        ``"qdq"``: bit-widths and the Eq. (7) c of the pipeline run that made ``graph`` (:func:`to_onnx`).
    """
    model = to_onnx(graph) if format == "float" and bits is None and report is None else \
        to_onnx(graph, format, bits, report)
    data = model.SerializeToString()
    write_atomically(path, lambda f: f.write(data), overwrite)
