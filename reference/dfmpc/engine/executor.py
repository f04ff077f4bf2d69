"""Run a :class:`~dfmpc.engine.graph.Graph` on a batch, chunk by chunk.

Each chunk of ``batch_size`` images flows through the nodes in topological
order; a tensor is dropped as soon as its last reader has run, so peak
memory is bounded by one chunk's live activations.
"""

from __future__ import annotations

import numpy as np

from .ops import OPS


def _check_input(graph, name, x):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"input {name!r} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"input {name!r} must be float32, got {x.dtype} (use x.astype(np.float32))")
    expected = graph.input_shapes.get(name)
    if expected is not None:
        want = (None,) + tuple(expected)
        if x.ndim != len(want) or any(e is not None and e != s for e, s in zip(want, x.shape)):
            shown = "(N, " + ", ".join("?" if e is None else str(e) for e in expected) + ")"
            raise ValueError(f"input {name!r} has shape {x.shape}, expected {shown}")


def run_graph(graph, x, outputs=None, batch_size=64):
    """Run ``graph``; see :meth:`Graph.run` for parameters, returns and errors."""
    feeds = x if isinstance(x, dict) else ({graph.inputs[0]: x} if len(graph.inputs) == 1 else None)
    if feeds is None:
        raise ValueError(f"the graph has inputs {graph.inputs}: pass a dict {{name: array}}")
    missing = set(graph.inputs) - set(feeds)
    if missing:
        raise ValueError(f"missing graph inputs: {sorted(missing)}")
    for name, arr in feeds.items():
        if name not in graph.inputs:
            raise ValueError(f"{name!r} is not a graph input (inputs: {graph.inputs})")
        _check_input(graph, name, arr)
    sizes = {a.shape[0] for a in feeds.values()}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size: {sorted(sizes)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wanted = list(outputs) if outputs is not None else list(graph.outputs)
    known = set(graph.inputs).union(*(n.outputs for n in graph.nodes))
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise ValueError(f"unknown output tensors: {unknown}")

    last_use = {}
    for i, node in enumerate(graph.nodes):
        for t in node.inputs:
            last_use[t] = i
    total = sizes.pop()
    chunks = {t: [] for t in wanted}
    for start in range(0, max(total, 1), int(batch_size)):
        env = {k: v[start:start + batch_size] for k, v in feeds.items()}
        for i, node in enumerate(graph.nodes):
            try:
                y = OPS[node.op](node, *(env[t] for t in node.inputs))
            except (ValueError, TypeError) as err:
                shapes = [env[t].shape for t in node.inputs]
                raise ValueError(f"node {node.name!r} ({node.op}) on input shapes {shapes}: {err}") from err
            env[node.outputs[0]] = y
            for t in node.inputs:
                if last_use[t] == i and t not in chunks:
                    env.pop(t, None)
        for t in wanted:
            chunks[t].append(np.ascontiguousarray(env[t]))
    result = {t: (np.concatenate(c) if len(c) > 1 else c[0]) for t, c in chunks.items()}
    if len(wanted) == 1:
        return result[wanted[0]]
    return result
