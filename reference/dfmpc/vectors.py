"""Reference vectors: the inputs and outputs of every DF-MPC step, for checking a port.

One :class:`Vector` per step (quantizers, the objective and its closed form, folding, the
re-calibration of one pair under each data-free mode, one pair forward, the zoo ResNet-20 before
and after DF-MPC). :func:`generate` makes them from fixed seeds; :func:`write` stores them as one
``.npz`` per step plus ``manifest.json``; :func:`load` reads them back and :func:`compare` checks
arrays against them with the manifest's tolerances. ``dfmpc vectors -o DIR`` is the command,
``reference/dfmpc/vectors/`` the shipped copy (``tests/test_vectors.py`` regenerates it and compares),
and ``PORTING.md`` says how a port uses them.

Comparison rule, per array: ``|actual - expected| <= atol + rtol |expected|`` element-wise, shapes equal.
Layouts: conv weights OIHW, activations NCHW, BN parameters (C,). Array-level steps compute in float64;
the zoo entries are float32 networks (the engine's dtype).

Only the zoo entries need the engine (numba); they import it when called.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from .compensation import (BatchNorm, absorb_scale, closed_form, compensation_coefficients, data_free_loss,
                           fold_into_bn, quadratic_coefficients, scale_input_channels)
from .quantizers import dorefa, ternary
from .reconstruction import conv2d, pair_forward

__all__ = ["Vector", "FORMAT_VERSION", "COMPARISON", "generate", "array_vectors", "zoo_vectors", "manifest_of",
           "write", "load", "compare", "shipped_dir"]

FORMAT_VERSION = 1
COMPARISON = "|actual - expected| <= atol + rtol * |expected|, element-wise; shapes must be equal"

#: float64 steps: a port computing in float64 differs only by summation order (~1e-15 relative)
F64 = {"rtol": 1e-9, "atol": 1e-12}
#: grids and masks are integers in disguise: equal or wrong
EXACT = {"rtol": 0.0, "atol": 0.0}


@dataclass
class Vector:
    """One step: its ``inputs`` and ``outputs`` (name -> ndarray) and how to compare them.

    ``tolerance`` applies to every output not named in ``overrides`` (name -> tolerance).
    ``params`` holds the step's scalar settings (bit-widths, lambdas, conv geometry).
    """

    name: str
    function: str
    equation: str
    description: str
    seed: int | None
    dtype: str
    inputs: dict
    outputs: dict
    tolerance: dict
    overrides: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    def tolerance_of(self, key: str) -> dict:
        return self.overrides.get(key, self.tolerance)


def _bn(rng, C, negative_gamma=True) -> BatchNorm:
    gamma = rng.uniform(0.5, 1.5, C)
    if negative_gamma:
        gamma[1] = -gamma[1]                 # a negative gamma: c still scales the channel (c >= 0)
    return BatchNorm(gamma=gamma, beta=rng.normal(0.0, 0.5, C), mean=rng.normal(0.0, 0.5, C),
                     var=rng.uniform(0.2, 2.0, C), eps=1e-5)


def _bn_arrays(bn: BatchNorm, prefix: str) -> dict:
    return {f"{prefix}gamma": bn.gamma, f"{prefix}beta": bn.beta, f"{prefix}mean": bn.mean,
            f"{prefix}var": bn.var, f"{prefix}eps": np.float64(bn.eps)}


def _f(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float64)


# ------------------------------------------------------------------------------------ quantizers

def twn_vector(seed: int = 0) -> Vector:
    """TWN ternary (Eq. (3)-(4)): a random layer, a layer with an all-zero filter, a Gemm,
    an all-zero layer, and a layer with entries exactly on the threshold (kept out: ``|W| > Delta``)."""
    rng = np.random.default_rng(seed)
    W_zero_filter = rng.normal(size=(8, 4, 3, 3))
    W_zero_filter[3] = 0.0
    cases = {
        "random": rng.normal(size=(8, 4, 3, 3)),
        "zero_filter": W_zero_filter,
        "gemm": rng.normal(size=(10, 16)),
        "zero_layer": np.zeros((2, 2, 3, 3)),
        # mean|W| = 10, Delta = 0.7 * 10 = 7.0 exactly: |W| == Delta is dropped (a port using >= keeps it)
        "tie": np.array([7.0, 13.0, -7.0, -13.0, 7.0, 13.0]).reshape(3, 2, 1, 1),
    }
    inputs, outputs = {}, {}
    for case, W in cases.items():
        W_hat, alpha, delta = ternary(W)
        inputs[f"{case}/W"] = W
        outputs.update({f"{case}/W_hat": W_hat, f"{case}/alpha": _f(alpha), f"{case}/delta": _f(delta),
                        f"{case}/on_threshold": (np.abs(W) == delta).astype(np.float64)})
    assert outputs["tie/on_threshold"].sum() == 3 and outputs["tie/W_hat"][0, 0, 0, 0] == 0.0
    over = {k: EXACT for k in outputs if k.endswith(("/W_hat", "/on_threshold"))}
    return Vector("twn", "dfmpc.ternary", "Eq. (3)-(4)",
                  "TWN: W_hat = sign(W) [|W| > Delta], Delta = 0.7 mean|W| (strict >), alpha = mean|W| over kept "
                  "entries (0 for an all-zero layer). Per case: W -> W_hat, alpha, delta; on_threshold marks |W| == Delta.",
                  seed, "float64", inputs, outputs, F64, over)


def _dorefa_ties(k: int, s: float) -> np.ndarray:
    """Weights whose DoReFa argument ``n (W / 2s + 1/2)`` is exactly an odd multiple of 1/2 in float64."""
    n = 2.0**k - 1.0
    W = s * (2.0 * (np.arange(n) + 0.5) / n - 1.0)
    t = n * (W / (2.0 * s) + 0.5)
    return W[t - np.floor(t) == 0.5]


def dorefa_vector(seed: int = 1, bits=(2, 3, 6)) -> Vector:
    """DoReFa kQ (Eq. (6)) at several k: a random layer with an all-zero filter (every 0 is a rounding tie:
    ``n/2`` rounds half to even, to the level ``+1/n``, not 0), a Gemm, an all-zero layer (scale 0) and
    constructed ties."""
    rng = np.random.default_rng(seed)
    W_rand = rng.normal(size=(8, 4, 3, 3))
    W_rand[2] = 0.0
    inputs = {"random/W": W_rand, "gemm/W": rng.normal(size=(10, 16)), "zero_layer/W": np.zeros((2, 2, 1, 1))}
    outputs = {}
    for k in bits:
        ties = _dorefa_ties(k, 1.0)
        W_tie = np.concatenate([[1.0, -1.0], ties, [0.0]]).reshape(1, -1)
        inputs[f"tie_k{k}/W"] = W_tie
        for case in ("random", "gemm", "zero_layer", f"tie_k{k}"):
            W = inputs[f"{case}/W"]
            grid, scale = dorefa(W, k)
            n = 2.0**k - 1.0
            t = n * (W / (2.0 * scale) + 0.5) if scale > 0 else np.zeros_like(W)
            tag = case if case.startswith("tie") else f"{case}_k{k}"
            outputs.update({f"{tag}/W_grid": grid, f"{tag}/scale": _f(scale),
                            f"{tag}/is_tie": (t - np.floor(t) == 0.5).astype(np.float64)})
    over = {k: EXACT for k in outputs if k.endswith(("/W_grid", "/is_tie"))}
    return Vector("dorefa", "dfmpc.dorefa", "Eq. (6)",
                  "DoReFa: W_grid = 2/n round(n (W / (2 max|W|) + 1/2)) - 1, n = 2^k - 1, round half to even "
                  "(np.round, torch.round); scale = max|W| (0 and W_grid = 0 for an all-zero layer). Case '<c>_k<k>' "
                  "quantizes input '<c>/W' at k bits; is_tie marks entries whose argument is exactly x.5.",
                  seed, "float64", inputs, outputs, F64, over, {"bits": list(bits)})


# ------------------------------------------------------------------------------------ compensation

def absorb_scale_vector(seed: int = 2) -> Vector:
    """``absorb_scale``: BN for the grid weights, scalar and per-channel s; BN_hat(X / s) == BN(X)."""
    rng = np.random.default_rng(seed)
    bn = _bn(rng, 8)
    s_scalar, s_channel = _f(0.37), rng.uniform(0.2, 1.5, 8)
    X = rng.normal(size=(2, 8, 4, 4))
    inputs = {**_bn_arrays(bn, "bn/"), "s_scalar": s_scalar, "s_channel": s_channel, "X": X}
    outputs = {}
    for tag, s in (("scalar", s_scalar), ("channel", s_channel)):
        bn_hat = absorb_scale(bn, s)
        outputs.update({f"{tag}/mean_hat": bn_hat.mean, f"{tag}/var_hat": bn_hat.var,
                        f"{tag}/eps_hat": _f(bn_hat.eps),
                        f"{tag}/BN_hat_of_X_over_s": bn_hat(X / (s if s.ndim == 0 else s[None, :, None, None]))})
    outputs["BN_of_X"] = bn(X)
    return Vector("absorb_scale", "dfmpc.absorb_scale", "Sec. 3 (scale absorbed into BN; derivation 01, Q.1)",
                  "muhat = mu / s, sigmahat = sigma / s (gamma, beta unchanged); eps_hat = eps / max(s)^2, "
                  "var_hat = (var + eps) / s^2 - eps_hat. BN_hat(X / s) equals BN(X) (X is NCHW, s per channel "
                  "broadcast over axis 1).", seed, "float64", inputs, outputs, F64)


def _objective_case(rng, O=8, I=4):
    W = rng.normal(size=(O, I, 3, 3))
    W_hat, alpha, _ = ternary(W)
    bn = _bn(rng, O)
    return W, W_hat, alpha, bn, absorb_scale(bn, alpha)


def objective_vector(seed: int = 3) -> Vector:
    """The data-free objective (Eq. (20)-(22)) and its quadratic coefficients (Eq. (25)-(26))."""
    rng = np.random.default_rng(seed)
    W, W_hat, alpha, bn, bn_hat = _objective_case(rng)
    c = rng.uniform(0.0, 2.0, W.shape[0])
    inputs = {"W": W, "W_hat": W_hat, "c": c, **_bn_arrays(bn, "bn/"), **_bn_arrays(bn_hat, "bn_hat/")}
    outputs = {"L": data_free_loss(c, W, W_hat, bn, bn_hat, 0.5, 0.0),
               "L_ridge": data_free_loss(c, W, W_hat, bn, bn_hat, 0.5, 0.1)}
    outputs.update(zip(("den", "num", "const"), quadratic_coefficients(W, W_hat, bn, bn_hat, 0.5, 0.0)))
    return Vector("objective", "dfmpc.data_free_loss, dfmpc.quadratic_coefficients", "Eq. (20)-(22), (25)-(26)",
                  "L_j = ||c_j Xhat_j - X_j||^2 + lambda1 (c_j yhat_j - y_j)^2 + lambda2 c_j^2 with X_j = gamma_j/sigma_j "
                  "W_j (filter j flattened), y_j = beta_j - gamma_j mu_j / sigma_j; W_hat is the ternary grid and bn_hat "
                  "its absorbed BN. L at (lambda1, lambda2) = (0.5, 0), L_ridge at (0.5, 0.1); den, num, const at (0.5, 0).",
                  seed, "float64", inputs, outputs, F64, params={"lambda1": 0.5, "lambda2": 0.0, "lambda2_ridge": 0.1})


def closed_form_vector(seed: int = 4) -> Vector:
    """Eq. (27) with the c >= 0 projection and zero denominators (c = 1)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(6, 4, 3, 3))
    W_hat, alpha, _ = ternary(W)
    W_hat[3] = 0.0                          # an all-zero quantized filter: den_3 = lambda1 yhat_3^2 + lambda2
    W_hat[4] = -W_hat[4]                    # anti-correlated filter: num_4 < 0, c_4 clipped to 0
    bn = _bn(rng, 6)
    zero = np.arange(6) == 3
    bn = bn.replace(beta=np.where(zero, 0.0, bn.beta), mean=np.where(zero, 0.0, bn.mean))   # y_3 = yhat_3 = 0 exactly
    bn_hat = absorb_scale(bn, alpha)
    den_direct, num_direct = _f([2.0, 1.0, 0.0, 0.0, 3.0]), _f([1.0, -3.0, 5.0, 0.0, -1e-300])
    inputs = {"W": W, "W_hat": W_hat, "alpha": _f(alpha), **_bn_arrays(bn, "bn/"), **_bn_arrays(bn_hat, "bn_hat/"),
              "den_direct": den_direct, "num_direct": num_direct}
    den, num, _ = quadratic_coefficients(W, W_hat, bn, bn_hat, 0.5, 0.0)
    den0, num0, _ = quadratic_coefficients(W, W_hat, bn, bn_hat, 0.0, 0.0)
    outputs = {"den": den, "num": num, "c": compensation_coefficients(W, W_hat, bn, bn_hat, 0.5, 0.0),
               "den_lambda1_0": den0, "num_lambda1_0": num0,
               "c_lambda1_0": compensation_coefficients(W, W_hat, bn, bn_hat, 0.0, 0.0),
               "c_fakequant": compensation_coefficients(W, alpha * W_hat, bn, bn, 0.5, 0.0),
               "c_direct": closed_form(den_direct, num_direct)}
    assert outputs["c"][4] == 0.0 and outputs["c_lambda1_0"][3] == 1.0 and den0[3] == 0.0
    return Vector("closed_form", "dfmpc.compensation_coefficients, dfmpc.closed_form", "Eq. (26)-(27)",
                  "c_j = max(0, num_j / den_j), c_j = 1 where den_j == 0 (L_j flat). W_hat is the ternary grid of W "
                  "with filter 3 set to zero and filter 4 negated; bn has beta_3 = mean_3 = 0 (y_3 = yhat_3 = 0 exactly), so den_3 = 0 at lambda1 = 0 "
                  "(c_3 = 1) and num_4 < 0 (c_4 = 0). c, den, num: lambda1 = 0.5, lambda2 = 0 with bn_hat = "
                  "absorb_scale(bn, alpha); *_lambda1_0: lambda1 = 0. c_fakequant: the same c from the dequantized "
                  "weights alpha W_hat with the trained bn (the pipeline's form). c_direct = closed_form(den_direct, "
                  "num_direct).",
                  seed, "float64", inputs, outputs, F64, params={"lambda1": 0.5, "lambda2": 0.0})


def folding_vector(seed: int = 5) -> Vector:
    """Folding c into BN^l (Sec. 4.3) equals Eq. (7), scaling input channels of layer l+1, after ReLU."""
    rng = np.random.default_rng(seed)
    bn = _bn(rng, 6)
    c = _f([0.0, 1.0, 0.37, 1.8, 2.5, 0.9])
    W_next_grid, s_next = dorefa(rng.normal(size=(5, 6, 3, 3)), 6)
    W_next = s_next * W_next_grid
    X = rng.normal(size=(2, 6, 5, 5))             # output of conv l (NCHW), before BN^l
    bn_f = fold_into_bn(bn, c)
    W_next_c = scale_input_channels(W_next, c)
    outputs = {"gamma_folded": bn_f.gamma, "beta_folded": bn_f.beta, "W_next_scaled": W_next_c,
               "Y_folded": conv2d(np.maximum(bn_f(X), 0.0), W_next, padding=1),
               "Y_eq7": conv2d(np.maximum(bn(X), 0.0), W_next_c, padding=1)}
    assert np.allclose(outputs["Y_folded"], outputs["Y_eq7"], rtol=1e-12, atol=1e-12)
    return Vector("folding", "dfmpc.fold_into_bn, dfmpc.scale_input_channels", "Eq. (7), Sec. 4.3",
                  "gamma' = c gamma, beta' = c beta (mean, var unchanged); W_next_scaled[:, j] = c_j W_next[:, j]. "
                  "Y_folded = conv(ReLU(BN'(X)), W_next) equals Y_eq7 = conv(ReLU(BN(X)), W_next_scaled) "
                  "(3x3, stride 1, padding 1) because c >= 0.",
                  seed, "float64", {**_bn_arrays(bn, "bn/"), "c": c, "W_next": W_next, "X": X}, outputs, F64,
                  params={"stride": 1, "padding": 1})


# ------------------------------------------------------------------------------------ re-calibration

def _pair_case(seed):
    rng = np.random.default_rng(seed)
    A = np.maximum(rng.normal(0.3, 1.0, size=(8, 4, 8, 8)), 0.0)      # post-ReLU input of conv l (NCHW)
    W = rng.normal(0.0, 0.3, size=(8, 4, 3, 3))
    W_hat, alpha, _ = ternary(W)
    bn = _bn(rng, 8)
    W_next = rng.normal(0.0, 0.2, size=(6, 8, 3, 3))
    return rng, A, W, alpha * W_hat, bn, W_next


def recalibration_vector(mode: str, seed: int = 6) -> Vector:
    """One pair's low conv re-calibrated under a data-free mode (:func:`dfmpc.recalibrate_bn`), then c (Eq. (27))
    and the folded BN."""
    from . import recalibration as R
    from .pair_recalibration import recalibrate_bn
    rng, A, W, W_q, bn, _ = _pair_case(seed)
    inputs = {"W": W, "W_q": W_q, **_bn_arrays(bn, "bn/")}
    outputs, params = {}, {"stride": 1, "padding": 1, "groups": 1, "lambda1": 0.5, "lambda2": 0.0}
    if mode == "absorb":
        bn_hat = recalibrate_bn(bn, W, W_q, "absorb")
        text = "absorb: in the fake-quant form (W_q = s W_grid dequantized) the re-calibrated BN is the trained one."
    elif mode == "analytic":
        in_mean, in_var = A.mean(axis=(0, 2, 3)), A.var(axis=(0, 2, 3))
        inputs.update(in_mean=in_mean, in_var=in_var)
        bn_hat = recalibrate_bn(bn, W, W_q, "analytic", in_mean=in_mean, in_var=in_var)
        text = ("analytic (derivation 10, R.3-R.4): muhat = mu + sum_i (sum_uv (W_q - W)[o, i]) in_mean_i, "
                "varhat = (var + eps) * sum_i ||W_q[o,i]||^2 in_var_i / sum_i ||W[o,i]||^2 in_var_i - eps.")
    elif mode == "sequential":
        X_fp = A
        X_q = np.maximum(A + rng.normal(0.0, 0.1, size=A.shape), 0.0)   # the input as the quantized-so-far net sees it
        m_fp, v_fp = R.channel_moments(conv2d(X_fp, W, padding=1))
        m_q, v_q = R.channel_moments(conv2d(X_q, W_q, padding=1))
        inputs.update(X_fp=X_fp, X_q=X_q)
        outputs.update(m_fp=m_fp, v_fp=v_fp, m_q=m_q, v_q=v_q)
        bn_hat = recalibrate_bn(bn, W, W_q, "sequential", X_fp=X_fp, X_q=X_q, padding=1)
        text = ("sequential (derivation 15, S.1-S.2): Z_fp = conv(X_fp, W), Z_q = conv(X_q, W_q) (3x3, stride 1, "
                "padding 1); m, v = per-channel mean and biased variance over (N, H, W) (intermediate outputs); "
                "muhat = mu + m_q - m_fp, varhat = (var + eps) v_q / v_fp - eps.")
    else:
        raise ValueError(f"mode: expected absorb, analytic or sequential, got {mode!r}")
    c = compensation_coefficients(W, W_q, bn, bn_hat, 0.5, 0.0)
    bn_f = fold_into_bn(bn_hat, c)
    outputs.update({"bn_hat/mean": bn_hat.mean, "bn_hat/var": bn_hat.var, "c": c,
                    "folded/gamma": bn_f.gamma, "folded/beta": bn_f.beta})
    return Vector(f"recalibration_{mode}",
                  f"dfmpc.recalibrate_bn(mode='{mode}'); dfmpc.compensation_coefficients; dfmpc.fold_into_bn",
                  "derivation 10/15 (re-calibration), Eq. (27), Sec. 4.3",
                  text + " Then c = Eq. (27) on (W, W_q, bn, bn_hat) and c folded into bn_hat.",
                  seed, "float64", inputs, outputs, F64, params=params)


def pair_forward_vector(seed: int = 6) -> Vector:
    """One conv -> BN -> ReLU -> conv pair: full precision, quantized (c = 1) and compensated."""
    rng, A, W, W_q, bn, W_next = _pair_case(seed)
    grid, s = dorefa(W_next, 6)
    W_next_q = s * grid
    c = compensation_coefficients(W, W_q, bn, bn, 0.5, 0.0)
    outputs = {"X_l": conv2d(A, W, padding=1), "W_next_q": W_next_q, "c": c,
               "Y": pair_forward(A, W, bn, W_next, padding=1, padding_next=1),
               "Y_q": pair_forward(A, W_q, bn, W_next_q, padding=1, padding_next=1),
               "Y_q_compensated": pair_forward(A, W_q, fold_into_bn(bn, c), W_next_q, padding=1, padding_next=1)}
    return Vector("pair_forward", "dfmpc.pair_forward", "Eq. (7), (9)",
                  "Y = conv(ReLU(BN(conv(A, W))), W_next); Y_q with W_q = TWN alpha W_hat and W_next_q = DoReFa-6 "
                  "max|W_next| kQ(W_next) (c = 1, absorb); Y_q_compensated with c (Eq. (27), absorb) folded into BN. "
                  "Both convs 3x3, stride 1, padding 1; A and Y are NCHW.",
                  seed, "float64", {"A": A, "W": W, "W_q": W_q, **_bn_arrays(bn, "bn/"), "W_next": W_next}, outputs, F64,
                  params={"stride": 1, "padding": 1, "stride_next": 1, "padding_next": 1, "high_bits": 6})


def array_vectors() -> list[Vector]:
    """Every array-level step (NumPy only, well under a second)."""
    return [twn_vector(), dorefa_vector(), absorb_scale_vector(), objective_vector(), closed_form_vector(),
            folding_vector(), *(recalibration_vector(m) for m in ("absorb", "analytic", "sequential")),
            pair_forward_vector()]


# ------------------------------------------------------------------------------------ the zoo ResNet-20

#: the zoo settings: MP2/6, lambda1 0.5, lambda2 0; sequential on 16 standard-normal probes (seed 0), shipped in the file
ZOO_MODEL, ZOO_IMAGES, ZOO_PROBES, ZOO_SEED = "resnet20", 16, 16, 0
#: float32 networks: another float32 conv (summation order) moves logits by ~1e-6 relative; see PORTING.md
ZOO_TOL = {"rtol": 1e-3, "atol": 1e-3}


def module_name(node: str) -> str:
    """PyTorch module name of an ONNX node name: ``/layers/layers.3/shortcut/shortcut.0/Conv`` -> ``layers.3.shortcut.0``."""
    names: list[str] = []
    for part in node.strip("/").split("/")[:-1]:
        if names and part.startswith(names[-1] + "."):
            names[-1] = part
        else:
            names.append(part)
    return ".".join(names)


def zoo_vectors(modes=("absorb", "analytic", "sequential")) -> list[Vector]:
    """The zoo ResNet-20 before DF-MPC and after it under each data-free mode (c per pair, BN, logits)."""
    from .evaluation import load_dataset, load_zoo_model
    from .pipeline import quantize_network, recalibration_sites

    g = load_zoo_model(ZOO_MODEL)
    x, y = load_dataset("fashion-mnist")
    x, y = np.ascontiguousarray(x[:ZOO_IMAGES]), y[:ZOO_IMAGES]
    probes = np.random.default_rng(ZOO_SEED).standard_normal((ZOO_PROBES,) + x.shape[1:], dtype=np.float32)
    out = [Vector("resnet20_fp32", "dfmpc.Graph.run", "-",
                  "The zoo ResNet-20 (reference/dfmpc/zoo/resnet20.npz) in float32 on the first 16 images of the "
                  "shipped Fashion-MNIST test set, normalised ((x/255 - 0.286) / 0.353), NCHW.",
                  None, "float32", {"images": x, "labels": y.astype(np.int64)}, {"logits": g.run(x)}, ZOO_TOL)]
    for mode in modes:
        q, rep = quantize_network(g, 2, 6, lambda1=0.5, lambda2=0.0, recalibration=mode, probes=probes,
                                  seed=ZOO_SEED, progress=False)
        sites = recalibration_sites(g, q)
        bn = [q.node(s.bn_node).params for s in sites]
        inputs = {"images": x}
        if mode == "sequential":
            inputs["probes"] = probes
        outputs = {"pairs": np.array([module_name(p.low) for p in rep.pairs]),
                   "pair_channels": np.array([len(p.c) for p in rep.pairs], dtype=np.int64),
                   "c": np.concatenate([np.asarray(p.c, dtype=np.float64) for p in rep.pairs]),
                   "sites": np.array([module_name(s.conv) for s in sites]),
                   "site_channels": np.array([len(b["gamma"]) for b in bn], dtype=np.int64),
                   **{f"bn_{k}": np.concatenate([b[k] for b in bn]) for k in ("gamma", "beta", "mean", "var")},
                   "logits": q.run(x)}
        out.append(Vector(f"resnet20_{mode}", f"dfmpc.quantize_network(recalibration='{mode}')",
                          "Algorithm 1 (Eq. (3), (6), (27), Sec. 4.3)",
                          f"ResNet-20 after DF-MPC MP2/6 (TWN on each pair's low conv, DoReFa-6 on every other conv and "
                          f"the fc), recalibration={mode}, lambda1 = 0.5, lambda2 = 0"
                          + (f", probes = the {ZOO_PROBES} standard-normal images stored here (numpy default_rng({ZOO_SEED})), "
                             "each with its three mirror images (left-right, upside down, both) for the variance ratio (S.5-S.6: "
                             "the mean shift over the probes alone, the variance ratio over all 64 images)"
                             if mode == "sequential" else "")
                          + ". pairs: low conv module names, c concatenated in that order (pair_channels each); sites: "
                          "every conv followed by BN in topological order, bn_* its final float32 BN (re-calibrated, "
                          "c folded) concatenated (site_channels each); logits of the 16 images.",
                          ZOO_SEED if mode == "sequential" else None, "float32", inputs, outputs, ZOO_TOL,
                          {"pairs": EXACT, "pair_channels": EXACT, "sites": EXACT, "site_channels": EXACT},
                          {"low_bits": 2, "high_bits": 6, "lambda1": 0.5, "lambda2": 0.0, "recalibration": mode}))
    return out


def generate(zoo: bool = True) -> list[Vector]:
    """All vectors, from fixed seeds: :func:`array_vectors` and, with ``zoo``, :func:`zoo_vectors`.

    Parameters
    ----------
    zoo : bool
        Include the ResNet-20 entries (a few seconds; they load the engine, numba).

    Returns
    -------
    list of Vector
        In manifest order. Equal calls give bit-identical arrays on one machine; across machines the zoo
        entries move within their float32 tolerance.
    """
    return array_vectors() + (zoo_vectors() if zoo else [])


# ------------------------------------------------------------------------------------ files

def _spec(arrays: dict) -> dict:
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in arrays.items()}


def manifest_of(vectors: list[Vector]) -> dict:
    """The ``manifest.json`` content for ``vectors`` (deterministic: sorted keys when written)."""
    from . import __version__
    entries = []
    for v in vectors:
        entries.append({"name": v.name, "file": f"{v.name}.npz", "function": v.function, "equation": v.equation,
                        "description": v.description, "seed": v.seed, "dtype": v.dtype, "params": v.params,
                        "inputs": _spec(v.inputs), "outputs": _spec(v.outputs),
                        "tolerance": v.tolerance, "tolerance_overrides": v.overrides})
    return {"format_version": FORMAT_VERSION, "dfmpc_version": __version__, "comparison": COMPARISON,
            "layouts": "conv weights OIHW (out, in, kh, kw); Gemm weights (out, in); activations NCHW; BN arrays (C,)",
            "entries": entries}


def write(directory, vectors: list[Vector], overwrite: bool = False) -> dict:
    """Write ``<name>.npz`` per vector and ``manifest.json`` into ``directory`` (created if missing).

    Each file is written atomically. Returns the manifest.

    Raises
    ------
    FileExistsError
        A file to be written exists and ``overwrite`` is False (checked before anything is written).
    FileNotFoundError
        The parent of ``directory`` does not exist.
    """
    from .interop._atomic import write_atomically
    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"-o/--output: the parent directory of {directory!r} does not exist")
    manifest = manifest_of(vectors)
    names = [e["file"] for e in manifest["entries"]] + ["manifest.json"]
    existing = [n for n in names if os.path.exists(os.path.join(directory, n))]
    if existing and not overwrite:
        raise FileExistsError(f"-o/--output: {directory!r} already holds {existing[0]!r}; pass --overwrite to replace")
    os.makedirs(directory, exist_ok=True)
    for v in vectors:
        arrays = {**{f"input/{k}": a for k, a in v.inputs.items()}, **{f"output/{k}": a for k, a in v.outputs.items()}}
        write_atomically(os.path.join(directory, f"{v.name}.npz"), lambda f: np.savez_compressed(f, **arrays),
                         overwrite=overwrite)
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    write_atomically(os.path.join(directory, "manifest.json"), lambda f: f.write(text.encode()), overwrite=overwrite)
    return manifest


def load(directory=None) -> tuple[dict, dict]:
    """Read the vectors written by :func:`write` (default: the shipped copy, :func:`shipped_dir`).

    Parameters
    ----------
    directory : str or PathLike, optional
        A directory holding ``manifest.json`` and the ``.npz`` files it names.

    Returns
    -------
    manifest : dict
        The parsed ``manifest.json`` (``entries``: one dict per step).
    data : dict
        ``{entry name: {"inputs": {array name: ndarray}, "outputs": {array name: ndarray}}}``.

    Raises
    ------
    OSError
        A missing or unreadable file.

    Examples
    --------
    The shipped TWN vector obeys Eq. (3): ``W_hat = sign(W) [|W| > 0.7 mean|W|]``.

    >>> manifest, data = load()
    >>> W, W_hat = data["twn"]["inputs"]["random/W"], data["twn"]["outputs"]["random/W_hat"]
    >>> bool(np.array_equal(W_hat, np.sign(W) * (np.abs(W) > 0.7 * np.abs(W).mean())))
    True
    """
    directory = shipped_dir() if directory is None else os.fspath(directory)
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    data = {}
    for e in manifest["entries"]:
        with np.load(os.path.join(directory, e["file"]), allow_pickle=False) as z:
            data[e["name"]] = {"inputs": {k[6:]: z[k] for k in z.files if k.startswith("input/")},
                               "outputs": {k[7:]: z[k] for k in z.files if k.startswith("output/")}}
    return manifest, data


def shipped_dir() -> str:
    """The directory of the shipped copy (``dfmpc/vectors/`` in the installed package)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors")


def compare(entry: dict, expected: dict, actual: dict) -> list[str]:
    """Mismatches of ``actual`` against ``expected`` under a manifest ``entry``'s tolerances.

    Every expected array must be present in ``actual`` with the same shape; numbers must satisfy
    :data:`COMPARISON` (``|actual - expected| <= atol + rtol |expected|``, the entry's ``tolerance`` or its
    ``tolerance_overrides`` for that array); string arrays (names) must be equal.

    Parameters
    ----------
    entry : dict
        One item of ``manifest["entries"]``.
    expected, actual : dict of str to array_like
        Arrays by name (``actual`` may hold more).

    Returns
    -------
    list of str
        One line per mismatching array (empty: ``actual`` agrees).

    Examples
    --------
    Eq. (27) clipped at 0: a port that forgets the clipping is reported.

    >>> manifest, data = load()
    >>> entry = next(e for e in manifest["entries"] if e["name"] == "closed_form")
    >>> den, num = data["closed_form"]["outputs"]["den"], data["closed_form"]["outputs"]["num"]
    >>> c_expected = {"c": data["closed_form"]["outputs"]["c"]}
    >>> compare(entry, c_expected, {"c": np.maximum(np.where(den == 0, 1.0, num / np.where(den == 0, 1, den)), 0)})
    []
    >>> len(compare(entry, c_expected, {"c": np.where(den == 0, 1.0, num / np.where(den == 0, 1, den))}))
    1
    """
    problems = []
    for key, exp in expected.items():
        if key not in actual:
            problems.append(f"{entry['name']}/{key}: missing")
            continue
        got, exp = np.asarray(actual[key]), np.asarray(exp)
        if got.shape != exp.shape:
            problems.append(f"{entry['name']}/{key}: shape {got.shape}, expected {exp.shape}")
            continue
        if exp.dtype.kind in "US":
            if not np.array_equal(got, exp):
                problems.append(f"{entry['name']}/{key}: names differ")
            continue
        tol = entry["tolerance_overrides"].get(key, entry["tolerance"])
        got64, exp64 = got.astype(np.float64), exp.astype(np.float64)
        err = np.abs(got64 - exp64)
        bad = ~(err <= tol["atol"] + tol["rtol"] * np.abs(exp64))
        if bad.any():
            i = np.unravel_index(int(np.argmax(np.where(bad, err, -1.0))), exp.shape) if exp.ndim else ()
            problems.append(f"{entry['name']}/{key}: {int(bad.sum())} of {exp.size} entries outside "
                            f"rtol={tol['rtol']}, atol={tol['atol']} (worst at {tuple(int(j) for j in i)}: "
                            f"{got64[i]!r} vs {exp64[i]!r})")
    return problems
