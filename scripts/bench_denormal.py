"""What subnormal floats cost a CPU run, and what trainer.flush_denormal saves (mlstm.bench.denormal), as markdown.
python scripts/bench_denormal.py                                   # the operations only
python scripts/bench_denormal.py --checkpoint RUN/last.pt --runs results/convergence/tuned/runs/text8_sample
python scripts/bench_denormal.py --threads 2                       # the flag on PyTorch's worker threads too
"""

import argparse
import sys
from pathlib import Path

from mlstm.bench import denormal


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="time training steps from this checkpoint, flushing off and on")
    parser.add_argument("--runs", type=Path, help="list the training seconds and last valid bpc of the runs here")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, as the studies' runs)")
    args = parser.parse_args(argv)
    return denormal.report(args.checkpoint, args.runs, args.threads)


if __name__ == "__main__":
    sys.exit(main())
