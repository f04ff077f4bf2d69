"""Loss-landscape slices around a network (Li et al., NeurIPS 2018), as in the paper's Fig. 5.

``L(alpha, beta) = CE(f(W + alpha d1 + beta d2))`` over random directions ``d1, d2`` normalised filter by
filter, so that networks whose weights differ in scale (full precision, quantized, compensated) are
compared on the same footing. Data for :func:`dfmpc.plotting.fig_loss_landscape_1d` / ``_2d``; this is a
visualisation method, not part of DF-MPC.

References
----------
H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018.
"""

from __future__ import annotations

import numpy as np

from ._checks import as_float_array, check_scalar
from .engine.graph import Graph

__all__ = ["filter_normalized_directions", "perturb", "cross_entropy"]

def filter_normalized_directions(graph, seed=0):
    """A random direction in weight space, normalised filter by filter (Li et al. 2018).

    For every Conv / Gemm weight ``W`` of shape (O, ...), ``d ~ N(0, 1)`` of the same shape, then each
    output filter is rescaled: ``d_o <- d_o ||W_o|| / ||d_o||``. BN parameters and biases are not
    perturbed (Li et al.'s "ignore biasbn").

    Parameters
    ----------
    graph : dfmpc.Graph
    seed : int

    Returns
    -------
    dict of node name -> ndarray (the shape of that node's ``W``), float64

    Raises
    ------
    TypeError
        ``graph`` is not a Graph.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph: expected a dfmpc Graph, got {type(graph).__name__}")
    rng = np.random.default_rng(seed)
    out = {}
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm"):
            continue
        W = node.params["W"].astype(np.float64)
        d = rng.standard_normal(W.shape)
        axes = tuple(range(1, W.ndim))
        wn = np.sqrt(np.sum(W**2, axis=axes, keepdims=True))
        dn = np.sqrt(np.sum(d**2, axis=axes, keepdims=True))
        out[node.name] = d * wn / np.where(dn > 0, dn, 1.0)
    return out


def perturb(graph, directions, alpha, directions2=None, beta=0.0):
    """``graph`` with every perturbed weight set to ``W + alpha d1 + beta d2`` (a new graph; ``graph`` untouched).

    Parameters
    ----------
    graph : dfmpc.Graph
    directions, directions2 : dict of node name -> ndarray of that node's ``W`` shape
        From :func:`filter_normalized_directions`; ``directions2`` must have the same keys.
    alpha, beta : float

    Returns
    -------
    dfmpc.Graph

    Raises
    ------
    KeyError
        A direction names a node ``graph`` does not have, or ``directions2`` lacks a key.
    ValueError
        A direction's shape differs from its weight's; non-finite ``alpha`` / ``beta``.
    """
    alpha, beta = check_scalar(alpha, "alpha"), check_scalar(beta, "beta")
    upd = {}
    for name, d in directions.items():
        W = graph.node(name).params["W"].astype(np.float64) + alpha * d
        if directions2 is not None:
            W = W + beta * directions2[name]
        upd[name] = {"W": W}
    return graph.with_params(upd)


def cross_entropy(logits, y):
    """Mean cross-entropy ``-mean_n log softmax(logits_n)[y_n]``, computed stably.

    Parameters
    ----------
    logits : array_like, shape (N, K)
    y : array_like of int, shape (N,), values in [0, K)

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Non-finite or mis-shaped logits, labels of another length or outside [0, K).
    """
    z = as_float_array(logits, "logits", ndim=2).astype(np.float64)
    y = np.asarray(y)
    if y.shape != (len(z),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"y: expected {len(z)} integer labels in [0, {z.shape[1]}), got {y.dtype} {y.shape}")
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(y)), np.asarray(y)]))
