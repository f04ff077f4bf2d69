"""Every derivation in data_free_derivations/ names tests that exist and that name its equations."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DERIVATIONS = sorted(p for p in (ROOT / "data_free_derivations").glob("*.md") if p.name != "README.md")


def parse_derivation(text):
    """(labels, [(test_file, test_name)]) from a derivation's 'Equations:' line and 'Checked by' list."""
    m = re.search(r"^Equations:\s*(.+)$", text, re.M)
    labels = [t.strip() for t in m.group(1).split(",")] if m else []
    checked = text.split("## Checked by", 1)[1] if "## Checked by" in text else ""
    tests = re.findall(r"`tests/([\w/]+\.py)::(\w+)`", checked)
    return labels, tests


def problems(text, root=ROOT):
    """Return a list of human-readable problems with one derivation text (empty when fine)."""
    labels, tests = parse_derivation(text)
    out = []
    if not labels:
        out.append("no 'Equations:' line")
    if not tests:
        out.append("no tests under '## Checked by'")
    for file, name in tests:
        path = root / "tests" / file
        if not path.exists():
            out.append(f"{file} does not exist")
            continue
        funcs = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        if name not in funcs:
            out.append(f"{file}::{name} does not exist")
            continue
        doc = ast.get_docstring(funcs[name]) or ""
        if not any(label.lower() in doc.lower() for label in labels):
            out.append(f"{file}::{name}: docstring names none of {labels}")
    return out


def test_derivation_files_exist():
    """The nine derivations of the core issue are there."""
    assert len(DERIVATIONS) >= 9


@pytest.mark.parametrize("path", DERIVATIONS, ids=lambda p: p.name)
def test_derivation_names_existing_tests_that_name_its_equations(path):
    """Each derivation's 'Checked by' tests exist and their docstrings name one of its equations."""
    assert problems(path.read_text()) == []


def test_checker_negative_control():
    """The checker itself fails on a missing test, a missing file, and a docstring naming no equation."""
    text = ("Equations: (27)\n\n## Checked by\n- `tests/test_compensation.py::test_does_not_exist`\n"
            "- `tests/nope.py::test_x`\n- `tests/test_derivations.py::test_derivation_files_exist`\n")
    found = problems(text)
    assert any("test_does_not_exist does not exist" in p for p in found)
    assert any("nope.py does not exist" in p for p in found)
    assert any("docstring names none" in p for p in found)
