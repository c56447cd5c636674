"""What `scripts/tune.py` does: the selection rule applied to a grid of runs (`select`), the commands the study needs
next (`plan`), and the tuned study's report (`report`). The rule is `mlstm.studies.tuning`, the report
`mlstm.studies.tuning_report`; this module turns their results into the text and commands a person runs."""

from __future__ import annotations

import json
from pathlib import Path

from mlstm.atomic import write_atomic
from mlstm.errors import UserError
from mlstm.studies import tuning, tuning_report
from mlstm.studies.runs import load_runs

# the sweep configs' names for the variants the runs' labels come from (configs/variant/*_1m.yaml)
VARIANT_PRESETS = {
    "lstm": "lstm_1m",
    "mlstm-paper": "mlstm_paper_1m",
    "mlstm-seed": "mlstm_seed_1m",
    "mlstm-seed-gated": "mlstm_seed_gated_1m",
}
DATASET_PRESETS = {"enwik8_head3M": "enwik8_sample", "text8_head2M": "text8_sample"}


def selection_json(selections: list[tuning.Selection]) -> list[dict]:
    return [
        {
            "dataset": s.dataset,
            "variant": s.variant,
            "chosen_lr": s.chosen,
            "at_edge": s.at_edge,
            "complete": s.complete,
            "score": s.chosen_score if s.chosen is not None else None,
            "seeds": s.seeds,
            "notes": s.notes,
            "rates": {f"{r.lr:g}": r.score if r.score != float("inf") else None for r in s.rates},
        }
        for s in selections
    ]


def final_command(selection: tuning.Selection, sweep: str) -> str | None:
    if selection.chosen is None or selection.at_edge or not selection.complete:
        return None
    variant = VARIANT_PRESETS.get(selection.variant, selection.variant)
    dataset = DATASET_PRESETS.get(selection.dataset, selection.dataset)
    return f'make sweep SWEEP={sweep} ARGS="dataset={dataset} +variant={variant} optim.lr={selection.chosen:g}"'


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


def _print(text: str) -> None:
    print(text, end="" if text.endswith("\n") else "\n")


def parse_targets(specs: list[str]) -> dict[str, list[float]]:
    """`--targets DATASET=L1,L2,...` (repeatable) -> {dataset: levels}."""
    targets = {}
    for spec in specs:
        name, _, levels = spec.rpartition("=")
        try:
            targets[name] = [float(v) for v in levels.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--targets {spec!r} is not DATASET=LEVEL,LEVEL,...") from None
    return targets


def run(args) -> None:
    """One command of scripts/tune.py, from its parsed arguments (`args.command`: select, plan or report)."""
    if args.command == "select":
        selections = tuning.select(load_runs(args.paths))
        _print(select_text(selections, args.final_sweep))
        if args.json:
            write_atomic(args.json, json.dumps(selection_json(selections), indent=2) + "\n")
        return
    if args.command == "plan":
        text = plan_text(tuning.select(load_runs(args.paths)), args.tuning_sweep, args.final_sweep)
        if text:
            _print(text)
        return
    targets = parse_targets(args.targets)
    final = [p for p in args.final if Path(p).exists()]  # the final seeds may not have started yet
    posthoc = [p for p in args.posthoc if Path(p).exists()]
    tuning_report.write_tuned_study(
        load_runs(args.tuning),
        load_runs(final) if final else [],
        load_runs(args.shared) if args.shared else [],
        args.out,
        targets,
        n_resamples=args.bootstrap,
        posthoc=load_runs(posthoc) if posthoc else [],
    )
