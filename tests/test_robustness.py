"""Never lose a run: corrupted checkpoints fall back, divergence is guarded, W&B failures never stop training, and
every kind of bad input ends in one line that names the problem and the fix.

In-process (`train(cfg)`) where the behaviour is the trainer's; a real `python -m mlstm.cli.train` subprocess where it
is the command line's (exit status, the line a user reads, no traceback). Real text from ../shared/data throughout;
real divergence (a learning rate of 1e30), real corrupted files, a real HTTP server and a real closed port.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import shutil
import socket
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from cli_helpers import (
    REPO_ROOT,
    TINY,
    assert_one_line_error,
    can_drop_file_permission_override,
    train_cli,
    without_file_permission_override,
)
from mlstm.config import load_config
from mlstm.errors import UserError
from mlstm.training import checkpoint
from mlstm.training.tracking import JsonlSink, read_metrics
from mlstm.training.trainer import train

TIMING_KEYS = {"time", "perf/chars_per_s", "perf/chars_per_s_per_rank"}


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def corpus(enwik8_head200k) -> Path:
    return enwik8_head200k


@pytest.fixture(scope="module")
def data_dir(data_cache) -> Path:
    return data_cache  # the session's token cache (tests/conftest.py)


def tiny_args(corpus: Path, data_dir: Path, *overrides: str) -> list[str]:
    return ["dataset=file", f"dataset.path={corpus}", f"data_dir={data_dir}", *TINY, *overrides]


def tiny_config(corpus, data_dir, *overrides):
    return load_config(tiny_args(corpus, data_dir, *overrides))


# ------------------------------------------------------------------------------------------------ safe checkpoints
def _truncate(path: Path, payload: dict) -> None:
    data = path.read_bytes()
    with open(path, "r+b") as f:  # in place: last.pt, a hard link to the same file, is cut too
        f.truncate(len(data) // 2)


def _flip_a_weight(path: Path, payload: dict) -> None:
    """Flip one byte inside the decoder weights: the zip archive still loads, only the digest can tell."""
    weights = payload["model"]["decoder.weight"].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(weights)
    assert at > 0, "the decoder weights are not stored verbatim in the checkpoint"
    with open(path, "r+b") as f:
        f.seek(at + len(weights) // 2)
        f.write(bytes([data[at + len(weights) // 2] ^ 0xFF]))


@pytest.mark.parametrize(
    "damage, reported",
    [
        (_truncate, "is unreadable or corrupted"),
        (_flip_a_weight, "is corrupted (its content does not match its SHA-256 digest)"),
    ],
    ids=["truncated", "bit-flipped"],
)
def test_a_corrupted_last_checkpoint_falls_back_to_the_previous_one_and_still_resumes_exactly(
    corpus, data_dir, tmp_path, capsys, damage, reported
):
    common = ["optim=adam", "trainer.eval_every=4", "trainer.checkpoint_every=4", "trainer.keep_checkpoints=3"]
    straight = train(tiny_config(corpus, data_dir, *common, "trainer.max_steps=12"), run_dir=tmp_path / "straight")

    run = tmp_path / "damaged"
    train(tiny_config(corpus, data_dir, *common, "trainer.max_steps=8"), run_dir=run)
    newest = run / "ckpt-00000008.pt"
    assert os.path.samefile(newest, run / "last.pt")
    damage(newest, torch.load(newest, weights_only=True))
    capsys.readouterr()

    resumed = train(tiny_config(corpus, data_dir, *common, "trainer.max_steps=12"), run_dir=run)
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'last.pt'} {reported}" in err and "resumed from step 4" in err, err
    assert (run / "ckpt-00000008.pt.corrupt").exists()  # kept for inspection, never read again
    assert without_timing(read_metrics(run / "metrics.jsonl")) == without_timing(
        read_metrics(tmp_path / "straight" / "metrics.jsonl")
    )
    assert resumed["test/bpc"] == straight["test/bpc"]


def test_checkpoint_digest_covers_every_tensor_and_loads_without_pickle(corpus, data_dir, tmp_path):
    train(tiny_config(corpus, data_dir, "trainer.max_steps=2"), run_dir=tmp_path)
    payload = checkpoint.load_file(tmp_path / "last.pt")  # torch.load(weights_only=True) + digest check
    assert payload["digest"] == checkpoint.content_digest(payload)
    payload["optimizer"]["state"][0]["exp_avg"].view(-1)[0] += 1e-6  # one optimizer moment, slightly off
    assert payload["digest"] != checkpoint.content_digest(payload)


def test_every_checkpoint_corrupted_is_one_clear_error_not_a_silent_fresh_start(corpus, data_dir, tmp_path):
    train(tiny_config(corpus, data_dir, "trainer.max_steps=2"), run_dir=tmp_path)
    for path in tmp_path.glob("*.pt"):
        path.write_bytes(b"not a checkpoint")
    for _ in range(2):  # the second time the corrupted files are already set aside: still an error
        with pytest.raises(UserError, match="every checkpoint file is corrupted"):
            train(tiny_config(corpus, data_dir, "trainer.max_steps=4"), run_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- divergence guards
DIVERGING = ["optim=adam", "optim.lr=1e30", "optim.grad_clip=null"]  # Adam's first step moves weights by ~1e30


def test_a_real_nan_is_skipped_counted_and_logged(corpus, data_dir, tmp_path, capsys):
    train(
        tiny_config(corpus, data_dir, *DIVERGING, "trainer.max_steps=6", "trainer.max_nonfinite_in_row=100"),
        run_dir=tmp_path,
    )
    train_records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/nonfinite_steps" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]  # logged even when every step is skipped
    assert [r["train/nonfinite_steps"] for r in train_records] == [0, 1, 2, 3, 4, 5]
    assert "train/bpc" in train_records[0] and not any("train/bpc" in r for r in train_records[1:])
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert payload["nonfinite_total"] == 5
    assert int(payload["optimizer"]["state"][0]["step"]) == 1  # the optimizer stepped once: the rest were skipped
    err = capsys.readouterr().err
    assert err.count("non-finite loss") == 1 and "step 2" in err  # told once per streak, not once per step


def test_divergence_reload_goes_back_with_a_lower_learning_rate_and_recovers(corpus, data_dir, tmp_path, capsys):
    result = train(
        tiny_config(
            corpus,
            data_dir,
            *DIVERGING,
            "trainer.max_steps=8",
            "trainer.max_nonfinite_in_row=3",
            "trainer.on_divergence=reload",
            "trainer.divergence_lr_factor=1e-33",
        ),
        run_dir=tmp_path,
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    (event,) = [r for r in records if r.get("event") == "divergence_reload"]
    assert event["step"] == 0 and event["train/lr"] == pytest.approx(1e-3)  # 1e30 x 1e-33
    assert event["train/nonfinite_steps"] == 3 and event["train/divergence_reloads"] == 1
    train_records = [r for r in records if "train/bpc" in r]
    assert [r["step"] for r in train_records] == list(range(1, 9))  # one record per step: no duplicates
    assert all(r["train/lr"] == pytest.approx(1e-3) for r in train_records)
    rewound = read_metrics(tmp_path / "metrics.rewound.jsonl")  # the abandoned trajectory, kept aside
    assert [r["step"] for r in rewound] == [1, 2, 3] and rewound[0]["train/lr"] == 1e30
    assert result["test/bpc"] < 8  # finite and learning-sized: the run recovered
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert payload["lr_scale"] == pytest.approx(1e-33) and payload["divergence_reloads"] == 1
    assert "reloaded the checkpoint of step 0" in capsys.readouterr().err


def test_divergence_stops_with_one_line_after_the_allowed_reloads(corpus, data_dir, tmp_path):
    cfg = tiny_config(
        corpus,
        data_dir,
        *DIVERGING,
        "trainer.max_steps=8",
        "trainer.max_nonfinite_in_row=2",
        "trainer.on_divergence=reload",
        "trainer.max_divergence_reloads=2",
    )  # lr halves: still 2.5e29
    with pytest.raises(UserError, match=r"after 2 reload\(s\) with a lower learning rate"):
        train(cfg, run_dir=tmp_path)
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event")]
    assert [e["train/lr"] for e in events] == [5e29, 2.5e29]


@pytest.mark.slow
def test_divergence_with_on_divergence_stop_exits_2_with_one_line(corpus, data_dir, tmp_path):
    result = train_cli(
        tiny_args(
            corpus,
            data_dir,
            *DIVERGING,
            "trainer.max_steps=8",
            "trainer.max_nonfinite_in_row=3",
            f"hydra.run.dir={tmp_path}",
        )
    )
    assert_one_line_error(result, "training diverged", "3 non-finite", "optim.lr", "on_divergence=reload")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]  # nothing written is lost


# ------------------------------------------------------------------------------------------------ resume and W&B
def test_a_resumed_run_continues_the_same_wandb_run(corpus, data_dir, tmp_path):
    wandb = ["logger=wandb", "logger.mode=offline", "trainer.checkpoint_every=2"]
    train(tiny_config(corpus, data_dir, *wandb, "trainer.max_steps=2"), run_dir=tmp_path)
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    train(tiny_config(corpus, data_dir, *wandb, "trainer.max_steps=4"), run_dir=tmp_path)  # resumes at step 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/bpc" in r] == [1, 2, 3, 4]
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == run_id
    # W&B names a run directory offline-run-<second>-<id>, with "-1" added when both starts fall in the same
    # second; the run file inside names the id either way.
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and all([f.name for f in d.glob("run-*.wandb")] == [f"run-{run_id}.wandb"] for d in runs), [
        (d.name, [f.name for f in d.iterdir()]) for d in runs
    ]  # one W&B run, resumed


def test_a_fresh_run_never_overwrites_earlier_metrics(tmp_path):
    for text in ("first\n", "second\n"):
        (tmp_path / "metrics.jsonl").write_text(text)
        JsonlSink(tmp_path).close()
    assert (tmp_path / "metrics.jsonl.old").read_text() == "first\n"
    assert (tmp_path / "metrics.jsonl.old1").read_text() == "second\n"


@pytest.mark.slow
def test_wandb_online_with_an_unreachable_server_keeps_training(corpus, data_dir, tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
        "WANDB_API_KEY": "a" * 40,
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }
    run = tmp_path / "run"
    result = train_cli(
        tiny_args(
            corpus,
            data_dir,
            "logger=wandb",
            "logger.mode=online",
            "logger.init_timeout=5",
            "trainer.max_steps=4",
            f"hydra.run.dir={run}",
        ),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "W&B" in warnings[0] and "offline" in warnings[0], result.stderr
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/bpc" in r]
    assert steps == [1, 2, 3, 4]
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}"))  # W&B's files exist, ready for `wandb sync`


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.slow
def test_make_train_with_a_missing_data_path_says_one_line(tmp_path):
    if shutil.which("make") is None or not (REPO_ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("needs make and the project's .venv (make setup)")
    result = subprocess.run(
        ["make", "-s", "train", f"ARGS=dataset=file dataset.path=/nonexistent hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    # make adds its own "make: *** ..." line ("make[1]: ..." when the tests themselves run under make test)
    ours = [line for line in result.stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", line)]
    assert ours == ["error: dataset.path /nonexistent does not exist; point dataset.path at a text file"], result.stderr


def _missing(tmp):
    return tmp / "nonexistent.txt"


def _empty(tmp):
    (tmp / "empty.txt").write_bytes(b"")
    return tmp / "empty.txt"


def _directory(tmp):
    (tmp / "a_dir").mkdir()
    return tmp / "a_dir"


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_path, fragments",
    [
        (_missing, ["does not exist", "point dataset.path at a text file"]),
        (_empty, ["is empty", "point dataset.path at a file with text"]),
        (_directory, ["is a directory", "point dataset.path at a single text file"]),
    ],
    ids=["missing", "empty", "directory"],
)
def test_bad_data_path_is_one_line(tmp_path, make_path, fragments):
    path = make_path(tmp_path)
    result = train_cli(
        [
            "dataset=file",
            f"dataset.path={path}",
            f"data_dir={tmp_path / 'data'}",
            *TINY,
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert_one_line_error(result, str(path), *fragments)


@pytest.mark.slow
def test_dataset_path_not_given_is_one_line(tmp_path):
    result = train_cli(["dataset=file", *TINY, f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(result, "dataset.path is required", "dataset.path=")


@pytest.mark.slow
def test_unreadable_data_path_is_one_line(corpus, tmp_path):
    if not can_drop_file_permission_override():
        pytest.skip("running as root without the right to drop CAP_DAC_OVERRIDE: every file is readable")
    path = tmp_path / "secret.txt"
    path.write_bytes(corpus.read_bytes())
    path.chmod(0)
    result = train_cli(
        [
            "dataset=file",
            f"dataset.path={path}",
            f"data_dir={tmp_path / 'data'}",
            *TINY,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        preexec_fn=without_file_permission_override(),
    )
    assert_one_line_error(result, str(path), "Permission denied", "fix its permissions")


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (
            ["trainer.batch_size=2000", "trainer.seq_len=100"],
            ["'train' has", "fewer than batch_size*(seq_len+1)", "smaller trainer.batch_size"],
        ),
        (["trainer.seq_len=500000"], ["'train' has", "smaller trainer.batch_size / trainer.seq_len"]),
        (["trainer.eval_chars=100"], ["valid evaluation", "trainer.eval_chars=100", "larger trainer.eval_chars"]),
    ],
    ids=["batch-larger-than-data", "sequence-larger-than-data", "eval-smaller-than-one-batch"],
)
def test_batch_or_sequence_larger_than_the_data_is_one_line(corpus, data_dir, tmp_path, overrides, fragments):
    result = train_cli(tiny_args(corpus, data_dir, *overrides, f"hydra.run.dir={tmp_path}"))
    assert_one_line_error(result, *fragments)


@pytest.mark.slow
def test_corpus_smaller_than_one_batch_is_one_line(corpus, tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(corpus.read_bytes()[:1000])  # 900 training characters < 16 streams x 101 characters
    result = train_cli(
        [
            "dataset=file",
            f"dataset.path={small}",
            f"data_dir={tmp_path / 'data'}",
            *TINY,
            "trainer.batch_size=16",
            "trainer.seq_len=100",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert_one_line_error(result, "'train' has 900 characters", "bigger file")


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, fragments",
    [
        ("cell=nope", ["unknown cell 'nope'", "lstm, mlstm"]),
        ("cell.form=nope", ["cell.form='nope' must be one of paper, matlab, seed"]),
        ("dataset=nope", ["unknown dataset 'nope'", "enwik8"]),
        ("dataset.name=nope", ["dataset.name='nope' must be one of", "file"]),
        ("trainer.on_divergence=maybe", ["trainer.on_divergence='maybe'", "stop, reload"]),
    ],
    ids=["cell", "form", "dataset-group", "dataset-name", "on-divergence"],
)
def test_unknown_names_are_one_line(corpus, data_dir, tmp_path, override, fragments):
    result = train_cli(tiny_args(corpus, data_dir, override, f"hydra.run.dir={tmp_path}"))
    assert_one_line_error(result, *fragments)


@pytest.mark.slow
def test_conflicting_hydra_flags_are_one_line(tmp_path):
    result = train_cli(["--multirun", "--cfg", "job", f"hydra.sweep.dir={tmp_path}"])
    assert_one_line_error(result, "Only one of --run, --multirun, --cfg")


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, fragments",
    [
        ("cell.hidden_size=0", ["cell.hidden_size=0 must be a positive integer"]),
        ("optim.lr=-0.001", ["optim.lr=-0.001 must be a positive number"]),
        ("trainer.batch_size=0", ["trainer.batch_size=0 must be a positive integer"]),
        ("trainer.divergence_lr_factor=1.5", ["trainer.divergence_lr_factor=1.5", "(0, 1)"]),
    ],
    ids=["hidden-0", "lr-negative", "batch-0", "lr-factor"],
)
def test_invalid_numbers_are_one_line_before_any_data_is_read(tmp_path, override, fragments):
    missing = tmp_path / "not_read.txt"  # never opened: numbers are checked before the data
    result = train_cli(["dataset=file", f"dataset.path={missing}", *TINY, override, f"hydra.run.dir={tmp_path}"])
    assert_one_line_error(result, *fragments)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, fragments",
    [
        (
            "cell.hidden_sizee=3",
            ["unknown config key 'cell.hidden_sizee'", "did you mean cell.hidden_size?", "spelling"],
        ),
        ("trainer.batch_size=[", ["cannot parse the override 'trainer.batch_size=['", "key=value"]),
        ("trainer.max_steps=${nope}", ["Interpolation key 'nope' not found", "overrides"]),
    ],
    ids=["unknown-key", "unparsable", "bad-interpolation"],
)
def test_hydra_config_errors_are_one_line(corpus, data_dir, tmp_path, override, fragments):
    result = train_cli(tiny_args(corpus, data_dir, override, f"hydra.run.dir={tmp_path}"))
    assert_one_line_error(result, *fragments)


@pytest.mark.slow
def test_output_directory_under_a_file_is_one_line(corpus, data_dir, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    run = tmp_path / "a_file" / "run"
    result = train_cli(tiny_args(corpus, data_dir, f"hydra.run.dir={run}"))
    assert_one_line_error(result, "cannot write the run directory", "Not a directory", "hydra.run.dir")


@pytest.mark.slow
def test_read_only_output_directory_is_one_line(corpus, data_dir, tmp_path):
    if not can_drop_file_permission_override():
        pytest.skip("running as root without the right to drop CAP_DAC_OVERRIDE: every directory is writable")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = train_cli(
            tiny_args(corpus, data_dir, f"hydra.run.dir={locked / 'run'}"),
            preexec_fn=without_file_permission_override(),
        )
    finally:
        locked.chmod(0o755)
    assert_one_line_error(result, "cannot write the run directory", "Permission denied", "writable path")


def test_the_trainer_itself_refuses_an_unwritable_run_dir(corpus, data_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="not writable.*hydra.run.dir"):
        train(tiny_config(corpus, data_dir), run_dir=tmp_path / "a_file" / "run")


@pytest.mark.slow
def test_resuming_with_an_incompatible_config_is_one_line_and_touches_nothing(corpus, data_dir, tmp_path):
    train(tiny_config(corpus, data_dir, "trainer.max_steps=2"), run_dir=tmp_path)  # the run already there
    args = tiny_args(corpus, data_dir, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}")
    kept = ["metrics.jsonl", "config.yaml", "last.pt", "ckpt-00000002.pt"]
    before = {name: (tmp_path / name).read_bytes() for name in kept}
    for override, fragments in [
        ("cell.hidden_size=48", ["cannot resume", "cell.hidden_size is 32 in the checkpoint, 48 now", "hydra.run.dir"]),
        ("trainer.batch_size=16", ["trainer.batch_size is 8 in the checkpoint, 16 now"]),
        ("trainer.resume=false", ["trainer.resume=false", "already holds checkpoints", "new hydra.run.dir"]),
    ]:
        assert_one_line_error(train_cli([*args, override]), *fragments)
        assert {name: (tmp_path / name).read_bytes() for name in kept} == before, override


@pytest.mark.slow
def test_resuming_on_another_corpus_is_one_line(corpus, data_dir, tmp_path):
    train(tiny_config(corpus, data_dir, "trainer.max_steps=2"), run_dir=tmp_path / "run")
    args = tiny_args(corpus, data_dir, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}")
    other = tmp_path / "other.xml"
    other.write_bytes(corpus.read_bytes() + corpus.read_bytes()[:50_000])  # same vocabulary, other splits
    result = train_cli([*args, f"dataset.path={other}"])
    assert_one_line_error(result, "cannot resume", "splits of", "another hydra.run.dir")


# ------------------------------------------------------------------------------------------ downloads (text8-like)
@pytest.fixture(scope="module")
def archive(text8_sample, tmp_path_factory) -> dict:
    """A real text8.zip holding the first 20,000 characters of text8, and the dataset overrides that describe it."""
    text = text8_sample.read_bytes()[:20_000]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("text8", text)
    folder = tmp_path_factory.mktemp("mirror")
    (folder / "text8.zip").write_bytes(buffer.getvalue())
    overrides = [
        "dataset=text8",
        "dataset.num_bytes=20000",
        "dataset.split_sizes=[18000,1000,1000]",
        f"dataset.checksum={hashlib.sha1(text).hexdigest()}",
    ]
    return {"path": folder / "text8.zip", "bytes": buffer.getvalue(), "overrides": overrides}


@pytest.mark.slow
def test_checksum_mismatch_sets_the_archive_aside_and_uses_nothing(archive, tmp_path):
    data = tmp_path / "data"
    overrides = [o for o in archive["overrides"] if not o.startswith("dataset.checksum=")]
    result = train_cli(
        [
            *overrides,
            f"dataset.url=file://{archive['path']}",
            "dataset.checksum=" + "0" * 40,
            f"data_dir={data}",
            *TINY,
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert_one_line_error(result, "sha1 checksum mismatch", "moved it aside", "text8.zip.bad", "dataset.checksum")
    assert (data / "text8.zip.bad").read_bytes() == archive["bytes"]  # kept for inspection
    assert not (data / "text8.zip").exists() and not (data / "cache").exists()  # and not used


class _Mirror(http.server.BaseHTTPRequestHandler):
    """/good/text8.zip: the archive; /cut/text8.zip: the same headers, but the connection drops halfway."""

    payload = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        cut = self.path.startswith("/cut/")
        self.wfile.write(self.payload[: len(self.payload) // 2] if cut else self.payload)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture()
def mirror(archive):
    handler = type("Mirror", (_Mirror,), {"payload": archive["bytes"]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_an_interrupted_download_is_one_line_and_restarts_cleanly(archive, mirror, tmp_path):
    data = tmp_path / "data"
    common = [*archive["overrides"], f"data_dir={data}", *TINY, "trainer.max_steps=2"]
    cut = train_cli([*common, f"dataset.url={mirror}/cut/text8.zip", f"hydra.run.dir={tmp_path / 'cut'}"])
    assert_one_line_error(cut, "interrupted after", f"of {len(archive['bytes']):,} bytes", "run the same command again")
    assert not (data / "text8.zip").exists() and not (data / "text8.zip.part").exists()

    (data / "text8.zip.part").write_bytes(b"left behind by a download killed with SIGKILL")
    good = train_cli([*common, f"dataset.url={mirror}/good/text8.zip", f"hydra.run.dir={tmp_path / 'good'}"])
    assert good.returncode == 0, good.stderr
    assert (data / "text8.zip").read_bytes() == archive["bytes"] and not (data / "text8.zip.part").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "good" / "metrics.jsonl") if "train/bpc" in r] == [1, 2]
