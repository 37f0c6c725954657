"""ONNX export of the evaluated model, parity with torch under onnxruntime, and CPU latency of both."""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.preprocess import Preprocess, normalize

if TYPE_CHECKING:
    import torch
    from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def measure_latency(call: Callable[[], Any], *, repeats: int = 20, warmup: int = 3,
                    budget_s: float | None = None, min_repeats: int = 5) -> float:
    """Median wall time of call() in milliseconds, after warm-up calls. With budget_s, timing stops once that
    many seconds went by (warm-up included) and at least min_repeats runs were timed."""
    start = time.perf_counter()
    for _ in range(warmup):
        call()
    times: list[float] = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
        if budget_s is not None and len(times) >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def torch_latency_ms(model: "nn.Module", spec: Preprocess, *, batch: int, repeats: int = 20,
                     budget_s: float | None = None) -> float:
    """Eager torch latency on CPU for one normalised batch of the given size, per batch."""
    import torch

    model = model.to("cpu").eval()
    x = torch.randn(batch, spec.channels, spec.size, spec.size)
    with torch.inference_mode():
        return measure_latency(lambda: model(x), repeats=repeats, budget_s=budget_s)


def export_onnx(model: "nn.Module", spec: Preprocess, dest: Path, *, opset: int = 17) -> Path:
    """Write the model as ONNX (float input N x C x S x S, normalised; dynamic batch) and check it."""
    import onnx
    import torch

    model = model.to("cpu").eval()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    example = torch.zeros(2, spec.channels, spec.size, spec.size)
    # The TorchScript exporter needs no extra packages (the dynamo one needs onnxscript); torch is pinned.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    onnx.checker.check_model(str(tmp))
    tmp.replace(dest)
    return dest


def onnx_session(path: Path):
    """A CPU onnxruntime session for an exported model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_logits(session, images: "torch.Tensor", spec: Preprocess, *, batch_size: int = 256) -> "torch.Tensor":
    """uint8 N x C x H x W -> logits from onnxruntime, preprocessed exactly as for torch."""
    import torch

    out = [torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: normalize(images[s:s + batch_size], spec)
                                                        .numpy()})[0])
           for s in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


def parity(torch_logits: "torch.Tensor", other_logits: "torch.Tensor") -> dict[str, float]:
    """Top-1 agreement and the largest absolute logit difference between two runtimes on the same images."""
    if len(torch_logits) == 0:
        return {"top1_agreement": 1.0, "max_abs_logit_diff": 0.0}
    agree = (torch_logits.argmax(1) == other_logits.argmax(1)).float().mean()
    return {"top1_agreement": float(agree),
            "max_abs_logit_diff": float((torch_logits.float() - other_logits.float()).abs().max())}


def check_onnx(model: "nn.Module", spec: Preprocess, images: "torch.Tensor", torch_logits: "torch.Tensor",
               dest: Path, *, opset: int = 17, batch_size: int = 256, repeats: int = 20,
               torch_latency_ms_b1: float | None = None) -> dict[str, Any]:
    """Export, score the same images under onnxruntime, compare with torch, time batch-1 in both."""
    import torch

    path = export_onnx(model, spec, dest, opset=opset)
    session = onnx_session(path)
    result = parity(torch_logits, onnx_logits(session, images, spec, batch_size=batch_size))
    one = normalize(images[:1] if len(images) else torch.zeros(1, spec.channels, spec.size, spec.size,
                                                               dtype=torch.uint8), spec).numpy()
    result["latency_ms_b1"] = measure_latency(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: one}),
                                              repeats=repeats)
    result["torch_latency_ms_b1"] = (torch_latency_ms_b1 if torch_latency_ms_b1 is not None
                                     else torch_latency_ms(model, spec, batch=1, repeats=repeats))
    result["opset"] = opset
    result["bytes"] = path.stat().st_size
    return result
