"""LoRA through peft: adapters injected into the policy's own module, reference = adapters switched off.

``get_peft_model`` injects the LoRA layers *in place* into ``policy.model`` (the policy keeps calling the
same module object, now with adapters) and freezes every base weight.  The KL reference is then the
very same module under ``disable_adapter()`` -- the base model, with no second copy in memory.
Adapters go into the language model only (:meth:`Policy.lora_scope`): Janus' SigLIP has ``q_proj``/
``k_proj``/``v_proj`` too, and the default targets would otherwise train the frozen vision tower
(``learner.lora.train_vision: true`` asks for it).

A module with injected adapters saved by ``save_pretrained`` has ``base_layer``/``lora_A`` keys that a
plain ``from_pretrained`` silently drops (the projections come back randomly initialised).  So the
learner exports through :meth:`LoraAdapters.export`: *merged* weights (W + BA, computed on a copy, the live
weights untouched) saved by the policy running on that copy (:meth:`Policy.with_model`), a normal
checkpoint loadable by ``from_pretrained``.  Exact resume does not go through that export: the checkpoint keeps
the unmerged adapters (:meth:`LoraAdapters.save`) and a fingerprint of the frozen base, which a resume loads from
``policy.model`` again (:mod:`r3_rl.learner.frozen`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r3_rl.errors import UserError
from r3_rl.learner.frozen import check_loaded_keys, check_same_frozen, frozen_fingerprint, frozen_names
from r3_rl.policy.base import Policy, host_copy
from r3_rl.trajectory import Segment


def lora_targets(policy: Policy, cfg: Any) -> list[str]:
    """Full names of the modules that get adapters: those named in ``target_modules`` (the last part of a
    name, or ``all-linear``) inside :meth:`Policy.lora_scope` -- the language model, plus the vision tower
    only with ``train_vision``.  A name matched nowhere in that scope is a one-line error."""
    roots = policy.lora_scope(cfg.train_vision)
    scope = [(n, m) for n, m in policy.model.named_modules()
             if n and any(r == "" or n == r or n.startswith(r + ".") for r in roots)]
    written = [cfg.target_modules] if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    present = {n.rsplit(".", 1)[-1] for n, _ in scope}
    missing = [t for t in written if t not in present and t != "all-linear"]
    wanted = [t for t in policy.lora_target_names(written) if t in present or t == "all-linear"]
    where = "language model" + (" or vision tower" if cfg.train_vision else "")
    if missing:
        raise UserError(f"learner.lora.target_modules: {missing[0]!r} is not a module of the policy's {where} "
                        f"(e.g. {', '.join(sorted(n for n in present if n.endswith('proj'))[:6]) or 'all-linear'})")
    head = policy.model.get_output_embeddings() if hasattr(policy.model, "get_output_embeddings") else None
    linear = "all-linear" in wanted
    named = [(n, m) for n, m in scope if n.rsplit(".", 1)[-1] in wanted]
    out = [n for n, m in scope if linear and isinstance(m, torch.nn.Linear) and m is not head]
    for n, m in named:  # a name may stand for a container of per-expert copies (the tiny policy's
        # ModalityExperts: q_proj.text and q_proj.image), which peft cannot wrap: each of its layers is adapted
        layers = [n] if isinstance(m, torch.nn.Linear) or not any(True for _ in m.children()) else [
            f"{n}.{c}" for c, child in m.named_children() if isinstance(child, torch.nn.Linear)]
        out += [x for x in layers if x not in out]
    order = {n: i for i, (n, _) in enumerate(policy.model.named_modules())}
    return sorted(out, key=order.__getitem__)


def adapters_in_base_dtype(learner: Any) -> bool:
    """Whether the adapters compute in the base model's dtype: under DeepSpeed, whose engine casts every weight it
    wraps to its dtype (bf16 adapters, fp32 masters in the optimiser); the torch backend keeps peft's fp32 ones.
    Every copy of the policy -- rollout workers, the trainer's mirror of the ranks -- must compute as the learner
    does, or the sampler's log-probs (fp32 adapters) differ from the learner's (bf16) by more than bf16 rounding."""
    return learner.backend == "deepspeed"


def apply_lora(policy: Policy, cfg: Any, in_base_dtype: bool = False) -> "LoraAdapters":
    """Inject LoRA adapters (``learner.lora``) into ``policy.model`` in place; in fp32 (peft's default) or, with
    ``in_base_dtype`` (:func:`adapters_in_base_dtype`), in the dtype of the layer they adapt."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=lora_targets(policy, cfg), bias="none")
    return LoraAdapters(policy, get_peft_model(policy.model, config, autocast_adapter_dtype=not in_base_dtype))


class LoraAdapters:
    """The adapters injected into ``policy``'s module (``peft_model`` wraps it): the KL reference is the
    module with them switched off, the export the module with them merged."""

    def __init__(self, policy: Policy, peft_model: Any) -> None:
        self.policy, self.peft_model = policy, peft_model

    def reference(self) -> "AdapterDisabledReference":
        return AdapterDisabledReference(self.policy, self.peft_model)

    def save(self, file: Path) -> None:
        """What trains (the adapters; under DeepSpeed its own checkpoint holds them instead) into one safetensors
        file, with the frozen base's fingerprint in its metadata: not the base itself (14.8 GB for Janus-Pro-7B)."""
        from safetensors.torch import save_file

        model = self.policy.model
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        base = frozen_fingerprint(model)
        save_file(trained, str(file), metadata={"frozen_fingerprint": base} if base else None)

    def load(self, file: Path) -> None:
        """The adapters :meth:`save` wrote, onto the base loaded from ``policy.model``, after checking that base
        is the one they were trained on.  A file from before fingerprints holds the whole model: loaded whole."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        with safe_open(str(file), framework="pt") as f:
            saved = (f.metadata() or {}).get("frozen_fingerprint")
        model = self.policy.model
        check_same_frozen(saved, frozen_fingerprint(model), str(file))
        missing, unexpected = load_model(model, str(file), strict=False)
        check_loaded_keys(missing, unexpected, frozen_names(model), str(file))

    def export(self, path: str) -> None:
        """Merged weights into ``path``, loadable by ``from_pretrained`` (the live adapters stay unmerged).  The
        merge runs on a copy in host memory (:func:`~r3_rl.policy.base.host_copy`): a copy beside the live model
        on its GPU was 14.8 GB more for Janus-Pro-7B at every checkpoint, past the plan's trainer GPU."""
        merged = host_copy(self.peft_model).merge_and_unload()
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

    def denoising_scores(self, segments: list[Segment]) -> list[Any]:
        with torch.no_grad(), self.peft_model.disable_adapter():
            return self.policy.denoising_scores(segments)
