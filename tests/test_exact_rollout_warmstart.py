"""Exact small cases for the R3 chain loop, the tiny policy's contexts, the warm start's data, the critique
rehearsal, the shared-context rule and the synergy / understanding figures.  Scripted stubs and hand-worked
expectations; no training beyond two stubbed warm-start steps."""
from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from r3_rl.blocks import edits, synthesis
from r3_rl.blocks.world import object_of, token_of
from r3_rl.config import Recipe
from r3_rl.data import BlocksPrompts
from r3_rl.eval.synergy import accuracy_variance, refinement_variance
from r3_rl.eval.understanding import headline
from r3_rl.policy import warmstart as ws
from r3_rl.policy.base import ImageInput, ImageSample, Policy, TextSample
from r3_rl.policy.critique_replay import CritiqueReplay
from r3_rl.policy.registry import build_policy
from r3_rl.policy.shared_context import shared_context_rows
from r3_rl.rollout.chain import r3_chains, rounds_used, stopped
from r3_rl.rollout.parent_mix import parent_feature
from r3_rl.rollout.tree_rl import stage_sampling
from r3_rl.trajectory import PromptItem, Segment

STOP_PHRASE = "no further edit needed"
STOP = f"<think> fine </think> {STOP_PHRASE}"
EDIT = "<think> off </think> make it right"
SAMPLING = stage_sampling(Recipe())


def _seg(kind: str) -> Segment:
    return Segment(kind, {"input_ids": [1]}, [2], [-0.1])


def _img(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, np.uint8)


class Recording(Policy):
    """Image value = 10 x prompt number + edits so far.  The critic stops once an image has had
    ``edits_of[prompt id]`` edits; refine records (prompt id, instruction) per call."""

    version = 0
    model = None  # type: ignore[assignment]

    def __init__(self, edits_of: dict[str, int]) -> None:
        self.edits_of = edits_of
        self.refine_calls: list[list[tuple[str, str]]] = []

    def reason(self, prompts, sampling, generator=None):
        return [TextSample("plan", _seg("text")) for _ in prompts]

    def generate(self, prompts, plans, sampling, generator=None):
        return [ImageSample(_img(10 * int(p.id[1:])), _seg("image"), None) for p in prompts]

    def reflect(self, prompts, images, sampling, generator=None):
        return [TextSample(STOP if int(im.image[0, 0, 0]) % 10 >= self.edits_of[p.id] else EDIT, _seg("text"))
                for p, im in zip(prompts, images)]

    def refine(self, prompts, images, instructions, sampling, generator=None):
        self.refine_calls.append([(p.id, ins) for p, ins in zip(prompts, instructions)])
        return [ImageSample(_img(int(im.image[0, 0, 0]) + 1), _seg("image"), None) for im in images]

    def segment_logprobs(self, *a, **k):
        raise NotImplementedError


def _prompt(i: int) -> PromptItem:
    return PromptItem(f"p{i}", f"prompt {i}", {"tag": "colors"})


# --- chain -------------------------------------------------------------------------------------------------

def test_a_never_stopping_chain_runs_every_round() -> None:
    """Catches a round loop that stops one round early (range(1, rounds))."""
    (tree,) = r3_chains(Recording({"p0": 99}), [_prompt(0)], SAMPLING, rounds=3, stop_phrase=STOP_PHRASE)
    assert set(tree.nodes) == {"plan", "img0", "crit1", "img1", "crit2", "img2", "crit3", "img3"}
    assert rounds_used(tree) == 3 and stopped(tree) is False
    assert int(tree.nodes["img3"].image[0, 0, 0]) == 3


def test_critique_and_refined_image_nodes_carry_their_round() -> None:
    """Catches a critique node labelled with the previous round (round=rnd - 1)."""
    (tree,) = r3_chains(Recording({"p0": 1}), [_prompt(0)], SAMPLING, rounds=3, stop_phrase=STOP_PHRASE)
    assert [(n, tree.nodes[n].round) for n in ("img0", "crit1", "img1", "crit2")] == [
        ("img0", 0), ("crit1", 1), ("img1", 1), ("crit2", 2)]


def test_stopped_is_true_for_an_edit_then_stop_chain() -> None:
    """Catches stopped() needing every critique to stop (all instead of any)."""
    (tree,) = r3_chains(Recording({"p0": 1}), [_prompt(0)], SAMPLING, rounds=3, stop_phrase=STOP_PHRASE)
    assert [tree.nodes["crit1"].stop, tree.nodes["crit2"].stop] == [False, True]
    assert stopped(tree) is True


def test_refine_gets_each_active_chains_own_prompt_and_parsed_instruction() -> None:
    """Catches refine fed prompts[k] instead of prompts[active[k]] and the raw critique instead of its instruction."""
    policy = Recording({"p0": 0, "p1": 2, "p2": 1})
    trees = r3_chains(policy, [_prompt(0), _prompt(1), _prompt(2)], SAMPLING, rounds=3, stop_phrase=STOP_PHRASE)
    # round 1: p0 stops at once, p1 and p2 edit; round 2: p1 edits again, p2 stops; round 3: p1 stops
    assert policy.refine_calls == [[("p1", "make it right"), ("p2", "make it right")], [("p1", "make it right")]]
    assert [int(t.nodes[f"img{rounds_used(t) - 1}"].image[0, 0, 0]) for t in trees] == [0, 12, 21]
    assert trees[1].nodes["img2"].parent == "crit2" and trees[1].nodes["crit2"].edit_instruction == "make it right"


# --- parent_mix --------------------------------------------------------------------------------------------

def test_parent_feature_tag_is_the_prompts_tag() -> None:
    """Catches the tag feature reading the prompt text, or the round feature collapsed to round > 0."""
    parent = SimpleNamespace(prompt=SimpleNamespace(tag="colors", prompt="a photo of a red circle"), round=2)
    assert parent_feature(parent, "tag") == "colors"
    assert parent_feature(parent, "prompt") == "a photo of a red circle"
    assert parent_feature(parent, "round") == 2


# --- shared_context ----------------------------------------------------------------------------------------

def test_shared_context_rule_counts_one_fewer_target_token_and_refuses_a_tie() -> None:
    """Catches the shared cost counting every target token (max(t) not max(t) - 1) and a tie choosing sharing."""
    # 2 distinct contexts x 3 + 4 rows x (4 - 1) = 18 < 4 rows x 5 = 20: sharing saves tokens
    assert shared_context_rows(["a", "a", "a", "b"], [3, 3, 3, 1], [1, 1, 1, 4], [4, 4, 4, 5]) == [0, 0, 0, 1]
    # 2 x 4 + 4 x 3 = 20 == 4 x 5: sharing saves nothing, so one full-row forward
    assert shared_context_rows(["a", "a", "a", "b"], [4, 4, 4, 1], [1, 1, 1, 4], [5, 5, 5, 5]) is None


# --- tiny policy -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy():  # noqa: ANN201
    r = Recipe()
    r.policy.tiny.hidden_size, r.policy.tiny.num_layers, r.policy.tiny.num_heads = 32, 1, 2
    r.policy.tiny.intermediate_size = 48
    return build_policy(r)


def test_contexts_start_with_bos(policy) -> None:  # noqa: ANN001
    """Catches render() dropping the leading <bos> (saved models were trained with it)."""
    ids = policy.render("reason", prompt="a photo of a red circle")
    assert ids[0] == policy.bos_id and ids.count(policy.bos_id) == 1
    assert policy.tok.convert_ids_to_tokens(ids[1:]) == policy.templates["reason"].replace(
        "{prompt}", "a photo of a red circle").split()


def test_generate_context_closes_the_plan_with_the_stop_token(policy) -> None:  # noqa: ANN001
    """Catches the plan not followed by <|im_end|> (the warm start trains plan + stop + generate marker)."""
    plan = "<think> a red circle </think>"
    (ctx,), _ = policy.generate_contexts([PromptItem("x", "a photo of a red circle", {})], [plan])
    reason = policy.render("reason", prompt="a photo of a red circle")
    words = policy.tok.convert_ids_to_tokens(ctx[len(reason):])
    assert words == plan.split() + ["<|im_end|>"] + policy.templates["generate"].split()


def test_decode_drops_the_stop_token(policy) -> None:  # noqa: ANN001
    """Catches decode() keeping <|im_end|> in a critique's text (it then reaches the refiner's instruction)."""
    ids = policy.encode("add a red circle") + [policy.stop_id, policy.pad_id]
    assert policy.decode(ids) == "add a red circle"


def test_refine_cfg_contrast_keeps_the_image(policy) -> None:  # noqa: ANN001
    """Catches refine's unconditional CFG context dropping the parent image (it drops prompt + instruction only)."""
    sp = Recipe().rollout.refine.params()
    sp.cfg_scale = 2.0
    cells = [0, 1, 9, 0] + [0] * 12
    image = ImageInput(image=np.zeros(0), image_tokens=cells)
    (out,) = policy.refine([PromptItem("x", "a photo of a red circle", {})], [image], ["add a red circle"], sp,
                           torch.Generator().manual_seed(0))
    uncond = policy.tok.convert_ids_to_tokens(out.segment.context["uncond_ids"])
    assert [w for w in uncond if w.startswith("<img_")] == [f"<img_{k}>" for k in cells]
    assert "circle" not in uncond and "red" not in uncond


# --- warm start --------------------------------------------------------------------------------------------

def test_canonical_grid_puts_a_position_pair_side_by_side() -> None:
    """Catches the related object placed on the wrong side of its target (then a random layout is used)."""
    right = {"include": [{"class": "square", "count": 1, "color": "red"},
                         {"class": "circle", "count": 1, "color": "blue", "position": ["right of", 0]}]}
    above = {"include": [{"class": "square", "count": 1, "color": "red"},
                         {"class": "circle", "count": 1, "color": "blue", "position": ["above", 0]}]}
    sq, ci = token_of("square", "red"), token_of("circle", "blue")  # 1 and 9
    want = np.zeros((4, 4), np.int64)
    want[1, 1], want[1, 2] = sq, ci
    assert np.array_equal(ws.canonical_grid(right, np.random.default_rng(0), 4, 4), want)
    want = np.zeros((4, 4), np.int64)
    want[1, 1], want[0, 1] = sq, ci
    assert np.array_equal(ws.canonical_grid(above, np.random.default_rng(0), 4, 4), want)


def _grid(policy, ids: list[int]) -> np.ndarray:  # noqa: ANN001
    cells = [int(w[5:-1]) for w in policy.tok.convert_ids_to_tokens(ids) if w.startswith("<img_")]
    return np.asarray(cells[-16:], dtype=np.int64).reshape(4, 4)


def test_a_flawed_trajectory_stays_flawed_in_its_random_layout(policy) -> None:  # noqa: ANN001
    """Catches random_layouts replacing a flawed image by a correct one (the flaw is dropped)."""
    r = Recipe()
    w = r.warmstart
    w.flaw_prob, w.random_layouts, w.miss_prob, w.questions, w.rounds, w.random_edits = 1.0, 1.0, 0.0, 0, 1, 0.0
    prompts = BlocksPrompts(tags=r.data.blocks.tags, seed=0)
    rng = np.random.default_rng(3)
    for k in range(12):
        meta = prompts.train_prompt(k).metadata
        ex = ws.synthetic_examples(policy, prompts, k, 1, w, rng)
        ctx, target = ex[2]  # plan, first image, then the first critique
        assert policy.decode(target).split()[-1] != "needed"  # an edit, not "no further edit needed"
        assert edits.diagnose(_grid(policy, ctx), meta)  # the critiqued image really is flawed


class _OnePrompt:
    """A prompt stream that always gives one prompt and records the indices asked for."""

    def __init__(self, item: PromptItem) -> None:
        self.item, self.asked = item, []

    def train_prompt(self, k: int) -> PromptItem:
        self.asked.append(k)
        return self.item


def test_critic_images_draw_flaw_kinds_evenly(monkeypatch) -> None:  # noqa: ANN001
    """Catches flaws drawn uniformly over candidates instead of evenly over flaw kinds."""
    meta = {"include": [{"class": "circle", "count": 1, "color": "red"}]}
    missing = np.zeros((4, 4), np.int64)  # diagnosed "add"
    recolored = missing.copy()
    recolored[0, 0] = token_of("circle", "blue")  # diagnosed "recolor"
    monkeypatch.setattr(synthesis, "flaw_candidates", lambda grid, m, rng: [missing] * 9 + [recolored])
    cfg = SimpleNamespace(miss_prob=0.0)
    out = ws.critic_images(_OnePrompt(PromptItem("x", "a photo of a red circle", meta)), 0, 400, cfg,
                           np.random.default_rng(0), 4, 4)
    flawed = [g for _, g, _ in out if edits.diagnose(g, meta)]
    share = sum(bool(g[0, 0]) for g in flawed) / len(flawed)
    assert 150 <= len(flawed) <= 250 and 0.4 <= share <= 0.6  # 1 kind in 2, not 1 candidate in 10


def test_critic_steps_use_unseen_prompts_in_order(policy, monkeypatch) -> None:  # noqa: ANN001
    """Catches the critic steps restarting at prompt 0 (re-using the main steps' prompts)."""
    calls: list[tuple[str, int, int]] = []

    def fake_synth(pol, prompts, start, n, cfg, rng):  # noqa: ANN001, ANN202
        calls.append(("synth", start, n))
        return [([1], [2])] * 4

    def fake_critic(pol, prompts, start, n, cfg, rng):  # noqa: ANN001, ANN202
        calls.append(("critic", start, n))
        return [([1], [2])] * n

    monkeypatch.setattr(ws, "synthetic_examples", fake_synth)
    monkeypatch.setattr(ws, "critic_examples", fake_critic)
    r = Recipe()
    r.warmstart.steps, r.warmstart.critic_steps, r.warmstart.batch_size = 2, 2, 8
    state = {k: v.clone() for k, v in policy.model.state_dict().items()}
    try:
        ws.warmstart(policy, r, loss_fn=lambda pol, ex: sum(p.sum() for p in pol.model.parameters()) * 0.0)
    finally:
        policy.model.load_state_dict(state)
    # 8 // 4 = 2 trajectories a step, 8 // 2 = 4 critiques: main prompts 0-3, then 4-5 + 6-9, 10-11 + 12-15
    assert calls == [("synth", 0, 2), ("synth", 2, 2), ("synth", 4, 2), ("critic", 6, 4), ("synth", 10, 2),
                     ("critic", 12, 4)]


def test_cache_key_of_describe_objects_is_the_old_switchs_key() -> None:
    """Catches describe="objects" no longer keyed as the old describe=true (cached warm starts invalidated)."""
    r = Recipe()
    r.warmstart.steps, r.warmstart.describe = 5, "objects"
    warm = {k: v for k, v in r.warmstart.model_dump().items() if k != "critic_steps"}  # critic_steps 0: left out
    warm["describe"] = True
    tiny = {k: v for k, v in r.policy.tiny.model_dump().items() if k not in ("image_input", "experts")}
    blob = json.dumps({"warmstart": warm, "tiny": tiny, "blocks": r.data.blocks.model_dump(),
                       "templates": r.templates.model_dump(), "seed": r.seed}, sort_keys=True)
    assert ws._key(r) == hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- critique rehearsal ------------------------------------------------------------------------------------

def _replay(policy, per_step: int) -> CritiqueReplay:  # noqa: ANN001
    r = Recipe()
    r.learner.critic_replay.examples = per_step
    return CritiqueReplay(policy, r)


def test_rehearsal_steps_take_consecutive_unseen_prompts(policy) -> None:  # noqa: ANN001
    """Catches step k starting at prompt k instead of k x examples (overlapping rehearsals)."""
    replay = _replay(policy, 3)
    replay.prompts = _OnePrompt(PromptItem("x", "a photo of a red circle",
                                           {"include": [{"class": "circle", "count": 1, "color": "red"}]}))
    replay.examples(2)
    assert replay.prompts.asked == [6, 7, 8]


def test_rehearsal_steps_have_their_own_random_stream(policy) -> None:  # noqa: ANN001
    """Catches every step drawing from one random stream (same images whenever the prompts repeat)."""
    replay = _replay(policy, 6)
    replay.prompts = _OnePrompt(PromptItem("x", "a photo of two squares",
                                           {"include": [{"class": "square", "count": 2}],
                                            "exclude": [{"class": "square", "count": 3}]}))
    a, b = replay.examples(0).critiques, replay.examples(1).critiques
    assert a != b


# --- synergy / understanding -------------------------------------------------------------------------------

def test_refinement_variance_of_one_pair_is_nan() -> None:
    """Catches a one-prompt eval dividing by n - 1 = 0 instead of giving NaN."""
    assert math.isnan(refinement_variance({"refinement": {"improved": 1, "worse": 0, "pairs": 1}}))


def test_accuracy_variance_uses_the_rounds_own_scored_counts() -> None:
    """Catches round r's variance weighted by round 0's scored counts."""
    rep = {"accuracy": [0.75, 0.5], "prompts": 4, "scored": {"a": [2, 4], "b": [2, 2]},
           "per_tag": {"a": [0.5, 0.5], "b": [1.0, 0.5]}}
    # round 1: a 4 scored at 0.5 -> 0.25 / 3, weight (4/6)^2; b 2 scored at 0.5 -> 0.25 / 1, weight (2/6)^2
    assert accuracy_variance(rep, 1) == pytest.approx((16 / 36) * (0.25 / 3) + (4 / 36) * 0.25)  # 7 / 108
    # round 0: a 2 at 0.5 -> 0.25, weight 1/4; b 2 at 1.0 -> 0
    assert accuracy_variance(rep, 0) == pytest.approx(0.25 * 0.25)


def test_headline_yes_no_accuracy_is_the_plain_accuracy() -> None:
    """Catches the headline's yes/no accuracy reading the balanced accuracy."""
    rep = {"understanding": {"verdict": {"overall": {"balanced_accuracy": 0.7}},
                             "yes_no": {"available": True, "accuracy": 0.8, "balanced_accuracy": 0.6}}}
    out = headline(rep)
    assert out["yes_no_accuracy"] == 0.8 and out["verdict_balanced_accuracy"] == 0.7


# --- second batch ------------------------------------------------------------------------------------------

class _OwnPhrase(Recording):
    """The critic says the recipe's own stop phrase "looks good" on every image."""

    def reflect(self, prompts, images, sampling, generator=None):
        return [TextSample("<think> fine </think> looks good", _seg("text")) for _ in prompts]


def test_chain_stops_on_the_recipes_own_stop_phrase() -> None:
    """Catches the chain parsing verdicts with the default phrase instead of templates.stop_phrase."""
    (tree,) = r3_chains(_OwnPhrase({}), [_prompt(0)], SAMPLING, rounds=3, stop_phrase="looks good")
    assert set(tree.nodes) == {"plan", "img0", "crit1"} and tree.nodes["crit1"].stop is True


def test_reference_verdicts_are_round_one_critiques() -> None:
    """Catches reference-set verdicts filed under round 0 (a critique of a first image is round 1, as in chains)."""
    from r3_rl.blocks.prompts import heldout_prompts
    from r3_rl.blocks.reference import reference_pairs
    from r3_rl.eval.understanding import reference_report
    from r3_rl.rewards.reward_set import RewardSet
    from r3_rl.trajectory import SamplingParams

    class AlwaysStop(Recording):
        def reflect(self, prompts, images, sampling, generator=None):
            return [TextSample(STOP, _seg("text")) for _ in prompts]

    refs = reference_pairs(heldout_prompts(4, seed=0), 0, 4, 4)
    rep = reference_report(AlwaysStop({}), refs, SamplingParams(greedy=True), STOP_PHRASE,
                           RewardSet.from_specs([{"name": "blocks", "options": {"binary": True}}]), 1.0, yes_no=False)
    assert list(rep["verdict"]["per_round"]) == ["1"]
    one = rep["verdict"]["per_round"]["1"]
    assert (one["stop_on_correct"], one["edit_on_flawed"], one["balanced_accuracy"]) == (1.0, 0.0, 0.5)


def test_synergy_figures_keep_before_and_after_apart() -> None:
    """Catches refinement_before or stop_rate_after read from the wrong report."""
    from r3_rl.eval.synergy import synergy_figures

    before = {"accuracy": [0.4, 0.5], "stop_rate": 0.9, "refinement": {"improved": 3, "worse": 1, "pairs": 10}}
    after = {"accuracy": [0.55, 0.62], "stop_rate": 0.5, "refinement": {"improved": 2, "worse": 2, "pairs": 10}}
    fig = synergy_figures(before, after)
    assert fig["refinement_before"] == pytest.approx(0.2) and fig["refinement_after"] == 0.0
    assert (fig["stop_rate_before"], fig["stop_rate_after"]) == (0.9, 0.5)
    assert fig["first_image_gain"] == pytest.approx(0.15)


def test_refine_example_follows_its_critiques_first_fix(policy, monkeypatch) -> None:  # noqa: ANN001
    """Catches the refine example taught another fix (ops[-1]) than the critique before it names (ops[0])."""
    meta = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1}]}
    monkeypatch.setattr(synthesis, "perturb", lambda good, m, rng: np.zeros_like(good))  # both objects missing
    cfg = SimpleNamespace(flaw_prob=1.0, random_layouts=0.0, questions=0, random_edits=0.0, rounds=1, miss_prob=0.0,
                          fix_prob=1.0, describe="none")
    ex = ws.synthetic_examples(policy, _OnePrompt(PromptItem("x", "a photo of a square and a circle", meta)), 0, 1,
                               cfg, np.random.default_rng(0))
    (_, crit), (ctx, target) = ex[2], ex[3]
    assert policy.decode(crit).split("</think>")[1].split() == ["add", "a", "square"]
    words = policy.tok.convert_ids_to_tokens(ctx)
    assert words[words.index("</image>") + 1:words.index("<|im_end|>")] == ["add", "a", "square"]
    objects = [object_of(int(k)) for k in _grid(policy, target).reshape(-1) if k]
    assert len(objects) == 1 and objects[0][0] == "square"  # the square was added, as the critique said


def test_sft_loss_is_the_mean_cross_entropy_of_each_unpadded_sequence(policy) -> None:  # noqa: ANN001
    """Catches target tokens masked out of attention (mask only over the context) in the padded batch."""
    v = policy.tok.get_vocab()
    a, b, c, d = v["red"], v["square"], v["add"], v["circle"]
    batch = [([policy.bos_id, a, b], [c, d, policy.stop_id]), ([policy.bos_id, a], [c])]
    total, count = 0.0, 0
    with torch.no_grad():
        for ctx, tgt in batch:  # one sequence at a time, no padding at all
            logits = policy.model(input_ids=torch.tensor([ctx + tgt])).logits[0].float().log_softmax(-1)
            for j, t in enumerate(tgt):
                total -= float(logits[len(ctx) - 1 + j, t])
                count += 1
        got = float(ws.sft_loss(policy, batch))
    assert got == pytest.approx(total / count, rel=1e-5)
