"""What `soarbench methods list` and `soarbench methods show NAME` print of a method: its paper, whether it is
reconstructed, its reference code, what it trains on, and each option's type, default and meaning (read from the
constructor signature the config check reads, soarbench/config.py)."""
from __future__ import annotations

from typing import Any

from soarbench import config as C
from soarbench.methods import METHODS


def method_info(name: str) -> dict[str, Any]:
    """What `soarbench methods list/show` prints of a method: its paper (arXiv id), whether it is reconstructed
    (no public code: our reading of the paper), its reference code, what it trains on, its summary line and its
    options (name -> type, default, meaning) from the constructor signature the config check reads."""
    import inspect
    import re
    import sys

    cls = METHODS.load(name)
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    text = " ".join(doc.split())
    paper = re.search(r"arXiv (\d{4}\.\d{4,5})", f"{cls.version} {text}")
    code = re.search(r"reference code ([\w.-]+/[\w.-]+)", text)
    reconstructed = "reconstructed" in str(cls.version)
    options = {}
    for key, (param, hint) in C._constructor_parameters(cls).items():
        hint = C._hint_of(param, hint)
        default = param.default
        options[key] = {"type": "any" if hint is None else C._describe(hint),
                        "default": "(required)" if default is inspect.Parameter.empty else default,
                        "meaning": option_meaning(name, key) or _option_meaning(key, doc)}
    return {"name": name, "class": f"{cls.__module__}:{cls.__name__}", "version": str(cls.version),
            "paper": f"arXiv {paper.group(1)}" if paper else "-", "reconstructed": reconstructed,
            "source": "none public (reconstructed)" if reconstructed else (code.group(1) if code else "-"),
            "trains_on": cls.source, "summary": doc.split("\n\n")[0].replace("\n", " ") if doc else "",
            "options": options}


# What each [method] option means, as `soarbench methods show` prints it: the options several methods share, then
# each method's own (which win). tests/test_cli_first_use.py checks that every constructor option has a line here
# and that no line names an option that does not exist. A plugin's method falls back to its module docstring.
_SHARED_OPTIONS = {
    "weighting_scheme": "density of the training timestep t0: logit_normal | mode | cosmap | sigma_sqrt | uniform "
                        "(SD3's recipe: logit_normal)",
    "logit_mean": "mean of the logit-normal timestep density",
    "logit_std": "standard deviation of the logit-normal timestep density",
    "mode_scale": "scale of the 'mode' timestep density",
    "group_size": "k: images per prompt in an epoch (a group; advantages compare a group's images)",
    "batch_size": "images per epoch over all processes = (prompts per epoch) x group_size",
    "num_steps": "sampling steps of a rollout",
    "guidance": "CFG scale of the rollouts (1: none)",
    "sde_type": "the SDE step of the rollouts: simple | sde | flow_sde | cps | dance",
    "clip_range": "PPO clip: the ratio is clipped to [1 - clip_range, 1 + clip_range]",
    "beta": "weight of the KL term to the reference policy (role 'ref': LoRA disabled)",
    "global_std": "normalise advantages by the std over the whole epoch (false: per group)",
    "adv_clip": "advantages are clipped to +-adv_clip",
    "timestep_fraction": "fraction of a rollout's steps that are trained (per sample)",
    "optimizer_steps_per_epoch": "optimizer steps the epoch's samples are split into",
    "cfg_train": "recompute log-probs with CFG, as the rollouts sampled (false: the conditional velocity alone)",
    "rewards": "reward metrics and their weights, e.g. { geneval = 1.0 } (soarbench metrics list)",
    "reward_options": "options per reward metric, e.g. { geneval = { backend = \"mask2former\" } }",
    "lora": "train a LoRA adapter (false: full fine-tuning of the transformer)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (the update is scaled by lora_alpha / lora_r)",
    "ema": "keep an EMA of the trained weights; evaluation and checkpoints use it",
    "ema_decay": "EMA decay per update",
    "ema_every": "optimizer steps between EMA updates",
    "resolution": "rollout size in pixels; 0: the VAE's sample_size (SD3.5: set 512)",
    "round_timestep": "feed the model the timestep int(sigma x 1000) / 1000, as DanceGRPO's and SRPO's reference "
                      "code (the update keeps the exact sigma); false: the exact sigma",
}
_METHOD_OPTIONS = {
    "soar": {
        "lambda_aux": "weight of the auxiliary (off-trajectory) points against the main SFT term; 0: exactly SFT",
        "trajectory_length": "L: auxiliary points per rollout path (0: exactly SFT)",
        "num_rollout_paths": "M: the ODE path plus M - 1 stochastic paths from the shared SDE step",
        "cfg_scale_sampling": "CFG scale of the stop-gradient rollout step that leaves the data's path",
        "num_sampling_steps": "N: the rollout takes one Euler step of an N-step schedule, t1 = max(t0 - 1/N, 0)",
        "sde_type": "the SDE step of the stochastic paths (num_rollout_paths > 1): simple | sde | flow_sde | cps | "
                    "dance",
        "sde_noise_scale": "noise level of the stochastic paths' SDE step",
        "sigma_upper": "auxiliary sigma' ~ U[sigma1, sigma_upper], re-noised toward the same z1",
    },
    "flow_grpo": {
        "noise_level": "a: noise level of the flow_sde step",
        "sde_window": "Flow-GRPO-Fast: SDE steps only in a window of this many steps (ODE elsewhere); 0: all SDE",
        "init_same_noise": "a group's samples start from one initial noise (the reference: false, each its own)",
    },
    "actor_critic": {
        "group_size": "k: images per prompt in an epoch (the critic is the baseline: 1 is allowed)",
        "noise_level": "a: noise level of the flow_sde step",
        "sde_window": "Flow-GRPO-Fast: SDE steps only in a window of this many steps (ODE elsewhere); 0: all SDE",
        "value_pretrain_units": "phase 1: epochs that train only the critic (the policy stays frozen)",
        "value_loss_weight": "weight of the critic's MSE to the per-reward scores",
        "value_lr": "learning rate of the value head",
        "value_width": "width of the value head's 2-layer MLP",
        "critic": "the value function's backbone: diffusion (the transformer with an adapter of its own, the "
                  "paper's) | head (an MLP on the frozen reference's features)",
        "critic_lr": "learning rate of the diffusion critic's adapter (default: train.lr)",
    },
    "dance_grpo": {
        "eta": "noise scale of the 'dance' SDE step",
        "sigma_grid": "rollout sigmas: linspace (shifted by `shift`) | scheduler (the scheduler's own)",
        "shift": "the shift of the rollout grid shift(linspace(1, 0, N + 1))",
        "init_same_noise": "every sample of a group starts from the same initial noise",
        "adv_eps": "added to the group std when advantages are normalised",
        "rollout_batch_size": "images per sampling call; 0: a process's whole share at once (the reference: 1)",
        "ema_schedule": "step: warm-up decay min((1 + k) / (10 + k), ema_decay) every ema_every optimizer steps | "
                        "epoch: the constant ema_decay once per epoch (the reference's)",
    },
    "diffusion_nft": {
        "guidance": "CFG scale of the rollouts (1: none; the paper's setting)",
        "solver": "rollout sampler: dpm2 (second-order DPM, the reference's) | euler",
        "beta": "beta of the implicit positive / negative policies v+- (the loss is divided by it)",
        "kl_weight": "weight of the velocity MSE to the reference policy",
        "decay_schedule": "how the old (rollout) policy follows the trained one: linear | ocr | none",
    },
    "direct_align": {
        "rewards": "differentiable reward metrics and their weights, e.g. { shapes_soft = 1.0 }",
        "num_steps": "Euler steps of the no-grad rollout to the clean latent",
        "train_guidance": "CFG scale of the trained model step (1: none)",
        "threshold": "the loss is relu(threshold - reward) x loss_scale",
        "loss_scale": "the loss is relu(threshold - reward) x loss_scale",
        "shift": "the shift of the rollout and training sigma grids",
        "m_range": "[lo, hi]: the training grid index m is drawn uniformly in it",
        "groundtruth_ratio": "sets the step gap dj = min(int((1 - ratio) x 1000) + 1, 1000 - m, m)",
        "timestep_per": "sample: m drawn for each sample (keyed by its global index; a step averages many "
                        "timesteps, as the reference's one per GPU) | step: one m for the whole optimizer step",
    },
    "srpo": {
        "rewards": "CLIP-type reward metrics and their weights (clipscore, pickscore, hpsv2), e.g. { hpsv2 = 1.0 }",
        "control_words": "words prefixed to the prompt for the positive text of the relative reward",
        "negative_words": "words prefixed to the prompt for the negative text of the relative reward",
        "k_range": "[first, last]: k of the denoise branch's relative reward, linear over the training grid",
        "k_inversion_range": "[first, last]: k of the inversion branch's relative reward",
        "inversion": "add the inversion branch (a step toward noise with the words swapped)",
    },
    "seppo": {
        "beta": "DPO beta on velocity errors (Diffusion-DPO's 2500 x E[(1 - sigma)^2] ~ 280)",
        "flipper": "anchor-based flipper: a reference sample that fits the anchor better counts as a winner",
        "reference": "which pool snapshot is the reference each step: uniform | initial | latest",
        "pool_size": "snapshots kept in the reference pool (theta_0 included)",
        "pool_every": "optimizer steps between snapshots",
        "num_steps": "Euler steps of the reference's no-grad sample",
        "guidance": "CFG scale of the reference's sample",
    },
}
_METHOD_OPTIONS["srpo"] = {**_METHOD_OPTIONS["direct_align"], **_METHOD_OPTIONS["srpo"]}


def option_meaning(method: str, key: str) -> str:
    """The meaning `soarbench methods show` prints for option `key` of `method` ('' when none is written)."""
    return _METHOD_OPTIONS.get(method, {}).get(key) or _SHARED_OPTIONS.get(key, "")


def _option_meaning(key: str, doc: str) -> str:
    """The module docstring's first line naming the option (as `key` or key = ...); '' when it says nothing."""
    import re

    for line in doc.splitlines():
        if re.search(rf"`{re.escape(key)}`|\b{re.escape(key)}\s*[=(:]", line):
            return " ".join(line.split()).lstrip("-0123456789. ")
    return ""
