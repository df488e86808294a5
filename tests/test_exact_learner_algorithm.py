"""Exact small cases for how the learner turns items into a loss, a gradient and logged figures, for the fp32
master weights behind a bf16 policy and for the modality experts' routing.

A mutation audit (round 10B, 2026-12-07) made one-point bugs in ``r3_rl/learner/algorithm.py``,
``torch_learner.py``, ``precision.py``, ``optim.py`` (clipping) and ``r3_rl/policy/tiny_mot.py``; each test here
fails on at least one that passed the suite, named in its docstring.

The learner tests use a stand-in policy whose log-prob of every action of item ``k`` is its sampled log-prob plus
one weight ``w[k]`` (0 at the start): every ratio is ``exp(w[k]) = 1``, ``d logp / d w[k] = 1``, and a reference
shifted by ``c[k]`` gives the k1 KL ``w[k] - c[k]``.  So each expected loss, gradient and figure below is a few
lines of arithmetic written out by hand, not a call of the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch

from r3_rl.config import Learner, Recipe
from r3_rl.learner.algorithm import GRPO, LearnerModels
from r3_rl.learner.batch import TrainItem
from r3_rl.learner.torch_learner import TorchLearner, reduce_metric
from r3_rl.trajectory import Segment


class _Weights(torch.nn.Module):
    def __init__(self, n: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n, dtype=dtype))


class FakePolicy:
    """Log-prob of each action of item ``k``: its sampled log-prob + ``w[k]``."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float32) -> None:
        self.model = _Weights(n, dtype)

    def segment_logprobs(self, segs: list[Segment]) -> list[torch.Tensor]:
        return [torch.tensor(s.logprobs, dtype=torch.float32) + self.model.w[s.context["k"]].float() for s in segs]

    def denoising_scores(self, segs: list[Segment]) -> list:
        """Flow segments: each step's log-prob likewise; a 1-element latent, unit std and step size."""
        from r3_rl.flow.action import StepScores

        return [StepScores(logp=torch.tensor(s.logprobs, dtype=torch.float32) + self.model.w[s.context["k"]].float(),
                           mean=torch.zeros(s.num_actions, 1), std=torch.ones(s.num_actions, dtype=torch.float64),
                           delta=torch.ones(s.num_actions, dtype=torch.float64)) for s in segs]


class FakeReference:
    """Log-prob of each action of item ``k``: its sampled log-prob + ``shift[k]`` (no gradient)."""

    def __init__(self, shift: dict[int, float]) -> None:
        self.shift = shift

    def segment_logprobs(self, segs: list[Segment]) -> list[torch.Tensor]:
        return [torch.tensor(s.logprobs, dtype=torch.float32) + self.shift[s.context["k"]] for s in segs]


class FakeReplay:
    """A rehearsal whose loss is ``sum(w)`` (gradient 1 on every weight); records which examples were drawn."""

    def __init__(self, policy: FakePolicy) -> None:
        self.policy, self.drawn = policy, []

    def examples(self, index: int) -> int:
        self.drawn.append(index)
        return index

    def loss(self, examples: int) -> torch.Tensor:
        return self.policy.model.w.float().sum()


def _item(k: int, modality: str, n: int, adv: float, stage: str | None = None) -> TrainItem:
    seg = Segment(modality, {"k": k}, [1] * n, [-1.0] * n)
    return TrainItem(seg, adv, stage or ("reason" if modality == "text" else "generate"), 0, group=f"g{k}")


def _three() -> list[TrainItem]:
    """Text of 3 actions (A=1), text of 1 (A=-2), image of 4 (A=0.5): 8 actions."""
    return [_item(0, "text", 3, 1.0), _item(1, "text", 1, -2.0), _item(2, "image", 4, 0.5)]


def _cfg(**kw) -> Learner:
    base = dict(lr=0.0, kl_coef_text=0.0, kl_coef_image=0.0, micro_batch_size=1, warmup_steps=0, grad_accum=0)
    base.update(kw)
    return Learner(**base)


def _run(learner: TorchLearner, items: list[TrainItem]) -> tuple[dict, list[torch.Tensor]]:
    """One ``learner.step``; the gradient each optimiser step was handed (before clipping)."""
    seen: list[torch.Tensor] = []
    real = learner.optim.step

    def spy():
        seen.append(torch.cat([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in learner.optim.params]))
        return real()
    learner.optim.step = spy
    return learner.step(items), seen


# ------------------------------------------------------------------------------------------ the torch learner
def test_token_mean_step_over_three_micro_batches_is_exact() -> None:
    """One optimiser step over 3 micro-batches: the gradient, loss and figures are the whole step's (catches stage or
    modality weights dropped, a leftover gradient not cleared first, a figure that is the last micro-batch's)."""
    policy = FakePolicy(3)
    learner = TorchLearner(policy, None, _cfg(loss_weight_image=2.0, stage_weights={"reason": 3.0}))
    policy.model.w.grad = torch.full((3,), 5.0)  # left by something else (a warm start): must not be stepped with
    m, grads = _run(learner, _three())
    # grad_k = n_k * (-A_k * weight_k) / 8 tokens; weights: text (reason) 3, image 2
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], torch.tensor([-9 / 8, 6 / 8, -4 / 8]), rtol=0, atol=1e-7)
    assert m["learner/loss"] == pytest.approx((-9 + 6 - 4) / 8, abs=1e-7)
    assert m["learner/grad_norm"] == pytest.approx(math.sqrt(81 + 36 + 16) / 8, abs=1e-6)
    # policy_loss is unweighted, one token mean (-A) per micro-batch, averaged over the step's 3 micro-batches
    assert m["learner/policy_loss"] == pytest.approx((-1 + 2 - 0.5) / 3, abs=1e-7)
    assert learner.metric_counts["learner/policy_loss"] == 3
    assert m["learner/optimizer_steps"] == 1.0


def test_figures_over_three_optimiser_steps_are_means_over_all_of_them() -> None:
    """Three optimiser steps of one micro-batch each: ``loss`` and ``policy_loss`` are means over the three steps,
    counted 3 (catches the last step's loss or metrics logged for the whole call, a count of 1)."""
    learner = TorchLearner(FakePolicy(3), None, _cfg(grad_accum=1))
    m, grads = _run(learner, _three())
    assert len(grads) == 3 and m["learner/optimizer_steps"] == 3.0
    assert m["learner/loss"] == pytest.approx((-1 + 2 - 0.5) / 3, abs=1e-7)  # each step: -A of its one item
    assert m["learner/policy_loss"] == pytest.approx((-1 + 2 - 0.5) / 3, abs=1e-7)
    assert learner.metric_counts["learner/policy_loss"] == 3


def test_reduce_metric_takes_min_of_min_keys_and_max_of_max_keys() -> None:
    """``ratio_min`` is the smallest micro-batch value, ``ratio_max`` the largest, others the mean (catches a
    ``startswith`` for ``endswith``)."""
    assert reduce_metric("ratio_min", [3.0, 1.0, 2.0]) == 1.0
    assert reduce_metric("ratio_max", [3.0, 1.0, 2.0]) == 3.0
    assert reduce_metric("policy_loss", [3.0, 1.0, 2.0]) == 2.0


def test_two_nonfinite_steps_in_one_call_count_two() -> None:
    """Both optimiser steps of one call see a NaN loss: ``nonfinite_skipped`` is 2, not 1."""
    items = [_item(0, "text", 2, 1.0), _item(1, "text", 2, -1.0)]
    for it in items:
        it.segment.logprobs[0] = math.nan
    learner = TorchLearner(FakePolicy(2), None, _cfg(grad_accum=1))
    m = learner.step(items)
    assert m["learner/nonfinite_skipped"] == 2.0 and learner.skipped_steps == 2
    assert m["learner/optimizer_steps"] == 0.0


@pytest.mark.parametrize("rank, expected, count", [(0, [-6 / 8, 0.0, -4 / 8], 2), (1, [0.0, 4 / 8, 0.0], 1)])
def test_a_rank_of_two_backs_its_own_micro_batches_times_the_rank_count(rank: int, expected: list[float],
                                                                         count: int) -> None:
    """Two ranks, 3 micro-batches: rank 0 runs the 1st and 3rd, rank 1 the 2nd and a filler at scale 0; each
    gradient is world x its share (DeepSpeed averages), the filler adds nothing to the gradient or the figures
    (catches the world factor dropped, a filler at scale 1, a filler's metrics counted)."""
    learner = TorchLearner(FakePolicy(3), None, _cfg())
    learner.rank, learner.world = rank, 2
    m, grads = _run(learner, _three())
    torch.testing.assert_close(grads[0], torch.tensor(expected), rtol=0, atol=1e-7)
    assert learner.metric_counts["learner/policy_loss"] == count


@pytest.mark.parametrize("world", [1, 2])
def test_rehearsal_adds_coef_once_per_step_and_draws_from_zero(world: int) -> None:
    """``critic_replay``: coef x the rehearsal gradient once per optimiser step across the ranks, the stream
    starting at example 0 (catches it added per micro-batch, not divided by the ranks, drawing from 1)."""
    policy = FakePolicy(3)
    replay = FakeReplay(policy)
    learner = TorchLearner(policy, None, _cfg(critic_replay={"coef": 0.5}), replay=replay)
    learner.rank, learner.world = 0, world
    m, grads = _run(learner, _three())
    policy_part = [-3 / 8, 2 / 8, -2 / 8] if world == 1 else [2 * -3 / 8, 0.0, 2 * -2 / 8]  # rank 0's chunks
    torch.testing.assert_close(grads[0], torch.tensor(policy_part) + 0.5, rtol=0, atol=1e-7)
    assert replay.drawn == [0] and learner.replay_draws == 1
    assert m["learner/critic_replay_ce"] == 0.0


# ------------------------------------------------------------------------------------------ GRPO.loss directly
def _grpo(cfg: Learner) -> GRPO:
    return GRPO(Recipe(learner=cfg))


def test_modality_mean_micro_batch_loss_weights_and_kl_per_modality() -> None:
    """``modality_mean`` on a micro-batch of one text and one image row within a mini-batch of two each: each
    modality's token mean x its share of that modality's tokens, row weights on the clipped term, each modality's
    own KL weight, ``policy_loss`` the sum of both modalities', ``kl_text``/``kl_image`` by ``kl_kind`` (catches
    KL weights swapped, row weights dropped, a share over rows or over both modalities, one modality's
    policy_loss only, the metric KL always k3)."""
    items = [_item(0, "text", 1, 1.0), _item(1, "image", 2, -1.0), _item(2, "text", 3, 0.5), _item(3, "image", 2, 2.0)]
    cfg = _cfg(loss_type="modality_mean", kl_coef_text=0.5, kl_coef_image=0.25, kl_kind="k1",
               loss_weight_image=3.0, stage_weights={"reason": 2.0})
    policy, ref = FakePolicy(4), FakeReference({0: 0.4, 1: -0.4, 2: 0.0, 3: 0.0})
    algo, models = _grpo(cfg), LearnerModels(policy, ref)
    ctx = algo.prepare(models, items)
    loss, m, _ = algo.loss(models, items, range(0, 2), range(0, 4), ctx)
    # text row 0: -A*2 + 0.5*(0 - 0.4) = -2.2, share 1 of 4 text tokens; image row 1: 1*3 + 0.25*(0.4) = 3.1, 2 of 4
    assert float(loss.detach()) == pytest.approx(-2.2 / 4 + 3.1 / 2, abs=1e-6)
    assert m["policy_loss"] == pytest.approx(-1.0 + 1.0, abs=1e-7)  # text -A=-1 plus image -A=+1, unweighted
    assert m["kl_text"] == pytest.approx(-0.4, abs=1e-6) and m["kl_image"] == pytest.approx(0.4, abs=1e-6)
    loss.backward()
    # d/dw: text (-2 + 0.5) x 1/4; image 2 tokens x (3 + 0.25) / 2 tokens x 1/2
    torch.testing.assert_close(policy.model.w.grad, torch.tensor([-1.5 / 4, 3.25 / 2, 0.0, 0.0]), rtol=0, atol=1e-6)


def test_token_mean_kl_weight_follows_the_rows_modality() -> None:
    """Pooled ``token_mean``: the text row pays the text KL weight, the image row the image one (catches the two
    weights passed the other way round)."""
    items = [_item(0, "text", 2, 0.0), _item(1, "image", 1, 0.0)]
    cfg = _cfg(kl_coef_text=1.0, kl_coef_image=0.0, kl_kind="k1")
    policy, ref = FakePolicy(2), FakeReference({0: -1.0, 1: -1.0})
    algo, models = _grpo(cfg), LearnerModels(policy, ref)
    loss, _, _ = algo.loss(models, items, range(0, 2), range(0, 2), algo.prepare(models, items))
    # KL k1 = w - c = 1 on every token: 2 text tokens x weight 1, 1 image token x weight 0, over 3 tokens
    assert float(loss.detach()) == pytest.approx((2 * 1.0 + 1 * 0.0) / 3, abs=1e-7)


@pytest.mark.parametrize("loss_type, expected", [
    # rows of the chunk: image of 3 actions (A=1, its own length 3), text of 1 (A=2, reason: max_new_tokens 16)
    ("dr_grpo", (3 * -1 / 3 + 1 * -2 / 16) / 2 * (2 / 4)),
    ("seq_mean", (-1 + -2) / 2 * (2 / 4)),
    ("token_mean", (3 * -1 + 1 * -2) / 4 * (4 / 10)),
])
def test_second_micro_batch_loss_by_loss_type(loss_type: str, expected: float) -> None:
    """The second micro-batch of a mini-batch of 4 rows (10 actions): its aggregate x its share of rows (or of
    actions for token_mean); ``dr_grpo`` divides a text row by its stage's ``max_new_tokens`` and an image by its
    own length (catches the per-row normaliser read by position in the micro-batch or without the rollout, and a
    pooled aggregate or share that ignores ``loss_type``)."""
    items = [_item(0, "text", 2, 1.0), _item(1, "text", 4, -1.0), _item(2, "image", 3, 1.0), _item(3, "text", 1, 2.0)]
    algo, models = _grpo(_cfg(loss_type=loss_type)), LearnerModels(FakePolicy(4), None)
    loss, _, _ = algo.loss(models, items, range(2, 4), range(0, 4), algo.prepare(models, items))
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-7)


def test_token_and_flow_rows_each_take_their_share_of_their_own_kind() -> None:
    """A micro-batch of a text row (2 tokens, A=1) and a flow image (2 SDE steps, A=2) in a mini-batch with one more
    of each: the token mean x 2 of the mini-batch's 4 tokens plus the flow step mean x 2 of its 4 steps (catches
    either share taken over the whole mini-batch, flow steps counted as tokens or tokens as steps)."""
    flow = {"kind": "denoising"}
    items = [_item(0, "text", 2, 1.0), _item(1, "image", 2, 2.0), _item(2, "text", 2, -1.0), _item(3, "image", 2, 1.0)]
    for k in (1, 3):
        items[k].segment.token_ids, items[k].segment.action = [], flow
    algo, models = _grpo(_cfg()), LearnerModels(FakePolicy(4), None)
    loss, m, _ = algo.loss(models, items, range(0, 2), range(0, 4), algo.prepare(models, items))
    assert float(loss.detach()) == pytest.approx(-1.0 * (2 / 4) + -2.0 * (2 / 4), abs=1e-6)
    assert m["flow_policy_loss"] == pytest.approx(-2.0, abs=1e-6) and m["policy_loss"] == pytest.approx(-1.0)


def _critic_tree():
    """A flawed image whose four critiques all stop (-1.0: a group that agrees) and a correct one whose four
    critiques mix three stops (1.0) and an edit (-0.5)."""
    from r3_rl.trajectory import Node, PromptItem, Tree

    tree = Tree(id="t", prompt=PromptItem(id="p", prompt="x"))
    for img, ok in (("bad", False), ("good", True)):
        tree.add(Node(id=img, parent=None, stage="generate", round=0, group_id="images", policy_version=-1,
                      reward=1.0 if ok else 0.0, meta={"correct": ok}))
    for j in range(4):
        tree.add(Node(id=f"bad{j}", parent="bad", stage="reflect", round=1, group_id="bad/critiques",
                      policy_version=0, segment=Segment("text", {}, [1], [-0.1]), reward=-1.0, stop=True))
        tree.add(Node(id=f"good{j}", parent="good", stage="reflect", round=1, group_id="good/critiques",
                      policy_version=0, segment=Segment("text", {}, [1], [-0.1]), reward=-0.5 if j == 0 else 1.0,
                      stop=j != 0))
    return tree


@pytest.mark.parametrize("baseline, trained, dropped", [("group", 4, 4), ("verdict", 8, 0)])
def test_only_the_verdict_baseline_keeps_a_critique_group_that_agrees(baseline: str, trained: int,
                                                                      dropped: int) -> None:
    """``critic_baseline: group`` drops the flawed image's unanimous critiques (no signal); ``verdict`` pools them
    across images and keeps them (catches the pooled stage keyed on the wrong baseline)."""
    items, counts, stats = _grpo(_cfg(critic_baseline=baseline)).batch([_critic_tree()], 0)
    assert (len(items), counts.zero_signal_items, stats["zero_signal_items"]) == (trained, dropped, float(dropped))


def test_own_chunks_cover_every_item_in_micro_batches() -> None:
    """Without a rank's chunks, ``prepare`` covers 5 items in micro-batches of 2 as 0-1, 2-3, 4 (an off-by-one
    left the last item without recomputed old log-probs)."""
    assert LearnerModels(None).own_chunks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert LearnerModels(None, chunks=[range(1, 2)]).own_chunks(5, 2) == [range(1, 2)]


def test_recomputed_old_logps_report_the_absolute_gap_per_action() -> None:
    """``old_logp: recompute``: the sampler gap is the mean and max of |recomputed - sampled| over actions, counted
    in actions; flow images get their own rescored steps (catches a signed gap, a count of items, flow scores
    handed to the wrong images)."""
    items = [_item(0, "text", 2, 1.0), _item(1, "text", 1, 1.0), _item(2, "image", 2, 1.0), _item(3, "image", 1, 1.0)]
    for k in (2, 3):  # flow images: 2 and 1 SDE steps
        items[k].segment.token_ids, items[k].segment.action = [], {"kind": "denoising"}
    policy = FakePolicy(4)
    with torch.no_grad():
        policy.model.w.copy_(torch.tensor([0.5, -0.25, 0.125, -2.0]))
    algo = _grpo(_cfg(old_logp="recompute", micro_batch_size=4))
    ctx = algo.prepare(LearnerModels(policy, None), items)
    torch.testing.assert_close(ctx["old_logp"][0], torch.tensor([-0.5, -0.5]), rtol=0, atol=0)
    torch.testing.assert_close(ctx["old_logp"][2], torch.tensor([-0.875, -0.875]), rtol=0, atol=0)  # each its own
    torch.testing.assert_close(ctx["old_logp"][3], torch.tensor([-3.0]), rtol=0, atol=0)
    assert ctx["metrics"]["learner/sampler_flow_logp_gap_mean"] == pytest.approx((0.125 * 2 + 2.0) / 3, abs=1e-12)
    assert ctx["metrics"]["learner/sampler_logp_gap_mean"] == pytest.approx((0.5 + 0.5 + 0.25) / 3, abs=1e-12)
    assert ctx["metrics"]["learner/sampler_logp_gap_max"] == pytest.approx(0.5, abs=1e-12)
    assert ctx["metric_counts"]["learner/sampler_logp_gap_mean"] == 3


# ------------------------------------------------------------------------------------------ precision, clipping
def test_compute_dtype_counts_elements_not_tensors() -> None:
    """100 bf16 weights and three fp32 scalars compute in bf16 (counting tensors said fp32)."""
    from r3_rl.learner.precision import compute_dtype

    module = torch.nn.Module()
    module.big = torch.nn.Parameter(torch.zeros(10, 10, dtype=torch.bfloat16))
    for name in ("a", "b", "c"):
        setattr(module, name, torch.nn.Parameter(torch.zeros(1)))
    assert compute_dtype(module) == torch.bfloat16


def test_master_weights_accumulate_micro_batches_in_fp32_and_free_the_bf16_grad() -> None:
    """Two backward passes add into the fp32 master's gradient and leave none on the bf16 weight; ``zero_grad``
    clears the master (catches an overwrite, a bf16 gradient kept and added again, masters never cleared)."""
    from r3_rl.learner.precision import MasterWeights

    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    masters = MasterWeights([p])
    assert masters.params[0].dtype == torch.float32
    (p.float() * torch.tensor([1.0, 2.0])).sum().backward()
    (p.float() * torch.tensor([0.5, 0.25])).sum().backward()
    assert p.grad is None
    torch.testing.assert_close(masters.params[0].grad, torch.tensor([1.5, 2.25]), rtol=0, atol=0)
    masters.zero_grad()
    assert masters.params[0].grad is None


def test_master_weights_load_checks_the_count_and_rounds_into_the_model() -> None:
    """Loading masters puts them (rounded) into the bf16 model at once; a wrong count is refused (catches the copy
    and the length check dropped)."""
    from r3_rl.learner.precision import MasterWeights

    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    masters = MasterWeights([p])
    masters.load_state_dict([torch.tensor([1.5, -2.0])])
    assert torch.equal(p.detach(), torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="2 master weights saved, 1 expected"):
        masters.load_state_dict([torch.zeros(2), torch.zeros(2)])


def test_a_newer_master_set_takes_over_the_parameters_gradient() -> None:
    """A second ``MasterWeights`` over the same bf16 weight (a rebuilt optimiser) gets its gradient; the first's
    hook is gone (catches the registry dropping live entries or keeping stale hooks)."""
    from r3_rl.learner.precision import MasterWeights

    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    first, second = MasterWeights([p]), MasterWeights([p])
    (p.float() * torch.tensor([1.0, 3.0])).sum().backward()
    assert first.params[0].grad is None
    torch.testing.assert_close(second.params[0].grad, torch.tensor([1.0, 3.0]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipping_scales_the_master_gradient_to_grad_clip(dtype: torch.dtype) -> None:
    """Gradient (3, 4), ``grad_clip: 1``: AdamW steps with (0.6, 0.8) and the logged norm is 5, for fp32 and for
    bf16 weights (catches clipping dropped, or applied to the bf16 weights whose gradient already moved to the
    masters)."""
    from r3_rl.learner.optim import TorchOptim

    module = _Weights(2, dtype)
    optim = TorchOptim([module], _cfg(grad_clip=1.0))
    seen: list[torch.Tensor] = []
    optim.optimizer.register_step_pre_hook(lambda opt, args, kw: seen.append(optim.params[0].grad.clone()))
    optim.backward((module.w.float() * torch.tensor([3.0, 4.0])).sum())
    applied, norm = optim.step()
    assert applied and norm == pytest.approx(5.0, abs=1e-6)
    torch.testing.assert_close(seen[0], torch.tensor([0.6, 0.8]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ modality experts
def _mot_config():
    from transformers import LlamaConfig

    from r3_rl.policy.tiny_mot import modality_config

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return modality_config(config, 9, 19)


def test_modality_config_spans_every_image_id_and_routes_its_ends() -> None:
    """Image ids 9..27 (19 of them) route to the image copy, 8 and 28 do not (catches ``>`` for ``>=``, ``<=`` for
    ``<``, a span one short)."""
    from r3_rl.policy.tiny_mot import CONFIG_KEY, ROUTE_KEY, MoTLlamaForCausalLM

    config = _mot_config()
    assert getattr(config, CONFIG_KEY) == [9, 28]
    model = MoTLlamaForCausalLM(config)
    _, kwargs = model._add_route(model.model, (), {"input_ids": torch.tensor([[8, 9, 27, 28]])})
    assert kwargs[ROUTE_KEY].tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("mask", [[True, True], [False, False], [True, False]])
def test_each_token_goes_through_its_modalitys_copy(mask: list[bool]) -> None:
    """All-image (one sampled image token per step), all-text and mixed inputs each use the copy of their tokens'
    modality (catches an all-image or all-text shortcut taking the other copy)."""
    from r3_rl.policy.tiny_mot import ModalityExperts, Route

    route = Route()
    experts = ModalityExperts(torch.nn.Linear(2, 1, bias=False), route)
    with torch.no_grad():
        experts.text.weight.copy_(torch.tensor([[1.0, 0.0]]))
        experts.image.weight.copy_(torch.tensor([[0.0, 1.0]]))
    x = torch.tensor([[[2.0, 3.0], [5.0, 7.0]]])
    route.image = torch.tensor([mask])
    out = experts(x)
    expected = [[3.0 if mask[0] else 2.0], [7.0 if mask[1] else 5.0]]
    assert out.tolist() == [expected]

