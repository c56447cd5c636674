"""MKL's packed GEMM for the per-step products of the fast mLSTM on CPU (float32).

Why: at B = 32 a step's products, (32, 512) x (512, 2048) and the like, are small enough that a plain GEMM spends a
large share of its time repacking the same weight matrix into its blocked layout on every call. MKL can pack a
weight once (cblas_sgemm_pack) and multiply many times against the packed copy (cblas_sgemm_compute). PyTorch
exposes exactly that pair as `torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear` in its x86 builds; the fast
layer packs each large recurrent weight once per segment (forward and backward) and runs T products against it.
Measured (scripts/bench_products.py, results/bench/products.md; 2 threads, B = 32): with a weight of more than 2^16
elements a packed product takes 0.71-0.89 of torch.mm's time (H = 256-1024); with smaller ones it is slower, 1.0-1.7x
at H = 64-128, where the fixed cost of the call dominates: hence `worth_packing`. Its results were bitwise repeatable
and the same with 1 thread as with 2 there. The whole-step effect: results/bench/README.md.

    MLSTM_PACKED_GEMM=auto  (default) use it for float32 CPU products when this PyTorch build has the MKL ops
    MLSTM_PACKED_GEMM=1     require it: a build without them is an error
    MLSTM_PACKED_GEMM=0     never use it (torch.mm, e.g. to compare)

The products differ from torch.mm's only by float32 summation order (about 1e-6 relative).
"""

from __future__ import annotations

import torch

from mlstm.cells.kernels.cpu_kernel import env_switch
from mlstm.errors import UserError

_available: bool | None = None


def mode() -> str:
    return env_switch("MLSTM_PACKED_GEMM")


def available() -> bool:
    """Whether this PyTorch build has the ops and they agree with torch.mm on a small product (probed once)."""
    global _available
    if _available is None:
        try:
            values = torch.linspace(-1.0, 1.0, 56)  # fixed numbers: the probe must not draw from the global RNG
            a, w = values[:32].reshape(4, 8), values[32:].reshape(3, 8)
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 4)
            _available = bool(torch.allclose(torch.ops.mkl._mkl_linear(a, packed, w, None, 4), a @ w.t(), atol=1e-5))
        except (AttributeError, RuntimeError, NotImplementedError):
            _available = False
    return _available


MIN_ELEMENTS = 1 << 16  # pack weights with more elements than this (results/bench/products.md: the crossover)


def worth_packing(weight: torch.Tensor) -> bool:
    """Whether products with this weight gain from packing: only above MIN_ELEMENTS (smaller ones lose to torch.mm)."""
    return weight.numel() > MIN_ELEMENTS


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Packed products for this segment: CPU float32 products, not switched off, and the ops present."""
    wanted = mode()
    if wanted == "off" or device.type != "cpu" or dtype != torch.float32:
        return False
    if not available():
        if wanted == "on":
            raise UserError("MLSTM_PACKED_GEMM=1 but this PyTorch build has no MKL packed GEMM (torch.ops.mkl)")
        return False
    return True


def describe(device: torch.device) -> str:
    """For run metadata: on | off (switched off) | unavailable (no MKL ops) | not applicable (not CPU)."""
    if device.type != "cpu":
        return "not applicable"
    if mode() == "off":
        return "off"
    return "on" if available() else "unavailable"


class PackedWeight:
    """A weight L (N, K) packed for products a @ L^T with a of `batch` rows."""

    def __init__(self, weight: torch.Tensor, batch: int):
        self.weight = weight.contiguous()
        self.batch = batch
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, batch)

    def product(self, a: torch.Tensor) -> torch.Tensor:
        """a @ L^T as a new contiguous (batch, N) tensor (a may have strided rows)."""
        return torch.ops.mkl._mkl_linear(a, self.packed, self.weight, None, self.batch)
