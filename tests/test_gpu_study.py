"""scripts/gpu_study.sh's CPU dry run: the whole GPU study (paper-preset timing, grids, selection, fresh seeds,
report) through the same script, with tiny models and a few steps on the enwik8 and text8 samples."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_writes_the_results_folder_and_report(enwik8_sample, text8_sample, tmp_path):
    assert enwik8_sample.parent == text8_sample.parent  # the script takes the folder that holds both samples
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "WORK": str(work), "OMP_NUM_THREADS": "1", "MPS": "0"}
    done = subprocess.run(
        ["bash", "scripts/gpu_study.sh", "--dry-run", str(enwik8_sample.parent), str(out)],
        capture_output=True,
        text=True,
        timeout=2400,
        cwd=REPO_ROOT,
        env=env,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    log = (out / "log.txt").read_text()
    assert "DRY_RUN=1" in log and "the ladder: 36 tuning runs in 12 grids" in log
    # paper presets timed, hours estimated per paper row
    hours = json.loads((out / "gpu_hours.json").read_text())
    assert [r["preset"] for r in hours] == [
        "paper_hutter_mlstm",
        "paper_hutter_lstm",
        "paper_hutter_large",
        "paper_text8_large",
    ]
    assert all(r["ms_per_step"] > 0 and r["gpu_hours"] > 0 for r in hours)
    assert [r["recipe_steps"] for r in hours] == [36000, 36000, 108000, 108000]
    assert "| paper row | preset |" in (out / "gpu_hours.md").read_text()
    # every grid ruled and its fresh seeds run: 2 datasets x 2 rungs x 3 cells
    groups = json.loads((out / "groups.json").read_text())
    assert len(groups) == 12 and all(g["phase"] == "done" and g["chosen"] is not None for g in groups)
    jobs = [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]
    assert all(j["status"] == "done" for j in jobs)
    finals = sorted(p.parent for p in (out / "final").rglob("metrics.jsonl"))
    assert len(finals) == 12 * 3
    tuning = sorted(p.parent for p in (out / "runs").rglob("metrics.jsonl"))
    assert len(tuning) >= 36
    for run in finals + tuning:
        assert (run / "config.yaml").is_file() and not list(run.glob("*.pt"))  # no checkpoints in the results
        assert run.relative_to(out).parts[1] in ("enwik8_sample", "text8_sample")
    # the report, its figure per dataset and its tables
    report = (out / "report.md").read_text()
    assert report.startswith("# DRY RUN")
    for dataset in ("enwik8_head3M", "text8_head2M"):
        assert f"## {dataset}" in report and (out / f"{dataset}_scale.png").stat().st_size > 0
    assert "### Learning rates" in report and "### Best against best" in report and "### Final bpc" in report
    for rung in ("300k", "20m"):
        assert f"| {rung} | mlstm-paper |" in report
    selection = json.loads((out / "selection.json").read_text())
    assert len(selection) == 12 and {s["rung"] for s in selection} == {"300k", "20m"}
    assert (out / "scale_summary.csv").read_text().count("\n") == 1 + 12

    # run again with the same OUT (one rung of one dataset, to keep it short): every run is found finished
    # (restored from OUT), nothing is trained again
    again = subprocess.run(
        ["bash", "scripts/gpu_study.sh", "--dry-run", str(enwik8_sample.parent), str(out)],
        capture_output=True,
        text=True,
        timeout=2400,
        cwd=REPO_ROOT,
        env={
            **env,
            "WORK": str(tmp_path / "work2"),
            "STUDY_ARGS": "--skip-paper --rungs 300k --datasets enwik8_sample",
        },
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "finished runs of an earlier call restored" in (out / "log.txt").read_text()
    logs = list((tmp_path / "work2").rglob("train.log"))
    assert logs and all("nothing to do" in p.read_text() for p in logs)


def test_a_cached_composition_equals_the_composed_config():
    """The driver composes a grid's config once and sets rate and seed: the same config as composing each run."""

    from omegaconf import OmegaConf

    from mlstm.config import load_config
    from mlstm.studies import gpu_study
    from mlstm.training.pool import compose

    args = gpu_study.parse_args(["--data", ".", "--out", ".", "--work", "."])
    for kind, lr, seed in (("tune", 0.004, 1), ("final", 0.0005, 101)):
        overrides = gpu_study.study_overrides(args, kind, "enwik8_sample", "mlstm_seed_gated_5m", lr, seed)
        compose(gpu_study.study_overrides(args, kind, "enwik8_sample", "mlstm_seed_gated_5m", 0.1, 7))
        cached = OmegaConf.to_container(compose(overrides), resolve=True)
        assert cached == OmegaConf.to_container(load_config(overrides), resolve=True)
        assert (cached["optim"]["lr"], cached["seed"], cached["cell"]["hidden_size"]) == (lr, seed, 845)
        assert cached["trainer"]["max_steps"] == 800 and cached["trainer"]["precision"] == "bf16"
        assert cached["trainer"]["test_at_end"] is (kind == "final")
