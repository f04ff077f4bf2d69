"""The reference vectors (dfmpc.vectors, reference/dfmpc/vectors/): regenerated, they match the shipped copy.

A port is checked against the shipped copy (PORTING.md); these tests make sure the copy is what
dfmpc computes today (it cannot go stale), that the manifest describes every array, and that the
comparison is not vacuous (negative controls: a perturbed value, a flipped rounding tie, a float32
TWN threshold are all reported).
"""

import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from dfmpc import vectors as V

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped():
    return V.load()


def _check_against(shipped, fresh):
    manifest, data = shipped
    by_name = {e["name"]: e for e in manifest["entries"]}
    fresh_manifest = V.manifest_of(fresh)
    problems = []
    for v, e in zip(fresh, fresh_manifest["entries"]):
        assert v.name in by_name, f"{v.name} is not in the shipped copy: run `dfmpc vectors -o reference/dfmpc/vectors --overwrite`"
        assert json.loads(json.dumps(e)) == by_name[v.name], f"{v.name}: manifest entry changed"
        problems += V.compare(e, data[v.name]["inputs"], v.inputs)
        problems += V.compare(e, data[v.name]["outputs"], v.outputs)
    return problems


def test_array_vectors_regenerate_to_the_shipped_copy(shipped):
    """Every array-level step (TWN Eq. (3)-(4), DoReFa Eq. (6), absorb_scale, Eq. (22), Eq. (27), folding vs
    Eq. (7), the three re-calibrations, the pair forward) regenerates within its stated tolerance."""
    fresh = V.array_vectors()
    assert len(fresh) == 10
    assert _check_against(shipped, fresh) == []


@pytest.mark.slow
def test_cli_regenerates_the_whole_shipped_copy(shipped, tmp_path):
    """`dfmpc vectors -o DIR --json` writes every entry, zoo ResNet-20 included, and it matches the shipped copy."""
    out = tmp_path / "vectors"
    r = subprocess.run([sys.executable, "-m", "dfmpc", "vectors", "-o", str(out), "--json"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    manifest, data = shipped
    assert doc["entries"] == [e["name"] for e in manifest["entries"]]
    fresh_manifest, fresh = V.load(out)
    assert fresh_manifest == manifest
    problems = []
    for e in manifest["entries"]:
        for part in ("inputs", "outputs"):
            problems += V.compare(e, data[e["name"]][part], fresh[e["name"]][part])
    assert problems == []


def test_docstring_examples():
    """The module's examples run: Eq. (3) on the shipped TWN vector, Eq. (27) without the c >= 0 clip is reported."""
    import doctest
    result = doctest.testmod(V, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 8


def test_manifest_describes_every_array(shipped):
    manifest, data = shipped
    assert manifest["format_version"] == V.FORMAT_VERSION
    names = [e["name"] for e in manifest["entries"]]
    assert {"twn", "dorefa", "absorb_scale", "objective", "closed_form", "folding", "recalibration_absorb",
            "recalibration_analytic", "recalibration_sequential", "pair_forward", "resnet20_fp32",
            "resnet20_absorb", "resnet20_analytic", "resnet20_sequential"} == set(names)
    files = sorted(p.name for p in Path(V.shipped_dir()).iterdir())
    assert files == sorted([e["file"] for e in manifest["entries"]] + ["manifest.json"])
    for e in manifest["entries"]:
        assert e["function"] and e["equation"] and e["description"] and e["dtype"] in ("float64", "float32")
        assert set(e["tolerance"]) == {"rtol", "atol"}
        assert "seed" in e
        for part in ("inputs", "outputs"):
            assert set(e[part]) == set(data[e["name"]][part]), (e["name"], part)
            for k, spec in e[part].items():
                a = data[e["name"]][part][k]
                assert spec == {"shape": list(a.shape), "dtype": str(a.dtype)}, (e["name"], k)
        assert set(e["tolerance_overrides"]) <= set(e["outputs"])
        for fn in e["function"].replace(";", ",").split(","):       # every named dfmpc function exists
            fn = fn.strip().split("(")[0]
            if fn.startswith("dfmpc."):
                mod, _, attr = fn.rpartition(".")
                obj = importlib.import_module(mod) if mod != "dfmpc.Graph" else importlib.import_module("dfmpc").Graph
                assert hasattr(obj, attr), fn


def test_shipped_copy_is_small_and_package_data():
    size = sum(p.stat().st_size for p in Path(V.shipped_dir()).iterdir())
    assert size < 1_000_000, size
    pkg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dfmpc"]
    assert {"vectors/*.npz", "vectors/*.json"} <= set(pkg)


def test_negative_control_a_perturbed_value_is_reported(shipped):
    """Negative control: in every entry, one output entry moved just outside its tolerance is reported, once."""
    manifest, data = shipped
    for e in manifest["entries"]:
        expected = data[e["name"]]["outputs"]
        key = next(k for k, a in expected.items() if a.dtype.kind == "f" and a.size)
        tol = e["tolerance_overrides"].get(key, e["tolerance"])
        bad = {k: a.copy() for k, a in expected.items()}
        flat = bad[key].reshape(-1)
        flat[-1] += 2 * (tol["atol"] + tol["rtol"] * abs(flat[-1])) + 1e-9 * max(1.0, abs(flat[-1]))
        bad[key] = flat.reshape(expected[key].shape)
        assert V.compare(e, expected, expected) == []
        problems = V.compare(e, expected, bad)
        assert len(problems) == 1 and f"{e['name']}/{key}: 1 of" in problems[0], problems
    e = manifest["entries"][0]
    assert "missing" in V.compare(e, {"a": np.zeros(2)}, {})[0]
    assert "shape" in V.compare(e, {"a": np.zeros(2)}, {"a": np.zeros(3)})[0]


def test_negative_control_rounding_ties_are_detected(shipped):
    """Eq. (6) ties: rounding half away from zero (not half to even) changes the DoReFa grid, and the vectors say so;
    Eq. (3): a TWN threshold test |W| >= Delta (not >) keeps the entries exactly on Delta = 7, and the vectors say so."""
    manifest, data = shipped
    e = next(e for e in manifest["entries"] if e["name"] == "dorefa")
    W = data["dorefa"]["inputs"]["tie_k2/W"]
    n, s = 3.0, np.abs(W).max()
    half_away = lambda t: np.sign(t) * np.floor(np.abs(t) + 0.5)
    grid = 2.0 / n * half_away(n * (W / (2.0 * s) + 0.5)) - 1.0
    assert V.compare(e, {"tie_k2/W_grid": data["dorefa"]["outputs"]["tie_k2/W_grid"]}, {"tie_k2/W_grid": grid})
    grid_even = 2.0 / n * np.round(n * (W / (2.0 * s) + 0.5)) - 1.0
    assert V.compare(e, {"tie_k2/W_grid": data["dorefa"]["outputs"]["tie_k2/W_grid"]}, {"tie_k2/W_grid": grid_even}) == []

    e = next(e for e in manifest["entries"] if e["name"] == "twn")
    W = data["twn"]["inputs"]["tie/W"]
    delta = 0.7 * np.abs(W).mean()
    expected = {"tie/W_hat": data["twn"]["outputs"]["tie/W_hat"]}
    assert V.compare(e, expected, {"tie/W_hat": np.where(np.abs(W) >= delta, np.sign(W), 0.0)})
    assert V.compare(e, expected, {"tie/W_hat": np.where(np.abs(W) > delta, np.sign(W), 0.0)}) == []


def test_cli_refuses_to_overwrite_and_writes_nothing_on_error(tmp_path):
    from dfmpc.cli import main
    out = tmp_path / "v"
    assert main(["vectors", "-o", str(out), "--no-zoo", "--json"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert len(before) == 11
    assert main(["vectors", "-o", str(out), "--no-zoo"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(["vectors", "-o", str(tmp_path / "missing" / "v"), "--no-zoo"]) == 2
    assert main(["vectors", "-o", str(out), "--no-zoo", "--overwrite", "--json"]) == 0


def test_pair_recalibration_api_matches_the_vectors(shipped):
    """The top-level pair re-calibration (issue 14 item 5), where present, gives the re-calibration vectors'
    BN (derivation 10 R.3-R.4, derivation 15 S.1-S.2)."""
    import dfmpc
    recalibrate_bn = getattr(dfmpc, "recalibrate_bn", None)
    if recalibrate_bn is None:
        pytest.skip("dfmpc.recalibrate_bn not available")
    manifest, data = shipped
    for mode in ("absorb", "analytic", "sequential"):
        e = next(e for e in manifest["entries"] if e["name"] == f"recalibration_{mode}")
        i = data[e["name"]]["inputs"]
        bn = dfmpc.BatchNorm(gamma=i["bn/gamma"], beta=i["bn/beta"], mean=i["bn/mean"], var=i["bn/var"],
                             eps=float(i["bn/eps"]))
        kw = {"X_fp": i["X_fp"], "X_q": i["X_q"], "padding": 1} if mode == "sequential" else \
             {"in_mean": i["in_mean"], "in_var": i["in_var"]} if mode == "analytic" else {}
        got = recalibrate_bn(bn, i["W"], i["W_q"], mode, **kw)
        out = data[e["name"]]["outputs"]
        assert V.compare(e, {k: out[k] for k in ("bn_hat/mean", "bn_hat/var")},
                         {"bn_hat/mean": got.mean, "bn_hat/var": got.var}) == []
