"""The reward server under hostile clients: the probes of issue 13 as tests, against `r3-rl serve-reward` itself.

Each test talks only to 127.0.0.1, bounds every socket with a timeout, and the server process it starts is
killed by the fixture.  Memory is read from the server's /proc status (VmHWM: the peak resident size), so
the numbers are the server's alone.  The slow tests run the probes at full size; each has a scaled-down fast
representative here.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.server import make_server
from r3_rl.rewards.wire import encode_image

MiB = 1 << 20


class Server:
    """A `r3-rl serve-reward --reward blocks` process on a free port; stderr goes to a file we can read."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.log = tmp / "server.log"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "r3_rl.cli", "serve-reward", "--reward", "blocks",
                                      "--port", "0", *flags], stderr=self._err, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "serving reward" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        line = next(x for x in self.log.read_text().splitlines() if "serving reward" in x)
        self.port = int(line.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1])

    def status(self, key: str) -> int:
        """A /proc/<pid>/status figure in bytes (VmRSS now, VmHWM peak)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def request(self, method: str, path: str, body: bytes = b"", ctype: str | None = "application/json",
                timeout: float = 10.0) -> tuple[int, dict[str, Any], dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": ctype} if ctype else {}
            conn.request(method, path, body=body if body or method in ("POST", "PUT") else None, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw), dict(resp.getheaders())
        finally:
            conn.close()

    def health_ok(self) -> bool:
        code, body, _ = self.request("GET", "/health", timeout=5)
        return code == 200 and body["status"] == "ok"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._err.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Small limits so the fast probes hit them quickly: 8 MiB bodies, 16 MiB in flight, 2 s slow-client timeout."""
    srv = Server(tmp_path_factory.mktemp("srv"), "--max-request-mb", "8", "--max-inflight-mb", "16",
                 "--max-images", "8", "--client-timeout", "2")
    yield srv
    srv.close()


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def score_body(images: list[str | None], meta: dict[str, Any] | None = None) -> bytes:
    meta = meta or {"tag": "single_object", "include": [{"class": "square", "count": 1}]}
    return json.dumps({"samples": [{"prompt": "a square", "metadata": meta, "image": im} for im in images]}).encode()


def open_stalled(port: int, content_length: int, send: int) -> socket.socket:
    """A POST that promises ``content_length`` bytes, sends ``send`` of them and stops."""
    sk = socket.create_connection(("127.0.0.1", port), timeout=10)
    sk.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {content_length}\r\n\r\n".encode())
    chunk = b" " * MiB
    while send > 0:
        sk.sendall(chunk[:send])
        send -= len(chunk)
    return sk


def read_reply(sk: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            part = sk.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not part:
            break
        data += part
    return data


# ---------------------------------------------------------------- fast probes
def test_only_application_json_is_accepted(server: Server) -> None:
    body = score_body([None])
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        code, reply, _ = server.request("POST", "/score", body, ctype=ctype)
        assert code == 415 and "application/json" in reply["error"], (ctype, code, reply)
    assert server.request("POST", "/score", json.dumps({"samples": []}).encode(),
                          ctype="application/json; charset=utf-8")[:2] == (200, {"results": []})


def test_unknown_routes_and_methods_get_json_errors(server: Server) -> None:
    assert server.request("PUT", "/score", b"{}")[0] == 405
    code, reply, headers = server.request("DELETE", "/health")
    assert code == 405 and "GET /health or POST /score" in reply["error"] and "GET" in headers.get("allow", "")
    code, reply, _ = server.request("GET", "/admin")
    assert code == 404 and "GET /admin" in reply["error"]
    assert server.request("POST", "/health", b"{}")[0] == 405


@pytest.mark.parametrize("body,needle", [
    (b"[" * 200_000 + b"]" * 200_000, "RecursionError"),
    (b'{"samples": [{"prompt": "p", "round": ' + b"9" * 5000 + b"}]}", "ValueError"),
    (b'{"samples": [{"prompt": "\xff\xfe"}]}', "not JSON"),
    (b'{"samples": 5}', "body must be"),
    (b'{"samples": [1, "x"]}', "samples[0]: expected an object"),
    (b'{"samples": [{"prompt": "p", "image": 7}]}', "expected a base64 PNG string"),
    (b"", "not JSON"),
])
def test_hostile_json_gets_a_json_400(server: Server, body: bytes, needle: str) -> None:
    code, reply, _ = server.request("POST", "/score", body)
    assert code == 400 and needle in reply["error"], reply
    assert server.health_ok()


def test_many_small_json_values_are_refused_before_parsing(server: Server) -> None:
    """A 3 MiB body of 1.5 M empty objects would parse to ~100 MB of dicts (a 64 MiB one to 1.5 GB)."""
    before = server.status("VmRSS")
    code, reply, _ = server.request("POST", "/score", b'{"samples": [' + b"{}," * 1_500_000 + b"{}]}")
    assert code == 413 and "JSON values, over the server's limit" in reply["error"]
    assert server.status("VmRSS") - before < 30 * MiB


def test_png_bomb_is_refused_from_its_header(server: Server) -> None:
    """A ~7 KiB 1-bit PNG that decodes to 8000x8000 (64 M pixels): 413 at once, no memory spent on it."""
    bomb = png_b64(Image.new("1", (8000, 8000)))
    assert len(bomb) < 16_000
    before = server.status("VmRSS")
    t0 = time.monotonic()
    code, reply, _ = server.request("POST", "/score", score_body([bomb]))
    assert code == 413 and "8000x8000 = 64000000 pixels" in reply["error"] and "--max-image-pixels" in reply["error"]
    assert time.monotonic() - t0 < 2.0
    assert server.status("VmRSS") - before < 20 * MiB
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    code, reply, _ = server.request("POST", "/score", score_body([base64.b64encode(jpeg.getvalue()).decode()]))
    assert code == 400 and "not a PNG" in reply["error"]
    ok = png_b64(Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)))
    code, reply, _ = server.request("POST", "/score", score_body([ok]))
    assert code == 200 and len(reply["results"]) == 1


def test_images_per_request_are_capped(server: Server) -> None:
    img = encode_image(np.zeros((32, 32, 3), dtype=np.uint8))
    code, reply, _ = server.request("POST", "/score", score_body([img] * 9))
    assert code == 413 and "9 images, over the server's limit of 8" in reply["error"]
    assert server.request("POST", "/score", score_body([img] * 8))[0] == 200


def test_slow_clients_are_cut_off_and_disconnects_are_one_log_line(server: Server) -> None:
    """A half-sent request head is dropped; a body not sent in time gets a JSON 408; a client that hangs up
    mid-body is one line in the server's log, never a traceback."""
    log_before = server.log.read_text()
    head = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
    body = open_stalled(server.port, 1000, 10)
    t0 = time.monotonic()
    assert read_reply(head) == b"" and time.monotonic() - t0 < 6  # closed by the server after ~2 s
    reply = read_reply(body)
    assert b" 408 " in reply.split(b"\r\n", 1)[0] and b"not received within 2s" in reply
    head.close()
    body.close()
    gone = open_stalled(server.port, 1000, 10)
    gone.close()
    deadline = time.monotonic() + 5
    while "disconnected before sending its whole request" not in server.log.read_text()[len(log_before):]:
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.05)
    new = server.log.read_text()[len(log_before):]
    assert "Traceback" not in new and sum("disconnected before" in x for x in new.splitlines()) == 1, new


def test_a_chunked_body_is_refused_from_its_head(server: Server) -> None:
    """h11 lets ``Transfer-Encoding: chunked`` override ``Content-Length``: a request declaring 10 bytes and
    sending 1 MiB chunks for 4 s grew the server to 892 MB before a 400.  Now any Transfer-Encoding is a 411
    from the head, nothing read."""
    rss0 = server.status("VmRSS")
    for length in ("Content-Length: 10\r\n", ""):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sk:
            sk.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + length.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n" % MiB + b"a" * MiB + b"\r\n"
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 2:
                    sk.sendall(chunk)
            except OSError:
                pass  # the server closed after its answer
            reply = read_reply(sk)
            assert b" 411 " in reply.split(b"\r\n", 1)[0] and b"Transfer-Encoding is not accepted" in reply, reply[:200]
    assert server.status("VmRSS") - rss0 < 40 * MiB
    assert server.health_ok()


@pytest.mark.parametrize("method,path", [("GET", "/health"), ("POST", "/nope")])
def test_a_body_nobody_reads_cannot_hold_a_connection(server: Server, method: str, path: str) -> None:
    """/health and a 404 answer without reading the body; uvicorn kept the connection for the next request and
    each trickled byte reset its keep-alive timer (1,024 such clients made every request a 503).  Now the
    connection closes within the linger time (the fixture's --client-timeout, 2 s)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sk:
        sk.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n".encode())
        t0 = time.monotonic()
        with pytest.raises(OSError):  # reset once the server has closed for good
            while time.monotonic() - t0 < 15:
                sk.sendall(b"x")
                time.sleep(0.2)
        assert time.monotonic() - t0 < 8
    assert server.health_ok()


class _Echo(Reward):
    """Scores 1 with the prompt as its reason, and a NaN part on prompts that ask for one."""

    name = "echo"

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        return [RewardOutput(score=1.0, reason=s.prompt, components={"c": float("nan") if s.prompt == "nan" else 1.0})
                for s in samples]


def test_replies_are_json_whatever_the_reward_returns() -> None:
    """A reason holding a lone surrogate (valid JSON in the request) was a plain-text 500 and a traceback from
    the response's UTF-8 encoding; a NaN part was sent as NaN.  Now: JSON, escaped; the NaN part a failure."""
    srv = make_server(_Echo(), "127.0.0.1", 0).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
        conn.request("POST", "/score", body=b'{"samples": [{"prompt": "\\ud800"}, {"prompt": "nan"}]}',
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        assert resp.status == 200 and resp.getheader("Content-Type") == "application/json", raw[:200]
        first, second = json.loads(raw)["results"]
        assert first == {"score": 1.0, "components": {"c": 1.0}, "reason": "\ud800", "failure": None}
        # refused in the server's to_output, before the wire's own guard (output_to_json) is reached
        assert second["failure"] == "reward returned a component that is not a finite number (c='nan')"
        assert b"NaN" not in raw
    finally:
        srv.shutdown()
        srv.server_close()


def test_bytes_in_flight_are_capped_and_health_answers(server: Server) -> None:
    """Scaled-down probe of 16 stalled 60 MiB bodies: 6 stalled 6 MiB bodies against a 16 MiB in-flight cap."""
    hwm0 = server.status("VmHWM")
    rss0 = server.status("VmRSS")
    stalled = [open_stalled(server.port, 6 * MiB, 1 * MiB) for _ in range(2)]  # 12 of 16 MiB reserved
    try:
        time.sleep(0.2)
        refused = [open_stalled(server.port, 6 * MiB, 0) for _ in range(4)]
        for sk in refused:
            reply = read_reply(sk)
            assert b" 503 " in reply.split(b"\r\n", 1)[0] and b"retry-after: 1" in reply.lower(), reply[:300]
            sk.close()
        assert server.health_ok()
        assert server.status("VmRSS") - rss0 < 40 * MiB  # refused bodies were never read
    finally:
        for sk in stalled:
            sk.close()
    assert server.status("VmHWM") - hwm0 < 60 * MiB
    time.sleep(0.5)  # the server notices the hang-ups and releases their reservation
    assert server.request("POST", "/score", score_body([None]))[0] == 200


class _Gate(Reward):
    """Blocks until released: keeps a request in the scoring slot."""

    name = "gate"

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        self.release.wait(10)
        return [RewardOutput(score=1.0) for _ in samples]


def test_concurrency_is_bounded_with_503_and_health_stays_up() -> None:
    reward = _Gate()
    srv = make_server(reward, "127.0.0.1", 0, max_concurrency=2).start()
    port = srv.server_address[1]
    try:
        results: list[int] = []

        def post() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/score", body=score_body([None]), headers={"Content-Type": "application/json"})
            results.append(conn.getresponse().status)
            conn.close()
        first = [threading.Thread(target=post) for _ in range(2)]
        for t in first:
            t.start()
        time.sleep(0.3)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # generous: CI machines can be loaded
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        assert health["active"] == 2
        conn.request("POST", "/score", body=score_body([None]), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 503 and resp.getheader("Retry-After") == "1" and "busy" in json.loads(resp.read())["error"]
        conn.close()
        reward.release.set()
        for t in first:
            t.join(10)
        assert results == [200, 200]
    finally:
        reward.release.set()
        srv.shutdown()
        srv.server_close()


def _active(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())["active"]
    finally:
        conn.close()


def _post_body_late(port: int, body: bytes, ctype: str = "application/json") -> tuple[int, dict[str, Any], int]:
    """POST whose body arrives 0.3 s after its head; then GET /health on the same connection.

    Returns the POST's status and reply and the status of the GET (0: the connection was closed).  A server
    that answers a refusal from the head and closes with the body unread resets the connection when the body
    lands: a client still reading the answer can lose it (CI saw it once, on a loaded machine).  A server
    that reads a small refused body first can keep the connection, and the GET proves it did.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sk:
        sk.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.3)
        sk.sendall(body)
        resp = http.client.HTTPResponse(sk)
        resp.begin()
        code, reply = resp.status, json.loads(resp.read())
        try:
            sk.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            again = http.client.HTTPResponse(sk)
            again.begin()
            again.read()
            return code, reply, again.status
        except (OSError, http.client.HTTPException):
            return code, reply, 0


def test_small_refused_bodies_are_read_before_the_answer(server: Server) -> None:
    code, reply, after = _post_body_late(server.port, score_body([None]), ctype="text/plain")
    assert (code, after) == (415, 200) and "application/json" in reply["error"]
    reward = _Gate()
    srv = make_server(reward, "127.0.0.1", 0, max_concurrency=1).start()
    port = srv.server_address[1]
    try:
        held = threading.Thread(target=_post_body_late, args=(port, score_body([None])))
        held.start()
        deadline = time.monotonic() + 10
        while _active(port) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        code, reply, after = _post_body_late(port, score_body([None]))
        assert (code, after) == (503, 200) and "busy" in reply["error"]
        reward.release.set()
        held.join(10)
    finally:
        reward.release.set()
        srv.shutdown()
        srv.server_close()


def test_a_refused_body_that_never_comes_is_waited_for_no_longer_than_the_client_timeout(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sk:
        sk.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n")
        t0 = time.monotonic()
        resp = http.client.HTTPResponse(sk)
        resp.begin()
        assert resp.status == 415 and resp.getheader("Connection") == "close" and json.loads(resp.read())
        assert 1.5 < time.monotonic() - t0 < 8  # the fixture's --client-timeout is 2 s
    assert server.health_ok()


def test_an_oversize_body_still_arriving_gets_its_413_not_a_reset(server: Server) -> None:
    """The server answers 413 from the head; the client is still sending 32 MiB.  Closed at once, the socket
    would reset and the client would see only "connection reset" (every time at this size); lingering, the
    server drops the rest unread (no memory) and the client reads the 413 that names the limit."""
    rss0 = server.status("VmRSS")
    code, reply, _ = server.request("POST", "/score", b" " * (32 * MiB), timeout=30)
    assert code == 413 and f"exceeds the server limit of {8 * MiB}" in reply["error"]
    assert server.status("VmRSS") - rss0 < 40 * MiB


def test_a_lingering_connection_is_closed_within_the_client_timeout(server: Server) -> None:
    sk = open_stalled(server.port, 9 * MiB, 1 * MiB)  # over the 8 MiB limit: 413 from the head
    try:
        reply = read_reply(sk)  # the server half-closes after its answer: the reply ends in end of file
        assert b" 413 " in reply.split(b"\r\n", 1)[0]
        t0 = time.monotonic()
        with pytest.raises(OSError):  # the client goes on sending; the server closes for good (reset)
            while time.monotonic() - t0 < 10:
                sk.sendall(b" " * 1024)
                time.sleep(0.1)
        assert time.monotonic() - t0 < 6  # the fixture's --client-timeout is 2 s
    finally:
        sk.close()
    assert server.health_ok()


def _clients(port: int, clients: int, each: int) -> list[str]:
    """``clients`` threads, ``each`` keep-alive requests apiece; returns every failure seen."""
    failures: list[str] = []
    body = score_body([encode_image(np.zeros((32, 32, 3), dtype=np.uint8))])

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(each):
            try:
                conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures.append(f"HTTP {resp.status}")
            except OSError as e:
                failures.append(type(e).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.close()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return failures


def test_many_concurrent_clients_are_all_answered(server: Server) -> None:
    """Fast representative of 64 clients x 50 requests (the standard library server reset 102 of 3,200)."""
    assert _clients(server.port, 32, 5) == []


# ---------------------------------------------------------------- full-size probes
@pytest.mark.slow
def test_full_probes_keep_the_server_under_1gb_with_health_answering(tmp_path: Path) -> None:
    """Default limits: 16 stalled 60 MiB bodies, 300 half-sent request heads, 64 clients x 50 requests."""
    srv = Server(tmp_path)
    try:
        base = srv.status("VmHWM")
        bomb = png_b64(Image.new("1", (8000, 8000)))
        t0 = time.monotonic()
        assert srv.request("POST", "/score", score_body([bomb]))[0] == 413
        bomb_ms = 1000 * (time.monotonic() - t0)
        stalled = [open_stalled(srv.port, 60 * MiB, 59 * MiB) for _ in range(4)]
        refused = [open_stalled(srv.port, 60 * MiB, 0) for _ in range(12)]
        for sk in refused:
            assert b" 503 " in read_reply(sk).split(b"\r\n", 1)[0]
            sk.close()
        heads = []
        for _ in range(300):
            sk = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sk.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
            heads.append(sk)
        assert srv.health_ok()
        for sk in stalled + heads:
            sk.close()
        deadline = time.monotonic() + 10
        while srv.request("GET", "/health")[1]["active"]:  # the server notices the hang-ups
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        assert _clients(srv.port, 64, 50) == []
        rps = 64 * 50 / (time.monotonic() - t0)
        assert srv.health_ok()
        peak = srv.status("VmHWM")
        print(f"\nreward server: idle {base / MiB:.0f} MiB, peak under the probes {peak / MiB:.0f} MiB; PNG bomb "
              f"refused in {bomb_ms:.0f} ms; 64 clients x 50 requests: 0 failures, {rps:.0f} requests/s")
        assert peak < 1000 * MiB, peak
    finally:
        srv.close()
    assert "Traceback" not in srv.log.read_text()


def test_server_process_stays_small(server: Server) -> None:
    """The baseline the probes are measured against: the blocks reward server is far below 1 GB."""
    assert server.status("VmHWM") < 1000 * MiB
    assert os.path.exists(f"/proc/{server.proc.pid}")
