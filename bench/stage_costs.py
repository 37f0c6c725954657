"""Where the end-to-end time goes: each stage's CLI timed alone on a generated dataset (the flow's own
cost is `imgclf run` minus these). One JSON line, bench/results/stage_costs.json.

    python bench/stage_costs.py [--images 5000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dataset_project, timed, write_result  # noqa: E402

STAGES = ("ingest", "validate", "split", "train", "evaluate")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    tmp, data, project, e = dataset_project("stages", n_images=args.images, epochs=args.epochs)
    seconds = {s: round(timed([sys.executable, "-m", f"tasks.{s}"], project, e), 1) for s in STAGES}
    write_result("stage_costs", {"images": args.images, "epochs": args.epochs, "stage_s": seconds,
                                 "total_s": round(sum(seconds.values()), 1)})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
