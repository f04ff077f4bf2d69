"""Hypothesis strategies shared by the math tests (float64).

Hypothesis draws only a few small choices per example: shapes, a seed, and which special values to
plant (exact zeros, all-zero filters, ties, one sign, tiny variances, extreme magnitudes). The arrays
themselves are built with NumPy from ``np.random.default_rng(seed)``, so an example costs a dozen
draws however large the array is, and the health checks stay on. Shrinking works on the seed and the
special-value choices (a failing example shrinks towards seed 0 and "no special values").
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import dfmpc

seeds = st.integers(0, 2**32 - 1)

# Weight magnitudes: 1e-6 .. 4 (plus exact zeros); no subnormals (they make "relative tolerance"
# meaningless without telling us anything about the math).
W_MIN, W_MAX = 1e-6, 4.0
# float32's normal range ends at ~1.2e-38: code that returns float32 is tested on magnitudes >= this.
FLOAT32_TINY = 1e-30


def _magnitudes(rng, shape, style):
    """|w| in [W_MIN, W_MAX]: uniform, log-uniform (many small), a few equal levels (ties), or one constant."""
    if style == "uniform":
        return rng.uniform(W_MIN, W_MAX, shape)
    if style == "loguniform":
        return np.exp(rng.uniform(np.log(W_MIN), np.log(W_MAX), shape))
    if style == "levels":            # ties: every magnitude is one of three values
        return rng.choice([0.25, 1.0, 3.0], size=shape)
    if style == "constant":          # all magnitudes equal: maximal ties (e.g. at the ternary threshold)
        return np.full(shape, rng.choice([W_MIN, 0.5, 1.0, W_MAX]))
    raise ValueError(style)


def _signs(rng, shape, mode):
    if mode == "mixed":
        return rng.choice([-1.0, 1.0], size=shape)
    return np.full(shape, 1.0 if mode == "positive" else -1.0)


@st.composite
def weight_arrays(draw, shape):
    """A float64 array of the given shape with weight-like entries and planted special values.

    Special values: exact zeros (none, some, most or all entries), all-zero output channels
    (rows along axis 0), ties (equal magnitudes), one sign throughout, and the extreme magnitudes
    W_MIN and W_MAX.
    """
    rng = np.random.default_rng(draw(seeds))
    style = draw(st.sampled_from(["uniform", "loguniform", "levels", "constant"]))
    sign = draw(st.sampled_from(["mixed", "mixed", "positive", "negative"]))
    W = _signs(rng, shape, sign) * _magnitudes(rng, shape, style)
    p_zero = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9, 1.0]))     # 1.0: the all-zero tensor
    W[rng.uniform(size=shape) < p_zero] = 0.0
    if draw(st.booleans()) and len(shape) >= 2 and shape[0] > 1:      # all-zero filters
        W[rng.uniform(size=shape[0]) < 0.3] = 0.0
    if draw(st.booleans()) and W.size:                                # the extreme magnitudes
        W.flat[rng.integers(W.size)] = rng.choice([-1.0, 1.0]) * W_MAX
        W.flat[rng.integers(W.size)] = rng.choice([-1.0, 1.0]) * W_MIN
    return W


@st.composite
def filters(draw, max_out=64, max_in=8, kernels=(1, 3)):
    """W of shape (O, I, k, k) with O in 1..max_out, I in 1..max_in, k in kernels (see weight_arrays)."""
    O = draw(st.integers(1, max_out))
    I = draw(st.integers(1, max_in))
    k = draw(st.sampled_from(kernels))
    return draw(weight_arrays((O, I, k, k)))


@st.composite
def uniform_arrays(draw, shape, lo, hi, tiny=1e-300):
    """A float64 array of ``shape`` (a tuple or a strategy for one) with entries in [lo, hi].

    Built from a drawn seed; special values planted: exact zeros (if 0 is in range), the end points
    lo and hi, ties (entries on a coarse grid of 1/4 steps), one constant value, one sign, and
    magnitudes spread over many decades, down to ``tiny`` (never subnormal in float64; pass
    tiny=FLOAT32_TINY for code that returns float32).
    """
    if not isinstance(shape, tuple):
        shape = draw(shape)
    rng = np.random.default_rng(draw(seeds))
    style = draw(st.sampled_from(["uniform", "uniform", "grid", "constant", "decades"]))
    if style == "uniform":
        a = rng.uniform(lo, hi, shape)
    elif style == "decades":                            # |a| from the range's size down to about tiny
        top = max(abs(lo), abs(hi))
        a = np.clip(rng.uniform(lo, hi, shape) * 10.0 ** -rng.uniform(0, np.log10(top / tiny), shape), lo, hi)
    elif style == "grid":                               # ties: many equal entries
        a = np.clip(np.round(rng.uniform(lo, hi, shape) * 4) / 4, lo, hi)
    else:
        a = np.full(shape, rng.choice([lo, hi, 0.5 * (lo + hi)]))
    sign = draw(st.sampled_from(["any", "any", "nonneg", "nonpos"]))
    if sign == "nonneg" and hi >= 0:
        a = np.clip(np.abs(a), max(lo, 0.0), hi)
    elif sign == "nonpos" and lo <= 0:
        a = np.clip(-np.abs(a), lo, min(hi, 0.0))
    if lo <= 0 <= hi:
        a[rng.uniform(size=shape) < draw(st.sampled_from([0.0, 0.0, 0.2, 1.0]))] = 0.0
    if draw(st.booleans()) and a.size:                  # the end points exactly
        a.flat[rng.integers(a.size)] = lo
        a.flat[rng.integers(a.size)] = hi
    return a


@st.composite
def batchnorms(draw, C):
    """BatchNorm with C channels: gamma of either sign (or one sign), tiny to large variances.

    gamma: +-[1e-3, 3]; beta, mean: [-3, 3] with some exact zeros; var: a drawn share of channels
    tiny (in [0, 1e-6], exact 0 included), the rest in [1e-3, 3]; eps 1e-5 or 1e-3.
    """
    rng = np.random.default_rng(draw(seeds))
    gamma = _signs(rng, C, draw(st.sampled_from(["mixed", "mixed", "positive", "negative"]))) * rng.uniform(1e-3, 3.0, C)
    beta, mean = rng.uniform(-3.0, 3.0, C), rng.uniform(-3.0, 3.0, C)
    p_zero = draw(st.sampled_from([0.0, 0.3, 1.0]))
    beta[rng.uniform(size=C) < p_zero] = 0.0
    mean[rng.uniform(size=C) < p_zero] = 0.0
    var = rng.uniform(1e-3, 3.0, C)
    tiny = rng.uniform(size=C) < draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    var[tiny] = rng.uniform(0.0, 1e-6, C)[tiny] * (rng.uniform(size=C)[tiny] < 0.5)   # half of them exactly 0
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    return dfmpc.BatchNorm(gamma=gamma, beta=beta, mean=mean, var=var, eps=eps)


lambdas = st.tuples(st.floats(0.0, 2.0), st.one_of(st.just(0.0), st.floats(0.0, 0.05)))


@st.composite
def compensation_problems(draw, max_out=64):
    """(W, W_hat, bn, bn_hat, lambda1, lambda2) with W_hat = ternary grid and an absorbed BN."""
    W = draw(filters(max_out=max_out))
    bn = draw(batchnorms(W.shape[0]))
    W_hat, alpha, _ = dfmpc.ternary(W)
    if draw(st.booleans()):
        bn_hat = dfmpc.absorb_scale(bn, alpha) if alpha > 0 else bn
    else:  # an independently re-calibrated BN: <Xhat, X> + lambda1 yhat y can then be negative
        bn_hat = draw(batchnorms(W.shape[0]))
    lambda1, lambda2 = draw(lambdas)
    return W, W_hat, bn, bn_hat, lambda1, lambda2


def random_bn(rng, C, scale=1.0):
    """A plain seeded BatchNorm for non-Hypothesis tests."""
    return dfmpc.BatchNorm(gamma=rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C), beta=rng.normal(size=C),
                           mean=rng.normal(size=C) * scale, var=rng.uniform(0.1, 2.0, C) * scale**2)
