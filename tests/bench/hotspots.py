"""Where the process holding python-x2go's connection spends its CPU in one workload, by Python function.

    python -m tests.bench.hotspots --paramiko debian13 --variant gevent-gcm --workload create
    python -m tests.bench.hotspots --paramiko ubuntu24.04 --variant forward-gcm --workload stat --seconds 10

An experiment, not a test.  Mounts one variant of one release (X2Go's exact
sshfs mount, the benchmark's topology), runs one of ``tests.bench.pairs``'
workloads on it over and over for ``--seconds``, and meanwhile samples the
hop process (python-x2go's connection and, for x2go-sftp's variants, the
library) with ``perf record`` (Debian's ``linux-perf``).

Each sample is charged to the innermost Python function on its stack, with
what that function called in C and in the kernel (system calls) included, or
to the native function at the bottom of the stack when no Python function is
on it.  This needs Python's perf support (3.12 and later: the worker runs
with ``PYTHONPERFSUPPORT=1``), so the releases whose venv has such a Python:
``ubuntu24.04`` (3.12) and ``debian13`` (3.13).  Unlike py-spy, it is not
misled by gevent's greenlet switches and sees the kernel; unlike cProfile, it
adds no cost per call (sampling at ``--frequency`` Hz with DWARF unwinding
costs the process a few percent).

Printed: the workload's wall time and the process's CPU per operation (as
``pairs`` measures them, from ``/proc``), then the modules and functions with
the most samples, each as microseconds of CPU per operation and the part of
that spent in the kernel.  Percentages are of all the process's samples.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tests.bench import bench_mount as bm
from tests.bench import pairs
from tests.bench import topology as topo

PERF = "perf"
# Below this, Python functions have no perf trampolines: samples stay in the interpreter's own frames.
PERF_SUPPORT_FROM = (3, 12)


def python_version(python: str) -> tuple[int, int]:
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1])


def samples(perf_script: str) -> list[list[tuple[str, bool]]]:
    """``perf script -F ip,sym`` output as stacks of (symbol, in the kernel), innermost first."""
    out: list[list[tuple[str, bool]]] = []
    cur: list[tuple[str, bool]] | None = None
    for line in perf_script.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur = None
            continue
        if not line[0].isspace():  # a sample's header line (-F ip,sym prints none, but be lenient)
            continue
        ip, _, sym = line.strip().partition(" ")
        if cur is None:
            cur = []
        cur.append((sym.strip() or "[unknown]", ip.startswith("ffffffff")))
    if cur:
        out.append(cur)
    return out


def _where(sym: str) -> tuple[str, str]:
    """(function, module) of a perf trampoline symbol ``py::func:/path/to/module.py``."""
    func, _, path = sym[4:].partition(":")
    path = re.sub(r".*/site-packages/", "", path)
    path = re.sub(r".*/lib/python3\.\d+/", "", path)
    path = re.sub(r".*/(x2go_sftp|tests)/", r"\1/", path)
    return func, path


def charge(stacks: list[list[tuple[str, bool]]]) -> tuple[collections.Counter[str], collections.Counter[str],
                                                            collections.Counter[str]]:
    """Samples per function and per module (innermost Python frame), and the kernel's part per function."""
    funcs: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    kernel: collections.Counter[str] = collections.Counter()
    for stack in stacks:
        py = next((i for i, (sym, _) in enumerate(stack) if sym.startswith("py::")), None)
        if py is None:
            key = module = f"(native) {stack[-1][0]}"
        else:
            func, module = _where(stack[py][0])
            key = f"{func} ({module})"
        funcs[key] += 1
        modules[module] += 1
        if any(in_kernel for _, in_kernel in stack[:py]):  # below the Python frame, or anywhere without one
            kernel[key] += 1
    return funcs, modules, kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paramiko", default="debian13", help="one release with Python >= 3.12 (default debian13)")
    parser.add_argument("--variant", default="gevent-gcm", help="a variant with a Python hop (bench_mount's names)")
    parser.add_argument("--workload", default="create", choices=sorted(pairs.WORKLOADS))
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to sample (default 8)")
    parser.add_argument("--frequency", type=int, default=2000, help="samples per second (default 2000)")
    parser.add_argument("--top", type=int, default=30, help="functions to print (default 30)")
    parser.add_argument("--mib", type=int, default=64, help="MiB per read or write (default 64)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("hotspots: needs root (FUSE mounts, sshd, perf)", file=sys.stderr)
        return 2
    if not bm.is_variant(args.variant) or args.variant in bm.OPENSSH_ONLY or args.variant == "direct":
        parser.error(f"{args.variant!r}: not a variant with a Python process to sample")
    try:
        subprocess.run([PERF, "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        print("hotspots: perf not found (apt-get install linux-perf)", file=sys.stderr)
        return 2
    config = bm.configs([args.paramiko], "on", False)[0]
    version = python_version(config.release.python)
    if version < PERF_SUPPORT_FROM:
        print(f"hotspots: {config.label} runs Python {version[0]}.{version[1]}, without perf support; "
              f"take ubuntu24.04 or debian13", file=sys.stderr)
        return 2
    sizes = replace(bm.SHORT, seq_bytes=args.mib * bm.MiB)
    with tempfile.TemporaryDirectory(prefix="x2go-hotspots-") as tmp:
        bench = bm.Bench(Path(tmp), sizes, "", None)
        bench.python = config.release.python
        bench.worker_env = dict(config.env, PYTHONPERFSUPPORT="1")
        side = None
        try:
            side = pairs.Side(bench, args.variant)
            pairs.measure(bench, side, args.workload, args.mib, "warm")
            assert side.ep.hop_pids is not None
            pids = side.ep.hop_pids()
            data = Path(tmp) / "perf.data"
            perf = subprocess.Popen([PERF, "record", "-q", "-e", "cpu-clock", "-F", str(args.frequency),
                                     "--call-graph", "dwarf,16384", "-o", str(data), "-p", ",".join(map(str, pids))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # perf attaches before the first measured operation
            values: list[float] = []
            c0, t0, i = topo.cpu_ns(pids), time.monotonic(), 0
            while time.monotonic() - t0 < args.seconds:
                value, _ = pairs.measure(bench, side, args.workload, args.mib, f"h{i}")
                values.append(value)
                i += 1
            cpu_ns = topo.cpu_ns(pids) - c0
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
            script = subprocess.run([PERF, "script", "-i", str(data), "-F", "ip,sym"],
                                    capture_output=True, text=True, check=False).stdout
        finally:
            bench.unmount_all()
            if side is not None:
                side.ep.stop()
            bench.cleanup_data()
            bench.close()
    title, unit, _ = pairs.WORKLOADS[args.workload]
    per_measure, op_name = {
        "one": (sizes.requests, "READ"), "stat": (pairs.STATS_PER_PAIR, "LSTAT"),
        "create": (sizes.create_files, "file"), "ls": (1, "listing"),
        "read": (args.mib * bm.MiB / bm.MB, "MB"), "write": (args.mib * bm.MiB / bm.MB, "MB"),
    }[args.workload]
    cpu_per_op = cpu_ns / 1000 / (len(values) * per_measure)  # us
    stacks = samples(script)
    funcs, modules, kernel = charge(stacks)
    n = len(stacks) or 1
    print(f"# {config.label}, {args.variant}, {title}: {len(values)} runs, median {sorted(values)[len(values) // 2]:.1f} "
          f"{unit}; the process's CPU {cpu_per_op:.0f} us per {op_name}; {len(stacks)} samples")
    print("")
    print(f"| module | us per {op_name} | share |")
    print("|---|---|---|")
    for module, count in modules.most_common(args.top // 2):
        print(f"| {module} | {count / n * cpu_per_op:.1f} | {count / n * 100:.1f} % |")
    print("")
    print(f"| function (innermost Python frame) | us per {op_name} | of which in the kernel | share |")
    print("|---|---|---|---|")
    for key, count in funcs.most_common(args.top):
        print(f"| {key} | {count / n * cpu_per_op:.1f} | {kernel[key] / n * cpu_per_op:.1f} | {count / n * 100:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
