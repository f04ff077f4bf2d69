"""Wall time of ``dfmpc demo`` now against the same demo at an earlier git revision, in alternating rounds.

Issue 13 asks for a demo at least 3x faster than when the issue was filed (revision ``6c6af3b``), on the
same machine, after the one-off Numba compile. This script measures that ratio:

1. ``reference/dfmpc`` of ``--before`` is extracted with ``git archive`` into a temporary directory;
   this checkout's ``reference/`` is the other package. Each runs with its own directory first on
   ``PYTHONPATH``, so the installed copy does not matter, and compiles into its own ``__pycache__``.
2. One warm-up run of each (compilation, file-system cache), not counted.
3. ``--rounds`` rounds of ``python3 -m dfmpc demo --json``, the old package then the new one, so that a
   change of the machine's load between rounds hits both alike. Wall seconds and the child's CPU
   seconds are recorded per run, and the ratio old / new per round.

Reported: every run, the medians, the median of the per-round ratios, and each package's accuracies.
The accuracies must be the same in every run of one package: the script checks that, since a faster
demo that computes something else would not count. The record also holds the CPU model and its SIMD
flags, as every benchmark here does. The host's load moves single runs by 15% or more, so read the
ratios, not the seconds.

Usage::

    python3 benchmarks/demo_speed.py                              # 3 rounds against 6c6af3b (about 4 min)
    python3 benchmarks/demo_speed.py --rounds 5 --json --out benchmarks/results/demo_speed.json
    python3 benchmarks/demo_speed.py --before fdb0f6b             # any other revision with `dfmpc demo --json`
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import cpu_info, package_at, write_text  # noqa: E402  (CPU record; git archive; atomic writes)

#: the demo as it was when issue 13 was filed
ISSUE_13_REVISION = "6c6af3b"

#: float keys of ``dfmpc demo --json`` that are timings or settings, not accuracies
NOT_ACCURACIES = ("probe_seconds", "dfmpc_seconds", "lambda1", "lambda2")


def run_demo(path: str) -> dict:
    """One ``python3 -m dfmpc demo --json`` with ``path`` first on PYTHONPATH: ``{"wall_s", "cpu_s",
    "result"}`` (the demo's JSON). OSError with the child's last output lines when it fails."""
    env = dict(os.environ, PYTHONPATH=path)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dfmpc", "demo", "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        raise OSError(f"dfmpc demo with {path} first on PYTHONPATH failed (exit {r.returncode}):\n{tail}")
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "result": json.loads(r.stdout)}


def accuracies(result: dict) -> dict:
    """The demo's accuracies: every float of its JSON but the timings and the settings."""
    return {k: v for k, v in result.items() if isinstance(v, float) and k not in NOT_ACCURACIES}


def summarise(old: list[dict], new: list[dict]) -> dict:
    """Medians, per-round ratios old / new and the accuracy check of two equally long lists of
    :func:`run_demo` records (round ``i`` is ``old[i]`` then ``new[i]``).

    >>> r = lambda w: {"wall_s": w, "cpu_s": 2 * w, "result": {"fp32": 0.9, "probe_seconds": w / 10}}
    >>> s = summarise([r(45.0), r(48.0), r(44.0)], [r(15.0), r(15.0), r(16.0)])
    >>> s["ratios"], s["median_ratio"], s["accuracies_identical"]
    ([3.0, 3.2, 2.75], 3.0, True)
    """
    if len(old) != len(new) or not old:
        raise ValueError(f"expected two equally long non-empty lists of runs, got {len(old)} and {len(new)}")
    ratios = [round(o["wall_s"] / n["wall_s"], 4) for o, n in zip(old, new)]
    same = lambda runs: all(accuracies(r["result"]) == accuracies(runs[0]["result"]) for r in runs)
    return {"ratios": ratios, "median_ratio": statistics.median(ratios),
            "median_wall_s": {"before": statistics.median(r["wall_s"] for r in old),
                              "now": statistics.median(r["wall_s"] for r in new)},
            "median_cpu_s": {"before": statistics.median(r["cpu_s"] for r in old),
                             "now": statistics.median(r["cpu_s"] for r in new)},
            "accuracies": {"before": accuracies(old[0]["result"]), "now": accuracies(new[0]["result"])},
            "accuracies_identical": same(old) and same(new)}


def measure(before: str, rounds: int, log=sys.stderr) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"before": package_at(before, tmp), "now": str(ROOT / "reference")}
        for name, path in paths.items():
            print(f"warm-up: {name}", file=log, flush=True)
            run_demo(path)
        runs = {"before": [], "now": []}
        for i in range(rounds):
            for name, path in paths.items():
                runs[name].append(run_demo(path))
            print(f"round {i + 1}/{rounds}: before {runs['before'][-1]['wall_s']:.1f} s, "
                  f"now {runs['now'][-1]['wall_s']:.1f} s", file=log, flush=True)
    out = {"before_revision": before, "rounds": rounds, **summarise(runs["before"], runs["now"]),
           "runs": {k: [{"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]} for r in v] for k, v in runs.items()},
           "command": "python3 -m dfmpc demo --json", "python": sys.version.split()[0], **cpu_info(),
           "load_average_1min_at_end": os.getloadavg()[0]}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", metavar="REV", default=ISSUE_13_REVISION,
                   help=f"the git revision to compare with (default {ISSUE_13_REVISION}, issue 13's filing)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds after the warm-up (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object only (progress stays on stderr)")
    p.add_argument("--out", metavar="PATH", help="also write the JSON record to PATH (atomically)")
    a = p.parse_args(argv)
    if a.rounds < 1:
        raise SystemExit(f"--rounds: expected a positive number of rounds, got {a.rounds}")
    try:
        r = measure(a.before, a.rounds)
    except (ValueError, OSError) as e:
        raise SystemExit(str(e)) from None
    if a.out:
        write_text(Path(a.out), json.dumps(r, indent=2) + "\n")
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        for i, (o, n, q) in enumerate(zip(r["runs"]["before"], r["runs"]["now"], r["ratios"])):
            print(f"round {i + 1}: {a.before} {o['wall_s']:6.1f} s ({o['cpu_s']:5.1f} CPU-s)   "
                  f"now {n['wall_s']:6.1f} s ({n['cpu_s']:5.1f} CPU-s)   {q:.2f}x")
        print(f"median ratio {r['median_ratio']:.2f}x; accuracies identical across runs of each package: "
              f"{r['accuracies_identical']}; {r['cpu_model']} {' '.join(r['simd_flags'])}; "
              f"load {r['load_average_1min_at_end']:.1f}")
    return r


if __name__ == "__main__":
    main()
