"""The score of one run, rule 1 of the tuning rule (mlstm.studies.tuning): what `train()` returns to Hydra's
sweepers as `score`, so a grid and an Optuna search rank runs by the same number as the studies' reports."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

LAST_FRACTION = 0.25  # the last quarter of the budget


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def diverged(records: Iterable[Mapping]) -> bool:
    """Whether the run ended on a divergence (`trainer.on_divergence=end` logs `event: diverged`)."""
    return any(record.get("event") == "diverged" for record in records)


def late_points(records: Iterable[Mapping], budget_steps: int) -> list[tuple[int, float]]:
    """(step, valid bpc) of the evaluation points in the last quarter of a budget of `budget_steps` steps."""
    first = math.ceil((1.0 - LAST_FRACTION) * budget_steps)
    points = {}
    for record in records:
        bpc, step = _number(record.get("valid/bpc")), _number(record.get("step"))
        if bpc is not None and step is not None and first <= step <= budget_steps:
            points[int(step)] = bpc
    return sorted(points.items())


def run_score(records: list[Mapping], budget_steps: int, best: bool = False) -> float:
    """Rule 1: mean validation bpc over the last quarter of the budget; +inf for a diverged or unfinished run.
    best=True (runs trained to convergence, `trainer.early_stop_patience` set): the lowest validation bpc of a run
    that ended by the rule or at the cap; +inf for a diverged or unfinished one."""
    if best:
        valids = [bpc for record in records if (bpc := _number(record.get("valid/bpc"))) is not None]
        if diverged(records) or not valids or not ended(records, budget_steps):
            return math.inf
        finite = [v for v in valids if math.isfinite(v)]
        return min(finite) if finite else math.inf
    points = late_points(records, budget_steps)
    if diverged(records) or not points or not all(math.isfinite(bpc) for _, bpc in points):
        return math.inf
    return sum(bpc for _, bpc in points) / len(points)


def early_stopped(records: Iterable[Mapping]) -> bool:
    """Whether the run stopped by the to-convergence rule (mlstm.training.plateau logs `event: early_stop`)."""
    return any(record.get("event") == "early_stop" for record in records)


def ended(records: list[Mapping], budget_steps: int) -> bool:
    """Whether training ended: stopped by the rule, diverged, or validated at the last step of the budget (the cap)."""
    return (
        early_stopped(records)
        or diverged(records)
        or any(record.get("step") == budget_steps and "valid/bpc" in record for record in records)
    )
