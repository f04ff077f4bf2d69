"""Engine speed: dfmpc vs onnxruntime vs PyTorch CPU on a CIFAR-style ResNet-20, same weights.

Measures, in one run: images/s of the dfmpc engine, onnxruntime (CPU, same
thread count) and PyTorch CPU (when installed) on ResNet-20 at 1x28x28, batch
256, float32; the engine's achieved GFLOP/s (conv + linear multiply-adds, 2
FLOP each) and numpy's float32 matmul GFLOP/s measured in the same run.
Each figure is the median of ``--repeats`` timed runs after one warm-up run;
the engines are timed round-robin so that load from other processes hits all alike.

Usage::

    python benchmarks/engine.py --json            # one JSON object on stdout
    python benchmarks/engine.py --threads 2 --repeats 7
    python benchmarks/engine.py --json --conv-matmul blas     # engine convs through numpy's BLAS

The JSON records OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: they select numpy's
OpenBLAS kernels (this project's CI pins Haswell = AVX2), which matters for
the "numpy matmul" reference figure and for ``--conv-matmul blas``.  To see
OpenBLAS's own choice for the machine, unset both for one command:
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/engine.py --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="threads for every engine and for BLAS")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=16, help="dfmpc engine chunk size (images)")
    p.add_argument("--conv-kernel", choices=["auto", "direct", "im2col_blas", "winograd_f2", "winograd_f4"],
                   default="auto", help="dense-conv kernel of the engine: measured per shape (auto, default) "
                   "or one for every conv")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    return p.parse_args()


ARGS = _args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)        # before numpy / numba / torch are imported

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


def main():
    import onnxruntime as ort

    from dfmpc.engine import conv as engine_conv
    engine_conv.KERNEL = ARGS.conv_kernel
    graph = resnet_cifar(ARGS.depth, image_size=28, seed=0)
    x = np.random.default_rng(1).normal(size=(ARGS.batch, 1, 28, 28)).astype(np.float32)
    flops = conv_flops(graph, (1, 28, 28)) * ARGS.batch
    result = {"model": graph.name, "input_shape": list(x.shape), "dtype": "float32",
              "threads": ARGS.threads, "repeats": ARGS.repeats, "engine_chunk": ARGS.chunk,
              "engine_conv_kernel": ARGS.conv_kernel,
              "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
              "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
              "gflop_per_batch": flops / 1e9}

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = ARGS.threads, 1
    sess = ort.InferenceSession(to_onnx(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    runners = {"engine": lambda: graph.run(x, batch_size=ARGS.chunk),
               "onnxruntime": lambda: sess.run(None, {"input": x})[0]}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(ARGS.threads)
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
    if torch is not None:
        result.update({"torch_img_per_s": ARGS.batch / times["torch"],
                       "engine_vs_torch": times["torch"] / times["engine"],
                       "max_abs_logit_diff_vs_torch": float(np.abs(outputs["torch"] - ours).max()),
                       "torch_version": torch.__version__})
    else:
        result.update({"torch_img_per_s": None, "engine_vs_torch": None})
    flops_per_s = flops / times["engine"] / 1e9
    mm = _matmul_gflops(ARGS.repeats)
    result.update({"engine_gflop_per_s": flops_per_s, "numpy_matmul_gflop_per_s": mm,
                   "engine_fraction_of_matmul": flops_per_s / mm,
                   "onnxruntime_version": ort.__version__, "numpy_version": np.__version__,
                   "python": platform.python_version(), "machine": platform.machine(),
                   "cpu_count": os.cpu_count(), "load_average_1min_at_end": os.getloadavg()[0],
                   "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])})
    if ARGS.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:36s} {v:.4g}" if isinstance(v, float) else f"{k:36s} {v}")


if __name__ == "__main__":
    main()
