"""tasks/validate.py: per-image manifest, quarantine, Great Expectations contract, reports."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.validate import MANIFEST_COLUMNS, build_manifest, dataset_mode, inspect_image, validate

SUITE = Path(__file__).resolve().parent.parent / "expectations" / "manifest.json"


def _run(raw: Path, out: Path, *, labels=None, min_images_per_class=10, **kwargs):
    kwargs.setdefault("data_docs", False)  # Data Docs are tested on their own (they take a moment)
    return validate(raw, suite_path=SUITE, labels=labels, min_images_per_class=min_images_per_class,
                    manifest_path=out / "data" / "manifest.csv", report_dir=out / "reports" / "validation",
                    **kwargs)


def _png_bytes(size: int = 64, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def bad_files(image_folder) -> dict[str, str]:
    """Add three undecodable files to the cat class; return {relative path: kind}."""
    (image_folder / "cat" / "empty.png").write_bytes(b"")
    (image_folder / "cat" / "notes.png").write_text("this is text, not an image\n")
    whole = _png_bytes()
    (image_folder / "cat" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return {"cat/empty.png": "zero-byte", "cat/notes.png": "text", "cat/truncated.png": "truncated"}


# --- inspect_image / build_manifest ------------------------------------------------------------------

def test_good_png_is_accepted(image_folder):
    facts = inspect_image(image_folder / "cat" / "img_00.png")
    assert facts["decodable"] is True
    assert facts["format"] == "PNG"
    assert facts["mode"] == "L"
    assert (facts["width"], facts["height"]) == (16, 16)
    assert facts["reason"] == ""


def test_oversized_image_is_rejected_with_reason(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (200, 200)).save(path)
    facts = inspect_image(path, max_pixels=100 * 100)
    assert facts["decodable"] is False
    assert "pixel cap" in facts["reason"]


def test_build_manifest_rejects_broken_files_with_reasons(image_folder, bad_files):
    manifest = build_manifest(image_folder)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 36 + 3
    rows = manifest.set_index("path")
    for rel in bad_files:
        assert not rows.loc[rel, "accepted"], rel
        assert not rows.loc[rel, "decodable"], rel
        assert isinstance(rows.loc[rel, "reason"], str) and rows.loc[rel, "reason"].strip(), rel
        assert rows.loc[rel, "label"] == "cat"
    assert rows.loc["cat/empty.png", "bytes"] == 0
    # the truncated PNG still identifies as a PNG: it is the full decode that rejects it
    assert rows.loc["cat/truncated.png", "format"] == "PNG"
    good = manifest[~manifest["path"].isin(list(bad_files))]
    assert good["accepted"].all()
    assert (good["reason"].fillna("") == "").all()
    assert manifest["accepted"].dtype == bool


def test_build_manifest_labels_and_hashes(image_folder):
    manifest = build_manifest(image_folder)
    assert sorted(manifest["label"].unique()) == ["cat", "dog", "fish"]
    assert manifest["sha256"].is_unique
    assert manifest["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert (manifest["label"] == manifest["path"].str.split("/").str[0]).all()


# --- validate(): outputs -------------------------------------------------------------------------------

def test_validate_writes_manifest_quarantine_and_reports(image_folder, bad_files, tmp_path):
    out = tmp_path / "out"
    outcome = _run(image_folder, out)

    assert outcome.discovered == 39
    assert outcome.accepted == 36
    assert outcome.quarantined == 3
    assert outcome.discovered == outcome.accepted + outcome.quarantined
    # quarantined files are not part of the contract: the remaining data is fine
    assert outcome.contract.success, [c.detail for c in outcome.contract.failures]
    assert outcome.mode == "L"

    manifest = pd.read_csv(out / "data" / "manifest.csv")
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 39
    assert int(manifest["accepted"].sum()) == 36

    quarantine = pd.read_csv(out / "reports" / "validation" / "quarantine.csv")
    assert list(quarantine.columns) == ["path", "label", "reason"]
    assert sorted(quarantine["path"]) == sorted(bad_files)
    assert quarantine["reason"].notna().all()

    summary = json.loads((out / "reports" / "validation" / "summary.json").read_text())
    assert summary["success"] is True
    assert (summary["discovered"], summary["accepted"], summary["quarantined"]) == (39, 36, 3)
    assert summary["mode"] == "L"
    assert summary["labels"] == ["cat", "dog", "fish"]
    assert summary["checks"] and all(c["success"] for c in summary["checks"])

    markdown = (out / "reports" / "validation" / "summary.md").read_text()
    assert "PASSED" in markdown
    assert "discovered: 39" in markdown
    assert "quarantined: 3" in markdown


def test_contract_passes_on_good_data(image_folder, tmp_path):
    outcome = _run(image_folder, tmp_path / "out", labels=["cat", "dog", "fish"], min_images_per_class=12)
    assert outcome.contract.success
    assert outcome.contract.failures == []
    assert len(outcome.contract.checks) == len(json.loads(SUITE.read_text())["expectations"])
    assert outcome.quarantined == 0


def test_duplicate_across_classes_is_a_label_conflict_and_both_copies_are_quarantined(image_folder, tmp_path):
    shutil.copyfile(image_folder / "cat" / "img_03.png", image_folder / "dog" / "copy_of_cat.png")
    out = tmp_path / "out"
    outcome = _run(image_folder, out, max_rejected_share=0.1)
    assert (outcome.discovered, outcome.accepted, outcome.quarantined) == (37, 35, 2)
    assert outcome.contract.success
    quarantine = pd.read_csv(out / "reports" / "validation" / "quarantine.csv").set_index("path")
    assert "label conflict" in quarantine.loc["cat/img_03.png", "reason"]
    assert "dog/copy_of_cat.png (dog)" in quarantine.loc["cat/img_03.png", "reason"]
    assert "cat/img_03.png (cat)" in quarantine.loc["dog/copy_of_cat.png", "reason"]
    # with the default share of rejected files allowed, two of 37 fails the contract and says why
    strict = _run(image_folder, tmp_path / "strict", max_rejected_share=0.05)
    assert [c.column for c in strict.contract.failures] == ["rejected_share"]


def test_contract_fails_on_too_many_exact_duplicates_with_example_paths(image_folder, tmp_path):
    shutil.copyfile(image_folder / "cat" / "img_03.png", image_folder / "cat" / "copy.png")
    out = tmp_path / "out"
    outcome = _run(image_folder, out, max_duplicate_share=0.0)
    assert not outcome.contract.success
    failing = {(c.expectation, c.column): c for c in outcome.contract.failures}
    assert set(failing) == {("expect_column_values_to_be_unique", "sha256")}
    examples = " ".join(failing[("expect_column_values_to_be_unique", "sha256")].examples)
    assert "cat/img_03.png" in examples and "cat/copy.png" in examples
    summary = json.loads((out / "reports" / "validation" / "summary.json").read_text())
    assert summary["success"] is False
    markdown = (out / "reports" / "validation" / "summary.md").read_text()
    assert "FAILED" in markdown and "cat/copy.png" in markdown
    # a same-class copy within the allowed share passes: the split keeps the two together
    assert _run(image_folder, tmp_path / "lenient", max_duplicate_share=0.1).contract.success


def test_contract_fails_when_a_class_is_too_small(make_image_folder, tmp_path):
    raw = make_image_folder("images", classes=("big", "small"), per_class=12)
    for path in sorted((raw / "small").iterdir())[4:]:
        path.unlink()  # small keeps 4 images
    outcome = _run(raw, tmp_path / "out", min_images_per_class=5)
    assert not outcome.contract.success
    failing = outcome.contract.failures
    assert [(c.expectation, c.column) for c in failing] == [("expect_column_values_to_be_between", "class_count")]
    assert failing[0].examples and all(e.startswith("small/") for e in failing[0].examples)

    # the same data passes when the threshold is met
    assert _run(raw, tmp_path / "out2", min_images_per_class=4).contract.success


def test_quarantined_images_do_not_count_towards_class_size(image_folder, bad_files, tmp_path):
    # cat has 12 good + 3 broken files: 15 discovered, but only 12 usable
    outcome = _run(image_folder, tmp_path / "out", min_images_per_class=13)
    assert not outcome.contract.success
    assert any(c.column == "class_count" for c in outcome.contract.failures)


def test_contract_fails_when_labels_exclude_a_found_class(image_folder, tmp_path):
    outcome = _run(image_folder, tmp_path / "out", labels=["cat", "dog"])
    assert not outcome.contract.success
    failing = outcome.contract.failures
    assert [(c.expectation, c.column) for c in failing] == [("expect_column_values_to_be_in_set", "label")]
    assert failing[0].examples and all(e.startswith("fish/") for e in failing[0].examples)
    assert "12 unexpected" in failing[0].detail


def test_contract_fails_when_an_expected_class_has_no_images(image_folder, tmp_path):
    """validate.labels lists a class with no accepted images: a 3-class model must not pass for a 4-class task."""
    outcome = _run(image_folder, tmp_path / "out", labels=["cat", "dog", "fish", "bird"])
    assert not outcome.contract.success
    failing = outcome.contract.failures
    assert [(c.expectation, c.column) for c in failing] == [("expect_column_distinct_values_to_contain_set", "label")]
    assert "bird" in failing[0].detail and "validate.labels" in failing[0].why


def test_empty_raw_folder_fails_the_contract(tmp_path):
    raw = tmp_path / "raw"
    (raw / "cat").mkdir(parents=True)
    (raw / "cat" / "broken.png").write_bytes(b"")
    outcome = _run(raw, tmp_path / "out", labels=["cat"])
    assert (outcome.discovered, outcome.accepted, outcome.quarantined) == (1, 0, 1)
    assert not outcome.contract.success


# --- dataset_mode --------------------------------------------------------------------------------------

def test_dataset_mode_is_L_for_all_grayscale(image_folder):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(image_folder / "cat" / "deep.png")
    manifest = build_manifest(image_folder)
    assert set(manifest["mode"]) == {"L", "I;16"}
    assert dataset_mode(manifest) == "L"


def test_dataset_mode_is_RGB_when_any_image_is_colour(image_folder, tmp_path):
    Image.new("RGB", (16, 16), (200, 10, 10)).save(image_folder / "dog" / "red.png")
    manifest = build_manifest(image_folder)
    assert dataset_mode(manifest) == "RGB"
    assert _run(image_folder, tmp_path / "out").mode == "RGB"


def test_dataset_mode_ignores_rejected_colour_files(image_folder):
    (image_folder / "dog" / "broken_colour.png").write_bytes(_png_bytes()[:200])
    manifest = build_manifest(image_folder)
    row = manifest.set_index("path").loc["dog/broken_colour.png"]
    assert row["mode"] == "RGB" and not row["accepted"]
    assert dataset_mode(manifest) == "L"


# --- every bad input: a clear reason, and nothing lost ----------------------------------------------------

def _jpeg_bytes(size=(64, 48), mode="RGB", exif_orientation: int | None = None, seed: int = 2) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _crafted_png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb never needs to be decoded)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def _write_bad(folder: Path) -> dict[str, str]:
    """Every rejected kind of file from the issue, in class `cat`; returns {path: expected reason pattern}."""
    cat = folder / "cat"
    (cat / "zero.png").write_bytes(b"")
    (cat / "text.png").write_text("hello, I am text\n")
    whole_png, whole_jpg = _png_bytes(), _jpeg_bytes()
    (cat / "cut.png").write_bytes(whole_png[: len(whole_png) // 2])
    (cat / "cut.jpg").write_bytes(whole_jpg[: len(whole_jpg) // 2])
    (cat / "bomb_header.png").write_bytes(_crafted_png_header(100_000, 100_000))
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")  # 9 Mpx of zeros: ~9 KB on disk
    (cat / "bomb_real.png").write_bytes(buf.getvalue())
    return {"cat/zero.png": r"^empty file \(0 bytes\)$",
            "cat/text.png": r"^not an image",
            "cat/cut.png": r"^cannot decode: .*(truncated|broken|EOF)",
            "cat/cut.jpg": r"^cannot decode: .*truncated",
            "cat/bomb_header.png": r"pixel cap|decompression bomb",
            "cat/bomb_real.png": r"3000x3000 = 9,000,000 pixels exceeds the 4,000,000-pixel cap"}


def _write_odd_but_fine(folder: Path) -> dict[str, tuple[str, str]]:
    """Files the policy accepts with a note; returns {path: (mode, note pattern)}."""
    dog = folder / "dog"
    (dog / "cmyk.jpg").write_bytes(_jpeg_bytes(mode="CMYK"))
    Image.fromarray(np.array([[0, 30000], [60000, 65535]], dtype=np.uint16)).save(dog / "deep16.png")
    pal = Image.new("P", (8, 8))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    pal.putdata([0, 1] * 32)
    pal.save(dog / "palette.png", transparency=0)
    frames = [Image.new("L", (16, 16), v) for v in (10, 120, 240)]
    frames[0].save(dog / "anim.gif", save_all=True, append_images=frames[1:])
    (dog / "rotated.jpg").write_bytes(_jpeg_bytes(size=(40, 20), exif_orientation=6))
    (dog / "jpeg_named.png").write_bytes(_jpeg_bytes(seed=5))
    return {"dog/cmyk.jpg": ("CMYK", "CMYK converted to RGB"),
            "dog/deep16.png": ("I;16", "rescaled to 8-bit"),
            "dog/palette.png": ("P", "transparency composited on white"),
            "dog/anim.gif": ("P", "first of 3 frames used"),
            "dog/rotated.jpg": ("RGB", "EXIF orientation 6 applied"),
            "dog/jpeg_named.png": ("RGB", "extension .png but the content is JPEG")}


def test_every_bad_image_is_quarantined_with_a_clear_reason_and_kept(image_folder, tmp_path):
    bad = _write_bad(image_folder)
    before = {p: (image_folder / p).read_bytes() for p in bad}
    out = tmp_path / "out"
    outcome = _run(image_folder, out, max_pixels=4_000_000)
    quarantine = pd.read_csv(out / "reports" / "validation" / "quarantine.csv", keep_default_na=False)
    reasons = dict(zip(quarantine["path"], quarantine["reason"]))
    assert set(reasons) == set(bad)
    for path, pattern in bad.items():
        assert __import__("re").search(pattern, reasons[path]), (path, reasons[path])
        assert (image_folder / path).read_bytes() == before[path]  # nothing deleted or changed
    assert outcome.discovered == 36 + len(bad) == outcome.accepted + outcome.quarantined
    manifest = pd.read_csv(out / "data" / "manifest.csv", keep_default_na=False)
    assert set(manifest["path"]) >= set(bad)


def test_decompression_bomb_is_rejected_before_it_is_decoded(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "bomb.png"
    path.write_bytes(_crafted_png_header(50_000, 50_000))
    called = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: called.append(1))
    facts = inspect_image(path, max_pixels=10_000_000)
    assert not facts["decodable"] and called == []
    assert "pixel cap" in facts["reason"] or "decompression bomb" in facts["reason"]


def test_odd_but_valid_images_are_accepted_with_the_policy_noted(image_folder, tmp_path):
    odd = _write_odd_but_fine(image_folder)
    out = tmp_path / "out"
    outcome = _run(image_folder, out)
    assert outcome.quarantined == 0, pd.read_csv(out / "reports" / "validation" / "quarantine.csv")
    assert outcome.mode == "RGB"
    rows = pd.read_csv(out / "data" / "manifest.csv", keep_default_na=False, dtype={"mode": str}).set_index("path")
    for path, (mode, note) in odd.items():
        assert rows.loc[path, "accepted"], path
        assert rows.loc[path, "mode"] == mode, path
        assert note in rows.loc[path, "note"], (path, rows.loc[path, "note"])
    assert rows.loc["dog/anim.gif", "n_frames"] == 3
    assert (rows.loc["dog/rotated.jpg", "width"], rows.loc["dog/rotated.jpg", "height"]) == (20, 40)
    assert float(rows.loc["dog/rotated.jpg", "exif_orientation"]) == 6
    summary = json.loads((out / "reports" / "validation" / "summary.json").read_text())
    assert summary["policy_notes"] == {  # one line per note, whole (I;16's own ";" once split it in two)
        "CMYK converted to RGB": 1, "EXIF orientation 6 applied": 1, "I;16 rescaled to 8-bit (not clipped)": 1,
        "extension .png but the content is JPEG": 1, "first frame of a multi-frame file used": 1,
        "transparency composited on white": 1}
    assert "Image policy applied" in (out / "reports" / "validation" / "summary.md").read_text()


def test_phash_is_computed_on_the_oriented_image(tmp_path):
    upright = tmp_path / "upright.jpg"
    rotated = tmp_path / "rotated.jpg"
    base = Image.open(io.BytesIO(_jpeg_bytes(size=(40, 20), exif_orientation=6)))
    from PIL import ImageOps

    ImageOps.exif_transpose(base).save(upright, "JPEG", quality=95)
    rotated.write_bytes(_jpeg_bytes(size=(40, 20), exif_orientation=6))
    a, b = inspect_image(upright)["phash"], inspect_image(rotated)["phash"]
    assert bin(int(a, 16) ^ int(b, 16)).count("1") <= 6


def test_ingest_rejections_reach_the_quarantine_so_nothing_is_silently_dropped(image_folder, tmp_path):
    from tasks.ingest import ingest

    outside = tmp_path / "outside.png"
    outside.write_bytes((image_folder / "cat" / "img_00.png").read_bytes())
    (image_folder / "cat" / "escape.png").symlink_to(outside)
    (image_folder / ".ipynb_checkpoints").mkdir()
    (image_folder / ".ipynb_checkpoints" / "x.png").write_bytes(b"nb")
    raw = tmp_path / "raw"
    record = ingest(str(image_folder), raw)
    out = tmp_path / "out"
    outcome = _run(raw, out, not_ingested=record.rejected)
    assert outcome.discovered == 37 == outcome.accepted + outcome.quarantined
    quarantine = pd.read_csv(out / "reports" / "validation" / "quarantine.csv")
    assert quarantine.to_dict("records") == [
        {"path": "cat/escape.png", "label": "cat", "reason": "not ingested: symlink resolves outside the source"}]
    manifest = pd.read_csv(out / "data" / "manifest.csv")
    assert not manifest["path"].str.contains("ipynb").any()  # hidden: ignored, never a class
    assert sorted(manifest["label"].unique()) == ["cat", "dog", "fish"]


def test_non_utf8_names_survive_ingest_validate_and_the_csv(image_folder, tmp_path):
    import os

    from tasks.ingest import ingest

    with open(os.fsencode(image_folder / "cat") + b"/na\xefve.png", "wb") as fh:
        fh.write(_png_bytes(size=16, seed=9))
    raw = tmp_path / "raw"
    ingest(str(image_folder), raw)
    out = tmp_path / "out"
    outcome = _run(raw, out)
    assert outcome.accepted == 37
    manifest = pd.read_csv(out / "data" / "manifest.csv")
    assert "cat/na\\xefve.png" in set(manifest["path"])


def test_presplit_layout_gives_split_hints_and_labels(tmp_path):
    from tests.conftest import write_image_folder

    for k, name in enumerate(("train", "val", "test")):
        write_image_folder(tmp_path / "raw" / name, classes=("cat", "dog"), per_class=4, seed=k + 3)
    manifest = build_manifest(tmp_path / "raw", layout="presplit")
    assert sorted(manifest["label"].unique()) == ["cat", "dog"]
    assert manifest.groupby("split_hint").size().to_dict() == {"test": 8, "train": 8, "val": 8}
    assert (manifest["split_hint"] == manifest["path"].str.split("/").str[0]).all()


@pytest.fixture
def pools(monkeypatch) -> list[int]:
    """Pool even the smallest inputs (whichever start method applies); the list gets each pool's size."""
    import tasks.validate as v

    sizes: list[int] = []
    monkeypatch.setattr(v, "POOL_MIN_FILES", 1)
    monkeypatch.setattr(v, "POOL_MIN_FILES_FORKED", 1)
    monkeypatch.setattr(v, "_pool", lambda workers, method, real=v._pool: sizes.append(workers) or real(workers, method))
    return sizes


def test_process_pool_gives_the_same_manifest(image_folder, monkeypatch, pools):
    import tasks.validate as v

    _write_bad(image_folder)
    _write_odd_but_fine(image_folder)
    serial = build_manifest(image_folder, workers=1, max_pixels=4_000_000)
    monkeypatch.setattr(v, "_chunks", lambda names, workers: [names[i:i + 5] for i in range(0, len(names), 5)])
    waited = []
    pooled = build_manifest(image_folder, workers=2, max_pixels=4_000_000, while_waiting=lambda: waited.append(1))
    pd.testing.assert_frame_equal(serial, pooled)
    assert waited == [1] and pools == [2]  # (really pooled)


def test_the_pool_is_spawned_while_another_thread_runs():
    import threading

    import tasks.validate as v

    started, release = threading.Event(), threading.Event()
    other = threading.Thread(target=lambda: (started.set(), release.wait()))
    other.start()
    started.wait()
    try:
        assert v.pool_start_method() == "spawn"  # a forked worker could inherit a lock that thread holds
    finally:
        release.set()
        other.join()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is used on Linux only")
def test_a_process_running_one_thread_forks_its_pool_and_gets_the_serial_manifest(image_folder):
    # as a warm stage's fork or a plain interpreter does; in a process of its own (pytest's may run threads)
    code = ("import sys, tasks.validate as v\n"
            "v.POOL_MIN_FILES_FORKED = 1\n"
            "assert v.pool_start_method() == 'fork', v.pool_start_method()\n"
            "pooled = v.build_manifest(v.Path(sys.argv[1]), workers=2, max_pixels=4_000_000)\n"
            "serial = v.build_manifest(v.Path(sys.argv[1]), workers=1, max_pixels=4_000_000)\n"
            "assert pooled.equals(serial) and len(pooled) > 0\n")
    res = subprocess.run([sys.executable, "-c", code, str(image_folder)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_small_inputs_are_inspected_inline_and_a_forked_pool_pays_off_sooner():
    import tasks.validate as v

    assert v.pool_size(5_000, 2, "spawn") == 0 and v.pool_size(5_000, 2, "fork") == 2
    assert v.pool_size(100, 2, "fork") == 0 and v.pool_size(50_000, 2, "spawn") == 2
    assert v.pool_size(50_000, 1, "fork") == 0


def test_corrupt_files_in_the_pool_path_are_quarantined_with_their_reason(image_folder, tmp_path, pools):
    import re

    bad = _write_bad(image_folder)
    outcome = _run(image_folder, tmp_path / "out", max_pixels=4_000_000, workers=2)
    assert outcome.discovered == outcome.accepted + outcome.quarantined and outcome.quarantined == len(bad)
    assert pools == [2]  # (really pooled)
    quarantine = pd.read_csv(tmp_path / "out" / "reports" / "validation" / "quarantine.csv", keep_default_na=False)
    reasons = dict(zip(quarantine["path"], quarantine["reason"]))
    assert set(reasons) == set(bad)
    for path, pattern in bad.items():
        assert re.search(pattern, reasons[path]), (path, reasons[path])
        assert (image_folder / path).is_file()  # quarantined, never deleted


def test_batched_phash_is_imagehash_phash_of_the_policy_image(image_folder, tmp_path):
    """The manifest's phash is imagehash.phash of the oriented, policy-converted image, bit for bit."""
    import imagehash

    from tasks.preprocess import open_image, to_mode

    _write_odd_but_fine(image_folder)
    rng = np.random.default_rng(7)
    Image.new("L", (9, 9), 77).save(image_folder / "dog" / "flat.png")  # all DCT ties
    Image.fromarray(rng.integers(0, 256, (50, 31, 4), dtype=np.uint8), "RGBA").save(image_folder / "dog" / "rgba.png")
    manifest = build_manifest(image_folder, workers=1)
    assert manifest["accepted"].all()
    for rel, phash in zip(manifest["path"], manifest["phash"]):
        expected = str(imagehash.phash(to_mode(open_image(image_folder / rel), "L")))
        assert phash == expected == inspect_image(image_folder / rel)["phash"], rel


def test_phash_many_in_blocks_equals_one_image_at_a_time():
    """More images than one DCT block: every hash is the one its image gets alone, in order."""
    from tasks.validate import PHASH_BLOCK, PHASH_SIDE, phash_many

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (PHASH_SIDE, PHASH_SIDE), dtype=np.uint8), "L")
              for _ in range(PHASH_BLOCK * 2 + 5)]
    hashes = phash_many(images)
    assert len(hashes) == len(images) and len(set(hashes)) > PHASH_BLOCK
    assert hashes == [phash_many([img])[0] for img in images]


def test_discover_lists_files_in_path_order_without_following_folder_links(tmp_path):
    from tasks.validate import discover

    raw = tmp_path / "raw"
    for rel in ("a/1.png", "a/b.png", "a-b/0.png", "a.b/x.png", "z/deep/er.png"):
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(b"x")
    (raw / "linked").symlink_to(outside, target_is_directory=True)
    (raw / "a" / "link.png").symlink_to(raw / "a" / "1.png")
    expected = sorted(p for p in raw.rglob("*") if p.is_file())
    found = discover(raw)
    assert [Path(f[0]) for f in found] == expected
    assert [f[1] for f in found] == [p.relative_to(raw).as_posix() for p in expected]
    assert ("a-b/0.png", "a-b") == found[[f[1] for f in found].index("a-b/0.png")][1:3]


# --- the contract's other expectations ----------------------------------------------------------------

def test_contract_checks_imbalance_sides_and_modes(make_image_folder, tmp_path):
    raw = make_image_folder("images", classes=("big", "small"), per_class=12, mode="L")
    for path in sorted((raw / "small").iterdir())[4:]:
        path.unlink()
    assert _run(raw, tmp_path / "a", min_images_per_class=4, max_class_imbalance=3.0).contract.success
    imbalanced = _run(raw, tmp_path / "b", min_images_per_class=4, max_class_imbalance=2.0)
    assert [c.column for c in imbalanced.contract.failures] == ["class_imbalance"]
    assert all(e.startswith("small/") for e in imbalanced.contract.failures[0].examples)

    small_side = _run(raw, tmp_path / "c", min_images_per_class=4, min_side=20)
    assert [c.column for c in small_side.contract.failures] == ["width", "height"]
    big_side = _run(raw, tmp_path / "d", min_images_per_class=4, max_side=10)
    assert [c.column for c in big_side.contract.failures] == ["width", "height"]

    modes = _run(raw, tmp_path / "e", min_images_per_class=4, allowed_modes=["RGB"])
    assert [c.column for c in modes.contract.failures] == ["mode"]
    assert "(mode=L)" in modes.contract.failures[0].examples[0]


def test_data_docs_are_written_and_linked(image_folder, tmp_path):
    out = tmp_path / "out"
    outcome = _run(image_folder, out, data_docs=True, max_duplicate_share=0.0)
    index = out / "reports" / "validation" / "data_docs" / "index.html"
    assert outcome.contract.data_docs == str(index) and index.is_file()
    pages = [p.read_text() for p in index.parent.rglob("*.html") if p != index]
    assert any("expect_column_values_to_be_unique" in page or "values must be unique" in page for page in pages)
    summary = json.loads((out / "reports" / "validation" / "summary.json").read_text())
    assert summary["data_docs"] == str(index)
    assert str(index) in (out / "reports" / "validation" / "summary.md").read_text()
