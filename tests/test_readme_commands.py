"""Every command in README.md's code blocks, parsed from the README (a changed command is tested as changed), is run
as far as it can run offline in seconds. The rule, by what a command does:

- runs as written: `make help`, `make params ...`, and `python scripts/X.py ...` whose inputs are committed files
  (a script writes nothing into the checkout unless its command says --out/--json/--markdown, which none here does);
- trains (make train, train-ddp, sweep, tune; torchrun or srun of mlstm.cli.train): its Hydra config is composed as
  the entry point composes it, from the exact command `make -n` expands it to (groups, overrides, sweep config,
  launcher), a dry run that needs neither data nor a download nor a GPU;
- reads what a training makes first (make plot RUNS=multirun/...): the script's --help;
- runs a study in bash (trains, or rewrites committed results): `bash -n` (the script parses);
- skipped: `make setup` (installs), `make test` / `test-fast` / `lint` (the suite and its lint themselves).
A placeholder for the reader's own value (`<partition>`) stands in as its name (`partition`).
A command that fits none of these fails the test until the rule says what to do with it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
SKIPPED_TARGETS = {
    "setup": "installs the environment",
    "test": "the test suite itself",
    "test-fast": "the test suite itself",
    "lint": "run by `make test` before the suite",
}
RUN_TARGETS = {"help", "params"}


def readme_commands() -> list[list[str]]:
    """The commands of the README's fenced shell blocks: continuation lines joined, comments dropped."""
    blocks = re.findall(r"^```(?:bash|sh|shell)?\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"<([\w -]+)>", lambda m: m.group(1).replace(" ", "-"), line)  # the reader's value
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def make_target(words: list[str]) -> str:
    return next(w for w in words[1:] if "=" not in w and not w.startswith("-"))


def expanded(words: list[str]) -> list[list[str]]:
    """What make would run for a `make ...` command (`make -n`), each line split into words; other commands as they
    are."""
    if words[0] != "make":
        return [words]
    done = subprocess.run(["make", "-n", *words[1:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def module_args(words: list[str], module: str) -> list[str] | None:
    """The arguments after `-m MODULE`, or None when the command does not run that module."""
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == module:
            return words[i + 2 :]
    return None


def action(words: list[str]) -> tuple[str, str]:
    """(what the test does with a README command, why)."""
    if words[0] == "make":
        target = make_target(words)
        if target in SKIPPED_TARGETS:
            return "skip", SKIPPED_TARGETS[target]
        if target in RUN_TARGETS:
            return "run", "prints and exits"
    lines = expanded(words)
    if any(module_args(line, "mlstm.cli.train") is not None for line in lines):
        return "compose", "trains"
    if words[0] == "bash" and words[1].startswith("scripts/"):
        return "syntax", "a study: trains or rewrites committed results"
    scripts = [line for line in lines if len(line) > 1 and line[1].startswith("scripts/") and line[1].endswith(".py")]
    if scripts:
        inputs = [w for w in scripts[0][2:] if not w.startswith("-") and "/" in w]
        if all((REPO_ROOT / w).exists() for w in inputs):
            return "run", "reads committed files"
        return "help", "reads what a training makes first"
    return "unknown", "no rule covers it"


COMMANDS = readme_commands()
# the commands that start a Python process of their own (seconds each) are slow; composing a config is not
PARAMS = [
    pytest.param(
        words, id=shlex.join(words)[:80], marks=[pytest.mark.slow] if action(words)[0] in ("run", "help") else []
    )
    for words in COMMANDS
]


def test_the_readme_has_commands_of_every_kind():
    kinds = {action(words)[0] for words in COMMANDS}
    assert {"run", "compose", "skip"} <= kinds, kinds


def compose_like_the_entry_point(argv: list[str]):
    """The config `python -m mlstm.cli.train ARGV` would run (for --multirun: its first job's overrides), with the
    Hydra part too (launcher, sweeper), composed as mlstm.cli does: group check, then Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mlstm.config import CONFIG_DIR, check_group_choices, normalise_overrides

    overrides = normalise_overrides([a for a in argv if not a.startswith("-")])
    check_group_choices(overrides)
    first_job = []
    for override in OverridesParser.create().parse_overrides(overrides):
        value = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else override.value()
        first_job.append(
            override.input_line if not override.is_sweep_override() else f"{override.get_key_element()}={value}"
        )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=first_job, return_hydra_config=True)


@pytest.mark.parametrize("words", PARAMS)
def test_readme_command(words, tmp_path):
    kind, why = action(words)
    assert kind != "unknown", f"README command {shlex.join(words)!r}: {why}; give tests/test_readme_commands.py a rule"
    if kind == "skip":
        pytest.skip(why)
    if kind == "compose":
        for line in expanded(words):
            argv = module_args(line, "mlstm.cli.train")
            if argv is not None:
                cfg = compose_like_the_entry_point(argv)
                assert cfg.cell.name in ("mlstm", "lstm") and cfg.trainer.max_steps > 0
        return
    if kind == "syntax":
        done = subprocess.run(["bash", "-n", words[1]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return
    if kind == "help":
        (script,) = [line[1] for line in expanded(words) if len(line) > 1 and line[1].startswith("scripts/")]
        command = [sys.executable, script, "--help"]
    elif words[0] == "python":
        command = [sys.executable, *words[1:]]
    else:
        command = words
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.stdout.strip(), "the command printed nothing"
