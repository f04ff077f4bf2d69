"""The native ``.npz`` format: one JSON graph description plus the parameter arrays.

Layout of the archive (``numpy.savez``, loaded with ``allow_pickle=False``):

``__graph__``
    0-d unicode array holding JSON: ``{"format": "dfmpc-graph", "version": 1,
    "name", "inputs", "outputs", "input_shapes", "nodes": [{"name", "op",
    "inputs", "outputs", "attrs", "params": {param name: array key}}]}``.
``p<k>/<param name>``
    float32 parameter arrays of node number ``k``.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from ..engine.graph import Graph, Node
from ._atomic import write_atomically

FORMAT, VERSION = "dfmpc-graph", 1


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _from_json(v):
    return tuple(_from_json(x) for x in v) if isinstance(v, list) else v


def save_npz(graph: Graph, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``graph`` to ``path`` (``.npz``), atomically.

    Parameters
    ----------
    graph : Graph
    path : str or PathLike
    overwrite : bool
        Replace an existing file (default: refuse with FileExistsError).
    """
    arrays, nodes = {}, []
    for k, n in enumerate(graph.nodes):
        keys = {}
        for pname, arr in n.params.items():
            keys[pname] = f"p{k}/{pname}"
            arrays[keys[pname]] = np.ascontiguousarray(arr, dtype=np.float32)
        nodes.append({"name": n.name, "op": n.op, "inputs": n.inputs, "outputs": n.outputs,
                      "attrs": {a: _jsonable(v) for a, v in n.attrs.items()}, "params": keys})
    desc = {"format": FORMAT, "version": VERSION, "name": graph.name, "inputs": graph.inputs,
            "outputs": graph.outputs,
            "input_shapes": {k: _jsonable(tuple(v)) for k, v in graph.input_shapes.items()},
            "nodes": nodes}
    arrays["__graph__"] = np.array(json.dumps(desc))
    write_atomically(path, lambda f: np.savez(f, **arrays), overwrite)


def load_npz(path: str | os.PathLike) -> Graph:
    """Load a graph written by :func:`save_npz` (no pickle is ever loaded).

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
        Not a dfmpc graph archive, or a malformed one.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "__graph__" not in z.files:
                raise ValueError("no '__graph__' entry")
            desc = json.loads(str(z["__graph__"][()]))
            if desc.get("format") != FORMAT or desc.get("version") != VERSION:
                raise ValueError(f"format {desc.get('format')!r} version {desc.get('version')!r} "
                                 f"is not {FORMAT!r} version {VERSION}")
            nodes = [Node(d["name"], d["op"], list(d["inputs"]), list(d["outputs"]),
                          {a: _from_json(v) for a, v in d["attrs"].items()},
                          {p: np.asarray(z[key], dtype=np.float32) for p, key in d["params"].items()})
                     for d in desc["nodes"]]
    except (zipfile.BadZipFile, OSError, KeyError, json.JSONDecodeError, EOFError) as err:
        raise ValueError(f"{path!r} is not a readable dfmpc .npz graph: {err}") from err
    except ValueError as err:
        raise ValueError(f"{path!r} is not a readable dfmpc .npz graph: {err}") from err
    return Graph(nodes, desc["inputs"], desc["outputs"],
                 {k: _from_json(v) for k, v in desc["input_shapes"].items()}, name=desc["name"])
