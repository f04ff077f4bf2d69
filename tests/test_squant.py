"""SQuant baseline (Guo et al., ICLR 2022): the rounding bounds, the Numba/plain twins, the network pass.

Labels as in data_free_derivations/12_squant.md: SQuant-E (round to nearest, |q - U| <= 1/2),
SQuant-K (kernel summed error <= 1/2), SQuant-C (channel summed error <= 1/2, kernel < 1,
element < 1).  Sums are float64; the bound checks allow TOL = 1e-9 grid units for their
rounding (values here are at most ~20 in magnitude, at most ~600 terms per sum).
"""

from fractions import Fraction

import doctest

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dfmpc
import dfmpc.baselines.squant as squant_module
from dfmpc.baselines.common import layer_bits
from dfmpc.baselines.squant import (squant, squant_dorefa, squant_round, squant_round_reference,
                                    squant_weights)
from dfmpc.engine.builders import resnet_cifar
from strategies import FLOAT32_TINY

TOL = 1e-9
# squant_weights / squant_dorefa return float32, whose normal range ends at ~1.2e-38: the weights they
# are tested on are at least FLOAT32_TINY = 1e-30 in magnitude (or exactly 0); smaller would flush to 0.


# ----------------------------------------------------------------------------- helpers
def kernel_ase(q, U):
    """|sum of (q - U)| per kernel (o, i): shape (O, I)."""
    d = (np.asarray(q, np.float64) - U).reshape(U.shape[0], U.shape[1], -1)
    return np.abs(d.sum(axis=2))


def channel_ase(q, U):
    """|sum of (q - U)| per output channel o: shape (O,)."""
    return np.abs((np.asarray(q, np.float64) - U).reshape(U.shape[0], -1).sum(axis=1))


def exactly_within_one_step(q, U):
    """|q - U| < 1 for every element, in exact rational arithmetic (float64 may round 1 - 1e-203 to 1)."""
    return all(abs(Fraction(float(a)) - Fraction(float(b))) < 1 for a, b in zip(np.ravel(q), np.ravel(U)))


def bound_violations(q, U, *, kernel_bound=None, channel_bound=None, element_bound=None):
    """Human-readable list of the SQuant bounds that q breaks (empty when all hold).

    ``element_bound`` may only be 1 (the strict one-step bound, checked exactly).
    """
    assert element_bound in (None, 1.0)
    out = []
    if element_bound is not None and not (np.all(np.abs(q - U) <= element_bound) and exactly_within_one_step(q, U)):
        out.append("element error >= 1")
    if kernel_bound is not None and kernel_ase(q, U).max() > kernel_bound + TOL:
        out.append(f"kernel ASE {kernel_ase(q, U).max()} > {kernel_bound}")
    if channel_bound is not None and channel_ase(q, U).max() > channel_bound + TOL:
        out.append(f"channel ASE {channel_ase(q, U).max()} > {channel_bound}")
    return out


def _grid_values(rng, kind, size, tiny=1e-300):
    """Values in grid units of one kind (see grids)."""
    if kind == "reals":
        return rng.uniform(-6.0, 6.0, size)
    if kind == "halves":                            # round-to-nearest ties
        return rng.integers(-12, 12, size) + 0.5
    if kind == "integers":
        return rng.integers(-6, 7, size).astype(np.float64)
    if kind == "quarters":                          # exact quarters: many equal errors (ties)
        return rng.integers(-24, 25, size) / 4.0
    if kind == "tiny":                              # |U| in [tiny, 0.1]: q - U rounds to an integer in float64
        return rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(np.log10(tiny), -1, size)
    if kind == "near_ties":                         # one ulp off a half or an integer
        k = rng.integers(-12, 13, size) / 2.0
        return np.nextafter(k, np.where(rng.uniform(size=size) < 0.5, -np.inf, np.inf))
    if kind == "zeros":                             # +0.0 and -0.0
        return rng.choice([-0.0, 0.0], size)
    raise ValueError(kind)


GRID_KINDS = ["reals", "halves", "integers", "quarters", "tiny", "near_ties", "zeros"]


@st.composite
def grids(draw, max_out=5, max_in=6, tiny=1e-300):
    """U of shape (O, I, k, k) or (O, I) in grid units, built with NumPy from a drawn seed.

    Drawn: the shape, a seed, and a mix: every element of its own kind ("mixed"), all elements of
    one kind, or one value repeated everywhere ("constant": every error ties). Kinds: plain reals in
    [-6, 6], exact halves, integers, exact quarters, tiny magnitudes, one ulp off a half or an
    integer, and signed zeros. ``tiny`` is the smallest non-zero magnitude drawn.
    """
    O, I = draw(st.integers(1, max_out)), draw(st.integers(1, max_in))
    shape = draw(st.sampled_from([(O, I), (O, I, 1, 1), (O, I, 2, 2), (O, I, 3, 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mix = draw(st.sampled_from(["mixed", "mixed", "one kind", "constant"]))
    if mix == "mixed":
        kinds = rng.integers(0, len(GRID_KINDS), shape)
        U = np.zeros(shape)
        for i, kind in enumerate(GRID_KINDS):
            U[kinds == i] = _grid_values(rng, kind, int(np.sum(kinds == i)), tiny)
        return U
    kind = draw(st.sampled_from(GRID_KINDS))
    if mix == "one kind":
        return _grid_values(rng, kind, shape, tiny)
    return np.full(shape, _grid_values(rng, kind, 1, tiny)[0])


limits = st.sampled_from([(-np.inf, np.inf), (-2.0, 2.0), (-1.0, 1.0), (0.0, 3.0), (-7.0, 7.0), (0.0, 0.0)])


# ----------------------------------------------------------------------------- the twins
@settings(max_examples=150)
@given(U=grids(), lim=limits, kernel=st.booleans(), channel=st.booleans())
@example(U=np.full((2, 2, 1, 3), 0.5), lim=(-np.inf, np.inf), kernel=True, channel=True)   # |e| = 3/2 ties
@example(U=np.full((2, 5), 0.5), lim=(-1.0, 1.0), kernel=False, channel=True)
def test_numba_kernel_equals_plain_twin(U, lim, kernel, channel):
    """SQuant-K / SQuant-C: the Numba flip kernel and the plain twin agree exactly (ties, clipping incl.)."""
    qmin, qmax = lim
    fast = squant_round(U, kernel=kernel, channel=channel, qmin=qmin, qmax=qmax)
    slow = squant_round_reference(U, kernel=kernel, channel=channel, qmin=qmin, qmax=qmax)
    assert fast.shape == U.shape
    np.testing.assert_array_equal(fast, slow)


def test_twins_agree_on_a_large_seeded_layer():
    """SQuant-C: the twins agree on a 32 x 16 x 3 x 3 layer (many groups, long channel sums)."""
    U = np.random.default_rng(3).normal(0.0, 2.0, (32, 16, 3, 3))
    np.testing.assert_array_equal(squant_round(U, qmin=-3, qmax=3), squant_round_reference(U, qmin=-3, qmax=3))


# ----------------------------------------------------------------------------- bounds
@settings(max_examples=150)
@given(U=grids(), lim=limits, kernel=st.booleans(), channel=st.booleans())
def test_every_element_within_one_step_and_in_range(U, lim, kernel, channel):
    """SQuant-E/K/C element bound: |q - U| < 1 for U in [qmin, qmax], q integer in [qmin, qmax].

    Values outside [qmin, qmax] keep clip(round(U)).
    """
    qmin, qmax = lim
    q = squant_round(U, kernel=kernel, channel=channel, qmin=qmin, qmax=qmax)
    assert np.all(q == np.round(q))
    assert np.all((q >= qmin) & (q <= qmax))
    inside = (U >= qmin) & (U <= qmax)
    assert np.all(np.abs(q - U)[inside] <= 1.0) and exactly_within_one_step(q[inside], U[inside])
    np.testing.assert_array_equal(q[~inside], np.clip(np.round(U), qmin, qmax)[~inside])


@settings(max_examples=150)
@given(U=grids(), lim=limits)
def test_kernel_sums_within_half_after_squant_k(U, lim):
    """SQuant-K: after the kernel step every kernel's summed error is <= 1/2 (all U inside [qmin, qmax])."""
    qmin, qmax = lim
    U = np.clip(U, qmin, qmax)
    q = squant_round(U, kernel=True, channel=False, qmin=qmin, qmax=qmax)
    assert bound_violations(q, U, kernel_bound=0.5, element_bound=1.0) == []


@settings(max_examples=150)
@given(U=grids(), lim=limits)
def test_channel_sums_within_half_after_squant_c(U, lim):
    """SQuant-C: channel summed error <= 1/2, kernel summed error < 1, element error < 1 (U inside [qmin, qmax])."""
    qmin, qmax = lim
    U = np.clip(U, qmin, qmax)
    q = squant_round(U, qmin=qmin, qmax=qmax)
    assert bound_violations(q, U, channel_bound=0.5, element_bound=1.0) == []
    assert np.all(kernel_ase(q, U) < 1.0 + TOL)


@settings(max_examples=100)
@given(U=grids(), lim=limits)
def test_flat_channel_step_without_kernel_step(U, lim):
    """SQuant-C with kernel=False (E&C): the channel, flipped as one flat group, has summed error <= 1/2."""
    qmin, qmax = lim
    U = np.clip(U, qmin, qmax)
    q = squant_round(U, kernel=False, channel=True, qmin=qmin, qmax=qmax)
    assert bound_violations(q, U, channel_bound=0.5, element_bound=1.0) == []


@settings(max_examples=100)
@given(U=grids(), lim=limits)
def test_flips_never_raise_a_summed_error_under_clipping(U, lim):
    """SQuant-K/SQuant-C under clipping: kernel ASE after K <= round-to-nearest's, channel ASE after C <= after K."""
    qmin, qmax = lim
    rtn = np.clip(np.round(U), qmin, qmax)
    after_k = squant_round(U, channel=False, qmin=qmin, qmax=qmax)
    after_c = squant_round(U, qmin=qmin, qmax=qmax)
    assert np.all(kernel_ase(after_k, U) <= kernel_ase(rtn, U) + TOL)
    assert np.all(channel_ase(after_c, U) <= channel_ase(after_k, U) + TOL)


def test_bound_checker_negative_control():
    """SQuant-K/SQuant-C checker has teeth: round-to-nearest breaks both bounds on a seeded input, SQuant does not."""
    U = np.arange(2 * 3 * 3 * 3, dtype=np.float64).reshape(2, 3, 3, 3) + 0.25   # every error -1/4
    rtn = np.round(U)
    assert any("kernel ASE" in v for v in bound_violations(rtn, U, kernel_bound=0.5))
    assert any("channel ASE" in v for v in bound_violations(rtn, U, channel_bound=0.5))
    assert bound_violations(squant_round(U, channel=False), U, kernel_bound=0.5) == []
    assert bound_violations(squant_round(U), U, channel_bound=0.5) == []
    # and an element error of a full step is caught too
    assert bound_violations(rtn - 1.0, U, element_bound=1.0) != []


@settings(max_examples=100)
@given(U=grids(), lim=limits)
def test_no_steps_is_round_to_nearest(U, lim):
    """SQuant-E: with kernel=False and channel=False the result is clip(round(U), qmin, qmax)."""
    qmin, qmax = lim
    q = squant_round(U, kernel=False, channel=False, qmin=qmin, qmax=qmax)
    np.testing.assert_array_equal(q, np.clip(np.round(U), qmin, qmax))


def test_gemm_matrix_is_treated_as_one_by_one_kernels():
    """SQuant-C on a Gemm weight (O, I) equals the (O, I, 1, 1) conv case."""
    U = np.random.default_rng(4).normal(0.0, 3.0, (7, 40))
    np.testing.assert_array_equal(squant_round(U), squant_round(U[:, :, None, None])[:, :, 0, 0])


def test_ties_resolve_to_the_lowest_index():
    """SQuant-K tie rule: equal errors flip in index order; a summed error of exactly 1/2 is left alone."""
    U = np.full((1, 1, 2, 2), 0.25)                         # e = -1: one flip, the first
    np.testing.assert_array_equal(squant_round(U, channel=False), [[[[1.0, 0.0], [0.0, 0.0]]]])
    U = np.full((1, 2), 0.25)                               # e = -1/2: no flip
    np.testing.assert_array_equal(squant_round(U), [[0.0, 0.0]])
    U = np.full((1, 3), 0.5)                                # RTN (half to even): 0; e = -3/2: one flip
    np.testing.assert_array_equal(squant_round(U), [[1.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- weight quantizers
@settings(max_examples=60)
@given(W=grids(max_out=6, max_in=5, tiny=FLOAT32_TINY), bits=st.integers(2, 8), per_channel=st.booleans())
def test_squant_weights_within_one_scale_step(W, bits, per_channel):
    """SQuant-C on the symmetric uniform grid: |W_q - W| < one scale step per element, values on the grid."""
    W_q = squant_weights(W, bits, per_channel=per_channel)
    assert W_q.dtype == np.float32 and W_q.shape == W.shape
    qmax = 2.0 ** (bits - 1) - 1
    s = dfmpc.uniform(W, bits, symmetric=True, per_channel=per_channel).scale.astype(np.float64)
    s = np.broadcast_to(s, W.shape)
    assert np.all(np.abs(W_q - W) <= s * (1 + 1e-6) + 1e-12)    # float32 cast: relative 1e-6
    nz = s > 0
    grid = W_q.astype(np.float64)[nz] / s[nz]
    assert np.all(np.abs(grid - np.round(grid)) < 1e-4) and np.all(np.abs(np.round(grid)) <= qmax)


@settings(max_examples=60)
@given(W=grids(max_out=6, max_in=5, tiny=FLOAT32_TINY), k=st.integers(1, 6))
def test_squant_dorefa_on_the_dorefa_grid_within_one_level(W, k):
    """SQuant-C on DoReFa's kQ grid: every value is a DoReFa level, at most one level from dorefa's rounding."""
    W_grid, scale = dfmpc.dorefa(W, k)
    W_q = squant_dorefa(W, k)
    assert W_q.dtype == np.float32 and W_q.shape == W.shape
    if scale == 0:
        assert np.all(W_q == 0)
        return
    n = 2.0**k - 1
    j = (W_q.astype(np.float64) / scale + 1.0) * n / 2.0            # level index
    assert np.all(np.abs(j - np.round(j)) < 1e-4)
    j = np.round(j)
    assert np.all((j >= 0) & (j <= n))
    j_rtn = np.round((W_grid + 1.0) * n / 2.0)
    assert np.all(np.abs(j - j_rtn) <= 1)


def test_squant_dorefa_channel_sums_within_half():
    """SQuant-C on the DoReFa index: per output channel, |sum (j - U)| <= 1/2 with U = n (W / (2 max|W|) + 1/2)."""
    W = np.random.default_rng(5).normal(size=(16, 8, 3, 3))
    k = 4
    n, scale = 2.0**k - 1, np.abs(W).max()
    U = n * (W / (2 * scale) + 0.5)
    j = (squant_dorefa(W, k).astype(np.float64) / scale + 1.0) * n / 2.0
    assert channel_ase(np.round(j), U).max() <= 0.5 + 1e-6


# ----------------------------------------------------------------------------- network level
def test_squant_network_keeps_input_and_dfmpc_bits():
    """SQuant-C network pass: input unchanged, bits as layer_bits, every weight equals squant_weights."""
    g = resnet_cifar(8, seed=0)
    before = {name: {k: v.copy() for k, v in p.items()} for name, p in g.params().items()}
    gq, info = squant(g, low_bits=2, high_bits=6)
    for name, p in g.params().items():
        for k, v in p.items():
            np.testing.assert_array_equal(v, before[name][k])
    _, bits = layer_bits(g, 2, 6)
    assert info["method"] == "squant" and info["layers"] == len(bits) and info["bits"] == bits
    assert set(info["low_layers"]) == {n for n, b in bits.items() if b == 2} and info["low_layers"]
    for node in gq.nodes:
        if node.op in ("Conv", "Gemm"):
            W = g.node(node.name).params["W"]
            np.testing.assert_array_equal(node.params["W"], squant_weights(W, bits[node.name]))
            assert node.params["W"].dtype == np.float32
        else:
            for k, v in node.params.items():
                np.testing.assert_array_equal(v, g.node(node.name).params[k])
    y = gq.run(np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32))
    assert y.shape == (4, 10) and np.all(np.isfinite(y))


# ----------------------------------------------------------------------------- bad input
def test_errors_name_the_argument():
    """SQuant-E input checks: NaN/Inf, empty, wrong ndim, bad limits, bits out of range name the argument."""
    good = np.zeros((2, 2, 3, 3))
    with pytest.raises(ValueError, match="U"):
        squant_round(np.full((2, 2, 3, 3), np.nan))
    with pytest.raises(ValueError, match="U"):
        squant_round(np.zeros((0, 2, 3, 3)))
    with pytest.raises(ValueError, match="U"):
        squant_round(np.zeros((2, 3, 3)))
    with pytest.raises(TypeError, match="U"):
        squant_round(np.array([["a"]]))
    with pytest.raises(ValueError, match="qmin"):
        squant_round(good, qmin=0.5)
    with pytest.raises(ValueError, match="qmin"):
        squant_round(good, qmin=float("nan"))
    with pytest.raises(ValueError, match="qmin/qmax"):
        squant_round(good, qmin=3, qmax=2)
    with pytest.raises(TypeError, match="kernel"):
        squant_round(good, kernel="yes")
    with pytest.raises(ValueError, match="U"):
        squant_round_reference(np.full((2, 2), np.inf))
    with pytest.raises(ValueError, match="bits"):
        squant_weights(good, 1)
    with pytest.raises(ValueError, match="bits"):
        squant_weights(good, 17)
    with pytest.raises(TypeError, match="bits"):
        squant_weights(good, 2.5)
    with pytest.raises(ValueError, match="W"):
        squant_weights(np.zeros(5), 4)
    with pytest.raises(ValueError, match="W"):
        squant_dorefa(np.array([[np.inf, 1.0]]), 2)
    with pytest.raises(ValueError, match="k"):
        squant_dorefa(good, 0)
    with pytest.raises(TypeError, match="graph"):
        squant({"not": "a graph"})
    with pytest.raises(ValueError, match="low_bits"):
        squant(resnet_cifar(8, seed=0), low_bits=1)


def test_docstring_examples():
    """SQuant-K / SQuant-C: the module's docstring examples (each checks a defining bound) run and hold.

    tests/test_doctests.py lists its modules explicitly and does not include this one.
    """
    result = doctest.testmod(squant_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 10
