"""Validation bpc of a checkpoint as a function of how many streams the split is cut into (cold starts).

Stateful evaluation cuts a split into B contiguous streams, each starting from a zero state. A model trained with
truncated BPTT sees a zero state only at the start of each epoch, and some trained models, started cold in the middle
of a text, fall into a state they never leave. This script measures that: bpc for several B, and per-stream bpc for
the largest B; with --window W, also the bpc of every W characters along the split read as one stream, which shows
where along a long stream a state blows up. The logic: `mlstm.studies.eval_streams`.

    python scripts/eval_streams.py CHECKPOINT [--streams 1,4,32] [--split valid] [--max-chars N] [--window W]
                                   [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys

from mlstm.cli import publish
from mlstm.errors import UserError
from mlstm.studies import eval_streams


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
    try:
        text = eval_streams.report(
            args.checkpoint,
            args.streams,
            args.split,
            args.max_chars,
            args.seq_len,
            args.data_dir,
            args.window,
            args.threads,
        )
    except UserError as error:
        sys.exit(f"error: {error}")
    publish(text, args.out)


if __name__ == "__main__":
    main()
