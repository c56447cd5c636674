"""The reference levels a model's bits per character are read against, computed from the text itself:

- the unigram entropy of the training split: what a model that learnt only the character frequencies reads on that
  split, and what the same model reads on the valid split (a model at this level has learnt no context: the posted
  seed cell's failure mode);
- `xz -9e` on the whole sample: what a general-purpose compressor reads, the level a model should beat. Computed
  with the standard library's lzma (preset 9 | PRESET_EXTREME, the .xz container), byte for byte the stream that
  single-threaded `xz -9e` writes.
"""

from __future__ import annotations

import lzma
import math
from pathlib import Path

import numpy as np

from mlstm.studies.analysis import DEFAULT_SPLIT_FRACTIONS


def unigram_entropy_of_file(path: Path, train_bytes: int | None) -> float:
    """Entropy (bits) of the byte frequencies of the training part of a corpus file: the bpc of a unigram model."""
    data = np.fromfile(path, dtype=np.uint8, count=-1 if train_bytes is None else train_bytes)
    p = np.bincount(data, minlength=256) / max(data.size, 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def corpus_splits(config: dict) -> tuple[Path | None, list[int] | None]:
    """The dataset's source file and its (train, valid, test) sizes in bytes, when the config says where it is and
    how it is split: dataset=file rounds its fractions as mlstm.data.corpus does, the archives give their sizes."""
    dataset = config.get("dataset", {})
    if dataset.get("name") == "file" and dataset.get("path"):
        path = Path(str(dataset["path"])).expanduser()
        if path.is_file():
            fractions = dataset.get("split_fractions") or DEFAULT_SPLIT_FRACTIONS
            n = path.stat().st_size
            train, valid = round(n * fractions[0]), round(n * fractions[1])
            return path, [train, valid, n - train - valid]
    member = dataset.get("archive_member")
    if member and config.get("data_dir"):
        path = Path(str(config["data_dir"])).expanduser() / member
        if path.is_file():
            sizes = dataset.get("split_sizes")
            return path, [int(size) for size in sizes] if sizes else None
    return None, None


def corpus_file(config: dict) -> tuple[Path | None, int | None]:
    """The dataset's source file and the size of its training split, when the config says where it is."""
    path, sizes = corpus_splits(config)
    return path, sizes[0] if sizes else None


def unigram_valid_bpc(path: Path, sizes: list[int]) -> float:
    """Bits per character on the valid split of a model that knows only the training split's byte frequencies
    (add-1/2 estimates over the 256 byte values, so that a byte unseen in training costs bits, not infinity)."""
    train, valid = sizes[0], sizes[1]
    data = np.fromfile(path, dtype=np.uint8, count=train + valid)
    counts = np.bincount(data[:train], minlength=256) + 0.5
    p = counts / counts.sum()
    return float(-np.log2(p[data[train : train + valid]]).mean())


def xz_bits_per_char(path: str | Path) -> float:
    """Bits per character of the file compressed as `xz -9e` does (preset 9, extreme, .xz container)."""
    data = Path(path).read_bytes()
    if not data:
        return math.nan
    return 8 * len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)) / len(data)
