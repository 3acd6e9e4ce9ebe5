"""Named weights behind one door: `roles.velocity(z, sigma, text, role="policy" | "ref" | "old" | ...)`.

A method asks for the weights it means by name; how they exist depends on how the policy is trained:

  role      LoRA (peft adapters on the transformer)           full fine-tuning
  policy    the trained adapter "default"                     the trained transformer
  ref       the same network with every adapter disabled      a frozen copy of the initial transformer
  old       a second adapter "old" (soft-updated copy)        a frozen copy, soft-updated
  ema       the EMA shadow of the trained weights, swapped in for evaluation and export (`ema_weights`)

Extra trainable modules (a value head) are registered with `add_module` and get their own parameter group.
Every call goes through the engine-prepared module (`net`), so sharded engines (ZeRO-3, FSDP) gather the weights.

`frozen_dtype` (train.frozen_dtype; bf16 under bf16 mixed precision): the dtype a full fine-tuning's "ref" copy is
held in; it never changes, and under autocast its matmuls ran in bf16 anyway. An "old" copy stays in the policy's
dtype: it is soft-updated, theta_old <- d theta_old + (1 - d) theta, and in bf16 (8 significant bits) an increment
(1 - d)(theta - theta_old) below half an ulp of theta_old is lost, so at d = 0.999 it would never move.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from soarbench.models.guidance import cfg_velocity
from soarbench.models.sd3 import SD3Adapter, TextEmbeddings
from soarbench.models import lora as L

ROLES = ("policy", "ref", "old", "ema")


def copy_in_dtype(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """A deep copy of `module` whose floating-point parameters and buffers are held in `dtype` (None: as they are).

    Each tensor is cast as it is copied (deepcopy's memo maps it to its cast copy), so no full-precision copy of
    the whole module ever exists: a bf16 reference of SD3.5-Medium's transformer peaks at its 5 GB, not 10 GB."""
    if dtype is None:
        return copy.deepcopy(module)
    memo: dict = {}
    for p in module.parameters():
        if p.is_floating_point() and id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=p.requires_grad)
    for b in module.buffers():
        if b.is_floating_point() and id(b) not in memo:
            memo[id(b)] = b.detach().to(dtype, copy=True)
    return copy.deepcopy(module, memo)


class Roles:
    def __init__(self, adapter: SD3Adapter, frozen_dtype: torch.dtype | None = None):
        self.adapter = adapter
        self.frozen_dtype = frozen_dtype  # None: copies keep the transformer's dtype
        self.base = adapter.transformer  # the module the policy lives in (peft model once LoRA is added)
        self.use_lora = False
        self.copies: dict[str, torch.nn.Module] = {}  # full fine-tuning: frozen copies ("ref", "old")
        self.adapters: set[str] = set()  # LoRA: extra adapters ("old")
        self.ema: L.EMA | None = None
        self.modules: dict[str, torch.nn.Module] = {}  # extra trainable modules (value heads)
        self.net: torch.nn.Module | None = None  # the engine-prepared policy module

    # ---- building the policy --------------------------------------------------------------------------------
    def lora(self, r: int, alpha: float) -> list[torch.nn.Parameter]:
        """Train a LoRA (Flow-GRPO's projections); the base weights are frozen. Returns the trained parameters."""
        self.adapter.transformer.requires_grad_(False)
        self.base = L.add_lora(self.adapter.transformer, r=r, alpha=alpha)  # peft injects the layers in place
        self.use_lora = True
        return L.lora_parameters(self.base)

    def full(self, components=("transformer",)) -> list[torch.nn.Parameter]:
        params = []
        for name in components:
            module = getattr(self.adapter.pipe, name)
            module.requires_grad_(True).train()
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    def add_role(self, role: str) -> None:
        """Make `ref` or `old` exist (before the engine prepares the policy)."""
        if role not in ("ref", "old"):
            raise ValueError(f"unknown role '{role}' (valid: ref, old)")
        if self.use_lora:
            if role == "old":
                from peft import LoraConfig

                peft = L.peft_model(self.base)
                peft.add_adapter("old", LoraConfig(**{k: v for k, v in peft.peft_config["default"].to_dict().items()
                                                      if k in LoraConfig.__dataclass_fields__}))
                self._copy_adapter("default", "old")
                peft.set_adapter("default")
                self.adapters.add("old")
            return  # ref under LoRA = adapters disabled
        dtype = self.frozen_dtype if role == "ref" else None  # velocity() feeds a copy inputs in its dtype
        self.copies[role] = copy_in_dtype(self.adapter.transformer, dtype).requires_grad_(False).eval()

    def add_module(self, name: str, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        self.modules[name] = module
        return [p for p in module.parameters() if p.requires_grad]

    def add_ema(self, params, decay: float, every: int) -> None:
        self.ema = L.EMA(params, decay=decay, every=every)

    # ---- the one door ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, role: str = "policy") -> Iterator[torch.nn.Module]:
        """The module that computes `role`'s velocity inside the block."""
        net = self.net if self.net is not None else self.adapter.transformer
        if role == "policy":
            yield net
        elif role == "ref" and self.use_lora:
            with L.adapters_disabled(self.base):
                yield net
        elif role == "old" and self.use_lora:
            peft = L.peft_model(self.base)
            trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
            peft.set_adapter("old")
            try:
                yield net
            finally:
                peft.set_adapter("default")
                for n, p in peft.named_parameters():  # peft's set_adapter also flips requires_grad
                    p.requires_grad_(n in trainable)
        elif role == "ema":
            with self.ema_weights():
                yield net
        elif role in self.copies:
            yield self.copies[role]
        else:
            raise ValueError(f"role '{role}' does not exist in this run (have: policy"
                             f"{', ref' if self.use_lora else ''}{''.join(', ' + r for r in self.copies)}"
                             f"{', ema' if self.ema else ''})")

    def velocity(self, z: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings, role: str = "policy",
                 guidance: float = 1.0, detach_uncond: bool = False) -> torch.Tensor:
        """v_role(z, sigma, text); with guidance != 1 the CFG velocity from one batched [uncond; cond] forward."""
        with self.use(role) as net:
            def velocity(z, sigma, text):
                return self.adapter.velocity(z, sigma, text, net)

            if guidance == 1.0:
                return velocity(z, sigma, text)
            return cfg_velocity(velocity, z, sigma, text, self.adapter.null_embeddings(), guidance, detach_uncond)

    # ---- weights moving between roles -----------------------------------------------------------------------
    @torch.no_grad()
    def soft_update(self, role: str, decay: float) -> None:
        """target <- decay * target + (1 - decay) * policy (DiffusionNFT's old policy)."""
        if self.use_lora:
            self._copy_adapter("default", role, decay)
            return
        target = self.copies[role]
        for t, p in zip(target.parameters(), self.adapter.transformer.parameters()):
            t.lerp_(p.detach().to(t.dtype), 1.0 - decay)

    def _copy_adapter(self, source: str, target: str, decay: float = 0.0) -> None:
        peft = L.peft_model(self.base)
        named = dict(peft.named_parameters())
        with torch.no_grad():
            for name, p in named.items():
                if f".{source}." in name:
                    q = named[name.replace(f".{source}.", f".{target}.")]
                    q.lerp_(p.detach(), 1.0 - decay)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The policy's trained weights as detached CPU copies: the LoRA adapter "default" (peft names) under LoRA,
        the whole transformer's state dict under full fine-tuning. `load_role` puts one back into a role."""
        if self.use_lora:
            return {n: p.detach().to("cpu", copy=True) for n, p in L.peft_model(self.base).named_parameters()
                    if "lora_" in n and ".default." in n}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.adapter.transformer.state_dict().items()}

    @torch.no_grad()
    def load_role(self, role: str, state: dict[str, torch.Tensor]) -> None:
        """Make `role` ("old": a second adapter, or a frozen copy) compute with a `snapshot()` of the policy."""
        if self.use_lora:
            if role not in self.adapters:
                raise ValueError(f"role '{role}' is not a LoRA adapter of this run (have: {sorted(self.adapters)})")
            named = dict(L.peft_model(self.base).named_parameters())
            for name, value in state.items():
                named[name.replace(".default.", f".{role}.")].copy_(value)
            return
        if role not in self.copies:
            raise ValueError(f"role '{role}' has no frozen copy in this run (have: {sorted(self.copies)})")
        self.copies[role].load_state_dict(state)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Evaluate (and export) with the EMA weights inside the block, when the method keeps an EMA."""
        with (self.ema.swap() if self.ema is not None else contextlib.nullcontext()):
            yield

    def export_transformer(self) -> torch.nn.Module:
        """A plain diffusers transformer with what evaluation uses (EMA when kept, LoRA merged)."""
        with self.ema_weights():
            return L.merged_copy(self.base) if self.use_lora else copy.deepcopy(self.adapter.transformer)

    # ---- state for resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"ema": self.ema.state_dict() if self.ema is not None else None,
                 "modules": {n: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                             for n, m in self.modules.items()}}
        if self.use_lora:
            peft = L.peft_model(self.base)
            state["lora"] = {n: p.detach().cpu().clone() for n, p in peft.named_parameters() if "lora_" in n}
        elif self.ema is not None:  # a checkpoint's transformer holds the EMA weights: keep the live ones here
            state["policy"] = {k: v.detach().cpu().clone() for k, v in self.adapter.transformer.state_dict().items()}
        state["copies"] = {r: {k: v.detach().cpu() for k, v in m.state_dict().items()} for r, m in self.copies.items()
                           if r != "ref"}  # ref never changes: rebuilt from the base
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            if self.use_lora and state.get("lora"):
                named = dict(L.peft_model(self.base).named_parameters())
                for n, v in state["lora"].items():
                    named[n].copy_(v)
            if state.get("policy") is not None:
                self.adapter.transformer.load_state_dict(state["policy"])
            for r, sd in state.get("copies", {}).items():
                self.copies[r].load_state_dict(sd)
            for n, sd in state.get("modules", {}).items():
                self.modules[n].load_state_dict(sd)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
