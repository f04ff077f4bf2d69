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

__all__ = ["Method", "METHODS", "DEFAULT_METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    """A named quantization method: ``run(graph, low_bits, high_bits, pairs=..., calibration_data=...)``."""

    name: str
    summary: str
    data_free: bool
    run: Callable
    reference: str


def _rtn(graph, lo, hi, pairs=None, calibration_data=None):
    from .rtn import rtn
    return rtn(graph, lo, hi, pairs=pairs)


def _rtn_channel(graph, lo, hi, pairs=None, calibration_data=None):
    from .rtn import rtn
    return rtn(graph, lo, hi, per_channel=True, pairs=pairs)


def _ocs(graph, lo, hi, pairs=None, calibration_data=None):
    from .ocs import ocs
    return ocs(graph, lo, hi, pairs=pairs)


def _dfq(graph, lo, hi, pairs=None, calibration_data=None):
    from .dfq import dfq
    return dfq(graph, lo, hi, pairs=pairs)


def _squant(graph, lo, hi, pairs=None, calibration_data=None):
    from .squant import squant
    return squant(graph, lo, hi, pairs=pairs)


def _dfmpc(**fixed):
    def run(graph, lo, hi, pairs=None, calibration_data=None):
        from ..pipeline import quantize_network
        q, rep = quantize_network(graph, lo, hi, pairs=pairs, calibration_data=calibration_data, **fixed)
        return q, rep.to_dict()
    return run


def _cle_dfmpc(graph, lo, hi, pairs=None, calibration_data=None):
    from ..pipeline import quantize_network
    from .dfq import cross_layer_equalize
    eq, info = cross_layer_equalize(graph)
    q, rep = quantize_network(eq, lo, hi, pairs=pairs)
    return q, {**rep.to_dict(), "equalization": info}


def _dfmpc_squant(graph, lo, hi, pairs=None, calibration_data=None):
    from ..pipeline import quantize_network, quantize_weights
    from .common import layer_bits
    from .squant import squant_dorefa
    pairing, _ = layer_bits(graph, lo, hi, pairs)

    def quantizer(W, bits, name):
        # the low layers keep TWN / DoReFa; SQuant rounds the DoReFa grid of every other layer
        return quantize_weights(W, bits) if name in pairing.low else squant_dorefa(W, bits)
    q, rep = quantize_network(graph, lo, hi, pairs=pairs, weight_quantizer=quantizer)
    return q, rep.to_dict()


def _squant_recal(graph, lo, hi, pairs=None, calibration_data=None):
    from ..pipeline import quantize_network
    from .squant import squant_weights
    q, rep = quantize_network(graph, lo, hi, pairs=pairs, compensation="none", recalibration="analytic",
                              weight_quantizer=lambda W, bits, name: squant_weights(W, bits))
    return q, rep.to_dict()


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("rtn", "round-to-nearest, per-tensor scale", True, _rtn, "-"),
    Method("rtn-channel", "round-to-nearest, per-channel scale", True, _rtn_channel, "-"),
    Method("ocs", "outlier channel splitting (5% more input channels), per-tensor RTN", True, _ocs,
           "Zhao et al., ICML 2019"),
    Method("dfq", "cross-layer equalisation + analytic bias correction, per-tensor RTN", True, _dfq,
           "Nagel et al., ICCV 2019"),
    Method("squant", "SQuant adaptive rounding (element, kernel, channel), per-channel grid", True, _squant,
           "Guo et al., ICLR 2022"),
    Method("none", "TWN / DoReFa, c = 1, scale absorbed in BN (the paper's 'without compensation')", True,
           _dfmpc(compensation="none", recalibration="absorb"), "Chen et al. 2023"),
    Method("recal", "TWN / DoReFa, analytic BN re-calibration, c = 1", True,
           _dfmpc(compensation="none", recalibration="analytic"), "this project (derivation 10)"),
    Method("dfmpc", "DF-MPC: closed-form c, analytic BN re-calibration", True,
           _dfmpc(compensation="dfmpc", recalibration="analytic"), "Chen et al. 2023"),
    Method("cle+dfmpc", "DFQ's cross-layer equalisation, then DF-MPC", True, _cle_dfmpc, "combination"),
    Method("dfmpc+squant", "DF-MPC with SQuant rounding of the high-bit DoReFa grid", True, _dfmpc_squant,
           "combination"),
    Method("squant+recal", "SQuant weights, analytic BN re-calibration, c = 1", True, _squant_recal,
           "combination"),
    Method("oracle", "c >= 0 fitted to Eq. (9) on real calibration images (NOT data-free)", False,
           _dfmpc(compensation="oracle", recalibration="absorb"), "this project"),
]}

#: What ``dfmpc compare`` runs without ``--methods``.
DEFAULT_METHODS = tuple(METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``, or a ValueError listing the known names."""
    if name not in METHODS:
        raise ValueError(f"methods: unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
