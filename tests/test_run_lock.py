"""One writer per run directory, a graceful stop on a signal, and a checkpoint write that fails on a real OS error.

Real `python -m mlstm.cli.train` subprocesses throughout: real flock contention, real SIGTERM / SIGUSR1 / SIGKILL,
a real EFBIG from a file-size limit (RLIMIT_FSIZE). Resumed runs are compared metric for metric (timings aside)
with one uninterrupted run of the same command.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import REPO_ROOT, assert_one_line_error, end_tree
from mlstm.training import checkpoint
from mlstm.training.stopping import STOPPED_STATUS, GracefulStop
from mlstm.training.tracking import read_metrics

pytestmark = pytest.mark.slow  # every test here runs real training processes

# 4 streams x 20 characters, 16 units, one thread; validation at step 25 only, no periodic checkpoint (so a stop
# before step 25 has no checkpoint to fall back on but the one it writes)
STEPS, FIRST_EVAL = 60, 25
COMMON = [
    "trainer=cpu",
    "logger=none",
    "cell=mlstm",
    "cell.hidden_size=16",
    "cell.dropout=0.1",
    "trainer.batch_size=4",
    "trainer.seq_len=20",
    "trainer.eval_batch_size=4",
    "trainer.eval_chars=2000",
    "trainer.test_chars=2000",
    "trainer.progress=false",
    "trainer.threads=1",
    "trainer.log_every=1",
    f"trainer.eval_every={FIRST_EVAL}",
    "trainer.checkpoint_every=null",
    "optim=adam",
    "optim.lr=3e-3",
]


def overriding(args: list[str], *overrides: str) -> list[str]:
    """`args` with the keys of `overrides` replaced (Hydra refuses a key given twice)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(overrides)


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in records]


def environ() -> dict:
    # WANDB_SERVICE: W&B's handle on the test process's own W&B service; a user's command starts its own
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a hung run's stacks: see `end_tree`


def start(args, *, preexec_fn=None, wrapper: str | None = None) -> subprocess.Popen:
    """`python -m mlstm.cli.train *args` (or the same through a `python -c` wrapper), stdout/stderr piped."""
    head = [sys.executable, "-c", wrapper, "mlstm.cli.train"] if wrapper else [sys.executable, "-m", "mlstm.cli.train"]
    return popen([*head, *args], preexec_fn=preexec_fn)


def popen(command: list[str], *, preexec_fn=None) -> subprocess.Popen:
    """`command` from the repository root with the test environment, stdout/stderr piped."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=environ(),
        preexec_fn=preexec_fn,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_tree(process)  # torchrun's ranks included: one left alive would hold the pipes (and the suite) for ever
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return finish(start(args, **kwargs))


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max((r["step"] for r in read_metrics(path)), default=0) if path.exists() else 0


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while logged_step(run_dir) < step:
        assert process.poll() is None, f"the run ended before step {step}:\n{process.stderr.read()}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.005)
    return logged_step(run_dir)


def lock_holder(run_dir: Path) -> dict:
    text = (run_dir / "run.lock").read_text() if (run_dir / "run.lock").exists() else ""
    return json.loads(text) if text.strip() else {}


def snapshot(run_dir: Path) -> dict:
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def args(enwik8_head200k, data_cache) -> list[str]:
    return ["dataset=file", f"dataset.path={enwik8_head200k}", f"data_dir={data_cache}", *COMMON]


@pytest.fixture(scope="module")
def straight(args, tmp_path_factory) -> list[dict]:
    """The metrics of one uninterrupted run of the command every test here runs (it also builds the data cache)."""
    run_dir = tmp_path_factory.mktemp("straight")
    done = run([*args, f"trainer.max_steps={STEPS}", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "train/bpc" in r] == list(range(1, STEPS + 1))
    return without_timing(records)


# ------------------------------------------------------------------------------------------------- one writer
def test_a_second_training_on_a_busy_run_directory_exits_2_and_writes_nothing(args, straight, tmp_path):
    command = [*args, f"trainer.max_steps={STEPS}", f"hydra.run.dir={tmp_path}"]
    first = start(command)
    wait_for_step(first, tmp_path, 2)
    first.send_signal(signal.SIGSTOP)  # frozen while it holds the lock: the second start meets it for sure
    try:
        before = snapshot(tmp_path)
        holder = lock_holder(tmp_path)
        second = run(command)
        assert snapshot(tmp_path) == before  # not one byte: not even Hydra's .hydra/ files or its job log
    finally:
        first.send_signal(signal.SIGCONT)
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    assert_one_line_error(
        second,
        f"run directory {tmp_path} is in use by pid {first.pid} on host {socket.gethostname()} since {holder['since']}",
        "another hydra.run.dir",
    )

    done = finish(first)
    assert done.returncode == 0, done.stderr
    assert without_timing(read_metrics(tmp_path / "metrics.jsonl")) == straight  # no step twice, nothing lost
    assert lock_holder(tmp_path) == {}  # released cleanly: an empty run.lock


def test_a_stale_lock_left_by_kill_9_is_taken_over(args, straight, tmp_path):
    command = [*args, f"trainer.max_steps={STEPS}", f"hydra.run.dir={tmp_path}"]
    victim = start(command)
    wait_for_step(victim, tmp_path, 3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert lock_holder(tmp_path)["pid"] == victim.pid  # the record stays; the kernel released the flock

    done = run(command)
    assert done.returncode == 0, done.stderr
    assert f"taking over the lock of pid {victim.pid} (no longer running)" in done.stderr
    assert without_timing(read_metrics(tmp_path / "metrics.jsonl")) == straight


# ---------------------------------------------------------------------------------------------- graceful stop
CHAINED_HANDLER = """
import os, runpy, signal, sys
def submitit_like(signum, frame):  # stands for a handler installed before training, e.g. submitit's requeue
    run_dir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("hydra.run.dir=")][0]
    with open(os.path.join(run_dir, "chained.txt"), "w") as handle:
        handle.write(f"{signal.Signals(signum).name} last.pt={os.path.exists(os.path.join(run_dir, 'last.pt'))}")
signal.signal(signal.SIGUSR1, submitit_like)
sys.argv = sys.argv[1:]
runpy.run_module("mlstm.cli.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_before_any_checkpoint_saves_last_pt_and_the_resumed_run_equals_an_uninterrupted_one(
    args, straight, tmp_path, signum
):
    command = [*args, f"trainer.max_steps={STEPS}", f"hydra.run.dir={tmp_path}"]
    # SIGUSR1 through a wrapper that installed its own handler first: it must be called, after the save
    victim = start(command, wrapper=CHAINED_HANDLER if signum == signal.SIGUSR1 else None)
    wait_for_step(victim, tmp_path, 3)
    assert not checkpoint.has_checkpoint(tmp_path)
    victim.send_signal(signum)
    stopped = finish(victim)

    name = signal.Signals(signum).name
    assert stopped.returncode == STOPPED_STATUS, stopped.stderr
    assert "Traceback" not in stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, stopped.stderr
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    assert lines[0] == (
        f"stopped by {name} at step {step}; last.pt saved in {tmp_path}; rerun the same command to resume"
    )
    assert 3 <= step < FIRST_EVAL  # stopped before the first checkpoint the run would have written itself
    assert checkpoint.load_file(tmp_path / "last.pt")["step"] == step  # complete and verified
    assert logged_step(tmp_path) == step  # metrics.jsonl flushed up to the step reached, nothing after
    if signum == signal.SIGUSR1:
        assert (tmp_path / "chained.txt").read_text() == "SIGUSR1 last.pt=True"

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {step}" in resumed.stderr
    assert without_timing(read_metrics(tmp_path / "metrics.jsonl")) == straight


def test_a_second_signal_exits_at_once(enwik8_sample, args, tmp_path):
    # a long validation at step 2 (one stream through the 150k characters of the valid split) holds the run there
    command = overriding(
        args,
        f"dataset.path={enwik8_sample}",
        "trainer.max_steps=10",
        "trainer.eval_every=2",
        "trainer.eval_batch_size=1",
        "trainer.eval_chars=null",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    victim = start(command)
    wait_for_step(victim, tmp_path / "run", 2)  # step 2's train record is written just before its validation
    victim.send_signal(signal.SIGTERM)
    for line in victim.stderr:  # the first signal has been handled: the second cannot merge with it
        if line.startswith("received SIGTERM: saving last.pt after the current step"):
            break
    time.sleep(GracefulStop.SAME_REQUEST_S + 0.2)  # (a signal within that counts as the same request)
    victim.send_signal(signal.SIGTERM)
    stopped = finish(victim, timeout=10)  # at once: long before the validation could end
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "SIGTERM again: exiting at once" in stopped.stderr and "stopped by" not in stopped.stderr
    assert not checkpoint.has_checkpoint(tmp_path / "run")
    assert not any("valid/bpc" in r for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_under_ddp_every_rank_stops_after_the_same_step(args, tmp_path):
    """SIGTERM to torchrun, which passes it on to both ranks at about the same time: they must agree on one step
    (a rank that stopped alone would hang in the other's collectives), rank 0 saves it, and the run resumes."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"{torchrun} not found: DDP tests need torchrun beside the Python interpreter")
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mlstm.cli.train",
        *overriding(args, "cell.dropout=0.0"),
        f"trainer.max_steps={STEPS}",
        f"hydra.run.dir={tmp_path}",
    ]
    victim = popen(command)
    wait_for_step(victim, tmp_path, 3)
    victim.send_signal(signal.SIGTERM)
    stopped = finish(victim)
    assert stopped.returncode != 0  # torchrun reports the ranks' status 3 as a failure
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    assert len(lines) == 1, stopped.stderr  # rank 0 alone says it
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    payload = checkpoint.load_file(tmp_path / "last.pt")
    assert payload["step"] == step < FIRST_EVAL and logged_step(tmp_path) == step
    assert lock_holder(tmp_path) == {}  # rank 0 released it on the way out

    resumed = finish(popen(command))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {step}" in resumed.stderr
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/bpc" in r] == list(range(1, STEPS + 1))


# ---------------------------------------------------------------------------------------------------- full disk
def file_size_limit(limit: int):
    """A preexec_fn: files of the child may not grow past `limit` bytes. The kernel then sends SIGXFSZ, whose
    default action ends the process; ignored, the write fails with EFBIG instead, as it does on a full disk."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_checkpoint_write_failing_with_efbig_keeps_the_previous_checkpoint(args, straight, tmp_path):
    command = [*args, f"hydra.run.dir={tmp_path}"]
    first = run([*command, f"trainer.max_steps={FIRST_EVAL}", "trainer.test_at_end=false"])
    assert first.returncode == 0, first.stderr
    previous = (tmp_path / "last.pt").read_bytes()
    assert len(previous) > 64_000  # so that the next checkpoint cannot be written under the limit below

    # metrics.jsonl, config.yaml and Hydra's files stay far below 64 kB; every checkpoint is about 250 kB
    full = run([*command, f"trainer.max_steps={STEPS}"], preexec_fn=file_size_limit(64_000))
    assert_one_line_error(
        full,
        f"cannot write a checkpoint in {tmp_path}: File too large",
        "last.pt still points to the previous checkpoint",
    )
    assert (tmp_path / "last.pt").read_bytes() == previous
    assert checkpoint.load_file(tmp_path / "last.pt")["step"] == FIRST_EVAL
    assert sorted(p.name for p in tmp_path.glob("*.pt*")) == ["best.pt", "ckpt-00000025.pt", "last.pt"]
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind

    resumed = run([*command, f"trainer.max_steps={STEPS}"])  # space again: the same command resumes
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {FIRST_EVAL}" in resumed.stderr
    assert without_timing(read_metrics(tmp_path / "metrics.jsonl")) == straight


def process_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet (a container's PID 1 may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


def output_when_children_gone(parent: subprocess.Popen, timeout: float, failure: str) -> subprocess.CompletedProcess:
    """The output of a parent started in its own process group: its pipes close when its children, which inherited
    them, are gone too. Children still there after `timeout` fail the test, killed with their group first so that
    nothing outlives it."""
    try:
        out, err = parent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(parent.pid, signal.SIGKILL)
        pytest.fail(f"{failure}:\n{parent.communicate()[1][-3000:]}")
    return subprocess.CompletedProcess(parent.args, parent.returncode, out, err)


def freeze(pid: int) -> int:
    """SIGSTOP: a worker held at the step it reached (until `kill_parent_alone` lets it go on); its pid."""
    os.kill(pid, signal.SIGSTOP)
    return pid


def kill_parent_alone(parent: subprocess.Popen, then_continue: list[int] = ()) -> subprocess.CompletedProcess:
    """SIGKILL to a multirun's parent, SIGCONT to the workers frozen until then, then the parent's output once its
    workers are gone (a minute at most)."""
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for pid in then_continue:
        os.kill(pid, signal.SIGCONT)
    return output_when_children_gone(parent, 60, "a worker outlived its parent by a minute")


def test_joblib_jobs_whose_parent_is_killed_stop_gracefully_exit_and_resume_exactly(args, tmp_path):
    """The multirun's parent alone is killed (SIGKILL: nothing of it runs again, as after `kill PID` or an OOM
    kill): its loky workers must notice, stop each job after a step with last.pt saved and the lock released, and
    exit instead of waiting for the dead parent. The same multirun then resumes both jobs, and their metrics equal
    those of an uninterrupted multirun."""
    # 192 units, 16 x 50 characters, 120 steps: about 6 s a job (50 ms a step here). Each job's worker is frozen
    # (SIGSTOP) once it has logged step 3, until both have: however the workers' starts are staggered, both are
    # caught mid-run, and after the parent's death they go on from step 3 or so, far from the end
    steps = 120
    sweep = [
        "--multirun",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        "hydra.sweep.subdir=seed${seed}",
        f"trainer.max_steps={steps}",
        *overriding(args, "cell.hidden_size=192", "trainer.batch_size=16", "trainer.seq_len=50"),
    ]
    straight = run([*sweep, f"hydra.sweep.dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = {p.parent.name: without_timing(read_metrics(p)) for p in (tmp_path / "straight").rglob("metrics.jsonl")}
    assert len(expected) == 2

    command = [*sweep, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    parent = start(command, preexec_fn=os.setsid)  # its own process group, the workers in it: killable on failure
    deadline = time.time() + 120
    frozen: dict[Path, int] = {}
    while len(frozen) < 2:
        assert parent.poll() is None and time.time() < deadline, "both jobs should be training by now"
        for run_dir in (p.parent for p in (tmp_path / "sweep").rglob("metrics.jsonl")):
            if run_dir not in frozen and logged_step(run_dir) >= 3:
                frozen[run_dir] = freeze(lock_holder(run_dir)["pid"])
        time.sleep(0.01)
    run_dirs = sorted(frozen)
    assert max(logged_step(d) for d in run_dirs) < steps - 20, "a job nearly finished: too fast to test here"
    workers = [frozen[d] for d in run_dirs]
    assert parent.pid not in workers and len(set(workers)) == 2  # the jobs train in two worker processes
    stopped = kill_parent_alone(parent, then_continue=workers)
    assert all(process_gone(pid) for pid in workers), "a worker outlived its parent"
    assert stopped.stderr.count(f"the parent process {parent.pid} is gone: stopping as on SIGTERM") == 2
    for run_dir in run_dirs:
        step = checkpoint.load_file(run_dir / "last.pt")["step"]
        assert 3 <= step < steps and logged_step(run_dir) == step  # saved at the step it reached, nothing after
        assert f"stopped by SIGTERM at step {step}; last.pt saved in" in stopped.stderr
        assert lock_holder(run_dir) == {}  # released on the way out, not left to the kernel

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resumed from step") == 2
    assert {d.name: without_timing(read_metrics(d / "metrics.jsonl")) for d in run_dirs} == expected


def test_a_joblib_worker_between_jobs_exits_when_its_parent_is_killed(args, tmp_path):
    """One job of 3 steps, one of 120: once the short one is done its worker waits for the next job. Its parent
    killed, that worker must exit (nothing of a run is held then), and the busy one stop gracefully. The long job's
    worker is frozen from its step 3 until the parent is dead, so it is caught mid-run however slow the short one."""
    command = [
        "--multirun",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "trainer.max_steps=3,120",
        "hydra.sweep.subdir=steps${trainer.max_steps}",
        f"hydra.sweep.dir={tmp_path}",
        *overriding(args, "cell.hidden_size=192", "trainer.batch_size=16", "trainer.seq_len=50"),
    ]
    parent = start(command, preexec_fn=os.setsid)
    short, long = tmp_path / "steps3", tmp_path / "steps120"
    deadline = time.time() + 120
    busy = None
    while not ((short / "config.yaml").exists() and lock_holder(short) == {} and busy is not None):
        assert parent.poll() is None and time.time() < deadline, "the short job should be done by now"
        if busy is None and logged_step(long) >= 3:
            busy = freeze(lock_holder(long)["pid"])
        time.sleep(0.01)
    assert logged_step(long) < 100, "the long job nearly finished: too fast to test here"
    err = kill_parent_alone(parent, then_continue=[busy]).stderr
    assert process_gone(busy)
    assert err.count(f"the parent process {parent.pid} is gone: exiting") == 1  # the idle worker
    assert err.count(f"the parent process {parent.pid} is gone: stopping as on SIGTERM") == 1  # the busy one
    assert checkpoint.load_file(long / "last.pt")["step"] == logged_step(long) < 120


# The child of ORPHANED_RUN: a run asked to stop too late to stop (during its last step or final evaluation; the
# loop ignores it there) finishes, and the worker then waits for its dead parent's next job
ORPHANED_RUN = """
import multiprocessing, os, sys, time
from mlstm.training.stopping import GracefulStop

def worker(ready):
    with GracefulStop() as stop:  # in the child's main thread: the parent watch starts
        ready.set()
        while not stop.requested:  # the run's last step: the parent dies meanwhile
            time.sleep(0.01)
    print(os.getpid(), flush=True)
    time.sleep(float(sys.argv[1]))  # between runs, waiting for a job that never comes
    print("still waiting", flush=True)

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    context.Process(target=worker, args=(ready,)).start()
    ready.wait(60)
    os._exit(0)  # the parent dies; its child has been told nothing
"""


def test_a_worker_whose_run_ends_after_its_parent_died_exits_instead_of_waiting(tmp_path):
    """The parent watch must keep watching after it has asked the run to stop: a run that ends anyway (asked
    during its last step) leaves a worker between runs, which has to exit, not wait for the dead parent's next job.
    The parent exits at once; its child inherits its pipes, so the output is complete only when the child is gone."""
    waiting = 300  # far longer than the test allows (a third of it: a busy machine imports torch slowly)
    script = tmp_path / "orphaned_run.py"  # a file: a spawned child imports its parent's main module
    script.write_text(ORPHANED_RUN)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(waiting)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=environ(),
        preexec_fn=os.setsid,
    )
    done = output_when_children_gone(parent, waiting / 3, "the worker waited for its dead parent")
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err
    assert "still waiting" not in out
    assert err.count(f"the parent process {parent.pid} is gone: stopping as on SIGTERM") == 1
    assert err.count(f"the parent process {parent.pid} is gone: exiting") == 1
    assert process_gone(int(out.split()[0]))
