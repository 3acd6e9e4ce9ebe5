"""The distributed engine: accelerate (DDP, DeepSpeed ZeRO-2/3, FSDP2), behind the few calls the loop makes.

    soarbench train --config cfg.toml --out runs/x                                       # one process
    accelerate launch --config_file configs/accelerate/ddp.yaml   -m soarbench train ...  # DDP, 8 GPUs
    accelerate launch --config_file configs/accelerate/zero2.yaml -m soarbench train ...  # DeepSpeed ZeRO-2
    accelerate launch --config_file configs/accelerate/zero3.yaml -m soarbench train ...  # DeepSpeed ZeRO-3
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m soarbench train ...  # FSDP2
    torchrun --nproc_per_node 8 -m soarbench train ...                                    # plain DDP
    accelerate launch --multi_gpu --num_processes 2 -m soarbench train ... --set train.device=cpu   # CPU, gloo

(On CPU, `accelerate launch --cpu --num_processes N` starts ONE process unless an MPI hostfile is given; use
`--multi_gpu --num_processes N` with `train.device = "cpu"`, which runs torchrun and gloo.)

The engine averages gradients (DDP all-reduce, ZeRO reduce-scatter, FSDP), holds the mixed-precision policy and
the gradient accumulation. The loop scales each micro-batch's summed loss by world * accumulation / (global
count) so that, after the engine's averaging, the gradient is the pooled mean over every sample of the global
batch, whatever its split over processes and accumulation slots.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from soarbench.errors import UserError


def resolve_device(device: str) -> str:
    """'auto' -> cuda when present; a CUDA device on a machine without one is a user error."""
    if device in ("auto", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("gpu",):
        device = "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config: train.device = '{device}' but this machine has no CUDA device (use cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"config: train.device = '{device}': expected auto, cpu, cuda or cuda:N")
    return device


class Engine:
    """One process's view of the run: rank, world size, device, and accelerate's prepared objects."""

    def __init__(self, device: str = "auto", mixed_precision: str = "no"):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        if mixed_precision not in ("no", "bf16", "fp16"):
            raise UserError(f"config: train.mixed_precision must be no, bf16 or fp16, got '{mixed_precision}'")
        device = resolve_device(device)
        from accelerate.state import AcceleratorState, GradientState

        # `soarbench run` trains several runs in one process: each gets its own precision and accumulation
        # (the process group, in PartialState, stays)
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.acc = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)
        self.kind = self.acc.distributed_type
        self._types = DistributedType
        self.mixed_precision = mixed_precision
        self.model = None

    # ---- who am I ------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world_size(self) -> int:
        return self.acc.num_processes

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def name(self) -> str:
        kind = str(self.kind).split(".")[-1].lower()
        if self.kind == self._types.DEEPSPEED:
            stage = self.acc.state.deepspeed_plugin.zero_stage
            kind = f"deepspeed_zero{stage}"
        elif self.kind == self._types.FSDP:
            kind = "fsdp2" if getattr(self.acc, "is_fsdp2", False) else "fsdp"
        return kind

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 and FSDP keep a shard of each weight per process: whole weights exist only inside forward."""
        if self.kind == self._types.FSDP:
            return True
        return self.kind == self._types.DEEPSPEED and self.acc.state.deepspeed_plugin.zero_stage == 3

    # ---- collectives ---------------------------------------------------------------------------------------
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def all_gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_gather_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's equal-sized share, concatenated along dim 0 in rank order."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ---- training ------------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: int,
                micro_batch_size: int, grad_clip: float = 0.0):
        """Wrap the trained module and its optimizer; `micro_batches` backward passes make one optimizer step."""
        self.acc.gradient_accumulation_steps = int(micro_batches)
        if self.kind == self._types.DEEPSPEED:
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
            ds["gradient_accumulation_steps"] = int(micro_batches)
            ds["gradient_clipping"] = float(grad_clip)  # DeepSpeed clips inside its step
            ds.pop("train_batch_size", None)
        model, optimizer = self.acc.prepare(model, optimizer)
        self.model = model
        return model, optimizer

    def accumulate(self):
        return self.acc.accumulate(self.model) if self.model is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # accelerate divides by the accumulation count (DeepSpeed does so itself): undo it, the loop's scale is
        # already the pooled one
        self.acc.backward(loss * self.acc.gradient_accumulation_steps)

    def clip_grad_norm(self, params, max_norm: float) -> float | None:
        if not max_norm:
            return None
        norm = self.acc.clip_grad_norm_(params, float(max_norm))
        return None if norm is None else float(norm)

    def unwrap(self, model=None):
        return self.acc.unwrap_model(model if model is not None else self.model)

    def full_state_dict(self, model=None) -> dict:
        """The whole weights of a (possibly sharded) module, on the CPU of the main process."""
        return self.acc.get_state_dict(model if model is not None else self.model)

    def broadcast_parameters(self, params) -> None:
        """Rank 0's values everywhere (freshly initialised weights such as a value head, before prepare)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def check_replicas(self, params, step: int) -> None:
        """Debugging option (train.check_replicas): every rank must hold the same weights after an update.

        Meaningful for DDP, where each process keeps a full replica; sharded engines are skipped."""
        if not self.distributed or self.shards_parameters:
            return
        with torch.no_grad():
            checksum = float(sum(p.detach().double().sum().item() for p in params))
        sums = self.all_gather_objects(checksum)
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"step {step}: the ranks' weights diverged (parameter sums {sums})")

    def describe(self) -> dict:
        return {"engine": self.name, "processes": self.world_size, "mixed_precision": self.mixed_precision,
                "device": str(self.device), "launcher": "torchrun/accelerate" if "LOCAL_RANK" in os.environ
                else "single process"}
