"""Rewards that check the policy against itself.

``self_consistency``: the policy being trained answers yes/no questions about its own image (TIIF's
question lists, or questions derived from GenEval metadata by :mod:`r3_rl.rewards.checklists`); the
reward is the agreement with the expected answers -- soft (probability given to the right answer,
default) or hard (fraction answered right at p > 0.5).  Why: a unified model should understand what it
draws; the reward needs no external model.  It needs the policy, so it sets ``needs_policy = True``
and the trainer calls ``RewardSet.bind_policy(policy)`` (the policy must implement
``Policy.answer_yes_no``).  Scores are read without gradients and without sampling.

``verdict_consistency``: for a critique, 1 when its verdict agrees with the task reward's judgement of
the critiqued image -- "no further edit needed" on a correct image, or an edit on an incorrect one --
else 0.  The task reward of that image comes from the history (``Turn.reward``, filled by the rollout
scorer) or, when missing, from the reward named in the ``task`` option.
"""
from __future__ import annotations

import math
from typing import Any

from r3_rl.errors import UserError
from r3_rl.policy.base import ImageInput, parse_critique
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample, Turn
from r3_rl.rewards.checklists import YES, questions_for
from r3_rl.rewards.registry import load_reward


def agreement(p_yes: list[float], answers: list[str], hard: bool = False) -> float:
    """Mean over questions of P(expected answer) (soft) or of [answer at p > 0.5 == expected] (hard)."""
    if not p_yes or len(p_yes) != len(answers):
        raise ValueError(f"{len(p_yes)} probabilities for {len(answers)} questions")
    vals = []
    for p, a in zip(p_yes, answers):
        if hard:
            vals.append(float((p > 0.5) == (a == YES)))
        else:
            vals.append(p if a == YES else 1.0 - p)
    return sum(vals) / len(vals)


class SelfConsistencyReward(Reward):
    """Agreement of the policy's own yes/no answers about its image with the expected answers.

    Options: ``hard`` (bool, default false: soft agreement), ``max_questions`` (ask at most this many
    per image, first ones; default all), ``batch_size`` (questions per ``answer_yes_no`` call).
    """

    name = "self_consistency"
    needs_policy = True

    def __init__(self, hard: bool = False, max_questions: int | None = None, batch_size: int = 32) -> None:
        if max_questions is not None and max_questions < 1:
            raise UserError(f"self_consistency option max_questions must be >= 1, got {max_questions}")
        self.hard, self.max_questions, self.batch_size = bool(hard), max_questions, max(1, int(batch_size))
        self.policy: Any = None

    def bind_policy(self, policy: Any) -> None:
        self.policy = policy

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        if self.policy is None:
            raise RuntimeError("self_consistency has no policy: the trainer must call RewardSet.bind_policy(policy)")
        out: list[RewardOutput | None] = [None] * len(samples)
        asks: list[tuple[int, str, str]] = []  # (sample index, question, expected answer)
        for i, s in enumerate(samples):
            if s.image is None:
                out[i] = RewardOutput(failure="no image to ask about")
                continue
            try:
                qs = questions_for(s.metadata)[: self.max_questions]
            except UserError as e:
                out[i] = RewardOutput(failure=f"no questions: {e}")
                continue
            asks.extend((i, q.question, q.answer) for q in qs)
        probs: list[float] = []
        for start in range(0, len(asks), self.batch_size):
            chunk = asks[start:start + self.batch_size]
            got = list(self.policy.answer_yes_no([ImageInput(image=samples[i].image) for i, _, _ in chunk],  # type: ignore[arg-type]
                                                 [q for _, q, _ in chunk]))
            if len(got) != len(chunk):
                raise ValueError(f"answer_yes_no returned {len(got)} probabilities for {len(chunk)} questions")
            probs.extend(float(p) for p in got)
        per: dict[int, list[tuple[float, str]]] = {}
        for (i, _, a), p in zip(asks, probs):
            per.setdefault(i, []).append((p, a))
        for i, pairs in per.items():
            ps, ans = [p for p, _ in pairs], [a for _, a in pairs]
            if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in ps):
                out[i] = RewardOutput(failure=f"policy gave probabilities outside [0, 1]: {ps}")
                continue
            soft, acc = agreement(ps, ans), agreement(ps, ans, hard=True)
            out[i] = RewardOutput(score=acc if self.hard else soft,
                                  components={"soft": soft, "accuracy": acc, "questions": float(len(ps))})
        return [o if o is not None else RewardOutput(failure="not scored") for o in out]


def critiqued(history: list[Turn]) -> tuple[int, int] | None:
    """(index of the last reflect turn with text, index of the last image turn before it), or None."""
    r = next((k for k in range(len(history) - 1, -1, -1) if history[k].stage == "reflect" and history[k].text is not None), None)
    if r is None:
        return None
    m = next((k for k in range(r - 1, -1, -1) if history[k].image is not None), None)
    return None if m is None else (r, m)


class VerdictConsistencyReward(Reward):
    """1 when the reflect verdict agrees with the task reward's judgement of the critiqued image, else 0.

    Options: ``stop_phrase`` (default "no further edit needed", matched as the rollout does),
    ``correct_threshold`` (task reward at/above which the image counts as correct, default 1.0),
    ``task`` ({name, options}: reward used when the history carries no task reward for the image).
    """

    name = "verdict_consistency"

    def __init__(self, stop_phrase: str = "no further edit needed", correct_threshold: float = 1.0,
                 task: dict[str, Any] | None = None) -> None:
        if not isinstance(stop_phrase, str) or not stop_phrase.strip():  # "" is in every critique: all would stop
            raise UserError(f"verdict_consistency option stop_phrase: {stop_phrase!r} is blank; give the words that "
                            f"end the loop (the recipe's templates.stop_phrase when left out)")
        self.stop_phrase, self.correct_threshold = stop_phrase, float(correct_threshold)
        if task is not None and (not isinstance(task, dict) or not isinstance(task.get("name"), str)
                                 or set(task) - {"name", "options"}):
            raise UserError("verdict_consistency option task must be {name: <reward>, options: {...}}")
        self.task_spec = task
        # built now, so a wrong name or option in it is a recipe error before any work; its models load in setup
        self._task_built = self._build_task()
        self.task: Reward | None = None

    def _build_task(self) -> Reward | None:
        if self.task_spec is None:
            return None
        options = self.task_spec.get("options") or {}
        if not isinstance(options, dict):
            raise UserError("verdict_consistency option task.options must be a mapping")
        try:
            return load_reward(self.task_spec["name"], **options)
        except UserError as e:
            raise UserError(f"verdict_consistency option task: {e}") from None

    def setup(self) -> None:
        if self.task_spec is not None and self.task is None:
            self.task = self._task_built or self._build_task()
            self._task_built = None
            self.task.setup()

    def teardown(self) -> None:
        if self.task is not None:
            self.task.teardown()
            self.task = None

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        self.setup()
        out: list[RewardOutput | None] = [None] * len(samples)
        found: dict[int, tuple[bool, float | None]] = {}
        pending: list[tuple[int, RewardSample]] = []
        for i, s in enumerate(samples):
            where = critiqued(s.history)
            if where is None:
                out[i] = RewardOutput(failure="no critique of an image in this sample's history")
                continue
            r, m = where
            _, stop = parse_critique(s.history[r].text or "", self.stop_phrase)
            img = s.history[m]
            found[i] = (stop, img.reward)
            if img.reward is None:
                if self.task is None:
                    out[i] = RewardOutput(failure="critiqued image has no task reward (Turn.reward) and no 'task' option")
                    continue
                pending.append((i, RewardSample(prompt=s.prompt, metadata=s.metadata, stage=img.stage, round=img.round,
                                                image=img.image, history=s.history[:m + 1], text=None)))
        if pending and self.task is not None:
            scored = self.task([p for _, p in pending])
            for (i, _), res in zip(pending, scored):
                if res.failed:
                    out[i] = RewardOutput(failure=f"task reward failed: {res.failure}")
                else:
                    found[i] = (found[i][0], float(res.score))  # type: ignore[arg-type]
        for i, (stop, r) in found.items():
            if out[i] is not None or r is None:
                continue
            correct = r >= self.correct_threshold
            out[i] = RewardOutput(score=float(stop == correct), components={"stop": float(stop), "correct": float(correct)})
        return [o if o is not None else RewardOutput(failure="not scored") for o in out]
