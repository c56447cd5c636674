"""Shared fixtures: the real enwik8/text8 samples that live beside the checkout (never copied into the repository)."""

from pathlib import Path

import pytest

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
