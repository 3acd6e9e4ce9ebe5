"""The method contract: all that the training loop (soarbench/harness/train.py) knows about a method.

    class MyMethod(MethodBase):
        name = "my_method"; source = "images"            # or "prompts"
        def plan(self, shape) -> UnitCost                # the cost of one unit of work, declared once
        def unit_plan(self, shape, unit) -> UnitCost     # optional: unit u's cost where a first phase differs
        def setup(self, ctx) -> list[ParamGroup]         # LoRA / full / extra modules, each group its own lr
        def collect(self, ctx, data) -> buffer           # a data batch, or rollouts + rewards + advantages
        def unit_logs(self, buffer) -> {name: float}     # optional: the unit's scalars (reward mean, kept share)
        def updates(self, ctx, buffer) -> Iterator[list[Micro]]   # the micro-batches of each optimizer step
        def loss(self, ctx, micro) -> LossOutput         # a SUM over the micro-batch's terms
        def after_update(self, ctx, step, end_of_unit)   # EMA, old-policy soft update, target networks
        def state_dict / load_state_dict                 # what resume needs beyond the optimizer
        def export(self, ctx) -> {component: module}     # what a checkpoint saves and evaluation loads
        def eval_weights(self, ctx) -> context manager   # the weights evaluation samples with

    METHODS.add("my_method", "my_package.my_module:MyMethod")    # registered from anywhere

The loop draws nothing and counts nothing for a method: random draws come from `ctx.generators` keyed by
(seed, unit, purpose, global sample index), and passes are counted by the meter inside the model adapter and
the reward functions. Each micro-batch declares its `weight` (how many loss terms it sums) before its loss is
computed; the loop divides every micro-batch's sum by the global total of one optimizer step, so the objective
is a pooled mean over the whole global batch however it is split over processes and accumulation slots.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch

from soarbench.cost import UnitCost
from soarbench.rng import keyed_generator, keyed_randn
from soarbench.models.sd3 import SD3Adapter, TextEmbeddings


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """The module in eval mode inside the block (rollouts sample without dropout), its own mode restored after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


@dataclass
class Batch:
    z0: torch.Tensor  # clean model latents (B, C, H, W)
    text: TextEmbeddings
    prompts: list[str]
    ids: list[int] = field(default_factory=list)  # global sample indices within the unit (keys of the draws)


@dataclass
class RunShape:
    """How the global batch of one optimizer step is laid out: processes x accumulation slots x micro-batch."""

    world_size: int = 1
    accumulation: int = 1
    batch_size: int = 1  # per micro-batch per process

    @property
    def slots(self) -> int:
        return self.world_size * self.accumulation

    @property
    def global_batch(self) -> int:
        return self.slots * self.batch_size


@dataclass
class Micro:
    data: Any
    weight: float  # the number of loss terms this micro-batch sums (its share of the pooled mean)


@dataclass
class LossOutput:
    loss: torch.Tensor  # the SUM of this micro-batch's loss terms (differentiable)
    # name -> (sum, count), summed over micro-batches and processes and logged as sum / count (a count of 0 logs
    # the global sum itself, e.g. how many auxiliary points a step had)
    logs: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class ParamGroup:
    params: list[torch.nn.Parameter]
    lr: float | None = None  # None: train.lr
    name: str = "policy"


@dataclass
class Ctx:
    """What a method may use while it runs."""

    adapter: SD3Adapter
    roles: Any  # soarbench.models.roles.Roles
    engine: Any  # soarbench.harness.engine.Engine (rank, world_size, all_reduce_sum, all_gather_objects)
    meter: Any  # soarbench.meter.Meter
    sigmas: torch.Tensor  # the 1000-entry shifted training grid, on the device
    seed: int = 0
    unit: int = 0  # the unit of work being done (a step, or an epoch), 0-based: part of every draw's key
    step: int = 0  # optimizer steps done so far
    shape: RunShape = field(default_factory=RunShape)
    components: tuple[str, ...] = ("transformer",)

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def world_size(self) -> int:
        return self.engine.world_size if self.engine is not None else 1

    @property
    def rank(self) -> int:
        return self.engine.rank if self.engine is not None else 0

    def velocity(self, z, sigma, text, role: str = "policy", guidance: float = 1.0, detach_uncond: bool = False):
        return self.roles.velocity(z, sigma, text, role=role, guidance=guidance, detach_uncond=detach_uncond)

    def velocity_of(self, role: str = "policy") -> Callable[[torch.Tensor, torch.Tensor, TextEmbeddings], torch.Tensor]:
        """`role`'s velocity v(z, sigma, text) as the samplers take it (soarbench.sampling.ode.Velocity): the one
        door to the network, so no sampler or rollout is handed a module."""
        def velocity(z, sigma, text):
            return self.roles.velocity(z, sigma, text, role=role)
        return velocity

    def generators(self, ids, purpose: str) -> list[torch.Generator]:
        """One CPU generator per sample, keyed by (seed, unit, purpose, global sample index)."""
        return [keyed_generator(self.seed, self.unit, purpose, int(i)) for i in ids]

    def randn(self, shape, ids, purpose: str) -> torch.Tensor:
        return keyed_randn(shape, [(self.seed, self.unit, purpose, int(i)) for i in ids], device=self.device)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine.all_reduce_sum(x) if self.engine is not None else x

    def all_gather_objects(self, obj) -> list:
        return self.engine.all_gather_objects(obj) if self.engine is not None else [obj]

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's equal-sized share of a tensor, concatenated along dim 0 in rank order."""
        return self.engine.all_gather_tensor(x) if self.engine is not None else x


class MethodBase:
    """Defaults for the contract: full fine-tuning of train.components, one micro-batch per slot, no state."""

    name: ClassVar[str] = "method"
    version: ClassVar[str] = "1"  # recorded with every run; "reconstructed" methods say so here
    source: ClassVar[str] = "images"
    # False: every prompt the method encodes is a training caption (or the empty one), read from the data's text
    # cache once it is built, so the frozen text encoders may leave the GPU (harness/train.py text_encoder_release)
    needs_text_encoders_after_cache: ClassVar[bool] = True
    # images per prompt of a "prompts" method's unit: the prompt source draws plan().images / group_size prompts
    group_size: int = 1

    def plan(self, shape: RunShape) -> UnitCost:
        raise NotImplementedError

    def unit_plan(self, shape: RunShape, unit: int) -> UnitCost:
        """The cost of unit `unit` (0-based). The same every unit unless a method has a budgeted phase of its own
        (the actor-critic's value pre-training); the loop asks it before each unit, and the meter must match it."""
        return self.plan(shape)

    def setup(self, ctx: Ctx) -> list[ParamGroup]:
        return [ParamGroup(ctx.roles.full(ctx.components))]

    def collect(self, ctx: Ctx, data) -> Any:
        return data.next(ctx)

    def unit_logs(self, buffer) -> dict[str, float]:
        """Scalars of the unit `collect` returned (logged on each of its optimizer steps' rows)."""
        return {}

    def updates(self, ctx: Ctx, buffer) -> Iterator[list[Micro]]:
        yield [Micro(b, float(len(b.prompts))) for b in buffer]

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        raise NotImplementedError

    def after_update(self, ctx: Ctx, step: int, end_of_unit: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def export(self, ctx: Ctx) -> dict[str, torch.nn.Module]:
        """component name -> module to save (diffusers layout); the default saves the trained components."""
        out = {}
        for name in ctx.components:
            out[name] = ctx.roles.export_transformer() if name == "transformer" else getattr(ctx.adapter.pipe, name)
        return out

    def eval_weights(self, ctx: Ctx):
        return ctx.roles.ema_weights() if ctx.roles is not None else contextlib.nullcontext()

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version}


def samples_per_step(n: int, optimizer_steps: int, shape: RunShape) -> int:
    """The samples of one optimizer step of an online method's epoch; they are dealt evenly over the slots."""
    from soarbench.errors import UserError

    per_step = n // optimizer_steps
    if per_step % shape.slots:
        raise UserError(f"[method] each optimizer step trains {per_step} images, which do not deal evenly over "
                        f"{shape.slots} slots ({shape.world_size} processes x {shape.accumulation} "
                        f"accumulation): choose batch_size / optimizer_steps_per_epoch divisible by it")
    return per_step


def deal_steps(ctx: Ctx, parts: list[torch.Tensor], columns: int,
               head: "Callable[[torch.Tensor, torch.Tensor], tuple]") -> Iterator[list[Micro]]:
    """The optimizer steps of an online method's epoch: `parts[p]` holds step p's samples (global indices); slot a
    of process r takes part[a W + r :: S] (S = processes x accumulation), so a step's samples do not depend on the
    layout; each sample's `columns` trained timesteps are micro-batches of their own, weighted by their samples.
    `head(idx, row)` gives the micro's data before the column: idx = this process's samples of the slot, row =
    every process's samples of the same slot (for modules the engine does not wrap)."""
    S, W, r = ctx.shape.slots, ctx.world_size, ctx.rank
    for part in parts:
        micros = []
        for a in range(ctx.shape.accumulation):
            idx = part[a * W + r::S].to(ctx.device)
            row = torch.cat([part[a * W + q::S] for q in range(W)]).to(ctx.device)
            data = head(idx, row)
            micros += [Micro((*data, column), float(len(idx))) for column in range(columns)]
        yield micros


def require_geneval_rows(metadata, reward_names) -> None:
    """The GenEval reward scores against each prompt's GenEval row (tag, include)."""
    from soarbench.errors import UserError

    if "geneval" in reward_names and any(m is None for m in metadata):
        raise UserError("data: the GenEval reward needs GenEval rows (tag, include) on every training line")


def require_frozen_copies(ctx: Ctx, method: str, copies: str) -> None:
    """Full fine-tuning that keeps whole frozen copies of the transformer (`copies`, e.g. "the old policy and the
    reference"): refuse, in one line each, an engine that shards parameters (ZeRO-3 / FSDP would defeat it) and
    trained components other than the transformer (the copies hold the transformer only)."""
    from soarbench.errors import UserError

    engine = ctx.engine
    if engine is not None and getattr(engine, "shards_parameters", False):
        raise UserError(f"[method] {method} with lora = false needs frozen copies of the whole transformer ({copies}), "
                        f"which cannot be sharded under the {engine.name} engine: use lora = true, or a DDP / "
                        f"ZeRO-2 accelerate config")
    extra = [c for c in ctx.components if c != "transformer"]
    if extra:
        raise UserError(f"[method] {method} with lora = false trains the transformer only: {copies} are copies of "
                        f"the transformer, so train.components = {list(ctx.components)} cannot be used (set "
                        f"train.components = [\"transformer\"])")


def trained_weights(ctx: Ctx, method: str, lora: bool, r: int, alpha: float,
                    copies: str | None = None) -> list[torch.nn.Parameter]:
    """The policy's trained parameters: a LoRA of rank r (made before any second adapter, so it holds the trained
    adapter only) or the whole transformer; under full fine-tuning a method that keeps frozen `copies` of the
    transformer is refused in one line where they cannot exist (`require_frozen_copies`)."""
    if lora:
        return ctx.roles.lora(r, alpha)
    if copies:
        require_frozen_copies(ctx, method, copies)
    return ctx.roles.full(("transformer",))


def log_pair(total: torch.Tensor, count: float) -> tuple[float, float]:
    """A (sum, count) log entry; the loop sums both over micro-batches and ranks."""
    return float(total.detach().float()), float(count)
