"""BAGEL-7B-MoT as an R3 policy (``policy.kind: bagel``): the four stages with R3's prompt formats, and the
learner's recomputation of every sampled action's log-prob.

* reason -- text after ``[system] [prompt]`` (:mod:`.text_actions`);
* generate -- flow matching after ``[system] [prompt] [plan]``, text-CFG against ``[system]``
  (:mod:`.image_actions`, through :mod:`r3_rl.flow`'s sampler);
* reflect -- understanding: text after ``[reflect_system] [ViT(image)] [reflection question]``;
* refine -- editing: flow matching after ``[VAE(image)] [ViT(image)] [instruction]``, text-CFG against the image
  alone and image-CFG against the instruction alone; SDE steps only among the first ``edit_sde_max_index`` steps.

A text segment's actions are its tokens; an image segment's are its recorded SDE steps (``Segment.action`` is the
:class:`~r3_rl.flow.DenoisingTrace`).  ``segment_logprobs`` returns one log-prob per action, under exactly the
sampling distribution; with ``options.expert_isolation`` (the default) a text action's log-prob trains only the
understanding expert and an image action's only the generation expert.  The ViT (unless ``train_vit``) and the VAE
are frozen; the VAE is not part of :attr:`model`, so the learner neither optimises nor checkpoints it.
"""
from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from r3_rl.errors import UserError
from r3_rl.flow.action import StepScores, flow_action, is_flow_segment, segment_trace
from r3_rl.policy.bagel.checkpoint import VAE_FILE, LoadedBagel, bagel_skeleton, load_bagel, save_bagel, weight_files
from r3_rl.policy.bagel.contexts import ContextBuilder, image_digest, stored_per_row, text_record
from r3_rl.policy.bagel.image_actions import denoising_scores, flow_settings, sample_images
from r3_rl.policy.bagel.images import latent_grid
from r3_rl.policy.bagel.layout import TextBlock
from r3_rl.policy.bagel.model import text_ids
from r3_rl.policy.bagel.mot import GEN_SUFFIX
from r3_rl.policy.bagel.recipe import BagelOptions, BagelRecipe, StageTemplates, bagel_options, check_model_dir
from r3_rl.policy.bagel.text_actions import closed_block, sample_text, text_logprobs, text_vocabulary
from r3_rl.policy.bagel.vae import flux_vae_skeleton
from r3_rl.policy.base import DTYPES, ImageInput, ImageSample, Policy, TextSample
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

STATE_FILE = "r3_policy.json"
PLAN_MEMORY = 4096  # recently sampled texts whose ids are remembered
YES, NO = ("Yes", " Yes", "yes", " yes"), ("No", " No", "no", " no")


class BagelPolicy(BagelRecipe, Policy):
    def __init__(self, loaded: LoadedBagel, templates: dict[str, str], options: BagelOptions | None = None) -> None:
        self.options = options or BagelOptions()
        self._model, self.vae, self.tokenizer = loaded.model, loaded.vae, loaded.tokenizer
        self.tokens = loaded.config.tokens
        self.templates = StageTemplates.from_templates(templates)
        self.version = 0
        self.vae.requires_grad_(False)
        self._model.requires_grad_(True)
        if not self.options.train_vit:
            self._model.vit_model.requires_grad_(False)
        self.allowed = text_vocabulary(self._model, self.tokenizer)
        self.builder = ContextBuilder(self._model, self.vae, self.options.vit_size, self.options.vae_size)
        self.grid = latent_grid(self.options.image_size, self.options.image_size, self._model)
        # plan text -> its sampled ids: generate receives plans as text, and re-encoding decoded text need not give
        # back the ids the plan was sampled as (generation must be conditioned on the sampled block itself)
        self._plan_ids: OrderedDict[str, list[int]] = OrderedDict()

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_pretrained(cls, model: str, *, templates: dict[str, str], dtype: str = "bfloat16", device: str = "cpu",
                        options: BagelOptions | None = None) -> "BagelPolicy":
        """Load a checkpoint directory in the published layout (``policy.model``) in ``dtype`` on ``device``."""
        if dtype not in DTYPES:
            raise UserError(f"policy.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"policy.device: {device!r} but no CUDA device is available here (use cpu)")
        options = options or BagelOptions()
        path = check_model_dir(model)
        loaded = load_bagel(path, dtype=DTYPES[dtype], device=device, vae_dtype=DTYPES[options.vae_dtype])
        side = loaded.config.max_latent_size * loaded.config.latent_downsample
        if options.image_size > side:
            raise UserError(f"policy.options.image_size: {options.image_size} px exceeds what {model} can generate "
                            f"({side} px: a {loaded.config.max_latent_size}-token latent position table)")
        policy = cls(loaded, templates, options)
        state = path / STATE_FILE
        if state.is_file():
            policy.version = int(json.loads(state.read_text()).get("version", 0))
        return policy

    @classmethod
    def skeleton(cls, recipe: Any) -> "BagelPolicy":
        """``policy.model``'s architecture on the meta device, from its configs and safetensors headers."""
        path = check_model_dir(recipe.policy.model)
        model, tokenizer, config, _ = bagel_skeleton(path)
        loaded = LoadedBagel(model, flux_vae_skeleton(path / VAE_FILE, config.vae), tokenizer, config)
        return cls(loaded, recipe.templates.model_dump(), bagel_options(recipe.policy.options))

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def with_model(self, model: torch.nn.Module) -> "BagelPolicy":
        """This policy on ``model`` (same architecture); the frozen VAE is shared (it is not in :attr:`model`)."""
        other = copy.copy(self)
        other._model = model
        other.builder = ContextBuilder(model, self.vae, self.options.vit_size, self.options.vae_size)
        return other

    def save_pretrained(self, path: str) -> None:
        """The published layout again (loadable by ``policy.kind: bagel`` and by BAGEL's own code)."""
        save_bagel(path, self._model, self.vae, self.tokenizer)
        (Path(path) / STATE_FILE).write_text(json.dumps({"version": self.version}))

    def exported_weight_files(self, folder: Path) -> list[Path]:
        """The weight set only: ``ae.safetensors`` beside it is the frozen VAE, not part of ``self.model``."""
        return sorted(set(weight_files(Path(folder)).values()))

    def lora_scope(self, train_vision: bool = False) -> list[str]:
        return ["language_model"] + (["vit_model", "connector"] if train_vision else [])

    def lora_target_names(self, wanted: list[str]) -> list[str]:
        """Each attention projection named for both experts: ``q_proj`` is the understanding expert's and
        ``q_proj_moe_gen`` the generation expert's (their MLPs share names already: ``mlp.gate_proj``,
        ``mlp_moe_gen.gate_proj``).  With ``expert_isolation`` an image action trains the generation expert
        only and a text action the understanding expert only, so adapters on one expert alone leave the other
        stage's micro-batches nothing to train (the default q/k/v/o had no generation-expert adapter: every
        image-only micro-batch failed its backward)."""
        out = list(wanted)
        for name in wanted:
            twin = name[: -len(GEN_SUFFIX)] if name.endswith(GEN_SUFFIX) else name + GEN_SUFFIX
            if twin not in out:
                out.append(twin)
        return out

    # ------------------------------------------------------------------ helpers
    def _text(self, text: str) -> dict[str, Any]:
        return text_record(self.tokenizer, text, self.tokens)

    def _system(self) -> list[dict[str, Any]]:
        return [self._text(self.templates.system)] if self.templates.system else []

    def _decode(self, ids: list[int]) -> str:
        ids = ids[:-1] if ids and ids[-1] == self.tokens.im_end else ids
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _sample_text(self, contexts: list[dict[str, Any]], sp: SamplingParams,
                     generator: torch.Generator | None) -> list[TextSample]:
        rows = [self.builder.blocks(c["blocks"], c.get("images", {})) for c in contexts]
        ids, logps = sample_text(self._model, self.builder.encode(rows), sp, self.allowed, generator)
        out = [TextSample(self._decode(i), Segment("text", c, i, lp, copy.copy(sp)))
               for c, i, lp in zip(contexts, ids, logps)]
        for sample in out:
            self._plan_ids[sample.text] = sample.segment.token_ids
            self._plan_ids.move_to_end(sample.text)
        while len(self._plan_ids) > PLAN_MEMORY:
            self._plan_ids.popitem(last=False)
        return out

    def _sample_images(self, stage: str, contexts: list[dict[str, Any]], keys: list[Any], sp: SamplingParams,
                       generator: torch.Generator | None) -> list[ImageSample]:
        stochastic = not (sp.greedy or sp.temperature == 0)
        settings = flow_settings(self.options, stage, sp.cfg_scale, stochastic)
        out: list[ImageSample] = [None] * len(contexts)  # type: ignore[list-item]
        by_grid: dict[tuple, list[int]] = {}
        for i, c in enumerate(contexts):
            by_grid.setdefault(tuple(c["grid"]), []).append(i)
        for grid, idx in by_grid.items():
            images, traces = sample_images(self._model, self.vae, self.builder, [contexts[i] for i in idx], grid,
                                           settings, [keys[i] for i in idx], self.options.share_initial_noise,
                                           stochastic, generator)
            for k, i in enumerate(idx):
                tr = traces[k]
                seg = Segment("image", contexts[i], [], [s.logprob for s in tr.steps], copy.copy(sp),
                              action=flow_action(tr))
                out[i] = ImageSample(image=images[k], segment=seg)
        return out

    # ------------------------------------------------------------------ the four stages
    def reason(self, prompts: list[PromptItem], sampling: SamplingParams,
               generator: torch.Generator | None = None) -> list[TextSample]:
        contexts = [{"stage": "reason", "blocks": self._system() + [self._text(self.templates.reason.format(
            prompt=p.prompt))]} for p in prompts]
        return self._sample_text(contexts, sampling, generator)

    def generate(self, prompts: list[PromptItem], plans: list[str | None], sampling: SamplingParams,
                 generator: torch.Generator | None = None) -> list[ImageSample]:
        contexts = []
        for p, plan in zip(prompts, plans):
            cond = self._system() + [self._text(self.templates.reason.format(prompt=p.prompt))]
            if plan is not None:
                ids = self._plan_ids.get(plan)
                ids = ids if ids is not None else text_ids(self.tokenizer, plan)
                cond.append({"text": closed_block(ids, self.tokens)})
            contexts.append({"stage": "generate", "cond": cond, "text_uncond": self._system(),
                             "grid": list(self.grid)})
        return self._sample_images("generate", contexts, [p.id for p in prompts], sampling, generator)

    def reflect(self, prompts: list[PromptItem], images: list[ImageInput], sampling: SamplingParams,
                generator: torch.Generator | None = None) -> list[TextSample]:
        system = [self._text(self.options.reflect_system)] if self.options.reflect_system else []
        stored = stored_per_row([img.image for img in images])
        contexts = [{"stage": "reflect", "images": inputs,
                     "blocks": system + [{"vit": 0}, self._text(self.templates.reflect.format(prompt=p.prompt))]}
                    for p, inputs in zip(prompts, stored)]
        return self._sample_text(contexts, sampling, generator)

    def refine(self, prompts: list[PromptItem], images: list[ImageInput], instructions: list[str],
               sampling: SamplingParams, generator: torch.Generator | None = None) -> list[ImageSample]:
        contexts = []
        for img, instruction, inputs in zip(images, instructions, stored_per_row([img.image for img in images])):
            vae = self.builder.vae_block(img.image)
            text = self._text(self.templates.refine.format(instruction=instruction))
            contexts.append({"stage": "refine", "images": inputs,
                             "cond": [{"vae": 0}, {"vit": 0}, text], "text_uncond": [{"vae": 0}, {"vit": 0}],
                             "image_uncond": [text], "grid": list(vae.grid)})
        keys = [(p.id, image_digest(img.image)) for p, img in zip(prompts, images)]
        return self._sample_images("refine", contexts, keys, sampling, generator)

    # ------------------------------------------------------------------ learning
    def denoising_scores(self, segments: list[Segment]) -> list[StepScores]:
        """Per image segment: differentiable log-probs and Gaussian means of its recorded SDE steps (the learner's
        flow loss and closed-form KL read them)."""
        traces = [segment_trace(s) for s in segments]
        return denoising_scores(self._model, self.builder, [s.context for s in segments], traces,
                                isolate=self.options.expert_isolation)

    def segment_logprobs(self, segments: list[Segment]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [None] * len(segments)  # type: ignore[list-item]
        text = [i for i, s in enumerate(segments) if not is_flow_segment(s)]
        image = [i for i, s in enumerate(segments) if is_flow_segment(s)]
        if text:
            contexts = [self.builder.blocks(segments[i].context["blocks"], segments[i].context.get("images", {}))
                        for i in text]
            lps = text_logprobs(self._model, contexts, [segments[i].token_ids for i in text],
                                [segments[i].sampling for i in text], self.allowed,
                                isolate=self.options.expert_isolation)
            for i, lp in zip(text, lps):
                out[i] = lp
        if image:
            for i, scores in zip(image, self.denoising_scores([segments[i] for i in image])):
                out[i] = scores.logp.float()
        return out

    # ------------------------------------------------------------------ understanding (self-consistency reward)
    @torch.no_grad()
    def answer_yes_no(self, images: list[ImageInput], questions: list[str]) -> list[float]:
        """P("yes") / (P("yes") + P("no")) of the first answer token after ``[ViT(image)] [question]``."""
        yes = self._first_ids(YES)
        no = self._first_ids(NO)
        rows = [self.builder.blocks([{"vit": 0}, self._text(q)], {"0": img.image}) for img, q in zip(images, questions)]
        logits, _ = self._model.next_token_logits(self.builder.encode(rows),
                                                  [[TextBlock([self.tokens.im_start])] for _ in rows])
        probs = torch.softmax(logits.float(), -1)
        p_yes, p_no = probs[:, yes].sum(-1), probs[:, no].sum(-1)
        return (p_yes / (p_yes + p_no).clamp_min(1e-12)).tolist()

    def _first_ids(self, words: tuple[str, ...]) -> list[int]:
        return sorted({self.tokenizer.encode(w, add_special_tokens=False)[0] for w in words})
