"""Probe distillation speed: ``dfmpc.probes.probe_inputs`` at the library defaults on the zoo models.

For each model: wall seconds and CPU seconds of one ``probe_inputs(graph, kind="distilled")`` call at
the defaults (``DEFAULT_N`` images, ``DEFAULT_ITERATIONS`` steps of ``DEFAULT_OPTIMIZER``: L-BFGS-B
evaluations of the loss and its gradient, or Adam steps), and the same per step. Each figure is the
median of ``--repeats`` runs after one short warm-up run (Numba compilation). The CPU model, its SIMD
flags, the thread count and the load average are recorded: on a machine shared with other jobs the
wall time is inflated and noisy, the CPU time less so.

Usage::

    python benchmarks/probes.py                     # writes benchmarks/results/probes.json
    python benchmarks/probes.py --models resnet20 --repeats 3 --json --no-write
    python benchmarks/probes.py --baseline /tmp/old/reference   # also an older dfmpc, same run

``--baseline DIR`` names a directory holding another ``dfmpc`` package (e.g. ``reference/`` of a
``git worktree`` at an older commit). Each model is then also timed with that package, in a
subprocess (``PYTHONPATH=DIR``), before the current one: ``ratio`` is the current wall time over the
baseline's, and ``same_probes`` says whether both made the same bits (``probes_sha256``).

The sequential BN re-calibration (the default of ``dfmpc quantize``) distils its probes once per
call, so this is the time distillation adds to ``dfmpc quantize <model>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # benchmarks/_common.py, also when loaded from its file
from _common import cpu_info, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("resnet20", "resnet56", "resnet_bottleneck", "vgg_small")


def time_model(name: str, repeats: int) -> dict:
    """Seconds (wall and CPU) of probe_inputs at the defaults on zoo model ``name``, median of ``repeats``."""
    import numpy as np
    from dfmpc import probes
    from dfmpc.evaluation import load_zoo_model

    graph = load_zoo_model(name)
    probes.probe_inputs(graph, n=2, iterations=2, progress=False)              # warm-up: Numba compilation
    wall, cpu, loss = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        x = probes.probe_inputs(graph, progress=False)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        loss = probes.bn_matching_loss(graph, x)
        digest = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
    steps = probes.DEFAULT_ITERATIONS
    med = lambda v: sorted(v)[len(v) // 2]
    return {"model": name, "n": probes.DEFAULT_N, "iterations": steps, "lr": probes.DEFAULT_LR,
            "optimizer": getattr(probes, "DEFAULT_OPTIMIZER", "adam"),
            "seconds": med(wall), "seconds_per_step": med(wall) / max(steps, 1),
            "cpu_seconds": med(cpu), "cpu_seconds_per_step": med(cpu) / max(steps, 1),
            "all_seconds": wall, "final_bn_matching_loss": loss, "probes_sha256": digest,
            "distill_threads": getattr(probes, "DISTILL_THREADS", None),
            "dfmpc_path": str(Path(probes.__file__).parents[1])}


def time_baseline(name: str, repeats: int, baseline: str) -> dict:
    """:func:`time_model` with the ``dfmpc`` package found in directory ``baseline``, in a subprocess."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([baseline] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, __file__, "--models", name, "--repeats", str(repeats), "--json",
                          "--no-write"], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rows"][0]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo model names")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per model (median reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/probes.json")
    p.add_argument("--baseline", help="directory holding another dfmpc package, timed first in the same run "
                                      "(e.g. reference/ of a git worktree at an older commit)")
    args = p.parse_args(argv)

    import numba
    import numpy as np

    load_start = os.getloadavg()[0]
    rows = []
    for name in args.models.split(","):
        base = time_baseline(name, args.repeats, args.baseline) if args.baseline else None
        rows.append(time_model(name, args.repeats))
        r = rows[-1]
        if base is not None:
            r.update(baseline_seconds=base["seconds"], baseline_cpu_seconds=base["cpu_seconds"],
                     ratio=r["seconds"] / base["seconds"], cpu_ratio=r["cpu_seconds"] / base["cpu_seconds"],
                     same_probes=base["probes_sha256"] == r["probes_sha256"])
        if not args.json:
            print(f"{name:18s} {r['seconds']:7.2f} s  ({r['seconds_per_step']:.4f} s/step; CPU "
                  f"{r['cpu_seconds']:.2f} s)  BN loss {r['final_bn_matching_loss']:.4g}"
                  + ("" if base is None else f"  baseline {base['seconds']:.2f} s (CPU {base['cpu_seconds']:.2f} s), "
                     f"ratio {r['ratio']:.3f}, same probes: {r['same_probes']}"), flush=True)
    result = {"rows": rows, **cpu_info(), "numba_threads": numba.get_num_threads(),
              "numba_threading_layer": str(numba.config.THREADING_LAYER), "numpy_version": np.__version__,
              "numba_version": numba.__version__, "python": platform.python_version(),
              "load_average_1min_at_start": load_start, "load_average_1min_at_end": os.getloadavg()[0],
              "repeats": args.repeats, "baseline": args.baseline,
              "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:]))}
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_text(RESULTS / "probes.json", json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['cpu_model']} ({result['cpu_count']} CPUs; SIMD {' '.join(result['simd_flags'])}); "
              f"load {load_start:.1f} -> {result['load_average_1min_at_end']:.1f}")
    return result


if __name__ == "__main__":
    main()
