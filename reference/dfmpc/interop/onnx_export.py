"""Graph -> ONNX (opset 11), checked with ``onnx.checker`` before anything is written.

Each parameter becomes an initializer named ``<node name>.<param name>``;
activation tensor names are kept.  ``Gemm`` is written with ``transB=1``
(W is (out, in)); BatchNormalization stays a BatchNormalization node.  Opset
11 is used because its Softmax ("over all axes from ``axis`` on") is exactly
the engine's.  The batch axis of every input is symbolic (``"N"``).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..engine.graph import Graph
from ._atomic import write_atomically

OPSET = 11
IR_VERSION = 6


def to_onnx(graph: Graph) -> onnx.ModelProto:
    """Convert a :class:`Graph` into a checked ``onnx.ModelProto``.

    Parameters
    ----------
    graph : Graph

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    ValueError
        The resulting model fails ``onnx.checker`` (names the problem).
    """
    nodes, inits = [], []

    def init(node, key, array):
        name = f"{node.name}.{key}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    for n in graph.nodes:
        a, p = n.attrs, n.params
        ins, extra = list(n.inputs), {}
        op = n.op
        if op == "Conv":
            ins += [init(n, "W", p["W"])] + ([init(n, "B", p["B"])] if "B" in p else [])
            extra = {k: list(a[k]) if isinstance(a.get(k), tuple) else a[k]
                     for k in ("kernel_shape", "strides", "dilations", "group") if k in a}
            extra.update(_pads(a))
        elif op == "BatchNormalization":
            ins += [init(n, k, p[k]) for k in ("gamma", "beta", "mean", "var")]
            extra = {"epsilon": float(a.get("epsilon", 1e-5))}
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
            ins += [init(n, "W", p["W"])] + ([init(n, "B", p["B"])] if "B" in p else [])
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
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dfmpc")
    model.ir_version = IR_VERSION
    _fill_output_shapes(model)
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


def _pads(a) -> dict:
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return {"auto_pad": mode}
    return {"pads": list(a.get("pads", (0, 0, 0, 0)))}


def save_onnx(graph: Graph, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``graph`` as an ONNX file, atomically (nothing is written on failure).

    Parameters
    ----------
    graph : Graph
    path : str or PathLike
    overwrite : bool
        Replace an existing file (default: refuse with FileExistsError).
    """
    data = to_onnx(graph).SerializeToString()
    write_atomically(path, lambda f: f.write(data), overwrite)
