"""ONNX -> :class:`~dfmpc.engine.Graph`, with the ``onnx`` package (never hand-parsed protobuf).

What the importer does, in order:

1. ``onnx.load`` + ``onnx.checker.check_model``; anything unreadable is a ``ValueError``.
2. Shape inference (``onnx.shape_inference``), so static ``Shape`` nodes can be folded.
3. Constant folding: every node whose inputs are all constants (initializers,
   ``Constant``, ``ConstantOfShape``, ``Unsqueeze`` of constants, ``Shape`` of a
   statically shaped tensor, the ``DequantizeLinear`` of int8 weights in a QDQ
   export, ...) is evaluated once with ``onnx.reference`` and becomes a constant.  Unused initializers are dropped.
4. Every remaining node must be in the engine's op set; otherwise the import is
   refused with the list of unsupported op types and node names.
5. Conversion to IR nodes: constant inputs become named parameters
   (``Conv``: W, B; ``BatchNormalization``: gamma, beta, mean, var -- never folded
   into the conv); ``Sum`` becomes ``Add``; ``MatMul`` with a constant matrix and
   ``Gemm`` (any transB, alpha, beta) become ``Gemm`` with ``W`` of shape (out, in);
   a ``Reshape`` to rank 2 (``(N, -1)``, ``(1, K)``, ``(-1, K)``) becomes ``Flatten``;
   a ``ReduceMean`` over the two spatial axes of an (N, C, H, W) tensor (PyTorch's
   ``x.mean((2, 3))``) becomes ``GlobalAveragePool``, followed by ``Flatten`` when
   ``keepdims=0``: the same mean of each channel over its H x W positions;
   ``x - c`` and ``x / c`` with a constant ``c`` (e.g. normalisation inside the model) become ``Add``
   of ``-c`` (exact) and ``Mul`` by ``1 / c`` (to within float32 rounding); a ``Squeeze`` of the
   1 x 1 spatial axes of an (N, C, 1, 1) tensor becomes ``Flatten``; a zero ``Pad`` of H and W read
   by one ``Conv`` alone (``F.pad`` / ``nn.ZeroPad2d`` before a conv) is merged into that conv's pads.

The first axis of every graph input is treated as the batch axis, whatever
its declared size in the file.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..engine.graph import Graph, Node

#: ONNX op types the importer turns into engine nodes.
IMPORTABLE_OPS = frozenset({
    "Conv", "BatchNormalization", "Relu", "Clip", "Add", "Sum", "Mul", "Concat", "MaxPool",
    "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul", "Softmax",
    "Identity", "Dropout", "ReduceMean", "Sub", "Div", "Squeeze", "LeakyRelu"})


def load_onnx(path: str | os.PathLike) -> Graph:
    """Load an ``.onnx`` file into a :class:`Graph`.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    Graph

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a valid ONNX model (e.g. truncated), or unsupported ops (listed with
        their node names), or a pattern the engine cannot run (named node).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such ONNX file: {path!r}")
    try:
        model = onnx.load(path)
    except OSError:           # permission denied, a directory, ...: the OS's own message names the path
        raise
    except Exception as err:  # protobuf DecodeError and friends: the file is not an ONNX model
        raise ValueError(f"{path!r} is not a readable ONNX model: {err}") from err
    return from_onnx(model, source=path)


def from_onnx(model: onnx.ModelProto, source: str = "model") -> Graph:
    """Convert an in-memory ``onnx.ModelProto`` into a :class:`Graph` (see module docstring).

    Parameters
    ----------
    model : onnx.ModelProto
    source : str
        Name used in error messages.

    Returns
    -------
    Graph

    Raises
    ------
    ValueError
        Invalid model, an initializer of unknown data type (naming it), unsupported ops, or
        unconvertible nodes; the message starts with ``source``.
    """
    skeleton = _skeleton(model)
    try:
        onnx.checker.check_model(skeleton)
    except Exception as err:
        raise ValueError(f"{source!r} is not a valid ONNX model: {err}") from err
    if not model.graph.node:
        raise ValueError(f"{source!r} has an empty graph")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    shapes = _static_shapes(skeleton)
    try:
        consts, nodes = fold_constants(model, shapes)
    except ValueError as err:
        raise ValueError(f"{source!r}: {err}") from err

    nodes = _merge_pads_into_convs(nodes, consts, {o.name for o in model.graph.output})
    batch_dependent = _batch_dependent(model, shapes, nodes)
    for n in nodes:
        for k, i in enumerate(n.input):
            if i in batch_dependent and not (n.op_type == "Reshape" and k == 1):
                raise ValueError(f"{source!r}: node {_node_name(n)!r} ({n.op_type}) reads {i!r}, which "
                                 "depends on the batch size; only a flatten-kind Reshape may")
    unsupported = [(n.op_type, _node_name(n)) for n in nodes if n.op_type not in IMPORTABLE_OPS]
    if unsupported:
        counts = Counter(op for op, _ in unsupported)
        listing = "; ".join(f"{op} x{counts[op]}: " + ", ".join(repr(nm) for o, nm in unsupported if o == op)
                            for op in counts)
        raise ValueError(f"{source!r} uses ops outside the engine's op set: {listing}")

    not_data = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    inputs = [i for i in model.graph.input if i.name not in not_data]
    input_shapes = {i.name: _declared_shape(i)[1:] if _declared_shape(i) else None for i in inputs}
    used_names: set[str] = set()
    ir_nodes = []
    readers = _reader_map(nodes)
    for n in nodes:
        name = _node_name(n)
        base, k = name, 1
        while name in used_names:
            name, k = f"{base}_{k}", k + 1
        used_names.add(name)
        try:
            made = _convert(n, name, consts, shapes, opset, readers)
        except ValueError as err:
            raise ValueError(f"{source!r}: node {name!r} ({n.op_type}): {err}") from err
        for extra in made[1:] if isinstance(made, list) else ():   # a second node of one ONNX node
            while extra.name in used_names:
                extra.name += "_"
            used_names.add(extra.name)
        ir_nodes.extend(made if isinstance(made, list) else [made])
    outputs = [o.name for o in model.graph.output]
    for o in outputs:
        if o in consts:
            raise ValueError(f"{source!r}: graph output {o!r} is a constant")
    return Graph(ir_nodes, [i.name for i in inputs], outputs,
                 {k: v for k, v in input_shapes.items() if v is not None},
                 name=model.graph.name or "graph")


# ------------------------------------------------------------------ helpers
def _node_name(n) -> str:
    return n.name or n.output[0]


def _declared_shape(value_info):
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


#: Initializer types that hold weights (float, or the int8 / uint8 of a QDQ export), never shapes or axes.
_WEIGHT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def _skeleton(model: onnx.ModelProto, max_elements: int = 4096) -> onnx.ModelProto:
    """The model with large weight initializers (float, int8, uint8) turned into typed graph inputs.

    Checking and shape inference serialise the whole model; on VGG-sized
    weights that costs seconds.  Only initializer shapes matter to them, and
    only small integer initializers (shapes, axes) matter by value.
    """
    g = model.graph
    small, big = [], []
    for t in g.initializer:
        if t.data_type in _WEIGHT_TYPES and int(np.prod(t.dims)) > max_elements:
            big.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            small.append(t)
    if not big:
        return model
    big_names = {v.name for v in big}
    inputs = [i for i in g.input if i.name not in big_names] + big
    sk = helper.make_graph(g.node, g.name, inputs, g.output, initializer=small, value_info=g.value_info)
    out = helper.make_model(sk, opset_imports=list(model.opset_import))
    out.ir_version = max(model.ir_version, 4)     # IR >= 4: inputs without initializers are fine
    return out


def _static_shapes(model) -> dict[str, tuple]:
    """Tensor name -> shape tuple (None for unknown dims), from ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    return {v.name: s for v in list(g.value_info) + list(g.input) + list(g.output)
            if (s := _declared_shape(v)) is not None}


def fold_constants(model: onnx.ModelProto, shapes: dict | None = None):
    """Evaluate every node whose inputs are all constant, with ``onnx.reference``.

    Parameters
    ----------
    model : onnx.ModelProto
    shapes : dict, optional
        Static shapes from shape inference; a ``Shape`` node whose input shape
        is fully known is folded too.

    Returns
    -------
    consts : dict of str to ndarray
        Constant tensors still read by the remaining nodes or graph outputs.
    nodes : list of onnx.NodeProto
        The non-constant nodes, in the file's (topological) order.

    Raises
    ------
    ValueError
        An initializer of unknown data type (named), or a constant subgraph that cannot be evaluated.
    """
    from onnx.reference import ReferenceEvaluator

    shapes = shapes if shapes is not None else _static_shapes(model)
    g = model.graph
    consts = {t.name: tensor_to_array(t) for t in g.initializer}
    const_names = set(consts)
    fold, keep = [], []
    for n in g.node:
        ins = [i for i in n.input if i]
        known = shapes.get(ins[0], (None,)) if n.op_type == "Shape" else (None,)
        if n.op_type == "Shape" and ins[0] not in const_names and all(d is not None for d in known[1:]):
            # an unknown batch size is replaced by 1: such shapes may only feed flatten-kind
            # Reshape targets, which from_onnx checks (see _batch_dependent)
            full = np.array([1 if known[0] is None else known[0], *known[1:]], dtype=np.int64)
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            consts[n.output[0]] = full[a.get("start", 0):a.get("end", len(full))]
            const_names.add(n.output[0])
        elif all(i in const_names for i in ins) and n.op_type not in ("RandomNormal", "RandomUniform"):
            fold.append(n)
            const_names.update(o for o in n.output if o)
        else:
            keep.append(n)
    for n in [n for n in fold if n.op_type == "DequantizeLinear" and all(i in consts for i in n.input if i)]:
        if any(a.name == "block_size" and a.i for a in n.attribute):
            raise ValueError(f"node {_node_name(n)!r}: blocked DequantizeLinear (block_size) is not supported")
        consts[n.output[0]] = dequantize_linear(*(consts[i] if i else None for i in n.input),
                                                **{k: v for k, v in _attrs(n).items() if k == "axis"})
        fold.remove(n)
    if fold:
        needed = sorted({i for n in fold for i in n.input if i} - {o for n in fold for o in n.output})
        sub = helper.make_graph(
            fold, "fold",
            [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), consts[i].shape)
             for i in needed],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
             for n in fold for o in n.output if o])
        sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
        sub_model.ir_version = model.ir_version
        outs = [o for n in fold for o in n.output if o]
        try:
            values = ReferenceEvaluator(sub_model).run(None, {i: consts[i] for i in needed})
        except Exception as err:   # onnx.reference raises whatever its kernels raise on malformed constants
            names = ", ".join(repr(_node_name(n)) for n in fold[:5]) + (", ..." if len(fold) > 5 else "")
            raise ValueError(f"constant folding failed in node(s) {names}: {type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
        consts.update(zip(outs, (np.asarray(v) for v in values)))
    read = {i for n in keep for i in n.input} | {o.name for o in g.output}
    return {k: v for k, v in consts.items() if k in read}, keep


def dequantize_linear(x, scale, zero_point=None, axis: int = 1) -> np.ndarray:
    """ONNX ``DequantizeLinear`` (opsets 10-13, per-tensor or per-axis): ``y = (x - zero_point) * scale``.

    ``onnx.reference`` implements the op from opset 19 only; a QDQ file (``dfmpc.save_model(...,
    format="qdq")`` writes opset 13, as do most quantization tools) folds its constant weights here.

    Parameters
    ----------
    x : ndarray of int8, uint8 or int32
    scale : ndarray, float32, shape () / (1,) (per tensor) or (x.shape[axis],) (per axis)
    zero_point : ndarray of x's dtype, same shape as scale, optional (default 0)
    axis : int
        The axis ``scale`` runs along when it is 1-D (ONNX default 1; negative counts from the end).

    Returns
    -------
    ndarray, float32, shape of x
        ``float32(x - zero_point) * scale``, computed in float32 as onnxruntime does.

    Raises
    ------
    ValueError
        A scale / zero point whose length is neither 1 nor ``x.shape[axis]``.

    Examples
    --------
    >>> q = np.array([[-1, 0, 1], [3, -3, 1]], np.int8)
    >>> dequantize_linear(q, np.array([0.5, 2.0], np.float32), np.zeros(2, np.int8), axis=0)
    array([[-0.5,  0. ,  0.5],
           [ 6. , -6. ,  2. ]], dtype=float32)
    """
    x = np.asarray(x)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.zeros_like(scale, dtype=np.int64) if zero_point is None else np.asarray(zero_point).astype(np.int64)
    shape = [1] * x.ndim
    if scale.size > 1 or scale.ndim == 1:
        axis = axis % max(x.ndim, 1)
        if scale.size not in (1, x.shape[axis]) or zp.size != scale.size:
            raise ValueError(f"DequantizeLinear: scale of shape {scale.shape} / zero point of shape {zp.shape} "
                             f"do not match axis {axis} of input {x.shape}")
        shape[axis] = scale.size
    return ((x.astype(np.int64) - zp.reshape(shape)).astype(np.float32) * scale.reshape(shape)).astype(np.float32)


def tensor_to_array(t: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` with a ValueError naming the tensor for an unknown or unreadable data type.

    Raises
    ------
    ValueError
        ``"initializer 'conv.W': data_type 30 is not a known ONNX tensor type"``, or data that does not
        match its declared type and shape.
    """
    try:
        helper.tensor_dtype_to_np_dtype(t.data_type)
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"initializer {t.name!r}: data_type {t.data_type} is not a known ONNX tensor type") from err
    try:
        return numpy_helper.to_array(t)
    except Exception as err:       # size / type mismatches inside the protobuf
        try:
            type_name = onnx.TensorProto.DataType.Name(t.data_type)
        except ValueError:
            type_name = str(t.data_type)
        raise ValueError(f"initializer {t.name!r} ({type_name}, dims {list(t.dims)}) cannot be read: "
                         f"{type(err).__name__}: {err}") from err


def _batch_dependent(model, shapes, kept) -> set[str]:
    """Names of folded constants computed from the shape of a tensor with an unknown batch size."""
    kept_outputs = {o for n in kept for o in n.output}
    dep: set[str] = set()
    for n in model.graph.node:
        if any(o in kept_outputs for o in n.output):
            continue
        if n.op_type == "Shape" and shapes.get(n.input[0], (0,))[0] is None:
            dep.update(n.output)
        elif any(i in dep for i in n.input):
            dep.update(n.output)
    return dep


def _attrs(n) -> dict:
    out = {}
    for a in n.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list):
            v = tuple(v)
        out[a.name] = v
    return out


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _split(n, consts):
    """Split a node's inputs into activation names and constant arrays (by position)."""
    acts, cst = [], {}
    for k, i in enumerate(n.input):
        if not i:
            continue
        if i in consts:
            cst[k] = consts[i]
        else:
            acts.append(i)
    return acts, cst


def _need_const(n, cst, k, what):
    if k not in cst:
        raise ValueError(f"{what} (input {k}, {n.input[k]!r}) must be a constant")
    return cst[k]


def _geometry_attrs(a, op):
    out = {"kernel_shape": a.get("kernel_shape"), "strides": a.get("strides", (1, 1)),
           "pads": a.get("pads", (0, 0, 0, 0)), "auto_pad": a.get("auto_pad", "NOTSET") or "NOTSET"}
    if op != "AveragePool":
        out["dilations"] = a.get("dilations", (1, 1))
    if out["kernel_shape"] is not None and len(out["kernel_shape"]) != 2:
        raise ValueError(f"only 2-D {op} is supported, got kernel_shape {out['kernel_shape']}")
    return out


def _spatial_mean(n, name, acts, cst, shapes, opset, a) -> Node | list[Node]:
    """``ReduceMean`` over axes (2, 3) of an (N, C, H, W) tensor as ``GlobalAveragePool`` (``keepdims=1``,
    output (N, C, 1, 1)) or ``GlobalAveragePool`` then ``Flatten`` (``keepdims=0``, output (N, C)).
    The axes are an attribute up to opset 17 and the second input from opset 18; any other reduction
    is refused."""
    if len(acts) != 1:
        raise ValueError("expected one activation input")
    axes = a.get("axes") if opset < 18 else (tuple(int(v) for v in cst[1].ravel()) if 1 in cst else None)
    if opset >= 18 and 1 not in cst and len(n.input) > 1 and n.input[1]:
        raise ValueError("the axes must be a constant")
    rank = len(shapes[acts[0]]) if shapes.get(acts[0]) is not None else None
    if rank is not None and rank != 4:
        raise ValueError(f"only a mean over the spatial axes of an (N, C, H, W) tensor is supported, "
                         f"got an input of rank {rank}")
    axes = None if axes is None else sorted(int(v) + 4 if int(v) < 0 else int(v) for v in axes)
    if axes != [2, 3]:
        raise ValueError(f"only a mean over the spatial axes (2, 3) is supported, got axes "
                         f"{'all' if axes is None else axes}")
    if int(a.get("keepdims", 1)):
        return Node(name, "GlobalAveragePool", acts, [n.output[0]])
    pooled = f"{n.output[0]}/pooled"
    return [Node(name, "GlobalAveragePool", acts, [pooled]),
            Node(f"{name}/flatten", "Flatten", [pooled], [n.output[0]], {"axis": 1})]


def _squeeze_to_flatten(n, name, acts, cst, shapes, opset, a, readers=()) -> Node:
    """``Squeeze`` of 1 x 1 spatial axes after a global pool (PyTorch's ``x.squeeze()`` or
    ``x.squeeze(-1).squeeze(-1)`` on an (N, C, 1, 1) tensor) as ``Flatten``.

    The input's spatial axes must all be 1 and only they are squeezed. A Squeeze that leaves one of them
    (the first of two) is taken only when Squeezes or Flattens alone read its output, so that the
    flattened (N, C) it gives instead of (N, C, 1) reaches them alone. ``x.squeeze()`` also drops the batch
    axis of a batch of one in ONNX; here the batch axis is always kept. Anything else is refused."""
    if len(acts) != 1:
        raise ValueError("expected one activation input")
    axes = a.get("axes") if opset < 13 else (tuple(int(v) for v in cst[1].ravel()) if 1 in cst else None)
    if opset >= 13 and 1 not in cst and len(n.input) > 1 and n.input[1]:
        raise ValueError("the axes must be a constant")
    shape = shapes.get(acts[0])
    what = "only a Squeeze of the 1 x 1 spatial axes of an (N, C, 1, 1) tensor is supported"
    if shape is None or len(shape) not in (3, 4) or any(d != 1 for d in shape[2:]) or shape[1] is None:
        raise ValueError(f"{what}, got an input of shape {shape}")
    rank = len(shape)
    spatial = list(range(2, rank))
    axes = [k for k in range(1, rank) if shape[k] == 1] if axes is None else \
        sorted(int(v) + rank if int(v) < 0 else int(v) for v in axes)
    partial = axes != spatial and axes and set(axes) <= set(spatial)
    if axes == spatial or partial and readers and all(r.op_type in ("Squeeze", "Flatten") for r in readers):
        return Node(name, "Flatten", acts, [n.output[0]], {"axis": 1})
    raise ValueError(f"{what}, got axes {axes} of shape {shape}")


def _reader_map(nodes) -> dict:
    """Tensor name -> the nodes that read it, in order."""
    readers: dict = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


def _merge_pads_into_convs(nodes, consts, graph_outputs):
    """The nodes with every zero ``Pad`` of H and W whose output only one ``Conv`` reads merged into that
    conv's ``pads`` (exact: the conv's own pads are zeros too). Other Pads are left, to be refused."""
    readers = _reader_map(nodes)
    drop, conv_pads = set(), {}
    for n in nodes:
        if n.op_type != "Pad" or n.output[0] in graph_outputs or len(readers.get(n.output[0], [])) != 1:
            continue
        conv = readers[n.output[0]][0]
        a = _attrs(n)
        if conv.op_type != "Conv" or conv.input[0] != n.output[0] or a.get("mode", "constant") != "constant":
            continue
        if _attrs(conv).get("auto_pad", "NOTSET") not in ("NOTSET", ""):
            continue
        ins = list(n.input[1:])                 # opset 11+: pads, constant_value, axes (18+)
        if "pads" in a:                                     # before opset 11: attributes
            pads, value = a["pads"], a.get("value", 0.0)
        elif ins and ins[0] in consts and len(ins) <= 2 and (len(ins) < 2 or not ins[1] or ins[1] in consts):
            pads, value = consts[ins[0]], consts[ins[1]] if len(ins) == 2 and ins[1] else 0.0
        else:
            continue
        pads = [int(v) for v in np.asarray(pads).ravel()]
        if len(pads) != 8 or any(pads[k] for k in (0, 1, 4, 5)) or min(pads) < 0 or float(np.asarray(value)) != 0.0:
            continue
        conv_pads[conv.name or conv.output[0]] = (n.input[0], [pads[2], pads[3], pads[6], pads[7]])
        drop.add(id(n))
    out = []
    for n in nodes:
        if id(n) in drop:
            continue
        key = n.name or n.output[0]
        if n.op_type == "Conv" and key in conv_pads:
            src, extra = conv_pads[key]
            own = list(_attrs(n).get("pads", (0, 0, 0, 0)))
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[0] = src
            for attr in [x for x in m.attribute if x.name == "pads"]:
                m.attribute.remove(attr)
            m.attribute.append(helper.make_attribute("pads", [p + q for p, q in zip(own, extra)]))
            n = m
        out.append(n)
    return out


def _convert(n, name, consts, shapes, opset, readers=None) -> Node | list[Node]:
    op, a = n.op_type, _attrs(n)
    acts, cst = _split(n, consts)
    out = [n.output[0]]
    if op == "Conv":
        w = _f32(_need_const(n, cst, 1, "the weight"))
        if w.ndim != 4:
            raise ValueError(f"only 2-D convolutions are supported, weight has shape {w.shape}")
        attrs = _geometry_attrs(a, op)
        attrs["kernel_shape"] = tuple(w.shape[2:])
        attrs["group"] = a.get("group", 1)
        params = {"W": w}
        if 2 in cst:
            params["B"] = _f32(cst[2])
        elif len(n.input) > 2 and n.input[2]:
            raise ValueError("the bias must be a constant")
        return Node(name, "Conv", acts, out, attrs, params)
    if op == "BatchNormalization":
        if a.get("training_mode", 0) or a.get("spatial", 1) != 1:
            raise ValueError("only inference-mode, spatial BatchNormalization is supported")
        p = {k: _f32(_need_const(n, cst, i, k)) for i, k in enumerate(["gamma", "beta", "mean", "var"], 1)}
        return Node(name, op, acts, out, {"epsilon": float(a.get("epsilon", 1e-5))}, p)
    if op in ("Relu", "Identity", "GlobalAveragePool"):
        return Node(name, op, acts, out)
    if op == "LeakyRelu":
        return Node(name, op, acts, out, {"alpha": float(a.get("alpha", 0.01))})
    if op == "Dropout":
        if a.get("training_mode") or (len(n.input) > 2 and n.input[2] in cst and bool(cst[2])):
            raise ValueError("Dropout in training mode is not supported")
        return Node(name, op, acts[:1], out)
    if op == "Clip":
        if opset < 11:
            lo, hi = a.get("min"), a.get("max")
        else:
            if len(acts) != 1:
                raise ValueError("Clip bounds must be constants")
            lo = float(np.asarray(cst[1]).reshape(-1)[0]) if 1 in cst else None     # a scalar, or a 1-element
            hi = float(np.asarray(cst[2]).reshape(-1)[0]) if 2 in cst else None     # tensor some exporters write
        lo = None if lo is None or np.isneginf(lo) or lo <= -3.4e38 else float(lo)
        hi = None if hi is None or np.isposinf(hi) or hi >= 3.4e38 else float(hi)
        return Node(name, op, acts, out, {"min": lo, "max": hi})
    if op in ("Sub", "Div"):                    # activation -/÷ constant only
        if len(acts) != 1 or acts[0] != n.input[0] or 1 not in cst:
            raise ValueError(f"only an activation {'minus' if op == 'Sub' else 'divided by'} a constant is supported")
        c = np.asarray(cst[1], np.float64)
        if op == "Div" and np.any(c == 0):
            raise ValueError("division by a constant with zeros")
        return Node(name, "Add" if op == "Sub" else "Mul", acts, out, {},
                    {"constant": _f32(-c if op == "Sub" else 1.0 / c)})
    if op == "Squeeze":
        return _squeeze_to_flatten(n, name, acts, cst, shapes, opset, a, (readers or {}).get(n.output[0], ()))
    if op in ("Add", "Sum", "Mul"):
        params = {}
        if cst:
            vals = [_f32(v) for v in cst.values()]
            c = vals[0]
            for v in vals[1:]:
                c = c * v if op == "Mul" else c + v
            params["constant"] = _f32(c)
        if not acts:
            raise ValueError("needs at least one non-constant input")
        return Node(name, "Mul" if op == "Mul" else "Add", acts, out, {}, params)
    if op == "Concat":
        return Node(name, op, acts, out, {"axis": int(a["axis"])}) if not cst else _refuse("constant inputs")
    if op == "MaxPool":
        if a.get("storage_order", 0) or (len(n.output) > 1 and n.output[1]):
            raise ValueError("MaxPool indices output / storage_order are not supported")
        attrs = _geometry_attrs(a, op)
        attrs["ceil_mode"] = int(a.get("ceil_mode", 0))
        return Node(name, op, acts, out, attrs)
    if op == "AveragePool":
        attrs = _geometry_attrs(a, op)
        if a.get("dilations", (1, 1)) != (1, 1):
            raise ValueError("dilated AveragePool is not supported")
        attrs["ceil_mode"] = int(a.get("ceil_mode", 0))
        attrs["count_include_pad"] = int(a.get("count_include_pad", 0))
        return Node(name, op, acts, out, attrs)
    if op == "Flatten":
        return Node(name, op, acts, out, {"axis": int(a.get("axis", 1))})
    if op == "ReduceMean":
        return _spatial_mean(n, name, acts, cst, shapes, opset, a)
    if op == "Reshape":
        target = [int(v) for v in _need_const(n, cst, 1, "the target shape").ravel()]
        in_shape = shapes.get(acts[0])
        if len(target) != 2 or not (target[0] in (-1, 0, 1) or target[1] == -1):
            raise ValueError(f"Reshape to {target} is not of the flatten kind (N, -1)")
        if in_shape is not None and None not in in_shape[1:] and target[1] not in (-1, int(np.prod(in_shape[1:]))):
            raise ValueError(f"Reshape of {in_shape} to {target} mixes the batch axis with features")
        return Node(name, "Flatten", acts, out, {"axis": 1})
    if op in ("Gemm", "MatMul"):
        if len(acts) != 1 or acts[0] != n.input[0]:
            raise ValueError("only activation x constant-matrix products are supported")
        b = _f32(_need_const(n, cst, 1, "the weight matrix"))
        if b.ndim != 2:
            raise ValueError(f"weight must be 2-D, got {b.shape}")
        if op == "Gemm" and a.get("transA", 0):
            raise ValueError("transA=1 is not supported")
        w = b if (op == "Gemm" and a.get("transB", 0)) else b.T
        params = {"W": _f32(w * a.get("alpha", 1.0)) if op == "Gemm" else _f32(w)}
        if 2 in cst and op == "Gemm":
            c = _f32(cst[2]) * np.float32(a.get("beta", 1.0))
            params["B"] = _f32(np.broadcast_to(c.reshape(-1) if c.size == w.shape[0] else c, (w.shape[0],)))
        return Node(name, "Gemm", acts, out, {}, params)
    if op == "Softmax":
        rank = len(shapes[acts[0]]) if acts[0] in shapes else None
        axis = int(a.get("axis", 1 if opset < 13 else -1))
        if opset >= 13 and axis != -1 and not (rank is not None and axis % rank == rank - 1):
            raise ValueError(f"opset-13 Softmax over axis {axis} that is not the last axis is not supported")
        # IR semantics: jointly over axes >= axis (opset < 13 "coerce to 2-D"; same as opset 13 on the last axis)
        return Node(name, op, acts, out, {"axis": axis if opset < 13 else -1})
    raise ValueError(f"op {op} is not supported")  # unreachable: filtered before


def _refuse(what):
    raise ValueError(f"{what} are not supported")
