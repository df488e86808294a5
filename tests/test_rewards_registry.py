"""Reward plug-ins: loading by name / dotted path / file path / entry point, RewardSet, failure budget, composition."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.compose import combine, format_ok, improvement, plan_reward, reflect_reward
from r3_rl.rewards.registry import available, load_reward, register
from r3_rl.rewards.reward_set import FailureBudget, RewardFailureError, RewardSet, ScoredSample, WeightedReward

CUSTOM = '''
from r3_rl.rewards.base import Reward, RewardOutput

def brightness(samples, scale=1.0):
    """Mean pixel value / 255, times scale; None (a failure) for a sample without image."""
    return [None if s.image is None else scale * float(s.image.mean()) / 255.0 for s in samples]

def broken(samples):
    raise RuntimeError("model exploded")

def nan_reward(samples):
    return [float("nan") for _ in samples]

class Counter(Reward):
    def __init__(self, offset: float = 0.0):
        self.offset, self.ready = offset, False
    def setup(self):
        self.ready = True
    def teardown(self):
        self.ready = False
    def __call__(self, samples):
        assert self.ready, "setup() was not called"
        return [RewardOutput(score=len(s.history) + self.offset, components={"turns": len(s.history)}, reason="counted")
                for s in samples]
'''

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def custom_file(tmp_path: Path) -> Path:
    p = tmp_path / "my_rewards.py"
    p.write_text(CUSTOM)
    return p


def samples(n: int = 3) -> list[RewardSample]:
    return [RewardSample(prompt="p", metadata={}, stage="generate", round=0,
                         image=np.full((4, 4, 3), 51 * i, np.uint8)) for i in range(n)]


def test_load_function_from_file_path_with_options(custom_file: Path) -> None:
    r = load_reward(f"{custom_file}:brightness", scale=2.0)
    assert r.name == "brightness"
    out = r(samples(3) + [RewardSample("p", {}, "generate", 0, None)])
    assert [o.score for o in out[:3]] == pytest.approx([0.0, 0.4, 0.8])
    assert out[3].failed and "None" in out[3].failure
    # The same file named twice (task + eval sets) is imported once.
    assert type(load_reward(f"{custom_file}:Counter")).__module__ == type(load_reward(f"{custom_file}:Counter")).__module__


def test_load_class_from_file_and_dotted_path(custom_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = load_reward(f"{custom_file}:Counter", offset=0.5)
    r.setup()
    out = r(samples(1))
    assert out[0].score == 0.5 and out[0].components == {"turns": 0}
    monkeypatch.syspath_prepend(str(custom_file.parent))
    d = load_reward("my_rewards:brightness")
    assert d(samples(2))[1].score == pytest.approx(0.2)


def test_load_from_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, custom_file: Path) -> None:
    dist = tmp_path / "my_rewards_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rewards-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[r3_rl.rewards]\nshiny = my_rewards:brightness\nbad = my_rewards:missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "shiny" in available()
    r = load_reward("shiny", scale=1.0)
    assert r.name == "shiny" and r(samples(2))[1].score == pytest.approx(0.2)
    with pytest.raises(UserError, match="entry point my_rewards:missing failed to load"):
        load_reward("bad")


def test_register_decorator() -> None:
    @register("unit_test_const", "always 0.25")
    def const(samples):
        return [0.25 for _ in samples]

    assert available()["unit_test_const"] == "always 0.25"
    assert load_reward("unit_test_const")(samples(1))[0].score == 0.25


@pytest.mark.parametrize("spec,opts,needle", [
    ("no_such_reward", {}, "unknown reward 'no_such_reward'"),
    ("genevall", {}, "did you mean 'geneval'"),
    ("FILE:brightnes", {}, "has no attribute 'brightnes' (did you mean 'brightness'?)"),
    ("FILE:brightness", {"scael": 1}, "unknown option 'scael' (did you mean 'scale'?)"),
    ("FILE:Counter", {"offsett": 1}, "unknown option 'offsett'"),
    ("missing/dir/r.py:fn", {}, "does not exist"),
    ("FILE", {}, "name the function or class too"),
    ("no_such_module_xyz:fn", {}, "cannot import module 'no_such_module_xyz'"),
    ("vlm_judge", {"url": "http://127.0.0.1:1/v1"}, "missing required option(s) model"),
])
def test_bad_reward_specs_are_one_line_user_errors(custom_file: Path, spec: str, opts: dict, needle: str) -> None:
    with pytest.raises(UserError) as e:
        load_reward(spec.replace("FILE", str(custom_file)), **opts)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("source", [
    "def fn(prompts, completions, **kwargs):\n    return [0.0] * len(prompts)\n",    # TRL's shape
    "def fn(images, prompts, metadata):\n    return [0.0] * len(images), {}\n",    # Flow-GRPO's shape
    "def fn():\n    return []\n",
    "class Peer:\n    def __call__(self, prompts, completions, **kw):\n        return []\nfn = Peer()\n",
])
def test_a_function_that_cannot_take_the_samples_is_refused_at_load(tmp_path: Path, source: str) -> None:
    p = tmp_path / "peer.py"
    p.write_text(source)
    with pytest.raises(UserError, match=r"called as fn\(samples, \*\*options\).*README: Rewards") as e:
        load_reward(f"{p}:fn")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("signature", ["samples, threshold", "samples, *, threshold"])
def test_a_missing_option_is_named_as_an_option(tmp_path: Path, signature: str) -> None:
    p = tmp_path / "mine.py"
    p.write_text(f"def fn({signature}):\n    return [threshold] * len(samples)\n")
    with pytest.raises(UserError, match="missing required option[(]s[)] threshold"):
        load_reward(f"{p}:fn")
    assert load_reward(f"{p}:fn", threshold=0.5)([]) == []


def test_the_readme_wrapper_of_a_flow_grpo_reward_runs(tmp_path: Path) -> None:
    (tmp_path / "flow_grpo_rewards.py").write_text(
        "def geneval_score(images, prompts, metadata):\n"
        "    return [float(m['n']) for m in metadata], {'prompts': prompts}\n")
    block = README.read_text().split("# my_rewards.py\nfrom flow_grpo_rewards")[1].split("```")[0]
    (tmp_path / "my_rewards.py").write_text("from flow_grpo_rewards" + block)
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        reward = load_reward(f"{tmp_path / 'my_rewards.py'}:geneval_from_flow_grpo")
        samples = [RewardSample(prompt="a cat", metadata={"n": n}, stage="generate", round=0, image=None)
                   for n in (1, 0)]
        assert [o.score for o in reward(samples)] == [1.0, 0.0]
    finally:
        sys.path.remove(str(tmp_path))


def test_file_that_fails_to_import_is_a_user_error(tmp_path: Path) -> None:
    p = tmp_path / "boom.py"
    p.write_text("raise ImportError('needs a package you do not have')\n")
    with pytest.raises(UserError, match="importing .*boom.py failed: ImportError: needs a package"):
        load_reward(f"{p}:fn")


def test_builtins_are_listed_without_loading_models() -> None:
    names = available()
    for n in ("blocks", "clip", "geneval", "self_consistency", "verdict_consistency", "vlm_judge", "remote"):
        assert n in names and names[n]


# ---------------------------------------------------------------- RewardSet
def test_reward_set_weighted_sum_components_and_reasons(custom_file: Path) -> None:
    rs = RewardSet.from_specs([{"name": f"{custom_file}:brightness", "weight": 2.0},
                               {"name": f"{custom_file}:Counter", "weight": 0.5, "options": {"offset": 1.0}}])
    out = rs.score(samples(2))
    assert out[1].total == pytest.approx(2.0 * 0.2 + 0.5 * 1.0)
    assert out[1].parts == {"brightness": pytest.approx(0.2), "Counter": 1.0, "Counter/turns": 0.0}
    assert out[0].reasons == {"Counter": "counted"}


def test_failures_are_never_zero(custom_file: Path) -> None:
    rs = RewardSet.from_specs([{"name": f"{custom_file}:brightness"}, {"name": f"{custom_file}:broken"}])
    out = rs.score(samples(2))
    assert all(o.total is None and o.failed for o in out)
    assert out[0].failures == {"broken": "RuntimeError: model exploded"} and out[0].parts["brightness"] == 0.0
    nan = RewardSet.from_specs([{"name": f"{custom_file}:nan_reward"}]).score(samples(1))[0]
    assert nan.total is None and "non-finite" in nan.failures["nan_reward"]
    missing = RewardSet.from_specs([{"name": f"{custom_file}:brightness"}]).score(
        [RewardSample("p", {}, "generate", 0, None)] + samples(1))
    assert missing[0].total is None and missing[1].total == 0.0  # a real zero stays a zero


def test_wrong_length_fails_the_batch() -> None:
    class Short(Reward):
        name = "short"

        def __call__(self, samples):
            return [RewardOutput(score=1.0)]

    out = RewardSet([WeightedReward(Short())]).score(samples(2))
    assert all(o.total is None and "returned 1 results for 2" in o.failures["short"] for o in out)


@pytest.mark.parametrize("specs,needle", [
    ([{"name": "clip", "wieght": 1}], "unknown key(s) ['wieght']"),
    ([{"name": "clip", "weight": "high"}], "'weight' must be a finite number"),
    ([{"name": "clip", "weight": math.inf}], "'weight' must be a finite number"),
    ([{"weight": 1}], "'name' must be a reward name"),
    ([{"name": "clip", "options": [1]}], "'options' must be a mapping"),
    ([{"name": "clip"}, {"name": "clip"}], "listed twice"),
])
def test_bad_reward_set_specs(specs: list, needle: str) -> None:
    with pytest.raises(UserError) as e:
        RewardSet.from_specs(specs)
    assert needle in str(e.value)


def test_policy_binding_reaches_only_policy_rewards() -> None:
    class Asks(Reward):
        name, needs_policy = "asks", True

        def bind_policy(self, policy):
            self.policy = policy

        def __call__(self, samples):
            return [self.policy(s) for s in samples]

    class Plain(Reward):
        name = "plain"

        def __call__(self, samples):
            return [0.0 for _ in samples]

    rs = RewardSet([WeightedReward(Asks()), WeightedReward(Plain())])
    assert rs.needs_policy and not RewardSet([WeightedReward(Plain())]).needs_policy
    rs.bind_policy(lambda s: 0.75)  # Plain.bind_policy would raise TypeError if it were called
    assert rs.score(samples(1))[0].total == 0.75


# ---------------------------------------------------------------- FailureBudget
def scored(n_ok: int, n_failed: int, name: str = "geneval") -> list[ScoredSample]:
    return [ScoredSample(1.0) for _ in range(n_ok)] + [ScoredSample(None, failures={name: "HTTP 500\nfrom server"})
                                                       for _ in range(n_failed)]


def test_failure_budget_stops_only_past_the_fraction() -> None:
    b = FailureBudget(0.25, min_samples=8)
    b.record(scored(0, 4))  # 100% failed, but fewer than min_samples scored: keep going
    b.record(scored(12, 0))  # 4/16 = 25%: not more than allowed
    assert b.fraction == 0.25 and b.metrics()["rewards/failed/geneval"] == 4.0
    with pytest.raises(RewardFailureError) as e:
        b.record(scored(0, 1, "clip"))
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert "5/17" in msg and "rewards.max_failure_fraction=0.25" in msg and "geneval x4" in msg and "HTTP 500" in msg
    FailureBudget(1.0, min_samples=1).record(scored(0, 10))  # 1.0 never stops
    with pytest.raises(UserError):
        FailureBudget(1.5)


# ---------------------------------------------------------------- stage composition (pure)
def test_stage_composition_exact_values() -> None:
    assert format_ok("<think>plan</think>") and not format_ok("plan")
    assert plan_reward(0.5, True, 0.1) == pytest.approx(0.6) and plan_reward(0.5, False, 0.1) == 0.0
    assert plan_reward(None, True, 0.1) is None
    assert improvement(0.25, 0.75, stop=False) == 0.5 and improvement(1.0, 1.0, stop=True) == 1.0
    assert improvement(0.5, 0.5, stop=True) == 0.0 and improvement(None, 1.0, False) is None
    assert reflect_reward(0.25, 0.75, False, True, 0.1) == pytest.approx(0.6)
    assert reflect_reward(0.25, 0.75, False, False, 0.1) == 0.0
    assert combine(0.6, 0.2, 0.1) == pytest.approx(0.9) and combine(0.6, None) is None and combine(None) is None



def test_the_trainer_stops_through_the_failure_budget(tmp_path: Path) -> None:
    """A run whose task reward keeps failing stops with :class:`RewardFailureError` (the budget counts per reward
    and names the failing one), not with a check of its own."""
    from conftest import tiny_overrides

    from r3_rl.config import load_recipe
    from r3_rl.trainer import Trainer

    broken = tmp_path / "broken.py"
    broken.write_text("def dead(samples):\n    raise ConnectionError('reward server gone')\n")
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny_blocks.yaml",
                         tiny_overrides(tmp_path, 2) + [f"rewards.task=[{{name: '{broken}:dead'}}]",
                                                        "tree.group_size=8", "log.tensorboard=false"])
    trainer = Trainer(recipe, tmp_path / "run")
    with pytest.raises(RewardFailureError) as e:
        trainer.train()
    msg = str(e.value)
    assert "16/16 samples failed" in msg and "failing: dead x16" in msg and "reward server gone" in msg
    assert trainer.failures.by_reward == {"dead": 16} and "\n" not in msg


def test_a_sample_that_crashes_the_reward_fails_alone() -> None:
    """A detector that raises on one image of a GenEval eval used to fail all 1,659 images of the call (and the
    eval printed NaN).  The batch is split until the sample that raises is found: it alone fails, with the reason,
    in about 2 log2(n) more calls; a reward that fails everything is given up on two calls later."""
    calls: list[int] = []

    class Fragile(Reward):
        name = "fragile"

        def __call__(self, batch):
            calls.append(len(batch))
            if any(s.prompt == "p100" for s in batch):
                raise RuntimeError("detector crashed on an odd image")
            return [RewardOutput(score=0.5) for _ in batch]

    batch = [RewardSample(f"p{i}", {}, "generate", 0, np.zeros((2, 2, 3), np.uint8)) for i in range(1659)]
    out = RewardSet([WeightedReward(Fragile())]).score(batch)
    assert [i for i, o in enumerate(out) if o.failed] == [100]
    assert out[100].failures == {"fragile": "RuntimeError: detector crashed on an odd image"}
    assert all(o.total == 0.5 for i, o in enumerate(out) if i != 100)
    assert len(calls) <= 1 + 2 * 11

    calls.clear()

    class Down(Reward):
        name = "down"

        def __call__(self, batch):
            calls.append(len(batch))
            raise ConnectionError("reward server gone")

    out = RewardSet([WeightedReward(Down())]).score(batch)
    assert all(o.failures == {"down": "ConnectionError: reward server gone"} for o in out)
    assert calls == [1659, 829, 830]

    calls.clear()

    class Chatty(Reward):  # fails everywhere with a message that names the batch: bounded all the same
        name = "chatty"

        def __call__(self, batch):
            calls.append(len(batch))
            raise RuntimeError(f"cannot score {len(batch)} images")

    out = RewardSet([WeightedReward(Chatty())]).score(batch)
    assert all(o.failed for o in out) and len(calls) <= 1 + 8 * 11
