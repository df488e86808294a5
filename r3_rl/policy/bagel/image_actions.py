"""Image actions of BAGEL (generate, refine): flow-matching sampling with recorded SDE steps, and their log-probs
recomputed for the learner -- both through :mod:`r3_rl.flow`, under one guidance rule.

The velocity branches are the model's :meth:`~r3_rl.policy.bagel.model.BagelModel.predict_velocity` after three
context caches (R3's, per stage):

* generate: conditional = system prompt, prompt, plan; text-unconditional = the system prompt alone;
* refine: conditional = VAE(image), ViT(image), instruction; text-unconditional = VAE(image), ViT(image);
  image-unconditional = the instruction alone.

The learner rebuilds the same caches with gradients on and rescores each recorded transition ``x_t -> x_next``
with :func:`r3_rl.flow.action.score_traces` under the trace's own guidance (text and image CFG, interval, renorm), so
the ratio is 1 before the first update -- CFG included, unlike the reference, which trains generation without it.
With ``isolate`` (``policy.options.expert_isolation``, the default) the rescoring trains the generation expert only:
the contexts' understanding tokens and the noised blocks' image markers run without gradient
(:mod:`r3_rl.policy.bagel.mot`), which changes no value, so the ratio stays 1.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from r3_rl.flow import (DenoisingTrace, EtaSchedule, FlowVelocity, Guidance, StochasticSteps, initial_noise,
                        sample_flow, timestep_grid)
from r3_rl.flow.action import StepScores, score_traces, unconditional_detached
from r3_rl.policy.bagel.contexts import ContextBuilder, Record
from r3_rl.policy.bagel.images import decode_latents, to_uint8
from r3_rl.policy.bagel.layout import ContextCache
from r3_rl.policy.bagel.model import BagelModel

BRANCHES = ("cond", "text_uncond", "image_uncond")
SEED_RANGE = 2 ** 62


@dataclass(frozen=True)
class FlowSettings:
    """How one kind of image action is drawn: grid, noise schedule, which steps are SDE steps, guidance."""

    grid: tuple[float, ...]
    eta: EtaSchedule
    steps: StochasticSteps
    guidance: Guidance


def flow_settings(options: Any, stage: str, text_cfg: float, stochastic: bool = True) -> FlowSettings:
    """R3's settings of ``stage`` (generate / refine) from the policy options and the stage's text-CFG scale;
    a draw without SDE steps (``stochastic=False``) walks the ``ode_steps`` grid."""
    edit = stage == "refine"
    points = (options.edit_steps if edit else options.gen_steps) if stochastic else options.ode_steps
    grid = timestep_grid(points, options.timestep_shift)
    eta = EtaSchedule("r3", options.edit_eta if edit else options.gen_eta)
    steps = StochasticSteps("random", count=options.edit_sde_count if edit else options.gen_sde_count,
                            max_index=options.edit_sde_max_index if edit else None)
    guidance = Guidance(text_scale=float(text_cfg), image_scale=options.image_cfg if edit else 1.0,
                        interval=options.cfg_interval, renorm=options.edit_renorm if edit else options.gen_renorm)
    return FlowSettings(grid, eta, steps, guidance)


def velocity_field(model: BagelModel, caches: dict[str, ContextCache], grid: tuple[int, int],
                   rows: torch.Tensor | None = None, grad_expert: str | None = None) -> FlowVelocity:
    """The branches as the sampler and the learner call them; ``rows`` picks each latent's context row."""
    def branch(cache: ContextCache | None):
        if cache is None:
            return None
        picked = cache if rows is None else cache.select(rows)
        return lambda x, t: model.predict_velocity(picked, x, t, grid, grad_expert)
    return FlowVelocity(*(branch(caches.get(name)) for name in BRANCHES))


def encode_branches(builder: ContextBuilder, contexts: Sequence[dict[str, Any]], guidance: Guidance,
                    grad_expert: str | None = None) -> dict[str, ContextCache]:
    """The caches of the branches ``guidance`` can need, one row per context record."""
    needed = ["cond"] + (["text_uncond"] if guidance.text_scale > 1.0 else [])
    needed += ["image_uncond"] if guidance.uses_image_branch else []
    caches = {}
    for name in needed:
        rows = [builder.blocks(ctx[name], ctx.get("images", {})) for ctx in contexts]
        detached = name != "cond" and unconditional_detached()  # learner.flow.detach_uncond: no activations kept
        with torch.no_grad() if detached else contextlib.nullcontext():
            caches[name] = builder.encode(rows, grad_expert)
    return caches


def group_seeds(keys: Sequence[Any], share: bool, generator: torch.Generator | None) -> tuple[list[int], list[int],
                                                                                            list[int]]:
    """(init-noise seeds, SDE-step-choice seeds, SDE-noise seeds) per image.  Consecutive images with the same key
    are one sibling group: they share the step choice and, with ``share``, the initial noise (R3)."""
    def draw() -> int:
        return int(torch.randint(0, SEED_RANGE, (1,), generator=generator))
    init, choice, noise = [], [], []
    for k, key in enumerate(keys):
        if k == 0 or key != keys[k - 1]:
            group_init, group_choice = draw(), draw()
        init.append(group_init if share else draw())
        choice.append(group_choice)
        noise.append(draw())
    return init, choice, noise


@torch.no_grad()
def sample_images(model: BagelModel, vae: Any, builder: ContextBuilder, contexts: Sequence[dict[str, Any]],
                  grid: tuple[int, int], settings: FlowSettings, keys: Sequence[Any], share_noise: bool,
                  stochastic: bool, generator: torch.Generator | None) -> tuple[Any, list[DenoisingTrace]]:
    """Draw one image per context record: uint8 images [B, H, W, 3] and their denoising traces.

    ``stochastic=False`` (greedy / temperature 0) takes ODE steps only: the traces then hold no action.
    """
    n = len(contexts)
    init, choice, noise = group_seeds(keys, share_noise, generator)
    num_steps = len(settings.grid) - 1
    sde = [settings.steps.choose(num_steps, seed=s) if stochastic else () for s in choice]
    caches = encode_branches(builder, contexts, settings.guidance)
    tokens = grid[0] * grid[1]
    x_T = initial_noise((tokens, model.config.patch_latent_dim), init, device=model.device)
    out = sample_flow(velocity_field(model, caches, grid), x_T, grid=settings.grid, sde_steps=sde, eta=settings.eta,
                      guidance=settings.guidance, noise_seeds=noise, init_seeds=init)
    pixels = decode_latents(vae, out.latents.to(model.device), grid, model.config.latent_patch_size)
    assert pixels.shape[0] == n
    return to_uint8(pixels), out.traces


def denoising_scores(model: BagelModel, builder: ContextBuilder, contexts: Sequence[Record],
                     traces: Sequence[DenoisingTrace], isolate: bool = False) -> list[StepScores]:
    """Per image: its recorded SDE steps rescored differentiably under the trace's own guidance
    (:func:`r3_rl.flow.action.score_traces` batches the images of one kind; each kind's contexts are encoded once).
    ``isolate``: the scores train the generation expert only."""
    grad_expert = "gen" if isolate else None

    def velocity_for(members: Sequence[int], batch: Any) -> FlowVelocity:
        ctxs = [contexts[m] for m in members]
        caches = encode_branches(builder, ctxs, batch.guidance, grad_expert)
        grids = [tuple(ctxs[int(k)]["grid"]) for k in batch.image.tolist()]
        if len(set(grids)) == 1:
            return velocity_field(model, caches, grids[0], rows=batch.image, grad_expert=grad_expert)
        return _mixed_grids(model, caches, grids, batch.image, grad_expert)

    return score_traces(traces, velocity_for, device=model.device)


def _mixed_grids(model: BagelModel, caches: dict[str, ContextCache], grids: list[tuple[int, int]],
                 image: torch.Tensor, grad_expert: str | None = None) -> FlowVelocity:
    """Rows whose images have as many tokens in different grids (2x8 and 4x4): one velocity call per grid."""
    parts = {g: torch.tensor([r for r, h in enumerate(grids) if h == g], device=image.device) for g in set(grids)}

    def branch(name: str):
        if name not in caches:
            return None

        def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            for g, rows in parts.items():
                f = velocity_field(model, {name: caches[name]}, g, rows=image.index_select(0, rows),
                                   grad_expert=grad_expert)
                out = out.index_copy(0, rows, getattr(f, name)(x.index_select(0, rows), t.index_select(0, rows)))
            return out
        return v
    return FlowVelocity(*(branch(name) for name in BRANCHES))
