"""The VLM judge client and the reward server, against real HTTP servers on 127.0.0.1 with injected faults.

Every server runs in a thread with ``serve_forever`` and is shut down by its fixture; every client
call has a short timeout and a bounded number of retries, so no test can hang.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import numpy as np
import pytest

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample, Turn
from r3_rl.rewards.registry import load_reward
from r3_rl.rewards.reward_set import RewardSet
from r3_rl.rewards.remote import RemoteReward
from r3_rl.rewards.server import make_server, parse_option_args, serve
from r3_rl.rewards.vlm_judge import JudgeParseError, extract_json_object, parse_answers, parse_verdict
from r3_rl.rewards.wire import decode_image, output_from_json, output_to_json, sample_from_json, sample_to_json

IMG = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
TIIF = {"yn_question_list": ["Is there a cat?", "Is it night?", "Is the cat black?"], "yn_answer_list": ["yes", "no", "Yes"]}
GENEVAL_PLUS = {"include": [{"class": "clock", "count": 2, "region": "left"}]}


def sample(meta: dict, image: np.ndarray | None = IMG) -> RewardSample:
    return RewardSample(prompt="a cat at night", metadata=meta, stage="generate", round=0, image=image,
                        history=[Turn("reason", 0, text="<think>p</think>"), Turn("generate", 0, image=image, reward=0.5)])


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def start(server: ThreadingHTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------- wire format
def test_a_request_encodes_each_image_array_once(monkeypatch) -> None:
    """A refine sample's image is also its history's last turn, and siblings share their parent: two siblings'
    samples hold 3 distinct arrays in 6 places, and one request encodes 3 PNGs (it had encoded 6), with the same
    wire form as encoding each place alone."""
    from r3_rl.rewards import wire

    rng = np.random.default_rng(0)
    parent, a, b = (rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(3))

    def sibling(image):
        return RewardSample(prompt="p", metadata={}, stage="refine", round=1, image=image, history=[
            Turn(stage="generate", round=0, image=parent), Turn(stage="refine", round=1, image=image)])

    alone = [json.dumps(sample_to_json(sibling(im))) for im in (a, b)]
    calls = []
    encode = wire.encode_image
    monkeypatch.setattr(wire, "encode_image", lambda im: (calls.append(1), encode(im))[1])
    encoded: dict = {}
    shared = [json.dumps(sample_to_json(sibling(im), encoded=encoded)) for im in (a, b)]
    assert len(calls) == 3 and shared == alone


def test_wire_round_trip_is_lossless() -> None:
    s = sample(TIIF)
    back = sample_from_json(json.loads(json.dumps(sample_to_json(s))))
    assert back.prompt == s.prompt and back.metadata == s.metadata and back.stage == "generate"
    assert np.array_equal(back.image, IMG) and np.array_equal(back.history[1].image, IMG)
    assert back.history[0].text == "<think>p</think>" and back.history[1].reward == 0.5
    assert sample_from_json(sample_to_json(s, history=False)).history == []
    o = output_from_json(json.loads(json.dumps(output_to_json(RewardOutput(score=0.5, components={"a": 1.0}, reason="r")))))
    assert (o.score, o.components, o.reason, o.failure) == (0.5, {"a": 1.0}, "r", None)
    assert output_from_json(output_to_json(RewardOutput(score=float("nan")))).failed
    assert output_from_json({"score": None}).failure == "server returned no score"
    with pytest.raises(ValueError, match="samples\\[0\\].image: not a base64-encoded image"):
        sample_from_json({"prompt": "p", "image": "!!!"})
    with pytest.raises(ValueError, match="missing 'prompt'"):
        sample_from_json({"image": None})
    assert decode_image(None) is None


# ---------------------------------------------------------------- judge reply parsing (pure)
def test_parse_answers_and_verdicts() -> None:
    assert parse_answers('```json\n{"Q1": "Yes", "Q2": "no.",}\n```', 2) == ["yes", "no"]
    assert parse_answers('{"answers": ["YES", "No"]}', 2) == ["yes", "no"]
    assert parse_answers("1. yes, a cat\n2) No - it is day", 2) == ["yes", "no"]
    for bad, n in [('{"Q1": "yes"}', 2), ('{"Q1": "maybe", "Q2": "no"}', 2), ('{"Q1": "yes", "Q3": "no"}', 2),
                   ("I cannot tell.", 1), ('{"foo": "yes"}', 1)]:
        with pytest.raises(JudgeParseError):
            parse_answers(bad, n)
    assert parse_verdict('Sure! {"correct": 1, "reason": "all there"}') == (1, "all there")
    assert parse_verdict('{"correct": "0"}') == (0, None)
    for bad in ['{"correct": 0.5}', '{"verdict": 1}', "correct"]:
        with pytest.raises(JudgeParseError):
            parse_verdict(bad)
    assert extract_json_object("no json") is None


# ---------------------------------------------------------------- a scripted OpenAI-compatible server
class FakeJudge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.script: list[tuple] = []  # consumed one per POST; then `default`
        self.default: tuple = ("answer", '{"Q1": "yes", "Q2": "no", "Q3": "yes"}')
        self.posts = 0
        self.in_flight = self.max_in_flight = 0
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), JudgeHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class JudgeHandler(BaseHTTPRequestHandler):
    server: FakeJudge
    protocol_version = "HTTP/1.1"

    def log_message(self, *a: Any) -> None:
        pass

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # /v1/models
        self._reply(200, b'{"data": [{"id": "judge"}]}')

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.posts += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            srv.auth.append(self.headers.get("Authorization"))
            srv.bodies.append(body)
            action = srv.script.pop(0) if srv.script else srv.default
        try:
            while action[0] == "sleep":
                time.sleep(action[1])
                action = action[2]
            if action[0] == "status":
                self._reply(action[1], json.dumps({"error": f"fault; you sent {self.headers.get('Authorization')}"}).encode())
            elif action[0] == "raw":
                self._reply(200, action[1])
            elif action[0] == "truncate":  # promise 100 bytes, send 10, hang up
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b'{"choices"')
                self.close_connection = True
            else:
                self._reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": action[1]}}]}).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)
        finally:
            with srv.lock:
                srv.in_flight -= 1


@pytest.fixture
def judge() -> Iterator[FakeJudge]:
    srv = FakeJudge()
    start(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def make_judge(url: str, **kw: Any):
    opts = dict(url=url, model="judge", timeout=0.5, retries=2, backoff=0.01, concurrency=4)
    opts.update(kw)
    r = load_reward("vlm_judge", **opts)
    r.setup()
    return r


def test_judge_questions_mode_scores_fraction_case_insensitively(judge: FakeJudge) -> None:
    judge.script = [("answer", '{"Q1": "YES", "Q2": "No", "Q3": "no"}')]
    r = make_judge(judge.url)
    out = r([sample(TIIF)])[0]
    assert out.score == pytest.approx(2 / 3) and out.components == {"fraction": pytest.approx(2 / 3), "questions": 3.0}
    assert out.reason == "wrong: Q3"
    msg = judge.bodies[0]["messages"][-1]["content"]
    assert msg[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "Q3: Is the cat black?" in msg[1]["text"] and judge.bodies[0]["model"] == "judge"
    assert make_judge(judge.url, binary=True)([sample(TIIF)])[0].score == 1.0  # default reply: all right


def test_judge_checklist_mode(judge: FakeJudge) -> None:
    judge.default = ("answer", '{"correct": 0, "reason": "only one clock"}')
    out = make_judge(judge.url, mode="checklist")([sample(GENEVAL_PLUS)])[0]
    assert (out.score, out.reason) == (0.0, "only one clock")
    body = judge.bodies[0]
    assert body["messages"][0]["role"] == "system" and "two clocks in the left half" in body["messages"][1]["content"][1]["text"]


def test_judge_retries_500_then_succeeds_and_gives_up_after_bounded_retries(judge: FakeJudge) -> None:
    judge.script = [("status", 500), ("status", 503)]
    assert make_judge(judge.url)([sample(TIIF)])[0].score == 1.0
    assert judge.posts == 3
    judge.posts, judge.default = 0, ("status", 500)
    out = make_judge(judge.url, retries=1)([sample(TIIF)])[0]
    assert out.failed and "HTTP 500" in out.failure and "after 2 attempts" in out.failure and judge.posts == 2
    judge.posts, judge.default = 0, ("status", 400)  # a client error is not retried
    out = make_judge(judge.url)([sample(TIIF)])[0]
    assert out.failed and "HTTP 400" in out.failure and judge.posts == 1


def test_judge_truncated_reply_is_retried_then_a_failure(judge: FakeJudge) -> None:
    judge.script = [("truncate",)]
    assert make_judge(judge.url)([sample(TIIF)])[0].score == 1.0 and judge.posts == 2
    judge.posts, judge.default = 0, ("truncate",)
    out = make_judge(judge.url, retries=1)([sample(TIIF)])[0]
    assert out.failed and "without sending complete message body" in out.failure and judge.posts == 2


def test_judge_slow_reply_times_out(judge: FakeJudge) -> None:
    judge.default = ("sleep", 0.6, ("answer", "{}"))
    t0 = time.monotonic()
    out = make_judge(judge.url, timeout=0.2, retries=1)([sample(TIIF)])[0]
    assert out.failed and "within 0.2s" in out.failure and time.monotonic() - t0 < 3


@pytest.mark.parametrize("action,needle", [
    (("raw", b"{not json"), "not JSON"),
    (("raw", b'{"choices": []}'), "no choices[0].message.content"),
    (("answer", '{"Q1": "yes", "Q2": "no"}'), "2 answers for 3 questions"),
    (("answer", "I think so."), "no yes/no answers"),
])
def test_judge_unparseable_replies_are_failures_not_zeros(judge: FakeJudge, action: tuple, needle: str) -> None:
    judge.default = action
    out = make_judge(judge.url)([sample(TIIF)])[0]
    assert out.failed and out.score is None and needle in out.failure


def test_judge_concurrency_is_bounded(judge: FakeJudge) -> None:
    judge.default = ("sleep", 0.1, ("answer", '{"Q1": "yes", "Q2": "no", "Q3": "yes"}'))
    out = make_judge(judge.url, concurrency=3, timeout=2.0)([sample(TIIF) for _ in range(9)])
    assert all(o.score == 1.0 for o in out) and judge.posts == 9
    assert 2 <= judge.max_in_flight <= 3


def test_judge_api_key_is_sent_and_never_leaks(judge: FakeJudge, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R3_TEST_JUDGE_KEY", "sk-secret-123")
    r = make_judge(judge.url, api_key_env="R3_TEST_JUDGE_KEY")
    assert r([sample(TIIF)])[0].score == 1.0 and judge.auth[-1] == "Bearer sk-secret-123"
    judge.default = ("status", 401)  # the server echoes the header back in its error body
    out = r([sample(TIIF)])[0]
    assert out.failed and "sk-secret-123" not in out.failure and "***" in out.failure
    assert "sk-secret" not in repr(r)
    monkeypatch.delenv("R3_TEST_JUDGE_KEY")
    with pytest.raises(UserError, match="R3_TEST_JUDGE_KEY"):
        make_judge(judge.url, api_key_env="R3_TEST_JUDGE_KEY")


def test_judge_down_fails_setup_in_one_line() -> None:
    port = free_port()
    with pytest.raises(UserError) as e:
        make_judge(f"http://127.0.0.1:{port}/v1")
    assert "judge server is down" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- our reward server + RemoteReward
class MeanRed(Reward):
    """Mean red channel / 255; a failure for an image with no red at all; raises on prompt 'boom'."""

    name = "mean_red"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        self.calls.append(len(samples))
        if any(s.prompt == "boom" for s in samples):
            raise RuntimeError("detector crashed\nsecond line")
        return [RewardOutput(failure="no red") if s.image[..., 0].max() == 0
                else RewardOutput(score=float(s.image[..., 0].mean()) / 255, components={"turns": len(s.history)},
                                  reason=s.metadata.get("tag"))
                for s in samples]


@pytest.fixture
def reward_server() -> Iterator[Any]:
    srv = make_server(MeanRed(), "127.0.0.1", 0, max_request_bytes=200_000).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def red(v: int, size: int = 4) -> np.ndarray:
    """Red channel = v everywhere; green/blue random so the PNG does not compress away."""
    img = np.random.default_rng(v).integers(0, 256, (size, size, 3), dtype=np.uint8)
    img[..., 0] = v
    return img


def remote_sample(v: int, prompt: str = "p", size: int = 4) -> RewardSample:
    return RewardSample(prompt=prompt, metadata={"tag": "t"}, stage="refine", round=1, image=red(v, size),
                        history=[Turn("generate", 0, image=red(v, size)), Turn("reflect", 1, text="fix"), Turn("refine", 1, image=red(v, size))])


def test_remote_reward_matches_local_scores(reward_server: Any) -> None:
    rr = load_reward("remote", url=reward_server.url, batch_size=2, timeout=5)
    rr.setup()
    assert rr.remote_name == "mean_red" and rr.max_request_bytes == 200_000
    batch = [remote_sample(v) for v in (51, 0, 255)]
    remote, local = rr(batch), MeanRed()(batch)
    assert [(o.score, o.failure, o.components, o.reason) for o in remote] == \
           [(o.score, o.failure, o.components, o.reason) for o in local]
    assert remote[0].components == {"turns": 3.0} and remote[1].failure == "no red"
    no_hist = load_reward("remote", url=reward_server.url, send_history=False)
    no_hist.setup()
    assert no_hist([remote_sample(51)])[0].components == {"turns": 0.0}
    two = RewardSet.from_specs([{"name": "remote", "options": {"url": reward_server.url, "label": "red_a"}},
                                {"name": "remote", "weight": 2.0, "options": {"url": reward_server.url, "label": "red_b"}}])
    got = two.score([remote_sample(51)])[0]
    assert got.total == pytest.approx(3 * 51 / 255) and set(got.parts) >= {"red_a", "red_b"}


def test_server_errors_become_failures(reward_server: Any) -> None:
    rr = RemoteReward(reward_server.url, retries=0, timeout=5)
    rr.setup()
    out = rr([remote_sample(10, prompt="boom"), remote_sample(20)])
    assert all(o.failed and "HTTP 500" in o.failure and "detector crashed" in o.failure for o in out)
    assert "second line" not in out[0].failure


def test_server_rejects_malformed_and_oversize_requests(reward_server: Any) -> None:
    def post(body: bytes, path: str = "/score") -> tuple[int, dict]:
        req = urllib.request.Request(reward_server.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert post(b"{nope")[0] == 400
    code, body = post(json.dumps({"samples": [{"prompt": "p", "image": "%%%"}]}).encode())
    assert code == 400 and "samples[0].image" in body["error"]
    assert post(json.dumps({"items": []}).encode())[0] == 400
    assert post(b"{}", path="/other")[0] == 404
    code, body = post(b"x" * 300_000)
    assert code == 413 and "exceeds the server limit of 200000" in body["error"]
    conn = http.client.HTTPConnection("127.0.0.1", reward_server.server_address[1], timeout=5)
    conn.putrequest("POST", "/score")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()
    assert post(json.dumps({"samples": []}).encode()) == (200, {"results": []})


def test_remote_client_splits_batches_to_fit_the_limit(reward_server: Any) -> None:
    rr = RemoteReward(reward_server.url, batch_size=64, send_history=True)
    rr.setup()
    batch = [remote_sample(100 + i, size=90) for i in range(4)]  # ~78 kB each as JSON: two fit in 200 kB, three do not
    sizes = [len(json.dumps(sample_to_json(b))) for b in batch]
    assert 2 * max(sizes) < 200_000 < 3 * min(sizes)
    out = rr(batch)
    assert [o.score for o in out] == pytest.approx([(100 + i) / 255 for i in range(4)])
    assert reward_server.reward.calls == [2, 2]
    noisy = RewardSample(prompt="p", metadata={}, stage="generate", round=0, image=red(7, size=300))
    out = rr([noisy])[0]  # one 300x300 noisy image is over 200 kB as base64 PNG: never sent
    assert out.failed and "over the server's limit of 200000" in out.failure
    assert reward_server.reward.calls == [2, 2]


def test_remote_reward_down_server_fails_in_one_line() -> None:
    rr = load_reward("remote", url=f"http://127.0.0.1:{free_port()}", health_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        rr.setup()
    msg = str(e.value)
    assert "no reward server at" in msg and "serve-reward" in msg and "\n" not in msg and time.monotonic() - t0 < 5


def test_serve_refuses_policy_rewards_and_busy_ports(reward_server: Any) -> None:
    with pytest.raises(UserError, match="needs the policy"):
        make_server(load_reward("self_consistency"), port=0)
    with pytest.raises(UserError, match="cannot listen on 127.0.0.1"):
        serve("verdict_consistency", port=reward_server.server_address[1])


def test_serve_option_parsing() -> None:
    assert parse_option_args(["detector=owlv2", "threshold=0.25", "binary=true", "counting_tags=[counting, count]",
                              "label_map={kitty: cat}", "model=/x/y=z"]) == {
        "detector": "owlv2", "threshold": 0.25, "binary": True, "counting_tags": ["counting", "count"],
        "label_map": {"kitty": "cat"}, "model": "/x/y=z"}
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_option_args(["detector"])


def test_serve_reward_cli_serves_blocks_and_stops_on_ctrl_c() -> None:
    """`r3-rl serve-reward --reward blocks --port 0` in its own process: health, scores equal to local, Ctrl-C."""
    import signal
    import subprocess
    import sys

    from r3_rl.blocks.codec import encode
    from r3_rl.data import BlocksPrompts

    proc = subprocess.Popen([sys.executable, "-m", "r3_rl.cli", "serve-reward", "--reward", "blocks", "--port", "0",
                             "--option", "binary=false"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving reward 'blocks' on http://127.0.0.1:" in line, line
        url = line.split(" on ", 1)[1].split()[0]
        rr = load_reward("remote", url=url, timeout=30)
        rr.setup()
        assert rr.remote_name == "blocks"
        prompts = BlocksPrompts(tags={"counting": 1, "position": 1, "colors": 1}, seed=3)
        items = [prompts.train_prompt(k) for k in range(6)]
        rng = np.random.default_rng(0)
        batch = [RewardSample(prompt=p.prompt, metadata=p.metadata, stage="generate", round=0,
                              image=encode(rng.integers(0, 7, size=(4, 4)))) for p in items]
        local = load_reward("blocks", binary=False)(batch)
        assert [o.score for o in rr(batch)] == [o.score for o in local]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_reward_cli_bad_reward_exits_2() -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "r3_rl.cli", "serve-reward", "--reward", "no_such_reward"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no_such_reward" in res.stderr
