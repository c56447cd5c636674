"""Number formatting shared by the size-ladder and converged-study reports: a missing or non-finite value prints as
a dash, an interval as `value (low–high)`. The one-epoch and tuning reports keep their own older wording, which
their committed reports are regenerated against byte for byte."""

from __future__ import annotations

import math


def finite(value) -> bool:
    """A real, finite number (not None, not a bool, not nan or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if finite(value) else "–"


def interval(iv, spec: str = ".2f") -> str:
    """`value (low–high)` for a convergence.Interval; the value alone when its bounds are not finite."""
    if not finite(iv.value):
        return "–"
    if finite(iv.low) and finite(iv.high):
        return f"{iv.value:{spec}} ({iv.low:{spec}}–{iv.high:{spec}})"
    return f"{iv.value:{spec}}"


def signed(iv) -> str:
    """A difference with its sign: `+0.012 (-0.004–+0.030)`."""
    return interval(iv, "+.3f")
