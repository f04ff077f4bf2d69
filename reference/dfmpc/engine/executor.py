"""Run a :class:`~dfmpc.engine.graph.Graph` on a batch, chunk by chunk.

Each chunk of ``batch_size`` images flows through an execution plan built
from the nodes in topological order; a tensor is dropped as soon as its last
reader has run, so peak memory is bounded by one chunk's live activations.

The plan fuses, *at run time only*, a Conv whose only reader is a
BatchNormalization (and that BN's only reader, if a Relu) into one conv with
BN-scaled weights and bias; when the BN's only reader is a two-input Add (and
the Add's, if a Relu), the Add's other input is added in the conv's epilogue
(``relu(conv(x) + b + residual)``, one pass), the step running where the Add
stood.  A Relu or a two-input Add on a fresh tensor that nobody else reads
runs in place.  The graph itself is never changed: BN stays its own node
with its own parameters, and requesting an intermediate tensor as an output
turns the fusion off for it.  Fused and unfused runs agree to float32
rounding (see ``tests/test_engine_graph.py``).

Threads: with more than one Numba thread (``numba.get_num_threads()`` in the calling thread) and
at least two chunks, the chunks are shared among a pool of Python worker threads, one per Numba
thread, each running whole chunks through the plan with its kernels at *one* Numba thread
(``numba.set_num_threads`` is per thread), and the outputs are assembled in chunk order.  A
16-image chunk's convs are too small to split across threads (ResNet-20 on a 2-core Zen 3 ran
0.8x as fast at two threads as at one when each op was split); whole chunks are not.  The serial
kernels release the GIL; what else a chunk runs in Python is short.  Each chunk runs exactly the
kernels it runs at one thread, so the output is the same, bit for bit, at any thread count
(``tests/test_engine_threads.py``).  At one Numba thread (``NUMBA_NUM_THREADS=1`` or
``numba.set_num_threads(1)``), or with a single chunk, everything runs on the calling thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from . import arena as arena_module
from . import conv as conv_module
from .conv import conv2d_f32, conv_output_size, dense_weight
from .ops import OPS, _geometry
from .winograd import BLAS_LOCK

#: ops whose output is a new array owned by the executor (safe to overwrite in place)
FRESH_OPS = frozenset({"Conv", "BatchNormalization", "Add", "Mul", "Concat", "Gemm", "MaxPool",
                       "AveragePool", "GlobalAveragePool"})


def _check_input(graph, name, x):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"input {name!r} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"input {name!r} must be float32, got {x.dtype} (use x.astype(np.float32))")
    expected = graph.input_shapes.get(name)
    if expected is not None:
        want = (None,) + tuple(expected)
        if x.ndim != len(want) or any(e is not None and e != s for e, s in zip(want, x.shape)):
            shown = "(N, " + ", ".join("?" if e is None else str(e) for e in expected) + ")"
            raise ValueError(f"input {name!r} has shape {x.shape}, expected {shown}")


def _plan(graph, keep):
    """List of steps ``(kind, nodes)``: kind is "node", "conv_bn" (Conv, BN[, Relu]),
    "conv_bn_add" (Conv, BN, Add[, Relu]: the Add's other input enters the conv's epilogue),
    "relu_inplace" or "add_inplace[_1]" (the sum is written into an input that nobody else reads)."""
    readers = {}
    for n in graph.nodes:
        for t in n.inputs:
            readers.setdefault(t, []).append(n)

    def sole_reader(node, op):
        t = node.outputs[0]
        r = readers.get(t, [])
        return r[0] if len(r) == 1 and r[0].op == op and t not in keep and r[0].inputs == [t] else None

    def sole_add(node):
        t = node.outputs[0]
        r = readers.get(t, [])
        ok = (len(r) == 1 and r[0].op == "Add" and t not in keep and len(r[0].inputs) == 2
              and r[0].inputs.count(t) == 1 and "constant" not in r[0].params)
        return r[0] if ok else None

    # Conv -> BN -> Add [-> Relu] (a ResNet block's end) runs as one step at the Add's place,
    # when the other Add input exists; only one of the two convs feeding an Add can claim it.
    at_add, fused = {}, set()
    for n in graph.nodes:
        bn = sole_reader(n, "BatchNormalization") if n.op == "Conv" else None
        add = sole_add(bn) if bn is not None and sole_reader(bn, "Relu") is None else None
        if add is not None and id(add) not in at_add:
            relu = sole_reader(add, "Relu")
            group = [n, bn, add] + ([relu] if relu is not None else [])
            at_add[id(add)] = group
            fused.update(id(m) for m in group)

    steps = []
    producer_op = {}
    for n in graph.nodes:
        if id(n) in at_add:
            group = at_add[id(n)]
            steps.append(("conv_bn_add", group))
            producer_op[group[-1].outputs[0]] = "Conv"       # a new array from the conv
            continue
        if id(n) in fused:
            continue
        bn = sole_reader(n, "BatchNormalization") if n.op == "Conv" else None
        if bn is not None:
            relu = sole_reader(bn, "Relu")
            group = [n, bn] + ([relu] if relu is not None else [])
            fused.update(id(m) for m in group)
            steps.append(("conv_bn", group))
            producer_op[group[-1].outputs[0]] = "Relu" if relu is not None else "Conv"
            continue
        src = n.inputs[0] if n.inputs else None
        owned = [t for t in n.inputs if producer_op.get(t) in FRESH_OPS and len(readers.get(t, [])) == 1
                 and t not in keep and n.inputs.count(t) == 1]
        if n.op == "Relu" and src in owned:
            steps.append(("relu_inplace", [n]))
        elif n.op == "Add" and len(n.inputs) == 2 and owned and "constant" not in n.params:
            steps.append(("add_inplace" if owned[0] == n.inputs[0] else "add_inplace_1", [n]))
        else:
            steps.append(("node", [n]))
        producer_op[n.outputs[0]] = n.op
    return steps


def _step_inputs(kind, nodes):
    """Tensors a step reads: the first node's inputs, plus the residual of a conv_bn_add."""
    if kind == "conv_bn_add":
        return nodes[0].inputs + [t for t in nodes[2].inputs if t != nodes[1].outputs[0]]
    return nodes[0].inputs


def _fold_bn(conv, bn):
    """Conv weights and bias with the BN affine map applied: W' (O, C/g, kh, kw), b' (O,),
    and for dense convs W' as the im2col matrix (``dense_weight``), else None."""
    p = bn.params
    scale = p["gamma"] / np.sqrt(p["var"] + np.float32(bn.attrs.get("epsilon", 1e-5)))
    w = (conv.params["W"] * scale[:, None, None, None]).astype(np.float32)
    conv_module.freeze(w)                       # private to this run: kernels may cache its layouts unchecked
    b = (conv.params.get("B", 0.0) - p["mean"]) * scale + p["beta"]
    wt = dense_weight(w) if conv.attrs.get("group", 1) == 1 else None
    return w, b.astype(np.float32), wt


#: the BN-folded weights of earlier calls, ``(id(conv), id(bn)) -> ((conv ref, bn ref), copies of the
#: inputs, folded)``: reused while the parameters are unchanged, so that the kernels' cached layouts of
#: the folded weights (Winograd's transformed filters, the blocked layout; keyed by the array) are
#: reused from call to call as well. Remaking them took about 17 ms per ResNet-20 call, with the GIL
#: held (a profile of 256-image calls at two threads, 2026-12-06). Memory: while a graph's nodes live,
#: its conv weights are held about three more times (the copies, the folded weights, their layouts);
#: an entry goes when its conv or BN node is collected.
_FOLDED: dict = {}
_FOLDED_LOCK = threading.Lock()


def _fold_inputs(conv, bn):
    return (conv.params["W"], conv.params.get("B"), bn.params["gamma"], bn.params["beta"],
            bn.params["mean"], bn.params["var"], bn.attrs.get("epsilon", 1e-5))


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype == b.dtype and np.array_equal(a, b))
    return a == b


def _folded(conv, bn):
    """:func:`_fold_bn`, or the arrays it gave for these two nodes before, if every input (weights,
    bias, BN parameters, epsilon) equals the copy kept then: an edit in place or a new array with other
    values folds anew."""
    key = (id(conv), id(bn))
    now = _fold_inputs(conv, bn)
    with _FOLDED_LOCK:
        hit = _FOLDED.get(key)
    if hit is not None:
        (cref, bref), saved, out = hit
        if cref() is conv and bref() is bn and all(_same(a, b) for a, b in zip(now, saved)):
            return out
    out = _fold_bn(conv, bn)
    try:
        drop = lambda _, key=key: _FOLDED.pop(key, None)       # noqa: E731
        refs = (weakref.ref(conv, drop), weakref.ref(bn, drop))
    except TypeError:                                           # not weak-referenceable: no reuse
        return out
    saved = tuple(np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in now)
    with _FOLDED_LOCK:
        _FOLDED[key] = (refs, saved, out)
    return out


#: split a batch of several chunks across worker threads when more than one Numba thread is
#: available (see the module docstring); False: every chunk on the calling thread, each op split
#: across Numba's threads (the engine before the split; benchmarks/engine.py times both)
SPLIT_BATCH = True

#: ops whose kernel is a BLAS product (np.matmul): run under BLAS_LOCK, since two batch-split
#: workers each calling a threaded sgemm at once can wait on one BLAS worker
BLAS_OPS = frozenset({"Gemm", "MatMul"})


def _run_step(kind, nodes, env, folded):
    node = nodes[0]
    args = [env[t] for t in node.inputs]
    if kind == "node":
        if node.op in BLAS_OPS:
            with BLAS_LOCK:
                return OPS[node.op](node, *args)
        return OPS[node.op](node, *args)
    if kind == "relu_inplace":
        return np.maximum(args[0], np.float32(0), out=args[0])
    if kind in ("add_inplace", "add_inplace_1"):
        a, b = args if kind == "add_inplace" else args[::-1]    # a: the input we may overwrite
        if a.shape == b.shape and a.dtype == b.dtype == np.float32:
            return np.add(a, b, out=a)
        return OPS[node.op](node, *args)                   # broadcasting: new array
    x = args[0]                                            # conv_bn, conv_bn_add
    if x.ndim != 4:
        raise ValueError(f"expects a rank-4 input, got shape {x.shape}")
    w, b, wt = folded[node.name]
    strides, pads, dilations = _geometry(node, x, w.shape[2:])
    group = node.attrs.get("group", 1)
    if kind == "conv_bn":
        return conv2d_f32(x, w, b, strides, pads, dilations, group, wt=wt, relu=len(nodes) == 3)
    res = env[_step_inputs(kind, nodes)[-1]]
    relu = len(nodes) == 4
    out_shape = (x.shape[0], w.shape[0]) + tuple(
        conv_output_size(x.shape[2 + a], w.shape[2 + a], strides[a], pads[a], pads[2 + a], dilations[a])
        for a in range(2))
    if res.shape == out_shape and res.dtype == np.float32:
        return conv2d_f32(x, w, b, strides, pads, dilations, group, wt=wt, relu=relu, residual=res)
    y = OPS["Add"](nodes[2], conv2d_f32(x, w, b, strides, pads, dilations, group, wt=wt), res)  # broadcasting
    return np.maximum(y, np.float32(0), out=y) if relu else y


def run_graph(graph, x, outputs=None, batch_size=16):
    """Run ``graph``; returns ``{tensor name: array}`` for ``outputs`` (default: the graph outputs).

    See :meth:`Graph.run_many` for parameters and errors.
    """
    feeds = x if isinstance(x, dict) else ({graph.inputs[0]: x} if len(graph.inputs) == 1 else None)
    if feeds is None:
        raise ValueError(f"the graph has inputs {graph.inputs}: pass a dict {{name: array}}")
    missing = set(graph.inputs) - set(feeds)
    if missing:
        raise ValueError(f"missing graph inputs: {sorted(missing)}")
    for name, arr in feeds.items():
        if name not in graph.inputs:
            raise ValueError(f"{name!r} is not a graph input (inputs: {graph.inputs})")
        _check_input(graph, name, arr)
    sizes = {a.shape[0] for a in feeds.values()}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size: {sorted(sizes)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wanted = list(outputs) if outputs is not None else list(graph.outputs)
    known = set(graph.inputs).union(*(n.outputs for n in graph.nodes))
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise ValueError(f"unknown output tensors: {unknown}")

    steps = _plan(graph, set(wanted))
    folded = {nodes[0].name: _folded(nodes[0], nodes[1]) for kind, nodes in steps
              if kind in ("conv_bn", "conv_bn_add")}
    last_use = {}
    for i, (kind, nodes) in enumerate(steps):
        for t in _step_inputs(kind, nodes):
            last_use[t] = i
    total, batch_size = sizes.pop(), int(batch_size)
    starts = range(0, max(total, 1), batch_size)

    setting = conv_module.unmeasured if conv_module.is_unmeasured() else contextlib.nullcontext

    def chunk(start):
        with setting():                             # the caller's kernel-choice setting, in the worker too
            return _run_chunk(steps, folded, last_use, wanted, feeds, start, start + batch_size)

    threads = numba.get_num_threads()
    if SPLIT_BATCH and threads > 1 and len(starts) > 1:
        pool = worker_pool(threads)
        futures = [pool.submit(chunk, s) for s in starts]
        try:
            parts = [f.result() for f in futures]        # in chunk order; a worker's error re-raised
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    else:
        parts = [chunk(s) for s in starts]
    return {t: (np.concatenate([p[j] for p in parts]) if len(parts) > 1 else parts[0][j])
            for j, t in enumerate(wanted)}


def _run_chunk(steps, folded, last_use, wanted, feeds, start, stop):
    """The plan on images ``start:stop`` of ``feeds``; returns the ``wanted`` tensors (C-contiguous)."""
    env = {k: v[start:stop] for k, v in feeds.items()}
    keep = set(wanted)
    pool = arena_module.thread_arena()                  # conv outputs reuse the memory of dropped tensors
    with arena_module.use(pool):
        for i, (kind, nodes) in enumerate(steps):
            try:
                y = _run_step(kind, nodes, env, folded)
            except (ValueError, TypeError) as err:
                node = nodes[0]
                shapes = [env[t].shape for t in node.inputs]
                raise ValueError(f"node {node.name!r} ({node.op}) on input shapes {shapes}: {err}") from err
            env[nodes[-1].outputs[0]] = y
            for t in _step_inputs(kind, nodes):
                if last_use[t] == i and t not in keep:
                    dead = env.pop(t, None)
                    if dead is not None:
                        pool.release(dead, env.values())
    # the caller gets its own memory, never the arena's
    return [np.array(env[t], order="C") if pool.owner(env[t]) is not None else np.ascontiguousarray(env[t])
            for t in wanted]


_POOL = None
_POOL_KEY = None
_POOL_LOCK = threading.Lock()


def _one_numba_thread():
    numba.set_num_threads(1)                    # per thread: the caller's count is unchanged


def worker_pool(threads):
    """The worker threads that run whole chunks, ``threads`` of them, each at one Numba thread;
    made anew for another thread count and in a forked child process (the parent's threads do
    not exist there). The distillation of probe images runs its parts of a batch on them too
    (:func:`dfmpc.probes.distill`)."""
    global _POOL, _POOL_KEY
    key = (os.getpid(), threads)
    with _POOL_LOCK:
        if _POOL_KEY != key:
            if _POOL is not None and _POOL_KEY[0] == key[0]:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dfmpc-chunk",
                                       initializer=_one_numba_thread)
            _POOL_KEY = key
        return _POOL


def run_node(node, inputs, batch_size=128):
    """One node on a whole batch, ``batch_size`` images at a time (unfused, exactly the op's kernel).

    Parameters
    ----------
    node : Node
    inputs : list of ndarray, each (N, ...) float32
        The node's input tensors, in ``node.inputs`` order.
    batch_size : int >= 1

    Returns
    -------
    ndarray, shape (N, ...), float32

    Raises
    ------
    ValueError
        The op fails (the message names the node).
    """
    N = len(inputs[0])
    try:
        parts = [OPS[node.op](node, *[x[i:i + batch_size] for x in inputs]) for i in range(0, max(N, 1), batch_size)]
    except (ValueError, TypeError) as err:
        raise ValueError(f"node {node.name!r} ({node.op}) on input shapes {[x.shape for x in inputs]}: {err}") from err
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class NodeStream:
    """A batch carried node by node through a graph whose later nodes may still change.

    ``advance(name)`` runs every node up to and including ``name`` (in the graph's topological
    order) with the parameters the nodes hold *at that moment*, and returns that node's output.
    This is what a sequential pass needs: re-calibrate a layer, write its new parameters into the
    graph, then carry the batch on through it. Tensors are dropped after their last reader, so
    memory is bounded by the live activations of the whole batch (not of one chunk).

    Parameters
    ----------
    graph : Graph
        Read node by node as the stream advances (never copied, never modified).
    x : ndarray, shape (N, C, H, W), float32
        The batch fed to the graph's (single) input.
    batch_size : int
        Chunk size of each node's kernel call (bounds the kernels' scratch memory).
    """

    def __init__(self, graph, x, batch_size=128):
        if len(graph.inputs) != 1:
            raise ValueError(f"NodeStream: expected a graph with one input, got {graph.inputs}")
        _check_input(graph, graph.inputs[0], x)
        self.graph, self.batch_size = graph, int(batch_size)
        self.env = {graph.inputs[0]: x}
        self._next = 0                                  # index of the next node to run
        self._readers = {}
        for n in graph.nodes:
            for t in n.inputs:
                self._readers[t] = self._readers.get(t, 0) + 1
        self._index = {n.name: i for i, n in enumerate(graph.nodes)}

    def advance(self, name):
        """Run the nodes up to and including ``name``; return its output (N, ...) float32.

        Raises
        ------
        ValueError
            ``name`` is not a node of the graph, or it has already been passed.
        """
        if name not in self._index:
            raise ValueError(f"NodeStream.advance: no node named {name!r}")
        stop = self._index[name]
        if stop < self._next - 1:
            raise ValueError(f"NodeStream.advance: node {name!r} has already been passed")
        while self._next <= stop:
            node = self.graph.nodes[self._next]
            self.env[node.outputs[0]] = run_node(node, [self.env[t] for t in node.inputs], self.batch_size)
            for t in node.inputs:
                self._readers[t] -= 1
                if self._readers[t] == 0 and t not in self.graph.outputs:
                    self.env.pop(t, None)
            self._next += 1
        return self.env[self.graph.nodes[stop].outputs[0]]
