"""What a run shows of its progress: the progress bar, and the throughput logged with the training metrics."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from mlstm.training import distributed


class PlainLines:
    """tqdm's output in a log file: each refresh its own line, with no carriage return and no padding."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, initial: int, enabled: bool, stream=None) -> tqdm:
    """tqdm's bar on a terminal. Elsewhere (stderr a file or a pipe) a plain line at most once a minute instead of a
    stream of carriage-return redraws, through tqdm's own `mininterval` and `file` options."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train", file=stream)
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="train",
        file=PlainLines(stream),
        mininterval=60,
        maxinterval=600,
        bar_format="{desc}: {n}/{total} steps [{elapsed}<{remaining}] {postfix}",
    )


def throughput(ctx, window_seconds: float, window_chars: int) -> dict:
    """chars/s of every rank (its own B/W streams over its own time) and in total (all characters over the
    slowest rank's time), and peak GPU memory per rank. Collective under DDP: every rank calls it."""
    memory = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None
    seconds, memories = zip(*distributed.gather_objects((max(window_seconds, 1e-9), memory), ctx))
    per_rank = [window_chars / ctx.world_size / s for s in seconds]
    perf = {"perf/chars_per_s": window_chars / max(seconds), "perf/chars_per_s_per_rank": sum(per_rank) / len(per_rank)}
    if memory is not None:
        perf["perf/gpu_mem_gb"] = max(memories)  # peak allocated, the largest over the ranks
    if ctx.distributed:
        perf.update({f"perf/chars_per_s/rank{r}": rate for r, rate in enumerate(per_rank)})
        if memory is not None:
            perf.update({f"perf/gpu_mem_gb/rank{r}": m for r, m in enumerate(memories)})
    return perf
