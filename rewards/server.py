"""``r3-rl serve-reward``: any reward behind a JSON HTTP server on uvicorn + Starlette, hardened for hostile clients.

Why a server: detector/CLIP rewards want their own GPU process (and environment) apart from training.  The
client is :class:`r3_rl.rewards.remote.RemoteReward` (recipe name ``remote``).
Protocol (JSON only, images as base64 PNG, see :mod:`r3_rl.rewards.wire` -- never pickle):

* ``GET /health`` -> ``{"status": "ok", "reward": NAME, "max_request_bytes", "max_images", "max_image_pixels"}``
* ``POST /score`` ``{"samples": [sample, ...]}`` -> ``{"results": [{score, components, reason, failure}, ...]}``

Every answer is JSON, errors included: 400 malformed (any shape: 200,000-deep nesting, 5,000-digit numbers),
404/405 unknown route or method, 408 body not sent within ``client_timeout``, 411 no Content-Length (or a
Transfer-Encoding: chunked would override it, so it is refused), 413 body,
image count or image pixels over a limit (the PNG header is read before decoding: a 7 KiB PNG can decode to
8000x8000), 415 not ``application/json`` (a web page cannot send a plain cross-site POST), 500 the reward
raised (one line), 503 busy (``max_concurrency`` requests or ``max_inflight_bytes`` of bodies already
admitted; ``Retry-After: 1``).  A refused body of at most ``DRAIN_BYTES`` is read before the answer (see there);
a larger one is dropped as it arrives after the answer (:mod:`r3_rl.rewards.server_protocol`, lingering close).
A client that does not finish its request head within ``client_timeout`` is
disconnected; a client that disconnects is one log line.  The reward scores one request at a time in a worker
thread (models are not thread-safe), so ``/health`` answers throughout.
The server binds 127.0.0.1 unless told otherwise (it has no authentication).
"""
from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward
from r3_rl.rewards.registry import load_reward, to_output
from r3_rl.rewards.remote import RemoteReward  # noqa: F401 - its import path before it had a module of its own
from r3_rl.rewards.server_protocol import HardenedH11
from r3_rl.rewards.wire import WireError, WireLimitError, count_images, output_to_json, sample_from_json

DEFAULT_PORT = 8765
# JSON values per body (counted from ',', '[' and '{' before parsing): a 64 MiB body of `{},{},...` would
# otherwise become 20 M Python dicts (1.5 GB).  Real requests hold a few thousand.
MAX_JSON_VALUES = 1_000_000
# A refused request whose declared body is at most this many bytes is read (and dropped) before the answer.
# Closing a socket with unread bytes in its receive buffer sends a TCP reset, and a client that is still
# reading the answer then sees "connection reset" instead of the 503/415 (a race a loaded machine loses).
# Larger bodies are never stored: the connection lingers (server_protocol) and drops them as they arrive.
DRAIN_BYTES = 64 << 10
DRAIN_SECONDS = 5.0  # also the longest a connection lingers
log = logging.getLogger("r3_rl.serve_reward")


@dataclass
class Limits:
    """What one server accepts; the defaults keep it under 1 GB with the shipped rewards."""

    max_request_bytes: int = 64 << 20  # one request body
    max_inflight_bytes: int = 256 << 20  # bodies admitted at once (Content-Length reserved before reading)
    max_images: int = 64  # images per request (latest images and history)
    max_image_pixels: int = 1024 * 1024  # decoded pixels per image: 1024x1024
    max_concurrency: int = 64  # /score requests admitted at once (reading, waiting or scoring)
    client_timeout: float = 30.0  # s to send a request head, and again to send its body
    max_connections: int = 1024  # open connections; past it uvicorn answers 503

    @property
    def refusal_wait(self) -> float:
        """Seconds a refused request's body is waited for: read when small, dropped while lingering when not."""
        return min(self.client_timeout, DRAIN_SECONDS)


def _error(code: int, message: str, close: bool = False, **headers: str) -> JSONResponse:
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"error": message}, status_code=code, headers=headers or None)


def _not_json(constant: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON, though Python's parser takes them: a ``NaN`` turn
    reward would score as a flawed image instead of being refused."""
    raise ValueError(f"{constant} is not a JSON value")


async def _drain(request: Request, size: int, timeout: float) -> bool:
    """Read and drop a refused body of ``size`` bytes when it is small; True when all of it arrived in time
    (h11 ends the stream at Content-Length, so a finished stream is the whole body)."""
    if size > DRAIN_BYTES:
        return False
    try:
        with anyio.fail_after(timeout):
            async for _ in request.stream():
                pass
    except (TimeoutError, ClientDisconnect):
        return False
    return True


class ScoreService:
    """The two endpoints, with admission control; scoring runs in a worker thread, one request at a time."""

    def __init__(self, reward: Reward, limits: Limits) -> None:
        self.reward, self.limits = reward, limits
        self.active = 0  # /score requests admitted
        self.inflight = 0  # body bytes reserved by them
        self.worker = anyio.CapacityLimiter(1)

    async def health(self, request: Request) -> JSONResponse:
        lim = self.limits
        return JSONResponse({"status": "ok", "reward": self.reward.name, "max_request_bytes": lim.max_request_bytes,
                             "max_images": lim.max_images, "max_image_pixels": lim.max_image_pixels,
                             "active": self.active})

    async def score(self, request: Request) -> Response:
        lim = self.limits
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        length = request.headers.get("content-length", "")
        if ctype != "application/json":
            drained = length.isdigit() and await _drain(request, int(length), lim.refusal_wait)
            return _error(415, f"Content-Type must be application/json, got {ctype or 'none'!r}", close=not drained)
        if "transfer-encoding" in request.headers:  # h11 lets chunked override Content-Length: refuse both
            return _error(411, "Transfer-Encoding is not accepted; send the body with a Content-Length", close=True)
        if not length.isdigit():
            return _error(411, "Content-Length header required", close=True)
        size = int(length)
        if size > lim.max_request_bytes:
            return _error(413, f"request of {size} bytes exceeds the server limit of {lim.max_request_bytes}; "
                               f"send smaller batches", close=True)
        if self.active >= lim.max_concurrency or self.inflight + size > lim.max_inflight_bytes:
            busy = f"busy: {self.active} requests ({self.inflight} bytes) in flight; retry"
            drained = await _drain(request, size, lim.refusal_wait)
            return _error(503, busy, close=not drained, **{"Retry-After": "1"})
        self.active += 1
        self.inflight += size
        try:
            body = bytearray()
            with anyio.fail_after(lim.client_timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > size:  # never hold more than was reserved
                        break
            if len(body) != size:
                return _error(400, f"body is {'over ' if len(body) > size else ''}{len(body)} bytes, "
                                   f"Content-Length said {size}", close=True)
            code, reply = await anyio.to_thread.run_sync(self._score_body, body, limiter=self.worker)
            return Response(reply, status_code=code, media_type="application/json")
        except TimeoutError:
            return _error(408, f"request body not received within {lim.client_timeout:g}s", close=True)
        except ClientDisconnect:
            host = request.client.host if request.client else "?"
            log.warning("client %s:%s disconnected before sending its whole request", host,
                        request.client.port if request.client else "?")
            return Response(status_code=400)
        finally:
            self.active -= 1
            self.inflight -= size

    def _score_body(self, raw: bytearray) -> tuple[int, bytes]:
        """``(status, JSON reply as bytes)`` for one request body; never raises.

        Encoded here with ASCII escapes, so a reason holding a lone surrogate (``\\ud800``, valid JSON) is
        still a JSON reply, not a 500 from the response's UTF-8 encoding outside any ``try``."""
        code, reply = self._score_json(raw)
        try:
            return code, json.dumps(reply, allow_nan=False).encode()
        except (ValueError, TypeError) as e:  # a NaN or infinity, or a value JSON has no form for (a tuple key)
            return 500, json.dumps({"error": f"reward reply is not JSON ({e})"}).encode()

    def _score_json(self, raw: bytearray) -> tuple[int, dict[str, Any]]:
        """Parse, check limits, decode and score one request body: ``(status, JSON reply)``; never raises."""
        values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
        if values > MAX_JSON_VALUES:
            return 413, {"error": f"request holds about {values} JSON values, over the server's limit of "
                                  f"{MAX_JSON_VALUES}; send smaller batches"}
        try:
            body = json.loads(raw, parse_constant=_not_json)
        except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, 5,000-digit ints, 200,000-deep nesting
            return 400, {"error": f"body is not JSON ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"}
        del raw
        try:
            if not isinstance(body, dict) or not isinstance(body.get("samples"), list):
                raise WireError("body must be {\"samples\": [...]}")
            n = count_images(body["samples"])
            if n > self.limits.max_images:
                raise WireLimitError(f"request holds {n} images, over the server's limit of "
                                     f"{self.limits.max_images} (--max-images); send smaller batches")
            samples = [sample_from_json(s, f"samples[{i}]", self.limits.max_image_pixels)
                       for i, s in enumerate(body["samples"])]
        except WireLimitError as e:
            return 413, {"error": str(e)}
        except (WireError, ValueError, TypeError, RecursionError) as e:
            return 400, {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
        try:
            results = [to_output(r) for r in self.reward(samples)] if samples else []
            if len(results) != len(samples):
                raise ValueError(f"reward returned {len(results)} results for {len(samples)} samples")
            return 200, {"results": [output_to_json(r) for r in results]}
        except Exception as e:  # noqa: BLE001 - report the reward's error to the client in one line
            return 500, {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    hint = "; use GET /health or POST /score"
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}{hint}"},
                        status_code=exc.status_code, headers=exc.headers)


def build_app(reward: Reward, limits: Limits) -> Starlette:
    svc = ScoreService(reward, limits)
    app = Starlette(routes=[Route("/health", svc.health, methods=["GET"]), Route("/score", svc.score, methods=["POST"])],
                    exception_handlers={HTTPException: _http_error})
    app.state.service = svc
    return app


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise UserError(f"serve-reward: cannot listen on {host}:{port} ({e.strerror or e})") from None


class RewardServer:
    """A bound server for a set-up reward: ``serve_forever()`` in this thread or ``start()`` in a background one."""

    def __init__(self, reward: Reward, host: str, port: int, limits: Limits, verbose: bool = False) -> None:
        self.reward, self.limits = reward, limits
        self.socket = _bind(host, port)
        self.server_address = self.socket.getsockname()[:2]
        protocol = type("ServerH11", (HardenedH11,), {"head_timeout": limits.client_timeout,
                                                       "linger_seconds": limits.refusal_wait})
        config = uvicorn.Config(build_app(reward, limits), http=protocol, ws="none", lifespan="off", log_config=None,
                                access_log=verbose, limit_concurrency=limits.max_connections, backlog=2048,
                                timeout_keep_alive=5, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 10.0) -> "RewardServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="reward-server")
        self._thread.start()
        for _ in range(int(timeout / 0.01)):
            if self.server.started:
                return self
            self._thread.join(0.01)
        raise RuntimeError("reward server did not start")

    def shutdown(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def server_close(self) -> None:
        self.socket.close()


def make_server(reward: Reward, host: str = "127.0.0.1", port: int = DEFAULT_PORT, limits: Limits | None = None,
                verbose: bool = False, **overrides: Any) -> RewardServer:
    """A bound (not yet serving) server for an already set-up reward; ``port=0`` picks a free port.

    ``overrides`` are :class:`Limits` fields, e.g. ``max_request_bytes=200_000``."""
    if getattr(reward, "needs_policy", False):
        raise UserError(f"reward {reward.name!r} needs the policy being trained and cannot be served")
    lim = Limits(**{**asdict(limits or Limits()), **overrides})
    if lim.max_request_bytes < 1024:
        raise UserError(f"--max-request-mb must allow at least 1024 bytes, got {lim.max_request_bytes}")
    if min(lim.max_inflight_bytes - lim.max_request_bytes + 1, lim.max_images, lim.max_image_pixels,
           lim.max_concurrency, lim.max_connections) < 1 or lim.client_timeout <= 0:
        raise UserError("serve-reward: every limit must be positive, and --max-inflight-mb >= --max-request-mb")
    return RewardServer(reward, host, port, lim, verbose)


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
          limits: Limits | None = None, verbose: bool = False) -> None:
    """Load ``reward`` with ``options``, set it up (models load now, not on the first request), serve until Ctrl-C."""
    rw = load_reward(reward, **(options or {}))
    srv = make_server(rw, host, port, limits, verbose)  # refuse a busy port before loading models
    rw.setup()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("r3-rl serve-reward: %(message)s"))
    for name in ("r3_rl.serve_reward", "uvicorn.error"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
        logging.getLogger(name).propagate = False
    where = "" if host in ("127.0.0.1", "localhost", "::1") else " -- reachable from other machines, no authentication"
    print(f"r3-rl: serving reward {rw.name!r} on {srv.url} (POST /score, GET /health){where}", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
    finally:
        srv.server_close()
        rw.teardown()
