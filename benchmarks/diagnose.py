#!/usr/bin/env python3
"""How well the data-free re-calibration predicts each BN's variance, on every zoo model (issue 15's gauge).

For each zoo model and bit setting it runs :func:`dfmpc.diagnose.diagnose` as ``dfmpc diagnose`` does
(the model's default re-calibration, c = 1) and records, over the re-calibrated BNs, the median and
maximum ``|log(predicted variance / measured variance)|``, measured on the first ``--images`` shipped
test images in the quantized network, beside the FP floor (the same figure for the full-precision
network's trained statistics on those images, which no re-calibration can be expected to beat). The
per-layer log ratios are kept in the JSON.

Usage::

    python benchmarks/diagnose.py                          # all zoo models at MP2/6; rewrites the README table
    python benchmarks/diagnose.py --models resnet20 --settings 2/6,3/6 --no-readme
    python benchmarks/diagnose.py --table-only             # README table from benchmarks/results/diagnose.json
    python benchmarks/diagnose.py --probe-views 1          # the distilled images alone, without their views
    python benchmarks/diagnose.py --seed 1                 # another draw of the probes' starting noise
    python benchmarks/diagnose.py --probe-view-kind shifts    # shifted views instead of mirrored ones
    python benchmarks/diagnose.py --out benchmarks/results/diagnose_znver4.json   # another machine's figures

Results go to ``benchmarks/results/diagnose.json`` (merged by model and setting with what is there), each
row with the CPU it was measured on: the probes' bits, and so these figures, follow the SIMD width the
kernels are compiled for (ResNet-18's maximum: 0.172 on an AVX2 ``znver1``, 0.147 on an AVX-512 ``znver4``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # benchmarks/_common.py, also when loaded from its file
from _common import update_readme, write_text  # noqa: E402

import dfmpc.probes
from dfmpc.diagnose import diagnose
from dfmpc.engine.kernel_choice import cpu_signature
from dfmpc.evaluation import load_dataset, load_zoo_model, zoo_manifest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKERS = ("<!-- diagnose-table:start -->", "<!-- diagnose-table:end -->")
#: the issue's targets for the variance prediction (median, max |log ratio| over layers)
TARGET_MEDIAN, TARGET_MAX = 0.05, 0.15


def results_path(probe_views: int | None, out: str | None = None, seed: int = 0, view_kind: str = dfmpc.probes.DEFAULT_VIEW_KIND) -> Path:
    """Where the rows go: ``out`` when given, else ``diagnose.json`` for the library's default views (None)
    and seed 0, ``diagnose_views<V>.json`` for V views asked for, ``diagnose_shifts.json`` (or
    ``diagnose_views<V>_shifts.json``) for shifted views, with ``_seed<S>`` before ``.json`` for another seed."""
    if out:
        return Path(out)
    stem = "diagnose" if probe_views is None else f"diagnose_views{probe_views}"
    stem += "" if view_kind == dfmpc.probes.DEFAULT_VIEW_KIND else f"_{view_kind}"
    return RESULTS / (stem + ("" if seed == 0 else f"_seed{seed}") + ".json")


def run(model: str, setting: str, images, recalibration: str, probe_views: int | None = None, seed: int = 0,
        view_kind: str = dfmpc.probes.DEFAULT_VIEW_KIND) -> dict:
    """One model and setting: the summary of :func:`diagnose` and the per-layer log ratios."""
    lo, hi = map(int, setting.split("/"))
    t0 = time.perf_counter()
    d = diagnose(load_zoo_model(model), images, lo, hi, recalibration=recalibration, compensation="none",
                 probe_views=probe_views, probe_view_kind=view_kind, seed=seed, progress=False)
    return {"model": model, "setting": setting, "recalibration": recalibration, "probes": d.report.probes,
            "seed": seed,
            "n_images": int(len(images)), "seconds": time.perf_counter() - t0, **d.summary,
            "layers_log_ratio": {r.conv: r.log_ratio for r in d.layers},
            "cpu": cpu_signature()}                 # model, LLVM's core name, SIMD features: the probes' bits follow them


def merge(new_rows: list[dict], path: Path) -> list[dict]:
    """New rows replace the saved ones (in ``path``) of the same model, setting and mode; the rest are kept."""
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    key = lambda r: (r["model"], r["setting"], r["recalibration"])
    fresh = {key(r) for r in new_rows}
    rows = [r for r in old if key(r) not in fresh] + new_rows
    order = {m: i for i, m in enumerate(zoo_manifest())}
    return sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["setting"], r["recalibration"]))


def table(rows: list[dict]) -> str:
    """Markdown: one line per model, setting and mode; a figure past the issue's target is marked."""
    mark = lambda v, t: f"{v:.3f}" + ("" if v <= t else " ✗")
    lines = ["| model | MP | re-calibration (probes) | BNs | median \\|log ratio\\| | max \\|log ratio\\| "
             "| FP floor (median / max) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setting']} | {r['recalibration']} ({r['probes'] or '-'}) | {r['layers']} "
                     f"| {mark(r['median_abs_log_ratio'], TARGET_MEDIAN)} | {mark(r['max_abs_log_ratio'], TARGET_MAX)} "
                     f"| {r['median_abs_log_ratio_trained']:.3f} / {r['max_abs_log_ratio_trained']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated zoo models (default: all shipped)")
    p.add_argument("--settings", default="2/6", help="comma-separated low/high bits (default %(default)s)")
    p.add_argument("--recalibration", default="sequential", choices=("sequential", "analytic", "absorb"))
    p.add_argument("--images", type=int, default=1000, help="first N shipped test images (default %(default)s)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument("--table-only", action="store_true", help="only rewrite the README table from the saved JSON")
    p.add_argument("--probe-views", type=int, default=None, metavar="V",
                   help="views per probe image (1-4; default: the library's, 4 for distilled probes); when given, the "
                        "rows go to benchmarks/results/diagnose_views<V>.json and the README is not touched")
    p.add_argument("--probe-view-kind", default=dfmpc.probes.DEFAULT_VIEW_KIND, choices=dfmpc.probes.VIEW_KINDS,
                   help="how the views are made (default %(default)s); shifts writes "
                        "benchmarks/results/diagnose_shifts.json and leaves the README alone")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the probes' starting noise (default 0); another seed writes "
                        "benchmarks/results/diagnose_seed<S>.json and leaves the README alone")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write (merge) the rows into this JSON file instead, e.g. for another machine; the README is "
                        "not touched")
    a = p.parse_args(argv)
    if a.images < 1:
        raise SystemExit(f"--images: expected a positive number of images, got {a.images}")
    if a.probe_views is not None and not 1 <= a.probe_views <= 4:
        raise SystemExit(f"--probe-views: expected 1 to 4, got {a.probe_views}")
    if a.seed < 0:
        raise SystemExit(f"--seed: expected a seed >= 0, got {a.seed}")
    path = results_path(a.probe_views, a.out, a.seed, a.probe_view_kind)
    if a.probe_views is not None or a.out or a.seed or a.probe_view_kind != dfmpc.probes.DEFAULT_VIEW_KIND:
        a.no_readme = True
    if a.table_only:
        rows = json.loads(path.read_text())["rows"]
    else:
        models = a.models.split(",") if a.models else list(zoo_manifest())
        unknown = [m for m in models if m not in zoo_manifest()]
        if unknown:
            raise SystemExit(f"--models: not zoo models: {unknown}; zoo: {sorted(zoo_manifest())}")
        x, _ = load_dataset("fashion-mnist")
        new = []
        for m in models:
            for s in a.settings.split(","):
                r = run(m, s, x[:a.images], a.recalibration, a.probe_views, a.seed, a.probe_view_kind)
                print(f"{m} MP{s} {a.recalibration}: median {r['median_abs_log_ratio']:.3f} max "
                      f"{r['max_abs_log_ratio']:.3f} (FP floor {r['median_abs_log_ratio_trained']:.3f} / "
                      f"{r['max_abs_log_ratio_trained']:.3f}; {r['seconds']:.0f} s)", file=sys.stderr, flush=True)
                new.append(r)
        rows = merge(new, path)
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"rows": rows}, indent=1))
    md = table(rows)
    if not a.no_readme:
        update_readme(md, *MARKERS)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
