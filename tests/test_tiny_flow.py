"""The tiny flow policy (policy.kind: tiny_flow): its invariants in the learner, and a real `r3-rl train` run
checked through what it leaves behind (metrics, TensorBoard grids, trajectory dumps, eval reports, inspect,
checkpoint and exact resume)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.flow.action import is_flow_segment, segment_trace
from r3_rl.learner.batch import TrainItem
from r3_rl.learner.checkpoint import load_exported
from r3_rl.learner.torch_learner import TorchLearner
from r3_rl.policy.base import ImageInput
from r3_rl.policy.registry import build_policy
from r3_rl.policy.tiny_flow import TinyFlowPolicy
from r3_rl.trajectory import PromptItem, SamplingParams, read_trees

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_flow_blocks.yaml"
SMALL = ["policy.tiny.hidden_size=32", "policy.tiny.num_layers=1", "policy.tiny.num_heads=2",
         "policy.tiny.intermediate_size=48", "policy.options.head_width=64"]
CFG = ["policy.options.cfg_text=3.0", "policy.options.cfg_image=1.5", "policy.options.cfg_interval=[0.3,1.0]",
       "policy.options.sde_generate={mode: all}", "policy.options.sde_refine={mode: fixed, indices: [0, 1]}"]
PROMPTS = [PromptItem(id="a", prompt="a photo of a red square"), PromptItem(id="a", prompt="a photo of a red square"),
           PromptItem(id="b", prompt="a photo of two blue circles")]


def sampled(policy: TinyFlowPolicy, seed: int = 0) -> list[TrainItem]:
    """Plans, first images (CFG) and refined images (text + image CFG) with varied advantages."""
    gen = torch.Generator().manual_seed(seed)
    plans = policy.reason(PROMPTS, SamplingParams(max_new_tokens=6), gen)
    images = policy.generate(PROMPTS, [p.text for p in plans], SamplingParams(), gen)
    edits = policy.refine(PROMPTS, [ImageInput(i.image) for i in images], ["add a red square"] * 3, SamplingParams(),
                          gen)
    segs = [s.segment for s in plans + images + edits]
    adv = [0.5, -0.5, 0.2, 1.0, -1.0, 0.4, -0.8, 0.8, 0.3]
    return [TrainItem(s, a, "reason" if s.modality == "text" else "generate", 0) for s, a in zip(segs, adv)]


@pytest.fixture
def policy() -> TinyFlowPolicy:
    return build_policy(load_recipe(RECIPE, SMALL + CFG))


def test_images_are_denoising_traces_under_cfg_and_siblings_share_their_noise(policy: TinyFlowPolicy) -> None:
    items = sampled(policy)
    images = [it.segment for it in items if it.segment.modality == "image"]
    assert all(is_flow_segment(s) and s.token_ids == [] for s in images)
    traces = [segment_trace(s) for s in images]
    assert [len(t.steps) for t in traces] == [9, 9, 9, 2, 2, 2]  # all 9 steps; edits: the first two
    assert traces[0].guidance.text_scale == 3.0 and traces[3].guidance.uses_image_branch
    assert traces[0].init_seed == traces[1].init_seed != traces[2].init_seed  # siblings (same prompt) share x_T
    assert traces[0].noise_seed != traces[1].noise_seed
    assert all(int(s.image.max()) <= 255 and s.image.shape == (32, 32, 3) for s in
               policy.generate(PROMPTS[:1], [None], SamplingParams(temperature=0.0)))  # eval: the plain ODE
    assert policy.generate(PROMPTS[:1], [None], SamplingParams(temperature=0.0))[0].segment.logprobs == []


def test_ratio_is_one_before_the_first_update_cfg_included_and_grpo_moves_the_weights(policy: TinyFlowPolicy) -> None:
    items = sampled(policy)
    recipe = load_recipe(RECIPE, SMALL + CFG + ["learner.lr=1e-2"])
    images = [it.segment for it in items if it.segment.modality == "image"]
    for seg, lp in zip(images, policy.segment_logprobs(images)):
        assert torch.allclose(lp.double(), torch.tensor(seg.logprobs, dtype=torch.float64), atol=1e-6, rtol=0)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    learner = TorchLearner(policy, policy.frozen_copy(), recipe.learner)
    m = learner.step(items)
    assert m["learner/flow_ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["learner/flow_ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert m["learner/ratio_min"] == pytest.approx(1.0, abs=1e-5)  # the plans (tokens)
    after = policy.model.state_dict()
    assert not torch.equal(before["flow_head.net.0.weight"], after["flow_head.net.0.weight"])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    m2 = learner.step(items)  # the same samples again: now the ratio moved and the image's own clip range binds
    assert m2["learner/flow_ratio_max"] != 1.0 and m2["learner/flow_kl_mean"] > 0


def test_ppo_trains_flow_images_with_a_critic(policy: TinyFlowPolicy) -> None:
    from r3_rl.learner.ppo_learner import ChainItem

    items = sampled(policy)
    recipe = load_recipe(RECIPE, SMALL + CFG + ["learner.algorithm=ppo"])
    chain = [ChainItem(it.segment, 0.0, it.stage, 0, reward=r, episode=f"e{k % 3}", t=k // 3)
             for k, (it, r) in enumerate(zip(items, [0.1, 0.0, 0.1, 1.0, 0.0, 0.5, 0.0, 1.0, -0.5]))]
    learner = TorchLearner(policy, policy.frozen_copy(), recipe.learner)
    m = learner.step(chain)
    assert m["learner/flow_ratio_max"] == pytest.approx(1.0, abs=1e-6) and "learner/value_loss" in m


def test_save_pretrained_round_trips_and_loads_as_a_checkpoint_export(policy: TinyFlowPolicy, tmp_path: Path) -> None:
    policy.save_pretrained(str(tmp_path / "m"))
    again = TinyFlowPolicy.from_pretrained(str(tmp_path / "m"), policy.templates)
    for k, v in policy.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    other = build_policy(load_recipe(RECIPE, SMALL + CFG + ["seed=5"]))
    load_exported(other.model, tmp_path / "m")  # what resume does: every key, nothing unexpected
    assert torch.equal(other.model.flow_head.net[0].weight, policy.model.flow_head.net[0].weight)
    a = policy.generate(PROMPTS, [None] * 3, SamplingParams(), torch.Generator().manual_seed(3))
    b = again.generate(PROMPTS, [None] * 3, SamplingParams(), torch.Generator().manual_seed(3))
    assert [x.segment.logprobs for x in a] == [x.segment.logprobs for x in b]


# ------------------------------------------------------------------------------------ a real run
STEPS = 3


def _sets(tmp: Path, steps: int) -> list[str]:
    return tiny_overrides(tmp, steps) + SMALL + ["threads=1", "eval.every=2", "data.eval_size=4", "save_every=2"]


def _train(run: Path, sets: list[str], *extra: str) -> None:
    argv = ["train", str(RECIPE), "--run-dir", str(run), *extra]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("flow")
    _train(tmp / "run", _sets(tmp, STEPS))
    return tmp / "run"


def test_a_flow_run_logs_like_a_token_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "learner/loss" in r]
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert steps[0]["learner/flow_ratio_min"] == pytest.approx(1.0, abs=1e-6)  # recomputed = sampled
    assert steps[0]["learner/flow_ratio_max"] == pytest.approx(1.0, abs=1e-6)
    # images are counted as images and SDE steps (2 a first image, 1 an edit), not as zero image tokens
    roll = [r for r in rows if "rollout/images" in r]
    assert roll and all(r["rollout/images"] > 0 and "rollout/image_tokens" not in r for r in roll)
    assert all(r["rollout/images"] < r["rollout/sde_steps"] <= 2 * r["rollout/images"] for r in roll)
    assert all(math.isfinite(r["5_entropy/image_sde"]) and "5_entropy/image" not in r for r in roll)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("0_eval/accuracy_round0")] == [0, 2, STEPS]  # per-round eval
    assert "0_eval/accuracy_round1" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Images("trajectories/0")] == list(range(STEPS))  # image grids every step
    for name in ("before", "step_000002", "after"):
        assert (run / "eval" / f"{name}.json").is_file()
    # trajectory dumps: images as PNG files, the image action as its denoising trace with base64 tensors
    trees = list(read_trees(run / "trajectories" / "step_000001.jsonl"))
    images = [n for t in trees for n in t.nodes.values() if n.stage in ("generate", "refine") and n.segment]
    assert images and all(n.image is not None and n.image.shape == (32, 32, 3) for n in images)
    raw = (run / "trajectories" / "step_000001.jsonl").read_text()
    assert '"b64"' in raw and '.png"' in raw
    for n in images:
        trace = segment_trace(n.segment)
        assert [s.logprob for s in trace.steps] == n.segment.logprobs
        step = n.segment.action["trace"]["steps"][0]
        assert set(step["x_next"]) == {"dtype", "shape", "b64"}  # the latent, not a list of floats
    assert main(["inspect", str(run), "--step", "1", "--html"]) == 0
    out = capsys.readouterr().out
    assert "step 1:" in out and (run / "inspect" / "step_000001.html").is_file()


def test_resume_gives_the_straight_runs_weights(run: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    _train(first, _sets(tmp_path, 2))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(first / "checkpoints", resumed / "checkpoints")
    _train(resumed, _sets(tmp_path, STEPS), "--resume", "auto")
    for name in ("model.safetensors", "flow_head.safetensors"):
        a, b = load_file(str(run / "final" / name)), load_file(str(resumed / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    head = load_file(str(first / "final" / "flow_head.safetensors"))
    assert not torch.equal(head["flow_head.net.0.weight"],
                           load_file(str(run / "final" / "flow_head.safetensors"))["flow_head.net.0.weight"])


def test_a_saved_policy_keeps_its_settings_unless_the_recipe_names_them(policy: TinyFlowPolicy,
                                                                        tmp_path: Path) -> None:
    from r3_rl.errors import UserError

    policy.save_pretrained(str(tmp_path / "m"))
    saved = SMALL + [f"policy.model={tmp_path / 'm'}", "policy.options={}"]  # no options named in the recipe
    loaded = build_policy(load_recipe(RECIPE, saved))
    assert loaded.flow == policy.flow and loaded.guidance["generate"].text_scale == 3.0
    odd = build_policy(load_recipe(RECIPE, saved + ["policy.options.grid_points=5"]))
    assert len(odd.grid) == 5 and odd.guidance == policy.guidance
    with pytest.raises(UserError, match="latent_dim: 4 differs"):
        build_policy(load_recipe(RECIPE, saved + ["policy.options.latent_dim=4"]))


@pytest.mark.parametrize("option, needle", [("policy.options.sde_generate={mode: bogus}", "mode 'bogus' is unknown"),
                                            ("policy.options.cfg_interval=[0.5, 0.2]", "guidance interval"),
                                            ("policy.options.grid_points=1", "num_points must be >= 2"),
                                            ("policy.options.grid_points=3", "eta 0.7 with grid_points 3 "
                                             "\\(sde_generate\\): SDE step 0 .* at least 4 grid points")])
def test_bad_options_are_one_line_errors(option: str, needle: str) -> None:
    from r3_rl.errors import UserError

    with pytest.raises(UserError, match=needle):
        build_policy(load_recipe(RECIPE, SMALL + [option]))
