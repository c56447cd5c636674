"""Stopping a run gracefully: on a signal (SIGTERM, SIGINT, SIGUSR1) or when the parent process of a worker dies.

The loop checks `GracefulStop.requested` after every optimizer step; when set, it saves last.pt and raises
`TrainingStopped`, and the same command resumes the run exactly (tests/test_train.py, tests/test_robustness.py).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SLURM: --signal=USR1@120 before the time limit
STOPPED_STATUS = 3  # exit status of a run stopped by a signal with last.pt saved (2 is bad input)


class TrainingStopped(Exception):
    """A signal stopped the run after a completed step, with last.pt saved: the same command resumes it."""

    def __init__(self, message: str, signum: int | None, orphaned: bool = False):
        super().__init__(message)
        self.signum = signum
        self.orphaned = orphaned  # the stop came from the parent's death (ParentWatch)


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

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
            ParentWatch.start(self)
        return self

    def __exit__(self, *exc) -> None:
        with ParentWatch.lock:  # the watch then sees "between runs" and no longer asks this run to stop
            ParentWatch.stopping = None
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self.since < self.SAME_REQUEST_S:
                return
            os.write(2, f"{name} again: exiting at once (status {128 + signum}) without saving\n".encode())
            os._exit(128 + signum)
        self.ask(signum)
        if self.announce:  # os.write: a handler may interrupt a print, and print is not reentrant
            os.write(2, f"received {name}: saving last.pt after the current step (a second signal exits at "
                        f"once)\n".encode())

    def ask(self, signum: int) -> None:
        """Raise the flag the loop checks after each step, as the first `signum` does."""
        self.signum, self.since = signum, time.monotonic()

    def chain(self) -> None:
        """Call the handler this one replaced, if it was a Python function (not the default, nor Python's own
        KeyboardInterrupt for SIGINT): it may requeue the job, and may exit."""
        previous = self.previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
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
    stopping: "GracefulStop | None" = None  # the run's graceful stop while a run is in `fit`
    lock = threading.Lock()  # held to change or act on `stopping`
    orphaned = threading.Event()
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, stop: "GracefulStop") -> None:
        with cls.lock:
            cls.stopping = stop
        if cls._thread is None and multiprocessing.parent_process() is not None:
            cls._thread = threading.Thread(target=cls._watch, args=(os.getppid(),), name="mlstm-parent-watch",
                                           daemon=True)
            cls._thread.start()

    @classmethod
    def _watch(cls, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(cls.POLL_S)
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
