"""The size ladder on one GPU: learning-rate grids, selection, fresh seeds, and the paper presets' step times.

The Python half of `scripts/gpu_study.sh` (which sets up the environment, then runs `scripts/gpu_study.py`, a thin
entry point over `main` here, and `scale_report.py`):

    python scripts/gpu_study.py --data DATA_DIR --out OUT --work WORK [--dry-run] [--jobs N] [--deadline-s S]

1. **Paper presets** (`--skip-paper` leaves them out), one at a time on an otherwise idle GPU: paper_hutter_mlstm,
   paper_hutter_lstm, paper_hutter_large, paper_text8_large, each at its own batch and segment size in bf16, through
   the trainer, `--warmup-steps` (10) untimed steps then `--timed-steps` (20) timed ones (the trainer's training
   clock, the device synchronised around every step). OUT/gpu_hours.md and .json: measured ms per step, the steps of
   the preset's recipe, and the estimated training hours on this GPU (steps x seconds per step; evaluation and
   checkpoints not included). The samples stand in for the full corpora (the enwik8 sample has 200 symbols, the
   full enwik8 205: the one-hot input of the MATLAB presets is 2.5% narrower) and every preset is built with
   cell.init=torch (the orthogonal init's SVDs take minutes on the CPU and do not change the speed).
2. **The ladder** (`--skip-study` leaves it out): for every dataset, rung (0.3M, 1.2M, 4.8M, 20M) and cell (LSTM, mLSTM
   paper form, seed cell with the gated output), the grid of `--grid RUNG=r1,r2,r3` on the tuning seeds, then the
   rule of mlstm.studies.tuning (scaling.select_by_rung); a choice at the grid's edge (or a grid that diverged
   everywhere) adds the next rate outward, up to `--max-extend` times; then the fresh seeds at the chosen rate. The
   recipe is configs/sweep/convergence_cpu (800 steps of 32 x 100, Adam with the Chainer schedule, clip 1.0), as the CPU
   ladder's, with on_divergence=end, the test pass on the fresh seeds only, and on the GPU bf16, validation every
   `--eval-every` (100) steps on the first 50k characters read as `--eval-streams` (4) streams. Runs go to
   WORK/{runs,final}/<dataset>/<preset>/lr<rate>-seed<seed> (what the CPU sweeps write), each finished one is
   copied (metrics.jsonl, config.yaml) to the same place under OUT, and its checkpoints are deleted. A group's fresh
   seeds start as soon as its grid is ruled, so the GPU never waits for the slowest grid.
3. Runs go to `--jobs` worker processes at once (the trainer in-process: no interpreter start per run), the
   costliest first. No run is started that would not end before `--deadline-s` (from the start of this script,
   judged by the finished runs of the same size); at the deadline the workers still running are killed. What did not
   run is listed in OUT/jobs.jsonl; running the same command again with the same OUT trains only what is missing
   (finished runs are copied back into WORK and skipped).

`--dry-run`: the same steps on the CPU with tiny models (hidden sizes 6-12), 4 steps of 4 x 16, 2 workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlstm.training.pool import Pool

# the checkout: configs/ and scripts/ (the package is installed editable)
REPO_ROOT = Path(__file__).resolve().parents[3]
CELLS = ("lstm", "mlstm_paper", "mlstm_seed_gated")
RUNGS = ("300k", "1m", "5m", "20m")
SAMPLES = {"enwik8_sample": "enwik8_head3M.xml", "text8_sample": "text8_head2M.txt"}
# factor-2 grids, the expected best in the middle, one step lower per rung (the best rate should fall with size)
GRIDS = {
    "300k": (0.004, 0.008, 0.016),
    "1m": (0.002, 0.004, 0.008),
    "5m": (0.001, 0.002, 0.004),
    "20m": (0.0005, 0.001, 0.002),
}
# relative cost of one run, to start the longest first and to guess a run's time before one of its size finished
COST = {"300k": 1.0, "1m": 1.1, "5m": 1.5, "20m": 3.0}
LSTM_COST = 0.5  # cuDNN's LSTM steps are cheaper than the mLSTM's at these sizes
PAPER = {  # preset -> (sample it is timed on, the paper's row)
    "paper_hutter_mlstm": ("enwik8_sample", "mLSTM 1900, one-hot, enwik8: 1.42 (MATLAB recipe)"),
    "paper_hutter_lstm": ("enwik8_sample", "LSTM 2 x 1250 with skip connections (baseline, MATLAB recipe)"),
    "paper_hutter_large": ("enwik8_sample", "large mLSTM 2800, emb 400, WN, VD, enwik8: 1.24 (Chainer recipe)"),
    "paper_text8_large": ("text8_sample", "same on text8: 1.27 (Chainer recipe)"),
}
DRY_HIDDEN = {"300k": 4, "1m": 8, "5m": 16, "20m": 32}  # tiny, and still growing in parameters along the ladder
KEPT = ("metrics.jsonl", "config.yaml")


# ---------------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    kind: str  # "tune" | "final" | "paper"
    dataset: str  # the dataset config: enwik8_sample | text8_sample
    preset: str  # variant preset (lstm_300k) or experiment (paper_hutter_large)
    lr: float | None
    seed: int | None
    overrides: list[str]
    run_dir: str
    cost: float = 1.0

    @property
    def key(self) -> str:
        if self.kind == "paper":
            return f"paper/{self.preset}"
        folder = "runs" if self.kind == "tune" else "final"
        return f"{folder}/{self.dataset}/{self.preset}/lr{self.lr:g}-seed{self.seed}"

    @property
    def size(self) -> str:
        """What its duration is estimated from: the runs of the same preset (cell and rung) that finished."""
        return self.preset


def study_overrides(args, kind: str, dataset: str, preset: str, lr: float, seed: int) -> list[str]:
    rung = preset.rsplit("_", 1)[1]
    common = [
        "+sweep=convergence_cpu",
        f"+variant={preset}",
        f"dataset={dataset}",
        f"optim.lr={lr:g}",
        f"seed={seed}",
        "logger=none",
        "trainer.on_divergence=end",
        "trainer.progress=false",
        "trainer.keep_checkpoints=1",
    ]
    if kind == "tune":
        common.append("trainer.test_at_end=false")
    if args.dry_run:
        return common + [
            "trainer.device=cpu",
            "trainer.precision=fp32",
            f"cell.hidden_size={DRY_HIDDEN[rung]}",
            "trainer.max_steps=4",
            "trainer.eval_every=2",
            "trainer.log_every=2",
            "trainer.batch_size=4",
            "trainer.seq_len=16",
            "trainer.eval_chars=400",
            "trainer.test_chars=400",
            "trainer.eval_batch_size=1",
            "trainer.checkpoint_every=4",
            "trainer.cold_start_streams=4",
        ]
    return common + [
        f"trainer.device={args.device}",
        f"trainer.precision={args.precision}",
        f"trainer.eval_every={args.eval_every}",
        f"trainer.eval_batch_size={args.eval_streams}",
        "trainer.checkpoint_every=800",
    ]


def paper_overrides(args, preset: str, dataset: str) -> list[str]:
    steps = args.warmup_steps + args.timed_steps
    common = [
        f"+experiment={preset}",
        f"dataset={dataset}",
        "logger=none",
        "cell.init=torch",
        "trainer.progress=false",
        f"trainer.max_steps={steps}",
        f"trainer.log_every={math.gcd(args.warmup_steps, args.timed_steps)}",
        "trainer.eval_every=null",
        "trainer.test_at_end=false",
        "trainer.checkpoint_every=null",
        "trainer.keep_checkpoints=1",
    ]
    if args.dry_run:
        return common + [
            "trainer.device=cpu",
            "trainer.precision=fp32",
            "cell.hidden_size=16",
            "trainer.batch_size=4",
            "trainer.seq_len=16",
            "trainer.eval_chars=400",
            "trainer.eval_batch_size=1",
        ]
    return common + [
        f"trainer.device={args.device}",
        f"trainer.precision={args.precision}",
        "trainer.eval_chars=50000",
        "trainer.eval_batch_size=100",
    ]


# ---------------------------------------------------------------------------------------------------- the study
@dataclass
class Group:
    """One cell at one rung on one dataset: its grid, its choice, its fresh seeds."""

    dataset: str
    preset: str
    rates: list[float]
    pending: set = field(default_factory=set)
    extensions: int = 0
    chosen: float | None = None
    phase: str = "tune"  # tune | final | done
    selection: dict | None = None


class Study:
    def __init__(self, args):
        self.args = args
        self.out, self.work = Path(args.out), Path(args.work)
        self.start = time.monotonic()
        self.deadline = self.start + args.deadline_s
        self.log_file = open(self.out / "jobs.jsonl", "a")
        self.durations: dict[str, list[float]] = {}
        self.ready: list[Job] = []
        self.groups: dict[tuple[str, str], Group] = {}
        self.jobs: dict[str, Job] = {}
        self.done: dict[str, dict] = {}

    # ---- bookkeeping
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def record(self, job: Job, status: str, **extra) -> None:
        entry = {
            "key": job.key,
            "kind": job.kind,
            "dataset": job.dataset,
            "preset": job.preset,
            "lr": job.lr,
            "seed": job.seed,
            "status": status,
            "at_s": round(self.elapsed(), 1),
            **extra,
        }
        self.log_file.write(json.dumps(entry) + "\n")
        self.log_file.flush()

    def estimate(self, job: Job) -> float:
        """Seconds this run will take: the mean of finished runs of its size, else a guess from the cost table."""
        seen = self.durations.get(job.size)
        if seen:
            return sum(seen) / len(seen)
        return job.cost * self.args.guess_s

    def make_job(self, kind: str, dataset: str, preset: str, lr: float, seed: int) -> Job:
        rung = preset.rsplit("_", 1)[1]
        folder = "runs" if kind == "tune" else "final"
        run_dir = self.work / folder / dataset / preset / f"lr{lr:g}-seed{seed}"
        cost = COST[rung] * (LSTM_COST if preset.startswith("lstm_") else 1.0)
        job = Job(
            kind,
            dataset,
            preset,
            lr,
            seed,
            study_overrides(self.args, kind, dataset, preset, lr, seed),
            str(run_dir),
            cost,
        )
        self.jobs[job.key] = job
        return job

    def enqueue(self, jobs: list[Job]) -> None:
        self.ready.extend(jobs)
        self.ready.sort(key=lambda j: -j.cost)  # the costliest first: the short ones fill the end

    # ---- outcomes
    def keep(self, job: Job) -> None:
        """Copy a finished run's metrics.jsonl and config.yaml to OUT (the results folder holds no checkpoints)."""
        source = Path(job.run_dir)
        target = self.out / Path(job.key)
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)

    def failed(self, job: Job, error: str) -> None:
        log = Path(job.run_dir) / "train.log"
        tail = log.read_text(errors="replace").splitlines()[-30:] if log.is_file() else []
        errors = self.out / "errors"
        errors.mkdir(exist_ok=True)
        (errors / (job.key.replace("/", "__") + ".log")).write_text("\n".join([error, *tail]) + "\n")

    def finished(self, job: Job, result: dict) -> list[Job]:
        """A run ended: keep it, and return the runs its group can start now."""
        self.done[job.key] = result
        self.durations.setdefault(job.size, []).append(result.get("seconds", 0.0))
        status = result["status"]
        self.record(
            job,
            status,
            seconds=round(result.get("seconds", 0.0), 1),
            score=result.get("score"),
            error=result.get("error"),
        )
        if status == "done":
            self.keep(job)
        else:
            self.failed(job, result.get("error") or status)
        self.say(
            f"{status}: {job.key} ({result.get('seconds', 0):.1f}s"
            + (f", score {result['score']:.3f}" if result.get("score") is not None else "")
            + (f", {result['error']}" if result.get("error") else "")
            + ")"
        )
        if job.kind == "paper":
            return []
        group = self.groups[(job.dataset, job.preset)]
        group.pending.discard(job.key)
        if group.pending:
            return []
        return self.advance(group)

    def advance(self, group: Group) -> list[Job]:
        if group.phase == "final":
            group.phase = "done"
            return []
        from mlstm.studies import scaling
        from mlstm.studies.runs import load_runs

        grid_dir = self.work / "runs" / group.dataset / group.preset
        try:
            selections = scaling.select_by_rung(load_runs([str(grid_dir)]))
        except Exception as error:  # noqa: BLE001 - e.g. every run failed: no run to read
            self.say(f"no selection for {group.dataset}/{group.preset}: {error}")
            group.phase = "done"
            return []
        selection = selections[0]
        group.selection = selection.as_dict()
        chosen, next_lr = selection.selection.chosen, selection.next_lr
        if next_lr is not None and group.extensions < self.args.max_extend:
            group.extensions += 1
            group.rates.append(next_lr)
            self.say(f"{group.dataset}/{group.preset}: choice {chosen} at the grid's edge: adding {next_lr:g}")
            return self.grid_jobs(group, [next_lr])
        if chosen is None:
            self.say(f"{group.dataset}/{group.preset}: every rate diverged: no fresh seeds")
            group.phase = "done"
            return []
        group.chosen, group.phase = chosen, "final"
        edge = " (still at the grid's edge)" if selection.selection.at_edge else ""
        self.say(f"{group.dataset}/{group.preset}: chosen rate {chosen:g}{edge}; fresh seeds")
        jobs = [self.make_job("final", group.dataset, group.preset, chosen, s) for s in self.args.final_seeds]
        group.pending = {j.key for j in jobs}
        return jobs

    def grid_jobs(self, group: Group, rates: list[float]) -> list[Job]:
        jobs = [self.make_job("tune", group.dataset, group.preset, lr, s) for lr in rates for s in self.args.tune_seeds]
        group.pending |= {j.key for j in jobs}
        return jobs

    # ---- the loop
    def restore(self) -> None:
        """Finished runs of an earlier call (under OUT) go back into WORK, where the trainer skips them."""
        count = 0
        for metrics in sorted(
            list(self.out.glob("runs/*/*/*/metrics.jsonl")) + list(self.out.glob("final/*/*/*/metrics.jsonl"))
        ):
            target = self.work / metrics.parent.relative_to(self.out)
            if not (target / "metrics.jsonl").is_file():
                target.mkdir(parents=True, exist_ok=True)
                for name in KEPT:
                    if (metrics.parent / name).is_file():
                        shutil.copy2(metrics.parent / name, target / name)
                count += 1
        if count:
            self.say(f"{count} finished runs of an earlier call restored into {self.work}: they are skipped")

    def restored_rates(self, dataset: str, preset: str) -> list[float]:
        """The learning rates of the tuning runs already in WORK for one cell and rung (lr<rate>-seed<seed>)."""
        rates = []
        for run in (self.work / "runs" / dataset / preset).glob("lr*-seed*"):
            with contextlib.suppress(ValueError):
                rates.append(float(run.name[2:].rsplit("-seed", 1)[0]))
        return rates

    def run(self, pool: Pool, first: list[Job], serial: bool = False) -> None:
        """Run `first` and whatever their outcomes start, until nothing is left or the deadline."""
        self.enqueue(first)
        in_flight: set[str] = set()
        free = len(pool.workers)
        while self.ready or in_flight:
            while self.ready and len(in_flight) < (1 if serial else free):
                job = self.ready.pop(0)
                if time.monotonic() + self.estimate(job) > self.deadline:
                    reason = (
                        f"would not end before the deadline ({self.args.deadline_s:.0f}s;"
                        f" estimate {self.estimate(job):.0f}s)"
                    )
                    self.record(job, "skipped", reason=reason)
                    self.say(f"skipped (deadline): {job.key}")
                    if job.kind != "paper":
                        self.groups[(job.dataset, job.preset)].pending.discard(job.key)
                    continue
                pool.submit(job.key, job.overrides, job.run_dir, keep_checkpoints=job.kind == "paper")
                in_flight.add(job.key)
            if not in_flight:
                continue
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                for key in pool.kill():
                    self.record(self.jobs[key], "killed", reason="the deadline")
                    self.say(f"killed at the deadline: {key}")
                for key in in_flight - set(pool.running.values()):
                    self.record(self.jobs[key], "not started", reason="the deadline")
                for job in self.ready:
                    self.record(job, "skipped", reason="the deadline")
                self.ready.clear()
                raise TimeoutError
            for kind, _, payload in pool.poll(timeout=min(1.0, remaining)):
                if kind == "done":
                    in_flight.discard(payload["key"])
                    self.enqueue(self.finished(self.jobs[payload["key"]], payload))
                elif kind == "died":
                    in_flight.discard(payload)
                    self.enqueue(
                        self.finished(
                            self.jobs[payload], {"key": payload, "status": "failed", "error": "the worker process died"}
                        )
                    )


# ---------------------------------------------------------------------------------------------------- paper timing
def paper_table(args, study: Study) -> None:
    """gpu_hours.md / .json from the timed paper-preset runs."""
    from mlstm.config import load_config
    from mlstm.model import count_parameters
    from mlstm.training.tracking import read_metrics

    rows = []
    first, last = args.warmup_steps, args.warmup_steps + args.timed_steps
    for preset, (dataset, paper_row) in PAPER.items():
        recipe = load_config([f"+experiment={preset}"])
        run_dir = study.out / "paper" / preset
        records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        times = {int(r["step"]): float(r["time"]) for r in records if "train/bpc" in r and "time" in r}
        ms = (times[last] - times[first]) / args.timed_steps * 1e3 if first in times and last in times else None
        config = {}
        if (run_dir / "config.yaml").is_file():
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        batch = int(config.get("trainer", {}).get("batch_size", recipe.trainer.batch_size))
        seq_len = int(config.get("trainer", {}).get("seq_len", recipe.trainer.seq_len))
        steps = int(recipe.trainer.max_steps)
        rows.append(
            {
                "preset": preset,
                "paper": paper_row,
                "params_full_corpus": count_parameters(recipe),
                "timed_on": dataset,
                "batch_size": batch,
                "seq_len": seq_len,
                "precision": config.get("trainer", {}).get("precision"),
                "ms_per_step": ms,
                "chars_per_s": batch * seq_len / (ms / 1e3) if ms else None,
                "recipe_steps": steps,
                "recipe_chars": steps * int(recipe.trainer.batch_size) * int(recipe.trainer.seq_len),
                "recipe_batch_size": int(recipe.trainer.batch_size),
                "recipe_seq_len": int(recipe.trainer.seq_len),
                "gpu_hours": steps * ms / 1e3 / 3600 if ms else None,
                "eval_every": recipe.trainer.get("eval_every"),
                "eval_chars": recipe.trainer.get("eval_chars"),
                "device": (config.get("runtime") or {}).get("device_name")
                or (config.get("runtime") or {}).get("device"),
            }
        )
    (study.out / "gpu_hours.json").write_text(json.dumps(rows, indent=1) + "\n")
    dry = " (DRY RUN: tiny models, CPU)" if args.dry_run else ""
    lines = [
        f"# Paper presets: measured step time and GPU-hours per paper row{dry}",
        "",
        f"Each preset at its own batch and segment size, {args.precision if not args.dry_run else 'fp32'}, "
        f"through the trainer: {args.warmup_steps} untimed steps, then the mean of {args.timed_steps} timed "
        "steps (training clock, device synchronised around every step). Estimated hours = steps of the recipe × "
        "measured seconds per step: training only (evaluation every `eval_every` steps and checkpoints are not "
        "included). Timed on the samples (the enwik8 sample has 200 symbols, full enwik8 205), built with "
        "cell.init=torch (the speed does not depend on the initial values). Measured on: "
        + (", ".join(sorted({str(r["device"]) for r in rows if r["device"]})) or "nothing (no run finished)")
        + ".",
        "",
        "| paper row | preset | parameters (full corpus) | B × T | ms/step | chars/s | recipe steps | est. GPU-hours |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "not measured"
        cps = f"{r['chars_per_s']:,.0f}" if r["chars_per_s"] else "–"
        hours = f"{r['gpu_hours']:.2f}" if r["gpu_hours"] is not None else "–"
        lines.append(
            f"| {r['paper']} | `{r['preset']}` | {r['params_full_corpus']:,} | {r['batch_size']} × "
            f"{r['seq_len']} | {ms} | {cps} | {r['recipe_steps']:,} | {hours} |"
        )
    (study.out / "gpu_hours.md").write_text("\n".join(lines) + "\n")
    study.say("wrote gpu_hours.md")


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with enwik8_head3M.xml and text8_head2M.txt")
    p.add_argument("--out", type=Path, required=True, help="the results folder")
    p.add_argument("--work", type=Path, required=True, help="scratch folder for run directories and checkpoints")
    p.add_argument("--dry-run", action="store_true", help="tiny models, a few steps, on the CPU")
    p.add_argument("--jobs", type=int, help="runs at once (default 12; dry run 2)")
    p.add_argument(
        "--deadline-s",
        type=float,
        help="stop starting runs that would end later; kill what runs then (default 400; dry run 1800)",
    )
    p.add_argument("--rungs", help="comma-separated (default 300k,1m,5m,20m; dry run 300k,20m)")
    p.add_argument("--datasets", default="enwik8_sample,text8_sample", help="comma-separated dataset configs")
    p.add_argument("--grid", action="append", default=[], help="RUNG=r1,r2,r3 (repeatable; defaults in GRIDS)")
    p.add_argument("--tune-seeds", default="0", help="comma-separated tuning seeds (default 0)")
    p.add_argument("--final-seeds", default="100,101,102", help="comma-separated fresh seeds (default 100,101,102)")
    p.add_argument("--max-extend", type=int, default=1, help="grid extensions per cell and rung (default 1)")
    p.add_argument("--eval-every", type=int, default=100, help="validation every N steps on the GPU (default 100)")
    p.add_argument("--eval-streams", type=int, default=4, help="validation streams on the GPU (default 4)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--warmup-steps", type=int, help="paper presets: untimed steps (default 10; dry run 2)")
    p.add_argument("--timed-steps", type=int, help="paper presets: timed steps (default 20; dry run 4)")
    p.add_argument(
        "--guess-s", type=float, help="seconds of a cost-1 run before any has finished (default 12; dry run 2)"
    )
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--skip-study", action="store_true")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.jobs = args.jobs or (2 if dry else 12)
    args.deadline_s = args.deadline_s or (1800.0 if dry else 400.0)
    args.rungs = [r for r in (args.rungs or ("300k,20m" if dry else ",".join(RUNGS))).split(",") if r]
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.tune_seeds = [int(s) for s in args.tune_seeds.split(",") if s]
    args.final_seeds = [int(s) for s in args.final_seeds.split(",") if s]
    args.warmup_steps = args.warmup_steps or (2 if dry else 10)
    args.timed_steps = args.timed_steps or (4 if dry else 20)
    args.guess_s = args.guess_s or (2.0 if dry else 12.0)
    args.grids = {rung: list(rates) for rung, rates in GRIDS.items()}
    for text in args.grid:
        rung, _, rates = text.partition("=")
        args.grids[rung] = [float(r) for r in rates.split(",") if r]
    for rung in args.rungs:
        if rung not in RUNGS:
            p.error(f"unknown rung {rung!r}; choose from {', '.join(RUNGS)}")
        if len(args.grids[rung]) < 3:
            p.error(f"the grid of {rung} needs at least 3 rates")
    for dataset in args.datasets:
        if dataset not in SAMPLES:
            p.error(f"unknown dataset {dataset!r}; choose from {', '.join(SAMPLES)}")
    return args


def prepare_data(args, study: Study) -> list[str]:
    """The datasets whose sample is in --data, each encoded into the token cache once, before any worker reads it."""
    from mlstm.config import load_config
    from mlstm.data import load_corpus

    present = []
    for dataset in args.datasets:
        if not (args.data / SAMPLES[dataset]).is_file():
            study.say(f"warning: {args.data / SAMPLES[dataset]} not found: {dataset} left out")
            continue
        cfg = load_config([f"dataset={dataset}"])
        load_corpus(cfg.dataset, cfg.data_dir)
        present.append(dataset)
    return present


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out, args.work, args.data = args.out.resolve(), args.work.resolve(), args.data.resolve()
    os.environ["MLSTM_SHARED_DATA"] = str(args.data)  # the *_sample dataset configs read the samples from here
    os.environ["MLSTM_DATA_DIR"] = str(args.work / "data_cache")
    os.chdir(REPO_ROOT)
    study = Study(args)
    study.say(
        f"gpu study: rungs {','.join(args.rungs)}; datasets {','.join(args.datasets)}; {args.jobs} runs at once; "
        f"deadline {args.deadline_s:.0f}s{'; DRY RUN (CPU, tiny models)' if args.dry_run else ''}"
    )
    datasets = prepare_data(args, study)
    plan = {
        "rungs": args.rungs,
        "datasets": datasets,
        "cells": CELLS,
        "grids": {r: args.grids[r] for r in args.rungs},
        "tune_seeds": args.tune_seeds,
        "final_seeds": args.final_seeds,
        "max_extend": args.max_extend,
        "jobs": args.jobs,
        "deadline_s": args.deadline_s,
        "dry_run": args.dry_run,
        "recipe": [
            o
            for o in study_overrides(args, "final", "DATASET", "lstm_" + (args.rungs or ["1m"])[0], 1.0, 0)
            if not o.startswith(("+variant=", "dataset=", "optim.lr=", "seed=", "cell.hidden_size="))
        ],
    }
    (args.out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    study.restore()
    pool = Pool(args.jobs)
    status = 0
    try:
        if not args.skip_paper:
            jobs = []
            for preset, (dataset, _) in PAPER.items():
                if dataset not in datasets:
                    continue
                run_dir = args.work / "paper" / preset
                shutil.rmtree(run_dir, ignore_errors=True)  # a timing is always measured afresh
                job = Job(
                    "paper", dataset, preset, None, None, paper_overrides(args, preset, dataset), str(run_dir), cost=0.0
                )
                study.jobs[job.key] = job
                jobs.append(job)
            study.say("timing the paper presets, one at a time")
            study.run(pool, jobs, serial=True)
            paper_table(args, study)
        if not args.skip_study:
            first = []
            for dataset in datasets:
                for rung in args.rungs:
                    for cell in CELLS:
                        group = Group(dataset, f"{cell}_{rung}", list(args.grids[rung]))
                        # rates an earlier call added at the grid's edge (restored from OUT) count as extensions
                        extra = sorted(set(study.restored_rates(dataset, group.preset)) - set(group.rates))
                        group.rates += extra
                        group.extensions = len(extra)
                        study.groups[(dataset, group.preset)] = group
                        first += study.grid_jobs(group, group.rates)
            study.say(
                f"the ladder: {len(first)} tuning runs in {len(study.groups)} grids, then "
                f"{len(args.final_seeds)} fresh seeds per grid"
            )
            study.run(pool, first)
    except TimeoutError:
        study.say(
            f"deadline ({args.deadline_s:.0f}s) reached: what did not finish is in jobs.jsonl; run the same "
            f"command again with the same OUT to finish it"
        )
        status = 3
    finally:
        pool.kill()  # idle by now (or past the deadline): nothing of theirs is lost, and no slow exit is waited for
        if not args.skip_paper and not (args.out / "gpu_hours.md").is_file():
            paper_table(args, study)
    groups = [
        {
            "dataset": g.dataset,
            "preset": g.preset,
            "rates": g.rates,
            "chosen": g.chosen,
            "phase": g.phase,
            "selection": g.selection,
        }
        for g in study.groups.values()
    ]
    (args.out / "groups.json").write_text(json.dumps(groups, indent=1) + "\n")
    failed = [k for k, r in study.done.items() if r["status"] != "done"]
    study.say(
        f"{sum(r['status'] == 'done' for r in study.done.values())} runs done, {len(failed)} failed; "
        f"{sum(g.phase == 'done' for g in study.groups.values())}/{len(study.groups)} grids with their fresh "
        f"seeds"
    )
    if failed:
        status = status or 1
    return status
