#!/usr/bin/env python3
"""MobileNetV2 (zoo ``mobilenetv2_small``) with DF-MPC pairs through ReLU6 (c by Eq. (7), derivation 17).

For MP2/6 and MP6/6 it evaluates, on a subset of the evaluation split of ``benchmarks/accuracy.py``
(the first ``--n`` of the 9,500 images that are not its 500 calibration images):

* ``no pairs``: ``pairs=[]``, every layer at the high bit-width (what the pipeline did before ReLU6 pairs);
* ``none``: the ReLU6 pairs at low/high bits, c = 1 (the paper's "without compensation");
* ``dfmpc``: the same with the closed-form c (Eq. (27)) applied by Eq. (7) on the high conv;

each under the default re-calibration (sequential on distilled probes), ``absorb`` and ``data``
(the 500 calibration images). It also checks the exported ONNX model against the engine
(onnxruntime, same top-1 on the subset) and records the CPU. Writes ``benchmarks/results/clip_pairs.json``.

Usage::

    python benchmarks/clip_pairs.py                # 2,000 images
    python benchmarks/clip_pairs.py --n 9500       # the whole evaluation split
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

import dfmpc
from dfmpc.evaluation import accuracy, load_dataset, load_zoo_model, logits
from dfmpc.interop._atomic import write_atomically
from dfmpc.pipeline import quantize_network

ROOT = Path(__file__).resolve().parent.parent
N_CAL = 500


def cpu():
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"cpu": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="evaluation images (default 2000)")
    ap.add_argument("--model", default="mobilenetv2_small")
    a = ap.parse_args(argv)
    x, y = load_dataset("fashion-mnist")
    (xe, ye), cal = (x[:-N_CAL][:a.n], y[:-N_CAL][:a.n]), x[-N_CAL:]
    g = load_zoo_model(a.model)
    out = {"model": a.model, "n_eval": int(len(xe)), "eval_images": f"shipped test set [0, {len(xe)})",
           "n_calibration": N_CAL, **cpu(), "fp32": accuracy(g, xe, ye, progress=False), "settings": {}}
    print(f"{a.model}: FP32 {100 * out['fp32']:.2f}% on {len(xe)} images")
    for low, high in ((2, 6), (6, 6)):
        rows = out["settings"][f"{low}/{high}"] = {}
        for rec in ("sequential", "absorb", "data"):
            for comp in ("no pairs", "none", "dfmpc"):
                t0 = time.perf_counter()
                q, rep = quantize_network(g, low, high, recalibration=rec, calibration_data=cal,
                                          compensation="none" if comp == "no pairs" else comp,
                                          pairs=[] if comp == "no pairs" else None)
                row = {"accuracy": accuracy(q, xe, ye, progress=False), "pairs": len(rep.pairs),
                       "forms": sorted({p.form for p in rep.pairs}), "quantize_seconds": time.perf_counter() - t0,
                       "c_mean": float(np.mean([p.c_mean for p in rep.pairs])) if rep.pairs else None}
                rows[f"{comp}/{rec}"] = row
                print(f"MP{low}/{high} {comp:>8}/{rec:<10} {100 * row['accuracy']:.2f}%  pairs {row['pairs']} "
                      f"{row['forms']}")
        q, rep = quantize_network(g, low, high)                    # the defaults: sequential, dfmpc, c_form auto
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "q.onnx"
            dfmpc.save_model(q, path)                                # the file a user gets from `dfmpc quantize -o`
            sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            ort = np.concatenate([sess.run(None, {q.inputs[0]: xe[i:i + 500]})[0] for i in range(0, len(xe), 500)])
        eng = logits(q, xe, progress=False)
        out["settings"][f"{low}/{high}"]["onnxruntime_check"] = {
            "same_top1_fraction": float(np.mean(ort.argmax(1) == eng.argmax(1))),
            "max_abs_logit_diff": float(np.abs(ort - eng).max())}
        print(f"MP{low}/{high} onnxruntime vs engine: {out['settings'][f'{low}/{high}']['onnxruntime_check']}")
    path = ROOT / "benchmarks" / "results" / "clip_pairs.json"
    write_atomically(path, lambda f: f.write(json.dumps(out, indent=1).encode()), overwrite=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
