"""Stateful evaluation on real text: per-character bits (mlstm.evaluate.bits_per_position) agree with the split's bpc,
each column is its stream read alone from a zero state, and scripts/eval_streams.py reports those numbers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mlstm.data import load_corpus
from mlstm.evaluate import bits_per_position, evaluate_bpc
from mlstm.training.trained import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    """(the model, the first 8,000 validation characters, the checkpoint path) of the session's tiny trained model
    (tests/conftest.py)."""
    model, payload = load_model(trained_checkpoint)
    cfg = OmegaConf.create(payload["config"])
    tokens = load_corpus(cfg.dataset, cfg.data_dir).split("valid")[:8_000]
    assert len(tokens) == 8_000
    return model, tokens, trained_checkpoint


@pytest.mark.parametrize("streams", [1, 4])
def test_mean_bits_per_position_is_the_splits_bpc(trained, streams):
    model, tokens, _ = trained
    bits = bits_per_position(model, tokens, batch_size=streams, seq_len=50)
    L = len(tokens) // streams
    assert bits.shape == ((L - 1) // 50 * 50, streams) and bits.dtype == torch.float64
    bpc = evaluate_bpc(model, tokens, batch_size=streams, seq_len=50, device=torch.device("cpu"))
    assert bits.mean().item() == pytest.approx(bpc, rel=1e-6)
    assert bpc < 6.0 and (bits >= 0).all()


def test_each_column_is_its_stream_read_alone_from_a_zero_state(trained):
    model, tokens, _ = trained
    together = bits_per_position(model, tokens, batch_size=4, seq_len=50)
    L = len(tokens) // 4
    for b in range(4):
        alone = bits_per_position(model, tokens[b * L : (b + 1) * L], batch_size=1, seq_len=50)[:, 0]
        torch.testing.assert_close(together[:, b], alone, atol=1e-4, rtol=1e-5)
    # and not the stream continued from its neighbour's state: stream 1 read on from stream 0 scores otherwise
    continued = bits_per_position(model, tokens[: 2 * L], batch_size=1, seq_len=50)[:, 0]
    assert not torch.allclose(continued[L : L + 50], together[:50, 1], atol=1e-2)


@pytest.mark.slow
def test_eval_streams_reports_bpc_per_stream_count_and_per_window(trained, tmp_path):
    model, tokens, checkpoint = trained
    out = tmp_path / "streams.md"
    done = subprocess.run(
        [
            sys.executable,
            "scripts/eval_streams.py",
            str(checkpoint),
            "--streams",
            "1,4",
            "--max-chars",
            "8000",
            "--seq-len",
            "50",
            "--window",
            "2000",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert text == done.stdout
    table = dict(re.findall(r"^\| (\d+) \| ([\d.]+) \|$", text, re.M))
    for B in (1, 4):
        bpc = evaluate_bpc(model, tokens, batch_size=B, seq_len=50, device=torch.device("cpu"))
        assert float(table[str(B)]) == pytest.approx(bpc, abs=5e-5)
    streams = re.search(r"per-stream bpc with B=4: (.*)$", text, re.M).group(1).split()
    assert len(streams) == 4
    windows = [float(v) for v in re.search(r"one stream from a zero state: (.*)$", text, re.M).group(1).split()]
    # 7,950 scored characters (159 segments of 50) in windows of 2,000: three whole windows and one of 1,950
    assert len(windows) == 4
    whole = bits_per_position(model, tokens, batch_size=1, seq_len=50)[:, 0]
    expected = [chunk.mean().item() for chunk in whole.split(2000)]
    assert windows == pytest.approx(expected, abs=5e-3)


@pytest.mark.slow
def test_eval_streams_on_a_missing_checkpoint_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/eval_streams.py", str(tmp_path / "none.pt")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1
