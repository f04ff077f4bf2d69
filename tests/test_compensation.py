"""The data-free objective (Eq. (20)-(22)), its closed form (Eq. (26)-(27)), absorption and folding."""

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

import dfmpc
from strategies import compensation_problems, filters, random_bn, uniform_arrays


def _naive_loss(c, W, W_hat, bn, bn_hat, lambda1, lambda2):
    """Plain per-channel loop twin of data_free_loss, written from Eq. (20)-(22)."""
    out = []
    for j in range(W.shape[0]):
        s, s_hat = np.sqrt(bn.var[j] + bn.eps), np.sqrt(bn_hat.var[j] + bn_hat.eps)
        Gamma = c[j] * bn_hat.gamma[j] / s_hat * W_hat[j] - bn.gamma[j] / s * W[j]            # Eq. (20)
        Theta = (c[j] * (bn_hat.beta[j] - bn_hat.gamma[j] * bn_hat.mean[j] / s_hat)
                 - (bn.beta[j] - bn.gamma[j] * bn.mean[j] / s))                                 # Eq. (21)
        out.append(np.sum(Gamma**2) + lambda1 * Theta**2 + lambda2 * c[j] ** 2)                 # Eq. (22)
    return np.array(out)


@given(compensation_problems(), st.data())
def test_data_free_loss_matches_naive_twin_eq22(problem, data):
    """Eq. (20)-(22): the vectorised objective equals a per-channel loop over the definition."""
    W, W_hat, bn, bn_hat, l1, l2 = problem
    c = data.draw(uniform_arrays((W.shape[0],), 0.0, 5.0))
    np.testing.assert_allclose(dfmpc.data_free_loss(c, W, W_hat, bn, bn_hat, l1, l2),
                               _naive_loss(c, W, W_hat, bn, bn_hat, l1, l2), rtol=1e-10, atol=1e-10)


def _numerical_argmin_1d(f):
    """argmin_{v >= 0} f(v) for a convex f, using only values of f (scipy's bounded Brent).

    An upper end U is found by doubling until f(2U) >= f(U) (for a convex f the minimiser
    is then <= 2U); Brent then searches [0, 2U].
    """
    U = 1.0
    while f(2 * U) < f(U) and U < 1e12:
        U *= 2
    res = scipy.optimize.minimize_scalar(f, bounds=(0.0, 2 * U), method="bounded",
                                         options=dict(xatol=1e-13 * U, maxiter=500))
    return min((res.x, 0.0), key=f)       # the bounded method never evaluates the end point itself


@given(compensation_problems(max_out=64))
@settings(max_examples=60)
def test_closed_form_equals_scipy_minimiser_eq27(problem):
    """Eq. (26)-(27) with c >= 0: the closed form equals scipy's minimiser of data_free_loss on c >= 0.

    Each channel is minimised on its own by scipy.optimize.minimize_scalar (bounded Brent),
    using only loss values. Tolerances: the closed-form loss is never above the solver's by more
    than 1e-12 of the loss scale (L_j(1) + 1); the argmins agree to 1e-5 (1 + |c|) on channels
    whose curvature (a second difference of the loss, not our formula) is at least 1e-3 of the
    loss scale -- on flatter channels the argmin is ill-determined by loss values in float64
    (|dc| ~ 1e-8 sqrt(scale / curvature)), and only the loss is compared.
    """
    W, W_hat, bn, bn_hat, l1, l2 = problem
    L = lambda c: dfmpc.data_free_loss(c, W, W_hat, bn, bn_hat, l1, l2)
    c_closed = dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat, l1, l2)
    O = W.shape[0]
    scale = L(np.ones(O)) + 1.0
    c_num = np.empty(O)
    for j in range(O):
        def f(v, j=j):
            c = c_closed.copy()
            c[j] = v
            return L(c)[j] / scale[j]
        c_num[j] = _numerical_argmin_1d(f)
    L_closed, L_num = L(c_closed), L(c_num)
    assert np.all(L_closed <= L_num + 1e-12 * scale)
    curvature = (L(c_closed + 1.0) + L(c_closed + 2.0) - 2 * L(c_closed + 1.5)) / 0.25 / 2  # = den_j
    well = curvature >= 1e-3 * scale
    np.testing.assert_allclose(c_num[well], c_closed[well], atol=1e-5, rtol=1e-5)


def test_closed_form_check_negative_control_eq27():
    """Eq. (27) negative control: the scipy comparison rejects a wrong formula (the paper's c without lambda1's bias term)."""
    rng = np.random.default_rng(4)
    W = rng.normal(size=(6, 3, 3, 3))
    bn = random_bn(rng, 6)
    W_hat, alpha, _ = dfmpc.ternary(W)
    bn_hat = dfmpc.absorb_scale(bn, alpha)
    wrong = dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat, lambda1=0.0)    # ignores Theta
    L = lambda c: dfmpc.data_free_loss(c, W, W_hat, bn, bn_hat, 0.5, 0.0)
    c_num = np.array([_numerical_argmin_1d(lambda v, j=j: L(np.where(np.arange(6) == j, v, 1.0))[j])
                      for j in range(6)])
    assert np.abs(c_num - wrong).max() > 1e-3


@given(compensation_problems(), st.sampled_from([1e-6, 1e-3, 0.1, 1.0]))
def test_no_perturbation_lowers_the_loss_eq27(problem, delta):
    """Eq. (27) is a minimiser on c >= 0: L(max(c +- delta (1 + c), 0)) >= L(c) (1e-12 relative slack for rounding)."""
    W, W_hat, bn, bn_hat, l1, l2 = problem
    L = lambda c: dfmpc.data_free_loss(c, W, W_hat, bn, bn_hat, l1, l2)
    c = dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat, l1, l2)
    assert np.all(c >= 0)
    L0 = L(c)
    for sign in (1, -1):
        Lp = L(np.maximum(c + sign * delta * (1 + c), 0.0))
        assert np.all(Lp >= L0 - 1e-12 * (1 + np.abs(L0)))


def test_perturbation_check_negative_control_eq27():
    """Eq. (27) negative control: the perturbation check does detect a non-minimiser (c scaled by 1.5)."""
    rng = np.random.default_rng(1)
    W = rng.normal(size=(8, 4, 3, 3))
    bn = random_bn(rng, 8)
    W_hat, alpha, _ = dfmpc.ternary(W)
    bn_hat = dfmpc.absorb_scale(bn, alpha)
    L = lambda c: dfmpc.data_free_loss(c, W, W_hat, bn, bn_hat)
    c = 1.5 * dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat)
    assert np.any(L(c * (1 - 1e-3)) < L(c))


@given(compensation_problems())
def test_objective_is_convex_quadratic_eq25(problem):
    """Eq. (25): each L_j is a quadratic in c_j with non-negative curvature (second differences agree and are >= 0)."""
    W, W_hat, bn, bn_hat, l1, l2 = problem
    L = lambda c: dfmpc.data_free_loss(np.full(W.shape[0], c), W, W_hat, bn, bn_hat, l1, l2)
    d1 = L(0.0) - 2 * L(1.0) + L(2.0)
    d2 = L(3.0) - 2 * L(4.0) + L(5.0)
    tol = 1e-9 * (1 + np.abs(L(0.0)) + np.abs(L(5.0)))
    assert np.all(d1 >= -tol)
    np.testing.assert_allclose(d1, d2, atol=10 * tol.max())    # constant curvature: a quadratic


def test_negative_numerator_projects_to_zero():
    """A1, our c >= 0 projection: a re-calibrated BN with opposite-sign gamma gives num < 0, so c = 0, the constrained argmin."""
    rng = np.random.default_rng(2)
    W = rng.normal(size=(3, 2, 3, 3))
    bn = dfmpc.BatchNorm(gamma=np.ones(3), beta=np.zeros(3), mean=np.zeros(3), var=np.ones(3))
    W_hat, alpha, _ = dfmpc.ternary(W)
    bn_hat = dfmpc.absorb_scale(bn, alpha).replace(gamma=-np.ones(3))
    c = dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat)
    np.testing.assert_array_equal(c, 0.0)
    L = lambda c: dfmpc.data_free_loss(c, W, W_hat, bn, bn_hat)
    assert np.all(L(np.zeros(3)) < L(np.full(3, 1e-3)))


def test_zero_denominator_gives_one_and_flat_loss():
    """A2, zero-denominator rule: an all-zero quantized filter with lambda1 yhat^2 + lambda2 = 0 gives c = 1, no NaN."""
    W = np.zeros((2, 1, 3, 3))
    W[0] = 1.0                                            # channel 0 normal, channel 1 all zero
    bn = dfmpc.BatchNorm(gamma=[1.0, 1.0], beta=[0.5, 0.0], mean=[0.0, 0.0], var=[1.0, 1.0])
    W_hat, alpha, _ = dfmpc.ternary(W)
    bn_hat = dfmpc.absorb_scale(bn, alpha)
    for l1 in (0.0, 0.5):                                 # yhat_1 = 0, so lambda1 does not matter for channel 1
        c = dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat, lambda1=l1, lambda2=0.0)
        assert np.all(np.isfinite(c)) and c[1] == 1.0
        L = lambda v: dfmpc.data_free_loss(np.array([c[0], v]), W, W_hat, bn, bn_hat, l1, 0.0)[1]
        assert L(0.0) == L(1.0) == L(7.0)
    # lambda2 > 0 removes the flatness: the ridge term alone pulls c to 0.
    assert dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat, 0.0, 1e-3)[1] == 0.0


def _conv_bn_relu(x, W, bn):
    return np.maximum(bn(dfmpc.conv2d(x, W, padding=1)), 0.0)


@given(filters(max_out=16), st.integers(0, 2**32 - 1), st.sampled_from(["ternary", "dorefa2", "dorefa6", "rtn_channel"]))
@settings(max_examples=50)
def test_fake_quant_equals_integer_grid_with_absorbed_bn(W, seed, quantizer):
    """Q.1, 'absorbed into BN' (Sec. 4.3): conv(x, s What) -> BN -> ReLU == conv(x, What) -> absorb_scale(BN, s) -> ReLU."""
    rng = np.random.default_rng(seed)
    bn = random_bn(rng, W.shape[0])
    if quantizer == "ternary":
        grid, s, _ = dfmpc.ternary(W)
    elif quantizer.startswith("dorefa"):
        grid, s = dfmpc.dorefa(W, int(quantizer[-1]))
    else:
        q = dfmpc.uniform(W, 4, per_channel=True)
        grid, s = q.grid, q.scale.reshape(-1)
        if np.any(s == 0):
            return
    if np.all(np.asarray(s) == 0):
        return
    x = rng.normal(size=(2, W.shape[1], 5, 5))
    s_b = np.asarray(s).reshape((-1,) + (1,) * (W.ndim - 1))
    fake = _conv_bn_relu(x, s_b * grid, bn)
    integer = _conv_bn_relu(x, grid, dfmpc.absorb_scale(bn, s))
    np.testing.assert_allclose(integer, fake, rtol=1e-9, atol=1e-9 * (1 + np.abs(fake).max()))


@given(filters(max_out=16), st.integers(0, 2**32 - 1))
@settings(max_examples=50)
def test_fold_into_bn_equals_scaling_next_layer_eq7(W, seed):
    """Folding (Sec. 4.3) vs Eq. (7): W_next * ReLU(BN_c(X)) == (c . W_next) * ReLU(BN(X)) for c >= 0."""
    rng = np.random.default_rng(seed)
    C = W.shape[0]
    bn = random_bn(rng, C)
    c = rng.uniform(0, 3, C) * (rng.uniform(size=C) > 0.2)          # include exact zeros
    W_next = rng.normal(size=(4, C, 3, 3))
    x = rng.normal(size=(2, W.shape[1], 5, 5))
    folded = dfmpc.conv2d(_conv_bn_relu(x, W, dfmpc.fold_into_bn(bn, c)), W_next, padding=1)
    scaled = dfmpc.conv2d(_conv_bn_relu(x, W, bn), dfmpc.scale_input_channels(W_next, c), padding=1)
    np.testing.assert_allclose(folded, scaled, rtol=1e-9, atol=1e-9 * (1 + np.abs(scaled).max()))


def test_folding_negative_control_needs_c_nonnegative():
    """F.a negative control: with some c_j < 0 the two forms differ (so c >= 0 is necessary), and both functions refuse it."""
    rng = np.random.default_rng(3)
    W, bn, W_next = rng.normal(size=(4, 2, 3, 3)), random_bn(rng, 4), rng.normal(size=(3, 4, 3, 3))
    c = np.array([1.0, -0.7, 2.0, 0.5])
    x = rng.normal(size=(2, 2, 5, 5))
    bn_c = dfmpc.BatchNorm(gamma=c * bn.gamma, beta=c * bn.beta, mean=bn.mean, var=bn.var, eps=bn.eps)
    folded = dfmpc.conv2d(_conv_bn_relu(x, W, bn_c), W_next, padding=1)
    scaled = dfmpc.conv2d(_conv_bn_relu(x, W, bn), W_next * c[None, :, None, None], padding=1)
    assert np.abs(folded - scaled).max() > 1e-3
    with pytest.raises(ValueError, match="c: expected c >= 0"):
        dfmpc.fold_into_bn(bn, c)
    with pytest.raises(ValueError, match="c: expected c >= 0"):
        dfmpc.scale_input_channels(W_next, c)


def test_absorb_scale_keeps_variance_valid_for_large_scales():
    """Q.1, absorb_scale: sigma_hat = sigma / s exactly, with varhat >= 0 even for s > 1 and zero running variance."""
    bn = dfmpc.BatchNorm(gamma=[1.0, 2.0], beta=[0.0, 1.0], mean=[0.5, -0.5], var=[0.0, 3.0], eps=1e-5)
    for s in (7.5, np.array([0.01, 30.0])):
        bn_hat = dfmpc.absorb_scale(bn, s)
        assert np.all(bn_hat.var >= 0)
        np.testing.assert_allclose(bn_hat.sigma, bn.sigma / s, rtol=1e-12)
        np.testing.assert_allclose(bn_hat.mean, bn.mean / s, rtol=1e-15)


# --------------------------------------------------------------------------------------------- bad input
def _ok():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 2, 3, 3))
    bn = random_bn(rng, 4)
    return W, dfmpc.ternary(W)[0], bn, bn


@pytest.mark.parametrize("kwargs, match", [
    (dict(var=[1.0, -0.1]), "var: expected running variances >= 0"),
    (dict(var=[1.0, np.nan]), "var: expected finite"),
    (dict(gamma=[1.0, 1.0, 1.0]), r"beta: expected shape \(3,\)"),
    (dict(gamma=[[1.0, 1.0]]), "gamma: expected an array with ndim 1"),
    (dict(gamma=[]), "gamma: expected a non-empty"),
    (dict(eps=-1e-5), "eps: expected a number >= 0"),
    (dict(var=[0.0, 1.0], eps=0.0), "var: var \\+ eps must be > 0"),
])
def test_batchnorm_rejects_bad_parameters(kwargs, match):
    """BatchNorm: negative variance, NaN, mismatched or mis-shaped arrays -> ValueError naming the field."""
    fields = dict(gamma=[1.0, 1.0], beta=[0.0, 0.0], mean=[0.0, 0.0], var=[1.0, 1.0], eps=1e-5)
    fields.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dfmpc.BatchNorm(**fields)


def test_compensation_rejects_bad_input():
    """Mismatched channels, shapes, NaN, negative lambdas, bad s: ValueError naming the argument."""
    W, W_hat, bn, bn_hat = _ok()
    f = dfmpc.compensation_coefficients
    with pytest.raises(ValueError, match=r"bn: expected 5 channels"):
        f(np.ones((5, 2, 3, 3)), np.ones((5, 2, 3, 3)), bn, bn_hat)
    with pytest.raises(ValueError, match=r"W_hat: expected the shape of W"):
        f(W, W_hat[:, :1], bn, bn_hat)
    W_nan = W.copy()
    W_nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"W: expected finite"):
        f(W_nan, W_hat, bn, bn_hat)
    with pytest.raises(ValueError, match=r"lambda1: expected a number >= 0"):
        f(W, W_hat, bn, bn_hat, lambda1=-0.1)
    with pytest.raises(ValueError, match=r"lambda2: expected a finite"):
        f(W, W_hat, bn, bn_hat, lambda2=np.inf)
    with pytest.raises(TypeError, match=r"bn_hat: expected a dfmpc.BatchNorm"):
        f(W, W_hat, bn, {"gamma": 1})
    with pytest.raises(ValueError, match=r"W: expected OIHW conv weights \(4-D\)"):
        f(W[0, 0, 0], W_hat[0, 0, 0], bn, bn_hat)
    with pytest.raises(ValueError, match=r"c: expected shape \(4,\)"):
        dfmpc.data_free_loss(np.ones(3), W, W_hat, bn, bn_hat)
    with pytest.raises(ValueError, match=r"s: expected a quantizer scale > 0"):
        dfmpc.absorb_scale(bn, 0.0)
    with pytest.raises(ValueError, match=r"s: expected a scalar or shape \(4,\)"):
        dfmpc.absorb_scale(bn, np.ones(3))
    with pytest.raises(ValueError, match=r"c: expected shape \(4,\)"):
        dfmpc.fold_into_bn(bn, np.ones(2))
    with pytest.raises(ValueError, match=r"c: expected shape \(2,\)"):
        dfmpc.scale_input_channels(np.ones((3, 2, 1, 1)), np.ones(4))


@given(compensation_problems(), st.data())
def test_quadratic_expansion_equals_objective_eq25(problem, data):
    """Eq. (25): L_j(c) = den_j c^2 - 2 num_j c + const_j, the expansion of (22), equals data_free_loss for any c
    (relative tolerance 1e-9 of the loss scale); den_j >= 0."""
    W, W_hat, bn, bn_hat, lambda1, lambda2 = problem
    C = W.shape[0]
    c = data.draw(uniform_arrays((C,), -3.0, 3.0))
    den, num, const = dfmpc.compensation.quadratic_coefficients(W, W_hat, bn, bn_hat, lambda1, lambda2)
    L = dfmpc.data_free_loss(c, W, W_hat, bn, bn_hat, lambda1, lambda2)
    scale = 1.0 + np.abs(den) * c**2 + np.abs(const)
    assert np.all(np.abs(den * c**2 - 2 * num * c + const - L) <= 1e-9 * scale)
    assert np.all(den >= 0)


def test_closed_form_from_coefficients_checks_its_input():
    """closed_form (the second step of Eq. (27)) refuses NaN, mismatched shapes and negative curvature."""
    from dfmpc.compensation import closed_form
    np.testing.assert_array_equal(closed_form([4.0, 0.0], [2.0, -1.0]), [0.5, 1.0])
    with pytest.raises(ValueError, match="den"):
        closed_form([np.nan], [1.0])
    with pytest.raises(ValueError, match="num: expected the shape"):
        closed_form([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="den: expected non-negative"):
        closed_form([-1.0], [1.0])


@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 4))
def test_eq27_on_least_squares_ternary_weights_is_the_sigma_ratio(seed, O, I):
    """Derivation 15, "Why it is not the default": with gammahat = gamma, lambda1 = lambda2 = 0 and What_j a
    least-squares scale of a ternary pattern (<What_j, W_j> = ||What_j||^2), Eq. (27) gives
    c_j = sigmahat_j / sigma_j exactly (float64, 1e-12 relative), whatever muhat and betahat: folded into
    BN^l, c restores the trained sigma. Negative control: twice the least-squares scale gives half the ratio."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(O, I, 3, 3))
    T = np.sign(W) * (np.abs(W) > 0.7 * np.abs(W).mean())
    T[:, 0, 0, 0] = np.where(T[:, 0, 0, 0] == 0, 1.0, T[:, 0, 0, 0])          # no all-zero channel
    a = np.einsum("oihw,oihw->o", W, T) / np.einsum("oihw,oihw->o", T, T)
    W_hat = a[:, None, None, None] * T
    gamma, beta = rng.uniform(0.5, 2.0, O), rng.normal(size=O)
    bn = dfmpc.BatchNorm(gamma=gamma, beta=beta, mean=rng.normal(size=O), var=rng.uniform(0.5, 2.0, O))
    bn_hat = dfmpc.BatchNorm(gamma=gamma, beta=rng.normal(size=O), mean=rng.normal(size=O),
                             var=rng.uniform(0.1, 4.0, O))
    ratio = np.sqrt((bn_hat.var + bn_hat.eps) / (bn.var + bn.eps))
    c = dfmpc.compensation_coefficients(W, W_hat, bn, bn_hat, lambda1=0.0)
    np.testing.assert_allclose(c, ratio, rtol=1e-12)
    c2 = dfmpc.compensation_coefficients(W, 2.0 * W_hat, bn, bn_hat, lambda1=0.0)    # not least squares
    np.testing.assert_allclose(c2, ratio / 2.0, rtol=1e-12)
    assert not np.allclose(c2, ratio, rtol=1e-3)
