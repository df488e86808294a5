"""Exact small cases for the core GRPO maths (advantages, clipped loss, KL estimators, Tree-RL sibling groups,
stage scoring): a second mutation pass (round 10E, 2026-12-07).  Every expectation is worked out by hand from
the formula it names (DeepSeekMath GRPO advantage, TRL's clipped loss, Schulman's KL estimators), never by
calling the code under test; each docstring names the one-point bug the test catches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from r3_rl.algorithms.advantages import group_advantages, group_stats, leave_one_out_advantages
from r3_rl.algorithms.kl import kl_estimate
from r3_rl.algorithms.losses import aggregate, clipped_policy_loss
from r3_rl.algorithms.signal import SIGNAL_ATOL
from r3_rl.policy.base import ImageSample, Policy, TextSample
from r3_rl.rewards.compose import CriticRule
from r3_rl.rollout.buffer import BufferEntry
from r3_rl.rollout.scoring import StageScorer
from r3_rl.rollout.tree_rl import RolloutTask, StageSampling, run_task
from r3_rl.trajectory import Node, PromptItem, SamplingParams, Segment, Tree

D = torch.float64
NAN = math.nan


# ------------------------------------------------------------------------------------------------ advantages
def test_std_normalisation_uses_bessels_n_minus_1() -> None:
    """Group std is the unbiased (ddof=1) one, as TRL's nanstd: [0, 1, 2] has std 1, so A = [-1, 0, 1] (ddof=0 gives +-1.2247)."""
    adv = group_advantages(torch.tensor([0.0, 1.0, 2.0], dtype=D), ["g"] * 3, normalize_std=True, eps=0.0)
    assert adv.tolist() == [-1.0, 0.0, 1.0]


def test_default_eps_is_1e_6_added_to_the_std() -> None:
    """Default eps is 1e-6 and is added to the std: [0, 2] has std sqrt(2), A = +-1 / (sqrt(2) + 1e-6)."""
    adv = group_advantages(torch.tensor([0.0, 2.0], dtype=D), ["g", "g"], normalize_std=True)
    want = 1.0 / (math.sqrt(2.0) + 1e-6)
    assert adv.tolist() == pytest.approx([-want, want], rel=1e-12, abs=0)


def test_std_eps_is_added_not_a_floor() -> None:
    """``/ (std + eps)``, not ``/ max(std, eps)``: [0, 2] with eps=1 gives +-1/(sqrt2 + 1)."""
    adv = group_advantages(torch.tensor([0.0, 2.0], dtype=D), ["g", "g"], normalize_std=True, eps=1.0)
    want = 1.0 / (math.sqrt(2.0) + 1.0)
    assert adv.tolist() == pytest.approx([-want, want], rel=1e-12, abs=0)


def test_single_valid_member_gets_zero_and_failed_gets_nan() -> None:
    """A group with one valid reward has no sibling: 0, not r - r = 0 by accident (here r=0.7 with a NaN sibling) and not NaN."""
    adv = group_advantages(torch.tensor([0.7, NAN, 0.2, 0.6], dtype=D), ["a", "a", "b", "b"])
    assert adv[0].item() == 0.0 and math.isnan(adv[1].item())
    assert adv[2:].tolist() == pytest.approx([-0.2, 0.2], abs=1e-15)


def test_single_valid_member_is_zero_under_std_normalisation() -> None:
    """One valid member: its std is undefined; the advantage must be exactly 0 (not 0/eps or NaN)."""
    adv = group_advantages(torch.tensor([0.7, NAN], dtype=D), ["a", "a"], normalize_std=True)
    assert adv[0].item() == 0.0 and math.isnan(adv[1].item())


def test_group_spread_of_exactly_signal_atol_is_flat() -> None:
    """Rewards SIGNAL_ATOL apart are 'equal' (has_signal uses >): the group gives exactly 0, not a blown-up residue."""
    adv = group_advantages(torch.tensor([0.0, SIGNAL_ATOL], dtype=D), ["g", "g"], normalize_std=True)
    assert adv.tolist() == [0.0, 0.0]


def test_flat_group_is_exactly_zero_even_with_rounding_residue() -> None:
    """0.1 + 0.2 vs 0.3 (a 5.5e-17 residue) is a flat group: 0, not +-0.707 after the std division."""
    adv = group_advantages(torch.tensor([0.1 + 0.2, 0.3], dtype=D), ["g", "g"], normalize_std=True)
    assert adv.tolist() == [0.0, 0.0]


def test_batch_std_pool_is_the_pools_std_not_the_groups() -> None:
    """std_pools: divide by the std of the pool's rewards [0, 2, 0, 4] (ddof 1: sqrt(11/3)), not the group's."""
    r = torch.tensor([0.0, 2.0, 0.0, 4.0], dtype=D)
    adv = group_advantages(r, ["a", "a", "b", "b"], normalize_std=True, eps=0.0, std_pools=["s"] * 4)
    s = math.sqrt(((0 - 1.5) ** 2 * 2 + (2 - 1.5) ** 2 + (4 - 1.5) ** 2) / 3)
    assert adv.tolist() == pytest.approx([-1 / s, 1 / s, -2 / s, 2 / s], rel=1e-12)


def test_failed_rows_are_nan_in_a_group_with_signal() -> None:
    """A failed sample's advantage is NaN (row dropped), not r - mean of a NaN = NaN by luck or 0 by nan_to_num."""
    adv = group_advantages(torch.tensor([1.0, NAN, 0.0], dtype=D), ["g"] * 3)
    assert adv[0].item() == 0.5 and adv[2].item() == -0.5 and math.isnan(adv[1].item())


def test_infinite_reward_raises() -> None:
    """+-inf is a broken reward, refused (not silently turned into a NaN 'failed' group)."""
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, math.inf]), ["g", "g"])
    with pytest.raises(ValueError, match="finite"):
        leave_one_out_advantages(torch.tensor([1.0, -math.inf]), ["g", "g"])


def test_leave_one_out_is_reward_minus_mean_of_the_others() -> None:
    """RLOO: [1, 2, 6] -> 1-4, 2-3.5, 6-1.5 (dividing by n instead of n-1 gives other numbers); NaN left out."""
    adv = leave_one_out_advantages(torch.tensor([1.0, 2.0, NAN, 6.0], dtype=D), ["p"] * 4)
    assert adv[[0, 1, 3]].tolist() == [-3.0, -1.5, 4.5] and math.isnan(adv[2].item())


def test_leave_one_out_single_valid_member_gets_zero() -> None:
    """A pool with one valid reward gives it 0 (not r - 0 = r)."""
    adv = leave_one_out_advantages(torch.tensor([0.8, NAN, 0.3, 0.1], dtype=D), ["a", "a", "b", "b"])
    assert adv[0].item() == 0.0 and adv[2:].tolist() == pytest.approx([0.2, -0.2], abs=1e-15)


def test_group_stats_each_group_in_one_bucket() -> None:
    """One all-failed, one single-valid, one flat and one live group: the three counts are 1, 1, 1."""
    r = torch.tensor([NAN, NAN, 0.4, NAN, 0.5, 0.5, 0.0, 1.0], dtype=D)
    st = group_stats(r, ["a", "a", "b", "b", "c", "c", "d", "d"])
    assert st == {"samples": 8.0, "groups": 4.0, "failed_samples": 3.0, "all_failed_groups": 1.0,
                  "single_valid_groups": 1.0, "zero_signal_groups": 1.0}


# ------------------------------------------------------------------------------------------------ KL estimators
def test_kl_estimators_schulman_values() -> None:
    """x = logp - ref = +-1: k1 = x, k2 = x^2/2, k3 = exp(-x) + x - 1 (k3 at x=1: 1/e, at x=-1: e - 2)."""
    logp = torch.tensor([0.0, -1.0], dtype=D)
    ref = torch.tensor([-1.0, 0.0], dtype=D)
    assert kl_estimate(logp, ref, "k1").tolist() == [1.0, -1.0]
    assert kl_estimate(logp, ref, "k2").tolist() == [0.5, 0.5]
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(-1.0), math.e - 2.0], rel=1e-14)


# ------------------------------------------------------------------------------------------------ clipped loss
def _one(logp: float, adv: float, **kw):
    """One token, old log-prob 0 (ratio = exp(logp))."""
    lp = torch.tensor([[logp]], dtype=D, requires_grad=True)
    loss, m = clipped_policy_loss(lp, torch.zeros(1, 1, dtype=D), torch.tensor([adv], dtype=D),
                                  torch.ones(1, 1), **kw)
    return lp, loss, m


def test_asymmetric_clip_high_side_positive_advantage() -> None:
    """ratio 2, A=+1, clip_low 0.1 / clip_high 0.3: loss = -min(2, 1.3) = -1.3 (swapped sides give -1.1)."""
    _, loss, m = _one(math.log(2.0), 1.0, clip_low=0.1, clip_high=0.3)
    assert loss.item() == pytest.approx(-1.3, abs=1e-12)
    assert m["clip_frac_high"].item() == 1.0 and m["clip_frac_low"].item() == 0.0


def test_asymmetric_clip_low_side_negative_advantage() -> None:
    """ratio 0.5, A=-1, clip_low 0.1 / clip_high 0.3: loss = -min(-0.5, -0.9) = 0.9 (swapped sides give 0.7)."""
    _, loss, m = _one(math.log(0.5), -1.0, clip_low=0.1, clip_high=0.3)
    assert loss.item() == pytest.approx(0.9, abs=1e-12)
    assert m["clip_frac_low"].item() == 1.0 and m["clip_frac_high"].item() == 0.0


def test_negative_advantage_above_the_upper_clip_is_not_clipped() -> None:
    """A=-1, ratio 2: -min(-2, -1.2) = 2 with gradient -2 (pessimistic bound; max() would give 1.2 and no gradient)."""
    lp, loss, m = _one(math.log(2.0), -1.0)
    assert loss.item() == pytest.approx(2.0, abs=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    assert g.item() == pytest.approx(2.0, abs=1e-12)  # d(-r*A)/dlogp = -A*r = 2
    assert m["clip_frac"].item() == 0.0


def test_positive_advantage_below_the_lower_clip_is_not_clipped() -> None:
    """A=+1, ratio 0.5: -min(0.5, 0.8) = -0.5 with gradient -0.5 (using the clipped ratio gives -0.8, no gradient)."""
    lp, loss, _ = _one(math.log(0.5), 1.0)
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    assert g.item() == pytest.approx(-0.5, abs=1e-12)


def test_clip_low_of_one_is_refused() -> None:
    """clip_low must be < 1 (ratio floor 0 would make the lower clip meaningless)."""
    with pytest.raises(ValueError, match="clip"):
        _one(0.0, 1.0, clip_low=1.0)


def test_clip_fractions_are_strict_and_sign_specific() -> None:
    """A ratio exactly at 1 - clip_low (clip_low=0, ratio 1) is not clipped; A=0 is never 'clipped high'."""
    _, _, m = _one(0.0, -1.0, clip_low=0.0)
    assert m["clip_frac_low"].item() == 0.0
    _, _, m = _one(math.log(2.0), 0.0)
    assert m["clip_frac_high"].item() == 0.0 and m["clip_frac"].item() == 0.0
    _, _, m = _one(math.log(0.5), 1.0)  # ratio below the floor but A > 0: not a low clip
    assert m["clip_frac_low"].item() == 0.0


def test_kl_importance_weight_keeps_the_ratio_gradient() -> None:
    """KL * ratio is differentiated through the ratio: d(x e^x)/dx at x=0.5, A=0, k1, ref=0 is e^0.5 * 1.5."""
    lp, loss, _ = _one(0.5, 0.0, ref_logp=torch.zeros(1, 1, dtype=D), kl_coef=1.0, kl_kind="k1",
                       kl_importance_weight=True)
    assert loss.item() == pytest.approx(0.5 * math.exp(0.5), rel=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    assert g.item() == pytest.approx(1.5 * math.exp(0.5), rel=1e-12)


def test_policy_loss_metric_excludes_kl_and_row_weight() -> None:
    """``policy_loss`` is the unweighted clipped term: A=1, ratio 1 -> -1 (KL 1 and row weight 3 left out)."""
    _, loss, m = _one(0.0, 1.0, ref_logp=torch.full((1, 1), -1.0, dtype=D), kl_coef=1.0, kl_kind="k1",
                      row_weight=torch.tensor([3.0], dtype=D))
    assert m["policy_loss"].item() == pytest.approx(-1.0, abs=1e-12)
    assert loss.item() == pytest.approx(-3.0 + 1.0, abs=1e-12)


def _three_rows():
    """Rows of 2, 1 and 3 valid tokens (T=4), per-token values 1..; row 3 is dropped via a NaN advantage."""
    logp = torch.zeros(3, 4, dtype=D)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    return logp, mask


def test_aggregations_hand_values_with_a_dropped_row() -> None:
    """A = [1, 2, NaN], ratio 1: per-token -1 (2 tokens), -2 (1 token); row 3 dropped everywhere.
    token_mean (-2-2)/3, seq_mean (-1-2)/2, dr_grpo (-4)/(2*4), dr_grpo max_len 5: -4/10."""
    logp, mask = _three_rows()
    adv = torch.tensor([1.0, 2.0, NAN], dtype=D)
    want = {"token_mean": -4 / 3, "seq_mean": -1.5, "dr_grpo": -0.5}
    for lt, w in want.items():
        loss, m = clipped_policy_loss(logp, logp, adv, mask, loss_type=lt)
        assert loss.item() == pytest.approx(w, abs=1e-12), lt
    loss, _ = clipped_policy_loss(logp, logp, adv, mask, loss_type="dr_grpo", max_len=5)
    assert loss.item() == pytest.approx(-0.4, abs=1e-12)
    loss, _ = clipped_policy_loss(logp, logp, adv, mask, loss_type="dr_grpo",
                                  max_len=torch.tensor([2.0, 4.0, 3.0], dtype=D))
    assert loss.item() == pytest.approx((-2 / 2 + -2 / 4) / 2, abs=1e-12)


def test_aggregate_without_rows_counts_every_row() -> None:
    """Without ``rows``, an all-padding row still counts as a row (TRL): seq_mean of [2, -] over 2 rows is 1."""
    v = torch.tensor([[2.0, 2.0], [9.0, 9.0]], dtype=D)
    mask = torch.tensor([[1, 1], [0, 0]])
    assert aggregate(v, mask, "seq_mean").item() == 1.0
    assert aggregate(v, mask, "dr_grpo").item() == 1.0  # 4 / (2 rows * T=2)
    assert aggregate(v, mask, "seq_mean", rows=torch.tensor([True, False])).item() == 2.0


def test_dr_grpo_max_len_shorter_than_a_row_is_refused() -> None:
    """max_len below the longest valid row (3 tokens) raises, int or per-row."""
    v = torch.zeros(1, 3, dtype=D)
    with pytest.raises(ValueError):
        aggregate(v, torch.ones(1, 3), "dr_grpo", 2)
    with pytest.raises(ValueError):
        aggregate(v, torch.ones(1, 3), "dr_grpo", torch.tensor([2.0]))


# ------------------------------------------------------------------------------------------------ Tree-RL groups
def _seg(tag: str) -> Segment:
    return Segment("text", {"input_ids": [1]}, [2], [-0.1], {"tag": tag})


class EchoPolicy(Policy):
    """Plans/critiques echo the prompt id and the call position, so each node tells whose sibling it is."""

    version = 3

    def reason(self, prompts, sampling, generator=None):
        return [TextSample(f"<think>{p.id}#{k}</think>", _seg(p.id)) for k, p in enumerate(prompts)]

    def generate(self, prompts, plans, sampling, generator=None):
        out = []
        for p, plan in zip(prompts, plans):
            assert plan.startswith(f"<think>{p.id}#")  # the image is drawn from its own prompt's plan
            out.append(ImageSample(np.full((1, 1, 3), int(p.id[1:]), np.uint8), _seg(plan)))
        return out

    def reflect(self, prompts, images, sampling, generator=None):
        # parent image value v: critiques alternate stop / edit
        return [TextSample(f"<think>{int(im.image[0, 0, 0])}</think> " + ("no further edit needed" if k % 2 else "fix"),
                           _seg(str(k))) for k, im in enumerate(images)]

    def refine(self, prompts, images, instructions, sampling, generator=None):
        return [ImageSample(im.image + 100, _seg("r")) for im in images]

    def segment_logprobs(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
        raise NotImplementedError

    model = None  # type: ignore[assignment]


def _sampling() -> StageSampling:
    return StageSampling(*(SamplingParams() for _ in range(4)))


def test_stage_a_groups_are_one_prompts_siblings_only() -> None:
    """Two prompts x 3 siblings: each tree's plan group and image group hold exactly its own prompt's 3 samples."""
    task = RolloutTask(kind="A", step=2, index=1, seed=0, group_size=3,
                       prompts=[PromptItem("p7", "seven"), PromptItem("p9", "nine")])
    trees = run_task(EchoPolicy(), task, _sampling(), "no further edit needed")
    assert [t.id for t in trees] == ["s2-t1-A0", "s2-t1-A1"]
    for t, pid, v in zip(trees, ["p7", "p9"], [7, 9]):
        plans = [n for n in t.nodes.values() if n.stage == "reason"]
        images = [n for n in t.nodes.values() if n.stage == "generate"]
        assert [n.text.split("#")[0] for n in plans] == [f"<think>{pid}"] * 3
        assert {n.group_id for n in plans} == {f"{t.id}/plan"} and {n.group_id for n in images} == {f"{t.id}/image"}
        assert [int(n.image[0, 0, 0]) for n in images] == [v] * 3
        assert [(n.id, n.parent) for n in images] == [("g0", "p0"), ("g1", "p1"), ("g2", "p2")]
        assert all(n.policy_version == 3 and n.round == 0 for n in plans + images)


def test_stage_bc_groups_are_one_parents_siblings_and_round_advances() -> None:
    """Two parents x 2 critiques: each tree's reflect/refine group is its own parent's; round = parent round + 1;
    a round-1 parent root is a 'refine' node, a round-0 one 'generate'; a stop copies the parent."""
    p = PromptItem("p1", "x")
    parents = [BufferEntry(p, np.full((1, 1, 3), 5, np.uint8), None, 0.25, False, 0, "a/g0"),
               BufferEntry(p, np.full((1, 1, 3), 6, np.uint8), None, 1.0, True, 1, "b/r0")]
    task = RolloutTask(kind="BC", step=4, index=0, seed=0, group_size=2, parents=parents)
    trees = run_task(EchoPolicy(), task, _sampling(), "no further edit needed")
    for t, v, rnd, root_stage in zip(trees, [5, 6], [1, 2], ["generate", "refine"]):
        n = t.nodes
        assert n["root"].stage == root_stage and n["root"].round == rnd - 1 and n["root"].policy_version == -1
        crit = [x for x in n.values() if x.stage == "reflect"]
        ref = [x for x in n.values() if x.stage == "refine" and x.id != "root"]
        assert [c.text.split("</think>")[0] for c in crit] == [f"<think>{v}"] * 2  # both critique this parent
        assert {c.group_id for c in crit} == {f"{t.id}/reflect"} and {r.group_id for r in ref} == {f"{t.id}/refine"}
        assert all(x.round == rnd for x in crit + ref)
        assert [c.stop for c in crit] == [False, True]
        assert int(n["r0"].image[0, 0, 0]) == v + 100 and n["r0"].segment is not None  # the edit
        assert n["r1"].image is n["root"].image and n["r1"].meta["copied"] and n["r1"].reward == n["root"].reward


def test_rescue_only_when_every_critique_agrees() -> None:
    """Verdict rescue re-samples a parent only if all group_size critiques agree: [edit, stop] is mixed, not rescued
    (checking only the first g-1 critiques would call it unanimous)."""
    p = PromptItem("p1", "x")
    parents = [BufferEntry(p, np.full((1, 1, 3), 5, np.uint8), None, 0.25, False, 0, "a/g0")]
    task = RolloutTask(kind="BC", step=0, index=0, seed=0, group_size=2, parents=parents)
    sp = StageSampling(*(SamplingParams() for _ in range(4)), reflect_rescue=SamplingParams(temperature=2.0))
    trees = run_task(EchoPolicy(), task, sp, "no further edit needed")
    assert trees[0].meta["rescued"] is False


# ------------------------------------------------------------------------------------------------ stage scoring
def _critique_tree(parent_reward: float, new_reward: float, stop: bool, correct: bool | None) -> Tree:
    t = Tree(id="t", prompt=PromptItem("p", "x"))
    t.add(Node(id="root", parent=None, stage="generate", round=0, group_id="t/root", policy_version=-1,
               image=np.zeros((1, 1, 3), np.uint8), reward=parent_reward,
               meta={} if correct is None else {"correct": correct}))
    t.add(Node(id="c0", parent="root", stage="reflect", round=1, group_id="t/reflect", policy_version=0,
               text="<think> a </think> b", stop=stop, segment=_seg("c")))
    t.add(Node(id="r0", parent="c0", stage="refine", round=1, group_id="t/refine", policy_version=0,
               image=np.zeros((1, 1, 3), np.uint8), reward=new_reward))
    return t


def _stage_scorer(rule: CriticRule = CriticRule(), threshold: float = 1.0) -> StageScorer:
    return StageScorer(task=None, format_weight=0.1, reason_format=".*", reflect_format=".*",  # type: ignore[arg-type]
                       correct_threshold=threshold, rule=rule)


def test_unchanged_edit_of_a_flawed_image_earns_the_unimproved_term() -> None:
    """An edit leaving a flawed image at the same reward is 'not improved' (strict >): 0.1 + 0 + (-0.3)."""
    t = _critique_tree(0.5, 0.5, stop=False, correct=False)
    _stage_scorer(CriticRule(edit_flawed_unimproved=-0.3)).compose(t)
    assert t.nodes["c0"].reward == pytest.approx(0.1 - 0.3, abs=1e-12)
    assert t.nodes["c0"].rewards["verdict_term"] == -0.3 and t.nodes["c0"].rewards["delta"] == 0.0


def test_parent_verdict_falls_back_to_reward_at_exactly_the_threshold() -> None:
    """No stored verdict: a parent at exactly correct_threshold is correct, so a stop earns stop_correct (1)."""
    t = _critique_tree(0.8, 0.8, stop=True, correct=None)
    _stage_scorer(threshold=0.8).compose(t)
    assert t.nodes["c0"].reward == pytest.approx(0.1 + 1.0, abs=1e-12)
    assert t.nodes["c0"].rewards["verdict_term"] == 1.0


def test_stored_parent_verdict_beats_the_reward_threshold() -> None:
    """The parent's stored verdict (e.g. GenEval's) decides, not its reward: reward 1.0 but judged flawed -> stop earns stop_flawed."""
    t = _critique_tree(1.0, 1.0, stop=True, correct=False)
    _stage_scorer(CriticRule(stop_flawed=-0.5)).compose(t)
    assert t.nodes["c0"].reward == pytest.approx(0.1 - 0.5, abs=1e-12)


def test_plan_with_no_image_child_has_no_reward() -> None:
    """A plan whose image is missing is unscored (None), not scored as image reward 0 + format weight."""
    t = Tree(id="t", prompt=PromptItem("p", "x"))
    t.add(Node(id="p0", parent=None, stage="reason", round=0, group_id="t/plan", policy_version=0, text="plan"))
    _stage_scorer().compose(t)
    assert t.nodes["p0"].reward is None and t.nodes["p0"].rewards["format"] == 1.0


def test_bad_format_zeroes_plan_and_critique_rewards() -> None:
    """Format gates the whole stage reward: a malformed plan/critique earns 0, not the task part or the format weight."""
    t = _critique_tree(0.2, 0.9, stop=False, correct=False)
    t.add(Node(id="p0", parent=None, stage="reason", round=0, group_id="t/plan", policy_version=0, text="plan"))
    t.add(Node(id="g0", parent="p0", stage="generate", round=0, group_id="t/image", policy_version=0,
               image=np.zeros((1, 1, 3), np.uint8), reward=0.6))
    s = StageScorer(task=None, format_weight=0.1, reason_format="^<think>", reflect_format="^<think>.*NEVER",  # type: ignore[arg-type]
                    correct_threshold=1.0)
    s.compose(t)
    assert t.nodes["p0"].reward == 0.0 and t.nodes["c0"].reward == 0.0
    s2 = StageScorer(task=None, format_weight=0.1, reason_format=".*", reflect_format=".*")  # type: ignore[arg-type]
    s2.compose(t)
    assert t.nodes["p0"].reward == pytest.approx(0.6 + 0.1) and t.nodes["c0"].reward == pytest.approx(0.1 + 0.7)


def test_failed_edit_logs_the_verdict_term_as_improved() -> None:
    """Refined image unscored (None): 'improved' is unknown, counted as improved, so the logged verdict term is 0, not edit_flawed_unimproved."""
    t = _critique_tree(0.5, 0.5, stop=False, correct=False)
    t.nodes["r0"].reward = None
    _stage_scorer(CriticRule(edit_flawed_unimproved=-0.3)).compose(t)
    assert t.nodes["c0"].reward is None and t.nodes["c0"].rewards["verdict_term"] == 0.0


# ------------------------------------------------------------------------------------------------ batch advantages
def _bc_group() -> Tree:
    """Parent 0.5; c0 edits (refined 0.9), c1 stops (copy of the parent, 0.5); critiques scored 1.0 and 0.0."""
    t = _critique_tree(0.5, 0.9, stop=False, correct=False)
    t.nodes["c0"].reward = 1.0
    t.add(Node(id="c1", parent="root", stage="reflect", round=1, group_id="t/reflect", policy_version=0,
               text="<think> a </think> no further edit needed", stop=True, segment=_seg("c"), reward=0.0))
    t.add(Node(id="r1", parent="c1", stage="refine", round=1, group_id="t/refine", policy_version=0,
               image=t.nodes["root"].image, reward=0.5, meta={"copied": True}))
    return t


def test_copied_refine_gets_zero_and_edit_gets_group_advantage() -> None:
    """Refine group [0.9 edit, 0.5 copy]: the edit gets 0.9 - 0.7 = 0.2, the copy 0 (not -0.2: nothing was sampled)."""
    from r3_rl.learner.batch import assign_advantages
    t = _bc_group()
    assign_advantages([t])
    n = t.nodes
    assert n["r0"].advantage == pytest.approx(0.2, abs=1e-12) and n["r1"].advantage == 0.0
    assert (n["c0"].advantage, n["c1"].advantage) == (0.5, -0.5)
    assert n["root"].advantage is None  # the parent (policy_version -1) is not trained


def test_refine_parent_baseline_is_new_minus_parent() -> None:
    """refine_baseline 'parent': the edit's advantage is 0.9 - 0.5 = +0.4 (swapped: -0.4); the copy stays 0."""
    from r3_rl.learner.batch import assign_advantages, edited_image_gains
    t = _bc_group()
    assert list(edited_image_gains([t]).values()) == [pytest.approx(0.4, abs=1e-12)]
    assign_advantages([t], refine_baseline="parent")
    assert t.nodes["r0"].advantage == pytest.approx(0.4, abs=1e-12) and t.nodes["r1"].advantage == 0.0
