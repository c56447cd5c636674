"""Running the real command line (`python -m mlstm.cli.train ...`) from tests, and checking what a user sees."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# a tiny CPU run: 8 streams x 20 characters, 32 units, one thread (the test machines are shared)
TINY = [
    "trainer=cpu",
    "logger=none",
    "cell.hidden_size=32",
    "trainer.batch_size=8",
    "trainer.seq_len=20",
    "trainer.eval_chars=2000",
    "trainer.test_chars=2000",
    "trainer.eval_batch_size=8",
    "trainer.progress=false",
    "trainer.threads=1",
    "trainer.log_every=1",
    "trainer.eval_every=null",
    "optim=adam",
    "optim.lr=3e-3",
]


def train_cli(
    args: list[str], *, env: dict | None = None, timeout: float = 300, preexec_fn=None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`python -m mlstm.cli.train *args`, run to completion; stdout and stderr captured as text."""
    # WANDB_SERVICE: W&B's handle on the test process's own W&B service; a user's command starts its own
    environ = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.run(
        [sys.executable, "-m", "mlstm.cli.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environ, **(env or {})},
        preexec_fn=preexec_fn,
        cwd=cwd or REPO_ROOT,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and exactly one `error: ...` line, the last one, holding every fragment."""
    err = result.stderr
    assert result.returncode == 2, f"exit status {result.returncode}\nstderr:\n{err}"
    assert "Traceback" not in err and "Error executing job" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def without_file_permission_override():
    """A preexec_fn that makes a root child process obey file permissions like any user: it drops the
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH capabilities from the bounding set before exec. None if not root."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2

    def drop():
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return drop


def can_drop_file_permission_override() -> bool:
    """Whether `without_file_permission_override` works here (containers may forbid PR_CAPBSET_DROP)."""
    drop = without_file_permission_override()
    if drop is None:
        return True
    try:
        return subprocess.run(["true"], preexec_fn=drop, capture_output=True).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def descendants(pid: int) -> list[int]:
    """The live processes below `pid` (children, their children, ...), read from /proc. torchrun starts each rank in
    a session of its own, so a signal to torchrun's process group never reaches the ranks."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found += sorted(frontier)
    return found


def signal_tree(process: subprocess.Popen, signum: int) -> None:
    """`signum` to `process` and every process below it (the list is taken before any of them is signalled)."""
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def end_tree(process: subprocess.Popen) -> tuple[str, str]:
    """A process that overran its time, with everything it started: SIGABRT first, on which Python's faulthandler
    (PYTHONFAULTHANDLER=1 in its environment) prints each process's stack to stderr, then SIGKILL to what is left.
    Returns what it wrote (stdout, stderr)."""
    signal_tree(process, signal.SIGABRT)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        signal_tree(process, signal.SIGKILL)
        return process.communicate(timeout=30)
