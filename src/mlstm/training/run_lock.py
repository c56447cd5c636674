"""One writer per run directory: an exclusive OS lock on `<run dir>/run.lock`, held for the whole training.

The lock is `fcntl.flock` on an open file descriptor, so the kernel releases it when the process ends, however it
ends (a clean exit, an exception, kill -9, an OOM kill). The file records who holds it (pid, host, start time, as
JSON) and is emptied on a clean release, so content found under a free lock is what a process that died left behind:
it is taken over with one line saying so. A second process on a directory in use stops with a `UserError` naming the
holder, before it has read or written anything there.

The file is never deleted: a process that opened it just before a deletion would lock an orphaned file while another
locks a new one, and both would write.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mlstm.errors import UserError

LOCK_FILE = "run.lock"
# file systems without flock (some NFS or Lustre mounts): train unlocked, and say so
NO_LOCKING = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)

_held: dict[str, RunLock] = {}  # the run directories this process holds, by real path (the CLI locks early)


class RunLock:
    """`with RunLock(run_dir): ...` holds the run directory; re-entrant within one process."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._nested = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise UserError when another process holds it. OSError when the directory cannot be
        created or the lock file cannot be opened (the caller reports an unwritable run directory)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.run_dir)
        if key in _held:
            self._nested = True
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(self._in_use_message()) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in NO_LOCKING:
                raise
            print(
                f"warning: cannot lock {self.path} ({error.strerror}): this file system has no flock, so nothing "
                f"stops a second run from writing into {self.run_dir}",
                file=sys.stderr,
            )
            return
        self._fd = fd
        self._take_over(_read_holder(fd))
        _write_holder(fd)
        _held[key] = self

    def release(self) -> None:
        if self._nested or self._fd is None:
            return
        _held.pop(os.path.realpath(self.run_dir), None)
        try:
            os.ftruncate(self._fd, 0)  # empty = released cleanly; content under a free lock = its holder died
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def _take_over(self, holder: dict | None) -> None:
        if not holder:
            return
        pid, host = holder.get("pid"), holder.get("host")
        state = (
            "no longer running"
            if host == socket.gethostname() and not _alive(pid)
            else f"on host {host}, which no longer holds it"
        )
        print(f"warning: taking over the lock of pid {pid} ({state}) on run directory {self.run_dir}", file=sys.stderr)

    def _in_use_message(self) -> str:
        holder = _wait_for_holder(self.path)
        pid, host, since = (holder.get(k, "?") for k in ("pid", "host", "since"))
        gone = host == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
        # flock busy but its pid gone: a process it started inherited the descriptor and still holds the lock
        orphan = f" (pid {pid} has ended, but a process it started still holds the lock)" if gone else ""
        return (
            f"run directory {self.run_dir} is in use by pid {pid} on host {host} since {since}{orphan}; wait for "
            f"that run to end or stop it (it saves last.pt on SIGTERM), or train in another hydra.run.dir"
        )


def _write_holder(fd: int) -> None:
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def _read_holder(fd_or_path) -> dict | None:
    try:
        if isinstance(fd_or_path, int):
            text = os.pread(fd_or_path, 4096, 0).decode()
        else:
            text = Path(fd_or_path).read_text()
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _wait_for_holder(path: Path, seconds: float = 1.0) -> dict:
    """The holder's record; it may be between taking the lock and writing it, so look again for a moment."""
    deadline = time.monotonic() + seconds
    while True:
        holder = _read_holder(path)
        if holder or time.monotonic() > deadline:
            return holder or {}
        time.sleep(0.05)


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
