"""OCS, outlier channel splitting (Zhao et al., ICML 2019), weight splitting only.

A layer ``y = W x`` is unchanged if input channel ``j`` is duplicated (``x_j`` read twice) and
the weights that read it are halved, ``W[:, j] x_j = (W[:, j]/2) x_j + (W[:, j]/2) x_j`` (OCS
Sec. 3, "weight splitting"). Splitting the channel that holds the largest ``|w|`` halves the
outlier, so the per-tensor range ``max|W|`` shrinks and a uniform grid gets finer, at the cost
of a few more channels. Repeating it ``ceil(expand_ratio * C)`` times is the paper's procedure.

Duplicating an input channel means the layer that **produces** it must produce it twice. In the
graph IR that needs no special op when the producer is a chain
``conv A -> BatchNormalization -> [Relu | Clip] -> [pooling ...] -> layer B`` with single
consumers: append a copy of A's output row and of the BN's channel, and every op in between
is per channel. So OCS splits exactly the inputs of such layers B (a Conv with group 1, or a
Gemm behind GlobalAveragePool -> Flatten). The stem (reads the image), convs fed by a residual
Add or by a Concat are left unsplit: duplicating their input would need a channel-gather op,
a special case the IR does not have; they are listed in the report.

The activations are FP32 in this project, so OCS's activation splitting does not apply, and
its quantization-aware split (which shifts the two halves by a quarter step) is not built.

References
----------
R. Zhao, Y. Hu, J. Dotzel, C. De Sa, Z. Zhang, "Improving Neural Network Quantization without
Retraining using Outlier Channel Splitting", ICML 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._checks import check_scalar
from ..engine.graph import Graph
from .common import check_graph, layer_bits, quantize_layers, rtn_weights

__all__ = ["SplitChain", "splittable_layers", "split_channels", "split_network", "ocs"]

#: Ops between the activation and layer B that act on each channel separately.
_PER_CHANNEL = ("MaxPool", "AveragePool", "Identity", "Dropout", "GlobalAveragePool", "Flatten")


@dataclass(frozen=True)
class SplitChain:
    """``producer`` conv -> ``bn`` -> ... -> ``layer`` whose input channels can be duplicated."""

    producer: str
    bn: str
    between: tuple[str, ...]
    layer: str


def _only_consumer(g: Graph, tensor: str):
    cons = g.consumers(tensor)
    return cons[0] if len(cons) == 1 and tensor not in g.outputs else None


def splittable_layers(graph: Graph) -> tuple[list[SplitChain], list[tuple[str, str]]]:
    """Layers whose input channels can be duplicated through the graph, and why the others cannot.

    Returns
    -------
    chains : list of SplitChain
    refused : list of (layer name, reason)
        Every other Conv / Gemm.
    """
    check_graph(graph)
    chains, found = [], set()
    for A in graph.nodes_of("Conv"):
        if A.attrs.get("group", 1) != 1:
            continue
        bn = _only_consumer(graph, A.outputs[0])
        if bn is None or bn.op != "BatchNormalization":
            continue
        between, nxt, pooled = [], _only_consumer(graph, bn.outputs[0]), False
        while nxt is not None and (nxt.op in ("Relu", "LeakyRelu", "Clip") + _PER_CHANNEL):
            if nxt.op == "Flatten" and not pooled:      # Flatten of an HxW map mixes channels and positions
                nxt = None
                break
            pooled |= nxt.op == "GlobalAveragePool"
            between.append(nxt.name)
            nxt = _only_consumer(graph, nxt.outputs[0])
        if nxt is None or nxt.inputs[0] != graph.node(between[-1] if between else bn.name).outputs[0]:
            continue
        if (nxt.op == "Conv" and nxt.attrs.get("group", 1) == 1 and not pooled) or (nxt.op == "Gemm" and pooled):
            chains.append(SplitChain(A.name, bn.name, tuple(between), nxt.name))
            found.add(nxt.name)
    refused = [(n.name, "its input is not produced by a conv -> BN -> per-channel chain with single consumers "
                        "(graph input, residual Add, Concat, grouped conv or shared tensor)")
               for n in graph.nodes if n.op in ("Conv", "Gemm") and n.name not in found]
    return chains, refused


def split_channels(W, n_split: int):
    """Weight splitting: ``n_split`` times, halve input channel ``j* = argmax_j max_o |W[o, j]|`` and append a copy.

    Parameters
    ----------
    W : ndarray, shape (O, C) or (O, C, kh, kw)
        Weights of layer B (input channels on axis 1).
    n_split : int >= 0

    Returns
    -------
    W_split : ndarray, shape (O, C + n_split, ...)
        ``W_split[:, j] = W_split[:, C + k] = W[:, j] / 2`` for each split; for any input x,
        ``W_split`` applied to ``x`` with channels ``source`` read again equals ``W`` applied to ``x``.
    source : ndarray of int, shape (n_split,)
        Which original input channel each appended channel duplicates.

    Examples
    --------
    >>> W = np.array([[4.0, 1.0], [-1.0, 0.5]])
    >>> W_s, source = split_channels(W, 1)
    >>> W_s, source
    (array([[ 2. ,  1. ,  2. ],
           [-0.5,  0.5, -0.5]]), array([0]))
    >>> x = np.array([3.0, -2.0])
    >>> bool(np.allclose(W_s @ np.concatenate([x, x[source]]), W @ x))
    True
    """
    W = np.array(W, dtype=np.float64)
    n_split = int(n_split)
    if n_split < 0:
        raise ValueError(f"n_split: expected a non-negative integer, got {n_split}")
    C = W.shape[1]
    origin = list(range(C))
    for _ in range(n_split):
        peak = np.abs(W).reshape(W.shape[0], W.shape[1], -1).max(axis=(0, 2))
        j = int(np.argmax(peak))                          # the channel holding the largest |w|
        W[:, j] /= 2
        W = np.concatenate([W, W[:, j:j + 1]], axis=1)    # OCS weight splitting: w -> (w/2, w/2)
        origin.append(origin[j])
    return W, np.asarray(origin[C:], dtype=np.int64)


def split_network(graph: Graph, expand_ratio: float = 0.05) -> tuple[Graph, dict]:
    """Apply weight splitting to every splittable layer; the FP32 function of the network is unchanged.

    Parameters
    ----------
    graph : Graph
        Never modified.
    expand_ratio : float in [0, 1]
        Each split layer gets ``ceil(expand_ratio * C)`` extra input channels.

    Returns
    -------
    (Graph, dict)
        The split network and ``{"split": {layer: n}, "refused": [(layer, reason)]}``.
    """
    check_graph(graph)
    expand_ratio = check_scalar(expand_ratio, "expand_ratio", min_value=0.0)
    if expand_ratio > 1:
        raise ValueError(f"expand_ratio: expected a fraction in [0, 1], got {expand_ratio}")
    chains, refused = splittable_layers(graph)
    g = graph.copy()
    split = {}
    for ch in chains:
        B, A, bn = g.node(ch.layer), g.node(ch.producer), g.node(ch.bn)
        n = math.ceil(expand_ratio * B.params["W"].shape[1])
        if n == 0:
            continue
        W_split, source = split_channels(B.params["W"], n)
        B.params["W"] = W_split.astype(np.float32)
        for k in A.params:                         # producer A computes the duplicated channels again
            A.params[k] = np.concatenate([A.params[k], A.params[k][source]])
        for k in bn.params:                        # and its BN normalises them the same way
            bn.params[k] = np.concatenate([bn.params[k], bn.params[k][source]])
        split[ch.layer] = n
    return g, {"split": split, "refused": refused}


def ocs(graph, low_bits: int = 2, high_bits: int = 6, *, expand_ratio: float = 0.05, per_channel: bool = False,
        pairs=None, keep_first_high: bool = True):
    """OCS weight splitting, then round-to-nearest at DF-MPC's bit assignment: ``W_q = RTN(split(W))``.

    Parameters
    ----------
    graph : Graph
        Full-precision network; never modified.
    low_bits, high_bits : int in [2, 16]
    expand_ratio : float in [0, 1]
        Fraction of extra input channels per split layer (default 0.05, the largest ratio OCS reports).
    per_channel : bool
        Per-output-channel RTN scales (default per tensor, where splitting matters).
    pairs, keep_first_high
        Passed to :func:`dfmpc.find_pairs` on the unsplit graph; layer names do not change.

    Returns
    -------
    (Graph, dict)
        The quantized, split network (more channels than ``graph`` in split layers and their
        producers) and a report.

    Raises
    ------
    TypeError, ValueError
        Not a Graph; bits or expand_ratio out of range; an invalid explicit pairing.
    """
    check_graph(graph)
    pairing, bits = layer_bits(graph, low_bits, high_bits, pairs, keep_first_high)
    g, info = split_network(graph, expand_ratio)
    q = quantize_layers(g, bits, lambda W, b, name: rtn_weights(W, b, per_channel))
    return q, {"method": "ocs", "expand_ratio": expand_ratio, **info, "low_layers": sorted(pairing.low)}
