"""Hypothesis strategies shared by the math tests (float64, seeded through Hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dfmpc

# Weight entries: moderate magnitudes plus exact zeros, no subnormals (they make
# "relative tolerance" meaningless without telling us anything about the math).
weight_values = st.one_of(
    st.just(0.0),
    st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(min_value=1e-6, max_value=4.0)).map(lambda t: t[0] * t[1]),
)


@st.composite
def filters(draw, max_out=64, max_in=8, kernels=(1, 3)):
    """W of shape (O, I, k, k) with O in 1..max_out, k in {1, 3}."""
    O = draw(st.integers(1, max_out))
    I = draw(st.integers(1, max_in))
    k = draw(st.sampled_from(kernels))
    return draw(hnp.arrays(np.float64, (O, I, k, k), elements=weight_values))


@st.composite
def batchnorms(draw, C):
    """BatchNorm with C channels: gamma of either sign, tiny to large variances."""
    pos = st.floats(1e-3, 3.0)
    gamma = draw(hnp.arrays(np.float64, C, elements=st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(1e-3, 3.0)).map(lambda t: t[0] * t[1])))
    beta = draw(hnp.arrays(np.float64, C, elements=st.floats(-3.0, 3.0)))
    mean = draw(hnp.arrays(np.float64, C, elements=st.floats(-3.0, 3.0)))
    var = draw(hnp.arrays(np.float64, C, elements=st.one_of(st.floats(0.0, 1e-6), pos)))
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
