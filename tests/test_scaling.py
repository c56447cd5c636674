"""The size-ladder analysis and report (mlstm.studies.scaling, mlstm.studies.scaling_report, scripts/scale_report.py) on
synthetic runs with a known trend.

Learning curves are exponentials valid(c) = floor + (start - floor) exp(-c / tau): a cell whose tau is r times the
LSTM's reaches every level in r times the LSTM's characters, so the ratio at each rung is known in advance. Here the
paper form's r falls with size (0.6, 0.45, 0.3: its advantage grows) and the gated seed cell's rises (0.7, 0.8,
0.95); at the largest rung the gated seed cell overfits after step 600.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlstm.studies import scaling, scaling_report
from mlstm.studies.runs import load_runs

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS, CHARS_PER_STEP = 800, 3200
RUNGS = {"300k": 300_000, "1m": 1_200_000, "5m": 4_800_000}
PAPER_RATIO = {"300k": 0.6, "1m": 0.45, "5m": 0.3}
GATED_RATIO = {"300k": 0.7, "1m": 0.8, "5m": 0.95}
FLOOR = {"300k": 3.2, "1m": 2.9, "5m": 2.6}  # final bpc falls with size
CELLS = {
    "lstm": {"name": "lstm", "impl": "cudnn"},
    "mlstm_paper": {"name": "mlstm", "form": "paper", "impl": "fast"},
    "mlstm_seed_gated": {"name": "mlstm", "form": "seed", "seed_output": "gated", "impl": "fast"},
}
TAU_LSTM = 900_000.0  # characters


def write_run(root: Path, dataset_dir: str, preset: str, lr: float, seed: int, params: int, valid, train=None):
    """A run directory as the trainer leaves it: config.yaml and metrics.jsonl (train every 10, valid every 50)."""
    import yaml

    cell = CELLS[preset.rsplit("_", 1)[0]]
    run = root / dataset_dir / preset / f"lr{lr:g}-seed{seed}"
    run.mkdir(parents=True)
    config = {
        "cell": {**cell, "hidden_size": 100},
        "seed": seed,
        "num_parameters": params,
        "dataset": {"name": "file", "path": "../shared/data/enwik8_head3M.xml"},
        "trainer": {"max_steps": STEPS, "batch_size": 32, "seq_len": 100},
        "optim": {"name": "adam", "lr": lr},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    train = train or (lambda c: valid(c) - 0.05)
    records = []
    for step in range(10, STEPS + 1, 10):
        chars = step * CHARS_PER_STEP
        records.append({"step": step, "chars": chars, "time": step * 0.1, "epoch": 0, "train/bpc": train(chars)})
        if step % 50 == 0:
            records.append({"step": step, "chars": chars, "time": step * 0.1, "valid/bpc": valid(chars)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def exp_curve(floor: float, tau: float, start: float = 5.0):
    return lambda c: floor + (start - floor) * math.exp(-c / tau)


def make_finals(root: Path, seeds=(100, 101, 102)):
    rng = np.random.default_rng(0)
    for rung, params in RUNGS.items():
        for seed in seeds:
            jitter = 1 + 0.01 * rng.standard_normal()
            tau = {
                "lstm": TAU_LSTM * jitter,
                "mlstm_paper": TAU_LSTM * PAPER_RATIO[rung] * jitter,
                "mlstm_seed_gated": TAU_LSTM * GATED_RATIO[rung] * jitter,
            }
            for cell, t in tau.items():
                valid = exp_curve(FLOOR[rung], t)
                train = None
                if cell == "mlstm_seed_gated" and rung == "5m":  # overfits: validation rises after step 600
                    base, turn = valid, 600 * CHARS_PER_STEP

                    def valid(c, base=base, turn=turn):
                        return base(c) + (6e-7 * (c - turn) if c > turn else 0)

                    def train(c, base=base):
                        return base(c) - 0.05

                write_run(
                    root,
                    "enwik8_sample",
                    f"{cell}_{rung}",
                    0.004,
                    seed,
                    int(params * (1.01 if cell != "lstm" else 1.0)),
                    valid,
                    train,
                )


def make_tuning(root: Path):
    """A 3-rate grid per cell and rung whose best rate halves with each rung (8e-3, 4e-3, 2e-3); the LSTM's 5m
    grid is shifted so that its best rate sits at the grid's top edge."""
    best = {"300k": 0.008, "1m": 0.004, "5m": 0.002}
    for rung, params in RUNGS.items():
        for cell in CELLS:
            grid = [best[rung] / 2, best[rung], best[rung] * 2]
            if cell == "lstm" and rung == "5m":
                grid = [best[rung] / 4, best[rung] / 2, best[rung]]
            for lr in grid:
                for seed in (0, 1):
                    floor = FLOOR[rung] + 0.2 * math.log2(lr / best[rung]) ** 2 + 0.001 * seed
                    write_run(root, "enwik8_sample", f"{cell}_{rung}", lr, seed, params, exp_curve(floor, TAU_LSTM))


def test_known_trend_in_the_gap_table(tmp_path):
    make_finals(tmp_path / "final")
    study = scaling.analyse(load_runs([str(tmp_path / "final")]))
    ds = study.datasets["enwik8_head3M"]
    assert ds.rungs == ["300k", "1m", "5m"]  # in increasing parameter count
    assert ds.params == {rung: float(count) for rung, count in RUNGS.items()}  # the LSTM's count is the x
    rows = {(g.rung, g.variant): g for g in scaling_report.headline_rows(ds)}
    for rung in RUNGS:
        paper, gated = rows[(rung, "mlstm-paper")], rows[(rung, "mlstm-seed-gated")]
        assert paper.ratio.value == pytest.approx(PAPER_RATIO[rung], rel=0.08)
        assert paper.ratio.low <= paper.ratio.value <= paper.ratio.high and paper.paired
        assert paper.n_seeds == 3 and paper.criterion == "lstm-best"
        if rung != "5m":  # (at 5m the gated cell's rise changes its curve after step 600, not before)
            assert gated.ratio.value == pytest.approx(GATED_RATIO[rung], rel=0.08)
    paper = [rows[(r, "mlstm-paper")].ratio.value for r in RUNGS]
    assert paper == sorted(paper, reverse=True)  # the paper form's ratio falls with size
    sentences = scaling_report.gap_sentences(ds)
    assert any("mlstm-paper" in s and "falls at every step" in s for s in sentences)
    assert any("mlstm-seed-gated" in s and "rises at every step" in s for s in sentences)
    # the final bpc per cell and rung, with its seed range, falls with size
    for cell in ("lstm", "mlstm-paper"):
        finals = [ds.cells[(r, cell)].stat("final_valid") for r in RUNGS]
        assert [m for m, _, _ in finals] == sorted((m for m, _, _ in finals), reverse=True)
        assert all(lo <= m <= hi for m, lo, hi in finals)
    # overfitting: only the gated seed cell at the largest rung, lowest validation at step 600, the gap growing
    overfit = ds.cells[("5m", "mlstm-seed-gated")]
    assert overfit.n_rising == 3 and overfit.best_step == 600 and overfit.stat("rise")[0] > 0.1
    assert overfit.onsets and min(overfit.onsets) > 600
    assert all(c.n_rising == 0 and not c.onsets for k, c in ds.cells.items() if k != ("5m", "mlstm-seed-gated"))
    words = " ".join(scaling_report.overfitting_sentences(ds))
    assert "mlstm-seed-gated at 5m (4.85M; 3/3 seeds" in words and "lowest validation at step 600" in words


def test_the_level_both_reach_has_a_ratio_where_the_lstms_best_level_has_none(tmp_path):
    """A cell 1.5x slower on the same floor ends above the LSTM: it never reaches the LSTM's best level (only a lower
    bound), but the level both reach is its own final level, which the LSTM got to in 1/1.5 of the budget. Where the
    cell is the faster one and ends lower (make_finals) the level both reach is the LSTM's best level, same ratio."""
    for seed, jitter in zip((100, 101, 102), (1.0, 1.01, 0.99)):
        for cell, tau in (("lstm", TAU_LSTM * jitter), ("mlstm_paper", 1.5 * TAU_LSTM * jitter)):
            write_run(
                tmp_path / "slow", "enwik8_sample", f"{cell}_1m", 0.004, seed, 1_200_000, exp_curve(FLOOR["1m"], tau)
            )
    ds = scaling.analyse(load_runs([str(tmp_path / "slow")])).datasets["enwik8_head3M"]
    (best,) = scaling_report.headline_rows(ds)
    (both,) = scaling_report.headline_rows(ds, "common")
    assert math.isnan(best.ratio.value) and best.fraction_reached < 1 and best.ratio_lower_bound > 1
    assert both.target > best.target and both.fraction_reached == 1
    assert both.ratio.value == pytest.approx(1.5, rel=0.03) and both.ratio.low <= both.ratio.value <= both.ratio.high
    assert any("the level both reach: 1.5" in s for s in scaling_report.gap_sentences(ds))

    make_finals(tmp_path / "fast")
    ds = scaling.analyse(load_runs([str(tmp_path / "fast")])).datasets["enwik8_head3M"]
    best = {(g.rung, g.variant): g for g in scaling_report.headline_rows(ds)}
    both = {(g.rung, g.variant): g for g in scaling_report.headline_rows(ds, "common")}
    assert best.keys() == both.keys() and len(both) == 6
    for key, g in best.items():
        if key != ("5m", "mlstm-seed-gated"):  # (it overfits after step 600 and ends above the LSTM's best level)
            assert both[key].target == g.target and both[key].ratio.value == g.ratio.value
    assert both[("5m", "mlstm-seed-gated")].target > best[("5m", "mlstm-seed-gated")].target


def test_selection_per_rung(tmp_path):
    make_tuning(tmp_path / "runs")
    selections = {(s.rung, s.variant): s for s in scaling.select_by_rung(load_runs([str(tmp_path / "runs")]))}
    assert len(selections) == 9  # 3 rungs x 3 cells: the rungs are never mixed into one grid
    for (rung, variant), s in selections.items():
        expected = {"300k": 0.008, "1m": 0.004, "5m": 0.002}[rung]
        assert s.selection.chosen == pytest.approx(expected)
        assert [r.lr for r in s.selection.rates] and len(s.selection.rates) == 3
        assert s.preset == f"{variant.replace('-', '_')}_{rung}" and s.dataset_choice == "enwik8_sample"
    edge = selections[("5m", "lstm")]
    assert edge.selection.at_edge and edge.next_lr == pytest.approx(0.004)
    inside = selections[("1m", "mlstm-paper")]
    assert not inside.selection.at_edge and inside.next_lr is None
    assert inside.as_dict()["final_command"] == (
        'make sweep SWEEP=scale_final_cpu ARGS="dataset=enwik8_sample +variant=mlstm_paper_1m optim.lr=0.004"'
    )


def test_rungs_from_parameter_counts_without_presets():
    from mlstm.studies.runs import Run

    def run(source, params):
        return Run(source, {"num_parameters": params, "dataset": {"name": "enwik8"}}, [{"step": 1}])

    runs = [run("a", 300_000), run("b", 305_000), run("c", 1_200_000), run("d", 1_190_000)]
    rungs = scaling.assign_rungs(runs)
    assert rungs["a"] == rungs["b"] != rungs["c"] == rungs["d"]
    assert scaling.preset_of("x/enwik8_sample/mlstm_seed_gated_20m/lr0.001-seed0") == (
        "enwik8_sample",
        "mlstm_seed_gated_20m",
        "20m",
    )


@pytest.mark.slow
def test_report_script_writes_figure_table_and_selection(tmp_path):
    make_finals(tmp_path / "final")
    make_tuning(tmp_path / "runs")
    out = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "scale_report.py"),
            "--final",
            str(tmp_path / "final"),
            "--tuning",
            str(tmp_path / "runs"),
            "--out",
            str(out),
            "--target",
            "enwik8_head3M=3.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figure = out / "enwik8_head3M_scale.png"
    assert figure.is_file() and figure.stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "enwik8_head3M_scale.png" in report and "falls at every step" in report
    assert "3.500 (fixed)" in report and "### Learning rates" in report
    assert "chosen rate 0.008 → 0.004 → 0.002; it falls as size grows" in report  # mlstm-paper's row
    rows = (out / "scale_summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 9 and rows[0].startswith("dataset,rung,variant,params")
    selection = json.loads((out / "selection.json").read_text())
    assert len(selection) == 9 and any(s["at_edge"] and s["next_lr"] == 0.004 for s in selection)
    assert "report.md" in done.stdout


# ------------------------------------------------------------------------------------- the CPU ladder's plan
def grid_runs(root: Path, preset: str, rates, best: float, seeds=(0, 1), params=300_000):
    """A grid of one preset whose score is lowest at `best` (the floor rises with log2 distance from it)."""
    for lr in rates:
        for seed in seeds:
            floor = 2.8 + 0.2 * math.log2(lr / best) ** 2 + 0.001 * seed
            write_run(root, "enwik8_sample", preset, lr, seed, params, exp_curve(floor, TAU_LSTM))


def test_plan_centres_new_grids_on_the_tuned_choice_then_extends_then_runs_the_seeds(tmp_path):
    from mlstm.studies import scale_plan, tuning

    tuned, runs = tmp_path / "tuned", tmp_path / "runs"
    grid_runs(tuned, "lstm_1m", [0.004, 0.008, 0.016], best=0.008, params=1_200_000)
    grid_runs(tuned, "mlstm_paper_1m", [0.002, 0.004, 0.008], best=0.004, params=1_200_000)
    grid_runs(tuned, "mlstm_seed_gated_1m", [0.001, 0.002], best=0.001, params=1_200_000)  # still at an edge
    centres = scale_plan.centres_from(tuning.select(load_runs([str(tuned)])), "enwik8_head3M")
    assert centres == {"lstm": 0.008, "mlstm-paper": 0.004}  # an edge choice centres nothing

    def commands(cells_by_rung):
        selections = scaling.select_by_rung(load_runs([str(runs)])) if runs.exists() else []
        return [
            s.command() for s in scale_plan.plan("enwik8_sample", "enwik8_head3M", cells_by_rung, centres, selections)
        ]

    tune = 'make sweep SWEEP=scale_tune_cpu ARGS="dataset=enwik8_sample +variant='
    # nothing run yet: 0.3M one step up from the 1.2M choice, 4.8M one step down
    assert commands({"300k": ["lstm", "mlstm_paper"], "5m": ["lstm"]}) == [
        tune + 'lstm_300k optim.lr=0.008,0.016,0.032 seed=0,1"',
        tune + 'mlstm_paper_300k optim.lr=0.004,0.008,0.016 seed=0,1"',
        tune + 'lstm_5m optim.lr=0.002,0.004,0.008 seed=0,1"',
    ]
    with pytest.raises(scale_plan.UserError, match="mlstm-seed-gated has no tuned 1.2M choice"):
        commands({"300k": ["mlstm_seed_gated"]})

    # the grids ran: the LSTM's best is at its top edge, the paper form's inside, so it gets its fresh seeds
    grid_runs(runs, "lstm_300k", [0.008, 0.016, 0.032], best=0.064)
    grid_runs(runs, "mlstm_paper_300k", [0.004, 0.008, 0.016], best=0.008)
    assert commands({"300k": ["lstm", "mlstm_paper"]}) == [
        tune + 'lstm_300k optim.lr=0.064 seed=0,1"',
        'make sweep SWEEP=scale_final_cpu ARGS="dataset=enwik8_sample +variant=mlstm_paper_300k optim.lr=0.008"',
    ]
    # the extension runs and the LSTM's best is inside: seeds for both
    grid_runs(runs, "lstm_300k", [0.064], best=0.032)
    assert commands({"300k": ["lstm"]}) == [
        'make sweep SWEEP=scale_final_cpu ARGS="dataset=enwik8_sample +variant=lstm_300k optim.lr=0.032"'
    ]

    # a grid with a run cut short (the study was stopped) is run again, rate for rate, to finish it
    grid_runs(runs, "lstm_5m", [0.002, 0.004, 0.008], best=0.004, params=4_800_000)
    cut = runs / "enwik8_sample" / "lstm_5m" / "lr0.008-seed1" / "metrics.jsonl"
    cut.write_text("".join(cut.read_text().splitlines(keepends=True)[:40]))
    assert commands({"5m": ["lstm"]}) == [tune + 'lstm_5m optim.lr=0.002,0.004,0.008 seed=0,1"']


def test_plan_below_a_grid_that_diverged_everywhere_and_exact_rate_names(tmp_path):
    from mlstm.studies import scale_plan

    grid_runs(tmp_path, "mlstm_paper_5m", [0.001, 0.002, 0.004], best=0.002, params=4_800_000)
    for metrics in tmp_path.rglob("metrics.jsonl"):  # every run ends on a divergence (trainer.on_divergence=end)
        metrics.write_text(metrics.read_text() + json.dumps({"step": 800, "event": "diverged"}) + "\n")
    selections = scaling.select_by_rung(load_runs([str(tmp_path)]))
    (step,) = scale_plan.plan("enwik8_sample", "enwik8_head3M", {"5m": ["mlstm_paper"]}, {}, selections)
    assert (step.kind, step.rates) == ("extend", (0.0005,))
    assert scale_plan.rate_text(0.004 / 2) == "0.002" and scale_plan.rate_text(0.1 * 3) == "0.3"
    assert scale_plan.initial_grid(0.004, "5m") == [0.001, 0.002, 0.004]
    with pytest.raises(scale_plan.UserError, match="no grid is defined for rung '20m'"):
        scale_plan.initial_grid(0.004, "20m")


@pytest.mark.slow
def test_plan_script_prints_the_commands_and_refuses_bad_input_in_one_line(tmp_path):
    tuned = tmp_path / "tuned"
    grid_runs(tuned, "lstm_1m", [0.004, 0.008, 0.016], best=0.008, params=1_200_000)
    script = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "scale_plan.py"),
        "enwik8_sample",
        "--tuned",
        str(tuned),
        "--runs",
        str(tmp_path / "runs"),
    ]
    done = subprocess.run(script + ["--rung", "300k=lstm"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        'make sweep SWEEP=scale_tune_cpu ARGS="dataset=enwik8_sample +variant=lstm_300k '
        'optim.lr=0.008,0.016,0.032 seed=0,1"\n'
    )
    for bad, message in (
        (["--rung", "300k"], "expected RUNG=CELL,CELL"),
        (["--rung", "300k=mlstm_paper"], "mlstm-paper has no tuned 1.2M choice"),
        (["--rung", "300k=lstm", "--tuning-seeds", "a"], "--tuning-seeds must be integers"),
    ):
        done = subprocess.run(script + bad, capture_output=True, text=True, timeout=120)
        # one line says what is wrong (argparse puts its usage above it), never a traceback
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and message in last and "Traceback" not in done.stderr, done.stderr


def test_test_split_and_cold_starts_per_cell_and_rung(tmp_path):
    make_finals(tmp_path / "final")
    for metrics in (tmp_path / "final").rglob("metrics.jsonl"):  # the test pass and the cold-start check
        preset, run = metrics.parts[-3], metrics.parts[-2]
        blown = preset == "lstm_5m" and run.endswith("seed100")
        last_train = [json.loads(line) for line in metrics.read_text().splitlines()][-2]["train/bpc"]
        record = {
            "step": STEPS,
            "chars": STEPS * CHARS_PER_STEP,
            "time": 80.0,
            "test/bpc": 40.0 if blown else last_train + 0.1,
            "test/cold_start_stream_bpc": [40.0, 39.0] + [last_train + 0.1] * 30 if blown else [last_train + 0.1] * 32,
        }
        metrics.write_text(metrics.read_text() + json.dumps(record) + "\n")
    study = scaling.analyse(load_runs([str(tmp_path / "final")]))
    cells = study.datasets["enwik8_head3M"].cells
    assert cells[("5m", "lstm")].n_test_unstable == 1 and cells[("5m", "lstm")].cold_starts == (2, 96)
    assert cells[("1m", "mlstm-paper")].n_test_unstable == 0 and cells[("1m", "mlstm-paper")].cold_starts == (0, 96)
    report = scaling_report.report_markdown(study, {})
    assert "### Test split" in report
    row = next(line for line in report.splitlines() if line.startswith("| 5m | lstm |") and "of 3 |" in line)
    assert row.endswith("| 1 of 3 | 2 of 96 |")
    csv_rows = {(r["rung"], r["variant"]): r for r in scaling_report.summary_rows(study)}
    assert csv_rows[("5m", "lstm")]["n_test_unstable"] == 1 and csv_rows[("5m", "lstm")]["cold_start_blown"] == 2
    assert csv_rows[("5m", "lstm")]["test_max"] == pytest.approx(40.0)
    # runs without a test pass: no test table (older runs, or a study stopped before its test passes)
    make_finals(tmp_path / "untested")
    assert "### Test split" not in scaling_report.report_markdown(
        scaling.analyse(load_runs([str(tmp_path / "untested")])), {}
    )


@pytest.mark.slow
def test_scale_study_runs_a_rung_from_grid_to_report_and_a_rerun_trains_nothing(enwik8_sample, tmp_path):
    """scripts/scale_study.sh on one rung and one cell, tiny models through the real sweeps: the grid centred on the
    committed 1.2M choice, extensions until the choice is inside, four fresh seeds with the cold-start check, the
    report; then the same command again finds everything finished."""
    tuned = REPO_ROOT / "results" / "convergence" / "tuned"
    if not (tuned / "runs" / "enwik8_sample" / "lstm_1m").is_dir():
        pytest.skip("the tuned study's enwik8 runs are not in this checkout")
    scale = tmp_path / "scale"
    tiny = (
        "logger=none cell.hidden_size=16 model.embedding_size=8 trainer.batch_size=4 trainer.seq_len=20 "
        "trainer.max_steps=4 trainer.eval_every=2 trainer.log_every=2 trainer.eval_chars=2000 "
        "trainer.test_chars=2000 trainer.cold_start_streams=4 trainer.checkpoint_every=4"
    )
    env = {
        **os.environ,
        "VENV": str(Path(sys.executable).parents[1]),
        "SCALE": str(scale),
        "TUNED": str(tuned),
        "RUN_ARGS": tiny,
        "CELLS_300k": "lstm",
        "MLSTM_SHARED_DATA": str(enwik8_sample.parent),
    }
    command = ["bash", "scripts/scale_study.sh", "enwik8_sample", "300k"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "optim.lr=0.008,0.016,0.032 seed=0,1" in done.stderr  # centred on the LSTM's 1.2M choice, 8e-3
    (selection,) = [s for s in json.loads((scale / "selection.json").read_text()) if s["rung"] == "300k"]
    rates = sorted(float(r) for r in selection["rates"])
    assert len(rates) >= 3 and rates[0] < selection["chosen_lr"] < rates[-1] and not selection["at_edge"]
    finals = sorted((scale / "final" / "enwik8_sample" / "lstm_300k").glob("*/metrics.jsonl"))
    assert [p.parent.name for p in finals] == [f"lr{selection['chosen_lr']:g}-seed{s}" for s in (100, 101, 102, 103)]
    for metrics in finals:
        (last,) = [json.loads(line) for line in metrics.read_text().splitlines() if '"test/bpc"' in line]
        assert len(last["test/cold_start_stream_bpc"]) == 4
    report = (scale / "report.md").read_text()
    assert "| 300k | lstm |" in report and "### Test split" in report
    before = {p: p.read_bytes() for p in scale.rglob("metrics.jsonl")}
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stderr and "parameters:" not in again.stderr  # no run trained again
    assert {p: p.read_bytes() for p in scale.rglob("metrics.jsonl")} == before
