"""Evaluation backends (issue 13 item 4): the project's engine and onnxruntime give the same predictions.

``backend="onnxruntime"`` exports the Graph to ONNX in memory and runs it there. The engine's stated
tolerance to onnxruntime is max |Δlogit| <= 1e-4 · max |logit| (README "How we know it is right",
tests/test_interop_onnx.py). So the top-1 prediction must be the same for every image whose top-2
logit margin exceeds twice that tolerance; an image with a smaller margin may flip. The negative
control: at least 99% of the images have such a margin, so "equal where it must be" is not vacuous.
Fast suite: the first 500 shipped test images; slow: FP32 on the whole 10,000 and DF-MPC MP2/6 on every
10th of them (the quantized network's check needs no more images than that to meet the 99% control).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from dfmpc import evaluation  # noqa: E402
from dfmpc.cli import main  # noqa: E402
from dfmpc.compare import compare  # noqa: E402
from dfmpc.engine.builders import resnet_cifar  # noqa: E402

REL_TOL = 1e-4          # the engine's tolerance to onnxruntime, relative to max |logit|


@pytest.fixture(scope="module")
def resnet20():
    return evaluation.load_zoo_model("resnet20")


@pytest.fixture(scope="module")
def shipped():
    return evaluation.load_dataset("fashion-mnist")


def _check_same_predictions(graph, x):
    """Logits within the tolerance; top-1 equal wherever the margin exceeds 2 · tolerance (>= 99% of images)."""
    ref = evaluation.logits(graph, x, backend="engine", progress=False)
    got = evaluation.logits(graph, x, backend="onnxruntime", progress=False)
    assert got.shape == ref.shape == (len(x), 10) and got.dtype == np.float32
    tol = REL_TOL * float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
    top2 = np.sort(ref, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * tol
    assert decided.mean() >= 0.99, f"only {decided.mean():.3f} of the images have a margin above 2 * {tol:.2g}"
    np.testing.assert_array_equal(got.argmax(1)[decided], ref.argmax(1)[decided])
    return ref, got


def test_backends_same_predictions_on_500_shipped_images(resnet20, shipped):
    """ResNet-20 on the first 500 shipped test images: same top-1, logits within 1e-4 · max |logit|."""
    x, y = shipped[0][:500], shipped[1][:500]
    ref, got = _check_same_predictions(resnet20, x)
    assert np.array_equal(got.argmax(1), ref.argmax(1))      # measured: no image near a tie here
    acc = evaluation.accuracy(resnet20, x, y, backend="onnxruntime", progress=False, batch_size=128)
    assert acc == np.mean(ref.argmax(1) == y)                 # the engine's accuracy on the same images
    assert acc > 0.85                                          # the trained model, not a constant predictor


@pytest.mark.slow          # the whole shipped set on both backends
def test_backends_same_predictions_on_whole_shipped_set(resnet20, shipped):
    """All 10,000 shipped test images with FP32 ResNet-20, and every 10th of them with its MP2/6 DF-MPC
    output: same top-1 (up to near-ties)."""
    from dfmpc.pipeline import quantize_network
    x = shipped[0]
    _check_same_predictions(resnet20, x)
    q, _ = quantize_network(resnet20, low_bits=2, high_bits=6, recalibration="analytic", progress=False)
    _check_same_predictions(q, np.ascontiguousarray(x[::10]))


def test_backend_batch_size_does_not_change_logits(shipped):
    """onnxruntime logits are the same whatever the batch split (symbolic batch axis of the export)."""
    g = resnet_cifar(8, seed=2)
    x = shipped[0][:37]
    a = evaluation.logits(g, x, batch_size=37, backend="onnxruntime", progress=False)
    b = evaluation.logits(g, x, batch_size=5, backend="onnxruntime", progress=False)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()))


def test_bad_backend_and_input_named():
    g = resnet_cifar(8, seed=2)
    x = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(ValueError, match="backend: expected one of engine, onnxruntime, got 'torch'"):
        evaluation.accuracy(g, x, np.zeros(2, int), backend="torch")
    with pytest.raises(TypeError, match="x: expected a float32"):
        evaluation.logits(g, x.astype(np.float64), backend="onnxruntime", progress=False)


def test_missing_onnxruntime_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    """Without onnxruntime: ImportError naming the extra 'ort' in Python; one line and exit 2 on the CLI."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # `import onnxruntime` now raises ImportError
    g = resnet_cifar(8, seed=2)
    x = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[ort\]"'):
        evaluation.accuracy(g, x, np.zeros(2, int), backend="onnxruntime")
    assert evaluation.accuracy(g, x, g.run(x).argmax(1), progress=False) == 1.0        # the engine still works
    for argv in (["evaluate", "resnet20", "--limit", "5"], ["compare", "resnet20", "--limit", "20"],
                 ["demo", "--limit", "5"]):
        assert main(argv + ["--backend", "onnxruntime"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and ".[ort]" in err and "--backend onnxruntime" in err, err


def test_cli_evaluate_backend_json(capsys):
    """evaluate --backend onnxruntime --json: the same accuracy as the engine, and the backend named."""
    res = {}
    for backend in ("engine", "onnxruntime"):
        assert main(["evaluate", "resnet20", "--limit", "200", "--backend", backend, "--json"]) == 0
        out, err = capsys.readouterr()
        res[backend] = json.loads(out)
        assert res[backend]["backend"] == backend and err == ""
    assert res["engine"]["accuracy"] == res["onnxruntime"]["accuracy"]


def test_compare_backend_pass_through(shipped):
    """compare(..., backend="onnxruntime"): every row's accuracy equals the engine's on the same images."""
    g = resnet_cifar(8, seed=2)
    x, y = shipped[0][:60], shipped[1][:60]
    y = g.run(x).argmax(1)                # labels from the FP32 net: accuracies spread, not all ~10%
    rows = {b: compare(g, x, y, ["rtn", "dfq"], backend=b, progress=False) for b in ("engine", "onnxruntime")}
    assert [r["accuracy"] for r in rows["engine"]] == [r["accuracy"] for r in rows["onnxruntime"]]
    assert rows["engine"][0]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="backend"):
        compare(g, x, y, ["rtn"], backend="ort")
