"""tasks/ingest.py: sources -> a class-per-folder copy, atomically, with a content hash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.ingest import IngestError, ingest, is_hidden
from tasks.io import sha256_file

REPO = Path(__file__).resolve().parent.parent


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones included) -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, dest_name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{dest_name}."))


# --- built-in sample --------------------------------------------------------------------------------

def test_sample_digits_is_1797_grayscale_pngs_in_10_classes_and_deterministic(tmp_path):
    first = ingest("sample:digits", tmp_path / "a")
    assert first.n_files == 1797
    assert sorted(first.classes) == [str(d) for d in range(10)]
    assert sum(first.classes.values()) == 1797
    assert first.rejected == []

    files = sorted((tmp_path / "a").rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [str(d) for d in range(10)]
    for path in files[::60]:
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.mode == "L"
            assert img.size == (32, 32)

    second = ingest("sample:digits", tmp_path / "b")
    assert second.content_hash == first.content_hash
    assert len(first.content_hash) == 64


def test_sample_size_changes_image_size_and_hash(tmp_path):
    small = ingest("sample:digits", tmp_path / "small", sample_size=8)
    with Image.open(next((tmp_path / "small" / "3").iterdir())) as img:
        assert img.size == (8, 8)
    default = ingest("sample:digits", tmp_path / "default")
    assert small.content_hash != default.content_hash


def test_unknown_sample_fails_and_leaves_no_dest(tmp_path):
    with pytest.raises(ValueError, match="unknown sample"):
        ingest("sample:cifar", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert _leftovers(tmp_path, "raw") == []


# --- folder source ------------------------------------------------------------------------------------

def test_folder_source_copies_class_folders(image_folder, tmp_path):
    dest = tmp_path / "raw"
    result = ingest(str(image_folder), dest)
    assert result.classes == {"cat": 12, "dog": 12, "fish": 12}
    assert result.n_files == 36
    assert result.rejected == []
    assert _snapshot(dest) == _snapshot(image_folder)
    assert result.source == str(image_folder)


def test_folder_content_hash_is_deterministic_and_location_independent(image_folder, tmp_path):
    a = ingest(str(image_folder), tmp_path / "a")
    b = ingest(str(image_folder), tmp_path / "b")
    assert a.content_hash == b.content_hash


def test_content_hash_is_the_tree_digest_of_the_copied_files_whether_hashed_while_copying_or_after(
        image_folder, tmp_path, monkeypatch):
    import tasks.ingest as ing
    from tasks.io import tree_digest

    copied = ingest(str(image_folder), tmp_path / "a")  # small files: hashed on the way through
    monkeypatch.setattr(ing, "_HASH_WHILE_COPYING", 0)  # every file "large": copied, then hashed from disk
    streamed = ingest(str(image_folder), tmp_path / "b")
    files = sorted(p for p in (tmp_path / "b").rglob("*") if p.is_file())
    expected = tree_digest((p.relative_to(tmp_path / "b").as_posix(), sha256_file(p)) for p in files)
    assert copied.content_hash == streamed.content_hash == expected
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b") == _snapshot(image_folder)
    assert copied.n_files == len(files) and sum(copied.classes.values()) == len(files)


def test_content_hash_changes_when_one_image_changes(image_folder, tmp_path):
    dest = tmp_path / "raw"
    before = ingest(str(image_folder), dest)
    target = image_folder / "dog" / "img_05.png"
    with Image.open(target) as img:
        arr = np.asarray(img).copy()
    arr[0, 0] = (int(arr[0, 0]) + 1) % 256
    Image.fromarray(arr, mode="L").save(target)

    after = ingest(str(image_folder), dest)
    assert after.content_hash != before.content_hash
    assert after.n_files == before.n_files
    assert (dest / "dog" / "img_05.png").read_bytes() == target.read_bytes()


def test_content_hash_changes_when_an_image_moves_class(image_folder, tmp_path):
    before = ingest(str(image_folder), tmp_path / "a")
    os.replace(image_folder / "dog" / "img_05.png", image_folder / "cat" / "img_99.png")
    after = ingest(str(image_folder), tmp_path / "b")
    assert after.content_hash != before.content_hash
    assert after.classes == {"cat": 13, "dog": 11, "fish": 12}


def test_reingest_replaces_dest_and_drops_removed_files(image_folder, tmp_path):
    dest = tmp_path / "raw"
    ingest(str(image_folder), dest)
    (image_folder / "fish" / "img_00.png").unlink()
    result = ingest(str(image_folder), dest)
    assert result.classes["fish"] == 11
    assert not (dest / "fish" / "img_00.png").exists()
    assert _leftovers(tmp_path, "raw") == []


def test_hidden_files_and_folders_are_ignored_and_never_a_class(image_folder, tmp_path):
    (image_folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (image_folder / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (image_folder / "cat" / "._img_00.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (image_folder / "dog" / "Thumbs.db").write_bytes(b"thumbs")
    checkpoints = image_folder / "dog" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    (checkpoints / "img_00-checkpoint.png").write_bytes((image_folder / "dog" / "img_00.png").read_bytes())
    macosx = image_folder / "__MACOSX" / "cat"
    macosx.mkdir(parents=True)
    (macosx / "._img_01.png").write_bytes(b"\0\5\26\7 AppleDouble")
    hidden_class = image_folder / ".trash"
    hidden_class.mkdir()
    (hidden_class / "old.png").write_bytes((image_folder / "cat" / "img_01.png").read_bytes())

    dest = tmp_path / "raw"
    result = ingest(str(image_folder), dest)
    assert result.classes == {"cat": 12, "dog": 12, "fish": 12}
    assert result.n_files == 36
    copied = _snapshot(dest)
    assert all(not any(part.startswith(".") or part in ("__MACOSX", "Thumbs.db") for part in rel.split("/"))
               for rel in copied), sorted(copied)
    assert sorted(p.name for p in dest.iterdir()) == ["cat", "dog", "fish"]


@pytest.mark.parametrize("rel, hidden", [
    ("cat/.DS_Store", True),
    (".ipynb_checkpoints/a.png", True),
    ("cat/.ipynb_checkpoints/a.png", True),
    ("__MACOSX/cat/._a.png", True),
    ("cat/a.png", False),
    ("cat/a.b.png", False),
])
def test_is_hidden(rel, hidden):
    assert is_hidden(Path(rel)) is hidden


def test_files_at_the_source_root_are_skipped_with_a_reason(image_folder, tmp_path):
    (image_folder / "README.txt").write_text("my photos")
    (image_folder / "stray.png").write_bytes((image_folder / "cat" / "img_00.png").read_bytes())
    result = ingest(str(image_folder), tmp_path / "raw")
    skipped = {item["path"]: item["reason"] for item in result.rejected}
    assert set(skipped) == {"README.txt", "stray.png"}
    assert all("root" in reason for reason in skipped.values())
    assert result.n_files == 36
    assert not (tmp_path / "raw" / "stray.png").exists()
    assert not (tmp_path / "raw" / "README.txt").exists()


def test_symlinked_file_resolving_outside_the_source_is_skipped_with_a_reason(image_folder, tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("L", (16, 16), 7).save(outside)
    (image_folder / "cat" / "link.png").symlink_to(outside)
    # a symlink that stays inside the source is ordinary data
    (image_folder / "dog" / "inner.png").symlink_to(image_folder / "fish" / "img_00.png")

    dest = tmp_path / "raw"
    result = ingest(str(image_folder), dest)
    assert result.rejected == [{"path": "cat/link.png", "label": "cat", "reason": "symlink resolves outside the source"}]
    assert not (dest / "cat" / "link.png").exists()
    assert result.classes == {"cat": 12, "dog": 13, "fish": 12}
    copied = dest / "dog" / "inner.png"
    assert copied.is_file() and not copied.is_symlink()
    assert sha256_file(copied) == sha256_file(image_folder / "fish" / "img_00.png")


def test_symlinked_class_folder_outside_the_source_is_reported(image_folder, tmp_path):
    """A whole class that is a symlink to a folder elsewhere must not vanish silently."""
    elsewhere = tmp_path / "elsewhere" / "bird"
    elsewhere.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (16, 16), i).save(elsewhere / f"{i}.png")
    (image_folder / "bird").symlink_to(elsewhere, target_is_directory=True)

    result = ingest(str(image_folder), tmp_path / "raw")
    assert "bird" not in result.classes  # not followed outside the source ...
    assert any(item["path"].split("/")[0] == "bird" for item in result.rejected), result.rejected  # ... but reported


# --- failures leave dest untouched --------------------------------------------------------------------

@pytest.fixture
def existing_dest(tmp_path) -> Path:
    dest = tmp_path / "raw"
    (dest / "cat").mkdir(parents=True)
    (dest / "cat" / "keep.png").write_bytes(b"previous good output")
    (dest / ".hidden").write_bytes(b"also kept")
    return dest


def test_missing_source_raises_and_leaves_dest_untouched(tmp_path, existing_dest):
    before = _snapshot(existing_dest)
    with pytest.raises(IngestError) as info:
        ingest(str(tmp_path / "does-not-exist"), existing_dest)
    assert "does-not-exist" in str(info.value)
    assert _snapshot(existing_dest) == before
    assert _leftovers(tmp_path, "raw") == []


def test_source_that_is_a_file_raises(tmp_path, existing_dest):
    archive = tmp_path / "notes.txt"
    archive.write_text("not a folder")
    before = _snapshot(existing_dest)
    with pytest.raises(IngestError):
        ingest(str(archive), existing_dest)
    assert _snapshot(existing_dest) == before
    assert _leftovers(tmp_path, "raw") == []


@pytest.mark.parametrize("layout", ["empty", "empty_class_folders", "only_hidden", "only_root_files"])
def test_empty_source_raises_and_leaves_dest_untouched(tmp_path, existing_dest, layout):
    src = tmp_path / "src"
    src.mkdir()
    if layout == "empty_class_folders":
        (src / "cat").mkdir()
        (src / "dog").mkdir()
    elif layout == "only_hidden":
        (src / ".DS_Store").write_bytes(b"x")
        (src / "cat").mkdir()
        (src / "cat" / ".DS_Store").write_bytes(b"x")
    elif layout == "only_root_files":
        (src / "a.png").write_bytes(b"x")
    before = _snapshot(existing_dest)
    with pytest.raises(IngestError, match="no files"):
        ingest(str(src), existing_dest)
    assert _snapshot(existing_dest) == before
    assert _leftovers(tmp_path, "raw") == []


# --- pre-split folders -------------------------------------------------------------------------------

def _presplit(root: Path, names=("train", "valid", "test"), per_class=4) -> Path:
    from tests.conftest import write_image_folder

    for k, name in enumerate(names):
        write_image_folder(root / name, classes=("cat", "dog"), per_class=per_class, seed=k + 1)
    return root


def test_presplit_folder_is_kept_as_given_with_canonical_split_names(tmp_path):
    src = _presplit(tmp_path / "src")
    (src / "train" / "stray.png").write_bytes((src / "train" / "cat" / "img_00.png").read_bytes())
    result = ingest(str(src), tmp_path / "raw")
    assert result.layout == "presplit"
    assert result.splits == {"test": 8, "train": 8, "val": 8}
    assert result.classes == {"cat": 12, "dog": 12}
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["test", "train", "val"]
    assert (tmp_path / "raw" / "val" / "dog" / "img_03.png").read_bytes() == (src / "valid" / "dog" / "img_03.png").read_bytes()
    assert result.rejected == [{"path": "train/stray.png", "label": "",
                                "reason": "file directly in train/ belongs to no class folder"}]


def test_two_folders_for_the_same_split_are_an_error(tmp_path, existing_dest):
    src = _presplit(tmp_path / "src", names=("train", "val", "validation"))
    before = _snapshot(existing_dest)
    with pytest.raises(IngestError, match="same split"):
        ingest(str(src), existing_dest)
    assert _snapshot(existing_dest) == before


def test_a_class_named_test_beside_other_classes_is_just_a_class(make_image_folder, tmp_path):
    src = make_image_folder("src", classes=("test", "cat"), per_class=3)
    result = ingest(str(src), tmp_path / "raw")
    assert result.layout == "classes" and result.classes == {"cat": 3, "test": 3}


# --- archives ------------------------------------------------------------------------------------------

def _zip_folder(folder: Path, archive: Path, *, prefix: str = "") -> Path:
    import zipfile

    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def _tar_folder(folder: Path, archive: Path) -> Path:
    import tarfile

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="pets")  # one wrapper folder, as people usually pack
    return archive


@pytest.mark.parametrize("packer", ["zip", "tar.gz"])
def test_archive_source_lands_like_the_folder_and_is_deterministic(image_folder, tmp_path, packer):
    archive = (_zip_folder(image_folder, tmp_path / "pets.zip", prefix="pets/") if packer == "zip"
               else _tar_folder(image_folder, tmp_path / "pets.tar.gz"))
    from_folder = ingest(str(image_folder), tmp_path / "a")
    from_archive = ingest(str(archive), tmp_path / "b")
    assert from_archive.kind == "archive"
    assert from_archive.content_hash == from_folder.content_hash
    assert from_archive.source_sha256 == sha256_file(archive)
    assert _snapshot(tmp_path / "b") == _snapshot(tmp_path / "a")
    again = ingest(str(archive), tmp_path / "b")
    assert again.content_hash == from_archive.content_hash
    assert _leftovers(tmp_path, "b") == []


def test_path_traversal_archive_leaves_dest_untouched(tmp_path, existing_dest):
    import io
    import tarfile

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("cat/ok.png", "../../escaped.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    before = _snapshot(existing_dest)
    with pytest.raises(IngestError, match=r"escapes the destination"):
        ingest(str(archive), existing_dest)
    assert _snapshot(existing_dest) == before
    assert not (tmp_path.parent / "escaped.png").exists() and not (tmp_path / "escaped.png").exists()
    assert _leftovers(tmp_path, "raw") == []


def test_oversized_archive_leaves_dest_untouched(image_folder, tmp_path, existing_dest):
    from tasks.archive import Caps

    archive = _zip_folder(image_folder, tmp_path / "pets.zip")
    before = _snapshot(existing_dest)
    with pytest.raises(IngestError, match="max_total_bytes"):
        ingest(str(archive), existing_dest, caps=Caps(max_total_bytes=1000))
    assert _snapshot(existing_dest) == before
    assert _leftovers(tmp_path, "raw") == []


def test_archive_checksum_in_params_must_match(image_folder, tmp_path, existing_dest):
    archive = _zip_folder(image_folder, tmp_path / "pets.zip")
    with pytest.raises(IngestError, match="does not match ingest.sha256"):
        ingest(str(archive), existing_dest, sha256="0" * 64)
    assert ingest(str(archive), tmp_path / "ok", sha256=sha256_file(archive)).n_files == 36


# --- URL ----------------------------------------------------------------------------------------------

@pytest.fixture
def http_dir(tmp_path):
    """A local http.server on 127.0.0.1 serving tmp_path/www (no network beyond loopback)."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_source_downloads_checks_and_extracts(image_folder, tmp_path, http_dir):
    www, base = http_dir
    archive = _zip_folder(image_folder, www / "pets.zip", prefix="pets/")
    digest = sha256_file(archive)
    result = ingest(f"{base}/pets.zip", tmp_path / "raw", sha256=digest)
    assert result.kind == "url" and result.source_sha256 == digest
    assert result.classes == {"cat": 12, "dog": 12, "fish": 12}
    assert result.content_hash == ingest(str(image_folder), tmp_path / "direct").content_hash
    assert _leftovers(tmp_path, "raw") == []


def test_url_with_wrong_checksum_or_missing_file_leaves_dest_untouched(image_folder, tmp_path, http_dir,
                                                                       existing_dest):
    www, base = http_dir
    _zip_folder(image_folder, www / "pets.zip")
    before = _snapshot(existing_dest)
    with pytest.raises(IngestError, match="sha256 mismatch"):
        ingest(f"{base}/pets.zip", existing_dest, sha256="0" * 64)
    with pytest.raises(IngestError, match="404"):
        ingest(f"{base}/missing.zip", existing_dest, sha256="0" * 64)
    assert _snapshot(existing_dest) == before
    assert _leftovers(tmp_path, "raw") == []


def test_interrupted_url_download_leaves_dest_untouched(image_folder, tmp_path, existing_dest):
    import io

    data = _zip_folder(image_folder, tmp_path / "pets.zip").read_bytes()

    class Dropping(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > len(data) // 2:
                raise TimeoutError("read timed out")
            return super().read(4096)

    before = _snapshot(existing_dest)
    with pytest.raises(IngestError, match="timed out"):
        ingest("https://example.invalid/pets.zip", existing_dest, sha256=sha256_file(tmp_path / "pets.zip"),
               fetch=lambda url: Dropping(data))
    assert _snapshot(existing_dest) == before
    assert _leftovers(tmp_path, "raw") == []


# --- CSV manifest ------------------------------------------------------------------------------------------

def test_csv_manifest_source_copies_listed_files_and_reports_every_bad_row(image_folder, tmp_path):
    flat = tmp_path / "flat"
    (flat / "img").mkdir(parents=True)
    lines = ["path,label"]
    for i, src in enumerate(sorted(image_folder.rglob("*.png"))[:9]):
        (flat / "img" / f"{i}.png").write_bytes(src.read_bytes())
        lines.append(f"img/{i}.png,{src.parent.name}")
    (tmp_path / "secret.png").write_bytes(b"outside")
    lines += [
        "img/missing.png,cat",          # listed, not there
        "../secret.png,cat",            # escapes the CSV's folder
        "img/0.png,cat",                # listed twice (same label as its first row)
        "img/1.png,",                   # no label
        "img/2.png,.hidden",            # hidden label
    ]
    csv_path = flat / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    result = ingest(str(csv_path), tmp_path / "raw")
    assert result.kind == "csv" and result.layout == "classes"
    reasons = {item["path"]: item["reason"] for item in result.rejected}
    assert "not found" in reasons["img/missing.png (line 11)"]
    assert "escapes" in reasons["../secret.png (line 12)"]
    assert reasons["img/0.png (line 13)"] == "listed twice (first on line 2)"
    assert reasons["img/1.png (line 14)"] == "invalid or empty label ''"
    assert reasons["img/2.png (line 15)"] == "invalid or empty label '.hidden'"
    copied = _snapshot(tmp_path / "raw")
    assert all(rel.split("/")[1] == "img" for rel in copied)
    assert not any("secret" in rel for rel in copied)
    # every listed row is either copied or rejected with a reason
    assert result.n_files + len(result.rejected) == len(lines) - 1


def test_csv_label_conflict_rejects_both_rows(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.new("L", (16, 16), 3).save(folder / "a.png")
    Image.new("L", (16, 16), 9).save(folder / "b.png")
    (folder / "labels.csv").write_text("path,label\na.png,cat\na.png,dog\nb.png,dog\n")
    result = ingest(str(folder / "labels.csv"), tmp_path / "raw")
    assert result.classes == {"dog": 1}
    conflict = [r for r in result.rejected if r["path"].startswith("a.png")]
    assert len(conflict) == 2 and all("label conflict" in r["reason"] for r in conflict)


def test_csv_with_split_column_is_presplit(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    rows = ["path,label,split"]
    for i, split_name in enumerate(["train", "train", "validation", "test", "bogus"]):
        Image.new("L", (16, 16), i * 20).save(folder / f"{i}.png")
        rows.append(f"{i}.png,cat,{split_name}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    result = ingest(str(folder / "labels.csv"), tmp_path / "raw")
    assert result.layout == "presplit"
    assert result.splits == {"test": 1, "train": 2, "val": 1}
    assert [r["reason"] for r in result.rejected] == ["unknown split 'bogus' (use train, val or test)"]


def test_csv_without_required_columns_is_an_error(tmp_path, existing_dest):
    (tmp_path / "labels.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(IngestError, match="path,label"):
        ingest(str(tmp_path / "labels.csv"), existing_dest)


# --- odd files -------------------------------------------------------------------------------------------

def test_non_utf8_file_and_folder_names_are_renamed_readably_not_dropped(image_folder, tmp_path):
    raw_name = os.fsencode(image_folder / "cat") + b"/caf\xe9.png"
    with open(raw_name, "wb") as fh:
        fh.write((image_folder / "dog" / "img_00.png").read_bytes())
    os.mkdir(os.fsencode(image_folder) + b"/b\xfcrd")
    with open(os.fsencode(image_folder) + b"/b\xfcrd/x.png", "wb") as fh:
        fh.write((image_folder / "dog" / "img_01.png").read_bytes())
    result = ingest(str(image_folder), tmp_path / "raw")
    assert result.n_files == 38
    assert (tmp_path / "raw" / "cat" / "caf\\xe9.png").is_file()
    assert result.classes["b\\xfcrd"] == 1
    assert {r["to"] for r in result.renamed} == {"cat/caf\\xe9.png", "b\\xfcrd/x.png"}
    import json

    json.dumps(result.to_dict()).encode("utf-8")  # the record is plain UTF-8


@pytest.mark.parametrize("threads", [1, 4])
def test_a_readable_name_that_is_taken_is_rejected_and_the_rest_ingested(image_folder, tmp_path, monkeypatch, threads):
    """cat/caf\\xe9.png exists under that literal name and as the readable form of a non-UTF-8 name."""
    import tasks.ingest as ingest_mod

    monkeypatch.setattr(ingest_mod, "COPY_CHUNK", 2)  # enough files to copy with threads
    monkeypatch.setattr(ingest_mod, "COPY_THREADS", threads)
    literal = image_folder / "cat" / "caf\\xe9.png"
    literal.write_bytes((image_folder / "dog" / "img_00.png").read_bytes())
    with open(os.fsencode(image_folder / "cat") + b"/caf\xe9.png", "wb") as fh:
        fh.write((image_folder / "dog" / "img_01.png").read_bytes())
    result = ingest(str(image_folder), tmp_path / "raw")
    assert result.n_files == 37
    assert (tmp_path / "raw" / "cat" / "caf\\xe9.png").read_bytes() == literal.read_bytes()
    (rejected,) = result.rejected
    assert rejected["path"] == "cat/caf\\xe9.png" and "is taken" in rejected["reason"]


def test_a_name_a_renamed_file_took_first_is_rejected(tmp_path):
    """Sorted walks place the literal name first; in any other order the later file is still refused."""
    from tasks.ingest import _place, _Report

    report = _Report()
    renamed = _place(tmp_path, ["cat", "caf\udce9.png"], report, "cat/caf\udce9.png")
    assert renamed == str(tmp_path / "cat" / "caf\\xe9.png")
    assert _place(tmp_path, ["cat", "caf\\xe9.png"], report, "cat/caf\\xe9.png") is None
    (rejected,) = report.rejected
    assert rejected["path"] == "cat/caf\\xe9.png" and "a renamed file already took" in rejected["reason"]


def test_many_files_are_copied_by_threads_byte_for_byte_with_their_hashes(image_folder, tmp_path, monkeypatch):
    import tasks.ingest as ingest_mod
    from tasks.io import sha256_file, tree_digest

    monkeypatch.setattr(ingest_mod, "COPY_CHUNK", 3)  # 36 files: 12 chunks over 4 threads
    threaded = ingest(str(image_folder), tmp_path / "threaded")
    monkeypatch.setattr(ingest_mod, "COPY_THREADS", 1)
    serial = ingest(str(image_folder), tmp_path / "serial")
    assert threaded.content_hash == serial.content_hash == tree_digest(
        (f"{p.parent.name}/{p.name}", sha256_file(p)) for p in image_folder.rglob("*.png"))
    copied = sorted(p.relative_to(tmp_path / "threaded") for p in (tmp_path / "threaded").rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(image_folder) for p in image_folder.rglob("*") if p.is_file())
    for rel in copied:
        assert (tmp_path / "threaded" / rel).read_bytes() == (image_folder / rel).read_bytes()


def test_fifo_is_rejected_with_a_reason(image_folder, tmp_path):
    os.mkfifo(image_folder / "cat" / "pipe.png")
    result = ingest(str(image_folder), tmp_path / "raw")
    assert result.rejected == [{"path": "cat/pipe.png", "label": "cat",
                                "reason": "not a regular file (device, FIFO or socket)"}]
    assert result.n_files == 36


def test_hidden_entries_are_counted_as_ignored(image_folder, tmp_path):
    (image_folder / "cat" / ".DS_Store").write_bytes(b"x")
    (image_folder / ".ipynb_checkpoints").mkdir()
    result = ingest(str(image_folder), tmp_path / "raw")
    assert result.ignored == 2
    assert result.ignored_examples == [".ipynb_checkpoints", "cat/.DS_Store"]


def test_outputs_are_readable_by_others_like_any_file_the_user_writes(tmp_path):
    import os
    import stat

    from tasks.io import staging_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        staged = staging_dir(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE(staged.stat().st_mode) == 0o755


def _ingest_command(tmp_path: Path, **ingest: str) -> subprocess.CompletedProcess:
    """`python -m tasks.ingest` in a folder whose params.yaml has these ingest settings."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(ingest)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "-m", "tasks.ingest"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_stage_exits_with_the_not_retryable_code_when_trying_again_cannot_help(tmp_path):
    from tasks.ingest import NOT_RETRYABLE_EXIT

    res = _ingest_command(tmp_path, source=str(tmp_path / "nowhere"), watch=str(tmp_path / "nowhere"))
    assert res.returncode == NOT_RETRYABLE_EXIT and "nowhere" in res.stdout + res.stderr
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    res = _ingest_command(tmp_path, source=str(tmp_path / "empty"), watch=str(tmp_path / "empty"))
    assert res.returncode == NOT_RETRYABLE_EXIT and "no files found" in " ".join((res.stdout + res.stderr).split())
    assert not (tmp_path / "data" / "ingest.json").exists()


def test_a_failed_download_is_worth_retrying(tmp_path):
    """Nothing listens on port 9 here: the connection is refused at once (no network needed)."""
    res = _ingest_command(tmp_path, source="http://127.0.0.1:9/images.zip", sha256="0" * 64)
    assert res.returncode == 1 and "ingest failed" in res.stdout + res.stderr


@pytest.mark.slow
def test_a_failed_ingest_in_a_run_puts_the_previous_snapshot_back(tmp_path, monkeypatch):
    """DVC deletes a stage's outputs before its command runs: a source that became empty must not cost the last
    good data/raw in `imgclf run` (the README's promise; `dvc status` is clean again once the source is back).
    Under a bare `dvc repro` they are gone until `dvc checkout ingest`, as the README says."""
    from flows import early
    from project_helpers import VENV_BIN, copy_project, shapes_dataset
    from tasks.config import write_overrides

    images = shapes_dataset(tmp_path / "images", per_class=4)
    root, env = copy_project(tmp_path, {"ingest.source": str(images), "ingest.watch": str(images)})
    env = {**env, "PATH": f"{VENV_BIN}:{env['PATH']}"}  # `dvc` as a user runs it: from the activated venv
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(root)  # (as in a run: DVC resolves the stage name against the working folder)
    dvc = [sys.executable, "-m", "dvc"]
    assert early.stage_outcome(early.run_stage(str(root), "ingest")) == "ran"
    before = _snapshot(root / "data" / "raw")
    record = (root / "data" / "ingest.json").read_text()
    empty = tmp_path / "empty"
    (empty / "circle").mkdir(parents=True)  # a folder of class folders with no files in them
    write_overrides(root / "params.yaml", {"ingest.source": str(empty), "ingest.watch": str(empty)})

    failed = subprocess.run(dvc + ["repro", "ingest"], cwd=root, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "no files found" in " ".join((failed.stdout + failed.stderr).split())
    assert not (root / "data" / "raw").exists()  # bare DVC: deleted before the command ran
    from tasks.ingest import NOT_RETRYABLE_EXIT

    with pytest.raises(Exception) as raised:
        early.run_stage(str(root), "ingest")
    assert early.stage_command_exit(raised.value) == ("ingest", NOT_RETRYABLE_EXIT)  # the failure still reaches the flow
    assert _snapshot(root / "data" / "raw") == before and (root / "data" / "ingest.json").read_text() == record

    write_overrides(root / "params.yaml", {"ingest.source": str(images), "ingest.watch": str(images)})
    status = subprocess.run(dvc + ["status", "ingest"], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout


def test_putting_outputs_back_says_so_and_never_hides_the_stage_failure(capsys):
    from types import SimpleNamespace

    from flows import early

    def out(committed: bool, exists: bool) -> SimpleNamespace:
        return SimpleNamespace(hash_info="md5:abc" if committed else "", exists=exists)

    # pure decision: committed once, and DVC deleted at least one of them
    assert early.outputs_to_put_back([out(True, False), out(True, False)])
    assert early.outputs_to_put_back([out(True, True), out(True, False)])
    assert not early.outputs_to_put_back([out(True, True), out(True, True)])  # still there: maybe new data
    assert not early.outputs_to_put_back([out(False, False), out(True, False)])  # a first run: nothing committed
    assert not early.outputs_to_put_back([])

    class Repo:
        def __init__(self, outs: list[SimpleNamespace], error: Exception | None = None) -> None:
            self.outs, self.error, self.asked = outs, error, []
            self.stage = SimpleNamespace(load_one=lambda path, name: SimpleNamespace(outs=self.outs))

        def checkout(self, targets: list[str]) -> dict[str, list[str]]:
            self.asked.append(targets)
            if self.error:
                raise self.error
            return {"added": ["data/raw/"], "modified": [], "deleted": []}

    deleted = Repo([out(True, False), out(True, False)])
    early.put_back_outputs(deleted, "/p", "ingest")
    assert deleted.asked == [["/p/dvc.yaml:ingest"]] and "last good outputs are back" in capsys.readouterr().err
    intact = Repo([out(True, True), out(True, True)])  # DVC failed before deleting them, or after new data came
    early.put_back_outputs(intact, "/p", "ingest")
    assert intact.asked == [] and capsys.readouterr().err == ""
    early.put_back_outputs(Repo([out(True, False)], RuntimeError("cache object missing")), "/p", "ingest")
    said = " ".join(capsys.readouterr().err.split())  # reported, never raised
    assert "could not be put back (cache object missing)" in said and "dvc checkout ingest" in said
