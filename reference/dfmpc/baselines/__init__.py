"""Data-free baselines run on the same weights, bit assignment and evaluation as DF-MPC.

Every method has the signature ``method(graph, low_bits, high_bits, *, pairs=None,
calibration_data=None) -> (Graph, dict)``, never mutates ``graph``, and quantizes the low conv
of each DF-MPC pair at ``low_bits`` and every other Conv / Gemm at ``high_bits``
(:func:`dfmpc.baselines.common.layer_bits`). :data:`METHODS` lists them by name; ``dfmpc compare``
and ``benchmarks/compare.py`` run them side by side.

=============  ============================================================================
rtn            symmetric round-to-nearest, one scale per tensor (:mod:`.rtn`)
rtn-channel    the same, one scale per output channel
ocs            outlier channel splitting (weights), then per-tensor RTN (:mod:`.ocs`)
dfq            cross-layer equalisation + bias correction, per-tensor RTN (:mod:`.dfq`)
squant         SQuant data-free adaptive rounding, per-channel grid (:mod:`.squant`)
none           the paper's "without compensation": TWN / DoReFa, c = 1, BN scale absorbed
recal          TWN / DoReFa with the data-free ``analytic`` BN re-calibration, c = 1
dfmpc          DF-MPC: closed-form c (Eq. (27)) with ``analytic`` re-calibration (the default)
cle+dfmpc      DFQ's cross-layer equalisation (exact in FP32), then DF-MPC
dfmpc+squant   DF-MPC with SQuant rounding on the DoReFa grid of the high-bit layers
squant+recal   SQuant weights (every layer) with the ``analytic`` BN re-calibration, c = 1
oracle         data-aware: the c >= 0 minimising Eq. (9) on calibration images (a reference)
=============  ============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..pipeline import quantize_network, quantize_weights
from . import dfq, ocs, rtn, squant      # the modules (importing their functions would shadow them)
from .common import layer_bits

__all__ = ["Method", "METHODS", "DEFAULT_METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    """A named quantization method: ``run(graph, low_bits, high_bits, pairs=..., calibration_data=...)``."""

    name: str
    summary: str
    data_free: bool
    run: Callable
    reference: str


def _data_free(fn, **fixed):
    """``fn(graph, low_bits, high_bits, pairs=..., **fixed)`` in the registry's signature (no images reach it)."""
    def run(graph, lo, hi, pairs=None, calibration_data=None):
        return fn(graph, lo, hi, pairs=pairs, **fixed)
    return run


def _pipeline(**fixed):
    """:func:`dfmpc.quantize_network` with some arguments fixed, its report as a dict."""
    def run(graph, lo, hi, pairs=None, calibration_data=None):
        q, rep = quantize_network(graph, lo, hi, pairs=pairs, calibration_data=calibration_data, **fixed)
        return q, rep.to_dict()
    return run


def _cle_dfmpc(graph, lo, hi, pairs=None, calibration_data=None):
    eq, info = dfq.cross_layer_equalize(graph)
    q, rep = quantize_network(eq, lo, hi, pairs=pairs)
    return q, {**rep.to_dict(), "equalization": info}


def _dfmpc_squant(graph, lo, hi, pairs=None, calibration_data=None):
    pairing, _ = layer_bits(graph, lo, hi, pairs)

    def quantizer(W, bits, name):
        # the low layers keep TWN / DoReFa; SQuant rounds the DoReFa grid of every other layer
        return quantize_weights(W, bits) if name in pairing.low else squant.squant_dorefa(W, bits)
    return _pipeline(weight_quantizer=quantizer)(graph, lo, hi, pairs)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("rtn", "round-to-nearest, per-tensor scale", True, _data_free(rtn.rtn), "-"),
    Method("rtn-channel", "round-to-nearest, per-channel scale", True, _data_free(rtn.rtn, per_channel=True), "-"),
    Method("ocs", "outlier channel splitting (5% more input channels), per-tensor RTN", True, _data_free(ocs.ocs),
           "Zhao et al., ICML 2019"),
    Method("dfq", "cross-layer equalisation + analytic bias correction, per-tensor RTN", True, _data_free(dfq.dfq),
           "Nagel et al., ICCV 2019"),
    Method("squant", "SQuant adaptive rounding (element, kernel, channel), per-channel grid", True, _data_free(squant.squant),
           "Guo et al., ICLR 2022"),
    Method("none", "TWN / DoReFa, c = 1, scale absorbed in BN (the paper's 'without compensation')", True,
           _pipeline(compensation="none", recalibration="absorb"), "Chen et al. 2023"),
    Method("recal", "TWN / DoReFa, analytic BN re-calibration, c = 1", True,
           _pipeline(compensation="none", recalibration="analytic"), "this project (derivation 10)"),
    Method("dfmpc-analytic", "DF-MPC: closed-form c, analytic BN re-calibration", True,
           _pipeline(compensation="dfmpc", recalibration="analytic"), "Chen et al. 2023 + derivation 10"),
    Method("recal-seq", "TWN / DoReFa, sequential BN re-calibration on distilled probes, c = 1", True,
           _pipeline(compensation="none", recalibration="sequential"), "this project (derivations 15, 16)"),
    Method("dfmpc", "DF-MPC: closed-form c, sequential BN re-calibration on distilled probes (the default)", True,
           _pipeline(compensation="dfmpc", recalibration="sequential"), "Chen et al. 2023 + derivations 15, 16"),
    Method("cle+dfmpc", "DFQ's cross-layer equalisation, then DF-MPC", True, _cle_dfmpc, "combination"),
    Method("dfmpc+squant", "DF-MPC with SQuant rounding of the high-bit DoReFa grid", True, _dfmpc_squant,
           "combination"),
    Method("squant+recal", "SQuant weights, sequential BN re-calibration on distilled probes, c = 1", True,
           _pipeline(compensation="none", recalibration="sequential",
                     weight_quantizer=lambda W, bits, name: squant.squant_weights(W, bits)),
           "combination"),
    Method("oracle", "c >= 0 fitted to Eq. (9) on real calibration images (NOT data-free)", False,
           _pipeline(compensation="oracle", recalibration="absorb"), "this project"),
]}

#: What ``dfmpc compare`` runs without ``--methods``.
DEFAULT_METHODS = tuple(METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``, or a ValueError listing the known names."""
    if name not in METHODS:
        raise ValueError(f"methods: unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
