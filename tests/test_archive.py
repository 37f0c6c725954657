"""tasks/archive.py: vetted extraction (nothing outside the destination, caps) and checksummed downloads."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from tasks.archive import ArchiveError, Caps, download, extract_archive, safe_name

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # content does not matter to the extractor


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _zip(path: Path, members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _everything(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture
def box(tmp_path) -> Path:
    """A folder that holds the archive and the destination: nothing may appear in it beyond those."""
    (tmp_path / "box").mkdir()
    return tmp_path / "box"


def test_good_tar_gz_extracts_everything(box):
    archive = _tar(box / "a.tar.gz", [(_file("cat/1.png"), PNG), (_file("dog/2.png"), PNG + b"x")], "w:gz")
    n = extract_archive(archive, box / "out")
    assert n == 2
    assert (box / "out" / "dog" / "2.png").read_bytes() == PNG + b"x"


@pytest.mark.parametrize("name", ["../evil.png", "cat/../../evil.png", "/tmp/evil.png", "..\\evil.png"])
def test_path_traversal_tar_is_rejected_before_anything_is_written(box, name):
    archive = _tar(box / "a.tar", [(_file("cat/1.png"), PNG), (_file(name), PNG)])
    with pytest.raises(ArchiveError, match="absolute path|escapes the destination"):
        extract_archive(archive, box / "out")
    assert _everything(box) == ["a.tar", "out"]  # no member written, not even the good one
    assert not Path("/tmp/evil.png").exists()


@pytest.mark.parametrize("name", ["../evil.png", "cat/../../evil.png", "/abs/evil.png"])
def test_path_traversal_zip_is_rejected_before_anything_is_written(box, name):
    archive = box / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat/1.png", PNG)
        zf.writestr(zipfile.ZipInfo(name), PNG)  # ZipInfo keeps the name as given
    with pytest.raises(ArchiveError, match="absolute path|escapes the destination"):
        extract_archive(archive, box / "out")
    assert _everything(box) == ["a.zip", "out"]


@pytest.mark.parametrize("link, match", [
    (lambda: _link("cat/evil.png", "../../etc/passwd", tarfile.SYMTYPE), "outside"),
    (lambda: _link("cat/evil.png", "/etc/passwd", tarfile.SYMTYPE), "absolute"),
    (lambda: _link("cat/hard.png", "cat/1.png", tarfile.LNKTYPE), "hard link"),
    (lambda: _link("cat/dev", "", tarfile.CHRTYPE), "device"),
    (lambda: _link("cat/fifo", "", tarfile.FIFOTYPE), "device or FIFO"),
])
def test_dangerous_tar_members_reject_the_whole_archive(box, link, match):
    archive = _tar(box / "a.tar", [(_file("cat/1.png"), PNG), (link(), None)])
    with pytest.raises(ArchiveError, match=match):
        extract_archive(archive, box / "out")
    assert _everything(box) == ["a.tar", "out"]


def test_zip_symlink_pointing_outside_is_rejected(box):
    archive = box / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat/1.png", PNG)
        info = zipfile.ZipInfo("cat/evil.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "../../secret")
    with pytest.raises(ArchiveError, match="outside"):
        extract_archive(archive, box / "out")
    assert _everything(box) == ["a.zip", "out"]


def test_symlink_inside_the_archive_becomes_a_copy(box):
    archive = _tar(box / "a.tar", [(_file("cat/1.png"), PNG), (_link("dog/same.png", "../cat/1.png", tarfile.SYMTYPE),
                                                                None)])
    assert extract_archive(archive, box / "out") == 2
    copy = box / "out" / "dog" / "same.png"
    assert copy.is_file() and not copy.is_symlink() and copy.read_bytes() == PNG


def test_too_many_members_is_rejected(box):
    archive = _tar(box / "a.tar", [(_file(f"cat/{i}.png"), PNG) for i in range(6)])
    with pytest.raises(ArchiveError, match="max_members"):
        extract_archive(archive, box / "out", caps=Caps(max_members=5))
    assert _everything(box) == ["a.tar", "out"]
    assert extract_archive(archive, box / "ok", caps=Caps(max_members=6)) == 6


def test_oversized_archive_is_rejected(box):
    archive = _tar(box / "a.tar", [(_file("cat/big.png"), PNG * 2000)])
    with pytest.raises(ArchiveError, match="max_total_bytes"):
        extract_archive(archive, box / "out", caps=Caps(max_total_bytes=100_000))
    assert _everything(box) == ["a.tar", "out"]


def test_compression_bomb_is_rejected_by_ratio(box):
    archive = _zip(box / "bomb.zip", {"cat/zeros.png": b"\0" * (4 << 20)})
    assert archive.stat().st_size < 40_000
    with pytest.raises(ArchiveError, match="max_compression_ratio|zip bomb"):
        extract_archive(archive, box / "out", caps=Caps(max_compression_ratio=100))
    assert _everything(box) == ["bomb.zip", "out"]


def test_gzip_tar_bomb_is_rejected_by_ratio(box):
    archive = _tar(box / "bomb.tar.gz", [(_file("cat/zeros.png"), b"\0" * (4 << 20))], "w:gz")
    with pytest.raises(ArchiveError, match="max_compression_ratio"):
        extract_archive(archive, box / "out", caps=Caps(max_compression_ratio=100))


def test_zip_header_that_understates_the_size_is_caught_while_streaming(box):
    data = bytes(range(256)) * 4096  # 1 MiB, declared as 100 bytes below
    archive = _zip(box / "liar.zip", {"cat/a.png": data}, compression=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    true_size = len(data).to_bytes(4, "little")
    patched = raw.replace(true_size, (100).to_bytes(4, "little"))
    assert patched != raw
    archive.write_bytes(bytes(patched))
    with pytest.raises(ArchiveError):
        extract_archive(archive, box / "out")


def test_duplicate_member_is_rejected(box):
    archive = _tar(box / "a.tar", [(_file("cat/1.png"), PNG), (_file("cat/1.png"), PNG + b"2")])
    with pytest.raises(ArchiveError, match="appears twice"):
        extract_archive(archive, box / "out")


def test_corrupt_archive_is_a_clear_error(box):
    archive = box / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 10)
    with pytest.raises(ArchiveError, match="broken.tar.gz"):
        extract_archive(archive, box / "out")


def test_non_utf8_member_name_is_made_readable(box):
    archive = box / "a.tar"
    with tarfile.open(archive, "w", encoding="latin-1", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("cat/caf\xe9.png")
        info.size = len(PNG)
        tar.addfile(info, io.BytesIO(PNG))
    # read back as UTF-8 (the default): the \xe9 byte is not valid UTF-8
    assert extract_archive(archive, box / "out") == 1
    (name,) = [p.name for p in (box / "out" / "cat").iterdir()]
    name.encode("utf-8")  # valid UTF-8 now
    assert name == "caf\\xe9.png"


def test_safe_name_keeps_valid_names():
    assert safe_name("été.png") == "été.png"
    assert safe_name(b"caf\xe9.png".decode("utf-8", "surrogateescape")) == "caf\\xe9.png"


# --- download -----------------------------------------------------------------------------------------

class _Response(io.BytesIO):
    def __init__(self, data: bytes, *, fail_after: int | None = None, length: int | None = None):
        super().__init__(data)
        self.fail_after = fail_after
        self.headers = {"Content-Length": str(length if length is not None else len(data))}

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("peer went away")
        return super().read(min(n, 1000) if n and n > 0 else 1000)


def test_download_checks_the_sha256(tmp_path):
    data = b"archive bytes" * 100
    good = hashlib.sha256(data).hexdigest()
    dest = download("https://example.invalid/a.zip", tmp_path / "a.zip", sha256=good, max_bytes=10**6,
                    fetch=lambda url: _Response(data))
    assert dest.read_bytes() == data
    with pytest.raises(ArchiveError, match="sha256 mismatch") as refused:
        download("https://example.invalid/a.zip", tmp_path / "b.zip", sha256="0" * 64, max_bytes=10**6,
                 fetch=lambda url: _Response(data))
    assert not (tmp_path / "b.zip").exists()
    assert not refused.value.retryable  # the same bytes would come again


@pytest.mark.parametrize("response, max_bytes, error, retryable", [
    (dict(fail_after=2000), 10**6, "download failed.*peer went away", True),  # connection dropped mid-body
    (dict(length=9000), 10**6, "interrupted", True),  # fewer bytes than Content-Length promised
    ({}, 3000, "max_total_bytes", False),  # over the byte cap: aborted while streaming
])
def test_a_failed_download_is_named_and_keeps_nothing(tmp_path, response, max_bytes, error, retryable):
    data = b"x" * 5000
    with pytest.raises(ArchiveError, match=error) as failed:
        download("https://example.invalid/a.zip", tmp_path / "a.zip", sha256=hashlib.sha256(data).hexdigest(),
                 max_bytes=max_bytes, fetch=lambda url: _Response(data, **response))
    assert not (tmp_path / "a.zip").exists()
    assert failed.value.retryable is retryable


def test_an_http_client_error_is_not_worth_retrying_and_a_server_error_is(tmp_path):
    import urllib.error

    def status(code: int):
        def fetch(url):
            raise urllib.error.HTTPError(url, code, "nope", {}, None)
        return fetch

    for code, retryable in ((404, False), (503, True)):
        with pytest.raises(ArchiveError, match=f"HTTP Error {code}") as failed:
            download("https://example.invalid/a.zip", tmp_path / "a.zip", sha256="0" * 64, max_bytes=10,
                     fetch=status(code))
        assert failed.value.retryable is retryable


def test_download_refuses_other_schemes(tmp_path):
    with pytest.raises(ArchiveError, match="http"):
        download("file:///etc/passwd", tmp_path / "a", sha256="0" * 64, max_bytes=10)
