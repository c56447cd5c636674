"""The speed benchmark's plumbing: the script's JSON rows, the analytic FLOP count, the equal-parameter search.
No timing is asserted (the test machines are shared and noisy); speed numbers come from `make bench` runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mlstm.bench import steps as bench
from mlstm.bench.steps import CellSpec, Row, Shape
from mlstm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_script_writes_rows_with_ratios(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "bench.py"),
        "--cells",
        "lstm:cudnn,mlstm-paper:fast",
        "--hidden",
        "16",
        "--batch",
        "2",
        "--seq-len",
        "5",
        "--embedding",
        "8",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--json",
        str(out_json),
        "--markdown",
        str(out_md),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out_json.read_text())
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
    requested = [r for r in rows if r["role"] == "requested"]
    assert [(r["cell"], r["impl"]) for r in requested] == [("lstm", "cudnn"), ("mlstm-paper", "fast")]
    # the mLSTM has more parameters than nn.LSTM at H=16, so its equal-parameter nn.LSTM is a timed baseline row
    assert any(r["role"] == "baseline" and r["hidden"] != 16 for r in rows)
    for r in rows:
        for key in bench.REQUIRED_KEYS:
            assert key in r, key
        assert (r["batch"], r["seq_len"], r["device"]) == (2, 5, "cpu")
        for key in ("ms_per_step", "chars_per_s", "tflops", "flops_per_step", "params"):
            assert r[key] > 0, key
        assert r["peak_mem_mib"] >= 0 and r["error"] is None
        assert r["torch_version"] == torch.__version__ and r["threads"] == 1
        assert r["tf32_matmul"] is False and r["tf32_cudnn"] is False
    for r in requested:
        for key in ("ratio_lstm_same_hidden", "ratio_lstm_same_params", "lstm_hidden_same_params"):
            assert r[key] is not None and r[key] > 0, key
    assert requested[0]["ratio_lstm_same_hidden"] == 1.0
    assert requested[1]["lstm_hidden_same_params"] > 16
    table = out_md.read_text()
    assert "| cell | impl |" in table and "mlstm-paper" in table
    assert "| cell | impl |" in done.stdout  # the table is printed too


def test_flops_of_a_tiny_lstm_by_hand():
    shape = Shape(hidden=3, batch=2, seq_len=4, embedding=2, vocab=5)
    # per character: W_x 4H x I = 12 x 2 = 24, W_h 12 x 3 = 36, decoder V x H = 15 -> 75 multiply-adds;
    # forward 2 x 75 x (B T = 8) = 1200 FLOPs; forward + backward = 3 x 1200
    assert bench.matmul_macs_per_char(CellSpec.parse("lstm:cudnn"), shape) == 75
    assert bench.flops_per_step(CellSpec.parse("lstm:cudnn"), shape) == 3600
    # one-hot input: I = V = 5, W_x is 12 x 5 = 60 -> 111 multiply-adds per character
    assert bench.flops_per_step(CellSpec.parse("lstm:loop"), Shape(3, 2, 4, 0, 5)) == 3 * 2 * 111 * 8
    # mLSTM paper: 5H x I + 5H x H + V x H = 30 + 45 + 15; seed: 6H x I + 6H x H + V x H = 36 + 54 + 15
    assert bench.matmul_macs_per_char(CellSpec.parse("mlstm-paper:fast"), shape) == 90
    assert bench.matmul_macs_per_char(CellSpec.parse("mlstm-seed:fast"), shape) == 105


@pytest.mark.parametrize(
    "spec", ["lstm:loop", "mlstm-paper:reference", "mlstm-matlab:reference", "mlstm-seed:reference", "mlstm-paper:fast"]
)
@pytest.mark.parametrize("embedding", [6, 0])
def test_forward_flops_match_torch_flop_counter(spec, embedding, monkeypatch):
    monkeypatch.setenv("MLSTM_PACKED_GEMM", "0")  # the counter knows aten's products, not MKL's packed ones
    cell, shape = CellSpec.parse(spec), Shape(hidden=8, batch=3, seq_len=4, embedding=embedding, vocab=11)
    model = bench.build_row_model(cell, shape)
    tokens = torch.randint(shape.vocab, (shape.seq_len, shape.batch))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens, model.init_state(shape.batch))
    assert counter.get_total_flops() == bench.flops_per_step(cell, shape) // 3


@pytest.mark.parametrize("spec", ["mlstm-paper:fast", "mlstm-seed:fast", "mlstm-matlab:reference"])
@pytest.mark.parametrize("hidden", [256, 512, 4096])
def test_equal_parameter_lstm_within_one_percent(spec, hidden):
    shape = Shape(hidden=hidden, batch=32, seq_len=100, embedding=128, vocab=205)
    target = bench.count_parameters(CellSpec.parse(spec), shape)
    h, count = bench.equal_parameter_hidden(target, shape)
    assert abs(count - target) / target <= 0.01
    V, E = shape.vocab, shape.embedding  # nn.LSTM model: embedding, 4H(E + H) weights, two 4H biases, decoder
    assert count == V * E + 4 * h * (E + h) + 8 * h + V * h + V
    for neighbour in (h - 1, h + 1):  # and no other hidden size is closer
        other = bench.count_parameters(CellSpec.parse("lstm:cudnn"), Shape(neighbour, 32, 100, E, V))
        assert abs(other - target) >= abs(count - target)


def test_cell_specs():
    assert CellSpec.parse("mlstm:fast") == CellSpec("mlstm", "paper", "fast")
    assert CellSpec.parse("mlstm-seed:reference").label == "mlstm-seed:reference"
    assert CellSpec.parse("lstm:cudnn").cell == "lstm"
    for bad in ("lstm-paper:cudnn", "mlstm-foo:fast", "mlstm:cudnn", "gru:fast", "lstm"):
        with pytest.raises(UserError):
            CellSpec.parse(bad)


def test_plan_adds_each_baseline_once():
    shape = Shape(256, 32, 100, 128, 205)
    rows = [Row(CellSpec.parse(c), shape) for c in ("lstm:cudnn", "mlstm-paper:fast", "mlstm-paper:reference")]
    planned = bench.plan(rows)
    assert [role for _, role in planned] == ["requested"] * 3 + ["baseline"]  # same-params nn.LSTM shared
    assert planned[-1][0].spec == CellSpec.parse("lstm:cudnn") and planned[-1][0].shape.hidden > 256
    assert len(bench.plan(rows, baselines=False)) == 3


def test_gpu_preset_takes_overrides():
    groups = bench.groups_for("gpu", hidden=(32,), batch=4)
    assert [(g.hidden, g.batch, g.embedding, g.vocab) for g in groups] == [((32,), 4, 128, 205), ((32,), 4, 64, 256)]
    assert bench.groups_for("cpu")[0].hidden == (256, 512)
    with pytest.raises(UserError):
        bench.groups_for("gpu", cells=("lstm:nope",))


@pytest.mark.parametrize(
    "spec, hidden, embedding, vocab, exact, aligned",
    [
        ("mlstm-paper:fast", 1024, 128, 205, 1149, 1152),  # the rows of results/bench/gpu.md: 1149, 1263, 2294, 2517,
        ("mlstm-seed:fast", 1024, 128, 205, 1263, 1280),  # 4579 unaligned, as that table's baselines were timed
        ("mlstm-paper:fast", 2048, 128, 205, 2294, 2304),
        ("mlstm-seed:fast", 2048, 128, 205, 2517, 2496),
        ("mlstm-paper:fast", 4096, 64, 256, 4579, 4608),
    ],
)
def test_equal_parameter_lstm_on_cuda_is_a_multiple_of_64(spec, hidden, embedding, vocab, exact, aligned):
    """On CUDA the equal-parameter nn.LSTM runs at a hidden size cuDNN puts on tensor cores: the multiple of 64 below
    or above the closest-count H, whichever count is closer; elsewhere the closest count itself."""
    shape = Shape(hidden, 128, 200, embedding, vocab)
    target = bench.count_parameters(CellSpec.parse(spec), shape)
    assert bench.equal_parameter_hidden(target, shape)[0] == exact
    assert bench.same_params_hidden(target, shape, bench.baseline_multiple("cpu")) == bench.equal_parameter_hidden(
        target, shape
    )
    h, count = bench.same_params_hidden(target, shape, bench.baseline_multiple(torch.device("cuda")))
    assert h == aligned and h % 64 == 0
    lstm = CellSpec.parse("lstm:cudnn")
    for other in (h - 64, h + 64):  # and no other multiple of 64 is closer in parameters
        other_count = bench.count_parameters(lstm, Shape(other, 128, 200, embedding, vocab))
        assert abs(other_count - target) >= abs(count - target)
    planned = bench.plan([Row(CellSpec.parse(spec), shape)], multiple=64)
    assert [(r.spec, r.shape.hidden, role) for r, role in planned] == [
        (CellSpec.parse(spec), hidden, "requested"),
        (lstm, hidden, "baseline"),
        (lstm, aligned, "baseline"),
    ]


def test_markdown_states_the_rounding_rule():
    """The table's header says how the equal-parameter nn.LSTM was chosen: rounded on CUDA, not elsewhere."""
    row = Row(CellSpec.parse("mlstm-paper:fast"), Shape(2048, 128, 200, 128, 205))
    env = bench.environment(bench.Settings(device=torch.device("cpu")))
    for device, rule in (("cuda", "rounded to a multiple of 64"), ("cpu", "no rounding off CUDA")):
        settings = bench.Settings(device=torch.device(device), dtype="bf16")
        rows = bench.table([bench.Result(row, "requested")], settings, env)  # untimed: the columns only
        assert rows[0]["lstm_hidden_same_params"] == (2304 if device == "cuda" else 2294)
        assert rows[0]["lstm_hidden_closest_params"] == 2294
        header = bench.markdown(rows).split("| cell |")[0]
        assert rule in header


def test_run_seconds_table_lists_runs_slowest_first_with_their_last_valid_bpc(tmp_path):
    from mlstm.bench.denormal import run_seconds_table

    for name, seconds, bpc in (("fast", 200.0, 2.1), ("slow", 4000.0, 4.4), ("diverged", 90.0, float("inf"))):
        run = tmp_path / "cell" / name
        run.mkdir(parents=True)
        records = [
            {"step": 10, "time": seconds / 2, "train/bpc": 3.0},
            {"step": 20, "valid/bpc": bpc},
            {"step": 20, "time": seconds, "train/bpc": 2.0},
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "cell" / "empty").mkdir()  # no metrics: not a run
    lines = run_seconds_table(tmp_path).splitlines()[2:]
    assert lines == [
        "| cell/slow | 20 | 4000 | 4.400 |",
        "| cell/fast | 20 | 200 | 2.100 |",
        "| cell/diverged | 20 | 90 | non-finite |",
    ]


@pytest.mark.slow
def test_denormal_script_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bench_denormal.py"), "--checkpoint", str(tmp_path / "none.pt")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.pt'} does not exist"]
    assert done.stdout == ""
