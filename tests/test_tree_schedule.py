"""``tree.schedule``: "together" (both stages every step, parents from a buffer of many steps) or "alternate"
(the reference's, sen-ye/R3 ``online_rl.py``: stage A on even steps, whose first images replace the buffer; stages
B+C on odd steps, on parents from the step before)."""
from __future__ import annotations

import json

import pytest
from conftest import REPO, cli_one_line_error, tiny_overrides

from r3_rl.rollout.tree_rl import stages_at

RECIPE = REPO / "recipes" / "tiny_blocks.yaml"


def test_stages_at_exact_cases() -> None:
    assert [stages_at("together", s) for s in range(3)] == [(True, True)] * 3
    assert [stages_at("alternate", s) for s in range(4)] == [(True, False), (False, True), (True, False),
                                                             (False, True)]
    with pytest.raises(ValueError, match="valid: together, alternate"):
        stages_at("sometimes", 0)


def _kinds(trees) -> set[str]:
    return {t.meta["kind"] for t in trees}


def test_alternate_runs_one_stage_a_step_and_critiques_only_the_last_stage_a_images(tmp_path) -> None:
    from r3_rl.config import load_recipe
    from r3_rl.trainer import Trainer

    recipe = load_recipe(RECIPE, tiny_overrides(tmp_path, steps=4) + ["tree.schedule=alternate",
                                                                      "tree.refine_groups_per_step=3"])
    trainer = Trainer(recipe, tmp_path / "run")
    try:
        served = []
        next_batch = trainer.data.next_batch
        trainer.data.next_batch = lambda n: served.append(n) or next_batch(n)  # type: ignore[method-assign]
        a0 = trainer.rollout(0)
        assert _kinds(a0) == {"A"} and len(a0) == 2 and served == [2]
        first_images = {f"{t.id}/{n.id}" for t in a0 for n in t.nodes.values() if n.image is not None}
        held = {s.source for pool in (trainer.buffer.correct, trainer.buffer.flawed) for s in pool}
        assert held and held <= first_images  # only this step's first images, none refined
        bc1 = trainer.rollout(1)
        assert _kinds(bc1) == {"BC"} and len(bc1) == 3 and served == [2]  # no prompts drawn for a B+C step
        assert {t.meta["parent"] for t in bc1} <= first_images
        assert {s.source for pool in (trainer.buffer.correct, trainer.buffer.flawed) for s in pool} == held
        a2 = trainer.rollout(2)
        assert _kinds(a2) == {"A"} and served == [2, 2]
        now = {s.source for pool in (trainer.buffer.correct, trainer.buffer.flawed) for s in pool}
        assert now and not now & held and all(s.startswith("s2-") for s in now)  # step 0's images are gone
    finally:
        trainer.close()


def test_together_keeps_both_stages_and_refined_parents(tmp_path) -> None:
    from r3_rl.config import load_recipe
    from r3_rl.trainer import Trainer

    recipe = load_recipe(RECIPE, tiny_overrides(tmp_path, steps=2))
    trainer = Trainer(recipe, tmp_path / "run")
    try:
        trainer.rollout(0)
        first = {s.source for pool in (trainer.buffer.correct, trainer.buffer.flawed) for s in pool}
        assert _kinds(trainer.rollout(1)) == {"A", "BC"}
        after = {s.source for pool in (trainer.buffer.correct, trainer.buffer.flawed) for s in pool}
        assert first < after  # the buffer keeps step 0's parents and adds step 1's (refined images included)
    finally:
        trainer.close()


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_alternate_trains_through_the_cli_with_either_algorithm(tmp_path, algorithm: str) -> None:
    from r3_rl.cli import main

    run = tmp_path / "run"
    sets = tiny_overrides(tmp_path, steps=3) + ["tree.schedule=alternate", f"learner.algorithm={algorithm}",
                                                "log.trajectories_every=4"]
    if algorithm == "ppo":  # PPO's value head is its baseline
        sets.append("learner.refine_baseline=group")
    assert main(["train", str(RECIPE), "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "batch/items" in r}
    assert sorted(steps) == [0, 1, 2]
    assert "groups/generate/total" in steps[0] and "groups/reflect/total" not in steps[0]
    assert "groups/reflect/total" in steps[1] and "groups/generate/total" not in steps[1]
    # the parents' shortcut figures only where parents are drawn; trajectories of a logging step and its B+C step
    assert "3_understanding/shortcut_tag" in steps[1] and not any("shortcut" in k for k in steps[0] | steps[2])
    assert sorted(p.name for p in (run / "trajectories").glob("step_*.jsonl")) == ["step_000000.jsonl",
                                                                                 "step_000001.jsonl"]


def test_alternate_without_critic_groups_is_one_line(tmp_path, capsys) -> None:
    line = cli_one_line_error(["train", str(RECIPE), "--set", "tree.schedule=alternate", "--set",
                               "tree.refine_groups_per_step=0", "--set", f"out_dir={tmp_path}"], capsys)
    assert "tree" in line and "refine_groups_per_step must be >= 1" in line
    assert not list(tmp_path.iterdir())  # before any work: no run dir
