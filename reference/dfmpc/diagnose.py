"""How well a re-calibration predicts the statistics of the quantized network it built.

For every conv whose BN was re-calibrated, the BN now *predicts* the mean and variance of that
conv's output in the quantized network (``muhat``, ``sigmahat^2 = varhat + eps``). ``diagnose``
runs the quantized network on real images and *measures* them, so a reader can see, layer by
layer, how far a data-free estimate is from the truth:

``ratio = (varhat + eps) / (measured var + eps)`` per channel; a layer's ``ratio`` is the geometric
mean over its channels, ``log_ratio`` its log; the mean error is reported in units of the measured
standard deviation. The summary gives the median and the maximum of ``|log_ratio|`` over layers.

The floor: even the full-precision network's trained statistics are not those of the given images
(they were averaged over augmented training batches). ``trained_log_ratio`` is the same log ratio for
the trained BN of the full-precision network against its conv output measured on the same images;
a re-calibration cannot be expected to do better than that (the summary's ``*_trained`` entries).

This is a verification tool: it reads images, and nothing it measures flows back into the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .engine.graph import Graph
from .pipeline import QuantizationReport, quantize_network, recalibration_sites, prepare
from .recalibration import channel_moments

__all__ = ["LayerDiagnosis", "Diagnosis", "diagnose", "compare_statistics"]


@dataclass
class LayerDiagnosis:
    """One re-calibrated conv: predicted (BN) and measured statistics of its output, per channel."""

    conv: str
    bn: str
    low: bool                   # the ternary / low-bit conv of a pair
    predicted_mean: list[float]
    predicted_var: list[float]
    measured_mean: list[float]
    measured_var: list[float]
    ratio: float                # geometric mean over channels of (varhat + eps) / (var + eps)
    log_ratio: float            # log(ratio)
    max_abs_log_ratio_channel: float
    mean_error_sigma: float     # median over channels of |muhat - mean| / sqrt(var + eps)
    trained_log_ratio: float = 0.0  # the floor: log geometric mean of (trained var + eps) / (var + eps) in the FP network


@dataclass
class Diagnosis:
    """Per-layer records and the summary over layers; ``report`` is the quantization report."""

    layers: list[LayerDiagnosis] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    report: QuantizationReport | None = None

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers], "summary": dict(self.summary),
                "report": None if self.report is None else self.report.to_dict()}

    def table(self) -> str:
        """Human-readable: one line per layer, then the summary."""
        rows = [f"  {'conv':<42} {'bits':>4} {'var ratio':>10} {'|log|':>7} {'mean err (sigma)':>17} {'FP floor |log|':>15}"]
        for r in self.layers:
            rows.append(f"  {r.conv:<42} {'low' if r.low else 'high':>4} {r.ratio:10.3f} {abs(r.log_ratio):7.3f} "
                        f"{r.mean_error_sigma:17.3f} {abs(r.trained_log_ratio):15.3f}")
        s = self.summary
        if s["layers"] == 0:
            rows.append("  no conv followed by BN: nothing was re-calibrated")
            return "\n".join(rows)
        low = ("no low layers" if s["median_abs_log_ratio_low"] is None else
               f"low layers: median {s['median_abs_log_ratio_low']:.3f}, max {s['max_abs_log_ratio_low']:.3f}")
        rows.append(f"  median |log ratio| {s['median_abs_log_ratio']:.3f}, max {s['max_abs_log_ratio']:.3f} "
                    f"(over {s['layers']} layers; {low})")
        rows.append(f"  FP floor (trained statistics of the full-precision network on these images): median "
                    f"{s['median_abs_log_ratio_trained']:.3f}, max {s['max_abs_log_ratio_trained']:.3f}")
        return "\n".join(rows)


def compare_statistics(predicted_mean, predicted_var, measured_mean, measured_var, eps):
    """Per-layer comparison of predicted and measured channel statistics.

    Parameters
    ----------
    predicted_mean, predicted_var, measured_mean, measured_var : array_like, shape (C,)
        ``varhat`` and the measured variance exclude eps; both get ``eps`` added before the ratio.
    eps : float > 0
        The BN's epsilon.

    Returns
    -------
    ratio, log_ratio, max_abs_log_ratio_channel, mean_error_sigma : float

    Raises
    ------
    ValueError
        Shapes differ, or a variance is negative.
    """
    pm, pv, mm, mv = (np.asarray(a, dtype=np.float64) for a in (predicted_mean, predicted_var, measured_mean, measured_var))
    if not (pm.shape == pv.shape == mm.shape == mv.shape) or pm.ndim != 1:
        raise ValueError(f"compare_statistics: expected four (C,) arrays, got {pm.shape}, {pv.shape}, {mm.shape}, {mv.shape}")
    if np.any(pv < 0) or np.any(mv < 0):
        raise ValueError("compare_statistics: variances must be >= 0")
    logs = np.log((pv + eps) / (mv + eps))
    mean_err = np.abs(pm - mm) / np.sqrt(mv + eps)
    return float(np.exp(logs.mean())), float(logs.mean()), float(np.max(np.abs(logs))), float(np.median(mean_err))


def diagnose(graph: Graph, images: np.ndarray, low_bits: int = 2, high_bits: int = 6, *, batch_size: int = 250,
             **quantize_kwargs) -> Diagnosis:
    """Quantize ``graph`` with :func:`dfmpc.quantize_network` and compare each BN's statistics with the truth.

    Parameters
    ----------
    graph : Graph
        The full-precision network (never modified).
    images : ndarray, shape (N, C, H, W), float32
        Real images the statistics are measured on (not used by the quantization itself unless
        ``recalibration="data"`` is asked for with ``calibration_data``).
    low_bits, high_bits : int
    batch_size : int
        Images per engine call while measuring.
    **quantize_kwargs
        Passed to :func:`dfmpc.quantize_network` (``recalibration``, ``compensation``, ``probes``, ...).

    Returns
    -------
    Diagnosis
        One :class:`LayerDiagnosis` per re-calibrated conv, in topological order, and a summary with
        ``median_abs_log_ratio`` and ``max_abs_log_ratio`` (over layers; also over the low layers only).

    Raises
    ------
    ValueError
        Bad images, or anything :func:`dfmpc.quantize_network` refuses.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.float32 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images: expected a non-empty float32 array (N, C, H, W), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    q, report = quantize_network(graph, low_bits, high_bits, **quantize_kwargs)
    fp = prepare(graph)
    sites = recalibration_sites(fp, q)
    low = {p.low for p in report.pairs}
    measured = q.run_many(images, outputs=[q.node(s.conv).outputs[0] for s in sites], batch_size=batch_size)
    measured_fp = fp.run_many(images, outputs=[fp.node(s.conv).outputs[0] for s in sites], batch_size=batch_size)
    out = Diagnosis(report=report)
    for s in sites:
        p = q.node(s.bn_node).params
        eps = float(q.node(s.bn_node).attrs.get("epsilon", 1e-5))
        mm, mv = channel_moments(measured[q.node(s.conv).outputs[0]])
        pm, pv = p["mean"].astype(np.float64), p["var"].astype(np.float64)
        ratio, log_ratio, worst, mean_err = compare_statistics(pm, pv, mm, mv, eps)
        fm, fv = channel_moments(measured_fp[fp.node(s.conv).outputs[0]])
        trained = compare_statistics(s.bn.mean, s.bn.var, fm, fv, eps)[1]
        out.layers.append(LayerDiagnosis(s.conv, s.bn_node, s.conv in low, pm.tolist(), pv.tolist(), mm.tolist(),
                                         mv.tolist(), ratio, log_ratio, worst, mean_err, trained))
    out.summary = _summary(out.layers)
    return out


def _summary(layers):
    """Median and max of |log ratio| over all layers and over the low layers (None where there are none)."""
    def stats(values):
        a = np.abs(np.asarray(values, dtype=np.float64))
        return (float(np.median(a)), float(a.max())) if a.size else (None, None)
    (med, mx), (med_lo, mx_lo) = stats([r.log_ratio for r in layers]), stats([r.log_ratio for r in layers if r.low])
    med_t, mx_t = stats([r.trained_log_ratio for r in layers])
    return {"layers": len(layers), "median_abs_log_ratio": med, "max_abs_log_ratio": mx,
            "median_abs_log_ratio_low": med_lo, "max_abs_log_ratio_low": mx_lo,
            "median_abs_log_ratio_trained": med_t, "max_abs_log_ratio_trained": mx_t}
