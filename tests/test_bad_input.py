"""Bad input gets one clear line naming the argument (or layer) and what was expected; nothing is written.

Every reproduction of issue 11 ("Bad input that still gets a traceback or a wrong answer") is pinned
here: on the command line (exit status 2, one line on stderr, no output file, input unchanged) and
in the Python API (a ValueError / OSError naming the argument, the layer or the file). The bounded
fuzz test at the end flips and truncates bytes of a small .onnx and .npz model: each either loads or
raises ValueError / OSError, never another exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import dfmpc
from dfmpc.cli import main
from dfmpc.compare import compare
from dfmpc.engine.builders import resnet_cifar
from dfmpc.engine.graph import Graph, Node
from dfmpc.evaluation import accuracy, load_dataset

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")     # no leaked RuntimeWarning anywhere here


# ----------------------------------------------------------------------------- fixtures
def tiny_graph(seed: int = 0) -> Graph:
    """conv -> BN -> ReLU -> GAP -> flatten -> Gemm on (1, 6, 6) images, 3 classes: a few kB on disk."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)            # noqa: E731
    nodes = [Node("conv", "Conv", ["x"], ["c"], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1)}, {"W": f(4, 1, 3, 3)}),
             Node("bn", "BatchNormalization", ["c"], ["b"], {"epsilon": 1e-5},
                  {"gamma": f(4), "beta": f(4), "mean": f(4), "var": np.abs(f(4)) + 0.5}),
             Node("relu", "Relu", ["b"], ["r"]),
             Node("gap", "GlobalAveragePool", ["r"], ["p"]),
             Node("flat", "Flatten", ["p"], ["v"], {"axis": 1}),
             Node("fc", "Gemm", ["v"], ["y"], {}, {"W": f(3, 4), "B": f(3)})]
    return Graph(nodes, ["x"], ["y"], {"x": (1, 6, 6)}, name="tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small ResNet (.npz), broken copies of it, and image sets good and bad."""
    d = tmp_path_factory.mktemp("bad_input")
    g = resnet_cifar(8, seed=3)
    paths = {"model": d / "resnet8.npz", "model_onnx": d / "resnet8.onnx"}
    dfmpc.save_model(g, paths["model"])
    dfmpc.save_model(g, paths["model_onnx"])
    for key, node, pname, idx, value in [("nan", "stem.0", "W", (0, 0, 0, 0), np.nan),
                                         ("inf", "layers.1.conv2", "W", (1, 2, 0, 0), np.inf),
                                         ("negvar", "layers.0.bn1", "var", (3,), -0.25)]:
        arr = g.node(node).params[pname].copy()
        arr[idx] = value
        paths[key] = d / f"{key}.npz"
        dfmpc.save_model(g.with_params({node: {pname: arr}}), paths[key])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 1, 28, 28)).astype(np.float32)
    for key, xs, ys in [("good", x, rng.integers(0, 10, 20)), ("empty", x[:0], np.zeros(0, np.int64)),
                        ("negative", x, np.where(np.arange(20) == 7, -3, rng.integers(0, 10, 20))),
                        ("out_of_range", x, np.where(np.arange(20) == 5, 10, rng.integers(0, 10, 20)))]:
        paths[key] = d / f"{key}_images.npz"
        np.savez(paths[key], x=xs, y=ys)
    paths["objects"] = d / "objects.npz"
    np.savez(paths["objects"], x=np.array([None, 1.0], dtype=object), y=np.zeros(2, np.int64))
    paths["random"] = d / "random.npz"
    paths["random"].write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    # an ONNX initializer of a data type ONNX does not know
    m = onnx.load(paths["model_onnx"])
    m.graph.initializer[0].data_type = 30
    paths["dtype30"] = d / "dtype30.onnx"
    onnx.save(m, paths["dtype30"])
    paths["dtype30_init"] = m.graph.initializer[0].name
    return paths


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _inputs_snapshot(files):
    return {k: p.read_bytes() for k, p in files.items() if isinstance(p, Path) and p.exists()}


# ----------------------------------------------------------------------------- the command line
CLI_CASES = [
    # issue 11: dfmpc evaluate model --data empty.npz gave a ZeroDivisionError traceback
    (["evaluate", "{model}", "--data", "{empty}"], r"data: '.*empty_images\.npz' holds no images .*expected at least one"),
    # --batch-size -5 printed top-1 0.00% with exit 0; --batch-size 0 "range() arg 3 must not be zero"
    (["evaluate", "{model}", "--data", "{good}", "--batch-size", "-5"], r"--batch-size: expected a positive number .* got -5"),
    (["evaluate", "{model}", "--data", "{good}", "--batch-size", "0"], r"--batch-size: expected a positive number .* got 0"),
    # labels negative / out of range were accepted silently (0.00%, exit 0)
    (["evaluate", "{model}", "--data", "{negative}"], r"data: 'y' must hold class labels >= 0, got -3"),
    (["evaluate", "{model}", "--data", "{out_of_range}"], r"y: expected class labels below 10 .*got 10"),
    # NaN/Inf weights, negative running variance: evaluate printed 0.00%, compare refused every method,
    # quantize refused without naming the layer
    (["evaluate", "{nan}", "--data", "{good}"], r"node 'stem\.0' \(Conv\): parameter 'W' has 1 NaN/Inf entry"),
    (["evaluate", "{inf}", "--data", "{good}"], r"node 'layers\.1\.conv2' \(Conv\): parameter 'W' has 1 NaN/Inf entry"),
    (["evaluate", "{negvar}", "--data", "{good}"],
     r"node 'layers\.0\.bn1' \(BatchNormalization\): running variance 'var' has 1 negative entry .*expected var >= 0"),
    (["compare", "{nan}", "--data", "{good}", "--calibration-images", "0"], r"node 'stem\.0' \(Conv\): parameter 'W'"),
    (["compare", "{negvar}", "--data", "{good}", "--calibration-images", "0", "--methods", "dfq,rtn"],
     r"node 'layers\.0\.bn1' \(BatchNormalization\): running variance"),
    (["quantize", "{nan}", "-o", "{out}"], r"node 'stem\.0' \(Conv\): parameter 'W' has 1 NaN/Inf"),
    (["quantize", "{inf}", "-o", "{out}"], r"node 'layers\.1\.conv2' \(Conv\)"),
    (["quantize", "{negvar}", "-o", "{out}"], r"node 'layers\.0\.bn1' \(BatchNormalization\): running variance"),
    # an ONNX initializer with an unknown data_type gave "error: 30"
    (["evaluate", "{dtype30}", "--data", "{good}"],
     r"dtype30\.onnx'.*initializer '{dtype30_init}': data_type 30 is not a known ONNX tensor type"),
    # corrupt / random-bytes / pickled files: never a traceback, never the advice to use allow_pickle
    (["evaluate", "{random}"], r"random\.npz' is not a readable dfmpc \.npz graph: not a zip archive"),
    (["evaluate", "{model}", "--data", "{random}"], r"data: '.*random\.npz' is not a readable \.npz file"),
    (["evaluate", "{model}", "--data", "{objects}"], r"objects\.npz' is not a readable \.npz file: it holds pickled"),
    # quantize --low 9 --high 6 was accepted and labelled "MP9/6"
    (["quantize", "{model}", "--low", "9", "--high", "6", "-o", "{out}"], r"--low/--high: expected --low <= --high.*--low 9 --high 6"),
    (["compare", "{model}", "--data", "{good}", "--low", "9", "--high", "6"], r"--low/--high: expected --low <= --high"),
    (["demo", "--low", "7", "--high", "3", "--limit", "10"], r"--low/--high: expected --low <= --high"),
    # -o /proc/x.onnx named the temporary file in its error
    (["quantize", "{model}", "-o", "/proc/dfmpc_test_x.onnx"], r"cannot write '/proc/dfmpc_test_x\.onnx'"),
    (["quantize", "{model}", "-o", "{missing_dir}/x.npz"], r"-o/--output: the directory of .* does not exist"),
    # an impossible --pair is the user's error, not a refusal of every method with exit 0
    (["compare", "{model}", "--data", "{good}", "--calibration-images", "0", "--methods", "rtn", "--pair", "nope", "layers.0.conv2"],
     r"pairs: \('nope', 'layers\.0\.conv2'\) is not a conv -> BN -> ReLU -> conv chain"),
    (["quantize", "{model}", "--recalibration", "data", "--calibration-data", "{good}", "--calibration-images", "0",
      "-o", "{out}"], r"--calibration-images: expected a positive number of images, got 0"),
]


@pytest.mark.parametrize("argv, match", CLI_CASES, ids=[" ".join(a[:1] + [m[:30]]) for a, m in CLI_CASES])
def test_cli_bad_input_one_line_exit_2_nothing_written(capsys, files, tmp_path, argv, match):
    """Each bad input: exit 2, nothing on stdout, one line on stderr naming the argument / layer / file, no output
    file, no temp file left, every input byte-identical."""
    out = tmp_path / "out.npz"
    fmt = {**{k: v for k, v in files.items()}, "out": out, "missing_dir": tmp_path / "no_such_dir"}
    argv = [a.format(**fmt) for a in argv]
    match = match.format(**fmt)
    before = _inputs_snapshot(files)
    rc, stdout, err = run(capsys, *argv)
    assert rc == 2, (stdout, err)
    assert stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"dfmpc {argv[0]}: error: "), err
    assert re.search(match, err), err
    assert "allow_pickle" not in err and ".tmp-" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert _inputs_snapshot(files) == before


def test_cli_good_input_still_works(capsys, files):
    """Negative control for the cases above: the same model and images evaluate with exit 0."""
    rc, out, err = run(capsys, "evaluate", files["model"], "--data", files["good"], "--batch-size", 7, "--json")
    assert rc == 0, err
    res = json.loads(out)
    rc, out, err = run(capsys, "evaluate", files["model"], "--data", files["good"], "--json")
    assert rc == 0 and json.loads(out)["accuracy"] == res["accuracy"]     # the batch size changes nothing


@pytest.mark.parametrize("exc", [KeyError("bug"), TypeError("bug"), AttributeError("bug"), ZeroDivisionError("bug")])
def test_cli_shows_bugs_as_tracebacks(monkeypatch, files, exc):
    """Only ValueError and OSError are user errors; anything else is a bug and must propagate (a traceback)."""
    import dfmpc.cli as cli

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(cli, "cmd_evaluate", boom)
    with pytest.raises(type(exc)):
        cli.main(["evaluate", str(files["model"])])


@pytest.mark.parametrize("exc, rc", [(ValueError("x: bad"), 2), (FileNotFoundError("no such file"), 2),
                                     (PermissionError("denied"), 2)])
def test_cli_user_errors_are_value_and_os_errors(monkeypatch, capsys, files, exc, rc):
    import dfmpc.cli as cli

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(cli, "cmd_evaluate", boom)
    assert cli.main(["evaluate", str(files["model"])]) == rc
    assert capsys.readouterr().err == f"dfmpc evaluate: error: {exc}\n"


def test_cli_error_class_removed():
    """CliError was never raised: it is gone."""
    import dfmpc.cli as cli
    assert not hasattr(cli, "CliError")


def test_evaluate_help_explains_limit_batch_size_json(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "first N images only" in text
    assert "images per call of the engine" in text and "not the result" in text
    assert "print one JSON object" in text


# ----------------------------------------------------------------------------- the Python API
def test_accuracy_refuses_bad_input():
    g = tiny_graph()
    x = np.random.default_rng(0).normal(size=(5, 1, 6, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])
    assert 0.0 <= accuracy(g, x, y) <= 1.0
    for kwargs, match in [(dict(x=x[:0], y=y[:0]), r"^x: expected at least one image"),
                          (dict(batch_size=0), r"^batch_size: expected a positive integer, got 0"),
                          (dict(batch_size=-5), r"^batch_size: expected a positive integer, got -5"),
                          (dict(batch_size=2.5), r"^batch_size: expected a positive integer"),
                          (dict(y=np.array([0, 1, -1, 1, 0])), r"^y: expected class labels >= 0, got -1"),
                          (dict(y=np.array([0, 1, 3, 1, 0])), r"^y: expected class labels below 3 .* got 3"),
                          (dict(y=np.array([0.0, 1, 2, 1, 0])), r"^y: expected integer class labels")]:
        args = {"x": x, "y": y, **kwargs}
        with pytest.raises(ValueError, match=match):
            accuracy(g, args.pop("x"), args.pop("y"), **args)


@pytest.mark.parametrize("pname, value, match", [
    ("W", np.nan, r"model: node 'conv' \(Conv\): parameter 'W' has 1 NaN/Inf entry; expected finite values"),
    ("W", -np.inf, r"model: node 'conv' \(Conv\): parameter 'W' has 1 NaN/Inf entry"),
    ("var", -1.0, r"model: node 'bn' \(BatchNormalization\): running variance 'var' has 1 negative entry \(min -1\)"),
])
def test_evaluate_and_compare_refuse_non_finite_weights_and_negative_variance(pname, value, match):
    """accuracy() and compare() refuse as quantize does, naming the node; no RuntimeWarning leaks."""
    g = tiny_graph()
    node = "conv" if pname == "W" else "bn"
    arr = g.node(node).params[pname].copy()
    arr.flat[1] = value
    bad = g.with_params({node: {pname: arr}})
    x = np.zeros((4, 1, 6, 6), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match=match):
        accuracy(bad, x, y)
    with pytest.raises(ValueError, match=match):
        compare(bad, x, y, ["rtn", "dfq"], 2, 6)
    with pytest.raises(ValueError, match=match.replace("model:", "graph:")):
        dfmpc.baselines.dfq.dfq(bad, 2, 6)


def test_compare_refuses_low_above_high():
    g = tiny_graph()
    with pytest.raises(ValueError, match=r"^low_bits: expected low_bits <= high_bits.*low_bits=6, high_bits=4"):
        compare(g, np.zeros((2, 1, 6, 6), np.float32), np.zeros(2, np.int64), ["rtn"], 6, 4)


def test_load_dataset_refuses_empty_negative_and_unreadable(files):
    with pytest.raises(ValueError, match="holds no images"):
        load_dataset(str(files["empty"]))
    with pytest.raises(ValueError, match=r"'y' must hold class labels >= 0"):
        load_dataset(str(files["negative"]))
    for key in ("random", "objects"):
        with pytest.raises(ValueError, match="is not a readable .npz file") as info:
            load_dataset(str(files[key]))
        assert "allow_pickle" not in str(info.value)


def test_onnx_unknown_data_type_names_file_and_initializer(files):
    """Was a bare KeyError: 30."""
    with pytest.raises(ValueError, match=rf"dtype30\.onnx'.*initializer '{re.escape(files['dtype30_init'])}': "
                                         r"data_type 30 is not a known ONNX tensor type"):
        dfmpc.load_model(files["dtype30"])


def _rezip(src: Path, dst: Path, member: str, edit) -> None:
    """Copy the archive ``src`` to ``dst`` with ``edit(bytes)`` applied to one member (CRCs recomputed)."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[member] = edit(members[member])
    with zipfile.ZipFile(dst, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)


def test_corrupt_npz_models_are_value_errors_naming_the_file(tmp_path):
    """The two tracebacks of issue 11 (tokenize.TokenError, NotImplementedError: zip file version) and
    random bytes / pickled data: each a ValueError naming the file, never the advice to use allow_pickle."""
    good = tmp_path / "tiny.npz"
    dfmpc.save_model(tiny_graph(), good)
    data = good.read_bytes()
    cases = {}
    # a broken .npy header: numpy's header parser raises tokenize.TokenError
    cases["header"] = tmp_path / "header.npz"
    _rezip(good, cases["header"], "p0/W.npy", lambda b: b.replace(b"}", b"(", 1))
    # the "version needed to extract" of a central-directory entry: zipfile raises NotImplementedError
    b = bytearray(data)
    i = b.find(b"PK\x01\x02")
    b[i + 6:i + 8] = struct.pack("<H", 0x00FF)
    cases["zip_version"] = tmp_path / "zip_version.npz"
    cases["zip_version"].write_bytes(bytes(b))
    cases["random"] = tmp_path / "random.npz"
    cases["random"].write_bytes(np.random.default_rng(2).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    cases["pickled"] = tmp_path / "pickled.npz"
    _rezip(good, cases["pickled"], "p0/W.npy", lambda b: _npy_bytes(np.array([{"a": 1}], dtype=object)))
    cases["json"] = tmp_path / "json.npz"
    _rezip(good, cases["json"], "__graph__.npy", lambda b: _npy_bytes(np.array('{"format": "dfmpc-graph", "version": 1, "nodes": 3}')))
    cases["empty"] = tmp_path / "empty.npz"
    cases["empty"].write_bytes(b"")
    for name, path in cases.items():
        with pytest.raises(ValueError, match=rf"^'{re.escape(str(path))}' is not a readable dfmpc \.npz graph") as info:
            dfmpc.load_model(path)
        assert "allow_pickle" not in str(info.value), name
    # the originals of the first two, to show the cases hit what the issue saw
    import tokenize
    with pytest.raises(tokenize.TokenError):
        with np.load(cases["header"]) as z:
            z["p0/W"]
    with pytest.raises(NotImplementedError):
        with np.load(cases["zip_version"]) as z:
            [z[k] for k in z.files]


def _npy_bytes(arr) -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_write_errors_name_the_users_path_not_the_temp_file(tmp_path):
    """-o /proc/x.onnx named '/proc/.tmp-....onnx'."""
    g = tiny_graph()
    for path in ("/proc/dfmpc_test_x.onnx", "/proc/dfmpc_test_x.npz"):
        with pytest.raises(OSError) as info:
            dfmpc.save_model(g, path)
        assert str(info.value).startswith(f"cannot write '{path}'") and ".tmp-" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dfmpc.save_model(g, tmp_path / "missing" / "x.npz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(8,), (2, 2, 2, 2, 2)])
def test_ternary_refuses_1d_and_5d(shape):
    with pytest.raises(ValueError, match=r"^W: expected OIHW conv \(4-D\) or \(out, in\) Gemm \(2-D\) weights"):
        dfmpc.ternary(np.ones(shape))


def test_compensation_refuses_2d_weights():
    """compensation_coefficients / quadratic_coefficients / data_free_loss need OIHW W (conv -> BN -> ReLU -> conv)."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 6))
    bn = dfmpc.BatchNorm(gamma=np.ones(4), beta=np.zeros(4), mean=np.zeros(4), var=np.ones(4))
    W_hat = dfmpc.ternary(W)[0]
    for f in (dfmpc.compensation_coefficients, dfmpc.quadratic_coefficients):
        with pytest.raises(ValueError, match=r"^W: expected OIHW conv weights \(4-D\) of layer l, got shape \(4, 6\)"):
            f(W, W_hat, bn, bn)
    with pytest.raises(ValueError, match=r"^W: expected OIHW conv weights \(4-D\)"):
        dfmpc.data_free_loss(np.ones(4), W, W_hat, bn, bn)
    # the same weights as 1x1 convs are accepted (negative control)
    assert dfmpc.compensation_coefficients(W[..., None, None], W_hat[..., None, None], bn, bn).shape == (4,)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64, np.float64])
def test_dtype_rule_math_in_float64(dtype):
    """The math computes in float64 whatever the input dtype: the result is float64 and equals the float64 result."""
    rng = np.random.default_rng(0)
    W = (rng.normal(size=(4, 3, 3, 3)) * 4).astype(dtype)
    W64 = W.astype(np.float64)
    bn = dfmpc.BatchNorm(gamma=rng.uniform(0.5, 1.5, 4).astype(dtype if dtype != np.int64 else np.float64),
                         beta=np.zeros(4), mean=np.zeros(4), var=np.ones(4))
    assert bn.gamma.dtype == np.float64
    W_hat, alpha, _ = dfmpc.ternary(W)
    assert W_hat.dtype == np.float64
    c = dfmpc.compensation_coefficients(W, W_hat, bn, dfmpc.absorb_scale(bn, alpha))
    c64 = dfmpc.compensation_coefficients(W64, dfmpc.ternary(W64)[0], bn, dfmpc.absorb_scale(bn, dfmpc.ternary(W64)[1]))
    assert c.dtype == np.float64
    np.testing.assert_array_equal(c, c64)
    assert dfmpc.scale_input_channels(W, np.ones(3)).dtype == np.float64


def test_quadratic_coefficients_and_closed_form_exported_and_listed():
    from dfmpc import compensation
    assert dfmpc.quadratic_coefficients is compensation.quadratic_coefficients
    assert dfmpc.closed_form is compensation.closed_form
    assert {"quadratic_coefficients", "closed_form"} <= set(dfmpc.__all__)
    assert "`dfmpc.quadratic_coefficients(" in README and "`dfmpc.closed_form(den, num)`" in README


# ----------------------------------------------------------------------------- README
def test_readme_dtypes_paragraph():
    block = re.search(r"\*\*Dtypes\.\*\*(.*?)\n\n", README, re.S).group(1)
    assert "float64" in block and "float32" in block and "engine" in block


def test_readme_loading_snippet_can_be_pasted_twice(tmp_path, monkeypatch):
    """'Loading, running and exporting a model' ran once, then failed with FileExistsError."""
    code = re.search(r"## Loading, running and exporting a model.*?```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        env = {}
        exec(compile(code, "README loading snippet", "exec"), env)
        assert env["logits"].shape == (1000, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.npz", "resnet20.onnx"]


@pytest.mark.slow          # ~15-25 s: a full `dfmpc quantize` of a zoo model
def test_readme_pair_example_uses_names_the_command_prints(capsys, tmp_path):
    """The README's --pair example names nodes as `dfmpc quantize` prints them (zoo models: ONNX-style names)."""
    line = next(ln for ln in README.splitlines() if ln.startswith("dfmpc quantize") and "--pair" in ln)
    argv = line.split("#")[0].split()[1:]
    model = argv[1]
    low, high = argv[argv.index("--pair") + 1:argv.index("--pair") + 3]
    from dfmpc.evaluation import load_zoo_model
    printed = dfmpc.find_pairs(load_zoo_model(model)).describe(2, 6)
    assert re.search(rf"pair\s+{re.escape(low)}\s.*->\s+{re.escape(high)}\s", printed), printed
    out = tmp_path / "pair.npz"
    argv[argv.index("-o") + 1] = str(out)
    rc, stdout, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    assert [(p["low"], p["high"]) for p in json.loads(stdout)["pairs"]] == [(low, high)]


def test_no_citation_of_a_missing_design_document():
    """DESIGN.md is not part of the repository: nothing may cite it."""
    assert not (ROOT / "DESIGN.md").exists()
    offenders = []
    for sub in ("reference", "benchmarks", "data_free_derivations", "scripts", "notebooks", "docs"):
        for p in (ROOT / sub).rglob("*"):
            if p.suffix in (".py", ".md", ".ipynb") and "DESIGN.md" in p.read_text():
                offenders.append(str(p.relative_to(ROOT)))
    if "DESIGN.md" in README:
        offenders.append("README.md")
    assert offenders == []


# ----------------------------------------------------------------------------- bounded fuzzing
@contextlib.contextmanager
def _hang_guard(seconds: int):
    """Fail (do not hang) if one load takes longer than ``seconds``: a hang guard, not a speed budget."""
    def on_alarm(signum, frame):
        raise AssertionError(f"loading a fuzzed file did not finish within {seconds} s (hang)")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    g = tiny_graph()
    out = {}
    for suffix in (".onnx", ".npz"):
        path = d / f"tiny{suffix}"
        dfmpc.save_model(g, path)
        out[suffix] = (path.read_bytes(), d / f"fuzzed{suffix}")
    return out


@st.composite
def mutations(draw, n):
    """Truncate to a random length, or overwrite 1-4 random bytes with random values."""
    if draw(st.booleans()):
        return ("truncate", draw(st.integers(0, n - 1)))
    return ("flip", draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=4)))


def _mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[:arg]
    b = bytearray(data)
    for pos, val in arg:
        b[pos] = val
    return bytes(b)


@pytest.mark.parametrize("suffix", [".onnx", ".npz"])
@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_model_files_load_or_raise_value_or_os_error(fuzz_sources, suffix, data):
    """Byte flips and truncations of a small model: either it loads, or ValueError / OSError naming the
    file; never another exception, never a hang, never allow_pickle advice."""
    original, path = fuzz_sources[suffix]
    mutation = data.draw(mutations(len(original)))
    path.write_bytes(_mutate(original, mutation))
    with _hang_guard(120), warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            g = dfmpc.load_model(path)
        except (ValueError, OSError) as exc:
            assert str(path) in str(exc) and "allow_pickle" not in str(exc), str(exc)
        else:
            assert isinstance(g, Graph)
