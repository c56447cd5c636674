"""The fused pointwise steps of the fast mLSTM on CUDA, as Triton kernels: the GPU twin of `cpu_kernel`.

Why: PyTorch runs the pointwise math of one step as about ten kernels forward and fifteen backward; at T = 200 that
is thousands of tiny launches per training step, each a pass over memory. These four kernels do each stage of a step
in one launch, with the same buffers, the same layout and the same arithmetic order as the C loops
(csrc/mlstm_cpu_body.h, which documents each stage):

    forward   fwd_product   m_t = xp_F ⊙ r_t  (seed: m_t = a_t ⊙ b_t, [a_t; b_t] = xp_F + r_t)
              fwd_cell      gates, c_t, h_t from z_t = xp_z + W_m m_t and c_{t-1}     (every form and option)
    backward  bwd_cell      dz_t and dc_{t-1} from dh_t and dc_t                      (its exact derivative)
              bwd_product   d xp_F and dr_t from dm_t = W_m^T dz_t

`TritonSegmentCall` has the interface of `cpu_kernel.SegmentCall`, so `fast_mlstm` drives either one the same way.
The products may arrive in a lower dtype (bf16 under autocast): each kernel widens them to the state dtype on load,
which is exactly the reference's `F.linear(...).to(float32)`. One program handles BLOCK units of one batch row.
Launching a Triton kernel costs tens of microseconds of Python; `cuda_graph` captures the whole segment so that
training replays it without that cost. Measured on an H200 (results/bench/gpu_runs/run4/ablation.md; paper form,
H=1024, B=128, T=200, bf16, no graphs): 65.1 ms per training step with these kernels, 80.5 with PyTorch ops.

    MLSTM_TRITON=auto   (default) use the kernels on CUDA for float32 state when Triton imports
    MLSTM_TRITON=1      require them: no Triton is an error
    MLSTM_TRITON=0      never use them (the PyTorch pointwise path, e.g. to compare)
    MLSTM_TRITON=interpret  run them through Triton's CPU interpreter, on any device with float32 state (slow: for
                        debugging, and for the tests, which check them this way against the reference on a CPU)
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

from mlstm.cells.kernels.cpu_kernel import ACTIVATIONS, FORMS, env_switch
from mlstm.errors import UserError


def mode() -> str:
    """auto | on | off | interpret"""
    if os.environ.get("MLSTM_TRITON", "").strip().lower() == "interpret":
        return "interpret"
    return env_switch("MLSTM_TRITON")


@functools.cache
def importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def applies(device: torch.device, dtype: torch.dtype) -> str | None:
    """How the fast layer runs its pointwise math here: "triton" (CUDA, float32 state, Triton present and not
    switched off), "triton-interpret" (MLSTM_TRITON=interpret, float32 state), or None (not through these kernels)."""
    wanted = mode()
    if wanted == "off" or dtype != torch.float32 or (device.type != "cuda" and wanted != "interpret"):
        return None
    if not importable():
        if wanted in ("on", "interpret"):
            raise UserError(
                f"MLSTM_TRITON={os.environ['MLSTM_TRITON']} but Triton is not installed (pip install triton)"
            )
        return None
    return "triton-interpret" if wanted == "interpret" else "triton"


def describe(device: torch.device) -> str:
    """For run metadata: whether the fast mLSTM's pointwise math runs in these kernels on this device."""
    wanted = mode()
    if wanted == "interpret":
        return "interpret"
    if device.type != "cuda":
        return "not applicable"
    if wanted == "off":
        return "off"
    if not importable():
        return "unavailable (no triton)"
    import triton

    return f"on (triton {triton.__version__})"


@functools.cache
def kernels(interpret: bool = False):
    """The module of the four jitted kernels (`_triton_kernels.py`), loaded on first use (so that importing this
    module needs no Triton), once for the GPU and once for Triton's CPU interpreter: Triton chooses the interpreter
    when a kernel is decorated, from TRITON_INTERPRET."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        name = "mlstm.cells.kernels._triton_kernels" + ("_interpreted" if interpret else "")
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_triton_kernels.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _slot(buffer: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """Step t's (B, width) slot of a (S, B, width) buffer (slot t % S, as the C code's `at`)."""
    return None if buffer is None else buffer[t % buffer.shape[0]]


class TritonSegmentCall:
    """One segment's buffers and the per-step launches on them (the interface of `cpu_kernel.SegmentCall`).

    low: the fused form of `fast_mlstm` (a layer without projection, products in a lower dtype), the tensors the
    kernels then also read or write: forward {H_lo (S, B, H) in the products' dtype, Y (T, B, H), mask (B, H) or
    None}, with R (paper, matlab) and M in the products' dtype; backward {DXP_lo (T, B, K) and DR_lo (T, B, K_F) in
    that dtype (the seed's DR_lo is DXP_lo's d xp_F part), dY (T, B, H), mask}. The forward kernels then write
    y[t] = h ⊙ mask and H_lo[t]; the backward ones read the grad of h from the last product and dY
    (`bwd_cell(t, dh_in, add_dy)`) and write DXP_lo[t] and DR_lo[t]: four launches per step each way, and no casts,
    adds or mask products in between.
    interpret: run through Triton's CPU interpreter (tests)."""

    def __init__(self, spec, xp, buffers: dict, tensors: dict, low: dict | None = None, interpret: bool = False):
        T, B, K = xp.shape
        H = buffers["M"].shape[-1]
        self.T, self.B, self.H, self.K, self.KF = T, B, H, K, K - 4 * H
        self.form = FORMS["seed-gated" if spec.seed_output == "gated" else spec.form]
        self.act, self.peep, self.clip = ACTIVATIONS[spec.activation], bool(spec.peepholes), spec.cell_clip
        self.forget_bias = float(spec.forget_bias)
        self.ii, self.ci = (0, 1) if self.form >= 2 else (1, 0)  # slots of i and the candidate in z (seed: i, j)
        self.xp, self.b, self.t, self.low = xp, buffers, tensors, low or {}
        self.fused = low is not None
        self.bias = self.low.get("bias")  # fused: xp is the bf16 product W_in x, and the kernels add this bias (K,)
        self.bias_z = None if self.bias is None else self.bias[self.KF :]
        self.k = kernels(interpret)
        self.block = self.block_for(H)
        self.grid = (B, -(-H // self.block))
        self.warps = max(1, min(4, self.block // 128))
        # an unused pointer argument (a buffer that this form does not have) is given a harmless tensor instead
        self.spare = xp
        self.bf16 = self.fused and buffers["M"].dtype == torch.bfloat16  # the products' dtype (M is in it when fused)
        self.cell_flags = dict(
            FORM=self.form,
            ACT=self.act,
            PEEP=self.peep,
            CLIP=self.clip is not None,
            ii=self.ii,
            ci=self.ci,
            MASK=self.low.get("mask") is not None,
            BF16=self.bf16,
            BLOCK=self.block,
            num_warps=self.warps,
        )

    @staticmethod
    def block_for(H: int) -> int:
        """Units per program: a power of two (tl.arange), at most 512."""
        return min(512, 1 << max(H - 1, 0).bit_length())

    def _p(self, v):
        return self.spare if v is None else v

    def _c_prev(self, t):
        return self.t["c0"] if t == 0 else _slot(self.b["C"], t - 1)

    # Each launch passes step t's slots; a buffer this form or mode does not have is passed as `spare` (never read).
    def fwd_product(self, t: int, product: torch.Tensor) -> None:
        b, p = self.b, self._p
        self.k.fwd_product[self.grid](
            self.xp[t],
            product,
            _slot(b["R"], t),
            _slot(b["M"], t),
            p(self.bias),
            self.H,
            self.K,
            self.KF,
            SEED=self.form >= 2,
            XB=self.fused,
            BF16=self.bf16,
            BLOCK=self.block,
            num_warps=self.warps,
        )

    def fwd_cell(self, t: int, product: torch.Tensor) -> None:
        b, p, low, w = self.b, self._p, self.low, self.t
        hr, y = _slot(b["HR"], t), low["Y"][t] if self.fused else None
        self.k.fwd_cell[self.grid](
            self.xp[t, :, self.KF :],
            product,
            self._c_prev(t),
            _slot(b["G"], t),
            _slot(b["CR"], t),
            _slot(b["C"], t),
            hr,
            p(w["w_I"]),
            p(w["w_F"]),
            p(w["w_O"]),
            p(w["b_h"]),
            p(y),
            p(low.get("mask")),
            p(_slot(low.get("H_lo"), t)),
            p(self.bias_z),
            self.forget_bias,
            float(self.clip or 0.0),
            self.H,
            self.K,
            OUT=self.fused,
            STORE_HR=self.fused and hr.data_ptr() != y.data_ptr(),
            **self.cell_flags,
        )

    def bwd_cell(self, t: int, dh_in: torch.Tensor | None = None, add_dy: bool = False) -> None:
        """dh_in, add_dy (fused only): the grad of h_t is (dY[t] if add_dy) + dh_in, before the mask."""
        b, p, low, w = self.b, self._p, self.low, self.t
        self.k.bwd_cell[self.grid](
            _slot(b["G"], t),
            _slot(b["CR"], t),
            _slot(b["C"], t),
            self._c_prev(t),
            _slot(b["HR"], t),
            p(w["w_I"]),
            p(w["w_F"]),
            p(w["w_O"]),
            w["dhr"],
            w["dc"],
            w["dXP"][t, :, self.KF :],
            p(_slot(w["dU"], t)),
            p(dh_in),
            p(low["dY"][t] if self.fused else None),
            p(low.get("mask")),
            p(low["DXP_lo"][t, :, self.KF :] if self.fused else None),
            float(self.clip or 0.0),
            self.H,
            self.K,
            IN=self.fused,
            ADD_DY=add_dy,
            **self.cell_flags,
        )

    def bwd_product(self, t: int, product: torch.Tensor) -> None:
        p, low = self._p, self.low
        self.k.bwd_product[self.grid](
            self.xp[t],
            _slot(self.b["R"], t),
            product,
            self.t["dXP"][t],
            p(_slot(self.t["dR"], t)),
            p(_slot(low.get("DXP_lo"), t)),
            p(_slot(low.get("DR_lo"), t)),
            p(self.bias),
            self.H,
            self.K,
            self.KF,
            SEED=self.form >= 2,
            LO=self.fused,
            BF16=self.bf16,
            BLOCK=self.block,
            num_warps=self.warps,
        )
