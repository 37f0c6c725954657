"""The GPU benchmark's code paths, checked on CPU: the script refuses clearly without CUDA, and the throughput
bench it wraps computes model-FLOPs utilisation (no speed is asserted anywhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_gpu_script_is_valid_bash_and_stops_clearly_without_cuda(tmp_path):
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu.sh")]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "no CUDA device visible" in res.stderr


@pytest.mark.slow
def test_throughput_bench_reports_mfu_for_the_stage_and_the_bare_loop(tmp_path):
    out = tmp_path / "tp.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--device", "cpu", "--mfu",
                          "--peak-tflops", "1", "--model", "smallcnn", "--image-size", "16", "--batch-size", "32",
                          "--n-train", "256", "--epochs", "1", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row == json.loads(res.stdout.strip().splitlines()[-1])
    assert row["model"] == "smallcnn" and row["device"] == "cpu" and row["peak_tflops"] == 1
    assert row["train_gflops_per_image"] > 0 and row["stage_images_per_s"] > 0 and row["synthetic_images_per_s"] > 0
    # MFU = achieved training FLOP/s over the stated peak, for each loop
    for kind in ("stage", "synthetic"):
        expected = row[f"{kind}_images_per_s"] * row["train_gflops_per_image"] * 1e9 / 1e12
        assert row[f"mfu_{kind}"] == pytest.approx(expected, rel=0.02)
    assert row["ratio"] == pytest.approx(row["stage_images_per_s"] / row["synthetic_images_per_s"], rel=0.02)
