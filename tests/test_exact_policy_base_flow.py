"""Exact checks of the policy interface and its plumbing (round 13C audit): the Policy defaults (LoRA scope, class
flags, dtypes), host copies of buffers, the ZeRO-3 gather paths of state_dict / trainable_state_dict /
load_state_dict and of ``zero3.gathered`` (DeepSpeed's gather replaced by a recorder, so no process group is
needed), policy plug-ins by name (one-line errors), the shared-context cost model at its boundaries, and the
tiny flow policy's sampling seeds, options, persistence and warm-start loss routing.

Expected values are worked out by hand in each test."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from test_exact_policy_glue_weights import _Toy, _toy

from r3_rl.blocks import world
from r3_rl.errors import UserError
from r3_rl.policy import base
from r3_rl.policy.base import Policy, host_copy
from r3_rl.policy.shared_context import shared_context_rows
from r3_rl.trajectory import PromptItem, SamplingParams

REPO = Path(__file__).resolve().parents[1]
FLOW = REPO / "recipes" / "tiny_flow_blocks.yaml"
SMALL = ["policy.tiny.hidden_size=32", "policy.tiny.num_layers=1", "policy.tiny.num_heads=2",
         "policy.tiny.intermediate_size=48", "policy.options.head_width=64", "data.blocks.rows=2",
         "data.blocks.cols=2"]


# ================================================================ r3_rl/policy/base.py
def test_default_lora_scope_is_the_whole_model_and_train_vision_is_refused() -> None:
    """Catches the train_vision test inverted or an empty scope (LoRA would then go nowhere)."""
    p = _toy()
    assert p.lora_scope() == [""]
    with pytest.raises(UserError, match="learner.lora.train_vision: a _Toy has no separate vision tower"):
        p.lora_scope(train_vision=True)


def test_default_lora_target_names_are_a_new_list() -> None:
    """Catches the caller's list handed back itself (a caller widening the result would change the recipe's)."""
    wanted = ["q_proj", "v_proj"]
    out = _toy().lora_target_names(wanted)
    assert out == ["q_proj", "v_proj"] and out is not wanted
    out.append("k_proj")
    assert wanted == ["q_proj", "v_proj"]


def test_policy_class_defaults_and_dtypes() -> None:
    """Catches a wrong starting version, a plug-in's critic support claimed unknown->False, critique replay claimed,
    or a policy.dtype mapped to the wrong torch dtype."""
    assert Policy.version == 0 and _toy().version == 0
    assert Policy.critic_features is None and Policy.replays_critiques is False
    assert base.DTYPES == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def test_state_dict_without_zero3_is_the_plain_detached_state_dict(gathers) -> None:  # noqa: ANN001
    """Catches Parameters (with grad) handed out, and a weight carrying only ds_numel taken for a ZeRO-3 shard."""
    p = _toy()
    p.model[1].weight.ds_numel = 30  # a size hint alone is not a partitioned parameter
    sd = p.state_dict()
    assert sorted(sd) == ["0.bias", "0.weight", "1.bias", "1.weight", "scale"]
    assert all(type(v) is torch.Tensor and not v.requires_grad for v in sd.values())
    assert gathers.calls == []


def test_host_copy_keeps_buffers_buffers() -> None:
    """Catches every copied tensor wrapped as a Parameter (a buffer would turn into a trainable weight)."""
    m = torch.nn.Linear(2, 2)
    m.register_buffer("mean", torch.tensor([1.0, 2.0]))
    c = host_copy(m)
    assert type(c.mean) is torch.Tensor and c.mean.tolist() == [1.0, 2.0]
    assert sorted(n for n, _ in c.named_parameters()) == ["bias", "weight"]
    assert sorted(n for n, _ in c.named_buffers()) == ["mean"]


def test_exported_weight_files_are_sorted_by_name(tmp_path: Path) -> None:
    """Catches the directory's own order returned (shards would load in an arbitrary order)."""
    names = [f"model-{i:05d}-of-00012.safetensors" for i in (7, 3, 11, 1, 12, 5, 9, 2, 10, 4, 8, 6)]
    for name in names:
        (tmp_path / name).write_text("{}")
    got = _toy().exported_weight_files(tmp_path)
    assert [p.name for p in got] == [f"model-{i:05d}-of-00012.safetensors" for i in range(1, 13)]


class _Gathers:
    """Stands in for ``deepspeed.zero.GatheredParameters``: records (ids of the params, modifier_rank)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], object]] = []

    def __call__(self, params, modifier_rank=None, **kw):  # noqa: ANN001
        self.calls.append(([id(p) for p in params], modifier_rank))
        return contextlib.nullcontext()


@pytest.fixture
def gathers(monkeypatch: pytest.MonkeyPatch) -> _Gathers:
    deepspeed = pytest.importorskip("deepspeed")
    rec = _Gathers()
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", rec)
    return rec


def _zero3_toy() -> _Toy:
    p = _toy()
    for i, q in enumerate(p.model.parameters()):
        q.ds_id = i  # every weight partitioned (what ZeRO-3 leaves on each parameter)
    return p


def test_zero3_state_dict_gathers_every_weight_and_returns_cpu_copies(gathers: _Gathers) -> None:
    """Catches the gathered tensors handed out themselves (they empty again when the gather ends)."""
    p = _zero3_toy()
    sd = p.state_dict()
    assert gathers.calls == [([id(q) for q in p.model.parameters()], None)]
    w = p.model[1].weight
    assert torch.equal(sd["1.weight"], w.detach()) and sd["1.weight"].data_ptr() != w.data_ptr()
    assert not sd["1.weight"].requires_grad


def test_zero3_trainable_state_dict_gathers_only_trainable_weights_as_copies(gathers: _Gathers) -> None:
    """Catches frozen weights gathered too (the whole model on one GPU) or the gathered tensors handed out."""
    p = _zero3_toy()
    sd = p.trainable_state_dict()
    assert gathers.calls == [([id(p.model[1].weight), id(p.model[1].bias)], None)]
    assert sorted(sd) == ["1.bias", "1.weight"]
    assert sd["1.bias"].data_ptr() != p.model[1].bias.data_ptr()


def test_zero3_load_state_dict_takes_rank_zeros_values(gathers: _Gathers) -> None:
    """Catches the gather without modifier_rank=0 (the loaded values would be dropped when it ends)."""
    p = _zero3_toy()
    p.load_state_dict({"1.bias": torch.tensor([4.0])}, version=2, partial=True)
    assert gathers.calls == [([id(q) for q in p.model.parameters()], 0)]
    assert p.model[1].bias.item() == 4.0 and p.version == 2


# ================================================================ r3_rl/policy/zero3.py
def test_gathered_reads_only_the_unavailable_shards(gathers: _Gathers) -> None:
    """Catches already-gathered weights gathered again (DeepSpeed refuses nested gathers), a gather that lets a
    rank modify them, a gather with nothing to gather, and a size hint taken for a partition."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from r3_rl.policy.zero3 import gathered

    m = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    with gathered(m):  # nothing partitioned: a no-op
        pass
    m[0].weight.ds_numel = 1  # a size hint only
    with gathered(m):
        pass
    assert gathers.calls == []
    for q in m.parameters():
        q.ds_id, q.ds_status = 1, ZeroParamStatus.AVAILABLE  # an outer gather has them whole already
    with gathered(m):
        pass
    assert gathers.calls == []
    m[1].weight.ds_status = ZeroParamStatus.NOT_AVAILABLE
    with gathered(m):
        pass
    assert gathers.calls == [([id(m[1].weight)], None)]


# ================================================================ r3_rl/policy/shared_context.py
def test_shared_context_cost_boundaries_by_hand() -> None:
    """Catches `<=` for `<` at a tie, a last target token counted, and the contexts counted once per row."""
    # tie: 2 contexts * 3 + 3 rows * (4 - 1) = 15 = 3 * 5: not cheaper, so one full forward
    assert shared_context_rows(["a", "a", "b"], [3] * 3, [4] * 3, [5] * 3) is None
    # 15 < 3 * 6 = 18: shared (with the last target token counted it would be 6 + 12 = 18, not cheaper)
    assert shared_context_rows(["a", "a", "b"], [3] * 3, [4] * 3, [6] * 3) == [0, 0, 1]
    # one context for three rows: 1 * 10 + 3 * 2 = 16 < 36 (per row it would be 30 + 6 = 36, not cheaper)
    assert shared_context_rows(["a", "a", "a"], [10] * 3, [3] * 3, [12] * 3) == [0, 0, 0]
    # lengths differ: the longest of each kind counts, 2 * 9 + 3 * (5 - 1) = 30 < 3 * 12 = 36
    assert shared_context_rows(["x", "y", "x"], [2, 9, 2], [3, 3, 5], [5, 12, 7]) == [0, 1, 0]


# ================================================================ r3_rl/policy/registry.py
def _flow_recipe(*sets: str):
    from r3_rl.config import load_recipe

    return load_recipe(FLOW, SMALL + list(sets))


def test_build_policy_keeps_a_saved_policys_own_user_error_and_wraps_a_damaged_one(tmp_path: Path) -> None:
    """A UserError from loading policy.model is passed on as written (catches it rewrapped as 'cannot load it');
    any other failure of a damaged folder is one UserError (catches the raw exception escaping, or the
    model / no-model branches swapped)."""
    from r3_rl.policy.registry import build_policy

    build_policy(_flow_recipe()).save_pretrained(str(tmp_path / "m"))
    with pytest.raises(UserError) as e:
        build_policy(_flow_recipe(f"policy.model={tmp_path / 'm'}", "policy.options={}", "policy.options.latent_dim=4"))
    assert str(e.value).startswith("policy.options.latent_dim: 4 differs from the saved policy's 8 (")
    (tmp_path / "m" / "r3_flow.json").write_text("{not json")
    with pytest.raises(UserError, match=r"^policy.model: .*m: cannot load it \("):
        build_policy(_flow_recipe(f"policy.model={tmp_path / 'm'}", "policy.options={}"))


def test_build_policy_checks_options_against_from_recipe() -> None:
    """Catches the options check skipped (from_recipe would raise a bare TypeError)."""
    from r3_rl.policy.registry import build_policy

    with pytest.raises(UserError, match="bogus"):
        build_policy(_flow_recipe("policy.options.bogus=1"))


# ================================================================ r3_rl/policy/tiny_flow.py
@pytest.fixture(scope="module")
def flow():
    from r3_rl.policy.registry import build_policy

    return build_policy(_flow_recipe("policy.options.sde_generate={mode: random, count: 1}"))


def test_the_flow_head_is_seeded_by_the_recipe_not_the_global_rng(flow) -> None:
    """A head built onto a Llama is drawn from ``flow['seed']``: catches it drawn from whatever the global RNG
    holds (two builds of one recipe would start from different heads)."""
    from r3_rl.policy.tiny import TinyUnifiedPolicy
    from r3_rl.policy.tiny_flow import TinyFlowPolicy

    heads = []
    for noise in (1, 2):
        b = TinyUnifiedPolicy.from_recipe(_flow_recipe())
        torch.manual_seed(noise)
        p = TinyFlowPolicy(b.model, b.tok, b.templates, b.rows, b.cols, flow.flow)
        heads.append(p.model.flow_head.state_dict())
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    assert all(torch.equal(heads[0][k], flow.model.flow_head.state_dict()[k]) for k in heads[0])


def test_a_latent_of_one_dimension_is_allowed() -> None:
    """latent_dim >= 1: catches the bound tightened to refuse 1."""
    from r3_rl.policy.tiny_flow import TinyFlowPolicy

    p = TinyFlowPolicy.from_recipe(_flow_recipe(), latent_dim=1, head_width=8)
    assert p.latent_shape == (4, 1) and tuple(p.codes.shape) == (world.N_TOKENS, 1)


def test_from_pretrained_keeps_the_version(flow, tmp_path: Path) -> None:
    """Catches a loaded flow policy stamped version 0 (its nodes would look stale or fresh wrongly)."""
    from r3_rl.policy.tiny_flow import TinyFlowPolicy

    flow.version = 7
    try:
        flow.save_pretrained(str(tmp_path / "m"))
    finally:
        flow.version = 0
    assert TinyFlowPolicy.from_pretrained(str(tmp_path / "m"), flow.templates).version == 7


def test_siblings_share_sde_steps_but_not_sde_noise(flow) -> None:
    """R3: siblings (one prompt id) share the initial noise and the stochastic step index but draw their own SDE
    noise. Catches step indices seeded per row, and SDE noise seeded per prompt (identical siblings)."""
    from r3_rl.flow.action import segment_trace

    ids = ["a", "a", "a", "b", "b", "b", "c", "c", "c", "d", "d", "d"]
    prompts = [PromptItem(i, "a photo of a red square") for i in ids]
    out = flow.generate(prompts, [None] * len(ids), SamplingParams(), torch.Generator().manual_seed(0))
    traces = [segment_trace(s.segment) for s in out]
    index = [[st.index for st in t.steps] for t in traces]
    assert all(len(i) == 1 for i in index)
    for g in range(4):
        assert index[3 * g] == index[3 * g + 1] == index[3 * g + 2], index
        x = [traces[3 * g + j].steps[0].x_next for j in range(3)]
        assert not torch.equal(torch.as_tensor(x[0]), torch.as_tensor(x[1]))
    assert len({tuple(i) for i in index}) > 1  # not one index for everyone


def test_a_segment_keeps_its_own_copy_of_the_sampling_params(flow) -> None:
    """Catches the caller's SamplingParams stored by reference (a later change would rewrite the record)."""
    sp = SamplingParams(temperature=1.0)
    seg = flow.generate([PromptItem("a", "a red square")], [None], sp, torch.Generator().manual_seed(0))[0].segment
    assert seg.sampling == sp and seg.sampling is not sp


def test_flow_warm_start_is_skipped_for_a_saved_model_and_keyed_by_the_flow_settings(
        flow, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a loaded policy warm-started again, and a cache shared between different flow settings."""
    from r3_rl.policy import warmstart

    tags: list[str] = []
    monkeypatch.setattr(warmstart, "warmstart_cached", lambda *a, tag, **k: tags.append(tag))
    flow.warm_start(_flow_recipe("policy.model=somewhere"), Path("unused"))
    assert tags == []
    flow.warm_start(_flow_recipe(), Path("unused"))
    other = type(flow)(flow.model, flow.tok, flow.templates, flow.rows, flow.cols, {**flow.flow, "eta": 0.5})
    other.warm_start(_flow_recipe(), Path("unused"))
    assert len(tags) == 2 and tags[0] != tags[1] and '"eta": 0.7' in tags[0] and '"eta": 0.5' in tags[1]


def test_flow_sft_loss_routes_by_image_targets(flow, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image targets are exactly num_cells cell tokens, cell 0 included: catches a short run of cell tokens taken
    for an image, and cell 0 (the first image token) not counted as one."""
    from r3_rl.policy import tiny_flow, warmstart

    seen: list[list] = []
    monkeypatch.setattr(warmstart, "sft_loss", lambda policy, text: seen.append(text) or torch.tensor(2.5))
    lo = flow.image_offset
    ctx = [flow.bos_id]
    short = (ctx, [lo, lo + 1])  # two cell tokens: not a 2x2 image
    assert tiny_flow.flow_sft_loss(flow, [short]).item() == 2.5 and seen == [[short]]
    seen.clear()
    image = (ctx, [lo, lo, lo + 1, lo])  # four cells, three of them cell 0
    loss = tiny_flow.flow_sft_loss(flow, [image])
    assert seen == [] and loss.item() > 0.0


def test_conditions_ignore_a_context_with_two_images(flow) -> None:
    """h_cells come only from a context with exactly one image's cells: catches `>=` (a view over 8 cells)."""
    lo = flow.image_offset
    ctx = [flow.bos_id] + [lo + 1] * (2 * flow.num_cells)
    h_last, h_cells = flow.conditions([ctx])
    assert tuple(h_cells.shape) == (1, 4, 32) and torch.count_nonzero(h_cells) == 0
    assert tuple(h_last.shape) == (1, 32)


def test_recipe_options_on_a_saved_policy_are_checked_with_its_saved_grid(tmp_path: Path) -> None:
    """A saved 4-point grid with the recipe's eta 0.9 makes SDE step 0's mean keep a negative multiple of the latent
    (eta 0.9 is fine on the default 10-point grid the recipe check sees): refused in one line, not sampled."""
    from r3_rl.policy.registry import build_policy

    build_policy(_flow_recipe("policy.options.grid_points=4")).save_pretrained(str(tmp_path / "m"))
    saved = [f"policy.model={tmp_path / 'm'}", "policy.options={}"]
    assert len(build_policy(_flow_recipe(*saved, "policy.options.eta=0.7")).grid) == 4
    with pytest.raises(UserError, match=r"^policy.options \(tiny_flow\) with the saved policy's settings .*SDE step 0"):
        build_policy(_flow_recipe(*saved, "policy.options.eta=0.9"))
