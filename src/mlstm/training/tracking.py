"""Where metrics go: `metrics.jsonl` always, Weights & Biases when enabled.

Plots and reports read `metrics.jsonl` (or W&B), never the trainer's memory. Every record carries `step` (optimizer
steps) and `chars` (training characters seen, all ranks together), so curves can be drawn per step or per character;
`time` (training seconds, evaluation excluded) gives the per-second axis.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

from mlstm.errors import UserError

METRICS_FILE = "metrics.jsonl"
REWOUND_FILE = "metrics.rewound.jsonl"  # records of a trajectory abandoned by a divergence reload
WANDB_ID_FILE = "wandb_run_id.txt"


class JsonlSink:
    """Append-only JSON lines, one object per record, flushed at once so a crash loses nothing written."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            # a fresh run in a directory that already has metrics: keep them, never overwrite a run (nor an .old)
            old, n = self.path.with_suffix(".jsonl.old"), 1
            while old.exists():
                old, n = self.path.with_suffix(f".jsonl.old{n}"), n + 1
            self.path.rename(old)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int, move_to: Path | None = None) -> None:
        """On resume, drop records logged after the checkpoint: they will be logged again, identically. A divergence
        reload (`rewind`) moves them to `move_to` instead: they are the abandoned trajectory."""
        kept, dropped = [], []
        for line in read_lines(self.path):
            (kept if json.loads(line)["step"] <= step else dropped).append(line)
        if move_to is not None and dropped:
            with open(move_to, "a", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in dropped))
                handle.flush()
                os.fsync(handle.fileno())
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def rewind(self, step: int) -> None:
        """A divergence reload went back to `step`: later records move to metrics.rewound.jsonl."""
        self._file.close()
        self._truncate_after(step, move_to=self.path.with_name(REWOUND_FILE))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_lines(path: Path) -> list[str]:
    """The complete lines of a JSON-lines file; a line cut by a crash is ignored."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        lines.append(line)
    return lines


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_lines(path)]


class WandbSink:
    """A W&B run (offline by default: real run files, no account or network). Failure never stops training."""

    def __init__(self, logger_cfg, run_dir: Path, config: dict, resume: bool):
        self.run = None
        self._warned = False
        mode = logger_cfg.get("mode", "offline")
        if mode not in ("offline", "online", "disabled"):
            raise UserError(f"logger.mode={mode!r} is not one of offline, online, disabled")
        id_file = Path(run_dir) / WANDB_ID_FILE
        try:
            import wandb

            # a resumed run continues the same W&B run (same id), so its curves stay one run
            run_id = id_file.read_text().strip() if (resume and id_file.exists()) else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            init = dict(
                project=logger_cfg.get("project", "mlstm"),
                entity=logger_cfg.get("entity") or None,
                group=logger_cfg.get("group") or None,
                name=logger_cfg.get("name") or None,
                tags=list(logger_cfg.get("tags") or []),
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow",
                settings=wandb.Settings(init_timeout=float(logger_cfg.get("init_timeout", 60)), silent=True),
            )
            try:
                self.run = wandb.init(mode=mode, **init)
            except Exception as error:  # noqa: BLE001 - no network, bad key, server down
                if mode != "online":
                    raise
                # the run still gets real W&B files: offline, same id, `wandb sync` uploads them later
                wandb.teardown()
                try:
                    self.run = wandb.init(mode="offline", **init)
                except Exception:  # noqa: BLE001 - a shared W&B service may still hold the id: take a new one
                    init["id"] = run_id = uuid.uuid4().hex[:8]
                    id_file.write_text(run_id + "\n")
                    self.run = wandb.init(mode="offline", **init)
                self._warn(
                    f"W&B online failed ({type(error).__name__}: {first_line(error)}); logging offline "
                    f"instead (upload later: wandb sync {Path(run_dir) / 'wandb'}/offline-run-*), and "
                    f"metrics.jsonl keeps every metric"
                )
            # both x-axes of the convergence question: optimizer steps and characters seen
            self.run.define_metric("chars")
            self.run.define_metric("*", step_metric="step")
        except Exception as error:  # noqa: BLE001 - tracking must never stop a run
            self._warn(
                f"W&B could not start ({type(error).__name__}: {first_line(error)}); metrics.jsonl keeps every metric"
            )
            self.run = None

    def _warn(self, message: str) -> None:
        if not self._warned:
            print(f"warning: {message}", file=sys.stderr)
            self._warned = True

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            # NaN is "not measured"; lists (the per-stream bpc of the cold-start check) stay in metrics.jsonl
            clean = {
                k: v
                for k, v in record.items()
                if not (isinstance(v, float) and math.isnan(v)) and not isinstance(v, (list, tuple))
            }
            self.run.log(clean, step=int(record["step"]))
        except Exception as error:  # noqa: BLE001
            self._warn(f"W&B logging failed ({first_line(error)}); metrics.jsonl keeps every metric")

    def summary(self, values: dict) -> None:
        if self.run is not None:
            try:
                self.run.summary.update(values)
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
                # finish() can return before W&B's writer process has flushed the history to the run file;
                # shutting the service down waits for it, so the run file is complete when training returns
                import wandb

                wandb.teardown()
            except Exception as error:  # noqa: BLE001
                self._warn(f"W&B could not finish ({first_line(error)})")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


class Sinks:
    """Fan-out to every sink; only rank 0 owns sinks under DDP."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def summary(self, values: dict) -> None:
        for sink in self.sinks:
            if hasattr(sink, "summary"):
                sink.summary(values)

    def rewind(self, step: int) -> None:
        """Back to `step` after a divergence reload (metrics.jsonl only: W&B cannot forget logged steps)."""
        for sink in self.sinks:
            if hasattr(sink, "rewind"):
                sink.rewind(step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
