"""Import time of ``import dfmpc`` (the math only) against the whole package and the NumPy/SciPy floor.

Each statement runs in a fresh ``python3 -c`` subprocess; the statements are timed round-robin
(so that load from other processes hits all alike), ``--repeats`` times each, and the median is
reported, as wall seconds and as CPU seconds of the child (less sensitive to a shared machine):

``python``     ``pass``: the interpreter's own start-up (the baseline every figure includes)
``floor``      ``import numpy, scipy``: what the math modules load at import (SciPy's submodules,
               scipy.linalg and scipy.optimize, load on first use)
``dfmpc``      ``import dfmpc``: quantizers, compensation, reconstruction, re-calibration math
``full``       ``import dfmpc`` then ``dfmpc.Graph``, ``dfmpc.load_model``, ``dfmpc.quantize_network``:
               the engine (Numba), the loaders (ONNX) and the driver, i.e. what ``import dfmpc`` loaded
               before issue 14 made it light
``before``     with ``--before REV``: ``import dfmpc`` of the package as it was at git revision REV
               (``git archive`` into a temporary directory, put first on PYTHONPATH)

Usage::

    python3 benchmarks/import_time.py                 # table
    python3 benchmarks/import_time.py --json --repeats 15
    python3 benchmarks/import_time.py --before d7a96b9   # also the last revision with the heavy import
    python3 benchmarks/import_time.py --write         # also benchmarks/results/import_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import cpu_info, package_at  # noqa: E402  (CPU record, as every benchmark keeps; git archive)

STATEMENTS = {
    "python": "pass",
    "floor": "import numpy, scipy",
    "dfmpc": "import dfmpc",
    "full": "import dfmpc; dfmpc.Graph; dfmpc.load_model; dfmpc.quantize_network",
}
CHECK = "import dfmpc, sys; print(sorted(m for m in ('numba', 'onnx', 'onnxruntime', 'torch') if m in sys.modules))"


def _run(code: str, path: str | None = None) -> tuple[float, float]:
    """Wall and child-CPU seconds of ``python3 -c code`` (``path`` first on PYTHONPATH)."""
    env = dict(os.environ, PYTHONPATH=path) if path else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(repeats: int, before: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: (code, None) for name, code in STATEMENTS.items()}
        if before:
            runs["before"] = ("import dfmpc", package_at(before, tmp))
        for code, path in runs.values():        # warm-up: file-system cache, __pycache__, Numba's cache
            _run(code, path)
        times = {k: ([], []) for k in runs}
        for _ in range(repeats):
            for name, (code, path) in runs.items():
                wall, cpu = _run(code, path)
                times[name][0].append(wall)
                times[name][1].append(cpu)
    med = lambda v: sorted(v)[len(v) // 2]
    out = {name: {"wall_s": med(w), "cpu_s": med(c)} for name, (w, c) in times.items()}
    heavy = subprocess.run([sys.executable, "-c", CHECK], check=True, cwd=ROOT, capture_output=True, text=True)
    return {"statements": STATEMENTS, "before_revision": before, "median_of": repeats, "seconds": out,
            "dfmpc_over_full_wall": out["dfmpc"]["wall_s"] / out["full"]["wall_s"],
            "dfmpc_over_before_wall": out["dfmpc"]["wall_s"] / out["before"]["wall_s"] if before else None,
            "dfmpc_over_before_cpu": out["dfmpc"]["cpu_s"] / out["before"]["cpu_s"] if before else None,
            "dfmpc_minus_floor_wall_s": out["dfmpc"]["wall_s"] - out["floor"]["wall_s"],
            "full_minus_floor_wall_s": out["full"]["wall_s"] - out["floor"]["wall_s"],
            "heavy_modules_after_import_dfmpc": heavy.stdout.strip(),
            "python": sys.version.split()[0], **cpu_info(), "load_average_1min_at_end": os.getloadavg()[0]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--write", action="store_true", help="also write benchmarks/results/import_time.json")
    p.add_argument("--before", metavar="REV", help="also time `import dfmpc` of the package at this git revision")
    a = p.parse_args(argv)
    try:
        r = measure(a.repeats, a.before)
    except ValueError as e:                      # an unknown --before revision
        raise SystemExit(str(e)) from None
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        for name, s in r["seconds"].items():
            what = STATEMENTS.get(name, f"import dfmpc at revision {a.before}")
            print(f"{name:7s} {s['wall_s']:6.2f} s wall  {s['cpu_s']:6.2f} s CPU   {what}")
        print(f"import dfmpc / whole package: {r['dfmpc_over_full_wall']:.2f} (wall); "
              f"heavy modules after import dfmpc: {r['heavy_modules_after_import_dfmpc']}; "
              f"{r['cpu_model']} {' '.join(r['simd_flags'])}; load {r['load_average_1min_at_end']:.1f}")
    if a.write:
        path = ROOT / "benchmarks" / "results" / "import_time.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(r, indent=2) + "\n")
        tmp.replace(path)
    return r


if __name__ == "__main__":
    main()
