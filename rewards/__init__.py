"""Reward functions: plug-in API, registry, built-ins (shipped as r3_rl.rewards)."""
