"""``r3-rl serve-reward``: any reward behind a small JSON HTTP server, and the ``remote`` client for it.

Why a server: detector/CLIP rewards want their own GPU process (and environment) apart from training.
Protocol (JSON only, images as base64 PNG, see :mod:`r3_rl.rewards.wire` -- never pickle):
  * ``GET /health`` -> ``{"status": "ok", "reward": NAME, "max_request_bytes": N}``
  * ``POST /score`` ``{"samples": [sample, ...]}`` -> ``{"results": [{score, components, reason, failure}, ...]}``
    400 malformed request, 411 no Content-Length, 413 body over ``max_request_bytes`` (not read), 500
    the reward raised (one line).  Per-sample failures travel as ``failure`` strings, never as 0.
The server binds 127.0.0.1 unless told otherwise (it has no authentication) and scores one request
at a time (models are not thread-safe); health checks are answered while a request is scored.

The client (:class:`RemoteReward`, recipe name ``remote``) checks ``/health`` in ``setup`` and fails
with one line when nothing answers, instead of retrying forever.
"""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.http_json import HttpError, request_json
from r3_rl.rewards.registry import load_reward, to_output
from r3_rl.rewards.wire import WireError, output_from_json, output_to_json, sample_from_json, sample_to_json

DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: "RewardHTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, code: int, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body, allow_nan=False).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _discard(self, n: int) -> None:
        """Read and drop an oversize body in chunks (no memory use) so the client gets the 413, not a reset."""
        self.connection.settimeout(30)
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "reward": self.server.reward.name,
                             "max_request_bytes": self.server.max_request_bytes})
        else:
            self._send(404, {"error": f"no such endpoint {self.path}; use GET /health or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"no such endpoint {self.path}; use POST /score"}, close=True)
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(411, {"error": "Content-Length header required"}, close=True)
            return
        if int(length) > self.server.max_request_bytes:
            self._send(413, {"error": f"request of {length} bytes exceeds the server limit of "
                                      f"{self.server.max_request_bytes}; send smaller batches"}, close=True)
            self._discard(int(length))
            return
        try:
            body = json.loads(self.rfile.read(int(length)))
            if not isinstance(body, dict) or not isinstance(body.get("samples"), list):
                raise WireError("body must be {\"samples\": [...]}")
            samples = [sample_from_json(s, f"samples[{i}]") for i, s in enumerate(body["samples"])]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._send(400, {"error": f"body is not JSON ({e})"})
            return
        except WireError as e:
            self._send(400, {"error": str(e)})
            return
        try:
            with self.server.lock:
                results = [to_output(r) for r in self.server.reward(samples)] if samples else []
            if len(results) != len(samples):
                raise ValueError(f"reward returned {len(results)} results for {len(samples)} samples")
        except Exception as e:  # noqa: BLE001 - report the reward's error to the client in one line
            self._send(500, {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"})
            return
        self._send(200, {"results": [output_to_json(r) for r in results]})


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, reward: Reward, host: str, port: int, max_request_bytes: int, verbose: bool = False) -> None:
        self.reward, self.max_request_bytes, self.verbose = reward, int(max_request_bytes), verbose
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(reward: Reward, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, verbose: bool = False) -> RewardHTTPServer:
    """A ready (bound, not yet serving) server for an already set-up reward; ``port=0`` picks a free port."""
    if getattr(reward, "needs_policy", False):
        raise UserError(f"reward {reward.name!r} needs the policy being trained and cannot be served")
    if max_request_bytes < 1024:
        raise UserError(f"--max-request-bytes must be at least 1024, got {max_request_bytes}")
    try:
        return RewardHTTPServer(reward, host, port, max_request_bytes, verbose)
    except OSError as e:
        raise UserError(f"serve-reward: cannot listen on {host}:{port} ({e.strerror or e})") from None


def parse_option_args(pairs: list[str]) -> dict[str, Any]:
    """``["detector=owlv2", "threshold=0.25"]`` -> options; values are YAML scalars/lists/maps as in a recipe."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--option {pair!r}: expected KEY=VALUE, e.g. --option detector=owlv2")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"--option {pair!r}: value is not valid YAML") from None
    return out


def serve(reward: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, options: dict[str, Any] | None = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Load ``reward`` with ``options``, set it up (models load now, not on the first request), serve forever."""
    rw = load_reward(reward, **(options or {}))
    rw.setup()
    srv = make_server(rw, host, port, max_request_bytes)
    where = "" if host in ("127.0.0.1", "localhost", "::1") else " -- reachable from other machines, no authentication"
    print(f"r3-rl: serving reward {rw.name!r} on {srv.url} (POST /score, GET /health){where}", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
        rw.teardown()


class RemoteReward(Reward):
    """A reward scored by ``r3-rl serve-reward`` at ``url``.

    Options: ``url`` (e.g. http://127.0.0.1:8765), ``timeout`` (s per request), ``retries`` (extra
    attempts on transient faults), ``backoff`` (s, doubled per retry), ``batch_size`` (samples per
    request), ``send_history`` (send every earlier image too; off halves traffic for image-only rewards),
    ``health_timeout`` (s for the start-up check), ``label`` (the name its scores are logged under, default
    ``remote``; give one per server when a recipe uses several).
    """

    name = "remote"

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 2, backoff: float = 1.0, batch_size: int = 16,
                 send_history: bool = True, health_timeout: float = 10.0, label: str = "remote") -> None:
        if not url.startswith(("http://", "https://")):
            raise UserError(f"remote option url must start with http:// or https://, got {url!r}")
        self.name = label
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.batch_size, self.send_history, self.health_timeout = max(1, int(batch_size)), bool(send_history), float(health_timeout)
        self.remote_name: str | None = None
        self.max_request_bytes: int | None = None

    def setup(self) -> None:
        try:
            health = request_json("GET", self.url + "/health", timeout=self.health_timeout)
        except HttpError as e:
            raise UserError(f"remote reward: no reward server at {self.url} ({e}); start one with "
                            f"`r3-rl serve-reward --reward NAME --port PORT`") from None
        if not isinstance(health, dict) or health.get("status") != "ok":
            raise UserError(f"remote reward: {self.url}/health did not answer {{\"status\": \"ok\"}}: {str(health)[:100]}")
        self.remote_name = str(health.get("reward"))
        limit = health.get("max_request_bytes")
        self.max_request_bytes = int(limit) if isinstance(limit, int) and limit > 0 else None

    def _score_batch(self, batch: list[RewardSample]) -> list[RewardOutput]:
        body = json.dumps({"samples": [sample_to_json(s, history=self.send_history) for s in batch]},
                          allow_nan=False).encode("utf-8")
        if self.max_request_bytes is not None and len(body) > self.max_request_bytes:
            if len(batch) > 1:  # split until each request fits the server's limit
                half = len(batch) // 2
                return self._score_batch(batch[:half]) + self._score_batch(batch[half:])
            return [RewardOutput(failure=f"remote: sample is {len(body)} bytes as JSON, over the server's limit of "
                                         f"{self.max_request_bytes} (send_history: false sends only the latest image)")]
        try:
            reply = request_json("POST", self.url + "/score", body, timeout=self.timeout,
                                 retries=self.retries, backoff=self.backoff)
            if not isinstance(reply, dict) or not isinstance(reply.get("results"), list):
                raise WireError("reply must be {\"results\": [...]}")
            if len(reply["results"]) != len(batch):
                raise WireError(f"server returned {len(reply['results'])} results for {len(batch)} samples")
            return [output_from_json(r, f"results[{i}]") for i, r in enumerate(reply["results"])]
        except (HttpError, WireError) as e:
            return [RewardOutput(failure=f"remote: {e}") for _ in batch]

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        out: list[RewardOutput] = []
        for start in range(0, len(samples), self.batch_size):
            out.extend(self._score_batch(samples[start:start + self.batch_size]))
        return out
