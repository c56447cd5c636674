"""The fused C pointwise steps of the fast mLSTM (`mlstm.cells.kernels.cpu_kernel`): its build and cache (OpenMP, or the
single-threaded fallback), its switch and its one-line errors, its float64 precision against the autograd reference,
and saturated and NaN inputs; and the packed products (`mlstm.cells.kernels.packed_gemm`).
(test_fast_mlstm.py runs every form and option through both pointwise paths and both kinds of product.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlstm.cells.fast_mlstm import _Products
from mlstm.cells.kernels import cpu_kernel, packed_gemm
from mlstm.errors import UserError
from test_fast_mlstm import FORMS, assert_close, inputs_for, pair, run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler: the C kernel cannot be built")


def bench(env: dict, *extra: str) -> subprocess.CompletedProcess:
    """A real, tiny run of the benchmark script (its forward and backward go through the fast layer)."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench.py"),
        "--cells",
        "mlstm-paper:fast",
        "--hidden",
        "8",
        "--batch",
        "2",
        "--seq-len",
        "3",
        "--embedding",
        "4",
        "--iters",
        "20",
        "--warmup",
        "0",
        "--no-baselines",
        "--device",
        "cpu",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT, timeout=300)


def compiler_accepts(flag: str, tmp_path: Path) -> bool:
    source = tmp_path / "probe.c"
    source.write_text("int main(void) { return 0; }\n")
    cmd = [cpu_kernel._compiler(), flag, "-o", str(tmp_path / "probe"), str(source)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.slow
def test_build_compiles_once_into_the_cache_threaded_when_the_compiler_has_openmp(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLSTM_KERNEL_CACHE", str(cache))
    path = cpu_kernel.build()
    assert path.parent == cache and path.suffix == ".so" and path.stat().st_size > 0
    stamp = path.stat().st_mtime_ns
    assert cpu_kernel.build() == path and path.stat().st_mtime_ns == stamp  # cached: not rebuilt
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary files left behind
    kernels = cpu_kernel.Kernels(path)  # loads, and its struct layout agrees with the ctypes mirror
    assert set(kernels.functions) == {torch.float32, torch.float64}
    assert kernels.threaded == compiler_accepts("-fopenmp", tmp_path)  # (one build checked for both: a build is slow)


@pytest.mark.slow
def test_a_compiler_without_openmp_gets_the_single_threaded_build_once(tmp_path, monkeypatch):
    """A real compiler behind a wrapper that rejects -fopenmp (as clang without libomp does)."""
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\n'
        f'case " $* " in *" -fopenmp "*) echo \'unsupported option -fopenmp\' >&2; exit 1;; esac\n'
        f'exec {cpu_kernel._compiler()} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("MLSTM_KERNEL_CACHE", str(tmp_path / "cache"))
    path = cpu_kernel.build(compiler=str(wrapper))
    kernels = cpu_kernel.Kernels(path)
    assert not kernels.threaded and set(kernels.functions) == {torch.float32, torch.float64}
    compiles = [ln for ln in log.read_text().splitlines() if "-o" in ln.split()]
    assert len(compiles) == 2 and "-fopenmp" in compiles[0].split() and "-fopenmp-simd" in compiles[1].split()
    assert cpu_kernel.build(compiler=str(wrapper)) == path  # from the cache: no further compile attempts
    assert len([ln for ln in log.read_text().splitlines() if "-o" in ln.split()]) == 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]


@pytest.mark.slow
def test_an_unwritable_cache_builds_into_a_temporary_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MLSTM_KERNEL_CACHE", str(blocker / "cache"))  # cannot be created
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = cpu_kernel.build()
    assert path.parent == tmp_path / "tmp" / f"mlstm-kernels-{os.getuid()}" and path.exists()


def test_a_compiler_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MLSTM_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="mlstm_cpu.c"):
        cpu_kernel.build(compiler=sys.executable)  # "compiles" with python: a real failing compiler run
    assert list(tmp_path.iterdir()) == []  # the failed build leaves nothing a later load could pick up


def test_switch_values(monkeypatch):
    for value, mode in (("auto", "auto"), ("1", "on"), ("on", "on"), ("0", "off"), ("false", "off")):
        monkeypatch.setenv("MLSTM_CPU_KERNEL", value)
        assert cpu_kernel.mode() == mode
    monkeypatch.setenv("MLSTM_CPU_KERNEL", "0")
    assert cpu_kernel.load() is None and cpu_kernel.status() == "off"


@pytest.mark.slow
def test_without_a_compiler_auto_falls_back_and_required_fails_in_one_line(tmp_path):
    env = {"CC": str(tmp_path / "no-such-cc"), "MLSTM_KERNEL_CACHE": str(tmp_path / "cache")}
    auto = bench({**env, "MLSTM_CPU_KERNEL": "auto"})
    assert auto.returncode == 0, auto.stderr
    notes = [ln for ln in auto.stderr.splitlines() if "fused CPU kernel unavailable" in ln]
    assert len(notes) == 1 and "PyTorch pointwise path" in notes[0]  # said once, and the run goes on
    assert "| mlstm-paper | fast |" in auto.stdout

    required = bench({**env, "MLSTM_CPU_KERNEL": "1"})
    assert required.returncode != 0
    assert required.stderr.strip().count("\n") == 0 and "MLSTM_CPU_KERNEL=1" in required.stderr, required.stderr
    assert "Traceback" not in required.stderr

    bad = bench({"MLSTM_CPU_KERNEL": "maybe"})
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "MLSTM_CPU_KERNEL" in bad.stderr


# ---- precision: the C exp, sigmoid and tanh in float64 against torch's, through whole layers -----------------------
@pytest.mark.parametrize("variant", ["plain", "peepholes", "all", "relu", "identity"])
@pytest.mark.parametrize("form", FORMS)
def test_float64_kernel_matches_the_reference_to_1e12(form, variant, monkeypatch):
    monkeypatch.setenv("MLSTM_CPU_KERNEL", "1")
    ref, fast = pair(form, variant, dtype=torch.float64)
    ref.train(), fast.train()
    assert fast.segment_spec("cpu").cpu_kernel
    x, h0, c0 = inputs_for(ref, T=15, B=3, dtype=torch.float64)
    x = 3.0 * x  # pre-activations over both branches of tanh (|v| below and above 1/16) and far into saturation
    assert_close(run(ref, x, h0, c0), run(fast, x, h0, c0), rtol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_saturated_gates_match_the_torch_path(form, monkeypatch):
    """Pre-activations of ±hundreds (exp's clamped range, σ at 0 and 1, tanh at ±1) give the torch path's numbers."""
    _, fast = pair(form, "peepholes")
    x, h0, c0 = inputs_for(fast, T=6, B=4, dtype=torch.float32)
    x = 300.0 * x
    results = {}
    for value in ("1", "0"):
        monkeypatch.setenv("MLSTM_CPU_KERNEL", value)
        results[value] = run(fast, x, h0, c0)
    assert all(torch.isfinite(v).all() for v in results["1"].values())
    values = ("y", "h", "c")
    assert_close(*({k: r[k] for k in values} for r in (results["0"], results["1"])), rtol=1e-5)
    # a saturated σ' = y (1 - y) is resolved only to float32's spacing below 1 (6e-8) in either path, so each
    # saturated unit's gradient carries a rounding of its own order: the gradients agree more loosely
    assert_close(*({k: v for k, v in r.items() if k not in values} for r in (results["0"], results["1"])), rtol=1e-3)


@pytest.mark.parametrize("form", FORMS)
def test_a_nan_input_reaches_the_output(form, monkeypatch):
    """The trainer's divergence guard looks for non-finite losses: the C exp must not turn a NaN into a number."""
    monkeypatch.setenv("MLSTM_CPU_KERNEL", "1")
    _, fast = pair(form, "all")
    x, h0, c0 = inputs_for(fast, T=4, B=2, dtype=torch.float32)
    x[1, 0] = float("nan")
    with torch.no_grad():
        y, (h, c) = fast(x, (h0, c0))
    assert torch.isfinite(y[0]).all()  # before the NaN
    assert torch.isnan(y[1:, 0]).any() and torch.isnan(c[0]).all()  # the poisoned stream, from then on
    assert torch.isfinite(y[:, 1]).all()  # the other stream is untouched


# ---- MKL's packed products -------------------------------------------------------------------------------------------
needs_packed = pytest.mark.skipif(not packed_gemm.available(), reason="this PyTorch build has no MKL packed GEMM")


@needs_packed
def test_packed_product_equals_mm_for_strided_rows_and_other_batches():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 40, generator=g)  # L (N, K): the product is a @ L^T
    rows = torch.randn(32, 100, generator=g)[:, 10:50]  # strided rows, as a column slice of a (B, K) buffer
    packed = packed_gemm.PackedWeight(W.t().contiguous().t(), batch=32)  # a transposed view is accepted
    out = packed.product(rows)
    assert out.shape == (32, 96) and out.is_contiguous()  # the C kernel reads it by pointer
    torch.testing.assert_close(out, rows @ W.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.product(rows[:7]), rows[:7] @ W.t(), rtol=1e-5, atol=1e-5)  # not the packed B


def test_the_availability_probe_leaves_the_global_rng_alone(monkeypatch):
    """It runs lazily, at a run's first segment or metadata: a draw there would shift every later dropout mask
    (and break exact resume, which restores the RNG before that first segment)."""
    monkeypatch.setattr(packed_gemm, "_available", None)
    state = torch.random.get_rng_state()
    packed_gemm.available()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_packed_switch_and_where_it_applies(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("MLSTM_PACKED_GEMM", "0")
    assert not packed_gemm.applies(cpu, torch.float32) and packed_gemm.describe(cpu) == "off"
    monkeypatch.setenv("MLSTM_PACKED_GEMM", "auto")
    assert packed_gemm.applies(cpu, torch.float32) == packed_gemm.available()
    assert not packed_gemm.applies(cpu, torch.float64)  # MKL packs float32 only: float64 keeps torch.mm
    assert not packed_gemm.applies(torch.device("cuda"), torch.float32)
    assert packed_gemm.describe(torch.device("cuda")) == "not applicable"
    products = _Products(torch.float32, torch.float32, cpu, batch=32)  # which weights the fast layer packs
    assert isinstance(products.operand(torch.zeros(1024, 256)), packed_gemm.PackedWeight) == packed_gemm.available()
    assert not isinstance(products.operand(torch.zeros(256, 256)), packed_gemm.PackedWeight)  # 2^16: torch.mm wins
    monkeypatch.setenv("MLSTM_PACKED_GEMM", "maybe")
    with pytest.raises(UserError, match="MLSTM_PACKED_GEMM"):
        packed_gemm.mode()


def test_packed_required_without_the_ops_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(packed_gemm, "_available", False)  # as on a build without MKL (e.g. aarch64)
    monkeypatch.setenv("MLSTM_PACKED_GEMM", "1")
    with pytest.raises(UserError, match="MLSTM_PACKED_GEMM=1"):
        packed_gemm.applies(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("MLSTM_PACKED_GEMM", "auto")
    assert not packed_gemm.applies(torch.device("cpu"), torch.float32)  # auto: torch.mm, silently


@pytest.mark.slow
def test_bench_rows_record_both_switches(tmp_path):
    out = tmp_path / "rows.json"
    run = bench({"MLSTM_PACKED_GEMM": "0", "MLSTM_CPU_KERNEL": "0"}, "--iters", "1", "--json", str(out))
    assert run.returncode == 0, run.stderr
    row = json.loads(out.read_text())[0]
    assert row["packed_gemm"] == "off" and row["cpu_kernel"] == "off"
    assert "packed GEMM off" in run.stdout and "fused CPU kernel off" in run.stdout


@pytest.mark.slow
@needs_packed
def test_bench_products_script_writes_its_table_and_rejects_bad_input(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "bench_products.py")]
    out = tmp_path / "products.md"
    done = subprocess.run(
        [*script, "--hidden", "8,300", "--iters", "2", "--warmup", "0", "--markdown", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| 8 |") or ln.startswith("| 300 |")]
    assert len(rows) == 8 and all("| True | True |" in ln for ln in rows)  # repeatable, thread-independent
    assert "(32, 300) x (300, 1200)" in out.read_text()
    bad = subprocess.run([*script, "--hidden", "x"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "--hidden" in bad.stderr
