"""`dfmpc zoo [--json]`: the shipped models as models.json records them (dfmpc.zoo.catalog)."""

import json
import subprocess
import sys

import numpy as np
import pytest

import dfmpc
from dfmpc.cli import main
from dfmpc.zoo import catalog
from dfmpc.zoo.catalog import SUMMARY_FIELDS, format_table, paper_row_label, summaries
from dfmpc.zoo.data import data_path

MANIFEST = json.loads(data_path("models.json").read_text())
RECORDS = MANIFEST["models"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_lists_every_record_in_order_with_its_figures(capsys):
    """One row per models.json entry, same order; accuracy = the engine's, parameters and command copied."""
    rc, out, err = run(capsys, "zoo", "--json")
    assert rc == 0 and err == ""
    rows = json.loads(out)["models"]
    assert [r["name"] for r in rows] == [m["arch"] for m in RECORDS]
    for r, m in zip(rows, RECORDS):
        assert tuple(r) == SUMMARY_FIELDS
        assert r["fp32_accuracy"] == m["fp32_test_accuracy_engine"]
        assert r["parameters"] == m["parameters"] and r["command"] == m["command"]
        assert r["architecture"] == m["description"] and r["paper_row"] == m["paper_row"]


def test_every_record_says_which_paper_row_it_stands_for():
    """Every entry has a paper_row key (None or model/dataset/setting), so no row is left silently unstated."""
    for m in RECORDS:
        assert "paper_row" in m, m["arch"]
        row = m["paper_row"]
        if row is not None:
            assert row["setting"] in ("MP2/6", "MP3/6", "MP6/6") and row["dataset"] in ("CIFAR-10", "ImageNet")


@pytest.mark.parametrize("record", RECORDS, ids=[m["arch"] for m in RECORDS])
def test_listed_parameters_are_the_weight_files_parameters(record):
    """The parameter count shown equals the trainable parameters in the shipped file (conv/linear weights and
    biases, BN gamma and beta; running statistics are not parameters)."""
    g = dfmpc.load_model(data_path(record["file"]))
    n = sum(int(np.prod(np.shape(v))) for node in g.nodes for k, v in node.params.items()
            if k in ("W", "B", "gamma", "beta"))
    assert n == record["parameters"]


def test_the_training_command_names_the_model():
    for r in summaries():
        assert r["command"].startswith("python scripts/train_zoo.py --arch ")
        assert r["command"].split()[3] == r["name"]


def test_text_output_has_one_line_per_model_with_accuracy(capsys):
    rc, out, _ = run(capsys, "zoo")
    assert rc == 0
    for m in RECORDS:
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [m["arch"]])
        assert f"{100 * m['fp32_test_accuracy_engine']:.2f}%" in line
        assert paper_row_label(m["paper_row"]) in line
        assert f"trained by: {m['command']}" in out


def test_paper_row_label():
    assert paper_row_label(None) == "none"
    assert paper_row_label({"model": "VGG-16", "dataset": "CIFAR-10", "setting": "MP2/6", "note": "x"}) == \
        "VGG-16, CIFAR-10, MP2/6 (x)"


def test_incomplete_record_is_a_one_line_error(capsys, monkeypatch):
    """A models.json entry without its accuracy is refused naming the model and the field (exit 2)."""
    broken = {"models": [{k: v for k, v in RECORDS[0].items() if k != "fp32_test_accuracy_engine"}]}
    with pytest.raises(ValueError, match=f"{RECORDS[0]['arch']!r} has no 'fp32_test_accuracy_engine'"):
        summaries(broken)
    monkeypatch.setattr(catalog, "_manifest", lambda: broken)
    rc, out, err = run(capsys, "zoo", "--json")
    assert rc == 2 and out == "" and "fp32_test_accuracy_engine" in err and len(err.strip().splitlines()) == 1


def test_empty_zoo(monkeypatch):
    monkeypatch.setattr(catalog, "_manifest", lambda: {"models": []})
    assert summaries() == [] and "empty" in format_table([])


def test_module_entry_point_prints_one_json_object():
    res = subprocess.run([sys.executable, "-m", "dfmpc", "zoo", "--json"], capture_output=True, text=True,
                         check=True)
    assert len(res.stdout.strip().splitlines()) == 1
    assert [r["name"] for r in json.loads(res.stdout)["models"]] == [m["arch"] for m in RECORDS]


def test_catalog_docstring_examples():
    import doctest
    result = doctest.testmod(catalog, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
