#!/usr/bin/env python3
"""DF-MPC beside the data-free baselines on the same weights: accuracy over the zoo, and quantization cost.

Accuracy (``--models``, default the whole zoo): every method of ``dfmpc.baselines.METHODS`` at
MP``low``/``high`` (the same layers low/high for every method), evaluated on the shipped test set
minus its last 500 images, which only the data-aware ``oracle`` sees. Results go to
``benchmarks/results/compare.json`` and the README table between the ``compare-table`` markers.

Cost (``--cost``): wall time of each method's quantization step (median of ``--repeats``) on the
zoo models and on the ResNet-50 topology shipped in the onnx wheel (``light_resnet50.onnx``) with
re-randomised weights (25.5 M weights), against one ``np.abs(W).sum()`` over all weights timed in
the same run: the cost of reading the weights once. Results go to ``benchmarks/results/cost.json``
and the README table between the ``cost-table`` markers.

Usage::

    python benchmarks/compare.py                        # accuracy, all zoo models, MP2/6; updates README
    python benchmarks/compare.py --models resnet20 --settings 2/6,3/6 --no-readme
    python benchmarks/compare.py --cost                 # quantization time, zoo + ResNet-50 (random weights)
    python benchmarks/compare.py --table-only           # README tables from the stored JSON
    python benchmarks/compare.py --models mobilenetv2_small --settings 2/6,4/6 --backend onnxruntime
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # benchmarks/_common.py, also when loaded from its file
from _common import replace_block, write_text  # noqa: E402

import numpy as np

import dfmpc
from dfmpc.baselines import DEFAULT_METHODS, METHODS
from dfmpc.compare import compare
from dfmpc.compensation import compensation_coefficients
from dfmpc.evaluation import BACKENDS, load_dataset, load_zoo_model, zoo_manifest
from dfmpc.pairing import find_pairs
from dfmpc.pipeline import quantize_weights
from dfmpc.recalibration import bn_of

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
N_CAL = 500

#: Numbers the methods' own papers report, each in its own setting (never measured here).
#: DF-MPC's come from its paper (Chen et al. 2023, the CIFAR-10 ResNet-56 MP2/6 row, as quoted in the README's
#: "The paper's figures" table); the other papers report
#: ImageNet figures at other bit settings, and no stored copy of their tables could be checked offline,
#: so none is quoted from memory.
UNCHECKED = "not quoted (no checkable copy offline)"
PAPER = {
    "dfmpc": "91.05 (ResNet-56, CIFAR-10, MP2/6; FP32 93.88)",
    "none": "38.03 (ResNet-56, CIFAR-10, MP2/6 without compensation)",
    "dfq": UNCHECKED, "squant": UNCHECKED, "ocs": UNCHECKED,
}


def _replace_between(text: str, marker: str, body: str) -> str:
    return replace_block(text, f"<!-- {marker}:start -->", f"<!-- {marker}:end -->", body)


# ------------------------------------------------------------------------------------ accuracy
def run_accuracy(models, settings, methods, log, backend="engine"):
    x, y = load_dataset("fashion-mnist")
    xe, ye, cal = x[:-N_CAL], y[:-N_CAL], x[-N_CAL:]
    out = []
    for arch in models:
        g = load_zoo_model(arch)
        for s in settings:
            lo, hi = map(int, s.split("/"))
            log(f"{arch} MP{s}")
            rows = compare(g, xe, ye, methods, lo, hi, calibration_data=cal, log=log, backend=backend)
            out.append({"model": arch, "setting": s, "n_eval": int(len(xe)), "n_calibration": N_CAL, "backend": backend,
                        "rows": [{k: r[k] for k in ("method", "accuracy", "seconds", "error", "data_free")}
                                 for r in rows]})
    return out


def merge_results(old, new):
    """``old`` with each (model, setting)'s rows replaced by the methods ``new`` measured (others kept),
    rows in the registry's order; a run of a few methods never drops the others' figures."""
    order = ["fp32"] + list(METHODS)
    merged = {(r["model"], r["setting"]): r for r in old}
    for r in new:
        key = (r["model"], r["setting"])
        rows = {row["method"]: row for row in merged.get(key, {}).get("rows", [])}
        rows.update({row["method"]: row for row in r["rows"]})
        merged[key] = {**r, "rows": sorted(rows.values(), key=lambda row: order.index(row["method"])
                                           if row["method"] in order else len(order))}
    return list(merged.values())


def accuracy_table(results, setting="2/6"):
    res = [r for r in results if r["setting"] == setting]
    models = [r["model"] for r in res]
    cell = {(r["model"], row["method"]): row for r in res for row in r["rows"]}
    methods = [row["method"] for row in res[0]["rows"]] if res else []
    paper = setting == "2/6"                       # the papers' figures quoted here are all MP2/6
    head = ("| method | " + " | ".join(models) + " | quantize time, ResNet-20 |"
            + (" paper-reported (its own setting) |" if paper else "") + "\n"
            "|---|" + "---|" * (len(models) + 1 + paper))
    lines = [head]
    for m in methods:
        vals = []
        for arch in models:
            row = cell.get((arch, m))
            vals.append("-" if row is None else ("refused" if row["error"] else f"{100 * row['accuracy']:.2f}"))
        t = cell.get(("resnet20", m))
        tt = "-" if t is None or t["error"] or m == "fp32" else f"{1000 * t['seconds']:.0f} ms"
        name = m if METHODS.get(m) is None or METHODS[m].data_free else f"{m} (uses data)"
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {tt} |" + (f" {PAPER.get(m, '-')} |" if paper else ""))
    return "\n".join(lines)


def all_tables(results):
    """One table per bit setting, in the order measured."""
    settings = list(dict.fromkeys(r["setting"] for r in results))
    return "\n\n".join(f"**MP{s}**\n\n" + accuracy_table(results, s) for s in settings)


# ---------------------------------------------------------------------------------------- cost
def light_resnet50(seed=0):
    """The onnx wheel's light ResNet-50 topology with seeded random weights (He-normal convs, random BN)."""
    import onnx
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    g = dfmpc.load_model(path)
    rng = np.random.default_rng(seed)
    updates = {}
    for n in g.nodes:
        p = {}
        if n.op == "Conv":
            W = n.params["W"]
            p["W"] = rng.standard_normal(W.shape) * np.sqrt(2.0 / np.prod(W.shape[1:]))
        elif n.op == "Gemm":
            W = n.params["W"]
            p["W"] = rng.standard_normal(W.shape) / np.sqrt(W.shape[1])
        elif n.op == "BatchNormalization":
            C = n.params["gamma"].shape[0]
            p = {"gamma": rng.uniform(0.5, 1.5, C), "beta": rng.normal(0, 0.1, C),
                 "mean": rng.normal(0, 0.1, C), "var": rng.uniform(0.5, 1.5, C)}
        if "B" in n.params:
            p["B"] = rng.normal(0, 0.01, n.params["B"].shape)
        if p:
            updates[n.name] = p
    return g.with_params(updates)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _c_only(g):
    """DF-MPC's c alone, Eq. (27) for every pair, given the quantized weights (no graph copy, no re-calibration)."""
    pairing = find_pairs(g)
    inputs = []
    for p in pairing.pairs:
        W = g.node(p.low).params["W"]
        bn = bn_of(g.node(p.bn))
        inputs.append((W, quantize_weights(W, 2), bn))
    return lambda: [compensation_coefficients(W, W_q, bn, bn) for W, W_q, bn in inputs]


def run_cost(models, methods, repeats, log):
    out = []
    graphs = [(m, load_zoo_model(m)) for m in models] + [("resnet50 (random)", light_resnet50())]
    for name, g in graphs:
        Ws = [n.params["W"] for n in g.nodes if n.op in ("Conv", "Gemm")]
        n_weights = int(sum(W.size for W in Ws))
        read = _median_time(lambda: sum(float(np.abs(W).sum()) for W in Ws), max(repeats, 5))
        copy = _median_time(g.copy, repeats)
        row = {"model": name, "weights": n_weights, "abs_sum_seconds": read, "graph_copy_seconds": copy,
               "c_only_seconds": _median_time(_c_only(g), repeats), "methods": {}}
        log(f"{name}: {n_weights / 1e6:.2f} M weights; np.abs(W).sum() over all {1000 * read:.2f} ms, "
            f"graph copy {1000 * copy:.2f} ms, c alone {1000 * row['c_only_seconds']:.2f} ms")
        for m in methods:
            meth = METHODS[m]
            if not meth.data_free:
                continue
            meth.run(g, 2, 6)                                   # warm-up (Numba compilation, caches)
            t = _median_time(lambda: meth.run(g, 2, 6), repeats)
            row["methods"][m] = t
            log(f"  {m:<14} {1000 * t:9.1f} ms   {t / read:8.1f} x abs-sum")
        out.append(row)
    return out


def cost_table(rows):
    """Markdown table: one line per method, one column per model; each cell is time (ratio to one read)."""
    def cell(t, read):
        ms, ratio = 1000 * t, t / read
        return f"{ms:.{1 if ms < 10 else 0}f} ms ({ratio:.{1 if ratio < 10 else 0}f}x)"
    lines = ["| step | " + " | ".join(f"{r['model']} ({r['weights'] / 1e6:.2f} M weights)" for r in rows) + " |",
             "|---|" + "---|" * len(rows),
             "| `np.abs(W).sum()` over all weights (one read) | "
             + " | ".join(f"{1000 * r['abs_sum_seconds']:.2f} ms (1x)" for r in rows) + " |",
             "| graph copy | " + " | ".join(cell(r["graph_copy_seconds"], r["abs_sum_seconds"]) for r in rows) + " |",
             "| DF-MPC's c alone, Eq. (27) for every pair | "
             + " | ".join(cell(r["c_only_seconds"], r["abs_sum_seconds"]) if r["c_only_seconds"] > 1e-6 else "no pair"
                          for r in rows) + " |"]
    for m in (rows[0]["methods"] if rows else []):
        lines.append(f"| `{m}` (whole quantization step) | "
                     + " | ".join(cell(r["methods"][m], r["abs_sum_seconds"]) for r in rows) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(zoo_manifest()), help="zoo models (default: all)")
    ap.add_argument("--settings", default="2/6", help="comma-separated low/high settings (default 2/6)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--cost", action="store_true", help="time the quantization step instead of accuracy")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per method for --cost (median)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the README tables from the stored JSON")
    ap.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    ap.add_argument("--backend", default="engine", choices=BACKENDS,
                    help="evaluation backend of the accuracy runs (default %(default)s; onnxruntime gives the same "
                         "predictions on the shipped set at about twice the pace)")
    a = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    models = [m for m in a.models.split(",") if m]
    methods = [m for m in a.methods.split(",") if m]
    RESULTS.mkdir(parents=True, exist_ok=True)
    acc_path, cost_path = RESULTS / "compare.json", RESULTS / "cost.json"
    if not a.table_only:
        if a.cost:
            rows = run_cost(models, methods, a.repeats, log)
            write_text(cost_path, json.dumps({"rows": rows}, indent=1) + "\n")
        else:
            res = run_accuracy(models, [s for s in a.settings.split(",") if s], methods, log, a.backend)
            old = json.loads(acc_path.read_text())["results"] if acc_path.exists() else []
            write_text(acc_path, json.dumps({"results": merge_results(old, res)}, indent=1) + "\n")
    if not a.no_readme:
        text = README.read_text()
        if acc_path.exists():
            text = _replace_between(text, "compare-table", all_tables(json.loads(acc_path.read_text())["results"]))
        if cost_path.exists():
            text = _replace_between(text, "cost-table", cost_table(json.loads(cost_path.read_text())["rows"]))
        write_text(README, text)
    if acc_path.exists():
        print(all_tables(json.loads(acc_path.read_text())["results"]))
    if cost_path.exists():
        print(cost_table(json.loads(cost_path.read_text())["rows"]))


if __name__ == "__main__":
    main()
