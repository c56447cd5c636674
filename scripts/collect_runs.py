"""Copy what a study's runs leave that belongs in git (metrics.jsonl, config.yaml; never checkpoints) into results/.

    python scripts/collect_runs.py multirun/convergence_cpu/enwik8 results/convergence/cpu_samples/runs/enwik8

Each run directory becomes `<dest>/<variant>-seed<k>/` (names from its config.yaml), so committed results read like
the sweep that made them. Plots and reports then run on the copies: `make plot RUNS=<dest root> OUT=...`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mlstm.studies.runs import variant_label

KEPT = ("metrics.jsonl", "config.yaml")


def run_name(config_path: Path) -> str:
    """`<variant label>-h<hidden>-seed<k>`: the label the plots use (mlstm.studies.runs.variant_label), so that two variants
    of a sweep never share a directory (e.g. lstm-h500-seed0 and lstm-loop-h500-seed0)."""
    cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    return f"{variant_label(cfg)}-h{cfg['cell']['hidden_size']}-seed{cfg['seed']}"


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: collect_runs.py SWEEP_DIR DEST_DIR")
    source, dest = Path(sys.argv[1]), Path(sys.argv[2])
    runs = sorted(p.parent for p in source.rglob("metrics.jsonl") if (p.parent / "config.yaml").exists())
    if not runs:
        sys.exit(f"error: no run directories (metrics.jsonl + config.yaml) under {source}")
    for run in runs:
        target = dest / run_name(run / "config.yaml")
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            shutil.copy2(run / name, target / name)
        print(f"{run} -> {target}")


if __name__ == "__main__":
    main()
