"""Buffer reuse in the engine: the padding kernel against np.pad, and the arena of conv outputs.

pad_nhwc is a copy (no arithmetic): it must equal its twin np.pad exactly (tolerance 0), for any
strides of the input.  The arena (dfmpc.engine.arena) must never let two live tensors share
memory and never hand arena memory to the caller: graphs whose tensors alias (Identity, in-place
Relu), run repeatedly, give the same bits as the same graph run without the arena.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dfmpc.engine import arena as arena_module
from dfmpc.engine import executor
from dfmpc.engine.graph import Graph, Node
from dfmpc.engine.kernels_numba import pad_nhwc, padded
from strategies import seeds


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), c=st.integers(1, 9),
       pads=st.tuples(*[st.integers(0, 3)] * 4), layout=st.sampled_from(["nhwc", "nchw_view", "strided"]),
       seed=seeds)
def test_pad_nhwc_equals_np_pad(n, h, w, c, pads, layout, seed):
    """pad_nhwc(x, pt, pl, out) == np.pad(x, ((0,0), (pt,pb), (pl,pr), (0,0))) bit for bit, on contiguous
    NHWC input, on the NHWC view of NCHW memory and on a strided slice; out starts as garbage (NaN)."""
    rng = np.random.default_rng(seed)
    pt, pl, pb, pr = pads
    if layout == "nhwc":
        x = rng.normal(size=(n, h, w, c)).astype(np.float32)
    elif layout == "nchw_view":
        x = rng.normal(size=(n, c, h, w)).astype(np.float32).transpose(0, 2, 3, 1)
    else:
        x = rng.normal(size=(n, 2 * h, w, 2 * c)).astype(np.float32)[:, ::2, :, ::2]
    out = np.full((n, h + pt + pb, w + pl + pr, c), np.nan, np.float32)
    pad_nhwc(x, pt, pl, out)
    assert np.array_equal(out, np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))))
    again = padded(x, pt, pl, h + pt + pb, w + pl + pr)          # the reused buffer, same result
    assert np.array_equal(again, out)


def test_pad_negative_control():
    """The comparison can fail: the left padding given as the top one is caught."""
    x = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    out = np.empty((2, 5, 5, 2), np.float32)
    pad_nhwc(x, 1, 0, out)
    assert not np.array_equal(out, np.pad(x, ((0, 0), (0, 2), (1, 0), (0, 0))))


def test_padded_keeps_only_small_buffers():
    """Above PAD_SCRATCH_BYTES the padded copy is a new array each call (no large buffer is kept)."""
    from dfmpc.engine import kernels_numba
    x = np.ones((1, 2, 2, 1), np.float32)
    saved = kernels_numba.PAD_SCRATCH_BYTES
    try:
        kernels_numba.PAD_SCRATCH_BYTES = 8
        a, b = padded(x, 1, 1, 4, 4), padded(x, 1, 1, 4, 4)
    finally:
        kernels_numba.PAD_SCRATCH_BYTES = saved
    assert not np.shares_memory(a, b) and a.sum() == b.sum() == 4


def test_arena_refuses_memory_that_a_live_tensor_shares():
    a = arena_module.Arena()
    x = a.empty((4, 3))
    view = x.T
    assert not a.release(x, live=[view])                 # an alias is alive: not taken back
    assert a.release(view, live=[])                      # the last reference (a view) dies: taken
    assert a.empty((4, 3)) is x
    assert not a.release(np.empty((4, 3), np.float32), live=[])   # not from this arena


def test_arena_respects_its_size_limit():
    a = arena_module.Arena(max_free_bytes=100)
    x = a.empty((10, 10))                                # 400 bytes
    assert not a.release(x, live=[])
    assert a.empty((10, 10)) is not x


def _aliasing_graph():
    """conv -> Identity -> Relu (in place) -> conv + Add(residual) -> Relu, with both convs' outputs
    reaching later nodes through aliases (Identity returns its input array)."""
    rng = np.random.default_rng(0)

    def conv(name, x, cin, cout):
        return Node(name, "Conv", [x], [name], {"kernel_shape": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1)},
                    {"W": rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32),
                     "B": rng.normal(0, 0.1, cout).astype(np.float32)})
    nodes = [conv("c1", "x", 2, 4), Node("id", "Identity", ["c1"], ["i1"]), Node("r1", "Relu", ["i1"], ["r1"]),
             conv("c2", "r1", 4, 4), Node("add", "Add", ["c2", "i1"], ["s"]), Node("r2", "Relu", ["s"], ["y"]),
             conv("c3", "y", 4, 4), Node("id2", "Identity", ["c3"], ["out"])]
    return Graph(nodes, ["x"], ["out"], {"x": (2, 6, 6)})


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_graph_runs_with_the_arena_equal_runs_without(batch_size, monkeypatch):
    """Same bits with and without buffer reuse, over repeated runs; results returned earlier are not
    overwritten by later runs (the caller owns its arrays)."""
    g = _aliasing_graph()
    x = np.random.default_rng(1).normal(size=(7, 2, 6, 6)).astype(np.float32)
    first = g.run_many(x, outputs=["out", "y", "c1"], batch_size=batch_size)
    kept = {k: v.copy() for k, v in first.items()}
    for _ in range(3):
        again = g.run_many(x, outputs=["out", "y", "c1"], batch_size=batch_size)
    for k in kept:
        assert np.array_equal(first[k], kept[k]), k          # not overwritten by later runs
        assert np.array_equal(again[k], kept[k]), k
    monkeypatch.setattr(arena_module, "thread_arena", lambda: arena_module.Arena(max_free_bytes=0))
    plain = g.run_many(x, outputs=["out", "y", "c1"], batch_size=batch_size)   # nothing reused
    for k in kept:
        assert np.array_equal(plain[k], kept[k]), k


def test_arena_negative_control(monkeypatch):
    """The check above can fail: an arena that takes back memory a live tensor still uses (no alias
    check) changes the result of the aliasing graph."""
    g = _aliasing_graph()
    x = np.random.default_rng(1).normal(size=(7, 2, 6, 6)).astype(np.float32)
    good = g.run(x, batch_size=7)

    class Careless(arena_module.Arena):
        def release(self, x, live):
            return super().release(x, live=[])
    careless = Careless()
    monkeypatch.setattr(arena_module, "thread_arena", lambda: careless)
    monkeypatch.setattr(executor, "SPLIT_BATCH", False)
    bad = g.run(x, batch_size=7)
    assert not np.array_equal(bad, good)


def test_frozen_weights_skip_the_change_check_and_others_do_not():
    """Layouts cached for a frozen (executor-private) weight array are used without comparing it;
    an ordinary array changed in place gets a new layout (negative control of the shortcut)."""
    from dfmpc.engine import conv as conv_module
    calls = []

    def make(v):
        calls.append(1)
        return v.copy()
    w = np.ones((2, 2), np.float32)
    conv_module._cached_weight(w, "t", make)
    w *= 2                                               # changed in place: rebuilt
    assert np.array_equal(conv_module._cached_weight(w, "t", make), w) and len(calls) == 2
    f = conv_module.freeze(np.ones((2, 2), np.float32))
    conv_module._cached_weight(f, "t", make)
    conv_module._cached_weight(f, "t", make)
    assert len(calls) == 3 and not f.flags.writeable
    with pytest.raises(ValueError):
        f *= 2                                           # frozen arrays cannot change in place
