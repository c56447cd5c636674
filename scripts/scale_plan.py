"""The size ladder's next commands on one dataset: grids centred on the tuned 1.2M choices, extensions, fresh seeds.

    python scripts/scale_plan.py enwik8_sample --rung 300k=lstm,mlstm_paper,mlstm_seed_gated
    python scripts/scale_plan.py enwik8_sample --rung 5m=lstm,mlstm_paper

Prints one `make sweep ...` line per cell of each --rung: its grid, the rate that extends it, or its fresh seeds
(mlstm.studies.scale_plan says which, and why). scripts/scale_study.sh runs them until every choice is inside its grid.
"""

from __future__ import annotations

import argparse

from mlstm.cli import exit_on_user_error
from mlstm.studies import scale_plan


def parse_rung(text: str) -> tuple[str, list[str]]:
    rung, _, cells = text.partition("=")
    if not rung or not cells:
        raise argparse.ArgumentTypeError(f"expected RUNG=CELL,CELL (e.g. 5m=lstm,mlstm_paper), got {text!r}")
    return rung, [c for c in cells.split(",") if c]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="the dataset config the runs use, e.g. enwik8_sample")
    p.add_argument("--rung", type=parse_rung, action="append", required=True, metavar="RUNG=CELL,...")
    p.add_argument(
        "--tuned", default="results/convergence/tuned/runs", help="the 1.2M grids (their choices centre the new grids)"
    )
    p.add_argument("--runs", default="results/convergence/scale/runs", help="the ladder's grids")
    p.add_argument("--tuning-seeds", default="0,1")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    for command in scale_plan.next_commands(args.dataset, dict(args.rung), args.tuned, args.runs, args.tuning_seeds):
        print(command)


if __name__ == "__main__":
    main()
