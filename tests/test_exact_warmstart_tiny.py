"""Exact small cases (round 11C audit) of the tiny policy's warm start and its neighbours:
r3_rl.policy.{warmstart,tiny,critique_replay,tiny_recipe,tiny_tokenizer}.

Canonical layouts of every relation and of raster order, the synthetic trajectories' contexts and which image each
example is about, random instructions, TIIF questions, the optimiser step and the one-cycle schedule (hand-worked
numbers), the warm start's batches and learning rates, its cache key and cache reuse, the tiny policy's stop
token, contexts, features and grouping, the rehearsal's leniency and non-square grids, and the tiny recipe's checks.
Each test names the one-point bug it catches.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from learner_helpers import tiny_policy

from r3_rl.blocks import codec, edits
from r3_rl.blocks.world import SHAPES, token_of
from r3_rl.config import Recipe, Templates, load_recipe
from r3_rl.data import BlocksPrompts
from r3_rl.errors import UserError
from r3_rl.policy import warmstart as ws
from r3_rl.policy.base import ImageInput
from r3_rl.policy.critique_replay import CritiqueReplay
from r3_rl.policy.tiny import TinyUnifiedPolicy
from r3_rl.trajectory import PromptItem, SamplingParams, Segment
from test_exact_policies_plan import assert_each_sampling_scored_as_alone

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_blocks.yaml"


@pytest.fixture(scope="module")
def policy() -> TinyUnifiedPolicy:
    return tiny_policy(rows=4, cols=4)


def _cells(policy: TinyUnifiedPolicy, ids: list[int]) -> list[int]:
    return [int(w[5:-1]) for w in policy.tok.convert_ids_to_tokens(ids) if w.startswith("<img_")]


def _cfg(**kw) -> object:  # noqa: ANN003
    w = Recipe().warmstart
    w.questions, w.random_layouts, w.random_edits, w.miss_prob, w.describe = 0, 0.0, 0.0, 0.0, "none"
    for k, v in kw.items():
        setattr(w, k, v)
    return w


class _OnePrompt:
    def __init__(self, item: PromptItem) -> None:
        self.item = item

    def train_prompt(self, k: int) -> PromptItem:
        return self.item


# ------------------------------------------------------------------ canonical layouts
@pytest.mark.parametrize("relation, cell", [("left of", (1, 0)), ("below", (2, 1)), ("right of", (1, 2)),
                                            ("above", (0, 1))])
def test_canonical_grid_puts_every_relation_next_to_its_target(relation: str, cell: tuple[int, int]) -> None:
    """Catches a wrong offset for "left of" / "below" (the layout silently falls back to a random one)."""
    meta = {"include": [{"class": "square", "count": 1, "color": "red"},
                        {"class": "circle", "count": 1, "color": "blue", "position": [relation, 0]}]}
    want = np.zeros((4, 4), np.int64)
    want[1, 1], want[cell] = token_of("square", "red"), token_of("circle", "blue")
    assert np.array_equal(ws.canonical_grid(meta, np.random.default_rng(0), 4, 4), want)


def test_canonical_grid_lays_counted_objects_out_in_raster_order() -> None:
    """Catches column-major placement and a count short by one (then a random layout is used)."""
    meta = {"include": [{"class": "square", "count": 2, "color": "red"}, {"class": "circle", "count": 2,
                                                                          "color": "green"}]}
    got = ws.canonical_grid(meta, np.random.default_rng(0), 2, 3)
    sq, ci = token_of("square", "red"), token_of("circle", "green")
    assert got.tolist() == [[sq, sq, ci], [ci, 0, 0]]


# ------------------------------------------------------------------ synthetic trajectories
def test_the_generate_example_context_is_the_policys_own_generate_context(policy: TinyUnifiedPolicy) -> None:
    """Catches the warm start's first-image context without the <|im_end|> after the plan (rollout has it)."""
    item = PromptItem("x", "a photo of a red square", {"include": [{"class": "square", "count": 1, "color": "red"}]})
    ex = ws.synthetic_examples(policy, _OnePrompt(item), 0, 1, _cfg(flaw_prob=0.0, rounds=0),
                               np.random.default_rng(0))
    plan = policy.decode(ex[0][1])
    (ctx,), _ = policy.generate_contexts([item], [plan])
    assert ex[1][0] == ctx and len(ex) == 2


def test_questions_are_about_the_flawed_image_the_critic_sees(policy: TinyUnifiedPolicy) -> None:
    """Catches the yes/no questions asked about the correct image instead of the (flawed) one drawn."""
    meta = {"include": [{"class": "square", "count": 1, "color": "red"}]}
    item = PromptItem("x", "a photo of a red square", meta)
    for seed in range(4):
        ex = ws.synthetic_examples(policy, _OnePrompt(item), 0, 1, _cfg(flaw_prob=1.0, questions=1, rounds=1),
                                   np.random.default_rng(seed))
        drawn = policy.decode(ex[1][1]).split()
        (q_ctx, answer), (c_ctx, _) = ex[2], ex[3]
        assert _cells(policy, q_ctx) == [int(w[5:-1]) for w in drawn] == _cells(policy, c_ctx)
        assert policy.decode(answer) == "no"  # the flawed image has no red square where the prompt wants one


def test_random_edits_add_exactly_one_instruction_example_when_always_on(policy: TinyUnifiedPolicy) -> None:
    """Catches the random-edit draw inverted (``>``): with random_edits 1.0 no instruction was ever taught."""
    item = PromptItem("x", "a photo of a red square", {"include": [{"class": "square", "count": 1, "color": "red"}]})
    on = ws.synthetic_examples(policy, _OnePrompt(item), 0, 1, _cfg(flaw_prob=0.0, rounds=0, random_edits=1.0),
                               np.random.default_rng(0))
    off = ws.synthetic_examples(policy, _OnePrompt(item), 0, 1, _cfg(flaw_prob=0.0, rounds=0),
                                np.random.default_rng(0))
    assert len(on) == 3 and len(off) == 2
    words = policy.tok.convert_ids_to_tokens(on[2][0])
    assert _cells(policy, on[2][0]) == _cells(policy, on[1][1])  # the refine context holds the drawn image
    assert "</image>" in words and len(_cells(policy, on[2][1])) == 16


def test_the_second_round_critiques_the_refined_image(policy: TinyUnifiedPolicy) -> None:
    """Catches ``cur = target`` dropped: round 2 would critique the flawed first image again."""
    meta = {"include": [{"class": "square", "count": 1, "color": "red"}]}
    item = PromptItem("x", "a photo of a red square", meta)
    ex = ws.synthetic_examples(policy, _OnePrompt(item), 0, 1, _cfg(flaw_prob=1.0, fix_prob=1.0, rounds=2),
                               np.random.default_rng(1))
    # plan, first image, critique 1, refine 1, critique 2 (of the fixed image: stop, the chain ends)
    assert len(ex) == 5
    refined = _cells(policy, ex[3][1])
    assert _cells(policy, ex[4][0]) == refined
    assert edits.judge(np.asarray(refined).reshape(4, 4), meta).correct
    assert policy.decode(ex[4][1]) == ws.LENIENT


def test_random_instructions_name_another_shape_and_sometimes_a_colour() -> None:
    """Catches a move / swap target that may be the moved shape itself, and a colour on every add / remove."""
    rng = np.random.default_rng(0)
    coloured, targets_ok, seen = set(), True, set()
    for _ in range(300):
        op = ws.random_instruction(rng)
        seen.add(op.kind)
        if op.kind in ("move", "swap"):
            targets_ok &= op.target in SHAPES and op.target != op.shape
        if op.kind in ("add", "remove"):
            coloured.add(op.color is not None)
    assert targets_ok and coloured == {True, False} and seen == set(edits.KINDS)


def test_tiif_questions_are_answered_with_their_given_answer(policy: TinyUnifiedPolicy) -> None:
    """Catches a question without a GenEval clause answered with the opposite of its given answer."""
    grid = np.zeros((4, 4), np.int64)
    for answer in ("yes", "no"):
        meta = {"yn_question_list": ["Is there a red square?"], "yn_answer_list": [answer.capitalize()]}
        ((ctx, target),) = ws.question_examples(policy, grid, meta, 3, np.random.default_rng(0))
        assert policy.decode(target) == answer and target[-1] == policy.stop_id
        assert ctx == policy.answer_context(ImageInput(np.zeros(0), grid.reshape(-1).tolist()),
                                            "Is there a red square?")


def test_questions_are_drawn_without_repeats(policy: TinyUnifiedPolicy) -> None:
    """Catches every drawn question being the first one."""
    meta = {"yn_question_list": ["is it red", "is it blue", "is it green"], "yn_answer_list": ["yes", "no", "no"]}
    grid = np.zeros((4, 4), np.int64)
    out = ws.question_examples(policy, grid, meta, 3, np.random.default_rng(5))
    image = ImageInput(np.zeros(0), grid.reshape(-1).tolist())
    contexts = {q: policy.answer_context(image, q) for q in meta["yn_question_list"]}
    asked = sorted(q for c, _ in out for q, want in contexts.items() if c == want)
    assert asked == ["is it blue", "is it green", "is it red"]
    assert sorted(policy.decode(t) for _, t in out) == ["no", "no", "yes"]


# ------------------------------------------------------------------ optimiser step and schedule
def _one_parameter_model() -> tuple[torch.nn.Parameter, torch.nn.Module, torch.optim.Optimizer]:
    """A zero 2-vector parameter in a module, with plain SGD at rate 1: a step moves it by minus the gradient."""
    w = torch.nn.Parameter(torch.zeros(2))
    model = torch.nn.Module()
    model.w = w
    return w, model, torch.optim.SGD([w], lr=1.0)


def test_step_clips_the_gradient_norm_to_one_and_returns_the_loss() -> None:
    """Catches a clip threshold other than 1.0: gradient (3, 4), norm 5, is applied as (0.6, 0.8)."""
    w, model, opt = _one_parameter_model()
    c = torch.tensor([3.0, 4.0])
    assert ws._step(opt, model, (w * c).sum() + 2.0) == 2.0
    assert w.detach().tolist() == pytest.approx([-0.6, -0.8])


def test_step_starts_from_zero_gradients() -> None:
    """Catches a missing zero_grad: unclipped gradient (0.3, 0.4) twice moves w by 2 x, not 3 x."""
    w, model, opt = _one_parameter_model()
    c = torch.tensor([0.3, 0.4])
    ws._step(opt, model, (w * c).sum())
    assert ws._step(opt, model, (w * c).sum()) == pytest.approx(-0.25)  # w = -c: -(0.09 + 0.16)
    assert w.detach().tolist() == pytest.approx([-0.6, -0.8])


def _lrs(steps: int, lr: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = ws.one_cycle(opt, lr, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


def test_one_cycle_rates_by_hand() -> None:
    """Catches a warm-up of 1/steps (10 steps: a zero-length phase) and the constant rate lost at 2 steps.
    Start lr/25, peak lr at step round(max(0.1, 2/steps) x steps) - 1, cosine down to lr/25/1e4 at the end."""
    lo, end = 1 / 25, 1 / 25 / 1e4
    assert _lrs(2) == [1.0, 1.0] and _lrs(1) == [1.0]
    got = _lrs(10)
    assert got[:2] == pytest.approx([lo, 1.0])
    assert got[2:] == pytest.approx([_cos(1.0, end, (s - 1) / 8) for s in range(2, 10)])
    got = _lrs(40)  # 10% of 40: peak at step 3
    assert got[:4] == pytest.approx([_cos(lo, 1.0, s / 3) for s in range(4)])
    assert got[3] == pytest.approx(1.0) and got[-1] == pytest.approx(end)


# ------------------------------------------------------------------ the warm start's loop
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")  # the optimiser step is stubbed
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")  # _step is faked
def test_warm_start_batches_and_rates(policy: TinyUnifiedPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the main batches not cut to batch_size or not shuffled, the critic steps' rehearsal cut to ``half``
    (odd batch), a critic rate other than lr / 3, and the model left in training mode."""
    seen: list[tuple[list, float]] = []

    def fake_synth(pol, prompts, start, n, cfg, rng):  # noqa: ANN001, ANN202
        return [([start], [j]) for j in range(10)]

    def fake_critic(pol, prompts, start, n, cfg, rng):  # noqa: ANN001, ANN202
        return [([start], [-1])] * n

    def fake_step(opt, model, batch):  # noqa: ANN001, ANN202
        seen.append((batch, opt.param_groups[0]["lr"]))
        return 0.0

    monkeypatch.setattr(ws, "synthetic_examples", fake_synth)
    monkeypatch.setattr(ws, "critic_examples", fake_critic)
    monkeypatch.setattr(ws, "_step", fake_step)
    r = Recipe()
    r.warmstart.steps, r.warmstart.critic_steps, r.warmstart.batch_size, r.warmstart.lr = 3, 2, 7, 0.3
    ws.warmstart(policy, r, loss_fn=lambda pol, ex: ex)
    assert policy.model.training is False
    main, critic = seen[:3], seen[3:]
    for batch, _ in main:
        targets = [t[0] for _, t in batch]
        assert len(batch) == 7 and len(set(targets)) == 7 and targets != sorted(targets)
    # 3 steps: warm-up to step round(2/3 x 3) - 1 = 1, then the cosine's end
    assert [lr for _, lr in main] == pytest.approx([0.3 / 25, 0.3, 0.3 / 25 / 1e4])
    assert len(critic) == 2
    for batch, lr in critic:
        assert lr == pytest.approx(0.1)
        assert len(batch) == 7 and sum(t == [-1] for _, t in batch) == 3  # 3 critiques + 4 rehearsed examples


def test_critic_steps_without_a_warm_start_are_refused_not_skipped(tmp_path: Path) -> None:
    """``steps: 0`` skips the whole warm start, so critic steps there would never run: a one-line recipe error."""
    from r3_rl.cli import main

    with pytest.raises(ValueError, match="critic_steps=5 run after the main warm-start steps, but steps=0"):
        Recipe(warmstart={"steps": 0, "critic_steps": 5})
    assert Recipe(warmstart={"steps": 1, "critic_steps": 5}).warmstart.critic_steps == 5
    recipe = tmp_path / "r.yaml"
    recipe.write_text("warmstart: {steps: 0, critic_steps: 5}\n")
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ cache key and cache
def test_cache_key_reads_the_tag_seed_blocks_and_templates() -> None:
    """Catches the tag, the run seed, the Blocks settings or the templates left out of the warm-start key."""
    base = Recipe()
    keys = {ws._key(base), ws._key(base, "a"), ws._key(base, "b"), ws._key(Recipe(seed=1)),
            ws._key(Recipe(data={"blocks": {"rows": 5}})),
            ws._key(Recipe(templates={"reflect": "{prompt} look {image}"}))}
    assert len(keys) == 6 and ws._key(base, "a") == ws._key(Recipe(), "a")


def test_cached_warm_start_is_reused_only_for_its_own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a marker without the key, any marker reused whatever its key, and reused weights never loaded."""
    runs: list[int] = []

    def fake_warmstart(pol, recipe, log=None, loss_fn=None):  # noqa: ANN001, ANN202
        runs.append(recipe.seed)
        with torch.no_grad():
            for p in pol.model.parameters():
                p.fill_(0.25)
        return {"loss": 1.5, "seconds": 0.0}

    monkeypatch.setattr(ws, "warmstart", fake_warmstart)
    folder = tmp_path / "warm"
    first = tiny_policy()
    ws.warmstart_cached(first, Recipe(), folder)
    marker = json.loads((folder / "warmstart.json").read_text())
    assert marker == {"key": ws._key(Recipe()), "loss": 1.5, "seconds": 0.0} and runs == [0]
    again = tiny_policy(seed=1)
    ws.warmstart_cached(again, Recipe(), folder)
    assert runs == [0] and all(bool((p == 0.25).all()) for p in again.model.parameters())
    ws.warmstart_cached(tiny_policy(), Recipe(seed=7), folder)
    assert runs == [0, 7]


# ------------------------------------------------------------------ tiny policy
def test_a_sampled_stop_token_ends_its_segment_and_stays_in_it(policy: TinyUnifiedPolicy,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the stop token cut off the segment (length t instead of t + 1)."""
    import r3_rl.policy.tiny as tiny

    real, calls = tiny.sampling_logprobs, []

    def forced(logits, sp, allowed, **kw):  # noqa: ANN001, ANN202
        lp = real(logits, sp, allowed, **kw).clone()
        calls.append(1)
        lp[1, policy.stop_id] = -math.inf  # row 1 never stops
        if len(calls) == 2:  # row 0 stops at its second token
            lp[0] = -math.inf
            lp[0, policy.stop_id] = 0.0
        return lp

    monkeypatch.setattr(tiny, "sampling_logprobs", forced)
    items = [PromptItem("a", "a photo of a red square"), PromptItem("b", "a photo of a circle")]
    a, b = policy.reason(items, SamplingParams(temperature=1.0, max_new_tokens=4), torch.Generator().manual_seed(0))
    assert len(a.segment.token_ids) == 2 and a.segment.token_ids[-1] == policy.stop_id
    assert a.segment.logprobs[-1] == 0.0 and len(a.segment.logprobs) == 2
    assert len(b.segment.token_ids) == 4 and policy.stop_id not in b.segment.token_ids


def test_sampled_segments_keep_their_own_copy_of_the_sampling(policy: TinyUnifiedPolicy) -> None:
    """Catches segments sharing the caller's SamplingParams: changing it later re-scored the segments."""
    sp = SamplingParams(temperature=0.7, max_new_tokens=3)
    (out,) = policy.reason([PromptItem("a", "a photo of a red square")], sp, torch.Generator().manual_seed(0))
    sp.temperature = 1.5
    assert out.segment.sampling.temperature == 0.7


def test_decode_image_tokens_reads_rows_then_columns() -> None:
    """Catches a 2 x 3 grid's tokens reshaped as 3 x 2."""
    small = tiny_policy(rows=2, cols=3)
    tokens = [1, 0, 7, 0, 13, 0]
    assert np.array_equal(small.decode_image_tokens(tokens), codec.encode(np.asarray(tokens).reshape(2, 3)))


def test_reflect_and_refine_contexts_are_each_chains_own(policy: TinyUnifiedPolicy,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches every critique context given the first prompt, and refine's CFG contrast given the first image."""
    seen: dict[str, list] = {}

    def fake_sample(contexts, modality, sp, generator, uncond=None):  # noqa: ANN001, ANN202
        seen[modality] = [contexts, uncond]
        return []

    monkeypatch.setattr(policy, "_sample", fake_sample)
    items = [PromptItem("a", "a photo of a red square"), PromptItem("b", "a photo of a blue circle")]
    images = [ImageInput(np.zeros(0), [1] + [0] * 15), ImageInput(np.zeros(0), [0] * 15 + [9])]
    words = [policy.image_words(im) for im in images]
    policy.reflect(items, images, SamplingParams())
    assert seen["text"][0] == [policy.render("reflect", prompt=p.prompt, image=w) for p, w in zip(items, words)]
    policy.refine(items, images, ["add a red square", "remove the circle"], SamplingParams(cfg_scale=2.0))
    assert seen["image"][1] == [policy.render("refine", prompt="", image=w, instruction="") for w in words]


def test_render_drops_a_placeholder_with_no_value(policy: TinyUnifiedPolicy) -> None:
    """Catches a missing value left as the literal ``{image}`` (an unknown word to the model)."""
    ids = policy.render("reflect", prompt="a photo of a red square")
    assert policy.tok.unk_token_id not in ids
    assert ids == [policy.bos_id] + policy.encode(policy.templates["reflect"].replace("{prompt}", "a photo of a "
                                                                                      "red square").replace("{image}", ""))


def test_value_features_are_each_contexts_last_hidden_state_whatever_the_padding(policy: TinyUnifiedPolicy) -> None:
    """Catches the first (padding) position read, position ids left out under left padding, and a feature size
    that is not the hidden size."""
    ctxs = [policy.render("reason", prompt="a photo of a red square"), policy.render("reason", prompt="a circle")]
    segs = [Segment("text", {"input_ids": c}, [policy.stop_id], [0.0]) for c in ctxs]
    with torch.no_grad():
        got = policy.value_features(segs)
        for i, c in enumerate(ctxs):
            alone = policy.model.get_decoder()(input_ids=torch.tensor([c])).last_hidden_state[0, -1]
            torch.testing.assert_close(got[i], alone, atol=1e-5, rtol=1e-4)
    assert policy.feature_size == 32 == got.shape[1]


@pytest.mark.parametrize("field, values", [("temperature", (1.0, 0.5)), ("top_k", (0, 3))])
def test_segments_differing_only_in_temperature_or_top_k_keep_their_own_distribution(
        policy: TinyUnifiedPolicy, field: str, values: tuple) -> None:
    """Catches the log-prob groups keyed without temperature or top_k."""
    assert_each_sampling_scored_as_alone(policy, [SamplingParams(**{field: v}) for v in values])


def test_with_model_leaves_the_original_policy_alone(policy: TinyUnifiedPolicy) -> None:
    """Catches with_model rebinding the policy itself (the reference copy would replace the trained model)."""
    other_model = tiny_policy(seed=5).model
    before = policy.model
    other = policy.with_model(other_model)
    assert other.model is other_model and policy.model is before and other.tok is policy.tok


def test_warm_start_is_skipped_at_zero_steps_and_keeps_the_policy_dtype(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``steps >= 0`` (a zero-step warm start still trained and cached) and the dtype not restored."""
    calls: list[torch.dtype] = []
    monkeypatch.setattr(ws, "warmstart_cached", lambda pol, recipe, folder, log=None: calls.append(pol.model.dtype))
    pol = tiny_policy()
    pol.model.to(torch.bfloat16)
    r = Recipe()
    pol.warm_start(r, tmp_path)
    assert calls == []
    r.warmstart.steps = 2
    pol.warm_start(r, tmp_path)
    assert calls == [torch.float32] and pol.model.dtype == torch.bfloat16


# ------------------------------------------------------------------ critique rehearsal
def test_rehearsal_is_as_lenient_as_the_warm_start() -> None:
    """Catches the rehearsal dropping ``miss_prob``: with 1.0 every critique, flawed image or not, is the stop."""
    pol = tiny_policy(rows=4, cols=4)
    r = Recipe(seed=3, learner={"critic_replay": {"coef": 0.5, "examples": 8}})
    r.warmstart.miss_prob = 1.0
    stop = pol.encode(edits.STOP_TEXT) + [pol.stop_id]
    for k in range(3):
        for _, target in CritiqueReplay(pol, r).examples(k).critiques:
            assert target[-len(stop):] == stop


def test_rehearsal_prompts_are_apart_from_the_rollouts(policy: TinyUnifiedPolicy) -> None:
    """Catches the rehearsal's prompt stream seeded like rollout's (it would rehearse the prompts RL samples)."""
    r = Recipe(seed=3)
    replay = CritiqueReplay(policy, r)
    rollout = BlocksPrompts(tags=r.data.blocks.tags, seed=r.seed)
    assert [replay.prompts.train_prompt(k).prompt for k in range(8)] != [rollout.train_prompt(k).prompt
                                                                         for k in range(8)]


def test_rehearsal_labels_are_the_truth_about_a_non_square_image() -> None:
    """Catches the rehearsal's grids drawn cols x rows: on a 3 x 4 grid the label must describe what the critic
    reads (the image in raster order of 3 rows of 4)."""
    pol = tiny_policy(rows=3, cols=4)
    r = Recipe(seed=2, data={"blocks": {"rows": 3, "cols": 4, "tags": {"position": 1.0}}},
               learner={"critic_replay": {"coef": 0.5, "examples": 8}})
    replay = CritiqueReplay(pol, r)
    for k in range(4):
        for j, (ctx, target) in enumerate(replay.examples(k).critiques):
            meta = replay.prompts.train_prompt(k * 8 + j).metadata
            grid = np.asarray(_cells(pol, ctx)).reshape(3, 4)
            assert pol.decode(target) == edits.critique_text(grid, meta)


# ------------------------------------------------------------------ tiny recipe checks
def _check(sets: list[str], weights: bool = True) -> None:
    TinyUnifiedPolicy.check_recipe(load_recipe(TINY, sets), "r.yaml", weights=weights)


def test_recipe_checks_device_heads_and_size_boundary() -> None:
    """Catches the CPU-only and head-count checks lost, and the size limit refusing exactly 2e9 parameters
    (2 layers x (4 x 1000^2 + 3 x 1000 x 332000) = 2e9)."""
    with pytest.raises(UserError, match="runs on the CPU only, got 'cuda'"):
        _check(["policy.device=cuda"])
    with pytest.raises(UserError, match="30 is not a multiple of policy.tiny.num_heads=4"):
        _check(["policy.tiny.hidden_size=30", "policy.tiny.num_heads=4"])
    _check(["policy.tiny.hidden_size=1000", "policy.tiny.num_heads=8", "policy.tiny.num_layers=2",
            "policy.tiny.intermediate_size=332000"])


def test_recipe_checks_room_for_counted_critiques_only_when_warm_starting(tmp_path: Path) -> None:
    """Catches the room check limited to describe=objects, applied with no warm start, and the config.json check
    made with weights=False (a check of the recipe alone)."""
    with pytest.raises(UserError, match="39 cuts short the critiques warmstart.describe=counts"):
        _check(["warmstart.describe=counts", "rollout.reflect.max_new_tokens=39"])
    _check(["warmstart.describe=counts", "warmstart.steps=0", "rollout.reflect.max_new_tokens=10"])
    _check([f"policy.model={tmp_path}"], weights=False)
    with pytest.raises(UserError, match="no config.json there"):
        _check([f"policy.model={tmp_path}"])


def test_recipe_checks_a_saved_models_experts_and_an_unreadable_grid_file(tmp_path: Path) -> None:
    """Catches a saved modality-expert model read as shared, and a folder without r3_grid.json read as 'words'."""
    (tmp_path / "config.json").write_text(json.dumps({"r3_image_token_span": [9, 28]}))
    with pytest.raises(UserError, match="has 'modality' experts"):
        _check([f"policy.model={tmp_path}", "policy.tiny.experts=shared"])
    _check([f"policy.model={tmp_path}", "policy.tiny.experts=modality"])
    _check([f"policy.model={tmp_path}", "policy.tiny.image_input=tokens"])  # no r3_grid.json: an older folder


def test_from_recipe_builds_the_recipes_shape_seed_and_dtype(tmp_path: Path) -> None:
    """Catches the run seed, max_positions or policy.dtype not passed on, rows / cols swapped, and a skeleton
    built for a saved model."""
    sets = ["policy.tiny.hidden_size=32", "policy.tiny.num_layers=1", "policy.tiny.num_heads=2",
            "policy.tiny.intermediate_size=48", "policy.tiny.max_positions=96", "data.blocks.rows=3",
            "data.blocks.cols=5"]
    a = TinyUnifiedPolicy.from_recipe(load_recipe(TINY, [*sets, "seed=1"]))
    b = TinyUnifiedPolicy.from_recipe(load_recipe(TINY, [*sets, "seed=1"]))
    c = TinyUnifiedPolicy.from_recipe(load_recipe(TINY, [*sets, "seed=2"]))
    d = TinyUnifiedPolicy.from_recipe(load_recipe(TINY, [*sets, "seed=1", "policy.dtype=bfloat16"]))
    wa, wb, wc, wd = (p.model.get_input_embeddings().weight for p in (a, b, c, d))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc) and torch.equal(wd, wa.to(torch.bfloat16))
    assert a.model.config.max_position_embeddings == 96 and (a.rows, a.cols, a.num_cells) == (3, 5, 15)
    assert a.model.dtype == torch.float32 and d.model.dtype == torch.bfloat16
    assert TinyUnifiedPolicy.skeleton(load_recipe(TINY, [*sets, f"policy.model={tmp_path}"])) is None


# ------------------------------------------------------------------ tokenizer
def test_tokenizer_specials_and_unknown_words() -> None:
    """Catches the end token not <|im_end|> (the model's eos) and unknown words read as padding by the word-level
    model (the tokenizer a saved folder holds)."""
    pol = TinyUnifiedPolicy.build(Templates().model_dump(), 2, 2, hidden_size=16, num_layers=1, num_heads=2,
                                  intermediate_size=32)
    tok = pol.tok
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("<|im_end|>", "<pad>", "<bos>", "<unk>")
    assert pol.model.config.eos_token_id == pol.stop_id == 4
    red = tok.get_vocab()["red"]
    assert pol.encode("red zebra") == [red, 1] and tok("red zebra")["input_ids"] == [red, 1]  # also the saved file
