"""Per-step products of the fast mLSTM on CPU: torch.mm against MKL's packed GEMM (`mlstm.cells.kernels.packed_gemm`);
the logic of `scripts/bench_products.py`.

For each hidden size H, the four products of a paper-form step, a (B, K) @ (K, N): forward W_mh h (K = N = H) and
W_m m (H -> 4H); backward W_m^T dz (4H -> H) and W_mh^T dr (H -> H). Each is timed as the median of --iters calls
after --warmup, torch.mm into a preallocated output against the packed product (a new output each call, as the layer
uses it); the packing itself (once per segment) is timed too. Also checked: the packed results are bitwise the same
when repeated and with 1 thread instead of --threads, and their largest difference from torch.mm.
"""

from __future__ import annotations

import statistics
import time

import torch

from mlstm.cells.kernels import packed_gemm
from mlstm.errors import UserError


def median_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rows_for(batch: int, hidden: int, threads: int, iters: int, warmup: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, k, n in (
        ("W_mh h", hidden, hidden),
        ("W_m m", hidden, 4 * hidden),
        ("W_m^T dz", 4 * hidden, hidden),
        ("W_mh^T dr", hidden, hidden),
    ):
        a = torch.randn(batch, k, generator=g)
        weight = torch.randn(n, k, generator=g) / k**0.5  # L (N, K): the product is a @ L^T
        right, out = weight.t().contiguous(), torch.empty(batch, n)
        packed = packed_gemm.PackedWeight(weight, batch)
        first = packed.product(a)
        torch.set_num_threads(1)
        one_thread = packed.product(a)
        torch.set_num_threads(threads)
        rows.append(
            {
                "hidden": hidden,
                "product": name,
                "shape": f"({batch}, {k}) x ({k}, {n})",
                "mm_ms": median_ms(lambda: torch.mm(a, right, out=out), iters, warmup),
                "packed_ms": median_ms(lambda: packed.product(a), iters, warmup),
                "pack_ms": median_ms(lambda: packed_gemm.PackedWeight(weight, batch), max(3, iters // 20), 1),
                "repeatable": torch.equal(first, packed.product(a)),
                "thread_independent": torch.equal(first, one_thread),
                "max_abs_diff_vs_mm": (first - a @ right).abs().max().item(),
            }
        )
    return rows


def markdown(rows: list[dict], batch: int, threads: int) -> str:
    lines = [
        f"torch {torch.__version__}, {threads} threads, B={batch}, float32; median ms per call. "
        "Written by scripts/bench_products.py.",
        "",
        "| H | product | shape | torch.mm ms | packed ms | packed / mm | packing ms (once per segment) | "
        "bitwise repeatable | same with 1 thread | max abs diff vs mm |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['hidden']} | {r['product']} | {r['shape']} | {r['mm_ms']:.4f} | {r['packed_ms']:.4f} | "
            f"{r['packed_ms'] / r['mm_ms']:.2f} | {r['pack_ms']:.3f} | {r['repeatable']} | "
            f"{r['thread_independent']} | {r['max_abs_diff_vs_mm']:.2g} |"
        )
    return "\n".join(lines) + "\n"


def run(batch: int, hidden: str, threads: int, iters: int, warmup: int) -> str:
    """The markdown table for comma-separated hidden sizes; a UserError for values that cannot be timed."""
    try:
        sizes = [int(v) for v in hidden.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--hidden must be comma-separated integers, got {hidden!r}") from None
    if batch < 1 or threads < 1 or iters < 1 or warmup < 0 or not sizes or min(sizes) < 1:
        raise UserError("--batch, --threads, --iters and every --hidden must be positive, --warmup >= 0")
    if not packed_gemm.available():
        raise UserError("this PyTorch build has no MKL packed GEMM (torch.ops.mkl): nothing to compare")
    torch.set_num_threads(threads)
    rows = [r for h in sizes for r in rows_for(batch, h, threads, iters, warmup)]
    return markdown(rows, batch, threads)
