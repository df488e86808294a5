"""``policy.kind: bagel`` on a tiny random BAGEL saved in the published layout (r3_rl/policy/bagel/policy.py).

The R3 stages with the reference's context layout, the ratio of 1 before the first update for text and image
actions with text and image CFG, GRPO moving both experts, the experts' gradient isolation
(``policy.options.expert_isolation``, on by default; off = BAGEL's joint gradient), the frozen reference, and the
save/load round trip of the policy.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from r3_rl.config import Recipe, apply_overrides
from r3_rl.flow import Guidance, timestep_grid
from r3_rl.flow.action import is_flow_segment, segment_trace
from r3_rl.learner.batch import TrainItem
from r3_rl.learner.torch_learner import TorchLearner
from r3_rl.policy.bagel import make_tiny_bagel
from r3_rl.policy.bagel.policy import BagelPolicy
from r3_rl.policy.base import ImageInput
from r3_rl.policy.registry import build_policy
from r3_rl.trajectory import PromptItem, SamplingParams
from learner_helpers import learner_cfg

TINY_OPTIONS = ("{image_size: 32, gen_steps: 6, edit_steps: 6, ode_steps: 4, vit_size: [32, 16, 4], "
                "vae_size: [32, 16, 16], "
                "reflect_system: 'think first'}")
TEMPLATES = ["templates.system=think, then draw", "templates.reason='{prompt}'",
             "templates.reflect=How to edit it to match: {prompt}?", "templates.refine='{instruction}'"]
PROMPTS = [PromptItem("a", "a red cube")] * 2 + [PromptItem("b", "two blue cats")] * 2
TEXT = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6)
IMAGE = SamplingParams(temperature=1.0, cfg_scale=4.0)
GEN_PREFIXES = ("vae2llm.", "llm2vae.", "time_embedder.")


def is_gen(name: str) -> bool:
    return "_moe_gen" in name or name.startswith(GEN_PREFIXES)


def bagel_recipe(path, dtype: str = "float32", isolation: bool = True) -> Recipe:
    options = TINY_OPTIONS if isolation else TINY_OPTIONS[:-1] + ", expert_isolation: false}"
    sets = ["policy.kind=bagel", f"policy.model={path}", f"policy.dtype={dtype}", "policy.device=cpu",
            f"policy.options={options}", *TEMPLATES]
    return Recipe.model_validate(apply_overrides({}, sets))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bagel(tmp_path_factory.mktemp("bagel") / "tiny", seed=0)


@pytest.fixture(scope="module")
def policy(tiny_dir) -> BagelPolicy:
    """Shared by the tests that leave its weights as they are (the GRPO test trains its own copy)."""
    policy = build_policy(bagel_recipe(tiny_dir))
    assert isinstance(policy, BagelPolicy)
    return policy


@pytest.fixture(scope="module")
def sampled(policy: BagelPolicy):
    return rollout(policy, seed=1)


def rollout(policy: BagelPolicy, seed: int = 0):
    """All four stages, two sibling groups of two."""
    g = torch.Generator().manual_seed(seed)
    plans = policy.reason(PROMPTS, TEXT, g)
    images = policy.generate(PROMPTS, [p.text for p in plans], IMAGE, g)
    inputs = [ImageInput(images[0].image)] * 2 + [ImageInput(images[2].image)] * 2
    critiques = policy.reflect(PROMPTS, inputs, TEXT, g)
    edits = policy.refine(PROMPTS, inputs, ["make it blue", "add a cat", "make it red", "remove a cat"], IMAGE, g)
    return plans, images, critiques, edits


def segments(stages):
    return [s.segment for stage in stages for s in stage]


def test_all_four_stages_run_with_r3_contexts(policy: BagelPolicy, sampled) -> None:
    plans, images, critiques, edits = sampled
    tok = policy.tokens
    system = [tok.im_start, *policy.tokenizer.encode("think, then draw", add_special_tokens=False), tok.im_end]
    # reason: [system] [prompt], then text; generate: + [plan] as sampled, text-CFG against [system] alone
    ctx = plans[0].segment.context
    assert ctx["blocks"][0]["text"] == system and len(ctx["blocks"]) == 2
    gen = images[0].segment.context
    assert gen["cond"][:2] == ctx["blocks"] and gen["text_uncond"] == [{"text": system}]
    assert gen["cond"][2]["text"][1:len(plans[0].segment.token_ids) + 1] == plans[0].segment.token_ids
    assert all(i.image.shape == (32, 32, 3) and i.image.dtype.name == "uint8" for i in images + edits)
    # reflect: [reflect system] [ViT(image)] [question]; refine: [VAE] [ViT] [instruction], CFG rows of R3
    assert [sorted(b) for b in critiques[0].segment.context["blocks"]] == [["text"], ["vit"], ["text"]]
    ref = edits[0].segment.context
    assert ref["cond"][:2] == ref["text_uncond"] == [{"vae": 0}, {"vit": 0}] and ref["image_uncond"] == ref["cond"][2:]
    # one SDE step per image, edits' among the first 2; siblings share x_T and the step, not the SDE noise
    traces = [segment_trace(s.segment) for s in images + edits]
    assert all(len(t.steps) == 1 for t in traces) and all(t.steps[0].index < 2 for t in traces[4:])
    assert traces[0].init_seed == traces[1].init_seed != traces[2].init_seed == traces[3].init_seed
    assert traces[0].sde_indices == traces[1].sde_indices and traces[0].noise_seed != traces[1].noise_seed
    assert traces[4].guidance == Guidance(4.0, 1.5, (0.4, 1.0), "text_channel")
    assert all(len(s.segment.token_ids) == len(s.segment.logprobs) >= 1 for s in plans + critiques)
    # temperature 0: ODE only, an image with no action to train
    greedy = policy.generate(PROMPTS[:1], [None], SamplingParams(temperature=0.0, cfg_scale=4.0))
    assert greedy[0].segment.num_actions == 0 and greedy[0].image.shape == (32, 32, 3)
    assert segment_trace(greedy[0].segment).grid == timestep_grid(4, 3.0)  # ode_steps grid points
    # understanding answers (the self-consistency reward's question) are probabilities
    yes = policy.answer_yes_no([ImageInput(images[0].image), ImageInput(edits[0].image)], ["a cube?", "a cat?"])
    assert len(yes) == 2 and all(0.0 <= p <= 1.0 for p in yes)


def test_ratio_is_one_before_the_update_for_text_and_image_actions_with_cfg(policy: BagelPolicy, sampled) -> None:
    stages = sampled
    segs = segments(stages)
    with torch.no_grad():
        again = policy.segment_logprobs(segs)
    for seg, lp in zip(segs, again):
        assert lp.shape == (seg.num_actions,)
        assert torch.allclose(lp.double(), torch.tensor(seg.logprobs, dtype=torch.float64), atol=2e-5), seg.modality
    # the guidance is part of the action's log-prob: every edit step lies in the CFG interval, and rescoring it
    # without CFG (what the reference does for generation) gives another number
    edit = stages[3][0].segment
    trace = segment_trace(edit)
    assert trace.steps[0].t > 0.4 and trace.guidance.uses_image_branch
    plain = copy.deepcopy(edit)
    plain.action["trace"]["guidance"] = Guidance().to_dict()
    with torch.no_grad():
        no_cfg = policy.segment_logprobs([plain])[0]
    assert abs(float(no_cfg[0]) - edit.logprobs[0]) > 1e-3
    # and text log-probs are those of the tempered nucleus, not of the raw softmax
    raw = copy.deepcopy(stages[0][0].segment)
    raw.sampling = SamplingParams()
    with torch.no_grad():
        assert not torch.allclose(policy.segment_logprobs([raw])[0], again[0], atol=1e-3)


@pytest.fixture(scope="module")
def joint(tiny_dir) -> BagelPolicy:
    """The same weights with ``expert_isolation: false``: one joint gradient, as BAGEL and the R3 reference train."""
    return build_policy(bagel_recipe(tiny_dir, isolation=False))


def test_text_segments_give_the_generation_expert_no_gradient(policy: BagelPolicy, joint: BagelPolicy,
                                                             sampled) -> None:
    plans, images, critiques, edits = sampled
    assert policy.options.expert_isolation and not joint.options.expert_isolation  # the default, and off
    policy.model.zero_grad(set_to_none=True)
    named = dict(policy.model.named_parameters())
    # text-only segments (reason, and reflect, whose context holds only text and ViT tokens)
    lps = policy.segment_logprobs(segments([plans, critiques]))
    assert all(torch.equal(a, b.detach()) for a, b in zip(lps, joint.segment_logprobs(segments([plans, critiques]))))
    loss = sum(lp.sum() for lp in lps)
    loss.backward()
    gen = {n: p for n, p in named.items() if is_gen(n)}
    assert gen and all(p.grad is None or not p.grad.any() for p in gen.values())
    und_moved = [n for n, p in named.items() if not is_gen(n) and p.grad is not None and p.grad.any()]
    assert {"language_model.lm_head.weight", "language_model.model.layers.0.mlp.up_proj.weight"} <= set(und_moved)
    policy.model.zero_grad(set_to_none=True)


def image_loss_gradients(policy: BagelPolicy, segs) -> tuple[list[torch.Tensor], set[str]]:
    """The segments' log-probs, and the trainable parameters their sum gives a non-zero gradient."""
    policy.model.zero_grad(set_to_none=True)
    lps = policy.segment_logprobs(segs)
    sum(lp.sum() for lp in lps).backward()
    moved = {n for n, p in policy.model.named_parameters() if p.grad is not None and p.grad.any()}
    policy.model.zero_grad(set_to_none=True)
    return [lp.detach() for lp in lps], moved


@pytest.mark.parametrize("stage", ["generate", "refine"])
def test_image_segments_train_only_the_generation_expert_unless_isolation_is_off(
        policy: BagelPolicy, joint: BagelPolicy, sampled, stage: str) -> None:
    """Generate (text context, text-CFG) and refine (VAE + ViT + instruction context, text- and image-CFG): with
    the default isolation an image loss gives every understanding weight -- its attention, MLP and norms, the
    embeddings, the connector, the text head, the final norm -- exactly zero gradient, and every generation weight
    some; with ``expert_isolation: false`` it reaches the understanding expert through the context's keys/values
    and the image markers.  The log-probs are the same numbers either way (ratio 1)."""
    segs = [s.segment for s in sampled[1 if stage == "generate" else 3]]
    named = dict(policy.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    gen = {n for n in trainable if is_gen(n)}
    und = trainable - gen
    assert {"language_model.lm_head.weight", "language_model.model.norm.weight", "connector.fc1.weight",
            "language_model.model.embed_tokens.weight", "language_model.model.layers.1.self_attn.q_norm.weight",
            "language_model.model.layers.0.post_attention_layernorm.weight"} <= und
    isolated_lps, moved = image_loss_gradients(policy, segs)
    assert moved == gen, (sorted(moved - gen)[:3], sorted(gen - moved)[:3])
    joint_lps, joint_moved = image_loss_gradients(joint, segs)
    assert gen <= joint_moved
    layers = "language_model.model.layers"
    reached = {f"{layers}.0.self_attn.k_proj.weight", f"{layers}.0.mlp.up_proj.weight",
               f"{layers}.1.input_layernorm.weight", "language_model.model.embed_tokens.weight"}
    assert reached | ({"connector.fc1.weight"} if stage == "refine" else set()) <= joint_moved
    assert not {"language_model.lm_head.weight", "language_model.model.norm.weight"} & joint_moved  # never reached
    for seg, a, b in zip(segs, isolated_lps, joint_lps):
        assert torch.equal(a, b)
        assert torch.allclose(a.double(), torch.tensor(seg.logprobs, dtype=torch.float64), atol=2e-5)
    frozen = [n for n, p in named.items() if n.startswith("vit_model.")]
    assert frozen and all(not named[n].requires_grad and named[n].grad is None for n in frozen)


def items_with_advantages(stages) -> list[TrainItem]:
    """Each sibling group's two members get advantages +1 / -1 (what GRPO gives two different rewards)."""
    items = []
    for stage_name, stage in zip(("reason", "generate", "reflect", "refine"), stages):
        for k, sample in enumerate(stage):
            items.append(TrainItem(sample.segment, 1.0 if k % 2 == 0 else -1.0, stage_name, 0))
    return items


def test_two_grpo_steps_change_both_experts_and_the_reference_stays_frozen(tiny_dir) -> None:
    policy = build_policy(bagel_recipe(tiny_dir))
    reference = policy.frozen_copy()
    assert all(not p.requires_grad for p in reference.model.parameters())
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    learner = TorchLearner(policy, reference, learner_cfg(lr=1e-2, kl_coef_text=0.01, kl_coef_image=0.01,
                                                          clip_low=0.2, clip_high=0.2))
    items = items_with_advantages(rollout(policy, seed=3))
    first = learner.step(copy.deepcopy(items))
    # text tokens and denoising steps (the learner's flow loss, with its own clip and Gaussian KL) at ratio 1
    for kind in ("", "flow_"):
        assert first[f"learner/{kind}ratio_min"] == pytest.approx(1.0, abs=1e-4)
        assert first[f"learner/{kind}ratio_max"] == pytest.approx(1.0, abs=1e-4)
        assert first[f"learner/{kind}kl_mean"] < 1e-6
    second = learner.step(copy.deepcopy(items))  # the same samples again: now off-policy, ratios move
    assert math.isfinite(second["learner/loss"])
    assert second["learner/kl_mean"] > 0 and second["learner/flow_kl_mean"] > 0
    after = policy.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for name in ("language_model.model.layers.0.mlp.gate_proj.weight", "language_model.lm_head.weight",
                 "language_model.model.layers.1.mlp_moe_gen.gate_proj.weight", "llm2vae.weight",
                 "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight", "connector.fc1.weight"):
        assert name in changed, name
    assert not any(k.startswith(("vit_model.", "vit_pos_embed", "latent_pos_embed")) for k in changed)
    ref_state = reference.model.state_dict()
    assert all(torch.equal(before[k], ref_state[k]) for k in before)  # the reference did not move
    with torch.no_grad():  # and it still scores the first batch as it was sampled
        ref_lps = reference.segment_logprobs([it.segment for it in items[:4]])
    for it, lp in zip(items[:4], ref_lps):
        assert torch.allclose(lp.double(), torch.tensor(it.segment.logprobs, dtype=torch.float64), atol=2e-5)


def test_save_and_load_round_trip_keeps_weights_version_and_logprobs(policy: BagelPolicy, sampled,
                                                                     tmp_path) -> None:
    stages = sampled
    policy = policy.with_model(copy.deepcopy(policy.model))
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.01)
    policy.version = 3
    policy.save_pretrained(str(tmp_path / "saved"))
    again = build_policy(bagel_recipe(tmp_path / "saved"))
    assert again.version == 3
    a, b = policy.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    segs = segments(stages)
    with torch.no_grad():
        for x, y in zip(policy.segment_logprobs(segs), again.segment_logprobs(segs)):
            assert torch.equal(x, y)


def test_gradient_checkpointing_gives_the_same_log_probs_and_gradients(policy: BagelPolicy, sampled,
                                                                       monkeypatch) -> None:
    from r3_rl.policy.bagel import mot

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(mot, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    segs = segments(sampled)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(policy.model)
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        other = policy.with_model(model)
        lps = other.segment_logprobs(segs)
        sum(lp.sum() for lp in lps).backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                      [lp.detach() for lp in lps]))
    (g0, lp0), (g1, lp1) = grads
    assert len(calls) >= 2 * policy.model.config.llm.num_hidden_layers  # every layer recomputed (text + image forwards)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(lp0, lp1))
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], atol=1e-5, rtol=1e-4) for k in g0)


def test_detached_unconditional_branches_keep_the_edit_log_probs_and_change_the_gradient(policy: BagelPolicy,
                                                                                          sampled) -> None:
    """``learner.flow.detach_uncond`` on BAGEL's edits (text and image CFG both active): the same log-probs, and
    a gradient that differs (the unconditional branches and their contexts no longer carry any)."""
    from r3_rl.flow.action import unconditional_without_gradient

    edit = sampled[3][0].segment
    assert segment_trace(edit).guidance.uses_image_branch
    results = []
    for detach in (False, True):
        model = copy.deepcopy(policy.model)
        with unconditional_without_gradient(detach):
            lp = policy.with_model(model).segment_logprobs([edit])[0]
        lp.sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (lp0, g0), (lp1, g1) = results
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=0)
    assert max(float((g0[k] - g1.get(k, torch.zeros_like(g0[k]))).abs().max()) for k in g0) > 1e-6


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """BAGEL's width (2048, heads of 128, 8 query heads per KV head) with one layer, a 2x-width MLP and the tiny
    vocabulary, ViT and VAE: about 75 M parameters."""
    return make_tiny_bagel(tmp_path_factory.mktemp("bagel") / "wide", seed=0, hidden_size=2048, num_layers=1,
                           num_heads=16, num_kv_heads=2)


@pytest.mark.parametrize("width", [64, pytest.param(2048, marks=pytest.mark.slow)])
def test_bf16_policy_samples_rescores_and_trains_both_experts(request, width: int) -> None:
    """At the precision users run: bf16 weights (fp32 masters in the learner), at the tiny width and (slow) at
    BAGEL's.  Image steps are rescored by the same batched computation (equal); text is decoded token by token from
    a cache but rescored in one forward, which bf16 rounds differently.  One GRPO step then moves both experts."""
    path = request.getfixturevalue("tiny_dir" if width == 64 else "wide_dir")
    policy = build_policy(bagel_recipe(path, "bfloat16"))
    assert policy.model.llm2vae.weight.dtype == torch.bfloat16 and policy.model.config.hidden_size == width
    assert next(policy.vae.parameters()).dtype == torch.float32  # options.vae_dtype
    stages = rollout(policy, seed=6)
    segs = segments(stages)
    with torch.no_grad():
        again = policy.segment_logprobs(segs)
    for seg, lp in zip(segs, again):
        assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
        gap = (lp.double() - torch.tensor(seg.logprobs, dtype=torch.float64)).abs().max()
        assert gap < (1e-2 if seg.modality == "text" else 1e-4), (seg.modality, float(gap))
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    learner = TorchLearner(policy, policy.frozen_copy(), learner_cfg(lr=1e-3, kl_coef_text=0.01, kl_coef_image=0.01))
    stats = learner.step(items_with_advantages(stages))
    assert math.isfinite(stats["learner/loss"])
    assert stats["learner/ratio_min"] > 0.98 and stats["learner/ratio_max"] < 1.02  # the text gap above
    assert stats["learner/flow_ratio_min"] == pytest.approx(1.0, abs=1e-3)
    assert stats["learner/flow_ratio_max"] == pytest.approx(1.0, abs=1e-3)
    after = policy.model.state_dict()
    assert after["llm2vae.weight"].dtype == torch.bfloat16
    for name in ("language_model.model.layers.0.mlp.gate_proj.weight", "language_model.lm_head.weight",
                 "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight",
                 "language_model.model.layers.0.mlp_moe_gen.down_proj.weight", "llm2vae.weight"):
        assert not torch.equal(before[name], after[name]), name


def test_bf16_recompute_makes_the_first_image_ratio_exactly_one_in_any_micro_batch(tiny_dir) -> None:
    """bf16 rounds a forward by its batch: an image rescored alone (micro_batch_size 1, as the BAGEL recipe) rather
    than beside its siblings as it was sampled moved its last steps' log-probs by up to 2e-4 -- twice the default
    ``flow.clip_low`` -- so the first update, at unchanged weights, could clip images.  ``learner.old_logp:
    recompute`` now takes flow items' old log-probs from the learner's own micro-batches too: the first ratio is 1
    exactly, nothing is clipped, and the sampler's distance is logged for images."""
    policy = build_policy(bagel_recipe(tiny_dir, "bfloat16"))
    stages = rollout(policy, seed=6)
    items = [it for it in items_with_advantages(stages) if it.stage in ("generate", "refine")]
    assert items and all(is_flow_segment(it.segment) for it in items)
    cfg = learner_cfg(lr=1e-3, kl_coef_text=0.0, kl_coef_image=0.0, micro_batch_size=1, old_logp="recompute")
    stats = TorchLearner(policy, None, cfg).step(items)
    assert stats["learner/flow_ratio_min"] == 1.0 and stats["learner/flow_ratio_max"] == 1.0
    assert stats["learner/flow_clip_frac"] == 0.0
    assert 0.0 <= stats["learner/sampler_flow_logp_gap_max"] < 1e-2


def test_a_full_fine_tune_resumes_from_its_export_without_the_vae(policy: BagelPolicy, tmp_path) -> None:
    """The torch backend resumes a full fine-tune from the checkpoint's ``model/`` export.  BAGEL's export holds
    the VAE (``ae.safetensors``) beside the weight set, and reading every ``.safetensors`` there stopped every such
    resume ("unexpected decoder.conv_in.bias"); the policy names its weight files, and the trained weights load."""
    from r3_rl.errors import UserError
    from r3_rl.learner.checkpoint import load_exported

    trained = policy.with_model(copy.deepcopy(policy.model))
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(0.01)
    trained.save_pretrained(str(tmp_path / "model"))
    fresh = policy.with_model(copy.deepcopy(policy.model))
    with pytest.raises(UserError, match="unexpected"):
        load_exported(fresh.model, tmp_path / "model")  # every file, the VAE's too
    files = fresh.exported_weight_files(tmp_path / "model")
    assert [f.name for f in files] == ["ema.safetensors"]
    load_exported(fresh.model, tmp_path / "model", files)
    a, b = trained.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_images_sde_steps_go_through_one_learner_forward_as_the_plan_counts(tiny_dir) -> None:
    """`r3-rl plan` sizes a flow image's learner activations as context + every SDE step's latent positions
    (r3_rl.plan.report.learner_positions): all of an image's recorded steps are rescored in one velocity call per
    CFG branch, kept together for one backward.  Checked on the call the learner makes."""
    options = TINY_OPTIONS[:-1] + ", gen_sde_count: 3}"
    sets = ["policy.kind=bagel", f"policy.model={tiny_dir}", "policy.device=cpu", f"policy.options={options}",
            *TEMPLATES]
    policy = build_policy(Recipe.model_validate(apply_overrides({}, sets)))
    image = policy.generate(PROMPTS[:1], [None], IMAGE, torch.Generator().manual_seed(0))[0]
    assert image.segment.num_actions == 3
    calls: list[tuple[int, ...]] = []
    forward = policy.model.predict_velocity

    def recorded(cache, x_t, t, grid, grad_expert=None):
        calls.append(tuple(x_t.shape))
        return forward(cache, x_t, t, grid, grad_expert)

    policy.model.predict_velocity = recorded
    scores = policy.denoising_scores([image.segment])
    assert scores[0].logp.shape == (3,) and scores[0].logp.requires_grad
    tokens = (32 // 16) ** 2  # latent positions of a 32 px image
    assert [c[:2] for c in calls] == [(3, tokens), (3, tokens)]  # cond and text-uncond: 3 steps in one forward each


def test_siblings_share_one_encoding_of_their_parent_image(policy: BagelPolicy, sampled, monkeypatch) -> None:
    """Tree-RL's siblings critique and edit the same parent: its PNG is encoded once per call and the rows share
    the stored dict (16 siblings had encoded and carried 16 copies of a ~0.7 MB string at 512 px)."""
    import pickle

    from r3_rl.policy.bagel import contexts

    calls = []
    store = contexts.store_images
    monkeypatch.setattr(contexts, "store_images", lambda images: (calls.append(len(images)), store(images))[1])
    _, images, _, _ = sampled
    inputs = [ImageInput(images[0].image)] * 3 + [ImageInput(images[2].image)]
    g = torch.Generator().manual_seed(0)
    critiques = policy.reflect(PROMPTS[:1] * 3 + PROMPTS[2:3], inputs, TEXT, g)
    stored = [c.segment.context["images"] for c in critiques]
    assert calls == [1, 1] and stored[0] is stored[1] is stored[2] and stored[3] is not stored[0]
    edits = policy.refine(PROMPTS[:1] * 3 + PROMPTS[2:3], inputs, ["add a cat"] * 4, IMAGE, g)
    assert calls == [1, 1, 1, 1] and edits[0].segment.context["images"] is edits[2].segment.context["images"]
    # what crosses Ray: the shared dict pickles once
    one = len(pickle.dumps(stored[0]))
    assert len(pickle.dumps([c.segment for c in critiques])) < 2.5 * one
