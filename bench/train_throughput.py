"""Images/s of the real train stage's fit() next to a bare loop over synthetic tensors (same model, shape,
batch, dtype), in one run. Prints one JSON line and writes bench/results/train_throughput.json.

    python bench/train_throughput.py                       # params.yaml's train section, CPU or auto device
    python bench/train_throughput.py --device cuda --model resnet50 --image-size 224 --batch-size 256 --mfu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bare_loop(model, x, y, *, device: str, lr: float, weight_decay: float, steps: int, warmup: int) -> float:
    """Images/s of forward + backward + AdamW step on ready-made normalised tensors."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def train_flops_per_image(model, shape, device: str) -> float:
    """3x the forward FLOPs (forward + backward), counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return 3 * counter.get_total_flops() / 2


def main() -> None:
    import torch

    from tasks.config import load_params
    from tasks.models import build_model
    from tasks.preprocess import Preprocess
    from tasks.train import channels_last, config_from_params, fit, resolve_device

    cfg = config_from_params(load_params(ROOT / "params.yaml"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=cfg.model)
    ap.add_argument("--image-size", type=int, default=cfg.image_size)
    ap.add_argument("--batch-size", type=int, default=cfg.batch_size if cfg.batch_size != "auto" else 64)
    ap.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: 1 for smallcnn, else 3")
    ap.add_argument("--n-train", type=int, default=1024, help="synthetic training images")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--device", default=cfg.device)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared host)")
    ap.add_argument("--mfu", action="store_true", help="also report model-FLOPs utilisation")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak (H100 SXM: 989)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    channels = args.channels or (1 if args.model == "smallcnn" else 3)
    spec = Preprocess.for_mode("L" if channels == 1 else "RGB", args.image_size)
    run_cfg = dataclasses.replace(cfg, model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                                  epochs=args.epochs, device=device, patience=0)
    g = torch.Generator().manual_seed(0)
    n = args.n_train
    num_classes = 10
    images = torch.randint(0, 256, (n, channels, spec.size, spec.size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    val = (images[: args.batch_size], labels[: args.batch_size])
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        images, labels = images.to(device), labels.to(device)  # the in-memory fast path: uint8 cache on device
        val = (val[0].to(device), val[1].to(device))

    torch.manual_seed(0)
    bare_model = build_model(args.model, num_classes=num_classes, in_channels=channels).to(device)
    x = torch.randn(args.batch_size, channels, spec.size, spec.size, device=device)
    if channels_last(device):  # the same memory format as fit() uses on this device: the loop is compared
        bare_model = bare_model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (args.batch_size,), device=device)
    steps = max(1, math.ceil(n / args.batch_size))  # one epoch's worth

    bare_runs: list[float] = []

    def bare_after_epoch(row: dict[str, float]) -> None:
        # Interleaved: one bare-loop "epoch" (same number of steps) right after each stage epoch, so load
        # drifting on a shared machine hits both sides of each pair alike.
        bare_runs.append(bare_loop(bare_model, x, y, device=device, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   steps=steps, warmup=0 if bare_runs else 3))

    torch.manual_seed(0)
    model = build_model(args.model, num_classes=num_classes, in_channels=channels)
    result, _ = fit(model, (images, labels), val, spec, run_cfg, on_epoch=bare_after_epoch)
    # Epoch 1 carries warm-up (allocator, cudnn autotune): the steady state is from epoch 2 on.
    stage_runs = [h["throughput"] for h in result.history]
    pairs = list(zip(stage_runs, bare_runs))[1:] or list(zip(stage_runs, bare_runs))
    stage = statistics.median(a for a, _ in pairs)
    bare_ips = statistics.median(b for _, b in pairs)
    ratio = statistics.median(a / b for a, b in pairs)

    out = {"model": args.model, "image_size": args.image_size, "channels": channels,
           "batch_size": result.batch_size, "device": device,
           "dtype": "bf16-autocast" if device == "cuda" else "float32",
           "channels_last": channels_last(device), "torch_threads": torch.get_num_threads(),
           "stage_images_per_s": round(stage, 1), "synthetic_images_per_s": round(bare_ips, 1),
           "ratio": round(ratio, 3), "runs": {"stage": [round(v, 1) for v in stage_runs],
                                                         "synthetic": [round(v, 1) for v in bare_runs]}, "augment": {"translate": cfg.translate, "hflip": cfg.hflip}}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    if args.mfu:
        flops = train_flops_per_image(bare_model, (channels, spec.size, spec.size), device)
        out["train_gflops_per_image"] = round(flops / 1e9, 3)
        out["mfu_stage"] = round(stage * flops / (args.peak_tflops * 1e12), 4)
        out["mfu_synthetic"] = round(bare_ips * flops / (args.peak_tflops * 1e12), 4)
        out["peak_tflops"] = args.peak_tflops
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
