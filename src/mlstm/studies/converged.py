"""The converged study: every cell trained until validation stops improving (mlstm.training.plateau), best against best.

Per dataset, size (rung) and cell, from the final runs at the rate the tuning rule chose (mlstm.studies.tuning with
the "best" score: a run scores its lowest validation bpc):

- the best validation bpc and the test bpc read with best.pt's weights (mean, bootstrap CI over seeds), and their
  differences to the LSTM at the same size (paired by seed when both have the same seeds: same data order);
- characters, steps and training seconds to the best point, to within `WITHIN` bpc of the run's own best, and to the
  level both cells reach (the higher of the two cells' best levels, over every seed), as ratios to the LSTM;
- epochs to the best, the number of rate reductions, and how far validation rose after its best (overfitting);
- whether each run stopped by the rule (converged) or at the cap (not converged: flagged, never counted as converged);
- cold-start blow-ups of the test split read as 32 streams from zero states (a stream more than 1 bpc above the
  run's lowest validation bpc);
- two reference levels computed from the text (mlstm.studies.references): `xz -9e` on the whole sample, the level a
  model should beat, and the unigram entropy of the training split, the level of a model that learnt nothing but
  the character frequencies;
- how the validation curves of the runs on one sample rise and fall together (mlstm.studies.comovement): every run
  reads the text in one order, so the plateau rule's decisions share a ripple the CIs over seeds do not cover.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlstm.studies import convergence as cv
from mlstm.studies import tuning
from mlstm.studies.comovement import CoMovement, co_movement
from mlstm.studies.references import corpus_splits, unigram_entropy_of_file, unigram_valid_bpc, xz_bits_per_char
from mlstm.studies.runs import Run, lookup
from mlstm.studies.scaling import BASELINE, RungSelection, assign_rungs, pick_rate, select_by_rung, size_key
from mlstm.training.score import early_stopped

WITHIN = 0.02  # bpc: "within 0.02 of the run's own best"
AXES = ("chars", "steps", "seconds")
VALID = "valid/bpc"


@dataclass(frozen=True)
class RunOutcome:
    """Where one run ended and how it got there, as the report needs it (a final run, or a grid run without a test
    pass)."""

    seed: object
    converged: bool  # stopped by the rule (an `early_stop` event)
    capped: bool  # reached trainer.max_steps without stopping by the rule: NOT converged
    diverged: bool
    best_valid: float
    at_best: Mapping[str, float]  # axis -> position of the lowest validation bpc
    within: Mapping[str, float]  # axis -> first position within WITHIN bpc of the run's own best
    end_step: float
    final_valid: float
    test: float
    epochs_to_best: float  # characters to the best over the characters of one pass over the training split
    reductions: int
    cold_starts: tuple[int, int] | None
    curve: cv.Curve  # validation bpc
    train_curve: cv.Curve

    @property
    def rise(self) -> float:
        """Final minus lowest validation bpc: how far validation turned up after its best (overfitting)."""
        return self.final_valid - self.best_valid


def epoch_chars(run: Run) -> float:
    """Characters of one pass over the training split, from the records: midway between the last record of the
    first pass and the first of the second (exact to half a logging window); NaN before a second pass."""
    rows = sorted(
        (r for r in run.records if isinstance(r.get("epoch"), (int, float)) and "chars" in r), key=lambda r: r["step"]
    )
    second = next((i for i, r in enumerate(rows) if r["epoch"] >= 1), None)
    if not second:
        return math.nan
    return (rows[second - 1]["chars"] + rows[second]["chars"]) / 2


def outcome(run: Run) -> RunOutcome:
    curve = run.curve(VALID)
    budget = tuning.budget_steps(run.config)
    if len(curve.y):
        best = int(np.argmin(curve.y))
        best_valid = float(curve.y[best])
        at_best = {axis: float(curve.x[axis][best]) for axis in AXES}
        within = {axis: cv.first_reach(*curve.along(axis), best_valid + WITHIN) for axis in AXES}
        final_valid = float(curve.y[-1])
    else:
        best_valid = final_valid = math.nan
        at_best = within = {axis: math.nan for axis in AXES}
    stopped = early_stopped(run.records)
    diverged = tuning.diverged(run.records)
    end_step = run.last("step")
    per_epoch = epoch_chars(run)
    return RunOutcome(
        seed=run.seed,
        converged=stopped,
        capped=not stopped and not diverged and end_step >= budget,
        diverged=diverged,
        best_valid=best_valid,
        at_best=at_best,
        within=within,
        end_step=end_step,
        final_valid=final_valid,
        test=run.final("test/bpc"),
        epochs_to_best=at_best["chars"] / per_epoch if per_epoch > 0 else math.nan,
        reductions=sum(1 for r in run.records if r.get("event") == "lr_reduced"),
        # against the held-out level of best.pt's weights, not the training bpc: a model trained to convergence
        # fits its training text far better than held-out text (at 1.2M on the enwik8 sample: training 1.5-1.8
        # bpc, validation 2.24-2.33), so an ordinary held-out stream stands 1 bpc above the training bpc, while a
        # lost state reads 20-40 bpc (../tuned)
        cold_starts=tuning.blown_streams(run.records, level=best_valid if math.isfinite(best_valid) else None),
        curve=curve,
        train_curve=run.curve("train/bpc"),
    )


@dataclass
class Cell:
    """One cell at one size on one dataset: its final runs at one rate."""

    dataset: str
    rung: str
    variant: str
    params: float
    lr: float | None
    runs: list[RunOutcome]
    sources: list[str] = field(default_factory=list)
    note: str = ""

    def values(self, name: str, axis: str | None = None) -> dict:
        """{seed: value} of a RunOutcome field (a per-axis field when `axis` is given)."""
        return {r.seed: (getattr(r, name)[axis] if axis else getattr(r, name)) for r in self.runs}

    def mean(self, name: str, axis: str | None = None) -> cv.Interval:
        return cv.bootstrap_mean(list(self.values(name, axis).values()))

    @property
    def n_converged(self) -> int:
        return sum(r.converged for r in self.runs)

    @property
    def n_capped(self) -> int:
        return sum(r.capped for r in self.runs)

    @property
    def cold_starts(self) -> tuple[int, int] | None:
        checked = [r.cold_starts for r in self.runs if r.cold_starts]
        return (sum(b for b, _ in checked), sum(n for _, n in checked)) if checked else None


@dataclass
class Comparison:
    """One cell against the LSTM at the same size on the same dataset."""

    cell: Cell
    baseline: Cell
    d_best_valid: cv.Interval
    d_test: cv.Interval
    to_best: dict  # axis -> ratio Interval of the positions of the best points
    to_within: dict  # axis -> ratio Interval of the positions within WITHIN of each run's own best
    level: float  # the level both reach: the highest best validation bpc over every seed of both cells
    to_level: dict  # axis -> ratio Interval of the first positions at `level`
    ladder: list  # [(level, chars ratio Interval)] on a common ladder of levels both reach


@dataclass(frozen=True)
class TuningRun:
    """One run of a learning-rate grid and where it stands: the study spans many sessions, and the report shows
    every grid run so far, finished or not."""

    dataset: str
    rung: str
    variant: str
    lr: float | None
    run: RunOutcome

    @property
    def state(self) -> str:
        r = self.run
        if r.diverged:
            return "diverged"
        if r.converged:
            return "stopped by the rule"
        if r.capped:
            return "capped: NOT converged"
        return "unfinished"


@dataclass
class ConvergedStudy:
    cells: list[Cell]
    comparisons: list[Comparison]
    selections: list[RungSelection]
    xz: dict  # dataset label -> xz -9e bits per character of its sample (NaN: file not readable)
    n_final: int
    n_tuning: int
    baseline: str = BASELINE
    tuning: list[TuningRun] = field(default_factory=list)
    # (dataset label, "final runs" or "grid runs") -> how their validation curves move together
    comovement: dict[tuple[str, str], CoMovement] = field(default_factory=dict)
    # dataset label -> (unigram entropy of its training split, what that unigram model reads on the valid split), in
    # bits per character: the level of a model that learnt no context
    unigram: dict = field(default_factory=dict)


def _pair(cell: Cell, base: Cell, name: str, axis: str | None = None, ratio: bool = True) -> cv.Interval:
    a, b, paired = cv.pair_by_seed(cell.values(name, axis), base.values(name, axis))
    return cv.bootstrap_ratio_of_means(a, b, paired) if ratio else cv.bootstrap_difference_of_means(a, b, paired)


def compare(cell: Cell, base: Cell, ladder_levels: int = 5) -> Comparison:
    level = math.ceil(max(r.best_valid for r in cell.runs + base.runs) * 1000 - 1e-9) / 1000
    groups = {cell.variant: {r.seed: r.curve for r in cell.runs}, base.variant: {r.seed: r.curve for r in base.runs}}
    reach = {
        row.axis: row.ratio
        for row in cv.compare_reach(groups, [level], base.variant, AXES)
        if row.variant == cell.variant
    }
    firsts = [float(r.curve.y[0]) for r in cell.runs + base.runs if len(r.curve.y)]
    targets = cv.default_targets(firsts, [r.best_valid for r in cell.runs + base.runs], ladder_levels)
    ladder = [
        (row.target, row.ratio)
        for row in cv.compare_reach(groups, targets, base.variant, ("chars",))
        if row.variant == cell.variant
    ]
    return Comparison(
        cell,
        base,
        _pair(cell, base, "best_valid", ratio=False),
        _pair(cell, base, "test", ratio=False),
        {axis: _pair(cell, base, "at_best", axis) for axis in AXES},
        {axis: _pair(cell, base, "within", axis) for axis in AXES},
        level,
        reach,
        ladder,
    )


def sample_file(run: Run) -> Path | None:
    path = lookup(run.config, "dataset.path")
    return Path(path) if isinstance(path, str) and Path(path).is_file() else None


def analyse(
    final_runs: Iterable[Run],
    tuning_runs: Iterable[Run] = (),
    baseline: str = BASELINE,
    xz: Mapping[str, float] | None = None,
) -> ConvergedStudy:
    """The whole study. `xz` gives the reference per dataset label; a dataset missing there gets it computed from
    the sample file its runs' configs name (NaN when that file is not readable here)."""
    final_runs, tuning_runs = list(final_runs), list(tuning_runs)
    selections = select_by_rung(tuning_runs) if tuning_runs else []
    chosen = {(s.dataset, s.rung, s.variant): s.selection.chosen for s in selections}
    rungs = assign_rungs(final_runs)
    grouped: dict[tuple[str, str, str], list[Run]] = {}
    for run in final_runs:
        if run.source in rungs:
            grouped.setdefault((run.dataset, rungs[run.source], run.label), []).append(run)
    cells = []
    for (dataset, rung, variant), runs in grouped.items():
        picked, lr, note = pick_rate(runs, chosen.get((dataset, rung, variant)))
        counts = [r.num_parameters for r in picked if r.num_parameters]
        cells.append(
            Cell(
                dataset,
                rung,
                variant,
                float(np.mean(counts)) if counts else math.nan,
                lr,
                [outcome(r) for r in sorted(picked, key=lambda r: str(r.seed))],
                [r.source for r in picked],
                note,
            )
        )
    base_params = {(c.dataset, c.rung): c.params for c in cells if c.variant == baseline}
    cells.sort(
        key=lambda c: (
            c.dataset,
            size_key(base_params.get((c.dataset, c.rung), c.params), c.rung),
            c.variant != baseline,
            c.variant,
        )
    )
    by_key = {(c.dataset, c.rung, c.variant): c for c in cells}
    comparisons = [
        compare(c, by_key[(c.dataset, c.rung, baseline)])
        for c in cells
        if c.variant != baseline
        and (c.dataset, c.rung, baseline) in by_key
        and all(math.isfinite(r.best_valid) for r in c.runs + by_key[(c.dataset, c.rung, baseline)].runs)
    ]
    references = dict(xz or {})
    for run in final_runs + tuning_runs:
        if run.dataset not in references and (path := sample_file(run)) is not None:
            references[run.dataset] = xz_bits_per_char(path)
    unigram = {}
    for run in final_runs + tuning_runs:
        if run.dataset in unigram:
            continue  # one reading of the corpus per dataset, not one per run
        path, sizes = corpus_splits(run.config)
        if path is not None and sizes:
            unigram[run.dataset] = (unigram_entropy_of_file(path, sizes[0]), unigram_valid_bpc(path, sizes))
    tuning_rungs = assign_rungs(tuning_runs)
    grid = sorted(
        (
            TuningRun(r.dataset, tuning_rungs[r.source], r.label, lookup(r.config, "optim.lr"), outcome(r))
            for r in tuning_runs
            if r.source in tuning_rungs
        ),
        key=lambda t: (
            t.dataset,
            size_key(math.nan, t.rung),
            t.variant != baseline,
            t.variant,
            t.lr or 0,
            str(t.run.seed),
        ),
    )
    together = {}
    for dataset in dict.fromkeys([c.dataset for c in cells] + [t.dataset for t in grid]):
        groups = {
            "final runs": [r.curve for c in cells if c.dataset == dataset for r in c.runs],
            "grid runs": [t.run.curve for t in grid if t.dataset == dataset and not t.run.diverged],
        }
        for group, curves in groups.items():
            if (measured := co_movement(curves)) is not None:
                together[(dataset, group)] = measured
    return ConvergedStudy(
        cells,
        comparisons,
        selections,
        references,
        len(final_runs),
        len(tuning_runs),
        baseline,
        grid,
        together,
        unigram,
    )


def chosen_rate_runs(study: ConvergedStudy, dataset: str) -> dict[str, dict[str, tuple[float, list[RunOutcome]]]]:
    """{rung: {variant: (the rate the tuning rule chose, that rate's grid runs that did not diverge)}} on `dataset`,
    in the report's order: every cell the grid covered, those without final runs too (block 4's seed cells are grid
    runs only, and whether the posted cell learns at all is read there). A cell with no rate chosen is left out."""
    chosen = {(s.rung, s.variant): s.selection.chosen for s in study.selections if s.dataset == dataset}
    picked: dict[str, dict[str, tuple[float, list[RunOutcome]]]] = {}
    for t in study.tuning:
        lr = chosen.get((t.rung, t.variant))
        if t.dataset != dataset or lr is None or t.lr is None or not math.isclose(t.lr, lr) or t.run.diverged:
            continue
        picked.setdefault(t.rung, {}).setdefault(t.variant, (lr, []))[1].append(t.run)
    return picked


def final_command(selection: RungSelection) -> str | None:
    """The sweep that runs the fresh seeds of a cell whose choice is strictly inside its grid."""
    s = selection.selection
    if not selection.preset or not selection.dataset_choice or s.chosen is None or s.at_edge or not s.complete:
        return None  # no choice yet, one at the grid's edge, or a provisional one (a grid run has not ended)
    return (
        f'make sweep SWEEP=converge_final_cpu ARGS="dataset={selection.dataset_choice} '
        f'+variant={selection.preset} optim.lr={s.chosen:g}"'
    )


def selection_rows(selections: Sequence[RungSelection]) -> list[dict]:
    rows = []
    for selection in selections:
        row = selection.as_dict()
        row.pop("final_command", None)
        row["final_command"] = final_command(selection)
        rows.append(row)
    return rows


def next_step(tuning_runs: Iterable[Run], dataset_choice: str, preset: str) -> tuple[str, tuple[float, ...]]:
    """What a cell's part of the study runs next, from its tuning runs so far:

    - ("resume", rates) while a grid run is unfinished, or a rate lacks a tuning seed that another rate has (a study
      stopped between the seeds of one rate): run those rates' tuning sweep again, which resumes or starts them;
    - ("extend", (rate,)) when the choice sits at the grid's edge (or every rate diverged);
    - ("final", (rate,)) once it lies strictly inside;
    - ("none", ()) without tuning runs of that preset on that dataset.
    The choice is never read before the grid is complete (tuning.Selection.complete: every rate has every seed)."""
    mine = [r for r in tuning_runs if f"/{dataset_choice}/{preset}/" in f"/{Path(r.source).as_posix()}/"]
    selections = select_by_rung(mine) if mine else []
    if not selections:
        return "none", ()
    selection = selections[0]
    if not selection.selection.complete:
        return "resume", tuple(selection.selection.pending_rates)
    if selection.next_lr is not None:
        return "extend", (selection.next_lr,)
    return "final", (selection.selection.chosen,)
