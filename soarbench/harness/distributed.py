"""Process-group plumbing. Launch with torchrun (or accelerate launch, which sets the same variables):

    torchrun --nproc_per_node 8 -m soarbench train --config cfg.toml --out runs/x

A single process needs no launcher. Gradients are averaged with an explicit all-reduce after backward rather
than DDP's hooks, because SOAR calls the network twice with gradient before one backward.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_objects(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, params) -> None:
        """Give every rank rank 0's values (freshly initialised weights such as LoRA adapters differ by rank)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def average_gradients(self, params, bucket_numel: int = 1 << 24) -> None:
        """Average .grad over ranks in flat buckets (one all-reduce per ~16M elements).

        A parameter without a gradient on this rank contributes zeros, so every rank issues the same collectives.
        """
        if not self.distributed:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel()
            if bucket and (g is None or size >= bucket_numel):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat /= self.world_size
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0


def init_world(device: str = "auto") -> World:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def rank_seed(global_seed: int, world: World) -> int:
    """DiT's rule: every rank draws different noise, timesteps and sigma'."""
    return global_seed * world.world_size + world.rank
