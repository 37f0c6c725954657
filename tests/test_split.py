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


# --- duplicates and near duplicates never straddle splits ------------------------------------------------

import numpy as np  # noqa: E402

from tasks.split import assign_splits, group_ids, near_duplicate_pairs  # noqa: E402


def _hashed(counts: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Manifest rows with random sha256 and far-apart random 64-bit perceptual hashes."""
    rng = np.random.default_rng(seed)
    frame = _manifest(counts)
    frame["sha256"] = [f"{i:064x}" for i in range(len(frame))]
    frame["phash"] = [f"{int(h):016x}" for h in rng.integers(0, 2**63, len(frame), dtype=np.int64)]
    return frame


def _flip(hex_hash: str, bits: int) -> str:
    value = int(hex_hash, 16)
    for b in range(bits):
        value ^= 1 << (b * 7)
    return f"{value:016x}"


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    near = np.array([int(h) ^ (1 << int(rng.integers(0, 64))) ^ (1 << 5) for h in base[:15]], dtype=np.uint64)
    hashes = np.concatenate([base, near])
    for d in (0, 2, 4, 10):
        brute = sorted((i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                       if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= d)
        assert near_duplicate_pairs(hashes, d) == brute, d


def test_group_ids_join_exact_and_near_duplicates_transitively():
    sha = ["a", "b", "a", "c", "d"]
    ph = ["0000000000000000", "ffffffffffffffff", "0f0f0f0f0f0f0f0f", "0000000000000003", "00000000000000ff"]
    assert group_ids(sha, ph, max_distance=2) == [0, 1, 0, 0, 4]
    assert group_ids(sha, ph, max_distance=None) == [0, 1, 0, 3, 4]


def test_exact_duplicates_in_one_class_stay_in_one_split(tmp_path):
    frame = _hashed(COUNTS)
    cat = frame.index[frame["label"] == "cat"]
    frame.loc[cat[:10], "sha256"] = "same"  # ten copies of one picture
    rows, _ = assign_splits(frame, val_fraction=0.15, test_fraction=0.15, seed=1, near_duplicate_distance=None)
    assert rows.loc[rows["sha256"] == "same", "split"].nunique() == 1
    assert set(rows.loc[rows["label"] == "cat", "split"]) == {"train", "val", "test"}


def test_near_duplicates_across_would_be_splits_are_kept_together(tmp_path):
    frame = _hashed(COUNTS, seed=4)
    for k, label in enumerate(COUNTS):
        idx = frame.index[frame["label"] == label]
        for i in idx[1:6]:  # five near copies (1-3 bits away) of each class's first image
            frame.loc[i, "phash"] = _flip(frame.loc[idx[0], "phash"], 1 + i % 3)
    path = _write(frame, tmp_path / "manifest.csv")
    result = split(path, tmp_path / "splits", val_fraction=0.15, test_fraction=0.15, seed=42,
                   near_duplicate_distance=4)
    parts = _read(tmp_path / "splits")
    where = {p: name for name, part in parts.items() for p in part["path"]}
    for label in COUNTS:
        family = [f"{label}/img_{i:03d}.png" for i in range(6)]
        assert len({where[p] for p in family}) == 1, label
    assert result.groups["grouped_groups"] == 3 and result.groups["grouped_images"] == 18
    groups = pd.read_csv(tmp_path / "splits" / "groups.csv")
    assert len(groups) == 18 and groups.groupby("group")["split"].nunique().max() == 1
    summary = json.loads((tmp_path / "splits" / "summary.json").read_text())
    assert all(c["success"] for c in summary["leakage_checks"]) and summary["leakage_checks"]
    # without grouping the same seed would have spread at least one family over several splits
    loose, _ = assign_splits(frame, val_fraction=0.15, test_fraction=0.15, seed=42, near_duplicate_distance=None)
    spread = [loose[loose["path"].isin([f"{label}/img_{i:03d}.png" for i in range(6)])]["split"].nunique()
              for label in COUNTS]
    assert max(spread) > 1


def test_grouped_split_is_reproducible_and_order_independent(tmp_path):
    frame = _hashed(COUNTS, seed=7)
    a = _write(frame, tmp_path / "a.csv")
    b = _write(frame.sample(frac=1, random_state=3), tmp_path / "b.csv")
    ra = split(a, tmp_path / "sa", val_fraction=0.2, test_fraction=0.2, seed=5, near_duplicate_distance=4)
    rb = split(b, tmp_path / "sb", val_fraction=0.2, test_fraction=0.2, seed=5, near_duplicate_distance=4)
    assert ra.test_hash == rb.test_hash
    for name in SPLITS:
        assert (tmp_path / "sa" / f"{name}.csv").read_bytes() == (tmp_path / "sb" / f"{name}.csv").read_bytes()


def test_a_class_that_is_one_picture_many_times_cannot_be_split(tmp_path):
    frame = _hashed({**COUNTS, "clones": 6})
    frame.loc[frame["label"] == "clones", "sha256"] = "clone"
    with pytest.raises(SplitError, match="'clones' \\(6 images in 1 groups\\)"):
        split(_write(frame, tmp_path / "m.csv"), tmp_path / "splits", val_fraction=0.15, test_fraction=0.15,
              seed=1)
    assert not (tmp_path / "splits").exists()


# --- pre-split sources ---------------------------------------------------------------------------------

def _presplit_frame(counts_per_split: dict[str, int]) -> pd.DataFrame:
    frames = []
    for split_name, n in counts_per_split.items():
        part = _hashed({"cat": n, "dog": n}, seed=len(frames) + 10)
        part["path"] = split_name + "/" + part["path"]
        part["sha256"] = split_name + part["sha256"]
        part["split_hint"] = split_name
        frames.append(part)
    return pd.concat(frames, ignore_index=True)


def test_presplit_source_is_respected_as_given(tmp_path):
    frame = _presplit_frame({"train": 10, "val": 3, "test": 4})
    split(_write(frame, tmp_path / "m.csv"), tmp_path / "splits", val_fraction=0.15, test_fraction=0.15, seed=1)
    parts = _read(tmp_path / "splits")
    for name, part in parts.items():
        assert part["path"].str.startswith(name + "/").all()
    assert {name: len(part) for name, part in parts.items()} == {"train": 20, "val": 6, "test": 8}


def test_presplit_source_that_leaks_is_an_error_naming_the_files(tmp_path):
    frame = _presplit_frame({"train": 10, "val": 3, "test": 4})
    frame.loc[frame["path"] == "test/cat/img_000.png", "sha256"] = \
        frame.loc[frame["path"] == "train/cat/img_005.png", "sha256"].iloc[0]
    with pytest.raises(SplitError) as info:
        split(_write(frame, tmp_path / "m.csv"), tmp_path / "splits", val_fraction=0.15, test_fraction=0.15,
              seed=1)
    assert "train/cat/img_005.png (train)" in str(info.value) and "test/cat/img_000.png (test)" in str(info.value)
    assert not (tmp_path / "splits").exists()


def test_presplit_near_duplicate_across_given_splits_is_an_error(tmp_path):
    frame = _presplit_frame({"train": 10, "val": 3, "test": 4})
    train_hash = frame.loc[frame["path"] == "train/dog/img_002.png", "phash"].iloc[0]
    frame.loc[frame["path"] == "val/dog/img_001.png", "phash"] = _flip(train_hash, 2)
    with pytest.raises(SplitError, match="val/dog/img_001.png"):
        split(_write(frame, tmp_path / "m.csv"), tmp_path / "s", val_fraction=0.15, test_fraction=0.15, seed=1,
              near_duplicate_distance=4)
    # at a stricter threshold the two are not near duplicates and the given splits stand
    split(_write(frame, tmp_path / "m.csv"), tmp_path / "s", val_fraction=0.15, test_fraction=0.15, seed=1,
          near_duplicate_distance=1)


def test_presplit_without_val_carves_it_from_train_with_a_warning(tmp_path):
    frame = _presplit_frame({"train": 20, "test": 5})
    result = split(_write(frame, tmp_path / "m.csv"), tmp_path / "splits", val_fraction=0.15,
                   test_fraction=0.15, seed=1)
    parts = _read(tmp_path / "splits")
    assert parts["test"]["path"].str.startswith("test/").all() and len(parts["test"]) == 10
    assert parts["val"]["path"].str.startswith("train/").all() and set(parts["val"]["label"]) == {"cat", "dog"}
    assert len(parts["val"]) + len(parts["train"]) == 40
    assert any("no val folder" in w for w in result.warnings)


def test_group_table_takes_each_groups_majority_label_ties_to_the_first_name():
    import numpy as np
    import pandas as pd

    from tasks.split import _group_table

    rng = np.random.default_rng(3)
    rows = pd.DataFrame({"path": [f"f{i:04d}" for i in range(600)], "group": rng.integers(0, 150, 600),
                         "label": rng.choice(["b", "a", "c"], 600)})
    table = _group_table(rows)
    for group, members in rows.groupby("group"):
        counts = members["label"].value_counts()
        assert table.loc[group, "label"] == sorted(counts[counts == counts.max()].index)[0]
        assert table.loc[group, "size"] == len(members) and table.loc[group, "first"] == members["path"].min()
        assert table.loc[group, "n_labels"] == members["label"].nunique()
    assert list(table["first"]) == sorted(table["first"])


def test_adding_images_leaves_nearly_every_image_in_its_split():
    """A new data version (more images) must not redraw the split: the old test images stay test images, so
    runs stay comparable and the gate can compare a champion on test images it never trained on. (A seeded
    shuffle of the groups moved about half the images.)"""
    base = _hashed({"a": 300, "b": 200})
    extra = _hashed({"a": 60, "b": 40}, seed=1)
    extra["path"] = "new_" + extra["path"]
    extra["sha256"] = [f"{i + 10**6:064x}" for i in range(len(extra))]
    kw = dict(val_fraction=0.15, test_fraction=0.15, seed=3, near_duplicate_distance=None)
    before = assign_splits(base, **kw)[0].set_index("path")["split"]
    after = assign_splits(pd.concat([base, extra], ignore_index=True), **kw)[0].set_index("path")["split"]
    moved = (before != after.loc[before.index]).mean()
    assert moved < 0.05, f"{moved:.0%} of the images changed split"
    removed = assign_splits(base.iloc[::2], **kw)[0].set_index("path")["split"]  # half the images gone
    assert (removed != before.loc[removed.index]).mean() < 0.10
    assert set(after.loc[extra["path"]]) == {"train", "val", "test"}  # the new images are split as usual


def test_the_split_follows_image_content_not_file_names():
    base = _hashed({"a": 40, "b": 40})
    renamed = base.assign(path=[f"{lab}/{n:04d}.png" for lab, n in zip(base["label"], range(len(base), 0, -1))])
    kw = dict(val_fraction=0.15, test_fraction=0.15, seed=3, near_duplicate_distance=None)
    a = assign_splits(base, **kw)[0].sort_values("sha256")["split"].tolist()
    b = assign_splits(renamed, **kw)[0].sort_values("sha256")["split"].tolist()
    assert a == b


def test_a_big_group_of_near_duplicates_goes_to_train_not_to_test():
    """One picture saved 60 times (one group) beside 40 distinct ones: test and val get distinct images up to
    their share, the big group trains. (Taking groups in hash order alone once put such a group in test and
    left its class one training image.)"""
    frame = _hashed({"a": 100, "b": 100})
    big = frame.index[frame["label"] == "a"][:60]
    frame.loc[big, "sha256"] = "f" * 64
    rows, _ = assign_splits(frame, val_fraction=0.15, test_fraction=0.15, seed=0, near_duplicate_distance=None)
    a = rows[rows["label"] == "a"]
    assert set(a.loc[a["sha256"] == "f" * 64, "split"]) == {"train"}
    counts = a["split"].value_counts().to_dict()
    assert counts["train"] >= 60 and 1 <= counts["test"] <= 15 and 1 <= counts["val"] <= 15, counts
