"""Figures for the notebooks and the README (matplotlib, optional: ``pip install dfmpc[plot]``).

Every ``fig_*`` function draws arrays that the caller computed with :mod:`dfmpc`; none of them
computes any part of the method. Each takes an optional ``ax`` (or ``axes``) to draw into and
returns the :class:`matplotlib.figure.Figure`. matplotlib is imported lazily, inside the
functions, so ``import dfmpc`` (and even ``import dfmpc.plotting``) never imports it.

The two helpers at the end (:func:`filter_normalized_directions`, :func:`perturb`) and
:func:`cross_entropy` produce the *data* of a loss-landscape slice (Li et al., "Visualizing
the Loss Landscape of Neural Nets", NeurIPS 2018): a visualisation device, not part of DF-MPC.

Paper figures reproduced: Fig. 3 (:func:`fig_lambda_sweep`), Fig. 4
(:func:`fig_weight_histograms`), Fig. 5 (:func:`fig_loss_landscape_1d`,
:func:`fig_loss_landscape_2d`); Fig. 2's pairing pattern is drawn by :func:`fig_pairing`.
Regenerate the README figures with ``python scripts/make_figures.py``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "fig_quantizer_histogram", "fig_quantization_error", "fig_bound_check", "fig_objective_curves",
    "fig_c_scatter", "fig_pairing", "fig_accuracy_bars", "fig_c_distribution", "fig_weight_histograms",
    "fig_lambda_sweep", "fig_loss_landscape_1d", "fig_loss_landscape_2d", "fig_logit_agreement",
    "filter_normalized_directions", "perturb", "cross_entropy",
]

#: One colour per role, used throughout.
COLORS = {"fp32": "#4d4d4d", "low": "#d62728", "high": "#1f77b4", "alone": "#9e9e9e",
          "before": "#ff7f0e", "after": "#2ca02c", "oracle": "#9467bd"}


def _axes(ax=None, nrows=1, ncols=1, figsize=None):
    """(figure, axes): the given axes' figure, or a new pyplot figure (shown inline in Jupyter)."""
    if ax is not None:
        return (ax.flat[0] if isinstance(ax, np.ndarray) else
                ax[0] if isinstance(ax, (list, tuple)) else ax).figure, ax
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=(nrows * ncols == 1))
    return fig, axes


def _flat_axes(axes, n):
    axes = list(np.ravel(axes)) if isinstance(axes, (np.ndarray, list, tuple)) else [axes]
    if len(axes) < n:
        raise ValueError(f"axes: expected at least {n} axes, got {len(axes)}")
    return axes[:n]


# ----------------------------------------------------------------------------- quantizers

def fig_quantizer_histogram(W, levels, thresholds=(), title=None, ax=None, bins=80):
    """Histogram of a layer's weights with the quantizer's levels on top (illustrates Eq. (3)-(4), (6)).

    Parameters
    ----------
    W : array_like, any shape
        Full-precision weights of one layer (flattened here).
    levels : array_like, shape (L,)
        The quantization levels *in weight units* (e.g. ``alpha * {-1, 0, 1}`` for TWN,
        ``max|W| * kQ-grid`` for DoReFa): solid vertical lines.
    thresholds : array_like, shape (T,)
        Decision thresholds (e.g. ``+-Delta`` for TWN): dashed vertical lines.
    title : str, optional
    ax : matplotlib Axes, optional
    bins : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, figsize=(6, 3.2))
    w = np.ravel(np.asarray(W, dtype=float))
    ax.hist(w, bins=bins, color=COLORS["fp32"], alpha=0.6, label=f"weights ({w.size})")
    for i, v in enumerate(np.ravel(levels)):
        ax.axvline(v, color=COLORS["low"], lw=1.2, label="quantization levels" if i == 0 else None)
    for i, t in enumerate(np.ravel(thresholds)):
        ax.axvline(t, color="k", ls="--", lw=1.0, label="thresholds" if i == 0 else None)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def fig_quantization_error(bits, errors, ternary_error=None, ax=None):
    """Relative quantization error ``||W - W_q|| / ||W||`` against the bit-width (Eq. (6); TWN as a point).

    Parameters
    ----------
    bits : array_like, shape (B,)
        Bit-widths of the DoReFa quantizer.
    errors : array_like, shape (B,)
        Relative error at each bit-width.
    ternary_error : float, optional
        Relative error of TWN ternary (drawn at 2 bits, ``log2(3) ~ 1.6`` bits of information).
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, figsize=(4.5, 3.2))
    ax.semilogy(bits, errors, "o-", color=COLORS["high"], label="DoReFa kQ, Eq. (6)")
    if ternary_error is not None:
        ax.semilogy([2], [ternary_error], "s", ms=8, color=COLORS["low"], label="TWN ternary, Eq. (3)-(4)")
    ax.set_xlabel("bits k")
    ax.set_ylabel(r"$\|W - W_q\| / \|W\|$")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------- one pair

def fig_bound_check(lhs, rhs, title=None, xlabel="bound (right-hand side)", ylabel="left-hand side", ax=None,
                    max_points=20000, seed=0):
    """Scatter of ``lhs`` against ``rhs`` with the diagonal: an inequality ``lhs <= rhs`` holds where every
    point is on or below it (used for Lemma 1 and Lemma 2).

    Parameters
    ----------
    lhs, rhs : array_like, same shape (any)
        Both sides of the inequality, one point per entry (subsampled to ``max_points``).
    title, xlabel, ylabel : str
    ax : matplotlib Axes, optional
    max_points : int
    seed : int
        For the subsample.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, figsize=(4.2, 4))
    lhs, rhs = np.ravel(np.asarray(lhs, float)), np.ravel(np.asarray(rhs, float))
    if lhs.shape != rhs.shape:
        raise ValueError(f"lhs, rhs: expected the same number of entries, got {lhs.size} and {rhs.size}")
    if lhs.size > max_points:
        keep = np.random.default_rng(seed).choice(lhs.size, max_points, replace=False)
        lhs, rhs = lhs[keep], rhs[keep]
    ok = lhs <= rhs * (1 + 1e-9) + 1e-12
    ax.scatter(rhs[ok], lhs[ok], s=4, alpha=0.4, color=COLORS["high"], label=f"holds ({ok.sum()})")
    if (~ok).any():
        ax.scatter(rhs[~ok], lhs[~ok], s=8, color=COLORS["low"], label=f"violated ({(~ok).sum()})")
    hi = max(float(rhs.max(initial=0)), float(lhs.max(initial=0))) or 1.0
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="lhs = rhs")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def fig_objective_curves(c_grid, losses, c_closed, c_numeric, c_oracle=None, true_losses=None,
                         channels=None, true_grid=None, axes=None):
    """The data-free objective ``L_j(c_j)`` (Eq. (22)) of a few channels, one panel each, with the
    closed-form minimiser (Eq. (27)), a numerical minimiser and the oracle c marked.

    Parameters
    ----------
    c_grid : array_like, shape (T,)
        Values of c_j on the horizontal axis.
    losses : array_like, shape (T, K)
        ``L_j(c)`` for each grid value and each of the K channels shown.
    c_closed, c_numeric : array_like, shape (K,)
        Closed-form c (``dfmpc.compensation_coefficients``) and the ``scipy.optimize`` minimiser.
    c_oracle : array_like, shape (K,), optional
        Oracle c (``dfmpc.oracle_coefficients``: minimiser of the true loss (9) on real data).
    true_losses : array_like, shape (T', K), optional
        The true feature-map loss (9) as c_j alone varies (drawn on a second axis).
    channels : sequence of int, shape (K,), optional
        Channel indices for the panel titles.
    true_grid : array_like, shape (T',), optional
        The c_j values of ``true_losses``; default ``c_grid``.
    axes : sequence of K matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    c_grid = np.asarray(c_grid, float)
    losses = np.asarray(losses, float)
    if losses.ndim != 2 or losses.shape[0] != c_grid.shape[0]:
        raise ValueError(f"losses: expected shape ({c_grid.shape[0]}, K), got {losses.shape}")
    K = losses.shape[1]
    fig, axes = _axes(axes, 1, K, figsize=(3.6 * K, 3.3))
    axes = _flat_axes(axes, K)
    channels = list(range(K)) if channels is None else list(channels)
    c_closed, c_numeric = np.ravel(c_closed), np.ravel(c_numeric)
    for k, ax in enumerate(axes):
        ax.plot(c_grid, losses[:, k], color=COLORS["high"], label=r"data-free $L_j(c_j)$, Eq. (22)")
        Lc = np.interp(c_closed[k], c_grid, losses[:, k])
        ax.axvline(c_closed[k], color=COLORS["after"], lw=2, alpha=0.7, label=f"closed form (27): {c_closed[k]:.3f}")
        ax.plot([c_numeric[k]], [np.interp(c_numeric[k], c_grid, losses[:, k])], "kx", ms=9, mew=2,
                label=f"scipy.optimize: {c_numeric[k]:.3f}")
        ax.plot([c_closed[k]], [Lc], "o", color=COLORS["after"], ms=5)
        ax.axvline(1.0, color=COLORS["before"], ls=":", lw=1.5, label="c = 1 (no compensation)")
        if c_oracle is not None:
            co = float(np.ravel(c_oracle)[k])
            ax.axvline(co, color=COLORS["oracle"], ls="--", lw=1.5, label=f"oracle c: {co:.3f}")
        ax.set_xlabel("$c_j$")
        ax.set_title(f"channel j = {channels[k]}")
        if k == 0:
            ax.set_ylabel("data-free loss")
        if true_losses is not None:
            tw = ax.twinx()
            tg = c_grid if true_grid is None else np.asarray(true_grid, float)
            tw.plot(tg, np.asarray(true_losses, float)[:, k], ".-", color=COLORS["oracle"], lw=1, alpha=0.8,
                    label="true loss (9), only $c_j$ varied")
            tw.tick_params(axis="y", colors=COLORS["oracle"], labelsize=7)
            if k == K - 1:
                tw.set_ylabel("true feature-map loss (9)", color=COLORS["oracle"])
            if k == 0:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = tw.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=6.5, loc="best", framealpha=0.7)
                continue
        ax.legend(fontsize=6.5, loc="best", framealpha=0.7)
    fig.tight_layout()
    return fig


def fig_c_scatter(c_x, c_y, xlabel="closed-form c, Eq. (27)", ylabel="oracle c (data)", title=None, ax=None):
    """Per-channel comparison of two sets of coefficients, with the diagonal and the lines c = 1.

    Parameters
    ----------
    c_x, c_y : array_like, shape (C,)
    xlabel, ylabel, title : str
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, figsize=(4, 4))
    c_x, c_y = np.ravel(c_x), np.ravel(c_y)
    ax.scatter(c_x, c_y, s=18, color=COLORS["oracle"])
    lo = min(c_x.min(), c_y.min(), 1.0) * 0.95
    hi = max(c_x.max(), c_y.max(), 1.0) * 1.05
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.axvline(1, color=COLORS["before"], ls=":")
    ax.axhline(1, color=COLORS["before"], ls=":")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return fig


# --------------------------------------------------------------------- whole network

def fig_pairing(names, roles, sizes, bits=None, ax=None):
    """Which weight layers are low, high or alone (the paper's Fig. 2 pattern on a real network).

    Parameters
    ----------
    names : sequence of str, length M
        Weight layers (Conv / Gemm) in network order.
    roles : sequence of str, length M
        ``"low"`` (quantized at the low bit-width), ``"high"`` (carries c) or ``"alone"`` (in no pair).
    sizes : array_like, shape (M,)
        Number of weights of each layer (bar length).
    bits : array_like, shape (M,), optional
        Bit-width of each layer (written at the bar's end).
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    M = len(names)
    if len(roles) != M or len(sizes) != M:
        raise ValueError(f"names, roles, sizes: expected the same length, got {M}, {len(roles)}, {len(sizes)}")
    fig, ax = _axes(ax, figsize=(7, 0.28 * M + 1.2))
    y = np.arange(M)[::-1]
    colors = [COLORS.get(r, COLORS["alone"]) for r in roles]
    ax.barh(y, sizes, color=colors)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("number of weights")
    if bits is not None:
        for yi, s, b in zip(y, sizes, bits):
            ax.text(s * 1.08, yi, f"{b}-bit", va="center", fontsize=7)
    from matplotlib.patches import Patch
    labels = {"low": "low (pair, quantized hard)", "high": "high (pair, carries c)", "alone": "in no pair"}
    ax.legend(handles=[Patch(color=COLORS[r], label=labels[r]) for r in ("low", "high", "alone") if r in roles],
              fontsize=7, loc="lower right")
    ax.set_xlim(right=max(sizes) * 4)
    fig.tight_layout()
    return fig


def fig_accuracy_bars(labels, accuracies, title=None, ax=None):
    """Top-1 accuracy of several networks as bars.

    Parameters
    ----------
    labels : sequence of str, length B
    accuracies : array_like, shape (B,)
        Fractions in [0, 1] (printed as percentages).
    title : str, optional
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, figsize=(7, 3.4))
    acc = 100 * np.asarray(accuracies, float)
    bars = ax.bar(np.arange(len(acc)), acc, color=[COLORS["fp32"]] + [COLORS["high"]] * (len(acc) - 1))
    for b, a in zip(bars, acc):
        ax.text(b.get_x() + b.get_width() / 2, a + 1, f"{a:.1f}", ha="center", fontsize=8)
    ax.set_xticks(np.arange(len(acc)))
    ax.set_xticklabels(labels, fontsize=8, rotation=15, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def fig_c_distribution(pair_labels, cs, title=None, ax=None):
    """Distribution of the per-channel c of each pair (box plot with the points), and the line c = 1.

    Parameters
    ----------
    pair_labels : sequence of str, length P
    cs : sequence of P arrays, array p of shape (C_p,)
        The coefficients of pair p (one per channel of its low layer).
    title : str, optional
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    if len(pair_labels) != len(cs):
        raise ValueError(f"pair_labels, cs: expected the same length, got {len(pair_labels)} and {len(cs)}")
    fig, ax = _axes(ax, figsize=(7, 3.4))
    rng = np.random.default_rng(0)
    ax.boxplot([np.ravel(c) for c in cs], showfliers=False)
    for p, c in enumerate(cs, start=1):
        c = np.ravel(c)
        ax.scatter(p + rng.uniform(-0.15, 0.15, c.size), c, s=6, alpha=0.5, color=COLORS["after"])
    ax.axhline(1.0, color=COLORS["before"], ls=":", label="c = 1")
    ax.set_xticks(np.arange(1, len(cs) + 1))
    ax.set_xticklabels(pair_labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("$c_j$")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def fig_variance_ratios(layer_labels, log_ratios, title=None, ax=None):
    """Per layer, log(predicted / measured variance) of each re-calibration mode (``dfmpc.diagnose``).

    Parameters
    ----------
    layer_labels : sequence of str, length L
    log_ratios : dict of str to array_like of shape (L,)
        Mode name -> the layers' ``log_ratio`` (0 = the BN predicts its conv's variance exactly).
    title : str, optional
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    for mode, r in log_ratios.items():
        if len(r) != len(layer_labels):
            raise ValueError(f"log_ratios[{mode!r}]: expected {len(layer_labels)} values, got {len(r)}")
    fig, ax = _axes(ax, figsize=(8, 3.4))
    pos = np.arange(len(layer_labels))
    for mode, r in log_ratios.items():
        ax.plot(pos, np.asarray(r, dtype=float), marker="o", ms=3, label=mode)
    ax.axhline(0.0, color="k", lw=0.8)
    for band in (-0.05, 0.05):
        ax.axhline(band, color="0.6", ls=":", lw=0.8)
    ax.set_xticks(pos)
    ax.set_xticklabels(layer_labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("log(predicted / measured variance)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def fig_weight_histograms(before, after, titles=None, axes=None, bins=41):
    """The paper's Fig. 4: histograms of the high-bit weights before and after compensation.

    Draw the *effective* compensated weights ``dfmpc.scale_input_channels(W_next_q, c)`` (Eq. (7)) against
    the uncompensated ``W_next_q`` (the pipeline folds c into BN^l instead, which is equivalent).

    Parameters
    ----------
    before : sequence of P arrays (any shape, e.g. (O, C, kh, kw))
        Quantized high-bit weights ``kQ(W^{l+1})`` (dequantized), one per panel.
    after : sequence of P arrays, same shapes
        The compensated weights ``c_j kQ(W^{l+1})_{:,j}``.
    titles : sequence of P str, optional
    axes : sequence of P matplotlib Axes, optional
    bins : int, or sequence of P arrays of bin edges
        An int spreads that many bins over each panel's range. The uncompensated weights sit on a
        grid, so edges aligned with it (e.g. every other level of the 2^k-level grid) avoid aliasing.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if len(before) != len(after):
        raise ValueError(f"before, after: expected the same number of layers, got {len(before)} and {len(after)}")
    P = len(before)
    fig, axes = _axes(axes, 1, P, figsize=(3.8 * P, 3.2))
    axes = _flat_axes(axes, P)
    for p, ax in enumerate(axes):
        b, a = np.ravel(np.asarray(before[p], float)), np.ravel(np.asarray(after[p], float))
        if np.ndim(bins) == 0:
            edges = np.linspace(min(b.min(), a.min()), max(b.max(), a.max()), int(bins) + 1)
        else:
            edges = np.asarray(bins[p], float)
        lo, hi = np.percentile(np.concatenate([a, b]), [0.1, 99.9])
        pad = 0.1 * (hi - lo) or 0.1 * max(abs(hi), 1e-3)
        ax.hist(b, bins=edges, color=COLORS["before"], alpha=0.45, histtype="stepfilled",
                label=f"6-bit, no comp.: mean|w| {np.abs(b).mean():.4f}")
        ax.hist(a, bins=edges, color=COLORS["after"], lw=1.8, histtype="step",
                label=f"compensated: mean|w| {np.abs(a).mean():.4f}")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel("weight value")
        if p == 0:
            ax.set_ylabel("count")
        if titles is not None:
            ax.set_title(titles[p], fontsize=9)
        ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    return fig


def fig_lambda_sweep(lambda1, lambda2, accuracy, references=None, title=None, ax=None):
    """The paper's Fig. 3: accuracy against lambda1, one line per lambda2.

    Parameters
    ----------
    lambda1 : array_like, shape (A,)
    lambda2 : array_like, shape (B,)
    accuracy : array_like, shape (A, B)
        Top-1 accuracy (fractions) of the quantized network for each (lambda1, lambda2).
    references : dict of str -> float, optional
        Horizontal reference lines, e.g. ``{"c = 1": 0.85}`` (fractions).
    title : str, optional
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    lambda1, lambda2 = np.ravel(lambda1), np.ravel(lambda2)
    acc = 100 * np.asarray(accuracy, float)
    if acc.shape != (lambda1.size, lambda2.size):
        raise ValueError(f"accuracy: expected shape ({lambda1.size}, {lambda2.size}), got {acc.shape}")
    fig, ax = _axes(ax, figsize=(5, 3.6))
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    for b, l2 in enumerate(lambda2):
        ax.plot(lambda1, acc[:, b], "o-", ms=4, color=cmap(b / max(lambda2.size - 1, 1)),
                label=f"$\\lambda_2$ = {l2:g}")
    styles = iter(["--", "-.", ":", (0, (5, 1))])
    for name, v in (references or {}).items():
        ax.axhline(100 * v, color="k", ls=next(styles, "--"), lw=1, label=name)
    ax.set_xlabel("$\\lambda_1$")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def fig_loss_landscape_1d(alphas, losses, title=None, ax=None):
    """The paper's Fig. 5 as a 1-D slice: loss along a random filter-normalised direction.

    Parameters
    ----------
    alphas : array_like, shape (T,)
        Step sizes along the direction (0 is the network itself).
    losses : dict of str -> array_like, shape (T,)
        One curve per network, e.g. ``{"FP32": ..., "MP2/6, c = 1": ..., "DF-MPC": ...}``.
    title : str, optional
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, figsize=(5, 3.6))
    alphas = np.ravel(alphas)
    for name, L in losses.items():
        L = np.ravel(L)
        if L.shape != alphas.shape:
            raise ValueError(f"losses[{name!r}]: expected shape {alphas.shape}, got {L.shape}")
        ax.plot(alphas, L, "-", label=name)
    ax.set_xlabel(r"$\alpha$ (step along the direction)")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def fig_loss_landscape_2d(alphas, betas, surfaces, levels=12, axes=None):
    """The paper's Fig. 5: contour plots of the loss on a plane of two filter-normalised directions.

    Parameters
    ----------
    alphas : array_like, shape (T,)
    betas : array_like, shape (S,)
    surfaces : dict of str -> array_like, shape (T, S)
        One panel per network; entry ``[t, s]`` is the loss at ``alpha_t d1 + beta_s d2``.
    levels : int
        Contour levels (shared by all panels).
    axes : sequence of matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    alphas, betas = np.ravel(alphas), np.ravel(betas)
    P = len(surfaces)
    fig, axes = _axes(axes, 1, P, figsize=(4 * P, 3.6))
    axes = _flat_axes(axes, P)
    Z = {k: np.asarray(v, float) for k, v in surfaces.items()}
    for k, v in Z.items():
        if v.shape != (alphas.size, betas.size):
            raise ValueError(f"surfaces[{k!r}]: expected shape ({alphas.size}, {betas.size}), got {v.shape}")
    allz = np.concatenate([v.ravel() for v in Z.values()])
    lv = np.linspace(allz.min(), np.percentile(allz, 98), levels)
    for ax, (name, v) in zip(axes, Z.items()):
        cs = ax.contour(betas, alphas, v, levels=lv, cmap="viridis")
        ax.clabel(cs, fontsize=6, fmt="%.2f")
        ax.plot([0], [0], "r+", ms=10)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(r"$\beta$")
        ax.set_ylabel(r"$\alpha$")
    fig.tight_layout()
    return fig


def fig_logit_agreement(reference, other, xlabel="dfmpc engine logits", ylabel="onnxruntime logits", ax=None,
                        max_points=20000):
    """Scatter of two engines' outputs on the same inputs, with the largest absolute difference.

    Parameters
    ----------
    reference, other : array_like, same shape, e.g. (N, classes)
    xlabel, ylabel : str
    ax : matplotlib Axes, optional
    max_points : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    a, b = np.ravel(np.asarray(reference, float)), np.ravel(np.asarray(other, float))
    if a.shape != b.shape:
        raise ValueError(f"reference, other: expected the same shape, got {a.size} and {b.size} entries")
    fig, ax = _axes(ax, figsize=(4, 4))
    step = max(1, a.size // max_points)
    ax.scatter(a[::step], b[::step], s=3, alpha=0.4, color=COLORS["high"])
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"max |difference| = {np.abs(a - b).max():.2e}", fontsize=9)
    return fig
