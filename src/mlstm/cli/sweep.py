"""A sweep that stops as one run does: the joblib launcher's two sides, and the jobs of a sweep, known in advance.

`launch` is the parent's side of the joblib launcher the studies use (`hydra/launcher=joblib_pair`, whose class is
hydra_plugins/mlstm_launcher's StoppableJoblibLauncher). It runs the jobs as Hydra's joblib launcher does, in loky
worker processes through joblib.Parallel, with these differences:

- A job is handed to a worker only when a worker is free (`pre_dispatch=n_jobs`, `batch_size=1`), so a job that has
  not started is still the parent's to withhold.
- SIGINT or SIGTERM, to the parent alone or to its whole process group (a terminal's Ctrl-C), asks the sweep to
  stop: the parent writes the launch's stop file (mlstm.training.stopping.SweepStop), every running job finishes
  its step, saves last.pt and says so, no new job starts. The parent waits for the running jobs, prints one line per
  job (stopped at step N, finished, not started) and how to resume, and exits with the trainer's stopped status (3).
  A second signal, more than a second after the first, ends every job at once (status 128 + N), saving nothing.
- A job that stops (a signal to its worker alone) or exits with an error status stops the sweep the same way; the
  sweep then exits with that job's status (2 for bad input, whose one-line error the job printed).
- A worker never dies of a signal (`worker_started`): joblib would tear the other workers down mid-step.

`run_job_in_worker` is the worker's side: one job, its outcome (`Outcome`) returned rather than raised, so that
joblib never aborts the other jobs. `sweep_jobs` lists the jobs of a grid sweep (Hydra's basic sweeper) before any
runs, so that mlstm.cli.hooks checks every job's config first.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlstm.training.stopping import STOPPED_STATUS, GracefulStop, SweepStop, TrainingStopped, write_stop_file

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
SWEEP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Outcome:
    """What became of one job: `finished` (with Hydra's JobReturn, which may hold the task's exception), `stopped`
    (last.pt saved at `step`), `exited` (the task exited with `status`), or `not started`."""

    idx: int
    kind: str
    run_dir: str | None = None
    step: int | None = None
    status: int | None = None
    job_return: Any = None


# ------------------------------------------------------------------------------------------------- the jobs, first
def sweep_jobs(config) -> list[list[str]] | None:
    """The overrides of every job of a multirun, as Hydra's basic sweeper will make them (its `params` first, then
    the command line's); None for another sweeper (Optuna draws its jobs as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def check_jobs(config, jobs: list[list[str]], config_loader=None) -> None:
    """Compose every job's config and check it (mlstm.config.schema): a bad value in any job stops the sweep before
    the first job starts. Raises UserError or Hydra's composition error."""
    from hydra.core.global_hydra import GlobalHydra

    from mlstm.config.schema import validate

    loader = config_loader or GlobalHydra.instance().config_loader()
    for overrides in jobs:
        validate(loader.load_sweep_config(config, list(overrides)))


# --------------------------------------------------------------------------------------------- the worker's side
def worker_started() -> None:
    """A loky worker's initializer: signals outside a run ask the sweep to stop instead of ending the worker."""
    SweepStop.install_handlers()


def job_dir(sweep_config) -> Path:
    """The directory Hydra's run_job gives a job of a sweep: hydra.sweep.dir / hydra.sweep.subdir."""
    from omegaconf import OmegaConf

    return Path(str(OmegaConf.select(sweep_config, "hydra.sweep.dir"))) / str(
        OmegaConf.select(sweep_config, "hydra.sweep.subdir")
    )


def run_job_in_worker(
    idx: int, overrides, hydra_context, config, task_function, singleton_state, stop_file: str
) -> Outcome:
    """One job in a worker, as hydra_joblib_launcher's execute_job runs it; never raises."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from mlstm.cli import describe_config_error

    SweepStop.join(stop_file)
    if SweepStop.pending() is not None:
        return Outcome(idx, "not started")
    setup_globals()
    Singleton.set_state(singleton_state)
    try:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    except (HydraException, OmegaConfBaseException) as error:  # a value Optuna drew, say: checked per job
        print(f"error: {describe_config_error(error, list(overrides))}", file=sys.stderr, flush=True)
        SweepStop.request(signal.SIGTERM, f"job #{idx} exited with status 2")
        return Outcome(idx, "exited", status=2)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    run_dir = str(job_dir(sweep_config))
    try:
        ret = run_job(
            hydra_context=hydra_context,
            config=sweep_config,
            task_function=task_function,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except SystemExit as exit_:  # the task's own exit: stopped (3), bad input (2, its line printed), ...
        status = exit_.code if isinstance(exit_.code, int) else 1
        stopped = exit_.__context__ if isinstance(exit_.__context__, TrainingStopped) else None
        if status == STOPPED_STATUS:
            SweepStop.request(stopped.signum if stopped and stopped.signum else signal.SIGTERM, f"job #{idx} stopped")
            return Outcome(idx, "stopped", run_dir, step=stopped.step if stopped else None, status=status)
        SweepStop.request(signal.SIGTERM, f"job #{idx} exited with status {status}")
        return Outcome(idx, "exited", run_dir, status=status)
    return Outcome(idx, "finished", run_dir, job_return=ret)


# --------------------------------------------------------------------------------------------- the parent's side
class ParentStop:
    """The parent's SIGINT and SIGTERM while its jobs run; kept by the launcher across its launches (a sweeper may
    launch several batches: once stopped, later batches start nothing)."""

    def __init__(self):
        self.signum: int | None = None
        self.since = 0.0
        self.stop_file: Path | None = None
        self.reason = ""
        self.previous: dict = {}

    @property
    def stopping(self) -> bool:
        return bool(self.reason) or (self.stop_file is not None and self.stop_file.exists())

    def __enter__(self) -> ParentStop:
        self.previous = {signum: signal.signal(signum, self._handle) for signum in SWEEP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def ask(self, reason: str, signum: int = signal.SIGTERM) -> None:
        if not self.reason:
            self.reason = reason
        if self.stop_file is not None:
            write_stop_file(self.stop_file, signum, reason)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self.since < GracefulStop.SAME_REQUEST_S:
                return  # the same request (a signal to the group, say, and its echo)
            os.write(
                2,
                f"{name} again: ending every job of the sweep at once (status {128 + signum}), saving "
                f"nothing more\n".encode(),
            )
            for child in multiprocessing.active_children():  # the loky workers (loky's Popen has no kill())
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            os._exit(128 + signum)
        self.signum, self.since = signum, time.monotonic()
        self.ask(f"the sweep received {name}", signum)
        os.write(
            2,
            f"received {name}: stopping the sweep: each running job saves last.pt after its current step, "
            f"no new job starts (a second signal ends every job at once)\n".encode(),
        )


def launch(launcher, job_overrides, initial_job_idx: int):
    """The joblib launcher's `launch` (see the module docstring). Returns Hydra's JobReturns when every job of the
    batch finished; otherwise prints what became of each job and exits (SystemExit)."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, setup_globals
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel, delayed
    from omegaconf import OmegaConf

    from mlstm.cli import fail_with_one_line

    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    labels = {initial_job_idx + i: label for i, label in enumerate(varying(job_overrides))}
    state = launcher.stop_state
    if state.stopping:  # an earlier batch was stopped: this one starts nothing
        report(state, {}, labels, sweep_dir)
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:  # the grid was checked up front
        with fail_with_one_line(list(job_overrides[0]) if job_overrides else []):
            check_jobs(config, [list(o) for o in job_overrides], launcher.hydra_context.config_loader)
    sweep_dir.mkdir(parents=True, exist_ok=True)

    joblib_cfg = dict(launcher.joblib)
    joblib_cfg["backend"] = "loky"  # Hydra's launcher does the same: the threading backend cannot run Hydra jobs
    process_joblib_cfg(joblib_cfg)
    joblib_cfg.update(pre_dispatch="n_jobs", batch_size=1, return_as="generator_unordered", initializer=worker_started)
    log_launch(joblib_cfg, job_overrides, sweep_dir)
    singleton_state = Singleton.get_state()
    folder = Path(tempfile.mkdtemp(prefix="mlstm-sweep-"))
    state.stop_file = folder / "stop"
    if state.reason:
        state.ask(state.reason)
    outcomes: dict[int, Outcome] = {}

    def jobs():
        for offset, overrides in enumerate(job_overrides):
            if state.stopping:
                return
            yield delayed(run_job_in_worker)(
                initial_job_idx + offset,
                overrides,
                launcher.hydra_context,
                config,
                launcher.task_function,
                singleton_state,
                str(state.stop_file),
            )

    try:
        with state:
            for outcome in Parallel(**joblib_cfg)(jobs()):
                outcomes[outcome.idx] = outcome
                if outcome.kind != "finished" and not state.reason:
                    state.ask(f"job #{outcome.idx} {outcome.kind}")
    finally:
        state.stop_file = None
        shutil.rmtree(folder, ignore_errors=True)
    if state.stopping or any(o.kind != "finished" for o in outcomes.values()) or len(outcomes) < len(labels):
        report(state, outcomes, labels, sweep_dir)
    return [outcomes[idx].job_return for idx in labels]  # every job finished: Hydra's JobReturns, in order


def varying(job_overrides) -> list[str]:
    """Each job's overrides that differ between the jobs (`seed=2`): what tells them apart in a report."""
    from hydra.core.utils import filter_overrides

    jobs = [list(filter_overrides(o)) for o in job_overrides]
    common = set.intersection(*(set(j) for j in jobs)) if len(jobs) > 1 else set()
    return [" ".join(o for o in job if o not in common) for job in jobs]


def log_launch(joblib_cfg: dict, job_overrides, sweep_dir: Path) -> None:
    import logging

    from hydra.core.utils import filter_overrides

    log = logging.getLogger("hydra_plugins.mlstm_launcher")
    shown = {k: v for k, v in joblib_cfg.items() if k not in ("initializer", "return_as")}
    log.info(
        f"Joblib.Parallel({','.join(f'{k}={v}' for k, v in shown.items())}) is launching {len(job_overrides)} jobs"
    )
    log.info(f"Launching jobs, sweep output dir : {sweep_dir}")
    for idx, overrides in enumerate(job_overrides):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")


def report(state: ParentStop, outcomes: dict[int, Outcome], labels: dict[int, str], sweep_dir: Path):
    """One line per job and how to resume, then exit: with a failed job's status, else the stopped status (3), or
    0 when every job finished anyway."""
    lines = []
    for idx, label in labels.items():
        outcome = outcomes.get(idx, Outcome(idx, "not started"))
        if outcome.kind == "finished":
            what = "finished"
        elif outcome.kind == "stopped":
            at = f" at step {outcome.step}" if outcome.step is not None else ""
            what = f"stopped{at}; last.pt saved in {outcome.run_dir}"
        elif outcome.kind == "exited":
            what = f"exited with status {outcome.status} (its error above)"
        else:
            what = "not started"
        lines.append(f"  job #{idx} ({label or 'no overrides'}): {what}")
    statuses = [o.status for o in outcomes.values() if o.kind == "exited"]
    unfinished = any(outcomes.get(idx, Outcome(idx, "")).kind != "finished" for idx in labels)
    print(f"sweep stopped ({state.reason or 'a job stopped'}); its jobs:", file=sys.stderr)
    print("\n".join(lines), file=sys.stderr)
    if unfinished:
        print(
            f"to resume, rerun the same command with hydra.sweep.dir={sweep_dir} (the same directory): stopped "
            f"jobs resume from last.pt, finished ones are skipped, the others start",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(statuses[0] if statuses else STOPPED_STATUS)
    sys.stderr.flush()
