"""Janus forward passes: batched sampling with a KV cache, and the teacher-forced training forward.

Janus has two output heads on one Llama trunk: ``lm_head`` over the text vocabulary, and the
generation head (``model.generation_head``) over the VQ codebook, whose sampled tokens are fed back
through ``generation_embeddings`` + ``generation_aligner`` (``prepare_embeddings_for_image_generation``)
rather than the text embedding table.  Input images for understanding go through SigLIP +
``aligner`` and replace the ``<image_placeholder>`` embeddings.

Sampling and training reach the *same* logits through the same embedding path and the same
:func:`r3_rl.policy.sampling.sampling_logprobs`, which is what makes the recorded log-probs equal the
training log-probs.  Sampling batches rows of different lengths by left padding (position ids
count real tokens only), the cond and null CFG streams of an image batch are one batch of 2B rows
sharing one KV cache, preallocated for the whole image and written in place (:mod:`r3_rl.policy.kv_cache`).  Training runs each distinct context once and feeds every row's targets on
its KV cache when contexts repeat (siblings), else one right-padded forward over full rows.  Padding
and sharing never change a row's log-probs (tested).

Why our own loop instead of ``model.generate(generation_mode="image")``: that loop re-runs generic
``prepare_inputs_for_generation`` / logits-processor machinery on a static cache sized for the whole
image per step, cannot apply top-p/top-k from our :class:`SamplingParams` with the exact same
function the learner uses, and does not return log-probs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from r3_rl.policy.kv_cache import PreallocatedCache, ReplayCache
from r3_rl.policy.sampling import cfg_logits, check_sampled, sample_tokens, sampling_logprobs
from r3_rl.policy.shared_context import first_rows, shared_context_rows
from r3_rl.policy.zero3 import gathered
from r3_rl.trajectory import SamplingParams


class JanusEngine:
    """Batched forwards of a ``JanusForConditionalGeneration`` (no prompts, no tokenizer)."""

    def __init__(self, model: torch.nn.Module, image_processor: object, pad_id: int, image_token_id: int) -> None:
        self.model = model
        self.image_processor = image_processor
        self.pad_id = pad_id
        self.image_token_id = image_token_id
        self.use_fast_decode = True  # False: every step through LlamaModel.forward (reference path, tests)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # ------------------------------------------------------------------ inputs
    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """SigLIP inputs of uint8 HxWx3 images through the checkpoint's image processor."""
        from PIL import Image

        pil = [Image.fromarray(np.ascontiguousarray(im, dtype=np.uint8)) for im in images]
        pv = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.model.dtype)

    def embed(self, ids: list[list[int]], images: list[np.ndarray | None], gen_from: list[int] | None = None,
              left: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded input embeddings ``[B, L, D]``, attention mask and position ids.

        ``images[i]`` (or None) fills row i's ``<image_placeholder>`` slots with SigLIP features (rows
        holding the same array object share one vision forward).  ``gen_from[i]``: positions from this
        index on hold VQ tokens, embedded by the generation embedding path (teacher forcing).
        """
        n, width = len(ids), max(len(x) for x in ids)
        tok = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        is_gen = torch.zeros((n, width), dtype=torch.bool)
        for i, x in enumerate(ids):
            start = width - len(x) if left else 0
            tok[i, start:start + len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, start:start + len(x)] = 1
            if gen_from is not None and gen_from[i] < len(x):
                is_gen[i, start + gen_from[i]:start + len(x)] = True
        tok, mask, is_gen = tok.to(self.device), mask.to(self.device), is_gen.to(self.device)
        emb = self.model.get_input_embeddings()(torch.where(is_gen, self.pad_id, tok))
        if bool(is_gen.any()):
            gen = self.model.prepare_embeddings_for_image_generation(torch.where(is_gen, tok, 0))
            emb = torch.where(is_gen.unsqueeze(-1), gen.to(emb.dtype), emb)
        distinct: dict[int, int] = {}
        order: list[np.ndarray] = []
        for im in images:
            if im is not None and id(im) not in distinct:
                distinct[id(im)] = len(order)
                order.append(im)
        if order:
            feats = self.model.model.get_image_features(self.pixel_values(order)).pooler_output
            slots = (tok == self.image_token_id) & ~is_gen  # a VQ id may equal the placeholder id
            counts = slots.sum(-1).tolist()
            if any(c != (feats.shape[1] if im is not None else 0) for c, im in zip(counts, images)):
                raise ValueError(f"image placeholders per row {counts} do not match the vision tower's "
                                 f"{feats.shape[1]} tokens per image")
            rows = [feats[distinct[id(im)]] for im in images if im is not None]
            emb = emb.masked_scatter(slots.unsqueeze(-1), torch.cat(rows).to(emb.dtype))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return emb, mask, pos

    def _trunk(self, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: object = None,
               use_cache: bool = True):
        return self.model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                                cache=cache, use_cache=use_cache)

    @property
    def num_layers(self) -> int:
        return self.model.model.language_model.config.num_hidden_layers

    # ------------------------------------------------------------------ sampling
    def _decode_step(self, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: object,
                     rotary: tuple[torch.Tensor, torch.Tensor] | None, padded: bool = True) -> torch.Tensor:
        """One cached decoding step -> last hidden state ``[R, D]``.

        For the Llama trunk every Janus checkpoint has, this calls the decoder layers directly with the
        mask transformers would build (``create_causal_mask``, or directly the padding mask for sdpa)
        and rotary tables computed once per call to :meth:`sample`: the same layer maths as
        ``LlamaModel.forward`` without its per-call wrappers, which dominate a small model's step time.
        """
        lm = self.model.model.language_model
        if rotary is None:
            return self._trunk(emb, mask, pos, cache).last_hidden_state[:, -1]
        if lm.config._attn_implementation == "sdpa":
            # one query per row: the causal mask is the padding mask (True = attend), as sdpa_mask builds
            # it; without padding no mask at all (sdpa's faster unmasked kernel, same maths)
            attn = mask[:, None, None, :] if padded else None
        else:
            from transformers.masking_utils import create_causal_mask

            attn = create_causal_mask(config=lm.config, inputs_embeds=emb, attention_mask=mask,
                                      cache=cache, position_ids=pos)
        h = emb
        for layer in lm.layers[:lm.config.num_hidden_layers]:
            h = layer(h, attention_mask=attn, position_embeddings=rotary, position_ids=pos, cache=cache,
                      use_cache=True)
        return lm.norm(h)[:, -1]

    def fast_decode(self) -> bool:
        lm = self.model.model.language_model
        return self.use_fast_decode and all(hasattr(lm, a) for a in ("layers", "rotary_emb", "norm"))

    @torch.inference_mode()
    def sample(self, ids: list[list[int]], images: list[np.ndarray | None], modality: str, sp: SamplingParams,
               steps: int, generator: torch.Generator | None = None, null_ids: list[list[int]] | None = None,
               allowed: torch.Tensor | None = None, stop_id: int | None = None,
               ) -> tuple[list[list[int]], list[list[float]]]:
        """Sample ``steps`` tokens per row (text stops early at ``stop_id``, kept as the last token).

        ``null_ids`` (image, CFG): the null streams, run in the same batch as the conditional ones.
        Returns per-row token ids and their log-probs under the sampling distribution.
        """
        n = len(ids)
        cfg = null_ids is not None and modality == "image"
        rows, row_images = (ids + null_ids, images + images) if cfg else (ids, images)  # type: ignore[operator]
        emb, mask, pos = self.embed(rows, row_images, left=True)
        r, width = mask.shape
        cache = PreallocatedCache(self.num_layers, width + steps)  # written in place: no per-step concatenation
        hidden = self._trunk(emb, mask, pos, cache).last_hidden_state[:, -1]
        full_mask = torch.ones((r, width + steps), dtype=torch.bool, device=self.device)
        full_mask[:, :width] = mask.bool()
        step_pos = pos[:, -1:] + torch.arange(1, steps + 1, device=self.device)  # [R, steps]
        padded = not bool(mask.bool().all())
        fast = self.fast_decode()
        rotary = None
        if fast:
            cos, sin = self.model.model.language_model.rotary_emb(emb, step_pos)
        gen = _device_generator(generator, self.device)
        head = self.model.model.generation_head if modality == "image" else self.model.lm_head
        allowed = allowed.to(self.device) if allowed is not None else None
        tokens = torch.zeros((n, steps), dtype=torch.long, device=self.device)
        logps = torch.zeros((n, steps), dtype=torch.float32, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        lengths = torch.full((n,), steps, dtype=torch.long, device=self.device)
        for t in range(steps):
            logits = head(hidden).float()
            if cfg:
                logits = cfg_logits(logits[:n], logits[n:], sp.cfg_scale)
            tok, tlp = sample_tokens(sampling_logprobs(logits, sp, allowed), sp, gen)
            tokens[:, t], logps[:, t] = tok, tlp
            if stop_id is not None:
                newly = (~done) & (tok == stop_id)
                lengths = torch.where(newly, t + 1, lengths)
                done |= newly
                if bool(done.all()):
                    break
            if t == steps - 1:
                break
            feed = (torch.cat([tok, tok]) if cfg else tok).unsqueeze(1)
            if modality == "image":
                step_emb = self.model.prepare_embeddings_for_image_generation(feed)
            else:
                step_emb = self.model.get_input_embeddings()(feed)
            if fast:
                rotary = (cos[:, t:t + 1], sin[:, t:t + 1])
            hidden = self._decode_step(step_emb, full_mask[:, :width + t + 1], step_pos[:, t:t + 1], cache, rotary,
                                       padded)
        check_sampled(logps, "Janus sampling")
        tokens_l, logps_l, lens = tokens.cpu().tolist(), logps.cpu().tolist(), lengths.cpu().tolist()
        return [tokens_l[i][:lens[i]] for i in range(n)], [logps_l[i][:lens[i]] for i in range(n)]

    # ------------------------------------------------------------------ training forward
    def target_hidden(self, ids: list[list[int]], images: list[np.ndarray | None], targets: list[list[int]],
                      modalities: list[str]) -> list[torch.Tensor]:
        """Differentiable hidden states ``[T_i, D]`` predicting each target token.

        Row i is ``ids[i] + targets[i][:-1]``: image targets are fed through the generation embedding
        path, text targets through the text embeddings, exactly as during sampling.  Rows that repeat
        a context (Tree-RL siblings; the null CFG streams of one stage) run it once and share its KV
        cache (:meth:`_shared_context_hidden`); otherwise one right-padded forward over full rows.
        """
        # a context is its ids and its image; rows of one image reference hold the same array object
        keys = [(tuple(c), None if im is None else id(im)) for c, im in zip(ids, images)]
        row_of = shared_context_rows(keys, [len(c) for c in ids], [len(t) for t in targets],
                                     [len(c) + len(t) - 1 for c, t in zip(ids, targets)])
        if row_of is not None:
            return self._shared_context_hidden(ids, images, targets, modalities, row_of)
        seqs = [c + t[:-1] for c, t in zip(ids, targets)]
        gen_from = [len(c) if m == "image" else len(s) for c, s, m in zip(ids, seqs, modalities)]
        emb, mask, pos = self.embed(seqs, images, gen_from=gen_from, left=False)
        hidden = self._trunk(emb, mask, pos, use_cache=False).last_hidden_state
        return [hidden[i, len(c) - 1:len(c) - 1 + len(t)] for i, (c, t) in enumerate(zip(ids, targets))]

    def _shared_context_hidden(self, ids: list[list[int]], images: list[np.ndarray | None],
                               targets: list[list[int]], modalities: list[str],
                               row_of: list[int]) -> list[torch.Tensor]:
        """Each distinct context once (left-padded, cached), then every row's targets on its context's cache."""
        reps = first_rows(row_of)
        emb, mask, pos = self.embed([ids[i] for i in reps], [images[i] for i in reps], left=True)
        context_cache = ReplayCache(self.num_layers)  # replayable: safe under gradient checkpointing
        # use_cache=False: the cache is ours to fill (transformers would warn under gradient checkpointing)
        out = self._trunk(emb, mask, pos, context_cache, use_cache=False)
        rows = torch.tensor(row_of, dtype=torch.long, device=self.device)
        first = out.last_hidden_state[rows, -1:]  # the context's last position predicts target token 0
        t_max = max(len(t) for t in targets)
        if t_max == 1:
            return [first[i] for i in range(len(targets))]
        cache = context_cache.select(rows)  # each row gets its context's keys/values (a differentiable index)
        feeds = [t[:-1] for t in targets]
        gen_from = [0 if m == "image" else len(f) for f, m in zip(feeds, modalities)]
        feed_emb, feed_mask, _ = self.embed(feeds, [None] * len(feeds), gen_from=gen_from, left=False)
        positions = pos[rows, -1:] + 1 + torch.arange(t_max - 1, device=self.device)
        rest = self._trunk(feed_emb, torch.cat([mask[rows], feed_mask], dim=1), positions, cache,
                           use_cache=False).last_hidden_state
        hidden = torch.cat([first, rest], dim=1)
        return [hidden[i, :len(t)] for i, t in enumerate(targets)]

    @torch.no_grad()
    def decode_images(self, tokens: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      rescale: float) -> np.ndarray:
        """VQ tokens ``[B, N]`` -> uint8 ``[B, H, W, 3]``, as the image processor's ``postprocess``."""
        with gathered(self.model.model.vqmodel.quantize):  # it reads its codebook's weight (ZeRO-3: a shard)
            x = self.model.decode_image_tokens(tokens.to(self.device)).float()  # [B, H, W, 3], normalised
        m = torch.tensor(mean, device=x.device)
        s = torch.tensor(std, device=x.device)
        return ((x * s + m) / rescale).clamp(0, 255).to(torch.uint8).cpu().numpy()


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The caller's generator when it lives on ``device``; else one on ``device`` seeded from it."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
