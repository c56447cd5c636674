"""Command-line entry points. Each is a thin `@hydra.main` (or argparse) wrapper around a library function."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from pathlib import Path

from mlstm.config import CONFIG_DIR, check_group_choices, normalise_overrides  # noqa: F401 (the entry points' names)
from mlstm.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/mlstm: where a traceback counts as the project's own


def write_atomic(path: Path, text: str) -> None:
    """Write text through a temporary file and a rename: a reader (or a run killed mid-write) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(text: str, out: str | Path | None) -> None:
    """A script's report: printed, and also written to `out` when given (`--out` / `--markdown`)."""
    print(text, end="" if text.endswith("\n") else "\n")
    if out:
        write_atomic(Path(out), text)


def exit_on_user_error(function):
    """Print a UserError as `error: <one line>` and exit 2: bad input never shows a traceback. An OmegaConf error
    raised while the task reads its config (a bad interpolation, a missing value) is the user's input too."""
    from omegaconf.errors import OmegaConfBaseException

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            try:
                return function(*args, **kwargs)
            except OmegaConfBaseException as error:
                raise UserError(describe_config_error(error, sys.argv[1:])) from None
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


@contextlib.contextmanager
def fail_with_one_line(argv: list[str]):
    """Inside Hydra's own machinery (a callback, a launcher), where an exception would become a warning or a
    traceback: a UserError or a config error prints `error: <one line>` and exits with status 2 at once."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except UserError as error:
        line = str(error)
    except (HydraException, OmegaConfBaseException) as error:
        line = describe_config_error(error, argv)
    else:
        return
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# for commands that only read a config (params, sample, ...): no run directory, no Hydra log files
NO_OUTPUT_DIR = [
    "hydra.output_subdir=null",
    "hydra.run.dir=.",
    "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled",
]


def hydra_entry(task, extra_overrides: list[str] | None = None):
    """Run a Hydra task function with the group check first and UserErrors as one line."""

    @exit_on_user_error
    def main():
        sys.argv[1:] = normalise_overrides(sys.argv[1:])
        check_group_choices(sys.argv[1:])
        sys.argv.extend(extra_overrides or [])
        run_with_one_line_errors(task, sys.argv[1:])

    return main


def run_with_one_line_errors(task, argv: list[str]):
    """Run a Hydra task with Hydra's own errors (bad override, unknown key, missing value, unwritable run directory)
    turned into one-line UserErrors. Hydra prints those over several lines, or as a traceback, then exits 1; with
    HYDRA_FULL_ERROR=1 it raises them instead, which is how they reach us. A user who set HYDRA_FULL_ERROR=1
    themselves gets Hydra's full report, untouched."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return task()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return task()
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(describe_config_error(error, argv)) from None
    except ValueError as error:  # Hydra's check of its own flags, e.g. --multirun with --cfg
        if _raised_in_project(error):
            raise
        raise UserError(str(error).splitlines()[0]) from None
    except OSError as error:
        if error.filename is None or _raised_in_project(error):
            raise
        # Hydra creates the run directory, writes .hydra/ and opens the job log before the task starts
        raise UserError(
            f"cannot write the run directory: {error.strerror}: {error.filename}; set hydra.run.dir "
            f"(hydra.sweep.dir with --multirun) to a writable path"
        ) from None
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def _raised_in_project(error: BaseException) -> bool:
    """Whether a frame of the traceback is project code (other than this module): then it is not Hydra's error."""
    tb = error.__traceback__
    while tb is not None:
        filename = Path(tb.tb_frame.f_code.co_filename).resolve()
        if PACKAGE_DIR in filename.parents and filename != Path(__file__).resolve():
            return True
        tb = tb.tb_next
    return False


def describe_config_error(error: BaseException, argv: list[str]) -> str:
    """One line naming the problem and the fix for a Hydra or OmegaConf error."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import MissingMandatoryValue, ValidationError

    from mlstm.config import schema

    cause = error.__cause__
    listing = schema.LISTING
    if isinstance(error, OverrideParseException):
        bad = _unparsable_override(argv)
        return (
            f"cannot parse the override {bad!r} ({_lines(error)[0]}); write key=value and quote values with "
            f"special characters (https://hydra.cc/docs/advanced/override_grammar/basic)"
            if bad
            else f"cannot parse the overrides ({_lines(error)[0]}); write key=value "
            f"(https://hydra.cc/docs/advanced/override_grammar/basic)"
        )
    for exc in (error, cause):  # a wrong type, refused by the schema (mlstm.config.schema) while Hydra composes
        if isinstance(exc, ValidationError) and getattr(exc, "full_key", None):
            key = re.split(r"\[", str(exc.full_key))[0]
            field = schema.field_of(key)
            if field is not None:
                value = _override_value(argv, key, getattr(exc, "value", None))
                return f"{key}={value!r} must be {schema.describe(field)}"
    if re.search(r"Key '[^']+' (is )?not in ", str(cause)):  # not in struct mode, or not in a schema's dataclass
        match = re.search(r"override '([^']+)'", str(error))
        key = match.group(1) if match else getattr(cause, "full_key", None) or "?"
        return schema.unknown_key_line(key.lstrip("+~"))
    match = re.search(r"An item is already at '([^']+)'", str(cause) + str(error))
    if match:  # `+trainer.early_stop_patience=3`: the schema has the key already
        return f"'{match.group(1)}' is a key of the config already: set it without the '+', e.g. {match.group(1)}=..."
    for exc in (error, cause):
        if isinstance(exc, MissingMandatoryValue):
            key = getattr(exc, "full_key", None) or "?"
            return f"config value '{key}' is missing (???); pass it on the command line, e.g. {key}=..."
    lines = _lines(error) + (_lines(cause) if isinstance(cause, Exception) else [])
    key = getattr(error, "full_key", None)  # OmegaConf errors know which key they are about
    if key and key not in lines[0]:
        lines[0] = f"{key}: {lines[0]}"
    return f"{'; '.join(lines)} (check the command-line overrides; {listing})"


def _override_value(argv: list[str], key: str, fallback):
    """The value the command line gave `key`, as Hydra parsed it; `fallback` when it was not given there."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for arg in argv:
        if arg.lstrip("+~").split("=", 1)[0] == key:
            try:
                override = OverridesParser.create().parse_overrides([arg])[0]
            except Exception:  # noqa: BLE001 - the message falls back to what OmegaConf saw
                break
            if not override.is_sweep_override():  # a sweep's values: OmegaConf saw the one that failed
                return override.value()
            break
    return fallback


def _lines(error: BaseException) -> list[str]:
    """The informative lines of an error message (OmegaConf's full_key/object_type context lines dropped)."""
    lines = [line.strip().rstrip(".") for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("full_key:", "object_type=", "reference_type="))]
    return lines or [type(error).__name__]


def _unparsable_override(argv: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-"):
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            return arg
    return None
