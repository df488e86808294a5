"""A small JSON-over-HTTP client with timeouts and bounded retries (stdlib only).

Used by the reward-server client and the VLM judge.  Why not retry forever (Flow-GRPO sets 1000
retries): a dead server then looks like a hung run.  Here every call has a per-attempt timeout, at
most ``retries`` extra attempts with exponential backoff, and fails with one line naming the URL and
what went wrong.  Only transient faults are retried (connection refused/reset, timeouts, HTTP 5xx and
429); other 4xx answers are the caller's fault and fail at once.  Request headers (which may carry an
API key) never appear in an error message.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class HttpError(Exception):
    """One-line description of a failed HTTP call; ``status`` is the HTTP code when there was one."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status, self.retryable = status, retryable


def _opener(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlsplit(url).hostname or ""
    # A proxy from the environment must not capture calls to a server on this machine.
    return urllib.request.build_opener(urllib.request.ProxyHandler({})) if host in LOOPBACK else urllib.request.build_opener()


def _once(method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float) -> Any:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with _opener(url).open(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        try:
            detail = e.read(300).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001
            detail = ""
        detail = " ".join(detail.split())[:200]
        raise HttpError(f"HTTP {e.code} from {url}" + (f": {detail}" if detail else ""), status=e.code,
                        retryable=e.code >= 500 or e.code == 429) from None
    except (TimeoutError, socket.timeout):
        raise HttpError(f"no reply from {url} within {timeout:g}s", retryable=True) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise HttpError(f"no reply from {url} within {timeout:g}s", retryable=True) from None
        raise HttpError(f"cannot reach {url} ({reason})", retryable=True) from None
    except (OSError, http.client.HTTPException) as e:  # reset or closed mid-reply, truncated body, ...
        raise HttpError(f"connection to {url} failed ({type(e).__name__}: {e})", retryable=True) from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        snippet = " ".join(raw[:120].decode("utf-8", "replace").split())
        raise HttpError(f"reply from {url} is not JSON: {snippet!r}") from None


def request_json(method: str, url: str, payload: Any = None, *, timeout: float, headers: dict[str, str] | None = None,
                 retries: int = 0, backoff: float = 0.5, max_backoff: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep) -> Any:
    """Send ``payload`` as JSON (or pre-encoded JSON ``bytes``) and return the decoded JSON reply.

    Raises :class:`HttpError` once the retries are spent (or at once for a non-transient fault).
    """
    if payload is None or isinstance(payload, bytes):
        body = payload
    else:
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
    hdrs = {"Accept": "application/json", **(headers or {})}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
    attempts = max(0, int(retries)) + 1
    for attempt in range(attempts):
        try:
            return _once(method, url, body, hdrs, timeout)
        except HttpError as e:
            if not e.retryable or attempt == attempts - 1:
                if attempts > 1 and e.retryable:
                    raise HttpError(f"{e} (after {attempts} attempts)", e.status, e.retryable) from None
                raise
            sleep(min(max_backoff, backoff * (2 ** attempt)))
    raise AssertionError("unreachable")
