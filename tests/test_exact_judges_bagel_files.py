"""Exact checks of judge/checklist/detector scoring and BAGEL file handling (round 9E mutation audit).

Every expected value is written out by hand (English phrasing rules, GenEval's selection rule, BAGEL's resize
rule from its data/transforms.py); no expectation is computed by the function under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from r3_rl.errors import UserError
from r3_rl.rewards.base import RewardSample, Turn
from r3_rl.rewards.checklists import geneval_checklist, questions_for, tiif_questions
from r3_rl.rewards.detectors import DetectedObject, mask2former_instances, mask_to_box, select
from r3_rl.rewards.self_consistency import SelfConsistencyReward, VerdictConsistencyReward

RED = np.zeros((8, 8, 3), np.uint8) + np.array([200, 0, 0], np.uint8)


# ---------------------------------------------------------------- self / verdict consistency
def test_verdict_consistency_ignores_a_reflect_turn_without_text() -> None:
    """Catches dropping ``text is not None`` in critiqued(): an empty reflect turn silently scores 1 (a stop)."""
    history = [Turn(stage="generate", round=0, image=RED, reward=1.0), Turn(stage="reflect", round=1, text=None)]
    sample = RewardSample(prompt="p", metadata={}, stage="reflect", round=1, image=None, history=history)
    (out,) = VerdictConsistencyReward()([sample])
    assert out.failed and out.failure == "no critique of an image in this sample's history"


def test_self_consistency_refuses_max_questions_zero() -> None:
    """Catches ``max_questions < 1`` -> ``< 0``: max_questions=0 accepted, every sample then 'not scored'."""
    with pytest.raises(UserError, match="max_questions must be >= 1, got 0"):
        SelfConsistencyReward(max_questions=0)


# ---------------------------------------------------------------- checklists
def test_checklist_at_most_one_is_singular_and_at_most_two_plural() -> None:
    """Catches ``k - 1 != 1`` -> ``k != 1``: 'at most one dogs'."""
    meta = {"include": [{"class": "cat", "count": 1}],
            "exclude": [{"class": "dog", "count": 2}, {"class": "bird", "count": 3}, {"class": "cow", "count": 1}]}
    assert geneval_checklist(meta) == ["a cat", "at most one dog", "at most two birds", "no cows"]


def test_checklist_exact_single_object_says_exactly_one() -> None:
    """Catches ``count > 1`` -> ``>= 1`` in the exact-count branch: 'exactly a red car'."""
    meta = {"include": [{"class": "car", "count": 1, "color": "red"}, {"class": "dog", "count": 2}],
            "exclude": [{"class": "car", "count": 2}, {"class": "dog", "count": 3}]}
    assert geneval_checklist(meta) == ["exactly one red car", "exactly two dogs"]


def test_tiif_empty_question_lists_are_refused() -> None:
    """Catches dropping ``not qs`` in tiif_questions: zero questions accepted (a judge then sees a verdict prompt)."""
    with pytest.raises(UserError, match="0 questions but 0 answers"):
        tiif_questions({"yn_question_list": [], "yn_answer_list": []})


def test_tiif_answers_without_questions_are_a_tiif_error() -> None:
    """Catches dropping the ``yn_answer_list`` test in questions_for: the error stops naming the TIIF lists."""
    with pytest.raises(UserError, match="TIIF metadata needs lists 'yn_question_list' and 'yn_answer_list'"):
        questions_for({"yn_answer_list": ["yes"], "include": [{"class": "cat", "count": 1}]})


# ---------------------------------------------------------------- detectors
def _obj(score: float, box=(0.0, 0.0, 10.0, 10.0), label: str = "cat") -> DetectedObject:
    return DetectedObject(label, box, score)


def test_select_without_nms_keeps_identical_boxes() -> None:
    """Catches ``nms_threshold < 1`` -> ``<= 1``: GenEval's default (no NMS) drops duplicate boxes."""
    kept = select([_obj(0.9), _obj(0.8), _obj(0.2)], threshold=0.3, nms_threshold=1.0)
    assert [o.score for o in kept] == [0.9, 0.8]


def test_mask2former_crops_padding_rows_and_columns_in_order() -> None:
    """Catches valid_hw indices swapped in the padding crop: a wide image's masks come back transposed."""
    cls = torch.tensor([[5.0, -5.0, -5.0]])
    logits = torch.full((1, 8, 8), -10.0)
    logits[0, :4, :4] = 10.0  # padded 32x32 input; the image is its top 16 rows (16x32); mask = left half of it
    inst = mask2former_instances(cls, logits, padded_hw=(32, 32), valid_hw=(16, 32), out_hw=(16, 32))
    boxes = {label: mask_to_box(mask) for label, _, mask in inst}
    assert boxes[0] == (0.0, 0.0, 16.0, 16.0)


def test_label_map_keyed_by_normalised_spelling_applies() -> None:
    """Catches dropping ``key in label_map`` in normalize_label: a map keyed 'potted plant' misses 'Potted_Plant'."""
    from r3_rl.rewards.detectors import normalize_label

    assert normalize_label("Potted_Plant", {"potted plant": "plant"}) == "plant"


# ---------------------------------------------------------------- BAGEL config
def _llm(**over) -> dict:
    d = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 264, "rms_norm_eps": 1e-6}
    return {**d, **over}


def _vit(**over) -> dict:
    d = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "patch_size": 4, "image_size": 32, "num_channels": 3, "model_type": "siglip_vision_model"}
    return {**d, **over}


def test_llm_config_refuses_zero_field() -> None:
    """Catches ``value <= 0`` -> ``< 0`` in _require: rms_norm_eps 0 accepted."""
    from r3_rl.policy.bagel.config import llm_config_from_dict

    with pytest.raises(UserError, match=r"llm_config.json: 'rms_norm_eps' must be a positive number, got 0"):
        llm_config_from_dict(_llm(rms_norm_eps=0))


def test_llm_config_refuses_heads_not_divisible_by_kv_heads() -> None:
    """Catches dropping the ``num_attention_heads % num_key_value_heads`` check: 4 heads over 3 KV groups."""
    from r3_rl.policy.bagel.config import llm_config_from_dict

    with pytest.raises(UserError, match="num_key_value_heads groups"):
        llm_config_from_dict(_llm(num_key_value_heads=3))


def test_vit_config_refuses_a_single_layer() -> None:
    """Catches ``num_hidden_layers < 2`` -> ``< 1``: a 1-layer ViT file becomes a 0-layer tower."""
    from r3_rl.policy.bagel.config import vit_config_from_dict

    with pytest.raises(UserError, match="num_hidden_layers must be >= 2"):
        vit_config_from_dict(_vit(num_hidden_layers=1))


def test_grid_side_refuses_a_non_square_table() -> None:
    """Catches dropping the square check in grid_side: 63 rows read as a 7x7 table."""
    from r3_rl.policy.bagel.config import grid_side

    assert grid_side("ck", "vit_pos_embed.pos_embed", 64) == 8
    with pytest.raises(UserError, match="ck: vit_pos_embed.pos_embed has 63 rows, not a square grid"):
        grid_side("ck", "vit_pos_embed.pos_embed", 63)


def _config_dir(tmp_path, llm=None, vit=None):
    import json

    (tmp_path / "llm_config.json").write_text(json.dumps(llm or _llm()))
    (tmp_path / "vit_config.json").write_text(json.dumps(vit or _vit()))
    return tmp_path


def test_config_disagreeing_with_vit_table_is_refused(tmp_path) -> None:
    """Catches dropping the image_size/patch_size vs vit_pos_embed check: a 7x7 table with an 8-per-side ViT."""
    from r3_rl.policy.bagel.config import read_bagel_config

    d = _config_dir(tmp_path)
    with pytest.raises(UserError, match=r"vit_config.json: image_size/patch_size = 8 patches per side, but "
                                        r"vit_pos_embed.pos_embed is a 7-per-side table"):
        read_bagel_config(d, {"vit_pos_embed.pos_embed": (49, 64)})


def test_config_sizes_read_off_the_weight_shapes(tmp_path) -> None:
    """Catches a wrong latent_patch_size / table-side derivation from the tensor shapes."""
    from r3_rl.policy.bagel.config import read_bagel_config

    d = _config_dir(tmp_path)
    c = read_bagel_config(d, {"vit_pos_embed.pos_embed": (64, 64), "latent_pos_embed.pos_embed": (36, 64),
                              "vae2llm.weight": (64, 144)})  # 144 = 3*3 latents x 16 channels
    assert (c.vit_max_num_patch_per_side, c.max_latent_size, c.latent_patch_size) == (8, 6, 3)
    c = read_bagel_config(d, {"vit_pos_embed.pos_embed": (64, 64), "vae2llm.weight": (64, 64)})
    assert c.latent_patch_size == 2 and c.max_latent_size == 64


# ---------------------------------------------------------------- BAGEL VAE
def test_vae_with_wrong_downsampling_is_refused() -> None:
    """Catches dropping the ``2 ** (levels - 1) != downsample`` check: a 3-level (4x) VAE accepted."""
    from r3_rl.policy.bagel.vae import autoencoder_kwargs

    shapes = {f"encoder.down.{i}.block.0.conv1.weight": (32, 32, 3, 3) for i in range(3)}
    shapes.update({"encoder.conv_in.weight": (32, 3, 3, 3), "decoder.conv_in.weight": (32, 16, 3, 3),
                   "decoder.conv_out.weight": (3, 32, 3, 3)})
    with pytest.raises(UserError, match=r"ae: a VAE with 16 latent channels and 4x downsampling; BAGEL needs 16 and 8x"):
        autoencoder_kwargs(shapes)


# ---------------------------------------------------------------- BAGEL images
def test_resize_keeps_a_side_of_at_least_one_stride() -> None:
    """Catches dropping ``max(stride, ...)`` in snap: a 2000:1 image gets a 0 px side (reference gives 16)."""
    from r3_rl.policy.bagel.images import BAGEL_VAE_SIZE, target_size

    assert target_size(20000, 10, *BAGEL_VAE_SIZE) == (1024, 16)


def test_resize_does_not_upscale_past_need_and_caps_long_side() -> None:
    """Catches dropping ``min(..., 1.0)`` or the final long-side cap in target_size."""
    from r3_rl.policy.bagel.images import BAGEL_VIT_SIZE, R3_VAE_SIZE, target_size

    assert target_size(400, 300, *R3_VAE_SIZE) == (400, 304)   # no upscale to 512; 300 -> 304 (stride 16)
    assert target_size(300, 240, *BAGEL_VIT_SIZE) == (294, 238)  # short side 240 > 224: only snapped to 14s
    assert target_size(1500, 200, 1024, 512, 16) == (1024, 128)


def test_image_tensor_resizes_width_and_height_in_order() -> None:
    """Catches ``resize((h, w))``: a landscape image comes out portrait."""
    from PIL import Image

    from r3_rl.policy.bagel.images import image_tensor

    x = image_tensor(Image.new("RGB", (30, 20), (255, 0, 0)), (16, 8, 8))
    assert x.shape == (3, 8, 16)
    assert torch.equal(x[0], torch.ones(8, 16)) and torch.equal(x[1], -torch.ones(8, 16))


def test_to_uint8_clamps_out_of_range_pixels() -> None:
    """Catches dropping the clamp in to_uint8: 2.0 wraps instead of saturating at 255."""
    from r3_rl.policy.bagel.images import to_uint8

    out = to_uint8(torch.tensor([2.0, -3.0, 0.0]).view(1, 3, 1, 1))
    assert out.shape == (1, 1, 1, 3) and out[0, 0, 0].tolist() == [255, 0, 127]


def test_latent_grid_checks_both_sides_and_keeps_their_order() -> None:
    """Catches dropping ``width % d`` or swapping (h, w) in latent_grid."""
    from types import SimpleNamespace

    from r3_rl.policy.bagel.images import latent_grid

    model = SimpleNamespace(config=SimpleNamespace(latent_downsample=16))
    assert latent_grid(32, 64, model) == (2, 4)
    with pytest.raises(ValueError, match="a 32x40 image is not a multiple of 16"):
        latent_grid(32, 40, model)


# ---------------------------------------------------------------- BAGEL checkpoint files
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from r3_rl.policy.bagel import make_tiny_bagel

    return make_tiny_bagel(tmp_path_factory.mktemp("bagel9e") / "tiny", seed=0)


def _sharded(src, dst, move_key: str | None = None):
    """Copy of ``src`` with ema.safetensors split into two shards + index; ``move_key`` is indexed to the wrong shard."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(f"{dst}/ema.safetensors")
    (dst / "ema.safetensors").unlink()
    keys = sorted(state)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for name, part in zip(names, parts):
        save_file({k: state[k] for k in part}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    if move_key is not None:
        weight_map[move_key] = names[0] if weight_map[move_key] == names[1] else names[1]
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst, keys


def test_sharded_checkpoint_missing_shard_is_one_line_naming_it(tiny_dir, tmp_path) -> None:
    """Catches dropping the ``file.is_file()`` check in read_shapes: a missing shard is a raw safetensors error."""
    from r3_rl.policy.bagel.checkpoint import bagel_skeleton

    d, _ = _sharded(tiny_dir, tmp_path / "ck")
    bagel_skeleton(d)  # the intact sharded layout loads
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError) as e:
        bagel_skeleton(d)
    assert str(e.value) == f"{d / 'model-00002-of-00002.safetensors'}: missing (named by model.safetensors.index.json)"


def test_sharded_checkpoint_key_in_the_wrong_shard_is_one_line(tiny_dir, tmp_path) -> None:
    """Catches dropping the ``key not in present`` check: an index naming the wrong shard is a raw error."""
    from r3_rl.policy.bagel.checkpoint import bagel_skeleton

    probe, keys = _sharded(tiny_dir, tmp_path / "probe")
    key = keys[0]  # stored in shard 1; the index will send it to shard 2
    d, _ = _sharded(tiny_dir, tmp_path / "ck", move_key=key)
    with pytest.raises(UserError) as e:
        bagel_skeleton(d)
    assert str(e.value) == (f"{d / 'model-00002-of-00002.safetensors'}: key '{key}' missing "
                            f"(named by model.safetensors.index.json)")


def test_bad_key_error_names_the_index_or_the_single_file(tiny_dir, tmp_path) -> None:
    """Catches ``len(set(files)) == 1`` -> ``> 1`` in _weights_name: the error names the wrong file."""
    import json

    from safetensors.torch import load_file, save_file

    from r3_rl.policy.bagel.checkpoint import bagel_skeleton

    d, _ = _sharded(tiny_dir, tmp_path / "ck")
    shard = d / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    state["module.extra.weight"] = torch.zeros(2)
    save_file(state, str(shard))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["module.extra.weight"] = shard.name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as e:
        bagel_skeleton(d)
    assert str(e.value).startswith(f"{d / 'model.safetensors.index.json'}: unexpected key 'module.extra.weight'")

    import shutil

    single = tmp_path / "single"
    shutil.copytree(tiny_dir, single)
    state = load_file(f"{single}/ema.safetensors")
    state["module.extra.weight"] = torch.zeros(2)
    save_file(state, f"{single}/ema.safetensors")
    with pytest.raises(UserError) as e:
        bagel_skeleton(single)
    assert str(e.value).startswith(f"{single / 'ema.safetensors'}: unexpected key 'module.extra.weight'")


def test_vocab_size_equal_to_a_special_token_id_is_refused(tiny_dir, tmp_path) -> None:
    """Catches ``>= vocab_size`` -> ``>``: a token id equal to vocab_size (one past the table) passes the check."""
    import json
    import shutil

    from r3_rl.policy.bagel.checkpoint import bagel_skeleton

    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "llm_config.json").read_text())
    cfg["vocab_size"] = 260  # tiny tokenizer: 256 bytes, <|endoftext|> = 256, the four specials = 257..260
    (d / "llm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"llm_config.json: vocab_size 260 is smaller than the tokenizer's special"):
        bagel_skeleton(d)


# ---------------------------------------------------------------- vlm_judge parsing
def test_line_answers_need_a_whole_word() -> None:
    """Catches dropping ``\\b`` after (yes|no) in the line parser: 'Nothing ...' silently read as 'no'."""
    from r3_rl.rewards.vlm_judge import JudgeParseError, parse_answers

    with pytest.raises(JudgeParseError, match="judge gave 1 answers for 2 questions"):
        parse_answers("1. Nothing to add\n2. no", 2)
    with pytest.raises(JudgeParseError, match="no yes/no answers"):
        parse_answers("Yesterday\nNone", 2)


def test_verdict_with_an_unknown_word_is_a_failure_not_a_zero() -> None:
    """Catches ``.get(word, c)`` -> ``.get(word, 0)`` in parse_verdict: 'maybe' silently becomes correct=0."""
    from r3_rl.rewards.vlm_judge import JudgeParseError, parse_verdict

    assert parse_verdict('{"correct": " Yes ", "reason": "ok"}') == (1, "ok")
    with pytest.raises(JudgeParseError, match="'correct' must be 0 or 1, got 'maybe'"):
        parse_verdict('{"correct": "maybe"}')


def _judge_once(monkeypatch, reward, metadata: dict, content: str):
    import asyncio

    import r3_rl.rewards.vlm_judge as vj

    async def fake_request(*args, **kwargs):
        return {"choices": [{"message": {"content": content}}]}

    monkeypatch.setattr(vj, "arequest_json", fake_request)
    sample = RewardSample(prompt="p", metadata=metadata, stage="generate", round=0, image=RED)
    return asyncio.run(reward.score_one(None, sample))


def test_binary_judge_score_needs_every_answer_right(monkeypatch) -> None:
    """Catches ``float(matched == n)`` -> ``float(matched > 0)``: binary mode pays 1 for one right answer of two."""
    from r3_rl.rewards.vlm_judge import VlmJudgeReward

    meta = {"yn_question_list": ["Is there a cat?", "Is there a dog?"], "yn_answer_list": ["Yes", "no"]}
    out = _judge_once(monkeypatch, VlmJudgeReward(url="http://127.0.0.1:9/v1", model="m", binary=True), meta,
                      '{"Q1": "yes", "Q2": "yes"}')
    assert not out.failed and out.score == 0.0 and out.components == {"fraction": 0.5, "questions": 2.0}
    assert out.reason == "wrong: Q2"
    out = _judge_once(monkeypatch, VlmJudgeReward(url="http://127.0.0.1:9/v1", model="m", binary=True), meta,
                      '{"Q1": "Yes.", "Q2": "no"}')
    assert out.score == 1.0 and out.reason is None


def test_judge_reply_yes_but_is_a_counted_failure(monkeypatch) -> None:
    """A JSON answer 'yes, but ...' must be a failure with a reason, never a silent yes."""
    from r3_rl.rewards.vlm_judge import VlmJudgeReward

    meta = {"yn_question_list": ["Is there a cat?"], "yn_answer_list": ["yes"]}
    out = _judge_once(monkeypatch, VlmJudgeReward(url="http://127.0.0.1:9/v1", model="m"), meta,
                      '{"Q1": "yes, but it is small"}')
    assert out.failed and out.score is None
    assert out.failure == "JudgeParseError: answer 1: expected yes or no, got 'yes, but it is small'"


def test_judge_timeout_zero_is_refused() -> None:
    """Catches ``timeout <= 0`` -> ``< 0``: timeout 0 accepted, every request then fails at once."""
    from r3_rl.rewards.vlm_judge import VlmJudgeReward

    with pytest.raises(UserError, match="timeout > 0 are required"):
        VlmJudgeReward(url="http://127.0.0.1:9/v1", model="m", timeout=0)


def test_index_without_weight_map_is_one_line(tmp_path) -> None:
    """Catches dropping KeyError from the index parse: an index with no 'weight_map' is a raw KeyError."""
    from r3_rl.policy.bagel.checkpoint import weight_files

    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 1}}')
    with pytest.raises(UserError) as e:
        weight_files(tmp_path)
    assert str(e.value) == f"{tmp_path / 'model.safetensors.index.json'}: expected a JSON object with a 'weight_map'"


def test_config_refuses_a_boolean_count() -> None:
    """Catches dropping ``isinstance(value, bool)`` in _require: ``patch_size: true`` read as 1."""
    from r3_rl.policy.bagel.config import vit_config_from_dict

    with pytest.raises(UserError, match=r"vit_config.json: 'patch_size' must be a positive (number|integer), got True"):
        vit_config_from_dict(_vit(patch_size=True))


def test_self_consistency_refuses_a_policy_giving_extra_probabilities() -> None:
    """Catches dropping the ``len(got) != len(chunk)`` check: extra answers shift every later sample's scores."""

    class Chatty:
        def answer_yes_no(self, images, questions):
            return [0.9] * (len(questions) + 1)

    r = SelfConsistencyReward()
    r.bind_policy(Chatty())
    meta = {"yn_question_list": ["Is there a cat?", "Is it red?"], "yn_answer_list": ["yes", "no"]}
    sample = RewardSample(prompt="p", metadata=meta, stage="generate", round=0, image=RED)
    with pytest.raises(ValueError, match="answer_yes_no returned 3 probabilities for 2 questions"):
        r([sample])


# ---------------------------------------------------------------- bugs the round found (fixed in session 46)
@pytest.mark.parametrize("reader", ["loader", "recipe check"])
@pytest.mark.parametrize("weight_map", [[], {"a": 5}, {"a": "/etc/passwd"}, {"a": "../outside.safetensors"}])
def test_index_weight_map_must_name_shards_inside_the_checkpoint(tmp_path, weight_map, reader) -> None:
    """Catches the missing weight_map validation (a raw AttributeError/TypeError, or a shard path followed out of
    the checkpoint, until session 46): bad types or escaping shard names must be a one-line UserError."""
    import json

    from r3_rl.policy.bagel.checkpoint import weight_files
    from r3_rl.policy.bagel.recipe import weight_set

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path.parent / "outside.safetensors").write_bytes(b"")  # "../outside" exists: refused for where it is
    with pytest.raises(UserError) as e:
        (weight_files if reader == "loader" else weight_set)(tmp_path)
    assert str(e.value).startswith(f"{index}: ") and "\n" not in str(e.value)


def test_llm_config_refuses_a_fractional_layer_count() -> None:
    """Catches float counts passing _require (transformers' multi-line validation error until session 46):
    num_hidden_layers 2.5 must be a one-line error naming the file."""
    from r3_rl.policy.bagel.config import llm_config_from_dict

    with pytest.raises(UserError, match=r"^llm_config.json: 'num_hidden_layers' must be a positive integer, got 2.5$"):
        llm_config_from_dict(_llm(num_hidden_layers=2.5))


@pytest.mark.parametrize("reply", ["No idea\nyes", "1. Yes and no\n2. no", "1. Yes, but the car is blue\n2. no",
                                   "Yes.\nNo, although there is a dog", "1: yes - partly\n2: no"])
def test_line_answers_that_are_ambiguous_are_a_failure(reply: str) -> None:
    """Catches ambiguous yes/no lines silently counted as answers ("No idea" read as no until session 46, "Yes, but
    the car is blue" as yes until session 53) instead of a JudgeParseError."""
    from r3_rl.rewards.vlm_judge import JudgeParseError, parse_answers

    with pytest.raises(JudgeParseError, match="^ambiguous answer line"):
        parse_answers(reply, 2)


def test_an_answer_with_a_plain_remark_is_still_an_answer() -> None:
    """"yes, a cat" and "No, there is not one" answer; the hedge words are whole words ("butter" is not "but")."""
    from r3_rl.rewards.vlm_judge import parse_answers

    assert parse_answers("1. Yes, a cat\n2. No, there is not one\n3. yes - butter on bread", 3) == ["yes", "no", "yes"]
