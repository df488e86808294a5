"""The ``remote`` reward: a client for ``r3-rl serve-reward`` (:mod:`r3_rl.rewards.server`).

It checks ``/health`` in ``setup`` and fails with one line when nothing answers, instead of retrying forever;
it learns the server's limits there (body bytes, images per request, pixels per image) and splits batches to
fit them, so a too-large batch is never a failed step.  A sample that cannot fit on its own is a failure
naming the limit, never a zero.
"""
from __future__ import annotations

import json
from typing import Any

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.http_json import HttpError, request_json
from r3_rl.rewards.wire import WireError, output_from_json, sample_to_json


def _limit(health: dict[str, Any], key: str) -> int | None:
    value = health.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class RemoteReward(Reward):
    """A reward scored by ``r3-rl serve-reward`` at ``url``.

    Options: ``url`` (e.g. http://127.0.0.1:8765), ``timeout`` (s per request, a true deadline), ``retries``
    (extra attempts on transient faults: connection errors, 5xx, 503 "busy" with its ``Retry-After``),
    ``backoff`` (s, doubled per retry), ``batch_size`` (samples per request), ``send_history`` (send every
    earlier image too; off halves traffic for image-only rewards), ``health_timeout`` (s for the start-up
    check), ``label`` (the name its scores are logged under, default ``remote``; give one per server when a
    recipe uses several).
    """

    name = "remote"

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 2, backoff: float = 1.0, batch_size: int = 16,
                 send_history: bool = True, health_timeout: float = 10.0, label: str = "remote") -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise UserError(f"remote option url must start with http:// or https://, got {url!r}")
        self.name = label
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.batch_size, self.send_history, self.health_timeout = max(1, int(batch_size)), bool(send_history), float(health_timeout)
        self.remote_name: str | None = None
        self.max_request_bytes: int | None = None
        self.max_images: int | None = None
        self.max_image_pixels: int | None = None

    def setup(self) -> None:
        try:
            health = request_json("GET", self.url + "/health", timeout=self.health_timeout)
        except HttpError as e:
            raise UserError(f"remote reward: no reward server at {self.url} ({e}); start one with "
                            f"`r3-rl serve-reward --reward NAME --port PORT`") from None
        if not isinstance(health, dict) or health.get("status") != "ok":
            raise UserError(f"remote reward: {self.url}/health did not answer {{\"status\": \"ok\"}}: {str(health)[:100]}")
        self.remote_name = str(health.get("reward"))
        self.max_request_bytes = _limit(health, "max_request_bytes")
        self.max_images = _limit(health, "max_images")
        self.max_image_pixels = _limit(health, "max_image_pixels")

    def _images(self, s: RewardSample) -> list[Any]:
        return [im for im in [s.image] + ([t.image for t in s.history] if self.send_history else []) if im is not None]

    def _over_limit(self, batch: list[RewardSample], body: bytes) -> str | None:
        """Why ``batch`` cannot be sent as one request, or None."""
        if self.max_request_bytes is not None and len(body) > self.max_request_bytes:
            return (f"{len(body)} bytes as JSON, over the server's limit of {self.max_request_bytes} "
                    f"(send_history: false sends only the latest image)")
        n = sum(len(self._images(s)) for s in batch)
        if self.max_images is not None and n > self.max_images:
            return f"{n} images, over the server's limit of {self.max_images} per request"
        return None

    def _too_big(self, s: RewardSample) -> RewardOutput | None:
        """A failure for a sample holding an image over the server's pixel limit (it would be refused)."""
        for im in self._images(s) if self.max_image_pixels is not None else []:
            if im.shape[0] * im.shape[1] > self.max_image_pixels:  # type: ignore[operator]
                return RewardOutput(failure=f"remote: an image of {im.shape[1]}x{im.shape[0]} pixels is over the "
                                            f"server's limit of {self.max_image_pixels} (--max-image-pixels)")
        return None

    def _score_batch(self, batch: list[RewardSample]) -> list[RewardOutput]:
        encoded: dict[int, Any] = {}  # one PNG per image array in the request
        samples = [sample_to_json(s, history=self.send_history, encoded=encoded) for s in batch]
        body = json.dumps({"samples": samples}, allow_nan=False).encode("utf-8")
        why = self._over_limit(batch, body)
        if why is None:
            return self._send(batch, body)
        if len(batch) > 1:  # split until each request fits the server's limits
            half = len(batch) // 2
            return self._score_batch(batch[:half]) + self._score_batch(batch[half:])
        return [RewardOutput(failure=f"remote: sample is {why}")]

    def _send(self, batch: list[RewardSample], body: bytes) -> list[RewardOutput]:
        try:
            reply = request_json("POST", self.url + "/score", body, timeout=self.timeout,
                                 retries=self.retries, backoff=self.backoff)
            if not isinstance(reply, dict) or not isinstance(reply.get("results"), list):
                raise WireError("reply must be {\"results\": [...]}")
            if len(reply["results"]) != len(batch):
                raise WireError(f"server returned {len(reply['results'])} results for {len(batch)} samples")
        except (HttpError, WireError) as e:
            return [RewardOutput(failure=f"remote: {e}") for _ in batch]
        return [self._result(r, f"results[{i}]") for i, r in enumerate(reply["results"])]

    @staticmethod
    def _result(result: Any, where: str) -> RewardOutput:
        """One result of a reply; a malformed one (a NaN part, a ``true`` score) fails that sample only."""
        try:
            return output_from_json(result, where)
        except WireError as e:
            return RewardOutput(failure=f"remote: {e}")

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        out: list[RewardOutput | None] = [self._too_big(s) for s in samples]
        todo = [i for i, o in enumerate(out) if o is None]
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            for i, o in zip(idx, self._score_batch([samples[i] for i in idx])):
                out[i] = o
        return out  # type: ignore[return-value]
