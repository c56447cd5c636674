"""Convergence figures, summary.csv and report.md from training runs: does mLSTM converge faster than LSTM?

    make plot RUNS="multirun/2026-01-01/12-00-00" OUT=results/convergence
    python scripts/plot_convergence.py RUN_OR_SWEEP_DIR... [--out DIR] [--targets 2.5,2.2,2.0] [--baseline lstm]
    python scripts/plot_convergence.py --wandb mlstm/convergence --out DIR          # runs from W&B instead

For every dataset found it writes, into --out:
    <dataset>_{valid,train}_vs_{steps,chars,seconds}.png   one figure per axis (also .svg with --svg)
    <dataset>_convergence.png                               the six panels together
    summary.csv    one row per dataset x variant x target (steps/chars/seconds to target, ratio to the baseline with
                   bootstrap CIs, fraction of seeds that reached it) plus the equal-character and equal-time budget bpc
    report.md      the answer in words, generated from those numbers, with a table per dataset and the runs used
The statistics live in `mlstm.convergence`, the run loading in `mlstm.runs`; this file draws and writes.
"""

from __future__ import annotations

import argparse
import csv
import math
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mlstm import convergence as cv  # noqa: E402
from mlstm.cli import exit_on_user_error  # noqa: E402
from mlstm.errors import UserError  # noqa: E402
from mlstm.runs import Run, curves_by_seed, group_runs, load_runs, load_wandb_runs, lookup  # noqa: E402

METRICS = {"valid/bpc": "validation bpc", "train/bpc": "training bpc"}
AXIS_LABELS = {"steps": "optimizer steps", "chars": "training characters seen", "seconds": "training seconds"}
# one colour per variant in every figure, so a variant is recognised at a glance across datasets and axes
VARIANT_COLOURS = {"lstm": "tab:blue", "lstm-loop": "tab:cyan", "mlstm-paper": "tab:red",
                   "mlstm-seed": "tab:orange", "mlstm-matlab": "tab:purple"}
SPARE_COLOURS = ("tab:green", "tab:brown", "tab:pink", "tab:olive", "tab:gray", "black")
SUMMARY_COLUMNS = (
    ["dataset", "variant", "baseline", "kind", "target_bpc", "budget", "n_seeds", "seeds", "paired",
     "fraction_reached"]
    + [f"{axis}_{stat}" for axis in cv.AXES
       for stat in ("mean", "ci_low", "ci_high", "ratio", "ratio_ci_low", "ratio_ci_high")]
    + ["bpc_mean", "bpc_ci_low", "bpc_ci_high", "bpc_min", "bpc_max", "bpc_diff", "bpc_diff_ci_low",
       "bpc_diff_ci_high", "note"]
)
BUDGET_KINDS = {"chars": "equal_chars", "seconds": "equal_time"}
DEFAULT_SPLIT_FRACTIONS = (0.9, 0.05, 0.05)  # dataset=file's default split (as in mlstm.data.corpus)


# ------------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="run directories, sweep directories or globs holding metrics.jsonl")
    parser.add_argument("--out", default="results/convergence", help="output directory (default: %(default)s)")
    parser.add_argument("--wandb", metavar="PROJECT[/GROUP]", help="read runs from W&B instead of directories")
    parser.add_argument("--baseline", default="lstm", help="variant the others are compared with (default: lstm)")
    parser.add_argument("--targets", help="bpc levels, e.g. 2.5,2.2,2.0 (default: chosen per dataset)")
    parser.add_argument("--num-targets", type=int, default=5, help="levels in the automatic ladder (default: 5)")
    parser.add_argument("--label-key", help="config key(s) naming the variant instead of cell name/form/impl, "
                                            "e.g. cell.hidden_size or cell.name,cell.hidden_size")
    parser.add_argument("--band", choices=("minmax", "t95"), default="minmax",
                        help="band around the mean curve: range of seeds or 95%% t-interval (default: minmax)")
    parser.add_argument("--logx", action="store_true", help="logarithmic x-axes")
    parser.add_argument("--svg", action="store_true", help="also save every single-axis figure as SVG")
    parser.add_argument("--unigram-entropy", action="append", default=[], metavar="[DATASET=]BITS",
                        help="reference line; repeatable; default: computed from the dataset file when readable")
    parser.add_argument("--bootstrap", type=int, default=cv.N_RESAMPLES, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--rng-seed", type=int, default=cv.RNG_SEED, help="bootstrap RNG seed (default: 0)")
    parser.add_argument("--grid-points", type=int, default=200, help="points of the mean-curve grid (default: 200)")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run directories (or globs) or --wandb PROJECT[/GROUP]")
    if args.bootstrap < 100:
        raise UserError(f"--bootstrap {args.bootstrap} is too few resamples for a 95% interval; use 2000 or more")
    return args


def parse_unigram_entropy(values: list[str]) -> dict[str | None, float]:
    """["5.08", "text8=4.11"] -> {None: 5.08, "text8": 4.11}; None applies to every dataset not named."""
    entropies: dict[str | None, float] = {}
    for value in values:
        name, _, bits = value.rpartition("=")
        try:
            entropies[name or None] = float(bits)
        except ValueError:
            raise UserError(f"--unigram-entropy {value!r} is not BITS or DATASET=BITS") from None
    return entropies


# ------------------------------------------------------------------------------------------------- reference lines
def unigram_entropy_of_file(path: Path, train_bytes: int | None) -> float:
    """Entropy (bits) of the byte frequencies of the training part of a corpus file: the bpc of a unigram model."""
    data = np.fromfile(path, dtype=np.uint8, count=-1 if train_bytes is None else train_bytes)
    p = np.bincount(data, minlength=256) / max(data.size, 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def corpus_file(config: dict) -> tuple[Path | None, int | None]:
    """The dataset's source file and the size of its training split, when the config says where it is."""
    dataset = config.get("dataset", {})
    if dataset.get("name") == "file" and dataset.get("path"):
        path = Path(str(dataset["path"])).expanduser()
        if path.is_file():
            fraction = (dataset.get("split_fractions") or DEFAULT_SPLIT_FRACTIONS)[0]
            return path, int(path.stat().st_size * fraction)
    member = dataset.get("archive_member")
    if member and config.get("data_dir"):
        path = Path(str(config["data_dir"])).expanduser() / member
        if path.is_file():
            sizes = dataset.get("split_sizes")
            return path, int(sizes[0]) if sizes else None
    return None, None


def unigram_entropy(dataset: str, runs: list[Run], given: dict[str | None, float]) -> float | None:
    """The unigram-entropy reference for a dataset: given on the command line, else computed, else unknown."""
    if dataset in given:
        return given[dataset]
    if None in given:
        return given[None]
    for run in runs:
        path, train_bytes = corpus_file(run.config)
        if path is not None:
            return unigram_entropy_of_file(path, train_bytes)
    return None


# ------------------------------------------------------------------------------------------------------- analysis
@dataclass
class DatasetAnalysis:
    """Everything reported about one dataset: its runs by variant and the statistics computed on them."""

    name: str
    variants: dict[str, list[Run]]
    baseline: str
    targets: list[float]
    reach: list[cv.ReachRow]
    budgets: list[cv.BudgetRow]
    unigram_entropy: float | None


def analyse_dataset(name: str, variants: dict[str, list[Run]], args, entropies) -> DatasetAnalysis:
    """Targets, time-to-target comparisons and equal-budget comparisons of one dataset's variants."""
    valid = {v: curves_by_seed(runs, "valid/bpc") for v, runs in variants.items()}
    valid = {v: {k: c for k, c in curves.items() if len(c.y)} for v, curves in valid.items()}
    valid = {v: curves for v, curves in valid.items() if curves}
    if args.targets:
        targets = cv.parse_targets(args.targets)
    else:
        all_curves = [c for curves in valid.values() for c in curves.values()]
        targets = cv.default_targets([c.y[0] for c in all_curves], [c.y.min() for c in all_curves],
                                     args.num_targets)
    reach = cv.compare_reach(valid, targets, args.baseline, n_resamples=args.bootstrap, seed=args.rng_seed)
    budgets = [row for axis in BUDGET_KINDS
               for row in cv.compare_at_budget(valid, args.baseline, axis, args.bootstrap, args.rng_seed)]
    all_runs = [run for runs in variants.values() for run in runs]
    return DatasetAnalysis(name, variants, args.baseline, targets, reach, budgets,
                           unigram_entropy(name, all_runs, entropies))


# -------------------------------------------------------------------------------------------------------- wording
def si(value: float, unit: str = "") -> str:
    """12_000_000 -> "12.0M"; a compact number for captions and sentences."""
    if value is None or not math.isfinite(value):
        return "n/a"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def ratio_text(interval: cv.Interval) -> str:
    """"0.71× (95% CI 0.65–0.78)", or without the CI when there is none (one seed)."""
    if not math.isfinite(interval.value):
        return "n/a"
    if math.isfinite(interval.low):
        return f"{interval.value:.2f}× (95% CI {interval.low:.2f}–{interval.high:.2f})"
    return f"{interval.value:.2f}× (no CI: one seed)"


def diff_text(interval: cv.Interval) -> str:
    if not math.isfinite(interval.value):
        return "n/a"
    if math.isfinite(interval.low):
        return f"{interval.value:+.3f} (95% CI {interval.low:+.3f} to {interval.high:+.3f})"
    return f"{interval.value:+.3f} (no CI: one seed)"


def speed_verdict(interval: cv.Interval) -> str:
    """Words for a variant/baseline cost ratio: faster when the whole CI is below 1, slower when above."""
    if not math.isfinite(interval.value):
        return "undetermined"
    if not math.isfinite(interval.low):
        return ("faster" if interval.value < 1 else "slower") + " (one seed, no CI)"
    if interval.high < 1:
        return "faster"
    if interval.low > 1:
        return "slower"
    return "no clear difference (CI includes 1)"


def bpc_verdict(interval: cv.Interval) -> str:
    if not math.isfinite(interval.value):
        return "undetermined"
    if not math.isfinite(interval.low):
        return ("lower" if interval.value < 0 else "higher") + " (one seed, no CI)"
    if interval.high < 0:
        return "lower (better)"
    if interval.low > 0:
        return "higher (worse)"
    return "no clear difference (CI includes 0)"


def model_size(runs: list[Run]) -> str:
    """"1.52M parameters" when logged, else "hidden 256" (several values joined when runs differ)."""
    counts = sorted({r.num_parameters for r in runs if r.num_parameters})
    if counts:
        return "/".join(si(c) for c in counts) + " parameters"
    hidden = sorted({r.hidden_size for r in runs if r.hidden_size})
    return ("hidden " + "/".join(str(h) for h in hidden)) if hidden else "size unknown"


def seeds_text(variants: dict[str, list[Run]]) -> str:
    """"3 seeds per variant (0,1,2)", or the count of each variant when they differ."""
    seeds = sorted({r.seed for runs in variants.values() for r in runs if r.seed is not None})
    counts = {len(runs) for runs in variants.values()}
    per_variant = (f"{counts.pop()} seed(s) per variant" if len(counts) == 1
                   else "seeds per variant " + ", ".join(f"{v} {len(r)}" for v, r in variants.items()))
    return f"{per_variant} ({','.join(map(str, seeds)) or 'seed unknown'})"


def budget_text(runs: list[Run]) -> str:
    """"up to 12.0M chars = 3750 steps of 32×100"; the longest run, with the batch shape."""
    shapes = sorted({(lookup(r.config, "trainer.batch_size"), lookup(r.config, "trainer.seq_len")) for r in runs},
                    key=str)
    shape = ", ".join(f"{b}×{t}" for b, t in shapes)
    chars = max(r.last("chars") for r in runs)
    steps = max(r.last("step") for r in runs)
    return f"up to {si(chars)} chars = {steps:.0f} steps of {shape}"


def scope_line(analysis: DatasetAnalysis) -> str:
    """Data, model size per variant, seeds and budget: what every figure and table is about."""
    sizes = "; ".join(f"{v} {model_size(runs)}" for v, runs in analysis.variants.items())
    all_runs = [r for runs in analysis.variants.values() for r in runs]
    return f"{analysis.name} · {sizes} · {seeds_text(analysis.variants)} · {budget_text(all_runs)}"


# -------------------------------------------------------------------------------------------------------- figures
def variant_colour(variant: str) -> str:
    """A fixed colour per variant; unknown labels get a colour from a hash of the label, stable across runs."""
    return VARIANT_COLOURS.get(variant) or SPARE_COLOURS[zlib.crc32(variant.encode()) % len(SPARE_COLOURS)]


def final_valid_level(runs: list[Run]) -> float:
    """Mean over seeds of each run's last validation bpc."""
    values = [r.final("valid/bpc") for r in runs]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def draw_panel(ax, analysis: DatasetAnalysis, metric: str, axis: str, args) -> None:
    """Mean curve with a band per variant, plus the unigram-entropy and baseline-final reference lines."""
    for variant, runs in analysis.variants.items():
        curves = [run.curve(metric).along(axis) for run in runs]
        curves = [c for c in curves if len(c[0])]
        band = cv.mean_band(curves, args.grid_points, args.band, args.logx)
        colour = variant_colour(variant)
        if band.grid.size < 2 and curves:
            # the seeds share no stretch of this axis (e.g. one seed's warm-up took longer than another's whole
            # run): show each seed rather than nothing
            for i, (x, y) in enumerate(curves):
                ax.plot(x, y, color=colour, lw=0.9, alpha=0.8,
                        label=f"{variant} (each of {len(curves)} seeds; no common range)" if i == 0 else None)
            continue
        ax.plot(band.grid, band.mean, color=colour, lw=1.6, label=f"{variant} (n={band.n_seeds})")
        ax.fill_between(band.grid, band.low, band.high, color=colour, alpha=0.2, lw=0)
    if analysis.unigram_entropy is not None:
        ax.axhline(analysis.unigram_entropy, color="grey", ls="--", lw=1,
                   label=f"unigram entropy {analysis.unigram_entropy:.2f}")
    if analysis.baseline in analysis.variants:
        level = final_valid_level(analysis.variants[analysis.baseline])
        if math.isfinite(level):
            ax.axhline(level, color=variant_colour(analysis.baseline), ls=":", lw=1,
                       label=f"{analysis.baseline} final valid {level:.3f}")
    if args.logx:
        ax.set_xscale("log")
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel(METRICS[metric])
    ax.grid(alpha=0.3)


def band_note(args) -> str:
    band = "min–max over seeds" if args.band == "minmax" else "95% t-interval of the mean"
    return f"mean over seeds on the range all seeds cover; band: {band}"


def save_single_figures(analysis: DatasetAnalysis, out: Path, args) -> list[Path]:
    """One figure per metric × axis: <dataset>_<valid|train>_vs_<steps|chars|seconds>.png (and .svg)."""
    paths = []
    for metric in METRICS:
        for axis in cv.AXES:
            fig, ax = plt.subplots(figsize=(7, 4.8))
            draw_panel(ax, analysis, metric, axis, args)
            ax.legend(fontsize=7)
            caption = textwrap.fill(scope_line(analysis), 120)
            ax.set_title(f"{METRICS[metric]} vs {AXIS_LABELS[axis]}\n{caption}\n{band_note(args)}", fontsize=7)
            fig.tight_layout()
            stem = f"{safe_name(analysis.name)}_{metric.split('/')[0]}_vs_{axis}"
            for suffix in (".png", ".svg") if args.svg else (".png",):
                fig.savefig(out / f"{stem}{suffix}", dpi=130)
                paths.append(out / f"{stem}{suffix}")
            plt.close(fig)
    return paths


def save_combined_figure(analysis: DatasetAnalysis, out: Path, args) -> Path:
    """The six panels (valid and train bpc against steps, characters and seconds) in one figure."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), squeeze=False)
    for row, metric in enumerate(METRICS):
        for col, axis in enumerate(cv.AXES):
            draw_panel(axes[row][col], analysis, metric, axis, args)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Convergence: {textwrap.fill(scope_line(analysis), 200)}\n{band_note(args)}", fontsize=10)
    fig.tight_layout()
    path = out / f"{safe_name(analysis.name)}_convergence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


# ---------------------------------------------------------------------------------------------------- summary.csv
def fmt(value) -> str:
    """Numbers with 6 significant digits; NaN and None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def seed_list(per_seed: dict) -> str:
    return " ".join(str(s) for s in per_seed)


def target_rows(analysis: DatasetAnalysis) -> list[dict]:
    """One row per variant × target, the three axes side by side."""
    rows: dict[tuple, dict] = {}
    for r in analysis.reach:
        row = rows.setdefault((r.variant, r.target), {
            "dataset": analysis.name, "variant": r.variant, "baseline": analysis.baseline, "kind": "to_target",
            "target_bpc": r.target, "n_seeds": len(r.per_seed), "seeds": seed_list(r.per_seed), "paired": r.paired,
            "fraction_reached": r.fraction_reached, "note": r.note})
        row.update({f"{r.axis}_mean": r.mean.value, f"{r.axis}_ci_low": r.mean.low, f"{r.axis}_ci_high": r.mean.high,
                    f"{r.axis}_ratio": r.ratio.value, f"{r.axis}_ratio_ci_low": r.ratio.low,
                    f"{r.axis}_ratio_ci_high": r.ratio.high})
    return list(rows.values())


def budget_rows(analysis: DatasetAnalysis) -> list[dict]:
    """One row per variant × budget kind (equal characters, equal time)."""
    return [{"dataset": analysis.name, "variant": b.variant, "baseline": analysis.baseline,
             "kind": BUDGET_KINDS[b.axis], "budget": b.budget, "n_seeds": len(b.per_seed),
             "seeds": seed_list(b.per_seed), "paired": b.paired, "bpc_mean": b.mean.value, "bpc_ci_low": b.mean.low,
             "bpc_ci_high": b.mean.high, "bpc_min": b.minimum, "bpc_max": b.maximum, "bpc_diff": b.difference.value,
             "bpc_diff_ci_low": b.difference.low, "bpc_diff_ci_high": b.difference.high, "note": b.note}
            for b in analysis.budgets]


def write_summary(analyses: list[DatasetAnalysis], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for analysis in analyses:
            for row in target_rows(analysis) + budget_rows(analysis):
                writer.writerow({column: fmt(row.get(column)) for column in SUMMARY_COLUMNS})


# ------------------------------------------------------------------------------------------------------ report.md
def headline_target(analysis: DatasetAnalysis, variant: str) -> float | None:
    """The lowest (hardest) target at which the variant's character ratio to the baseline is defined."""
    defined = [r.target for r in analysis.reach
               if r.variant == variant and r.axis == "chars" and math.isfinite(r.ratio.value)]
    return min(defined) if defined else None


def reach_row(analysis: DatasetAnalysis, variant: str, target: float, axis: str) -> cv.ReachRow:
    return next(r for r in analysis.reach if r.variant == variant and r.target == target and r.axis == axis)


def budget_row(analysis: DatasetAnalysis, variant: str, axis: str) -> cv.BudgetRow | None:
    return next((b for b in analysis.budgets if b.variant == variant and b.axis == axis), None)


def ratio_range(analysis: DatasetAnalysis, variant: str, axis: str) -> str:
    """"0.68–0.75× over 5 targets": how stable the ratio is down the ladder."""
    values = [r.ratio.value for r in analysis.reach
              if r.variant == variant and r.axis == axis and math.isfinite(r.ratio.value)]
    if not values:
        return "n/a"
    return f"{min(values):.2f}–{max(values):.2f}× over {len(values)} target{'s' * (len(values) != 1)}"


def ladder_text(analysis: DatasetAnalysis, variant: str) -> str:
    """" Over the 5 targets ..." when more than one target has a ratio; empty otherwise."""
    defined = [r for r in analysis.reach if r.variant == variant and r.axis == "chars" and math.isfinite(r.ratio.value)]
    if len(defined) < 2:
        return ""
    return (f" Down the ladder the character ratio was {ratio_range(analysis, variant, 'chars')} and the seconds "
            f"ratio {ratio_range(analysis, variant, 'seconds')}.")


def variant_answer(analysis: DatasetAnalysis, variant: str) -> list[str]:
    """The sentences answering "did <variant> converge faster than the baseline?" from the numbers."""
    base = analysis.baseline
    target = headline_target(analysis, variant)
    runs = analysis.variants[variant]
    lines = []
    if target is None:
        reached = [f"{r.target:g}: {r.fraction_reached:.0%}" for r in analysis.reach
                   if r.variant == variant and r.axis == "chars"]
        lines.append(f"- **{variant}** ({model_size(runs)}): no target was reached by every seed of both {variant} "
                     f"and {base}, so no ratio is reported (fraction of {variant} seeds reaching each target: "
                     f"{', '.join(reached) or 'none'}).")
    else:
        ratios = {axis: reach_row(analysis, variant, target, axis).ratio for axis in cv.AXES}
        lines.append(
            f"- **{variant}** ({model_size(runs)}) reached {target:g} bpc in {ratio_text(ratios['chars'])} the "
            f"characters {base} needed, {ratio_text(ratios['steps'])} its optimizer steps and "
            f"{ratio_text(ratios['seconds'])} its training seconds. "
            f"Per step: **{speed_verdict(ratios['steps'])}**; per character: **{speed_verdict(ratios['chars'])}**; "
            f"per second: **{speed_verdict(ratios['seconds'])}**." + ladder_text(analysis, variant))
        early = [v for v in (variant, base) if "first validation point" in reach_row(analysis, v, target, "chars").note]
        if early:
            lines.append(f"  - Caution: {' and '.join(early)} already had a seed at/below {target:g} bpc at its first "
                         f"validation point, so its time to target is only an upper bound; validate more often or "
                         f"pass lower --targets.")
    for axis, what in (("chars", "characters"), ("seconds", "training seconds")):
        mine, theirs = budget_row(analysis, variant, axis), budget_row(analysis, base, axis)
        if mine is None or theirs is None:
            continue
        if not (math.isfinite(mine.mean.value) and math.isfinite(theirs.mean.value)):
            lines.append(f"  - At an equal budget of {si(mine.budget)} {what}: no comparison, a run of {variant} or "
                         f"{base} had no validation point by then.")
            continue
        lines.append(f"  - At an equal budget of {si(mine.budget)} {what}: valid bpc {mine.mean.value:.3f} "
                     f"(range {mine.minimum:.3f}–{mine.maximum:.3f}) against {base} {theirs.mean.value:.3f}; "
                     f"difference {diff_text(mine.difference)}: **{bpc_verdict(mine.difference)}**.")
    return lines


def devices(runs: list[Run]) -> str:
    found = sorted({str(lookup(r.config, "trainer.device", "?")) for r in runs})
    return ", ".join(found)


def target_table(analysis: DatasetAnalysis) -> list[str]:
    lines = ["| variant | target bpc | seeds reached | chars to target | steps ratio | chars ratio | seconds ratio |",
             "|---|---|---|---|---|---|---|"]
    for row in target_rows(analysis):
        lines.append(
            f"| {row['variant']} | {row['target_bpc']:g} | {row['fraction_reached']:.0%} | "
            f"{si(row.get('chars_mean', math.nan))} | "
            + " | ".join(ratio_text(cv.Interval(row.get(f"{a}_ratio", math.nan), row.get(f"{a}_ratio_ci_low",
                         math.nan), row.get(f"{a}_ratio_ci_high", math.nan))) for a in cv.AXES) + " |")
    return lines


def budget_table(analysis: DatasetAnalysis) -> list[str]:
    lines = [f"| variant | budget | valid bpc mean (95% CI) | min–max | difference to {analysis.baseline} |",
             "|---|---|---|---|---|"]
    for b in analysis.budgets:
        budget = si(b.budget) + (" chars" if b.axis == "chars" else " s")
        mean = (f"{b.mean.value:.3f} ({b.mean.low:.3f}–{b.mean.high:.3f})" if math.isfinite(b.mean.low)
                else f"{b.mean.value:.3f}")
        lines.append(f"| {b.variant} | {budget} | {mean} | {b.minimum:.3f}–{b.maximum:.3f} | "
                     f"{diff_text(b.difference)} |")
    return lines


def run_table(analysis: DatasetAnalysis) -> list[str]:
    lines = ["| run | variant | seed | steps | chars | seconds | final valid bpc | test bpc |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, runs in analysis.variants.items():
        for r in runs:
            lines.append(f"| `{display_path(r.source)}` | {variant} | {r.seed} | {r.last('step'):.0f} | "
                         f"{si(r.last('chars'))} | {r.last('time'):.1f} | {fmt(r.final('valid/bpc')) or 'n/a'} | "
                         f"{fmt(r.final('test/bpc')) or 'n/a'} |")
    return lines


def display_path(source: str) -> str:
    """A run directory relative to the working directory when it lies below it."""
    try:
        return str(Path(source).relative_to(Path.cwd()))
    except ValueError:
        return source


def dataset_section(analysis: DatasetAnalysis, figures: list[str]) -> list[str]:
    all_runs = [r for runs in analysis.variants.values() for r in runs]
    base = analysis.baseline
    entropy = (f" Unigram entropy of the training text: {analysis.unigram_entropy:.3f} bits (a model that learnt only "
               f"character frequencies)." if analysis.unigram_entropy is not None else "")
    lines = [f"## {analysis.name}", "", f"Scope: {scope_line(analysis)}. Devices: {devices(all_runs)}.{entropy}", ""]
    others = [v for v in analysis.variants if v != base]
    if base not in analysis.variants:
        lines += [f"No runs of the baseline variant `{base}` for this dataset: no ratios "
                  f"(variants found: {', '.join(analysis.variants)}; choose one with --baseline).", ""]
    else:
        lines += [f"On {analysis.name}, {seeds_text(analysis.variants)}, {budget_text(all_runs)}: did each "
                  f"variant converge faster than `{base}`? (ratio = variant / {base}; < 1 is faster; targets are "
                  f"validation bpc levels)", ""]
        for variant in others:
            lines += variant_answer(analysis, variant)
        lines.append("")
    fewest = min(len(runs) for runs in analysis.variants.values())
    if fewest < 3:
        lines += [f"Caution: a variant has only {fewest} seed(s); a bootstrap over so few seeds can only reflect their "
                  f"spread, so read its intervals as ranges, not as 95% guarantees.", ""]
    lines += ["Time to target (mean over seeds; a ratio needs every seed of both variants to reach the target):", ""]
    lines += target_table(analysis) + ["", "Validation bpc at an equal budget (the end of the shortest run):", ""]
    lines += budget_table(analysis) + ["", "Runs used:", ""] + run_table(analysis) + [""]
    lines += ["Figures: " + ", ".join(f"`{f}`" for f in figures), ""]
    return lines


def write_report(analyses: list[DatasetAnalysis], figures: dict[str, list[str]], path: Path, args) -> None:
    lines = [
        "# Convergence of mLSTM against LSTM",
        "",
        "Generated by `scripts/plot_convergence.py` from the runs listed below; every number is computed from their "
        "metrics.jsonl. Targets are validation bpc levels; the step, character and second at which a run reached a "
        "level is interpolated linearly between its validation points. Ratios are the mean over seeds of the "
        "variant over the mean over seeds of the baseline, with a percentile bootstrap 95% CI "
        f"({args.bootstrap} resamples of seeds, RNG seed {args.rng_seed}; seeds paired when both variants have the "
        "same ones). Seconds are training seconds (evaluation excluded): compare them only between runs on the same "
        "hardware.",
        "",
    ]
    for analysis in analyses:
        lines += dataset_section(analysis, figures[analysis.name])
    path.write_text("\n".join(lines), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------- main
def load(args) -> list[Run]:
    if args.wandb:
        return load_wandb_runs(args.wandb, args.label_key)
    return load_runs(args.paths, args.label_key)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    entropies = parse_unigram_entropy(args.unigram_entropy)
    runs = load(args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --out {out} ({error.strerror})") from None
    analyses, figures = [], {}
    for name, variants in group_runs(runs).items():
        analysis = analyse_dataset(name, variants, args, entropies)
        paths = save_single_figures(analysis, out, args) + [save_combined_figure(analysis, out, args)]
        analyses.append(analysis)
        figures[name] = [p.name for p in paths]
    write_summary(analyses, out / "summary.csv")
    write_report(analyses, figures, out / "report.md", args)
    print(f"{len(runs)} runs, {len(analyses)} dataset(s) -> {out}/report.md, summary.csv, "
          f"{sum(len(f) for f in figures.values())} figures")


if __name__ == "__main__":
    main()
