"""The converged study's analysis and report (mlstm.studies.converged, mlstm.studies.converged_report,
scripts/converged_report.py) on synthetic runs with a known answer, and the reference levels it computes (xz -9e,
the unigram entropy).

Run directories are written as the trainer leaves them (config.yaml + metrics.jsonl): validation every 100 steps,
training records at steps 5, 15, ... (an epoch is 500 steps: the first record of the second pass is at step 505, so
one pass is exactly 500 steps' characters), `lr_reduced` / `early_stop` events where the rule puts them, the test
record at the end. At size 1m, on a toy sample:

    cell   seed  best valid (step)  test   halvings  end
    lstm   100   2.34 (2000)        2.36   1         early_stop at 2400  (final valid 2.37: rise 0.03)
    lstm   101   2.32 (2200)        2.38   1         early_stop at 2600  (rise 0.02)
    lstm   102   2.30 (3000)        2.40   0         the cap, 3000 steps: NOT converged
    mlstm  100   2.20 (1200)        2.24   2         early_stop at 1600  (rise 0.03 for every seed)
    mlstm  101   2.21 (1200)        2.26   2
    mlstm  102   2.22 (1200)        2.28   2

Every LSTM run passes 2.34 (the level both reach: the highest best) at step 2000, every mLSTM run at step 1000, so
the mLSTM needs 0.5x the characters and steps to it; its steps take twice the seconds (0.2 s against 0.1 s): 1.0x
the seconds. Best points: 1200 against a mean of 2400 steps: 0.5x. Epochs to best: 4.8 and 2.4.

Tuning (3 rates x seeds 0, 1; a run scores its lowest validation bpc): LSTM 0.002 / 0.004 / 0.008 score 2.41 /
2.34 / 2.38: 0.004. mLSTM 0.001 / 0.002 / 0.004 score 2.305 / 2.23 / (2.26 and an unfinished run at 2.10): the
unfinished run scores +inf, so 0.002 is chosen, provisionally (counted at its lowest point, 0.004 would win at 2.18).
"""

import csv
import io
import json
import lzma
import math
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from mlstm.studies import converged, converged_report, references, tuning
from mlstm.studies.runs import load_runs

REPO_ROOT = Path(__file__).resolve().parents[1]
CHARS_PER_STEP = 3200
EPOCH_STEPS = 500
MAX_STEPS = 3000
DATASET = "toy_sample"  # the sample file's stem: the dataset's label in the report
CELLS = {
    "lstm_1m": ({"name": "lstm", "impl": "cudnn", "hidden_size": 500}, 1_200_000, 0.1),
    "mlstm_paper_1m": ({"name": "mlstm", "form": "paper", "impl": "fast", "hidden_size": 300}, 1_210_000, 0.2),
    "mlstm_seed_1m": ({"name": "mlstm", "form": "seed", "impl": "fast", "hidden_size": 300}, 1_210_000, 0.2),
}


def toy_sample(path: Path) -> Path:
    """30,000 characters drawn uniformly from 4 letters (2 bits each): xz -9e gets about 2.34 bits per character,
    between the two cells' test bpc (2.26 and 2.38)."""
    rng = random.Random(0)
    path.write_bytes(bytes(rng.choice(b"acgt") for _ in range(30_000)))
    return path


def line(knots):
    """Validation points every 100 steps, linear between the (step, bpc) knots (each knot's value exactly)."""
    points = []
    for (s0, v0), (s1, v1) in zip(knots, knots[1:]):
        points += [(s, v0 + (v1 - v0) * (s - s0) / (s1 - s0)) for s in range(s0, s1, 100)]
    return points + [knots[-1]]


def write_run(
    root: Path,
    preset: str,
    lr: float,
    seed: int,
    points,
    events=(),
    test=None,
    cold=None,
    final: bool = True,
    overfit: float = 0.05,
) -> Path:
    """A run directory as the trainer leaves it. `events`: (step, event) pairs, the rate halved at each
    `lr_reduced`; `early_stop` carries the lowest validation bpc. Training bpc stands `overfit` below validation."""
    cell, params, seconds_per_step = CELLS[preset]
    run = root / DATASET / preset / f"lr{lr:g}-seed{seed}"
    run.mkdir(parents=True)
    config = {
        "cell": cell,
        "seed": seed,
        "num_parameters": params,
        "model": {"embedding_size": 64},
        "dataset": {"name": "file", "path": str(root.parent / f"{DATASET}.txt")},
        "optim": {
            "name": "adam",
            "lr": lr,
            "schedule": "plateau",
            "plateau_factor": 0.5,
            "plateau_patience": 1,
            "plateau_threshold": 0.002,
            "min_lr": 1e-6,
        },
        "trainer": {
            "max_steps": MAX_STEPS,
            "eval_every": 100,
            "eval_chars": None,
            "eval_batch_size": 1,
            "batch_size": 32,
            "seq_len": 100,
            "early_stop_patience": 2,
            "test_at_end": final,
        },
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    steps, valids = zip(*points)
    end = steps[-1]

    def where(step):
        return {"step": step, "chars": step * CHARS_PER_STEP, "time": round(step * seconds_per_step, 3)}

    records = [
        (
            s,
            0,
            {
                **where(s),
                "epoch": (s - 1) // EPOCH_STEPS,
                "train/lr": lr,
                "train/bpc": float(np.interp(s, steps, valids)) - overfit,
            },
        )
        for s in range(5, end, 10)
    ]
    records += [(s, 1, {**where(s), "valid/bpc": v}) for s, v in points]
    rate = lr
    for step, event in events:
        if event == "lr_reduced":
            rate /= 2
            records.append((step, 2, {**where(step), "event": event, "train/lr": rate}))
        else:
            records.append((step, 2, {**where(step), "event": event, "best_valid/bpc": min(valids)}))
    if test is not None:
        extra = {"test/cold_start_stream_bpc": cold} if cold else {}
        records.append((end, 3, {**where(end), "test/bpc": test, **extra}))
    records.sort(key=lambda r: r[:2])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for _, _, r in records))
    return run


def lstm_final(root: Path) -> None:
    to_level = line([(100, 4.0), (1900, 2.40), (2000, 2.34)])
    write_run(
        root,
        "lstm_1m",
        0.004,
        100,
        to_level + [(2100, 2.37), (2200, 2.38), (2300, 2.36), (2400, 2.37)],
        [(2200, "lr_reduced"), (2400, "early_stop")],
        test=2.36,
    )
    write_run(
        root,
        "lstm_1m",
        0.004,
        101,
        to_level + [(2100, 2.33), (2200, 2.32), (2300, 2.34), (2400, 2.35), (2500, 2.34), (2600, 2.34)],
        [(2400, "lr_reduced"), (2600, "early_stop")],
        test=2.38,
    )
    # still improving at the cap: no early_stop event
    write_run(root, "lstm_1m", 0.004, 102, line([(100, 4.0), (1900, 2.40), (2000, 2.34), (3000, 2.30)]), test=2.40)


def mlstm_final(root: Path) -> None:
    for seed, best, test in ((100, 2.20, 2.24), (101, 2.21, 2.26), (102, 2.22, 2.28)):
        points = line([(100, 4.0), (500, 2.60), (700, 2.60), (1000, 2.34), (1200, best)])
        points += [(1300, best + 0.01), (1400, best + 0.02), (1500, best + 0.015), (1600, best + 0.03)]
        cold = [2.3, 2.3, 5.0, 2.3] if seed == 100 else [2.3] * 4  # one stream blown up (5.0 > train bpc + 1)
        write_run(
            root,
            "mlstm_paper_1m",
            0.002,
            seed,
            points,
            [(700, "lr_reduced"), (1400, "lr_reduced"), (1600, "early_stop")],
            test=test,
            cold=cold,
        )
    # a final run at a rate the tuning rule did not choose: not part of the cell
    write_run(
        root,
        "mlstm_paper_1m",
        0.004,
        100,
        line([(100, 4.0), (1000, 1.5), (1200, 1.6), (1300, 1.6)]),
        [(1200, "lr_reduced"), (1300, "early_stop")],
        test=1.6,
    )


def tuning_runs(root: Path) -> None:
    lowest = {
        "lstm_1m": {0.002: (2.40, 2.42), 0.004: (2.33, 2.35), 0.008: (2.37, 2.39)},
        "mlstm_paper_1m": {0.001: (2.30, 2.31), 0.002: (2.22, 2.24), 0.004: (2.26, 2.10)},
    }
    for preset, grid in lowest.items():
        for lr, bests in grid.items():
            for seed, best in enumerate(bests):
                if preset == "mlstm_paper_1m" and lr == 0.004 and seed == 1:  # still running: no end yet
                    write_run(root, preset, lr, seed, line([(100, 4.0), (1000, best)]), final=False)
                    continue
                points = line([(100, 4.0), (1000, best)]) + [
                    (1100, best + 0.01),
                    (1200, best + 0.02),
                    (1300, best + 0.01),
                    (1400, best + 0.03),
                ]
                write_run(root, preset, lr, seed, points, [(1200, "lr_reduced"), (1400, "early_stop")], final=False)


@pytest.fixture(scope="module")
def study_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("converged")
    toy_sample(base / f"{DATASET}.txt")
    lstm_final(base / "final")
    mlstm_final(base / "final")
    tuning_runs(base / "runs")
    return base


def xz_reference(path: Path) -> float:
    data = path.read_bytes()
    return 8 * len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)) / len(data)


def table(report: str, header_start: str) -> list[dict]:
    """The markdown table whose header row starts with `header_start`, as dicts of its cells."""
    lines = report.splitlines()
    start = next(i for i, text in enumerate(lines) if text.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for text in lines[start + 2 :]:
        if not text.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in text.strip("|").split("|")))))
    return rows


def test_the_analysis_finds_the_known_answer(study_dirs):
    study = converged.analyse(load_runs([str(study_dirs / "final")]), load_runs([str(study_dirs / "runs")]))
    assert (study.n_final, study.n_tuning) == (7, 12)
    # the tuning rule: each cell's rate, the unfinished run scored +inf and flagged as provisional
    sel = {s.variant: s for s in study.selections}
    assert set(sel) == {"lstm", "mlstm-paper"} and all(s.rung == "1m" for s in sel.values())
    lstm_sel, mlstm_sel = sel["lstm"].selection, sel["mlstm-paper"].selection
    assert lstm_sel.chosen == 0.004 and not lstm_sel.at_edge and lstm_sel.complete and not lstm_sel.notes
    assert [r.score for r in lstm_sel.rates] == pytest.approx([2.41, 2.34, 2.38])
    assert mlstm_sel.chosen == 0.002 and not mlstm_sel.at_edge and not mlstm_sel.complete
    assert [r.score for r in mlstm_sel.rates][:2] == pytest.approx([2.305, 2.23])
    assert mlstm_sel.rates[2].score == math.inf and mlstm_sel.rates[2].unfinished_seeds == [1]
    assert mlstm_sel.notes == ["1 run not finished: the choice is provisional"]
    assert sel["lstm"].preset == "lstm_1m" and sel["lstm"].dataset_choice == DATASET

    lstm, mlstm = study.cells
    assert (lstm.dataset, lstm.rung, lstm.variant, lstm.lr, lstm.params) == (DATASET, "1m", "lstm", 0.004, 1.2e6)
    assert (mlstm.variant, mlstm.lr) == ("mlstm-paper", 0.002)
    assert [r.seed for r in mlstm.runs] == [100, 101, 102]  # the run at the unchosen rate 0.004 is left out
    # converged by the rule, or capped
    assert (lstm.n_converged, lstm.n_capped, mlstm.n_converged, mlstm.n_capped) == (2, 1, 3, 0)
    capped = lstm.runs[2]
    assert capped.seed == 102 and capped.capped and not capped.converged and capped.end_step == MAX_STEPS
    # best against best
    assert lstm.values("best_valid") == pytest.approx({100: 2.34, 101: 2.32, 102: 2.30})
    assert lstm.values("test") == {100: 2.36, 101: 2.38, 102: 2.40}
    assert lstm.mean("best_valid").value == pytest.approx(2.32) and mlstm.mean("test").value == pytest.approx(2.26)
    assert lstm.values("at_best", "steps") == {100: 2000, 101: 2200, 102: 3000}
    assert lstm.values("epochs_to_best") == pytest.approx({100: 4.0, 101: 4.4, 102: 6.0})
    assert mlstm.values("epochs_to_best") == pytest.approx({100: 2.4, 101: 2.4, 102: 2.4})
    assert lstm.values("reductions") == {100: 1, 101: 1, 102: 0}
    assert mlstm.values("reductions") == {100: 2, 101: 2, 102: 2}
    assert lstm.values("rise") == pytest.approx({100: 0.03, 101: 0.02, 102: 0.0})
    assert mlstm.cold_starts == (1, 12) and lstm.cold_starts is None

    (comp,) = study.comparisons
    assert comp.cell is mlstm and comp.baseline is lstm
    assert comp.d_best_valid.value == pytest.approx(-0.11)
    assert -0.14 - 1e-9 <= comp.d_best_valid.low < comp.d_best_valid.value < comp.d_best_valid.high <= -0.08 + 1e-9
    assert (comp.d_test.value, comp.d_test.low, comp.d_test.high) == pytest.approx((-0.12, -0.12, -0.12))
    assert comp.level == 2.34
    assert {axis: comp.to_level[axis].value for axis in converged.AXES} == pytest.approx(
        {"chars": 0.5, "steps": 0.5, "seconds": 1.0}
    )
    assert comp.to_best["chars"].value == pytest.approx(1200 / 2400)
    assert comp.ladder[-1][0] == 2.34 and comp.ladder[-1][1].value == pytest.approx(0.5)
    assert study.xz == {DATASET: xz_reference(study_dirs / f"{DATASET}.txt")}


def test_the_report_states_the_known_answer_and_flags_the_capped_run(study_dirs, tmp_path):
    out = tmp_path / "report"
    printed = converged_report.report_from_runs(
        [str(study_dirs / "final")], [str(study_dirs / "runs")], out, figures=False
    )
    report = (out / "report.md").read_text()
    assert printed.startswith(report) and f"wrote {out / 'summary.csv'}" in printed
    assert "7 final runs, 12 tuning runs" in report
    assert "stop patience 2" in report and f"cap (steps) {MAX_STEPS}" in report and 'schedule "plateau"' in report

    grid = {row["cell"]: row for row in table(report, "| rung | cell |")}
    assert grid["lstm"]["chosen"] == "0.004" and grid["lstm"]["note"] == ""
    assert grid["mlstm-paper"]["chosen"] == "0.002"
    assert grid["mlstm-paper"]["note"] == "1 run not finished: the choice is provisional"
    assert grid["mlstm-paper"]["grid: rate (score)"] == "0.001 (2.305), 0.002 (2.230), 0.004 (–)"

    rows = {row["cell"]: row for row in table(report, "| size | cell | params |")}
    lstm, mlstm = rows["lstm"], rows["mlstm-paper"]
    assert (lstm["size"], lstm["params"], lstm["lr"], lstm["seeds"]) == ("1m", "1.20M", "0.004", "3")
    assert lstm["converged"] == "2/3 (1 capped: NOT converged)" and mlstm["converged"] == "3/3"
    assert lstm["best valid bpc"].startswith("2.320 (") and mlstm["best valid bpc"].startswith("2.210 (")
    assert lstm["test bpc (best.pt)"].startswith("2.380 (") and mlstm["test bpc (best.pt)"].startswith("2.260 (")
    assert lstm["Δ valid vs LSTM"] == "–" and mlstm["Δ valid vs LSTM"].startswith("-0.110 (")
    assert mlstm["Δ test vs LSTM"] == "-0.120 (-0.120–-0.120)"
    assert (lstm["epochs to best"], mlstm["epochs to best"]) == ("4.8", "2.4")
    assert (lstm["rate halvings"], mlstm["rate halvings"]) == ("0.7", "2.0")
    assert (lstm["rise after best"], mlstm["rise after best"]) == ("0.017 (2/3)", "0.030 (3/3)")
    assert (lstm["cold starts blown up"], mlstm["cold starts blown up"]) == ("–", "1 of 12")

    (speed,) = table(report, "| size | cell | level both reach |")
    assert speed["level both reach"] == "2.340"
    assert (speed["× LSTM characters"], speed["× LSTM steps"], speed["× LSTM seconds"]) == (
        "0.50 (0.50–0.50)×",
        "0.50 (0.50–0.50)×",
        "1.00 (1.00–1.00)×",
    )
    assert speed["× LSTM characters to the best"].startswith("0.50 (")  # 1200 against 2000, 2200, 3000
    assert speed["ladder (level: × characters)"].endswith("2.340: 0.50 (0.50–0.50)×")

    with open(out / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert [(r["cell"], r["seed"], r["converged"], r["capped"]) for r in summary] == [
        ("lstm", "100", "True", "False"),
        ("lstm", "101", "True", "False"),
        ("lstm", "102", "False", "True"),
    ] + [("mlstm-paper", str(s), "True", "False") for s in (100, 101, 102)]
    assert [float(r["test_bpc"]) for r in summary] == [2.36, 2.38, 2.40, 2.24, 2.26, 2.28]
    assert [int(r["rate_halvings"]) for r in summary] == [1, 1, 0, 2, 2, 2]
    assert [r["level_both_reach"] for r in summary] == ["", "", "", "2.34", "2.34", "2.34"]

    selection = {row["variant"]: row for row in json.loads((out / "selection.json").read_text())}
    assert (
        selection["lstm"]["chosen_lr"] == 0.004
        and selection["lstm"]["final_command"]
        == f'make sweep SWEEP=converge_final_cpu ARGS="dataset={DATASET} +variant=lstm_1m optim.lr=0.004"'
    )
    assert selection["mlstm-paper"]["chosen_lr"] == 0.002
    assert selection["mlstm-paper"]["notes"] == ["1 run not finished: the choice is provisional"]
    assert selection["mlstm-paper"]["rates"] == {
        "0.001": pytest.approx(2.305),
        "0.002": pytest.approx(2.23),
        "0.004": None,
    }


def unigram_cross_entropy(train: bytes, valid: bytes) -> float:
    """Bits per character of `valid` under add-1/2 estimates of the byte frequencies of `train` (256 values)."""
    counts = Counter(train)
    total = len(train) + 128
    return -sum(math.log2((counts[b] + 0.5) / total) for b in valid) / len(valid)


def test_the_unigram_level_on_the_valid_split_is_the_training_frequencies_cross_entropy(tmp_path):
    """Training text of a and b in equal parts, valid text all a, test all c: on the valid split the unigram model
    pays -log2 p(a), about 1 bit, not the valid split's own entropy (0 bits); the split follows the fractions."""
    sample = tmp_path / "ab.txt"
    sample.write_bytes(b"ab" * 400 + b"a" * 100 + b"c" * 100)
    config = {"dataset": {"name": "file", "path": str(sample), "split_fractions": [0.8, 0.1, 0.1]}}
    path, sizes = references.corpus_splits(config)
    assert (path, sizes) == (sample, [800, 100, 100])
    assert references.corpus_file(config) == (sample, 800)
    expected = -math.log2(400.5 / 928)
    assert references.unigram_valid_bpc(sample, sizes) == pytest.approx(expected)
    assert expected == pytest.approx(unigram_cross_entropy(b"ab" * 400, b"a" * 100))
    assert references.unigram_entropy_of_file(sample, sizes[0]) == pytest.approx(1.0)
    # a byte never seen in training costs bits, not infinity: valid all c
    sample.write_bytes(b"ab" * 400 + b"c" * 100 + b"a" * 100)
    assert references.unigram_valid_bpc(sample, sizes) == pytest.approx(-math.log2(0.5 / 928))


def test_an_unfinished_run_scores_as_the_worst_until_it_ends(study_dirs):
    (run,) = load_runs([str(study_dirs / "runs" / DATASET / "mlstm_paper_1m" / "lr0.004-seed1")])
    assert tuning.to_convergence(run.config) and not tuning.ended(run.records, MAX_STEPS)
    assert tuning.run_score(run.records, MAX_STEPS, best=True) == math.inf
    stopped = run.records + [{"step": 1000, "chars": 1000 * CHARS_PER_STEP, "time": 100.0, "event": "early_stop"}]
    assert tuning.run_score(stopped, MAX_STEPS, best=True) == pytest.approx(2.10)  # then its lowest validation bpc


def test_the_xz_reference_is_computed_and_the_report_uses_it(tmp_path):
    sample = toy_sample(tmp_path / f"{DATASET}.txt")
    data = sample.read_bytes()
    expected = 8 * len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)) / len(data)
    assert references.xz_bits_per_char(sample) == expected
    assert 2.26 < expected < 2.38  # the toy sample sits between the two cells' test bpc (see toy_sample)
    repeated = tmp_path / "repeated.txt"  # a third of it three times: xz finds the repeats, fewer bits
    repeated.write_bytes(data[: len(data) // 3] * 3)
    assert references.xz_bits_per_char(repeated) < expected / 2
    if shutil.which("xz"):
        # single-threaded xz writes the same .xz stream as lzma, byte for byte; the default (multi-threaded in newer
        # versions) may add the sizes to the block header: a few bytes
        single = subprocess.run(["xz", "-9e", "-T1", "-c", str(sample)], capture_output=True, check=True).stdout
        assert 8 * len(single) / len(data) == expected
        default = subprocess.run(["xz", "-9e", "-c", str(sample)], capture_output=True, check=True).stdout
        assert abs(len(default) - len(single)) <= 24
        assert lzma.decompress(single) == data
    lstm_final(tmp_path / "final")
    mlstm_final(tmp_path / "final")
    out = tmp_path / "report"
    converged_report.report_from_runs([str(tmp_path / "final")], [], out, figures=False)
    report = (out / "report.md").read_text()
    assert f"`xz -9e` compresses the whole sample to **{expected:.3f}** bits per character" in report
    # the unigram level beside it: the entropy of the training split (the first 90% of the file: dataset=file's
    # split) and what that model reads on the valid split (the next 5%)
    train, valid = data[:27_000], data[27_000:28_500]
    unigram = -sum(n / len(train) * math.log2(n / len(train)) for n in Counter(train).values())
    on_valid = unigram_cross_entropy(train, valid)
    study = converged.analyse(load_runs([str(tmp_path / "final")]))
    assert study.unigram == {DATASET: (pytest.approx(unigram), pytest.approx(on_valid))}
    assert 1.99 < unigram < 2.0 < on_valid < 2.01  # 4 letters drawn uniformly: about 2 bits on either split
    assert f"reads their entropy, **{unigram:.3f}**, on that split and **{on_valid:.3f}** on the valid split" in report
    # the mLSTM's test mean (2.26) is below it, the LSTM's (2.38) is not
    assert f"- Below xz -9e ({expected:.3f}) on the test split: mlstm-paper at 1m." in report
    with open(out / "summary.csv", newline="") as handle:
        assert {float(r["xz_bpc"]) for r in csv.DictReader(handle)} == {expected}
    # no sample file where the configs say: no reference, no line
    sample.unlink()
    study = converged.analyse(load_runs([str(tmp_path / "final")]))
    assert study.xz == {}
    assert study.unigram == {}
    text = converged_report.report_markdown(study, {}, [], "t")
    assert "xz" not in text and "unigram" not in text and "Reference" not in text


def test_the_script_writes_the_report_and_its_figures(study_dirs, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable,
            "scripts/converged_report.py",
            "--final",
            str(study_dirs / "final"),
            "--tuning",
            str(study_dirs / "runs"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = (out / "report.md").read_text()
    pngs = [out / f"{DATASET}_{what}.png" for what in ("converged", "best", "chosen_rates")]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"![{DATASET}]({png.name})" in report
        assert f"wrote {png}" in done.stdout
    assert done.stdout.startswith(report)
    for name in ("summary.csv", "selection.json"):
        assert (out / name).is_file() and f"wrote {out / name}" in done.stdout
    assert io.StringIO(report).readline().startswith("# Trained to convergence")


def test_the_report_lists_every_grid_run_and_where_it_stands(study_dirs, tmp_path):
    """The study spans many sessions: report.md shows each grid run so far, the unfinished one included."""
    out = tmp_path / "report"
    converged_report.report_from_runs([], [str(study_dirs / "runs")], out, figures=False)
    rows = table((out / "report.md").read_text(), "| rung | cell | rate | seed |")
    assert [(r["cell"], r["rate"], r["seed"]) for r in rows] == [
        (cell, lr, seed)
        for cell, rates in (("lstm", ("0.002", "0.004", "0.008")), ("mlstm-paper", ("0.001", "0.002", "0.004")))
        for lr in rates
        for seed in ("0", "1")
    ]
    states = {(r["cell"], r["rate"], r["seed"]): r for r in rows}
    running = states[("mlstm-paper", "0.004", "1")]
    assert (running["state"], running["steps"], running["lowest valid bpc (step)"]) == (
        "unfinished",
        "1,000",
        "2.100 (1,000)",
    )
    done = states[("lstm", "0.004", "0")]
    assert (done["state"], done["steps"], done["lowest valid bpc (step)"], done["halvings"]) == (
        "stopped by the rule",
        "1,400",
        "2.330 (1,000)",
        "1",
    )
    assert sum(r["state"] == "stopped by the rule" for r in rows) == 11
    # every finished grid run reads the text in one order and ripples with the others (falls to step 1,000, then
    # rises, rises, falls, rises): all 11 move together at each of the 4 evaluations from the first rise, while
    # runs rising as often (3 of 4) but independently would agree E[max(U, 11 - U)] / 11 of the time, U ~ B(11, 3/4)
    (together,) = table((out / "report.md").read_text(), "| runs | how many |")
    independent = sum(math.comb(11, k) * 0.75**k * 0.25 ** (11 - k) * max(k, 11 - k) / 11 for k in range(12))
    assert together == {
        "runs": "grid runs",
        "how many": "11",
        "evaluations counted (steps)": "4 (1,100–1,400)",
        "moved with the majority": "100%",
        "expected if independent": f"{independent:.0%}",
        "most rose together": "step 1,100: 11 of 11",
    }
    # no final run yet: summary.csv is its header alone, the columns a reader's script will find
    header = (out / "summary.csv").read_text()
    assert header == ",".join(converged_report.SUMMARY_COLUMNS) + "\n" and header.startswith("dataset,rung,cell,")
    # a run that reached the cap still improving is flagged, never counted as stopped by the rule
    capped = converged.analyse([], load_runs([str(study_dirs / "final" / DATASET / "lstm_1m" / "lr0.004-seed102")]))
    assert [t.state for t in capped.tuning] == ["capped: NOT converged"]


def plan(runs: Path, preset: str) -> str:
    """What scripts/converged_plan.py prints for a cell: the study's driver acts on this one line."""
    command = [sys.executable, str(REPO_ROOT / "scripts" / "converged_plan.py"), "--runs", str(runs)]
    done = subprocess.run(
        [*command, "--dataset", DATASET, "--preset", preset], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_plan_resumes_unfinished_rates_extends_at_the_edge_and_then_runs_the_finals(study_dirs, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(study_dirs / "runs", runs)
    lstm = runs / DATASET / "lstm_1m"
    # LSTM: 0.004 lies strictly inside 0.002-0.008, every run ended -> its fresh seeds
    assert converged.next_step(load_runs([str(runs)]), DATASET, "lstm_1m") == ("final", (0.004,))
    # the mLSTM's 0.004 seed 1 has not ended -> that rate's sweep again (it resumes the run), no choice read yet
    assert plan(runs, "mlstm_paper_1m") == "resume 0.004"
    # a stop between the seeds of one rate: 0.008 has seed 0 only -> resume it, never score it on seed 0 alone
    shutil.rmtree(lstm / "lr0.008-seed1")
    assert plan(runs, "lstm_1m") == "resume 0.008"
    (selection,) = tuning.select(load_runs([str(lstm)]))
    assert not selection.complete and [r.missing_seeds for r in selection.rates] == [[], [], [1]]
    # without the 0.002 runs the choice (0.004) is the grid's smallest rate -> the next rate outward
    shutil.rmtree(lstm / "lr0.002-seed0")
    shutil.rmtree(lstm / "lr0.002-seed1")
    shutil.copytree(study_dirs / "runs" / DATASET / "lstm_1m" / "lr0.008-seed1", lstm / "lr0.008-seed1")
    assert plan(runs, "lstm_1m") == "extend 0.002"
    assert plan(runs, "lstm_300k") == "none"


def test_the_chosen_rate_figure_shows_every_cell_the_grid_covered_at_its_chosen_rate(study_dirs, tmp_path):
    """Block 4's seed cells have grid runs only: the chosen-rate figure draws them beside the cells with finals,
    each from the grid runs at the rate the tuning rule chose, and none of the other rates' runs."""
    runs = tmp_path / "runs"
    shutil.copytree(study_dirs / "runs", runs)
    # a cell that stays near the unigram level, one seed per rate: 0.004 (lowest, 4.6) lies inside 0.002-0.008
    for lr, best in ((0.002, 5.2), (0.004, 4.6), (0.008, 5.0)):
        points = line([(100, 5.5), (1000, best)]) + [(1100, best + 0.01), (1200, best + 0.02)]
        write_run(runs, "mlstm_seed_1m", lr, 0, points, [(1100, "lr_reduced"), (1200, "early_stop")], final=False)
    study = converged.analyse([], load_runs([str(runs)]))
    picked = converged.chosen_rate_runs(study, DATASET)
    assert {
        rung: {variant: (lr, [(r.seed, r.best_valid) for r in outcomes]) for variant, (lr, outcomes) in cells.items()}
        for rung, cells in picked.items()
    } == {
        "1m": {
            "lstm": (0.004, [(0, pytest.approx(2.33)), (1, pytest.approx(2.35))]),
            "mlstm-paper": (0.002, [(0, pytest.approx(2.22)), (1, pytest.approx(2.24))]),
            "mlstm-seed": (0.004, [(0, pytest.approx(4.6))]),
        }
    }
    assert list(picked["1m"]) == ["lstm", "mlstm-paper", "mlstm-seed"]  # the baseline first, as in the report
    assert converged.chosen_rate_runs(study, "another_sample") == {}
    # a report from grid runs alone draws this figure only, and links it
    out = tmp_path / "report"
    converged_report.report_from_runs([], [str(runs)], out)
    png = out / f"{DATASET}_chosen_rates.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"![{DATASET}]({png.name})" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.glob("*.png")) == [png.name]


def test_the_figures_order_sizes_by_parameters_not_by_name_or_arrival():
    """The sizes sit in order of parameters on the best-bpc figure's axis and in its curve panels; a cell with an
    unknown count goes last. ("1m" sorts before "300k" by name, and blocks land 1.2M first.)"""
    cells = [
        converged.Cell("enwik8", rung, variant, params, 1e-3, [])
        for rung, variant, params in (
            ("1m", "lstm", 1_245_000.0),
            ("300k", "mlstm-paper", 305_000.0),
            ("1m", "mlstm-paper", 1_241_284.0),
            ("seed", "mlstm-seed", float("nan")),
            ("300k", "lstm", 310_000.0),
            ("5m", "lstm", 4_800_000.0),
        )
    ]
    sizes = converged_report.rungs_by_size(cells)
    assert list(sizes) == ["300k", "1m", "5m", "seed"]
    assert list(sizes.values())[:3] == [305_000.0, 1_241_284.0, 4_800_000.0]


def test_a_cold_start_blows_up_against_the_held_out_level_not_the_training_bpc(tmp_path):
    """Trained to convergence, a model fits its training text far better than held-out text: an ordinary test stream
    stands more than 1 bpc above the training bpc. A blow-up is judged against the run's lowest validation bpc."""
    points = line([(100, 4.0), (1000, 2.30), (1200, 2.20)]) + [(1300, 2.23), (1400, 2.23)]
    run = write_run(
        tmp_path / "final",
        "mlstm_paper_1m",
        0.002,
        100,
        points,
        [(1300, "lr_reduced"), (1400, "early_stop")],
        test=2.25,
        cold=[1.9, 2.9, 3.1, 3.3, 25.0, float("nan")],  # 3.3 and up: above 2.20 + 1; the training bpc ends at 1.43
        overfit=0.8,
    )
    (outcome,) = [converged.outcome(r) for r in load_runs([str(run)])]
    assert outcome.best_valid == pytest.approx(2.20)
    assert outcome.cold_starts == (3, 6)
