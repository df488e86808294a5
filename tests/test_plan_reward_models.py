"""``r3-rl plan`` counts the reward models on each process's GPU (:mod:`r3_rl.plan.reward_models`).

Until 2026-12-06 the plan named GenEval's detector and CLIP as "not counted" (about 2 GB of the trainer's GPU in
fp32).  The sizes are checked against transformers' own model classes (the defaults, built on the meta device
from their published configs) and against a tiny CLIP saved to disk (exact, from its weights)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r3_rl.config import load_recipe
from r3_rl.plan.render import render, uncounted_reward_models
from r3_rl.plan.report import make_plan
from r3_rl.plan.reward_models import CLIP_L14, KNOWN_PARAMS, MASK2FORMER_SWIN_S, OWLV2_B16, reward_models

REPO = Path(__file__).resolve().parents[1]
GENEVAL = REPO / "recipes" / "grpo_geneval.yaml"
CPU_REWARDS = ["rewards.eval=[{name: geneval, options: {device: cpu}}]",
               "rewards.task=[{name: geneval, options: {device: cpu}}]"]


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No model is in the hub cache here, whatever the machine's own cache holds."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def trainer(plan):  # noqa: ANN001, ANN201
    return next(p for p in plan.processes if p.name == "trainer process")


def test_the_defaults_parameter_counts_are_transformers_own() -> None:
    """The built-in counts equal transformers' classes built from the published configs (meta device: no
    weights): CLIP ViT-L/14 is the well-known 427,616,513."""
    from transformers import (CLIPConfig, CLIPModel, Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              Owlv2Config, Owlv2ForObjectDetection, SwinConfig)

    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig(
            text_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12},
            vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14, "image_size": 224}, projection_dim=768))
        swin_s = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
                            out_features=["stage1", "stage2", "stage3", "stage4"])
        mask2former = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=swin_s, num_labels=80))
        owlv2 = Owlv2ForObjectDetection(Owlv2Config())  # its defaults are OWLv2 B/16 at 960 px
    assert count(clip) == KNOWN_PARAMS[CLIP_L14] == 427_616_513
    assert count(mask2former) == KNOWN_PARAMS[MASK2FORMER_SWIN_S]
    assert count(owlv2) == KNOWN_PARAMS[OWLV2_B16]


def test_geneval_puts_its_detector_and_clip_on_the_trainers_gpu() -> None:
    """The trainer's peak and GPU 0's total grow by exactly the two models' fp32 weights; on device cpu by
    nothing."""
    plan = make_plan(load_recipe(GENEVAL), 8, 80)
    on_cpu = make_plan(load_recipe(GENEVAL, CPU_REWARDS), 8, 80)
    expected = 4 * (KNOWN_PARAMS[MASK2FORMER_SWIN_S] + KNOWN_PARAMS[CLIP_L14])
    assert trainer(plan).resident["reward models"] == expected
    assert "reward models" not in trainer(on_cpu).resident
    assert trainer(plan).total - trainer(on_cpu).total == expected
    assert plan.gpu_totals()[0][1] - on_cpu.gpu_totals()[0][1] == expected
    text = render(plan)
    assert "facebook/mask2former-swin-small-coco-instance, 69 M, float32 (published config)" in text
    assert "not counted" not in text


def test_one_copy_per_model_and_dtype_in_a_process() -> None:
    """GenEval's colour CLIP and a clip reward on the same model and dtype share one copy (rewards/clip.py's
    shared_model); in bfloat16 it is a second copy, half the size."""
    both = ["rewards.eval=[{name: geneval}, {name: clip}]"]
    models = reward_models(load_recipe(GENEVAL, both).rewards.eval)
    assert [(m.model, m.dtype) for m in models] == [(MASK2FORMER_SWIN_S, "float32"), (CLIP_L14, "float32")]
    half = load_recipe(GENEVAL, ["rewards.eval=[{name: geneval}, {name: clip, options: {dtype: bfloat16}}]"])
    models = reward_models(half.rewards.eval)
    assert [m.bytes for m in models] == [4 * KNOWN_PARAMS[MASK2FORMER_SWIN_S], 4 * KNOWN_PARAMS[CLIP_L14],
                                         2 * KNOWN_PARAMS[CLIP_L14]]
    owl = reward_models(load_recipe(GENEVAL, ["rewards.eval=[{name: geneval, options: {detector: owlv2}}]"]
                                    ).rewards.eval)
    assert owl[0].model == OWLV2_B16 and owl[0].params == KNOWN_PARAMS[OWLV2_B16]


def test_a_local_model_is_sized_from_its_weights(tmp_path: Path) -> None:
    """A folder written by save_pretrained: exactly its saved values, in the reward's dtype."""
    from transformers import CLIPConfig, CLIPModel

    tiny = CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                             "num_hidden_layers": 2, "vocab_size": 99},
                                vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                               "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
                                projection_dim=16))
    tiny.save_pretrained(tmp_path / "clip")
    saved = sum(t.numel() for t in tiny.state_dict().values())
    recipe = load_recipe(GENEVAL, [f"rewards.eval=[{{name: clip, options: {{model: {tmp_path / 'clip'}, "
                                   f"dtype: bfloat16}}}}]", *CPU_REWARDS[1:]])
    plan = make_plan(recipe, 8, 80)
    assert trainer(plan).resident["reward models"] == 2 * saved
    assert "(weights on this machine)" in trainer(plan).notes["reward models"]


def test_reward_workers_hold_the_task_rewards_models() -> None:
    """With reward workers on GPUs each holds the task reward's models and the trainer only the eval's; with
    no GPU for them, they are not on a GPU at all."""
    workers = ["rollout.reward_workers=2", "rollout.gpus_per_reward_worker=0.25",
               "rewards.eval=[{name: clip}]", "rewards.task=[{name: geneval}]"]
    plan = make_plan(load_recipe(GENEVAL, workers), 8, 80)
    worker = next(p for p in plan.processes if p.name == "reward worker")
    assert worker.per_gpu == 2
    assert worker.resident == {"reward models": 4 * (KNOWN_PARAMS[MASK2FORMER_SWIN_S] + KNOWN_PARAMS[CLIP_L14])}
    assert trainer(plan).resident["reward models"] == 4 * KNOWN_PARAMS[CLIP_L14]
    assert ("2 reward workers", 2 * worker.total) in plan.gpu_totals()
    no_gpu = make_plan(load_recipe(GENEVAL, workers[:1] + workers[2:]), 8, 80)
    assert all(p.name != "reward worker" for p in no_gpu.processes)


def test_models_it_cannot_size_are_named_as_not_counted() -> None:
    """An open_clip architecture (no weights to read) and a hub id that is not on this machine; nothing at all
    for a policy on the CPU or for the Blocks reward."""
    recipe = load_recipe(GENEVAL, ["rewards.eval=[{name: clip, options: {backend: open_clip, model: ViT-H-14}}, "
                                   "{name: clip, options: {model: someone/some-clip}}]", *CPU_REWARDS[1:]])
    plan = make_plan(recipe, 8, 80)
    assert "reward models" not in trainer(plan).resident
    assert uncounted_reward_models(plan) == ("CLIP (open_clip): ViT-H-14, float32 (an open_clip architecture, no "
                                             "weights to size); CLIP: someone/some-clip, float32 (not on this "
                                             "machine)")
    assert "not counted: reward models on a GPU with no size here (CLIP (open_clip): ViT-H-14" in render(plan)
    assert uncounted_reward_models(make_plan(load_recipe(GENEVAL, ["policy.device=cpu"]), 8, 80)) == ""
    tiny = make_plan(load_recipe(REPO / "recipes" / "tiny_blocks.yaml"), 1, 80)
    assert all(not p.reward_models for p in tiny.processes)


@pytest.mark.parametrize("options, encoder_model, pretrained", [
    ({"backend": "open_clip"}, "ViT-L-14", "openai"),
    ({"backend": "open_clip", "model": CLIP_L14}, "ViT-L-14", "openai"),
    ({"backend": "open_clip", "pretrained": "/ckpt/l14.pt"}, "ViT-L-14", "/ckpt/l14.pt"),
    ({"backend": "open_clip", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "ViT-B-32", "laion2b_s34b_b79k"),
])
def test_open_clip_with_no_model_loads_geneval_l14_and_the_plan_names_it(options, encoder_model, pretrained) -> None:
    """``backend: open_clip`` with no ``model`` handed open_clip the transformers hub id (no open_clip name: the
    reward's load failed) while the plan named ViT-L-14; both now say ViT-L-14 / openai (session 53)."""
    from types import SimpleNamespace

    from r3_rl.plan.reward_models import models_of
    from r3_rl.rewards.clip import ClipEncoder

    encoder = ClipEncoder(**{k: options[k] for k in ("model", "backend", "pretrained") if k in options}, device="cpu")
    assert (encoder.model_name, encoder.pretrained) == (encoder_model, pretrained)
    assert [m.model for m in models_of(SimpleNamespace(name="clip", options=options))] == [encoder_model]
    assert ClipEncoder(device="cpu").model_name == CLIP_L14  # transformers keeps its hub id
