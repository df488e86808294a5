"""The learner path of image actions made of denoising steps (GRPO.loss -> r3_rl.learner.flow_loss).

The policy here is a stub that returns fixed, differentiable tensors for each segment's recorded SDE steps, so the
learner's loss can be compared with Flow-GRPO's formulas re-derived on the same tensors
(:func:`test_flow_losses.flow_grpo_reference`, which never calls our code).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_flow_losses import fixed_case, flow_grpo_reference

from r3_rl.algorithms.losses import clipped_policy_loss
from r3_rl.config import Learner
from r3_rl.flow.action import FLOW_ACTION_KIND, StepScores, is_flow_segment
from r3_rl.learner.algorithm import GRPO, LearnerModels
from r3_rl.learner.batch import TrainItem
from r3_rl.trajectory import Segment


class StubFlowPolicy:
    """Segment ``k`` (``context["row"]``) rescored as row ``k`` of the given tensors; token segments likewise."""

    def __init__(self, logp, mean, std, delta, token_logp=None):
        self.logp, self.mean, self.std, self.delta, self.token_logp = logp, mean, std, delta, token_logp
        self.steps = {}  # row -> how many of its steps were recorded

    def denoising_scores(self, segments):
        out = []
        for s in segments:
            r, n = s.context["row"], len(s.logprobs)
            out.append(StepScores(logp=self.logp[r, :n], mean=self.mean[r, :n], std=self.std[r, :n],
                                  delta=self.delta[r, :n]))
        return out

    def segment_logprobs(self, segments):
        return [self.token_logp[s.context["row"], :len(s.logprobs)] for s in segments]


def flow_item(row, old, adv):
    seg = Segment("image", {"row": row}, [], [float(v) for v in old], action={"kind": FLOW_ACTION_KIND, "trace": {}})
    return TrainItem(seg, adv, "generate", 0)


def grpo(**learner):
    base = dict(kl_coef_text=0.0, kl_coef_image=0.04, clip_low=0.2, clip_high=0.2)
    base.update(learner)
    return GRPO(SimpleNamespace(learner=Learner(**base)))


def case():
    new, old, adv, mean, mean_ref, eta, delta = fixed_case()
    std = eta * delta.sqrt()
    policy = StubFlowPolicy(new, mean, std, delta)
    reference = StubFlowPolicy(new.detach(), mean_ref, std, delta)
    items = [flow_item(b, old[b], float(adv[b])) for b in range(4)]
    return policy, reference, items, (new, old, adv, mean, mean_ref, eta)


def test_learner_flow_loss_equals_flow_grpo_and_weights_the_policy_term_only():
    policy, reference, items, (new, old, adv, mean, mean_ref, eta) = case()
    eta5 = eta.view(4, 3, 1, 1, 1)
    models = LearnerModels(policy, reference)
    for weight in (1.0, 2.0):
        ref_pg = flow_grpo_reference(new, old, adv, mean, mean_ref, eta5, clip_range=1e-4, adv_clip_max=5.0, beta=0)
        ref_all = flow_grpo_reference(new, old, adv, mean, mean_ref, eta5, clip_range=1e-4, adv_clip_max=5.0,
                                      beta=0.04)
        algo = grpo(loss_weight_image=weight, flow={"clip_low": 1e-4, "kl_kind": "flow_grpo", "adv_clip": 5.0})
        loss, metrics, _ = algo.loss(models, items, range(4), range(4), algo.prepare(models, items))
        expected = weight * ref_pg + (ref_all - ref_pg)  # R3: the modality weight multiplies the policy term only
        (g_ours,) = torch.autograd.grad(loss, new)
        (g_expected,) = torch.autograd.grad(expected, new)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-13)
        assert torch.allclose(g_ours, g_expected, atol=1e-13, rtol=0)
        assert 0 < metrics["flow_clip_frac"] < 1 and metrics["flow_adv_clip_frac"] == pytest.approx(0.5)
        assert metrics["flow_kl_mean"] > 0


def test_the_text_clip_range_does_not_reach_image_steps():
    """The image's own clip range: with the text's 0.2 no ratio here would be clipped (|log r| <= 4e-4)."""
    policy, reference, items, _ = case()
    models = LearnerModels(policy, reference)
    algo = grpo(flow={"clip_low": 0.2})
    _, wide, _ = algo.loss(models, items, range(4), range(4), algo.prepare(models, items))
    algo = grpo(flow={"clip_low": 1e-4})
    _, narrow, _ = algo.loss(models, items, range(4), range(4), algo.prepare(models, items))
    assert wide["flow_clip_frac"] == 0.0 and narrow["flow_clip_frac"] > 0
    assert "clip_frac" not in narrow  # no token rows in this batch: no token metrics


@pytest.mark.parametrize("ratio_unit", ["step", "image"])
def test_micro_batches_accumulate_to_the_mini_batch_loss(ratio_unit):
    policy, reference, items, _ = case()
    items[0].segment.logprobs = items[0].segment.logprobs[:1]  # images with different numbers of steps
    items[2].segment.logprobs = items[2].segment.logprobs[:2]
    models = LearnerModels(policy, reference)
    algo = grpo(flow={"ratio_unit": ratio_unit})
    ctx = algo.prepare(models, items)
    whole, _, _ = algo.loss(models, items, range(4), range(4), ctx)
    parts = sum(algo.loss(models, items, c, range(4), ctx)[0] for c in (range(0, 1), range(1, 3), range(3, 4)))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-14)


def test_token_rows_and_flow_rows_add_as_separate_means_with_modality_weights():
    """A mixed micro-batch: text rows keep the token loss (weighted by loss_weight_text), image steps get theirs."""
    policy, reference, items, _ = case()
    g = torch.Generator().manual_seed(1)
    tok_old = -1.0 + 0.1 * torch.randn(2, 5, generator=g, dtype=torch.float64)
    policy.token_logp = (tok_old + 0.05 * torch.randn(2, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    text = [TrainItem(Segment("text", {"row": r}, [7] * n, tok_old[r, :n].tolist()), a, "reason", 0)
            for r, n, a in ((0, 5, 1.0), (1, 3, -0.5))]
    models = LearnerModels(policy, None)  # no reference: no KL on either kind
    algo = grpo(loss_weight_text=0.5, loss_weight_image=2.0, kl_coef_image=0.0)
    mixed = text + items
    loss, metrics, _ = algo.loss(models, mixed, range(6), range(6), algo.prepare(models, mixed))
    flow_only, _, _ = algo.loss(models, items, range(4), range(4), algo.prepare(models, items))
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    tok, _ = clipped_policy_loss(policy.token_logp, tok_old, torch.tensor([1.0, -0.5], dtype=torch.float64), mask)
    # the token path reads the recorded log-probs as float32, as it always has
    assert loss.item() == pytest.approx(0.5 * tok.item() + flow_only.item(), abs=1e-6)
    assert "clip_frac" in metrics and "flow_clip_frac" in metrics
    assert [is_flow_segment(it.segment) for it in mixed] == [False, False, True, True, True, True]


def test_score_traces_rescores_mixed_kinds_per_segment_with_ratio_one():
    """Generation (CFG) and edit traces in one call: stacked per kind, each segment gets back its own steps."""
    from test_flow_sampler import (EDIT_CFG, GEN_CFG, TinyVelocity, assert_sample_is_mean_plus_noise, branches, run,
                                   sampler_noise)

    from r3_rl.flow.action import flow_action, score_traces, segment_trace

    torch.manual_seed(0)
    net = TinyVelocity()
    c = torch.randn(5, 6)
    gen = run(net, c[:3], GEN_CFG, [[0, 4], [2], [13, 14]])
    edit = run(net, c[3:], EDIT_CFG, [[0], [0, 1]])
    traces = [gen.traces[0], edit.traces[0], gen.traces[1], edit.traces[1], gen.traces[2]]
    conds = [c[0], c[3], c[1], c[4], c[2]]
    segs = [Segment("image", {}, [], [s.logprob for s in tr.steps], action=flow_action(tr)) for tr in traces]
    calls = []

    def velocity_for(members, batch):
        calls.append(list(members))
        return branches(net, torch.stack([conds[members[int(k)]] for k in batch.image]))

    scores = score_traces([segment_trace(s) for s in segs], velocity_for)
    assert sorted(map(sorted, calls)) == [[0, 2, 4], [1, 3]]  # one velocity call per kind
    for seg, tr, sc in zip(segs, traces, scores):
        assert sc.logp.shape == (len(tr.steps),)
        assert torch.allclose(sc.logp.double(), torch.tensor(seg.logprobs, dtype=torch.float64), atol=1e-6, rtol=0)
        assert_sample_is_mean_plus_noise(sc.mean, sc.std, sampler_noise(tr), torch.stack([s.x_next for s in tr.steps]))
        assert sc.std.tolist() == pytest.approx([s.std for s in tr.steps])
