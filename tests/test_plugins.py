"""Policies and algorithms by name, like rewards; a continuous-action policy and a GRPO variant from files.

The plug-ins are the documentation's examples (``docs/examples/``), copied to a temporary folder: a policy whose
image action is a Gaussian latent (no tokens), a GRPO variant with clipped advantages, a brightness reward.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from learner_helpers import learner_cfg
from safetensors.torch import load_file

from r3_rl.cli import main
from r3_rl.config import Recipe, load_recipe
from r3_rl.errors import UserError
from r3_rl.learner.algorithm import GRPO
from r3_rl.learner.batch import TrainItem
from r3_rl.learner.ppo_learner import PPO
from r3_rl.learner.registry import ALGORITHMS, algorithm_class, load_algorithm, register_algorithm
from r3_rl.learner.torch_learner import TorchLearner
from r3_rl.policy.registry import POLICIES, build_policy, policy_class, register_policy
from r3_rl.policy.tiny import TinyUnifiedPolicy
from r3_rl.trajectory import PromptItem, SamplingParams, read_trees

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_blocks.yaml"
EXAMPLES = ("gaussian_policy.py", "clipped_grpo.py", "brightness_reward.py")


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs' example plug-ins, copied to one temp folder for the whole module (a file registers its names
    once per process; a second copy elsewhere registering them again would be refused, as it should)."""
    out = tmp_path_factory.mktemp("plugins")
    for name in EXAMPLES:
        shutil.copy(REPO / "docs" / "examples" / name, out / name)
    return out


def toy_sets(plugin_dir: Path, clip: float = 0.005) -> list[str]:
    reward = f"[{{name: '{plugin_dir / 'brightness_reward.py'}:brightness'}}]"
    return [f"policy.kind={plugin_dir / 'gaussian_policy.py'}:GaussianImagePolicy",
            f"learner.algorithm={plugin_dir / 'clipped_grpo.py'}:ClippedGRPO", f"learner.options={{clip: {clip}}}",
            "policy.options={init_std: 1.0}", f"rewards.task={reward}", f"rewards.eval={reward}", "tree.group_size=4",
            "learner.lr=0.05"]


# ---------------------------------------------------------------------------------------------- registries
def test_builtins_resolve_lazily_by_name() -> None:
    assert {"tiny", "janus"} <= set(POLICIES.available()) and {"grpo", "ppo"} <= set(ALGORITHMS.available())
    assert policy_class("tiny") is TinyUnifiedPolicy
    assert algorithm_class("grpo") is GRPO and algorithm_class("ppo") is PPO
    assert isinstance(load_algorithm(Recipe(learner={"algorithm": "ppo"})), PPO)


def test_plugins_command_lists_every_kind(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for line in ("policy.kind", "learner.algorithm", "rewards[].name", "  tiny ", "  ppo ", "  blocks "):
        assert line in out, line


def test_file_dotted_decorated_and_entry_point_names(plugin_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cls = policy_class(f"{plugin_dir / 'gaussian_policy.py'}:GaussianImagePolicy")
    algo = algorithm_class(f"{plugin_dir / 'clipped_grpo.py'}:ClippedGRPO")
    assert cls.__name__ == "GaussianImagePolicy" and issubclass(algo, GRPO)
    # importing the files ran their decorators: the short names work from now on, in this process
    assert policy_class("gaussian_toy") is cls and algorithm_class("clipped_grpo") is algo
    # the same file imported as a module again is the same plug-in, not a name clash
    monkeypatch.syspath_prepend(str(plugin_dir))
    assert policy_class("gaussian_policy:GaussianImagePolicy").__qualname__ == "GaussianImagePolicy"
    # entry points of an installed package
    dist = tmp_path / "toy_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[r3_rl.policies]\nep_gauss = gaussian_policy:GaussianImagePolicy\n"
                                           "[r3_rl.algorithms]\nep_clip = clipped_grpo:ClippedGRPO\n"
                                           "broken = clipped_grpo:Missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ep_gauss" in POLICIES.available() and "ep_clip" in ALGORITHMS.available()
    assert policy_class("ep_gauss").__name__ == "GaussianImagePolicy"
    assert algorithm_class("ep_clip").__name__ == "ClippedGRPO"
    with pytest.raises(UserError, match="entry point clipped_grpo:Missing failed to load"):
        algorithm_class("broken")


@pytest.mark.parametrize("call,needle", [
    (lambda: policy_class("tinyy"), "unknown policy 'tinyy' (did you mean 'tiny'?); use a registered name ("),
    (lambda: algorithm_class("grp0"), "unknown algorithm 'grp0' (did you mean 'grpo'?); use a registered name ("),
    (lambda: policy_class("r3_rl.policy.registry:build_policy"), "expected a subclass of r3_rl.policy.base.Policy"),
    (lambda: algorithm_class("r3_rl.policy.tiny:TinyUnifiedPolicy"), "expected a subclass of r3_rl.learner"),
    (lambda: policy_class("no/such/file.py:X"), "file no/such/file.py does not exist"),
    (lambda: register_policy("tiny")(type("Other", (), {})), "policy name 'tiny' is already registered"),
    (lambda: register_algorithm("ppo")(type("Other", (), {})), "algorithm name 'ppo' is already registered"),
])
def test_bad_names_are_one_line_errors_listing_the_known_ones(call, needle: str) -> None:
    with pytest.raises(UserError) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)
    if "registered name (" in needle:  # the known names are listed
        listed = str(e.value).split("registered name (")[1].split(")")[0].split(", ")
        assert {"tiny", "janus"} <= set(listed) or {"grpo", "ppo"} <= set(listed)


def test_a_taken_plugin_name_is_never_silently_replaced(plugin_dir: Path) -> None:
    policy_class(f"{plugin_dir / 'gaussian_policy.py'}:GaussianImagePolicy")

    class Impostor:
        pass
    with pytest.raises(UserError, match="policy name 'gaussian_toy' is already registered"):
        register_policy("gaussian_toy")(Impostor)
    assert policy_class("gaussian_toy").__name__ == "GaussianImagePolicy"


@pytest.mark.parametrize("sets,needle", [
    (["policy.kind=tinyy"], "key 'policy.kind': Value error, unknown policy 'tinyy' (did you mean 'tiny'?)"),
    (["learner.algorithm=grpoo"], "unknown algorithm 'grpoo' (did you mean 'grpo'?)"),
    (["policy.kind=no_such_module_xyz:Policy"], "cannot import module 'no_such_module_xyz'"),
    (["learner.algorithm=r3_rl.learner.algorithm:Nope"], "r3_rl.learner.algorithm has no attribute 'Nope'"),
    (["learner.options={clip: 0.5}"], "algorithm 'grpo': unknown option 'clip'; the built-in algorithms take no"),
    (["policy.options={width: 3}"], "policy 'tiny': unknown option 'width'"),
])
def test_recipe_validation_refuses_bad_plugins_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               sets: list[str], needle: str) -> None:
    argv = ["train", str(RECIPE), "--set", f"out_dir={tmp_path / 'runs'}"]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "runs").exists()


def test_plan_resolves_plugins_by_name(plugin_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """``r3-rl plan`` checks policy.kind / learner.algorithm through the registries (one line, exit 2), and says
    why it cannot size a plug-in policy that builds its own model, instead of asking for a Janus config."""
    assert main(["plan", str(RECIPE), "--set", "policy.kind=tinyy"]) == 2
    assert main(["plan", str(RECIPE), "--set", "learner.options={clip: 0.5}"]) == 2
    toy = f"policy.kind={plugin_dir / 'gaussian_policy.py'}:GaussianImagePolicy"
    assert main(["plan", str(RECIPE), "--set", toy]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("r3-rl: error:") for line in err), err
    assert "unknown policy 'tinyy' (did you mean 'tiny'?)" in err[0]
    assert "algorithm 'grpo': unknown option 'clip'" in err[1]
    assert "builds its model itself" in err[2] and "GaussianImagePolicy" in err[2]
    assert main(["plan", str(RECIPE)]) == 0  # the built-in tiny policy is planned
    assert "verdict: fits" in capsys.readouterr().out


def test_doctor_sizes_a_plugin_policy_that_builds_its_own_model(plugin_dir: Path, tmp_path: Path) -> None:
    """No ``policy.model`` is needed by a plug-in that builds its model from the recipe: the doctor builds it
    through the registry (as for the tiny policy) instead of reporting missing weights."""
    from r3_rl.doctor import doctor

    found: list = []
    sets = [f"out_dir={tmp_path}", f"policy.kind={plugin_dir / 'gaussian_policy.py'}:GaussianImagePolicy"]
    assert doctor(RECIPE, sets, emit=found.append) == 0, [f.line() for f in found if f.status == "problem"]
    checks = {f.check: f for f in found}
    assert checks["weights"].status == "ok" and "GaussianImagePolicy (nothing to load)" in checks["weights"].line()
    assert checks["disk"].status == "ok"


def test_plugin_options_are_checked_against_their_signatures(plugin_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    argv = ["train", str(RECIPE), "--set", f"out_dir={tmp_path / 'runs'}"]
    for s in toy_sets(plugin_dir) + ["learner.options={clp: 0.5}", "policy.options={latent: 4, bukets: 2}"]:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown option 'bukets' (did you mean 'buckets'?); valid options: latent, buckets, init_std" in err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- a continuous policy
def _toy_items(policy, n_prompts: int = 3, group: int = 4) -> list[TrainItem]:
    prompts = [PromptItem(id=str(i), prompt=f"a photo of {i} red squares") for i in range(n_prompts)]
    sampled = policy.generate([p for p in prompts for _ in range(group)], [None] * n_prompts * group,
                              SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    bright = torch.tensor([float(s.image.mean()) / 255 for s in sampled]).reshape(n_prompts, group)
    adv = (bright - bright.mean(1, keepdim=True)).reshape(-1)
    return [TrainItem(s.segment, float(a), "generate", 0) for s, a in zip(sampled, adv)]


def test_continuous_actions_ratio_one_before_the_update_and_grpo_moves_the_weights(plugin_dir: Path) -> None:
    recipe = load_recipe(RECIPE, [f"policy.kind={plugin_dir / 'gaussian_policy.py'}:GaussianImagePolicy"])
    policy = build_policy(recipe)
    items = _toy_items(policy)
    seg = items[0].segment
    assert seg.token_ids == [] and seg.num_actions == 1 and len(seg.action["z"]) == 16
    # the learner's recomputation is the sampler's number, exactly
    with torch.no_grad():
        again = policy.segment_logprobs([it.segment for it in items])
    assert [float(x) for t in again for x in t] == [it.segment.logprobs[0] for it in items]
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    learner = TorchLearner(policy, policy.frozen_copy(), learner_cfg(lr=0.05, micro_batch_size=5))
    m = learner.step(copy.deepcopy(items))
    assert m["learner/ratio_min"] == m["learner/ratio_max"] == 1.0  # three micro-batches, one optimiser step
    assert m["learner/optimizer_steps"] == 1.0 and m["learner/kl_mean"] == 0.0
    assert not torch.equal(before["mu.weight"], policy.model.mu.weight)
    # the update raised the log-prob of the better-than-average latents, lowered the others
    with torch.no_grad():
        after = policy.segment_logprobs([it.segment for it in items])
    moved = [float(a) - it.segment.logprobs[0] for a, it in zip(after, items)]
    assert sum(d * it.advantage for d, it in zip(moved, items)) > 0


def test_toy_policy_and_algorithm_from_files_train_two_steps_through_r3_rl_train(plugin_dir: Path,
                                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = tiny_overrides(tmp_path, steps=2) + toy_sets(plugin_dir, clip=0.005) + ["log.tensorboard=false"]
    argv = [sys.executable, "-m", "r3_rl.cli", "train", str(RECIPE), "--run-dir", str(run)]
    for s in sets:
        argv += ["--set", s]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "batch/items" in r]
    assert [r["step"] for r in steps] == [0, 1] and all("learner/loss" in r for r in steps)
    assert steps[0]["learner/ratio_min"] == pytest.approx(1.0, abs=1e-6)  # recomputed = sampled, before any update
    assert steps[0]["learner/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    trees = list(read_trees(run / "trajectories" / "step_000000.jsonl"))
    images = [n for t in trees for n in t.nodes.values() if n.stage == "generate" and n.segment is not None]
    assert images and all(n.segment.token_ids == [] and len(n.segment.action["z"]) == 16 for n in images)
    advantages = [abs(n.advantage) for n in images if n.advantage is not None]
    assert max(advantages) == pytest.approx(0.005)  # the variant's clip (learner.options) was applied
    # GRPO moved the policy away from its initial weights (the same seed builds the same start)
    recipe = load_recipe(RECIPE, sets)
    start = build_policy(recipe).model.state_dict()
    final = load_file(str(run / "final" / "model.safetensors"))
    assert not torch.equal(final["mu.weight"], start["mu.weight"])
    assert (run / "checkpoints" / "step_000002" / "checkpoint.json").is_file()
