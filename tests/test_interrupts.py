"""Ctrl-C always ends `r3-rl train`: a KeyboardInterrupt first (clean-up runs), a hard exit if clean-up hangs."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from r3_rl.interrupts import InterruptWatchdog


def test_first_ctrl_c_raises_and_a_hung_clean_up_is_ended_after_the_grace() -> None:
    exits: list[str] = []
    done = threading.Event()
    dog = InterruptWatchdog(grace_s=0.2, exit_fn=lambda why: (exits.append(why), done.set()))
    with pytest.raises(KeyboardInterrupt):
        dog(signal.SIGINT, None)
    assert exits == []  # clean-up gets its grace period first
    assert done.wait(5.0)
    assert exits == ["clean-up took over 0.2 s"]


def test_clean_up_that_ends_in_time_is_not_cut_short() -> None:
    exits: list[str] = []
    dog = InterruptWatchdog(grace_s=0.3, exit_fn=exits.append)
    with pytest.raises(KeyboardInterrupt):
        dog(signal.SIGINT, None)
    dog.cancel()
    time.sleep(0.6)
    assert exits == []


def test_a_second_ctrl_c_exits_at_once() -> None:
    exits: list[str] = []
    dog = InterruptWatchdog(grace_s=60.0, exit_fn=exits.append)
    with pytest.raises(KeyboardInterrupt):
        dog(signal.SIGINT, None)
    dog(signal.SIGINT, None)  # no second KeyboardInterrupt: the process is leaving
    assert exits == ["second Ctrl-C during clean-up"]
