"""Exact small cases for the policy's sampling maths, KV caches, modality experts and tokenizer (round 18 audit).

r3_rl.policy.{sampling,kv_cache,tiny_mot,tiny_tokenizer,shared_context}: hand-computed values and invariants that
the existing tests touch only loosely -- the nucleus at top_p 1.0 with a token below float32 resolution, a
value head dimension other than the key's, the tokenizer's vocabulary layout, the expert routing span.
"""
from __future__ import annotations

import math

import pytest
import torch

from r3_rl.policy.kv_cache import PreallocatedCache
from r3_rl.policy.sampling import sampling_logprobs
from r3_rl.policy.shared_context import first_rows
from r3_rl.trajectory import SamplingParams


# ================================================================ r3_rl/policy/sampling.py
def test_top_p_one_keeps_a_token_whose_mass_is_below_float32_resolution() -> None:
    """p = [1 - e^-30, e^-30]: in float32 the first probability rounds to 1.0, so the mass before the second
    token reads 1.0.  top_p 1.0 is "off": the second token keeps its log-prob -30 (not -inf)."""
    logits = torch.tensor([0.0, -30.0])
    lp = sampling_logprobs(logits, SamplingParams(top_p=1.0))
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, torch.log_softmax(logits.double(), -1).float(), atol=1e-6, rtol=0)


def test_token_logprobs_with_a_vocabulary_larger_than_a_chunk_takes_one_row_at_a_time() -> None:
    """A chunk of 3 logits cannot hold one 5-token row: rows go one at a time (not zero at a time)."""
    from r3_rl.policy.sampling import token_logprobs

    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    head = torch.nn.Linear(2, 5, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    tokens = torch.tensor([2, 3, 4])
    got = token_logprobs(hidden, head, 5, tokens, SamplingParams(), chunk_elements=3)
    # row 0 logits [1, 0, 2, 0, 0], row 1 [0, 1, 0, 2, 0], row 2 [1, 1, 2, 2, 0]
    lse01 = math.log(math.e + math.e ** 2 + 3)
    expected = [2 - lse01, 2 - lse01, 0 - math.log(2 * math.e + 2 * math.e ** 2 + 1)]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_first_rows_is_each_contexts_first_row() -> None:
    assert first_rows([0, 0, 1, 0, 2, 1]) == [0, 2, 4]
    assert first_rows([0, 1, 1, 0]) == [0, 1]


# ================================================================ r3_rl/policy/kv_cache.py
def test_preallocated_cache_keeps_a_value_head_dim_other_than_the_keys() -> None:
    """Keys of head dim 4, values of head dim 3 (as in models with a smaller value projection): each buffer is
    sized by its own tensor."""
    cache = PreallocatedCache(1, capacity=3)
    k, v = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 3)
    keys, values = cache.update(k, v, 0)
    assert keys.shape == (2, 1, 2, 4) and values.shape == (2, 1, 2, 3)
    assert torch.equal(keys, k) and torch.equal(values, v)


# ================================================================ r3_rl/policy/tiny_tokenizer.py
def test_vocabulary_is_specials_then_contiguous_image_cells_then_sorted_words() -> None:
    """A special or an image cell given among the words keeps its own id (no second entry), the text words
    follow in sorted order, and a word glued to punctuation is one unknown word (whitespace split only)."""
    from r3_rl.policy.tiny_tokenizer import SPECIALS, build_tokenizer

    words = ["zeta", "alpha", "<pad>", "mid", "beta", "<img_1>", "omega", "kappa", "delta", "gamma"]
    tok = build_tokenizer(words, 2)
    text = ["alpha", "beta", "delta", "gamma", "kappa", "mid", "omega", "zeta"]
    expected = {**{s: i for i, s in enumerate(SPECIALS)}, "<img_0>": 9, "<img_1>": 10,
                **{w: 11 + i for i, w in enumerate(text)}}
    assert tok.get_vocab() == expected and len(tok) == 19
    assert tok("alpha <img_0> zeta, <|im_end|> zeta")["input_ids"] == [11, 9, 1, 4, 18]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 4, 0, 1)


def test_template_words_drop_every_placeholder_and_split_where_it_was() -> None:
    from r3_rl.policy.tiny_tokenizer import template_words

    assert template_words(["{prompt} draw {plan}then {instruction} ok", "x{image}y"]) == {
        "draw", "then", "ok", "x", "y"}
    assert template_words(["{other} a"]) == {"{other}", "a"}  # only the four placeholders are placeholders


# ================================================================ r3_rl/policy/tiny_mot.py
def _mot(first: int = 3, n: int = 4):
    from transformers import LlamaConfig

    from r3_rl.policy.tiny_mot import MoTLlamaForCausalLM, modality_config

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return MoTLlamaForCausalLM(modality_config(config, first, n))


def test_the_image_span_is_first_to_first_plus_count_exclusive() -> None:
    """Image ids 3..6 (four of them): 2 and 7 are text, 3 and 6 image -- the route each layer receives."""
    from r3_rl.policy.tiny_mot import CONFIG_KEY, ROUTE_KEY

    model = _mot()
    assert getattr(model.config, CONFIG_KEY) == [3, 7]
    ids = torch.tensor([[2, 3, 4, 5, 6, 7, 0, 9]])
    _, kwargs = model._add_route(model.model, (), {"input_ids": ids})
    assert kwargs[ROUTE_KEY].tolist() == [[False, True, True, True, True, False, False, False]]


def test_the_decoder_routes_input_ids_given_by_position_too() -> None:
    """``model.model(ids)`` (input_ids positional, as LlamaModel allows) routes exactly like ``input_ids=ids``."""
    model = _mot()
    ids = torch.tensor([[1, 3, 6, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model.model(ids).last_hidden_state,
                                   model.model(input_ids=ids).last_hidden_state, atol=0, rtol=0)


def test_an_empty_span_is_no_experts_as_the_recipe_reads_a_saved_config() -> None:
    from transformers import LlamaConfig

    from r3_rl.policy.tiny_mot import CONFIG_KEY, has_modality_experts

    assert has_modality_experts(LlamaConfig(**{CONFIG_KEY: [3, 7]}))
    assert not has_modality_experts(LlamaConfig()) and not has_modality_experts(LlamaConfig(**{CONFIG_KEY: []}))

def test_every_projection_and_norm_has_two_independent_copies() -> None:
    from r3_rl.policy.tiny_mot import ModalityExperts

    layer = _mot().model.layers[0]
    names = [n for n, m in layer.named_modules() if isinstance(m, ModalityExperts)]
    assert sorted(names) == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                                    "post_attention_layernorm"])
    for n in names:
        m = layer.get_submodule(n)
        assert m.text is not m.image
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(m.text.parameters(), m.image.parameters()))


def test_a_routing_mask_of_the_wrong_shape_is_refused_even_when_all_text() -> None:
    from r3_rl.policy.tiny_mot import ModalityExperts, Route

    route = Route()
    experts = ModalityExperts(torch.nn.Linear(4, 2), route)
    x = torch.randn(1, 3, 4)
    route.image = torch.zeros(1, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"routing mask \(1, 2\) does not fit the hidden states \(1, 3, 4\)"):
        experts(x)
    route.image = torch.tensor([[False, True, False]])
    with torch.no_grad():
        experts.image.weight.add_(1.0)
        out = experts(x)
        torch.testing.assert_close(out[0, 1], experts.image(x[0, 1]))
        torch.testing.assert_close(out[0, [0, 2]], experts.text(x[0, [0, 2]]))
        route.image = torch.ones(1, 3, dtype=torch.bool)
        torch.testing.assert_close(experts(x), experts.image(x))
        route.image = torch.zeros(1, 3, dtype=torch.bool)
        torch.testing.assert_close(experts(x), experts.text(x))


# ================================================================ r3_rl/policy/critique_replay.py
def test_rehearsal_of_step_k_is_drawn_from_its_documented_streams() -> None:
    """Step k's images come from the rehearsal's own stream ``[seed, 7001, k]`` over training prompts
    ``k * examples ...`` of the prompt stream seeded ``seed + 7001``; its questions from a stream of their own,
    ``[seed, 7001, k, 1]`` (not a replay of the images' draws).  Assembled here from the warm start's parts."""
    import numpy as np

    from r3_rl.config import Recipe, Templates
    from r3_rl.data import BlocksPrompts
    from r3_rl.policy.critique_replay import CritiqueReplay
    from r3_rl.policy.tiny import TinyUnifiedPolicy
    from r3_rl.policy.warmstart import critic_images, critique_example, question_examples

    policy = TinyUnifiedPolicy.build(Templates().model_dump(), rows=4, cols=4, hidden_size=16, num_layers=1,
                                     num_heads=2, intermediate_size=32)
    recipe = Recipe(seed=3, learner={"critic_replay": {"coef": 0.5, "examples": 3, "questions": 2}})
    replay = CritiqueReplay(policy, recipe)
    prompts = BlocksPrompts(tags=recipe.data.blocks.tags, seed=3 + 7001)
    for k in (0, 2):
        images = critic_images(prompts, 3 * k, 3, recipe.warmstart, np.random.default_rng([3, 7001, k]), 4, 4)
        ask = np.random.default_rng([3, 7001, k, 1])
        critiques = [critique_example(policy, it.prompt, g, it.metadata, recipe.warmstart, lenient)
                     for it, g, lenient in images]
        questions = [q for it, g, _ in images for q in question_examples(policy, g, it.metadata, 2, ask)]
        got = replay.examples(k)
        assert got.critiques == critiques and got.questions == questions
