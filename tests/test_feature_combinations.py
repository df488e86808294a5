"""Recipes a user can write that passed validation and then stopped with a traceback (found by an audit that ran
about 120 short runs over policy x feature combinations, 2026-12-06).  Each now trains: a short run through the
CLI, exit 0, finite losses."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from r3_rl.cli import main


def _train(recipe: Path, run: Path, sets: list[str]) -> list[dict]:
    assert main(["train", str(recipe), "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "learner/loss" in r]
    assert steps and all(math.isfinite(r["learner/loss"]) for r in steps)
    return steps


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 11, 20])
def test_a_short_warm_start_keeps_a_whole_warm_up_step(steps: int) -> None:
    """``warmstart.steps: 10`` divided by zero in OneCycleLR (its warm-up ended at 10% x 10 - 1 = step 0); the
    learning rate now stays within (0, lr], and from 20 steps on it is OneCycleLR's own 10% schedule (the demo's
    1500 steps included: its figures are unchanged)."""
    from r3_rl.policy.warmstart import one_cycle

    def lrs(make) -> list[float]:
        opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=3e-3)
        sched, out = make(opt), []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: one_cycle(opt, 3e-3, steps))
    assert all(0 < lr <= 3e-3 for lr in ours)
    if steps >= 20:
        assert ours == lrs(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps,
                                                                           pct_start=0.1))
    for big in (20, 1500):
        opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=3e-3)
        assert one_cycle(opt, 3e-3, big).total_steps == big


def test_modality_experts_take_lora_on_each_copy(tmp_path: Path) -> None:
    """``policy.tiny.experts: modality`` makes ``q_proj`` a container of a text and an image copy, which peft
    refused ("Target module ModalityExperts ... is not supported"): each copy now gets its adapter."""
    from r3_rl.config import load_recipe
    from r3_rl.learner.lora import lora_targets
    from r3_rl.policy.registry import build_policy

    sets = tiny_overrides(tmp_path) + ["policy.tiny.experts=modality", "learner.lora={r: 4}"]
    targets = lora_targets(build_policy(load_recipe(REPO / "recipes" / "tiny_blocks.yaml", sets)),
                           load_recipe(REPO / "recipes" / "tiny_blocks.yaml", sets).learner.lora)
    assert {t.rsplit(".", 2)[-2:][0] + "." + t.rsplit(".", 1)[-1] for t in targets} == {
        f"{p}.{copy}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for copy in ("text", "image")}
    _train(REPO / "recipes" / "tiny_blocks.yaml", tmp_path / "run", sets)


@pytest.mark.parametrize("policy", ["tiny_flow", "janus"])
def test_zero3_in_the_trainer_process_samples_and_trains(policy: str, tmp_path: Path) -> None:
    """One learner rank under ZeRO-3 makes the trainer's own policy the partitioned module, whose weights DeepSpeed
    gathers only while a module is called.  Two reads of a weight failed on the empty shard before step 0's eval:
    tiny_flow's velocity head read its cell embedding's weight (``mat1 and mat2 shapes cannot be multiplied``; now
    called), and transformers' Janus VQ quantizer reads its codebook's (``shape '[2, 4, 4, 0]' is invalid``; the
    trainer now samples with the weights gathered, ``Trainer.sampling_weights``, and the parent buffer's decode
    of a drawn parent reads the codebook inside ``r3_rl.policy.zero3.gathered``)."""
    pytest.importorskip("deepspeed")
    zero3 = ["learner.backend=deepspeed", "learner.deepspeed.zero_stage=3", "learner.deepspeed.dtype=fp32",
             "threads=1"]
    if policy == "tiny_flow":
        sets = tiny_overrides(tmp_path) + ["warmstart.steps=4"] + zero3
        _train(REPO / "recipes" / "tiny_flow_blocks.yaml", tmp_path / "run", sets)
        return
    from r3_rl.policy.janus_tiny import make_tiny_janus

    janus = make_tiny_janus(tmp_path / "janus")
    (tmp_path / "my_reward.py").write_text(
        "def brightness(samples):\n    return [float(s.image.mean()) / 255.0 for s in samples]\n")
    reward = f"{tmp_path / 'my_reward.py'}:brightness"
    sets = [f"policy.model={janus}", "policy.device=cpu", "policy.dtype=float32", f"out_dir={tmp_path}", "steps=2",
            "data.eval_size=2", "tree.group_size=2", "tree.prompts_per_step=1", "tree.refine_groups_per_step=1",
            "rollout.reason.max_new_tokens=6", "rollout.reflect.max_new_tokens=6", "eval.rounds=1",
            "learner.micro_batch_size=2", "log.console=false", "rollout.backend=local", "learner.ranks=1",
            "eval.batch_size=2", f"rewards.task=[{{name: '{reward}'}}]", f"rewards.eval=[{{name: '{reward}'}}]",
            *zero3]
    _train(REPO / "recipes" / "grpo_geneval.yaml", tmp_path / "run", sets)
