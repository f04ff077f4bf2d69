"""Top-1 accuracy of a graph on a labelled image set, the shipped data, and the zoo models.

I/O and progress display live here, outside the math modules.
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib import resources

import numpy as np

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
    x : ndarray, shape (N, C, H, W), float32
    y : ndarray, shape (N,), integer labels
    batch_size : int
        Images per call of the engine.
    progress : bool or None
        Show a progress bar on stderr (None: only when stderr is a terminal).

    Returns
    -------
    float in [0, 1]
    """
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y: expected shape ({len(x)},) (one label per image), got {y.shape}")
    bar = Progress(len(x), label, progress)
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = graph.run(x[i:i + batch_size], batch_size=batch_size)
        if logits.ndim != 2:
            raise ValueError(f"model output: expected logits of shape (N, classes), got {logits.shape}")
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
    FileNotFoundError, ValueError
    """
    if spec == "fashion-mnist":
        from .zoo.data import load_fashion_mnist_test, normalize as _norm
        x, y = load_fashion_mnist_test()
        return (_norm(x) if normalize else x), y
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data: no such file {spec!r} (use 'fashion-mnist' for the shipped test set)")
    try:
        with np.load(spec, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise ValueError(f"data: {spec!r} must hold arrays 'x' (N, C, H, W) and 'y' (N,); it has {sorted(f.files)}")
            x, y = f["x"], f["y"]
    except (OSError, EOFError) as exc:
        raise ValueError(f"data: {spec!r} is not a readable .npz file ({exc})") from exc
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"data: 'x' must be float (N, C, H, W), got {x.dtype} {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"data: 'y' must be integers of shape ({len(x)},), got {y.dtype} {y.shape}")
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
