"""Quantizer properties: value sets, scale invariance, RTN error bound, idempotence (Eq. (3), (4), (6))."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import dfmpc
from strategies import filters

bits = st.integers(1, 16)
# Powers of two: W -> aW is then exact in floating point, so "invariant" can be tested bit for bit.
pow2 = st.integers(-20, 20).map(lambda e: 2.0**e)


@given(filters())
def test_ternary_value_set_and_threshold_eq3(W):
    """Eq. (3): W_hat in {-1, 0, 1}, non-zero exactly where |W| > Delta = 0.7 mean|W|, with W's sign."""
    W_hat, alpha, delta = dfmpc.ternary(W)
    assert set(np.unique(W_hat)) <= {-1.0, 0.0, 1.0}
    assert delta == pytest.approx(0.7 * np.abs(W).mean(), rel=1e-12)
    np.testing.assert_array_equal(W_hat != 0, np.abs(W) > delta)
    np.testing.assert_array_equal(W_hat[W_hat != 0], np.sign(W[W_hat != 0]))


@given(filters())
def test_ternary_alpha_is_least_squares_scale_eq4(W):
    """Eq. (4): alpha = mean |W| over the kept entries, the minimiser of ||W - a W_hat||^2 over a."""
    W_hat, alpha, _ = dfmpc.ternary(W)
    if not W_hat.any():
        assert alpha == 0.0 and not W.any()
        return
    a_ls = float(np.sum(W * W_hat) / np.sum(W_hat**2))  # 1-D least squares, independent formula
    assert alpha == pytest.approx(a_ls, rel=1e-12, abs=1e-300)


@given(filters(), bits)
def test_dorefa_levels_eq6(W, k):
    """Eq. (6): kQ(W) takes only the 2^k values -1 + 2i/(2^k - 1), and scale = max|W|."""
    W_grid, scale = dfmpc.dorefa(W, k)
    assert scale == np.abs(W).max()
    if scale == 0:
        assert not W_grid.any()
        return
    n = 2**k - 1
    i = (W_grid + 1) * n / 2
    # W_grid is computed to ~1e-16 absolute, so its level index to ~n*1e-16; 1e-10*n leaves margin.
    np.testing.assert_allclose(i, np.round(i), atol=1e-10 * n)
    assert i.min() >= -1e-10 * n and i.max() <= n * (1 + 1e-10)
    assert np.abs(W_grid).max() == pytest.approx(1.0)          # the extreme weight maps to +-1


@given(filters(), bits)
def test_dorefa_nearest_level_eq6(W, k):
    """Eq. (6) is round-to-nearest on the 2^k-level grid: the error of scale*kQ(W) is at most half a step."""
    W_grid, scale = dfmpc.dorefa(W, k)
    step = 2.0 * scale / (2**k - 1)
    assert np.all(np.abs(scale * W_grid - W) <= step / 2 * (1 + 1e-9) + 1e-12)


@given(filters(), pow2)
def test_grid_values_invariant_under_positive_scaling(W, a):
    """Eq. (3), (6) and RTN: the grid values of aW equal those of W for a > 0; the scale is multiplied by a."""
    Wt, alpha, _ = dfmpc.ternary(W)
    Wt2, alpha2, _ = dfmpc.ternary(a * W)
    np.testing.assert_array_equal(Wt, Wt2)
    assert alpha2 == pytest.approx(a * alpha, rel=1e-12)
    for k in (2, 6):
        g, s = dfmpc.dorefa(W, k)
        g2, s2 = dfmpc.dorefa(a * W, k)
        np.testing.assert_array_equal(g, g2)
        assert s2 == a * s
    q, q2 = dfmpc.uniform(W, 4, per_channel=True), dfmpc.uniform(a * W, 4, per_channel=True)
    np.testing.assert_array_equal(q.grid, q2.grid)


@given(filters(), st.integers(2, 16), st.booleans(), st.booleans())
def test_uniform_error_at_most_half_step(W, b, symmetric, per_channel):
    """RTN: every weight is inside the range, so |W - dequantize(uniform(W))| <= scale / 2."""
    q = dfmpc.uniform(W, b, symmetric=symmetric, per_channel=per_channel)
    err = np.abs(dfmpc.dequantize(q) - W)
    assert np.all(err <= q.scale / 2 * (1 + 1e-9) + 1e-300)
    lo, hi = (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1) if symmetric else (0, 2**b - 1)
    assert q.grid.min() >= lo and q.grid.max() <= hi
    np.testing.assert_array_equal(q.grid, np.round(q.grid))


@given(filters(), st.integers(2, 16))
def test_uniform_negative_control_outside_range(W, b):
    """RTN negative control for the half-step bound: a value far outside the clipping range breaks it."""
    q = dfmpc.uniform(W, b)
    if not np.any(q.scale > 0):
        return
    W_far = W.copy()
    W_far.flat[0] = 10 * np.abs(W).max() + 1.0           # outside [-max|W|, max|W|]
    grid = np.clip(np.round(W_far / q.scale), -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1)
    assert np.abs(dfmpc.dequantize(grid, q.scale) - W_far).max() > q.scale / 2


@given(filters(), bits)
def test_idempotence(W, k):
    """Quantizing already-quantized weights changes nothing (ternary, DoReFa Eq. (6), RTN)."""
    Wt, alpha, _ = dfmpc.ternary(W)
    np.testing.assert_array_equal(dfmpc.ternary(alpha * Wt)[0], Wt)
    g, s = dfmpc.dorefa(W, k)
    g2, s2 = dfmpc.dorefa(s * g, k)
    np.testing.assert_array_equal(g2, g)
    if k >= 2:
        q = dfmpc.uniform(W, k, per_channel=True)
        np.testing.assert_array_equal(dfmpc.uniform(dfmpc.dequantize(q), k, per_channel=True).grid, q.grid)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.float64])
def test_linear_layout_and_dtype_rule(dtype):
    """(out, in) linear weights work; the dtype rule: computed and returned in float64 whatever the input's
    real dtype (float32, float16, integers), equal to the float64 result; the input is not modified."""
    rng = np.random.default_rng(0)
    W = (rng.normal(size=(10, 7)) * 8).astype(dtype)
    W0, W64 = W.copy(), W.astype(np.float64)
    for got, ref in [(dfmpc.ternary(W)[0], dfmpc.ternary(W64)[0]), (dfmpc.dorefa(W, 6)[0], dfmpc.dorefa(W64, 6)[0]),
                     (dfmpc.uniform(W, 8, symmetric=False, per_channel=True).grid,
                      dfmpc.uniform(W64, 8, symmetric=False, per_channel=True).grid)]:
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, ref)
    assert dfmpc.uniform(W, 8, per_channel=True).scale.shape == (10, 1)
    np.testing.assert_array_equal(W, W0)


@pytest.mark.parametrize("shape", [(12,), (2, 3, 4), (2, 2, 3, 3, 1)])
def test_ternary_refuses_ranks_other_than_conv_and_gemm(shape):
    """TWN is per layer: OIHW conv (4-D) or (out, in) Gemm (2-D); a flattened or stacked tensor is refused."""
    with pytest.raises(ValueError, match=r"^W: expected OIHW conv \(4-D\) or \(out, in\) Gemm \(2-D\) weights, got shape"):
        dfmpc.ternary(np.ones(shape))


def test_all_zero_tensor_convention():
    """Q.0: all-zero weights quantize to zeros with scale 0 (documented convention)."""
    Z = np.zeros((2, 3, 3, 3))
    assert dfmpc.ternary(Z)[1:] == (0.0, 0.0)
    assert dfmpc.dorefa(Z, 2)[1] == 0.0
    q = dfmpc.uniform(Z, 4, symmetric=False)
    np.testing.assert_array_equal(dfmpc.dequantize(q), Z)


@pytest.mark.parametrize("fn", [lambda W: dfmpc.ternary(W), lambda W: dfmpc.dorefa(W, 4), lambda W: dfmpc.uniform(W, 4)])
@pytest.mark.parametrize("bad, match", [
    (np.array([[1.0, np.nan]]), "W: expected finite"),
    (np.array([[1.0, np.inf]]), "W: expected finite"),
    (np.zeros((0, 3)), "W: expected a non-empty"),
    (np.float64(3.0), "W: expected (at least 1|OIHW)"),
    (np.array([["a"]]), "W: expected an array of real numbers"),
])
def test_bad_weights_rejected(fn, bad, match):
    """NaN/Inf, empty, 0-d or non-numeric weights: error naming W."""
    with pytest.raises((ValueError, TypeError), match=match):
        fn(bad)


@pytest.mark.parametrize("k", [0, 17, -1, 2.0, True, "6"])
def test_bits_out_of_range_rejected(k):
    """k / bits outside [1, 16] (or not an int): error naming the argument."""
    W = np.ones((2, 2))
    with pytest.raises((ValueError, TypeError), match=r"^k: "):
        dfmpc.dorefa(W, k)
    with pytest.raises((ValueError, TypeError), match=r"^bits: "):
        dfmpc.uniform(W, k)
    with pytest.raises(ValueError, match=r"^bits: symmetric"):
        dfmpc.uniform(W, 1)
