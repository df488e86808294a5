"""The tiny token-unified policy: a small Llama whose vocabulary holds words and image cells.

It plays every R3 stage in one causal sequence model, like a real unified model, but small enough to
train on two CPU cores: images are Blocks-world grids with one token per cell (see
:mod:`r3_rl.blocks.codec`).  Sampling is our own loop with a KV cache; log-probs at sampling time
and in the training forward both come from :func:`r3_rl.policy.sampling.sampling_logprobs`, so they
agree exactly (up to float rounding) under the same weights.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from r3_rl.blocks import codec, world
from r3_rl.config import TinyModel
from r3_rl.errors import UserError
from r3_rl.policy.base import ImageInput, ImageSample, Policy, TextSample
from r3_rl.policy.kv_cache import PreallocatedCache, ReplayCache
from r3_rl.policy.sampling import cfg_logits, check_sampled, sample_tokens, sampling_logprobs
from r3_rl.policy.shared_context import first_rows, shared_context_rows
from r3_rl.policy.tiny_mot import MoTLlamaForCausalLM, has_modality_experts, modality_config
from r3_rl.policy.tiny_recipe import BUILD_TINY_HINT, GRID_FILE, TinyRecipe
from r3_rl.policy.tiny_tokenizer import PLACEHOLDER, build_tokenizer, image_token, template_words
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

IMAGE_INPUTS = get_args(TinyModel.model_fields["image_input"].annotation)  # the recipe's choices, one list
BACKGROUND_WORDS = "empty empty"  # two words like an object's, so a cell's place in the grid is its word offset / 2


def cell_words(grid: np.ndarray) -> str:
    """``image_input: words``: each cell as its colour and shape words (``red square``), background as
    ``empty empty``, in raster order.  The prompt's "red square" and the image's are then the same words: a
    unified model's understanding encoder sees colours without having to learn them from its own codes."""
    out = []
    for token in np.asarray(grid).reshape(-1):
        kind = world.object_of(int(token))
        out.append(BACKGROUND_WORDS if kind is None else f"{kind[1]} {kind[0]}")
    return " ".join(out)


# How the tiny model is asked a yes/no question about an image (its own convention, like Janus's chat
# template): the answer is the next word, "yes" or "no".
ANSWER_TEMPLATE = "<|im_start|> <image> {image} </image> {question} <|im_end|> <|im_start|>"


def question_words(question: str) -> str:
    """A question in the tiny vocabulary's form: lowercase words, punctuation dropped."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", question.lower()).split())


class TinyUnifiedPolicy(TinyRecipe, Policy):
    def __init__(self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, templates: dict[str, str],
                 rows: int, cols: int, image_input: str = "tokens") -> None:
        self._model = model
        self.tok = tokenizer
        self.templates = templates
        self.rows, self.cols = rows, cols
        if image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input {image_input!r} is not one of {IMAGE_INPUTS}")
        self.image_input = image_input  # policy.tiny.image_input: how an image enters a context (image_words)
        self.num_cells = rows * cols
        vocab = tokenizer.get_vocab()
        self.image_offset = vocab[image_token(0)]
        self.num_image_tokens = world.N_TOKENS
        size = len(vocab)
        self.image_mask = torch.zeros(size, dtype=torch.bool)
        self.image_mask[self.image_offset:self.image_offset + self.num_image_tokens] = True
        self.text_mask = ~self.image_mask
        for s in ("<pad>", "<unk>", "<bos>", "<|im_start|>", "<image>", "</image>"):
            self.text_mask[vocab[s]] = False
        self.stop_id = vocab["<|im_end|>"]
        self.pad_id = vocab["<pad>"]
        self.bos_id = vocab["<bos>"]
        self.version = 0

    # ------------------------------------------------------------------ construction / persistence
    def warm_start(self, recipe: Any, folder: Path, log: Any = None) -> None:
        """The supervised warm start on synthetic R3 trajectories (``warmstart.steps``), cached in ``folder``;
        a policy loaded from ``policy.model`` is already trained."""
        if recipe.warmstart.steps > 0 and not recipe.policy.model:
            from r3_rl.policy.warmstart import warmstart_cached

            dtype = self.model.dtype
            self.model.float()  # the supervised warm start trains in fp32, then the policy computes in policy.dtype
            warmstart_cached(self, recipe, folder, log)
            self.model.to(dtype)

    def critique_replay(self, recipe: Any) -> Any:
        """``learner.critic_replay``: the warm start's kind of critiques, on training prompts."""
        from r3_rl.policy.critique_replay import CritiqueReplay

        return CritiqueReplay(self, recipe)

    @classmethod
    def build(cls, templates: dict[str, str], rows: int, cols: int, hidden_size: int = 128, num_layers: int = 4,
              num_heads: int = 4, intermediate_size: int = 256, max_positions: int = 256,
              seed: int = 0, image_input: str = "tokens", experts: str = "shared") -> "TinyUnifiedPolicy":
        """A fresh random model with a tokenizer built from the Blocks words and the templates' words;
        ``experts="modality"``: image and text tokens get their own weights (:mod:`r3_rl.policy.tiny_mot`)."""
        words = set(world.WORDS) | template_words(templates.values())
        tok = build_tokenizer(words, world.N_TOKENS)
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden_size,
                             intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, num_key_value_heads=num_heads,
                             max_position_embeddings=max_positions, tie_word_embeddings=True,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
        if experts == "modality":
            modality_config(config, tok.get_vocab()[image_token(0)], world.N_TOKENS)
        model = (MoTLlamaForCausalLM if experts == "modality" else LlamaForCausalLM)(config)
        model.config._attn_implementation = "sdpa"
        return cls(model, tok, templates, rows, cols, image_input)

    @classmethod
    def from_pretrained(cls, path: str, templates: dict[str, str]) -> "TinyUnifiedPolicy":
        p = Path(path)
        if not (p / "config.json").is_file():
            raise UserError(f"policy.model: cannot load '{path}': no config.json there; give a directory written "
                            f"by save_pretrained{BUILD_TINY_HINT}")
        model = (MoTLlamaForCausalLM if has_modality_experts(LlamaConfig.from_pretrained(path))
                 else LlamaForCausalLM).from_pretrained(path)
        tok = PreTrainedTokenizerFast.from_pretrained(path)
        grid = json.loads((p / GRID_FILE).read_text()) if (p / GRID_FILE).is_file() else {"rows": 4, "cols": 4}
        try:  # folders saved before image_input read tokens
            policy = cls(model, tok, templates, grid["rows"], grid["cols"], grid.get("image_input", "tokens"))
        except ValueError as e:  # someone else's grid file: name it
            raise UserError(f"policy.model: {p / GRID_FILE}: {e}") from None
        policy.version = grid.get("version", 0)
        return policy

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self._model.save_pretrained(path)
        self.tok.save_pretrained(path)
        (Path(path) / GRID_FILE).write_text(json.dumps({"rows": self.rows, "cols": self.cols,
                                                        "version": self.version, "image_input": self.image_input}))

    def with_model(self, model: torch.nn.Module) -> "TinyUnifiedPolicy":
        """The same tokenizer and templates on ``model`` (the reference copy, a merged LoRA export)."""
        other = copy.copy(self)
        other._model = model
        return other

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        return self.tok.convert_tokens_to_ids(text.split())

    def decode(self, ids: list[int]) -> str:
        return " ".join(t for t in self.tok.convert_ids_to_tokens(ids) if t not in ("<pad>", "<|im_end|>"))

    def image_words(self, image: ImageInput) -> str:
        """An image as the critic, the refiner and the yes/no answers read it (``image_input``): its generation
        tokens, one per cell, or :func:`cell_words`."""
        grid = (np.asarray(image.image_tokens).reshape(self.rows, self.cols) if image.image_tokens is not None
                else codec.decode(image.image))
        if self.image_input == "words":
            return cell_words(grid)
        return " ".join(image_token(int(k)) for k in grid.reshape(-1))

    def render(self, stage: str, **values: str) -> list[int]:
        def sub(m: Any) -> str:
            return values.get(m.group(1), "")
        text = PLACEHOLDER.sub(sub, self.templates[stage])
        return [self.bos_id] + self.encode(text)

    # ------------------------------------------------------------------ sampling core
    def _left_padded(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ids`` left-padded to one width: (input ids, attention mask, position ids), all ``[B, W]``."""
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _forward_last(self, ids: list[list[int]], steps: int) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Prefill of left-padded ``ids`` -> (last logits, a KV cache with room for ``steps`` more tokens,
        an attention mask ``[B, width + steps]`` to be sliced, last position ids)."""
        input_ids, mask, pos = self._left_padded(ids)
        cache = PreallocatedCache(self._model.config.num_hidden_layers, input_ids.shape[1] + steps)
        out = self._model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        full_mask = torch.cat([mask, torch.ones((mask.shape[0], steps), dtype=mask.dtype)], dim=1)
        return out.logits[:, -1].float(), cache, full_mask, pos[:, -1]

    @torch.no_grad()
    def _sample(self, contexts: list[list[int]], modality: str, sp: SamplingParams,
                generator: torch.Generator | None, uncond: list[list[int]] | None = None) -> list[Segment]:
        self._model.eval()
        n = len(contexts)
        use_cfg = modality == "image" and sp.cfg_scale != 1.0
        streams = contexts + (uncond or []) if use_cfg else contexts
        allowed = self.image_mask if modality == "image" else self.text_mask
        steps = self.num_cells if modality == "image" else sp.max_new_tokens
        logits, cache, full_mask, last_pos = self._forward_last(streams, steps)
        width = full_mask.shape[1] - steps
        tokens = torch.full((n, steps), self.pad_id, dtype=torch.long)
        logps = torch.zeros((n, steps))
        done = torch.zeros(n, dtype=torch.bool)
        lengths = torch.full((n,), steps, dtype=torch.long)
        for t in range(steps):
            step_logits = cfg_logits(logits[:n], logits[n:], sp.cfg_scale) if use_cfg else logits
            lp = sampling_logprobs(step_logits, sp, allowed)
            tok, tlp = sample_tokens(lp, sp, generator)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            tokens[:, t], logps[:, t] = tok, tlp
            if modality == "text":
                newly = (~done) & (tok == self.stop_id)
                lengths[newly] = t + 1
                done |= newly
                if bool(done.all()):
                    break
            if t == steps - 1:
                break
            feed = torch.cat([tok, tok]) if use_cfg else tok
            last_pos = last_pos + 1
            out = self._model(input_ids=feed.unsqueeze(1), attention_mask=full_mask[:, :width + t + 1],
                              position_ids=last_pos.unsqueeze(1), cache=cache, use_cache=True)
            logits = out.logits[:, -1].float()
        check_sampled(logps, "tiny policy sampling")
        segs = []
        for i in range(n):
            k = int(lengths[i])
            ctx: dict[str, Any] = {"input_ids": contexts[i]}
            if use_cfg:
                ctx["uncond_ids"] = uncond[i]  # type: ignore[index]
            segs.append(Segment(modality=modality, context=ctx, token_ids=tokens[i, :k].tolist(),
                                logprobs=logps[i, :k].tolist(), sampling=copy.copy(sp)))
        return segs

    def _image_samples(self, segs: list[Segment]) -> list[ImageSample]:
        out = []
        for seg in segs:
            cells = [t - self.image_offset for t in seg.token_ids]
            out.append(ImageSample(image_tokens=cells, image=self.decode_image_tokens(cells), segment=seg))
        return out

    def decode_image_tokens(self, tokens: list[int]) -> np.ndarray:
        """Pixels of a grid from its cell tokens (what ``ImageSample.image_tokens`` holds)."""
        return codec.encode(np.asarray(tokens, dtype=np.int64).reshape(self.rows, self.cols))

    # ------------------------------------------------------------------ R3 stages
    def reason(self, prompts: list[PromptItem], sampling: SamplingParams,
               generator: torch.Generator | None = None) -> list[TextSample]:
        segs = self._sample([self.render("reason", prompt=p.prompt) for p in prompts], "text", sampling, generator)
        return [TextSample(text=self.decode(s.token_ids), segment=s) for s in segs]

    def generate_contexts(self, prompts: list[PromptItem], plans: list[str | None]) -> tuple[list[list[int]],
                                                                                              list[list[int]]]:
        """(conditional, unconditional) context ids of first images: prompt (+ plan) + image marker, and the
        prompt-free context CFG contrasts them with."""
        ctx = []
        for p, plan in zip(prompts, plans):
            ids = self.render("reason", prompt=p.prompt)
            if plan is not None:
                ids += self.encode(plan) + [self.stop_id]
            ctx.append(ids + self.encode(self.templates["generate"]))
        return ctx, [[self.bos_id] + self.encode(self.templates["generate_uncond"]) for _ in prompts]

    def generate(self, prompts: list[PromptItem], plans: list[str | None], sampling: SamplingParams,
                 generator: torch.Generator | None = None) -> list[ImageSample]:
        ctx, uncond = self.generate_contexts(prompts, plans)
        return self._image_samples(self._sample(ctx, "image", sampling, generator, uncond))

    def reflect(self, prompts: list[PromptItem], images: list[ImageInput], sampling: SamplingParams,
                generator: torch.Generator | None = None) -> list[TextSample]:
        ctx = [self.render("reflect", prompt=p.prompt, image=self.image_words(im)) for p, im in zip(prompts, images)]
        segs = self._sample(ctx, "text", sampling, generator)
        return [TextSample(text=self.decode(s.token_ids), segment=s) for s in segs]

    def refine(self, prompts: list[PromptItem], images: list[ImageInput], instructions: list[str],
               sampling: SamplingParams, generator: torch.Generator | None = None) -> list[ImageSample]:
        ctx = [self.render("refine", prompt=p.prompt, image=self.image_words(im), instruction=ins)
               for p, im, ins in zip(prompts, images, instructions)]
        uncond = [self.render("refine", prompt="", image=self.image_words(im), instruction="") for im in images]
        return self._image_samples(self._sample(ctx, "image", sampling, generator, uncond))

    # ------------------------------------------------------------------ understanding
    def answer_context(self, image: ImageInput, question: str) -> list[int]:
        text = ANSWER_TEMPLATE.replace("{image}", self.image_words(image)).replace("{question}",
                                                                                question_words(question))
        return [self.bos_id] + self.encode(text)

    @torch.no_grad()
    def answer_yes_no(self, images: list[ImageInput], questions: list[str]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the next word after the question (no sampling)."""
        vocab = self.tok.get_vocab()
        if "yes" not in vocab or "no" not in vocab:
            raise NotImplementedError("this tiny model's vocabulary has no 'yes'/'no' (built before questions)")
        self._model.eval()
        logits = self._forward_last([self.answer_context(im, q) for im, q in zip(images, questions)], 0)[0]
        pair = logits[:, [vocab["yes"], vocab["no"]]].log_softmax(-1)
        return pair[:, 0].exp().tolist()

    # ------------------------------------------------------------------ training forward
    def _token_logits(self, contexts: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """Logits ``[B, T, V]`` predicting each target token (rows past a target's length are padding).

        Tree-RL siblings share their context (the same prompt, the same parent image), so when contexts
        repeat each distinct one is run once and its KV cache serves all its rows' targets: the same
        maths as one forward over every ``context + target`` row, with fewer tokens through the model
        (gradients flow back through the cache).  Without repeated contexts, or when sharing would not
        save tokens, one right-padded forward over the full rows.
        """
        row_of = shared_context_rows([tuple(c) for c in contexts], [len(c) for c in contexts],
                                     [len(t) for t in targets], [len(c) + len(t) for c, t in zip(contexts, targets)])
        if row_of is None:
            return self._full_row_logits(contexts, targets)
        return self._shared_context_logits([contexts[i] for i in first_rows(row_of)], row_of, targets)

    def _shared_context_logits(self, prefixes: list[list[int]], row_of: list[int],
                               targets: list[list[int]]) -> torch.Tensor:
        input_ids, mask, pos = self._left_padded(prefixes)
        context_cache = ReplayCache(self._model.config.num_hidden_layers)  # replayable under checkpointing
        out = self._model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=context_cache,
                          use_cache=False, logits_to_keep=1)  # the cache is ours to fill, checkpointing or not
        rows = torch.tensor(row_of, dtype=torch.long)
        first = out.logits[rows].float()  # [B, 1, V]: the context's last position predicts target token 0
        t_max = max(len(t) for t in targets)
        if t_max == 1:
            return first
        cache = context_cache.select(rows)  # each row gets its context's keys/values (a differentiable index)
        feed = torch.full((len(targets), t_max - 1), self.pad_id, dtype=torch.long)
        for i, t in enumerate(targets):
            feed[i, :len(t) - 1] = torch.tensor(t[:-1], dtype=torch.long)
        mask = torch.cat([mask[rows], torch.ones_like(feed)], dim=1)
        positions = pos[rows, -1:] + 1 + torch.arange(t_max - 1)
        rest = self._model(input_ids=feed, attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=False).logits.float()
        return torch.cat([first, rest], dim=1)

    def _full_row_logits(self, contexts: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        seqs = [c + t for c, t in zip(contexts, targets)]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: positions start at 0 without position ids
            input_ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        hidden = self._model.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        t_max = max(len(t) for t in targets)
        idx = torch.zeros((len(seqs), t_max), dtype=torch.long)
        for i, (c, t) in enumerate(zip(contexts, targets)):
            idx[i, :len(t)] = torch.arange(len(c) - 1, len(c) - 1 + len(t))
            idx[i, len(t):] = len(c) - 1
        # the head only on the positions that predict a target (contexts are most of a row in R3)
        picked = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self._model.get_output_embeddings()(picked).float()

    def value_features(self, segments: list[Segment]) -> torch.Tensor:
        input_ids, mask, pos = self._left_padded([s.context["input_ids"] for s in segments])
        out = self._model.get_decoder()(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.last_hidden_state[:, -1]

    @property
    def feature_size(self) -> int:
        return int(self._model.config.hidden_size)

    def segment_logprobs(self, segments: list[Segment]) -> list[torch.Tensor]:
        targets = [s.token_ids for s in segments]
        logits = self._token_logits([s.context["input_ids"] for s in segments], targets)
        cfg_rows = [i for i, s in enumerate(segments) if "uncond_ids" in s.context]
        if cfg_rows:
            unc = self._token_logits([segments[i].context["uncond_ids"] for i in cfg_rows],
                                     [targets[i] for i in cfg_rows])
            logits = logits.clone()
            for j, i in enumerate(cfg_rows):
                logits[i] = cfg_logits(logits[i], unc[j], segments[i].sampling.cfg_scale)
        # one sampling_logprobs call per (modality, distribution) group, not per segment: the same
        # row-wise maths, far fewer small autograd ops (the learner's hot path)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, s in enumerate(segments):
            groups.setdefault((s.modality, s.sampling.temperature, s.sampling.top_k, s.sampling.top_p), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(segments)
        for (modality, *_), rows in groups.items():
            width = max(len(targets[i]) for i in rows)
            keep = torch.zeros((len(rows), width), dtype=torch.long)  # padding keeps token 0; sliced off below
            for j, i in enumerate(rows):
                keep[j, :len(targets[i])] = torch.tensor(targets[i], dtype=torch.long)
            allowed = self.image_mask if modality == "image" else self.text_mask
            idx = torch.tensor(rows, dtype=torch.long)
            lp = sampling_logprobs(logits[idx, :width], segments[rows[0]].sampling, allowed, keep=keep)
            picked = lp.gather(-1, keep.unsqueeze(-1)).squeeze(-1)
            for j, i in enumerate(rows):
                out[i] = picked[j, :len(targets[i])]
        return out  # type: ignore[return-value]
