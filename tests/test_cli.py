"""The `dfmpc` command: JSON output, errors as one line on stderr with a non-zero exit, no partial files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dfmpc
from dfmpc.cli import main
from dfmpc.engine.builders import resnet_cifar


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    path = d / "resnet8.npz"
    dfmpc.save_model(resnet_cifar(8, seed=3), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    path = d / "imgs.npz"
    np.savez(path, x=rng.normal(size=(40, 1, 28, 28)).astype(np.float32), y=rng.integers(0, 10, 40))
    return path


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_evaluate_json(capsys, model, data):
    """evaluate --json prints exactly one JSON object with the accuracy as a fraction."""
    rc, out, err = run(capsys, "evaluate", model, "--data", data, "--json")
    assert rc == 0
    res = json.loads(out)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["n_images"] == 40 and res["seconds"] >= 0


def test_evaluate_shipped_data_limit(capsys, model):
    rc, out, _ = run(capsys, "evaluate", model, "--data", "fashion-mnist", "--limit", 50, "--json")
    assert rc == 0 and json.loads(out)["n_images"] == 50


@pytest.mark.slow          # ~20 s: two full quantize runs (sequential re-calibration on distilled probes)
def test_quantize_writes_model_and_reports(capsys, model, data, tmp_path):
    """quantize writes a loadable model, prints the pairing, and its --json names the mode."""
    out_path = tmp_path / "q.npz"
    rc, out, err = run(capsys, "quantize", model, "--low", 2, "--high", 6, "-o", out_path, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["recalibration"] == "sequential" and res["compensation"] == "dfmpc" and len(res["pairs"]) == 3
    assert res["probes"].startswith("distilled")
    q = dfmpc.load_model(out_path)
    assert len(np.unique(q.node(res["pairs"][0]["low"]).params["W"])) <= 3
    rc, out, _ = run(capsys, "quantize", model, "-o", tmp_path / "q2.onnx")
    assert rc == 0 and "pair" in out and "recalibration=sequential on distilled" in out


def test_quantize_bn_folded_model_says_why(capsys, tmp_path):
    """A model exported with BN folded into the convs quantizes at once (nothing to pair, no probes to
    distil) and the output says why and how to export with BN kept."""
    from test_pipeline_graphs import _bn_folded, every_op_graph
    src = tmp_path / "folded.npz"
    dfmpc.save_model(_bn_folded(every_op_graph()), src)
    rc, out, err = run(capsys, "quantize", src, "-o", tmp_path / "q.npz")
    assert rc == 0, err
    assert "no BatchNormalization node" in out and "export_onnx" in out and "0 pairs" in out
    rc, out, err = run(capsys, "quantize", src, "-o", tmp_path / "q2.npz", "--json")
    assert rc == 0 and json.loads(out)["probes"] is None and json.loads(out)["pairs"] == []


@pytest.mark.slow          # ~13 s
def test_quantize_explicit_pairs(capsys, model, tmp_path):
    """--pair LOW HIGH uses the user's assignment; an impossible pair is refused naming it."""
    rc, out, err = run(capsys, "quantize", model, "--pair", "layers.0.conv1", "layers.0.conv2",
                       "-o", tmp_path / "p.npz", "--json")
    assert rc == 0, err
    assert [(p["low"], p["high"]) for p in json.loads(out)["pairs"]] == [("layers.0.conv1", "layers.0.conv2")]
    rc, _, err = run(capsys, "quantize", model, "--pair", "layers.0.conv2", "layers.1.conv1", "-o", tmp_path / "x.npz")
    assert rc == 2 and "is not a conv -> BN -> ReLU -> conv chain" in err and not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("argv, match", [
    (["evaluate", "missing.onnx"], "no such file"),
    (["evaluate", "{model}", "--data", "missing.npz"], "data: no such file"),
    (["evaluate", "{model}", "--data", "{bad_shape}"], "expects|shape|channels"),
    (["evaluate", "{garbage}"], "garbage|not|invalid|unreadable|parse"),
    (["quantize", "{model}", "-o", "{model}"], "is the input model"),
    (["quantize", "{model}", "--low", "1", "-o", "{out}"], "low_bits: expected an integer bit-width"),
    (["quantize", "{model}", "--high", "17", "-o", "{out}"], "high_bits"),
    (["quantize", "{model}", "--recalibration", "data", "-o", "{out}"], "--calibration-data: required"),
])
def test_errors_one_line_nonzero_no_file(capsys, model, tmp_path, argv, match):
    """Missing file, unreadable model, data not fitting the model, -o equal to input, bits out of range."""
    bad_shape = tmp_path / "bad.npz"
    np.savez(bad_shape, x=np.zeros((4, 3, 28, 28), np.float32), y=np.zeros(4, np.int64))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx file")
    out = tmp_path / "out.npz"
    argv = [a.format(model=model, bad_shape=bad_shape, garbage=garbage, out=out) for a in argv]
    before = model.read_bytes()
    rc, stdout, err = run(capsys, *argv)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("dfmpc ")
    import re
    assert re.search(match, err), err
    assert not out.exists()
    assert model.read_bytes() == before


def test_refuses_to_overwrite_existing_output(capsys, model, tmp_path):
    out = tmp_path / "exists.npz"
    out.write_bytes(b"keep me")
    rc, _, err = run(capsys, "quantize", model, "-o", out)
    assert rc == 2 and "--overwrite" in err and out.read_bytes() == b"keep me"


def test_console_script_installed(model):
    """`python -m dfmpc.cli --help` lists the subcommands (the `dfmpc` entry point calls the same main)."""
    r = subprocess.run([sys.executable, "-m", "dfmpc.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout and "quantize" in r.stdout


@pytest.mark.slow          # ~17 s: every method on the model
def test_compare_json_rows_per_method(capsys, model, data):
    """compare --json: one row per method (FP32 first) with accuracy and quantization time; oracle gets held-out images."""
    rc, out, err = run(capsys, "compare", model, "--data", data, "--methods", "rtn,rtn-channel,dfmpc,oracle",
                       "--calibration-images", 10, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["n_images"] == 30 and res["n_calibration"] == 10
    assert [r["method"] for r in res["results"]] == ["fp32", "rtn", "rtn-channel", "dfmpc", "oracle"]
    for r in res["results"]:
        assert r["error"] is None and 0 <= r["accuracy"] <= 1 and r["seconds"] >= 0
    assert [r["data_free"] for r in res["results"]] == [True, True, True, True, False]


def test_compare_text_table_and_errors(capsys, model, data):
    rc, out, err = run(capsys, "compare", model, "--data", data, "--methods", "rtn,oracle", "--calibration-images", 0)
    assert rc == 0 and "rtn" in out and "refused" in out and "not data-free" in out
    rc, out, err = run(capsys, "compare", model, "--data", data, "--methods", "rtn,gptq")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "--methods" in err and "gptq" in err
    rc, out, err = run(capsys, "compare", model, "--data", data, "--calibration-images", 40)
    assert rc == 2 and "--calibration-images" in err
    rc, out, err = run(capsys, "compare", model, "--data", data, "--low", 1, "--calibration-images", 0)
    assert rc == 2 and "low_bits" in err


def test_diagnose_json_one_record_per_layer(capsys, model, data):
    """diagnose --json: one record per re-calibrated conv with predicted_var, measured_var, ratio; a summary."""
    rc, out, err = run(capsys, "diagnose", model, "--data", data, "--recalibration", "analytic", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["n_images"] == 40 and len(d["layers"]) > 3
    for rec in d["layers"]:
        assert len(rec["predicted_var"]) == len(rec["measured_var"]) and rec["ratio"] > 0
    assert {"median_abs_log_ratio", "max_abs_log_ratio"} <= set(d["summary"])


def test_diagnose_text_and_sequential_probes(capsys, model, data):
    rc, out, err = run(capsys, "diagnose", model, "--data", data, "--recalibration", "sequential",
                       "--probes", "noise", "--probe-images", "8")
    assert rc == 0, err
    assert "sequential on noise (8 images)" in out and "median |log ratio|" in out


def test_probe_images_must_be_positive(capsys, model, data):
    rc, out, err = run(capsys, "diagnose", model, "--data", data, "--probe-images", "0")
    assert rc == 2 and "--probe-images" in err and len(err.strip().splitlines()) == 1


def test_probe_budget_options(capsys, model, data):
    """--probe-iterations / --probe-tolerance reach the distillation; 'off' is accepted, a bad value is
    one line on stderr naming the option."""
    rc, out, err = run(capsys, "diagnose", model, "--data", data, "--probe-images", "2",
                       "--probe-iterations", "2", "--probe-tolerance", "off", "--json")
    assert rc == 0, err
    for bad in ("0", "-1", "nan", "x"):
        rc, out, err = run(capsys, "diagnose", model, "--data", data, "--probe-tolerance", bad)
        assert rc == 2 and "--probe-tolerance" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run(capsys, "diagnose", model, "--data", data, "--probe-iterations", "-1")
    assert rc == 2 and "--probe-iterations" in err and len(err.strip().splitlines()) == 1


def test_probe_views_option(capsys, model, data):
    """--probe-views reaches the sequential pass (4 views give other statistics than 1, and the JSON names
    them); a value outside 1..4 is one line naming the option, before any distillation."""
    got = {}
    for views in ("1", "4"):
        rc, out, err = run(capsys, "diagnose", model, "--data", data, "--probe-images", "2", "--probe-iterations",
                           "2", "--probe-tolerance", "off", "--probe-views", views, "--json")
        assert rc == 0, err
        got[views] = [r["predicted_var"] for r in json.loads(out)["layers"]]
    assert got["1"] != got["4"]
    labels = {}
    for kind in ("distilled", "noise"):          # the default: 4 views for distilled probes, 1 for noise (S.5)
        rc, out, err = run(capsys, "diagnose", model, "--data", data, "--probes", kind, "--probe-images", "2",
                           "--probe-iterations", "2", "--probe-tolerance", "off", "--json")
        assert rc == 0, err
        res = json.loads(out)
        labels[kind] = res["probes"]
        if kind == "distilled":
            assert [r["predicted_var"] for r in res["layers"]] == got["4"]
    assert labels["distilled"].endswith(", 4 mirrored views each for the variance") and "views" not in labels["noise"]
    for bad in ("0", "5"):
        rc, out, err = run(capsys, "quantize", model, "-o", data.parent / "never.npz", "--probe-views", bad)
        assert rc == 2 and "--probe-views" in err and len(err.strip().splitlines()) == 1
        assert not (data.parent / "never.npz").exists()


def test_probe_view_kind_option(capsys, model, data):
    """--probe-view-kind shifts reaches the sequential pass (other statistics than the default mirrors, and the
    JSON names them); an unknown kind is refused by argparse, naming the option, and nothing is written."""
    got, labels = {}, {}
    for kind in ("shifts", "mirrors"):
        rc, out, err = run(capsys, "diagnose", model, "--data", data, "--probe-images", "2", "--probe-iterations",
                           "2", "--probe-tolerance", "off", "--probe-view-kind", kind, "--json")
        assert rc == 0, err
        res = json.loads(out)
        got[kind], labels[kind] = [r["predicted_var"] for r in res["layers"]], res["probes"]
    assert got["shifts"] != got["mirrors"]
    assert labels["mirrors"].endswith(", 4 mirrored views each for the variance")
    assert labels["shifts"].endswith(", 4 shifted views each for the variance")
    with pytest.raises(SystemExit) as e:                      # argparse's own refusal: usage, then the error
        run(capsys, "quantize", model, "-o", data.parent / "never.npz", "--probe-view-kind", "rolls")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--probe-view-kind" in err and "rolls" in err
    assert not (data.parent / "never.npz").exists()


@pytest.mark.parametrize("option, values, bad", [("objective", ("absolute", "relative"), "sigma"),
                                                 ("optimizer", ("adam", "lbfgs"), "sgd")])
def test_probe_options(capsys, model, data, option, values, bad):
    """--probe-objective and --probe-optimizer reach the distillation (each pair of values gives different
    probes, so different re-calibrated statistics); an unknown value is refused by argparse, naming the
    option."""
    got = {}
    for value in values:
        rc, out, err = run(capsys, "diagnose", model, "--data", data, "--probe-images", "2", "--probe-iterations",
                           "2", "--probe-tolerance", "off", f"--probe-{option}", value, "--json")
        assert rc == 0, err
        got[value] = [r["predicted_var"] for r in json.loads(out)["layers"]]
    assert got[values[0]] != got[values[1]]
    with pytest.raises(SystemExit) as e:                      # argparse's own refusal: usage, then the error
        run(capsys, "diagnose", model, "--data", data, f"--probe-{option}", bad)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--probe-{option}" in err and bad in err

