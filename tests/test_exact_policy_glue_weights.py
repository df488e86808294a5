"""Exact, fast checks of the glue around weights and policies (round 9F audit): safetensors headers, parameter and
checkpoint byte counts, trainable-only weights, frozen / host copies, BAGEL's stage contexts and yes/no
probabilities, the plan-id memory, tree -> train-item selection, and the Blocks grid codes.

Every expected value is worked out by hand in the test (never by calling the function under test)."""
from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from r3_rl.blocks import world
from r3_rl.learner import batch
from r3_rl.learner.batch import TrainItem
from r3_rl.policy import base
from r3_rl.policy.base import ImageInput, Policy, host_copy, parse_critique
from r3_rl.trajectory import Node, PromptItem, SamplingParams, Segment, Tree
from r3_rl import weights

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_blocks.yaml"
GENEVAL = REPO / "recipes" / "grpo_geneval.yaml"


# ================================================================ r3_rl/weights.py
def _safetensors(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_safetensors_params_reads_a_little_endian_header_and_skips_metadata(tmp_path: Path) -> None:
    """Catches a big-endian header length or a __metadata__ entry counted as a tensor."""
    f = _safetensors(tmp_path / "m.safetensors", {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [5], "data_offsets": [24, 34]},
        "c": {"dtype": "F32", "shape": [], "data_offsets": [34, 38]},
    }, bytes(38))
    assert weights.safetensors_params(f) == 6 + 5 + 1


@pytest.mark.parametrize("content, why", [
    (struct.pack("<Q", 5) + b"nope!", "the header is not a JSON object of tensors with shapes and data offsets"),
    (struct.pack("<Q", 2) + b"[]", "the header is not a JSON object of tensors with shapes and data offsets"),
    (struct.pack("<Q", 37) + b'{"a": {"shape": [2], "dtype": "F32"}}',
     "the header is not a JSON object of tensors with shapes and data offsets"),
    (b"\x10\x00\x00", "3 bytes, shorter than the 8-byte header length"),  # a download cut short (until session 46:
    # struct.error, which no caller caught: a traceback from r3-rl plan and doctor)
    (struct.pack("<Q", 2 ** 40) + b"{}", "a header length of 1099511627776 bytes, over 100000000"),  # read with no
    # cap until session 46: 1 TiB asked of the allocator (MemoryError), a few GB really allocated on a big host
    (struct.pack("<Q", 10) + b"{}", "the header is cut at 2 of 10 bytes"),
], ids=["not-json", "a-list", "no-offsets", "3-bytes", "1-tib-header", "cut-header"])
def test_a_damaged_safetensors_file_is_weights_missing_in_one_line(tmp_path: Path, content: bytes, why: str) -> None:
    """Catches a damaged or hostile safetensors header read as anything but WeightsMissing naming the file (the
    error r3-rl doctor and plan report in one line with the fix)."""
    f = tmp_path / "bad.safetensors"
    f.write_bytes(content)
    with pytest.raises(weights.WeightsMissing) as e:
        weights.safetensors_params(f)
    assert str(e.value) == f"{f}: not a complete safetensors file ({why})"
    assert e.value.fix.startswith("download the model again")


def test_a_safetensors_file_cut_in_its_tensors_is_weights_missing(tmp_path: Path) -> None:
    """Catches a download cut after the header passing the doctor (until session 47 only the header was read,
    so a file missing its last tensor bytes counted its parameters and failed later, at load time)."""
    from safetensors.torch import save_file

    whole = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16)}, str(whole))
    assert weights.safetensors_params(whole) == 12 + 4  # the library's own file, whole
    data = whole.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-1])
    with pytest.raises(weights.WeightsMissing) as e:
        weights.safetensors_params(cut)
    assert str(e.value) == f"{cut}: not a complete safetensors file ({len(data) - 1} bytes, the header names {len(data)})"


def test_bin_parameter_count_defaults_to_float32_and_reads_torch_dtype(tmp_path: Path) -> None:
    """Catches a wrong default dtype size for .bin files without torch_dtype (40 bytes = 10 fp32 values)."""
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(bytes(40))
    assert weights.count_params([f], {}) == 10
    assert weights.count_params([f], {"torch_dtype": "bfloat16"}) == 20


def test_image_side_of_janus_pro_and_of_a_small_vq() -> None:
    """Catches the decoder upsampling exponent or default patch count off (Janus-Pro: 24 x 2**4 = 384 px)."""
    assert weights.image_side({}) == 384
    assert weights.image_side({"vq_config": {"num_patches": 16, "channel_multiplier": [1, 2]}}) == 32


def _config(tmp_path: Path, index: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text("{}")
    if index is not None:
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


def test_a_missing_shard_of_a_sharded_index_is_reported(tmp_path: Path) -> None:
    """Catches the missing-shard check being dropped (an interrupted download counted as complete)."""
    folder = _config(tmp_path, {"weight_map": {"a": "s-1.safetensors", "b": "s-2.safetensors"}})
    (folder / "s-1.safetensors").write_bytes(b"x")
    with pytest.raises(weights.WeightsMissing, match="lacks 1 of 2 weight shards"):
        weights.weight_files(folder)


def test_dangling_links_are_not_weight_files_and_bin_is_only_a_fallback(tmp_path: Path) -> None:
    """Catches a dangling hub-cache link counted as a weight file, or .bin files added beside .safetensors."""
    folder = _config(tmp_path)
    (folder / "a.safetensors").write_bytes(b"x")
    (folder / "b.safetensors").symlink_to(folder / "blobs-not-downloaded")
    (folder / "c.bin").write_bytes(b"x")
    assert weights.weight_files(folder) == [folder / "a.safetensors"]


def test_a_three_part_name_is_not_a_hub_id() -> None:
    """Catches 'org/name/extra' taken for a hub repo id."""
    assert weights._looks_like_repo_id("org/name") is True
    assert weights._looks_like_repo_id("org/name/extra") is False


def _recipe(path: Path, *sets: str):
    from r3_rl.config import load_recipe

    return load_recipe(path, list(sets))  # read only: nothing is written under the recipe's out_dir


def test_checkpoint_bytes_of_the_tiny_recipe() -> None:
    """Catches wrong fp32 optimiser bytes, reference, or parent-buffer sizes (tiny: 16 tokens/image, 512 entries)."""
    parts = weights.checkpoint_bytes(_recipe(TINY), 1000, 0)
    # float32: 4 B/param; AdamW 2 fp32 moments = 8 B/param; buffer 2 x 512 x (4 B x 16 tokens + 512 B)
    assert parts == {"model": 4000, "reference": 4000, "optimiser": 8000, "parent buffer": 2 * 512 * (64 + 512)}


def test_checkpoint_bytes_without_kl_or_with_lora_keep_no_reference() -> None:
    """Catches a reference copy counted when every KL weight is 0, or optimiser bytes counted under LoRA."""
    no_kl = weights.checkpoint_bytes(_recipe(TINY, "learner.kl_coef_text=0", "learner.kl_coef_image=0"), 1000, 0)
    assert no_kl["reference"] == 0 and no_kl["optimiser"] == 8000
    lora = weights.checkpoint_bytes(_recipe(TINY, "learner.lora={r: 4}"), 1000, 0)
    assert lora["reference"] == 0 and lora["optimiser"] == 0


def test_checkpoint_bytes_of_a_separate_ppo_critic() -> None:
    """Catches a separate critic counted without its optimiser (model 4000 + AdamW 8000)."""
    parts = weights.checkpoint_bytes(_recipe(TINY, "learner.algorithm=ppo", "learner.ppo.critic=separate",
                                               "learner.refine_baseline=group"), 1000, 0)
    assert parts["critic"] == 4000 + 8000


def test_checkpoint_bytes_of_janus_under_deepspeed() -> None:
    """Catches bf16 master-weight bytes, DeepSpeed's module copy, or 384 px -> 576 VQ-16 tokens being wrong."""
    r = _recipe(GENEVAL)
    parts = weights.checkpoint_bytes(r, 1000, 384 * 384)
    tokens = (384 // 16) ** 2  # 576
    assert parts == {"model": 2000, "reference": 2000, "optimiser": 12000, "DeepSpeed module": 2000,
                     "parent buffer": 2 * r.tree.buffer_size * (4 * tokens + 512)}


def test_checkpoint_bytes_under_deepspeed_use_the_engine_dtype_and_lora_has_no_module_copy() -> None:
    """Catches DeepSpeed's fp32 engine dtype ignored (8 B/param, not 12) and a module copy counted under LoRA."""
    fp32 = weights.checkpoint_bytes(_recipe(GENEVAL, "learner.deepspeed.dtype=fp32"), 1000, 384 * 384)
    assert fp32["optimiser"] == 8000
    lora = weights.checkpoint_bytes(_recipe(GENEVAL, "learner.lora={r: 4}"), 1000, 384 * 384)
    assert "DeepSpeed module" not in lora and lora["optimiser"] == 0


@pytest.mark.parametrize("steps, every, keep, want", [
    (10, 2, 10, 5),  # saves at 2 4 6 8 10: all five kept
    (9, 2, 10, 5),  # saves at 2 4 6 8 and the final 9
    (10, 2, 3, 4),  # keep_last 3 + the one being written
])
def test_checkpoints_on_disk(steps: int, every: int, keep: int, want: int) -> None:
    """Catches an off-by-one in the number of saves or in keep_last + the one being written."""
    r = SimpleNamespace(steps=steps, save_every=every, keep_last=keep)
    assert weights.checkpoints_on_disk(r) == want


def test_tiny_policy_facts_count_pixels_as_cells_times_cell_area() -> None:
    """Catches the tiny image's pixel count off by a factor CELL (4 x 4 cells of 8 x 8 px = 1024)."""
    facts = weights.policy_facts(_recipe(TINY))
    assert facts.image_pixels == 4 * 4 * 8 * 8


def test_bagel_policy_facts_count_the_vae_beside_the_weight_set(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Catches BAGEL's parameter count without ae.safetensors (the VAE is loaded too): 6 + 3 = 9 values."""
    from r3_rl.policy.bagel import recipe as bagel_recipe

    _safetensors(tmp_path / "ema.safetensors", {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}},
                 bytes(24))
    _safetensors(tmp_path / "ae.safetensors", {"v": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}},
                 bytes(12))
    monkeypatch.setattr(bagel_recipe, "check_model_dir", lambda model: tmp_path)
    monkeypatch.setattr(bagel_recipe, "weight_set", lambda folder: [folder / "ema.safetensors"])
    r = SimpleNamespace(policy=SimpleNamespace(kind="bagel", model=str(tmp_path), options={"image_size": 256}))
    facts = weights.policy_facts(r)
    assert (facts.params, facts.image_pixels, facts.folder) == (9, 256 * 256, tmp_path)


# ================================================================ r3_rl/policy/base.py
class _Toy(Policy):
    def __init__(self, module: torch.nn.Module) -> None:
        self._m = module

    reason = generate = reflect = refine = segment_logprobs = lambda *a, **k: None  # type: ignore[assignment]

    @property
    def model(self) -> torch.nn.Module:
        return self._m

    def with_model(self, model: torch.nn.Module) -> "_Toy":
        return _Toy(model)


def _toy() -> _Toy:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))  # 9 + 4 float32 values
    m[0].requires_grad_(False)
    m.register_buffer("scale", torch.zeros(5, dtype=torch.float64))  # 40 bytes, never trainable
    return _Toy(m)


def test_trainable_state_dict_holds_only_detached_trainable_weights() -> None:
    """Catches frozen weights or buffers in the trainable-only dict, or Parameters handed out undetached."""
    sd = _toy().trainable_state_dict()
    assert sorted(sd) == ["1.bias", "1.weight"]
    assert all(not v.requires_grad and not isinstance(v, torch.nn.Parameter) for v in sd.values())


def test_weight_nbytes_counts_dtype_sizes_and_trainable_only() -> None:
    """Catches bytes counted as elements, or the trainable_only filter inverted (92 B full, 16 B trainable)."""
    p = _toy()
    assert p.weight_nbytes() == 9 * 4 + 4 * 4 + 5 * 8
    assert p.weight_nbytes(trainable_only=True) == 4 * 4


def test_weight_nbytes_counts_a_zero3_shard_at_its_full_size() -> None:
    """Catches a ZeRO-3 partitioned weight counted at its (empty) local size instead of ds_numel."""
    p = _toy()
    p.model[1].weight.ds_numel = 30
    assert p.weight_nbytes(trainable_only=True) == 30 * 4 + 1 * 4


def test_frozen_copy_is_eval_without_gradients_and_shares_nothing() -> None:
    """Catches a reference that still requires grad, stays in train mode, or shares storage with the policy."""
    for on_host in (False, True):
        p = _toy()
        ref = p.frozen_copy(on_host=on_host).model
        assert not ref.training
        assert [t.requires_grad for t in ref.parameters()] == [False] * 4
        p.model[1].bias.data.fill_(7.0)
        assert ref[1].bias.item() != 7.0


def test_frozen_copy_on_host_goes_through_host_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches on_host ignored (a deepcopy on the GPU: 14.8 GB more beside a 7B policy)."""
    calls = []
    real = base.host_copy
    monkeypatch.setattr(base, "host_copy", lambda m: calls.append(m) or real(m))
    p = _toy()
    p.frozen_copy(on_host=False)
    assert calls == []
    p.frozen_copy(on_host=True)
    assert calls == [p.model]


def test_host_copy_copies_keeps_requires_grad_and_ties() -> None:
    """Catches host_copy sharing CPU storage (copy=False), forcing requires_grad, or untying tied weights."""
    emb, head = torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4, bias=False)
    head.weight = emb.weight
    m = torch.nn.ModuleDict({"emb": emb, "head": head, "frozen": torch.nn.Linear(1, 1)})
    m["frozen"].requires_grad_(False)
    c = host_copy(m)
    assert c["head"].weight is c["emb"].weight
    assert c["frozen"].weight.requires_grad is False and c["emb"].weight.requires_grad is True
    m["emb"].weight.data.fill_(3.0)
    assert not torch.equal(c["emb"].weight, torch.full((4, 2), 3.0))


def test_load_state_dict_refuses_unknown_names_and_missing_ones() -> None:
    """Catches a partial load that silently drops unknown weights, or a full load that accepts missing ones."""
    p = _toy()
    with pytest.raises(KeyError, match="nope"):
        p.load_state_dict({"nope": torch.zeros(1)}, partial=True)
    with pytest.raises(RuntimeError):
        p.load_state_dict({"1.bias": torch.zeros(1)})


def test_load_state_dict_sets_version_zero() -> None:
    """Catches `if version:` (a version 0 load leaves the old version stamped on every node)."""
    p = _toy()
    p.version = 3
    p.load_state_dict({"1.bias": torch.zeros(1)}, version=0, partial=True)
    assert p.version == 0 and p.model[1].bias.item() == 0.0


def test_exported_weight_files_are_the_safetensors_only(tmp_path: Path) -> None:
    """Catches the index json (or other files) taken for weight files."""
    for name in ("model-2.safetensors", "model-1.safetensors", "model.safetensors.index.json", "config.json"):
        (tmp_path / name).write_text("{}")
    assert _toy().exported_weight_files(tmp_path) == [tmp_path / "model-1.safetensors", tmp_path / "model-2.safetensors"]


def test_parse_critique_uses_the_last_think_and_empty_means_stop() -> None:
    """Catches the first </think> used, an empty instruction not stopping, or a case-sensitive stop test."""
    assert parse_critique("a</think>b</think> add a red square") == ("add a red square", False)
    assert parse_critique("thinking</think>   ") == ("", True)
    assert parse_critique("x</think> No Further Edit Needed") == ("No Further Edit Needed", True)
    assert parse_critique("no think tag") == ("no further edit needed", True)


# ================================================================ r3_rl/policy/bagel/policy.py
from r3_rl.policy.bagel import policy as bp  # noqa: E402
from r3_rl.policy.bagel.recipe import BagelOptions, StageTemplates  # noqa: E402


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)

    def encode(self, text, add_special_tokens=False, split_special_tokens=False):
        return {"Yes": [1], " Yes": [2, 50], "yes": [1], " yes": [3], "No": [4], " No": [5, 51], "no": [4],
                " no": [6]}.get(text, [len(text)])


def _bagel(monkeypatch: pytest.MonkeyPatch) -> bp.BagelPolicy:
    pol = object.__new__(bp.BagelPolicy)
    pol.options = BagelOptions(reflect_system="RSYS")
    pol.tokens = SimpleNamespace(im_end=99, im_start=98)
    pol.tokenizer = _Tok()
    pol.templates = StageTemplates(system="SYS", reason="R:{prompt}", reflect="F:{prompt}", refine="E:{instruction}")
    pol._plan_ids = OrderedDict()
    pol._model, pol.vae, pol.allowed, pol.grid = "MODEL", "VAE", "ALLOWED", (2, 3)
    pol.builder = SimpleNamespace(blocks=lambda blocks, images: (tuple(map(str, blocks)), images),
                                  encode=lambda rows: rows, vae_block=lambda img: SimpleNamespace(grid=(4, 5)))
    pol._text = lambda t: {"text": t}  # type: ignore[method-assign]
    monkeypatch.setattr(bp, "closed_block", lambda ids, tokens: ("closed", tuple(ids)))
    return pol


def test_plan_memory_keeps_the_most_recent_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the plan-id memory evicting too early, the newest entry, or not refreshing a re-sampled text."""
    pol = _bagel(monkeypatch)
    monkeypatch.setattr(bp, "PLAN_MEMORY", 2)
    draws = iter([[[1, 99]], [[2, 99]], [[1, 99]], [[3]]])
    monkeypatch.setattr(bp, "sample_text", lambda *a: (ids := next(draws), [[0.0] * len(i) for i in ids]))
    for _ in range(4):
        pol._sample_text([{"blocks": []}], SamplingParams(), None)
    # texts t1 (ids [1, 99]), t2, t1 again (refreshed), t3 (the im_end-less [3]): t2 is the oldest, evicted
    assert list(pol._plan_ids.items()) == [("t1", [1, 99]), ("t3", [3])]


def test_decode_strips_only_a_trailing_im_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the last token dropped even when it is not <|im_end|>."""
    pol = _bagel(monkeypatch)
    assert pol._decode([5, 6, 99]) == "t5 t6"
    assert pol._decode([5, 6]) == "t5 t6"


def test_generate_contexts_use_sampled_plan_ids_and_system_only_uncond(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a remembered plan re-encoded from text, or the text-CFG branch conditioned on prompt/plan."""
    pol = _bagel(monkeypatch)
    pol._plan_ids["the plan"] = [7, 8]
    seen = {}
    pol._sample_images = lambda stage, ctx, keys, sp, g: seen.update(stage=stage, ctx=ctx, keys=keys)
    pol.generate([PromptItem("p0", "cat"), PromptItem("p1", "dog"), PromptItem("p2", "cow")],
                 ["the plan", "new", None], SamplingParams())
    sys_, grid = {"text": "SYS"}, [2, 3]
    assert seen["stage"] == "generate" and seen["keys"] == ["p0", "p1", "p2"]
    assert seen["ctx"] == [
        {"stage": "generate", "cond": [sys_, {"text": "R:cat"}, {"text": ("closed", (7, 8))}], "text_uncond": [sys_],
         "grid": grid},
        {"stage": "generate", "cond": [sys_, {"text": "R:dog"}, {"text": ("closed", (3,))}], "text_uncond": [sys_],
         "grid": grid},
        {"stage": "generate", "cond": [sys_, {"text": "R:cow"}], "text_uncond": [sys_], "grid": grid},
    ]


def test_refine_contexts_cfg_branches_and_noise_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the edit's text-CFG branch losing the VAE image, the image-CFG branch keeping it, or keys
    without the parent image (siblings of different parents sharing noise)."""
    pol = _bagel(monkeypatch)
    monkeypatch.setattr(bp, "stored_per_row", lambda imgs: [{"0": f"img{i}"} for i in range(len(imgs))])
    monkeypatch.setattr(bp, "image_digest", lambda img: f"digest{int(img.sum())}")
    seen = {}
    pol._sample_images = lambda stage, ctx, keys, sp, g: seen.update(stage=stage, ctx=ctx, keys=keys)
    pol.refine([PromptItem("p0", "cat")], [ImageInput(np.ones((2, 2, 3), np.uint8))], ["make it red"],
               SamplingParams())
    text = {"text": "E:make it red"}
    assert seen["stage"] == "refine" and seen["keys"] == [("p0", "digest12")]
    assert seen["ctx"] == [{"stage": "refine", "images": {"0": "img0"}, "cond": [{"vae": 0}, {"vit": 0}, text],
                            "text_uncond": [{"vae": 0}, {"vit": 0}], "image_uncond": [text], "grid": [4, 5]}]


def test_reflect_context_is_system_then_vit_then_question(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the image (ViT block) left out of, or moved within, the critique's context."""
    pol = _bagel(monkeypatch)
    monkeypatch.setattr(bp, "stored_per_row", lambda imgs: [{"0": "img"}])
    seen = {}
    pol._sample_text = lambda ctx, sp, g: seen.update(ctx=ctx)
    pol.reflect([PromptItem("p0", "cat")], [ImageInput(np.zeros((2, 2, 3), np.uint8))], SamplingParams())
    assert seen["ctx"] == [{"stage": "reflect", "images": {"0": "img"},
                            "blocks": [{"text": "RSYS"}, {"vit": 0}, {"text": "F:cat"}]}]


def test_answer_yes_no_sums_first_token_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches yes/no probability from the wrong token of a multi-token word, a max instead of a sum, or a
    biased normaliser (P = 0.45 / (0.45 + 0.20) = 9/13)."""
    pol = _bagel(monkeypatch)
    probs = torch.full((60,), 0.2 / 52, dtype=torch.float64)
    for i, v in {1: 0.10, 2: 0.20, 3: 0.15, 4: 0.05, 5: 0.05, 6: 0.10, 50: 0.10, 51: 0.05}.items():
        probs[i] = v
    seen = {}

    def next_token_logits(rows, tails):
        seen.update(rows=rows, tails=[[b.ids for b in t] for t in tails])
        return probs.log().float().expand(len(rows), -1), None

    pol._model = SimpleNamespace(next_token_logits=next_token_logits)
    out = pol.answer_yes_no([ImageInput(np.zeros((2, 2, 3), np.uint8))], ["is it red"])
    assert out == pytest.approx([9 / 13], rel=1e-5)
    assert seen["tails"] == [[[98]]]


def test_with_model_builds_contexts_from_the_new_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a reference policy whose context builder still reads the policy's (trained) module."""
    pol = _bagel(monkeypatch)
    monkeypatch.setattr(bp, "ContextBuilder", lambda model, vae, vit, vae_size: ("builder", model, vae))
    other = pol.with_model("REF")
    assert other.model == "REF" and other.builder == ("builder", "REF", "VAE") and pol.model == "MODEL"


def test_lora_names_cover_both_experts_once_and_vision_scope() -> None:
    """Catches duplicate twin names or the connector left out of LoRA's vision scope."""
    pol = object.__new__(bp.BagelPolicy)
    assert pol.lora_target_names(["q_proj", "q_proj_moe_gen", "k_proj"]) == [
        "q_proj", "q_proj_moe_gen", "k_proj", "k_proj_moe_gen"]
    assert pol.lora_scope(True) == ["language_model", "vit_model", "connector"]
    assert pol.lora_scope() == ["language_model"]


def test_sample_images_groups_by_grid_and_temperature_zero_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches temperature 0 sampled stochastically, or images / log-probs returned to the wrong rows."""
    pol = _bagel(monkeypatch)
    calls = []
    monkeypatch.setattr(bp, "flow_settings", lambda opts, stage, cfg, stochastic: ("S", stage, stochastic))
    monkeypatch.setattr(bp, "flow_action", lambda tr: {"trace": tr.name})

    def sample_images(model, vae, builder, ctxs, grid, settings, keys, share, stochastic, generator):
        calls.append((grid, keys, settings, stochastic))
        return ([f"img-{k}" for k in keys],
                [SimpleNamespace(name=k, steps=[SimpleNamespace(logprob=float(len(k)))]) for k in keys])

    monkeypatch.setattr(bp, "sample_images", sample_images)
    ctxs = [{"grid": [2, 2]}, {"grid": [3, 3]}, {"grid": [2, 2]}]
    out = pol._sample_images("generate", ctxs, ["a", "bb", "ccc"], SamplingParams(temperature=0.0), None)
    assert calls == [((2, 2), ["a", "ccc"], ("S", "generate", False), False),
                     ((3, 3), ["bb"], ("S", "generate", False), False)]
    assert [o.image for o in out] == ["img-a", "img-bb", "img-ccc"]
    assert [o.segment.logprobs for o in out] == [[1.0], [2.0], [3.0]]
    assert [o.segment.action for o in out] == [{"trace": "a"}, {"trace": "bb"}, {"trace": "ccc"}]


def test_from_pretrained_accepts_the_largest_image_and_reads_the_version(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """Catches image_size equal to the latent table's reach refused (4 tokens x 16 px = 64 px is allowed)."""
    (tmp_path / bp.STATE_FILE).write_text(json.dumps({"version": 7}))
    monkeypatch.setattr(bp, "check_model_dir", lambda m: tmp_path)
    monkeypatch.setattr(bp, "load_bagel", lambda *a, **k: SimpleNamespace(
        config=SimpleNamespace(max_latent_size=4, latent_downsample=16)))

    class Stub(bp.BagelPolicy):
        def __init__(self, loaded, templates, options):
            self.options, self.version = options, 0

    pol = Stub.from_pretrained("m", templates={}, dtype="float32", options=BagelOptions(image_size=64))
    assert pol.version == 7
    with pytest.raises(Exception, match="exceeds"):
        Stub.from_pretrained("m", templates={}, dtype="float32", options=BagelOptions(image_size=80))


# ================================================================ r3_rl/learner/batch.py
def _seg(n: int = 2) -> Segment:
    return Segment("text", {}, list(range(n)), [0.0] * n)


def _tree(*nodes: Node) -> Tree:
    t = Tree("t", PromptItem("p", "x"))
    for n in nodes:
        t.add(n)
    return t


def _node(nid, parent, stage, group, reward, version=0, seg=True, **kw) -> Node:
    return Node(nid, parent, stage, 0, group, version, segment=_seg() if seg else None, reward=reward, **kw)


def test_version_zero_nodes_are_trained_and_staleness_boundary_is_kept() -> None:
    """Catches the warm-start (version 0) nodes dropped, or a node exactly max_staleness old refused."""
    t = _tree(_node("a", None, "reason", "g", 1.0, version=0), _node("b", None, "reason", "g", 0.0, version=0),
              _node("c", None, "reason", "h", 1.0, version=2), _node("d", None, "reason", "h", 0.0, version=2))
    batch.assign_advantages([t])
    items, stats = batch.collect_items([t], current_version=2, max_staleness=2)
    assert [(it.advantage, it.group, it.stage) for it in items] == [
        (0.5, "g", "reason"), (-0.5, "g", "reason"), (0.5, "h", "reason"), (-0.5, "h", "reason")]
    assert stats.groups == 2 and stats.stale_refused == 0
    _, stats = batch.collect_items([t], current_version=3, max_staleness=2)
    assert stats.stale_refused == 2 and stats.items == 2


def test_collect_items_counts_and_skips_exactly() -> None:
    """Catches empty segments trained, failed_rewards counting advantage-less nodes whose reward exists, or
    pooled-stage groups dropped for having no in-group signal."""
    nodes = [_node("a", None, "reason", "g", 1.0), _node("b", None, "reason", "g", 0.0),
             _node("e", None, "reason", "g", 0.5, seg=False),
             _node("f", None, "reflect", "r", 1.0), _node("h", None, "reflect", "r", 1.0),
             _node("x", None, "reason", "k", 0.3), _node("y", None, "reason", "k", None)]
    nodes[0].segment = Segment("text", {}, [], [])  # nothing sampled
    for n, a in zip(nodes, [1.0, -1.0, 0.0, 0.2, -0.2, None, None]):
        n.advantage = a
    items, stats = batch.collect_items([_tree(*nodes)], 0, 0, pooled_stages=frozenset({"reflect"}))
    assert [it.advantage for it in items] == [-1.0, 0.2, -0.2]
    assert stats.failed_rewards == 1 and stats.zero_signal_groups == 1 and stats.per_stage == {"reason": 1, "reflect": 2}


def test_copied_refine_with_failed_reward_stays_excluded_and_per_stage_stats() -> None:
    """Catches a copied image with a failed reward given advantage 0, or per-stage single-valid counts lost."""
    t = _tree(_node("c", None, "reflect", "cg", 1.0),
              _node("f1", "c", "refine", "fg", 1.0), _node("f2", "c", "refine", "fg", 0.0),
              _node("f3", "c", "refine", "fg", None, seg=False, meta={"copied": True}))
    stats = batch.assign_advantages([t])
    assert [t.nodes[k].advantage for k in ("f1", "f2", "f3")] == [0.5, -0.5, None]
    assert stats["reflect/single_valid_groups"] == 1.0 and stats["refine/groups"] == 1.0


def test_edited_image_gains_are_reward_minus_parent_image() -> None:
    """Catches the gain's sign flipped, a copied image credited, or the critique taken for the edited image."""
    img = np.zeros((1, 1, 3), np.uint8)
    t = _tree(_node("g", None, "generate", "gg", 0.25, image=img), _node("c", "g", "reflect", "cg", 1.0),
              _node("f", "c", "refine", "fg", 1.0, image=img),
              _node("k", "c", "refine", "fg", 0.25, seg=False, meta={"copied": True}),
              _node("n", "c", "refine", "fg", None, image=img))
    gains = batch.edited_image_gains([t])
    assert gains == {id(t.nodes["f"]): 0.75, id(t.nodes["n"]): None}


def test_shuffled_by_group_treats_ungrouped_items_as_groups_of_one() -> None:
    """Catches ungrouped items lumped into one group (never shuffled)."""
    items = [TrainItem(_seg(), float(i), "reason", 0) for i in range(6)]
    orders = {tuple(it.advantage for it in batch.shuffled_by_group(items, str(s))) for s in range(5)}
    assert any(o != (0.0, 1.0, 2.0, 3.0, 4.0, 5.0) for o in orders)
    assert all(sorted(o) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] for o in orders)


def test_policy_weight_and_stage_flag_defaults() -> None:
    """Catches unlisted stages weighted 0 instead of 1, or unlisted stages std-normalised."""
    cfg = SimpleNamespace(loss_weight_image=0.5, loss_weight_text=2.0, stage_weights={"reflect": 3.0})
    img = TrainItem(Segment("image", {}, [], [0.0]), 1.0, "generate", 0)
    txt = TrainItem(_seg(), 1.0, "reflect", 0)
    assert batch.policy_weight(cfg, img) == 0.5 and batch.policy_weight(cfg, txt) == 6.0
    assert batch.stage_flag({"reflect": True}, "generate") is False and batch.stage_flag({"reflect": True}, "reflect")


# ================================================================ r3_rl/blocks/world.py
def test_cell_token_codes_round_trip_by_hand() -> None:
    """Catches shape/colour decoded with the wrong divisor, or the last token id accepted (N_TOKENS = 19)."""
    # token 8 = 1 + 1 * 6 + 1 -> circle, green; 18 = 1 + 2 * 6 + 5 -> triangle, orange
    assert world.object_of(8) == ("circle", "green") and world.object_of(18) == ("triangle", "orange")
    with pytest.raises(ValueError):
        world.object_of(19)
    assert world.shape_index(np.array([0, 1, 7, 18])).tolist() == [-1, 0, 1, 2]
    assert world.color_index(np.array([0, 1, 7, 18])).tolist() == [-1, 0, 0, 5]


def test_objects_are_in_raster_order() -> None:
    """Catches column-major detection order."""
    g = world.empty_grid()
    g[0, 3], g[1, 0] = 1, 8
    assert world.objects(g) == [(0, 3, "square", "red"), (1, 0, "circle", "green")]


def test_number_words_and_articles() -> None:
    """Catches 'twenty' turned into 'many', a negative count accepted, or 'a orange'."""
    assert world.number_word(20) == "twenty" and world.number_word(21) == "many" and world.number_word(0) == "zero"
    with pytest.raises(ValueError):
        world.number_word(-1)
    assert world.article("orange") == "an" and world.article("red") == "a" and world.article("umber") == "an"

