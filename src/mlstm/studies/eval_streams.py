"""Validation bpc of a checkpoint as a function of how many streams the split is cut into (cold starts).

Stateful evaluation cuts a split into B contiguous streams, each starting from a zero state. A model trained with
truncated BPTT sees a zero state only at the start of each epoch, and some trained models, started cold in the middle
of a text, fall into a state they never leave. This measures that: bpc for several B, and per-stream bpc for
the largest B; with --window W, also the bpc of every W characters along the split read as one stream, which shows
where along a long stream a state blows up.

The logic of `scripts/eval_streams.py`.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from mlstm.data import load_corpus
from mlstm.evaluate import bits_per_position, evaluate_bpc
from mlstm.training.trained import load_model


def per_stream_bpc(model, tokens, batch_size: int, seq_len: int) -> list[float]:
    return bits_per_position(model, tokens, batch_size=batch_size, seq_len=seq_len).mean(0).tolist()


def window_bpc(model, tokens, seq_len: int, window: int) -> list[float]:
    """bpc of each consecutive `window` characters of `tokens` read as ONE stream from a zero state (B=1)."""
    bits = bits_per_position(model, tokens, batch_size=1, seq_len=seq_len)[:, 0]
    return [chunk.mean().item() for chunk in bits.split(window)]


def report(
    checkpoint: str,
    streams: str = "1,4,32",
    split: str = "valid",
    max_chars: int | None = None,
    seq_len: int = 100,
    data_dir: str | None = None,
    window: int | None = None,
    threads: int | None = None,
) -> str:
    """The markdown report for a checkpoint; `streams` is comma-separated. Raises UserError for a checkpoint or data
    that cannot be read."""
    if threads:
        torch.set_num_threads(threads)
    model, payload = load_model(checkpoint)
    cfg = OmegaConf.create(payload["config"])
    corpus = load_corpus(cfg.dataset, data_dir or cfg.data_dir)
    model.eval()
    tokens = corpus.split(split)[:max_chars] if max_chars else corpus.split(split)
    counts = [int(s) for s in streams.split(",")]
    lines = [
        f"checkpoint: `{checkpoint}` (step {payload['step']}, {payload['num_parameters']:,} parameters)",
        f"split: {split}, {len(tokens):,} characters, segments of {seq_len}",
        "",
        "| streams (B) | bpc |",
        "| --- | --- |",
    ]
    for B in counts:
        bpc = evaluate_bpc(model, tokens, batch_size=B, seq_len=seq_len, device=torch.device("cpu"))
        lines.append(f"| {B} | {bpc:.4f} |")
    worst = per_stream_bpc(model, tokens, max(counts), seq_len)
    lines += ["", f"per-stream bpc with B={max(counts)}: " + " ".join(f"{v:.1f}" for v in worst)]
    if window:
        windows = window_bpc(model, tokens, seq_len, window)
        lines += [
            "",
            f"bpc of every {window:,} characters, one stream from a zero state: "
            + " ".join(f"{v:.2f}" for v in windows),
        ]
    return "\n".join(lines) + "\n"
