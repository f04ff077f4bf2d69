"""Engine speed: dfmpc vs onnxruntime vs PyTorch CPU on a CIFAR-style ResNet-20, same weights.

Measures, in one run: images/s of the dfmpc engine, onnxruntime (CPU, same
thread count) and PyTorch CPU (when installed) on ResNet-20 at 1x28x28, batch
256, float32, at each thread count of ``--threads`` (default 1 and 2, each in
its own child process, since thread pools are sized at import); the engine's
achieved GFLOP/s (conv + linear multiply-adds, 2 FLOP each, as a direct conv
counts them) and numpy's float32 matmul GFLOP/s measured in the same run; the
machine (CPU model, LLVM's name for the core, SIMD features); the conv kernel
the engine chose for each conv shape (with the times it measured); and the
first-use cost: a child process with empty Numba and kernel-choice caches runs
the network once (compiling the kernels and measuring the candidates) and then
again.  Each speed figure is the median of ``--repeats`` timed runs after one
warm-up run; the engines are timed round-robin so that load from other
processes hits all alike.

At more than one thread the engine splits the batch: whole chunks run on worker threads, one
Numba thread each (:mod:`dfmpc.engine.executor`); the same child also times the engine without
the split (``engine_op_split``: each op across the threads, as before) and measures
``parallel_headroom``, the speed-up that a trivially parallel GIL-free loop gets from the extra
threads at that moment: on a machine shared with other jobs, the ceiling of any thread scaling.

Usage::

    python benchmarks/engine.py --json            # one JSON object on stdout
    python benchmarks/engine.py --json --out benchmarks/results/engine.json
    python benchmarks/engine.py --threads 2 --repeats 7
    python benchmarks/engine.py --json --conv-kernel im2col_blas   # one kernel for every conv

The JSON records OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: they select numpy's
OpenBLAS kernels, which matters for the "numpy matmul" reference figure and for
the BLAS-based conv kernels (im2col + BLAS, Winograd's products).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (for every engine and BLAS)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=16, help="dfmpc engine chunk size (images)")
    p.add_argument("--conv-kernel", choices=["auto", "direct", "blocked", "im2col_blas", "winograd_f2", "winograd_f4", "winograd_f4_numba"],
                   default="auto", help="dense-conv kernel of the engine: measured per shape (auto, default) "
                   "or one for every conv")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--out", help="also write the JSON object to this file")
    p.add_argument("--no-first-use", action="store_true", help="skip the fresh-cache (compile time) run")
    p.add_argument("--child", choices=["speed", "first_use"], help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = _args()
if ARGS.child:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)    # before numpy / numba / torch are imported

import numpy as np  # noqa: E402

from dfmpc.engine.builders import conv_flops, resnet_cifar  # noqa: E402
from dfmpc.interop import to_onnx  # noqa: E402


def _median_time(fn, repeats):
    fn()                                        # warm-up (JIT compilation, allocator)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _interleaved_times(runners, repeats):
    """Median seconds per call of each runner, timed round-robin so load changes hit all alike."""
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, f in runners.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def _headroom_runners(threads, n=60_000_000):
    """Two runners for the round-robin timing: ``threads`` copies of a GIL-free Numba loop run one
    after another on one thread, and at once on ``threads`` Python threads.  The ratio of their
    times (``parallel_headroom``) is how much of the extra cores the machine gives during the run
    (2.0 on an idle 2-core machine; less while other jobs run): the ceiling of any engine's thread
    scaling measured in it."""
    from concurrent.futures import ThreadPoolExecutor

    from numba import njit

    @njit(nogil=True)
    def spin(m):
        s = 0.0
        for i in range(m):
            s += np.sqrt(np.float64(i))
        return s
    spin(10)
    pool = ThreadPoolExecutor(threads)

    def serial():
        for _ in range(threads):
            spin(n)

    def parallel():
        for f in [pool.submit(spin, n) for _ in range(threads)]:
            f.result()
    return {"spin_serial": serial, "spin_parallel": parallel}


def _matmul_gflops(repeats, n=1024):
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    t = _median_time(lambda: a @ b, repeats)
    return 2 * n**3 / t / 1e9


def _torch_model(graph):
    """The same ResNet in PyTorch, weights copied from ``graph`` (node names = module names)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self, n, widths=(16, 32, 64)):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
            blocks, cin = [], widths[0]
            for i, w in enumerate(widths):
                for j in range(n):
                    blocks.append(Block(cin, w, 2 if i > 0 and j == 0 else 1))
                    cin = w
            self.layers = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, 10)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))

    model = ResNet((ARGS.depth - 2) // 6)
    names = {"W": "weight", "B": "bias", "gamma": "weight", "beta": "bias", "mean": "running_mean",
             "var": "running_var"}
    state = {f"{n.name}.{names[k]}": torch.from_numpy(v) for n in graph for k, v in n.params.items()}
    model.load_state_dict(state, strict=False)
    return model.eval()


def _used_kernel_keys():
    """Record the conv shape keys the engine looks up (to report the kernel chosen for each)."""
    from dfmpc.engine import kernel_choice
    used, lookup = [], kernel_choice.lookup

    def recording(key):
        if key not in used:
            used.append(key)
        return lookup(key)
    kernel_choice.lookup = recording
    return used


def first_use():
    """Child process with empty caches: seconds of the first run (compile + measure) and of the second."""
    from dfmpc.engine import conv as engine_conv
    engine_conv.KERNEL = ARGS.conv_kernel
    graph = resnet_cifar(ARGS.depth, image_size=28, seed=0)
    x = np.random.default_rng(1).normal(size=(ARGS.batch, 1, 28, 28)).astype(np.float32)
    t = time.perf_counter()
    graph.run(x, batch_size=ARGS.chunk)
    first = time.perf_counter() - t
    t = time.perf_counter()
    graph.run(x, batch_size=ARGS.chunk)
    second = time.perf_counter() - t
    return {"threads": int(ARGS.threads), "first_run_s": first, "second_run_s": second,
            "first_use_cost_s": first - second}


def speed():
    import onnxruntime as ort

    from dfmpc.engine import conv as engine_conv
    from dfmpc.engine import executor, kernel_choice
    engine_conv.KERNEL = ARGS.conv_kernel
    used = _used_kernel_keys()
    graph = resnet_cifar(ARGS.depth, image_size=28, seed=0)
    x = np.random.default_rng(1).normal(size=(ARGS.batch, 1, 28, 28)).astype(np.float32)
    flops = conv_flops(graph, (1, 28, 28)) * ARGS.batch
    result = {"threads": int(ARGS.threads), "load_average_1min_at_start": os.getloadavg()[0]}

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = int(ARGS.threads), 1
    sess = ort.InferenceSession(to_onnx(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    def run_engine(split=True):
        executor.SPLIT_BATCH = split
        try:
            return graph.run(x, batch_size=ARGS.chunk)
        finally:
            executor.SPLIT_BATCH = True
    runners = {"engine": run_engine, "onnxruntime": lambda: sess.run(None, {"input": x})[0]}
    if int(ARGS.threads) > 1:           # the engine before the batch split: each op across the threads
        runners["engine_op_split"] = lambda: run_engine(split=False)
        runners.update(_headroom_runners(int(ARGS.threads)))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(int(ARGS.threads))
        model, xt = _torch_model(graph), torch.from_numpy(x)

        def run_torch():
            with torch.inference_mode():
                return model(xt).numpy()
        runners["torch"] = run_torch
    outputs = {k: f() for k, f in runners.items()}             # warm-up + outputs to compare
    times = _interleaved_times(runners, ARGS.repeats)
    ours = outputs["engine"]
    result.update({
        "engine_img_per_s": ARGS.batch / times["engine"],
        "onnxruntime_img_per_s": ARGS.batch / times["onnxruntime"],
        "engine_vs_onnxruntime": times["onnxruntime"] / times["engine"],
        "max_abs_logit_diff_vs_onnxruntime": float(np.abs(ours - outputs["onnxruntime"]).max()),
        "max_abs_logit": float(np.abs(outputs["onnxruntime"]).max()),
    })
    if "engine_op_split" in times:
        result.update({"engine_op_split_img_per_s": ARGS.batch / times["engine_op_split"],
                       "engine_batch_split_vs_op_split": times["engine_op_split"] / times["engine"],
                       "max_abs_diff_batch_vs_op_split": float(np.abs(outputs["engine_op_split"] - ours).max())})
    if torch is not None:
        result.update({"torch_img_per_s": ARGS.batch / times["torch"],
                       "engine_vs_torch": times["torch"] / times["engine"],
                       "max_abs_logit_diff_vs_torch": float(np.abs(outputs["torch"] - ours).max()),
                       "torch_version": torch.__version__})
    else:
        result.update({"torch_img_per_s": None, "engine_vs_torch": None})
    flops_per_s = flops / times["engine"] / 1e9
    mm = _matmul_gflops(ARGS.repeats)
    table = kernel_choice.table()
    if int(ARGS.threads) > 1:
        result["parallel_headroom"] = times["spin_serial"] / times["spin_parallel"]
    result.update({"engine_gflop_per_s": flops_per_s, "numpy_matmul_gflop_per_s": mm,
                   "engine_fraction_of_matmul": flops_per_s / mm,
                   "conv_kernels": {k: table.get(k, {"kernel": "not measured (small: conv.small_conv_kernel)"}) for k in used},
                   "onnxruntime_version": ort.__version__,
                   "load_average_1min_at_end": os.getloadavg()[0]})
    return result


def _child(kind, threads, env=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--threads", str(threads),
           "--batch", str(ARGS.batch), "--depth", str(ARGS.depth), "--repeats", str(ARGS.repeats),
           "--chunk", str(ARGS.chunk), "--conv-kernel", ARGS.conv_kernel]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"{kind} run at {threads} threads failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if ARGS.child:
        print(json.dumps(speed() if ARGS.child == "speed" else first_use()))
        return
    from dfmpc.engine.kernel_choice import cpu_signature
    threads = [int(t) for t in ARGS.threads.split(",")]
    graph = resnet_cifar(ARGS.depth, image_size=28, seed=0)
    result = {"model": graph.name, "input_shape": [ARGS.batch, 1, 28, 28], "dtype": "float32",
              "repeats": ARGS.repeats, "engine_chunk": ARGS.chunk, "engine_conv_kernel": ARGS.conv_kernel,
              "gflop_per_batch": conv_flops(graph, (1, 28, 28)) * ARGS.batch / 1e9,
              "cpu": cpu_signature(), "cpu_count": os.cpu_count(),
              "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
              "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
              "numpy_version": np.__version__, "python": platform.python_version(),
              "load_average_1min_at_start": os.getloadavg()[0]}
    runs = {str(t): _child("speed", t) for t in threads}
    result["runs"] = runs
    if len(threads) > 1:
        lo, hi = str(min(threads)), str(max(threads))
        result["engine_thread_speedup"] = runs[hi]["engine_img_per_s"] / runs[lo]["engine_img_per_s"]
        result["onnxruntime_thread_speedup"] = runs[hi]["onnxruntime_img_per_s"] / runs[lo]["onnxruntime_img_per_s"]
        if "engine_op_split_img_per_s" in runs[hi]:
            result["engine_op_split_thread_speedup"] = (runs[hi]["engine_op_split_img_per_s"]
                                                        / runs[lo]["engine_img_per_s"])
    if not ARGS.no_first_use:
        with tempfile.TemporaryDirectory() as numba_dir, tempfile.TemporaryDirectory() as choice_dir:
            result["first_use"] = _child("first_use", min(threads),
                                         {"NUMBA_CACHE_DIR": numba_dir, "DFMPC_CACHE_DIR": choice_dir})
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    result["command"] = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    text = json.dumps(result)
    if ARGS.out:
        with open(ARGS.out + ".tmp", "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        os.replace(ARGS.out + ".tmp", ARGS.out)
    if ARGS.json:
        print(text)
    else:
        for t, r in runs.items():
            print(f"threads {t}: engine {r['engine_img_per_s']:.0f} img/s, onnxruntime "
                  f"{r['onnxruntime_img_per_s']:.0f} img/s, ratio {r['engine_vs_onnxruntime']:.2f}"
                  + (f", parallel headroom {r['parallel_headroom']:.2f}" if "parallel_headroom" in r else ""))
            for k, v in r["conv_kernels"].items():
                print(f"    {k:60s} {v['kernel']}")
        for k in ("engine_thread_speedup", "engine_op_split_thread_speedup", "onnxruntime_thread_speedup",
                  "first_use"):
            if k in result:
                print(f"{k}: {result[k]}")


if __name__ == "__main__":
    main()
