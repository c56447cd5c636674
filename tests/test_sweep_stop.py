"""A sweep stops as one run does: real Hydra multiruns of the joblib launcher the studies use (`joblib_pair`), real
loky workers, real SIGINT to the sweep's process group (a terminal's Ctrl-C) and real SIGTERM to its parent alone.

Three jobs on two workers: two run, one waits. Stopped at several moments (in a step, in an evaluation, just after a
checkpoint), every running job saves last.pt at the step it stopped after and says so, the waiting job never
starts, the parent lists what became of each job and exits with status 3, with no traceback and no leaked-resource
warning; the same command then finishes all three, each job's metrics equal to an uninterrupted sweep's, record for
record, and a third run of it skips them all. Every wait is on something observable (a line of metrics.jsonl, a
checkpoint file, a line the parent prints), never on a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cli_helpers import REPO_ROOT
from mlstm.training import checkpoint
from mlstm.training.stopping import STOPPED_STATUS, GracefulStop
from mlstm.training.tracking import read_metrics

pytestmark = pytest.mark.slow  # real sweeps of real trainings: 30-60 s per case on a busy 2-core machine

# 300 steps of 8 streams x 20 characters, 32 units, one thread per job: 5-15 s a job on a busy 2-core machine.
# Validation every 100 steps on 20,000 characters read as one stream (long enough to be caught in), a checkpoint
# every 75 steps, a record per step.
STEPS, EVAL_EVERY, CHECKPOINT_EVERY = 300, 100, 75
SEEDS = (1, 2, 3)
TIMING = ("time", "perf/")


def sweep_args(corpus: Path, data_dir: Path, sweep_dir: Path) -> list[str]:
    return [
        "--multirun",
        "hydra/launcher=joblib_pair",
        "cell=lstm",
        "cell.hidden_size=32",
        "dataset=file",
        f"dataset.path={corpus}",
        f"data_dir={data_dir}",
        "trainer=cpu",
        "logger=none",
        "optim=adam",
        "optim.lr=3e-3",
        "trainer.batch_size=8",
        "trainer.seq_len=20",
        f"trainer.max_steps={STEPS}",
        f"trainer.eval_every={EVAL_EVERY}",
        "trainer.eval_chars=20000",
        "trainer.eval_batch_size=1",
        "trainer.test_chars=2000",
        f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
        "trainer.log_every=1",
        "trainer.threads=1",
        "trainer.progress=false",
        f"seed={','.join(map(str, SEEDS))}",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=seed${seed}",
    ]


def environ() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1"}


class Sweep:
    """`python -m mlstm.cli.train --multirun ...` in its own process group (its workers in it too), stderr read
    line by line as it comes, stdout (Hydra's log) to a file."""

    def __init__(self, args: list[str], log: Path):
        self.lines: list[str] = []
        self.changed = threading.Condition()
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlstm.cli.train", *args],
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO_ROOT,
                env=environ(),
                start_new_session=True,
            )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, start: str, timeout: float = 120) -> str:
        with self.changed:
            found = self.changed.wait_for(lambda: next((x for x in self.lines if x.startswith(start)), None), timeout)
        assert found, f"no line {start!r} within {timeout} s:\n{self.stderr[-3000:]}"
        return found

    def signal_group(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)  # what a terminal's Ctrl-C does (SIGINT to the foreground group)

    def finish(self, timeout: float = 300) -> int:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"the sweep did not end within {timeout} s:\n{self.stderr[-3000:]}")
        self.reader.join(60)  # the pipe closes when the workers, which share it, are gone too
        assert not self.reader.is_alive(), "a worker outlived the sweep's parent"
        return self.process.returncode


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def logged_step(run_dir: Path) -> int:
    return max((r["step"] for r in records(run_dir)), default=0)


def wait_until(condition, sweep: Sweep, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert sweep.process.poll() is None, f"the sweep ended before {what}:\n{sweep.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"not {what} within {timeout} s:\n{sweep.stderr[-3000:]}"
        time.sleep(0.005)


# the moments a stop is asked at, each a condition on the two running jobs' directories (both already training)
def in_a_step(runs: list[Path]) -> bool:
    return all(logged_step(run) >= 3 for run in runs)


def in_an_evaluation(runs: list[Path]) -> bool:
    """A job's train record of an evaluation step is there, its validation record not yet: it is validating (the
    trainer writes the step's train record just before the validation)."""
    if not in_a_step(runs):
        return False
    for run in runs:
        rows = records(run)
        steps = {r["step"] for r in rows if "train/bpc" in r}
        validated = {r["step"] for r in rows if "valid/bpc" in r}
        if any(s % EVAL_EVERY == 0 and s < STEPS and s not in validated for s in steps):
            return True
    return False


def just_after_a_checkpoint(runs: list[Path]) -> bool:
    return in_a_step(runs) and any(list(run.glob("ckpt-*.pt")) for run in runs)


MOMENTS = {
    "in-a-step": in_a_step,
    "in-an-evaluation": in_an_evaluation,
    "just-after-a-checkpoint": just_after_a_checkpoint,
}


@pytest.fixture(scope="module")
def corpus(enwik8_sample) -> Path:
    return enwik8_sample  # 3 MB: a valid split of 150,000 characters, 20,000 of them read at each validation


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def straight(corpus, data_dir, tmp_path_factory) -> dict[int, list[dict]]:
    """Each job's metrics in one uninterrupted sweep of the command every test here runs (it builds the cache)."""
    sweep_dir = tmp_path_factory.mktemp("straight")
    sweep = Sweep(sweep_args(corpus, data_dir, sweep_dir), sweep_dir / "hydra.log")
    assert sweep.finish(600) == 0, sweep.stderr[-3000:]
    expected = {seed: without_timing(records(sweep_dir / f"seed{seed}")) for seed in SEEDS}
    for rows in expected.values():
        assert [r["step"] for r in rows if "train/bpc" in r] == list(range(1, STEPS + 1))
    return expected


def stop_and_resume(corpus, data_dir, straight, tmp_path, moment: str, to_group: bool, signum: int) -> Path:
    """Start the sweep, stop it at `moment`, check what the stop left, rerun it to the end, compare."""
    sweep_dir = tmp_path / "sweep"
    args = sweep_args(corpus, data_dir, sweep_dir)
    sweep = Sweep(args, tmp_path / "hydra.log")
    running = [sweep_dir / "seed1", sweep_dir / "seed2"]  # jobs #0 and #1 start first; #2 waits for a free worker
    wait_until(lambda: MOMENTS[moment](running), sweep, moment.replace("-", " "))
    assert max(logged_step(run) for run in running) < STEPS - 50, "a job nearly finished: too fast to test here"
    if to_group:
        sweep.signal_group(signum)
    else:
        sweep.process.send_signal(signum)
    status = sweep.finish()
    err, name = sweep.stderr, signal.Signals(signum).name

    assert status == STOPPED_STATUS, err[-3000:]
    assert "Traceback" not in err and "Error executing job" not in err, err[-3000:]
    assert "leaked" not in err and "resource_tracker" not in err, err[-3000:]
    assert f"received {name}: stopping the sweep" in err
    for index, run in enumerate(running):
        step = checkpoint.load_file(run / "last.pt")["step"]  # complete, verified, at the step the job stopped
        assert 3 <= step < STEPS and logged_step(run) == step  # metrics.jsonl up to that step, nothing after
        assert f"stopped by {name} at step {step}; last.pt saved in {run}; rerun the same command to resume" in err
        assert f"job #{index} (seed={index + 1}): stopped at step {step}; last.pt saved in {run}" in err
    assert not (sweep_dir / "seed3").exists()  # the waiting job never started
    assert "job #2 (seed=3): not started" in err
    assert f"to resume, rerun the same command with hydra.sweep.dir={sweep_dir}" in err

    rerun = Sweep(args, tmp_path / "hydra.rerun.log")
    assert rerun.finish(600) == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("resumed from step") == 2
    for seed in SEEDS:
        assert without_timing(records(sweep_dir / f"seed{seed}")) == straight[seed], seed
    return sweep_dir


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigint_to_the_process_group_stops_every_job_cleanly_and_the_rerun_finishes_them(
    corpus, data_dir, straight, tmp_path, moment
):
    stop_and_resume(corpus, data_dir, straight, tmp_path, moment, to_group=True, signum=signal.SIGINT)


def test_sigterm_to_the_parent_alone_stops_every_job_cleanly_and_reruns_skip_finished_jobs(
    corpus, data_dir, straight, tmp_path
):
    """The workers get no signal: the parent asks them (mlstm.training.stopping.SweepStop). Once the rerun has
    finished every job, the same command again skips them all and changes nothing."""
    sweep_dir = stop_and_resume(
        corpus, data_dir, straight, tmp_path, "in-a-step", to_group=False, signum=signal.SIGTERM
    )
    again = Sweep(sweep_args(corpus, data_dir, sweep_dir), tmp_path / "hydra.again.log")
    assert again.finish(600) == 0, again.stderr[-3000:]
    assert again.stderr.count("holds a finished run") == len(SEEDS)  # "nothing to do: ... holds a finished run"
    for seed in SEEDS:
        assert without_timing(records(sweep_dir / f"seed{seed}")) == straight[seed], seed


def test_a_job_stopped_alone_stops_the_sweep_without_tearing_down_the_other(corpus, data_dir, tmp_path):
    """SIGINT to one worker alone: its job stops with last.pt saved and exits with the stopped status, which used to
    make joblib tear the other worker down mid-step (its job lost everything since its start). Now the other job
    is asked to stop the same way, saves last.pt too, and the waiting job does not start.

    Nothing here is compared with an uninterrupted sweep, so the jobs are given 100 times the steps: the other job
    must still be training when the stop reaches it, and with 300 steps it can finish first (seen once: job #1 had
    ended at step 300 when job #0 stopped)."""
    sweep_dir = tmp_path / "sweep"
    args = [a for a in sweep_args(corpus, data_dir, sweep_dir) if not a.startswith("trainer.max_steps=")]
    sweep = Sweep([*args, f"trainer.max_steps={100 * STEPS}"], tmp_path / "hydra.log")
    running = [sweep_dir / "seed1", sweep_dir / "seed2"]
    wait_until(
        lambda: in_a_step(running) and (running[0] / "run.lock").read_text().strip() != "", sweep, "both jobs training"
    )
    worker = json.loads((running[0] / "run.lock").read_text())["pid"]
    os.kill(worker, signal.SIGINT)
    assert sweep.finish() == STOPPED_STATUS, sweep.stderr[-3000:]
    err = sweep.stderr
    assert "Traceback" not in err and "leaked" not in err, err[-3000:]
    assert "the sweep is stopping (job #0 stopped)" in err
    for index, run in enumerate(running):
        step = checkpoint.load_file(run / "last.pt")["step"]
        assert logged_step(run) == step and f"job #{index} (seed={index + 1}): stopped at step {step}" in err
    assert not (sweep_dir / "seed3").exists() and "job #2 (seed=3): not started" in err


def test_a_second_signal_ends_every_job_at_once(enwik8_sample, data_dir, tmp_path):
    """Both jobs in a long validation (1.35M characters as one stream: far longer than the test waits); the first
    SIGINT asks them to stop after it, a second one more than a second later ends them all at once."""
    sweep_dir = tmp_path / "sweep"
    args = [
        a
        for a in sweep_args(enwik8_sample, data_dir, sweep_dir)
        if not a.startswith(("trainer.eval_every=", "trainer.eval_chars="))
    ]
    args += ["dataset.split_fractions=[0.5,0.45,0.05]", "trainer.eval_every=5", "trainer.eval_chars=null"]
    sweep = Sweep(args, tmp_path / "hydra.log")
    running = [sweep_dir / "seed1", sweep_dir / "seed2"]
    wait_until(lambda: all(logged_step(run) >= 5 for run in running), sweep, "both jobs validating")
    sweep.signal_group(signal.SIGINT)
    sweep.wait_for_line("received SIGINT: stopping the sweep")
    time.sleep(GracefulStop.SAME_REQUEST_S + 0.2)  # (signals within that second count as the same request)
    sweep.signal_group(signal.SIGINT)
    status = sweep.finish(timeout=60)  # at once: long before the validations could end
    assert status == 128 + signal.SIGINT, sweep.stderr[-3000:]
    assert "SIGINT again: ending every job of the sweep at once" in sweep.stderr
    assert "stopped by" not in sweep.stderr and "Traceback" not in sweep.stderr
    for run in running:
        assert not checkpoint.has_checkpoint(run)
        assert not any("valid/bpc" in r for r in records(run))
    deadline = time.monotonic() + 30  # the resource trackers exit once they see their parent gone
    while group_members(sweep.process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_members(sweep.process.pid), "a process of the sweep outlived it"


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group (zombies aside: a container's PID 1 may never reap them)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members
