"""Building blocks of reward-based post-training (Flow-GRPO, arXiv 2505.05470; reference code yifan123/flow_grpo).

Each module is pure and separately tested; the method (soarbench.methods) composes them:

  rollout     SDE rollouts that record every state and per-step log-probability, and the log-probability of a
              recorded step recomputed with gradient (the PPO ratio's numerator)
  advantages  group-relative advantages and the mask of groups that carry no signal
  ppo         the clipped policy loss and the KL penalty to the reference policy
  rewards     a weighted sum of registered metrics as the training reward, with call counting
  lora        LoRA on the SD3 transformer (peft), the reference policy with adapters off, EMA weights

Submodules are imported on demand so that `import soarbench.rl` stays light (peft loads only with `lora`).
"""
