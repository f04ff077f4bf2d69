"""Probe inputs without data: white noise, or images distilled from the network's own BN statistics.

The sequential re-calibration measures how the quantized network's statistics drift from the
full-precision network's on *probe* inputs. Real images are not allowed (data-free), so the probes
are made from the network alone:

- ``kind="noise"``: standard-normal white noise of the input's shape (the baseline).
- ``kind="distilled"``: ZeroQ's distilled data (Cai et al., CVPR 2020). Start from the same noise
  and move the images (L-BFGS on the input by default, or ZeroQ's Adam) until every
  BatchNormalization node of the FP32 network sees, on its *input*, the per-channel batch mean and
  standard deviation it was trained with (its running mean and ``sqrt(var + eps)``), and the images
  themselves have per-channel mean 0 and standard deviation 1 (the zoo's inputs are standardised):

  ``L(x) = sum_BN ||mu_b - mu||^2 + ||s_b - sigma||^2  +  ||mean(x)||^2 + ||s(x) - 1||^2``  (D.1)

  is ZeroQ's loss, each layer in its own units. The default minimises the same terms with every
  channel's divided by ``C sigma^2`` of its BN (D.6, ``objective="relative"``): the error in units of
  sigma, each BN weighted equally, the stopping criterion's own units (D.5).

  The input gradient is one reverse sweep through the graph (:mod:`dfmpc.autodiff`); the forward
  stops at the last BN. Derivation and tests: ``data_free_derivations/16_probe_inputs.md``.

  By default the sequential re-calibration also uses the mirror images of each distilled probe
  (:func:`mirrored_views`, ``probe_views``; derivation 15, S.6), for the variance ratio only (S.5): they
  are not fitted to the full-precision weights as the distilled images are. Copies rolled by a quarter of
  the image (:func:`shifted_views`, S.4) are the other kind.

  The budget adapts to the network: when the distilled images still miss the BN statistics by more
  than :data:`DEFAULT_TOLERANCE` (RMS relative mismatch, D.5, :func:`bn_mismatch`), the distillation
  is run again from the same noise with twice the iterations, up to :data:`MAX_BUDGET_FACTOR` times
  the first budget.

Example
-------
>>> x = probe_inputs(g, n=64, kind="distilled", seed=0, progress=False)     # doctest: +SKIP
>>> x.shape, x.dtype                                                          # doctest: +SKIP
((64, 1, 28, 28), dtype('float32'))
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import time
from dataclasses import dataclass, field

import numpy as np
import numba
from numba import njit

from .autodiff import AffineSeed, Program, _affine_rows, input_gradient
from .engine.graph import Graph

__all__ = ["PROBE_KINDS", "DEFAULT_KIND", "DEFAULT_N", "DEFAULT_ITERATIONS", "DEFAULT_LR", "probe_inputs",
           "DEFAULT_TOLERANCE", "MAX_BUDGET_FACTOR", "distill_to_tolerance", "bn_mismatch", "make_probes",
           "DISTILL_THREADS", "distill", "bn_targets", "bn_matching_loss", "DistillationResult", "moments_numpy",
           "OBJECTIVES", "DEFAULT_OBJECTIVE", "channel_weights", "OPTIMIZERS", "DEFAULT_OPTIMIZER",
           "PROBE_SHIFTS", "VIEW_STEP", "shifted_views", "view_shifts", "check_views", "PROBE_MIRRORS",
           "VIEW_KINDS", "DEFAULT_VIEW_KIND", "mirrored_views", "make_views", "check_view_kind", "PART_OPS",
           "splittable"]

#: kinds of probe inputs :func:`probe_inputs` makes
PROBE_KINDS = ("distilled", "noise")
DEFAULT_KIND = "distilled"
#: default budget. Measured (16_probe_inputs.md): at a fixed n * iterations, fewer images optimised for
#: longer give better re-calibrated accuracy (the bottleneck ResNet, ratio re-calibration: 32 x 30 -> 78.2%,
#: 16 x 60 -> 83.1%, 8 x 100 -> 84.7%, 8 x 200 -> 87.5%; real images 87.5%). 8 x 200 is the default: the
#: first budget at which the bottleneck net is within a point of real-image probes; one setting for every
#: model (never tuned per model). Its time is measured in benchmarks/probes.py. It is the first budget:
#: distill_to_tolerance doubles it while the probes miss DEFAULT_TOLERANCE (D.5).
DEFAULT_N = 8
DEFAULT_ITERATIONS = 200
DEFAULT_LR = 0.25
#: what distillation minimises: ``relative`` (D.6: every channel's terms in units of its sigma, every BN
#: layer weighted equally, so the loss is D.5 squared times the number of layers, plus the input term) or
#: ``absolute`` (ZeroQ's D.1, each layer in its own units). Measured (16_probe_inputs.md, "The objective in
#: sigma units"): D.6 reaches the tolerance within the first 200 steps on every zoo model, where D.1 needs
#: 400 and 800 on the MobileNetV2s, and the re-calibrated accuracy is the same or better.
OBJECTIVES = ("relative", "absolute")
DEFAULT_OBJECTIVE = "relative"
#: converged: the probes' BN statistics match the trained ones to 5% of sigma, RMS over channels and BN
#: layers (D.5, :func:`bn_mismatch`). Measured after the default budget (16_probe_inputs.md, "When to stop"):
#: with D.1, 0.055-0.088 on the zoo's ResNets, VGGs and DenseNet, and 0.12 and 0.16 on the MobileNetV2s, where
#: the 17-block net gained 6.8 points at MP2/6 from the longer budget. With D.6 (the default), 0.011-0.046 on
#: every zoo model at every seed of the README's seed table, except the 17-block MobileNetV2 (0.062-0.073,
#: seeds 0-4), which alone distils on to 800 steps (D.5 0.048-0.054): that brought its variance gauge from
#: 0.096 / 0.151 to 0.043 / 0.092 (median / max |log ratio|, seed 0; 16_probe_inputs.md, "A tighter
#: tolerance"). It was 0.1 until then.
DEFAULT_TOLERANCE = 0.05
#: how the images are moved: ``adam`` (ZeroQ's choice; step size on a half cosine from ``lr``) or ``lbfgs``
#: (SciPy's L-BFGS-B, the quasi-Newton method for smooth losses; ``lr`` unused). Either way one step costs
#: one evaluation of L and dL/dx, so ``iterations`` is the same budget for both. Measured in
#: 16_probe_inputs.md ("A quasi-Newton descent"): at the same 200 evaluations L-BFGS reaches a lower
#: mismatch (D.5), and the re-calibrated MobileNetV2s and DenseNet are 0.4-0.75 points more accurate on
#: average over seeds (no zoo model loses).
OPTIMIZERS = ("adam", "lbfgs")
DEFAULT_OPTIMIZER = "lbfgs"
#: L-BFGS memory: the number of (step, gradient change) pairs kept for the inverse-Hessian estimate
LBFGS_MEMORY = 20
#: BLAS threads inside SciPy's L-BFGS-B (its vector updates call BLAS). One: with OpenBLAS's own threads the
#: distillation ran at half speed on 2 cores (ResNet-20, 200 steps: 23.6-25.6 s against 10.7-11.3 s for Adam;
#: 100 evaluations inside the optimizer took 10.2 s with OpenBLAS's default threads and 5.6-6.1 s with one),
#: and one thread also fixes the order of its sums, so the images do not depend on the machine's core count.
LBFGS_BLAS_THREADS = 1
#: the budget doubles at most until it is this many times the iterations asked for (200 -> 400 -> 800)
MAX_BUDGET_FACTOR = 4
#: Threads that share each probe batch while distilling (:func:`distill`'s ``threads``); None: the caller's
#: Numba thread count. Each part of the batch runs its forward and reverse pass on a worker thread at one
#: Numba thread, and the parts are joined for D.2's statistics (16_probe_inputs.md, "The batch in parts"):
#: the same bits at any count. Splitting each op across Numba's pool instead was slower at 8 images (a
#: hand-off per op), so 1 was the default until the parts ran whole passes. Measured on a 2-core AMD EPYC
#: (`znver1`, AVX2) whose second core was partly taken by other load (load average 1.2 before the run),
#: `python benchmarks/probes.py --repeats 3 --baseline OLD/reference` against the one-thread code, same
#: probe bits: ResNet-20 12.1 s against 16.1 s (0.75x), ResNet-56 1.01x, the bottleneck ResNet 0.83x,
#: VGG-small 0.58x, at 1.0-1.7x the CPU time (``benchmarks/results/probes.json``). How much the second
#: core brings depends on how free it is: the blocked conv kernel alone ran 1.6-1.85x as fast on two threads
#: in one minute of this session and about 1x in another.
DISTILL_THREADS = None
#: the mirrored views, in order, as (reverse the rows, reverse the columns): the image itself, mirrored
#: left-right, upside down, and both (rotated by half a turn). The default views (derivation 15, S.6): the
#: sequential re-calibration uses the first ``probe_views`` of them and takes only the variance ratio (S.2)
#: from the views; the mean shift (S.1) comes from the images alone (S.5). A mirror image keeps every object
#: whole, and is not fitted to the full-precision network as the distilled images are, so it carries the
#: drift of the quantized layers into the later stages as real images do (derivation 16, "Which views,
#: measured per stretch").
PROBE_MIRRORS = ((False, False), (False, True), (True, False), (True, True))
#: the circular shifts of a probe image's views, in order, in units of a quarter of the image's height and
#: width: the image itself, then rolled along the three diagonals (a 28 x 28 image by 7 pixels). The option
#: ``shifts`` (derivation 15, S.4; the default before the mirrors).
PROBE_SHIFTS = ((0, 0), (1, 1), (-1, -1), (1, -1))
#: a view's shift is PROBE_SHIFTS[k] times (H // VIEW_STEP, W // VIEW_STEP) pixels
VIEW_STEP = 4
#: how the views of a probe image are made: ``mirrors`` (:func:`mirrored_views`, the default) or ``shifts``
#: (:func:`shifted_views`); either way ``views`` of them per image, the image itself first
VIEW_KINDS = ("mirrors", "shifts")
DEFAULT_VIEW_KIND = "mirrors"

#: the error for a graph without BatchNormalization nodes (distillation matches their statistics)
NO_BN_MESSAGE = ("graph: has no BatchNormalization node to distil against; if BN was folded into the convs on "
                 "export (torch.onnx.export's default), export with dfmpc.interop.torch_export.export_onnx, "
                 "which keeps it, or use noise probes (kind='noise')")
#: the virtual BN in front of the network: images standardised to mean 0, variance 1 (D.1's input term)
INPUT_EPS = 1e-5


@dataclass(frozen=True)
class BNTarget:
    """One BN to match: the tensor it reads, its running mean ``mu`` (C,) and ``sigma = sqrt(var + eps)`` (C,)."""

    node: str
    tensor: str
    mu: np.ndarray
    sigma: np.ndarray
    eps: float


@dataclass
class DistillationResult:
    """What :func:`distill` did: the images, ``loss[k]`` = the objective (D.6 or D.1) before step k (last: after the last step).

    :func:`distill_to_tolerance` also sets ``iterations`` (of the run kept), ``mismatch`` (D.5 of ``x``)
    and ``budgets`` (the iterations of every run it made, in order); ``seconds`` then covers all runs.
    """

    x: np.ndarray
    loss: list = field(default_factory=list)
    seconds: float = 0.0
    iterations: int | None = None
    mismatch: float | None = None
    budgets: list = field(default_factory=list)


def unmeasured_convs(f):
    """Decorator: ``f`` runs inside :func:`dfmpc.engine.conv.unmeasured` (no timed kernel choice), so
    that what it computes from a network depends on the weights and the seed, not on the machine's
    kernel-choice file. Used by :func:`distill`, :func:`probe_inputs`, :func:`bn_mismatch`,
    :func:`bn_matching_loss` and :func:`dfmpc.pipeline.quantize_network`."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from .engine.conv import unmeasured
        with unmeasured():
            return f(*args, **kwargs)
    return wrapper


def bn_targets(graph: Graph) -> list[BNTarget]:
    """The BatchNormalization nodes of ``graph`` with what their inputs should look like.

    Parameters
    ----------
    graph : Graph

    Returns
    -------
    list of BNTarget
        In topological order; ``mu`` and ``sigma`` float64 of shape (C,).
    """
    out = []
    for node in graph.nodes_of("BatchNormalization"):
        p, eps = node.params, float(node.attrs.get("epsilon", 1e-5))
        out.append(BNTarget(node.name, node.inputs[0], p["mean"].astype(np.float64),
                            np.sqrt(p["var"].astype(np.float64) + eps), eps))
    return out


def _rows(z: np.ndarray) -> np.ndarray:
    """An (N, C, ...) tensor as (N*..., C) rows, channel last (a free view for NHWC memory)."""
    return np.moveaxis(z, 1, -1).reshape(-1, z.shape[1])


def _stat_loss(z: np.ndarray, mu: np.ndarray, sigma: np.ndarray, eps: float, grad: bool, lazy: bool = False,
               w=1.0):
    """(D.2)-(D.3) for one tensor z (N, C, ...): ``sum_c w_c ((mu_b - mu)^2 + (s_b - sigma)^2)`` and dL/dz (or None).

    ``w``: per-channel weights, a scalar or (C,): 1 for D.1, ``1 / (C sigma^2)`` for D.6 (:func:`channel_weights`).
    ``lazy``: a float32 (N, C, H, W) z's gradient as an :class:`~dfmpc.autodiff.AffineSeed` (the same
    values, formed by the reverse pass inside the V.2 of the BN that reads z)."""
    r = _rows(z)
    M = r.shape[0]
    if r.dtype == np.float64:
        mu_b = r.mean(axis=0)
        var_b = np.einsum("mc,mc->c", r - mu_b, r - mu_b) / M
    else:                                          # float32: sums over images, then over positions (short sums)
        per_image = r.reshape(z.shape[0], -1)
        if per_image.flags.c_contiguous:
            s1, s2 = _moments_kernel(per_image, r.shape[1])
        else:                                                                   # pragma: no cover
            s1, s2 = moments_numpy(per_image, r.shape[1])
        mu_b = s1 / M
        var_b = np.maximum(s2 / M - mu_b ** 2, 0.0)
    s_b = np.sqrt(var_b + eps)
    loss = float(np.sum(w * (mu_b - mu) ** 2) + np.sum(w * (s_b - sigma) ** 2))          # D.1, or D.6 with w
    if not grad:
        return loss, None
    a = 2.0 * w * (mu_b - mu) / M                                      # dL/dmu_b * dmu_b/dz
    b = 2.0 * w * (s_b - sigma) / (s_b * M)                            # dL/ds_b * ds_b/dvar_b * 2 / M
    if r.dtype == np.float32 and lazy and z.ndim == 4:
        return loss, AffineSeed(z, b.astype(np.float32), (a - b * mu_b).astype(np.float32))
    if r.dtype == np.float32:                                          # (D.3): a + b (z - mu_b), rows (M, C)
        g = np.empty(r.shape, np.float32)
        _affine_rows(r, b.astype(np.float32), (a - b * mu_b).astype(np.float32), g)    # one pass, as below
    else:
        g = r * b.astype(r.dtype)
        g += (a - b * mu_b).astype(r.dtype)
    shape = (z.shape[0],) + z.shape[2:] + (z.shape[1],)
    return loss, np.moveaxis(g.reshape(shape), -1, 1)


def shifted_views(x: np.ndarray, views: int) -> np.ndarray:
    """The probes and their circularly shifted copies, ``views`` per image (derivation 15, S.4).

    View k rolls every image by ``PROBE_SHIFTS[k] * (H // VIEW_STEP, W // VIEW_STEP)`` pixels along H and W:
    the image itself, then a quarter of the image along each of three diagonals.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32
    views : int, 1 <= views <= len(PROBE_SHIFTS)
        1 returns a copy of ``x``.

    Returns
    -------
    ndarray, shape (views * N, C, H, W), float32
        View after view: rows ``k * N`` to ``(k + 1) * N - 1`` hold view k, so the first N rows are ``x``.

    Raises
    ------
    ValueError
        ``x`` not a non-empty float32 (N, C, H, W) array, or ``views`` out of range.

    Examples
    --------
    A pixel at (0, 0) of an 8 x 8 image moves to (2, 2) in the second view and wraps around to (6, 6) in
    the third:

    >>> x = np.zeros((1, 1, 8, 8), np.float32); x[0, 0, 0, 0] = 1
    >>> v = shifted_views(x, 3)
    >>> v.shape, [tuple(int(i) for i in np.argwhere(im[0])[0]) for im in v]
    ((3, 1, 8, 8), [(0, 0), (2, 2), (6, 6)])
    """
    _check_images(x)
    views = check_views(views)
    return np.ascontiguousarray(np.concatenate([np.roll(x, s, axis=(2, 3)) for s in view_shifts(x.shape[2:], views)]))


def view_shifts(size, views: int) -> list[tuple[int, int]]:
    """The pixel shifts (rows, columns) of the first ``views`` views of an image of ``size`` (H, W):
    ``PROBE_SHIFTS[k] * (H // VIEW_STEP, W // VIEW_STEP)`` (an image smaller than VIEW_STEP pixels along an
    axis is not shifted along it).

    >>> view_shifts((28, 28), 4)
    [(0, 0), (7, 7), (-7, -7), (7, -7)]
    """
    H, W = (int(v) for v in size)
    return [(a * (H // VIEW_STEP), b * (W // VIEW_STEP)) for a, b in PROBE_SHIFTS[:check_views(views)]]


def mirrored_views(x: np.ndarray, views: int) -> np.ndarray:
    """The probes and their mirror images, ``views`` per image (derivation 15, S.6, "Mirrored views").

    View k reverses the rows and/or the columns of every image as ``PROBE_MIRRORS[k]`` says: the image
    itself, then mirrored left-right, upside down, and both.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32
    views : int, 1 <= views <= len(PROBE_MIRRORS)
        1 returns a copy of ``x``.

    Returns
    -------
    ndarray, shape (views * N, C, H, W), float32
        View after view: rows ``k * N`` to ``(k + 1) * N - 1`` hold view k, so the first N rows are ``x``.

    Raises
    ------
    ValueError
        ``x`` not a non-empty float32 (N, C, H, W) array, or ``views`` out of range.

    Examples
    --------
    A pixel at (0, 1) of a 4 x 4 image goes to (0, 2), (3, 1) and (3, 2) in the other views:

    >>> x = np.zeros((1, 1, 4, 4), np.float32); x[0, 0, 0, 1] = 1
    >>> [tuple(int(i) for i in np.argwhere(im[0])[0]) for im in mirrored_views(x, 4)]
    [(0, 1), (0, 2), (3, 1), (3, 2)]
    """
    _check_images(x)
    views = check_views(views)
    out = [x[:, :, ::-1 if rows else 1, ::-1 if cols else 1] for rows, cols in PROBE_MIRRORS[:views]]
    return np.ascontiguousarray(np.concatenate(out))


def make_views(x: np.ndarray, views: int, kind: str = DEFAULT_VIEW_KIND) -> np.ndarray:
    """``views`` views of every probe image, made as ``kind`` says: :func:`shifted_views` or :func:`mirrored_views`.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32
    views : int in [1, 4]
    kind : {"mirrors", "shifts"}

    Returns
    -------
    ndarray, shape (views * N, C, H, W), float32; the first N rows are ``x``.

    Raises
    ------
    ValueError
        Bad ``x`` or ``views``, or ``kind`` not in :data:`VIEW_KINDS`.
    """
    kind = check_view_kind(kind)
    return shifted_views(x, views) if kind == "shifts" else mirrored_views(x, views)


def check_view_kind(kind, name: str = "kind") -> str:
    """``kind`` if it is one of :data:`VIEW_KINDS`; otherwise a ValueError naming ``name``."""
    if not isinstance(kind, str) or kind not in VIEW_KINDS:
        raise ValueError(f"{name}: expected one of {VIEW_KINDS}, got {kind!r}")
    return kind


def _check_images(x):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"x: expected a non-empty float32 array (N, C, H, W), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")


def check_views(views, name: str = "views") -> int:
    """``views`` as an int in ``[1, len(PROBE_SHIFTS)]``; otherwise a ValueError naming ``name``."""
    if isinstance(views, bool) or not isinstance(views, numbers.Integral) or not 1 <= views <= len(PROBE_SHIFTS):
        raise ValueError(f"{name}: expected an integer in [1, {len(PROBE_SHIFTS)}], got {views!r}")
    return int(views)


def _formed(g):
    return g.value() if isinstance(g, AffineSeed) else g


def _program(graph: Graph, targets: list[BNTarget]) -> Program:
    """The reverse-mode program from the graph input to every BN input (made once per distillation)."""
    name = graph.inputs[0]
    return Program(graph, [t.tensor for t in targets if t.tensor != name])


def moments_numpy(per_image: np.ndarray, C: int):
    """D.2's float32 sums: per channel, ``sum z`` and ``sum z^2`` over images (float32, image by image)
    then over positions (float64, in order).

    Parameters
    ----------
    per_image : ndarray, shape (N, K), float32
        One row per image, channel fastest (``K = positions * C``).
    C : int

    Returns
    -------
    s1, s2 : ndarray, shape (C,), float64
    """
    s1 = per_image.sum(axis=0).reshape(-1, C).sum(axis=0, dtype=np.float64)
    s2 = np.square(per_image).sum(axis=0).reshape(-1, C).sum(axis=0, dtype=np.float64)
    return s1, s2


@njit(cache=True, nogil=True)
def _moments_kernel(per_image, C):                          # pragma: no cover (compiled)
    """Twin of :func:`moments_numpy` in one pass, the same additions in the same order: position by
    position, the C channels' float32 sums over images side by side in a scratch row (loops over
    contiguous channels through row slices, which vectorise; no ``j % C`` per element), then added
    into the float64 sums in increasing ``j``."""
    n, k = per_image.shape
    s1, s2 = np.zeros(C), np.zeros(C)
    acc = np.empty((2, C), np.float32)
    a, q = acc[0], acc[1]
    for base in range(0, k, C):
        row = per_image[0, base:base + C]
        for c in range(C):
            v = row[c]
            a[c] = v
            q[c] = v * v
        for i in range(1, n):
            row = per_image[i, base:base + C]
            for c in range(C):
                v = row[c]
                a[c] += v
                q[c] += v * v
        for c in range(C):
            s1[c] += a[c]
            s2[c] += q[c]
    return s1, s2


def channel_weights(sigma: np.ndarray, objective: str) -> np.ndarray | float:
    """Per-channel weights of one BN's terms: 1 for ``absolute`` (D.1), ``1 / (C sigma_c^2)`` for ``relative`` (D.6).

    Parameters
    ----------
    sigma : ndarray, shape (C,)
        The BN's ``sqrt(var + eps)``, finite and > 0.
    objective : {"relative", "absolute"}

    Returns
    -------
    float or ndarray, shape (C,)
        1.0 for ``absolute``; float64 weights for ``relative``.

    Raises
    ------
    ValueError
        ``objective`` is not one of :data:`OBJECTIVES`, or ``sigma`` is not a non-empty 1-D array of
        finite values > 0.

    Examples
    --------
    With these weights one BN's D.6 term is the mean over its channels of the squared errors in units
    of sigma: a mean off by one sigma in one of two channels gives 0.5.

    >>> w = channel_weights(np.array([1.0, 2.0]), "relative")
    >>> w.tolist(), float(np.sum(w * np.array([0.0, 2.0]) ** 2))
    ([0.5, 0.125], 0.5)
    """
    _check_objective(objective)
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 1 or sigma.size == 0 or not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
        raise ValueError(f"sigma: expected a non-empty 1-D array of finite values > 0, got shape {sigma.shape}")
    return _channel_weights(sigma, objective)


def _channel_weights(sigma: np.ndarray, objective: str) -> np.ndarray | float:
    """:func:`channel_weights` without the checks, for the distillation loop: its callers validated the
    objective at the door, and ``sigma = sqrt(var + eps)`` of a checked BN is positive and finite."""
    if objective == "absolute":
        return 1.0
    return 1.0 / (sigma.size * sigma ** 2)                                   # D.6


def _check_objective(objective):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    return objective


def _loss_and_grad(graph: Graph, targets: list[BNTarget], x: np.ndarray, grad: bool = True,
                   program: Program | None = None, objective: str = "absolute", parts: int = 1):
    """L (D.1, or D.6 for ``objective="relative"``) on the batch x (N, C, H, W) and, if ``grad``, dL/dx
    of x's shape and dtype.

    ``program``: :func:`_program` of ``graph`` and ``targets``, reused across calls (made if None).
    ``parts``: the images are cut into this many consecutive parts (at most N; one when an op on the way
    is not in :data:`PART_OPS`), and each part's forward and reverse pass runs on a worker thread at one
    Numba thread (:func:`_split_passes`); the batch statistics are taken over the parts joined again. Every op on the way treats each image alone and,
    with the kernels fixed as :func:`distill` fixes them (:func:`unmeasured_convs`), every kernel sums in
    an order that does not depend on the batch, so L and dL/dx are the same bits for any ``parts``
    (``tests/test_probes.py``).
    """
    name = graph.inputs[0]
    program = program or _program(graph, targets)
    bounds = _part_bounds(len(x), parts if splittable(program) else 1)
    tapes = _split_passes(program.record, [(x[a:b],) for a, b in zip(bounds, bounds[1:])])
    loss, seeds, gx = 0.0, [{} for _ in tapes], np.zeros_like(x) if grad else None
    for t in targets:
        z = x if t.tensor == name else _joined([tape.values[t.tensor] for tape in tapes])
        l, g = _stat_loss(z, t.mu, t.sigma, t.eps, grad, lazy=t.tensor != name, w=_channel_weights(t.sigma, objective))
        loss += l
        if g is None:
            continue
        if t.tensor == name:
            gx += g
            continue
        for tape, s, a, b in zip(tapes, seeds, bounds, bounds[1:]):
            gp = AffineSeed(tape.values[t.tensor], g.b, g.c) if isinstance(g, AffineSeed) else g[a:b]
            s[t.tensor] = gp if t.tensor not in s else _formed(s[t.tensor]) + _formed(gp)   # two BNs read one tensor
    C = x.shape[1]
    sigma_in = np.full(C, math.sqrt(1.0 + INPUT_EPS))
    l, g = _stat_loss(x, np.zeros(C), sigma_in, INPUT_EPS, grad, w=_channel_weights(sigma_in, objective))  # input term
    loss += l
    if grad:
        gx += g
        if seeds[0]:
            for gp, a, b in zip(_split_passes(input_gradient, list(zip(tapes, seeds))), bounds, bounds[1:]):
                gx[a:b] += gp
    return loss, gx


#: Ops whose float32 forward and reverse rules give each image's values independently of the other images
#: and of the batch size, bit for bit (with the conv kernels fixed, :func:`unmeasured_convs`): a batch of
#: probes whose program holds only these may run in parts (:func:`_loss_and_grad`). Not Gemm (BLAS's
#: order of summation may change with the number of rows) nor GlobalAveragePool (NumPy's reduction
#: order over H, W may change with the layout), nor any op not checked in ``tests/test_probes.py``.
PART_OPS = frozenset({"Conv", "BatchNormalization", "Relu", "Clip", "LeakyRelu", "MaxPool", "AveragePool",
                      "Add", "Mul", "Concat", "Identity", "Dropout"})


def splittable(program: Program) -> bool:
    """Whether a batch may run through ``program`` in parts with the same bits (every op in :data:`PART_OPS`).

    Parameters
    ----------
    program : dfmpc.autodiff.Program
        The reverse-mode program of a distillation (its nodes from the input to the last BN input).

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        ``program`` is not a :class:`~dfmpc.autodiff.Program`.
    """
    if not isinstance(program, Program):
        raise ValueError(f"program: expected a dfmpc.autodiff.Program, got {type(program).__name__}")
    return all(n.op in PART_OPS for n in program.nodes)


def _part_bounds(n: int, parts: int) -> list[int]:
    """``parts`` (at most n) consecutive ranges of n images as their bounds: ``[0, ..., n]``."""
    parts = max(1, min(parts, n))
    return [n * i // parts for i in range(parts + 1)]


def _split_passes(f, args: list):
    """``[f(*a) for a in args]``, on the calling thread for one part, else on the engine's worker threads
    (:func:`dfmpc.engine.executor.worker_pool`, each at one Numba thread), with the caller's kernel
    setting (:func:`unmeasured_convs`) in each. Measured gains in :data:`DISTILL_THREADS`."""
    if len(args) == 1:
        return [f(*args[0])]
    from .engine.conv import is_unmeasured, unmeasured
    from .engine.executor import worker_pool
    setting = unmeasured if is_unmeasured() else contextlib.nullcontext

    def run(a):
        with setting():
            return f(*a)
    return list(worker_pool(len(args)).map(run, args))


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The parts of one tensor joined along the images, in the memory order of the first (an NCHW view of
    NHWC memory stays one, so that :func:`_rows` of it is a view)."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].ndim == 4 and parts[0].transpose(0, 2, 3, 1).flags.c_contiguous:
        return np.concatenate([p.transpose(0, 2, 3, 1) for p in parts]).transpose(0, 3, 1, 2)
    return np.concatenate(parts)


@unmeasured_convs
def bn_matching_loss(graph: Graph, x: np.ndarray, batch_size: int | None = None, objective: str = "absolute") -> float:
    """ZeroQ's BN-statistics loss (D.1), or its relative form (D.6), of a batch of images, batch statistics over all of ``x``.

    Parameters
    ----------
    graph : Graph
        Full-precision network with BatchNormalization nodes; one input.
    x : ndarray, shape (N, C, H, W), float32
    batch_size : int, optional
        Not used for the statistics (always over all N images); reserved.
    objective : {"absolute", "relative"}
        ``absolute``: D.1; ``relative``: D.6, each channel's terms divided by ``C sigma^2``.

    Returns
    -------
    float
        ``sum_BN ||mu_b - mu||^2 + ||s_b - sigma||^2 + ||mean(x)||^2 + ||s(x) - 1||^2`` (D.1), >= 0;
        for ``relative`` each channel's two terms are multiplied by :func:`channel_weights` (D.6).

    Raises
    ------
    ValueError
        ``x`` not a non-empty float32 (N, C, H, W) array, or the graph has no BN node or an op
        without a forward rule before its last BN.
    """
    targets = _checked_targets(graph, x)
    return _loss_and_grad(graph, targets, x, grad=False, objective=_check_objective(objective))[0]


@unmeasured_convs
def bn_mismatch(graph: Graph, x: np.ndarray) -> float:
    """How far the BN layers' batch statistics on ``x`` are from their running statistics (D.5).

    ``e_l = mean_c ((mu_b[c] - mu[c]) / sigma[c])^2 + ((s_b[c] - sigma[c]) / sigma[c])^2`` per BN l (D.2's
    ``mu_b``, ``s_b`` over all of ``x``, in float64), and the result is ``sqrt(mean_l e_l)``: the RMS
    error of the probes' per-channel mean and standard deviation in units of the trained sigma, each BN
    layer weighted equally. Unlike L (D.1) it does not depend on the scale of any layer.

    Parameters
    ----------
    graph : Graph
        Full-precision network with BatchNormalization nodes; one input.
    x : ndarray, shape (N, C, H, W), float32

    Returns
    -------
    float
        >= 0; 0 when every BN input has exactly its running mean and ``sqrt(var + eps)`` as batch
        statistics.

    Raises
    ------
    ValueError
        ``x`` not a non-empty float32 (N, C, H, W) array, or the graph has no BN node or an op
        without a forward rule before its last BN.

    Examples
    --------
    >>> from dfmpc.evaluation import load_zoo_model
    >>> g = load_zoo_model("resnet20")
    >>> x = probe_inputs(g, kind="noise")
    >>> round(bn_mismatch(g, x), 2) > 0.5 > bn_mismatch(g, distill(g, x, iterations=10).x)
    True
    """
    targets = _checked_targets(graph, x)
    name = graph.inputs[0]
    inner = [t.tensor for t in targets if t.tensor != name]
    values = Program(graph, list(dict.fromkeys(inner))).record(x).values if inner else {}
    e = []
    for t in targets:
        r = _rows(x if t.tensor == name else values[t.tensor]).astype(np.float64)
        mu_b = r.mean(axis=0)
        s_b = np.sqrt(np.mean((r - mu_b) ** 2, axis=0) + t.eps)                                 # (D.2)
        e.append(np.mean(((mu_b - t.mu) / t.sigma) ** 2 + ((s_b - t.sigma) / t.sigma) ** 2))   # (D.5)
    return float(np.sqrt(np.mean(e)))


def _checked_targets(graph, x) -> list[BNTarget]:
    """The BN targets of ``graph``, after checking the graph and a batch ``x`` (N, C, H, W) float32."""
    _check_graph(graph)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"x: expected a non-empty float32 array (N, C, H, W), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    targets = bn_targets(graph)
    if not targets:
        raise ValueError("graph: has no BatchNormalization node, nothing to match")
    return targets


def _check_graph(graph):
    if not isinstance(graph, Graph):
        raise ValueError(f"graph: expected a dfmpc Graph, got {type(graph).__name__}")
    if len(graph.inputs) != 1:
        raise ValueError(f"graph: expected a single input, got {graph.inputs}")


def _check_optimizer(optimizer):
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")


def _check_tolerance(tolerance):
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real)
                                  or not (math.isfinite(tolerance) and tolerance > 0)):
        raise ValueError(f"tolerance: expected a finite number > 0 or None, got {tolerance!r}")


def _check_int(v, name, lo):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    return int(v)


def _input_shape(graph, input_shape):
    shape = graph.input_shapes.get(graph.inputs[0]) if input_shape is None else input_shape
    if shape is None or len(tuple(shape)) != 3 or any(not isinstance(s, numbers.Integral) or isinstance(s, bool)
                                                      or s < 1 for s in shape):
        raise ValueError(f"input_shape: expected (C, H, W) of positive ints (the graph's input shape is "
                         f"{graph.input_shapes.get(graph.inputs[0])}), got {shape!r}")
    return tuple(int(s) for s in shape)


@unmeasured_convs
def distill(graph: Graph, x0: np.ndarray, iterations: int = DEFAULT_ITERATIONS, lr: float = DEFAULT_LR,
            batch_size: int | None = None, progress: bool | None = False,
            threads: int | None = DISTILL_THREADS, objective: str = DEFAULT_OBJECTIVE,
            optimizer: str = DEFAULT_OPTIMIZER) -> DistillationResult:
    """Adam or L-BFGS on the images to minimise D.6 (or D.1), each batch against the FP32 graph's BN statistics.

    ``adam``: Adam (beta1 0.9, beta2 0.999, eps 1e-8) with the step size following a half cosine from
    ``lr`` down to ``lr / 100`` over the iterations. ``lbfgs``: SciPy's L-BFGS-B (no bounds, memory
    :data:`LBFGS_MEMORY`) on the images as one float64 vector, at most ``iterations`` evaluations of
    the loss and its gradient (each evaluated in float32, as for Adam), no other stopping rule.
    Deterministic: no randomness after ``x0``.

    Parameters
    ----------
    graph : Graph
        Full-precision network with BatchNormalization nodes; one input. Not modified.
    x0 : ndarray, shape (N, C, H, W), float32
        Starting images (not modified).
    iterations : int >= 0
        Steps per batch: Adam steps, or L-BFGS evaluations of the loss and gradient (the same cost).
    lr : float > 0
        Initial Adam step size (in units of the standardised input); unused by ``lbfgs``.
    batch_size : int >= 1, optional
        Images whose BN statistics are matched together (default: all N). Batches are optimised
        one after the other, each for ``iterations`` steps.
    progress : bool or None
        A progress bar (tqdm) on stderr; None: only when stderr is a terminal and the work lasts
        more than a couple of seconds (:class:`dfmpc.evaluation.Progress`).
    threads : int >= 1 or None
        Threads that share each batch's images: each runs the forward and reverse passes of its part
        at one Numba thread (:func:`_loss_and_grad`), capped at the batch size and at
        ``numba.config.NUMBA_NUM_THREADS``. None: the caller's Numba thread count
        (``numba.get_num_threads()``), restored on return. The result does not depend on it: the same
        bits at any count. Default :data:`DISTILL_THREADS`, see there.
    objective : {"relative", "absolute"}
        The loss: D.6, in units of each BN's sigma (default, :data:`DEFAULT_OBJECTIVE`), or ZeroQ's D.1.
    optimizer : {"adam", "lbfgs"}
        How the images move (default :data:`DEFAULT_OPTIMIZER`, see there).

    Returns
    -------
    DistillationResult
        ``x`` (N, C, H, W) float32; ``loss`` has ``iterations + 1`` entries, each the mean over
        batches of the objective before that step (the last: after the last step; for ``lbfgs``,
        the lowest loss evaluated up to that step); ``seconds``.

    Raises
    ------
    ValueError
        A bad argument (named), a graph without BN, or an op before the last BN that has no
        vector-Jacobian product in :data:`dfmpc.autodiff.RULES` (the message names op and node).
    """
    t0 = time.perf_counter()
    _check_graph(graph)
    if not isinstance(x0, np.ndarray) or x0.dtype != np.float32 or x0.ndim != 4 or len(x0) == 0:
        raise ValueError(f"x0: expected a non-empty float32 array (N, C, H, W), got "
                         f"{getattr(x0, 'dtype', type(x0).__name__)} {getattr(x0, 'shape', '')}")
    if not np.all(np.isfinite(x0)):
        raise ValueError("x0: expected finite values")
    iterations = _check_int(iterations, "iterations", 0)
    _check_objective(objective)
    _check_optimizer(optimizer)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
    before = numba.get_num_threads()
    parts = before if threads is None else min(_check_int(threads, "threads", 1), numba.config.NUMBA_NUM_THREADS)
    N = len(x0)
    batch_size = N if batch_size is None else _check_int(batch_size, "batch_size", 1)
    targets = bn_targets(graph)
    if not targets:
        raise ValueError(NO_BN_MESSAGE)
    x = x0.copy()
    starts = list(range(0, N, batch_size))
    losses = np.zeros((len(starts), iterations + 1))
    from .evaluation import Progress
    bar = Progress(iterations * len(starts), "distilling probe inputs", enabled=progress, unit="step")
    program = _program(graph, targets)
    try:
        numba.set_num_threads(1)                  # the loss's own kernels; the parts run on the workers
        if optimizer == "adam":
            _adam(graph, targets, program, x, starts, batch_size, iterations, lr, losses, bar, objective, parts)
        else:
            _lbfgs(graph, targets, program, x, starts, batch_size, iterations, losses, bar, objective, parts)
    finally:
        numba.set_num_threads(before)
    return DistillationResult(x, [float(v) for v in losses.mean(axis=0)], time.perf_counter() - t0)


def _adam(graph, targets, program, x, starts, batch_size, iterations, lr, losses, bar, objective, parts=1):
    """:func:`distill`'s loop: Adam on each batch of ``x`` in place; ``losses[bi, k]`` = L before step k."""
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    for bi, s in enumerate(starts):
        xb = x[s:s + batch_size]                                  # a view: updated in place
        m, v = np.zeros_like(xb), np.zeros_like(xb)
        for k in range(iterations):
            loss, g = _loss_and_grad(graph, targets, xb, program=program, objective=objective, parts=parts)
            losses[bi, k] = loss
            step = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * k / max(iterations, 1))))
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            mhat = m / (1 - b1 ** (k + 1))
            vhat = v / (1 - b2 ** (k + 1))
            xb -= (step * mhat / (np.sqrt(vhat) + adam_eps)).astype(np.float32)
            bar.update(bi * iterations + k + 1, postfix=f"BN loss {loss:.3g}")
        losses[bi, iterations] = _loss_and_grad(graph, targets, xb, grad=False, program=program,
                                                objective=objective, parts=parts)[0]


class _BudgetSpent(Exception):
    """Raised inside L-BFGS-B's objective once the evaluation budget is spent (SciPy's maxfun can overrun it)."""


def _lbfgs(graph, targets, program, x, starts, batch_size, iterations, losses, bar, objective, parts=1):
    """:func:`distill`'s loop with L-BFGS-B: each batch of ``x`` in place, at most ``iterations`` evaluations,
    ending at the images of the lowest loss evaluated; ``losses[bi, k]`` = the lowest L of the first k + 1
    evaluations (the last entry: L of the images returned)."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits
    for bi, s in enumerate(starts):
        xb = x[s:s + batch_size]                                  # a view: updated in place
        if iterations == 0:                                        # no step: the loss of x0 only
            losses[bi, 0] = _loss_and_grad(graph, targets, xb, grad=False, program=program, objective=objective,
                                           parts=parts)[0]
            continue
        shape, seen, best = xb.shape, [], [math.inf, xb.copy()]

        def fun(v):
            if len(seen) == iterations:
                raise _BudgetSpent
            xv = v.reshape(shape).astype(np.float32)
            loss, g = _loss_and_grad(graph, targets, xv, program=program, objective=objective, parts=parts)
            seen.append(loss)
            if loss < best[0]:
                best[:] = [loss, xv]
            bar.update(bi * iterations + min(len(seen), iterations), postfix=f"BN loss {loss:.3g}")
            return loss, g.astype(np.float64).ravel()

        try:
            with threadpool_limits(limits=LBFGS_BLAS_THREADS, user_api="blas"):
                minimize(fun, xb.astype(np.float64).ravel(), jac=True, method="L-BFGS-B",
                         options={"maxiter": iterations, "maxfun": iterations + 1, "maxcor": LBFGS_MEMORY,
                                  "ftol": 0.0, "gtol": 0.0})
        except _BudgetSpent:
            pass
        history = np.minimum.accumulate(np.asarray(seen, dtype=np.float64))
        losses[bi, :len(history)] = history
        losses[bi, len(history):] = history[-1]
        xb[...] = best[1]


@unmeasured_convs
def distill_to_tolerance(graph: Graph, x0: np.ndarray, iterations: int = DEFAULT_ITERATIONS,
                         tolerance: float | None = DEFAULT_TOLERANCE, max_factor: int = MAX_BUDGET_FACTOR,
                         lr: float = DEFAULT_LR, batch_size: int | None = None,
                         progress: bool | None = False, objective: str = DEFAULT_OBJECTIVE,
                         optimizer: str = DEFAULT_OPTIMIZER) -> DistillationResult:
    """:func:`distill`, with the budget doubled until the probes match the BN statistics (D.5).

    Distil ``x0`` for ``iterations`` steps; while :func:`bn_mismatch` of the result exceeds
    ``tolerance`` and twice the budget is at most ``max_factor * iterations``, distil ``x0`` again,
    from the start, for twice as many steps (a longer cosine schedule reaches a lower loss than more
    steps appended to a finished one; 16_probe_inputs.md, "When to stop"). The run with the smallest
    mismatch is returned (in practice the last).

    Parameters
    ----------
    graph : Graph
        Full-precision network with BatchNormalization nodes; one input. Not modified.
    x0 : ndarray, shape (N, C, H, W), float32
        Starting images (not modified); every run starts from them.
    lr, batch_size, progress, objective, optimizer
        As for :func:`distill`.
    iterations : int >= 0
        The first budget (steps).
    tolerance : float > 0 or None
        Target of D.5; None: one run of ``iterations`` steps, as :func:`distill`.
    max_factor : int >= 1
        The largest budget is ``max_factor * iterations``.

    Returns
    -------
    DistillationResult
        Of the run kept, with ``iterations``, ``mismatch``, ``budgets`` set and ``seconds`` for all runs.

    Raises
    ------
    ValueError
        A bad argument (named), and as :func:`distill`.
    """
    t0 = time.perf_counter()
    _check_tolerance(tolerance)
    max_factor = _check_int(max_factor, "max_factor", 1)
    budget, budgets, best = _check_int(iterations, "iterations", 0), [], None
    while True:
        run = distill(graph, x0, iterations=budget, lr=lr, batch_size=batch_size, progress=progress,
                      objective=objective, optimizer=optimizer)
        run.iterations, run.mismatch = budget, bn_mismatch(graph, run.x)                    # (D.5)
        budgets.append(budget)
        if best is None or run.mismatch < best.mismatch:
            best = run
        if tolerance is None or run.mismatch <= tolerance or budget == 0 or 2 * budget > max_factor * iterations:
            break
        budget *= 2
    best.budgets, best.seconds = budgets, time.perf_counter() - t0
    return best


@unmeasured_convs
def make_probes(graph: Graph, n: int = DEFAULT_N, kind: str = DEFAULT_KIND, seed: int = 0,
                iterations: int = DEFAULT_ITERATIONS, lr: float = DEFAULT_LR, batch_size: int | None = None,
                input_shape=None, progress: bool | None = None,
                tolerance: float | None = DEFAULT_TOLERANCE, objective: str = DEFAULT_OBJECTIVE,
                optimizer: str = DEFAULT_OPTIMIZER) -> DistillationResult:
    """Probe images for the sequential re-calibration, made from the network alone (no data), with
    how they were made (:class:`DistillationResult`: ``x``, and for ``distilled`` the steps of the run
    kept, its mismatch D.5 and the budgets tried). :func:`probe_inputs` returns only the images.

    Parameters
    ----------
    graph : Graph
        Full-precision network; one input whose shape (C, H, W) is known (or give ``input_shape``).
        Not modified.
    n : int >= 1
        Number of images.
    kind : {"distilled", "noise"}
        ``noise``: x ~ N(0, 1) i.i.d. ``distilled``: that same noise, optimised by :func:`distill`
        until the FP32 graph's BN layers see their running statistics (D.6, or D.1: ``objective``).
    seed : int >= 0
        Seed of the starting noise (``numpy.random.default_rng(seed)``); equal arguments give
        bit-identical images on one machine.
    iterations : int >= 0
        Distillation steps (``distilled`` only; 0 returns the noise); doubled, up to :data:`MAX_BUDGET_FACTOR`
        times, while the images miss ``tolerance`` (:func:`distill_to_tolerance`).
    lr : float > 0
        Initial Adam step size (``distilled`` only).
    batch_size : int >= 1, optional
        Images whose statistics are matched together (``distilled`` only; default all n).
    input_shape : tuple (C, H, W), optional
        Overrides the graph's recorded input shape.
    progress : bool or None
        Progress bar (tqdm) on stderr while distilling; None: only when stderr is a terminal and the
        work lasts more than a couple of seconds.
    tolerance : float > 0 or None
        ``distilled`` only: the RMS relative BN mismatch (D.5, :func:`bn_mismatch`) at which the
        distillation stops asking for more steps (default :data:`DEFAULT_TOLERANCE`); None: exactly
        ``iterations`` steps.
    objective : {"relative", "absolute"}
        ``distilled`` only: the loss minimised, D.6 (default) or ZeroQ's D.1 (:func:`distill`).
    optimizer : {"adam", "lbfgs"}
        ``distilled`` only: how the images move (:func:`distill`, :data:`DEFAULT_OPTIMIZER`).

    Returns
    -------
    DistillationResult
        ``x`` of shape (n, C, H, W), float32. ``noise``: ``iterations`` 0 and no loss history.

    Raises
    ------
    ValueError
        A bad argument (named), an unknown input shape, a graph without BN (``distilled``), or an
        op before the last BN without a vector-Jacobian product (the message names op and node).
    """
    _check_graph(graph)
    n = _check_int(n, "n", 1)
    if kind not in PROBE_KINDS:
        raise ValueError(f"kind: expected one of {PROBE_KINDS}, got {kind!r}")
    seed = _check_int(seed, "seed", 0)
    _check_tolerance(tolerance)
    _check_objective(objective)
    _check_optimizer(optimizer)
    shape = _input_shape(graph, input_shape)
    x0 = np.random.default_rng(seed).standard_normal((n,) + shape, dtype=np.float32)
    if kind == "noise":
        return DistillationResult(x0, iterations=0)
    return distill_to_tolerance(graph, x0, iterations=iterations, tolerance=tolerance, lr=lr,
                                batch_size=batch_size, progress=progress, objective=objective,
                                optimizer=optimizer)


def probe_inputs(graph: Graph, n: int = DEFAULT_N, kind: str = DEFAULT_KIND, seed: int = 0,
                 iterations: int = DEFAULT_ITERATIONS, lr: float = DEFAULT_LR, batch_size: int | None = None,
                 input_shape=None, progress: bool | None = None,
                 tolerance: float | None = DEFAULT_TOLERANCE, objective: str = DEFAULT_OBJECTIVE,
                 optimizer: str = DEFAULT_OPTIMIZER) -> np.ndarray:
    """The images of :func:`make_probes` (same arguments): ndarray (n, C, H, W) float32."""
    return make_probes(graph, n, kind, seed, iterations, lr, batch_size, input_shape, progress, tolerance,
                       objective, optimizer).x
