"""Convergence statistics on synthetic curves with known answers, the run loader, and the plotting CLI end to end.

The end-to-end runs are linear in characters (valid bpc falls a fixed amount per character until a floor), so linear
interpolation between validation points is exact and the answers are known: the slow variant needs exactly 2x the
characters (and steps) of the fast one, and at 1.5x the seconds per step exactly 3x its seconds.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mlstm.studies import convergence as cv
from mlstm.studies.runs import dataset_label, find_run_dirs, load_runs, variant_label

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "plot_convergence.py"


def curve(chars, bpc, seconds_per_char=1e-4, chars_per_step=100) -> cv.Curve:
    chars = np.asarray(chars, dtype=float)
    return cv.Curve(
        {"steps": chars / chars_per_step, "chars": chars, "seconds": chars * seconds_per_char},
        np.asarray(bpc, dtype=float),
    )


# ---------------------------------------------------------------------------------------------------- first_reach
@pytest.mark.parametrize(
    "target, expected",
    [
        (2.5, 15.0),  # between points: interpolated on the segment 3 -> 2
        (3.0, 10.0),  # hit exactly at a measured point
        (5.0, 0.0),  # already below at the first point
        (4.0, 0.0),  # exactly equal at the first point
        (1.0, 30.0),  # reached exactly at the last point
    ],
)
def test_first_reach_on_piecewise_linear_curve(target, expected):
    assert cv.first_reach([0, 10, 20, 30], [4.0, 3.0, 2.0, 1.0], target) == pytest.approx(expected)


def test_first_reach_never_reached_is_nan():
    assert math.isnan(cv.first_reach([0, 10, 20], [4.0, 3.0, 2.0], 1.5))


def test_first_reach_takes_the_first_crossing_of_a_noisy_curve():
    # 4 -> 2 crosses 2.5 at 7.5; the later rise and fall must not matter
    assert cv.first_reach([0, 10, 20, 30], [4.0, 2.0, 3.0, 1.0], 2.5) == pytest.approx(7.5)


def test_value_at_interpolates_and_never_extrapolates():
    assert cv.value_at([0, 10], [4.0, 2.0], 5) == pytest.approx(3.0)
    assert math.isnan(cv.value_at([0, 10], [4.0, 2.0], 11))


# -------------------------------------------------------------------------------------------------- ratios and CIs
def two_x_slower_seeds(n_seeds=8):
    """Seeds of A (chars-to-target near 1M) and of B = 2 x A with a little independent noise."""
    rng = np.random.default_rng(123)
    a = 1e6 * (1 + 0.05 * rng.standard_normal(n_seeds))
    b = 2 * a * (1 + 0.02 * rng.standard_normal(n_seeds))
    return a, b


@pytest.mark.parametrize("paired", [True, False])
def test_ratio_ci_contains_two_and_excludes_one(paired):
    a, b = two_x_slower_seeds()
    ratio = cv.bootstrap_ratio_of_means(b, a, paired=paired)
    assert ratio.value == pytest.approx(b.mean() / a.mean())
    assert ratio.low < 2.0 < ratio.high
    assert ratio.low > 1.0


def test_bootstrap_is_reproducible_with_the_fixed_rng_seed():
    a, b = two_x_slower_seeds()
    assert cv.bootstrap_ratio_of_means(b, a) == cv.bootstrap_ratio_of_means(b, a)
    assert cv.bootstrap_mean(a) == cv.bootstrap_mean(a)


def test_pairing_needs_the_same_seeds():
    assert cv.pair_by_seed({0: 1.0, 1: 2.0}, {1: 20.0, 0: 10.0}) == ([1.0, 2.0], [10.0, 20.0], True)
    assert cv.pair_by_seed({0: 1.0, 1: 2.0}, {0: 10.0, 2: 20.0})[2] is False


def test_compare_reach_finds_the_known_ratio_and_nan_when_never_reached():
    chars = np.arange(1, 11) * 1e5
    fast = {s: curve(chars, 4.0 - 2e-6 * chars * (1 + 0.01 * s)) for s in range(3)}  # 2 bpc per 1M chars
    slow = {s: curve(chars, 4.0 - 1e-6 * chars * (1 + 0.01 * s)) for s in range(3)}  # half the slope
    stuck = {s: curve(chars, np.full(chars.size, 3.9)) for s in range(3)}
    rows = cv.compare_reach({"lstm": fast, "slow": slow, "stuck": stuck}, [3.5], "lstm", axes=("chars",))
    by_variant = {r.variant: r for r in rows}
    assert by_variant["slow"].ratio.value == pytest.approx(2.0)
    assert by_variant["slow"].fraction_reached == 1.0 and by_variant["slow"].paired
    assert by_variant["lstm"].ratio.value == pytest.approx(1.0)
    assert math.isnan(by_variant["stuck"].ratio.value)
    assert by_variant["stuck"].fraction_reached == 0.0
    assert "not every seed" in by_variant["stuck"].note


def test_ratio_is_nan_when_one_seed_misses_the_target():
    chars = np.arange(1, 11) * 1e5
    base = {s: curve(chars, 4.0 - 2e-6 * chars) for s in range(2)}
    half = {0: curve(chars, 4.0 - 2e-6 * chars), 1: curve(chars, np.full(chars.size, 3.9))}
    row = next(
        r for r in cv.compare_reach({"lstm": base, "v": half}, [3.0], "lstm", axes=("chars",)) if r.variant == "v"
    )
    assert row.fraction_reached == 0.5
    assert math.isnan(row.ratio.value) and math.isnan(row.mean.value)


# --------------------------------------------------------------------------------------------------- equal budget
def test_equal_char_budget_uses_the_end_of_the_shortest_run():
    long_run = curve([1e5, 2e5, 3e5, 4e5], [4.0, 3.0, 2.0, 1.0])
    short_run = curve([1e5, 2e5, 2.5e5], [4.0, 3.5, 3.25])
    rows = cv.compare_at_budget({"lstm": {0: long_run}, "v": {0: short_run}}, "lstm", "chars")
    by_variant = {r.variant: r for r in rows}
    assert by_variant["lstm"].budget == 2.5e5
    assert by_variant["lstm"].mean.value == pytest.approx(2.5)
    assert by_variant["v"].mean.value == pytest.approx(3.25)
    assert by_variant["v"].difference.value == pytest.approx(0.75)


def test_budget_difference_ci_across_seeds():
    chars = np.arange(1, 6) * 1e5
    base = {s: curve(chars, 3.0 - 1e-6 * chars + 0.01 * s) for s in range(5)}
    better = {s: curve(chars, 2.8 - 1e-6 * chars + 0.01 * s + 0.003 * (s % 2)) for s in range(5)}
    row = next(r for r in cv.compare_at_budget({"lstm": base, "v": better}, "lstm", "chars") if r.variant == "v")
    assert row.paired
    assert row.difference.low <= row.difference.value <= row.difference.high < 0
    assert row.minimum <= row.mean.value <= row.maximum


# ---------------------------------------------------------------------------------------------- targets and bands
def test_default_targets_lie_between_first_values_and_worst_best():
    targets = cv.default_targets(first_values=[4.0, 3.9, 3.8], best_values=[2.0, 2.5, 2.2], n=5)
    assert len(targets) == 5
    assert targets == sorted(targets, reverse=True)
    assert targets[-1] == pytest.approx(2.5) and targets[0] < 3.9


def test_parse_targets_sorts_easiest_first():
    assert cv.parse_targets("2.0, 2.5,2.2") == [2.5, 2.2, 2.0]


def test_mean_band_on_the_common_range():
    band = cv.mean_band([([0, 10], [0.0, 10.0]), ([2, 8], [2.0, 8.0 + 6.0])], points=7)
    assert band.grid[0] == 2 and band.grid[-1] == 8
    # second curve: y = 2 + 2 (x - 2) on [2, 8]; first: y = x
    expected_second = 2 + 2 * (band.grid - 2)
    np.testing.assert_allclose(band.mean, (band.grid + expected_second) / 2)
    np.testing.assert_allclose(band.low, np.minimum(band.grid, expected_second))
    t95 = cv.mean_band([([0, 10], [1.0, 1.0]), ([0, 10], [3.0, 3.0])], points=3, band="t95")
    np.testing.assert_allclose(t95.mean, 2.0)
    np.testing.assert_allclose(t95.high - t95.mean, 12.706 * 1.0)  # sd sqrt(2) / sqrt(2) = 1


# ----------------------------------------------------------------------------------------------- synthetic runs
CHARS_PER_STEP = 32 * 100


def write_run(
    run_dir: Path,
    cell: dict,
    seed: int,
    steps: int,
    bpc_per_mchar: float,
    seconds_per_step: float,
    corpus: Path,
    cut_last_line: bool = True,
) -> None:
    """A run directory as the trainer writes it: config.yaml and metrics.jsonl (last line cut short by a 'crash')."""
    run_dir.mkdir(parents=True)
    cell_yaml = ", ".join(f"{k}: {v}" for k, v in cell.items())
    (run_dir / "config.yaml").write_text(
        f"seed: {seed}\ncell: {{{cell_yaml}, hidden_size: 64}}\n"
        f"dataset: {{name: file, path: {corpus}, split_fractions: [0.9, 0.05, 0.05]}}\n"
        f"trainer: {{batch_size: 32, seq_len: 100, device: cpu}}\n"
    )
    lines = []
    for step in range(10, steps + 1, 10):
        chars, time = step * CHARS_PER_STEP, step * seconds_per_step
        bpc = max(1.5, 4.0 - bpc_per_mchar * chars / 1e6)
        lines.append(
            {
                "step": step,
                "chars": chars,
                "time": time,
                "train/bpc": bpc + 0.05,
                "train/lr": 1e-3,
                "train/grad_norm": 1.0,
                "perf/chars_per_s": CHARS_PER_STEP / seconds_per_step,
            }
        )
        if step % 50 == 0:
            lines.append({"step": step, "chars": chars, "time": time, "valid/bpc": bpc})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if cut_last_line:
        text += '{"step": 99999, "chars": 3'
    (run_dir / "metrics.jsonl").write_text(text)


@pytest.fixture()
def sweep(tmp_path) -> Path:
    """2 variants x 2 seeds; mLSTM needs 2x the characters and 1.5x the seconds per step; one run is shorter."""
    corpus = tmp_path / "toy.txt"
    corpus.write_bytes(b"ab" * 5000)  # unigram entropy exactly 1 bit
    root = tmp_path / "multirun"
    for seed in (0, 1):
        write_run(root / f"cell=lstm,seed={seed}", {"name": "lstm", "impl": "cudnn"}, seed, 400, 2.0, 0.01, corpus)
        write_run(
            root / f"cell=mlstm,seed={seed}",
            {"name": "mlstm", "form": "paper", "impl": "fast"},
            seed,
            400 if seed == 0 else 300,
            1.0,
            0.015,
            corpus,
        )
    return root


def test_variant_and_dataset_labels():
    assert variant_label({"cell": {"name": "lstm", "impl": "cudnn"}}) == "lstm"
    assert variant_label({"cell": {"name": "lstm", "impl": "loop"}}) == "lstm-loop"
    assert variant_label({"cell": {"name": "mlstm", "form": "seed", "impl": "reference"}}) == "mlstm-seed"
    assert variant_label({"cell": {"name": "mlstm", "form": "paper", "impl": "fast"}}) == "mlstm-paper"
    seed = {"name": "mlstm", "form": "seed", "impl": "fast"}
    assert variant_label({"cell": {**seed, "init_scale": 1.0}}) == "mlstm-seed"  # the default scale is no variant
    assert variant_label({"cell": {**seed, "init_scale": 1.5}}) == "mlstm-seed-init1.5"
    assert variant_label({"cell": {**seed, "init_scale": 2}}) == "mlstm-seed-init2"
    assert variant_label({"cell": {**seed, "seed_output": "gated"}}) == "mlstm-seed-gated"
    assert variant_label({"cell": {**seed, "seed_output": "posted"}}) == "mlstm-seed"
    assert variant_label({"cell": {"name": "lstm", "hidden_size": 128}}, "cell.name,cell.hidden_size") == "lstm-128"
    assert dataset_label({"dataset": {"name": "file", "path": "/data/enwik8_head3M.xml"}}) == "enwik8_head3M"
    assert dataset_label({"dataset": {"name": "text8"}}) == "text8"


def test_runs_are_found_and_a_cut_line_is_ignored(sweep):
    assert len(find_run_dirs([str(sweep)])) == 4
    assert len(find_run_dirs([str(sweep / "cell=lstm*")])) == 2  # a glob
    runs = load_runs([str(sweep)])
    assert sorted(r.label for r in runs) == ["lstm", "lstm", "mlstm-paper", "mlstm-paper"]
    assert all(r.last("step") <= 400 for r in runs)  # the cut-off record (step 99999) is not read
    short = next(r for r in runs if r.label == "mlstm-paper" and r.seed == 1)
    assert short.curve("valid/bpc").x["chars"][-1] == 300 * CHARS_PER_STEP


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )


@pytest.mark.slow
def test_plot_convergence_end_to_end(sweep, tmp_path):
    out = tmp_path / "out"
    result = run_script(sweep, "--out", out)
    assert result.returncode == 0, result.stderr
    for metric in ("valid", "train"):
        for axis in ("steps", "chars", "seconds"):
            assert (out / f"toy_{metric}_vs_{axis}.png").stat().st_size > 1000
    assert (out / "toy_convergence.png").stat().st_size > 1000

    with open(out / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {
        "dataset",
        "variant",
        "kind",
        "target_bpc",
        "chars_ratio",
        "chars_ratio_ci_low",
        "chars_ratio_ci_high",
        "seconds_ratio",
        "steps_ratio",
        "fraction_reached",
        "bpc_mean",
        "bpc_diff",
    } <= set(rows[0])
    reach = [r for r in rows if r["kind"] == "to_target" and r["variant"] == "mlstm-paper"]
    assert len(reach) == 5  # the automatic ladder
    for row in reach:
        assert float(row["fraction_reached"]) == 1.0
        assert float(row["chars_ratio"]) == pytest.approx(2.0)
        assert float(row["steps_ratio"]) == pytest.approx(2.0)
        assert float(row["seconds_ratio"]) == pytest.approx(3.0)
    equal_chars = {r["variant"]: r for r in rows if r["kind"] == "equal_chars"}
    assert float(equal_chars["lstm"]["budget"]) == 300 * CHARS_PER_STEP  # the shorter mLSTM run's end
    assert float(equal_chars["mlstm-paper"]["bpc_diff"]) == pytest.approx(0.96)  # (2.0 - 1.0) * 0.96M chars
    assert {r["kind"] for r in rows} == {"to_target", "equal_chars", "equal_time"}

    report = (out / "report.md").read_text()
    assert "lstm" in report and "mlstm-paper" in report
    assert "2.00×" in report and "3.00×" in report
    assert "cell=mlstm,seed=1" in report  # the runs used are listed
    assert "unigram entropy of the training text: 1.000 bits" in report.lower()  # computed from toy.txt ("ab"*)


@pytest.mark.slow
def test_explicit_targets_and_unreached_level(sweep, tmp_path):
    out = tmp_path / "out"
    result = run_script(sweep, "--out", out, "--targets", "3.5,1.0", "--band", "t95", "--logx", "--svg")
    assert result.returncode == 0, result.stderr
    assert (out / "toy_valid_vs_chars.svg").stat().st_size > 1000
    rows = [r for r in csv.DictReader(open(out / "summary.csv", newline="")) if r["kind"] == "to_target"]
    unreached = next(r for r in rows if r["variant"] == "mlstm-paper" and r["target_bpc"] == "1")
    assert float(unreached["fraction_reached"]) == 0.0 and unreached["chars_ratio"] == ""
    assert unreached["note"]


@pytest.mark.slow
@pytest.mark.parametrize("make_path", [lambda tmp: tmp / "does-not-exist", lambda tmp: tmp])
def test_missing_path_or_no_runs_exits_with_one_line(tmp_path, make_path):
    result = run_script(make_path(tmp_path), "--out", tmp_path / "out")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")


def test_collected_run_directories_are_named_by_variant(tmp_path):
    """scripts/collect_runs.py (mlstm.studies.collect_runs): one directory per variant and seed, named as the plots
    label it."""
    from mlstm.studies import collect_runs as collect

    cells = [
        dict(name="lstm", impl="cudnn"),
        dict(name="lstm", impl="loop"),
        dict(name="mlstm", form="seed", seed_output="gated", init_scale=2.0),
    ]
    names = []
    for i, cell in enumerate(cells):
        path = tmp_path / f"{i}.yaml"
        OmegaConf.save(OmegaConf.create({"cell": {**cell, "hidden_size": 8}, "seed": 1}), path)
        names.append(collect.run_name(path))
    assert names == ["lstm-h8-seed1", "lstm-loop-h8-seed1", "mlstm-seed-gated-init2-h8-seed1"]
