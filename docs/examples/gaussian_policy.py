"""How to add a policy: a whole policy family in one file.

A toy unified "model" whose image head is continuous: each image is a latent ``z ~ N(mu(prompt), sigma^2)``
over 16 numbers, drawn as a 4x4 grey grid.  Its plans and critiques are fixed texts (no actions, nothing
to train).  What it shows:

* the construction contract: ``from_recipe(recipe, **policy.options)``;
* the action contract for something that is not a token: the sampled segment keeps the latent in
  ``Segment.action`` and one log-prob per action in ``Segment.logprobs``, and ``segment_logprobs``
  recomputes it with the very function the sampler used (:func:`latent_logprob`), so the ratio is 1 before
  the first update;
* registration: ``@register_policy("gaussian_toy")``, or name the file in a recipe:
  ``policy.kind: docs/examples/gaussian_policy.py:GaussianImagePolicy``.
"""
from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model

from r3_rl.policy.base import ImageInput, ImageSample, Policy, TextSample
from r3_rl.policy.registry import register_policy
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

PLAN = "<think> draw it </think>"
CRITIQUE = "<think> looks fine </think> no further edit needed"


class LatentHead(torch.nn.Module):
    """``mu`` per prompt bucket and one learnt log-std per latent element."""

    def __init__(self, buckets: int, latent: int, init_std: float) -> None:
        super().__init__()
        self.mu = torch.nn.Embedding(buckets, latent)
        torch.nn.init.normal_(self.mu.weight, std=0.1)
        self.log_std = torch.nn.Parameter(torch.full((latent,), float(np.log(init_std))))


def latent_logprob(head: LatentHead, bucket: torch.Tensor, z: torch.Tensor, temperature: float) -> torch.Tensor:
    """log N(z; mu, (T sigma)^2) summed over the latent: one action, one log-prob.  The sampler and the learner
    both call this, so the recorded and the recomputed log-probs are the same numbers."""
    std = head.log_std.exp() * temperature
    return torch.distributions.Normal(head.mu(bucket), std).log_prob(z).sum(-1)


@register_policy("gaussian_toy")
class GaussianImagePolicy(Policy):
    template_fields = {"reason": {"prompt"}, "reflect": {"prompt", "image"},
                       "refine": {"prompt", "image", "instruction"}}

    def __init__(self, head: LatentHead, buckets: int) -> None:
        self.head, self.buckets, self.version = head, buckets, 0

    @classmethod
    def from_recipe(cls, recipe: Any, latent: int = 16, buckets: int = 64,
                    init_std: float = 0.5) -> "GaussianImagePolicy":
        torch.manual_seed(recipe.seed)
        return cls(LatentHead(buckets, latent, init_std), buckets)

    @property
    def model(self) -> torch.nn.Module:
        return self.head

    def with_model(self, model: torch.nn.Module) -> "GaussianImagePolicy":
        other = copy.copy(self)
        other.head = model
        return other

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        save_model(self.head, str(Path(path) / "model.safetensors"))
        (Path(path) / "policy.json").write_text(json.dumps({"buckets": self.buckets, "version": self.version}))

    # ------------------------------------------------------------------ sampling
    def _bucket(self, prompt: PromptItem) -> int:
        return zlib.crc32(prompt.prompt.encode()) % self.buckets

    @torch.no_grad()
    def _draw(self, prompts: list[PromptItem], sampling: SamplingParams,
              generator: torch.Generator | None) -> list[ImageSample]:
        bucket = torch.tensor([self._bucket(p) for p in prompts])
        mu = self.head.mu(bucket)
        std = self.head.log_std.exp() * sampling.temperature
        z = mu + std * torch.randn(mu.shape, generator=generator)
        logp = latent_logprob(self.head, bucket, z, sampling.temperature)
        side = int(np.sqrt(z.shape[1]))
        out = []
        for i in range(len(prompts)):
            grey = (torch.sigmoid(z[i]).reshape(side, side).numpy() * 255).astype(np.uint8)
            seg = Segment(modality="image", context={"bucket": int(bucket[i])}, token_ids=[],
                          logprobs=[float(logp[i])], sampling=copy.copy(sampling), action={"z": z[i].tolist()})
            out.append(ImageSample(image=np.repeat(grey[:, :, None], 3, axis=2), segment=seg))
        return out

    def reason(self, prompts: list[PromptItem], sampling: SamplingParams,
               generator: torch.Generator | None = None) -> list[TextSample]:
        return [TextSample(PLAN, Segment("text", {}, [], [], copy.copy(sampling))) for _ in prompts]

    def generate(self, prompts: list[PromptItem], plans: list[str | None], sampling: SamplingParams,
                 generator: torch.Generator | None = None) -> list[ImageSample]:
        return self._draw(prompts, sampling, generator)

    def reflect(self, prompts: list[PromptItem], images: list[ImageInput], sampling: SamplingParams,
                generator: torch.Generator | None = None) -> list[TextSample]:
        return [TextSample(CRITIQUE, Segment("text", {}, [], [], copy.copy(sampling))) for _ in prompts]

    def refine(self, prompts: list[PromptItem], images: list[ImageInput], instructions: list[str],
               sampling: SamplingParams, generator: torch.Generator | None = None) -> list[ImageSample]:
        return self._draw(prompts, sampling, generator)

    # ------------------------------------------------------------------ learning
    def segment_logprobs(self, segments: list[Segment]) -> list[torch.Tensor]:
        out = []
        for s in segments:
            if s.action is None:  # a fixed text: no action to score
                out.append(torch.zeros(0))
                continue
            bucket = torch.tensor([s.context["bucket"]])
            z = torch.tensor([s.action["z"]], dtype=torch.float32)
            out.append(latent_logprob(self.head, bucket, z, s.sampling.temperature))
        return out
