"""Validation and test passes of a run, on every rank under DDP (mlstm.evaluate holds the model-level functions)."""

from __future__ import annotations

import torch

from mlstm.evaluate import LN2, bits_per_position, evaluate_bpc, evaluate_nats
from mlstm.training import distributed


def evaluate(trainer, split: str) -> float:
    """bpc on the valid split (first `eval_chars`) or the test split (first `test_chars`; null = all).

    Collective under DDP, and every rank gets the same number: the evaluation streams are sharded across the
    ranks like the training streams when `eval_batch_size` is a multiple of the world size (the summed nats are
    the single-process ones), otherwise rank 0 evaluates alone while the others wait for its result."""
    tcfg = trainer.tcfg
    max_chars = tcfg.get("eval_chars") if split == "valid" else tcfg.get("test_chars")
    batch_size = int(tcfg.get("eval_batch_size") or tcfg.batch_size)
    kwargs = dict(
        split_name=split,
        batch_size=batch_size,
        seq_len=int(tcfg.seq_len),
        device=trainer.ctx.device,
        max_chars=max_chars,
        precision=trainer.precision,
    )
    if batch_size % trainer.ctx.world_size == 0:
        nats, chars = evaluate_nats(
            trainer.model,
            trainer.corpus.split(split),
            rank=trainer.ctx.rank,
            world_size=trainer.ctx.world_size,
            **kwargs,
        )
        totals = torch.tensor([nats, chars], dtype=torch.float64, device=trainer.ctx.device)
        nats, chars = distributed.all_reduce_sum(totals, trainer.ctx).tolist()
        return nats / chars / LN2
    bpc = evaluate_bpc(trainer.model, trainer.corpus.split(split), **kwargs) if trainer.ctx.is_main else None
    return distributed.broadcast_object(bpc, trainer.ctx)


def cold_starts(trainer, split: str, streams: int) -> dict:
    """The split (its first `test_chars` / `eval_chars`) cut into `streams` streams, each read from a zero state:
    their bpc, and each stream's. One stream from the split's start is one draw of where a model starts cold;
    this is `streams` draws, and a state that falls into a regime it never leaves shows as a stream far above
    the rest (mlstm.studies.tuning.blown_streams). Under DDP every rank computes it on its own copy of the (identical)
    parameters: no collective, so no rank waits on another at the end of a run."""
    limit = trainer.tcfg.get("eval_chars") if split == "valid" else trainer.tcfg.get("test_chars")
    tokens = trainer.corpus.split(split)
    tokens = tokens[: int(limit)] if limit else tokens
    bits = bits_per_position(
        trainer.model,
        tokens,
        batch_size=streams,
        seq_len=int(trainer.tcfg.seq_len),
        device=trainer.ctx.device,
        precision=trainer.precision,
    )
    return {
        f"{split}/cold_start_bpc": bits.mean().item(),
        f"{split}/cold_start_stream_bpc": [round(v, 4) for v in bits.mean(0).tolist()],
    }
