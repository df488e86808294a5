"""Exact, small cases for the reward server's hostile-input surface that the other tests left open (round 16 audit):
the hardened HTTP/1.1 protocol's timers and lingering close, the JSON-over-HTTP client's scrubbing, retry and
error rules, the wire format's round trip and type guards, the server's wiring of its limits, and the Ray reward
set's chunking.

Every expected value is worked out by hand from the documented behaviour (module and function docstrings), never
read back from the code under test.  Servers bind 127.0.0.1 on port 0 and are stopped by the test.
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import socket
import time
from types import SimpleNamespace
from typing import Any

import anyio
import h11
import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample, Turn
from r3_rl.rewards import http_json
from r3_rl.rewards.http_json import (HttpError, _Inflater, arequest_json, make_client, run_sync,
                                     scrub)
from r3_rl.rewards.server import Limits, ScoreService, _drain, make_server
from r3_rl.rewards.server_protocol import HardenedH11, _LingeringTransport
from r3_rl.rewards.wire import (WireError, WireLimitError, count_images, decode_image, encode_image, finite_float,
                                output_from_json, sample_from_json, sample_to_json)
from test_exact_ray_actors_runtime import _reward_set
from test_exact_reward_service import _FailsOn, _Len


# ---------------------------------------------------------------- server_protocol: timers and lingering close
class _Timer:
    def __init__(self, delay: float, fn: Any) -> None:
        self.delay, self.fn, self.cancelled = delay, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class _Loop:
    def __init__(self) -> None:
        self.timers: list[_Timer] = []

    def call_later(self, delay: float, fn: Any) -> _Timer:
        self.timers.append(_Timer(delay, fn))
        return self.timers[-1]


class _Real:
    """A socket transport stand-in that records what is done to it."""

    def __init__(self, closing: bool = False, can_eof: bool = True) -> None:
        self.calls: list[str] = []
        self.closing, self.can_eof = closing, can_eof

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return self.can_eof

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def close(self) -> None:
        self.calls.append("close")

    def get_extra_info(self, name: str) -> str:
        return f"extra:{name}"


def _proto(head_timeout: float = 7.0, linger_seconds: float = 3.0) -> HardenedH11:
    cls = type("P", (HardenedH11,), {"head_timeout": head_timeout, "linger_seconds": linger_seconds})
    proto = cls.__new__(cls)
    proto.loop = _Loop()  # type: ignore[assignment]
    return proto


def test_start_lingering_half_closes_resumes_reading_and_closes_after_linger_seconds() -> None:
    """Catches write_eof or resume_reading dropped, `lingering` not set, and the final close timed by head_timeout."""
    proto, real = _proto(head_timeout=7.0, linger_seconds=3.0), _Real()
    proto.start_lingering(real)
    assert proto.lingering is True and real.calls == ["write_eof", "resume_reading"]
    (timer,) = proto.loop.timers  # type: ignore[attr-defined]
    assert timer.delay == 3.0 and timer.fn == real.close and proto._linger_timer is timer  # cancelled if lost


def test_arming_the_head_deadline_cancels_the_previous_one() -> None:
    """Catches the old head timer left running: it fired head_timeout after the *first* request's start and closed
    a keep-alive connection that had just gone idle."""
    proto = _proto(head_timeout=7.0)
    proto._arm()
    proto._arm()
    first, second = proto.loop.timers  # type: ignore[attr-defined]
    assert (first.cancelled, second.cancelled) == (True, False)
    assert (first.delay, second.delay) == (7.0, 7.0) and second.fn == proto._head_too_slow


def test_losing_the_connection_cancels_both_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches connection_lost leaving the head and linger timers pending (each held the protocol for 30 s)."""
    monkeypatch.setattr(H11Protocol, "connection_lost", lambda self, exc: None)
    proto = _proto()
    proto._head_timer, proto._linger_timer = _Timer(1, None), _Timer(2, None)
    proto.connection_lost(None)
    assert (proto._head_timer.cancelled, proto._linger_timer.cancelled) == (True, True)


def _transport(state: Any, lingering: bool = False, **real_kw: Any) -> tuple[_LingeringTransport, _Real, list[Any]]:
    real, started = _Real(**real_kw), []
    proto = SimpleNamespace(lingering=lingering, conn=SimpleNamespace(their_state=state), start_lingering=started.append)
    return _LingeringTransport(real, proto), real, started  # type: ignore[arg-type]


def test_the_transport_lingers_only_while_a_body_is_still_arriving() -> None:
    """Catches the lingering test inverted or loosened: a close with the body still arriving must linger; one after
    the whole request, on a transport that cannot half-close, or one already lingering is a real close."""
    tr, real, started = _transport(h11.SEND_BODY)
    tr.close()
    assert started == [real] and real.calls == []
    for state, kw in ((h11.DONE, {}), (h11.IDLE, {}), (h11.SEND_BODY, {"can_eof": False}),
                      (h11.SEND_BODY, {"closing": True})):
        tr, real, started = _transport(state, **kw)
        tr.close()
        assert started == [] and real.calls == ["close"], (state, kw)
    tr, real, started = _transport(h11.SEND_BODY, lingering=True)  # the client's end of file: close for good
    tr.close()
    assert started == [] and real.calls == ["close"]
    assert tr.is_closing() is True and tr.get_extra_info("peername") == "extra:peername"
    assert _transport(h11.SEND_BODY)[0].is_closing() is False


class _Slow(Reward):
    """Scores 1 after 1.3 s: keeps the first request of a connection past a 1 s head deadline."""

    name = "slow"

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        time.sleep(1.3)
        return [RewardOutput(score=1.0) for _ in samples]


def test_a_keep_alive_connection_gets_a_fresh_head_deadline_after_each_answer() -> None:
    """Catches the head timer not re-armed after an answer: a keep-alive client that then sent half a request
    head held its connection forever (the first deadline had passed while the request was being scored)."""
    srv = make_server(_Slow(), "127.0.0.1", 0, client_timeout=1.0).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=6) as sk:
            body = b'{"samples": [{"prompt": "p"}]}'
            sk.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            resp = http.client.HTTPResponse(sk)
            resp.begin()
            assert resp.status == 200 and json.loads(resp.read())["results"][0]["score"] == 1.0
            sk.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")  # half a head, on the kept connection
            t0 = time.monotonic()
            try:
                rest = sk.recv(100)
            except ConnectionResetError:
                rest = b""
            assert rest == b"" and time.monotonic() - t0 < 5
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- server: how the limits are wired
def test_the_server_wires_each_limit_to_its_own_setting() -> None:
    """Catches the head deadline set from the refusal wait (or the linger from client_timeout), and uvicorn's
    connection cap taken from max_concurrency instead of max_connections."""
    srv = make_server(_Len(), "127.0.0.1", 0, client_timeout=7.0, max_connections=11, max_concurrency=3)
    try:
        proto = srv.server.config.http
        assert (proto.head_timeout, proto.linger_seconds) == (7.0, 5.0)
        assert srv.server.config.limit_concurrency == 11
    finally:
        srv.server_close()


def test_an_empty_batch_is_answered_without_calling_the_reward() -> None:
    """Catches the reward called with no samples (a detector's batch code run on an empty list)."""
    reward = _FailsOn()  # counts its calls
    assert ScoreService(reward, Limits())._score_json(bytearray(b'{"samples": []}')) == (200, {"results": []})
    assert reward.calls == 0


class _NanReason(Reward):
    name = "nan_reason"

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        return [RewardOutput(score=1.0, reason=float("nan")) for _ in samples]  # type: ignore[arg-type]


def test_a_nan_anywhere_in_a_reply_is_a_json_500_not_the_token_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches allow_nan dropped from the reply's encoding: a NaN in the reply went out as the non-JSON token NaN.
    Since session 53 a reward's float reason is sent as text ("nan"), so the NaN is planted in the reply itself."""
    code, raw = ScoreService(_NanReason(), Limits())._score_body(bytearray(b'{"samples": [{"prompt": "p"}]}'))
    assert code == 200 and json.loads(raw)["results"][0]["reason"] == "nan"
    service = ScoreService(_NanReason(), Limits())
    monkeypatch.setattr(service, "_score_json", lambda raw: (200, {"results": [{"score": float("nan")}]}))
    code, raw = service._score_body(bytearray(b'{"samples": [{"prompt": "p"}]}'))
    assert code == 500 and b"NaN" not in raw
    assert json.loads(raw)["error"].startswith("reward reply is not JSON (Out of range float values are not JSON compliant")


def test_a_client_gone_while_a_refused_body_drains_is_not_drained() -> None:
    """Catches ClientDisconnect left out of _drain's except: a client hanging up mid-body raised out of the 503/415."""
    async def go() -> bool:
        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}
        req = Request({"type": "http", "method": "POST", "path": "/score", "headers": []}, receive)
        return await _drain(req, 10, 2.0)
    assert anyio.run(go) is False


def test_an_oversize_request_is_answered_with_connection_close() -> None:
    """Catches the 413's ``Connection: close`` dropped: the client was told it could reuse a connection whose
    unread body the server then drops."""
    srv = make_server(_Len(), "127.0.0.1", 0, max_request_bytes=1024).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
        conn.request("POST", "/score", body=b" " * 1025, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Connection")) == (413, "close")
        assert json.loads(resp.read())["error"].startswith("request of 1025 bytes exceeds the server limit of 1024")
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_open_brackets_count_as_json_values() -> None:
    """Catches '[' dropped from the JSON-value count: a body of 1,000,001 '[' / ',' / '{' is refused before parsing."""
    svc = ScoreService(_Len(), Limits())
    code, reply = svc._score_json(bytearray(b'{"samples": [], "x": "' + b"[" * 999_998 + b'"}'))
    assert code == 413 and reply["error"].startswith("request holds about 1000001 JSON values")


# ---------------------------------------------------------------- http_json: scrubbing, errors, retries
SECRET = "sk-0123456789abcdef"


def test_an_empty_secret_does_not_stop_the_others_being_scrubbed() -> None:
    """Catches `continue` as `break` on an empty secret: every secret after it left in the text."""
    assert scrub(f"a {SECRET} b", ["", SECRET]) == "a *** b"


@pytest.mark.parametrize("url", ["http://localhost:9/x", "http://[::1]:9/x", "http://127.0.0.1:9/x"])
def test_every_loopback_name_ignores_the_proxy_environment(url: str) -> None:
    """Catches 'localhost' or '::1' missing from LOOPBACK: a proxy from the environment captured local calls."""
    client = make_client(url)
    try:
        assert client.trust_env is False
    finally:
        asyncio.run(client.aclose())


def test_an_unknown_encoding_is_named_in_at_most_40_characters() -> None:
    """Catches the Content-Encoding quoted whole: a hostile server's 10 kB header copied into every error."""
    with pytest.raises(HttpError) as e:
        _Inflater("br" + "x" * 100, "u", 10)
    assert str(e.value) == f"reply from u has Content-Encoding {'br' + 'x' * 38!r}; the client reads identity, gzip or deflate (one layer)"


class _Resp:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status_code, self.body, self.headers = status, body, httpx.Headers(headers)

    async def aiter_raw(self) -> Any:
        yield self.body


class _Client:
    """An httpx client stand-in: each stream() answers the next scripted reply or raises the next exception."""

    def __init__(self, *script: Any) -> None:
        self.script, self.calls = list(script), 0

    def stream(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        client = self

        class _Ctx:
            async def __aenter__(self) -> _Resp:
                return _Resp(*item)

            async def __aexit__(self, *a: Any) -> None:
                client.closed = True
        return _Ctx()


def _call(client: _Client, **kw: Any) -> Any:
    opts = {"timeout": 5, "backoff": 0.0, **kw}
    return asyncio.run(arequest_json(client, "POST", "u", {"a": 1}, **opts))  # type: ignore[arg-type]


def test_an_httpx_timeout_is_retried() -> None:
    """Catches httpx's own timeout marked final: a slow socket read failed the call without its retries."""
    client = _Client(httpx.ReadTimeout("slow"))
    with pytest.raises(HttpError, match=r"^no reply from u within 5s \(after 2 attempts\)$") as e:
        _call(client, retries=1)
    assert client.calls == 2 and e.value.retryable


def test_a_connection_error_is_scrubbed_and_never_empty() -> None:
    """Catches the connection error's text not scrubbed (a URL holding the key), and an empty message left empty."""
    with pytest.raises(HttpError) as e:
        _call(_Client(httpx.ConnectError(f"refused by proxy for {SECRET}")), secrets=[SECRET])
    assert str(e.value) == "connection to u failed (ConnectError: refused by proxy for ***)"
    with pytest.raises(HttpError) as e:
        _call(_Client(httpx.ConnectError("")))
    assert str(e.value) == "connection to u failed (ConnectError: ConnectError)"


@pytest.mark.parametrize("status", [200, 500])
def test_a_deeply_nested_reply_is_an_http_error_not_a_recursion_error(status: int) -> None:
    """Catches RecursionError left out of the JSON decoding's except: a 100,000-deep reply escaped as a bare
    RecursionError (the judge's whole batch failed with a traceback)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(HttpError) as e:
        _call(_Client((status, deep, {})))
    text = str(e.value)
    assert text.startswith("reply from u is not JSON: '[[[" if status == 200 else "HTTP 500 from u: [[[")


def test_a_redirect_location_and_a_non_json_reply_are_scrubbed() -> None:
    """Catches the Location of a redirect, or the text of a non-JSON reply, put in the error unscrubbed."""
    with pytest.raises(HttpError) as e:
        _call(_Client((302, b"", {"Location": f"http://h/?key={SECRET}"})), secrets=[SECRET])
    assert str(e.value) == "HTTP 302 from u (to http://h/?key=***); expected a 2xx reply"
    with pytest.raises(HttpError) as e:
        _call(_Client((200, f"oops {SECRET}".encode(), {})), secrets=[SECRET])
    assert str(e.value) == "reply from u is not JSON: 'oops ***'"


def test_a_nan_payload_is_refused_before_anything_is_sent() -> None:
    """Catches allow_nan dropped: a NaN in a request was sent as the non-JSON token NaN."""
    client = _Client((200, b"{}", {}))
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        asyncio.run(arequest_json(client, "POST", "u", {"x": float("nan")}, timeout=5))  # type: ignore[arg-type]
    assert client.calls == 0


def test_negative_retries_still_make_one_attempt() -> None:
    """Catches the `max(0, ...)` dropped: retries=-1 made no attempt at all (an AssertionError, not an HttpError)."""
    client = _Client((500, b'{"error": "x"}', {}))
    with pytest.raises(HttpError, match=r'^HTTP 500 from u: \{"error": "x"\}$'):
        _call(client, retries=-1)
    assert client.calls == 1


def test_a_retry_after_over_the_maximum_keeps_the_status() -> None:
    """Catches the status dropped from the "asks to retry after" error: a 503 read like a connection fault."""
    client = _Client((503, b'{"error": "busy"}', {"Retry-After": "120"}))
    with pytest.raises(HttpError) as e:
        _call(client, retries=3, max_retry_after=5)
    assert e.value.status == 503 and client.calls == 1
    assert str(e.value) == ('HTTP 503 from u: {"error": "busy"} (the server asks to retry after 120s, more than '
                            'max_retry_after=5s)')


def test_a_short_retry_after_does_not_shorten_the_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches Retry-After taken as the delay itself: `Retry-After: 0` turned a 1 s backoff into a busy loop."""
    delays: list[float] = []

    async def no_sleep(d: float) -> None:
        delays.append(d)
    monkeypatch.setattr(http_json.asyncio, "sleep", no_sleep)
    client = _Client((429, b'{"error": "slow"}', {"Retry-After": "0"}), (503, b"{}", {"Retry-After": "3"}),
                     (200, b'{"ok": 1}', {}))
    assert _call(client, retries=2, backoff=1.0) == {"ok": 1}
    assert delays == [1.0, 3.0] and client.calls == 3


def test_a_300_reply_is_not_an_answer() -> None:
    """Catches the 2xx test as `<= 300`: a 300 Multiple Choices body read as scores."""
    with pytest.raises(HttpError) as e:
        _call(_Client((300, b'{"results": []}', {})), retries=2)
    assert str(e.value) == "HTTP 300 from u; expected a 2xx reply" and e.value.status == 300


def test_run_sync_works_inside_a_running_event_loop() -> None:
    """Catches run_sync calling asyncio.run on the caller's thread: inside a running loop that is a RuntimeError."""
    async def value() -> int:
        return 41

    async def outer() -> int:
        return run_sync(value) + 1
    assert asyncio.run(outer()) == 42
    assert run_sync(value) == 41


# ---------------------------------------------------------------- wire format
def _png(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_encode_image_keeps_none() -> None:
    """Catches ``None`` passed to the PNG encoder (a WireError naming an object array) instead of staying None."""
    assert encode_image(None) is None


def test_a_jpeg_is_refused_even_without_a_pixel_limit() -> None:
    """Catches ``formats=["PNG"]`` dropped: a JPEG (lossy, not the wire format) decoded when no limit was given."""
    with pytest.raises(WireError, match=r"^img: not a base64-encoded image \(UnidentifiedImageError\)$"):
        decode_image(_png(Image.new("RGB", (4, 4)), "JPEG"), "img")


def test_a_bilevel_png_decodes_to_rgb_bytes() -> None:
    """Catches mode '1' passed through: the reward got an HxW bool array instead of HxWx3 uint8 pixels."""
    im = Image.new("1", (2, 1))
    im.putpixel((1, 0), 1)
    arr = decode_image(_png(im))
    assert arr.dtype == np.uint8 and arr.tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_a_pixel_limit_of_zero_refuses_every_image() -> None:
    """Catches `max_pixels is not None` as a truth test: a limit of 0 turned the check off."""
    with pytest.raises(WireLimitError, match=r"^img: 1x1 = 1 pixels, over the server's limit of 0"):
        decode_image(_png(Image.new("RGB", (1, 1))), "img", max_pixels=0)


def test_every_field_of_a_sample_survives_the_round_trip() -> None:
    """Catches a field left out of the wire form (round, text, a turn's round or text) or a default in its place."""
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    s = RewardSample(prompt="p", metadata={"k": [1]}, stage="refine", round=2, image=img, text="fix it",
                     history=[Turn("generate", 1, image=img, reward=0.25), Turn("reflect", 2, text="<think>t</think>")])
    back = sample_from_json(json.loads(json.dumps(sample_to_json(s))))
    assert (back.prompt, back.metadata, back.stage, back.round, back.text) == ("p", {"k": [1]}, "refine", 2, "fix it")
    assert back.image.tolist() == img.tolist()
    assert [(t.stage, t.round, t.text, t.reward) for t in back.history] == [
        ("generate", 1, None, 0.25), ("reflect", 2, "<think>t</think>", None)]
    assert back.history[0].image.tolist() == img.tolist() and back.history[1].image is None


def test_null_metadata_and_rounds_read_as_their_defaults() -> None:
    """Catches ``or {}`` / ``or 0`` dropped: ``"metadata": null`` reached the reward as None, ``"round": null``
    raised a TypeError (a 400 naming nothing), and a turn's null round read as 1."""
    s = sample_from_json({"prompt": "p", "metadata": None, "round": None,
                          "history": [{"stage": "generate", "round": None}]})
    assert (s.metadata, s.round, s.history[0].round) == ({}, 0, 0)


def test_null_history_and_components_read_as_empty() -> None:
    """Catches ``or []`` / ``or {}`` dropped: ``"history": null`` or ``"components": null`` a TypeError, not empty."""
    assert sample_from_json({"prompt": "p", "history": None}).history == []
    out = output_from_json({"score": 0.5, "components": None})
    assert (out.score, out.components, out.failure) == (0.5, {}, None)


@pytest.mark.parametrize("field, message", [
    ({"text": 5}, "samples[0].text: expected str, got int"),
    ({"history": [{"stage": "reflect", "text": ["t"]}]}, "samples[0].history[0].text: expected str, got list"),
])
def test_a_text_that_is_not_a_string_is_refused(field: dict[str, Any], message: str) -> None:
    """Catches the type check dropped from a sample's or a turn's text: a number reached a reward as its text."""
    with pytest.raises(WireError) as e:
        sample_from_json({"prompt": "p", **field})
    assert str(e.value) == message


def test_a_reply_reason_that_is_not_a_string_is_refused() -> None:
    """Catches the reason's type check dropped: ``"reason": {}`` stored as a reason."""
    with pytest.raises(WireError) as e:
        output_from_json({"score": 1.0, "reason": {"x": 1}})
    assert str(e.value) == "results[0].reason: expected str, got dict"


def test_a_component_sent_as_a_string_is_not_a_number() -> None:
    """Catches str dropped from finite_float's refusals: ``"c": "0.5"`` read as 0.5 (and bytes as a number)."""
    with pytest.raises(WireError) as e:
        output_from_json({"score": 1.0, "components": {"c": "0.5"}})
    assert str(e.value) == "results[0].components.c: expected a finite number, got 0.5"
    assert (finite_float("1"), finite_float(b"1"), finite_float(2)) == (None, None, 2.0)


def test_wire_errors_quote_at_most_40_characters_of_a_hostile_value() -> None:
    """Catches the 40-character cut dropped from the score and component messages (a 400-digit number quoted whole)."""
    with pytest.raises(WireError) as e:
        output_from_json({"score": 10 ** 400})
    assert str(e.value) == "results[0].score: expected a finite number, got " + "1" + "0" * 39
    key = "k" * 50
    with pytest.raises(WireError) as e:
        output_from_json({"score": 1.0, "components": {key: 10 ** 400}})
    assert str(e.value) == f"results[0].components.{'k' * 40}: expected a finite number, got 1{'0' * 39}"


def test_an_empty_image_string_counts_as_an_image() -> None:
    """Catches the image count as a truth test: ``"image": ""`` (sent, then refused on decoding) not counted."""
    assert count_images([{"image": ""}, {"history": [{"image": ""}]}]) == 2


# ---------------------------------------------------------------- Ray reward set
def test_an_actor_with_nothing_to_score_is_not_called(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches an empty chunk sent to (and waited on from) an actor: 2 samples on 3 actors are 2 calls."""
    s = _reward_set(monkeypatch, [0, 1, 2], lost=set())
    assert [r.total for r in s.score([7, 8])] == [7.0, 8.0]
    assert s.timeouts == [60.0, 60.0]


def test_restarts_are_the_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the restart count not read from the actor group (the trainer logs it as rewards/restarts)."""
    s = _reward_set(monkeypatch, [0], lost=set())
    s.group.restarts = 4
    assert s.restarts == 4


def test_a_reward_needing_the_policy_is_refused_for_ray_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the needs_policy refusal dropped: actors started for a reward they cannot compute."""
    import r3_rl.rollout.ray_rewards as rr

    monkeypatch.setattr(rr, "RewardSet", SimpleNamespace(from_specs=lambda specs: SimpleNamespace(needs_policy=True)))
    with pytest.raises(UserError, match=r"^rollout\.reward_workers: a task reward needs the policy"):
        rr.RayRewardSet([], workers=1, threads=1, log_event=lambda e: None)


# ---------------------------------------------------------------- actual bugs in today's code
# Found by round 16A: _get passed a JSON null through for every field, required ones included; a request with
# "prompt": null reached the reward as prompt None, and the server answered 500 "TypeError: object of type
# 'NoneType' has no len()" (blaming the reward) instead of a 400 naming the field.  A history turn's null stage,
# a turn of unknown stage, was likewise accepted though a missing one is refused.
def test_a_null_required_field_is_a_400_naming_it() -> None:
    """Catches null accepted for the required prompt (or a turn's stage): the reward got None and raised."""
    code, reply = ScoreService(_Len(), Limits())._score_json(bytearray(b'{"samples": [{"prompt": null}]}'))
    assert (code, reply) == (400, {"error": "samples[0].prompt: expected str, got NoneType"})
    with pytest.raises(WireError) as e:
        sample_from_json({"prompt": "p", "history": [{"stage": None}]})
    assert str(e.value) == "samples[0].history[0].stage: expected str, got NoneType"


def test_an_http_date_without_a_zone_is_read_as_gmt_not_local_time(monkeypatch) -> None:
    """Session 52: ``-0000`` (or no zone) gave a naive datetime, read in the machine's local time zone, so a
    Retry-After date moved by hours with ``TZ``.  An HTTP date is always GMT."""
    from r3_rl.rewards.http_json import parse_retry_after

    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9: a local reading would add 9 hours
    time.tzset()
    try:
        now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
        assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 -0000", now=now) == 30.0
        assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", now=now) == 30.0
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_gzip_reply_cut_before_its_trailer_is_a_retryable_failure_not_an_answer() -> None:
    """Session 52: the inflater never checked that the compressed stream ended, so a reply cut inside its gzip
    trailer (CRC and size: the last 8 bytes) whose JSON had already arrived was taken as the answer."""
    import gzip

    from r3_rl.rewards.http_json import HttpError, _Inflater

    whole = gzip.compress(b'{"scores": [1.0]}')
    ok = _Inflater("gzip", "http://x", 1000)
    ok.feed(whole)
    assert bytes(ok.finish()) == b'{"scores": [1.0]}'
    cut = _Inflater("gzip", "http://x", 1000)
    cut.feed(whole[:-8])
    assert bytes(cut.out) == b'{"scores": [1.0]}'  # the JSON is all there ...
    with pytest.raises(HttpError, match=r"^reply from http://x ended inside its compressed data$") as e:
        cut.finish()  # ... but the transfer was not
    assert e.value.retryable
    plain = _Inflater("identity", "http://x", 1000)
    plain.feed(b"{}")
    assert bytes(plain.finish()) == b"{}"
