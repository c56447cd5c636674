"""Stopping a run gracefully: on a signal (SIGTERM, SIGINT, SIGUSR1), when the parent process of a worker dies, or
when the sweep a worker runs jobs for is stopping.

The loop checks `GracefulStop.requested` after every optimizer step; when set, it saves last.pt and raises
`TrainingStopped`, and the same command resumes the run exactly (tests/test_train.py, tests/test_robustness.py).
A sweep's jobs learn that the sweep stops from `SweepStop` (mlstm.cli.sweep, the joblib launcher's parent side).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SLURM: --signal=USR1@120 before the time limit
STOPPED_STATUS = 3  # exit status of a run stopped by a signal with last.pt saved (2 is bad input)


class TrainingStopped(Exception):
    """A signal stopped the run after a completed step, with last.pt saved: the same command resumes it."""

    def __init__(self, message: str, signum: int | None, orphaned: bool = False):
        super().__init__(message)
        self.signum = signum
        self.orphaned = orphaned  # the stop came from the parent's death (ParentWatch)

    @property
    def step(self) -> int | None:
        """The step the run stopped after, as its message says (`stopped by SIGTERM at step N; ...`)."""
        match = re.search(r" at step (\d+)\b", str(self))
        return int(match.group(1)) if match else None


class GracefulStop:
    """SIGTERM, SIGINT and SIGUSR1 while `fit` runs. The first only raises a flag: the loop finishes the current
    optimizer step, saves last.pt and raises TrainingStopped. A second exits at once with status 128 + the signal's
    number (how a shell reports a death by that signal), saving nothing more. The handlers found on entry are put
    back on exit; a Python one among them (e.g. submitit's, which requeues a SLURM job) is called after the save.

    Signals within `SAME_REQUEST_S` of the first count as the same request: Ctrl-C reaches torchrun and its workers
    alike, and torchrun passes it on, so each worker gets it twice within milliseconds.

    A run in a worker process whose parent has died is stopped the same way (see `ParentWatch`)."""

    SAME_REQUEST_S = 1.0

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum: int | None = None
        self.since = 0.0
        self.previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
            ParentWatch.start(self)
        pending = SweepStop.pending()  # asked before this run started (in a sweep's worker: while it set up)
        if pending is not None:
            signum, reason = pending
            self.ask(signum)
            if self.announce and reason:
                os.write(2, f"the sweep is stopping ({reason}): saving last.pt after the next step\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        with ParentWatch.lock:  # the watch then sees "between runs" and no longer asks this run to stop
            ParentWatch.stopping = None
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def poll(self) -> bool:
        """`requested`, after also reading the sweep's stop file when this run is a sweep's job: the loop calls it
        after every step, so a job stops after the step during which its sweep was asked to stop, not up to
        `ParentWatch.POLL_S` later (a fast job could finish in that second: seen). A stat per step: microseconds."""
        if self.signum is None and SweepStop.path is not None and SweepStop.path.exists():
            ParentWatch.pass_on_sweep_stop(self)
        return self.requested

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self.since < self.SAME_REQUEST_S:
                return
            os.write(2, f"{name} again: exiting at once (status {128 + signum}) without saving\n".encode())
            os._exit(128 + signum)
        self.ask(signum)
        if self.announce:  # os.write: a handler may interrupt a print, and print is not reentrant
            os.write(
                2, f"received {name}: saving last.pt after the current step (a second signal exits at once)\n".encode()
            )

    def ask(self, signum: int) -> None:
        """Raise the flag the loop checks after each step, as the first `signum` does."""
        self.signum, self.since = signum, time.monotonic()

    def chain(self) -> None:
        """Call the handler this one replaced, if it was a Python function (not the default, nor Python's own
        KeyboardInterrupt for SIGINT): it may requeue the job, and may exit."""
        previous = self.previous.get(self.signum)
        # (a sweep worker's own handler is not one: the worker reports the stop to its sweep itself)
        if callable(previous) and previous is not signal.default_int_handler and previous != SweepStop._handle:
            previous(self.signum, None)


class ParentWatch:
    """A worker process of a Python parent (the joblib launcher's loky workers, any multiprocessing child) has nobody
    to report to once that parent dies, yet a signal to the parent alone (`kill PID`, an OOM kill) does not reach it:
    it would train on, and a worker between jobs waits for the dead parent forever (both seen). One thread per such
    process checks every `POLL_S` whether the parent is still the one it started under. Once it is not, at every
    check: during a run, it asks the run to stop as SIGTERM does (last.pt saved after the step, the lock released;
    the command line then exits at once, see mlstm.cli.train); between runs, when nothing is held, it exits the
    process. It keeps checking after asking: a run asked during its last step (or its final evaluation) finishes
    instead, and its worker must exit after it. The flag is raised under `lock`, not by a signal, so that a run
    ending at that moment cannot meet a SIGTERM with the default handler back. A run started from a shell (`nohup`,
    `setsid`, make) is no such child and is not watched: it keeps training, as asked."""

    POLL_S = 1.0
    stopping: GracefulStop | None = None  # the run's graceful stop while a run is in `fit`
    lock = threading.Lock()  # held to change or act on `stopping`
    orphaned = threading.Event()
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, stop: GracefulStop) -> None:
        with cls.lock:
            cls.stopping = stop
        if cls._thread is None and multiprocessing.parent_process() is not None:
            cls._thread = threading.Thread(
                target=cls._watch, args=(os.getppid(),), name="mlstm-parent-watch", daemon=True
            )
            cls._thread.start()

    @classmethod
    def _watch(cls, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(cls.POLL_S)
            cls.pass_on_sweep_stop()
        cls.orphaned.set()
        while True:
            with cls.lock:
                if cls.stopping is None:  # between runs: nothing to save
                    os.write(2, f"the parent process {parent} is gone: exiting\n".encode())
                    os._exit(STOPPED_STATUS)
                if not cls.stopping.requested:
                    os.write(2, f"the parent process {parent} is gone: stopping as on SIGTERM\n".encode())
                    cls.stopping.ask(signal.SIGTERM)
            time.sleep(cls.POLL_S)

    @classmethod
    def pass_on_sweep_stop(cls, stop: GracefulStop | None = None) -> None:
        """The sweep this worker runs a job for is stopping (a signal to its parent alone, another job stopped):
        ask the run to stop as that signal does. Under `lock`, like the parent's death, and only once (this
        thread every `POLL_S`, and the loop after every step through `GracefulStop.poll`)."""
        request = SweepStop.from_file()
        if request is None:
            return
        with cls.lock:
            run = stop or cls.stopping  # the run's own stop (the loop), or the run in `fit` now (this thread)
            if run is not None and not run.requested:
                signum, reason = request
                run.ask(signum)
                if run.announce:
                    os.write(2, f"the sweep is stopping ({reason}): saving last.pt after the current step\n".encode())


class SweepStop:
    """A sweep's stop request, as its worker processes see it (the joblib launcher, mlstm.cli.sweep).

    The parent makes one stop file per launch and passes its path with every job (`join`). It writes the file when
    it is asked to stop (SIGINT or SIGTERM, to it alone or to its whole process group), and so does a worker whose
    job stopped or failed, or that received a signal itself. A worker then:
      - starts no new job (`pending` is checked before a job starts);
      - stops the run it trains after its current step, as the signal does: the loop reads the file after every
        step (`GracefulStop.poll`), `ParentWatch` every `ParentWatch.POLL_S` (so also during a long evaluation),
        and `GracefulStop` when a run starts (a signal to the whole group also reaches the worker itself, which
        stops at once, and the file then changes nothing).
    The file holds the signal's number and a reason, one per line; it is written through a rename, so a reader sees
    all of it or nothing.

    `install_handlers` (a loky worker's initializer) makes SIGINT, SIGTERM and SIGUSR1 outside a run (while a job
    sets up, or between jobs) a stop request of the sweep instead of the end of the worker: a worker that died of
    a signal would make joblib tear down every other worker, in the middle of its step. A second signal more than
    `GracefulStop.SAME_REQUEST_S` after the first exits at once, as in a run."""

    path: Path | None = None  # the stop file of the launch this worker runs jobs for
    signum: int | None = None  # a signal this worker received outside a run
    since = 0.0

    @classmethod
    def join(cls, path: str | Path | None) -> None:
        """Run jobs for the launch whose stop file is `path` (a new launch: forget the last one's signal)."""
        path = Path(path) if path else None
        if path != cls.path:
            cls.path, cls.signum = path, None

    @classmethod
    def request(cls, signum: int, reason: str) -> None:
        """Ask the whole sweep to stop (the first request wins; later ones change nothing)."""
        if cls.path is not None:
            write_stop_file(cls.path, signum, reason)

    @classmethod
    def from_file(cls) -> tuple[int, str] | None:
        return read_stop_file(cls.path) if cls.path is not None else None

    @classmethod
    def pending(cls) -> tuple[int, str] | None:
        """(signal number, reason) when the sweep is stopping: this worker's own signal (reason "", it has said so
        already) or the stop file's request; None otherwise."""
        if cls.signum is not None:
            return cls.signum, ""
        return cls.from_file()

    @classmethod
    def install_handlers(cls) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        name = signal.Signals(signum).name
        if cls.signum is not None:
            if time.monotonic() - cls.since < GracefulStop.SAME_REQUEST_S:
                return
            os.write(2, f"{name} again: exiting at once (status {128 + signum})\n".encode())
            os._exit(128 + signum)
        cls.signum, cls.since = signum, time.monotonic()
        cls.request(signum, f"a worker received {name}")
        os.write(
            2,
            f"received {name} outside a run: this worker starts no new job, and a run setting up here stops "
            f"after its first step (a second signal exits at once)\n".encode(),
        )


def write_stop_file(path: Path, signum: int, reason: str) -> None:
    """The stop request, written once: a file already there (an earlier request) is left as it is."""
    path = Path(path)
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{int(signum)}\n{' '.join(reason.split())}\n")
        os.replace(tmp, path)
    except OSError:  # the launch is over and its folder removed: nobody is left to tell
        tmp.unlink(missing_ok=True)


def read_stop_file(path: Path) -> tuple[int, str] | None:
    try:
        number, reason = (Path(path).read_text().split("\n") + ["", ""])[:2]
        return int(number), reason
    except (OSError, ValueError):
        return None
