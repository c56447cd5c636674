"""Copy what a study's runs leave that belongs in git (metrics.jsonl, config.yaml; never checkpoints) into results/.

The logic of `scripts/collect_runs.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

from mlstm.errors import UserError
from mlstm.studies.runs import variant_label

KEPT = ("metrics.jsonl", "config.yaml")


def run_name(config_path: Path) -> str:
    """`<variant label>-h<hidden>-seed<k>`: the label the plots use (mlstm.studies.runs.variant_label), so that two
    variants of a sweep never share a directory (e.g. lstm-h500-seed0 and lstm-loop-h500-seed0)."""
    cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    return f"{variant_label(cfg)}-h{cfg['cell']['hidden_size']}-seed{cfg['seed']}"


def collect(source: str | Path, dest: str | Path) -> list[tuple[Path, Path]]:
    """Copy every run under `source` to `dest/<run name>/`; (run, copy) pairs in order. A UserError when `source`
    holds no run directory."""
    source, dest = Path(source), Path(dest)
    runs = sorted(p.parent for p in source.rglob("metrics.jsonl") if (p.parent / "config.yaml").exists())
    if not runs:
        raise UserError(f"no run directories (metrics.jsonl + config.yaml) under {source}")
    copied = []
    for run in runs:
        target = dest / run_name(run / "config.yaml")
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            shutil.copy2(run / name, target / name)
        copied.append((run, target))
    return copied
