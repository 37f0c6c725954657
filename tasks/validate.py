"""Stage `validate`: a manifest of per-image facts, the quarantine list, and the Great Expectations contract.

Every file ingest found becomes one manifest row, accepted or not with its reason; nothing is deleted, and
discovered == accepted + quarantined is checked on every run. The per-file inspection (sha256, full decode,
perceptual hash) runs in a process pool when there are many files."""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tasks.contract import Check, ContractResult, load_suite, run_suite
from tasks.io import list_files, write_json, write_text

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    import pandas as pd
    from PIL import Image

__all__ = ["Check", "ContractResult", "build_manifest", "contract_frame", "dataset_mode", "inspect_image",
           "load_suite", "run_contract", "validate"]

RAW_DIR = Path("data/raw")
INGEST_RECORD = Path("data/ingest.json")
MANIFEST = Path("data/manifest.csv")
REPORT_DIR = Path("reports/validation")
SUITE = Path("expectations/manifest.json")
MAX_PIXELS = 50_000_000
MANIFEST_COLUMNS = [
    "path", "label", "split_hint", "bytes", "sha256", "phash", "format", "mode", "width", "height",
    "n_frames", "exif_orientation", "decodable", "accepted", "reason", "note",
]
MANIFEST_DTYPES = {"path": str, "label": str, "split_hint": str, "sha256": str, "phash": str, "format": str,
                   "mode": str, "reason": str, "note": str}
# Below this, starting a pool costs more than it saves. A spawned pool starts interpreters that import again:
# measured on a busy 2-core host, 10k tiny PNGs 1.7-2.3 s inline vs 4.6-5.0 s pooled; 50k 11 s vs 6.5 s. A
# forked one starts at once with everything imported: 5k 0.51 s inline vs 0.31 s pooled (quiet host).
POOL_MIN_FILES = 20_000
POOL_MIN_FILES_FORKED = 2_000
_FORMAT_EXTENSIONS = {"PNG": {".png"}, "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"}, "GIF": {".gif"},
                      "BMP": {".bmp", ".dib"}, "TIFF": {".tif", ".tiff"}, "WEBP": {".webp"}, "PPM": {".ppm", ".pgm",
                      ".pbm", ".pnm"}, "ICO": {".ico"}}


_TRANSPOSING_ORIENTATIONS = frozenset(range(2, 9))  # EXIF orientations that ImageOps.exif_transpose acts on
PHASH_SIZE = 8                  # imagehash.phash defaults: 8x8 low frequencies of a 32x32 DCT
PHASH_SIDE = PHASH_SIZE * 4
PHASH_BLOCK = 512              # images per DCT call in phash_many


def phash_many(images: "list[Image.Image]") -> list[str]:
    """imagehash.phash's hex strings for many 32x32 L images at once (same DCT, median and bit order)."""
    import numpy as np
    import scipy.fftpack
    from PIL import Image

    if not images:
        return []
    if len(images) > PHASH_BLOCK:  # blocks keep the DCT's float64 arrays small: 10k images at once took 8x longer
        return [h for i in range(0, len(images), PHASH_BLOCK) for h in phash_many(images[i:i + PHASH_BLOCK])]
    # one strip image and one tobytes() instead of a numpy conversion per image
    strip = Image.new("L", (PHASH_SIDE, PHASH_SIDE * len(images)))
    for i, small in enumerate(images):
        strip.paste(small, (0, i * PHASH_SIDE))
    stack = np.frombuffer(strip.tobytes(), dtype=np.uint8).reshape(len(images), PHASH_SIDE, PHASH_SIDE)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(stack, axis=1), axis=2)
    low = dct[:, :PHASH_SIZE, :PHASH_SIZE].reshape(len(images), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return [row.tobytes().hex() for row in np.packbits(bits, axis=1)]


def _phash_pixels(img: "Image.Image") -> "Image.Image":
    """The 32x32 L image imagehash.phash transforms (policy conversion to L, then its LANCZOS resize)."""
    from PIL import Image

    from tasks.preprocess import to_mode

    return to_mode(img, "L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS)


def _inspect(data: bytes, *, max_pixels: int, suffix: str) -> tuple[dict[str, Any], "Image.Image | None"]:
    """Facts about one file's bytes (phash left empty) and the pixels its phash is computed from.

    One PIL open of the in-memory bytes gives everything: header facts, EXIF, the full decode, the
    policy notes and the oriented image the perceptual hash is taken of."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from tasks.config import SUPPORTED_MODES
    from tasks.preprocess import policy_notes

    facts: dict[str, Any] = {"format": None, "mode": None, "width": None, "height": None, "n_frames": None,
                             "exif_orientation": None, "phash": None, "decodable": False, "reason": "", "note": ""}
    if not data:
        facts["reason"] = "empty file (0 bytes)"
        return facts, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                n_frames = int(getattr(img, "n_frames", 1))
                facts.update(format=img.format, mode=img.mode, width=img.width, height=img.height, n_frames=n_frames)
                if img.width * img.height > max_pixels:
                    facts["reason"] = (f"{img.width}x{img.height} = {img.width * img.height:,} pixels exceeds the "
                                       f"{max_pixels:,}-pixel cap (validate.max_pixels); not decoded")
                    return facts, None
                if img.mode not in SUPPORTED_MODES:
                    facts["reason"] = f"mode {img.mode} is not supported by the image policy"
                    return facts, None
                exif_read = True
                try:
                    orientation = img.getexif().get(0x0112)
                except Exception:  # a broken EXIF block is not a broken image
                    orientation, exif_read = None, False
                facts["exif_orientation"] = int(orientation) if isinstance(orientation, int) else None
                img.seek(0)
                img.load()  # the full decode: a truncated file fails here, not at open()
                notes = policy_notes(img, n_frames=n_frames, orientation=facts["exif_orientation"])
                # exif_transpose only copies an image it does not rotate: skip it for a plain int (or no) tag;
                # anything odd (unreadable EXIF, a non-int tag) still goes through it, as before
                plain = exif_read and (orientation is None or (isinstance(orientation, int)
                                                               and orientation not in _TRANSPOSING_ORIENTATIONS))
                shown = img if plain else ImageOps.exif_transpose(img)
                facts.update(width=shown.width, height=shown.height)
                pixels = _phash_pixels(shown)
    except Image.DecompressionBombError as exc:
        facts["reason"] = f"decompression bomb: {exc}"
        return facts, None
    except UnidentifiedImageError:
        facts["reason"] = "not an image: no decoder recognises the content (text, or an unsupported format?)"
        return facts, None
    except Exception as exc:  # any decoder error means "not an image we can use"
        facts["reason"] = f"cannot decode: {type(exc).__name__}: {exc}"
        return facts, None
    expected = _FORMAT_EXTENSIONS.get(facts["format"] or "")
    if suffix and expected and suffix.lower() not in expected:
        notes.append(f"extension {suffix} but the content is {facts['format']}")
    facts["decodable"] = True
    facts["note"] = "; ".join(notes)
    return facts, pixels


def inspect_bytes(data: bytes, *, max_pixels: int = MAX_PIXELS, suffix: str = "") -> dict[str, Any]:
    """Facts about one file's bytes under the image policy; never raises for a bad image."""
    facts, pixels = _inspect(data, max_pixels=max_pixels, suffix=suffix)
    if pixels is not None:
        (facts["phash"],) = phash_many([pixels])
    return facts


def _inspect_file(path: str, max_pixels: int) -> tuple[dict[str, Any], "Image.Image | None"]:
    """Read a file once: its size, sha256 and image facts all come from the same bytes."""
    import hashlib

    with open(path, "rb") as fh:
        data = fh.read()
    name = os.path.basename(path)
    dot = name.rfind(".")
    suffix = name[dot:] if 0 < dot < len(name) - 1 else ""  # what Path(path).suffix gives
    facts, pixels = _inspect(data, max_pixels=max_pixels, suffix=suffix)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **facts}, pixels


def inspect_image(path: Path, *, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """Facts about one file, including its size and sha256; a full decode decides `decodable`."""
    facts, small = _inspect_file(str(path), max_pixels)
    if small is not None:
        (facts["phash"],) = phash_many([small])
    return facts


def _inspect_many(paths: list[str], max_pixels: int) -> list[dict[str, Any]]:
    """Worker: inspect a chunk of files, perceptual hashes batched (top-level so a process pool can pickle it)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)
    results = [_inspect_file(p, max_pixels) for p in paths]
    hashed = [facts for facts, pixels in results if pixels is not None]
    for facts, phash in zip(hashed, phash_many([pixels for _, pixels in results if pixels is not None])):
        facts["phash"] = phash
    return [facts for facts, _ in results]


def _warm_worker() -> None:
    """Pool initialiser: import what _inspect_many needs before the first chunk arrives."""
    import hashlib  # noqa: F401

    import numpy  # noqa: F401
    import scipy.fftpack  # noqa: F401
    from PIL import Image, ImageOps, PngImagePlugin  # noqa: F401

    import tasks.config  # noqa: F401
    import tasks.preprocess  # noqa: F401


def pool_start_method() -> str:
    """fork where that is safe: Linux, and no other thread running in this process (a warm stage forked from
    the run's host, or a plain interpreter), so the workers start at once with what is already imported
    (ProcessPoolExecutor forks all its workers before it starts its own thread). spawn otherwise: a forked
    worker must not inherit locks held by other threads (Prefect's, torch's, Great Expectations')."""
    import threading

    return "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"


def _pool(workers: int, method: str) -> "ProcessPoolExecutor":
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_warm_worker)


def _chunks(names: list[str], workers: int) -> list[list[str]]:
    size = max(64, len(names) // (workers * 8))
    return [names[i:i + size] for i in range(0, len(names), size)]


def pool_size(n_files: int, workers: int | None = None, method: str = "spawn") -> int:
    """Worker processes to inspect n_files with, started by `method`; 0 means inline (serial): for small
    inputs, or workers=1."""
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    least = POOL_MIN_FILES_FORKED if method == "fork" else POOL_MIN_FILES
    return workers if workers > 1 and n_files >= least else 0


def inspect_all(paths: list[Path], *, max_pixels: int = MAX_PIXELS, workers: int | None = None,
                while_waiting: "Callable[[], object] | None" = None) -> list[dict[str, Any]]:
    """inspect_image over many files, in a process pool when that pays off; order is preserved.

    while_waiting runs in this process while the pool works (importing the contract's libraries, say), or
    first when there is no pool."""
    names = [str(p) for p in paths]
    method = pool_start_method()
    workers = pool_size(len(names), workers, method)
    if workers == 0:
        if while_waiting is not None:
            while_waiting()
        return _inspect_many(names, max_pixels)
    chunks = _chunks(names, workers)
    with _pool(workers, method) as pool:
        futures = [pool.submit(_inspect_many, chunk, max_pixels) for chunk in chunks]
        if while_waiting is not None:
            while_waiting()
        return [facts for future in futures for facts in future.result()]


def discover(raw_dir: Path, *, layout: str = "classes") -> list[tuple[str, str, str, str]]:
    """(file, relative path, label, split hint) for every file under raw_dir in the given layout, in path order."""
    depth = 2 if layout == "presplit" else 1
    out = []
    for parts, path in list_files(raw_dir):  # in path order, as sorted(Path, ...) gives
        rel = "/".join(parts)
        if len(parts) <= depth:
            out.append((path, rel, "", parts[0] if depth == 2 and len(parts) == 2 else ""))
        else:
            out.append((path, rel, parts[depth - 1], parts[0] if depth == 2 else ""))
    return out


def _label_conflicts(frame: "pd.DataFrame") -> dict[int, str]:
    """Row index -> reason, for identical bytes filed under more than one label."""
    ok = frame[frame["accepted"]]
    n_labels = ok.groupby("sha256")["label"].transform("nunique")
    reasons: dict[int, str] = {}
    for _, group in ok[n_labels > 1].groupby("sha256"):
        for i, row in group.iterrows():
            others = [f"{p} ({lab})" for p, lab in zip(group["path"], group["label"]) if p != row["path"]]
            reasons[i] = "label conflict: identical to " + ", ".join(others[:3])
    return reasons


def build_manifest(raw_dir: Path, *, max_pixels: int = MAX_PIXELS, layout: str = "classes",
                   not_ingested: Iterable[dict[str, str]] = (), workers: int | None = None,
                   while_waiting: Callable[[], object] | None = None) -> "pd.DataFrame":
    """One row per discovered file (plus those ingest refused), accepted or not with the reason.

    while_waiting (optional) runs in this process while a process pool inspects the files."""
    import pandas as pd

    found = discover(raw_dir, layout=layout)
    facts = inspect_all([f[0] for f in found], max_pixels=max_pixels, workers=workers, while_waiting=while_waiting)
    rows = []
    for (_, rel, label, hint), fact in zip(found, facts):
        row = {"path": rel, "label": label, "split_hint": hint, **fact}
        if not label and row["decodable"]:
            row["reason"] = "not in a class folder"
        row["accepted"] = bool(row["decodable"]) and not row["reason"]
        rows.append(row)
    for item in not_ingested:
        rows.append({"path": item["path"], "label": item.get("label", ""), "split_hint": "", "decodable": False,
                     "accepted": False, "reason": f"not ingested: {item['reason']}", "note": ""})
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame = frame.astype({"accepted": bool, "decodable": bool, "bytes": "Int64", "width": "Int64",
                          "height": "Int64", "n_frames": "Int64", "exif_orientation": "Int64"})
    for i, reason in _label_conflicts(frame).items():
        frame.loc[i, ["accepted", "reason"]] = [False, reason]
    frame[["reason", "note", "split_hint"]] = frame[["reason", "note", "split_hint"]].fillna("")
    return frame


def dataset_mode(manifest: "pd.DataFrame") -> str:
    """'L' when every accepted image is grayscale, else 'RGB'."""
    from tasks.preprocess import GRAYSCALE_MODES

    accepted = manifest["accepted"].astype(str).str.lower().isin(["true", "1"]) \
        if manifest["accepted"].dtype != bool else manifest["accepted"]
    modes = set(manifest.loc[accepted, "mode"].dropna())
    return "L" if modes and modes <= set(GRAYSCALE_MODES) else "RGB"


def contract_frame(manifest: "pd.DataFrame") -> "pd.DataFrame":
    """The accepted rows plus derived columns the suite checks (class size, imbalance, rejected share)."""
    accepted = manifest[manifest["accepted"]].copy()
    accepted["class_count"] = accepted.groupby("label")["path"].transform("count")
    largest = accepted["class_count"].max() if len(accepted) else 0
    accepted["class_imbalance"] = largest / accepted["class_count"]
    accepted["rejected_share"] = float((~manifest["accepted"]).sum()) / max(len(manifest), 1)
    return accepted.reset_index(drop=True)


def run_contract(frame: "pd.DataFrame", suite_json: dict, parameters: dict[str, Any], *,
                 docs_dir: Path | None = None) -> ContractResult:
    """The manifest suite on the accepted rows (see tasks.contract.run_suite)."""
    return run_suite(frame, suite_json, parameters, name="manifest", docs_dir=docs_dir)


def contract_parameters(found: list[str], *, labels: list[str] | None, min_images_per_class: int, min_side: int,
                        max_side: int, allowed_modes: list[str], max_class_imbalance: float,
                        max_rejected_share: float, max_duplicate_share: float) -> dict[str, Any]:
    """The suite's $PARAMETER values, from the validate section of params.yaml."""
    return {"labels": list(labels) if labels else found, "min_images_per_class": min_images_per_class,
            "min_side": min_side, "max_side": max_side, "allowed_modes": list(allowed_modes),
            "max_class_imbalance": float(max_class_imbalance), "max_rejected_share": float(max_rejected_share),
            "unique_sha256_mostly": 1.0 - float(max_duplicate_share)}


def summary_markdown(*, discovered: int, accepted: int, contract: ContractResult,
                     quarantine: "pd.DataFrame | None" = None, notes: dict[str, int] | None = None) -> str:
    """A human-readable validation report."""
    lines = [
        f"# Data validation: {'PASSED' if contract.success else 'FAILED'}", "",
        f"- discovered: {discovered}", f"- accepted: {accepted}",
        f"- quarantined: {discovered - accepted} (see quarantine.csv; nothing was deleted)",
    ]
    if contract.data_docs:
        lines.append(f"- Great Expectations Data Docs: {contract.data_docs}")
    lines += ["", "| expectation | column | result | detail |", "|---|---|---|---|"]
    for c in contract.checks:
        lines.append(f"| {c.expectation} | {c.column or ''} | {'pass' if c.success else 'FAIL'} | {c.detail} |")
    for c in contract.failures:
        if c.examples:
            lines += ["", f"Examples failing {c.expectation} ({c.column}):"] + [f"- {e}" for e in c.examples]
    if quarantine is not None and len(quarantine):
        reasons = quarantine["reason"].str.split(":").str[0].value_counts()
        lines += ["", "## Quarantined, by reason", ""] + [f"- {r}: {n}" for r, n in reasons.items()]
        lines += ["", "First quarantined files:", ""] + [
            f"- {p}: {r}" for p, r in zip(quarantine["path"][:20], quarantine["reason"][:20])]
    if notes:
        lines += ["", "## Image policy applied to accepted files", ""] + [f"- {k}: {v}" for k, v in notes.items()]
    return "\n".join(lines) + "\n"


def _import_contract_libraries() -> None:
    """Great Expectations takes seconds to import: done while the pool inspects images, it costs no wall time."""
    import great_expectations  # noqa: F401
    import pandas  # noqa: F401


@dataclass(frozen=True)
class ValidationOutcome:
    discovered: int
    accepted: int
    quarantined: int
    mode: str
    contract: ContractResult


def _note_counts(manifest: "pd.DataFrame") -> dict[str, int]:
    """How many accepted files each policy note applies to. Notes are joined by "; " (a mode name can hold a
    ";" of its own: I;16); the frame count is left out of the key, so one line covers every multi-frame file."""
    counts: dict[str, int] = {}
    for note in manifest.loc[manifest["accepted"], "note"]:
        for part in filter(None, (n.strip() for n in str(note).split("; "))):
            key = "first frame of a multi-frame file used" if part.startswith("first of") else part
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def validate(raw_dir: Path, *, suite_path: Path, labels: list[str] | None, min_images_per_class: int,
             manifest_path: Path = MANIFEST, report_dir: Path = REPORT_DIR, layout: str = "classes",
             not_ingested: Iterable[dict[str, str]] = (), max_pixels: int = MAX_PIXELS, min_side: int = 1,
             max_side: int = 1_000_000, allowed_modes: list[str] | None = None, max_class_imbalance: float = 1e9,
             max_rejected_share: float = 1.0, max_duplicate_share: float = 0.0, workers: int | None = None,
             data_docs: bool = True) -> ValidationOutcome:
    """Build the manifest, write it and the quarantine list, run the contract, write the reports."""
    from tasks.config import SUPPORTED_MODES

    manifest = build_manifest(raw_dir, max_pixels=max_pixels, layout=layout, not_ingested=not_ingested,
                              workers=workers,
                              while_waiting=None if "great_expectations" in sys.modules else _import_contract_libraries)
    frame = contract_frame(manifest)
    quarantined = manifest[~manifest["accepted"]]
    if len(frame) + len(quarantined) != len(manifest):  # nothing may go missing between the two lists
        raise AssertionError("discovered != accepted + quarantined")
    found = sorted(frame["label"].unique().tolist())
    parameters = contract_parameters(
        found, labels=labels, min_images_per_class=min_images_per_class, min_side=min_side, max_side=max_side,
        allowed_modes=allowed_modes or list(SUPPORTED_MODES), max_class_imbalance=max_class_imbalance,
        max_rejected_share=max_rejected_share, max_duplicate_share=max_duplicate_share)
    report_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = report_dir / "data_docs" if data_docs else None
    contract = run_contract(frame, load_suite(suite_path), parameters, docs_dir=docs_dir)
    mode = dataset_mode(manifest)
    notes = _note_counts(manifest)

    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(manifest_path, manifest.to_csv(index=False))
    write_text(report_dir / "quarantine.csv", quarantined[["path", "label", "reason"]].to_csv(index=False))
    outcome = ValidationOutcome(len(manifest), len(frame), len(quarantined), mode, contract)
    write_json(report_dir / "summary.json", {
        "success": contract.success, "discovered": outcome.discovered, "accepted": outcome.accepted,
        "quarantined": outcome.quarantined, "mode": mode, "labels": found, "parameters": parameters,
        "policy_notes": notes, "data_docs": contract.data_docs,
        "checks": [asdict(c) for c in contract.checks],
    })
    write_text(report_dir / "summary.md",
               summary_markdown(discovered=outcome.discovered, accepted=outcome.accepted, contract=contract,
                                quarantine=quarantined, notes=notes))
    return outcome


def main() -> None:
    """DVC stage entry point."""
    from rich.console import Console

    from tasks.config import load_params

    params = load_params()
    v = params.validate_
    console = Console(stderr=True)
    record = json.loads(INGEST_RECORD.read_text()) if INGEST_RECORD.is_file() else {}
    outcome = validate(RAW_DIR, suite_path=SUITE, labels=v.labels, min_images_per_class=v.min_images_per_class,
                       layout=record.get("layout", "classes"), not_ingested=record.get("rejected", []),
                       max_pixels=v.max_pixels, min_side=v.min_side, max_side=v.max_side,
                       allowed_modes=list(v.allowed_modes), max_class_imbalance=v.max_class_imbalance,
                       max_rejected_share=v.max_rejected_share, max_duplicate_share=v.max_duplicate_share)
    console.print(f"validate: {outcome.accepted}/{outcome.discovered} accepted, "
                  f"{outcome.quarantined} quarantined ({REPORT_DIR / 'quarantine.csv'})")
    if outcome.contract.data_docs:
        console.print(f"validate: Data Docs at {outcome.contract.data_docs}")
    if not outcome.contract.success:
        console.print("[red]Data contract FAILED[/] — training will not start. Failing expectations:")
        for check in outcome.contract.failures:
            console.print(f"  - {check.detail}" + (f"  ({check.why})" if check.why else ""))
            for example in check.examples:
                console.print(f"      e.g. {example}")
        console.print(f"Full report: {REPORT_DIR / 'summary.md'}")
        raise SystemExit(1)
    console.print("validate: data contract passed"
                  + (f"; {outcome.quarantined} file(s) quarantined, training proceeds without them"
                     if outcome.quarantined else ""))


if __name__ == "__main__":
    from tasks.stagehost import check_no_arguments, run_main

    check_no_arguments("tasks.validate")
    run_main("tasks.validate", main)
