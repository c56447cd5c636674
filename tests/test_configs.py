"""Every config in configs/ composes, and the paper presets have the paper's parameter counts."""

from pathlib import Path

import pytest

from mlstm.cli import CONFIG_DIR
from mlstm.config import load_config
from mlstm.errors import UserError
from mlstm.model import count_parameters

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())
# groups not in train.yaml's defaults list are added with "+"
OPTIONAL_GROUPS = {"experiment", "sweep", "variant"}


def all_choices():
    for group in GROUPS:
        for path in sorted((Path(CONFIG_DIR) / group).glob("*.yaml")):
            prefix = "+" if group in OPTIONAL_GROUPS else ""
            yield f"{prefix}{group}={path.stem}"


@pytest.mark.parametrize("override", list(all_choices()))
def test_every_config_composes_and_resolves(override):
    cfg = load_config([override, "dataset.path=/tmp/x"] if "dataset=file" in override else [override])
    container = cfg.copy()
    # every interpolation resolves (missing mandatory values are allowed only for dataset.path / hf_name)
    for key in ("cell", "model", "trainer", "optim", "logger"):
        assert container[key] is not None
        _ = {k: container[key][k] for k in container[key]}
    assert cfg.cell.hidden_size > 0


def test_default_is_the_papers_mlstm_on_enwik8():
    cfg = load_config()
    assert (cfg.cell.name, cfg.cell.form, cfg.dataset.name) == ("mlstm", "paper", "enwik8")
    assert cfg.dataset.checksum == "a1fa5ffddb56f4953e226637dabbb36a"
    assert cfg.trainer.device == "auto"


def test_unknown_group_choice_is_one_line():
    with pytest.raises(UserError, match=r"unknown cell 'gru'; choose one of: lstm, mlstm"):
        load_config(["cell=gru"])


@pytest.mark.parametrize(
    "experiment, expected",
    [
        ("paper_hutter_mlstm", 20.40e6),
        ("paper_hutter_lstm", 21.32e6),
        ("paper_hutter_large", 45.50e6),
        ("paper_text8_large", 44.93e6),
    ],
)
def test_paper_presets_have_the_papers_parameter_counts(experiment, expected):
    count = count_parameters(load_config([f"+experiment={experiment}"]))
    assert abs(count - expected) / expected < 0.01, count


# the cells every scale must have: the 1m and 20m studies also have the posted seed cell; the size ladder's new
# rungs (results/convergence/scale) have the LSTM, the paper form and the seed cell with the gated output
REQUIRED_AT_SCALE = {
    "300k": ("lstm", "mlstm_paper", "mlstm_seed_gated"),
    "1m": ("lstm", "mlstm_paper", "mlstm_seed"),
    "5m": ("lstm", "mlstm_paper", "mlstm_seed_gated"),
    "20m": ("lstm", "mlstm_paper", "mlstm_seed"),
}


# enwik8's 205 symbols, text8's 27, and the 200 bytes present in the enwik8 sample (../shared/data)
@pytest.mark.parametrize("dataset, vocab_size", [("enwik8", 205), ("text8", 27), ("enwik8", 200)])
@pytest.mark.parametrize("scale", list(REQUIRED_AT_SCALE))
def test_study_variants_have_equal_parameter_counts(dataset, vocab_size, scale):
    """Fair comparison: every variant of a study scale within 2% of the LSTM's parameter count."""
    variants = sorted(p.stem for p in (Path(CONFIG_DIR) / "variant").glob(f"*_{scale}.yaml"))
    assert {f"{cell}_{scale}" for cell in REQUIRED_AT_SCALE[scale]} <= set(variants)
    counts = {
        v: count_parameters(load_config([f"+variant={v}", f"dataset={dataset}", f"dataset.vocab_size={vocab_size}"]))
        for v in variants
    }
    baseline = counts["lstm_" + scale]
    for variant, count in counts.items():
        assert abs(count - baseline) / baseline < 0.02, (variant, count, baseline)
