"""Does the mLSTM's advantage grow with model size? The analysis of a tuned size ladder.

A **rung** is one model size: the variant presets `lstm_<rung>`, `mlstm_paper_<rung>`, `mlstm_seed_gated_<rung>`
(`configs/variant/*_300k|_1m|_5m|_20m.yaml`, equal parameter counts within 2%). A run's rung is read from its
directory, `<dataset>/<preset>/lr<rate>-seed<seed>` as the scale sweeps write it (the path component named like a
preset); a run found elsewhere is put on a rung by its parameter count (runs within 5% of each other share one).

Per dataset and rung, with the LSTM as the baseline ("best against best": every cell at its own tuned rate, fresh
seeds):

    target          the LSTM's best level: the highest of the LSTM seeds' lowest validation bpc (rounded up to
                    0.001), a level every LSTM seed reaches within the budget
    ratio           characters a cell needs to reach that level, mean over seeds, over the LSTM's (< 1: faster),
                    with the percentile bootstrap CI of mlstm.studies.convergence (paired by seed when the seeds match);
                    a cell with a seed that never gets there has no ratio, only a lower bound (its budget counted)
    common level    the level both cells reach: the higher of the two cells' best levels (every seed of both
                    reaches it within the budget), so its ratio is always defined. Where the mLSTM ends below the
                    LSTM it is the LSTM's best level; where it ends above, it is the mLSTM's own best level, and the
                    ratio says how much longer the mLSTM takes to get where it ends (the figure's line)
    ladder          the ratio at five levels between the first validation point and the worst best level
                    (mlstm.studies.convergence.default_targets), as a min-max range
    final bpc       validation and training bpc at the end of the budget, mean and seed range; the difference of
                    the final validation bpc to the LSTM's with its bootstrap CI
    overfitting     per run: the step of its lowest validation bpc and how far validation rose after it (a rise
                    above RISE_TOL bpc counts), and the step from which validation minus training bpc stays more
                    than GAP_TOL above its running minimum, from the first quarter of the run on (the gap
                    onset). Within the first pass over the training text the training bpc is measured on text the
                    model has not seen, so a growing gap needs the second pass (the first record with `epoch` >= 1
                    says where it starts)

The tuning runs, when given, are ruled per rung with `mlstm.studies.tuning.select` (the same rule as every other grid):
the chosen rate per cell and rung, whether it sits at the grid's edge, and the rate to extend to.

The report (plain-word sentences, the figure, report.md, scale_summary.csv, selection.json) is in
`mlstm.studies.scaling_report`; `scripts/scale_report.py` is its command line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mlstm.studies import tuning
from mlstm.studies.convergence import (
    Interval,
    bootstrap_difference_of_means,
    compare_reach,
    default_targets,
    pair_by_seed,
)
from mlstm.studies.formatting import finite
from mlstm.studies.runs import Run, curves_by_seed, seed_keys

BASELINE = "lstm"
RISE_TOL = 0.01  # bpc: validation this far above its minimum at the end has risen (not noise of the last digit)
GAP_TOL = 0.05  # bpc: valid - train this far above its running minimum, to the end, is a growing gap
EARLY_FRACTION = 0.25  # the gap onset is looked for from this fraction of the run on
CLUSTER_TOL = 0.05  # runs without a preset in their path: parameter counts within 5% share a rung
LADDER_LEVELS = 5
METRIC = "valid/bpc"
# a path component named like a variant preset: lstm_300k, mlstm_paper_1m, mlstm_seed_gated_20m
PRESET = re.compile(r"^(?P<cell>[a-z][a-z0-9_]*?)_(?P<rung>\d+(?:\.\d+)?[km])$")
COLORS = {
    "lstm": "black",
    "mlstm-paper": "tab:blue",
    "mlstm-seed-gated": "tab:orange",
    "mlstm-seed": "tab:red",
    "mlstm-matlab": "tab:green",
}


# ------------------------------------------------------------------------------------------------------- rungs
def preset_of(source: str) -> tuple[str | None, str, str] | None:
    """(dataset directory or None, preset, rung) from the last path component named like a variant preset."""
    parts = Path(str(source)).parts
    for i in range(len(parts) - 1, -1, -1):
        match = PRESET.match(parts[i])
        if match:
            return (parts[i - 1] if i > 0 else None), parts[i], match["rung"]
    return None


def nominal_size(rung: str) -> float:
    """ "300k" -> 3e5, "1m" -> 1e6: the preset's name as a number (for ordering when no count is known)."""
    match = re.match(r"^(\d+(?:\.\d+)?)([km])$", rung)
    if not match:
        return math.nan
    return float(match[1]) * (1e3 if match[2] == "k" else 1e6)


def format_params(count: float) -> str:
    if not math.isfinite(count):
        return "?"
    if count >= 1e6:
        return f"{count / 1e6:.2f}M".replace(".00M", "M")
    return f"{count / 1e3:.0f}k"


def assign_rungs(runs: Iterable[Run]) -> dict[str, str]:
    """{run source: rung name}: the preset in its path, else a cluster of parameter counts (per dataset)."""
    rungs: dict[str, str] = {}
    loose: dict[str, list[Run]] = {}
    for run in runs:
        found = preset_of(run.source)
        if found:
            rungs[run.source] = found[2]
        else:
            loose.setdefault(run.dataset, []).append(run)
    for group in loose.values():
        counted = sorted((r for r in group if r.num_parameters), key=lambda r: r.num_parameters)
        first = None
        for run in counted:
            if first is None or run.num_parameters > first * (1 + CLUSTER_TOL):
                first = run.num_parameters
            rungs[run.source] = format_params(first)
    return rungs


def _relabel(runs: Iterable[Run], rungs: Mapping[str, str]) -> list[Run]:
    """Copies of the runs whose label carries the rung ("lstm@300k"), so one rule groups cell and size together."""
    return [replace(run, label=f"{run.label}@{rungs[run.source]}") for run in runs if run.source in rungs]


# -------------------------------------------------------------------------------------------------- tuning
@dataclass
class RungSelection:
    """`mlstm.studies.tuning.select` over one cell's grid at one rung of one dataset."""

    dataset: str
    rung: str
    variant: str
    preset: str | None
    dataset_choice: str | None  # the dataset config the sweep used (its directory name), e.g. enwik8_sample
    params: float
    selection: tuning.Selection

    @property
    def next_lr(self) -> float | None:
        """The rate to add when the choice sits at the grid's edge (a factor 2 outward); None inside."""
        s = self.selection
        if s.chosen is None:
            return s.rates[0].lr / 2 if s.rates else None  # every rate diverged: try below the grid
        if not s.at_edge:
            return None
        return s.chosen / 2 if s.chosen == s.rates[0].lr else s.chosen * 2

    def as_dict(self) -> dict:
        s = self.selection
        out = {
            "dataset": self.dataset,
            "rung": self.rung,
            "variant": self.variant,
            "preset": self.preset,
            "params": int_or_none(self.params),
            "chosen_lr": s.chosen,
            "at_edge": s.at_edge,
            "next_lr": self.next_lr,
            "score": _finite_or_none(s.chosen_score),
            "rates": {f"{r.lr:g}": _finite_or_none(r.score) for r in s.rates},
            "seeds": [str(x) for x in s.seeds],
            "notes": list(s.notes),
        }
        if self.preset and self.dataset_choice and s.chosen is not None and not s.at_edge:
            out["final_command"] = (
                f'make sweep SWEEP=scale_final_cpu ARGS="dataset={self.dataset_choice} '
                f'+variant={self.preset} optim.lr={s.chosen:g}"'
            )
        return out


def select_by_rung(runs: Iterable[Run], rungs: Mapping[str, str] | None = None) -> list[RungSelection]:
    """The tuning rule applied to every (dataset, rung, cell) of a set of tuning runs."""
    runs = list(runs)
    rungs = dict(rungs) if rungs is not None else assign_rungs(runs)
    by_label = {}
    for run in _relabel(runs, rungs):
        by_label.setdefault((run.dataset, run.label), []).append(run)
    out = []
    for selection in tuning.select([r for group in by_label.values() for r in group]):
        group = by_label[(selection.dataset, selection.variant)]
        variant, rung = selection.variant.rsplit("@", 1)
        found = next((preset_of(r.source) for r in group if preset_of(r.source)), None)
        counts = [r.num_parameters for r in group if r.num_parameters]
        out.append(
            RungSelection(
                selection.dataset,
                rung,
                variant,
                found[1] if found else None,
                found[0] if found else None,
                float(np.mean(counts)) if counts else math.nan,
                replace(selection, variant=variant),
            )
        )
    size: dict[tuple[str, str], float] = {}  # a rung's place on the ladder: its LSTM's count, else its cells' smallest
    for s in sorted(out, key=lambda s: s.variant == BASELINE):  # the baseline last, so its count wins
        value = size_key(s.params, s.rung)
        key = (s.dataset, s.rung)
        size[key] = value if s.variant == BASELINE else min(size.get(key, math.inf), value)
    return sorted(out, key=lambda s: (s.dataset, size[(s.dataset, s.rung)], s.variant))


def size_key(params: float, rung: str) -> float:
    return params if math.isfinite(params) else nominal_size(rung)


# ---------------------------------------------------------------------------------------------- one run's end
@dataclass(frozen=True)
class RunEnd:
    """Where one run ended and whether it overfitted (module docstring)."""

    seed: object
    final_valid: float
    final_train: float
    best_valid: float
    best_step: float
    rise: float  # final valid - lowest valid
    gap_end: float  # final valid - train
    gap_onset_step: float  # NaN: no growing gap
    second_pass_step: float  # NaN: the run never started a second pass over the training text
    last_chars: float
    test: float = math.nan  # the test split as one stream (NaN: not measured)
    test_unstable: bool = False  # rule 4 on it (mlstm.studies.tuning.unstable_on): a cold start that never recovered
    cold_starts: tuple[int, int] | None = None  # (streams blown up, streams) of the cold-start check


def train_at_evaluations(records: Sequence[Mapping]) -> list[tuple[int, float, float, float]]:
    """(step, chars, valid bpc, train bpc) at every validation point; train = the last training record at or before
    it (the mean over the last `log_every` steps: the least lag behind a falling curve)."""
    valid = sorted(
        (int(r["step"]), float(r.get("chars", math.nan)), float(r[METRIC]))
        for r in records
        if finite(r.get(METRIC)) and finite(r.get("step"))
    )
    train = sorted(
        (int(r["step"]), float(r["train/bpc"])) for r in records if finite(r.get("train/bpc")) and finite(r.get("step"))
    )
    out = []
    for step, chars, v in valid:
        earlier = [t for s, t in train if s <= step]
        out.append((step, chars, v, earlier[-1] if earlier else math.nan))
    return out


def gap_onset(gaps: Sequence[float]) -> int | None:
    """Index from which every gap stays more than GAP_TOL above the running minimum of the gaps so far."""
    running, above = math.inf, []
    for g in gaps:
        running = min(running, g)
        above.append(g > running + GAP_TOL)
    onset = None
    for i in range(len(above) - 1, -1, -1):
        if not above[i]:
            break
        onset = i
    return onset


def run_end(run: Run, seed) -> RunEnd:
    points = train_at_evaluations(run.records)
    second = next(
        (
            float(r["step"])
            for r in sorted(run.records, key=lambda r: r["step"])
            if isinstance(r.get("epoch"), (int, float)) and r["epoch"] >= 1
        ),
        math.nan,
    )
    last_chars = run.last("chars")
    test = run.final("test/bpc")
    tested = dict(
        test=test if test is not None else math.nan,
        test_unstable=tuning.unstable_on(run.records),
        cold_starts=tuning.blown_streams(run.records),
    )
    if not points:
        return RunEnd(
            seed, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, second, last_chars, **tested
        )
    steps, _, valid, train = (np.array(c, dtype=float) for c in zip(*points))
    best = int(np.argmin(valid))
    gaps = valid - train
    # the gap onset is looked for after the first quarter of the run: while the curves fall fast, the training
    # record's lag of a few steps moves the gap by more than GAP_TOL
    finite = np.isfinite(gaps) & (steps >= EARLY_FRACTION * steps[-1])
    onset = gap_onset(list(gaps[finite])) if finite.any() else None
    onset_step = float(steps[finite][onset]) if onset is not None else math.nan
    return RunEnd(
        seed,
        float(valid[-1]),
        float(train[-1]),
        float(valid[best]),
        float(steps[best]),
        float(valid[-1] - valid[best]),
        float(gaps[-1]),
        onset_step,
        second,
        last_chars,
        **tested,
    )


# ---------------------------------------------------------------------------------------------- the analysis
@dataclass
class CellSummary:
    """One cell at one rung of one dataset: its final runs at its chosen rate."""

    dataset: str
    rung: str
    variant: str
    params: float
    lr: float | None
    ends: list[RunEnd]
    note: str = ""

    def _values(self, name: str) -> np.ndarray:
        return np.array([getattr(e, name) for e in self.ends], dtype=float)

    def stat(self, name: str) -> tuple[float, float, float]:
        """(mean, min, max) over seeds of a RunEnd field (NaN when a seed lacks it)."""
        v = self._values(name)
        if v.size == 0 or not np.isfinite(v).all():
            return math.nan, math.nan, math.nan
        return float(v.mean()), float(v.min()), float(v.max())

    @property
    def n_rising(self) -> int:
        return int(np.sum(self._values("rise") > RISE_TOL))

    @property
    def onsets(self) -> list[float]:
        return [e.gap_onset_step for e in self.ends if math.isfinite(e.gap_onset_step)]

    @property
    def n_test_unstable(self) -> int:
        return sum(e.test_unstable for e in self.ends)

    @property
    def cold_starts(self) -> tuple[int, int] | None:
        """(streams blown up, streams) over the seeds that have the cold-start check; None when none has it."""
        checked = [e.cold_starts for e in self.ends if e.cold_starts]
        return (sum(b for b, _ in checked), sum(n for _, n in checked)) if checked else None

    @property
    def best_step(self) -> float:
        v = self._values("best_step")
        return float(np.median(v)) if v.size and np.isfinite(v).all() else math.nan


@dataclass
class GapRow:
    """One mLSTM form against the LSTM at one rung: characters to the target level and the final-bpc difference."""

    dataset: str
    rung: str
    variant: str
    params: float  # the LSTM's parameter count at this rung (the figure's x)
    lr: float | None
    n_seeds: int
    paired: bool
    target: float
    criterion: str  # "lstm-best" (the LSTM's best level), "common" (the level both reach) or "fixed"
    chars: Interval  # the cell's mean characters to the target
    lstm_chars: Interval
    ratio: Interval
    fraction_reached: float
    ratio_lower_bound: float  # when a seed never reached the target: its budget counted instead (NaN otherwise)
    ladder: tuple[float, float, int]  # (min, max, number of levels with a ratio)
    valid_difference: Interval  # final valid bpc, cell - LSTM
    note: str = ""


@dataclass
class DatasetStudy:
    dataset: str
    rungs: list[str]  # in increasing size
    params: dict[str, float]  # rung -> the LSTM's parameter count (else the cells' mean)
    cells: dict[tuple[str, str], CellSummary]
    gaps: list[GapRow]
    budget_chars: float
    notes: list[str] = field(default_factory=list)


@dataclass
class ScaleStudy:
    datasets: dict[str, DatasetStudy]
    selections: list[RungSelection]
    n_final: int
    n_tuning: int
    baseline: str = BASELINE


def _finite_or_none(value):
    return float(value) if finite(value) else None


def int_or_none(value):
    return int(round(value)) if finite(value) else None


def pick_rate(runs: list[Run], chosen: float | None) -> tuple[list[Run], float | None, str]:
    """The final runs of one cell at one rung: those at the chosen rate, or at the single rate present, or (several
    rates, no choice known) at the rate whose runs score best under the tuning rule."""
    rates = sorted({lr for r in runs if (lr := tuning.learning_rate(r.config)) is not None})
    if not rates:
        return runs, None, "no learning rate in the configs"
    if chosen is not None and chosen in rates:
        return [r for r in runs if tuning.learning_rate(r.config) == chosen], chosen, ""
    if len(rates) == 1:
        note = "" if chosen is None else f"final runs at {rates[0]:g}, not at the chosen rate {chosen:g}"
        return runs, rates[0], note
    score = {
        lr: np.mean(
            [
                tuning.run_score(r.records, tuning.budget_steps(r.config), best=tuning.to_convergence(r.config))
                for r in runs
                if tuning.learning_rate(r.config) == lr
            ]
        )
        for lr in rates
    }
    best = min(rates, key=lambda lr: (score[lr], lr))
    return (
        [r for r in runs if tuning.learning_rate(r.config) == best],
        best,
        f"final runs at several rates and no tuning choice: the best-scoring rate {best:g} is used",
    )


def _level_up(value: float) -> float:
    return math.ceil(value * 1000 - 1e-9) / 1000


def analyse(
    final_runs: Iterable[Run],
    tuning_runs: Iterable[Run] = (),
    baseline: str = BASELINE,
    fixed_targets: Mapping[str, Sequence[float]] | None = None,
    variants: Sequence[str] | None = None,
) -> ScaleStudy:
    """The whole study: selections from the tuning runs, and per dataset and rung the gap and final-bpc tables."""
    final_runs, tuning_runs = list(final_runs), list(tuning_runs)
    if variants:
        keep = set(variants) | {baseline}
        final_runs = [r for r in final_runs if r.label in keep]
        tuning_runs = [r for r in tuning_runs if r.label in keep]
    selections = select_by_rung(tuning_runs) if tuning_runs else []
    chosen = {(s.dataset, s.rung, s.variant): s.selection.chosen for s in selections}
    rungs_of = assign_rungs(final_runs)
    grouped: dict[str, dict[str, dict[str, list[Run]]]] = {}
    for run in final_runs:
        if run.source in rungs_of:
            by_rung = grouped.setdefault(run.dataset, {}).setdefault(rungs_of[run.source], {})
            by_rung.setdefault(run.label, []).append(run)
    studies = {}
    for dataset, by_rung in sorted(grouped.items()):
        studies[dataset] = _analyse_dataset(
            dataset, by_rung, chosen, baseline, list((fixed_targets or {}).get(dataset, ()))
        )
    return ScaleStudy(studies, selections, len(final_runs), len(tuning_runs), baseline)


def _analyse_dataset(
    dataset: str, by_rung: Mapping[str, Mapping[str, list[Run]]], chosen: Mapping, baseline: str, fixed: list[float]
) -> DatasetStudy:
    cells: dict[tuple[str, str], CellSummary] = {}
    picked: dict[tuple[str, str], list[Run]] = {}
    params: dict[str, float] = {}
    budget = 0.0
    for rung, by_variant in by_rung.items():
        for variant, runs in sorted(by_variant.items()):
            runs, lr, note = pick_rate(runs, chosen.get((dataset, rung, variant)))
            picked[(rung, variant)] = runs
            keys = seed_keys(runs)
            counts = [r.num_parameters for r in runs if r.num_parameters]
            cells[(rung, variant)] = CellSummary(
                dataset,
                rung,
                variant,
                float(np.mean(counts)) if counts else math.nan,
                lr,
                [run_end(r, k) for r, k in zip(runs, keys)],
                note,
            )
            budget = max(budget, max((r.last("chars") for r in runs), default=0.0))
        counts = (
            [cells[(rung, baseline)].params]
            if (rung, baseline) in cells
            else [c.params for (r, _), c in cells.items() if r == rung]
        )
        params[rung] = float(np.nanmean(counts)) if counts and np.isfinite(counts).any() else math.nan
    rungs = sorted(by_rung, key=lambda r: size_key(params[r], r))
    notes = []
    gaps = []
    for rung in rungs:
        if (rung, baseline) not in picked:
            notes.append(f"rung {rung}: no {baseline} runs, so no ratios")
            continue
        base_runs = picked[(rung, baseline)]
        base_curves = curves_by_seed(base_runs, METRIC)
        base_best = [c.y.min() for c in base_curves.values() if len(c.y)]
        if len(base_best) < len(base_curves) or not base_best:
            notes.append(f"rung {rung}: an {baseline} run has no validation point")
            continue
        targets = [(_level_up(float(max(base_best))), "lstm-best")] + [(float(t), "fixed") for t in fixed]
        for variant in sorted(v for (r, v) in picked if r == rung and v != baseline):
            runs = picked[(rung, variant)]
            curves = curves_by_seed(runs, METRIC)
            best = [c.y.min() for c in curves.values() if len(c.y)]
            common = [(_level_up(float(max(base_best + best))), "common")] if len(best) == len(curves) else []
            groups = {variant: curves, baseline: base_curves}
            ends = {e.seed: e.final_valid for e in cells[(rung, variant)].ends}
            base_ends = {e.seed: e.final_valid for e in cells[(rung, baseline)].ends}
            a, b, paired_valid = pair_by_seed(ends, base_ends)
            difference = bootstrap_difference_of_means(a, b, paired_valid)
            ladder = _ladder(groups, variant, baseline)
            for target, criterion in targets + common:
                rows = {row.variant: row for row in compare_reach(groups, [target], baseline, axes=("chars",))}
                row, base_row = rows[variant], rows[baseline]
                bound = math.nan
                if row.fraction_reached < 1 and base_row.fraction_reached == 1:
                    filled = [
                        x if math.isfinite(x) else float(curves[s].x["chars"][-1]) if len(curves[s].y) else math.nan
                        for s, x in row.per_seed.items()
                    ]
                    bound = float(np.mean(filled) / base_row.mean.value)
                gaps.append(
                    GapRow(
                        dataset,
                        rung,
                        variant,
                        params[rung],
                        cells[(rung, variant)].lr,
                        len(runs),
                        row.paired,
                        target,
                        criterion,
                        row.mean,
                        base_row.mean,
                        row.ratio,
                        row.fraction_reached,
                        bound,
                        ladder,
                        difference,
                        row.note,
                    )
                )
    return DatasetStudy(dataset, rungs, params, cells, gaps, budget, notes)


def _ladder(groups, variant: str, baseline: str) -> tuple[float, float, int]:
    curves = [c for runs in groups.values() for c in runs.values() if len(c.y)]
    if not curves:
        return math.nan, math.nan, 0
    levels = default_targets([c.y[0] for c in curves], [c.y.min() for c in curves], LADDER_LEVELS)
    ratios = [
        r.ratio.value
        for r in compare_reach(groups, levels, baseline, axes=("chars",))
        if r.variant == variant and math.isfinite(r.ratio.value)
    ]
    return (min(ratios), max(ratios), len(ratios)) if ratios else (math.nan, math.nan, 0)
