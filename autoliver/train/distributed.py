"""torch.distributed for training: one process per device, started by ``torchrun``.

The CLI reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
and passes a ``DistContext``; nothing here reads the environment. Backend: NCCL on CUDA,
gloo on the CPU. Each rank draws its own patches from an infinite sampler seeded with
(seed, rank) -- the equivalent of a DistributedSampler for a sampler without epochs -- and
gets an equal share of the planned batch. Rank 0 alone writes logs, plots and checkpoints;
the final validation cases are split between the ranks.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad distributed setting: rank {self.rank} of world size {self.world_size}")


SINGLE = DistContext()


def init(ctx: DistContext, device: torch.device, timeout_minutes: float = 60.0) -> None:
    """Join the process group (no-op for a single process)."""
    if not ctx.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{ctx.master_addr}:{ctx.master_port}",
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    log.info("rank %d of %d joined (%s)", ctx.rank, ctx.world_size, backend)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def local_batch_size(batch_size: int, ctx: DistContext) -> int:
    """This rank's share of the planned (global) batch; at least 1 sample per rank."""
    if not ctx.enabled:
        return batch_size
    share = batch_size // ctx.world_size + (1 if ctx.rank < batch_size % ctx.world_size else 0)
    return max(1, share)


def rank_seed(seed: int, ctx: DistContext, epoch: int = 0) -> int:
    """Seed of this rank's patch sampler, distinct per rank and per starting epoch."""
    return (seed * 1_000_003 + epoch * 7919 + ctx.rank * 104_729) % (2**31 - 1)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over the ranks (CPU/GPU tensors both fine); identity for one process."""
    if not ctx.enabled:
        return t
    out = t.detach().clone().to(_comm_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def broadcast_float(value: float, ctx: DistContext) -> float:
    """Rank 0's value on every rank (e.g. a stop decision or a planned epoch count)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src=0)
    return float(t.item())


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


