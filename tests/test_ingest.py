"""tasks/ingest.py: sources -> a class-per-folder copy, atomically, with a content hash."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.ingest import IngestError, ingest, is_hidden
from tasks.io import sha256_file


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
