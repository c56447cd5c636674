"""Learning-rate tuning: the score of one run, the selection rule over a grid, and the sensitivity analysis.

The rule (fixed before any tuning run was looked at, and the same for every cell and dataset):

1. A run's **score** is its validation bpc averaged over the evaluation points of the last quarter of the budget
   (steps >= 3/4 of `trainer.max_steps`; with 800 steps and validation every 50: steps 600, 650, ..., 800). A run
   that diverged (`event: diverged`), logged a non-finite validation bpc there, or never reached that quarter scores
   +inf: the worst.
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

LAST_FRACTION = 0.25  # the last quarter of the budget
UNSTABLE_GAP = 1.0  # bpc: validation this far above training, late in the run, is a state blow-up on the long stream
TIE_TOLERANCE = 1e-9


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


def unstable(records: list[Mapping], budget_steps: int, gap: float = UNSTABLE_GAP) -> bool:
    """Rule 4: validation bpc more than `gap` above the nearest earlier training bpc at a late evaluation point."""
    train = sorted((int(r["step"]), float(r["train/bpc"])) for r in records
                   if _number(r.get("train/bpc")) is not None and _number(r.get("step")) is not None)
    for step, valid in late_points(records, budget_steps):
        before = [bpc for s, bpc in train if s <= step]
        if before and math.isfinite(before[-1]) and (not math.isfinite(valid) or valid > before[-1] + gap):
            return True
    return False
