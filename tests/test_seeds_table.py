"""The README's probe-seed table states what benchmarks/results/seeds.json says (issue 15).

The table is written by ``python benchmarks/seeds.py`` (no measurement here). The checks recompute each
row's mean, standard deviation, range and gap to ``data`` from the raw fractions, independently of the
script's formatting code, and compare them with the README's cells. Negative controls: a changed
accuracy and a gap past the 1.5-point target are each caught.
"""

import importlib.util
import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "benchmarks" / "seeds.py")
seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeds)

RESULTS = ROOT / "benchmarks" / "results" / "seeds.json"
pytestmark = pytest.mark.skipif(not RESULTS.exists(), reason="benchmarks/results/seeds.json not measured yet")


def _readme_rows() -> dict:
    s = (ROOT / "README.md").read_text()
    start, end = seeds.MARKERS
    assert start in s and end in s, "README.md lacks the seeds-table markers"
    body = s.split(start, 1)[1].split(end, 1)[0].strip().splitlines()[2:]
    rows = {}
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], cells[1])] = cells
    return rows


def _groups() -> dict:
    groups: dict = {}
    for r in json.loads(RESULTS.read_text())["rows"]:
        groups.setdefault((r["model"], r["setting"]), []).append(r)
    return groups


def _numbers(cell: str) -> list[float]:
    return [float(v) for v in re.findall(r"[+-]?\d+\.\d+", cell)]


def _expected(rs, key) -> list[float]:
    v = [100 * r[key] for r in rs]
    return [statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, min(v), max(v)]


def test_the_readme_table_is_the_json():
    readme, groups = _readme_rows(), _groups()
    assert groups, "seeds.json has no rows: the comparison below would be vacuous"
    assert set(readme) == set(groups), "README seeds table and seeds.json name different (model, setting)"
    for key, rs in groups.items():
        cells = readme[key]
        assert cells[2] == ",".join(str(r["seed"]) for r in rs)
        for col, k in ((3, "dfmpc"), (4, "none")):
            # each cell prints 2 decimals: a recomputed figure differs from it by at most 0.005 (+ float slack)
            assert _numbers(cells[col]) == pytest.approx(_expected(rs, k), abs=0.0051), (key, col)
        ref = seeds.data_reference(*key)
        if ref is not None:
            mean_gap = statistics.mean(100 * r["dfmpc"] for r in rs) - 100 * ref
            worst_gap = min(100 * r["dfmpc"] for r in rs) - 100 * ref
            assert _numbers(cells[6])[0] == pytest.approx(mean_gap, abs=0.0051)
            assert _numbers(cells[7])[0] == pytest.approx(worst_gap, abs=0.0051)
            assert ("✗" in cells[6]) == (mean_gap < -seeds.TARGET_POINTS)


def test_negative_control_a_changed_accuracy_and_a_missed_target_show():
    rows = [{"model": "resnet20", "setting": "2/6", "seed": s, "dfmpc": a, "none": a} for s, a in
            enumerate((0.90, 0.91, 0.92))]
    line = seeds.table(rows).splitlines()[2]
    assert "91.00 ± 1.00 (90.00–92.00)" in line
    changed = seeds.table([dict(rows[0], dfmpc=0.80)] + rows[1:]).splitlines()[2]
    cells = [c.strip() for c in changed.strip("|").split("|")]
    assert _numbers(cells[3]) != pytest.approx([91.0, 1.0, 90.0, 92.0], abs=0.0051)
    assert _numbers(cells[4]) == pytest.approx([91.0, 1.0, 90.0, 92.0], abs=0.0051)     # c = 1 untouched
    ref = seeds.data_reference("resnet20", "2/6")
    if ref is not None:                          # 10 points under `data`: the target is marked missed
        low = [dict(r, dfmpc=ref - 0.10) for r in rows]
        assert seeds.table(low).splitlines()[2].count("✗") == 2
