"""Exact cases for Janus sampling (CFG, warpers, the caller's generator, per-row stopping, decoded pixels), the
sampling distribution against transformers' own logits processors, the preallocated KV cache, Janus prompts,
and the Ray runtime's pure helpers (one mutation-audit finding each, audit round 6).  No test here starts Ray:
the helpers are driven through monkeypatched ``ray`` calls.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    ClassifierFreeGuidanceLogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from r3_rl.config import RayCfg
from r3_rl.errors import UserError
from r3_rl.policy.janus_prompts import check_templates, user_content
from r3_rl.policy.kv_cache import PreallocatedCache
from r3_rl.policy.sampling import cfg_logits, sample_tokens, sampling_logprobs
from r3_rl.policy.shared_context import shared_context_rows
from r3_rl.trajectory import SamplingParams

JANUS_TEMPLATES = {"reason": "{prompt}", "generate": "{prompt}", "generate_uncond": "", "reflect": "{prompt}",
                   "refine": "{prompt} {instruction}"}


def _hf_logprobs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The peer: transformers' warpers in generate's order (temperature, top-k, top-p), then log-softmax."""
    warpers = LogitsProcessorList()
    if sp.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sp.temperature))
    if sp.top_k:
        warpers.append(TopKLogitsWarper(sp.top_k))
    if sp.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sp.top_p))
    return torch.log_softmax(warpers(None, logits.clone()), dim=-1)


# ============================================================================ the sampling distribution
def test_cfg_is_transformers_guidance_and_scale_one_is_the_conditional_stream() -> None:
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    assert torch.equal(cfg_logits(cond, uncond, 1.0), cond)  # scale 1 = no guidance: the conditional logits
    peer = ClassifierFreeGuidanceLogitsProcessor(3.0)(torch.zeros(3, 1, dtype=torch.long), torch.cat([cond, uncond]))
    torch.testing.assert_close(cfg_logits(cond, uncond, 3.0), peer, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sp", [SamplingParams(temperature=0.7), SamplingParams(temperature=0.6, top_k=12, top_p=0.7),
                                SamplingParams(temperature=1.3, top_k=25, top_p=0.6)], ids=["t", "t_k_p", "t_k_p_hot"])
def test_sampling_logprobs_equal_transformers_warpers_in_generate_order(sp: SamplingParams) -> None:
    """Temperature once, then top-k, then top-p on the renormalised top-k distribution (as generate does)."""
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(1)) * 2.0
    ours, peer = sampling_logprobs(logits, sp), _hf_logprobs(logits, sp)
    assert torch.equal(torch.isinf(ours), torch.isinf(peer))
    torch.testing.assert_close(ours[torch.isfinite(ours)], peer[torch.isfinite(peer)], atol=1e-5, rtol=0)


def test_top_p_drops_a_token_once_the_mass_before_it_equals_top_p() -> None:
    """Four equal logits (probabilities exactly 1/4), top_p 0.5: the third token has exactly 0.5 before it, so the
    nucleus is two tokens, each 1/2 -- transformers' TopPLogitsWarper keeps two as well."""
    logits = torch.zeros(1, 4)
    sp = SamplingParams(top_p=0.5)
    lp = sampling_logprobs(logits, sp)
    assert int(torch.isfinite(lp).sum()) == 2 == int(torch.isfinite(_hf_logprobs(logits, sp)).sum())
    assert torch.equal(lp[torch.isfinite(lp)], torch.full((2,), float(np.log(0.5)), dtype=torch.float32))


def test_temperature_zero_without_the_greedy_flag_takes_the_argmax() -> None:
    """``rollout.<stage>.temperature: 0`` (greedy false) is allowed by the recipe: it decodes greedily, its
    log-probs those of temperature 1."""
    logits = torch.tensor([[0.0, 0.3, 0.1, -0.2]]).repeat(64, 1)
    sp = SamplingParams(temperature=0.0)
    tokens, lp = sample_tokens(sampling_logprobs(logits, sp), sp, torch.Generator().manual_seed(0))
    assert tokens.tolist() == [1] * 64
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[:, 1], atol=0, rtol=0)


# ============================================================================ KV cache, shared contexts
def test_preallocated_cache_holds_exactly_its_capacity() -> None:
    cache = PreallocatedCache(1, capacity=4)
    g = torch.Generator().manual_seed(0)
    k1, k2 = torch.randn(2, 1, 2, 3, generator=g), torch.randn(2, 1, 2, 3, generator=g)
    cache.update(k1, -k1, 0)
    keys, values = cache.update(k2, -k2, 0)  # 4 tokens in a cache of 4
    assert torch.equal(keys, torch.cat([k1, k2], dim=2)) and torch.equal(values, -keys)
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError, match="5 tokens > capacity 4"):
        cache.update(k1[:, :, :1], k1[:, :, :1], 0)


def test_shared_context_forward_is_taken_only_when_strictly_fewer_tokens() -> None:
    """2 distinct contexts (the longest 3 tokens) and 3 rows: the shared forward costs 2*3 + 3*(T-1) tokens (T the
    longest target), full rows 3 * the longest row.  T = 3, rows of up to 4: 12 vs 12, a tie, so full rows; T = 2:
    9 < 12, shared (a cost rule only: both forwards give the same log-probs)."""
    assert shared_context_rows(["a", "a", "b"], [3, 3, 1], [2, 2, 3], [4, 4, 3]) is None  # 6 + 3*2 = 12, not < 12
    assert shared_context_rows(["a", "a", "b"], [3, 3, 1], [2, 2, 2], [4, 4, 2]) == [0, 0, 1]  # 6 + 3*1 = 9 < 12


# ============================================================================ Janus prompts
def test_an_image_without_a_placeholder_comes_first_and_blank_text_is_left_out() -> None:
    assert user_content("Describe {prompt}", {"prompt": "x"}, True) == [{"type": "image"},
                                                                       {"type": "text", "text": "Describe x"}]
    assert user_content("  {image}{prompt}", {"prompt": "q"}, True) == [{"type": "image"}, {"type": "text", "text": "q"}]
    assert user_content("{prompt}{image}", {"prompt": "q"}, True) == [{"type": "text", "text": "q"}, {"type": "image"}]


def test_templates_accept_a_blank_uncond_and_refuse_two_images() -> None:
    assert check_templates({**JANUS_TEMPLATES, "generate_uncond": "  \n"})["generate_uncond"] == "  \n"
    with pytest.raises(UserError, match=r"templates.reflect: \{image\} may appear at most once"):
        check_templates({**JANUS_TEMPLATES, "reflect": "{image} {prompt} {image}"})


# ============================================================================ Janus sampling (tiny Janus)
class ScriptedHead(torch.nn.Module):
    """A head whose step-t output is ``script[t]`` whatever the hidden state (rows must match)."""

    def __init__(self, script: list[torch.Tensor]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # the engine reads its device from lm_head.weight
        self.script, self.calls = script, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.script[self.calls]
        assert out.shape[0] == hidden.shape[0]
        self.calls += 1
        return out


@contextlib.contextmanager
def _swapped(module: torch.nn.Module, name: str, new: torch.nn.Module):
    """A submodule swapped for the block (pytest's monkeypatch would delete it on undo: it lives in ``_modules``,
    not the instance ``__dict__``)."""
    old = getattr(module, name)
    setattr(module, name, new)
    try:
        yield new
    finally:
        setattr(module, name, old)


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import make_tiny_janus

    torch.set_num_threads(1)
    path = make_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny")
    return JanusPolicy.from_pretrained(path, templates=JANUS_TEMPLATES, dtype="float32", device="cpu")


def test_image_sampling_draws_what_multinomial_draws_from_the_guided_warped_distribution(janus) -> None:
    """Peer: transformers' CFG processor and warpers, and ``torch.multinomial`` on the caller's own generator (CPU):
    the same tokens, log-probs, and the generator left where those draws leave it."""
    n, steps, vocab = 2, 5, janus.model.config.vq_config.num_embeddings
    g = torch.Generator().manual_seed(11)
    script = [torch.randn(2 * n, vocab, generator=g) * 3.0 for _ in range(steps)]  # cond rows, then null rows
    sp = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, cfg_scale=3.0)
    ctx = [janus._ids("generate", {"prompt": p}, False, True) for p in ("a red cube", "two blue spheres on a table")]
    ours_g = torch.Generator().manual_seed(5)
    with _swapped(janus.model.model, "generation_head", ScriptedHead(script)):
        toks, lps = janus.engine.sample(ctx, [None, None], "image", sp, steps, ours_g,
                                        null_ids=[janus._null(c) for c in ctx])
    ref_g = torch.Generator().manual_seed(5)
    cfg = ClassifierFreeGuidanceLogitsProcessor(sp.cfg_scale)
    want_t, want_lp = [], []
    for logits in script:
        lp = _hf_logprobs(cfg(torch.zeros(n, 1, dtype=torch.long), logits), sp)
        tok = torch.multinomial(lp.exp(), 1, generator=ref_g).squeeze(-1)
        want_t.append(tok)
        want_lp.append(lp.gather(-1, tok[:, None]).squeeze(-1))
    assert toks == torch.stack(want_t, 1).tolist()
    np.testing.assert_allclose(lps, torch.stack(want_lp, 1).numpy(), atol=1e-5, rtol=0)
    assert torch.equal(ours_g.get_state(), ref_g.get_state())


def test_text_rows_stop_at_their_first_stop_token_and_sampling_ends_once_all_have(janus) -> None:
    """Row 0 draws its stop token at step 1 and again at step 3, row 1 at step 3: row 0 is [a, eos], row 1
    [a, b, b, eos] (the stop token kept), and no fifth step runs."""
    vocab, eos, allowed = janus.model.lm_head.out_features, janus.eos_id, janus.text_mask
    a, b = [i for i in range(vocab) if bool(allowed[i]) and i != eos][:2]

    def certain(*toks: int) -> torch.Tensor:  # row r draws toks[r] with probability 1
        x = torch.full((len(toks), vocab), float("-inf"))
        x[range(len(toks)), list(toks)] = 0.0
        return x

    head = ScriptedHead([certain(a, a), certain(eos, b), certain(a, b), certain(eos, eos), certain(a, a),
                         certain(a, a)])
    ctx = [janus._ids("reason", {"prompt": p}, False, False) for p in ("a red cube", "two cats")]
    with _swapped(janus.model, "lm_head", head):
        toks, lps = janus.engine.sample(ctx, [None, None], "text", SamplingParams(temperature=0.7, top_p=0.9), 6,
                                        torch.Generator().manual_seed(0), allowed=allowed, stop_id=eos)
    assert toks == [[a, eos], [a, b, b, eos]]
    assert lps == [[0.0] * 2, [0.0] * 4]
    assert head.calls == 4  # every row stopped at step 3: no decoding after it


def test_decoded_pixels_are_clamped_to_0_255_not_wrapped(janus, monkeypatch) -> None:
    """``(x * std + mean) / rescale`` clipped to [0, 255], then truncated (the processor's postprocess)."""
    x = torch.tensor([[[[1.5, -1.5, 0.1], [2.0, -2.0, 0.0]]]])  # [B=1, H=1, W=2, 3], normalised
    monkeypatch.setattr(janus.model, "decode_image_tokens", lambda tokens: x)
    out = janus.engine.decode_images(torch.zeros(1, 4, dtype=torch.long), [0.5] * 3, [0.5] * 3, 1 / 255)
    # 318.75 -> 255, -63.75 -> 0, 140.25 -> 140; 382.5 -> 255, -127.5 -> 0, 127.5 -> 127
    assert out.dtype == np.uint8 and out.tolist() == [[[[255, 0, 140], [255, 0, 127]]]]


# ============================================================================ Ray runtime (no Ray started)
def test_start_ray_passes_the_local_settings_and_leaves_a_joined_cluster_and_the_env_alone(monkeypatch) -> None:
    import ray

    from r3_rl.ray_runtime import start_ray

    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw, visible=os.environ.get("CUDA_VISIBLE_DEVICES")))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert start_ray(RayCfg(num_cpus=3), ["2", "5"])
    assert seen["num_cpus"] == 3 and seen["num_gpus"] == 2 and seen["visible"] == "2,5"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # unset before, unset after
    seen.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert start_ray(RayCfg(address="10.0.0.1:6379"), ["1"])  # a joined cluster keeps what `ray start` gave it
    assert seen["address"] == "10.0.0.1:6379" and "num_gpus" not in seen and "num_cpus" not in seen
    assert seen["visible"] == "0,1" == os.environ["CUDA_VISIBLE_DEVICES"]


def test_stop_ray_stops_only_a_ray_this_run_started(monkeypatch) -> None:
    import ray

    from r3_rl.ray_runtime import stop_ray

    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    assert stop_ray(False) is False and calls == []
    assert stop_ray(True) is False and calls == ["shutdown"]


def test_first_line_names_the_cause_and_its_first_line() -> None:
    from r3_rl.ray_actors import first_line

    class TaskError(Exception):  # what RayTaskError looks like: a wrapper whose ``cause`` is what happened
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray::Worker.run() failed\nTraceback ...")
            self.cause = cause

    assert first_line(TaskError(ValueError("bad weights\nat line 3"))) == "ValueError: bad weights"
    assert first_line(RuntimeError("  first\nsecond")) == "RuntimeError: first"
    assert first_line(RuntimeError("x" * 200)) == "RuntimeError: " + "x" * 160
    assert first_line(KeyError()) == "KeyError"


def test_unplaced_reason_lists_only_the_resources_short(monkeypatch) -> None:
    import ray

    from r3_rl.ray_actors import unplaced_reason

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0, "GPU": 0.5})
    assert unplaced_reason({"CPU": 2, "GPU": 1, "memory": 0}) == "no node has 1 free GPU"  # 2 CPUs free: enough
    assert unplaced_reason({"CPU": 2.0}) == "it was not placed"


def _group(monkeypatch, started: list, timeouts: list[float], attempts: int, min_alive: int, events: list[str]):
    import r3_rl.ray_actors as ra

    monkeypatch.setattr(ra, "start_actors", lambda factory, n, need, placement_s, start_s: list(started))
    monkeypatch.setattr(ra, "get_within", lambda ref, timeout_s, what: timeouts.append(timeout_s))
    monkeypatch.setattr(ra, "kill_actors", lambda actors: None)
    return ra.ActorGroup("rollout worker", lambda: None, {"CPU": 1}, RayCfg(placement_timeout_s=5, call_timeout_s=50),
                         attempts=attempts, min_alive=min_alive, log_event=events.append)


def test_actor_group_start_names_the_first_failure_and_carries_on_with_min_alive(monkeypatch) -> None:
    import r3_rl.ray_actors as ra

    started = [ra.ActorLost("it died while starting (boom)"), ("a1", "node-one"), ra.Unplaced("no node has 1 free GPU")]
    events: list[str] = []
    g = _group(monkeypatch, started, [], attempts=1, min_alive=1, events=events)
    g.start(3, prepare=lambda actor: "ref")
    assert g.actors == {1: "a1"} and events == [
        "rollout worker 0 could not be started: it died while starting (boom); continuing with 1 of 3 rollout workers"]
    with pytest.raises(ra.ClusterError, match=r"^rollout worker 0 could not be started: it died while starting \(boom\)$"):
        _group(monkeypatch, started, [], attempts=1, min_alive=2, events=[]).start(3, prepare=lambda actor: "ref")


def test_a_replacement_gets_an_attempt_even_with_no_retries_and_the_call_timeout_to_prepare(monkeypatch) -> None:
    """``rollout.max_task_retries: 0`` still replaces a lost worker once; its set-up (weights) may take
    ``call_timeout_s``, not the placement timeout."""
    events: list[str] = []
    timeouts: list[float] = []
    g = _group(monkeypatch, [("fresh", "node-abcdef123")], timeouts, attempts=0, min_alive=1, events=events)
    g.actors, g.nodes, g.size = {0: "old", 1: "other"}, {0: "n0", 1: "n1"}, 2
    assert g.replace(0, "its node died", prepare=lambda actor: "ref")
    assert g.actors == {0: "fresh", 1: "other"} and g.restarts == 1 and timeouts == [50]
    assert events[0] == "rollout worker 0 lost (its node died)"
    assert events[1].startswith("rollout worker 0 restarted on node node-abc (") and events[1].endswith(
        ", attempt 1/1)")
