"""End to end on real text: `train(cfg)` on the enwik8 sample learns, logs, checkpoints and resumes exactly."""

import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from mlstm.cells.kernels import cpu_kernel
from mlstm.config import load_config
from mlstm.errors import UserError
from mlstm.training.tracking import read_metrics
from mlstm.training.trainer import train

UNIGRAM_ENTROPY_ENWIK8_SAMPLE = 5.07  # bits/char, ../shared/data/README.md

# a tiny CPU run: 16 streams x 50 characters, 64 units, validation on the first 20k characters
SMALL = [
    "trainer=cpu",
    "trainer.batch_size=16",
    "trainer.seq_len=50",
    "cell.hidden_size=64",
    "trainer.eval_chars=20000",
    "trainer.test_chars=20000",
    "trainer.eval_batch_size=8",
    "trainer.progress=false",
    "optim.lr=3e-3",
    "optim.schedule=constant",
]


def small_config(sample, *overrides, logger="none"):
    return load_config(["dataset=file", f"dataset.path={sample}", f"logger={logger}", *SMALL, *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("cell", [["cell=mlstm"], ["cell=lstm"]], ids=["mlstm", "lstm"])
def test_small_model_learns_real_text_below_unigram_entropy(enwik8_sample, tmp_path, cell):
    cfg = small_config(enwik8_sample, *cell, "trainer.max_steps=200", "trainer.eval_every=100")
    result = train(cfg, run_dir=tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    valid = [r["valid/bpc"] for r in records if "valid/bpc" in r]
    assert len(valid) == 2
    assert valid[-1] < UNIGRAM_ENTROPY_ENWIK8_SAMPLE - 0.3, valid  # learns more than byte frequencies
    assert valid[-1] < valid[0]
    assert math.isfinite(result["test/bpc"]) and result["test/bpc"] < UNIGRAM_ENTROPY_ENWIK8_SAMPLE
    train_records = [r for r in records if "train/bpc" in r]
    assert [r["step"] for r in train_records] == list(range(10, 201, 10))
    assert all(r["chars"] == r["step"] * 16 * 50 for r in records)
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    assert result["num_parameters"] > 0


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_keys(enwik8_sample, tmp_path):
    cfg = small_config(enwik8_sample, "trainer.max_steps=20", "trainer.eval_every=10", logger="wandb")
    train(cfg, run_dir=tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (run_file,) = runs[0].glob("run-*.wandb")
    # the run file is W&B's record log; history keys are stored as plain UTF-8 strings inside its records
    content = run_file.read_bytes()
    for key in (b"train/bpc", b"valid/bpc", b"test/bpc", b"train/lr", b"perf/chars_per_s", b"chars"):
        assert key in content, key
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() in runs[0].name


def test_cold_start_check_reads_the_test_split_as_streams_from_zero_states(enwik8_sample, tmp_path):
    """With as many cold-start streams as test streams, the check is the test pass itself, stream by stream."""
    cfg = small_config(
        enwik8_sample, "trainer.max_steps=30", "trainer.eval_every=30", "trainer.cold_start_streams=8"
    )  # SMALL tests on 20k characters as 8 streams
    result = train(cfg, run_dir=tmp_path)
    (last,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "test/bpc" in r]
    assert last["step"] == 30 and len(last["test/cold_start_stream_bpc"]) == 8
    assert last["test/cold_start_bpc"] == pytest.approx(result["test/bpc"], rel=1e-6)
    assert sum(last["test/cold_start_stream_bpc"]) / 8 == pytest.approx(result["test/bpc"], abs=1e-4)
    # more streams than the test characters hold: refused before any training, in one line
    with pytest.raises(UserError, match="trainer.cold_start_streams=1000 streams"):
        train(small_config(enwik8_sample, "trainer.cold_start_streams=1000"), run_dir=tmp_path / "short")
    assert not (tmp_path / "short" / "metrics.jsonl").exists()


def unflushed_products(threads: int) -> int:
    """How many of float32 subnormals times one stay nonzero, over enough elements (64k per thread) that PyTorch
    splits the product over its threads. Written as bits: a float 1e-39 converted on a flushing thread is already 0."""
    subnormals = torch.full((65536 * threads,), 0x000FFFFF, dtype=torch.int32).view(torch.float32)
    return int(((subnormals * 1.0) != 0).sum())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("flush", [True, False])
def test_subnormal_floats_are_flushed_as_configured_and_logged(enwik8_sample, tmp_path, flush, threads):
    """trainer.flush_denormal sets the CPU's flush-to-zero mode either way (never inherited from an earlier run in
    the same process) on every intra-op thread, and config.yaml's runtime says what the arithmetic then does,
    measured. At 2 threads the pool exists before the run sets the flag (as in any process that computed before):
    torch.set_flush_denormal alone leaves the worker thread's half of the products subnormal."""
    if threads > 1 and cpu_kernel.load() is None:
        pytest.skip("the flag reaches PyTorch's worker threads through the fused CPU kernel library, not built here")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cpu_kernel.set_flush_denormal(not flush)  # the opposite of what the run asks for, on every thread
    assert unflushed_products(threads) == (0 if not flush else 65536 * threads)  # the pool is up, set the other way
    try:
        train(
            small_config(
                enwik8_sample,
                "trainer.max_steps=2",
                "trainer.eval_every=2",
                f"trainer.threads={threads}",
                f"trainer.flush_denormal={str(flush).lower()}",
            ),
            run_dir=tmp_path,
        )
        assert unflushed_products(threads) == (0 if flush else 65536 * threads)
        assert OmegaConf.load(tmp_path / "config.yaml").runtime.flush_denormal is flush
    finally:
        cpu_kernel.set_flush_denormal(False)
        torch.set_num_threads(before)


def test_checkpoint_loads_without_pickle_and_holds_the_run_state(enwik8_sample, tmp_path):
    train(small_config(enwik8_sample, "trainer.max_steps=15", "trainer.eval_every=10"), run_dir=tmp_path)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert payload["step"] == 15 and payload["chars"] == 15 * 16 * 50
    assert payload["batcher"]["position"] == 15
    for key in ("model", "optimizer", "scheduler", "rng", "hidden_state", "config"):
        assert key in payload
    h, c = payload["hidden_state"][0]
    assert h.shape == (16, 64) and c.shape == (16, 64)


TIMING_KEYS = {"time", "perf/chars_per_s", "perf/chars_per_s_per_rank"}


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def run_cli(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "mlstm.cli.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def logged_steps(path):
    return [r["step"] for r in read_metrics(path)] if path.exists() else []


@pytest.mark.slow
def test_sigkill_then_resume_logs_exactly_the_uninterrupted_metrics(enwik8_sample, tmp_path):
    """kill -9 mid-run, rerun the same command: every metric equals an uninterrupted run's (timings aside)."""
    args = [
        "dataset=file",
        f"dataset.path={enwik8_sample}",
        "logger=none",
        *SMALL,
        "cell=mlstm",
        "cell.dropout=0.1",
        "trainer.max_steps=80",
        "trainer.eval_every=20",
        "trainer.checkpoint_every=7",
    ]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    done = run_cli([*args, f"hydra.run.dir={straight}"])
    assert done.wait(timeout=300) == 0, done.stderr.read()

    victim = run_cli([*args, f"hydra.run.dir={crashed}"])
    deadline = time.time() + 300
    while max(logged_steps(crashed / "metrics.jsonl"), default=0) < 30 and victim.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(logged_steps(crashed / "metrics.jsonl"))
    assert 30 <= killed_at < 80, "the run finished before it could be killed"

    resumed = run_cli([*args, f"hydra.run.dir={crashed}"])  # same command: resumes from last.pt by itself
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from step" in err
    assert without_timing(read_metrics(crashed / "metrics.jsonl")) == without_timing(
        read_metrics(straight / "metrics.jsonl")
    )
