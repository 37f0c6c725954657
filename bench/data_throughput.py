"""Images per second of ingest + validate on generated images, beside a bare decode + sha256 loop.

    python bench/data_throughput.py [N ...]      (default: 1000 10000 50000 tiny 16x16 PNGs,
                                                  then 2000 photo-sized 256x256 JPEGs)

Also times bare_copy (write one copy of every file, one at a time: ingest's floor on this disk), outside the
ratio, and reports ingest against it (ingest_vs_copy; above 1 means ingest copies faster than that loop).
Prints one JSON line and writes bench/results/data_throughput.json. Measured, never asserted. All sizes run
in one process, as listed: only the first pays for importing Great Expectations (`gx_import_included`)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.io import write_json  # noqa: E402


def generate(folder: Path, n: int, *, classes: int = 10, size: int = 16, fmt: str = "png") -> None:
    """n distinct noise images (grayscale PNG, or smooth-ish RGB JPEG) in `classes` class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if fmt == "png":
            arr = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(arr, mode="L").save(folder / f"class_{i % classes}" / f"img_{i:06d}.png")
        else:
            small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
            img = Image.fromarray(small, mode="RGB").resize((size, size), Image.Resampling.BILINEAR)
            img.save(folder / f"class_{i % classes}" / f"img_{i:06d}.jpg", quality=90)


def bare_loop(folder: Path) -> int:
    """The floor: read, sha256 and fully decode every file, nothing else."""
    import io

    from PIL import Image

    n = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        n += 1
    return n


def bare_copy(folder: Path, dest: Path) -> int:
    """Not in the ratio: what writing one copy of every file costs on this disk (ingest's floor)."""
    n = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = dest / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        n += 1
    return n


def pipeline(folder: Path, work: Path) -> dict[str, float]:
    """ingest + validate (manifest, quarantine, GX contract, Data Docs) as the stages run them."""
    from tasks.ingest import ingest
    from tasks.validate import validate

    t0 = time.perf_counter()
    record = ingest(str(folder), work / "raw")
    t1 = time.perf_counter()
    outcome = validate(work / "raw", suite_path=ROOT / "expectations" / "manifest.json", labels=None,
                       min_images_per_class=1, manifest_path=work / "manifest.csv", report_dir=work / "validation",
                       not_ingested=record.rejected, max_rejected_share=0.0)
    t2 = time.perf_counter()
    assert outcome.accepted == record.n_files and outcome.contract.success
    return {"ingest_s": t1 - t0, "validate_s": t2 - t1, "total_s": t2 - t0}


def measure(n: int, *, size: int = 16, fmt: str = "png") -> dict[str, float]:
    from tasks.validate import pool_size, pool_start_method

    # Great Expectations is imported once per process: only the first row measured in a process pays it
    preloaded = "great_expectations" in sys.modules
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-") as tmp:
        src = Path(tmp) / "src"
        generate(src, n, size=size, fmt=fmt)
        os.sync()  # flush the generated files now, so neither side pays for writing them back
        bare_loop(src)  # warm the page cache so both sides read from memory
        t0 = time.perf_counter()
        bare_loop(src)
        bare = time.perf_counter() - t0
        timings = pipeline(src, Path(tmp) / "work")
        os.sync()  # (nothing is deleted before this: deleting on a disk mounted with `discard` slows creates)
        t0 = time.perf_counter()
        bare_copy(src, Path(tmp) / "copy")
        copy = time.perf_counter() - t0
        shutil.rmtree(src)
    row = {"n": n, "image": f"{size}x{size} {fmt}", "bare_s": round(bare, 3), "bare_copy_s": round(copy, 3), **{k: round(v, 3) for k, v in timings.items()}}
    row["bare_img_per_s"] = round(n / bare, 1)
    row["pipeline_img_per_s"] = round(n / timings["total_s"], 1)
    row["validate_img_per_s"] = round(n / timings["validate_s"], 1)
    row["pipeline_vs_bare"] = round(bare / timings["total_s"], 3)
    row["validate_vs_bare"] = round(bare / timings["validate_s"], 3)
    row["ingest_vs_copy"] = round(copy / timings["ingest_s"], 3)  # ingest against its floor: one bare copy loop
    method = pool_start_method()
    row["inspect_workers"] = pool_size(n, method=method) or 1  # processes validate inspected the files with
    row["pool_start"] = method
    row["gx_import_included"] = not preloaded
    return row


def main(sizes: list[int]) -> dict:
    import tqdm

    # Each validate stage runs in a process of its own, which inspects the images (forking its pool: see
    # tasks/validate.pool_start_method) before Great Expectations starts tqdm's monitor thread. Here every row
    # runs in one process: without this, the first row's thread would make later rows spawn instead.
    tqdm.tqdm.monitor_interval = 0
    rows = []
    for n in sizes:
        rows.append(measure(n))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if sizes == DEFAULT_SIZES:
        rows.append(measure(2000, size=256, fmt="jpg"))
    result = {"bench": "data_throughput", "cpus": os.cpu_count(), "python": platform.python_version(),
              "rows": rows}
    print(json.dumps(result))
    write_json(ROOT / "bench" / "results" / "data_throughput.json", result)
    return result


DEFAULT_SIZES = [1000, 10000, 50000]

if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or DEFAULT_SIZES)
