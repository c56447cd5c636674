"""A real Hydra multirun (2 cells x 2 seeds) on the enwik8 sample, then the plot script on its run directories."""

import csv
import subprocess
import sys

import pytest

from mlstm.training.tracking import read_metrics


@pytest.mark.slow
def test_two_cells_two_seeds_sweep_then_plot(enwik8_sample, tmp_path):
    sweep_dir, out = tmp_path / "sweep", tmp_path / "plots"
    args = [
        "--multirun",
        "cell=lstm,mlstm",
        "seed=0,1",
        "dataset=file",
        f"dataset.path={enwik8_sample}",
        "trainer=cpu",
        "logger=none",
        "cell.hidden_size=16",
        "trainer.batch_size=4",
        "trainer.seq_len=20",
        "trainer.max_steps=6",
        "trainer.eval_every=3",
        "trainer.log_every=3",
        "trainer.eval_chars=2000",
        "trainer.test_chars=2000",
        "trainer.eval_batch_size=2",
        "trainer.progress=false",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    done = subprocess.run([sys.executable, "-m", "mlstm.cli.train", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted(p.parent for p in sweep_dir.rglob("metrics.jsonl"))
    assert len(runs) == 4  # one directory per job
    for run in runs:
        assert (run / "config.yaml").exists()
        assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 6

    plot = subprocess.run(
        [sys.executable, "scripts/plot_convergence.py", str(sweep_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plot.returncode == 0, plot.stderr[-2000:]
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["variant"] for row in rows} == {"lstm", "mlstm-paper"}
    assert all(row["n_seeds"] == "2" for row in rows)
