"""dfmpc.plotting: each figure function draws the arrays it is given (Agg backend), and import dfmpc stays matplotlib-free."""

import subprocess
import sys

import numpy as np
import pytest

import matplotlib  # the test extra installs it; a missing one must fail, not skip
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import dfmpc  # noqa: E402
from dfmpc import landscape, plotting  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _lines_x(ax):
    return [np.asarray(line.get_xdata(), float) for line in ax.get_lines()]


def test_import_dfmpc_does_not_import_matplotlib():
    """`import dfmpc` (and `import dfmpc.plotting`) must work without loading matplotlib."""
    code = "import sys, dfmpc, dfmpc.plotting; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_quantizer_histogram_draws_levels_and_thresholds():
    """Eq. (3): one vertical line per level and per threshold, the histogram counts every weight."""
    W = np.random.default_rng(0).normal(size=(4, 3, 3, 3))
    W_hat, alpha, delta = dfmpc.ternary(W)
    fig = plotting.fig_quantizer_histogram(W, alpha * np.array([-1, 0, 1]), [-delta, delta])
    ax = fig.axes[0]
    xs = sorted(float(x[0]) for x in _lines_x(ax))
    assert np.allclose(xs, sorted([-alpha, 0, alpha, -delta, delta]))
    assert sum(p.get_height() for p in ax.patches) == W.size


def test_quantization_error_plots_given_points():
    fig = plotting.fig_quantization_error([3, 4, 6], [0.3, 0.1, 0.02], ternary_error=0.5)
    lines = fig.axes[0].get_lines()
    assert np.allclose(lines[0].get_ydata(), [0.3, 0.1, 0.02])
    assert np.allclose(lines[1].get_ydata(), [0.5])


def test_bound_check_marks_violations():
    """Points above the diagonal are drawn as violations (negative control for the Lemma plots)."""
    fig = plotting.fig_bound_check([0.5, 2.0, 1.0], [1.0, 1.0, 1.0])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "holds (2)" in labels and "violated (1)" in labels
    with pytest.raises(ValueError):
        plotting.fig_bound_check([1.0], [1.0, 2.0])


def test_objective_curves_one_panel_per_channel_with_markers():
    """Eq. (22) curves: K panels, the closed-form c (27) drawn where given."""
    c = np.linspace(0, 2, 21)
    losses = (c[:, None] - np.array([0.8, 1.1])) ** 2
    fig = plotting.fig_objective_curves(c, losses, [0.8, 1.1], [0.8, 1.1], c_oracle=[1.2, 1.3],
                                        true_losses=losses * 3, channels=[3, 7])
    main = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in main] == ["channel j = 3", "channel j = 7"]
    assert np.allclose(main[0].get_lines()[0].get_ydata(), losses[:, 0])
    vlines = [x[0] for x in _lines_x(main[1]) if len(x) == 2 and x[0] == x[1]]
    assert 1.1 in vlines and 1.3 in vlines
    assert len(fig.axes) == 4                          # two twin axes for the true loss
    with pytest.raises(ValueError):
        plotting.fig_objective_curves(c, losses[:5], [1, 1], [1, 1])


def test_c_scatter():
    fig = plotting.fig_c_scatter([0.9, 1.0], [1.1, 1.2])
    assert np.allclose(fig.axes[0].collections[0].get_offsets(), [[0.9, 1.1], [1.0, 1.2]])


def test_pairing_bars_colour_by_role():
    fig = plotting.fig_pairing(["a", "b", "c"], ["alone", "low", "high"], [10, 100, 50], bits=[6, 2, 6])
    bars = fig.axes[0].patches
    assert [b.get_width() for b in bars] == [10, 100, 50]
    assert bars[1].get_facecolor() == matplotlib.colors.to_rgba(plotting.COLORS["low"])
    with pytest.raises(ValueError):
        plotting.fig_pairing(["a"], ["low", "high"], [1])


def test_accuracy_bars_in_percent():
    fig = plotting.fig_accuracy_bars(["FP32", "q"], [0.9, 0.5])
    assert [round(b.get_height(), 6) for b in fig.axes[0].patches] == [90.0, 50.0]


def test_c_distribution_one_box_per_pair():
    cs = [np.array([0.8, 0.9, 1.0]), np.array([1.0, 1.2])]
    fig = plotting.fig_c_distribution(["p0", "p1"], cs)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["p0", "p1"]
    pts = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])
    assert sorted(pts) == sorted(np.concatenate(cs))


def test_variance_ratios_one_line_per_mode():
    fig = plotting.fig_variance_ratios(["a", "b", "c"], {"analytic": [0.1, 0.3, 0.6], "sequential": [0.0, 0.02, -0.01]})
    ys = [np.asarray(line.get_ydata(), float) for line in fig.axes[0].get_lines()]
    np.testing.assert_allclose(ys[0], [0.1, 0.3, 0.6])
    np.testing.assert_allclose(ys[1], [0.0, 0.02, -0.01])
    with pytest.raises(ValueError, match="expected 3 values"):
        plotting.fig_variance_ratios(["a", "b", "c"], {"x": [0.1]})


def test_weight_histograms_fig4_counts_and_means():
    """Fig. 4: both histograms count every weight; the legend gives mean |w| of Eq. (7)'s compensated weights."""
    rng = np.random.default_rng(1)
    Wq = rng.normal(size=(8, 4, 3, 3))
    c = rng.uniform(0.5, 1.0, 4)
    Wc = dfmpc.scale_input_channels(Wq, c)
    fig = plotting.fig_weight_histograms([Wq], [Wc], titles=["pair"])
    ax = fig.axes[0]
    assert len(ax.patches) == 2                               # one outline per histogram
    edges = np.linspace(min(Wq.min(), Wc.min()), max(Wq.max(), Wc.max()), 41 + 1)
    for patch, w in zip(ax.patches, (Wq, Wc)):
        counts = np.histogram(w, edges)[0]
        assert counts.sum() == w.size
        assert np.isclose(patch.get_path().vertices[:, 1].max(), counts.max())
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"{np.abs(Wc).mean():.4f}" in texts[1]
    with pytest.raises(ValueError):
        plotting.fig_weight_histograms([Wq], [])


def test_lambda_sweep_fig3_lines_and_references():
    """Fig. 3: one line per lambda2 holding the accuracy column, plus the reference lines."""
    l1, l2 = [0.1, 0.5], [0.0, 0.01, 0.1]
    acc = np.array([[0.6, 0.5, 0.4], [0.7, 0.6, 0.5]])
    fig = plotting.fig_lambda_sweep(l1, l2, acc, references={"c = 1": 0.8})
    lines = fig.axes[0].get_lines()
    assert len(lines) == 4
    assert np.allclose(lines[1].get_ydata(), 100 * acc[:, 1])
    assert np.allclose(lines[3].get_ydata(), [80, 80])
    with pytest.raises(ValueError):
        plotting.fig_lambda_sweep(l1, l2, acc.T)


def test_loss_landscape_figures():
    """Fig. 5: the 1-D curves and the 2-D contour panels."""
    a = np.linspace(-1, 1, 5)
    fig = plotting.fig_loss_landscape_1d(a, {"x": a**2, "y": a**2 + 1})
    assert np.allclose(fig.axes[0].get_lines()[1].get_ydata(), a**2 + 1)
    Z = a[:, None] ** 2 + a[None, :] ** 2
    fig = plotting.fig_loss_landscape_2d(a, a, {"before": Z, "after": Z + 0.1})
    assert [ax.get_title() for ax in fig.axes] == ["before", "after"]
    with pytest.raises(ValueError):
        plotting.fig_loss_landscape_2d(a, a[:3], {"z": Z})


def test_logit_agreement_title_has_max_difference():
    fig = plotting.fig_logit_agreement(np.zeros((2, 3)), np.full((2, 3), 1e-3))
    assert "1.00e-03" in fig.axes[0].get_title()


def test_draws_into_given_axes():
    fig, axes = plt.subplots(1, 2)
    assert plotting.fig_accuracy_bars(["a"], [0.5], ax=axes[0]) is fig
    assert plotting.fig_weight_histograms([np.ones(3)], [np.ones(3)], axes=[axes[1]]) is fig


def test_filter_normalized_directions_and_perturb():
    """Li et al.'s filter normalisation: each direction filter has its weight filter's norm; perturb is W + a d1 + b d2."""
    from dfmpc.engine.builders import resnet_cifar
    g = resnet_cifar(depth=8, seed=0)
    d1 = landscape.filter_normalized_directions(g, seed=1)
    d2 = landscape.filter_normalized_directions(g, seed=2)
    assert set(d1) == {n.name for n in g.nodes if n.op in ("Conv", "Gemm")}
    for name, d in d1.items():
        W = g.node(name).params["W"].astype(float)
        ax = tuple(range(1, W.ndim))
        assert np.allclose(np.linalg.norm(d.reshape(len(d), -1), axis=1), np.sqrt((W**2).sum(axis=ax)))
    name = next(iter(d1))
    g2 = landscape.perturb(g, d1, 0.5, d2, -0.25)
    expect = g.node(name).params["W"] + 0.5 * d1[name] - 0.25 * d2[name]
    assert np.allclose(g2.node(name).params["W"], expect, atol=1e-6)
    assert g.node(name).params["W"] is not g2.node(name).params["W"]


def test_cross_entropy():
    logits = np.array([[0.0, 0.0], [10.0, 0.0]])
    assert np.isclose(landscape.cross_entropy(logits, [0, 0]), (np.log(2) + np.log1p(np.exp(-10))) / 2)


@pytest.mark.slow          # ~30-40 s: regenerates every README figure
def test_make_figures_regenerates_the_readme_figures(tmp_path):
    """scripts/make_figures.py writes the README's PNGs (Fig. 3 from the stored sweeps, Fig. 4 on ResNet-20)."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = dict(__import__("os").environ, MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, str(root / "scripts" / "make_figures.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("lambda_sweep.png", "weight_histograms.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert (root / "docs" / "figures" / name).exists(), f"docs/figures/{name} is not committed"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_landscape_helpers_refuse_bad_input():
    """cross_entropy and perturb name the bad argument."""
    with pytest.raises(ValueError, match="y: expected 2 integer labels"):
        landscape.cross_entropy(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="logits"):
        landscape.cross_entropy(np.zeros(3), [0])
    with pytest.raises(ValueError, match="alpha"):
        landscape.perturb(dfmpc.engine.builders.resnet_cifar(8), {}, float("nan"))
    with pytest.raises(TypeError, match="graph"):
        landscape.filter_normalized_directions("net")
