"""Training methods: one file each, holding its loss and nothing else."""
from __future__ import annotations

from typing import Any

from soarbench.registry import LazyRegistry

METHODS = LazyRegistry("method")
METHODS.add("sft", "soarbench.methods.sft:SFT")
METHODS.add("soar", "soarbench.methods.soar:SOAR")
METHODS.add("flow_grpo", "soarbench.methods.flow_grpo:FlowGRPO")
METHODS.add("direct_align", "soarbench.methods.direct_align:DirectAlign")
METHODS.add("srpo", "soarbench.methods.direct_align:SRPO")
METHODS.add("diffusion_nft", "soarbench.methods.diffusion_nft:DiffusionNFT")
METHODS.add("dance_grpo", "soarbench.methods.dance_grpo:DanceGRPO")
METHODS.add("actor_critic", "soarbench.methods.actor_critic:ActorCritic")
METHODS.add("seppo", "soarbench.methods.seppo:SePPO")


def build_method(name: str, options: dict[str, Any]):
    cls = METHODS.load(name)
    try:
        return cls(**options)
    except TypeError as e:
        from soarbench.errors import UserError

        raise UserError(f"[method] options for '{name}': {e}") from None
