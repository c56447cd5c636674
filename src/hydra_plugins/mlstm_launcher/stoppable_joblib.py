"""Hydra's joblib launcher, with a sweep that stops as one run does (`hydra/launcher=joblib_pair`, the studies').

`StoppableJoblibLauncher` takes the joblib launcher's config (hydra-joblib-launcher's `JobLibLauncherConf`) and
runs the jobs in loky workers as it does; what differs, stopping on SIGINT or SIGTERM, is in mlstm.cli.sweep. Its
config is stored as `hydra/launcher/stoppable_joblib`, which configs/hydra/launcher/joblib_pair.yaml extends. (The
plugin's own `hydra/launcher=joblib` stays as it is: a config file of that name here would be merged with the
plugin's stored one, a Hydra 1.0 behaviour Hydra warns about.)
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


class StoppableJoblibLauncher(JoblibLauncher):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from mlstm.cli.sweep import ParentStop

        self.stop_state = ParentStop()  # kept across the batches a sweeper launches

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from mlstm.cli.sweep import launch

        return launch(self, job_overrides, initial_job_idx)


@dataclass
class StoppableJoblibLauncherConf(JobLibLauncherConf):
    _target_: str = "hydra_plugins.mlstm_launcher.stoppable_joblib.StoppableJoblibLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="stoppable_joblib", node=StoppableJoblibLauncherConf, provider="mlstm"
)
