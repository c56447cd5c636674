"""The training command's Hydra callbacks (configs/train.yaml, `hydra.callbacks`).

`CheckConfigFirst` checks every key of the config (mlstm.config.schema) before Hydra makes anything: for a single
run before its run directory exists, for a grid sweep every job's config before the first job starts. A bad value
is one line, `error: KEY=VALUE must be ...`, and exit status 2. (Hydra turns an exception raised in a callback into
a warning and goes on, so the callback prints the line and exits itself.)
"""

import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mlstm.cli import fail_with_one_line
from mlstm.cli.sweep import check_jobs, sweep_jobs
from mlstm.config.schema import validate


class CheckConfigFirst(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        with fail_with_one_line(sys.argv[1:]):
            validate(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        with fail_with_one_line(sys.argv[1:]):
            jobs = sweep_jobs(config)
            if jobs is not None:  # another sweeper draws its jobs as it goes: the launcher checks each batch
                check_jobs(config, jobs)
