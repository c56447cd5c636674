"""Shared fixtures: the real enwik8/text8 samples that live beside the checkout (never copied into the repository)."""

import os
from pathlib import Path

import pytest

# OpenMP threads that wait for work sleep instead of spinning (read when the OpenMP runtime starts, so before any test
# module imports torch; subprocesses inherit it). The few tests that run two intra-op threads share two cores with
# the other test worker and whatever else runs: spinning, a 2-thread test of the fast mLSTM took 16 s on a busy
# machine, sleeping 0.7 s. It changes how threads wait, never what they compute.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()
SKIP_REASON = "../shared/data not found: real-text tests need the enwik8/text8 samples beside the checkout"


def shared_data_dir() -> Path:
    """`<repo root>/../shared/data`, or skip the calling test when it is absent (e.g. on a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(SKIP_REASON)
    return SHARED_DATA


def _sample(name: str) -> Path:
    path = shared_data_dir() / name
    if not path.is_file():
        pytest.skip(f"{path} not found: real-text tests need the enwik8/text8 samples beside the checkout")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def enwik8_sample() -> Path:
    """The first 3,000,000 bytes of enwik8."""
    return _sample("enwik8_head3M.xml")


@pytest.fixture(scope="session")
def enwik8_head200k(enwik8_sample, tmp_path_factory) -> Path:
    """The first 200,000 bytes of the enwik8 sample: real text, small enough to cache in milliseconds."""
    path = tmp_path_factory.mktemp("corpus") / "enwik8_head200k.xml"
    path.write_bytes(enwik8_sample.read_bytes()[:200_000])
    return path


@pytest.fixture(scope="session")
def text8_sample() -> Path:
    """The first 2,000,000 characters of text8."""
    return _sample("text8_head2M.txt")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread in the test process unless a test asks for more (those that test threading set it
    themselves): the test machines are shared, and OpenMP threads competing for busy cores crawl (a stateful
    evaluation of 8,000 characters took 14 s at 2 threads on a loaded 2-core machine, 1 s at one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One token cache (`data_dir=`) for every test that does not test the cache itself: each corpus is encoded once
    per session, not once per test or module."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def trained_checkpoint(enwik8_sample, data_cache, tmp_path_factory) -> Path:
    """last.pt of a tiny model trained once per session, for the tests that only read a trained model (evaluation,
    sampling, dynamic evaluation, the checkpoint CLIs): 150 steps of a 64-unit paper-form mLSTM, 16 x 50 characters,
    on the first 80% of the enwik8 sample (the last 10%, later text, is the test split). Its weights predict text:
    validation well below the sample's 5.07-bit unigram entropy."""
    from mlstm.config import load_config
    from mlstm.training.trainer import train

    run_dir = tmp_path_factory.mktemp("trained")
    cfg = load_config(
        [
            "dataset=file",
            f"dataset.path={enwik8_sample}",
            "dataset.split_fractions=[0.8,0.1,0.1]",
            f"data_dir={data_cache}",
            "logger=none",
            "trainer=cpu",
            "cell.hidden_size=64",
            "trainer.batch_size=16",
            "trainer.seq_len=50",
            "trainer.max_steps=150",
            "trainer.eval_every=null",
            "trainer.eval_chars=2000",
            "trainer.test_at_end=false",
            "trainer.progress=false",
            "optim.lr=3e-3",
            "optim.schedule=constant",
        ]
    )
    train(cfg, run_dir=run_dir)
    return run_dir / "last.pt"
