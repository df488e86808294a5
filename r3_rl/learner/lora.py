"""LoRA through peft: adapters injected into the policy's own module, reference = adapters switched off.

``get_peft_model`` injects the LoRA layers *in place* into ``policy.model`` (the policy keeps calling the
same module object, now with adapters) and freezes every base weight.  The KL reference is then the
very same module under ``disable_adapter()`` -- the base model, with no second copy in memory.

A module with injected adapters saved by ``save_pretrained`` has ``base_layer``/``lora_A`` keys that a
plain ``from_pretrained`` silently drops (the projections come back randomly initialised).  So the
learner exports through :meth:`LoraAdapters.export`: *merged* weights (W + BA, computed on a copy, the live
weights untouched) saved by the policy running on that copy (:meth:`Policy.with_model`), a normal
checkpoint loadable by ``from_pretrained``.  Exact resume does not go through that export:
:mod:`r3_rl.learner.checkpoint` stores the unmerged state.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from r3_rl.errors import UserError
from r3_rl.policy.base import Policy
from r3_rl.trajectory import Segment


def apply_lora(policy: Policy, cfg: Any) -> "LoraAdapters":
    """Inject LoRA adapters (``learner.lora``) into ``policy.model`` in place."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules
    present = {name.rsplit(".", 1)[-1] for name, _ in policy.model.named_modules()}
    wanted = [targets] if isinstance(targets, str) else list(targets)
    missing = [t for t in wanted if t not in present and t != "all-linear"]
    if missing:
        raise UserError(f"learner.lora.target_modules: {missing[0]!r} is not a module of the policy "
                        f"(e.g. {', '.join(sorted(n for n in present if n.endswith('proj'))[:6]) or 'all-linear'})")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none")
    return LoraAdapters(policy, get_peft_model(policy.model, config))


class LoraAdapters:
    """The adapters injected into ``policy``'s module (``peft_model`` wraps it): the KL reference is the
    module with them switched off, the export the module with them merged."""

    def __init__(self, policy: Policy, peft_model: Any) -> None:
        self.policy, self.peft_model = policy, peft_model

    def reference(self) -> "AdapterDisabledReference":
        return AdapterDisabledReference(self.policy, self.peft_model)

    def export(self, path: str) -> None:
        """Merged weights into ``path``, loadable by ``from_pretrained`` (the live adapters stay unmerged)."""
        merged = copy.deepcopy(self.peft_model).merge_and_unload()
        self.policy.with_model(merged).save_pretrained(path)


class AdapterDisabledReference:
    """The KL reference under LoRA: the policy's base weights, adapters switched off for the call."""

    def __init__(self, policy: Policy, peft_model: Any) -> None:
        self.policy, self.peft_model = policy, peft_model

    @property
    def model(self) -> torch.nn.Module:
        return self.policy.model

    def segment_logprobs(self, segments: list[Segment]) -> list[torch.Tensor]:
        with torch.no_grad(), self.peft_model.disable_adapter():
            return self.policy.segment_logprobs(segments)
