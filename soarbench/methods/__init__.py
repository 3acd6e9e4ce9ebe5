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


def method_info(name: str) -> dict[str, Any]:
    """What `soarbench methods list/show` prints of a method: its paper (arXiv id), whether it is reconstructed
    (no public code: our reading of the paper), its reference code, what it trains on, its summary line and its
    options (name -> type, default, meaning) from the constructor signature the config check reads."""
    import inspect
    import re
    import sys

    from soarbench import config as C

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
                        "meaning": _option_meaning(key, doc)}
    return {"name": name, "class": f"{cls.__module__}:{cls.__name__}", "version": str(cls.version),
            "paper": f"arXiv {paper.group(1)}" if paper else "-", "reconstructed": reconstructed,
            "source": "none public (reconstructed)" if reconstructed else (code.group(1) if code else "-"),
            "trains_on": cls.source, "summary": doc.split("\n\n")[0].replace("\n", " ") if doc else "",
            "options": options}


def _option_meaning(key: str, doc: str) -> str:
    """The module docstring's first line naming the option (as `key` or key = ...); '' when it says nothing."""
    import re

    for line in doc.splitlines():
        if re.search(rf"`{re.escape(key)}`|\b{re.escape(key)}\s*[=(:]", line):
            return " ".join(line.split()).lstrip("-0123456789. ")
    return ""
