"""`soarbench train`: one method, one budget, one run folder.

    soarbench train --config benchmarks/shapes/soar.toml --out runs/soar
    torchrun --nproc_per_node 8 -m soarbench train --config sd35m_soar.toml --out runs/soar   # 8 GPUs

RUN_DIR gets config.toml (resolved), run.json, train_log.jsonl (one line per optimizer step, with the budget
counters), checkpoints/step_N/ (resumable with --resume) and evals/step_N/<benchmark>/ at the configured budget
fractions.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soarbench import config as C
from soarbench.errors import UserError
from soarbench.harness.budget import Budget, Counters, StepCost
from soarbench.harness.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from soarbench.harness.data import PromptSampler, TrainData, ensure_generated, read_records
from soarbench.harness.distributed import World, init_world, rank_seed
from soarbench.io import append_jsonl, atomic_write_json, atomic_write_text
from soarbench.methods import build_method
from soarbench.methods.base import StepContext
from soarbench.models.sd3 import SD3Adapter, TRAINABLE_COMPONENTS

TRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 0, "batch_size": 8, "lr": 2e-5, "weight_decay": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8,
    "grad_clip": 1.0, "warmup_steps": 0, "mixed_precision": "no", "gradient_checkpointing": False,
    "allow_tf32": True, "components": ["transformer"], "device": "auto", "threads": 0, "checkpoint_every": 0,
}


class Schedule:
    """When to stop and when to evaluate, both read off the budget actually spent.

    A run continues while the next unit of work (a step, or an online method's epoch) still fits, using the
    config's per-unit cost (an upper bound where samples can be dropped, so Flow-GRPO spends what its dropped
    groups saved on further epochs). Evaluations fall where the spent budget first reaches 1/points .. 1 of the
    amount, so methods with different step costs are compared at the same budget fractions, and at the end.
    """

    def __init__(self, budget: Budget, cost: StepCost, points: int):
        self.budget, self.points = budget, max(int(points), 0)
        self.per_unit = cost.value(budget.unit, budget.no_grad_fraction)

    def more(self, counters: Counters) -> bool:
        spent = counters.value(self.budget.unit)
        if math.isnan(self.per_unit):
            return spent < self.budget.amount
        return spent + self.per_unit <= self.budget.amount * (1 + 1e-9)

    def thresholds_passed(self, spent: float) -> int:
        return sum(spent >= self.budget.amount * k / self.points * (1 - 1e-9) for k in range(1, self.points + 1))


def resolve_config(cfg: dict) -> dict:
    cfg = C.deep_merge({"train": TRAIN_DEFAULTS}, cfg)
    C.require(cfg, "model.path")
    C.require(cfg, "data.jsonl")
    C.require(cfg, "method.name")
    Budget.from_config(C.section(cfg, "budget"))
    bad = [c for c in cfg["train"]["components"] if c not in TRAINABLE_COMPONENTS]
    if bad:
        raise UserError(f"config: train.components has unknown '{bad[0]}' (valid: {', '.join(TRAINABLE_COMPONENTS)})")
    return cfg


def train(cfg: dict, out_dir: Path, resume: bool = False, log=print, progress=None) -> Path:
    cfg = resolve_config(cfg)
    out_dir = Path(out_dir)
    tcfg, mcfg, dcfg = cfg["train"], dict(cfg["method"]), cfg["data"]
    method_name = mcfg.pop("name")
    method = build_method(method_name, mcfg)
    budget = Budget.from_config(cfg["budget"])

    if tcfg["threads"]:
        torch.set_num_threads(int(tcfg["threads"]))
    world = init_world(tcfg["device"])
    if world.device.type == "cuda" and tcfg["allow_tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed = int(tcfg["seed"])
    torch.manual_seed(rank_seed(seed, world))
    random.seed(rank_seed(seed, world))
    np.random.seed(rank_seed(seed, world) % 2**32)

    ensure_generated(dcfg, world)
    records = read_records(dcfg["jsonl"], dcfg.get("image_dir"))  # bad data fails before anything is written
    online = getattr(method, "online", False)
    if online:
        cost = method.cost(world.world_size)
        prompts = PromptSampler(records, method.m, method.k, world, seed)
        per_rank = method.m * method.k // world.world_size
    else:
        cost = method.step_cost(int(tcfg["batch_size"]), world.world_size)
        per_rank = int(tcfg["batch_size"])
    # online methods buy whole epochs (each of `cost.optimizer_steps` optimizer steps)
    total_units = budget.steps_affordable(cost)  # refuses a budget below one unit of work
    total_steps = None if online or total_units is None else total_units * cost.optimizer_steps
    if world.is_main:
        log(budget.arithmetic(cost, world.world_size, per_rank))

    adapter = SD3Adapter.from_pretrained(cfg["model"]["path"], device=world.device, dtype=torch.float32,
                                         max_sequence_length=cfg["model"].get("max_sequence_length"))
    if tcfg["gradient_checkpointing"]:
        adapter.transformer.enable_gradient_checkpointing()
    if online:
        components = ["transformer"]
        params = method.setup(adapter, world.device)
        data = prompts
    else:
        components = list(tcfg["components"])
        params = []
        for name in components:
            module = getattr(adapter.pipe, name)
            module.requires_grad_(True).train()
            params += [p for p in module.parameters() if p.requires_grad]
        train_text = any(c.startswith("text_encoder") for c in components)
        data = TrainData(records, adapter, world, int(tcfg["batch_size"]), seed,
                         random_flip=bool(dcfg.get("random_flip", False)), train_text=train_text)
    world.broadcast_(params)  # identical replicas from the first step (e.g. LoRA's random init)
    optimizer = torch.optim.AdamW(params, lr=float(tcfg["lr"]), betas=tuple(tcfg["betas"]),
                                  weight_decay=float(tcfg["weight_decay"]), eps=float(tcfg["eps"]))
    warmup = int(tcfg["warmup_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    generator = torch.Generator(device=world.device).manual_seed(rank_seed(seed, world))
    counters = Counters(no_grad_fraction=budget.no_grad_fraction)
    ctx = StepContext(adapter=adapter, generator=generator, sigmas=_grid(adapter, world.device),
                      world_size=world.world_size, all_reduce_sum=world.all_reduce_sum)
    ecfg = cfg.get("eval", {})
    schedule = Schedule(budget, cost, int(ecfg.get("points", 4)) if ecfg.get("benchmark") else 0)
    base_model = Path(cfg["model"]["path"]).resolve()

    step = 0
    if not resume and out_dir.joinpath("train_log.jsonl").exists():
        raise UserError(f"{out_dir}: already holds a run (train_log.jsonl); pass --resume to continue it or "
                        f"choose another --out")
    if resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        step = _restore(ckpt, adapter, components, optimizer, scheduler, counters, data, generator, world,
                        method if online else None)
        log(f"resumed from {ckpt} at step {step}")
    if resume and world.is_main:
        _truncate_log(out_dir / "train_log.jsonl", step)  # steps past the checkpoint are about to be redone
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.toml", C.dumps_toml(cfg))
        atomic_write_json(out_dir / "run.json", run_record(cfg, method_name, budget, cost, total_steps, world))
        if step == 0 and ecfg.get("include_base", False):
            _evaluate(cfg, adapter, out_dir, 0, counters, method_name, log)
        if step and _eval_done(cfg, out_dir, step) is False:
            _evaluate(cfg, adapter, out_dir, step, counters, method_name, log)  # interrupted during its eval

    autocast = _autocast(tcfg["mixed_precision"], world.device)
    wall_start = time.perf_counter() - counters.wall_s
    every = int(tcfg["checkpoint_every"])

    def optimizer_step() -> float | None:
        world.average_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, float(tcfg["grad_clip"])) if tcfg["grad_clip"] else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else None

    def count(fwd_bwd: int = 0, no_grad_fwd: int = 0, images: int = 0, reward_calls: int = 0) -> None:
        packed = world.all_reduce_sum(torch.tensor([fwd_bwd, no_grad_fwd, images, reward_calls], device=world.device))
        counters.fwd_bwd += int(packed[0])
        counters.no_grad_fwd += int(packed[1])
        counters.images += int(packed[2])
        counters.reward_calls += int(packed[3])

    def end_of_step(logs: dict, loss: torch.Tensor, grad_norm: float | None, boundary: bool = True) -> None:
        nonlocal wall_start
        counters.optimizer_steps += 1
        counters.wall_s = time.perf_counter() - wall_start
        # loss is this rank's share of the pooled objective times world size (see methods/base.py)
        loss_value = world.all_reduce_sum(loss.detach().float()).item() / world.world_size
        if world.is_main:
            append_jsonl(out_dir / "train_log.jsonl", {
                "step": step, "loss": loss_value, **{k: float(v) for k, v in logs.items()},
                "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "budget": counters.as_dict()})
        if progress is not None:
            progress(step, total_steps)
        nonlocal evals_passed
        last = not schedule.more(counters)
        passed = schedule.thresholds_passed(counters.value(budget.unit))
        due = boundary and (passed > evals_passed or last)
        if due:
            evals_passed = passed
        if boundary and (due or (every and step % every == 0)):
            t_pause = time.perf_counter()
            _check_replicas(world, params, step)
            state = _trainer_state(step, optimizer, scheduler, counters, data, generator, world,
                                   method if online else None)
            if world.is_main:
                modules = {"transformer": method.export_transformer()} if online else None
                save_checkpoint(out_dir, step, adapter, components, base_model, state,
                                {"step": step, "method": method_name, "run_name": cfg.get("run", {}).get("name")},
                                modules)
                if ecfg.get("benchmark") and due:
                    with (method.eval_weights() if online else contextlib.nullcontext()):
                        _evaluate(cfg, adapter, out_dir, step, counters, method_name, log)
            world.barrier()
            wall_start += time.perf_counter() - t_pause  # checkpoints and evaluation are not training time

    evals_passed = schedule.thresholds_passed(counters.value(budget.unit))
    while schedule.more(counters):
        if online:
            group_ids, texts, metadata = data.next()
            counters.add_prompts(sorted({t for chunk in world.all_gather_objects(texts) for t in chunk}))
            with autocast:  # the rollout's log-probs must be computed in the precision training recomputes them
                epoch = method.collect(ctx, group_ids, texts, metadata, world.all_gather_objects)
            count(no_grad_fwd=epoch.no_grad_fwd, images=epoch.images, reward_calls=epoch.reward_calls)
            kept = torch.nonzero(epoch.keep).flatten()
            parts = torch.tensor_split(kept, cost.optimizer_steps) if len(kept) else [kept] * cost.optimizer_steps
            for part in parts:
                step += 1
                total = torch.zeros((), device=world.device)
                logs: dict = dict(epoch.logs)
                micro = method.micro or max(len(part), 1)
                chunks = [part[i:i + micro] for i in range(0, len(part), micro)]
                n_terms = max(len(chunks) * epoch.steps.shape[1], 1)
                for chunk in chunks:
                    for column in range(epoch.steps.shape[1]):
                        with autocast:
                            out = method.loss(ctx, epoch, chunk, column)
                        (out.loss / n_terms).backward()
                        total += out.loss.detach() / n_terms
                        count(fwd_bwd=out.fwd_bwd, no_grad_fwd=out.no_grad_fwd)
                        for k_, v_ in out.logs.items():
                            logs[k_] = logs.get(k_, 0.0) + v_ / n_terms
                # every rank steps, or none: a rank whose groups all tied contributes zero gradients
                anyone = world.all_reduce_sum(torch.tensor(len(part), device=world.device)).item() > 0
                grad_norm = optimizer_step() if anyone else None
                if not anyone:
                    optimizer.zero_grad(set_to_none=True)  # every group tied everywhere: nothing to learn
                if method.ema is not None:
                    method.ema.step(counters.optimizer_steps)
                end_of_step(logs, total, grad_norm, boundary=(part is parts[-1]))
            continue
        step += 1
        batch = data.next_batch()
        with autocast:
            out = method.loss(ctx, batch)
        out.loss.backward()
        grad_norm = optimizer_step()
        count(fwd_bwd=out.fwd_bwd, no_grad_fwd=out.no_grad_fwd)
        counters.add_prompts(data.last_global_captions)
        end_of_step(out.logs, out.loss, grad_norm)
    if world.is_main:
        atomic_write_json(out_dir / "done.json", {"step": step, "budget_spent": counters.as_dict()})
    return out_dir


def _grid(adapter: SD3Adapter, device) -> torch.Tensor:
    from soarbench.flow import training_sigmas

    sc = adapter.scheduler_config
    return training_sigmas(float(sc.get("shift", 3.0)), int(sc.get("num_train_timesteps", 1000))).to(device)


def _autocast(mode: str, device: torch.device):
    if mode in ("no", "fp32", None):
        return contextlib.nullcontext()
    if mode not in ("bf16", "fp16"):
        raise UserError(f"config: train.mixed_precision must be no, bf16 or fp16, got '{mode}'")
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def run_record(cfg: dict, method: str, budget: Budget, cost: StepCost, steps: int | None, world: World) -> dict:
    run = cfg.get("run", {})
    return {"run_name": run.get("name", method), "group": run.get("group", method), "method": method,
            "seed": int(cfg["train"]["seed"]), "base_model": str(cfg["model"]["path"]),
            "budget": {"unit": budget.unit, "amount": budget.amount, "no_grad_fraction": budget.no_grad_fraction,
                       "steps": steps, "per_step": cost.__dict__},
            "world_size": world.world_size}


def model_info(cfg: dict, method: str, step: int, counters: Counters, path: Path) -> dict:
    run = cfg.get("run", {})
    name, group = run.get("name", method), run.get("group", method)
    return {"path": str(path), "run_name": name, "group": group, "method": method,
            "seed": int(cfg["train"]["seed"]), "step": step, "budget_spent": counters.as_dict(),
            "label": "base" if method == "base" else f"{group}@{step}"}


def _evaluate(cfg: dict, adapter: SD3Adapter, out_dir: Path, step: int, counters: Counters, method: str, log) -> None:
    from soarbench.benchmarks import build_benchmark
    from soarbench.evaluate import evaluate

    ecfg = cfg["eval"]
    bench = build_benchmark(ecfg["benchmark"], **ecfg.get("benchmark_options", {}))
    folder = out_dir / "evals" / f"step_{step:06d}" / bench.name
    info = model_info(cfg, method if step else "base", step, counters, out_dir / "checkpoints" / f"step_{step:06d}")
    summary = evaluate(adapter, bench, folder, seed=int(ecfg.get("seed", 0)), batch_size=int(ecfg.get("batch_size", 64)),
                       model_info=info, config=cfg, num_steps=ecfg.get("num_steps"), guidance=ecfg.get("guidance"))
    main = next(iter(summary["scores"].items()))
    log(f"eval step {step}: {main[0]} = {main[1]:.4f}")


def _eval_done(cfg: dict, out_dir: Path, step: int) -> bool | None:
    """None: no eval was started at this step; False: one was started and not finished; True: finished."""
    ecfg = cfg.get("eval", {})
    if not ecfg.get("benchmark"):
        return None
    folder = out_dir / "evals" / f"step_{step:06d}"
    if not folder.is_dir():
        return None
    return any(folder.glob("*/summary.json"))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from: those steps are about to be redone."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> int | None:
    import json

    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _check_replicas(world: World, params, step: int) -> None:
    """Every rank must hold the same weights after averaged updates; a divergence is a harness bug, caught at
    each checkpoint rather than discovered in the results."""
    if not world.distributed:
        return
    with torch.no_grad():
        checksum = float(sum(p.detach().double().sum().item() for p in params))
    sums = world.all_gather_objects(checksum)
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"step {step}: the ranks' weights diverged (parameter sums {sums})")


def _trainer_state(step, optimizer, scheduler, counters, data, generator, world, method=None) -> dict:
    rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if isinstance(data, TrainData):
        rng.update(pixel_rng=data.pixel_rng.getstate(), latent_gen=data.latent_gen.get_state())
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "counters": counters.state_dict(), "rank_rng": world.all_gather_objects(rng),
             "world_size": world.world_size}
    if isinstance(data, TrainData):
        state["sampler"] = data.sampler.state_dict()
    else:
        state["prompt_epoch"] = data.epoch
    if method is not None:
        state["method"] = method.state_dict()
    return state


def _restore(ckpt: Path, adapter, components, optimizer, scheduler, counters, data, generator, world,
             method=None) -> int:
    state = load_trainer_state(ckpt)
    if state["world_size"] != world.world_size:
        raise UserError(f"{ckpt}: saved with {state['world_size']} ranks, resumed with {world.world_size}")
    if method is not None:
        method.load_state_dict(state["method"])  # the checkpoint's transformer is the merged EMA export
    else:
        for name in components:
            module = getattr(adapter.pipe, name)
            loaded = type(module).from_pretrained(ckpt / name, dtype=torch.float32, local_files_only=True)
            module.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restored = Counters.from_state(state["counters"])
    counters.__dict__.update(restored.__dict__)
    mine = state["rank_rng"][world.rank]
    generator.set_state(mine["generator"])
    torch.set_rng_state(mine["torch"])
    if isinstance(data, TrainData):
        data.sampler.load_state_dict(state["sampler"])
        data.pixel_rng.setstate(_tupleize(mine["pixel_rng"]))
        data.latent_gen.set_state(mine["latent_gen"])
    else:
        data.epoch = int(state["prompt_epoch"])
    return int(state["step"])


def _tupleize(x):
    return tuple(_tupleize(v) for v in x) if isinstance(x, (list, tuple)) else x
