"""Top-1 accuracy of a graph on a labelled image set, the shipped data, and the zoo models.

I/O and progress display live here, outside the math modules. The logits come from the project's
engine (``backend="engine"``, the default and the reference) or, for large evaluation sets, from
onnxruntime (``backend="onnxruntime"``, the optional extra ``pip install -e ".[ort]"``): the graph is
exported to ONNX in memory (:func:`dfmpc.interop.to_onnx`) and run there, never written to disk.
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

__all__ = ["accuracy", "logits", "load_dataset", "zoo_manifest", "load_zoo_model", "Progress", "BACKENDS",
           "check_backend"]

BACKENDS = ("engine", "onnxruntime")
"""Where :func:`accuracy` and :func:`logits` run the graph: the project's engine (default) or onnxruntime."""

ORT_INSTALL = 'pip install -e ".[ort]"'
"""How to get the onnxruntime backend (the optional extra ``ort``), named in the error when it is missing."""

DELAY_SECONDS = 2.0
"""A progress bar left to decide for itself (``progress=None``) appears only after this many seconds."""

#: Images per chunk inside one engine call (``Graph.run(..., batch_size=)``). The engine hands whole
#: chunks to its batch-split worker threads (:mod:`dfmpc.engine.executor`), so a 500-image call made
#: as one chunk would use one core: ResNet-20 at 2 threads on a 2-core Zen 3 ran 588 img/s in
#: 64-image chunks against 391 img/s as one 500-image chunk (README, Performance).
ENGINE_CHUNK = 64


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):      # no isatty, or a closed stream
        return False


class Progress:
    """A progress bar on stderr (tqdm), for evaluations and distillations that take more than a moment.

    Parameters
    ----------
    total : int
        Units of work (images, steps).
    label : str
        Shown before the bar.
    enabled : bool or None
        True: shown at once; False: silent; None: only when ``stream`` is a terminal, and only once
        the work has lasted :data:`DELAY_SECONDS` (a short job prints nothing).
    stream : file, optional
        Default: ``sys.stderr`` (never stdout, which carries results and ``--json``).
    unit : str
        Name of one unit of work (default ``"img"``).
    leave : bool
        Keep the finished bar on screen (default: cleared, so the result line follows on its own).

    Example
    -------
    >>> import io
    >>> s = io.StringIO()
    >>> bar = Progress(4, "demo", enabled=True, stream=s)
    >>> for done in (2, 4):
    ...     bar.update(done)
    >>> "demo" in s.getvalue() and "4/4" in s.getvalue()
    True
    >>> silent = io.StringIO()
    >>> Progress(4, "demo", stream=silent).update(4)     # None + not a terminal: nothing
    >>> silent.getvalue()
    ''
    """

    def __init__(self, total: int, label: str = "", enabled: bool | None = None, stream=None,
                 unit: str = "img", leave: bool = False):
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else bool(enabled)
        self.total, self.label, self.t0 = total, label, time.perf_counter()
        self._bar = None
        if self.enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=label or None, file=self.stream, unit=unit, leave=leave,
                             delay=DELAY_SECONDS if enabled is None else 0.0, dynamic_ncols=True)

    def update(self, done: int, postfix: str | None = None) -> None:
        """Move the bar to ``done`` units of ``total`` (an absolute count), with an optional note after it."""
        bar = self._bar
        if bar is None:
            return
        if postfix is not None:
            bar.set_postfix_str(postfix, refresh=False)
        bar.update(done - bar.n)
        if done >= self.total:
            bar.refresh()                 # the final count is always drawn once, however fast the job was
            self.close()

    def close(self) -> None:
        """Finish the bar (idempotent); called by :meth:`update` at ``total`` and on leaving a ``with``."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def check_backend(backend: str) -> str:
    """Check a backend name, and that its package is importable.

    Raises
    ------
    ValueError
        ``backend`` is not one of :data:`BACKENDS`.
    ImportError
        ``"onnxruntime"`` without the onnxruntime package (one line naming the extra to install).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime":
        _onnxruntime()
    return backend


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"backend 'onnxruntime' needs the onnxruntime package, which is not installed: "
                          f"{ORT_INSTALL} (the optional extra 'ort')") from exc
    return onnxruntime


def _runner(graph: Graph, backend: str, batch_size: int):
    """A function from one batch (B, C, H, W) float32 to the graph's output (B, ...) on ``backend``."""
    check_backend(backend)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ValueError(f"graph: expected one input and one output (logits), got inputs {graph.inputs} "
                         f"and outputs {graph.outputs}")
    if backend == "engine":
        return lambda xb: graph.run(xb, batch_size=min(batch_size, ENGINE_CHUNK))
    ort = _onnxruntime()
    from .interop import to_onnx
    opts = ort.SessionOptions()
    opts.log_severity_level = 3                        # errors only: no warnings on the user's stderr
    session = ort.InferenceSession(to_onnx(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name, out = graph.inputs[0], graph.outputs[0]

    def run(xb):
        if not isinstance(xb, np.ndarray) or xb.dtype != np.float32:
            raise TypeError(f"x: expected a float32 ndarray, got {getattr(xb, 'dtype', type(xb).__name__)}")
        return session.run([out], {name: np.ascontiguousarray(xb)})[0]
    return run


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return int(batch_size)


def logits(graph: Graph, x: np.ndarray, batch_size: int = 500, backend: str = "engine", progress=None,
           label: str = "") -> np.ndarray:
    """The graph's output on every image, ``batch_size`` images at a time, on the engine or onnxruntime.

    Parameters
    ----------
    graph : Graph
        One input, one output. Every parameter finite, every BN variance >= 0 (checked first).
    x : ndarray, shape (N, C, H, W), float32, N >= 1
    batch_size : int >= 1
        Images per call of the backend (the engine runs each call in chunks of at most
        :data:`ENGINE_CHUNK`, shared among its threads).
    backend : {"engine", "onnxruntime"}
        The project's engine (default, the reference) or onnxruntime on the in-memory ONNX export.
        The two agree within the engine's tolerance to onnxruntime, max |Δlogit| <= 1e-4 · max |logit|
        (``tests/test_backends.py``).
    progress : bool or None
        Progress bar on stderr (None: only on a terminal, after :data:`DELAY_SECONDS`).
    label : str
        Name shown with the bar.

    Returns
    -------
    ndarray, shape (N, classes), float32

    Raises
    ------
    ValueError
        No images, ``batch_size`` < 1, unknown ``backend``, a graph with several inputs or outputs, a
        NaN/Inf parameter or a negative BN variance (naming the node), or a graph the ONNX exporter
        refuses (``backend="onnxruntime"``).
    ImportError
        ``backend="onnxruntime"`` without onnxruntime installed (names the extra ``ort``).

    Example
    -------
    >>> from dfmpc.engine.builders import resnet_cifar
    >>> g = resnet_cifar(8, seed=0)
    >>> x = np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32)
    >>> bool(np.allclose(logits(g, x, batch_size=3, progress=False), g.run(x), atol=1e-5))   # engine, by batches
    True
    """
    check_graph_params(graph)
    batch_size = _check_batch_size(batch_size)
    if len(x) == 0:
        raise ValueError(f"x: expected at least one image, got shape {np.shape(x)}")
    run = _runner(graph, backend, batch_size)
    out = []
    with Progress(len(x), label, progress) as bar:
        for i in range(0, len(x), batch_size):
            out.append(run(x[i:i + batch_size]))
            bar.update(min(i + batch_size, len(x)))
    return np.concatenate(out)


def accuracy(graph: Graph, x: np.ndarray, y: np.ndarray, batch_size: int = 500, progress=None, label: str = "",
             backend: str = "engine") -> float:
    """Top-1 accuracy: the fraction of ``argmax logits == y``, the logits from the engine or onnxruntime.

    Parameters
    ----------
    graph : Graph
        One input, one output. Every parameter finite, every BN variance >= 0 (checked first).
    x : ndarray, shape (N, C, H, W), float32, N >= 1
    y : ndarray, shape (N,), integer labels in ``[0, classes)``
    batch_size : int >= 1
        Images per call of the backend.
    progress : bool or None
        Show a progress bar on stderr (None: only when stderr is a terminal, after
        :data:`DELAY_SECONDS`).
    label : str
        Name shown with the bar.
    backend : {"engine", "onnxruntime"}
        As in :func:`logits`: the project's engine (default, the reference) or onnxruntime.

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    ValueError
        No images; ``batch_size`` < 1; unknown ``backend``; ``y`` not one integer label per image,
        negative, or not below the model's number of classes; logits not of shape (N, classes); a
        NaN/Inf parameter or a negative BN variance (naming the node).
    ImportError
        ``backend="onnxruntime"`` without onnxruntime installed (names the extra ``ort``).

    Example
    -------
    >>> from dfmpc.engine.builders import resnet_cifar
    >>> g = resnet_cifar(8, seed=0)
    >>> x = np.random.default_rng(0).normal(size=(6, 1, 28, 28)).astype(np.float32)
    >>> y = g.run(x).argmax(axis=1)                      # labels the network gets right by construction
    >>> accuracy(g, x, y, batch_size=4, progress=False)
    1.0
    """
    check_graph_params(graph)
    batch_size = _check_batch_size(batch_size)
    if len(x) == 0:
        raise ValueError(f"x: expected at least one image, got shape {np.shape(x)}")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y: expected shape ({len(x)},) (one label per image), got {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise ValueError(f"y: expected integer class labels, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"y: expected class labels >= 0, got {int(y.min())}")
    run = _runner(graph, backend, batch_size)
    correct = 0
    with Progress(len(x), label, progress) as bar:
        for i in range(0, len(x), batch_size):
            out = run(x[i:i + batch_size])
            if out.ndim != 2:
                raise ValueError(f"model output: expected logits of shape (N, classes), got {out.shape}")
            if i == 0 and y.max() >= out.shape[1]:
                raise ValueError(f"y: expected class labels below {out.shape[1]} (the model's number of classes), "
                                 f"got {int(y.max())}")
            correct += int(np.sum(out.argmax(axis=1) == y[i:i + batch_size]))
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
