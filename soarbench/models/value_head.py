"""A per-reward critic V_k(z_t, t, c) on the diffusion backbone's features, and value-gradient steering with it.

Features (`backbone_features`): one forward of an SD3 transformer, the critic's backbone, at the noisy latent z_t,
timestep t and prompt c. The backbone is either
  - the critic's own trainable transformer (`DiffusionCritic`, the actor-critic's `critic = "diffusion"`, as
    arXiv 2605.27736 has it: the diffusion model itself is the value function): the base weights with a LoRA
    adapter of its own ("critic", beside the policy's, under LoRA), or a trainable copy of the initial transformer
    under full fine-tuning; or
  - the FROZEN reference backbone (`critic = "head"`: the LoRA-disabled policy, or the base transformer under full
    fine-tuning), where only the head below trains.
A forward pre-hook on the transformer's `norm_out` (the AdaLN before proj_out) reads its two inputs,
the last hidden states (B, N, D) of the image tokens and the timestep + pooled-text embedding temb (B, D). The
feature is [mean over tokens of the hidden states, temb] (B, 2D): the critic sees the noisy latent through the
same timestep/AdaLN conditioning path as the velocity, without decoding anything.

Head (`ValueHead`): LayerNorm -> Linear -> SiLU -> Linear -> SiLU (a shared trunk), then one Linear(width, 1)
output layer per reward: forward(features) is (B, K), column k the value of reward k. A checkpoint stores it as

    CHECKPOINT/value_head/value_head.safetensors   the weights
    CHECKPOINT/value_head/value_head.json          {"rewards": [...], "weights": {...}, "feature_dim": ...,
                                                    "backbone": "reference" | "critic_lora" | "critic_transformer"}
    CHECKPOINT/value_head/critic_lora/             the critic's LoRA (peft layout) on the base transformer, or
    CHECKPOINT/value_head/critic_transformer/      the critic's whole transformer (full fine-tuning)

Steering (`ValueSteering`, `load_steering`): at an ODE step from sigma s to s' the evaluation sampler adds
scale * |s' - s| * d(sum_k w_k V_k(z, s, c)) / dz to the Euler update, so the latent moves along the value
gradient (`soarbench eval --model CKPT --steer value=2.0`, optionally `--steer value=2.0,geneval=1.0` to weight
the heads; the default weights are the training reward weights), on the backbone the head was trained on.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from soarbench.errors import UserError, did_you_mean

HEAD_DIR = "value_head"
WEIGHTS_FILE = "value_head.safetensors"
CONFIG_FILE = "value_head.json"
BACKBONES = ("reference", "critic_lora", "critic_transformer")  # what the head's features are read from
CRITIC_LORA_DIR = "critic_lora"
CRITIC_TRANSFORMER_DIR = "critic_transformer"


class ValueHead(nn.Module):
    """A shared MLP trunk and one scalar output layer per reward."""

    def __init__(self, rewards: Sequence[str], feature_dim: int, width: int = 256,
                 weights: dict[str, float] | None = None, backbone: str = "reference"):
        super().__init__()
        if backbone not in BACKBONES:
            raise UserError(f"value head: backbone must be one of {', '.join(BACKBONES)}, got '{backbone}'")
        self.backbone = backbone
        rewards = list(rewards)
        if not rewards or len(set(rewards)) != len(rewards):
            raise UserError(f"value head: needs distinct reward names, got {rewards}")
        from soarbench.metrics.registry import METRICS

        for name in rewards:
            if name not in METRICS.names():
                raise did_you_mean("reward for a value head", name, METRICS.names())
        self.rewards, self.feature_dim, self.width = rewards, int(feature_dim), int(width)
        self.weights = {n: float((weights or {}).get(n, 1.0)) for n in rewards}
        self.trunk = nn.Sequential(nn.LayerNorm(self.feature_dim), nn.Linear(self.feature_dim, self.width), nn.SiLU(),
                                   nn.Linear(self.width, self.width), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(self.width, 1) for name in rewards})

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., feature_dim) -> (..., K) values, columns in `rewards` order."""
        h = self.trunk(features.float())
        return torch.cat([self.heads[name](h) for name in self.rewards], dim=-1)

    def weighted(self, features: torch.Tensor, weights: dict[str, float] | None = None) -> torch.Tensor:
        """sum_k w_k V_k: (...,)."""
        w = self.weights if weights is None else weights
        vector = torch.tensor([w[n] for n in self.rewards], dtype=torch.float32, device=features.device)
        return (self(features) * vector).sum(-1)

    def config(self) -> dict:
        where = {"reference": "the frozen reference backbone", "critic_lora": "the critic's LoRA on the base",
                 "critic_transformer": "the critic's own transformer"}[self.backbone]
        return {"rewards": self.rewards, "weights": self.weights, "feature_dim": self.feature_dim,
                "width": self.width, "backbone": self.backbone,
                "features": f"{where}: mean of norm_out's hidden states, temb"}

    # a checkpoint component: SD3Adapter.save_components calls save_pretrained(folder / "value_head")
    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        from soarbench.io import atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))
        atomic_write_json(folder / CONFIG_FILE, self.config())

    @classmethod
    def from_folder(cls, folder) -> "ValueHead":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        head = cls(cfg["rewards"], cfg["feature_dim"], cfg["width"], cfg.get("weights"),
                   cfg.get("backbone", "reference"))  # checkpoints before the diffusion critic: the reference
        head.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return head.requires_grad_(False).eval()


def feature_dim(transformer_config) -> int:
    """2 x the transformer's inner width (hidden states and temb)."""
    return 2 * int(transformer_config.num_attention_heads) * int(transformer_config.attention_head_dim)


def _norm_out(net: nn.Module) -> nn.Module:
    """The top-level `norm_out` of an SD3 transformer, also inside DDP / peft wrappers."""
    found = [m for name, m in net.named_modules() if name == "norm_out" or name.endswith(".norm_out")]
    if not found:
        raise ValueError("the backbone has no norm_out: not an SD3 transformer")
    return found[0]


def backbone_features(adapter, net: nn.Module, z: torch.Tensor, sigma: torch.Tensor, text) -> torch.Tensor:
    """(B, 2D) critic features of latents z at sigma (one forward of `net`; counted by the adapter's meter as a
    transformer forward and as `value_passes`). Differentiable in z when grad is enabled."""
    captured = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["x"]
        temb = args[1] if len(args) > 1 else kwargs["conditioning_embedding"]
        captured["f"] = torch.cat([hidden.float().mean(dim=1), temb.float()], dim=-1)

    handle = _norm_out(net).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        adapter.velocity(z, sigma, text, net)
    finally:
        handle.remove()
    adapter.meter.add("value_passes", z.shape[0])
    return captured["f"]


class DiffusionCritic(nn.Module):
    """V(z_t, t, c) = head(backbone_features(backbone at z_t, t, c)): the critic's trainable backbone and its head as
    one module, so one DistributedDataParallel wrapper reduces the gradients of both (`backbone` is the policy's
    peft model, run with the "critic" adapter active, or the critic's own transformer)."""

    def __init__(self, adapter, backbone: nn.Module, head: ValueHead):
        super().__init__()
        self.backbone, self.head = backbone, head
        self._adapter = adapter  # not a module: the meter and the velocity call

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, text) -> torch.Tensor:
        return self.head(backbone_features(self._adapter, self.backbone, z, sigma, text))


@contextlib.contextmanager
def lora_adapter_active(peft_model, name: str):
    """Inside the block, the peft model computes with LoRA adapter `name` alone; outside, with the adapter it had.
    peft's set_adapter also sets requires_grad (the active adapter trainable, the others frozen): every adapter
    parameter's flag is put back afterwards, so a graph built inside still backpropagates into the adapter's
    weights and the other adapters keep training (autograd drops the gradient of a leaf whose flag is off)."""
    before = peft_model.active_adapter
    flags = [(p, p.requires_grad) for n, p in peft_model.named_parameters() if "lora_" in n]
    peft_model.set_adapter(name)
    try:
        yield peft_model
    finally:
        peft_model.set_adapter(before)
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def recompute_inside(model: nn.Module, make_context):
    """Gradient checkpointing's recomputation of the blocks run inside the block (diffusers' non-reentrant
    checkpoint recomputes them in the backward, long after the block ends) happens inside `make_context()`: a
    forward that depends on switchable state, such as the active LoRA adapter, recomputes what it computed."""
    from torch.utils.checkpoint import checkpoint

    modules = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
               and getattr(m, "_gradient_checkpointing_func", None) is not None]
    saved = [m._gradient_checkpointing_func for m in modules]

    def func(module, *args):
        return checkpoint(module.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), make_context()))

    for m in modules:
        m._gradient_checkpointing_func = func
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m._gradient_checkpointing_func = f


class CriticExport:
    """CHECKPOINT/value_head/ of a diffusion critic: the head, and the critic backbone's own weights (its LoRA in
    peft's layout, or its whole transformer), which steering loads back (`load_steering`)."""

    def __init__(self, head: ValueHead, lora_state: dict | None = None, lora_config: dict | None = None,
                 transformer: nn.Module | None = None):
        if (lora_state is None) == (transformer is None):
            raise ValueError("a diffusion critic saves either its LoRA or its transformer")
        self.head, self.lora_state, self.lora_config, self.transformer = head, lora_state, lora_config, transformer

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        from safetensors.torch import save

        from soarbench.io import atomic_write_bytes, atomic_write_text
        from soarbench.models import lora as L

        folder = Path(folder)
        self.head.save_pretrained(folder)
        if self.transformer is not None:
            self.transformer.save_pretrained(folder / CRITIC_TRANSFORMER_DIR, safe_serialization=True)
            return
        target = folder / CRITIC_LORA_DIR
        atomic_write_bytes(target / L.WEIGHTS_FILE, save({k: v.detach().cpu().contiguous()
                                                          for k, v in self.lora_state.items()}))
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in self.lora_config.items()}
        atomic_write_text(target / L.CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")


def critic_backbone(folder: Path, base_folder: Path) -> nn.Module:
    """The transformer a saved head reads its features from: the base (reference), the base with the critic's
    LoRA merged in, or the critic's own transformer."""
    from diffusers import SD3Transformer2DModel

    from soarbench.models import lora as L

    backbone = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("backbone", "reference")
    if backbone == "critic_transformer":
        return SD3Transformer2DModel.from_pretrained(folder / CRITIC_TRANSFORMER_DIR, local_files_only=True)
    base = SD3Transformer2DModel.from_pretrained(Path(base_folder) / "transformer", local_files_only=True)
    if backbone == "critic_lora":
        return L.load_lora(base, folder / CRITIC_LORA_DIR).merge_and_unload()
    return base


def head_folder(model: Path) -> Path:
    return Path(model) / HEAD_DIR


class ValueSteering:
    """scale * d(sum_k w_k V_k)/dz at (z, sigma, prompt): what the ODE sampler adds per unit of |d sigma|."""

    def __init__(self, adapter, backbone: nn.Module, head: ValueHead, scale: float,
                 weights: dict[str, float] | None = None):
        self.adapter, self.backbone, self.head, self.scale = adapter, backbone, head, float(scale)
        self.weights = dict(head.weights if weights is None else weights)

    def gradient(self, z: torch.Tensor, sigma: torch.Tensor, text) -> torch.Tensor:
        """d(sum_k w_k V_k(z, sigma, c))/dz, per sample (fp32)."""
        with torch.enable_grad():
            x = z.detach().float().requires_grad_(True)
            value = self.head.weighted(backbone_features(self.adapter, self.backbone, x, sigma, text), self.weights)
            (grad,) = torch.autograd.grad(value.sum(), x)
        return grad

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, text) -> torch.Tensor:
        return self.scale * self.gradient(z, sigma, text)

    def describe(self) -> dict:
        return {"value": self.scale, "weights": self.weights}


def parse_steer(text: str) -> tuple[float, dict[str, float]]:
    """'value=SCALE[,REWARD=WEIGHT,...]' -> (scale, {reward: weight})."""
    pairs = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, sep, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not math.isfinite(number):
            raise UserError(f"--steer: expected value=SCALE[,REWARD=WEIGHT...] with finite numbers, got '{part}'")
        pairs[key.strip()] = number
    if "value" not in pairs:
        raise UserError(f"--steer: expected value=SCALE[,REWARD=WEIGHT...], got '{text}' (no value=SCALE)")
    scale = pairs.pop("value")
    return scale, pairs


def load_steering(model: Path, adapter, scale: float, weights: dict[str, float] | None = None) -> ValueSteering:
    """The value head saved in a checkpoint folder, on the backbone it was trained on (the frozen base, or the
    critic's own weights)."""
    from soarbench.models.sd3 import resolve_model_folder

    folder = head_folder(model)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{model}: this model has no value head ({HEAD_DIR}/{CONFIG_FILE}); --steer needs a "
                        f"checkpoint of --method actor_critic")
    head = ValueHead.from_folder(folder).to(adapter.device)
    chosen = dict(head.weights)
    for name, w in (weights or {}).items():
        if name not in head.rewards:
            raise UserError(f"--steer: the value head of {model} has no head for reward '{name}' "
                            f"(heads: {', '.join(head.rewards)})")
        chosen[name] = float(w)
    base, _ = resolve_model_folder(model)
    backbone = critic_backbone(folder, base)
    backbone = backbone.to(adapter.device, adapter.transformer.dtype).requires_grad_(False).eval()
    return ValueSteering(adapter, backbone, head, scale, chosen)
