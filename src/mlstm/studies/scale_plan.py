"""What the size ladder on CPU runs next (scripts/scale_study.sh): each cell's grid per rung, its extensions, its
fresh seeds.

A cell's grid at a new rung starts from its choice r at the tuned study's 1.2M rung (results/convergence/tuned):
{r, 2r, 4r} at 0.3M and {r/4, r/2, r} at 4.8M, one factor-2 step past r on the side where the best rate should lie
(it falls as a model grows). Then the rule of mlstm.studies.tuning, per cell and rung
(mlstm.studies.scaling.select_by_rung), decides:

    no runs yet              the initial grid on the tuning seeds
    runs not all finished    the same grid again (its finished runs are skipped, the rest run)
    choice at the grid's edge the next factor-2 rate outward, on the tuning seeds
    choice strictly inside   the fresh seeds at the chosen rate (scale_final_cpu)

A plan only names `make sweep` commands, and every command skips the runs that are already finished, so running a
plan twice costs nothing and a stopped study continues where it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlstm.errors import UserError
from mlstm.studies import scaling, tuning
from mlstm.studies.runs import load_runs

# factor-2 steps from the 1.2M choice that make each new rung's first grid
GRID_STEPS = {"300k": (0, 1, 2), "5m": (-2, -1, 0)}
TUNING_SWEEP, FINAL_SWEEP = "scale_tune_cpu", "scale_final_cpu"


def label_of(cell: str) -> str:
    """The preset's cell name as the runs label it: mlstm_seed_gated -> mlstm-seed-gated."""
    return cell.replace("_", "-")


def rate_text(lr: float) -> str:
    """A rate as Hydra gets it and the run directory names it (lr0.002): 4e-3 / 2 gives 0.002, never
    0.0020000000000000005."""
    return f"{float(f'{lr:.6g}'):g}"


def initial_grid(centre: float, rung: str) -> list[float]:
    if rung not in GRID_STEPS:
        raise UserError(f"no grid is defined for rung {rung!r} (known: {', '.join(GRID_STEPS)})")
    return [float(rate_text(centre * 2.0**k)) for k in GRID_STEPS[rung]]


@dataclass(frozen=True)
class Step:
    """One `make sweep` command of the plan."""

    kind: str  # "grid", "extend" or "final"
    dataset: str  # the dataset config, e.g. enwik8_sample
    preset: str  # e.g. mlstm_paper_5m
    rates: tuple[float, ...]
    seeds: tuple[int, ...] | None  # None: the sweep config's own seeds (the fresh seeds of scale_final_cpu)

    def command(self) -> str:
        sweep = FINAL_SWEEP if self.kind == "final" else TUNING_SWEEP
        args = [
            f"dataset={self.dataset}",
            f"+variant={self.preset}",
            "optim.lr=" + ",".join(rate_text(r) for r in self.rates),
        ]
        if self.seeds is not None:
            args.append("seed=" + ",".join(str(s) for s in self.seeds))
        return f'make sweep SWEEP={sweep} ARGS="{" ".join(args)}"'


def centres_from(selections: Iterable[tuning.Selection], dataset_label: str) -> dict[str, float]:
    """{cell label: chosen rate} of the tuned 1.2M study on one dataset, for the choices strictly inside their grid."""
    return {
        s.variant: s.chosen
        for s in selections
        if s.dataset == dataset_label and s.chosen is not None and not s.at_edge and s.complete
    }


def plan(
    dataset: str,
    dataset_label: str,
    cells_by_rung: Mapping[str, Sequence[str]],
    centres: Mapping[str, float],
    selections: Iterable[scaling.RungSelection],
    tuning_seeds: Sequence[int] = (0, 1),
) -> list[Step]:
    """The next step of every (rung, cell), rungs and cells in the order given (see the module's table)."""
    ruled = {(s.rung, s.variant): s for s in selections if s.dataset == dataset_label}
    steps = []
    for rung, cells in cells_by_rung.items():
        for cell in cells:
            label, preset = label_of(cell), f"{cell}_{rung}"
            found = ruled.get((rung, label))
            if found is None:
                if label not in centres:
                    raise UserError(
                        f"{label} has no tuned 1.2M choice on {dataset_label} to centre its {rung} grid "
                        f"on: finish its grid in results/convergence/tuned first"
                    )
                steps.append(
                    Step("grid", dataset, preset, tuple(initial_grid(centres[label], rung)), tuple(tuning_seeds))
                )
            elif not found.selection.complete:
                steps.append(
                    Step("grid", dataset, preset, tuple(r.lr for r in found.selection.rates), tuple(tuning_seeds))
                )
            elif found.next_lr is not None:
                steps.append(Step("extend", dataset, preset, (found.next_lr,), tuple(tuning_seeds)))
            else:
                steps.append(Step("final", dataset, preset, (found.selection.chosen,), None))
    return steps


def next_commands(
    dataset: str,
    cells_by_rung: Mapping[str, Sequence[str]],
    tuned: str | Path,
    runs: str | Path,
    tuning_seeds: str = "0,1",
) -> list[str]:
    """What scripts/scale_plan.py prints: the next `make sweep` line per cell of each rung, the grids centred on the
    tuned 1.2M choices under `tuned/<dataset>` and ruled by the ladder's runs under `runs/<dataset>`."""
    tuned_runs = load_runs([str(Path(tuned) / dataset)])
    labels = {run.dataset for run in tuned_runs}
    if len(labels) != 1:
        raise UserError(f"{tuned}/{dataset} holds runs of {len(labels)} datasets ({', '.join(labels)})")
    (label,) = labels
    centres = centres_from(tuning.select(tuned_runs), label)
    grids = Path(runs) / dataset
    selections = scaling.select_by_rung(load_runs([str(grids)])) if grids.is_dir() else []
    try:
        seeds = [int(s) for s in tuning_seeds.split(",")]
    except ValueError:
        raise UserError(f"--tuning-seeds must be integers, got {tuning_seeds!r}") from None
    return [step.command() for step in plan(dataset, label, dict(cells_by_rung), centres, selections, seeds)]
