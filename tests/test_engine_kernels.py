"""Fast kernels against their twins: the engine convolution (NHWC im2col + BLAS, the Numba direct and
grouped kernels) against the float64 reference convolution dfmpc.conv2d, the matmul and the vectorised
pooling against their plain loops.  Winograd and the measured kernel choice: tests/test_engine_winograd.py."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dfmpc import conv2d as reference_conv2d
from dfmpc.engine import conv as conv_module
from dfmpc.engine.conv import conv2d_f32
from dfmpc.engine.pooling import avg_pool2d, global_avg_pool, max_pool2d
from dfmpc.engine.kernels_numba import conv3rows_nhwc, matmul_nt
from dfmpc.engine.reference_kernels import avg_pool2d_loops, matmul_nt_loops, max_pool2d_loops

# float32 kernels vs float64 twins on O(1) data with <= 17*3*3 = 153 terms per output:
# float32 rounding gives ~1e-6 relative error per term, so 1e-4 absolute is generous
# yet far below any real indexing mistake (which changes outputs by O(1)).
ATOL = 1e-4


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3, "depthwise"]))
    cg = draw(st.integers(1, 3))
    if groups == "depthwise":
        groups = draw(st.integers(1, 4))
        cg = 1
    c = cg * groups
    o = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))   # asymmetric allowed
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - pads[0] - pads[2]), 7))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - pads[1] - pads[3]), 7))
    n = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return n, c, h, w, o, groups, (kh, kw), (sh, sw), pads, (dh, dw), bias, seed


@settings(max_examples=60, deadline=None)
@given(conv_cases())
def test_conv2d_f32_matches_reference(case):
    """conv2d_f32 (every kernel it dispatches to) equals the float64 dfmpc.conv2d on random ONNX geometry."""
    n, c, h, w, o, groups, k, s, pads, d, bias, seed = case
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    wt = rng.normal(size=(o, c // groups) + k).astype(np.float32)
    b = rng.normal(size=o).astype(np.float32) if bias else None
    want = reference_conv2d(x, wt, s, pads, groups, dilation=d, bias=b)
    res = np.random.default_rng(seed + 1).normal(size=want.shape).astype(np.float32)
    saved = conv_module.COLS_BYTES, conv_module.KERNEL
    try:
        for kernel in ("auto", "direct", "im2col_blas"):     # Winograd: tests/test_engine_winograd.py
            conv_module.KERNEL = kernel
            conv_module.COLS_BYTES = saved[0]
            got = conv2d_f32(x, wt, b, s, pads, d, groups)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
            conv_module.COLS_BYTES = 1    # one image per im2col slice: the slicing loop is exercised
            got1 = conv2d_f32(x, wt, b, s, pads, d, groups, relu=True, residual=res)
            np.testing.assert_allclose(got1, np.maximum(want + res, 0), atol=ATOL, rtol=0)
    finally:
        conv_module.COLS_BYTES, conv_module.KERNEL = saved


def _thread_counts():
    return sorted({1, numba.config.NUMBA_NUM_THREADS})


class _numba_threads:
    """Run a block with ``numba.set_num_threads(n)``, restoring the previous count."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = numba.get_num_threads()
        numba.set_num_threads(self.n)

    def __exit__(self, *exc):
        numba.set_num_threads(self.saved)


@st.composite
def conv3rows_cases(draw):
    """Dense convs with 3 kernel rows and unit column dilation: the direct kernel's domain.
    Channel and pixel counts straddle multiples of 4 (the kernel's 4 x 4 blocks), runs kw*C
    straddle 16 (conv2d_f32's switch between the direct kernel and im2col + matmul_nt)."""
    c, o = draw(st.sampled_from([1, 2, 3, 5, 6, 8, 17])), draw(st.integers(1, 9))
    kw, sh, sw, dh = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, 2 * dh + 1 - pads[0] - pads[2]), 7))
    w = draw(st.integers(max(1, kw - pads[1] - pads[3]), 7))
    return draw(st.integers(1, 3)), c, h, w, o, kw, (sh, sw), pads, dh, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(conv3rows_cases())
def test_conv3rows_kernel_matches_reference(case):
    """The direct 3-row kernel (called directly, and through conv2d_f32 and its BLAS path) equals dfmpc.conv2d."""
    n, c, h, w, o, kw, s, pads, dh, relu, seed = case
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    wt = rng.normal(size=(o, c, 3, kw)).astype(np.float32)
    b = rng.normal(size=o).astype(np.float32)
    want = reference_conv2d(x, wt, s, pads, dilation=(dh, 1), bias=b)
    res = rng.normal(size=want.shape).astype(np.float32)
    # the kernel itself (conv2d_f32 only sends it runs kw*C >= 16): padded NHWC in, (P, O) out
    pt, pl, pb, pr = pads
    xp = np.zeros((n, h + pt + pb, w + pl + pr, c), np.float32)
    xp[:, pt:pt + h, pl:pl + w] = x.transpose(0, 2, 3, 1)
    oh, ow = want.shape[2:]
    res_rows = np.ascontiguousarray(res.transpose(0, 2, 3, 1)).reshape(-1, o)
    for threads in _thread_counts():
        for r in (None, res_rows):
            out = np.full((n * oh * ow, o), np.nan, np.float32)
            with _numba_threads(threads):
                conv3rows_nhwc(xp.reshape(-1), xp.shape, conv_module.dense_weight(wt), s, dh, (oh, ow),
                               b, relu, r, out)
            expect = want if r is None else want + res
            np.testing.assert_allclose(out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2),
                                       np.maximum(expect, 0) if relu else expect, atol=ATOL, rtol=0)
        with _numba_threads(threads):
            conv_module.KERNEL, saved = "direct", conv_module.KERNEL
            try:
                got = conv2d_f32(x, wt, b, s, pads, (dh, 1), relu=relu, residual=res)
            finally:
                conv_module.KERNEL = saved
        np.testing.assert_allclose(got, np.maximum(want + res, 0) if relu else want + res, atol=ATOL, rtol=0)
    saved = conv_module.KERNEL
    try:                                  # the BLAS path (im2col + np.matmul) gives the same
        conv_module.KERNEL = "im2col_blas"
        np.testing.assert_allclose(conv2d_f32(x, wt, b, s, pads, (dh, 1)), want, atol=ATOL, rtol=0)
    finally:
        conv_module.KERNEL = saved


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 13), st.integers(1, 40), st.integers(1, 11), st.booleans(), st.booleans(),
       st.integers(0, 2**16))
def test_matmul_nt_matches_loops(n_p, n_k, n_o, relu, with_res, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_p, n_k)).astype(np.float32)
    b = rng.normal(size=(n_o, n_k)).astype(np.float32)
    bias = rng.normal(size=n_o).astype(np.float32)
    res = rng.normal(size=(n_p, n_o)).astype(np.float32) if with_res else None
    want = matmul_nt_loops(a, b, bias, relu, res)
    for threads in _thread_counts():              # the serial and the thread-pool variant
        out = np.full((n_p, n_o), np.nan, np.float32)        # every entry must be written
        with _numba_threads(threads):
            matmul_nt(a, b, bias, relu, res, out)
        # <= 40 float32 products of O(1) terms summed in any order: 1e-4 absolute is generous
        np.testing.assert_allclose(out, want, atol=ATOL, rtol=0)


def test_conv2d_negative_control():
    """The twin comparison can fail: a flipped kernel differs from the true conv (by far more than ATOL)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 5, 5)).astype(np.float32)
    wt = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    want = reference_conv2d(x, wt, padding=(1, 1, 1, 1))
    got = conv2d_f32(x, np.ascontiguousarray(wt[:, :, ::-1, ::-1]), pads=(1, 1, 1, 1))
    assert np.abs(got - want).max() > 0.1


def test_conv2d_noncontiguous_input_and_depthwise():
    """Kernels accept strided views (the engine passes conv outputs as NHWC-memory views)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 6, 6)).astype(np.float32).transpose(1, 0, 2, 3)  # (3, 4, 6, 6) view
    for groups, wshape in [(1, (5, 4, 3, 3)), (4, (4, 1, 3, 3))]:
        wt = rng.normal(size=wshape).astype(np.float32)
        np.testing.assert_allclose(conv2d_f32(x, wt, None, (2, 1), (1, 0, 2, 1), (1, 1), groups),
                                   reference_conv2d(x, wt, (2, 1), (1, 0, 2, 1), groups), atol=ATOL, rtol=0)


def test_conv2d_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        conv2d_f32(np.zeros((1, 4, 5, 5), np.float32), np.zeros((2, 3, 3, 3), np.float32), groups=1)


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pads = (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)),
            draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)))   # pads < kernel (ONNX rule)
    h, w = draw(st.integers(kh, 7)), draw(st.integers(kw, 7))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w, (kh, kw), (sh, sw), pads,
            draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**16)))


@settings(max_examples=50, deadline=None)
@given(pool_cases(), st.integers(1, 2))
def test_max_pool_matches_loops(case, dil):
    n, c, h, w, k, s, pads, ceil, _, seed = case
    d = (dil, 1)
    if d[0] * (k[0] - 1) + 1 > h + pads[0] + pads[2]:
        d = (1, 1)
    x = np.random.default_rng(seed).normal(size=(n, c, h, w)).astype(np.float32)
    np.testing.assert_array_equal(max_pool2d(x, k, s, pads, d, ceil),
                                  max_pool2d_loops(x, k, s, pads, d, ceil).astype(np.float32))


@settings(max_examples=50, deadline=None)
@given(pool_cases())
def test_avg_pool_matches_loops(case):
    n, c, h, w, k, s, pads, ceil, include, seed = case
    x = np.random.default_rng(seed).normal(size=(n, c, h, w)).astype(np.float32)
    np.testing.assert_allclose(avg_pool2d(x, k, s, pads, ceil, include),
                               avg_pool2d_loops(x, k, s, pads, ceil, include), atol=1e-5)


def test_pool_negative_control():
    """count_include_pad changes border averages, so the avg-pool check is not vacuous."""
    x = np.ones((1, 1, 4, 4), np.float32)
    a = avg_pool2d(x, (3, 3), (1, 1), (1, 1, 1, 1), False, True)
    assert abs(a[0, 0, 0, 0] - 4 / 9) < 1e-6
    assert not np.allclose(a, avg_pool2d_loops(x, (3, 3), (1, 1), (1, 1, 1, 1), False, False))


def test_global_avg_pool():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(global_avg_pool(x)[:, :, 0, 0], x.astype(np.float64).mean(axis=(2, 3)), atol=1e-6)
