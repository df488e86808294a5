"""Exact small cases for ``r3-rl plan``'s report, advice and BAGEL shape, and for the readers of user files
(text, JSON lines) and run folders -- each one a bug a mutation audit (round 10C, 2026-12-07) slipped past the
suite.  Expected values are worked out by hand (byte counts, line and column numbers, GB = 10^9 bytes)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from test_exact_policies_plan import _shape  # a hand-sized ModelShape, as round 9C's plan cases use

from r3_rl.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ jsonl.py
def test_jsonl_skips_blank_and_whitespace_lines_and_keeps_file_line_numbers(tmp_path: Path) -> None:
    """Catches a blank-line test of ``not line`` (a "\\n" line parsed as JSON) instead of ``not line.strip()``."""
    from r3_rl.jsonl import read_jsonl_objects

    p = tmp_path / "p.jsonl"
    p.write_text('{"a": 1}\n\n   \t\n{"b": 2}\n')
    assert list(read_jsonl_objects(p)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_jsonl_bad_json_names_the_line_and_the_one_based_column(tmp_path: Path) -> None:
    """Catches the column reported as json's 0-based ``pos`` instead of its 1-based ``colno``."""
    from r3_rl.jsonl import read_jsonl_objects

    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n{"a": x}\n')  # 'x' is the 7th character of line 3
    with pytest.raises(UserError) as e:
        list(read_jsonl_objects(p))
    assert str(e.value) == f"{p}:3: not valid JSON (Expecting value at column 7)"


# ------------------------------------------------------------------------------------------------ run_dir.py
def _tiny_recipe(tmp_path: Path, *sets: str):
    from r3_rl.config import load_recipe

    return load_recipe(REPO / "recipes" / "tiny_blocks.yaml", [f"out_dir={tmp_path}", *sets])


def test_a_run_dir_holding_a_linked_file_is_refused(tmp_path: Path) -> None:
    """Catches a link check that looks at folders only: a planted ``recipe.yaml`` link would be written through."""
    from r3_rl.run_dir import make_run_dir

    run, target = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    target.write_text("precious\n")
    (run / "events.log").symlink_to(target)
    with pytest.raises(UserError) as e:
        make_run_dir(_tiny_recipe(tmp_path), str(run))
    assert str(e.value) == (f"run dir {run}: events.log is a symbolic link; the run would write through it "
                            f"(replace it with a real file or folder)")
    assert target.read_text() == "precious\n" and not (run / "recipe.yaml").exists()


def test_a_resume_keeps_the_earlier_recipe_only_when_it_differs(tmp_path: Path) -> None:
    """Catches the keep-previous test inverted: an unchanged recipe set aside, a changed one overwritten."""
    from r3_rl.run_dir import make_run_dir

    run = tmp_path / "run"
    first = _tiny_recipe(tmp_path)
    assert make_run_dir(first, str(run)) == run
    before = (run / "recipe.yaml").read_text()
    make_run_dir(first, str(run))  # the same settings again: nothing set aside
    assert sorted(p.name for p in run.iterdir()) == ["recipe.yaml"]
    changed = _tiny_recipe(tmp_path, "learner.lr=0.000123")
    make_run_dir(changed, str(run))
    kept = sorted(p.name for p in run.iterdir() if p.name != "recipe.yaml")
    assert len(kept) == 1 and kept[0].startswith("recipe.2") and kept[0].endswith(".yaml")
    assert (run / kept[0]).read_text() == before
    assert (run / "recipe.yaml").read_text() != before


def test_a_third_run_in_the_same_second_gets_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``if`` for ``while`` in the same-second loop: the third run would write into the second's folder."""
    from r3_rl import run_dir, stamps

    recipe = _tiny_recipe(tmp_path)
    monkeypatch.setattr(stamps.time, "strftime", lambda fmt, *a: "20260102-030405")
    (tmp_path / f"{recipe.name}-20260102-030405").mkdir()
    (tmp_path / f"{recipe.name}-20260102-030405-1").mkdir()
    got = run_dir.make_run_dir(recipe)
    assert got == tmp_path / f"{recipe.name}-20260102-030405-2"
    assert sorted(p.name for p in got.iterdir()) == ["recipe.yaml"]
    assert list((tmp_path / f"{recipe.name}-20260102-030405-1").iterdir()) == []


# ------------------------------------------------------------------------------------------------ plan/report.py


def _sp(max_new_tokens: int = 0, cfg_scale: float = 1.0, top_p: float = 1.0):
    return SimpleNamespace(max_new_tokens=max_new_tokens, cfg_scale=cfg_scale, top_p=top_p)


def test_stage_sizes_give_generate_and_refine_their_cfg_rows() -> None:
    """Catches the refine stage's text-CFG row dropped (only generate counted 2 rows), or reflect given one."""
    from r3_rl.plan.memory import Stage
    from r3_rl.plan.report import stages

    rollout = SimpleNamespace(reason=_sp(20), generate=_sp(cfg_scale=5.0, top_p=0.95), reflect=_sp(30, cfg_scale=5.0),
                              refine=_sp(cfg_scale=5.0))
    got = stages(SimpleNamespace(rollout=rollout), _shape(edit_tokens=7, image_cfg_rows=1))
    # the prompt allowance is 96 tokens; an input image is 4 vision tokens + 2 markers
    assert got == [Stage("reason", 96, 20, 1, 100, False), Stage("generate", 116, 4, 2, 10, True),
                   Stage("reflect", 102, 30, 1, 100, False), Stage("refine", 96 + 6 + 7 + 30, 4, 3, 10, False)]
    rollout.refine = _sp()  # no text CFG: no image-CFG row either (BAGEL guides by the image on top of the text)
    assert stages(SimpleNamespace(rollout=rollout), _shape(image_cfg_rows=1))[3].rows == 1


def test_a_cfg_scale_below_one_is_an_unconditional_row_for_janus_but_none_for_a_flow_policy() -> None:
    """Janus and the tiny policy mix any scale but 1 with an unconditional row (``cfg_logits``); BAGEL's flow
    guidance encodes its text-unconditional branch only above 1 (``Guidance.active``), so a 0.5 costs it no row.
    Catches the plan counting Janus's rule for a flow policy (session 52: BAGEL planned 2 rows it never built)."""
    from r3_rl.plan.report import stages

    rollout = SimpleNamespace(reason=_sp(20), generate=_sp(cfg_scale=0.5), reflect=_sp(30), refine=_sp(cfg_scale=0.5))
    janus = stages(SimpleNamespace(rollout=rollout), _shape())
    flow = stages(SimpleNamespace(rollout=rollout), _shape(flow=True, image_cfg_rows=1))
    assert [s.rows for s in janus] == [1, 2, 1, 2]
    assert [s.rows for s in flow] == [1, 1, 1, 1]
    rollout.generate = rollout.refine = _sp(cfg_scale=4.0)
    assert [s.rows for s in stages(SimpleNamespace(rollout=rollout), _shape(flow=True, image_cfg_rows=1))] == [1, 2, 1, 3]


def _learner_recipe(kl_text: float = 0.0, kl_image: float = 0.01, replay=None):
    learner = SimpleNamespace(micro_batch_size=2, ranks=1, gradient_checkpointing=True, lora=None, backend="torch",
                              deepspeed=SimpleNamespace(zero_stage=0, config=None), algorithm="grpo",
                              ppo=SimpleNamespace(critic="shared"), kl_coef_text=kl_text, kl_coef_image=kl_image,
                              critic_replay=replay or SimpleNamespace(coef=0.0, examples=0, questions=0))
    rollout = SimpleNamespace(reason=_sp(20), generate=_sp(cfg_scale=5.0), reflect=_sp(30), refine=_sp(cfg_scale=5.0))
    return SimpleNamespace(learner=learner, rollout=rollout, policy=SimpleNamespace(dtype="float32"))


def test_learner_micro_batch_tokens_and_an_image_only_kl_reference() -> None:
    """Catches the learner's shifted positions counted without the ``- 1``, and a KL reference needing both coefs."""
    from r3_rl.plan.report import Process, add_learner

    p = add_learner(Process("trainer process", 1.0), _learner_recipe(), _shape())
    # worst stage: refine, 2 CFG rows x (96 + 6 + 30 context + 4 new = 136 positions); the learner predicts 135 of
    # them: 2 segments x 2 rows x 135 = 540 tokens; checkpointed, a token keeps (2 x 4 layers + 5) x 4 bytes x 64
    assert p.phases["learner micro-batch"]["activations"] == 540 * 13 * 4 * 64
    assert p.notes["activations"].startswith("2 refine segment(s) x 2 x 136 tokens, checkpointing on")
    assert p.resident["reference"] == 4 * 3 * 10 ** 9  # kl_coef_image alone keeps a float32 frozen copy
    assert p.notes["reference"] == "frozen copy of the policy"
    text_only = add_learner(Process("trainer process", 1.0), _learner_recipe(kl_text=0.1, kl_image=0.0), _shape())
    assert text_only.resident["reference"] == 12 * 10 ** 9
    none = add_learner(Process("trainer process", 1.0), _learner_recipe(kl_image=0.0), _shape())
    assert none.resident["reference"] == 0.0 and none.notes["reference"] == "none (KL weights 0)"


def test_critic_replay_rehearsal_tokens_and_off_at_coef_zero() -> None:
    """Catches the rehearsal's critique counted without its ``- 1`` shift, and a coef of 0 still rehearsing."""
    from r3_rl.plan.report import rehearsal_tokens

    on = _learner_recipe(replay=SimpleNamespace(coef=0.5, examples=3, questions=2))
    # a critique: reflect's 102 context + 30 new - 1 = 131; a question: 96 + 4 vision tokens + 2 = 102, two of them
    assert rehearsal_tokens(on, _shape()) == 3 * (131 + 2 * 102)
    off = _learner_recipe(replay=SimpleNamespace(coef=0.0, examples=3, questions=2))
    assert rehearsal_tokens(off, _shape()) == 0


def test_vq_decode_chunks_default_to_eight_and_minus_one_decodes_all() -> None:
    """Catches ``decode_chunk <= 0`` for ``< 0``: Janus' 0 (the default chunk of 8) read as "all images at once"."""
    from r3_rl.plan.report import Process, add_sampling

    def decode_phase(chunk: int, segments: int) -> str:
        p = add_sampling(Process("w", 1.0), _learner_recipe(), _shape(image_side=64, vq_channels=8, decode_chunk=chunk),
                         segments, "sampling")
        return [k for k in p.phases if "decode" in k][0]

    assert decode_phase(0, 16) == "VQ decode (8 images at a time)"
    assert decode_phase(0, 5) == "VQ decode (5 images at a time)"
    assert decode_phase(-1, 16) == "VQ decode (16 images at a time)"
    assert decode_phase(3, 16) == "VQ decode (3 images at a time)"


GENEVAL = REPO / "recipes" / "grpo_geneval.yaml"


@pytest.mark.parametrize("r, store", [
    # 4 layers x 4 projections x r x (64 + 64) adapter parameters, fp32 under the torch backend: r 16 -> 131,072
    # bytes, more than half the 200,000-byte bf16 state (the engine then puts a full state, no update beside it);
    # r 4 -> 32,768 bytes, at most half: pinned beside the full state
    (16, 200_000), (4, 200_000 + 32_768)])
def test_rays_store_holds_the_lora_update_only_when_at_most_half_the_state(r: int, store: int) -> None:
    """Catches ``update <= full`` for ``2 * update <= full`` (the Ray engine's rule for putting a LoRA update)."""
    from r3_rl.config import load_recipe
    from r3_rl.plan.report import host_memory

    recipe = load_recipe(GENEVAL, ["learner.ranks=1", "learner.backend=torch",
                                   f"learner.lora={{r: {r}, target_modules: [q_proj, k_proj, v_proj, o_proj]}}"])
    assert host_memory(recipe, _shape(params=100_000, params_trained=100_000))["Ray object store"] == store


@pytest.mark.parametrize("sets, store", [
    # 4 ranks, bf16, no LoRA, 100,000 parameters (50,000 trained): full state 200,000 bytes.  At set-up the store
    # holds the policy and its frozen KL reference (2 x 200,000); later the full state + rank 0's trained
    # weights (200,000 + 2 x 50,000 = 300,000): the larger of the two
    ([], 400_000),
    (["learner.kl_coef_text=0", "learner.kl_coef_image=0"], 300_000)])  # no reference sent: 300,000
def test_rays_store_with_learner_ranks_counts_the_reference_only_when_kl_needs_one(sets: list, store: int) -> None:
    """Catches the set-up term's factor swapped (2 copies without a KL reference, 1 with one)."""
    from r3_rl.config import load_recipe
    from r3_rl.plan.report import host_memory

    host = host_memory(load_recipe(GENEVAL, sets), _shape(params=100_000, params_trained=50_000))
    assert host["Ray object store"] == store
    assert host.get("the trainer's KL reference", 0) == (200_000 if not sets else 0)


# ------------------------------------------------------------------------------------------------ plan/render.py
SAVES = {"learner.gradient_checkpointing": {True: 30}, "eval.batch_size": {4: 5, 2: 8, 1: 10},
         "learner.micro_batch_size": {2: 10, 1: 20}, "learner.lora": {"{'r': 16}": 25}}
KEYS = [("learner.gradient_checkpointing", [True]), ("eval.batch_size", [4, 2, 1]),
        ("learner.micro_batch_size", [2, 1]), ("learner.lora", [{"r": 16}])]


def _advise(monkeypatch: pytest.MonkeyPatch, limit: float) -> list:
    """``advice`` over a hand cost model: 100 GB, less each change's saving; fits at ``limit`` GB or under."""
    from r3_rl.plan import render

    def fake_try(plan, changes):
        cost = 100.0 - sum(SAVES[k][str(v) if isinstance(v, dict) else v] for k, v in changes.items())
        return SimpleNamespace(fits=cost <= limit, gpu_totals=lambda: [("gpu", cost * 1e9)])

    monkeypatch.setattr(render, "_candidates", lambda plan: KEYS)
    monkeypatch.setattr(render, "_try", fake_try)
    return render.advice(SimpleNamespace())


def test_advice_lists_each_single_change_at_its_mildest_fitting_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the search not stopping at a key's first fitting value (two lines for one key)."""
    assert _advise(monkeypatch, 92) == ["learner.gradient_checkpointing: true  -> fullest GPU 70.0 GB",
                                        "eval.batch_size: 2  -> fullest GPU 92.0 GB",
                                        "learner.micro_batch_size: 2  -> fullest GPU 90.0 GB",
                                        "learner.lora: {r: 16}  -> fullest GPU 75.0 GB"]


def test_advice_combination_drops_keys_it_does_not_need(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the relaxation never dropping a key (``[*values]`` for ``[None, *values]``) or LoRA forced in."""
    # all but LoRA at their strongest: 100 - 30 - 10 - 20 = 40 fits 60; relaxed from the last key: the micro-batch
    # can go (60), the eval batch cannot (4 -> 65, 2 -> 62), checkpointing cannot (90)
    assert _advise(monkeypatch, 60) == [
        "no single change is enough; together: learner.gradient_checkpointing: true, eval.batch_size: 1  "
        "-> fullest GPU 60.0 GB"]


def test_advice_says_when_even_every_change_is_not_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the all-changes message losing LoRA or its figure (100 - 30 - 10 - 20 - 25 = 15 GB)."""
    assert _advise(monkeypatch, 10) == [
        "even all of these leave it over: learner.gradient_checkpointing: true, eval.batch_size: 1, "
        "learner.micro_batch_size: 1, learner.lora: {r: 16}  -> fullest GPU 15.0 GB; use more or larger GPUs"]


def test_advice_never_tries_a_layout_train_refuses() -> None:
    """Catches ``_try`` planning a change without ``check_ranks`` (2 ranks on the torch backend advised)."""
    from r3_rl.config import load_recipe
    from r3_rl.plan.render import _try
    from r3_rl.plan.report import make_plan

    plan = make_plan(load_recipe(GENEVAL, ["learner.ranks=1", "learner.backend=torch"]), 8, 80.0, _shape())
    assert _try(plan, {"learner.ranks": 2}) is None
    ok = _try(plan, {"learner.ranks": 2, "learner.backend": "deepspeed"})
    assert ok is not None and ok.recipe.learner.ranks == 2 and plan.recipe.learner.ranks == 1


# ------------------------------------------------------------------------------------------------ textfiles.py
def test_a_bad_utf8_byte_is_named_by_line_and_one_based_column(tmp_path: Path) -> None:
    """Catches the column reported 0-based (``e.start`` for ``e.start + 1``)."""
    from r3_rl.textfiles import read_utf8

    p = tmp_path / "t.txt"
    p.write_bytes(b"ok\nab\xffcd\n")
    with pytest.raises(UserError) as e:
        read_utf8(p)
    assert str(e.value) == f"{p}:2: not valid UTF-8 (byte 0xff at column 3); save the file as UTF-8"


def test_the_bad_utf8_column_counts_characters_not_bytes(tmp_path: Path) -> None:
    """"éà" is two characters in four bytes: the bad byte after them is at column 3, where an editor shows it."""
    from r3_rl.textfiles import read_utf8

    p = tmp_path / "t.txt"
    p.write_bytes("ok\néà".encode() + b"\xffcd\n")
    with pytest.raises(UserError) as e:
        read_utf8(p)
    assert str(e.value) == f"{p}:2: not valid UTF-8 (byte 0xff at column 3); save the file as UTF-8"


def test_expanded_size_counts_to_limit_plus_one_and_the_recipe_cap_is_inclusive() -> None:
    """Catches the alias-bomb counter stopping at ``limit`` (never over it) and ``>=`` refusing exactly the cap."""
    from r3_rl.textfiles import MAX_RECIPE_NODES, check_expanded_size, expanded_size

    assert expanded_size({"a": [1, 2, 3]}, 100) == 6  # the mapping, its key, the list, three items
    assert expanded_size(list(range(10)), 3) == 4
    # a mapping + its key + a list of n items = n + 3 values
    check_expanded_size({"a": [0] * (MAX_RECIPE_NODES - 3)}, "r.yaml")
    with pytest.raises(UserError, match=f"r.yaml: the recipe expands to more than {MAX_RECIPE_NODES} values"):
        check_expanded_size({"a": [0] * (MAX_RECIPE_NODES - 2)}, "r.yaml")


def test_an_empty_mapping_recipe_is_refused_like_an_empty_file(tmp_path: Path) -> None:
    """Catches ``{}`` accepted as a recipe (it would train on every default)."""
    from r3_rl.textfiles import read_recipe_yaml

    p = tmp_path / "r.yaml"
    p.write_text("{}\n")
    with pytest.raises(UserError, match=r"r\.yaml: recipe is empty"):
        read_recipe_yaml(p)


# ------------------------------------------------------------------------------------------------ plan/bagel_shape.py
def _bagel(**options):
    from r3_rl.plan.bagel_shape import bagel_shape

    return bagel_shape(SimpleNamespace(policy=SimpleNamespace(model="ByteDance-Seed/BAGEL-7B-MoT", options=options)))


def test_bagel_edit_context_image_and_trained_vit_sizes() -> None:
    """Catches an edit's VAE latent tokens without their 2 markers, and ``train_vit`` read inverted."""
    small = _bagel(vae_size=(256, 128, 16))
    assert small.edit_tokens == (256 // 16) ** 2 + 2  # 8x VAE, 2x2 patches: 16 x 16 latent tokens + 2 markers
    base = _bagel()
    assert base.edit_tokens == 32 * 32 + 2 and base.image_tokens == 32 * 32  # 512 px
    assert base.vision_tokens == (504 // 14) ** 2  # SigLIP at the max side: 36 x 36
    assert base.params_vision > 0
    assert base.params_trained < base.params - base.params_vision  # the frozen ViT is not trained by default
    assert _bagel(train_vit=True).params_trained == base.params_trained + base.params_vision


@pytest.mark.parametrize("sets, prompts", [(["eval.size=7"], 7), ([], 553)])  # grpo_geneval: data.eval_size 553
def test_eval_chains_in_host_memory_size_the_eval_by_eval_size_first(sets: list, prompts: int) -> None:
    """Catches ``data.eval_size`` read before ``eval.size`` for the eval's chains kept in host memory."""
    from r3_rl.config import load_recipe
    from r3_rl.plan.report import host_memory

    recipe = load_recipe(GENEVAL, ["eval.rounds=2", *sets])
    # a 10 px image: 3 x 10 x 10 bytes of pixels, kept after rounds 0, 1 and 2 (a Janus context holds token ids)
    assert host_memory(recipe, _shape(image_side=10))["the trainer's eval chains"] == prompts * 3 * 300


# ------------------------------------------------------------------------------------------------ plan/validate.py
def test_validate_learner_check_predicts_the_shifted_positions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the harness's learner tokens counted without ``- 1`` (the learner predicts all but the first)."""
    import torch
    from transformers import AutoConfig

    from r3_rl.plan import memory, validate
    from r3_rl.plan.shapes import shape_from_config

    seen: dict = {}
    activations, logits = memory.activations, memory.learner_logits
    monkeypatch.setattr(memory, "activations", lambda shape, tokens, *a, **k: seen.setdefault("tokens", tokens)
                        and activations(shape, tokens, *a, **k))
    monkeypatch.setattr(memory, "learner_logits", lambda stage: seen.setdefault("stage", stage) and logits(stage))
    torch.set_num_threads(1)
    path = validate.janus_shaped(tmp_path / "j", 128, 1, 2)
    validate.learner_check(path, shape_from_config(AutoConfig.from_pretrained(path), "validation"), True, 2)
    stage = seen["stage"]
    assert (stage.name, stage.rows, stage.new_tokens) == ("refine", 2, 4)  # CFG rows, a 2 x 2 grid
    assert seen["tokens"] == 2 * 2 * (stage.context + 4 - 1)


@pytest.mark.parametrize("zero, offload, note", [
    # ZeRO-1 stages its bucket in fp32: 8,000,000 bytes = 2 M elements of 4 bytes
    (1, True, "DeepSpeed's reduce_bucket_size: 2 M elements in float32, at every backward"),
    # ZeRO-2 buckets in the weights' dtype: 4,000,000 bytes = 2 M elements of 2 bytes
    (2, False, "DeepSpeed's reduce_bucket_size: 2 M elements in bfloat16, at every backward")])
def test_reduction_bucket_note_counts_elements_in_the_buckets_dtype(zero: int, offload: bool, note: str) -> None:
    """Catches the bucket's bytes divided by the wrong element size (ZeRO-1's fp32 vs ZeRO-2's weight dtype)."""
    from r3_rl.plan.report import Process, add_learner

    recipe = _learner_recipe()
    zopt = {"reduce_bucket_size": 2_000_000, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    recipe.learner.backend, recipe.policy.dtype = "deepspeed", "bfloat16"
    recipe.learner.deepspeed = SimpleNamespace(zero_stage=zero, config={"zero_optimization": zopt})
    p = add_learner(Process("trainer process", 1.0), recipe, _shape())
    assert p.resident["reduction bucket"] == (8_000_000 if zero == 1 else 4_000_000)
    assert p.notes["reduction bucket"] == note


def _candidate_plan(checkpointing: bool = False, workers: int = 3, gpus_per_worker: float = 0.5):
    learner = SimpleNamespace(gradient_checkpointing=checkpointing, micro_batch_size=1, ranks=2, backend="deepspeed",
                              deepspeed=SimpleNamespace(zero_stage=2), gpus_per_rank=1.0, lora=None)
    recipe = SimpleNamespace(learner=learner, eval=SimpleNamespace(batch_size=8),
                             rollout=SimpleNamespace(groups_per_task=5, backend="ray", workers=workers,
                                                     gpus_per_worker=gpus_per_worker))
    return SimpleNamespace(recipe=recipe, gpus=8)


def test_advice_candidates_round_shared_worker_gpus_up_and_skip_checkpointing_already_on() -> None:
    """Catches 3 workers x 0.5 GPU counted as 1 GPU (floor, not ceil), and checkpointing re-advised when on."""
    from r3_rl.plan.render import _candidates

    # 8 GPUs - ceil(1.5) = 6 free: learner ranks 3..6 at one GPU each
    assert _candidates(_candidate_plan()) == [
        ("learner.gradient_checkpointing", [True]), ("eval.batch_size", [4, 2, 1]),
        ("rollout.groups_per_task", [2, 1]), ("learner.ranks", [3, 4, 5, 6]), ("rollout.gpus_per_worker", [1.0]),
        ("learner.lora", [{"r": 16}])]
    assert [k for k, _ in _candidates(_candidate_plan(checkpointing=True))] == [
        "eval.batch_size", "rollout.groups_per_task", "learner.ranks", "rollout.gpus_per_worker", "learner.lora"]


def test_a_gzipped_recipe_is_capped_at_its_decompressed_size(tmp_path: Path) -> None:
    """Catches the 1 MiB recipe cap checked on the bytes on disk: a 4 KB "recipe.yaml.gz" decompressing past it was
    read and parsed whole until session 47 (a gzip bomb reaches ~1000x)."""
    import gzip

    from r3_rl.textfiles import MAX_RECIPE_BYTES, read_recipe_yaml

    p = tmp_path / "r.yaml.gz"
    p.write_bytes(gzip.compress(b"name: x\n" + b"#" * (4 * MAX_RECIPE_BYTES) + b"\n"))
    assert p.stat().st_size < MAX_RECIPE_BYTES
    with pytest.raises(UserError) as e:
        read_recipe_yaml(p)
    assert str(e.value) == f"{p}: recipe is over the limit of 1048576 bytes once decompressed"
    p.write_bytes(gzip.compress(b"name: x\n#" + b"#" * (MAX_RECIPE_BYTES - 10) + b"\n"))  # exactly the cap
    assert read_recipe_yaml(p) == {"name": "x"}


def test_the_recipe_cap_is_one_mebibyte_to_the_byte(tmp_path: Path) -> None:
    """Catches a wrong default cap (e.g. 2 MiB): 1,048,576 bytes are read, 1,048,577 refused."""
    from r3_rl.textfiles import read_recipe_yaml

    p = tmp_path / "r.yaml"
    p.write_text("name: x\n#" + "#" * (1_048_576 - 10) + "\n")
    assert p.stat().st_size == 1_048_576 and read_recipe_yaml(p) == {"name": "x"}
    p.write_text("name: x\n#" + "#" * (1_048_577 - 10) + "\n")
    with pytest.raises(UserError, match="recipe is 1048577 bytes, over the limit of 1048576"):
        read_recipe_yaml(p)


def test_two_merge_keys_in_one_mapping_are_not_duplicate_keys() -> None:
    """Catches the duplicate-key check applied to ``<<`` merge keys (two merges refused as a duplicate)."""
    from r3_rl.textfiles import yaml_load_unique

    text = "a: &a {x: 1}\nb: &b {y: 2}\nc:\n  <<: *a\n  <<: *b\n  z: 3\n"
    assert yaml_load_unique(text)["c"] == {"x": 1, "y": 2, "z": 3}


def test_jsonl_refuses_a_line_that_is_a_list(tmp_path: Path) -> None:
    """Catches a JSON array accepted as a record (records are objects)."""
    from r3_rl.jsonl import read_jsonl_objects

    p = tmp_path / "l.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(UserError) as e:
        list(read_jsonl_objects(p))
    assert str(e.value) == f"{p}:2: expected a JSON object, got list"
