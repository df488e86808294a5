"""The text ``r3-rl plan`` prints, and what to change when a run does not fit.

Advice is computed, not guessed: each candidate change (gradient checkpointing, a smaller micro-batch, LoRA,
more learner ranks, a smaller sampling batch, fewer workers per GPU, a smaller eval batch) is applied to a copy of
the recipe and planned again; the ones that make the run fit are listed with the new figure.  ZeRO-3 is not a
candidate: on one rank it shards nothing, and across ranks recipe validation refuses it; no change that the
validation refuses (:func:`r3_rl.config_learner.check_ranks`) is ever advised.
"""
from __future__ import annotations

import math
from typing import Any

from r3_rl.config_learner import check_ranks
from r3_rl.errors import UserError
from r3_rl.plan.report import GB, USABLE, Plan, make_plan


def _with(recipe: Any, changes: dict[str, Any]) -> Any:
    new = recipe.model_copy(deep=True)
    for key, value in changes.items():
        *path, last = key.split(".")
        section = new
        for part in path:
            section = getattr(section, part)
        setattr(section, last, value)
    return new


def _fullest(plan: Plan) -> float:
    return max((v for _, v in plan.gpu_totals()), default=0.0)


def _candidates(plan: Plan) -> list[tuple[str, list[Any]]]:
    """Recipe keys worth changing, each with its values from the mildest change to the strongest."""
    r, cfg = plan.recipe, plan.recipe.learner
    out: list[tuple[str, list[Any]]] = []
    if not cfg.gradient_checkpointing:
        out.append(("learner.gradient_checkpointing", [True]))
    out.append(("eval.batch_size", _halvings(r.eval.batch_size)))
    out.append(("rollout.groups_per_task", _halvings(r.rollout.groups_per_task)))
    out.append(("learner.micro_batch_size", _halvings(cfg.micro_batch_size)))
    # no ZeRO-3: with one rank it shards nothing, and with several ranks `r3-rl train` refuses it (check_ranks)
    if cfg.ranks > 1 and cfg.backend == "deepspeed" and cfg.deepspeed.zero_stage > 0 and cfg.gpus_per_rank:
        ro = r.rollout
        free = plan.gpus - (math.ceil(ro.workers * ro.gpus_per_worker - 1e-9) if ro.backend == "ray" else 0)
        out.append(("learner.ranks", list(range(cfg.ranks + 1, int(free / cfg.gpus_per_rank + 1e-9) + 1))))
    if r.rollout.backend == "ray" and 0 < r.rollout.gpus_per_worker < 1:
        out.append(("rollout.gpus_per_worker", [1.0]))
    if cfg.lora is None:
        out.append(("learner.lora", [{"r": 16}]))
    return [(k, v) for k, v in out if v]


def _halvings(n: int) -> list[int]:
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


def _try(plan: Plan, changes: dict[str, Any]) -> Plan | None:
    """The plan with ``changes`` applied; None where the changed recipe would not plan or not validate."""
    try:
        new = _with(plan.recipe, changes)
        check_ranks(new.learner)  # never advise a layout `r3-rl train` refuses
        return make_plan(new, plan.gpus, plan.gpu_memory, plan.shape)
    except (ValueError, UserError):
        return None


def _line(changes: dict[str, Any], new: Plan) -> str:
    text = ", ".join(f"{k}: {_yaml(v)}" for k, v in changes.items())
    return f"{text}  -> fullest GPU {_fullest(new) / GB:.1f} GB"


def advice(plan: Plan) -> list[str]:
    """Each single change that makes the run fit (the mildest value of each key).  If none does, a set that
    does together: every key at its strongest value (LoRA only if still needed), then each relaxed back to
    its mildest value -- or dropped -- as long as the run still fits."""
    keys = _candidates(plan)
    found = []
    for key, values in keys:
        for v in values:
            new = _try(plan, {key: v})
            if new is not None and new.fits:
                found.append(_line({key: v}, new))
                break
    if found:
        return found
    combo = {k: vals[-1] for k, vals in keys if k != "learner.lora"}
    if not _fits(plan, combo) and any(k == "learner.lora" for k, _ in keys):
        combo["learner.lora"] = {"r": 16}
    if not _fits(plan, combo):
        new = _try(plan, combo)
        return [f"even all of these leave it over: {_line(combo, new)}; use more or larger GPUs" if new else
                "no change of this recipe helps; use more or larger GPUs"]
    for key, values in reversed(keys):
        if key in combo:
            for v in [None, *values]:  # None: leave the key as the recipe has it
                trial = {k: x for k, x in combo.items() if k != key} if v is None else {**combo, key: v}
                if _fits(plan, trial):
                    combo = trial
                    break
    return ["no single change is enough; together: " + _line(combo, _try(plan, combo))]  # type: ignore[arg-type]


def _fits(plan: Plan, changes: dict[str, Any]) -> bool:
    new = _try(plan, changes)
    return new is not None and new.fits


def _yaml(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {x}" for k, x in v.items()) + "}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def uncounted_reward_models(plan: Plan) -> str:
    """The GPU reward models the plan has no size for (:mod:`r3_rl.plan.reward_models`), each named once."""
    names = dict.fromkeys(m.describe() for p in plan.processes for m in p.reward_models if m.params is None)
    return "; ".join(names)


def render(plan: Plan) -> str:
    s, r = plan.shape, plan.recipe
    out = [f"r3-rl plan: {r.name}, {plan.gpus} GPU(s) of {plan.gpu_memory:g} GB, policy {r.policy.dtype} on "
           f"{r.policy.device}",
           f"model: {s.source}",
           f"       {s.params / 1e9:.2f} B parameters ({s.params_trained / 1e9:.2f} B trainable; frozen: "
           f"{s.params_frozen / 1e9:.2f} B), width {s.hidden}, {s.layers} layers, "
           f"{s.image_tokens} {'latent positions' if s.flow else 'tokens'} per image"]
    if s.params_llm:
        out.append(f"       Mixture-of-Transformers language model: {s.params_llm / 1e9:.2f} B parameters (both experts: "
                   f"what weights, gradients and optimiser state count), {s.params_active / 1e9:.2f} B per token")
    out.append("")
    for p in plan.processes:
        where = ("on GPU 0" if p.name == "trainer process" else f"{p.per_gpu:g} per GPU") if p.per_gpu else "on CPU"
        out.append(f"{p.name} ({where})".ljust(46) + "GB")
        for k, v in p.resident.items():
            out.append(f"  {k:28s} {v / GB:9.2f}   {p.notes.get(k, '')}")
        phase, parts = p.peak_phase()
        if phase:
            out.append(f"  + largest phase: {phase}")
            for k, v in parts.items():
                out.append(f"    {k:26s} {v / GB:9.2f}   {p.notes.get(k, '')}")
            others = [f"{n.split(' (')[0]} {sum(x.values()) / GB:.1f}" for n, x in p.phases.items() if n != phase]
            if others:
                out.append(f"    (other phases: {', '.join(others)} GB)")
        out.append(f"  {'peak':28s} {p.total / GB:9.2f}")
        out.append("")
    out.append(f"per GPU (fits under {USABLE:.0%} of {plan.gpu_memory:g} GB = {USABLE * plan.gpu_memory:.0f} GB):")
    if not plan.gpu_totals():
        out.append(f"  nothing runs on a GPU (policy.device: {r.policy.device})")
    for what, v in plan.gpu_totals():
        ok = "ok" if v <= USABLE * plan.gpu_memory * GB else "OVER"
        out.append(f"  {what:56s} {v / GB:7.1f} GB  {ok}")
    out.append(f"GPUs the actors need: {plan.gpus_needed} of {plan.gpus}")
    models = uncounted_reward_models(plan)
    if models:
        out.append(f"not counted: reward models on a GPU with no size here ({models})")
    if plan.host:
        parts = "; ".join(f"{k} {v / GB:.1f}" if v >= 0.05 * GB else f"{k} {v / 1e6:.1f} MB"
                          for k, v in plan.host.items())
        out.append(f"host (CPU) memory of the node beyond the processes: {sum(plan.host.values()) / GB:.1f} GB ({parts})")
        given = None if r.ray.address else r.ray.object_store_gb
        if "Ray object store" in plan.host and given is not None:
            store = plan.host["Ray object store"] / GB
            out.append(f"  ray.object_store_gb gives the object store {given:g} GB: "
                       + (f"room for the {store:.1f} GB" if store <= given else f"less than the {store:.1f} GB it needs"))
        elif "Ray object store" in plan.host:  # ray.init's default store is 30% of the node's memory
            store = plan.host["Ray object store"] / GB
            out.append(f"  Ray's default object store is 30% of the node's memory: {store:.1f} GB in it needs a node of "
                       f"{store / 0.3:.0f} GB or more (or --set ray.object_store_gb={-(-store // 1):.0f}; on a cluster "
                       f"ray start --object-store-memory)")
    out += [f"error: {e}" for e in plan.errors]
    if plan.fits:
        out.append("verdict: fits")
    else:
        out.append("verdict: will not run as configured" if plan.errors else "verdict: does NOT fit; what to change:")
        if not plan.errors:
            out += [f"  {line}" for line in advice(plan)]
    return "\n".join(out)
