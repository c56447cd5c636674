"""The fused pointwise steps of the fast mLSTM on CPU (csrc/mlstm_cpu.c): built with the system C compiler on first
use, cached, and called through ctypes.

Why: at the batch sizes of character-level training (B = 32) the pointwise math of one step is about twenty small
PyTorch kernels, each a dispatch and a pass over memory. The C loops do that math in two calls per step, forward and
backward (see the C file for what each computes). Measured (results/bench/cpu.md, cpu_no_kernel.md): the whole
training step of a 256-unit paper-form model takes 61.2 ms with the kernel and 83.2 ms without.

    MLSTM_CPU_KERNEL=auto   (default) use the kernel on CPU for float32/float64 state; if it cannot be built, say so
                            once on stderr and keep the PyTorch pointwise path (same results to rounding)
    MLSTM_CPU_KERNEL=1      require it: a build failure is an error
    MLSTM_CPU_KERNEL=0      never use it (the PyTorch path, e.g. to compare)
    MLSTM_KERNEL_CACHE=DIR  where the shared library is cached (default ~/.cache/mlstm/kernels, or $XDG_CACHE_HOME;
                            a temporary directory when that is not writable)

The library is compiled with -march=native, so its cache key includes the compiler, the flags, the source and the
CPU (model and flags from /proc/cpuinfo): a shared home directory across different machines gets one build per CPU.
The build writes to a temporary file and renames it, so concurrent processes (DDP ranks) cannot load a partial one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mlstm.errors import UserError

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("mlstm_cpu.c", "mlstm_cpu_body.h")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math")
# Threading: with -fopenmp each step's rows are split over the threads of PyTorch's own OpenMP runtime (the library
# links libgomp.so.1, which the process already has loaded through torch, so torch.set_num_threads governs both).
# A compiler without OpenMP support gets the single-threaded build (-fopenmp-simd: only the vectorisation hints).
THREADING = (("-fopenmp",), ("-fopenmp-simd",))
MODES = {"auto": "auto", "": "auto", "1": "on", "on": "on", "true": "on", "0": "off", "off": "off", "false": "off"}
FORMS = {"paper": 0, "matlab": 1, "seed": 2, "seed-gated": 3}  # the C code's form numbers
ACTIVATIONS = {"tanh": 0, "relu": 1, "identity": 2}


class Buffer(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("slots", ctypes.c_int64)]


class Segment(ctypes.Structure):
    """Mirror of `mlstm_segment` in mlstm_cpu.c (the loader checks that the sizes agree)."""

    _fields_ = (
        [(n, ctypes.c_int64) for n in ("B", "H", "KF", "K")]
        + [(n, ctypes.c_int32) for n in ("form", "act", "peep", "has_clip")]
        + [(n, ctypes.c_double) for n in ("forget_bias", "clip")]
        + [(n, Buffer) for n in ("R", "M", "G", "C", "CR", "AC", "SO", "HR")]
        + [(n, ctypes.c_void_p) for n in ("xp", "c0", "w_I", "w_F", "w_O", "b_h", "dXP", "dR", "dU", "dhr", "dc")]
    )


def env_switch(variable: str) -> str:
    """auto | on | off from an environment switch (unset or auto; 1, on, true; 0, off, false); UserError otherwise.
    Also read by `packed_gemm` (MLSTM_PACKED_GEMM)."""
    value = os.environ.get(variable, "auto").strip().lower()
    if value not in MODES:
        raise UserError(f"{variable} must be auto, 1 or 0, got {value!r}")
    return MODES[value]


def mode() -> str:
    return env_switch("MLSTM_CPU_KERNEL")


def cache_dir() -> Path:
    if os.environ.get("MLSTM_KERNEL_CACHE"):
        return Path(os.environ["MLSTM_KERNEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlstm" / "kernels"


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")  # x86 and ARM spellings
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(compiler: str | None = None) -> Path:
    """Compile the library into the cache (unless already there) and return its path; RuntimeError on failure.
    The OpenMP build is preferred; the single-threaded one is built (and afterwards found in the cache) only when
    the OpenMP build fails."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run the C compiler {compiler}: {e}") from None
    targets = [_target(version, FLAGS + threading) for threading in THREADING]
    for target in targets:
        if target.exists():
            return target
    errors = []
    for target, threading in zip(targets, THREADING):
        try:
            return _compile(compiler, FLAGS + threading, target)
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError(errors[-1])


def _target(version: str, flags: tuple[str, ...]) -> Path:
    """Where the library built with these flags is cached: the name is a hash of everything it depends on."""
    key = hashlib.sha256()
    for part in (
        version,
        " ".join(flags),
        platform.machine(),
        _cpu_identity(),
        *((SOURCE_DIR / name).read_text() for name in SOURCES),
    ):
        key.update(part.encode() + b"\0")
    name = f"mlstm_cpu-{key.hexdigest()[:16]}.so"
    target = cache_dir() / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK):
            raise PermissionError(target.parent)
    except OSError:  # a read-only home: build into a per-user temporary directory instead
        target = Path(tempfile.gettempdir()) / f"mlstm-kernels-{os.getuid()}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", tmp, str(SOURCE_DIR / "mlstm_cpu.c")], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{compiler} failed on {SOURCE_DIR / 'mlstm_cpu.c'}: {last}")
        os.replace(tmp, target)  # atomic: another process sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Kernels:
    """The loaded library: its functions per dtype, argument types set once."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.mlstm_segment_size.restype = ctypes.c_int64
        if self.lib.mlstm_segment_size() != ctypes.sizeof(Segment):
            raise RuntimeError(f"{path}: struct layout differs from the loader's ({ctypes.sizeof(Segment)} bytes)")
        self.lib.mlstm_threaded.restype = ctypes.c_int32
        self.lib.mlstm_set_flush_denormal.argtypes, self.lib.mlstm_set_flush_denormal.restype = (
            (ctypes.c_int32,),
            ctypes.c_int32,
        )
        self.threaded = bool(self.lib.mlstm_threaded())
        self.functions = {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
            fns = {}
            for stage in ("fwd_product", "fwd_cell", "bwd_cell", "bwd_product"):
                fn = getattr(self.lib, f"mlstm_{stage}_{suffix}")
                # (segment, t[, the preceding matrix product's first element]): bwd_cell follows no product
                extra = () if stage == "bwd_cell" else (ctypes.c_void_p,)
                fn.argtypes, fn.restype = (ctypes.POINTER(Segment), ctypes.c_int64, *extra), None
                fns[stage] = fn
            self.functions[dtype] = fns


_loaded: Kernels | None = None
_failure: str | None = None


def load() -> Kernels | None:
    """The kernels, or None when MLSTM_CPU_KERNEL=0 or (auto) they cannot be built (reported once on stderr)."""
    global _loaded, _failure
    wanted = mode()
    if wanted == "off":
        return None
    if _loaded is None and _failure is None:
        try:
            _loaded = Kernels(build())
        except (RuntimeError, OSError) as e:
            _failure = str(e)
            if wanted == "auto":
                print(
                    f"mlstm: fused CPU kernel unavailable ({_failure}); using the PyTorch pointwise path",
                    file=sys.stderr,
                )
    if _loaded is None and wanted == "on":
        raise UserError(f"MLSTM_CPU_KERNEL=1 but the fused CPU kernel cannot be built: {_failure}")
    return _loaded


def set_flush_denormal(on: bool) -> bool:
    """torch.set_flush_denormal for every intra-op thread, not only the calling one (which is all torch's own does:
    measured, at 2 threads half of a subnormal tensor's products stayed subnormal). With more than one thread the
    kernel library sets the flag across its OpenMP team, PyTorch's own pool; without the library the workers keep
    theirs, which the run metadata shows (runtime.flush_denormal is measured on every thread). False where the CPU
    cannot flush."""
    supported = torch.set_flush_denormal(on)
    if supported and torch.get_num_threads() > 1:
        kernels = load()
        if kernels is not None:
            kernels.lib.mlstm_set_flush_denormal(int(on))
    return supported


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernel covers CPU tensors whose state (and pointwise math) is float32 or float64."""
    return device.type == "cpu" and dtype in (torch.float32, torch.float64)


def status() -> str:
    """For run metadata: on (loaded; "on, 1 thread" without OpenMP), off (disabled), unavailable (build failed),
    unused (not yet needed)."""
    if mode() == "off":
        return "off"
    if _loaded is not None:
        return "on" if _loaded.threaded else "on, 1 thread"
    return "unavailable" if _failure is not None else "unused"


def describe(device: torch.device) -> str:
    """For run metadata: whether the fast mLSTM's pointwise math runs in the C kernel on this device (building it
    now, so that a build failure is reported before training starts)."""
    if device.type != "cpu":
        return "not applicable"
    load()
    return status()


def _ptr(v: torch.Tensor | None) -> int | None:
    return None if v is None else v.data_ptr()


def _buf(v: torch.Tensor | None) -> Buffer:
    return Buffer(None, 1) if v is None else Buffer(v.data_ptr(), v.shape[0])


class SegmentCall:
    """One segment's struct (pointers to the layer's buffers, filled once) and the per-step calls on it."""

    def __init__(self, kernels: Kernels, dtype: torch.dtype, spec, xp, buffers: dict, tensors: dict):
        T, B, K = xp.shape
        H = buffers["M"].shape[-1]
        self.seg = Segment(
            B=B,
            H=H,
            KF=K - 4 * H,
            K=K,
            form=FORMS["seed-gated" if spec.seed_output == "gated" else spec.form],
            act=ACTIVATIONS[spec.activation],
            peep=int(spec.peepholes),
            has_clip=int(spec.cell_clip is not None),
            forget_bias=spec.forget_bias,
            clip=spec.cell_clip or 0.0,
            xp=xp.data_ptr(),
            **{name: _buf(buffers.get(name)) for name in ("R", "M", "G", "C", "CR", "AC", "SO", "HR")},
            **{name: _ptr(v) for name, v in tensors.items()},
        )
        self.ref = ctypes.byref(self.seg)
        self.keep = (xp, buffers, tensors)  # the memory the pointers refer to stays alive with this object
        fns = kernels.functions[dtype]
        self._fwd_product, self._fwd_cell = fns["fwd_product"], fns["fwd_cell"]
        self._bwd_cell, self._bwd_product = fns["bwd_cell"], fns["bwd_product"]

    # The stages that follow a matrix product read it from `product`: a (B, n) tensor with contiguous rows, of the
    # segment's dtype (the output slot the product was written into, or the new tensor a packed product returns).
    def fwd_product(self, t: int, product: torch.Tensor) -> None:
        self._fwd_product(self.ref, t, product.data_ptr())

    def fwd_cell(self, t: int, product: torch.Tensor) -> None:
        self._fwd_cell(self.ref, t, product.data_ptr())

    def bwd_cell(self, t: int) -> None:
        self._bwd_cell(self.ref, t)

    def bwd_product(self, t: int, product: torch.Tensor) -> None:
        self._bwd_product(self.ref, t, product.data_ptr())
