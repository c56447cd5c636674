"""The report of a tuned size ladder (mlstm.studies.scaling's analysis): plain-word sentences, the figure, report.md,
scale_summary.csv and selection.json.

`write_report` draws the figure (per dataset, two panels: the ratio against parameters, log x, one line per mLSTM
form at the level both cells reach with CI bars, its ratio at the LSTM's best level as open markers (triangles: a
lower bound, not every seed got there) and a dashed line at 1; final validation bpc against parameters for every
cell, training bpc dotted) and writes the files. `scripts/scale_report.py` is its command line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mlstm.errors import UserError
from mlstm.studies import scaling
from mlstm.studies.formatting import csv_text, finite, fmt, interval
from mlstm.studies.runs import load_runs
from mlstm.studies.scaling import (
    BASELINE,
    COLORS,
    GAP_TOL,
    RISE_TOL,
    DatasetStudy,
    GapRow,
    RungSelection,
    ScaleStudy,
    format_params,
    int_or_none,
    size_key,
)


# ---------------------------------------------------------------------------------------------- plain words
def trend(values: Sequence[tuple[float, float]]) -> str:
    """ "falls", "rises", "flat", "mixed", "one point" or "none" for (x, y) pairs in increasing x (NaN y left out)."""
    ys = [y for _, y in sorted(values) if math.isfinite(y)]
    if not ys:
        return "none"
    if len(ys) < 2:
        return "one point"
    steps = np.diff(ys)
    if (steps < 0).all():
        return "falls"
    if (steps > 0).all():
        return "rises"
    if (steps == 0).all():
        return "flat"
    return "mixed"


CRITERIA = {"lstm-best": "the LSTM's best level", "common": "the level both reach"}


def headline_rows(study: DatasetStudy, criterion: str = "lstm-best") -> list[GapRow]:
    return [g for g in study.gaps if g.criterion == criterion]


def gap_sentences(study: DatasetStudy) -> list[str]:
    """Per mLSTM form, a sentence at the LSTM's best level and one at the level both reach: its ratio along the
    ladder and what the smallest and largest rungs' CIs say."""
    return [sentence for criterion in CRITERIA for sentence in _gap_sentences(study, criterion)]


def _gap_sentences(study: DatasetStudy, criterion: str) -> list[str]:
    out = []
    rows = headline_rows(study, criterion)
    for variant in sorted({g.variant for g in rows}):
        mine = sorted((g for g in rows if g.variant == variant), key=lambda g: size_key(g.params, g.rung))
        path = " → ".join(f"{_ratio_text(g)} ({format_params(g.params)})" for g in mine)
        direction = trend([(g.params, g.ratio.value) for g in mine])
        words = {
            "falls": "falls at every step: it gains on the LSTM as size grows",
            "rises": "rises at every step: it loses ground to the LSTM as size grows",
            "flat": "does not change with size",
            "mixed": "has no monotone trend with size",
            "one point": "is defined at one rung only",
            "none": "is defined at no rung (at none does every seed of both reach it)",
        }[direction]
        sentence = f"**{variant}** × LSTM characters to {CRITERIA[criterion]}: {path}; the ratio {words}"
        ends = [g for g in mine if math.isfinite(g.ratio.value)]
        if len(ends) >= 2 and all(math.isfinite(x) for g in (ends[0], ends[-1]) for x in (g.ratio.low, g.ratio.high)):
            small, large = ends[0].ratio, ends[-1].ratio
            overlap = not (small.high < large.low or large.high < small.low)
            sentence += (
                f" (95% CIs at {format_params(ends[0].params)} and {format_params(ends[-1].params)} "
                f"{'overlap: within the seed noise' if overlap else 'do not overlap'})"
            )
        out.append(sentence + ".")
    return out


def overfitting_sentences(study: DatasetStudy) -> list[str]:
    """Where validation rises above its minimum and where the valid - train gap starts to grow, per cell and rung."""
    out = []
    second = [e.second_pass_step for c in study.cells.values() for e in c.ends if math.isfinite(e.second_pass_step)]
    if second:
        out.append(
            f"The second pass over the training text starts at about step {min(second):.0f} "
            f"(the first record of epoch 1); before it the training bpc is measured on unseen text."
        )
    else:
        out.append(
            "No run started a second pass over the training text: the training bpc is measured on text the "
            "model had not seen, so valid - train measures the split's difference, not memorisation."
        )
    rising = []
    for rung in study.rungs:
        for (r, variant), cell in sorted(study.cells.items()):
            if r != rung or not cell.ends:
                continue
            if cell.n_rising:
                rising.append(
                    f"{variant} at {rung} ({format_params(cell.params)}; "
                    f"{cell.n_rising}/{len(cell.ends)} seeds, "
                    f"lowest validation at step {cell.best_step:.0f}, then +{cell.stat('rise')[0]:.3f} bpc)"
                )
    if rising:
        out.append("Validation bpc rises above its minimum (overfitting sets in) for: " + "; ".join(rising) + ".")
    else:
        out.append(
            f"Validation bpc is lowest at the end of the budget for every cell and rung (no rise above "
            f"{RISE_TOL} bpc): no overfitting within one budget."
        )
    growing = []
    for rung in study.rungs:
        for (r, variant), cell in sorted(study.cells.items()):
            if r == rung and cell.onsets:
                growing.append(
                    f"{variant} at {rung} ({format_params(cell.params)}) from step {min(cell.onsets):.0f} "
                    f"({len(cell.onsets)}/{len(cell.ends)} seeds)"
                )
    if growing:
        out.append(
            f"valid - train grows by more than {GAP_TOL} bpc above its running minimum, to the end, for: "
            + "; ".join(growing)
            + "."
        )
    else:
        out.append(f"valid - train never grows by more than {GAP_TOL} bpc above its running minimum.")
    return out


# ---------------------------------------------------------------------------------------------- output
def _ratio_text(g: GapRow) -> str:
    if finite(g.ratio.value):
        return f"{g.ratio.value:.2f}×"
    if finite(g.ratio_lower_bound):
        return f"> {g.ratio_lower_bound:.2f}× (not reached)"
    return "–"


def _range(stat: tuple[float, float, float]) -> str:
    mean, low, high = stat
    return f"{mean:.3f} [{low:.3f}–{high:.3f}]" if finite(mean) else "–"


def _lr(value) -> str:
    return f"{value:g}" if finite(value) else "–"


def summary_rows(study: ScaleStudy) -> list[dict]:
    """One row per dataset, rung and cell (scale_summary.csv)."""
    rows = []
    for dataset, ds in study.datasets.items():
        headline = {(g.rung, g.variant): g for g in headline_rows(ds)}
        common = {(g.rung, g.variant): g for g in headline_rows(ds, "common")}
        for rung in ds.rungs:
            for (r, variant), cell in sorted(ds.cells.items()):
                if r != rung:
                    continue
                g, both = headline.get((rung, variant)), common.get((rung, variant))
                valid, train, gap = cell.stat("final_valid"), cell.stat("final_train"), cell.stat("gap_end")
                rows.append(
                    {
                        "dataset": dataset,
                        "rung": rung,
                        "variant": variant,
                        "params": int_or_none(cell.params),
                        "lstm_params": int_or_none(ds.params[rung]),
                        "lr": cell.lr,
                        "n_seeds": len(cell.ends),
                        "final_valid_mean": valid[0],
                        "final_valid_min": valid[1],
                        "final_valid_max": valid[2],
                        "final_train_mean": train[0],
                        "final_train_min": train[1],
                        "final_train_max": train[2],
                        "valid_minus_train": gap[0],
                        "best_valid_step_median": cell.best_step,
                        "rise_after_best_mean": cell.stat("rise")[0],
                        "n_seeds_rising": cell.n_rising,
                        "gap_onset_step_min": min(cell.onsets) if cell.onsets else math.nan,
                        "target_bpc": g.target if g else math.nan,
                        "chars_to_target_mean": g.chars.value if g else math.nan,
                        "ratio_to_lstm": g.ratio.value if g else (1.0 if variant == study.baseline else math.nan),
                        "ratio_low": g.ratio.low if g else math.nan,
                        "ratio_high": g.ratio.high if g else math.nan,
                        "ratio_lower_bound": g.ratio_lower_bound if g else math.nan,
                        "common_target_bpc": both.target if both else math.nan,
                        "common_ratio_to_lstm": both.ratio.value if both else math.nan,
                        "common_ratio_low": both.ratio.low if both else math.nan,
                        "common_ratio_high": both.ratio.high if both else math.nan,
                        "ladder_ratio_min": g.ladder[0] if g else math.nan,
                        "ladder_ratio_max": g.ladder[1] if g else math.nan,
                        "valid_minus_lstm": g.valid_difference.value if g else math.nan,
                        "valid_minus_lstm_low": g.valid_difference.low if g else math.nan,
                        "valid_minus_lstm_high": g.valid_difference.high if g else math.nan,
                        "test_mean": cell.stat("test")[0],
                        "test_min": cell.stat("test")[1],
                        "test_max": cell.stat("test")[2],
                        "n_test_unstable": cell.n_test_unstable,
                        "cold_start_blown": cell.cold_starts[0] if cell.cold_starts else math.nan,
                        "cold_start_streams": cell.cold_starts[1] if cell.cold_starts else math.nan,
                        "note": "; ".join(x for x in (cell.note, g.note if g else "") if x),
                    }
                )
    return rows


def plot_dataset(ds: DatasetStudy, path: Path, baseline: str = BASELINE) -> Path:
    """The two-panel figure of one dataset (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    rows, common = headline_rows(ds), headline_rows(ds, "common")
    for i, variant in enumerate(sorted({g.variant for g in rows + common})):
        color = COLORS.get(variant, f"C{i}")
        shown = sorted(
            (g for g in common if g.variant == variant and finite(g.ratio.value)),
            key=lambda g: size_key(g.params, g.rung),
        )
        if shown:
            x = np.array([g.params for g in shown])
            y = np.array([g.ratio.value for g in shown])
            low = np.array([g.ratio.low if finite(g.ratio.low) else g.ratio.value for g in shown])
            high = np.array([g.ratio.high if finite(g.ratio.high) else g.ratio.value for g in shown])
            left.errorbar(
                x,
                y,
                yerr=[y - low, high - y],
                marker="o",
                capsize=3,
                color=color,
                label=f"{variant}: to the level both reach",
            )
        mine = [g for g in rows if g.variant == variant]
        reached = [g for g in mine if finite(g.ratio.value)]
        if reached:
            left.scatter(
                [g.params for g in reached],
                [g.ratio.value for g in reached],
                marker="s",
                facecolors="none",
                edgecolors=color,
                label=f"{variant}: to the {baseline}'s best level",
            )
        bounds = [g for g in mine if not finite(g.ratio.value) and finite(g.ratio_lower_bound)]
        if bounds:
            left.scatter(
                [g.params for g in bounds],
                [g.ratio_lower_bound for g in bounds],
                marker="^",
                facecolors="none",
                edgecolors=color,
                label=f"{variant}: {baseline}'s best level not reached (lower bound)",
            )
    left.axhline(1.0, color="gray", linestyle="--", linewidth=1, label=f"{baseline} (= 1)")
    left.set_xscale("log")
    left.set_xlabel("parameters")
    left.set_ylabel(f"characters to the same level, × {baseline}")
    left.set_title("best against best: characters to the same level (95% CI)")
    left.legend(fontsize=8)
    for i, variant in enumerate(sorted({v for (_, v) in ds.cells})):
        color = COLORS.get(variant, f"C{i}")
        cells = sorted(
            (c for (_, v), c in ds.cells.items() if v == variant and c.ends), key=lambda c: size_key(c.params, c.rung)
        )
        for name, style, label in (("final_valid", "-", variant), ("final_train", ":", None)):
            stats = [(c.params, *c.stat(name)) for c in cells]
            stats = [s for s in stats if finite(s[0]) and finite(s[1])]
            if not stats:
                continue
            x, mean, low, high = (np.array(v) for v in zip(*stats))
            right.errorbar(
                x,
                mean,
                yerr=[mean - low, high - mean],
                marker="o" if style == "-" else None,
                linestyle=style,
                capsize=3,
                color=color,
                label=label,
            )
    right.plot([], [], color="gray", linestyle=":", label="training bpc (dotted)")
    right.set_xscale("log")
    right.set_xlabel("parameters")
    right.set_ylabel("bpc at the end of the budget")
    right.set_title("final validation bpc (mean, seed range)")
    right.legend(fontsize=8)
    ticks = sorted({float(v) for v in ds.params.values() if finite(v)})
    for axis in (left, right):
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if ticks:
            axis.set_xticks(ticks, [format_params(t) for t in ticks])
            axis.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    fig.suptitle(f"{ds.dataset}: {ds.budget_chars / 1e6:.2f}M training characters at every size")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def selection_table(selections: Sequence[RungSelection], dataset: str) -> list[str]:
    mine = [s for s in selections if s.dataset == dataset]
    if not mine:
        return []
    lines = ["| rung | cell | params | grid: rate (score) | chosen | note |", "| --- | --- | ---: | --- | ---: | --- |"]
    for s in mine:
        sel = s.selection
        grid = ", ".join(f"{r.lr:g} ({fmt(r.score)})" for r in sel.rates)
        note = "; ".join(sel.notes).replace("|", "\\|")
        params = f"{int_or_none(s.params):,}" if finite(s.params) else "–"
        edge = " (edge)" if sel.at_edge else ""
        lines.append(f"| {s.rung} | {s.variant} | {params} | {grid} | {_lr(sel.chosen)}{edge} | {note} |")
    by_variant: dict[str, list[tuple[float, float]]] = {}
    for s in mine:
        if s.selection.chosen is not None:
            by_variant.setdefault(s.variant, []).append((size_key(s.params, s.rung), s.selection.chosen))
    lines.append("")
    for variant, pairs in sorted(by_variant.items()):
        direction = trend(pairs)
        words = {
            "falls": "falls as size grows",
            "rises": "rises as size grows",
            "flat": "is the same at every size",
            "mixed": "does not move monotonically with size",
            "one point": "is known at one size only",
            "none": "is not known",
        }[direction]
        rates = " → ".join(f"{lr:g}" for _, lr in sorted(pairs))
        lines.append(f"- {variant}: chosen rate {rates}; it {words}.")
    return lines


def report_markdown(study: ScaleStudy, figures: Mapping[str, str], title: str | None = None) -> str:
    lines = [f"# {title or 'Does the mLSTM advantage grow with model size?'}", ""]
    lines.append(
        f"{study.n_final} final runs, {study.n_tuning} tuning runs. Every cell at its own tuned learning "
        f"rate (the rule of mlstm.studies.tuning, per cell and size), fresh seeds; "
        f"the baseline is `{study.baseline}` "
        f"at the same rung (parameter counts within 2%)."
    )
    lines.append("")
    datasets = sorted(set(study.datasets) | {s.dataset for s in study.selections})
    for dataset in datasets:
        ds = study.datasets.get(dataset)
        lines += [f"## {dataset}", ""]
        if ds is not None:
            lines.append(
                f"Budget: {ds.budget_chars:,.0f} training characters per run at every size; rungs "
                + ", ".join(f"{r} ({format_params(ds.params[r])})" for r in ds.rungs)
                + "."
            )
            lines.append("")
            if dataset in figures:
                lines += [f"![{dataset}: ratio and final bpc against parameters]({figures[dataset]})", ""]
            sentences = gap_sentences(ds)
            if sentences:
                lines += ["- " + s for s in sentences] + [""]
        table = selection_table(study.selections, dataset)
        if table:
            lines += ["### Learning rates (tuning seeds; score = mean validation bpc over the last quarter)", ""]
            lines += table + [""]
        if ds is None:
            lines += ["No final runs yet.", ""]
            continue
        lines += [
            "### Best against best: characters to a level",
            "",
            "Target: the LSTM's best level at that rung (the highest of its seeds' lowest validation bpc), "
            "then the level both reach (the higher of the two cells' best levels: where the mLSTM ends "
            "above the LSTM, its own best level), and any fixed level. × LSTM: mean characters over the LSTM's, "
            "95% bootstrap CI over seeds; "
            "ladder: the ratio at five levels from the first validation point down. Δ valid: final "
            "validation bpc minus the LSTM's.",
            "",
            "| rung | LSTM params | cell | lr | seeds | target bpc | chars to target | × LSTM | ladder | "
            "Δ valid vs LSTM | note |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
        ]
        order = {"lstm-best": 0, "common": 1, "fixed": 2}
        for g in sorted(ds.gaps, key=lambda g: (size_key(g.params, g.rung), g.variant, order[g.criterion], -g.target)):
            ladder = f"{g.ladder[0]:.2f}–{g.ladder[1]:.2f} ({g.ladder[2]})" if g.ladder[2] else "–"
            target = f"{g.target:.3f}" + {"fixed": " (fixed)", "common": " (both reach)"}.get(g.criterion, "")
            chars = f"{g.chars.value:,.0f}" if finite(g.chars.value) else f"{g.fraction_reached:.0%} reached"
            ratio = interval(g.ratio) if finite(g.ratio.value) else _ratio_text(g)
            lines.append(
                f"| {g.rung} | {int_or_none(g.params) or 0:,} | {g.variant} | {_lr(g.lr)} | {g.n_seeds} | "
                f"{target} | {chars} | {ratio} | {ladder} | {interval(g.valid_difference, '+.3f')} | "
                f"{g.note} |"
            )
        lines += [
            "",
            "### Final bpc and overfitting",
            "",
            "Mean [seed range] at the end of the budget. Lowest valid at: median step of each seed's lowest "
            f"validation bpc; rise: final minus lowest (seeds above {RISE_TOL} bpc); gap onset: the first step "
            f"from which valid - train stays more than {GAP_TOL} bpc above its running minimum.",
            "",
            "| rung | cell | params | lr | seeds | valid bpc | train bpc | valid − train | lowest valid at "
            "| rise | gap onset | note |",
            "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | --- | --- | --- |",
        ]
        for rung in ds.rungs:
            for (r, variant), cell in sorted(ds.cells.items()):
                if r != rung:
                    continue
                rise = f"{cell.stat('rise')[0]:+.3f} ({cell.n_rising}/{len(cell.ends)})" if cell.ends else "–"
                onset = f"{min(cell.onsets):.0f} ({len(cell.onsets)}/{len(cell.ends)})" if cell.onsets else "none"
                lines.append(
                    f"| {rung} | {variant} | {int_or_none(cell.params) or 0:,} | {_lr(cell.lr)} | "
                    f"{len(cell.ends)} | {_range(cell.stat('final_valid'))} | "
                    f"{_range(cell.stat('final_train'))} | {fmt(cell.stat('gap_end')[0])} | "
                    f"{fmt(cell.best_step, '.0f')} | {rise} | {onset} | {cell.note} |"
                )
        lines += [""] + ["- " + s for s in overfitting_sentences(ds)] + [""]
        tested = [
            (rung, variant, cell)
            for rung in ds.rungs
            for (r, variant), cell in sorted(ds.cells.items())
            if r == rung and any(math.isfinite(e.test) for e in cell.ends)
        ]
        if tested:
            lines += [
                "### Test split",
                "",
                "The whole test split read once as one stream from a zero state (mean [seed range]); unstable: "
                "runs more than 1 bpc above their last training bpc there; cold starts: the test split read "
                "again as streams that each start from a zero state, the streams that blew up.",
                "",
                "| rung | cell | lr | seeds | test bpc | unstable runs | cold starts blown up |",
                "| --- | --- | ---: | ---: | --- | --- | --- |",
            ]
            for rung, variant, cell in tested:
                cold = cell.cold_starts
                cold_text = f"{cold[0]} of {cold[1]}" if cold else "not measured"
                lines.append(
                    f"| {rung} | {variant} | {_lr(cell.lr)} | {len(cell.ends)} | {_range(cell.stat('test'))} "
                    f"| {cell.n_test_unstable} of {len(cell.ends)} | {cold_text} |"
                )
            lines.append("")
        lines += [f"- {note}" for note in ds.notes]
        if ds.notes:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def figure_name(dataset: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset)}_scale.png"


def write_report(study: ScaleStudy, out: str | Path, title: str | None = None, figures: bool = True) -> dict:
    """report.md, scale_summary.csv, selection.json and one figure per dataset in `out`; returns what was written.
    Without matplotlib the report is written without figures and says so."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, drawn = {}, {}
    if figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            figures = False
    for dataset, ds in study.datasets.items():
        if figures and any(c.ends for c in ds.cells.values()):
            drawn[dataset] = plot_dataset(ds, out / figure_name(dataset), study.baseline).name
    text = report_markdown(study, drawn, title)
    if not figures and study.datasets:
        text += "\n(no figures: matplotlib is not installed here; `scripts/scale_report.py` draws them elsewhere)\n"
    (out / "report.md").write_text(text)
    (out / "scale_summary.csv").write_text(csv_text(summary_rows(study)))
    (out / "selection.json").write_text(json.dumps([s.as_dict() for s in study.selections], indent=1) + "\n")
    written.update(
        {
            "report": out / "report.md",
            "summary": out / "scale_summary.csv",
            "selection": out / "selection.json",
            "figures": [out / name for name in drawn.values()],
        }
    )
    return written


def report_from_runs(
    final: Sequence[str],
    tuning_paths: Sequence[str],
    out: str | Path,
    targets: Sequence[tuple[str, float]] = (),
    variants: str | None = None,
    title: str | None = None,
    figures: bool = True,
) -> str:
    """What scripts/scale_report.py does: read the runs, analyse, write the report into `out`; returns what it
    prints (report.md, then a `wrote PATH` line per file)."""
    if not final and not tuning_paths:
        raise UserError("give --final and/or --tuning run directories")
    final_runs = load_runs(final) if final else []
    tuning_runs = load_runs(tuning_paths) if tuning_paths else []
    fixed: dict[str, list[float]] = {}
    for name, level in targets:
        fixed.setdefault(name, []).append(level)
    keep = [v.strip() for v in variants.split(",")] if variants else None
    study = scaling.analyse(final_runs, tuning_runs, fixed_targets=fixed, variants=keep)
    written = write_report(study, Path(out), title=title, figures=figures)
    lines = [f"wrote {written[key]}" for key in ("report", "summary", "selection")]
    lines += [f"wrote {figure}" for figure in written["figures"]]
    return (Path(out) / "report.md").read_text() + "\n".join(lines) + "\n"
