#!/usr/bin/env python3
"""Convert the trained zoo (``scripts/train_zoo.py`` output) into shipped files.

For every architecture trained in ``--staging`` (``<arch>.onnx`` + ``<arch>.json``):

1. load the ONNX file with dfmpc's importer (``dfmpc.load_model``), BatchNorm
   kept as separate nodes;
2. evaluate it with dfmpc's engine on the shipped 10k test set and compare with
   the accuracy PyTorch measured at the end of training (and the logits with
   onnxruntime);
3. write ``reference/dfmpc/zoo/<arch>.npz`` (dfmpc's native format; or copy the
   ``.onnx`` with ``--format onnx``);
4. write ``reference/dfmpc/zoo/models.json`` describing every shipped model,
   with the row of the paper's tables it stands for (``PAPER_ROWS``; listed by
   ``dfmpc zoo``). Models not re-exported keep their entry; their description
   and paper row are refreshed from the tables here.

``python scripts/export_zoo.py --arch`` (no names) only refreshes those fields.
``python scripts/export_zoo.py --refresh-subset`` re-measures only the fixed-subset
accuracies (``SUBSET``) of the shipped files, with dfmpc's engine and with onnxruntime on
their ONNX export; the slow suite checks the larger models on that subset.

Example
-------
::

    python scripts/export_zoo.py --staging /work/zoo_staging
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ZOO_DIR = REPO / "reference" / "dfmpc" / "zoo"

#: Shipping order (ResNet-20 is the default model of ``dfmpc demo``) and a
#: one-line description of each architecture (details: scripts/train_zoo.py).
ARCHITECTURES = {
    "resnet20": "CIFAR-style ResNet-20: stem conv3x3(16)-BN-ReLU, 3x3 basic blocks at "
                "16/32/64 channels, option-B shortcuts (conv1x1+BN when the shape changes), "
                "GAP, linear",
    "resnet56": "CIFAR-style ResNet-56: as ResNet-20 with 9 basic blocks per stage",
    "vgg_small": "plain VGG-style chain: 2x[conv3x3-BN-ReLU] at 32, maxpool, 2x at 64, "
                 "maxpool, 2x at 128 (6 convs), GAP, linear",
    "resnet_bottleneck": "small bottleneck ResNet: stem conv3x3(16)-BN-ReLU, one "
                         "1x1-3x3-1x1 bottleneck block per stage (width 16/32/64, expansion 4), "
                         "option-B shortcuts, GAP, linear",
    "mobilenetv2_small": "small MobileNetV2: stem conv3x3(16)-BN-ReLU6, inverted residuals "
                         "(t,c,n,s) = (1,16,1,1) (6,24,2,2) (6,32,2,2) (6,64,2,1) (6,96,1,1), "
                         "depthwise 3x3, ReLU6, conv1x1(256)-BN-ReLU6, GAP, linear",
    "resnet18": "CIFAR-style ResNet-18: stem conv3x3-BN-ReLU (stride 1), basic blocks [2,2,2,2] at "
                "16/32/64/128 channels (the paper's 64/128/256/512 at 1/4 width, for size and "
                "training time), strides 1/2/2/2, option-B shortcuts, GAP, linear",
    "vgg16": "CIFAR VGG-16-BN: 13 conv3x3-BN-ReLU in blocks of 2/2/3/3/3 at 16/32/64/128/128 "
             "channels (the paper's 64..512 at 1/4 width), max-pools after blocks 1, 2, 3 and 5 "
             "(none after block 4: 28x28 has four halvings, 28->14->7->3->1), flatten, linear",
    "densenet": "DenseNet-BC-40 (growth 12, compression 0.5): stem conv3x3(24), three dense "
                "blocks of 6 pre-activation layers BN-ReLU-conv1x1(48)-BN-ReLU-conv3x3(12) whose "
                "outputs are concatenated, transitions BN-ReLU-conv1x1-avgpool2, BN-ReLU, GAP, "
                "linear (full width)",
    "mobilenetv2": "MobileNetV2: the paper's 17 inverted residuals (t,c,n,s) = (1,16,1,1) "
                   "(6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1) with "
                   "ReLU6 and depthwise 3x3, channels at width multiplier 0.5 and the last "
                   "conv1x1 at 640 instead of 1280 (size and training time), stem conv3x3 at "
                   "stride 1 (28x28 input), GAP, linear",
}

#: The row of the paper's tables (Chen et al. 2023) each model stands for
#: (None: the model has no counterpart there). ``dfmpc zoo`` lists these.
PAPER_ROWS = {
    "resnet20": None,
    "resnet56": {"model": "ResNet-56", "dataset": "CIFAR-10", "setting": "MP2/6"},
    "vgg_small": {"model": "VGG-16", "dataset": "CIFAR-10", "setting": "MP2/6",
                  "note": "6-conv stand-in; vgg16 has the 13 convs"},
    "resnet_bottleneck": {"model": "ResNet-50 / ResNet-101", "dataset": "ImageNet", "setting": "MP2/6",
                          "note": "bottleneck blocks, far smaller"},
    "mobilenetv2_small": {"model": "MobileNetV2", "dataset": "ImageNet", "setting": "MP6/6",
                          "note": "10-block stand-in; mobilenetv2 has the 17 blocks"},
    "resnet18": {"model": "ResNet-18", "dataset": "CIFAR-10", "setting": "MP2/6"},
    "vgg16": {"model": "VGG-16", "dataset": "CIFAR-10", "setting": "MP2/6"},
    "densenet": {"model": "DenseNet-121", "dataset": "ImageNet", "setting": "MP3/6",
                 "note": "DenseNet-BC-40 stands in"},
    "mobilenetv2": {"model": "MobileNetV2", "dataset": "ImageNet", "setting": "MP6/6"},
}

#: Models trained from the weights of an earlier shipped model (``train_zoo.py
#: --init-from``): where those weights come from, so the chain can be re-run.
INIT_SOURCES = {
    "resnet56": {"file": "resnet56_4ep.npz",
                 "obtain": "git show 1664163:reference/dfmpc/zoo/resnet56.npz > /work/zoo_staging/resnet56_4ep.npz",
                 "trained_by": "python scripts/train_zoo.py --arch resnet56 --epochs 4",
                 "fp32_test_accuracy_engine": 0.9211},
    "mobilenetv2": {"file": "mobilenetv2_3ep.onnx",
                    "obtain": "python scripts/train_zoo.py --arch mobilenetv2 --epochs 3 --threads 1, then rename "
                              "/work/zoo_staging/mobilenetv2.onnx to mobilenetv2_3ep.onnx (90.46%, not shipped)",
                    "trained_by": "python scripts/train_zoo.py --arch mobilenetv2 --epochs 3 --threads 1",
                    "fp32_test_accuracy_torch": 0.9046},
}


#: The fixed evaluation subset recorded for every model: every 10th test image (1000 images,
#: 100 per class up to the set's order). ``tests/test_zoo_data.py`` runs the engine on it for
#: every model but the default one, which it checks on all 10,000.
SUBSET = slice(None, None, 10)
SUBSET_NAME = "every 10th test image, x[::10] (1000 images)"


def subset_fields(engine_logits: np.ndarray, ort_logits: np.ndarray, y: np.ndarray) -> dict:
    """``fp32_subset`` record: top-1 accuracy of both backends' logits (N, classes) on ``SUBSET``."""
    ys = y[SUBSET]
    return {"fp32_subset": {
        "images": SUBSET_NAME,
        "engine": float((engine_logits.argmax(1) == ys).mean()),
        "onnxruntime": float((ort_logits.argmax(1) == ys).mean()),
    }}


def refresh_subset(out: Path, xn: np.ndarray, y: np.ndarray) -> None:
    """Add or refresh ``fp32_subset`` in ``out/models.json`` from the shipped weight files."""
    import onnxruntime as ort

    import dfmpc
    from dfmpc.interop.onnx_export import to_onnx

    manifest_path = out / "models.json"
    manifest = json.loads(manifest_path.read_text())
    xs = np.ascontiguousarray(xn[SUBSET])
    for entry in manifest["models"]:
        graph = dfmpc.load_model(out / entry["file"])
        eng = np.concatenate([graph.run(xs[i:i + 500]) for i in range(0, len(xs), 500)])
        sess = ort.InferenceSession(to_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
        ort_logits = sess.run(None, {sess.get_inputs()[0].name: xs})[0]
        entry.update(subset_fields(eng, ort_logits, y))
        print(entry["arch"], entry["fp32_subset"], flush=True)
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(manifest_path)


def engine_accuracy(graph, x: np.ndarray, y: np.ndarray, batch: int = 500):
    """Top-1 accuracy of a dfmpc graph on normalised inputs, and its logits."""
    logits = np.concatenate([graph.run(x[i:i + batch]) for i in range(0, len(x), batch)])
    return float((logits.argmax(1) == y).mean()), logits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--staging", type=Path, default=Path("/work/zoo_staging"))
    p.add_argument("--format", choices=("npz", "onnx"), default="npz")
    p.add_argument("--arch", nargs="*", default=list(ARCHITECTURES))
    p.add_argument("--out-dir", type=Path, default=ZOO_DIR,
                   help="where the weight files and models.json go (default: the package)")
    p.add_argument("--refresh-subset", action="store_true",
                   help="only re-measure every shipped model's fixed-subset accuracy (fp32_subset)")
    args = p.parse_args(argv)
    out = args.out_dir

    import onnxruntime as ort

    from dfmpc.zoo.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist_test, normalize

    x, y = load_fashion_mnist_test()
    xn = normalize(x)
    if args.refresh_subset:
        refresh_subset(out, xn, y)
        return
    manifest_path = out / "models.json"
    old = {}
    if manifest_path.exists():
        old = {m["arch"]: m for m in json.loads(manifest_path.read_text())["models"]}

    for arch in args.arch:
        onnx_path, rec_path = args.staging / f"{arch}.onnx", args.staging / f"{arch}.json"
        if not (onnx_path.exists() and rec_path.exists()):
            print(f"{arch}: not trained yet, skipped")
            continue
        rec = json.loads(rec_path.read_text())
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        ort_logits = sess.run(None, {"input": xn})[0]
        ort_acc = float((ort_logits.argmax(1) == y).mean())
        entry = {
            "arch": arch,
            "description": ARCHITECTURES[arch],
            "paper_row": PAPER_ROWS[arch],
            "file": f"{arch}.{args.format}",
            "parameters": rec["parameters"],
            "fp32_test_accuracy_torch": rec["fp32_test_accuracy_torch"],
            "fp32_test_accuracy_onnxruntime": ort_acc,
        }
        if args.format == "npz":
            import dfmpc

            graph = dfmpc.load_model(onnx_path)
            t0 = time.time()
            acc, logits = engine_accuracy(graph, xn, y)
            entry["fp32_test_accuracy_engine"] = acc
            entry["engine_eval_seconds"] = round(time.time() - t0, 1)
            entry["engine_vs_onnxruntime_max_abs_logit_diff"] = float(np.abs(logits - ort_logits).max())
            entry.update(subset_fields(logits[SUBSET], ort_logits[SUBSET], y))
            dfmpc.save_model(graph, out / entry["file"], overwrite=True)
            # round trip: the shipped file gives the same logits
            back = dfmpc.load_model(out / entry["file"]).run(xn[:256])
            np.testing.assert_allclose(back, logits[:256], rtol=0, atol=1e-5)
        else:
            shutil.copyfile(onnx_path, out / entry["file"])
        entry.update({
            "input": rec["input"],
            "training": rec["training"],
            "history": rec["history"],
            "onnx_check": rec["onnx_check"],
            "command": rec["command"],
        })
        if rec["training"].get("init_from"):
            src = INIT_SOURCES[arch]
            if src["file"] != rec["training"]["init_from"]["file"]:
                raise RuntimeError(f"{arch}: trained from {rec['training']['init_from']['file']}, "
                                   f"INIT_SOURCES names {src['file']}")
            entry["training"]["init_from"] = rec["training"]["init_from"] | src
        old[arch] = entry
        print(json.dumps({k: entry.get(k) for k in (
            "arch", "parameters", "fp32_test_accuracy_torch", "fp32_test_accuracy_onnxruntime",
            "fp32_test_accuracy_engine", "engine_vs_onnxruntime_max_abs_logit_diff")}), flush=True)

    for arch, entry in old.items():       # descriptions and paper rows of models not re-exported
        entry["description"] = ARCHITECTURES[arch]
        entry["paper_row"] = PAPER_ROWS[arch]
    models = [old[a] for a in ARCHITECTURES if a in old]
    manifest = {
        "format_version": 1,
        "dataset": "Fashion-MNIST t10k (t10k-*-ubyte.gz in this directory), 10000 images, 10 classes",
        "input_convention": "x = uint8/255 in [0,1], NCHW (N,1,28,28) float32, then "
                            "(x - normalize_mean) / normalize_std; see dfmpc.zoo.data.normalize",
        "normalize_mean": FASHION_MNIST_MEAN,
        "normalize_std": FASHION_MNIST_STD,
        "training_script": "scripts/train_zoo.py",
        "default_model": "resnet20",
        "models": models,
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(manifest_path)
    print(f"wrote {manifest_path} ({len(models)} models)")


if __name__ == "__main__":
    main()
