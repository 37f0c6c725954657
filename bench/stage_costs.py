"""Where the end-to-end time goes: each stage's CLI timed alone on a generated dataset, in its own interpreter
(as `dvc repro` runs it) and warm (as a flow run does: handed to a preloaded stage host, tasks/stagehost.py).
The flow's own cost is `imgclf run` minus the warm figures. One JSON line, bench/results/stage_costs.json.

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
    warm = warm_seconds(project, e)
    write_result("stage_costs", {"images": args.images, "epochs": args.epochs, "stage_s": seconds,
                                 "total_s": round(sum(seconds.values()), 1), "warm_stage_s": warm,
                                 "warm_total_s": round(sum(warm.values()), 1)})
    shutil.rmtree(tmp, ignore_errors=True)


def warm_seconds(project: Path, env: dict[str, str]) -> dict[str, float]:
    """The same commands with a stage host serving them, once its imports are done (ingest never uses one)."""
    import time

    from tasks.stagehost import ENV, serving

    with serving(project) as host:
        time.sleep(20)  # the host's imports take ~7 s on an idle 2-core machine; a stage would wait for them
        env = {**env, ENV: host.path if host else ""}
        return {s: round(timed([sys.executable, "-m", f"tasks.{s}"], project, env), 1) for s in STAGES}


if __name__ == "__main__":
    main()
