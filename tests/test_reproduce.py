"""Comparing a rebuild with the registered metrics (pure)."""

from pathlib import Path

from tasks.reproduce import compare, params_tracking_is_local


def test_cpu_rebuilds_must_match_exactly():
    rows = compare({"accuracy": 0.9, "macro_f1": 0.8}, {"accuracy": 0.9, "macro_f1": 0.8}, tolerance=0)
    assert all(r.ok for r in rows)
    rows = compare({"accuracy": 0.9, "macro_f1": 0.8}, {"accuracy": 0.9000001, "macro_f1": 0.8}, tolerance=0)
    assert [r.ok for r in rows] == [False, True]


def test_gpu_rebuilds_match_within_the_tolerance_and_missing_metrics_never_match():
    rows = compare({"accuracy": 0.9, "macro_f1": 0.8}, {"accuracy": 0.903, "macro_f1": 0.79}, tolerance=0.005)
    assert [r.ok for r in rows] == [True, False]
    assert not any(r.ok for r in compare({}, {"accuracy": 1.0, "macro_f1": 1.0}, tolerance=1))


def test_only_relative_sqlite_stores_count_as_local(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text("register:\n  tracking_uri: sqlite:///mlflow.db\n")
    assert params_tracking_is_local(p)
    p.write_text("register:\n  tracking_uri: http://mlflow:5000\n")
    assert not params_tracking_is_local(p)


def test_a_changed_or_missing_pretrained_weights_file_is_named_before_any_rebuild(tmp_path):
    from tasks.io import sha256_file
    from tasks.reproduce import trained_weights

    tree, root = tmp_path / "tree", tmp_path / "project"
    weights = root / "weights" / "w.safetensors"
    weights.parent.mkdir(parents=True)
    tree.mkdir()
    weights.write_bytes(b"weights v1")
    trained = sha256_file(weights)
    rel = "weights/w.safetensors"  # relative: the worktree's, else (not committed) the project's
    assert trained_weights(rel, trained, tree=tree, root=root) == (weights, None)
    assert trained_weights(rel, None, tree=tree, root=root) == (None, None)  # trained before hashes were recorded
    assert trained_weights(None, trained, tree=tree, root=root) == (None, None)
    (tree / "weights").mkdir()
    (tree / rel).write_bytes(b"weights v1")
    assert trained_weights(rel, trained, tree=tree, root=root) == (tree / rel, None)  # the committed copy first
    weights.write_bytes(b"weights v2")
    (tree / rel).unlink()
    path, problem = trained_weights(rel, trained, tree=tree, root=root)
    assert path is None and f"changed: sha256 {sha256_file(weights)}, trained from {trained}" in problem
    weights.unlink()
    assert "is gone" in trained_weights(str(weights), trained, tree=tree, root=root)[1]
