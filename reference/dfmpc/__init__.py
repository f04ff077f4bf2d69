"""dfmpc: reference implementation of DF-MPC (data-free mixed-precision compensation).

Chen, Bai, Huang, Wang, Tian, Liu, "Data-Free Quantization via Mixed-Precision
Compensation without Fine-Tuning", Pattern Recognition 143 (2023) 109780, arXiv:2307.00498.

``import dfmpc`` loads the math only, with NumPy and SciPy: the quantizers, the compensation,
the reconstruction checks and the re-calibration of one pair. The engine (Numba), the loaders
(ONNX) and the driver load the first time one of their names is used (``dfmpc.Graph``,
``dfmpc.load_model``, ``dfmpc.quantize_network``, ...), through the module ``__getattr__`` below;
every submodule is reachable as ``dfmpc.<submodule>`` the same way (issue 14). The import
time is measured by ``benchmarks/import_time.py``.
"""

import importlib
import pkgutil

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
from .pair_recalibration import recalibrate_bn

__version__ = "0.1.0"

__all__ = [
    "ternary", "dorefa", "uniform", "dequantize",
    "BatchNorm", "absorb_scale", "data_free_loss", "quadratic_coefficients", "compensation_coefficients",
    "closed_form",
    "fold_into_bn", "scale_input_channels",
    "conv2d", "pair_forward", "feature_map_loss", "oracle_coefficients",
    "recalibrate_bn",
]

#: Public names whose modules need Numba or ONNX: name -> submodule, imported on first use.
_LAZY = {
    # engine + interop (Numba kernels, onnx)
    "Graph": "engine", "Node": "engine",
    "load_model": "interop", "save_model": "interop",
    # the driver (imports the engine)
    "Pair": "pairing", "Pairing": "pairing", "find_pairs": "pairing",
    "QuantizationReport": "pipeline", "quantize_network": "pipeline",
}
__all__ += list(_LAZY)


def __getattr__(name):
    """Import the module behind a lazy public name or submodule the first time it is asked for."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _submodules():             # dfmpc.engine, dfmpc.pipeline, ... as when `import dfmpc` loaded them
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value                     # later look-ups skip this function
    return value


def _submodules() -> set[str]:
    """Names of the package's submodules (modules and subpackages under ``reference/dfmpc/``)."""
    return {m.name for m in pkgutil.iter_modules(__path__)}


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _submodules())
