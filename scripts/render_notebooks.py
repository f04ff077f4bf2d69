"""Execute the notebooks and render them, outputs and figures included, to docs/notebooks/.

Usage (needs ``pip install -e ".[notebooks]"``; notebook 03 runs whole networks, so allow minutes)::

    nice python scripts/render_notebooks.py                       # all of notebooks/NN_*.ipynb -> Markdown
    nice python scripts/render_notebooks.py notebooks/05_porting.ipynb --to html

Each notebook is executed in memory in a fresh ``python3`` kernel with ``notebooks/`` as its working
directory (as ``tests/test_notebooks.py`` does); the committed ``.ipynb`` is never written, so it stays
without outputs. The result goes to ``docs/notebooks/<name>.md`` with its figures as PNG files in
``docs/notebooks/<name>_files/`` (Markdown, which GitHub and any Markdown viewer show with the figures),
or to one self-contained ``docs/notebooks/<name>.html`` (figures embedded) with ``--to html``. Every file
is written atomically; a notebook that raises leaves its earlier rendering in place and the script
exits with status 1 after rendering the others.
"""

from __future__ import annotations

import argparse
import os
import platform
import posixpath
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
OUT_DIR = ROOT / "docs" / "notebooks"
#: A hang guard for any one cell, not a speed budget.
CELL_TIMEOUT_SECONDS = 3600


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def execute(path: Path):
    """The notebook at ``path`` executed top to bottom in a fresh kernel (in memory; the file is untouched).

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        A cell raised (the message names it).
    """
    import nbclient
    import nbformat
    nb = nbformat.read(path, as_version=4)
    backend = os.environ.pop("MPLBACKEND", None)          # let the kernel use its inline backend
    try:
        nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_SECONDS, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    return nb


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_LINK = re.compile(r"\]\((?!https?:|mailto:|#|/)([^)\s]+)\)")


def relink(nb, nb_dir: Path, out_dir: Path) -> None:
    """Make the relative links of the markdown cells (written from ``nb_dir``) point right from ``out_dir``."""
    prefix = os.path.relpath(nb_dir, out_dir)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = _LINK.sub(lambda m: f"]({posixpath.normpath(posixpath.join(Path(prefix).as_posix(), m.group(1)))})",
                                    cell.source)


def render(nb, name: str, out_dir: Path, to: str = "markdown", note: str = "") -> list[Path]:
    """Write an executed notebook as ``out_dir/<name>.md`` + ``<name>_files/*.png``, or ``<name>.html``.

    Parameters
    ----------
    nb : nbformat.NotebookNode, executed
    name : str
        File stem, e.g. ``"05_porting"``.
    out_dir : Path
        Existing directory.
    to : {"markdown", "html"}
    note : str
        A Markdown line put first (where the rendering came from).

    Returns
    -------
    list of Path
        The files written.
    """
    import nbconvert
    if to == "html":
        body, _ = nbconvert.HTMLExporter(embed_images=True).from_notebook_node(nb)
        if note:
            body = body.replace("<body", f"<!-- {note} -->\n<body", 1)
        target = out_dir / f"{name}.html"
        _write_atomically(target, body.encode())
        return [target]
    files_dir = f"{name}_files"
    body, resources = nbconvert.MarkdownExporter().from_notebook_node(
        nb, resources={"output_files_dir": files_dir, "unique_key": name})
    written = []
    figures = out_dir / files_dir
    if figures.exists():
        shutil.rmtree(figures)                            # figures of an earlier rendering
    for rel, data in sorted(resources.get("outputs", {}).items()):
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, data)
        written.append(target)
    target = out_dir / f"{name}.md"
    _write_atomically(target, ((note + "\n\n" if note else "") + body).encode())
    return [target] + written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", type=Path, help="notebooks to render (default: notebooks/NN_*.ipynb)")
    p.add_argument("--to", choices=("markdown", "html"), default="markdown", help="output format (default markdown)")
    p.add_argument("-o", "--out-dir", type=Path, default=OUT_DIR, help="where to write (default docs/notebooks/)")
    a = p.parse_args(argv)
    paths = [x.resolve() for x in a.notebooks] or sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
    for x in paths:
        if not x.is_file() or x.suffix != ".ipynb":
            p.error(f"notebooks: {x} is not a notebook file")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for path in paths:
        t0 = time.perf_counter()
        try:
            nb = execute(path)
        except Exception as err:                           # a cell raised: report, keep the earlier rendering
            print(f"{path.name}: FAILED: {type(err).__name__}: {str(err).strip().splitlines()[-1:]}", file=sys.stderr)
            failed.append(path.name)
            continue
        seconds = time.perf_counter() - t0
        try:
            rel = path.relative_to(ROOT)
        except ValueError:
            rel = path
        note = (f"*Rendered from [`{rel.as_posix()}`](../../{rel.as_posix()}) by `scripts/render_notebooks.py`, "
                f"with its outputs; executed in {seconds:.0f} s on {_cpu_model()} ({os.cpu_count()} logical CPUs). "
                "Do not edit: edit the notebook and re-run the script.*")
        relink(nb, path.parent, a.out_dir)
        written = render(nb, path.stem, a.out_dir, a.to, note)
        print(f"{path.name}: {seconds:.0f} s -> " + ", ".join(str(w.relative_to(a.out_dir)) for w in written[:1])
              + (f" + {len(written) - 1} figures" if len(written) > 1 else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
