"""The tuned study, written down: the grid under the rule (mlstm.studies.tuning), the sensitivity figure, and best
against best beside the shared rate.

    tuning runs ─► select() ─► grid table, chosen rates, unstable/diverged runs, sensitivity figure
    final runs (each cell at its chosen rate, fresh seeds) ─► ratios to the LSTM with bootstrap CIs
                                                              (mlstm.studies.convergence)
    shared-rate runs (every cell at one rate) ─► the same ratios, side by side: what tuning changed
    post-hoc runs (cells at rates the rule did not choose, fresh seeds) ─► a labelled check beside the finals

Everything here reads runs (mlstm.studies.runs.Run); `scripts/tune.py report` is the command-line entry point.
"""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mlstm.studies import convergence as cv  # noqa: E402
from mlstm.studies import tuning  # noqa: E402
from mlstm.studies.figures import variant_colour  # noqa: E402
from mlstm.studies.runs import Run, curves_by_seed, group_runs, lookup  # noqa: E402

SENSITIVITY_COLUMNS = (
    "dataset",
    "variant",
    "lr",
    "n_seeds",
    "seeds",
    "score",
    "scored_seeds",
    "final_mean",
    "final_min",
    "final_max",
    "unstable_seeds",
    "diverged_seeds",
    "chosen",
)


def fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def interval_text(interval: cv.Interval, digits: int = 2, suffix: str = "") -> str:
    if not math.isfinite(interval.value):
        return "–"
    ci = (
        f" ({interval.low:.{digits}f} to {interval.high:.{digits}f})"
        if math.isfinite(interval.low) and math.isfinite(interval.high)
        else ""
    )
    return f"{interval.value:.{digits}f}{suffix}{ci}"


def seeds_text(seeds: Sequence) -> str:
    return ", ".join(str(s) for s in seeds)


# ------------------------------------------------------------------------------------------------ the grid and rule
def rule_text() -> list[str]:
    """The selection rule in words, from the constants the code applies (so the report cannot drift from it)."""
    quarter = int(round(tuning.LAST_FRACTION * 100))
    return [
        "Selection rule (fixed before any tuning run was looked at; the same for every cell and dataset; "
        "`mlstm.studies.tuning`):",
        "",
        f"1. A run's score is its validation bpc averaged over the evaluation points of the last {quarter}% of the "
        "budget (steps ≥ 3/4 of the budget). A diverged run, or one with a non-finite validation bpc there, "
        "scores +inf (the worst).",
        "2. A rate's score is the mean of its runs' scores over the tuning seeds every rate of that cell has.",
        "3. The lowest score wins; a tie goes to the smaller rate. A winner at either end of the grid means the grid "
        "is extended until the winner is strictly inside.",
        f"4. A run whose validation bpc is more than {tuning.UNSTABLE_GAP:g} bpc above its training bpc late in the "
        "run is reported as unstable (its state blew up on the long validation stream); its score already counts it.",
        "",
        "Tuning runs never evaluate the test split; the final runs use fresh seeds that tuning never saw.",
    ]


def grid_table(selections: Sequence[tuning.Selection]) -> list[str]:
    """Cells × rates: each rate's score; **bold** = chosen, † = an unstable run, ✗ = a diverged run."""
    rates = sorted({r.lr for s in selections for r in s.rates})
    lines = [
        "| cell | " + " | ".join(f"{lr:g}" for lr in rates) + " | chosen |",
        "| --- | " + " | ".join("---" for _ in rates) + " | --- |",
    ]
    for sel in selections:
        by_lr = {r.lr: r for r in sel.rates}
        cells = []
        for lr in rates:
            rate = by_lr.get(lr)
            if rate is None:
                cells.append("")
                continue
            text = fmt(rate.score) if math.isfinite(rate.score) else "unfinished" if rate.unfinished_seeds else "inf"
            marks = ("†" if rate.unstable_seeds else "") + ("✗" if rate.diverged_seeds else "")
            text = f"**{text}**" if lr == sel.chosen else text
            cells.append(text + marks)
        chosen = "none" if sel.chosen is None else f"{sel.chosen:g}" + (" (grid edge)" if sel.at_edge else "")
        lines.append(f"| {sel.variant} | " + " | ".join(cells) + f" | {chosen} |")
    return lines


def sensitivity_rows(selections: Sequence[tuning.Selection]) -> list[dict]:
    rows = []
    for sel in selections:
        for rate in sel.rates:
            finals = [v for v in rate.final_by_seed.values()]
            finite = [v for v in finals if math.isfinite(v)]
            rows.append(
                {
                    "dataset": sel.dataset,
                    "variant": sel.variant,
                    "lr": f"{rate.lr:g}",
                    "n_seeds": len(rate.per_seed),
                    "seeds": " ".join(map(str, rate.per_seed)),
                    "score": f"{rate.score:.6f}",
                    "scored_seeds": " ".join(map(str, rate.scored_seeds)),
                    "final_mean": f"{np.mean(finals):.6f}" if finals and len(finite) == len(finals) else "inf",
                    "final_min": f"{min(finite):.6f}" if finite else "inf",
                    "final_max": f"{max(finals):.6f}" if finals else "inf",
                    "unstable_seeds": " ".join(map(str, rate.unstable_seeds)),
                    "diverged_seeds": " ".join(map(str, rate.diverged_seeds)),
                    "chosen": str(rate.lr == sel.chosen).lower(),
                }
            )
    return rows


def write_csv(rows: list[dict], columns: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def sensitivity_figure(
    selections: Sequence[tuning.Selection],
    path: Path,
    title: str,
    unigram_entropy: float | None = None,
    colours: dict | None = None,
) -> Path:
    """Validation bpc at the end of the budget against the learning rate (log x): one line per cell (mean over
    seeds), a min–max band over seeds, the chosen rate ringed, diverged runs as ✗ on the top edge."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ceiling = None
    finite_all = [v for s in selections for r in s.rates for v in r.final_by_seed.values() if math.isfinite(v)]
    if finite_all:
        ceiling = max(finite_all + ([unigram_entropy] if unigram_entropy else [])) + 0.3
    for sel in selections:
        colour = (colours or {}).get(sel.variant) or variant_colour(sel.variant)
        lrs = np.array([r.lr for r in sel.rates])
        finals = [np.array(list(r.final_by_seed.values()), dtype=float) for r in sel.rates]
        mean = np.array([f.mean() if np.isfinite(f).all() else np.nan for f in finals])
        low = np.array([np.nanmin(f) if np.isfinite(f).any() else np.nan for f in finals])
        high = np.array([np.nanmax(f) if np.isfinite(f).any() else np.nan for f in finals])
        n = max((len(f) for f in finals), default=0)
        ax.plot(lrs, mean, "o-", color=colour, lw=1.6, ms=4, label=f"{sel.variant} ({n} seed{'s' * (n != 1)})")
        if n > 1:
            ax.fill_between(lrs, low, high, color=colour, alpha=0.2, lw=0)
        for rate in sel.rates:
            if ceiling is not None and rate.diverged_seeds:
                ax.plot([rate.lr], [ceiling], "x", color=colour, ms=8, mew=2)
        if sel.chosen is not None:
            k = [r.lr for r in sel.rates].index(sel.chosen)
            if np.isfinite(mean[k]):
                ax.plot([sel.chosen], [mean[k]], "o", ms=12, mfc="none", mec=colour, mew=1.5)
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="grey", ls="--", lw=1, label=f"unigram entropy {unigram_entropy:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("Adam learning rate")
    ax.set_ylabel("validation bpc at the end of the budget")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- best against best, shared
def extend_targets(base: Sequence[float], floor: float, step: float | None = None) -> list[float]:
    """The shared-rate study's ladder of target levels, extended downwards in `step`s (default: the ladder's last
    step) while `floor` is still below the level, so that each added level is reached by the runs `floor` stands for."""
    targets = sorted(set(base), reverse=True)
    step = step or (round(targets[-2] - targets[-1], 6) if len(targets) > 1 else 0.4)
    level = round(targets[-1] - step, 6)
    while level >= floor:
        targets.append(level)
        level = round(level - step, 6)
    return targets


def pair_floor(runs: Sequence[Run], baseline: str) -> float:
    """The level down to which the report's ladder goes: for every cell, the worst final validation bpc of it and
    the baseline (the level every seed of both reaches); the lowest of these over the cells. Levels below a cell's
    own pair floor show `–` for it (not every seed got there)."""
    final = {}
    for run in runs:
        value = run.final("valid/bpc")  # None or non-finite for a diverged run: it reaches no level
        final.setdefault(run.label, []).append(value if value is not None and math.isfinite(value) else math.inf)
    base = max(final.get(baseline, [math.inf]))
    pairs = [max(base, max(values)) for label, values in final.items() if label != baseline]
    return min(pairs) if pairs else base


def valid_curves(runs: Sequence[Run]) -> dict:
    by_variant = {}
    for run in runs:
        by_variant.setdefault(run.label, []).append(run)
    return {v: {k: c for k, c in curves_by_seed(rs, "valid/bpc").items() if len(c.y)} for v, rs in by_variant.items()}


def reach_table(
    tuned: Sequence[Run],
    shared: Sequence[Run],
    targets: Sequence[float],
    baseline: str,
    n_resamples: int = cv.N_RESAMPLES,
) -> list[str]:
    """Per mLSTM form and target: chars / steps / seconds to the target as a ratio to the baseline, tuned (each cell
    at its own rate) beside shared (every cell at one rate). `–`: not every seed of both reached the target."""
    rows = {}
    for name, runs in (("tuned", tuned), ("shared", shared)):
        if not runs:
            continue
        for row in cv.compare_reach(valid_curves(runs), targets, baseline, n_resamples=n_resamples):
            rows[(name, row.variant, row.target, row.axis)] = row
    variants = sorted({key[1] for key in rows if key[1] != baseline})
    lines = [
        "| cell | target bpc | chars ratio, tuned | chars ratio, shared rate | steps ratio, tuned | "
        "seconds ratio, tuned | seconds ratio, shared rate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant in variants:
        for target in targets:

            def cell(study: str, axis: str) -> str:
                row = rows.get((study, variant, target, axis))
                return interval_text(row.ratio, suffix="×") if row is not None else "not run"

            lines.append(
                f"| {variant} | {target:g} | {cell('tuned', 'chars')} | {cell('shared', 'chars')} | "
                f"{cell('tuned', 'steps')} | {cell('tuned', 'seconds')} | {cell('shared', 'seconds')} |"
            )
    return lines


def budget_table(runs: Sequence[Run], baseline: str, n_resamples: int = cv.N_RESAMPLES) -> list[str]:
    """Validation bpc at equal budgets (characters, seconds): mean (95% bootstrap CI), difference to the baseline."""
    curves = valid_curves(runs)
    lines = ["| cell | budget | valid bpc | difference to " + baseline + " |", "| --- | --- | --- | --- |"]
    for axis, unit in (("chars", "characters"), ("seconds", "training seconds")):
        for row in cv.compare_at_budget(curves, baseline, axis, n_resamples):
            budget = f"{row.budget:,.0f} {unit}"
            diff = "" if row.variant == baseline else interval_text(row.difference, 3)
            lines.append(f"| {row.variant} | {budget} | {interval_text(row.mean, 3)} | {diff} |")
    return lines


def test_table(runs: Sequence[Run], baseline: str, n_resamples: int = cv.N_RESAMPLES) -> list[str]:
    """Test-split bpc of the final runs (whole test split, one stream): mean (95% bootstrap CI) and per seed; † marks
    a run unstable on the test stream (rule 4: test bpc more than UNSTABLE_GAP above its last training bpc)."""
    groups = group_runs(runs)
    lines = [
        "| cell | lr | test bpc | difference to " + baseline + " | unstable runs | per seed (†: unstable) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variants in groups.values():
        base = {r.seed: r.final("test/bpc") for r in variants.get(baseline, [])}
        for variant, vruns in variants.items():
            per_seed = {r.seed: r.final("test/bpc") for r in sorted(vruns, key=lambda r: r.seed)}
            lrs = sorted({tuning.learning_rate(r.config) for r in vruns})
            mean = cv.bootstrap_mean(list(per_seed.values()), n_resamples)
            diff = ""
            if variant != baseline and base:
                a, b, paired = cv.pair_by_seed(per_seed, base)
                diff = interval_text(cv.bootstrap_difference_of_means(a, b, paired, n_resamples), 3)
            flagged = {r.seed for r in vruns if tuning.unstable_on(r.records, "test/bpc")}
            seeds = ", ".join(f"{s}: {fmt(v)}{'†' if s in flagged else ''}" for s, v in per_seed.items())
            lines.append(
                f"| {variant} | {', '.join(f'{lr:g}' for lr in lrs)} | {interval_text(mean, 3)} | {diff} | "
                f"{len(flagged)} of {len(per_seed)} | {seeds} |"
            )
    return lines


def cold_start_lines(runs: Sequence[Run]) -> list[str]:
    """The cold-start check of the final runs (the test split as N streams, each from a zero state; the trainer's
    `cold_start_streams`): how many streams blew up (rule 4 per stream), per cell and seed. [] when no run has it."""
    counted = {id(r): tuning.blown_streams(r.records) for r in runs}
    if not any(counted.values()):
        return []
    lines = [
        "Cold starts: the test split read again as streams that each start from a zero state; a stream more than "
        f"{tuning.UNSTABLE_GAP:g} bpc above the run's last training bpc has blown up (its state fell into a "
        "regime it never left).",
        "",
        "| cell | lr | streams blown up | runs with a blow-up | per seed (blown of streams) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variants in group_runs(runs).values():
        for variant, vruns in variants.items():
            checked = [(r.seed, counted[id(r)]) for r in sorted(vruns, key=lambda r: r.seed) if counted[id(r)]]
            if not checked:
                continue
            lrs = sorted({tuning.learning_rate(r.config) for r in vruns})
            blown, total = sum(b for _, (b, _) in checked), sum(n for _, (_, n) in checked)
            seeds = ", ".join(f"{seed}: {b} of {n}" for seed, (b, n) in checked)
            lines.append(
                f"| {variant} | {', '.join(f'{lr:g}' for lr in lrs)} | {blown} of {total} "
                f"({blown / total:.0%}) | {sum(b > 0 for _, (b, _) in checked)} of {len(checked)} | "
                f"{seeds} |"
            )
    return lines + [""]


def at_rate(runs: Sequence[Run]) -> list[Run]:
    """Copies labelled with their rate ("lstm @ 0.004"), so one cell at two rates is two groups of a table."""
    return [replace(r, label=f"{r.label} @ {tuning.learning_rate(r.config):g}") for r in runs]


def posthoc_lines(
    final: Sequence[Run],
    posthoc: Sequence[Run],
    targets: Sequence[float],
    baseline: str,
    n_resamples: int = cv.N_RESAMPLES,
) -> list[str]:
    """A check outside the rule, labelled as one: cells run with fresh seeds at rates the rule did not choose,
    beside their final runs at the chosen rate (a cell rerun at its chosen rate among the post-hoc runs, e.g. to add
    the cold-start check, is read from the post-hoc runs instead). Every table is relative to the baseline cell at
    its lowest post-hoc rate."""
    posthoc = at_rate(posthoc)
    cells = {r.label.split(" @ ")[0] for r in posthoc}
    runs = [r for r in at_rate([r for r in final if r.label in cells]) if r.label not in {p.label for p in posthoc}]
    runs += posthoc
    base_lrs = sorted({tuning.learning_rate(r.config) for r in posthoc if r.label.split(" @ ")[0] == baseline})
    base = f"{baseline} @ {base_lrs[0]:g}" if base_lrs else baseline
    groups = {
        label: sorted({r.seed for r in runs if r.label == label}, key=str) for label in sorted({r.label for r in runs})
    }
    lines = [
        "### Post-hoc check: other rates (not part of the rule)",
        "",
        "Chosen after the final runs had been seen, so it cannot change the answer above; it says what that "
        "answer depends on. Runs: "
        + "; ".join(f"{label} (seeds {seeds_text(seeds)})" for label, seeds in groups.items())
        + f". Ratios and differences are to {base}.",
        "",
        "| cell | target bpc | chars ratio | steps ratio |",
        "| --- | --- | --- | --- |",
    ]
    reach = {
        (row.variant, row.target, row.axis): row
        for row in cv.compare_reach(valid_curves(runs), targets, base, axes=("chars", "steps"), n_resamples=n_resamples)
    }
    for label in groups:
        if label == base:
            continue
        for target in targets:
            ratios = [interval_text(reach[(label, target, axis)].ratio, suffix="×") for axis in ("chars", "steps")]
            lines.append(f"| {label} | {target:g} | {ratios[0]} | {ratios[1]} |")
    return lines + [
        "",
        *budget_table(runs, base, n_resamples),
        "",
        *test_table(runs, base, n_resamples),
        "",
        *cold_start_lines(runs),
    ]


# ------------------------------------------------------------------------------------------------------ the report
def posted_cell_text(sel: tuning.Selection, entropy: float | None) -> str:
    """Whether any rate made a cell learn: its best end-of-budget validation bpc against the unigram entropy."""
    finals = [v for r in sel.rates for v in r.final_by_seed.values() if math.isfinite(v)]
    if not finals:
        return f"{sel.variant}: every run diverged or did not finish."
    best = min(finals)
    best_lr = next(r.lr for r in sel.rates if best in r.final_by_seed.values())
    if entropy is None:
        return f"{sel.variant}: best end-of-budget validation bpc {best:.3f} (at {best_lr:g})."
    verdict = "below" if best < entropy - 0.1 else "not clearly below"
    return (
        f"{sel.variant}: best end-of-budget validation bpc {best:.3f} (at {best_lr:g}), {verdict} the unigram "
        f"entropy {entropy:.2f}."
    )


def dataset_report(
    dataset: str,
    selections: Sequence[tuning.Selection],
    final: Sequence[Run],
    shared: Sequence[Run],
    targets: Sequence[float],
    entropy: float | None,
    figures: Sequence[str],
    baseline: str,
    n_resamples: int,
    posthoc: Sequence[Run] = (),
) -> list[str]:
    lines = [
        f"## {dataset}",
        "",
        "### The grid",
        "",
        "Score of every rate under the rule (mean validation bpc over the last quarter of the budget, over the "
        "common tuning seeds); **bold**: chosen; †: a run was unstable; ✗: a run diverged; inf: diverged or "
        "never reached the last quarter.",
        "",
        *grid_table(selections),
        "",
    ]
    for sel in selections:
        seeds = sorted({s for r in sel.rates for s in r.per_seed}, key=str)
        unstable = [f"{r.lr:g} (seeds {seeds_text(r.unstable_seeds)})" for r in sel.rates if r.unstable_seeds]
        diverged = [f"{r.lr:g} (seeds {seeds_text(r.diverged_seeds)})" for r in sel.rates if r.diverged_seeds]
        line = (
            f"- {sel.variant}: {len(sel.rates)} rates, {sel.span:g}× span, tuning seeds {seeds_text(seeds)}; "
            f"unstable: {', '.join(unstable) or 'none'}; diverged: {', '.join(diverged) or 'none'}."
        )
        lines.append(line + "".join(f" {note[0].upper()}{note[1:]}." for note in sel.notes))
    lines += ["", *[f"- {posted_cell_text(sel, entropy)}" for sel in selections], ""]
    lines += [f"![sensitivity]({figures[0]})", ""] if figures else []
    if not final:
        return lines + ["Best against best: not run yet (no final runs for this dataset).", ""]
    chosen = {sel.variant: sel.chosen for sel in selections}
    final_lrs = {run.label: tuning.learning_rate(run.config) for run in final}
    mismatched = [v for v, lr in final_lrs.items() if chosen.get(v) is not None and chosen[v] != lr]
    seeds = sorted({run.seed for run in final}, key=str)
    lines += [
        "### Best against best",
        "",
        f"Each cell at its chosen rate ({', '.join(f'{v} {lr:g}' for v, lr in sorted(final_lrs.items()))}), "
        f"fresh seeds {seeds_text(seeds)}. Ratios to {baseline}: mean over seeds of the cell over the mean of "
        f"{baseline} (< 1: faster), 95% percentile bootstrap CI over seeds ({n_resamples} resamples). "
        '"shared rate": the same statistic for the study in which every cell had one rate '
        f"({shared_rate_text(shared)}). Seconds are training seconds on this machine.",
        "",
    ]
    if mismatched:
        lines += [f"Warning: final runs of {', '.join(mismatched)} are not at the rate the rule chose.", ""]
    lines += [
        *reach_table(final, shared, targets, baseline, n_resamples),
        "",
        "Validation bpc at equal budgets (the largest number of characters / training seconds every final run "
        "reached):",
        "",
        *budget_table(final, baseline, n_resamples),
        "",
        "Test-split bpc of the final runs (the whole test split as one stream):",
        "",
        *test_table(final, baseline, n_resamples),
        "",
        *cold_start_lines(final),
    ]
    lines += [f"![best against best]({name})" for name in figures[1:]] + [""]
    if posthoc:
        lines += posthoc_lines(final, posthoc, targets, baseline, n_resamples)
    return lines


def shared_rate_text(shared: Sequence[Run]) -> str:
    if not shared:
        return "not given"
    lrs = sorted({tuning.learning_rate(r.config) for r in shared})
    seeds = sorted({r.seed for r in shared}, key=str)
    return f"Adam {', '.join(f'{lr:g}' for lr in lrs)}, seeds {seeds_text(seeds)}"


def write_tuned_study(
    tuning_runs: Sequence[Run],
    final: Sequence[Run],
    shared: Sequence[Run],
    out: str | Path,
    targets: dict | None = None,
    baseline: str = "lstm",
    n_resamples: int = cv.N_RESAMPLES,
    posthoc: Sequence[Run] = (),
) -> list[tuning.Selection]:
    """report.md, summary.csv (the grid), <dataset>_lr_sensitivity.png and, where final runs exist, the convergence
    study of the final runs (mlstm.studies.study.write_study) in <out>/<dataset>_final/; post-hoc runs, when given, get
    their labelled section after the final runs'."""
    from mlstm.studies import study

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    selections = tuning.select(tuning_runs)
    write_csv(sensitivity_rows(selections), SENSITIVITY_COLUMNS, out / "summary.csv")
    lines = [
        "# The fair answer: every cell at its own learning rate",
        "",
        "Generated by `scripts/tune.py report` from the runs under `runs/` (tuning) and `final/` (best against "
        "best); every number is computed from their metrics.jsonl.",
        "",
        *rule_text(),
        "",
    ]
    for dataset in sorted({s.dataset for s in selections}):
        chosen = [s for s in selections if s.dataset == dataset]
        in_data = [r for r in tuning_runs if r.dataset == dataset]
        entropy = study.unigram_entropy(dataset, in_data, {})
        budget = max(tuning.budget_steps(r.config) for r in in_data)
        sizes = sorted({r.num_parameters for r in in_data if r.num_parameters})
        size = (
            "parameters unknown"
            if not sizes
            else f"{sizes[0] / 1e6:.2f}M parameters"
            if len(sizes) == 1
            else f"{sizes[0] / 1e6:.2f}M–{sizes[-1] / 1e6:.2f}M parameters"
        )
        batch = lookup(in_data[0].config, "trainer.batch_size"), lookup(in_data[0].config, "trainer.seq_len")
        figures = [
            sensitivity_figure(
                chosen,
                out / f"{dataset}_lr_sensitivity.png",
                textwrap.fill(
                    f"{dataset}, {size}: validation bpc after {budget} steps of {batch[0]} x {batch[1]} characters "
                    f"against the Adam learning rate; mean over tuning seeds, band min–max, ring: chosen, "
                    f"✗: a diverged run",
                    110,
                ),
                entropy,
            ).name
        ]
        dataset_final = [r for r in final if r.dataset == dataset]
        dataset_shared = [r for r in shared if r.dataset == dataset and r.label in {s.variant for s in chosen}]
        ladder = list((targets or {}).get(dataset) or [])
        if dataset_final:
            floor = pair_floor(dataset_final, baseline)
            ladder = extend_targets(ladder or [round(floor + 1.2, 1)], floor)
            options = study.StudyOptions(
                baseline=baseline,
                targets=ladder,
                bootstrap=n_resamples,
                title=f"Best against best on {dataset}: each cell at its own rate",
                generated_by="`scripts/tune.py report`",
            )
            sub = out / f"{dataset}_final"
            (analysis,) = study.write_study(dataset_final, sub, options)
            figures += [f"{sub.name}/{name}" for name in analysis.figures if name.endswith("_convergence.png")]
        lines += dataset_report(
            dataset,
            chosen,
            dataset_final,
            dataset_shared,
            ladder,
            entropy,
            figures,
            baseline,
            n_resamples,
            [r for r in posthoc if r.dataset == dataset],
        )
    (out / "report.md").write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return selections
