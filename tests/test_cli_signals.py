"""x2go-sftp share's signal handling: a signal never waits for a lock its own thread holds.

A Python signal handler runs in the main thread between two bytecodes, possibly
while that thread holds the lock ``threading.Event.set()`` takes (``Event.wait()``
holds it as it starts and ends; the share's main loop waits twice a second).
A handler calling ``set()`` there deadlocks: CI once saw ``x2go-sftp share``
never end after SIGINT.  These tests put the handler exactly there, in a child
process (a deadlock must end the child, not the test run).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD_TIMEOUT = 60


def _child(body: str) -> subprocess.CompletedProcess[str]:
    script = "import os, signal\nfrom x2go_sftp import cli\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=CHILD_TIMEOUT)


def test_a_signal_while_the_main_thread_holds_the_stop_events_lock_still_stops() -> None:
    res = _child("""
        with cli._SignalStop() as signals:
            signals.logging_in = False
            with signals.event._cond:  # held, as Event.wait() holds it when it starts and ends
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, in this thread
                print("handler returned", flush=True)
            print("stop set" if signals.event.wait(30) else "stop NOT set", flush=True)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["handler returned", "stop set"]


def test_a_signal_while_logging_in_interrupts_and_stops() -> None:
    res = _child("""
        with cli._SignalStop() as signals:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pause()  # not reached: the handler raises first
            except cli._Stop as e:
                print("interrupted by", e, flush=True)
            print("stop set" if signals.event.wait(30) else "stop NOT set", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # after the first, signals only stop
            print("second signal only stops", flush=True)
        print("handlers restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["interrupted by SIGTERM", "stop set", "second signal only stops",
                                       "handlers restored: True"]


def test_a_burst_of_signals_neither_blocks_nor_leaks() -> None:
    res = _child("""
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with cli._SignalStop() as signals:
                signals.logging_in = False
                for _ in range(100_000 // 3):  # far more than a pipe holds: the handler must not block
                    os.kill(os.getpid(), signal.SIGHUP)
                assert signals.event.wait(30)
        import threading
        print(len(os.listdir("/proc/self/fd")) - before, threading.active_count(), flush=True)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "1"]  # no descriptor left open, no thread left running
