"""``r3-rl doctor``'s ``memory`` check: ``r3-rl plan`` run for the GPUs and the node memory the doctor sees.  The
GPUs and the node's memory are injected (this machine has no GPU and 24 GB); the verdicts are checked against
``r3-rl plan``'s own for the same GPUs, and Ray's default object store against Ray's rule."""
from __future__ import annotations

from pathlib import Path

import pytest

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.doctor import memory_check
from r3_rl.doctor.base import Context
from r3_rl.doctor.devices import GpuInfo
from r3_rl.doctor.devices import physical_memory
from r3_rl.doctor.memory_check import check_memory, ray_default_store

REPO = Path(__file__).resolve().parents[1]
BAGEL = REPO / "recipes" / "grpo_geneval_bagel.yaml"
TINY = REPO / "recipes" / "tiny_blocks.yaml"


def _run(recipe_path: Path, gpus: list[GpuInfo], node: float, sets: list[str] | None = None) -> dict[str, tuple]:
    ctx = Context(recipe_path, load_recipe(recipe_path, sets), host_memory=lambda: int(node))
    ctx._memo["gpus"] = gpus
    found = check_memory(ctx)
    assert all(f.check == "memory" for f in found)
    return {f.detail.split(":")[0]: (f.status, f.detail, f.fix) for f in found}


def _gpus(n: int, gb: float) -> list[GpuInfo]:
    return [GpuInfo(i, "NVIDIA H100", int(gb * 1e9), int(gb * 1e9)) for i in range(n)]


@pytest.fixture(autouse=True)
def _no_shm_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's default store without this machine's /dev/shm in it (tested on its own below)."""
    monkeypatch.setattr(memory_check, "ray_default_store", lambda total: ray_default_store(total, Path("/nowhere")))


def test_gpu_memory_agrees_with_r3_rl_plan_for_the_gpus_it_sees(capsys: pytest.CaptureFixture) -> None:
    """8 GPUs of 80 GB fit the shipped BAGEL recipe (the plan's fullest GPU: a rollout worker, 60.0 GB); 8 of
    40 GB do not, and the fix is the plan's own advice.  ``r3-rl plan`` says the same for the same GPUs."""
    fits = _run(BAGEL, _gpus(8, 80), 2e12)["GPU memory"]
    assert fits[0] == "ok" and "1 rollout worker, 60.0 GB" in fits[1] and "90% of this machine's 80.0 GB" in fits[1]
    small = _run(BAGEL, _gpus(8, 40), 2e12)["GPU memory"]
    assert small[0] == "problem" and "40.0 GB GPUs" in small[1]
    printed = {}
    for gb in (80, 40):
        main(["plan", str(BAGEL), "--gpus", "8", "--gpu-memory", str(gb)])
        printed[gb] = capsys.readouterr().out
    assert "verdict: fits" in printed[80] and "verdict: does NOT fit" in printed[40]
    assert small[2].split("; ")[0] in printed[40]  # the plan's first piece of advice
    # too few GPUs is the gpus check's finding, not a plan on the ones there are
    assert _run(BAGEL, _gpus(2, 80), 2e12)["GPU memory"][0] == "skipped"
    assert _run(BAGEL, [], 2e12)["GPU memory"][0] == "skipped"


def test_host_memory_and_ray_object_store_against_the_node() -> None:
    """BAGEL's host figures (322.3 GB, 57.7 of them in Ray's object store): a 2 TB node holds both (its default
    store is Ray's 200 GB cap); a 256 GB node is too small for the run, though its default store (76.8 GB) holds
    the 57.7; a 128 GB node's default store (38.4 GB) is too small as well."""
    big = _run(BAGEL, _gpus(8, 80), 2e12)
    assert big["host memory"][0] == "ok" and "322.3 GB" in big["host memory"][1]
    assert big["Ray object store"][0] == "ok" and "gets 200.0 GB" in big["Ray object store"][1]
    mid = _run(BAGEL, _gpus(8, 80), 256e9)
    assert mid["host memory"][0] == "problem" and mid["Ray object store"][0] == "ok"
    small = _run(BAGEL, _gpus(8, 80), 128e9)
    store = small["Ray object store"]
    assert store[0] == "problem" and "57.7 GB" in store[1] and "38.4 GB" in store[1]
    assert store[2].startswith("--set ray.object_store_gb=73 ")  # 57.7 GB and a quarter more
    given = _run(BAGEL, _gpus(8, 80), 128e9, ["ray.object_store_gb=73"])["Ray object store"]
    assert given[0] == "ok" and "gets 73.0 GB (ray.object_store_gb)" in given[1]
    assert _run(BAGEL, _gpus(8, 80), 2e12, ["ray.object_store_gb=50"])["Ray object store"][0] == "problem"
    # on a cluster the host figures are several nodes': left to r3-rl plan
    cluster = _run(BAGEL, _gpus(8, 80), 128e9, ["ray.address=auto"])
    assert cluster["host memory"][0] == "skipped" and "Ray object store" not in cluster


def test_object_store_gb_sizes_the_local_ray_and_is_refused_with_an_address(capsys: pytest.CaptureFixture) -> None:
    """The key reaches ray.init as object_store_memory (bytes); with ray.address it and num_cpus would be ignored
    (a cluster keeps what `ray start` gave it), so the recipe is refused in one line; the plan says whether it is
    room enough."""
    from unittest import mock

    from r3_rl.errors import UserError
    from r3_rl.ray_runtime import start_ray

    recipe = load_recipe(BAGEL, ["ray.object_store_gb=73"])
    with mock.patch("ray.is_initialized", return_value=False), mock.patch("ray.init") as init:
        assert start_ray(recipe.ray)
    assert init.call_args.kwargs["object_store_memory"] == 73_000_000_000
    for key in ("ray.object_store_gb=73", "ray.num_cpus=4"):
        with pytest.raises(UserError, match="cannot be set with address 'auto'"):
            load_recipe(BAGEL, [key, "ray.address=auto"])
    main(["plan", str(BAGEL), "--set", "ray.object_store_gb=50"])
    assert "ray.object_store_gb gives the object store 50 GB: less than the 57.7 GB it needs" in capsys.readouterr().out
    main(["plan", str(BAGEL)])
    assert "(or --set ray.object_store_gb=58; on a cluster ray start --object-store-memory)" in capsys.readouterr().out


def test_the_tiny_recipe_needs_nothing_of_a_gpu_or_the_host() -> None:
    found = _run(TINY, [], 8e9)
    assert found["GPU memory"][0] == "skipped" and found["host memory"][0] == "ok"
    assert "nothing beyond" in found["host memory"][1]


def test_ray_default_store_is_rays_rule(tmp_path: Path) -> None:
    """30% of the node, at most 200 GB, at most 95% of /dev/shm but never below 10 GB (Ray 2.x's
    ``resolve_object_store_memory``); compared with Ray's own function where this Ray version has it."""
    nowhere = Path("/nowhere")
    assert ray_default_store(100e9, nowhere) == pytest.approx(30e9)
    assert ray_default_store(2e12, nowhere) == pytest.approx(200e9)
    try:
        from ray._private.utils import get_shared_memory_bytes, resolve_object_store_memory
    except ImportError:
        return
    for total in (8e9, 100e9, 2e12):
        assert ray_default_store(int(total)) == pytest.approx(resolve_object_store_memory(int(total)), rel=1e-3)
    assert get_shared_memory_bytes() > 0


def test_physical_memory_takes_a_lower_cgroup_limit(tmp_path: Path) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text("4096\n")
    assert physical_memory(limit) == 4096
    limit.write_text("max\n")
    assert physical_memory(limit) == physical_memory(tmp_path / "absent") > 1e9
