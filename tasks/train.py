"""Stage `train`: decode the splits once, train a model by name, log to MLflow, save safetensors."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.io import write_json
from tasks.models import channels_last
from tasks.preprocess import Preprocess, load_tensor, normalize

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

RAW_DIR = Path("data/raw")
SPLITS_DIR = Path("data/splits")
MANIFEST = Path("data/manifest.csv")
OUT_DIR = Path("models/candidate")


CHECKPOINT_ROOT = Path(".imgclf/checkpoints")
CPU_MAX_BATCH = 256
MAX_OOM_RETRIES = 3
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)
# What fit()'s on_batch callback receives, once per training step.
BATCH_FIELDS = ("epoch", "epochs", "step", "steps", "images", "loss", "accuracy", "lr", "throughput")


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. the loss became NaN); nothing is saved."""


@dataclass(frozen=True)
class TrainConfig:
    model: str
    image_size: int
    epochs: int
    batch_size: int | str  # an int, or "auto": the largest power of two that fits the device
    optimizer: str
    lr: float
    weight_decay: float
    label_smoothing: float
    hflip: bool
    translate: float
    device: str
    seed: int
    scheduler: str = "onecycle"  # onecycle | cosine (linear warmup for warmup_epochs, then cosine)
    warmup_epochs: int = 0
    patience: int = 0  # early stopping on val accuracy; 0 = off
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    class_weights: str = "none"  # none | balanced
    ema_decay: float = 0.0  # EMA of weights; 0 = off (on: the EMA weights are evaluated and saved)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    random_erasing: float = 0.0  # probability per image
    auto_augment: str = "none"  # none | trivial (TrivialAugmentWide) | randaugment (RandAugment), per image
    random_resized_crop: bool = False  # RandomResizedCrop per image on the decoded cache (to image_size)
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    pretrained: str | None = None  # torchvision weights name or a local state_dict file
    pretrained_sha256: str | None = None  # what a local weights file must hash to (train.pretrained_sha256)
    freeze_epochs: int = 0  # head-only epochs at the start (pretrained models)
    backbone_lr_mult: float = 0.1  # backbone lr = lr * this when pretrained
    compile: bool = False
    in_memory: bool | str = "auto"  # True: decode once into RAM; False: stream files; "auto": cache if < cache_max_gb
    cache_max_gb: float = 4.0
    num_workers: int | str = "auto"  # streaming DataLoader workers; "auto": min(4, cpus)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    device: str = "cpu"
    seconds: float = 0.0
    batch_size: int = 0  # the effective batch size (after "auto" and any out-of-memory halving)
    oom_retries: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int = 0


def resolve_device(preference: str) -> str:
    """cuda, then mps, then cpu, unless one is asked for."""
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is cuda but torch sees no CUDA device (torch.cuda.is_available() is "
                            "False): set train.device: auto (or cpu)")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError("train.device is mps but torch sees no MPS device: set train.device: auto (or cpu)")
    if preference != "auto":
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def hardware_info(device: str) -> dict[str, str]:
    """What the run ran on, for MLflow tags."""
    import os

    import torch

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "host.cpus": str(os.cpu_count()), "host.torch_threads": str(torch.get_num_threads()),
            "host.machine": platform.machine()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu.name": props.name, "gpu.count": str(torch.cuda.device_count()),
                     "gpu.memory_gb": f"{props.total_memory / 2**30:.1f}", "cuda": str(torch.version.cuda)})
    return info


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun / an initialised process group; (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")


def find_batch_size(fits: Callable[[int], bool], *, cap: int, floor: int = 1) -> int:
    """Largest power of two <= cap for which fits(batch) holds (halving from cap)."""
    size = 1 << max(0, int(cap).bit_length() - 1)
    while size > floor and not fits(size):
        size //= 2
    if not fits(size):
        raise TrainingError(f"even a batch of {size} does not fit on the device")
    return size


def _cuda_fits(model: "nn.Module", spec: Preprocess, num_classes: int, device: str) -> Callable[[int], bool]:
    """A probe: one forward+backward at batch size b under bf16 autocast; False on CUDA OOM."""
    import torch

    def fits(batch: int) -> bool:
        try:
            x = torch.randn(batch, spec.channels, spec.size, spec.size, device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(
                    model(x).float(), torch.randint(0, num_classes, (batch,), device=device))
            loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return fits


def resolve_batch_size(cfg: TrainConfig, model: "nn.Module", spec: Preprocess, *, n_train: int,
                       num_classes: int, device: str) -> int:
    """An int batch size as given; "auto": the largest power of two that fits (CPU: capped, no probing)."""
    if cfg.batch_size != "auto":
        return int(cfg.batch_size)
    cap = max(1, min(CPU_MAX_BATCH if device != "cuda" else 4096, n_train))
    if device != "cuda":
        return find_batch_size(lambda _b: True, cap=cap)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to(device).train()
    try:
        return find_batch_size(_cuda_fits(model, spec, num_classes, device), cap=cap)
    finally:
        model.load_state_dict(initial)  # the probe's steps moved BatchNorm statistics


def load_split(frame: "pd.DataFrame", raw_dir: Path, spec: Preprocess,
               class_index: dict[str, int], *, in_memory: bool = True,
               ) -> tuple["torch.Tensor | DecodedFiles", "torch.Tensor"]:
    """Decode a split once into uint8 N x C x S x S plus int64 labels (the in-memory fast path);
    in_memory=False: the files, decoded on demand (streaming), plus the labels."""
    import torch

    if not in_memory:
        labels = torch.tensor([class_index[str(c)] for c in frame["label"]], dtype=torch.int64)
        return DecodedFiles([str(raw_dir / rel) for rel in frame["path"]], spec), labels
    images = torch.empty((len(frame), spec.channels, spec.size, spec.size), dtype=torch.uint8)
    for i, rel in enumerate(frame["path"]):
        images[i] = load_tensor(raw_dir / rel, spec)
    labels = torch.tensor([class_index[str(c)] for c in frame["label"]], dtype=torch.int64)
    return images, labels


class DecodedFiles:
    """A split read from disk on demand (the streaming path): item i -> uint8 C x S x S via load_tensor.

    Map-style for torch's DataLoader (int index); a tensor/list/slice of indices returns a stacked batch,
    like indexing the in-memory cache."""

    def __init__(self, paths: list[str], spec: Preprocess) -> None:
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> "torch.Tensor":
        import torch

        if isinstance(index, int):
            return load_tensor(self.paths[index], self.spec)
        picks = range(len(self))[index] if isinstance(index, slice) else [int(i) for i in index]
        return torch.stack([load_tensor(self.paths[i], self.spec) for i in picks])


def use_cache(in_memory: bool | str, n_images: int, spec: Preprocess, cache_max_gb: float) -> bool:
    """True: decode once into a uint8 cache; False: stream. "auto": cache when N*C*S*S bytes < the cap."""
    if in_memory != "auto":
        return bool(in_memory)
    return n_images * spec.channels * spec.size * spec.size < cache_max_gb * 2**30


def resolve_workers(num_workers: int | str) -> int:
    import os

    return min(4, os.cpu_count() or 1) if num_workers == "auto" else int(num_workers)


def iter_batches(images: "torch.Tensor | DecodedFiles", chunks: list["torch.Tensor"], *, num_workers: int = 0,
                 pin_memory: bool = False):
    """uint8 batches for the given index chunks: slices of the cache, or a DataLoader over the files."""
    import torch

    if isinstance(images, torch.Tensor):
        for idx in chunks:
            yield images[idx]
        return
    from torch.utils.data import DataLoader

    # Its own generator: a DataLoader draws a worker base seed, which must not move torch's global RNG
    # (dropout, per-image augmentation and MixUp draw from it: streaming trains like the cache).
    loader = DataLoader(images, batch_sampler=[c.tolist() for c in chunks], num_workers=num_workers,
                        pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
    yield from loader


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
        grid = F.affine_grid(theta.to(batch.device, batch.dtype), list(batch.shape), align_corners=False)
        batch = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return batch


def random_erase(batch: "torch.Tensor", *, p: float, generator: "torch.Generator",
                 scale: tuple[float, float] = ERASE_SCALE, ratio: tuple[float, float] = ERASE_RATIO,
                 ) -> "torch.Tensor":
    """Batched RandomErasing: each image, with probability p, gets one random rectangle set to 0 (the mean)."""
    import torch

    n, _, h, w = batch.shape
    area = torch.empty(n).uniform_(*scale, generator=generator) * h * w
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    eh = (area * log_r.exp()).sqrt().clamp(1, h)
    ew = (area / log_r.exp()).sqrt().clamp(1, w)
    top = torch.rand(n, generator=generator) * (h - eh)
    left = torch.rand(n, generator=generator) * (w - ew)
    on = torch.rand(n, generator=generator) < p
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)) & on.view(-1, 1, 1))
    return batch.masked_fill(mask.unsqueeze(1).to(batch.device), 0.0)


RRC_RATIO = (3 / 4, 4 / 3)
RANDAUGMENT = {"num_ops": 2, "magnitude": 9}


def presets(cfg: TrainConfig, spec: Preprocess) -> dict[str, Any]:
    """The resolved train and eval presets, in the order they run; saved in model.json under `presets`.

    Defined once: sample_ops() builds the per-image transforms.v2 ops from the same settings, and the
    eval preset is tasks/preprocess.py's policy (used for the decoded cache, evaluation and serving)."""
    decode = [{"op": "Resize", "shorter_side": spec.size, "antialias": True},
              {"op": "CenterCrop", "size": [spec.size, spec.size]}]
    norm = {"op": "Normalize", "mean": list(spec.mean), "std": list(spec.std)}
    train: list[dict[str, Any]] = [dict(d, stage="decode") for d in decode]
    if cfg.random_resized_crop:
        train.append({"op": "RandomResizedCrop", "stage": "per_image", "size": [spec.size, spec.size],
                      "scale": list(cfg.rrc_scale), "ratio": list(RRC_RATIO), "antialias": True})
    if cfg.auto_augment == "trivial":
        train.append({"op": "TrivialAugmentWide", "stage": "per_image"})
    elif cfg.auto_augment == "randaugment":
        train.append({"op": "RandAugment", "stage": "per_image", **RANDAUGMENT})
    train.append(dict(norm, stage="batch"))
    if cfg.hflip:
        train.append({"op": "RandomHorizontalFlip", "stage": "batch", "p": 0.5})
    if cfg.translate > 0:
        train.append({"op": "RandomTranslate", "stage": "batch", "max_fraction": cfg.translate})
    if cfg.random_erasing > 0:
        train.append({"op": "RandomErasing", "stage": "batch", "p": cfg.random_erasing,
                      "scale": list(ERASE_SCALE), "ratio": list(ERASE_RATIO), "value": 0.0})
    mixes = [{"op": name, "alpha": alpha} for name, alpha in (("MixUp", cfg.mixup_alpha),
                                                              ("CutMix", cfg.cutmix_alpha)) if alpha > 0]
    if mixes:
        train.append({"op": "RandomChoice", "stage": "batch", "of": mixes} if len(mixes) > 1
                     else dict(mixes[0], stage="batch"))
    return {"train": train, "eval": [*decode, norm], "mode": spec.mode, "image_size": spec.size}


def sample_ops(cfg: TrainConfig, spec: Preprocess) -> Callable | None:
    """The per-image transforms.v2 ops of the train preset (on uint8 C x S x S), or None when there are none."""
    from torchvision.transforms import v2

    ops: list[Callable] = []
    if cfg.random_resized_crop:
        ops.append(v2.RandomResizedCrop([spec.size, spec.size], scale=tuple(cfg.rrc_scale), ratio=RRC_RATIO,
                                        antialias=True))
    if cfg.auto_augment == "trivial":
        ops.append(v2.TrivialAugmentWide())
    elif cfg.auto_augment == "randaugment":
        ops.append(v2.RandAugment(**RANDAUGMENT))
    elif cfg.auto_augment != "none":
        raise ValueError(f"train.auto_augment: {cfg.auto_augment!r} is not none, trivial or randaugment")
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.Compose(ops)


def per_image(batch: "torch.Tensor", op: Callable) -> "torch.Tensor":
    """Apply a transforms.v2 op to each uint8 image of a batch (each its own draw; torch's global RNG)."""
    import torch

    return torch.stack([op(img) for img in batch])


def trivial_augment(batch: "torch.Tensor") -> "torch.Tensor":
    """TrivialAugmentWide per image on uint8 (on whatever device the batch is); uses torch's global RNG."""
    from torchvision.transforms import v2

    return per_image(batch, v2.TrivialAugmentWide())


def _mix(cfg: TrainConfig, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix from transforms.v2 on the batch (one of them per batch when both are on)."""
    from torchvision.transforms import v2

    ops = []
    if cfg.mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def class_weights(labels: "torch.Tensor", num_classes: int, mode: str) -> "torch.Tensor | None":
    """'balanced': n / (K * count_c), as scikit-learn does; 'none': None."""
    import torch

    if mode == "none":
        return None
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
    return len(labels) / (num_classes * counts)


def _evaluate(model: "nn.Module", images: "torch.Tensor | DecodedFiles", labels: "torch.Tensor", spec: Preprocess,
              device: str, batch_size: int, num_workers: int = 0) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    total_loss, correct = 0.0, 0
    chunks = list(torch.arange(len(images)).split(batch_size))
    batches = iter_batches(images, chunks, num_workers=num_workers, pin_memory=device == "cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        for start, batch in zip(range(0, len(images), batch_size), batches):
            x = normalize(batch.to(device), spec)
            if channels_last(device):
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[start:start + batch_size].to(device)
            logits = model(x).float()
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    n = max(len(images), 1)
    return total_loss / n, correct / n


def run_key(cfg: TrainConfig, *data_files: Path) -> str:
    """Hash of the resolved train config and the data it trains on: names a run's checkpoint folder."""
    import hashlib
    import json
    from dataclasses import asdict

    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    for path in sorted(p for f in data_files for p in (sorted(f.rglob("*")) if f.is_dir() else [f])):
        if path.is_file():
            h.update(str(path.name).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file, fsync, then rename: a kill leaves the old checkpoint or the new one."""
    import os

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The last checkpoint, loaded without unpickling code; None if there is none."""
    import torch

    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _param_groups(model: "nn.Module", cfg: TrainConfig) -> tuple[list[dict], list["nn.Parameter"]]:
    """One group normally; with pretrained weights: backbone (lr * backbone_lr_mult) and head (lr)."""
    from tasks.models import head_name

    if not cfg.pretrained and cfg.freeze_epochs == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}], []
    head = head_name(model) + "."
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if not n.startswith(head)]
    mult = cfg.backbone_lr_mult if cfg.pretrained else 1.0
    return ([{"params": backbone, "lr": cfg.lr * mult}, {"params": [p for n, p in named if n.startswith(head)],
                                                         "lr": cfg.lr}], backbone)


def _scheduler(opt: "torch.optim.Optimizer", cfg: TrainConfig, steps_per_epoch: int):
    import torch

    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "cosine":
        warmup = cfg.warmup_epochs * steps_per_epoch

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total,
                                               pct_start=0.2)


def fit(model: "nn.Module", train: tuple["torch.Tensor", "torch.Tensor"], val: tuple["torch.Tensor", "torch.Tensor"],
        spec: Preprocess, cfg: TrainConfig, *, on_epoch: Callable[[dict[str, float]], None] | None = None,
        on_batch: Callable[[dict[str, float]], None] | None = None,
        checkpoint: Path | None = None, max_oom_retries: int = MAX_OOM_RETRIES,
        ) -> tuple[TrainResult, dict[str, "torch.Tensor"]]:
    """Train; return the history and the best-on-validation weights.

    on_epoch(row) gets each epoch's history row; on_batch(row) is called once per training step with
    BATCH_FIELDS (epoch, epochs, step, steps, images, loss, accuracy, lr, throughput), for progress bars.

    With `checkpoint`, the state is saved there atomically after every epoch and a rerun resumes from it.
    CUDA out-of-memory halves the batch size and restarts (at most max_oom_retries times)."""
    import torch

    device = resolve_device(cfg.device)
    num_classes = int(max(int(train[1].max()), int(val[1].max())) + 1) if len(train[1]) else 1
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    batch_size = resolve_batch_size(cfg, model, spec, n_train=len(train[0]), num_classes=num_classes,
                                     device=device)
    saved = load_checkpoint(checkpoint) if checkpoint else None
    if saved is not None:
        batch_size = int(saved["batch_size"])
    for attempt in range(max_oom_retries + 1):
        try:
            result, best = _fit(model, train, val, spec, cfg, device=device, batch_size=batch_size,
                                num_classes=num_classes, on_epoch=on_epoch, on_batch=on_batch,
                                checkpoint=checkpoint, saved=saved)
            result.oom_retries = attempt
            return result, best
        except torch.cuda.OutOfMemoryError as exc:
            if attempt == max_oom_retries or batch_size == 1:
                raise TrainingError(f"out of memory at batch size {batch_size} after {attempt} retries: "
                                    "lower train.batch_size or train.image_size") from exc
            batch_size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # Restart cleanly at the smaller batch: the schedule depends on steps per epoch.
            model.load_state_dict(initial)
            torch.set_rng_state(rng)
            saved = None
            if checkpoint:
                checkpoint.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _fit(model: "nn.Module", train: tuple["torch.Tensor", "torch.Tensor"], val: tuple["torch.Tensor", "torch.Tensor"],
         spec: Preprocess, cfg: TrainConfig, *, device: str, batch_size: int, num_classes: int,
         on_epoch: Callable[[dict[str, float]], None] | None, checkpoint: Path | None,
         saved: dict[str, Any] | None, on_batch: Callable[[dict[str, float]], None] | None = None,
         ) -> tuple[TrainResult, dict[str, "torch.Tensor"]]:
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    if channels_last(device):
        model.to(memory_format=torch.channels_last)
    rank, world = distributed_rank()
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, find_unused_parameters=cfg.freeze_epochs > 0)
    forward = torch.compile(forward) if cfg.compile else forward
    groups, backbone = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train, y_train = train
    per_rank = len(x_train) // world  # equal shards: every rank takes the same number of steps
    steps_per_epoch = max(1, math.ceil(per_rank / batch_size))
    sched = _scheduler(opt, cfg, steps_per_epoch)
    ema = None
    if cfg.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    weight = class_weights(y_train, num_classes, cfg.class_weights)
    weight = weight.to(device) if weight is not None else None
    mix = _mix(cfg, num_classes)
    per_image_ops = sample_ops(cfg, spec)
    streaming = not isinstance(x_train, torch.Tensor)
    workers = resolve_workers(cfg.num_workers) if streaming else 0
    result = TrainResult(device=device, batch_size=batch_size)
    best_state: dict[str, torch.Tensor] = {}
    best_key = (-1.0, float("-inf"))
    bad_epochs, first_epoch = 0, 1
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        if device == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"])
        best_state, best_key = saved["best_state"], tuple(saved["best_key"])
        result.history = list(saved["history"])
        result.best_epoch, result.best_val_accuracy = int(saved["best_epoch"]), float(saved["best_val_accuracy"])
        bad_epochs, first_epoch = int(saved["bad_epochs"]), int(saved["epoch"]) + 1
        result.resumed_from_epoch = int(saved["epoch"])
        result.stopped_early = bool(saved["stopped_early"])
        if on_epoch:
            for row in result.history:
                on_epoch(row)
    started = time.perf_counter()
    for epoch in range(first_epoch, cfg.epochs + 1):
        if result.stopped_early:
            break
        frozen = epoch <= cfg.freeze_epochs
        for p in backbone:
            p.requires_grad_(not frozen)
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)  # same seed: same order on every rank
        if world > 1:
            order = order[:per_rank * world][rank::world]
        seen, loss_sum, correct = 0, 0.0, 0
        chunks = list(order.split(batch_size))
        steps = len(chunks)
        batches = iter_batches(x_train, chunks, num_workers=workers, pin_memory=device == "cuda")
        for step, (idx, x) in enumerate(zip(chunks, batches), 1):
            x = x.to(device, non_blocking=True)
            if per_image_ops is not None:
                x = per_image(x, per_image_ops)
            x = normalize(x, spec)
            x = augment(x, translate=cfg.translate, hflip=cfg.hflip, generator=generator)
            if cfg.random_erasing > 0:
                x = random_erase(x, p=cfg.random_erasing, generator=generator)
            y = y_train[idx].to(device, non_blocking=True)
            target = y
            if mix is not None and len(idx) > 1:
                x, target = mix(x, y)
            if channels_last(device):
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = forward(x).float()
            loss = F.cross_entropy(logits, target, weight=weight, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch}; nothing was saved. "
                                    "Lower train.lr or check the data.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            seen += len(idx)
            batch_loss = loss.item()
            loss_sum += batch_loss * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            if on_batch is not None:
                on_batch({"epoch": epoch, "epochs": cfg.epochs, "step": step, "steps": steps, "images": seen,
                          "loss": batch_loss, "accuracy": correct / seen, "lr": sched.get_last_lr()[-1],
                          "throughput": seen / max(time.perf_counter() - t0, 1e-9)})
        train_seconds = time.perf_counter() - t0
        if world > 1:
            totals = torch.tensor([seen, loss_sum, correct], dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            seen, loss_sum, correct = int(totals[0]), float(totals[1]), int(totals[2])
            # BatchNorm statistics (and the EMA, which averages them) drift per shard: take rank 0's.
            for module in (model, ema) if ema is not None else (model,):
                for tensor in module.state_dict().values():
                    torch.distributed.broadcast(tensor, 0)
        scored = ema.module if ema is not None else model
        val_loss, val_acc = _evaluate(scored, *val, spec, device, batch_size * 4, num_workers=workers)
        row = {"epoch": epoch, "train/loss": loss_sum / seen, "train/accuracy": correct / seen,
               "val/loss": val_loss, "val/accuracy": val_acc, "lr": sched.get_last_lr()[-1],
               "throughput": seen / train_seconds}
        result.history.append(row)
        if (val_acc, -val_loss) > best_key:
            best_key = (val_acc, -val_loss)
            result.best_epoch, result.best_val_accuracy = epoch, val_acc
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in scored.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
        result.stopped_early = cfg.patience > 0 and bad_epochs >= cfg.patience and epoch < cfg.epochs
        if checkpoint and rank == 0:
            state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "generator": generator.get_state(),
                     "torch_rng": torch.get_rng_state(), "best_state": best_state, "best_key": list(best_key),
                     "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                     "history": result.history, "bad_epochs": bad_epochs, "batch_size": batch_size,
                     "stopped_early": result.stopped_early}
            if ema is not None:
                state["ema"] = ema.state_dict()
            if device == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state()
            save_checkpoint(checkpoint, state)
        if on_epoch:
            on_epoch(row)
    result.seconds = time.perf_counter() - started
    return result, best_state


def config_from_params(params: Any) -> TrainConfig:
    t = params.train
    return TrainConfig(model=t.model, image_size=t.image_size, epochs=t.epochs, batch_size=t.batch_size,
                       optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                       label_smoothing=t.label_smoothing, hflip=t.hflip, translate=t.translate,
                       device=t.device, seed=params.base.seed, scheduler=t.scheduler,
                       warmup_epochs=t.warmup_epochs, patience=t.patience, grad_clip=t.grad_clip,
                       class_weights=t.class_weights, ema_decay=t.ema_decay, mixup_alpha=t.mixup_alpha,
                       cutmix_alpha=t.cutmix_alpha, random_erasing=t.random_erasing,
                       auto_augment=t.auto_augment, random_resized_crop=t.random_resized_crop,
                       rrc_scale=tuple(t.rrc_scale), pretrained=t.pretrained, pretrained_sha256=t.pretrained_sha256,
                       freeze_epochs=t.freeze_epochs, backbone_lr_mult=t.backbone_lr_mult, compile=t.compile,
                       in_memory=t.in_memory, cache_max_gb=t.cache_max_gb, num_workers=t.num_workers)


def seed_everything(seed: int) -> None:
    """Same seed, same CPU result."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Prepared:
    classes: list[str]
    spec: Preprocess
    train: tuple["torch.Tensor | DecodedFiles", "torch.Tensor"]
    val: tuple["torch.Tensor | DecodedFiles", "torch.Tensor"]
    in_memory: bool = True


def prepare(cfg: TrainConfig, *, raw_dir: Path, splits_dir: Path, dataset_mode: str) -> Prepared:
    """Read the splits, fix the class map and the model's input spec, decode train and val once."""
    import pandas as pd

    from tasks.models import input_mode

    frames = {name: pd.read_csv(splits_dir / f"{name}.csv", dtype={"label": str}) for name in ("train", "val")}
    classes = sorted(set(frames["train"]["label"]) | set(frames["val"]["label"]))
    class_index = {c: i for i, c in enumerate(classes)}
    spec = Preprocess.for_mode(input_mode(cfg.model, dataset_mode), cfg.image_size)
    cached = use_cache(cfg.in_memory, sum(len(f) for f in frames.values()), spec, cfg.cache_max_gb)
    return Prepared(classes, spec, load_split(frames["train"], raw_dir, spec, class_index, in_memory=cached),
                    load_split(frames["val"], raw_dir, spec, class_index, in_memory=cached), cached)


def train(cfg: TrainConfig, *, raw_dir: Path, splits_dir: Path, dataset_mode: str, out_dir: Path,
          on_epoch: Callable[[dict[str, float]], None] | None = None,
          on_batch: Callable[[dict[str, float]], None] | None = None,
          checkpoint_root: Path | None = None) -> TrainResult:
    """Core: splits + images -> trained model saved in out_dir (weights, class map, preprocessing).

    With checkpoint_root, a killed run resumes from <root>/<hash of config and data>/last.pt; the
    checkpoint is removed once the model is saved."""
    from tasks.models import build_model, save_model, weights_file_sha256

    weights_sha256 = weights_file_sha256(cfg.pretrained)
    if cfg.pretrained_sha256 and weights_sha256 and weights_sha256 != cfg.pretrained_sha256.lower():
        raise TrainingError(f"train.pretrained {cfg.pretrained}: its sha256 is {weights_sha256}, not "
                            f"train.pretrained_sha256 {cfg.pretrained_sha256.lower()}: the weights file changed. "
                            "Put the pinned file back, or pin the new one (which retrains)")
    seed_everything(cfg.seed)
    data = prepare(cfg, raw_dir=raw_dir, splits_dir=splits_dir, dataset_mode=dataset_mode)
    try:
        model = build_model(cfg.model, num_classes=len(data.classes), in_channels=data.spec.channels,
                            pretrained=cfg.pretrained, image_size=data.spec.size)
    except (ValueError, FileNotFoundError) as exc:  # a model name, weights file or image size that cannot work
        raise TrainingError(str(exc)) from None
    ckpt = None
    if checkpoint_root is not None:
        ckpt = checkpoint_root / run_key(cfg, splits_dir, raw_dir.parent / "manifest.csv") / "last.pt"
    result, best_state = fit(model, data.train, data.val, data.spec, cfg, on_epoch=on_epoch, on_batch=on_batch,
                             checkpoint=ckpt)
    if distributed_rank()[0] != 0:
        return result  # DDP: the other ranks hold the same weights; rank 0 saves them
    model.load_state_dict(best_state)
    save_model(out_dir, model, name=cfg.model, classes=data.classes, preprocess=data.spec,
               extra={"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                      "batch_size": result.batch_size, "presets": presets(cfg, data.spec),
                      "pretrained_sha256": weights_sha256})
    write_json(out_dir / "history.json", result.history)
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
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


def epoch_line(row: dict[str, float], epochs: int) -> str:
    """The one-line-per-epoch log (what non-terminal stderr gets: DVC, Prefect, CI)."""
    return (f"epoch {int(row['epoch']):>3}/{epochs}  loss {row['train/loss']:.4f}  "
            f"val_loss {row['val/loss']:.4f}  val_acc {row['val/accuracy']:.4f}  "
            f"lr {row['lr']:.2e}  {row['throughput']:.0f} img/s")


class ProgressReporter:
    """Live rich progress on a terminal (an epoch bar and a per-batch bar); one line per epoch otherwise.

    Use as a context manager; pass .on_batch (None when not live) and .on_epoch to fit()/train()."""

    def __init__(self, console: Any, epochs: int, *, live: bool | None = None) -> None:
        self.console, self.epochs = console, epochs
        self.live = console.is_terminal if live is None else live
        self.progress: Any = None
        self._epoch_task = self._batch_task = None

    def __enter__(self) -> "ProgressReporter":
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.progress.start()
            self._epoch_task = self.progress.add_task("epochs", total=self.epochs, stats="")
            self._batch_task = self.progress.add_task("batches", total=None, stats="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    @property
    def on_batch(self) -> Callable[[dict[str, float]], None] | None:
        return self._batch if self.live else None

    def _batch(self, row: dict[str, float]) -> None:
        self.progress.update(self._batch_task, total=int(row["steps"]), completed=int(row["step"]),
                             description=f"epoch {int(row['epoch'])}/{int(row['epochs'])}",
                             stats=f"loss {row['loss']:.4f}  acc {row['accuracy']:.3f}  lr {row['lr']:.2e}  "
                                   f"{row['throughput']:.0f} img/s")

    def on_epoch(self, row: dict[str, float]) -> None:
        line = epoch_line(row, self.epochs)
        if self.progress is None:
            self.console.print(line)
            return
        self.progress.console.print(line)
        self.progress.update(self._epoch_task, completed=int(row["epoch"]),
                             stats=f"val_acc {row['val/accuracy']:.4f}")


def main() -> None:
    """DVC stage entry point: train, then record everything in one MLflow run."""
    import json
    from concurrent.futures import Future, ThreadPoolExecutor

    import mlflow
    from rich.console import Console

    from tasks import tracking
    from tasks.config import load_params, write_resolved

    params = load_params()
    cfg = config_from_params(params)
    console = Console(stderr=True)
    import pandas as pd

    from tasks.validate import dataset_mode

    mode = dataset_mode(pd.read_csv(MANIFEST, dtype={"label": str}))
    try:
        device = resolve_device(cfg.device)
    except TrainingError as exc:  # before MLflow: no run is recorded for a device that is not there
        console.print(f"[red]training failed:[/] {exc}")
        raise SystemExit(1) from None
    init_distributed(device)
    if distributed_rank()[0] != 0:  # torchrun: only rank 0 tracks, checkpoints and saves
        train(cfg, raw_dir=RAW_DIR, splits_dir=SPLITS_DIR, dataset_mode=mode, out_dir=OUT_DIR,
              checkpoint_root=CHECKPOINT_ROOT)
        return
    # (not in a background thread beside torch's import: both hold the GIL, measured no faster)
    tracking.configure(params.register_.tracking_uri, params.register_.experiment)

    reporter = ProgressReporter(console, cfg.epochs)
    # One batched log_metrics call per epoch, written by a background thread while training goes on (MLflow's
    # own synchronous=False queue polls once a second, so draining it would cost up to 1 s per flush).
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
    writes: list[Future] = []
    tracking_seconds = 0.0  # time the run waits for MLflow: queuing each epoch's row + draining at the end

    def report(row: dict[str, float]) -> None:
        nonlocal tracking_seconds
        started = time.perf_counter()
        writes.append(writer.submit(mlflow.log_metrics, {k: v for k, v in row.items() if k != "epoch"},
                                    step=int(row["epoch"]), run_id=run.info.run_id))
        tracking_seconds += time.perf_counter() - started
        reporter.on_epoch(row)

    def drain() -> None:
        """Wait for every epoch's metrics to be in the store; a failed write fails the run."""
        nonlocal tracking_seconds
        started = time.perf_counter()
        writer.shutdown(wait=True)
        for done in writes:
            done.result()
        tracking_seconds += time.perf_counter() - started

    with mlflow.start_run(run_name=f"train-{cfg.model}") as run:
        mlflow.log_params(tracking.flatten(params.to_dict()))
        device = resolve_device(cfg.device)
        mlflow.set_tags({"imgclf.stage": "train", **hardware_info(device),
                         "world_size": str(distributed_rank()[1])})
        try:
            with reporter:
                result = train(cfg, raw_dir=RAW_DIR, splits_dir=SPLITS_DIR, dataset_mode=mode, out_dir=OUT_DIR,
                               on_epoch=report, on_batch=reporter.on_batch, checkpoint_root=CHECKPOINT_ROOT)
        except TrainingError as exc:
            drain()
            mlflow.set_tag("imgclf.failed", str(exc))
            console.print(f"[red]training failed:[/] {exc}")
            raise SystemExit(1) from None
        drain()
        write_resolved(params, OUT_DIR / "params.yaml")
        plot_curves(result.history, OUT_DIR / "curves.png")
        mlflow.log_metrics({"best_val_accuracy": result.best_val_accuracy, "train_seconds": result.seconds,
                            "effective_batch_size": result.batch_size, "oom_retries": result.oom_retries,
                            "epochs_run": len(result.history), "tracking_seconds": tracking_seconds,
                            "tracking_fraction": tracking_seconds / max(result.seconds, 1e-9)})
        meta = json.loads((OUT_DIR / "model.json").read_text())
        mlflow.set_tags({"imgclf.resumed_from_epoch": str(result.resumed_from_epoch),
                         "imgclf.stopped_early": str(result.stopped_early),
                         **({"pretrained.sha256": meta["pretrained_sha256"]} if meta.get("pretrained_sha256") else {})})
        mlflow.log_artifact(str(OUT_DIR / "curves.png"), "plots")
        mlflow.log_dict(meta, "model_meta.json")
        model_uri = tracking.log_serving_model(OUT_DIR)
        write_json(OUT_DIR / "mlflow.json", {"run_id": run.info.run_id, "model_uri": model_uri,
                                             "experiment_id": run.info.experiment_id})
    console.print(f"train: best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch} "
                  f"({result.seconds:.0f} s on {result.device}); MLflow run {run.info.run_id}")


if __name__ == "__main__":
    from tasks.stagehost import check_no_arguments, run_main

    check_no_arguments("tasks.train")
    run_main("tasks.train", main)
