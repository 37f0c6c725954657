"""tasks/validate.py: per-image manifest, quarantine, Great Expectations contract, reports."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.validate import MANIFEST_COLUMNS, build_manifest, dataset_mode, inspect_image, validate

SUITE = Path(__file__).resolve().parent.parent / "expectations" / "manifest.json"


def _run(raw: Path, out: Path, *, labels=None, min_images_per_class=10):
    return validate(raw, suite_path=SUITE, labels=labels, min_images_per_class=min_images_per_class,
                    manifest_path=out / "data" / "manifest.csv", report_dir=out / "reports" / "validation")


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


def test_contract_fails_on_duplicate_images_with_example_paths(image_folder, tmp_path):
    shutil.copyfile(image_folder / "cat" / "img_03.png", image_folder / "dog" / "copy_of_cat.png")
    out = tmp_path / "out"
    outcome = _run(image_folder, out)
    assert not outcome.contract.success
    failing = {(c.expectation, c.column): c for c in outcome.contract.failures}
    assert set(failing) == {("expect_column_values_to_be_unique", "sha256")}
    examples = " ".join(failing[("expect_column_values_to_be_unique", "sha256")].examples)
    assert "cat/img_03.png" in examples
    assert "dog/copy_of_cat.png" in examples

    summary = json.loads((out / "reports" / "validation" / "summary.json").read_text())
    assert summary["success"] is False
    markdown = (out / "reports" / "validation" / "summary.md").read_text()
    assert "FAILED" in markdown
    assert "dog/copy_of_cat.png" in markdown


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
