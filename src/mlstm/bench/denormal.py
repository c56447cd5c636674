"""What subnormal floats cost a CPU run, and what flushing them to zero (`trainer.flush_denormal`) saves.

Subnormal (denormal) floats are the magnitudes below float32's smallest normal number, 1.2e-38. x86 cores handle
operations that produce them many times slower than those on normal numbers. A training run whose state saturates
or blows up fills its activations, gradients and optimizer moments with them, and its steps slow down by an order of
magnitude: in the tuned study, runs that ended far above their cell's best bpc took 1,300-4,800 s of one core for 800
steps where healthy runs of the same size took 180-300 s. Three measurements, each a markdown table:
  - `operation_table`: element-wise and matrix products with normal and with subnormal results, flushing off and on;
  - `train_step_table`: training steps from a checkpoint of such a run, flushing off and on;
  - `run_seconds_table`: the training seconds of committed runs beside their final validation bpc.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mlstm.bench.steps import TrainStep, time_steps
from mlstm.cells.kernels.cpu_kernel import set_flush_denormal
from mlstm.training.distributed import flushes_denormals
from mlstm.training.tracking import read_metrics


def _seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` calls in seconds (the least disturbed by other work on the machine), after three warm-up
    calls (the first ones also pay for fresh memory pages)."""
    return min(time_steps(fn, torch.device("cpu"), iters=repeats, warmup=3))


def operation_table(repeats: int = 5) -> str:
    """Milliseconds of an element-wise product (x * x, 1M float32 values) and a matrix product (512 x 512 @ 512 x
    512) whose inputs are all 1e-3 (normal products) or all 1e-20 (products 1e-40: subnormal), flush-to-zero off and
    on. The cost is in producing subnormal results; reading subnormal inputs was not slow on the machines measured."""
    rows = ["| operation | inputs | flush off (ms) | flush on (ms) |", "| --- | --- | --- | --- |"]
    before = flushes_denormals()
    try:
        for value, products in ((1e-3, "normal"), (1e-20, "subnormal")):
            vector = torch.full((1_000_000,), value, dtype=torch.float32)
            matrix = torch.full((512, 512), value, dtype=torch.float32)
            for name, fn in (("x * x", lambda: vector * vector), ("A @ B", lambda: matrix @ matrix)):
                cells = []
                for flush in (False, True):
                    set_flush_denormal(flush)
                    cells.append(f"{1000 * _seconds(fn, repeats):.2f}")
                rows.append(f"| {name} | {value:g} (products {products}) | {cells[0]} | {cells[1]} |")
    finally:
        set_flush_denormal(before)
    return "\n".join(rows)


def train_step_table(checkpoint: Path, steps: int = 3) -> str:
    """Seconds per training step (mlstm.bench.steps.TrainStep: forward, backward, Adam) of the checkpoint's model and
    optimizer state on one random batch of its training shape, flush-to-zero off, on, and off again (the same weights,
    moments and zero state each time)."""
    from mlstm.training.trained import load_model  # the model package is only needed here

    model, payload = load_model(checkpoint)
    trainer = OmegaConf.create(payload["config"]).trainer
    batch, length, vocab = int(trainer.batch_size), int(trainer.seq_len), int(payload["vocab_size"])
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(payload["optimizer"])
    tokens = torch.randint(0, vocab, (length + 1, batch), generator=torch.Generator().manual_seed(0))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = copy.deepcopy(optimizer.state_dict())  # state_dict() holds references to the live moments

    rows = ["| flush-to-zero | s / step |", "| --- | --- |"]
    before = flushes_denormals()
    try:
        for flush in (False, True, False):
            model.load_state_dict(weights)
            optimizer.load_state_dict(moments)
            step = TrainStep(model, optimizer, tokens, torch.device("cpu"))
            set_flush_denormal(flush)
            rows.append(f"| {'on' if flush else 'off'} | {_seconds(step, steps):.3f} |")
    finally:
        set_flush_denormal(before)
    return "\n".join(rows)


def run_seconds_table(root: Path) -> str:
    """Every run under `root` (a directory per run holding metrics.jsonl): its training seconds (`time`, which leaves
    out evaluation) at its last step and its last validation bpc, slowest first."""
    rows = []
    for metrics in sorted(root.rglob("metrics.jsonl")):
        records = read_metrics(metrics)
        timed = [r for r in records if "time" in r and "step" in r]
        valid = [r["valid/bpc"] for r in records if "valid/bpc" in r]
        if not timed or not valid:
            continue
        last = timed[-1]
        bpc = valid[-1]
        rows.append(
            (
                last["time"],
                metrics.parent.relative_to(root).as_posix(),
                last["step"],
                f"{bpc:.3f}" if math.isfinite(bpc) else "non-finite",
            )
        )
    lines = ["| run | steps | training s | last valid bpc |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {step} | {seconds:.0f} | {bpc} |" for seconds, name, step, bpc in sorted(rows, reverse=True)]
    return "\n".join(lines)


def report(checkpoint: Path | None = None, runs: Path | None = None, threads: int = 1) -> int:
    """What scripts/bench_denormal.py prints, as markdown; the exit status (2, with one `error:` line, for bad
    input)."""
    if threads < 1:
        print(f"error: --threads must be at least 1, not {threads}", file=sys.stderr)
        return 2
    for path in (checkpoint, runs):
        if path is not None and not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    torch.set_num_threads(threads)
    label = "one thread" if threads == 1 else f"{threads} threads"
    print(f"torch {torch.__version__}, {label}\n\n## Products with normal and subnormal results\n")
    print(operation_table())
    if checkpoint:
        print(f"\n## Training steps from {checkpoint}\n")
        print(train_step_table(checkpoint))
    if runs:
        print(f"\n## Runs under {runs}, slowest first\n")
        print(run_seconds_table(runs))
    return 0
