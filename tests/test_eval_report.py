"""Per-round evaluation: exact report maths, and an end-to-end `r3-rl eval` of the tiny Blocks recipe whose table
is checked against scoring the dumped PNGs independently (Blocks detector + GenEval rules, no eval code)."""
from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_overrides
from r3_rl.cli import main
from r3_rl.eval.evaluate import markdown_table, score_chains, summarise
from r3_rl.rewards.registry import FunctionReward
from r3_rl.rewards.reward_set import RewardSet, WeightedReward
from r3_rl.trajectory import read_trees
from test_tracking_inspect import chain


def test_summarise_exact() -> None:
    trees = [chain(i, [0.0, 0.0, 1.0], None) for i in range(4)]
    correct = [
        [False, True, True],   # counting: improved in round 1
        [True, False, None],   # colors: worse in round 1, eval reward failed in round 2
        [False, False, True],  # counting: improved in round 2
        [True, True, True],    # colors
    ]
    rep = summarise(trees, correct, 2)
    assert rep["accuracy"] == pytest.approx([0.5, 0.5, 1.0])  # round 2: 3 of 3 scored
    assert rep["per_tag"] == {"colors": pytest.approx([1.0, 0.5, 1.0]), "counting": pytest.approx([0.0, 0.5, 1.0])}
    assert rep["tag_counts"] == {"colors": 2, "counting": 2}
    assert rep["transitions"] == [{"round": 1, "improved": 1, "worse": 1, "unchanged": 2},
                                  {"round": 2, "improved": 1, "worse": 0, "unchanged": 2}]
    assert rep["failed"] == [0, 0, 1]
    assert rep["stop_rate"] == 0.0 and rep["mean_rounds_used"] == 2.0
    md = markdown_table(rep)
    assert "| colors | 2 | 1.000 | 0.500 | 1.000 |" in md
    assert "| **overall** | 4 | **0.500** | **0.500** | **1.000** |" in md
    assert "| improved / worse / unchanged | | - | 1 / 1 / 2 | 1 / 0 / 2 |" in md


def test_geneval_overall_score_is_the_mean_of_tags() -> None:
    """GenEval's summary_scores.py headlines "Overall score (avg. over tasks)" = mean of per-tag accuracies;
    the mean over images is its "% correct images".  One counting prompt right, three colors prompts wrong:
    0.5 as GenEval reports it, 0.25 over prompts (session 34's audit: only the latter was reported)."""
    trees = [chain(i, [0.0], None) for i in (0, 1, 3, 5)]  # even i: counting, odd: colors
    rep = summarise(trees, [[True], [False], [False], [False]], 0)
    assert rep["accuracy"] == pytest.approx([0.25]) and rep["accuracy_tag_mean"] == pytest.approx([0.5])
    assert "| mean of tags (GenEval's overall score) | | 0.500 |" in markdown_table(rep)
    # a tag whose every eval reward failed has no accuracy: a mean over the other tags is not GenEval's overall
    # score (until 2026-12-06 it was reported as one, 1.0 here, over one tag of two)
    rep = summarise(trees, [[True], [None], [None], [None]], 0)
    assert math.isnan(rep["accuracy_tag_mean"][0]) and rep["accuracy"] == [1.0]


def test_score_chains_carries_images_forward_after_a_stop() -> None:
    seen: list[float] = []

    def brightness(samples, **_):  # noqa: ANN001 - reward plug-in signature
        out = [float(s.image.mean()) / 100 for s in samples]
        seen.extend(out)
        return out

    rewards = RewardSet([WeightedReward(FunctionReward(brightness, "bright"), 1.0)])
    t0 = chain(5, [0, 0, 0], None)  # img0 = 100, img1 = 101, img2 = 102 -> 1.00, 1.01, 1.02
    t1 = chain(0, [0, 0, 0], 1)  # stops in round 1: img0 (= 0) stands for every round
    correct = score_chains([t0, t1], 2, rewards, correct_threshold=1.005)
    assert correct == [[False, True, True], [False, False, False]]
    assert len(seen) == 4  # each distinct image scored once
    assert t0.nodes["img2"].meta["eval_score"] == pytest.approx(1.02)


# ---------------------------------------------------------------------------------------------- end to end

def _table(md: str) -> dict[str, list[float]]:
    """The accuracy table (the first table of the report) as {row label: values}."""
    rows = {}
    for line in md.strip().split("\n\n")[0].splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and re.fullmatch(r"[01]\.\d{3}", cells[2] or ""):
            rows[cells[0]] = [float(c) for c in cells[2:]]
    return rows


@pytest.fixture()
def mixed_critiques(monkeypatch: pytest.MonkeyPatch) -> None:
    """An untrained tiny policy almost always "stops"; make a third of the prompts stop and the rest ask for an
    edit, so the eval exercises refinement, carried-forward images and transitions."""
    from r3_rl.policy.base import TextSample
    from r3_rl.policy.tiny import TinyUnifiedPolicy

    original = TinyUnifiedPolicy.reflect

    def reflect(self, prompts, images, sampling, generator=None):  # noqa: ANN001
        out = original(self, prompts, images, sampling, generator)
        fixed = []
        for p, s in zip(prompts, out):
            stop = zlib.crc32(p.prompt.encode()) % 3 == 0
            fixed.append(TextSample("<think> look </think> " + ("no further edit needed" if stop else "move left"),
                                    s.segment))
        return fixed

    monkeypatch.setattr(TinyUnifiedPolicy, "reflect", reflect)


def test_eval_cli_table_matches_independent_scoring(tmp_path: Path, repo: Path, mixed_critiques: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from r3_rl.config import load_recipe
    from r3_rl.policy.registry import build_policy
    from r3_rl.rewards.blocks import score_image

    sets = [o for o in tiny_overrides(tmp_path, steps=0) if not o.startswith("eval.rounds")]
    sets += ["eval.rounds=2", "data.eval_size=12"]
    ckpt = tmp_path / "ckpt"
    build_policy(load_recipe(repo / "recipes" / "tiny_blocks.yaml", sets)).save_pretrained(str(ckpt))
    run = tmp_path / "evalrun"
    argv = ["eval", str(repo / "recipes" / "tiny_blocks.yaml"), "--checkpoint", str(ckpt), "--run-dir", str(run)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out

    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["prompts"] == 12 and report["rounds"] == 2
    assert _table(printed) == _table((run / "eval" / "eval.md").read_text())

    # independent re-scoring of the dumped PNGs: image standing after round r = latest img<k> with k <= r
    trees = list(read_trees(run / "eval" / "eval_trajectories.jsonl"))
    assert len(trees) == 12
    correct, tags, stops = [], [], []
    for t in trees:
        row, cur = [], None
        for r in range(3):
            cur = t.nodes.get(f"img{r}", cur)
            row.append(bool(score_image(cur.image, t.prompt.metadata).correct))
        correct.append(row)
        tags.append(t.prompt.metadata["tag"])
        stops.append(any(n.stop for n in t.nodes.values()))
    correct_arr = np.array(correct)
    assert 0 < sum(stops) < 12  # both stopping and refining chains were evaluated
    expected = {"overall": correct_arr.mean(0)}
    for tag in set(tags):
        expected[tag] = correct_arr[[i for i, g in enumerate(tags) if g == tag]].mean(0)
    expected["mean of tags (GenEval's overall score)"] = np.mean([expected[tag] for tag in set(tags)], axis=0)
    table = _table(printed)
    assert set(table) == set(expected)
    for key, vals in expected.items():
        assert table[key] == pytest.approx(np.round(vals, 3).tolist(), abs=1e-9), key
    assert report["accuracy"] == pytest.approx(expected["overall"].tolist())
    for r in (1, 2):
        imp = int(np.sum(~correct_arr[:, r - 1] & correct_arr[:, r]))
        worse = int(np.sum(correct_arr[:, r - 1] & ~correct_arr[:, r]))
        assert report["transitions"][r - 1] == {"round": r, "improved": imp, "worse": worse,
                                                "unchanged": 12 - imp - worse}
    assert report["stop_rate"] == pytest.approx(sum(stops) / 12)
    assert report["mean_rounds_used"] == pytest.approx(
        sum(sum(n.stage == "reflect" for n in t.nodes.values()) for t in trees) / 12)

    # understanding: every critique against the independent verdict on the image it critiqued
    tally = {"stop_ok": 0, "correct": 0, "edit_ok": 0, "flawed": 0}
    for t in trees:
        for n in t.nodes.values():
            if n.stage == "reflect":
                ok = bool(score_image(t.nodes[n.parent].image, t.prompt.metadata).correct)
                tally["correct" if ok else "flawed"] += 1
                tally["stop_ok" if ok else "edit_ok"] += (n.stop if ok else not n.stop)
    v = report["understanding"]["verdict"]["overall"]
    assert (v["correct_images"], v["flawed_images"]) == (tally["correct"], tally["flawed"])
    assert v["balanced_accuracy"] == pytest.approx((tally["stop_ok"] / tally["correct"]
                                                    + tally["edit_ok"] / tally["flawed"]) / 2)
    ref = report["understanding"]["reference"]
    assert ref["images"] == 2 * 96 and ref["failed"] == 0  # eval.understanding.reference_size pairs
    assert ref["verdict"]["overall"]["correct_images"] == ref["verdict"]["overall"]["flawed_images"] == 96
    assert report["understanding"]["yes_no"]["available"] and report["understanding"]["yes_no"]["questions"] > 12
    assert "**verdict balanced accuracy**" in printed

    # ... and the same numbers in TensorBoard
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    for r in range(3):
        (ev,) = acc.Scalars(f"0_eval/accuracy_round{r}")
        assert ev.value == pytest.approx(expected["overall"][r], abs=1e-6) and ev.step == 0
    assert "eval/table/text_summary" in acc.Tags()["tensors"] and "eval_trajectories/0" in acc.Tags()["images"]
    assert (run / "eval" / "eval.html").is_file()


def test_mean_eval_score_is_tiifs_share_of_questions_right() -> None:
    """TIIF-Bench's headline pools questions (correct / total per type); the eval's ``accuracy`` counts a prompt
    only when every question is right.  Fractional scores (vlm_judge's share of questions right) are reported
    as ``score_mean`` beside it, per round and tag; failures stay out of both and are named in the table."""
    trees = [chain(i, [0.0, 0.0], None) for i in range(4)]  # even i: counting, odd: colors
    scores = [[0.75, 1.0], [0.5, None], [1.0, 1.0], [0.25, 0.5]]
    correct = [[None if s is None else s >= 1.0 for s in row] for row in scores]
    rep = summarise(trees, correct, 1, scores)
    assert rep["accuracy"] == pytest.approx([0.25, 2 / 3])
    assert rep["score_mean"] == pytest.approx([(0.75 + 0.5 + 1.0 + 0.25) / 4, (1.0 + 1.0 + 0.5) / 3])
    assert rep["score_mean_per_tag"] == {"colors": pytest.approx([0.375, 0.5]),
                                         "counting": pytest.approx([0.875, 1.0])}
    rep["prompt_pool"] = 277
    md = markdown_table(rep)
    assert "| mean eval score | | 0.625 | 0.833 |" in md
    assert "4 of 277 prompts (a seeded subset" in md and "eval reward failures per round, left out" in md
    assert "0 / 1" in md
    binary = summarise(trees, [[True, True], [False, False], [True, True], [False, False]], 1,
                       [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert "mean eval score" not in markdown_table(binary)  # equal to accuracy: no second row


def test_mean_eval_score_is_logged_only_where_it_is_not_the_accuracy() -> None:
    from r3_rl.tracking.metrics import eval_metrics

    trees = [chain(i, [0.0], None) for i in range(2)]
    fractional = summarise(trees, [[False], [True]], 0, [[0.5], [1.0]])
    assert eval_metrics(fractional)["eval/score_mean/round0"] == pytest.approx(0.75)
    binary = summarise(trees, [[False], [True]], 0, [[0.0], [1.0]])
    assert not any(k.startswith("eval/score_mean") for k in eval_metrics(binary))  # no duplicate of accuracy


def test_an_eval_reward_failure_fails_its_image_says_why_and_stops_past_the_budget() -> None:
    """A detector crash on one image: that image alone fails (it used to fail every image of the call, and the eval
    printed NaN with exit 0), the report says why, refinement is the paired change over the prompts scored in
    both rounds, and an eval whose reward fails on more than rewards.max_failure_fraction of its images stops."""
    from r3_rl.eval.evaluate import check_failures
    from r3_rl.eval.synergy import synergy_figures
    from r3_rl.rewards.reward_set import RewardFailureError

    def detector(samples, **_):  # noqa: ANN001 - reward plug-in signature
        if any(int(s.image[0, 0, 0]) == 41 for s in samples):  # tree 2's refined image
            raise RuntimeError("Mask2Former: boxes out of range")
        return [1.0 if int(s.image[0, 0, 0]) % 2 else 0.0 for s in samples]

    trees = [chain(i, [0.0, 0.0], None) for i in range(4)]  # img0 = 20 i, img1 = 20 i + 1
    rewards = RewardSet([WeightedReward(FunctionReward(detector, "geneval"), 1.0)])
    correct = score_chains(trees, 1, rewards, correct_threshold=1.0)
    assert correct == [[False, True], [False, True], [False, None], [False, True]]
    assert trees[2].nodes["img1"].meta["eval_failure"] == "geneval: RuntimeError: Mask2Former: boxes out of range"
    rep = summarise(trees, correct, 1)
    assert rep["failed"] == [0, 1]
    assert rep["failure_reasons"] == {"geneval: RuntimeError: Mask2Former: boxes out of range": 1}
    assert "1 x geneval: RuntimeError: Mask2Former: boxes out of range" in markdown_table(rep)
    fig = synergy_figures(rep, rep)
    assert fig["refinement_after"] == pytest.approx(1.0)  # 3 of 3 pairs improved
    rep["accuracy"] = [0.25, 1.0]  # had the first round's denominator been 4 and the last's 3
    assert synergy_figures(rep, rep)["refinement_after"] == pytest.approx(1.0)
    check_failures(rep, 0.2, "step_5")  # 1 of 8 images
    with pytest.raises(RewardFailureError, match=r"^eval step_5: the eval reward failed on 1/8 images \(12% > "
                                                 r"rewards.max_failure_fraction=0.1\); most often: geneval: "
                                                 r"RuntimeError: Mask2Former"):
        check_failures(rep, 0.1, "step_5")


def test_understanding_batches_are_bounded_by_eval_batch_size(repo: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The yes/no questions and the reference set's critiques ran 256 rows at a time whatever eval.batch_size
    said: the GPU is sized for eval.batch_size (r3-rl plan; Janus-Pro-7B recipes use 4)."""
    from r3_rl.blocks.prompts import heldout_prompts
    from r3_rl.blocks.reference import reference_pairs
    from r3_rl.config import load_recipe
    from r3_rl.eval.evaluate import evaluate
    from r3_rl.policy.registry import build_policy
    from r3_rl.policy.tiny import TinyUnifiedPolicy
    from r3_rl.rollout.tree_rl import stage_sampling

    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path))
    policy = build_policy(recipe)
    rows: dict[str, list[int]] = {"answer_yes_no": [], "reflect": []}
    for name in rows:
        real = getattr(TinyUnifiedPolicy, name)
        monkeypatch.setattr(TinyUnifiedPolicy, name, lambda self, first, *a, _real=real, _name=name, **kw:
                            rows[_name].append(len(first)) or _real(self, first, *a, **kw))
    prompts = heldout_prompts(24, seed=0)
    rewards = RewardSet.from_specs([{"name": "blocks", "options": {"binary": True}}])
    report, _ = evaluate(policy, prompts, stage_sampling(recipe, eval_mode=True), 1, recipe.templates.stop_phrase,
                         rewards, references=reference_pairs(prompts, 0, 4, 4), batch_size=3)
    assert report["understanding"]["yes_no"]["available"]
    assert sum(rows["answer_yes_no"]) > 3 and max(rows["answer_yes_no"]) <= 3
    assert sum(rows["reflect"]) > 24 and max(rows["reflect"]) <= 3


def test_the_eval_dump_spreads_over_the_tags_of_a_sorted_prompt_file() -> None:
    """GenEval's 553 prompts are sorted by tag: the first 64 are all single_object, which every eval dump, HTML page
    and `r3-rl inspect --eval` showed.  The dump takes the tags in turn, in file order, the same pick every eval."""
    from collections import Counter

    from r3_rl.data import held_out_subset, load_prompts
    from r3_rl.eval.evaluate import spread_over_tags
    from r3_rl.trajectory import Tree

    prompts = held_out_subset(load_prompts("geneval", "geneval:test553"), 553, 0)
    trees = [Tree(id=f"eval-{i}", prompt=p) for i, p in enumerate(prompts)]
    assert Counter(t.prompt.tag for t in trees[:64]) == {"single_object": 64}
    sample = spread_over_tags(trees, 64)
    counts = Counter(t.prompt.tag for t in sample)
    assert len(sample) == 64 and len(counts) == len({t.prompt.tag for t in trees}) == 6
    assert max(counts.values()) - min(counts.values()) <= 1  # 64 over 6 tags: 11, 11, 11, 11, 10, 10
    order = [int(t.id.split("-")[1]) for t in sample]
    assert order == sorted(order) and [t.id for t in spread_over_tags(trees, 64)] == [t.id for t in sample]
    assert spread_over_tags(trees[:5], 64) == trees[:5]  # fewer chains than the dump: all of them
