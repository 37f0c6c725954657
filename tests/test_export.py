"""ONNX export: the exported model agrees with torch under onnxruntime; parity and latency helpers."""

import onnx
import pytest
import torch

from tasks.predict import predict_logits
from tasks.export import check_onnx, onnx_logits, onnx_session, parity, time_call, torch_latency
from tasks.models import build_model
from tasks.preprocess import Preprocess


def test_parity_counts_agreement_and_the_largest_difference():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    b = torch.tensor([[1.0, 0.5], [1.5, 1.0], [2.0, 1.0]])
    assert parity(a, b) == {"top1_agreement": pytest.approx(2 / 3), "max_abs_logit_diff": pytest.approx(1.5)}


def test_latency_is_a_positive_median_of_the_timed_runs_after_warm_up():
    calls = []
    timed = time_call(lambda: calls.append(1), repeats=5, warmup=2, budget_s=float("inf"))
    assert timed.ms >= 0 and (timed.runs, timed.warmup) == (5, 2) and len(calls) == 7


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_exported_model_matches_torch_with_any_batch_size(tmp_path, mode):
    spec = Preprocess.for_mode(mode, 16)
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=4, in_channels=spec.channels).eval()
    images = torch.randint(0, 256, (7, spec.channels, 16, 16), dtype=torch.uint8)
    logits = predict_logits(model, images, spec)
    result = check_onnx(model, spec, images, logits, tmp_path / "m.onnx", repeats=2, batch_size=3)
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] < 1e-4
    assert result["latency_ms_b1"] > 0 and result["torch_latency_ms_b1"] > 0 and result["latency_runs_b1"] == 2
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    # dynamic batch: 1 and 5 images both run
    session = onnx_session(tmp_path / "m.onnx")
    assert onnx_logits(session, images[:1], spec).shape == (1, 4)
    assert onnx_logits(session, images[:5], spec).shape == (5, 4)
    assert not list(tmp_path.glob(".*"))


def test_torch_latency_grows_with_the_batch():
    spec = Preprocess.for_mode("L", 32)
    model = build_model("smallcnn", num_classes=3, in_channels=1)
    assert (torch_latency(model, spec, batch=64, repeats=3).ms
            > torch_latency(model, spec, batch=1, repeats=3).ms)
