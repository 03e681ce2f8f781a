"""Random streams under data parallelism, on two real gloo processes (no Ray): identical
initial weights, each rank its own dropout masks, and a resume from the gathered
generators continues every rank's stream where it stopped."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import rng
from pipeline.models import build_model

SEED = 7


def _masks(model, n: int) -> list[torch.Tensor]:
    """What dropout draws in `n` training steps (drop6's masks on a batch of 4)."""
    drop = model.classifier.drop6.train()
    return [drop(torch.ones(4, model.classifier.fc6.out_features)) != 0 for _ in range(n)]


def _start(rank: int):
    """A worker's start, as pipeline/worker.py does it."""
    torch.manual_seed(SEED)  # one seed for the initial weights ...
    model = build_model("A", num_classes=10, width_mult=0.0625, input_size=32, dropout=0.5)
    rng.seed_rank_streams(SEED, rank)  # ... then each rank its own stream
    return model


def _rank(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = _start(rank)
        result = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "before": _masks(model, 3)}
        saved = rng.gather_states(torch.device("cpu"))  # every rank calls it; rank 0 keeps it
        result["after"] = _masks(model, 3)
        if rank == 0:
            torch.save(saved, f"{out}/rng.pt")
        dist.barrier()
        # A restarted worker group: seeded as at any start, then the checkpoint's streams.
        model = _start(rank)
        saved = torch.load(f"{out}/rng.pt", weights_only=False)
        result["how"] = rng.restore(saved, rank=rank, world=world, seed=SEED, epoch=0, step=3,
                                    device=torch.device("cpu"))
        result["resumed"] = _masks(model, 3)
        torch.save(result, f"{out}/rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_start_identical_draw_their_own_masks_and_resume_their_streams(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    first = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=False) for r in range(2)]
    for key, value in first[0]["weights"].items():
        assert torch.equal(value, first[1]["weights"][key]), key  # identical initial weights
    for step in range(3):  # each rank its own dropout masks, as the images of one batch on one GPU
        assert not torch.equal(first[0]["before"][step], first[1]["before"][step])
    saved = torch.load(tmp_path / "rng.pt", weights_only=False)
    assert len(saved["ranks"]) == 2 and not torch.equal(saved["ranks"][0]["cpu"], saved["ranks"][1]["cpu"])
    for rank in range(2):
        assert first[rank]["how"] == "restored"
        for step in range(3):  # after a restart the streams continue where the checkpoint was taken
            assert torch.equal(first[rank]["resumed"][step], first[rank]["after"][step])


def test_streams_that_cannot_be_restored_start_fresh_per_rank_and_say_why():
    cpu = torch.device("cpu")
    saved = rng.gather_states(cpu)  # one process, no group: one rank
    assert len(saved["ranks"]) == 1
    how = rng.restore(saved, rank=1, world=2, seed=SEED, epoch=4, step=0, device=cpu)
    assert "1 ranks' generators, this run has 2" in how
    a = torch.rand(3)
    rng.restore(torch.get_rng_state(), rank=1, world=2, seed=SEED, epoch=4, step=0, device=cpu)  # older format
    assert torch.equal(torch.rand(3), a)  # the same fresh stream for (seed, rank, epoch, step)
    rng.restore(saved, rank=0, world=2, seed=SEED, epoch=4, step=0, device=cpu)
    assert not torch.equal(torch.rand(3), a)  # rank 0's differs
    assert rng.rank_seed(SEED, 0) != rng.rank_seed(SEED, 1) and 0 <= rng.rank_seed(SEED, 1) < 2**63
