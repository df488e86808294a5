"""Exact cases for GPU placement, plug-in loading, component shutdown and environment records (round 18 audit).

Each test pins a behaviour a one-point slip in ``r3_rl.gpu_layout``, ``r3_rl.plugins``, ``r3_rl.components`` or
``r3_rl.environment`` changed while the rest of the suite still passed: the best-fit and first-fit halves of
Ray's packing, the float tolerance on whole GPU shares, each actor kind's CPUs, one import per plug-in file
however its path is spelt, messages of option and path errors, nested classes of one name as two plug-ins,
Ray ownership across parts and repeated closes, and what ``environment.json`` records about CPU, CUDA,
variables and the git checkout.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from r3_rl.errors import UserError
from test_environment import fake_env

# ---------------------------------------------------------------------------------------------- gpu_layout


def test_an_order_that_best_fit_spreads_counts_its_third_gpu() -> None:
    """Created as 0.2, 0.2, 0.65, 0.1, 0.35, 0.35: first fit ends with GPU 1 = 0.2+0.2+0.1+0.35 = 0.85 and
    GPU 2 = 0.65+0.35 = 1.0 (2 GPUs); best fit puts the 0.1 on GPU 2 (0.35 left there, 0.6 on GPU 1), then the
    first 0.35 on GPU 1 (0.25 left) and the second 0.35 finds 0.25 and 0.25: a third GPU.  Ray may create them
    in that order, so 3."""
    from r3_rl.gpu_layout import gpus_to_place

    assert gpus_to_place([(2, 0.2), (1, 0.65), (1, 0.1), (2, 0.35)]) == 3


def test_the_fullest_gpu_that_fits_is_best_fit_not_the_emptiest() -> None:
    """0.4, 0.4 on GPU 1 (0.2 left), 0.4 on GPU 2 (0.6 left), 0.1 best fit on GPU 1, then 0.6 fills GPU 2 and the
    last 0.6 takes GPU 3: 3.  Sending the 0.1 to the emptiest GPU (0.5 left on GPU 2) makes both 0.6s new: 4.
    The sum is 2.5, so no order needs fewer than 3, and none of first or best fit needs more."""
    from r3_rl.gpu_layout import gpus_to_place

    assert gpus_to_place([(1, 0.1), (3, 0.4), (2, 0.6)]) == 3


def test_a_whole_share_with_float_noise_takes_that_many_gpus() -> None:
    """A share computed as 1 plus rounding noise (1 + 2**-40) is one GPU per actor, not two."""
    from r3_rl.gpu_layout import gpus_to_place

    assert gpus_to_place([(2, 1 + 2 ** -40)]) == 2
    assert gpus_to_place([(1, 2 + 2 ** -40), (1, 0.5)]) == 3


def test_each_actor_kind_asks_for_its_own_cpus() -> None:
    from r3_rl.gpu_layout import REWARD_ACTOR_CPUS, ActorKind, actor_kinds

    recipe = SimpleNamespace(
        rollout=SimpleNamespace(backend="ray", workers=3, gpus_per_worker=0.5, cpus_per_worker=4,
                                reward_workers=2, gpus_per_reward_worker=0.25),
        learner=SimpleNamespace(ranks=2, gpus_per_rank=1, cpus_per_rank=6))
    assert REWARD_ACTOR_CPUS == 1
    assert actor_kinds(recipe) == [ActorKind("rollout.workers", 3, 0.5, 4),
                                   ActorKind("rollout.reward_workers", 2, 0.25, 1),
                                   ActorKind("learner.ranks", 2, 1, 6)]


# ---------------------------------------------------------------------------------------------- plugins

PLUGIN = '''
LOADS = []
LOADS.append(1)


class Scorer:
    pass
'''


def test_a_plugin_file_is_imported_once_however_its_path_is_spelt(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.plugins import import_attr

    (tmp_path / "plug_once.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    relative = import_attr("plug_once.py:Scorer", "reward 'r'", "fn")
    absolute = import_attr(f"{tmp_path / 'plug_once.py'}:Scorer", "reward 'r'", "fn")
    dotted = import_attr(f"{tmp_path}/./plug_once.py:Scorer", "reward 'r'", "fn")
    again = import_attr("plug_once.py:Scorer", "reward 'r'", "fn")
    assert relative is absolute is dotted is again
    assert import_attr("plug_once.py:LOADS", "reward 'r'", "fn") == [1], "the file's body ran once"


def test_a_backslash_path_is_a_file_not_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``plugins\\reward:fn`` (a Windows-style path) is looked up as a file, and its absence said so."""
    from r3_rl.plugins import import_attr

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        import_attr("plugins\\reward:fn", "reward 'r'", "fn")
    assert str(info.value) == "reward 'r': file plugins\\reward does not exist"


def test_options_for_a_callable_without_any_name_none_as_valid() -> None:
    from r3_rl.plugins import check_options

    def score(samples):  # noqa: ANN001, ANN202 - a plug-in reward that takes no options
        return [0.0 for _ in samples]

    with pytest.raises(UserError) as info:
        check_options("reward 'r'", score, {"scale": 2})
    assert str(info.value) == "reward 'r': unknown option 'scale'; valid options: none"


def test_options_of_a_callable_without_a_signature_are_not_checked() -> None:
    """``inspect.signature`` raises ValueError for some builtins (``dict``): nothing can be checked, no crash."""
    from r3_rl.plugins import check_options

    assert check_options("reward 'r'", dict, {"anything": 1}) is None
    assert check_options("reward 'r'", max, {"anything": 1}, skip=0) is None


class _First:
    class Inner:
        pass


class _Second:
    class Inner:
        pass


def test_two_nested_classes_of_one_name_are_two_plugins() -> None:
    """Same file, same ``__name__``, other ``__qualname__``: a different definition, so the name is taken."""
    from r3_rl.plugins import Registry

    registry = Registry("policy", "r3_rl.round18_no_such_group", {}, "Class")
    registry.register("inner")(_First.Inner)
    registry.register("inner")(_First.Inner)  # the same definition again is fine
    with pytest.raises(UserError) as info:
        registry.register("inner")(_Second.Inner)
    assert str(info.value) == (f"policy name 'inner' is already registered ({__name__}:_First.Inner); register "
                               f"{__name__}:_Second.Inner under another name")
    assert registry.resolve("inner") == (_First.Inner, "inner")


# ---------------------------------------------------------------------------------------------- components


def _parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[bool]) -> tuple[object, list[bool]]:
    import r3_rl.ray_runtime as ray_runtime
    from r3_rl.components import Components

    answers = iter(started)
    stops: list[bool] = []
    monkeypatch.setattr(ray_runtime, "start_ray", lambda ray_cfg, gpus: next(answers))
    monkeypatch.setattr(ray_runtime, "stop_ray", lambda owned: stops.append(owned) or False)
    recipe = SimpleNamespace(ray=SimpleNamespace(address=None), policy=SimpleNamespace(device="cpu"))
    return Components(recipe, tmp_path), stops


def test_a_ray_started_by_the_first_part_is_stopped_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine starts Ray (True), the learner then finds it running (False): the parts still own it, close
    stops it once, and a second close stops nothing (it may be someone else's Ray by then)."""
    parts, stops = _parts(tmp_path, monkeypatch, [True, False])
    parts._start_ray()
    parts._start_ray()
    parts.close()
    assert stops == [True]
    parts.close()
    assert stops == [True]


def test_a_ray_the_caller_started_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts, stops = _parts(tmp_path, monkeypatch, [False, False])
    parts._start_ray()
    parts._start_ray()
    parts.close()
    assert stops == []


def test_close_stops_reward_actors_workers_and_ranks_in_order(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    parts, stops = _parts(tmp_path, monkeypatch, [])
    closed: list[str] = []
    for part in ("learner", "engine", "task_rewards", "eval_rewards"):
        parts.__dict__[part] = SimpleNamespace(close=lambda part=part: closed.append(part))
    assert parts.built("task_rewards") and not parts.built("reference")
    parts.close()
    assert closed == ["task_rewards", "engine", "learner"] and stops == []


# ---------------------------------------------------------------------------------------------- environment


def test_a_run_dir_keeps_all_of_120_records(tmp_path: Path) -> None:
    """Records are dropped only past 200 (about 1 KB each): 120 commands are all still there, in order."""
    from r3_rl.environment import read_records, record_environment

    for i in range(120):
        record_environment(tmp_path, f"eval{i}", now=fake_env())
    assert [r["command"] for r in read_records(tmp_path)] == [f"eval{i}" for i in range(120)]


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz
stepping\t: 7
"""


def test_the_cpu_is_named_by_its_model_name_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """x86 ``/proc/cpuinfo`` has a ``model : 85`` line before ``model name``: the name is the one recorded."""
    import io

    import r3_rl.environment as environment

    opened: list[str] = []

    def fake_open(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        opened.append(path)
        return io.StringIO(CPUINFO)
    monkeypatch.setattr(environment, "open", fake_open, raising=False)
    assert environment.cpu_model() == "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz"
    assert opened == ["/proc/cpuinfo"]


def test_no_gpu_records_no_cuda_runtime_and_only_set_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA build of torch on a machine without a GPU records ``cuda: None`` (nothing ran on it); only the
    numeric variables that are set are recorded."""
    import torch

    from r3_rl.environment import NUMERIC_VARIABLES, describe_environment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    for name in NUMERIC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    env = describe_environment()
    assert env["gpus"] == [] and env["cuda"] is None
    assert env["variables"] == {"MKL_CBWR": "COMPATIBLE"}


def _fake_git(monkeypatch: pytest.MonkeyPatch, top: str, status: tuple[int, str]) -> list[tuple[str, ...]]:
    calls: list[tuple[str, ...]] = []

    def run(cmd, capture_output, text, timeout):  # noqa: ANN001, ANN202
        args = tuple(cmd[3:])
        calls.append(args)
        code, out = {("rev-parse", "--show-toplevel"): (0, top + "\n"), ("rev-parse", "HEAD"): (0, "abc123\n"),
                     ("status", "--porcelain"): status}[args]
        return subprocess.CompletedProcess(cmd, code, out, "")
    monkeypatch.setattr(subprocess, "run", run)
    return calls


@pytest.mark.parametrize("status, dirty", [((0, ""), False), ((0, " M r3_rl/x.py\n"), True), ((128, ""), None)])
def test_the_checkout_commit_and_its_changes(monkeypatch: pytest.MonkeyPatch, status: tuple[int, str],
                                              dirty: bool | None) -> None:
    """A failed ``git status`` is "unknown" (None), not "no uncommitted changes" (False)."""
    import r3_rl.environment as environment

    checkout = str(Path(environment.__file__).resolve().parent.parent)
    _fake_git(monkeypatch, checkout, status)
    out = environment.code_revision()
    assert out == {"version": environment.package_version("r3-rl"), "commit": "abc123", "uncommitted_changes": dirty}


def test_an_installed_copy_inside_another_repository_records_no_commit(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import r3_rl.environment as environment

    calls = _fake_git(monkeypatch, str(tmp_path), (0, ""))
    assert environment.code_revision() == {"version": environment.package_version("r3-rl")}
    assert calls == [("rev-parse", "--show-toplevel")]


def test_the_summary_names_the_first_gpu() -> None:
    from r3_rl.environment import summary_line

    line = summary_line(fake_env(gpus=["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]))
    assert line == ("torch 2.13.0+cpu (AVX2 kernels, 1 thread), transformers 5.25.0, numpy 2.4.6, Python 3.11.7, "
                    "CPU AMD EPYC, GPUs 2 x NVIDIA A100-SXM4-80GB, r3-rl 01234567")
