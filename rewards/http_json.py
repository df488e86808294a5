"""JSON over HTTP on httpx: a true deadline per request, bounded retries that honour ``Retry-After``, no secret leaks.

Used by the reward-server client and the VLM judge.  Why each rule:

* **A deadline per attempt, not per socket read.**  httpx's timeouts (like the standard library's) apply to
  each read, so a server that sends one byte a second holds a 2 s request forever.  Every attempt here runs
  under ``asyncio.wait_for(timeout)``, which cancels it wherever it is (connect, headers, body).
* **Bounded retries** (Flow-GRPO sets 1000: a dead server then looks like a hung run): at most ``retries``
  more attempts, only for transient faults (connection errors, timeouts, 5xx, 429).  A ``Retry-After`` on any of
  those replies (servers send it on 429 and 503) is honoured, up to ``max_retry_after`` seconds; a server that
  asks for longer fails the call at once.
* **Replies are capped** at ``max_reply_bytes``, decoded: a hostile server cannot make the client buffer
  gigabytes.  The client asks for an uncompressed reply; one layer of gzip or deflate is still read (some
  servers compress regardless), decompressed here with the cap applied as it grows -- httpx would inflate
  each network chunk whole, and a 3.5 KB reply of ``Content-Encoding: gzip, gzip`` to 2 GiB at once, on the
  event loop, past the deadline.  Other or stacked encodings are refused.
* **Only a 2xx reply is an answer**: a redirect (never followed) or a 1xx is an error, not scores.
* **Secrets are scrubbed first.**  Every string of a reply (JSON decoded, so ``\\u`` escapes cannot hide a key)
  and every error text has each ``secret`` -- and any 8-character piece of it, so an echoed prefix goes too --
  replaced by ``***`` *before* it is cut, stored or logged.  Request headers never appear in a message.
"""
from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import httpx

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
MASK = "***"
PIECE = 8  # an echoed run of this many characters of a secret is scrubbed too
T = TypeVar("T")


class HttpError(Exception):
    """One-line description of a failed HTTP call; ``status`` is the HTTP code when there was one."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retryable, self.retry_after = status, retryable, retry_after


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret, and every run of ``PIECE`` or more of its characters, replaced by ``***``."""
    for secret in secrets:
        if not secret or not text:
            continue
        n = min(PIECE, len(secret))
        pieces = {secret[i:i + n] for i in range(len(secret) - n + 1)}
        hit = [False] * len(text)
        for i in range(len(text) - n + 1):
            if text[i:i + n] in pieces:
                hit[i:i + n] = [True] * n
        if any(hit):
            out, i = [], 0
            while i < len(text):
                if hit[i]:
                    while i < len(text) and hit[i]:
                        i += 1
                    out.append(MASK)
                else:
                    out.append(text[i])
                    i += 1
            text = "".join(out)
    return text


def scrub_json(value: Any, secrets: tuple[str, ...]) -> Any:
    """Every string (keys included) of a decoded JSON value, scrubbed."""
    if not secrets:
        return value
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, list):
        return [scrub_json(v, secrets) for v in value]
    if isinstance(value, dict):
        return {scrub(str(k), secrets): scrub_json(v, secrets) for k, v in value.items()}
    return value


def one_line(text: str, secrets: Iterable[str] = (), limit: int = 200) -> str:
    """Scrubbed, whitespace-collapsed and only then cut to ``limit`` characters."""
    text = " ".join(scrub(text, secrets).split())
    return text if len(text) <= limit else text[:limit] + "..."


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # '²' is a digit to str.isdigit, not to float()
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: an HTTP date is GMT (RFC 9110), never this machine's local time
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def make_client(url: str, concurrency: int = 8) -> httpx.AsyncClient:
    host = urllib.parse.urlsplit(url).hostname or ""
    # A proxy from the environment must not capture calls to a server on this machine.
    return httpx.AsyncClient(trust_env=host not in LOOPBACK, follow_redirects=False,
                             limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))


class _Inflater:
    """Decodes a reply's body as it arrives (``Content-Encoding`` identity, or one layer of gzip / deflate),
    raising :class:`HttpError` as soon as the decoded size passes ``cap``."""

    def __init__(self, encoding: str, url: str, cap: int) -> None:
        self.url, self.cap, self.out = url, cap, bytearray()
        enc = encoding.strip().lower()
        if enc in ("", "identity"):
            self.zlib = None
        elif enc in ("gzip", "x-gzip", "deflate"):
            self.zlib = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib header, detected
        else:
            raise HttpError(f"reply from {url} has Content-Encoding {encoding[:40]!r}; the client reads "
                            f"identity, gzip or deflate (one layer)")

    def feed(self, chunk: bytes) -> None:
        if self.zlib is None:
            self.out += chunk
        else:
            try:  # at most one byte past the cap is produced: a bomb stops here, not in memory
                self.out += self.zlib.decompress(chunk, self.cap + 1 - len(self.out))
            except zlib.error as e:
                raise HttpError(f"reply from {self.url} is not valid compressed data ({e})") from None
        if len(self.out) > self.cap:
            raise HttpError(f"reply from {self.url} is over {self.cap} bytes")

    def finish(self) -> bytearray:
        """The decoded body, once the compressed stream ended: a reply cut short (its gzip trailer missing) is a
        failed transfer, retried, even where the part that came decodes to valid JSON."""
        if self.zlib is not None and not self.zlib.eof:
            raise HttpError(f"reply from {self.url} ended inside its compressed data", retryable=True)
        return self.out


async def _once(client: httpx.AsyncClient, method: str, url: str, body: bytes | None, headers: dict[str, str],
                timeout: float, max_reply_bytes: int, secrets: tuple[str, ...]) -> Any:
    try:
        async with client.stream(method, url, content=body, headers=headers, timeout=timeout) as resp:
            inflater = _Inflater(resp.headers.get("content-encoding", ""), url, max_reply_bytes)
            async for chunk in resp.aiter_raw():
                inflater.feed(chunk)
            raw = inflater.finish()
    except httpx.TimeoutException:
        raise HttpError(f"no reply from {url} within {timeout:g}s", retryable=True) from None
    except httpx.HTTPError as e:  # refused, reset, closed mid-reply, truncated body, ...
        detail = one_line(str(e), secrets, 120) or type(e).__name__
        raise HttpError(f"connection to {url} failed ({type(e).__name__}: {detail})", retryable=True) from None
    text = raw.decode("utf-8", "replace")
    if resp.status_code >= 400:
        try:  # decode JSON error bodies first, so an escaped secret is scrubbed too
            text = json.dumps(scrub_json(json.loads(text), secrets))
        except (ValueError, RecursionError):
            pass
        detail = one_line(text, secrets)
        code = resp.status_code
        raise HttpError(f"HTTP {code} from {url}" + (f": {detail}" if detail else ""), status=code,
                        retryable=code >= 500 or code == 429,
                        retry_after=parse_retry_after(resp.headers.get("retry-after")))
    if not 200 <= resp.status_code < 300:  # a redirect is not followed, and its body is not an answer
        where = resp.headers.get("location", "")
        raise HttpError(f"HTTP {resp.status_code} from {url}" + (f" (to {one_line(where, secrets, 120)})" if where
                                                                  else "") + "; expected a 2xx reply",
                        status=resp.status_code)
    try:
        return scrub_json(json.loads(text), secrets)
    except (ValueError, RecursionError):
        raise HttpError(f"reply from {url} is not JSON: {one_line(text, secrets, 120)!r}") from None


async def arequest_json(client: httpx.AsyncClient, method: str, url: str, payload: Any = None, *, timeout: float,
                        headers: dict[str, str] | None = None, retries: int = 0, backoff: float = 0.5,
                        max_backoff: float = 10.0, max_retry_after: float = 60.0, max_reply_bytes: int = 64 << 20,
                        secrets: Iterable[str] = ()) -> Any:
    """Send ``payload`` as JSON (or pre-encoded JSON ``bytes``) and return the decoded, scrubbed JSON reply.

    Raises :class:`HttpError` once the retries are spent (or at once for a non-transient fault).
    """
    body = payload if payload is None or isinstance(payload, bytes) else json.dumps(payload, allow_nan=False).encode()
    hdrs = {"Accept": "application/json", "Accept-Encoding": "identity", **(headers or {})}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
    keys = tuple(s for s in secrets if s)
    attempts = max(0, int(retries)) + 1
    for attempt in range(attempts):
        try:
            return await asyncio.wait_for(_once(client, method, url, body, hdrs, timeout, max_reply_bytes, keys),
                                          timeout)
        except asyncio.TimeoutError:
            err = HttpError(f"no reply from {url} within {timeout:g}s", retryable=True)
        except HttpError as e:
            err = e
        if not err.retryable or attempt == attempts - 1:
            if attempts > 1 and err.retryable:
                raise HttpError(f"{err} (after {attempts} attempts)", err.status, err.retryable) from None
            raise err
        delay = min(max_backoff, backoff * (2 ** attempt))
        if err.retry_after is not None:
            if err.retry_after > max_retry_after:
                raise HttpError(f"{err} (the server asks to retry after {err.retry_after:g}s, more than "
                                f"max_retry_after={max_retry_after:g}s)", err.status) from None
            delay = max(delay, err.retry_after)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code (in a helper thread if a loop already runs here)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())  # type: ignore[arg-type]
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()  # type: ignore[arg-type]


def request_json(method: str, url: str, payload: Any = None, **kw: Any) -> Any:
    """Blocking :func:`arequest_json` with a client of its own (options as there)."""
    async def call() -> Any:
        async with make_client(url, 1) as client:
            return await arequest_json(client, method, url, payload, **kw)
    return run_sync(call)
