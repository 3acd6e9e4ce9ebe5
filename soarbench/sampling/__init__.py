"""Samplers: the Euler ODE sampler with CFG (evaluation) and the shared SDE step (SOAR paths, Flow-GRPO)."""
