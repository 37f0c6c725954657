"""Stratified (group-aware) k-fold cross-validation of the training recipe, and label quality from its
out-of-fold predictions (confident learning via cleanlab). Issues are reported, never auto-corrected."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from tasks.preprocess import Preprocess
    from tasks.train import TrainConfig


FOLD_METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "top5_accuracy")


@dataclass(frozen=True)
class Fold:
    fold: int
    train: "np.ndarray"
    val: "np.ndarray"
    test: "np.ndarray"


@dataclass(frozen=True)
class CVResult:
    folds: list[dict[str, Any]]
    summary: dict[str, Any]
    oof_probs: "torch.Tensor"
    grouped: bool


def _splitter(k: int, seed: int, grouped: bool):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    return (StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed) if grouped
            else StratifiedKFold(n_splits=k, shuffle=True, random_state=seed))


def assign_folds(labels: Sequence[str], *, k: int, seed: int, groups: Sequence[Any] | None = None) -> "np.ndarray":
    """Fold number per row: stratified by label, and with every group (duplicates) inside one fold."""
    import numpy as np

    y = np.asarray(labels)
    counts = np.unique(y, return_counts=True)[1]
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if counts.min() < k:
        raise ValueError(f"evaluate.cv_folds={k} needs at least {k} images per class; the smallest class has "
                         f"{counts.min()}")
    fold_of = np.full(len(y), -1)
    for i, (_, test_idx) in enumerate(_splitter(k, seed, groups is not None).split(np.zeros(len(y)), y, groups)):
        fold_of[test_idx] = i
    return fold_of


def make_folds(fold_of: "np.ndarray", labels: Sequence[str], *, seed: int, groups: Sequence[Any] | None = None,
               val_fraction: float = 0.1) -> list[Fold]:
    """Fold i tests; a stratified, group-aware val_fraction of the other folds picks the best epoch; the rest
    trains. No model sees its own test fold, neither for training nor for choosing the epoch."""
    import warnings

    import numpy as np

    y = np.asarray(labels)
    g = np.asarray(groups, dtype=object) if groups is not None else None
    out = []
    for i in range(int(fold_of.max()) + 1):
        rest = np.flatnonzero(fold_of != i)
        # Tiny data: fewer inner splits (a bigger validation share) rather than a class-less validation set.
        inner_k = max(2, min(round(1 / val_fraction), int(np.unique(y[rest], return_counts=True)[1].max())))
        with warnings.catch_warnings():  # tiny classes: sklearn warns that some inner folds lack them
            warnings.simplefilter("ignore", UserWarning)
            train_pos, val_pos = next(_splitter(inner_k, seed + i, g is not None)
                                      .split(np.zeros(len(rest)), y[rest], None if g is None else g[rest]))
        out.append(Fold(fold=i, test=np.flatnonzero(fold_of == i), val=np.sort(rest[val_pos]),
                        train=np.sort(rest[train_pos])))
    return out


def summarise(folds: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean and (sample) standard deviation of each metric across folds."""
    import statistics

    return {key: {"mean": statistics.fmean(f[key] for f in folds),
                  "std": statistics.stdev(f[key] for f in folds) if len(folds) > 1 else 0.0}
            for key in keys}


def cross_validate(images: "torch.Tensor", targets: "torch.Tensor", classes: list[str], spec: "Preprocess",
                   cfg: "TrainConfig", *, k: int, groups: Sequence[Any] | None = None,
                   metrics_fn: Callable[["torch.Tensor", "torch.Tensor", list[str]], dict[str, Any]],
                   val_fraction: float = 0.1, batch_size: int = 256,
                   on_fold: Callable[[dict[str, Any]], None] | None = None) -> CVResult:
    """Train one model per fold with the training recipe; score each on its held-out fold."""
    import torch

    from tasks.models import build_model
    from tasks.predict import predict_proba
    from tasks.train import fit, seed_everything

    labels = [classes[i] for i in targets.tolist()]
    fold_of = assign_folds(labels, k=k, seed=cfg.seed, groups=groups)
    oof = torch.zeros(len(targets), len(classes))
    rows: list[dict[str, Any]] = []
    for fold in make_folds(fold_of, labels, seed=cfg.seed, groups=groups, val_fraction=val_fraction):
        seed_everything(cfg.seed + fold.fold)
        model = build_model(cfg.model, num_classes=len(classes), in_channels=spec.channels)
        pick = lambda idx: (images[idx], targets[idx])  # noqa: E731
        result, best = fit(model, pick(fold.train), pick(fold.val), spec, cfg)
        model.load_state_dict(best)
        probs = predict_proba(model.to("cpu"), images[fold.test], spec, batch_size=batch_size)
        oof[fold.test] = probs
        m = metrics_fn(probs, targets[fold.test], classes)
        row = {"fold": fold.fold, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
               "best_epoch": result.best_epoch, **{key: m[key] for key in FOLD_METRICS}}
        rows.append(row)
        if on_fold:
            on_fold(row)
    summary = {"folds": k, "grouped": groups is not None, "n": int(len(targets)),
               **summarise(rows, FOLD_METRICS)}
    return CVResult(folds=rows, summary=summary, oof_probs=oof, grouped=groups is not None)



LABEL_ISSUE_COLUMNS = ["path", "given_label", "suspected_label", "flagged", "label_quality", "given_probability",
                       "suspected_probability"]


def label_issues(paths: Sequence[str], targets: "torch.Tensor", oof_probs: "torch.Tensor", classes: list[str], *,
                 limit: int) -> "pd.DataFrame":
    """The images most likely to be mislabelled, most suspicious first: those cleanlab's confident learning
    flags (`flagged`), then the lowest label-quality scores, up to limit. The suspected label is the most
    probable label other than the given one."""
    import numpy as np
    import pandas as pd
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    y = targets.numpy()
    probs = oof_probs.numpy().astype(np.float64)
    probs = probs / probs.sum(1, keepdims=True)
    flagged = [int(i) for i in find_label_issues(y, probs, return_indices_ranked_by="self_confidence")]
    quality = get_label_quality_scores(y, probs)
    is_flagged = set(flagged)
    order = [*flagged, *(int(i) for i in np.argsort(quality, kind="stable") if int(i) not in is_flagged)][:limit]
    others = probs.copy()
    others[np.arange(len(y)), y] = -1.0
    suspected = others.argmax(1)
    rows = [{"path": paths[i], "given_label": classes[y[i]], "suspected_label": classes[suspected[i]],
             "flagged": i in is_flagged, "label_quality": float(quality[i]),
             "given_probability": float(probs[i, y[i]]), "suspected_probability": float(probs[i, suspected[i]])}
            for i in order]
    return pd.DataFrame(rows, columns=LABEL_ISSUE_COLUMNS)


def group_values(frame: "pd.DataFrame", manifest: "pd.DataFrame | None", column: str | None) -> list[Any] | None:
    """The duplicate-group id per row of frame, from the manifest column if it exists (else no groups)."""
    if not column or manifest is None or column not in manifest.columns:
        return None
    lookup = manifest.set_index("path")[column]
    values = frame["path"].map(lookup)
    # A row without a group is its own group.
    return [v if v == v and v is not None else f"__row{i}" for i, v in enumerate(values.tolist())]


def load_pool(splits_dir: Path) -> "pd.DataFrame":
    """Every image of the three splits: cross-validation and label quality look at all of them."""
    import pandas as pd

    frames = [pd.read_csv(splits_dir / f"{name}.csv", dtype={"label": str}) for name in ("train", "val", "test")]
    return pd.concat(frames).sort_values("path").reset_index(drop=True)
