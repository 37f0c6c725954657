"""Stage `train`: decode the splits once, train a model by name, log to MLflow, save safetensors."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.io import write_json
from tasks.preprocess import Preprocess, load_tensor, normalize

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

RAW_DIR = Path("data/raw")
SPLITS_DIR = Path("data/splits")
MANIFEST = Path("data/manifest.csv")
OUT_DIR = Path("models/candidate")


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. the loss became NaN); nothing is saved."""


@dataclass(frozen=True)
class TrainConfig:
    model: str
    image_size: int
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    label_smoothing: float
    hflip: bool
    translate: float
    device: str
    seed: int


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    device: str = "cpu"
    seconds: float = 0.0


def resolve_device(preference: str) -> str:
    """cuda, then mps, then cpu, unless one is asked for."""
    import torch

    if preference != "auto":
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_split(frame: "pd.DataFrame", raw_dir: Path, spec: Preprocess,
               class_index: dict[str, int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Decode a split once into uint8 N x C x S x S plus int64 labels (the in-memory fast path)."""
    import torch

    images = torch.empty((len(frame), spec.channels, spec.size, spec.size), dtype=torch.uint8)
    for i, rel in enumerate(frame["path"]):
        images[i] = load_tensor(raw_dir / rel, spec)
    labels = torch.tensor([class_index[str(c)] for c in frame["label"]], dtype=torch.int64)
    return images, labels


def augment(batch: "torch.Tensor", *, translate: float, hflip: bool, generator: "torch.Generator") -> "torch.Tensor":
    """Batched, per-sample random shift (and optional horizontal flip) on normalised float images."""
    import torch
    import torch.nn.functional as F

    n = batch.shape[0]
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1).to(batch.device), batch.flip(-1), batch)
    if translate > 0:
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * translate)  # grid units span 2
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta.to(batch.device), list(batch.shape), align_corners=False)
        batch = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return batch


def _evaluate(model: "nn.Module", images: "torch.Tensor", labels: "torch.Tensor", spec: Preprocess,
              device: str, batch_size: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    total_loss, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device), spec)
            y = labels[start:start + batch_size].to(device)
            logits = model(x).float()
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    n = max(len(images), 1)
    return total_loss / n, correct / n


def fit(model: "nn.Module", train: tuple["torch.Tensor", "torch.Tensor"], val: tuple["torch.Tensor", "torch.Tensor"],
        spec: Preprocess, cfg: TrainConfig, *, on_epoch: Callable[[dict[str, float]], None] | None = None,
        ) -> tuple[TrainResult, dict[str, "torch.Tensor"]]:
    """Train with AdamW/SGD + one-cycle LR; return the history and the best-on-validation weights."""
    import torch
    import torch.nn.functional as F

    device = resolve_device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train, y_train = train
    steps_per_epoch = max(1, math.ceil(len(x_train) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.2)
    result = TrainResult(device=device)
    best_state: dict[str, torch.Tensor] = {}
    best_key = (-1.0, float("-inf"))
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)
        seen, loss_sum, correct = 0, 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x = normalize(x_train[idx].to(device, non_blocking=True), spec)
            x = augment(x, translate=cfg.translate, hflip=cfg.hflip, generator=generator)
            y = y_train[idx].to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch}; nothing was saved. "
                                    "Lower train.lr or check the data.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc = _evaluate(model, *val, spec, device, cfg.batch_size * 4)
        row = {"epoch": epoch, "train/loss": loss_sum / seen, "train/accuracy": correct / seen,
               "val/loss": val_loss, "val/accuracy": val_acc, "lr": sched.get_last_lr()[0],
               "throughput": seen / train_seconds}
        result.history.append(row)
        if (val_acc, -val_loss) > best_key:
            best_key = (val_acc, -val_loss)
            result.best_epoch, result.best_val_accuracy = epoch, val_acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch:
            on_epoch(row)
    result.seconds = time.perf_counter() - started
    return result, best_state


def config_from_params(params: Any) -> TrainConfig:
    t = params.train
    return TrainConfig(model=t.model, image_size=t.image_size, epochs=t.epochs, batch_size=t.batch_size,
                       optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                       label_smoothing=t.label_smoothing, hflip=t.hflip, translate=t.translate,
                       device=t.device, seed=params.base.seed)


def seed_everything(seed: int) -> None:
    """Same seed, same CPU result."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train(cfg: TrainConfig, *, raw_dir: Path, splits_dir: Path, dataset_mode: str, out_dir: Path,
          on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Core: splits + images -> trained model saved in out_dir (weights, class map, preprocessing)."""
    import pandas as pd

    from tasks.models import build_model, input_mode, save_model

    seed_everything(cfg.seed)
    frames = {name: pd.read_csv(splits_dir / f"{name}.csv", dtype={"label": str}) for name in ("train", "val")}
    classes = sorted(set(frames["train"]["label"]) | set(frames["val"]["label"]))
    class_index = {c: i for i, c in enumerate(classes)}
    spec = Preprocess.for_mode(input_mode(cfg.model, dataset_mode), cfg.image_size)
    train_data = load_split(frames["train"], raw_dir, spec, class_index)
    val_data = load_split(frames["val"], raw_dir, spec, class_index)
    model = build_model(cfg.model, num_classes=len(classes), in_channels=spec.channels)
    result, best_state = fit(model, train_data, val_data, spec, cfg, on_epoch=on_epoch)
    model.load_state_dict(best_state)
    save_model(out_dir, model, name=cfg.model, classes=classes, preprocess=spec,
               extra={"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy})
    write_json(out_dir / "history.json", result.history)
    return result


def plot_curves(history: list[dict[str, float]], dest: Path) -> None:
    """Loss and accuracy per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["train/loss"] for h in history], label="train")
    a.plot(epochs, [h["val/loss"] for h in history], label="val")
    a.set_title("loss"), a.set_xlabel("epoch"), a.legend()
    b.plot(epochs, [h["train/accuracy"] for h in history], label="train")
    b.plot(epochs, [h["val/accuracy"] for h in history], label="val")
    b.set_title("accuracy"), b.set_xlabel("epoch"), b.legend()
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def main() -> None:
    """DVC stage entry point: train, then record everything in one MLflow run."""
    import json

    import mlflow
    import torch
    from rich.console import Console

    from tasks import tracking
    from tasks.config import load_params, write_resolved

    params = load_params()
    cfg = config_from_params(params)
    console = Console(stderr=True)
    import pandas as pd

    from tasks.validate import dataset_mode

    mode = dataset_mode(pd.read_csv(MANIFEST, dtype={"label": str}))
    tracking.configure(params.register_.tracking_uri, params.register_.experiment)

    def report(row: dict[str, float]) -> None:
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        console.print(f"epoch {int(row['epoch']):>3}/{cfg.epochs}  loss {row['train/loss']:.4f}  "
                      f"val_loss {row['val/loss']:.4f}  val_acc {row['val/accuracy']:.4f}  "
                      f"lr {row['lr']:.2e}  {row['throughput']:.0f} img/s")

    with mlflow.start_run(run_name=f"train-{cfg.model}") as run:
        mlflow.log_params(tracking.flatten(params.to_dict()))
        mlflow.set_tags({"imgclf.stage": "train", "device": resolve_device(cfg.device),
                         "torch": torch.__version__, "python": platform.python_version(),
                         "host.cpus": str(torch.get_num_threads())})
        try:
            result = train(cfg, raw_dir=RAW_DIR, splits_dir=SPLITS_DIR, dataset_mode=mode, out_dir=OUT_DIR,
                           on_epoch=report)
        except TrainingError as exc:
            mlflow.set_tag("imgclf.failed", str(exc))
            console.print(f"[red]training failed:[/] {exc}")
            raise SystemExit(1) from None
        write_resolved(params, OUT_DIR / "params.yaml")
        plot_curves(result.history, OUT_DIR / "curves.png")
        mlflow.log_metrics({"best_val_accuracy": result.best_val_accuracy, "train_seconds": result.seconds})
        mlflow.log_artifact(str(OUT_DIR / "curves.png"), "plots")
        mlflow.log_dict(json.loads((OUT_DIR / "model.json").read_text()), "model_meta.json")
        model_uri = tracking.log_serving_model(OUT_DIR)
        write_json(OUT_DIR / "mlflow.json", {"run_id": run.info.run_id, "model_uri": model_uri,
                                             "experiment_id": run.info.experiment_id})
    console.print(f"train: best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch} "
                  f"({result.seconds:.0f} s on {result.device}); MLflow run {run.info.run_id}")


if __name__ == "__main__":
    main()
