"""Stage `split`: stratified, seeded train/val/test lists of the accepted images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.io import sha256_file, write_json, write_text

if TYPE_CHECKING:
    import pandas as pd

MANIFEST = Path("data/manifest.csv")
SPLITS_DIR = Path("data/splits")
SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """The data cannot be split as asked; the message names the class."""


@dataclass(frozen=True)
class SplitResult:
    sizes: dict[str, int]
    test_hash: str


def split_frame(accepted: "pd.DataFrame", *, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, "pd.DataFrame"]:
    """Stratified split of (path, label) rows; every class gets at least one image in each split."""
    import numpy as np
    import pandas as pd

    counts = accepted["label"].value_counts()
    too_small = counts[counts < 3]
    if len(too_small):
        raise SplitError("classes with fewer than 3 images cannot be split into train/val/test: "
                         + ", ".join(f"{label!r} ({n})" for label, n in too_small.items()))
    rows = accepted[["path", "label"]].sort_values("path").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SPLITS}
    for label in sorted(rows["label"].unique()):
        members = rows[rows["label"] == label]
        members = members.iloc[rng.permutation(len(members))]
        n = len(members)
        n_test = min(max(1, round(n * test_fraction)), n - 2)
        n_val = min(max(1, round(n * val_fraction)), n - n_test - 1)
        parts["test"].append(members.iloc[:n_test])
        parts["val"].append(members.iloc[n_test:n_test + n_val])
        parts["train"].append(members.iloc[n_test + n_val:])
    return {name: pd.concat(chunks).sort_values("path").reset_index(drop=True) for name, chunks in parts.items()}


def split(manifest_path: Path, out_dir: Path, *, val_fraction: float, test_fraction: float,
          seed: int) -> SplitResult:
    """Read the manifest, split its accepted rows, write one CSV per split plus a summary."""
    import pandas as pd

    manifest = pd.read_csv(manifest_path, dtype={"label": str})
    accepted = manifest[manifest["accepted"].astype(bool)]
    parts = split_frame(accepted, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        write_text(out_dir / f"{name}.csv", part.to_csv(index=False))
    sizes = {name: len(part) for name, part in parts.items()}
    result = SplitResult(sizes=sizes, test_hash=sha256_file(out_dir / "test.csv"))
    per_class = {name: part["label"].value_counts().sort_index().to_dict() for name, part in parts.items()}
    write_json(out_dir / "summary.json", {"sizes": sizes, "per_class": per_class, "test_hash": result.test_hash,
                                          "seed": seed})
    return result


def main() -> None:
    """DVC stage entry point."""
    from rich.console import Console

    from tasks.config import load_params

    params = load_params()
    console = Console(stderr=True)
    try:
        result = split(MANIFEST, SPLITS_DIR, val_fraction=params.split.val_fraction,
                       test_fraction=params.split.test_fraction, seed=params.base.seed)
    except SplitError as exc:
        console.print(f"[red]split failed:[/] {exc}")
        raise SystemExit(1) from None
    console.print("split: " + ", ".join(f"{k} {v}" for k, v in result.sizes.items()))


if __name__ == "__main__":
    main()
