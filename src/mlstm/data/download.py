"""Fetching the original corpus archives (enwik8.zip, text8.zip) and checking what they contain.

The Hugging Face copies of enwik8 are not byte-exact (see PAPER.md, section 4), so the corpora come from Mahoney's
archives and are verified against the published checksums of the *unzipped* bytes. Every failure a user can meet here
(no network, HTTP error, corrupt or wrong archive) becomes a one-line `UserError` that says how to get unstuck, which
usually means placing the archive in the data directory by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from tqdm.auto import tqdm

from mlstm.errors import UserError

CHUNK_BYTES = 1 << 20  # 1 MiB: large enough for throughput, small enough to keep memory flat


def archive_name(url: str) -> str:
    """The file name an archive gets in the data directory: the last component of the URL's path."""
    name = PurePosixPath(urlparse(url).path).name
    if not name:
        raise UserError(f"cannot tell the archive's file name from url {url!r}; use a url ending in the file name")
    return name


def _no_network_hint(dest: Path) -> str:
    return f"place {dest.name} in {dest.parent} or set MLSTM_DATA_DIR to a directory that holds it"


def download(url: str, dest: Path, *, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download `url` to `dest` and return `dest`.

    The bytes stream into `<dest>.part`, which replaces `dest` only once complete, so `dest` is never a truncated
    file. A `.part` left behind by an interrupted run is overwritten from the start (no resume: the archives are small
    enough, and a resumed download of a changed file would be silently wrong).
    """
    dest = Path(dest)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with (
                open(part, "wb") as out,
                tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress
                ) as bar,
            ):
                received = 0
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if total is not None and received != total:  # the connection closed early: never keep a partial file
                raise UserError(
                    f"download of {url} was interrupted after {received:,} of {total:,} bytes; run the "
                    f"same command again to restart it, or {_no_network_hint(dest)}"
                )
        os.replace(part, dest)
    except urllib.error.HTTPError as e:
        raise UserError(
            f"download of {url} failed with HTTP {e.code} {e.reason}; check the url or {_no_network_hint(dest)}"
        ) from None
    except urllib.error.URLError as e:
        raise UserError(f"could not download {url} ({e.reason}); no network? {_no_network_hint(dest)}") from None
    except ValueError as e:  # urllib's complaint about a malformed url, e.g. a missing scheme
        raise UserError(f"invalid download url {url!r} ({e}); use an http(s):// or file:// url") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets or a short read mid-stream, a full disk
        raise UserError(
            f"download of {url} to {dest} failed ({type(e).__name__}: {e}); run the same command again "
            f"to restart it, or {_no_network_hint(dest)}"
        ) from None
    finally:
        part.unlink(missing_ok=True)  # only present if something went wrong; never trusted later anyway
    return dest


def new_hash(algo: str) -> hashlib._Hash:
    """A hashlib object for `algo` ("md5", "sha1", ...), or a UserError naming the bad config value."""
    try:
        return hashlib.new(algo)
    except (ValueError, TypeError):
        raise UserError(f"unknown dataset.checksum_algo {algo!r}; use md5 or sha1 (any hashlib name)") from None


def file_digest(path: str | Path, algo: str) -> str:
    """Hex digest of a file, read in chunks so a 100 MB corpus never sits in memory twice."""
    digest = new_hash(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def set_aside(path: Path) -> Path:
    """Rename a file that failed verification to `<name>.bad` so it is kept for inspection but never used again."""
    bad = path.with_name(path.name + ".bad")
    shutil.move(path, bad)
    return bad


def verify_bytes(data: bytes, origin: Path, *, num_bytes: int, checksum_algo: str, checksum: str) -> None:
    """Check size then checksum of a corpus; on failure move `origin` aside to `.bad` and raise a UserError.

    Size is checked first because it is free and tells a truncated file apart from a different one.
    """
    if len(data) != num_bytes:
        bad = set_aside(origin)
        raise UserError(
            f"{origin.name} holds {len(data):,} bytes of corpus, expected {num_bytes:,} "
            f"(dataset.num_bytes); moved it aside to {bad} and will not use it; download it again or "
            f"fix dataset.num_bytes"
        )
    actual = hashlib.new(checksum_algo, data).hexdigest()
    if actual != str(checksum).lower():
        bad = set_aside(origin)
        raise UserError(
            f"{checksum_algo} checksum mismatch for {origin.name}: got {actual}, expected {checksum} "
            f"(dataset.checksum); moved it aside to {bad} and will not use it; download it again or "
            f"fix dataset.checksum"
        )


def read_archive_member(archive: Path, member: str) -> bytes:
    """The bytes of `member` inside zip `archive`; a broken or wrong archive is moved aside to `.bad`."""
    try:
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                bad = set_aside(archive)
                raise UserError(
                    f"archive {archive.name} has no member {member!r} (it has {zf.namelist()[:5]}); "
                    f"moved it aside to {bad}; fix dataset.archive_member or dataset.url"
                )
            return zf.read(member)  # zipfile checks the member's CRC-32 while reading
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        bad = set_aside(archive)
        raise UserError(
            f"{archive.name} is not a valid zip archive ({e}); moved it aside to {bad}; download it again"
        ) from None
    except PermissionError as e:
        raise UserError(f"cannot read {archive} ({e.strerror}); fix its permissions") from None


def fetch_corpus_bytes(
    data_dir: Path,
    *,
    url: str,
    archive_member: str,
    checksum_algo: str,
    checksum: str,
    num_bytes: int,
    progress: bool = True,
) -> tuple[bytes, str]:
    """The verified bytes of a zipped corpus and a one-line description of where they came from.

    Looks, in order, for the unzipped member in `data_dir` (a user may have placed it), then the archive, and only
    then downloads the archive. Whatever fails verification is moved aside to `.bad`, never silently reused.
    """
    new_hash(checksum_algo)  # reject a bad algorithm name before touching the network
    unzipped = data_dir / archive_member
    if unzipped.is_file():
        data = _read_file(unzipped)
        verify_bytes(data, unzipped, num_bytes=num_bytes, checksum_algo=checksum_algo, checksum=checksum)
        return data, f"{unzipped} (placed by hand, {checksum_algo} {checksum})"
    archive = data_dir / archive_name(url)
    origin = f"{archive} (already present)"
    if not archive.is_file():
        download(url, archive, progress=progress)
        origin = f"{archive} (downloaded from {url})"
    data = read_archive_member(archive, archive_member)
    verify_bytes(data, archive, num_bytes=num_bytes, checksum_algo=checksum_algo, checksum=checksum)
    return data, f"{origin} member {archive_member!r}, {checksum_algo} {checksum}"


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); fix its permissions or remove it") from None
