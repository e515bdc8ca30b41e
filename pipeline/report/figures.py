"""The report's figures: matplotlib on the Agg backend, one PNG per figure.

Every figure has labelled axes with values, so a PNG read on its own (attached to an
issue, say) still says what it shows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display, the same PNG everywhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.report.accumulate import ParamCounts  # noqa: E402
from pipeline.report.distributions import Categorical, Fit  # noqa: E402

OBSERVED, EXPECTED, BAD, OTHER = "#4c72b0", "#dd8452", "#c44e52", "#8c8c8c"
DPI = 96


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def fit_words(fit: Fit) -> str:
    if fit.p_value is None:
        return f"{'χ²' if fit.test == 'chi2' else 'KS'}: {fit.note or 'no test'}"
    if fit.test == "chi2":
        stat = "∞" if math.isinf(fit.statistic or 0) else f"{fit.statistic:.2f}"
        head = f"χ² = {stat}" + (f", {fit.dof} dof" if fit.dof else "")
    else:
        head = f"KS D = {fit.statistic:.3f}"
    return f"{head}, p = {fit.p_value:.3g}"


def param_figure(pc: ParamCounts, fit: Fit, flagged: bool, path: Path) -> Path:
    """Left: the draws with the law the settings ask for; right: the test's own picture
    (standardised residuals for χ², the empirical against the expected CDF for KS)."""
    fig, (ax, gof) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    unit = f" ({pc.spec.unit})" if pc.spec.unit else ""
    if isinstance(pc.spec.dist, Categorical):
        cats = pc.categories()
        obs = np.array([pc.counts.get(c, 0) for c in cats], dtype=float)
        exp = np.array(pc.expected_counts() + [0.0] * (len(cats) - len(pc.spec.dist.categories)))
        x = np.arange(len(cats))
        ax.bar(x, obs, color=OBSERVED, label="drawn")
        ax.plot(x, exp, "o", color=EXPECTED, label="settings ask for")
        step = max(1, len(cats) // 16)
        ax.set_xticks(x[::step], [c.replace("_", " ") for c in cats][::step],
                      rotation=30 if max(map(len, cats)) > 5 else 0, ha="right" if max(map(len, cats)) > 5 else "center",
                      fontsize=8)
        with np.errstate(divide="ignore", invalid="ignore"):
            resid = np.where(exp > 0, (obs - exp) / np.sqrt(exp), 0.0)
        gof.bar(x, resid, color=[BAD if abs(r) > 3 else OTHER for r in resid])
        gof.axhline(0, color="black", lw=0.8)
        for y in (-2, 2):
            gof.axhline(y, color=OTHER, lw=0.8, ls="--")
        gof.set_xticks(x[::step], cats[::step], rotation=30 if max(map(len, cats)) > 5 else 0, fontsize=7)
        gof.set_ylabel("(drawn − expected) / √expected")
    else:
        edges = pc.hist.edges
        ax.bar(edges[:-1], pc.hist.counts, width=np.diff(edges), align="edge", color=OBSERVED,
               edgecolor="white", lw=0.5, label="drawn")
        ax.step(edges, np.r_[pc.expected_counts(), pc.expected_counts()[-1:]], where="post",
                color=EXPECTED, lw=2, label="settings ask for")
        ax.set_xlabel(f"value{unit}")
        grid = np.linspace(0, 1, 101)
        if pc.grid is not None and pc.grid.sum():
            cum = np.concatenate([[0], np.cumsum(pc.grid)]) / pc.grid.sum()
            u = np.linspace(0, 1, len(pc.grid) + 1)
            gof.plot(u, cum, color=OBSERVED, lw=1.5, label="drawn")
            gof.plot(grid, grid, color=EXPECTED, lw=1, ls="--", label="expected")
            gof.set_xlabel("expected CDF F(x)")
            gof.set_ylabel("fraction of draws ≤ x")
            gof.legend(fontsize=7, loc="upper left")
        else:
            exp = np.asarray(pc.expected_counts())
            with np.errstate(divide="ignore", invalid="ignore"):
                resid = np.where(exp > 0, (pc.hist.counts - exp) / np.sqrt(exp), 0.0)
            gof.bar(edges[:-1], resid, width=np.diff(edges), align="edge",
                    color=[BAD if abs(r) > 3 else OTHER for r in resid])
            gof.axhline(0, color="black", lw=0.8)
            gof.set_xlabel(f"value{unit}")
            gof.set_ylabel("(drawn − expected) / √expected")
    ax.set_ylabel("draws")
    ax.set_title(f"{pc.spec.label}: {pc.n} draws", fontsize=10)
    ax.legend(fontsize=7)
    verdict = "DOES NOT FIT" if flagged else ("fits" if fit.p_value is not None else "not tested")
    gof.set_title(f"{fit_words(fit)} — {verdict}", fontsize=9, color=BAD if flagged else "black")
    fig.tight_layout()
    return _save(fig, path)


def fit_overview(names: Sequence[str], p_values: Sequence[float | None], threshold: float, path: Path) -> Path:
    """−log10 p of every parameter's test against the (Bonferroni) threshold."""
    vals = [(-math.log10(max(p, 1e-300)) if p is not None else 0.0) for p in p_values]
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.2 * len(names) + 1)))
    y = np.arange(len(names))
    colours = [BAD if (p is not None and p < threshold) else (OTHER if p is None else OBSERVED) for p in p_values]
    ax.barh(y, [min(v, 50) for v in vals], color=colours)
    ax.axvline(-math.log10(threshold), color=BAD, ls="--", lw=1, label=f"flag: p < {threshold:.2g}")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("−log10 p (capped at 50; grey: too few draws to test)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Goodness of fit of every draw to the degrade settings", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def psnr_figure(lq: dict[str, Any], roundtrip: dict[str, Any], reference: dict[str, Any], path: Path) -> Path:
    """LQ quality histogram beside the plain bicubic round trip and BasicSR's reference."""
    fig, ax = plt.subplots(figsize=(10, 3.6))
    edges = np.asarray(lq["histogram"]["edges"])
    for h, colour, label in ((roundtrip, OTHER, "bicubic ×4 round trip of the HQ"),
                             (lq, OBSERVED, "this build: bicubic-upsampled LQ vs HQ")):
        m = h["moments"]
        if not m["n"]:
            continue
        counts = np.asarray(h["histogram"]["counts"], dtype=float)
        ax.stairs(counts / counts.sum(), edges, color=colour, fill=h is lq, alpha=0.6 if h is lq else 1.0, lw=1.5,
                  label=f"{label}: mean {m['mean']:.2f} dB, std {m['std'] or 0:.2f}, n {m['n']}")
    mean, std = reference["mean"], reference["std"]
    ax.axvspan(mean - std, mean + std, color=EXPECTED, alpha=0.15)
    ax.axvline(mean, color=EXPECTED, lw=2, label=f"BasicSR 1.4.2 reference: mean {mean} dB ± std {std} (n {reference['n']})")
    used = edges[:-1][np.asarray(lq["histogram"]["counts"]) + np.asarray(roundtrip["histogram"]["counts"]) > 0]
    lo = min(float(used.min()) if used.size else 10.0, mean - 2 * std) - 1
    hi = max(float(used.max()) + 1.5 if used.size else 40.0, mean + 2 * std)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("PSNR (dB, RGB, peak 255)")
    ax.set_ylabel("fraction of pairs")
    ax.legend(fontsize=8)
    ax.set_title("LQ quality", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def bar_figure(title: str, labels: Sequence[str], counts: Sequence[float], path: Path, xlabel: str = "rows",
               horizontal: bool = True) -> Path:
    fig, ax = plt.subplots(figsize=(8, max(2.2, 0.28 * len(labels) + 1)) if horizontal else (8, 3))
    if horizontal:
        y = np.arange(len(labels))
        ax.barh(y, counts, color=OBSERVED)
        ax.set_yticks(y, [str(v) if len(str(v)) <= 32 else str(v)[:31] + "…" for v in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        for yi, c in zip(y, counts):
            ax.text(c, yi, f" {c:g}", va="center", fontsize=7)
    else:
        x = np.arange(len(labels))
        ax.bar(x, counts, color=OBSERVED)
        ax.set_xticks(x, [str(v) for v in labels], fontsize=8)
        ax.set_ylabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def count_histogram(title: str, counts: dict[int, int], xlabel: str, path: Path,
                    marks: Sequence[tuple[float, str]] = ()) -> Path:
    """A histogram of small integers (caption lengths), with labelled vertical marks."""
    fig, ax = plt.subplots(figsize=(8, 3))
    if counts:
        xs = np.arange(min(counts), max(counts) + 1)
        ax.bar(xs, [counts.get(int(x), 0) for x in xs], width=1.0, color=OBSERVED, edgecolor="white", lw=0.3)
    for x, label in marks:
        ax.axvline(x, color=BAD, ls="--", lw=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {label}", color=BAD, fontsize=8, va="top")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def training_figure(steps: np.ndarray, panels: Sequence[tuple[str, np.ndarray, np.ndarray | None, str]],
                    path: Path) -> Path:
    """One panel per series against the step: raw (thin) and smoothed (thick) where given."""
    n = len(panels)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.6 * rows), squeeze=False)
    for ax, (name, raw, smoothed, ylabel) in zip(axes.flat, panels):
        ax.plot(steps, raw, color=OBSERVED, lw=0.8, alpha=0.5 if smoothed is not None else 1.0,
                marker="." if len(steps) < 60 else None, label="raw")
        if smoothed is not None:
            ax.plot(steps, smoothed, color=EXPECTED, lw=2, label="smoothed (EMA 0.9)")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
