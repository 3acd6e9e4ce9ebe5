"""SDE rollouts that record per-step log-probabilities, and those log-probabilities recomputed with gradient.

A rollout integrates the CFG velocity v = v_u + g (v_c - v_u) (v_u: the empty prompt) from sigma = 1 to 0 on the
scheduler's own grid sigma_0 = 1 > sigma_1 > ... > sigma_T = 0 (`ode.sampling_sigmas`). Step i maps x_i to x_{i+1}:

  stochastic step (inside the SDE window and noise level a > 0): the shared SDE step (soarbench.sampling.sde),
      x_{i+1} = mean_i + std_i eps,   log p_i = mean over C*H*W of log N(x_{i+1}; mean_i, std_i^2)     (fp32)
  deterministic step (outside the window, or a = 0): Euler, x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v. It has
      no density: its log-prob is stored as 0 and the step is marked untrainable.

Without a window every step is stochastic (Flow-GRPO); "Fast" Flow-GRPO puts the noise only in a window of `size`
consecutive steps inside the first half of the schedule (`random_window`). With a = 0 a rollout is exactly the
evaluation sampler, `ode.euler_sample`.

PPO needs log p_theta(x_{i+1} | x_i) of a recorded transition under the current weights: `step_log_prob_under`
recomputes the CFG velocity at the recorded x_i with gradient and evaluates the same SDE step's density at the
recorded x_{i+1}. It batches [uncond; cond] exactly as the rollout does, so with unchanged weights it reproduces
the rollout's log-prob (ratio 1) rather than a value that differs by kernel rounding: with PPO's clip range of
1e-4 such rounding would already count as a policy change.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import torch

from soarbench.rng import keyed_randn
from soarbench.models.sd3 import SD3Adapter, TextEmbeddings
from soarbench.sampling.ode import Velocity, cfg_velocity, sampling_sigmas
from soarbench.sampling.sde import SDE_VARIANTS, sde_step, step_log_prob

# Variants whose noise term is s sqrt(|dt|); the other two (sde, cps) scale their noise by sigma alone.
_SQRT_DT_NOISE = ("simple", "flow_sde", "dance")


@dataclass
class Trajectory:
    """A batch of recorded rollouts (all on one sigma grid, one SDE variant and noise level)."""

    latents: torch.Tensor  # (B, T+1, C, H, W) fp32: [:, 0] the initial noise, [:, T] the clean latents
    log_probs: torch.Tensor  # (B, T) fp32: log p(latents[:, i+1] | latents[:, i]); 0 on deterministic steps
    sigmas: torch.Tensor  # (T+1,) fp32, 1 down to 0
    trainable: torch.Tensor  # (B, T) bool: step i was stochastic, so it has a log-prob and can be trained
    variant: str
    noise_level: float

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def final_latents(self) -> torch.Tensor:
        """(B, C, H, W): the clean latents the rollout ended in (what is decoded and rewarded)."""
        return self.latents[:, -1]

    def select(self, index) -> "Trajectory":
        """The rollouts of some samples: an int, a slice, a bool mask or an index tensor over the batch."""
        if isinstance(index, int):
            index = [index]  # keep the batch dimension
        return replace(self, latents=self.latents[index], log_probs=self.log_probs[index],
                       trainable=self.trainable[index])

    def map_batch(self, fn) -> "Trajectory":
        """The same grid, variant and noise level with `fn` applied to each per-sample tensor (e.g. an all-gather
        over processes)."""
        return replace(self, latents=fn(self.latents), log_probs=fn(self.log_probs), trainable=fn(self.trainable))

    @staticmethod
    def cat(parts: Sequence["Trajectory"]) -> "Trajectory":
        """Concatenate along the batch (e.g. the sampling batches of one epoch, each with its own window)."""
        first = parts[0]
        for other in parts[1:]:
            if (other.variant, other.noise_level) != (first.variant, first.noise_level) or not torch.equal(
                    other.sigmas, first.sigmas):
                raise ValueError("trajectories on different sigma grids, SDE variants or noise levels cannot be joined")
        return replace(first, latents=torch.cat([p.latents for p in parts]),
                       log_probs=torch.cat([p.log_probs for p in parts]),
                       trainable=torch.cat([p.trainable for p in parts]))

    def trainable_steps(self) -> torch.Tensor:
        """(B, K) long: each sample's trainable step indices in increasing order.

        Rollouts from different sampling batches may have their windows at different steps; column k is then the
        k-th window step of each sample, which `step_log_prob_under` accepts as a per-sample step index.
        """
        counts = self.trainable.sum(dim=1)
        if (counts != counts[:1]).any():
            raise ValueError(f"samples have different numbers of trainable steps: {counts.tolist()}")
        steps = torch.arange(self.num_steps, device=self.trainable.device).expand_as(self.trainable)
        return steps[self.trainable].reshape(self.batch_size, int(counts[0]) if self.batch_size else 0)

    def log_prob_at(self, step_index: int | torch.Tensor) -> torch.Tensor:
        """(B,) the recorded log-probs of step `step_index` (an int or one index per sample): PPO's old log-prob."""
        j = _per_sample(step_index, self.batch_size, self.log_probs.device)
        return self.log_probs.gather(1, j[:, None])[:, 0]


class StepLogProb(NamedTuple):
    """A recorded step's density under the current weights (`log_prob` and `mean` carry gradient)."""

    log_prob: torch.Tensor  # (B,) fp32: mean over C*H*W of log N(x_{i+1}; mean, std^2) (cps: -||x' - mean||^2)
    mean: torch.Tensor  # (B, C, H, W) fp32: the step's deterministic part
    std: torch.Tensor  # (B, 1, 1, 1): the std of x_{i+1} given x_i
    kl_std: torch.Tensor  # (B, 1, 1, 1): the std Flow-GRPO divides its KL by (see `kl_std`)


def check_variant(variant: str) -> None:
    if variant not in SDE_VARIANTS:
        raise ValueError(f"unknown SDE variant '{variant}' (valid: {', '.join(SDE_VARIANTS)})")


def random_window(num_steps: int, size: int = 3, generator: torch.Generator | None = None) -> tuple[int, int]:
    """(start, size) of a "Fast" SDE window: `size` consecutive steps inside the first half of the schedule.

    start ~ U{0, ..., num_steps // 2 - size}, as the reference draws it from sde_window_range = (0, num_steps // 2):
    10 steps and size 3 give windows starting at 0, 1 or 2.
    """
    last_start = num_steps // 2 - size
    if size < 1 or last_start < 0:
        raise ValueError(f"an SDE window of {size} steps does not fit in the first half of {num_steps} steps")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, last_start + 1, (1,), generator=generator, device=device).item()), size


def stochastic_steps(num_steps: int, sde_window: tuple[int, int] | None = None,
                     noise_level: float = 0.7) -> torch.Tensor:
    """(T,) bool: the steps that take an SDE step. Noise level 0 makes every step deterministic (Euler)."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    window = slice(0, num_steps)
    if sde_window is not None:
        start, size = (int(x) for x in sde_window)
        if start < 0 or size < 1 or start + size > num_steps:
            raise ValueError(f"SDE window (start={start}, size={size}) does not fit in {num_steps} steps")
        window = slice(start, start + size)
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[window] = noise_level > 0
    return mask


def kl_std(variant: str, std: torch.Tensor, sigma0: torch.Tensor, sigma1: torch.Tensor) -> torch.Tensor:
    """The std in Flow-GRPO's KL, ||mean - mean_ref||^2 / (2 kl_std^2): its `std_dev_t`, the diffusion coefficient.

    For flow_sde (and simple) the step's std is s sqrt(sigma0 - sigma1) and the reference divides by s alone, so
    its KL is the exact Gaussian KL (which divides by std) times |dt|; the betas of its configs (0.04 GenEval/OCR,
    0.01 PickScore) are calibrated on that form. For cps and sde the noise is not scaled by sqrt(|dt|) and
    kl_std = std.
    """
    if variant not in _SQRT_DT_NOISE:
        return std
    dt = (sigma0 - sigma1).float().reshape(-1, *([1] * (std.dim() - 1)))
    return std / dt.sqrt()


def _per_sample(step_index: int | torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """A step index as one long index per sample, (B,)."""
    j = torch.as_tensor(step_index, dtype=torch.long, device=device)
    if j.dim() == 0:
        j = j.expand(batch_size)
    if j.shape != (batch_size,):
        raise ValueError(f"step index must be an int or one index per sample ({batch_size}), got shape "
                         f"{tuple(j.shape)}")
    return j


def _check_batch(text: TextEmbeddings, batch_size: int) -> None:
    if text.tokens.shape[0] != batch_size:
        raise ValueError(f"{text.tokens.shape[0]} prompt embeddings for {batch_size} samples")


@torch.no_grad()
def sde_rollout(adapter: SD3Adapter, text: TextEmbeddings, noise: torch.Tensor, num_steps: int = 10,
                guidance: float = 4.5, variant: str = "flow_sde", noise_level: float = 0.7,
                sde_window: tuple[int, int] | None = None, generator: torch.Generator | None = None,
                velocity: Velocity | None = None, noise_fn=None, sigmas: torch.Tensor | None = None) -> Trajectory:
    """Sample B images from `noise` (B, C, H, W), recording every state and each stochastic step's log-prob.

    sde_window=(start, size) makes only steps start..start+size-1 stochastic; None makes all of them stochastic.
    `generator` draws the SDE noise (on the latents' device); `noise_fn(i)`, when given, returns step i's noise
    (B, C, H, W) instead (the harness keys it by sample, so a sample's rollout does not depend on its batch);
    `velocity` is the network (default: the adapter's; a method passes `ctx.velocity_of("policy")`). `sigmas` (num_steps + 1 values from 1 down to 0) replaces the
    scheduler's grid (DanceGRPO samples on shift(linspace(1, 0, N + 1))).
    """
    check_variant(variant)
    velocity = velocity or adapter.velocity
    batch = noise.shape[0]
    _check_batch(text, batch)
    if sigmas is None:
        sigmas = sampling_sigmas(adapter.scheduler_config, num_steps)
    elif sigmas.shape != (num_steps + 1,):
        raise ValueError(f"a grid of {num_steps} steps needs {num_steps + 1} sigmas, got shape {tuple(sigmas.shape)}")
    sigmas = sigmas.float().to(noise.device)
    stochastic = stochastic_steps(num_steps, sde_window, noise_level)
    sigma_next_at_one = float(sigmas[1])  # flow_sde's stand-in for sigma at sigma = 1 (see sampling.sde)
    null = adapter.null_embeddings()
    z = noise.float()
    states, log_probs = [z], []
    for i in range(num_steps):
        s0, s1 = sigmas[i], sigmas[i + 1]
        v = cfg_velocity(velocity, z, s0.reshape(1), text, null, guidance)
        if stochastic[i]:
            eps = noise_fn(i).to(z.device) if noise_fn is not None else None
            step = sde_step(variant, z, v, s0, s1, noise_level, eps=eps, generator=generator,
                            sigma_next_at_one=sigma_next_at_one)
            z, log_prob = step.sample, step_log_prob(variant, step)
        else:
            z, log_prob = z + (s1 - s0) * v, z.new_zeros(batch)  # the Euler update of ode.euler_sample
        states.append(z)
        log_probs.append(log_prob)
    adapter.meter.add("images", batch)
    return Trajectory(latents=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1), sigmas=sigmas,
                      trainable=stochastic.to(noise.device).expand(batch, -1).clone(), variant=variant,
                      noise_level=float(noise_level))


def guided_velocity(velocity: Velocity, z: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings,
                    null: TextEmbeddings, guidance: float, detach_uncond: bool = True) -> torch.Tensor:
    """The CFG velocity v = v_u + g (v_c - v_u) with gradient, from one forward over [uncond; cond].

    The values are those of `ode.cfg_velocity` (same batching, same arithmetic). With `detach_uncond` the
    unconditional branch is a constant, so d v = g d v_c: the policy gradient trains the conditional velocity
    only, instead of also pushing the unconditional one with weight 1 - g < 0. `sigma` is (1,) or (B,).
    """
    return cfg_velocity(velocity, z, sigma, text, null, guidance, detach_uncond)


def step_log_prob_under(adapter: SD3Adapter, traj: Trajectory, step_index: int | torch.Tensor,
                        text: TextEmbeddings, guidance: float, velocity: Velocity | None = None,
                        null: TextEmbeddings | None = None, detach_uncond: bool = True) -> StepLogProb:
    """log p_theta(x_{j+1} | x_j) of the recorded step j of each trajectory, with gradient through the velocity.

    `step_index` is an int or one index per sample (B,) (e.g. a column of `traj.trainable_steps()`); `text` holds
    the B prompts' embeddings and `guidance` must be the rollout's for the ratio to start at 1. `velocity` is the
    network (default: the adapter's); `ctx.velocity_of("ref")` under no_grad gives the reference's `mean` for the KL.
    """
    batch = traj.batch_size
    _check_batch(text, batch)
    j = _per_sample(step_index, batch, traj.latents.device)
    rows = torch.arange(batch, device=traj.latents.device)
    if not bool(traj.trainable[rows, j].all()):
        raise ValueError("a requested step is deterministic (outside the SDE window): it has no log-probability")
    x, x_next = traj.latents[rows, j], traj.latents[rows, j + 1]
    sigma0, sigma1 = traj.sigmas[j], traj.sigmas[j + 1]
    v = guided_velocity(velocity or adapter.velocity, x, sigma0, text,
                        null if null is not None else adapter.null_embeddings(), guidance, detach_uncond)
    # The density is evaluated at the recorded x_{j+1}; the zero noise only avoids drawing a sample never used.
    step = sde_step(traj.variant, x, v, sigma0, sigma1, traj.noise_level, eps=torch.zeros_like(x),
                    sigma_next_at_one=float(traj.sigmas[1]))
    step = replace(step, sample=x_next)
    return StepLogProb(step_log_prob(traj.variant, step), step.mean, step.std,
                       kl_std(traj.variant, step.std, sigma0, sigma1))


def encode_once(adapter, prompts: list[str]) -> dict[str, TextEmbeddings]:
    """prompt -> its (1, ...) embedding, the epoch's distinct prompts encoded together in sorted order.

    The rollout and the PPO recomputation must see the very same embeddings: re-encoding a micro-batch's prompts
    in another batch (and outside the rollout's autocast) moves bf16 log-probs by ~1e-4, which a clip range of
    1e-4 would already count as a policy change. Every process encodes the same list, so the embeddings do not
    depend on how many processes share the epoch either.
    """
    unique = sorted(set(prompts))
    encoded = adapter.encode_prompts(unique)
    return {p: encoded[i:i + 1] for i, p in enumerate(unique)}


def initial_noise(seed: int, unit: int, ids, groups, shape, same_per_group: bool = True,
                  device=None) -> torch.Tensor:
    """(B, *shape): each sample's initial noise, keyed by its group (one start shared by the group: DanceGRPO's
    init_same_noise, Flow-GRPO's option) or by its own global index (Flow-GRPO's reference draw)."""
    keys = [(seed, unit, "init_noise_group", int(g)) for g in groups] if same_per_group \
        else [(seed, unit, "rollout_noise", int(i)) for i in ids]
    return keyed_randn(shape, keys, device=device)
