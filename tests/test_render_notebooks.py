"""scripts/render_notebooks.py and its output: the rendered copies in docs/notebooks/ exist for every
notebook, show its current code with outputs and figures, and the README links them."""

import base64
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
RENDERED = ROOT / "docs" / "notebooks"

_spec = importlib.util.spec_from_file_location("render_notebooks", ROOT / "scripts" / "render_notebooks.py")
render_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_notebooks)

# A 1x1 PNG, so that the export has a figure to write.
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360f8cf"
    "c0f01f0005000201e2b1e1a70000000049454e44ae426082")).decode()


def _executed_notebook():
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("print('hello')\nplot()", execution_count=1)
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n"),
                    nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# T\nSee [d](../data_free_derivations/08_folding.md)."), code]
    return nb


def test_render_writes_markdown_with_figure_files(tmp_path):
    nb = _executed_notebook()
    render_notebooks.relink(nb, tmp_path / "notebooks", tmp_path / "docs" / "notebooks")
    (tmp_path / "docs" / "notebooks").mkdir(parents=True)
    written = render_notebooks.render(nb, "99_t", tmp_path / "docs" / "notebooks", "markdown", note="*note*")
    md = written[0].read_text()
    assert md.startswith("*note*") and "hello" in md
    assert "](../../data_free_derivations/08_folding.md)" in md          # links re-pointed from docs/notebooks/
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 1 and (written[0].parent / images[0]).read_bytes()[:4] == b"\x89PNG"


def test_render_html_embeds_the_figures(tmp_path):
    written = render_notebooks.render(_executed_notebook(), "99_t", tmp_path, "html")
    assert [w.name for w in written] == ["99_t.html"]
    assert "data:image/png;base64," in written[0].read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_rendered_copy_is_current_and_has_its_figures(path):
    """docs/notebooks/<name>.md shows every code cell of the committed notebook, with outputs and figures.

    Fails when a notebook changed after its rendering: re-run ``nice python scripts/render_notebooks.py``.
    """
    md_path = RENDERED / f"{path.stem}.md"
    assert md_path.exists(), f"no rendered copy of {path.name}: run scripts/render_notebooks.py"
    md = md_path.read_text()
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.source.strip() in md, f"{md_path.name} is stale: code cell {i} of {path.name} differs"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images, f"{md_path.name} shows no figure"
    for rel in images:
        assert (RENDERED / rel).is_file(), f"{md_path.name} links a missing figure {rel}"
    assert "Traceback (most recent call last)" not in md


def test_readme_links_every_rendered_notebook():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(docs/notebooks/{path.stem}.md)" in readme, f"README does not link the rendered {path.stem}"
