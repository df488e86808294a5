"""PPO on a tiny Janus: the critic reads the policy's own hidden states, image features included.

On main ``learner.algorithm: ppo`` stopped with a UserError on Janus (no top-level ``hidden_size``) and its
critic read the raw backbone on ``input_ids``, blind to the image a critique or a refinement looks at.
Peer check for :meth:`JanusPolicy.value_features`: ``lm_head`` on the feature of a reflect segment gives
the very log-prob the sampler recorded for its first token (the sampler saw the image through SigLIP).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_janus_policy import TEMPLATES
from test_learner_reference import janus_items

from r3_rl.config import Learner
from r3_rl.learner.build import build_learner
from r3_rl.learner.ppo_learner import PPO, ChainItem
from r3_rl.policy.janus import JanusPolicy
from r3_rl.policy.janus_tiny import make_tiny_janus
from r3_rl.policy.sampling import sampling_logprobs


@pytest.fixture(scope="module")
def janus_path(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    return make_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny")


@pytest.fixture(scope="module")
def episodes(janus_path):
    """Two R3 chains of four stages (plan -> image -> critique -> refined image) with stage rewards."""
    by_stage = janus_items(JanusPolicy.from_pretrained(janus_path, templates=TEMPLATES))  # stage-major, 2 prompts
    return [ChainItem(**{f.name: getattr(by_stage[2 * t + e], f.name) for f in dataclasses.fields(by_stage[0])},
                      reward=[0.1, 0.7, 0.1, -0.3][t] * (e + 1), episode=f"e{e}", t=t)
            for e in range(2) for t in range(4)]


def test_critic_features_are_the_state_the_policy_sampled_from(janus_path, episodes) -> None:
    policy = JanusPolicy.from_pretrained(janus_path, templates=TEMPLATES)
    reflect = [it.segment for it in episodes if it.stage == "reflect"]
    with torch.no_grad():
        feats = policy.value_features(reflect)
        assert feats.shape == (2, policy.feature_size)
        for seg, f in zip(reflect, feats):
            lp = sampling_logprobs(policy.model.lm_head(f).float(), seg.sampling, policy.text_mask)
            assert float(lp[seg.token_ids[0]]) == pytest.approx(seg.logprobs[0], abs=1e-5)
        # the same context with another image is another state
        other = copy.deepcopy(reflect[0])
        other.context["image"] = reflect[1].context["image"]
        assert float((policy.value_features([other])[0] - feats[0]).abs().max()) > 1e-4


@pytest.mark.parametrize("critic", ["head", "separate"])
def test_ppo_trains_two_steps_on_tiny_janus(janus_path, episodes, critic) -> None:
    policy = JanusPolicy.from_pretrained(janus_path, templates=TEMPLATES)
    cfg = Learner(algorithm="ppo", lr=1e-3, micro_batch_size=4, kl_coef_text=0.01, kl_coef_image=0.01,
                  ppo={"critic": critic, "vf_coef": 1.0})
    learner = build_learner(policy, policy.frozen_copy(), type("R", (), {"learner": cfg}))
    assert isinstance(learner.algorithm, PPO)
    if critic == "separate":  # a copy of the policy's module that trains what the policy trains
        body = learner.modules["critic"]
        assert body is not policy.model and not any(p.requires_grad for p in body.model.vision_model.parameters())
        assert any(p.requires_grad for p in body.model.language_model.parameters())
    returns = learner.algorithm.prepare(learner.models, copy.deepcopy(episodes))["returns"]
    before = learner.algorithm.values(learner.models, episodes).detach()
    lm_head = policy.model.lm_head.weight.detach().clone()
    for _ in range(2):
        m = learner.step(copy.deepcopy(episodes))
        assert m["learner/optimizer_steps"] == 1.0 and math.isfinite(m["learner/value_loss"])
        assert math.isfinite(m["learner/loss"]) and math.isfinite(m["learner/kl_mean"])
    after = learner.algorithm.values(learner.models, episodes).detach()
    assert float(((after - returns) ** 2).mean()) < float(((before - returns) ** 2).mean())
    assert not torch.equal(policy.model.lm_head.weight, lm_head)


CUSTOM = '''
def brightness(samples):
    return [float(s.image.mean()) / 255.0 for s in samples]
'''


def test_ppo_recipe_trains_on_tiny_janus_from_the_command_line(repo: Path, tmp_path: Path) -> None:
    """``r3-rl train recipes/grpo_geneval.yaml --set learner.algorithm=ppo`` on a tiny Janus, in-process."""
    from r3_rl.cli import main

    janus = make_tiny_janus(tmp_path / "janus")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"tag": "single_object", "include": [{"class": c, "count": 1}],
                                        "prompt": f"a photo of a {c}"}) + "\n" for c in ("cat", "dog")))
    (tmp_path / "my_reward.py").write_text(CUSTOM)
    reward = yaml.safe_dump([{"name": f"{tmp_path / 'my_reward.py'}:brightness"}], default_flow_style=True).strip()
    sets = [f"policy.model={janus}", "policy.device=cpu", "policy.dtype=float32", f"out_dir={tmp_path}", "steps=2",
            f"data.train={data}", f"data.eval={data}", "data.eval_size=2", "tree.group_size=2",
            "tree.prompts_per_step=1", "tree.refine_groups_per_step=1", "rollout.backend=local",
            "rollout.reason.max_new_tokens=4", "rollout.reflect.max_new_tokens=4", "eval.rounds=1", "eval.dump=0",
            "learner.algorithm=ppo", "learner.backend=torch", "learner.ranks=1", "learner.deepspeed.dtype=fp32",
            "learner.micro_batch_size=4", "log.trajectories_every=0", "log.console=false", "threads=1",
            f"rewards.task={reward}", f"rewards.eval={reward}"]
    run = tmp_path / "run"
    argv = ["train", str(repo / "recipes" / "grpo_geneval.yaml"), "--run-dir", str(run)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "learner/loss" in r]
    assert [r["step"] for r in steps] == [0, 1]
    assert all(math.isfinite(r["learner/loss"]) and math.isfinite(r["learner/value_loss"]) for r in steps)
