"""The data layer on real files, a real local HTTP server and real Hugging Face loading (offline); no mocks."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mlstm.data import Batch, Corpus, StreamBatcher, load_corpus
from mlstm.errors import UserError

# A small enwik8 stand-in: XML-ish text with multi-byte UTF-8, so the vocabulary is not just ASCII.
SMALL_CORPUS = b"".join(
    b"<page><id>%d</id><text>caf\xc3\xa9 [[link]] %d</text></page>\n" % (i, i * i) for i in range(400)
)[:10_000]
SMALL_SPLITS = [8_000, 1_000, 1_000]


def raises_one_line(match: str | None = None):
    """pytest.raises(UserError) that also checks the message is a single non-empty line (checked by the caller)."""
    return pytest.raises(UserError, match=match)


def assert_one_line(excinfo) -> None:
    message = str(excinfo.value)
    assert message and "\n" not in message and "Traceback" not in message


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def file_cfg(path: Path, fractions=(0.8, 0.1, 0.1)):
    return OmegaConf.create({"name": "file", "path": str(path), "split_fractions": list(fractions)})


# ------------------------------------------------------------------------------------------------------ file corpus
def test_file_corpus_splits_vocab_and_round_trip(tmp_path):
    data = (b"the quick brown fox jumps over the lazy dog. " * 30)[:1000]
    corpus = load_corpus(file_cfg(write(tmp_path / "fox.txt", data)), tmp_path / "data")

    assert corpus.name == "file:fox"
    assert [len(corpus.train), len(corpus.valid), len(corpus.test)] == [800, 100, 100]
    assert corpus.symbols == bytes(sorted(set(data)))
    assert corpus.vocab_size == len(set(data))
    everything = np.concatenate([corpus.train, corpus.valid, corpus.test])
    assert corpus.decode(everything) == data
    assert np.array_equal(corpus.encode(data), everything)
    assert corpus.decode(torch.from_numpy(corpus.encode(b"lazy fox"))) == b"lazy fox"
    assert corpus.encode("dog").dtype == np.uint8


def test_encode_rejects_bytes_outside_vocabulary(tmp_path):
    corpus = load_corpus(file_cfg(write(tmp_path / "ab.txt", b"abab" * 100)), tmp_path / "data")
    with raises_one_line("vocabulary") as excinfo:
        corpus.encode(b"abc")
    assert_one_line(excinfo)


def test_cache_is_memmapped_reused_and_rebuilt_when_the_source_changes(tmp_path):
    source = write(tmp_path / "corpus.txt", b"hello world, " * 100)
    data_dir = tmp_path / "data"
    first = load_corpus({"name": "file", "path": str(source)}, data_dir)  # plain dict config, default fractions
    (cache_dir,) = (data_dir / "cache").iterdir()
    assert sorted(p.name for p in cache_dir.iterdir()) == ["meta.json", "test.bin", "train.bin", "valid.bin"]
    stamps = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}

    second = load_corpus({"name": "file", "path": str(source)}, data_dir)
    for split in ("train", "valid", "test"):
        assert isinstance(getattr(second, split), np.memmap)
        assert np.array_equal(getattr(first, split), getattr(second, split))
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == stamps  # nothing rewritten
    assert second.symbols == first.symbols

    write(source, b"HELLO WORLD! " * 100)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # a later mtime, surely
    third = load_corpus({"name": "file", "path": str(source)}, data_dir)
    assert len(list((data_dir / "cache").iterdir())) == 2
    assert third.decode(third.train[:5]) == b"HELLO"


def test_incomplete_cache_is_rebuilt_not_trusted(tmp_path):
    source = write(tmp_path / "corpus.txt", bytes(range(32, 127)) * 20)
    data_dir = tmp_path / "data"
    load_corpus(file_cfg(source), data_dir)
    (cache_dir,) = (data_dir / "cache").iterdir()
    train_bin = cache_dir / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:10])  # as if the build died mid-write

    corpus = load_corpus(file_cfg(source), data_dir)
    assert len(corpus.train) == 1520
    assert corpus.decode(np.concatenate([corpus.train, corpus.valid, corpus.test])) == source.read_bytes()


def test_changed_fractions_get_their_own_cache(tmp_path):
    source = write(tmp_path / "corpus.txt", b"abcdefghij" * 100)
    a = load_corpus(file_cfg(source, (0.8, 0.1, 0.1)), tmp_path / "data")
    b = load_corpus(file_cfg(source, (0.5, 0.25, 0.25)), tmp_path / "data")
    assert (len(a.train), len(b.train)) == (800, 500)


# ------------------------------------------------------------------------------------------------ real text samples
def test_enwik8_sample_vocabulary_and_unigram_entropy(enwik8_sample, tmp_path):
    corpus = load_corpus(file_cfg(enwik8_sample), tmp_path / "data")
    assert corpus.vocab_size == 200
    assert corpus.unigram_entropy_bits("all") == pytest.approx(5.07, abs=0.02)
    assert 4.5 < corpus.unigram_entropy_bits("valid") < 5.6


def test_text8_sample_vocabulary_and_unigram_entropy(text8_sample, tmp_path):
    corpus = load_corpus(file_cfg(text8_sample), tmp_path / "data")
    assert corpus.symbols == b" abcdefghijklmnopqrstuvwxyz"
    assert corpus.unigram_entropy_bits("all") == pytest.approx(4.12, abs=0.02)


# ---------------------------------------------------------------------------------------- downloads (local server)
class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def web(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp/www, which holds enwik8.zip with SMALL_CORPUS as member enwik8."""
    root = tmp_path / "www"
    root.mkdir()
    with zipfile.ZipFile(root / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", SMALL_CORPUS)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def enwik8_cfg(url: str, checksum: str | None = None):
    return OmegaConf.create(
        {
            "name": "enwik8",
            "url": url,
            "archive_member": "enwik8",
            "checksum_algo": "md5",
            "checksum": checksum or hashlib.md5(SMALL_CORPUS).hexdigest(),
            "num_bytes": len(SMALL_CORPUS),
            "split_sizes": SMALL_SPLITS,
        }
    )


@pytest.fixture
def closed_port_url():
    """A url on a port nobody listens on: the connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/enwik8.zip"


def test_download_from_local_server_verifies_and_splits(web, tmp_path):
    _, base = web
    data_dir = tmp_path / "data"
    corpus = load_corpus(enwik8_cfg(f"{base}/enwik8.zip"), data_dir)
    assert corpus.name == "enwik8"
    assert [len(corpus.train), len(corpus.valid), len(corpus.test)] == SMALL_SPLITS
    assert corpus.decode(corpus.train[:6]) == SMALL_CORPUS[:6]
    assert corpus.decode(corpus.test) == SMALL_CORPUS[9_000:]
    assert corpus.symbols == bytes(sorted(set(SMALL_CORPUS)))
    assert (data_dir / "enwik8.zip").is_file() and not (data_dir / "enwik8.zip.part").exists()


def test_wrong_checksum_sets_the_download_aside_and_never_uses_it(web, tmp_path, closed_port_url):
    _, base = web
    data_dir = tmp_path / "data"
    with raises_one_line("checksum") as excinfo:
        load_corpus(enwik8_cfg(f"{base}/enwik8.zip", checksum="0" * 32), data_dir)
    assert_one_line(excinfo)
    assert ".bad" in str(excinfo.value)
    assert (data_dir / "enwik8.zip.bad").is_file() and not (data_dir / "enwik8.zip").exists()
    assert not (data_dir / "cache").exists()
    # With the right checksum but no network, the set-aside file must not be picked up again.
    with raises_one_line(closed_port_url):
        load_corpus(enwik8_cfg(closed_port_url), data_dir)


def test_refused_connection_names_the_url_and_the_fix(tmp_path, closed_port_url):
    with raises_one_line() as excinfo:
        load_corpus(enwik8_cfg(closed_port_url), tmp_path / "data")
    assert_one_line(excinfo)
    message = str(excinfo.value)
    assert closed_port_url in message and "enwik8.zip" in message and "MLSTM_DATA_DIR" in message


def test_http_404_is_a_user_error(web, tmp_path):
    _, base = web
    with raises_one_line("404") as excinfo:
        load_corpus(enwik8_cfg(f"{base}/missing/enwik8.zip"), tmp_path / "data")
    assert_one_line(excinfo)
    assert not (tmp_path / "data" / "enwik8.zip.part").exists()


def test_placed_archive_is_used_without_network(web, tmp_path, closed_port_url):
    root, _ = web
    data_dir = tmp_path / "data"
    write(data_dir / "enwik8.zip", (root / "enwik8.zip").read_bytes())
    corpus = load_corpus(enwik8_cfg(closed_port_url), data_dir)
    assert corpus.decode(corpus.valid) == SMALL_CORPUS[8_000:9_000]


def test_placed_unzipped_file_is_used_without_network(tmp_path, closed_port_url):
    data_dir = tmp_path / "data"
    write(data_dir / "enwik8", SMALL_CORPUS)
    corpus = load_corpus(enwik8_cfg(closed_port_url), data_dir)
    assert len(corpus.train) == SMALL_SPLITS[0]


def test_leftover_part_file_is_discarded_and_replaced(web, tmp_path):
    _, base = web
    data_dir = tmp_path / "data"
    write(data_dir / "enwik8.zip.part", b"half of an old download")
    corpus = load_corpus(enwik8_cfg(f"{base}/enwik8.zip"), data_dir)
    assert corpus.decode(corpus.train[:6]) == SMALL_CORPUS[:6]
    assert not (data_dir / "enwik8.zip.part").exists()
    assert zipfile.is_zipfile(data_dir / "enwik8.zip")


def test_corrupt_placed_archive_is_set_aside(tmp_path, closed_port_url):
    data_dir = tmp_path / "data"
    write(data_dir / "enwik8.zip", b"this is not a zip file")
    with raises_one_line("zip") as excinfo:
        load_corpus(enwik8_cfg(closed_port_url), data_dir)
    assert_one_line(excinfo)
    assert (data_dir / "enwik8.zip.bad").is_file()


def test_cached_download_loads_without_archive_or_network(web, tmp_path, closed_port_url):
    _, base = web
    data_dir = tmp_path / "data"
    load_corpus(enwik8_cfg(f"{base}/enwik8.zip"), data_dir)
    (data_dir / "enwik8.zip").unlink()
    corpus = load_corpus(enwik8_cfg(closed_port_url), data_dir)
    assert [len(corpus.train), len(corpus.valid), len(corpus.test)] == SMALL_SPLITS


def test_download_streams_to_dest_and_file_digest_matches(web, tmp_path):
    from mlstm.data.download import download, file_digest

    root, base = web
    dest = download(f"{base}/enwik8.zip", tmp_path / "got" / "enwik8.zip", progress=False)
    assert dest.read_bytes() == (root / "enwik8.zip").read_bytes()
    assert file_digest(dest, "sha1") == hashlib.sha1(dest.read_bytes()).hexdigest()


def test_builtin_corpora_defaults_match_the_paper():
    from mlstm.data.corpus import DOWNLOADS

    assert DOWNLOADS["enwik8"]["checksum"] == "a1fa5ffddb56f4953e226637dabbb36a"
    assert DOWNLOADS["text8"]["checksum"] == "0dc3edebc970dcc96137e7deda4d9995af9d93de"
    for spec in DOWNLOADS.values():
        assert spec["split_sizes"] == [90_000_000, 5_000_000, 5_000_000] and spec["num_bytes"] == 10**8


# ---------------------------------------------------------------------------------------------- Hugging Face source
def test_hf_text_dataset_gives_the_same_bytes_as_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    lines = [f"line {i}: caf\u00e9 \u65e5\u672c {i * 7}" for i in range(200)]
    source = write(tmp_path / "lines.txt", "\n".join(lines).encode("utf-8"))  # no final newline: join adds none

    hf = load_corpus(
        {
            "name": "hf",
            "hf_name": "text",
            "hf_config": None,
            "data_files": str(source),
            "hf_cache_dir": str(tmp_path / "hf_cache"),
        },
        tmp_path / "data",
    )
    plain = load_corpus({"name": "file", "path": str(source)}, tmp_path / "data")
    assert hf.name == "hf:text"
    assert hf.symbols == plain.symbols
    for split in ("train", "valid", "test"):
        assert np.array_equal(getattr(hf, split), getattr(plain, split))


# ------------------------------------------------------------------------------------------------ bad user inputs
@pytest.mark.parametrize(
    "make_cfg, match",
    [
        (lambda d: {"name": "file", "path": str(d / "nope.txt")}, "does not exist"),
        (lambda d: {"name": "file", "path": str(d)}, "directory"),
        (lambda d: {"name": "file", "path": str(write(d / "empty.txt", b""))}, "empty"),
        (lambda d: {"name": "file", "path": str(write(d / "tiny.txt", b"abc"))}, "too few"),
        (lambda d: {"name": "file"}, "dataset.path"),
        (
            lambda d: {"name": "file", "path": str(write(d / "x.txt", b"x" * 100)), "split_fractions": [0.9, 0.2, 0.1]},
            "split_fractions",
        ),
        (lambda d: {"name": "wikipedia"}, "unknown dataset"),
        (
            lambda d: {"name": "enwik8", "checksum_algo": "crc99", "url": "http://127.0.0.1:9/enwik8.zip"},
            "checksum_algo",
        ),
        (lambda d: {"name": "enwik8", "split_sizes": [10, 10]}, "split_sizes"),
        (
            lambda d: {
                "name": "hf",
                "hf_name": "text",
                "data_files": str(d / "missing.txt"),
                "hf_cache_dir": str(d / "hf"),
            },
            "Hugging Face",
        ),
    ],
)
def test_bad_dataset_configs_are_one_line_user_errors(tmp_path, monkeypatch, make_cfg, match):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the hf case must fail locally, never reach for the Hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with raises_one_line(match) as excinfo:
        load_corpus(make_cfg(tmp_path), tmp_path / "data")
    assert_one_line(excinfo)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file_is_a_user_error(tmp_path):
    source = write(tmp_path / "secret.txt", b"x" * 100)
    source.chmod(0)
    with raises_one_line("cannot read") as excinfo:
        load_corpus(file_cfg(source), tmp_path / "data")
    assert_one_line(excinfo)


# ---------------------------------------------------------------------------------------------------- StreamBatcher
# Token value == position in the array (arange), so every expected entry can be written as a formula.
N, B, T = 103, 4, 5  # L = 25 chars per stream, (25 - 1) // 5 = 4 segments per epoch


def arange_tokens(n: int = N) -> np.ndarray:
    return np.arange(n, dtype=np.uint8)


def test_batches_are_contiguous_streams_with_shifted_targets():
    batcher = StreamBatcher(arange_tokens(), B, T)
    L = N // B
    assert (batcher.segments_per_epoch, batcher.chars_per_step, len(batcher)) == (4, B * T, 4)
    previous = None
    for k in range(batcher.segments_per_epoch):
        batch = batcher.next_batch()
        assert isinstance(batch, Batch)
        assert batch.x.shape == batch.y.shape == (T, B) and batch.x.dtype == torch.int64
        expected = torch.tensor([[b * L + k * T + t for b in range(B)] for t in range(T)])
        assert torch.equal(batch.x, expected)
        assert torch.equal(batch.y, expected + 1)
        if previous is not None:  # segment k continues segment k-1 in every stream
            assert torch.equal(batch.x[0], previous.y[-1])
        previous = batch


def test_reset_only_at_epoch_start_and_wraparound_counts_epochs():
    batcher = StreamBatcher(arange_tokens(), B, T)
    resets, epochs = [], []
    for _ in range(2 * batcher.segments_per_epoch + 1):
        epochs.append(batcher.epoch)
        resets.append(batcher.next_batch().reset)
    assert resets == [True, False, False, False] * 2 + [True]
    assert epochs == [0] * 4 + [1] * 4 + [2]
    assert (batcher.epoch, batcher.position) == (2, 1)


def test_iteration_covers_one_epoch_and_leaves_the_cursor_alone():
    batcher = StreamBatcher(arange_tokens(), B, T)
    batcher.next_batch()
    batches = list(batcher)
    assert len(batches) == 4 and [b.reset for b in batches] == [True, False, False, False]
    assert int(batches[0].x[0, 0]) == 0
    assert batcher.state_dict() == {"epoch": 0, "position": 1}


def test_state_dict_resumes_at_the_exact_same_batch():
    original = StreamBatcher(arange_tokens(), B, T)
    for _ in range(6):  # into the second epoch
        original.next_batch()
    state = original.state_dict()
    assert state == {"epoch": 1, "position": 2}
    resumed = StreamBatcher(arange_tokens(), B, T)
    resumed.load_state_dict(state)
    for _ in range(5):  # across the next wrap-around too
        a, b = original.next_batch(), resumed.next_batch()
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.reset == b.reset
    assert original.state_dict() == resumed.state_dict()


def test_state_from_another_configuration_is_rejected():
    batcher = StreamBatcher(arange_tokens(), B, T)
    with raises_one_line("position") as excinfo:
        batcher.load_state_dict({"epoch": 0, "position": 99})
    assert_one_line(excinfo)


def test_ranks_split_the_streams_and_their_union_is_the_single_process_batch():
    single = StreamBatcher(arange_tokens(), B, T)
    ranks = [StreamBatcher(arange_tokens(), B, T, rank=r, world_size=2) for r in range(2)]
    assert all(r.chars_per_step == B * T and r.segments_per_epoch == single.segments_per_epoch for r in ranks)
    for _ in range(single.segments_per_epoch + 1):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p.x.shape == (T, B // 2) for p in parts)
        assert torch.equal(torch.cat([p.x for p in parts], dim=1), whole.x)
        assert torch.equal(torch.cat([p.y for p in parts], dim=1), whole.y)
        assert all(p.reset == whole.reset for p in parts)


def test_batcher_reads_a_corpus_memmap(tmp_path):
    source = write(tmp_path / "corpus.txt", b"0123456789" * 50)
    corpus = load_corpus(file_cfg(source), tmp_path / "data")
    batch = StreamBatcher(corpus.train, 2, 10).next_batch()
    assert corpus.decode(batch.x[:, 0]) == b"0123456789" and corpus.decode(batch.y[:, 0]) == b"1234567890"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokens": arange_tokens(20), "batch_size": 4, "seq_len": 5}, "'valid' has 20 characters"),
        ({"tokens": arange_tokens(), "batch_size": 3, "seq_len": 5, "world_size": 2}, "divisible"),
        ({"tokens": arange_tokens(), "batch_size": 0, "seq_len": 5}, "positive"),
        ({"tokens": arange_tokens(), "batch_size": 4, "seq_len": 5, "rank": 2, "world_size": 2}, "rank"),
    ],
)
def test_bad_batcher_settings_are_one_line_user_errors(kwargs, match):
    with raises_one_line(match) as excinfo:
        StreamBatcher(**kwargs, split_name="valid")
    assert_one_line(excinfo)


def test_corpus_is_exported_with_its_dataclass_fields():
    assert {"name", "symbols", "train", "valid", "test"} <= set(Corpus.__dataclass_fields__)
