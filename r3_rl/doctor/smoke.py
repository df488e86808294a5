"""The doctor's 2-step training: the recipe as written (rollout, rewards, learner, Ray, checkpoint), on a
random model of the recipe's shape, shrunk in depth and in evaluation so it takes seconds to minutes.

Why random weights of the same shape: widths, vocabularies, image-token grids and dtypes decide which
kernels, collectives and DeepSpeed paths run; the real weights add only load time.  ``layers`` caps each
tower's depth.  A small seeded ``noise`` reward joins the task rewards, because a random model's images
often score the same for every sibling, and groups without reward differences skip the learner -- the
part this check exists to exercise.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

NOISE_REWARD = "r3_rl.doctor.smoke:noise"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")
DTYPES = ("float32", "bfloat16", "float16")
_rng = random.Random(0)


def noise(samples: list[Any], *, scale: float = 1.0) -> list[float]:
    """A seeded random score per sample: guarantees every sibling group a learning signal."""
    return [scale * _rng.random() for _ in samples]


def random_model_like(src: Path, dst: Path, layers: int = 2, dtype: str = "float32", device: str = "cpu") -> Path:
    """``src``'s folder (config, tokenizer, processor, generation config) with random weights and at most
    ``layers`` transformer layers per tower, saved to ``dst`` for the policy's own ``from_pretrained``."""
    import torch
    import transformers
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = AutoConfig.from_pretrained(str(src))
    subs = [getattr(config, k, None) for k in getattr(config, "sub_configs", {})]
    for c in [config, *subs]:
        if c is not None and isinstance(getattr(c, "num_hidden_layers", None), int):
            c.num_hidden_layers = min(layers, c.num_hidden_layers)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{src}/config.json names no transformers architecture ({arch!r})")
    with torch.device(device):
        model = cls._from_config(config, dtype=getattr(torch, dtype))
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst))
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, dst / f.name)  # hub-cache snapshots are links: copy the content
    return dst


def smoke_recipe(recipe: Any, workdir: Path, model_dir: Path | None = None) -> Any:
    """The recipe for a 2-step run in ``workdir``: same batch shape, rewards (+ ``noise``), learner and Ray
    settings; evaluation cut to one prompt and its first image, no periodic checkpoints (the final one is still
    written)."""
    from r3_rl.config import RewardSpec

    r = recipe.model_copy(deep=True)
    r.steps, r.save_every, r.out_dir = 2, 0, str(workdir)
    r.warmstart.steps = 0
    r.eval.every, r.eval.rounds, r.eval.size, r.eval.dump = 0, 0, 1, 0
    r.log.trajectories_every, r.log.console = 0, False
    r.rewards.task = [*r.rewards.task, RewardSpec(name=NOISE_REWARD, weight=1.0)]
    if model_dir is not None:
        r.policy.model = str(model_dir)
    return r


def smoke_train(recipe: Any, workdir: Path, model_dir: Path | None = None) -> list[dict[str, Any]]:
    """Train ``smoke_recipe`` for 2 steps; the metrics of both steps, or :class:`RuntimeError` when a step
    did not update the weights or its loss is not finite."""
    from r3_rl.run_dir import make_run_dir
    from r3_rl.trainer import Trainer

    r = smoke_recipe(recipe, workdir, model_dir)
    run = make_run_dir(r, str(workdir / "run"))
    Trainer(r, run).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [row for row in rows if "batch/items" in row]
    losses = [row.get("learner/loss") for row in steps]
    if len(steps) != 2 or not all(isinstance(v, float) and math.isfinite(v) for v in losses):
        failed = sum(row.get("rollout/failed_rewards", 0) for row in steps)
        raise RuntimeError(f"2-step training did not give two finite losses (got {losses}; failed rewards so far: "
                           f"{failed}): with no loss, every group's rewards were equal or failed")
    if not any((run / "checkpoints").glob("step_*")):
        raise RuntimeError("2-step training wrote no checkpoint")
    return steps
