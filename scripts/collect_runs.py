"""Copy what a study's runs leave that belongs in git (metrics.jsonl, config.yaml; never checkpoints) into results/.

    python scripts/collect_runs.py multirun/convergence_cpu/enwik8 results/convergence/cpu_samples/runs/enwik8

Each run directory becomes `<dest>/<variant>-seed<k>/` (names from its config.yaml), so committed results read like
the sweep that made them. Plots and reports then run on the copies: `make plot RUNS=<dest root> OUT=...`. The logic:
`mlstm.studies.collect_runs`.
"""

from __future__ import annotations

import sys

from mlstm.errors import UserError
from mlstm.studies.collect_runs import collect


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: collect_runs.py SWEEP_DIR DEST_DIR")
    try:
        copied = collect(sys.argv[1], sys.argv[2])
    except UserError as error:
        sys.exit(f"error: {error}")
    for run, target in copied:
        print(f"{run} -> {target}")


if __name__ == "__main__":
    main()
