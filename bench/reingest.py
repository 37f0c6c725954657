"""Re-ingest cost: `dvc repro ingest` after one new image lands in an N-image source folder (what each scheduled
retraining pays when new data arrived), for the project as it is and, side by side in the same run, for the
same project with ingest's outputs `persist: true` (which makes DVC copy every file of data/raw before the
command, to unprotect its hard links into the cache).

    python bench/reingest.py [--images 20000] [--repeats 4]

Runs interleave the two projects (A B, then B A, ...), each after `sync`, so a busy disk or the first run of a
pair being slower hits both alike. Prints one JSON line and writes bench/results/reingest.json. Measured,
never asserted."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, env, make_dataset, project_copy, tempdir, timed, write_result  # noqa: E402

PLAIN_OUTS = "    outs:\n      - data/raw\n      - data/ingest.json\n"
PERSIST_OUTS = ("    outs:\n      - data/raw:\n          persist: true\n"
                "      - data/ingest.json:\n          persist: true\n")


def project(tmp: Path, source: Path, *, persist: bool) -> tuple[Path, dict[str, str]]:
    """A project copy under tmp ingesting `source`; with persist, ingest's outs are `persist: true`."""
    root = project_copy(tmp, {"ingest.source": str(source), "ingest.watch": str(source)})
    if persist:
        dvc_yaml = root / "dvc.yaml"
        text = dvc_yaml.read_text()
        if PLAIN_OUTS not in text:
            raise SystemExit("bench/reingest.py: dvc.yaml's ingest outs are not the plain list this bench edits")
        dvc_yaml.write_text(text.replace(PLAIN_OUTS, PERSIST_OUTS, 1))
    return root, env(tmp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    top = tempdir("reingest")
    images = make_dataset(top / "images", n_images=args.images, size=16)
    setups = {}
    for name in ("project", "persist"):
        source = top / f"source-{name}"
        shutil.copytree(images, source)  # one source each: adding a file to one must not touch the other
        setups[name] = (source, *project(top / name, source, persist=name == "persist"))
    dvc = [str(BIN / "python"), "-m", "dvc", "repro", "ingest"]
    first, again = {}, {name: [] for name in setups}
    for name, (_, root, e) in setups.items():
        os.sync()
        first[name] = timed(dvc, root, e)
    sample = next((images / "class_00").iterdir())
    for i in range(args.repeats):
        order = list(setups.items()) if i % 2 == 0 else list(setups.items())[::-1]  # interleaved: ABBA...
        for name, (source, root, e) in order:
            shutil.copyfile(sample, source / "class_01" / f"added_{i}.png")
            os.sync()
            again[name].append(timed(dvc, root, e))
    shutil.rmtree(top, ignore_errors=True)
    median = {name: statistics.median(times) for name, times in again.items()}
    write_result("reingest", {
        "images": args.images, "repeats": args.repeats,
        "first_ingest_s": {name: round(s, 2) for name, s in first.items()},
        "reingest_one_new_image_s": {name: [round(s, 2) for s in times] for name, times in again.items()},
        "reingest_median_s": {name: round(s, 2) for name, s in median.items()},
        "persist_vs_project": round(median["persist"] / median["project"], 2),
    })


if __name__ == "__main__":
    main()
