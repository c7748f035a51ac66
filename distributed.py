"""One process per device under torchrun; a plain `python train.py` is a world of one and skips all of this.

torchrun (or Slurm's srun running torchrun) sets RANK, WORLD_SIZE and LOCAL_RANK; setup() joins the process group
(NCCL on CUDA, gloo on CPU) and picks this process's GPU. Every helper here is a no-op in a single process.
"""
from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError

T = TypeVar("T")


def launched():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the torchrun process group when there is one; returns this process's device.

    Only rank 0 prints: the other ranks' stdout goes to /dev/null (their errors still reach stderr)."""
    if not launched() or active():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs here: start at most "
                            "that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def shard(n: int) -> list[int]:
    """This rank's contiguous, disjoint share of range(n): every index on exactly one rank, none repeated."""
    return np.array_split(np.arange(n), world_size())[rank()].tolist()


def gather(obj: T) -> list[T]:
    """[obj of rank 0, obj of rank 1, ...] on every rank: shards gathered back in dataset order."""
    if not active():
        return [obj]
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj)
    return objs


def from_main(obj: T) -> T:
    """Rank 0's obj on every rank (the others may pass None): work done once, its result shared."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def sum_all(values: Iterable[float | torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum a few numbers (or 0-d tensors) over all ranks, in float64 (exact for counts); a tensor back on every
    rank. One small collective: a flag summed this way tells every rank whether any rank raised it."""
    t = torch.stack([torch.as_tensor(v, device=device).double() for v in values])
    if active():
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when flag is true on any: the ranks take a decision together, e.g. to stop."""
    return bool(sum_all([flag], device)[0]) if active() else bool(flag)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics: DDP trains the weights in step, but each rank updates its
    running statistics from its own batches. Afterwards EMA and evaluation see the very model rank 0 saves."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def check_in_sync(*modules: torch.nn.Module) -> None:
    """Raise if the ranks hold different weights (a per-tensor float64 fingerprint, compared across ranks)."""
    if not active():
        return
    prints = [torch.stack([t.detach().double().sum() for t in m.state_dict().values() if t.is_floating_point()])
              .cpu() for m in modules]
    mine = torch.cat(prints)
    for r, other in enumerate(gather(mine)):
        if not torch.equal(other, mine):
            raise RuntimeError(f"rank {rank()} and rank {r} hold different weights")
