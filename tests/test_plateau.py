"""Training to convergence (mlstm.training.plateau): the rate halved on a validation plateau, the stop when halving no
longer helps, best.pt's weights on the test split, an exact resume mid-plateau, and the tuning sweep run to the rule.

The first tests drive the trainer's own `Trainer._plateau_step` on hand-made validation curves whose decisions are
worked out in the comments (optim=adam_plateau: a halving after more than 1 evaluation without an improvement of
0.002 bpc; trainer.early_stop_patience=2). The others train tiny models on a slice of the enwik8 sample.
"""

import io
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from mlstm.config import load_config
from mlstm.data import load_corpus
from mlstm.errors import UserError
from mlstm.evaluate import evaluate_bpc
from mlstm.studies import converged
from mlstm.studies.runs import load_runs
from mlstm.training.checkpoint import load_file
from mlstm.training.optim import build_optimizer
from mlstm.training.plateau import EarlyStopping, build_early_stopping, build_plateau, can_reduce, current_lr
from mlstm.training.score import run_score
from mlstm.training.stopping import TrainingStopped
from mlstm.training.tracking import read_metrics
from mlstm.training.trained import load_model
from mlstm.training.trainer import Trainer, train

REPO_ROOT = Path(__file__).resolve().parents[1]
ADAM_PLATEAU = OmegaConf.load(REPO_ROOT / "configs" / "optim" / "adam_plateau.yaml")
CPU_CONVERGE = OmegaConf.load(REPO_ROOT / "configs" / "trainer" / "cpu_converge.yaml")


class Protocol:
    """The trainer's side of the protocol around `Trainer._plateau_step` (called on this object, not a copy of it):
    the optimizer and per-step schedule of optim=adam_plateau on one parameter, a few optimizer steps between
    evaluations (the per-step schedule must leave a reduced rate alone), and the events the trainer would log."""

    def __init__(self, lr=4e-3, early_stop_patience=2, **optim):
        self.optim_cfg = OmegaConf.merge(ADAM_PLATEAU, {"lr": lr, **optim})
        self.param = torch.nn.Parameter(torch.zeros(3))
        self.optimizer, self.scheduler = build_optimizer(self.optim_cfg, [self.param])
        self.plateau = build_plateau(self.optim_cfg, self.optimizer)
        trainer_cfg = OmegaConf.create({"early_stop_patience": early_stop_patience})
        self.early_stop = build_early_stopping(trainer_cfg, self.optim_cfg)
        self.logged = []
        self.sinks = SimpleNamespace(log=self.logged.append)
        self.step, self.chars, self.train_seconds, self.best_valid = 0, 0, 0.0, math.inf
        self.evaluations = 0
        self.lrs = []  # the rate after each evaluation

    def train_steps(self, n=3):
        for _ in range(n):
            self.param.grad = torch.ones_like(self.param)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1

    def evaluate(self, valid: float) -> bool:
        """One evaluation as the trainer's loop makes it; True when the run stops there."""
        self.train_steps()
        self.evaluations += 1
        self.best_valid = min(self.best_valid, valid)
        stop = Trainer._plateau_step(self, valid)
        self.lrs.append(current_lr(self.optimizer))
        return stop

    def run(self, curve) -> int | None:
        """Evaluations until the stop (its 1-based index), None when the curve ends first."""
        for valid in curve:
            if self.evaluate(valid):
                return self.evaluations
        return None

    def events(self) -> list[tuple]:
        """(evaluation, event, rate or best) of every logged event; evaluation = step / 3."""
        return [(r["step"] // 3, r["event"], r.get("train/lr", r.get("best_valid/bpc"))) for r in self.logged]

    def state(self) -> dict:
        """What a checkpoint carries of the protocol, through torch.save / torch.load(weights_only=True)."""
        buffer = io.BytesIO()
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "plateau": self.plateau.state_dict() if self.plateau else None,
                "early_stop": self.early_stop.state_dict(),
                "step": self.step,
                "evaluations": self.evaluations,
                "best_valid": self.best_valid,
            },
            buffer,
        )
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    def restore(self, state: dict, protocol: bool = True) -> None:
        """As mlstm.training.resume.restore does; protocol=False leaves the plateau and stop counters fresh."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if protocol:
            if self.plateau is not None:
                self.plateau.load_state_dict(state["plateau"])
            self.early_stop.load_state_dict(state["early_stop"])
        self.step, self.evaluations, self.best_valid = state["step"], state["evaluations"], state["best_valid"]


# Curve A (rate 4e-3; R = the plateau scheduler's bad count, E = the stop's, s = reduced since the best point):
#  1 3.000  best                     R0 E0
#  2 2.500  best                     R0 E0
#  3 2.499  not better by 0.002      R1 E1
#  4 2.600                           R2 > 1: halved to 2e-3 (R0); E2 but no halving since the best: goes on, E0 s
#  5 2.400  best: the window restarts, s cleared   R0 E0
#  6 2.410                           R1 E1
#  7 2.405                           R2: halved to 1e-3; E2, but the halving at 4 came before the best: goes on, E0 s
#  8 2.399  lower, not by 0.002      R1 E1
#  9 2.450                           R2: E2 after a halving since the best: STOP (best 2.4)
# 10 1.000  never read
CURVE_A = [3.0, 2.5, 2.499, 2.6, 2.4, 2.41, 2.405, 2.399, 2.45, 1.0]
# Curve B: curve A without the improvement at 5: the halving at 4 is followed by 2 bad evaluations: STOP at 6
CURVE_B = [3.0, 2.5, 2.499, 2.6, 2.6, 2.6, 1.0]
# Curve C (floor 2e-3 = one halving): halved at 4 onto the floor; a best at 5; then the rate cannot be lowered, and
# 2 evaluations without improvement stop the run (classic early stopping) at 7, with no further halving logged
CURVE_C = [3.0, 2.9, 2.95, 2.95, 2.85, 2.9, 2.9, 1.0]


def test_the_plateau_scheduler_is_pytorchs_own_with_the_configured_rule():
    p = Protocol()
    assert type(p.plateau) is torch.optim.lr_scheduler.ReduceLROnPlateau
    assert (p.plateau.mode, p.plateau.threshold_mode, p.plateau.cooldown) == ("min", "abs", 0)
    assert (p.plateau.factor, p.plateau.patience, p.plateau.threshold) == (0.5, 1, 0.002)
    assert p.plateau.min_lrs == [1e-6] and p.plateau.optimizer is p.optimizer
    assert (p.early_stop.patience, p.early_stop.threshold) == (2, 0.002)  # the same "improvement" as the scheduler
    assert CPU_CONVERGE.early_stop_patience == ADAM_PLATEAU.plateau_patience + 1
    # any other schedule has no plateau scheduler; no trainer.early_stop_patience, no stop rule
    constant = OmegaConf.merge(ADAM_PLATEAU, {"schedule": "constant"})
    optimizer, _ = build_optimizer(constant, [torch.nn.Parameter(torch.zeros(1))])
    assert build_plateau(constant, optimizer) is None and not can_reduce(None, optimizer)
    assert build_early_stopping(OmegaConf.create({"early_stop_patience": None}), ADAM_PLATEAU) is None
    for bad in (0, True, 1.5):
        with pytest.raises(UserError, match="early_stop_patience"):
            EarlyStopping(bad)


def test_halvings_and_the_stop_fall_on_the_worked_out_evaluations():
    p = Protocol()
    assert p.run(CURVE_A) == 9
    # the event carries the lowest validation bpc (best.pt's point), the rule's best only counts improvements of 0.002
    assert p.events() == [(4, "lr_reduced", 2e-3), (7, "lr_reduced", 1e-3), (9, "early_stop", 2.399)]
    # the rate after each evaluation: the per-step schedule between evaluations never undoes a halving
    assert p.lrs == [4e-3, 4e-3, 4e-3, 2e-3, 2e-3, 2e-3, 1e-3, 1e-3, 5e-4]
    assert p.early_stop.stopped and p.early_stop.best == 2.4 and p.plateau.best == 2.4


def test_an_improvement_after_a_halving_restarts_the_window():
    """Curve B is curve A without the new best at evaluation 5: the stop comes 3 evaluations earlier."""
    p = Protocol()
    assert p.run(CURVE_B) == 6
    assert p.events() == [(4, "lr_reduced", 2e-3), (6, "early_stop", 2.499)]


def test_at_the_rate_floor_the_classic_rule_stops():
    p = Protocol(min_lr=2e-3)
    assert p.run(CURVE_C) == 7
    assert p.events() == [(4, "lr_reduced", 2e-3), (7, "early_stop", 2.85)]
    assert p.lrs == [4e-3] * 3 + [2e-3] * 4
    assert not can_reduce(p.plateau, p.optimizer)
    # without a floor the same curve halves again at 7 and goes on (the halving since the best gets its window)
    free = Protocol()
    assert free.run(CURVE_C) is None
    assert free.events() == [(4, "lr_reduced", 2e-3), (7, "lr_reduced", 1e-3)]


def test_without_a_plateau_schedule_early_stopping_is_classic():
    p = Protocol(schedule="constant")
    assert p.plateau is None
    assert p.run([3.0, 2.9, 2.95, 2.899, 1.0]) == 4  # two evaluations without an improvement of 0.002
    assert p.events() == [(4, "early_stop", 2.899)] and p.lrs == [4e-3] * 4


@pytest.mark.parametrize(("curve", "optim"), [(CURVE_A, {}), (CURVE_C, {"min_lr": 2e-3})], ids=["A", "C"])
def test_a_state_dict_round_trip_mid_curve_gives_the_same_decisions(curve, optim):
    straight = Protocol(**optim)
    end = straight.run(curve)
    differs = []
    for k in range(1, end):
        first = Protocol(**optim)
        first.run(curve[:k])
        state = first.state()
        resumed, forgetful = Protocol(**optim), Protocol(**optim)
        resumed.restore(state)
        forgetful.restore(state, protocol=False)
        assert resumed.run(curve[k:]) == end
        assert first.events() + resumed.events() == straight.events()
        assert first.lrs + resumed.lrs == straight.lrs
        assert resumed.early_stop.state_dict() == straight.early_stop.state_dict()
        differs.append(forgetful.run(curve[k:]) != end or first.events() + forgetful.events() != straight.events())
    assert any(differs)  # the counters matter: restoring only the optimizer changes some decision


# --------------------------------------------------------------------------------------------- real trainings
# optim=adam_plateau and trainer=cpu_converge at a tiny size: 8 streams x 20 characters, 16 units, validation every
# 10 steps on 2,000 characters (as 4 streams), and a rate high enough (0.05) that validation soon stops improving:
# seed 0 stops by the rule after 2 halvings, at step 150 of the 400 allowed.
TIMING_KEYS = {"time", "perf/chars_per_s", "perf/chars_per_s_per_rank"}
CONVERGE = [
    "logger=none",
    "optim=adam_plateau",
    "trainer=cpu_converge",
    "cell=mlstm",
    "cell.hidden_size=16",
    "trainer.batch_size=8",
    "trainer.seq_len=20",
    "trainer.eval_every=10",
    "trainer.eval_chars=2000",
    "trainer.eval_batch_size=4",
    "trainer.test_chars=2000",
    "trainer.cold_start_streams=4",
    "trainer.log_every=10",
    "trainer.max_steps=400",
    "trainer.threads=1",
    "optim.lr=0.05",
]


def metrics(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []


def converge_args(sample: Path, data_dir: Path, *extra) -> list[str]:
    return ["dataset=file", f"dataset.path={sample}", f"data_dir={data_dir}", *CONVERGE, *extra]


def without_timing(records):
    return [{k: v for k, v in r.items() if not (k in TIMING_KEYS or k.startswith("perf/"))} for r in records]


def replayed_events(valid_records, lr: float) -> list[tuple[int, str, float]]:
    """(step, event, rate or lowest bpc) that the rule makes of a logged validation curve, replayed through
    `Trainer._plateau_step` on fresh objects (the run's own protocol objects are not consulted)."""
    p = Protocol(lr=lr)
    for record in valid_records:
        p.step = record["step"] - 3  # Protocol.evaluate takes 3 optimizer steps before the evaluation
        if p.evaluate(record["valid/bpc"]):
            break
    return [(r["step"], r["event"], r.get("train/lr", r.get("best_valid/bpc"))) for r in p.logged]


@pytest.fixture(scope="module")
def converged_run(enwik8_head200k, tmp_path_factory):
    """One uninterrupted run of the tiny converge config, trained in this process: (overrides, run dir, result)."""
    base = tmp_path_factory.mktemp("converge")
    args = converge_args(enwik8_head200k, base / "cache")
    return args, base / "run", train(load_config(args), run_dir=base / "run")


def test_best_pt_holds_the_best_point_and_the_test_pass_reads_it(converged_run):
    args, run, result = converged_run
    cfg = load_config(args)
    records = metrics(run)
    valids = [r for r in records if "valid/bpc" in r]
    events = [(r["step"], r["event"], r.get("train/lr", r.get("best_valid/bpc"))) for r in records if "event" in r]
    lowest = min(valids, key=lambda r: r["valid/bpc"])
    (tested,) = [r for r in records if "test/bpc" in r]

    # stopped by the rule, after at least one halving, well before the cap; the test pass after it
    assert events[-1][1] == "early_stop" and events[-1][0] == valids[-1]["step"] == tested["step"] < 400
    assert sum(e[1] == "lr_reduced" for e in events) >= 1
    assert events == replayed_events(valids, 0.05)  # every halving and the stop where the rule puts them
    assert events[-1][2] == lowest["valid/bpc"] == result["best_valid/bpc"] == result["score"]
    assert records[-1] is tested and len(tested["test/cold_start_stream_bpc"]) == 4
    # the rate the training records show: 0.05 halved once per reduction logged before them
    reductions = [step for step, event, _ in events if event == "lr_reduced"]
    for r in (r for r in records if "train/bpc" in r):
        assert r["train/lr"] == 0.05 * 0.5 ** sum(step < r["step"] for step in reductions), r

    # best.pt is the lowest validation point's checkpoint; the run went on past it (the stop needs 2 more points)
    best, last = load_file(run / "best.pt"), load_file(run / "last.pt")
    assert best["step"] == lowest["step"] < last["step"] == tested["step"]
    assert best["best_valid"] == lowest["valid/bpc"]
    assert result["tested_checkpoint"] == "best.pt"
    # the logged test bpc is best.pt's model read over the test split as the trainer reads it, and not last.pt's
    corpus = load_corpus(cfg.dataset, cfg.data_dir)

    def test_bpc(path):
        model, _ = load_model(path)
        return evaluate_bpc(
            model,
            corpus.split("test"),
            batch_size=4,
            seq_len=20,
            device=torch.device("cpu"),
            max_chars=2000,
            split_name="test",
        )

    assert test_bpc(run / "best.pt") == pytest.approx(tested["test/bpc"], abs=1e-12, rel=0) == result["test/bpc"]
    assert abs(test_bpc(run / "last.pt") - tested["test/bpc"]) > 1e-4


def run_cli(args):
    return subprocess.Popen(
        [sys.executable, "-m", "mlstm.cli.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_run_stopped_right_after_a_halving_resumes_exactly(converged_run, tmp_path, monkeypatch, which):
    """SIGTERM to this process just after a halving was logged: the run stops after the next step, and rerunning
    resumes it to exactly the uninterrupted run's metrics. Right after the last halving, the rule's counters decide:
    two evaluations without improvement follow, which stop the run only if the checkpoint carried "a halving since
    the best point" and the best so far (fresh counters would take the first of them for an improvement)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the trainer listens to signals from the main thread only (a SIGTERM here would end pytest)")
    args, straight, _ = converged_run
    expected = metrics(straight)
    halvings = [r["step"] for r in expected if r.get("event") == "lr_reduced"]
    at = halvings[0] if which == "first" else halvings[-1]
    plateau_step = Trainer._plateau_step

    def signalled_after_the_halving(self, valid):
        stop = plateau_step(self, valid)
        if self.step == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return stop

    monkeypatch.setattr(Trainer, "_plateau_step", signalled_after_the_halving)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=f"stopped by SIGTERM at step {at + 1};"):
        train(load_config(args), run_dir=run)
    monkeypatch.undo()
    assert max(r["step"] for r in metrics(run)) == at and not any(r.get("event") == "early_stop" for r in metrics(run))
    train(load_config(args), run_dir=run)
    assert without_timing(metrics(run)) == without_timing(expected)


@pytest.mark.slow
def test_a_run_stopped_mid_plateau_resumes_exactly(enwik8_head200k, tmp_path):
    """SIGTERM once the rate was halved, rerun the same command: the metrics equal an uninterrupted run's (timings
    aside), the later halvings and the test pass included. The stop rule is left out here (a patience no run meets,
    so the run ends at its cap): the signal then always lands in the 1,000 and more steps after the first halving,
    never after the end (the in-process test above stops runs at exact points, the stop rule's state included)."""
    args = converge_args(
        enwik8_head200k,
        tmp_path / "cache",
        "trainer.early_stop_patience=1000",
        "trainer.max_steps=1500",
        "trainer.eval_every=25",
    )
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = run_cli([*args, f"hydra.run.dir={straight}"])
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    expected = metrics(straight)
    first_halving = next(r["step"] for r in expected if r.get("event") == "lr_reduced")
    stop = max(r["step"] for r in expected)
    assert stop == 1500 and first_halving < 500 and sum(r.get("event") == "lr_reduced" for r in expected) >= 2

    victim = run_cli([*args, f"hydra.run.dir={stopped}"])
    deadline = time.monotonic() + 600
    while not any(r.get("event") == "lr_reduced" for r in metrics(stopped)) and victim.poll() is None:
        assert time.monotonic() < deadline, "no lr_reduced record within 600 s"
        time.sleep(0.005)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=600)
    assert victim.returncode == 3, f"the run was not stopped by SIGTERM (status {victim.returncode}): {err[-3000:]}"
    found = re.search(r"stopped by SIGTERM at step (\d+);", err)
    assert found, err[-3000:]
    at = int(found.group(1))
    assert first_halving <= at < stop and max(r["step"] for r in metrics(stopped)) <= at
    assert not any(r.get("event") == "early_stop" for r in metrics(stopped))

    resumed = run_cli([*args, f"hydra.run.dir={stopped}"])  # the same command resumes from last.pt
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from step {at}" in err
    assert without_timing(metrics(stopped)) == without_timing(expected)


@pytest.mark.slow
def test_the_tuning_sweep_runs_two_cells_to_the_rule_then_skips_them(enwik8_sample, tmp_path):
    """+sweep=converge_tune_cpu through its own launcher (two jobs side by side), an LSTM and an mLSTM on the first
    20,000 characters of the sample, split 5,000 / 10,000 / 5,000 (31 steps per epoch): each stops by the rule
    after a few epochs, far below the cap; the same command again finds both finished and trains nothing.

    Why these sizes: the rule cannot stop before the 5th validation (a halving needs 2 without improvement, the stop
    2 more), so validating every 20 steps makes every stop come after 3 epochs whatever the curve; and 64 units
    learn 5,000 characters by heart within about 10 epochs, so the validation curve turns up (measured: stops at
    steps 200-320 for both cells, seeds 0-2) far below the cap of 2,000 steps. (Validating every 10 steps on 1,000
    characters let the noise decide: the mLSTM stopped in its 2nd epoch on one machine and its 5th on another.)"""
    sample = tmp_path / "enwik8_head20k.xml"
    sample.write_bytes(enwik8_sample.read_bytes()[:20_000])
    sweep_dir = tmp_path / "sweep"
    args = [
        "--multirun",
        "+sweep=converge_tune_cpu",
        "dataset=file",
        f"dataset.path={sample}",
        "dataset.split_fractions=[0.25,0.5,0.25]",
        f"data_dir={tmp_path / 'cache'}",
        "+variant=lstm_1m,mlstm_paper_1m",
        "optim.lr=0.02",
        "seed=0",
        "cell.hidden_size=64",
        "model.embedding_size=16",
        "trainer.batch_size=8",
        "trainer.seq_len=20",
        "trainer.eval_every=20",
        "trainer.max_steps=2000",
        "logger=none",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    command = [sys.executable, "-m", "mlstm.cli.train", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {preset: sweep_dir / "file" / preset / "lr0.02-seed0" for preset in ("lstm_1m", "mlstm_paper_1m")}
    before = {}
    for preset, run in runs.items():
        config = OmegaConf.load(run / "config.yaml")
        assert (config.optim.schedule, config.trainer.early_stop_patience, config.trainer.test_at_end) == (
            "plateau",
            2,
            False,
        )
        records = metrics(run)
        events = [r for r in records if "event" in r]
        valids = [r for r in records if "valid/bpc" in r]
        assert events[-1]["event"] == "early_stop", preset  # stopped by the rule ...
        end = events[-1]["step"]
        assert end == valids[-1]["step"] == max(r["step"] for r in records) < 2000  # ... not at the cap
        assert max(r.get("epoch", 0) for r in records) >= 3, preset  # after a few passes over the training split
        assert [e["event"] for e in events[:-1]] == ["lr_reduced"] * (len(events) - 1) and len(events) >= 2
        assert [(e["step"], e["event"]) for e in events] == [(s, e) for s, e, _ in replayed_events(valids, 0.02)]
        assert not any("test/bpc" in r for r in records)  # tuning runs keep the test split for the final seeds
        assert run_score(records, 2000, best=True) == min(v["valid/bpc"] for v in valids)
        before[preset] = (run / "metrics.jsonl").read_bytes()
    # the tuning rule reads them as finished (one rate per cell: the choice is that rate, at the grid's edge)
    study = converged.analyse([], load_runs([str(sweep_dir)]))
    assert {(s.variant, s.selection.chosen, s.selection.complete) for s in study.selections} == {
        ("lstm", 0.02, True),
        ("mlstm-paper", 0.02, True),
    }

    again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    for preset, run in runs.items():
        assert f"nothing to do: {run} holds a finished run" in output
        assert (run / "metrics.jsonl").read_bytes() == before[preset]
    assert "resumed from step" not in output and "parameters:" not in output
