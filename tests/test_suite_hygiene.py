"""The test suite's own rules: no test asserts wall-clock time; the strategies reach their special values.

1. Timing belongs in benchmarks/: a test that asserts on time.perf_counter / time.time / time.monotonic
   (or their _ns variants, or process_time) fails on a loaded machine without anything being wrong.
   The scanner below reads every tests/*.py with ``ast`` and reports each ``assert`` (or assert_* /
   pytest.fail call, or if-test guarding a pytest.fail) that uses a clock reading, directly or through
   a variable computed from one. Negative controls: synthetic snippets that do assert on time are caught.
2. tests/strategies.py builds arrays with NumPy from drawn seeds; each special value it promises
   (all-zero tensor, all-zero filter, ties, one sign, zero and tiny variances, the end points) is
   found by ``hypothesis.find`` -- so a change that stops planting them fails here.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
from hypothesis import Phase, find, given, settings, strategies as st

from strategies import batchnorms, filters, uniform_arrays

TESTS = pathlib.Path(__file__).parent
CLOCKS = {"perf_counter", "perf_counter_ns", "time", "time_ns", "monotonic", "monotonic_ns",
          "process_time", "process_time_ns"}


# --------------------------------------------------------------------------------- 1. no timed asserts
def _clock_aliases(tree):
    """Names bound to the time module and to its clock functions by the imports of ``tree``."""
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "time":
                    modules.add(a.asname or "time")
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            for a in node.names:
                if a.name in CLOCKS:
                    functions.add(a.asname or a.name)
    return modules, functions


def _reads_clock(expr, modules, functions, tainted):
    """True if ``expr`` calls a clock or uses a variable computed from one."""
    for node in ast.walk(expr):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in CLOCKS and isinstance(f.value, ast.Name) \
                    and f.value.id in modules:
                return True
            if isinstance(f, ast.Name) and f.id in functions:
                return True
        if isinstance(node, ast.Name) and node.id in tainted:
            return True
    return False


def _is_assert_call(call):
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name.startswith("assert") or name == "fail"


def timed_assertions(source: str, filename: str = "<snippet>") -> list[str]:
    """``file:line`` of every assertion in ``source`` that depends on a wall-clock reading."""
    tree = ast.parse(source, filename)
    modules, functions = _clock_aliases(tree)
    if not modules and not functions:
        return []
    # Variables computed from a clock reading (t0 = perf_counter(); dt = perf_counter() - t0; ...),
    # to a fixed point so the order of assignments does not matter. Names are file-wide: coarse, but
    # it can only over-report, never miss.
    tainted: set[str] = set()
    while True:
        before = len(tainted)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None \
                    and _reads_clock(node.value, modules, functions, tainted):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                tainted |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if len(tainted) == before:
            break
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) and _reads_clock(node.test, modules, functions, tainted):
            hits.append(node)
        elif isinstance(node, ast.Call) and _is_assert_call(node) and any(
                _reads_clock(a, modules, functions, tainted) for a in [*node.args, *(k.value for k in node.keywords)]):
            hits.append(node)
        elif isinstance(node, ast.If) and _reads_clock(node.test, modules, functions, tainted) and any(
                isinstance(n, ast.Call) and _is_assert_call(n) for b in node.body for n in ast.walk(b)):
            hits.append(node)
    return [f"{filename}:{n.lineno}" for n in hits]


def test_no_test_asserts_wall_clock_time():
    """No tests/*.py asserts on a clock reading (timings go to benchmarks/, not to pass/fail)."""
    files = sorted(TESTS.glob("*.py"))
    assert len(files) >= 20, files                     # the scan really sees the suite
    hits = [h for f in files for h in timed_assertions(f.read_text(), f.name)]
    assert hits == [], f"tests assert wall-clock time: {hits}"


OFFENDERS = {
    "assert on a difference": """
import time
def test_fast():
    t0 = time.perf_counter()
    run()
    elapsed = time.perf_counter() - t0
    assert elapsed < 120, elapsed
""",
    "assert on the call itself": """
import time
def test_fast():
    start = time.monotonic()
    run()
    assert time.monotonic() - start < 5
""",
    "from-import with alias": """
from time import perf_counter as clock
def test_fast():
    t = clock(); run(); t = clock() - t
    assert t <= 1.0
""",
    "module alias, time.time, assert_ call": """
import time as _t
import numpy as np
def test_fast():
    a = _t.time(); run(); b = _t.time()
    np.testing.assert_array_less(b - a, 3.0)
""",
    "pytest.fail behind an if": """
import time, pytest
def test_fast():
    t0 = time.perf_counter_ns()
    run()
    if time.perf_counter_ns() - t0 > 10**9:
        pytest.fail("too slow")
""",
    "budget computed through two variables": """
import time
def test_fast():
    t0 = time.process_time()
    run()
    dt = time.process_time() - t0
    ratio = dt / 2.0
    assert ratio < 1
""",
}


@pytest.mark.parametrize("name", OFFENDERS)
def test_timing_scanner_negative_control_catches_timed_asserts(name):
    """Negative control: each synthetic snippet asserting on wall-clock time is reported, at its assert line."""
    src = OFFENDERS[name]
    hits = timed_assertions(src)
    assert len(hits) == 1, hits
    line = src.splitlines()[int(hits[0].rsplit(":", 1)[1]) - 1]
    assert "assert" in line or line.lstrip().startswith("if ")


def test_timing_scanner_allows_untimed_use_of_time():
    """Clock readings that are only reported, and timeouts passed to a runner, are not assertions."""
    src = """
import time, subprocess
def test_ok(capsys):
    t0 = time.perf_counter()
    out = subprocess.run(["true"], timeout=3600)
    print(f"took {time.perf_counter() - t0:.1f} s")
    assert out.returncode == 0
"""
    assert timed_assertions(src) == []


# --------------------------------------------------------------------------- 2. the strategies' reach
SEARCH = settings(max_examples=2000, derandomize=True, database=None, phases=[Phase.generate])


def _find(strategy, condition):
    """The first example of ``strategy`` satisfying ``condition`` (deterministic, no shrinking; fails if none
    in 2000 tries)."""
    return find(strategy, condition, settings=SEARCH)


@pytest.mark.parametrize("what, condition", [
    ("all-zero tensor", lambda W: not W.any()),
    ("an all-zero filter among non-zero ones", lambda W: W.shape[0] > 1 and W.any()
     and (~W.reshape(W.shape[0], -1).any(axis=1)).any()),
    ("exact zeros among non-zeros", lambda W: 0 < np.sum(W == 0) < W.size),
    ("ties: one magnitude repeated in a non-zero tensor", lambda W: W.size > 4 and W.any()
     and len(np.unique(np.abs(W[W != 0]))) == 1),
    ("ties: a few magnitudes shared by many entries", lambda W: W.size >= 16
     and 1 < len(np.unique(np.abs(W[W != 0]))) <= 3 and np.sum(W != 0) >= 12),
    ("one sign, all negative", lambda W: W.size > 4 and np.all(W < 0)),
    ("mixed signs", lambda W: (W > 0).any() and (W < 0).any()),
    ("the extreme magnitudes", lambda W: np.abs(W).max() == 4.0 and np.abs(W[W != 0]).min() == 1e-6),
])
def test_filters_reach_special_values(what, condition):
    """tests/strategies.filters plants each special value it promises (found by hypothesis.find)."""
    W = _find(filters(), condition)
    assert condition(W), what


@pytest.mark.parametrize("what, condition", [
    ("a variance exactly 0", lambda bn: np.any(bn.var == 0)),
    ("a tiny non-zero variance", lambda bn: np.any((bn.var > 0) & (bn.var <= 1e-6))),
    ("gamma of both signs", lambda bn: (bn.gamma > 0).any() and (bn.gamma < 0).any()),
    ("all gamma negative", lambda bn: bn.gamma.size > 2 and np.all(bn.gamma < 0)),
    ("exact zeros in beta and mean", lambda bn: np.any(bn.beta == 0) and np.any(bn.mean == 0)),
])
def test_batchnorms_reach_special_values(what, condition):
    """tests/strategies.batchnorms plants zero and tiny variances, both gamma signs, zero beta/mean."""
    bn = _find(st.integers(1, 16).flatmap(batchnorms), condition)
    assert condition(bn), what


@pytest.mark.parametrize("what, condition", [
    ("exact zeros", lambda a: np.any(a == 0)),
    ("both end points", lambda a: np.any(a == -3.0) and np.any(a == 3.0)),
    ("ties", lambda a: a.size > 3 and len(np.unique(a)) < a.size / 2 and np.any(a != 0)),
    ("tiny magnitudes", lambda a: np.any((a != 0) & (np.abs(a) < 1e-100))),
    ("all of one sign", lambda a: a.size > 3 and np.all(a > 0)),
])
def test_uniform_arrays_reach_special_values(what, condition):
    """tests/strategies.uniform_arrays plants zeros, end points, ties, tiny magnitudes and one sign."""
    a = _find(uniform_arrays(st.tuples(st.integers(1, 6), st.integers(1, 6)), -3.0, 3.0), condition)
    assert condition(a) and a.min() >= -3.0 and a.max() <= 3.0, what


@given(filters(), uniform_arrays(st.tuples(st.integers(1, 6), st.integers(1, 6)), -3.0, 3.0))
def test_strategies_do_not_emit_subnormals_or_out_of_range_values(W, a):
    """Every drawn weight is 0 or in [1e-6, 4] in magnitude; uniform_arrays stays in [lo, hi], never subnormal."""
    nz = W[W != 0]
    assert np.all((np.abs(nz) >= 1e-6) & (np.abs(nz) <= 4.0))
    assert a.min() >= -3.0 and a.max() <= 3.0
    assert not np.any((a != 0) & (np.abs(a) < np.finfo(np.float64).tiny))


# ------------------------------------------------------------------------- 3. fast and slow suites
ROOT = TESTS.parent


def test_default_run_is_the_fast_suite_and_ci_runs_both():
    """pyproject's addopts deselect `slow` (so the README's `python3 -m pytest -q` is the fast suite);
    .ci/run runs the fast suite and then the slow one; the README says how to run each."""
    import tomllib
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-m 'not slow'" in opts["addopts"]
    assert any(m.startswith("slow:") for m in opts["markers"])
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip().startswith("python3 -m pytest")]
    assert [ln.split(" || ")[0] for ln in ci] == ['python3 -m pytest -q -m "not slow"', "python3 -m pytest -q -m slow"]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running the tests", 1)[1].split("\n## ", 1)[0]
    for cmd in ("python3 -m pytest -q`", "python3 -m pytest -q -m slow", ".ci/run"):
        assert cmd in section, cmd


def _slow_marked(path, function):
    """True if ``function`` in tests/``path`` carries @pytest.mark.slow (read with ast, nothing imported)."""
    tree = ast.parse((TESTS / path).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return any(ast.unparse(d) == "pytest.mark.slow" for d in fn.decorator_list)


@pytest.mark.parametrize("path, function", [
    ("test_notebooks.py", "test_notebook_runs_top_to_bottom"),
    ("test_zoo_data.py", "test_engine_reproduces_recorded_fp32_accuracy_of_the_default_model"),
    ("test_zoo_data.py", "test_engine_reproduces_recorded_subset_accuracy"),
    ("test_zoo_pipeline.py", "test_demo_json_matches_readme_and_dfmpc_beats_no_compensation"),
])
def test_notebooks_and_whole_zoo_runs_are_in_the_slow_suite(path, function):
    """The notebooks, the zoo-accuracy check and the demo are marked slow (issue 11: notebooks in the slow group)."""
    assert _slow_marked(path, function)


def test_slow_marker_check_negative_control():
    """Negative control: an unmarked test function is reported as not slow."""
    assert not _slow_marked("test_suite_hygiene.py", "test_slow_marker_check_negative_control")
