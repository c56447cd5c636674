"""Character-level corpora: raw bytes on disk become uint8 token ids in train/valid/test memmaps, built once.

A model here reads bytes, and its vocabulary is the set of byte values present in the source (205 for enwik8, 27 for
text8), as in the paper. Building means reading the source once, mapping each byte to its rank among the present
values and writing the three splits to `<data_dir>/cache/<key>/`. The key hashes the identity of the source (file
path+size+mtime, archive checksum, Hugging Face coordinates, and the split rule), so a changed source or split gets a
fresh cache while an unchanged one loads in milliseconds: loading only opens memmaps.

Sources (`dataset.name`):
    enwik8, text8   Mahoney's zip archives, downloaded once into data_dir (or placed there by hand), verified
    file            any local file, split by `split_fractions`
    hf              a Hugging Face dataset's text column, joined with newlines and encoded as UTF-8
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlstm.data.download import fetch_corpus_bytes
from mlstm.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
CACHE_FORMAT = 1  # bump when the cache layout changes, so old caches are rebuilt instead of misread
DEFAULT_SPLIT_FRACTIONS = (0.9, 0.05, 0.05)

# The published facts about the two standard corpora (PAPER.md, section 4). configs/dataset/<name>.yaml may override
# any of them, e.g. to point `url` at a mirror.
DOWNLOADS: dict[str, dict[str, Any]] = {
    "enwik8": {
        "url": "http://mattmahoney.net/dc/enwik8.zip",
        "archive_member": "enwik8",
        "checksum_algo": "md5",
        "checksum": "a1fa5ffddb56f4953e226637dabbb36a",
        "num_bytes": 100_000_000,
        "split_sizes": [90_000_000, 5_000_000, 5_000_000],
    },
    "text8": {
        "url": "http://mattmahoney.net/dc/text8.zip",
        "archive_member": "text8",
        "checksum_algo": "sha1",
        "checksum": "0dc3edebc970dcc96137e7deda4d9995af9d93de",
        "num_bytes": 100_000_000,
        "split_sizes": [90_000_000, 5_000_000, 5_000_000],
    },
}


@dataclass(eq=False)  # identity equality: comparing memmaps element-wise is never what a caller means
class Corpus:
    """A byte-level corpus: the vocabulary and the three splits as token-id arrays (read-only memmaps)."""

    name: str  # "enwik8", "text8", "file:<stem>", "hf:<name>"
    symbols: bytes  # sorted byte values present in the whole source; token id i <-> byte symbols[i]
    train: np.ndarray = field(repr=False)  # uint8 token ids
    valid: np.ndarray = field(repr=False)
    test: np.ndarray = field(repr=False)
    _byte_to_id: np.ndarray = field(init=False, repr=False)  # (256,) int16, -1 for bytes outside the vocabulary

    def __post_init__(self):
        self._byte_to_id = np.full(256, -1, dtype=np.int16)
        self._byte_to_id[np.frombuffer(self.symbols, dtype=np.uint8)] = np.arange(len(self.symbols))

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: bytes | str) -> np.ndarray:
        """Token ids (uint8) of `text`; a str is taken as UTF-8, the encoding the byte-level corpora use."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        data = np.frombuffer(bytes(text), dtype=np.uint8)
        ids = self._byte_to_id[data]
        unknown = np.unique(data[ids < 0])
        if unknown.size:
            shown = ", ".join(repr(bytes([b])) for b in unknown[:8])
            raise UserError(
                f"text holds {unknown.size} byte value(s) outside the {self.name} vocabulary ({shown}); "
                f"use only characters that occur in the training corpus"
            )
        return ids.astype(np.uint8)

    def decode(self, ids) -> bytes:
        """The bytes for token ids given as a numpy array, a torch tensor (any device) or a list."""
        if hasattr(ids, "detach"):  # torch tensor: numpy cannot read GPU memory directly
            ids = ids.detach().cpu().numpy()
        table = np.frombuffer(self.symbols, dtype=np.uint8)
        return table[np.asarray(ids, dtype=np.int64)].tobytes()

    def split(self, split: str) -> np.ndarray:
        """The token array of split "train", "valid" or "test"."""
        if split not in SPLITS:
            raise UserError(f"unknown corpus split {split!r}; use one of train, valid, test")
        return getattr(self, split)

    def unigram_entropy_bits(self, split: str = "train") -> float:
        """Entropy of the split's character distribution in bits/char; split "all" means the whole source.

        This is the bpc of a model that ignores context, the ceiling any trained model must get well below.
        """
        splits = SPLITS if split == "all" else [split]
        counts = sum(np.bincount(self.split(s), minlength=self.vocab_size) for s in splits)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())


@dataclass(frozen=True)
class _Source:
    """What load_corpus needs to find or build a cache: an identity (for the key) and a way to read the bytes."""

    name: str  # Corpus.name
    identity: dict  # everything that determines the cache contents; hashed into the key
    read: Callable[[], tuple[bytes, str]]  # -> (raw bytes, one-line description of where they came from)
    split_sizes: Callable[[int], list[int]]  # total length -> [train, valid, test] lengths


def load_corpus(dataset_cfg, data_dir: str | Path) -> Corpus:
    """The corpus described by `dataset_cfg` (a DictConfig, dict or namespace), from cache or built into it."""
    data_dir = Path(data_dir).expanduser()
    name = _get(dataset_cfg, "name")
    builders = {"enwik8": _download_source, "text8": _download_source, "file": _file_source, "hf": _hf_source}
    if name not in builders:
        raise UserError(f"unknown dataset name {name!r}; use one of {', '.join(builders)}")
    source = builders[name](dataset_cfg, data_dir)
    cache_dir = data_dir / "cache" / _cache_key(source)
    corpus = _open_cache(cache_dir, source.name)
    if corpus is None:
        raw, description = source.read()
        _build_cache(cache_dir, raw, source.split_sizes(len(raw)), description)
        corpus = _open_cache(cache_dir, source.name)
    return corpus


# ---------------------------------------------------------------------------------------------------- config access
def _get(cfg, key: str, default: Any = None) -> Any:
    """`cfg[key]` for DictConfig/dict, `cfg.key` for namespaces; omegaconf containers come back as plain Python."""
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    if hasattr(value, "_metadata"):  # ListConfig / DictConfig: resolve interpolations, drop omegaconf types
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True)
    return default if value is None else value


def _require(cfg, key: str, example: str) -> Any:
    value = _get(cfg, key)
    if value in (None, ""):
        raise UserError(
            f"dataset.{key} is required for dataset {_get(cfg, 'name')!r}; pass e.g. dataset.{key}={example}"
        )
    return value


def _split_fractions(cfg) -> list[float]:
    fractions = _get(cfg, "split_fractions", list(DEFAULT_SPLIT_FRACTIONS))
    try:
        fractions = [float(f) for f in fractions]
    except (TypeError, ValueError):
        fractions = []
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(
            f"dataset.split_fractions must be three positive numbers summing to 1 (train, valid, test), "
            f"got {_get(cfg, 'split_fractions')!r}"
        )
    return fractions


def _sizes_from_fractions(fractions: list[float], what: str) -> Callable[[int], list[int]]:
    """Split lengths for a source of `n` bytes; the test split takes the rounding remainder."""

    def sizes(n: int) -> list[int]:
        train, valid = round(n * fractions[0]), round(n * fractions[1])
        result = [train, valid, n - train - valid]
        for split, size in zip(SPLITS, result):
            if size <= 0:
                raise UserError(
                    f"{what} has {n} bytes, too few to split by fractions {fractions} (split {split!r} "
                    f"would be empty); use a bigger file or other dataset.split_fractions"
                )
        return result

    return sizes


# ---------------------------------------------------------------------------------------------------------- sources
def _download_source(cfg, data_dir: Path) -> _Source:
    """enwik8 / text8: a zip archive with published checksum and fixed split sizes."""
    name = _get(cfg, "name")
    spec = {key: _get(cfg, key, default) for key, default in DOWNLOADS[name].items()}
    try:
        num_bytes = int(spec["num_bytes"])
        split_sizes = [int(s) for s in spec["split_sizes"]]
    except (TypeError, ValueError):
        raise UserError(
            f"dataset.num_bytes must be an integer and dataset.split_sizes three integers, got "
            f"{spec['num_bytes']!r} and {spec['split_sizes']!r}"
        ) from None
    if len(split_sizes) != 3 or min(split_sizes) <= 0 or sum(split_sizes) > num_bytes:
        raise UserError(
            f"dataset.split_sizes must be three positive sizes (train, valid, test) summing to at most "
            f"dataset.num_bytes={num_bytes}, got {split_sizes}"
        )

    def read() -> tuple[bytes, str]:
        _make_dir(data_dir)
        return fetch_corpus_bytes(
            data_dir,
            url=spec["url"],
            archive_member=spec["archive_member"],
            checksum_algo=spec["checksum_algo"],
            checksum=spec["checksum"],
            num_bytes=num_bytes,
        )

    identity = {
        "name": name,
        "archive_member": spec["archive_member"],
        "checksum_algo": spec["checksum_algo"],
        "checksum": str(spec["checksum"]).lower(),
        "num_bytes": num_bytes,
        "split_sizes": split_sizes,
    }
    return _Source(name, identity, read, lambda n: split_sizes)


def _file_source(cfg, data_dir: Path) -> _Source:
    """A local file of any bytes; its path, size and mtime are its identity, so editing it rebuilds the cache."""
    path = Path(_require(cfg, "path", "/path/to/corpus.txt")).expanduser().resolve()
    if not path.exists():
        raise UserError(f"dataset.path {path} does not exist; point dataset.path at a text file")
    if path.is_dir():
        raise UserError(f"dataset.path {path} is a directory; point dataset.path at a single text file")
    stat = path.stat()
    if stat.st_size == 0:
        raise UserError(f"dataset.path {path} is empty; point dataset.path at a file with text in it")
    fractions = _split_fractions(cfg)

    def read() -> tuple[bytes, str]:
        try:
            return path.read_bytes(), f"file {path} ({stat.st_size} bytes)"
        except OSError as e:
            raise UserError(f"cannot read dataset.path {path} ({e.strerror}); fix its permissions") from None

    identity = {
        "name": "file",
        "path": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "split_fractions": fractions,
    }
    return _Source(f"file:{path.stem}", identity, read, _sizes_from_fractions(fractions, f"dataset.path {path}"))


def _hf_source(cfg, data_dir: Path) -> _Source:
    """A Hugging Face dataset: rows of the text column joined by newlines, as UTF-8 bytes."""
    spec = {
        "hf_name": _require(cfg, "hf_name", "wikitext"),
        "hf_config": _get(cfg, "hf_config"),
        "hf_split": _get(cfg, "hf_split", "train"),
        "data_files": _get(cfg, "data_files"),
        "text_column": _get(cfg, "text_column", "text"),
        "split_fractions": _split_fractions(cfg),
    }
    # Local data files are fingerprinted like a file dataset, so editing them rebuilds the cache.
    identity = {"name": "hf", **spec, "local_files": _fingerprint_local_files(spec["data_files"])}
    cache_dir = _get(cfg, "hf_cache_dir")  # None: the datasets library's default (HF_HOME)

    def read() -> tuple[bytes, str]:
        return _read_hf_text(spec, cache_dir), f"Hugging Face dataset {spec}"

    what = f"Hugging Face dataset {spec['hf_name']!r}"
    return _Source(f"hf:{spec['hf_name']}", identity, read, _sizes_from_fractions(spec["split_fractions"], what))


def _read_hf_text(spec: dict, cache_dir: str | None) -> bytes:
    import datasets  # imported here: it takes seconds and only this source needs it

    try:
        ds = datasets.load_dataset(
            spec["hf_name"],
            spec["hf_config"],
            split=spec["hf_split"],
            data_files=spec["data_files"],
            cache_dir=cache_dir,
        )
    except Exception as e:  # the library raises many types for a bad name, config, split or offline hub
        reason = " ".join(str(e).split())[:300]
        raise UserError(
            f"could not load Hugging Face dataset {spec['hf_name']!r} (config {spec['hf_config']!r}, "
            f"split {spec['hf_split']!r}): {type(e).__name__}: {reason}; check dataset.hf_* and "
            f"dataset.data_files, or the network"
        ) from None
    if spec["text_column"] not in ds.column_names:
        raise UserError(
            f"Hugging Face dataset {spec['hf_name']!r} has no column {spec['text_column']!r} "
            f"(columns: {ds.column_names}); set dataset.text_column"
        )
    text = "\n".join(row or "" for row in ds[spec["text_column"]])
    if not text:
        raise UserError(
            f"Hugging Face dataset {spec['hf_name']!r} column {spec['text_column']!r} is empty; "
            f"choose another dataset.hf_split or dataset.text_column"
        )
    return text.encode("utf-8")


def _fingerprint_local_files(data_files) -> list:
    """[path, size, mtime_ns] for every entry of `data_files` (str, list or dict) that is a local file."""
    if data_files is None:
        return []
    if isinstance(data_files, Mapping):
        return [fp for value in data_files.values() for fp in _fingerprint_local_files(value)]
    if isinstance(data_files, (list, tuple)):
        return [fp for value in data_files for fp in _fingerprint_local_files(value)]
    path = Path(str(data_files)).expanduser()
    if not path.is_file():
        return []
    stat = path.stat()
    return [[str(path.resolve()), stat.st_size, stat.st_mtime_ns]]


# ------------------------------------------------------------------------------------------------------------ cache
def _cache_key(source: _Source) -> str:
    """`<readable name>-<hash of the identity>`: readable for humans, unique for the machine."""
    blob = json.dumps({"format": CACHE_FORMAT, **source.identity}, sort_keys=True, default=str)
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in source.name)[:40]
    return f"{slug}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _open_cache(cache_dir: Path, name: str) -> Corpus | None:
    """The cached corpus, or None when the cache is absent or incomplete (then it is rebuilt, never trusted).

    meta.json is written last, and each split file must have exactly the size meta.json records.
    """
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        sizes = dict(zip(SPLITS, meta["split_sizes"]))
        if meta.get("format") != CACHE_FORMAT or any(
            (cache_dir / f"{s}.bin").stat().st_size != sizes[s] for s in SPLITS
        ):
            return None
        arrays = {s: np.memmap(cache_dir / f"{s}.bin", dtype=np.uint8, mode="r") for s in SPLITS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Corpus(name=name, symbols=bytes(meta["symbols"]), **arrays)


def _build_cache(cache_dir: Path, raw: bytes, split_sizes: list[int], description: str) -> None:
    """Encode `raw` as token ids and write the three splits, then meta.json, each atomically."""
    log.info("building corpus cache %s from %s", cache_dir, description)
    data = np.frombuffer(raw, dtype=np.uint8)
    symbols = np.flatnonzero(np.bincount(data, minlength=256)).astype(np.uint8)  # sorted byte values present
    byte_to_id = np.zeros(256, dtype=np.uint8)
    byte_to_id[symbols] = np.arange(len(symbols), dtype=np.uint8)
    ids = byte_to_id[data]
    _make_dir(cache_dir)
    start = 0
    for split, size in zip(SPLITS, split_sizes):
        _write_atomic(cache_dir / f"{split}.bin", memoryview(ids[start : start + size]))
        start += size
    meta = {
        "format": CACHE_FORMAT,
        "symbols": symbols.tolist(),
        "split_sizes": list(split_sizes),
        "source": description,
    }
    _write_atomic(cache_dir / "meta.json", json.dumps(meta, indent=1).encode())


def _write_atomic(path: Path, data) -> None:
    """Write to a process-unique temporary file, then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write corpus cache {path} ({e.strerror}); free disk space or choose another "
            f"data directory (MLSTM_DATA_DIR)"
        ) from None


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create data directory {path} ({e.strerror}); choose another data directory (MLSTM_DATA_DIR)"
        ) from None
