"""``vlm_judge``: a vision-language model behind an OpenAI-compatible chat endpoint judges the image.

Typical server: ``vllm serve Qwen/Qwen2.5-VL-72B-Instruct-AWQ`` and ``url: http://127.0.0.1:8000/v1``.
Two modes:
  * ``questions`` (default; TIIF and anything :func:`~r3_rl.rewards.checklists.questions_for` can ask):
    the judge answers numbered yes/no questions in one JSON reply; score = matching answers / number of
    questions (case-insensitive, so "Yes" == "yes" -- the reference's TIIF scorer missed this), or 1/0
    with ``binary: true``.  A reply that does not parse, or gives a different number of answers, is a
    failure, never a zero.
  * ``checklist`` (GenEval++): prompt + checklist, the judge returns ``{"correct": 0|1, "reason": ...}``.
Transport (httpx, :mod:`r3_rl.rewards.http_json`): one request per image, at most ``concurrency`` in flight,
a true deadline of ``timeout`` seconds per attempt, at most ``retries`` retries with exponential backoff on
transient faults, a ``Retry-After`` honoured up to ``max_retry_after`` seconds.  The API key is read from the
environment variable named by ``api_key_env`` (default: ``OPENAI_API_KEY`` when set) and never reaches a run
file: every reply string and error text is scrubbed of it (and of any 8-character piece of it) before it is
parsed, cut, stored or logged.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.checklists import geneval_checklist, questions_for
from r3_rl.rewards.http_json import HttpError, arequest_json, make_client, one_line, request_json, run_sync, scrub
from r3_rl.rewards.wire import image_data_url

MODES = ("questions", "checklist")

QUESTIONS_PROMPT = (
    "Examine the image and answer each question with yes or no.\n\nQuestions:\n{questions}\n\n"
    "Reply with only a JSON object that maps each question number to \"yes\" or \"no\", in order, for example "
    "{{\"Q1\": \"yes\", \"Q2\": \"no\"}}. There are {n} questions: give exactly {n} answers and nothing else.")

CHECKLIST_SYSTEM = (
    "You judge whether an image matches a text-to-image instruction. Check every checklist item: object "
    "classes, counts, colours, positions in the image (left/right/above/below as seen in the pixels) and "
    "relative sizes. The image must be one coherent, photo-like scene: no cartoon, sketch, collage or multiple "
    "panels. Be strict: if any item is not clearly met, the image is not correct. Reply with only a JSON object "
    "{\"correct\": 1 or 0, \"reason\": \"<one sentence>\"}.")


class JudgeParseError(ValueError):
    """The judge's text reply could not be read as the requested answer format."""


def extract_json_object(text: str) -> Any:
    """The first ``{...}`` block of a reply (code fences and trailing commas tolerated), or None."""
    t = re.sub(r"```(?:json)?", "", text)
    start, end = t.find("{"), t.rfind("}")
    if start < 0 or end <= start:
        return None
    block = t[start:end + 1]
    for candidate in (block, re.sub(r",\s*([}\]])", r"\1", block)):
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):  # not JSON, a 5,000-digit number, 100,000-deep nesting
            continue
    return None


# after a line's yes/no: its opposite, or a word that takes the answer back ("Yes, but the car is blue",
# "No, although ...", "Yes, partly"); "yes, a cat" and "no, there is none" stay answers
HEDGE = r"\b(?:yes|no|but|however|although|though|except|partly|partially|somewhat|maybe|perhaps|possibly)\b"


def _yes_no(value: Any, where: str) -> str:
    v = value.strip().strip(".!,;:\"'").strip().lower() if isinstance(value, str) else value
    if v is True:
        v = "yes"
    if v is False:
        v = "no"
    if v not in ("yes", "no"):
        raise JudgeParseError(f"{where}: expected yes or no, got {value!r}")
    return v


def parse_answers(text: str, n: int) -> list[str]:
    """``n`` yes/no answers from a JSON ``{"Q1": "yes", ...}`` / ``{"answers": [...]}`` reply or yes/no lines
    (``1. yes``, ``No.``, ``yes, a cat``); a line where yes/no runs on into words (``No idea``), meets its
    opposite (``Yes and no``) or is taken back (``Yes, but it is blue``) is a parse failure, counted as the
    reward's failure, not read as an answer."""
    obj = extract_json_object(text)
    if isinstance(obj, dict):
        if isinstance(obj.get("answers"), list):
            values = obj["answers"]
        else:
            numbered = {}
            for k, v in obj.items():
                m = re.fullmatch(r"\s*q?\s*(\d+)\s*", str(k), flags=re.IGNORECASE)
                if m is None:
                    raise JudgeParseError(f"unexpected key {k!r} in the judge's answers")
                numbered[int(m.group(1))] = v
            if sorted(numbered) != list(range(1, len(numbered) + 1)):
                raise JudgeParseError(f"answers are not numbered Q1..Q{len(numbered)}: {sorted(numbered)}")
            values = [numbered[i] for i in range(1, len(numbered) + 1)]
    else:
        values = []
        for line in text.splitlines():
            m = re.match(r"^\s*(?:q?\d+\s*[:.)]\s*)?(yes|no)\b(.*)$", line, flags=re.IGNORECASE)
            if m:  # "yes." / "yes, a cat" answer; "No idea" or "Yes and no" does not: a failure, not a guess
                rest = m.group(2)
                if re.match(r"\s+\w", rest) or re.search(HEDGE, rest, flags=re.IGNORECASE):
                    raise JudgeParseError(f"ambiguous answer line in the judge's reply: {line.strip()[:80]!r}")
                values.append(m.group(1))
        if not values:
            raise JudgeParseError(f"no yes/no answers in the judge's reply: {text[:80]!r}")
    if len(values) != n:
        raise JudgeParseError(f"judge gave {len(values)} answers for {n} questions")
    return [_yes_no(v, f"answer {i + 1}") for i, v in enumerate(values)]


def parse_verdict(text: str) -> tuple[int, str | None]:
    """``(correct, reason)`` from a ``{"correct": 0|1, "reason": ...}`` reply."""
    obj = extract_json_object(text)
    if not isinstance(obj, dict) or "correct" not in obj:
        raise JudgeParseError(f"no {{\"correct\": 0|1}} object in the judge's reply: {text[:80]!r}")
    c = obj["correct"]
    if isinstance(c, str):
        c = {"1": 1, "0": 0, "yes": 1, "no": 0, "true": 1, "false": 0}.get(c.strip().lower(), c)
    if c not in (0, 1) or isinstance(c, float) and not c.is_integer():
        raise JudgeParseError(f"'correct' must be 0 or 1, got {obj['correct']!r}")
    reason = obj.get("reason")
    return int(c), reason if isinstance(reason, str) else None


def reply_text(reply: Any) -> str:
    """``choices[0].message.content`` of a chat completion (string or list of text parts)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeParseError("judge reply has no choices[0].message.content") from None
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        bad = [t for t in parts if not isinstance(t, str)]
        if bad:  # a part {"text": null} raised TypeError out of the reward instead of failing this sample
            raise JudgeParseError(f"judge message content part is {type(bad[0]).__name__}, not text")
        content = "".join(parts)
    if not isinstance(content, str):
        raise JudgeParseError(f"judge message content is {type(content).__name__}, not text")
    return content


class VlmJudgeReward(Reward):
    """VLM judge over an OpenAI-compatible chat API; options in :meth:`__init__` (see module doc)."""

    name = "vlm_judge"

    def __init__(self, url: str, model: str, mode: str = "questions", api_key_env: str | None = None,
                 timeout: float = 60.0, retries: int = 2, backoff: float = 1.0, max_backoff: float = 20.0,
                 concurrency: int = 8, temperature: float = 0.0, max_tokens: int = 512, binary: bool = False,
                 system_prompt: str | None = None, check_at_start: bool = True, max_retry_after: float = 60.0) -> None:
        if mode not in MODES:
            raise UserError(f"vlm_judge option mode: {mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise UserError(f"vlm_judge option url must start with http:// or https://, got {url!r}")
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise UserError("vlm_judge options: concurrency >= 1, retries >= 0 and timeout > 0 are required")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.models_url = self.endpoint.rsplit("/chat/completions", 1)[0] + "/models"
        self.model, self.mode, self.api_key_env = model, mode, api_key_env
        self.timeout, self.retries, self.backoff, self.max_backoff = float(timeout), int(retries), float(backoff), float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self.concurrency, self.temperature, self.max_tokens = int(concurrency), float(temperature), int(max_tokens)
        self.binary, self.check_at_start = bool(binary), bool(check_at_start)
        self.system_prompt = system_prompt if system_prompt is not None else (CHECKLIST_SYSTEM if mode == "checklist" else None)
        self._key: str | None = None

    def __repr__(self) -> str:  # never show the key
        return f"VlmJudgeReward(url={self.endpoint!r}, model={self.model!r}, mode={self.mode!r})"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    @property
    def _secrets(self) -> tuple[str, ...]:
        return (self._key,) if self._key else ()

    def _scrub(self, text: str | None) -> str | None:
        return None if text is None else scrub(text, self._secrets)

    def setup(self) -> None:
        env = self.api_key_env or "OPENAI_API_KEY"
        self._key = os.environ.get(env) or None
        if self.api_key_env and self._key is None:
            raise UserError(f"vlm_judge: environment variable {self.api_key_env} (option api_key_env) is not set")
        if self.check_at_start:
            try:
                request_json("GET", self.models_url, timeout=min(self.timeout, 10.0), headers=self._headers(),
                             secrets=self._secrets)
            except HttpError as e:
                if e.status is None:  # any HTTP answer means something is listening
                    raise UserError(f"vlm_judge: judge server is down: {self._scrub(str(e))}") from None

    def messages(self, sample: RewardSample) -> tuple[list[dict[str, Any]], int]:
        """Chat messages for one sample and the number of answers expected (0 = a verdict)."""
        image = {"type": "image_url", "image_url": {"url": image_data_url(sample.image)}}  # type: ignore[arg-type]
        msgs: list[dict[str, Any]] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if self.mode == "checklist":
            items = "\n".join(f"- {c}" for c in geneval_checklist(sample.metadata))
            text = f"Instruction: {sample.prompt.strip()}\n\nChecklist:\n{items}"
            msgs.append({"role": "user", "content": [image, {"type": "text", "text": text}]})
            return msgs, 0
        qs = questions_for(sample.metadata)
        listing = "\n".join(f"Q{i + 1}: {q.question}" for i, q in enumerate(qs))
        msgs.append({"role": "user", "content": [image, {"type": "text", "text": QUESTIONS_PROMPT.format(questions=listing, n=len(qs))}]})
        return msgs, len(qs)

    async def score_one(self, client: Any, sample: RewardSample) -> RewardOutput:
        if sample.image is None:
            return RewardOutput(failure="no image to judge")
        try:
            msgs, n = self.messages(sample)
        except UserError as e:
            return RewardOutput(failure=f"cannot build the judge prompt: {e}")
        payload = {"model": self.model, "messages": msgs, "temperature": self.temperature, "max_tokens": self.max_tokens}
        try:  # the reply arrives scrubbed of the key; the texts below are scrubbed again before they are cut
            reply = await arequest_json(client, "POST", self.endpoint, payload, timeout=self.timeout,
                                        headers=self._headers(), retries=self.retries, backoff=self.backoff,
                                        max_backoff=self.max_backoff, max_retry_after=self.max_retry_after,
                                        secrets=self._secrets)
            text = reply_text(reply)
            if n == 0:
                correct, reason = parse_verdict(text)
                return RewardOutput(score=float(correct), components={"correct": float(correct)},
                                    reason=None if reason is None else one_line(reason, self._secrets, 500))
            answers = parse_answers(text, n)
        except (HttpError, JudgeParseError) as e:
            return RewardOutput(failure=one_line(f"{type(e).__name__}: {e}", self._secrets, 400))
        expected = [q.answer for q in questions_for(sample.metadata)]
        matched = sum(a == b for a, b in zip(answers, expected))
        frac = matched / n
        wrong = [f"Q{i + 1}" for i, (a, b) in enumerate(zip(answers, expected)) if a != b]
        return RewardOutput(score=float(matched == n) if self.binary else frac,
                            components={"fraction": frac, "questions": float(n)},
                            reason=f"wrong: {', '.join(wrong)}" if wrong else None)

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        if self._key is None and self.api_key_env:
            self.setup()

        async def score_all() -> list[RewardOutput]:
            gate = asyncio.Semaphore(self.concurrency)
            async with make_client(self.endpoint, self.concurrency) as client:
                async def one(sample: RewardSample) -> RewardOutput:
                    async with gate:
                        return await self.score_one(client, sample)
                return list(await asyncio.gather(*(one(s) for s in samples)))
        return run_sync(score_all)
