"""Command-line entry points. Each is a thin `@hydra.main` (or argparse) wrapper around a library function."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from mlstm.errors import UserError

# configs/ lives at the repository root (the package is installed editable from the checkout)
CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")


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


def exit_on_user_error(function):
    """Print a UserError as `error: <one line>` and exit 2: bad input never shows a traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


# for commands that only read a config (params, sample, ...): no run directory, no Hydra log files
NO_OUTPUT_DIR = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
                 "hydra/hydra_logging=disabled"]


def hydra_entry(task, extra_overrides: list[str] | None = None):
    """Run a Hydra task function with the group check first and UserErrors as one line."""

    @exit_on_user_error
    def main():
        check_group_choices(sys.argv[1:])
        sys.argv.extend(extra_overrides or [])
        task()

    return main
