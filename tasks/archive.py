"""Archive and download safety: checked extraction of .zip/.tar(.gz) and checksummed http(s) downloads.

Every member is vetted before a single byte is written: a path that escapes the destination, a link
pointing outside it, a hard link, a device file, or a cap exceeded rejects the whole archive. Bytes
are counted while streaming (headers are not trusted), and callers extract into a staging folder
that is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import hashlib
import posixpath
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_CHUNK = 1 << 20


class ArchiveError(RuntimeError):
    """The archive or download is refused; the message names the file, the member and the reason. `retryable`:
    a download that broke off or could not connect, which trying again may fix (not a checksum or a cap)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Caps:
    """Limits from params.yaml (ingest.max_members, max_total_bytes, max_compression_ratio)."""

    max_members: int = 1_000_000
    max_total_bytes: int = 50 * 2**30
    max_compression_ratio: float = 100.0


@dataclass(frozen=True)
class _Member:
    name: str                  # normalised relative POSIX path
    kind: str                  # "file", "dir" or "symlink"
    size: int                  # declared size (files)
    link_target: str = ""      # normalised relative target (symlinks)
    handle: object = None      # TarInfo or ZipInfo


def is_archive(path: str | Path) -> bool:
    """True when the name ends like an archive this module extracts."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def safe_name(name: str) -> str:
    """A name that is valid UTF-8: undecodable bytes (surrogate escapes) become visible `\\xNN` text."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _normalise(archive: Path, raw: str) -> str:
    """A member name as a safe relative POSIX path, or ArchiveError saying why not."""
    name = raw.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive}: member {raw!r} has an absolute path; archive rejected, nothing written")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{archive}: member {raw!r} escapes the destination (..); archive rejected, "
                           "nothing written")
    if not parts:
        return ""
    return "/".join(safe_name(p) for p in parts)


def _link_target(archive: Path, member: str, target: str) -> str:
    """A symlink's target relative to the archive root, or ArchiveError when it points outside."""
    if target.startswith("/"):
        raise ArchiveError(f"{archive}: member {member!r} is a link to the absolute path {target!r}; "
                           "archive rejected, nothing written")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(member), target))
    if joined == ".." or joined.startswith("../"):
        raise ArchiveError(f"{archive}: member {member!r} is a link pointing outside the archive ({target!r}); "
                           "archive rejected, nothing written")
    return joined


def _tar_members(archive: Path, tar: tarfile.TarFile) -> Iterator[_Member]:
    for info in tar:
        name = _normalise(archive, info.name)
        if info.islnk():
            raise ArchiveError(f"{archive}: member {info.name!r} is a hard link; archive rejected, nothing written")
        if info.ischr() or info.isblk() or info.isfifo() or info.isdev():
            raise ArchiveError(f"{archive}: member {info.name!r} is a device or FIFO; archive rejected, "
                               "nothing written")
        if info.issym():
            yield _Member(name, "symlink", 0, _link_target(archive, name, info.linkname), info)
        elif info.isdir():
            yield _Member(name, "dir", 0, handle=info)
        elif info.isfile():
            yield _Member(name, "file", info.size, handle=info)
        else:
            raise ArchiveError(f"{archive}: member {info.name!r} has an unsupported type; archive rejected")


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():
        name = _normalise(archive, info.filename)
        unix_mode = info.external_attr >> 16
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{archive}: member {info.filename!r} is encrypted; archive rejected")
        if stat.S_ISLNK(unix_mode):
            target = zf.read(info)[:4096].decode("utf-8", "surrogateescape")
            yield _Member(name, "symlink", 0, _link_target(archive, name, target), info)
        elif stat.S_ISCHR(unix_mode) or stat.S_ISBLK(unix_mode) or stat.S_ISFIFO(unix_mode):
            raise ArchiveError(f"{archive}: member {info.filename!r} is a device or FIFO; archive rejected")
        elif info.is_dir():
            yield _Member(name, "dir", 0, handle=info)
        else:
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > _CHUNK and ratio > 1000:
                raise ArchiveError(f"{archive}: member {info.filename!r} expands {ratio:.0f}x "
                                   "(a zip bomb); archive rejected")
            yield _Member(name, "file", info.file_size, handle=info)


def _vet(archive: Path, members: list[_Member], caps: Caps) -> None:
    """Whole-archive checks before anything is written."""
    if len(members) > caps.max_members:
        raise ArchiveError(f"{archive}: {len(members):,} members exceed ingest.max_members "
                           f"({caps.max_members:,}); archive rejected, nothing written")
    seen: dict[str, str] = {}
    for m in members:
        if m.name and m.name in seen and not (m.kind == seen[m.name] == "dir"):
            raise ArchiveError(f"{archive}: member {m.name!r} appears twice; archive rejected, nothing written")
        seen[m.name] = m.kind
    declared = sum(m.size for m in members)
    _check_totals(archive, declared, caps, "declared")


def _check_totals(archive: Path, total: int, caps: Caps, how: str) -> None:
    if total > caps.max_total_bytes:
        raise ArchiveError(f"{archive}: {how} uncompressed size {total:,} bytes exceeds ingest.max_total_bytes "
                           f"({caps.max_total_bytes:,}); archive rejected, nothing kept")
    size = max(archive.stat().st_size, 1)
    if total / size > caps.max_compression_ratio and total > _CHUNK:
        raise ArchiveError(f"{archive}: {how} uncompressed size is {total / size:.0f}x the archive "
                           f"(ingest.max_compression_ratio {caps.max_compression_ratio:g}); "
                           "archive rejected as a decompression bomb, nothing kept")


def _stream(src: IO[bytes], dest: Path, *, limit: int, written: list[int], archive: Path, caps: Caps,
            member: str) -> None:
    """Copy src to dest counting real bytes; abort as soon as a member or the total passes its cap."""
    count = 0
    with open(dest, "xb") as out:
        for block in iter(lambda: src.read(_CHUNK), b""):
            count += len(block)
            written[0] += len(block)
            if count > limit:
                raise ArchiveError(f"{archive}: member {member!r} is longer than its header says; archive rejected")
            _check_totals(archive, written[0], caps, "actual")
            out.write(block)


def extract_archive(archive: Path, dest: Path, *, caps: Caps = Caps()) -> int:
    """Extract a vetted archive into dest (an empty staging folder); returns the number of files written."""
    archive = Path(archive)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    dest.mkdir(parents=True, exist_ok=True)
    written = [0]
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = list(_zip_members(archive, zf))
            _vet(archive, members, caps)
            opener: Callable[[_Member], IO[bytes]] = lambda m: zf.open(m.handle)  # noqa: E731
            return _write(archive, members, dest, opener, written, caps)
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise ArchiveError(f"{archive}: not a readable zip or tar archive ({exc})") from None
    with tar:
        try:
            members = list(_tar_members(archive, tar))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError(f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from None
        _vet(archive, members, caps)

        def opener(m: _Member) -> IO[bytes]:
            fh = tar.extractfile(m.handle)
            if fh is None:
                raise ArchiveError(f"{archive}: member {m.name!r} cannot be read")
            return fh

        return _write(archive, members, dest, opener, written, caps)


def _write(archive: Path, members: list[_Member], dest: Path, opener: Callable[[_Member], IO[bytes]],
           written: list[int], caps: Caps) -> int:
    files = {m.name for m in members if m.kind == "file"}
    n = 0
    for m in members:
        if not m.name:
            continue
        target = dest / m.name
        if m.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        if m.kind != "file":
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with opener(m) as src:
                _stream(src, target, limit=m.size, written=written, archive=archive, caps=caps, member=m.name)
        except ArchiveError:
            raise
        except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as exc:
            raise ArchiveError(f"{archive}: member {m.name!r} cannot be extracted "
                               f"({type(exc).__name__}: {exc}); nothing kept") from None
        n += 1
    # Links inside the archive become copies of their targets (like a folder source's inner symlinks).
    for m in members:
        if m.kind == "symlink":
            if m.link_target not in files:
                raise ArchiveError(f"{archive}: link {m.name!r} -> {m.link_target!r} does not point to a file "
                                   "in the archive; archive rejected, nothing kept")
            (dest / m.name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest / m.link_target, dest / m.name)
            n += 1
    return n


def _urllib_fetch(url: str) -> IO[bytes]:
    import urllib.request

    return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (http(s) only, checked by the caller)


def download(url: str, dest: Path, *, sha256: str, max_bytes: int,
             fetch: Callable[[str], IO[bytes]] = _urllib_fetch) -> Path:
    """Stream url to dest, counting bytes against max_bytes; the sha256 must match or dest is removed."""
    if not url.startswith(("http://", "https://")):
        raise ArchiveError(f"{url}: only http(s) URLs are downloaded")
    digest = hashlib.sha256()
    count = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fetch(url) as response, open(dest, "wb") as out:
            expected = getattr(response, "headers", {}).get("Content-Length") if hasattr(response, "headers") else None
            for block in iter(lambda: response.read(_CHUNK), b""):
                count += len(block)
                if count > max_bytes:
                    raise ArchiveError(f"{url}: download passed ingest.max_total_bytes ({max_bytes:,}); aborted")
                digest.update(block)
                out.write(block)
        if expected is not None and int(expected) != count:
            raise ArchiveError(f"{url}: download interrupted ({count:,} of {int(expected):,} bytes)", retryable=True)
        if digest.hexdigest() != sha256.lower():
            raise ArchiveError(f"{url}: sha256 mismatch: got {digest.hexdigest()}, params say {sha256.lower()} "
                               "(ingest.sha256)")
    except ArchiveError:
        dest.unlink(missing_ok=True)
        raise
    except Exception as exc:  # network errors of every kind: nothing is kept
        dest.unlink(missing_ok=True)
        status = getattr(exc, "code", None)  # an HTTP error: 4xx will not change on a retry, 5xx may
        raise ArchiveError(f"{url}: download failed ({type(exc).__name__}: {exc})",
                           retryable=not (isinstance(status, int) and 400 <= status < 500)) from None
    return dest
