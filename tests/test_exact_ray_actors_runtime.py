"""Exact checks of the Ray edge that the other Ray tests leave loose: start_ray's arguments and error line, weight
packing edge cases, which errors count as a lost actor, placement and start bookkeeping of an actor group (shared
deadlines, sizes in messages, clean-up), the rollout engine's construction, weight sync, timeout and reissue order,
and the reward actors' set-up and slot numbers (round 14A audit).

No Ray is started: every ``ray`` call is a fake, every expected value is written out by hand."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from r3_rl.config import RayCfg
from r3_rl.errors import UserError
from test_exact_ray_engine_ranks import _T, _Clock, _fake_init, _group, _Policy, _running_engine


# ============================================================================ ray_runtime
def test_start_ray_leaves_a_running_ray_to_its_owner(monkeypatch) -> None:
    """A Ray already running (tests, notebooks) is not ours: start_ray says False and does not call init."""
    import ray

    from r3_rl.ray_runtime import start_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init called on a running Ray"))
    assert start_ray(RayCfg(), ["0"]) is False


def test_start_ray_passes_log_to_driver_and_no_dashboard(monkeypatch) -> None:
    from r3_rl.ray_runtime import start_ray

    seen = _fake_init(monkeypatch)
    assert start_ray(RayCfg(num_cpus=1, log_to_driver=False)) is True
    assert (seen["log_to_driver"], seen["include_dashboard"], seen["configure_logging"]) == (False, False, False)
    assert "num_gpus" not in seen and "object_store_memory" not in seen  # no GPU list: Ray's own view


def test_start_ray_with_no_spare_gpu_gives_a_local_ray_none(monkeypatch) -> None:
    """``gpus=[]`` (the trainer holds the only GPU): Ray must get 0 GPUs and an empty CUDA_VISIBLE_DEVICES,
    not every GPU of the node."""
    from r3_rl.ray_runtime import start_ray

    seen = _fake_init(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert start_ray(RayCfg(num_cpus=2), []) is True
    assert seen["num_gpus"] == 0 and seen["visible"] == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_start_ray_turns_a_value_error_and_an_empty_message_into_one_line(monkeypatch) -> None:
    from r3_rl.ray_runtime import start_ray

    _fake_init(monkeypatch, ValueError("bad address\nmore"))
    with pytest.raises(UserError, match=r"^ray: cannot start a local Ray \(bad address\); start one with "):
        start_ray(RayCfg())
    _fake_init(monkeypatch, RuntimeError())
    with pytest.raises(UserError, match=r"^ray: cannot start a local Ray \(RuntimeError\); "):
        start_ray(RayCfg())


def test_pack_state_takes_a_parameter_that_requires_grad() -> None:
    """A trainable weight (``requires_grad``) must pack like any tensor: float32 2.0 = 0x40000000."""
    from r3_rl.ray_runtime import pack_state

    w = torch.nn.Parameter(torch.tensor([2.0]))
    name, shape, data = pack_state({"w": w})["w"]
    assert (name, shape, data.tolist()) == ("float32", (1,), [0, 0, 0, 0x40])


@pytest.mark.parametrize("value, dtype", [([-3], torch.int8), ([True], torch.bool), ([200], torch.uint8)])
def test_a_one_byte_tensor_round_trips(value, dtype) -> None:
    """A single one-byte entry is not empty: numpy's size is 1."""
    from r3_rl.ray_runtime import pack_state, unpack_state

    back = unpack_state(pack_state({"b": torch.tensor(value, dtype=dtype)}))["b"]
    assert back.dtype == dtype and back.tolist() == value


def test_actor_died_is_true_only_for_a_lost_actor() -> None:
    """An error raised inside the actor's code (RayTaskError) is a bug to show, not a lost actor to replace."""
    import ray.exceptions as rex

    from r3_rl.ray_runtime import actor_died

    assert actor_died(rex.RayActorError()) and actor_died(rex.ActorDiedError())
    assert not actor_died(rex.RayTaskError("run", "tb", ValueError("bug")))
    assert not actor_died(rex.GetTimeoutError("slow")) and not actor_died(ValueError("x"))


# ============================================================================ ray_actors: placement
def test_unplaced_reason_joins_every_short_resource_with_and(monkeypatch) -> None:
    import ray

    from r3_rl.ray_actors import unplaced_reason

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.5})
    assert unplaced_reason({"CPU": 1, "GPU": 0.5}) == "no node has 1 free CPU and 0.5 free GPU"


def test_placed_counts_an_actor_as_not_placed_when_ray_cannot_tell(monkeypatch) -> None:
    from ray._private import state

    from r3_rl.ray_actors import placed

    def broken(actor_id):
        raise RuntimeError("GCS unavailable")
    monkeypatch.setattr(state, "actors", broken)
    actor = SimpleNamespace(_actor_id=SimpleNamespace(hex=lambda: "ab12"))
    assert placed(actor, {"CPU": 1}) is False


def test_await_start_raises_unplaced_for_an_actor_no_node_took_and_kills_it(monkeypatch) -> None:
    import r3_rl.ray_actors as ra

    clock, killed, waits = _Clock(), [], []
    monkeypatch.setattr(ra, "time", clock)
    monkeypatch.setattr(ra, "placed", lambda actor, need: False)
    monkeypatch.setattr(ra, "unplaced_reason", lambda need: "no node has 1 free GPU")
    monkeypatch.setattr(ra, "kill_actors", lambda actors: killed.extend(actors))

    def late(ref, timeout_s, what):
        waits.append(timeout_s)
        raise ra.ActorTimeout("t")
    monkeypatch.setattr(ra, "get_within", late)
    with pytest.raises(ra.Unplaced, match=r"^no node has 1 free GPU$"):
        ra.await_start("act", "ref", 1005.0, 1050.0, {"GPU": 1})
    assert waits == [5.0] and killed == ["act"]  # no start wait for an actor that has no node


# ============================================================================ ray_actors: ActorGroup
def test_group_set_ups_share_one_deadline(monkeypatch) -> None:
    """Three set-ups of 20 s each within a 50 s call timeout: 50, 30, 10 s left, not 50 s each."""
    g, rec = _group(monkeypatch, iter([("a", "n-a"), ("b", "n-b"), ("c", "n-c")]), tick=20.0)
    g.start(3, prepare=lambda actor: f"prep-{actor}")
    assert rec.timeouts == [50.0, 30.0, 10.0] and g.actors == {0: "a", 1: "b", 2: "c"}


def test_group_that_cannot_start_enough_kills_the_ones_that_came_up(monkeypatch) -> None:
    import r3_rl.ray_actors as ra

    started = iter([("a", "n-a"), ra.Unplaced("no node has 1 free GPU"), ("c", "n-c")])
    g, rec = _group(monkeypatch, started, min_alive=3)
    with pytest.raises(ra.ClusterError, match=r"^rollout worker 1 could not be started: no node has 1 free GPU "
                                              r"\(waited 5 s\)$"):
        g.start(3, prepare=lambda actor: f"prep-{actor}")
    assert rec.killed == ["a", "c"] and g.actors == {} and g.nodes == {}


def test_group_size_in_messages_is_the_number_started_and_dropped_slots_leave_describe(monkeypatch) -> None:
    import r3_rl.ray_actors as ra

    started = iter([("a", "node-aaaaaaaa1"), ("b", "node-bbbbbbbb2"), ("c", "node-cccccccc3"),
                    ra.Unplaced("no room"), ra.Unplaced("no room")])
    g, rec = _group(monkeypatch, started, min_alive=1)
    g.start(3, prepare=lambda actor: f"prep-{actor}")
    assert g.replace(0, "gone", prepare=lambda actor: "ref") is False
    assert g.replace(1, "gone", prepare=lambda actor: "ref") is False
    assert rec.events[2].endswith("; continuing with 2 of 3 rollout workers")
    assert rec.events[5].endswith("; continuing with 1 of 3 rollout workers")
    assert g.describe() == "worker 2 on node node-ccc" and rec.killed == ["a", "b"]


def test_replace_below_min_alive_stops_the_run_in_one_line(monkeypatch) -> None:
    import r3_rl.ray_actors as ra

    g, rec = _group(monkeypatch, iter([ra.ActorLost("it died while starting (boom)")] * 2), attempts=2, min_alive=2)
    g.actors, g.nodes, g.size = {0: "old", 1: "other"}, {0: "n0", 1: "n1"}, 2
    with pytest.raises(ra.ClusterError, match=r"^rollout worker 0 could not be restarted: it died while starting "
                                              r"\(boom\) \(2 attempts, 5 s each\)$"):
        g.replace(0, "its node died", prepare=lambda actor: "ref")
    assert g.actors == {1: "other"} and g.nodes == {1: "n1"}


def test_group_close_kills_every_actor_and_forgets_them(monkeypatch) -> None:
    g, rec = _group(monkeypatch, iter([]))
    g.actors, g.nodes = {0: "a", 2: "c"}, {0: "n0", 2: "n2"}
    g.close()
    assert rec.killed == ["a", "c"] and g.actors == {} and g.nodes == {} and g.items() == [] and g.describe() == ""


# ============================================================================ ray_engine: construction and close
def _built_engine(monkeypatch, fail_start: BaseException | None = None, owns: bool = True, **rollout):
    """A RayEngine built with Ray, the actor group and the weight put all faked; returns (engine or error, rec)."""
    import ray

    import r3_rl.rollout.ray_engine as re_mod

    rec = SimpleNamespace(options=None, group=None, closed=[], stopped=[], events=[])

    class Group:
        def __init__(self, kind, factory, need, ray_cfg, attempts, min_alive, log_event):
            rec.group = {"kind": kind, "need": need, "attempts": attempts, "min_alive": min_alive}
            self.factory, self.actors, self.restarts = factory, {}, 0

        def start(self, n, prepare):
            rec.group["n"] = n
            if fail_start is not None:
                raise fail_start
            self.actors = {0: self.factory()}

        def describe(self):
            return "worker 0 on node n"

        def close(self):
            rec.closed.append("group")

    def options(**kw):
        rec.options = kw
        return SimpleNamespace(remote=lambda data, threads: ("actor", data, threads))
    monkeypatch.setattr(re_mod, "ActorGroup", Group)
    monkeypatch.setattr(re_mod, "start_ray", lambda cfg, gpus: owns)
    monkeypatch.setattr(re_mod, "stop_ray", lambda owned: rec.stopped.append(owned) or False)
    monkeypatch.setattr(re_mod, "gpus_for_local_ray", lambda recipe: None)
    monkeypatch.setattr(re_mod, "actor_recipe_data", lambda recipe: {"r": 1})
    monkeypatch.setattr(ray, "remote", lambda cls: SimpleNamespace(options=options))
    monkeypatch.setattr(ray, "put", lambda obj: "full-ref")
    r = dict(threads_per_worker=0, cpus_per_worker=0.5, gpus_per_worker=0.25, max_task_retries=2, min_workers=2,
             workers=3)
    r.update(rollout)
    recipe = SimpleNamespace(rollout=SimpleNamespace(**r), ray=RayCfg(call_timeout_s=40))
    policy = SimpleNamespace(version=7, state_dict=lambda: {"w": torch.zeros(1)})
    try:
        return re_mod.RayEngine(recipe, policy, rec.events.append), rec
    except BaseException as e:  # noqa: BLE001 -- returned for the test to check
        return e, rec


def test_engine_actors_are_never_restarted_by_ray_and_the_group_gets_the_recipes_numbers(monkeypatch) -> None:
    """half a CPU per worker still gives one torch thread; the group needs the worker's CPU and GPU share,
    ``max_task_retries`` attempts and ``min_workers``."""
    e, rec = _built_engine(monkeypatch)
    assert rec.options == {"num_cpus": 0.5, "num_gpus": 0.25, "max_restarts": 0, "max_task_retries": 0}
    assert rec.group == {"kind": "rollout worker", "need": {"CPU": 0.5, "GPU": 0.25}, "attempts": 2, "min_alive": 2,
                         "n": 3}
    assert e.workers == [("actor", {"r": 1}, 1)] and e.call_timeout_s == 40 and e.max_reissues == 2
    assert rec.events == ["rollout: 1 Ray workers ready (worker 0 on node n)"]
    e2, _ = _built_engine(monkeypatch, threads_per_worker=3)
    assert e2.workers == [("actor", {"r": 1}, 3)]


def test_an_engine_that_fails_to_start_kills_its_actors_and_stops_its_ray(monkeypatch) -> None:
    from r3_rl.ray_actors import ClusterError

    err, rec = _built_engine(monkeypatch, fail_start=ClusterError("rollout worker 0 could not be started: x"))
    assert isinstance(err, ClusterError) and rec.closed == ["group"] and rec.stopped == [True]
    err, rec = _built_engine(monkeypatch, fail_start=KeyboardInterrupt())
    assert isinstance(err, KeyboardInterrupt) and rec.closed == ["group"] and rec.stopped == [True]


def test_engine_close_releases_the_weights_and_stops_only_a_ray_it_started(monkeypatch) -> None:
    e, rec = _built_engine(monkeypatch, owns=False)
    e._update = "update-ref"
    e.close()
    assert (e._full, e._update) == (None, None) and rec.stopped == [False] and rec.closed == ["group"]
    e, rec = _built_engine(monkeypatch, owns=True)
    e.close()
    e.close()
    assert rec.stopped == [True, False]  # stopped once: the second close finds it no longer owned


# ============================================================================ ray_engine: weights
class _LoadingWorker:
    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []
        self.load = SimpleNamespace(remote=self._load)

    def _load(self, full, full_id, update, version):
        self.calls.append((full, full_id, update, version))
        return f"load-{self.name}"


def _syncing_engine(monkeypatch, names, tick=0.0):
    import ray

    import r3_rl.rollout.ray_engine as re_mod
    from r3_rl.rollout.ray_engine import RayEngine

    clock, timeouts, puts = _Clock(0.0), [], []
    monkeypatch.setattr(re_mod, "time", clock)
    monkeypatch.setattr(ray, "put", lambda obj: puts.append(sorted(obj)) or f"ref{len(puts)}")

    def get_within(ref, timeout_s, what):
        timeouts.append(timeout_s)
        clock.t += tick
    monkeypatch.setattr(re_mod, "get_within", get_within)
    workers = [_LoadingWorker(n) for n in names]
    e = RayEngine.__new__(RayEngine)
    e._full, e._full_id, e._update, e.call_timeout_s = None, -1, None, 30.0
    e.group = SimpleNamespace(items=lambda: list(enumerate(workers)))
    return e, workers, timeouts, puts


def test_sync_sends_the_full_state_in_a_list_then_only_the_update(monkeypatch) -> None:
    """Each worker gets ``[full ref]`` (fetched only by a worker without it), the full state's number, the update
    and the version; after a LoRA step (trainable_only) only the adapters are put."""
    e, (a,), _, puts = _syncing_engine(monkeypatch, ["a"])
    e.sync(_Policy(1, 10, version=4))
    e.sync(_Policy(1, 10, version=5), trainable_only=True)
    assert a.calls == [(["ref1"], 0, None, 4), (["ref1"], 0, "ref2", 5)]
    assert puts == [["base", "lora"], ["lora"]]


def test_sync_waits_share_one_deadline(monkeypatch) -> None:
    """Three loads of 12 s each within a 30 s call timeout: 30, 18, 6 s left, not 30 s each."""
    e, _, timeouts, _ = _syncing_engine(monkeypatch, ["a", "b", "c"], tick=12.0)
    e.sync(_Policy(1, 10, version=1))
    assert timeouts == [30.0, 18.0, 6.0]


def test_a_replacement_is_named_with_the_policy_version(monkeypatch) -> None:
    e, (a,), _, _ = _syncing_engine(monkeypatch, ["a"])
    e.sync(_Policy(1, 10, version=9))
    seen = {}
    e.group.replace = lambda i, why, prepare, detail="": seen.update(i=i, why=why, detail=detail, ref=prepare(a))
    e._replace(0, "gone")
    assert seen == {"i": 0, "why": "gone", "detail": " with policy version 9", "ref": "load-a"}


def test_worker_sets_its_torch_threads_when_it_builds_the_policy(monkeypatch) -> None:
    import ray

    import r3_rl.config as config
    import r3_rl.rollout.ray_engine as re_mod
    from r3_rl.rollout.ray_engine import RolloutWorker

    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(config, "Recipe", SimpleNamespace(
        model_validate=lambda data: SimpleNamespace(templates=SimpleNamespace(stop_phrase="STOP"))))
    monkeypatch.setattr(re_mod, "worker_policy", lambda recipe: SimpleNamespace(
        version=0, load_state_dict=lambda state, partial=False: None))
    monkeypatch.setattr(ray, "get", lambda ref: {"w": ("float32", (1,), np.zeros(4, np.uint8))})
    for n, want in ((3, [3]), (0, [])):  # 0: leave torch's default
        threads.clear()
        w = RolloutWorker({}, n)
        assert w.load(["full"], 0, None, 1) == 1 and threads == want and w.stop_phrase == "STOP"


# ============================================================================ ray_engine: the in-flight queue
class _Worker:
    """A rollout actor that records each task by name (``str(task)``: the ``_T`` tasks compare by identity)."""

    def __init__(self, name: str) -> None:
        self.name, self.sent = name, []
        self.run = SimpleNamespace(remote=lambda task, sampling: self._send(task))

    def _send(self, task) -> str:
        self.sent.append(str(task))
        return f"{self.name}:{task}"


def _lost_on(monkeypatch, dead: str):
    import r3_rl.rollout.ray_engine as re_mod
    from r3_rl.ray_actors import ActorLost

    def get_within(ref, timeout_s, what):
        if ref.startswith(dead + ":"):
            raise ActorLost(f"{what}: RayActorError: gone")
        return [ref]
    monkeypatch.setattr(re_mod, "get_within", get_within)


def _replaces_with(e, fresh):
    """The engine's ``_replace`` puts ``fresh`` in the lost slot and records ``(slot, why)`` in ``e.replaced``."""
    e.replaced = []

    def replace(slot, why):
        e.replaced.append((slot, why))
        e.group.actors[slot] = fresh
        return True
    e._replace = replace


def test_a_wait_after_a_slow_consumer_is_zero_not_negative(monkeypatch) -> None:
    """The trainer scores a task's trees between two yields; if that outlasts the other task's timeout, the next
    ray.wait gets timeout 0 (Ray refuses a negative one)."""
    import ray

    e, clock = _running_engine(monkeypatch, {0: _Worker("a"), 1: _Worker("b")}, max_reissues=3)
    waits: list = []

    def wait(refs, num_returns, timeout):
        if timeout < 0:
            raise ValueError(f"The 'timeout' argument must be nonnegative. Received {timeout}")
        waits.append(timeout)
        return [refs[0]], refs[1:]
    monkeypatch.setattr(ray, "wait", wait)
    _lost_on(monkeypatch, "none")
    got = []
    for task, trees in e.run([_T(1), _T(2)], "sampling"):
        got.append(trees)
        clock.t += 250.0  # scoring took longer than the 100 s timeout
    assert got == [["a:t1"], ["b:t2"]] and waits == [100.0, 0.0]


def test_a_timed_out_wait_fails_the_oldest_task_and_replaces_its_worker(monkeypatch) -> None:
    import ray

    a, fresh = _Worker("a"), _Worker("fresh")
    e, clock = _running_engine(monkeypatch, {0: a}, max_reissues=3)
    _replaces_with(e, fresh)
    calls = iter([True])
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: ([], refs) if next(calls, False)
                        else ([refs[0]], refs[1:]))
    _lost_on(monkeypatch, "a")
    got = [(t.index, trees) for t, trees in e.run([_T(1), _T(2)], "sampling")]
    assert sorted(got) == [(1, ["fresh:t1"]), (2, ["fresh:t2"])]
    assert e.replaced == [(0, "task 1 of step 4 did not finish within 100 s (ray.call_timeout_s)")]
    assert e.events == ["reissued task 1 of step 4", "reissued task 2 of step 4"]


def test_a_reissued_task_goes_to_the_front_of_the_queue(monkeypatch) -> None:
    """The lost task is the oldest: it runs next on the replacement, before the tasks not yet sent."""
    import ray

    a, fresh = _Worker("a"), _Worker("fresh")
    e, _ = _running_engine(monkeypatch, {0: a}, max_reissues=3)
    _replaces_with(e, fresh)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: ([refs[0]], refs[1:]))
    _lost_on(monkeypatch, "a")
    got = [t.index for t, _ in e.run([_T(1), _T(2), _T(3), _T(4)], "sampling")]
    assert a.sent == ["t1", "t2"] and fresh.sent == ["t1", "t3", "t2", "t4"] and got == [1, 3, 2, 4]


# ============================================================================ ray_rewards
def _reward_set(monkeypatch, slots: list[int], lost: set[str], tick: float = 0.0):
    import r3_rl.rollout.ray_rewards as rr
    from r3_rl.ray_actors import ActorLost
    from r3_rl.rewards.reward_set import ScoredSample

    class Scorer:
        def __init__(self, name: str) -> None:
            self.name = name
            self.score = SimpleNamespace(remote=lambda chunk: (self.name, list(chunk)))
            self.setup = SimpleNamespace(remote=lambda: f"setup-{self.name}")
            self.ready = SimpleNamespace(remote=lambda: f"ready-{self.name}")

    clock, timeouts = _Clock(0.0), []
    monkeypatch.setattr(rr, "time", clock)

    def get_within(ref, timeout_s, what):
        timeouts.append(timeout_s)
        clock.t += tick
        name, chunk = ref
        if name in lost:
            raise ActorLost(f"{what}: RayActorError: gone")
        return [ScoredSample(total=float(s)) for s in chunk]
    monkeypatch.setattr(rr, "get_within", get_within)
    s = rr.RayRewardSet.__new__(rr.RayRewardSet)
    s.call_timeout_s, s.replaced, s.timeouts = 60.0, [], timeouts
    actors = [(i, Scorer(f"s{i}")) for i in slots]
    s.group = SimpleNamespace(items=lambda: actors, replace=lambda i, why, prepare: s.replaced.append(
        (i, prepare(Scorer(f"new{i}")))))
    return s


def test_a_lost_reward_actor_is_replaced_in_its_own_slot_and_set_up(monkeypatch) -> None:
    """Slot 1 was dropped earlier: the actor in slot 2 (second in the list) is lost, slot 2 is replaced, and the
    replacement builds its rewards (``setup``), not just ``ready``."""
    s = _reward_set(monkeypatch, [0, 2], lost={"s2"})
    assert [r.total for r in s.score([5, 6, 7])] == [5.0, None, 7.0]
    assert s.replaced == [(2, "setup-new2")]


def test_reward_waits_share_one_deadline(monkeypatch) -> None:
    s = _reward_set(monkeypatch, [0, 1, 2], lost=set(), tick=25.0)
    assert [r.total for r in s.score([1, 2, 3])] == [1.0, 2.0, 3.0]
    assert s.timeouts == [60.0, 35.0, 10.0]


def test_reward_set_starts_its_actors_with_setup_and_closes_them(monkeypatch) -> None:
    import ray

    import r3_rl.rollout.ray_rewards as rr

    rec: dict = {}

    class Group:
        def __init__(self, kind, factory, need, ray_cfg, attempts, min_alive, log_event):
            self.actors = {}

        def start(self, n, prepare):
            rec["prepared"] = prepare(SimpleNamespace(setup=SimpleNamespace(remote=lambda: "setup-ref"),
                                                      ready=SimpleNamespace(remote=lambda: "ready-ref")))

        def describe(self):
            return ""

        def close(self):
            rec["closed"] = True
    monkeypatch.setattr(rr, "RewardSet", SimpleNamespace(from_specs=lambda specs: SimpleNamespace(needs_policy=False)))
    monkeypatch.setattr(rr, "ActorGroup", Group)
    monkeypatch.setattr(ray, "remote", lambda cls: SimpleNamespace(options=lambda **kw: None))
    s = rr.RayRewardSet([], workers=1, threads=1, log_event=lambda e: None)
    s.close()
    assert rec == {"prepared": "setup-ref", "closed": True}


def test_reward_worker_setup_sets_its_threads_and_builds_its_rewards(monkeypatch) -> None:
    import r3_rl.rollout.ray_rewards as rr

    threads: list[int] = []
    loaded: list[list[dict]] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)

    def from_specs(specs):
        return SimpleNamespace(specs=specs, setup=lambda: loaded.append(specs))

    monkeypatch.setattr(rr, "RewardSet", SimpleNamespace(from_specs=from_specs))
    w = rr.RewardWorker([{"name": "x"}], 2)
    assert loaded == []  # constructing is cheap: ready() answers once the actor is placed
    assert w.setup() is True and threads == [2] and w.rewards.specs == [{"name": "x"}]
    # the models load in set-up (its own deadline), not on the first score() call inside the scoring deadline
    assert loaded == [[{"name": "x"}]]
    assert rr.RewardWorker([], 0).setup() is True and threads == [2] and loaded == [[{"name": "x"}], []]

