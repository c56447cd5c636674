"""Crash-safe checkpoints.

A checkpoint is a plain dict of tensors, numbers and strings (no pickled objects), so it loads with
`torch.load(weights_only=True)`: opening a checkpoint never executes code. Files in the run directory:

    ckpt-00001200.pt   one per save, the newest `keep` kept
    last.pt            hard link to the newest (what `trainer.resume` and `checkpoint=` read)
    best.pt            the lowest validation bpc so far

Each file is written to a temporary name, flushed and fsynced, then renamed: a crash mid-write leaves the previous
file intact, and a write that fails (ENOSPC, EFBIG, EIO) removes what it wrote and stops the run with one line.
Each payload carries `digest`, a SHA-256 of its whole content (tensor bytes included), because a zip archive with
flipped bytes inside a tensor still loads. On load, a truncated or corrupted file (unreadable, missing
keys, wrong digest) is reported in one line, renamed to `<name>.corrupt` (kept for inspection, never read again) and
the previous good one is used.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from mlstm.errors import UserError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "step", "config")


def atomic_save(payload: dict, path: Path) -> None:
    """Write through a temporary file, fsync, rename. A failed write (OSError) removes the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            writer = _RecordingWriter(handle)
            try:
                torch.save(payload, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _RecordingWriter:
    """A file's `write` that keeps the OSError it raised: torch.save reports a failed write (a full disk, a file-size
    limit) as a RuntimeError without the errno, and the user needs the errno's words."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_atomically(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # file systems without hard links: copy the bytes instead
            tmp.write_bytes(source.read_bytes())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(payload: dict, run_dir: Path, *, keep: int = 2, best: bool = False) -> Path:
    """Write `ckpt-<step>.pt`, point `last.pt` (and `best.pt` when asked) at it, drop the oldest beyond `keep`.

    A write that fails (a full disk, a file-size limit, an I/O error) leaves the run directory as it was: the new
    file and its temporary are removed, last.pt still points to the previous checkpoint, and a UserError names the
    directory and the error."""
    run_dir = Path(run_dir)
    payload = {"format_version": FORMAT_VERSION, **payload}
    payload["digest"] = content_digest(payload)
    path = run_dir / f"ckpt-{int(payload['step']):08d}.pt"
    for stale in run_dir.glob(".*.pt.tmp"):  # left by a process killed mid-write (one writer per run: run.lock)
        stale.unlink(missing_ok=True)
    existed = path.exists()
    try:
        atomic_save(payload, path)
        _link_atomically(path, run_dir / "last.pt")
        if best:
            _link_atomically(path, run_dir / "best.pt")
    except OSError as error:
        last = run_dir / "last.pt"
        current = last.exists() and path.exists() and os.path.samefile(path, last)
        if not existed and path.exists() and not current:
            path.unlink()  # written, but last.pt could not be pointed at it: the previous checkpoint stays current
        kept = (
            "last.pt holds this step's checkpoint"
            if current
            else "last.pt still points to the previous checkpoint"
            if last.exists()
            else "no checkpoint was saved"
        )
        raise UserError(
            f"cannot write a checkpoint in {run_dir}: {error.strerror or error}; {kept}; free space "
            f"(or raise the file-size limit) and rerun the same command to resume"
        ) from None
    for old in sorted(run_dir.glob("ckpt-*.pt"))[: -max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def load_file(path: Path) -> dict:
    """Load and verify one checkpoint file; UserError (one line) if it is not a good checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad magic, disallowed pickle global, ...
        raise UserError(f"checkpoint {path} is unreadable or corrupted ({type(error).__name__})") from None
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        raise UserError(f"checkpoint {path} is not a checkpoint of this project (missing keys)")
    if payload["format_version"] != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {payload['format_version']}, expected {FORMAT_VERSION}")
    # checkpoints written before digests existed have none; any other must match its content to the last byte
    if "digest" in payload and content_digest(payload) != payload["digest"]:
        raise UserError(f"checkpoint {path} is corrupted (its content does not match its SHA-256 digest)")
    return payload


def content_digest(payload: dict) -> str:
    """SHA-256 of a payload without its `digest`: every tensor's dtype, shape and bytes, every other value's repr."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in payload.items() if key != "digest"})
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r};".encode())


def _set_aside(path: Path) -> None:
    try:
        os.replace(path, path.with_name(path.name + ".corrupt"))
    except OSError:
        pass


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds any checkpoint file (good or set aside as corrupted)."""
    run_dir = Path(run_dir)
    return (run_dir / "last.pt").exists() or any(run_dir.glob("ckpt-*.pt")) or any(run_dir.glob("*.pt.corrupt"))


def load_latest(run_dir: Path, *, accept=None, set_aside: bool = True) -> dict | None:
    """The newest good checkpoint of a run directory, falling back past corrupted files; None if there is none.

    A corrupted file is reported and, with `set_aside` (one process only, under DDP), renamed to `<name>.corrupt`.
    `accept(payload) -> bool` skips readable checkpoints a caller cannot use (e.g. non-finite weights).
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / "last.pt"] + sorted(run_dir.glob("ckpt-*.pt"), reverse=True)
    candidates = [path for path in candidates if path.exists()]
    for path in candidates:
        try:
            payload = load_file(path)
        except UserError as error:
            print(
                f"warning: {error}; {'set it aside as .corrupt, ' if set_aside else ''}trying the previous checkpoint",
                file=sys.stderr,
            )
            if set_aside:
                _set_aside(path)
            continue
        if accept is None or accept(payload):
            return payload
        print(f"warning: checkpoint {path} is not usable here; trying the previous checkpoint", file=sys.stderr)
    if accept is None and (candidates or any(run_dir.glob("*.pt.corrupt"))):
        raise UserError(
            f"no readable checkpoint in {run_dir}: every checkpoint file is corrupted (kept as *.corrupt); "
            f"start afresh with a new hydra.run.dir"
        )
    return None
