"""Exact checks of the reward interface, the reward registry, weighted composition with failure accounting, and the
GenEval / CLIP rewards' glue: cases earlier rounds touched only loosely -- to_output's failure texts, option and
name handling at load time, recipe defaults, set-up/tear-down of a RewardSet, the failure budget's defaults and
resumed state, GenEval's batch threshold, components and options, and CLIP's helpers (round 13D audit).

Every expected value is written out by hand; detectors and CLIP are scripted stand-ins or a tiny CLIP built from
a config (``tiny_vision``), compared with transformers' own CLIPModel.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput
from r3_rl.rewards.clip import DEFAULT_CLIP, ClipEncoder, load_error, resolve_device, resolve_dtype, shared_model
from r3_rl.rewards.detectors import DetectedObject
from r3_rl.rewards.geneval import ColorClassifier, GenevalReward
from r3_rl.rewards.registry import check_call_shape, load_reward, to_output, with_recipe_defaults
from r3_rl.rewards.reward_set import FailureBudget, RewardFailureError, RewardSet, ScoredSample, WeightedReward, reward_specs
from test_rewards_models import PALETTE, StubEncoder, sample, scripted_reward
from test_exact_reward_plumbing import _samples

PLUGINS = '''
from r3_rl.rewards.base import Reward, RewardOutput

def gen(samples):
    return (0.5 for _ in samples)

def star(*batch):
    return [0.25 for _ in batch[0]]

def kw_stop(samples, *, stop_phrase="default"):
    return [float(stop_phrase == "done") for _ in samples]

def two(samples, threshold):
    return [threshold for _ in samples]

class Valued(Reward):
    def __init__(self, level: float = 0.0):
        if level < 0:
            raise ValueError("level must be >= 0")
        self.level = level
    def __call__(self, samples):
        return [RewardOutput(score=self.level) for _ in samples]

class Nameless(Reward):
    name = ""
    def __call__(self, samples):
        return [RewardOutput(score=1.0) for _ in samples]

class NotAReward:
    def __call__(self, samples):
        return [1.0 for _ in samples]

class Stops(Reward):
    name = "stops"
    def __call__(self, samples, stop_phrase="x"):
        return [RewardOutput(score=1.0) for _ in samples]

stops = Stops()
'''


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    p = tmp_path / "registry_set_rewards.py"
    p.write_text(PLUGINS)
    return p


# ---------------------------------------------------------------- base
def test_a_reward_that_does_not_use_the_policy_refuses_one() -> None:
    """Catches ``Reward.bind_policy`` silently accepting a policy (a reward thought to be bound, never asking it)."""
    class Plain(Reward):
        name = "plain"

    with pytest.raises(TypeError, match=r"^reward 'plain' does not use the policy$"):
        Plain().bind_policy(object())
    assert Reward().weights() == [] and Reward.needs_policy is False and Reward.name == "reward"


# ---------------------------------------------------------------- registry: to_output and load_reward
def test_to_output_failure_texts() -> None:
    """Catches a wrong type name in the failure text, a non-number string crashing the batch (ValueError not caught),
    and an explicit failure replaced by the non-finite message."""
    assert to_output(None).failure == "reward returned None"
    assert to_output("abc").failure == "reward returned str, expected a number"
    assert to_output([1.0]).failure == "reward returned list, expected a number"
    assert to_output(np.float32(0.25)).score == 0.25 and to_output(3).score == 3.0
    out = to_output(RewardOutput(score=float("nan"), failure="judge offline", reason="r"))
    assert (out.failure, out.reason, out.failed) == ("judge offline", "r", True)
    ok = RewardOutput(score=0.5, components={"a": 1.0})
    assert to_output(ok) is ok


def test_a_reason_or_failure_that_is_not_text_becomes_text_and_crosses_the_wire() -> None:
    """A reward that returns a number as its reason or an exception as its failure: before, the server sent it on
    as it was and the client failed the sample ("reason: expected str"); the reward's own object is left as it is."""
    from r3_rl.rewards.wire import output_from_json, output_to_json

    given = RewardOutput(score=0.5, reason=0.25)  # type: ignore[arg-type]
    out = to_output(given)
    assert (out.score, out.reason, out.failure) == (0.5, "0.25", None) and given.reason == 0.25
    back = output_from_json(output_to_json(out))
    assert (back.score, back.reason, back.failure) == (0.5, "0.25", None)
    failed = to_output(RewardOutput(failure=ValueError("judge offline"), reason=["a", 1]))  # type: ignore[arg-type]
    assert (failed.failure, failed.reason, failed.failed) == ("judge offline", "['a', 1]", True)
    assert output_from_json(output_to_json(failed)).failure == "judge offline"

def test_a_string_score_fails_only_its_sample(plugins: Path) -> None:
    """Catches ``to_output`` catching only TypeError: one '0.x' string from a parser failed the whole batch."""
    class Parsed(Reward):
        name = "parsed"

        def __call__(self, samples):
            return ["n/a", "0.75"]

    out = RewardSet([WeightedReward(Parsed(), 2.0)]).score(_samples(2))
    assert out[0].failures == {"parsed": "reward returned str, expected a number"} and out[0].total is None
    assert out[1].total == 1.5 and out[1].parts == {"parsed": 0.75}


def test_a_generator_and_a_star_args_function_are_rewards(plugins: Path) -> None:
    """Catches ``list(raw)`` dropped (len() of a generator) and ``*args`` counted as 'no positional argument'."""
    assert [o.score for o in load_reward(f"{plugins}:gen")(_samples(3))] == [0.5, 0.5, 0.5]
    assert [o.score for o in load_reward(f"{plugins}:star")(_samples(2))] == [0.25, 0.25]
    check_call_shape("w", lambda *batch: batch, {})  # nothing to refuse


def test_a_missing_positional_option_names_the_call_shape(plugins: Path) -> None:
    """Catches the shape check skipping the second positional parameter: the hint on how a reward is called lost."""
    with pytest.raises(UserError) as e:
        load_reward(f"{plugins}:two")
    assert str(e.value).startswith(f"reward '{plugins}:two': missing required option(s) threshold; a reward function "
                                   "is called as fn(samples, **options)")
    assert load_reward(f"{plugins}:two", threshold=0.5)(_samples(1))[0].score == 0.5


def test_a_constructor_value_error_is_a_bad_options_error(plugins: Path) -> None:
    """Catches ValueError from a constructor reported as 'constructing it failed' instead of 'bad options'."""
    with pytest.raises(UserError) as e:
        load_reward(f"{plugins}:Valued", level=-1.0)
    assert str(e.value) == f"reward '{plugins}:Valued': bad options {{'level': -1.0}}: level must be >= 0"
    assert load_reward(f"{plugins}:Valued", level=0.5)(_samples(1))[0].score == 0.5


def test_an_empty_name_is_replaced_by_the_spec_name(plugins: Path) -> None:
    """Catches only the literal 'reward' being renamed: a class with ``name = ''`` logged under an empty key."""
    r = load_reward(f"{plugins}:Nameless")
    assert r.name == "Nameless"
    assert RewardSet([WeightedReward(r)]).score(_samples(1))[0].parts == {"Nameless": 1.0}


def test_a_class_that_is_not_a_reward_is_refused(plugins: Path) -> None:
    """Catches a plain class taken as a reward function (instantiated with the samples as argument)."""
    with pytest.raises(UserError) as e:
        load_reward(f"{plugins}:NotAReward")
    assert str(e.value) == f"reward '{plugins}:NotAReward' is a type; expected a Reward class or a function"


# ---------------------------------------------------------------- registry: recipe defaults
def test_recipe_defaults_only_where_the_reward_takes_them(plugins: Path) -> None:
    """Catches the parameter check dropped (clip given stop_phrase, refused at start-up), keyword-only parameters
    skipped, the caller's options dict changed in place, and a ready-made instance given options."""
    d = {"stop_phrase": "done"}
    assert with_recipe_defaults({"name": "clip"}, d) == {"name": "clip"}
    assert with_recipe_defaults({"name": f"{plugins}:two"}, d) == {"name": f"{plugins}:two"}
    spec = {"name": f"{plugins}:kw_stop", "options": {}}
    got = with_recipe_defaults(spec, d)
    assert got == {"name": f"{plugins}:kw_stop", "options": {"stop_phrase": "done"}} and spec["options"] == {}
    assert RewardSet.from_specs([got]).score(_samples(1))[0].total == 1.0
    ready = {"name": f"{plugins}:stops"}
    assert with_recipe_defaults(ready, d) == {"name": f"{plugins}:stops"}
    assert RewardSet.from_specs([with_recipe_defaults(ready, d)]).score(_samples(1))[0].total == 1.0


def test_reward_specs_add_the_recipes_stop_phrase(plugins: Path) -> None:
    """Catches the recipe-wide default stored under a wrong key (the critic reward never stopping on it)."""
    recipe = SimpleNamespace(templates=SimpleNamespace(stop_phrase="done"))
    entries = [SimpleNamespace(model_dump=lambda: {"name": f"{plugins}:kw_stop", "weight": 2.0, "options": None})]
    specs = reward_specs(recipe, entries)
    assert specs == [{"name": f"{plugins}:kw_stop", "weight": 2.0, "options": {"stop_phrase": "done"}}]


# ---------------------------------------------------------------- RewardSet
class _Life(Reward):
    """Records set-up / tear-down and the batch sizes it is called with."""

    def __init__(self, name: str = "life") -> None:
        self.name, self.log = name, []

    def setup(self) -> None:
        self.log.append("setup")

    def teardown(self) -> None:
        self.log.append("teardown")

    def __call__(self, samples):
        self.log.append(len(samples))
        return [RewardOutput(score=1.0) for _ in samples]


def test_setup_once_teardown_then_setup_again() -> None:
    """Catches set-up run before every batch (models reloaded each rollout) and a torn-down set never set up again."""
    r = _Life()
    rs = RewardSet([WeightedReward(r)])
    rs.score(_samples(2))
    rs.score(_samples(1))
    rs.teardown()
    rs.score(_samples(1))
    assert r.log == ["setup", 2, 1, "teardown", "setup", 1]


def test_an_empty_batch_calls_no_reward() -> None:
    """Catches the empty-batch guard dropped: a reward server asked to score nothing."""
    r = _Life()
    assert RewardSet([WeightedReward(r)]).score([]) == []
    assert r.log == ["setup"]


def test_from_specs_defaults_weight_one_and_accepts_null_options(plugins: Path) -> None:
    """Catches a missing weight read as 0 and ``options: null`` (a blank YAML key) crashing ``**None``."""
    rs = RewardSet.from_specs([{"name": f"{plugins}:gen", "options": None}])
    assert [m.weight for m in rs.members] == [1.0]
    assert rs.score(_samples(1))[0].total == 0.5


def test_an_exception_without_a_message_names_its_type() -> None:
    """Catches ``str(e).splitlines()[0]`` on an empty message: IndexError escaped the scorer."""
    class Mute(Reward):
        name = "mute"

        def __call__(self, samples):
            raise RuntimeError()

    out = RewardSet([WeightedReward(Mute())]).score(_samples(2))
    assert [o.failures for o in out] == [{"mute": "RuntimeError: "}] * 2


# ---------------------------------------------------------------- FailureBudget
def test_a_fresh_budget_reports_a_zero_fraction() -> None:
    """Catches the 0-scored fraction as 1.0: a dashboard showing 100 % failed before anything was scored."""
    assert FailureBudget(0.5).metrics() == {"rewards/scored": 0.0, "rewards/failed": 0.0, "rewards/failed_fraction": 0.0}


def test_the_default_minimum_is_sixteen_samples() -> None:
    """Catches the default ``min_samples`` changed: the trainer's budget stopping on its first small batch."""
    b = FailureBudget(0.0)
    b.record([ScoredSample(None, failures={"clip": "oom"})] * 15)
    with pytest.raises(RewardFailureError, match=r"^rewards: 16/16 samples failed \(100% > "):
        b.record([ScoredSample(None, failures={"clip": "oom"})])


def test_record_without_check_never_raises() -> None:
    """Catches ``check=False`` ignored: an eval's scorer stopping the run mid-eval."""
    b = FailureBudget(0.0, min_samples=1)
    b.record([ScoredSample(None, failures={"clip": "oom"})], check=False)
    assert (b.scored, b.failed) == (1, 1)
    with pytest.raises(RewardFailureError):
        b.check()


def test_the_stop_message_names_the_latest_reason_of_the_worst_reward() -> None:
    """Catches the last reason kept from the first failure and the named reward taken from insertion order."""
    b = FailureBudget(0.5, min_samples=1)
    b.record([ScoredSample(None, failures={"clip": "c1"}), ScoredSample(None, failures={"geneval": "g1"}),
              ScoredSample(None, failures={"geneval": "g2"})], check=False)
    with pytest.raises(RewardFailureError) as e:
        b.check()
    assert str(e.value) == ("rewards: 3/3 samples failed (100% > rewards.max_failure_fraction=0.5); "
                            "failing: geneval x2, clip x1; last geneval failure: g2")


def test_a_budget_round_trips_through_its_state_dict() -> None:
    """Catches ``last_reason`` left out of the checkpoint or not restored: the resumed stop message crashed
    (KeyError) when the worst reward had not failed again since the resume."""
    b = FailureBudget(1.0)
    b.record([ScoredSample(1.0), ScoredSample(None, failures={"vlm": "HTTP 502"}),
              ScoredSample(None, failures={"vlm": "HTTP 503"})])
    state = b.state_dict()
    assert state == {"scored": 3, "failed": 2, "by_reward": {"vlm": 2}, "last_reason": {"vlm": "HTTP 503"}}
    resumed = FailureBudget(0.5, min_samples=1)
    resumed.load_state_dict(state)
    with pytest.raises(RewardFailureError) as e:
        resumed.record([ScoredSample(None, failures={"clip": "oom"})])
    assert str(e.value) == ("rewards: 3/4 samples failed (75% > rewards.max_failure_fraction=0.5); "
                            "failing: vlm x2, clip x1; last vlm failure: HTTP 503")


# ---------------------------------------------------------------- GenEval glue
def _white(w: int = 32, h: int = 32) -> np.ndarray:
    return np.full((h, w, 3), PALETTE["white"], np.uint8)


def test_a_mixed_batch_detects_at_its_lowest_threshold() -> None:
    """Catches the batch's detector threshold taken as the highest (or the first sample's): a counting prompt in
    the batch made the detector drop the other prompts' 0.3-0.9 detections before selection."""
    cat = [DetectedObject("cat", (0, 0, 9, 9), 0.95)]
    r = scripted_reward([list(cat), list(cat)], batch_size=2)
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 1}]}
    single = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    r([sample(_white(), **counting), sample(_white(), **single)])
    assert r.backend.calls == [(2, [["cat"], ["cat"]], 0.3)]


def test_batch_size_zero_is_clamped_to_one() -> None:
    """Catches GenEval's ``batch_size: 0`` kept: ``range(0, n, 0)`` raised on every scoring call."""
    cat = [DetectedObject("cat", (0, 0, 9, 9), 0.95)]
    r = scripted_reward([list(cat), list(cat)], batch_size=0)
    assert r.batch_size == 1
    out = r([sample(_white(), include=[{"class": "cat", "count": 1}])] * 2)
    assert [o.score for o in out] == [1.0, 1.0] and [c[0] for c in r.backend.calls] == [1, 1]


def test_components_keep_strict_correct_and_partial_apart() -> None:
    """Catches ``strict_correct`` logged as ``correct`` and ``partial`` logged as the (binary) score: three cats for
    'two cats' is GenEval-correct, not strictly correct, and worth 1 - 1/2 in partial credit."""
    cats = [DetectedObject("cat", (0, 0, 9, 9), 0.95), DetectedObject("cat", (12, 0, 20, 9), 0.9),
            DetectedObject("cat", (22, 0, 30, 9), 0.8)]
    meta = {"tag": "counting_free", "include": [{"class": "cat", "count": 2}]}
    (out,) = scripted_reward([list(cats)])([sample(_white(), **meta)])
    assert out.score == 0.5 and out.components == {"correct": 1.0, "strict_correct": 0.0, "partial": 0.5}
    assert out.reason is None  # no reasons: None, not ''
    (binary,) = scripted_reward([list(cats)], binary=True)([sample(_white(), **meta)])
    assert binary.score == 1.0 and binary.components == {"correct": 1.0, "strict_correct": 0.0, "partial": 0.5}


def test_counting_tags_option_is_honoured() -> None:
    """Catches the ``counting_tags`` option ignored: a benchmark's own counting tag scored at the 0.3 threshold."""
    cats = [DetectedObject("cat", (0, 0, 9, 9), 0.95), DetectedObject("cat", (12, 0, 20, 9), 0.5)]
    meta = {"tag": "numeracy", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "cat", "count": 2}]}
    r = scripted_reward([list(cats)], counting_tags=["numeracy"])
    assert r.threshold_for(meta) == 0.9 and r.threshold_for({"tag": "counting"}) == 0.3
    (out,) = r([sample(_white(), **meta)])
    assert out.components["correct"] == 1.0 and r.backend.calls[0][2] == 0.9


@pytest.mark.parametrize("tags", ["numeracy", ["numeracy", 3]])
def test_counting_tags_that_are_not_a_list_of_tags_are_refused(tags: object) -> None:
    """``counting_tags: numeracy`` was read as the set of its letters, so the counting threshold never applied."""
    with pytest.raises(TypeError, match=r"^geneval reward option 'counting_tags' must be a list of tags, got "):
        scripted_reward([], counting_tags=tags)


def test_bad_metadata_failure_names_the_key() -> None:
    """Catches the metadata error's text dropped from the failure (which clause is wrong lost)."""
    (out,) = scripted_reward([])([sample(_white(), include=[{"class": "cat", "count": 0}])])
    assert out.failure == "bad GenEval metadata: metadata include[0] needs an integer 'count' >= 1, got 0"


def test_a_degenerate_box_is_a_one_pixel_crop() -> None:
    """Catches the 1-pixel floor dropped: a zero-width box gave an empty crop (CLIP's processor raises on it)."""
    img = Image.fromarray(_white(8, 8))
    clf = ColorClassifier(StubEncoder())  # type: ignore[arg-type]
    assert clf.crop(img, DetectedObject("cat", (3, 2, 3, 2), 0.9)).size == (1, 1)
    assert clf.crop(img, DetectedObject("cat", (1, 2, 5, 2), 0.9)).size == (4, 1)


# Found by round 13D: the 1-pixel floor was applied before PIL rounds the box (half to even), so a degenerate
# OWLv2 box at x = 1.5 became (2, 2, 2, 2) -- an empty crop on which CLIP's processor divides by zero.
def test_a_degenerate_box_at_half_pixels_is_still_one_pixel() -> None:
    """Catches the floor applied before rounding: round(1.5) == round(2.5) == 2 gave a 0 x 0 crop."""
    img = Image.fromarray(_white(8, 8))
    clf = ColorClassifier(StubEncoder())  # type: ignore[arg-type]
    assert clf.crop(img, DetectedObject("cat", (1.5, 1.5, 1.5, 1.5), 0.9)).size == (1, 1)
    assert clf.crop(img, DetectedObject("cat", (1.5, 0.0, 2.4, 4.0), 0.9)).size == (1, 4)
    assert clf.crop(img, DetectedObject("cat", (0.4, 0.6, 5.5, 6.5), 0.9)).size == img.crop((0.4, 0.6, 5.5, 6.5)).size


def test_geneval_weights_name_the_detector_and_clip() -> None:
    """Catches CLIP left out of the weights doctor checks (a missing CLIP found only at the first call)."""
    assert GenevalReward(device="cpu").weights() == ["facebook/mask2former-swin-small-coco-instance", DEFAULT_CLIP]
    assert GenevalReward(detector="owlv2", device="cpu", clip_model="my/clip").weights() == [
        "google/owlv2-base-patch16-ensemble", "my/clip"]


# ---------------------------------------------------------------- CLIP helpers
def test_device_auto_and_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches 'auto' never choosing the GPU and a swapped dtype table entry."""
    for has_gpu, expect in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
        assert resolve_device("auto") == torch.device(expect)
    monkeypatch.undo()
    assert resolve_device("cpu") == torch.device("cpu")
    assert [resolve_dtype(d) for d in ("float32", "float16", "bfloat16")] == [torch.float32, torch.float16, torch.bfloat16]
    assert ClipEncoder(device="cpu").weights() == [DEFAULT_CLIP]


def test_load_error_first_line_is_stripped_and_cut_at_200() -> None:
    """Catches the message not stripped (a leading newline gave an empty reason) or not cut (a page of HTML)."""
    e = load_error("clip", "m", OSError("\n  " + "x" * 300 + "\nmore"))
    assert str(e) == (f"clip: cannot load 'm' (OSError: {'x' * 200}); give a hub id or a local folder written by "
                      "save_pretrained")


def test_shared_model_is_in_eval_mode_and_passes_user_errors() -> None:
    """Catches ``.eval()`` dropped (dropout on while scoring) and a loader's own UserError rewrapped as
    'cannot load'."""
    m = shared_model("t-13d", "drop", torch.device("cpu"), torch.float32, lambda: torch.nn.Dropout(0.5).train())
    assert m.training is False
    assert torch.equal(m(torch.ones(4)), torch.ones(4))

    def refuse() -> torch.nn.Module:
        raise UserError("clip: 'x' is a BertModel, not a CLIP-style model")

    with pytest.raises(UserError) as e:
        shared_model("t-13d", "refuse", torch.device("cpu"), torch.float32, refuse)
    assert str(e.value) == "clip: 'x' is a BertModel, not a CLIP-style model"


def test_clip_reward_teardown_releases_the_model(tmp_path: Path) -> None:
    """Catches ClipReward.teardown not unloading its encoder (the shared CLIP never freed)."""
    from tiny_vision import save_tiny_clip

    r = load_reward("clip", model=save_tiny_clip(tmp_path / "clip"), device="cpu", scale=3.0)
    r.setup()
    assert isinstance(r.encoder.model, torch.nn.Module) and not r.encoder.model.training
    (out,) = r([sample(_white(), "a white square")])
    assert out.score == pytest.approx(3.0 * out.components["cosine"], abs=1e-6)
    r.teardown()
    assert r.encoder.model is None
    assert inspect.signature(ClipEncoder).parameters["batch_size"].default == 32


def test_a_component_that_is_not_a_finite_number_fails_its_sample() -> None:
    """Catches components passed through unchecked: a NaN part was logged as a NaN mean, and a text part raised a
    ValueError out of ``RewardSet.score`` (outside the per-sample isolation), stopping the run with a traceback.
    The reward server already refuses both (``output_to_json``); in-process scoring now agrees."""
    class Parts(Reward):
        name = "parts"

        def __call__(self, samples):
            return [RewardOutput(score=1.0, components={"ok": 0.5}),
                    RewardOutput(score=1.0, components={"fit": float("nan")}),
                    RewardOutput(score=1.0, components={"grade": "high", "ok": 1}),
                    RewardOutput(score=0.25, components={"n": np.int64(3)})]

    out = RewardSet([WeightedReward(Parts(), 2.0)]).score(_samples(4))
    assert out[0].total == 2.0 and out[0].parts == {"parts": 1.0, "parts/ok": 0.5}
    assert out[1].total is None and out[1].failures == {
        "parts": "reward returned a component that is not a finite number (fit='nan')"}
    assert out[2].total is None and out[2].failures == {
        "parts": "reward returned a component that is not a finite number (grade='high')"}
    assert out[3].total == 0.5 and out[3].parts == {"parts": 0.25, "parts/n": 3.0}
    failed = to_output(RewardOutput(score=None, components={"x": float("inf")}, failure="offline"))
    assert failed.failure == "offline"  # an explicit failure keeps its own reason
