"""The converged study's report (results/convergence/converged/): report.md, summary.csv, selection.json, figures.

`report_from_runs` is what `scripts/converged_report.py` does; the numbers come from mlstm.studies.converged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mlstm.errors import UserError
from mlstm.studies import convergence as cv
from mlstm.studies.converged import (
    AXES,
    WITHIN,
    Cell,
    Comparison,
    ConvergedStudy,
    analyse,
    chosen_rate_runs,
    selection_rows,
)
from mlstm.studies.formatting import csv_text, finite, fmt, interval, signed
from mlstm.studies.runs import load_runs, lookup
from mlstm.studies.scaling import COLORS, format_params
from mlstm.studies.scaling_report import selection_table
from mlstm.studies.tuning import UNSTABLE_GAP

PROTOCOL_KEYS = (  # what the report states of the protocol, read from the final runs' configs
    ("optim.schedule", "schedule"),
    ("optim.plateau_factor", "rate factor"),
    ("optim.plateau_patience", "patience"),
    ("optim.plateau_threshold", "minimum improvement (bpc)"),
    ("optim.min_lr", "rate floor"),
    ("trainer.early_stop_patience", "stop patience"),
    ("trainer.max_steps", "cap (steps)"),
    ("trainer.eval_every", "validation every (steps)"),
    ("trainer.eval_chars", "validation characters (null: all)"),
    ("trainer.eval_batch_size", "validation streams"),
    ("trainer.batch_size", "batch (streams)"),
    ("trainer.seq_len", "segment (characters)"),
)


def _ratio(iv: cv.Interval) -> str:
    return f"{interval(iv)}×" if finite(iv.value) else "–"


def protocol_lines(study: ConvergedStudy, configs: Sequence[Mapping]) -> list[str]:
    if not configs:
        return []
    parts = []
    for key, name in PROTOCOL_KEYS:
        values = sorted({json.dumps(lookup(c, key)) for c in configs})
        parts.append(f"{name} {'/'.join(values)}")
    return [
        "Protocol (from the runs' configs, the same for every cell): " + "; ".join(parts) + ". The rate is "
        "halved by PyTorch's ReduceLROnPlateau after more than `patience` evaluations without an improvement of "
        "the minimum; a run stops once a halving made since its best point is followed by `stop patience` such "
        "evaluations (mlstm.training.plateau); the test split is read with best.pt's weights. A run that "
        "reaches the cap has **not** converged and is flagged.",
        "",
    ]


def cell_rows(cells: Sequence[Cell], comparisons: Mapping, dataset: str) -> list[str]:
    lines = [
        "| size | cell | params | lr | seeds | converged | best valid bpc | test bpc (best.pt) | Δ valid vs LSTM "
        "| Δ test vs LSTM | epochs to best | rate halvings | rise after best | cold starts blown up |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    for c in (c for c in cells if c.dataset == dataset):
        comp = comparisons.get((c.dataset, c.rung, c.variant))
        converged = f"{c.n_converged}/{len(c.runs)}" + (f" ({c.n_capped} capped: NOT converged)" if c.n_capped else "")
        rises = [r.rise for r in c.runs if finite(r.rise)]
        rise = f"{np.mean(rises):.3f} ({sum(v > 0.01 for v in rises)}/{len(rises)})" if rises else "–"
        epochs = [r.epochs_to_best for r in c.runs if finite(r.epochs_to_best)]
        blown = f"{c.cold_starts[0]} of {c.cold_starts[1]}" if c.cold_starts else "–"
        lines.append(
            f"| {c.rung} | {c.variant} | {format_params(c.params)} | {fmt(c.lr, 'g')} | {len(c.runs)} | {converged} "
            f"| {interval(c.mean('best_valid'), '.3f')} | {interval(c.mean('test'), '.3f')} "
            f"| {signed(comp.d_best_valid) if comp else '–'} | {signed(comp.d_test) if comp else '–'} "
            f"| {f'{np.mean(epochs):.1f}' if epochs else '–'} | {np.mean([r.reductions for r in c.runs]):.1f} "
            f"| {rise} | {blown} |"
        )
    return lines


def tuning_rows(study: ConvergedStudy, dataset: str) -> list[str]:
    """Every grid run so far: the study spans many sessions, and an unfinished run shows where it stands."""
    runs = [t for t in study.tuning if t.dataset == dataset]
    if not runs:
        return []
    lines = [
        "| rung | cell | rate | seed | state | steps | lowest valid bpc (step) | halvings | epochs to best |",
        "| --- | --- | ---: | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for t in runs:
        r = t.run
        lowest = f"{r.best_valid:.3f} ({r.at_best['steps']:,.0f})" if finite(r.best_valid) else "–"
        lines.append(
            f"| {t.rung} | {t.variant} | {fmt(t.lr, 'g')} | {r.seed} | {t.state} | {fmt(r.end_step, ',.0f')} "
            f"| {lowest} | {r.reductions} | {fmt(r.epochs_to_best, '.1f')} |"
        )
    return lines


def speed_rows(comparisons: Sequence[Comparison], dataset: str) -> list[str]:
    mine = [c for c in comparisons if c.cell.dataset == dataset]
    if not mine:
        return []
    lines = [
        "| size | cell | level both reach | × LSTM characters | × LSTM steps | × LSTM seconds | × LSTM characters "
        f"to the best | × LSTM characters to within {WITHIN} of the best | ladder (level: × characters) |",
        "| --- | --- | ---: | --- | --- | --- | --- | --- | --- |",
    ]
    for c in mine:
        ladder = "; ".join(f"{level:.3f}: {_ratio(iv)}" for level, iv in c.ladder)
        lines.append(
            f"| {c.cell.rung} | {c.cell.variant} | {c.level:.3f} | {_ratio(c.to_level['chars'])} "
            f"| {_ratio(c.to_level['steps'])} | {_ratio(c.to_level['seconds'])} "
            f"| {_ratio(c.to_best['chars'])} "
            f"| {_ratio(c.to_within['chars'])} | {ladder} |"
        )
    return lines


def comovement_rows(study: ConvergedStudy, dataset: str) -> list[str]:
    mine = {group: m for (label, group), m in study.comovement.items() if label == dataset}
    if not mine:
        return []
    lines = [
        "| runs | how many | evaluations counted (steps) | moved with the majority | expected if independent "
        "| most rose together |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    for group, m in mine.items():
        lines.append(
            f"| {group} | {m.runs} | {m.evaluations} ({m.first_step:,.0f}–{m.last_step:,.0f}) | {m.agreement:.0%} "
            f"| {m.expected:.0%} | step {m.peak_step:,.0f}: {m.peak_rose} of {m.peak_counted} |"
        )
    return lines


SUMMARY_COLUMNS = (
    "dataset",
    "rung",
    "cell",
    "params",
    "lr",
    "seed",
    "converged",
    "capped",
    "diverged",
    "best_valid_bpc",
    "test_bpc",
    "final_valid_bpc",
    "end_step",
    *(f"{axis}_to_best" for axis in AXES),
    *(f"{axis}_to_within" for axis in AXES),
    "epochs_to_best",
    "rate_halvings",
    "level_both_reach",
    "xz_bpc",
)


def summary_rows(study: ConvergedStudy) -> list[dict]:
    """One row per final run (SUMMARY_COLUMNS)."""
    comparisons = {(c.cell.dataset, c.cell.rung, c.cell.variant): c for c in study.comparisons}
    rows = []
    for cell in study.cells:
        comp = comparisons.get((cell.dataset, cell.rung, cell.variant))
        for run in cell.runs:
            rows.append(
                {
                    "dataset": cell.dataset,
                    "rung": cell.rung,
                    "cell": cell.variant,
                    "params": cell.params,
                    "lr": cell.lr,
                    "seed": run.seed,
                    "converged": run.converged,
                    "capped": run.capped,
                    "diverged": run.diverged,
                    "best_valid_bpc": run.best_valid,
                    "test_bpc": run.test,
                    "final_valid_bpc": run.final_valid,
                    "end_step": run.end_step,
                    **{f"{axis}_to_best": run.at_best[axis] for axis in AXES},
                    **{f"{axis}_to_within": run.within[axis] for axis in AXES},
                    "epochs_to_best": run.epochs_to_best,
                    "rate_halvings": run.reductions,
                    "level_both_reach": comp.level if comp else math.nan,
                    "xz_bpc": study.xz.get(cell.dataset, math.nan),
                }
            )
    return rows


def figure_name(dataset: str, what: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset)}_{what}.png"


def rungs_by_size(cells: Sequence[Cell]) -> dict[str, float]:
    """{rung: the fewest parameters of a cell of the rung} of these cells, smallest first (unknown counts last)."""
    smallest: dict[str, float] = {}
    for c in cells:
        params = c.params if finite(c.params) else math.inf
        smallest[c.rung] = min(smallest.get(c.rung, math.inf), params)
    return dict(sorted(smallest.items(), key=lambda item: item[1]))


def draw_band(ax, band: cv.Band, color: str, label: str | None, style: str = "-", shade: bool = True) -> None:
    """The mean over seeds as a line, their range as a shaded band."""
    ax.plot(band.grid, band.mean, style, color=color, label=label)
    if shade:
        ax.fill_between(band.grid, band.low, band.high, color=color, alpha=0.2, linewidth=0)


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(study: ConvergedStudy, dataset: str, path: Path) -> Path:
    """Validation (solid) and training (dotted) bpc against characters (log x) over whole runs, one panel per size,
    one line per cell (mean over seeds on their common range) with the seeds' range as a band; xz -9e dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in study.cells if c.dataset == dataset]
    rungs = list(rungs_by_size(cells))
    fig, axes = plt.subplots(1, len(rungs), figsize=(5.5 * len(rungs), 4.3), squeeze=False)
    for ax, rung in zip(axes[0], rungs):
        for i, cell in enumerate(c for c in cells if c.rung == rung):
            color = COLORS.get(cell.variant, f"C{i}")
            for attr, style in (("curve", "-"), ("train_curve", ":")):
                band = cv.mean_band([getattr(r, attr).along("chars") for r in cell.runs], log=True)
                if not band.grid.size:
                    continue
                label = (
                    f"{cell.variant} (lr {cell.lr:g}, {len(cell.runs)} seed{'s' * (len(cell.runs) != 1)})"
                    if style == "-" and cell.lr
                    else cell.variant
                    if style == "-"
                    else None
                )
                draw_band(ax, band, color, label, style, shade=style == "-")
        if finite(study.xz.get(dataset)):
            ax.axhline(
                study.xz[dataset],
                color="gray",
                linestyle="--",
                linewidth=1,
                label=f"xz -9e on the sample: {study.xz[dataset]:.3f}",
            )
        ax.plot([], [], color="gray", linestyle=":", label="training bpc (dotted)")
        ax.set_xscale("log")
        ax.set_xlabel("training characters")
        ax.set_ylabel("bits per character")
        ax.set_title(f"{rung}: to convergence")
        ax.legend(fontsize=8)
    fig.suptitle(f"{dataset}: validation bpc to convergence\n(whole valid split as one stream; band: seed range)")
    return save_figure(fig, path)


def plot_best(study: ConvergedStudy, dataset: str, path: Path) -> Path:
    """Best validation and test bpc (best.pt) per cell and size: mean and 95% bootstrap CI over seeds. The sizes sit
    at even steps on the x axis, in order of parameters (the cells of a size differ by a few thousand parameters:
    a numeric axis would pull them apart), each cell a little to the side so that the intervals do not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in study.cells if c.dataset == dataset and finite(c.params)]
    sizes = rungs_by_size(cells)
    rungs = list(sizes)
    variants = list(dict.fromkeys(c.variant for c in cells))
    fig, ax = plt.subplots(figsize=(max(5.5, 2.2 * len(rungs) + 2.5), 4.3))
    for i, variant in enumerate(variants):
        dodge = 0.08 * (i - (len(variants) - 1) / 2)
        mine = [c for c in cells if c.variant == variant]
        for name, marker, suffix in (("best_valid", "o", "best valid"), ("test", "s", "test")):
            stats = [(rungs.index(c.rung) + dodge, c.mean(name)) for c in mine if finite(c.mean(name).value)]
            if not stats:
                continue
            x = np.array([s[0] for s in stats])
            y = np.array([s[1].value for s in stats])
            low = np.array([s[1].low if finite(s[1].low) else s[1].value for s in stats])
            high = np.array([s[1].high if finite(s[1].high) else s[1].value for s in stats])
            ax.errorbar(
                x,
                y,
                yerr=[y - low, high - y],
                marker=marker,
                capsize=3,
                color=COLORS.get(variant, f"C{i}"),
                linestyle="-" if name == "best_valid" else ":",
                label=f"{variant}: {suffix}",
            )
    if finite(study.xz.get(dataset)):
        ax.axhline(study.xz[dataset], color="gray", linestyle="--", linewidth=1, label="xz -9e")
    ax.set_xticks(range(len(rungs)))
    ax.set_xticklabels([f"{rung}\n({format_params(params)})" for rung, params in sizes.items()])
    ax.set_xlim(-0.5, len(rungs) - 0.5)
    ax.set_xlabel("model size (parameters)")
    ax.set_ylabel("bits per character")
    ax.set_title(f"{dataset}: best bpc to convergence\n(mean, 95% CI over seeds)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_chosen_rates(study: ConvergedStudy, dataset: str, path: Path) -> Path:
    """Validation bpc against characters (log x) of every cell's grid runs at the rate the tuning rule chose (mean
    over the tuning seeds, band: their range), one panel per size, with both reference levels: the cells without
    final runs (the seed cells) beside the others, and how far each got below a model of the character frequencies."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = chosen_rate_runs(study, dataset)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5.3), squeeze=False)
    for ax, (rung, cells) in zip(axes[0], panels.items()):
        for i, (variant, (lr, runs)) in enumerate(cells.items()):
            band = cv.mean_band([r.curve.along("chars") for r in runs], log=True)
            if not band.grid.size:
                continue
            color = COLORS.get(variant, f"C{i}")
            label = f"{variant} (lr {lr:g}, {len(runs)} seed{'s' * (len(runs) != 1)})"
            draw_band(ax, band, color, label)
        if dataset in study.unigram and finite(study.unigram[dataset][1]):
            level = study.unigram[dataset][1]
            ax.axhline(level, color="gray", linestyle="-.", linewidth=1, label=f"unigram model: {level:.3f}")
        if finite(study.xz.get(dataset)):
            ax.axhline(
                study.xz[dataset], color="gray", linestyle="--", linewidth=1, label=f"xz -9e: {study.xz[dataset]:.3f}"
            )
        ax.set_xscale("log")
        # the runs span 1-2 decades: label 1, 2 and 5 of each, not every minor tick (they would overlap)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.LogFormatterSciNotation(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training characters")
        ax.set_ylabel("validation bits per character")
        ax.set_title(f"{rung}: grid runs at the chosen rate")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)  # below: curves span the height
    fig.suptitle(f"{dataset}: each cell at its tuned rate\n(tuning seeds, to convergence; band: seed range)")
    return save_figure(fig, path)


def report_markdown(
    study: ConvergedStudy, figures: Mapping[str, list[str]], configs: Sequence[Mapping], title: str
) -> str:
    comparisons = {(c.cell.dataset, c.cell.rung, c.cell.variant): c for c in study.comparisons}
    lines = [
        f"# {title}",
        "",
        f"{study.n_final} final runs, {study.n_tuning} tuning runs. Each cell at its own "
        "initial rate, chosen by the tuning rule on seeds 0 and 1 (a run scores its lowest validation bpc; a "
        "rate the mean over the seeds; the lowest wins and must lie strictly inside a factor-2 grid); fresh "
        "seeds for the final numbers, the same data order for every cell. CIs: 95% percentile bootstrap over "
        "seeds (2000 resamples), paired by seed where both cells have the same seeds.",
        "",
    ]
    lines += protocol_lines(study, configs)
    for dataset in dict.fromkeys([c.dataset for c in study.cells] + [s.dataset for s in study.selections]):
        lines += [f"## {dataset}", ""]
        references = []
        if finite(study.xz.get(dataset)):
            references.append(
                f"`xz -9e` compresses the whole sample to **{study.xz[dataset]:.3f}** bits per character (computed "
                "by this report with lzma, preset 9 extreme)"
            )
        if dataset in study.unigram:
            entropy, on_valid = study.unigram[dataset]
            references.append(
                "a model that learnt only the character frequencies of the training split reads their entropy, "
                f"**{entropy:.3f}**, on that split and **{on_valid:.3f}** on the valid split (the level of a model "
                "that learnt no context)"
            )
        if references:
            lines += ["Reference: " + "; ".join(references) + ".", ""]
        lines += [f"![{dataset}]({name})" for name in figures.get(dataset, [])] + [""]
        table = selection_table(study.selections, dataset)
        if table:
            lines += ["### Initial learning rates (tuning seeds; score = mean lowest validation bpc)", ""]
            lines += table + [""]
        grid = tuning_rows(study, dataset)
        if grid:
            lines += ["### Grid runs so far", ""] + grid + [""]
        if any(c.dataset == dataset for c in study.cells):
            lines += [
                "### Best against best",
                "",
                "Converged: runs stopped by the rule / runs. Rise after best: final "
                "minus lowest validation bpc (runs above 0.01 bpc). Epochs to best: characters to the best point "
                "over one pass over the training split. Cold starts blown up: test streams, each read from a zero "
                f"state, more than {UNSTABLE_GAP:g} bpc above the run's lowest validation bpc (or non-finite), over "
                "all streams.",
                "",
            ]
            lines += cell_rows(study.cells, comparisons, dataset) + [""]
            speed = speed_rows(study.comparisons, dataset)
            if speed:
                lines += (
                    [
                        "### How fast: ratios to the LSTM (< 1: fewer than the LSTM)",
                        "",
                        "Level both reach: the "
                        "highest best validation bpc over every seed of both cells (each run reaches it). Seconds "
                        "are training seconds on a shared 2-core machine: indicative only.",
                        "",
                    ]
                    + speed
                    + [""]
                )
            xz = study.xz.get(dataset)
            if finite(xz):
                beats = [
                    c.variant + f" at {c.rung}"
                    for c in study.cells
                    if c.dataset == dataset and finite(c.mean("test").value) and c.mean("test").value < xz
                ]
                lines += [f"- Below xz -9e ({xz:.3f}) on the test split: {', '.join(beats) if beats else 'none'}.", ""]
        together = comovement_rows(study, dataset)
        if together:
            lines += [
                "### Do the validation curves move together? (one data order for every run)",
                "",
                "Every run reads the text in the same order, so the validation bpc of different seeds and cells "
                "can rise and fall at the same evaluations, where the plateau rule then halves their rates or stops "
                "them together: a ripple the CIs over seeds (which cover initialisations) do not cover. Counted: "
                "the evaluations after the first rise of any run at which at least half the runs are going. Moved "
                "with the "
                "majority: the mean fraction of runs whose validation bpc moved the way most did since the previous "
                "evaluation. Expected if independent: the same for runs rising independently, each at its own rate "
                "of rises in the window (mlstm.studies.comovement). Grid runs: every rate, diverged runs left out.",
                "",
            ]
            lines += together + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    study: ConvergedStudy, out: str | Path, configs: Sequence[Mapping], title: str, figures: bool = True
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, list[str]] = {}
    if figures:
        for dataset in dict.fromkeys(c.dataset for c in study.cells):
            drawn[dataset] = [
                plot_curves(study, dataset, out / figure_name(dataset, "converged")).name,
                plot_best(study, dataset, out / figure_name(dataset, "best")).name,
            ]
        for dataset in dict.fromkeys(s.dataset for s in study.selections):
            if chosen_rate_runs(study, dataset):
                figure = plot_chosen_rates(study, dataset, out / figure_name(dataset, "chosen_rates"))
                drawn.setdefault(dataset, []).append(figure.name)
    (out / "report.md").write_text(report_markdown(study, drawn, configs, title))
    (out / "summary.csv").write_text(csv_text(summary_rows(study), SUMMARY_COLUMNS))
    (out / "selection.json").write_text(json.dumps(selection_rows(study.selections), indent=1) + "\n")
    return {
        "report": out / "report.md",
        "summary": out / "summary.csv",
        "selection": out / "selection.json",
        "figures": [out / name for names in drawn.values() for name in names],
    }


def report_from_runs(
    final: Sequence[str],
    tuning_paths: Sequence[str],
    out: str | Path,
    title: str = "Trained to convergence: does the mLSTM converge faster than the LSTM?",
    figures: bool = True,
) -> str:
    """What scripts/converged_report.py does; returns what it prints (the report, then a `wrote PATH` per file)."""
    if not final and not tuning_paths:
        raise UserError("give --final and/or --tuning run directories")
    final_runs = load_runs(final) if final else []
    tuning_runs = load_runs(tuning_paths) if tuning_paths else []
    study = analyse(final_runs, tuning_runs)
    written = write_report(study, out, [r.config for r in final_runs or tuning_runs], title, figures)
    lines = [f"wrote {written[key]}" for key in ("report", "summary", "selection")]
    lines += [f"wrote {figure}" for figure in written["figures"]]
    return Path(written["report"]).read_text() + "\n".join(lines) + "\n"
