"""r3_rl.learner: from scored trees to weight updates.

* :mod:`~r3_rl.learner.algorithm` -- the ``Algorithm`` plug-in contract and GRPO; :mod:`~r3_rl.learner.registry`
  -- algorithms by name (``learner.algorithm``)
* :mod:`~r3_rl.learner.batch` -- sibling-group advantages, no-signal groups, staleness -> ``TrainItem`` s
* :mod:`~r3_rl.learner.actions` -- per-action log-probs of a micro-batch (tokens or any other action)
* :mod:`~r3_rl.learner.torch_learner` -- the learner around any algorithm (micro-batches, epochs, non-finite skips)
* :mod:`~r3_rl.learner.ppo_learner` -- PPO: stage chains, stage rewards, GAE, value critic
* :mod:`~r3_rl.learner.optim` / :mod:`~r3_rl.learner.deepspeed_learner` -- optimiser drivers (torch, DeepSpeed)
* :mod:`~r3_rl.learner.precision` -- compute dtype checks, fp32 master weights
* :mod:`~r3_rl.learner.lora` -- peft LoRA, reference = adapters disabled, merged export
* :mod:`~r3_rl.learner.checkpoint` -- atomic checkpoints of every part, exact resume
* :mod:`~r3_rl.learner.build` -- in-process learner or data-parallel ranks (:mod:`~r3_rl.learner.ray_ranks`)
"""
