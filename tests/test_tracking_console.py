"""Console: plain lines every N steps when not a TTY, a rich progress bar with ETA on one."""
from __future__ import annotations

import io

from r3_rl.tracking.console import Console, fmt_seconds, status_line

M = {"1_reward/generate": 0.5, "2_accuracy/round0": 0.25, "6_refine/delta_mean": 0.125,
     "6_refine/stop_rate": 0.5, "3_understanding/verdict_balanced_accuracy": 0.75, "learner/loss": -0.01}


def test_plain_lines_every_n_steps_with_eta() -> None:
    buf = io.StringIO()
    c = Console(every=5, file=buf, tty=False)
    for step in range(12):
        c.step(step, 12, M, elapsed=2.0 * (step + 1))
    lines = buf.getvalue().splitlines()
    # first step, every 5th step, and the last step
    assert [line.split()[1] for line in lines] == ["1/12", "5/12", "10/12", "12/12"]
    assert "\x1b" not in buf.getvalue()  # no control codes in a log file
    assert "reward A 0.500" in lines[0] and "refine dR +0.125" in lines[0] and "verdict 0.75" in lines[0]
    assert lines[1].endswith("elapsed 0:10  eta 0:14")  # 2 s/step, 7 steps left


def test_auto_interval_and_resume_eta() -> None:
    buf = io.StringIO()
    c = Console(file=buf, tty=False)  # every=0: about twenty lines per run
    for step in range(50, 100):  # resumed at step 50
        c.step(step, 100, {}, elapsed=1.0 * (step - 49))
    lines = buf.getvalue().splitlines()
    assert 10 <= len(lines) <= 12
    assert lines[-1].startswith("step 100/100") and "eta 0:00" in lines[-1]
    assert "eta 0:45" in next(line for line in lines if line.startswith("step  55/100"))  # 1 s/step since resume


def test_disabled_console_is_silent() -> None:
    buf = io.StringIO()
    c = Console(enabled=False, file=buf, tty=False)
    c.print("hello")
    c.step(0, 1, M, 1.0)
    assert buf.getvalue() == ""


def test_tty_progress_bar() -> None:
    buf = io.StringIO()
    c = Console(file=buf, tty=True)
    for step in range(3):
        c.step(step, 3, M, elapsed=float(step + 1))
    out = buf.getvalue()
    assert "3/3" in out and "reward A 0.500" in out and "eta" in out
    assert c._progress is None  # stopped after the last step
    c.print("after the bar")
    assert "after the bar" in buf.getvalue()


def test_formatting_helpers() -> None:
    assert fmt_seconds(3725) == "1:02:05" and fmt_seconds(65) == "1:05" and fmt_seconds(float("nan")) == "?"
    assert "acc A -" in status_line({})


def test_a_one_stage_step_shows_the_other_stages_latest_figures() -> None:
    """tree.schedule alternate: a B+C step has no first-image figures, a stage-A step no critic figures; the line
    shows each figure's latest value, and the loss of this step only."""
    buf = io.StringIO()
    c = Console(every=1, file=buf, tty=False)
    stage_a = {"1_reward/generate": 0.5, "2_accuracy/round0": 0.25, "learner/loss": -0.01}
    stage_bc = {"6_refine/delta_mean": 0.125, "6_refine/stop_rate": 0.5,
                "3_understanding/verdict_balanced_accuracy": 0.75}  # no loss: every group agreed
    for step, m in enumerate((stage_a, stage_bc)):
        c.step(step, 2, m, elapsed=1.0)
    first, second = buf.getvalue().splitlines()
    assert "reward A 0.500" in first and "verdict -" in first
    assert "reward A 0.500*" in second and "verdict 0.75 " in second and "loss -  " in second  # * = carried
