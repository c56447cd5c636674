"""Do validation curves rise and fall together? A measure of the ripple that runs reading the text in one order share.

Every run of a study reads the training text in the same order (fixed stream offsets; the seed draws the initial
weights only), so what the model has just read before an evaluation is the same for every run: the validation bpc
of different seeds, and of different cells, tends to rise and fall at the same evaluations. A plateau rule that
halves the rate or stops on such a rise then acts at the same step in many runs, and the CIs over seeds, which cover
initialisations, do not cover it.

Measured here, per group of runs, over the evaluations after the first rise of any run (before it every curve
falls and agreement is trivial) at which at least half the runs (and at least `MIN_RUNS`) are still going:

- agreement: the mean, over evaluations, of the fraction of runs whose validation bpc moved (from the previous
  evaluation) the way the majority moved;
- expected: the same if each run rose or fell independently of the others, each at its own rate of rises over the
  window (exact, from the Poisson-binomial law of the number of rises); agreement well above it is a shared ripple;
- the evaluation at which the most runs rose together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlstm.studies import convergence as cv

MIN_RUNS = 3


@dataclass(frozen=True)
class CoMovement:
    runs: int  # runs going at one or more of the counted evaluations
    evaluations: int  # evaluations counted
    first_step: float  # the window's first and last evaluation (steps)
    last_step: float
    agreement: float  # mean fraction of runs moving with the majority
    expected: float  # the same for runs moving independently, each at its own rate of rises
    peak_step: float  # the evaluation at which the largest fraction of runs rose
    peak_rose: int
    peak_counted: int


def moves(curve: cv.Curve) -> dict[float, bool]:
    """{step: rose} for every evaluation after a run's first: whether its validation bpc rose since the previous one."""
    steps, y = curve.along("steps")
    return {float(steps[i]): bool(y[i] > y[i - 1]) for i in range(1, len(y))}


def expected_agreement(rates: Sequence[float]) -> float:
    """E[max(U, n - U) / n] for U the number of rises among n runs rising independently with these probabilities."""
    law = np.array([1.0])  # law[k] = P(k rises so far): the Poisson-binomial distribution, one run at a time
    for p in rates:
        law = np.convolve(law, [1 - p, p])
    n = len(rates)
    return float(sum(law[k] * max(k, n - k) / n for k in range(n + 1)))


def co_movement(curves: Sequence[cv.Curve], min_runs: int = MIN_RUNS) -> CoMovement | None:
    """How the runs' validation curves move together (see the module's docstring); None when no evaluation counts."""
    per_run = [moves(c) for c in curves if len(c.y) > 1]
    need = max(min_runs, math.ceil(len(per_run) / 2))
    rises = sorted(step for m in per_run for step, rose in m.items() if rose)
    if len(per_run) < need or not rises:
        return None
    window = sorted(
        step for step in {s for m in per_run for s in m} if step >= rises[0] and sum(step in m for m in per_run) >= need
    )
    if not window:
        return None
    rate = []  # each run's own rate of rises over the evaluations of the window it took part in
    for m in per_run:
        mine = [m[s] for s in window if s in m]
        rate.append(sum(mine) / len(mine) if mine else math.nan)
    agreement, expected, peak = [], [], (-1.0, 0.0, 0, 0)
    for step in window:
        going = [i for i, m in enumerate(per_run) if step in m]
        rose = sum(per_run[i][step] for i in going)
        agreement.append(max(rose, len(going) - rose) / len(going))
        expected.append(expected_agreement([rate[i] for i in going]))
        if rose / len(going) > peak[0]:
            peak = (rose / len(going), step, rose, len(going))
    return CoMovement(
        runs=sum(any(s in m for s in window) for m in per_run),
        evaluations=len(window),
        first_step=window[0],
        last_step=window[-1],
        agreement=float(np.mean(agreement)),
        expected=float(np.mean(expected)),
        peak_step=peak[1],
        peak_rose=peak[2],
        peak_counted=peak[3],
    )
