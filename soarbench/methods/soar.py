"""SOAR: reward-free self-correction (arXiv 2604.12617), as in shared/specs/soar.md.

Per micro-batch, on top of SFT's on-trajectory loss at sigma0:
  1. stop-gradient CFG rollout at z_on: v_cfg = v_uncond + g (v_cond - v_uncond). v_cond is the main forward's
     output, detached (no second conditional pass); v_uncond is one no-grad forward with the empty prompt.
  2. one Euler step of a `num_sampling_steps` schedule in unshifted time: t1 = max(t0 - 1/N, 0),
     sigma1 = grid[floor((1 - t1) * 1000)], z_off = z_on + v_cfg (sigma1 - sigma0)      (path 0, the ODE path)
     and, when num_rollout_paths M > 1, M - 1 stochastic paths from the shared SDE step (samples whose t1 was
     clipped to 0 take no stochastic path).
  3. L auxiliary points per path, each an independent re-noising of z_off toward the SAME z1:
     sigma' ~ U[sigma1, sigma_upper], alpha = clamp((sigma' - sigma1) / (1 - sigma1), 0, 1),
     z' = (1 - alpha) z_off + alpha z1, target v_corr = (z' - z0) / sigma' (fp32); the conditioning timestep
     snaps sigma' to the grid, the latent and the target use the continuous sigma'. No CFG on aux points.
  4. total = (sum main + lambda sum aux) / max(N_main + lambda N_aux, 1), counts summed over ranks.
lambda = 0 or L = 0 skips 1-3 and is exactly SFT with the same draws.
"""
from __future__ import annotations

import torch

from soarbench import flow
from soarbench.harness.budget import StepCost
from soarbench.methods.base import Batch, LossOutput, StepContext, global_mean, pooled_loss
from soarbench.methods.sft import SFT
from soarbench.sampling.sde import SDE_VARIANTS, sde_step


def renoise_toward(z_off: torch.Tensor, z1: torch.Tensor, sigma1: torch.Tensor, sigma_p: torch.Tensor):
    """z' on the segment from z_off (at sigma1) to z1 (at sigma 1), placed at sigma'."""
    alpha = ((sigma_p - sigma1) / (1 - sigma1)).clamp(0, 1)
    a = flow.expand_like(alpha, z_off)
    return (1 - a) * z_off + a * z1


def correction_velocity(z_prime: torch.Tensor, z0: torch.Tensor, sigma_p: torch.Tensor) -> torch.Tensor:
    """The velocity that carries z' to z0 in one Euler step: (z' - z0) / sigma'."""
    return (z_prime.float() - z0.float()) / flow.expand_like(sigma_p, z_prime).float()


class SOAR(SFT):
    name = "soar"

    def __init__(self, lambda_aux: float = 1.0, trajectory_length: int = 6, num_rollout_paths: int = 1,
                 cfg_scale_sampling: float = 4.5, num_sampling_steps: int = 40, sde_type: str = "flow_sde",
                 sde_noise_scale: float = 0.5, sigma_upper: float = 1.0, **sft_options):
        super().__init__(**sft_options)
        if sde_type not in SDE_VARIANTS:
            from soarbench.errors import did_you_mean

            raise did_you_mean("sde_type", sde_type, SDE_VARIANTS)
        if num_rollout_paths < 1 or trajectory_length < 0 or num_sampling_steps < 1:
            raise ValueError("num_rollout_paths >= 1, trajectory_length >= 0 and num_sampling_steps >= 1 required")
        self.lam, self.L, self.M = float(lambda_aux), int(trajectory_length), int(num_rollout_paths)
        self.g, self.n_steps = float(cfg_scale_sampling), int(num_sampling_steps)
        self.sde_type, self.sde_a, self.sigma_upper = sde_type, float(sde_noise_scale), float(sigma_upper)

    def step_cost(self, batch: int, world: int) -> StepCost:
        """Main pass + L aux points per path (fwd+bwd) + the unconditional rollout forward (no grad).

        With M > 1, samples whose t1 clipped to 0 take no stochastic path: an upper bound."""
        if self.lam == 0 or self.L == 0:
            return super().step_cost(batch, world)
        n = batch * world
        return StepCost(fwd_bwd=n + self.M * self.L * n, no_grad_fwd=n, unique_prompts=n)

    def rollout(self, ctx: StepContext, batch: Batch, d, v_cond: torch.Tensor):
        """The one-step CFG rollout paths: a list of (z_off, sample indices, sigma1 of those samples)."""
        B = batch.z0.shape[0]
        with torch.no_grad():
            v_uncond = ctx.adapter.velocity(d.z_on, d.sigma0, ctx.adapter.null_embeddings().repeat(B)).float()
            v_cfg = v_uncond + self.g * (v_cond.detach().float() - v_uncond)
        t1 = (d.t0 - 1.0 / self.n_steps).clamp(min=0.0)
        sigma1 = ctx.sigmas[flow.grid_index(t1)]
        everyone = torch.arange(B, device=batch.z0.device)
        paths = [(d.z_on + flow.expand_like(sigma1 - d.sigma0, d.z_on) * v_cfg, everyone, sigma1)]
        stochastic = everyone[t1 > 0]
        for _ in range(self.M - 1):
            if len(stochastic) == 0:
                break
            step = sde_step(self.sde_type, d.z_on[stochastic], v_cfg[stochastic], d.sigma0[stochastic],
                            sigma1[stochastic], self.sde_a, generator=ctx.generator,
                            sigma_next_at_one=float(ctx.sigmas[1]))
            paths.append((step.sample, stochastic, sigma1[stochastic]))
        return paths

    def aux_points(self, ctx: StepContext, batch: Batch, d, paths):
        """Stack L re-noised points per path: (z', sigma', v_corr, sample index)."""
        zs, sig, targets, idx = [], [], [], []
        gen = ctx.generator
        for z_off, members, sigma1 in paths:
            for _ in range(self.L):
                u = torch.rand(len(members), generator=gen, device=gen.device).to(sigma1.device)
                # an upper bound below sigma1 (possible when sigma_upper < 1) collapses to sigma1
                upper = sigma1.clamp(min=self.sigma_upper)
                sigma_p = sigma1 + u * (upper - sigma1)
                z_p = renoise_toward(z_off, d.z1[members], sigma1, sigma_p)
                zs.append(z_p)
                sig.append(sigma_p)
                targets.append(correction_velocity(z_p, batch.z0[members], sigma_p))
                idx.append(members)
        return torch.cat(zs), torch.cat(sig), torch.cat(targets), torch.cat(idx)

    def loss(self, ctx: StepContext, batch: Batch) -> LossOutput:
        d = self.draw(ctx, batch.z0)
        main, v_cond = self.main_term(ctx, batch, d)
        B = main.shape[0]
        logs = {"loss_main": global_mean(ctx, main.sum(), B)}
        if self.lam == 0 or self.L == 0:
            loss = pooled_loss(ctx, main.sum(), torch.tensor(float(B), device=main.device))
            return LossOutput(loss=loss, logs=logs, fwd_bwd=B)

        paths = self.rollout(ctx, batch, d, v_cond)
        z_p, sigma_p, v_corr, idx = self.aux_points(ctx, batch, d, paths)
        t_cond = flow.snap_to_grid(sigma_p, ctx.sigmas)
        v_aux = ctx.adapter.velocity(z_p, t_cond, batch.text[idx], ctx.transformer)
        aux = flow.loss_weight(sigma_p, self.scheme) * flow.per_sample_mse(v_aux, v_corr)
        n_aux = aux.shape[0]
        count = torch.tensor(B + self.lam * n_aux, device=main.device)
        loss = pooled_loss(ctx, main.sum() + self.lam * aux.sum(), count)
        logs["loss_aux"] = global_mean(ctx, aux.sum(), n_aux)
        logs["aux_points"] = float(n_aux)
        return LossOutput(loss=loss, logs=logs, fwd_bwd=B + n_aux, no_grad_fwd=B)
