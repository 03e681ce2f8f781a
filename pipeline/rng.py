"""The random streams of a data-parallel stage, so that it draws like single-GPU SGD and a
resumed run continues the streams it stopped in.

- Initial weights: every rank seeds `seed` before building its net, so all ranks start
  from the same weights (DDP broadcasts rank 0's as well).
- Then each rank seeds a stream of its own (`seed_rank_streams`) for what torch draws
  during training, dropout above all, on the CPU generator and the CUDA one: the images of
  one global batch are spread over the ranks, and each image must get its own mask, as it
  would on one GPU. With one seed everywhere, every rank drew the same masks.
- The augmentation's draws (crop, scale, flip, colour shift) are not torch's: they belong to
  each image's position in the epoch (pipeline/order.py), the same at any world size, so a
  checkpoint's position is all the data side needs to resume.
- Checkpoints carry every rank's torch generators (`gather_states`, gathered to rank 0);
  `restore` gives each rank its own back. With another world size the saved streams have
  no owner: each rank starts a fresh stream from (seed, rank, epoch, step) and says so.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def rank_seed(seed: int, rank: int, epoch: int = 0, step: int = 0) -> int:
    """A 63-bit seed per (seed, rank, epoch, step), unrelated between neighbours."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{epoch}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def seed_rank_streams(seed: int, rank: int, epoch: int = 0, step: int = 0) -> None:
    """This rank's own CPU and CUDA streams (torch.manual_seed seeds every CUDA device)."""
    torch.manual_seed(rank_seed(seed, rank, epoch, step))


def local_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_states(device: torch.device) -> dict:
    """Every rank's generators, in rank order (a collective: every rank calls it)."""
    mine = local_state(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"ranks": [mine]}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return {"ranks": [{k: v.cpu() for k, v in r.items()} for r in ranks]}


def restore(saved, *, rank: int, world: int, seed: int, epoch: int, step: int, device: torch.device) -> str:
    """Put back this rank's generators from a checkpoint's `rng`; returns what was done."""
    if isinstance(saved, dict) and len(saved.get("ranks", [])) == world:
        mine = saved["ranks"][rank]
        torch.set_rng_state(mine["cpu"])
        if device.type == "cuda":
            if "cuda" in mine:
                torch.cuda.set_rng_state(mine["cuda"], device)
            else:  # saved on CPU, resumed on a GPU: the CUDA stream starts here
                torch.cuda.manual_seed(rank_seed(seed, rank, epoch, step))
        return "restored"
    seed_rank_streams(seed, rank, epoch, step)
    if isinstance(saved, dict):
        return (f"fresh per-rank streams: the checkpoint holds {len(saved.get('ranks', []))} ranks' generators, "
                f"this run has {world}")
    return "fresh per-rank streams: the checkpoint holds one generator for all ranks (an older checkpoint)"
