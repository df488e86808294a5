"""The record of one image action (its denoising trace) and the learner's batch of recorded SDE steps.

A :class:`DenoisingTrace` holds what the learner needs to recompute every stochastic step's Gaussian under
the same guidance: per SDE step the input latent ``x_t``, the sample ``x_next`` the sampler continued from
(both in the latent's own dtype, which holds them exactly: the sampler keeps the latent in it between steps),
the behaviour log-prob, and ``t``, ``delta``, ``eta`` as used.  ODE steps leave nothing behind (the seeds and
the grid rebuild them).  The behaviour mean is not kept: the learner recomputes it, and the recorded log-prob is
what its ratio and ``sampler_flow_logp_gap`` compare against.  Version 1 kept three float32 tensors per step
(the mean too); version 2 keeps two in the latent's dtype: two thirds of the bytes for a float32 latent
(BAGEL's: 1.05 -> 0.70 MB per SDE step of a 512 px image in base64, ``benchmarks/trace_size.py``), a third for a bf16 one.  Version-1 records
(a buffer or dump saved before) still load; their ``mean`` is dropped.  ``to_dict`` is JSON-safe and pickle-free: tensors are base64 of raw
little-endian bytes (:mod:`r3_rl.flow.codec`), floats are Python floats (JSON round-trips them exactly).
This is what a flow policy's ``Segment`` will record for an image.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from r3_rl.flow.codec import decode_tensor, encode_tensor, encoded_size, is_shape, torch_dtype
from r3_rl.flow.guidance import Guidance
from r3_rl.flow.schedule import EtaSchedule, known_fields

TRACE_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: steps also held the behaviour mean (dropped on reading)
_STEP_TENSORS = ("x_t", "x_next")
_TENSOR_HEAD_CHARS = 60  # '"x_next": {"dtype": "float32", "shape": [...], "b64": ""}, '
_STEP_SCALARS_CHARS = 150  # index, t, delta, eta, std, logprob with their keys


@dataclass
class SdeStep:
    """One recorded stochastic step ``x_t -> x_next`` (tensors in the latent's dtype, on the CPU, no batch dim)."""

    index: int  # denoising step index i: from grid[i] to grid[i+1]
    t: float
    delta: float  # grid[i] - grid[i+1] > 0
    eta: float
    std: float  # eta * sqrt(delta), as used
    logprob: float  # behaviour log-prob (mean per-element log-density, constants kept)
    x_t: torch.Tensor
    x_next: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in ("index", "t", "delta", "eta", "std", "logprob")}
        d.update({k: encode_tensor(getattr(self, k)) for k in _STEP_TENSORS})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], version: int = TRACE_VERSION) -> SdeStep:
        if version == 1 and isinstance(d, dict):
            d = {k: v for k, v in d.items() if k != "mean"}
        d = known_fields(cls, d, "SDE step")
        missing = [k for k in ("index", "t", "delta", "eta", "std", "logprob", *_STEP_TENSORS) if k not in d]
        if missing:
            raise ValueError(f"SDE step: missing key(s) {', '.join(missing)}")
        tensors = {k: decode_tensor(d[k], f"SDE step {k}") for k in _STEP_TENSORS}
        if len({tuple(v.shape) for v in tensors.values()}) != 1:
            raise ValueError("SDE step: x_t and x_next must have the same shape")
        if type(d["index"]) is not int:  # 2.7 or true read as step 2 or 1 of the grid
            raise ValueError(f"SDE step: index must be an integer, got {d['index']!r}")
        return cls(index=d["index"], t=float(d["t"]), delta=float(d["delta"]), eta=float(d["eta"]),
                   std=float(d["std"]), logprob=float(d["logprob"]), **tensors)


@dataclass
class DenoisingTrace:
    """One image action: how it was sampled and its recorded SDE steps (in denoising order)."""

    latent_shape: tuple[int, ...]
    latent_dtype: str  # dtype the sampler kept the latent in between steps (the model's input dtype)
    grid: tuple[float, ...]
    guidance: Guidance
    eta: EtaSchedule
    init_seed: int | None  # seed of the initial noise x_T (None: x_T came from elsewhere, e.g. an edit)
    noise_seed: int  # seed of the per-image generator of the SDE noise
    steps: list[SdeStep] = field(default_factory=list)

    @property
    def sde_indices(self) -> tuple[int, ...]:
        return tuple(s.index for s in self.steps)

    def _head(self) -> dict[str, Any]:
        return {"version": TRACE_VERSION, "latent_shape": list(self.latent_shape), "latent_dtype": self.latent_dtype,
                "grid": list(self.grid), "guidance": self.guidance.to_dict(), "eta": self.eta.to_dict(),
                "init_seed": self.init_seed, "noise_seed": self.noise_seed}

    def to_dict(self) -> dict[str, Any]:
        return {**self._head(), "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenoisingTrace:
        if not isinstance(d, dict) or type(d.get("version")) is not int or d["version"] not in _READABLE_VERSIONS:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"denoising trace: version must be one of {', '.join(map(str, _READABLE_VERSIONS))}, "
                             f"got {got!r}")
        body = known_fields(cls, {k: v for k, v in d.items() if k != "version"}, "denoising trace")
        missing = [k for k in ("latent_shape", "latent_dtype", "grid", "guidance", "eta", "init_seed", "noise_seed",
                               "steps") if k not in body]
        if missing:
            raise ValueError(f"denoising trace: missing key(s) {', '.join(missing)}")
        torch_dtype(body["latent_dtype"])  # a clear error for an unknown dtype name
        shape = body["latent_shape"]
        if not is_shape(shape):
            raise ValueError(f"denoising trace: latent_shape must be a list of non-negative ints, got {shape!r}")
        for key, nullable in (("init_seed", True), ("noise_seed", False)):  # a seed is never "5", 5.7 or true
            value = body[key]
            if not ((nullable and value is None) or type(value) is int):
                raise ValueError(f"denoising trace: {key} must be an integer{' or null' if nullable else ''}, "
                                 f"got {value!r}")
        trace = cls(latent_shape=tuple(shape), latent_dtype=body["latent_dtype"],
                    grid=tuple(float(t) for t in body["grid"]), guidance=Guidance.from_dict(body["guidance"]),
                    eta=EtaSchedule.from_dict(body["eta"]), init_seed=body["init_seed"],
                    noise_seed=body["noise_seed"],
                    steps=[SdeStep.from_dict(s, d["version"]) for s in body["steps"]])
        for s in trace.steps:
            if tuple(s.x_t.shape) != trace.latent_shape:
                raise ValueError(f"denoising trace: step {s.index} has shape {tuple(s.x_t.shape)}, "
                                 f"latent_shape is {trace.latent_shape}")
        return trace

    def size_bytes(self) -> int:
        """Estimate of ``len(json.dumps(self.to_dict()))`` without encoding the tensors (within a few %)."""
        per_step = sum(_STEP_SCALARS_CHARS + sum(encoded_size(getattr(s, k)) + _TENSOR_HEAD_CHARS
                                                  for k in _STEP_TENSORS) for s in self.steps)
        return len(json.dumps({**self._head(), "steps": []})) + per_step


@dataclass
class StepBatch:
    """Recorded SDE steps of several images stacked for the learner (``N`` rows, one per step)."""

    x_t: torch.Tensor  # [N, *latent_shape] in the latent dtype the sampler fed the model
    x_next: torch.Tensor  # [N, *latent_shape] what was sampled, in float32 (float64 for float64 latents)
    t: torch.Tensor  # [N] float64, on the CPU (sde_gaussian moves the coefficients it derives)
    delta: torch.Tensor  # [N] float64, on the CPU
    eta: torch.Tensor  # [N] float64, on the CPU
    logprob: torch.Tensor  # [N] behaviour log-prob (float64 copy of the recorded floats)
    image: torch.Tensor  # [N] long: position of the row's trace in the stacked list
    step: torch.Tensor  # [N] long: denoising step index
    guidance: Guidance


def stack_steps(traces: Sequence[DenoisingTrace], select: Sequence[Sequence[int]] | None = None,
                device: torch.device | str | None = None) -> StepBatch:
    """Stack the recorded steps of ``traces`` (``select[k]``: positions in trace ``k``'s steps; default all).

    All traces must share guidance, latent shape and dtype (the learner batches generation and edit actions
    separately: they have different guidance and different velocity contexts).
    """
    if not traces:
        raise ValueError("stack_steps: no traces")
    first = traces[0]
    for k, tr in enumerate(traces):
        if (tr.guidance, tr.latent_shape, tr.latent_dtype) != (first.guidance, first.latent_shape, first.latent_dtype):
            raise ValueError(f"stack_steps: trace {k} differs from trace 0 in guidance, latent shape or dtype; "
                             "stack each kind of image action separately")
    if select is not None and len(select) != len(traces):
        raise ValueError(f"stack_steps: select has {len(select)} entries for {len(traces)} traces")
    rows: list[tuple[int, SdeStep]] = []
    for k, tr in enumerate(traces):
        picks = range(len(tr.steps)) if select is None else select[k]
        rows.extend((k, tr.steps[p]) for p in picks)
    if not rows:
        raise ValueError("stack_steps: the traces hold no selected SDE step")

    def stacked(name: str) -> torch.Tensor:
        return torch.stack([getattr(s, name) for _, s in rows]).to(device)

    def floats(name: str) -> torch.Tensor:
        return torch.tensor([getattr(s, name) for _, s in rows], dtype=torch.float64)

    latent_dtype = torch_dtype(first.latent_dtype)
    return StepBatch(x_t=stacked("x_t").to(latent_dtype),
                     x_next=stacked("x_next").to(torch.promote_types(latent_dtype, torch.float32)),
                     t=floats("t"), delta=floats("delta"), eta=floats("eta"), logprob=floats("logprob").to(device),
                     image=torch.tensor([k for k, _ in rows], dtype=torch.long, device=device),
                     step=torch.tensor([s.index for _, s in rows], dtype=torch.long, device=device),
                     guidance=first.guidance)

