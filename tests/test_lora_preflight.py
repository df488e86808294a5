"""``learner.lora`` checked before any work, on the policy's module built without its weights (``Policy.skeleton``).

A misspelt ``target_modules`` used to be found when the learner applied the adapters -- after the warm start
(tiny) or the model load (Janus, BAGEL: minutes at 7B).  The skeleton is compared with its peer, the module
the real build or load gives: same module names and parameter shapes; Janus' and BAGEL's on the meta device.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.errors import UserError
from r3_rl.policy.bagel import make_tiny_bagel
from r3_rl.policy.janus_tiny import make_tiny_janus
from r3_rl.policy.registry import build_policy, policy_class
from r3_rl.validate import check_lora_targets, validate_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BAGEL_OPTIONS = ("{image_size: 32, gen_steps: 6, edit_steps: 6, ode_steps: 4, vit_size: [32, 16, 4], "
                 "vae_size: [32, 16, 16]}")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora_preflight")
    return {"janus": make_tiny_janus(root / "janus"), "bagel": make_tiny_bagel(root / "bagel", seed=0)}


def recipe_for(kind: str, models: dict[str, str], *sets: str):
    if kind == "janus":
        return load_recipe(RECIPES / "grpo_geneval.yaml", [f"policy.model={models['janus']}", "policy.device=cpu",
                                                           "policy.dtype=float32", *sets])
    if kind == "bagel":
        return load_recipe(RECIPES / "grpo_geneval_bagel.yaml", [f"policy.model={models['bagel']}", "policy.device=cpu",
                                                                 "policy.dtype=float32",
                                                                 f"policy.options={BAGEL_OPTIONS}", *sets])
    extra = ["policy.options={latent_dim: 4}"] if kind == "tiny_flow" else []
    return load_recipe(RECIPES / "tiny_blocks.yaml", [f"policy.kind={kind}", *extra, *sets])


@pytest.mark.parametrize("kind", ["janus", "bagel"])  # the tiny policies' skeleton is their build itself
def test_the_skeleton_is_the_built_module_without_memory(kind: str, models: dict[str, str]) -> None:
    recipe = recipe_for(kind, models)
    skeleton = policy_class(kind).skeleton(recipe)
    built = build_policy(recipe)
    shapes = {n: tuple(p.shape) for n, p in skeleton.model.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in built.model.named_parameters()}
    assert [n for n, _ in skeleton.model.named_modules()] == [n for n, _ in built.model.named_modules()]
    assert all(p.is_meta for p in skeleton.model.parameters())
    assert skeleton.lora_scope() == built.lora_scope()


@pytest.mark.parametrize("kind, target, where", [
    ("tiny", "qproj", "language model"),
    ("tiny_flow", "qproj", "language model"),
    ("janus", "fc1", "language model"),  # the aligner's: outside the language model
    ("bagel", "q_proj_gen", "language model"),
])
def test_a_misspelt_target_is_refused_before_the_load(kind: str, target: str, where: str, models: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cls = policy_class(kind)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the LoRA targets were checked")

    monkeypatch.setattr(cls, "from_pretrained", classmethod(no_load))
    monkeypatch.setattr(cls, "warm_start", no_load)
    recipe = recipe_for(kind, models, f"learner.lora={{target_modules: [q_proj, {target}]}}")
    with pytest.raises(UserError, match=rf"^SRC: learner.lora.target_modules: '{target}' is not a module of the "
                                        rf"policy's {where} \(e.g. .*q_proj"):
        check_lora_targets(recipe, "SRC")
    check_lora_targets(recipe_for(kind, models, "learner.lora={target_modules: [q_proj, v_proj]}"), "SRC")
    check_lora_targets(recipe_for(kind, models, "learner.lora={target_modules: all-linear}"), "SRC")


def test_vision_targets_on_a_policy_without_a_vision_tower_are_refused_in_validation() -> None:
    recipe = load_recipe(RECIPES / "tiny_blocks.yaml", ["learner.lora={train_vision: true}"])
    with pytest.raises(UserError, match="learner.lora.train_vision: a TinyUnifiedPolicy has no separate vision tower"):
        validate_recipe(recipe, "SRC")


def test_the_shipped_lora_recipe_validates_against_its_module(models: dict[str, str]) -> None:
    recipe = load_recipe(RECIPES / "grpo_geneval_7b.yaml", [f"policy.model={models['janus']}", "policy.device=cpu",
                                                            "rollout.gpus_per_worker=0", "learner.gpus_per_rank=0"])
    assert recipe.learner.lora is not None
    check_lora_targets(recipe, "SRC")


def test_the_cli_exits_2_in_one_line_before_the_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code = main(["train", str(RECIPES / "tiny_blocks.yaml"), "--run-dir", str(run),
                 "--set", "learner.lora={target_modules: [q_porj]}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not run.exists()
    assert len(err.splitlines()) == 1 and "learner.lora.target_modules: 'q_porj'" in err and "tiny_blocks.yaml" in err


def test_a_plug_in_without_a_skeleton_is_checked_when_the_adapters_go_in(tmp_path: Path) -> None:
    """``Policy.skeleton``'s default is ``None``: nothing is built for the check, the learner's own check stays.
    (A file of its own: importing docs/examples' policy here would register its name before test_plugins does.)"""
    (tmp_path / "bare_policy.py").write_text(
        "from r3_rl.policy.base import Policy\n\n\nclass BarePolicy(Policy):\n"
        "    @classmethod\n    def from_recipe(cls, recipe):\n        raise AssertionError('not built for a check')\n")
    recipe = load_recipe(RECIPES / "tiny_blocks.yaml", [f"policy.kind={tmp_path / 'bare_policy.py'}:BarePolicy",
                                                       "learner.lora={target_modules: [nothing_by_that_name]}"])
    assert policy_class(recipe.policy.kind).skeleton(recipe) is None
    check_lora_targets(recipe, "SRC")
