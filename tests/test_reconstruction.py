"""Exact reconstruction (Eq. (9)): the float64 reference conv2d (checked against SciPy), the true
feature-map loss, and the oracle c."""

import numpy as np
import pytest
import scipy.optimize
import scipy.signal
from hypothesis import given, settings, strategies as st

import dfmpc
from strategies import random_bn


def conv2d_via_scipy(x, W, stride, pads, dilation, groups, bias):
    """Oracle from outside the project: per output channel, scipy.signal.correlate ('valid', direct) of the
    padded input's channel group with the dilated kernel (zeros between the taps), then every stride-th value."""
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = stride, pads, dilation
    O, Cg, kh, kw = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    W_dilated = np.zeros((O, Cg, dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    W_dilated[:, :, ::dh, ::dw] = W
    g = np.arange(O) // (O // groups)
    y = np.array([[scipy.signal.correlate(xp[n, g[o] * Cg:(g[o] + 1) * Cg], W_dilated[o], mode="valid",
                                          method="direct")[0] for o in range(O)] for n in range(len(x))])
    return y[:, :, ::sh, ::sw] + bias[None, :, None, None]


@st.composite
def conv_geometry(draw):
    """Shapes and ONNX geometry for the reference conv: groups (incl. depthwise), asymmetric pads, dilation."""
    groups, cg = draw(st.sampled_from([1, 2, 3])), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - pads[0] - pads[2]), 7))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - pads[1] - pads[3]), 7))
    shape_x = (draw(st.integers(1, 2)), groups * cg, h, w)
    shape_W = (groups * draw(st.integers(1, 2)), cg, kh, kw)
    return shape_x, shape_W, stride, pads, dilation, groups, draw(st.integers(0, 2**32 - 1))


@given(conv_geometry())
@settings(max_examples=60)
def test_conv2d_matches_scipy_correlate(case):
    """dfmpc.conv2d, the float64 reference every engine conv kernel is tested against, equals SciPy's
    cross-correlation on any stride, asymmetric padding, dilation and groups (float64, <= 18 terms: 1e-12)."""
    shape_x, shape_W, stride, pads, dilation, groups, seed = case
    rng = np.random.default_rng(seed)
    x, W, b = rng.normal(size=shape_x), rng.normal(size=shape_W), rng.normal(size=shape_W[0])
    y = dfmpc.conv2d(x, W, stride, pads, groups, dilation=dilation, bias=b)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, conv2d_via_scipy(x, W, stride, pads, dilation, groups, b), rtol=1e-12, atol=1e-12)


def test_conv2d_scipy_check_negative_control():
    """The SciPy comparison can fail: swapping the kernel's axes or the pads changes the output by O(1)."""
    rng = np.random.default_rng(0)
    x, W, b = rng.normal(size=(1, 2, 6, 5)), rng.normal(size=(3, 2, 2, 3)), np.zeros(3)
    want = conv2d_via_scipy(x, W, (1, 1), (1, 0, 0, 1), (1, 1), 1, b)
    assert np.abs(dfmpc.conv2d(x, W[:, :, ::-1, ::-1], padding=(1, 0, 0, 1)) - want).max() > 0.1
    assert np.abs(dfmpc.conv2d(x, W, padding=(0, 1, 1, 0)) - want).max() > 0.1


def test_conv2d_padding_forms_and_dtype():
    """padding p == (p, p) == (p, p, p, p); (ph, pw) == (ph, pw, ph, pw); float32/int input gives float64."""
    rng = np.random.default_rng(1)
    x, W = rng.normal(size=(2, 3, 5, 6)), rng.normal(size=(4, 3, 3, 3))
    y = dfmpc.conv2d(x, W, padding=1)
    np.testing.assert_array_equal(y, dfmpc.conv2d(x, W, padding=(1, 1)))
    np.testing.assert_array_equal(y, dfmpc.conv2d(x, W, padding=[1, 1, 1, 1]))
    np.testing.assert_array_equal(dfmpc.conv2d(x, W, padding=(2, 1)), dfmpc.conv2d(x, W, padding=(2, 1, 2, 1)))
    assert dfmpc.conv2d(x.astype(np.float32), W.astype(np.float32)).dtype == np.float64
    assert dfmpc.conv2d(np.ones((1, 1, 3, 3), int), np.ones((1, 1, 3, 3), int)).item() == 9.0


def test_conv2d_rejects_bad_input():
    """conv2d: mismatched channels, too-large kernels, bad geometry, NaN input -> ValueError naming the argument."""
    x = np.ones((1, 4, 5, 5))
    W = np.ones((2, 4, 3, 3))
    with pytest.raises(ValueError, match="W: shape"):
        dfmpc.conv2d(x, np.ones((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="W: shape"):
        dfmpc.conv2d(x, np.ones((3, 2, 3, 3)), groups=2)
    with pytest.raises(ValueError, match="W: kernel 7x7 larger"):
        dfmpc.conv2d(x, np.ones((2, 4, 7, 7)))
    with pytest.raises(ValueError, match=r"W: kernel 3x3 larger .*\(dilation 3x1\)"):
        dfmpc.conv2d(x, W, dilation=(3, 1))
    with pytest.raises(ValueError, match="x: expected an NCHW batch"):
        dfmpc.conv2d(x[0], W)
    for kw, name in [(dict(stride=0), "stride"), (dict(stride=(1, 1, 1)), "stride"), (dict(dilation=0), "dilation"),
                     (dict(padding=-1), "padding"), (dict(padding=(1, 1, 1)), "padding"), (dict(padding=1.5), "padding"),
                     (dict(groups=0), "groups"), (dict(groups=True), "groups"), (dict(bias=np.ones(3)), "bias")]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            dfmpc.conv2d(x, W, **kw)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="x: expected finite"):
        dfmpc.conv2d(x, W)


def make_pair(seed, *, N=12, I=6, C=12, O=10, H=8, spread=5.0):
    """A conv -> BN -> ReLU -> conv pair that looks like a trained one.

    Filters of layer l have per-channel norms spread log-uniformly over [1/spread, spread]
    (trained layers do; a single layer-wise ternary alpha cannot fit them all), the input is
    post-ReLU, and BN's running statistics are measured on that input, as training leaves them.
    Returns the full-precision pair, the MP2/6 pair (ternary grid + absorbed BN, 6-bit DoReFa)
    and the input A.
    """
    rng = np.random.default_rng(seed)
    A = np.maximum(rng.normal(size=(N, I, H, H)), 0.0)
    s = np.exp(rng.uniform(-np.log(spread), np.log(spread), C))
    W = rng.normal(size=(C, I, 3, 3)) * s[:, None, None, None] * 0.1
    X = dfmpc.conv2d(A, W, padding=1)
    bn = dfmpc.BatchNorm(gamma=rng.uniform(0.5, 1.5, C), beta=0.5 * rng.normal(size=C),
                         mean=X.mean(axis=(0, 2, 3)), var=X.var(axis=(0, 2, 3)))
    W_next = rng.normal(size=(O, C, 3, 3)) * 0.1
    W_hat, alpha, _ = dfmpc.ternary(W)
    g, scale = dfmpc.dorefa(W_next, 6)
    return A, (W, bn, W_next), (W_hat, dfmpc.absorb_scale(bn, alpha), scale * g)


def _loss(A, full, quant, c):
    return dfmpc.feature_map_loss(A, *full, *quant, c, padding=1, padding_next=1, batch_size=5)


def test_dfmpc_lowers_true_loss_on_trained_like_pairs_eq9():
    """Eq. (9) measured: on trained-like generated pairs, DF-MPC's data-free c lowers the true loss vs c = 1.

    Not a theorem (the data-free objective only bounds the loss, and ignores the input's mean):
    a statistical claim about the regime the method is for -- filters with unequal norms under
    one layer-wise ternary scale. Over 40 fixed seeds (measured when written: 97% improve,
    median loss ratio 0.57) we require at least 90% to improve and a median ratio <= 0.75.
    """
    ratios = []
    for seed in range(40):
        A, full, quant = make_pair(seed)
        c = dfmpc.compensation_coefficients(full[0], quant[0], full[1], quant[1])
        ratios.append(_loss(A, full, quant, c) / _loss(A, full, quant, None))
    ratios = np.array(ratios)
    assert np.mean(ratios < 1.0) >= 0.9
    assert np.median(ratios) <= 0.75


def test_dfmpc_gain_is_not_guaranteed_for_equal_norm_filters():
    """Eq. (9) negative control / honest limit: with equal-norm filters the gain is small and not always positive."""
    ratios = []
    for seed in range(10):
        A, full, quant = make_pair(seed, spread=1.0)
        c = dfmpc.compensation_coefficients(full[0], quant[0], full[1], quant[1])
        ratios.append(_loss(A, full, quant, c) / _loss(A, full, quant, None))
    assert max(ratios) > 1.0          # some seed gets worse ...
    assert np.median(ratios) < 1.0    # ... while the typical case still improves a little


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=15)
def test_oracle_is_at_least_as_good_as_any_c_eq9(seed):
    """Oracle c = argmin_{c >= 0} Eq. (9): its true loss is <= that of DF-MPC's c, of c = 1 and of random c >= 0."""
    A, full, quant = make_pair(seed, N=4, spread=float(np.random.default_rng(seed).uniform(1, 5)))
    c_star = dfmpc.oracle_coefficients(A, *full, *quant, padding=1, padding_next=1, batch_size=3)
    assert np.all(c_star >= 0)
    L_star = _loss(A, full, quant, c_star)
    rng = np.random.default_rng(seed)
    others = [dfmpc.compensation_coefficients(full[0], quant[0], full[1], quant[1]), None,
              rng.uniform(0, 2, full[0].shape[0])]
    for c in others:
        assert L_star <= _loss(A, full, quant, c) * (1 + 1e-9)


def test_oracle_matches_lsq_linear_on_explicit_design_matrix():
    """A3: the Gram-matrix NNLS of oracle_coefficients equals scipy.optimize.lsq_linear on the explicit matrix M (1e-6)."""
    A, full, quant = make_pair(11, N=3, C=5, O=3, H=6)
    W, bn, W_next = full
    W_hat, bn_hat, Q = quant
    x = dfmpc.pair_forward(A, W, bn, W_next, padding=1, padding_next=1).ravel()
    Z = np.maximum(bn_hat(dfmpc.conv2d(A, W_hat, padding=1)), 0)
    M = np.stack([dfmpc.conv2d(Z[:, j:j + 1], Q[:, j:j + 1], padding=1).ravel() for j in range(5)], axis=1)
    ref = scipy.optimize.lsq_linear(M, x, bounds=(0, np.inf), tol=1e-14, method="bvls").x
    c = dfmpc.oracle_coefficients(A, *full, *quant, padding=1, padding_next=1, batch_size=2)
    np.testing.assert_allclose(c, ref, rtol=1e-6, atol=1e-8)


def test_oracle_negative_control_detects_a_worse_c():
    """A3 negative control for the oracle check: perturbing c* makes the loss strictly larger."""
    A, full, quant = make_pair(5, N=4)
    c_star = dfmpc.oracle_coefficients(A, *full, *quant, padding=1, padding_next=1)
    assert _loss(A, full, quant, c_star * 1.05 + 0.01) > _loss(A, full, quant, c_star)


def test_feature_map_loss_zero_for_identical_pairs_and_batch_invariant():
    """Eq. (9) is 0 when the quantized pair equals the full one, and does not depend on batch_size."""
    A, full, quant = make_pair(2, N=7)
    assert dfmpc.feature_map_loss(A, *full, *full, padding=1, padding_next=1) == 0.0
    a = dfmpc.feature_map_loss(A, *full, *quant, padding=1, padding_next=1, batch_size=1)
    b = dfmpc.feature_map_loss(A, *full, *quant, padding=1, padding_next=1, batch_size=100)
    assert a == pytest.approx(b, rel=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        dfmpc.feature_map_loss(A, *full, *quant, batch_size=0)
    with pytest.raises(ValueError, match="W_next: expected 12 input channels"):
        dfmpc.pair_forward(A, full[0], full[1], full[2][:, :5], padding=1)
