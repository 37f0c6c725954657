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
    import yaml

    from tasks.io import sha256_file
    from tasks.reproduce import changed_weights

    repo_params = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    params = tmp_path / "params.yaml"
    weights = tmp_path / "weights" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights v1")
    trained = sha256_file(weights)
    repo_params["train"]["pretrained"] = "weights/w.safetensors"  # relative: the project's
    params.write_text(yaml.safe_dump(repo_params))
    assert changed_weights(params, tmp_path, trained) is None
    assert changed_weights(params, tmp_path, None) is None  # trained before hashes were recorded
    weights.write_bytes(b"weights v2")
    assert f"changed: sha256 {sha256_file(weights)}, trained from {trained}" in changed_weights(params, tmp_path, trained)
    weights.unlink()
    assert "is gone" in changed_weights(params, tmp_path, trained)
