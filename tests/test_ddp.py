"""Scale-out on CPU: real torchrun subprocesses (gloo), mixed precision, and the SLURM launcher config.

The central claim: with the B streams split across W ranks, DDP training equals single-process training on the full
batch (each rank's loss is the mean over its B/W streams, DDP averages the gradients, so with dropout 0 the update is
the same up to fp32 summation order), and checkpoints move freely between DDP and a single process.
"""

import math
import os
import subprocess
import sys
import traceback
import weakref
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cli_helpers import end_tree
from mlstm.cli import CONFIG_DIR
from mlstm.config import load_config
from mlstm.evaluate import LN2, evaluate_bpc, evaluate_nats
from mlstm.model import build_model
from mlstm.training import distributed
from mlstm.training.tracking import read_metrics
from mlstm.training.trainer import train

TORCHRUN = Path(sys.executable).with_name("torchrun")

# 8 streams x 20 characters of real text, 32 mLSTM units, no dropout (DDP and one process then see the same masks:
# none); a checkpoint, a validation and a log record every 2 steps, every checkpoint kept
SMALL = [
    "trainer=cpu",
    "cell=mlstm",
    "cell.hidden_size=32",
    "cell.dropout=0.0",
    "trainer.batch_size=8",
    "trainer.seq_len=20",
    "trainer.eval_every=2",
    "trainer.log_every=2",
    "trainer.checkpoint_every=2",
    "trainer.keep_checkpoints=10",
    "trainer.eval_chars=2000",
    "trainer.test_chars=2000",
    "trainer.eval_batch_size=8",
    "trainer.progress=false",
    "optim=adam",
    "optim.lr=3e-3",
]


@pytest.fixture(scope="module")
def text(enwik8_sample, tmp_path_factory):
    """The first 300 kB of the enwik8 sample (a temporary slice, never in the repository), and a data cache."""
    root = tmp_path_factory.mktemp("ddp_data")
    path = root / "enwik8_head300k.xml"
    with open(enwik8_sample, "rb") as handle:
        path.write_bytes(handle.read(300_000))
    return path, root / "cache"


def run(command, cache, cwd, timeout=240):
    """Run a command; if it is still running after `timeout` s, end it and every process it started (torchrun's ranks
    live in sessions of their own) with SIGABRT, on which Python's faulthandler (PYTHONFAULTHANDLER) prints each one's
    stack: a hang then fails the test with where every rank was stuck, instead of a bare timeout."""
    env = dict(os.environ, MLSTM_DATA_DIR=str(cache), OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", PYTHONFAULTHANDLER="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = end_tree(process)
        pytest.fail(f"still running after {timeout} s: {' '.join(map(str, command))}\nstacks:\n{stderr[-12000:]}")
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert done.returncode == 0, f"{' '.join(map(str, command))}\n{done.stderr[-4000:]}"
    return done


def single(args, cache, cwd):
    return run([sys.executable, "-m", "mlstm.cli.train", *args], cache, cwd)


def ddp(args, cache, cwd, nproc=2):
    if not TORCHRUN.exists():
        pytest.skip(f"{TORCHRUN} not found: DDP tests need torchrun beside the Python interpreter")
    return run([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "mlstm.cli.train", *args], cache, cwd)


def checkpoint(run_dir, step):
    return torch.load(Path(run_dir) / f"ckpt-{step:08d}.pt", weights_only=True)


def assert_same_training_state(got, expected):
    assert got["step"] == expected["step"] and got["chars"] == expected["chars"]
    assert got["batcher"] == expected["batcher"]
    assert got["model"].keys() == expected["model"].keys()
    for name in expected["model"]:
        torch.testing.assert_close(
            got["model"][name],
            expected["model"][name],
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m: f"parameter {name} at step {expected['step']}: {m}",
        )
    # the carried state of all B streams, gathered from the ranks in stream order
    for got_layer, expected_layer in zip(got["hidden_state"], expected["hidden_state"]):
        for g, e in zip(got_layer, expected_layer):
            assert g.shape == e.shape and g.dtype == torch.float32
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def comparable(records):
    """Metrics without timings and throughput (which differ run to run), in logging order."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in records]


@pytest.mark.slow
def test_ddp_equals_one_process_and_checkpoints_move_between_them(text, tmp_path):
    """1 process x 6 steps  ==  2-process DDP (steps 1-2) -> 1 process (3-4) -> 2-process DDP (5-6), in one run dir.

    Also: one run directory although every rank runs Hydra (rank-dependent hydra.run.dir below: rank 0's wins), one
    metrics.jsonl, one W&B run, .hydra/ and the job log written once, and per-rank throughput logged."""
    path, cache = text
    common = ["dataset=file", f"dataset.path={path}", *SMALL]
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    # the finished runs also read the test split as 4 cold-started streams (on rank 0 under DDP)
    single(
        [*common, "logger=none", "trainer.max_steps=6", "trainer.cold_start_streams=4", f"hydra.run.dir={straight}"],
        cache,
        tmp_path,
    )

    # each rank's Hydra gets its own run dir (as ${now:...} can give); the trainer must settle on rank 0's
    per_rank_dir = "hydra.run.dir=" + str(tmp_path / "chain${oc.env:RANK}")
    # (the interrupted segments of the chain skip the test-set evaluation a finished run does)
    out = ddp(
        [*common, "logger=wandb", "trainer.max_steps=2", "trainer.test_at_end=false", per_rank_dir], cache, tmp_path
    )
    (tmp_path / "chain0").rename(chain)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain", "straight"], "a rank made its own run directory"
    assert "world_size': 2" in out.stderr
    assert len(list(tmp_path.rglob("metrics.jsonl"))) == 2  # straight's and the DDP run's
    assert len(list(chain.rglob(".hydra"))) == 1 and len(list(chain.rglob("*.log"))) >= 1
    wandb_runs = list((chain / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, wandb_runs
    run_id = (chain / "wandb_run_id.txt").read_text().strip()
    records = read_metrics(chain / "metrics.jsonl")
    train_records = [r for r in records if "train/bpc" in r]
    assert [r["step"] for r in train_records] == [2]
    for record in train_records:  # throughput of every rank and in total
        rates = [record["perf/chars_per_s/rank0"], record["perf/chars_per_s/rank1"]]
        assert all(rate > 0 for rate in rates) and record["perf/chars_per_s"] > 0
        assert record["perf/chars_per_s_per_rank"] == pytest.approx(sum(rates) / 2)
    config_yaml = (chain / "config.yaml").read_text()
    assert "world_size: 2" in config_yaml and "tf32_matmul: false" in config_yaml
    assert run_id in wandb_runs[0].name
    assert_same_training_state(checkpoint(chain, 2), checkpoint(straight, 2))

    # the DDP checkpoint resumes in a single process (full-batch hidden state, same batcher position)
    out = single(
        [*common, "logger=none", "trainer.max_steps=4", "trainer.test_at_end=false", f"hydra.run.dir={chain}"],
        cache,
        tmp_path,
    )
    assert "resumed from step 2" in out.stderr
    assert_same_training_state(checkpoint(chain, 4), checkpoint(straight, 4))

    # and a single-process checkpoint resumes under DDP
    out = ddp(
        [*common, "logger=none", "trainer.max_steps=6", "trainer.cold_start_streams=4", f"hydra.run.dir={chain}"],
        cache,
        tmp_path,
    )
    assert "resumed from step 4" in out.stderr
    assert_same_training_state(checkpoint(chain, 6), checkpoint(straight, 6))

    # every logged number (timings aside) matches the uninterrupted single-process run, evaluation included
    got = comparable(read_metrics(chain / "metrics.jsonl"))
    expected = comparable(read_metrics(straight / "metrics.jsonl"))
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    streams = "test/cold_start_stream_bpc"
    (cold,) = [(g.pop(streams), e.pop(streams)) for g, e in zip(got, expected) if streams in g]
    assert len(cold[0]) == 4 and cold[0] == pytest.approx(cold[1], rel=1e-4, abs=1e-4)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-4, abs=1e-5)
    assert any("test/bpc" in r for r in got) and sum("valid/bpc" in r for r in got) == 3


# the names of this process's threads, in both scripts below
LIST_THREADS = """
import os

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
"""

THREADS_AFTER_CLOSE = (
    LIST_THREADS
    + """
import sys
from mlstm.config import load_config
from mlstm.errors import UserError
from mlstm.training.trainer import Trainer

try:
    trainer = Trainer(load_config(sys.argv[2:]), sys.argv[1])
except UserError as error:  # bad input found once the group was up: the constructor leaves the group itself
    outcome, during = f"error={error}", "(no trainer)"
else:
    during = threads()
    trainer.fit()
    trainer.close(finished=True)
    outcome = "fitted"
# one write per rank, newline included: print() writes the text and its end separately, and the two ranks share the
# pipe, so their lines could run together; `trainer` is still referenced here
sys.stdout.write(f"rank {os.environ['RANK']} {outcome} during={during} after={threads()}\\n")
sys.stdout.flush()
"""
)


FAILED_IN_FORWARD = (
    LIST_THREADS
    + """
import sys
from mlstm.config import load_config
from mlstm.model import CharLM
from mlstm.training.trainer import train

def fail(self, tokens, state):  # called by DistributedDataParallel.forward, whose frame holds the wrapper
    raise RuntimeError("failed in the forward pass")

CharLM.forward = fail
try:
    train(load_config(sys.argv[2:]), sys.argv[1])
except RuntimeError as error:  # the error and its traceback still live here
    sys.stdout.write(f"rank {os.environ['RANK']} error={error} after={threads()}\\n")
    sys.stdout.flush()
"""
)


def threads_after_close(text, tmp_path, *overrides, script=THREADS_AFTER_CLOSE) -> list[str]:
    """Each rank's line from `script` (THREADS_AFTER_CLOSE by default) under a two-rank torchrun."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to list a process's threads")
    if not TORCHRUN.exists():
        pytest.skip(f"{TORCHRUN} not found: DDP tests need torchrun beside the Python interpreter")
    path, cache = text
    path_to_script = tmp_path / "threads_after_close.py"
    path_to_script.write_text(script)
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(path_to_script), str(tmp_path / "run")]
    done = run([*command, "dataset=file", f"dataset.path={path}", *SMALL, "logger=none", *overrides], cache, tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2, done.stdout
    return lines


GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


@pytest.mark.slow
def test_closing_the_trainer_ends_the_gloo_group_while_the_trainer_lives(text, tmp_path):
    """The group must be gone when `Trainer.close` returns, not later when the DDP wrapper is freed. Two hangs and
    aborts at exit came from a group that outlived destroy_process_group(): (1) DDP's constructor imports
    torch.distributed.nn, whose functions bind the default group as a default argument (the setup now imports it
    first), and the gloo threads met interpreter shutdown ("terminate called without an active exception"); (2) the
    DDP reducer held the last reference, so the group's destructor joined its threads with the GIL held while a
    thread needed the GIL to free the last collective's tensors: one rank hung at exit in about 25 runs (close now
    drops the wrapper first). Here `trainer` is still referenced and no gloo thread may be left."""
    for line in threads_after_close(text, tmp_path, "trainer.max_steps=2", "trainer.test_at_end=false"):
        assert " fitted " in line, line
        during, after = line.split(" during=")[1].split(" after=")
        assert "pt_gloo_runloop" in during, line  # the check can see gloo's threads while the group lives
        assert not any(name in after for name in GLOO_THREADS), line


@pytest.mark.slow
def test_bad_input_found_with_the_group_up_leaves_the_group_before_the_error(text, tmp_path):
    """trainer.resume=true without a checkpoint is found after the process group is up (the run directory is agreed
    on through it). The constructor leaves the group before it raises: one clear line and exit 2 follow, where a
    group left to interpreter shutdown aborted a rank in about one run in three (SIGABRT)."""
    for line in threads_after_close(text, tmp_path, "trainer.max_steps=2", "trainer.resume=true"):
        assert " error=trainer.resume=true but " in line and "holds no checkpoint (last.pt)" in line, line
        assert not any(name in line.split(" after=")[1] for name in GLOO_THREADS), line


@pytest.mark.slow
def test_an_error_in_the_forward_pass_leaves_the_group_while_its_traceback_lives(text, tmp_path):
    """An exception raised inside DistributedDataParallel.forward keeps the wrapper alive through its traceback (the
    forward's frame holds it as `self`), and with it the reducer's reference to the group. `train` clears the
    traceback's finished frames before it closes the trainer: no gloo thread is left while the error is handled."""
    lines = threads_after_close(text, tmp_path, "trainer.max_steps=2", script=FAILED_IN_FORWARD)
    for line in lines:
        assert " error=failed in the forward pass " in line, line
        assert not any(name in line.split(" after=")[1] for name in GLOO_THREADS), line


def test_dropping_a_tracebacks_locals_frees_what_its_frames_held_and_keeps_the_trace():
    """The helper behind the test above, on a chained exception: the object a finished frame of the cause held is
    freed, and the whole trace (both exceptions, every frame's line) still prints."""

    class Wrapper:
        pass

    def forward(self):  # like DistributedDataParallel.forward: the frame holds the wrapper as `self`
        raise RuntimeError("in the forward pass")

    def step(held: list):
        wrapper = Wrapper()
        held.append(weakref.ref(wrapper))
        try:
            forward(wrapper)
        except RuntimeError as cause:
            raise ValueError("the step failed") from cause

    held = []
    try:
        step(held)
    except ValueError as error:
        assert held[0]() is not None  # the traceback keeps the wrapper alive
        distributed.drop_traceback_locals(error)
        assert held[0]() is None
        trace = "".join(traceback.format_exception(error))
    for line in ("in forward", "in step", "RuntimeError: in the forward pass", "ValueError: the step failed"):
        assert line in trace


def test_sharded_evaluation_sums_to_the_single_process_numbers(text):
    """What each DDP rank scores (its B/W evaluation streams) adds up to exactly the single-process evaluation."""
    path, cache = text
    cfg = load_config(["dataset=file", f"dataset.path={path}", *SMALL])
    from mlstm.data import load_corpus

    corpus = load_corpus(cfg.dataset, cache)
    torch.manual_seed(0)
    model = build_model(cfg, corpus.vocab_size)
    kwargs = dict(batch_size=8, seq_len=20, device=torch.device("cpu"), max_chars=2000)
    tokens = corpus.split("valid")
    parts = [evaluate_nats(model, tokens, rank=r, world_size=2, **kwargs) for r in range(2)]
    nats, chars = map(sum, zip(*parts))
    whole = evaluate_nats(model, tokens, **kwargs)
    assert chars == whole[1] == parts[0][1] * 2
    assert nats == pytest.approx(whole[0], rel=1e-6)
    assert whole[0] / whole[1] / LN2 == evaluate_bpc(model, tokens, **kwargs)


def low_precision_support(precision: str) -> str | None:
    """Why `precision` cannot run on this CPU build (None when it can): autocast and, for fp16, the grad scaler."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    try:
        with torch.autocast("cpu", dtype=dtype):
            product = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
        if product.dtype != dtype:
            return f"torch {torch.__version__} CPU autocast does not compute linear layers in {dtype}"
        if precision == "fp16":
            torch.amp.GradScaler("cpu")
    except (RuntimeError, TypeError, ValueError) as error:
        return f"torch {torch.__version__} has no CPU {precision} autocast/GradScaler ({error})"
    return None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu_with_fp32_state(text, tmp_path, precision):
    reason = low_precision_support(precision)
    if reason:
        pytest.skip(reason)
    path, cache = text
    # tiny: CPU bf16/fp16 kernels for small matrices are slow (this checks the code path, not speed)
    cfg = load_config(
        [
            "dataset=file",
            f"dataset.path={path}",
            "logger=none",
            *SMALL,
            "trainer.max_steps=3",
            "trainer.batch_size=4",
            "trainer.seq_len=10",
            "trainer.eval_batch_size=4",
            "trainer.eval_chars=100",
            "trainer.test_chars=100",
            "trainer.log_every=1",
            "trainer.eval_every=3",
            f"trainer.precision={precision}",
            f"data_dir={cache}",
        ]
    )
    result = train(cfg, run_dir=tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    bpcs = [r["train/bpc"] for r in records if "train/bpc" in r]
    assert len(bpcs) == 3 and all(math.isfinite(b) and b < 8.5 for b in bpcs), bpcs
    assert math.isfinite(result["test/bpc"]) and math.isfinite(result["valid/bpc"])
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    # matrix products in bf16/fp16, but parameters, cell state and carried state stay fp32
    assert all(t.dtype == torch.float32 for t in payload["model"].values())
    assert all(t.dtype == torch.float32 for layer in payload["hidden_state"] for t in layer)
    if precision == "fp16":  # dynamic loss scaling is on, and its scale is checkpointed for an exact resume
        assert payload["scaler"]["scale"] > 0


def compose_with_hydra(overrides, search_path=None):
    extra = [f"hydra.searchpath=[file://{search_path}]"] if search_path else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, *extra], return_hydra_config=True)


SWEEPS = sorted(p.stem for p in (Path(CONFIG_DIR) / "sweep").glob("*.yaml"))
INLINE_SWEEP = """# @package _global_
hydra:
  mode: MULTIRUN
  sweeper:
    params:
      cell: mlstm,lstm
      seed: 0,1,2
"""


@pytest.mark.parametrize("sweep", [None, *SWEEPS], ids=lambda s: s or "inline-sweep")
def test_sweeps_compose_with_the_slurm_launcher(sweep, tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')",
    )
    search_path = None
    if sweep is None:  # a convergence-style sweep (cells x seeds) from a config directory outside configs/
        (tmp_path / "sweep").mkdir()
        (tmp_path / "sweep" / "cells_seeds.yaml").write_text(INLINE_SWEEP)
        sweep, search_path = "cells_seeds", tmp_path
    cfg = compose_with_hydra([f"+sweep={sweep}", "hydra/launcher=slurm"], search_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.timeout_min > 0 and launcher.max_num_timeout > 0 and "partition" in launcher
    from hydra.utils import get_class

    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    if search_path:
        assert cfg.hydra.sweeper.params == {"cell": "mlstm,lstm", "seed": "0,1,2"}


def test_the_local_launcher_stays_the_default():
    assert compose_with_hydra([]).hydra.launcher._target_.endswith("BasicLauncher")
