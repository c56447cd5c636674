"""Speed benchmark of one training step of the whole CharLM: the library behind `scripts/bench.py` / `make bench`.

One *row* = one cell spec (`lstm:cudnn`, `mlstm-paper:fast`, ...) at one size (H, B, T, embedding E, vocabulary V).
Its model is built exactly as `make train` builds it (`load_config` + `build_model`, one layer), its step is the
trainer's step without the host syncs for logging:

    autocast(dtype) forward of (T, B) random tokens ─► cross_entropy_nats ─► zero_grad ─► backward
    (GradScaler for fp16) ─► clip_grad_norm_(optim.grad_clip) ─► optimizer.step ─► scheduler.step
    ─► state detached and carried to the next step

timed with `time.perf_counter` between device synchronisations, `warmup` untimed steps first, then the median of
`iters` timed steps. Random tokens cost the same as text: no kernel depends on the values.

Model FLOPs per step (analytic, matrix products only, as "model FLOPs utilisation" counts them; pointwise math,
softmax and the optimizer are left out). Multiply-adds per character, I = E (or V with one-hot input):

    lstm            4H·I (W_x)               + 4H·H (W_h)
    mlstm paper     5H·I (W_mx, W_x)          + 5H·H (W_mh, W_m)
    mlstm matlab    5H·I                      + 5H·H                      (same products as paper)
    mlstm seed      6H·I (A_x, W_x)           + 6H·H (A_h, W_m)           (the factor map A is 2H wide)
    every model     + V·H (decoder);  the embedding lookup is no product

    forward FLOPs = 2 · MACs · B · T;   backward ≈ 2 × forward (input and weight gradients);   step = 3 × forward

Peak memory: on CUDA `torch.cuda.max_memory_allocated` after a reset at the start of the row (weights, gradients,
Adam moments, activations: the whole step's footprint). On CPU the peak resident set size of the process during the
row minus the resident size at its start (Linux: the high-water mark is reset through /proc/self/clear_refs and read
with `resource.getrusage`); approximate: it includes allocator caching and any other allocation of the process, and
memory freed by an earlier row and reused is not counted.

Ratios: every row is compared with torch.nn.LSTM (`lstm:cudnn`) of the same size (`ratio_lstm_same_hidden` =
ms / ms of nn.LSTM at the same H) and of the same parameter count (`ratio_lstm_same_params`, nn.LSTM with the hidden
size `lstm_hidden_same_params` whose whole-model parameter count is closest to this row's); both baselines are timed in
the same run (rows with role "baseline" when not asked for). On CUDA that hidden size is rounded to a multiple of
CUDA_HIDDEN_MULTIPLE (64), the one of the two neighbouring multiples whose parameter count is closer: cuDNN runs an
LSTM on tensor cores only at aligned sizes, and an unaligned baseline measures that instead of the cells (nn.LSTM at
H=2294 took 33.6 ms/step on an H200 where H=2048 took 13.7, results/bench/gpu.md). A fast mLSTM row gets
`speedup_vs_reference` = ms of the same cell with impl=reference / its ms, when that row was asked for.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mlstm.cells import fast_mlstm
from mlstm.cells.common import FORMS, IMPLS
from mlstm.errors import UserError

DTYPES = ("fp32", "bf16", "fp16")
BASELINE = "lstm:cudnn"  # torch.nn.LSTM: cuDNN on CUDA, oneDNN on CPU
REQUIRED_KEYS = ("cell", "impl", "hidden", "batch", "seq_len", "device", "ms_per_step", "chars_per_s")
_SPEC = re.compile(r"^(?P<name>mlstm|lstm)(?:-(?P<form>[a-z]+))?:(?P<impl>[a-z]+)$")


# ---------------------------------------------------------------------------------------------------- what a row is
@dataclass(frozen=True)
class CellSpec:
    """`name[-form]:impl`, e.g. `lstm:cudnn`, `mlstm-paper:fast`, `mlstm-seed:reference` (`mlstm:fast` = paper)."""

    name: str  # "mlstm" | "lstm"
    form: str | None  # mlstm: "paper" | "matlab" | "seed"; lstm: None
    impl: str  # mlstm: "fast" | "reference"; lstm: "cudnn" | "loop"

    @classmethod
    def parse(cls, text: str) -> CellSpec:
        match = _SPEC.match(text.strip())
        if not match:
            raise UserError(f"cell spec {text!r} is not name[-form]:impl, e.g. lstm:cudnn or mlstm-paper:fast")
        name, form, impl = match["name"], match["form"], match["impl"]
        if name == "lstm" and form:
            raise UserError(f"cell spec {text!r}: lstm has no form; use lstm:cudnn or lstm:loop")
        if name == "mlstm":
            form = form or "paper"
            if form not in FORMS:
                raise UserError(f"cell spec {text!r}: form must be one of {', '.join(FORMS)}")
        if impl not in IMPLS[name]:
            raise UserError(f"cell spec {text!r}: impl must be one of {', '.join(IMPLS[name])} for {name}")
        return cls(name, form, impl)

    @property
    def cell(self) -> str:
        return f"{self.name}-{self.form}" if self.form else self.name

    @property
    def label(self) -> str:
        return f"{self.cell}:{self.impl}"


@dataclass(frozen=True)
class Shape:
    hidden: int  # H, units of the (single) recurrent layer
    batch: int  # B streams
    seq_len: int  # T characters per segment (truncated BPTT length)
    embedding: int  # E; 0 = one-hot input
    vocab: int  # V symbols

    @property
    def input_size(self) -> int:
        return self.embedding or self.vocab

    @property
    def chars(self) -> int:
        return self.batch * self.seq_len


@dataclass(frozen=True)
class Row:
    spec: CellSpec
    shape: Shape


@dataclass(frozen=True)
class Settings:
    """What every row of a run shares."""

    device: torch.device
    dtype: str = "fp32"  # autocast precision, as trainer.precision (weights and state stay fp32)
    threads: int | None = None  # torch.set_num_threads; None = torch's default
    iters: int = 20  # timed steps (the median is reported)
    warmup: int = 3  # untimed steps first (allocator, kernel choice, Adam state creation)
    tf32: bool = False  # TF32 for fp32 products on CUDA (off unless asked, so fp32 means fp32)
    optim: str | None = None  # `optim/` config choice; None = the train config's default (adam_linear)
    init: str | None = None  # cell.init; None = the cell config's (orthogonal: float64 SVDs, slow to BUILD at H=4096)
    seed: int = 0


# ---------------------------------------------------------------------------------------------------- models
@cache
def _base_config(name: str, optim: str | None):
    from mlstm.config import load_config

    overrides = [f"cell={name}"] + ([f"optim={optim}"] if optim else [])
    return load_config(overrides)


def row_config(spec: CellSpec, hidden: int, embedding: int, optim: str | None = None, init: str | None = None):
    """The composed train config of one row: `cell=<name> cell.form=.. cell.impl=.. cell.hidden_size=H
    model.embedding_size=E [cell.init=..] [optim=..]` (one layer, no dropout), as `make train ARGS=...` composes it."""
    cfg = OmegaConf.create(OmegaConf.to_container(_base_config(spec.name, optim), resolve=False))
    cfg.cell.form = spec.form
    cfg.cell.impl = spec.impl
    cfg.cell.hidden_size = int(hidden)
    cfg.model.embedding_size = int(embedding)
    if init is not None:
        cfg.cell.init = init
    return cfg


def build_row_model(spec: CellSpec, shape: Shape, optim: str | None = None, init: str | None = None):
    from mlstm.model import build_model

    return build_model(row_config(spec, shape.hidden, shape.embedding, optim, init), shape.vocab)


@cache
def count_parameters(spec: CellSpec, shape: Shape) -> int:
    """Whole-model parameter count (embedding, layer, decoder), built on the meta device (no memory, no init)."""
    from mlstm.model import num_parameters

    with torch.device("meta"):
        return num_parameters(build_row_model(spec, shape))


def equal_parameter_hidden(target: int, shape: Shape, spec: CellSpec | str = BASELINE) -> tuple[int, int]:
    """(H', parameter count) of `spec` (default nn.LSTM) at B, T, E, V of `shape` whose whole-model parameter count
    is closest to `target`. The count grows with H, so a bisection finds the first H with count >= target."""
    spec = CellSpec.parse(spec) if isinstance(spec, str) else spec
    count = lambda h: count_parameters(spec, replace(shape, hidden=h))  # noqa: E731
    lo, hi = 1, max(2, shape.hidden)
    while count(hi) < target:
        hi *= 2
    while lo < hi:  # first h in [lo, hi] with count(h) >= target
        mid = (lo + hi) // 2
        if count(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best = min((h for h in (lo - 1, lo) if h >= 1), key=lambda h: (abs(count(h) - target), h))
    return best, count(best)


CUDA_HIDDEN_MULTIPLE = 64  # cuDNN's LSTM uses tensor cores when the hidden size is a multiple of this


def baseline_multiple(device: torch.device | str) -> int:
    """The multiple the equal-parameter nn.LSTM's hidden size is rounded to: 64 on CUDA, 1 (no rounding) elsewhere."""
    kind = device.type if isinstance(device, torch.device) else str(device)
    return CUDA_HIDDEN_MULTIPLE if kind == "cuda" else 1


def same_params_hidden(target: int, shape: Shape, multiple: int = 1) -> tuple[int, int]:
    """(H, parameter count) of the equal-parameter nn.LSTM baseline: the closest count (`equal_parameter_hidden`),
    then, when `multiple` > 1, the multiple of it below or above that H whose count is closer to `target`."""
    hidden, count = equal_parameter_hidden(target, shape)
    if multiple <= 1 or hidden % multiple == 0:
        return hidden, count
    lstm = CellSpec.parse(BASELINE)
    below = max(multiple, hidden // multiple * multiple)
    above = below + multiple if below < hidden else below
    counts = {h: count_parameters(lstm, replace(shape, hidden=h)) for h in (below, above)}
    best = min(counts, key=lambda h: (abs(counts[h] - target), h))
    return best, counts[best]


# ---------------------------------------------------------------------------------------------------- FLOPs
def matmul_macs_per_char(spec: CellSpec, shape: Shape) -> int:
    """Multiply-adds of the matrix products per character in the forward pass (module docstring)."""
    H, I, V = shape.hidden, shape.input_size, shape.vocab
    width = 4 if spec.name == "lstm" else 6 if spec.form == "seed" else 5  # rows of the stacked products, in H
    return width * H * I + width * H * H + V * H


def flops_per_step(spec: CellSpec, shape: Shape) -> int:
    """Model FLOPs of one training step: 3 × (2 · MACs · B · T) (forward + backward at twice the forward)."""
    return 3 * 2 * matmul_macs_per_char(spec, shape) * shape.chars


# ---------------------------------------------------------------------------------------------------- environment
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu or --device auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be one of cpu, cuda, auto, got {name!r}")
    return torch.device(name)


def apply_settings(settings: Settings) -> None:
    """Threads and TF32 flags, set explicitly (TF32 off unless asked: cuDNN's own default is on)."""
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    torch.backends.cudnn.allow_tf32 = settings.tf32


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def git_commit() -> str | None:
    """HEAD of the checkout, or MLSTM_GIT_COMMIT when set (a copy of the tree whose git metadata is missing or not
    that of the code, e.g. a working tree sent to a GPU machine)."""
    if os.environ.get("MLSTM_GIT_COMMIT"):
        return os.environ["MLSTM_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def onednn_version() -> str | None:
    """oneDNN (MKL-DNN) version from torch's build configuration: nn.LSTM's CPU kernels."""
    found = re.search(r"(?:MKL-DNN|oneDNN) v([\d.]+)", torch.__config__.show())
    return found.group(1) if found and torch.backends.mkldnn.is_available() else None


def environment(settings: Settings) -> dict:
    """Recorded in every row: versions, flags, threads, device."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device_name": device_name(settings.device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn,
        "onednn_version": onednn_version(),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "threads": torch.get_num_threads(),
        **fast_mlstm.kernel_status(settings.device),  # what the fast mLSTM runs on (its kernels, graphs)
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """The trainer's step (forward, loss, backward, clip, optimizer and schedule) on fixed tokens, state carried (and
    detached) from one call to the next: a benchmark row's fresh model (`for_row`), or any model and optimizer
    (mlstm.bench.denormal times a checkpoint's)."""

    def __init__(
        self,
        model,
        optimizer,
        tokens: torch.Tensor,
        device: torch.device,
        precision: str = "fp32",
        clip: float = math.inf,
        scheduler=None,
    ):
        from mlstm.model import detach_state

        self._detach = detach_state
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.precision, self.clip = device, precision, clip
        self.model.train()
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.x, self.y = tokens[:-1].to(device), tokens[1:].to(device)  # (T, B) inputs and next-character targets
        self.state = model.init_state(self.x.shape[1], device)

    @classmethod
    def for_row(cls, spec: CellSpec, shape: Shape, settings: Settings) -> TrainStep:
        from mlstm.training.optim import build_optimizer

        torch.manual_seed(settings.seed)
        cfg = row_config(spec, shape.hidden, shape.embedding, settings.optim, settings.init)
        model = build_row_model(spec, shape, settings.optim, settings.init).to(settings.device)
        optimizer, scheduler = build_optimizer(cfg.optim, model.parameters())
        clip = cfg.optim.get("grad_clip")
        generator = torch.Generator().manual_seed(settings.seed)
        tokens = torch.randint(shape.vocab, (shape.seq_len + 1, shape.batch), generator=generator)
        # the trainer computes the gradient norm even without clipping: so does the step (clip = inf)
        return cls(
            model, optimizer, tokens, settings.device, settings.dtype, float(clip) if clip else math.inf, scheduler
        )

    def __call__(self) -> None:
        from mlstm.evaluate import autocast, cross_entropy_nats

        with autocast(self.device, self.precision):
            logits, state = self.model(self.x, self.state)  # (T, B, V)
        loss = cross_entropy_nats(logits, self.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.state = self._detach(state)


def time_steps(step: Callable[[], None], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Seconds of each of `iters` steps after `warmup` untimed ones, the device synchronised around every timer."""
    for _ in range(warmup):
        step()
    synchronize(device)
    gc.collect()
    seconds = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


class PeakMemory:
    """Peak memory of a row in MiB (module docstring): CUDA allocator peak, or CPU peak-RSS growth (approximate)."""

    def __init__(self, device: torch.device):
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda_max_allocated"
            return
        try:  # Linux: writing 5 resets the peak RSS (VmHWM) that getrusage reports to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "cpu_peak_rss_delta"
        except OSError:
            self.kind = "cpu_maxrss_growth"  # lower bound: only what exceeds the process's earlier peak
        self.start_kib = self._maxrss_kib()

    @staticmethod
    def _maxrss_kib() -> int:
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return value // 1024 if sys.platform == "darwin" else value  # macOS reports bytes, Linux KiB

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(0, self._maxrss_kib() - self.start_kib) / 1024


def measure(row: Row, settings: Settings) -> dict:
    """Build, warm up and time one row; returns its measured fields (ms, chars/s, memory, FLOP/s, params)."""
    spec, shape = row.spec, row.shape
    memory = PeakMemory(settings.device)
    step = TrainStep.for_row(spec, shape, settings)
    try:
        seconds = time_steps(step, settings.device, settings.iters, settings.warmup)
        peak = memory.peak_mib()
    finally:
        del step
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    median = statistics.median(seconds)
    quartiles = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else [median] * 3
    flops = flops_per_step(spec, shape)
    return {
        "ms_per_step": median * 1e3,
        "ms_q1": quartiles[0] * 1e3,
        "ms_q3": quartiles[2] * 1e3,
        "ms_min": min(seconds) * 1e3,
        "chars_per_s": shape.chars / median,
        "peak_mem_mib": peak,
        "peak_mem_kind": memory.kind,
        "flops_per_step": flops,
        "tflops": flops / median / 1e12,
    }


# ---------------------------------------------------------------------------------------------------- a whole run
@dataclass
class Result:
    row: Row
    role: str  # "requested" | "baseline" (timed only to compare with)
    measured: dict = field(default_factory=dict)
    error: str | None = None
    timestamp: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def ms(self) -> float | None:
        return self.measured.get("ms_per_step")


def plan(requested: Iterable[Row], baselines: bool = True, multiple: int = 1) -> list[tuple[Row, str]]:
    """The rows to time, in order: the requested ones (duplicates dropped), then the nn.LSTM baselines they need
    that were not requested (same H, and the hidden size of equal parameter count, rounded to `multiple`:
    `baseline_multiple(device)`)."""
    order: dict[Row, str] = {}
    for row in requested:
        order.setdefault(row, "requested")
    if baselines:
        lstm = CellSpec.parse(BASELINE)
        for row in list(order):
            same_params = same_params_hidden(count_parameters(row.spec, row.shape), row.shape, multiple)[0]
            for hidden in (row.shape.hidden, same_params):
                order.setdefault(Row(lstm, replace(row.shape, hidden=hidden)), "baseline")
    return list(order.items())


def run(
    rows: list[tuple[Row, str]],
    settings: Settings,
    on_result: Callable[[list[dict]], None] | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[dict]:
    """Time every row; after each, `on_result(table)` gets the table so far (so a killed run leaves its rows)."""
    apply_settings(settings)
    env = environment(settings)
    results: list[Result] = []
    for index, (row, role) in enumerate(rows, 1):
        result = Result(row, role)
        try:
            result.measured = measure(row, settings)
        except Exception as error:  # one row out of memory or unsupported must not lose the others
            result.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            gc.collect()
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        s = row.shape
        what = result.error or (
            f"{result.ms:.2f} ms/step, {result.measured['chars_per_s']:,.0f} chars/s, "
            f"{result.measured['tflops']:.3g} TFLOP/s"
        )
        log(
            f"[{index}/{len(rows)}] {row.spec.label} H={s.hidden} B={s.batch} T={s.seq_len} E={s.embedding} "
            f"V={s.vocab} {settings.dtype} ({role}): {what}"
        )
        if on_result is not None:
            on_result(table(results, settings, env))
    return table(results, settings, env)


def table(results: list[Result], settings: Settings, env: dict) -> list[dict]:
    """One dict per timed row, with the ratio columns filled from the other rows of the run."""
    by_row = {r.row: r for r in results}
    lstm = CellSpec.parse(BASELINE)

    def ms_of(row: Row) -> float | None:
        found = by_row.get(row)
        return found.ms if found is not None else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    rows = []
    for r in results:
        spec, shape = r.row.spec, r.row.shape
        params = count_parameters(spec, shape)
        h_exact = equal_parameter_hidden(params, shape)[0]
        h_eq, params_eq = same_params_hidden(params, shape, baseline_multiple(settings.device))
        same_h, same_p = ms_of(Row(lstm, shape)), ms_of(Row(lstm, replace(shape, hidden=h_eq)))
        reference = ms_of(Row(replace(spec, impl="reference"), shape)) if spec.impl == "fast" else None
        rows.append(
            {
                "cell": spec.cell,
                "impl": spec.impl,
                "name": spec.name,
                "form": spec.form,
                "spec": spec.label,
                "role": r.role,
                "hidden": shape.hidden,
                "batch": shape.batch,
                "seq_len": shape.seq_len,
                "embedding": shape.embedding,
                "vocab": shape.vocab,
                "dtype": settings.dtype,
                "device": settings.device.type,
                "iters": settings.iters,
                "warmup": settings.warmup,
                "optim": settings.optim or "default",
                "init": settings.init or "default",
                "params": params,
                "ms_per_step": r.ms,
                "ms_q1": r.measured.get("ms_q1"),
                "ms_q3": r.measured.get("ms_q3"),
                "ms_min": r.measured.get("ms_min"),
                "chars_per_s": r.measured.get("chars_per_s"),
                "peak_mem_mib": r.measured.get("peak_mem_mib"),
                "peak_mem_kind": r.measured.get("peak_mem_kind"),
                "flops_per_step": flops_per_step(spec, shape),
                "tflops": r.measured.get("tflops"),
                "lstm_ms_same_hidden": same_h,
                "ratio_lstm_same_hidden": ratio(r.ms, same_h),
                "lstm_hidden_same_params": h_eq,
                "lstm_hidden_closest_params": h_exact,  # before rounding to lstm_hidden_multiple
                "lstm_hidden_multiple": baseline_multiple(settings.device),
                "lstm_params_same_params": params_eq,
                "params_rel_diff": (params_eq - params) / params,
                "lstm_ms_same_params": same_p,
                "ratio_lstm_same_params": ratio(r.ms, same_p),
                "reference_ms": reference,
                "speedup_vs_reference": ratio(reference, r.ms),
                "error": r.error,
                "timestamp": r.timestamp,  # UTC, when the row started
                **env,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------- markdown
def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def same_params_rule(multiple: int) -> str:
    """The line under a table's header that says how the equal-parameter nn.LSTM was chosen."""
    rule = "LSTM H same params: the nn.LSTM hidden size whose whole-model parameter count is closest to the row's"
    if multiple > 1:
        return (
            f"{rule}, rounded to a multiple of {multiple} (the neighbouring multiple with the closer count), "
            f"where cuDNN runs an LSTM on tensor cores; unrounded, its time would measure cuDNN's misalignment, "
            f"not the cells."
        )
    return rule + " (no rounding off CUDA)."


def markdown(rows: list[dict], with_header: bool = True) -> str:
    """A markdown table of the rows (and a line saying where and how they were measured)."""
    lines = []
    if rows and with_header:
        r = rows[0]
        lines += [
            f"Measured on {r['device_name']} ({r['device']}), torch {r['torch_version']}, cuDNN {r['cudnn_version']}, "
            f"oneDNN {r['onednn_version']}, {r['threads']} threads, TF32 matmul/cuDNN {r['tf32_matmul']}/"
            f"{r['tf32_cudnn']}, {r['dtype']}, fused CPU kernel {r.get('cpu_kernel', 'unknown')}, "
            f"packed GEMM {r.get('packed_gemm', 'unknown')}, Triton kernel {r.get('triton_kernel', 'unknown')}, "
            f"CUDA graphs {r.get('cuda_graph', 'unknown')}, optimizer "
            f"{r['optim']}, init {r['init']}; median of {r['iters']} "
            f"steps after {r['warmup']} warm-up; "
            f"commit {(r['git_commit'] or 'unknown')[:12]}, {r['timestamp']}.",
            "",
            same_params_rule(r.get("lstm_hidden_multiple", 1)),
            "",
        ]
    lines += [
        "| cell | impl | H | B | T | E | V | params | ms/step | chars/s | peak MiB | TFLOP/s | × LSTM same H "
        "| LSTM H same params | × LSTM same params | speed-up vs reference | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- |",
    ]
    for r in rows:
        note = (r["error"] or ("baseline" if r["role"] == "baseline" else ""))[:160].replace("|", "\\|")
        lines.append(
            f"| {r['cell']} | {r['impl']} | {r['hidden']} | {r['batch']} | {r['seq_len']} | {r['embedding']} "
            f"| {r['vocab']} | {r['params']:,} | {_num(r['ms_per_step'], '.2f')} | {_num(r['chars_per_s'], ',.0f')} "
            f"| {_num(r['peak_mem_mib'], ',.0f')} | {_num(r['tflops'], '.3g')} "
            f"| {_num(r['ratio_lstm_same_hidden'], '.2f')} | {r['lstm_hidden_same_params']} "
            f"| {_num(r['ratio_lstm_same_params'], '.2f')} | {_num(r['speedup_vs_reference'], '.2f')} | {note} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- presets
CPU_CELLS = (
    "lstm:cudnn",
    "mlstm-paper:fast",
    "mlstm-paper:reference",
    "mlstm-seed:fast",
    "mlstm-matlab:fast",
    "lstm:loop",
)


@dataclass(frozen=True)
class Group:
    """Cells × hidden sizes at one B, T, E, V."""

    cells: tuple[str, ...]
    hidden: tuple[int, ...]
    batch: int
    seq_len: int
    embedding: int
    vocab: int

    def rows(self) -> list[Row]:
        shapes = [Shape(h, self.batch, self.seq_len, self.embedding, self.vocab) for h in self.hidden]
        return [Row(CellSpec.parse(c), s) for s in shapes for c in self.cells]


# Run-wide settings and the groups of each preset (the targets of the speed issue; see results/bench/README.md).
PRESETS: dict[str, dict] = {
    "cpu": {  # 2 threads, B=32, T=100, embedding 128, enwik8's 205 symbols, fp32
        "device": "cpu",
        "dtype": "fp32",
        "threads": 2,
        "groups": (Group(CPU_CELLS, (256, 512), 32, 100, 128, 205),),
    },
    "gpu": {  # one GPU, bf16: H 1024/2048 at B=128, T=200; the 4096-unit NVIDIA-style model (E=64, 256 bytes).
        # init torch: the orthogonal init's float64 SVDs of up to 18k x 4.6k matrices would take minutes of CPU time
        # to build the rows (not timed, and the values do not change the speed)
        "device": "cuda",
        "dtype": "bf16",
        "threads": None,
        "init": "torch",
        "groups": (
            Group(("lstm:cudnn", "mlstm-paper:fast", "mlstm-seed:fast"), (1024, 2048), 128, 200, 128, 205),
            Group(("mlstm-paper:fast",), (4096,), 128, 200, 64, 256),
        ),
    },
}
DEFAULT_GROUP = Group(("lstm:cudnn", "mlstm-paper:fast"), (256,), 32, 100, 128, 205)


def groups_for(preset: str | None, **overrides) -> list[Group]:
    """The preset's groups (or the default group) with every non-None override (cells, hidden, batch, seq_len,
    embedding, vocab) applied to each group."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    groups = PRESETS[preset]["groups"] if preset else (DEFAULT_GROUP,)
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key in ("batch", "seq_len", "vocab"):
        if key in changes and changes[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {changes[key]}")
    if "embedding" in changes and changes["embedding"] < 0:
        raise UserError(f"--embedding must be 0 (one-hot) or positive, got {changes['embedding']}")
    if any(h < 1 for h in changes.get("hidden", ())):
        raise UserError(f"--hidden sizes must be positive integers, got {changes['hidden']}")
    groups = [replace(g, **changes) for g in groups]
    for g in groups:
        for c in g.cells:
            CellSpec.parse(c)  # fail before timing anything
    return groups
