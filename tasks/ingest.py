"""Stage `ingest`: a source (built-in sample or a folder of class sub-folders) -> data/raw/."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.io import replace_dir, sha256_file, staging_dir, tree_digest, write_json
from tasks.sample import SAMPLE_PREFIX, materialise

RAW_DIR = Path("data/raw")
RECORD = Path("data/ingest.json")
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


class IngestError(RuntimeError):
    """The source cannot be ingested; the message says which path and why."""


@dataclass(frozen=True)
class IngestResult:
    source: str
    content_hash: str
    n_files: int
    classes: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def is_hidden(rel: Path) -> bool:
    """Hidden files and folders (dotfiles, __MACOSX, ...) are never data and never a class."""
    return any(part.startswith(".") or part in IGNORED_NAMES for part in rel.parts)


def _copy_class_folders(src: Path, dest: Path) -> list[dict[str, str]]:
    """Copy every file under src/<class>/ into dest/<class>/; return what was skipped and why."""
    skipped: list[dict[str, str]] = []
    root = src.resolve()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if is_hidden(rel):
            continue
        if path.is_dir() and path.is_symlink():  # rglob does not follow these: say so, never drop silently
            inside = path.resolve().is_relative_to(root)
            skipped.append({"path": str(rel), "reason": "symlinked folder not followed" + (
                "" if inside else ": it resolves outside the source")})
            continue
        if path.is_dir():
            continue
        if len(rel.parts) < 2:
            skipped.append({"path": str(rel), "reason": "file at the source root belongs to no class folder"})
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            skipped.append({"path": str(rel), "reason": "symlink resolves outside the source"})
            continue
        if not path.is_file():
            skipped.append({"path": str(rel), "reason": "not a regular file"})
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return skipped


def _summarise(source: str, dest: Path, skipped: list[dict[str, str]]) -> IngestResult:
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    classes: dict[str, int] = {}
    for p in files:
        label = p.relative_to(dest).parts[0]
        classes[label] = classes.get(label, 0) + 1
    digest = tree_digest((str(p.relative_to(dest)), sha256_file(p)) for p in files)
    return IngestResult(source=source, content_hash=digest, n_files=len(files),
                        classes=dict(sorted(classes.items())), skipped=skipped)


def ingest(source: str, dest: Path = RAW_DIR, *, sample_size: int = 32) -> IngestResult:
    """Materialise source into dest atomically: dest is untouched unless the whole copy succeeds."""
    staged = staging_dir(dest)
    try:
        if source.startswith(SAMPLE_PREFIX):
            materialise(source[len(SAMPLE_PREFIX):], staged, size=sample_size)
            skipped: list[dict[str, str]] = []
        else:
            src = Path(source).expanduser()
            if not src.is_dir():
                raise IngestError(f"{source}: source not found or not a folder of class sub-folders")
            skipped = _copy_class_folders(src, staged)
        result = _summarise(source, staged, skipped)
        if result.n_files == 0:
            raise IngestError(f"{source}: no files found in class sub-folders")
        replace_dir(staged, dest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return result


def main() -> None:
    """DVC stage entry point: read params, ingest, record the content hash."""
    from rich.console import Console

    from tasks.config import load_params

    params = load_params()
    console = Console(stderr=True)
    try:
        result = ingest(params.ingest.source, RAW_DIR, sample_size=params.ingest.sample_size)
    except IngestError as exc:
        console.print(f"[red]ingest failed:[/] {exc}")
        raise SystemExit(1) from None
    write_json(RECORD, result.to_dict())
    console.print(
        f"ingest: {result.n_files} files in {len(result.classes)} classes from {result.source} "
        f"(content {result.content_hash[:12]})"
    )
    for item in result.skipped:
        console.print(f"[yellow]skipped[/] {item['path']}: {item['reason']}")


if __name__ == "__main__":
    main()
