"""The figures of a convergence study (`mlstm.studies.study`): bpc against steps, characters and seconds, one mean curve
with a band per variant.

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so drawing them changes no global matplotlib
state (backend, current figure) of the calling program and needs no display.
"""

from __future__ import annotations

import math
import textwrap
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from mlstm.studies import convergence as cv
from mlstm.studies.analysis import DatasetAnalysis, StudyOptions
from mlstm.studies.report import scope_line
from mlstm.studies.runs import Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes


METRICS = {"valid/bpc": "validation bpc", "train/bpc": "training bpc"}
AXIS_LABELS = {"steps": "optimizer steps", "chars": "training characters seen", "seconds": "training seconds"}
# one colour per variant in every figure, so a variant is recognised at a glance across datasets and axes
VARIANT_COLOURS = {
    "lstm": "tab:blue",
    "lstm-loop": "tab:cyan",
    "mlstm-paper": "tab:red",
    "mlstm-seed": "tab:orange",
    "mlstm-matlab": "tab:purple",
}
SPARE_COLOURS = ("tab:green", "tab:brown", "tab:pink", "tab:olive", "tab:gray", "black")


def variant_colour(variant: str) -> str:
    """A fixed colour per variant; unknown labels get a colour from a hash of the label, stable across runs."""
    return VARIANT_COLOURS.get(variant) or SPARE_COLOURS[zlib.crc32(variant.encode()) % len(SPARE_COLOURS)]


def final_valid_level(runs: list[Run]) -> float:
    """Mean over seeds of each run's last validation bpc."""
    values = [r.final("valid/bpc") for r in runs]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def draw_panel(ax: Axes, analysis: DatasetAnalysis, metric: str, axis: str, options: StudyOptions) -> None:
    """Mean curve with a band per variant, plus the unigram-entropy and baseline-final reference lines."""
    for variant, runs in analysis.variants.items():
        curves = [run.curve(metric).along(axis) for run in runs]
        curves = [c for c in curves if len(c[0])]
        band = cv.mean_band(curves, options.grid_points, options.band, options.logx)
        colour = variant_colour(variant)
        if band.grid.size < 2 and curves:
            # the seeds share no stretch of this axis (e.g. one seed's warm-up took longer than another's whole
            # run): show each seed rather than nothing
            for i, (x, y) in enumerate(curves):
                ax.plot(
                    x,
                    y,
                    color=colour,
                    lw=0.9,
                    alpha=0.8,
                    label=f"{variant} (each of {len(curves)} seeds; no common range)" if i == 0 else None,
                )
            continue
        ax.plot(band.grid, band.mean, color=colour, lw=1.6, label=f"{variant} (n={band.n_seeds})")
        ax.fill_between(band.grid, band.low, band.high, color=colour, alpha=0.2, lw=0)
    if analysis.unigram_entropy is not None:
        ax.axhline(
            analysis.unigram_entropy,
            color="grey",
            ls="--",
            lw=1,
            label=f"unigram entropy {analysis.unigram_entropy:.2f}",
        )
    if analysis.baseline in analysis.variants:
        level = final_valid_level(analysis.variants[analysis.baseline])
        if math.isfinite(level):
            ax.axhline(
                level,
                color=variant_colour(analysis.baseline),
                ls=":",
                lw=1,
                label=f"{analysis.baseline} final valid {level:.3f}",
            )
    if options.logx:
        ax.set_xscale("log")
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel(METRICS[metric])
    ax.grid(alpha=0.3)


def band_note(options: StudyOptions) -> str:
    band = "min–max over seeds" if options.band == "minmax" else "95% t-interval of the mean"
    return f"mean over seeds on the range all seeds cover; band: {band}"


def save_single_figures(analysis: DatasetAnalysis, out: Path, options: StudyOptions) -> list[Path]:
    """One figure per metric × axis: <dataset>_<valid|train>_vs_<steps|chars|seconds>.png (and .svg)."""
    paths = []
    for metric in METRICS:
        for axis in cv.AXES:
            fig = Figure(figsize=(7, 4.8))
            ax = fig.subplots()
            draw_panel(ax, analysis, metric, axis, options)
            ax.legend(fontsize=7)
            caption = textwrap.fill(scope_line(analysis), 120)
            ax.set_title(f"{METRICS[metric]} vs {AXIS_LABELS[axis]}\n{caption}\n{band_note(options)}", fontsize=7)
            fig.tight_layout()
            stem = f"{safe_name(analysis.name)}_{metric.split('/')[0]}_vs_{axis}"
            for suffix in (".png", ".svg") if options.svg else (".png",):
                fig.savefig(out / f"{stem}{suffix}", dpi=130)
                paths.append(out / f"{stem}{suffix}")
    return paths


def save_combined_figure(analysis: DatasetAnalysis, out: Path, options: StudyOptions) -> Path:
    """The six panels (valid and train bpc against steps, characters and seconds) in one figure."""
    fig = Figure(figsize=(16, 9))
    axes = fig.subplots(2, 3, squeeze=False)
    for row, metric in enumerate(METRICS):
        for col, axis in enumerate(cv.AXES):
            draw_panel(axes[row][col], analysis, metric, axis, options)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Convergence: {textwrap.fill(scope_line(analysis), 200)}\n{band_note(options)}", fontsize=10)
    fig.tight_layout()
    path = out / f"{safe_name(analysis.name)}_convergence.png"
    fig.savefig(path, dpi=110)
    return path


def save_figures(analysis: DatasetAnalysis, out: Path, options: StudyOptions) -> list[Path]:
    """Every figure of one dataset, in the order report.md lists them: the single-axis ones, then the combined."""
    return save_single_figures(analysis, out, options) + [save_combined_figure(analysis, out, options)]


def safe_name(text: str) -> str:
    """A dataset name usable as a file name stem."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
