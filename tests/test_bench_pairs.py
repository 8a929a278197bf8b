"""The alternated-pairs benchmark's arithmetic (tests/bench/pairs.py): which way a ratio points,
how pairs are ordered, and how CPU is read.  The benchmark itself never asserts speed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.bench import pairs
from tests.bench import topology as topo


def test_a_ratio_above_one_means_a_did_better_for_times_and_for_rates() -> None:
    assert pairs.pair_ratio(2.0, 3.0, higher_is_better=False) == pytest.approx(1.5)  # A took 2, B 3
    assert pairs.pair_ratio(120.0, 100.0, higher_is_better=True) == pytest.approx(1.2)  # A 120 MB/s, B 100
    assert pairs.pair_ratio(3.0, 2.0, higher_is_better=False) < 1


def test_compare_pairs_each_a_with_its_own_b_not_the_medians() -> None:
    # B is slower in four pairs of five, by half in three: paired, A is 1.5x; the medians
    # alone (4 against 4.4) would say 1.1x.
    a = [1.0, 2.0, 4.0, 8.0, 16.0]
    b = [1.5, 3.0, 4.4, 4.0, 24.0]
    c = pairs.compare(a, b, higher_is_better=False)
    assert c.n == 5
    assert c.median == pytest.approx(1.5)
    assert c.a_ahead == 4
    assert c.q1 <= c.median <= c.q3
    assert c.q1 == pytest.approx(1.1) and c.q3 == pytest.approx(1.5)


def test_compare_refuses_unpaired_lists() -> None:
    with pytest.raises(ValueError):
        pairs.compare([1.0, 2.0], [1.0], higher_is_better=True)
    with pytest.raises(ValueError):
        pairs.compare([], [], higher_is_better=True)


def test_one_pair_has_no_spread() -> None:
    c = pairs.compare([2.0], [1.0], higher_is_better=True)
    assert (c.median, c.q1, c.q3, c.a_ahead) == (2.0, 2.0, 2.0, 1)


def test_pairs_alternate_which_side_runs_first() -> None:
    firsts = [pairs.order(p)[0] for p in range(6)]
    assert firsts == ["A", "B", "A", "B", "A", "B"]
    assert all(sorted(pairs.order(p)) == ["A", "B"] for p in range(6))


# A process of two threads: the main one waits on standard input, the other spins.
_SPINNER = """
import sys, threading

def spin():
    while True:
        pass

t = threading.Thread(target=spin, daemon=True)
t.start()
print(t.native_id, flush=True)
sys.stdin.read()
"""


def test_cpu_is_read_in_nanoseconds_from_every_thread() -> None:
    if topo.cpu_ns([os.getpid()]) == 0:
        pytest.skip("this kernel keeps no schedstat")
    # A process of its own: cpu_ns counts the threads alive now, and in pytest's own process
    # threads of earlier tests may end meanwhile and take their CPU out of the sum.
    child = subprocess.Popen([sys.executable, "-c", _SPINNER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        tid = int(child.stdout.readline())
        before = topo.cpu_ns([child.pid])
        spun = _thread_cpu_ns(child.pid, tid)
        # Until the spinning thread alone has been charged 20 ms more: a count of
        # whole-process ticks, or of the main thread only, would not move by that.
        while _thread_cpu_ns(child.pid, tid) - spun <= 20_000_000:
            pass
        during = topo.cpu_ns([child.pid])
    finally:
        child.kill()
        child.wait()
    assert during - before >= 20_000_000
    assert topo.cpu_ns([2**22 + 12345]) == 0  # a process that is not there costs nothing


def _thread_cpu_ns(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


# -- tests/bench/hotspots.py: charging perf samples to Python functions ----------------
PERF_SCRIPT = """\
\t    ffffffff8142d2f0 do_syscall_64
\t          29ec30 os_stat_impl
\t          10d6a0 _PyEval_EvalFrameDefault
\t    7f3c778c222c py::JailedSFTPServer._stat:/venv/lib/python3.13/site-packages/x2go_sftp/backend.py
\t    7f3c778c2000 py::SFTPEngine._process:/venv/lib/python3.13/site-packages/x2go_sftp/engine.py

\t          10d6a0 _PyEval_EvalFrameDefault
\t    7f3c778c0da2 py::Packetizer.read_all:/venv/lib/python3.13/site-packages/paramiko/packet.py

\t          10d6a0 _PyEval_EvalFrameDefault
\t    7f3c778c222c py::JailedSFTPServer._stat:/venv/lib/python3.13/site-packages/x2go_sftp/backend.py

\t    ffffffff81000000 schedule
\t           4d991 ev_run
"""


def test_hotspots_charge_each_sample_to_its_innermost_python_function() -> None:
    from tests.bench import hotspots

    stacks = hotspots.samples(PERF_SCRIPT)
    assert len(stacks) == 4
    funcs, modules, kernel = hotspots.charge(stacks)
    stat = "JailedSFTPServer._stat (x2go_sftp/backend.py)"
    # The caller (_process) gets nothing: the sample is the innermost function's, C and kernel included.
    assert funcs == {stat: 2, "Packetizer.read_all (paramiko/packet.py)": 1, "(native) ev_run": 1}
    assert modules["x2go_sftp/backend.py"] == 2 and modules["paramiko/packet.py"] == 1
    assert kernel == {stat: 1, "(native) ev_run": 1}  # one of _stat's two samples was in a system call
