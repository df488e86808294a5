"""The policy interface every R3 backend implements (tiny token-unified model, Janus-Pro, ...).

Rollout calls the four stage methods; the learner calls :meth:`Policy.segment_logprobs`.  The one
contract that matters most: ``segment_logprobs(segments)`` under the *same* weights returns exactly
the ``Segment.logprobs`` recorded at sampling time (same temperature, top-k/top-p, CFG, modality
mask), so the policy ratio is 1 before the first update.

Prompt templates come from the recipe (``templates``), never from code.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from r3_rl.trajectory import PromptItem, SamplingParams, Segment


@dataclass
class TextSample:
    """A sampled plan (reason) or critique (reflect)."""

    text: str
    segment: Segment


@dataclass
class ImageSample:
    """A sampled image (generate/refine): its discrete tokens and the decoded pixels."""

    image_tokens: list[int]
    image: np.ndarray  # HxWx3 uint8
    segment: Segment


@dataclass
class ImageInput:
    """An image fed back to the policy (reflect/refine): tokens when the policy made it, pixels always."""

    image: np.ndarray
    image_tokens: list[int] | None = None


class Policy(ABC):
    """A unified model that can plan, draw, critique and refine.

    ``version`` counts learner updates applied to these weights; rollout stamps it on every node so
    the learner can refuse (or importance-correct) stale data.
    """

    version: int = 0

    # --- rollout -------------------------------------------------------------------------------
    @abstractmethod
    def reason(self, prompts: list[PromptItem], sampling: SamplingParams,
               generator: torch.Generator | None = None) -> list[TextSample]:
        """Sample a plan (``<think> ... </think>``) per prompt."""

    @abstractmethod
    def generate(self, prompts: list[PromptItem], plans: list[str | None], sampling: SamplingParams,
                 generator: torch.Generator | None = None) -> list[ImageSample]:
        """Sample image tokens conditioned on prompt (+ plan) and decode them."""

    @abstractmethod
    def reflect(self, prompts: list[PromptItem], images: list[ImageInput], sampling: SamplingParams,
                generator: torch.Generator | None = None) -> list[TextSample]:
        """Critique an image against its prompt; the text after the last ``</think>`` is the edit."""

    @abstractmethod
    def refine(self, prompts: list[PromptItem], images: list[ImageInput], instructions: list[str],
               sampling: SamplingParams, generator: torch.Generator | None = None) -> list[ImageSample]:
        """Sample an edited image conditioned on prompt, previous image and edit instruction."""

    # --- learning ------------------------------------------------------------------------------
    @abstractmethod
    def segment_logprobs(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Differentiable per-token log-probs of each segment's tokens under its own sampling params.

        Returns one 1-D tensor per segment, aligned with ``segment.token_ids``.
        """

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The trainable module (what the learner optimises and checkpoints)."""

    # --- understanding (used by the self-consistency reward) ----------------------------------
    def answer_yes_no(self, images: list[ImageInput], questions: list[str]) -> list[float]:
        """Probability that the answer to ``questions[i]`` about ``images[i]`` is "yes" (no sampling)."""
        raise NotImplementedError(f"{type(self).__name__} cannot answer questions about images")

    # --- optional: ``decode_image_tokens(tokens) -> HxWx3 uint8`` rebuilds the pixels of an image this
    # policy drew from its tokens; with it the Tree-RL parent buffer stores tokens instead of PNG bytes.

    # --- weights -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any], version: int | None = None) -> None:
        self.model.load_state_dict(state)
        if version is not None:
            self.version = version

    def save_pretrained(self, path: str) -> None:
        """Write weights (safetensors) + config (+ tokenizer) loadable by ``from_pretrained``."""
        self.model.save_pretrained(path)


def parse_critique(text: str, stop_phrase: str = "no further edit needed") -> tuple[str, bool]:
    """Split a critique into (edit instruction, stop).

    As in the reference: the instruction is the text after the last ``</think>``; a critique with no
    ``</think>`` is treated as "no further edit needed"; the stop test is case-insensitive.
    """
    if "</think>" not in text:
        return stop_phrase, True
    instruction = text.rsplit("</think>", 1)[1].strip()
    stop = stop_phrase.lower() in instruction.lower() or instruction == ""
    return instruction, stop
