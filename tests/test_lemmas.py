"""The inequalities that turn the feature-map loss (Eq. (9)) into the data-free objective (Eq. (22)).

Theorem 1, Lemma 1 and Lemma 2 as stated in data_free_derivations/02-04; each check has a
negative control showing that the checker can fail.
"""

import numpy as np
from hypothesis import given, settings, strategies as st

import dfmpc
from strategies import random_bn, uniform_arrays

relu = lambda x: np.maximum(x, 0.0)
shapes = st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple)


@given(st.data(), shapes, st.floats(0.0, 100.0, allow_subnormal=False), st.sampled_from(["independent", "b = a", "b = -a"]))
def test_lemma2_relu_bound_holds_for_nonnegative_c(data, shape, c, pairing):
    """Lemma 2: |c ReLU(a) - ReLU(b)| <= |c a - b| elementwise for every c >= 0 (float slack 1e-12 relative).

    a, b in [-1e3, 1e3] with zeros, ties, one sign and the end points (strategies.uniform_arrays);
    b also equal to a or to -a."""
    a = data.draw(uniform_arrays(shape, -1e3, 1e3))
    b = {"independent": lambda: data.draw(uniform_arrays(shape, -1e3, 1e3)), "b = a": a.copy, "b = -a": lambda: -a}[pairing]()
    lhs = np.abs(c * relu(a) - relu(b))
    rhs = np.abs(c * a - b)
    assert np.all(lhs <= rhs + 1e-12 * (np.abs(c * a) + np.abs(b)))


def test_lemma2_negative_control_fails_for_negative_c():
    """Lemma 2 needs c >= 0: for c = -1, a = 1, b = -1 the left side is 1 and the right side 0."""
    c, a, b = -1.0, 1.0, -1.0
    assert abs(c * relu(a) - relu(b)) > abs(c * a - b)
    rng = np.random.default_rng(0)          # and it fails on a large share of random points
    a, b = rng.normal(size=1000), rng.normal(size=1000)
    assert np.mean(np.abs(-0.5 * relu(a) - relu(b)) > np.abs(-0.5 * a - b) + 1e-12) > 0.1


def _single_channel_conv(A, K, stride, padding):
    return dfmpc.conv2d(A, K[None], stride=stride, padding=padding)


@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.sampled_from([1, 3]), st.integers(1, 2), st.booleans())
def test_lemma1_convolution_norm_bound(seed, I, k, stride, pad):
    """Lemma 1: ||K * A||^2 <= kh kw ||K||^2 ||A||^2 (zero padding, any stride), Cauchy-Schwarz per output position."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(2, I, 7, 6)) * rng.uniform(0.01, 10)
    K = rng.normal(size=(I, k, k))
    out = _single_channel_conv(A, K, stride, k // 2 if pad else 0)
    assert np.sum(out**2) <= k * k * np.sum(K**2) * np.sum(A**2) * (1 + 1e-12)


def test_lemma1_negative_control_without_kernel_factor():
    """Lemma 1 negative control: dropping the kh kw factor breaks the bound (constant input, constant 3x3 kernel)."""
    A, K = np.ones((1, 1, 8, 8)), np.ones((1, 3, 3))
    out = _single_channel_conv(A, K, 1, 1)
    assert np.sum(out**2) > np.sum(K**2) * np.sum(A**2)
    assert np.sum(out**2) <= 9 * np.sum(K**2) * np.sum(A**2)


def _pair(seed, I=3, C=6, O=4, N=3):
    rng = np.random.default_rng(seed)
    A = relu(rng.normal(size=(N, I, 6, 6)))                   # A^{l-1}: a post-ReLU input
    W = rng.normal(size=(C, I, 3, 3)) * np.exp(rng.uniform(-1.5, 1.5, (C, 1, 1, 1)))
    bn = random_bn(rng, C)
    W_next = rng.normal(size=(O, C, 3, 3))
    W_hat, alpha, _ = dfmpc.ternary(W)
    bn_hat = dfmpc.absorb_scale(bn, alpha)
    g, s = dfmpc.dorefa(W_next, 6)
    return rng, A, W, bn, W_next, W_hat, bn_hat, s * g


@given(st.integers(0, 2**32 - 1), st.sampled_from(["dfmpc", "random", "one"]))
@settings(max_examples=40)
def test_theorem1_loss_bounded_by_per_channel_activation_error(seed, which):
    """Theorem 1: sum_t||X~ - X||^2 <= 2 k^2 ||Q||^2 sum_j ||c_j A~_j - A_j||^2 + 2 ||(Q - W^{l+1}) * A||^2, any c >= 0."""
    rng, A, W, bn, Wn, W_hat, bn_hat, Q = _pair(seed)
    c = {"dfmpc": dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat), "random": rng.uniform(0, 3, W.shape[0]),
         "one": np.ones(W.shape[0])}[which]
    loss = dfmpc.feature_map_loss(A, W, bn, Wn, W_hat, bn_hat, Q, c, padding=1, padding_next=1)
    A_l = relu(bn(dfmpc.conv2d(A, W, padding=1)))
    A_tilde = relu(bn_hat(dfmpc.conv2d(A, W_hat, padding=1)))
    act_err = np.sum((c[None, :, None, None] * A_tilde - A_l) ** 2)
    quant_err = np.sum(dfmpc.conv2d(A_l, Q - Wn, padding=1) ** 2)
    bound = 2 * 9 * np.sum(Q**2) * act_err + 2 * quant_err
    assert loss <= bound * (1 + 1e-12)


def test_theorem1_negative_control_bound_without_quantization_term():
    """Theorem 1 negative control: leave out the high-bit error term and use a coarse 2-bit Q with c matched to A~ = A: the bound fails."""
    rng, A, W, bn, Wn, _, _, _ = _pair(7)
    g, s = dfmpc.dorefa(Wn, 2)
    Q = s * g
    loss = dfmpc.feature_map_loss(A, W, bn, Wn, W, bn, Q, np.ones(W.shape[0]), padding=1, padding_next=1)
    assert loss > 0.0              # with W_hat = W the activation error is 0, so the bound without the term would be 0


@given(st.integers(0, 2**32 - 1), st.floats(0.0, 3.0))
@settings(max_examples=40)
def test_data_free_objective_bounds_activation_error_eq22(seed, c_scale):
    """Lemma 1 + Lemma 2 give Eq. (20)-(22)'s bound: ||c_j A~_j - A_j||^2 <= 2 k^2 ||Gamma_j||^2 ||A||^2 + 2 P Theta_j^2."""
    rng, A, W, bn, Wn, W_hat, bn_hat, Q = _pair(seed)
    C = W.shape[0]
    c = c_scale * rng.uniform(0, 2, C)
    A_l = relu(bn(dfmpc.conv2d(A, W, padding=1)))
    A_tilde = relu(bn_hat(dfmpc.conv2d(A, W_hat, padding=1)))
    lhs = np.sum((c[None, :, None, None] * A_tilde - A_l) ** 2, axis=(0, 2, 3))        # per channel j
    Gamma_sq = dfmpc.data_free_loss(c, W, W_hat, bn, bn_hat, lambda1=0.0)              # ||Gamma_j||^2
    Theta_sq = (dfmpc.data_free_loss(c, W, W_hat, bn, bn_hat, lambda1=1.0) - Gamma_sq)  # Theta_j^2
    P = A_l.shape[0] * A_l.shape[2] * A_l.shape[3]                                       # positions, all samples
    rhs = 2 * 9 * Gamma_sq * np.sum(A**2) + 2 * P * Theta_sq
    assert np.all(lhs <= rhs * (1 + 1e-12) + 1e-12)


def test_data_free_bound_negative_control_without_bias_term():
    """O.a negative control: the bound without the Theta term fails when only the bias is wrong (W_hat = W, shifted beta)."""
    rng, A, W, bn, *_ = _pair(3)
    bn_hat = bn.replace(beta=bn.beta + 1.0)
    c = np.ones(W.shape[0])
    A_l = relu(bn(dfmpc.conv2d(A, W, padding=1)))
    A_tilde = relu(bn_hat(dfmpc.conv2d(A, W, padding=1)))
    lhs = np.sum((A_tilde - A_l) ** 2, axis=(0, 2, 3))
    Gamma_sq = dfmpc.data_free_loss(c, W, W, bn, bn_hat, lambda1=0.0)
    assert np.all(Gamma_sq < 1e-20) and np.any(lhs > 0)
