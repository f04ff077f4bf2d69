"""Whole-network DF-MPC on an engine graph (paper Algorithm 1), with the baselines the paper's table uses.

``quantize_network(graph, low_bits=2, high_bits=6, ...)`` returns a **new** graph (the input is
never mutated) and a :class:`QuantizationReport`:

1. pair the layers (:mod:`dfmpc.pairing`): in each pair the low conv is quantized at
   ``low_bits`` (2 = TWN ternary, else DoReFa) and the high conv at ``high_bits`` (DoReFa);
   every other Conv / Gemm is quantized at ``high_bits``;
2. walk the convs in topological order; for each conv followed by BN, re-calibrate that BN
   (``recalibration``: ``absorb`` | ``analytic`` | ``data``, see :mod:`dfmpc.recalibration`);
3. for the low conv of a pair, compute c (Eq. (27), or c = 1 for ``compensation="none"``, or
   the data-aware oracle c) and fold it into that BN (exact, because c >= 0 and ReLU is
   positively homogeneous), so the high conv stays on its grid.

Weights are stored dequantized (``scale * grid``, the fake-quant form): with ``absorb`` this is
exactly the integer-grid network with absorbed BN (tested), and it runs on any engine.
Activations stay float32 (the paper's setting: weights MP2/6, activations FP32).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ._checks import check_bits, check_scalar
from .compensation import closed_form, fold_into_bn, quadratic_coefficients
from .engine.graph import Graph
from .engine.ops import OPS
from .pairing import Pairing, find_pairs
from .quantizers import dorefa, ternary
from .recalibration import RECALIBRATIONS, analytic_bn, bn_of, measured_bn, propagate_moments
from .reconstruction import oracle_coefficients

__all__ = ["quantize_network", "quantize_weights", "QuantizationReport", "PairReport", "COMPENSATIONS"]

COMPENSATIONS = ("dfmpc", "none", "oracle")


def quantize_weights(W, bits):
    """Dequantized weights ``s * grid``: TWN ternary for bits = 2 (Eq. (3)-(4), s = alpha), DoReFa kQ otherwise (Eq. (6), s = max|W|).

    Parameters
    ----------
    W : array_like, shape (O, ...)
        One layer's weights (OIHW conv or (out, in) Gemm).
    bits : int in [2, 16]

    Returns
    -------
    ndarray, same shape as W, float32

    Raises
    ------
    ValueError
        Empty or non-finite W, bits out of range (from the quantizers).
    """
    if bits == 2:
        grid, s, _ = ternary(W)
    else:
        grid, s = dorefa(W, bits)
    return (s * grid).astype(np.float32)


@dataclass
class PairReport:
    """Per pair: the low and high layer, c and its statistics, and the data-free loss (22) summed over channels."""

    low: str
    high: str
    c_min: float
    c_mean: float
    c_max: float
    c_zero: int
    loss_before: float   # sum_j L_j(1): no compensation
    loss_after: float    # sum_j L_j(c)
    c: list[float] = field(default_factory=list)   # c_j per output channel of the low layer, as folded into its BN


@dataclass
class QuantizationReport:
    """What :func:`quantize_network` did; ``seconds`` is the wall time of the whole pass."""

    low_bits: int
    high_bits: int
    lambda1: float
    lambda2: float
    recalibration: str
    compensation: str
    pairs: list[PairReport] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        head = (f"MP{self.low_bits}/{self.high_bits}, compensation={self.compensation}, "
                f"recalibration={self.recalibration}, lambda1={self.lambda1}, lambda2={self.lambda2}: "
                f"{len(self.pairs)} pairs, {len(self.unpaired)} unpaired, {self.seconds:.2f} s")
        rows = [f"  {p.low} -> {p.high}: c in [{p.c_min:.3f}, {p.c_max:.3f}] mean {p.c_mean:.3f}"
                f" ({p.c_zero} zero), data-free loss {p.loss_before:.4g} -> {p.loss_after:.4g}" for p in self.pairs]
        return "\n".join([head] + rows)


def _fold_conv_bias_into_bn(g: Graph) -> None:
    """A conv bias before BN is a shift of BN's mean: BN(Wx + b) with mu == BN(Wx) with mu - b (exact)."""
    for conv in g.nodes_of("Conv"):
        if "B" not in conv.params:
            continue
        cons = g.consumers(conv.outputs[0])
        if len(cons) == 1 and cons[0].op == "BatchNormalization" and conv.outputs[0] not in g.outputs:
            cons[0].params["mean"] = (cons[0].params["mean"] - conv.params.pop("B")).astype(np.float32)


def _check_calibration(x):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or len(x) == 0:
        raise ValueError("calibration_data: expected a non-empty float32 array (N, C, H, W) of images "
                         f"(needed by recalibration='data' and compensation='oracle'), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    return x


def quantize_network(graph: Graph, low_bits: int = 2, high_bits: int = 6, *, lambda1: float = 0.5,
                     lambda2: float = 0.0, recalibration: str = "analytic", compensation: str = "dfmpc",
                     pairs=None, calibration_data=None, keep_first_high: bool = True,
                     input_mean=0.0, input_var=1.0, oracle_images: int = 64, weight_quantizer=None):
    """DF-MPC on a whole network: MP``low``/``high`` weights, c folded into the low layers' BN.

    Parameters
    ----------
    graph : Graph
        Full-precision network with BN kept as nodes. Never modified.
    low_bits, high_bits : int in [2, 16]
        Bit-widths; ``low_bits = 2`` means TWN ternary, otherwise DoReFa kQ.
    lambda1, lambda2 : float >= 0
        Weights of Eq. (22) (paper defaults 0.5, 0).
    recalibration : {"absorb", "analytic", "data"}
        How muhat / sigmahat of every BN after a quantized conv are set (module docstring).
    compensation : {"dfmpc", "none", "oracle"}
        Closed-form c (Eq. (27)), c = 1 (the paper's "without compensation"), or the data-aware
        oracle c (non-negative least squares of Eq. (9) on ``calibration_data``).
    pairs : list of (low, high) names, optional
        Explicit pairing; default :func:`dfmpc.pairing.find_pairs`.
    calibration_data : ndarray (N, C, H, W) float32, optional
        Real images for ``recalibration="data"`` or ``compensation="oracle"`` (never for DF-MPC).
    keep_first_high : bool
        Passed to :func:`find_pairs`.
    input_mean, input_var : float
        Moments of the network input assumed by ``analytic`` (0, 1 for standardised images).
    oracle_images : int
        How many of the calibration images the oracle c is fitted on (it solves a C-variable least
        squares over every output value of layer l+1, so a few dozen images are plenty; cost grows
        linearly).
    weight_quantizer : callable (W, bits, name) -> ndarray, optional
        Replaces :func:`quantize_weights` for every layer (e.g. SQuant rounding on the DoReFa grid
        for the high-bit layers, :mod:`dfmpc.baselines`); must return dequantized weights of W's shape.

    Returns
    -------
    (Graph, QuantizationReport)

    Raises
    ------
    ValueError
        Bits out of range, unknown mode, negative lambdas, missing or malformed calibration data,
        an invalid explicit pairing.
    """
    t0 = time.perf_counter()
    if not isinstance(graph, Graph):
        raise TypeError(f"graph: expected a dfmpc Graph, got {type(graph).__name__}")
    low_bits, high_bits = check_bits(low_bits, "low_bits", lo=2), check_bits(high_bits, "high_bits", lo=2)
    lambda1 = check_scalar(lambda1, "lambda1", min_value=0.0)
    lambda2 = check_scalar(lambda2, "lambda2", min_value=0.0)
    if recalibration not in RECALIBRATIONS:
        raise ValueError(f"recalibration: expected one of {RECALIBRATIONS}, got {recalibration!r}")
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation: expected one of {COMPENSATIONS}, got {compensation!r}")
    if recalibration == "data" or compensation == "oracle":
        calibration_data = _check_calibration(calibration_data)

    if weight_quantizer is not None and not callable(weight_quantizer):
        raise TypeError(f"weight_quantizer: expected a callable (W, bits, name) -> W_q, got {type(weight_quantizer).__name__}")
    quantize = weight_quantizer or (lambda W, bits, name: quantize_weights(W, bits))

    fp = graph.copy()
    _fold_conv_bias_into_bn(fp)
    pairing: Pairing = find_pairs(fp, pairs=pairs, keep_first_high=keep_first_high)
    g = fp.copy()
    moments = propagate_moments(fp, input_mean, input_var) if recalibration == "analytic" else None
    fp_acts = {}
    if compensation == "oracle":
        names = [fp.node(p.low).inputs[0] for p in pairing.pairs]
        fp_acts = fp.run(calibration_data[:oracle_images], outputs=names) if names else {}
        if len(names) == 1:
            fp_acts = {names[0]: fp_acts}
    report = QuantizationReport(low_bits, high_bits, lambda1, lambda2, recalibration, compensation,
                                unpaired=list(pairing.unpaired), rejected=list(pairing.rejected))

    # One pass in topological order. With recalibration="data" the calibration images are carried
    # along node by node through the network being built, so each BN is re-measured on the output
    # of the already-quantized (and compensated) layers before it: one forward pass in total.
    env = {g.inputs[0]: calibration_data} if recalibration == "data" else None
    readers = {t: len(g.consumers(t)) for n in g.nodes for t in n.inputs}
    for node in g.nodes:
        if node.op in ("Conv", "Gemm"):
            bits = low_bits if node.name in pairing.low else high_bits
            W_fp = fp.node(node.name).params["W"]
            node.params["W"] = np.asarray(quantize(W_fp, bits, node.name), dtype=np.float32)
            if node.params["W"].shape != W_fp.shape:
                raise ValueError(f"weight_quantizer: returned shape {node.params['W'].shape} for {node.name!r}, "
                                 f"expected {W_fp.shape}")
        if env is not None:
            env[node.outputs[0]] = _run_node(node, env)
            for t in node.inputs:
                readers[t] -= 1
                if readers[t] == 0 and t not in g.outputs:
                    env.pop(t, None)
        cons = g.consumers(node.outputs[0])
        if node.op != "Conv" or len(cons) != 1 or cons[0].op != "BatchNormalization":
            continue
        W, W_q = fp.node(node.name).params["W"], node.params["W"]
        bn_node = cons[0]
        bn = bn_of(fp.node(bn_node.name))
        if recalibration == "absorb":
            bn_hat = bn
        elif recalibration == "analytic":
            bn_hat = analytic_bn(bn, W, W_q, node.attrs.get("group", 1), *moments[node.inputs[0]])   # R.3, R.4
        else:
            bn_hat = measured_bn(bn, env[node.outputs[0]])                # R.5
        pair = pairing.pair_of_low(node.name)
        if pair is not None:
            ones = np.ones(bn.channels)
            den, num, const = quadratic_coefficients(W, W_q, bn, bn_hat, lambda1, lambda2)   # Eq. (22) as (25)-(26)
            if compensation == "dfmpc":
                c = closed_form(den, num)               # Eq. (27), c >= 0: compensation_coefficients(W, W_q, ...)
            elif compensation == "none":
                c = ones
            else:
                c = _oracle(fp, pair, W_q, bn_hat, fp_acts[node.inputs[0]], high_bits, quantize)
            L = lambda c: float(np.sum(den * c**2 - 2 * num * c + const))    # sum_j L_j(c_j), Eq. (22)
            report.pairs.append(PairReport(pair.low, pair.high, float(c.min()), float(c.mean()), float(c.max()),
                                           int(np.sum(c == 0)), L(ones), L(c), [float(v) for v in c]))
            bn_hat = fold_into_bn(bn_hat, c)          # = Eq. (7) on conv B, by (F.a)
        bn_node.params.update({k: getattr(bn_hat, k).astype(np.float32) for k in ("gamma", "beta", "mean", "var")})
    report.seconds = time.perf_counter() - t0
    return g, report


def _run_node(node, env, chunk=128):
    """Output of one node on the whole calibration set, ``chunk`` images at a time (bounded memory)."""
    ins = [env[t] for t in node.inputs]
    N = len(ins[0])
    return np.concatenate([OPS[node.op](node, *[x[i:i + chunk] for x in ins]) for i in range(0, N, chunk)])


def _sym_pads(node):
    pads = tuple(node.attrs.get("pads", (0, 0, 0, 0)))
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or pads[:2] != pads[2:] \
            or tuple(node.attrs.get("dilations", (1, 1))) != (1, 1):
        raise ValueError(f"compensation='oracle': conv {node.name!r} uses asymmetric/auto padding or dilation, "
                         "which the verification conv2d does not support")
    return tuple(node.attrs.get("strides", (1, 1))), pads[:2], node.attrs.get("group", 1)


def _oracle(fp, pair, W_q, bn_hat, A, high_bits, quantize):
    """Oracle c for one pair (Eq. (9) on real activations A of the full-precision network)."""
    lo, hi = fp.node(pair.low), fp.node(pair.high)
    if fp.producer(hi.inputs[0]).name != pair.act:
        raise ValueError(f"compensation='oracle': pair {pair.low} -> {pair.high} has pooling between ReLU and conv B, "
                         "which the verification code does not model")
    (s1, p1, g1), (s2, p2, g2) = _sym_pads(lo), _sym_pads(hi)
    if g1 != 1 or g2 != 1:
        raise ValueError(f"compensation='oracle': grouped convs in pair {pair.low} -> {pair.high} are not supported")
    bn = bn_of(fp.node(pair.bn))
    W_next_hat = quantize(hi.params["W"], high_bits, hi.name)
    return oracle_coefficients(A, lo.params["W"], bn, hi.params["W"], W_q, bn_hat, W_next_hat,
                               stride=s1, padding=p1, stride_next=s2, padding_next=p2, batch_size=32)
