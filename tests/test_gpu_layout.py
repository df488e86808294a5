"""Which GPU each process gets on a node (no GPU needed: Ray's start is intercepted, the node's GPUs are named).

Ray hands out GPU ids lowest first; a local Ray that sees the trainer's GPU gives it to the first actor.  For the
BAGEL recipe (4 ranks + 3 workers on 8 GPUs) that put learner rank 0 beside the trainer on GPU 0 (91 GB on an
80 GB card) while GPU 7 stayed idle."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import cli_one_line_error

from r3_rl.config import load_recipe
from r3_rl.gpu_layout import actor_gpus, actor_recipe_data, gpus_for_local_ray, gpus_to_place

EIGHT = [str(i) for i in range(8)]


def _recipe(repo: Path, name: str, *sets: str):
    return load_recipe(repo / "recipes" / name, list(sets))


def test_a_spare_gpu_keeps_the_trainer_alone_and_a_full_node_shares(repo: Path) -> None:
    bagel = _recipe(repo, "grpo_geneval_bagel.yaml")
    assert actor_gpus(bagel) == 7
    assert gpus_for_local_ray(bagel, EIGHT) == EIGHT[1:]  # the trainer keeps GPU 0 to itself
    assert gpus_for_local_ray(bagel, ["3", "5", "0", "1", "2", "4", "6", "7"]) == ["5", "0", "1", "2", "4", "6", "7"]
    moved = _recipe(repo, "grpo_geneval_bagel.yaml", "policy.device=cuda:7")
    assert gpus_for_local_ray(moved, EIGHT) == EIGHT[:7]
    janus = _recipe(repo, "grpo_geneval.yaml")  # 4 ranks + 4 workers: no spare, the trainer shares (plan: worst case)
    assert actor_gpus(janus) == 8 and gpus_for_local_ray(janus, EIGHT) is None
    assert gpus_for_local_ray(janus, EIGHT + ["8"]) == EIGHT[1:] + ["8"]
    joined = _recipe(repo, "grpo_geneval_bagel.yaml", "ray.address=auto")  # a cluster is as `ray start` made it
    assert gpus_for_local_ray(joined, EIGHT) is None
    assert gpus_for_local_ray(_recipe(repo, "tiny_blocks.yaml"), EIGHT) is None  # on CPU
    reward_gpus = _recipe(repo, "grpo_geneval_bagel.yaml", "rollout.reward_workers=2",
                          "rollout.gpus_per_reward_worker=0.5")
    assert actor_gpus(reward_gpus) == 8 and gpus_for_local_ray(reward_gpus, EIGHT) is None


def test_gpu_shares_are_packed_as_ray_places_them(repo: Path) -> None:
    """Ray gives a share below 1 a part of one GPU, actor by actor as they are created: three workers of 0.6 need
    three GPUs, not the 2 their sum rounds up to (the third would wait forever); two of 0.3 created before two of
    0.7 leave the 0.7s a GPU each (3, where packing largest first says 2); shares that divide 1 pack; kinds that
    fit together share a GPU in any order; whole shares add."""
    assert gpus_to_place([(3, 0.6)]) == 3
    assert gpus_to_place([(4, 0.5)]) == 2 and gpus_to_place([(5, 0.25)]) == 2
    assert gpus_to_place([(2, 0.3), (2, 0.7)]) == 3
    assert gpus_to_place([(1, 0.5), (1, 0.5)]) == 1 and gpus_to_place([(2, 0.5), (4, 0.25)]) == 2
    assert gpus_to_place([(1, 2), (1, 1), (1, 0.5)]) == 4 and gpus_to_place([(2, 0)]) == 0 and gpus_to_place([]) == 0
    from r3_rl.doctor.gpu import needed_gpus_here

    packed = _recipe(repo, "grpo_geneval.yaml", "learner.ranks=1", "rollout.workers=3", "rollout.gpus_per_worker=0.6")
    assert actor_gpus(packed) == 3 and needed_gpus_here(packed)[0] == 3  # the doctor counted ceil(1.8) = 2
    shared = _recipe(repo, "grpo_geneval.yaml", "learner.ranks=1", "rollout.workers=1", "rollout.gpus_per_worker=0.5",
                     "rollout.reward_workers=1", "rollout.gpus_per_reward_worker=0.5")
    assert actor_gpus(shared) == 1  # a worker and a reward worker share one GPU (the plan counted one each)
    mixed = _recipe(repo, "grpo_geneval.yaml", "learner.ranks=1", "rollout.workers=2", "rollout.gpus_per_worker=0.7",
                    "rollout.reward_workers=2", "rollout.gpus_per_reward_worker=0.3")
    assert actor_gpus(mixed) == 3


def test_the_local_ray_starts_without_the_trainers_gpu(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from r3_rl.ray_runtime import start_ray

    seen: dict = {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(EIGHT))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw, visible=os.environ["CUDA_VISIBLE_DEVICES"]))
    recipe = _recipe(repo, "grpo_geneval_bagel.yaml")
    assert start_ray(recipe.ray, gpus_for_local_ray(recipe))
    assert seen["num_gpus"] == 7 and seen["visible"] == "1,2,3,4,5,6,7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(EIGHT)  # the trainer's own view is unchanged
    seen.clear()
    janus = _recipe(repo, "grpo_geneval.yaml")
    assert start_ray(janus.ray, gpus_for_local_ray(janus))
    assert "num_gpus" not in seen and seen["visible"] == ",".join(EIGHT)


def test_actors_build_on_their_own_first_gpu(repo: Path) -> None:
    """Inside an actor Ray numbers its GPUs from 0: ``cuda:3`` there is an invalid ordinal."""
    recipe = _recipe(repo, "grpo_geneval.yaml", "policy.device=cuda:3")
    assert actor_recipe_data(recipe)["policy"]["device"] == "cuda"
    assert recipe.policy.device == "cuda:3"


@pytest.mark.parametrize("setting, key", [("learner.gpus_per_rank=0", "learner.gpus_per_rank"),
                                          ("learner.gpus_per_rank=0.5", "learner.gpus_per_rank"),
                                          ("rollout.gpus_per_worker=0", "rollout.gpus_per_worker")])
def test_gpu_shares_that_put_two_processes_on_gpu_0_are_refused(repo: Path, capsys: pytest.CaptureFixture,
                                                                setting: str, key: str) -> None:
    """0 GPUs: Ray sets no CUDA_VISIBLE_DEVICES and every actor builds on GPU 0; half a GPU: two NCCL ranks on one
    GPU ("Duplicate GPU detected").  One line, exit 2, before anything loads."""
    line = cli_one_line_error(["train", str(repo / "recipes" / "grpo_geneval.yaml"), "--set", setting], capsys)
    assert f"key '{key}'" in line and "grpo_geneval.yaml" in line


DEVICE_REWARD = '''
import os

def visible(samples):
    return [float(os.environ.get("CUDA_VISIBLE_DEVICES", "unset") == "") for _ in samples]
'''


def test_reward_actors_without_a_gpu_share_see_no_gpu(tmp_path: Path, ray_session,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A reward actor asks Ray for no GPU, so Ray leaves it the node's CUDA_VISIBLE_DEVICES: GenEval's detector on
    device ``auto`` would load onto GPU 0.  Now it sees none."""
    import numpy as np

    from r3_rl.rewards.base import RewardSample
    from r3_rl.rollout.ray_rewards import RayRewardSet

    path = tmp_path / "where.py"
    path.write_text(DEVICE_REWARD)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what a GPU node's actors would inherit
    rewards = RayRewardSet([{"name": f"{path}:visible"}], workers=1, threads=1, log_event=lambda e: None)
    try:
        sample = RewardSample(prompt="p", metadata={}, stage="generate", round=0, image=np.zeros((4, 4, 3), np.uint8))
        assert [s.total for s in rewards.score([sample])] == [1.0]
    finally:
        rewards.close()
