"""The paper's recipe: the MATLAB RMSprop-norm optimizer, schedules, evaluation protocols of the presets, dynamic
evaluation and sampling (library and CLIs), on a tiny model trained briefly on the enwik8 sample."""

import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from mlstm.config import load_config
from mlstm.data import load_corpus
from mlstm.dynamic_eval import dynamic_evaluate
from mlstm.errors import UserError
from mlstm.sampling import sample
from mlstm.training.optim import RMSpropNorm, build_optimizer, linear_decay, norm_threshold
from mlstm.training.trained import load_model


# ------------------------------------------------------------------------------------------ optimizers and schedules
def random_params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((7, 5), (5,), (3, 4, 2))]
    return params, generator


def set_random_grads(params, generator, scale=1.0):
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * scale


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


@pytest.mark.parametrize("threshold", [10.0, 2.0])
@pytest.mark.parametrize("grad_scale", [1e-4, 1.0, 1e3])
def test_rmsprop_norm_update_has_exactly_the_threshold_norm(threshold, grad_scale):
    params, generator = random_params()
    optimizer = RMSpropNorm(params, threshold=threshold)
    expected = threshold
    for _ in range(3):
        set_random_grads(params, generator, grad_scale)
        before = flat(params)
        optimizer.step()
        assert torch.linalg.vector_norm(flat(params) - before).item() == pytest.approx(expected, rel=1e-5)
        expected *= 0.9999
        assert optimizer.threshold == pytest.approx(expected, rel=1e-12)


def test_rmsprop_norm_direction_is_the_rmsprop_normalised_gradient():
    params, generator = random_params()
    optimizer = RMSpropNorm(params, threshold=10.0, alpha=0.9, eps=1e-8)
    set_random_grads(params, generator)
    grads = [p.grad.clone() for p in params]
    before = flat(params)
    optimizer.step()
    u = torch.cat([(g / ((0.1 * g * g).sqrt() + 1e-8)).reshape(-1) for g in grads])
    torch.testing.assert_close(flat(params) - before, -10.0 * u / torch.linalg.vector_norm(u))


def test_rmsprop_norm_threshold_is_floored_and_a_zero_gradient_moves_nothing():
    params, generator = random_params()
    optimizer = RMSpropNorm(params, threshold=0.0101, threshold_decay=0.9, min_threshold=0.01)
    for p in params:
        p.grad = torch.zeros_like(p)
    before = flat(params)
    optimizer.step()
    optimizer.step()
    assert torch.equal(flat(params), before)
    assert optimizer.threshold == 0.01


def test_rmsprop_norm_resumes_exactly_from_its_state_dict():
    params, generator = random_params()
    optimizer = RMSpropNorm(params, threshold=10.0)
    for _ in range(3):
        set_random_grads(params, generator)
        optimizer.step()
    buffer = io.BytesIO()  # through a file, as a checkpoint: plain tensors and numbers (weights_only loads it)
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = RMSpropNorm(copies, threshold=10.0)
    resumed.load_state_dict(saved)
    assert resumed.threshold == optimizer.threshold and resumed.param_groups[0]["step"] == 3
    for _ in range(2):
        set_random_grads(params, generator)
        for p, c in zip(params, copies):
            c.grad = p.grad.clone()
        optimizer.step()
        resumed.step()
    assert torch.equal(flat(params), flat(copies))
    assert resumed.threshold == optimizer.threshold


def test_schedule_values_at_chosen_steps():
    # Chainer: Adam 1e-3 -> 7e-5 linearly over 108,000 iterations, then held
    for step, lr in [(0, 1e-3), (54_000, 5.35e-4), (108_000, 7e-5), (200_000, 7e-5)]:
        assert linear_decay(step, 1e-3, 7e-5, 108_000) == pytest.approx(lr, rel=1e-9)
    optimizer, scheduler = build_optimizer(load_config().optim, [torch.nn.Parameter(torch.zeros(1))])
    assert scheduler.lr_lambdas[0](54_000) * 1e-3 == pytest.approx(5.35e-4)
    # MATLAB: norm threshold 10 (mLSTM) / 2 (LSTM), x 0.9999 per step, floor 0.01 (from 10: reached at step 69,075)
    for step, value in [
        (0, 10.0),
        (1, 9.999),
        (10_000, 10 * 0.9999**10_000),
        (69_074, 10 * 0.9999**69_074),
        (69_075, 0.01),
        (100_000, 0.01),
    ]:
        assert norm_threshold(step, 10.0) == pytest.approx(value, rel=1e-12)
    assert norm_threshold(10_000, 2.0) == pytest.approx(0.7357, abs=1e-4)
    # the optimizer's own per-step multiplication follows the closed form
    params, generator = random_params()
    optimizer = RMSpropNorm(params, threshold=2.0)
    for _ in range(1000):
        set_random_grads(params, generator)
        optimizer.step()
    assert optimizer.threshold == pytest.approx(norm_threshold(1000, 2.0), rel=1e-9)


@pytest.mark.parametrize("experiment, threshold", [("paper_hutter_mlstm", 10.0), ("paper_hutter_lstm", 2.0)])
def test_matlab_presets_use_rmsprop_norm(experiment, threshold):
    cfg = load_config([f"+experiment={experiment}"])
    assert cfg.optim.name == "rmsprop_norm" and cfg.optim.grad_clip is None
    optimizer, _ = build_optimizer(cfg.optim, [torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(optimizer, RMSpropNorm) and optimizer.threshold == threshold
    assert (cfg.trainer.batch_size, cfg.trainer.seq_len) == (100, 100)  # 100 streams x segments of 100


@pytest.mark.parametrize(
    "overrides, eval_chars",
    [
        ([], 500_000),  # the default = the Chainer protocol: valid on its first 500k characters, test on all of it
        (["+experiment=paper_hutter_large"], 500_000),
        (["+experiment=paper_text8_large"], 500_000),
        (["+experiment=paper_hutter_mlstm"], None),  # MATLAB runs: the whole valid split
        (["+experiment=paper_hutter_lstm"], None),
    ],
)
def test_evaluation_protocol_of_each_preset(overrides, eval_chars):
    cfg = load_config(overrides)
    assert cfg.trainer.eval_chars == eval_chars
    assert cfg.trainer.test_chars is None  # every reported number: the whole test split (last 5M characters)


@pytest.mark.parametrize("config_name", ["sample", "dynamic_eval"])
def test_cli_configs_compose(config_name):
    cfg = load_config(["checkpoint=x.pt"], config_name=config_name)
    assert cfg.checkpoint == "x.pt" and cfg.device == "auto"
    if config_name == "dynamic_eval":  # the MATLAB dynamic-evaluation recipe by default
        assert (cfg.seq_len, cfg.lr, cfg.rms_decay, cfg.decay_to_init, cfg.split) == (50, 2e-4, 0.99, 0.01, "test")
        assert cfg.get("dataset") is None and cfg.max_chars is None and cfg.batch_size == 1
        assert load_config(["checkpoint=x.pt", "dataset=text8"], config_name=config_name).dataset.name == "text8"


# ------------------------------------------------------------------------ a tiny model trained on the enwik8 sample
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the test machines are shared, and OpenMP threads competing for busy cores crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    """The session's tiny trained model (tests/conftest.py): 150 steps of a 64-unit mLSTM on the first 80% of the
    sample; the last 10% (later text) is the test split."""
    return trained_checkpoint


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dynamic_evaluation_beats_static_on_later_text_and_leaves_the_checkpoint_alone(trained):
    digest = sha256(trained)
    model, payload = load_model(trained)
    trained_cfg = OmegaConf.create(payload["config"])
    corpus = load_corpus(trained_cfg.dataset, trained_cfg.data_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = dynamic_evaluate(model, corpus.test, max_chars=10_000)  # the paper's settings: 50 / 2e-4 / 0.99 / 0.01
    print(f"static {result['static_bpc']:.4f}  dynamic {result['dynamic_bpc']:.4f}")
    assert result["chars"] == 199 * 50  # 199 segments of 50 from 10,000 characters
    assert math.isfinite(result["static_bpc"]) and result["static_bpc"] < 5.07  # learned more than byte frequencies
    assert result["dynamic_bpc"] < result["static_bpc"] - 0.01
    assert sha256(trained) == digest  # the file is only read
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored in memory
    assert not model.training


def test_dynamic_evaluation_with_no_step_is_static_evaluation(trained):
    model, payload = load_model(trained)
    trained_cfg = OmegaConf.create(payload["config"])
    tokens = load_corpus(trained_cfg.dataset, trained_cfg.data_dir).test
    result = dynamic_evaluate(model, tokens, max_chars=2_000, lr=0.0, decay_to_init=0.0, batch_size=2)
    assert result["dynamic_bpc"] == pytest.approx(result["static_bpc"], rel=1e-6)


def test_sampling_is_deterministic_under_a_seed_and_stays_in_the_vocabulary(trained):
    model, payload = load_model(trained)
    symbols = bytes(payload["symbols"].tolist())
    first = sample(model, payload["symbols"], b"<page>\n    <title>", length=200, temperature=0.8, seed=0)
    assert len(first) == 200
    assert first == sample(model, payload["symbols"], b"<page>\n    <title>", length=200, temperature=0.8, seed=0)
    assert first != sample(model, payload["symbols"], b"<page>\n    <title>", length=200, temperature=0.8, seed=1)
    assert set(first) <= set(symbols)
    greedy = [sample(model, symbols, b"the ", length=50, temperature=0, seed=s) for s in (0, 1)]
    assert greedy[0] == greedy[1]
    assert len(sample(model, symbols, b"", length=10, seed=0)) == 10


def test_a_prompt_outside_the_vocabulary_is_one_line(trained):
    model, payload = load_model(trained)
    unseen = next(b for b in range(256) if b not in set(payload["symbols"].tolist()))
    with pytest.raises(UserError, match=r"outside the model's \d+-symbol vocabulary") as error:
        sample(model, payload["symbols"], b"ok" + bytes([unseen]), length=5)
    assert "\n" not in str(error.value)


# -------------------------------------------------------------------------------------------------------- the CLIs
def run_cli(module, *args, cwd):
    """Run a CLI; stdout is kept as bytes (generated text need not be valid UTF-8), stderr decoded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, cwd=cwd, env=env, timeout=120)
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    return proc


@pytest.mark.slow
def test_dynamic_eval_cli_reports_both_numbers_and_writes_json(trained, tmp_path):
    digest = sha256(trained)
    out = tmp_path / "result.json"
    proc = run_cli(
        "mlstm.cli.dynamic_eval",
        f"checkpoint={trained}",
        "max_chars=3000",
        "progress=false",
        f"output={out}",
        "threads=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.decode().strip().splitlines()[-1]
    match = re.fullmatch(r"static bpc: (\d+\.\d{4})  dynamic bpc: (\d+\.\d{4})", last)
    assert match, last
    record = json.loads(out.read_text())
    assert record["static_bpc"] == pytest.approx(float(match[1]), abs=1e-4)
    assert record["dynamic_bpc"] == pytest.approx(float(match[2]), abs=1e-4)
    assert (record["split"], record["seq_len"], record["lr"], record["checkpoint_step"]) == ("test", 50, 2e-4, 150)
    assert sha256(trained) == digest
    assert not (tmp_path / "data_cache").exists()  # used the checkpoint's own data_dir


@pytest.mark.slow
def test_sample_cli_prints_the_prompt_and_its_continuation(trained, tmp_path):
    proc = run_cli(
        "mlstm.cli.sample",
        f"checkpoint={trained}",
        "prompt='<title>'",
        "length=60",
        "temperature=0.8",
        "seed=0",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"<title>") and proc.stdout.endswith(b"\n")
    assert len(proc.stdout) == len(b"<title>") + 60 + 1


@pytest.mark.slow
def test_missing_checkpoint_is_one_line_error(tmp_path):
    proc = run_cli("mlstm.cli.sample", f"checkpoint={tmp_path / 'nope.pt'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: checkpoint {tmp_path / 'nope.pt'} does not exist"


@pytest.mark.parametrize("experiment", ["paper_hutter_large", "paper_hutter_mlstm"])
def test_experiment_is_chosen_with_or_without_a_plus(experiment):
    """`experiment=X` (an optional entry of train.yaml's defaults list) and the older `+experiment=X` compose the
    same config; without either the default stays the default."""
    plain, plus = load_config([f"experiment={experiment}"]), load_config([f"+experiment={experiment}"])
    assert plain == plus
    assert (
        plain != load_config([])
        and plain.cell.hidden_size == {"paper_hutter_large": 2800, "paper_hutter_mlstm": 1900}[experiment]
    )
    assert load_config([f"experiment={experiment}", "cell.hidden_size=64"]).cell.hidden_size == 64
