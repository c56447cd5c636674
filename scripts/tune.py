"""Learning-rate tuning: apply the selection rule to a grid of runs, and write the tuned study's report.

    python scripts/tune.py select results/convergence/tuned/runs [--json selection.json]
    python scripts/tune.py plan results/convergence/tuned/runs/enwik8_sample       # what to run next
    python scripts/tune.py report --tuning results/convergence/tuned/runs --final results/convergence/tuned/final \\
        --shared results/convergence/rerun/runs [--posthoc results/convergence/tuned/posthoc] \\
        --out results/convergence/tuned

`select` prints, per dataset and cell, every rate's score under the rule (mlstm.studies.tuning), the chosen rate,
what needs doing (a grid to extend), and the command that runs the final seeds at the chosen rate. `plan` prints only
the commands: grid extensions while a choice sits at a grid's edge, else the final seeds. `report` writes report.md,
summary.csv, the sensitivity figures and the best-against-best convergence figures (mlstm.studies.tuning_report).
What each command does: `mlstm.studies.tuning_commands`.
"""

from __future__ import annotations

import argparse

from mlstm.cli import exit_on_user_error
from mlstm.studies import tuning_commands


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    select = sub.add_parser("select", help="the rule applied to a grid of tuning runs")
    select.add_argument("paths", nargs="+", help="tuning run directories, sweep directories or globs")
    select.add_argument("--json", help="also write the selection as JSON")
    select.add_argument("--final-sweep", default="tuned_final_cpu", help="sweep config of the final seeds' command")
    plan = sub.add_parser("plan", help="the commands the study needs next: grid extensions, else the final seeds")
    plan.add_argument("paths", nargs="+", help="tuning run directories, sweep directories or globs")
    plan.add_argument("--tuning-sweep", default="tune_lr_cpu", help="sweep config that extends a grid")
    plan.add_argument("--final-sweep", default="tuned_final_cpu", help="sweep config of the final seeds")
    report = sub.add_parser("report", help="the tuned study's report, figures and summary.csv")
    report.add_argument("--tuning", nargs="+", required=True, help="tuning runs")
    report.add_argument("--final", nargs="*", default=[], help="final runs (each cell at its chosen rate)")
    report.add_argument("--shared", nargs="*", default=[], help="shared-rate runs to compare with")
    report.add_argument(
        "--posthoc",
        nargs="*",
        default=[],
        help="runs at rates the rule did not choose (a labelled check beside the final runs)",
    )
    report.add_argument("--out", required=True, help="output directory")
    report.add_argument(
        "--targets",
        action="append",
        default=[],
        metavar="DATASET=L1,L2,...",
        help="the shared-rate study's target ladder for a dataset (extended to the tuned levels)",
    )
    report.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    tuning_commands.run(parse_args(argv))


if __name__ == "__main__":
    main()
