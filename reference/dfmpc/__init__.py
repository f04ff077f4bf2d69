"""dfmpc: reference implementation of DF-MPC (data-free mixed-precision compensation).

Chen, Bai, Huang, Wang, Tian, Liu, "Data-Free Quantization via Mixed-Precision
Compensation without Fine-Tuning", Pattern Recognition 143 (2023) 109780, arXiv:2307.00498.
"""

from .quantizers import ternary, dorefa, uniform, dequantize
from .compensation import (
    BatchNorm,
    absorb_scale,
    data_free_loss,
    quadratic_coefficients,
    compensation_coefficients,
    closed_form,
    fold_into_bn,
    scale_input_channels,
)
from .reconstruction import conv2d, pair_forward, feature_map_loss, oracle_coefficients

__version__ = "0.1.0"

__all__ = [
    "ternary", "dorefa", "uniform", "dequantize",
    "BatchNorm", "absorb_scale", "data_free_loss", "quadratic_coefficients", "compensation_coefficients",
    "closed_form",
    "fold_into_bn", "scale_input_channels",
    "conv2d", "pair_forward", "feature_map_loss", "oracle_coefficients",
]

# --- engine + interop (owned by the engine work; keep this block self-contained) ---
from .engine import Graph, Node  # noqa: E402
from .interop import load_model, save_model  # noqa: E402

__all__ += ["Graph", "Node", "load_model", "save_model"]
# --- end engine + interop ---

from .pairing import Pair, Pairing, find_pairs  # noqa: E402
from .pipeline import QuantizationReport, quantize_network  # noqa: E402

__all__ += ["Pair", "Pairing", "find_pairs", "QuantizationReport", "quantize_network"]
