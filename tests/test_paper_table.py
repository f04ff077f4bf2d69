"""The README's table in the paper's layout states what the paper and accuracy.json say (issue 12, item 5).

The table is written by ``python benchmarks/accuracy.py --paper-table`` from
``benchmarks/results/accuracy.json`` (no measurement here). The checker below reads the README's cells
and compares them with (a) the paper's figures, copied into this file independently of
``benchmarks/accuracy.py`` (Chen et al. 2023, arXiv 2307.00498), and (b) the raw fractions in
accuracy.json, looked up by the zoo model the row names. Negative controls: a changed figure, a changed
paper figure, a dropped row and a wrong stand-in are each caught.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from dfmpc.evaluation import zoo_manifest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "benchmarks" / "accuracy.py")
acc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acc)

START, END = "<!-- paper-table:start -->", "<!-- paper-table:end -->"
NA = "not available offline"

#: The paper's rows and figures (top-1 %; FP32, MP without compensation, DF-MPC); NA: no checkable copy.
PAPER = {
    ("ResNet-18", "CIFAR-10", "MP2/6"): ("92.61", "10.78", "89.12"),
    ("ResNet-56", "CIFAR-10", "MP2/6"): ("93.88", "38.03", "91.05"),
    ("VGG-16", "CIFAR-10", "MP2/6"): ("93.70", "10.00", "90.48"),
    ("ResNet-18", "CIFAR-100", "MP2/6"): (NA, NA, NA),
    ("ResNet-56", "CIFAR-100", "MP2/6"): (NA, NA, NA),
    ("VGG-16", "CIFAR-100", "MP2/6"): (NA, NA, NA),
    ("ResNet-18", "ImageNet", "MP2/6"): ("71.47", NA, "66.46"),
    ("ResNet-50", "ImageNet", "MP2/6"): ("76.12", NA, "71.20"),
    ("ResNet-101", "ImageNet", "MP2/6"): (NA, NA, NA),
    ("DenseNet-121", "ImageNet", "MP3/6"): (NA, NA, NA),
    ("MobileNetV2", "ImageNet", "MP6/6"): (NA, NA, NA),
}

#: The zoo models the issue names for each row, first choice first (None: no analogue).
EXPECTED_STAND_IN = {
    ("ResNet-18", "CIFAR-10"): ("resnet18",), ("ResNet-56", "CIFAR-10"): ("resnet56",),
    ("VGG-16", "CIFAR-10"): ("vgg16", "vgg_small"),
    ("ResNet-18", "CIFAR-100"): None, ("ResNet-56", "CIFAR-100"): None, ("VGG-16", "CIFAR-100"): None,
    ("ResNet-18", "ImageNet"): ("resnet18",), ("ResNet-50", "ImageNet"): ("resnet_bottleneck",),
    ("ResNet-101", "ImageNet"): ("resnet_bottleneck",), ("DenseNet-121", "ImageNet"): ("densenet",),
    ("MobileNetV2", "ImageNet"): ("mobilenetv2", "mobilenetv2_small"),
}

#: Our columns after the stand-in, as accuracy.json keys ("fp32" is the row's own FP32).
OURS = ("fp32", "none/absorb", "dfmpc/sequential", "none/data", "dfmpc/data")


def _readme():
    return (ROOT / "README.md").read_text()


def _results():
    return json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())["rows"]


def table_cells(text):
    """The rows of the README's paper-layout table, as lists of cells (header and rule dropped)."""
    assert text.count(START) == 1 and text.count(END) == 1, "README.md needs one paper-table marker pair"
    block = text.split(START, 1)[1].split(END, 1)[0].strip().splitlines()
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in block[2:]]


def problems(text, rows, zoo):
    """Every disagreement between the README's table and the paper / accuracy.json / the zoo (empty: none)."""
    out, seen = [], []
    by_arch = {r["model"]: r for r in rows}
    for cells in table_cells(text):
        if len(cells) != 12:
            out.append(f"row with {len(cells)} cells: {cells}")
            continue
        key = tuple(cells[:3])
        seen.append(key)
        if key not in PAPER:
            out.append(f"{key}: not a row of the paper")
            continue
        if tuple(cells[3:6]) != PAPER[key]:
            out.append(f"{key}: paper cells {cells[3:6]} != {PAPER[key]}")
        named = re.findall(r"`([a-z0-9_]+)`", cells[6])
        arch = named[0] if named else None
        expected = EXPECTED_STAND_IN[key[:2]]
        if expected is None:
            if arch is not None or "no analogue here" not in cells[6]:
                out.append(f"{key}: expected 'no analogue here', got {cells[6]!r}")
        else:
            want = next((a for a in expected if a in zoo), expected[0])
            if arch != want:
                out.append(f"{key}: stand-in {arch!r}, expected {want!r}")
            if key[1] == "ImageNet" and "data differs" not in cells[6]:
                out.append(f"{key}: an ImageNet stand-in must say the data differs")
            if arch not in zoo and "not in the zoo yet" not in cells[6]:
                out.append(f"{key}: {arch} is not shipped and the row does not say so")
        ours = [c.replace("**", "") for c in cells[7:]]
        setting = key[2][2:]
        r = by_arch.get(arch)
        if r is not None and setting in r["settings"]:
            v = r["settings"][setting]
            want = [f"{100 * r['fp32']:.2f}"] + [f"{100 * v[k]['accuracy']:.2f}" if k in v else "-"
                                                 for k in OURS[1:]]
        else:
            want = ["-"] * 5
            if arch in zoo and "not measured" not in cells[6]:
                out.append(f"{key}: {arch} has no MP{setting} figures and the row does not say so")
        if ours != want:
            out.append(f"{key}: ours {ours} != accuracy.json {want}")
    if sorted(seen) != sorted(PAPER):
        out.append(f"rows {seen} are not the paper's rows {list(PAPER)}, each once")
    return out


def test_readme_paper_table_states_the_paper_and_accuracy_json():
    assert problems(_readme(), _results(), zoo_manifest()) == []


def test_readme_paper_table_is_what_accuracy_py_renders():
    """A re-run of ``--paper-table`` leaves the README unchanged (the table is not stale)."""
    block = _readme().split(START, 1)[1].split(END, 1)[0].strip()
    assert block == acc.paper_table(_results(), zoo_manifest())


@pytest.mark.parametrize("old, new", [("**90.78**", "**90.79**"),   # ours, ResNet-18 default DF-MPC
                                      ("| 89.12 |", "| 89.21 |"),   # the paper's ResNet-18 DF-MPC
                                      ("| 30.27 |", "| 38.03 |")])  # ours ResNet-56 no comp. := paper's
def test_negative_control_a_changed_figure_is_caught(old, new):
    text = _readme()
    head, rest = text.split(START, 1)
    assert old in rest.split(END, 1)[0], f"control cell {old!r} not in the table"
    assert problems(head + START + rest.replace(old, new, 1), _results(), zoo_manifest())


def test_negative_control_a_dropped_row_or_wrong_stand_in_is_caught():
    text = _readme()
    row = next(line for line in text.splitlines() if line.startswith("| ResNet-101 | ImageNet |"))
    assert problems(text.replace(row + "\n", ""), _results(), zoo_manifest())
    assert problems(text.replace(row, row.replace("`resnet_bottleneck`", "`resnet20`")), _results(), zoo_manifest())


def test_paper_rows_in_accuracy_py_are_the_papers():
    """benchmarks/accuracy.py's copy of the paper's figures agrees with this file's copy, row for row."""
    fmt = lambda v: NA if v is None else f"{v:.2f}"
    assert {(m, d, f"MP{s}"): tuple(map(fmt, f)) for m, d, s, *f in acc.PAPER_ROWS} == PAPER
    assert [(m, d) for m, d, *_ in acc.PAPER_ROWS] == [k[:2] for k in PAPER]    # the paper's order


def test_stand_in_prefers_the_first_shipped_candidate():
    assert acc.stand_in("VGG-16", "CIFAR-10", {"vgg16": {}, "vgg_small": {}})[0] == "vgg16"
    assert acc.stand_in("VGG-16", "CIFAR-10", {"vgg_small": {}})[0] == "vgg_small"
    assert acc.stand_in("MobileNetV2", "ImageNet", {"mobilenetv2": {}, "mobilenetv2_small": {}})[0] == "mobilenetv2"
    arch, note = acc.stand_in("DenseNet-121", "ImageNet", {})
    assert arch == "densenet" and "not in the zoo yet" in note
    assert acc.stand_in("ResNet-18", "CIFAR-100", {"resnet18": {}}) == (None,
                                                                        "no analogue here (data not available offline)")


def _row(model, fp32, setting, a=0.5):
    return {"model": model, "fp32": fp32, "settings": {setting: {k: {"accuracy": a} for k in OURS[1:]}}}


def test_shipped_but_unmeasured_stand_in_is_marked_and_listed_as_missing():
    zoo = {"vgg16": {}, "resnet18": {}}
    rows = [_row("resnet18", 0.9, "2/6")]
    md = acc.paper_table(rows, zoo)
    vgg = next(line for line in md.splitlines() if line.startswith("| VGG-16 | CIFAR-10 |"))
    assert "`vgg16`" in vgg and "not measured at MP2/6" in vgg and vgg.endswith("| - | - | - | - | - |")
    assert acc.missing_for_paper_table(rows, zoo) == {"vgg16": ["2/6"]}
    assert problems(START + "\n" + md + "\n" + END, rows, zoo) == []


def test_resnet56_is_called_under_trained_only_when_over_a_point_below_resnet20():
    zoo = {"resnet56": {"training": {"epochs": 4}}, "resnet20": {}}
    line = lambda md: next(x for x in md.splitlines() if x.startswith("| ResNet-56 | CIFAR-10 |"))
    low = acc.paper_table([_row("resnet20", 0.93, "2/6"), _row("resnet56", 0.915, "2/6")], zoo)
    near = acc.paper_table([_row("resnet20", 0.93, "2/6"), _row("resnet56", 0.925, "2/6")], zoo)
    assert "under-trained, 4 epochs" in line(low) and "under-trained" not in line(near)


def test_default_column_is_the_pipelines_default():
    """"DF-MPC (default)" reads accuracy.json's dfmpc/sequential, measured on distilled probes."""
    from dfmpc.pipeline import DEFAULT_PROBES, DEFAULT_RECALIBRATION
    assert acc.PAPER_TABLE_KEYS[1] == f"dfmpc/{DEFAULT_RECALIBRATION}" and DEFAULT_PROBES == "distilled"


def test_zoo_paper_rows_agree_with_the_table():
    """Each shipped stand-in's ``paper_row`` (``dfmpc zoo``) names the paper model it stands for here."""
    zoo = zoo_manifest()
    for m, d, s, *_ in acc.PAPER_ROWS:
        arch, _ = acc.stand_in(m, d, zoo)
        if arch in zoo:
            assert m in (zoo[arch].get("paper_row") or {}).get("model", ""), (arch, m, d)


def test_measure_missing_measures_only_what_the_table_lacks(tmp_path, monkeypatch, capsys):
    """``--paper-table --measure-missing`` measures the missing (model, setting) and merges it (measurement faked)."""
    vgg, _ = acc.stand_in("VGG-16", "CIFAR-10", zoo_manifest())     # vgg16 once shipped, else vgg_small
    rows = [r for r in _results() if r["model"] != vgg]
    (tmp_path / "accuracy.json").write_text(json.dumps({"rows": rows}))
    calls = []

    def fake_run_model(arch, settings, lambda1, lambda2, log):
        calls.append((arch, list(settings)))
        return _row(arch, 0.9, settings[0], a=0.25)

    monkeypatch.setattr(acc, "RESULTS", tmp_path)
    monkeypatch.setattr(acc, "run_model", fake_run_model)
    assert acc.main(["--paper-table", "--measure-missing", "--no-readme"]) == 0
    assert calls == [(vgg, ["2/6"])]
    merged = {r["model"]: r for r in json.loads((tmp_path / "accuracy.json").read_text())["rows"]}
    assert merged[vgg]["settings"]["2/6"]["dfmpc/sequential"]["accuracy"] == 0.25
    assert merged["resnet18"] == next(r for r in rows if r["model"] == "resnet18")    # the others kept
    assert "| **25.00** |" in capsys.readouterr().out
