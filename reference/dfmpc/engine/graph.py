"""The graph IR: named nodes run in topological order.

A :class:`Graph` is a list of :class:`Node` objects plus the names of its
input and output tensors.  Activations flow between nodes by tensor name;
weights live *inside* the node that uses them, in ``node.params`` (a dict of
named float32 arrays).  BatchNormalization is always its own node, so DF-MPC
can read and edit ``gamma``, ``beta``, ``mean``, ``var`` and ``epsilon``.

Parameter names per op (shapes for NCHW activations, OIHW weights):

=====================  ===================================================
Conv                   ``W`` (O, C/groups, kh, kw), optional ``B`` (O,)
BatchNormalization     ``gamma``, ``beta``, ``mean``, ``var`` (C,);
                       attribute ``epsilon``
Gemm                   ``W`` (out, in), optional ``B`` (out,):  y = x W^T + B
Add / Mul              optional ``constant`` broadcast against the input
=====================  ===================================================

Example
-------
>>> g = Graph(nodes=[Node("relu", "Relu", ["x"], ["y"])], inputs=["x"], outputs=["y"])
>>> g.run(np.full((1, 1, 2, 2), -1.0, np.float32)).sum()
0.0
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .ops import SUPPORTED_OPS

@dataclass(eq=False)
class Node:
    """One operation of the graph.

    Parameters
    ----------
    name : str
        Unique node name (used in every error message about this node).
    op : str
        Operation type, an ONNX op name (``"Conv"``, ``"BatchNormalization"``, ...).
    inputs : list of str
        Names of the activation tensors the node reads, in order.
    outputs : list of str
        Names of the tensors the node writes (one for every supported op).
    attrs : dict
        Attributes as plain Python values, e.g. ``{"strides": (1, 1)}``.
    params : dict of str to ndarray
        Named float32 parameter arrays (see the module docstring for shapes).
    """

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)

    def copy(self) -> "Node":
        """Return a deep copy (parameter arrays copied too)."""
        return Node(self.name, self.op, list(self.inputs), list(self.outputs),
                    _copy.deepcopy(self.attrs), {k: v.copy() for k, v in self.params.items()})


class Graph:
    """A readable CNN graph: nodes in topological order, run with NumPy/Numba kernels.

    Parameters
    ----------
    nodes : list of Node
        The nodes; they are stored in topological order (re-sorted if needed).
    inputs : list of str
        Graph input tensor names (one NCHW image batch for CNNs).
    outputs : list of str
        Graph output tensor names.
    input_shapes : dict of str to tuple, optional
        Per-input shape *without* the batch axis, e.g. ``{"x": (1, 28, 28)}``;
        an entry may be ``None`` for unknown dimensions.  Used to check inputs.
    name : str, optional
        Graph name (kept through ONNX / npz round trips).

    Raises
    ------
    ValueError
        Duplicate node names, a tensor written twice, a tensor read but never
        produced, or a cycle.
    """

    def __init__(self, nodes: list[Node], inputs: list[str], outputs: list[str],
                 input_shapes: dict[str, tuple | None] | None = None, name: str = "graph"):
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.input_shapes = dict(input_shapes or {})
        self.name = name
        unsupported = [f"{n.name!r} ({n.op})" for n in nodes if n.op not in SUPPORTED_OPS]
        if unsupported:
            raise ValueError("unsupported ops: " + ", ".join(unsupported)
                             + f"; supported: {sorted(SUPPORTED_OPS)}")
        self.nodes = _topological_order(nodes, self.inputs, self.outputs)

    # ---------------------------------------------------------------- queries
    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        lines = [f"Graph {self.name!r}: inputs {self.inputs} -> outputs {self.outputs}"]
        for n in self.nodes:
            shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in n.params.items())
            lines.append(f"  {n.name}: {n.op}({', '.join(n.inputs)}) -> {', '.join(n.outputs)}"
                         + (f"  [{shapes}]" if shapes else ""))
        return "\n".join(lines)

    def node(self, name: str) -> Node:
        """Return the node called ``name`` (KeyError if there is none)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}")

    def nodes_of(self, op: str) -> list[Node]:
        """All nodes of op type ``op`` (e.g. ``"Conv"``), in topological order."""
        return [n for n in self.nodes if n.op == op]

    def producer(self, tensor: str) -> Node | None:
        """The node that writes ``tensor``, or None for a graph input."""
        for n in self.nodes:
            if tensor in n.outputs:
                return n
        return None

    def consumers(self, tensor: str) -> list[Node]:
        """The nodes that read ``tensor``, in topological order."""
        return [n for n in self.nodes if tensor in n.inputs]

    # ------------------------------------------------------------ parameters
    def params(self) -> dict[str, dict[str, np.ndarray]]:
        """``{node name: {param name: array}}`` for every node with parameters (no copies)."""
        return {n.name: n.params for n in self.nodes if n.params}

    def copy(self) -> "Graph":
        """Deep copy: new nodes, new parameter arrays (cost: one copy of the weights)."""
        return Graph([n.copy() for n in self.nodes], self.inputs, self.outputs,
                     self.input_shapes, self.name)

    def with_params(self, updates: dict[str, dict[str, np.ndarray]]) -> "Graph":
        """Return a new graph with some parameters replaced; ``self`` is left untouched.

        Parameters
        ----------
        updates : dict
            ``{node name: {param name: new array}}``; each new array must have
            the old array's shape.  Arrays are cast to float32 and copied.

        Raises
        ------
        KeyError
            Unknown node or parameter name.
        ValueError
            Shape mismatch.

        Example
        -------
        >>> g2 = g.with_params({"bn1": {"gamma": 2 * g.node("bn1").params["gamma"]}})
        """
        new = self.copy()
        for node_name, arrays in updates.items():
            node = new.node(node_name)
            for key, value in arrays.items():
                if key not in node.params:
                    raise KeyError(f"node {node_name!r} ({node.op}) has no parameter {key!r}; "
                                   f"it has {sorted(node.params)}")
                value = np.asarray(value, dtype=np.float32)
                if value.shape != node.params[key].shape:
                    raise ValueError(f"node {node_name!r} parameter {key!r}: new shape {value.shape} "
                                     f"!= old shape {node.params[key].shape}")
                node.params[key] = value.copy()
        return new

    # -------------------------------------------------------------- running
    def run(self, x: np.ndarray | dict[str, np.ndarray], output: str | None = None,
            batch_size: int = 16) -> np.ndarray:
        """Run the graph on an NCHW float32 batch and return one tensor, ``batch_size`` images at a time.

        Parameters
        ----------
        x : ndarray, shape (N, C, H, W), float32, or dict of str to ndarray
            The input batch (or ``{input name: batch}`` for several inputs).
        output : str, optional
            The tensor to return (any intermediate tensor is allowed); default: the graph's
            output (a graph with several outputs needs :meth:`run_many`).
        batch_size : int
            Images per chunk; memory use is bounded by one chunk's activations.

        Returns
        -------
        ndarray, shape (N, ...), float32
            Always one array (several tensors at once: :meth:`run_many`).

        Raises
        ------
        TypeError
            ``x`` is not a float32 ndarray.
        ValueError
            Wrong rank or shape, unknown tensor, several graph outputs and no ``output``, or a
            node fails (the message names the node).
        """
        from .executor import run_graph
        if output is None:
            if len(self.outputs) != 1:
                raise ValueError(f"the graph has outputs {self.outputs}: name one with output=, "
                                 "or use run_many() for several")
            output = self.outputs[0]
        if not isinstance(output, str):
            raise ValueError(f"output: expected one tensor name (str), got {type(output).__name__}; "
                             "use run_many() for several tensors")
        return run_graph(self, x, outputs=[output], batch_size=batch_size)[output]

    def run_many(self, x: np.ndarray | dict[str, np.ndarray], outputs: list[str] | None = None,
                 batch_size: int = 16) -> dict[str, np.ndarray]:
        """Run the graph and return several tensors by name: always a dict, however many are asked for.

        Parameters
        ----------
        x : ndarray (N, C, H, W) float32, or dict of str to ndarray
            As in :meth:`run`.
        outputs : list of str, optional
            Tensor names (default: the graph outputs).
        batch_size : int

        Returns
        -------
        dict of str to ndarray, each (N, ...) float32

        Raises
        ------
        TypeError, ValueError
            As in :meth:`run`.
        """
        from .executor import run_graph
        if isinstance(outputs, str):
            raise ValueError(f"outputs: expected a list of tensor names, got the string {outputs!r}")
        return run_graph(self, x, outputs=outputs, batch_size=batch_size)


def _topological_order(nodes: list[Node], inputs: list[str], outputs: list[str]) -> list[Node]:
    """Sort ``nodes`` topologically (stable: keeps the given order where possible)."""
    names = [n.name for n in nodes]
    dup = {x for x in names if names.count(x) > 1}
    if dup:
        raise ValueError(f"duplicate node names: {sorted(dup)}")
    producer: dict[str, str] = {}
    for n in nodes:
        for t in n.outputs:
            if t in producer or t in inputs:
                raise ValueError(f"tensor {t!r} is written by node {n.name!r} but is already "
                                 f"produced by {producer.get(t, 'the graph input')!r}")
            producer[t] = n.name
    available = set(inputs)
    remaining = list(nodes)
    ordered: list[Node] = []
    while remaining:
        ready = [n for n in remaining if all(t in available for t in n.inputs)]
        if not ready:
            missing = {t: n.name for n in remaining for t in n.inputs
                       if t not in available and t not in producer}
            if missing:
                raise ValueError("tensors read but never produced: "
                                 + ", ".join(f"{t!r} (read by node {m!r})" for t, m in missing.items()))
            raise ValueError(f"the graph has a cycle through nodes {[n.name for n in remaining]}")
        for n in ready:
            ordered.append(n)
            available.update(n.outputs)
        done = {id(n) for n in ready}
        remaining = [n for n in remaining if id(n) not in done]
    for t in outputs:
        if t not in available:
            raise ValueError(f"graph output {t!r} is never produced")
    return ordered
