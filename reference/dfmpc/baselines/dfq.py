"""DFQ baseline: cross-layer equalization, high-bias absorption and analytic bias correction.

Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019 (arXiv:1906.04721). Section numbers below are the paper's:
Sec. 4.1 cross-layer range equalization (CLE, optimal scale proved in its Appendix A),
Sec. 4.1 "absorbing high biases", Sec. 4.2 quantization bias correction (expected input of a
layer from the preceding BN, clipped-normal moments in its Appendix C).

The paper folds BN into the conv before equalizing. This project quantizes the **raw conv weights
with BN kept as its own node**, so here every step is rewritten for an unfolded BN, exactly:

* CLE scales row i of conv A by ``1/s_i`` and input channel i of conv B by ``s_i``; the BN in
  between gets ``mean/s``, ``var' = (var + eps)/s^2`` with ``epsilon = 0`` (normalisation
  unchanged) and ``gamma/s``, ``beta/s`` (BN output divided by s, which ReLU and pooling carry
  to conv B, where ``s`` multiplies it back).
* The bias correction of a conv followed by BN goes into the BN's mean (``mean += eps``), of any
  other Conv / Gemm into its bias.

Labels (CLE.1 ...) refer to ``data_free_derivations/11_dfq.md``. All methods of
:mod:`dfmpc.baselines` use the same MP bit assignment (:func:`dfmpc.baselines.common.layer_bits`);
DFQ here quantizes per tensor with the plain ``rtn`` quantizer, so ``dfq`` minus ``rtn`` isolates
what DFQ adds. Activations stay float32. No function modifies its input graph.
"""

from __future__ import annotations

import numbers

import numpy as np

from .._checks import as_float_array, check_graph_params, check_scalar
from ..engine.graph import Graph
from ..pairing import Pair, candidate_pairs
from ..recalibration import conv_input_groups, propagate_moments
from .common import check_graph, layer_bits, quantize_layers, rtn_weights

__all__ = ["equalization_scales", "channel_ranges", "dfq_objective", "cross_layer_equalize",
           "absorb_high_bias", "bias_correction", "dfq"]


# ----------------------------------------------------------------------------- ranges and scales
def _check_ranges(r, name):
    r = as_float_array(r, name, ndim=1).astype(np.float64)
    if np.any(r < 0):
        raise ValueError(f"{name}: ranges must be >= 0, got min {r.min()}")
    return r


def equalization_scales(r1, r2) -> np.ndarray:
    """DFQ's optimal per-channel scale ``s_i = sqrt(r1_i / r2_i)`` (CLE.1; paper Sec. 4.1, App. A).

    Dividing output channel i of conv A by ``s_i`` and multiplying input channel i of conv B by
    ``s_i`` makes both ranges ``sqrt(r1_i r2_i)``. A channel with a zero range on either side
    keeps ``s_i = 1`` (nothing to equalize; avoids 0/0 and division by zero).

    Parameters
    ----------
    r1 : array_like, shape (C,)
        Range (max |w|) of output channel i of conv A, ``>= 0``.
    r2 : array_like, shape (C,)
        Range of input channel i of conv B, ``>= 0``.

    Returns
    -------
    s : ndarray, shape (C,), float64, all > 0

    Raises
    ------
    ValueError
        Shapes differ, an array is not 1-D / empty / non-finite, a negative range.

    Example
    -------
    >>> r1, r2 = np.array([4.0, 1.0, 0.0, 3.0]), np.array([1.0, 4.0, 2.0, 3.0])
    >>> s = equalization_scales(r1, r2)
    >>> s
    array([2. , 0.5, 1. , 1. ])
    >>> bool(np.allclose((r1 / s)[[0, 1, 3]], (r2 * s)[[0, 1, 3]]))   # equal ranges where both > 0
    True
    """
    r1, r2 = _check_ranges(r1, "r1"), _check_ranges(r2, "r2")
    if r1.shape != r2.shape:
        raise ValueError(f"r1, r2: expected the same shape (C,), got {r1.shape} and {r2.shape}")
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])          # CLE.1: s_i = (1/r2_i) sqrt(r1_i r2_i)
    return s


def _out_ranges(W):
    """(O,): max |W[o]| over everything but the output axis."""
    return np.abs(W).reshape(W.shape[0], -1).max(axis=1)


def _in_ranges(W, group, C):
    """(C,): max |W| over the weights that read input channel i of the graph tensor."""
    idx = conv_input_groups(W, group)                          # (O, C/g) -> input channel
    per = np.abs(W).reshape(W.shape[0], W.shape[1], -1).max(axis=2)
    r = np.zeros(C)
    np.maximum.at(r, idx.ravel(), per.ravel())
    return r


def channel_ranges(graph: Graph, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """``(r1, r2)``: ranges of conv A's output channels and conv B's input channels of one chain.

    Parameters
    ----------
    graph : Graph
    pair : Pair
        A chain from :func:`dfmpc.pairing.candidate_pairs` (``low`` is conv A, ``high`` conv B).

    Returns
    -------
    r1, r2 : ndarray, shape (C,), float64

    Raises
    ------
    TypeError
        ``graph`` is not a Graph.
    KeyError
        ``pair`` names a node the graph does not have.
    """
    A, B = check_graph(graph).node(pair.low), graph.node(pair.high)
    WA, WB = A.params["W"].astype(np.float64), B.params["W"].astype(np.float64)
    return _out_ranges(WA), _in_ranges(WB, B.attrs.get("group", 1), WA.shape[0])


def dfq_objective(r1, r2) -> float:
    """DFQ's objective for one chain: ``sum_i p1_i p2_i``, ``p_i = r_i / max_j r_j`` (CLE.3).

    Parameters
    ----------
    r1, r2 : array_like, shape (C,)
        Channel ranges of conv A (outputs) and conv B (inputs), ``>= 0``.

    Returns
    -------
    float in [0, C]

    Raises
    ------
    ValueError
        Negative, non-finite or mis-shaped ranges.

    Example
    -------
    >>> r1, r2 = np.array([4.0, 1.0]), np.array([1.0, 4.0])
    >>> s = equalization_scales(r1, r2)
    >>> dfq_objective(r1, r2) < dfq_objective(r1 / s, r2 * s) == 2.0
    True
    """
    r1, r2 = _check_ranges(r1, "r1"), _check_ranges(r2, "r2")
    if r1.shape != r2.shape:
        raise ValueError(f"r1, r2: expected the same shape (C,), got {r1.shape} and {r2.shape}")
    R1, R2 = r1.max(), r2.max()
    if R1 == 0 or R2 == 0:
        return 0.0
    return float(np.sum((r1 / R1) * (r2 / R2)))              # CLE.3: sum_i p_i^(1) p_i^(2)


# ----------------------------------------------------------------------------- CLE
def _check_int(x, name, lo):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= {lo}, got {x!r}")
    if int(x) < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {x}")
    return int(x)


def _chains(graph: Graph):
    """Candidate chains CLE can handle, and the skipped ones as (conv A, reason)."""
    cands, rejected = candidate_pairs(graph)
    chains, skipped = [], [(name, f"not equalized: {why}") for name, why in rejected]
    for p in cands:
        A, bn, B = graph.node(p.low), graph.node(p.bn), graph.node(p.high)
        O = A.params["W"].shape[0]
        C = B.params["W"].shape[1] * B.attrs.get("group", 1)
        if not (O == C == bn.params["gamma"].shape[0]):
            skipped.append((p.low, f"not equalized: channel counts differ (conv A {O}, BN "
                                   f"{bn.params['gamma'].shape[0]}, conv B input {C})"))
            continue
        chains.append(p)
    return chains, skipped


def cross_layer_equalize(graph: Graph, iterations: int = 1000, tol: float = 1e-6) -> tuple[Graph, dict]:
    """Cross-layer range equalization over every conv -> BN -> ReLU -> [pool] -> conv chain (CLE.1, CLE.2).

    For each chain (in topological order) the ranges of conv A's output channels and conv B's input
    channels (raw weights as stored) are measured, ``s = equalization_scales(r1, r2)``, row i of A is
    divided by ``s_i`` and input channel i of B multiplied by ``s_i``. Chains share convs (B of one is
    A of the next), so sweeps repeat until ``max_i |s_i - 1| <= tol`` in a whole sweep or
    ``iterations`` sweeps are done. Grouped / depthwise convs are handled: A's output channel i is
    its row i, B's input channel i is every weight that reads it (``conv_input_groups``).

    The BN between them is updated exactly (CLE.2), all in float64 and stored in float32 once at the
    end; ReLU is positively homogeneous and MaxPool / AveragePool / Identity / Dropout commute with a
    positive per-channel scale, so the network function is unchanged. Chains through ReLU6 (Clip)
    are skipped, with the reason, as :func:`dfmpc.pairing.candidate_pairs` rejects them.

    Parameters
    ----------
    graph : Graph
        Full-precision network, BN as its own node. Not modified.
    iterations : int >= 1
        Maximum number of sweeps over all chains. The sweeps stop as soon as one changes no scale by
        more than ``tol``; the zoo ResNets converge within 100, the 12 chains of the VGG-16 need 207.
    tol : float >= 0
        Convergence threshold on ``max |s - 1|`` over one sweep.

    Returns
    -------
    Graph
        The equalized float network (the BNs of equalized chains have ``epsilon = 0``).
    dict
        ``method``, ``chains`` [(A, B)], ``equalized_chains``, ``iterations`` (sweeps run),
        ``converged``, ``last_max_change``, ``scales`` {"A->B": total s (C,)},
        ``skipped`` [(conv A, reason)].

    Raises
    ------
    TypeError
        ``graph`` is not a Graph, ``iterations`` not an int.
    ValueError
        ``iterations < 1``, ``tol`` negative or not finite.

    Example
    -------
    >>> from dfmpc.engine.builders import resnet_cifar
    >>> g = resnet_cifar(8, seed=0)
    >>> g_eq, info = cross_layer_equalize(g)
    >>> x = np.random.default_rng(0).normal(size=(2, 1, 28, 28)).astype(np.float32)
    >>> y = g.run(x)
    >>> bool(np.abs(g_eq.run(x) - y).max() <= 1e-4 * np.abs(y).max())    # same function
    True
    >>> r1, r2 = channel_ranges(g_eq, candidate_pairs(g_eq)[0][0])
    >>> bool(np.allclose(r1, r2, rtol=1e-5))                               # equal ranges
    True
    """
    check_graph_params(check_graph(graph), "graph")            # NaN/Inf or a negative variance: refused, naming the node
    g = graph.copy()
    iterations = _check_int(iterations, "iterations", 1)
    tol = check_scalar(tol, "tol", min_value=0.0)
    chains, skipped = _chains(g)

    # float64 working copies of every parameter CLE touches
    W = {}
    bias = {}
    for p in chains:
        for name in (p.low, p.high):
            W[name] = g.node(name).params["W"].astype(np.float64)
            if "B" in g.node(name).params:
                bias[name] = g.node(name).params["B"].astype(np.float64)
    bns = {}
    for p in chains:
        node = g.node(p.bn)
        bns[p.bn] = {k: node.params[k].astype(np.float64) for k in ("gamma", "beta", "mean", "var")}
        bns[p.bn]["var"] = bns[p.bn]["var"] + float(node.attrs.get("epsilon", 1e-5))
        # The node's eps is one scalar, but after scaling channel i by 1/s_i the exact normaliser is
        # sqrt((var_i + eps) / s_i^2): no single eps' gives it for every channel. So eps is moved
        # into var (var' = var + eps, eps' = 0), which is exact for any s. (CLE.2)
    total = {p: np.ones(W[p.low].shape[0]) for p in chains}

    sweeps, converged, change = 0, not chains, 0.0
    for _ in range(iterations if chains else 0):
        sweeps += 1
        change = 0.0
        for p in chains:
            groupB = g.node(p.high).attrs.get("group", 1)
            r1 = _out_ranges(W[p.low])                                  # r_i^(1)
            r2 = _in_ranges(W[p.high], groupB, r1.shape[0])              # r_i^(2)
            s = equalization_scales(r1, r2)                              # CLE.1
            W[p.low] = W[p.low] / s[:, None, None, None]                 # W^(1) <- S^-1 W^(1)
            if p.low in bias:
                bias[p.low] = bias[p.low] / s                            # b^(1) <- S^-1 b^(1)
            idx = conv_input_groups(W[p.high], groupB)
            W[p.high] = W[p.high] * s[idx][:, :, None, None]             # W^(2) <- W^(2) S
            bn = bns[p.bn]                                               # CLE.2: BN(x/s) / s
            bn["mean"] = bn["mean"] / s                                  #   mean' = mean / s
            bn["var"] = bn["var"] / s**2                                 #   var' + 0 = (var + eps) / s^2
            bn["gamma"] = bn["gamma"] / s                                #   gamma' = gamma / s
            bn["beta"] = bn["beta"] / s                                  #   beta' = beta / s
            total[p] = total[p] * s
            change = max(change, float(np.max(np.abs(s - 1.0))))
        if change <= tol:
            converged = True
            break

    for name, w in W.items():
        g.node(name).params["W"] = w.astype(np.float32)
    for name, b in bias.items():
        g.node(name).params["B"] = b.astype(np.float32)
    for name, prm in bns.items():
        node = g.node(name)
        for k, v in prm.items():
            node.params[k] = v.astype(np.float32)
        node.attrs["epsilon"] = 0.0
    info = {"method": "cle", "chains": [(p.low, p.high) for p in chains], "equalized_chains": len(chains),
            "iterations": sweeps, "converged": converged, "last_max_change": change,
            "scales": {f"{p.low}->{p.high}": total[p] for p in chains}, "skipped": skipped}
    return g, info


# ----------------------------------------------------------------------------- high-bias absorption
def absorb_high_bias(graph: Graph, n_sigma: float = 3.0) -> Graph:
    """DFQ's high-bias absorption over every CLE chain (HBA.1, HBA.2; paper Sec. 4.1).

    For chain A -> BN -> ReLU -> [pool] -> B: ``c_i = max(0, beta_i - n_sigma |gamma_i|)`` is removed
    from the BN's beta and added to conv B's output through its bias,
    ``b_B[o] += sum_i sum_uv W_B[o, i, u, v] c_i`` (parameter ``B`` created if absent).

    Exact only when (a) every pre-activation of channel i stays ``>= c_i`` (then
    ``ReLU(h - c) + c = ReLU(h)``; the BN output is taken as ``N(beta, gamma^2)`` so ``n_sigma = 3``
    makes a violation rare, not impossible), (b) conv B has no zero padding (padded zeros get no
    ``c``, so border outputs change) and (c) an AveragePool in between has no padding counted.
    With float32 activations, as here, it does not help accuracy; it is provided for completeness.

    Parameters
    ----------
    graph : Graph
        Not modified.
    n_sigma : float >= 0

    Returns
    -------
    Graph

    Raises
    ------
    TypeError
        ``graph`` is not a Graph, ``n_sigma`` not a real number.
    ValueError
        ``n_sigma`` negative or not finite.

    Example
    -------
    >>> from dfmpc.engine.builders import resnet_cifar
    >>> g = resnet_cifar(8, seed=0)
    >>> bn = g.node("layers.0.bn1")
    >>> bn.params["beta"][:] = 5.0                     # a high bias: c = 5 - 3 |gamma| > 0
    >>> g2 = absorb_high_bias(g)
    >>> c = 5.0 - 3.0 * np.abs(bn.params["gamma"].astype(np.float64))
    >>> bool(np.allclose(g2.node("layers.0.bn1").params["beta"], 5.0 - c, atol=1e-6))
    True
    """
    check_graph_params(check_graph(graph), "graph")
    g = graph.copy()
    n_sigma = check_scalar(n_sigma, "n_sigma", min_value=0.0)
    chains, _ = _chains(g)
    for p in chains:
        bn, B = g.node(p.bn), g.node(p.high)
        gamma, beta = bn.params["gamma"].astype(np.float64), bn.params["beta"].astype(np.float64)
        c = np.maximum(0.0, beta - n_sigma * np.abs(gamma))                       # HBA.1
        if not np.any(c > 0):
            continue
        bn.params["beta"] = (beta - c).astype(np.float32)                         # beta' = beta - c
        WB = B.params["W"].astype(np.float64)
        idx = conv_input_groups(WB, B.attrs.get("group", 1))
        shift = np.sum(WB.sum(axis=(2, 3)) * c[idx], axis=1)                      # HBA.2: W_B c
        b_old = B.params.get("B", np.zeros(WB.shape[0], np.float32)).astype(np.float64)
        B.params["B"] = (b_old + shift).astype(np.float32)
    return g


# ----------------------------------------------------------------------------- bias correction
def _check_same_structure(g_fp: Graph, g_q: Graph):
    names_fp = [(n.name, n.op) for n in g_fp.nodes]
    names_q = [(n.name, n.op) for n in g_q.nodes]
    if names_fp != names_q:
        raise ValueError("graph_q: expected the same nodes (names and ops) as graph_fp")
    for n in g_fp.nodes:
        if n.op in ("Conv", "Gemm") and n.params["W"].shape != g_q.node(n.name).params["W"].shape:
            raise ValueError(f"graph_q: weight of {n.name!r} has shape {g_q.node(n.name).params['W'].shape}, "
                             f"graph_fp has {n.params['W'].shape}")


def _bias_correction(graph_fp: Graph, graph_q: Graph, input_mean, input_var):
    g_fp = check_graph(graph_fp)
    if not isinstance(graph_q, Graph):
        raise TypeError(f"graph_q: expected a dfmpc Graph, got {type(graph_q).__name__}")
    _check_same_structure(g_fp, graph_q)
    input_mean = as_float_array(input_mean, "input_mean", ndim=(0, 1)).astype(np.float64)
    input_var = as_float_array(input_var, "input_var", ndim=(0, 1)).astype(np.float64)
    if np.any(input_var < 0):
        raise ValueError("input_var: expected variances >= 0")
    moments = propagate_moments(g_fp, input_mean, input_var)            # BC.1: E[x] under the BN model
    g = graph_q.copy()
    corrected, uncorrected = [], []
    for node in g.nodes:
        if node.op not in ("Conv", "Gemm"):
            continue
        W = g_fp.node(node.name).params["W"].astype(np.float64)
        dW = node.params["W"].astype(np.float64) - W                    # epsilon = W_q - W (actual bits)
        if not np.any(dW):
            continue
        if node.inputs[0] not in moments:
            uncorrected.append((node.name, "no expected input (an op propagate_moments does not model)"))
            continue
        m = moments[node.inputs[0]][0]                                  # E[x_i], (C,)
        if node.op == "Conv":
            idx = conv_input_groups(dW, node.attrs.get("group", 1))
            eps = np.sum(dW.sum(axis=(2, 3)) * m[idx], axis=1)          # BC.2: eps_o = sum_i sum_uv dW E[x_i]
        else:
            if dW.shape[1] % m.shape[0]:
                uncorrected.append((node.name, f"input has {dW.shape[1]} features, moments for {m.shape[0]} channels"))
                continue
            m = np.repeat(m, dW.shape[1] // m.shape[0])                 # Flatten of (C, H, W) is channel-major
            eps = dW @ m                                                # BC.2 for y = x W^T + b
        out = node.outputs[0]
        cons = g.consumers(out)
        if (node.op == "Conv" and out not in g.outputs and len(cons) == 1
                and cons[0].op == "BatchNormalization"):
            bn = cons[0]                                                # BN(y_q) with mean + eps = BN(y_q - eps)
            bn.params["mean"] = (bn.params["mean"].astype(np.float64) + eps).astype(np.float32)
        else:
            b = node.params.get("B", np.zeros(dW.shape[0], np.float32)).astype(np.float64)
            node.params["B"] = (b - eps).astype(np.float32)             # b <- b - eps E[x]
        corrected.append(node.name)
    return g, corrected, uncorrected


def bias_correction(graph_fp: Graph, graph_q: Graph, input_mean=0.0, input_var=1.0) -> Graph:
    """DFQ's analytic bias correction (BC.1, BC.2; paper Sec. 4.2): remove the expected output error.

    For every Conv / Gemm whose weights differ between ``graph_q`` and ``graph_fp``, with the
    **actual** quantized weights ``W_q`` of ``graph_q`` (whatever their bit-width) and the expected
    input ``E[x]`` of the full-precision network (:func:`dfmpc.recalibration.propagate_moments`:
    BN outputs Gaussian, rectified Gaussian after ReLU, zero padding ignored),

    ``eps_o = sum_i sum_uv (W_q - W)[o, i, u, v] E[x_i]``  (BC.2)

    is subtracted from the output: into the following BN's mean (``mean += eps``) when the conv's
    single consumer is a BN, otherwise from the layer's bias (``B`` created if absent). Layers whose
    input moments cannot be propagated are left uncorrected.

    Parameters
    ----------
    graph_fp : Graph
        The full-precision network ``graph_q`` was quantized from. Not modified.
    graph_q : Graph
        Same nodes and weight shapes, quantized (dequantized) weights. Not modified.
    input_mean, input_var : float or array_like, shape (C_in,)
        Moments of the network input (0 and 1 for standardised images).

    Returns
    -------
    Graph
        ``graph_q`` with corrected BN means / biases.

    Raises
    ------
    TypeError
        A graph argument is not a Graph.
    ValueError
        ``graph_q`` has other nodes or weight shapes than ``graph_fp``; bad input moments.

    Example
    -------
    >>> from dfmpc.engine.builders import resnet_cifar
    >>> from dfmpc.recalibration import propagate_moments
    >>> g = resnet_cifar(8, seed=0)
    >>> gq = quantize_layers(g, {n.name: 3 for n in g.nodes_of("Conv") + g.nodes_of("Gemm")},
    ...                      lambda W, b, name: rtn_weights(W, b))
    >>> gc = bias_correction(g, gq)
    >>> name, bn = "layers.0.conv2", "layers.0.bn2"
    >>> m = propagate_moments(g)[g.node(name).inputs[0]][0]
    >>> dW = gq.node(name).params["W"].astype(float) - g.node(name).params["W"].astype(float)
    >>> eps = (dW.sum(axis=(2, 3)) * m).sum(axis=1)                       # BC.2
    >>> shift = gc.node(bn).params["mean"].astype(float) - gq.node(bn).params["mean"].astype(float)
    >>> bool(np.allclose(shift, eps, atol=1e-5))
    True
    """
    return _bias_correction(graph_fp, graph_q, input_mean, input_var)[0]


# ----------------------------------------------------------------------------- the whole method
def dfq(graph: Graph, low_bits: int = 2, high_bits: int = 6, *, pairs=None, keep_first_high: bool = True,
        equalize: bool = True, absorb_bias: bool = False, correct_bias: bool = True, n_sigma: float = 3.0,
        iterations: int = 1000, tol: float = 1e-6, input_mean=0.0, input_var=1.0) -> tuple[Graph, dict]:
    """DFQ at DF-MPC's mixed precision: CLE -> (high-bias absorption) -> per-tensor RTN -> bias correction.

    Every Conv / Gemm is quantized with ``common.rtn_weights(W, bits, per_channel=False)`` at the bits
    of :func:`dfmpc.baselines.common.layer_bits` (computed on the equalized graph; same names, so the
    same assignment as DF-MPC and the other baselines). To combine "CLE then DF-MPC", run
    :func:`cross_layer_equalize` and pass its graph to :func:`dfmpc.quantize_network`.

    Parameters
    ----------
    graph : Graph
        Full-precision network, BN as its own node. Not modified.
    low_bits, high_bits : int in [2, 16]
    pairs, keep_first_high
        As :func:`dfmpc.pairing.find_pairs` (which layers are low-bit).
    equalize : bool
        Run :func:`cross_layer_equalize` (``iterations``, ``tol``).
    absorb_bias : bool
        Run :func:`absorb_high_bias` (``n_sigma``) after CLE.
    correct_bias : bool
        Run :func:`bias_correction` (``input_mean``, ``input_var``) after quantization.

    Returns
    -------
    Graph
        The quantized network (dequantized float32 weights, float32 activations).
    dict
        ``method`` ("dfq"), ``low_bits``, ``high_bits``, ``bits`` {layer: bits}, ``equalized_chains``,
        ``iterations``, ``converged``, ``skipped`` [(conv, reason)], ``absorbed_high_bias``,
        ``bias_corrected`` [layer], ``uncorrected`` [(layer, reason)].

    Raises
    ------
    TypeError, ValueError
        Bad arguments, each naming the argument.

    Example
    -------
    >>> from dfmpc.engine.builders import resnet_cifar
    >>> g = resnet_cifar(8, seed=0)
    >>> gq, info = dfq(g, 2, 6)
    >>> info["method"], info["equalized_chains"], info["bits"]["layers.0.conv1"]
    ('dfq', 3, 2)
    """
    check_graph_params(check_graph(graph), "graph")
    for name, flag in (("equalize", equalize), ("absorb_bias", absorb_bias), ("correct_bias", correct_bias),
                       ("keep_first_high", keep_first_high)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name}: expected a bool, got {flag!r}")
    info = {"method": "dfq", "low_bits": low_bits, "high_bits": high_bits, "equalized_chains": 0,
            "iterations": 0, "converged": True, "skipped": [], "absorbed_high_bias": bool(absorb_bias),
            "bias_corrected": [], "uncorrected": []}
    g = graph
    if equalize:
        g, cle = cross_layer_equalize(g, iterations=iterations, tol=tol)
        info.update(equalized_chains=cle["equalized_chains"], iterations=cle["iterations"],
                    converged=cle["converged"], skipped=cle["skipped"])
    if absorb_bias:
        g = absorb_high_bias(g, n_sigma=n_sigma)
    _, bits = layer_bits(g, low_bits, high_bits, pairs=pairs, keep_first_high=keep_first_high)
    info["bits"] = bits
    g_q = quantize_layers(g, bits, lambda W, b, name: rtn_weights(W, b, per_channel=False))
    if correct_bias:
        g_q, info["bias_corrected"], info["uncorrected"] = _bias_correction(g, g_q, input_mean, input_var)
    return g_q, info
