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


def run_score(records: list[Mapping], budget_steps: int) -> float:
    """Rule 1: mean validation bpc over the last quarter of the budget; +inf for a diverged or unfinished run."""
    points = late_points(records, budget_steps)
    if diverged(records) or not points or not all(math.isfinite(bpc) for _, bpc in points):
        return math.inf
    return sum(bpc for _, bpc in points) / len(points)
