"""The KL reference: a full copy DeepSpeed never touches -- or no reference at all when every KL weight is 0.

On main the Janus reference shared SigLIP and the VQ with the policy: ZeRO-3 partitioned them to shape (0,)
under the reference (and bf16 casting changed their dtype), so its forward failed on every reflect/refine
segment.  Here a tiny Janus in bf16 runs under DeepSpeed ZeRO-2 and ZeRO-3, in the trainer process and on
2 Ray learner ranks: the reference forward runs on reflect and refine segments, the ratio is 1 before the
first update and the KL is finite.

bf16 tolerance: the sampler (KV-cached decoding, one token at a time) and the training forward (whole
rows) round differently in bf16; on the tiny Janus they agree to |delta log p| <= 0.023 (fp32: 7e-7), so
ratios before the first update must lie in [0.95, 1.05].  The reference holds the very same bf16 weights
as the policy, so their log-probs agree to 1e-3 and the k3 KL stays below 1e-3.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from learner_helpers import learner_cfg, sample_items, tiny_policy
from test_janus_policy import PROMPTS, TEMPLATES

from r3_rl.config import Recipe
from r3_rl.learner.batch import TrainItem
from r3_rl.learner.build import build_learner, needs_frozen_reference
from r3_rl.learner.torch_learner import TorchLearner
from r3_rl.policy.base import ImageInput
from r3_rl.policy.janus import JanusPolicy
from r3_rl.policy.janus_tiny import make_tiny_janus
from r3_rl.trajectory import SamplingParams

BF16_RATIO_TOL = 0.05
TEXT = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6)
IMAGE = SamplingParams(temperature=1.0, cfg_scale=3.0)


@pytest.fixture(scope="module")
def janus_path(tmp_path_factory) -> str:
    torch.set_num_threads(1)  # as test_janus_policy: 2 threads on a busy 2-core machine are 20x slower
    return make_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny")


def bf16_janus(path: str) -> JanusPolicy:
    return JanusPolicy.from_pretrained(path, templates=TEMPLATES, dtype="bfloat16")


def janus_items(policy: JanusPolicy) -> list[TrainItem]:
    """All four stages on two prompts; reflect and refine see the generated image (SigLIP path)."""
    g = torch.Generator().manual_seed(0)
    prompts = PROMPTS[:2]
    plans = policy.reason(prompts, TEXT, g)
    images = policy.generate(prompts, [p.text for p in plans], IMAGE, g)
    parents = [ImageInput(im.image, im.image_tokens) for im in images]
    critiques = policy.reflect(prompts, parents, TEXT, g)
    refined = policy.refine(prompts, parents, [c.text for c in critiques], IMAGE, g)
    items = []
    for stage, samples in (("reason", plans), ("generate", images), ("reflect", critiques), ("refine", refined)):
        items += [TrainItem(s.segment, adv, stage, policy.version) for s, adv in zip(samples, (1.0, -1.0))]
    return items


def janus_recipe(path: str, zero_stage: int, **learner) -> Recipe:
    return Recipe(policy={"kind": "janus", "model": path, "dtype": "bfloat16"}, templates=TEMPLATES,
                  learner={"backend": "deepspeed", "deepspeed": {"zero_stage": zero_stage}, "micro_batch_size": 4,
                           "lr": 1e-3, "kl_coef_text": 0.1, "kl_coef_image": 0.1, **learner})


def assert_first_step_is_on_policy(metrics: dict[str, float]) -> None:
    assert metrics["learner/optimizer_steps"] == 1.0 and math.isfinite(metrics["learner/loss"])
    assert 1 - BF16_RATIO_TOL <= metrics["learner/ratio_min"] <= metrics["learner/ratio_max"] <= 1 + BF16_RATIO_TOL
    assert math.isfinite(metrics["learner/kl_mean"]) and 0.0 <= metrics["learner/kl_mean"] < 1e-3


def shared_storage(a: torch.nn.Module, b: torch.nn.Module) -> set[int]:
    return {t.data_ptr() for t in a.state_dict().values()} & {t.data_ptr() for t in b.state_dict().values()}


def test_references_share_no_tensor_with_the_policy(janus_path) -> None:
    janus = bf16_janus(janus_path)
    tiny = tiny_policy()
    for policy in (janus, tiny):
        ref = policy.frozen_copy()
        assert not shared_storage(ref.model, policy.model), type(policy).__name__
        assert all(not p.requires_grad for p in ref.model.parameters())
        assert any(p.requires_grad for p in policy.model.parameters())


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_reference_survives_deepspeed_in_the_trainer_process(janus_path, zero_stage) -> None:
    policy = bf16_janus(janus_path)
    items = janus_items(policy)
    reference = policy.frozen_copy()
    learner = build_learner(policy, reference, janus_recipe(janus_path, zero_stage))
    vision = policy.model.model.vision_model.embeddings.patch_embedding.weight
    if zero_stage == 3:  # the policy's frozen SigLIP is partitioned now; the reference's is whole
        assert vision.numel() == 0
    assert reference.model.model.vision_model.embeddings.patch_embedding.weight.shape == (32, 3, 8, 8)
    assert all(p.dtype == torch.bfloat16 for p in reference.model.parameters())
    seen = [it.segment for it in items if it.stage in ("reflect", "refine")]
    with torch.no_grad():
        ref_lp, pol_lp = reference.segment_logprobs(seen), policy.segment_logprobs(seen)
    for seg, r, p in zip(seen, ref_lp, pol_lp):
        assert bool(torch.isfinite(r).all())
        torch.testing.assert_close(r, p, atol=1e-3, rtol=0)
        assert float((r - torch.tensor(seg.logprobs)).abs().max()) <= BF16_RATIO_TOL
    assert_first_step_is_on_policy(learner.step(copy.deepcopy(items)))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_recomputed_old_logprobs_make_the_first_ratio_one_on_janus_in_bf16(janus_path, zero_stage) -> None:
    """``learner.old_logp: recompute`` on a bf16 Janus under DeepSpeed (ZeRO-3: partitioned weights gathered for
    the no-grad forward as for the training one): all four stages' first ratio is 1, where the sampler's own
    log-probs leave it only within BF16_RATIO_TOL."""
    ratios = {}
    for mode in ("sampler", "recompute"):
        policy = bf16_janus(janus_path)
        items = janus_items(policy)
        learner = build_learner(policy, policy.frozen_copy(), janus_recipe(janus_path, zero_stage, old_logp=mode))
        m = learner.step(copy.deepcopy(items))
        assert_first_step_is_on_policy(m)
        ratios[mode] = max(1 - m["learner/ratio_min"], m["learner/ratio_max"] - 1)
    assert ratios["sampler"] > 1e-4 and ratios["recompute"] < 1e-6
    assert m["learner/sampler_logp_gap_max"] > 0


def test_modality_mean_trains_janus_in_bf16_under_zero3(janus_path) -> None:
    """``loss_type: modality_mean`` with R3's image weight on a bf16 Janus under ZeRO-3: one finite, on-policy
    step whose gradient differs from pooled token_mean's (its image tokens outweigh the plans there)."""
    norms = {}
    for loss_type in ("token_mean", "modality_mean"):
        policy = bf16_janus(janus_path)
        items = janus_items(policy)
        recipe = janus_recipe(janus_path, 3, loss_type=loss_type, loss_weight_image=2.0)
        m = build_learner(policy, policy.frozen_copy(), recipe).step(copy.deepcopy(items))
        assert_first_step_is_on_policy(m)
        norms[loss_type] = m["learner/grad_norm"]
    assert abs(norms["modality_mean"] / norms["token_mean"] - 1) > 0.01, norms


def test_gradient_anchor_pins_one_gradient_order(janus_path) -> None:
    """Ranks run different stages: a plan uses neither the aligner nor the image head, a refinement does.
    DeepSpeed reduces gradients in the order backward produces them, so the orders must agree."""
    from r3_rl.learner.deepspeed_learner import gradient_anchor
    from r3_rl.learner.optim import trainable

    policy = JanusPolicy.from_pretrained(janus_path, templates=TEMPLATES)
    items = janus_items(policy)
    params, _ = trainable([policy.model])
    names = {id(p): n for n, p in policy.model.named_parameters()}
    order: list[str] = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda t: order.append(names[id(t)]))

    def gradient_order(stages: tuple[str, ...], anchored: bool) -> list[str]:
        order.clear()
        anchor = gradient_anchor(params) if anchored else 0.0  # made before the forward, as the driver does
        loss = sum(lp.sum() for lp in policy.segment_logprobs([it.segment for it in items if it.stage in stages]))
        (loss + anchor).backward()
        policy.model.zero_grad(set_to_none=True)
        return list(order)

    text, images = ("reason",), ("reflect", "refine")
    assert gradient_order(text, False) != gradient_order(images, False)  # what went wrong without it
    assert gradient_order(text, True) == gradient_order(images, True)
    assert sorted(gradient_order(text, True)) == sorted(names[id(p)] for p in params)


def test_reference_on_two_ray_learner_ranks(janus_path, ray_session) -> None:
    """ZeRO-2 bf16 on 2 ranks, each with its own policy, reference and engine.  The ranks run different
    stages (text without image, image with an image context), so this also checks that their gradients
    are reduced consistently: the update equals the one-process update (two bf16 ulps)."""
    from r3_rl.learner.ray_ranks import RankedLearner

    mirror, single = bf16_janus(janus_path), bf16_janus(janus_path)
    items = janus_items(mirror)
    before = {k: v.clone() for k, v in mirror.state_dict().items()}
    recipe = janus_recipe(janus_path, 2, ranks=2)
    ranked = build_learner(mirror, mirror.frozen_copy(), recipe)
    try:
        assert isinstance(ranked, RankedLearner)
        m = ranked.step(copy.deepcopy(items))
    finally:
        ranked.close()
    assert_first_step_is_on_policy(m)
    one = TorchLearner(single, single.frozen_copy(), recipe.learner)  # torch backend, fp32 master weights
    m1 = one.step(copy.deepcopy(items))
    assert m["learner/grad_norm"] == pytest.approx(m1["learner/grad_norm"], rel=1e-2)
    after = mirror.state_dict()
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    for k, v in single.state_dict().items():
        torch.testing.assert_close(after[k].float(), v.float(), rtol=2 ** -7, atol=1e-6, msg=k)


def test_no_reference_when_every_kl_weight_is_zero() -> None:
    cfg = learner_cfg(kl_coef_text=0.0, kl_coef_image=0.0)
    assert not needs_frozen_reference(SimpleNamespace(learner=cfg))
    assert needs_frozen_reference(SimpleNamespace(learner=learner_cfg(kl_coef_text=0.0, kl_coef_image=1e-3)))
    assert not needs_frozen_reference(SimpleNamespace(learner=learner_cfg(lora={"r": 2})))
    # LoRA's adapters-off reference is not built either
    lora = build_learner(tiny_policy(), None, SimpleNamespace(learner=learner_cfg(
        kl_coef_text=0.0, kl_coef_image=0.0, lora={"r": 2, "target_modules": ["q_proj"]})))
    assert lora.reference is None

    class Untouchable:  # a reference handed over anyway is never run
        def segment_logprobs(self, segments):
            raise AssertionError("reference forward with every KL weight 0")

    policy = tiny_policy()
    m = TorchLearner(policy, Untouchable(), cfg).step(copy.deepcopy(sample_items(policy)))
    assert m["learner/optimizer_steps"] == 1.0 and "learner/kl_mean" not in m


def test_trainer_builds_no_reference_without_kl(tmp_path) -> None:
    from conftest import REPO, tiny_overrides

    from r3_rl.config import load_recipe
    from r3_rl.trainer import Trainer

    def trainer(*extra: str) -> Trainer:
        return Trainer(load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + list(extra)),
                       tmp_path / "run")

    assert trainer().reference is not None
    t = trainer("learner.kl_coef_text=0", "learner.kl_coef_image=0")
    assert t.reference is None and t.learner.reference is None
