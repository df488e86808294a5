"""``recipes/grpo_geneval_bagel.yaml``: the reference's settings, validated as shipped, and run end to end on a tiny
random BAGEL saved in the published layout (the GenEval detector swapped for a user's brightness reward file).

The run as shipped -- Ray rollout workers, DeepSpeed ZeRO-2 learner ranks as Ray actors with CPU-offloaded fp32
state -- takes minutes on 2 cores (DeepSpeed, Ray): it is marked slow; the default suite runs the same recipe with
the in-process rollout and torch learner, and checks that the shipped file validates (its learner layout included:
ZeRO-3 with several ranks once shipped here and failed only after the policy was built).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.errors import UserError
from r3_rl.policy.registry import build_policy
from r3_rl.policy.bagel import make_tiny_bagel
from r3_rl.validate import validate_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_geneval_bagel.yaml"
TINY_OPTIONS = ("{image_size: 32, gen_steps: 6, edit_steps: 6, ode_steps: 4, vit_size: [32, 16, 4], "
                "vae_size: [32, 16, 16]}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_bagel(tmp_path_factory.mktemp("bagel") / "tiny", seed=0)


# a user's reward file (not docs/examples/brightness_reward.py: importing that registers its name in this process,
# which test_plugins registers again from a copy)
BRIGHTNESS = '''
def brightness(samples):
    """Mean brightness of the image: differs between siblings, so groups carry signal."""
    return [float(s.image.mean()) / 255.0 for s in samples]
'''


def tiny_sets(tiny: str, tmp_path: Path) -> list[str]:
    (tmp_path / "my_reward.py").write_text(BRIGHTNESS)
    reward = f"{tmp_path / 'my_reward.py'}:brightness"
    return [f"policy.model={tiny}", "policy.device=cpu", "policy.dtype=float32", f"policy.options={TINY_OPTIONS}",
            f"out_dir={tmp_path}", "steps=3", "save_every=1", "data.eval_size=2", "tree.group_size=2",
            "tree.prompts_per_step=1", "tree.refine_groups_per_step=1", "rollout.reason.max_new_tokens=6",
            "rollout.reflect.max_new_tokens=6", "eval.rounds=1", "learner.micro_batch_size=2", "log.console=false",
            "log.trajectories_every=1", "learner.deepspeed.dtype=fp32", "eval.batch_size=2", f"rewards.task=[{{name: '{reward}'}}]",
            f"rewards.eval=[{{name: '{reward}'}}]"]


def test_shipped_recipe_has_the_reference_settings_and_validates(tiny_dir: str) -> None:
    raw = yaml.safe_load(RECIPE.read_text())
    opts, learner, rollout = raw["policy"]["options"], raw["learner"], raw["rollout"]
    assert raw["policy"]["kind"] == "bagel" and raw["policy"]["dtype"] == "bfloat16"
    assert (opts["gen_steps"], opts["edit_steps"], opts["ode_steps"], opts["edit_sde_max_index"]) == (16, 21, 50, 2)
    assert (opts["gen_eta"], opts["edit_eta"], opts["image_cfg"], opts["cfg_interval"]) == (0.7, 1.0, 1.5, [0.4, 1.0])
    assert rollout["generate"]["cfg_scale"] == rollout["refine"]["cfg_scale"] == 4.0
    assert rollout["reason"] == {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 196}
    assert rollout["reflect"]["max_new_tokens"] == 384 and rollout["backend"] == "ray"
    assert (learner["backend"], learner["deepspeed"]["dtype"], learner["deepspeed"]["zero_stage"]) == ("deepspeed",
                                                                                                       "bf16", 2)
    assert learner["ranks"] == 4 and learner["deepspeed"]["config"]["zero_optimization"]["offload_optimizer"] == {
        "device": "cpu", "pin_memory": True}
    assert (learner["lr"], learner["loss_weight_text"], learner["loss_weight_image"]) == (5e-6, 1.0, 2.0)
    # the reference's KL 1e-3 is off: its frozen copy does not fit beside DeepSpeed's fp32 gradient partition on 80 GB
    # (tests/test_plan_bagel.py); the KL kind stays the reference's for a run that restores it
    assert (learner["kl_coef_text"], learner["kl_coef_image"], learner["flow"]["kl_kind"]) == (0.0, 0.0, "r3")
    assert raw["tree"]["group_size"] == 16 and opts["train_vit"] is False and learner["gradient_checkpointing"]
    assert opts["expert_isolation"] is True
    # as shipped it validates up to the weights, which are not on this machine
    recipe = load_recipe(RECIPE)
    with pytest.raises(UserError, match="policy.model: cannot load '/models/BAGEL-7B-MoT': not a local directory"):
        validate_recipe(recipe, RECIPE)
    # pointed at a BAGEL checkpoint directory (a tiny one, on the CPU) everything passes
    validate_recipe(load_recipe(RECIPE, [f"policy.model={tiny_dir}", "policy.device=cpu", "rollout.gpus_per_worker=0",
                                         "learner.gpus_per_rank=0"]), RECIPE)


@pytest.mark.parametrize("change, match", [
    ("policy.options={image_sise: 32}", "policy.options: unknown option 'image_sise' \\(did you mean 'image_size'"),
    ("policy.options={image_size: 40}", "policy.options.image_size: 40 is not a multiple of 16"),
    ("policy.options={cfg_interval: [0.5, 0.4]}", "policy.options.cfg_interval: expected \\[lo, hi\\]"),
    ("policy.options={edit_renorm: text_channe}", "policy.options.edit_renorm: 'text_channe' is not one of"),
    ("policy.options={expert_isolation: maybe}", "policy.options.expert_isolation: expected true or false, got 'ma"),
    ("policy.options={gen_steps: 3}", "policy.options.gen_eta 0.7 with gen_steps 3: SDE step 0 \\(t=1, delta=0.25\\) "
     "has eta=3.13, so its mean keeps -0.225 x the latent .*use an eta scale below 0.632 or at least 4 grid points"),
    ("policy.options={edit_steps: 4, edit_sde_max_index: 1}", "policy.options.edit_eta 1.0 with edit_steps 4: SDE step 0"),
    ("templates.reason=<|im_start|> {prompt}", "templates.reason': remove <\\|im_start\\|>"),
    ("templates.refine={instruction} {image}", "placeholder {image} is not filled at this stage"),
    ("learner.algorithm=ppo", "key 'learner.algorithm': ppo needs a critic .* policy.kind 'bagel' does not expose"),
    ("policy.options={image_cfg: 0.5}", "policy.options.image_cfg: expected a number >= 1 \\(1: no image guidance"),
    ("rollout.refine.cfg_scale=1.0", "key 'policy.options.image_cfg': 1.5 has no effect while "
     "rollout.refine.cfg_scale is 1 \\(BAGEL guides an edit by the image only on top of its text guidance\\)"),
])
def test_bad_bagel_settings_are_one_line_errors_before_any_work(tiny_dir: str, change: str, match: str) -> None:
    recipe = load_recipe(RECIPE, [f"policy.model={tiny_dir}", "policy.device=cpu", "rollout.gpus_per_worker=0",
                                  "learner.gpus_per_rank=0", change])
    with pytest.raises(UserError, match=match) as err:
        validate_recipe(recipe, RECIPE)
    assert "\n" not in str(err.value)


def test_image_cfg_left_at_its_default_is_no_error_without_text_cfg(tiny_dir: str) -> None:
    """Only an image_cfg the recipe sets is refused when it cannot act: the default 1.5 beside
    ``rollout.refine.cfg_scale: 1`` (no guidance at all, e.g. for speed) validates."""
    recipe = load_recipe(RECIPE, [f"policy.model={tiny_dir}", "policy.device=cpu", "rollout.gpus_per_worker=0",
                                  "learner.gpus_per_rank=0", "rollout.refine.cfg_scale=1.0",
                                  "policy.options={image_size: 32}"])
    validate_recipe(recipe, RECIPE)


def test_a_checkpoint_directory_missing_a_file_is_named(tiny_dir: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "ae.safetensors").unlink()
    recipe = load_recipe(RECIPE, [f"policy.model={broken}", "policy.device=cpu", "rollout.gpus_per_worker=0",
                                  "learner.gpus_per_rank=0"])
    with pytest.raises(UserError, match="ae.safetensors is missing"):
        validate_recipe(recipe, RECIPE)
    recipe = load_recipe(RECIPE, [f"policy.model={tiny_dir}", "policy.device=cpu", "policy.dtype=float32",
                                  "policy.options={image_size: 256}"])
    with pytest.raises(UserError, match="image_size: 256 px exceeds what .* can generate \\(128 px"):
        build_policy(recipe)


def _losses(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if "batch/items" in r}
    assert sorted(logged) == [0, 1, 2] and all(r["rollout/failed_rewards"] == 0 for r in logged.values())
    # tree.schedule: alternate (the reference's): plans and first images on even steps, critiques and edits on odd
    assert all("groups/generate/total" in logged[s] and "groups/reflect/total" not in logged[s] for s in (0, 2))
    assert "groups/reflect/total" in logged[1] and "groups/generate/total" not in logged[1]
    steps = [r for r in logged.values() if "learner/loss" in r]
    assert {0, 2} <= {r["step"] for r in steps} and all(math.isfinite(r["learner/loss"]) for r in steps)
    assert all(r["batch/items"] > 0 for r in steps)
    return steps


@pytest.mark.parametrize("variant", ["learner.old_logp=sampler", "learner.old_logp=recompute",
                                     "learner.flow.detach_uncond=true", "learner.lora={r: 4}"])
def test_recipe_trains_two_steps_on_a_tiny_bagel_in_process(tiny_dir: str, tmp_path: Path, variant: str) -> None:
    run = tmp_path / "run"
    sets = tiny_sets(tiny_dir, tmp_path) + ["rollout.backend=local", "learner.backend=torch", "learner.ranks=1",
                                            variant]
    assert main(["train", str(RECIPE), "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    steps = _losses(run)
    assert steps[0]["learner/flow_ratio_min"] == pytest.approx(1.0, abs=1e-4)
    dump = [json.loads(line) for line in (run / "trajectories" / "step_000000.jsonl").read_text().splitlines()]
    images = [n for t in dump for n in t["nodes"] if n["stage"] == "generate"]
    assert images and all("brightness" in n["rewards"] for n in images)
    assert (run / "final" / "ema.safetensors").is_file() and (run / "final" / "ae.safetensors").is_file()
    report = json.loads((run / "eval" / "after.json").read_text())
    assert len(report["accuracy"]) == 2  # first image + one refine round


@pytest.mark.slow
def test_recipe_as_shipped_trains_with_ray_workers_and_two_deepspeed_zero2_learner_ranks(tiny_dir: str,
                                                                                         tmp_path: Path,
                                                                                         ray_session) -> None:
    """Ray rollout and DeepSpeed learner ranks as Ray actors at the recipe's own ZeRO stage, fp32 state offloaded
    to the CPU, as shipped; on CPU: one worker, 2 ranks (the shipped layout has 4: more than one is what matters),
    fp32, as the other shipped recipes' tests do."""
    run = tmp_path / "run"
    sets = tiny_sets(tiny_dir, tmp_path) + [
        "rollout.workers=1", "rollout.gpus_per_worker=0", "rollout.cpus_per_worker=1", "learner.ranks=2",
        "learner.gpus_per_rank=0", "learner.cpus_per_rank=1"]
    assert main(["train", str(RECIPE), "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    _losses(run)
    assert "rollout: 1 Ray workers ready" in (run / "events.log").read_text()
    # each of the 2 ZeRO ranks wrote its own optimiser partition: the ranks ran as Ray actors, not in-process
    shards = sorted(p.name for p in (run / "checkpoints" / "step_000002").rglob("*zero_pp_rank_*optim_states.pt"))
    assert [n.split("zero_pp_rank_")[1][0] for n in shards] == ["0", "1"], shards


def test_a_full_fine_tune_on_the_torch_backend_resumes(tiny_dir: str, tmp_path: Path) -> None:
    """The BAGEL recipe on the torch backend (no LoRA: the default) resumes from its checkpoint's export; the
    export's VAE file beside the weight set stopped every such resume in one line (exit 2)."""
    run = tmp_path / "run"
    sets = tiny_sets(tiny_dir, tmp_path) + ["rollout.backend=local", "learner.backend=torch", "learner.ranks=1",
                                            "steps=1"]
    args = ["train", str(RECIPE), "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    resume = ["--resume", str(run / "checkpoints" / "step_000001")]
    assert main(args[:2] + resume + args[4:] + ["--set", "steps=2"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows if "batch/items" in r}) == [0, 1]  # step 1 after the resume
