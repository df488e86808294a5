"""An image action made of denoising steps, as a ``Segment`` carries it and as a flow policy rescores it.

The contract between a flow policy and the learner (``docs/architecture.md``, "Flow-matching policies"):

* sampling: the image's segment has ``action = flow_action(trace)``, ``token_ids = []`` and ``logprobs`` = the
  trace's per-SDE-step log-probs (one action per recorded stochastic step; ODE steps are no actions);
* learning: the policy's :meth:`~r3_rl.policy.base.Policy.denoising_scores` returns one :class:`StepScores` per
  such segment (its ``segment_logprobs`` returns their ``logp``); :func:`score_traces` does the work for any
  velocity model, the policy only says how to build each row's :class:`~r3_rl.flow.guidance.FlowVelocity`.

The learner recognises these segments by :func:`is_flow_segment` and trains them with the image's own clip range,
loss weight and closed-form Gaussian KL (:mod:`r3_rl.learner.flow_loss`); it never looks inside the trace.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch

from r3_rl.flow.guidance import FlowVelocity
from r3_rl.flow.trace import DenoisingTrace, StepBatch, stack_steps
from r3_rl.flow.transition import step_logprobs

FLOW_ACTION_KIND = "denoising"


def flow_action(trace: DenoisingTrace) -> dict[str, Any]:
    """``Segment.action`` of an image drawn by flow matching (JSON-safe, tensors as base64)."""
    return {"kind": FLOW_ACTION_KIND, "trace": trace.to_dict()}


def is_flow_segment(segment: Any) -> bool:
    """Whether ``segment``'s actions are denoising steps (rather than tokens or another continuous action)."""
    action = getattr(segment, "action", None)
    return isinstance(action, dict) and action.get("kind") == FLOW_ACTION_KIND


def segment_trace(segment: Any) -> DenoisingTrace:
    """The :class:`DenoisingTrace` a flow segment recorded (decoded from its action)."""
    if not is_flow_segment(segment):
        raise ValueError(f"segment_trace: the segment's action is not a denoising trace (kind "
                         f"{(segment.action or {}).get('kind')!r}, expected {FLOW_ACTION_KIND!r})")
    trace = DenoisingTrace.from_dict(segment.action["trace"])
    if len(trace.steps) != len(segment.logprobs):
        raise ValueError(f"segment_trace: {len(trace.steps)} recorded SDE steps but {len(segment.logprobs)} "
                         "log-probs in the segment")
    return trace


@dataclass
class StepScores:
    """One flow segment's recorded SDE steps rescored by the current weights (``S`` = its number of steps)."""

    logp: torch.Tensor  # [S] mean per-element Gaussian log-density, differentiable; aligned with Segment.logprobs
    mean: torch.Tensor  # [S, *latent] the step Gaussians' means (the closed-form KL compares them)
    std: torch.Tensor  # [S] float64, as recorded (depends on t, delta, eta only, never on the weights)
    delta: torch.Tensor  # [S] float64 step sizes (Flow-GRPO's KL units need them)


VelocityFor = Callable[[Sequence[int], StepBatch], FlowVelocity]
"""``velocity_for(members, batch)``: the :class:`FlowVelocity` of ``batch``'s rows, where row ``r`` belongs to
segment ``members[batch.image[r]]`` (an index into the list given to :func:`score_traces`)."""

# learner.flow.detach_uncond: while set, score_traces runs the unconditional CFG branches without gradient
_DETACH_UNCOND: ContextVar[bool] = ContextVar("detach_uncond", default=False)


@contextmanager
def unconditional_without_gradient(on: bool = True) -> Iterator[None]:
    """Score traces with the unconditional CFG branches under ``torch.no_grad()`` (Flow-GRPO's
    ``noise_pred_uncond.detach()``): the same values, but only the conditional branch carries gradient.  Off,
    the gradient is the exact one of the guided policy that sampled.  Any policy whose ``denoising_scores`` goes
    through :func:`score_traces` follows it."""
    token = _DETACH_UNCOND.set(on)
    try:
        yield
    finally:
        _DETACH_UNCOND.reset(token)


def unconditional_detached() -> bool:
    """Whether :func:`unconditional_without_gradient` is on: a policy may then also encode the unconditional
    branches' contexts without gradient (BAGEL does), which saves their activations."""
    return _DETACH_UNCOND.get()


def _without_gradient(branch: Any) -> Any:
    if branch is None:
        return None

    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return branch(x, t)
    return run


def score_traces(traces: Sequence[DenoisingTrace], velocity_for: VelocityFor,
                 device: torch.device | str | None = None) -> list[StepScores]:
    """Rescore every recorded step of ``traces`` under the guidance each was sampled with; one result per trace.

    Traces are stacked per kind (guidance, latent shape and dtype: generation and edits differ), one velocity
    call per kind; a trace without steps gets empty scores.
    """
    kinds: dict[tuple[Any, ...], list[int]] = {}
    for k, tr in enumerate(traces):
        if tr.steps:
            kinds.setdefault((tr.guidance, tr.latent_shape, tr.latent_dtype), []).append(k)
    rows: dict[int, StepScores] = {}
    for members in kinds.values():
        batch = stack_steps([traces[k] for k in members], device=device)
        velocity = velocity_for(members, batch)
        if _DETACH_UNCOND.get():
            velocity = replace(velocity, text_uncond=_without_gradient(velocity.text_uncond),
                               image_uncond=_without_gradient(velocity.image_uncond))  # a subclass stays one
        logp, mean, std = step_logprobs(velocity, batch.guidance, batch.x_t, batch.x_next, batch.t, batch.delta,
                                        batch.eta)
        for pos, k in enumerate(members):
            sel = (batch.image == pos).nonzero().squeeze(1)
            rows[k] = StepScores(logp=logp.index_select(0, sel), mean=mean.index_select(0, sel),
                                 std=std.reshape(-1).detach().to("cpu", torch.float64)[sel.cpu()],
                                 delta=batch.delta[sel.cpu()])
    out = []
    for k, tr in enumerate(traces):
        if k in rows:
            out.append(rows[k])
        else:
            shape = (0, *tr.latent_shape)
            out.append(StepScores(logp=torch.zeros(0), mean=torch.zeros(shape), std=torch.zeros(0, dtype=torch.float64),
                                  delta=torch.zeros(0, dtype=torch.float64)))
    return out
