"""dfmpc.probes: noise and distilled probe inputs, the BN-matching loss (D.1)-(D.3) and its gradient."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfmpc import probes
from dfmpc.engine import Graph, Node
from dfmpc.engine.conv import unmeasured
from dfmpc.evaluation import load_zoo_model

from test_backward import H_FD, _torch_module, f64_params, small_graph


def f64_graph(g):
    return Graph([Node(n.name, n.op, n.inputs, n.outputs, n.attrs, f64_params(**n.params)) for n in g.nodes],
                 g.inputs, g.outputs, g.input_shapes)


@pytest.fixture(scope="module")
def resnet20():
    return load_zoo_model("resnet20")


# ------------------------------------------------------------------------ the loss and its gradient

@settings(max_examples=50)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 4), st.sampled_from([2, 3, 4]),
       st.sampled_from(["absolute", "relative"]))
def test_stat_loss_gradient_matches_finite_differences(seed, N, C, ndim, objective):
    """D.2-D.3: the gradient of ||mu_b - mu||^2 + ||s_b - sigma||^2 (biased batch variance over every axis
    but the channel; D.6: each channel's terms weighted by 1 / (C sigma^2)) against central differences in
    float64, relative tolerance 1e-6."""
    rng = np.random.default_rng(seed)
    shape = (N, C) + (3, 2)[:ndim - 2]
    z = rng.standard_normal(shape) * rng.uniform(0.5, 2) + rng.normal()
    mu, sigma, eps = rng.normal(size=C), rng.uniform(0.2, 2, C), 1e-3
    w = probes.channel_weights(sigma, objective)
    loss, g = probes._stat_loss(z, mu, sigma, eps, True, w=w)
    assert g.shape == z.shape
    f = lambda y: probes._stat_loss(y, mu, sigma, eps, False, w=w)[0]
    for _ in range(3):
        v = rng.standard_normal(shape)
        fd = (f(z + H_FD * v) - f(z - H_FD * v)) / (2 * H_FD)
        assert abs(np.sum(g * v) - fd) <= 1e-6 * (np.sum(np.abs(g * v)) + 1e-12)


def test_stat_loss_negative_control():
    """D.3 negative control: dropping the mean term a of the gradient fails the finite-difference check."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 3, 4, 4)) + 1.0
    mu, sigma = np.zeros(3), np.ones(3)
    loss, g = probes._stat_loss(z, mu, sigma, 1e-5, True)
    a = 2 * (z.mean(axis=(0, 2, 3)) - mu) / (z.size / 3)
    g_wrong = g - a[None, :, None, None]
    v = rng.standard_normal(z.shape)
    f = lambda y: probes._stat_loss(y, mu, sigma, 1e-5, False)[0]
    fd = (f(z + H_FD * v) - f(z - H_FD * v)) / (2 * H_FD)
    assert abs(np.sum(g * v) - fd) <= 1e-6 * np.sum(np.abs(g * v))
    assert abs(np.sum(g_wrong * v) - fd) > 1e-3 * np.sum(np.abs(g * v))


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.floats(-1.0, 1.0), st.floats(-0.5, 0.5), st.floats(0.01, 100))
def test_relative_objective_is_the_mismatch_in_sigma_units(seed, C, delta, kappa, scale):
    """D.6 = D.5's per-layer error e_l: a batch whose channel means are off by delta sigma and whose
    standard deviations are (1 + kappa) sigma has relative loss delta^2 + kappa^2 at any scale of sigma
    (rel. 1e-9, float64), while D.1's value moves with the scale (negative control)."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.5, 2.0, C) * scale
    mu = rng.normal(size=C) * scale
    u = rng.standard_normal((64, C, 3, 3))
    u = (u - u.mean(axis=(0, 2, 3), keepdims=True)) / u.std(axis=(0, 2, 3), keepdims=True)   # mean 0, std 1 exactly
    eps = 0.0                                                  # s_b = the batch std exactly
    z = (mu + delta * sigma)[None, :, None, None] + ((1 + kappa) * sigma)[None, :, None, None] * u
    rel = probes._stat_loss(z, mu, sigma, eps, False, w=probes.channel_weights(sigma, "relative"))[0]
    assert rel == pytest.approx(delta ** 2 + kappa ** 2, rel=1e-9, abs=1e-12)
    absolute = probes._stat_loss(z, mu, sigma, eps, False, w=probes.channel_weights(sigma, "absolute"))[0]
    assert absolute == pytest.approx(np.sum(sigma ** 2) * (delta ** 2 + kappa ** 2), rel=1e-9, abs=1e-12)


def test_relative_loss_of_a_network_is_its_squared_mismatch_times_the_layers(resnet20):
    """On ResNet-20, D.6 summed over the BNs equals L * D.5^2 (L = 21 BN layers) plus the input term,
    on noise and on distilled images (rel. 1e-5: float32 moments against float64); D.1 does not
    (negative control)."""
    targets = probes.bn_targets(resnet20)
    for x in (probes.probe_inputs(resnet20, n=4, kind="noise", seed=0),
              probes.distill(resnet20, probes.probe_inputs(resnet20, n=4, kind="noise", seed=0), iterations=5).x):
        x64 = x.astype(np.float64)
        m, s = x64.mean(axis=(0, 2, 3)), np.sqrt(x64.var(axis=(0, 2, 3)) + probes.INPUT_EPS)
        s0 = np.sqrt(1 + probes.INPUT_EPS)
        input_term = np.mean(m ** 2 / s0 ** 2 + (s - s0) ** 2 / s0 ** 2)
        expected = len(targets) * probes.bn_mismatch(resnet20, x) ** 2 + input_term
        assert probes.bn_matching_loss(resnet20, x, objective="relative") == pytest.approx(expected, rel=1e-5)
        assert probes.bn_matching_loss(resnet20, x) != pytest.approx(expected, rel=1e-2)


def test_objective_is_checked_and_reaches_make_probes(resnet20):
    """objective= in make_probes / distill: the default is D.6; an unknown name is refused, naming it,
    and channel_weights (D.6's weights) refuses a sigma that is not positive, finite and 1-D."""
    assert probes.DEFAULT_OBJECTIVE == "relative"
    a = probes.make_probes(resnet20, n=2, seed=0, iterations=2, tolerance=None)
    b = probes.distill(resnet20, probes.probe_inputs(resnet20, n=2, kind="noise", seed=0), iterations=2,
                       objective="relative")
    np.testing.assert_array_equal(a.x, b.x)
    c = probes.make_probes(resnet20, n=2, seed=0, iterations=2, tolerance=None, objective="absolute")
    assert not np.array_equal(a.x, c.x)
    for call in (lambda: probes.make_probes(resnet20, n=2, iterations=1, objective="zeroq"),
                 lambda: probes.distill(resnet20, a.x, iterations=1, objective=None),
                 lambda: probes.bn_matching_loss(resnet20, a.x, objective="D.1")):
        with pytest.raises(ValueError, match="objective"):
            call()
    with pytest.raises(ValueError, match="objective"):
        probes.channel_weights(np.ones(3), "zeroq")
    for bad in (np.zeros(2), np.array([1.0, np.nan]), np.ones((2, 2)), np.array([])):
        with pytest.raises(ValueError, match="sigma"):
            probes.channel_weights(bad, "relative")


def test_float32_moments_match_float64():
    """D.2 in float32 (sums over images then positions, var = E[z^2] - mu_b^2) equals the float64 two-pass
    loss to 1e-4 relative on BN inputs with a mean of 5 standard deviations."""
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((64, 16, 14, 14)) * 0.3 + 1.5).astype(np.float32)
    mu, sigma = rng.normal(size=16), rng.uniform(0.2, 1, 16)
    l32, g32 = probes._stat_loss(z, mu, sigma, 1e-5, True)
    l64, g64 = probes._stat_loss(z.astype(np.float64), mu, sigma, 1e-5, True)
    assert abs(l32 - l64) <= 1e-4 * l64
    np.testing.assert_allclose(g32, g64, rtol=0, atol=1e-4 * np.abs(g64).max())


def test_loss_and_input_gradient_match_torch_autograd():
    """D.1 (sum over every BN of D.2 plus the input term) and its input gradient (D.3 chained through
    V.1-V.12) against PyTorch autograd in float64, on the small graph with every op."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    g = small_graph(rng)
    x = rng.standard_normal((3, 2, 8, 8))
    targets = probes.bn_targets(g)
    loss, gx = probes._loss_and_grad(g, targets, x)
    xt = torch.tensor(x, requires_grad=True)
    zs = _torch_module(g)(xt, [t.tensor for t in targets])

    def term(z, mu, sigma, eps):
        mu_b = z.mean(dim=[a for a in range(z.ndim) if a != 1])
        var_b = z.var(dim=[a for a in range(z.ndim) if a != 1], unbiased=False)
        return torch.sum((mu_b - torch.as_tensor(mu)) ** 2) + torch.sum((torch.sqrt(var_b + eps) - torch.as_tensor(sigma)) ** 2)
    L = sum(term(z, t.mu, t.sigma, t.eps) for z, t in zip(zs, targets))
    L = L + term(xt, np.zeros(2), np.full(2, np.sqrt(1 + probes.INPUT_EPS)), probes.INPUT_EPS)
    L.backward()
    assert loss == pytest.approx(float(L.detach()), rel=1e-12)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-9, atol=1e-9 * np.abs(gx).max())


# ------------------------------------------------------------------------ probe_inputs

def test_noise_probes_are_seeded_standard_normal(resnet20):
    """kind='noise': shape (n, C, H, W) float32 from the graph's input shape, N(0, 1), fixed by the seed."""
    x = probes.probe_inputs(resnet20, n=32, kind="noise", seed=3)
    assert x.shape == (32, 1, 28, 28) and x.dtype == np.float32
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02          # 25088 samples: 5 standard errors
    np.testing.assert_array_equal(x, probes.probe_inputs(resnet20, n=32, kind="noise", seed=3))
    assert not np.array_equal(x, probes.probe_inputs(resnet20, n=32, kind="noise", seed=4))


def test_distillation_lowers_the_bn_matching_loss(resnet20):
    """D.1 on the zoo's ResNet-20: 12 Adam steps on 8 images cut the BN-matching loss to less than half of
    its value on the starting noise (measured: about 47 -> 12), and the images stay standardised-like."""
    x0 = probes.probe_inputs(resnet20, n=8, kind="noise", seed=0)
    x = probes.probe_inputs(resnet20, n=8, kind="distilled", seed=0, iterations=12, progress=False)
    before, after = probes.bn_matching_loss(resnet20, x0), probes.bn_matching_loss(resnet20, x)
    assert after < 0.5 * before
    assert abs(x.mean()) < 0.3 and 0.7 < x.std() < 1.3


def test_distillation_is_reproducible_and_starts_from_the_noise(resnet20):
    """Fixed seed: distilled probes are bit-identical run to run; with 0 iterations they are the noise."""
    a = probes.probe_inputs(resnet20, n=4, kind="distilled", seed=1, iterations=3, progress=False)
    b = probes.probe_inputs(resnet20, n=4, kind="distilled", seed=1, iterations=3, progress=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(probes.probe_inputs(resnet20, n=4, kind="distilled", seed=1, iterations=0),
                                  probes.probe_inputs(resnet20, n=4, kind="noise", seed=1))


def test_distillation_gives_the_same_bits_at_any_thread_count_and_restores_it(resnet20, monkeypatch):
    """D.1's descent is the same computation on 1 thread and with the batch shared by 2 worker
    threads (bit-identical images), so the default (DISTILL_THREADS: the caller's Numba thread count,
    chosen for speed) cannot change a result; the caller's thread setting is restored afterwards, also
    when the call fails. Negative controls: the images did move, and the workers did run the parts."""
    import numba
    from dfmpc.engine import executor
    x0 = probes.probe_inputs(resnet20, n=8, kind="noise", seed=3)
    before = numba.get_num_threads()
    one = probes.distill(resnet20, x0, iterations=3, threads=1).x
    assert numba.get_num_threads() == before
    pools, real = [], executor.worker_pool
    monkeypatch.setattr(executor, "worker_pool", lambda n: pools.append(n) or real(n))
    two = probes.distill(resnet20, x0, iterations=3, threads=2).x
    np.testing.assert_array_equal(one, two)
    assert pools and set(pools) == {2}                      # the parts ran on two worker threads
    monkeypatch.undo()
    mine = probes.distill(resnet20, x0, iterations=3, threads=None).x
    np.testing.assert_array_equal(one, mine)
    assert not np.array_equal(one, x0)                      # the images moved: the equality is not vacuous
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="threads"):
            probes.distill(resnet20, x0, iterations=1, threads=bad)
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("name", ["resnet20", "densenet", "mobilenetv2_small"])
def test_loss_and_gradient_are_the_same_bits_in_any_number_of_parts(name):
    """_loss_and_grad with the batch cut into parts, each part's forward and reverse pass on a worker
    thread and the batch statistics (D.2) over the parts joined again, gives L and dL/dx bit for bit as
    in one piece, in both objectives: every op treats each image alone and every kernel's sums run in an
    order that does not depend on the batch (strided and 1x1 convs, Concat, depthwise convs and ReLU6 on
    the way), with the kernels that distill fixes (``unmeasured``; a timed choice may differ by batch
    size). Negative control: one image changed changes the gradient."""
    g = load_zoo_model(name)
    targets = probes.bn_targets(g)
    program = probes._program(g, targets)
    x = probes.probe_inputs(g, n=5, kind="noise", seed=7)
    with unmeasured():                                  # the kernels distill runs (not the timed choice)
        for objective in ("relative", "absolute"):
            l1, g1 = probes._loss_and_grad(g, targets, x, program=program, objective=objective)
            for parts in (2, 3, 5, 9):
                lp, gp = probes._loss_and_grad(g, targets, x, program=program, objective=objective, parts=parts)
                assert lp == l1
                np.testing.assert_array_equal(gp, g1)
        x2 = x.copy()
        x2[4] *= 1.5
        assert not np.array_equal(probes._loss_and_grad(g, targets, x2, program=program, parts=2)[1], g1)


def test_parts_handle_a_bn_on_the_input_and_two_bns_on_one_tensor():
    """The cases of _loss_and_grad no zoo model has: a BN reading the graph input (its D.3 gradient joins
    the input's directly) and two BNs reading one tensor (their D.3 seeds are summed per part). Same bits
    in any number of parts as in one, on a graph with every differentiable op (test_backward.small_graph;
    grouped and depthwise convs, Clip, MaxPool, AveragePool and Concat on the way)."""
    base = small_graph(np.random.default_rng(5), np.float32)
    rng = np.random.default_rng(6)

    def bn(name, x, c):
        return Node(name, "BatchNormalization", [x], [name], {"epsilon": 1e-5},
                    {"gamma": rng.standard_normal(c).astype(np.float32) + 1, "beta": np.zeros(c, np.float32),
                     "mean": rng.standard_normal(c).astype(np.float32), "var": np.ones(c, np.float32)})
    nodes = [bn("bx", "x", 2)] + base.nodes + [bn("b1_again", "c1", 6),
                                                Node("extra", "Add", ["b1_again", "bx_c"], ["extra"])]
    nodes.insert(1, Node("cx", "Conv", ["bx"], ["bx_c"], {"pads": (1, 1, 1, 1)},
                         {"W": rng.standard_normal((6, 2, 3, 3)).astype(np.float32)}))
    g = Graph(nodes, ["x"], ["out", "extra"], base.input_shapes)
    targets = probes.bn_targets(g)
    assert [t.tensor for t in targets].count("c1") == 2 and targets[0].tensor == "x"
    program = probes._program(g, targets)
    x = rng.standard_normal((4, 2, 8, 8)).astype(np.float32)
    with unmeasured():
        l1, g1 = probes._loss_and_grad(g, targets, x, program=program, objective="relative")
        for parts in (2, 3, 4):
            lp, gp = probes._loss_and_grad(g, targets, x, program=program, objective="relative", parts=parts)
            assert lp == l1
            np.testing.assert_array_equal(gp, g1)
    assert np.abs(g1).max() > 0


def test_a_program_through_a_gemm_runs_in_one_piece(monkeypatch):
    """Gemm (BLAS: its order of summation may change with the number of rows) and GlobalAveragePool are
    not in PART_OPS: a batch whose BN sits after them runs in one part, whatever ``parts`` asks, and so
    keeps the bits of D.2-D.3 and of the gradient. Negative control: with the rule off the same call does
    run in parts. (Run so, parts of one image each gave other bits on the project's AMD EPYC, the loss
    differing in its 8th digit: a one-row product takes another BLAS path. Not asserted, since that
    depends on the BLAS kernels.) splittable refuses what is not a program."""
    from dfmpc.engine import executor
    base = small_graph(np.random.default_rng(5), np.float32)
    c = 4
    bn_fc = Node("b_fc", "BatchNormalization", ["out"], ["b_fc"], {"epsilon": 1e-5},
                 {"gamma": np.ones(c, np.float32), "beta": np.zeros(c, np.float32),
                  "mean": np.full(c, 0.5, np.float32), "var": np.full(c, 2.0, np.float32)})
    g = Graph(base.nodes + [bn_fc], ["x"], ["b_fc"], base.input_shapes)
    targets = probes.bn_targets(g)
    program = probes._program(g, targets)
    assert not probes.splittable(program)
    r20 = load_zoo_model("resnet20")
    assert probes.splittable(probes._program(r20, probes.bn_targets(r20)))
    with pytest.raises(ValueError, match="program"):
        probes.splittable(r20)
    x = np.random.default_rng(8).standard_normal((7, 2, 8, 8)).astype(np.float32)
    pools, real = [], executor.worker_pool
    monkeypatch.setattr(executor, "worker_pool", lambda n: pools.append(n) or real(n))
    with unmeasured():
        l1, g1 = probes._loss_and_grad(g, targets, x, program=program)
        l7, g7 = probes._loss_and_grad(g, targets, x, program=program, parts=7)
        assert pools == [] and l7 == l1
        np.testing.assert_array_equal(g7, g1)
        monkeypatch.setattr(probes, "splittable", lambda p: True)       # the rule off: parts run
        probes._loss_and_grad(g, targets, x, program=program, parts=7)
    assert pools and set(pools) == {7}               # the forward and the reverse pass in 7 parts


def test_distill_history_and_batches(resnet20):
    """distill: loss history has iterations + 1 entries starting at the loss of x0; batches are optimised
    independently (a batch of 2 gives the same images whether or not another batch follows it)."""
    x0 = probes.probe_inputs(resnet20, n=4, kind="noise", seed=2)
    r = probes.distill(resnet20, x0, iterations=2, batch_size=2)
    assert len(r.loss) == 3 and r.x.shape == x0.shape
    r2 = probes.distill(resnet20, x0[:2], iterations=2)
    np.testing.assert_array_equal(r.x[:2], r2.x)
    assert r2.loss[0] == pytest.approx(probes.bn_matching_loss(resnet20, x0[:2], objective="relative"), rel=1e-6)
    r3 = probes.distill(resnet20, x0[:2], iterations=2, objective="absolute")
    assert r3.loss[0] == pytest.approx(probes.bn_matching_loss(resnet20, x0[:2]), rel=1e-6)
    assert not np.array_equal(r3.x, r2.x)                       # the objective is used (negative control)


def test_lbfgs_descent_keeps_its_budget_and_history(resnet20, monkeypatch):
    """optimizer="lbfgs" on D.6 (16_probe_inputs.md, "A quasi-Newton descent"): at most ``iterations``
    evaluations of L and dL/dx per batch, the same budget as Adam's steps (counted); the history starts at
    L(x0), never rises (the lowest loss so far) and ends at L of the images returned, the best evaluated; the D.6 loss falls
    below half its start in 12 evaluations (measured: 7.2 -> about 1.1). Same bits at 1 and 2 Numba
    threads and at 1 and 2 BLAS threads, and not Adam's images (negative control: the optimizer is used)."""
    x0 = probes.probe_inputs(resnet20, n=8, kind="noise", seed=0)
    calls = []
    real = probes._loss_and_grad
    monkeypatch.setattr(probes, "_loss_and_grad", lambda *a, **k: calls.append(k.get("grad", True)) or real(*a, **k))
    r = probes.distill(resnet20, x0, iterations=12, optimizer="lbfgs")
    monkeypatch.undo()
    assert len(calls) <= 12 and all(calls)
    assert len(r.loss) == 13 and r.x.dtype == np.float32 and r.x.shape == x0.shape
    assert r.loss[0] == pytest.approx(probes.bn_matching_loss(resnet20, x0, objective="relative"), rel=1e-6)
    assert r.loss[-1] == pytest.approx(probes.bn_matching_loss(resnet20, r.x, objective="relative"), rel=1e-6)
    assert all(b <= a for a, b in zip(r.loss[:-2], r.loss[1:-1]))
    assert r.loss[-1] < 0.5 * r.loss[0]
    two = probes.distill(resnet20, x0, iterations=12, optimizer="lbfgs", threads=2)
    np.testing.assert_array_equal(r.x, two.x)
    monkeypatch.setattr(probes, "LBFGS_BLAS_THREADS", 2)              # BLAS threads inside L-BFGS-B
    np.testing.assert_array_equal(r.x, probes.distill(resnet20, x0, iterations=12, optimizer="lbfgs").x)
    monkeypatch.undo()
    adam = probes.distill(resnet20, x0, iterations=12, optimizer="adam")
    assert not np.array_equal(r.x, adam.x)
    np.testing.assert_array_equal(probes.distill(resnet20, x0, iterations=0, optimizer="lbfgs").x, x0)
    for bad in ("LBFGS", "sgd", None, 1):
        with pytest.raises(ValueError, match="optimizer"):
            probes.distill(resnet20, x0, iterations=1, optimizer=bad)
        with pytest.raises(ValueError, match="optimizer"):
            probes.make_probes(resnet20, n=2, optimizer=bad)


def test_progress_line_only_when_asked(resnet20, capsys):
    """progress=False is silent; progress=True draws a tqdm bar on stderr, nothing to stdout."""
    probes.probe_inputs(resnet20, n=2, kind="distilled", iterations=2, progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    probes.probe_inputs(resnet20, n=2, kind="distilled", iterations=2, progress=True)
    out = capsys.readouterr()
    assert "distilling probe inputs" in out.err and "2/2" in out.err and out.out == ""


def test_probe_inputs_refuses_bad_arguments(resnet20):
    """Bad arguments raise ValueError naming the argument; an op without VJP before the last BN is named."""
    for kwargs, name in (({"n": 0}, "n"), ({"kind": "real"}, "kind"), ({"seed": -1}, "seed"),
                         ({"iterations": -1}, "iterations"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size"),
                         ({"input_shape": (28, 28)}, "input_shape")):
        with pytest.raises(ValueError, match=name):
            probes.probe_inputs(resnet20, **{"n": 2, "iterations": 1, **kwargs})
    with pytest.raises(ValueError, match="graph"):
        probes.probe_inputs("resnet20")
    no_bn = Graph([Node("r", "Relu", ["x"], ["y"])], ["x"], ["y"], {"x": (1, 4, 4)})
    assert probes.probe_inputs(no_bn, n=2, kind="noise").shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="BatchNormalization.*folded.*export_onnx.*kind='noise'"):
        probes.probe_inputs(no_bn, n=2, kind="distilled")
    unknown = Graph([Node("r", "Relu", ["x"], ["y"])], ["x"], ["y"])
    with pytest.raises(ValueError, match="input_shape"):
        probes.probe_inputs(unknown, n=2, kind="noise")
    assert probes.probe_inputs(unknown, n=2, kind="noise", input_shape=(3, 2, 2)).shape == (2, 3, 2, 2)
    one = lambda *s: np.ones(s, np.float32)
    softmax_first = Graph([Node("sm", "Softmax", ["x"], ["s"], {"axis": 1}),
                           Node("bn", "BatchNormalization", ["s"], ["y"], {},
                                {"gamma": one(1), "beta": one(1), "mean": one(1), "var": one(1)})],
                          ["x"], ["y"], {"x": (1, 4, 4)})
    with pytest.raises(ValueError, match=r"Softmax.*'sm'"):
        probes.probe_inputs(softmax_first, n=2, iterations=1)


@pytest.mark.parametrize("shape", [(8, 16, 28, 28), (3, 5, 4, 6), (1, 1, 3, 3)])
def test_float32_moments_and_gradient_kernels_equal_their_numpy_twins(shape):
    """D.2-D.3 float32: the one-pass Numba sums (per channel, over images in float32 then over positions in
    float64) equal moments_numpy bit for bit, and the gradient a + b (z - mu_b) equals NumPy's
    r * b + (a - b mu_b) bit for bit (NHWC-memory z, as the engine's convs give)."""
    rng = np.random.default_rng(11)
    z = (rng.standard_normal(shape) * 0.3 + 1.5).astype(np.float32)
    z = np.ascontiguousarray(z.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    r = probes._rows(z)
    s1, s2 = probes._moments_kernel(r.reshape(shape[0], -1), shape[1])
    t1, t2 = probes.moments_numpy(r.reshape(shape[0], -1), shape[1])
    np.testing.assert_array_equal(s1, t1)
    np.testing.assert_array_equal(s2, t2)
    mu, sigma = rng.normal(size=shape[1]), rng.uniform(0.2, 1, shape[1])
    _, g = probes._stat_loss(z, mu, sigma, 1e-5, True)
    M = r.shape[0]
    mu_b = t1 / M
    s_b = np.sqrt(np.maximum(t2 / M - mu_b ** 2, 0.0) + 1e-5)
    a, b = 2.0 * (mu_b - mu) / M, 2.0 * (s_b - sigma) / (s_b * M)
    g0 = r * b.astype(np.float32)
    g0 += (a - b * mu_b).astype(np.float32)
    np.testing.assert_array_equal(probes._rows(g), g0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 20), hw=st.integers(1, 12), seed=st.integers(0, 2**32 - 1),
       offset=st.sampled_from([0.0, 5.0, -1e3]), zeros=st.sampled_from([0.0, 0.5, 1.0]))
def test_moments_kernel_equals_its_numpy_twin_on_drawn_shapes(n, c, hw, seed, offset, zeros):
    """D.2's float32 sums: the one-pass Numba kernel (per position, the channels' sums over images side
    by side) equals moments_numpy bit for bit on drawn batch sizes, channel counts and positions, with
    large channel means and exact zeros; and the lazy D.3 seed (AffineSeed) forms the same gradient as
    the eager one."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, hw, c)) + offset).astype(np.float32)
    z[rng.uniform(size=z.shape) < zeros] = 0.0
    per_image = z.reshape(n, -1)
    s1, s2 = probes._moments_kernel(per_image, c)
    t1, t2 = probes.moments_numpy(per_image, c)
    np.testing.assert_array_equal(s1, t1)
    np.testing.assert_array_equal(s2, t2)
    z4 = z.reshape(n, 1, hw, c).transpose(0, 3, 1, 2)                    # NHWC memory, as the engine's convs
    mu, sigma = rng.normal(size=c), rng.uniform(0.2, 1, c)
    l0, g0 = probes._stat_loss(z4, mu, sigma, 1e-5, True)
    l1, g1 = probes._stat_loss(z4, mu, sigma, 1e-5, True, lazy=True)
    assert l0 == l1 and isinstance(g1, probes.AffineSeed)
    np.testing.assert_array_equal(g1.value(), g0)


# ------------------------------------------------------------------ D.5: mismatch and the adaptive budget

def _one_bn_graph(mu, var, eps=1e-5):
    """A graph whose only BN reads the input: its input moments are those of the batch itself."""
    C = len(mu)
    f = lambda a: np.asarray(a, np.float32)
    return Graph([Node("bn", "BatchNormalization", ["x"], ["y"], {"epsilon": eps},
                       {"gamma": f(np.ones(C)), "beta": f(np.zeros(C)), "mean": f(mu), "var": f(var)})],
                 ["x"], ["y"], {"x": (C, 5, 6)})


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), C=st.integers(1, 6), delta=st.floats(-0.5, 0.5), kappa=st.floats(-0.4, 0.4))
def test_bn_mismatch_is_the_rms_relative_error_of_mean_and_std(seed, C, delta, kappa):
    """D.5: a batch whose channel means are off by delta * sigma and whose standard deviations (with eps,
    D.2) are (1 + kappa) * sigma has mismatch sqrt(delta^2 + kappa^2), whatever the channels' scales
    (built exactly in float64, compared to 1e-3: float32 storage of the batch and of the BN statistics)."""
    rng = np.random.default_rng(seed)
    mu, var, eps = rng.normal(0, 3, C), rng.uniform(0.05, 20, C), 1e-5
    sigma = np.sqrt(var.astype(np.float32).astype(np.float64) + eps)
    mu = mu.astype(np.float32).astype(np.float64)
    z = rng.standard_normal((4, C, 5, 6))
    z = (z - z.mean(axis=(0, 2, 3), keepdims=True)) / z.std(axis=(0, 2, 3), keepdims=True)   # mean 0, var 1
    sd = np.sqrt(((1 + kappa) * sigma) ** 2 - eps)                                           # s_b = (1+kappa) sigma
    x = (z * sd[None, :, None, None] + (mu + delta * sigma)[None, :, None, None]).astype(np.float32)
    got = probes.bn_mismatch(_one_bn_graph(mu, var, eps), x)
    assert got == pytest.approx(np.hypot(delta, kappa), abs=1e-3)


def test_bn_mismatch_weights_each_bn_equally_and_refuses_bad_input(resnet20):
    """D.5 averages per BN (not per channel), is 0 only at the running statistics, and is smaller on
    distilled probes than on their starting noise (negative control: the noise is far off, > 0.5)."""
    z = np.random.default_rng(0).standard_normal((4, 2, 5, 6))
    z = (z - z.mean(axis=(0, 2, 3), keepdims=True)) / z.std(axis=(0, 2, 3), keepdims=True)
    g = _one_bn_graph([0.0, 0.0], [1.0 - 1e-5, 1.0 - 1e-5])
    assert probes.bn_mismatch(g, z.astype(np.float32)) == pytest.approx(0.0, abs=1e-5)
    shifted = z.copy()
    shifted[:, 0] += 0.3                                       # one of two channels off by 0.3 sigma
    assert probes.bn_mismatch(g, shifted.astype(np.float32)) == pytest.approx(0.3 / np.sqrt(2), abs=1e-4)
    x0 = probes.probe_inputs(resnet20, n=4, kind="noise", seed=0)
    x = probes.distill(resnet20, x0, iterations=10).x
    assert probes.bn_mismatch(resnet20, x0) > 0.5 > probes.bn_mismatch(resnet20, x)
    for bad in (x0.astype(np.float64), x0[0], x0[:0], [[1.0]]):
        with pytest.raises(ValueError, match="x"):
            probes.bn_mismatch(resnet20, bad)
    no_bn = Graph([Node("r", "Relu", ["x"], ["y"])], ["x"], ["y"], {"x": (1, 4, 4)})
    with pytest.raises(ValueError, match="BatchNormalization"):
        probes.bn_mismatch(no_bn, x0[:, :, :4, :4].copy())


def test_distill_to_tolerance_doubles_the_budget_until_it_is_met(resnet20):
    """The budget doubles from the same start while D.5 exceeds the tolerance, up to max_factor times
    the first: an unreachable tolerance runs 2, 4, 8 steps and keeps the run with the least mismatch,
    bit for bit the plain distillation of that length; a tolerance the first run meets (negative
    control) and tolerance=None run once."""
    x0 = probes.probe_inputs(resnet20, n=4, kind="noise", seed=5)
    r = probes.distill_to_tolerance(resnet20, x0, iterations=2, tolerance=1e-9, max_factor=4)
    assert r.budgets == [2, 4, 8]
    assert r.mismatch == min(probes.bn_mismatch(resnet20, probes.distill(resnet20, x0, iterations=k).x)
                             for k in r.budgets)
    np.testing.assert_array_equal(r.x, probes.distill(resnet20, x0, iterations=r.iterations).x)
    assert r.mismatch == probes.bn_mismatch(resnet20, r.x) and len(r.loss) == r.iterations + 1
    once = probes.distill_to_tolerance(resnet20, x0, iterations=2, tolerance=10.0)
    assert once.budgets == [2] and once.iterations == 2
    np.testing.assert_array_equal(once.x, probes.distill(resnet20, x0, iterations=2).x)
    assert probes.distill_to_tolerance(resnet20, x0, iterations=2, tolerance=None).budgets == [2]
    assert probes.distill_to_tolerance(resnet20, x0, iterations=0, tolerance=1e-9).budgets == [0]
    np.testing.assert_array_equal(
        probes.probe_inputs(resnet20, n=4, seed=5, iterations=2, tolerance=1e-9),
        probes.distill(resnet20, x0, iterations=8).x if r.iterations == 8 else r.x)
    for kwargs, name in (({"tolerance": 0.0}, "tolerance"), ({"tolerance": -1}, "tolerance"),
                         ({"tolerance": float("nan")}, "tolerance"), ({"tolerance": True}, "tolerance"),
                         ({"tolerance": "0.1"}, "tolerance"), ({"max_factor": 0}, "max_factor")):
        with pytest.raises(ValueError, match=name):
            probes.distill_to_tolerance(resnet20, x0, iterations=1, **kwargs)
    with pytest.raises(ValueError, match="tolerance"):
        probes.probe_inputs(resnet20, n=2, kind="noise", tolerance=0)


def test_quantize_network_passes_the_probe_budget_through(resnet20):
    """quantize_network(probe_iterations=, probe_tolerance=) makes the same probes as probe_inputs with
    those arguments (same re-calibrated network), and a different budget gives different probes."""
    import dfmpc
    x = probes.probe_inputs(resnet20, n=2, seed=0, iterations=3, tolerance=None)
    a, _ = dfmpc.quantize_network(resnet20, compensation="none", probe_images=2, probe_iterations=3,
                                  probe_tolerance=None, progress=False)
    b, _ = dfmpc.quantize_network(resnet20, compensation="none", probes=x, progress=False)
    c, _ = dfmpc.quantize_network(resnet20, compensation="none", probe_images=2, probe_iterations=4,
                                  probe_tolerance=None, progress=False)
    bn = lambda g: np.concatenate([n.params["mean"] for n in g.nodes_of("BatchNormalization")])
    np.testing.assert_array_equal(bn(a), bn(b))
    assert not np.array_equal(bn(a), bn(c))
    with pytest.raises(ValueError, match="tolerance"):
        dfmpc.quantize_network(resnet20, probe_tolerance=-1.0)


@pytest.mark.parametrize("option, values, bad", [
    ("objective", ("absolute", "relative"), "sigma"),                   # D.1 or D.6
    ("optimizer", ("lbfgs", "adam"), "newton"),                         # how D.6 is minimised
])
def test_quantize_network_passes_the_probe_options_through(resnet20, option, values, bad):
    """quantize_network(probe_objective=/probe_optimizer=) makes the probes of probe_inputs(objective=/
    optimizer=) (same re-calibrated network, D.1 or D.6); the two values give different probes, so the
    probe cache keeps them apart (negative control: asked in either order, each value gets its own
    statistics); an unknown value is refused, naming the option."""
    import dfmpc
    bn = lambda g: np.concatenate([n.params["mean"] for n in g.nodes_of("BatchNormalization")])
    kw = dict(compensation="none", probe_images=2, probe_iterations=3, probe_tolerance=None, progress=False)
    for value in values + values[:1]:
        x = probes.probe_inputs(resnet20, n=2, seed=0, iterations=3, tolerance=None, **{option: value})
        a, _ = dfmpc.quantize_network(resnet20, **{f"probe_{option}": value}, **kw)
        b, _ = dfmpc.quantize_network(resnet20, probes=x, progress=False, compensation="none")
        np.testing.assert_array_equal(bn(a), bn(b))
    first, _ = dfmpc.quantize_network(resnet20, **{f"probe_{option}": values[0]}, **kw)
    second, _ = dfmpc.quantize_network(resnet20, **{f"probe_{option}": values[1]}, **kw)
    assert not np.array_equal(bn(first), bn(second))
    with pytest.raises(ValueError, match=option):
        dfmpc.quantize_network(resnet20, **{f"probe_{option}": bad}, **kw)


def test_make_probes_reports_how_the_probes_were_made(resnet20):
    """make_probes returns the images of probe_inputs with the steps of the run kept and its D.5
    mismatch; noise has neither. quantize_network names them in its report (negative control: a
    different budget gives a different label)."""
    import dfmpc
    from dfmpc.pipeline import probes_label, views_label
    r = probes.make_probes(resnet20, n=2, seed=0, iterations=2, tolerance=10.0)
    assert r.iterations == 2 and r.budgets == [2] and r.mismatch == probes.bn_mismatch(resnet20, r.x)
    np.testing.assert_array_equal(r.x, probes.probe_inputs(resnet20, n=2, seed=0, iterations=2, tolerance=10.0))
    noise = probes.make_probes(resnet20, n=3, kind="noise")
    assert noise.iterations == 0 and noise.mismatch is None and noise.x.shape == (3, 1, 28, 28)
    assert probes_label("distilled", r) == f"distilled (2 images, 2 steps, BN mismatch {r.mismatch:.3f})"
    assert probes_label("noise", noise) == "noise (3 images)"
    _, rep = dfmpc.quantize_network(resnet20, compensation="none", probe_images=2, probe_iterations=2,
                                    probe_tolerance=10.0, progress=False)
    assert rep.probes == probes_label("distilled", r) + views_label(4) and "2 steps" in rep.summary()
    _, rep3 = dfmpc.quantize_network(resnet20, compensation="none", probe_images=2, probe_iterations=3,
                                     probe_tolerance=10.0, progress=False)
    assert rep3.probes != rep.probes and "3 steps" in rep3.probes


# ------------------------------------------------------------------------ S.4: shifted views

@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, len(probes.PROBE_SHIFTS)))
def test_shifted_views_are_circular_shifts_of_each_image(seed, n, c, h, w, views):
    """S.4: view k of image i is image i rolled by PROBE_SHIFTS[k] quarters of the image (H // 4, W // 4 pixels;
    checked pixel by pixel against index arithmetic, any size, wrap-around included); view 0 is the image
    itself; views come view after view."""
    h, w = 4 * h, 4 * w + 3                       # a quarter of 4h is h pixels; of 4w + 3 it is w (rounded down)
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    v = probes.shifted_views(x, views)
    assert v.shape == (views * n, c, h, w) and v.dtype == np.float32 and v.flags.c_contiguous
    assert probes.view_shifts((h, w), views) == [(a * (h // 4), b * (w // 4)) for a, b in probes.PROBE_SHIFTS[:views]]
    for k, (a, b) in enumerate(probes.PROBE_SHIFTS[:views]):
        dy, dx = a * (h // 4), b * (w // 4)
        for i in range(h):
            for j in range(w):
                np.testing.assert_array_equal(v[k * n:(k + 1) * n, :, (i + dy) % h, (j + dx) % w], x[:, :, i, j])
    np.testing.assert_array_equal(v[:n], x)


def test_shifted_views_refuse_bad_arguments():
    x = np.zeros((2, 1, 4, 4), np.float32)
    for bad in (0, 5, 1.5, True, None):
        with pytest.raises(ValueError, match="views"):
            probes.shifted_views(x, bad)
    with pytest.raises(ValueError, match="x: expected"):
        probes.shifted_views(x.astype(np.float64), 2)


def test_quantize_network_uses_the_views_of_its_probes(resnet20, monkeypatch):
    """S.5-S.6 in the pipeline: by default the sequential pass runs on DEFAULT_PROBE_VIEWS = 4 views of each
    distilled or given probe image and on noise probes alone; ``probe_views`` overrides it, and the report
    says so; a bad value is refused before any work (negative control: with one view the re-calibrated
    network differs)."""
    import dfmpc
    import dfmpc.recalibration as R
    from dfmpc.pipeline import DEFAULT_PROBE_VIEWS, default_views
    assert DEFAULT_PROBE_VIEWS == 4
    assert (default_views("distilled"), default_views("noise"), default_views(np.zeros((1, 1, 4, 4), np.float32))) == (4, 1, 4)
    seen = []
    real_init = R.RecalibrationContext.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        seen.append(None if self.probes is None else (len(self.probes), self.n_images))
    monkeypatch.setattr(R.RecalibrationContext, "__init__", spy)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    q4, rep4 = dfmpc.quantize_network(resnet20, compensation="none", probes=x)
    q1, rep1 = dfmpc.quantize_network(resnet20, compensation="none", probes=x, probe_views=1)
    _, repn = dfmpc.quantize_network(resnet20, compensation="none", probes="noise", probe_images=5)
    _, repn2 = dfmpc.quantize_network(resnet20, compensation="none", probes="noise", probe_images=5, probe_views=2)
    assert seen == [(12, 3), (3, 3), (5, 5), (10, 5)]
    assert rep4.probes == "given (3 images), 4 mirrored views each for the variance" and rep1.probes == "given (3 images)"
    assert repn.probes == "noise (5 images)" and repn2.probes == "noise (5 images), 2 mirrored views each for the variance"
    assert not np.array_equal(q4.run(x), q1.run(x))
    for bad in (0, 5, 2.0, True, "4"):
        with pytest.raises(ValueError, match="probe_views"):
            dfmpc.quantize_network(resnet20, probes="distilled", probe_views=bad)


# ------------------------------------------------------------------------ S.6: mirrored views (derivation 15)

@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, len(probes.PROBE_MIRRORS)))
def test_mirrored_views_are_the_mirror_images_of_each_image(seed, n, c, h, w, views):
    """S.6 (derivation 15, "Mirrored views"): view k of image i is image i with its rows and/or columns
    reversed as PROBE_MIRRORS[k] says (checked pixel by pixel against index arithmetic, any size); view 0 is
    the image itself; views come view after view; ``make_views`` dispatches on the kind, mirrors by default."""
    assert probes.PROBE_MIRRORS == ((False, False), (False, True), (True, False), (True, True))
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    v = probes.mirrored_views(x, views)
    assert v.shape == (views * n, c, h, w) and v.dtype == np.float32 and v.flags.c_contiguous
    for k, (rows, cols) in enumerate(probes.PROBE_MIRRORS[:views]):
        for i in range(h):
            for j in range(w):
                np.testing.assert_array_equal(v[k * n:(k + 1) * n, :, h - 1 - i if rows else i, w - 1 - j if cols else j],
                                              x[:, :, i, j])
    np.testing.assert_array_equal(v[:n], x)
    assert probes.DEFAULT_VIEW_KIND == "mirrors"
    np.testing.assert_array_equal(probes.make_views(x, views), v)
    np.testing.assert_array_equal(probes.make_views(x, views, "shifts"), probes.shifted_views(x, views))


def test_mirrored_views_refuse_bad_arguments():
    x = np.zeros((2, 1, 4, 4), np.float32)
    for bad in (0, 5, 1.5, True, None):
        with pytest.raises(ValueError, match="views"):
            probes.mirrored_views(x, bad)
    with pytest.raises(ValueError, match="x: expected"):
        probes.mirrored_views(x.astype(np.float64), 2)
    for bad in ("rolls", None, 1, "Mirrors"):
        with pytest.raises(ValueError, match="kind: expected one of"):
            probes.make_views(x, 2, bad)


def test_quantize_network_uses_the_mirrored_views_by_default_and_the_shifts_when_asked(resnet20, monkeypatch):
    """S.6 in the pipeline: by default the sequential pass runs on the images followed by their mirror images
    (the batch the context receives is ``mirrored_views`` of the probes, the images counted for S.1); with
    ``probe_view_kind="shifts"`` on ``shifted_views`` (S.4). The report says which, and the two networks differ
    (negative control); a bad kind is refused by name before any work."""
    import dfmpc
    import dfmpc.recalibration as R
    seen = []
    real_init = R.RecalibrationContext.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        seen.append((self.probes, self.n_images))
    monkeypatch.setattr(R.RecalibrationContext, "__init__", spy)
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    qm, repm = dfmpc.quantize_network(resnet20, compensation="none", probes=x)
    qs, reps = dfmpc.quantize_network(resnet20, compensation="none", probes=x, probe_view_kind="shifts")
    np.testing.assert_array_equal(seen[0][0], probes.mirrored_views(x, 4))
    np.testing.assert_array_equal(seen[1][0], probes.shifted_views(x, 4))
    assert seen[0][1] == seen[1][1] == 3
    assert repm.probes == "given (3 images), 4 mirrored views each for the variance"
    assert reps.probes == "given (3 images), 4 shifted views each for the variance"
    assert not np.array_equal(qm.run(x), qs.run(x))
    _, rep1 = dfmpc.quantize_network(resnet20, compensation="none", probes=x, probe_views=1, probe_view_kind="shifts")
    assert rep1.probes == "given (3 images)"
    for bad in ("rolls", "", None, 2):
        with pytest.raises(ValueError, match="probe_view_kind"):
            dfmpc.quantize_network(resnet20, probes="distilled", probe_view_kind=bad)
