"""Multi-process training under `torchrun`: NCCL on GPUs, gloo on CPU. One process per device; rank 0 alone
talks to MLflow, writes the feature cache, checkpoints and the model. Without torchrun, world size is 1 and every
helper here does nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Context:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Context(rank, world, local_rank)


def current() -> Context:
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Context()


def device(ctx: Context) -> torch.device:
    return torch.device(f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")


def gather_rows(local: torch.Tensor | None, indices: torch.Tensor, total: int) -> torch.Tensor | None:
    """Reassemble a tensor whose rows `indices` each rank computed; every rank gets all `total` rows. A rank with
    nothing to give sends None (its rows stay zero); None when every rank did."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (indices.cpu(), None if local is None else local.cpu()))
    given = [(part_indices, part) for part_indices, part in parts if part is not None]
    if not given:
        return None
    template = given[0][1]
    out = torch.zeros((total, *template.shape[1:]), dtype=template.dtype)
    for part_indices, part in given:
        out[part_indices] = part
    return out


def sum_across(*values: float) -> list[float]:
    """Sum numbers over ranks (losses, counts) so every rank reports the whole epoch."""
    if not current().enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.cuda.is_available():
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast(value):
    if not current().enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def finish() -> None:
    """Leave the process group once every rank is done (rank 0 logs the model after the others finish)."""
    if current().enabled:
        dist.barrier()
        dist.destroy_process_group()
