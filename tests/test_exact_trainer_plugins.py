"""Exact checks of the trainer's plug-in loading, train-item batching, weight-size facts, its parts builder and
its loop's bookkeeping (round 12B audit): ``r3_rl.plugins`` (dotted / file paths, option checks, registries),
``r3_rl.learner.batch``, ``r3_rl.weights``, ``r3_rl.components`` and ``r3_rl.trainer``.

Every expected value is worked out by hand in the test (never by calling the function under test)."""
from __future__ import annotations

import json
import pickle
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from r3_rl import weights
from r3_rl.errors import UserError
from r3_rl.learner import batch
from r3_rl.learner.batch import TrainItem
from r3_rl.plugins import Registry, check_options, import_attr
from r3_rl.trajectory import Node, PromptItem, Segment, Tree


# ================================================================ r3_rl/plugins.py
def test_two_plugin_files_with_one_stem_are_two_modules_that_pickle_apart(tmp_path: Path) -> None:
    """Catches the module name built from the file's stem alone: the second file would take the first's
    sys.modules entry, and an object of the first (sent to a Ray actor) would no longer pickle."""
    for d, v in (("a", 1), ("b", 2)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "samestem_12b.py").write_text(f"class Thing:\n    v = {v}\n")
    a = import_attr(f"{tmp_path / 'a' / 'samestem_12b.py'}:Thing", "reward 'a'", "fn")
    b = import_attr(f"{tmp_path / 'b' / 'samestem_12b.py'}:Thing", "reward 'b'", "fn")
    assert (a.v, b.v) == (1, 2)
    assert a.__module__ != b.__module__
    assert type(pickle.loads(pickle.dumps(a()))) is a and type(pickle.loads(pickle.dumps(b()))) is b


def test_a_plugin_file_that_fails_to_import_leaves_no_module_behind(tmp_path: Path) -> None:
    """Catches the half-imported module left in sys.modules after its import raised."""
    f = tmp_path / "broken_12b_plugin.py"
    f.write_text("X = 1\nraise RuntimeError('boom')\n")
    before = {k for k in sys.modules if "broken_12b_plugin" in k}
    with pytest.raises(UserError, match=r"importing .*broken_12b_plugin.py failed: RuntimeError: boom"):
        import_attr(f"{f}:X", "reward 'x'", "fn")
    assert {k for k in sys.modules if "broken_12b_plugin" in k} == before == set()


def test_a_file_path_with_a_colon_in_a_folder_name_splits_at_the_last_colon(tmp_path: Path) -> None:
    """Catches the spec split at its first colon instead of its last."""
    d = tmp_path / "we:ird"
    d.mkdir()
    (d / "colon_12b.py").write_text("def fn():\n    return 'ok'\n")
    assert import_attr(f"{d / 'colon_12b.py'}:fn", "reward", "fn")() == "ok"


@pytest.mark.parametrize("spec", ["r3_rl.errors:", ":close_match", ":"])
def test_a_spec_missing_its_module_or_attribute_is_the_usage_error(spec: str) -> None:
    """Catches a spec accepted when only one of its two halves is empty."""
    with pytest.raises(UserError) as e:
        import_attr(spec, "reward 'q'", "fn")
    assert str(e.value) == "reward 'q': expected 'pkg.module:fn' or 'path/file.py:fn'"


def test_a_slashed_target_without_py_is_read_as_a_file_not_a_module(tmp_path: Path) -> None:
    """Catches a target with a slash but no .py suffix sent to importlib as a dotted module name."""
    target = tmp_path / "nofolder" / "thing"
    with pytest.raises(UserError) as e:
        import_attr(f"{target}:fn", "policy 'p'", "Class")
    assert str(e.value) == f"policy 'p': file {target} does not exist"


def test_a_folder_named_like_a_python_file_does_not_exist_as_a_file(tmp_path: Path) -> None:
    """Catches a folder accepted as a plug-in file (then failing as an import instead of a missing file)."""
    (tmp_path / "pkgdir_12b.py").mkdir()
    with pytest.raises(UserError) as e:
        import_attr(f"{tmp_path / 'pkgdir_12b.py'}:fn", "reward 'r'", "fn")
    assert str(e.value) == f"reward 'r': file {tmp_path / 'pkgdir_12b.py'} does not exist"


def test_a_missing_attribute_names_a_public_close_match_only() -> None:
    """Catches the suggestion drawn from private names too."""
    with pytest.raises(UserError) as e:
        import_attr("r3_rl.plugins:_FILE_MODULE", "reward 'z'", "fn")
    assert str(e.value) == "reward 'z': r3_rl.plugins has no attribute '_FILE_MODULE'"


def _opts(ctx, a, b=1, *args, c, d=2):  # noqa: ANN001, ANN002, ANN202 - a signature to check options against
    return a


def test_check_options_valid_and_missing_names_exactly() -> None:
    """Catches the first parameter counted (or two skipped), keyword-only ones refused, defaults taken for
    required, *args taken for a required option, or *args taken for **kwargs."""
    check_options("reward 'o'", _opts, {"a": 1, "c": 2})
    check_options("reward 'o'", _opts, {"a": 1, "b": 2, "c": 3, "d": 4})
    with pytest.raises(UserError) as e:
        check_options("reward 'o'", _opts, {})
    assert str(e.value) == "reward 'o': missing required option(s) a, c"
    with pytest.raises(UserError) as e:
        check_options("reward 'o'", _opts, {"a": 1, "c": 2, "args": 3})
    assert str(e.value) == "reward 'o': unknown option 'args'; valid options: a, b, c, d"
    with pytest.raises(UserError) as e:
        check_options("reward 'o'", _opts, {"ctx": 1, "a": 1, "c": 2})
    assert str(e.value) == "reward 'o': unknown option 'ctx'; valid options: a, b, c, d"
    check_options("reward 'o'", lambda x, **kw: x, {"anything": 1})  # **kwargs takes every option
    check_options("reward 'o'", lambda x, y: x, {"x": 1, "y": 2}, skip=0)


def _registry() -> Registry:
    return Registry("widget", "r3_rl.no_such_group_12b", {"alpha": ("r3_rl.errors:close_match", "Alpha built-in")},
                    "fn")


def _zeta():
    """Zeta line one.

    More text."""


def _beta():
    pass


def test_registry_lists_sorted_and_entry_points_never_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches an unsorted listing, a description taken from a docstring's last line, or an entry point's
    description replacing a built-in's."""
    reg = _registry()
    reg.register("zeta")(_zeta)
    reg.register("beta", "Beta desc")(_beta)
    eps = [SimpleNamespace(name="alpha", value="other:thing"), SimpleNamespace(name="gamma", value="pkg.g:G")]
    monkeypatch.setattr(reg, "entry_points", lambda: eps)
    assert list(reg.available().items()) == [("alpha", "Alpha built-in"), ("beta", "Beta desc"),
                                             ("gamma", "entry point pkg.g:G"), ("zeta", "Zeta line one.")]


@pytest.mark.parametrize("spec, message", [
    ("", "widget name must be a non-empty string, got ''"),
    ("tool.py", "widget 'tool.py': name the function or class too, e.g. 'tool.py:fn'"),
])
def test_registry_check_name_messages(spec: str, message: str) -> None:
    """Catches the empty name or a bare .py file reported as an unknown name."""
    with pytest.raises(UserError) as e:
        _registry().check_name(spec)
    assert str(e.value) == message


def test_a_module_raising_import_error_is_its_own_failure_not_a_missing_module(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches an ImportError raised by the module's own code reported as the module not being found."""
    (tmp_path / "importerr_12b.py").write_text("raise ImportError('nope')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "importerr_12b", raising=False)
    with pytest.raises(UserError) as e:
        import_attr("importerr_12b:fn", "reward 'm'", "fn")
    assert str(e.value).startswith("reward 'm': importing module 'importerr_12b' failed: ImportError: nope (")


# ================================================================ r3_rl/weights.py
def _st(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_home_and_dot_relative_names_are_never_hub_ids() -> None:
    """Catches '~/model' taken for a hub repo id (then looked up in the hub cache instead of the home folder)."""
    assert weights._looks_like_repo_id("org/name") is True
    assert weights._looks_like_repo_id("~/model") is False and weights._looks_like_repo_id("./model") is False


def test_a_shard_holding_several_tensors_is_one_weight_file(tmp_path: Path) -> None:
    """Catches a shard listed once per tensor it holds (its parameters then counted several times)."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s-2.safetensors", "b": "s-1.safetensors", "c": "s-2.safetensors"}}))
    for s in ("s-1", "s-2"):
        (tmp_path / f"{s}.safetensors").write_bytes(b"x")
    assert weights.weight_files(tmp_path) == [tmp_path / "s-1.safetensors", tmp_path / "s-2.safetensors"]


@pytest.mark.parametrize("index,why", [('{"weight_map": {"a": "s-1.safe', "JSONDecodeError"),  # cut off
                                       ('{"metadata": {}}', "AttributeError"),  # no weight_map
                                       ('{"weight_map": {}}', "ValueError"),  # no shard at all
                                       ('[1, 2]', "AttributeError")])
def test_an_unreadable_shard_index_is_weights_missing_with_the_download_fix(tmp_path: Path, index: str,
                                                                            why: str) -> None:
    """A shard index cut off mid-download raised a bare JSONDecodeError (the doctor's "check itself failed",
    no fix); one without a ``weight_map`` gave no weight files and no error."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(weights.WeightsMissing) as e:
        weights.weight_files(tmp_path, "policy.model")
    assert str(e.value) == (f"policy.model: {tmp_path / 'model.safetensors.index.json'} is not a readable shard "
                            f"index with a 'weight_map' ({why}): an interrupted download?")
    assert e.value.fix == "download the model again (`hf download REPO` resumes)"


def test_a_header_length_of_exactly_the_cap_is_read_not_refused(tmp_path: Path) -> None:
    """Catches the header cap applied with >= (a header exactly 100 MB long is still a valid file)."""
    f = tmp_path / "cap.safetensors"
    f.write_bytes(struct.pack("<Q", weights.SAFETENSORS_MAX_HEADER) + b"{}")
    with pytest.raises(weights.WeightsMissing) as e:
        weights.safetensors_params(f)
    assert str(e.value) == f"{f}: not a complete safetensors file (the header is cut at 2 of 100000000 bytes)"


def test_a_plugin_policy_with_a_model_folder_sizes_its_image_from_the_vq_config(tmp_path: Path) -> None:
    """Catches only 'janus' reading the folder's VQ config (a plug-in policy with a model folder kept the Blocks
    image size), or a tiny policy with a folder taking it."""
    (tmp_path / "config.json").write_text(json.dumps({"vq_config": {"num_patches": 4, "channel_multiplier": [1, 2]}}))
    _st(tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [2, 5], "data_offsets": [0, 40]}}, bytes(40))
    blocks = SimpleNamespace(blocks=SimpleNamespace(rows=2, cols=3))
    plug = SimpleNamespace(policy=SimpleNamespace(kind="my_pkg.pol:Pol", model=str(tmp_path)), data=blocks)
    facts = weights.policy_facts(plug)
    assert (facts.params, facts.image_pixels, facts.folder) == (10, (4 * 2) ** 2, tmp_path)
    tiny = SimpleNamespace(policy=SimpleNamespace(kind="tiny", model=str(tmp_path)), data=blocks)
    assert weights.policy_facts(tiny).image_pixels == 2 * 3 * 8 * 8


def test_a_run_of_no_steps_keeps_one_checkpoint_on_disk() -> None:
    """Catches a zero-step run counted as keeping no checkpoint (its final save still writes one)."""
    assert weights.checkpoints_on_disk(SimpleNamespace(steps=0, save_every=2, keep_last=3)) == 1
    assert weights.checkpoints_on_disk(SimpleNamespace(steps=5, save_every=0, keep_last=3)) == 1
    assert weights.checkpoints_on_disk(SimpleNamespace(steps=1, save_every=1, keep_last=3)) == 1


# ================================================================ r3_rl/learner/batch.py
def _seg(n: int = 2) -> Segment:
    return Segment("text", {}, list(range(n)), [0.0] * n)


def _tree(*nodes: Node, tid: str = "t") -> Tree:
    t = Tree(tid, PromptItem("p", "x"))
    for n in nodes:
        t.add(n)
    return t


def _n(nid: str, parent: str | None, stage: str, group: str, reward: float | None, version: int = 0,
       **kw: object) -> Node:
    return Node(nid, parent, stage, 0, group, version, segment=kw.pop("segment", _seg()), reward=reward, **kw)


def test_critic_pools_name_each_critique_by_its_parents_verdict() -> None:
    """Catches the pools' names swapped (a critique of a correct image put in the 'flawed' pool), critiques of
    unjudged parents pooled, or refinements taken for critiques."""
    img = np.zeros((1, 1, 3), np.uint8)
    t = _tree(_n("good", None, "generate", "im", 1.0, -1, image=img, meta={"correct": True}),
              _n("bad", None, "generate", "im", 0.0, -1, image=img, meta={"correct": False}),
              _n("plain", None, "generate", "im", 0.5, -1, image=img),
              _n("cg", "good", "reflect", "g1", 1.0), _n("cb", "bad", "reflect", "g2", 0.0),
              _n("cp", "plain", "reflect", "g3", 0.0), _n("rg", "good", "refine", "g4", 1.0))
    assert batch.critic_pools([t]) == {id(t.nodes["cg"]): "correct", id(t.nodes["cb"]): "flawed"}


def test_edited_image_gains_skip_an_edit_whose_parent_has_no_image() -> None:
    """Catches a gain taken against a parent node that holds no image (its reward is not an image's)."""
    t = _tree(_n("plan", None, "reason", "pg", 0.25), _n("c", "plan", "reflect", "cg", 1.0),
              _n("f", "c", "refine", "fg", 1.0))
    assert batch.edited_image_gains([t]) == {}


def test_a_groups_stage_is_its_first_members_for_std_normalisation() -> None:
    """Catches a group's stage (which picks its normalize_std flag) taken from its last member."""
    t = _tree(_n("a", None, "reason", "g", 1.0), _n("b", None, "generate", "g", 0.0))
    batch.assign_advantages([t], normalize_std={"reason": True})
    scaled = 0.5 / (0.5 ** 0.5 + 1e-6)  # (r - mean) / (Bessel std of [1, 0] + eps)
    assert t.nodes["a"].advantage == pytest.approx(scaled, abs=1e-12)
    assert t.nodes["b"].advantage == pytest.approx(-scaled, abs=1e-12)


def test_a_failed_critique_under_the_verdict_baseline_is_left_out_not_nan() -> None:
    """Catches a failed critique's NaN pooled advantage kept as a number (then trained on as NaN)."""
    img = np.zeros((1, 1, 3), np.uint8)
    t = _tree(_n("im", None, "generate", "im", 0.0, -1, image=img, meta={"correct": False}),
              _n("c1", "im", "reflect", "cg", 1.0), _n("c2", "im", "reflect", "cg", 0.0),
              _n("c3", "im", "reflect", "cg", None))
    batch.assign_advantages([t], critic_baseline="verdict")
    assert [t.nodes[k].advantage for k in ("c1", "c2", "c3")] == [1.0, -1.0, None]
    items, stats = batch.collect_items([t], 0, 0, pooled_stages=frozenset({"reflect"}))
    assert [it.advantage for it in items] == [1.0, -1.0] and stats.failed_rewards == 1


def test_batch_stats_summarise_with_bessels_std_and_the_largest_magnitude() -> None:
    """Catches the logged advantage std taken over n (not n - 1, as every group std here is), or the largest
    advantage logged instead of the largest magnitude."""
    items = [TrainItem(_seg(), a, "reason", 0) for a in (0.5, -2.0, 0.0, 1.5)]
    stats = batch.BatchStats()
    batch.summarize(items, stats)
    # mean 0; squares 0.25 + 4 + 0 + 2.25 = 6.5; / 3 -> std sqrt(6.5 / 3)
    assert stats.items == 4 and stats.advantage_mean == 0.0
    assert stats.advantage_std == pytest.approx((6.5 / 3) ** 0.5, rel=1e-6)
    assert stats.advantage_abs_max == 2.0
    one = batch.BatchStats()
    batch.summarize(items[:1], one)
    assert (one.items, one.advantage_mean, one.advantage_std, one.advantage_abs_max) == (1, 0.5, 0.0, 0.5)


def test_train_items_carry_their_nodes_sampling_version() -> None:
    """Catches a train item stamped with the learner's current version instead of the sampling policy's (the
    old-logprob ratio and staleness are judged by it)."""
    t = _tree(_n("a", None, "reason", "g", 1.0, version=2), _n("b", None, "reason", "g", 0.0, version=3))
    batch.assign_advantages([t])
    items, _ = batch.collect_items([t], current_version=4, max_staleness=5)
    assert [(it.policy_version, it.group, it.advantage) for it in items] == [(2, "g", 0.5), (3, "g", -0.5)]


def test_refine_parent_baseline_leaves_out_an_edit_whose_parent_reward_failed() -> None:
    """Catches an edit of an image whose reward failed trained on its group advantage instead of left out."""
    img = np.zeros((1, 1, 3), np.uint8)
    t = _tree(_n("g", None, "generate", "gg", None, -1, image=img), _n("c", "g", "reflect", "cg", 1.0),
              _n("f1", "c", "refine", "fg", 1.0, image=img), _n("f2", "c", "refine", "fg", 0.0, image=img))
    batch.assign_advantages([t], refine_baseline="parent")
    assert (t.nodes["f1"].advantage, t.nodes["f2"].advantage) == (None, None)


# ================================================================ r3_rl/components.py
def _rewards_recipe(**kw: object) -> SimpleNamespace:
    reflect = SimpleNamespace(stop_correct=1.0, stop_flawed=-0.5, edit_correct=0.25, edit_flawed_unimproved=-0.125,
                              extra=["critique-spec"], correct_part="count")
    rewards = SimpleNamespace(task=["task-spec"], eval=["eval-spec"], reflect=reflect, format_weight=0.1,
                              reason_format="R", reflect_format="F", correct_threshold=0.75, max_failure_fraction=0.25)
    return SimpleNamespace(rewards=rewards, rollout=SimpleNamespace(reward_workers=0), **kw)


def test_components_scorer_shares_the_runs_failure_budget_and_the_reflect_settings(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches the scorer given its own failure budget (the trainer's check would never see a failure), the
    recipe's max_failure_fraction ignored, the critique rewards built from the task specs, or correct_part lost."""
    import r3_rl.components as cm
    from r3_rl.rewards.compose import CriticRule

    got: list[tuple] = []
    monkeypatch.setattr(cm, "StageScorer", lambda *a, **k: got.append((a, k)) or "scorer")
    c = cm.Components(_rewards_recipe(), tmp_path)
    c.__dict__["task_rewards"] = "task"
    built: list[object] = []
    monkeypatch.setattr(c, "_reward_set", lambda specs: built.append(specs) or "extra")
    assert c.scorer == "scorer"
    (a, k), = got
    assert a == ("task", 0.1, "R", "F", 0.75, CriticRule(1.0, -0.5, 0.25, -0.125), "extra", "count")
    assert built == [["critique-spec"]]
    assert k == {"failures": c.failures} and k["failures"] is c.failures
    assert (c.failures.max_fraction, c.failures.scored, c.failures.failed) == (0.25, 0, 0)


def test_components_task_and_eval_rewards_are_built_from_their_own_specs(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """Catches the eval rewards built from the task specs (a training reward scoring the held-out eval)."""
    import r3_rl.components as cm

    c = cm.Components(_rewards_recipe(), tmp_path)
    monkeypatch.setattr(c, "_reward_set", lambda specs: ("set", tuple(specs)))
    assert c.task_rewards == ("set", ("task-spec",))
    assert c.eval_rewards == ("set", ("eval-spec",))


def test_components_start_ray_for_learner_ranks_only_above_one(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """Catches a one-rank learner starting a Ray runtime it never uses."""
    import r3_rl.components as cm

    monkeypatch.setattr(cm, "build_learner", lambda policy, reference, recipe, algorithm: ("L", policy, reference))
    for ranks, starts in ((1, 0), (2, 1)):
        c = cm.Components(SimpleNamespace(learner=SimpleNamespace(ranks=ranks)), tmp_path)
        started: list[int] = []
        monkeypatch.setattr(c, "_start_ray", lambda: started.append(1))
        c.__dict__.update(policy="P", reference="R", algorithm="A")
        assert c.learner == ("L", "P", "R")
        assert len(started) == starts


def test_components_warm_start_the_policy_in_the_run_dirs_warmstart_folder(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    """Catches the warm-start cache written into the run dir itself."""
    import r3_rl.components as cm

    seen: list[tuple] = []
    pol = SimpleNamespace(warm_start=lambda recipe, folder, console: seen.append((recipe, folder, console)))
    monkeypatch.setattr(cm, "build_policy", lambda recipe: pol)
    rec = SimpleNamespace()
    c = cm.Components(rec, tmp_path, console="CON")
    assert c.policy is pol and c.policy is pol
    assert seen == [(rec, tmp_path / "warmstart", "CON")]


def test_components_reward_workers_get_their_count_threads_retries_and_gpus(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    """Catches the reward actors' worker count and threads per worker swapped."""
    import r3_rl.components as cm
    import r3_rl.rollout.ray_rewards as rrw

    monkeypatch.setattr(cm, "reward_specs", lambda recipe, specs: ("specs", tuple(specs)))
    monkeypatch.setattr(rrw, "RayRewardSet", lambda *a: ("ray-set",) + a)
    rec = _rewards_recipe(ray="RAYCFG")
    rec.rollout = SimpleNamespace(reward_workers=3, threads_per_worker=2, max_task_retries=5,
                                  gpus_per_reward_worker=0.5)
    c = cm.Components(rec, tmp_path, log_event=print)
    started: list[int] = []
    monkeypatch.setattr(c, "_start_ray", lambda: started.append(1))
    assert c.task_rewards == ("ray-set", ("specs", ("task-spec",)), 3, 2, print, "RAYCFG", 5, 0.5)
    assert started == [1]


def test_components_bind_the_policy_to_a_reward_set_only_when_it_asks(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """Catches the binding inverted: a self-consistency reward left without the policy, others given it."""
    import r3_rl.components as cm

    monkeypatch.setattr(cm, "reward_specs", lambda recipe, specs: specs)
    bound: list[tuple] = []
    for needs in (True, False):
        monkeypatch.setattr(cm.RewardSet, "from_specs", staticmethod(
            lambda specs, needs=needs: SimpleNamespace(needs_policy=needs,
                                                       bind_policy=lambda p, needs=needs: bound.append((needs, p)))))
        c = cm.Components(SimpleNamespace(), tmp_path)
        c.__dict__["policy"] = "the-policy"
        assert c._reward_set([]).needs_policy is needs
    assert bound == [(True, "the-policy")]


# ================================================================ r3_rl/trainer.py
def _bare_trainer(**attrs: object) -> object:
    import r3_rl.trainer as tm

    tr = tm.Trainer.__new__(tm.Trainer)
    tr.__dict__.update(attrs)
    return tr


def test_fill_buffer_takes_the_verdict_from_the_nodes_meta_not_its_reward() -> None:
    """Catches a parent's correct flag guessed from its reward instead of the task reward's stored verdict,
    or an entry field taken from the wrong place."""
    got: list[object] = []
    img = np.zeros((1, 1, 3), np.uint8)
    nodes = {"a": SimpleNamespace(id="a", image=img, image_tokens=[1, 2], reward=1.0, meta={"correct": False},
                                  round=0, segment="s"),
             "b": SimpleNamespace(id="b", image=img, image_tokens=None, reward=0.0, meta={"correct": True},
                                  round=1, segment="s"),
             "c": SimpleNamespace(id="c", image=img, image_tokens=None, reward=0.75, meta={}, round=0, segment="s")}
    tr = _bare_trainer(recipe=SimpleNamespace(tree=SimpleNamespace(max_round=2)),
                       buffer=SimpleNamespace(add_many=lambda entries: got.extend(entries)))
    tr._fill_buffer([SimpleNamespace(id="T", prompt="P", nodes=nodes)])
    assert [(e.source, e.correct, e.reward, e.round, e.prompt, e.image_tokens) for e in got] == [
        ("T/a", False, 1.0, 0, "P", [1, 2]), ("T/b", True, 0.0, 1, "P", None), ("T/c", False, 0.75, 0, "P", None)]


def test_run_eval_logs_at_the_step_it_is_given_else_the_current_one() -> None:
    """Catches run_eval ignoring its step argument (an eval logged at the wrong step)."""
    calls: list[tuple] = []
    tr = _bare_trainer(step=5, learner=SimpleNamespace(),
                       evaluator=SimpleNamespace(run=lambda name, step: calls.append((name, step)) or {"n": name}))
    assert tr.run_eval("x", step=3) == {"n": "x"}
    assert tr.run_eval("y") == {"n": "y"}
    assert tr.run_eval("z", step=0) == {"n": "z"}
    assert calls == [("x", 3), ("y", 5), ("z", 0)]


def test_the_reference_file_is_remembered_only_for_a_run_with_a_reference(tmp_path: Path) -> None:
    """Catches a checkpoint's reference file remembered (and linked into the next save) for a run whose
    reference is None (LoRA), or a missing file remembered."""
    ck = tmp_path / "step_000002"
    (ck / "state").mkdir(parents=True)
    tr = _bare_trainer(reference=None, reference_file="old")
    tr._remember_reference(ck)
    assert tr.reference_file is None
    tr.reference = object()
    tr._remember_reference(ck)
    assert tr.reference_file is None  # no file written there
    (ck / "state" / "reference.safetensors").write_bytes(b"")
    tr._remember_reference(ck)
    assert tr.reference_file == ck / "state" / "reference.safetensors"
    tr.reference = None
    tr._remember_reference(ck)
    assert tr.reference_file is None


def test_score_task_scores_only_unscored_sampled_images_then_composes_every_tree() -> None:
    """Catches a node scored twice (a parent image that came with its reward, or one scored already)."""
    seen: list[object] = []
    composed: list[str] = []
    tr = _bare_trainer(scorer=SimpleNamespace(score_images=lambda pairs: seen.extend((t.id, n.id) for t, n in pairs),
                                              compose=lambda tree: composed.append(tree.id)))
    img = np.zeros((1, 1, 3), np.uint8)
    a = SimpleNamespace(id="A", nodes={
        "new": SimpleNamespace(id="new", image=img, reward=None, segment="s"),
        "scored": SimpleNamespace(id="scored", image=img, reward=0.5, segment="s"),
        "parent": SimpleNamespace(id="parent", image=img, reward=None, segment=None),
        "text": SimpleNamespace(id="text", image=None, reward=None, segment="s")})
    b = SimpleNamespace(id="B", nodes={"zero": SimpleNamespace(id="zero", image=img, reward=0.0, segment="s"),
                                       "n2": SimpleNamespace(id="n2", image=img, reward=None, segment="s")})
    tr._score_task([a, b])
    assert seen == [("A", "new"), ("B", "n2")] and composed == ["A", "B"]


def test_events_log_keeps_every_event_with_its_step(tmp_path: Path) -> None:
    """Catches events.log rewritten per event (only the last one kept) or written without the step."""
    tr = _bare_trainer(run_dir=tmp_path, step=3, console=SimpleNamespace(enabled=False, print=lambda *a: None))
    tr.log_event("worker 1 restarted")
    tr.step = 4
    tr.log_event("task 7 reissued")
    lines = (tmp_path / "events.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["step 3 worker 1 restarted", "step 4 task 7 reissued"]
    assert all(len(line.split(" ", 1)[0]) == len("2026-01-01T00:00:00") for line in lines)


def test_sampling_weights_enter_the_optimisers_sampling_context_only_where_it_has_one() -> None:
    """Catches an optimiser without for_sampling (torch backend, learner ranks) asked for it."""
    import contextlib

    policy = SimpleNamespace(model="M")
    for learner in (SimpleNamespace(), SimpleNamespace(optim=None), SimpleNamespace(optim=SimpleNamespace())):
        ctx = _bare_trainer(learner=learner, policy=policy).sampling_weights()
        assert isinstance(ctx, contextlib.nullcontext)
    asked: list[object] = []
    optim = SimpleNamespace(for_sampling=lambda models: asked.append(models) or "ctx")
    assert _bare_trainer(learner=SimpleNamespace(optim=optim), policy=policy).sampling_weights() == "ctx"
    assert asked == [["M"]]


def _rollout_trainer(monkeypatch: pytest.MonkeyPatch, schedule: str, calls: list[tuple]) -> object:
    import r3_rl.trainer as tm

    monkeypatch.setattr(tm, "plan_tasks", lambda *a, **k: calls.append(("plan", a, k)) or ["task"])
    monkeypatch.setattr(tm, "run_ordered", lambda engine, tasks, sampling, on_task: calls.append(
        ("run", engine, tasks, sampling)) or ["tree"])
    tree = SimpleNamespace(schedule=schedule, prompts_per_step=3, refine_groups_per_step=2,
                           correct_parent_fraction=0.25, parent_balance="tag", group_size=4)
    tr = _bare_trainer(recipe=SimpleNamespace(seed=11, tree=tree, rollout=SimpleNamespace(groups_per_task=5,
                                                                                         backend="ray")),
                       data=SimpleNamespace(next_batch=lambda n: calls.append(("prompts", n)) or ["p"] * n),
                       buffer=SimpleNamespace(sample=lambda *a: calls.append(("parents", a[:2], a[3])) or ["e"],
                                              clear=lambda: calls.append(("clear",))),
                       rng="RNG", sampling="S", parts=SimpleNamespace(engine="ENG"),
                       failures=SimpleNamespace(check=lambda: calls.append(("check",))))
    tr._fill_buffer = lambda trees: calls.append(("fill", trees))
    return tr


def test_rollout_asks_for_each_stages_inputs_and_checks_the_failure_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches prompts drawn on a B+C-only step, the parent draw's correct fraction or the task plan's step and
    seed swapped, or the reward-failure check skipped."""
    calls: list[tuple] = []
    tr = _rollout_trainer(monkeypatch, "alternate", calls)
    assert tr.rollout(1) == ["tree"]  # alternate, odd step: stages B+C only
    assert calls == [("parents", (2, 0.25), "tag"), ("plan", (1, 11, [], ["e"], 4), {"groups_per_task": 5}),
                     ("run", "ENG", ["task"], "S"), ("check",)]
    calls.clear()
    assert tr.rollout(2) == ["tree"]  # alternate, even step: stage A only, the buffer refilled from it
    assert calls == [("prompts", 3), ("plan", (2, 11, ["p"] * 3, [], 4), {"groups_per_task": 5}),
                     ("run", "ENG", ["task"], "S"), ("check",), ("clear",), ("fill", ["tree"])]


def test_a_lost_cluster_is_an_event_and_says_where_to_continue(tmp_path: Path) -> None:
    """Catches the stop left out of events.log, or the resume hint lost from the error."""
    from r3_rl.ray_actors import ClusterError

    events: list[str] = []
    closed: list[int] = []
    tr = _bare_trainer(run_dir=tmp_path)
    tr.log_event, tr.close = events.append, lambda: closed.append(1)

    def lost() -> None:
        raise ClusterError("2 of 4 rollout workers lost")
    tr._train = lost
    with pytest.raises(ClusterError) as e:
        tr.train()
    assert str(e.value) == "2 of 4 rollout workers lost; no checkpoint to continue from yet (set save_every)"
    assert events == ["stopped: 2 of 4 rollout workers lost"] and closed == [1]


def test_environment_changes_past_six_are_counted_in_the_event(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """Catches the changes beyond the sixth dropped from the resume event without a count."""
    import r3_rl.environment as envm

    changed = [f"c{i}" for i in range(8)]
    monkeypatch.setattr(envm, "record_environment", lambda run_dir, kind, started_in: ({}, changed))
    monkeypatch.setattr(envm, "summary_line", lambda env: "")
    events: list[str] = []
    tr = _bare_trainer(run_dir=tmp_path, resumed_from=None, console=SimpleNamespace(print=lambda *a: None))
    tr.log_event = events.append
    tr._record_environment()
    assert events == ["resumed in another environment than the run started in (c0; c1; c2; c3; c4; c5; 2 more; "
                      "environment.json): it goes on, but its numbers will not match an uninterrupted run's bit "
                      "for bit"]


def test_sample_chains_seed_moves_with_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches every step's logged chains drawn with one seed (the same chains every time for a fixed policy)."""
    import contextlib

    import r3_rl.eval.evaluate as evm
    import r3_rl.rollout.chain as chm

    seen: list[tuple] = []
    monkeypatch.setattr(chm, "r3_chains", lambda policy, prompts, sampling, rounds, stop, seed, tag:
                        seen.append((prompts, rounds, stop, seed, tag)) or ["c"])
    monkeypatch.setattr(evm, "score_chains", lambda chains, rounds, rewards, threshold:
                        seen.append((chains, rounds, rewards, threshold)))
    tr = _bare_trainer(policy="P", sampling="S", eval_rewards="EV", sampling_weights=contextlib.nullcontext,
                       recipe=SimpleNamespace(seed=2, log=SimpleNamespace(chains=1),
                                              tree=SimpleNamespace(refine_groups_per_step=1, max_round=3),
                                              templates=SimpleNamespace(stop_phrase="stop"),
                                              rewards=SimpleNamespace(correct_threshold=0.5)))
    trees = [SimpleNamespace(prompt="pA", meta={"kind": "A"})]
    tr._sample_chains(0, trees)
    tr._sample_chains(5, trees)
    assert seen == [(["pA"], 3, "stop", 2_000_006, "chain-s0"), (["c"], 3, "EV", 0.5),
                    (["pA"], 3, "stop", 2_000_011, "chain-s5"), (["c"], 3, "EV", 0.5)]
