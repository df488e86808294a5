"""``policy.tiny.experts: modality``: each token goes through its modality's copy of every projection and norm.

The log-prob invariants (ratio 1, siblings sharing a context, save and load) run on this model too:
``tests/test_tiny_policy.py`` and ``tests/test_gradient_checkpointing.py`` are parametrised over ``experts``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cli_one_line_error, tiny_overrides
from transformers import LlamaForCausalLM

from r3_rl.config import Recipe, Templates
from r3_rl.policy.tiny import TinyUnifiedPolicy
from r3_rl.policy.tiny_mot import ModalityExperts, MoTLlamaForCausalLM
from r3_rl.policy.warmstart import _key

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny_blocks.yaml"
SIZE = dict(rows=3, cols=3, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=5)


def _policies() -> tuple[TinyUnifiedPolicy, TinyUnifiedPolicy]:
    return (TinyUnifiedPolicy.build(Templates().model_dump(), **SIZE),
            TinyUnifiedPolicy.build(Templates().model_dump(), **SIZE, experts="modality"))


def _ids(policy: TinyUnifiedPolicy, image_cells: list[int]) -> torch.Tensor:
    """A text prefix, then image cells, then the end marker."""
    text = policy.render("reason", prompt="a photo of a red square")
    return torch.tensor([text + [policy.image_offset + c for c in image_cells] + [policy.stop_id]])


def _perturb(model: torch.nn.Module, expert: str) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ModalityExperts):
                for p in getattr(m, expert).parameters():
                    p.add_(0.5 * torch.randn_like(p))


def test_fresh_experts_equal_the_plain_llama_they_were_copied_from() -> None:
    """A peer: both copies start as the shared model's weights, so until training moves them apart the routed
    model (scatter by token, two forwards, gather) must compute what the plain Llama does, token for token."""
    plain, mot = _policies()
    assert isinstance(plain.model, LlamaForCausalLM) and isinstance(mot.model, MoTLlamaForCausalLM)
    with torch.no_grad():
        for p in plain.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from the init: a real comparison, not of two inits
        for layer_p, layer_m in zip(plain.model.model.layers, mot.model.model.layers):
            for name, module in layer_m.named_modules():
                if isinstance(module, ModalityExperts):
                    source = layer_p.get_submodule(name)
                    module.text.load_state_dict(source.state_dict())
                    module.image.load_state_dict(source.state_dict())
        mot.model.model.embed_tokens.weight.copy_(plain.model.model.embed_tokens.weight)
        mot.model.model.norm.weight.copy_(plain.model.model.norm.weight)
    ids = _ids(plain, [0, 3, 7, 1, 0, 2, 5, 0, 4])
    torch.testing.assert_close(mot.model(input_ids=ids).logits, plain.model(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_a_token_uses_its_own_modality_copy() -> None:
    """Moving the image copy changes nothing before the first image token (causal) and every logit from it on;
    moving the text copy changes the text positions' logits and, through attention, the image ones too."""
    _, mot = _policies()
    ids = _ids(mot, [1, 2, 3, 0, 0, 4, 5, 6, 0])
    first_image = int(mot.image_mask[ids[0]].nonzero()[0])
    with torch.no_grad():
        before = mot.model(input_ids=ids).logits
        _perturb(mot.model, "image")
        after = mot.model(input_ids=ids).logits
        text_only = _ids(mot, [])[:, :first_image]
        torch.testing.assert_close(mot.model(input_ids=text_only).logits, after[:, :first_image], atol=1e-6, rtol=0)
    assert torch.equal(after[:, :first_image], before[:, :first_image])
    assert (after[:, first_image:] - before[:, first_image:]).abs().amax(-1).min() > 1e-3


def test_both_copies_learn_and_the_text_copy_alone_from_text() -> None:
    _, mot = _policies()
    layer = mot.model.model.layers[0].mlp.up_proj
    mot.model(input_ids=_ids(mot, [])).logits.sum().backward()
    assert layer.text.weight.grad.abs().sum() > 0 and layer.image.weight.grad is None
    mot.model.zero_grad()
    mot.model(input_ids=_ids(mot, [2, 0, 1])).logits.sum().backward()
    assert layer.text.weight.grad.abs().sum() > 0 and layer.image.weight.grad.abs().sum() > 0


def test_the_setting_survives_save_and_load(tmp_path: Path) -> None:
    _, mot = _policies()
    _perturb(mot.model, "image")
    mot.save_pretrained(str(tmp_path))
    loaded = TinyUnifiedPolicy.from_pretrained(str(tmp_path), Templates().model_dump())
    assert isinstance(loaded.model, MoTLlamaForCausalLM)
    ids = _ids(mot, [3, 1, 0])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, mot.model(input_ids=ids).logits)


def test_the_default_leaves_cached_warm_starts_valid_and_experts_get_their_own() -> None:
    base = Recipe()
    assert base.policy.tiny.experts == "shared"
    explicit = Recipe.model_validate({"policy": {"tiny": {"experts": "shared"}}})
    modality = Recipe.model_validate({"policy": {"tiny": {"experts": "modality"}}})
    assert _key(explicit) == _key(base) != _key(modality)


@pytest.mark.parametrize("change, expected", [
    (["policy.tiny.experts=both"], "key 'policy.tiny.experts': Input should be 'shared' or 'modality'"),
    (["policy.kind=tiny_flow", "policy.tiny.experts=modality"],
     "key 'policy.tiny.experts': 'modality' is for policy.kind tiny"),
])
def test_a_setting_the_policy_cannot_honour_is_a_one_line_error(change: list[str], expected: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    args = ["train", str(TINY), "--run-dir", str(tmp_path / "run")]
    assert expected in cli_one_line_error([*args, *(a for c in change for a in ("--set", c))], capsys)
    assert not (tmp_path / "run").exists()


def test_a_saved_model_of_the_other_kind_is_an_error_not_a_silent_switch(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    plain, _ = _policies()
    plain.save_pretrained(str(tmp_path / "shared"))
    args = ["eval", str(TINY), "--checkpoint", str(tmp_path / "shared"), "--set", "policy.tiny.experts=modality",
            *(a for o in tiny_overrides(tmp_path) for a in ("--set", o))]
    err = cli_one_line_error(args, capsys)
    assert "policy.tiny.experts" in err and "'shared'" in err, err


@pytest.mark.parametrize("experts", ["shared", "modality"])
def test_the_planner_counts_the_weights_the_built_model_has(experts: str) -> None:
    """``r3-rl plan`` sizes memory from a parameter count: with modality experts the decoder's weights double."""
    from r3_rl.config import load_recipe
    from r3_rl.plan.shapes import model_shape
    from r3_rl.policy.registry import build_policy

    recipe = load_recipe(TINY, [f"policy.tiny.experts={experts}", "policy.tiny.hidden_size=64",
                                "policy.tiny.intermediate_size=96", "policy.tiny.num_heads=2"])
    model = build_policy(recipe).model
    shape = model_shape(recipe)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.largest_layer >= max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
