"""Which conv is low-bit and which compensates it: the mixed-precision policy (paper Fig. 2, Algorithm 1).

A **candidate pair** is a chain ``conv A -> BatchNormalization -> act -> [pooling] -> conv B`` in
which every tensor on the way has exactly one consumer and ``act`` is a ReLU or a Clip (ReLU6).
A is quantized at the low bit-width, B at the high one and carries the compensation c. How c is
applied depends on the activation (:attr:`Pair.form`):

* ``"fold"`` (ReLU, or a Clip that is positively homogeneous such as ``Clip(0, inf)``): scaling
  channel j of A's BN by ``c_j >= 0`` is the same as scaling input channel j of B (ReLU is
  positively homogeneous, and so are MaxPool / AveragePool / Identity / Dropout per channel), so c
  is folded into BN^A and B stays on its grid (derivation 08, F.a);
* ``"eq7"`` (a Clip with a finite non-zero bound, e.g. ReLU6 = ``Clip(0, 6)``): ``ReLU6(c x) != c ReLU6(x)``,
  so c cannot go into the BN; it is applied as the paper's Eq. (7), ``W~^{l+1}_{:,j} = c_j kQ(W^{l+1}_{:,j})``
  on B's input channels, which is exact whatever the activation (derivation 17).

Candidates form disjoint paths (a conv has one input and, in a candidate, one consumer), so a
conv can be B of one candidate and A of the next. We choose non-overlapping pairs that
**maximise the number of weights held at the low bit-width**, exactly, by dynamic programming
along each path. The paper's patterns come out on their own:

* plain / VGG chains alternate (low, high), starting where the low layer is largest;
* ResNet basic block: conv1 low, conv2 high (conv2 feeds the residual add, so it cannot be A);
* bottleneck 1x1-3x3-1x1: the 3x3 (more weights) is low, the 1x1s high or unpaired.

Our choices where the paper is silent (documented in the README):

* The first conv (reading the graph input) is never low by default (``keep_first_high``), as is
  usual for the stem; convs in no pair (stem, shortcut convs, a conv feeding a residual add) and
  the fully connected layer stay at the high bit-width.
* **ReLU6 (Clip) pairs in the Eq. (7) form** (derivation 17): Lemma 2 holds through a clip only with an
  extra term, and folding does not hold at all, so c scales B's input channels instead of BN^A.
  :func:`candidate_pairs` still refuses Clip chains unless asked (``through_clip=True``), because
  callers that move a per-channel scale *into* the activation's input (DFQ's cross-layer
  equalisation) need positive homogeneity; those chains are listed in :attr:`Pairing.rejected`.
* **Every weight layer outside a pair gets a reason** (:attr:`Pairing.why_unpaired`): reads the graph
  input, no BN after it (VGG-19, SqueezeNet, a DenseNet transition conv feeding its pooling), an output
  read by several layers (an Inception branch point), a Concat after the activation (DenseNet's growth
  convs, Inception's branch ends), a per-channel Mul / Add between BN and ReLU, or a candidate the
  max-low-weight choice did not take.
* **BN followed by per-channel Mul and Add constants** (the Caffe2 "scale" layer of the light DenseNet-121
  and Inception-v2) is one per-channel affine map: :func:`merge_affine_into_bn` folds it into the BN
  (``gamma' = k gamma``, ``beta' = k beta + a``), after which those chains pair like any other. Without the
  merge, ``c`` folded into the BN alone would not scale the Add constant, so :func:`find_pairs` reports
  such chains instead of pairing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .engine.graph import Graph, Node

__all__ = ["Pair", "Pairing", "FORMS", "candidate_pairs", "find_pairs", "merge_affine_into_bn",
           "positively_homogeneous"]

#: Ops between the ReLU and conv B that commute with a per-channel scale c_j >= 0.
PASS_THROUGH = ("MaxPool", "AveragePool", "Identity", "Dropout")
#: How c is applied (:attr:`Pair.form`): folded into BN^A (derivation 08, F.a) or Eq. (7) on conv B (derivation 17).
FORMS = ("fold", "eq7")


@dataclass(frozen=True)
class Pair:
    """One DF-MPC pair: ``low`` conv -> ``bn`` -> ``act`` -> ... -> ``high`` conv (node names).

    ``form`` is how c is applied exactly: ``"fold"`` into BN^A (the activation is positively
    homogeneous: ReLU) or ``"eq7"`` on B's input channels (a clip such as ReLU6; derivation 17).
    """

    low: str
    bn: str
    act: str
    high: str
    form: str = "fold"


#: the activations a pair may go through: ReLU and LeakyRelu with |alpha| <= 1 (c folded, derivation 17, H.1
#: and L.1), Clip (c by Eq. (7) when it is not positively homogeneous, e.g. ReLU6)
ACTIVATIONS = ("Relu", "LeakyRelu", "Clip")


def positively_homogeneous(node: Node) -> bool:
    """Whether activation ``node`` satisfies ``f(c x) = c f(x)`` for every ``c >= 0`` (derivation 17, H.1).

    ReLU and LeakyRelu (any alpha: ``f(cx) = cx`` or ``alpha c x``, by the sign of x) are; ``Clip(lo, hi)``
    is exactly when each bound is 0 or infinite (missing), so ReLU6 = ``Clip(0, 6)`` is not.

    Examples
    --------
    >>> import numpy as np
    >>> relu6 = Node("r6", "Clip", ["x"], ["y"], {"min": 0.0, "max": 6.0})
    >>> positively_homogeneous(relu6), positively_homogeneous(Node("r", "Relu", ["x"], ["y"]))
    (False, True)
    >>> x = np.array([1.0, 4.0]); bool(np.array_equal(np.clip(2 * x, 0, 6), 2 * np.clip(x, 0, 6)))   # H.1 fails
    False
    """
    if node.op in ("Relu", "LeakyRelu"):
        return True
    if node.op != "Clip":
        return False
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    return all(b is None or b == 0 or np.isinf(b) for b in (lo, hi))


@dataclass
class Pairing:
    """The result of pairing a graph.

    Attributes
    ----------
    pairs : list of Pair
    unpaired : list of str
        Conv / Gemm nodes in no pair (quantized at the high bit-width).
    rejected : list of (str, str)
        ``(conv name, reason)`` for chains that look like pairs but cannot be one (e.g. ReLU6).
    why_unpaired : dict of str to str
        For every name in ``unpaired``: why it is in no pair (as the low layer; and, for a conv that
        could have been a high layer, which candidate was not taken).
    """

    pairs: list[Pair]
    unpaired: list[str]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    why_unpaired: dict[str, str] = field(default_factory=dict)

    @property
    def low(self) -> set[str]:
        return {p.low for p in self.pairs}

    @property
    def high(self) -> set[str]:
        return {p.high for p in self.pairs}

    def pair_of_low(self, name: str) -> Pair | None:
        for p in self.pairs:
            if p.low == name:
                return p
        return None

    def describe(self, low_bits: int | None = None, high_bits: int | None = None) -> str:
        """A human-readable table: every weight layer, its role and bit-width."""
        lb = "low" if low_bits is None else f"{low_bits}-bit" + (" (ternary)" if low_bits == 2 else "")
        hb = "high" if high_bits is None else f"{high_bits}-bit"
        rows = []
        for p in self.pairs:
            how = "carries c" if p.form == "fold" else "carries c on its input channels, Eq. (7)"
            rows.append(f"  pair  {p.low:<28} {lb:<16} -> {p.high:<28} {hb} ({how})")
        for name in self.unpaired:
            why = self.why_unpaired.get(name)
            rows.append(f"  alone {name:<28} {hb}" + (f"  ({why})" if why else ""))
        for name, why in self.rejected:
            rows.append(f"  note  {name}: not paired: {why}")
        return f"{len(self.pairs)} pair(s), {len(self.unpaired)} unpaired layer(s)\n" + "\n".join(rows)


def _single_consumer(graph: Graph, tensor: str):
    if tensor in graph.outputs:
        return None
    cons = graph.consumers(tensor)
    return cons[0] if len(cons) == 1 else None


def _readers(graph: Graph, tensor: str) -> str:
    cons = graph.consumers(tensor)
    return ", ".join(f"{n.op} {n.name!r}" for n in cons[:4]) + (", ..." if len(cons) > 4 else "")


def _per_channel_constant(node: Node, channels: int) -> bool:
    """A Mul / Add of one activation and a constant that is the same at every position of a channel."""
    k = node.params.get("constant")
    if node.op not in ("Mul", "Add") or k is None or len(node.inputs) != 1:
        return False
    shape = (1,) * (4 - k.ndim) + tuple(k.shape) if k.ndim <= 4 else None
    return shape is not None and shape[0] == 1 and shape[1] in (1, channels) and shape[2:] == (1, 1)


def _chain(graph: Graph, A: Node, through_clip: bool = False):
    """Follow conv A -> BN -> act -> [pass-through] -> conv B.

    Returns ``(pair, reason, refused)``: the candidate Pair (reason None), or None with the reason
    A cannot be the low layer of a pair; ``refused`` marks chains that match except for the activation
    (a Clip that is not positively homogeneous, when ``through_clip`` is False).
    """
    out = A.outputs[0]
    if out in graph.outputs:
        return None, "its output is a graph output", False
    cons = graph.consumers(out)
    if len(cons) != 1:
        return None, f"its output is read by {len(cons)} nodes ({_readers(graph, out)})", False
    bn = cons[0]
    if bn.op != "BatchNormalization":
        return None, (f"no BatchNormalization after it (read by {bn.op} {bn.name!r}): DF-MPC folds c into BN^l "
                      "and needs its statistics"), False
    nxt, affine = _single_consumer(graph, bn.outputs[0]), []
    while nxt is not None and _per_channel_constant(nxt, bn.params["gamma"].shape[0]):
        affine.append(nxt)
        nxt = _single_consumer(graph, nxt.outputs[0])
    if affine and nxt is not None and nxt.op in ACTIVATIONS:
        names = ", ".join(repr(n.name) for n in affine)
        return None, (f"per-channel {'/'.join(n.op for n in affine)} ({names}) between BN {bn.name!r} and the "
                      "activation: c folded into the BN would not scale them; merge them into the BN first "
                      "(dfmpc.pairing.merge_affine_into_bn)"), False
    act = nxt
    if act is None:
        last = affine[-1] if affine else bn
        return None, f"the BN output is read by {len(graph.consumers(last.outputs[0]))} nodes", False
    if act.op not in ACTIVATIONS:
        kind = " (a residual sum)" if act.op == "Add" and len(act.inputs) > 1 else ""
        return None, f"BN {bn.name!r} is followed by {act.op} {act.name!r}{kind}, not a ReLU", False
    if act.op == "LeakyRelu" and abs(float(act.attrs.get("alpha", 0.01))) > 1:
        return None, (f"activation {act.name!r} is LeakyRelu(alpha={act.attrs.get('alpha')}), not 1-Lipschitz "
                      "(|alpha| > 1): Lemma 2, which DF-MPC's bound rests on, does not hold (derivation 17, L.1)"), False
    t = act.outputs[0]
    nxt = _single_consumer(graph, t)
    while nxt is not None and nxt.op in PASS_THROUGH:
        t = nxt.outputs[0]
        nxt = _single_consumer(graph, t)
    if nxt is None:
        n = len(graph.consumers(t))
        where = "a graph output" if t in graph.outputs else f"read by {n} nodes ({_readers(graph, t)})"
        return None, (f"the activation's output is {where}: c would change every reader, and DF-MPC "
                      "compensates in one next conv"), False
    if nxt.op != "Conv":
        kind = {"Concat": (" (a concatenation: c would scale only a slice of the input channels of whatever "
                           "reads it, and DenseNet / Inception concatenations reach several later layers)"),
                "Gemm": " (a fully connected layer, not a conv)"}.get(nxt.op, "")
        return None, f"after the activation comes {nxt.op} {nxt.name!r}{kind}, not a conv", False
    if positively_homogeneous(act):
        return Pair(A.name, bn.name, act.name, nxt.name, "fold"), None, False
    if through_clip:
        return Pair(A.name, bn.name, act.name, nxt.name, "eq7"), None, False
    lo, hi = act.attrs.get("min"), act.attrs.get("max")
    return None, (f"activation {act.name!r} is Clip(min={lo}, max={hi}) (e.g. ReLU6), "
                  "not positively homogeneous: c cannot pass through it"), True


def candidate_pairs(graph: Graph, reasons: dict | None = None, through_clip: bool = False):
    """All chains conv A -> BN -> act -> [MaxPool/AveragePool/Identity/Dropout] -> conv B with single consumers.

    Parameters
    ----------
    graph : Graph
    reasons : dict, optional
        If given, filled with ``{conv name: why it is not the low conv of a candidate}``.
    through_clip : bool
        Also accept a Clip that is not positively homogeneous (ReLU6), as a Pair of form ``"eq7"``
        (c applied to conv B's input channels, Eq. (7); derivation 17). Default False: only chains
        through which a per-channel scale passes (ReLU), as DFQ's equalisation needs.

    Returns
    -------
    candidates : list of Pair
    rejected : list of (str, str)
        Chains that match except for the activation (ReLU6 / other Clip, when ``through_clip`` is
        False), with the reason.
    """
    candidates, rejected = [], []
    for A in graph.nodes_of("Conv"):
        pair, why, refused = _chain(graph, A, through_clip)
        if pair is not None:
            candidates.append(pair)
            continue
        if refused:
            rejected.append((A.name, why))
        if reasons is not None:
            reasons[A.name] = why
    return candidates, rejected


def _weights(graph: Graph, name: str) -> int:
    return int(graph.node(name).params["W"].size)


def find_pairs(graph: Graph, pairs=None, keep_first_high: bool = True, through_clip: bool = True) -> Pairing:
    """Choose the DF-MPC pairs of a graph (or validate a user's choice).

    Parameters
    ----------
    graph : Graph
    pairs : list of (str, str), optional
        An explicit assignment ``[(low conv, high conv), ...]``; each must be a candidate chain
        and no conv may appear twice. Default: the automatic choice.
    keep_first_high : bool
        Never make a conv that reads the graph input low (automatic choice only).
    through_clip : bool
        Pair through a Clip / ReLU6 in the Eq. (7) form (``Pair.form == "eq7"``, derivation 17);
        False refuses such chains and lists them in :attr:`Pairing.rejected`, as before.

    Returns
    -------
    Pairing

    Raises
    ------
    ValueError
        An explicit pair that is not a valid chain, or a conv used twice.
    """
    reasons = {}
    cands, rejected = candidate_pairs(graph, reasons, through_clip)
    weight_layers = [n.name for n in graph.nodes if n.op in ("Conv", "Gemm")]
    if pairs is not None:
        by_ends = {(p.low, p.high): p for p in cands}
        chosen, used = [], set()
        for item in pairs:
            try:
                low, high = item
            except (TypeError, ValueError):
                raise ValueError(f"pairs: expected (low conv, high conv) name pairs, got {item!r}") from None
            if (low, high) not in by_ends:
                why = dict(rejected).get(low)
                raise ValueError(f"pairs: ({low!r}, {high!r}) is not a conv -> BN -> ReLU -> conv chain with single "
                                 f"consumers" + (f" ({why})" if why else "")
                                 + f"; candidates: {sorted(by_ends)}")
            if low in used or high in used:
                raise ValueError(f"pairs: a conv appears in two pairs: ({low!r}, {high!r})")
            used.update((low, high))
            chosen.append(by_ends[(low, high)])
    else:
        first = {n.name for n in graph.nodes_of("Conv") if any(t in graph.inputs for t in n.inputs)}
        usable = [p for p in cands if not (keep_first_high and p.low in first)]
        chosen = _max_weight_pairs(usable, lambda p: _weights(graph, p.low))
    in_pair = {p.low for p in chosen} | {p.high for p in chosen}
    order = {name: i for i, name in enumerate(weight_layers)}
    chosen.sort(key=lambda p: order[p.low])
    unpaired = [n for n in weight_layers if n not in in_pair]
    return Pairing(chosen, unpaired, rejected, _explain(graph, unpaired, cands, chosen, reasons, pairs is not None,
                                                        keep_first_high))


def _explain(graph, unpaired, cands, chosen, reasons, explicit, keep_first_high):
    """Why each unpaired weight layer is in no pair (see :attr:`Pairing.why_unpaired`)."""
    taken = {p.low: p for p in chosen} | {p.high: p for p in chosen}
    why = {}
    for name in unpaired:
        node = graph.node(name)
        if node.op == "Gemm":
            why[name] = "fully connected (Gemm): DF-MPC pairs convs; stays at the high bit-width"
            continue
        as_low = [p for p in cands if p.low == name]
        as_high = [p for p in cands if p.high == name]
        if as_low:
            p = as_low[0]
            if explicit:
                text = f"candidate ({p.low} -> {p.high}) not in the given pairs"
            elif keep_first_high and any(t in graph.inputs for t in node.inputs):
                text = "reads the graph input (keep_first_high)"
            else:
                other = taken.get(p.high)
                text = (f"candidate ({p.low} -> {p.high}) not taken: {p.high} is already in pair "
                        f"({other.low} -> {other.high})" if other else
                        f"candidate ({p.low} -> {p.high}) not taken by the max-low-weight choice")
        else:
            text = f"cannot be low: {reasons.get(name, 'no conv -> BN -> ReLU -> conv chain')}"
        if as_high and not as_low:
            text += "; could be high of " + ", ".join(f"({p.low} -> {p.high})" for p in as_high) + ", not taken"
        why[name] = text
    return why


def merge_affine_into_bn(graph: Graph) -> Graph:
    """A copy of ``graph`` in which each BN's following per-channel Mul / Add by a constant is folded into it.

    ``BN -> Mul(k) -> Add(a)`` (each the single reader of the one before, constants equal at every
    position of a channel, shapes () / (C, 1, 1) / (1, C, 1, 1)) computes
    ``k (gamma (x - mu) / sigma + beta) + a``, which is a BN with ``gamma' = k gamma`` and
    ``beta' = k beta + a``. The merged BN writes the last merged node's output tensor, so the rest
    of the graph and its outputs are unchanged. The light DenseNet-121 and Inception-v2 have this
    shape after every BN.

    Parameters
    ----------
    graph : Graph

    Returns
    -------
    Graph
        A new graph (``graph`` is not modified); the same function up to float32 rounding.
    """
    g = graph.copy()
    drop = set()
    for bn in g.nodes_of("BatchNormalization"):
        C = bn.params["gamma"].shape[0]
        gamma, beta = bn.params["gamma"].astype(np.float64), bn.params["beta"].astype(np.float64)
        nxt, last = _single_consumer(g, bn.outputs[0]), bn
        while nxt is not None and _per_channel_constant(nxt, C) and nxt.name not in drop:
            k = np.broadcast_to(nxt.params["constant"].astype(np.float64).reshape(-1), (C,))
            if nxt.op == "Mul":
                gamma, beta = gamma * k, beta * k
            else:
                beta = beta + k
            drop.add(nxt.name)
            last = nxt
            nxt = _single_consumer(g, nxt.outputs[0])
        if last is not bn:
            bn.params["gamma"], bn.params["beta"] = gamma.astype(np.float32), beta.astype(np.float32)
            bn.outputs = [last.outputs[0]]
    if not drop:
        return g
    return Graph([n for n in g.nodes if n.name not in drop], g.inputs, g.outputs, g.input_shapes, g.name)


def _max_weight_pairs(cands, weight):
    """Non-overlapping candidates of maximum total weight; candidates form disjoint paths."""
    nxt = {p.low: p for p in cands}
    highs = {p.high for p in cands}
    chosen = []
    for start in [p for p in cands if p.low not in highs]:
        path = [start]
        while path[-1].high in nxt:
            path.append(nxt[path[-1].high])
        # best[i]: best total using edges path[i:], take[i]: whether edge i is taken in it
        best = [0] * (len(path) + 2)
        take = [False] * len(path)
        for i in range(len(path) - 1, -1, -1):
            with_i = weight(path[i]) + best[i + 2]
            take[i] = with_i > best[i + 1]
            best[i] = with_i if take[i] else best[i + 1]
        i = 0
        while i < len(path):
            if take[i]:
                chosen.append(path[i])
                i += 2
            else:
                i += 1
    return chosen
