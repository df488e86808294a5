"""The judge client (and every JSON-over-HTTP call) against hostile servers on 127.0.0.1.

A server that drips one byte a second, one that asks to be left alone with ``Retry-After``, and one that
echoes the API key back in every answer.  Every server here is a thread of this process, stopped by its
fixture; every client call has a deadline, so no test can hang.
"""
from __future__ import annotations

import gzip
import json
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from conftest import tiny_overrides
from r3_rl.cli import main
from r3_rl.rewards.base import RewardSample
from r3_rl.rewards.http_json import HttpError, parse_retry_after, request_json, scrub
from r3_rl.rewards.registry import load_reward
from r3_rl.rewards.remote import RemoteReward
from r3_rl.rewards.vlm_judge import JudgeParseError, parse_verdict
from r3_rl.rewards.wire import WireError, output_from_json, output_to_json
from r3_rl.rewards.base import RewardOutput

GENEVAL = {"tag": "single_object", "include": [{"class": "square", "count": 1}]}


def sample() -> RewardSample:
    return RewardSample(prompt="a square", metadata=GENEVAL, stage="generate", round=0,
                        image=np.zeros((8, 8, 3), dtype=np.uint8))


# ---------------------------------------------------------------- a server that drips one byte a second
@pytest.fixture
def dripping() -> Iterator[str]:
    """Accepts, then sends a valid reply one byte per second (the probe that held a 2 s request for 30 s)."""
    lsk = socket.create_server(("127.0.0.1", 0))
    lsk.settimeout(0.2)
    stop = threading.Event()
    reply = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n'
             + b'{"choices": [{"message": {"content": "{\\"correct\\": 1}"}}]}')

    def drip(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1)
            try:
                conn.recv(65536)
                for b in reply:
                    if stop.wait(1.0):
                        return
                    conn.sendall(bytes([b]))
            except OSError:
                return  # the client gave up

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsk.accept()
            except socket.timeout:
                continue
            threading.Thread(target=drip, args=(conn,), daemon=True).start()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{lsk.getsockname()[1]}/v1"
    stop.set()
    t.join(5)
    lsk.close()


def test_a_dripping_server_cannot_hold_a_request_past_its_deadline(dripping: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(HttpError, match="within 1s"):
        request_json("POST", dripping + "/chat/completions", {"x": 1}, timeout=1.0)
    assert time.monotonic() - t0 < 3.0  # the drip lasts 140 s; margin for a loaded CI machine
    judge = load_reward("vlm_judge", url=dripping, model="m", mode="checklist", timeout=1.0, retries=1,
                        backoff=0.01, check_at_start=False)
    t0 = time.monotonic()
    out = judge([sample()])[0]
    assert out.failed and "within 1s (after 2 attempts)" in out.failure
    assert time.monotonic() - t0 < 5.0  # two 1 s deadlines, not 140 s of dripping


# ---------------------------------------------------------------- a scripted server
class Scripted(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: list[tuple[int, dict[str, str], bytes]], cycle: bool = False) -> None:
        self.script, self.cycle, self.times, self.auth = script, cycle, [], []
        super().__init__(("127.0.0.1", 0), ScriptedHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: Scripted
    protocol_version = "HTTP/1.1"

    def log_message(self, *a: Any) -> None:
        pass

    def _answer(self) -> None:
        srv = self.server
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv.times.append(time.monotonic())
        srv.auth.append(self.headers.get("Authorization", ""))
        n = len(srv.times) - 1
        if self.command == "GET":  # /models at start-up: echoes the key too
            code, headers, body = 200, {}, b'{"data": [{"id": "KEY"}]}'
        else:
            code, headers, body = srv.script[n % len(srv.script) if srv.cycle else min(n, len(srv.script) - 1)]
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        body = body.replace(b"KEY", key.encode()).replace(b"PREFIX", key[:22].encode())
        body = body.replace(b"ESCAPED", "".join(f"\\u{ord(c):04x}" for c in key).encode())
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


def serve(script: list[tuple[int, dict[str, str], bytes]], cycle: bool = False) -> Scripted:
    srv = Scripted(script, cycle)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def verdict(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": text}}]}).encode()


def test_retry_after_is_honoured_up_to_a_cap() -> None:
    srv = serve([(429, {"Retry-After": "1"}, b'{"error": "slow down"}'), (200, {}, verdict('{"correct": 1}'))])
    try:
        judge = load_reward("vlm_judge", url=srv.url, model="m", mode="checklist", timeout=5, retries=2,
                            backoff=0.01, check_at_start=False)
        assert judge([sample()])[0].score == 1.0
        assert len(srv.times) == 2 and srv.times[1] - srv.times[0] >= 0.95  # not the 0.01 s backoff
    finally:
        srv.shutdown()
        srv.server_close()
    srv = serve([(503, {"Retry-After": "120"}, b'{"error": "maintenance"}')])
    try:
        judge = load_reward("vlm_judge", url=srv.url, model="m", mode="checklist", timeout=5, retries=3,
                            max_retry_after=5, check_at_start=False)
        t0 = time.monotonic()
        out = judge([sample()])[0]
        assert out.failed and "retry after 120s, more than max_retry_after=5s" in out.failure
        assert len(srv.times) == 1 and time.monotonic() - t0 < 4  # not even the 5 s max_retry_after
    finally:
        srv.shutdown()
        srv.server_close()
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 01 Dec 2100 00:00:00 GMT", now=0.0) > 1e9


def test_scrub_removes_a_secret_and_any_8_character_piece_of_it() -> None:
    key = "sk-abcdefghijklmnopqrstuvwxyz0123456789"
    assert scrub(f"key {key}!", [key]) == "key ***!"
    assert scrub(f"prefix {key[:22]} suffix {key[-9:]} middle {key[10:19]}", [key]) == \
        "prefix *** suffix *** middle ***"
    assert scrub(f"short {key[:7]} ok", [key]) == f"short {key[:7]} ok"
    assert scrub("nothing here", [key, ""]) == "nothing here"


def test_an_echoed_key_is_scrubbed_before_the_message_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 401 that leaked a 22-character prefix: key at character ~190 of the body, plain and \\u-escaped."""
    key = "sk-" + secrets.token_hex(20)
    monkeypatch.setenv("R3_HOSTILE_KEY", key)
    pad = "x" * 180
    srv = serve([(401, {}, json.dumps({"error": pad + " KEY ESCAPED"}).replace("ESCAPED", "ESCAPED").encode()),
                 (200, {}, verdict('{"correct": 0, "reason": "you sent KEY, i.e. PREFIX"}'))])
    try:
        judge = load_reward("vlm_judge", url=srv.url, model="m", mode="checklist", api_key_env="R3_HOSTILE_KEY",
                            timeout=5, retries=0, check_at_start=False)
        judge.setup()
        first = judge([sample()])[0]  # the 401 (echoes plain and escaped)
        second = judge([sample()])[0]  # a 200 whose reason echoes the key and its prefix
    finally:
        srv.shutdown()
        srv.server_close()
    assert srv.auth[0] == f"Bearer {key}"
    assert first.failed and "HTTP 401" in first.failure and "***" in first.failure
    assert second.score == 0.0 and second.reason == "you sent ***, i.e. ***"
    for text in (first.failure, second.reason, repr(judge)):
        assert not any(key[i:i + 8] in text for i in range(len(key) - 7)), text


# ---------------------------------------------------------------- replies that are not what they say
def _one_call(body: bytes, headers: dict[str, str] | None = None, code: int = 200, **kw: Any) -> Any:
    srv = serve([(code, headers or {}, body)])
    try:
        return request_json("POST", srv.url + "/score", {"x": 1}, timeout=5.0, **kw)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_compression_bomb_is_capped_while_it_inflates() -> None:
    """httpx inflates each network chunk whole: a 3.5 KB reply of ``gzip, gzip`` grew the client to 4 GB.  The
    client asks for no compression, reads one layer of gzip with the cap applied as it inflates, and refuses
    stacked or unknown encodings."""
    good = {"results": [{"score": 1.0}]}
    assert _one_call(gzip.compress(json.dumps(good).encode()), {"Content-Encoding": "gzip"}) == good
    bomb = gzip.compress(b" " * (64 << 20), 9)  # 64 MiB of JSON whitespace in 64 KB
    assert len(bomb) < 100_000
    t0 = time.monotonic()
    with pytest.raises(HttpError, match="is over 1048576 bytes"):
        _one_call(bomb, {"Content-Encoding": "gzip"}, max_reply_bytes=1 << 20)
    assert time.monotonic() - t0 < 3.0
    for encoding in ("gzip, gzip", "br"):
        with pytest.raises(HttpError, match="Content-Encoding .*identity, gzip or deflate"):
            _one_call(gzip.compress(gzip.compress(b"{}")), {"Content-Encoding": encoding})
    with pytest.raises(HttpError, match="not valid compressed data"):
        _one_call(b"plain text", {"Content-Encoding": "gzip"})


def test_a_redirect_is_an_error_not_an_answer() -> None:
    with pytest.raises(HttpError, match=r"HTTP 302 .*\(to http://127.0.0.1:1/score\); expected a 2xx reply"):
        _one_call(b'{"results": [{"score": 1.0}]}', {"Location": "http://127.0.0.1:1/score"}, code=302)


def test_a_remote_result_that_is_not_a_finite_number_fails_that_sample_only() -> None:
    """A NaN ``correct`` part read as "flawed", a ``true`` score as 1.0, a 400-digit score escaped as an
    OverflowError that failed the whole batch: each is now that sample's failure, its siblings scored."""
    bad = [b'{"score": 1.0, "components": {"correct": NaN}}', b'{"score": true}', b'{"score": ' + b"9" * 400 + b"}",
           b'{"score": Infinity}', b'{"score": 1.0, "components": {"correct": false}}']
    for result in bad:
        srv = serve([(200, {}, b'{"results": [' + result + b', {"score": 0.5, "components": {"correct": 1}}]}')])
        try:
            out = RemoteReward(srv.url, timeout=5, retries=0)([sample(), sample()])
        finally:
            srv.shutdown()
            srv.server_close()
        assert out[0].failed and "expected a finite number" in out[0].failure, (result, out[0])
        assert not out[1].failed and out[1].score == 0.5 and out[1].components == {"correct": 1.0}
    with pytest.raises(WireError, match=r"results\[0\].score: expected a finite number, got True"):
        output_from_json({"score": True})


def test_the_server_never_sends_nan_a_non_finite_part_is_a_failure() -> None:
    out = output_to_json(RewardOutput(score=1.0, components={"correct": float("nan"), "iou": 0.5}))
    assert out["failure"] == "non-finite component correct=nan" and out["components"] == {"iou": 0.5}
    assert output_to_json(RewardOutput(score=10 ** 400))["failure"].startswith("non-finite score")
    json.dumps(out, allow_nan=False)


def test_one_hostile_judge_reply_is_a_parse_error_not_an_exception() -> None:
    for text in ('{"correct": ' + "9" * 5000 + "}", '{"correct": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        with pytest.raises(JudgeParseError):
            parse_verdict(text)


# ---------------------------------------------------------------- a key never reaches a run file
def test_judge_key_never_reaches_a_run_file(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch,
                                           capfd: pytest.CaptureFixture) -> None:
    """A tiny training run whose judge echoes the key in errors, retries and verdict reasons: the key (or any
    8-character piece of it) is in no file of the run dir -- trajectories, checkpoint, metrics, events, evals,
    TensorBoard -- and not on the console."""
    key = "sk-" + secrets.token_hex(20)
    monkeypatch.setenv("R3_HOSTILE_KEY", key)
    srv = serve([(401, {}, b'{"error": {"message": "Incorrect API key KEY", "escaped": "ESCAPED"}}'),
                 (500, {}, b"internal error for PREFIX"),
                 (429, {"Retry-After": "0"}, b'{"error": "rate limit for KEY"}'),
                 (200, {}, verdict('{"correct": 1, "reason": "you sent KEY (PREFIX)"}'))], cycle=True)
    judge = {"name": "vlm_judge", "weight": 0.5, "options": {
        "url": srv.url, "model": "m", "mode": "checklist", "api_key_env": "R3_HOSTILE_KEY", "timeout": 5,
        "retries": 1, "backoff": 0.01}}
    sets = tiny_overrides(tmp_path, steps=2) + [
        "warmstart.steps=0", "data.eval_size=2", "eval.dump=2", "save_every=1", "rewards.max_failure_fraction=1.0",
        f"rewards.task=[{{name: blocks}}, {json.dumps(judge)}]", f"rewards.eval=[{json.dumps(judge)}]",
        "log.console=true"]
    run = tmp_path / "run"
    try:
        code = main(["train", str(repo / "recipes" / "tiny_blocks.yaml"), "--run-dir", str(run)]
                    + [a for s in sets for a in ("--set", s)])
    finally:
        srv.shutdown()
        srv.server_close()
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    assert len(srv.times) > 10 and all(a == f"Bearer {key}" for a in srv.auth)
    pieces = [key[i:i + 8].encode() for i in range(len(key) - 7)]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any("trajectories" in p.parts for p in files)
    state = (run / "checkpoints" / "step_000002" / "state" / "trainer.pt").read_bytes()
    # the failures (and their echoed key) were stored, scrubbed: the failure budget keeps each reward's last reason
    assert b"vlm_judge" in state and b"HTTP " in state and b"***" in state
    for p in files:
        data = p.read_bytes()
        assert not any(piece in data for piece in pieces), p
    console = (out + err).encode()
    assert not any(piece in console for piece in pieces)
