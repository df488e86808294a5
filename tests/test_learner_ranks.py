"""Learner ranks on Ray actors: 2 DeepSpeed ranks (gloo, CPU) give the one-rank update, and resume exactly."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from learner_helpers import sample_items, weights

pytest.importorskip("deepspeed")

from r3_rl.config import load_recipe  # noqa: E402
from r3_rl.errors import UserError  # noqa: E402
from r3_rl.learner.build import build_learner  # noqa: E402
from r3_rl.learner.ray_ranks import RankedLearner  # noqa: E402
from r3_rl.policy.registry import build_policy  # noqa: E402
from r3_rl.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_session")
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_blocks.yaml"
LEARNER = ["learner.backend=deepspeed", "learner.micro_batch_size=2", "learner.lr=1e-2", "learner.kl_coef_text=0.05",
           "learner.kl_coef_image=0.1", "learner.warmup_steps=0"]


def _recipe(tmp_path: Path, *extra: str):
    return load_recipe(RECIPE, tiny_overrides(tmp_path) + LEARNER + list(extra))


def test_two_ranks_give_the_one_rank_update(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "learner.ranks=2")
    one_recipe = _recipe(tmp_path, "learner.backend=torch")
    mirror, single = build_policy(recipe), build_policy(one_recipe)
    assert all(torch.equal(a, b) for a, b in zip(weights(mirror).values(), weights(single).values()))
    items = sample_items(single)  # 6 items, 3 micro-batches of 2: rank 0 takes two, rank 1 one + a zero-weight repeat
    ranked = build_learner(mirror, mirror.frozen_copy(), recipe)
    assert isinstance(ranked, RankedLearner) and len(ranked.ranks) == 2
    one = build_learner(single, single.frozen_copy(), one_recipe)
    try:
        for step in range(2):
            m2 = ranked.step(copy.deepcopy(items))
            m1 = one.step(copy.deepcopy(items))
            assert m2["learner/optimizer_steps"] == 1.0
            assert math.isclose(m2["learner/loss"], m1["learner/loss"], rel_tol=1e-4, abs_tol=1e-6), step
            assert math.isclose(m2["learner/grad_norm"], m1["learner/grad_norm"], rel_tol=1e-4), step
            for k, v in weights(single).items():  # the mirror holds rank 0's weights after every update
                torch.testing.assert_close(weights(mirror)[k], v, rtol=1e-4, atol=1e-5, msg=f"step {step}: {k}")
        # a non-finite loss on one rank's micro-batch: every rank skips, nothing moves, no hang
        before = weights(mirror)
        bad = copy.deepcopy(items)
        bad[2].segment.logprobs[0] = math.nan  # micro-batch 1: rank 1's only real one
        m = ranked.step(bad)
        assert m["learner/nonfinite_skipped"] == 1.0 and "learner/loss" not in m
        assert all(torch.equal(before[k], v) for k, v in weights(mirror).items())
    finally:
        ranked.close()


def test_two_ranks_train_ppo_and_log_as_one_rank(tmp_path: Path) -> None:
    """PPO over 2 ranks: each rank computes the old values of its own micro-batches only and the ranks add them
    up, so GAE sees the one-rank values; every logged mean is the one-rank mean (3 micro-batches: rank 0 runs
    two, rank 1 one -- the ranks' means are weighted by their micro-batches, not averaged)."""
    ppo = ["learner.algorithm=ppo", "learner.refine_baseline=group", "learner.ppo.critic_lr=1e-2"]
    recipe = _recipe(tmp_path, "learner.ranks=2", *ppo)
    one_recipe = _recipe(tmp_path, "learner.backend=torch", *ppo)
    mirror, single = build_policy(recipe), build_policy(one_recipe)
    items = sample_items(single)
    for i, it in enumerate(items):  # two 3-stage episodes, as tests/test_learner_ppo.py builds them
        it.episode, it.t, it.reward = f"e{i // 3}", i % 3, [0.1, 1.0, 0.0, 0.5, 0.1, -0.2][i]
    ranked = build_learner(mirror, mirror.frozen_copy(), recipe)
    one = build_learner(single, single.frozen_copy(), one_recipe)
    try:
        for step in range(2):
            m2 = ranked.step(copy.deepcopy(items))
            m1 = one.step(copy.deepcopy(items))
            assert m1["learner/value_loss"] > 0 and set(m1) == set(m2)
            for key, value in m1.items():
                assert math.isclose(m2[key], value, rel_tol=1e-4, abs_tol=1e-6), (step, key, m2[key], value)
            for k, v in weights(single).items():
                torch.testing.assert_close(weights(mirror)[k], v, rtol=1e-4, atol=1e-5, msg=f"step {step}: {k}")
    finally:
        ranked.close()


def test_ranked_learner_config_errors(tmp_path: Path) -> None:
    policy = build_policy(_recipe(tmp_path))
    with pytest.raises(UserError, match="need learner.backend: deepspeed"):
        RankedLearner(policy, None, _recipe(tmp_path, "learner.ranks=2", "learner.backend=torch"))
    with pytest.raises(UserError, match="ZeRO-3"):
        RankedLearner(policy, None, _recipe(tmp_path, "learner.ranks=2", "learner.deepspeed.zero_stage=3"))


@pytest.mark.parametrize("extra", [[], ["learner.lora={r: 4, dropout: 0.5}"]], ids=["full", "lora dropout"])
def test_resume_with_two_ranks_is_bit_identical(tmp_path: Path, extra: list[str]) -> None:
    """With LoRA dropout the ranks draw from their own generators: each rank's are in the checkpoint."""
    def run(name: str, steps: int, resume: str | None = None) -> Trainer:
        t = Trainer(load_recipe(RECIPE, tiny_overrides(tmp_path, steps) + LEARNER + [
            "learner.ranks=2", "threads=1", "eval.dump=0", "learner.micro_batch_size=4", *extra]), tmp_path / name)
        if resume:
            t.resume(tmp_path / resume)
        t.train()
        return t

    straight = run("straight", 2)
    run("first", 1)
    resumed = run("second", 2, resume="first/checkpoints/step_000001")
    assert resumed.policy.version == straight.policy.version == 2
    for k, v in weights(straight.policy).items():
        assert torch.equal(weights(resumed.policy)[k], v), k


def test_a_rank_writing_where_the_trainer_cannot_see_is_found(tmp_path: Path) -> None:
    """Ranks write into the trainer's run dir; a rank on a node without that shared folder writes into a folder
    of its own, and the checkpoint was marked complete without its shard (found only at the resume)."""
    from r3_rl.learner.ray_ranks import unseen_files

    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "rank0.pt").write_bytes(b"x" * 10)
    (tmp_path / "learner.pt").write_bytes(b"y" * 3)
    seen_by_rank0 = {"deepspeed/rank0.pt": 10, "learner.pt": 3}
    assert unseen_files(tmp_path, [seen_by_rank0, seen_by_rank0]) == []  # a shared folder: both see everything
    assert unseen_files(tmp_path, [seen_by_rank0, {"deepspeed/rank1.pt": 10}]) == [(1, "deepspeed/rank1.pt")]
    assert unseen_files(tmp_path, [{"learner.pt": 4}]) == [(0, "learner.pt")]  # another file of that name
