"""Cross-validation folds (stratified, group-aware), a tiny CV run, and label quality from OOF predictions."""

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.cv import (assign_folds, cross_validate, label_issues, load_pool, load_split_groups, make_folds,
                      resolve_groups, summarise)
from tasks.evaluate import compute_metrics
from tasks.preprocess import Preprocess
from tasks.train import TrainConfig


def test_folds_are_stratified_and_cover_every_row_once():
    labels = ["a"] * 9 + ["b"] * 6 + ["c"] * 3
    fold_of = assign_folds(labels, k=3, seed=0)
    assert sorted(set(fold_of)) == [0, 1, 2]
    for f in range(3):
        members = [l for l, x in zip(labels, fold_of) if x == f]
        assert members.count("a") == 3 and members.count("b") == 2 and members.count("c") == 1
    assert list(assign_folds(labels, k=3, seed=0)) == list(fold_of)  # seeded


def test_duplicate_groups_never_straddle_folds():
    labels = ["a", "b"] * 12
    groups = [i // 4 for i in range(24)]  # six groups of four near-duplicates
    fold_of = assign_folds(labels, k=3, seed=1, groups=groups)
    for g in set(groups):
        assert len({f for f, gg in zip(fold_of, groups) if gg == g}) == 1


def test_each_fold_tests_once_and_picks_its_epoch_on_a_slice_of_the_other_folds():
    labels = ["a", "b", "c"] * 20
    fold_of = assign_folds(labels, k=3, seed=0)
    folds = make_folds(fold_of, labels, seed=0, val_fraction=0.2)
    assert [f.fold for f in folds] == [0, 1, 2]
    for f in folds:
        parts = [set(f.train), set(f.val), set(f.test)]
        assert set().union(*parts) == set(range(60)) and sum(map(len, parts)) == 60  # disjoint, complete
        assert set(f.test) == set(np.flatnonzero(fold_of == f.fold))
        assert len(f.val) == 8 and sorted({labels[i] for i in f.val}) == ["a", "b", "c"]  # 20% of 40, stratified
    assert sorted(np.concatenate([f.test for f in folds]).tolist()) == list(range(60))


def test_inner_validation_keeps_groups_together_too():
    labels = ["a", "b"] * 30
    groups = [i // 2 for i in range(60)]  # pairs of duplicates (one a, one b)
    fold_of = assign_folds(labels, k=3, seed=0, groups=groups)
    for f in make_folds(fold_of, labels, seed=0, groups=groups, val_fraction=0.25):
        assert not {groups[i] for i in f.val} & {groups[i] for i in f.train}
        assert not {groups[i] for i in f.test} & ({groups[i] for i in f.train} | {groups[i] for i in f.val})


def test_too_few_folds_or_images_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(["a", "b"] * 5, k=1, seed=0)
    with pytest.raises(ValueError, match="smallest class has 2"):
        assign_folds(["a"] * 5 + ["b"] * 2, k=3, seed=0)


def test_summary_is_mean_and_sample_std():
    s = summarise([{"accuracy": 0.8}, {"accuracy": 0.9}, {"accuracy": 1.0}], ["accuracy"])
    assert s["accuracy"]["mean"] == pytest.approx(0.9) and s["accuracy"]["std"] == pytest.approx(0.1)


def _split_stage_outputs(tmp_path):
    """Real split-stage outputs for 24 images, where a/0-a/2 are one image three times and b/0-b/1 another."""
    from tasks.split import split

    rows = [{"path": f"{label}/{i}.png", "label": label, "sha256": f"{label}{i}", "phash": "",
             "split_hint": "", "accepted": True} for label in "ab" for i in range(12)]
    for r in rows:
        if r["path"] in ("a/1.png", "a/2.png"):
            r["sha256"] = "a0"
        if r["path"] == "b/1.png":
            r["sha256"] = "b0"
    manifest = pd.DataFrame(rows)
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    split(tmp_path / "manifest.csv", tmp_path / "splits", val_fraction=0.2, test_fraction=0.2, seed=0,
          suite_path=None)
    return manifest.drop(columns=["sha256"]), tmp_path / "splits"  # a manifest with no group column, as ours


def test_default_groups_are_the_split_stages_duplicate_groups(tmp_path):
    manifest, splits = _split_stage_outputs(tmp_path)
    pool = load_pool(splits)
    groups = resolve_groups(pool, column="group", manifest=manifest, split_groups=load_split_groups(splits))
    at = dict(zip(pool["path"], groups.values))
    assert at["a/0.png"] == at["a/1.png"] == at["a/2.png"] and at["b/0.png"] == at["b/1.png"]
    assert at["a/0.png"] != at["b/0.png"] and len(set(groups.values)) == 24 - 3  # the rest: one group each
    assert groups.grouped_images == 5 and "groups.csv" in groups.source
    fold_of = assign_folds(pool["label"].tolist(), k=3, seed=0, groups=groups.values)
    assert len({fold_of[i] for i, p in enumerate(pool["path"]) if p in ("a/0.png", "a/1.png", "a/2.png")}) == 1


def test_a_manifest_column_adds_its_groups_to_the_split_stages(tmp_path):
    manifest, splits = _split_stage_outputs(tmp_path)
    manifest["source"] = ["s1" if p in ("a/5.png", "a/6.png", "a/2.png") else "" for p in manifest["path"]]
    pool = load_pool(splits)
    groups = resolve_groups(pool, column="source", manifest=manifest, split_groups=load_split_groups(splits))
    at = dict(zip(pool["path"], groups.values))
    # a/5, a/6 share a source; a/2 links that source to split's duplicate group a/0-a/2
    assert at["a/0.png"] == at["a/1.png"] == at["a/2.png"] == at["a/5.png"] == at["a/6.png"]
    assert at["b/0.png"] == at["b/1.png"] != at["a/0.png"] and groups.grouped_images == 7
    assert "manifest column 'source'" in groups.source and "groups.csv" in groups.source
    # without split's file the manifest column alone still works; missing values are their own group
    alone = resolve_groups(pool, column="source", manifest=manifest, split_groups=None)
    at = dict(zip(pool["path"], alone.values))
    assert at["a/2.png"] == at["a/5.png"] == at["a/6.png"] and at["a/0.png"] != at["a/1.png"]


def test_a_group_column_found_nowhere_is_an_error_not_an_ungrouped_cv(tmp_path):
    manifest, splits = _split_stage_outputs(tmp_path)
    pool = load_pool(splits)
    with pytest.raises(ValueError, match=r"cv_group_column='phash_group'.*manifest.*groups.csv.*null"):
        resolve_groups(pool, column="phash_group", manifest=manifest, split_groups=load_split_groups(splits))
    with pytest.raises(ValueError, match="re-run the split stage"):  # no groups.csv, no such manifest column
        resolve_groups(pool, column="phash_group", manifest=manifest, split_groups=None)
    # the default, on splits made before the split stage wrote groups.csv: ungrouped, and it says so
    old = resolve_groups(pool, column="group", manifest=manifest, split_groups=None)
    assert old.values is None and "NOT group-aware" in old.warning and "dvc repro split" in old.warning
    off = resolve_groups(pool, column=None, manifest=manifest, split_groups=load_split_groups(splits))
    assert off.values is None and "null" in off.source and off.warning is None  # the explicit ungrouped CV


def _blobs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, 16, 16, generator=g) * 60).to(torch.uint8)
    x[y == 0, :, :8] += 150
    x[y == 1, :, 8:] += 150
    return x, y


def test_cross_validation_trains_k_models_and_reports_mean_and_std():
    images, targets = _blobs(36)
    cfg = TrainConfig(model="smallcnn", image_size=16, epochs=3, batch_size=8, optimizer="adamw", lr=0.01,
                      weight_decay=0.0, label_smoothing=0.0, hflip=False, translate=0.0, device="cpu", seed=0)
    seen = []
    result = cross_validate(images, targets, ["top", "bottom"], Preprocess.for_mode("L", 16), cfg, k=3,
                            metrics_fn=compute_metrics, on_fold=seen.append)
    assert [f["fold"] for f in result.folds] == [0, 1, 2] and len(seen) == 3
    assert sum(f["n_test"] for f in result.folds) == 36
    assert result.summary["folds"] == 3 and not result.summary["grouped"]
    assert set(result.summary["accuracy"]) == {"mean", "std"} and result.summary["accuracy"]["mean"] > 0.6
    assert torch.allclose(result.oof_probs.sum(1), torch.ones(36), atol=1e-5)  # every image scored out of fold


def test_label_issues_flag_flipped_labels_and_change_nothing():
    rng = np.random.default_rng(0)
    n = 150
    truth = np.arange(n) % 3
    probs = np.full((n, 3), 0.04)
    probs[np.arange(n), truth] = 0.92
    probs += rng.random((n, 3)) * 0.01
    given = truth.copy()
    flipped = [5, 17, 40, 51, 96, 130]  # two wrong labels per class
    given[flipped] = (truth[flipped] + 1) % 3
    targets = torch.tensor(given)
    paths = [f"img{i}.png" for i in range(n)]
    issues = label_issues(paths, targets, torch.tensor(probs, dtype=torch.float32), ["a", "b", "c"], limit=10)
    assert len(issues) == 10 and issues["flagged"].tolist() == [True] * 6 + [False] * 4
    assert set(issues["path"][:6]) == {f"img{i}.png" for i in flipped}
    assert issues["label_quality"][6:].is_monotonic_increasing
    row = issues.set_index("path").loc["img5.png"]
    assert row["given_label"] == ["a", "b", "c"][given[5]]
    assert row["suspected_label"] == ["a", "b", "c"][truth[5]]
    assert list(targets.numpy()) == list(given)  # reported, never corrected
    assert len(label_issues(paths, targets, torch.tensor(probs, dtype=torch.float32), list("abc"), limit=1)) == 1
