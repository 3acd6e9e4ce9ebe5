"""SePPO (arXiv 2410.05255, "SePPO: Semi-Policy Preference Optimization for Diffusion Alignment"), RECONSTRUCTED:
the paper's training code is not public, so this is our reading of the paper, ported to rectified flow.

    soarbench train --config benchmarks/shapes/seppo.toml --out runs/seppo
    accelerate launch --config_file configs/accelerate/ddp.yaml -m soarbench train \\
        --config benchmarks/sd35m/seppo.toml --out runs/sd35m-seppo

Data: only WINNING images with their prompts (HY-SOAR-format JSONL, as SFT reads it: source "images"; caption
dropout and the rest of the [data] options apply as for SFT). One unit of work is one optimizer step:
  1. Reference pool: snapshots of the trained weights (the LoRA adapter, or the whole transformer under full
     fine-tuning, always on the CPU), theta_0 first, then one after every `pool_every` optimizer steps; at most
     `pool_size` kept (the paper: every 30 updates, K = 7).
  2. Each optimizer step picks ONE reference from the pool: `reference = "uniform"` (the paper's best strategy),
     "initial" (theta_0) or "latest" (the newest snapshot). The uniform draw is keyed by (seed, unit), so every
     process and a resumed run pick the same one. The chosen snapshot is loaded into the "old" role (a second LoRA
     adapter, or a frozen copy of the transformer): under LoRA the "ref" role means the adapter-free base network,
     which other methods rely on, so the pool's reference lives in the "old" slot. Every process holds the pool:
     under full fine-tuning that is pool_size whole transformers of CPU memory per process (SD3.5-M: ~10 GB each
     in fp32), so the shipped configs train a LoRA (a few MB per snapshot).
  3. For every winner (prompt p, latent x_w) the reference generates x_r for the same prompt: a no-grad Euler ODE
     at CFG `guidance` with `num_steps` steps from noise keyed by the sample's global index.
  4. One shared noisy state per pair, as Diffusion-DPO shares noise and timestep across its pair: sigma drawn as SFT
     draws it (`weighting_scheme`, the logit-normal default) and one noise eps for both images; with
     x_s = (1 - sigma) x + sigma eps the velocity error e(x) = mean over latent elements of ((eps - x) - v(x_s))^2,
     for the policy (with gradient) and the reference (no gradient), on both images.
  5. Loss per pair (Diffusion-DPO's loss with x_r in the loser's place, s from the flipper):
        L = -log sigmoid(-beta [ (e_theta(x_w) - e_ref(x_w)) - s (e_theta(x_r) - e_ref(x_r)) ])
     Anchor-based adaptive flipper: if the reference fits the anchor (the winner) better than the current model,
     e_ref(x_w) < e_theta(x_w), its sample is likely good and counts as a winner too (s = -1: both errors are
     pushed down); else it is a loser (s = +1). `flipper = false` keeps s = +1 (plain DPO against the reference's
     sample).

What was inferred (not stated in a form we could port directly), each our choice:
  - The port to rectified flow: velocity errors instead of epsilon errors (the paper trains SD-1.5).
  - beta: Diffusion-DPO's T w(t) constant is folded into beta. Its SD recipe uses beta_dpo = 5000 on epsilon
    errors averaged over latent elements, with a factor 1/2 inside the sigmoid (2500 in this formula). An epsilon
    error is (1 - sigma)^2 times the velocity error at the same point (eps_hat = x_s + (1 - sigma) v_hat), and
    E[(1 - sigma)^2] = 0.11 under SD3's shifted logit-normal sigmas, so the default is beta = 2500 x 0.11 ~ 280.
    The weighting scheme only draws sigma: its loss weight w(sigma) (cosmap, sigma_sqrt) is part of that constant
    and not applied per pair, as Diffusion-DPO applies none.
  - The flipper's direction (reference better on the anchor -> its sample is a winner) and that it is decided per
    sample from the detached errors at the pair's shared noisy state.
  - The pool when full: the oldest snapshot AFTER theta_0 is dropped; theta_0 is never dropped, so
    `reference = "initial"` always exists and the uniform draw always keeps a chance of the starting point.
    With pool_size = 1 the pool is theta_0 alone.
  - A snapshot "after step k" holds the weights after k optimizer steps; with pool_every = 1 the latest snapshot
    is the current policy.
The method's recorded version says "reconstructed" (run.json's method_version and every checkpoint's
soarbench_checkpoint.json).

Every random draw is keyed by (seed, unit, purpose, global sample index) and the reference draw by (seed, unit),
so an optimizer step's gradient does not depend on how many processes share the work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from soarbench import flow
from soarbench.errors import UserError, did_you_mean
from soarbench.cost import UnitCost
from soarbench.rng import keyed_generator
from soarbench.methods.base import (Batch, Ctx, LossOutput, MethodBase, Micro, ParamGroup, RunShape, eval_mode,
                                    log_pair, trained_weights)
from soarbench.methods.sft import FlowMatchingDraw, draw_flow_matching
from soarbench.models.sd3 import TextEmbeddings
from soarbench.sampling.ode import euler_sample

REFERENCES = ("uniform", "initial", "latest")
ROLE = "old"  # where the chosen reference's weights live (see the module docstring)


# ---- the loss -------------------------------------------------------------------------------------------------
@dataclass
class SePPOTerms:
    """Per-pair (B,) terms; `loss` carries the gradient."""

    loss: torch.Tensor  # -log sigmoid(-beta * inside)
    inside: torch.Tensor  # (e_th(x_w) - e_ref(x_w)) - s (e_th(x_r) - e_ref(x_r))
    s: torch.Tensor  # +1: the reference's sample is a loser, -1: a winner (flipped)


def flipper_sign(e_theta_w: torch.Tensor, e_ref_w: torch.Tensor, flipper: bool = True) -> torch.Tensor:
    """s per pair: -1 where the reference fits the anchor better (e_ref(x_w) < e_theta(x_w)), else +1."""
    ones = torch.ones_like(e_theta_w, dtype=torch.float32)
    if not flipper:
        return ones
    return torch.where(e_ref_w.detach().float() < e_theta_w.detach().float(), -ones, ones)


def seppo_terms(e_theta_w: torch.Tensor, e_theta_r: torch.Tensor, e_ref_w: torch.Tensor, e_ref_r: torch.Tensor,
                beta: float, flipper: bool = True) -> SePPOTerms:
    """SePPO's loss from the four per-pair velocity errors (policy / reference, winner / reference sample)."""
    e_ref_w, e_ref_r = e_ref_w.detach().float(), e_ref_r.detach().float()
    s = flipper_sign(e_theta_w, e_ref_w, flipper)
    inside = (e_theta_w.float() - e_ref_w) - s * (e_theta_r.float() - e_ref_r)
    return SePPOTerms(loss=F.softplus(beta * inside), inside=inside, s=s)  # softplus(x) = -log sigmoid(-x)


# ---- the reference pool ---------------------------------------------------------------------------------------
class ReferencePool:
    """Snapshots of the trained weights: theta_0 plus the newest ones, at most `size` (theta_0 is never dropped)."""

    def __init__(self, size: int = 7):
        self.size = int(size)
        self.steps: list[int] = []  # the optimizer step each snapshot was taken after (0: theta_0)
        self.weights: list[dict[str, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        self.steps.append(int(step))
        self.weights.append(weights)
        if len(self.steps) > self.size:  # the oldest after theta_0 goes (with pool_size = 1: the new one)
            del self.steps[1], self.weights[1]

    def choose(self, mode: str, seed: int, unit: int) -> int:
        """The position of this unit's reference; the uniform draw is keyed by (seed, unit)."""
        if not self.steps:
            raise RuntimeError("the reference pool is empty (theta_0 is added before the first step)")
        if mode == "initial":
            return 0
        if mode == "latest":
            return len(self.steps) - 1
        g = keyed_generator(seed, unit, "seppo_reference")
        return int(torch.randint(len(self.steps), (1,), generator=g))

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.weights = [dict(w) for w in state["weights"]]


# ---- the method -----------------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """One optimizer step's pairs on this process: each micro-batch's winners and the reference's samples."""

    batches: list[Batch]
    samples: list[torch.Tensor]  # x_r per batch, (B, C, H, W) fp32 clean latents
    logs: dict[str, float] = field(default_factory=dict)


class SePPO(MethodBase):
    name = "seppo"
    version = "1-reconstructed (arXiv 2410.05255; no public code)"
    source = "images"

    def __init__(self, beta: float = 280.0, flipper: bool = True, reference: str = "uniform", pool_size: int = 7,
                 pool_every: int = 30, num_steps: int = 10, guidance: float = 4.5,
                 weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, lora: bool = True, lora_r: int = 32, lora_alpha: float = 64):
        if reference not in REFERENCES:
            raise did_you_mean("[method] reference", str(reference), REFERENCES)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise UserError(f"[method] pool_size = {pool_size!r}: expected an integer >= 1 (the reference pool's "
                            f"capacity, theta_0 included; the paper keeps 7)")
        if isinstance(pool_every, bool) or not isinstance(pool_every, int) or pool_every < 1:
            raise UserError(f"[method] pool_every = {pool_every!r}: expected an integer >= 1 (optimizer steps between "
                            f"snapshots; the paper takes one every 30)")
        if not beta > 0:
            raise UserError(f"[method] beta = {beta}: expected > 0 (the DPO temperature)")
        if num_steps < 1:
            raise UserError(f"[method] num_steps = {num_steps}: the reference's ODE needs at least one step")
        if weighting_scheme not in flow.WEIGHTING_SCHEMES:
            raise did_you_mean("[method] weighting_scheme", str(weighting_scheme), flow.WEIGHTING_SCHEMES)
        self.beta, self.flipper, self.reference = float(beta), bool(flipper), reference
        self.pool_every, self.T, self.g = int(pool_every), int(num_steps), float(guidance)
        self.scheme, self.logit_mean, self.logit_std, self.mode_scale = (
            weighting_scheme, float(logit_mean), float(logit_std), float(mode_scale))
        self.use_lora, self.lora_r, self.lora_alpha = bool(lora), int(lora_r), float(lora_alpha)
        self.pool = ReferencePool(pool_size)

    # ---- the contract ---------------------------------------------------------------------------------------
    def plan(self, shape: RunShape) -> UnitCost:
        """One optimizer step (all processes): n reference samples (num_steps forwards each, two with CFG), then per
        pair 2 policy forward+backward passes and 2 reference forwards (winner and reference sample)."""
        n = shape.global_batch
        cfg = 2 if self.g != 1.0 else 1
        return UnitCost(images=n, data_images=n, unique_prompts=n, no_grad_fwd=n * self.T * cfg + 2 * n, fwd_bwd=2 * n,
                        micro_batches=shape.accumulation, samples_per_step=n)

    def setup(self, ctx: Ctx) -> list[ParamGroup]:
        params = trained_weights(ctx, "seppo", self.use_lora, self.lora_r, self.lora_alpha,
                                 "the reference pool's snapshots and the reference")
        ctx.roles.add_role(ROLE)
        return [ParamGroup(params)]

    def unit_logs(self, buffer: Pairs) -> dict[str, float]:
        return buffer.logs

    def collect(self, ctx: Ctx, data) -> Pairs:
        batches = data.next(ctx)
        if not len(self.pool):
            self.pool.add(ctx.step, ctx.roles.snapshot())  # theta_0 (a resumed run has its pool back already)
        k = self.pool.choose(self.reference, ctx.seed, ctx.unit)
        ctx.roles.load_role(ROLE, self.pool.weights[k])
        samples = [self.reference_samples(ctx, b) for b in batches]
        logs = {"reference_index": float(k), "reference_step": float(self.pool.steps[k]),
                "pool_size": float(len(self.pool))}
        return Pairs(batches=batches, samples=samples, logs=logs)

    @torch.no_grad()
    def reference_samples(self, ctx: Ctx, batch: Batch) -> torch.Tensor:
        """x_r for each winner's prompt: the chosen reference's Euler ODE from noise keyed by the global index."""
        adapter = ctx.adapter
        noise = ctx.randn(batch.z0.shape[1:], batch.ids, "reference_noise")
        with eval_mode(adapter.transformer):
            x_r = euler_sample(adapter, batch.text, noise, num_steps=self.T, guidance=self.g,
                               velocity=ctx.velocity_of(ROLE))
        ctx.meter.add("images", len(batch.ids))
        return x_r.float()

    def draw(self, ctx: Ctx, batch: Batch) -> FlowMatchingDraw:
        """sigma and eps of each pair, exactly as SFT draws them for that sample."""
        return draw_flow_matching(ctx, batch, self.scheme, self.logit_mean, self.logit_std, self.mode_scale)

    def updates(self, ctx: Ctx, pairs: Pairs):
        yield [Micro((b, x_r, self.draw(ctx, b)), float(len(b.prompts))) for b, x_r in zip(pairs.batches,
                                                                                       pairs.samples)]

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        batch, x_r, d = micro.data
        n = len(batch.ids)
        x_w = batch.z0.float()
        # both images at the same sigma with the same noise: one batched forward per role
        z = torch.cat([d.z_on, flow.interpolate(x_r, d.z1, d.sigma0)])
        sigma = torch.cat([d.sigma0, d.sigma0])
        text = TextEmbeddings.cat([batch.text, batch.text])
        target = torch.cat([d.z1 - x_w, d.z1 - x_r])
        e_theta = flow.per_sample_mse(ctx.velocity(z, sigma, text), target)
        with torch.no_grad():
            e_ref = flow.per_sample_mse(ctx.velocity(z, sigma, text, role=ROLE), target)
        terms = seppo_terms(e_theta[:n], e_theta[n:], e_ref[:n], e_ref[n:], self.beta, self.flipper)
        logs = {"loss_dpo": log_pair(terms.loss.sum(), n),
                "flipped": log_pair((terms.s < 0).float().sum(), n),
                "implicit_acc": log_pair((terms.inside < 0).float().sum(), n),
                "e_policy_winner": log_pair(e_theta[:n].sum(), n), "e_ref_winner": log_pair(e_ref[:n].sum(), n),
                "e_policy_sample": log_pair(e_theta[n:].sum(), n), "e_ref_sample": log_pair(e_ref[n:].sum(), n)}
        return LossOutput(loss=terms.loss.sum(), logs=logs)

    def after_update(self, ctx: Ctx, step: int, end_of_unit: bool) -> None:
        if step % self.pool_every == 0:
            self.pool.add(step, ctx.roles.snapshot())

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("pool") is not None:
            self.pool.load_state_dict(state["pool"])

    def describe(self) -> dict:
        return {**super().describe(), "reference": self.reference, "flipper": self.flipper, "beta": self.beta,
                "pool_size": self.pool.size, "pool_every": self.pool_every}
