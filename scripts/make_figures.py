#!/usr/bin/env python3
"""Regenerate the README's figures (docs/figures/*.png) with dfmpc.plotting.

    python scripts/make_figures.py                  # all figures
    python scripts/make_figures.py --only lambda    # one of: lambda, weights

* ``lambda_sweep.png``: the paper's Fig. 3, accuracy against lambda1 for each lambda2, drawn from the
  measured sweeps ``benchmarks/results/sweep_*.json`` (``python benchmarks/accuracy.py --sweep MODEL``).
  The ``c = 1`` reference line is the same re-calibrated network without compensation on the *same*
  images: read from ``benchmarks/results/accuracy.json`` when that was evaluated on the same images,
  otherwise measured here (a few seconds).
* ``weight_histograms.png``: the paper's Fig. 4 on the shipped ResNet-20, MP2/6, default settings
  (``analytic`` re-calibration, lambda1 = 0.5, lambda2 = 0): the 6-bit weights of three high layers
  before and after compensation, the latter as the effective weights
  ``dfmpc.scale_input_channels(W_next_q, c)`` (Eq. (7)); the pipeline folds the same c into BN^l.

Needs matplotlib (``pip install -e ".[plot]"``). Each file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
N_CAL = 500          # benchmarks/accuracy.py: the last 500 test images are calibration data, never evaluated


def _save(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    from dfmpc.interop._atomic import write_atomically
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight",
                                                 metadata={"Software": None}), overwrite=True)


def lambda_figure(log):
    """Fig. 3 from the stored sweeps, one panel per model."""
    import matplotlib.pyplot as plt

    import dfmpc
    from dfmpc import plotting
    from dfmpc.evaluation import accuracy, load_dataset, load_zoo_model

    sweeps = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("sweep_*.json"), reverse=True)]
    if not sweeps:
        raise SystemExit(f"no sweep results in {RESULTS}; run: python benchmarks/accuracy.py --sweep resnet56")
    acc_path = RESULTS / "accuracy.json"
    rows = {r["model"]: r for r in json.loads(acc_path.read_text())["rows"]} if acc_path.exists() else {}
    x, y = load_dataset("fashion-mnist")
    xe, ye = x[:-N_CAL], y[:-N_CAL]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.2 * len(sweeps), 3.9), squeeze=False)
    for ax, s in zip(axes[0], sweeps):
        row, n = rows.get(s["model"]), s["n_eval"]
        key = f"none/{s['recalibration']}"
        if row and row.get("n_eval") == n and key in row["settings"].get(s["setting"], {}):
            ref = row["settings"][s["setting"]][key]["accuracy"]
        else:
            lo, hi = map(int, s["setting"].split("/"))
            q, _ = dfmpc.quantize_network(load_zoo_model(s["model"]), lo, hi, recalibration=s["recalibration"],
                                          compensation="none")
            ref = accuracy(q, xe[:n], ye[:n], progress=False)
        log(f"  {s['model']}: sweep over {n} images, c = 1 reference {100 * ref:.2f}%")
        plotting.fig_lambda_sweep(s["lambda1"], s["lambda2"], s["accuracy"],
                                  references={f"c = 1 ({s['recalibration']}), same images": ref}, ax=ax,
                                  title=f"{s['model']} MP{s['setting']}, DF-MPC with {s['recalibration']} "
                                        f"re-calibration, {n} test images")
    fig.tight_layout()
    return fig


def weights_figure(log, show=(0, 4, 8)):
    """Fig. 4 on ResNet-20: high-bit weights before and after compensation, default settings."""
    import dfmpc
    from dfmpc import plotting
    from dfmpc.evaluation import load_zoo_model

    g = load_zoo_model("resnet20")
    q, report = dfmpc.quantize_network(g, 2, 6, lambda1=0.5, lambda2=0.0, recalibration="analytic")
    before, after, titles, edges = [], [], [], []
    for i in show:
        p = report.pairs[i]
        c = np.asarray(p.c)                                    # Eq. (27), as folded into BN^l
        W_next_q = q.node(p.high).params["W"]
        before.append(W_next_q)
        after.append(dfmpc.scale_input_channels(W_next_q, c))                                # Eq. (7)
        s = float(np.abs(W_next_q).max())
        d = 2 * s / 63                                  # 6-bit grid spacing; two levels per bin
        edges.append(np.arange(-s - d / 2 - 4 * d, s + d / 2 + 4 * d + 1e-12, 2 * d))
        short = p.high.replace("/layers/layers.", "layers.").replace("/Conv", "").replace("/", ".")
        titles.append(f"ResNet-20 {short}: mean c = {c.mean():.3f}")
        log(f"  {short}: mean|w| {np.abs(before[-1]).mean():.4f} -> {np.abs(after[-1]).mean():.4f}")
    return plotting.fig_weight_histograms(before, after, titles=titles, bins=edges)


FIGS = {"lambda": ("lambda_sweep.png", lambda_figure), "weights": ("weight_histograms.png", weights_figure)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(FIGS), action="append", help="make only this figure (repeatable)")
    p.add_argument("--out", type=Path, default=FIGURES, help="output folder (default docs/figures)")
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = lambda m: print(m, file=sys.stderr, flush=True)
    for key in a.only or sorted(FIGS):
        name, make = FIGS[key]
        log(f"{name}:")
        fig = make(log)
        _save(fig, a.out / name)
        plt.close(fig)
        print(a.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
