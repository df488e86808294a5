"""The tiny flow policy (``policy.kind: tiny_flow``): the tiny policy's text path, images drawn by flow matching.

A CPU-sized stand-in for BAGEL-class models.  Plans and critiques are the tiny Llama's tokens
(:class:`~r3_rl.policy.tiny.TinyUnifiedPolicy`); an image is a continuous latent, one ``latent_dim`` vector per
Blocks grid cell, denoised from noise by :class:`VelocityHead` -- a small MLP conditioned on the sequence (the
Llama's last hidden state over the context, and for edits its hidden states at the input image's cells) -- and
decoded to the grid by the nearest entry of a fixed latent palette (one code per cell token).  The policy
reflects on its own decoded image (the critique reads the grid back from the pixels) and refines it the same way.

Sampling and training share the flow library (:mod:`r3_rl.flow`): ``sample_flow`` records the SDE steps, the
learner rescores them with ``score_traces`` under the same guidance, so the ratio is 1 before the first update,
CFG included.  Siblings share their initial noise and SDE step indices (R3); ``temperature: 0`` (or ``greedy``)
samples the plain ODE (eval).  The warm start is the token policy's synthetic trajectories, image targets trained
by flow matching (``v = eps - x0`` at ``x_t = (1 - t) x0 + t eps``) instead of cross-entropy.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r3_rl.blocks import codec, world
from r3_rl.errors import UserError
from r3_rl.flow import EtaSchedule, FlowVelocity, Guidance, StochasticSteps, derive_seed, initial_noise, sample_flow
from r3_rl.flow import timestep_grid
from r3_rl.flow.schedule import check_sde_steps
from r3_rl.flow.action import flow_action, is_flow_segment, score_traces, segment_trace
from r3_rl.policy.base import ImageInput, ImageSample
from r3_rl.policy.tiny import TinyUnifiedPolicy
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

FLOW_FILE, HEAD_FILE = "r3_flow.json", "flow_head.safetensors"
T_FEATURES = 16


class VelocityHead(nn.Module):
    """``v(x_t, t | context)`` per cell: an MLP on the cell's latent, the whole latent, the context's last hidden
    state, the hidden state at the same cell of an input image (zeros without one), a cell embedding and ``t``."""

    def __init__(self, hidden: int, cells: int, latent_dim: int, width: int) -> None:
        super().__init__()
        self.cell = nn.Embedding(cells, 16)
        self.net = nn.Sequential(nn.Linear(latent_dim * (1 + cells) + 2 * hidden + 16 + T_FEATURES, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, latent_dim))
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(T_FEATURES // 2, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, h_last: torch.Tensor, h_cells: torch.Tensor) -> torch.Tensor:
        n, c, _ = x.shape
        dtype = self.net[0].weight.dtype
        x = x.to(dtype)
        tf = t.to(dtype)[:, None] * self.freqs.to(dtype)
        per_row = torch.cat([x.reshape(n, -1), h_last.to(dtype), tf.sin(), tf.cos()], dim=-1)
        inp = torch.cat([x, per_row[:, None].expand(n, c, per_row.shape[-1]), h_cells.to(dtype),
                         # called, not read: ZeRO-3 gathers a module's weight when it is called (a read of
                         # .weight saw a 0-wide shard); the lookup of every row is the weight itself
                         self.cell(torch.arange(c, device=x.device))[None].expand(n, c, -1).to(dtype)], dim=-1)
        return self.net(inp)


def palette_codes(tokens: int, dim: int, seed: int = 0, tries: int = 64) -> torch.Tensor:
    """``[tokens, dim]`` fixed latent codes of the cell tokens: unit-variance entries, the random set (of
    ``tries``) with the largest minimum distance between codes, so nearest-code decoding tolerates noise."""
    best, best_gap = None, -1.0
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        codes = torch.randn(tokens, dim, generator=gen)
        codes = codes / codes.norm(dim=1, keepdim=True) * math.sqrt(dim)
        gap = float(torch.cdist(codes, codes).add(torch.eye(tokens) * 1e9).min())
        if gap > best_gap:
            best, best_gap = codes, gap
    return best  # type: ignore[return-value]


class TinyFlowPolicy(TinyUnifiedPolicy):
    """See the module docstring.  ``flow`` holds the policy options (``policy.options``)."""

    def __init__(self, model: Any, tokenizer: Any, templates: dict[str, str], rows: int, cols: int,
                 flow: dict[str, Any]) -> None:
        super().__init__(model, tokenizer, templates, rows, cols)
        self.flow = dict(flow)
        f = self.flow
        if not hasattr(model, "flow_head"):
            torch.manual_seed(f["seed"])
            model.add_module("flow_head", VelocityHead(model.config.hidden_size, self.num_cells, f["latent_dim"],
                                                       f["head_width"]).to(model.dtype))
        self.codes = palette_codes(world.N_TOKENS, f["latent_dim"])
        self.latent_shape = (self.num_cells, f["latent_dim"])
        self.grid = timestep_grid(f["grid_points"], f["shift"])
        self.eta = EtaSchedule("r3", f["eta"])
        self.steps = {"generate": StochasticSteps.from_dict(f["sde_generate"]),
                      "refine": StochasticSteps.from_dict(f["sde_refine"])}
        interval = tuple(f["cfg_interval"])
        self.guidance = {"generate": Guidance(f["cfg_text"], 1.0, interval=interval),
                         "refine": Guidance(f["cfg_text"], f["cfg_image"], interval=interval)}

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_recipe(cls, recipe: Any, latent_dim: int = 8, head_width: int = 256, grid_points: int = 10,
                    shift: float = 3.0, eta: float = 0.7, sde_generate: dict[str, Any] | None = None,
                    sde_refine: dict[str, Any] | None = None, cfg_text: float = 1.0, cfg_image: float = 1.0,
                    cfg_interval: Sequence[float] = (0.0, 1.0), share_initial_noise: bool = True) -> "TinyFlowPolicy":
        """``policy.options``: latent size per cell, head width, denoising grid (points, shift), R3's eta scale,
        which steps are stochastic (``StochasticSteps`` fields; default one random step, edits among the first
        two), CFG scales and interval, and whether siblings share their initial noise."""
        flow = dict(latent_dim=latent_dim, head_width=head_width, grid_points=grid_points, shift=shift, eta=eta,
                    sde_generate=sde_generate or {"mode": "random", "count": 1},
                    sde_refine=sde_refine or {"mode": "random", "count": 1, "max_index": 2}, cfg_text=cfg_text,
                    cfg_image=cfg_image, cfg_interval=list(cfg_interval), share_initial_noise=share_initial_noise,
                    seed=recipe.seed)
        try:  # one-line errors for bad options before any model is built
            grid = timestep_grid(grid_points, shift)
            for key in ("sde_generate", "sde_refine"):
                steps = StochasticSteps.from_dict(flow[key])
                try:
                    check_sde_steps(grid, EtaSchedule("r3", eta), steps, shift)
                except ValueError as e:
                    raise ValueError(f"eta {eta} with grid_points {grid_points} ({key}): {e}") from None
            Guidance(cfg_text, cfg_image, interval=tuple(cfg_interval))
            if latent_dim < 1 or head_width < 1:
                raise ValueError(f"latent_dim and head_width must be >= 1, got {latent_dim}, {head_width}")
        except (ValueError, TypeError) as e:
            raise UserError(f"policy.options (tiny_flow): {e}") from None
        if recipe.policy.model:  # the saved policy's settings, with the recipe's explicit options on top
            return cls.from_pretrained(recipe.policy.model, recipe.templates.model_dump(),
                                       {k: flow[k] for k in recipe.policy.options})
        base = TinyUnifiedPolicy.from_recipe(recipe)
        return cls(base.model, base.tok, base.templates, base.rows, base.cols, flow)

    @classmethod
    def from_pretrained(cls, path: str, templates: dict[str, str],
                        options: dict[str, Any] | None = None) -> "TinyFlowPolicy":
        """A ``save_pretrained`` folder; ``options`` change its sampling settings (not the head's shape)."""
        base = TinyUnifiedPolicy.from_pretrained(path, templates)
        flow = json.loads((Path(path) / FLOW_FILE).read_text())
        for key in ("latent_dim", "head_width"):
            if key in (options or {}) and options[key] != flow[key]:  # type: ignore[index]
                raise UserError(f"policy.options.{key}: {options[key]} differs from the saved policy's "  # type: ignore[index]
                                f"{flow[key]} ({path}); leave it out to use the saved one")
        flow.update(options or {})
        try:  # the recipe's options were checked against the defaults; check them with the saved settings too
            grid = timestep_grid(flow["grid_points"], flow["shift"])
            for key in ("sde_generate", "sde_refine"):
                check_sde_steps(grid, EtaSchedule("r3", flow["eta"]), StochasticSteps.from_dict(flow[key]),
                                flow["shift"])
        except ValueError as e:
            raise UserError(f"policy.options (tiny_flow) with the saved policy's settings ({path}): {e}") from None
        policy = cls(base.model, base.tok, templates, base.rows, base.cols, flow)
        head = load_file(str(Path(path) / HEAD_FILE))
        policy.model.flow_head.load_state_dict({k.removeprefix("flow_head."): v for k, v in head.items()})
        policy.version = base.version
        return policy

    def save_pretrained(self, path: str) -> None:
        head = self._model.flow_head
        del self._model.flow_head  # the Llama folder stays loadable by transformers alone
        try:
            super().save_pretrained(path)
        finally:
            self._model.add_module("flow_head", head)
        # keys as in the policy's model (``flow_head.*``): the folder's safetensors together are its state_dict
        save_file({f"flow_head.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(Path(path) / HEAD_FILE))
        (Path(path) / FLOW_FILE).write_text(json.dumps(self.flow))

    def warm_start(self, recipe: Any, folder: Path, log: Any = None) -> None:
        if recipe.warmstart.steps > 0 and not recipe.policy.model:
            from r3_rl.policy.warmstart import warmstart_cached

            warmstart_cached(self, recipe, folder, log, loss_fn=flow_sft_loss,
                             tag=json.dumps(self.flow, sort_keys=True))

    # ------------------------------------------------------------------ conditioning
    def conditions(self, contexts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_last [B, H], h_cells [B, C, H])`` of each context (distinct contexts run once)."""
        keys = {tuple(c): None for c in contexts}
        uniq = [list(k) for k in keys]
        where = {k: i for i, k in enumerate(keys)}
        input_ids, mask, pos = self._left_padded(uniq)
        hidden = self._model.get_decoder()(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                           use_cache=False).last_hidden_state
        cells = (input_ids >= self.image_offset) & (input_ids < self.image_offset + self.num_image_tokens)
        h_cells = hidden.new_zeros(len(uniq), self.num_cells, hidden.shape[-1])
        rows = [i for i in range(len(uniq)) if int(cells[i].sum()) == self.num_cells]
        if rows:  # an input image (edits): its cells' hidden states, row-major like the latent
            idx = torch.tensor(rows)
            h_cells = h_cells.index_copy(0, idx, hidden[idx][cells[idx]].view(len(rows), self.num_cells, -1))
        back = torch.tensor([where[tuple(c)] for c in contexts])
        return hidden[:, -1].index_select(0, back), h_cells.index_select(0, back)

    def _branch(self, contexts: list[list[int]], rows: torch.Tensor | None = None) -> Any:
        """``v(x, t)`` of the head under these contexts; the Llama runs on the first call only (a branch that
        guidance never needs costs nothing, and the sampler's steps reuse the conditions)."""
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not cache:
                h_last, h_cells = self.conditions(contexts)
                if rows is not None:
                    h_last, h_cells = h_last.index_select(0, rows), h_cells.index_select(0, rows)
                cache.append((h_last, h_cells))
            return self._model.flow_head(x, t, *cache[0])

        return velocity

    def _velocity(self, contexts: dict[str, list[list[int]]], rows: torch.Tensor | None = None) -> FlowVelocity:
        """The velocity branches of these contexts (``input_ids``, ``uncond_ids``, ``image_uncond_ids``)."""
        return FlowVelocity(*(self._branch(contexts[k], rows) if k in contexts else None
                              for k in ("input_ids", "uncond_ids", "image_uncond_ids")))

    # ------------------------------------------------------------------ sampling
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, d]`` latents -> ``[B, rows, cols]`` cell tokens by the nearest palette code."""
        d = torch.cdist(latents.float(), self.codes[None].expand(latents.shape[0], -1, -1))
        return d.argmin(-1).view(-1, self.rows, self.cols)

    @torch.no_grad()
    def _draw(self, prompts: list[PromptItem], contexts: dict[str, list[list[int]]], kind: str, sp: SamplingParams,
              generator: torch.Generator | None) -> list[ImageSample]:
        self._model.eval()
        n, f = len(prompts), self.flow
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        stochastic = sp.temperature > 0 and not sp.greedy  # temperature 0: the plain ODE (eval)
        group = [p.id if f["share_initial_noise"] else i for i, p in enumerate(prompts)]
        init = [derive_seed(base, g, "init") for g in group]
        sde = [self.steps[kind].choose(len(self.grid) - 1, seed=derive_seed(base, p.id, "steps"),
                                       learner_step=self.version) if stochastic else () for p in prompts]
        guidance = self.guidance[kind]
        out = sample_flow(self._velocity(contexts), initial_noise(self.latent_shape, init),
                          grid=self.grid, sde_steps=sde, eta=self.eta, guidance=guidance,
                          noise_seeds=[derive_seed(base, i, "sde") for i in range(n)], init_seeds=init)
        grids = self.decode_latents(out.latents).numpy()
        samples = []
        for b, trace in enumerate(out.traces):
            ctx = {k: v[b] for k, v in contexts.items()}
            seg = Segment(modality="image", context=ctx, token_ids=[], logprobs=[s.logprob for s in trace.steps],
                          sampling=copy.copy(sp), action=flow_action(trace))
            samples.append(ImageSample(image=codec.encode(grids[b]), segment=seg))
        return samples

    def generate(self, prompts: list[PromptItem], plans: list[str | None], sampling: SamplingParams,
                 generator: torch.Generator | None = None) -> list[ImageSample]:
        ctx, uncond = self.generate_contexts(prompts, plans)
        return self._draw(prompts, {"input_ids": ctx, "uncond_ids": uncond}, "generate", sampling, generator)

    def refine(self, prompts: list[PromptItem], images: list[ImageInput], instructions: list[str],
               sampling: SamplingParams, generator: torch.Generator | None = None) -> list[ImageSample]:
        words = [self.image_words(im) for im in images]
        contexts = {
            "input_ids": [self.render("refine", prompt=p.prompt, image=w, instruction=i)
                          for p, w, i in zip(prompts, words, instructions)],
            "uncond_ids": [self.render("refine", prompt="", image=w, instruction="") for w in words],
            "image_uncond_ids": [self.render("refine", prompt=p.prompt, image="", instruction=i)
                                 for p, i in zip(prompts, instructions)]}
        return self._draw(prompts, contexts, "refine", sampling, generator)

    # ------------------------------------------------------------------ learning
    def denoising_scores(self, segments: list[Segment]) -> list[Any]:
        def velocity_for(members: Sequence[int], batch: Any) -> FlowVelocity:
            segs = [segments[m] for m in members]
            keys = [k for k in ("input_ids", "uncond_ids", "image_uncond_ids") if k in segs[0].context]
            contexts = {k: [s.context[k] for s in segs] for k in keys}
            return self._velocity(contexts, rows=batch.image.cpu())

        return score_traces([segment_trace(s) for s in segments], velocity_for)

    def segment_logprobs(self, segments: list[Segment]) -> list[torch.Tensor]:
        flow = [i for i, s in enumerate(segments) if is_flow_segment(s)]
        out: list[Any] = [None] * len(segments)
        if flow:
            for i, sc in zip(flow, self.denoising_scores([segments[i] for i in flow])):
                out[i] = sc.logp
        tokens = [i for i in range(len(segments)) if out[i] is None]
        if tokens:
            for i, lp in zip(tokens, super().segment_logprobs([segments[i] for i in tokens])):
                out[i] = lp
        return out


def flow_sft_loss(policy: TinyFlowPolicy, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Warm-start loss: cross-entropy on text targets, flow matching (mean squared velocity error) on image ones."""
    from r3_rl.policy.warmstart import sft_loss

    lo, hi = policy.image_offset, policy.image_offset + policy.num_image_tokens
    is_image = [len(t) == policy.num_cells and all(lo <= k < hi for k in t) for _, t in batch]
    text = [ex for ex, im in zip(batch, is_image) if not im]
    images = [ex for ex, im in zip(batch, is_image) if im]
    loss = sft_loss(policy, text) if text else torch.zeros(())
    if images:
        cells = torch.tensor([[k - lo for k in t] for _, t in images])
        x0 = policy.codes[cells]
        t = torch.rand(len(images))
        eps = torch.randn_like(x0)
        x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
        h_last, h_cells = policy.conditions([c for c, _ in images])
        v = policy.model.flow_head(x_t, t, h_last, h_cells)
        loss = loss + torch.nn.functional.mse_loss(v.float(), eps - x0)
    return loss
