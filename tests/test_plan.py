"""``r3-rl plan``: shapes without downloads, DeepSpeed's own model-state accounting, computed advice, the CLI,
and the memory model against measurement on CPU (Janus-shaped models; torch profiler memory events)."""
from __future__ import annotations

from pathlib import Path

import pytest

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.errors import UserError
from r3_rl.plan import memory
from r3_rl.plan.render import _with, advice
from r3_rl.plan.report import make_plan
from r3_rl.plan.shapes import model_shape

REPO = Path(__file__).resolve().parents[1]
GENEVAL = REPO / "recipes" / "grpo_geneval.yaml"


def test_builtin_janus_pro_shapes_match_the_published_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one = model_shape(load_recipe(GENEVAL))
    seven = model_shape(load_recipe(GENEVAL, ["policy.model=deepseek-community/Janus-Pro-7B"]))
    # bf16 checkpoints of 4.18 GB and 14.84 GB (2.09 B / 7.42 B, with SigLIP's 12.6 M attention-pool head that
    # transformers' Janus drops)
    assert abs(one.params + 12.6e6 - 2.09e9) < 0.01 * 2.09e9 and abs(seven.params + 12.6e6 - 7.42e9) < 0.01 * 7.42e9
    assert (one.hidden, one.layers, one.intermediate, one.image_tokens) == (2048, 24, 5632, 576)
    assert (seven.hidden, seven.layers, seven.heads, seven.image_vocab) == (4096, 30, 32, 16384)
    assert one.params_trained == one.params - one.params_vision - 71_883_403  # VQ-VAE and SigLIP are frozen


def test_shape_from_a_local_config_is_exact(tmp_path: Path) -> None:
    from r3_rl.plan.validate import TEMPLATES
    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import make_tiny_janus

    path = make_tiny_janus(tmp_path / "janus", hidden_size=64, num_layers=3)
    shape = model_shape(load_recipe(GENEVAL, [f"policy.model={path}"]))
    policy = JanusPolicy.from_pretrained(path, templates=TEMPLATES)
    params = list(policy.model.parameters())
    assert shape.params == sum(p.numel() for p in params) and shape.layers == 3
    assert shape.params_trained == sum(p.numel() for p in params if p.requires_grad)
    assert shape.largest_weight == max(p.numel() for p in params)


@pytest.mark.parametrize("targets", ["all-linear", "q_proj", ["q_proj", "v_proj"], ["gate_proj", "down_proj"]])
def test_lora_parameters_equal_what_peft_trains(tmp_path: Path, targets) -> None:
    """Peer: peft's adapters on the same tiny Janus, through the learner's own target matching.  ``all-linear``
    counted 0 here (the plan read a string as a regular expression, the learner as a module name)."""
    from r3_rl.config import LoraCfg
    from r3_rl.learner.lora import apply_lora
    from r3_rl.plan.validate import TEMPLATES
    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import make_tiny_janus

    path = make_tiny_janus(tmp_path / "janus", hidden_size=64, num_layers=2)
    shape = model_shape(load_recipe(GENEVAL, [f"policy.model={path}"]))
    policy = JanusPolicy.from_pretrained(path, templates=TEMPLATES)
    apply_lora(policy, LoraCfg(r=4, target_modules=targets))
    trained = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    assert shape.lora_params(4, targets) == trained > 0


def test_unknown_model_is_a_one_line_error_and_nothing_is_downloaded(monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(UserError, match="no config.json for 'someone/NotAModel'.*deepseek-community/Janus-Pro-1B"):
        model_shape(load_recipe(GENEVAL, ["policy.model=someone/NotAModel"]))
    assert main(["plan", str(GENEVAL), "--set", "policy.model=someone/NotAModel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r3-rl: error:")
    with pytest.raises(SystemExit) as exit_info:  # a bad flag is refused by the parser, before the recipe is read
        main(["plan", str(GENEVAL), "--gpus", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["r3-rl plan: error: argument --gpus: must be an integer from 1 to 4096, got '0' "
                   "('r3-rl plan --help' lists the options)"]


@pytest.mark.parametrize("params, ranks", [(1_700_000_000, 4), (7_000_000_000, 8), (123_456_789, 3)])
def test_model_states_equal_deepspeeds_own_estimators(params: int, ranks: int) -> None:
    """ZeRO-2/3 model states of a bf16 run (everything trains) = DeepSpeed's estimate_zero*_model_states_mem_needs."""
    from dataclasses import replace

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = replace(model_shape(load_recipe(GENEVAL)), params=params, largest_layer=params // 20)
    z2 = memory.model_states(shape, weight_bytes=2, trained=params, zero_stage=2, ranks=ranks)
    z3 = memory.model_states(shape, weight_bytes=2, trained=params, zero_stage=3, ranks=ranks)
    _, ds2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=ranks, cpu_offload=False)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(params, params // 20, num_gpus_per_node=ranks,
                                                      cpu_offload=False)
    assert sum(z2.values()) == pytest.approx(ds2, abs=2) and sum(z3.values()) == pytest.approx(ds3, abs=2)


def test_shipped_recipes_fit_8_gpus_of_80gb_and_print_every_component(capsys: pytest.CaptureFixture) -> None:
    for recipe in ("grpo_geneval.yaml", "grpo_geneval_7b.yaml"):
        assert main(["plan", str(REPO / "recipes" / recipe), "--gpus", "8", "--gpu-memory", "80"]) == 0, recipe
        out = capsys.readouterr().out
        for part in ("weights", "gradients", "master weights", "optimizer (Adam)", "reference", "activations",
                     "KV cache", "logits", "learner rank", "rollout worker", "trainer process", "verdict: fits"):
            assert part in out, (recipe, part)


def test_advice_is_computed_and_applying_it_fits() -> None:
    recipe = load_recipe(GENEVAL, ["learner.backend=torch", "learner.ranks=1", "rollout.backend=local",
                                   "learner.micro_batch_size=16", "learner.gradient_checkpointing=false"])
    plan = make_plan(recipe, 8, 80)
    assert not plan.fits
    lines = advice(plan)
    assert lines
    text = lines[0].split("together: ")[-1].split("  -> ")[0]
    changes = {}
    for item in text.split(", "):
        key, _, value = item.partition(": ")
        changes[key] = {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)
    assert make_plan(_with(recipe, changes), 8, 80).fits, lines
    on = make_plan(_with(recipe, {"learner.gradient_checkpointing": True}), 8, 80)
    act = {p.name: p.phases.get("learner micro-batch", {}).get("activations", 0) for p in plan.processes}
    act_on = {p.name: p.phases.get("learner micro-batch", {}).get("activations", 0) for p in on.processes}
    assert act_on["trainer process"] < act["trainer process"] / 5  # checkpointing keeps one input per layer


def test_layout_errors_are_reported() -> None:
    plan = make_plan(load_recipe(GENEVAL), 2, 80)
    assert not plan.fits and any("need" in e and "--gpus is 2" in e for e in plan.errors)


def _check(c) -> None:
    assert abs(c.error) <= 0.25, (c.what, c.width, c.layers, c.checkpointing, c.predicted, c.measured)
    assert abs(c.growth_error) <= 0.25, (c.what, c.predicted_growth, c.measured_growth, c.parts)


def test_plan_matches_measured_peak_fast_representative() -> None:
    """Width 1024, 2 layers: a learner step (no checkpointing) and image sampling, within 25% of the torch
    profiler's measured peak -- in total, and above the weights and optimiser state."""
    from r3_rl.plan.validate import run

    for c in run(1024, 2, False, grid=4, micro_batch=1, sample_batch=2):
        _check(c)


@pytest.mark.slow
@pytest.mark.parametrize("width, layers, ckpt", [(1024, 2, False), (1024, 4, True), (2048, 2, True), (2048, 2, False),
                                                 (2048, 4, None)])
def test_plan_matches_measured_peak(width: int, layers: int, ckpt: bool | None) -> None:
    """Widths 1024 and 2048, 2 and 4 layers, checkpointing on and off (2048 x 4: sampling only, its float32
    learner states would not fit this machine's share), Janus-Pro's image grid of 8 x 8."""
    from r3_rl.plan.validate import run

    checks = run(width, layers, ckpt, sampling=ckpt is None or width == 1024)
    assert checks
    for c in checks:
        _check(c)


def test_eval_batch_size_bounds_the_prompts_sampled_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the plan sizes as the trainer's eval phase: ``eval.batch_size`` prompts per sampling call."""
    from conftest import tiny_overrides

    from r3_rl.policy.tiny import TinyUnifiedPolicy
    from r3_rl.trainer import Trainer

    sizes: list[int] = []
    real = TinyUnifiedPolicy.reason
    monkeypatch.setattr(TinyUnifiedPolicy, "reason", lambda self, prompts, *a: sizes.append(len(prompts))
                        or real(self, prompts, *a))
    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + ["eval.batch_size=3"])
    Trainer(recipe, tmp_path / "run").run_eval("before")
    assert sizes and max(sizes) == 3 and sum(sizes) == recipe.data.eval_size, sizes


def test_plan_counts_the_critique_rehearsal_beside_the_micro_batch() -> None:
    """``learner.critic_replay`` adds its cross-entropy to a micro-batch's loss, so its graph is alive with the
    micro-batch's: the plan's learner phase must grow by at least what its forward and backward measure (torch
    profiler, the demo's 128-wide policy), and not by more than the plan's generous prompt allowance explains
    (96 tokens a prompt against the Blocks prompts' dozen: at most 5x)."""
    import torch

    from r3_rl.plan.measure import measured_peak
    from r3_rl.policy.critique_replay import CritiqueReplay
    from r3_rl.policy.registry import build_policy

    def learner_phase(recipe) -> float:
        trainer = next(p for p in make_plan(recipe, 8, 80).processes if p.name.startswith("trainer"))
        return sum(trainer.phases["learner micro-batch"].values())

    tiny = REPO / "recipes" / "tiny_blocks.yaml"
    off = learner_phase(load_recipe(tiny))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the profiler sees the calling thread's allocations only
    try:
        for questions in (0, 2):
            recipe = load_recipe(tiny, ["learner.critic_replay.coef=1", "learner.critic_replay.examples=128",
                                        f"learner.critic_replay.questions={questions}"])
            replay = CritiqueReplay(build_policy(recipe), recipe)
            examples = replay.examples(0)
            _, peak = measured_peak(lambda: replay.loss(examples).backward())
            growth = learner_phase(recipe) - off
            assert peak <= growth <= 5 * peak, (questions, peak, growth)
    finally:
        torch.set_num_threads(threads)


def test_ppo_counts_the_critics_forward_and_a_separate_critic_as_a_copy_of_the_policy() -> None:
    """PPO's loss runs the critic over each item's context with gradient beside the policy's forward: the
    learner phase grows by that forward (at least what it measures on the demo's policy), and a separate
    critic is a copy of the policy -- under LoRA its weights plus its adapters' states (7B: 15.1 GB, where a
    fully trained critic's 46.5 GB had been counted)."""
    import sys

    import torch

    from r3_rl.learner.algorithm import LearnerModels
    from r3_rl.learner.registry import load_algorithm
    from r3_rl.plan.measure import measured_peak
    from r3_rl.policy.registry import build_policy

    sys.path.insert(0, str(REPO / "tests"))
    from learner_helpers import sample_items

    def trainer_phase(recipe):
        trainer = next(p for p in make_plan(recipe, 8, 80).processes if p.name.startswith("trainer"))
        return trainer.phases["learner micro-batch"]["activations"], trainer.notes["activations"]

    tiny, group = REPO / "recipes" / "tiny_blocks.yaml", ["learner.refine_baseline=group"]
    grpo, _ = trainer_phase(load_recipe(tiny, group))
    recipe = load_recipe(tiny, group + ["learner.algorithm=ppo"])
    ppo, note = trainer_phase(recipe)
    mbs = recipe.learner.micro_batch_size
    assert f"+ the critic over each context ({mbs * 140} tokens)" in note  # 140: the refine stage's context
    policy = build_policy(recipe)
    algorithm = load_algorithm(recipe)
    models = LearnerModels(policy, None, algorithm.modules(policy))
    items = (sample_items(policy) * mbs)[:mbs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the profiler sees the calling thread's allocations only
    try:
        _, peak = measured_peak(lambda: algorithm.values(models, items).sum().backward())
    finally:
        torch.set_num_threads(threads)
    assert ppo - grpo >= peak > 0

    sets = ["learner.refine_baseline=group", "learner.algorithm=ppo", "learner.ppo.critic=separate"]
    rank = make_plan(load_recipe(REPO / "recipes" / "grpo_geneval_7b.yaml", sets), 8, 80).processes[0]
    policy_states = sum(rank.resident[k] for k in ("weights", "gradients", "master weights", "optimizer (Adam)"))
    assert rank.resident["critic (separate)"] == pytest.approx(policy_states, rel=1e-12)
    assert 15.0e9 < rank.resident["critic (separate)"] < 15.2e9  # 14.82 GB of bf16 weights + 0.28 of adapter states
    assert "(its LoRA adapters)" in rank.notes["critic (separate)"]


def test_the_kl_references_forward_covers_the_micro_batch_not_the_rehearsal(monkeypatch) -> None:
    """The frozen reference scores the micro-batch's tokens for the KL; the critic_replay rehearsal has no KL term,
    so the reference never sees it.  Its forward was sized over both (round 14D's note): every forward the plan
    sizes is the same with the rehearsal on as off."""
    import r3_rl.plan.report as report

    calls: list[tuple[int, int]] = []
    real = report.memory.forward_temporaries
    monkeypatch.setattr(report.memory, "forward_temporaries",
                        lambda shape, tokens, b: calls.append((tokens, b)) or real(shape, tokens, b))
    tiny = REPO / "recipes" / "tiny_blocks.yaml"
    make_plan(load_recipe(tiny), 8, 80)  # the demo recipe keeps a KL reference (kl_coef_text 0.02)
    off, calls[:] = list(calls), []
    make_plan(load_recipe(tiny, ["learner.critic_replay.coef=1", "learner.critic_replay.examples=128"]), 8, 80)
    assert off and calls == off
