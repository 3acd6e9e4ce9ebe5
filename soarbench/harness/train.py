"""`soarbench train`: one method, one budget, one run folder; the one loop every method runs under.

    soarbench train --config benchmarks/shapes/soar.toml --out runs/soar
    accelerate launch --config_file configs/accelerate/zero2.yaml -m soarbench train --config cfg.toml --out runs/x
    torchrun --nproc_per_node 8 -m soarbench train --config sd35m_soar.toml --out runs/soar

RUN_DIR gets config.toml (resolved), run.json (method, version, engine, global batch), train_log.jsonl (one line
per optimizer step with the budget counters), tb/ (TensorBoard events), checkpoints/step_N/ (diffusers layout,
resumable with --resume) and evals/step_N/<benchmark>/ at the configured budget fractions.

The loop knows methods only through their contract (soarbench/methods/base.py): per unit of work it calls
collect, then for each optimizer step of `updates` it backpropagates every micro-batch's loss sum scaled by
processes x accumulation / (the step's global weight), so the engine's averaging yields the pooled mean over the
global batch. It counts nothing itself: the meter inside the model adapter and the reward functions does.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path

import torch

from soarbench import config as C
from soarbench.errors import UserError
from soarbench.harness.budget import Budget, Counters, Schedule, UnitCost
from soarbench.harness.checkpoint import (STATE_FILE, checkpoint_dir, latest_checkpoint, load_trainer_state,
                                          write_checkpoint)
from soarbench.harness.data import ImageData, PromptData, ensure_generated, read_records
from soarbench.harness.engine import Engine
from soarbench.faults import fault
from soarbench.meter import Meter
from soarbench.io import append_jsonl, atomic_write_json, atomic_write_text
from soarbench.methods import build_method
from soarbench.methods.base import Ctx, RunShape
from soarbench.models.roles import Roles
from soarbench.models.sd3 import SD3Adapter



def resolve_config(cfg: dict) -> dict:
    """The config read once, typed, with every default filled in (soarbench.config.validate_train_config):
    unknown keys, wrong types and unknown names are one-line errors before any work."""
    return C.validate_train_config(cfg)


def lr_multiplier(done: int, warmup: int, decay: int, total: int | None) -> float:
    """The learning rate's factor for the optimizer step after `done` steps: a linear warmup over the first
    `warmup` steps, then constant, then (warmup-stable-decay) a linear decay over the last `decay` of `total`
    steps that reaches 1/decay on the last step (a step at rate 0 would be wasted)."""
    factor = min(1.0, (done + 1) / warmup) if warmup else 1.0
    if decay and total is not None:
        factor = min(factor, max(total - done, 0) / decay)
    return factor


def decay_steps(tcfg: dict, total_steps: int | None, unit: str) -> int:
    """The number of final steps whose learning rate decays: train.decay_steps, or train.decay_fraction of the
    run's steps (a fraction decays runs of different methods, whose steps cost differently, alike)."""
    steps, fraction = int(tcfg["decay_steps"]), float(tcfg["decay_fraction"])
    if steps and fraction:
        raise UserError("config: set train.decay_steps or train.decay_fraction, not both")
    if not (steps or fraction):
        return 0
    if total_steps is None:
        raise UserError("config: train.decay_steps and train.decay_fraction need a budget whose number of "
                        f"optimizer steps is known in advance, not {unit}")
    if fraction:
        return max(1, round(fraction * total_steps))
    if steps > total_steps:
        raise UserError(f"config: train.decay_steps ({steps}) is more than the budget's {total_steps} optimizer steps")
    return steps


def accumulation_steps(tcfg: dict, world_size: int) -> int:
    """train.gradient_accumulation_steps, or derived from train.global_batch_size (the same config then runs on any
    number of processes and follows the same trajectory)."""
    b, acc, glob = int(tcfg["batch_size"]), int(tcfg["gradient_accumulation_steps"]), int(tcfg["global_batch_size"])
    if b < 1 or acc < 1:
        raise UserError("config: train.batch_size and train.gradient_accumulation_steps must be >= 1")
    if glob:
        if glob % (b * world_size):
            raise UserError(f"config: train.global_batch_size = {glob} is not a multiple of batch_size {b} x "
                            f"{world_size} process(es)")
        return glob // (b * world_size)
    return acc


class Run:
    """Everything one training run holds; `train()` builds it and drives the loop."""

    def __init__(self, cfg: dict, out_dir: Path, resume: bool, log, progress):
        self.cfg, self.out_dir, self.log, self.progress = cfg, Path(out_dir), log, progress
        tcfg, mcfg, dcfg = cfg["train"], dict(cfg["method"]), cfg["data"]
        self.method_name = mcfg.pop("name")
        self.method = build_method(self.method_name, mcfg)
        self.budget = Budget.from_config(cfg["budget"])
        if tcfg["threads"]:
            torch.set_num_threads(int(tcfg["threads"]))
        self.engine = Engine(tcfg["device"], tcfg["mixed_precision"])
        engine = self.engine
        self.frozen_dtype = frozen_dtype(tcfg)
        if engine.device.type == "cuda" and tcfg["allow_tf32"]:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.shape = RunShape(engine.world_size, accumulation_steps(tcfg, engine.world_size), int(tcfg["batch_size"]))
        self.cost: UnitCost = self.method.plan(self.shape)
        self.cost_of = lambda unit: self.method.unit_plan(self.shape, unit)
        planned = self.budget.plan_units(self.cost_of)  # refuses a budget below one unit of work
        self.total_steps = None if planned is None else planned[1]
        self.decay_steps = decay_steps(tcfg, self.total_steps, self.budget.unit)
        if not resume and (self.out_dir / "train_log.jsonl").exists():
            raise UserError(f"{self.out_dir}: already holds a run (train_log.jsonl); pass --resume to continue it "
                            f"or choose another --out")
        if resume:
            _refuse_changed_config(self.out_dir, cfg)
        ensure_generated(dcfg, engine)
        records = read_records(dcfg["jsonl"], dcfg.get("image_dir"))  # bad data fails before anything is written
        _check_inputs(self.method.source, records, cfg)  # before any model loads
        if engine.is_main:
            log(self.budget.arithmetic(self.cost, engine.world_size, self.shape.accumulation, self.cost_of))

        components = tuple(tcfg["components"])
        if engine.distributed and any(c != "transformer" for c in components):
            raise UserError("config: training text encoders (train.components) is supported in single-process runs "
                            "only (the shapes base recipe); multi-process runs train the transformer")
        self.adapter = SD3Adapter.from_pretrained(cfg["model"]["path"], device=engine.device, dtype=torch.float32,
                                                  max_sequence_length=cfg["model"].get("max_sequence_length"),
                                                  load_t5=bool(cfg["model"].get("load_t5", True)))
        _cast_frozen(self.adapter, cfg["model"].get("text_encoder_precision", "auto"), self.frozen_dtype, components)
        if tcfg["gradient_checkpointing"]:
            self.adapter.transformer.enable_gradient_checkpointing()
        self.meter = Meter()
        self.adapter.meter = self.meter
        self.roles = Roles(self.adapter, None if self.frozen_dtype == torch.float32 else self.frozen_dtype)
        self.ctx = Ctx(adapter=self.adapter, roles=self.roles, engine=engine, meter=self.meter,
                       sigmas=_grid(self.adapter, engine.device), seed=int(tcfg["seed"]), shape=self.shape,
                       components=components)
        _seed_global_rngs(int(tcfg["seed"]))  # fresh weights (LoRA's init) depend on the seed alone
        groups = self.method.setup(self.ctx)
        self.params = [p for g in groups for p in g.params]
        if engine.shards_parameters and (self.roles.use_lora or self.roles.ema is not None or self.roles.copies):
            raise UserError(f"config: {self.method_name} with LoRA, an EMA or frozen reference copies needs DDP or "
                            f"ZeRO-2 ({engine.name} shards the weights; it supports full fine-tuning without them)")
        engine.broadcast_parameters(self.params)  # fresh weights (LoRA, heads) start equal on every process
        lr = float(tcfg["lr"])
        self.optimizer = torch.optim.AdamW(
            [{"params": g.params, "lr": lr if g.lr is None else float(g.lr)} for g in groups],
            lr=lr, betas=tuple(tcfg["betas"]), weight_decay=float(tcfg["weight_decay"]), eps=float(tcfg["eps"]),
            fused=True if engine.device.type == "cuda" else None)  # one kernel for all tensors on CUDA; CPU as before
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_multiplier, warmup=int(tcfg["warmup_steps"]), decay=self.decay_steps, total=self.total_steps))
        net, self.optimizer = engine.prepare(self.roles.base, self.optimizer, self.cost.micro_batches,
                                             self.shape.batch_size, float(tcfg["grad_clip"]))
        if tcfg.get("compile"):
            net = torch.compile(net)  # the velocity calls go through the compiled module
        self.roles.net = net
        self.adapter.net = net
        train_text = any(c.startswith("text_encoder") for c in components)
        if self.method.source == "images":
            self.data = ImageData(records, self.adapter, engine, self.shape, int(tcfg["seed"]),
                                  random_flip=bool(dcfg.get("random_flip", False)), train_text=train_text,
                                  caption_dropout=float(dcfg.get("caption_dropout", 0.0)),
                                  text_cache=str(dcfg.get("text_cache", "auto")))
        else:
            k = int(self.method.group_size)
            self.data = PromptData(records, self.cost.images // k, k, engine, int(tcfg["seed"]),
                                   sampling=dcfg.get("prompt_sampling", "unique"))
        self.text_encoders = _offload_text_encoders(self, components)
        self.counters = Counters(no_grad_fraction=self.budget.no_grad_fraction, devices=engine.world_size)
        ecfg = cfg.get("eval", {})
        self.ecfg = ecfg
        self.schedule = Schedule(self.budget, self.cost_of, int(ecfg.get("points", 4)) if ecfg.get("benchmark") else 0)
        self.step, self.unit, self.evals_passed, self.pending_eval = 0, 0, 0, None
        self.base_model = self.adapter.source  # the local folder (a Hub id's cached snapshot), as checkpoints name it
        if resume and (ckpt := latest_checkpoint(self.out_dir, warn=log)) is not None:
            self.restore(ckpt)
            log(f"resumed from {ckpt} at step {self.step}")
        if resume and engine.is_main:
            _truncate_log(self.out_dir / "train_log.jsonl", self.step)  # steps past the checkpoint are redone
        self.writer = None
        if engine.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.toml", C.dumps_toml(cfg))
            atomic_write_json(self.out_dir / "run.json", self.run_record())
            self.writer = _Writers(self.out_dir, cfg)

    # ---- records ---------------------------------------------------------------------------------------------
    def run_record(self) -> dict:
        run = self.cfg.get("run", {})
        return {"run_name": run.get("name", self.method_name), "group": run.get("group", self.method_name),
                "method": self.method_name, "method_version": self.method.version,
                "seed": int(self.cfg["train"]["seed"]), "base_model": str(self.cfg["model"]["path"]),
                "budget": {"unit": self.budget.unit, "amount": self.budget.amount,
                           "no_grad_fraction": self.budget.no_grad_fraction, "steps": self.total_steps,
                           "per_step": self.cost.__dict__, "per_unit": self.cost.__dict__},
                "global_batch": self.cost.samples_per_step, "accumulation": self.shape.accumulation,
                "world_size": self.engine.world_size, **self.engine.describe(),
                "frozen_dtype": _DTYPE_NAMES[self.frozen_dtype], **frozen_record(self.adapter, self.roles, self.ctx.components),
                "text_encoders": self.text_encoders}

    # ---- the loop --------------------------------------------------------------------------------------------
    def run(self) -> None:
        engine, method, ctx = self.engine, self.method, self.ctx
        if self.step == 0 and self.ecfg.get("include_base", False):
            self.evaluate(0)
        if self.pending_eval is not None:
            self.evaluate(self.pending_eval)  # the process died between this checkpoint and its evaluation
        every = int(self.cfg["train"]["checkpoint_every"])
        wall_start = time.perf_counter() - self.counters.wall_s
        while self.schedule.more(self.counters, self.unit):
            ctx.unit = self.unit
            with engine.acc.autocast():  # rollouts sample in the precision training recomputes them
                buffer = method.collect(ctx, self.data)
            unit_logs = {**self.data.unit_logs(self.unit), **method.unit_logs(buffer)}
            steps = list(method.updates(ctx, buffer))
            for j, micros in enumerate(steps):
                self.optimizer_step(micros, unit_logs, end_of_unit=j == len(steps) - 1)
                fault("step")
                self.counters.wall_s = time.perf_counter() - wall_start
                self.log_step()
            self.unit += 1
            last = not self.schedule.more(self.counters, self.unit)
            passed = self.schedule.thresholds_passed(self.counters.value(self.budget.unit))
            due = passed > self.evals_passed or last
            if due or (every and self.step % every == 0):
                t_pause = time.perf_counter()
                if due:
                    self.evals_passed = passed
                    self.pending_eval = self.step if self.ecfg.get("benchmark") else None
                self.save()
                if self.pending_eval is not None:
                    self.evaluate(self.pending_eval)
                wall_start += time.perf_counter() - t_pause  # checkpoints and evaluation are not training time
        if engine.is_main:
            atomic_write_json(self.out_dir / "done.json", {"step": self.step, "budget_spent": self.counters.as_dict()})
            if self.writer is not None:
                self.writer.close()

    def optimizer_step(self, micros, unit_logs: dict, end_of_unit: bool) -> None:
        engine, ctx = self.engine, self.ctx
        if len(micros) != self.cost.micro_batches:
            raise RuntimeError(f"{self.method_name}: {len(micros)} micro-batches in an optimizer step, planned "
                               f"{self.cost.micro_batches} (the engine's accumulation count)")
        weight = engine.all_reduce_sum(torch.tensor(sum(m.weight for m in micros), dtype=torch.float64,
                                                    device=engine.device)).item()
        scale = engine.world_size / max(weight, 1e-12)
        total = torch.zeros((), dtype=torch.float64, device=engine.device)
        sums: dict[str, list[float]] = {}
        for micro in micros:
            with engine.accumulate():
                with engine.acc.autocast():
                    out = self.method.loss(ctx, micro)
                engine.backward(out.loss * scale)
            total += out.loss.detach().double()
            for name, (value, count) in out.logs.items():
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += value
                acc[1] += count
        names = sorted(sums)
        packed = engine.all_reduce_sum(torch.tensor([total.item()] + [v for n in names for v in sums[n]],
                                                    dtype=torch.float64, device=engine.device)).tolist()
        loss = packed[0] / max(weight, 1e-12)
        logs = {n: packed[1 + 2 * i] / packed[2 + 2 * i] if packed[2 + 2 * i] else packed[1 + 2 * i]
                for i, n in enumerate(names)}
        clip = float(self.cfg["train"]["grad_clip"]) or math.inf
        grad_norm = engine.clip_grad_norm(self.params, clip)
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        self.step += 1
        ctx.step = self.step
        lr_used = self.scheduler.get_last_lr()[0]  # the rate of this step (stepping the scheduler sets the next)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        elif self.cfg["train"]["nonfinite"] == "stop":
            raise UserError(f"step {self.step}: the loss or gradient norm is not finite (loss {loss}, grad norm "
                            f"{grad_norm}); lower train.lr, or set train.nonfinite = 'skip' to skip such steps")
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_update(ctx, self.step, end_of_unit)
        counts, prompts = self.meter.take()
        names = sorted(counts)
        summed = engine.all_reduce_sum(torch.tensor([counts[n] for n in names], dtype=torch.float64,
                                                    device=engine.device)).tolist()
        self.counters.add({n: int(round(v)) for n, v in zip(names, summed)})
        self.counters.optimizer_steps += 1
        self.counters.add_prompts(p for chunk in engine.all_gather_objects(sorted(prompts)) for p in chunk)
        self._last = {"step": self.step, "loss": loss, **unit_logs, **logs, "lr": lr_used,
                      "grad_norm": grad_norm, "skipped": not finite}
        if self.cfg["train"]["check_replicas"]:
            engine.check_replicas(self.params, self.step)

    def log_step(self) -> None:
        row = {**self._last, "budget": self.counters.as_dict()}
        if self.engine.is_main:
            append_jsonl(self.out_dir / "train_log.jsonl", row)
            if self.writer is not None:
                self.writer.scalars(row, self.step)
        if self.progress is not None and self.engine.is_main:  # one progress line per step, not one per process
            numbers = {k: v for k, v in self._last.items() if isinstance(v, float) and k not in ("loss", "lr")}
            self.progress(self.step, self.total_steps, loss=self._last["loss"], **numbers)

    # ---- checkpoints and evaluation --------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        state = {"step": self.step, "unit": self.unit, "evals_passed": self.evals_passed,
                 "pending_eval": self.pending_eval, "scheduler": self.scheduler.state_dict(),
                 "counters": self.counters.state_dict(), "data": self.data.state_dict(),
                 "roles": self.roles.state_dict(), "method": self.method.state_dict(),
                 "world_size": self.engine.world_size, "accumulation": self.shape.accumulation}
        if not self.engine.shards_parameters:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save(self) -> Path:
        engine = self.engine
        state = self.trainer_state()
        final = checkpoint_dir(self.out_dir, self.step)
        if engine.shards_parameters:  # ZeRO-3 / FSDP: accelerate saves the model and optimizer shards for resume,
            engine.acc.save_state(str(final.with_name(final.name + ".engine")))
            modules = {"transformer": self._gathered_transformer()}  # and the whole weights are gathered to export
        else:
            modules = self.method.export(self.ctx)
        if engine.is_main:
            record = {"step": self.step, "method": self.method_name, "method_version": self.method.version,
                      "run_name": self.cfg.get("run", {}).get("name")}

            def writer(folder: Path) -> None:
                self.adapter.save_components(folder, list(modules), self.base_model, record, modules)
                if self.roles.use_lora:
                    _save_lora_diffusers(self.roles, folder / "lora")
                fault("checkpoint")
                torch.save(state, folder / STATE_FILE)

            write_checkpoint(final, writer)
        engine.barrier()
        return final

    def _gathered_transformer(self):
        """The whole transformer of a sharded run, on the main process (a collective: every process calls it)."""
        full = self.engine.full_state_dict(self.roles.net)
        if not self.engine.is_main:
            return None
        t = self.adapter.transformer
        whole = type(t).from_config(t.config)
        whole.load_state_dict(full)
        return whole

    def restore(self, ckpt: Path) -> None:
        state = load_trainer_state(ckpt)
        if (state["world_size"] * state.get("accumulation", 1)) != self.shape.slots:
            raise UserError(f"{ckpt}: saved with {state['world_size']} process(es) x {state.get('accumulation', 1)} "
                            f"accumulation slots, resumed with {self.shape.slots} slots (keep the global batch's "
                            f"layout, or set train.global_batch_size)")
        if not self.roles.use_lora and not self.engine.shards_parameters:  # sharded: accelerate's load_state below
            for name in self.ctx.components:  # the trained weights, from the checkpoint's own components
                module = getattr(self.adapter.pipe, name)
                loaded = type(module).from_pretrained(ckpt / name, dtype=torch.float32, local_files_only=True)
                with torch.no_grad():
                    module.load_state_dict(loaded.state_dict())
        self.roles.load_state_dict(state["roles"])  # LoRA, EMA, live weights under an EMA, copies, extra modules
        self.method.load_state_dict(state["method"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.engine.acc.load_state(str(ckpt.with_name(ckpt.name + ".engine")))
        self.scheduler.load_state_dict(state["scheduler"])
        restored = Counters.from_state(state["counters"])
        self.counters.__dict__.update(restored.__dict__)
        self.data.load_state_dict(state["data"])
        self.step, self.unit = int(state["step"]), int(state["unit"])
        self.ctx.step = self.step
        self.evals_passed, self.pending_eval = int(state["evals_passed"]), state.get("pending_eval")
        if self.pending_eval is not None and _eval_done(self.cfg, self.out_dir, self.pending_eval):
            self.pending_eval = None

    def evaluate(self, step: int) -> None:
        """Every process evaluates its share of the benchmarks with the weights the method evaluates."""
        from soarbench.evaluate import evaluate_config

        info = model_info(self.cfg, self.method_name if step else "base", step, self.counters,
                          self.out_dir / "checkpoints" / f"step_{step:06d}", self.method.version if step else "")

        def to_tensorboard(i, bench, summary, folder):
            if self.writer is not None:
                self.writer.eval(summary, folder, step, "eval" if i == 0 else f"eval/{bench.name}")

        with self.meter.paused(), (self.method.eval_weights(self.ctx) if step else contextlib.nullcontext()):
            evaluate_config(self.adapter, self.cfg, self.out_dir / "evals" / f"step_{step:06d}", info,
                            f"eval step {step}:", engine=self.engine,
                            log=self.log if self.engine.is_main else (lambda message: None), on_summary=to_tensorboard)
        self.pending_eval = None


def train(cfg: dict, out_dir: Path, resume: bool = False, log=print, progress=None) -> Path:
    cfg = resolve_config(cfg)
    run = Run(cfg, out_dir, resume, log, progress)
    run.run()
    return Path(out_dir)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _grid(adapter: SD3Adapter, device) -> torch.Tensor:
    from soarbench.flow import training_sigmas

    sc = adapter.scheduler_config
    return training_sigmas(float(sc.get("shift", 3.0)), int(sc.get("num_train_timesteps", 1000))).to(device)


def _seed_global_rngs(seed: int) -> None:
    """The global generators, used by libraries that initialise weights, seeded by the run seed alone (the same on
    every process; every per-sample draw has its own keyed generator)."""
    import random

    import numpy as np

    from soarbench.rng import key_seed

    s = key_seed(seed, "global")
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def evaluation_adapter(cfg: dict, device) -> SD3Adapter:
    """The base model as a run of `cfg` holds it when it evaluates: fp32 weights, the frozen components cast as
    training casts them (train.frozen_dtype), so the base's images are those of a run that has not moved."""
    adapter = SD3Adapter.from_pretrained(cfg["model"]["path"], device=device, dtype=torch.float32,
                                         max_sequence_length=cfg["model"].get("max_sequence_length"),
                                         load_t5=bool(cfg["model"].get("load_t5", True)))
    _cast_frozen(adapter, cfg["model"].get("text_encoder_precision", "auto"), frozen_dtype(cfg["train"]),
                 tuple(cfg["train"]["components"]))
    return adapter


def frozen_dtype(tcfg: dict) -> torch.dtype:
    """The dtype frozen components are held in (train.frozen_dtype): "auto" is bf16 under bf16 mixed precision and
    fp32 otherwise (fp16 weights overflow in SD3's VAE); "fp32" turns the cast off."""
    name, mixed = tcfg.get("frozen_dtype", "auto"), tcfg["mixed_precision"]
    if name == "auto":
        name = "bf16" if mixed == "bf16" else "fp32"
    if name == "bf16" and mixed == "fp16":
        raise UserError("config: train.frozen_dtype = 'bf16' with train.mixed_precision = 'fp16' would mix two "
                        "half precisions; use fp32 (or mixed_precision = 'bf16')")
    if name not in ("bf16", "fp32"):
        raise UserError(f"config: train.frozen_dtype must be auto, bf16 or fp32, got '{name}'")
    return _DTYPES[name]


def _cast_frozen(adapter: SD3Adapter, text_precision: str, dtype: torch.dtype, components) -> None:
    """Cast the never-trained components once: the VAE to `dtype`, and the text encoders that train.components
    does not train to model.text_encoder_precision ("auto": `dtype`). The trained modules keep fp32 master weights
    (autocast computes in bf16); the adapter feeds each module inputs in its dtype and returns latents and pixels
    in fp32. Under fp32 nothing moves."""
    if text_precision == "auto":
        text_dtype = dtype
    elif text_precision in _DTYPES:
        text_dtype = _DTYPES[text_precision]
    else:
        raise UserError(f"config: model.text_encoder_precision must be auto, fp32, bf16 or fp16, got '{text_precision}'")
    adapter.pipe.vae.to(dtype)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(adapter.pipe, name, None)
        if module is not None and name not in components:
            module.to(text_dtype)


def frozen_modules(adapter: SD3Adapter, roles: Roles, components) -> dict[str, torch.nn.Module]:
    """The whole modules a run holds and never trains: the VAE, the text encoders outside train.components and the
    roles' frozen copies of the transformer ("ref_copy", "old_copy")."""
    out = {"vae": adapter.pipe.vae}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(adapter.pipe, name, None)
        if module is not None and name not in components:
            out[name] = module
    out.update({f"{role}_copy": module for role, module in roles.copies.items()})
    return out


def frozen_record(adapter: SD3Adapter, roles: Roles, components) -> dict:
    """run.json's account of the frozen modules: each one's dtype, and the bytes their parameters take."""
    modules = frozen_modules(adapter, roles, components)
    dtypes = {}
    for name, module in modules.items():
        kinds = {p.dtype for p in module.parameters()}
        dtypes[name] = "/".join(sorted(_DTYPE_NAMES.get(k, str(k).removeprefix("torch.")) for k in kinds))
    total = sum(p.numel() * p.element_size() for m in modules.values() for p in m.parameters())
    return {"frozen_components": dtypes, "frozen_parameter_bytes": total}


def text_encoder_release(method, device_type: str, cfg: dict, data, components) -> str:
    """Whether the frozen text encoders leave the accelerator once the text cache is built, and why (run.json's
    "text_encoders"). They do for a method that declares `needs_text_encoders_after_cache = False` (SFT, SOAR: every
    caption, and the empty one, is read from the cache), when the cache holds every caption, nothing trains them
    and no in-training evaluation encodes a benchmark's prompts; on a CUDA device only (on the CPU there is nothing
    to free)."""
    if method.needs_text_encoders_after_cache:
        return f"kept: {method.name} encodes prompts while it trains"
    if any(c.startswith("text_encoder") for c in components):
        return "kept: trained (train.components)"
    if cfg.get("eval", {}).get("benchmark"):
        return "kept: in-training evaluation encodes the benchmark's prompts"
    if not data.holds_text_cache:
        return "kept: no text cache (data.text_cache = 'none', or too large to hold)"
    if device_type != "cuda":
        return "kept: the run is on the CPU (nothing to free)"
    return "moved to the CPU after the text cache was built"


def _offload_text_encoders(run: "Run", components) -> str:
    """Move the frozen text encoders (CLIP-L/G and T5-XXL, about 5.5 B parameters for SD3.5) to the CPU where
    text_encoder_release allows it, freeing their GPU memory for the transformer's activations; the decision."""
    decision = text_encoder_release(run.method, run.engine.device.type, run.cfg, run.data, components)
    if not decision.startswith("moved"):
        return decision
    run.adapter.null_embeddings()  # CFG's unconditional branch (SOAR's): computed while the encoders are on the GPU
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(run.adapter.pipe, name, None)
        if module is not None:
            module.to("cpu")
    torch.cuda.empty_cache()
    return decision


def model_info(cfg: dict, method: str, step: int, counters: Counters, path: Path, method_version: str = "") -> dict:
    """The `model` record of an evaluation's summary; `method_version` says e.g. that a method is reconstructed."""
    run = cfg.get("run", {})
    name, group = run.get("name", method), run.get("group", method)
    return {"path": str(path), "run_name": name, "group": group, "method": method, "method_version": method_version,
            "seed": int(cfg["train"]["seed"]), "step": step, "budget_spent": counters.as_dict(),
            "label": "base" if method == "base" else f"{group}@{step}"}


def _eval_done(cfg: dict, out_dir: Path, step: int) -> bool:
    folder = Path(out_dir) / "evals" / f"step_{step:06d}"
    return folder.is_dir() and any(folder.glob("*/summary.json"))


# what may differ between a run and its resumption: where it runs and how it reports, never what it computes
_RESUME_MAY_CHANGE = ("train.device", "train.threads", "train.checkpoint_every", "log.", "eval.batch_size",
                      "budget.amount")


def _check_inputs(source: str, records: list, cfg: dict) -> None:
    """What a run reads besides its model, checked before the model loads: the training images open (their
    headers; the pixels are decoded when first used), and the weights of its reward and eval metrics are on disk."""
    from soarbench.benchmarks import eval_benchmarks
    from soarbench.harness.data import image_size
    from soarbench.metrics.registry import require_weights

    if source == "images":
        for rec in records:
            image_size(rec)
    mcfg, ecfg = cfg["method"], cfg.get("eval", {})
    if isinstance(mcfg.get("rewards"), dict):
        require_weights(list(mcfg["rewards"]), mcfg.get("reward_options") or {})
    if ecfg.get("benchmark"):
        for bench in eval_benchmarks(ecfg):
            require_weights(ecfg.get("metrics") or list(bench.metrics), bench.metrics)


def _refuse_changed_config(out_dir: Path, cfg: dict) -> None:
    """--resume continues the recorded run: a changed option would silently train with the old value."""
    path = Path(out_dir) / "config.toml"
    if not path.is_file():
        return
    old = C.load_toml(path, file_paths=False)  # recorded paths are already resolved
    before, after = old.get("method", {}).get("name"), cfg.get("method", {}).get("name")
    if before != after:  # every option of the method differs then: name the method, not the first option
        raise UserError(f"--resume: {path} records a {before} run and this config trains {after}; resume with "
                        f"--method {before} (the recorded config), or start a new run folder")
    for key, (before, after) in _diff(old, json.loads(json.dumps(cfg, default=str))).items():
        if _added_since(key, old, after):
            continue
        if not any(key == k or key.startswith(k) for k in _RESUME_MAY_CHANGE):
            raise UserError(f"--resume: {key} was {before!r} in {path} and is {after!r} now; resume with the recorded "
                            f"config, or start a new run folder")


def _added_since(key: str, old: dict, value) -> bool:
    """An option a later soarbench added, absent from the recorded config and left at its default: the default
    is the behaviour the run was recorded with. Not train.frozen_dtype under bf16, where its default ("auto")
    casts the frozen parts to bf16, which the recorded run did not do."""
    section, _, name = key.partition(".")
    field = C.TRAIN_SCHEMA.get(section, {}).get(name)
    if field is None or name in old.get(section, {}) or _norm(value) != _norm(field.default):
        return False
    return not (key == "train.frozen_dtype" and old.get("train", {}).get("mixed_precision") == "bf16")


def _diff(a, b, prefix="") -> dict:
    out = {}
    for key in sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else []:
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(_diff(va, vb, name + "."))
        elif _norm(va) != _norm(vb):
            out[name] = (va, vb)
    return out


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return "" if v is None else v


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from: those steps are about to be redone."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _save_lora_diffusers(roles: Roles, folder: Path) -> None:
    """The (EMA) LoRA in diffusers' layout: `pipe.load_lora_weights(folder)` loads it onto the base pipeline."""
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    from soarbench.models import lora as L

    peft = L.peft_model(roles.base)
    with roles.ema_weights():
        state = get_peft_model_state_dict(peft)
        state = {k.removeprefix("base_model.model."): v.detach().cpu().clone() for k, v in state.items()}
    # the metadata carries lora_alpha: without it diffusers would assume alpha = r (scale 1, not alpha / r)
    config = peft.peft_config["default"].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()
                if k in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "use_rslora")}
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=metadata)


class _Writers:
    """TensorBoard (default) and Weights & Biases (log.wandb) beside the JSONL log, on the main process."""

    def __init__(self, out_dir: Path, cfg: dict):
        lcfg = cfg.get("log", {})
        self.tb = self.wandb = None
        if lcfg.get("tensorboard", True):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out_dir / "tb"))
        if lcfg.get("wandb", False):
            try:
                import wandb
            except ImportError:
                raise UserError("config: log.wandb = true but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=lcfg.get("wandb_project", "soarbench"), dir=str(out_dir),
                                    name=cfg.get("run", {}).get("name"), config=cfg)

    def scalars(self, row: dict, step: int) -> None:
        flat = {f"train/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k != "step"}
        flat.update({f"budget/{k}": v for k, v in row.get("budget", {}).items()})
        if self.tb is not None:
            for k, v in flat.items():
                if v is not None and math.isfinite(float(v)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def eval(self, summary: dict, folder: Path, step: int, prefix: str = "eval") -> None:
        """Scores as `prefix/metric` (the main benchmark's under eval/, an extra one's under eval/NAME/)."""
        scores = {f"{prefix}/{k}": v for k, v in summary["scores"].items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scores.items():
                self.tb.add_scalar(k, v, step)
            images = sorted((folder / "images").glob("*.png"))[:16]
            if images:
                import numpy as np
                from PIL import Image

                arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images])
                self.tb.add_images(f"{prefix}/samples", arr, step, dataformats="NHWC")
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scores, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
