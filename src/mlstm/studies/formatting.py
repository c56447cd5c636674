"""Number formatting shared by the size-ladder and converged-study reports: a missing or non-finite value prints as
a dash (an empty cell in a CSV), an interval as `value (low–high)`. The one-epoch and tuning reports keep their own
older wording, which their committed reports are regenerated against byte for byte."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence


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


def csv_text(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """`rows` as CSV, non-finite numbers as empty cells. With `columns` the header is written even when there are no
    rows yet (a study in progress still names what it will report); without them, the first row's keys."""
    columns = list(columns) if columns is not None else list(rows[0]) if rows else []
    if not columns:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return buffer.getvalue()
