"""SOAR: reward-free self-correction (arXiv 2604.12617; reference code Tencent-Hunyuan/HY-SOAR).

    soarbench train --config benchmarks/shapes/soar.toml --out runs/soar

Per sample, on top of SFT's on-trajectory loss at sigma0:
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
  4. total = (sum main + lambda sum aux) / (N_main + lambda N_aux) over the whole global batch (the loop pools
     the micro-batches' sums; each micro-batch's weight B + lambda N_aux is known from its draws).
lambda = 0 or L = 0 skips 1-3 and is exactly SFT with the same draws.
"""
from __future__ import annotations

import torch

from soarbench import flow
from soarbench.cost import UnitCost
from soarbench.methods.base import Batch, Ctx, LossOutput, Micro, RunShape, log_pair
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
            from soarbench.errors import UserError

            raise UserError("[method] SOAR needs num_rollout_paths >= 1, trajectory_length >= 0 and "
                            "num_sampling_steps >= 1")
        self.lam, self.L, self.M = float(lambda_aux), int(trajectory_length), int(num_rollout_paths)
        self.g, self.n_steps = float(cfg_scale_sampling), int(num_sampling_steps)
        self.sde_type, self.sde_a, self.sigma_upper = sde_type, float(sde_noise_scale), float(sigma_upper)

    @property
    def corrects(self) -> bool:
        return self.lam != 0 and self.L != 0

    def plan(self, shape: RunShape) -> UnitCost:
        """Main pass + L aux points per path (fwd+bwd) + the unconditional rollout forward (no grad).

        With M > 1, samples whose t1 clipped to 0 take no stochastic path: an upper bound."""
        if not self.corrects:
            return super().plan(shape)
        n = shape.global_batch
        return UnitCost(fwd_bwd=n + self.M * self.L * n, no_grad_fwd=n, data_images=n, unique_prompts=n,
                        micro_batches=shape.accumulation, samples_per_step=n)

    def t1(self, d) -> torch.Tensor:
        return (d.t0 - 1.0 / self.n_steps).clamp(min=0.0)

    def weight(self, batch: Batch, d) -> float:
        """B main terms + lambda x the aux points this micro-batch will have (known from its draws)."""
        B = len(batch.prompts)
        if not self.corrects:
            return float(B)
        stochastic = int((self.t1(d) > 0).sum())
        return B + self.lam * self.L * (B + (self.M - 1) * stochastic)

    def updates(self, ctx: Ctx, batches: list[Batch]):
        micros = []
        for b in batches:
            d = self.draw(ctx, b)
            micros.append(Micro((b, d), self.weight(b, d)))
        yield micros

    def rollout(self, ctx: Ctx, batch: Batch, d, v_cond: torch.Tensor):
        """The one-step CFG rollout paths: a list of (z_off, sample indices, sigma1 of those samples)."""
        B = batch.z0.shape[0]
        with torch.no_grad():
            v_uncond = ctx.velocity(d.z_on, d.sigma0, ctx.adapter.null_embeddings().repeat(B)).float()
            v_cfg = v_uncond + self.g * (v_cond.detach().float() - v_uncond)
        t1 = self.t1(d)
        sigma1 = ctx.sigmas[flow.grid_index(t1)]
        everyone = torch.arange(B, device=batch.z0.device)
        paths = [(d.z_on + flow.expand_like(sigma1 - d.sigma0, d.z_on) * v_cfg, everyone, sigma1)]
        stochastic = everyone[t1 > 0]
        for path in range(1, self.M):
            if len(stochastic) == 0:
                break
            ids = [batch.ids[int(i)] for i in stochastic]
            eps = ctx.randn(d.z_on.shape[1:], ids, f"sde_path_{path}").to(d.z_on.device)
            step = sde_step(self.sde_type, d.z_on[stochastic], v_cfg[stochastic], d.sigma0[stochastic],
                            sigma1[stochastic], self.sde_a, eps=eps, sigma_next_at_one=float(ctx.sigmas[1]))
            paths.append((step.sample, stochastic, sigma1[stochastic]))
        return paths

    def aux_points(self, ctx: Ctx, batch: Batch, d, paths):
        """Stack L re-noised points per path: (z', sigma', v_corr, sample index)."""
        zs, sig, targets, idx = [], [], [], []
        # sigma' uniforms: M x L per sample from the sample's own generator, so the draws do not depend on batching
        u_all = torch.stack([torch.rand(self.M * self.L, generator=g)
                             for g in ctx.generators(batch.ids, "sigma_prime")]).to(batch.z0.device)
        for path, (z_off, members, sigma1) in enumerate(paths):
            for point in range(self.L):
                u = u_all[members, path * self.L + point]
                # an upper bound below sigma1 (possible when sigma_upper < 1) collapses to sigma1
                upper = sigma1.clamp(min=self.sigma_upper)
                sigma_p = sigma1 + u * (upper - sigma1)
                z_p = renoise_toward(z_off, d.z1[members], sigma1, sigma_p)
                zs.append(z_p)
                sig.append(sigma_p)
                targets.append(correction_velocity(z_p, batch.z0[members], sigma_p))
                idx.append(members)
        return torch.cat(zs), torch.cat(sig), torch.cat(targets), torch.cat(idx)

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        batch, d = micro.data
        main, v_cond = self.main_term(ctx, batch, d)
        B = main.shape[0]
        logs = {"loss_main": log_pair(main.sum(), B)}
        if not self.corrects:
            return LossOutput(loss=main.sum(), logs=logs)
        paths = self.rollout(ctx, batch, d, v_cond)
        z_p, sigma_p, v_corr, idx = self.aux_points(ctx, batch, d, paths)
        t_cond = flow.snap_to_grid(sigma_p, ctx.sigmas)
        v_aux = ctx.velocity(z_p, t_cond, batch.text[idx])
        aux = flow.loss_weight(sigma_p, self.scheme) * flow.per_sample_mse(v_aux, v_corr)
        logs["loss_aux"] = log_pair(aux.sum(), aux.shape[0])
        logs["aux_points"] = (float(aux.shape[0]), 0.0)  # a total over the global batch
        return LossOutput(loss=main.sum() + self.lam * aux.sum(), logs=logs)
