"""Truncated-BPTT batching for a stateful character model.

A recurrent model trained with truncated backpropagation through time carries its hidden state from one segment to
the next, so segment k+1 of every batch row must continue the text of segment k in that row. Random windows would
break that (the carried state would describe unrelated text); hence contiguous streams, as in PyTorch's
word_language_model `batchify`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mlstm.errors import UserError


@dataclass
class Batch:
    """One segment of every stream."""

    x: torch.Tensor  # (T, B) int64 input token ids, time-major
    y: torch.Tensor  # (T, B) int64 targets: y[t] = x[t + 1], the next character of the same stream
    reset: bool  # True on the first segment of an epoch: the model must start from a zero state


class StreamBatcher:
    """Truncated-BPTT batching over B contiguous streams of one token array.

    The array is cut into B streams of L = len // B characters (the last len % B characters are dropped), and step k
    yields the k-th segment of T characters of every stream. Targets are the inputs shifted by one character, so a
    segment reads T + 1 characters and the next segment starts where this one's inputs ended::

        tokens:  t[0] t[1] ...                                                   t[len-1]
                 |<------ stream 0 ------>|<------ stream 1 ------>| ... |<- stream B-1 ->|(dropped len % B)
                                  L                     L                        L

                       segment 0        segment 1              segment S-1     (S = (L-1) // T)
        stream 0    [ 0 .. T-1 ]     [ T .. 2T-1 ]     ...   [ (S-1)T .. ST-1 ]   x
                    [ 1 .. T   ]     [ T+1 .. 2T ]     ...   [ (S-1)T+1 .. ST ]   y = x shifted by one
        stream 1    [ L+0 .. L+T-1 ] [ L+T .. ]        ...
           ...
        stream B-1  [ (B-1)L .. ]    ...

        batch k:  x[:, b] = stream b, positions kT .. kT+T-1     -> a (T, B) tensor, one column per stream
                  y[:, b] = stream b, positions kT+1 .. kT+T

    The hidden state of column b after batch k is the right initial state for column b of batch k+1. After segment
    S-1 the batcher wraps around to segment 0 of the next epoch with `reset=True`, since the carried state then no
    longer matches the text. Evaluation that iterates one epoch therefore scores B*S*T characters, slightly fewer than
    the split holds (the tails of the streams are never targets).

    Data parallelism: with `world_size` W, rank r takes streams [r*B/W, (r+1)*B/W) (B must be divisible by W), so the
    batches of all ranks, concatenated along B, are exactly the single-process batch, and the global characters per
    step stay B * T. Each segment is copied out of the (memmapped) array on demand; the whole split never enters torch.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        split_name: str = "tokens",
    ):
        _check_sizes(len(tokens), batch_size, seq_len, rank, world_size, split_name)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.stream_len = len(tokens) // batch_size  # L
        streams = np.asarray(tokens)[: batch_size * self.stream_len].reshape(batch_size, self.stream_len)
        per_rank = batch_size // world_size
        self._streams = streams[rank * per_rank : (rank + 1) * per_rank]  # (B/W, L), still a view of the memmap
        self.segments_per_epoch = (self.stream_len - 1) // seq_len  # inputs and targets both inside the stream
        self.chars_per_step = batch_size * seq_len  # global, all ranks together
        self.epoch = 0
        self.position = 0  # segment index within the epoch of the NEXT batch

    def __len__(self) -> int:
        return self.segments_per_epoch

    def segment(self, k: int) -> Batch:
        """Segment k of every local stream, on the batcher's device."""
        start = k * self.seq_len
        # a copy (T+1, B/W) of the read-only memmap: small, and torch may own it
        window = np.array(self._streams[:, start : start + self.seq_len + 1].T, dtype=np.uint8, order="C")
        tokens = torch.from_numpy(window).to(device=self.device, dtype=torch.int64, non_blocking=True)
        return Batch(x=tokens[:-1], y=tokens[1:], reset=k == 0)

    def next_batch(self) -> Batch:
        """The next training batch; infinite, wrapping to the next epoch (with reset=True) after the last segment."""
        batch = self.segment(self.position)
        self.position += 1
        if self.position == self.segments_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[Batch]:
        """One full epoch from segment 0 (first batch reset=True); leaves the training cursor untouched."""
        for k in range(self.segments_per_epoch):
            yield self.segment(k)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Resume so that the next batch is exactly the one that would have followed when `state` was taken.

        The batch after a mid-epoch resume has reset=False: the trainer must restore the carried hidden state from
        its checkpoint (or knowingly start that segment from zeros).
        """
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position < self.segments_per_epoch or epoch < 0:
            raise UserError(
                f"checkpoint batcher position {position} (epoch {epoch}) does not fit this data: an epoch "
                f"has {self.segments_per_epoch} segments; resume with the batch_size, seq_len and dataset "
                f"the checkpoint was made with"
            )
        self.epoch, self.position = epoch, position


def _check_sizes(n: int, batch_size: int, seq_len: int, rank: int, world_size: int, split_name: str) -> None:
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"trainer.batch_size and trainer.seq_len must be positive, got {batch_size} and {seq_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}; launch with torchrun so they are consistent")
    if batch_size % world_size:
        raise UserError(
            f"trainer.batch_size={batch_size} is not divisible by the {world_size} processes; use a "
            f"batch_size that is a multiple of the number of processes"
        )
    needed = batch_size * (seq_len + 1)
    if n < needed:
        raise UserError(
            f"corpus split {split_name!r} has {n} characters, fewer than batch_size*(seq_len+1)={needed}; "
            f"use a smaller trainer.batch_size / trainer.seq_len or a bigger file"
        )
