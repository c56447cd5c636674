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
                    with the percentile bootstrap CI of mlstm.convergence (paired by seed when the seeds match);
                    a cell with a seed that never gets there has no ratio, only a lower bound (its budget counted)
    ladder          the ratio at five levels between the first validation point and the worst best level
                    (mlstm.convergence.default_targets), as a min-max range
    final bpc       validation and training bpc at the end of the budget, mean and seed range; the difference of
                    the final validation bpc to the LSTM's with its bootstrap CI
    overfitting     per run: the step of its lowest validation bpc and how far validation rose after it (a rise
                    above RISE_TOL bpc counts), and the step from which validation minus training bpc stays more
                    than GAP_TOL above its running minimum, from the first quarter of the run on (the gap
                    onset). Within the first pass over the training text the training bpc is measured on text the
                    model has not seen, so a growing gap needs the second pass (the first record with `epoch` >= 1
                    says where it starts)

The tuning runs, when given, are ruled per rung with `mlstm.tuning.select` (the same rule as every other grid):
the chosen rate per cell and rung, whether it sits at the grid's edge, and the rate to extend to.

`write_report` draws the figure (per dataset, two panels: the ratio against parameters, log x, one line per mLSTM
form with CI bars and a dashed line at 1; final validation bpc against parameters for every cell, training bpc
dotted) and writes report.md, scale_summary.csv and selection.json. `scripts/scale_report.py` is its command line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mlstm import tuning
from mlstm.convergence import (Interval, bootstrap_difference_of_means, compare_reach, default_targets,
                               pair_by_seed)
from mlstm.runs import Run, curves_by_seed, seed_keys

BASELINE = "lstm"
RISE_TOL = 0.01  # bpc: validation this far above its minimum at the end has risen (not noise of the last digit)
GAP_TOL = 0.05  # bpc: valid - train this far above its running minimum, to the end, is a growing gap
EARLY_FRACTION = 0.25  # the gap onset is looked for from this fraction of the run on
CLUSTER_TOL = 0.05  # runs without a preset in their path: parameter counts within 5% share a rung
LADDER_LEVELS = 5
METRIC = "valid/bpc"
# a path component named like a variant preset: lstm_300k, mlstm_paper_1m, mlstm_seed_gated_20m
PRESET = re.compile(r"^(?P<cell>[a-z][a-z0-9_]*?)_(?P<rung>\d+(?:\.\d+)?[km])$")
COLORS = {"lstm": "black", "mlstm-paper": "tab:blue", "mlstm-seed-gated": "tab:orange", "mlstm-seed": "tab:red",
          "mlstm-matlab": "tab:green"}


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
    """"300k" -> 3e5, "1m" -> 1e6: the preset's name as a number (for ordering when no count is known)."""
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
    """`mlstm.tuning.select` over one cell's grid at one rung of one dataset."""

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
        out = {"dataset": self.dataset, "rung": self.rung, "variant": self.variant, "preset": self.preset,
               "params": _int_or_none(self.params), "chosen_lr": s.chosen, "at_edge": s.at_edge,
               "next_lr": self.next_lr, "score": _finite_or_none(s.chosen_score),
               "rates": {f"{r.lr:g}": _finite_or_none(r.score) for r in s.rates},
               "seeds": [str(x) for x in s.seeds], "notes": list(s.notes)}
        if self.preset and self.dataset_choice and s.chosen is not None and not s.at_edge:
            out["final_command"] = (f'make sweep SWEEP=scale_final_cpu ARGS="dataset={self.dataset_choice} '
                                    f'+variant={self.preset} optim.lr={s.chosen:g}"')
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
        out.append(RungSelection(selection.dataset, rung, variant, found[1] if found else None,
                                 found[0] if found else None, float(np.mean(counts)) if counts else math.nan,
                                 replace(selection, variant=variant)))
    size: dict[tuple[str, str], float] = {}  # a rung's place on the ladder: its LSTM's count, else its cells' smallest
    for s in sorted(out, key=lambda s: s.variant == BASELINE):  # the baseline last, so its count wins
        value = _size_key(s.params, s.rung)
        key = (s.dataset, s.rung)
        size[key] = value if s.variant == BASELINE else min(size.get(key, math.inf), value)
    return sorted(out, key=lambda s: (s.dataset, size[(s.dataset, s.rung)], s.variant))


def _size_key(params: float, rung: str) -> float:
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


def train_at_evaluations(records: Sequence[Mapping]) -> list[tuple[int, float, float, float]]:
    """(step, chars, valid bpc, train bpc) at every validation point; train = the last training record at or before
    it (the mean over the last `log_every` steps: the least lag behind a falling curve)."""
    valid = sorted((int(r["step"]), float(r.get("chars", math.nan)), float(r[METRIC])) for r in records
                   if _finite(r.get(METRIC)) and _finite(r.get("step")))
    train = sorted((int(r["step"]), float(r["train/bpc"])) for r in records
                   if _finite(r.get("train/bpc")) and _finite(r.get("step")))
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
    second = next((float(r["step"]) for r in sorted(run.records, key=lambda r: r["step"])
                   if isinstance(r.get("epoch"), (int, float)) and r["epoch"] >= 1), math.nan)
    last_chars = run.last("chars")
    if not points:
        return RunEnd(seed, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, second, last_chars)
    steps, _, valid, train = (np.array(c, dtype=float) for c in zip(*points))
    best = int(np.argmin(valid))
    gaps = valid - train
    # the gap onset is looked for after the first quarter of the run: while the curves fall fast, the training
    # record's lag of a few steps moves the gap by more than GAP_TOL
    finite = np.isfinite(gaps) & (steps >= EARLY_FRACTION * steps[-1])
    onset = gap_onset(list(gaps[finite])) if finite.any() else None
    onset_step = float(steps[finite][onset]) if onset is not None else math.nan
    return RunEnd(seed, float(valid[-1]), float(train[-1]), float(valid[best]), float(steps[best]),
                  float(valid[-1] - valid[best]), float(gaps[-1]), onset_step, second, last_chars)


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
    criterion: str  # "lstm-best" (the LSTM's best level) or "fixed"
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


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_or_none(value):
    return float(value) if _finite(value) else None


def _int_or_none(value):
    return int(round(value)) if _finite(value) else None


def _pick_rate(runs: list[Run], chosen: float | None) -> tuple[list[Run], float | None, str]:
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
    score = {lr: np.mean([tuning.run_score(r.records, tuning.budget_steps(r.config)) for r in runs
                          if tuning.learning_rate(r.config) == lr]) for lr in rates}
    best = min(rates, key=lambda lr: (score[lr], lr))
    return ([r for r in runs if tuning.learning_rate(r.config) == best], best,
            f"final runs at several rates and no tuning choice: the best-scoring rate {best:g} is used")


def _level_up(value: float) -> float:
    return math.ceil(value * 1000 - 1e-9) / 1000


def analyse(final_runs: Iterable[Run], tuning_runs: Iterable[Run] = (), baseline: str = BASELINE,
            fixed_targets: Mapping[str, Sequence[float]] | None = None,
            variants: Sequence[str] | None = None) -> ScaleStudy:
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
        studies[dataset] = _analyse_dataset(dataset, by_rung, chosen, baseline,
                                            list((fixed_targets or {}).get(dataset, ())))
    return ScaleStudy(studies, selections, len(final_runs), len(tuning_runs), baseline)


def _analyse_dataset(dataset: str, by_rung: Mapping[str, Mapping[str, list[Run]]], chosen: Mapping,
                     baseline: str, fixed: list[float]) -> DatasetStudy:
    cells: dict[tuple[str, str], CellSummary] = {}
    picked: dict[tuple[str, str], list[Run]] = {}
    params: dict[str, float] = {}
    budget = 0.0
    for rung, by_variant in by_rung.items():
        for variant, runs in sorted(by_variant.items()):
            runs, lr, note = _pick_rate(runs, chosen.get((dataset, rung, variant)))
            picked[(rung, variant)] = runs
            keys = seed_keys(runs)
            counts = [r.num_parameters for r in runs if r.num_parameters]
            cells[(rung, variant)] = CellSummary(dataset, rung, variant, float(np.mean(counts)) if counts else math.nan,
                                                 lr, [run_end(r, k) for r, k in zip(runs, keys)], note)
            budget = max(budget, max((r.last("chars") for r in runs), default=0.0))
        counts = [cells[(rung, baseline)].params] if (rung, baseline) in cells else \
            [c.params for (r, _), c in cells.items() if r == rung]
        params[rung] = float(np.nanmean(counts)) if counts and np.isfinite(counts).any() else math.nan
    rungs = sorted(by_rung, key=lambda r: _size_key(params[r], r))
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
            groups = {variant: curves, baseline: base_curves}
            ends = {e.seed: e.final_valid for e in cells[(rung, variant)].ends}
            base_ends = {e.seed: e.final_valid for e in cells[(rung, baseline)].ends}
            a, b, paired_valid = pair_by_seed(ends, base_ends)
            difference = bootstrap_difference_of_means(a, b, paired_valid)
            ladder = _ladder(groups, variant, baseline)
            for target, criterion in targets:
                rows = {row.variant: row for row in compare_reach(groups, [target], baseline, axes=("chars",))}
                row, base_row = rows[variant], rows[baseline]
                bound = math.nan
                if row.fraction_reached < 1 and base_row.fraction_reached == 1:
                    filled = [x if math.isfinite(x) else float(curves[s].x["chars"][-1]) if len(curves[s].y) else
                              math.nan for s, x in row.per_seed.items()]
                    bound = float(np.mean(filled) / base_row.mean.value)
                gaps.append(GapRow(dataset, rung, variant, params[rung], cells[(rung, variant)].lr, len(runs),
                                   row.paired, target, criterion, row.mean, base_row.mean, row.ratio,
                                   row.fraction_reached, bound, ladder, difference, row.note))
    return DatasetStudy(dataset, rungs, params, cells, gaps, budget, notes)


def _ladder(groups, variant: str, baseline: str) -> tuple[float, float, int]:
    curves = [c for runs in groups.values() for c in runs.values() if len(c.y)]
    if not curves:
        return math.nan, math.nan, 0
    levels = default_targets([c.y[0] for c in curves], [c.y.min() for c in curves], LADDER_LEVELS)
    ratios = [r.ratio.value for r in compare_reach(groups, levels, baseline, axes=("chars",))
              if r.variant == variant and math.isfinite(r.ratio.value)]
    return (min(ratios), max(ratios), len(ratios)) if ratios else (math.nan, math.nan, 0)


# ---------------------------------------------------------------------------------------------- plain words
def trend(values: Sequence[tuple[float, float]]) -> str:
    """"falls", "rises", "flat", "mixed", "one point" or "none" for (x, y) pairs in increasing x (NaN y left out)."""
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


def headline_rows(study: DatasetStudy) -> list[GapRow]:
    return [g for g in study.gaps if g.criterion == "lstm-best"]


def gap_sentences(study: DatasetStudy) -> list[str]:
    """One sentence per mLSTM form: its ratio along the ladder and what the smallest and largest rungs' CIs say."""
    out = []
    rows = headline_rows(study)
    for variant in sorted({g.variant for g in rows}):
        mine = sorted((g for g in rows if g.variant == variant), key=lambda g: _size_key(g.params, g.rung))
        path = " → ".join(f"{_ratio_text(g)} ({format_params(g.params)})" for g in mine)
        direction = trend([(g.params, g.ratio.value) for g in mine])
        words = {"falls": "falls at every step: its advantage grows with size",
                 "rises": "rises at every step: its advantage shrinks with size",
                 "flat": "does not change with size", "mixed": "has no monotone trend with size",
                 "one point": "is defined at one rung only",
                 "none": "is defined at no rung (no level reached by every seed of both)"}[direction]
        sentence = f"**{variant}** × LSTM characters to the LSTM's best level: {path}; the ratio {words}"
        ends = [g for g in mine if math.isfinite(g.ratio.value)]
        if len(ends) >= 2 and all(math.isfinite(x) for g in (ends[0], ends[-1]) for x in (g.ratio.low, g.ratio.high)):
            small, large = ends[0].ratio, ends[-1].ratio
            overlap = not (small.high < large.low or large.high < small.low)
            sentence += (f" (95% CIs at {format_params(ends[0].params)} and {format_params(ends[-1].params)} "
                         f"{'overlap: within the seed noise' if overlap else 'do not overlap'})")
        out.append(sentence + ".")
    return out


def overfitting_sentences(study: DatasetStudy) -> list[str]:
    """Where validation rises above its minimum and where the valid - train gap starts to grow, per cell and rung."""
    out = []
    second = [e.second_pass_step for c in study.cells.values() for e in c.ends if math.isfinite(e.second_pass_step)]
    if second:
        out.append(f"The second pass over the training text starts at about step {min(second):.0f} "
                   f"(the first record of epoch 1); before it the training bpc is measured on unseen text.")
    else:
        out.append("No run started a second pass over the training text: the training bpc is measured on text the "
                   "model had not seen, so valid - train measures the split's difference, not memorisation.")
    rising = []
    for rung in study.rungs:
        for (r, variant), cell in sorted(study.cells.items()):
            if r != rung or not cell.ends:
                continue
            if cell.n_rising:
                rising.append(f"{variant} at {rung} ({format_params(cell.params)}; "
                              f"{cell.n_rising}/{len(cell.ends)} seeds, "
                              f"lowest validation at step {cell.best_step:.0f}, then +{cell.stat('rise')[0]:.3f} bpc)")
    if rising:
        out.append("Validation bpc rises above its minimum (overfitting sets in) for: " + "; ".join(rising) + ".")
    else:
        out.append(f"Validation bpc is lowest at the end of the budget for every cell and rung (no rise above "
                   f"{RISE_TOL} bpc): no overfitting within one budget.")
    growing = []
    for rung in study.rungs:
        for (r, variant), cell in sorted(study.cells.items()):
            if r == rung and cell.onsets:
                growing.append(f"{variant} at {rung} ({format_params(cell.params)}) from step {min(cell.onsets):.0f} "
                               f"({len(cell.onsets)}/{len(cell.ends)} seeds)")
    if growing:
        out.append(f"valid - train grows by more than {GAP_TOL} bpc above its running minimum, to the end, for: "
                   + "; ".join(growing) + ".")
    else:
        out.append(f"valid - train never grows by more than {GAP_TOL} bpc above its running minimum.")
    return out


# ---------------------------------------------------------------------------------------------- output
def _fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if _finite(value) else "–"


def _interval(iv: Interval, spec: str = ".2f") -> str:
    if not _finite(iv.value):
        return "–"
    if _finite(iv.low) and _finite(iv.high):
        return f"{iv.value:{spec}} ({iv.low:{spec}}–{iv.high:{spec}})"
    return f"{iv.value:{spec}}"


def _ratio_text(g: GapRow) -> str:
    if _finite(g.ratio.value):
        return f"{g.ratio.value:.2f}×"
    if _finite(g.ratio_lower_bound):
        return f"> {g.ratio_lower_bound:.2f}× (not reached)"
    return "–"


def _range(stat: tuple[float, float, float]) -> str:
    mean, low, high = stat
    return f"{mean:.3f} [{low:.3f}–{high:.3f}]" if _finite(mean) else "–"


def _lr(value) -> str:
    return f"{value:g}" if _finite(value) else "–"


def summary_rows(study: ScaleStudy) -> list[dict]:
    """One row per dataset, rung and cell (scale_summary.csv)."""
    rows = []
    for dataset, ds in study.datasets.items():
        headline = {(g.rung, g.variant): g for g in headline_rows(ds)}
        for rung in ds.rungs:
            for (r, variant), cell in sorted(ds.cells.items()):
                if r != rung:
                    continue
                g = headline.get((rung, variant))
                valid, train, gap = cell.stat("final_valid"), cell.stat("final_train"), cell.stat("gap_end")
                rows.append({
                    "dataset": dataset, "rung": rung, "variant": variant, "params": _int_or_none(cell.params),
                    "lstm_params": _int_or_none(ds.params[rung]), "lr": cell.lr, "n_seeds": len(cell.ends),
                    "final_valid_mean": valid[0], "final_valid_min": valid[1], "final_valid_max": valid[2],
                    "final_train_mean": train[0], "final_train_min": train[1], "final_train_max": train[2],
                    "valid_minus_train": gap[0], "best_valid_step_median": cell.best_step,
                    "rise_after_best_mean": cell.stat("rise")[0], "n_seeds_rising": cell.n_rising,
                    "gap_onset_step_min": min(cell.onsets) if cell.onsets else math.nan,
                    "target_bpc": g.target if g else math.nan,
                    "chars_to_target_mean": g.chars.value if g else math.nan,
                    "ratio_to_lstm": g.ratio.value if g else (1.0 if variant == study.baseline else math.nan),
                    "ratio_low": g.ratio.low if g else math.nan, "ratio_high": g.ratio.high if g else math.nan,
                    "ratio_lower_bound": g.ratio_lower_bound if g else math.nan,
                    "ladder_ratio_min": g.ladder[0] if g else math.nan,
                    "ladder_ratio_max": g.ladder[1] if g else math.nan,
                    "valid_minus_lstm": g.valid_difference.value if g else math.nan,
                    "valid_minus_lstm_low": g.valid_difference.low if g else math.nan,
                    "valid_minus_lstm_high": g.valid_difference.high if g else math.nan,
                    "note": "; ".join(x for x in (cell.note, g.note if g else "") if x),
                })
    return rows


def plot_dataset(ds: DatasetStudy, path: Path, baseline: str = BASELINE) -> Path:
    """The two-panel figure of one dataset (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    rows = headline_rows(ds)
    for i, variant in enumerate(sorted({g.variant for g in rows})):
        mine = sorted((g for g in rows if g.variant == variant), key=lambda g: _size_key(g.params, g.rung))
        color = COLORS.get(variant, f"C{i}")
        shown = [g for g in mine if _finite(g.ratio.value)]
        if shown:
            x = np.array([g.params for g in shown])
            y = np.array([g.ratio.value for g in shown])
            low = np.array([g.ratio.low if _finite(g.ratio.low) else g.ratio.value for g in shown])
            high = np.array([g.ratio.high if _finite(g.ratio.high) else g.ratio.value for g in shown])
            left.errorbar(x, y, yerr=[y - low, high - y], marker="o", capsize=3, color=color, label=variant)
        bounds = [g for g in mine if not _finite(g.ratio.value) and _finite(g.ratio_lower_bound)]
        if bounds:
            left.scatter([g.params for g in bounds], [g.ratio_lower_bound for g in bounds], marker="^",
                         facecolors="none", edgecolors=color, label=f"{variant}: not reached (lower bound)")
    left.axhline(1.0, color="gray", linestyle="--", linewidth=1, label=f"{baseline} (= 1)")
    left.set_xscale("log")
    left.set_xlabel("parameters")
    left.set_ylabel(f"characters to the {baseline}'s best level, × {baseline}")
    left.set_title("best against best: characters to the same level")
    left.legend(fontsize=8)
    for i, variant in enumerate(sorted({v for (_, v) in ds.cells})):
        color = COLORS.get(variant, f"C{i}")
        cells = sorted((c for (_, v), c in ds.cells.items() if v == variant and c.ends),
                       key=lambda c: _size_key(c.params, c.rung))
        for name, style, label in (("final_valid", "-", variant), ("final_train", ":", None)):
            stats = [(c.params, *c.stat(name)) for c in cells]
            stats = [s for s in stats if _finite(s[0]) and _finite(s[1])]
            if not stats:
                continue
            x, mean, low, high = (np.array(v) for v in zip(*stats))
            right.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o" if style == "-" else None,
                           linestyle=style, capsize=3, color=color, label=label)
    right.plot([], [], color="gray", linestyle=":", label="training bpc (dotted)")
    right.set_xscale("log")
    right.set_xlabel("parameters")
    right.set_ylabel("bpc at the end of the budget")
    right.set_title("final validation bpc (mean, seed range)")
    right.legend(fontsize=8)
    ticks = sorted({float(v) for v in ds.params.values() if _finite(v)})
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
        grid = ", ".join(f"{r.lr:g} ({_fmt(r.score)})" for r in sel.rates)
        note = "; ".join(sel.notes).replace("|", "\\|")
        params = f"{_int_or_none(s.params):,}" if _finite(s.params) else "–"
        edge = " (edge)" if sel.at_edge else ""
        lines.append(f"| {s.rung} | {s.variant} | {params} | {grid} | {_lr(sel.chosen)}{edge} | {note} |")
    by_variant: dict[str, list[tuple[float, float]]] = {}
    for s in mine:
        if s.selection.chosen is not None:
            by_variant.setdefault(s.variant, []).append((_size_key(s.params, s.rung), s.selection.chosen))
    lines.append("")
    for variant, pairs in sorted(by_variant.items()):
        direction = trend(pairs)
        words = {"falls": "falls as size grows", "rises": "rises as size grows", "flat": "is the same at every size",
                 "mixed": "does not move monotonically with size", "one point": "is known at one size only",
                 "none": "is not known"}[direction]
        rates = " → ".join(f"{lr:g}" for _, lr in sorted(pairs))
        lines.append(f"- {variant}: chosen rate {rates}; it {words}.")
    return lines


def report_markdown(study: ScaleStudy, figures: Mapping[str, str], title: str | None = None) -> str:
    lines = [f"# {title or 'Does the mLSTM advantage grow with model size?'}", ""]
    lines.append(f"{study.n_final} final runs, {study.n_tuning} tuning runs. Every cell at its own tuned learning "
                 f"rate (the rule of mlstm.tuning, per cell and size), fresh seeds; the baseline is `{study.baseline}` "
                 f"at the same rung (parameter counts within 2%).")
    lines.append("")
    datasets = sorted(set(study.datasets) | {s.dataset for s in study.selections})
    for dataset in datasets:
        ds = study.datasets.get(dataset)
        lines += [f"## {dataset}", ""]
        if ds is not None:
            lines.append(f"Budget: {ds.budget_chars:,.0f} training characters per run at every size; rungs "
                         + ", ".join(f"{r} ({format_params(ds.params[r])})" for r in ds.rungs) + ".")
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
        lines += ["### Best against best: characters to a level", "",
                  "Target: the LSTM's best level at that rung (the highest of its seeds' lowest validation bpc) "
                  "unless marked fixed. × LSTM: mean characters over the LSTM's, 95% bootstrap CI over seeds; "
                  "ladder: the ratio at five levels from the first validation point down. Δ valid: final "
                  "validation bpc minus the LSTM's.", "",
                  "| rung | LSTM params | cell | lr | seeds | target bpc | chars to target | × LSTM | ladder | "
                  "Δ valid vs LSTM | note |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
        for g in sorted(ds.gaps, key=lambda g: (_size_key(g.params, g.rung), g.variant, g.criterion != "lstm-best",
                                                 -g.target)):
            ladder = f"{g.ladder[0]:.2f}–{g.ladder[1]:.2f} ({g.ladder[2]})" if g.ladder[2] else "–"
            target = f"{g.target:.3f}" + (" (fixed)" if g.criterion == "fixed" else "")
            chars = f"{g.chars.value:,.0f}" if _finite(g.chars.value) else f"{g.fraction_reached:.0%} reached"
            ratio = _interval(g.ratio) if _finite(g.ratio.value) else _ratio_text(g)
            lines.append(f"| {g.rung} | {_int_or_none(g.params) or 0:,} | {g.variant} | {_lr(g.lr)} | {g.n_seeds} | "
                         f"{target} | {chars} | {ratio} | {ladder} | {_interval(g.valid_difference, '+.3f')} | "
                         f"{g.note} |")
        lines += ["", "### Final bpc and overfitting", "",
                  "Mean [seed range] at the end of the budget. Lowest valid at: median step of each seed's lowest "
                  f"validation bpc; rise: final minus lowest (seeds above {RISE_TOL} bpc); gap onset: the first step "
                  f"from which valid - train stays more than {GAP_TOL} bpc above its running minimum.", "",
                  "| rung | cell | params | lr | seeds | valid bpc | train bpc | valid − train | lowest valid at "
                  "| rise | gap onset | note |",
                  "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | --- | --- | --- |"]
        for rung in ds.rungs:
            for (r, variant), cell in sorted(ds.cells.items()):
                if r != rung:
                    continue
                rise = f"{cell.stat('rise')[0]:+.3f} ({cell.n_rising}/{len(cell.ends)})" if cell.ends else "–"
                onset = (f"{min(cell.onsets):.0f} ({len(cell.onsets)}/{len(cell.ends)})" if cell.onsets else "none")
                lines.append(f"| {rung} | {variant} | {_int_or_none(cell.params) or 0:,} | {_lr(cell.lr)} | "
                             f"{len(cell.ends)} | {_range(cell.stat('final_valid'))} | "
                             f"{_range(cell.stat('final_train'))} | {_fmt(cell.stat('gap_end')[0])} | "
                             f"{_fmt(cell.best_step, '.0f')} | {rise} | {onset} | {cell.note} |")
        lines += [""] + ["- " + s for s in overfitting_sentences(ds)] + [""]
        lines += [f"- {note}" for note in ds.notes]
        if ds.notes:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return buffer.getvalue()


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
    (out / "scale_summary.csv").write_text(write_csv(summary_rows(study)))
    (out / "selection.json").write_text(json.dumps([s.as_dict() for s in study.selections], indent=1) + "\n")
    written.update({"report": out / "report.md", "summary": out / "scale_summary.csv",
                    "selection": out / "selection.json", "figures": [out / name for name in drawn.values()]})
    return written
