"""Convergence statistics on learning curves: how fast does each variant reach a level of bits per character?

The question (asked of the seed TF mLSTM cell): does mLSTM converge faster than LSTM per optimizer step, per training
character and per wall-clock second? Validation bpc is measured at discrete points, so everything here works on
piecewise-linear curves:

    time-to-target   the first x (steps | chars | seconds) at which valid bpc <= target, interpolated between the last
                     point above and the first at/below it (`first_reach`)
    ratio            mean over seeds of variant / mean over seeds of the baseline (< 1: the variant is faster), with a
                     percentile bootstrap CI that resamples seeds (paired by seed value when both variants have the
                     same seeds, otherwise each variant on its own)
    equal budget     valid bpc interpolated at the largest x that *every* run reached, so runs of unequal length are
                     compared where all of them have data
    mean curve       seeds interpolated onto a common grid over the range all of them cover, with a min-max or a
                     95% t band

Pure numpy: the run loading lives in `mlstm.studies.runs`, the figures in `mlstm.studies.figures`, the tables in
`mlstm.studies.report`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

AXES = ("steps", "chars", "seconds")  # the three x-axes of the question
N_RESAMPLES = 2000
RNG_SEED = 0
LEVEL = 0.95

# two-sided 95% quantiles of Student's t (t_{0.975, df}) for df = 1..30; beyond that the normal 1.96 is close enough
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


@dataclass(frozen=True)
class Curve:
    """One run's metric at its measurement points, against every x-axis."""

    x: Mapping[str, np.ndarray]  # axis name ("steps", "chars", "seconds") -> (n,) non-decreasing positions
    y: np.ndarray  # (n,) metric values, e.g. valid bpc

    def along(self, axis: str) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.x[axis], dtype=float), np.asarray(self.y, dtype=float)


# ------------------------------------------------------------------------------------------------ one curve at a time
def first_reach(x: Sequence[float], y: Sequence[float], target: float) -> float:
    """The first x where the piecewise-linear curve y(x) is <= target; NaN if it never gets there.

    Between the last point above the target and the first point at/below it the curve is a straight line, so the
    crossing is solved exactly on that segment; a curve already at/below the target at its first point reaches it
    there (nothing earlier was measured).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    below = np.flatnonzero(y <= target)
    if below.size == 0:
        return math.nan
    i = int(below[0])
    if i == 0:
        return float(x[0])
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    return float(x0 + (y0 - target) / (y0 - y1) * (x1 - x0))


def value_at(x: Sequence[float], y: Sequence[float], at: float) -> float:
    """y linearly interpolated at x = at; NaN outside the measured range (never extrapolate a learning curve)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0 or not (x[0] <= at <= x[-1]):
        return math.nan
    return float(np.interp(at, x, y))


def common_budget(curves: Sequence[Curve], axis: str) -> float:
    """The largest x every curve reached: the end of the shortest run along `axis`."""
    ends = [float(np.max(c.x[axis])) for c in curves if len(c.y)]
    return min(ends) if ends else math.nan


def default_targets(first_values: Sequence[float], best_values: Sequence[float], n: int = 5) -> list[float]:
    """`n` evenly spaced bpc levels from just below the median first validation value down to the worst run's best.

    The lowest level is the highest of the runs' best bpc, so every run reaches every level and each ratio is
    defined; the median first value itself is left out because half the runs are already below it when first
    measured. Levels are rounded to 0.001 bpc inward so the rounding never makes a level unreachable.
    """
    first, best = np.asarray(first_values, dtype=float), np.asarray(best_values, dtype=float)
    if first.size == 0 or best.size == 0:
        return []
    upper = math.floor(float(np.median(first)) * 1000) / 1000
    lower = math.ceil(float(np.max(best)) * 1000) / 1000
    if not upper > lower:
        return [lower]
    levels = np.linspace(upper, lower, n + 1)[1:]
    return sorted({round(float(v), 3) for v in levels}, reverse=True)


def parse_targets(text: str) -> list[float]:
    """`"2.5,2.2,2.0"` -> [2.5, 2.2, 2.0] (highest, i.e. easiest, first)."""
    values = [float(v) for v in text.replace(" ", "").split(",") if v]
    return sorted(values, reverse=True)


# ---------------------------------------------------------------------------------------------------- seeds → CIs
@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval (NaN bounds when it cannot be computed)."""

    value: float
    low: float = math.nan
    high: float = math.nan


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean(
    values: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = RNG_SEED, level: float = LEVEL
) -> Interval:
    """Mean across seeds with a percentile bootstrap CI (seeds resampled with replacement); no CI from one seed."""
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.isnan(values).any():
        return Interval(math.nan)
    mean = float(values.mean())
    if values.size < 2:
        return Interval(mean)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    return Interval(mean, *_percentile_interval(means, level))


def _resampled_means(a: np.ndarray, b: np.ndarray, paired: bool, n_resamples: int, seed: int):
    """Bootstrap means of a and b: the same seed indices for both when paired, independent draws otherwise."""
    rng = np.random.default_rng(seed)
    index_a = rng.integers(0, a.size, size=(n_resamples, a.size))
    index_b = index_a if paired else rng.integers(0, b.size, size=(n_resamples, b.size))
    return a[index_a].mean(axis=1), b[index_b].mean(axis=1)


def bootstrap_ratio_of_means(
    variant: Sequence[float],
    baseline: Sequence[float],
    paired: bool = False,
    n_resamples: int = N_RESAMPLES,
    seed: int = RNG_SEED,
    level: float = LEVEL,
) -> Interval:
    """mean(variant) / mean(baseline) with a percentile bootstrap CI; NaN if any value is missing (not reached)."""
    a, b = np.asarray(variant, dtype=float), np.asarray(baseline, dtype=float)
    if a.size == 0 or b.size == 0 or np.isnan(a).any() or np.isnan(b).any():
        return Interval(math.nan)
    ratio = float(a.mean() / b.mean())
    if a.size < 2 or b.size < 2:
        return Interval(ratio)
    means_a, means_b = _resampled_means(a, b, paired, n_resamples, seed)
    return Interval(ratio, *_percentile_interval(means_a / means_b, level))


def bootstrap_difference_of_means(
    variant: Sequence[float],
    baseline: Sequence[float],
    paired: bool = False,
    n_resamples: int = N_RESAMPLES,
    seed: int = RNG_SEED,
    level: float = LEVEL,
) -> Interval:
    """mean(variant) - mean(baseline) with a percentile bootstrap CI (< 0: the variant has lower bpc)."""
    a, b = np.asarray(variant, dtype=float), np.asarray(baseline, dtype=float)
    if a.size == 0 or b.size == 0 or np.isnan(a).any() or np.isnan(b).any():
        return Interval(math.nan)
    difference = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Interval(difference)
    means_a, means_b = _resampled_means(a, b, paired, n_resamples, seed)
    return Interval(difference, *_percentile_interval(means_a - means_b, level))


def pair_by_seed(variant: Mapping[Hashable, float], baseline: Mapping[Hashable, float]):
    """Align two {seed: value} maps: paired (same order of seeds) when both hold exactly the same seeds.

    Returns (variant values, baseline values, paired). Pairing removes the seed-to-seed variation both variants share
    (same data order, same initial draws), which narrows the interval; with different seeds it would be meaningless.
    """
    if set(variant) == set(baseline) and None not in variant:
        seeds = sorted(variant, key=str)
        return [variant[s] for s in seeds], [baseline[s] for s in seeds], True
    return list(variant.values()), list(baseline.values()), False


# ----------------------------------------------------------------------------------- variants against the baseline
@dataclass(frozen=True)
class ReachRow:
    """How fast one variant reached one target along one axis, and how that compares with the baseline."""

    variant: str
    target: float
    axis: str  # "steps" | "chars" | "seconds"
    per_seed: dict  # seed -> x at which the target was reached (NaN: never)
    fraction_reached: float
    mean: Interval  # across seeds; NaN unless every seed reached the target
    ratio: Interval  # mean(variant) / mean(baseline); NaN unless every seed of both reached it
    paired: bool
    note: str = ""


@dataclass(frozen=True)
class BudgetRow:
    """Valid bpc of one variant at an equal budget (of characters or of seconds), against the baseline."""

    variant: str
    axis: str  # "chars" (equal-character budget) | "seconds" (equal-time budget) | "steps"
    budget: float
    per_seed: dict  # seed -> bpc at the budget
    mean: Interval
    minimum: float
    maximum: float
    difference: Interval  # mean(variant) - mean(baseline)
    paired: bool
    note: str = ""


def _reach_note(fraction: float, baseline_fraction: float | None, has_baseline: bool, at_first_point: bool) -> str:
    notes = []
    if not has_baseline:
        notes.append("no baseline runs")
    elif fraction < 1:
        notes.append("not every seed reached the target: no ratio")
    elif baseline_fraction is not None and baseline_fraction < 1:
        notes.append("not every baseline seed reached the target: no ratio")
    if at_first_point:
        notes.append("a seed was already at the target at its first validation point (an upper bound)")
    return "; ".join(notes)


def reached_at_first_point(curve: Curve, target: float) -> bool:
    """True when the first measurement is already at/below the target: the true crossing lies somewhere before."""
    return len(curve.y) > 0 and float(curve.y[0]) <= target


def compare_reach(
    groups: Mapping[str, Mapping[Hashable, Curve]],
    targets: Sequence[float],
    baseline: str,
    axes: Sequence[str] = AXES,
    n_resamples: int = N_RESAMPLES,
    seed: int = RNG_SEED,
) -> list[ReachRow]:
    """Time-to-target of every variant (per seed, mean, fraction reached) and its ratio to the baseline variant."""
    rows = []
    for target in targets:
        for axis in axes:
            reached = {
                name: {s: first_reach(*c.along(axis), target) for s, c in runs.items()} for name, runs in groups.items()
            }
            base = reached.get(baseline)
            for name, per_seed in reached.items():
                fraction = _fraction_reached(per_seed)
                base_fraction = _fraction_reached(base) if base is not None else None
                if base is None:
                    ratio, paired = Interval(math.nan), False
                else:
                    a, b, paired = pair_by_seed(per_seed, base)
                    ratio = bootstrap_ratio_of_means(a, b, paired, n_resamples, seed)
                at_first = any(reached_at_first_point(c, target) for c in groups[name].values())
                rows.append(
                    ReachRow(
                        name,
                        target,
                        axis,
                        per_seed,
                        fraction,
                        bootstrap_mean(list(per_seed.values()), n_resamples, seed),
                        ratio,
                        paired,
                        _reach_note(fraction, base_fraction, base is not None, at_first),
                    )
                )
    return rows


def _fraction_reached(per_seed: Mapping[Hashable, float]) -> float:
    values = np.asarray(list(per_seed.values()), dtype=float)
    return float(np.mean(~np.isnan(values))) if values.size else math.nan


def compare_at_budget(
    groups: Mapping[str, Mapping[Hashable, Curve]],
    baseline: str,
    axis: str,
    n_resamples: int = N_RESAMPLES,
    seed: int = RNG_SEED,
) -> list[BudgetRow]:
    """Valid bpc of every run at the largest `axis` value all runs reached; mean, range and difference to baseline."""
    budget = common_budget([c for runs in groups.values() for c in runs.values()], axis)
    at_budget = {name: {s: value_at(*c.along(axis), budget) for s, c in runs.items()} for name, runs in groups.items()}
    base = at_budget.get(baseline)
    rows = []
    for name, per_seed in at_budget.items():
        values = np.asarray(list(per_seed.values()), dtype=float)
        if base is None:
            difference, paired, note = Interval(math.nan), False, "no baseline runs"
        else:
            a, b, paired = pair_by_seed(per_seed, base)
            difference = bootstrap_difference_of_means(a, b, paired, n_resamples, seed)
            note = "" if np.isfinite(difference.value) else "a run has no validation point before the budget"
        rows.append(
            BudgetRow(
                name,
                axis,
                budget,
                per_seed,
                bootstrap_mean(values, n_resamples, seed),
                float(np.nanmin(values)) if np.isfinite(values).any() else math.nan,
                float(np.nanmax(values)) if np.isfinite(values).any() else math.nan,
                difference,
                paired,
                note,
            )
        )
    return rows


# ------------------------------------------------------------------------------------------------------ mean curves
@dataclass(frozen=True)
class Band:
    """The mean of several seeds' curves on a common grid, with a lower and an upper band."""

    grid: np.ndarray  # (G,)
    mean: np.ndarray  # (G,)
    low: np.ndarray  # (G,)
    high: np.ndarray  # (G,)
    n_seeds: int


def t_quantile_975(df: int) -> float:
    """t_{0.975} with `df` degrees of freedom (table up to 30, normal beyond)."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def common_grid(curves: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 200, log: bool = False) -> np.ndarray:
    """Grid over the x-range every curve covers (largest start to smallest end); geometric when `log`."""
    start = max(float(x[0]) for x, _ in curves)
    end = min(float(x[-1]) for x, _ in curves)
    if not end > start:
        return np.array([start]) if end == start else np.array([])
    if log and start > 0:
        return np.geomspace(start, end, points)
    return np.linspace(start, end, points)


def mean_band(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]],
    points: int = 200,
    band: str = "minmax",
    log: bool = False,
) -> Band:
    """Mean across seeds of curves (x, y) on their common grid; band "minmax" (range) or "t95" (95% t-interval)."""
    if band not in ("minmax", "t95"):
        raise ValueError(f"band must be 'minmax' or 't95', not {band!r}")
    curves = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in curves if len(x)]
    if not curves:
        empty = np.array([])
        return Band(empty, empty, empty, empty, 0)
    grid = common_grid(curves, points, log)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])  # (seeds, G)
    mean = ys.mean(axis=0)
    if band == "minmax" or len(curves) < 2:
        low, high = ys.min(axis=0), ys.max(axis=0)
    else:
        half = t_quantile_975(len(curves) - 1) * ys.std(axis=0, ddof=1) / math.sqrt(len(curves))
        low, high = mean - half, mean + half
    return Band(grid, mean, low, high, len(curves))
