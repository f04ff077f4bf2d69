"""The worked PyTorch port (examples/torch_port/) against the reference vectors and against dfmpc itself.

Runs only with torch==2.13.0 (the project's one torch). Each test feeds the port the inputs stored in
reference/dfmpc/vectors/ and checks every output of the entry with the manifest's tolerances
(PORTING.md); the zoo tests also run dfmpc and the port side by side on the ResNet-20 zoo model.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.__version__.startswith("2.13.0"):
    pytest.skip(f"the port is checked with torch==2.13.0 only, found {torch.__version__}", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from dfmpc import vectors as V  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "torch_port"))
import dfmpc_torch as P  # noqa: E402
from zoo_model import resnet20_from_zoo  # noqa: E402

f64 = torch.float64


@pytest.fixture(scope="module")
def vec():
    manifest, data = V.load()
    return {e["name"]: (e, data[e["name"]]) for e in manifest["entries"]}


def t(a):
    return torch.from_numpy(np.array(a))


def bn_in(i, prefix="bn/"):
    return P.BN(t(i[prefix + "gamma"]), t(i[prefix + "beta"]), t(i[prefix + "mean"]), t(i[prefix + "var"]),
                float(i[prefix + "eps"]))


def check(vec, name, actual, partial=False):
    """The port's outputs for entry ``name`` against the vectors; every output must be given unless ``partial``."""
    entry, d = vec[name]
    expected = d["outputs"]
    actual = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in actual.items()}
    if not partial:
        assert set(actual) == set(expected), sorted(set(expected) ^ set(actual))
    return V.compare(entry, {k: expected[k] for k in actual}, actual)


def run_twn(i):
    out = {}
    for key, W in i.items():
        case = key.split("/")[0]
        W_hat, alpha, delta = P.ternary(t(W))
        out.update({f"{case}/W_hat": W_hat, f"{case}/alpha": alpha, f"{case}/delta": delta,
                    f"{case}/on_threshold": (t(W).abs() == delta).to(f64)})
    return out


def run_dorefa(i, bits, dorefa=P.dorefa):
    out = {}
    for k in bits:
        for case in ("random", "gemm", "zero_layer", f"tie_k{k}"):
            W = t(i[f"{case}/W"])
            grid, scale = dorefa(W, k)
            n = 2.0**k - 1.0
            arg = n * (W / (2.0 * scale) + 0.5) if scale > 0 else torch.zeros_like(W)
            tag = case if case.startswith("tie") else f"{case}_k{k}"
            out.update({f"{tag}/W_grid": grid, f"{tag}/scale": scale, f"{tag}/is_tie": (arg - arg.floor() == 0.5).to(f64)})
    return out


def test_port_quantizers_match_vectors(vec):
    """TWN Eq. (3)-(4) and DoReFa Eq. (6), ties and all-zero filters included: grids equal, scales within 1e-9."""
    assert check(vec, "twn", run_twn(vec["twn"][1]["inputs"])) == []
    e, d = vec["dorefa"]
    assert check(vec, "dorefa", run_dorefa(d["inputs"], e["params"]["bits"])) == []


def test_negative_control_rounding_half_away_fails_the_dorefa_vectors(vec):
    """Negative control: a DoReFa port rounding half away from zero (Eq. (6) ties) is caught."""
    def dorefa_half_away(W, k):
        scale = W.abs().max()
        if scale == 0:
            return torch.zeros_like(W), scale
        n = 2.0**k - 1.0
        a = n * (W / (2.0 * scale) + 0.5)
        return 2.0 / n * torch.sign(a) * torch.floor(a.abs() + 0.5) - 1.0, scale
    e, d = vec["dorefa"]
    problems = check(vec, "dorefa", run_dorefa(d["inputs"], e["params"]["bits"], dorefa_half_away))
    assert problems and all("/W_grid" in p for p in problems), problems


def test_port_compensation_matches_vectors(vec):
    """absorb_scale, Eq. (22) via (25)-(26), Eq. (27) with c >= 0 and den = 0, folding vs Eq. (7)."""
    i = vec["absorb_scale"][1]["inputs"]
    bn, X = bn_in(i), t(i["X"])
    def bn_apply(b, x):
        sh = (1, -1, 1, 1)
        return b.gamma.view(sh) * (x - b.mean.view(sh)) / b.sigma.view(sh) + b.beta.view(sh)
    out = {"BN_of_X": bn_apply(bn, X)}
    for tag, s in (("scalar", t(i["s_scalar"])), ("channel", t(i["s_channel"]))):
        b = P.absorb_scale(bn, s)
        out.update({f"{tag}/mean_hat": b.mean, f"{tag}/var_hat": b.var, f"{tag}/eps_hat": torch.tensor(b.eps, dtype=f64),
                    f"{tag}/BN_hat_of_X_over_s": bn_apply(b, X / (s if s.ndim == 0 else s.view(1, -1, 1, 1)))})
    assert check(vec, "absorb_scale", out) == []

    i = vec["objective"][1]["inputs"]
    args = (t(i["W"]), t(i["W_hat"]), bn_in(i), bn_in(i, "bn_hat/"))
    c = t(i["c"])
    den, num, const = P.quadratic_coefficients(*args, 0.5, 0.0)
    den_r, num_r, const_r = P.quadratic_coefficients(*args, 0.5, 0.1)
    assert check(vec, "objective", {"den": den, "num": num, "const": const, "L": den * c**2 - 2 * num * c + const,
                                    "L_ridge": den_r * c**2 - 2 * num_r * c + const_r}) == []

    i = vec["closed_form"][1]["inputs"]
    W, W_hat, bn, bn_hat = t(i["W"]), t(i["W_hat"]), bn_in(i), bn_in(i, "bn_hat/")
    den, num, _ = P.quadratic_coefficients(W, W_hat, bn, bn_hat, 0.5, 0.0)
    den0, num0, _ = P.quadratic_coefficients(W, W_hat, bn, bn_hat, 0.0, 0.0)
    assert check(vec, "closed_form", {
        "den": den, "num": num, "c": P.closed_form(den, num), "den_lambda1_0": den0, "num_lambda1_0": num0,
        "c_lambda1_0": P.closed_form(den0, num0),
        "c_fakequant": P.compensation_coefficients(W, t(i["alpha"]) * W_hat, bn, bn),
        "c_direct": P.closed_form(t(i["den_direct"]), t(i["num_direct"]))}) == []

    i = vec["folding"][1]["inputs"]
    bn, c, W_next, X = bn_in(i), t(i["c"]), t(i["W_next"]), t(i["X"])
    bn_f = P.fold_into_bn(bn, c)
    W_next_c = W_next * c.view(1, -1, 1, 1)                                  # Eq. (7)
    assert check(vec, "folding", {"gamma_folded": bn_f.gamma, "beta_folded": bn_f.beta, "W_next_scaled": W_next_c,
                                  "Y_folded": F.conv2d(F.relu(bn_apply(bn_f, X)), W_next, padding=1),
                                  "Y_eq7": F.conv2d(F.relu(bn_apply(bn, X)), W_next_c, padding=1)}) == []


def run_recalibration(mode, i, moments=P.channel_moments):
    W, W_q, bn = t(i["W"]), t(i["W_q"]), bn_in(i)
    out = {}
    if mode == "absorb":
        bn_hat = bn
    elif mode == "analytic":
        bn_hat = P.analytic_bn(bn, W, W_q, t(i["in_mean"]), t(i["in_var"]))
    else:
        m_fp, v_fp = moments(F.conv2d(t(i["X_fp"]), W, padding=1))
        m_q, v_q = moments(F.conv2d(t(i["X_q"]), W_q, padding=1))
        out.update(m_fp=m_fp, v_fp=v_fp, m_q=m_q, v_q=v_q)
        bn_hat = P.ratio_bn(bn, m_q, v_q, m_fp, v_fp)
    c = P.compensation_coefficients(W, W_q, bn, bn_hat)
    folded = P.fold_into_bn(bn_hat, c)
    out.update({"bn_hat/mean": bn_hat.mean, "bn_hat/var": bn_hat.var, "c": c,
                "folded/gamma": folded.gamma, "folded/beta": folded.beta})
    return out


@pytest.mark.parametrize("mode", ["absorb", "analytic", "sequential"])
def test_port_recalibration_of_one_pair_matches_vectors(vec, mode):
    """One pair re-calibrated under each data-free mode (derivation 10 R.3-R.4, derivation 15 S.1-S.2), then
    Eq. (27) and the fold."""
    name = f"recalibration_{mode}"
    assert check(vec, name, run_recalibration(mode, vec[name][1]["inputs"])) == []


def test_negative_control_unbiased_variance_fails_the_sequential_vector(vec):
    """Negative control: a port taking torch.var's default (unbiased) variance in S.2 is caught."""
    def unbiased(Z):
        return Z.mean(dim=(0, 2, 3)), Z.transpose(0, 1).reshape(Z.shape[1], -1).var(dim=1)
    problems = check(vec, "recalibration_sequential",
                     run_recalibration("sequential", vec["recalibration_sequential"][1]["inputs"], unbiased))
    # N/(N-1) cancels in the ratio v_q / v_fp, so only the moments themselves reveal it
    assert sorted(p.split(":")[0] for p in problems) == ["recalibration_sequential/v_fp", "recalibration_sequential/v_q"]


def test_port_pair_forward_matches_vectors(vec):
    """conv -> BN -> ReLU -> conv forward, full precision, quantized and compensated (Eq. (7), (9))."""
    i = vec["pair_forward"][1]["inputs"]
    A, W, W_q, bn, W_next = t(i["A"]), t(i["W"]), t(i["W_q"]), bn_in(i), t(i["W_next"])
    grid, s = P.dorefa(W_next, 6)
    W_next_q = s * grid

    def fwd(W, b, Wn):
        Z = F.conv2d(A, W, padding=1)
        sh = (1, -1, 1, 1)
        return F.conv2d(F.relu(b.gamma.view(sh) * (Z - b.mean.view(sh)) / b.sigma.view(sh) + b.beta.view(sh)), Wn, padding=1)
    c = P.compensation_coefficients(W, W_q, bn, bn)
    assert check(vec, "pair_forward", {"X_l": F.conv2d(A, W, padding=1), "W_next_q": W_next_q, "c": c,
                                       "Y": fwd(W, bn, W_next), "Y_q": fwd(W_q, bn, W_next_q),
                                       "Y_q_compensated": fwd(W_q, P.fold_into_bn(bn, c), W_next_q)}) == []


def zoo_outputs(q, c_of, sites, x):
    bns = [q.get_submodule(b) for _, b in sites]
    with torch.no_grad():
        logits = q(x)
    out = {"pairs": np.array(list(c_of)), "pair_channels": np.array([len(c) for c in c_of.values()]),
           "c": torch.cat(list(c_of.values())), "logits": logits,
           "sites": np.array([s for s, _ in sites]), "site_channels": np.array([b.num_features for b in bns])}
    out.update({f"bn_{k}": torch.cat([getattr(b, a).detach() for b in bns])
                for k, a in (("gamma", "weight"), ("beta", "bias"), ("mean", "running_mean"), ("var", "running_var"))})
    return out


def _in_vector_order(out, d):
    """The port lists sites in its execution order; the vectors in dfmpc's topological order (same set)."""
    order = {s: j for j, s in enumerate(out["sites"])}
    ch = out["site_channels"]
    starts = np.concatenate([[0], np.cumsum(ch)])
    idx = [order[s] for s in d["outputs"]["sites"]]
    res = dict(out, sites=out["sites"][idx], site_channels=ch[idx])
    for k in ("bn_gamma", "bn_beta", "bn_mean", "bn_var"):
        v = np.asarray(out[k])
        res[k] = np.concatenate([v[starts[j]:starts[j + 1]] for j in idx])
    return res


@pytest.fixture(scope="module")
def resnet20():
    torch.set_num_threads(1)
    return resnet20_from_zoo()


def test_port_zoo_resnet20_fp32_and_absorb_match_vectors(vec, resnet20):
    """The zoo ResNet-20 rebuilt in torch gives the vectors' FP32 logits, and the port's DF-MPC with absorb
    re-calibration gives the vectors' c per pair (Eq. (27)), final BN and logits."""
    e, d = vec["resnet20_fp32"]
    with torch.no_grad():
        assert check(vec, "resnet20_fp32", {"logits": resnet20(t(d["inputs"]["images"]))}) == []
    e, d = vec["resnet20_absorb"]
    q, c_of = P.dfmpc_quantize(resnet20, 2, 6, recalibration="absorb")
    sites, _ = P.sites_and_pairs(resnet20)
    out = _in_vector_order(zoo_outputs(q, c_of, sites, t(d["inputs"]["images"])), d)
    assert check(vec, "resnet20_absorb", out) == []


def test_port_views_equal_dfmpc_views_and_a_bad_kind_is_refused(resnet20):
    """S.4 and S.6 in the port: its mirrored and shifted views are dfmpc.probes' bit for bit (an odd-sized image,
    so a wrong axis or a wrong roll would differ; the two kinds differ from each other as a negative control),
    and an unknown ``view_kind`` is refused by name."""
    from dfmpc import probes as D
    x = np.random.default_rng(3).standard_normal((2, 1, 7, 9)).astype(np.float32)
    for views in (1, 2, 4):
        np.testing.assert_array_equal(P.mirrored_views(t(x), views).numpy(), D.mirrored_views(x, views))
        np.testing.assert_array_equal(P.shifted_views(t(x), views).numpy(), D.shifted_views(x, views))
    assert not np.array_equal(P.mirrored_views(t(x), 4).numpy(), D.shifted_views(x, 4))
    with pytest.raises(ValueError, match="view_kind"):
        P.dfmpc_quantize(resnet20, 2, 6, probes=t(x), view_kind="rolls")


@pytest.mark.slow
def test_port_zoo_resnet20_sequential_matches_vectors(vec, resnet20):
    """Sequential re-calibration (derivation 15, S.1-S.2, with the mirrored views of S.5-S.6) on the stored probes, then Eq. (27) and the fold, on the
    zoo ResNet-20: c, final BN and logits as in the vectors."""
    e, d = vec["resnet20_sequential"]
    q, c_of = P.dfmpc_quantize(resnet20, 2, 6, recalibration="sequential", probes=t(d["inputs"]["probes"]))
    sites, _ = P.sites_and_pairs(resnet20)
    out = _in_vector_order(zoo_outputs(q, c_of, sites, t(d["inputs"]["images"])), d)
    assert check(vec, "resnet20_sequential", out) == []


@pytest.mark.slow
def test_port_and_dfmpc_agree_on_zoo_resnet20_test_subset(vec, resnet20):
    """The port and dfmpc.quantize_network on the zoo ResNet-20 (MP2/6, Eq. (27)), sequential on 16 noise probes and
    absorb: the same c within float32 tolerance, the same top-1 on 1000 test images (at most 2 predictions differ)."""
    from dfmpc import quantize_network
    from dfmpc.evaluation import load_dataset, load_zoo_model
    g = load_zoo_model("resnet20")
    x, y = load_dataset("fashion-mnist")
    x, y = x[:1000], y[:1000]
    probes = vec["resnet20_sequential"][1]["inputs"]["probes"]
    for mode in ("sequential", "absorb"):
        qg, rep = quantize_network(g, 2, 6, recalibration=mode, probes=probes, progress=False)
        q, c_of = P.dfmpc_quantize(resnet20, 2, 6, recalibration=mode, probes=t(probes))
        c_ref = np.concatenate([p.c for p in rep.pairs])
        c_port = torch.cat([c_of[V.module_name(p.low)] for p in rep.pairs]).numpy()
        assert np.allclose(c_port, c_ref, rtol=1e-5, atol=1e-6), np.abs(c_port - c_ref).max()
        pred_ref = qg.run(x, batch_size=250).argmax(1)
        with torch.no_grad():
            pred_port = q(t(x)).argmax(1).numpy()
        assert int(np.sum(pred_ref != pred_port)) <= 2
        assert abs(np.mean(pred_ref == y) - np.mean(pred_port == y)) <= 0.002


class _BiasPoolNet(torch.nn.Module):
    """conv(bias) -> BN -> ReLU -> MaxPool -> conv: the pair passes through pooling and the bias moves into BN."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 12, 3, padding=1, bias=True), nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(2)
        self.c2, self.b2 = nn.Conv2d(12, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.b0(self.c0(x)))
        x = self.pool(F.relu(self.b1(self.c1(x))))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_port_and_dfmpc_agree_with_conv_bias_and_pooling_in_the_pair():
    """A biased low conv and a MaxPool between ReLU and conv B: the port pairs c1 -> c2 like dfmpc.find_pairs and
    gives dfmpc's c (Eq. (27)) and logits; negative control: leaving the bias out of BN's mean changes c."""
    from dfmpc import quantize_network
    from dfmpc.interop.torch_export import graph_from_torch
    torch.manual_seed(0)
    model = _BiasPoolNet()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    model.eval()
    g = graph_from_torch(model, (3, 8, 8))
    probes = np.random.default_rng(0).standard_normal((8, 3, 8, 8), dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8), dtype=np.float32)
    for mode in ("absorb", "sequential"):
        qg, rep = quantize_network(g, 2, 6, recalibration=mode, probes=probes, progress=False)
        q, c_of = P.dfmpc_quantize(model, 2, 6, recalibration=mode, probes=t(probes))
        assert [V.module_name(p.low) for p in rep.pairs] == list(c_of) == ["c1"]
        assert np.allclose(c_of["c1"].numpy(), rep.pairs[0].c, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            logits = q(t(x)).numpy()
        ref = qg.run(x)
        assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()
    no_bias = _BiasPoolNet()
    no_bias.load_state_dict(model.state_dict())
    no_bias.c1.bias = None                          # the port's step 0 skipped: BN's mean keeps the bias in it
    _, c_bad = P.dfmpc_quantize(no_bias.eval(), 2, 6, recalibration="absorb")
    assert np.abs(c_bad["c1"].numpy() - quantize_network(g, 2, 6, recalibration="absorb")[1].pairs[0].c).max() > 1e-3
