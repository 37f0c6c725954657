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
