"""SQuant: data-free rounding by flipping, after Guo et al. (ICLR 2022).

SQuant replaces round-to-nearest of the weights ``U = W / s`` (grid units) by a
rounding whose *summed* errors are small over each kernel ``(o, i)`` and over each
output channel ``o``.  The paper approximates the Hessian of the task loss by three
diagonal terms (element-wise, kernel-wise, output-channel-wise; its Sec. 3) and
turns their sum into the "Constrained Absolute Sum of Error" (CASE) objective
(Sec. 4), solved progressively without data (Algorithm 1) by a flip routine
(Algorithm 2):

* **SQuant-E**: round to nearest, ``|q - U| <= 1/2`` per element;
* **SQuant-K**: in each kernel, flip the elements whose rounding error has the
  sign of the kernel's summed error and the largest magnitude, until the kernel's
  absolute sum of error (ASE) is at most 1/2;
* **SQuant-C**: in each output channel, flip one element in each of the kernels
  whose summed error has the channel's sign and the largest magnitude, until the
  channel's ASE is at most 1/2 (the kernel ASEs relax to below 1, every element
  stays within one grid step of its value).

Everything here is pure: no input is modified.  The flip loop is a Numba kernel
(:func:`squant_round`); :func:`squant_round_reference` is its plain-Python twin,
kept for the tests, which check that the two agree exactly.  Derivation, choices and
tests: ``data_free_derivations/12_squant.md``.

References
----------
C. Guo, Y. Qiu, J. Leng, X. Gao, C. Zhang, Y. Liu, F. Yang, Y. Zhu, M. Guo,
"SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian Approximation",
ICLR 2022, arXiv:2202.07471.
"""

from __future__ import annotations

import math
import numbers

import numba
import numpy as np

from .._checks import as_float_array, check_bits
from ..quantizers import dorefa, uniform
from .common import check_graph, layer_bits, quantize_layers

__all__ = ["squant_round", "squant_round_reference", "squant_weights", "squant_dorefa", "squant"]


# ----------------------------------------------------------------------------- input handling
def _check_bound(x, name: str) -> float:
    """``x`` as a float that is an integer or +-inf (a grid limit), or raise naming ``name``."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected an integer grid limit or +-inf, got {x!r}")
    v = float(x)
    if math.isnan(v) or (math.isfinite(v) and v != math.floor(v)):
        raise ValueError(f"{name}: expected an integer grid limit or +-inf, got {v}")
    return v


def _prepare(U, kernel, channel, qmin, qmax):
    """Validate, reshape to (O, I, K) float64 and round to nearest (SQuant-E)."""
    U = as_float_array(U, "U", ndim=(2, 4))
    for flag, name in ((kernel, "kernel"), (channel, "channel")):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name}: expected a bool, got {flag!r}")
    qmin, qmax = _check_bound(qmin, "qmin"), _check_bound(qmax, "qmax")
    if qmin > qmax:
        raise ValueError(f"qmin/qmax: expected qmin <= qmax, got {qmin} > {qmax}")
    O, I = U.shape[:2]
    U3 = np.ascontiguousarray(U, dtype=np.float64).reshape(O, I, -1)
    q3 = np.clip(np.round(U3), qmin, qmax)          # SQuant-E: ties half to even (np.round)
    if channel and not kernel:                       # E&C: the channel is one flat group
        U3, q3 = U3.reshape(O, 1, -1), q3.reshape(O, 1, -1)
        kernel, channel = True, False
    return U.shape, U3, q3, bool(kernel), bool(channel), qmin, qmax


# ----------------------------------------------------------------------------- Numba kernel
@numba.njit(cache=True)
def _group_error(u, w):
    """Summed rounding error ``sum_i (w_i - u_i)`` of a 1-D group, added left to right."""
    e = 0.0
    for i in range(u.shape[0]):
        e += w[i] - u[i]
    return e


@numba.njit(cache=True)
def _flip_group_nb(u, w, qmin, qmax):
    """Algorithm 2 on one group (kernel): flip until |sum error| <= 1/2 (in place on w)."""
    e = _group_error(u, w)
    if abs(e) <= 0.5:
        return
    s = 1.0 if e > 0.0 else -1.0                    # a flip moves w_i to w_i - s
    k = int(math.ceil(abs(e) - 0.5))                # fewest flips reaching |e - k s| <= 1/2
    n = u.shape[0]
    idx = np.empty(n, np.int64)
    key = np.empty(n, np.float64)
    m = 0
    for i in range(n):
        p = s * (w[i] - u[i])                       # error of the flip's sign, > 0 for candidates
        if p > 0.0 and qmin <= w[i] - s <= qmax:
            idx[m] = i
            key[m] = -p
            m += 1
    order = np.argsort(key[:m], kind="mergesort")   # stable: largest error first, ties by index
    for j in range(min(k, m)):
        w[idx[order[j]]] -= s


@numba.njit(cache=True)
def _flip_channel_nb(u, w, qmin, qmax):
    """SQuant-C on one output channel u, w of shape (I, K): one flip in each chosen kernel."""
    I = u.shape[0]
    ek = np.empty(I, np.float64)
    for n in range(I):
        ek[n] = _group_error(u[n], w[n])
    e = 0.0
    for n in range(I):
        e += ek[n]
    if abs(e) <= 0.5:
        return
    s = 1.0 if e > 0.0 else -1.0
    k = int(math.ceil(abs(e) - 0.5))
    kid = np.empty(I, np.int64)
    eid = np.empty(I, np.int64)
    key = np.empty(I, np.float64)
    m = 0
    for n in range(I):
        if s * ek[n] > 0.0:
            best, best_p = -1, 0.0                  # admissible element with largest s * error
            for i in range(u.shape[1]):
                p = s * (w[n, i] - u[n, i])
                if p > best_p and qmin <= w[n, i] - s <= qmax:
                    best, best_p = i, p
            if best >= 0:
                kid[m] = n
                eid[m] = best
                key[m] = -s * ek[n]
                m += 1
    order = np.argsort(key[:m], kind="mergesort")
    for j in range(min(k, m)):
        w[kid[order[j]], eid[order[j]]] -= s


@numba.njit(cache=True)
def _squant_flip_nb(U, q, qmin, qmax, kernel, channel):
    """SQuant-K then SQuant-C on q (O, I, K), in place; U (O, I, K) the real values."""
    O, I = U.shape[0], U.shape[1]
    if kernel:
        for o in range(O):
            for n in range(I):
                _flip_group_nb(U[o, n], q[o, n], qmin, qmax)
    if channel:
        for o in range(O):
            _flip_channel_nb(U[o], q[o], qmin, qmax)


def squant_round(U, kernel=True, channel=True, qmin=-np.inf, qmax=np.inf):
    """SQuant rounding of ``U`` (grid units): round to nearest, then SQuant-K and SQuant-C flips.

    A flip moves one element by one grid step *against* the sign of its group's
    summed error ``e = sum (q - U)``, choosing the element whose own error has that
    sign and the largest magnitude (paper Algorithm 2).  Per group, the number of
    flips is ``k = ceil(|e| - 1/2)``, the fewest that bring ``|e|`` to at most 1/2.

    Bounds afterwards, for every element with ``U`` in ``[qmin, qmax]``, writing
    ``ASE`` for the absolute summed error ``|sum (q - U)|``.  They hold in exact
    arithmetic; computed in float64 a sum carries its rounding (~1e-16 per term) and
    ``|q - U| < 1`` may read ``<= 1`` (``1 - 1e-203`` rounds to 1).

    * SQuant-E only (``kernel=channel=False``): ``q = clip(round(U), qmin, qmax)``,
      ``|q - U| <= 1/2`` (paper Sec. 3-4, element term).
    * after SQuant-K: every kernel ``ASE(o, i) <= 1/2`` and ``|q - U| < 1``
      (the kernel constraint of the CASE objective, Sec. 4; Algorithm 1, K step).
    * after SQuant-C (default): every output channel ``ASE(o) <= 1/2``, every kernel
      ``ASE(o, i) < 1``, every element ``|q - U| < 1`` (Sec. 4, CASE with the
      relaxed kernel and element constraints; Algorithm 1, C step).  Each kernel
      takes at most one C flip.
    * ``kernel=False, channel=True``: channel ``ASE(o) <= 1/2``, ``|q - U| < 1``.

    The equation numbers of the paper are not quoted here: we could verify its
    Algorithms 1-2 and section structure, not its numbering; see
    ``data_free_derivations/12_squant.md``.

    Clipping: an element with ``U`` outside ``[qmin, qmax]`` keeps
    ``clip(round(U), qmin, qmax)`` (its only useful flip would leave the range), and
    a group lacking enough admissible elements takes the flips it can; every flip
    still lowers its group's ASE, so no ASE ever exceeds its round-to-nearest value.

    Tie rules (deterministic, shared with :func:`squant_round_reference`): SQuant-E
    rounds halves to even (``np.round``); a group with ``|e|`` exactly 1/2 is not
    flipped; among equal errors the lowest flat index within the kernel (SQuant-K)
    or the lowest input channel ``i`` (SQuant-C) flips first; sums run left to right
    over the C-order flattening.

    Parameters
    ----------
    U : array_like, shape (O, I, kh, kw) or (O, I)
        Real values in grid units (``W / scale``), finite, non-empty. A 2-D ``U``
        (Gemm) is treated as ``(O, I, 1, 1)``: every kernel is a single element.
    kernel : bool
        Run SQuant-K (flips inside each kernel ``U[o, i]``).
    channel : bool
        Run SQuant-C (flips inside each output channel ``U[o]``).  With
        ``kernel=False`` the channel is flipped as one flat group of ``I kh kw``
        elements (the paper's "E&C" ablation).
    qmin, qmax : int or +-inf
        Grid limits, ``qmin <= qmax``; no flip ever leaves ``[qmin, qmax]``.

    Returns
    -------
    q : ndarray, same shape as U, float64
        Integer values in ``[qmin, qmax]``.

    Raises
    ------
    ValueError
        U empty, non-finite or not 2-/4-D; qmin/qmax NaN, non-integral or qmin > qmax.
    TypeError
        U not real numbers; kernel/channel not bool; qmin/qmax not real.

    References
    ----------
    C. Guo et al., "SQuant", ICLR 2022, arXiv:2202.07471, Sec. 4, Algorithms 1-2.

    Examples
    --------
    One kernel of four values, each 0.25 above an integer (exact in binary):
    round-to-nearest errs by -1 in sum; SQuant-K flips one element up, the first,
    since all four errors tie, leaving a summed error of 0.

    >>> U = np.array([[[[0.25, 1.25], [2.25, 3.25]]]])
    >>> float((np.round(U) - U).sum())
    -1.0
    >>> q = squant_round(U, channel=False)
    >>> q
    array([[[[1., 1.],
             [2., 3.]]]])
    >>> float((q - U).sum()), bool(np.all(np.abs(q - U) < 1))
    (0.0, True)
    """
    shape, U3, q3, kernel, channel, qmin, qmax = _prepare(U, kernel, channel, qmin, qmax)
    _squant_flip_nb(U3, q3, qmin, qmax, kernel, channel)
    return q3.reshape(shape)


# ----------------------------------------------------------------------------- plain twin
def _ordered_sum(values) -> float:
    """Left-to-right float64 sum (the kernel's order, so the two agree bit for bit)."""
    total = 0.0
    for v in values:
        total += float(v)
    return total


def _flip_count(e: float) -> int:
    """Fewest unit flips bringing |e| to at most 1/2 (0 when it already is)."""
    return 0 if abs(e) <= 0.5 else math.ceil(abs(e) - 0.5)


def _admissible(w_i: float, s: float, qmin: float, qmax: float) -> bool:
    """Moving w_i to w_i - s stays on the grid [qmin, qmax]."""
    return qmin <= w_i - s <= qmax


def _kernel_step(u, w, qmin, qmax):
    """SQuant-K on one kernel (1-D u, w); w is modified in place."""
    e = _ordered_sum(w[i] - u[i] for i in range(len(u)))
    k = _flip_count(e)
    if k == 0:
        return
    s = 1.0 if e > 0 else -1.0
    candidates = [i for i in range(len(u)) if s * (w[i] - u[i]) > 0 and _admissible(w[i], s, qmin, qmax)]
    candidates.sort(key=lambda i: (-s * (w[i] - u[i]), i))      # largest same-sign error, then index
    for i in candidates[:k]:
        w[i] -= s


def _channel_step(u, w, qmin, qmax):
    """SQuant-C on one output channel (u, w of shape (I, K)); w is modified in place."""
    n_in, n_k = u.shape
    kernel_errors = [_ordered_sum(w[n, i] - u[n, i] for i in range(n_k)) for n in range(n_in)]
    e = _ordered_sum(kernel_errors)
    k = _flip_count(e)
    if k == 0:
        return
    s = 1.0 if e > 0 else -1.0
    chosen = []                      # (kernel n, element to flip in it), kernels of the channel's sign
    for n in range(n_in):
        if s * kernel_errors[n] <= 0:
            continue
        elements = [i for i in range(n_k) if s * (w[n, i] - u[n, i]) > 0 and _admissible(w[n, i], s, qmin, qmax)]
        if elements:
            best = min(elements, key=lambda i: (-s * (w[n, i] - u[n, i]), i))
            chosen.append((n, best))
    chosen.sort(key=lambda ni: (-s * kernel_errors[ni[0]], ni[0]))
    for n, i in chosen[:k]:
        w[n, i] -= s


def squant_round_reference(U, kernel=True, channel=True, qmin=-np.inf, qmax=np.inf):
    """Plain-Python twin of :func:`squant_round`, written for reading (tests only).

    Same rules, same left-to-right sums and tie rules as the Numba kernel, so the
    results agree exactly; see :func:`squant_round` for the bounds.

    Parameters
    ----------
    U : array_like, shape (O, I, kh, kw) or (O, I)
        Real values in grid units (``W / scale``), finite, non-empty. A 2-D ``U``
        (Gemm) is treated as ``(O, I, 1, 1)``: every kernel is a single element.
    kernel : bool
        Run SQuant-K (flips inside each kernel ``U[o, i]``).
    channel : bool
        Run SQuant-C (flips inside each output channel ``U[o]``).  With
        ``kernel=False`` the channel is flipped as one flat group of ``I kh kw``
        elements (the paper's "E&C" ablation).
    qmin, qmax : int or +-inf
        Grid limits, ``qmin <= qmax``; no flip ever leaves ``[qmin, qmax]``.

    Returns
    -------
    q : ndarray, same shape as U, float64

    Raises
    ------
    ValueError, TypeError
        As :func:`squant_round`.

    Examples
    --------
    >>> U = np.random.default_rng(0).normal(0, 3, (4, 3, 3, 3))
    >>> bool(np.array_equal(squant_round_reference(U), squant_round(U)))
    True
    """
    shape, U3, q3, kernel, channel, qmin, qmax = _prepare(U, kernel, channel, qmin, qmax)
    if kernel:                                       # SQuant-K, every kernel (o, i)
        for o in range(U3.shape[0]):
            for n in range(U3.shape[1]):
                _kernel_step(U3[o, n], q3[o, n], qmin, qmax)
    if channel:                                      # SQuant-C, every output channel o
        for o in range(U3.shape[0]):
            _channel_step(U3[o], q3[o], qmin, qmax)
    return q3.reshape(shape)


# ----------------------------------------------------------------------------- weight quantizers
def squant_weights(W, bits, per_channel=True):
    """Symmetric uniform quantization with SQuant rounding, dequantized.

    Grid and scale are those of :func:`dfmpc.uniform` (symmetric, restricted range):
    ``qmax = 2^(bits-1) - 1``, ``s = max|W| / qmax`` (per output channel by default),
    ``U = clip(W / s, -qmax, qmax)`` (the clip only removes float overshoot), and
    ``W_q = s * squant_round(U, qmin=-qmax, qmax=qmax)``.

    Parameters
    ----------
    W : array_like, shape (O, I, kh, kw) or (O, I)
        Conv or Gemm weights, finite, non-empty.
    bits : int in [2, 16]
    per_channel : bool
        One scale per output channel (axis 0), else one per tensor.

    Returns
    -------
    W_q : ndarray, same shape as W, float32
        ``|W_q - W| < s`` per element (one grid step, vs ``s / 2`` for round-to-nearest)
        up to the float32 cast; all-zero channels stay zero.

    Raises
    ------
    ValueError
        W empty, non-finite or not 2-/4-D; bits outside [2, 16].
    TypeError
        bits not an integer.

    References
    ----------
    C. Guo et al., "SQuant", ICLR 2022, arXiv:2202.07471.

    Examples
    --------
    >>> W = np.random.default_rng(1).normal(size=(8, 4, 3, 3))
    >>> s = np.abs(W).max(axis=(1, 2, 3), keepdims=True) / 1.0   # bits=2: qmax = 1
    >>> W_q = squant_weights(W, bits=2)
    >>> bool(np.all(np.abs(W_q - W) < s * (1 + 1e-6)))
    True
    >>> bool(abs(((W_q - W) / s).sum(axis=(1, 2, 3))).max() <= 0.5 + 1e-6)   # SQuant-C per channel
    True
    """
    W = as_float_array(W, "W", ndim=(2, 4))
    bits = check_bits(bits, "bits", lo=2)
    qmax = 2.0 ** (bits - 1) - 1.0
    scale = np.asarray(uniform(W, bits, symmetric=True, per_channel=bool(per_channel)).scale, np.float64)
    safe = np.where(scale > 0, scale, 1.0)
    U = np.clip(W.astype(np.float64) / safe, -qmax, qmax)
    return (scale * squant_round(U, qmin=-qmax, qmax=qmax)).astype(np.float32)


def squant_dorefa(W, k):
    """DoReFa kQ weights with SQuant rounding of the level index, dequantized.

    :func:`dfmpc.dorefa` writes ``kQ(W) = 2 j / n - 1`` with ``n = 2^k - 1`` and the
    level index ``j = round(U)``, ``U = n (W / (2 max|W|) + 1/2)`` in ``[0, n]``.
    Here ``j = squant_round(U, qmin=0, qmax=n)`` instead; the levels, the layer-wise
    scale ``max|W|`` and the output form ``max|W| * kQ(W)`` are unchanged.

    Parameters
    ----------
    W : array_like, shape (O, I, kh, kw) or (O, I)
        Conv or Gemm weights, finite, non-empty.
    k : int in [1, 16]
        Bit-width: ``2^k`` levels in ``[-1, 1]``.

    Returns
    -------
    W_q : ndarray, same shape as W, float32
        ``max|W| * (2 j / n - 1)``, each ``j`` within one level of DoReFa's own
        round-to-nearest index. All-zero W gives zeros.

    Raises
    ------
    ValueError
        W empty, non-finite or not 2-/4-D; k outside [1, 16].
    TypeError
        k not an integer.

    References
    ----------
    S. Zhou et al., "DoReFa-Net", arXiv:1606.06160 (2016); C. Guo et al., "SQuant",
    ICLR 2022, arXiv:2202.07471.

    Examples
    --------
    >>> W = np.random.default_rng(2).normal(size=(4, 3, 3, 3))
    >>> W_q = squant_dorefa(W, k=2)
    >>> levels = np.abs(W).max() * np.array([-1, -1/3, 1/3, 1])     # the 2-bit DoReFa grid
    >>> bool(np.all(np.isclose(W_q[..., None], levels, rtol=1e-6).any(axis=-1)))
    True
    """
    W = as_float_array(W, "W", ndim=(2, 4))
    k = check_bits(k, "k")
    _, scale = dorefa(W, k)                       # validates, and gives max|W|
    if scale == 0.0:
        return np.zeros(W.shape, np.float32)
    n = 2.0**k - 1.0
    U = np.clip(n * (W.astype(np.float64) / (2.0 * scale) + 0.5), 0.0, n)
    j = squant_round(U, qmin=0.0, qmax=n)
    return (scale * (2.0 / n * j - 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------- network level
def squant(graph, low_bits=2, high_bits=6, *, pairs=None, keep_first_high=True):
    """SQuant on a whole network at DF-MPC's mixed-precision bit assignment.

    Bits per Conv / Gemm come from :func:`dfmpc.baselines.common.layer_bits` (the low
    conv of each DF-MPC pair at ``low_bits``, every other layer at ``high_bits``);
    each layer is quantized by :func:`squant_weights` (per-channel symmetric grid).
    No BN or bias correction: SQuant changes the rounding only.

    Parameters
    ----------
    graph : Graph
        Not modified.
    low_bits, high_bits : int in [2, 16]
    pairs : list of (str, str), optional
        Explicit (low conv, high conv) pairs, as for :func:`dfmpc.find_pairs`.
    keep_first_high : bool
        As for :func:`dfmpc.find_pairs`.

    Returns
    -------
    quantized : Graph
        A copy of ``graph`` with dequantized float32 Conv / Gemm weights.
    info : dict
        ``{"method": "squant", "layers": number of Conv/Gemm, "bits": {name: bits},
        "low_layers": sorted low-bit names, "low_bits": ..., "high_bits": ...}``.

    Raises
    ------
    TypeError
        graph is not a Graph; bits not integers.
    ValueError
        Bits outside [2, 16]; an invalid explicit pairing.

    References
    ----------
    C. Guo et al., "SQuant", ICLR 2022, arXiv:2202.07471.

    Examples
    --------
    >>> from dfmpc.engine.builders import resnet_cifar
    >>> g = resnet_cifar(8, seed=0)
    >>> gq, info = squant(g, 2, 6)
    >>> info["method"], info["layers"] == len(g.nodes_of("Conv")) + len(g.nodes_of("Gemm"))
    ('squant', True)
    """
    check_graph(graph)
    pairing, bits = layer_bits(graph, low_bits, high_bits, pairs=pairs, keep_first_high=keep_first_high)
    quantized = quantize_layers(graph, bits, lambda W, b, name: squant_weights(W, b, per_channel=True))
    info = {"method": "squant", "layers": len(bits), "bits": dict(bits),
            "low_layers": sorted(pairing.low), "low_bits": int(low_bits), "high_bits": int(high_bits)}
    return quantized, info
