"""Exact checks of reward plumbing left open by earlier rounds: a failed reward never revived by a later one,
weight 0 kept as 0, options refused rather than ignored, a plug-in's own UserError passed through, the failure
budget naming every failing reward, and path specs split at their last colon (round 10D audit)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.registry import FunctionReward, load_reward
from r3_rl.rewards.reward_set import FailureBudget, RewardFailureError, RewardSet, ScoredSample, WeightedReward

PLUGIN = '''
from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput

def half(samples):
    return [0.5 for _ in samples]

def quarter(samples):
    return [0.25 for _ in samples]

class Const(Reward):
    def __call__(self, samples):
        return [RewardOutput(score=0.75) for _ in samples]

ready = Const()

class Picky(Reward):
    def __init__(self, model: str = "m"):
        raise UserError(f"model {model!r} is not a CLIP model")
'''


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    p = tmp_path / "plumbing_rewards.py"
    p.write_text(PLUGIN)
    return p


def _samples(n: int) -> list[RewardSample]:
    return [RewardSample(prompt=f"p{i}", metadata={}, stage="generate", round=0,
                         image=np.zeros((2, 2, 3), np.uint8)) for i in range(n)]


class _Fixed(Reward):
    """Scores sample i with ``scores[i]`` (``None`` = a failure)."""

    def __init__(self, name: str, scores: list[float | None]) -> None:
        self.name, self.scores = name, scores

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        return [RewardOutput(failure="down") if s is None else RewardOutput(score=s) for s in self.scores]


def test_a_failure_in_the_first_reward_is_not_revived_by_a_later_one() -> None:
    """Catches the weighted sum restarting from 0 after an earlier member failed (the failed sample scored 4*0.5)."""
    rs = RewardSet([WeightedReward(_Fixed("a", [None, 0.5]), 2.0), WeightedReward(_Fixed("b", [0.5, 0.25]), 4.0)])
    out = rs.score(_samples(2))
    assert out[0].total is None and out[0].failures == {"a": "down"} and out[0].parts == {"b": 0.5}
    assert out[1].total == 2.0  # 2*0.5 + 4*0.25


def test_weight_zero_is_a_logged_only_reward(plugin: Path) -> None:
    """Catches ``weight: 0`` read as the default 1 (``s.get('weight') or 1.0``): the 0-weight reward counted."""
    rs = RewardSet.from_specs([{"name": f"{plugin}:half", "weight": 0}, {"name": f"{plugin}:quarter", "weight": 2}])
    out = rs.score(_samples(1))[0]
    assert [m.weight for m in rs.members] == [0.0, 2.0]
    assert out.total == 0.5 and out.parts == {"half": 0.5, "quarter": 0.25}


def test_function_reward_with_too_many_scores_is_an_error() -> None:
    """Catches the length guard as ``len(raw) < len(samples)``: extra scores silently dropped by zip."""
    with pytest.raises(ValueError, match=r"^reward 'f' returned 3 scores for 2 samples$"):
        FunctionReward(lambda s: [1.0, 2.0, 3.0], "f")(_samples(2))


def test_options_given_to_a_ready_made_instance_are_refused(plugin: Path) -> None:
    """Catches a Reward instance silently ignoring the recipe's options (a misspelt option never reported)."""
    with pytest.raises(UserError) as e:
        load_reward(f"{plugin}:ready", scale=2.0, bias=1)
    assert str(e.value) == f"reward '{plugin}:ready' is a ready-made Reward instance and takes no options (got scale, bias)"
    assert load_reward(f"{plugin}:ready")(_samples(1))[0].score == 0.75


def test_a_constructors_own_user_error_is_passed_through_unchanged(plugin: Path) -> None:
    """Catches the ``except UserError: raise`` dropped: the plug-in's one-line message rewrapped as a crash."""
    with pytest.raises(UserError) as e:
        load_reward(f"{plugin}:Picky", model="resnet")
    assert str(e.value) == "model 'resnet' is not a CLIP model"


def test_the_failure_budget_names_the_three_worst_rewards() -> None:
    """Catches ``most_common(3)`` as ``most_common(1)``: only the worst failing reward named in the stop message."""
    b = FailureBudget(0.5, min_samples=1)
    fails = [ScoredSample(None, failures={"geneval": "e1"})] * 3 + [ScoredSample(None, failures={"clip": "e2"})] * 2 \
        + [ScoredSample(None, failures={"remote": "e3"})] + [ScoredSample(None, failures={"vlm": "e4"})]
    with pytest.raises(RewardFailureError) as e:
        b.record(fails)
    assert str(e.value) == ("rewards: 7/7 samples failed (100% > rewards.max_failure_fraction=0.5); "
                            "failing: geneval x3, clip x2, remote x1; last geneval failure: e1")


def test_a_file_spec_is_split_at_its_last_colon(tmp_path: Path) -> None:
    """Catches ``partition`` for ``rpartition``: a file under a folder whose name holds ':' not found / misnamed."""
    folder = tmp_path / "run:2"
    folder.mkdir()
    (folder / "colon_reward.py").write_text("def third(samples):\n    return [0.125 for _ in samples]\n")
    r = load_reward(f"{folder / 'colon_reward.py'}:third")
    assert r.name == "third" and r(_samples(1))[0].score == 0.125


def test_a_reward_without_score_or_failure_is_a_failure_named_no_score() -> None:
    """Catches ``r.failure or 'no score'`` dropped: a score-less output recorded as failure ``None``."""
    out = RewardSet([WeightedReward(_Fixed("empty", [None]))]).score(_samples(1))[0]
    assert out.failures == {"empty": "down"}

    class Blank(Reward):
        name = "blank"

        def __call__(self, samples):
            return [RewardOutput() for _ in samples]

    out = RewardSet([WeightedReward(Blank())]).score(_samples(1))[0]
    assert out.total is None and out.failures == {"blank": "no score"}


def test_a_failed_outputs_reason_is_kept() -> None:
    """Catches the reason of a failed output dropped (a judge's 'why it failed' lost from the logs)."""

    class Judge(Reward):
        name = "judge"

        def __call__(self, samples):
            return [RewardOutput(failure="unparseable", reason="the judge said 'maybe'") for _ in samples]

    out = RewardSet([WeightedReward(Judge())]).score(_samples(1))[0]
    assert out.failures == {"judge": "unparseable"} and out.reasons == {"judge": "the judge said 'maybe'"}


def test_a_non_finite_score_keeps_its_reason() -> None:
    """Catches the non-finite guard dropping the output's reason."""
    from r3_rl.rewards.registry import to_output

    out = to_output(RewardOutput(score=float("nan"), reason="judge timed out"))
    assert (out.failure, out.reason) == ("reward returned a non-finite score (nan)", "judge timed out")


def test_max_failure_fraction_zero_is_allowed_and_stops_at_the_first_failure() -> None:
    """Catches the range check as ``0 < max_fraction``: a zero-tolerance run refused at start-up."""
    b = FailureBudget(0.0, min_samples=2)
    b.record([ScoredSample(1.0), ScoredSample(1.0)])
    with pytest.raises(RewardFailureError, match=r"^rewards: 1/3 samples failed \(33% > "):
        b.record([ScoredSample(None, failures={"clip": "oom"})])


def test_a_resumed_budget_keeps_its_per_reward_counts() -> None:
    """Catches ``load_state_dict`` dropping ``by_reward``: a resumed run's stop message and metrics lose the names."""
    b = FailureBudget(1.0)
    b.load_state_dict({"scored": 10, "failed": 3, "by_reward": {"clip": 2, "geneval": 1}, "last_reason": {"clip": "x"}})
    assert b.metrics() == {"rewards/scored": 10.0, "rewards/failed": 3.0, "rewards/failed_fraction": 0.3,
                           "rewards/failed/clip": 2.0, "rewards/failed/geneval": 1.0}


def test_a_multi_line_exception_fails_with_its_first_line() -> None:
    """Catches the exception text kept whole: a traceback-like message spread over the failure logs."""

    class Crashes(Reward):
        name = "crashes"

        def __call__(self, samples):
            raise RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")

    out = RewardSet([WeightedReward(Crashes())]).score(_samples(1))[0]
    assert out.failures == {"crashes": "RuntimeError: CUDA out of memory"}


def test_did_you_mean_covers_decorated_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the did-you-mean drawing only on built-ins: a misspelt ``@register`` name gets no suggestion."""
    from r3_rl.rewards.registry import REWARDS, register

    monkeypatch.setattr(REWARDS, "registered", dict(REWARDS.registered))  # the name is gone after the test
    register("plumbing_sharpness", "test")(lambda samples: [0.0 for _ in samples])
    with pytest.raises(UserError, match=r"^unknown reward 'plumbing_sharpnes' \(did you mean 'plumbing_sharpness'\?\)"):
        load_reward("plumbing_sharpnes")


def test_a_plugin_file_that_fails_to_import_leaves_no_half_module(tmp_path: Path) -> None:
    """Catches the half-imported module left in ``sys.modules`` after the file's import failed."""
    import sys

    p = tmp_path / "half_reward.py"
    p.write_text("x = 1\nraise RuntimeError('no gpu')\n")
    with pytest.raises(UserError, match="importing .*half_reward.py failed: RuntimeError: no gpu"):
        load_reward(f"{p}:x")
    assert not [m for m in sys.modules if m.startswith("r3_rl_user_half_reward_")]


def test_an_entry_point_named_like_a_builtin_does_not_relabel_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``setdefault`` as assignment: a package's entry point 'clip' shown as the built-in's description."""
    from types import SimpleNamespace

    from r3_rl.rewards.registry import REWARDS, available

    eps = [SimpleNamespace(name="clip", value="evil_pkg:clip"), SimpleNamespace(name="plumbing_ep", value="pkg.m:fn")]
    monkeypatch.setattr(REWARDS, "entry_points", lambda: eps)
    names = available()
    assert names["clip"] == "prompt-image cosine similarity of a CLIP model (transformers or open_clip)"
    assert names["plumbing_ep"] == "entry point pkg.m:fn"


def test_a_star_args_reward_is_not_missing_an_option(tmp_path: Path) -> None:
    """Catches ``check_options`` counting ``*args`` as a required option ('missing required option(s) more')."""
    p = tmp_path / "star_reward.py"
    p.write_text("def extra(samples, *more, scale=1.0):\n    return [scale for _ in samples]\n")
    assert load_reward(f"{p}:extra", scale=2.0)(_samples(1))[0].score == 2.0


def test_did_you_mean_never_suggests_a_private_name(tmp_path: Path) -> None:
    """Catches the attribute hint drawn from ``dir(module)``: a private helper offered as the reward to use."""
    p = tmp_path / "private_reward.py"
    p.write_text("def _sharpness(samples):\n    return [0.0 for _ in samples]\n\ndef brightness(samples):\n"
                 "    return [0.0 for _ in samples]\n")
    with pytest.raises(UserError) as e:
        load_reward(f"{p}:sharpness")
    assert str(e.value) == f"reward '{p}:sharpness': {p} has no attribute 'sharpness'"
