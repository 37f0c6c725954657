"""End-to-end overhead: `imgclf run` on a generated dataset next to a bare torch script that trains the
same model on the same images for the same epochs with the same seed. One JSON line, bench/results/.

Prefect's state under PREFECT_HOME (its database, and the memo that lets later starts of its server skip
registering block types), made once by the first run on a machine, is made before timing by one start of the
temporary server, and reported on its own as prefect_first_start_s. `imgclf run` is timed twice, on two
identical fresh copies: as it runs out of the box (Prefect's temporary API server, started by the run) and
against a Prefect server that is already running (`prefect server start`, PREFECT_API_URL), as scheduled
deployments run (server_*; not in the target).
The bare script is also timed with channels_last tensors (bare_channels_last_s), the memory format the train stage
uses on CPU, so the share of the gap that is only that format can be read off.

    python bench/e2e_overhead.py [--images 5000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, dataset_project, timed, write_result  # noqa: E402

BARE = r'''
import sys, time, numpy as np, torch, torch.nn.functional as F
from pathlib import Path
from PIL import Image
sys.path.insert(0, sys.argv[3])
from tasks.models import build_model          # the same architecture, nothing else from the pipeline
root, epochs = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(42)
files = sorted(root.rglob("*.png"))
labels = sorted({f.parent.name for f in files})
x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("L")) for f in files]))[:, None]
y = torch.tensor([labels.index(f.parent.name) for f in files])
idx = torch.randperm(len(x)); n_train = int(0.7 * len(x)); tr, te = idx[:n_train], idx[n_train:]
model = build_model("smallcnn", num_classes=len(labels), in_channels=1)
fmt = torch.channels_last if sys.argv[4:] == ["channels_last"] else torch.contiguous_format
model = model.to(memory_format=fmt)
opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.0005)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.003, epochs=epochs, steps_per_epoch=-(-n_train // 64), pct_start=0.2)
norm = lambda b: ((b.float() / 255 - 0.5) / 0.5).contiguous(memory_format=fmt)
for epoch in range(epochs):
    model.train()
    order = tr[torch.randperm(n_train)]
    for s in range(0, n_train, 64):
        b = order[s:s + 64]
        loss = F.cross_entropy(model(norm(x[b])), y[b], label_smoothing=0.05)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
model.eval()
with torch.no_grad():
    acc = (model(norm(x[te])).argmax(1) == y[te]).float().mean().item()
print(acc)
'''


@contextmanager
def prefect_server(cwd: Path, e: dict[str, str]):
    """A running `prefect server start` on a free port (its start is not timed); yields its API URL."""
    sys.path.insert(0, str(cwd))
    from flows.temporary_server import free_port, healthy

    port = free_port(range(4200, 4300))
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=cwd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prefect server start did not come up")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    tmp, data, project, e = dataset_project("e2e", n_images=args.images, epochs=args.epochs)
    # Prefect's own state under PREFECT_HOME exists on every machine after its first run: the database, and the
    # memo of its server's block registration (~1 CPU-s at every start until then). A scheduled retrain never
    # pays this; timed on its own, so a first-ever run is about pipeline_s + prefect_first_start_s.
    first_start = timed([sys.executable, "-c", "import tasks; from flows.temporary_server import ensure_started, stop; "
                         "ensure_started(); stop()"], project, e)
    twin = tmp / "project-server"
    shutil.copytree(project, twin, symlinks=True)
    (tmp / "bare.py").write_text(BARE)
    bare = timed([sys.executable, str(tmp / "bare.py"), str(data), str(args.epochs), str(project)], tmp, e)
    pipeline = timed([str(BIN / "imgclf"), "run"], project, e)
    # The train stage runs channels_last on CPU (faster oneDNN convolutions); a bare script written that way too:
    bare_cl = timed([sys.executable, str(tmp / "bare.py"), str(data), str(args.epochs), str(project), "channels_last"],
                    tmp, e)
    overhead = pipeline - bare
    with prefect_server(twin, e) as url:
        server = timed([str(BIN / "imgclf"), "run"], twin, {**e, "PYTHONPATH": str(twin), "PREFECT_API_URL": url})
    accuracy = json.loads((project / "reports/metrics.json").read_text())["accuracy"]
    write_result("e2e_overhead", {
        "images": args.images, "epochs": args.epochs, "pipeline_s": round(pipeline, 1), "bare_s": round(bare, 1),
        "overhead_s": round(overhead, 1), "ratio": round(pipeline / bare, 2), "pipeline_test_accuracy": accuracy,
        "prefect_first_start_s": round(first_start, 1),
        "server_pipeline_s": round(server, 1), "server_overhead_s": round(server - bare, 1),
        "server_ratio": round(server / bare, 2),
        "bare_channels_last_s": round(bare_cl, 1), "overhead_vs_bare_channels_last_s": round(pipeline - bare_cl, 1),
        "target": "overhead < 15 s + 5% of the bare run", "within_target": overhead < 15 + 0.05 * bare,
    })
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
