"""DDP on CPU: two gloo processes train one model on disjoint shards and end with identical weights."""

import json
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from tasks.models import build_model
    from tasks.preprocess import Preprocess
    from tasks.train import TrainConfig, distributed_rank, fit

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(1)
        y = torch.arange(64) % 2
        x = (torch.rand(64, 1, 16, 16, generator=g) * 60).to(torch.uint8)
        x[y == 0, :, :8] += 150
        x[y == 1, :, 8:] += 150
        cfg = TrainConfig(model="smallcnn", image_size=16, epochs=3, batch_size=8, optimizer="adamw", lr=0.01,
                          weight_decay=0.0, label_smoothing=0.0, hflip=False, translate=0.1, device="cpu",
                          seed=3)
        torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
        model = build_model("smallcnn", num_classes=2, in_channels=1)
        seen_batches = []
        original = model.forward
        model.forward = lambda t: (seen_batches.append(t.shape[0]) if model.training else None) or original(t)
        result, best = fit(model, (x, y), (x[:32], y[:32]), Preprocess.for_mode("L", 16), cfg)
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "rank_world": list(distributed_rank()), "history": [
                {k: v for k, v in h.items() if k != "throughput"} for h in result.history],
            "train_images_this_rank": sum(seen_batches),
            "weights_sum": float(sum(v.double().sum() for v in best.values())),
            "best_val_accuracy": result.best_val_accuracy}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_train_in_lockstep_on_half_the_data_each(tmp_path: Path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["rank_world"] == [0, 2] and r1["rank_world"] == [1, 2]
    assert r0["train_images_this_rank"] == r1["train_images_this_rank"] == 3 * 32  # 3 epochs x half of 64
    assert r0["history"] == r1["history"]  # metrics all-reduced over both shards
    assert all(h["epoch"] == i + 1 for i, h in enumerate(r0["history"]))
    assert r0["weights_sum"] == r1["weights_sum"]  # same weights on both ranks
    assert r0["best_val_accuracy"] >= 0.9
