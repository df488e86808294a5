"""r3_rl.learner: from scored trees to weight updates.

* :mod:`~r3_rl.learner.batch` -- sibling-group advantages, no-signal groups, staleness -> ``TrainItem`` s
* :mod:`~r3_rl.learner.torch_learner` -- the GRPO learner (micro-batches, epochs, non-finite skips)
* :mod:`~r3_rl.learner.ppo_learner` -- PPO: stage chains, stage rewards, GAE, value critic
* :mod:`~r3_rl.learner.optim` / :mod:`~r3_rl.learner.deepspeed_learner` -- optimiser drivers (torch, DeepSpeed)
* :mod:`~r3_rl.learner.lora` -- peft LoRA, reference = adapters disabled
* :mod:`~r3_rl.learner.checkpoint` -- atomic checkpoints and exact resume
* :mod:`~r3_rl.learner.build` -- what the trainer calls: ``build_learner``, ``prepare_batch``
"""
