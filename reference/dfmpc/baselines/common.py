"""What every baseline shares: the mixed-precision bit assignment and one weight-replacement pass.

All methods in :mod:`dfmpc.baselines` are compared at the **same bit-width per layer** as DF-MPC:
the low conv of each pair (:func:`dfmpc.pairing.find_pairs`) at ``low_bits``, every other Conv /
Gemm at ``high_bits``. They differ only in how each layer's weights are quantized and corrected.
Weights are stored dequantized (fake-quant form), activations stay float32, and the input graph
is never modified.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._checks import check_bits, check_graph_params
from ..engine.graph import Graph
from ..pairing import Pairing, find_pairs
from ..quantizers import dequantize, uniform

__all__ = ["check_graph", "layer_bits", "quantize_layers", "rtn_weights"]


def check_graph(graph) -> Graph:
    """Raise a TypeError unless ``graph`` is a :class:`dfmpc.Graph`."""
    if not isinstance(graph, Graph):
        raise TypeError(f"graph: expected a dfmpc Graph, got {type(graph).__name__}")
    return graph


def layer_bits(graph: Graph, low_bits: int, high_bits: int, pairs=None,
               keep_first_high: bool = True) -> tuple[Pairing, dict[str, int]]:
    """The MP``low``/``high`` assignment DF-MPC uses: ``{Conv/Gemm name: bits}`` and the pairing it comes from.

    Raises
    ------
    ValueError
        Bits outside [2, 16]; an invalid explicit pairing; a NaN/Inf parameter or a negative BN
        variance (the message names the node).
    """
    low_bits, high_bits = check_bits(low_bits, "low_bits", lo=2), check_bits(high_bits, "high_bits", lo=2)
    check_graph_params(check_graph(graph), "graph")      # NaN/Inf weights or a negative BN variance: refused, naming the node
    pairing = find_pairs(graph, pairs=pairs, keep_first_high=keep_first_high)
    bits = {n.name: (low_bits if n.name in pairing.low else high_bits)
            for n in graph.nodes if n.op in ("Conv", "Gemm")}
    return pairing, bits


def rtn_weights(W, bits: int, per_channel: bool = False) -> np.ndarray:
    """Symmetric round-to-nearest ``s * clip(round(W / s), -qmax, qmax)``, ``s = max|W| / qmax``, dequantized.

    Parameters
    ----------
    W : array_like, shape (O, ...)
    bits : int in [2, 16]
        ``qmax = 2^(bits-1) - 1`` (restricted range: 2 bits gives the levels ``{-s, 0, s}``).
    per_channel : bool
        One scale per output channel (axis 0) instead of one per tensor.

    Returns
    -------
    ndarray, same shape as W, float32
    """
    return dequantize(uniform(W, bits, symmetric=True, per_channel=per_channel)).astype(np.float32)


def quantize_layers(graph: Graph, bits: dict[str, int],
                    quantize: Callable[[np.ndarray, int, str], np.ndarray]) -> Graph:
    """A copy of ``graph`` whose Conv/Gemm weights are ``quantize(W, bits[name], name)`` (float32).

    Parameters
    ----------
    graph : Graph
    bits : dict of layer name -> int
        Every Conv / Gemm of ``graph`` must be a key.
    quantize : callable (W, bits, name) -> ndarray of W's shape
    """
    g = check_graph(graph).copy()
    for node in g.nodes:
        if node.op in ("Conv", "Gemm"):
            W_q = np.asarray(quantize(node.params["W"], bits[node.name], node.name), dtype=np.float32)
            if W_q.shape != node.params["W"].shape:
                raise ValueError(f"quantize: returned shape {W_q.shape} for {node.name!r}, "
                                 f"expected {node.params['W'].shape}")
            node.params["W"] = W_q
    return g
