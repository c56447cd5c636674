"""The converged study's report: best against best, every cell trained until validation stops improving.

    python scripts/converged_report.py --final results/convergence/converged/final \
        --tuning results/convergence/converged/runs --out results/convergence/converged

Writes OUT/report.md, OUT/summary.csv (one row per final run), OUT/selection.json (the tuning rule's choices and the
sweep that runs each cell's fresh seeds) and two figures per dataset (curves to convergence, best bpc per size).
The analysis is mlstm.studies.converged; the writer mlstm.studies.converged_report.
"""

import argparse

from mlstm.cli import exit_on_user_error
from mlstm.studies.converged_report import report_from_runs


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--final", nargs="*", default=[], help="run directories (or folders of them): fresh seeds")
    parser.add_argument("--tuning", nargs="*", default=[], help="run directories of the learning-rate grids")
    parser.add_argument("--out", required=True, help="folder for report.md, summary.csv, selection.json, figures")
    parser.add_argument("--title", default=None, help="report.md's heading")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures (no matplotlib needed)")
    args = parser.parse_args(argv)
    kwargs = {"title": args.title} if args.title else {}
    print(report_from_runs(args.final, args.tuning, args.out, figures=not args.no_figures, **kwargs), end="")


if __name__ == "__main__":
    main()
