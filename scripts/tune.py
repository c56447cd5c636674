"""Learning-rate tuning: apply the selection rule to a grid of runs, and write the tuned study's report.

    python scripts/tune.py select results/convergence/tuned/runs [--json selection.json]
    python scripts/tune.py plan results/convergence/tuned/runs/enwik8_sample       # what to run next
    python scripts/tune.py report --tuning results/convergence/tuned/runs --final results/convergence/tuned/final \\
        --shared results/convergence/rerun/runs [--posthoc results/convergence/tuned/posthoc] \\
        --out results/convergence/tuned

`select` prints, per dataset and cell, every rate's score under the rule (mlstm.studies.tuning), the chosen rate, what needs
doing (a grid to extend), and the command that runs the final seeds at the chosen rate. `plan` prints only the
commands: grid extensions while a choice sits at a grid's edge, else the final seeds. `report` writes report.md,
summary.csv, the sensitivity figures and the best-against-best convergence figures (mlstm.studies.tuning_report).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlstm.studies import tuning, tuning_report
from mlstm.cli import exit_on_user_error, publish, write_atomic
from mlstm.errors import UserError
from mlstm.studies.runs import load_runs

# the sweep configs' names for the variants the runs' labels come from (configs/variant/*_1m.yaml)
VARIANT_PRESETS = {"lstm": "lstm_1m", "mlstm-paper": "mlstm_paper_1m", "mlstm-seed": "mlstm_seed_1m",
                   "mlstm-seed-gated": "mlstm_seed_gated_1m"}
DATASET_PRESETS = {"enwik8_head3M": "enwik8_sample", "text8_head2M": "text8_sample"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    report.add_argument("--posthoc", nargs="*", default=[], help="runs at rates the rule did not choose (a labelled "
                                                                 "check beside the final runs)")
    report.add_argument("--out", required=True, help="output directory")
    report.add_argument("--targets", action="append", default=[], metavar="DATASET=L1,L2,...",
                        help="the shared-rate study's target ladder for a dataset (extended to the tuned levels)")
    report.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    return parser.parse_args(argv)


def selection_json(selections: list[tuning.Selection]) -> list[dict]:
    return [{"dataset": s.dataset, "variant": s.variant, "chosen_lr": s.chosen, "at_edge": s.at_edge,
             "complete": s.complete,
             "score": s.chosen_score if s.chosen is not None else None, "seeds": s.seeds, "notes": s.notes,
             "rates": {f"{r.lr:g}": r.score if r.score != float("inf") else None for r in s.rates}}
            for s in selections]


def final_command(selection: tuning.Selection, sweep: str) -> str | None:
    if selection.chosen is None or selection.at_edge or not selection.complete:
        return None
    variant = VARIANT_PRESETS.get(selection.variant, selection.variant)
    dataset = DATASET_PRESETS.get(selection.dataset, selection.dataset)
    return (f'make sweep SWEEP={sweep} ARGS="dataset={dataset} +variant={variant} '
            f'optim.lr={selection.chosen:g}"')


def extension_command(selection: tuning.Selection, sweep: str) -> str | None:
    """The run(s) that extend a grid whose choice is at its edge: the next factor-2 rate, on the grid's seeds."""
    if selection.chosen is None or not selection.at_edge or not selection.complete:
        return None
    lowest = selection.chosen == selection.rates[0].lr
    rate = selection.chosen / 2 if lowest else selection.chosen * 2
    seeds = ",".join(str(s) for s in sorted({s for r in selection.rates for s in r.per_seed}, key=str))
    variant = VARIANT_PRESETS.get(selection.variant, selection.variant)
    dataset = DATASET_PRESETS.get(selection.dataset, selection.dataset)
    return f'make sweep SWEEP={sweep} ARGS="dataset={dataset} +variant={variant} optim.lr={rate:g} seed={seeds}"'


def plan_text(selections: list[tuning.Selection], tuning_sweep: str, final_sweep: str) -> str:
    """Grid extensions first (every cell's choice must be strictly inside its grid); once there are none, the final
    seeds of every cell whose grid is complete. A grid still running yields no command."""
    extensions = [c for s in selections if (c := extension_command(s, tuning_sweep))]
    if extensions:
        return "\n".join(extensions)
    return "\n".join(c for s in selections if (c := final_command(s, final_sweep)))


def select_text(selections: list[tuning.Selection], sweep: str) -> str:
    lines = []
    for dataset in sorted({s.dataset for s in selections}):
        chosen = [s for s in selections if s.dataset == dataset]
        lines += [f"## {dataset}", "", *tuning_report.grid_table(chosen), ""]
        for sel in chosen:
            for note in sel.notes:
                lines.append(f"- {sel.variant}: {note}")
            command = final_command(sel, sweep)
            if command:
                lines.append(f"- {sel.variant}: {command}")
        lines.append("")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "select":
        selections = tuning.select(load_runs(args.paths))
        publish(select_text(selections, args.final_sweep), None)
        if args.json:
            write_atomic(args.json, json.dumps(selection_json(selections), indent=2) + "\n")
        return
    if args.command == "plan":
        text = plan_text(tuning.select(load_runs(args.paths)), args.tuning_sweep, args.final_sweep)
        if text:
            publish(text, None)
        return
    targets = {}
    for spec in args.targets:
        name, _, levels = spec.rpartition("=")
        try:
            targets[name] = [float(v) for v in levels.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--targets {spec!r} is not DATASET=LEVEL,LEVEL,...") from None
    final = [p for p in args.final if Path(p).exists()]  # the final seeds may not have started yet
    posthoc = [p for p in args.posthoc if Path(p).exists()]
    tuning_report.write_tuned_study(load_runs(args.tuning), load_runs(final) if final else [],
                                    load_runs(args.shared) if args.shared else [], args.out, targets,
                                    n_resamples=args.bootstrap, posthoc=load_runs(posthoc) if posthoc else [])


if __name__ == "__main__":
    main()
