"""ZeRO-3 in the trainer process with Ray rollout: workers receive the gathered weights, never empty shards.

Under ZeRO-3 every parameter of the policy is a shard of shape (0,) outside DeepSpeed's hooks; on main
``RayEngine.sync`` shipped exactly those.  ``Policy.state_dict`` now gathers them (and copies them to CPU)
before anything leaves the process.  The check is behavioural: after a ZeRO-3 update the Ray worker's
recorded log-probs are the *updated* policy's (ratio 1 under the new weights), not the initial one's.
"""
from __future__ import annotations

import pytest
import torch
from conftest import REPO, tiny_overrides

pytest.importorskip("deepspeed")

from r3_rl.config import load_recipe  # noqa: E402
from r3_rl.policy.registry import build_policy  # noqa: E402
from r3_rl.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_session")


def test_ray_worker_samples_with_the_weights_of_a_zero3_update(tmp_path) -> None:
    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + [
        "rollout.backend=ray", "rollout.workers=1", "learner.backend=deepspeed", "learner.deepspeed.zero_stage=3",
        "learner.lr=1e-2", "learner.micro_batch_size=4", "threads=1"])
    trainer = Trainer(recipe, tmp_path / "run")
    try:
        assert all(p.numel() == 0 for p in trainer.policy.model.parameters())  # partitioned by ZeRO-3
        initial = trainer.policy.state_dict()  # gathered
        trees = trainer.rollout(0)  # starts the Ray worker with the gathered weights
        items, _, _ = trainer.algorithm.batch(trees, trainer.policy.version)
        assert trainer.learner.step(items)["learner/optimizer_steps"] == 1.0
        trainer.policy.version += 1
        trainer.engine.sync(trainer.policy)
        updated = trainer.policy.state_dict()
        assert updated.keys() == initial.keys()
        assert all(v.shape == initial[k].shape and v.numel() > 0 for k, v in updated.items())
        assert not torch.equal(updated["model.norm.weight"], initial["model.norm.weight"])

        nodes = [n for tree in trainer.rollout(1) for n in tree.nodes.values()
                 if n.segment is not None and n.segment.token_ids]
        assert nodes and all(n.policy_version == 1 for n in nodes)
        segs = [n.segment for n in nodes]
        before = build_policy(recipe)
        before.load_state_dict(initial)
        with torch.no_grad():
            now, then = trainer.policy.segment_logprobs(segs), before.segment_logprobs(segs)
        for seg, lp in zip(segs, now):  # the worker sampled with exactly the updated weights
            torch.testing.assert_close(lp, torch.tensor(seg.logprobs), atol=1e-4, rtol=0)
        assert max(float((a - b).abs().max()) for a, b in zip(now, then)) > 1e-2  # and those differ from the start
    finally:
        trainer.close()


def test_the_trainer_samples_under_zero3_with_weights_gathered_once_and_no_hooks(tmp_path) -> None:
    """In-process sampling (local rollout, evals, logged chains) under single-rank ZeRO-3 gathers the policy's
    weights once and takes DeepSpeed's per-call hooks off, as TRL's ``unwrap_model_for_generation`` does: with
    the hooks on, every token's forward fetched and released each module's shard, and the tiny recipe's step after
    the first updates spent 38 s in that bookkeeping (0.2 s now).  Inside: whole weights, no hooks; after: shards and
    hooks again, and the learner recomputes exactly the log-probs the rollout recorded (ratio 1)."""
    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + [
        "learner.backend=deepspeed", "learner.deepspeed.zero_stage=3", "learner.micro_batch_size=4", "threads=1"])
    trainer = Trainer(recipe, tmp_path / "run")
    try:
        offload = trainer.learner.optim.engine.optimizer.parameter_offload
        hooks = len(offload.forward_hooks)
        assert hooks and all(p.numel() == 0 for p in trainer.policy.model.parameters())
        with trainer.sampling_weights():
            assert offload.forward_hooks == [] and all(p.numel() > 0 for p in trainer.policy.model.parameters())
        assert len(offload.forward_hooks) == hooks and all(p.numel() == 0 for p in trainer.policy.model.parameters())
        for step in range(2):  # the second rollout follows an update, where the hooks had re-recorded their trace
            trees = trainer.rollout(step)
            items, _, _ = trainer.algorithm.batch(trees, trainer.policy.version)
            segs = [it.segment for it in items]
            with torch.no_grad():
                for seg, lp in zip(segs, trainer.policy.segment_logprobs(segs)):  # through the hooks, shard by shard
                    torch.testing.assert_close(lp, torch.tensor(seg.logprobs), atol=1e-5, rtol=0)
            trainer.learner.step(items)
            trainer.policy.version += 1
    finally:
        trainer.close()
