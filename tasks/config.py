"""params.yaml parsed once into a frozen, validated Params object; `--set` overrides."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = "params.yaml"


def project_root(start: Path | None = None) -> Path:
    """The project folder: the nearest folder at or above start (default: cwd) holding dvc.yaml and params.yaml.

    Outside a project this is an error, never a fallback: acting on whichever checkout the package happens to
    be installed from (its data, its registry) would be a silent surprise."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / PARAMS_FILE).is_file():
            return folder
    installed = PROJECT_ROOT if (PROJECT_ROOT / "dvc.yaml").is_file() else None
    raise NotInProject(f"{here} is not inside an imgclf project (no folder at or above it holds dvc.yaml and "
                       f"{PARAMS_FILE}): run this from the project folder"
                       + (f", e.g. cd {installed}" if installed else ""))


def is_url(source: str) -> bool:
    """True for http(s) sources."""
    return source.startswith(("http://", "https://"))


def is_local(source: str) -> bool:
    """True for a source that is a local path (a folder, archive or CSV), not sample: nor a URL."""
    return not source.startswith("sample:") and not is_url(source)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(_Section):
    seed: int = 42


class IngestParams(_Section):
    source: str = "sample:digits"
    watch: str = "tasks/sample.py"
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    sample_size: int = Field(32, ge=8, le=512)
    max_members: int = Field(1_000_000, ge=1)
    max_total_bytes: int = Field(50 * 2**30, ge=1)
    max_compression_ratio: float = Field(100.0, gt=1)

    @model_validator(mode="after")
    def _check_source(self) -> "IngestParams":
        if is_url(self.source) and not self.sha256:
            raise ValueError(f"ingest.sha256 is required for the URL source {self.source!r}")
        if is_local(self.source):
            if "~" in Path(self.watch).parts[:1]:
                raise ValueError(f"ingest.watch ({self.watch!r}): DVC does not expand ~; write the full path")
            if Path(self.watch) == Path("."):
                raise ValueError("ingest.watch is the project folder itself: DVC cannot watch the folder its own "
                                 "outputs live in. Put the images (and a CSV manifest) in a folder of their own")
            src, watch = Path(self.source), Path(self.watch)
            if src.suffix.lower() == ".csv":
                # a CSV lists images beside it: watching the CSV alone would miss a changed image
                if watch not in src.parents:
                    raise ValueError(
                        f"ingest.watch ({self.watch!r}) must be a folder holding the CSV manifest and its images, "
                        f"so DVC re-ingests when either changes: set ingest.watch: {src.parent.as_posix() or '.'}"
                    )
            elif src != watch and watch not in src.parents:
                raise ValueError(
                    f"ingest.watch ({self.watch!r}) must be the source path or a folder above it, "
                    f"so DVC re-ingests when images change: set ingest.watch: {self.source}"
                )
        return self


# Every mode the image policy (tasks/preprocess.to_mode) converts explicitly.
SUPPORTED_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr",
                   "I", "I;16", "I;16B", "I;16L", "I;16N", "F"]


class ValidateParams(_Section):
    min_images_per_class: int = Field(10, ge=1)
    labels: list[str] | None = None
    max_pixels: int = Field(50_000_000, ge=1)
    min_side: int = Field(8, ge=1)
    max_side: int = Field(20_000, ge=1)
    allowed_modes: list[str] = Field(default_factory=lambda: list(SUPPORTED_MODES), min_length=1)
    max_class_imbalance: float = Field(10.0, ge=1)
    max_rejected_share: float = Field(0.05, ge=0, le=1)
    max_duplicate_share: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _check_bounds(self) -> "ValidateParams":
        if self.min_side > self.max_side:
            raise ValueError("validate.min_side must not exceed validate.max_side")
        unknown = sorted(set(self.allowed_modes) - set(SUPPORTED_MODES))
        if unknown:
            raise ValueError(f"validate.allowed_modes: {unknown} not supported; choose from {SUPPORTED_MODES}")
        return self


class SplitParams(_Section):
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    near_duplicate_distance: int = Field(4, ge=0, le=64)

    @model_validator(mode="after")
    def _leave_training_data(self) -> "SplitParams":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("split.val_fraction + split.test_fraction must leave at least 10% for training")
        return self


class TrainParams(_Section):
    model: str = "smallcnn"
    image_size: int = Field(32, ge=8, le=1024)
    epochs: int = Field(15, ge=1)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(0.003, gt=0)
    weight_decay: float = Field(0.0005, ge=0)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    hflip: bool = False
    translate: float = Field(0.08, ge=0, lt=0.5)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    scheduler: Literal["onecycle", "cosine"] = "onecycle"
    warmup_epochs: int = Field(0, ge=0)
    patience: int = Field(0, ge=0)
    grad_clip: float = Field(0.0, ge=0)
    class_weights: Literal["none", "balanced"] = "none"
    ema_decay: float = Field(0.0, ge=0, lt=1)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    random_erasing: float = Field(0.0, ge=0, le=1)
    auto_augment: Literal["none", "trivial", "randaugment"] = "none"
    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    pretrained: str | None = None
    pretrained_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    freeze_epochs: int = Field(0, ge=0)
    backbone_lr_mult: float = Field(0.1, gt=0)
    compile: bool = False
    in_memory: bool | Literal["auto"] = "auto"
    cache_max_gb: float = Field(4.0, gt=0)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _legacy_trivial_augment(cls, data: Any) -> Any:
        """`trivial_augment: true` (before auto_augment existed) still means auto_augment: trivial."""
        if isinstance(data, dict) and "trivial_augment" in data:
            data = dict(data)
            legacy = data.pop("trivial_augment")
            if legacy and data.get("auto_augment", "none") not in ("none", "trivial"):
                raise ValueError("train.trivial_augment is replaced by train.auto_augment; set only auto_augment")
            if legacy:
                data["auto_augment"] = "trivial"
        return data

    @model_validator(mode="after")
    def _check_schedule(self) -> "TrainParams":
        low, high = self.rrc_scale
        if not 0 < low <= high <= 1:
            raise ValueError("train.rrc_scale must be [low, high] with 0 < low <= high <= 1")
        if self.scheduler == "cosine" and self.warmup_epochs >= self.epochs:
            raise ValueError("train.warmup_epochs must be smaller than train.epochs")
        if self.freeze_epochs >= self.epochs:
            raise ValueError("train.freeze_epochs must be smaller than train.epochs")
        if self.pretrained_sha256 and not self.pretrained:
            raise ValueError("train.pretrained_sha256 pins a local weights file: set train.pretrained to its path")
        return self


class EvaluateParams(_Section):
    batch_size: int = Field(256, ge=1)
    bootstrap_samples: int = Field(1000, ge=100)
    calibration_bins: int = Field(15, ge=2, le=100)
    temperature_scaling: bool = True
    worst_n: int = Field(18, ge=0, le=200)
    gradcam: bool = True
    slices: list[str] = ["format", "mode", "size_bucket", "folder"]
    slice_min_images: int = Field(10, ge=1)
    latency_repeats: int = Field(20, ge=1)
    onnx_opset: int = Field(17, ge=9)
    cv_folds: int = Field(0, ge=0)
    cv_group_column: str | None = "group"
    cv_val_fraction: float = Field(0.1, gt=0, lt=0.5)
    label_issues_max: int = Field(24, ge=1)

    @model_validator(mode="after")
    def _folds(self) -> "EvaluateParams":
        if self.cv_folds == 1:
            raise ValueError("evaluate.cv_folds must be 0 (off) or at least 2")
        return self


class RegisterParams(_Section):
    model_name: str = "imgclf"
    experiment: str = "imgclf"
    tracking_uri: str = "sqlite:///mlflow.db"


class PromoteParams(_Section):
    min_accuracy: float = Field(0.8, ge=0, le=1)
    min_macro_f1: float = Field(0.8, ge=0, le=1)
    margin: float = Field(0.02, ge=0, lt=1)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    bootstrap_samples: int = Field(2000, ge=100)
    max_class_recall_drop: float = Field(0.10, ge=0, le=1)
    max_ece: float | None = Field(None, ge=0, le=1)
    max_latency_ms_b1: float | None = Field(None, gt=0)
    min_onnx_agreement: float | None = Field(0.99, ge=0, le=1)
    require_approval: bool = False

    def policy(self, seed: int = 0):
        """The gate's view of this section."""
        from tasks.gate import Policy

        return Policy(**self.model_dump(exclude={"require_approval"}), seed=seed)


class ScheduleParams(_Section):
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    webhook_url: str | None = None
    wait_for_lock_s: float = Field(0, ge=0)
    task_runner: Literal["thread", "dask", "ray"] = "thread"
    max_parallel: int = Field(2, ge=1)  # sweep candidates at once: thread pool size / local Dask workers


class Params(_Section):
    base: BaseParams = BaseParams()
    ingest: IngestParams = IngestParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    register_: RegisterParams = Field(RegisterParams(), alias="register")
    promote: PromoteParams = PromoteParams()
    schedule: ScheduleParams = ScheduleParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in params.yaml's shape."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """Stable hash of the resolved params."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


class ParamsError(ValueError):
    """params.yaml or an override is invalid; the message names the key."""


class NotInProject(ParamsError):
    """A command was run outside any imgclf project folder."""


def source_from(source: str, *, cwd: Path, root: Path) -> str:
    """Pure: a source typed on the command line, as params.yaml should hold it. A local path is the user's
    (relative to where they typed it, ~ expanded), stored relative to the project when inside it (the stage
    runs there), else absolute; sample: and URL sources are left as they are."""
    if not is_local(source):
        return source
    path = Path(os.path.expanduser(source))
    path = Path(os.path.normpath(path if path.is_absolute() else cwd / path))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def source_overrides(source: str) -> dict[str, str]:
    """Overrides that point one run at another source; a local path is also what DVC watches (for a CSV
    manifest, the folder holding it and its images)."""
    out = {"ingest.source": source}
    if is_local(source):
        out["ingest.watch"] = str(Path(source).parent) if source.lower().endswith(".csv") else source
    return out


def missing_source(source: str, root: Path) -> str | None:
    """Why a local ingest.source cannot be ingested because it is not there (relative paths are the project's,
    as the stage runs there); None when it exists or is not a local path."""
    if not is_local(source):
        return None
    path = Path(source).expanduser()
    path = path if path.is_absolute() else root / path
    if path.exists():
        return None
    return f"ingest.source {source!r}: {path} does not exist (a folder of class sub-folders, an archive or a CSV)"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ['train.epochs=5', ...] into {'train.epochs': 5}; values parse as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ParamsError(f"override {item!r} must look like section.key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of raw params with dotted-key overrides applied; unknown keys are errors."""
    merged = copy.deepcopy(raw)
    known = Params().to_dict()
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node, schema = merged, known
        for part in parts[:-1]:
            if part not in schema or not isinstance(schema[part], dict):
                raise ParamsError(f"unknown parameter {dotted!r}")
            node = node.setdefault(part, {})
            schema = schema[part]
        if parts[-1] not in schema:
            raise ParamsError(f"unknown parameter {dotted!r}")
        node[parts[-1]] = value
    return merged


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping; errors name the offending key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "params"
            lines.append(f"  {where}: {err['msg']}")
        raise ParamsError("invalid parameters:\n" + "\n".join(lines)) from None


def read_raw(path: Path) -> dict[str, Any]:
    """Read a params YAML file into a plain dict."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    return data


def load_params(path: Path | str = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Load, override and validate params.yaml."""
    raw = read_raw(Path(path))
    return parse_params(apply_overrides(raw, overrides or {}))


def write_resolved(params: Params, dest: Path) -> None:
    """Write the resolved params next to a stage's outputs (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    tmp.replace(dest)


def write_overrides(path: Path, overrides: dict[str, Any]) -> bytes:
    """Apply overrides to params.yaml in place (comments kept); return the original bytes to restore."""
    from ruamel.yaml import YAML

    path = Path(path)
    original = path.read_bytes()
    load_params(path, overrides)  # validate before touching the file
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    data = yaml_rt.load(original.decode())
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        yaml_rt.dump(data, fh)
    tmp.replace(path)
    return original


def restore_file(path: Path, original: bytes) -> None:
    """Put a file's original bytes back atomically."""
    tmp = Path(path).with_name(f".{Path(path).name}.restore")
    tmp.write_bytes(original)
    tmp.replace(path)
