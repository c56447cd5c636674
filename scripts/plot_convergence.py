"""Convergence figures, summary.csv and report.md from training runs: does mLSTM converge faster than LSTM?

    make plot RUNS="multirun/2026-01-01/12-00-00" OUT=results/convergence
    python scripts/plot_convergence.py RUN_OR_SWEEP_DIR... [--out DIR] [--targets 2.5,2.2,2.0] [--baseline lstm]
    python scripts/plot_convergence.py --wandb mlstm/convergence --out DIR          # runs from W&B instead

For every dataset found it writes, into --out:
    <dataset>_{valid,train}_vs_{steps,chars,seconds}.png   one figure per axis (also .svg with --svg)
    <dataset>_convergence.png                               the six panels together
    summary.csv    one row per dataset x variant x target (steps/chars/seconds to target, ratio to the baseline with
                   bootstrap CIs, fraction of seeds that reached it) plus the equal-character and equal-time budget bpc
    report.md      the answer in words, generated from those numbers, with a table per dataset and the runs used
The study itself is `mlstm.studies.study.write_study` (figures in `mlstm.studies.figures`, text in
`mlstm.studies.report`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlstm.cli import exit_on_user_error
from mlstm.studies import convergence as cv
from mlstm.studies.study import BANDS, StudyOptions, load_study_runs, write_study


def targets_arg(text: str) -> list[float]:
    try:
        return cv.parse_targets(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bpc levels, got {text!r}") from None


def unigram_entropy_arg(text: str) -> tuple[str | None, float]:
    """ "5.08" -> (None, 5.08), "text8=4.11" -> ("text8", 4.11); None applies to every dataset not named."""
    name, _, bits = text.rpartition("=")
    try:
        return name or None, float(bits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BITS or DATASET=BITS") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="*", help="run directories, sweep directories or globs holding metrics.jsonl")
    parser.add_argument("--out", default="results/convergence", help="output directory (default: %(default)s)")
    parser.add_argument("--wandb", metavar="PROJECT[/GROUP]", help="read runs from W&B instead of directories")
    parser.add_argument("--baseline", default="lstm", help="variant the others are compared with (default: lstm)")
    parser.add_argument(
        "--targets", type=targets_arg, help="bpc levels, e.g. 2.5,2.2,2.0 (default: chosen per dataset)"
    )
    parser.add_argument("--num-targets", type=int, default=5, help="levels in the automatic ladder (default: 5)")
    parser.add_argument(
        "--label-key",
        help="config key(s) naming the variant instead of cell name/form/impl, "
        "e.g. cell.hidden_size or cell.name,cell.hidden_size",
    )
    parser.add_argument(
        "--band",
        choices=BANDS,
        default="minmax",
        help="band around the mean curve: range of seeds or 95%% t-interval (default: minmax)",
    )
    parser.add_argument("--logx", action="store_true", help="logarithmic x-axes")
    parser.add_argument("--svg", action="store_true", help="also save every single-axis figure as SVG")
    parser.add_argument(
        "--unigram-entropy",
        type=unigram_entropy_arg,
        action="append",
        default=[],
        metavar="[DATASET=]BITS",
        help="reference line; repeatable; default: computed from the dataset file when readable",
    )
    parser.add_argument("--bootstrap", type=int, default=cv.N_RESAMPLES, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--rng-seed", type=int, default=cv.RNG_SEED, help="bootstrap RNG seed (default: 0)")
    parser.add_argument("--grid-points", type=int, default=200, help="points of the mean-curve grid (default: 200)")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run directories (or globs) or --wandb PROJECT[/GROUP]")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    options = StudyOptions(
        baseline=args.baseline,
        targets=args.targets,
        num_targets=args.num_targets,
        band=args.band,
        logx=args.logx,
        svg=args.svg,
        bootstrap=args.bootstrap,
        rng_seed=args.rng_seed,
        grid_points=args.grid_points,
        unigram_entropies=dict(args.unigram_entropy),
        label_key=args.label_key,
    )
    runs = load_study_runs(args.paths, options, wandb=args.wandb)
    analyses = write_study(runs, args.out, options)
    print(
        f"{len(runs)} runs, {len(analyses)} dataset(s) -> {Path(args.out)}/report.md, summary.csv, "
        f"{sum(len(a.figures) for a in analyses)} figures"
    )


if __name__ == "__main__":
    main()
