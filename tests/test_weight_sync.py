"""Weights to the rollout workers: packed as numpy bytes (no private copies), only the trainable ones after a
learner step (LoRA: the adapters, not the frozen base), and every worker -- a replacement included -- samples
exactly what the trainer's policy samples."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from test_rollout_ray import assert_same_trees, local_trees, step_tasks

from r3_rl.config import load_recipe
from r3_rl.learner.lora import apply_lora
from r3_rl.policy.registry import build_policy
from r3_rl.ray_runtime import pack_state, unpack_state
from r3_rl.rollout.engine import run_ordered
from r3_rl.rollout.tree_rl import stage_sampling


def test_packed_state_round_trips_every_dtype_and_shape_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    state = {"bf16": torch.randn(3, 5, generator=g).bfloat16(), "fp32": torch.randn(4, generator=g),
             "scalar": torch.tensor(2.5), "ids": torch.arange(6).reshape(2, 3), "mask": torch.tensor([True, False]),
             "empty": torch.zeros(0, 7), "strided": torch.randn(4, 6, generator=g).t()}
    back = unpack_state(pack_state(state))
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    with pytest.raises(ValueError, match="not a torch dtype"):
        unpack_state({"w": ("Tensor", (1,), pack_state({"w": torch.ones(1)})["w"][2])})


def test_packed_state_is_the_tensors_own_bytes_and_reads_back_from_ray_without_a_copy(ray_session) -> None:
    """The sender's CPU tensors are viewed, not copied; what a worker reads is a view of the object store
    (read-only numpy), which ``load_state_dict`` copies into the model: no private copy of the weights."""
    w = torch.randn(256, 256).bfloat16()
    _, _, data = pack_state({"w": w})["w"]
    assert data.__array_interface__["data"][0] == w.data_ptr()
    got = ray_session.get(ray_session.put(pack_state({"w": w})))
    assert not got["w"][2].flags.writeable  # a view of Ray's shared memory
    assert torch.equal(unpack_state(got)["w"], w)


@pytest.fixture(scope="module")
def lora_setup(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("peft")
    from r3_rl.rollout.ray_engine import RayEngine

    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path_factory.mktemp("sync")) + [
        "tree.group_size=3", "rollout.groups_per_task=1", "rollout.backend=ray", "rollout.workers=1",
        "rollout.threads_per_worker=1", "learner.lora={r: 4}"])
    policy = build_policy(recipe)
    with torch.no_grad():  # weights a fresh build does not have (a warm start): a worker must load them
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    apply_lora(policy, recipe.learner.lora)  # as the trainer's policy is under LoRA
    events: list[str] = []
    engine = RayEngine(recipe, policy, events.append)
    yield recipe, policy, engine
    engine.close()
    assert engine._full is None and engine._update is None  # a Ray the caller keeps pins no closed run's weights


def _train_adapters(policy, seed: int) -> None:
    """What a learner step does under LoRA: the adapters change, the frozen base does not."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    policy.version += 1


def test_after_a_lora_step_only_the_adapters_travel(lora_setup, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    recipe, policy, engine = lora_setup
    put_bytes: list[int] = []
    real_put = ray.put

    def counting_put(obj, *a, **kw):
        if isinstance(obj, dict):  # packed weights (not the sampling settings a step puts)
            put_bytes.append(sum(data.nbytes for _, _, data in obj.values()))
        return real_put(obj, *a, **kw)
    monkeypatch.setattr(ray, "put", counting_put)
    state = policy.state_dict()
    trainable = sum(v.numel() * v.element_size() for v in policy.trainable_state_dict().values())
    full = sum(v.numel() * v.element_size() for v in state.values())
    assert 0 < trainable < full / 4
    for seed in (1, 2):  # two steps: the second update replaces the first
        _train_adapters(policy, seed)
        engine.sync(policy, trainable_only=True)
    assert put_bytes == [trainable, trainable]
    tasks = step_tasks(recipe, policy, step=4)
    ray_trees = run_ordered(engine, tasks, stage_sampling(recipe))
    assert {n.policy_version for t in ray_trees for n in t.nodes.values() if n.segment is not None} == {
        policy.version}
    assert_same_trees(local_trees(recipe, policy, tasks), ray_trees)

    # a replacement worker loads the last full state, then the adapters since: the same samples again
    for w in list(engine.workers):
        ray.kill(w, no_restart=True)
    again = run_ordered(engine, tasks, stage_sampling(recipe))
    assert engine.restarts >= 1
    assert_same_trees(ray_trees, again)

    engine.sync(policy)  # a full sync (start, resume) puts every weight
    assert put_bytes[-1] == full


def test_a_full_fine_tune_step_still_sends_every_weight(lora_setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainable weights over half the state: one full put, which the replacements load alone; the update is
    sized first, not gathered (under ZeRO-3 that was a whole-model gather and host copy for nothing)."""
    import ray

    recipe, policy, engine = lora_setup
    sizes: list[int] = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda obj, *a, **kw: sizes.append(len(obj)) or real_put(obj, *a, **kw))
    was = {name: p.requires_grad for name, p in policy.model.named_parameters()}
    for p in policy.model.parameters():
        p.requires_grad_(True)
    before = engine._full_id
    monkeypatch.setattr(policy, "trainable_state_dict", lambda: pytest.fail("gathered an update it cannot send"))
    try:
        engine.sync(policy, trainable_only=True)
    finally:
        for name, p in policy.model.named_parameters():
            p.requires_grad_(was[name])
    assert sizes == [len(policy.state_dict())]
    assert engine._full_id == before + 1 and engine._update is None  # a new full state, no update beside it
