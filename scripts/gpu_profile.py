"""Where a fast-mLSTM training step spends its GPU time (part of scripts/gpu_check.sh; CUDA only).

1. The per-step matrix products alone, as the layer runs them (B rows, bf16, each timed over a CUDA graph of 100
   calls, so that launch cost is out): r = h W_mh^T (B,H)x(H,H), z = m W_m^T (B,H)x(H,4H), and the backward's
   dm = dz W_m (B,4H)x(4H,H) and dh = dr W_mh (B,H)x(H,H); with each BLAS library torch offers.
2. One training step of the bench (scripts/bench.py's TrainStep) under torch.profiler: the kernels by total GPU
   time, with CUDA graphs (as trained) and without them (every launch visible), against its wall-clock time.

The logic: `mlstm.bench.gpu_profile`.

    python scripts/gpu_profile.py [--hidden 1024,2048] [--batch 128] [--seq-len 200] [--cells mlstm-paper:fast]
"""

import argparse
import sys

from mlstm.bench import gpu_profile


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", default="1024,2048")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=200)
    p.add_argument("--cells", default="mlstm-paper:fast,lstm:cudnn")
    args = p.parse_args()
    return gpu_profile.run(args.hidden, args.batch, args.seq_len, args.cells)


if __name__ == "__main__":
    sys.exit(main())
