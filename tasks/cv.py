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
        model = build_model(cfg.model, num_classes=len(classes), in_channels=spec.channels, image_size=spec.size)
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


SPLIT_GROUPS = "groups.csv"  # written by the split stage: every image in a duplicate/near-duplicate group
SPLIT_GROUP_COLUMN = "group"


@dataclass(frozen=True)
class Groups:
    """Duplicate-group id per row (None: ungrouped CV), where the groups came from, how many rows share one, and
    a warning when the CV is ungrouped for want of groups (metrics and the log carry it)."""

    values: list[int] | None
    source: str
    grouped_images: int = 0
    warning: str | None = None


def load_split_groups(splits_dir: Path) -> "pd.DataFrame | None":
    """The split stage's duplicate groups (path, group, ...), or None when the splits predate that file."""
    import pandas as pd

    path = Path(splits_dir) / SPLIT_GROUPS
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else None


def resolve_groups(frame: "pd.DataFrame", *, column: str | None, manifest: "pd.DataFrame | None",
                   split_groups: "pd.DataFrame | None") -> Groups:
    """The duplicate group of each row of frame (by path), for group-aware folds.

    column names the groups: the split stage's own (data/splits/groups.csv, column `group`, the default) or a
    column of the manifest. The split stage's groups are always kept (a near-duplicate pair split across folds
    inflates the scores), a manifest column adds its own; rows linked through either share a group. A row in
    no group is its own. A column found in neither place is an error, never a silently ungrouped CV, except the
    default `group` for splits without groups.csv (made before the split stage wrote it, or by hand): an
    ungrouped CV with a warning. A null column is the explicit way to cross-validate without groups."""
    import pandas as pd

    from tasks.split import connected_components, shared_key_pairs

    if not column:
        return Groups(None, "none (evaluate.cv_group_column is null)")
    keys: list[list[tuple[str, Any]]] = [[] for _ in range(len(frame))]
    sources = []

    def add(table: "pd.DataFrame", col: str, tag: str) -> None:
        lookup = table.drop_duplicates("path").set_index("path")[col]
        for i, v in enumerate(frame["path"].map(lookup).tolist()):
            if not pd.isna(v) and str(v) != "":
                keys[i].append((tag, v))

    in_manifest = manifest is not None and column in manifest.columns
    has_split = split_groups is not None and SPLIT_GROUP_COLUMN in split_groups.columns
    in_split = has_split and column == SPLIT_GROUP_COLUMN
    if not (in_manifest or in_split) and column == SPLIT_GROUP_COLUMN and not has_split:
        return Groups(None, "none", warning=(
            f"no duplicate groups: data/splits/{SPLIT_GROUPS} is missing or has no {SPLIT_GROUP_COLUMN!r} column and "
            f"the manifest has no {SPLIT_GROUP_COLUMN!r} column, so cross-validation is NOT group-aware (near-"
            "duplicates may straddle folds and inflate the scores); re-run the split stage (dvc repro split)"))
    if not (in_manifest or in_split):
        where = [f"data/manifest.csv ({'missing' if manifest is None else ', '.join(map(str, manifest.columns))})"]
        where.append(f"the split stage's data/splits/{SPLIT_GROUPS} (column {SPLIT_GROUP_COLUMN!r})"
                     if has_split else
                     f"data/splits/{SPLIT_GROUPS} is missing or has no {SPLIT_GROUP_COLUMN!r} column: re-run the "
                     "split stage (dvc repro split)")
        raise ValueError(f"evaluate.cv_group_column={column!r} names no duplicate groups: looked in "
                         + "; ".join(where) + ". Name one of those, or set it to null to cross-validate without "
                         "groups (near-duplicates may then straddle folds and inflate the scores).")
    if in_manifest:
        add(manifest, column, "manifest")
        sources.append(f"manifest column {column!r}")
    if has_split:
        add(split_groups, SPLIT_GROUP_COLUMN, "split")
        sources.append(f"split's duplicate groups (data/splits/{SPLIT_GROUPS})")
    values = connected_components(len(frame), shared_key_pairs(keys))
    sizes = pd.Series(values).value_counts()
    return Groups(values, " + ".join(sources), int(sizes[sizes > 1].sum()))


def load_pool(splits_dir: Path) -> "pd.DataFrame":
    """Every image of the three splits: cross-validation and label quality look at all of them."""
    import pandas as pd

    frames = [pd.read_csv(splits_dir / f"{name}.csv", dtype={"label": str}) for name in ("train", "val", "test")]
    return pd.concat(frames).sort_values("path").reset_index(drop=True)
