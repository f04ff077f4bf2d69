"""The ``dfmpc`` command: ``demo``, ``quantize``, ``evaluate``, ``compare``, ``diagnose``, ``vectors``, ``zoo``.

Every subcommand takes ``--json`` and then prints exactly one JSON object on stdout
(accuracies as fractions, timings in seconds); human-readable text otherwise. Errors print
one line on stderr and exit with status 2; nothing is written on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

__all__ = ["main"]


def _load_model(spec: str):
    from .evaluation import load_zoo_model, zoo_manifest
    from .interop import load_model
    if os.path.exists(spec):
        return load_model(spec)
    if spec in zoo_manifest():
        return load_zoo_model(spec)
    if os.path.splitext(spec)[1]:
        raise FileNotFoundError(f"model: no such file {spec!r}")
    raise ValueError(f"model: {spec!r} is neither a file nor a zoo model (zoo: {sorted(zoo_manifest()) or 'empty'})")


def _data(spec: str, raw: bool, limit: int | None, limit_option: str = "--limit"):
    from .evaluation import load_dataset
    if limit is not None and limit < 1:
        raise ValueError(f"{limit_option}: expected a positive number of images, got {limit}")
    x, y = load_dataset(spec, normalize=not raw)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def _check_bits_order(a):
    if a.low > a.high:
        raise ValueError(f"--low/--high: expected --low <= --high (the low layer of a pair is the lower-precision "
                         f"one), got --low {a.low} --high {a.high}")


def _check_model_params(g, spec):
    from ._checks import check_graph_params
    check_graph_params(g, what=f"model {spec!r}")


def _backend(a) -> str:
    """--backend, checked before any work; a missing onnxruntime is the user's one-line error (the extra to install)."""
    from .evaluation import check_backend
    try:
        return check_backend(a.backend)
    except ImportError as exc:
        raise ValueError(f"--backend {a.backend}: {exc}") from exc


def _tolerance(text):
    """``--probe-tolerance``: a number > 0, or ``off`` (None)."""
    text = str(text)
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v != float("inf")):
        raise ValueError(f"--probe-tolerance: expected a number > 0 or 'off', got {text!r}")
    return v


def _quant_kwargs(a):
    _check_bits_order(a)
    if a.probe_images is not None and a.probe_images < 1:
        raise ValueError(f"--probe-images: expected a positive number of probe images, got {a.probe_images}")
    if a.probe_iterations < 0:
        raise ValueError(f"--probe-iterations: expected a number of steps >= 0, got {a.probe_iterations}")
    from .pipeline import default_views
    from .probes import check_views
    views = check_views(default_views(a.probes) if a.probe_views is None else a.probe_views, "--probe-views")
    return dict(low_bits=a.low, high_bits=a.high, lambda1=a.lambda1, lambda2=a.lambda2,
                low_quantizer=a.low_quantizer, recalibration=a.recalibration, probes=a.probes, probe_images=a.probe_images, seed=a.seed,
                probe_iterations=a.probe_iterations, probe_tolerance=_tolerance(a.probe_tolerance),
                probe_objective=a.probe_objective, probe_optimizer=a.probe_optimizer, probe_views=views,
                probe_view_kind=a.probe_view_kind,
                progress=False if a.json else None)


def _calibration(a):
    if a.recalibration != "data" and getattr(a, "compensation", "dfmpc") != "oracle":
        return None
    if not a.calibration_data:
        raise ValueError("--calibration-data: required by --recalibration data / --compensation oracle "
                         "(these modes are not data-free)")
    x, _ = _data(a.calibration_data, raw=False, limit=a.calibration_images, limit_option="--calibration-images")
    return x


def cmd_demo(a) -> dict:
    from .evaluation import accuracy
    from .pipeline import quantize_network
    kw = _quant_kwargs(a)
    backend = _backend(a)
    x, y = _data("fashion-mnist", raw=False, limit=a.limit)
    g = _load_model(a.model)
    _check_model_params(g, a.model)
    show = not a.json
    out = {"model": a.model, "data": "fashion-mnist", "n_images": int(len(x)),
           "low_bits": a.low, "high_bits": a.high, "lambda1": a.lambda1, "lambda2": a.lambda2,
           "recalibration": a.recalibration, "backend": backend}
    if show:
        print(f"{a.model} on the shipped Fashion-MNIST test set ({len(x)} images); weights MP{a.low}/{a.high}, "
              f"activations FP32")

    def row(key, label, q, extra=""):
        out[key] = accuracy(q, x, y, progress=None if show else False, label=label, backend=backend)
        if show:
            print(f"  {label:<60} {100 * out[key]:6.2f}%{extra}")

    row("fp32", "FP32", g)
    q, _ = quantize_network(g, compensation="none", **{**kw, "recalibration": "absorb"})
    row("no_compensation", f"MP{a.low}/{a.high} without compensation (absorb, c = 1)", q)
    if a.recalibration == "sequential":          # make the probes once, for both sequential rows
        from .pipeline import DEFAULT_PROBE_IMAGES, probes_label, views_label
        from .probes import make_probes
        t0 = time.perf_counter()
        n = DEFAULT_PROBE_IMAGES[a.probes] if a.probe_images is None else a.probe_images
        made = make_probes(g, n=n, kind=a.probes, seed=a.seed, progress=None if show else False,
                           iterations=a.probe_iterations, tolerance=kw["probe_tolerance"],
                           objective=a.probe_objective, optimizer=a.probe_optimizer)
        kw["probes"] = made.x
        out["probe_seconds"] = time.perf_counter() - t0
        out["probes"] = probes_label(a.probes, made) + views_label(kw["probe_views"], kw["probe_view_kind"])
        if show:
            print(f"  (sequential re-calibration: {out['probes']}; made from the model alone in "
                  f"{out['probe_seconds']:.1f} s, no data)")
    modes = ["analytic"] + ([a.recalibration] if a.recalibration not in ("absorb", "analytic") else [])
    for mode in modes:                            # separate what re-calibration does from what c does
        q, _ = quantize_network(g, compensation="none", **{**kw, "recalibration": mode})
        row("recalibration_only" if mode == a.recalibration else f"{mode}_only",
            f"MP{a.low}/{a.high} {mode} re-calibration only (c = 1)", q)
    q, rep = quantize_network(g, compensation="dfmpc", **kw)
    out["dfmpc_seconds"] = rep.seconds + out.get("probe_seconds", 0.0)
    row("dfmpc", f"DF-MPC (recalibration={a.recalibration}, lambda1={a.lambda1}, lambda2={a.lambda2})", q,
        f"   (quantization + compensation: {out['dfmpc_seconds']:.1f} s)")
    return out


#: printed by ``dfmpc quantize`` for a model without BatchNormalization nodes
NO_BN_NOTE = ("note: the model has no BatchNormalization node, so no conv can be ternary (DF-MPC needs the BN "
              "statistics) and every layer stays at the high bit-width. If BN was folded into the convs on "
              "export (torch.onnx.export's default), export with dfmpc.interop.torch_export.export_onnx, "
              "which keeps it.")


def cmd_quantize(a) -> dict:
    from .interop import save_model
    from .pipeline import quantize_network
    if not a.output:
        raise ValueError("-o/--output: required")
    if os.path.abspath(a.output) == os.path.abspath(a.model) or \
            (os.path.exists(a.output) and os.path.exists(a.model) and os.path.samefile(a.output, a.model)):
        raise ValueError(f"-o/--output: {a.output!r} is the input model; refusing to overwrite it")
    if os.path.splitext(a.output)[1].lower() not in (".onnx", ".npz"):
        raise ValueError(f"-o/--output: expected a .onnx or .npz path, got {a.output!r}")
    if a.format == "qdq" and os.path.splitext(a.output)[1].lower() != ".onnx":
        raise ValueError(f"--format qdq: writes ONNX (int8 weights + DequantizeLinear); expected a .onnx output, "
                         f"got {a.output!r}")
    if os.path.exists(a.output) and not a.overwrite:
        raise ValueError(f"-o/--output: {a.output!r} exists; pass --overwrite to replace it")
    out_dir = os.path.dirname(os.path.abspath(a.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"-o/--output: the directory of {a.output!r} does not exist")
    _check_bits_order(a)
    g = _load_model(a.model)
    _check_model_params(g, a.model)
    pairs = [tuple(p) for p in a.pair] if a.pair else None
    q, rep = quantize_network(g, compensation=a.compensation, calibration_data=_calibration(a), pairs=pairs,
                              **_quant_kwargs(a))
    if a.format == "qdq":
        save_model(q, a.output, overwrite=a.overwrite, format="qdq", report=rep)
    else:
        save_model(q, a.output, overwrite=a.overwrite)
    if not a.json:
        from .pairing import find_pairs
        print(find_pairs(g, pairs=pairs).describe(a.low, a.high))
        if not g.nodes_of("BatchNormalization"):
            print(NO_BN_NOTE)
        print(rep.summary())
        print(f"wrote {a.output}")
    return {"model": a.model, "output": a.output, "format": a.format, **rep.to_dict()}


def cmd_evaluate(a) -> dict:
    from .evaluation import accuracy
    if a.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive number of images per batch, got {a.batch_size}")
    backend = _backend(a)
    g = _load_model(a.model)
    _check_model_params(g, a.model)
    x, y = _data(a.data, raw=a.raw, limit=a.limit)
    t0 = time.perf_counter()
    acc = accuracy(g, x, y, batch_size=a.batch_size, progress=None if not a.json else False, label="evaluate",
                   backend=backend)
    out = {"model": a.model, "data": a.data, "n_images": int(len(x)), "accuracy": acc,
           "seconds": time.perf_counter() - t0, "backend": backend}
    if not a.json:
        print(f"{a.model} on {a.data} ({len(x)} images): top-1 {100 * acc:.2f}% ({out['seconds']:.1f} s"
              + (f", {backend}" if backend != "engine" else "") + ")")
    return out


def cmd_compare(a) -> dict:
    from .baselines import METHODS
    from .compare import compare, format_table
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {','.join(METHODS)}")
    _check_bits_order(a)
    backend = _backend(a)
    g = _load_model(a.model)
    _check_model_params(g, a.model)
    x, y = _data(a.data, raw=a.raw, limit=a.limit)
    n_cal = a.calibration_images
    if n_cal < 0 or n_cal >= len(x):
        raise ValueError(f"--calibration-images: expected 0 <= N < {len(x)} (the number of images), got {n_cal}")
    cal = x[len(x) - n_cal:] if n_cal else None
    xe, ye = x[:len(x) - n_cal], y[:len(x) - n_cal]
    pairs = [tuple(p) for p in a.pair] if a.pair else None
    if pairs:
        from .pairing import find_pairs
        find_pairs(g, pairs=pairs)         # an impossible --pair is the user's error, not every method's refusal
    show = not a.json
    if show:
        print(f"{a.model} on {a.data}: {len(xe)} evaluation images"
              + (f", the last {n_cal} held out for data-aware methods" if n_cal else "")
              + f"; weights MP{a.low}/{a.high} (same layers low/high for every method), activations FP32")
    rows = compare(g, xe, ye, methods, a.low, a.high, calibration_data=cal, pairs=pairs,
                   log=(lambda line: print(line, file=sys.stderr, flush=True)) if show else None,
                   backend=backend, progress=None if show else False)
    if show:
        print(format_table(rows))
    return {"model": a.model, "data": a.data, "n_images": int(len(xe)), "n_calibration": int(n_cal),
            "low_bits": a.low, "high_bits": a.high, "backend": backend, "results": rows}


def cmd_diagnose(a) -> dict:
    from .diagnose import diagnose
    g = _load_model(a.model)
    _check_model_params(g, a.model)
    x, _ = _data(a.data, raw=a.raw, limit=a.limit)
    d = diagnose(g, x, compensation="none", calibration_data=_calibration(a), **_quant_kwargs(a))
    if not a.json:
        rep = d.report
        print(f"{a.model}: MP{a.low}/{a.high}, recalibration={rep.recalibration}"
              + (f" on {rep.probes}" if rep.probes else "") + f" (c = 1); BN statistics predicted by the "
              f"re-calibration vs measured on {len(x)} images of {a.data} in the quantized network")
        print(d.table())
    return {"model": a.model, "data": a.data, "n_images": int(len(x)), "low_bits": a.low, "high_bits": a.high,
            "recalibration": a.recalibration, "probes": d.report.probes, **d.to_dict()}


def cmd_vectors(a) -> dict:
    from . import vectors
    vs = vectors.generate(zoo=not a.no_zoo)
    manifest = vectors.write(a.output, vs, overwrite=a.overwrite)
    if not a.json:
        for e in manifest["entries"]:
            print(f"  {e['file']:<32} {e['function']}  ({e['equation']})")
        print(f"wrote {len(vs)} reference vectors and manifest.json to {a.output} (see PORTING.md)")
    return {"output": a.output, "entries": [e["name"] for e in manifest["entries"]],
            "format_version": manifest["format_version"]}


def cmd_zoo(a) -> dict:
    from .zoo.catalog import format_table, summaries
    rows = summaries()
    if not a.json:
        print(format_table(rows))
    return {"models": rows}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfmpc", description="DF-MPC: data-free mixed-precision compensation")
    sub = p.add_subparsers(dest="command", required=True)

    def backend_opt(sp):
        sp.add_argument("--backend", choices=("engine", "onnxruntime"), default="engine",
                        help="where the evaluations run: dfmpc's own engine (the reference) or onnxruntime, "
                             "faster on large sets (needs pip install -e \".[ort]\"); the quantization "
                             "always uses dfmpc (default %(default)s)")

    def quant_opts(sp):
        sp.add_argument("--low", type=int, default=2, help="low bit-width (2 = ternary; default 2)")
        sp.add_argument("--high", type=int, default=6, help="high bit-width (default 6)")
        sp.add_argument("--low-quantizer", choices=("auto", "twn", "dorefa"), default="auto",
                        help="grid of the low convs: auto = TWN ternary at --low 2, DoReFa otherwise (default auto)")
        sp.add_argument("--lambda1", type=float, default=0.5, help="weight of the bias term, Eq. (22) (default 0.5)")
        sp.add_argument("--lambda2", type=float, default=0.0, help="ridge weight on c, Eq. (22) (default 0)")
        from .pipeline import DEFAULT_PROBE_IMAGES, DEFAULT_PROBES, DEFAULT_RECALIBRATION
        from .recalibration import RECALIBRATIONS
        sp.add_argument("--recalibration", choices=RECALIBRATIONS, default=DEFAULT_RECALIBRATION,
                        help="how BN statistics of quantized convs are set: sequential, analytic, absorb are "
                             "data-free, data needs --calibration-data (default %(default)s)")
        sp.add_argument("--probes", choices=("distilled", "noise"), default=DEFAULT_PROBES,
                        help="--recalibration sequential: probe inputs made from the model alone (default %(default)s)")
        sp.add_argument("--probe-images", type=int, default=None, metavar="N",
                        help="how many probe images (default: " + ", ".join(
                            f"{n} {k}" for k, n in DEFAULT_PROBE_IMAGES.items()) + ")")
        sp.add_argument("--seed", type=int, default=0, help="seed of the probe inputs (default 0)")
        from .pipeline import DEFAULT_PROBE_VIEWS
        sp.add_argument("--probe-views", type=int, default=None, metavar="V",
                        help="views per probe image in the sequential pass: the image and V - 1 of its mirror images "
                             "(or diagonal shifts by a quarter of the image: --probe-view-kind), 1 to 4; the "
                             "variance ratio uses all views, the mean "
                             f"shift the images alone (default {DEFAULT_PROBE_VIEWS} for distilled probes, 1 for "
                             "noise; derivation 15, S.5-S.6)")
        from .probes import DEFAULT_VIEW_KIND, VIEW_KINDS
        sp.add_argument("--probe-view-kind", choices=VIEW_KINDS, default=DEFAULT_VIEW_KIND,
                        help="how the views of --probe-views are made: mirrors (the image mirrored left-right, upside "
                             "down and both) or shifts (circular shifts by a quarter of the image) "
                             "(default %(default)s; derivation 15, S.6 and S.4)")
        from .probes import DEFAULT_ITERATIONS, DEFAULT_TOLERANCE, MAX_BUDGET_FACTOR
        sp.add_argument("--probe-iterations", type=int, default=DEFAULT_ITERATIONS, metavar="N",
                        help=f"distillation steps of the distilled probes, doubled up to {MAX_BUDGET_FACTOR}x while "
                             f"they miss --probe-tolerance (default %(default)s)")
        from .probes import DEFAULT_OBJECTIVE, OBJECTIVES
        sp.add_argument("--probe-objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                        help="what distillation minimises: relative (D.6, each channel in units of its BN's sigma) "
                             "or absolute (ZeroQ's D.1) (default %(default)s)")
        from .probes import DEFAULT_OPTIMIZER, OPTIMIZERS
        sp.add_argument("--probe-optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER,
                        help="how distillation moves the images: adam (ZeroQ's) or lbfgs (L-BFGS-B, the same cost "
                             "per step) (default %(default)s)")
        sp.add_argument("--probe-tolerance", default=str(DEFAULT_TOLERANCE), metavar="T",
                        help="RMS relative mismatch of the probes' BN statistics at which distillation stops asking "
                             "for more steps, or 'off' for exactly --probe-iterations steps (default %(default)s)")

    d = sub.add_parser("demo", help="the main job: FP32 vs MP2/6 vs DF-MPC on the shipped model and data")
    d.add_argument("--model", default="resnet20", help="zoo model or model file (default resnet20)")
    d.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    quant_opts(d)
    backend_opt(d)
    d.add_argument("--json", action="store_true", help="print one JSON object")

    q = sub.add_parser("quantize", help="quantize a model with DF-MPC and write it")
    q.add_argument("model", help="model file (.onnx or .npz) or zoo model name")
    quant_opts(q)
    q.add_argument("--compensation", choices=("dfmpc", "none", "oracle"), default="dfmpc")
    q.add_argument("--pair", nargs=2, action="append", metavar=("LOW", "HIGH"), default=None,
                   help="explicit pair (node names of the low and the high conv); repeat for several; "
                        "default: automatic pairing")
    q.add_argument("--calibration-data", default=None, help="images for --recalibration data / --compensation oracle")
    q.add_argument("--calibration-images", type=int, default=500, help="how many calibration images (default 500)")
    q.add_argument("-o", "--output", required=True, help="output model (.onnx or .npz); never the input")
    q.add_argument("--format", choices=("float", "qdq"), default="float",
                   help="float: dequantized float32 weights; qdq: .onnx with int8 weights and a per-output-channel "
                        "DequantizeLinear each (opset 13; c stays folded in BN) (default float)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    q.add_argument("--json", action="store_true", help="print one JSON object (the per-pair report) instead of text")

    e = sub.add_parser("evaluate", help="top-1 accuracy of a model")
    e.add_argument("model", help="model file (.onnx or .npz) or zoo model name")
    e.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' (shipped) or an .npz with x and y")
    e.add_argument("--raw", action="store_true", help="shipped data without the zoo's normalisation")
    e.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate on the first N images only (default: all)")
    e.add_argument("--batch-size", type=int, default=500, metavar="B",
                   help="images per call of the engine; changes memory use, not the result (default 500)")
    backend_opt(e)
    e.add_argument("--json", action="store_true",
                   help="print one JSON object (model, data, n_images, accuracy as a fraction, seconds) "
                        "instead of text")

    c = sub.add_parser("compare", help="data-free baselines and DF-MPC on the same weights: accuracy and time")
    c.add_argument("model", help="model file (.onnx or .npz) or zoo model name")
    c.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' (shipped) or an .npz with x and y")
    c.add_argument("--raw", action="store_true", help="shipped data without the zoo's normalisation")
    c.add_argument("--low", type=int, default=2, help="low bit-width (default 2)")
    c.add_argument("--high", type=int, default=6, help="high bit-width (default 6)")
    from .baselines import DEFAULT_METHODS
    c.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated method names (default: all: %(default)s)")
    c.add_argument("--pair", nargs=2, action="append", metavar=("LOW", "HIGH"), default=None,
                   help="explicit pair for every method; repeat for several")
    c.add_argument("--calibration-images", type=int, default=500,
                   help="the last N images are held out of the evaluation and given only to data-aware "
                        "methods (oracle); 0 = none (default 500)")
    c.add_argument("--limit", type=int, default=None, help="use the first N images only")
    backend_opt(c)
    c.add_argument("--json", action="store_true", help="print one JSON object (one row per method) instead of text")

    g = sub.add_parser("diagnose", help="per quantized layer: BN statistics the re-calibration predicts vs measured")
    g.add_argument("model", help="model file (.onnx or .npz) or zoo model name")
    g.add_argument("--data", default="fashion-mnist",
                   help="images to measure on: 'fashion-mnist' (shipped, zoo normalisation) or an .npz with x and y")
    g.add_argument("--raw", action="store_true", help="shipped data without the zoo's normalisation")
    g.add_argument("--limit", type=int, default=1000, metavar="N",
                   help="measure on the first N images (default %(default)s)")
    quant_opts(g)
    g.add_argument("--calibration-data", default=None, help="images for --recalibration data")
    g.add_argument("--calibration-images", type=int, default=500, help="how many calibration images (default 500)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: one record per layer (predicted_var, measured_var, ratio, ...) "
                        "and a summary (median_abs_log_ratio, max_abs_log_ratio)")
    v = sub.add_parser("vectors", help="write the reference vectors (inputs and outputs of every step) for checking a port")
    v.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="directory for manifest.json and one .npz per step (created if missing)")
    v.add_argument("--no-zoo", action="store_true", help="only the array-level steps (skip the ResNet-20 entries)")
    v.add_argument("--overwrite", action="store_true", help="replace vector files already in DIR")
    v.add_argument("--json", action="store_true", help="print one JSON object (output, entries) instead of text")
    z = sub.add_parser("zoo", help="the shipped models: architecture, parameters, FP32 accuracy, paper row, "
                                   "training command")
    z.add_argument("--json", action="store_true",
                   help="print one JSON object {\"models\": [{name, architecture, parameters, fp32_accuracy, "
                        "paper_row, command, file}, ...]} instead of text")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = {"demo": cmd_demo, "quantize": cmd_quantize, "evaluate": cmd_evaluate,
               "compare": cmd_compare, "diagnose": cmd_diagnose, "vectors": cmd_vectors,
               "zoo": cmd_zoo}[args.command](args)
    except (ValueError, OSError) as exc:     # user errors; anything else is a bug and shows its traceback
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"dfmpc {args.command}: error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
