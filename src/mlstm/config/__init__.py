"""Where the configs live, and composing them from Python (tests, notebooks, scripts): the same result as the
command line. The schema of every key (types, allowed values) is `mlstm.config.schema`; importing this package
registers it in Hydra's ConfigStore, and the `flat_dir` resolver that names a sweep's job directories."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mlstm.config import schema  # noqa: F401 (registers the schemas that configs/train.yaml names)
from mlstm.config.dirs import register_resolvers
from mlstm.errors import UserError

# configs/ lives at the repository root (the package is installed editable from the checkout)
CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")

register_resolvers()


# groups with a `null` entry in train.yaml's defaults list: chosen as `experiment=X`, and `+experiment=X` (the way
# optional groups are usually added) must keep working, though Hydra rejects "+" for a group already in the list
LISTED_OPTIONAL_GROUPS = ("experiment",)


def normalise_overrides(argv: list[str]) -> list[str]:
    """`+experiment=X` -> `experiment=X` (see LISTED_OPTIONAL_GROUPS); every other argument unchanged."""
    return [
        arg[1:] if arg.startswith("+") and arg[1:].split("=", 1)[0] in LISTED_OPTIONAL_GROUPS else arg for arg in argv
    ]


def check_group_choices(argv: list[str]) -> None:
    """Reject `cell=nope` / `dataset=nope` before Hydra does, with one line listing the choices."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "hydra")):
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        group = Path(CONFIG_DIR) / key
        if "." in key or "," in value or not group.is_dir():
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        if value not in choices:
            raise UserError(f"unknown {key} '{value}'; choose one of: {', '.join(choices)}")


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """`load_config(["cell=lstm", "trainer=cpu"])` == what `make train ARGS="cell=lstm trainer=cpu"` trains."""
    overrides = normalise_overrides(list(overrides))
    check_group_choices(overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)
