"""Where a fast-mLSTM training step spends its GPU time: the logic of `scripts/gpu_profile.py` (part of
scripts/gpu_check.sh; CUDA only).

1. The per-step matrix products alone, as the layer runs them (B rows, bf16, each timed over a CUDA graph of 100
   calls, so that launch cost is out): r = h W_mh^T (B,H)x(H,H), z = m W_m^T (B,H)x(H,4H), and the backward's
   dm = dz W_m (B,4H)x(4H,H) and dh = dr W_mh (B,H)x(H,H); with each BLAS library torch offers.
2. One training step of the bench (mlstm.bench.steps.TrainStep) under torch.profiler: the kernels by total GPU
   time, with CUDA graphs (as trained) and without them (every launch visible), against its wall-clock time.
"""

from __future__ import annotations

import os
import sys
import time

import torch


def gemm_table(hidden: list[int], batch: int) -> None:
    libraries = ["default"]
    if hasattr(torch.backends.cuda, "preferred_blas_library"):
        libraries, original = ["cublas", "cublaslt"], torch.backends.cuda.preferred_blas_library()
    columns = [(lib, layout) for lib in libraries for layout in ("NN", "TN")]
    print(
        f"per-step products, B={batch}, bf16, µs per product (TFLOP/s), over a graph of 100; NN: a @ W where W is"
        " stored (K, N) (the layer's transposed copy), TN: a @ W.t() with W stored (N, K) (F.linear's layout)"
    )
    print("| H | product | " + " | ".join(f"{lib} {layout}" for lib, layout in columns) + " |")
    print("| ---: | --- |" + " ---: |" * len(columns))
    for H in hidden:
        shapes = {
            "r = h W_mh^T": (batch, H, H),
            "z = m W_m^T": (batch, H, 4 * H),
            "dm = dz W_m": (batch, 4 * H, H),
            "dh = dr W_mh": (batch, H, H),
        }
        for name, (m, k, n) in shapes.items():
            cells = []
            for lib, layout in columns:
                if lib != "default":
                    torch.backends.cuda.preferred_blas_library(lib)
                a = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                w = torch.randn(k, n, device="cuda").to(torch.bfloat16)
                if layout == "TN":
                    w = w.t().contiguous().t()  # the same (K, N) operand, stored as its transpose
                out = torch.mm(a, w)  # warm-up: the library picks its kernel
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(100):
                        out = torch.mm(a, w)
                graph.replay()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(5):
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3 / 100)
                us = sorted(times)[2]
                cells.append(f"{us:.1f} ({2 * m * k * n / us / 1e6:.0f})")
                del graph, out
            print(f"| {H} | {name} | " + " | ".join(cells) + " |")
    if libraries != ["default"]:
        torch.backends.cuda.preferred_blas_library(original)


def profile_step(cell: str, hidden: int, batch: int, seq_len: int, graphs: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    from mlstm.bench import steps as bench

    os.environ["MLSTM_CUDA_GRAPH"] = "auto" if graphs else "0"
    settings = bench.Settings(device=torch.device("cuda"), dtype="bf16", init="torch")
    bench.apply_settings(settings)
    step = bench.TrainStep.for_row(bench.CellSpec.parse(cell), bench.Shape(hidden, batch, seq_len, 128, 205), settings)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    wall = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / 1e3
    print(
        f"\n{cell} H={hidden} B={batch} T={seq_len} bf16, CUDA graphs {'on' if graphs else 'off'}: "
        f"wall {sorted(wall)[2] * 1e3:.2f} ms/step (median of 5), "
        f"GPU kernel time {total:.2f} ms in the profiled step"
    )
    print("| kernel | calls | total ms | share |")
    print("| --- | ---: | ---: | ---: |")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
        ms = e.self_device_time_total / 1e3
        print(f"| {e.key[:90]} | {e.count} | {ms:.2f} | {ms / total:.0%} |")
    del step
    torch.cuda.empty_cache()


def run(hidden: str, batch: int, seq_len: int, cells: str) -> int:
    """Both parts, for comma-separated hidden sizes (the products at each, the step at the last) and cell specs.
    Returns the exit status: 0, 1 when a part failed (the other's numbers are still printed), 2 without CUDA."""
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device", file=sys.stderr)
        return 2
    sizes = [int(h) for h in hidden.split(",")]
    failed = 0
    try:
        gemm_table(sizes, batch)
    except Exception as e:  # one part failing should not cost the other's numbers
        print(f"gemm table failed: {type(e).__name__}: {e}")
        failed = 1
    for cell in cells.split(","):
        for graphs in (True, False) if cell.endswith(":fast") else (True,):
            try:
                profile_step(cell, sizes[-1], batch, seq_len, graphs)
            except Exception as e:
                print(f"profile of {cell} failed: {type(e).__name__}: {e}")
                failed = 1
    return failed
