"""``learner.stage_weights``: a per-stage weight on the policy term (not the KL), for token rows and flow rows.

For a weight ``w >= 0`` the clipped surrogate is linear in it: ``min(r * wA, clip(r) * wA) = w * min(rA, clip(r)A)``.
So weighing a stage by ``w`` must give exactly the loss and gradient of the unweighted loss with that stage's
advantages multiplied by ``w`` -- checked against Flow-GRPO's formulas (``flow_grpo_reference``, which never calls
our code) for flow rows and against :func:`clipped_policy_loss` for token rows.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_flow_learner import StubFlowPolicy, case, grpo
from test_flow_losses import flow_grpo_reference

from r3_rl.algorithms.losses import clipped_policy_loss
from r3_rl.learner.algorithm import LearnerModels
from r3_rl.learner.batch import TrainItem
from r3_rl.trajectory import Segment

STAGES = ["generate", "refine", "refine", "generate"]


def test_flow_stage_weights_equal_flow_grpo_with_scaled_advantages():
    policy, reference, items, (new, old, adv, mean, mean_ref, eta) = case()
    for it, stage in zip(items, STAGES):
        it.stage = stage
    models = LearnerModels(policy, reference)
    flow = {"clip_low": 1e-4, "kl_kind": "flow_grpo", "adv_clip": None}
    algo = grpo(loss_weight_image=2.0, stage_weights={"refine": 3.0, "reason": 5.0}, flow=flow)
    loss, _, _ = algo.loss(models, items, range(4), range(4), algo.prepare(models, items))
    w = torch.tensor([2.0 * (3.0 if s == "refine" else 1.0) for s in STAGES], dtype=adv.dtype)
    eta5 = eta.view(4, 3, 1, 1, 1)
    pg = flow_grpo_reference(new, old, adv * w, mean, mean_ref, eta5, clip_range=1e-4, adv_clip_max=1e9, beta=0)
    both = flow_grpo_reference(new, old, adv, mean, mean_ref, eta5, clip_range=1e-4, adv_clip_max=1e9, beta=0.04)
    unweighted = flow_grpo_reference(new, old, adv, mean, mean_ref, eta5, clip_range=1e-4, adv_clip_max=1e9, beta=0)
    expected = pg + (both - unweighted)  # the stage weight, like the modality weight, leaves the KL alone
    (g_ours,) = torch.autograd.grad(loss, new)
    (g_expected,) = torch.autograd.grad(expected, new)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-13)
    assert torch.allclose(g_ours, g_expected, atol=1e-13, rtol=0)
    plain = grpo(loss_weight_image=2.0, flow=flow)
    unweighted_ours, _, _ = plain.loss(models, items, range(4), range(4), plain.prepare(models, items))
    assert abs(loss.item() - unweighted_ours.item()) > 1e-6  # the weights do change this loss


def test_flow_stage_weights_per_image_ratio_unit():
    """One ratio per image: the weight is the image's, so it equals scaling that image's advantage."""
    policy, reference, items, _ = case()
    for it, stage in zip(items, STAGES):
        it.stage = stage
    models = LearnerModels(policy, reference)
    flow = {"clip_low": 1e-4, "ratio_unit": "image", "adv_clip": None}
    weighted = grpo(stage_weights={"refine": 0.25}, flow=flow)
    loss, _, _ = weighted.loss(models, items, range(4), range(4), weighted.prepare(models, items))
    scaled = [TrainItem(it.segment, it.advantage * (0.25 if it.stage == "refine" else 1.0), it.stage, 0)
              for it in items]
    plain = grpo(kl_coef_image=0.0, flow=flow)
    pg, _, _ = plain.loss(models, scaled, range(4), range(4), plain.prepare(models, scaled))
    kl_only = grpo(flow=flow)
    zero_adv = [TrainItem(it.segment, 0.0, it.stage, 0) for it in items]
    kl, _, _ = kl_only.loss(models, zero_adv, range(4), range(4), kl_only.prepare(models, zero_adv))
    assert loss.item() == pytest.approx(pg.item() + kl.item(), abs=1e-13)


def test_token_stage_weights_scale_each_stage_and_zero_removes_its_gradient():
    g = torch.Generator().manual_seed(3)
    old = -1.0 + 0.1 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    new = (old + 0.05 * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    policy = StubFlowPolicy(None, None, None, None, token_logp=new)
    stages, adv = ["reason", "reflect", "reflect"], [1.0, -0.5, 2.0]
    items = [TrainItem(Segment("text", {"row": r}, [7] * 4, old[r].tolist()), a, s, 0)
             for r, (s, a) in enumerate(zip(stages, adv))]
    models = LearnerModels(policy, None)
    algo = grpo(kl_coef_image=0.0, stage_weights={"reflect": 3.0})
    loss, _, _ = algo.loss(models, items, range(3), range(3), algo.prepare(models, items))
    mask = torch.ones(3, 4, dtype=torch.long)
    scaled = torch.tensor([1.0, -1.5, 6.0], dtype=torch.float64)
    expected, _ = clipped_policy_loss(new, old.float().double(), scaled, mask)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)

    algo = grpo(kl_coef_image=0.0, stage_weights={"reflect": 0.0})
    loss, _, _ = algo.loss(models, items, range(3), range(3), algo.prepare(models, items))
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[1:].abs().max().item() == 0.0 and grad[0].abs().max().item() > 0


@pytest.mark.parametrize("value, message", [
    ("learner.stage_weights.reflekt=2", "unknown stage 'reflekt' (did you mean 'reflect'?)"),
    ("learner.stage_weights.refine=-1", "stage 'refine': expected a finite weight >= 0, got -1"),
    ("learner.stage_weights=2", "must be a mapping of stage -> weight"),
])
def test_bad_stage_weights_are_one_line_errors_before_any_model_work(tmp_path, value, message):
    proc = subprocess.run([sys.executable, "-m", "r3_rl.cli", "train", "recipes/tiny_blocks.yaml", "--run-dir",
                           str(tmp_path / "run"), "--set", value], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "recipes/tiny_blocks.yaml" in lines[0] and "learner.stage_weights" in lines[0]
    assert message in lines[0]
    assert not (tmp_path / "run").exists()
