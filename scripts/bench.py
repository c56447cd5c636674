"""Speed of one training step (forward + backward + optimizer step of the whole model) for chosen cells and sizes.

    make bench ARGS="--preset cpu --json results/bench/cpu.json --markdown results/bench/cpu.md"
    python scripts/bench.py --cells lstm:cudnn,mlstm-paper:fast --hidden 256,512 --batch 32 --seq-len 100 \\
        --embedding 128 --dtype fp32 --device cpu --threads 2 --iters 20 --warmup 3 --json out.json

A cell spec is name[-form]:impl: lstm:cudnn (torch.nn.LSTM), lstm:loop, mlstm-{paper,matlab,seed}:{fast,reference}.
Every row is also compared with nn.LSTM at the same hidden size and at the same parameter count (those baselines are
timed too; on CUDA the equal-parameter hidden size is rounded to a multiple of 64, where cuDNN uses tensor cores).
The markdown table goes to stdout; --json writes a list of row objects, rewritten after every row.
What is timed, the FLOP formula and the memory measure: `mlstm.bench.steps` and results/bench/README.md; what the
flags become: `mlstm.bench.benchmark`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlstm.bench import benchmark
from mlstm.bench import steps as bench
from mlstm.cli import exit_on_user_error


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(bench.PRESETS),
        help="cpu: 6 cells x H 256,512, B32 T100 E128, fp32, 2 threads\n"
        "gpu: lstm:cudnn, mlstm-paper/seed:fast x H 1024,2048, B128 T200 E128, bf16;\n"
        "     + mlstm-paper:fast H4096 E64 V256. Flags below override the preset.",
    )
    p.add_argument(
        "--cells",
        type=lambda s: tuple(c.strip() for c in s.split(",") if c.strip()),
        help="comma-separated cell specs name[-form]:impl (default lstm:cudnn,mlstm-paper:fast)",
    )
    p.add_argument("--hidden", type=int_list, help="comma-separated hidden sizes (default 256)")
    p.add_argument("--batch", type=int, help="streams B (default 32)")
    p.add_argument("--seq-len", type=int, help="characters per segment T (default 100)")
    p.add_argument("--embedding", type=int, help="embedding size E, 0 = one-hot input (default 128)")
    p.add_argument("--vocab", type=int, help="vocabulary size V (default 205, enwik8)")
    p.add_argument("--dtype", choices=bench.DTYPES, help="autocast precision of the products (default fp32)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="default auto (CUDA when present)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--iters", type=int, default=20, help="timed steps; the median is reported (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 products on CUDA (default off)")
    p.add_argument("--optim", help="optim/ config choice (default: the train config's, adam_linear)")
    p.add_argument(
        "--init",
        choices=("orthogonal", "matlab", "torch"),
        help="cell.init (default: the cell config's, orthogonal; preset gpu: torch, quick to build)",
    )
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="time only the rows asked for (ratio columns of missing nn.LSTM rows stay empty)",
    )
    p.add_argument("--json", type=Path, help="write the rows (a JSON list of objects) here")
    p.add_argument("--markdown", type=Path, help="write the markdown table here")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    if benchmark.run(parse_args(argv)):
        sys.exit(1)


if __name__ == "__main__":
    main()
