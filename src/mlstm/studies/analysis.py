"""The options of a convergence study and the analysis of one dataset: the types the study (mlstm.studies.study), its
report (report) and its figures (figures) share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mlstm.errors import UserError
from mlstm.studies import convergence as cv
from mlstm.studies.runs import Run

BANDS = ("minmax", "t95")
BUDGET_AXES = ("chars", "seconds")  # equal-character and equal-time budgets, in this order in every table
DEFAULT_SPLIT_FRACTIONS = (0.9, 0.05, 0.05)  # dataset=file's default split (as in mlstm.data.corpus)
MIN_RESAMPLES = 100


@dataclass(frozen=True)
class StudyOptions:
    """What to compare and how to draw and word it; the defaults are those of scripts/plot_convergence.py."""

    baseline: str = "lstm"  # the variant every other one is compared with
    targets: Sequence[float] | None = None  # validation bpc levels; None: `num_targets` levels chosen per dataset
    num_targets: int = 5
    band: str = "minmax"  # band around the mean curve: "minmax" (range of seeds) or "t95" (95% t-interval)
    logx: bool = False
    svg: bool = False  # also save every single-axis figure as SVG
    bootstrap: int = cv.N_RESAMPLES  # bootstrap resamples
    rng_seed: int = cv.RNG_SEED
    grid_points: int = 200  # points of the mean-curve grid
    # unigram-entropy reference line per dataset name; the key None applies to every dataset not named; a dataset
    # in neither gets it computed from its corpus file when the runs' configs point at a readable one
    unigram_entropies: Mapping[str | None, float] = field(default_factory=dict)
    # config key(s) naming the variant (see `mlstm.studies.runs.variant_label`); loading only
    label_key: str | None = None
    title: str = "Convergence of mLSTM against LSTM"  # report.md's heading
    generated_by: str = "`scripts/plot_convergence.py`"  # named in report.md's first sentence

    def __post_init__(self):
        if self.bootstrap < MIN_RESAMPLES:
            raise UserError(f"{self.bootstrap} bootstrap resamples are too few for a 95% interval; use 2000 or more")
        if self.band not in BANDS:
            raise UserError(f"band {self.band!r} is not one of {', '.join(BANDS)}")


@dataclass
class DatasetAnalysis:
    """Everything reported about one dataset: its runs by variant and the statistics computed on them."""

    name: str
    variants: dict[str, list[Run]]
    baseline: str
    targets: list[float]
    reach: list[cv.ReachRow]
    budgets: list[cv.BudgetRow]
    unigram_entropy: float | None
    figures: list[str] = field(default_factory=list)  # file names, set by `write_study`
