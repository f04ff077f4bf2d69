#!/usr/bin/env python3
"""Where the accuracy goes: per pair, the true feature-map loss (Eq. (9)) of c = 1, DF-MPC's c and the oracle c.

For every DF-MPC pair of a zoo model, on real input activations of layer l taken from the
full-precision network (the last ``--images`` images of the shipped test set), this prints the
relative true loss ``sum_t ||X~ - X||^2 / sum_t ||X||^2`` of layer l+1's output for

* ``c = 1``        (no compensation),
* ``c_dfmpc``      (Eq. (27), data-free),
* ``c_oracle``     (argmin over c >= 0 of the same loss on these activations: the best any c can do),

under a data-free re-calibration (``--recalibration absorb|analytic``), plus the mean of each c.

Usage::

    python benchmarks/pair_losses.py --model resnet20 --recalibration analytic --json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import dfmpc
from dfmpc.evaluation import load_dataset, load_zoo_model
from dfmpc.pipeline import quantize_weights
from dfmpc.recalibration import analytic_bn, bn_of, propagate_moments


def conv_args(node):
    pads = tuple(node.attrs.get("pads", (0, 0, 0, 0)))
    return tuple(node.attrs.get("strides", (1, 1))), pads[:2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--recalibration", choices=("absorb", "analytic"), default="analytic")
    p.add_argument("--low", type=int, default=2)
    p.add_argument("--high", type=int, default=6)
    p.add_argument("--lambda1", type=float, default=0.5)
    p.add_argument("--lambda2", type=float, default=0.0)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    g = load_zoo_model(a.model)
    x, _ = load_dataset("fashion-mnist")
    x = x[-a.images:]
    pairing = dfmpc.find_pairs(g)
    moments = propagate_moments(g)
    acts = g.run_many(x, outputs=[g.node(q.low).inputs[0] for q in pairing.pairs])
    rows = []
    for q in pairing.pairs:
        lo, hi = g.node(q.low), g.node(q.high)
        W, W_next = lo.params["W"].astype(float), hi.params["W"].astype(float)
        W_q, W_next_q = quantize_weights(W, a.low).astype(float), quantize_weights(W_next, a.high).astype(float)
        bn = bn_of(g.node(q.bn))
        bn_hat = bn if a.recalibration == "absorb" else analytic_bn(bn, W, W_q, 1, *moments[lo.inputs[0]])
        (s1, p1), (s2, p2) = conv_args(lo), conv_args(hi)
        kw = dict(stride=s1, padding=p1, stride_next=s2, padding_next=p2)
        A = acts[lo.inputs[0]].astype(float)
        X = dfmpc.pair_forward(A, W, bn, W_next, **kw)
        norm = float(np.sum(X**2))
        c_df = dfmpc.compensation_coefficients(W, W_q, bn, bn_hat, a.lambda1, a.lambda2)
        c_or = dfmpc.oracle_coefficients(A, W, bn, W_next, W_q, bn_hat, W_next_q, **kw)
        loss = lambda c: dfmpc.feature_map_loss(A, W, bn, W_next, W_q, bn_hat, W_next_q, c, **kw) / norm
        rows.append({"low": q.low, "high": q.high, "loss_c1": loss(None), "loss_dfmpc": loss(c_df),
                     "loss_oracle": loss(c_or), "c_dfmpc_mean": float(c_df.mean()), "c_oracle_mean": float(c_or.mean())})
        r = rows[-1]
        print(f"{q.low:<32} rel. loss  c=1 {r['loss_c1']:.4f}  dfmpc {r['loss_dfmpc']:.4f}  oracle {r['loss_oracle']:.4f}"
              f"   mean c: dfmpc {r['c_dfmpc_mean']:.3f} oracle {r['c_oracle_mean']:.3f}", file=sys.stderr, flush=True)
    out = {"model": a.model, "recalibration": a.recalibration, "low_bits": a.low, "high_bits": a.high,
           "lambda1": a.lambda1, "lambda2": a.lambda2, "images": a.images, "pairs": rows}
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
