"""Load a PyTorch-style ``state_dict`` into a graph whose node names are module names.

The builders in :mod:`dfmpc.engine.builders` name nodes after the modules of
``scripts/train_zoo.py`` (``stem.0``, ``layers.3.bn1``, ``fc``), so a trained
``state_dict`` (tensors or arrays; torch itself is not needed) maps on by name.
"""

from __future__ import annotations

import numpy as np

from ..engine.graph import Graph

#: op type -> {state_dict suffix: IR parameter name}
KEYS = {
    "Conv": {"weight": "W", "bias": "B"},
    "Gemm": {"weight": "W", "bias": "B"},
    "BatchNormalization": {"weight": "gamma", "bias": "beta", "running_mean": "mean", "running_var": "var"},
}
IGNORED_SUFFIXES = ("num_batches_tracked",)


def _array(v) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float32)


def load_state_dict(graph: Graph, state_dict: dict) -> Graph:
    """Return a copy of ``graph`` with parameters taken from ``state_dict``.

    Parameters
    ----------
    graph : Graph
        Nodes named after the modules (e.g. from ``resnet_cifar``).
    state_dict : dict of str to array-like
        ``{"<module>.weight": (O, C, kh, kw), "<bn>.running_var": (C,), ...}``.

    Returns
    -------
    Graph

    Raises
    ------
    KeyError
        Keys of the state_dict that match no node parameter, or node
        parameters missing from the state_dict (both listed).
    ValueError
        A shape mismatch (names the node and parameter).
    """
    updates, used, missing = {}, set(), []
    for node in graph.nodes:
        for suffix, pname in KEYS.get(node.op, {}).items():
            key = f"{node.name}.{suffix}"
            if key in state_dict:
                updates.setdefault(node.name, {})[pname] = _array(state_dict[key])
                used.add(key)
            elif pname in node.params:
                missing.append(key)
    unexpected = [k for k in state_dict if k not in used and not k.endswith(IGNORED_SUFFIXES)]
    if missing or unexpected:
        raise KeyError(f"state_dict does not match the graph: missing {missing}, unexpected {unexpected}")
    for node_name, arrays in updates.items():
        node = graph.node(node_name)
        for pname in arrays:
            if pname not in node.params:
                raise KeyError(f"node {node_name!r} has no parameter {pname!r} (bias given for a bias-free conv?)")
    return graph.with_params(updates)
