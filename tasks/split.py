"""Stage `split`: stratified, seeded, leakage-free train/val/test lists of the accepted images.

Exact duplicates (sha256) and near duplicates (perceptual-hash Hamming distance at most
split.near_duplicate_distance) are grouped, and a group never straddles splits. Pre-split sources
(train/ val/ test/) are respected as given; a split they lack is carved from their train/ part."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Iterable, Iterator, Sequence

from tasks.io import replace_dir, sha256_file, staging_dir, write_json, write_text

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

MANIFEST = Path("data/manifest.csv")
SPLITS_DIR = Path("data/splits")
SUITE = Path("expectations/splits.json")
SPLITS = ("train", "val", "test")
_DTYPES = {"path": str, "label": str, "sha256": str, "phash": str, "split_hint": str}


class SplitError(ValueError):
    """The data cannot be split as asked; the message names the class or the leaking files."""


@dataclass(frozen=True)
class SplitResult:
    sizes: dict[str, int]
    test_hash: str
    warnings: list[str] = field(default_factory=list)
    groups: dict[str, Any] = field(default_factory=dict)


# --- grouping -----------------------------------------------------------------------------------------

def near_duplicate_pairs(hashes: "np.ndarray", max_distance: int) -> list[tuple[int, int]]:
    """Index pairs whose 64-bit hashes differ in at most max_distance bits.

    Multi-index hashing: cut the 64 bits into max_distance + 1 chunks; by pigeonhole two hashes that
    close agree exactly on at least one chunk, so only hashes sharing a chunk value are compared."""
    import numpy as np

    hashes = np.asarray(hashes, dtype=np.uint64)
    n_chunks = min(max_distance + 1, 64)
    bounds = np.linspace(0, 64, n_chunks + 1).astype(int)
    pairs: set[tuple[int, int]] = set()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        keys = (hashes >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = np.sort(order[s:e])
            block = hashes[members]
            for k in range(len(members) - 1):
                dist = np.bitwise_count(block[k] ^ block[k + 1:])
                for j in np.flatnonzero(dist <= max_distance):
                    pairs.add((int(members[k]), int(members[k + 1 + j])))
    return sorted(pairs)


def shared_key_pairs(keys: Sequence[Iterable[Hashable]]) -> Iterator[tuple[int, int]]:
    """Pure: (first row with a key, row) for every later row holding that key again; keys[i]: row i's keys."""
    first: dict[Hashable, int] = {}
    for i, row_keys in enumerate(keys):
        for key in row_keys:
            if key in first:
                yield first[key], i
            else:
                first[key] = i


def connected_components(n: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Pure: each of n items' component in the graph of pairs (union-find); a component's id is its smallest
    index."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


def group_ids(sha256: list[str], phash: list[str | None], *, max_distance: int | None) -> list[int]:
    """Connected components of 'same sha256' and 'perceptual hashes within max_distance'; id = smallest index."""
    import numpy as np

    pairs = list(shared_key_pairs([[digest] for digest in sha256]))
    if max_distance is not None:
        valid = [i for i, h in enumerate(phash) if isinstance(h, str) and h]
        if valid:
            hashes = np.array([int(phash[i], 16) for i in valid], dtype=np.uint64)
            pairs += [(valid[a], valid[b]) for a, b in near_duplicate_pairs(hashes, max_distance)]
    return connected_components(len(sha256), pairs)


# --- assignment ---------------------------------------------------------------------------------------

def rank_key(seed: int, key: str) -> int:
    """A group's place in its class's order: a hash of the seed and the group's content (its smallest sha256).
    It does not depend on the other images, so adding or removing images moves few groups between splits."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def _held_out_choice(seed: int, key: str, held: list[str], fractions: dict[str, float]) -> str:
    """The held-out split a group prefers: drawn from its content, test vs val in proportion to their shares."""
    u = rank_key(seed, "held-out:" + key) / 2.0 ** 64
    total = sum(fractions[s] for s in held) or 1.0
    edge = 0.0
    for name in held:
        edge += fractions[name] / total
        if u < edge:
            return name
    return held[-1]


def _assign_class(sizes: list[int], keys: list[str], names: list[str], fractions: dict[str, float],
                  seed: int) -> list[str]:
    """Split names for one class's groups: stratified targets, groups kept whole, every split non-empty.

    Groups are taken in rank_key order: each goes to its own held-out split (test or val, drawn from its
    content in proportion to their shares) if that has room for it, else to the other one if it has, else
    to train; so a big group of near-duplicates never swamps test or val, and a class with few distinct
    images shares them between the two. A group keeps its split as long as it keeps its place relative to
    the targets, so a new data version (images added or removed) leaves nearly every earlier test image in
    test: runs stay comparable, and a champion re-scored on the new test split has seen few of its images."""
    n = sum(sizes)
    ordered = [s for s in ("test", "val", "train") if s in names]
    target, left = {}, n
    for i, name in enumerate(ordered[:-1]):  # leave at least one image for each split still to come
        target[name] = min(max(1, round(n * fractions[name])), left - (len(ordered) - 1 - i))
        left -= target[name]
    target["train"] = left
    have = {name: 0 for name in ordered}
    out = [""] * len(sizes)
    for g in sorted(range(len(sizes)), key=lambda g: (rank_key(seed, keys[g]), keys[g])):
        # its own held-out split first (a preference drawn from its content alone, so other images never
        # change it), the other one next, train when neither has room
        preferred = _held_out_choice(seed, keys[g], ordered[:-1], fractions)
        held = sorted(ordered[:-1], key=lambda s: s != preferred)
        name = next((s for s in held if have[s] + sizes[g] <= target[s]), ordered[-1])
        out[g] = name
        have[name] += sizes[g]
    for name in ordered:  # a split left empty takes the smallest group of the split with most groups
        if name not in out:
            donor = max(ordered, key=lambda s: out.count(s))
            out[min((g for g in range(len(sizes)) if out[g] == donor), key=lambda g: (sizes[g], g))] = name
    return out


def _group_table(rows: "pd.DataFrame") -> "pd.DataFrame":
    """One row per group: its majority label, size and member count by label."""
    table = rows.groupby("group").agg(size=("path", "count"), first=("path", "min"), n_labels=("label", "nunique"))
    # majority label, ties to the alphabetically first (vectorised: a per-group lambda took ~1 s per 5,000 images)
    pairs = rows.groupby(["group", "label"]).size().rename("k").reset_index()
    pairs = pairs.sort_values(["group", "k", "label"], ascending=[True, False, True])
    table["label"] = pairs.drop_duplicates("group").set_index("group")["label"]
    return table.sort_values("first")


def _carve(rows: "pd.DataFrame", names: list[str], *, val_fraction: float, test_fraction: float,
           seed: int) -> "pd.Series":
    """Assign rows' groups to `names` (train plus val and/or test), stratified by group label."""
    table = _group_table(rows)
    table["key"] = rows.groupby("group")["sha256"].min().astype(str)  # the group's content, whatever its paths
    counts = table.groupby("label")["size"].agg(["sum", "count"])
    small = counts[counts["count"] < len(names)]
    if len(small):
        raise SplitError(
            f"classes with fewer than {len(names)} images (near-identical ones counted once) cannot be split into "
            f"{'/'.join(names)}: " + ", ".join(f"{label!r} ({int(r['sum'])} images in {int(r['count'])} groups)"
                                              for label, r in small.iterrows())
            + ". Add images, drop the class, or lower split.near_duplicate_distance.")
    fractions = {"val": val_fraction, "test": test_fraction}
    assigned: dict[int, str] = {}
    for label in sorted(table["label"].unique()):
        members = table[table["label"] == label]
        assigned.update(zip(members.index, _assign_class(members["size"].tolist(), members["key"].tolist(), names,
                                                         fractions, seed)))
    return rows["group"].map(assigned).rename("split")


def assign_splits(accepted: "pd.DataFrame", *, val_fraction: float, test_fraction: float, seed: int,
                  near_duplicate_distance: int | None = 4) -> tuple["pd.DataFrame", list[str]]:
    """Every accepted row with its `group` and `split`; plus warnings. Raises SplitError when impossible."""
    rows = accepted.copy()
    for column in ("sha256", "phash", "split_hint"):
        if column not in rows:
            rows[column] = rows["path"] if column == "sha256" else ""
    rows[["phash", "split_hint"]] = rows[["phash", "split_hint"]].fillna("")
    rows = rows.sort_values("path").reset_index(drop=True)
    rows["group"] = group_ids(rows["sha256"].tolist(), rows["phash"].tolist(), max_distance=near_duplicate_distance)
    warnings: list[str] = []
    hinted = rows["split_hint"].isin(SPLITS)
    if not hinted.any():
        rows["split"] = _carve(rows, list(SPLITS), val_fraction=val_fraction, test_fraction=test_fraction,
                               seed=seed).values
        return rows, warnings
    if not hinted.all():
        raise SplitError("some accepted images have a split folder and some do not: "
                         + ", ".join(rows.loc[~hinted, "path"].head(5)))
    rows["split"] = rows["split_hint"]
    leaks = rows.groupby("group")["split"].nunique()
    leaks = leaks[leaks > 1]
    if len(leaks):
        examples = ["; ".join(f"{p} ({s})" for p, s in zip(g["path"], g["split"]))
                    for _, g in rows[rows["group"].isin(leaks.index)].groupby("group")][:5]
        raise SplitError(f"the given splits leak: {len(leaks)} group(s) of identical or near-identical images "
                         "sit in more than one of train/val/test, e.g. " + " | ".join(examples)
                         + ". Move or remove those files (or lower split.near_duplicate_distance).")
    missing = [s for s in ("val", "test") if s not in set(rows["split"])]
    if missing:
        pool = rows["split"] == "train"
        carved = _carve(rows[pool], ["train", *missing], val_fraction=val_fraction, test_fraction=test_fraction,
                        seed=seed)
        rows.loc[pool, "split"] = carved.values
        warnings.append(f"the source has no {' or '.join(missing)} folder: carved from its train/ images")
    for name in SPLITS:
        absent = sorted(set(rows["label"]) - set(rows.loc[rows["split"] == name, "label"]))
        if absent:
            warnings.append(f"given split {name} has no images of class(es) {absent}")
    return rows, warnings


def split_frame(accepted: "pd.DataFrame", *, val_fraction: float, test_fraction: float, seed: int,
                near_duplicate_distance: int | None = 4) -> dict[str, "pd.DataFrame"]:
    """Stratified, grouped split of (path, label) rows; every class gets at least one image in each split."""
    rows, _ = assign_splits(accepted, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                            near_duplicate_distance=near_duplicate_distance)
    return {name: rows.loc[rows["split"] == name, ["path", "label"]].sort_values("path").reset_index(drop=True)
            for name in SPLITS}


def leakage_frame(rows: "pd.DataFrame") -> "pd.DataFrame":
    """Assigned rows plus the derived columns the splits suite checks."""
    frame = rows[["path", "label", "split", "sha256", "group"]].copy()
    frame["sha256_splits"] = frame.groupby("sha256")["split"].transform("nunique")
    frame["group_splits"] = frame.groupby("group")["split"].transform("nunique")
    frame["class_splits"] = frame.groupby("label")["split"].transform("nunique")
    return frame.reset_index(drop=True)


def group_summary(rows: "pd.DataFrame") -> dict[str, Any]:
    """How many images the duplicate grouping tied together."""
    sizes = rows.groupby("group")["path"].transform("count")
    multi = rows[sizes > 1]
    exact = rows[rows.duplicated("sha256", keep=False)]
    mixed = multi.groupby("group")["label"].nunique()
    return {"n_groups": int(rows["group"].nunique()), "grouped_groups": int(multi["group"].nunique()),
            "grouped_images": int(len(multi)), "largest_group": int(sizes.max()) if len(rows) else 0,
            "exact_duplicate_images": int(len(exact)),
            "groups_with_several_labels": int((mixed > 1).sum())}


def split(manifest_path: Path, out_dir: Path, *, val_fraction: float, test_fraction: float, seed: int,
          near_duplicate_distance: int | None = 4, suite_path: Path | None = SUITE) -> SplitResult:
    """Read the manifest, split its accepted rows, check for leakage, write one CSV per split plus a summary."""
    import pandas as pd

    from tasks.contract import load_suite, run_suite

    manifest = pd.read_csv(manifest_path, dtype={k: v for k, v in _DTYPES.items()}, keep_default_na=False,
                           na_values={"accepted": [""]})
    accepted = manifest[manifest["accepted"].astype(str).str.lower().isin(["true", "1"])]
    rows, warnings = assign_splits(accepted, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                   near_duplicate_distance=near_duplicate_distance)
    checks: list[dict[str, Any]] = []
    if suite_path is not None:
        presplit = rows["split_hint"].isin(SPLITS).any()
        result = run_suite(leakage_frame(rows), load_suite(suite_path),
                           {"min_splits_per_class": 1 if presplit else 3}, name="splits")
        checks = [{"expectation": c.expectation, "column": c.column, "success": c.success, "detail": c.detail,
                   "examples": c.examples} for c in result.checks]
        if not result.success:
            lines = [f"{c.detail}: e.g. {', '.join(c.examples)}" for c in result.failures]
            raise SplitError("split contract failed: " + " | ".join(lines))
    staged = staging_dir(out_dir)
    try:
        sizes = {}
        per_class = {}
        for name in SPLITS:
            part = rows.loc[rows["split"] == name, ["path", "label"]].sort_values("path")
            write_text(staged / f"{name}.csv", part.to_csv(index=False))
            sizes[name] = len(part)
            per_class[name] = part["label"].value_counts().sort_index().to_dict()
        grouped = rows[rows.groupby("group")["path"].transform("count") > 1]
        write_text(staged / "groups.csv", grouped[["path", "label", "group", "split", "sha256", "phash"]]
                   .sort_values(["group", "path"]).to_csv(index=False))
        groups = group_summary(rows)
        result_ = SplitResult(sizes=sizes, test_hash=sha256_file(staged / "test.csv"), warnings=warnings,
                              groups=groups)
        write_json(staged / "summary.json", {
            "sizes": sizes, "per_class": per_class, "test_hash": result_.test_hash, "seed": seed,
            "near_duplicate_distance": near_duplicate_distance, "groups": groups, "warnings": warnings,
            "leakage_checks": checks})
        replace_dir(staged, out_dir)
    except BaseException:
        import shutil

        shutil.rmtree(staged, ignore_errors=True)
        raise
    return result_


def main() -> None:
    """DVC stage entry point."""
    from rich.console import Console

    from tasks.config import load_params

    params = load_params()
    console = Console(stderr=True)
    try:
        result = split(MANIFEST, SPLITS_DIR, val_fraction=params.split.val_fraction,
                       test_fraction=params.split.test_fraction, seed=params.base.seed,
                       near_duplicate_distance=params.split.near_duplicate_distance)
    except SplitError as exc:
        console.print(f"[red]split failed:[/] {exc}")
        raise SystemExit(1) from None
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    g = result.groups
    console.print("split: " + ", ".join(f"{k} {v}" for k, v in result.sizes.items())
                  + f"; {g['grouped_images']} images in {g['grouped_groups']} duplicate/near-duplicate groups "
                  f"kept within one split")


if __name__ == "__main__":
    from tasks.stagehost import check_no_arguments, run_main

    check_no_arguments("tasks.split")
    run_main("tasks.split", main)
