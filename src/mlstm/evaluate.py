"""Stateful evaluation: bits per character of a whole split (or its first N characters).

The split is cut into B contiguous streams like the training data, read segment by segment with the state carried,
so every character is predicted with all the context of its stream before it. bpc = mean cross-entropy in nats / ln 2.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from mlstm.data import StreamBatcher

LN2 = math.log(2.0)


def autocast(device: torch.device, precision: str):
    """Matrix products in bf16/fp16 where asked; the cells keep their state and pointwise math in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cross_entropy_nats(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy in fp32 whatever the matmul precision. logits (T, B, V), targets (T, B)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate_bpc(
    model,
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    max_chars: int | None = None,
    precision: str = "fp32",
    split_name: str = "tokens",
) -> float:
    total_nats, total_chars = evaluate_nats(
        model,
        tokens,
        batch_size=batch_size,
        seq_len=seq_len,
        device=device,
        max_chars=max_chars,
        precision=precision,
        split_name=split_name,
    )
    return total_nats / total_chars / LN2


@torch.no_grad()
def evaluate_nats(
    model,
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    max_chars: int | None = None,
    precision: str = "fp32",
    split_name: str = "tokens",
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int]:
    """(summed nats, characters scored) over this rank's streams. Under DDP each rank scores B/W of the B streams
    (as in training); the sums of all ranks are exactly the single-process sums, so bpc does not depend on W."""
    if max_chars:
        tokens = tokens[: int(max_chars)]
    was_training = model.training
    model.eval()
    batches = StreamBatcher(
        tokens, batch_size, seq_len, rank=rank, world_size=world_size, device=device, split_name=split_name
    )
    state = model.init_state(batch_size // world_size, device)
    total_nats, total_chars = 0.0, 0
    for batch in batches:
        with autocast(device, precision):
            logits, state = model(batch.x, state)
        total_nats += cross_entropy_nats(logits, batch.y, reduction="sum").item()
        total_chars += batch.y.numel()
    model.train(was_training)
    return total_nats, total_chars


@torch.no_grad()
def bits_per_position(
    model,
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
) -> torch.Tensor:
    """(characters per stream, B) float64 bits of every predicted character, the split cut into B streams from zero
    states as in `evaluate_nats`: its mean is the split's bpc, and a column read in windows shows where along a
    stream its state goes wrong (scripts/eval_streams.py), and its column means are the per-stream bpc of the
    trainer's cold-start check."""
    was_training = model.training
    model.eval()
    state = model.init_state(batch_size, device)
    bits = []
    for batch in StreamBatcher(tokens, batch_size, seq_len, device=device):
        with autocast(device, precision):
            logits, state = model(batch.x, state)
        bits.append(cross_entropy_nats(logits, batch.y, reduction="none").view(batch.y.shape).double() / LN2)
    model.train(was_training)
    return torch.cat(bits)
