"""Learning-rate tuning: the score of one run, the selection rule over a grid, and the sensitivity analysis.

The rule (fixed before any tuning run was looked at, and the same for every cell and dataset):

1. A run's **score** is its validation bpc averaged over the evaluation points of the last quarter of the budget
   (steps >= 3/4 of `trainer.max_steps`; with 800 steps and validation every 50: steps 600, 650, ..., 800). A run
   that diverged (`event: diverged`), logged a non-finite validation bpc there, or never reached that quarter scores
   +inf: the worst. A run trained to convergence (`trainer.early_stop_patience` set: the converged study) scores
   instead its **lowest** validation bpc, once it has ended (stopped by the rule, or at the cap); +inf while it runs
   or when it diverged.
2. A rate's score is the mean of its runs' scores over the **tuning seeds every rate of that cell has** (so no rate
   wins by missing a bad seed; a rate that lacks one of them is scored on the common seeds only and flagged).
3. The chosen rate is the one with the lowest score; a tie (within 1e-9 bpc) goes to the smaller rate, the more
   conservative choice. A chosen rate at either end of the grid is flagged: the grid must be extended until the
   choice is strictly inside it. A cell whose every rate scores +inf has no choice.
4. A run whose validation bpc stands more than `UNSTABLE_GAP` bpc above its training bpc at an evaluation point of
   the last quarter is reported as **unstable** (its state blew up on the long validation stream); it is not
   excluded, its score already says how bad it is.

`train()` returns the score of its run as `score` and the training task returns it to Hydra's sweepers, so a grid
(the basic sweeper) and an Optuna search (`hydra/sweeper=optuna`) rank runs by the same number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mlstm.training.score import LAST_FRACTION, _number, diverged, ended, late_points, run_score  # noqa: F401 (rule 1)

UNSTABLE_GAP = 1.0  # bpc: evaluation this far above training is a state blow-up (a cold start it never recovers from)
TIE_TOLERANCE = 1e-9


def unstable(records: list[Mapping], budget_steps: int, gap: float = UNSTABLE_GAP) -> bool:
    """Rule 4: validation bpc more than `gap` above the nearest earlier training bpc at a late evaluation point."""
    train = sorted(
        (int(r["step"]), float(r["train/bpc"]))
        for r in records
        if _number(r.get("train/bpc")) is not None and _number(r.get("step")) is not None
    )
    for step, valid in late_points(records, budget_steps):
        before = [bpc for s, bpc in train if s <= step]
        if before and math.isfinite(before[-1]) and (not math.isfinite(valid) or valid > before[-1] + gap):
            return True
    return False


def unstable_on(records: list[Mapping], key: str = "test/bpc", gap: float = UNSTABLE_GAP) -> bool:
    """Rule 4 for a split evaluated once at the end (the final runs' test split): its bpc more than `gap` above the
    last training bpc, or non-finite."""
    value = next((_number(r.get(key)) for r in reversed(records) if _number(r.get(key)) is not None), None)
    train = [_number(r.get("train/bpc")) for r in records if _number(r.get("train/bpc")) is not None]
    return (
        value is not None
        and bool(train)
        and math.isfinite(train[-1])
        and (not math.isfinite(value) or value > train[-1] + gap)
    )


# ------------------------------------------------------------------------------------------------- the grid, ruled
def blown_streams(
    records: list[Mapping],
    key: str = "test/cold_start_stream_bpc",
    gap: float = UNSTABLE_GAP,
    level: float | None = None,
) -> tuple[int, int] | None:
    """(streams blown up, streams) of the cold-start check (the trainer's `cold_start_streams`): a stream whose bpc
    stands more than `gap` above `level`, or is non-finite, is rule 4's blow-up on that stream. `level` defaults to
    the run's last training bpc (rule 4 as such: right within an epoch or so, where training and held-out bpc are
    level); None when the run has no such check."""
    per_stream = next((r[key] for r in reversed(records) if isinstance(r.get(key), list)), None)
    if level is None:
        train = [_number(r.get("train/bpc")) for r in records if _number(r.get("train/bpc")) is not None]
        level = train[-1] if train else None
    if not per_stream or level is None:
        return None
    blown = sum(1 for v in per_stream if _number(v) is None or not math.isfinite(v) or v > level + gap)
    return blown, len(per_stream)


def learning_rate(config: Mapping) -> float | None:
    value = (config.get("optim") or {}).get("lr")
    return float(value) if isinstance(value, (int, float)) else None


def to_convergence(config: Mapping) -> bool:
    """A run trained to convergence (`trainer.early_stop_patience` set, mlstm.training.plateau): rule 1 scores its
    lowest validation bpc instead of the mean over the last quarter of a fixed budget."""
    return (config.get("trainer") or {}).get("early_stop_patience") is not None


def budget_steps(config: Mapping) -> int:
    return int((config.get("trainer") or {}).get("max_steps") or 0)


def final_valid(records: list[Mapping], budget: int) -> float:
    """Validation bpc at the end of the budget (+inf for a diverged run or one that never got there)."""
    points = dict(late_points(records, budget))
    return math.inf if diverged(records) or budget not in points else points[budget]


@dataclass
class RateScore:
    """One learning rate of one cell on one dataset: its runs by seed and its score under the rule."""

    lr: float
    per_seed: dict  # seed -> run score (rule 1)
    final_by_seed: dict  # seed -> validation bpc at the end of the budget
    unstable_seeds: list
    diverged_seeds: list
    unfinished_seeds: list = field(default_factory=list)  # neither diverged nor at the end of the budget (yet)
    missing_seeds: list = field(default_factory=list)  # tuning seeds other rates have and this one lacks (yet)
    scored_seeds: list = field(default_factory=list)  # the seeds the rate is compared on (rule 2)
    score: float = math.inf


@dataclass
class Selection:
    """The rule applied to one cell's grid on one dataset."""

    dataset: str
    variant: str
    rates: list[RateScore]  # in increasing order of learning rate
    seeds: list  # the common tuning seeds every rate was scored on
    chosen: float | None  # None when every rate scored +inf
    notes: list[str] = field(default_factory=list)

    @property
    def at_edge(self) -> bool:
        """The choice is the smallest or largest rate of the grid: the grid must be extended (rule 3)."""
        return self.chosen is not None and self.chosen in (self.rates[0].lr, self.rates[-1].lr)

    @property
    def pending_rates(self) -> list[float]:
        """The rates with a run not finished yet (neither at the end of its budget nor diverged) or a seed the other
        rates have and this one lacks (a sweep stopped between its seeds)."""
        return [r.lr for r in self.rates if r.unfinished_seeds or r.missing_seeds]

    @property
    def complete(self) -> bool:
        """Every run of the grid exists and has finished: until then the choice is provisional."""
        return not self.pending_rates

    @property
    def chosen_score(self) -> float:
        return next((r.score for r in self.rates if r.lr == self.chosen), math.inf)

    @property
    def span(self) -> float:
        """Largest over smallest rate of the grid."""
        return self.rates[-1].lr / self.rates[0].lr if self.rates else math.nan


def score_rates(runs: Iterable) -> list[RateScore]:
    """Rules 1, 2 and 4 over the runs of one cell on one dataset (runs are mlstm.studies.runs.Run: config + records)."""
    by_rate: dict[float, RateScore] = {}
    for run in runs:
        lr, budget = learning_rate(run.config), budget_steps(run.config)
        if lr is None or budget <= 0:
            continue
        rate = by_rate.setdefault(lr, RateScore(lr, {}, {}, [], []))
        seed = run.seed if run.seed is not None else run.source
        rate.per_seed[seed] = run_score(run.records, budget, best=to_convergence(run.config))
        rate.final_by_seed[seed] = final_valid(run.records, budget)
        if unstable(run.records, budget):
            rate.unstable_seeds.append(seed)
        if diverged(run.records):
            rate.diverged_seeds.append(seed)
        elif not ended(run.records, budget):
            rate.unfinished_seeds.append(seed)
    rates = [by_rate[lr] for lr in sorted(by_rate)]
    common = set.intersection(*(set(r.per_seed) for r in rates)) if rates else set()
    every = set().union(*(r.per_seed for r in rates))
    for rate in rates:
        rate.missing_seeds = sorted(every - set(rate.per_seed), key=str)
        rate.scored_seeds = sorted(common, key=str) if common else sorted(rate.per_seed, key=str)
        scores = [rate.per_seed[s] for s in rate.scored_seeds]
        rate.score = sum(scores) / len(scores) if scores and all(math.isfinite(s) for s in scores) else math.inf
    return rates


def choose(rates: list[RateScore]) -> float | None:
    """Rule 3: the lowest score; ties (within TIE_TOLERANCE) to the smaller rate; None when all are +inf."""
    finite = [r for r in rates if math.isfinite(r.score)]
    if not finite:
        return None
    best = min(r.score for r in finite)
    return min(r.lr for r in finite if r.score <= best + TIE_TOLERANCE)


def select(runs: Iterable) -> list[Selection]:
    """The rule applied to every (dataset, cell) of a set of tuning runs, sorted by dataset and cell."""
    groups: dict[tuple[str, str], list] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.label), []).append(run)
    selections = []
    for (dataset, variant), group in sorted(groups.items()):
        rates = score_rates(group)
        if not rates:
            continue
        common = rates[0].scored_seeds if all(r.scored_seeds == rates[0].scored_seeds for r in rates) else []
        selection = Selection(dataset, variant, rates, list(common), choose(rates))
        unfinished = sum(len(r.unfinished_seeds) for r in rates)
        if unfinished:
            selection.notes.append(f"{unfinished} run{'s' * (unfinished > 1)} not finished: the choice is provisional")
        if selection.chosen is None:
            selection.notes.append("every rate diverged or did not finish: no rate chosen")
        elif selection.at_edge:
            side = "smallest" if selection.chosen == rates[0].lr else "largest"
            factor = 0.5 if side == "smallest" else 2.0
            selection.notes.append(
                f"the chosen rate is the grid's {side}: extend the grid "
                f"(next rate {selection.chosen * factor:g}) until the choice is strictly inside"
            )
        if not common:
            selection.notes.append("the rates share no tuning seed: each rate is scored on its own seeds")
        elif any(len(r.per_seed) > len(common) for r in rates):
            extra = [f"{r.lr:g}" for r in rates if len(r.per_seed) > len(common)]
            selection.notes.append(
                f"rates {', '.join(extra)} have seeds the others lack: every rate is scored on "
                f"the common seeds {', '.join(map(str, common))}, and the choice is provisional until every rate "
                "has every seed"
            )
        selections.append(selection)
    return selections
