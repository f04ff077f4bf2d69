"""The batch split of :func:`dfmpc.engine.executor.run_graph`: whole chunks on worker threads.

With more than one Numba thread and at least two chunks, the chunks run on Python worker threads,
each at one Numba thread.  Each chunk runs the same kernels as at one thread, so the outputs must
be the same bits at 1 and at 2 threads (not merely close); errors raised in a worker reach the
caller as the same ValueError naming the node.  No timing is asserted here (speed:
``benchmarks/engine.py``).
"""

import threading

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfmpc.engine import Graph, Node, executor
from dfmpc.engine import kernels_numba as kn
from dfmpc.engine.ops import OPS

from strategies import seeds

pytestmark = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                reason="needs NUMBA_NUM_THREADS >= 2 (a machine with 2+ cores)")


@pytest.fixture
def threads():
    """``threads(n)`` sets this thread's Numba thread count; the count is restored afterwards."""
    before = numba.get_num_threads()
    yield numba.set_num_threads
    numba.set_num_threads(before)


def _bn(name, src, dst, c, rng):
    return Node(name, "BatchNormalization", [src], [dst], {"epsilon": 1e-5},
                {"gamma": rng.uniform(0.5, 1.5, c).astype(np.float32), "beta": rng.normal(size=c).astype(np.float32),
                 "mean": rng.normal(size=c).astype(np.float32), "var": rng.uniform(0.5, 2, c).astype(np.float32)})


def _small_graph(fc_in=8):
    """Grouped conv + BN + ReLU, a dense 3x3 conv + BN + residual Add + ReLU (fused), a strided
    1x1 conv, global pooling and a Gemm: every kind of step the plan has, and the grouped
    (Numba-parallel at 2 threads) kernel that a worker must run serially."""
    rng = np.random.default_rng(0)
    w = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    nodes = [
        Node("gconv", "Conv", ["x"], ["g"], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1), "group": 2},
             {"W": w(8, 2, 3, 3)}),
        _bn("gbn", "g", "gb", 8, rng),
        Node("grelu", "Relu", ["gb"], ["a"]),
        Node("conv", "Conv", ["a"], ["c"], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1)}, {"W": w(8, 8, 3, 3)}),
        _bn("bn", "c", "cb", 8, rng),
        Node("add", "Add", ["cb", "a"], ["s"]),
        Node("relu", "Relu", ["s"], ["r"]),
        Node("down", "Conv", ["r"], ["d"], {"kernel_shape": (1, 1), "strides": (2, 2)}, {"W": w(8, 8, 1, 1)}),
        Node("gap", "GlobalAveragePool", ["d"], ["p"]),
        Node("flat", "Flatten", ["p"], ["f"]),
        Node("fc", "Gemm", ["f"], ["y"], {}, {"W": w(3, fc_in), "B": w(3)}),
    ]
    return Graph(nodes, ["x"], ["y"], {"x": (4, 9, 9)})


def _record_threads(monkeypatch):
    """Names of the threads that ran a GlobalAveragePool (one per chunk)."""
    seen, op = [], OPS["GlobalAveragePool"]

    def recording(node, x):
        seen.append(threading.current_thread().name)
        return op(node, x)
    monkeypatch.setitem(OPS, "GlobalAveragePool", recording)
    return seen


def test_small_graph_same_bits_at_1_and_2_threads(threads, monkeypatch):
    g = _small_graph()
    x = np.random.default_rng(1).normal(size=(11, 4, 9, 9)).astype(np.float32)
    outs = ["y", "r", "a"]                       # an intermediate turns its fusion off
    seen = _record_threads(monkeypatch)
    threads(1)
    one = g.run_many(x, outputs=outs, batch_size=3)
    assert seen == ["MainThread"] * 4            # 4 chunks on the calling thread
    seen.clear()
    threads(2)
    two = g.run_many(x, outputs=outs, batch_size=3)
    assert len(seen) == 4 and all(s.startswith("dfmpc-chunk") for s in seen)   # the split did run
    assert numba.get_num_threads() == 2          # the workers' one thread is theirs only
    for t in outs:
        assert two[t].shape == one[t].shape and two[t].flags.c_contiguous
        np.testing.assert_array_equal(two[t], one[t])
    whole = g.run_many(x, outputs=outs, batch_size=64)   # one chunk: the calling thread, Numba's pool
    assert seen[4:] == ["MainThread"]
    for t in outs:                               # other kernels' rounding: close, not equal
        np.testing.assert_allclose(whole[t], one[t], rtol=1e-5, atol=1e-4)


def test_chunks_assembled_in_order(threads):
    """Each chunk's rows are that chunk's output computed alone (a mix-up of chunks would show;
    compared chunk by chunk, since a Gemm on 1 row rounds unlike one on 2)."""
    g = _small_graph()
    x = np.random.default_rng(2).normal(size=(7, 4, 9, 9)).astype(np.float32)
    threads(2)
    y = g.run(x, batch_size=2)
    threads(1)
    for s in range(0, len(x), 2):
        np.testing.assert_array_equal(y[s:s + 2], g.run(x[s:s + 2], batch_size=2))


@pytest.mark.parametrize("arch, n, chunk", [("resnet20", 40, 16), ("mobilenetv2_small", 20, 8)])
def test_zoo_model_same_bits_at_1_and_2_threads(threads, arch, n, chunk):
    from dfmpc.evaluation import load_zoo_model
    g = load_zoo_model(arch)
    x = np.random.default_rng(3).normal(size=(n,) + tuple(g.input_shapes[g.inputs[0]])).astype(np.float32)
    threads(1)
    one = g.run(x, batch_size=chunk)             # measures each conv shape's kernel at 1 thread
    threads(2)
    two = g.run(x, batch_size=chunk)             # the workers use those choices
    assert np.isfinite(one).all()
    np.testing.assert_array_equal(two, one)


def test_worker_error_reaches_caller_as_the_same_value_error(threads):
    g = _small_graph(fc_in=5)                    # the Gemm's weight does not fit its 8 inputs
    x = np.random.default_rng(4).normal(size=(6, 4, 9, 9)).astype(np.float32)
    threads(1)
    with pytest.raises(ValueError) as serial:
        g.run(x, batch_size=2)
    threads(2)
    with pytest.raises(ValueError) as split:
        g.run(x, batch_size=2)
    assert "node 'fc' (Gemm)" in str(split.value) and "expected (N, 5)" in str(split.value)
    assert str(split.value) == str(serial.value)
    assert isinstance(split.value.__cause__, ValueError)       # the op's own error, chained
    assert _small_graph().run(x, batch_size=2).shape == (6, 3)  # the pool works after a failure


def test_one_numba_thread_is_per_thread(threads):
    """What the split relies on: a worker's set_num_threads(1) leaves the caller's count alone."""
    threads(2)
    pool = executor.worker_pool(2)
    assert pool.submit(numba.get_num_threads).result() == 1
    assert numba.get_num_threads() == 2


@settings(max_examples=20, deadline=None)
@given(seed=seeds, n=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]), k=st.integers(1, 3),
       stride=st.integers(1, 2))
def test_grouped_conv_serial_twin_same_bits(seed, n, groups, k, stride):
    """The serial grouped kernel (run by workers) equals the parallel one bit for bit."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4, 6, 7)).astype(np.float32)
    w = rng.normal(size=(8, 4 // groups, k, k)).astype(np.float32)
    oh, ow = (6 + 2 - k) // stride + 1, (7 + 2 - k) // stride + 1
    args = (x, w, groups, stride, stride, 1, 1, 1, 1, oh, ow)
    ser, par = kn._conv_grouped_ser(*args), kn._conv_grouped_par(*args)
    assert ser.shape == (n, 8, oh, ow) and np.abs(ser).max() > 0
    np.testing.assert_array_equal(ser, par)


def test_serial_kernels_release_the_gil():
    """The kernels a worker runs at one Numba thread are compiled ``nogil``, else the workers would
    take turns; a kernel compiled without it is the negative control (the check can fail)."""
    from dfmpc.engine import blocked, winograd
    serial = [kn._matmul_nt_ser, kn._conv3rows_ser, kn._conv_grouped_ser, blocked._conv_blocked_ser,
              winograd.input_kernel(2, 3), winograd.input_kernel(4, 3),
              winograd.output_kernel(2, 3), winograd.output_kernel(4, 3)]
    assert all(k.targetoptions.get("nogil") is True for k in serial)
    assert not numba.njit(lambda a: a + 1).targetoptions.get("nogil", False)


def test_num_threads_is_numba_get_num_threads_on_every_thread():
    """kn.num_threads() (the lock-free read the kernels use) equals numba.get_num_threads() after
    numba.set_num_threads on the calling thread and in another thread (the setting is per thread)."""
    before = numba.get_num_threads()
    try:
        for n in (1, before):
            numba.set_num_threads(n)
            assert kn.num_threads() == numba.get_num_threads() == n
        seen = []

        def other():
            numba.set_num_threads(1)
            seen.append((kn.num_threads(), numba.get_num_threads()))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen == [(1, 1)] and kn.num_threads() == numba.get_num_threads() == before
    finally:
        numba.set_num_threads(before)
