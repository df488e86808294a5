"""The policy interface every R3 backend implements (tiny token-unified model, Janus-Pro, ...).

Rollout calls the four stage methods; the learner calls :meth:`Policy.segment_logprobs`.  The one
contract that matters most: ``segment_logprobs(segments)`` under the *same* weights returns exactly
the ``Segment.logprobs`` recorded at sampling time (same temperature, top-k/top-p, CFG, modality
mask, or the same denoising steps), so the policy ratio is 1 before the first update.

Actions are whatever the policy samples: discrete tokens (``Segment.token_ids``), or a continuous action
whose JSON-safe record (a Gaussian latent, a flow-matching :class:`~r3_rl.flow.trace.DenoisingTrace`) is
kept in ``Segment.action``.  The learner only counts actions (``len(Segment.logprobs)``) and compares
log-probabilities; it never looks inside an action.

A policy family is one file: a subclass registered under a name (:mod:`r3_rl.policy.registry`,
``policy.kind``) that builds itself with :meth:`Policy.from_recipe`.  Prompt templates come from the
recipe (``templates``), never from code.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from r3_rl.errors import UserError
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

# ``policy.dtype`` -> torch dtype: the compute dtype of rollout and learner (r3_rl.learner.precision)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TextSample:
    """A sampled plan (reason) or critique (reflect)."""

    text: str
    segment: Segment


@dataclass
class ImageSample:
    """A sampled image (generate/refine): the decoded pixels, how it was sampled, and its discrete tokens
    when the policy draws tokens (``None`` for a continuous image head)."""

    image: np.ndarray  # HxWx3 uint8
    segment: Segment
    image_tokens: list[int] | None = None


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
    # template placeholders each stage fills (``{prompt}``, ``{image}``, ...): the recipe check refuses others
    template_fields: ClassVar[dict[str, set[str]]] = {}

    # --- construction (the plug-in contract of ``policy.kind``) ----------------------------------
    @classmethod
    def from_recipe(cls, recipe: Any, **options: Any) -> "Policy":
        """Build the policy the recipe describes (random weights, or ``policy.model``'s); ``options`` are the
        recipe's ``policy.options``, checked against this signature before any work."""
        raise NotImplementedError(f"{cls.__name__} does not define from_recipe(recipe, **options)")

    @classmethod
    def check_recipe(cls, recipe: Any, source: str, weights: bool = True) -> None:
        """Policy-specific recipe checks run before any work (raise a one-line ``UserError``); ``weights``:
        also that ``policy.model`` is on this machine (``r3-rl doctor`` checks that itself, with a fix)."""

    @classmethod
    def skeleton(cls, recipe: Any) -> "Policy | None":
        """The recipe's policy with its module built without its weights: on the meta device (module names and
        shapes from the config alone, no tensor data read, no memory), or a real build where that is cheap and
        the expensive work comes later (the tiny policy's warm start).  Recipe checks that need module names (a misspelt
        ``learner.lora.target_modules``) run on it before the model load or the warm start, not after them.
        ``None`` (this default): such checks wait for the loaded model."""
        return None

    def warm_start(self, recipe: Any, folder: Path, log: Any = None) -> None:
        """Initialise the weights before the first rollout, in the process that owns the run (workers and
        learner ranks receive the weights instead); ``folder`` may cache the result.  Default: nothing."""

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
        """Differentiable log-probs of each segment's actions under the distribution that sampled them.

        Returns one 1-D tensor per segment, aligned with ``segment.logprobs`` (one entry per action: a token,
        a denoising step, a latent).
        """

    def denoising_scores(self, segments: list[Segment]) -> list[Any]:
        """For segments whose action is a denoising trace (:func:`r3_rl.flow.action.is_flow_segment`): one
        :class:`~r3_rl.flow.action.StepScores` each (differentiable log-probs and Gaussian means of the recorded
        SDE steps), which the learner needs for the image's closed-form KL.  A flow policy implements it with
        :func:`r3_rl.flow.action.score_traces`; a policy that draws no such image has nothing to score."""
        raise NotImplementedError(f"{type(self).__name__} samples no images made of denoising steps")

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The trainable module (what the learner optimises and checkpoints)."""

    def value_features(self, segments: list[Segment]) -> torch.Tensor:
        """``[B, D]`` differentiable hidden state at the last token of each segment's context: what the policy
        reads just before it samples the segment (image features included), and what a PPO critic reads."""
        raise NotImplementedError(f"{type(self).__name__} exposes no hidden states for a critic")

    @property
    def feature_size(self) -> int:
        """``D`` of :meth:`value_features`."""
        raise NotImplementedError(f"{type(self).__name__} exposes no hidden states for a critic")

    def lora_scope(self, train_vision: bool = False) -> list[str]:
        """Prefixes of ``model``'s module names that LoRA adapters may go into: the language model, and the
        vision tower only with ``train_vision`` (this default: the whole model is the language model)."""
        if train_vision:
            raise UserError(f"learner.lora.train_vision: a {type(self).__name__} has no separate vision tower")
        return [""]

    def lora_target_names(self, wanted: list[str]) -> list[str]:
        """The module names ``learner.lora.target_modules`` stands for in this policy (this default: as written).
        A Mixture-of-Transformers policy widens each name to every expert's copy of that projection."""
        return list(wanted)

    # --- copies --------------------------------------------------------------------------------
    def with_model(self, model: torch.nn.Module) -> "Policy":
        """This policy computing with ``model`` (same architecture) instead of its own: the KL reference,
        the merged LoRA export."""
        raise NotImplementedError(f"{type(self).__name__} cannot run on another module (define with_model)")

    def frozen_copy(self, on_host: bool = False) -> "Policy":
        """The KL reference: every weight copied, no gradients, nothing shared with the policy.

        Nothing may be shared, frozen towers included: DeepSpeed casts (bf16), partitions (ZeRO-3) or
        offloads every parameter of the module it wraps, and a shared tensor would then change under the
        reference.  So take the copy before DeepSpeed wraps the policy.  ``on_host``: in host memory (a process
        that only hands the reference on, as the trainer to its learner ranks, keeps no GPU copy).
        """
        model = host_copy(self.model) if on_host else copy.deepcopy(self.model)
        return self.with_model(model.eval().requires_grad_(False))

    # --- understanding (used by the self-consistency reward) ----------------------------------
    def answer_yes_no(self, images: list[ImageInput], questions: list[str]) -> list[float]:
        """Probability that the answer to ``questions[i]`` about ``images[i]`` is "yes" (no sampling)."""
        raise NotImplementedError(f"{type(self).__name__} cannot answer questions about images")

    # False: no :meth:`value_features`, so ``learner.algorithm: ppo`` is refused before any work (a built-in family
    # says so on its recipe side); None: unknown until the learner is built (a plug-in's)
    critic_features: bool | None = None

    # --- optional: supervised critiques rehearsed during RL (``learner.critic_replay``) ------------
    replays_critiques: bool = False  # a built-in family says so on its recipe side too (checked before any work)

    def critique_replay(self, recipe: Any) -> Any:
        """What ``learner.critic_replay`` rehearses: an object with ``examples(k)`` (the supervised critiques of
        optimiser step ``k``) and ``loss(examples)`` (a differentiable scalar); see
        :class:`r3_rl.policy.critique_replay.CritiqueReplay`."""
        raise NotImplementedError(f"{type(self).__name__} has no supervised critiques to rehearse")

    # --- optional: ``decode_image_tokens(tokens) -> HxWx3 uint8`` rebuilds the pixels of an image this
    # policy drew from its tokens; with it the Tree-RL parent buffer stores tokens instead of PNG bytes.

    # --- weights -------------------------------------------------------------------------------
    def _partitioned(self) -> list[torch.nn.Parameter]:
        """Parameters DeepSpeed ZeRO-3 has partitioned: each rank holds a shard and ``p.data`` is empty."""
        return [p for p in self.model.parameters() if hasattr(p, "ds_id")]

    def state_dict(self) -> dict[str, Any]:
        """The full weights.  Under ZeRO-3 they are gathered and copied to CPU (a collective: on several ranks
        every rank calls this), so rollout workers and exports never receive the empty shards."""
        params = self._partitioned()
        if not params:
            return self.model.state_dict()
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def trainable_state_dict(self) -> dict[str, Any]:
        """The weights a learner step changes (``requires_grad``; LoRA: the adapters), detached: views of the live
        weights on their own device, except under ZeRO-3, where they are gathered and copied to CPU.  Callers pack
        them at once (``pack_state``), before the next step changes them in place.  Under ZeRO-3 only these are
        gathered: gathering the whole model to send its adapters would put every weight on one GPU at once, which
        is what a single-rank ZeRO-3 (parameters offloaded to CPU) exists to avoid."""
        entries = self.model.state_dict(keep_vars=True)
        keys = [k for k, v in entries.items() if getattr(v, "requires_grad", False)]
        params = [entries[k] for k in keys if hasattr(entries[k], "ds_id")]
        if not params:
            return {k: entries[k].detach() for k in keys}
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: entries[k].detach().to("cpu", copy=True) for k in keys}

    def weight_nbytes(self, trainable_only: bool = False) -> int:
        """Bytes of the full state dict (``trainable_only``: of :meth:`trainable_state_dict`), without gathering
        it (a ZeRO-3 weight counts at its full size)."""
        return sum(getattr(v, "ds_numel", v.numel()) * v.element_size()
                   for v in self.model.state_dict(keep_vars=True).values()
                   if not trainable_only or getattr(v, "requires_grad", False))

    def load_state_dict(self, state: dict[str, Any], version: int | None = None, partial: bool = False) -> None:
        """``partial``: ``state`` holds some of the weights (the trainable ones after a learner step); every
        name must still be the model's."""
        params = self._partitioned()
        if params:  # ZeRO-3: rank 0's values go into every rank's shard
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                loaded = self.model.load_state_dict(state, strict=not partial)
        else:
            loaded = self.model.load_state_dict(state, strict=not partial)
        if loaded.unexpected_keys:
            raise KeyError(f"weights not in the model: {', '.join(loaded.unexpected_keys[:3])}")
        if version is not None:
            self.version = version

    def save_pretrained(self, path: str) -> None:
        """Write weights (safetensors) + config (+ tokenizer) loadable by ``from_pretrained``."""
        self.model.save_pretrained(path)

    def exported_weight_files(self, folder: Path) -> list[Path]:
        """The files of a :meth:`save_pretrained` folder that hold ``self.model``'s weights (a resume loads them
        into the live module): every ``.safetensors`` here; a layout with other weights beside (BAGEL's VAE)
        names its own."""
        return sorted(Path(folder).glob("*.safetensors"))


def host_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose every parameter and buffer is copied straight to host memory, one tensor
    at a time (``deepcopy``'s memo hands it the CPU copies, so no tensor is ever copied on its own device: a copy
    of a 7B model beside it on its GPU would be 14.8 GB more); tied weights stay tied."""
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in memo:
            host = tensor.detach().to("cpu", copy=True)
            memo[id(tensor)] = (torch.nn.Parameter(host, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, torch.nn.Parameter) else host)
    return copy.deepcopy(module, memo)


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
