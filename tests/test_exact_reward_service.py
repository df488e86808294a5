"""Exact, small checks of the reward service and its plumbing: server limits at their boundaries, the wire
format's guards, the HTTP client's retry/scrub/cap rules, failure accounting and the pure helpers.

Every expected value is worked out by hand in the test (never read back from the code under test).  Servers
bind 127.0.0.1 on port 0 and are shut down by their fixture's finalizer.
"""
from __future__ import annotations

import asyncio
import base64
import gzip
import http.client
import http.server
import io
import json
import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample, Turn
from r3_rl.rewards.checklists import article, number_word, plural, tiif_questions
from r3_rl.rewards.compose import CriticRule, format_ok, improvement, reflect_own_reward
from r3_rl.rewards.detectors import DetectedObject, mask_to_box, normalize_label, select
from r3_rl.rewards.http_json import (HttpError, _Inflater, make_client, one_line, parse_retry_after, request_json,
                                     scrub)
from r3_rl.rewards.registry import FunctionReward, to_output, with_recipe_defaults
from r3_rl.rewards.reward_set import FailureBudget, RewardSet, ScoredSample, call_isolating
from r3_rl.rewards.self_consistency import VerdictConsistencyReward, agreement
from r3_rl.rewards.server import Limits, ScoreService, make_server, parse_option_args
from r3_rl.rewards.wire import (WireError, WireLimitError, count_images, decode_image, output_from_json, png_size,
                                sample_from_json)


# ---------------------------------------------------------------- helpers
def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def sample(prompt: str = "p", **kw: Any) -> RewardSample:
    return RewardSample(prompt=prompt, metadata={}, stage="generate", round=0, image=None, **kw)


class _Len(Reward):
    """Scores len(prompt); on prompt 'short' returns one result too few."""

    name = "len"

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        out = [RewardOutput(score=float(len(s.prompt))) for s in samples]
        return out[:-1] if any(s.prompt == "short" for s in samples) else out


@pytest.fixture(scope="module")
def small_server() -> Iterator[Any]:
    """Smallest limits make_server allows: 1024-byte bodies, 1024 bytes in flight, 3 images, 100 pixels."""
    srv = make_server(_Len(), "127.0.0.1", 0, max_request_bytes=1024, max_inflight_bytes=1024, max_images=3,
                      max_image_pixels=100, max_concurrency=4, client_timeout=5.0).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(srv: Any, body: bytes, ctype: str = "application/json") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    try:
        conn.request("POST", "/score", body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# ---------------------------------------------------------------- server limits
def test_body_of_exactly_the_request_and_inflight_limit_is_admitted(small_server: Any) -> None:
    """Catches `size > max_request_bytes` / `inflight + size > max_inflight_bytes` turned into `>=` (a 1024-byte body refused)."""
    body = b'{"samples": []}'
    body += b" " * (1024 - len(body))
    assert len(body) == 1024
    assert post(small_server, body) == (200, {"results": []})
    code, reply = post(small_server, body + b" ")
    assert code == 413 and reply["error"] == ("request of 1025 bytes exceeds the server limit of 1024; "
                                              "send smaller batches")


def test_health_reports_each_limit_under_its_own_key(small_server: Any) -> None:
    """Catches /health publishing the wrong limit under a key (e.g. max_concurrency as max_images)."""
    conn = http.client.HTTPConnection("127.0.0.1", small_server.server_address[1], timeout=10)
    conn.request("GET", "/health")
    reply = json.loads(conn.getresponse().read())
    conn.close()
    assert reply == {"status": "ok", "reward": "len", "max_request_bytes": 1024, "max_images": 3,
                     "max_image_pixels": 100, "active": 0}


def test_content_type_is_matched_case_insensitively(small_server: Any) -> None:
    """Catches the media type compared without lower-casing (RFC 9110: case-insensitive), refusing Application/JSON."""
    assert post(small_server, b'{"samples": [{"prompt": "abc"}]}', ctype="Application/JSON") == (
        200, {"results": [{"score": 3.0, "components": {}, "reason": None, "failure": None}]})


def test_a_reward_returning_too_few_results_is_a_500_not_a_short_answer(small_server: Any) -> None:
    """Catches the server's result-count check dropped: 2 samples answered with 1 result (whose is whose?)."""
    code, reply = post(small_server, b'{"samples": [{"prompt": "short"}, {"prompt": "ab"}]}')
    assert code == 500 and reply == {"error": "ValueError: reward returned 1 results for 2 samples"}


def test_history_images_count_against_the_image_cap(small_server: Any) -> None:
    """Catches count_images ignoring history images: 1 latest + 3 history images is 4, over max_images=3."""
    img = b64(png_bytes(Image.new("RGB", (2, 2))))
    body = json.dumps({"samples": [{"prompt": "p", "image": img,
                                    "history": [{"stage": "generate", "image": img}] * 3}]}).encode()
    assert len(body) <= 1024
    code, reply = post(small_server, body)
    assert code == 413 and reply["error"].startswith("request holds 4 images, over the server's limit of 3")


def test_json_value_count_limit_is_exact_and_counts_braces() -> None:
    """Catches `values > MAX_JSON_VALUES` as `>=` and '{' dropped from the count of JSON values."""
    svc = ScoreService(_Len(), Limits())

    def body(fill: bytes, n: int) -> bytearray:  # '{' 1 + '[' 1 + ',' 1 + the n fill characters
        return bytearray(b'{"samples": [], "x": "' + fill * n + b'"}')
    assert svc._score_json(body(b",", 999_997)) == (200, {"results": []})  # exactly 1,000,000 values
    code, reply = svc._score_json(body(b",", 999_998))
    assert code == 413 and reply["error"].startswith("request holds about 1000001 JSON values")
    code, reply = svc._score_json(body(b"{", 999_998))
    assert code == 413 and reply["error"].startswith("request holds about 1000001 JSON values")


def test_refusal_wait_is_the_shorter_of_client_timeout_and_drain_seconds() -> None:
    """Catches refusal_wait as max(): a 2 s client timeout would linger 5 s on every refused request."""
    assert Limits(client_timeout=2.0).refusal_wait == 2.0
    assert Limits(client_timeout=30.0).refusal_wait == 5.0


def test_make_server_limit_boundaries() -> None:
    """Catches a zero client_timeout accepted, and 1024-byte bodies or inflight == request refused."""
    with pytest.raises(UserError, match="every limit must be positive"):
        make_server(_Len(), "127.0.0.1", 0, client_timeout=0)
    with pytest.raises(UserError, match="at least 1024 bytes, got 1023"):
        make_server(_Len(), "127.0.0.1", 0, max_request_bytes=1023)
    with pytest.raises(UserError, match="--max-inflight-mb >= --max-request-mb"):
        make_server(_Len(), "127.0.0.1", 0, max_request_bytes=2048, max_inflight_bytes=2047)
    srv = make_server(_Len(), "127.0.0.1", 0, max_request_bytes=1024, max_inflight_bytes=1024)
    srv.server_close()


def test_parse_option_args_blank_key_and_empty_value() -> None:
    """Catches `=x` accepted under key '' and `k=` read as YAML null instead of ''."""
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_option_args(["=x"])
    assert parse_option_args(["k=", "j= "]) == {"k": "", "j": ""}


# ---------------------------------------------------------------- wire format
def test_png_size_reads_width_then_height_and_refuses_a_short_header() -> None:
    """Catches width/height swapped from the IHDR (the 413 names 20x300 for a 300x20 PNG) and a 23-byte header accepted."""
    raw = png_bytes(Image.new("1", (300, 20)))
    assert png_size(raw) == (300, 20)
    with pytest.raises(WireLimitError) as e:
        decode_image(b64(raw), "img", max_pixels=5999)
    assert str(e.value) == "img: 300x20 = 6000 pixels, over the server's limit of 5999 (--max-image-pixels)"
    with pytest.raises(WireError, match="not a PNG image"):
        png_size(raw[:23], "img")


def test_image_of_exactly_max_pixels_is_decoded() -> None:
    """Catches `w * h > max_pixels` as `>=`: a 10x10 image refused under a 100-pixel limit."""
    arr = decode_image(b64(png_bytes(Image.new("RGB", (10, 10), (1, 2, 3)))), max_pixels=100)
    assert arr.shape == (10, 10, 3) and arr[0, 0].tolist() == [1, 2, 3]


def test_base64_with_stray_characters_is_refused() -> None:
    """Catches validate=True dropped: characters outside the base64 alphabet silently discarded."""
    good = b64(png_bytes(Image.new("RGB", (2, 2))))
    with pytest.raises(WireError, match=r"img: not a base64-encoded image \(bad base64\)"):
        decode_image(good[:8] + "!" + good[8:], "img")


def test_palette_png_decodes_to_rgb_colours() -> None:
    """Catches palette ('P') images passed through as an HxW array of palette indices."""
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    arr = decode_image(b64(png_bytes(im)))
    assert arr.shape == (1, 2, 3) and arr.tolist() == [[[0, 0, 0], [255, 0, 0]]]


def test_count_images_counts_latest_and_history_images() -> None:
    """Catches history images not counted (the image cap bypassed through history)."""
    samples = [{"image": "a", "history": [{"image": "b"}, {"image": None}, {"text": "t"}, "junk"]},
               {"image": None, "history": "nope"}, "not a dict", {"history": [{"image": "c"}]}]
    assert count_images(samples) == 3


def test_sample_from_json_defaults() -> None:
    """Catches a wrong default stage (a missing stage must read as 'generate')."""
    s = sample_from_json({"prompt": "p"})
    assert (s.prompt, s.metadata, s.stage, s.round, s.image, s.history, s.text) == ("p", {}, "generate", 0, None, [], None)


def test_a_boolean_score_or_a_missing_score_from_a_server_is_not_a_number() -> None:
    """Catches `true` read as score 1.0 and a reply with no score and no failure read as a success."""
    with pytest.raises(WireError, match=r"results\[0\]\.score: expected a finite number, got True"):
        output_from_json({"score": True})
    with pytest.raises(WireError, match=r"^results\[0\]\.score: expected int/float, got str$"):  # bool is no kind
        output_from_json({"score": "0.5"})
    with pytest.raises(WireError, match=r"results\[0\]\.components\.c: expected a finite number"):
        output_from_json({"score": 0.5, "components": {"c": False}})
    out = output_from_json({"score": None})
    assert out.failed and out.failure == "server returned no score"


# ---------------------------------------------------------------- HTTP client
def test_scrub_masks_the_last_piece_of_a_secret() -> None:
    """Catches the last PIECE-long run of a secret missing from the pieces scrubbed."""
    assert scrub("key=23456789!", ["0123456789"]) == "key=***!"
    assert scrub("x 01234567 y", ["0123456789"]) == "x *** y"


def test_one_line_scrubs_before_it_cuts() -> None:
    """Catches cutting before scrubbing: a secret straddling the cut leaks its first characters."""
    assert one_line("a" * 195 + "SECRETKEY123", ["SECRETKEY123"]) == "a" * 195 + "***"


def test_parse_retry_after_seconds_and_dates() -> None:
    """Catches a past HTTP date giving a negative delay (no clamp at 0)."""
    when = "Wed, 21 Oct 2015 07:28:00 GMT"  # 1445412480 (date -u -d ... +%s)
    assert parse_retry_after(when, now=1445412480 - 10) == 10.0
    assert parse_retry_after(when, now=1445412480 + 10) == 0.0
    assert parse_retry_after(" 7 ") == 7.0 and parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_inflater_cap_is_exact_and_a_bomb_is_refused_not_truncated() -> None:
    """Catches the decompress limit without its +1 (a bomb silently cut to the cap) and `> cap` as `>=`."""
    ok = _Inflater("gzip", "u", 100)
    ok.feed(gzip.compress(b"x" * 100))
    assert bytes(ok.out) == b"x" * 100
    bomb = _Inflater("gzip", "u", 100)
    with pytest.raises(HttpError, match="reply from u is over 100 bytes"):
        bomb.feed(gzip.compress(b"x" * 101))
    plain = _Inflater("identity", "u", 100)
    plain.feed(b"y" * 100)
    with pytest.raises(HttpError, match="over 100 bytes"):
        plain.feed(b"y")


def test_proxy_environment_is_ignored_for_loopback_only() -> None:
    """Catches trust_env left on for 127.0.0.1 (an HTTP_PROXY would capture calls to a local reward server)."""
    local, remote = make_client("http://127.0.0.1:9/x"), make_client("http://example.com/x")
    try:
        assert (local.trust_env, remote.trust_env) == (False, True)
    finally:
        asyncio.run(local.aclose())
        asyncio.run(remote.aclose())


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the next scripted (status, headers, body); counts the requests."""

    script: list[tuple[int, dict[str, str], bytes]] = []
    hits = 0

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).hits += 1
        status, headers, body = type(self).script.pop(0) if type(self).script else (500, {}, b'{"error": "x"}')
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, type[_Scripted]]]:
    handler = type("Handler", (_Scripted,), {"script": [], "hits": 0})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/score", handler
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_retries_zero_means_one_attempt(scripted: tuple[str, type[_Scripted]]) -> None:
    """Catches `max(0, retries) + 1` as `max(1, ...)`: retries=0 sent the request twice."""
    url, handler = scripted
    with pytest.raises(HttpError) as e:
        request_json("POST", url, {"a": 1}, timeout=5, retries=0)
    assert e.value.status == 500 and handler.hits == 1
    with pytest.raises(HttpError, match=r"\(after 3 attempts\)"):
        request_json("POST", url, {"a": 1}, timeout=5, retries=2, backoff=0.01)
    assert handler.hits == 4


def test_retry_after_is_honoured_up_to_and_including_the_maximum(scripted: tuple[str, type[_Scripted]]) -> None:
    """Catches Retry-After treated as a ceiling (min) instead of a floor, and Retry-After == max_retry_after refused."""
    url, handler = scripted
    handler.script = [(503, {"Retry-After": "1"}, b'{"error": "busy"}'), (200, {}, b'{"ok": true}')]
    t0 = time.monotonic()
    assert request_json("POST", url, {"a": 1}, timeout=5, retries=1, backoff=0.01, max_retry_after=1.0) == {"ok": True}
    assert time.monotonic() - t0 >= 0.95 and handler.hits == 2


def test_429_is_retried(scripted: tuple[str, type[_Scripted]]) -> None:
    """Catches a 429 (Too Many Requests) treated as final."""
    url, handler = scripted
    handler.script = [(429, {}, b'{"error": "slow down"}'), (200, {}, b'{"ok": 1}')]
    assert request_json("POST", url, {}, timeout=5, retries=1, backoff=0.01) == {"ok": 1}
    assert handler.hits == 2


# ---------------------------------------------------------------- reward set and failure budget
def test_a_boolean_weight_is_refused() -> None:
    """Catches `weight: true` accepted as 1.0."""
    with pytest.raises(UserError, match=r"rewards\[0\] \(blocks\): 'weight' must be a finite number, got True"):
        RewardSet.from_specs([{"name": "blocks", "weight": True}])


class _FailsOn(Reward):
    """Raises ValueError('bad') for a batch holding prompt 'bad'; else scores 1."""

    name = "fails_on"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        self.calls += 1
        if any(s.prompt == "bad" for s in samples):
            raise ValueError("bad")
        return [RewardOutput(score=1.0) for _ in samples]


def test_isolation_fails_only_the_raising_sample() -> None:
    """Catches the stop rule `all halves failed alike` as `any`: the good half failed with the bad one."""
    rw = _FailsOn()
    out = call_isolating(rw, [sample("ok"), sample("bad")])
    assert [(o.score, o.failure) for o in out] == [(1.0, None), (None, "ValueError: bad")]
    assert rw.calls == 3


class _Many(Reward):
    """Returns one result more than it was given samples."""

    name = "many"

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        return [RewardOutput(score=1.0) for _ in range(len(samples) + 1)]


def test_too_many_results_fail_the_whole_batch() -> None:
    """Catches the result-count check as `<`: 3 results for 2 samples silently truncated by zip."""
    out = call_isolating(_Many(), [sample(), sample()])
    assert [o.failure for o in out] == ["ValueError: returned 3 results for 2 samples"] * 2


class _NamesTheBatch(Reward):
    """Always raises, with a message naming the batch (so no split looks like its parent)."""

    name = "names"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        self.calls += 1
        raise RuntimeError(f"batch of {len(samples)} from {samples[0].prompt}")


def test_isolation_call_budget_is_8_log2_n() -> None:
    """Catches the call budget dropped: 64 samples failing everywhere cost 127 calls, not 1 + 8 x 7 = 57."""
    rw = _NamesTheBatch()
    out = call_isolating(rw, [sample(str(i)) for i in range(64)])
    assert rw.calls == 57 and len(out) == 64 and all(o.failed for o in out)


def _scored(n_ok: int, n_failed: int) -> list[ScoredSample]:
    return [ScoredSample(total=1.0) for _ in range(n_ok)] + \
           [ScoredSample(total=None, failures={"r": "boom"}) for _ in range(n_failed)]


def test_failure_budget_boundaries() -> None:
    """Catches the check starting after min_samples (not at it) and a fraction equal to the maximum raising."""
    at_max = FailureBudget(0.5, min_samples=4)
    at_max.record(_scored(2, 2))  # 2/4 = 0.5, not over 0.5
    over = FailureBudget(0.25, min_samples=4)
    with pytest.raises(UserError) as e:
        over.record(_scored(2, 2))  # exactly min_samples scored: checked
    assert str(e.value) == ("rewards: 2/4 samples failed (50% > rewards.max_failure_fraction=0.25); failing: r x2; "
                            "last r failure: boom")
    FailureBudget(1.0)
    FailureBudget(0.0)
    with pytest.raises(UserError, match=r"must be in \[0, 1\], got 1.01"):
        FailureBudget(1.01)


def test_failure_budget_metric_names() -> None:
    """Catches a renamed tracker key (dashboards read rewards/failed_fraction)."""
    b = FailureBudget(1.0, min_samples=1)
    b.record(_scored(3, 1))
    assert b.metrics() == {"rewards/scored": 4.0, "rewards/failed": 1.0, "rewards/failed_fraction": 0.25,
                           "rewards/failed/r": 1.0}


# ---------------------------------------------------------------- compose, registry, checklists, consistency, detectors
def test_compose_edges() -> None:
    """Catches format_ok without strip, an unchanged edit counted as improved, and the verdict term not gated by format."""
    assert format_ok("  <think>x</think>\n")
    assert improvement(0.3, 0.3, stop=False, rule=CriticRule(edit_flawed_unimproved=-0.5)) == -0.5
    assert improvement(0.3, 0.4, stop=False, rule=CriticRule(edit_flawed_unimproved=-0.5)) == pytest.approx(0.1)
    assert reflect_own_reward({"format": 0.0, "verdict_term": 1.0}, 0.2) == 0.0
    assert reflect_own_reward({"format": 1.0, "verdict_term": 1.0, "extra": 0.5}, 0.2) == pytest.approx(1.7)


def test_recipe_default_never_overrides_an_explicit_option() -> None:
    """Catches with_recipe_defaults replacing the entry's own stop_phrase with the recipe-wide one."""
    spec = {"name": "verdict_consistency", "options": {"stop_phrase": "done"}}
    assert with_recipe_defaults(spec, {"stop_phrase": "no further edit needed"}) == spec
    assert with_recipe_defaults({"name": "verdict_consistency"}, {"stop_phrase": "stop"}) == {
        "name": "verdict_consistency", "options": {"stop_phrase": "stop"}}


def test_function_reward_and_to_output_guards() -> None:
    """Catches a short result list from a reward function accepted and an infinite score kept."""
    with pytest.raises(ValueError, match="reward 'f' returned 1 scores for 2 samples"):
        FunctionReward(lambda s: [1.0], "f")([sample(), sample()])
    assert to_output(float("inf")).failure == "reward returned a non-finite score (inf)"
    assert to_output(RewardOutput(score=float("-inf"), reason="r")).failed


def test_checklist_words() -> None:
    """Catches plural 'days' -> 'daies', number_word(13) out of range, article ignoring case, ' Yes ' refused."""
    assert [plural(w) for w in ("day", "strawberry", "toy", "wine glass")] == ["days", "strawberries", "toys", "wine glasses"]
    assert (number_word(12), number_word(13)) == ("twelve", "13")
    assert article("Apple") == "an Apple" and article("car") == "a car"
    assert [q.answer for q in tiif_questions({"yn_question_list": ["Q?", "R?"], "yn_answer_list": [" Yes ", "NO"]})] == ["yes", "no"]


def test_hard_agreement_needs_more_than_half() -> None:
    """Catches the hard answer threshold `p > 0.5` as `>=` (a coin flip counted as yes)."""
    assert agreement([0.5, 0.5], ["yes", "no"], hard=True) == 0.5
    assert agreement([0.5], ["yes"], hard=True) == 0.0


def test_verdict_consistency_counts_reward_at_threshold_as_correct() -> None:
    """Catches `r >= correct_threshold` as `>`: a stop on an image scoring exactly the threshold judged wrong."""
    img = np.zeros((2, 2, 3), dtype=np.uint8)
    hist = [Turn("generate", 0, image=img, reward=0.8), Turn("reflect", 1, text="<think>ok</think> no further edit needed")]
    s = RewardSample(prompt="p", metadata={}, stage="reflect", round=1, image=None, history=hist)
    out = VerdictConsistencyReward(correct_threshold=0.8)([s])[0]
    assert (out.score, out.components) == (1.0, {"stop": 1.0, "correct": 1.0})


def test_detector_selection_edges() -> None:
    """Catches NMS keeping a box at IoU == threshold, a score == threshold kept, mask boxes without the +1 edge,
    and a label map keyed by the raw label losing to its normalised key."""
    a = DetectedObject("cat", (0, 0, 9, 9), 0.9)  # area 10x10 = 100 (inclusive pixels)
    b = DetectedObject("cat", (0, 0, 9, 4), 0.8)  # area 10x5 = 50, inside a: IoU 50/100 = 0.5
    c = DetectedObject("cat", (0, 0, 9, 9), 0.3)
    assert select([b, a, c], threshold=0.3, nms_threshold=0.5) == [a]
    assert select([b, a, c], threshold=0.3) == [a, b]
    mask = np.zeros((5, 6), dtype=bool)
    mask[2, 3] = True
    assert mask_to_box(mask) == (3.0, 2.0, 4.0, 3.0)
    assert normalize_label("Tv-Monitor", {"Tv-Monitor": "screen", "tv monitor": "television"}) == "screen"


# ---------------------------------------------------------------- actual bugs in today's code
class _NumpyReason(Reward):
    """Returns a numpy float as its reason (json.dumps cannot encode it: TypeError, not ValueError)."""

    name = "numpy_reason"

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        return [RewardOutput(score=1.0, reason=np.float32(0.5)) for _ in samples]  # type: ignore[arg-type]


class _TupleKey(Reward):
    """Returns a component named by a tuple (json.dumps cannot encode the key: TypeError, not ValueError)."""

    name = "tuple_key"

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        return [RewardOutput(score=1.0, components={("a", 1): 0.5}) for _ in samples]  # type: ignore[dict-item]


# Found by round 8A: _score_body caught only ValueError from json.dumps; a reason or component key JSON cannot
# encode raised TypeError, which escaped the worker thread, and Starlette answered a plain-text 500 with a traceback.
def test_an_unencodable_reward_reply_is_a_json_500() -> None:
    """Catches a reward reply json cannot encode escaping _score_body instead of becoming a JSON 500."""
    code, raw = ScoreService(_TupleKey(), Limits())._score_body(bytearray(b'{"samples": [{"prompt": "p"}]}'))
    assert code == 500 and json.loads(raw)["error"].startswith("reward reply is not JSON (")


def test_a_reason_that_is_not_text_is_sent_as_text() -> None:
    """A numpy float reason is sent as the text "0.5" (session 53): before, the whole batch was a 500."""
    code, raw = ScoreService(_NumpyReason(), Limits())._score_body(bytearray(b'{"samples": [{"prompt": "p"}]}'))
    assert code == 200 and json.loads(raw)["results"][0]["reason"] == "0.5"


# Found by round 8A: Python's json.loads accepts the non-JSON constants NaN and Infinity; a history turn's
# "reward": NaN became Turn.reward = nan and verdict_consistency scored the critique as if the image were flawed
# (nan >= threshold is False) instead of refusing the request.
@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_in_a_request_body_is_a_400(constant: bytes) -> None:
    """Catches NaN/Infinity (not JSON) accepted in a request and passed to the reward as a float."""
    body = bytearray(b'{"samples": [{"prompt": "p", "history": [{"stage": "generate", "reward": %s}]}]}' % constant)
    code, reply = ScoreService(_Len(), Limits())._score_json(body)
    assert code == 400 and reply["error"].startswith("body is not JSON")


@pytest.mark.parametrize("field, where", [
    ({"round": True}, "samples[0].round: expected int, got bool"),
    ({"history": [{"stage": "generate", "reward": True}]}, "samples[0].history[0].reward: expected int/float, got bool"),
    ({"history": [{"stage": "generate", "round": False}]}, "samples[0].history[0].round: expected int, got bool"),
])
def test_a_boolean_round_or_reward_in_a_request_is_refused(field: dict[str, Any], where: str) -> None:
    """``true`` is an int to Python: a turn's reward ``true`` was read as 1.0 (a correct image), ``round: true`` as 1."""
    with pytest.raises(WireError, match=f"^{where.replace('[', '[[]')}$"):
        sample_from_json({"prompt": "p", **field})
