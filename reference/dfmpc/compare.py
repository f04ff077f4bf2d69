"""Run several quantization methods on the same network and images: accuracy and quantization time.

The protocol, identical for every method: the same full-precision weights, the same bit-width per
layer (DF-MPC's MP``low``/``high`` assignment), the same evaluation images. Data-aware methods
(``oracle``) get ``calibration_data``, which must not overlap the evaluation images; the data-free
ones never see an image. ``seconds`` is the wall time of the quantization step alone (the method
call, from the full-precision graph to the quantized graph), not of the evaluation.
"""

from __future__ import annotations

import time

import numpy as np

from ._checks import check_bits, check_graph_params
from .baselines import DEFAULT_METHODS, get_method
from .engine.graph import Graph
from .evaluation import accuracy, check_backend

__all__ = ["compare", "format_table"]


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def compare(graph: Graph, x: np.ndarray, y: np.ndarray, methods=DEFAULT_METHODS, low_bits: int = 2,
            high_bits: int = 6, *, calibration_data=None, pairs=None, log=None, backend: str = "engine",
            progress=None) -> list[dict]:
    """Top-1 accuracy and quantization time of each method, plus the FP32 row.

    Parameters
    ----------
    graph : Graph
        Full-precision network; never modified.
    x : ndarray, shape (N, C, H, W), float32
    y : ndarray, shape (N,), int
        Evaluation images and labels.
    methods : sequence of str
        Names from :data:`dfmpc.baselines.METHODS`.
    low_bits, high_bits : int in [2, 16]
    calibration_data : ndarray (M, C, H, W) float32, optional
        Only for data-aware methods; a data-aware method without it is reported as refused.
    pairs : list of (low, high) names, optional
        Explicit pairing for every method.
    log : callable(str), optional
        Called with one line per finished method (progress for long runs).
    backend : {"engine", "onnxruntime"}
        Where the evaluations run (:func:`dfmpc.evaluation.accuracy`): the project's engine (default)
        or onnxruntime (the extra ``ort``). The quantization itself always uses dfmpc.
    progress : bool or None
        A progress bar on stderr per evaluation (None: only on a terminal, for evaluations that last).

    Returns
    -------
    list of dict
        One row per method (FP32 first): ``method``, ``summary``, ``data_free``, ``accuracy``
        (fraction, None if refused), ``seconds`` (quantization step), ``error`` (the refusal
        message or None), ``info`` (the method's own report).

    Raises
    ------
    ValueError
        Unknown method name, empty method list, bits outside [2, 16], ``low_bits > high_bits``, unknown
        ``backend``, a NaN/Inf parameter or a negative BN variance (naming the node). A method that
        refuses the network (e.g. an op it cannot handle) does not raise: its row carries the message.
    ImportError
        ``backend="onnxruntime"`` without onnxruntime installed (names the extra ``ort``).
    """
    methods = list(methods)
    if not methods:
        raise ValueError("methods: expected at least one method name")
    chosen = [get_method(m) for m in methods]          # unknown names fail before any work
    low_bits, high_bits = check_bits(low_bits, "low_bits", lo=2), check_bits(high_bits, "high_bits", lo=2)
    if low_bits > high_bits:
        raise ValueError(f"low_bits: expected low_bits <= high_bits (the low layer of a pair is the lower-precision "
                         f"one), got low_bits={low_bits}, high_bits={high_bits}")
    if not isinstance(graph, Graph):
        raise TypeError(f"graph: expected a dfmpc Graph, got {type(graph).__name__}")
    check_graph_params(graph)      # NaN/Inf weights or a negative BN variance: refused up front, naming the node
    check_backend(backend)         # a missing onnxruntime fails before any work, not as every row's refusal
    rows = [{"method": "fp32", "summary": "full precision", "data_free": True,
             "accuracy": accuracy(graph, x, y, progress=progress, label="fp32", backend=backend), "seconds": 0.0,
             "error": None, "info": {}}]
    if log:
        log(f"  {'fp32':<14} {100 * rows[0]['accuracy']:6.2f}%")
    for m in chosen:
        row = {"method": m.name, "summary": m.summary, "data_free": m.data_free, "accuracy": None,
               "seconds": None, "error": None, "info": {}}
        try:
            if not m.data_free and calibration_data is None:
                raise ValueError(f"{m.name} needs calibration images (it is not data-free)")
            t0 = time.perf_counter()
            q, info = m.run(graph, low_bits, high_bits, pairs=pairs,
                            calibration_data=None if m.data_free else calibration_data)
            row["seconds"] = time.perf_counter() - t0
            row["info"] = _jsonable(info)
            row["accuracy"] = accuracy(q, x, y, progress=progress, label=m.name, backend=backend)
        except ValueError as exc:                       # a refusal; any other exception is a bug and propagates
            row["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        rows.append(row)
        if log:
            log(f"  {m.name:<14} " + (f"{100 * row['accuracy']:6.2f}%   ({row['seconds']:.3f} s)"
                                      if row["error"] is None else f"refused: {row['error']}"))
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`compare` rows."""
    lines = [f"  {'method':<14} {'top-1':>7}  {'quantize':>9}  description"]
    for r in rows:
        acc = "refused" if r["error"] else f"{100 * r['accuracy']:6.2f}%"
        sec = "" if r["error"] or r["method"] == "fp32" else f"{r['seconds']:.3f} s"
        desc = r["summary"] + ("" if r["data_free"] else "  [uses data]")
        lines.append(f"  {r['method']:<14} {acc:>7}  {sec:>9}  {desc}" + (f": {r['error']}" if r["error"] else ""))
    return "\n".join(lines)
