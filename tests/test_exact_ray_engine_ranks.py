"""Exact checks of the Ray edge without starting Ray: weight packing, actor start/replace bookkeeping, the rollout
engine's in-flight queue, reward-actor scoring, the learner ranks' merge/hang handling and the GPU layout.

Every ``ray`` call the code makes is replaced by a fake, so each test runs in milliseconds; expected values are
written out by hand (bf16 bit patterns, deadlines, messages)."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from r3_rl.config import RayCfg
from r3_rl.errors import UserError


# ============================================================================ ray_runtime: pack / unpack
def test_pack_state_names_the_dtype_and_keeps_the_raw_bf16_bits() -> None:
    """A dtype name stored as ".bfloat16" or values cast to uint8 instead of viewed as bytes."""
    from r3_rl.ray_runtime import pack_state, unpack_state

    # bf16 1.0 = 0x3F80, -2.5 = 0xC020; little-endian bytes
    packed = pack_state({"w": torch.tensor([1.0, -2.5], dtype=torch.bfloat16)})
    name, shape, data = packed["w"]
    assert (name, shape, data.tolist()) == ("bfloat16", (2,), [0x80, 0x3F, 0x20, 0xC0])
    # int16 [[1, 2], [3, 4]] transposed: logical order 1, 3, 2, 4
    name, shape, data = pack_state({"t": torch.tensor([[1, 2], [3, 4]], dtype=torch.int16).t()})["t"]
    assert (name, shape, data.tolist()) == ("int16", (2, 2), [1, 0, 3, 0, 2, 0, 4, 0])
    back = unpack_state(packed)["w"]
    assert back.dtype == torch.bfloat16 and back.tolist() == [1.0, -2.5]


@pytest.mark.parametrize("name", ["Tensor", "save", "load", "nn", "__builtins__", "no_such_dtype"])
def test_unpack_state_refuses_any_name_that_is_not_a_torch_dtype(name: str) -> None:
    """The dtype check loosened to ``is None``: a torch function name would reach ``view``."""
    import numpy as np

    from r3_rl.ray_runtime import unpack_state

    with pytest.raises(ValueError, match=rf"^state entry 'w': '{name}' is not a torch dtype$"):
        unpack_state({"w": (name, (1,), np.zeros(4, np.uint8))})


def test_unpack_state_of_an_empty_tensor_keeps_its_shape() -> None:
    """An empty entry must come back as an empty tensor of its dtype and shape (numpy's size-0 special case)."""
    import numpy as np

    from r3_rl.ray_runtime import unpack_state

    out = unpack_state({"e": ("float32", (0, 7), np.zeros(0, np.uint8))})["e"]
    assert out.dtype == torch.float32 and tuple(out.shape) == (0, 7)


# ============================================================================ ray_runtime: start / kill
def _fake_init(monkeypatch, fail: BaseException | None = None) -> dict:
    import ray

    seen: dict = {}

    def init(**kw):
        seen.update(kw, visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
        if fail is not None:
            raise fail
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return seen


def test_start_ray_sizes_the_store_in_decimal_gb_and_restores_a_set_cuda_visible_devices(monkeypatch) -> None:
    """object_store_gb in GiB, or the trainer's own CUDA_VISIBLE_DEVICES dropped after a restricted start."""
    from r3_rl.ray_runtime import start_ray

    seen = _fake_init(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    assert start_ray(RayCfg(num_cpus=2, object_store_gb=1.5), ["6", "7"]) is True
    assert seen["object_store_memory"] == 1_500_000_000 and seen["num_gpus"] == 2 and seen["visible"] == "6,7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6,7"


def test_start_ray_failure_is_one_line_and_spots_token_auth_in_the_cause(monkeypatch) -> None:
    """The token-auth hint must look at the error's cause too (Ray wraps the Authentication error)."""
    from r3_rl.ray_runtime import start_ray

    err = ConnectionError("could not connect\nlong traceback")
    err.__cause__ = RuntimeError("Authentication failed: no token")
    _fake_init(monkeypatch, err)
    with pytest.raises(UserError) as got:
        start_ray(RayCfg(address="10.0.0.9:6379"))
    assert str(got.value) == ("ray.address: cannot join '10.0.0.9:6379' (could not connect); the cluster uses token "
                              "authentication: set RAY_AUTH_MODE=token with its token in ~/.ray/auth_token")
    _fake_init(monkeypatch, RuntimeError("no room"))
    with pytest.raises(UserError, match=r"^ray: cannot start a local Ray \(no room\); start one with `ray start "):
        start_ray(RayCfg())


def test_kill_actors_kills_without_restart_and_past_one_that_is_gone(monkeypatch) -> None:
    """``no_restart=False`` would let Ray bring a killed actor back with its initial weights."""
    import ray

    from r3_rl.ray_runtime import kill_actors

    calls: list = []

    def kill(actor, no_restart):
        calls.append((actor, no_restart))
        if actor == "gone":
            raise ValueError("already dead")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "kill", kill)
    kill_actors(["gone", "b"])
    assert calls == [("gone", True), ("b", True)]


# ============================================================================ ray_actors
def test_get_within_clamps_a_past_deadline_and_sorts_errors(monkeypatch) -> None:
    """A negative timeout reaches ray.get, or a bug in an actor is taken for a lost actor (or vice versa)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    import r3_rl.ray_actors as ra

    timeouts: list[float] = []
    outcome: dict = {}

    def get(ref, timeout):
        timeouts.append(timeout)
        if "raise" in outcome:
            raise outcome["raise"]
        return "value"
    monkeypatch.setattr(ray, "get", get)
    assert ra.get_within("ref", -3.0, "x") == "value" and timeouts == [0.0]
    outcome["raise"] = ValueError("a bug")
    with pytest.raises(ValueError, match="^a bug$"):
        ra.get_within("ref", 5, "x")
    outcome["raise"] = RayActorError()
    with pytest.raises(ra.ActorLost) as lost:
        ra.get_within("ref", 5, "loading")
    assert str(lost.value) == "loading: RayActorError: The actor experienced an error before finishing this task."
    outcome["raise"] = GetTimeoutError("slow")
    with pytest.raises(ra.ActorTimeout, match=r"^scoring did not answer within 2.5 s$"):
        ra.get_within("ref", 2.5, "scoring")


def _patch_placed(monkeypatch, pid, demand_shapes: list[dict]) -> None:
    import ray
    from ray._private import state
    from ray.autoscaler.v2 import sdk

    monkeypatch.setattr(state, "actors", lambda actor_id: {"Pid": pid})
    bundles = [SimpleNamespace(bundle=b) for b in demand_shapes]
    status = SimpleNamespace(resource_demands=SimpleNamespace(
        ray_task_actor_demand=[SimpleNamespace(bundles_by_count=bundles)]))
    monkeypatch.setattr(sdk, "get_cluster_status", lambda address: status)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="gcs"))


def test_placed_uses_the_pid_then_the_waiting_demand(monkeypatch) -> None:
    """Pid 0 counted as a process, or the demand test inverted: a pending actor taken for a placed one."""
    from r3_rl.ray_actors import placed

    actor = SimpleNamespace(_actor_id=SimpleNamespace(hex=lambda: "ab12"))
    _patch_placed(monkeypatch, 0, [{"CPU": 1.0, "GPU": 0.0}])
    assert placed(actor, {"CPU": 1, "GPU": 0}) is False  # a request shaped like ours waits
    _patch_placed(monkeypatch, None, [{"CPU": 4.0}])
    assert placed(actor, {"CPU": 1, "GPU": 0}) is True  # granted, its process still starting
    _patch_placed(monkeypatch, 4321, [{"CPU": 1.0}])
    assert placed(actor, {"CPU": 1}) is True


class _Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def monotonic(self) -> float:
        return self.t


def test_await_start_gives_a_placed_actor_the_start_deadline_and_kills_a_late_one(monkeypatch) -> None:
    """The second wait must run to ``start_deadline``; an actor that never started is killed; messages exact."""
    import r3_rl.ray_actors as ra

    clock, waits, killed = _Clock(), [], []
    monkeypatch.setattr(ra, "time", clock)
    monkeypatch.setattr(ra, "placed", lambda actor, need: True)
    monkeypatch.setattr(ra, "kill_actors", lambda actors: killed.extend(actors))

    def late(ref, timeout_s, what):
        waits.append(timeout_s)
        raise ra.ActorTimeout("t")
    monkeypatch.setattr(ra, "get_within", late)
    with pytest.raises(ra.ActorTimeout, match=r"^it was placed but did not start in time$"):
        ra.await_start("act", "ref", 1005.0, 1050.0, {"CPU": 1})
    assert waits == [5.0, 50.0] and killed == ["act"]

    def dies(ref, timeout_s, what):
        raise ra.ActorLost("it: RayActorError: node gone")
    killed.clear()
    monkeypatch.setattr(ra, "get_within", dies)
    with pytest.raises(ra.ActorLost, match=r"^it died while starting \(RayActorError: node gone\)$"):
        ra.await_start("act", "ref", 1005.0, 1050.0, {"CPU": 1})
    assert killed == ["act"]


def test_start_actors_share_one_placement_and_one_start_deadline(monkeypatch) -> None:
    """The start deadline taken as ``now + placement_s``: a slow-loading actor taken for a missing node."""
    import r3_rl.ray_actors as ra

    clock, seen = _Clock(), []
    monkeypatch.setattr(ra, "time", clock)
    monkeypatch.setattr(ra, "await_start", lambda a, ref, p, s, need: seen.append((a.k, p, s)) or f"node{a.k}")

    def factory(k):
        return SimpleNamespace(k=k, ready=SimpleNamespace(remote=lambda: f"ref{k}"))
    out = ra.start_actors(factory, 2, {"CPU": 1}, 5.0, 60.0)
    assert seen == [(0, 1005.0, 1060.0), (1, 1005.0, 1060.0)]
    assert [node for _, node in out] == ["node0", "node1"]


def _group(monkeypatch, started, attempts=1, min_alive=1, fail_prepare=(), tick=0.0):
    """An ActorGroup (placement 5 s, call 50 s) whose starts, waits and kills are recorded; each wait advances the
    clock (``rec.clock``) by ``tick`` s."""
    import r3_rl.ray_actors as ra

    rec = SimpleNamespace(events=[], killed=[], timeouts=[], clock=_Clock())
    monkeypatch.setattr(ra, "time", rec.clock)
    monkeypatch.setattr(ra, "start_actors", lambda factory, n, need, placement_s, start_s: [next(started) for _ in range(n)])

    def get_within(ref, timeout_s, what):
        rec.timeouts.append(timeout_s)
        rec.clock.t += tick
        if ref in fail_prepare:
            raise ra.ActorLost(f"it: RayActorError: {ref} died")
    monkeypatch.setattr(ra, "get_within", get_within)
    monkeypatch.setattr(ra, "kill_actors", lambda actors: rec.killed.extend(actors))
    g = ra.ActorGroup("rollout worker", lambda: None, {"CPU": 1}, RayCfg(placement_timeout_s=5, call_timeout_s=50),
                      attempts=attempts, min_alive=min_alive, log_event=rec.events.append)
    return g, rec


def test_group_start_says_how_long_an_unplaced_actor_was_waited_for_and_drops_a_failed_set_up(monkeypatch) -> None:
    """Unplaced failures lose their "(waited N s)"; set-up waits get the placement timeout; a failed set-up
    leaves its actor in the group."""
    import r3_rl.ray_actors as ra

    started = iter([ra.Unplaced("no node has 1 free GPU"), ("a1", "node-1"), ("a2", "node-2")])
    g, rec = _group(monkeypatch, started, min_alive=1, fail_prepare={"prep-a2"})
    g.start(3, prepare=lambda actor: f"prep-{actor}")
    assert rec.timeouts == [50.0, 50.0]
    assert g.actors == {1: "a1"} and g.nodes == {1: "node-1"} and rec.killed == ["a2"]
    assert rec.events == [("rollout worker 0 could not be started: no node has 1 free GPU (waited 5 s); continuing "
                           "with 1 of 3 rollout workers")]


def test_replace_kills_the_lost_actor_and_drops_the_slot_at_exactly_min_alive(monkeypatch) -> None:
    """The lost actor left running, ``<=`` min_alive stopping the run, "1 attempts"."""
    import r3_rl.ray_actors as ra

    started = iter([ra.Unplaced("no node has 64 free CPU")])
    g, rec = _group(monkeypatch, started, attempts=1, min_alive=1)
    g.actors, g.nodes, g.size = {0: "old", 1: "other"}, {0: "n0", 1: "n1"}, 2
    assert g.replace(0, "its node died", prepare=lambda actor: "ref") is False
    assert rec.killed == ["old"] and g.actors == {1: "other"} and g.restarts == 0
    assert rec.events == [
        "rollout worker 0 lost (its node died)",
        "rollout worker 0: restart attempt 1/1 failed: no node has 64 free CPU",
        ("rollout worker 0 could not be restarted: no node has 64 free CPU (1 attempt, 5 s each); continuing with 1 "
         "of 2 rollout workers")]


def test_a_replacement_whose_set_up_fails_is_killed_and_the_next_attempt_made(monkeypatch) -> None:
    """A fresh actor whose weight load failed would be left running, unused."""
    started = iter([("bad", "node-bad"), ("good", "node-good1234")])
    g, rec = _group(monkeypatch, started, attempts=2, min_alive=1, fail_prepare={"prep-bad"})
    g.actors, g.nodes, g.size = {0: "old"}, {0: "n0"}, 1
    assert g.replace(0, "lost", prepare=lambda actor: f"prep-{actor}", detail=" with policy version 7") is True
    assert rec.killed == ["old", "bad"] and g.actors == {0: "good"} and g.restarts == 1
    assert rec.events[1] == ("rollout worker 0: restart attempt 1/2 failed: it was lost while starting "
                             "(RayActorError: prep-bad died)")
    assert rec.events[2] == "rollout worker 0 restarted with policy version 7 on node node-goo (0.0 s, attempt 2/2)"


def test_describe_lists_actors_by_slot() -> None:
    """Slots listed in insertion order (a replaced slot 0 after slot 1) instead of by number."""
    from r3_rl.ray_actors import ActorGroup

    g = ActorGroup("reward worker", lambda: None, {}, RayCfg(), attempts=1, min_alive=1, log_event=print)
    g.nodes = {1: "bbbbbbbbXX", 0: "aaaaaaaaYY"}
    assert g.describe() == "worker 0 on node aaaaaaaa, worker 1 on node bbbbbbbb"


# ============================================================================ ray_engine: weights
class _Policy:
    def __init__(self, trainable_bytes: int, total_bytes: int, version: int = 3) -> None:
        self.trainable_bytes, self.total_bytes, self.version = trainable_bytes, total_bytes, version

    def weight_nbytes(self, trainable_only: bool = False) -> int:
        return self.trainable_bytes if trainable_only else self.total_bytes

    def state_dict(self) -> dict:
        return {"base": torch.zeros(2), "lora": torch.ones(1)}

    def trainable_state_dict(self) -> dict:
        return {"lora": torch.ones(1)}


def _engine(monkeypatch):
    import ray

    from r3_rl.rollout.ray_engine import RayEngine

    puts: list[list[str]] = []
    monkeypatch.setattr(ray, "put", lambda obj: puts.append(sorted(obj)) or f"ref{len(puts)}")
    e = RayEngine.__new__(RayEngine)
    e._full, e._full_id, e._update = None, -1, None
    return e, puts


def test_put_sends_an_update_at_exactly_half_and_numbers_every_full_state(monkeypatch) -> None:
    """``<`` at the half boundary, an update with no full state before it, the full id not advanced, or a stale
    update kept beside a new full state."""
    e, puts = _engine(monkeypatch)
    e._put(_Policy(5, 10, version=1), trainable_only=True)  # nothing full put yet: a full state, not an update
    assert (e._full, e._full_id, e._update, e._version) == ("ref1", 0, None, 1) and puts == [["base", "lora"]]
    e._put(_Policy(5, 10, version=2), trainable_only=True)  # exactly half: the update travels alone
    assert (e._full, e._full_id, e._update, e._version) == ("ref1", 0, "ref2", 2) and puts[-1] == ["lora"]
    e._put(_Policy(6, 10, version=3), trainable_only=True)  # over half: a new full state, the update dropped
    assert (e._full, e._full_id, e._update, e._version) == ("ref3", 1, None, 3) and puts[-1] == ["base", "lora"]


class _Worker:
    def __init__(self, name: str) -> None:
        self.name, self.sent = name, []
        self.run = SimpleNamespace(remote=lambda task, sampling: self._send(task))
        self.load = SimpleNamespace(remote=lambda full, full_id, update, version: f"load-{self.name}")

    def _send(self, task) -> str:
        self.sent.append(task)
        return f"{self.name}:{task}"


def test_sync_replaces_a_worker_that_died_between_steps(monkeypatch) -> None:
    """A worker lost while loading must be replaced (it would else keep sampling with no weights or be dropped)."""
    import r3_rl.rollout.ray_engine as re_mod
    from r3_rl.ray_actors import ActorLost

    e, _ = _engine(monkeypatch)
    a, b = _Worker("a"), _Worker("b")
    e.group = SimpleNamespace(items=lambda: [(0, a), (1, b)])
    e.call_timeout_s = 30.0
    replaced: list = []
    e._replace = lambda i, why: replaced.append((i, why))

    def get_within(ref, timeout_s, what):
        if ref == "load-b":
            raise ActorLost("loading the weights: RayActorError: gone")
    monkeypatch.setattr(re_mod, "get_within", get_within)
    e.sync(_Policy(1, 10))
    assert replaced == [(1, "loading the weights: RayActorError: gone")]


def test_worker_load_fetches_the_full_state_once_then_applies_updates_partially(monkeypatch) -> None:
    """The full state reloaded for every update, an update loaded as a whole state, or the version not stamped."""
    import numpy as np
    import ray

    from r3_rl.rollout.ray_engine import RolloutWorker

    fetched, loads = [], []
    monkeypatch.setattr(ray, "get", lambda ref: fetched.append(ref) or {"w": ("float32", (1,), np.zeros(4, np.uint8))})
    w = RolloutWorker({}, 0)
    w.policy = SimpleNamespace(version=0, load_state_dict=lambda state, partial=False: loads.append((sorted(state),
                                                                                                     partial)))
    upd = {"lora": ("float32", (1,), np.zeros(4, np.uint8))}
    assert w.load(["full0"], 0, None, 1) == 1 and w.policy.version == 1
    assert w.load(["full0"], 0, upd, 2) == 2 and w.policy.version == 2
    assert w.load(["full1"], 1, upd, 5) == 5 and w.policy.version == 5
    assert fetched == ["full0", "full1"]
    assert loads == [(["w"], False), (["lora"], True), (["w"], False), (["lora"], True)]


# ============================================================================ ray_engine: the in-flight queue
def _running_engine(monkeypatch, workers: dict, max_reissues=1, timeout=100.0):
    import ray

    import r3_rl.rollout.ray_engine as re_mod
    from r3_rl.rollout.ray_engine import RayEngine

    clock = _Clock(0.0)
    monkeypatch.setattr(re_mod, "time", clock)
    monkeypatch.setattr(ray, "put", lambda obj: "sampling-ref")
    e = RayEngine.__new__(RayEngine)
    e.group = SimpleNamespace(actors=dict(workers), items=lambda: list(e.group.actors.items()))
    e.max_reissues, e.call_timeout_s, e.events = max_reissues, timeout, []
    e.log_event = e.events.append
    return e, clock


def test_send_queues_a_second_task_only_while_every_worker_gets_one() -> None:
    """``<=`` in the tail rule (4 tasks on 2 workers must queue 2 each)."""
    from collections import deque

    from r3_rl.rollout.ray_engine import RayEngine

    a, b = _Worker("a"), _Worker("b")
    e = RayEngine.__new__(RayEngine)
    e.group = SimpleNamespace(actors={0: a, 1: b}, items=lambda: [(0, a), (1, b)])
    pending: dict = {}
    e._send(deque([1, 2, 3, 4]), pending, "s")
    assert a.sent == [1, 3] and b.sent == [2, 4]
    a.sent, b.sent, pending = [], [], {}
    queue = deque([1, 2, 3])
    e._send(queue, pending, "s")
    assert a.sent == [1] and b.sent == [2] and list(queue) == [3]  # the tail task waits for whichever ends first


def test_send_gives_the_idle_worker_the_task_and_ignores_tasks_of_a_lost_actor() -> None:
    """``load <= depth`` (a busy worker takes the task while another idles); tasks of a replaced actor counted."""
    from collections import deque

    from r3_rl.rollout.ray_engine import RayEngine, _InFlight

    a, b = _Worker("a"), _Worker("b")
    e = RayEngine.__new__(RayEngine)
    e.group = SimpleNamespace(actors={0: a, 1: b}, items=lambda: [(0, a), (1, b)])
    pending = {"r0": _InFlight(0, a, "t0", 0.0)}
    e._send(deque(["t1"]), pending, "s")
    assert a.sent == [] and b.sent == ["t1"]
    old = _Worker("old")  # slot 0's previous actor: its task holds no place on the replacement
    pending = {"r0": _InFlight(0, old, "t0", 0.0)}
    e._send(deque(["t1", "t2"]), pending, "s")
    assert a.sent == ["t1"] and b.sent == ["t1", "t2"]


class _T:
    """A rollout task as the engine reads it (``index``, ``step``); ``str`` names it in the fake refs."""

    def __init__(self, index: int, step: int = 4) -> None:
        self.index, self.step = index, step

    def __str__(self) -> str:
        return f"t{self.index}"


def _scripted_wait(monkeypatch, clock, script, waits):
    import ray

    def wait(refs, num_returns, timeout):
        waits.append((clock.t, timeout))
        clock.t, ref = next(script)
        assert ref in refs
        return [ref], [r for r in refs if r != ref]
    monkeypatch.setattr(ray, "wait", wait)


def test_run_restarts_a_queued_tasks_clock_when_the_task_ahead_ends(monkeypatch) -> None:
    """A queued task's timeout clock left at its send time: a slow first task makes the second time out early."""
    import r3_rl.rollout.ray_engine as re_mod

    e, clock = _running_engine(monkeypatch, {0: _Worker("a")})
    waits: list = []
    _scripted_wait(monkeypatch, clock, iter([(30.0, "a:t1"), (45.0, "a:t2")]), waits)
    monkeypatch.setattr(re_mod, "get_within", lambda ref, timeout_s, what: [f"trees of {ref}"])
    clock.t = 10.0
    got = [(t.index, trees) for t, trees in e.run([_T(1), _T(2)], "sampling")]
    assert got == [(1, ["trees of a:t1"]), (2, ["trees of a:t2"])]
    # both sent at 10: the first wait runs to 10 + 100; t2's clock starts when t1 ends (30): 30 + 100 - 30
    assert waits == [(10.0, 100.0), (30.0, 100.0)]


def test_run_waits_until_the_oldest_in_flight_task_times_out(monkeypatch) -> None:
    """The wait measured from the newest task (``max`` for ``min``): a hung task outlives its timeout."""
    import r3_rl.rollout.ray_engine as re_mod

    e, clock = _running_engine(monkeypatch, {0: _Worker("a"), 1: _Worker("b")})
    waits: list = []
    _scripted_wait(monkeypatch, clock, iter([(30.0, "a:t1"), (40.0, "b:t2"), (50.0, "a:t3")]), waits)
    monkeypatch.setattr(re_mod, "get_within", lambda ref, timeout_s, what: [ref])
    clock.t = 10.0
    assert [t.index for t, _ in e.run([_T(1), _T(2), _T(3)], "sampling")] == [1, 2, 3]
    # t1, t2 sent at 10 (t3 waits: one task left for two workers); t3 sent at 30 to a; oldest then t2 (10)
    assert waits == [(10.0, 100.0), (30.0, 80.0), (40.0, 90.0)]


def test_run_reissues_up_to_max_task_retries_and_replaces_a_lost_worker_once(monkeypatch) -> None:
    """``>=`` on the reissue limit, or a second loss report replacing the fresh replacement too."""
    import ray

    import r3_rl.rollout.ray_engine as re_mod
    from r3_rl.ray_actors import ActorLost, ClusterError

    a, fresh = _Worker("a"), _Worker("fresh")
    e, _ = _running_engine(monkeypatch, {0: a}, max_reissues=1)
    replaced: list = []

    def replace(slot, why):
        replaced.append((slot, why))
        e.group.actors[slot] = fresh
        return True
    e._replace = replace
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: ([refs[0]], refs[1:]))

    def get_within(ref, timeout_s, what):
        if ref.startswith("a:"):
            raise ActorLost(f"{what}: RayActorError: gone")
        return [ref]
    monkeypatch.setattr(re_mod, "get_within", get_within)
    got = [(t.index, trees) for t, trees in e.run([_T(1), _T(2)], "sampling")]
    assert got == [(1, ["fresh:t1"]), (2, ["fresh:t2"])]
    assert replaced == [(0, "task 1 of step 4: RayActorError: gone")]
    assert [str(t) for t in a.sent] == ["t1", "t2"] and [str(t) for t in fresh.sent] == ["t1", "t2"]
    assert e.events == ["reissued task 1 of step 4", "reissued task 2 of step 4"]

    # a task lost twice with max_task_retries=1 stops the run
    e2, _ = _running_engine(monkeypatch, {0: _Worker("a")}, max_reissues=1)
    e2._replace = lambda slot, why: True  # the slot keeps its dead actor
    with pytest.raises(ClusterError, match=r"^rollout: task 0 of step 4 lost its worker 2 times "
                                           r"\(rollout.max_task_retries=1\); last: task 0 of step 4: RayActorError"):
        list(e2.run([_T(0)], "sampling"))


# ============================================================================ ray_rewards
def _reward_set(monkeypatch, lost: set[str]):
    import r3_rl.rollout.ray_rewards as rr
    from r3_rl.ray_actors import ActorLost
    from r3_rl.rewards.reward_set import ScoredSample

    class Scorer:
        def __init__(self, name: str) -> None:
            self.name = name
            self.score = SimpleNamespace(remote=lambda chunk: (self.name, list(chunk)))

    def get_within(ref, timeout_s, what):
        name, chunk = ref
        if name in lost:
            raise ActorLost(f"{what}: RayActorError: gone")
        return [ScoredSample(total=float(s)) for s in chunk]
    monkeypatch.setattr(rr, "get_within", get_within)
    s = rr.RayRewardSet.__new__(rr.RayRewardSet)
    s.call_timeout_s, s.replaced = 60.0, []
    actors = [(0, Scorer("x")), (1, Scorer("y"))]
    s.group = SimpleNamespace(items=lambda: actors, replace=lambda i, why, prepare: s.replaced.append((i, why)))
    return s


def test_reward_scores_come_back_in_sample_order_across_actors(monkeypatch) -> None:
    """Strided chunks written back with the wrong index: a sample gets another sample's reward."""
    s = _reward_set(monkeypatch, lost=set())
    assert [r.total for r in s.score([10, 11, 12, 13, 14])] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert s.score([]) == []


def test_a_lost_reward_actor_gives_failures_never_zeros(monkeypatch) -> None:
    """Lost samples scored 0.0 (a reward the learner would train on) instead of failed."""
    s = _reward_set(monkeypatch, lost={"y"})
    out = s.score([10, 11, 12, 13, 14])
    assert [r.total for r in out] == [10.0, None, 12.0, None, 14.0]
    assert out[1].failures == {"reward_worker": "reward actor lost (scoring: RayActorError: gone)"}
    assert s.replaced == [(1, "scoring: RayActorError: gone; its 2 samples are marked failed")]


def test_reward_actors_without_a_gpu_see_none_and_one_left_is_enough(monkeypatch) -> None:
    """CUDA_VISIBLE_DEVICES="" given to GPU actors instead of GPU-less ones, or min_alive not 1."""
    import ray

    import r3_rl.rollout.ray_rewards as rr

    options: list[dict] = []
    groups: list[dict] = []

    class Group:
        def __init__(self, kind, factory, need, ray_cfg, attempts, min_alive, log_event):
            groups.append({"kind": kind, "need": need, "attempts": attempts, "min_alive": min_alive})
            self.actors = {}

        def start(self, n, prepare):
            pass

        def describe(self):
            return ""
    monkeypatch.setattr(rr, "RewardSet", SimpleNamespace(from_specs=lambda specs: SimpleNamespace(needs_policy=False)))
    monkeypatch.setattr(rr, "ActorGroup", Group)
    monkeypatch.setattr(ray, "remote", lambda cls: SimpleNamespace(options=lambda **kw: options.append(kw)))
    rr.RayRewardSet([], workers=2, threads=1, log_event=lambda e: None)
    rr.RayRewardSet([], workers=2, threads=1, log_event=lambda e: None, gpus=0.5, attempts=4)
    assert options == [
        {"num_cpus": 1, "num_gpus": 0.0, "max_restarts": 0, "max_task_retries": 0,
         "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}},
        {"num_cpus": 1, "num_gpus": 0.5, "max_restarts": 0, "max_task_retries": 0}]
    assert groups == [{"kind": "reward worker", "need": {"CPU": 1, "GPU": 0.0}, "attempts": 3, "min_alive": 1},
                      {"kind": "reward worker", "need": {"CPU": 1, "GPU": 0.5}, "attempts": 4, "min_alive": 1}]


# ============================================================================ ray_ranks
def test_unseen_files_flags_a_file_bigger_than_reported(tmp_path: Path) -> None:
    """Only a smaller file counted as not seen (``<`` for ``!=``)."""
    from r3_rl.learner.ray_ranks import unseen_files

    (tmp_path / "a.pt").write_bytes(b"x" * 12)
    assert unseen_files(tmp_path, [{"a.pt": 12}, {"a.pt": 10}]) == [(1, "a.pt")]


def test_merge_adds_losses_and_weights_means_by_counts() -> None:
    """Losses averaged over ranks, or a mean without counts weighted as if each rank had one micro-batch."""
    from r3_rl.learner.ray_ranks import _merge

    merged = _merge([{"learner/loss": 1.5, "learner/kl_mean": 2.0, "learner/grad_norm": 1.0, "learner/ratio_min": 0.5},
                     {"learner/loss": 2.5, "learner/kl_mean": 6.0, "learner/grad_norm": 3.0, "learner/ratio_min": 0.25}],
                    [{"learner/kl_mean": 3, "learner/grad_norm": 0}, {"learner/kl_mean": 1}])
    assert merged == {"learner/loss": 4.0, "learner/kl_mean": 3.0, "learner/grad_norm": 2.0, "learner/ratio_min": 0.25}
    # counts only on one rank: the other rank's value carries no weight
    assert _merge([{"m": 1.0}, {"m": 9.0}], [{"m": 2}, {}]) == {"m": 1.0}


def _ranked(monkeypatch, nodes: list[str]):
    import r3_rl.learner.ray_ranks as rk

    monkeypatch.setattr(rk, "kill_actors", lambda actors: None)
    monkeypatch.setattr(rk, "stop_ray", lambda owned: False)
    lr = rk.RankedLearner.__new__(rk.RankedLearner)
    lr.ranks, lr.nodes, lr.call_timeout_s, lr._owns_ray = ["r0", "r1", "r2"], nodes, 300.0, False
    return lr


def test_dead_rank_is_the_first_rank_on_a_node_marked_dead(monkeypatch) -> None:
    """A node without an ``Alive`` field taken for dead."""
    import ray

    lr = _ranked(monkeypatch, ["n1", "n2", "n3"])
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "n1", "Alive": True}, {"NodeID": "n2"},
                                               {"NodeID": "n3", "Alive": False}])
    assert lr._dead_rank() == 2


def test_a_failed_rank_gives_its_peers_at_most_a_minute_then_names_the_lowest_silent_rank(monkeypatch) -> None:
    """Grace as ``max(call_timeout, 60)``, or the highest silent rank named."""
    import ray

    import r3_rl.learner.ray_ranks as rk
    from r3_rl.ray_actors import ClusterError

    lr = _ranked(monkeypatch, ["n0", "n1", "n2"])
    clock, waits = _Clock(0.0), []
    monkeypatch.setattr(rk, "time", clock)
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": n, "Alive": True} for n in ("n0", "n1", "n2")])

    def wait(refs, num_returns, timeout):
        waits.append(clock.t)
        clock.t += timeout
        return (["ref2"], []) if "ref2" in refs else ([], refs)
    monkeypatch.setattr(ray, "wait", wait)

    def get(ref, timeout):
        raise ValueError("bad batch\nTraceback")
    monkeypatch.setattr(ray, "get", get)
    with pytest.raises(ClusterError) as got:
        lr._all(["ref0", "ref1", "ref2"], "learner step")
    assert str(got.value) == ("learner rank 0 did not answer during the learner step while another rank failed "
                              "(ValueError: bad batch); the learner step was abandoned and the ranks stopped")
    assert len(waits) == 61 and clock.t == 61.0  # the failure at 1 s, then 60 s of grace


def test_a_rank_bug_propagates_unchanged_when_every_rank_answered(monkeypatch) -> None:
    """With every rank answered, a rank's own error is a bug, re-raised as is (not a cluster stop)."""
    import ray

    lr = _ranked(monkeypatch, ["n0", "n1", "n2"])
    monkeypatch.setattr(ray, "nodes", list)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: (list(refs), []))

    def get(ref, timeout):
        if ref == "ref1":
            raise KeyError("missing")
        return ref
    monkeypatch.setattr(ray, "get", get)
    with pytest.raises(KeyError):
        lr._all(["ref0", "ref1", "ref2"], "checkpoint save")


def test_load_passes_the_checkpoint_reference_file_beside_the_learner_folder(tmp_path: Path, monkeypatch) -> None:
    """The reference looked for inside the learner folder (it is saved in ``state/``, beside it)."""
    import numpy as np

    lr = _ranked(monkeypatch, ["n0"])
    calls: list = []
    lr.ranks = [SimpleNamespace(load=SimpleNamespace(remote=lambda path, ref: calls.append((path, ref)) or "ref"),
                                weights=SimpleNamespace(remote=lambda: "wref"))]
    lr._all = lambda refs, what: refs
    lr._get = lambda ref, what: {"w": ("float32", (1,), np.zeros(4, np.uint8))}
    loaded: list = []
    lr.policy = SimpleNamespace(load_state_dict=lambda state, partial=False: loaded.append((sorted(state), partial)))
    state = tmp_path / "state"
    (state / "learner").mkdir(parents=True)
    lr.load(state / "learner")
    (state / "reference.safetensors").write_bytes(b"")
    lr.load(state / "learner")
    assert calls == [(str(state / "learner"), None), (str(state / "learner"), str(state / "reference.safetensors"))]
    assert loaded == [(["w"], False), (["w"], False)]


def test_a_rank_loads_the_reference_file_only_into_its_own_reference_copy(tmp_path: Path, monkeypatch) -> None:
    """``or`` for ``and``: a LoRA rank (no copy) or a missing file would reach ``load_model``."""
    import safetensors.torch as st

    from r3_rl.learner.ray_ranks import LearnerRank

    loaded: list = []
    monkeypatch.setattr(st, "load_model", lambda model, f: loaded.append(f))
    r = LearnerRank.__new__(LearnerRank)
    r.rank, r.learner = 1, SimpleNamespace(load=lambda path: None)
    r.reference = SimpleNamespace(model="m")
    for file, is_copy in ((None, True), ("ref.safetensors", False), ("ref.safetensors", True)):
        r.reference_is_copy = is_copy
        r.load(str(tmp_path), file)
    assert loaded == ["ref.safetensors"]


def test_step_copies_rank_0_weights_only_after_an_update(monkeypatch) -> None:
    """The mirror must take rank 0's trainable weights when a loss was logged, and nothing for a skipped step."""
    import numpy as np
    import ray

    lr = _ranked(monkeypatch, ["n0", "n1"])
    monkeypatch.setattr(ray, "put", lambda obj: "items")
    asked: list = []
    lr.ranks = [SimpleNamespace(step=SimpleNamespace(remote=lambda ref, k=k: k),
                                weights=SimpleNamespace(remote=lambda trainable_only=False, k=k:
                                                        asked.append((k, trainable_only)) or k)) for k in (0, 1)]
    results: dict = {}
    lr._all = lambda refs, what: [results[r] for r in refs]
    lr._get = lambda ref, what: {"w": ("float32", (1,), np.zeros(4, np.uint8))}
    loaded: list = []
    lr.policy = SimpleNamespace(load_state_dict=lambda state, partial=False: loaded.append(partial))
    results.update({0: ({"learner/skipped_nonfinite": 1.0}, {}), 1: ({"learner/skipped_nonfinite": 1.0}, {})})
    assert lr.step(["item"]) == {"learner/skipped_nonfinite": 1.0} and asked == [] and loaded == []
    results.update({0: ({"learner/loss": 0.5}, {}), 1: ({"learner/loss": 0.25}, {})})
    assert lr.step(["item"]) == {"learner/loss": 0.75} and asked == [(0, True)] and loaded == [True]
    assert lr.step([]) == {"learner/skipped_empty": 1.0}


# ============================================================================ gpu_layout
def _layout(device="cuda:0", address=None, ranks=1, gpus_per_rank=1.0, backend="ray", workers=2, gpus_per_worker=1.0,
            reward_workers=0, gpus_per_reward_worker=0.0):
    return SimpleNamespace(ray=SimpleNamespace(address=address), policy=SimpleNamespace(device=device),
                           learner=SimpleNamespace(ranks=ranks, gpus_per_rank=gpus_per_rank, cpus_per_rank=1),
                           rollout=SimpleNamespace(backend=backend, workers=workers, gpus_per_worker=gpus_per_worker,
                                                   cpus_per_worker=1, reward_workers=reward_workers,
                                                   gpus_per_reward_worker=gpus_per_reward_worker))


def test_gpus_for_local_ray_at_its_boundaries() -> None:
    """Off-by-ones: a trainer index just past the list, a node with exactly as many GPUs as the actors, a
    joined cluster, one learner rank counted as an actor."""
    from r3_rl.gpu_layout import actor_gpus, gpus_for_local_ray

    four = ["0", "1", "2", "3"]
    assert gpus_for_local_ray(_layout(device="cuda:4", workers=2), four) is None  # no such GPU: leave Ray alone
    assert gpus_for_local_ray(_layout(device="cuda:3", workers=3), four) == ["0", "1", "2"]
    assert gpus_for_local_ray(_layout(device="cuda:1", workers=4), four) is None  # 4 actor GPUs on 4: share
    assert gpus_for_local_ray(_layout(device="cuda:1", workers=3, address="auto"), four) is None
    assert gpus_for_local_ray(_layout(device="cpu", workers=1), four) is None
    assert actor_gpus(_layout(ranks=1, gpus_per_rank=1.0, workers=2)) == 2  # one rank lives in the trainer
    assert actor_gpus(_layout(ranks=2, gpus_per_rank=1.0, workers=2)) == 4


def test_gpus_to_place_rounds_a_share_over_one_up_to_whole_gpus() -> None:
    """``int(1.5)`` = 1: an actor asking 1.5 GPUs needs 2 whole ones."""
    from r3_rl.gpu_layout import gpus_to_place

    assert gpus_to_place([(2, 1.5)]) == 4
    assert gpus_to_place([(1, 2.0), (3, 0.5)]) == 4


def test_check_gpu_shares_refuses_zero_and_fractional_shares() -> None:
    """A rollout worker with 0 GPUs, or a rank with 1.5 GPUs, let through."""
    from r3_rl.gpu_layout import check_gpu_shares

    with pytest.raises(UserError, match=r"^r\.yaml: key 'rollout.gpus_per_worker': 0 with policy.device cuda:0; "):
        check_gpu_shares(_layout(gpus_per_worker=0.0), "r.yaml")
    with pytest.raises(UserError, match=r"^r\.yaml: key 'learner.gpus_per_rank': 1.5 with policy.device cuda:0 and "
                                        r"learner.ranks 2; each rank needs a whole GPU"):
        check_gpu_shares(_layout(ranks=2, gpus_per_rank=1.5), "r.yaml")
    check_gpu_shares(_layout(ranks=2, gpus_per_rank=2.0, gpus_per_worker=0.5), "r.yaml")  # fine
    check_gpu_shares(_layout(device="cpu", gpus_per_worker=0.0), "r.yaml")  # CPU: nothing to check


# ============================================================================ the batch split over ranks
def test_each_rank_takes_every_world_th_micro_batch_and_zero_weighted_fillers() -> None:
    """Ranks' shares of a mini-batch: a chunk past the mini-batch, floor for the slot count (ranks out of
    lockstep), or a filler that counts (weight 1 instead of 0)."""
    from r3_rl.learner.torch_learner import TorchLearner

    lrn = TorchLearner.__new__(TorchLearner)
    lrn.cfg = SimpleNamespace(micro_batch_size=2)

    def split(rank: int, world: int, mini: range) -> list:
        lrn.rank, lrn.world = rank, world
        return [((c.start, c.stop), s) for c, s in lrn._my_chunks(mini)]
    assert split(0, 1, range(6, 11)) == [((6, 8), 1.0), ((8, 10), 1.0), ((10, 11), 1.0)]
    assert split(0, 2, range(6, 11)) == [((6, 8), 1.0), ((10, 11), 1.0)]
    assert split(1, 2, range(6, 11)) == [((8, 10), 1.0), ((8, 10), 0.0)]
    assert split(3, 4, range(0, 5)) == [((0, 2), 0.0)]  # no chunk of its own: one zero-weighted repeat


# Found by round 8D: the scoring loop replaced a lost reward actor inside the loop that waits for the others, on
# one shared deadline; a replacement that took longer than what was left of ray.call_timeout_s (3 attempts of
# placement, start and set-up) left the next, healthy actor a wait of 0 s: its samples were marked failed and it
# was killed and replaced too.  Now every chunk is waited for first and the lost actors are replaced after.
def test_a_slow_replacement_does_not_fail_the_healthy_reward_actors(monkeypatch) -> None:
    """A healthy reward actor still scoring is declared lost because another actor's restart used the deadline."""
    import r3_rl.rollout.ray_rewards as rr
    from r3_rl.ray_actors import ActorLost, ActorTimeout
    from r3_rl.rewards.reward_set import ScoredSample

    clock = _Clock(0.0)
    monkeypatch.setattr(rr, "time", clock)
    s = _reward_set(monkeypatch, lost=set())

    def get_within(ref, timeout_s, what):
        name, chunk = ref
        if name == "x":
            raise ActorLost(f"{what}: RayActorError: gone")
        if timeout_s <= 0:  # y needs 1 s more, as ray.get(timeout=0) on a task still running
            raise ActorTimeout(f"{what} did not answer within {timeout_s:g} s")
        return [ScoredSample(total=float(v)) for v in chunk]
    monkeypatch.setattr(rr, "get_within", get_within)

    def slow_replace(i, why, prepare):  # three placement attempts and a model load: past the 60 s deadline
        s.replaced.append(i)
        clock.t += 120.0
    s.group.replace = slow_replace
    out = s.score([10, 11, 12, 13])
    assert [r.total for r in out] == [None, 11.0, None, 13.0] and s.replaced == [0]


def test_a_slow_worker_replacement_does_not_fail_the_workers_still_loading(monkeypatch) -> None:
    """As above for the weight sync: worker a lost, its replacement takes 120 s of a 30 s deadline; worker b, which
    answers within the deadline, must not be declared lost (and replaced) for the time a's replacement took."""
    import r3_rl.rollout.ray_engine as re_mod
    from r3_rl.ray_actors import ActorLost, ActorTimeout

    clock = _Clock(0.0)
    monkeypatch.setattr(re_mod, "time", clock)
    e, _ = _engine(monkeypatch)
    e.group = SimpleNamespace(items=lambda: [(0, _Worker("a")), (1, _Worker("b"))])
    e.call_timeout_s = 30.0
    replaced: list = []

    def slow_replace(i, why):
        replaced.append(i)
        clock.t += 120.0
    e._replace = slow_replace

    def get_within(ref, timeout_s, what):
        if ref == "load-a":
            raise ActorLost(f"{what}: RayActorError: gone")
        if timeout_s <= 0:  # b is still loading: ray.get(timeout=0) would time out
            raise ActorTimeout(f"{what} did not answer within {timeout_s:g} s")
    monkeypatch.setattr(re_mod, "get_within", get_within)
    e.sync(_Policy(1, 10))
    assert replaced == [0]
