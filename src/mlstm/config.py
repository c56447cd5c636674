"""Compose the project's Hydra config from Python (tests, notebooks, scripts): the same result as the command line."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mlstm.cli import CONFIG_DIR, check_group_choices, normalise_overrides


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """`load_config(["cell=lstm", "trainer=cpu"])` == what `make train ARGS="cell=lstm trainer=cpu"` trains."""
    overrides = normalise_overrides(list(overrides))
    check_group_choices(overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)
