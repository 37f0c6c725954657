"""Stage `ingest`: a source -> data/raw/ (one DVC-tracked folder), atomically, with a content hash.

Sources: `sample:digits`; a folder of class sub-folders, or one already split into train/ val/ test/;
a .zip/.tar(.gz) archive; an http(s) URL of one (sha256 required); a CSV manifest (path,label[,split]).
data/raw/ is <class>/<file> or, for pre-split sources, <split>/<class>/<file>. Every file found that
is not copied is listed in data/ingest.json with its reason (hidden files are counted as ignored).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Literal

from tasks.archive import ArchiveError, Caps, download, extract_archive, is_archive, safe_name
from tasks.io import list_files, replace_dir, sha256_file, staging_dir, tree_digest, write_json
from tasks.sample import SAMPLE_PREFIX, materialise

RAW_DIR = Path("data/raw")
RECORD = Path("data/ingest.json")
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini", "__pycache__"}
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SPLIT_NAMES = ("train", "val", "test")
Layout = Literal["classes", "presplit"]
_MAX_LISTED_IGNORED = 50
_HASH_WHILE_COPYING = 16 << 20  # files up to this size are read once: copied and hashed together
COPY_THREADS = 4  # file copies in flight at once (see transfer_all)
COPY_CHUNK = 256  # files per thread task


NOT_RETRYABLE_EXIT = 3  # the stage's exit code for a source that trying again cannot fix (see flows/early.py)


class IngestError(RuntimeError):
    """The source cannot be ingested; the message says which path and why. `retryable`: trying again may help
    (a download), unlike a missing folder or an empty one."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class IngestResult:
    source: str
    kind: str
    layout: Layout
    content_hash: str
    n_files: int
    classes: dict[str, int]
    splits: dict[str, int] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    ignored: int = 0
    ignored_examples: list[str] = field(default_factory=list)
    renamed: list[dict[str, str]] = field(default_factory=list)
    source_sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Report:
    """What happened to every file that was found but not copied as-is."""

    rejected: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    renamed: list[dict[str, str]] = field(default_factory=list)
    made: set[str] = field(default_factory=set)  # folders already created under dest
    planned: set[str] = field(default_factory=set)  # target paths already given to a file
    digests: dict[str, str] = field(default_factory=dict)  # sha256 of files hashed while copying, by target path

    def reject(self, path: str, reason: str, label: str = "") -> None:
        self.rejected.append({"path": safe_name(path), "label": safe_name(label), "reason": reason})


def is_hidden(rel: Path | PurePosixPath) -> bool:
    """Hidden files and folders (dotfiles, __MACOSX, ...) are never data and never a class."""
    return any(part.startswith(".") or part in IGNORED_NAMES for part in rel.parts)


def source_kind(source: str) -> str:
    """sample, url, archive, csv or folder."""
    if source.startswith(SAMPLE_PREFIX):
        return "sample"
    if source.startswith(("http://", "https://")):
        return "url"
    if is_archive(source):
        return "archive"
    if source.lower().endswith(".csv"):
        return "csv"
    return "folder"


def detect_layout(root: Path) -> Layout:
    """presplit when every top-level folder is a split name (train/ val|valid|validation/ test/) and train/ is one."""
    dirs = [e.name for e in os.scandir(root) if e.is_dir() and not is_hidden(PurePosixPath(e.name))]
    lowered = [d.lower() for d in dirs]
    if dirs and all(d in SPLIT_ALIASES for d in lowered) and "train" in lowered:
        canonical = [SPLIT_ALIASES[d] for d in lowered]
        if len(set(canonical)) != len(canonical):
            raise IngestError(f"{root}: more than one folder for the same split: {sorted(dirs)}")
        return "presplit"
    return "classes"


def _walk(src: Path, report: _Report) -> list[tuple[str, Path | str]]:
    """(relative POSIX path, file path) of every regular file under src; links and oddities reported."""
    root = src.resolve()
    found: list[tuple[str, Path | str]] = []
    stack = [(src, "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}{entry.name}"
                if is_hidden(PurePosixPath(entry.name)):
                    report.ignored.append(safe_name(rel))
                    continue
                if entry.is_symlink():
                    path = Path(entry.path)
                    target = path.resolve()
                    inside = target.is_relative_to(root)
                    if target.is_dir():  # not followed: a folder link could loop or leave the source
                        report.reject(rel, "symlinked folder not followed" +
                                      ("" if inside else ": it resolves outside the source"), rel.split("/")[0])
                    elif not inside:
                        report.reject(rel, "symlink resolves outside the source", rel.split("/")[0])
                    elif not target.is_file():
                        report.reject(rel, "broken symlink", rel.split("/")[0])
                    else:
                        found.append((rel, path))
                elif entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), rel + "/"))
                elif entry.is_file(follow_symlinks=False):
                    found.append((rel, entry.path))  # a plain string: no Path object per file
                else:
                    report.reject(rel, "not a regular file (device, FIFO or socket)", rel.split("/")[0])
    return sorted(found)


def _place(dest: Path, parts: list[str], report: _Report, original: str) -> str | None:
    """dest/<parts> with every part valid UTF-8; a renamed part is recorded, a clash is rejected."""
    safe = [safe_name(p) for p in parts]
    target = os.path.join(dest, *safe)
    if target in report.planned:  # files are copied after all are placed: the plan, not the disk, says what is taken
        shown = "/".join(safe)
        report.reject(original, f"name is not valid UTF-8 and its readable form {shown!r} is taken" if safe != parts
                      else f"a renamed file already took {shown!r}", safe[0])
        return None
    report.planned.add(target)
    if safe != parts:
        report.renamed.append({"from": safe_name(original), "to": "/".join(safe),
                               "reason": "file name is not valid UTF-8"})
    parent = os.path.dirname(target)
    if parent not in report.made:
        os.makedirs(parent, exist_ok=True)
        report.made.add(parent)
    return target


def _transfer(path: Path | str, target: str, *, move: bool) -> str | None:
    """Copy (or, for a scratch extraction, move) one file; small files are read once and hashed on the way
    through (returns that sha256, else None)."""
    if move and not os.path.islink(path):
        os.replace(path, target)
        return None
    with open(path, "rb") as src:
        data = src.read() if os.fstat(src.fileno()).st_size <= _HASH_WHILE_COPYING else None
    if data is None:
        shutil.copyfile(path, target)
        return None
    with open(target, "xb") as out:
        out.write(data)
    return hashlib.sha256(data).hexdigest()


def _transfer_many(pairs: list[tuple[Path | str, str]], *, move: bool) -> list[str | None]:
    """_transfer of each (source, target), in order."""
    return [_transfer(path, target, move=move) for path, target in pairs]


def transfer_all(pairs: list[tuple[Path | str, str]], report: _Report, *, move: bool = False,
                 threads: int = COPY_THREADS) -> None:
    """Every (source, target) transferred, by a few threads when there are many: a copy is mostly the kernel
    creating a file, and while one thread waits for that (a busy disk journal), another can go on. Targets'
    folders exist already; the first failure is raised once the others have stopped."""
    from concurrent.futures import ThreadPoolExecutor

    if threads <= 1 or len(pairs) < 2 * COPY_CHUNK:
        digests = _transfer_many(pairs, move=move)
    else:
        chunks = [pairs[i:i + COPY_CHUNK] for i in range(0, len(pairs), COPY_CHUNK)]
        with ThreadPoolExecutor(threads, thread_name_prefix="ingest-copy") as pool:
            digests = [d for part in pool.map(lambda chunk: _transfer_many(chunk, move=move), chunks) for d in part]
    report.digests.update((target, d) for (_, target), d in zip(pairs, digests) if d is not None)


def copy_tree(src: Path, dest: Path, report: _Report, *, move: bool = False) -> Layout:
    """Class folders (or train/val/test of class folders) under src -> dest; returns the layout."""
    layout = detect_layout(src)
    depth = 2 if layout == "presplit" else 1
    pairs: list[tuple[Path | str, str]] = []
    for rel, path in _walk(src, report):
        parts = rel.split("/")
        if len(parts) <= depth:
            where = "the source root" if depth == 1 else f"{parts[0]}/"
            report.reject(rel, f"file directly in {where} belongs to no class folder")
            continue
        if layout == "presplit":
            parts = [SPLIT_ALIASES[parts[0].lower()], *parts[1:]]
        target = _place(dest, parts, report, rel)
        if target is not None:
            pairs.append((path, target))
    transfer_all(pairs, report, move=move)
    return layout


def _unwrap(root: Path) -> Path:
    """An archive holding one top-level folder of folders (pets/cat/..., pets/dog/...) is read from inside it."""
    entries = [e for e in os.scandir(root) if not is_hidden(PurePosixPath(e.name))]
    if len(entries) == 1 and entries[0].is_dir(follow_symlinks=False) and entries[0].name.lower() not in SPLIT_ALIASES:
        inner = Path(entries[0].path)
        if any(e.is_dir(follow_symlinks=False) for e in os.scandir(inner)):
            return inner
    return root


def _clean_label(label: str) -> str | None:
    label = label.strip()
    if not label or label in (".", "..") or "/" in label or "\\" in label or is_hidden(PurePosixPath(label)):
        return None
    return label


def copy_csv(csv_path: Path, dest: Path, report: _Report) -> Layout:
    """Rows path,label[,split] of a CSV (paths relative to its folder) -> dest/[split/]label/path."""
    base = csv_path.parent.resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or "") for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError as exc:
        raise IngestError(f"{csv_path}: not UTF-8 text ({exc})") from None
    if not {"path", "label"} <= set(columns):
        raise IngestError(f"{csv_path}: a CSV manifest needs the columns path,label (found {columns})")
    presplit = "split" in columns
    pairs: list[tuple[Path | str, str]] = []
    by_path: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for line, row in enumerate(rows, start=2):
        raw = row["path"].strip()
        label = _clean_label(row["label"])
        where = f"{raw} (line {line})"
        if label is None:
            report.reject(where, f"invalid or empty label {row['label']!r}", row["label"])
            continue
        if not raw:
            report.reject(where, "empty path", label)
            continue
        if Path(raw).is_absolute() or ".." in PurePosixPath(raw.replace("\\", "/")).parts:
            report.reject(where, "path escapes the CSV's folder (absolute or ..)", label)
            continue
        if presplit and row.get("split", "").strip().lower() not in SPLIT_ALIASES:
            report.reject(where, f"unknown split {row.get('split', '')!r} (use train, val or test)", label)
            continue
        norm = PurePosixPath(raw.replace("\\", "/")).as_posix()
        by_path.setdefault(norm, []).append((line, {**row, "label": label}))
    for norm, listed in sorted(by_path.items()):
        labels = sorted({row["label"] for _, row in listed})
        if len(labels) > 1:
            for line, row in listed:
                report.reject(f"{norm} (line {line})", f"label conflict: listed as {', '.join(labels)}", row["label"])
            continue
        (line, row), duplicates = listed[0], listed[1:]
        for dup_line, dup in duplicates:
            report.reject(f"{norm} (line {dup_line})", f"listed twice (first on line {line})", dup["label"])
        path = csv_path.parent / norm
        where = f"{norm} (line {line})"
        if is_hidden(PurePosixPath(norm)):
            report.reject(where, "hidden file listed in the CSV", row["label"])
        elif not path.resolve().is_relative_to(base):
            report.reject(where, "symlink resolves outside the CSV's folder", row["label"])
        elif not path.is_file():
            report.reject(where, "listed in the CSV but not found (or not a regular file)", row["label"])
        else:
            prefix = [SPLIT_ALIASES[row["split"].strip().lower()]] if presplit else []
            target = _place(dest, [*prefix, row["label"], *norm.split("/")], report, norm)
            if target is not None:
                pairs.append((path, target))
    transfer_all(pairs, report)
    return "presplit" if presplit else "classes"


def _summarise(source: str, kind: str, layout: Layout, dest: Path, report: _Report,
               source_sha256: str | None) -> IngestResult:
    files = list_files(dest)
    classes: dict[str, int] = {}
    splits: dict[str, int] = {}
    for parts, _ in files:
        label = parts[1] if layout == "presplit" else parts[0]
        classes[label] = classes.get(label, 0) + 1
        if layout == "presplit":
            splits[parts[0]] = splits.get(parts[0], 0) + 1
    digest = tree_digest(("/".join(parts), report.digests.get(p) or sha256_file(Path(p))) for parts, p in files)
    ignored = sorted(report.ignored)
    return IngestResult(source=source, kind=kind, layout=layout, content_hash=digest, n_files=len(files),
                        classes=dict(sorted(classes.items())), splits=dict(sorted(splits.items())),
                        rejected=sorted(report.rejected, key=lambda r: r["path"]), ignored=len(ignored),
                        ignored_examples=ignored[:_MAX_LISTED_IGNORED],
                        renamed=sorted(report.renamed, key=lambda r: r["to"]), source_sha256=source_sha256)


def _from_archive(archive: Path, staged: Path, scratch: Path, report: _Report, caps: Caps) -> Layout:
    unpacked = scratch / "unpacked"
    try:
        extract_archive(archive, unpacked, caps=caps)
    except ArchiveError as exc:
        raise IngestError(str(exc)) from None
    return copy_tree(_unwrap(unpacked), staged, report, move=True)


def ingest(source: str, dest: Path = RAW_DIR, *, sample_size: int = 32, sha256: str | None = None,
           caps: Caps = Caps(), fetch: Callable[[str], IO[bytes]] | None = None) -> IngestResult:
    """Materialise source into dest atomically: dest is untouched unless the whole ingest succeeds."""
    kind = source_kind(source)
    staged = staging_dir(dest)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.scratch.", dir=dest.parent))
    report = _Report()
    source_sha: str | None = None
    layout: Layout = "classes"
    try:
        if kind == "sample":
            materialise(source[len(SAMPLE_PREFIX):], staged, size=sample_size)
        elif kind == "url":
            if not sha256:
                raise IngestError(f"{source}: a URL source needs ingest.sha256")
            name = safe_name(PurePosixPath(source.split("?")[0]).name) or "download"
            try:
                archive = download(source, scratch / name, sha256=sha256, max_bytes=caps.max_total_bytes,
                                   **({"fetch": fetch} if fetch else {}))
            except ArchiveError as exc:
                raise IngestError(str(exc), retryable=exc.retryable) from None
            source_sha = sha256.lower()
            layout = _from_archive(archive, staged, scratch, report, caps)
        else:
            src = Path(source).expanduser()
            if kind == "archive":
                if not src.is_file():
                    raise IngestError(f"{source}: archive not found")
                source_sha = sha256_file(src)
                if sha256 and sha256.lower() != source_sha:
                    raise IngestError(f"{source}: sha256 {source_sha} does not match ingest.sha256 {sha256}")
                layout = _from_archive(src, staged, scratch, report, caps)
            elif kind == "csv":
                if not src.is_file():
                    raise IngestError(f"{source}: CSV manifest not found")
                layout = copy_csv(src, staged, report)
            else:
                if not src.is_dir():
                    raise IngestError(f"{source}: source not found or not a folder of class sub-folders "
                                      "(nor an archive, CSV manifest, URL or sample:)")
                layout = copy_tree(src, staged, report)
        result = _summarise(source, kind, layout, staged, report, source_sha)
        if result.n_files == 0:
            raise IngestError(f"{source}: no files found in class sub-folders"
                              + (f" ({len(report.rejected)} rejected, see the reasons above)" if report.rejected else ""))
        replace_dir(staged, dest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def main() -> None:
    """DVC stage entry point: read params, ingest, record the content hash and every rejected file."""
    from rich.console import Console

    from tasks.config import load_params

    params = load_params()
    p = params.ingest
    console = Console(stderr=True)
    try:
        result = ingest(p.source, RAW_DIR, sample_size=p.sample_size, sha256=p.sha256,
                        caps=Caps(p.max_members, p.max_total_bytes, p.max_compression_ratio))
    except IngestError as exc:
        console.print(f"[red]ingest failed:[/] {exc}")
        raise SystemExit(1 if exc.retryable else NOT_RETRYABLE_EXIT) from None
    from datetime import datetime, timezone

    # When this data version was taken: the gate refuses a candidate trained on data older than the
    # champion's (a DVC run-cache restore of an old ingest brings its old timestamp back with it).
    write_json(RECORD, {**result.to_dict(), "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    console.print(
        f"ingest: {result.n_files} files in {len(result.classes)} classes from {result.source} "
        f"({result.kind}, {result.layout} layout; content {result.content_hash[:12]})"
    )
    for item in result.rejected[:20]:
        console.print(f"[yellow]not ingested[/] {item['path']}: {item['reason']}")
    if len(result.rejected) > 20:
        console.print(f"[yellow]... {len(result.rejected) - 20} more[/] (all in {RECORD})")
    if result.ignored:
        console.print(f"ingest: {result.ignored} hidden files/folders ignored (e.g. {result.ignored_examples[0]})")
    for item in result.renamed:
        console.print(f"[yellow]renamed[/] {item['from']} -> {item['to']}: {item['reason']}")


if __name__ == "__main__":
    from tasks.stagehost import check_no_arguments

    check_no_arguments("tasks.ingest")
    main()  # not through the stage host (tasks/stagehost.py): ingest imports nothing heavy
