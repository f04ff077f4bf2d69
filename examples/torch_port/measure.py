#!/usr/bin/env python3
"""Measure how closely the torch port agrees with dfmpc on the zoo ResNet-20 (MP2/6), and with the vectors.

For each data-free mode the port implements (sequential on the 16 probes stored in the vectors, and absorb):
the largest |c_port - c_dfmpc| over all pairs, top-1 of both on the shipped test set and how many predictions
differ; then the largest error of the port's zoo outputs relative to the vectors' tolerance. Prints one JSON object.

    python examples/torch_port/measure.py [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dfmpc_torch as P  # noqa: E402
from zoo_model import resnet20_from_zoo  # noqa: E402


def cpu() -> dict:
    info = {"machine": platform.machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        text = open("/proc/cpuinfo").read()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
        info["simd"] = [f for f in ("avx2", "avx512f", "fma") if f in flags]
    except (OSError, StopIteration):
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N test images only (default all 10000)")
    a = ap.parse_args(argv)
    from dfmpc import quantize_network, vectors as V
    from dfmpc.evaluation import load_dataset, load_zoo_model
    g, model = load_zoo_model("resnet20"), resnet20_from_zoo()
    x, y = load_dataset("fashion-mnist")
    if a.limit:
        x, y = x[:a.limit], y[:a.limit]
    manifest, data = V.load()
    probes = data["resnet20_sequential"]["inputs"]["probes"]
    out = {"n_images": int(len(x)), "machine": cpu(), "modes": {}}
    with torch.no_grad():
        out["fp32_top1_torch"] = float(np.mean(model(torch.from_numpy(x)).argmax(1).numpy() == y))
    for mode in ("sequential", "absorb"):
        qg, rep = quantize_network(g, 2, 6, recalibration=mode, probes=probes, progress=False)
        q, c_of = P.dfmpc_quantize(model, 2, 6, recalibration=mode, probes=torch.from_numpy(probes))
        c_ref = np.concatenate([p.c for p in rep.pairs])
        c_port = torch.cat([c_of[V.module_name(p.low)] for p in rep.pairs]).numpy()
        pred_ref = qg.run(x, batch_size=250).argmax(1)
        with torch.no_grad():
            logits = q(torch.from_numpy(x))
        pred_port = logits.argmax(1).numpy()
        vx = torch.from_numpy(data[f"resnet20_{mode}"]["inputs"]["images"])
        with torch.no_grad():
            lv = q(vx).numpy()
        lv_ref = data[f"resnet20_{mode}"]["outputs"]["logits"]
        out["modes"][mode] = {
            "pairs": len(rep.pairs), "c_max_abs_diff": float(np.abs(c_port - c_ref).max()),
            "c_max_rel_diff": float((np.abs(c_port - c_ref) / np.maximum(np.abs(c_ref), 1e-12)).max()),
            "top1_dfmpc": float(np.mean(pred_ref == y)), "top1_port": float(np.mean(pred_port == y)),
            "predictions_differing": int(np.sum(pred_ref != pred_port)),
            "vector_logits_max_abs_diff": float(np.abs(lv - lv_ref).max()),
            "vector_logits_max_abs": float(np.abs(lv_ref).max())}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
