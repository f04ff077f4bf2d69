"""What the zoo ships: one summary row per model of ``models.json`` (``dfmpc zoo``).

``models.json`` is written by ``scripts/export_zoo.py``; each entry carries the
architecture, the parameter count, the FP32 top-1 accuracy on the shipped
Fashion-MNIST test set as measured by PyTorch, onnxruntime and dfmpc's engine,
the row of the paper's tables (Chen et al. 2023) the model stands for, and the
``scripts/train_zoo.py`` command that trained it.
"""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["SUMMARY_FIELDS", "summaries", "format_table", "paper_row_label"]

#: Keys of every summary row, in display order.
SUMMARY_FIELDS = ("name", "architecture", "parameters", "fp32_accuracy", "paper_row", "command", "file")


def _manifest() -> dict:
    path = resources.files("dfmpc.zoo").joinpath("models.json")
    if not path.is_file():
        return {"models": []}
    return json.loads(path.read_text(encoding="utf-8"))


def paper_row_label(row: dict | None) -> str:
    """One-line label of a ``paper_row`` record.

    Parameters
    ----------
    row : dict or None
        ``{"model": str, "dataset": str, "setting": str, "note": str (optional)}``;
        None when the model stands for no row of the paper.

    Returns
    -------
    str

    Example
    -------
    >>> paper_row_label({"model": "ResNet-18", "dataset": "CIFAR-10", "setting": "MP2/6"})
    'ResNet-18, CIFAR-10, MP2/6'
    >>> paper_row_label(None)
    'none'
    """
    if not row:
        return "none"
    label = f"{row['model']}, {row['dataset']}, {row['setting']}"
    return f"{label} ({row['note']})" if row.get("note") else label


def summaries(manifest: dict | None = None) -> list[dict]:
    """One summary per shipped model, in the manifest's order.

    Parameters
    ----------
    manifest : dict, optional
        A parsed ``models.json`` (default: the one shipped in ``dfmpc.zoo``).

    Returns
    -------
    list of dict
        Keys :data:`SUMMARY_FIELDS`: ``name`` (the zoo name, as given to
        ``dfmpc evaluate``), ``architecture`` (one line), ``parameters`` (int),
        ``fp32_accuracy`` (fraction of the 10000 shipped test images, dfmpc's
        engine), ``paper_row`` (dict or None, see :func:`paper_row_label`),
        ``command`` (the training command) and ``file`` (the weight file).

    Raises
    ------
    ValueError
        An entry without one of the fields a summary needs (names the model and the field).

    Example
    -------
    >>> rows = summaries({"models": [{"arch": "m", "description": "d", "parameters": 3, "file": "m.npz",
    ...     "fp32_test_accuracy_engine": 0.9, "paper_row": None, "command": "python t.py"}]})
    >>> rows[0]["fp32_accuracy"], rows[0]["paper_row"]
    (0.9, None)
    """
    manifest = _manifest() if manifest is None else manifest
    rows = []
    for m in manifest.get("models", []):
        name = m.get("arch", "?")
        for key in ("arch", "description", "parameters", "file", "fp32_test_accuracy_engine", "command"):
            if key not in m:
                raise ValueError(f"models.json: model {name!r} has no {key!r}")
        rows.append({"name": m["arch"], "architecture": m["description"], "parameters": int(m["parameters"]),
                     "fp32_accuracy": float(m["fp32_test_accuracy_engine"]),
                     "paper_row": m.get("paper_row"), "command": m["command"], "file": m["file"]})
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`summaries` rows (architecture and command on their own lines).

    Example
    -------
    >>> print(format_table([{"name": "m", "architecture": "d", "parameters": 3, "fp32_accuracy": 0.9,
    ...     "paper_row": None, "command": "python t.py", "file": "m.npz"}]))
    name  parameters  FP32 top-1  paper row
    m              3      90.00%  none
        d
        trained by: python t.py
    """
    if not rows:
        return "the zoo is empty (no models.json)"
    w = max(4, *(len(r["name"]) for r in rows))
    lines = [f"{'name':<{w}}  parameters  FP32 top-1  paper row"]
    for r in rows:
        lines.append(f"{r['name']:<{w}}  {r['parameters']:>10,}  {100 * r['fp32_accuracy']:9.2f}%  "
                     f"{paper_row_label(r['paper_row'])}")
        lines.append(f"    {r['architecture']}")
        lines.append(f"    trained by: {r['command']}")
    return "\n".join(lines)
