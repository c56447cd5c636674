"""A run's checkpoint: what it holds, what it must agree on to be resumed, and the random state it carries.

`checkpoint_payload` is everything an exact resume needs (model, optimizer, scheduler, grad scaler, batcher position,
the hidden state of every stream, counters, RNG); `maybe_resume` / `restore` put it back into a Trainer. A resumed run
logs exactly the metrics of an uninterrupted one (tests/test_train.py kills one with SIGKILL to check).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mlstm.data.corpus import SPLITS
from mlstm.errors import UserError
from mlstm.training import checkpoint, distributed
from mlstm.training.checkpoint import has_checkpoint
from mlstm.training.score import diverged, run_score
from mlstm.training.tracking import METRICS_FILE, read_metrics

# keys of the config that must agree between a checkpoint and the run that resumes it: the architecture, the data
# layout (the carried hidden state and the batcher position only mean something for the same streams) and the
# optimizer (its state has that optimizer's shape)
ARCHITECTURE_KEYS = ("cell", "model")
RESUME_KEYS = (*ARCHITECTURE_KEYS, "dataset.name", "trainer.batch_size", "trainer.seq_len", "optim.name")


def check_compatible(payload: dict, cfg, corpus, run_dir) -> None:
    """A checkpoint resumes only under the config and data it was made with (RESUME_KEYS, the corpus)."""
    saved = OmegaConf.create(payload["config"])
    hint = "rerun with the checkpoint's values, or start a new run with another hydra.run.dir"
    for key in RESUME_KEYS:
        before, now = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        before, now = (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for v in (before, now))
        if before != now:
            detail = first_difference(key, before, now)
            raise UserError(f"cannot resume the checkpoint in {run_dir}: {detail}; {hint}")
    symbols = bytes(payload["symbols"].tolist()) if "symbols" in payload else None
    if payload["vocab_size"] != corpus.vocab_size or (symbols is not None and symbols != corpus.symbols):
        raise UserError(
            f"cannot resume the checkpoint in {run_dir}: it was trained on a vocabulary of "
            f"{payload['vocab_size']} symbols, this dataset has {corpus.vocab_size} (another "
            f"corpus); {hint}"
        )
    made_on = payload.get("corpus", {})  # name and split sizes of the corpus the checkpoint was trained on
    sizes = [len(corpus.split(s)) for s in SPLITS]
    if made_on and list(made_on.get("split_sizes", sizes)) != sizes:
        raise UserError(
            f"cannot resume the checkpoint in {run_dir}: it was trained on {made_on.get('name')} "
            f"with splits of {made_on['split_sizes']} characters, this dataset ({corpus.name}) "
            f"has {sizes}; {hint}"
        )


# what makes a finished run in a directory *this* run: the same model, data, optimizer, seed, budget and evaluation
FINISHED_KEYS = (
    "cell",
    "model",
    "dataset",
    "optim",
    "seed",
    "trainer.batch_size",
    "trainer.seq_len",
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.eval_chars",
    "trainer.eval_batch_size",
    "trainer.precision",
    "trainer.test_at_end",
)


def finished_result(run_dir: Path, cfg) -> dict | None:
    """The result of the run already finished in `run_dir` under this config, or None when there is none.

    Finished means metrics.jsonl records the last step's validation (and the test pass, when `test_at_end`), or the
    divergence that ended it (`on_divergence=end`). It is read from metrics.jsonl and config.yaml alone, so runs
    committed without their checkpoints are found too: a sweep run again skips what it (or an earlier session)
    finished. A finished run of another config there is a UserError, never overwritten, unless the directory holds
    a checkpoint: then resuming decides (`check_compatible`), as it always has. `trainer.resume=false` never
    skips."""
    metrics, config_path = Path(run_dir) / METRICS_FILE, Path(run_dir) / "config.yaml"
    if not (metrics.is_file() and config_path.is_file()):
        return None
    records = [r for r in read_metrics(metrics) if isinstance(r, dict) and "step" in r]
    max_steps = int(cfg.trainer.max_steps)
    end_step = next((r["step"] for r in records if r.get("event") == "early_stop"), max_steps)  # stopped by the rule
    last = [r for r in records if r["step"] == end_step]
    ended = diverged(records) or (
        any("valid/bpc" in r for r in last)
        and (not cfg.trainer.get("test_at_end", True) or any("test/bpc" in r for r in last))
    )
    if not ended:
        return None
    if cfg.trainer.get("resume", "auto") is False:
        return None  # "start over": the trainer refuses a directory that holds a run (its own one-line error)
    saved = OmegaConf.load(config_path)
    for key in FINISHED_KEYS:
        before, now = (OmegaConf.select(c, key, default="<absent>") for c in (saved, cfg))
        before, now = (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for v in (before, now))
        if before != now:
            if has_checkpoint(Path(run_dir)):
                return None  # the checkpoint's own compatibility check names the difference (or resumes)
            detail = first_difference(key, before, now).replace("in the checkpoint", "in the finished run")
            raise UserError(f"{run_dir} holds a finished run of another config ({detail}); use a new hydra.run.dir")
    valids = [float(r["valid/bpc"]) for r in records if isinstance(r.get("valid/bpc"), (int, float))]
    finite = [v for v in valids if np.isfinite(v)]
    result = {
        "step": max(r["step"] for r in records),
        "chars": max(r.get("chars", 0) for r in records),
        "train_seconds": max(float(r.get("time", 0.0)) for r in records),
        "num_parameters": saved.get("num_parameters"),
        "valid/bpc": valids[-1] if valids else float("nan"),
        "best_valid/bpc": min(finite) if finite else float("inf"),
        "run_dir": str(run_dir),
        "score": run_score(records, max_steps, best=cfg.trainer.get("early_stop_patience") is not None),
        "skipped": True,
    }
    if diverged(records):
        result["diverged"] = True
    tests = [r["test/bpc"] for r in records if "test/bpc" in r]
    if tests:
        result["test/bpc"] = tests[-1]
    return result


def finite_weights(payload: dict) -> bool:
    """Whether a checkpoint's model weights are all finite: what a divergence reload may go back to."""
    return all(bool(torch.isfinite(t).all()) for t in payload["model"].values() if t.is_floating_point())


def first_difference(key: str, before, now) -> str:
    """`cell.hidden_size is 64 in the checkpoint, 32 now` for the first key where two config values differ."""
    if isinstance(before, dict) and isinstance(now, dict):
        for sub in sorted(set(before) | set(now)):
            if before.get(sub, "<absent>") != now.get(sub, "<absent>"):
                return first_difference(f"{key}.{sub}", before.get(sub, "<absent>"), now.get(sub, "<absent>"))
    return f"{key} is {before!r} in the checkpoint, {now!r} now"


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed per (run seed, rank[, resume step]) for the per-rank RNG streams (dropout masks) under DDP."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------- a Trainer's state, saved and put back
def checkpoint_payload(trainer) -> dict:
    # the hidden state of every stream (all ranks), so a DDP checkpoint resumes in one process and vice versa
    state = [[distributed.gather_streams(t.detach(), trainer.ctx).cpu() for t in layer] for layer in trainer.state]
    payload = {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        # the to-convergence protocol (mlstm.training.plateau): its counters decide the next reduction and the stop
        "plateau": trainer.plateau.state_dict() if trainer.plateau is not None else None,
        "early_stop": trainer.early_stop.state_dict() if trainer.early_stop is not None else None,
        "scaler": trainer.scaler.state_dict(),
        "step": trainer.step,
        "chars": trainer.chars,
        "train_seconds": trainer.train_seconds,
        "best_valid": trainer.best_valid,
        "window": dict(trainer.window),
        "nonfinite_total": trainer.nonfinite_total,
        "nonfinite_in_row": trainer.nonfinite_in_row,
        "divergence_reloads": trainer.divergence_reloads,
        "lr_scale": trainer.lr_scale,
        "corpus": {"name": trainer.corpus.name, "split_sizes": [len(trainer.corpus.split(s)) for s in SPLITS]},
        "batcher": trainer.batches.state_dict(),
        "hidden_state": state,
        "rng": rng_state(),  # rank 0's: what a single process resumes with
        "rng_per_rank": distributed.gather_objects(rng_state(), trainer.ctx),  # exact resume at the same world size
        "vocab_size": trainer.corpus.vocab_size,
        "symbols": torch.tensor(list(trainer.corpus.symbols), dtype=torch.uint8),
        "num_parameters": trainer.num_params,
        "config": OmegaConf.to_yaml(trainer.cfg, resolve=True),
    }
    return payload


def maybe_resume(trainer) -> bool:
    mode = trainer.tcfg.get("resume", "auto")
    if mode not in (True, False, "auto"):
        raise UserError(f"trainer.resume={mode!r} must be true, false or auto")
    if mode is False:
        if checkpoint.has_checkpoint(trainer.run_dir):
            # a fresh run here would rotate away, and mix with, the checkpoints of the run already there
            raise UserError(
                f"trainer.resume=false but {trainer.run_dir} already holds checkpoints of a run; use a new "
                f"hydra.run.dir, or trainer.resume=auto to continue that run"
            )
        return False
    payload = checkpoint.load_latest(trainer.run_dir, set_aside=trainer.ctx.is_main)
    # every rank reads the checkpoint itself: they must all see the same one (a run dir on a shared file system)
    found = distributed.gather_objects(None if payload is None else int(payload["step"]), trainer.ctx)
    if len(set(found)) > 1:
        raise UserError(
            f"the ranks see different checkpoints in {trainer.run_dir} (steps by rank: {found}); "
            f"under multi-node DDP hydra.run.dir must be on a file system shared by all nodes"
        )
    if payload is None:
        if mode is True:
            raise UserError(f"trainer.resume=true but {trainer.run_dir} holds no checkpoint (last.pt)")
        return False
    restore(trainer, payload)
    if trainer.ctx.is_main:
        print(f"resumed from step {trainer.step} in {trainer.run_dir}", file=sys.stderr)
    return True


def restore(trainer, payload: dict) -> None:
    check_compatible(payload, trainer.cfg, trainer.corpus, trainer.run_dir)
    trainer.model.load_state_dict(payload["model"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    trainer.scheduler.load_state_dict(payload["scheduler"])
    for key in ("plateau", "early_stop"):
        if getattr(trainer, key) is not None and payload.get(key) is not None:
            getattr(trainer, key).load_state_dict(payload[key])
    trainer.scaler.load_state_dict(payload["scaler"])
    trainer.batches.load_state_dict(payload["batcher"])
    lo = trainer.ctx.rank * trainer.local_batch
    trainer.state = [
        tuple(t[lo : lo + trainer.local_batch].to(trainer.ctx.device) for t in layer)
        for layer in payload["hidden_state"]
    ]
    for key in ("step", "chars", "train_seconds", "best_valid", "nonfinite_total"):
        setattr(trainer, key, payload[key])
    trainer.nonfinite_in_row = int(payload.get("nonfinite_in_row", 0))
    trainer.divergence_reloads = int(payload.get("divergence_reloads", 0))
    trainer.lr_scale = float(payload.get("lr_scale", 1.0))
    trainer.window = dict(payload["window"])
    per_rank = payload.get("rng_per_rank") or [payload["rng"]]
    if len(per_rank) == trainer.ctx.world_size:
        set_rng_state(per_rank[trainer.ctx.rank])
    elif trainer.ctx.is_main:  # another world size: rank 0 continues rank 0's stream, the others start fresh ones
        set_rng_state(payload["rng"])
    else:
        torch.manual_seed(rank_seed(int(trainer.cfg.seed), trainer.ctx.rank, trainer.step))
