"""Which convolution kernel runs: chosen by measurement per conv shape, remembered on disk per CPU.

The engine has several correct ways to compute a dense convolution
(:mod:`dfmpc.engine.conv`): the direct Numba kernels, im2col + BLAS, and Winograd
F(2x2, 3x3) / F(4x4, 3x3) for 3x3 stride-1 convs.  Which is fastest depends on the shape
and on the machine (vector width, cache sizes, the BLAS build, the thread count), so the
first time a shape is seen every applicable kernel is run on the actual input, timed, and
checked against the direct kernel; the fastest one that agrees is used from then on.

The choices are kept in memory and in a JSON file whose name carries a digest of the CPU
(:func:`cpu_signature`: model, LLVM's name for the core, its SIMD features) and of the
BLAS settings, so that a different machine measures afresh.  The file lives next to the
package's compiled Numba kernels (``dfmpc/engine/__pycache__``) or, when that directory is
not writable, in the user cache directory (``$XDG_CACHE_HOME/dfmpc`` or ``~/.cache/dfmpc``);
``DFMPC_CACHE_DIR`` overrides both.  The file is written atomically and is only an
optimisation: a missing or unreadable file just means measuring again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

#: SIMD features that decide which kernel wins (the subset of LLVM's host features recorded)
SIMD_FEATURES = ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni",
                 "avx512bf16", "avx512fp16", "amx-tile", "neon", "sve")

#: version of the candidate set, part of the file name: a file measured before a kernel was added
#: or its rules changed is not read (2: "blocked"; 3: the ``handicap`` of :func:`choose`; 4: the
#: channel-vectorised F(4x4) transforms, which changed which kernel wins; 5: "winograd_f4_numba";
#: 6: the BLAS handicap at one thread too)
CANDIDATES_VERSION = 6

#: timed runs per candidate when measuring (the minimum is kept), after one untimed run
REPEATS = 5

_memory: dict[str, dict] = {}
_loaded = False
_signature: dict | None = None

#: held while a shape is measured (:func:`choose`) and while the file is read or written: the
#: batch-split workers of :mod:`dfmpc.engine.executor` meet the same conv shapes at the same
#: time, and one of them measures while the others wait (re-entrant: callers may hold it around
#: their own look-up and :func:`choose`)
MEASURE_LOCK = threading.RLock()


def cpu_signature() -> dict:
    """The machine as the kernel choice sees it.

    Returns
    -------
    dict
        ``model`` (from /proc/cpuinfo or :func:`platform.processor`), ``llvm_cpu`` (LLVM's
        name for the host core, e.g. ``znver3``), ``simd`` (the :data:`SIMD_FEATURES` the host
        has), ``machine``, ``cpu_count`` and ``blas`` (OPENBLAS_CORETYPE, if set).
    """
    global _signature
    if _signature is None:
        import llvmlite.binding as ll
        feats = ll.get_host_cpu_features()
        _signature = {"model": _cpu_model(), "llvm_cpu": ll.get_host_cpu_name(),
                      "simd": [f for f in SIMD_FEATURES if feats.get(f, False)],
                      "machine": platform.machine(), "cpu_count": os.cpu_count(),
                      "blas": os.environ.get("OPENBLAS_CORETYPE")}
    return _signature


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _digest() -> str:
    return hashlib.sha256(json.dumps(cpu_signature(), sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Directory of the choice file: ``DFMPC_CACHE_DIR``, else the package's ``__pycache__`` when
    writable, else the user cache directory."""
    env = os.environ.get("DFMPC_CACHE_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent / "__pycache__"
    try:
        here.mkdir(exist_ok=True)
        if os.access(here, os.W_OK):
            return here
    except OSError:
        pass
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dfmpc"


def cache_path() -> Path:
    """The JSON file of this machine's choices."""
    return cache_dir() / f"kernel_choice-v{CANDIDATES_VERSION}-{_digest()}.json"


def _load():
    global _loaded
    with MEASURE_LOCK:
        if not _loaded:
            _read()
            _loaded = True


def _read():
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        _memory.update({k: v for k, v in data.get("choices", {}).items() if isinstance(v, dict)})
    except (OSError, ValueError):
        pass


def _save():
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:                                  # merge what other processes wrote meanwhile
            with open(path) as f:
                on_disk = json.load(f).get("choices", {})
        except (OSError, ValueError):
            on_disk = {}
        on_disk.update(_memory)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"cpu": cpu_signature(), "choices": on_disk}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass                                  # read-only everywhere: keep the choice in memory


@functools.lru_cache(maxsize=4096)
def shape_key(x_shape, w_shape, strides, pads, dilations, threads) -> str:
    """Key of one conv shape: input (batch rounded down to a power of two) and filter
    shapes, geometry and thread count (tuples; remembered, as it is asked for on every conv call)."""
    n = int(x_shape[0])
    nb = 1 << (n.bit_length() - 1) if n > 0 else 0
    return (f"n{nb} c{x_shape[1]} h{x_shape[2]} w{x_shape[3]} o{w_shape[0]} k{w_shape[2]}x{w_shape[3]} "
            f"s{strides[0]}x{strides[1]} p{'-'.join(map(str, pads))} d{dilations[0]}x{dilations[1]} t{threads}")


def lookup(key: str) -> str | None:
    """The kernel chosen for ``key`` (in memory or on disk), or None if never measured."""
    if not _loaded:
        _load()
    entry = _memory.get(key)
    return entry.get("kernel") if entry else None


def table() -> dict:
    """Every choice known to this process: ``{shape key: {"kernel": name, "ms": {name: time}}}``."""
    if not _loaded:
        _load()
    return {k: dict(v) for k, v in _memory.items()}


def choose(key: str, candidates: dict, reference: str, tolerance,
           handicap: dict | None = None) -> tuple[str, np.ndarray]:
    """Run every candidate, keep the fastest whose output agrees with ``reference``'s.

    Parameters
    ----------
    key : str
        :func:`shape_key` of the conv.
    candidates : dict of str -> callable
        ``name -> f()`` returning the conv output (a new array each call).
    reference : str
        Candidate whose output the others are compared with (the direct kernel).
    tolerance : float
        Largest absolute difference to the reference's output that a candidate may show.
    handicap : dict of str -> float, optional
        Factors applied to candidates' measured times before comparing them (a cost the isolated
        timing does not see); the recorded times are the measured ones.

    Returns
    -------
    name : str
    y : ndarray
        The chosen candidate's output (so the measuring call costs no extra run).
    """
    with MEASURE_LOCK:
        return _choose(key, candidates, reference, tolerance, handicap)


def _choose(key, candidates, reference, tolerance, handicap):
    outputs = {name: f() for name, f in candidates.items()}   # untimed: compiles, warms caches
    times = dict.fromkeys(candidates, float("inf"))
    for r in range(REPEATS):                   # round-robin, so that load from elsewhere hits all alike
        best = min(times.values())
        for name, f in candidates.items():
            if r > 1 and times[name] > 3 * best:    # clearly slower twice: stop timing it
                continue
            t = time.perf_counter()
            f()
            times[name] = min(times[name], time.perf_counter() - t)
    ref = outputs[reference]
    ok = [k for k in candidates if k == reference
          or (np.all(np.isfinite(outputs[k]) == np.isfinite(ref))
              and float(np.nanmax(np.abs(outputs[k] - ref), initial=0.0)) <= tolerance)]
    handicap = handicap or {}
    name = min(ok, key=lambda k: times[k] * handicap.get(k, 1.0))
    _memory[key] = {"kernel": name, "ms": {k: round(v * 1e3, 4) for k, v in times.items()},
                    "handicap": {k: v for k, v in handicap.items() if k in candidates},
                    "rejected": sorted(set(candidates) - set(ok))}
    _save()
    return name, outputs[name]


def forget():
    """Drop every choice from memory (the file stays); the next conv of each shape measures again."""
    global _loaded
    with MEASURE_LOCK:
        _memory.clear()
        _loaded = True
