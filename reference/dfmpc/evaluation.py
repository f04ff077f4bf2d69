"""Top-1 accuracy of a graph on a labelled image set, the shipped data, and the zoo models.

I/O and progress display live here, outside the math modules.
"""

from __future__ import annotations

import json
import numbers
import os
import sys
import time
from importlib import resources

import numpy as np

from ._checks import check_graph_params
from .engine.graph import Graph

__all__ = ["accuracy", "load_dataset", "zoo_manifest", "load_zoo_model", "Progress"]


class Progress:
    """A minimal progress bar on stderr (shown only when stderr is a terminal, unless forced)."""

    def __init__(self, total: int, label: str = "", enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.t0 = total, label, time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(self.total, 1))
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}"
                          f" ({rate:.0f} img/s)")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def accuracy(graph: Graph, x: np.ndarray, y: np.ndarray, batch_size: int = 500, progress=None, label: str = "") -> float:
    """Top-1 accuracy: the fraction of ``argmax graph.run(x) == y``.

    Parameters
    ----------
    graph : Graph
        Every parameter finite, every BN variance >= 0 (checked first).
    x : ndarray, shape (N, C, H, W), float32, N >= 1
    y : ndarray, shape (N,), integer labels in ``[0, classes)``
    batch_size : int >= 1
        Images per call of the engine.
    progress : bool or None
        Show a progress bar on stderr (None: only when stderr is a terminal).

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    ValueError
        No images; ``batch_size`` < 1; ``y`` not one integer label per image, negative, or not below
        the model's number of classes; logits not of shape (N, classes); a NaN/Inf parameter or a
        negative BN variance (naming the node).
    """
    check_graph_params(graph)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    if len(x) == 0:
        raise ValueError(f"x: expected at least one image, got shape {np.shape(x)}")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y: expected shape ({len(x)},) (one label per image), got {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise ValueError(f"y: expected integer class labels, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"y: expected class labels >= 0, got {int(y.min())}")
    bar = Progress(len(x), label, progress)
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = graph.run(x[i:i + batch_size], batch_size=batch_size)
        if logits.ndim != 2:
            raise ValueError(f"model output: expected logits of shape (N, classes), got {logits.shape}")
        if i == 0 and y.max() >= logits.shape[1]:
            raise ValueError(f"y: expected class labels below {logits.shape[1]} (the model's number of classes), "
                             f"got {int(y.max())}")
        correct += int(np.sum(logits.argmax(axis=1) == y[i:i + batch_size]))
        bar.update(min(i + batch_size, len(x)))
    return correct / len(x)


def load_dataset(spec: str, normalize: bool = True):
    """Images and labels: ``"fashion-mnist"`` (shipped 10k test set) or a ``.npz`` with ``x`` and ``y``.

    Parameters
    ----------
    spec : str
        ``"fashion-mnist"``, or a path to an ``.npz`` holding ``x`` (N, C, H, W) float32 and
        ``y`` (N,) integers (loaded with ``allow_pickle=False``).
    normalize : bool
        For the shipped set only: apply the zoo's input normalisation (train-set mean/std).

    Returns
    -------
    x : ndarray (N, C, H, W) float32, y : ndarray (N,) int64

    Raises
    ------
    FileNotFoundError
        No such file.
    OSError
        The file cannot be opened.
    ValueError
        Not a readable ``.npz`` (the message never suggests ``allow_pickle``), no ``x`` / ``y``,
        ``x`` not float (N, C, H, W) with N >= 1 or not finite, ``y`` not N integer labels >= 0.
    """
    if spec == "fashion-mnist":
        from .zoo.data import load_fashion_mnist_test, normalize as _norm
        x, y = load_fashion_mnist_test()
        return (_norm(x) if normalize else x), y
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data: no such file {spec!r} (use 'fashion-mnist' for the shipped test set)")
    what = f"data: {spec!r} is not a readable .npz file"
    with open(spec, "rb") as fh:          # OSError (permission denied, a directory) names the path itself
        if fh.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ValueError(f"{what} (not a zip archive; expected an .npz with arrays 'x' and 'y')")
        fh.seek(0)
        try:
            with np.load(fh, allow_pickle=False) as f:
                files = sorted(f.files)
                if "x" in files and "y" in files:
                    x, y = f["x"], f["y"]
        except Exception as exc:          # zipfile / npy header / zlib errors of a damaged file
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "pickle" in msg.lower():
                msg = "it holds pickled (object) data, which dfmpc never loads"
            raise ValueError(f"{what}: {msg}") from exc
    if "x" not in files or "y" not in files:
        raise ValueError(f"data: {spec!r} must hold arrays 'x' (N, C, H, W) and 'y' (N,); it has {files}")
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"data: 'x' must be float (N, C, H, W), got {x.dtype} {x.shape}")
    if len(x) == 0:
        raise ValueError(f"data: {spec!r} holds no images ('x' has shape {x.shape}); expected at least one")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"data: 'y' must be integers of shape ({len(x)},), got {y.dtype} {y.shape}")
    if y.min() < 0:
        raise ValueError(f"data: 'y' must hold class labels >= 0, got {int(y.min())}")
    if not np.all(np.isfinite(x)):
        raise ValueError("data: 'x' has NaN/Inf entries")
    return x.astype(np.float32, copy=False), y.astype(np.int64)


def zoo_manifest() -> dict:
    """The zoo's ``models.json``: ``{arch: entry}`` (empty when no model is shipped yet)."""
    path = resources.files("dfmpc.zoo").joinpath("models.json")
    if not path.is_file():
        return {}
    return {m["arch"]: m for m in json.loads(path.read_text())["models"]}


def load_zoo_model(arch: str) -> Graph:
    """Load a shipped zoo model by architecture name (e.g. ``"resnet20"``)."""
    from .interop import load_model
    zoo = zoo_manifest()
    if arch not in zoo:
        raise ValueError(f"model: {arch!r} is neither a file nor a zoo model; zoo: {sorted(zoo) or 'empty'}")
    with resources.as_file(resources.files("dfmpc.zoo").joinpath(zoo[arch]["file"])) as p:
        return load_model(p)
