"""The smallest run of every registered method, declared once: the contract (meter == plan), distributed (two
processes == one) and resume (SIGKILL, bit-exact) tests all train these [method] options. A new method adds its line
here; a test that needs something else says so with its own overrides beside its reason."""
from __future__ import annotations

_LORA = {"lora_r": 4, "lora_alpha": 8}
_GROUPS = {"group_size": 2, "batch_size": 4, **_LORA, "rewards": {"test_brightness": 1.0}}

MICRO_RUNS = {
    "sft": {},
    "soar": {"trajectory_length": 2},
    "flow_grpo": {**_GROUPS, "num_steps": 3, "ema_every": 1},
    "direct_align": {"num_steps": 2, "guidance": 2.0, "rewards": {"shapes_soft": 1.0}},
    "srpo": {"num_steps": 2, "train_guidance": 2.0, "rewards": {"test_embed": 1.0}},
    "diffusion_nft": {**_GROUPS, "num_steps": 3},
    "dance_grpo": {**_GROUPS, "num_steps": 4},
    # one value pre-training epoch, then PPO epochs: both phases (and the value head) in every test
    "actor_critic": {**_GROUPS, "num_steps": 3, "ema_every": 1, "optimizer_steps_per_epoch": 1,
                     "value_pretrain_units": 1},
    "seppo": {"num_steps": 2, "guidance": 2.0, "pool_every": 1, "pool_size": 2, **_LORA},
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def method_options(name: str, **overrides) -> dict:
    return {**MICRO_RUNS[name], **overrides}


def method_toml(name: str, **overrides) -> str:
    """The [method] table's body of the micro run (with `overrides`), as a config file writes it."""
    options = method_options(name, **overrides)
    return "\n".join([f'name = "{name}"'] + [f"{k} = {_toml_value(v)}" for k, v in options.items()])
