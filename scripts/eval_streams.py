"""Validation bpc of a checkpoint as a function of how many streams the split is cut into (cold starts).

Stateful evaluation cuts a split into B contiguous streams, each starting from a zero state. A model trained with
truncated BPTT sees a zero state only at the start of each epoch, and some trained models, started cold in the middle
of a text, fall into a state they never leave. This script measures that: bpc for several B, and per-stream bpc for
the largest B; with --window W, also the bpc of every W characters along the split read as one stream, which shows
where along a long stream a state blows up.

    python scripts/eval_streams.py CHECKPOINT [--streams 1,4,32] [--split valid] [--max-chars N] [--window W]
                                   [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys

import torch

from omegaconf import OmegaConf

from mlstm.cli import publish
from mlstm.data import load_corpus
from mlstm.errors import UserError
from mlstm.evaluate import bits_per_position, evaluate_bpc
from mlstm.training.trained import load_model


def per_stream_bpc(model, tokens, batch_size: int, seq_len: int) -> list[float]:
    return bits_per_position(model, tokens, batch_size=batch_size, seq_len=seq_len).mean(0).tolist()


def window_bpc(model, tokens, seq_len: int, window: int) -> list[float]:
    """bpc of each consecutive `window` characters of `tokens` read as ONE stream from a zero state (B=1)."""
    bits = bits_per_position(model, tokens, batch_size=1, seq_len=seq_len)[:, 0]
    return [chunk.mean().item() for chunk in bits.split(window)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--streams", default="1,4,32")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    parser.add_argument("--max-chars", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--data-dir", default=None, help="token cache directory (default: the checkpoint's)")
    parser.add_argument("--window", type=int, default=None, help="also bpc per WINDOW characters of one stream")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, payload = load_model(args.checkpoint)
        cfg = OmegaConf.create(payload["config"])
        corpus = load_corpus(cfg.dataset, args.data_dir or cfg.data_dir)
    except UserError as error:
        sys.exit(f"error: {error}")
    model.eval()
    tokens = corpus.split(args.split)[: args.max_chars] if args.max_chars else corpus.split(args.split)
    streams = [int(s) for s in args.streams.split(",")]
    lines = [f"checkpoint: `{args.checkpoint}` (step {payload['step']}, {payload['num_parameters']:,} parameters)",
             f"split: {args.split}, {len(tokens):,} characters, segments of {args.seq_len}", "",
             "| streams (B) | bpc |", "| --- | --- |"]
    for B in streams:
        bpc = evaluate_bpc(model, tokens, batch_size=B, seq_len=args.seq_len, device=torch.device("cpu"))
        lines.append(f"| {B} | {bpc:.4f} |")
    worst = per_stream_bpc(model, tokens, max(streams), args.seq_len)
    lines += ["", f"per-stream bpc with B={max(streams)}: " + " ".join(f"{v:.1f}" for v in worst)]
    if args.window:
        windows = window_bpc(model, tokens, args.seq_len, args.window)
        lines += ["", f"bpc of every {args.window:,} characters, one stream from a zero state: "
                  + " ".join(f"{v:.2f}" for v in windows)]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
