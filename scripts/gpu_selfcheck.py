"""The fast mLSTM on a GPU against the reference layer: the Triton kernels and the CUDA graphs checked for real.

The test suite checks the Triton kernels through Triton's CPU interpreter and the graph bookkeeping with a stand-in;
this script runs the real thing on CUDA (part of scripts/gpu_check.sh). For every form and a set of options it
builds a reference (impl=reference) and a fast layer with the same weights, and compares outputs and every gradient
over three calls of the fast layer (eager warm-up, capture, replay), each with fresh inputs, in float32 with TF32 off
and under bf16 autocast against the reference under autocast (the fused form when there is no projection).
Tolerances, relative to the largest magnitude: 1e-4 for float32; 1e-2 for the bf16 outputs (y, h, c) and 3e-2 for
the bf16 gradients. Under bf16 the float32 values that become the products' operands (m, h) are rounded to bf16, and
a value within float32 rounding (about 1e-7) of a rounding boundary goes one way here and the other in the reference
(whose exp and tanh round differently): one bf16 step (2^-8 relative) in one operand, up to 1.4e-3 in the outputs at
H=64 on an H200 (results/bench/gpu_runs/run3); the weight gradients are one bf16 product here and T summed ones there
(1e-2 to 1.2e-2 seen). Prints one line per case and exits 1 if any fails. The logic: `mlstm.bench.gpu_selfcheck`.

    python scripts/gpu_selfcheck.py [--hidden 64] [--batch 8] [--seq-len 12]
"""

import argparse
import sys

from mlstm.bench import gpu_selfcheck


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=12)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to dry-run this script (C kernel, no graphs)")
    args = p.parse_args()
    return gpu_selfcheck.run(args.hidden, args.batch, args.seq_len, args.device)


if __name__ == "__main__":
    sys.exit(main())
