"""A committed convergence report regenerates byte for byte from its committed runs through `mlstm.studies.study`."""

from __future__ import annotations

from pathlib import Path

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
