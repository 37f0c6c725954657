"""No-op cost: `dvc repro` and `imgclf run` when nothing changed (after one real run on a small dataset).

    python bench/noop_cost.py [--images 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, timed, trained_project, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp, _, project, e, first = trained_project("noop", n_images=args.images, epochs=1)
    dvc = [timed([sys.executable, "-m", "dvc", "repro"], project, e) for _ in range(args.repeats)]
    run = [timed([str(BIN / "imgclf"), "run"], project, e) for _ in range(args.repeats)]
    write_result("noop_cost", {
        "images": args.images, "first_run_s": round(first, 1),
        "dvc_repro_noop_s": round(statistics.median(dvc), 2), "imgclf_run_noop_s": round(statistics.median(run), 2),
        "target": "dvc repro no-op < 2 s", "within_target": statistics.median(dvc) < 2.0,
    })
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
