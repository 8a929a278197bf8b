"""Two variants mounted side by side and measured in alternated pairs (a benchmark, never a test).

    python -m tests.bench.pairs                                  # gevent-gcm against openssh, every release
    python -m tests.bench.pairs --paramiko debian12 --b forward --workloads create,ls,stat --pairs 16
    python -m tests.bench.pairs --b forward-gcm --workloads one,stat,create,ls  # install()'s own floor
    python -m tests.bench.pairs --a gevent-gcm --b gevent-gcm-no-yield --workloads stat,create  # an ablation
    python -m tests.bench.pairs --short                          # CI: 4 pairs, small sizes, Debian 12 and newest

``bench_mount`` runs each variant in turn, a whole round at a time.  On a
shared machine whose speed drifts by half within minutes, three rounds of that
cannot tell apart effects of 10 %.  Here both variants are mounted at once
(X2Go's exact sshfs mount, the benchmark's topology) and each workload runs on
A and B back to back, in the order A B, B A, A B, ..., so that a drift hits
both sides of a pair alike; one pair of each workload runs first unmeasured.  Each pair gives one ratio; the median ratio, its
quartiles and in how many pairs A came out ahead are printed.

Workloads (each pair measures one of each on both mounts):

* ``one``    median time of single 32 KiB READs (``POSIX_FADV_RANDOM``: one FUSE
  read, one SFTP READ each), bench_mount's "one request"
* ``stat``   LSTATs of absent names, one at a time: one small request each
* ``create`` creating files of 100 bytes in a fresh folder (7 requests each)
* ``ls``     ``ls -l`` of a fresh folder of 2000 files
* ``read``, ``write``  sequential transfer through the mount, MB/s

Ratios read like bench_mount's: > 1 means A is faster (B's time over A's, or
A's MB/s over B's).  Beside each, the CPU per operation of the process holding
python-x2go's connection, A's over B's (< 1 means A spends less), when both
variants have one (not ``openssh``, whose ``ssh -R`` client is only part of its
cost).  CPU is read from ``/proc/PID/task/*/schedstat``, in nanoseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tests.bench import bench_mount as bm
from tests.bench import topology as topo
from tests.bench import venvs

# Workload: (title, unit of the value, higher is better).
WORKLOADS: dict[str, tuple[str, str, bool]] = {
    "one": ("one 32 KiB READ", "us, median of the pair's requests", False),
    "stat": ("LSTAT of an absent name", "us each", False),
    "create": ("create a file", "ms each", False),
    "ls": ("ls -l of {n_ls} files", "ms", False),
    "read": ("sequential read", "MB/s", True),
    "write": ("sequential write", "MB/s", True),
}
DEFAULT_WORKLOADS = "one,stat,create,ls,read,write"
# LSTATs per pair in the stat workload: ~0.3 s of requests, long enough that a
# scheduler hiccup is a small part of it.
STATS_PER_PAIR = 500
# Unmeasured pairs before each workload's: the first requests after a mount, or
# after another workload, run through code and caches the others find warm (a
# first run of this tool measured one READ at 0.82x in its first workload, then
# 1.10x in a run of that workload alone).
WARMUP_PAIRS = 1
# Sequential sizes: large enough to reach a steady rate, small enough that a
# pair takes seconds.
PAIR_MIB = 128
SHORT_MIB = 16


@dataclass
class Comparison:
    """A against B over alternated pairs; every ratio > 1 means A did better."""

    n: int
    median: float
    q1: float
    q3: float
    a_ahead: int  # pairs in which A did better


def pair_ratio(a: float, b: float, higher_is_better: bool) -> float:
    """One pair's ratio, > 1 when A did better: A/B for a rate, B/A for a time."""
    return a / b if higher_is_better else b / a


def compare(a: list[float], b: list[float], higher_is_better: bool) -> Comparison:
    """The pairs' ratios (``a[i]`` with ``b[i]``), their median and quartiles, and A's wins."""
    if len(a) != len(b) or not a:
        raise ValueError("compare needs two equally long, non-empty lists of pairs")
    ratios = sorted(pair_ratio(x, y, higher_is_better) for x, y in zip(a, b, strict=True))
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    return Comparison(len(ratios), statistics.median(ratios), q1, q3, sum(r > 1 for r in ratios))


def order(pair: int) -> tuple[str, str]:
    """Which side runs first in pair ``pair``: A B, then B A, and so on."""
    return ("A", "B") if pair % 2 == 0 else ("B", "A")


class Side:
    """One variant's endpoint and mount, and what a workload measures on it."""

    def __init__(self, bench: bm.Bench, variant: str):
        self.variant = variant
        self.ep = bench.endpoint(variant)
        self.mnt = bench.mount(self.ep)
        self.has_hop = variant not in bm.OPENSSH_ONLY and self.ep.hop_pids is not None

    def cpu(self) -> int:
        return topo.cpu_ns(self.ep.hop_pids()) if self.has_hop and self.ep.hop_pids else 0


def measure(bench: bm.Bench, side: Side, workload: str, mib: int, tag: str) -> tuple[float, float]:
    """One measurement: the value, and the hop's CPU in us per operation (per MB for transfers)."""
    src = bench.local_file(mib * bm.MiB) if workload == "read" else None  # fresh: never in the mount's cache
    c0 = side.cpu()
    units: float
    if workload == "one":
        value, units = bench.latency_ms(side.mnt) * 1000, bench.sizes.requests
    elif workload == "stat":
        t0 = time.perf_counter()
        for i in range(STATS_PER_PAIR):
            with contextlib.suppress(FileNotFoundError):
                os.lstat(side.mnt / f"absent-{tag}-{i}")
        value, units = (time.perf_counter() - t0) / STATS_PER_PAIR * 1e6, STATS_PER_PAIR
    elif workload == "create":
        value = bench.create_files(side.mnt) / bench.sizes.create_files * 1000
        units = bench.sizes.create_files
    elif workload == "ls":
        value, units = bench.ls_l(side.mnt) * 1000, 1
    elif workload == "read":
        assert src is not None
        value, units = bench.seq_read(side.mnt, src), mib * bm.MiB / bm.MB
    elif workload == "write":
        value, units = bench.seq_write(side.mnt), mib * bm.MiB / bm.MB
    else:
        raise ValueError(f"unknown workload {workload}")
    cpu = (side.cpu() - c0) / 1000 / units
    if src is not None:
        (bench.data / src).unlink(missing_ok=True)
    return value, cpu


def run_release(bench: bm.Bench, a: str, b: str, workloads: list[str], pairs: int, mib: int,
                say: Callable[[str], None]) -> dict[str, tuple[Comparison, Comparison | None, float, float]]:
    """Mount A and B, run ``pairs`` alternated pairs of each workload; per workload the comparisons."""
    sides = {"A": Side(bench, a), "B": Side(bench, b)}
    out: dict[str, tuple[Comparison, Comparison | None, float, float]] = {}
    try:
        for w in workloads:
            values: dict[str, list[float]] = {"A": [], "B": []}
            cpus: dict[str, list[float]] = {"A": [], "B": []}
            for p in range(-WARMUP_PAIRS, pairs):
                for tag in order(p):
                    v, c = measure(bench, sides[tag], w, mib, f"{w}{p}{tag}")
                    if p >= 0:
                        values[tag].append(v)
                        cpus[tag].append(c)
            higher = WORKLOADS[w][2]
            time_cmp = compare(values["A"], values["B"], higher)
            cpu_cmp = None
            if sides["A"].has_hop and sides["B"].has_hop and all(cpus["A"]) and all(cpus["B"]):
                # CPU: "A ahead" when A spent less; the ratio printed is A's over B's.
                cpu_cmp = compare(cpus["B"], cpus["A"], True)
            out[w] = (time_cmp, cpu_cmp, statistics.median(values["A"]), statistics.median(values["B"]))
            say(f"#   {w}: {time_cmp.median:.3f}x, A ahead in {time_cmp.a_ahead} of {time_cmp.n}")
    finally:
        bench.unmount_all()
        for s in sides.values():
            s.ep.stop()
        bench.cleanup_data()
    return out


def table(label: str, a: str, b: str, pairs: int,
          results: dict[str, tuple[Comparison, Comparison | None, float, float]], sizes: bm.Sizes) -> str:
    lines = [f"## paramiko {label}: {a} (A) against {b} (B), {pairs} alternated pairs", "",
             "| workload | unit | A, median | B, median | A against B (> 1: A faster) | quartiles | A ahead "
             "| hop CPU per op, A / B |",
             "|---|---|---|---|---|---|---|---|"]
    for w, (t, c, ma, mb) in results.items():
        title, unit, _ = WORKLOADS[w]
        cpu = "-" if c is None else f"{1 / c.median:.3f} ({c.a_ahead} of {c.n} lower)"
        lines.append(f"| {title.format(n_ls=sizes.ls_files)} | {unit} | {ma:.1f} | {mb:.1f} | {t.median:.3f}x "
                     f"| {t.q1:.3f}..{t.q3:.3f} | {t.a_ahead} of {t.n} | {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default="gevent-gcm", help="variant A (bench_mount's names; default gevent-gcm)")
    parser.add_argument("--b", default="openssh", help="variant B, the reference (default openssh)")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"of {','.join(WORKLOADS)}")
    parser.add_argument("--pairs", type=int, default=None, help="alternated pairs per workload (default 12, short 4)")
    parser.add_argument("--mib", type=int, default=None,
                        help=f"MiB per sequential read or write (default {PAIR_MIB}, short {SHORT_MIB})")
    parser.add_argument("--paramiko", default=None, metavar="R1,R2",
                        help=f"releases, as bench_mount's --paramiko (default {','.join(venvs.SUPPORTED)}, "
                             f"short {','.join(venvs.SHORT)})")
    parser.add_argument("--short", action="store_true", help="4 pairs, small sizes, Debian 12 and the newest (CI)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("pairs: needs root (FUSE mounts, sshd)", file=sys.stderr)
        return 2
    for v in (args.a, args.b):
        if not bm.is_variant(v) or v == "direct":
            parser.error(f"unknown or unsupported variant {v!r}")
    if args.a == args.b:
        parser.error("A and B are the same variant")
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}")
    pairs = args.pairs or (4 if args.short else 12)
    mib = args.mib or (SHORT_MIB if args.short else PAIR_MIB)
    sizes = replace(bm.SHORT if args.short else bm.FULL, seq_bytes=mib * bm.MiB)
    with_paramiko = any(v not in bm.OPENSSH_ONLY for v in (args.a, args.b))
    names = [n for n in (args.paramiko or ",".join(venvs.SHORT if args.short else venvs.SUPPORTED)).split(",") if n]
    setups = bm.configs(names, "on", False) if with_paramiko else []

    def say(line: str) -> None:
        print(line, flush=True)

    tables = []
    with tempfile.TemporaryDirectory(prefix="x2go-pairs-") as tmp:
        bench = bm.Bench(Path(tmp), sizes, "", None)
        try:
            todo: list[bm.Config | None] = list(setups) or [None]
            for config in todo:
                label = config.label if config else "(none)"
                say(f"# {label}: {args.a} against {args.b}, {pairs} pairs of {','.join(workloads)}")
                bench.python = config.release.python if config else sys.executable
                bench.worker_env = config.env if config else {}
                t0 = time.monotonic()
                try:
                    results = run_release(bench, args.a, args.b, workloads, pairs, mib, say)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    say(f"# {label}: FAILED: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
                    continue
                say(f"# {label}: {time.monotonic() - t0:.0f}s")
                tables.append(table(label, args.a, args.b, pairs, results, sizes))
        finally:
            bench.close()
    say("")
    say(f"# load {os.getloadavg()[0]:.2f} at the end")
    for t in tables:
        say("")
        say(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
