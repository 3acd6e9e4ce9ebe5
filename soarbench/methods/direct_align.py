"""Direct-Align and SRPO (Shen et al., "Directly Aligning the Full Diffusion Trajectory with Fine-Grained Human
Preference", arXiv 2509.06942; reference code Tencent-Hunyuan/SRPO, fastvideo/SRPO.py): a differentiable reward
backpropagated through ONE model step, the VAE decoder and the reward model.

    soarbench train --config benchmarks/shapes/direct_align.toml --out runs/direct_align
    soarbench train --config benchmarks/sd35m/srpo.toml --out runs/srpo        # HPSv2.1, 8 GPUs

One unit of work is one optimizer step over the global batch (one image per prompt):
  1. rollout without gradient: one initial noise eps, the SAME for every sample of the step on every process
     (the reference broadcasts it from rank 0; here it is keyed by (seed, unit) alone), a `num_steps` (25) Euler
     ODE on the shift-3 grid shift(linspace(1, 0, N + 1)) with CFG `guidance` -> the clean latent x0;
  2. the training grid g = linspace(s~_5, s~_25, 1000) of the 50-step shift-3 grid s~ (sigma from about 0.964
     down to 0.75); m is drawn uniformly in 5..995 for each sample (`timestep_per = "sample"`, keyed by (seed,
     unit, global sample index), so a step averages as many timesteps as it has images whatever the number of
     processes; the reference draws one m per process and step, i.e. one per GPU, with a per-rank seed) or once
     per step for all samples (`timestep_per = "step"`, keyed by (seed, unit)); the gap
     dj = min(int((1 - 0.9) * 1000) + 1, 1000 - m, m)
     (= 100 in floating point, as the reference computes it);
  3. denoise branch (with gradient): s_hi = g[1000 - m - dj], s_lo = g[1000 - m]; x_hi = s_hi eps + (1 - s_hi) x0;
     v = policy velocity at (x_hi, s_hi) (CFG `train_guidance`); x_lo = x_hi - (s_hi - s_lo) v;
     x0_hat = (x_lo - s_lo eps) / (1 - s_lo); decoded WITH gradient; reward R; loss relu(threshold - R) / 2;
  4. SRPO only, the inversion branch (the reference's regulariser in place of a KL): m' = max(m - dj, 1),
     s_lo' = g[1000 - m'], s_hi' = g[1000 - min(m' + dj, 1000)]; from x_lo' = s_lo' eps + (1 - s_lo') x0 one
     Euler step TOWARD noise, x' = x_lo' + (s_hi' - s_lo') v(x_lo', s_lo'); x0_hat' = (x' - s_hi' eps) / (1 - s_hi');
     the reward with the control words swapped; loss relu(threshold - R') / 2. The two branches are separate
     micro-batches (two backward passes, as the reference's two accumulation steps), so their gradients add.

Semantic relative reward (SRPO), for CLIP-type rewards (clipscore, pickscore, hpsv2: metrics with
embed_images_tensor / embed_texts / relative_scale): p+ = "<control word>. prompt", p- = "<negative word>. prompt"
(words chosen by the 1-based step counter, word[(unit + 1) % len], as the reference's counter starting at 1, from
`control_words` / `negative_words`, defaults the reference's lists),
    R  = scale * img . [(1 + k) txt(p+) - txt(p-)],   k  = linspace(0.1, 0.25, 1000)[m]      (denoise)
    R' = scale * img . [(1 + k') txt(p-) - txt(p+)],  k' = linspace(0.3, 0.01, 1000)[m']    (inversion)
with scale = exp(logit_scale) / 20 for transformers CLIPs (ClipScore, PickScore) and 1 for HPS v2.1, as the
reference. The denoiser always sees the original prompt; control words are reward-side only.

`round_timestep = true` feeds the model the timestep int(sigma * 1000) / 1000, as the reference does in the rollout
and in both branches (fastvideo/SRPO.py); the sigmas of the update arithmetic stay exact.

Direct-Align alone (`--method direct_align`) is the denoise branch with the plain weighted reward
sum_k w_k score_tensor_k, for any differentiable metric (e.g. "shapes_soft" in the shapes world). A reward that
is not differentiable is refused with one line.

Budget per step of n images (all processes): images n, no-grad forwards n * num_steps (x2 with CFG), per branch
n forward+backward passes (x2 with train CFG), n VAE decodes with gradient and n reward forward+backward passes
per reward model. Full fine-tuning of the transformer as the reference (`lora = true` for a LoRA). A step's
gradient is the pooled mean over its images, independent of how processes and accumulation slots share them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from soarbench.errors import UserError, did_you_mean
from soarbench.cost import UnitCost
from soarbench.rng import keyed_generator, keyed_randn
from soarbench.methods.base import (Ctx, LossOutput, MethodBase, Micro, ParamGroup, RunShape, eval_mode, log_pair,
                                    trained_weights)
from soarbench.models.sd3 import TextEmbeddings
from soarbench.rl.rewards import RewardFunction, parse_weights

GRID_SIZE = 1000  # the reference's timestep_length
# The reference's word lists (fastvideo/SRPO.py): texture / realism words for p+, "AI-look" style words for p-.
CONTROL_WORDS = ("Natural-lighting", "Detail", "Detailed", "Real")
NEGATIVE_WORDS = ("Concept art", "Painting", "Anime", "Flat", "Oil")
RELATIVE_METHODS = ("embed_images_tensor", "embed_texts", "relative_scale")
TIMESTEP_PER = ("sample", "step")  # m drawn per sample (many timesteps per step) or once per optimizer step


# ------------------------------------------------------------------------------------------- the arithmetic
def shift_sigmas(shift: float, num_steps: int) -> torch.Tensor:
    """shift(linspace(1, 0, N + 1)) = shift t / (1 + (shift - 1) t): the reference's (N + 1)-entry grid, float64."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def training_grid(shift: float = 3.0, size: int = GRID_SIZE) -> torch.Tensor:
    """g = linspace(s~_5, s~_25, size) of the 50-step shifted grid s~ (decreasing), float64."""
    s = shift_sigmas(shift, 50)
    return torch.linspace(float(s[5]), float(s[25]), size, dtype=torch.float64)


def gap(m: int, size: int = GRID_SIZE, ratio: float = 0.9) -> int:
    """dj = min(int((1 - ratio) * size) + 1, size - m, m), the reference's expression (groundtruth_ratio 0.9).

    In floating point 1 - 0.9 = 0.09999999999999998, so int(...) is 99 and the gap is 100 grid entries (not the
    101 that int(0.1 * 1000) + 1 suggests): computed here exactly as the reference computes it."""
    return min(int((1 - ratio) * size) + 1, size - m, m)


def branch_sigmas(grid: torch.Tensor, m: int, dj: int, inversion: bool) -> tuple[float, float, int]:
    """(sigma the model is evaluated at, sigma the step lands on, the index m of the branch's k).

    Denoise: from g[N - m - dj] down to g[N - m]. Inversion: m' = max(m - dj, 1), from g[N - m'] UP to
    g[N - min(m' + dj, N)]."""
    n = len(grid)
    if not inversion:
        return float(grid[n - m - dj]), float(grid[n - m]), m
    m_inv = max(m - dj, 1)
    return float(grid[n - m_inv]), float(grid[n - min(m_inv + dj, n)]), m_inv


def branch_sigmas_per_sample(grid: torch.Tensor, m: torch.Tensor, dj: torch.Tensor,
                             inversion: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`branch_sigmas` for one (m, dj) per sample: three (B,) tensors (float64, float64, long)."""
    rows = [branch_sigmas(grid, int(a), int(b), inversion) for a, b in zip(m.tolist(), dj.tolist())]
    s_from, s_to, k = zip(*rows) if rows else ((), (), ())
    return (torch.tensor(s_from, dtype=torch.float64), torch.tensor(s_to, dtype=torch.float64),
            torch.tensor(k, dtype=torch.long))


def model_timestep(sigma: torch.Tensor, rounded: bool) -> torch.Tensor:
    """The sigma the model is fed: exact, or the reference's int(sigma * 1000) / 1000 (sigma >= 0)."""
    return torch.floor(sigma * 1000) / 1000 if rounded else sigma


def _bcast(value, like: torch.Tensor):
    """A float, or a (B,) tensor shaped to broadcast over (B, C, H, W)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
    return float(value)


def noisy(x0: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_sigma = sigma eps + (1 - sigma) x0 (sigma a float or one per sample)."""
    return _bcast(sigma, x0) * eps + _bcast(1 - sigma, x0) * x0


def one_step_x0(x: torch.Tensor, v: torch.Tensor, eps: torch.Tensor, s_from: float, s_to: float) -> torch.Tensor:
    """One Euler step x' = x + (s_to - s_from) v, then the clean latent implied by the KNOWN noise:
    x0_hat = (x' - s_to eps) / (1 - s_to). Exact (x0_hat = x0) when v = eps - x0, whichever the direction."""
    moved = x + _bcast(s_to - s_from, x) * v  # differences taken before the cast to the latents' dtype
    return (moved - _bcast(s_to, x) * eps) / _bcast(1 - s_to, x)


def relative_reward(image: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, k: float,
                    scale: float = 1.0) -> torch.Tensor:
    """(B,) SRPO's semantic relative reward scale * img . [(1 + k) txt+ - txt-] of (B, D) embeddings; k a float
    or one per sample."""
    if isinstance(k, torch.Tensor) and k.dim() > 0:
        k = k.to(image.device, image.dtype).reshape(-1, 1)
    return scale * (image * ((1 + k) * positive - negative)).sum(-1)


# ------------------------------------------------------------------------------------------------- rewards
def differentiable_metrics() -> list[str]:
    """The registered metrics whose score_tensor keeps the graph to the pixels (read off their classes)."""
    from soarbench.metrics.registry import METRICS

    out = []
    for name in METRICS.names():
        try:
            if getattr(METRICS.load(name), "differentiable", False):
                out.append(name)
        except Exception:  # a metric whose module cannot be imported here cannot be a reward here either
            continue
    return out


def _metric_class(name: str):
    from soarbench.metrics.registry import METRICS

    METRICS.check(name)
    return METRICS.load(name)


def check_rewards(method: str, weights: dict[str, float], relative: bool) -> None:
    """One line for a reward Direct-Align cannot use: not differentiable, or (SRPO) without text embeddings."""
    for name in weights:
        cls = _metric_class(name)
        if not getattr(cls, "differentiable", False):
            raise UserError(f"[method] {method} backpropagates the reward, but reward '{name}' is not "
                            f"differentiable; use one of: {', '.join(differentiable_metrics())}")
        if relative and not all(hasattr(cls, attr) for attr in RELATIVE_METHODS):
            from soarbench.metrics.registry import METRICS

            clip_type = [n for n in differentiable_metrics()
                         if all(hasattr(METRICS.load(n), a) for a in RELATIVE_METHODS)]
            raise UserError(f"[method] {method}'s semantic relative reward needs a CLIP-type reward (image and text "
                            f"embeddings); '{name}' is not one; use one of: {', '.join(clip_type)}")


@dataclass
class Rollouts:
    """This process's share of one step: clean latents, the shared noise, each sample's m and gap, the words."""

    x0: torch.Tensor  # (n_local, C, H, W)
    eps: torch.Tensor  # (C, H, W), the same for every sample of the step
    text: TextEmbeddings
    prompts: list[str]
    metadata: list[Any]
    m: torch.Tensor  # (n_local,) long: each sample's training grid index (all equal with timestep_per = "step")
    dj: torch.Tensor  # (n_local,) long: each sample's gap
    words: tuple[str, str]  # (control word, negative word)
    logs: dict[str, float] = field(default_factory=dict)


class DirectAlign(MethodBase):
    name = "direct_align"
    source = "prompts"
    relative = False  # SRPO: the semantic relative reward and the inversion branch

    def __init__(self, rewards: dict[str, float] | None = None, reward_options: dict[str, dict] | None = None,
                 num_steps: int = 25, guidance: float = 4.5, train_guidance: float = 1.0, threshold: float = 0.7,
                 loss_scale: float = 0.5, shift: float = 3.0, m_range: Sequence[int] = (5, 995),
                 groundtruth_ratio: float = 0.9, lora: bool = False, lora_r: int = 32, lora_alpha: float = 64,
                 ema: bool = False, ema_decay: float = 0.9, ema_every: int = 1, resolution: int = 0,
                 timestep_per: str = "sample", round_timestep: bool = False, **srpo: Any):
        self.weights = parse_weights(rewards or {"shapes_soft": 1.0})
        self.reward_options = dict(reward_options or {})
        for name in self.reward_options:
            if name not in self.weights:
                raise UserError(f"[method] options given for reward '{name}', which is not among the rewards "
                                f"({', '.join(self.weights)})")
        check_rewards(self.name, self.weights, self.relative)
        if num_steps < 1:
            raise UserError(f"[method] num_steps must be >= 1, got {num_steps}")
        lo, hi = (int(v) for v in m_range)
        if not 1 <= lo <= hi <= GRID_SIZE - 1:
            raise UserError(f"[method] m_range must be [lo, hi] with 1 <= lo <= hi <= {GRID_SIZE - 1}, got "
                            f"{list(m_range)}")
        if timestep_per not in TIMESTEP_PER:
            raise did_you_mean("[method] timestep_per", str(timestep_per), TIMESTEP_PER)
        self.timestep_per, self.round_timestep = str(timestep_per), bool(round_timestep)
        self.T, self.g, self.g_train = int(num_steps), float(guidance), float(train_guidance)
        self.threshold, self.loss_scale, self.shift = float(threshold), float(loss_scale), float(shift)
        self.m_range, self.ratio = (lo, hi), float(groundtruth_ratio)
        self.use_lora, self.lora_r, self.lora_alpha = bool(lora), int(lora_r), float(lora_alpha)
        self.use_ema, self.ema_decay, self.ema_every = bool(ema), float(ema_decay), int(ema_every)
        self.resolution = int(resolution)
        self._srpo_options(**srpo)
        self.grid = training_grid(self.shift)
        self.reward_fn: RewardFunction | None = None  # built in setup (reward weights load only when training)

    def _srpo_options(self, **options: Any) -> None:
        if options:
            raise UserError(f"[method] direct_align got unknown options {sorted(options)} (control words and the "
                            f"inversion branch are options of --method srpo)")
        self.branches = (False,)

    @property
    def group_size(self) -> int:
        return 1  # one image per prompt

    # ---- the contract ---------------------------------------------------------------------------------------
    def plan(self, shape: RunShape) -> UnitCost:
        n, b = shape.global_batch, len(self.branches)
        cfg = 2 if self.g != 1.0 else 1
        train_cfg = 2 if self.g_train != 1.0 else 1
        return UnitCost(images=n, unique_prompts=n, no_grad_fwd=n * self.T * cfg, fwd_bwd=n * b * train_cfg,
                        vae_decodes=n * b, reward_fwd_bwd=n * b * len(self.weights), optimizer_steps=1,
                        micro_batches=shape.accumulation * b, samples_per_step=n)

    def setup(self, ctx: Ctx) -> list[ParamGroup]:
        roles = ctx.roles
        params = trained_weights(ctx, self.name, self.use_lora, self.lora_r, self.lora_alpha)
        if self.use_ema:
            roles.add_ema(params, self.ema_decay, self.ema_every)
        self.reward_fn = RewardFunction.from_config(self.weights, self.reward_options)
        for metric in self.reward_fn.metrics.values():  # the reward models are frozen: only the pixels need a grad
            for module in vars(metric).values():
                if isinstance(module, torch.nn.Module):
                    module.requires_grad_(False)
        self.reward_fn.meter = ctx.meter
        return [ParamGroup(params)]

    def unit_logs(self, buffer: Rollouts) -> dict[str, float]:
        return buffer.logs

    @torch.no_grad()
    def collect(self, ctx: Ctx, data) -> Rollouts:
        share = data.next(ctx)
        adapter = ctx.adapter
        text = adapter.encode_prompts(share.prompts)
        size = self.resolution or int(adapter.vae.config.sample_size)
        shape = adapter.latent_shape(size, size)
        # one noise for the whole step, on every process: keyed by (seed, unit) only, never by sample
        eps = keyed_randn(shape, [(ctx.seed, ctx.unit, "shared_noise")], device=ctx.device)[0]
        noise = eps.expand(len(share.ids), *shape)
        policy = ctx.velocity_of("policy")
        with eval_mode(adapter.transformer):
            x0 = euler_rollout(lambda z, s: _velocity(adapter, policy, z, s, text, self.g, self.round_timestep),
                               noise, shift_sigmas(self.shift, self.T))
        adapter.meter.add("images", len(share.ids))
        m = self.draw_m(ctx.seed, ctx.unit, share.ids)
        dj = torch.tensor([gap(int(v), GRID_SIZE, self.ratio) for v in m.tolist()], dtype=torch.long)
        # the reference's step counter starts at 1 (fastvideo/SRPO.py), our unit at 0
        words = (self.control_word(ctx.unit + 1), self.negative_word(ctx.unit + 1))
        return Rollouts(x0=x0, eps=eps, text=text, prompts=list(share.prompts), metadata=list(share.metadata),
                        m=m, dj=dj, words=words, logs={"m": float(m.double().mean()) if len(m) else 0.0})

    def draw_m(self, seed: int, unit: int, ids) -> torch.Tensor:
        """(len(ids),) long: each sample's m, uniform in m_range, keyed by its global index (or one per step)."""
        lo, hi = self.m_range
        if self.timestep_per == "step":
            m = int(torch.randint(lo, hi + 1, (1,), generator=keyed_generator(seed, unit, "timestep")))
            return torch.full((len(ids),), m, dtype=torch.long)
        return torch.tensor([int(torch.randint(lo, hi + 1, (1,), generator=keyed_generator(seed, unit, "timestep", int(i))))
                             for i in ids], dtype=torch.long)

    def control_word(self, step: int) -> str:
        return ""

    def negative_word(self, step: int) -> str:
        return ""

    def updates(self, ctx: Ctx, rollouts: Rollouts):
        A = ctx.shape.accumulation
        n = len(rollouts.prompts)
        if n % A:
            raise RuntimeError(f"{n} samples on this process do not split over {A} accumulation slots")
        per = n // A
        micros = []
        for a in range(A):
            idx = list(range(a * per, (a + 1) * per))
            for inversion in self.branches:
                micros.append(Micro((rollouts, idx, inversion), len(idx) / len(self.branches)))
        yield micros

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        rollouts, idx, inversion = micro.data
        adapter = ctx.adapter
        x0 = rollouts.x0[idx]
        eps = rollouts.eps.expand_as(x0)
        text = rollouts.text[idx]
        s_from, s_to, k_index = branch_sigmas_per_sample(self.grid, rollouts.m[idx], rollouts.dj[idx], inversion)
        policy = ctx.velocity_of("policy")
        x0_hat = branch_x0(lambda z, s: _velocity(adapter, policy, z, s, text, self.g_train, self.round_timestep),
                           x0, eps, s_from, s_to)
        pixels = adapter.decode(x0_hat, grad=True)
        prompts = [rollouts.prompts[i] for i in idx]
        metadata = [rollouts.metadata[i] for i in idx]
        reward = self.reward(pixels, prompts, metadata, rollouts.words, k_index, inversion)
        per_sample = self.loss_scale * torch.relu(self.threshold - reward)
        tag = "inversion" if inversion else "denoise"
        n = len(idx)
        logs = {f"reward_{tag}": log_pair(reward.sum(), n), f"loss_{tag}": log_pair(per_sample.sum(), n)}
        return LossOutput(loss=per_sample.sum(), logs=logs)

    def reward(self, pixels: torch.Tensor, prompts: list[str], metadata: list, words: tuple[str, str],
               k_index: torch.Tensor, inversion: bool) -> torch.Tensor:
        """(B,) the weighted reward of decoded pixels, on the graph (RewardFunction: counted as reward
        forward+backward passes)."""
        total, _ = self.reward_fn(pixels, prompts, metadata)
        return total.to(pixels.dtype)

    def after_update(self, ctx: Ctx, step: int, end_of_unit: bool) -> None:
        if ctx.roles.ema is not None:
            ctx.roles.ema.step(step - 1)

    def describe(self) -> dict:
        return {**super().describe(), "rewards": dict(self.weights), "threshold": self.threshold,
                "timestep_per": self.timestep_per, "round_timestep": self.round_timestep,
                "branches": ["inversion" if b else "denoise" for b in self.branches]}


class SRPO(DirectAlign):
    """Direct-Align with the semantic relative reward and the inversion branch (see the module docstring)."""

    name = "srpo"
    relative = True

    def __init__(self, rewards: dict[str, float] | None = None, control_words: list[str] = CONTROL_WORDS,
                 negative_words: list[str] = NEGATIVE_WORDS, k_range: list[float] = (0.1, 0.25),
                 k_inversion_range: list[float] = (0.3, 0.01), inversion: bool = True, **options: Any):
        super().__init__(rewards=rewards or {"hpsv2": 1.0}, control_words=control_words,
                         negative_words=negative_words, k_range=k_range, k_inversion_range=k_inversion_range,
                         inversion=inversion, **options)

    def _srpo_options(self, control_words: Sequence[str] = CONTROL_WORDS,
                      negative_words: Sequence[str] = NEGATIVE_WORDS, k_range: Sequence[float] = (0.1, 0.25),
                      k_inversion_range: Sequence[float] = (0.3, 0.01), inversion: bool = True) -> None:
        for what, words in (("control_words", control_words), ("negative_words", negative_words)):
            if isinstance(words, str) or not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise UserError(f"[method] srpo {what} must be a non-empty list of words, got {words!r}")
        for what, pair in (("k_range", k_range), ("k_inversion_range", k_inversion_range)):
            if isinstance(pair, str) or len(pair) != 2:
                raise UserError(f"[method] srpo {what} must be [first, last], got {pair!r}")
        self.control_words, self.negative_words = tuple(control_words), tuple(negative_words)
        self.k = torch.linspace(float(k_range[0]), float(k_range[1]), GRID_SIZE, dtype=torch.float64)
        self.k_inv = torch.linspace(float(k_inversion_range[0]), float(k_inversion_range[1]), GRID_SIZE,
                                    dtype=torch.float64)
        self.branches = (False, True) if inversion else (False,)

    def control_word(self, step: int) -> str:
        return self.control_words[step % len(self.control_words)]

    def negative_word(self, step: int) -> str:
        return self.negative_words[step % len(self.negative_words)]

    def reward(self, pixels, prompts, metadata, words, k_index, inversion):
        """R = sum_k w_k scale_k img . [(1 + k) txt(p+) - txt(p-)], p+ and p- swapped in the inversion branch."""
        positive = [f"{words[0]}. {p}" for p in prompts]
        negative = [f"{words[1]}. {p}" for p in prompts]
        if inversion:
            positive, negative = negative, positive
        k = (self.k_inv if inversion else self.k)[torch.as_tensor(k_index, dtype=torch.long)]
        total = None
        for name, metric in self.reward_fn.metrics.items():
            image = metric.embed_images_tensor(pixels)
            self.reward_fn.count(name, len(pixels), with_grad=True)  # always on the graph when it trains
            pos = metric.embed_texts(positive).to(image)
            neg = metric.embed_texts(negative).to(image)
            term = self.reward_fn.weights[name] * relative_reward(image, pos, neg, k, metric.relative_scale)
            total = term if total is None else total + term
        return total.to(pixels.dtype)


# -------------------------------------------------------------------------------------------------- helpers
def _velocity(adapter, velocity, z: torch.Tensor, sigma: float | torch.Tensor, text: TextEmbeddings,
              guidance: float, rounded: bool = False):
    from soarbench.sampling.ode import cfg_velocity

    # only the model's timestep input is rounded (as the reference), never the sigmas of the update
    s = model_timestep(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1), rounded)
    s = s.to(device=z.device, dtype=torch.float32)
    null = adapter.null_embeddings() if guidance != 1.0 else None
    return cfg_velocity(velocity, z, s, text, null, guidance).to(z.dtype)


def euler_rollout(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                  sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate dz/dsigma = v from sigmas[0] (1) to sigmas[-1] (0): the clean latent."""
    z = noise
    for i in range(len(sigmas) - 1):
        s0, s1 = float(sigmas[i]), float(sigmas[i + 1])
        z = z + (s1 - s0) * velocity(z, s0)
    return z


def branch_x0(velocity: Callable[[torch.Tensor, float], torch.Tensor], x0: torch.Tensor, eps: torch.Tensor,
              s_from: float, s_to: float) -> torch.Tensor:
    """A branch of Direct-Align: x0 noised to s_from (no gradient), one step of the velocity to s_to (with
    gradient), the clean latent recovered with the known noise."""
    x = noisy(x0, eps, s_from).detach()
    return one_step_x0(x, velocity(x, s_from), eps, s_from, s_to)
