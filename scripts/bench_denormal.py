"""What subnormal floats cost a CPU run, and what trainer.flush_denormal saves (mlstm.bench.denormal), as markdown.
  python scripts/bench_denormal.py                                   # the operations only
  python scripts/bench_denormal.py --checkpoint RUN/last.pt --runs results/convergence/tuned/runs/text8_sample
  python scripts/bench_denormal.py --threads 2                       # the flag on PyTorch's worker threads too
"""

import argparse
import sys
from pathlib import Path

import torch

from mlstm.bench.denormal import operation_table, run_seconds_table, train_step_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="time training steps from this checkpoint, flushing off and on")
    parser.add_argument("--runs", type=Path, help="list the training seconds and last valid bpc of the runs here")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, as the studies' runs)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        print(f"error: --threads must be at least 1, not {args.threads}", file=sys.stderr)
        return 2
    for path in (args.checkpoint, args.runs):
        if path is not None and not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    threads = "one thread" if args.threads == 1 else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {threads}\n\n## Products with normal and subnormal results\n")
    print(operation_table())
    if args.checkpoint:
        print(f"\n## Training steps from {args.checkpoint}\n")
        print(train_step_table(args.checkpoint))
    if args.runs:
        print(f"\n## Runs under {args.runs}, slowest first\n")
        print(run_seconds_table(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
