"""Janus-Pro (1B / 7B) as an R3 policy, through transformers' ``JanusForConditionalGeneration``.

* reason / reflect sample text with ``lm_head`` (reflect sees the image through SigLIP);
* generate / refine sample VQ tokens with the generation head under classifier-free guidance (cond and
  null streams batched, one KV cache) and decode them with the VQ decoder;
* refine conditions on the previous image the only way Janus can take an image in: its understanding
  path (SigLIP embedding in the prompt), followed by the edit instruction; Janus has no pixel-level
  editing path, so the "edit" is a new image drawn with the old one in context;
* :meth:`JanusPolicy.segment_logprobs` recomputes every sampled token's log-prob under exactly the
  distribution that sampled it (CFG, temperature, top-k/top-p, text-vocabulary mask).

Prompt layout: :mod:`r3_rl.policy.janus_prompts`; forward passes: :mod:`r3_rl.policy.janus_engine`.
The VQ-VAE is always frozen (it only decodes); the SigLIP tower is frozen unless ``train_vision``.
"""
from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r3_rl.errors import UserError
from r3_rl.policy.base import DTYPES, ImageInput, ImageSample, Policy, TextSample
from r3_rl.policy.janus_engine import JanusEngine
from r3_rl.policy.janus_prompts import (check_templates, image_ref, png_pixels, uncond_ids, user_content,
                                        without_control_tokens)
from r3_rl.policy.janus_recipe import JanusRecipe, resolve_model
from r3_rl.policy.sampling import token_logprobs
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

STATE_FILE = "r3_policy.json"
YES, NO = ("Yes", " Yes", "yes", " yes"), ("No", " No", "no", " no")
DECODE_CHUNK = 8  # images per VQ decode call


class JanusPolicy(JanusRecipe, Policy):
    def __init__(self, model: torch.nn.Module, processor: Any, templates: dict[str, str],
                 train_vision: bool = False) -> None:
        self._model = model
        self.processor = processor
        self.tok = processor.tokenizer
        self.templates = check_templates(dict(templates))
        self.version = 0
        ids = self.tok.convert_tokens_to_ids
        self.bos_id, self.eos_id, self.pad_id = self.tok.bos_token_id, self.tok.eos_token_id, self.tok.pad_token_id
        self.image_token, self.boi = processor.image_token, processor.image_start_token
        self.eoi = processor.image_end_token
        self.image_token_id, self.boi_id, self.eoi_id = ids(self.image_token), ids(self.boi), ids(self.eoi)
        special = set(self.tok.all_special_tokens) | {self.image_token, self.boi, self.eoi}
        self.control_tokens = tuple(sorted(special, key=len, reverse=True))  # never read from prompt text
        if self.pad_id is None or self.bos_id is None or self.eos_id is None:
            raise UserError("policy.model: the tokenizer needs BOS, EOS and pad tokens (Janus-Pro's have them)")
        cfg = model.config
        self.num_image_tokens = cfg.vq_config.num_patches ** 2
        self.codebook_size = cfg.vq_config.num_embeddings
        if processor.num_image_tokens != cfg.vision_config.num_image_tokens:
            raise UserError(f"policy.model: processor expects {processor.num_image_tokens} image tokens but the "
                            f"vision tower makes {cfg.vision_config.num_image_tokens}")
        vocab = model.lm_head.out_features
        text_mask = torch.arange(vocab) < len(self.tok)  # lm_head rows past the tokenizer are never text
        text_mask[[self.bos_id, self.pad_id, self.image_token_id, self.boi_id, self.eoi_id]] = False
        self.text_mask = text_mask.to(model.lm_head.weight.device)
        ip = processor.image_processor
        self._post = (list(ip.image_mean), list(ip.image_std), float(ip.rescale_factor))
        self.engine = JanusEngine(model, ip, self.pad_id, self.image_token_id)
        self._decoded: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        model.model.vqmodel.requires_grad_(False)
        if not train_vision:
            model.model.vision_model.requires_grad_(False)
        system = self.templates.get("system") or ""
        if not system and getattr(processor, "use_default_system_prompt", False):
            from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT
            system = DEFAULT_SYSTEM_PROMPT
        self.system = system.strip()

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_pretrained(cls, model: str, *, templates: dict[str, str], dtype: str = "float32", device: str = "cpu",
                        image_token_count: int | None = None, train_vision: bool = False,
                        **kw: Any) -> "JanusPolicy":
        """Load a Janus checkpoint (hub id or local directory) and its processor.

        ``image_token_count``: optional check that the checkpoint draws that many VQ tokens per image
        (576 for Janus-Pro); extra ``kw`` go to ``JanusForConditionalGeneration.from_pretrained``.
        """
        if dtype not in DTYPES:
            raise UserError(f"policy.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        source, local_only = resolve_model(model)  # a missing model is the first thing a user needs to hear
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"policy.device: {device!r} but no CUDA device is available here (use cpu)")
        from transformers import JanusForConditionalGeneration

        kw.setdefault("local_files_only", local_only)
        config, processor = _config_and_processor(model, source, kw["local_files_only"])
        from safetensors import SafetensorError  # a weight file cut short by a copy: one line, not a traceback

        try:
            net = JanusForConditionalGeneration.from_pretrained(source, config=config, dtype=DTYPES[dtype], **kw)
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise UserError(f"policy.model: cannot load '{model}': {_short(e)}; give a local path or a hub id "
                            f"available offline") from None
        net.to(device).eval()
        policy = cls(net, processor, templates, train_vision=train_vision)
        if image_token_count is not None and image_token_count != policy.num_image_tokens:
            raise UserError(f"policy.image_token_count: {image_token_count} but '{model}' draws "
                            f"{policy.num_image_tokens} tokens per image")
        state = Path(source) / STATE_FILE
        if local_only and state.is_file():
            policy.version = int(json.loads(state.read_text()).get("version", 0))
        return policy

    @classmethod
    def skeleton(cls, recipe: Any) -> "JanusPolicy | None":
        """``policy.model``'s architecture on the meta device, from its config.json and processor files (a
        checkpoint not yet on this machine: ``None``, nothing is downloaded for a check)."""
        source, local_only = resolve_model(recipe.policy.model or "")
        if not local_only:
            return None
        from transformers import JanusForConditionalGeneration

        config, processor = _config_and_processor(recipe.policy.model, source, True)
        with torch.device("meta"):
            net = JanusForConditionalGeneration(config)
        return cls(net, processor, recipe.templates.model_dump())

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self._model.save_pretrained(path)
        self.processor.save_pretrained(path)
        (Path(path) / STATE_FILE).write_text(json.dumps({"version": self.version}))

    def with_model(self, model: torch.nn.Module) -> "JanusPolicy":
        """On ``model`` (a copy: the KL reference, whose frozen SigLIP and VQ are copies too -- see
        :meth:`Policy.frozen_copy` -- a PPO critic's body, or a merged LoRA export)."""
        other = copy.copy(self)
        other._model = model
        other.engine = JanusEngine(model, self.engine.image_processor, self.pad_id, self.image_token_id)
        return other  # shares the decoded-pixel cache too: same frozen VQ decoder weights, same pixels

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def lora_scope(self, train_vision: bool = False) -> list[str]:
        """The Llama trunk; SigLIP only with ``train_vision``; never the VQ model, aligners or heads."""
        return ["model.language_model"] + (["model.vision_model"] if train_vision else [])

    @property
    def feature_size(self) -> int:
        return int(self._model.config.text_config.hidden_size)

    def value_features(self, segments: list[Segment]) -> torch.Tensor:
        """The trunk's last hidden state over each context, its image through SigLIP as in sampling."""
        refs = [s.context.get("image") for s in segments]
        pixels = {json.dumps(r, sort_keys=True): self._pixels(r) for r in refs if r is not None}
        images = [None if r is None else pixels[json.dumps(r, sort_keys=True)] for r in refs]
        emb, mask, pos = self.engine.embed([s.context["input_ids"] for s in segments], images, left=True)
        return self.engine._trunk(emb, mask, pos, use_cache=False).last_hidden_state[:, -1]

    # ------------------------------------------------------------------ prompts
    def _ids(self, stage: str, values: dict[str, str], image: bool, image_mode: bool) -> list[int]:
        template, values = self.templates[stage], without_control_tokens(values, self.control_tokens)
        if stage == "generate" and values.get("plan") and "{plan}" not in template:
            template = template + " " + values["plan"]  # the plan joins the user turn (T2I-R1 style)
        return self._chat_ids(user_content(template, values, image), image_mode)

    def _chat_ids(self, content: list[dict[str, Any]], image_mode: bool) -> list[int]:
        """One user turn through the processor's chat template -> ids (layout: :mod:`janus_prompts`)."""
        text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        if self.system and not image_mode:
            text = f"{self.system}\n\n{text}"
        if image_mode:
            text += self.boi
        text = text.replace(self.image_token, self.boi + self.image_token * self.num_image_tokens + self.eoi)
        return [self.bos_id] + self.tok(text, add_special_tokens=False)["input_ids"]

    def _null(self, ids: list[int]) -> list[int]:
        return uncond_ids(ids, {self.bos_id, self.boi_id, self.eoi_id, self.image_token_id}, self.pad_id)

    def _pixels(self, ref: dict[str, Any] | None) -> np.ndarray | None:
        """The uint8 pixels an image reference stands for (VQ tokens are decoded one image at a time and
        cached, so sampling and training see bit-identical pixels)."""
        if ref is None:
            return None
        if "png" in ref:
            return png_pixels(ref)
        key = tuple(ref["tokens"])
        if key not in self._decoded:
            self._decoded[key] = self._decode(torch.tensor([key]))[0]
            if len(self._decoded) > 256:
                self._decoded.popitem(last=False)
        return self._decoded[key]

    def decode_image_tokens(self, tokens: list[int]) -> np.ndarray:
        """Pixels of an image this policy drew, from its VQ tokens (decoded and cached as for training)."""
        return self._pixels({"tokens": tokens})  # type: ignore[return-value]

    def _decode(self, tokens: torch.Tensor) -> np.ndarray:
        return self.engine.decode_images(tokens, *self._post)

    def decode_text(self, ids: list[int]) -> str:
        return self.tok.decode([t for t in ids if t not in (self.eos_id, self.pad_id)],
                               skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ sampling
    def _sample(self, stage: str, ctx: list[list[int]], refs: list[dict[str, Any] | None], modality: str,
                sp: SamplingParams, generator: torch.Generator | None) -> list[Segment]:
        self._model.eval()
        images = [self._pixels(r) for r in refs]
        if modality == "image":
            null = [self._null(c) for c in ctx] if sp.cfg_scale != 1.0 else None
            toks, lps = self.engine.sample(ctx, images, "image", sp, self.num_image_tokens, generator, null_ids=null)
        else:
            null = None
            toks, lps = self.engine.sample(ctx, images, "text", sp, sp.max_new_tokens, generator,
                                           allowed=self.text_mask, stop_id=self.eos_id)
        segs = []
        for i in range(len(ctx)):
            context: dict[str, Any] = {"stage": stage, "input_ids": ctx[i], "image": refs[i]}
            if null is not None:
                context["uncond_ids"] = null[i]
            segs.append(Segment(modality=modality, context=context, token_ids=toks[i], logprobs=lps[i],
                                sampling=copy.copy(sp)))
        return segs

    def _image_samples(self, segs: list[Segment]) -> list[ImageSample]:
        # a few images per VQ decode: its full-resolution feature maps take ~0.4 GB per 384x384 image in bf16
        tokens = torch.tensor([s.token_ids for s in segs], dtype=torch.long)
        pixels = np.concatenate([self._decode(tokens[i:i + DECODE_CHUNK]) for i in range(0, len(segs), DECODE_CHUNK)])
        return [ImageSample(image_tokens=list(s.token_ids), image=pixels[i], segment=s) for i, s in enumerate(segs)]

    @staticmethod
    def _refs(images: list[ImageInput]) -> list[dict[str, Any]]:
        return [image_ref(im.image, im.image_tokens) for im in images]

    # ------------------------------------------------------------------ R3 stages
    def reason(self, prompts: list[PromptItem], sampling: SamplingParams,
               generator: torch.Generator | None = None) -> list[TextSample]:
        ctx = [self._ids("reason", {"prompt": p.prompt}, False, False) for p in prompts]
        segs = self._sample("reason", ctx, [None] * len(ctx), "text", sampling, generator)
        return [TextSample(text=self.decode_text(s.token_ids), segment=s) for s in segs]

    def generate(self, prompts: list[PromptItem], plans: list[str | None], sampling: SamplingParams,
                 generator: torch.Generator | None = None) -> list[ImageSample]:
        ctx = [self._ids("generate", {"prompt": p.prompt, "plan": plan or ""}, False, True)
               for p, plan in zip(prompts, plans)]
        return self._image_samples(self._sample("generate", ctx, [None] * len(ctx), "image", sampling, generator))

    def reflect(self, prompts: list[PromptItem], images: list[ImageInput], sampling: SamplingParams,
                generator: torch.Generator | None = None) -> list[TextSample]:
        ctx = [self._ids("reflect", {"prompt": p.prompt}, True, False) for p in prompts]
        segs = self._sample("reflect", ctx, self._refs(images), "text", sampling, generator)
        return [TextSample(text=self.decode_text(s.token_ids), segment=s) for s in segs]

    def refine(self, prompts: list[PromptItem], images: list[ImageInput], instructions: list[str],
               sampling: SamplingParams, generator: torch.Generator | None = None) -> list[ImageSample]:
        ctx = [self._ids("refine", {"prompt": p.prompt, "instruction": ins}, True, True)
               for p, ins in zip(prompts, instructions)]
        return self._image_samples(self._sample("refine", ctx, self._refs(images), "image", sampling, generator))

    # ------------------------------------------------------------------ training forward
    def segment_logprobs(self, segments: list[Segment]) -> list[torch.Tensor]:
        ids: list[list[int]] = []
        images: list[np.ndarray | None] = []
        targets: list[list[int]] = []
        mods: list[str] = []
        row_of: list[int] = []
        null_row: dict[int, int] = {}
        pixels = {}  # one array object per distinct reference: one vision forward per image
        for i, s in enumerate(segments):
            row_of.append(len(ids))
            ref = s.context.get("image")
            key = json.dumps(ref, sort_keys=True) if ref is not None else None
            if key is not None and key not in pixels:
                pixels[key] = self._pixels(ref)
            rows = [s.context["input_ids"]]
            if s.modality == "image" and "uncond_ids" in s.context:
                null_row[i] = len(ids) + 1
                rows.append(s.context["uncond_ids"])
            for r in rows:
                ids.append(r)
                images.append(pixels[key] if key is not None else None)
                targets.append(list(s.token_ids))
                mods.append(s.modality)
        hidden = self.engine.target_hidden(ids, images, targets, mods)
        out: list[torch.Tensor] = []
        for i, s in enumerate(segments):  # logits in chunks of rows, recomputed in backward: see token_logprobs
            keep = torch.tensor(s.token_ids, dtype=torch.long, device=self.engine.device)
            if s.modality == "image":
                out.append(token_logprobs(hidden[row_of[i]], self._model.model.generation_head, self.codebook_size,
                                          keep, s.sampling, uncond=hidden[null_row[i]] if i in null_row else None))
            else:
                out.append(token_logprobs(hidden[row_of[i]], self._model.lm_head, self._model.lm_head.out_features,
                                          keep, s.sampling, self.text_mask))
        return out

    # ------------------------------------------------------------------ understanding
    @torch.no_grad()
    def answer_yes_no(self, images: list[ImageInput], questions: list[str]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the first answer token after the question (no sampling)."""
        self._model.eval()
        yes, no = self._answer_ids(YES), self._answer_ids(NO)
        yes, no = sorted(yes - no), sorted(no - yes)
        asked = [without_control_tokens({"prompt": q}, self.control_tokens) for q in questions]
        ctx = [self._chat_ids(user_content("{image}{prompt}", values, True), False) for values in asked]
        emb, mask, pos = self.engine.embed(ctx, [np.asarray(im.image) for im in images], left=True)
        hidden = self.engine._trunk(emb, mask, pos, use_cache=False).last_hidden_state[:, -1]
        probs = torch.softmax(self._model.lm_head(hidden).float(), dim=-1)
        p_yes, p_no = probs[:, yes].sum(-1), probs[:, no].sum(-1)
        return (p_yes / (p_yes + p_no).clamp_min(1e-30)).cpu().tolist()

    def _answer_ids(self, words: tuple[str, ...]) -> set[int]:
        return {self.tok(w, add_special_tokens=False)["input_ids"][0] for w in words}


def _short(e: BaseException) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line[:200]


def _config_and_processor(model: str, source: str, local_files_only: bool) -> tuple[Any, Any]:
    """The checkpoint's config and processor, once the config says it is a Janus model (small files: read before
    the weights, so a wrong folder is named at once)."""
    from transformers import AutoConfig, AutoProcessor

    def fail(reason: str) -> UserError:
        return UserError(f"policy.model: cannot load '{model}': {reason}; give a local path or a hub id "
                         f"available offline")

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
        if getattr(config, "model_type", None) != "janus":
            raise fail(f"it is a '{config.model_type}' model, not Janus")
        return config, AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as e:
        raise fail(_short(e)) from None
