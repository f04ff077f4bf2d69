"""Which conv is low-bit and which compensates it: the mixed-precision policy (paper Fig. 2, Algorithm 1).

A **candidate pair** is a chain ``conv A -> BatchNormalization -> Relu -> [pooling] -> conv B`` in
which every tensor on the way has exactly one consumer: then scaling channel j of A's BN by
``c_j >= 0`` is the same as scaling input channel j of B (ReLU is positively homogeneous, and so
are MaxPool / AveragePool / Identity / Dropout per channel), which is what DF-MPC needs.
A is quantized at the low bit-width, B at the high one and carries the compensation.

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
* **ReLU6 (Clip) is refused**: ``ReLU6(c x) != c ReLU6(x)`` for ``c != 1``, so neither Lemma 2 nor
  folding holds; such chains are listed in :attr:`Pairing.rejected` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine.graph import Graph

__all__ = ["Pair", "Pairing", "candidate_pairs", "find_pairs"]

#: Ops between the ReLU and conv B that commute with a per-channel scale c_j >= 0.
PASS_THROUGH = ("MaxPool", "AveragePool", "Identity", "Dropout")


@dataclass(frozen=True)
class Pair:
    """One DF-MPC pair: ``low`` conv -> ``bn`` -> ``act`` -> ... -> ``high`` conv (node names)."""

    low: str
    bn: str
    act: str
    high: str


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
    """

    pairs: list[Pair]
    unpaired: list[str]
    rejected: list[tuple[str, str]] = field(default_factory=list)

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
            rows.append(f"  pair  {p.low:<28} {lb:<16} -> {p.high:<28} {hb} (carries c)")
        for name in self.unpaired:
            rows.append(f"  alone {name:<28} {hb}")
        for name, why in self.rejected:
            rows.append(f"  note  {name}: not paired: {why}")
        return f"{len(self.pairs)} pair(s), {len(self.unpaired)} unpaired layer(s)\n" + "\n".join(rows)


def _single_consumer(graph: Graph, tensor: str):
    if tensor in graph.outputs:
        return None
    cons = graph.consumers(tensor)
    return cons[0] if len(cons) == 1 else None


def candidate_pairs(graph: Graph):
    """All chains conv A -> BN -> ReLU -> [MaxPool/AveragePool/Identity/Dropout] -> conv B with single consumers.

    Returns
    -------
    candidates : list of Pair
    rejected : list of (str, str)
        Chains that match except for the activation (ReLU6 / other Clip), with the reason.
    """
    candidates, rejected = [], []
    for A in graph.nodes_of("Conv"):
        bn = _single_consumer(graph, A.outputs[0])
        if bn is None or bn.op != "BatchNormalization":
            continue
        act = _single_consumer(graph, bn.outputs[0])
        if act is None or act.op not in ("Relu", "Clip"):
            continue
        nxt = _single_consumer(graph, act.outputs[0])
        while nxt is not None and nxt.op in PASS_THROUGH:
            nxt = _single_consumer(graph, nxt.outputs[0])
        if nxt is None or nxt.op != "Conv":
            continue
        if act.op == "Clip":
            lo, hi = act.attrs.get("min"), act.attrs.get("max")
            rejected.append((A.name, f"activation {act.name!r} is Clip(min={lo}, max={hi}) (e.g. ReLU6), "
                                     "not positively homogeneous: c cannot pass through it"))
            continue
        candidates.append(Pair(A.name, bn.name, act.name, nxt.name))
    return candidates, rejected


def _weights(graph: Graph, name: str) -> int:
    return int(graph.node(name).params["W"].size)


def find_pairs(graph: Graph, pairs=None, keep_first_high: bool = True) -> Pairing:
    """Choose the DF-MPC pairs of a graph (or validate a user's choice).

    Parameters
    ----------
    graph : Graph
    pairs : list of (str, str), optional
        An explicit assignment ``[(low conv, high conv), ...]``; each must be a candidate chain
        and no conv may appear twice. Default: the automatic choice.
    keep_first_high : bool
        Never make a conv that reads the graph input low (automatic choice only).

    Returns
    -------
    Pairing

    Raises
    ------
    ValueError
        An explicit pair that is not a valid chain, or a conv used twice.
    """
    cands, rejected = candidate_pairs(graph)
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
    return Pairing(chosen, [n for n in weight_layers if n not in in_pair], rejected)


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
