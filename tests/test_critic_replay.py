"""``learner.critic_replay``: supervised critiques rehearsed in every optimiser step (PPO-ptx for the critic).

The rehearsal must add exactly ``coef`` x the gradient of the critiques' cross-entropy -- computed here straight
from :func:`~r3_rl.policy.warmstart.sft_loss` and autograd, apart from the learner -- once per optimiser step
whatever the micro-batching; its examples must be a pure function of (seed, step) so that a resumed run
rehearses what an uninterrupted one would, and give identical weights; and it must reach the fp32 masters of
a bf16 policy.  With ``questions`` the same images' yes/no questions join it, averaged apart, answered with the
truth about each image.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import learner_helpers
from learner_helpers import clone, learner_cfg, sample_items, step_grads, weights

from r3_rl.blocks.prompts import split_of
from r3_rl.blocks.world import N_TOKENS
from r3_rl.config import Recipe
from r3_rl.learner.torch_learner import TorchLearner
from r3_rl.policy.critique_replay import CritiqueReplay
from r3_rl.policy.tiny import TinyUnifiedPolicy
from r3_rl.policy.tiny_tokenizer import image_token
from r3_rl.policy.warmstart import sft_loss

STOP = "no further edit needed"


def tiny_policy() -> TinyUnifiedPolicy:
    """The learner tests' tiny policy on the demo's 4x4 grid (the warm start's layouts need room)."""
    return learner_helpers.tiny_policy(rows=4, cols=4)


def _recipe(coef: float = 0.5, examples: int = 6, questions: int = 0) -> Recipe:
    return Recipe(seed=3, learner={"critic_replay": {"coef": coef, "examples": examples, "questions": questions}})


def _learner(policy, coef: float, questions: int = 0, **kw) -> TorchLearner:
    cfg = learner_cfg(kl_coef_text=0.0, kl_coef_image=0.0,
                      critic_replay={"coef": coef, "examples": 6, "questions": questions}, **kw)
    replay = CritiqueReplay(policy, Recipe(seed=3, learner=cfg)) if coef else None
    return TorchLearner(policy, None, cfg, replay=replay)


@pytest.mark.parametrize("questions", [0, 2])
def test_rehearsal_adds_coef_times_the_cross_entropy_gradient_once_per_optimiser_step(questions: int) -> None:
    base = tiny_policy()
    items = sample_items(base)
    plain = step_grads(_learner(clone(base), 0.0, micro_batch_size=2), items)
    replayed = _learner(clone(base), 0.5, questions, micro_batch_size=2)  # three micro-batches: added once
    got = step_grads(replayed, items)
    peer = clone(base)
    critiques, asked = CritiqueReplay(peer, _recipe(questions=questions)).examples(0)
    assert (len(asked) > 6) == bool(questions)
    ce = sft_loss(peer, critiques) + (sft_loss(peer, asked) if questions else 0.0)  # each part its own mean
    params = [p for p in peer.model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(ce, params, allow_unused=True)
    assert len(got) == len(plain) == len(expected)
    for g, p, e in zip(got, plain, expected):
        want = p + 0.5 * (torch.zeros_like(p) if e is None else e)
        assert torch.allclose(g, want, atol=1e-6, rtol=1e-5)
    assert max((g - p).abs().max().item() for g, p in zip(got, plain)) > 1e-4  # the rehearsal does move them
    assert replayed.replay_draws == 1


def test_data_parallel_ranks_add_one_rehearsal_between_them() -> None:
    """Each rank adds coef / world x the cross-entropy; DeepSpeed averages the ranks' gradients (each scaled by
    world, as every loss is), so the average is the one-rank gradient, rehearsal included."""
    base = tiny_policy()
    items = sample_items(base)
    one = step_grads(_learner(clone(base), 0.5, micro_batch_size=2), items)
    per_rank = []
    for rank in (0, 1):
        learner = _learner(clone(base), 0.5, micro_batch_size=2)
        learner.rank, learner.world = rank, 2
        per_rank.append(step_grads(learner, items))
    for g, a, b in zip(one, *per_rank):
        assert torch.allclose(g, (a + b) / 2, atol=1e-6, rtol=1e-5)


def test_metric_and_one_draw_per_optimiser_step() -> None:
    policy = tiny_policy()
    learner = _learner(policy, 1.0, micro_batch_size=2, grad_accum=1)  # three optimiser steps per batch
    m = learner.step(sample_items(policy))
    assert m["learner/optimizer_steps"] == 3.0 and learner.replay_draws == 3
    assert 0.0 < m["learner/critic_replay_ce"] < 20.0
    assert "learner/critic_replay_ce" not in _learner(tiny_policy(), 0.0).step(sample_items(policy))


def test_examples_are_a_function_of_seed_and_step_on_training_prompts() -> None:
    policy = tiny_policy()
    a, b = CritiqueReplay(policy, _recipe()), CritiqueReplay(policy, _recipe())
    assert a.examples(4) == b.examples(4)  # a fresh object (a resumed run) draws the same critiques
    assert a.examples(4) != a.examples(5)
    other_seed = CritiqueReplay(policy, _recipe().model_copy(update={"seed": 4}))
    assert other_seed.examples(4) != a.examples(4)
    stop = policy.encode(STOP)
    verdicts = []
    for k in range(40):
        for _, target in a.examples(k).critiques:
            verdicts.append(target[-1 - len(stop):-1] == stop)
        assert split_of(a.prompts.train_prompt(k * a.per_step).prompt) == "train"  # never a held-out prompt
    assert 0.35 < sum(verdicts) / len(verdicts) < 0.65  # flawed half the time


def test_questions_ask_about_the_rehearsed_images_and_answer_with_their_truth() -> None:
    """A correct image (critique: stop) answers every question of its prompt "yes"; "no" answers come only from
    flawed images; and asking questions leaves the critiques' stream as it was."""
    policy = tiny_policy()
    plain, asking = CritiqueReplay(policy, _recipe()), CritiqueReplay(policy, _recipe(questions=2))
    stop, no = policy.encode(STOP), policy.encode("no")
    cells = {policy.encode(image_token(k))[0] for k in range(N_TOKENS)}

    def image_of(ids: list[int]) -> list[int]:
        return [i for i in ids if i in cells]

    answers = {True: [], False: []}
    for k in range(30):
        critiques, questions = asking.examples(k)
        assert critiques == plain.examples(k).critiques and plain.examples(k).questions == []
        assert len(critiques) < len(questions) <= 2 * len(critiques)  # up to 2 each (one-object prompts have 1)
        at = 0  # the questions follow their images' order
        for q_ctx, answer in questions:
            while image_of(q_ctx) != image_of(critiques[at][0]):
                at += 1  # raises IndexError if a question is about no rehearsed image
            assert len(image_of(q_ctx)) == 16 and policy.decode(answer) in ("yes", "no")
            correct = critiques[at][1][-1 - len(stop):-1] == stop
            answers[correct].append(answer[:-1] == no)
    assert not any(answers[True]) and len(answers[True]) > 100  # a correct image: every clause holds
    assert 0.15 < sum(answers[False]) / len(answers[False]) < 0.85  # a flawed one fails some clause


def test_resume_continues_the_stream_and_gives_identical_weights(tmp_path: Path) -> None:
    base = tiny_policy()
    items = sample_items(base)
    straight = clone(base)
    learner = _learner(straight, 1.0)
    learner.step(items)
    learner.step(items)
    first = clone(base)
    interrupted = _learner(first, 1.0)
    interrupted.step(items)
    interrupted.save(tmp_path / "ckpt")
    resumed = _learner(first, 1.0)
    resumed.load(tmp_path / "ckpt")
    assert resumed.replay_draws == 1
    resumed.step(items)
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(first)[k]), k


def test_bf16_policy_rehearses_into_its_fp32_masters() -> None:
    base = tiny_policy()
    items = sample_items(base)
    grads = []
    for coef in (0.0, 1.0):
        policy = clone(base)
        policy.model.to(torch.bfloat16)
        learner = _learner(policy, coef)
        g = step_grads(learner, items)
        assert all(q.dtype == torch.float32 for q in learner.optim.params)
        assert all(torch.isfinite(x).all() for x in g)
        grads.append(g)
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) > 1e-4


def test_the_tiny_flow_policy_rehearses_too() -> None:
    """Its critiques read the decoded grid's words like the token policy's, so the same examples train it."""
    from conftest import REPO

    from r3_rl.config import load_recipe
    from r3_rl.policy.registry import policy_class

    recipe = load_recipe(str(REPO / "recipes" / "tiny_flow_blocks.yaml"),
                         ["policy.tiny.hidden_size=32", "policy.tiny.intermediate_size=48", "policy.tiny.num_heads=2",
                          "policy.tiny.num_layers=1", "learner.critic_replay.coef=1.0"])
    policy = policy_class(recipe.policy.kind).from_recipe(recipe, **recipe.policy.options)
    replay = policy.critique_replay(recipe)
    loss = replay.loss(replay.examples(0))
    loss.backward()
    assert torch.isfinite(loss) and policy.model.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,ok", [("tiny", True), ("tiny_flow", True), ("janus", False), ("bagel", False)])
def test_only_policies_with_critiques_to_rehearse_accept_it(kind: str, ok: bool) -> None:
    from r3_rl.policy.registry import recipe_side

    assert bool(getattr(recipe_side(kind), "replays_critiques", False)) is ok
