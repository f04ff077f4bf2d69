"""Round-to-nearest (RTN): the baseline every data-free method has to beat.

Each Conv / Gemm is quantized with symmetric uniform round-to-nearest at the bit-width DF-MPC
gives it (:func:`dfmpc.baselines.common.layer_bits`), with one scale per tensor (``rtn``) or
one scale per output channel (``rtn-channel``). Per-channel RTN is the honest "what if you just
used a finer quantizer" control for DF-MPC's per-channel c: both spend one float per output
channel, RTN on the scale of the grid, DF-MPC on a factor after it.
"""

from __future__ import annotations

from .common import check_graph, layer_bits, quantize_layers, rtn_weights

__all__ = ["rtn"]


def rtn(graph, low_bits: int = 2, high_bits: int = 6, *, per_channel: bool = False, pairs=None,
        keep_first_high: bool = True):
    """MP``low``/``high`` network with every weight rounded to the nearest level, ``W_q = s clip(round(W / s))``.

    Parameters
    ----------
    graph : Graph
        Full-precision network; never modified.
    low_bits, high_bits : int in [2, 16]
        Bit-widths of the low conv of each DF-MPC pair and of every other layer.
    per_channel : bool
        One scale per output channel instead of one per tensor.
    pairs, keep_first_high
        Passed to :func:`dfmpc.find_pairs` (the same assignment DF-MPC uses).

    Returns
    -------
    (Graph, dict)
        The quantized network and ``{"method", "per_channel", "low_layers", "layers"}``.

    Raises
    ------
    TypeError
        ``graph`` is not a Graph.
    ValueError
        Bits out of range; an invalid explicit pairing.

    Examples
    --------
    >>> from dfmpc.engine.builders import resnet_cifar
    >>> g = resnet_cifar(depth=8, seed=0)
    >>> q, info = rtn(g, 2, 6)
    >>> import numpy as np; W = q.node(sorted(info["low_layers"])[0]).params["W"]
    >>> len(np.unique(W)) <= 3          # 2 bits, restricted range: {-s, 0, s}
    True
    """
    check_graph(graph)
    pairing, bits = layer_bits(graph, low_bits, high_bits, pairs, keep_first_high)
    q = quantize_layers(graph, bits, lambda W, b, name: rtn_weights(W, b, per_channel))
    return q, {"method": "rtn-channel" if per_channel else "rtn", "per_channel": per_channel,
               "low_layers": sorted(pairing.low), "layers": len(bits)}
