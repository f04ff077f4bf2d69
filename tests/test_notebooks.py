"""The step-through notebooks in notebooks/: committed without outputs, and each runs top to bottom in a fresh kernel."""

import os
from pathlib import Path

import pytest

# Hard imports: the test extra installs them, and a missing one must fail, not skip the notebooks.
import ipykernel  # noqa: E402,F401
import matplotlib  # noqa: E402,F401
import nbclient  # noqa: E402
import nbformat  # noqa: E402

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
#: A hang guard for any one cell, not a speed budget: no test asserts wall-clock time (notebook
#: speed varies several-fold between machines and load; it is measured in benchmarks/, not here).
HANG_GUARD_SECONDS = 3600


def test_the_five_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_quantizers.ipynb", "02_feature_map_loss_to_data_free.ipynb", "03_whole_network.ipynb",
                     "04_sensitivity.ipynb", "05_porting.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    """No outputs, no execution counts: the committed notebooks are sources, not results."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has outputs"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_dfmpc_and_its_plotting_module(path):
    """Each notebook imports dfmpc and draws with dfmpc.plotting; markdown cites a derivation file."""
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "import dfmpc" in code
    assert "plotting" in code
    assert "data_free_derivations/" in text or path.name == "05_porting.ipynb"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path):
    """Execute in a fresh python3 kernel (this interpreter, via ipykernel), working directory notebooks/."""
    nb = nbformat.read(path, as_version=4)
    env_backup = os.environ.get("MPLBACKEND")
    os.environ.pop("MPLBACKEND", None)               # let the kernel use its inline backend
    try:
        client = nbclient.NotebookClient(nb, timeout=HANG_GUARD_SECONDS, kernel_name="python3",
                                         resources={"metadata": {"path": str(NB_DIR)}})
        client.execute()
    finally:
        if env_backup is not None:
            os.environ["MPLBACKEND"] = env_backup
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"


def test_derivations_and_notebooks_point_at_each_other():
    """Every 'Notebook:' pointer in data_free_derivations/ names an existing notebook that links back to that file."""
    import re
    derivations = sorted((NB_DIR.parent / "data_free_derivations").glob("[0-9][0-9]_*.md"))
    pointers = 0
    for d in derivations:
        m = re.search(r"^Notebook:(.*)$", d.read_text(), re.M)
        if not m:
            continue
        for name in re.findall(r"\(\.\./notebooks/([\w.]+\.ipynb)\)", m.group(1)):
            pointers += 1
            nb_path = NB_DIR / name
            assert nb_path.exists(), f"{d.name} points at missing {name}"
            text = "\n".join(c.source for c in nbformat.read(nb_path, as_version=4).cells if c.cell_type == "markdown")
            assert f"../data_free_derivations/{d.name}" in text, f"{name} does not link back to {d.name}"
    assert pointers >= 10
