"""Every key of the `train` config is checked, by type and by value, before anything runs (mlstm.config.schema).

The schema accepts every config in configs/ (each group's options, the paper presets, the variants, the sweeps);
a bad value, whichever group it is in, is one line naming the key, the value and what is allowed, with exit status 2
and the run directory left as it was (the real command line, in a subprocess); and a sweep's job directories are
flat whatever its override values hold (a real multirun).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import REPO_ROOT, assert_one_line_error, train_cli
from mlstm.cli import describe_config_error
from mlstm.config import CONFIG_DIR, load_config
from mlstm.config.dirs import flat_dir
from mlstm.config.schema import GROUPS, validate
from mlstm.errors import UserError
from mlstm.training.tracking import read_metrics

OPTIONAL_GROUPS = {"experiment", "sweep", "variant"}  # added with "+"
NEEDS = {"dataset=file": ["dataset.path=/tmp/corpus.txt"], "dataset=hf": ["dataset.hf_name=wikitext"]}


def every_choice():
    for group in sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra"):
        for path in sorted((Path(CONFIG_DIR) / group).glob("*.yaml")):
            yield f"{'+' if group in OPTIONAL_GROUPS else ''}{group}={path.stem}"


@pytest.mark.parametrize("choice", list(every_choice()))
def test_every_config_in_configs_passes_the_schema(choice):
    validate(load_config([choice, *NEEDS.get(choice, [])]))


def test_the_schema_covers_every_key_the_configs_use():
    """Each group's schema holds every key that any of the group's options sets (the rest would be refused)."""
    for group in ("cell", "dataset", "trainer", "optim", "logger"):
        keys = {f.name for f in GROUPS[group].__dataclass_fields__.values()}
        for path in (Path(CONFIG_DIR) / group).glob("*.yaml"):
            cfg = load_config([f"{group}={path.stem}", *NEEDS.get(f"{group}={path.stem}", [])])
            assert set(cfg[group]) <= keys, (path.name, set(cfg[group]) - keys)


def test_groups_that_differ_in_keys_keep_their_own_keys():
    """A finished run is recognised by its config.yaml comparing equal to the rerun's (mlstm.training.resume): the
    schema must not add the other options' keys to a composed cell, optim or dataset."""
    lstm = load_config(["cell=lstm"]).cell
    assert "form" not in lstm and "seed_output" not in lstm
    adam = load_config(["optim=adam"]).optim
    assert not {"min_lr", "decay_steps", "plateau_factor", "threshold"} & set(adam)
    assert set(load_config(["dataset=enwik8_sample"]).dataset) == {"name", "path", "split_fractions"}


# ------------------------------------------------------------------------------------------------------ bad values
# (overrides, what the one line says): every group, the top level, types and ranges and the rules between keys
BAD = [
    # the four values of the issue
    (["seed=abc"], "seed='abc' must be an integer"),
    (["optim.lr=nan"], "optim.lr=nan must be a positive number (not inf or nan)"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] must be a pair of numbers in [0, 1)"),
    (["optim.lr=inf"], "optim.lr=inf must be a positive number (not inf or nan)"),
    # top level
    (["seed=-1"], "seed=-1 must be an integer in [0, 2**32 - 1]"),
    (["seed=1.5"], "seed=1.5 must be an integer"),
    (["data_dir="], "data_dir='' must be a non-empty string"),
    # optim
    (["optim.lr=-1"], "optim.lr=-1 must be a positive number (not inf or nan)"),
    (["optim.lr=abc"], "optim.lr='abc' must be a number"),
    (["optim.name=adamw"], "optim.name='adamw' must be one of adam, sgd, rmsprop_norm"),
    (["optim.schedule=cosine"], "optim.schedule='cosine' must be one of constant, linear, plateau"),
    (["optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0] must be a pair of numbers in [0, 1)"),
    (["optim.betas=[0.9,x]"], "optim.betas=[0.9, 'x'] must be a list of numbers or null"),
    (["optim.grad_clip=0"], "optim.grad_clip=0 must be a positive number (not inf or nan) or null"),
    (["optim.eps=0"], "optim.eps=0 must be a positive number (not inf or nan) or null"),
    (["optim=adam_linear", "optim.decay_steps=null"], "optim.decay_steps is required by optim.schedule=linear"),
    (["optim=adam_plateau", "optim.plateau_factor=1.5"], "optim.plateau_factor=1.5 must be a number in (0, 1)"),
    (["optim=adam_plateau", "optim.plateau_patience=-1"], "optim.plateau_patience=-1 must be an integer >= 0"),
    (["optim=adam_plateau", "optim.plateau_threshold=-0.1"], "optim.plateau_threshold=-0.1 must be a number >= 0"),
    (["optim=adam_plateau", "optim.min_lr=nan"], "optim.min_lr=nan must be a number >= 0 (not inf or nan)"),
    (["optim=rmsprop_norm", "optim.alpha=1"], "optim.alpha=1 must be a number in [0, 1)"),
    (["optim=rmsprop_norm", "optim.min_threshold=20"], "optim.min_threshold=20 must be at most optim.threshold"),
    (["optim=sgd", "optim.momentum=-0.5"], "optim.momentum=-0.5 must be a number >= 0"),
    (["+optim.warmup=10"], "unknown config key 'optim.warmup'"),
    # trainer
    (["trainer.max_steps=1.5"], "trainer.max_steps=1.5 must be an integer"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 must be a positive integer"),
    (["trainer.eval_every=0"], "trainer.eval_every=0 must be a positive integer or null"),
    (["trainer.eval_chars=-5"], "trainer.eval_chars=-5 must be a positive integer or null"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' must be one of fp32, bf16, fp16"),
    (["trainer.device=tpu"], "trainer.device='tpu' must be one of auto, cpu, cuda"),
    (["trainer.resume=maybe"], "trainer.resume='maybe' must be one of true, false, auto"),
    (["trainer.test_at_end=maybe"], "trainer.test_at_end='maybe' must be true or false"),
    (["trainer.early_stop_patience=0"], "trainer.early_stop_patience=0 must be an integer >= 1 or null"),
    (["trainer.max_time_s=inf"], "trainer.max_time_s=inf must be a positive number (not inf or nan) or null"),
    (["trainer.divergence_lr_factor=1.5"], "trainer.divergence_lr_factor=1.5 must be a number in (0, 1)"),
    (["trainer.on_divergence=maybe"], "trainer.on_divergence='maybe' must be one of stop, reload, end"),
    (["trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz' (did you mean trainer.max_steps?)"),
    # cell
    (["cell.hidden_size=0"], "cell.hidden_size=0 must be a positive integer"),
    (["cell.hidden_size=abc"], "cell.hidden_size='abc' must be an integer"),
    (["cell.dropout=1.0"], "cell.dropout=1.0 must be a number in [0, 1)"),
    (["cell.init_scale=0"], "cell.init_scale=0 must be a positive number (not inf or nan)"),
    (["cell.form=nope"], "cell.form='nope' must be one of paper, matlab, seed or null"),
    (["cell=lstm", "+cell.form=paper"], "cell.form='paper' must be null for cell.name=lstm"),
    (["cell=lstm", "cell.impl=fast"], "cell.impl='fast' must be one of cudnn, loop for cell.name=lstm"),
    (["cell.seed_output=gated"], "cell.seed_output='gated' must be null unless cell.form=seed"),
    (["cell.proj_clip=3"], "cell.proj_clip=3 needs cell.num_proj"),
    (["cell.hidden_sizee=3"], "unknown config key 'cell.hidden_sizee' (did you mean cell.hidden_size?)"),
    # model
    (["model.num_layers=0"], "model.num_layers=0 must be a positive integer"),
    (["model.embedding_size=-1"], "model.embedding_size=-1 must be an integer >= 0"),
    (["model.embed_dropout=1.5"], "model.embed_dropout=1.5 must be a number in [0, 1)"),
    (["model.skip_connections=maybe"], "model.skip_connections='maybe' must be true or false"),
    # dataset
    (["dataset=file"], "dataset.path is required for dataset 'file'; pass e.g. dataset.path="),
    (["dataset=hf"], "dataset.hf_name is required for dataset 'hf'"),
    (["dataset.name=nope"], "dataset.name='nope' must be one of enwik8, text8, file, hf"),
    (["dataset.num_bytes=0"], "dataset.num_bytes=0 must be a positive integer or null"),
    (["dataset.split_sizes=[1,2]"], "dataset.split_sizes=[1, 2] must be three positive integers"),
    (["dataset.split_sizes=[90000000,9000000,9000000]"], "must sum to at most dataset.num_bytes=100000000"),
    (
        ["dataset=file", "dataset.path=/x", "dataset.split_fractions=[0.5,0.6,0.1]"],
        "must be three positive numbers summing to 1",
    ),
    # logger
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode='sometimes' must be one of offline, online, disabled"),
    (["logger.name=tensorboard"], "logger.name='tensorboard' must be one of none, wandb"),
]


def one_line(overrides: list[str]) -> str:
    """What the command line says about `overrides`, computed in-process: compose (Hydra, the schema's types),
    then `validate` (values, rules between keys); a composition error becomes its one line as the CLI does it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        validate(load_config(["trainer=cpu", *overrides]))
    except UserError as error:
        return str(error)
    except (HydraException, OmegaConfBaseException) as error:
        return describe_config_error(error, overrides)
    return ""


@pytest.mark.parametrize("overrides, says", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_value_in_any_group_is_one_line_naming_key_value_and_what_is_allowed(overrides, says):
    line = one_line(overrides)
    assert says in line and "\n" not in line, line


# the same through the real command line: exit status 2, one line, the run directory (or sweep directory) as it was
CLI = [
    case
    for case in BAD
    if case[0][0]
    in (
        "seed=abc",
        "optim.lr=nan",
        "optim.betas=[0.9]",
        "optim.lr=inf",
        "trainer.max_steps=1.5",
        "cell.hidden_size=0",
        "model.num_layers=0",
        "dataset.split_sizes=[1,2]",
        "trainer.max_stepz=3",
    )
]


@pytest.mark.parametrize("overrides, says", CLI, ids=[" ".join(o) for o, _ in CLI])
def test_the_command_line_refuses_a_bad_value_before_writing_anything(tmp_path, overrides, says):
    existing, fresh = tmp_path / "existing", tmp_path / "fresh"
    existing.mkdir()
    (existing / "notes.txt").write_text("a run directory that already holds something\n")
    for run_dir in (existing, fresh):
        result = train_cli(["trainer=cpu", "logger=none", *overrides, f"hydra.run.dir={run_dir}"], timeout=120)
        assert_one_line_error(result, says)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]  # no .hydra/, no run.lock, no log
    assert not fresh.exists()


@pytest.mark.parametrize("launcher", ["basic", "joblib_pair"])
def test_a_sweep_with_one_bad_job_starts_none(tmp_path, launcher):
    """Every job's config is checked before the first job starts, whichever the launcher."""
    sweep_dir = tmp_path / "sweep"
    result = train_cli(
        [
            "--multirun",
            f"hydra/launcher={launcher}",
            "trainer=cpu",
            "logger=none",
            "optim.lr=0.001,nan",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        timeout=120,
    )
    assert_one_line_error(result, "optim.lr=nan must be a positive number (not inf or nan)")
    assert not sweep_dir.exists()


def test_flat_dir_escapes_path_separators_and_leaves_other_names_alone():
    assert flat_dir("+variant=lstm_1m,dataset=enwik8_sample,seed=0") == "+variant=lstm_1m,dataset=enwik8_sample,seed=0"
    assert flat_dir("dataset.path=/data/a b.txt,seed=1") == "dataset.path=%2Fdata%2Fa b.txt,seed=1"
    long = "dataset.path=/" + "x/" * 200 + ",seed=1"
    assert len(flat_dir(long).encode()) <= 255 and "/" not in flat_dir(long)
    assert flat_dir(long) == flat_dir(long) != flat_dir(long.replace("seed=1", "seed=2"))


def test_a_sweep_over_an_absolute_data_path_makes_flat_job_directories(enwik8_head200k, tmp_path):
    """A real multirun (Hydra's basic launcher, two tiny jobs) over dataset.path=/abs/path: each job's directory is
    one level under the sweep directory, named after its overrides with "/" written %2F."""
    sweep_dir = tmp_path / "sweep"
    copy = tmp_path / "corpora" / "copy.xml"
    copy.parent.mkdir()
    copy.write_bytes(enwik8_head200k.read_bytes())
    common = [
        "dataset=file",
        f"data_dir={tmp_path / 'data'}",
        "trainer=cpu",
        "logger=none",
        "cell=lstm",
        "cell.hidden_size=8",
        "trainer.batch_size=4",
        "trainer.seq_len=10",
        "trainer.max_steps=2",
        "trainer.eval_every=null",
        "trainer.eval_chars=500",
        "trainer.test_chars=500",
        "trainer.eval_batch_size=2",
        "trainer.threads=1",
        "trainer.progress=false",
    ]
    named_by = [arg.split("=")[0] for arg in common] + ["hydra.sweep.dir"]  # the names: the data path alone
    args = [
        "--multirun",
        *common,
        f"dataset.path={enwik8_head200k},{copy}",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(named_by)}]",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "mlstm.cli.train", *args], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep_dir.rglob("metrics.jsonl"))
    assert [job.parent for job in jobs] == [sweep_dir, sweep_dir]  # flat: no directory made from a path's parts
    expected = {f"dataset.path={str(corpus).replace('/', '%2F')}" for corpus in (enwik8_head200k, copy)}
    assert {job.name for job in jobs} == expected
    for job in jobs:
        assert max(r["step"] for r in read_metrics(job / "metrics.jsonl")) == 2
