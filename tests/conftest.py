"""Shared test set-up: offline hub, small thread count, tiny recipe helpers."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one OpenMP thread each, or their threads outnumber the cores and spin.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _tensorboard_files_counted_from_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard names an event file ``events.out.tfevents.<second>.<host>.<pid>.<n>``, ``n`` counting the
    writers the process made, and its loaders read a folder's files in name order: within one second writer 10
    sorts before writer 9.  A resumed run is a new process, counting from 0; a test process makes hundreds of
    writers, and a test that resumed a run in the same second as writer 9 read the new values before the old
    (test_a_resumed_run_replaces_the_replayed_steps_in_tensorboards_python_loader, after other files)."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` when it exists (compatibility tests only; the product never needs it)."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present")
    return path


def tiny_overrides(tmp_path: Path, steps: int = 2) -> list[str]:
    """Overrides that make tiny_blocks.yaml a seconds-long run for tests."""
    return [f"steps={steps}", f"out_dir={tmp_path}", "policy.tiny.hidden_size=32", "policy.tiny.num_layers=1",
            "policy.tiny.num_heads=2", "policy.tiny.intermediate_size=64", "warmstart.steps=2",
            "data.eval_size=8", "tree.group_size=2", "tree.prompts_per_step=2", "tree.refine_groups_per_step=2",
            "eval.rounds=1", "log.trajectories_every=1", "log.console=false"]


def cli_one_line_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``r3-rl ARGS`` in-process; assert exit code 2 and a one-line message on stderr, and return it."""
    from r3_rl.cli import main

    capsys.readouterr()  # whatever came before (a save's progress bars)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def ppo_base():
    """``(tiny policy, six items as two PPO episodes)`` with hand-worked rewards (``learner_helpers.ppo_episodes``),
    built once per module: the GAE and value-loss cases of two test modules read it, none changes it."""
    from learner_helpers import ppo_episodes

    return ppo_episodes()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (about 5 s and 1 GB to start), shut down at the end.

    Four logical CPUs on any machine: tests place two rollout actors and a reward actor at once.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
