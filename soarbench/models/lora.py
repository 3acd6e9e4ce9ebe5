"""LoRA on the SD3 transformer (peft), the reference policy with the adapters off, and EMA of the LoRA weights.

Flow-GRPO trains a LoRA with r 32, alpha 64 (scale alpha / r = 2) and gaussian init (A ~ N(0, 1/r^2), B = 0, so
training starts exactly at the base model) on the joint-attention projections of every block:
attn.to_q/to_k/to_v/to_out.0 (image stream) and attn.add_q_proj/add_k_proj/add_v_proj/to_add_out (text stream).
The "attn." prefix is deliberate: SD3.5's dual-attention blocks have a second image attention, `attn2`, with the
same projection names, and the reference leaves it untouched.

peft injects the LoRA layers into the transformer in place, so the adapter's `pipe.transformer` samples with the
LoRA too. The reference policy of the KL term is the same network inside `adapters_disabled`. A checkpoint of the
LoRA alone is `save_lora`/`load_lora`; `merged_copy` gives a plain transformer with the LoRA folded in, which
saves and loads like any fine-tuned transformer.

EMA (decay 0.9, updated every 8 optimizer steps, warm-up decay min((1 + step) / (10 + step), 0.9)) keeps a
shadow of the LoRA weights that evaluation swaps in.
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from soarbench.errors import UserError
from soarbench.io import atomic_write_bytes, atomic_write_text

LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def add_lora(transformer: torch.nn.Module, r: int = 32, alpha: float = 64, init: str | bool = "gaussian",
             targets: Iterable[str] = LORA_TARGETS, dropout: float = 0.0):
    """Wrap `transformer` in a peft model with LoRA on `targets` (module-name suffixes); only LoRA trains."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init, target_modules=list(targets),
                        lora_dropout=dropout)
    return get_peft_model(transformer, config)


def peft_model(model):
    """The peft model inside DistributedDataParallel / torch.compile wrappers."""
    from peft import PeftModel

    outer = model
    while not isinstance(model, PeftModel):
        inner = getattr(model, "module", None)  # DDP
        if inner is None:
            inner = getattr(model, "_orig_mod", None)  # torch.compile
        if inner is None:
            raise TypeError(f"{type(outer).__name__} carries no LoRA adapters (wrap it with add_lora first)")
        model = inner
    return model


@contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Run the base network (the reference policy) inside the block; the LoRA is back on afterwards."""
    with peft_model(model).disable_adapter():
        yield


def lora_parameters(model) -> list[torch.nn.Parameter]:
    """The LoRA parameters, in a fixed order (what the optimizer and the EMA hold)."""
    return [p for name, p in peft_model(model).named_parameters() if "lora_" in name]


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The LoRA weights as peft names them (adapter name stripped), detached copies on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model(model)).items()}


def save_lora(model, folder: str | Path) -> Path:
    """Write the LoRA weights (safetensors) and their peft config to `folder`, each file atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    peft = peft_model(model)
    atomic_write_bytes(folder / WEIGHTS_FILE, save({k: v.contiguous() for k, v in lora_state_dict(peft).items()}))
    config = peft.peft_config[peft.active_adapter].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # target_modules is a set
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")
    return folder


def load_lora(model, folder: str | Path):
    """Load LoRA weights saved by `save_lora` into `model`, wrapping a bare transformer with the saved config.

    Returns the model that carries the weights (the peft model when a bare transformer was given). Weights that
    do not match the model's LoRA layers one to one are a UserError.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder}: no LoRA weights ({WEIGHTS_FILE})")
    try:
        peft = peft_model(model)
    except TypeError:  # a bare transformer: give it the LoRA layers the weights were saved from
        model = peft = get_peft_model(model, LoraConfig.from_pretrained(str(folder)))
    state = load_file(str(folder / WEIGHTS_FILE))
    expected = lora_state_dict(peft)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    mismatched = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise UserError(f"{folder}: LoRA weights do not fit this model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, shape mismatch {mismatched[:3]})")
    set_peft_model_state_dict(peft, state)
    return model


def merged_copy(model) -> torch.nn.Module:
    """A copy of the base transformer with the LoRA folded into its weights (W + (alpha / r) B A), peft-free.

    It needs one more transformer's worth of memory for a moment; `model` is left as it was.
    """
    return copy.deepcopy(peft_model(model)).merge_and_unload()


class EMA:
    """An exponential moving average of some parameters (the LoRA weights), for evaluation.

    step(k) after optimizer step k (0-based) updates every `every` steps, on k + 1 = every, 2 every, ...:
        e <- d_k e + (1 - d_k) p,     d_k = min((1 + k) / (10 + k), decay)
    The warm-up decay lets the shadow follow the weights closely early on instead of staying near the init.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float = 0.9, every: int = 8,
                 device: torch.device | str | None = None):
        if not 0.0 <= decay <= 1.0 or every < 1:
            raise ValueError(f"EMA needs 0 <= decay <= 1 and every >= 1, got decay={decay}, every={every}")
        self.params = list(params)
        self.decay, self.every = float(decay), int(every)
        self.shadow = [p.detach().to(device or p.device, copy=True) for p in self.params]

    def decay_at(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def step(self, step: int) -> bool:
        """Fold the current weights in after optimizer step `step`; True when this step updated the shadow."""
        if (step + 1) % self.every:
            return False
        weight = 1.0 - self.decay_at(step)
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().to(shadow.device, shadow.dtype), weight)
        return True

    @contextmanager
    def swap(self) -> Iterator[None]:
        """Evaluate with the EMA weights inside the block; the trained weights are restored afterwards."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved):
                    param.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "shadow": [s.detach().cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(state['shadow'])} tensors, this EMA {len(self.shadow)}")
        self.decay, self.every = float(state["decay"]), int(state["every"])
        with torch.no_grad():
            for shadow, saved in zip(self.shadow, state["shadow"]):
                shadow.copy_(saved)
