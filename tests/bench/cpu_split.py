"""Where a small request's CPU goes in the library's process, by thread or greenlet (an experiment, not a test).

    python -m tests.bench.cpu_split                       # Debian 12's paramiko; gevent-gcm, threads-gcm, forward
    python -m tests.bench.cpu_split --paramiko newest --variants gevent,forward --workload read

Builds the benchmark's topology (tests/bench/bench_mount.py), starts each
variant's worker with ``X2GO_BENCH_CPU_SPLIT`` set, and times ``--requests``
one-at-a-time requests through its sshfs mount: ``stat`` of names that do not
exist (one LSTAT round trip each), ``read`` (one 32 KiB READ each, no
readahead), ``create`` (a new file of 100 bytes each, as the benchmark's
create step: sshfs's LSTAT, OPEN, FSTAT, WRITE and CLOSE) or ``ls`` (``ls -l``
of a fresh directory of 2000 files each).  Meanwhile the worker charges its CPU to the one who ran:

* under gevent, each greenlet: ``greenlet.settrace`` reads the thread's CPU
  clock at every switch (a few microseconds per switch of overhead, charged
  to whoever switches);
* under threads, each thread: its ``/proc/self/task/N/schedstat``;

and names them by role: python-x2go's transport (the outer hop), the SFTP
sessions (inner SSH on the fast path and the SFTP engine), the inner
transports (paramiko's, parked while the fast path runs), ``forward``'s relay
to OpenSSH's sshd, the gevent hub, native threads outside ``threading``
(write-behind).  Printed per request, with the wall time and the process's
total from ``/proc``.

This is how to tell what of a request's cost is ours: ``forward``'s
outer hop and hub are python-x2go's whatever sits behind them; the SFTP
sessions' row is what this library adds in their place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

ENV = "X2GO_BENCH_CPU_SPLIT"  # a directory: the worker writes cpu-<pid>.json there on SIGUSR2
HUB = "gevent hub (event loop)"
OUTER = "python-x2go's transport (outer hop)"
SESSION = "SFTP sessions (inner SSH fast path + engine)"
INNER = "inner transports (paramiko)"
RELAY = "forward's relay to sshd"
NATIVE = "native threads (write-behind)"
OTHER = "other"


def _task_cpu_ns(native_id: int) -> int:
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as f:
            return int(f.read().split()[0])
    except OSError:
        return 0


def _all_tasks_ns() -> dict[int, int]:
    return {int(t): _task_cpu_ns(int(t)) for t in os.listdir("/proc/self/task")}


def install(out_dir: Path, outer: Any, gevent_mode: bool) -> None:
    """In the worker: account CPU by role from SIGUSR1 on; write it out on SIGUSR2."""
    import paramiko
    from paramiko.server import SubsystemHandler

    def role(thread: Any) -> str:
        if thread is outer:
            return OUTER
        if isinstance(thread, SubsystemHandler):
            return SESSION
        if isinstance(thread, paramiko.Transport):
            return INNER
        if str(getattr(thread, "name", "")).endswith(("(pump)", "(relay)")):  # tests.bench.worker.Relay's threads
            return RELAY
        return OTHER

    state: dict[str, Any] = {"on": False, "tasks": {}}
    charged: Counter[str] = Counter()

    if gevent_mode:
        import greenlet
        from gevent.hub import Hub

        clock = time.thread_time_ns
        main_tid = threading.get_native_id()
        roles: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()  # an id can be reused
        last = [clock()]

        def greenlet_role(g: Any) -> str:
            r = roles.get(g)
            if r is None:
                if isinstance(g, Hub):
                    r = HUB
                else:
                    t = threading._active.get(id(g))  # type: ignore[attr-defined]  # gevent: ident = id(greenlet)
                    r = role(t) if t is not None else OTHER
                roles[g] = r
            return r

        def trace(event: str, args: Any) -> None:
            if event in ("switch", "throw"):
                now = clock()
                if state["on"]:
                    charged[greenlet_role(args[0])] += now - last[0]
                last[0] = now

        greenlet.settrace(trace)

    def start(*_: Any) -> None:
        charged.clear()
        state["tasks"] = _all_tasks_ns()
        if gevent_mode:
            last[0] = time.thread_time_ns()
        state["on"] = True

    def dump(*_: Any) -> None:
        if gevent_mode:
            charged[greenlet_role(greenlet.getcurrent())] += clock() - last[0]  # the one running now
        state["on"] = False
        now = _all_tasks_ns()
        before = state["tasks"]
        result: Counter[str] = Counter()
        if gevent_mode:
            result.update(charged)
            for tid, ns in now.items():
                if tid != main_tid:
                    result[NATIVE] += ns - before.get(tid, 0)
        else:
            known = {}
            for t in threading.enumerate():
                if t.native_id is not None:
                    known[t.native_id] = role(t)
            for tid, ns in now.items():
                result[known.get(tid, NATIVE)] += ns - before.get(tid, 0)
        total = sum(ns - before.get(tid, 0) for tid, ns in now.items())
        tmp = out_dir / f".cpu-{os.getpid()}.json"
        tmp.write_text(json.dumps({"roles": dict(result), "process": total}))
        tmp.replace(out_dir / f"cpu-{os.getpid()}.json")  # whole, or not there

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, dump)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paramiko", default="debian12", help="one release, as bench_mount's --paramiko")
    parser.add_argument("--variants", default="gevent-gcm,threads-gcm,forward")
    parser.add_argument("--workload", choices=("stat", "read", "create", "ls"), default="stat",
                        help="per request: LSTAT of an absent name, a 32 KiB READ; per file created; "
                             "or per `ls -l` of 2000 files")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="alternations over the variants (medians printed)")
    args = parser.parse_args()
    from tests.bench import bench_mount as bm

    setup = bm.configs([args.paramiko], "on", False)[0]
    variants = [v for v in args.variants.split(",") if v]
    no_worker = [v for v in variants if v in ("openssh", "direct")]
    if no_worker:  # no Python worker to charge: SIGUSR1 would end OpenSSH's ssh instead
        parser.error(f"no worker process to split in {', '.join(no_worker)}")
    with tempfile.TemporaryDirectory(prefix="x2go-cpu-split-") as tmp:
        work, out = Path(tmp) / "work", Path(tmp) / "out"
        work.mkdir()
        out.mkdir()
        bench = bm.Bench(work, dataclasses.replace(bm.SHORT), "", None)
        bench.python = setup.release.python
        bench.worker_env = dict(setup.env, **{ENV: str(out)})
        rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        try:
            eps = {v: bench.endpoint(v) for v in variants}
            mnts = {v: bench.mount(eps[v]) for v in variants}
            src = bench.local_file(args.requests * bm.REQUEST_SIZE) if args.workload == "read" else ""
            for rnd in range(args.rounds):
                for v in variants if rnd % 2 == 0 else variants[::-1]:
                    if args.workload == "ls":  # sshfs caches a listing: each one of a fresh directory
                        src = ",".join(_fresh_dir(bench) for _ in range(args.requests))
                    elif args.workload == "create":  # new names each time, in a directory sshfs has not seen
                        src = _fresh_dir(bench, 0)
                    rows[v].append(_measure(eps[v], mnts[v], args.workload, args.requests, rnd, src, out))
            bench.unmount_all()
            for ep in eps.values():
                ep.stop()
        finally:
            bench.close()
    what = {"stat": "LSTAT of an absent name", "read": "32 KiB READ", "create": "file of 100 bytes created",
            "ls": "`ls -l` of 2000 files"}[args.workload]
    print(f"CPU per request, us (medians of {args.rounds} rounds of {args.requests} x {what}, one at a time; "
          f"paramiko {setup.release.version}, cryptography {setup.release.cryptography})")
    roles = [r for r in (OUTER, HUB, SESSION, INNER, RELAY, NATIVE, OTHER)
             if any(row.get(r, 0) >= 0.5 for v in variants for row in rows[v])]
    width = max(len(r) for r in [*roles, "wall per request", "process (from /proc)"])
    print(" " * width + "".join(f"{v:>14}" for v in variants))
    for label in ("wall per request", "process (from /proc)", *roles):
        cells = [statistics.median(row.get(label, 0.0) for row in rows[v]) for v in variants]
        print(f"{label:<{width}}" + "".join(f"{c:14.1f}" for c in cells))
    return 0


def _fresh_dir(bench: Any, files: int | None = None) -> str:
    name = bench.fresh("ls")
    (bench.data / name).mkdir()
    for i in range(bench.sizes.ls_files if files is None else files):
        (bench.data / name / f"entry-{i:05d}.txt").write_bytes(b"")
    return str(name)


def _measure(ep: Any, mnt: Path, workload: str, n: int, rnd: int, src: str, out: Path) -> dict[str, float]:
    pid = ep.hop_pids()[0]
    report = out / f"cpu-{pid}.json"
    report.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    fd = os.open(mnt / src, os.O_RDONLY) if workload == "read" else -1
    try:
        if fd >= 0:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.perf_counter()
        for i in range(n):
            if workload == "ls":
                subprocess.run(["ls", "-l", "--", str(mnt / src.split(",")[i])], stdout=subprocess.DEVNULL, check=True)
                continue
            if workload == "create":
                with open(mnt / src / f"f-{rnd}-{i:05d}", "wb") as f:
                    f.write(b"x" * 100)
                continue
            if fd >= 0:
                os.pread(fd, 32 * 1024, ((i * 7919) % n) * 32 * 1024)
            else:
                try:  # noqa: SIM105 (timed loop)
                    os.stat(mnt / f"absent-{rnd}-{i}")
                except FileNotFoundError:
                    pass
        wall = time.perf_counter() - t0
    finally:
        if fd >= 0:
            os.close(fd)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not report.exists():  # renamed into place by the worker's signal handler
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {pid} wrote no CPU report")
        time.sleep(0.01)
    data = json.loads(report.read_text())
    row = {role: ns / n / 1000 for role, ns in data["roles"].items()}
    row["process (from /proc)"] = data["process"] / n / 1000
    row["wall per request"] = wall / n * 1e6
    return row


if __name__ == "__main__":
    sys.exit(main())
