"""Scalar metrics of a training step, computed from scored trees (pure), one name per quantity.

Everything here is a pure function of the trees (and timings) so it can be tested on hand-built trees.
TensorBoard groups scalars by the part of the name before the first ``/`` and sorts the groups by name,
so the groups a reader looks at first carry a numeric prefix:

* ``0_eval/``: held-out accuracy per round, verdict balanced accuracy (chains and reference set),
  yes/no accuracy, stop rate (``eval/`` and ``eval_tag/`` hold the details); ``0_eval/synergy/``: the
  demo's three figures against before RL (logged by the trainer)
* ``1_reward/<stage>``: mean reward of the step's sampled nodes per stage
* ``2_accuracy/round<r>``: share of correct images per round (round 0: first images, r >= 1: the image
  standing after a refine round, a "no further edit" copy included)
* ``3_understanding/``: the critic's verdicts on this step's refine-stage parents, against the task
  reward's verdict on the parent (``verdict_balanced_accuracy``, ``stop_on_correct``, ``edit_on_flawed``), and
  ``shortcut_{tag,prompt,round}``: the balanced accuracy a verdict read off the parent's tag, prompt or round
  alone would reach on the step's parent draw (logged by the trainer, :mod:`r3_rl.rollout.parent_mix`)
* ``4_kl/{text,image}``: KL to the reference per modality (from the learner)
* ``5_entropy/{text,image}``: mean negative log-prob of the sampled tokens per modality, an unbiased
  estimate of the sampling distribution's entropy (``image_sde`` for images drawn by flow matching: per latent
  element of their SDE steps)
* ``6_refine/``: stop rate, improved / worse / unchanged refined images, mean improvement

then ``advantage/<stage>/{mean,std,abs_max}``, ``groups/`` (sibling groups with no learning signal: the
"silent zero" of UniRL PR #141 shows up here first), ``learner/``, ``reward_component/<stage>/<part>``,
``reward_detail/`` (std, count, per round), ``rollout/`` (``failed_rewards``: failed image rewards, counted
here only; image, token and SDE-step counts), ``throughput/``, ``time/``.  A reward component that equals a quantity already
logged (the stage reward itself, the accuracy, another component) on every node of the step is left out.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from r3_rl.algorithms.signal import SIGNAL_ATOL, has_signal
from r3_rl.flow.action import is_flow_segment
from r3_rl.tracking.text_lengths import text_length_metrics
from r3_rl.trajectory import Node, Tree

EVAL, REWARD, ACCURACY, UNDERSTANDING, KL, ENTROPY, REFINE = (
    "0_eval", "1_reward", "2_accuracy", "3_understanding", "4_kl", "5_entropy", "6_refine")
_EPS = 1e-9  # two logged series closer than this at every step are the same quantity


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    """Population standard deviation of the logged values: a description of this step's batch (the group
    normalisation of GRPO is another quantity, with Bessel's correction: :mod:`r3_rl.algorithms.advantages`)."""
    if not xs:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(_mean([(x - m) ** 2 for x in xs]))


def sampled(node: Node) -> bool:
    """Nodes the current rollout produced (buffered parents carry ``policy_version == -1``)."""
    return node.policy_version >= 0


def previous_image(tree: Tree, node: Node) -> Node | None:
    """The image a refine node started from: the nearest ancestor holding an image."""
    cur = node.parent
    while cur is not None:
        anc = tree.nodes[cur]
        if anc.image is not None:
            return anc
        cur = anc.parent
    return None


def _distinct_components(nodes: list[Node], taken: list[list[float]]) -> dict[str, float]:
    """Mean of each reward component over the ``nodes`` that carry it, leaving out a component whose values
    equal, node for node, a series in ``taken`` (the stage reward, the accuracy) or an earlier component."""
    out: dict[str, float] = {}
    for k in sorted({k for n in nodes for k in n.rewards}):
        idx = [i for i, n in enumerate(nodes) if k in n.rewards]
        series = [float(nodes[i].rewards[k]) for i in idx]
        if any(all(abs(s[i] - v) <= _EPS for i, v in zip(idx, series)) for s in taken):
            continue
        taken.append([float(n.rewards.get(k, math.nan)) for n in nodes])  # NaN never equals: absent = different
        out[k] = _mean(series)
    return out


def reward_metrics(trees: list[Tree], correct_threshold: float = 1.0) -> dict[str, float]:
    """Reward per stage, accuracy per round, reward components (deduplicated), std/count/per-round details."""
    by_stage: dict[str, list[Node]] = defaultdict(list)
    for t in trees:
        for n in t.nodes.values():
            if sampled(n) and n.reward is not None:
                by_stage[n.stage].append(n)
    out: dict[str, float] = {}
    correct_by_round: dict[int, list[float]] = defaultdict(list)
    for stage, nodes in sorted(by_stage.items()):
        rewards = [float(n.reward) for n in nodes]  # type: ignore[arg-type]
        out[f"{REWARD}/{stage}"] = _mean(rewards)
        out[f"reward_detail/{stage}/std"] = _std(rewards)
        out[f"reward_detail/{stage}/count"] = float(len(rewards))
        rounds = sorted({n.round for n in nodes})
        if len(rounds) > 1:  # with one round the per-round mean is the stage mean
            for r in rounds:
                out[f"reward_detail/{stage}/round{r}"] = _mean([float(n.reward) for n in nodes if n.round == r])
        taken = [rewards]
        if stage in ("generate", "refine"):
            correct = [float(n.reward >= correct_threshold) for n in nodes]  # type: ignore[operator]
            taken.append(correct)
            for n, c in zip(nodes, correct):
                correct_by_round[n.round].append(c)
        for k, v in _distinct_components(nodes, taken).items():
            out[f"reward_component/{stage}/{k}"] = v
    for r, xs in sorted(correct_by_round.items()):
        out[f"{ACCURACY}/round{r}"] = _mean(xs)
    return out


def understanding_metrics(trees: list[Tree], correct_threshold: float = 1.0) -> dict[str, float]:
    """The critic's verdicts on this step's refine-stage parents (judged by their task reward)."""
    from r3_rl.eval.understanding import VerdictTally

    tally = VerdictTally()
    for t in trees:
        for n in t.nodes.values():
            if n.stage == "reflect" and sampled(n) and n.parent is not None:
                parent = t.nodes[n.parent]
                ok = parent.meta.get("correct")  # the scorer's verdict (rewards.reflect.correct_part), if any
                if ok is None and parent.reward is not None:
                    ok = parent.reward >= correct_threshold
                if ok is not None:
                    tally.add(bool(ok), bool(n.stop))
    if tally.correct + tally.flawed == 0:
        return {}
    s = tally.summary()
    return {f"{UNDERSTANDING}/verdict_balanced_accuracy": s["balanced_accuracy"],
            f"{UNDERSTANDING}/stop_on_correct": s["stop_on_correct"],
            f"{UNDERSTANDING}/edit_on_flawed": s["edit_on_flawed"]}


def refine_metrics(trees: list[Tree]) -> dict[str, float]:
    """Stop ("no further edit") rate and improved / worse / unchanged refined images, overall and per round.

    A refined image is compared with the image it was made from; a "no further edit" copy counts as
    unchanged.  Pairs where either reward failed are left out (they are counted as failures elsewhere).
    """
    stops: list[float] = []
    deltas: list[float] = []
    moves: dict[str, int] = {"improved": 0, "worse": 0, "unchanged": 0}
    per_round: dict[int, dict[str, int]] = defaultdict(lambda: {"improved": 0, "worse": 0, "unchanged": 0})
    for t in trees:
        for n in t.nodes.values():
            if not sampled(n):
                continue
            if n.stage == "reflect":
                stops.append(float(bool(n.stop)))
            if n.stage != "refine" or n.reward is None:
                continue
            prev = previous_image(t, n)
            if prev is None or prev.reward is None:
                continue
            d = n.reward - prev.reward
            deltas.append(d)
            kind = "improved" if d > SIGNAL_ATOL else "worse" if d < -SIGNAL_ATOL else "unchanged"
            moves[kind] += 1
            per_round[n.round][kind] += 1
    if not stops and not deltas:
        return {}
    out = {f"{REFINE}/stop_rate": _mean(stops), f"{REFINE}/delta_mean": _mean(deltas)}
    out.update({f"{REFINE}/{k}": float(v) for k, v in moves.items()})
    if len(per_round) > 1:  # with one round the per-round counts are the totals
        for r, m in sorted(per_round.items()):
            out.update({f"refine_round/round{r}/{k}": float(v) for k, v in m.items()})
    return out


def group_metrics(trees: list[Tree]) -> dict[str, float]:
    """Advantage statistics per stage and sibling groups that carry no learning signal.

    A group is "zero-signal" when it has at least two scored members and all their rewards are equal
    (:func:`r3_rl.algorithms.signal.has_signal`): every advantage is then zero and the group contributes no
    gradient.
    """
    groups: dict[str, list[Node]] = defaultdict(list)
    advs: dict[str, list[float]] = defaultdict(list)
    for t in trees:
        for n in t.nodes.values():
            if not sampled(n):
                continue
            groups[n.group_id].append(n)
            if n.advantage is not None:
                advs[n.stage].append(n.advantage)
    out: dict[str, float] = {}
    total = zero = 0
    per_stage: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for members in groups.values():
        rewards = [m.reward for m in members if m.reward is not None]
        if len(rewards) < 2:
            continue
        stage = members[0].stage
        flat = not has_signal(rewards)
        per_stage[stage][0] += 1
        per_stage[stage][1] += flat
        total += 1
        zero += flat
    for stage, (n_groups, n_zero) in sorted(per_stage.items()):
        out[f"groups/{stage}/total"] = float(n_groups)
        out[f"groups/{stage}/zero_signal"] = float(n_zero)
    out["groups/zero_signal_fraction"] = zero / total if total else float("nan")
    rescue = [bool(t.meta["rescued"]) for t in trees if "rescued" in t.meta]  # rollout.verdict_rescue_temperature
    if rescue:
        out["groups/reflect/rescued"] = float(sum(rescue))
    for stage, xs in sorted(advs.items()):
        out[f"advantage/{stage}/mean"] = _mean(xs)
        out[f"advantage/{stage}/std"] = _std(xs)
        out[f"advantage/{stage}/abs_max"] = max(abs(x) for x in xs)
    return out


def throughput_metrics(trees: list[Tree], rollout_s: float) -> dict[str, float]:
    """Trajectories (sampled root-to-leaf paths), sampled images, tokens (and denoising steps) in total and per
    second, and the entropy estimate per modality (mean ``-log p`` of the sampled tokens under the distribution
    that sampled them).

    Images drawn by flow matching sample no tokens: their recorded SDE steps count as ``rollout/sde_steps`` and
    their entropy is ``5_entropy/image_sde``, the mean negative log-density per latent element of those steps (a
    differential entropy: another unit than the tokens' nats, so another name; it can be negative).  A flow
    policy's run does not log ``image_tokens`` (zero would read as "nothing sampled")."""
    trajectories, images, sde_steps, sde_neg_logp = 0, 0, 0, 0.0
    tokens: dict[str, int] = {"image": 0, "text": 0}
    neg_logp: dict[str, float] = {"image": 0.0, "text": 0.0}
    for t in trees:
        trajectories += sum(1 for leaf in t.leaves() if sampled(leaf))
        for n in t.nodes.values():
            if not sampled(n) or n.segment is None:
                continue
            images += n.segment.modality == "image"
            if n.segment.modality == "image" and is_flow_segment(n.segment):
                sde_steps += len(n.segment.logprobs)
                if not n.segment.sampling.greedy:
                    sde_neg_logp -= sum(n.segment.logprobs)
            elif n.segment.token_ids:
                mod = "image" if n.segment.modality == "image" else "text"
                tokens[mod] += len(n.segment.token_ids)
                if not n.segment.sampling.greedy:  # a greedy token was not drawn: its (tempered) log-prob estimates no entropy
                    neg_logp[mod] -= sum(n.segment.logprobs)
    counts = {"images": images, "text_tokens": tokens["text"]}
    if tokens["image"] or not sde_steps:
        counts["image_tokens"] = tokens["image"]
    if sde_steps:
        counts["sde_steps"] = sde_steps
    out = {"rollout/trajectories": float(trajectories), **{f"rollout/{k}": float(v) for k, v in counts.items()}}
    for mod, n_tok in tokens.items():
        if n_tok and neg_logp[mod]:
            out[f"{ENTROPY}/{mod}"] = neg_logp[mod] / n_tok
    if sde_steps and sde_neg_logp:
        out[f"{ENTROPY}/image_sde"] = sde_neg_logp / sde_steps
    if rollout_s > 0:
        out["throughput/trajectories_per_s"] = trajectories / rollout_s
        out.update({f"throughput/{k}_per_s": v / rollout_s for k, v in counts.items() if k != "images"})
    return out


def failed_reward_count(trees: list[Tree]) -> int:
    """Sampled images whose task reward failed (``reward is None``): excluded from the update, never zeroed."""
    return sum(1 for t in trees for n in t.nodes.values()
               if sampled(n) and n.image is not None and n.reward is None)


def rollout_metrics(trees: list[Tree], correct_threshold: float = 1.0, rollout_s: float = 0.0) -> dict[str, float]:
    """All per-step scalars that can be computed from the scored trees (see the module docstring)."""
    out = reward_metrics(trees, correct_threshold)
    out.update(understanding_metrics(trees, correct_threshold))
    out.update(refine_metrics(trees))
    out.update(group_metrics(trees))
    out.update(throughput_metrics(trees, rollout_s))
    out.update(text_length_metrics(trees))
    out["rollout/failed_rewards"] = float(failed_reward_count(trees))
    return out


_LEARNER_RENAMES = {"learner/kl_text": f"{KL}/text", "learner/kl_image": f"{KL}/image"}


def step_metrics(trees: list[Tree], correct_threshold: float, learn: dict[str, float], batch: Any,
                 groups: dict[str, float], rollout_s: float, learner_s: float, restarts: int) -> dict[str, float]:
    """Everything the trainer logs for one step: :func:`rollout_metrics`, the learner's numbers (per-modality
    KL renamed to ``4_kl/``), batch and group counts not already counted, timings, worker restarts."""
    m = rollout_metrics(trees, correct_threshold, rollout_s=rollout_s)
    m.update({_LEARNER_RENAMES.get(k, k): v for k, v in learn.items()})
    for stage in ("reason", "generate", "reflect", "refine"):  # beyond groups/<stage>/{total,zero_signal}
        for k in ("single_valid_groups", "all_failed_groups"):
            if groups.get(f"{stage}/{k}"):
                m[f"groups/{stage}/{k[:-7]}"] = float(groups[f"{stage}/{k}"])
    if "zero_signal_items" in groups:
        m["groups/zero_signal_items"] = float(groups["zero_signal_items"])
    m.update({"batch/items": float(batch.items), "batch/stale_refused": float(batch.stale_refused),
              "time/rollout_s": rollout_s, "time/learner_s": learner_s, "rollout/worker_restarts": float(restarts)})
    return m


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """TensorBoard scalars of an evaluation report (see :func:`r3_rl.eval.evaluate.summarise`)."""
    from r3_rl.eval.evaluate import reports_scores
    from r3_rl.eval.understanding import headline

    m = {f"{EVAL}/accuracy_round{r}": a for r, a in enumerate(report["accuracy"])}
    m.update({f"eval/accuracy_tag_mean/round{r}": a for r, a in enumerate(report.get("accuracy_tag_mean", []))})
    if reports_scores(report):  # a fractional eval reward (TIIF's share of questions right)
        m.update({f"eval/score_mean/round{r}": a for r, a in enumerate(report["score_mean"])})
    m[f"{EVAL}/stop_rate"] = report["stop_rate"]
    m.update({f"{EVAL}/{k}": v for k, v in headline(report).items()})
    for tag, vals in report["per_tag"].items():
        m.update({f"eval_tag/{tag}/round{r}": a for r, a in enumerate(vals)})
    for t in report["transitions"]:
        m.update({f"eval/round{t['round']}/{k}": float(t[k]) for k in ("improved", "worse", "unchanged")})
    for r, f in enumerate(report.get("failed", [])):
        m[f"eval/failed/round{r}"] = float(f)
    m["eval/mean_rounds_used"] = report["mean_rounds_used"]
    u = report.get("understanding") or {}
    for where, block in (("verdict", u.get("verdict")), ("reference", (u.get("reference") or {}).get("verdict"))):
        if not block:
            continue
        m.update({f"eval/{where}/{k}": block["overall"][k] for k in ("stop_on_correct", "edit_on_flawed")})
        if where == "verdict":
            m.update({f"eval/verdict/round{r}": v["balanced_accuracy"] for r, v in block["per_round"].items()})
            m.update({f"eval_tag/{tag}/verdict": v["balanced_accuracy"] for tag, v in block["per_tag"].items()})
    for kind, v in ((u.get("reference") or {}).get("per_kind") or {}).items():  # "flawed:add" -> .../flawed/add
        m[f"eval/reference/stop_rate/{kind.replace(':', '/')}"] = v["stop_rate"]
    return m
