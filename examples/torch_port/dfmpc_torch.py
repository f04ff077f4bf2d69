"""DF-MPC for a PyTorch ``nn.Module``: a port of dfmpc written from PORTING.md, checked against its vectors.

Chen et al., "Data-Free Quantization via Mixed-Precision Compensation without Fine-Tuning", Pattern
Recognition 143 (2023) 109780. Usage::

    q, c = dfmpc_quantize(model.eval(), low_bits=2, high_bits=6, recalibration="sequential", probes=x)

``q`` is a quantized copy (weights dequantized, the fake-quant form; activations float32) and ``c`` maps
each pair's low conv to its compensation coefficients. Layouts are PyTorch's: OIHW weights, NCHW
activations. The math runs in float64 and the model stays float32, as in dfmpc.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

f64 = torch.float64


# ------------------------------------------------------------------ quantizers (PORTING.md step 2)

def ternary(W):
    """TWN, Eq. (3)-(4): W_hat in {-1, 0, 1}, alpha, Delta = 0.7 mean|W| (strict >)."""
    W = W.to(f64)
    absW = W.abs()
    delta = 0.7 * absW.mean()                                        # Eq. (3)
    keep = absW > delta
    W_hat = torch.where(keep, W.sign(), torch.zeros_like(W))         # Eq. (3)
    alpha = absW[keep].mean() if keep.any() else W.new_zeros(())     # Eq. (4)
    return W_hat, alpha, delta


def dorefa(W, k):
    """DoReFa kQ, Eq. (6): grid in [-1, 1] with 2^k levels, scale = max|W|; torch.round is half to even."""
    W = W.to(f64)
    scale = W.abs().max()
    if scale == 0:
        return torch.zeros_like(W), scale
    n = 2.0**k - 1.0
    return 2.0 / n * torch.round(n * (W / (2.0 * scale) + 0.5)) - 1.0, scale   # Eq. (6)


def quantize_weight(W, bits, low):
    """Dequantized weights (float64): TWN alpha W_hat for a pair's low conv at 2 bits, else DoReFa."""
    if low and bits == 2:
        W_hat, alpha, _ = ternary(W)
        return alpha * W_hat
    grid, scale = dorefa(W, bits)
    return scale * grid


# ------------------------------------------------------------------ BN and compensation (steps 4-5)

class BN(NamedTuple):
    """Inference BN in float64: BN(x) = gamma (x - mean) / sqrt(var + eps) + beta, arrays (C,)."""
    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float

    @property
    def sigma(self):
        return torch.sqrt(self.var + self.eps)


def bn_of(m: nn.BatchNorm2d) -> BN:
    return BN(*(t.detach().to(f64).clone() for t in (m.weight, m.bias, m.running_mean, m.running_var)), float(m.eps))


def absorb_scale(bn: BN, s) -> BN:
    """BN for grid weights W_q / s: mean / s, sigma / s (eps_hat = eps / max(s)^2)."""
    s = torch.as_tensor(s, dtype=f64)
    eps_hat = bn.eps / float(s.max()) ** 2
    var_hat = torch.clamp((bn.var + bn.eps) / s**2 - eps_hat, min=0.0)
    return BN(bn.gamma, bn.beta, bn.mean / s, var_hat.expand_as(bn.var).clone(), eps_hat)


def quadratic_coefficients(W, W_hat, bn: BN, bn_hat: BN, lambda1=0.5, lambda2=0.0):
    """Eq. (22) as den c^2 - 2 num c + const per output channel (Eq. (25)-(26))."""
    O = W.shape[0]
    X = (bn.gamma / bn.sigma)[:, None] * W.to(f64).reshape(O, -1)                 # X_j = gamma_j / sigma_j W_j
    X_hat = (bn_hat.gamma / bn_hat.sigma)[:, None] * W_hat.to(f64).reshape(O, -1)
    y = bn.beta - bn.gamma * bn.mean / bn.sigma
    y_hat = bn_hat.beta - bn_hat.gamma * bn_hat.mean / bn_hat.sigma
    num = (X_hat * X).sum(1) + lambda1 * y_hat * y                                 # Eq. (27) numerator
    den = (X_hat * X_hat).sum(1) + lambda1 * y_hat**2 + lambda2                   # Eq. (27) denominator
    return den, num, (X * X).sum(1) + lambda1 * y**2


def closed_form(den, num):
    """Eq. (27) on c >= 0: max(0, num / den); c = 1 where den == 0 (the loss does not depend on c)."""
    flat = den == 0
    return torch.clamp(torch.where(flat, torch.ones_like(num), num / torch.where(flat, torch.ones_like(den), den)), min=0.0)


def compensation_coefficients(W, W_hat, bn, bn_hat, lambda1=0.5, lambda2=0.0):
    den, num, _ = quadratic_coefficients(W, W_hat, bn, bn_hat, lambda1, lambda2)
    return closed_form(den, num)


def fold_into_bn(bn: BN, c) -> BN:
    """Sec. 4.3: gamma' = c gamma, beta' = c beta; equal to Eq. (7) on the next conv because c >= 0."""
    return bn._replace(gamma=c * bn.gamma, beta=c * bn.beta)


# ------------------------------------------------------------------ re-calibration (step 3)

def channel_moments(Z):
    """Per-channel mean and biased variance over (N, H, W), in float64."""
    Z = Z.to(f64)
    m = Z.mean(dim=(0, 2, 3))
    return m, ((Z - m[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))


def ratio_bn(bn: BN, m_q, v_q, m_fp, v_fp) -> BN:
    """Sequential (derivation 15): mean + (m_q - m_fp), sigma^2 v_q / v_fp (ratio 1 where v_fp is 0)."""
    tiny = torch.finfo(f64).tiny
    ratio = torch.where(v_fp > tiny, v_q / torch.clamp(v_fp, min=tiny), torch.ones_like(v_fp))
    return bn._replace(mean=bn.mean + (m_q - m_fp), var=torch.clamp((bn.var + bn.eps) * ratio - bn.eps, min=0.0))


def analytic_bn(bn: BN, W, W_q, in_mean, in_var) -> BN:
    """Analytic (derivation 10, R.3-R.4), groups = 1: the input moments (C,) of the conv are given."""
    W, W_q = W.to(f64), W_q.to(f64)
    shift = ((W_q - W).sum(dim=(2, 3)) * in_mean).sum(1)
    num, den = ((W_q**2).sum(dim=(2, 3)) * in_var).sum(1), ((W**2).sum(dim=(2, 3)) * in_var).sum(1)
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
    return bn._replace(mean=bn.mean + shift, var=torch.clamp((bn.var + bn.eps) * ratio - bn.eps, min=0.0))


# ------------------------------------------------------------------ the network walk (steps 1 and 6)

PASS_THROUGH = (nn.MaxPool2d, nn.AvgPool2d, nn.Identity, nn.Dropout)


def _module(gm, node, kinds):
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), kinds)


def _is_relu(gm, node):
    return _module(gm, node, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu))


def sites_and_pairs(model: nn.Module):
    """Sites: (conv, BN) module names where the BN is the conv's only reader, in execution order. Pairs:
    (low conv, BN, high conv) for every chain conv -> BN -> ReLU -> [pooling] -> conv of single readers whose
    low conv does not read the model input. Overlapping chains (plain conv stacks) are refused: dfmpc chooses
    among them by maximising the low-bit weights (dfmpc.find_pairs); pass that choice as ``pairs``."""
    gm = fx.symbolic_trace(model)
    sites, pairs = [], []
    for node in gm.graph.nodes:
        if not _module(gm, node, nn.Conv2d) or len(node.users) != 1:
            continue
        bn = next(iter(node.users))
        if not _module(gm, bn, nn.BatchNorm2d):
            continue
        sites.append((node.target, bn.target))
        act = next(iter(bn.users)) if len(bn.users) == 1 else None
        if act is None or not _is_relu(gm, act) or any(a.op == "placeholder" for a in node.all_input_nodes):
            continue
        nxt = act
        while len(nxt.users) == 1 and _module(gm, (nxt := next(iter(nxt.users))), PASS_THROUGH):
            pass
        if nxt is not act and _module(gm, nxt, nn.Conv2d) and len(nxt.all_input_nodes) == 1:
            pairs.append((node.target, bn.target, nxt.target))
    used = [name for low, _, high in pairs for name in (low, high)]
    if len(used) != len(set(used)):
        raise ValueError("pairs: conv -> BN -> ReLU -> conv chains overlap; pass pairs= (e.g. dfmpc.find_pairs' choice)")
    return sites, pairs


class _Stop(Exception):
    pass


def _conv_output(model, name, x):
    """Output of submodule ``name`` on input ``x``; the forward stops there."""
    seen = {}

    def hook(_, __, out):
        seen["z"] = out.detach()
        raise _Stop

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return seen["z"]


def _write_bn(m: nn.BatchNorm2d, bn: BN):
    with torch.no_grad():
        for t, v in ((m.weight, bn.gamma), (m.bias, bn.beta), (m.running_mean, bn.mean), (m.running_var, bn.var)):
            t.copy_(v.to(t.dtype))


def mirrored_views(x, views=4):
    """The probes, then their mirror images: left-right, upside down, both (derivation 15, S.6; the default)."""
    flips = [(), (3,), (2,), (2, 3)][:views]
    return torch.cat([torch.flip(x, dims) if dims else x for dims in flips])


def shifted_views(x, views=4):
    """The probes, then copies rolled by a quarter of the image along three diagonals (derivation 15, S.4)."""
    a, b = x.shape[2] // 4, x.shape[3] // 4
    shifts = [(0, 0), (a, b), (-a, -b), (a, -b)][:views]
    return torch.cat([torch.roll(x, s, dims=(2, 3)) for s in shifts])


def dfmpc_quantize(model: nn.Module, low_bits=2, high_bits=6, recalibration="sequential", probes=None,
                   lambda1=0.5, lambda2=0.0, pairs=None, views=4, view_kind="mirrors"):
    """DF-MPC on a model in eval mode (Algorithm 1). Returns (quantized copy, {low conv: c}).

    recalibration: "sequential" (needs ``probes``, float32 NCHW images made without data) or "absorb".
    ``pairs``: optional [(low conv, BN, high conv)] module names.
    ``views``: the sequential mode takes each BN's variance ratio over the probes and their first ``views - 1``
    mirror images (``view_kind="shifts"``: rolled copies), and its mean shift over the probes alone (derivation
    15, S.4-S.6; 1: the probes alone).
    """
    if recalibration not in ("sequential", "absorb"):
        raise ValueError(f"recalibration: expected 'sequential' or 'absorb', got {recalibration!r}")
    if recalibration == "sequential" and probes is None:
        raise ValueError("probes: the sequential re-calibration needs probe images")
    if view_kind not in ("mirrors", "shifts"):
        raise ValueError(f"view_kind: expected 'mirrors' or 'shifts', got {view_kind!r}")
    fp = copy.deepcopy(model).eval()
    sites, found = sites_and_pairs(fp)
    with torch.no_grad():                                  # step 0: BN(W x + b) with mean mu is BN(W x) with mu - b
        for conv, bn_name in sites:
            if fp.get_submodule(conv).bias is not None:
                fp.get_submodule(bn_name).running_mean -= fp.get_submodule(conv).bias
                fp.get_submodule(conv).bias = None
    pairs = found if pairs is None else pairs
    low = {p[0]: p for p in pairs}
    q = copy.deepcopy(fp)
    with torch.no_grad():                                                      # step 2: quantize every weight
        for name, m in q.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bits = low_bits if name in low else high_bits
                m.weight.copy_(quantize_weight(m.weight, bits, name in low).to(m.weight.dtype))
    c_of = {}
    if recalibration == "sequential":
        n, probes = len(probes), (mirrored_views if view_kind == "mirrors" else shifted_views)(probes, views)
    for conv, bn_name in sites:                                                # in execution order
        bn = bn_of(fp.get_submodule(bn_name))
        if recalibration == "sequential":                                      # step 3
            Z_fp, Z_q = _conv_output(fp, conv, probes), _conv_output(q, conv, probes)   # q as quantized so far
            (m_fp, _), (m_q, _) = channel_moments(Z_fp[:n]), channel_moments(Z_q[:n])  # S.5: means on the probes
            (_, v_fp), (_, v_q) = channel_moments(Z_fp), channel_moments(Z_q)          # variances on all views
            bn_hat = ratio_bn(bn, m_q, v_q, m_fp, v_fp)
        else:
            bn_hat = bn
        if conv in low:                                                        # steps 4-5
            c = compensation_coefficients(fp.get_submodule(conv).weight.detach(), q.get_submodule(conv).weight.detach(),
                                          bn, bn_hat, lambda1, lambda2)
            bn_hat, c_of[conv] = fold_into_bn(bn_hat, c), c
        _write_bn(q.get_submodule(bn_name), bn_hat)
    return q, c_of


__all__ = ["ternary", "dorefa", "quantize_weight", "BN", "bn_of", "absorb_scale", "quadratic_coefficients",
           "closed_form", "compensation_coefficients", "fold_into_bn", "channel_moments", "ratio_bn", "analytic_bn",
           "sites_and_pairs", "mirrored_views", "shifted_views", "dfmpc_quantize"]
