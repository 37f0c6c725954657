"""Learning-rate range test: raise the lr exponentially over a few hundred steps, watch the loss, suggest a value."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.io import write_json
from tasks.preprocess import Preprocess, normalize

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tasks.train import TrainConfig

PLOT = Path("reports/lr_find.png")
RESULT = Path("reports/lr_find.json")


@dataclass
class LrFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggested_lr: float


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """The lr where the smoothed loss falls fastest (steepest negative slope against log lr)."""
    if len(lrs) < 3:
        return lrs[0] if lrs else float("nan")
    slopes = [(losses[i + 1] - losses[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(1, len(lrs) - 1)]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def lr_find(model: "nn.Module", train: tuple["torch.Tensor", "torch.Tensor"], spec: Preprocess,
            cfg: "TrainConfig", *, start_lr: float = 1e-6, end_lr: float = 1.0, steps: int = 100,
            smoothing: float = 0.9, diverge: float = 4.0) -> LrFindResult:
    """Train for `steps` batches with the lr rising geometrically; stop when the loss diverges."""
    import torch
    import torch.nn.functional as F

    from tasks.train import augment, resolve_batch_size, resolve_device

    device = resolve_device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = train
    batch = resolve_batch_size(cfg, model, spec, n_train=len(x_all), num_classes=int(y_all.max()) + 1,
                               device=device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=start_lr, momentum=0.9, weight_decay=cfg.weight_decay)
           if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr=start_lr, weight_decay=cfg.weight_decay))
    factor = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs, losses, avg, best = [], [], 0.0, float("inf")
    order = torch.empty(0, dtype=torch.int64)
    for step in range(steps):
        lr = start_lr * factor ** step
        for group in opt.param_groups:
            group["lr"] = lr
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(x_all), generator=generator)])
        idx, order = order[:batch], order[batch:]
        x = augment(normalize(x_all[idx].to(device), spec), translate=cfg.translate, hflip=cfg.hflip,
                    generator=generator)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y_all[idx].to(device), label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        avg = smoothing * avg + (1 - smoothing) * value
        smoothed = avg / (1 - smoothing ** (step + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge * best:
            break
    return LrFindResult(lrs=lrs, losses=losses, suggested_lr=suggest_lr(lrs, losses))


def plot(result: LrFindResult, dest: Path) -> None:
    """Loss versus lr (log scale) with the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggested_lr, color="red", linestyle="--", label=f"suggested lr {result.suggested_lr:.2e}")
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("loss (smoothed)"), ax.legend()
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def main(overrides: dict[str, Any] | None = None) -> None:
    """`python -m tasks.lr_find` (`imgclf lr-find`): range test on the train split with params.yaml's model and
    recipe (with `overrides`, e.g. {"train.model": "resnet18"}); plot + JSON in reports/."""
    import pandas as pd

    from tasks.config import load_params
    from tasks.models import build_model
    from tasks.train import (MANIFEST, RAW_DIR, SPLITS_DIR, TrainingError, config_from_params, prepare,
                             seed_everything)
    from tasks.validate import dataset_mode

    params = load_params(overrides=overrides)
    cfg = config_from_params(params)
    seed_everything(cfg.seed)
    data = prepare(cfg, raw_dir=RAW_DIR, splits_dir=SPLITS_DIR,
                   dataset_mode=dataset_mode(pd.read_csv(MANIFEST, dtype={"label": str})))
    try:
        model = build_model(cfg.model, num_classes=len(data.classes), in_channels=data.spec.channels,
                            pretrained=cfg.pretrained, image_size=data.spec.size)
        result = lr_find(model, data.train, data.spec, cfg)
    except (ValueError, FileNotFoundError, TrainingError) as exc:  # the recipe cannot run: say why, no traceback
        print(f"lr-find failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    plot(result, PLOT)
    write_json(RESULT, {"suggested_lr": result.suggested_lr, "model": cfg.model, "image_size": cfg.image_size,
                        "batch_size": cfg.batch_size, "optimizer": cfg.optimizer, "lrs": result.lrs,
                        "losses": result.losses})
    print(f"suggested lr {result.suggested_lr:.2e} (train.lr is {cfg.lr:g}); plot: {PLOT}")


def cli(argv: list[str] | None = None) -> None:
    """`python -m tasks.lr_find [--set section.key=value ...]`, as `imgclf lr-find`."""
    import argparse

    from tasks.config import ParamsError, parse_overrides

    parser = argparse.ArgumentParser(prog="python -m tasks.lr_find", description=main.__doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a param for this test only (repeatable)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
    except ParamsError as exc:
        parser.error(str(exc))
    main(overrides or None)


if __name__ == "__main__":
    cli()
