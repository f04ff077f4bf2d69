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
    OSError
        The file cannot be opened (permissions, ...).
    ValueError
        Anything else: not a zip archive, a damaged archive or array, pickled (object) data, no or a
        malformed ``__graph__`` description, or a graph the engine rejects. The message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    what = f"{path!r} is not a readable dfmpc .npz graph"
    with open(path, "rb") as f:                # OSError (e.g. permission denied) names the path itself
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ValueError(f"{what}: not a zip archive (an .npz file starts with the bytes 'PK')")
        f.seek(0)
        try:
            return _graph_from_archive(f)
        except _Malformed as err:
            raise ValueError(f"{what}: {err}") from None
        except Exception as err:   # zipfile / npy header / zlib / JSON / Graph errors on a damaged file
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            if "allow_pickle" in msg or "pickle" in msg.lower():
                msg = "it holds pickled (object) data, which dfmpc never loads"
            raise ValueError(f"{what}: {type(err).__name__}: {msg}" if msg else f"{what}: {type(err).__name__}") from err


class _Malformed(Exception):
    """A structural problem of the archive found by the checks below (reported as a ValueError)."""


def _expect(cond, what: str):
    if not cond:
        raise _Malformed(what)


def _graph_from_archive(f) -> Graph:
    with np.load(f, allow_pickle=False) as z:
        _expect("__graph__" in z.files, "no '__graph__' entry")
        desc = json.loads(str(z["__graph__"][()]))
        _expect(isinstance(desc, dict), "'__graph__' is not a JSON object")
        _expect(desc.get("format") == FORMAT and desc.get("version") == VERSION,
                f"format {desc.get('format')!r} version {desc.get('version')!r} is not {FORMAT!r} version {VERSION}")
        for key, kind in (("nodes", list), ("inputs", list), ("outputs", list), ("input_shapes", dict),
                          ("name", str)):
            _expect(isinstance(desc.get(key), kind), f"'__graph__' field {key!r} is not a {kind.__name__}")
        nodes = []
        for k, d in enumerate(desc["nodes"]):
            _expect(isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("op"), str)
                    and isinstance(d.get("inputs"), list) and isinstance(d.get("outputs"), list)
                    and isinstance(d.get("attrs"), dict) and isinstance(d.get("params"), dict),
                    f"node number {k} of '__graph__' is malformed")
            params = {}
            for p, key in d["params"].items():
                _expect(isinstance(key, str) and key in z.files,
                        f"node {d['name']!r}: parameter {p!r} names no array of the archive")
                arr = z[key]
                _expect(arr.dtype.kind in "fiub", f"node {d['name']!r}: parameter {p!r} has dtype {arr.dtype}")
                params[p] = np.asarray(arr, dtype=np.float32)
            nodes.append(Node(d["name"], d["op"], list(d["inputs"]), list(d["outputs"]),
                              {a: _from_json(v) for a, v in d["attrs"].items()}, params))
    return Graph(nodes, desc["inputs"], desc["outputs"],
                 {k: _from_json(v) for k, v in desc["input_shapes"].items()}, name=desc["name"])
