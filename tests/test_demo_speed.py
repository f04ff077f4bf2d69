"""benchmarks/demo_speed.py (issue 13's demo ratio): its summary and its checks, without running a demo.

The script times ``dfmpc demo`` in minutes; here only its arithmetic and its input checks are tested:
the per-round ratios and medians against values worked by hand, the accuracy check with a negative
control (one run of a package computing something else), the saved record's own consistency, and
the errors for bad arguments.
"""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_demo_speed", ROOT / "benchmarks" / "demo_speed.py")
demo_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_speed)


def _run(wall, fp32=0.9339, cpu=None):
    return {"wall_s": wall, "cpu_s": cpu if cpu is not None else 2 * wall,
            "result": {"model": "resnet20", "fp32": fp32, "dfmpc": 0.9168, "lambda1": 0.5, "probe_seconds": wall / 7,
                       "dfmpc_seconds": wall / 6, "n_images": 10000}}


def test_summary_ratios_medians_and_accuracies():
    """Round i is old[i] / new[i]; medians over rounds; the accuracies leave out the timings, the
    settings and the non-float fields."""
    s = demo_speed.summarise([_run(47.2), _run(49.0), _run(44.3)], [_run(14.8), _run(15.5), _run(15.3)])
    assert s["ratios"] == [round(47.2 / 14.8, 4), round(49.0 / 15.5, 4), round(44.3 / 15.3, 4)]
    assert s["median_ratio"] == round(49.0 / 15.5, 4)          # 2.895, 3.161, 3.189 -> the middle one
    assert s["median_wall_s"] == {"before": 47.2, "now": 15.3}
    assert s["median_cpu_s"] == {"before": 94.4, "now": 30.6}
    assert s["accuracies"]["now"] == {"fp32": 0.9339, "dfmpc": 0.9168}
    assert s["accuracies_identical"]


def test_summary_catches_a_run_that_computes_something_else():
    """Negative control: one run of the new package with another FP32 accuracy is reported."""
    s = demo_speed.summarise([_run(47.0), _run(48.0)], [_run(15.0), _run(15.0, fp32=0.9338)])
    assert not s["accuracies_identical"]


def test_summary_refuses_unpaired_runs():
    with pytest.raises(ValueError, match="equally long"):
        demo_speed.summarise([_run(47.0)], [])
    with pytest.raises(ValueError, match="equally long"):
        demo_speed.summarise([], [])


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit, match="--rounds: expected a positive number"):
        demo_speed.main(["--rounds", "0"])
    with pytest.raises(SystemExit, match="--before: git cannot archive"):
        demo_speed.main(["--before", "no-such-revision-here", "--rounds", "1"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("demo_speed*.json")))
def test_saved_record_is_consistent(name):
    """A saved record's ratios and medians follow from its own runs, and its accuracies were stable."""
    r = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    old, new = r["runs"]["before"], r["runs"]["now"]
    assert len(old) == len(new) == r["rounds"]
    assert r["ratios"] == [round(o["wall_s"] / n["wall_s"], 4) for o, n in zip(old, new)]
    assert r["median_ratio"] == statistics.median(r["ratios"])
    assert r["accuracies_identical"] and r["cpu_model"] and r["simd_flags"]
