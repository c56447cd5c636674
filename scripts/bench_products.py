"""Per-step products of the fast mLSTM on CPU: torch.mm against MKL's packed GEMM (`mlstm.cells.kernels.packed_gemm`).

    python scripts/bench_products.py --batch 32 --hidden 256,512 --threads 2 --markdown results/bench/products.md

For each hidden size H, the four products of a paper-form step, a (B, K) @ (K, N): forward W_mh h (K = N = H) and
W_m m (H -> 4H); backward W_m^T dz (4H -> H) and W_mh^T dr (H -> H). Each is timed as the median of --iters calls
after --warmup, torch.mm into a preallocated output against the packed product (a new output each call, as the layer
uses it); the packing itself (once per segment) is timed too. Also checked: the packed results are bitwise the same
when repeated and with 1 thread instead of --threads, and their largest difference from torch.mm. The logic:
`mlstm.bench.products`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlstm.bench import products
from mlstm.cli import exit_on_user_error, publish


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", default="256,512", help="comma-separated hidden sizes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    publish(products.run(args.batch, args.hidden, args.threads, args.iters, args.warmup), args.markdown)


if __name__ == "__main__":
    main()
