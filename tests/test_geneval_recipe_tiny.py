"""The real-use recipe, ``recipes/grpo_geneval.yaml``, run end to end with its models swapped for tiny ones.

Janus policy, GenEval reward on a Mask2Former detector with CLIP colours -- all built from configs,
saved with ``save_pretrained`` and loaded through the real ``from_pretrained`` paths.  A custom reward
from a temp file joins the task reward, as a user would plug one in.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from r3_rl.cli import main
from r3_rl.policy.janus_tiny import make_tiny_janus
from tiny_vision import save_tiny_clip, save_tiny_mask2former

pytest.importorskip("scipy")  # a declared dependency; transformers' Mask2Former imports it

RECORDS = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                   "position": ["left of", 0]}],
     "prompt": "a photo of a cat left of a dog"},
]

CUSTOM = '''
def brightness(samples, *, scale=1.0):
    """A user's reward: mean brightness of the image (differs between siblings, so groups carry signal)."""
    return [scale * float(s.image.mean()) / 255.0 for s in samples]
'''


def test_grpo_geneval_recipe_trains_two_steps_on_tiny_models(repo: Path, tmp_path: Path, ray_session) -> None:
    """The shipped recipe as it is -- Ray rollout workers, a DeepSpeed learner, gradient checkpointing -- on CPU:
    one CPU worker instead of four GPU ones, one in-process learner rank (ranks on Ray actors are tested in
    test_learner_ranks), fp32 instead of bf16 (bf16 weights need the reference isolated from DeepSpeed)."""
    janus = make_tiny_janus(tmp_path / "janus")
    m2f = save_tiny_mask2former(tmp_path / "m2f", ["cat", "dog"])
    clip = save_tiny_clip(tmp_path / "clip")
    data = tmp_path / "geneval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    custom = tmp_path / "my_reward.py"
    custom.write_text(CUSTOM)
    det = {"detector": "mask2former", "model": m2f, "clip_model": clip, "device": "cpu", "threshold": 0.0}
    task = [{"name": "geneval", "weight": 1.0, "options": det},
            {"name": f"{custom}:brightness", "weight": 0.5, "options": {"scale": 1.0}}]
    sets = [f"policy.model={janus}", "policy.device=cpu", "policy.dtype=float32", f"out_dir={tmp_path}",
            "steps=2", "save_every=1", f"data.train={data}", f"data.eval={data}", "data.eval_size=2",
            "tree.group_size=2", "tree.prompts_per_step=1", "tree.refine_groups_per_step=1",
            "rollout.reason.max_new_tokens=6", "rollout.reflect.max_new_tokens=6", "eval.rounds=1",
            "learner.micro_batch_size=2", "log.trajectories_every=1", "log.console=false",
            "rollout.workers=1", "rollout.gpus_per_worker=0", "rollout.cpus_per_worker=1", "learner.ranks=1",
            "learner.deepspeed.dtype=fp32", "eval.batch_size=2",
            f"rewards.task={yaml.safe_dump(task, default_flow_style=True).strip()}",
            f"rewards.eval={yaml.safe_dump([{'name': 'geneval', 'options': {**det, 'binary': True}}], default_flow_style=True).strip()}"]
    run = tmp_path / "run"
    argv = ["train", str(repo / "recipes" / "grpo_geneval.yaml"), "--run-dir", str(run)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "learner/loss" in r]
    assert [r["step"] for r in steps] == [0, 1] and all(math.isfinite(r["learner/loss"]) for r in steps)
    assert all(r["rollout/failed_rewards"] == 0 and r["batch/items"] > 0 for r in steps)
    dump = [json.loads(line) for line in (run / "trajectories" / "step_000000.jsonl").read_text().splitlines()]
    images = [n for t in dump for n in t["nodes"] if n["stage"] == "generate"]
    assert images and all({"geneval", "brightness"} <= set(n["rewards"]) for n in images)
    assert (run / "checkpoints" / "step_000002").is_dir() and (run / "final" / "config.json").is_file()
    recipe = yaml.safe_load((repo / "recipes" / "grpo_geneval.yaml").read_text())  # the design's run, as shipped
    assert (recipe["rollout"]["backend"], recipe["learner"]["backend"], recipe["learner"]["ranks"]) == ("ray",
                                                                                                       "deepspeed", 4)
    assert recipe["learner"]["gradient_checkpointing"] and recipe["learner"]["deepspeed"]["dtype"] == "bf16"
    assert "rollout: 1 Ray workers ready" in (run / "events.log").read_text()
    report = json.loads((run / "eval" / "after.json").read_text())
    assert len(report["accuracy"]) == 2  # first image + one refine round
