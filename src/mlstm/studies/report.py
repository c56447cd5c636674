"""The text of a convergence study (`mlstm.studies.study`): number formatting, verdicts, the rows of summary.csv and the
sections of report.md, all generated from a `DatasetAnalysis`."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from mlstm.studies import convergence as cv
from mlstm.studies.analysis import DatasetAnalysis, StudyOptions
from mlstm.studies.runs import Run, lookup

SUMMARY_COLUMNS = (
    ["dataset", "variant", "baseline", "kind", "target_bpc", "budget", "n_seeds", "seeds", "paired", "fraction_reached"]
    + [
        f"{axis}_{stat}"
        for axis in cv.AXES
        for stat in ("mean", "ci_low", "ci_high", "ratio", "ratio_ci_low", "ratio_ci_high")
    ]
    + [
        "bpc_mean",
        "bpc_ci_low",
        "bpc_ci_high",
        "bpc_min",
        "bpc_max",
        "bpc_diff",
        "bpc_diff_ci_low",
        "bpc_diff_ci_high",
        "note",
    ]
)
BUDGET_KINDS = {"chars": "equal_chars", "seconds": "equal_time"}  # summary.csv's `kind` of each budget axis


# -------------------------------------------------------------------------------------------------------- wording
def si(value: float, unit: str = "") -> str:
    """12_000_000 -> "12.0M"; a compact number for captions and sentences."""
    if value is None or not math.isfinite(value):
        return "n/a"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def interval_words(interval: cv.Interval, spec: str, between: str, unit: str = "") -> str:
    """ "<value><unit> (95% CI <low><between><high>)", or without the CI when there is none (one seed)."""
    if not math.isfinite(interval.value):
        return "n/a"
    value = f"{interval.value:{spec}}{unit}"
    if math.isfinite(interval.low):
        return f"{value} (95% CI {interval.low:{spec}}{between}{interval.high:{spec}})"
    return f"{value} (no CI: one seed)"


def ratio_text(interval: cv.Interval) -> str:
    """ "0.71× (95% CI 0.65–0.78)"."""
    return interval_words(interval, ".2f", "–", "×")


def diff_text(interval: cv.Interval) -> str:
    """ "-0.123 (95% CI -0.150 to -0.100)"."""
    return interval_words(interval, "+.3f", " to ")


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
    """ "1.52M parameters" when logged, else "hidden 256" (several values joined when runs differ)."""
    counts = sorted({r.num_parameters for r in runs if r.num_parameters})
    if counts:
        return "/".join(si(c) for c in counts) + " parameters"
    hidden = sorted({r.hidden_size for r in runs if r.hidden_size})
    return ("hidden " + "/".join(str(h) for h in hidden)) if hidden else "size unknown"


def seeds_text(variants: dict[str, list[Run]]) -> str:
    """ "3 seeds per variant (0,1,2)", or the count of each variant when they differ."""
    seeds = sorted({r.seed for runs in variants.values() for r in runs if r.seed is not None})
    counts = {len(runs) for runs in variants.values()}
    per_variant = (
        f"{counts.pop()} seed(s) per variant"
        if len(counts) == 1
        else "seeds per variant " + ", ".join(f"{v} {len(r)}" for v, r in variants.items())
    )
    return f"{per_variant} ({','.join(map(str, seeds)) or 'seed unknown'})"


def budget_text(runs: list[Run]) -> str:
    """ "up to 12.0M chars = 3750 steps of 32×100"; the longest run, with the batch shape."""
    shapes = sorted(
        {(lookup(r.config, "trainer.batch_size"), lookup(r.config, "trainer.seq_len")) for r in runs}, key=str
    )
    shape = ", ".join(f"{b}×{t}" for b, t in shapes)
    chars = max(r.last("chars") for r in runs)
    steps = max(r.last("step") for r in runs)
    return f"up to {si(chars)} chars = {steps:.0f} steps of {shape}"


def scope_line(analysis: DatasetAnalysis) -> str:
    """Data, model size per variant, seeds and budget: what every figure and table is about."""
    sizes = "; ".join(f"{v} {model_size(runs)}" for v, runs in analysis.variants.items())
    all_runs = [r for runs in analysis.variants.values() for r in runs]
    return f"{analysis.name} · {sizes} · {seeds_text(analysis.variants)} · {budget_text(all_runs)}"


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
        row = rows.setdefault(
            (r.variant, r.target),
            {
                "dataset": analysis.name,
                "variant": r.variant,
                "baseline": analysis.baseline,
                "kind": "to_target",
                "target_bpc": r.target,
                "n_seeds": len(r.per_seed),
                "seeds": seed_list(r.per_seed),
                "paired": r.paired,
                "fraction_reached": r.fraction_reached,
                "note": r.note,
            },
        )
        row.update(
            {
                f"{r.axis}_mean": r.mean.value,
                f"{r.axis}_ci_low": r.mean.low,
                f"{r.axis}_ci_high": r.mean.high,
                f"{r.axis}_ratio": r.ratio.value,
                f"{r.axis}_ratio_ci_low": r.ratio.low,
                f"{r.axis}_ratio_ci_high": r.ratio.high,
            }
        )
    return list(rows.values())


def budget_rows(analysis: DatasetAnalysis) -> list[dict]:
    """One row per variant × budget kind (equal characters, equal time)."""
    return [
        {
            "dataset": analysis.name,
            "variant": b.variant,
            "baseline": analysis.baseline,
            "kind": BUDGET_KINDS[b.axis],
            "budget": b.budget,
            "n_seeds": len(b.per_seed),
            "seeds": seed_list(b.per_seed),
            "paired": b.paired,
            "bpc_mean": b.mean.value,
            "bpc_ci_low": b.mean.low,
            "bpc_ci_high": b.mean.high,
            "bpc_min": b.minimum,
            "bpc_max": b.maximum,
            "bpc_diff": b.difference.value,
            "bpc_diff_ci_low": b.difference.low,
            "bpc_diff_ci_high": b.difference.high,
            "note": b.note,
        }
        for b in analysis.budgets
    ]


def summary_rows(analyses: Sequence[DatasetAnalysis]) -> list[dict[str, str]]:
    """summary.csv's rows, every column formatted: per dataset the time-to-target rows, then the budget rows."""
    return [
        {column: fmt(row.get(column)) for column in SUMMARY_COLUMNS}
        for analysis in analyses
        for row in target_rows(analysis) + budget_rows(analysis)
    ]


def write_summary(analyses: Sequence[DatasetAnalysis], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(summary_rows(analyses))


# ------------------------------------------------------------------------------------------------------ report.md
def headline_target(analysis: DatasetAnalysis, variant: str) -> float | None:
    """The lowest (hardest) target at which the variant's character ratio to the baseline is defined."""
    defined = [
        r.target for r in analysis.reach if r.variant == variant and r.axis == "chars" and math.isfinite(r.ratio.value)
    ]
    return min(defined) if defined else None


def reach_row(analysis: DatasetAnalysis, variant: str, target: float, axis: str) -> cv.ReachRow:
    return next(r for r in analysis.reach if r.variant == variant and r.target == target and r.axis == axis)


def budget_row(analysis: DatasetAnalysis, variant: str, axis: str) -> cv.BudgetRow | None:
    return next((b for b in analysis.budgets if b.variant == variant and b.axis == axis), None)


def ratio_range(analysis: DatasetAnalysis, variant: str, axis: str) -> str:
    """ "0.68–0.75× over 5 targets": how stable the ratio is down the ladder."""
    values = [
        r.ratio.value
        for r in analysis.reach
        if r.variant == variant and r.axis == axis and math.isfinite(r.ratio.value)
    ]
    if not values:
        return "n/a"
    return f"{min(values):.2f}–{max(values):.2f}× over {len(values)} target{'s' * (len(values) != 1)}"


def ladder_text(analysis: DatasetAnalysis, variant: str) -> str:
    """ " Over the 5 targets ..." when more than one target has a ratio; empty otherwise."""
    defined = [r for r in analysis.reach if r.variant == variant and r.axis == "chars" and math.isfinite(r.ratio.value)]
    if len(defined) < 2:
        return ""
    return (
        f" Down the ladder the character ratio was {ratio_range(analysis, variant, 'chars')} and the seconds "
        f"ratio {ratio_range(analysis, variant, 'seconds')}."
    )


def variant_answer(analysis: DatasetAnalysis, variant: str) -> list[str]:
    """The sentences answering "did <variant> converge faster than the baseline?" from the numbers."""
    base = analysis.baseline
    target = headline_target(analysis, variant)
    runs = analysis.variants[variant]
    lines = []
    if target is None:
        reached = [
            f"{r.target:g}: {r.fraction_reached:.0%}"
            for r in analysis.reach
            if r.variant == variant and r.axis == "chars"
        ]
        lines.append(
            f"- **{variant}** ({model_size(runs)}): no target was reached by every seed of both {variant} "
            f"and {base}, so no ratio is reported (fraction of {variant} seeds reaching each target: "
            f"{', '.join(reached) or 'none'})."
        )
    else:
        ratios = {axis: reach_row(analysis, variant, target, axis).ratio for axis in cv.AXES}
        lines.append(
            f"- **{variant}** ({model_size(runs)}) reached {target:g} bpc in {ratio_text(ratios['chars'])} the "
            f"characters {base} needed, {ratio_text(ratios['steps'])} its optimizer steps and "
            f"{ratio_text(ratios['seconds'])} its training seconds. "
            f"Per step: **{speed_verdict(ratios['steps'])}**; per character: **{speed_verdict(ratios['chars'])}**; "
            f"per second: **{speed_verdict(ratios['seconds'])}**." + ladder_text(analysis, variant)
        )
        early = [v for v in (variant, base) if "first validation point" in reach_row(analysis, v, target, "chars").note]
        if early:
            lines.append(
                f"  - Caution: {' and '.join(early)} already had a seed at/below {target:g} bpc at its first "
                f"validation point, so its time to target is only an upper bound; validate more often or "
                f"pass lower --targets."
            )
    for axis, what in (("chars", "characters"), ("seconds", "training seconds")):
        mine, theirs = budget_row(analysis, variant, axis), budget_row(analysis, base, axis)
        if mine is None or theirs is None:
            continue
        if not (math.isfinite(mine.mean.value) and math.isfinite(theirs.mean.value)):
            lines.append(
                f"  - At an equal budget of {si(mine.budget)} {what}: no comparison, a run of {variant} or "
                f"{base} had no validation point by then."
            )
            continue
        lines.append(
            f"  - At an equal budget of {si(mine.budget)} {what}: valid bpc {mine.mean.value:.3f} "
            f"(range {mine.minimum:.3f}–{mine.maximum:.3f}) against {base} {theirs.mean.value:.3f}; "
            f"difference {diff_text(mine.difference)}: **{bpc_verdict(mine.difference)}**."
        )
    return lines


def devices(runs: list[Run]) -> str:
    found = sorted({str(lookup(r.config, "trainer.device", "?")) for r in runs})
    return ", ".join(found)


def target_table(analysis: DatasetAnalysis) -> list[str]:
    lines = [
        "| variant | target bpc | seeds reached | chars to target | steps ratio | chars ratio | seconds ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in target_rows(analysis):
        lines.append(
            f"| {row['variant']} | {row['target_bpc']:g} | {row['fraction_reached']:.0%} | "
            f"{si(row.get('chars_mean', math.nan))} | "
            + " | ".join(
                ratio_text(
                    cv.Interval(
                        row.get(f"{a}_ratio", math.nan),
                        row.get(f"{a}_ratio_ci_low", math.nan),
                        row.get(f"{a}_ratio_ci_high", math.nan),
                    )
                )
                for a in cv.AXES
            )
            + " |"
        )
    return lines


def budget_table(analysis: DatasetAnalysis) -> list[str]:
    lines = [
        f"| variant | budget | valid bpc mean (95% CI) | min–max | difference to {analysis.baseline} |",
        "|---|---|---|---|---|",
    ]
    for b in analysis.budgets:
        budget = si(b.budget) + (" chars" if b.axis == "chars" else " s")
        mean = (
            f"{b.mean.value:.3f} ({b.mean.low:.3f}–{b.mean.high:.3f})"
            if math.isfinite(b.mean.low)
            else f"{b.mean.value:.3f}"
        )
        lines.append(
            f"| {b.variant} | {budget} | {mean} | {b.minimum:.3f}–{b.maximum:.3f} | {diff_text(b.difference)} |"
        )
    return lines


def run_table(analysis: DatasetAnalysis) -> list[str]:
    lines = [
        "| run | variant | seed | steps | chars | seconds | final valid bpc | test bpc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, runs in analysis.variants.items():
        for r in runs:
            lines.append(
                f"| `{display_path(r.source)}` | {variant} | {r.seed} | {r.last('step'):.0f} | "
                f"{si(r.last('chars'))} | {r.last('time'):.1f} | {fmt(r.final('valid/bpc')) or 'n/a'} | "
                f"{fmt(r.final('test/bpc')) or 'n/a'} |"
            )
    return lines


def display_path(source: str) -> str:
    """A run directory relative to the working directory when it lies below it."""
    try:
        return str(Path(source).relative_to(Path.cwd()))
    except ValueError:
        return source


def dataset_section(analysis: DatasetAnalysis) -> list[str]:
    """report.md's section of one dataset: the answer per variant, the tables, the runs used and the figures."""
    all_runs = [r for runs in analysis.variants.values() for r in runs]
    base = analysis.baseline
    entropy = (
        f" Unigram entropy of the training text: {analysis.unigram_entropy:.3f} bits (a model that learnt only "
        f"character frequencies)."
        if analysis.unigram_entropy is not None
        else ""
    )
    lines = [f"## {analysis.name}", "", f"Scope: {scope_line(analysis)}. Devices: {devices(all_runs)}.{entropy}", ""]
    others = [v for v in analysis.variants if v != base]
    if base not in analysis.variants:
        lines += [
            f"No runs of the baseline variant `{base}` for this dataset: no ratios "
            f"(variants found: {', '.join(analysis.variants)}; choose one with --baseline).",
            "",
        ]
    else:
        lines += [
            f"On {analysis.name}, {seeds_text(analysis.variants)}, {budget_text(all_runs)}: did each "
            f"variant converge faster than `{base}`? (ratio = variant / {base}; < 1 is faster; targets are "
            f"validation bpc levels)",
            "",
        ]
        for variant in others:
            lines += variant_answer(analysis, variant)
        lines.append("")
    fewest = min(len(runs) for runs in analysis.variants.values())
    if fewest < 3:
        lines += [
            f"Caution: a variant has only {fewest} seed(s); a bootstrap over so few seeds can only reflect their "
            f"spread, so read its intervals as ranges, not as 95% guarantees.",
            "",
        ]
    lines += ["Time to target (mean over seeds; a ratio needs every seed of both variants to reach the target):", ""]
    lines += target_table(analysis) + ["", "Validation bpc at an equal budget (the end of the shortest run):", ""]
    lines += budget_table(analysis) + ["", "Runs used:", ""] + run_table(analysis) + [""]
    lines += ["Figures: " + ", ".join(f"`{f}`" for f in analysis.figures), ""]
    return lines


def report_text(analyses: Sequence[DatasetAnalysis], options: StudyOptions) -> str:
    """report.md: how the numbers were computed, then one section per dataset."""
    lines = [
        f"# {options.title}",
        "",
        f"Generated by {options.generated_by} from the runs listed below; every number is computed from their "
        "metrics.jsonl. Targets are validation bpc levels; the step, character and second at which a run reached a "
        "level is interpolated linearly between its validation points. Ratios are the mean over seeds of the "
        "variant over the mean over seeds of the baseline, with a percentile bootstrap 95% CI "
        f"({options.bootstrap} resamples of seeds, RNG seed {options.rng_seed}; seeds paired when both variants have "
        "the same ones). Seconds are training seconds (evaluation excluded): compare them only between runs on the "
        "same hardware.",
        "",
    ]
    for analysis in analyses:
        lines += dataset_section(analysis)
    return "\n".join(lines)


def write_report(analyses: Sequence[DatasetAnalysis], path: Path, options: StudyOptions) -> None:
    Path(path).write_text(report_text(analyses, options), encoding="utf-8")
