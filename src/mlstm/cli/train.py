"""`make train ARGS=...` / `python -m mlstm.cli.train key=value ...` (also under torchrun for DDP).

Exit status: 0 done, 2 bad input (one `error:` line; a run directory in use by another run included),
3 (`STOPPED_STATUS`) stopped by SIGTERM, SIGINT or SIGUSR1 with last.pt saved (the same command resumes),
128 + N killed by a second signal N while stopping.
"""

import contextlib
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mlstm.cli import CONFIG_DIR, describe_config_error, exit_on_user_error, hydra_entry, normalise_overrides
from mlstm.errors import UserError
from mlstm.training.run_lock import RunLock
from mlstm.training.stopping import STOPPED_STATUS, TrainingStopped

# torch is imported only once the config has been checked (the trainer, and mlstm.training.distributed under
# torchrun): bad input is refused in about a second, not after torch's import


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error  # inside Hydra too, so a bad job in a multirun says one line
def task(cfg: DictConfig) -> float:
    from mlstm.training.trainer import train

    try:
        result = train(cfg)
    except TrainingStopped as stopped:
        if stopped.orphaned:  # a launcher worker whose parent died: nobody waits for the job's result, and the
            sys.stderr.flush()  # worker would wait for that parent forever; last.pt is saved, the lock released
            os._exit(STOPPED_STATUS)
        sys.exit(STOPPED_STATUS)  # the trainer has said how to resume; a multirun stops here too
    # the return value is what Hydra's sweepers optimise: the tuning rule's score (mlstm.studies.tuning.run_score),
    # the mean validation bpc over the last quarter of the budget, +inf for a diverged run
    return result.get("score", float("nan"))


def named_run_dir(argv: list[str]) -> Path | None:
    """The run directory a single run names literally on the command line (`hydra.run.dir=PATH`), else None (a
    multirun, a Hydra flag such as --cfg, a directory made from ${now:...}: the trainer locks it once it is known)."""
    if any(arg.startswith("-") for arg in argv):
        return None
    values = [arg.split("=", 1)[1] for arg in argv if arg.lstrip("+").startswith("hydra.run.dir=")]
    if len(values) != 1 or any(c in values[0] for c in "${}'\"") or not values[0]:
        return None
    return Path(values[0])


@contextlib.contextmanager
def early_lock(argv: list[str]):
    """Lock the named run directory before Hydra writes `.hydra/` and its job log there, so that a second start on a
    busy directory writes nothing at all. `train` takes the same lock again (re-entrant) and owns the error
    messages; a directory that cannot be created is left to Hydra to report."""
    run_dir = named_run_dir(argv)
    if run_dir is None or rank() != 0:
        yield
        return
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def rank() -> int:
    """This process's rank under torchrun, 0 outside it (mlstm.training.distributed.env_rank, without torch)."""
    return int(os.environ.get("RANK", "0"))


def rank_overrides() -> list[str]:
    """Under torchrun, ranks > 0 write no .hydra/ files and no job log (rank 0's run directory is the run's)."""
    if rank() == 0:
        return []
    from mlstm.training.distributed import secondary_rank_overrides

    return secondary_rank_overrides()


def check_before_lock(argv: list[str]) -> None:
    """Compose and check the config (mlstm.config.schema) before `early_lock` creates the run directory and its
    run.lock: a bad value leaves a named run directory exactly as it was. Runs whose directory Hydra makes itself
    are checked by the Hydra callback (mlstm.cli.hooks) before that directory exists."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mlstm.config import load_config
    from mlstm.config.schema import validate

    try:
        validate(load_config([*argv, *rank_overrides()]))
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(describe_config_error(error, argv)) from None


@exit_on_user_error
def main():
    argv = normalise_overrides(sys.argv[1:])
    if named_run_dir(argv) is not None:
        check_before_lock(argv)
    with early_lock(sys.argv[1:]):
        hydra_entry(task, rank_overrides())()


if __name__ == "__main__":
    main()
