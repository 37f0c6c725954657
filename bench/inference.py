"""Inference: `imgclf predict` images/s on a folder, and batch-1 CPU latency of ONNX Runtime vs eager torch
for the same trained model.

    python bench/inference.py [--images 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, timed, trained_project, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()
    tmp, data, project, e, _ = trained_project("inference", n_images=args.images, epochs=1)
    predict_s = timed([str(BIN / "imgclf"), "predict", str(data), "--out", str(tmp / "pred.csv")], project, e)
    startup_s = timed([str(BIN / "imgclf"), "predict", str(next(data.rglob("*.png"))), "--out",
                       str(tmp / "one.csv")], project, e)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    onnx = metrics.get("onnx") or {}
    torch_ms, ort_ms = onnx.get("torch_latency_ms_b1"), onnx.get("latency_ms_b1")
    write_result("inference", {
        "images": args.images, "predict_s": round(predict_s, 2), "predict_one_s": round(startup_s, 2),
        "predict_images_per_s": round(args.images / predict_s, 1),
        "predict_images_per_s_after_startup": round(args.images / max(predict_s - startup_s, 1e-9), 1),
        "torch_b1_ms": torch_ms, "onnxruntime_b1_ms": ort_ms,
        "onnx_over_torch": round(ort_ms / torch_ms, 3) if torch_ms and ort_ms else None,
        "target": "ONNX Runtime batch-1 latency <= 0.7 x eager torch",
        "within_target": bool(torch_ms and ort_ms and ort_ms <= 0.7 * torch_ms),
    })
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
