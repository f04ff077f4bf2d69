#!/usr/bin/env python3
"""Whole-network accuracy of every zoo model under DF-MPC and its baselines; writes the README tables.

For each model and each bit setting (2/6, 3/6, 6/6; 2 = TWN ternary) it evaluates
FP32, MP without compensation (c = 1) and DF-MPC (closed-form c) under each re-calibration
mode (absorb, analytic, sequential on distilled probes (the default), sequential on white-noise
probes: data-free; data: 500 real images), and the oracle c (data-aware least squares of
Eq. (9), an upper reference for any per-channel c). The probes are made once per model with the
library's defaults (seed 0) and shared by every bit setting; their time is recorded.

Evaluation protocol: the shipped Fashion-MNIST test set is split once; the last 500 images
are the calibration set of the data-aware rows (data re-calibration, oracle c) and every row,
FP32 included, is evaluated on the other 9,500 images, so no row is scored on images it saw.

Usage::

    python benchmarks/accuracy.py                       # all zoo models, all settings; updates README.md
    python benchmarks/accuracy.py --models resnet20 --settings 2/6 --no-readme
    python benchmarks/accuracy.py --modes sequential --settings 3/6,6/6 --backend onnxruntime   # faster evaluation
    python benchmarks/accuracy.py --sweep resnet56      # lambda1 x lambda2 sweep (paper Fig. 3)
    python benchmarks/accuracy.py --table-only          # README tables from benchmarks/results/accuracy.json
    python benchmarks/accuracy.py --paper-table         # README table in the paper's layout (PAPER_ROWS, STAND_INS)
    python benchmarks/accuracy.py --paper-table --measure-missing   # measures a stand-in's missing settings first

Results are also written to ``benchmarks/results/accuracy.json`` (and ``sweep_<model>.json``), merged
after each model, so a run stopped part-way keeps the models it finished. ``--backend onnxruntime``
(extra ``ort``) evaluates in onnxruntime, which gives the engine's predictions (``tests/test_backends.py``);
each figure measured that way records ``"backend": "onnxruntime"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # benchmarks/_common.py, also when loaded from its file
from _common import update_readme, write_text  # noqa: E402

import numpy as np

import dfmpc
from dfmpc.evaluation import BACKENDS, accuracy, load_dataset, load_zoo_model, zoo_manifest
from dfmpc.pipeline import DEFAULT_PROBE_IMAGES
from dfmpc.probes import probe_inputs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
N_CAL = 500

def split():
    x, y = load_dataset("fashion-mnist")
    return (x[:-N_CAL], y[:-N_CAL]), x[-N_CAL:]


#: the re-calibration columns of the table, in order; ``--modes`` measures a subset
MODES = ("absorb", "analytic", "sequential", "sequential-noise", "data")


def run_model(arch, settings, lambda1, lambda2, log, modes=MODES, backend="engine"):
    g = load_zoo_model(arch)
    (xe, ye), cal = split()
    acc = lambda q: accuracy(q, xe, ye, progress=False, backend=backend)
    tag = {} if backend == "engine" else {"backend": backend}
    row = {"model": arch, "n_eval": int(len(xe)), "n_calibration": N_CAL, "lambda1": lambda1, "lambda2": lambda2,
           "fp32": acc(g), "settings": {}}
    log(f"{arch}: FP32 {100 * row['fp32']:.2f}%")
    probes, row["probe_seconds"] = {}, {}
    kinds = [k for k, m in (("distilled", "sequential"), ("noise", "sequential-noise")) if m in modes]
    for kind in kinds:
        t0 = time.perf_counter()
        probes[kind] = probe_inputs(g, n=DEFAULT_PROBE_IMAGES[kind], kind=kind, seed=0, progress=False)
        row["probe_seconds"][kind] = time.perf_counter() - t0
        log(f"  {kind} probes: {len(probes[kind])} images, {row['probe_seconds'][kind]:.1f} s")
    extras = {"absorb": {}, "analytic": {}, "sequential": {"probes": probes.get("distilled")},
              "sequential-noise": {"recalibration": "sequential", "probes": probes.get("noise")}, "data": {}}
    modes = {m: extras[m] for m in MODES if m in modes}
    for s in settings:
        lo, hi = map(int, s.split("/"))
        res = {}
        for rec, extra in modes.items():
            for comp in ("none", "dfmpc") + (("oracle",) if rec == "absorb" else ()):
                t0 = time.perf_counter()
                kw = {"recalibration": rec, **extra}
                try:
                    q, rep = dfmpc.quantize_network(g, lo, hi, lambda1=lambda1, lambda2=lambda2, compensation=comp,
                                                    calibration_data=cal, **kw)
                except ValueError as e:      # the oracle models ReLU pairs only (refuses ReLU6 pairs): '-'
                    if comp != "oracle":
                        raise
                    log(f"  MP{s} {comp:>6}/{rec:<8} refused: {e}")
                    continue
                a = acc(q)
                res[f"{comp}/{rec}"] = {"accuracy": a, "quantize_seconds": rep.seconds,
                                        "c_mean": float(np.mean([p.c_mean for p in rep.pairs])) if rep.pairs else None,
                                        **tag}
                log(f"  MP{s} {comp:>6}/{rec:<8} {100 * a:6.2f}%  ({rep.seconds:.2f} s)")
        row["settings"][s] = res
        row["pairs"] = len(rep.pairs)
    return row


def table(rows, settings):
    """Markdown table: one line per model and bit setting."""
    head = ("| model | MP | FP32 | no comp. (absorb) | DF-MPC (absorb) | no comp. (analytic) | DF-MPC (analytic) "
            "| no comp. (sequential, noise) | DF-MPC (sequential, noise) "
            "| **no comp. (sequential)** | **DF-MPC (sequential, default)** "
            "| no comp. (data) | DF-MPC (data) | oracle c (absorb) |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        for s in settings:
            if s not in r["settings"]:
                continue
            v = r["settings"][s]
            cell = lambda k: f"{100 * v[k]['accuracy']:.2f}" if k in v else "-"
            lines.append(f"| {r['model']} | {s} | {100 * r['fp32']:.2f} | {cell('none/absorb')} | {cell('dfmpc/absorb')} "
                         f"| {cell('none/analytic')} | {cell('dfmpc/analytic')} "
                         f"| {cell('none/sequential-noise')} | {cell('dfmpc/sequential-noise')} "
                         f"| {cell('none/sequential')} | {cell('dfmpc/sequential')} | {cell('none/data')} "
                         f"| {cell('dfmpc/data')} | {cell('oracle/absorb')} |")
    return "\n".join(lines)


#: Every row of the paper's accuracy tables (Chen et al., "Data-Free Quantization via Mixed-Precision
#: Compensation without Fine-Tuning", Pattern Recognition 2023, arXiv 2307.00498), in the paper's order:
#: (model, data, MP low/high, FP32, MP without compensation, DF-MPC), top-1 %, copied from the paper.
#: None: no copy of that figure could be checked offline (never filled from memory).
PAPER_ROWS = (
    ("ResNet-18", "CIFAR-10", "2/6", 92.61, 10.78, 89.12),
    ("ResNet-56", "CIFAR-10", "2/6", 93.88, 38.03, 91.05),
    ("VGG-16", "CIFAR-10", "2/6", 93.70, 10.00, 90.48),
    ("ResNet-18", "CIFAR-100", "2/6", None, None, None),
    ("ResNet-56", "CIFAR-100", "2/6", None, None, None),
    ("VGG-16", "CIFAR-100", "2/6", None, None, None),
    ("ResNet-18", "ImageNet", "2/6", 71.47, None, 66.46),
    ("ResNet-50", "ImageNet", "2/6", 76.12, None, 71.20),
    ("ResNet-101", "ImageNet", "2/6", None, None, None),
    ("DenseNet-121", "ImageNet", "3/6", None, None, None),
    ("MobileNetV2", "ImageNet", "6/6", None, None, None),
)

#: The zoo model standing for each paper model, first choice first: the first one shipped in the zoo
#: (``dfmpc zoo``) is used. Data sets with no entry here have no analogue (not available offline).
#: Add a new zoo model by putting it in front of the one it replaces.
STAND_INS = {
    "CIFAR-10": {
        "ResNet-18": [("resnet18", "basic blocks [2, 2, 2, 2] at 1/4 width")],
        "ResNet-56": [("resnet56", "")],
        "VGG-16": [("vgg16", "13 convs"),
                   ("vgg_small", "the small VGG, 6 convs, not 13; `vgg16` is not in the zoo yet")],
    },
    "ImageNet": {
        "ResNet-18": [("resnet18", "as the CIFAR-10 row")],
        "ResNet-50": [("resnet_bottleneck", "bottleneck blocks, one per stage, far smaller")],
        "ResNet-101": [("resnet_bottleneck", "bottleneck blocks, one per stage, far smaller")],
        "DenseNet-121": [("densenet", "DenseNet-BC, concatenation")],
        "MobileNetV2": [("mobilenetv2", "inverted residuals, ReLU6"),
                        ("mobilenetv2_small",
                         "10 inverted-residual blocks, not 17; `mobilenetv2` is not in the zoo yet")],
    },
}

#: The accuracy.json keys of our columns: c = 1 with the scale absorbed in BN (the paper's "without
#: compensation"), DF-MPC with the default re-calibration (sequential, distilled probes), and the
#: data-aware references re-calibrated on 500 real images.
PAPER_TABLE_KEYS = ("none/absorb", "dfmpc/sequential", "none/data", "dfmpc/data")
PAPER_TABLE_HEAD = (
    "| paper's model | data | MP | paper: FP32 | paper: no comp. | paper: DF-MPC "
    "| ours: zoo model standing in | ours: FP32 | ours: no comp. | **ours: DF-MPC (default)** "
    "| ours: c = 1, data re-cal. | ours: DF-MPC, data re-cal. |")
NOT_OFFLINE = "not available offline"


def stand_in(model, data, zoo):
    """(arch, note) of the zoo model standing for the paper's ``model`` on ``data``; arch None: no analogue.

    The first candidate of :data:`STAND_INS` that ``zoo`` ({arch: entry}) ships; if none is shipped, the
    first candidate with note "not in the zoo yet".
    """
    cands = STAND_INS.get(data, {}).get(model)
    if not cands:
        return None, "no analogue here (data not available offline)"
    for arch, note in cands:
        if arch in zoo:
            return arch, note
    return cands[0][0], "not in the zoo yet (not trained)"


def paper_table(rows, zoo):
    """Markdown table in the paper's layout: one line per :data:`PAPER_ROWS` entry, ours beside it.

    ``rows`` are accuracy.json's rows, ``zoo`` is {arch: models.json entry}. Ours is Fashion-MNIST
    (test[:-500]); a stand-in for an ImageNet row says the data differs; a model that is shipped but
    not measured at the paper's setting says so (``--paper-table --measure-missing`` measures it).
    """
    by_arch = {r["model"]: r for r in rows}
    pct = lambda v: NOT_OFFLINE if v is None else f"{v:.2f}"
    lines = [PAPER_TABLE_HEAD, "|" + "---|" * 12]
    for model, data, s, fp32, none, dfmpc_ in PAPER_ROWS:
        arch, note = stand_in(model, data, zoo)
        ours = ["-"] * 5
        if arch is None:
            who = note
        else:
            r = by_arch.get(arch)
            if arch == "resnet56" and r and "resnet20" in by_arch and r["fp32"] < by_arch["resnet20"]["fp32"] - 0.01:
                epochs = zoo.get(arch, {}).get("training", {}).get("epochs")
                note = f"under-trained, {epochs} epochs: FP32 more than 1 point below ResNet-20's"
            if arch in zoo and (r is None or s not in r["settings"]):
                note = (note + "; " if note else "") + f"not measured at MP{s} yet"
            if data != "CIFAR-10":
                note = (note + "; " if note else "") + f"data differs, {data} not available offline"
            who = f"`{arch}`" + (f": {note}" if note else "")
            if r is not None and s in r["settings"]:
                v = r["settings"][s]
                ours = [f"{100 * r['fp32']:.2f}"] + [f"{100 * v[k]['accuracy']:.2f}" if k in v else "-"
                                                     for k in PAPER_TABLE_KEYS]
        ours[2] = f"**{ours[2]}**" if ours[2] != "-" else "-"
        lines.append(f"| {model} | {data} | MP{s} | {pct(fp32)} | {pct(none)} | {pct(dfmpc_)} | {who} | "
                     + " | ".join(ours) + " |")
    return "\n".join(lines)


def missing_for_paper_table(rows, zoo):
    """{arch: [settings]} the paper table needs and accuracy.json lacks (shipped stand-ins only)."""
    by_arch, need = {r["model"]: r for r in rows}, {}
    for model, data, s, *_ in PAPER_ROWS:
        arch, _ = stand_in(model, data, zoo)
        if arch in zoo and s not in by_arch.get(arch, {}).get("settings", {}) and s not in need.get(arch, []):
            need.setdefault(arch, []).append(s)
    return need


def merge_results(rows):
    """Merge new rows into benchmarks/results/accuracy.json (a new run replaces the settings it measured)."""
    path = RESULTS / "accuracy.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    merged = {r["model"]: r for r in old.get("rows", [])}
    for r in rows:                       # a new run replaces the figures it measured and keeps the others
        old_row = merged.get(r["model"], {})
        kept = old_row.get("settings", {})
        settings = {**kept, **{s: {**kept.get(s, {}), **v} for s, v in r["settings"].items()}}
        seconds = {**old_row.get("probe_seconds", {}), **r.get("probe_seconds", {})}
        merged[r["model"]] = {**old_row, **r, "settings": settings, "probe_seconds": seconds}
    out = {"protocol": f"evaluate on Fashion-MNIST test[:-{N_CAL}], calibrate data-aware rows on test[-{N_CAL}:]",
           "rows": [merged[m] for m in sorted(merged, key=lambda m: list(zoo_manifest()).index(m)
                                              if m in zoo_manifest() else 99)]}
    write_text(path, json.dumps(out, indent=1))
    return out


PAPER_MARKERS = ("<!-- paper-table:start -->", "<!-- paper-table:end -->")
ACCURACY_MARKERS = ("<!-- accuracy-table:start -->", "<!-- accuracy-table:end -->")


def sweep(arch, log, lambda1s=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), lambda2s=(0.0, 0.001, 0.005, 0.01),
          recalibration="analytic", setting="2/6", eval_images=None):
    """Accuracy over a lambda1 x lambda2 grid (paper Fig. 3), data-free recalibration."""
    g = load_zoo_model(arch)
    (xe, ye), _ = split()
    if eval_images:
        xe, ye = xe[:eval_images], ye[:eval_images]
    lo, hi = map(int, setting.split("/"))
    grid = []
    for l1 in lambda1s:
        row = []
        for l2 in lambda2s:
            q, _ = dfmpc.quantize_network(g, lo, hi, lambda1=l1, lambda2=l2, recalibration=recalibration)
            row.append(accuracy(q, xe, ye, progress=False))
            log(f"  lambda1={l1} lambda2={l2}: {100 * row[-1]:.2f}%")
        grid.append(row)
    return {"model": arch, "setting": setting, "recalibration": recalibration, "lambda1": list(lambda1s),
            "lambda2": list(lambda2s), "accuracy": grid, "n_eval": int(len(xe))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated zoo models (default: all shipped)")
    p.add_argument("--settings", default="2/6,3/6,6/6")
    p.add_argument("--lambda1", type=float, default=0.5)
    p.add_argument("--lambda2", type=float, default=0.0)
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated re-calibration columns to measure (default: all); the others keep "
                        "their saved figures")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument("--backend", default="engine", choices=BACKENDS,
                   help="evaluation backend (default %(default)s; onnxruntime gives the same predictions faster)")
    p.add_argument("--sweep", default=None, metavar="MODEL", help="run the lambda1 x lambda2 sweep on MODEL instead")
    p.add_argument("--eval-images", type=int, default=None, help="sweep: evaluate on the first N held-out images only")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--table-only", action="store_true",
                   help="only rewrite the README tables from benchmarks/results/accuracy.json")
    p.add_argument("--paper-table", action="store_true",
                   help="only rewrite the README table in the paper's layout from benchmarks/results/accuracy.json")
    p.add_argument("--measure-missing", action="store_true",
                   help="with --paper-table: first measure the stand-ins' settings that accuracy.json lacks")
    a = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.table_only:
        rows = json.loads((RESULTS / "accuracy.json").read_text())["rows"]
        md = table(rows, ["2/6", "3/6", "6/6"])
        update_readme(md, *ACCURACY_MARKERS)
        update_readme(paper_table(rows, zoo_manifest()), *PAPER_MARKERS)
        print(md)
        return 0
    if a.paper_table:
        rows = json.loads((RESULTS / "accuracy.json").read_text())["rows"]
        need = missing_for_paper_table(rows, zoo_manifest())
        if need and a.measure_missing:
            rows = merge_results([run_model(m, ss, a.lambda1, a.lambda2, log) for m, ss in need.items()])["rows"]
        elif need:
            log(f"not measured yet (add --measure-missing): {need}")
        md = paper_table(rows, zoo_manifest())
        if not a.no_readme:
            update_readme(md, *PAPER_MARKERS)
        print(md)
        return 0
    if a.sweep:
        res = sweep(a.sweep, log, eval_images=a.eval_images)
        write_text(RESULTS / f"sweep_{a.sweep}.json", json.dumps(res, indent=1))
        if a.json:
            print(json.dumps(res))
        return 0
    models = a.models.split(",") if a.models else list(zoo_manifest())
    settings = a.settings.split(",")
    modes = a.modes.split(",")
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {a.modes!r}")
    for m in models:                        # merged one model at a time: a stopped run keeps what it finished
        out = merge_results([run_model(m, settings, a.lambda1, a.lambda2, log, modes, a.backend)])
    md = table(out["rows"], ["2/6", "3/6", "6/6"])
    if not a.no_readme:
        update_readme(md, *ACCURACY_MARKERS)
        update_readme(paper_table(out["rows"], zoo_manifest()), *PAPER_MARKERS)
    print(json.dumps(out) if a.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
