"""Whole-network DF-MPC on an engine graph (paper Algorithm 1), with the baselines the paper's table uses.

``quantize_network(graph, low_bits=2, high_bits=6, ...)`` returns a **new** graph (the input is
never mutated) and a :class:`QuantizationReport`. The driver runs these stages, each a function here:

0. :func:`prepare`: copy the network, move conv biases into their BN's mean;
1. pair the layers (:func:`dfmpc.pairing.find_pairs`);
2. :func:`quantize_layers`: the low conv of each pair at ``low_bits`` (2 = TWN ternary, else
   DoReFa), every other Conv / Gemm at ``high_bits`` (DoReFa);
3. for each BN (:func:`recalibration_sites`, topological order: the paper's conv -> BN, and BNs after
   a Concat or Add, which only the measuring modes move) re-calibrate that BN with the named mode (``dfmpc.recalibration.RECALIBRATION_MODES``: ``sequential``,
   ``analytic``, ``absorb``, ``data``), which sees the network as quantized so far;
4. :func:`compensate`: for the low conv of a pair, c (Eq. (27), c = 1, or the data-aware oracle);
5. :func:`apply_c`: fold c into that BN where the activation is a ReLU (exact, because c >= 0 and
   ReLU is positively homogeneous; the high conv stays on its grid), or scale the high conv's input
   channels, Eq. (7), where it is a clip such as ReLU6 (exact whatever the activation; derivation 17);
   then :func:`write_bn`;
6. the :class:`QuantizationReport` (one :class:`PairReport` per pair).

Weights are stored dequantized (``scale * grid``, the fake-quant form): with ``absorb`` this is
exactly the integer-grid network with absorbed BN (tested), and it runs on any engine.
Activations stay float32 (the paper's setting: weights MP2/6, activations FP32).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ._checks import check_bits, check_graph_params, check_scalar
from .compensation import closed_form, fold_into_bn, quadratic_coefficients, scale_input_channels
from .engine.graph import Graph
from .pairing import Pair, Pairing, find_pairs, merge_affine_into_bn
from .quantizers import dorefa, ternary
from .probes import (DEFAULT_ITERATIONS, DEFAULT_KIND, DEFAULT_N, DEFAULT_OBJECTIVE, DEFAULT_OPTIMIZER,
                     DEFAULT_TOLERANCE, PROBE_KINDS, check_views, make_probes, make_views,
                     DEFAULT_VIEW_KIND, check_view_kind,
                     unmeasured_convs)
from .recalibration import RECALIBRATION_MODES, RECALIBRATIONS, RecalibrationContext, Site, bn_of
from .reconstruction import oracle_coefficients

__all__ = ["quantize_network", "quantize_weights", "QuantizationReport", "PairReport", "COMPENSATIONS",
           "prepare", "quantize_layers", "recalibration_sites", "compensate", "apply_c", "write_bn", "C_FORMS"]

COMPENSATIONS = ("dfmpc", "none", "oracle")
#: How c is applied (``c_form``): ``auto`` folds into BN^A through a ReLU and uses Eq. (7) on conv B through a
#: clip (ReLU6); ``eq7`` uses Eq. (7) for every pair (the same network through a ReLU, up to float32 rounding).
C_FORMS = ("auto", "eq7")
#: The defaults of quantize_network and ``dfmpc quantize`` (measured in benchmarks/accuracy.py):
#: sequential re-calibration (derivation 15) on distilled probes (derivation 16), the best data-free mode.
DEFAULT_RECALIBRATION = "sequential"
DEFAULT_PROBES = DEFAULT_KIND
#: probe images per kind when ``probe_images`` is not given: distillation is paid per image and works best
#: with few images optimised for long (derivation 16); noise costs only the two forward passes, so it
#: gets enough images for stable per-channel statistics.
DEFAULT_PROBE_IMAGES = {"distilled": DEFAULT_N, "noise": 256}
#: views per distilled probe image when ``probe_views`` is not given (:func:`dfmpc.probes.make_views`,
#: derivation 15, S.5-S.6): the image and its three mirror images (or three copies rolled by a quarter of the
#: image, ``probe_view_kind="shifts"``). The variance ratio S.2 is taken over all views and the mean shift S.1
#: over the images alone. On the zoo the mirror images bring all 9 models within both ``dfmpc diagnose``
#: targets (the images alone: 5) and every model's worst probe seed within 1.5 points of ``data`` (README,
#: "How much the probe seed matters"; derivation 15, "Mirrored views"). Noise probes are used as they
#: are (one view): a mirrored copy of white noise is more white noise.
DEFAULT_PROBE_VIEWS = 4


def default_views(probes) -> int:
    """The views per probe image used when ``probe_views`` is None: 1 for noise probes (``probes="noise"``),
    :data:`DEFAULT_PROBE_VIEWS` for distilled probes and for given images."""
    return 1 if isinstance(probes, str) and probes == "noise" else DEFAULT_PROBE_VIEWS


LOW_QUANTIZERS = ("auto", "twn", "dorefa")


def quantize_weights(W, bits, quantizer="auto"):
    """Dequantized weights ``s * grid`` on the named grid.

    ``"twn"``: TWN ternary (Eq. (3)-(4), s = alpha; 2 bits only); ``"dorefa"``: DoReFa kQ
    (Eq. (6), s = max|W|) at any bit-width; ``"auto"``: TWN at 2 bits, DoReFa otherwise (the
    paper's assignment).

    Parameters
    ----------
    W : array_like, shape (O, ...)
        One layer's weights (OIHW conv or (out, in) Gemm).
    bits : int in [2, 16]
    quantizer : {"auto", "twn", "dorefa"}

    Returns
    -------
    ndarray, same shape as W, float32

    Raises
    ------
    ValueError
        Unknown quantizer, ``"twn"`` at bits != 2, empty or non-finite W, bits out of range.
    """
    if quantizer not in LOW_QUANTIZERS:
        raise ValueError(f"quantizer: expected one of {LOW_QUANTIZERS}, got {quantizer!r}")
    if quantizer == "twn" and bits != 2:
        raise ValueError(f"quantizer: 'twn' is ternary (2 bits), got bits={bits}; use 'dorefa' for other widths")
    if quantizer == "twn" or (quantizer == "auto" and bits == 2):
        grid, s, _ = ternary(W)
    else:
        grid, s = dorefa(W, bits)
    return (s * grid).astype(np.float32)


@dataclass
class PairReport:
    """Per pair: the low and high layer, c and its statistics, and the data-free loss (22) summed over channels."""

    low: str
    high: str
    c_min: float
    c_mean: float
    c_max: float
    c_zero: int
    loss_before: float   # sum_j L_j(1): no compensation
    loss_after: float    # sum_j L_j(c)
    c: list[float] = field(default_factory=list)   # c_j per output channel of the low layer
    form: str = "fold"   # "fold": c folded into the low layer's BN; "eq7": c on the high conv's input channels, Eq. (7)


@dataclass
class QuantizationReport:
    """What :func:`quantize_network` did; ``seconds`` is the wall time of the whole pass."""

    low_bits: int
    high_bits: int
    lambda1: float
    lambda2: float
    recalibration: str
    compensation: str
    pairs: list[PairReport] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)
    why_unpaired: dict[str, str] = field(default_factory=dict)    # unpaired layer -> the reason (dfmpc.pairing)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    probes: str | None = None      # sequential re-calibration: the probe inputs used, e.g. "noise (256 images)"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        head = (f"MP{self.low_bits}/{self.high_bits}, compensation={self.compensation}, "
                f"recalibration={self.recalibration}{'' if self.probes is None else ' on ' + self.probes}, lambda1={self.lambda1}, lambda2={self.lambda2}: "
                f"{len(self.pairs)} pairs, {len(self.unpaired)} unpaired, {self.seconds:.2f} s")
        rows = [f"  {p.low} -> {p.high}: c in [{p.c_min:.3f}, {p.c_max:.3f}] mean {p.c_mean:.3f}"
                f" ({p.c_zero} zero), data-free loss {p.loss_before:.4g} -> {p.loss_after:.4g}"
                + ("" if p.form == "fold" else ", c applied by Eq. (7) on the high conv") for p in self.pairs]
        return "\n".join([head] + rows)


# ------------------------------------------------------------------------------------ stages

def prepare(graph: Graph) -> Graph:
    """Stage 0: a copy of ``graph`` in the form the later stages expect; the same function.

    Per-channel Mul / Add constants after a BN are merged into it
    (:func:`dfmpc.pairing.merge_affine_into_bn`; DenseNet-121 and Inception-v2 exports have them
    after every BN), and every conv bias before a BN moves into that BN's mean: BN(Wx + b) with mu
    equals BN(Wx) with mu - b (exact), so every quantized conv's BN sees the conv output alone.
    The input graph is never modified.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph: expected a dfmpc Graph, got {type(graph).__name__}")
    fp = merge_affine_into_bn(graph)            # BN -> Mul/Add by per-channel constants is one BN (exact)
    for conv in fp.nodes_of("Conv"):
        if "B" not in conv.params:
            continue
        cons = fp.consumers(conv.outputs[0])
        if len(cons) == 1 and cons[0].op == "BatchNormalization" and conv.outputs[0] not in fp.outputs:
            cons[0].params["mean"] = (cons[0].params["mean"] - conv.params.pop("B")).astype(np.float32)
    return fp


def quantize_layers(fp: Graph, pairing: Pairing, low_bits: int, high_bits: int, quantize) -> Graph:
    """Stage 2: a copy of ``fp`` with every Conv / Gemm weight replaced by its dequantized grid.

    The low conv of each pair gets ``low_bits``, every other Conv / Gemm ``high_bits``;
    ``quantize(W, bits, name)`` returns the dequantized weights (default :func:`quantize_weights`).

    Raises
    ------
    ValueError
        ``quantize`` returned an array of another shape.
    """
    g = fp.copy()
    for node in g.nodes:
        if node.op in ("Conv", "Gemm"):
            bits = low_bits if node.name in pairing.low else high_bits
            W_q = np.asarray(quantize(node.params["W"], bits, node.name), dtype=np.float32)
            if W_q.shape != node.params["W"].shape:
                raise ValueError(f"weight_quantizer: returned shape {W_q.shape} for {node.name!r}, "
                                 f"expected {node.params['W'].shape}")
            node.params["W"] = W_q
    return g


def recalibration_sites(fp: Graph, g: Graph) -> list[Site]:
    """Stage 3's worklist: every BatchNormalization whose input a node computes, in topological order.

    Two kinds of site (derivation 15, "Which BNs"):

    - a conv whose only reader is the BN (the paper's case): ``W``, ``W_q`` and ``group`` are set;
    - any other producer (a Concat in a DenseNet, an Add in a pre-activation ResNet, a conv read by
      more than the BN): ``W = W_q = None``. Its statistics drift with every quantized layer before
      it, so ``sequential`` and ``data`` re-measure them like a conv's; ``analytic`` has no formula
      for them and keeps the trained statistics, and ``absorb`` keeps them too.

    A BN reading the graph input directly is not a site (nothing before it is quantized).

    Returns
    -------
    list of Site
        Ordered by the producer's position, so a :class:`~dfmpc.engine.executor.NodeStream` can
        visit them in one pass. ``Site.conv`` is the producer's name.
    """
    producer = {t: (i, node) for i, node in enumerate(g.nodes) for t in node.outputs}
    sites = []
    for bn in g.nodes_of("BatchNormalization"):
        if bn.inputs[0] not in producer:
            continue
        i, node = producer[bn.inputs[0]]
        trained = bn_of(fp.node(bn.name))
        if node.op == "Conv" and len(g.consumers(node.outputs[0])) == 1:
            site = Site(node.name, bn.name, trained, fp.node(node.name).params["W"], node.params["W"],
                        node.attrs.get("group", 1))
        else:
            site = Site(node.name, bn.name, trained, None, None, None)
        sites.append((i, site))
    return [site for _, site in sorted(sites, key=lambda t: t[0])]


def compensate(site: Site, bn_hat, pair, compensation: str, lambda1: float, lambda2: float, oracle=None):
    """Stage 4: c for the low conv of a pair, and the pair's line of the report.

    Parameters
    ----------
    site : Site of the pair's low conv
    bn_hat : BatchNorm, its re-calibrated statistics (before c)
    pair : Pair
    compensation : {"dfmpc", "none", "oracle"}
        Eq. (27) (c >= 0), c = 1, or ``oracle()`` (a callable returning the data-aware c).

    Returns
    -------
    c : ndarray, shape (O,), float64
    PairReport
    """
    den, num, const = quadratic_coefficients(site.W, site.W_q, site.bn, bn_hat, lambda1, lambda2)   # Eq. (22) as (25)-(26)
    ones = np.ones(site.bn.channels)
    if compensation == "dfmpc":
        c = closed_form(den, num)                 # Eq. (27), c >= 0
    elif compensation == "none":
        c = ones
    else:
        c = oracle()
    L = lambda c: float(np.sum(den * c**2 - 2 * num * c + const))        # sum_j L_j(c_j), Eq. (22)
    return c, PairReport(pair.low, pair.high, float(c.min()), float(c.mean()), float(c.max()),
                         int(np.sum(c == 0)), L(ones), L(c), [float(v) for v in c])


def apply_c(g: Graph, pair: Pair, bn_hat, c, form: str):
    """Stage 5: apply c to the network being quantized, in the pair's form; returns BN^A to write.

    ``form="fold"``: ``gammahat_j <- c_j gammahat_j``, ``betahat_j <- c_j betahat_j`` (derivation 08, F.a;
    exact through a ReLU only), and conv B is left on its grid. ``form="eq7"``: conv B's weights in ``g``
    become ``W~_{:,j} = c_j kQ(W_{:,j})`` (paper Eq. (7), :func:`dfmpc.scale_input_channels`, grouped
    convs included; exact whatever the activation, derivation 17, E.1) and BN^A is returned unchanged.
    The new weight array *replaces* the old one (never written in place), so a re-calibration
    :class:`~dfmpc.recalibration.Site` made earlier keeps B's plain grid as ``W_q``, as it does with folding.

    Parameters
    ----------
    g : Graph, modified (conv ``pair.high``'s ``W`` for ``"eq7"``)
    pair : Pair
    bn_hat : BatchNorm, BN^A re-calibrated (before c)
    c : ndarray (C,), >= 0
    form : {"fold", "eq7"}

    Returns
    -------
    BatchNorm

    Raises
    ------
    ValueError
        ``form`` is neither; ``c`` of the wrong length or with ``c_j < 0``.

    Examples
    --------
    >>> import numpy as np, dfmpc
    >>> from dfmpc.engine import Graph, Node
    >>> from dfmpc.pairing import Pair
    >>> B = Node("B", "Conv", ["x"], ["y"], {"group": 1}, {"W": np.ones((1, 2, 1, 1), np.float32)})
    >>> g = Graph([B], ["x"], ["y"], {"x": (2, 1, 1)})
    >>> bn = dfmpc.BatchNorm(gamma=[1.0, 1.0], beta=[0.0, 0.0], mean=[0.0, 0.0], var=[1.0, 1.0])
    >>> bn_out = apply_c(g, Pair("A", "bn", "act", "B", "eq7"), bn, np.array([0.5, 2.0]), "eq7")
    >>> g.node("B").params["W"].ravel().tolist()          # Eq. (7): W~_{:,j} = c_j W_{:,j}
    [0.5, 2.0]
    >>> bool(np.array_equal(bn_out.gamma, bn.gamma))     # BN^A unchanged
    True
    """
    if form == "fold":
        return fold_into_bn(bn_hat, c)                                            # (F.a) = Eq. (7) on conv B
    if form != "eq7":
        raise ValueError(f"form: expected 'fold' or 'eq7', got {form!r}")
    B = g.node(pair.high)
    B.params["W"] = scale_input_channels(B.params["W"], c, B.attrs.get("group", 1)).astype(np.float32)   # Eq. (7)
    return bn_hat


def write_bn(g: Graph, name: str, bn) -> None:
    """Stage 5's last step: store a BatchNorm record into node ``name`` of ``g`` (float32)."""
    g.node(name).params.update({k: getattr(bn, k).astype(np.float32) for k in ("gamma", "beta", "mean", "var")})


def _check_calibration(x, why):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"calibration_data: expected a non-empty float32 array (N, C, H, W) of images "
                         f"(needed by {why}), got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    return x


def _probe_images(fp: Graph, probes, probe_images: int, seed: int, progress, iterations=DEFAULT_ITERATIONS,
                  tolerance=DEFAULT_TOLERANCE, objective=DEFAULT_OBJECTIVE, optimizer=DEFAULT_OPTIMIZER):
    """The sequential mode's inputs and their label for reports: ``probes`` is a kind of
    :func:`dfmpc.probes.make_probes` or an array of images."""
    if isinstance(probes, np.ndarray):
        if probes.dtype != np.float32 or probes.ndim != 4 or len(probes) == 0:
            raise ValueError(f"probes: expected a kind name or a non-empty float32 array (N, C, H, W), "
                             f"got {probes.dtype} {probes.shape}")
        return probes, f"given ({len(probes)} images)"
    if probes not in PROBE_KINDS:
        raise ValueError(f"probes: expected one of {PROBE_KINDS} or an image array, got {probes!r}")
    n = DEFAULT_PROBE_IMAGES[probes] if probe_images is None else probe_images
    key = (graph_fingerprint(fp), probes) + tuple(map(repr, (n, seed, iterations, tolerance, objective,
                                                              optimizer)))                     # hashable
    if key not in _PROBE_CACHE:
        made = make_probes(fp, n=n, kind=probes, seed=seed, progress=progress, iterations=iterations,
                           tolerance=tolerance, objective=objective, optimizer=optimizer)   # validates every argument
        if len(_PROBE_CACHE) >= _PROBE_CACHE_SIZE:
            _PROBE_CACHE.pop(next(iter(_PROBE_CACHE)))          # oldest first
        _PROBE_CACHE[key] = made
    made = _PROBE_CACHE[key]
    return made.x.copy(), probes_label(probes, made)


def probes_label(kind: str, made) -> str:
    """How probes were made, for reports: ``"noise (256 images)"``, ``"distilled (8 images, 800 steps,
    BN mismatch 0.080)"`` (``made``: a :class:`dfmpc.probes.DistillationResult`)."""
    if made.mismatch is None:
        return f"{kind} ({len(made.x)} images)"
    return f"{kind} ({len(made.x)} images, {made.iterations} steps, BN mismatch {made.mismatch:.3f})"


def views_label(views: int, kind: str = DEFAULT_VIEW_KIND) -> str:
    """What reports add to the probes' label for ``views`` views each (S.5) of ``kind`` ("mirrors" or
    "shifts"): ``", 4 mirrored views each for the variance"``, ``", 4 shifted views each for the variance"``,
    or nothing for one view."""
    word = "shifted" if check_view_kind(kind) == "shifts" else "mirrored"
    return "" if views == 1 else f", {views} {word} views each for the variance"


#: Probes are a pure function of (network, kind, n, seed, iterations, tolerance, objective, optimizer): the
#: last few are kept in memory, so quantizing the same network again (other bit-widths, compensation modes, methods of
#: dfmpc.compare) distils once.
_PROBE_CACHE: dict = {}
_PROBE_CACHE_SIZE = 4


def graph_fingerprint(graph: Graph) -> str:
    """SHA-256 of a graph's structure and parameters (node names, ops, attributes, tensors, parameter bytes)."""
    h = hashlib.sha256()
    h.update(repr((graph.inputs, graph.outputs, sorted(graph.input_shapes.items()))).encode())
    for node in graph.nodes:
        h.update(repr((node.name, node.op, node.inputs, node.outputs, sorted(node.attrs.items()))).encode())
        for k in sorted(node.params):
            v = np.ascontiguousarray(node.params[k])
            h.update(f"{k}{v.dtype}{v.shape}".encode())
            h.update(v.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ driver

@unmeasured_convs
def quantize_network(graph: Graph, low_bits: int = 2, high_bits: int = 6, *, lambda1: float = 0.5,
                     lambda2: float = 0.0, recalibration: str = DEFAULT_RECALIBRATION, compensation: str = "dfmpc",
                     pairs=None, calibration_data=None, keep_first_high: bool = True,
                     input_mean=0.0, input_var=1.0, oracle_images: int = 64, weight_quantizer=None,
                     probes=DEFAULT_PROBES, probe_images: int | None = None, seed: int = 0,
                     probe_iterations: int = DEFAULT_ITERATIONS, probe_tolerance: float | None = DEFAULT_TOLERANCE,
                     probe_objective: str = DEFAULT_OBJECTIVE, probe_optimizer: str = DEFAULT_OPTIMIZER,
                     probe_views: int | None = None, probe_view_kind: str = DEFAULT_VIEW_KIND,
                     progress=None, low_quantizer: str = "auto",
                     c_form: str = "auto"):
    """DF-MPC on a whole network: MP``low``/``high`` weights, c folded into the low layers' BN.

    Parameters
    ----------
    graph : Graph
        Full-precision network with BN kept as nodes. Never modified.
    low_bits, high_bits : int in [2, 16], low_bits <= high_bits
        Bit-widths of the pairs' low convs and of every other Conv / Gemm (DoReFa kQ; TWN at 2 bits).
    lambda1, lambda2 : float >= 0
        Weights of Eq. (22) (paper defaults 0.5, 0).
    low_quantizer : {"auto", "twn", "dorefa"}
        Grid of the low convs: ``"auto"`` is TWN ternary at ``low_bits = 2`` and DoReFa otherwise (the
        paper's); ``"dorefa"`` asks for a 2-bit DoReFa grid explicitly.
    recalibration : {"sequential", "analytic", "absorb", "data"}
        How muhat / sigmahat of every BN after a quantized conv are set (:mod:`dfmpc.recalibration`):
        ``sequential`` (default, data-free) from probe inputs carried through the network quantized
        so far (derivation 15); ``analytic`` (data-free) from moments propagated through the
        full-precision network (derivation 10); ``absorb`` the trained statistics; ``data`` re-measured
        on ``calibration_data`` (not data-free).
    compensation : {"dfmpc", "none", "oracle"}
        Closed-form c (Eq. (27)), c = 1 (the paper's "without compensation"), or the data-aware
        oracle c (non-negative least squares of Eq. (9) on ``calibration_data``; ReLU pairs only).
    c_form : {"auto", "eq7"}
        How c is applied (named per pair in ``report.pairs[i].form``): ``auto`` folds it into BN^A
        where the activation is a ReLU (conv B stays on its grid) and scales conv B's input channels,
        Eq. (7), where it is a clip such as ReLU6 (conv B carries a per-input-channel factor; derivation
        17); ``eq7`` uses Eq. (7) for every pair.
    pairs : list of (low, high) names, optional
        Explicit pairing; default :func:`dfmpc.pairing.find_pairs`.
    calibration_data : ndarray (N, C, H, W) float32, optional
        Real images for ``recalibration="data"`` or ``compensation="oracle"`` (never for DF-MPC).
    keep_first_high : bool
        Passed to :func:`find_pairs`.
    input_mean, input_var : float
        Moments of the network input assumed by ``analytic`` (0, 1 for standardised images).
    oracle_images : int
        How many of the calibration images the oracle c is fitted on.
    weight_quantizer : callable (W, bits, name) -> ndarray, optional
        Replaces :func:`quantize_weights` for every layer; must return dequantized weights of W's shape.
    probes : str or ndarray (N, C, H, W) float32
        ``sequential`` only: a kind of :func:`dfmpc.probes.probe_inputs` (made from the network
        alone, no data) or the probe images themselves.
    probe_images : int, optional
        How many probe images to make (default :data:`DEFAULT_PROBE_IMAGES` of the kind: 8 distilled,
        256 noise).
    seed : int
        The seed the probes are made from.
    probe_iterations : int >= 0
        Distillation budget in steps (default 200; one evaluation of the loss and its input gradient
        each), doubled while the probes miss ``probe_tolerance``, up to 4x the first budget
        (:func:`dfmpc.probes.distill_to_tolerance`).
    probe_tolerance : float > 0 or None
        RMS relative BN mismatch (D.5) the distilled probes should reach (default 0.1); None: exactly
        ``probe_iterations`` steps.
    probe_objective : {"relative", "absolute"}
        What the distillation minimises (:func:`dfmpc.probes.distill`): D.6, every channel in units of
        its BN's sigma (default), or ZeroQ's D.1 (derivation 16).
    probe_optimizer : {"adam", "lbfgs"}
        How the distillation moves the images (:func:`dfmpc.probes.distill`; default
        :data:`dfmpc.probes.DEFAULT_OPTIMIZER`).
    probe_views : int in [1, 4] or None
        ``sequential`` only: each probe image is used with its first ``probe_views - 1`` mirror images
        (:func:`dfmpc.probes.mirrored_views`, derivation 15, S.6), or circular shifts with
        ``probe_view_kind="shifts"``; the variance ratio (S.2) is taken over all
        of them, the mean shift (S.1) over the images alone (S.5). None (default, :func:`default_views`):
        :data:`DEFAULT_PROBE_VIEWS` (4) for distilled probes and given images, 1 (the images alone) for noise.
    probe_view_kind : {"mirrors", "shifts"}
        ``sequential`` only: how the views are made. ``mirrors`` (default): the image mirrored left-right,
        upside down and both (:func:`dfmpc.probes.mirrored_views`; derivation 15, S.6). ``shifts``: circular
        shifts by a quarter of the image (:func:`dfmpc.probes.shifted_views`, S.4).
    progress : bool or None
        Progress bar on stderr while probes are made (None: only on a terminal).

    Returns
    -------
    (Graph, QuantizationReport)

    Raises
    ------
    TypeError
        ``graph`` is not a Graph, ``weight_quantizer`` not callable (programming errors).
    ValueError
        Non-finite weights or negative BN variances (naming the node), bits out of range or
        ``low_bits > high_bits``, unknown mode or ``c_form``, negative lambdas, missing or malformed
        calibration data or probes, an invalid explicit pairing.
    """
    t0 = time.perf_counter()
    low_bits, high_bits = check_bits(low_bits, "low_bits", lo=2), check_bits(high_bits, "high_bits", lo=2)
    if low_bits > high_bits:
        raise ValueError(f"low_bits, high_bits: expected low_bits <= high_bits (the low conv of a pair is the "
                         f"lower-precision one), got {low_bits} and {high_bits}")
    lambda1 = check_scalar(lambda1, "lambda1", min_value=0.0)
    lambda2 = check_scalar(lambda2, "lambda2", min_value=0.0)
    if recalibration not in RECALIBRATION_MODES:
        raise ValueError(f"recalibration: expected one of {RECALIBRATIONS}, got {recalibration!r}")
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation: expected one of {COMPENSATIONS}, got {compensation!r}")
    if c_form not in C_FORMS:
        raise ValueError(f"c_form: expected one of {C_FORMS}, got {c_form!r}")
    probe_views = check_views(default_views(probes) if probe_views is None else probe_views, "probe_views")
    check_view_kind(probe_view_kind, "probe_view_kind")
    if recalibration == "data" or compensation == "oracle":
        calibration_data = _check_calibration(calibration_data, "recalibration='data' and compensation='oracle'")
    if weight_quantizer is not None and not callable(weight_quantizer):
        raise TypeError(f"weight_quantizer: expected a callable (W, bits, name) -> W_q, got {type(weight_quantizer).__name__}")
    if low_quantizer not in LOW_QUANTIZERS or (low_quantizer == "twn" and low_bits != 2):
        raise ValueError(f"low_quantizer: expected one of {LOW_QUANTIZERS} ('twn' at low_bits = 2 only), "
                         f"got {low_quantizer!r} at low_bits={low_bits}")

    fp = prepare(graph)                                                                  # 0
    check_graph_params(fp, what="graph")
    pairing: Pairing = find_pairs(fp, pairs=pairs, keep_first_high=keep_first_high)     # 1. pair
    quantize = weight_quantizer or (lambda W, bits, name: quantize_weights(
        W, bits, low_quantizer if name in pairing.low else "auto"))
    g = quantize_layers(fp, pairing, low_bits, high_bits, quantize)                      # 2. quantize
    sites = recalibration_sites(fp, g)
    # no BN to re-calibrate (e.g. BN folded into the convs on export): no probes to make either
    probe_x, probes_made = _probe_images(fp, probes, probe_images, seed, progress, probe_iterations,
                                         probe_tolerance, probe_objective, probe_optimizer) \
        if recalibration == "sequential" and sites else (None, None)
    n_images = None if probe_x is None else len(probe_x)
    if probe_x is not None and probe_views > 1:
        probe_x = make_views(probe_x, probe_views, probe_view_kind)                        # derivation 15, S.4 / S.6
        probes_made += views_label(probe_views, probe_view_kind)
    ctx = RecalibrationContext(fp, g, input_mean, input_var, calibration_data, probe_x, n_images)   # S.5
    oracle_acts = _oracle_inputs(fp, pairing, calibration_data[:oracle_images]) if compensation == "oracle" else {}
    report = QuantizationReport(low_bits, high_bits, lambda1, lambda2, recalibration, compensation,
                                unpaired=list(pairing.unpaired), why_unpaired=dict(pairing.why_unpaired),
                                rejected=list(pairing.rejected),
                                probes=probes_made)
    for site in sites:                                    # topological order: each site sees the ones before it
        bn_hat = RECALIBRATION_MODES[recalibration](ctx, site)                            # 3. re-calibrate
        pair = pairing.pair_of_low(site.conv)
        if pair is not None:
            oracle = lambda: _oracle(fp, pair, site.W_q, bn_hat, oracle_acts[fp.node(site.conv).inputs[0]],
                                     high_bits, quantize)
            c, line = compensate(site, bn_hat, pair, compensation, lambda1, lambda2, oracle)   # 4. compensate
            line.form = "eq7" if c_form == "eq7" else pair.form
            bn_hat = apply_c(g, pair, bn_hat, c, line.form)   # 5. fold (F.a) or Eq. (7) on conv B (derivation 17)
            report.pairs.append(line)                     # 6. report
        write_bn(g, site.bn_node, bn_hat)
    report.seconds = time.perf_counter() - t0
    return g, report


def _oracle_inputs(fp: Graph, pairing: Pairing, x) -> dict:
    """Full-precision activations entering each pair's low conv, on the oracle's images."""
    names = sorted({fp.node(p.low).inputs[0] for p in pairing.pairs})
    return fp.run_many(x, outputs=names) if names else {}


def _sym_pads(node):
    pads = tuple(node.attrs.get("pads", (0, 0, 0, 0)))
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or pads[:2] != pads[2:] \
            or tuple(node.attrs.get("dilations", (1, 1))) != (1, 1):
        raise ValueError(f"compensation='oracle': conv {node.name!r} uses asymmetric/auto padding or dilation, "
                         "which dfmpc.oracle_coefficients does not take")
    return tuple(node.attrs.get("strides", (1, 1))), pads[:2], node.attrs.get("group", 1)


def _oracle(fp, pair, W_q, bn_hat, A, high_bits, quantize):
    """Oracle c for one pair (Eq. (9) on real activations A of the full-precision network)."""
    lo, hi = fp.node(pair.low), fp.node(pair.high)
    if fp.node(pair.act).op != "Relu":
        raise ValueError(f"compensation='oracle': pair {pair.low} -> {pair.high} has activation "
                         f"{fp.node(pair.act).op} {pair.act!r}; the verification code (dfmpc.oracle_coefficients) models ReLU only")
    if fp.producer(hi.inputs[0]).name != pair.act:
        raise ValueError(f"compensation='oracle': pair {pair.low} -> {pair.high} has pooling between ReLU and conv B, "
                         "which the verification code does not model")
    (s1, p1, g1), (s2, p2, g2) = _sym_pads(lo), _sym_pads(hi)
    if g1 != 1 or g2 != 1:
        raise ValueError(f"compensation='oracle': grouped convs in pair {pair.low} -> {pair.high} are not supported")
    bn = bn_of(fp.node(pair.bn))
    W_next_hat = quantize(hi.params["W"], high_bits, hi.name)
    return oracle_coefficients(A, lo.params["W"], bn, hi.params["W"], W_q, bn_hat, W_next_hat,
                               stride=s1, padding=p1, stride_next=s2, padding_next=p2, batch_size=32)
