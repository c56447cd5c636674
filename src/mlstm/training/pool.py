"""Many training runs in a few long-lived worker processes, the trainer in-process (no interpreter start per run).

Used by `scripts/gpu_study.py` to fill one GPU with small runs: `Pool(n)` spawns n workers, `submit` queues a run
(its Hydra overrides and run directory), `poll` returns what started, finished or died (a dead worker is replaced),
and `kill` stops them all at a deadline. Runs that differ only in learning rate and seed share one composed config
per worker (`compose`), because Hydra's composition costs about as much CPU as a whole tiny training run.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import queue
import time
import traceback
from pathlib import Path

VARYING = ("optim.lr=", "seed=")  # what differs between the runs of one grid
_COMPOSED: dict = {}


def compose(overrides: list[str]):
    """`load_config(overrides)`, composed once per worker for all runs that differ only in rate and seed (Hydra's
    composition costs about as much CPU as a whole dry-run training): the cached config with those values set."""
    import copy

    from omegaconf import OmegaConf

    from mlstm.config import load_config

    fixed = tuple(o for o in overrides if not o.startswith(VARYING))
    if fixed not in _COMPOSED:
        _COMPOSED[fixed] = load_config(list(fixed))
    cfg = copy.deepcopy(_COMPOSED[fixed])
    for override in overrides:
        if override.startswith(VARYING):
            key, value = override.split("=", 1)
            OmegaConf.update(cfg, key, float(value) if key == "optim.lr" else int(value), merge=False)
    return cfg


def run_job(job: dict) -> dict:
    """In a worker: train one run (the trainer's own `train`), its output in <run dir>/train.log; never raises.
    A finished run's checkpoints are deleted unless the job keeps them: its metrics.jsonl and config.yaml remain."""
    import gc

    started = time.monotonic()
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    out = {"key": job["key"], "status": "done", "error": None, "score": None}
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            from mlstm.training.trainer import train

            result = train(compose(job["overrides"]), run_dir)
            score = result.get("score")
            out["score"] = score if isinstance(score, (int, float)) and math.isfinite(score) else None
            out["diverged"] = bool(result.get("diverged"))
        except BaseException as error:  # noqa: BLE001 - one bad run must not stop the study
            traceback.print_exc()
            out["status"], out["error"] = "failed", f"{type(error).__name__}: {error}".splitlines()[0][:300]
    if out["status"] == "done" and not job["keep_checkpoints"]:
        for checkpoint in run_dir.glob("*.pt"):
            checkpoint.unlink(missing_ok=True)  # finished: metrics.jsonl and config.yaml say all that is kept
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["seconds"] = time.monotonic() - started
    return out


def worker(wid: int, tasks, results) -> None:
    while True:
        job = tasks.get()
        if job is None:
            return
        results.put(("start", wid, job["key"]))
        results.put(("done", wid, run_job(job)))


class Pool:
    """`n` spawned worker processes fed one job at a time (so the order of the queue is the order of the runs),
    replaced when one dies, killed at the deadline."""

    def __init__(self, n: int):
        self.ctx = mp.get_context("spawn")
        self.tasks, self.results = self.ctx.Queue(), self.ctx.Queue()
        self.workers: dict[int, mp.Process] = {}
        self.running: dict[int, str | None] = {}
        self.next_id = 0
        for _ in range(n):
            self._spawn()

    def _spawn(self) -> None:
        wid, self.next_id = self.next_id, self.next_id + 1
        process = self.ctx.Process(target=worker, args=(wid, self.tasks, self.results), daemon=True)
        process.start()
        self.workers[wid], self.running[wid] = process, None

    def submit(self, key: str, overrides: list[str], run_dir: str | Path, keep_checkpoints: bool = False) -> None:
        """Queue one run: `key` names it in the messages, `overrides` compose its config, it trains in `run_dir`."""
        self.tasks.put(
            {"key": key, "overrides": list(overrides), "run_dir": str(run_dir), "keep_checkpoints": keep_checkpoints}
        )

    def poll(self, timeout: float) -> list[tuple]:
        """Messages that arrived (("start", wid, key), ("done", wid, result)), plus ("died", wid, key) for a worker
        that died while running a job (it is replaced)."""
        messages = []
        try:
            messages.append(self.results.get(timeout=timeout))
            while True:
                messages.append(self.results.get_nowait())
        except queue.Empty:
            pass
        for kind, wid, payload in messages:
            if kind == "start":
                self.running[wid] = payload
            elif kind == "done":
                self.running[wid] = None
        for wid, process in list(self.workers.items()):
            if not process.is_alive():
                key = self.running.pop(wid)
                del self.workers[wid]
                if key is not None:
                    messages.append(("died", wid, key))
                self._spawn()
        return messages

    def kill(self) -> list[str]:
        """Kill every worker (at the deadline, or once every job is done); the keys of the jobs they were running."""
        running = [key for key in self.running.values() if key]
        for process in self.workers.values():
            process.kill()
        for process in self.workers.values():
            process.join(timeout=10)
        self.workers.clear()
        for q in (self.tasks, self.results):
            q.cancel_join_thread()
            q.close()
        return running
