"""Finding and reading training runs for the convergence analysis.

A run directory is any directory holding `metrics.jsonl` (written by `mlstm.training.trainer`, see
`mlstm.training.tracking`) and, beside it, `config.yaml` (the resolved Hydra config). The config says what the run *is*
(variant, dataset, seed, batch shape); the metrics say how it went (`step`, `chars`, `time` on every record; `train/bpc`
on training records, `valid/bpc` on validation records, `test/bpc` on the last). Runs can also be read from W&B
(`load_wandb_runs`), the one part of this module that needs the network.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from mlstm.errors import UserError
from mlstm.studies.convergence import Curve
from mlstm.studies.formatting import finite
from mlstm.training.tracking import METRICS_FILE, read_metrics

CONFIG_FILE = "config.yaml"
# metrics.jsonl column behind each x-axis of the analysis
AXIS_KEYS = {"steps": "step", "chars": "chars", "seconds": "time"}
# the implementations that count as "the" cell: same mathematics, so they share one label
DEFAULT_IMPLS = {"lstm": ("cudnn", None), "mlstm": ("fast", "reference", None)}


@dataclass
class Run:
    """One training run: where it came from, what it was (from its config) and its metric records."""

    source: str  # run directory, or "wandb:<entity/project/id>"
    config: dict
    records: list[dict] = field(repr=False)
    label: str = ""  # the variant, e.g. "mlstm-paper"; set by `variant_label`

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def dataset(self) -> str:
        return dataset_label(self.config)

    @property
    def num_parameters(self) -> int | None:
        """Parameter count if the config or any record logged it (the trainer's final summary does)."""
        if self.config.get("num_parameters"):
            return int(self.config["num_parameters"])
        for record in reversed(self.records):
            if record.get("num_parameters"):
                return int(record["num_parameters"])
        return None

    @property
    def hidden_size(self) -> int | None:
        return lookup(self.config, "cell.hidden_size")

    def last(self, key: str) -> float:
        """The largest value of `key` over the records (steps, chars, time only grow)."""
        values = [r[key] for r in self.records if isinstance(r.get(key), (int, float))]
        return float(max(values)) if values else math.nan

    def final(self, metric: str) -> float:
        """The metric's last logged finite value (e.g. "valid/bpc", "test/bpc")."""
        for record in reversed(self.records):
            value = record.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value)
        return math.nan

    def curve(self, metric: str) -> Curve:
        """The records that carry a finite `metric`, in step order, as a curve against steps, chars and seconds."""
        rows = sorted(
            (r for r in self.records if finite(r.get(metric)) and all(finite(r.get(k)) for k in AXIS_KEYS.values())),
            key=lambda r: r["step"],
        )
        x = {axis: np.array([r[key] for r in rows], dtype=float) for axis, key in AXIS_KEYS.items()}
        return Curve(x, np.array([r[metric] for r in rows], dtype=float))


def lookup(config: Mapping, dotted: str, default: Any = None) -> Any:
    """config["a"]["b"] for "a.b"; `default` when any level is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------------------- labels
def variant_label(config: Mapping, label_key: str | None = None) -> str:
    """The variant a run belongs to: "lstm", "lstm-loop", "mlstm-paper", "mlstm-seed", "mlstm-matlab", with
    "-gated" for cell.seed_output=gated and "-init<s>" when cell.init_scale is not 1 (e.g. "mlstm-seed-init2").

    The implementation joins the label only when it changes what is measured: the LSTM's loop implementation is a
    different speed (and code path) from cuDNN, while the mLSTM's fast and reference implementations compute the
    same function. `label_key` ("cell.hidden_size" or "cell.name,cell.hidden_size") replaces the rule with the
    values of those config keys joined by "-".
    """
    if label_key:
        return "-".join(str(lookup(config, key.strip(), "?")) for key in label_key.split(","))
    name = str(lookup(config, "cell.name", "unknown"))
    parts = [name]
    if lookup(config, "cell.form") is not None:
        parts.append(str(lookup(config, "cell.form")))
    impl = lookup(config, "cell.impl")
    if impl not in DEFAULT_IMPLS.get(name, (None,)):
        parts.append(str(impl))
    if lookup(config, "cell.seed_output") == "gated":  # not the posted seed cell: its output gated as in the paper
        parts.append("gated")
    scale = lookup(config, "cell.init_scale")
    if scale is not None and float(scale) != 1.0:  # another initial scale is another starting point
        parts.append(f"init{float(scale):g}")
    return "-".join(parts)


def dataset_label(config: Mapping) -> str:
    """ "enwik8", "text8", the file stem for dataset=file, the Hugging Face name for dataset=hf."""
    name = str(lookup(config, "dataset.name", "unknown"))
    if name == "file" and lookup(config, "dataset.path"):
        return Path(str(lookup(config, "dataset.path"))).stem
    if name == "hf" and lookup(config, "dataset.hf_name"):
        return str(lookup(config, "dataset.hf_name")).replace("/", "_")
    return name


# -------------------------------------------------------------------------------------------------- run directories
def expand_paths(paths: Iterable[str]) -> list[Path]:
    """The given paths with shell-style globs expanded; a path that does not exist is a UserError."""
    found = []
    for text in paths:
        if os.path.exists(text):
            found.append(Path(text))
            continue
        matches = sorted(glob.glob(text, recursive=True)) if glob.has_magic(text) else []
        if not matches:
            raise UserError(f"{text} does not exist")
        found.extend(Path(m) for m in matches)
    return found


def find_run_dirs(paths: Iterable[str]) -> list[Path]:
    """Every directory under the given paths (sweep dirs, run dirs, globs) that holds a metrics.jsonl."""
    run_dirs = set()
    for root in expand_paths(paths):
        if root.is_file():
            root = root.parent if root.name == METRICS_FILE else root
        if (root / METRICS_FILE).is_file():
            run_dirs.add(root.resolve())
        for directory, _, files in os.walk(root):
            if METRICS_FILE in files:
                run_dirs.add(Path(directory).resolve())
    return sorted(run_dirs)


def load_run_dir(run_dir: Path, label_key: str | None = None) -> Run | None:
    """The run in `run_dir`, or None (with a warning) when it has no config.yaml or no complete record."""
    config_path = Path(run_dir) / CONFIG_FILE
    if not config_path.is_file():
        warn(f"skipping {run_dir}: no {CONFIG_FILE} beside {METRICS_FILE}")
        return None
    records = [r for r in read_metrics(Path(run_dir) / METRICS_FILE) if isinstance(r, dict) and "step" in r]
    if not records:
        warn(f"skipping {run_dir}: {METRICS_FILE} has no complete record")
        return None
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    run = Run(str(run_dir), config, records)
    run.label = variant_label(config, label_key)
    return run


def load_runs(paths: Iterable[str], label_key: str | None = None) -> list[Run]:
    """Every readable run under `paths`; a UserError when there is none."""
    paths = list(paths)
    runs = [run for d in find_run_dirs(paths) if (run := load_run_dir(d, label_key)) is not None]
    if not runs:
        raise UserError(
            f"no runs found under {' '.join(paths)} (a run directory holds {METRICS_FILE} and {CONFIG_FILE})"
        )
    return runs


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------- grouping
def group_runs(runs: Iterable[Run]) -> dict[str, dict[str, list[Run]]]:
    """{dataset: {variant: [runs]}}, datasets and variants in sorted order."""
    groups: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        groups.setdefault(run.dataset, {}).setdefault(run.label, []).append(run)
    return {d: dict(sorted(v.items())) for d, v in sorted(groups.items())}


def seed_keys(runs: list[Run]) -> list:
    """A key per run for pairing across variants: its seed when known and unique within the variant, else its source.

    A source never equals a seed, so runs without a usable seed are never paired with another variant.
    """
    seeds = [run.seed for run in runs]
    return [s if s is not None and seeds.count(s) == 1 else run.source for s, run in zip(seeds, runs)]


def curves_by_seed(runs: list[Run], metric: str) -> dict:
    """{seed key: curve of `metric`} for the runs of one variant."""
    return {key: run.curve(metric) for key, run in zip(seed_keys(runs), runs)}


# ------------------------------------------------------------------------------------------------ W&B (network only)
def load_wandb_runs(spec: str, label_key: str | None = None) -> list[Run]:
    """Runs of a W&B project via `wandb.Api()`: "PROJECT", "PROJECT/GROUP" or "ENTITY/PROJECT/GROUP".

    The history of each run is read in full (`scan_history`) so the records match metrics.jsonl; the logged config
    (the resolved Hydra config plus `num_parameters`) plays the part of config.yaml. Needs the network and a login,
    so it is kept apart from everything above and is not exercised by the tests.
    """
    import wandb

    parts = spec.strip("/").split("/")
    if len(parts) == 3:
        project, group = "/".join(parts[:2]), parts[2]
    elif len(parts) == 2 and parts[1]:
        project, group = parts[0], parts[1]  # PROJECT/GROUP, the form the CLI documents
    else:
        project, group = parts[0], None
    try:
        api_runs = wandb.Api().runs(project, filters={"group": group} if group else None)
        runs = []
        for api_run in api_runs:
            records = [dict(row) for row in api_run.scan_history() if row.get("step") is not None]
            if records:
                run = Run(f"wandb:{'/'.join(api_run.path)}", dict(api_run.config), records)
                run.label = variant_label(run.config, label_key)
                runs.append(run)
    except Exception as error:  # noqa: BLE001 - network, auth, unknown project: one line for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not read W&B project {spec}: {reason}") from None
    if not runs:
        raise UserError(f"no runs with metrics found in W&B project {spec}")
    return runs
