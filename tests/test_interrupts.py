"""Ctrl-C (and SIGTERM) always ends `r3-rl train`: a KeyboardInterrupt first (clean-up runs), a hard exit if clean-up
hangs."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from r3_rl.interrupts import InterruptWatchdog


def test_first_ctrl_c_raises_and_a_hung_clean_up_is_ended_after_the_grace() -> None:
    exits: list[str] = []
    done = threading.Event()
    dog = InterruptWatchdog(grace_s=0.2, exit_fn=lambda why, code: (exits.append((why, code)), done.set()))
    with pytest.raises(KeyboardInterrupt):
        dog(signal.SIGINT, None)
    assert exits == []  # clean-up gets its grace period first
    assert done.wait(5.0)
    assert exits == [("clean-up took over 0.2 s", 130)]


def test_clean_up_that_ends_in_time_is_not_cut_short() -> None:
    exits: list[str] = []
    dog = InterruptWatchdog(grace_s=0.3, exit_fn=lambda why, code: exits.append(why))
    with pytest.raises(KeyboardInterrupt):
        dog(signal.SIGINT, None)
    dog.cancel()
    time.sleep(0.6)
    assert exits == []


def test_a_second_ctrl_c_exits_at_once() -> None:
    exits: list[str] = []
    dog = InterruptWatchdog(grace_s=60.0, exit_fn=lambda why, code: exits.append((why, code)))
    with pytest.raises(KeyboardInterrupt):
        dog(signal.SIGINT, None)
    dog(signal.SIGINT, None)  # no second KeyboardInterrupt: the process is leaving
    assert exits == [("second Ctrl-C during clean-up", 130)]


def test_sigterm_takes_the_same_path_and_exits_143() -> None:
    """``kill PID`` or a scheduler's SIGTERM: the clean-up of Ctrl-C (a ``KeyboardInterrupt`` the CLI catches), told
    apart as ``Terminated``; a hung clean-up or a second SIGTERM ends the process with 143 (128 + 15)."""
    from r3_rl.interrupts import Terminated

    exits: list[tuple[str, int]] = []
    dog = InterruptWatchdog(grace_s=60.0, exit_fn=lambda why, code: exits.append((why, code)))
    with pytest.raises(Terminated):
        dog(signal.SIGTERM, None)
    assert issubclass(Terminated, KeyboardInterrupt)
    dog(signal.SIGTERM, None)
    assert exits == [("second SIGTERM during clean-up", 143)]
    done = threading.Event()
    dog = InterruptWatchdog(grace_s=0.2, exit_fn=lambda why, code: (exits.append((why, code)), done.set()))
    with pytest.raises(Terminated):
        dog(signal.SIGTERM, None)
    assert done.wait(5.0) and exits[-1] == ("clean-up took over 0.2 s", 143)


def test_the_cli_reports_sigterm_and_exits_143(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from r3_rl import cli
    from r3_rl.interrupts import Terminated

    def raise_(exc):
        def command(args):
            raise exc
        return command

    monkeypatch.setitem(cli.COMMANDS, "data", raise_(Terminated()))
    assert cli.main(["data"]) == 143
    assert capsys.readouterr().err == "r3-rl: terminated (SIGTERM)\n"
    monkeypatch.setitem(cli.COMMANDS, "data", raise_(KeyboardInterrupt()))
    assert cli.main(["data"]) == 130
    assert capsys.readouterr().err == "r3-rl: interrupted\n"


def test_reclaim_puts_the_watchdog_back_after_a_library_replaced_it() -> None:
    """``ray.init`` replaces SIGTERM's handler below Python (it aborts with no clean-up): ``reclaim`` sets ours
    again; without an installed watchdog (tests, notebooks) it leaves the handlers alone."""
    from r3_rl import interrupts

    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        interrupts._installed = None
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        interrupts.reclaim()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        dog = interrupts.install(grace_s=30)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupts.reclaim()
        assert signal.getsignal(signal.SIGTERM) is dog and signal.getsignal(signal.SIGINT) is dog
    finally:
        interrupts._installed = None
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
