"""The learning-rate selection rule (mlstm.studies.tuning) on synthetic runs with a known answer, the sensitivity
figure, and a real tiny grid through Hydra's multirun and the joblib launcher (tune_lr_cpu), then the Optuna sweeper."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from cli_helpers import REPO_ROOT, train_cli
from mlstm.studies import tuning, tuning_report
from mlstm.studies.runs import Run, load_runs, variant_label
from mlstm.training.tracking import read_metrics

BUDGET = 800


def synthetic_run(
    lr: float,
    seed: int,
    late: float,
    *,
    variant: str = "lstm",
    diverge_at: int | None = None,
    early: float = 4.0,
    train_gap: float = 0.0,
    dataset: str = "toy",
) -> Run:
    """A run whose validation bpc falls linearly from `early` at step 50 to `late` at step 600 and stays there
    (the last-quarter mean is then exactly `late`), its training bpc `train_gap` below its validation bpc."""
    records = []
    for step in range(50, BUDGET + 1, 50):
        if diverge_at is not None and step > diverge_at:
            records.append({"step": diverge_at, "chars": diverge_at * 3200, "time": 1.0, "event": "diverged"})
            break
        valid = early + (late - early) * min(1.0, (step - 50) / 550)
        records.append({"step": step, "chars": step * 3200, "time": step * 0.2, "train/bpc": valid - train_gap})
        records.append({"step": step, "chars": step * 3200, "time": step * 0.2, "valid/bpc": valid})
    name, _, form = variant.partition("-")
    config = {
        "cell": {"name": name, "form": form or None, "impl": "fast" if form else "cudnn", "hidden_size": 8},
        "dataset": {"name": dataset},
        "optim": {"lr": lr},
        "trainer": {"max_steps": BUDGET},
        "seed": seed,
    }
    run = Run(f"{variant}/lr{lr}-seed{seed}", config, records)
    run.label = variant_label(config)
    return run


def grid(scores: dict, seeds=(0, 1), **kwargs) -> list[Run]:
    """{lr: late bpc or a per-seed list} -> runs."""
    runs = []
    for lr, late in scores.items():
        for i, seed in enumerate(seeds):
            value = late[i] if isinstance(late, (list, tuple)) else late
            if value is not None:
                runs.append(synthetic_run(lr, seed, value, **kwargs))
    return runs


def test_run_score_is_the_mean_of_the_last_quarter():
    run = synthetic_run(1e-3, 0, 3.0, early=5.0)
    points = tuning.late_points(run.records, BUDGET)
    assert [step for step, _ in points] == [600, 650, 700, 750, 800]
    assert tuning.run_score(run.records, BUDGET) == pytest.approx(3.0)
    # a run that has not reached the last quarter has no score yet: the worst
    assert tuning.run_score([r for r in run.records if r["step"] < 600], BUDGET) == math.inf
    # a non-finite validation bpc in the last quarter is the worst too
    spoilt = run.records + [{"step": 800, "chars": 1, "time": 1, "valid/bpc": float("nan")}]
    assert tuning.run_score(spoilt, BUDGET) == math.inf


def test_selection_picks_the_argmin_strictly_inside():
    (sel,) = tuning.select(grid({1e-3: 3.0, 2e-3: 2.6, 4e-3: 2.4, 8e-3: 2.5, 1.6e-2: 2.9}))
    assert sel.chosen == 4e-3 and not sel.at_edge and not sel.notes
    assert sel.chosen_score == pytest.approx(2.4)
    assert sel.seeds == [0, 1] and sel.span == pytest.approx(16)


def test_a_late_blow_up_is_not_picked_by_one_good_evaluation_point():
    runs = grid({1e-3: 3.0, 2e-3: 2.7, 4e-3: 2.8})
    # 4e-3 seed 1: best early, then blows up to 6 bpc for the last evaluation points (finite: no divergence event)
    blown = synthetic_run(8e-3, 0, 2.5)
    for record in blown.records:
        if record["step"] >= 700 and "valid/bpc" in record:
            record["valid/bpc"] = 6.0
    runs += [blown, synthetic_run(8e-3, 1, 2.5)]
    (sel,) = tuning.select(runs)
    assert sel.chosen == 2e-3  # 8e-3 scores (2.5 * 2 + 6 * 3) / 5 = 4.6 on seed 0


def test_ties_go_to_the_smaller_rate():
    (sel,) = tuning.select(grid({1e-3: 3.0, 2e-3: 2.5, 4e-3: 2.5, 8e-3: 2.9}))
    assert sel.chosen == 2e-3


def test_a_diverged_run_counts_as_the_worst():
    # 4e-3 would win on seed 0, but its seed 1 diverged: the rate scores +inf and is never chosen
    runs = grid({1e-3: 3.0, 2e-3: 2.8, 8e-3: 2.9}) + [
        synthetic_run(4e-3, 0, 2.0),
        synthetic_run(4e-3, 1, 2.0, diverge_at=300),
    ]
    (sel,) = tuning.select(runs)
    rate = next(r for r in sel.rates if r.lr == 4e-3)
    assert rate.score == math.inf and rate.diverged_seeds == [1]
    assert sel.chosen == 2e-3
    assert tuning.final_valid(runs[-1].records, BUDGET) == math.inf


def test_every_rate_diverged_means_no_choice():
    runs = [synthetic_run(lr, 0, 2.0, diverge_at=100) for lr in (1e-3, 2e-3, 4e-3)]
    (sel,) = tuning.select(runs)
    assert sel.chosen is None and not sel.at_edge
    assert "no rate chosen" in sel.notes[0]


@pytest.mark.parametrize(
    "scores, chosen, side, next_rate",
    [
        ({1e-3: 2.4, 2e-3: 2.6, 4e-3: 2.9}, 1e-3, "smallest", "0.0005"),
        ({1e-3: 3.0, 2e-3: 2.6, 4e-3: 2.3}, 4e-3, "largest", "0.008"),
    ],
)
def test_a_best_rate_at_the_grid_edge_is_flagged(scores, chosen, side, next_rate):
    (sel,) = tuning.select(grid(scores))
    assert sel.chosen == chosen and sel.at_edge
    assert side in sel.notes[0] and next_rate in sel.notes[0]


def test_unequal_seed_counts_compare_every_rate_on_the_common_seeds():
    # 2e-3 has a bad seed 1 that 4e-3 lacks: on the mean of its own seeds 4e-3 would win by missing it
    runs = grid({1e-3: [3.0, 3.0], 2e-3: [2.5, 3.3], 4e-3: [2.6, None], 8e-3: [2.9, 2.9]})
    (sel,) = tuning.select(runs)
    assert sel.seeds == [0]
    assert {r.lr: r.score for r in sel.rates}[2e-3] == pytest.approx(2.5)  # seed 0 only
    assert sel.chosen == 2e-3
    assert any("common seeds 0" in note for note in sel.notes)


def test_unstable_runs_are_reported():
    runs = grid({1e-3: 3.0, 2e-3: 2.8}) + grid({4e-3: 2.7}, train_gap=2.5)  # valid 2.5 bpc above train
    (sel,) = tuning.select(runs)
    rates = {r.lr: r for r in sel.rates}
    assert rates[4e-3].unstable_seeds == [0, 1] and rates[2e-3].unstable_seeds == []


def test_a_final_run_whose_test_bpc_blows_up_is_flagged_in_the_test_table():
    finals = [synthetic_run(8e-3, seed, 2.6) for seed in (100, 101)]
    finals += [synthetic_run(4e-3, seed, 2.5, variant="mlstm-paper") for seed in (100, 101)]
    for run, test in zip(finals, (41.9, 2.65, 2.52, 2.50)):  # train bpc 2.6 / 2.5 at the end
        run.records.append({"step": BUDGET, "chars": BUDGET * 3200, "time": 200.0, "test/bpc": test})
    assert [tuning.unstable_on(r.records) for r in finals] == [True, False, False, False]
    table = "\n".join(tuning_report.test_table(finals, "lstm", n_resamples=200))
    assert "| 1 of 2 | 100: 41.900†, 101: 2.650 |" in table
    assert "| 0 of 2 | 100: 2.520, 101: 2.500 |" in table


def test_posthoc_check_sets_other_rates_beside_the_finals_relative_to_the_baseline_at_its_own():
    def with_test(run, test):
        run.records.append({"step": BUDGET, "chars": BUDGET * 3200, "time": 200.0, "test/bpc": test})
        return run

    finals = [with_test(synthetic_run(8e-3, s, 2.6), t) for s, t in ((100, 41.9), (101, 2.61))]
    finals += [with_test(synthetic_run(4e-3, s, 2.5, variant="mlstm-paper"), 2.52) for s in (100, 101)]
    finals += [with_test(synthetic_run(4e-3, s, 5.2, variant="mlstm-seed"), 5.1) for s in (100, 101)]
    posthoc = [with_test(synthetic_run(4e-3, s, 2.7), 2.68) for s in (100, 101)]
    posthoc += [with_test(synthetic_run(2e-3, s, 2.9, variant="mlstm-paper"), 2.85) for s in (100, 101)]
    text = "\n".join(tuning_report.posthoc_lines(finals, posthoc, [3.4, 3.0], "lstm", n_resamples=200))
    assert "not part of the rule" in text and "Ratios and differences are to lstm @ 0.004." in text
    assert "mlstm-seed" not in text  # a cell without post-hoc runs stays out of the check
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
        for line in text.splitlines()
        if line.startswith("| ")
    }

    # the paper form at its chosen rate reaches 3.4 before the LSTM at 4e-3 (late 2.5 against 2.7), at 2e-3 after
    def ratio(key):
        return float(rows[key].split("|")[3].split("×")[0])

    assert ratio(("mlstm-paper @ 0.004", "3.4")) < 1 < ratio(("mlstm-paper @ 0.002", "3.4"))
    assert ("lstm @ 0.004", "3.4") not in rows  # the baseline has no ratio to itself
    # the test table: the blow-up at the chosen rate, none at the post-hoc one; differences to the post-hoc LSTM
    assert "| lstm @ 0.008 | 0.008 |" in text and "| 1 of 2 | 100: 41.900†, 101: 2.610 |" in text
    assert "| lstm @ 0.004 | 0.004 | 2.680" in text and "| 0 of 2 | 100: 2.680, 101: 2.680 |" in text
    paper = next(line for line in text.splitlines() if line.startswith("| mlstm-paper @ 0.004 | 0.004 |"))
    assert paper.split("|")[4].strip().startswith("-0.160")  # 2.52 - 2.68
    # the LSTM rerun at its chosen rate among the post-hoc runs replaces its final runs there, seed for seed
    rerun = [with_test(synthetic_run(8e-3, s, 2.6), 2.62) for s in (100, 101)]
    text = "\n".join(tuning_report.posthoc_lines(finals, posthoc + rerun, [3.4], "lstm", n_resamples=200))
    assert "| lstm @ 0.008 | 0.008 |" in text and "| 0 of 2 | 100: 2.620, 101: 2.620 |" in text
    assert "41.900" not in text


def test_cold_start_blow_ups_are_counted_per_stream_and_tabled():
    lstm = [synthetic_run(8e-3, seed, 2.6) for seed in (100, 101)]  # last train bpc 2.6: blown above 3.6
    paper = [synthetic_run(4e-3, 100, 2.5, variant="mlstm-paper")]
    for run, streams in zip(lstm + paper, ([2.5, 36.7, 2.6, float("nan")], [2.4, 2.7, 3.5, 2.6], [2.4] * 4)):
        run.records.append(
            {
                "step": BUDGET,
                "chars": BUDGET * 3200,
                "time": 200.0,
                "test/bpc": 2.6,
                "test/cold_start_stream_bpc": streams,
            }
        )
    assert [tuning.blown_streams(r.records) for r in lstm + paper] == [(2, 4), (0, 4), (0, 4)]
    assert tuning.blown_streams(synthetic_run(1e-3, 0, 3.0).records) is None  # no check in this run
    text = "\n".join(tuning_report.cold_start_lines(lstm + paper))
    assert "| lstm | 0.008 | 2 of 8 (25%) | 1 of 2 | 100: 2 of 4, 101: 0 of 4 |" in text
    assert "| mlstm-paper | 0.004 | 0 of 4 (0%) | 0 of 1 | 100: 0 of 4 |" in text
    assert tuning_report.cold_start_lines([synthetic_run(1e-3, 0, 3.0)]) == []  # runs without it: no table


def test_the_target_ladder_extends_to_the_best_pair_with_the_baseline():
    finals = [synthetic_run(8e-3, s, 2.60) for s in (100, 101)]
    finals += [synthetic_run(4e-3, s, late, variant="mlstm-paper") for s, late in ((100, 2.64), (101, 2.67))]
    finals += [synthetic_run(2e-3, s, 3.15, variant="mlstm-seed") for s in (100, 101)]  # learns slowly: no limit
    assert tuning_report.pair_floor(finals, "lstm") == pytest.approx(2.67)
    assert tuning_report.extend_targets([4.5, 4.0, 3.6, 3.4], 2.67) == [4.5, 4.0, 3.6, 3.4, 3.2, 3.0, 2.8]
    assert tuning_report.extend_targets([3.0], 2.1) == [3.0, 2.6, 2.2]


def test_cells_and_datasets_are_selected_separately():
    runs = grid({1e-3: 3.0, 2e-3: 2.5, 4e-3: 2.8}) + grid({2e-3: 2.9, 4e-3: 2.2, 8e-3: 2.4}, variant="mlstm-paper")
    runs += grid({1e-3: 2.0, 2e-3: 1.8, 4e-3: 1.9}, dataset="other")
    chosen = {(s.dataset, s.variant): s.chosen for s in tuning.select(runs)}
    assert chosen == {("toy", "lstm"): 2e-3, ("toy", "mlstm-paper"): 4e-3, ("other", "lstm"): 2e-3}


def test_sensitivity_figure_and_table_from_synthetic_runs(tmp_path):
    runs = grid({1e-3: 3.0, 2e-3: 2.5, 4e-3: 2.8}) + grid({2e-3: 2.9, 4e-3: 2.2, 8e-3: 2.4}, variant="mlstm-paper")
    runs.append(synthetic_run(8e-3, 0, 2.0, diverge_at=200))
    runs.append(synthetic_run(8e-3, 1, 2.0, diverge_at=250))
    selections = tuning.select(runs)
    path = tuning_report.sensitivity_figure(selections, tmp_path / "sens.png", "toy", unigram_entropy=4.5)
    assert path.stat().st_size > 10_000
    rows = {(r["variant"], r["lr"]): r for r in tuning_report.sensitivity_rows(selections)}
    assert rows[("lstm", "0.002")]["chosen"] == "true" and rows[("lstm", "0.008")]["final_mean"] == "inf"
    assert rows[("lstm", "0.008")]["diverged_seeds"] == "0 1"
    table = "\n".join(tuning_report.grid_table(selections))
    assert "**2.500**" in table and "**2.200**" in table and "inf✗" in table


@pytest.mark.slow
def test_tiny_grid_through_multirun_and_the_joblib_launcher(enwik8_sample, tmp_path):
    """2 cells x 2 rates x 2 steps through the real sweep config; the rule picks the argmin of the scores the runs
    returned; a rerun trains nothing and changes nothing."""
    sweep_dir = tmp_path / "grid"
    args = [
        "--multirun",
        "+sweep=tune_lr_cpu",
        "dataset=file",
        f"dataset.path={enwik8_sample}",
        "+variant=lstm_1m,mlstm_paper_1m",
        "optim.lr=0.002,0.02",
        "seed=0",
        "logger=none",
        "cell.hidden_size=16",
        "trainer.batch_size=4",
        "trainer.seq_len=20",
        "trainer.max_steps=2",
        "trainer.eval_every=1",
        "trainer.eval_chars=2000",
        "trainer.eval_batch_size=2",
        "model.embedding_size=8",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    done = train_cli(args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dirs = sorted(p.parent for p in sweep_dir.rglob("metrics.jsonl"))
    for run_dir in run_dirs:  # the joblib launcher ran the jobs, two at a time
        launcher = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["launcher"]
        assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2
    assert [p.relative_to(sweep_dir).as_posix() for p in run_dirs] == [
        "file/lstm_1m/lr0.002-seed0",
        "file/lstm_1m/lr0.02-seed0",
        "file/mlstm_paper_1m/lr0.002-seed0",
        "file/mlstm_paper_1m/lr0.02-seed0",
    ]
    for run_dir in run_dirs:  # tuning runs never touch the test split
        assert not any("test/bpc" in r for r in read_metrics(run_dir / "metrics.jsonl"))
    scores = {}
    for run in load_runs([str(sweep_dir)]):
        scores.setdefault(run.label, {})[run.config["optim"]["lr"]] = tuning.run_score(run.records, 2)
    out = tmp_path / "selection.json"
    select = subprocess.run(
        [sys.executable, "scripts/tune.py", "select", str(sweep_dir), "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert select.returncode == 0, select.stderr
    for entry in json.loads(out.read_text()):
        by_lr = scores[entry["variant"]]
        assert entry["chosen_lr"] == min(by_lr, key=lambda lr: (by_lr[lr], lr))
        assert entry["at_edge"]  # a 2-rate grid: every choice is at an edge, and says so
    before = {p: p.read_bytes() for p in sweep_dir.rglob("metrics.jsonl")}
    again = train_cli(args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("nothing to do") == 4
    assert {p: p.read_bytes() for p in sweep_dir.rglob("metrics.jsonl")} == before


@pytest.mark.slow
def test_optuna_sweeper_runs_two_trials_ranked_by_the_rule(enwik8_sample, tmp_path):
    sweep_dir = tmp_path / "optuna"
    args = [
        "--multirun",
        "+sweep=optuna_lr",
        "+variant=lstm_1m",
        "dataset=file",
        f"dataset.path={enwik8_sample}",
        "hydra.sweeper.n_trials=2",
        "logger=none",
        "cell.hidden_size=16",
        "model.embedding_size=8",
        "trainer.batch_size=4",
        "trainer.seq_len=20",
        "trainer.max_steps=4",
        "trainer.eval_every=1",
        "trainer.eval_chars=2000",
        "trainer.eval_batch_size=2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    done = train_cli(args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = sorted(p.parent for p in sweep_dir.rglob("metrics.jsonl"))
    assert len(trials) == 2
    scores = [tuning.run_score(read_metrics(t / "metrics.jsonl"), 4) for t in trials]
    lrs = {float(load_runs([str(t)])[0].config["optim"]["lr"]) for t in trials}
    assert len(lrs) == 2 and all(5e-4 <= lr <= 0.064 for lr in lrs)  # sampled from the configured range
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert f"best_value: {min(scores)}" in best


@pytest.mark.slow
def test_a_diverging_run_ends_as_a_result_and_is_not_rerun(enwik8_sample, tmp_path):
    """on_divergence=end: the divergence is logged as the run's last record, the run exits 0, and a rerun finds
    it finished."""
    run_dir = tmp_path / "run"
    args = [
        "trainer=cpu",
        "logger=none",
        "cell.hidden_size=16",
        "dataset=file",
        f"dataset.path={enwik8_sample}",
        "trainer.batch_size=4",
        "trainer.seq_len=20",
        "trainer.max_steps=20",
        "trainer.eval_every=5",
        "trainer.eval_chars=2000",
        "trainer.eval_batch_size=2",
        "trainer.progress=false",
        "trainer.max_nonfinite_in_row=2",
        "trainer.on_divergence=end",
        "trainer.test_at_end=false",
        "optim=adam",
        "optim.lr=1e30",
        "optim.grad_clip=null",
        f"hydra.run.dir={run_dir}",
    ]
    done = train_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[-1]["event"] == "diverged" and records[-1]["step"] < 20
    assert tuning.run_score(records, 20) == math.inf
    again = train_cli(args)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert read_metrics(run_dir / "metrics.jsonl") == records
    # committed without its checkpoints, the same directory under another learning rate is another run: one line,
    # nothing touched
    for path in run_dir.glob("*.pt"):
        path.unlink()
    assert train_cli(args).returncode == 0  # still finished, from metrics.jsonl alone
    other = train_cli([a if not a.startswith("optim.lr=") else "optim.lr=1e-3" for a in args])
    assert other.returncode == 2 and "holds a finished run of another config (optim.lr" in other.stderr
    assert read_metrics(run_dir / "metrics.jsonl") == records
