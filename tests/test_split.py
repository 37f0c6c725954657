"""tasks/split.py: stratified, seeded train/val/test lists of the accepted images."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.io import sha256_file
from tasks.split import SPLITS, SplitError, split, split_frame


def _manifest(counts: dict[str, int], *, rejected: dict[str, int] | None = None) -> pd.DataFrame:
    """A manifest-shaped frame: counts[label] accepted rows and rejected[label] rejected rows per label."""
    rows = []
    for label, n in counts.items():
        rows += [{"path": f"{label}/img_{i:03d}.png", "label": label, "accepted": True, "reason": ""}
                 for i in range(n)]
    for label, n in (rejected or {}).items():
        rows += [{"path": f"{label}/bad_{i:03d}.png", "label": label, "accepted": False,
                  "reason": "cannot decode"} for i in range(n)]
    return pd.DataFrame(rows)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def _read(out: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(out / f"{name}.csv", dtype={"label": str}) for name in SPLITS}


COUNTS = {"cat": 40, "dog": 40, "fish": 40}


def test_splits_are_disjoint_cover_everything_and_keep_labels(tmp_path):
    # "007" checks that labels that look like numbers survive as strings
    counts = {**COUNTS, "007": 20}
    manifest = _write(_manifest(counts), tmp_path / "manifest.csv")
    result = split(manifest, tmp_path / "splits", val_fraction=0.15, test_fraction=0.15, seed=42)
    parts = _read(tmp_path / "splits")

    paths = {name: set(part["path"]) for name, part in parts.items()}
    assert not paths["train"] & paths["val"]
    assert not paths["train"] & paths["test"]
    assert not paths["val"] & paths["test"]
    assert paths["train"] | paths["val"] | paths["test"] == set(_manifest(counts)["path"])
    assert sum(len(p) for p in parts.values()) == sum(counts.values())
    assert result.sizes == {name: len(part) for name, part in parts.items()}
    for part in parts.values():
        assert list(part.columns) == ["path", "label"]
        assert (part["label"] == part["path"].str.split("/").str[0]).all()
        assert part["path"].is_monotonic_increasing
    assert set(parts["test"]["label"]) >= {"007"}


def test_every_class_in_every_split_with_stratified_proportions(tmp_path):
    manifest = _write(_manifest(COUNTS), tmp_path / "manifest.csv")
    result = split(manifest, tmp_path / "splits", val_fraction=0.2, test_fraction=0.1, seed=0)
    parts = _read(tmp_path / "splits")
    total = sum(COUNTS.values())
    assert result.sizes["test"] == pytest.approx(total * 0.1, abs=1)
    assert result.sizes["val"] == pytest.approx(total * 0.2, abs=1)
    assert result.sizes["train"] == total - result.sizes["test"] - result.sizes["val"]
    for name, fraction in (("train", 0.7), ("val", 0.2), ("test", 0.1)):
        per_class = parts[name]["label"].value_counts()
        assert set(per_class.index) == set(COUNTS), name
        for label, n in per_class.items():
            assert n == pytest.approx(COUNTS[label] * fraction, abs=1.5), (name, label)


def test_summary_records_sizes_per_class_seed_and_test_hash(tmp_path):
    manifest = _write(_manifest(COUNTS), tmp_path / "manifest.csv")
    result = split(manifest, tmp_path / "splits", val_fraction=0.15, test_fraction=0.15, seed=5)
    summary = json.loads((tmp_path / "splits" / "summary.json").read_text())
    assert summary["sizes"] == result.sizes
    assert summary["seed"] == 5
    assert summary["test_hash"] == result.test_hash == sha256_file(tmp_path / "splits" / "test.csv")
    for name in SPLITS:
        assert sum(summary["per_class"][name].values()) == result.sizes[name]


def test_same_seed_gives_identical_files(tmp_path):
    manifest = _write(_manifest(COUNTS), tmp_path / "manifest.csv")
    a = split(manifest, tmp_path / "a", val_fraction=0.15, test_fraction=0.15, seed=42)
    b = split(manifest, tmp_path / "b", val_fraction=0.15, test_fraction=0.15, seed=42)
    assert a == b
    for name in SPLITS:
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()


def test_same_seed_is_independent_of_manifest_row_order(tmp_path):
    frame = _manifest(COUNTS)
    a = split(_write(frame, tmp_path / "m1.csv"), tmp_path / "a", val_fraction=0.15, test_fraction=0.15, seed=1)
    shuffled = frame.sample(frac=1.0, random_state=123)
    b = split(_write(shuffled, tmp_path / "m2.csv"), tmp_path / "b", val_fraction=0.15, test_fraction=0.15, seed=1)
    assert a.test_hash == b.test_hash


def test_different_seed_gives_a_different_split(tmp_path):
    manifest = _write(_manifest(COUNTS), tmp_path / "manifest.csv")
    a = split(manifest, tmp_path / "a", val_fraction=0.15, test_fraction=0.15, seed=1)
    b = split(manifest, tmp_path / "b", val_fraction=0.15, test_fraction=0.15, seed=2)
    assert a.test_hash != b.test_hash
    assert set(_read(tmp_path / "a")["test"]["path"]) != set(_read(tmp_path / "b")["test"]["path"])


@pytest.mark.parametrize("n", [1, 2])
def test_class_with_fewer_than_3_images_raises_naming_it(tmp_path, n):
    manifest = _write(_manifest({**COUNTS, "rare_bird": n}), tmp_path / "manifest.csv")
    with pytest.raises(SplitError) as info:
        split(manifest, tmp_path / "splits", val_fraction=0.15, test_fraction=0.15, seed=42)
    assert "rare_bird" in str(info.value)
    assert "'cat'" not in str(info.value)  # names only the class that is too small
    assert not (tmp_path / "splits" / "test.csv").exists()


def test_only_accepted_rows_are_split(tmp_path):
    frame = _manifest(COUNTS, rejected={"cat": 5, "dog": 2})
    manifest = _write(frame, tmp_path / "manifest.csv")
    result = split(manifest, tmp_path / "splits", val_fraction=0.15, test_fraction=0.15, seed=42)
    parts = _read(tmp_path / "splits")
    split_paths = set().union(*(set(p["path"]) for p in parts.values()))
    assert not any("/bad_" in p for p in split_paths)
    assert split_paths == set(frame.loc[frame["accepted"], "path"])
    assert sum(result.sizes.values()) == sum(COUNTS.values())


def test_rejected_rows_do_not_count_towards_the_minimum(tmp_path):
    manifest = _write(_manifest({**COUNTS, "owl": 2}, rejected={"owl": 10}), tmp_path / "manifest.csv")
    with pytest.raises(SplitError, match="owl"):
        split(manifest, tmp_path / "splits", val_fraction=0.15, test_fraction=0.15, seed=42)


def test_small_class_gets_an_image_in_every_split_when_classes_are_imbalanced():
    """split_frame promises every class at least one image in each split; 3 images is the stated minimum."""
    accepted = _manifest({"rare": 3, "common": 60})
    parts = split_frame(accepted, val_fraction=0.15, test_fraction=0.15, seed=42)
    for name, part in parts.items():
        assert "rare" in set(part["label"]), f"{name} has no 'rare' image: {part['label'].value_counts().to_dict()}"
