"""A convergence study of a set of runs: per dataset, each variant's time to target and bpc at an equal budget
against a baseline variant, written out as figures, summary.csv and report.md (`write_study`).

The statistics live in `mlstm.studies.convergence`, the run loading in `mlstm.studies.runs`, the drawing in
`mlstm.studies.figures` and the text in `mlstm.studies.report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mlstm.errors import UserError
from mlstm.studies import convergence as cv
from mlstm.studies import figures, report
from mlstm.studies.analysis import (  # noqa: F401
    BANDS,
    BUDGET_AXES,
    DatasetAnalysis,
    StudyOptions,
)
from mlstm.studies.references import corpus_file, unigram_entropy_of_file
from mlstm.studies.runs import Run, curves_by_seed, group_runs, load_runs, load_wandb_runs


# ------------------------------------------------------------------------------------------------- reference lines
def unigram_entropy(dataset: str, runs: list[Run], given: Mapping[str | None, float]) -> float | None:
    """The unigram-entropy reference for a dataset: given, else computed from its corpus file, else unknown."""
    if dataset in given:
        return given[dataset]
    if None in given:
        return given[None]
    for run in runs:
        path, train_bytes = corpus_file(run.config)
        if path is not None:
            return unigram_entropy_of_file(path, train_bytes)
    return None


# -------------------------------------------------------------------------------------------------------- analysis
def analyse_dataset(name: str, variants: dict[str, list[Run]], options: StudyOptions) -> DatasetAnalysis:
    """Targets, time-to-target comparisons and equal-budget comparisons of one dataset's variants."""
    valid = {v: curves_by_seed(runs, "valid/bpc") for v, runs in variants.items()}
    valid = {v: {k: c for k, c in curves.items() if len(c.y)} for v, curves in valid.items()}
    valid = {v: curves for v, curves in valid.items() if curves}
    if options.targets:
        targets = sorted(options.targets, reverse=True)  # easiest first, as cv.parse_targets orders them
    else:
        all_curves = [c for curves in valid.values() for c in curves.values()]
        targets = cv.default_targets([c.y[0] for c in all_curves], [c.y.min() for c in all_curves], options.num_targets)
    reach = cv.compare_reach(valid, targets, options.baseline, n_resamples=options.bootstrap, seed=options.rng_seed)
    budgets = [
        row
        for axis in BUDGET_AXES
        for row in cv.compare_at_budget(valid, options.baseline, axis, options.bootstrap, options.rng_seed)
    ]
    all_runs = [run for runs in variants.values() for run in runs]
    return DatasetAnalysis(
        name,
        variants,
        options.baseline,
        targets,
        reach,
        budgets,
        unigram_entropy(name, all_runs, options.unigram_entropies),
    )


def analyse(runs: Sequence[Run], options: StudyOptions) -> list[DatasetAnalysis]:
    """One analysis per dataset of the runs, datasets in sorted order."""
    return [analyse_dataset(name, variants, options) for name, variants in group_runs(runs).items()]


# ---------------------------------------------------------------------------------------------------------- output
def load_study_runs(
    paths: Sequence[str] = (), options: StudyOptions | None = None, wandb: str | None = None
) -> list[Run]:
    """The runs under `paths` (run or sweep directories, globs), or of a W&B "PROJECT[/GROUP]" when given, labelled
    by `options.label_key`."""
    options = options or StudyOptions()
    if wandb:
        return load_wandb_runs(wandb, options.label_key)
    return load_runs(paths, options.label_key)


def write_study(runs: Sequence[Run], out_dir: str | Path, options: StudyOptions | None = None) -> list[DatasetAnalysis]:
    """Analyse the runs and write, into `out_dir`, every dataset's figures, then summary.csv and report.md."""
    options = options or StudyOptions()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {out} ({error.strerror})") from None
    analyses = analyse(runs, options)
    for analysis in analyses:
        analysis.figures = [path.name for path in figures.save_figures(analysis, out, options)]
    report.write_summary(analyses, out / "summary.csv")
    report.write_report(analyses, out / "report.md", options)
    return analyses
