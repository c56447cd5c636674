"""The fast mLSTM on a GPU against the reference layer: the Triton kernels and the CUDA graphs checked for real.
The logic of `scripts/gpu_selfcheck.py`.

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
(1e-2 to 1.2e-2 seen). Prints one line per case and exits 1 if any fails.
"""

from __future__ import annotations

import sys
import time

import torch

from mlstm.cells import build_layer
from mlstm.cells.kernels import cuda_graph, triton_kernel

FORMS = ("paper", "matlab", "seed", "seed-gated")
VARIANTS = {
    "plain": {},
    "all": dict(use_peepholes=True, cell_clip=0.3, num_proj=24, proj_clip=0.15, forget_bias=0.5, dropout=0.3),
    "relu": dict(activation="relu", use_peepholes=True, dropout=0.3, num_proj=24),
}


def layers(form: str, variant: str, hidden: int, inputs: int, device: torch.device):
    form, _, output = form.partition("-")
    cfg = dict(name="mlstm", form=form, hidden_size=hidden, **VARIANTS[variant])
    if output:
        cfg["seed_output"] = output
    torch.manual_seed(0)
    ref = build_layer(dict(cfg, impl="reference"), inputs).to(device)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.3)
    fast = build_layer(dict(cfg, impl="fast"), inputs).to(device)
    fast.load_state_dict(ref.state_dict())
    return ref.train(), fast.train()


def forward_backward(layer, x, h0, c0, seed: int) -> dict:
    x, h0, c0 = (v.clone().requires_grad_() for v in (x, h0, c0))
    torch.manual_seed(seed)  # the dropout mask
    y, (h, c) = layer(x, (h0, c0))
    g = torch.Generator(device=y.device).manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=g, device=y.device)).sum() for v in (y, h, c))
    layer.zero_grad()
    loss.backward()
    out = {"y": y, "h": h, "c": c, "dx": x.grad, "dh0": h0.grad, "dc0": c0.grad}
    out.update({f"d{n}": p.grad for n, p in layer.named_parameters()})
    return {k: v.detach().float() for k, v in out.items()}


def worst(a: dict, b: dict) -> tuple[float, str]:
    """The largest error relative to the larger of 1 and the reference's largest magnitude, and where."""
    errs = {k: ((a[k] - b[k]).abs().max() / max(1.0, a[k].abs().max().item())).item() for k in a}
    k = max(errs, key=lambda n: errs[n] if errs[n] == errs[n] else float("inf"))
    return errs[k], k


def run(hidden: int = 64, batch: int = 8, seq_len: int = 12, device_name: str = "cuda") -> int:
    """Every form x variant; prints one line per case and returns the exit status (1 if any failed, 2 without CUDA)."""
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_selfcheck: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"triton kernel: {triton_kernel.describe(device)}; CUDA graphs: {cuda_graph.describe(device)}")
    failed, T, B, inputs = 0, seq_len, batch, 16
    for form in FORMS:
        for variant in VARIANTS:
            start = time.perf_counter()
            ref, fast = layers(form, variant, hidden, inputs, device)
            spec = fast.segment_spec(device.type)
            errors, low_out, low_grad = [], [], []
            for call in range(3):  # eager warm-up, capture, replay: each on fresh inputs, in fp32 and under bf16
                g = torch.Generator(device=device).manual_seed(100 + call)
                x = torch.randn(T, B, inputs, device=device, generator=g)
                h0 = 0.5 * torch.randn(B, fast.output_size, device=device, generator=g)
                c0 = torch.randn(B, fast.hidden_size, device=device, generator=g)
                errors.append(worst(forward_backward(ref, x, h0, c0, call), forward_backward(fast, x, h0, c0, call)))
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    want = forward_backward(ref, x, h0, c0, 9 + call)
                    got = forward_backward(fast, x, h0, c0, 9 + call)
                outputs = ("y", "h", "c")
                low_out.append(worst({k: want[k] for k in outputs}, {k: got[k] for k in outputs}))
                low_grad.append(
                    worst(
                        {k: v for k, v in want.items() if k not in outputs},
                        {k: v for k, v in got.items() if k not in outputs},
                    )
                )
            graphs = fast.segment_graphs(device)
            captured = graphs is not None and any(e.graph is not None for e in graphs.entries.values())
            ok = (
                all(e <= 1e-4 for e, _ in errors)
                and all(e <= 1e-2 for e, _ in low_out)
                and all(e <= 3e-2 for e, _ in low_grad)
            )
            failed += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} {form:10s} {variant:8s} pointwise={spec.pointwise:7s} "
                f"graph={'captured' if captured else 'none':8s} fp32 "
                + " ".join(f"{e:.1e}({k})" for e, k in errors)
                + "  bf16 outputs "
                + " ".join(f"{e:.1e}" for e, _ in low_out)
                + "  bf16 grads "
                + " ".join(f"{e:.1e}({k})" for e, k in low_grad)
                + f"  {time.perf_counter() - start:.1f}s",
                flush=True,
            )
    print(f"gpu_selfcheck: {failed} of {len(FORMS) * len(VARIANTS)} cases failed")
    return 1 if failed else 0
