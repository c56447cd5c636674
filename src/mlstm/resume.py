"""What a checkpoint must agree on to be resumed, and the random state a run carries across a restart.

The trainer (`mlstm.trainer`) writes and restores the rest of a checkpoint: model, optimizer, scheduler, grad scaler,
batcher position, the hidden state of every stream, counters. A resumed run logs exactly the metrics of an
uninterrupted one (tests/test_train.py kills one with SIGKILL to check).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from omegaconf import OmegaConf

from mlstm.data.corpus import SPLITS
from mlstm.errors import UserError

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
        before, now = (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for v in (before, now))
        if before != now:
            detail = first_difference(key, before, now)
            raise UserError(f"cannot resume the checkpoint in {run_dir}: {detail}; {hint}")
    symbols = bytes(payload["symbols"].tolist()) if "symbols" in payload else None
    if payload["vocab_size"] != corpus.vocab_size or (symbols is not None and symbols != corpus.symbols):
        raise UserError(f"cannot resume the checkpoint in {run_dir}: it was trained on a vocabulary of "
                        f"{payload['vocab_size']} symbols, this dataset has {corpus.vocab_size} (another "
                        f"corpus); {hint}")
    made_on = payload.get("corpus", {})  # name and split sizes of the corpus the checkpoint was trained on
    sizes = [len(corpus.split(s)) for s in SPLITS]
    if made_on and list(made_on.get("split_sizes", sizes)) != sizes:
        raise UserError(f"cannot resume the checkpoint in {run_dir}: it was trained on {made_on.get('name')} "
                        f"with splits of {made_on['split_sizes']} characters, this dataset ({corpus.name}) "
                        f"has {sizes}; {hint}")


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
