"""The committed reports regenerate byte for byte from their committed runs: the shared-rate rerun (through
`mlstm.studies.study`), the tuned study and the size ladder (through the commands their study scripts run), and the
converged study (through `mlstm.studies.converged_report`, what scripts/converged_report.py runs)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlstm.studies import converged_report
from mlstm.studies.study import StudyOptions, load_study_runs, write_study

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDY = Path("results/convergence/rerun")  # relative: report.md lists the run directories relative to the cwd


def test_rerun_enwik8_report_regenerates_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    # the flags of results/convergence/rerun/README.md; the unigram entropy is the committed report's value, which
    # was computed from the corpus file beside the checkout: given here, so the test needs only committed files
    options = StudyOptions(targets=(4.5, 4, 3.6, 3.4), unigram_entropies={"enwik8_head3M": 5.069})
    runs = load_study_runs([str(STUDY / "runs" / "enwik8")], options)
    analyses = write_study(runs, tmp_path, options)

    committed = STUDY / "enwik8"
    assert (tmp_path / "report.md").read_bytes() == (committed / "report.md").read_bytes()
    assert (tmp_path / "summary.csv").read_bytes() == (committed / "summary.csv").read_bytes()
    assert [a.name for a in analyses] == ["enwik8_head3M"]
    assert sorted(analyses[0].figures) == sorted(p.name for p in committed.glob("*.png"))
    assert all((tmp_path / name).stat().st_size > 1000 for name in analyses[0].figures)


def script_command(script: str, starts: str, variables: dict[str, str]) -> list[str]:
    """The command of a study's shell script that writes its report (continuation lines joined, variables filled in),
    so that the test runs exactly what the study's README tells a reader to run."""
    text = (REPO_ROOT / script).read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.strip().startswith(starts)]
    for name, value in variables.items():
        line = line.replace(f'"${name}"', value).replace(f"${name}", value)
    return shlex.split(line)


def with_out(command: list[str], out: Path) -> list[str]:
    i = command.index("--out")
    return [sys.executable, *command[1 : i + 1], str(out), *command[i + 2 :]]


def assert_same_files(made: Path, committed: Path, names: list[str]) -> None:
    for name in names:
        assert (made / name).read_bytes() == (committed / name).read_bytes(), f"{committed / name} differs"


@pytest.mark.slow
def test_tuned_report_regenerates_byte_for_byte(shared_data, tmp_path):
    """results/convergence/tuned (README: `bash scripts/tuned_report.sh`): report.md, summary.csv and the final runs'
    convergence reports from the committed runs. The script computes the final runs' unigram-entropy line from the
    corpus files their configs name (beside the checkout, `shared_data`): without them that line, and the report,
    differ."""
    command = script_command("scripts/tuned_report.sh", '"$VENV/bin/python" scripts/tune.py report', {})
    done = subprocess.run(with_out(command, tmp_path), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    committed = REPO_ROOT / "results/convergence/tuned"
    assert_same_files(
        tmp_path,
        committed,
        [
            "report.md",
            "summary.csv",
            "enwik8_head3M_final/report.md",
            "enwik8_head3M_final/summary.csv",
            "text8_head2M_final/report.md",
            "text8_head2M_final/summary.csv",
        ],
    )
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in committed.glob("*.png"))


@pytest.mark.slow
def test_scale_report_regenerates_byte_for_byte(tmp_path):
    """results/convergence/scale (written by the last step of scripts/scale_study.sh): report.md, scale_summary.csv
    and selection.json from the committed runs of the ladder and of the tuned study."""
    command = script_command(
        "scripts/scale_study.sh",
        '"$PY" scripts/scale_report.py',
        {"SCALE": "results/convergence/scale", "TUNED": "results/convergence/tuned"},
    )
    done = subprocess.run(with_out(command, tmp_path), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    committed = REPO_ROOT / "results/convergence/scale"
    assert_same_files(tmp_path, committed, ["report.md", "scale_summary.csv", "selection.json"])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in committed.glob("*.png"))


def tracked_copy(folder: str, dest: Path) -> Path:
    """The files git tracks under `folder`, copied to `dest`: a study that spans sessions has unfinished runs on the
    disk it runs on (they resume from last.pt), and the committed report covers the committed runs only."""
    listed = subprocess.run(["git", "ls-files", "-z", folder], cwd=REPO_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: the committed runs of {folder} cannot be told from unfinished ones")
    for name in filter(None, listed.stdout.split("\0")):
        target = dest / Path(name).relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / name, target)
    return dest


def test_converged_report_regenerates_byte_for_byte(shared_data, tmp_path):
    """results/convergence/converged (README: scripts/converged_report.py --final ... --tuning ...): report.md,
    summary.csv and selection.json from the committed runs. The xz -9e reference line is computed from the sample the
    runs' configs name (beside the checkout, `shared_data`): without it that line, and the report, differ."""
    study = "results/convergence/converged"
    runs = tracked_copy(study, tmp_path / "study")
    finals = [str(runs / "final")] if (runs / "final").is_dir() else []
    converged_report.report_from_runs(finals, [str(runs / "runs")], tmp_path / "out")
    committed = REPO_ROOT / study
    assert_same_files(tmp_path / "out", committed, ["report.md", "summary.csv", "selection.json"])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(p.name for p in committed.glob("*.png"))
