"""``import dfmpc`` is light: the math with NumPy and SciPy only; Numba and ONNX load on first use (issue 14).

Each check runs in a fresh interpreter (a subprocess): in the test process other tests have long since
imported the engine. No timing is asserted here; the import time is measured by
``benchmarks/import_time.py`` (figure in the README).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("numba", "llvmlite", "onnx", "onnxruntime", "torch", "matplotlib")


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object, returned here."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_LOADED = """
import json, sys
{before}
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))))
"""


def test_import_dfmpc_loads_no_engine_no_loader():
    loaded = _python(_LOADED.format(before="import dfmpc", heavy=HEAVY))
    assert loaded == [], f"import dfmpc loaded {loaded}"


def test_the_check_sees_numba_and_onnx_once_the_engine_and_a_loader_are_used():
    """Negative control: the same check does report numba and onnx when they are loaded."""
    loaded = _python(_LOADED.format(before="import dfmpc; dfmpc.Graph; dfmpc.load_model", heavy=HEAVY))
    assert {"numba", "onnx"} <= set(loaded)


def test_the_math_runs_without_the_engine():
    """The light names are usable, not just importable: quantize, re-calibrate, compensate, reconstruct."""
    code = """
import json, sys
import numpy as np
import dfmpc
rng = np.random.default_rng(0)
W, W_next = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(2, 4, 3, 3))
bn = dfmpc.BatchNorm(gamma=np.ones(4), beta=np.zeros(4), mean=np.zeros(4), var=np.ones(4))
W_hat, alpha, _ = dfmpc.ternary(W)
X = rng.normal(size=(4, 3, 6, 6))
bn_hat = dfmpc.recalibrate_bn(bn, W, alpha * W_hat, "sequential", X_fp=X, X_q=X, padding=1)
c = dfmpc.compensation_coefficients(W, alpha * W_hat, bn, bn_hat)
dfmpc.feature_map_loss(X, W, bn, W_next, alpha * W_hat, bn_hat, W_next, c, padding=1, padding_next=1)
dfmpc.oracle_coefficients(X, W, bn, W_next, alpha * W_hat, bn_hat, W_next, padding=1, padding_next=1)
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {"numba", "onnx", "llvmlite"})))
"""
    assert _python(code) == []


def _names_used_in_the_project() -> set[str]:
    """Every ``dfmpc.<name>`` written in the README, the notebooks, the tests and the benchmarks."""
    files = [ROOT / "README.md"]
    for folder in ("notebooks", "tests", "benchmarks"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".ipynb", ".md")]
    pattern = re.compile(r"(?<![\w./-])dfmpc\.([A-Za-z_]\w*)")
    return {m for p in files if p.is_file() for m in pattern.findall(p.read_text(errors="replace"))}


def test_every_public_name_and_every_name_the_project_uses_still_resolves():
    used = sorted(_names_used_in_the_project() - {"__all__", "__version__"})
    assert {"quantize_network", "load_model", "engine", "conv2d"} <= set(used)      # the scan finds what it should
    code = f"""
import json, importlib
import dfmpc
light = set(vars(dfmpc))                                   # before any lazy name is asked for
missing = [n for n in dfmpc.__all__ + {used!r} if not hasattr(dfmpc, n)]
same = {{n: getattr(dfmpc, n) is getattr(importlib.import_module('dfmpc.' + dfmpc._LAZY[n]), n) for n in dfmpc._LAZY}}
ns = {{}}
exec('from dfmpc import *', ns)
print(json.dumps({{"missing": missing, "same": same, "star": sorted(set(dfmpc.__all__) - set(ns)),
                   "lazy_were_absent": sorted(set(dfmpc._LAZY) & light), "dir": sorted(set(dfmpc.__all__) - set(dir(dfmpc)))}}))
"""
    r = _python(code)
    assert r["missing"] == []
    assert all(r["same"].values()), r["same"]                  # dfmpc.Graph is dfmpc.engine.Graph, ...
    assert r["star"] == [] and r["dir"] == []
    assert r["lazy_were_absent"] == []                         # they really were lazy


def test_unknown_attribute_is_an_attribute_error():
    import dfmpc
    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(dfmpc, "no_such_name")
