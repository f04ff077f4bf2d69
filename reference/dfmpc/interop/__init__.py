"""Model I/O: ONNX import/export, the native ``.npz`` format, optional PyTorch helpers.

PyTorch helpers (torch imported lazily): :mod:`dfmpc.interop.torch_export`
(``export_onnx``, ``graph_from_torch``); ``load_state_dict`` needs no torch.

:func:`load_model` and :func:`save_model` choose the format from the file suffix.

Example
-------
>>> import numpy as np, dfmpc
>>> g = dfmpc.load_model("resnet20.onnx")                      # doctest: +SKIP
>>> logits = g.run(images.astype(np.float32))                  # doctest: +SKIP
>>> dfmpc.save_model(g, "resnet20_copy.onnx")                  # doctest: +SKIP
>>> dfmpc.save_model(q, "resnet20_mp26.onnx", format="qdq")   # int8 weights + DequantizeLinear  # doctest: +SKIP
"""

from __future__ import annotations

import os

from ..engine.graph import Graph
from .npz_format import load_npz, save_npz
from .onnx_export import save_onnx, to_onnx
from .onnx_import import from_onnx, load_onnx
from .state_dict import load_state_dict

__all__ = ["load_model", "save_model", "load_onnx", "save_onnx", "from_onnx", "to_onnx",
           "load_npz", "save_npz", "load_state_dict"]


def _suffix(path) -> str:
    return os.path.splitext(os.fspath(path))[1].lower()


def load_model(path: str | os.PathLike) -> Graph:
    """Load a model by suffix: ``.onnx`` (ONNX) or ``.npz`` (dfmpc native format).

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
        Unknown suffix, unreadable file, or unsupported ops (listed with node names).
    """
    suffix = _suffix(path)
    if suffix == ".onnx":
        return load_onnx(path)
    if suffix == ".npz":
        return load_npz(path)
    raise ValueError(f"unknown model suffix {suffix!r} for {os.fspath(path)!r}: use .onnx or .npz")


def save_model(graph: Graph, path: str | os.PathLike, overwrite: bool = False, format: str = "float",
               bits: dict | None = None, report=None) -> None:
    """Save ``graph`` by suffix (``.onnx`` or ``.npz``), atomically.

    Parameters
    ----------
    graph : Graph
    path : str or PathLike
    overwrite : bool
        Replace an existing file; by default an existing file is never overwritten.
    format : {"float", "qdq"}
        ``.onnx`` only: ``"qdq"`` writes each Conv / Gemm weight as int8 with a per-output-channel
        ``DequantizeLinear`` (opset 13; :mod:`dfmpc.interop.qdq`), for a quantized graph.
    bits : dict of str to int, optional
        ``"qdq"``: layer name -> bit-width; a layer may hold at most ``2^bits`` levels.
    report : QuantizationReport, optional
        ``"qdq"``: the report of the :func:`dfmpc.quantize_network` run that made ``graph``: every layer's
        bit-width, and the c of pairs applied by Eq. (7) (through a ReLU6), divided out of conv B's grid.

    Raises
    ------
    TypeError
        ``graph`` is not a Graph.
    ValueError
        Unknown suffix or format (``"qdq"`` with ``.npz``), or the graph cannot be exported, e.g.
        a weight on no int8 grid (nothing is written).
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a dfmpc Graph, got {type(graph).__name__}")
    suffix = _suffix(path)
    if suffix == ".onnx":
        return save_onnx(graph, path, overwrite, format, bits, report)
    if format != "float":
        raise ValueError(f"format: {format!r} is an ONNX format; {os.fspath(path)!r} is {suffix or 'not'} .onnx "
                         "(the .npz format stores float32 weights only)")
    if suffix == ".npz":
        return save_npz(graph, path, overwrite)
    raise ValueError(f"unknown model suffix {suffix!r} for {os.fspath(path)!r}: use .onnx or .npz")
