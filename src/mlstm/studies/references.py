"""The reference levels a model's bits per character are read against, computed from the text itself:

- the unigram entropy of the training split: what a model that learnt only the character frequencies reads (a
  model at this level has not learnt from context: the posted seed cell's failure mode);
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


def corpus_file(config: dict) -> tuple[Path | None, int | None]:
    """The dataset's source file and the size of its training split, when the config says where it is."""
    dataset = config.get("dataset", {})
    if dataset.get("name") == "file" and dataset.get("path"):
        path = Path(str(dataset["path"])).expanduser()
        if path.is_file():
            fraction = (dataset.get("split_fractions") or DEFAULT_SPLIT_FRACTIONS)[0]
            return path, int(path.stat().st_size * fraction)
    member = dataset.get("archive_member")
    if member and config.get("data_dir"):
        path = Path(str(config["data_dir"])).expanduser() / member
        if path.is_file():
            sizes = dataset.get("split_sizes")
            return path, int(sizes[0]) if sizes else None
    return None, None


def xz_bits_per_char(path: str | Path) -> float:
    """Bits per character of the file compressed as `xz -9e` does (preset 9, extreme, .xz container)."""
    data = Path(path).read_bytes()
    if not data:
        return math.nan
    return 8 * len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)) / len(data)
