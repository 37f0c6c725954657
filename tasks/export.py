"""ONNX export of the evaluated model, parity with torch under onnxruntime, and CPU latency of both."""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tasks.preprocess import Preprocess, normalize

if TYPE_CHECKING:
    import torch
    from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


LATENCY_MIN_RUNS = 5  # timed runs a figure gets past its budget, when that many fit in it (see latency_floor)
LATENCY_WARMUP = 3


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per call, how many calls were timed and warmed up, and the seconds it all took."""

    ms: float
    runs: int
    warmup: int
    seconds: float


def latency_floor(run_s: float, *, budget_s: float, min_runs: int = LATENCY_MIN_RUNS) -> int:
    """Timed runs a figure gets even past its budget: min_runs when that many fit in the budget, 2 when one
    run does, else 1 (a ViT-B batch of 64 takes ~16 s on 2 CPU cores: 5 runs would be minutes)."""
    if run_s * min_runs <= budget_s:
        return min_runs
    return 2 if run_s <= budget_s else 1


def keep_timing(run_s: Sequence[float], elapsed_s: float, *, repeats: int, budget_s: float,
                min_runs: int = LATENCY_MIN_RUNS) -> bool:
    """Whether to time one more run, given the runs so far (seconds) and the time spent (warm-up included)."""
    if not run_s:
        return True
    if len(run_s) >= max(1, repeats):
        return False
    if elapsed_s <= budget_s:
        return True
    return len(run_s) < latency_floor(statistics.median(run_s), budget_s=budget_s, min_runs=min_runs)


def time_call(call: Callable[[], Any], *, repeats: int, budget_s: float, warmup: int = LATENCY_WARMUP,
              min_runs: int = LATENCY_MIN_RUNS, clock: Callable[[], float] = time.perf_counter) -> Latency:
    """Median wall time of call() after warm-up calls, within budget_s (see keep_timing). One warm-up call
    always; more only while the budget lasts, so a slow model is warmed up once."""
    start = clock()
    warm = 0
    while warm < max(1, warmup) and (warm == 0 or clock() - start <= budget_s):
        call()
        warm += 1
    runs: list[float] = []
    while keep_timing(runs, clock() - start, repeats=repeats, budget_s=budget_s, min_runs=min_runs):
        t0 = clock()
        call()
        runs.append(clock() - t0)
    return Latency(ms=statistics.median(runs) * 1000.0, runs=len(runs), warmup=warm, seconds=clock() - start)


def torch_latency(model: "nn.Module", spec: Preprocess, *, batch: int, repeats: int = 20,
                  budget_s: float = math.inf, clock: Callable[[], float] = time.perf_counter) -> Latency:
    """Eager torch CPU latency for one normalised batch of the given size, per batch, within budget_s."""
    import torch

    model = model.to("cpu").eval()
    x = torch.randn(batch, spec.channels, spec.size, spec.size)
    with torch.inference_mode():
        return time_call(lambda: model(x), repeats=repeats, budget_s=budget_s, clock=clock)


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
               torch_latency_ms_b1: float | None = None, budget_s: float = math.inf) -> dict[str, Any]:
    """Export, score the same images under onnxruntime, compare with torch, time batch-1 in both (each within
    budget_s seconds, see time_call)."""
    import torch

    path = export_onnx(model, spec, dest, opset=opset)
    session = onnx_session(path)
    result = parity(torch_logits, onnx_logits(session, images, spec, batch_size=batch_size))
    one = normalize(images[:1] if len(images) else torch.zeros(1, spec.channels, spec.size, spec.size,
                                                               dtype=torch.uint8), spec).numpy()
    timed = time_call(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: one}), repeats=repeats, budget_s=budget_s)
    result["latency_ms_b1"], result["latency_runs_b1"] = timed.ms, timed.runs
    result["torch_latency_ms_b1"] = (torch_latency_ms_b1 if torch_latency_ms_b1 is not None
                                     else torch_latency(model, spec, batch=1, repeats=repeats, budget_s=budget_s).ms)
    result["opset"] = opset
    result["bytes"] = path.stat().st_size
    return result
