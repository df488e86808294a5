"""Actors that may be lost with their node: placement with a timeout, bounded restarts, bounded waits.

Where it fits: rollout workers (:mod:`r3_rl.rollout.ray_engine`), reward actors
(:mod:`r3_rl.rollout.ray_rewards`) and learner ranks (:mod:`r3_rl.learner.ray_ranks`) are started,
called and replaced through these helpers, so none of them waits forever on an actor that died or that
no node can host.

Why this shape:
* An actor's ``__init__`` does nothing heavy; :meth:`ReadyActor.ready` answers as soon as the actor is
  placed and its process runs.  Placement is then bounded by ``ray.placement_timeout_s`` alone, and the
  expensive set-up (building a policy, loading reward models) by ``ray.call_timeout_s``: a big model that
  loads slowly is not mistaken for a missing node.
* A Ray actor queued for a node that does not exist stays ``PENDING_CREATION`` for ever, and one placed
  on a node that is dying (not yet marked dead) dies "before it ever ran" some seconds later: both are a
  failed attempt here, logged as failed, and the next attempt is made until ``attempts`` are spent.
* Events are logged after they happen: "restarted" only once the replacement has answered.

Gotchas: Ray needs some seconds (its GCS health checks) to mark a killed node dead; until then it may
place a replacement there, which is why a restart gets several attempts.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from r3_rl.errors import UserError
from r3_rl.ray_runtime import actor_died, kill_actors


class ClusterError(UserError):
    """The cluster cannot carry the run on (actors lost beyond what the recipe allows): one line, exit 2."""


class ActorLost(Exception):
    """An actor died, could not be placed, or did not answer in time; ``str(e)`` says which, in words."""


class ActorTimeout(ActorLost):
    """The actor did not answer in time (pending placement, hung, or on a node not yet known to be dead)."""


class Unplaced(ActorTimeout):
    """No node took the actor within the placement timeout."""


class ReadyActor:
    """Base of our actor classes: :meth:`ready` answers once the actor is placed and its process runs."""

    def ready(self) -> str:
        """The ID of the node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()


def first_line(e: BaseException) -> str:
    """``ErrorName: first line of the message``: what a log line can hold of a Ray error.

    An error raised inside an actor reaches us wrapped (``RayTaskError``); its ``cause`` is what happened.
    """
    e = getattr(e, "cause", None) or e
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def get_within(ref: Any, timeout_s: float, what: str) -> Any:
    """``ray.get(ref)``, or :class:`ActorLost` when its actor died or ``timeout_s`` passed (other errors propagate)."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(ref, timeout=max(0.0, timeout_s))
    except GetTimeoutError:
        raise ActorTimeout(f"{what} did not answer within {timeout_s:g} s") from None
    except Exception as e:
        if not actor_died(e):
            raise
        raise ActorLost(f"{what}: {first_line(e)}") from None


def unplaced_reason(need: dict[str, float]) -> str:
    """Why an actor needing ``need`` (e.g. ``{"CPU": 1}``) was not placed: the resource no node has free."""
    import ray

    free = ray.available_resources()  # pending actors hold nothing, so this is what is left for ours
    short = [f"{amount:g} free {name}" for name, amount in need.items() if amount > 0 and free.get(name, 0.0) < amount]
    return "no node has " + " and ".join(short) if short else "it was not placed"


def placed(actor: Any, need: dict[str, float]) -> bool:
    """Whether Ray has found ``actor`` a node (it may still be starting up there), as far as Ray tells.

    Placed: it has a worker process (GCS actor table), or no request shaped like ``need`` waits for
    resources (the cluster status ``ray status`` shows; a granted actor whose process is still starting
    is in neither).  Both are private or internal calls (Ray's public state API needs the dashboard);
    if one fails, the actor counts as not placed, which only makes the placement timeout stricter.
    """
    import ray

    try:
        from ray._private.state import actors
        from ray.autoscaler.v2.sdk import get_cluster_status

        if int(actors(actor._actor_id.hex()).get("Pid") or 0) > 0:
            return True
        shape = {k: float(v) for k, v in need.items() if v > 0}
        demand = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands.ray_task_actor_demand
        waiting = [{k: v for k, v in req.bundle.items() if v} for d in demand for req in d.bundles_by_count]
        return shape not in waiting
    except Exception:
        return False


def await_start(actor: Any, ref: Any, placement_deadline: float, start_deadline: float, need: dict[str, float]) -> str:
    """Wait for ``actor``'s ``ready()`` ``ref``: its node ID, or :class:`ActorLost` saying why not, in words.

    Placement must happen by ``placement_deadline`` (else :class:`Unplaced`); a placed actor then has
    until ``start_deadline`` to start (on a loaded machine importing torch alone takes seconds), so
    slowness is never taken for a missing node.  An actor that did not come up is killed.
    """
    try:
        try:
            return get_within(ref, placement_deadline - time.monotonic(), "it")
        except ActorTimeout:
            if not placed(actor, need):
                raise Unplaced(unplaced_reason(need)) from None  # before the kill: a pending actor holds nothing
        try:
            return get_within(ref, start_deadline - time.monotonic(), "it")
        except ActorTimeout:
            raise ActorTimeout("it was placed but did not start in time") from None
    except ActorTimeout:
        kill_actors([actor])
        raise
    except ActorLost as e:
        kill_actors([actor])
        raise ActorLost(f"it died while starting ({str(e).removeprefix('it: ')})") from None


def start_actors(factory: Callable[[int], Any], n: int, need: dict[str, float], placement_s: float,
                 start_s: float) -> list[tuple[Any, str] | ActorLost]:
    """Start ``n`` actors at once (``factory(k)`` makes the k-th); each is ``(actor, node_id)`` or why not.

    All share one deadline, so ``n`` actors take ``placement_s`` at worst, not ``n`` times it.  An actor
    that did not come up is killed (a pending one would otherwise be placed later, unused).
    """
    actors = [factory(k) for k in range(n)]
    refs = [a.ready.remote() for a in actors]
    now = time.monotonic()
    out: list[tuple[Any, str] | ActorLost] = []
    for actor, ref in zip(actors, refs):
        try:
            out.append((actor, await_start(actor, ref, now + placement_s, now + start_s, need)))
        except ActorLost as e:
            out.append(e)
    return out


class ActorGroup:
    """Numbered actors of one kind; one that is lost is replaced (bounded attempts) or, failing that, dropped.

    ``prepare(actor)`` returns the ref of the call that makes a fresh actor useful (load the current
    weights, build the reward models); it is waited for with ``call_timeout_s``.  Below ``min_alive``
    actors the run stops with a :class:`ClusterError`; at or above it, it carries on with fewer.
    """

    def __init__(self, kind: str, factory: Callable[[], Any], need: dict[str, float], ray_cfg: Any, attempts: int,
                 min_alive: int, log_event: Callable[[str], None]) -> None:
        self.kind, self.factory, self.need = kind, factory, need
        self.placement_timeout_s, self.call_timeout_s = ray_cfg.placement_timeout_s, ray_cfg.call_timeout_s
        self.attempts, self.min_alive, self.log_event = max(1, attempts), min_alive, log_event
        self.actors: dict[int, Any] = {}
        self.nodes: dict[int, str] = {}
        self.size = 0
        self.restarts = 0

    # ------------------------------------------------------------------ start
    def start(self, n: int, prepare: Callable[[Any], Any]) -> None:
        """Start ``n`` actors and prepare them; fewer than ``min_alive`` up is a :class:`ClusterError`."""
        self.size = n
        failed: dict[int, str] = {}
        for i, got in enumerate(start_actors(lambda _: self.factory(), n, self.need, self.placement_timeout_s,
                                             self.call_timeout_s)):
            if isinstance(got, ActorLost):
                failed[i] = f"{got} (waited {self.placement_timeout_s:g} s)" if isinstance(got, Unplaced) else str(got)
            else:
                self.actors[i], self.nodes[i] = got
        refs = {i: prepare(a) for i, a in self.actors.items()}
        deadline = time.monotonic() + self.call_timeout_s
        for i, ref in refs.items():
            try:
                get_within(ref, deadline - time.monotonic(), "its set-up")
            except ActorLost as e:
                failed[i] = str(e)
                self._drop(i)
        if failed:
            i, why = min(failed.items())
            msg = f"{self.kind} {i} could not be started: {why}"
            if len(self.actors) < self.min_alive:
                self.close()
                raise ClusterError(msg)
            self.log_event(f"{msg}; continuing with {len(self.actors)} of {n} {self.kind}s")

    # ------------------------------------------------------------------ restart
    def replace(self, i: int, why: str, prepare: Callable[[Any], Any], detail: str = "") -> bool:
        """Replace lost actor ``i``: True once a fresh one answered; False if dropped (the group carries on)."""
        self.log_event(f"{self.kind} {i} lost ({why})")
        self._drop(i)
        t0, reason = time.monotonic(), ""
        for attempt in range(1, self.attempts + 1):
            try:
                actor, node = self._start_one(prepare)
            except ActorLost as e:
                reason = str(e)
                self.log_event(f"{self.kind} {i}: restart attempt {attempt}/{self.attempts} failed: {reason}")
                continue
            self.actors[i], self.nodes[i] = actor, node
            self.restarts += 1
            self.log_event(f"{self.kind} {i} restarted{detail} on node {node[:8]} "
                           f"({time.monotonic() - t0:.1f} s, attempt {attempt}/{self.attempts})")
            return True
        msg = (f"{self.kind} {i} could not be restarted: {reason} ({self.attempts} attempt"
               f"{'s' if self.attempts > 1 else ''}, {self.placement_timeout_s:g} s each)")
        if len(self.actors) < self.min_alive:
            raise ClusterError(msg)  # the trainer logs it as why the run stopped
        self.log_event(f"{msg}; continuing with {len(self.actors)} of {self.size} {self.kind}s")
        return False

    def _start_one(self, prepare: Callable[[Any], Any]) -> tuple[Any, str]:
        (got,) = start_actors(lambda _: self.factory(), 1, self.need, self.placement_timeout_s,
                                self.call_timeout_s)
        if isinstance(got, ActorLost):
            raise got
        actor, node = got
        try:
            get_within(prepare(actor), self.call_timeout_s, "it")
        except ActorLost as e:
            kill_actors([actor])
            raise ActorLost(f"it was lost while starting ({str(e).removeprefix('it: ')})") from None
        return actor, node

    def _drop(self, i: int) -> None:
        kill_actors([self.actors.pop(i)] if i in self.actors else [])
        self.nodes.pop(i, None)

    # ------------------------------------------------------------------ misc
    def items(self) -> Iterable[tuple[int, Any]]:
        return list(self.actors.items())

    def describe(self) -> str:
        """``worker 0 on node 1a2b3c4d, worker 1 on node ...``: where each actor runs, for the events log."""
        return ", ".join(f"{self.kind.split()[-1]} {i} on node {n[:8]}" for i, n in sorted(self.nodes.items()))

    def close(self) -> None:
        kill_actors(list(self.actors.values()))
        self.actors, self.nodes = {}, {}
