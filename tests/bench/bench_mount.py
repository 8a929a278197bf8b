"""Benchmark: a shared folder through X2Go's real sshfs mount, this library vs OpenSSH.

    python -m tests.bench.bench_mount            # full run: Debian 12, Ubuntu 24.04, Debian 13, newest (~40 min on 2 cores)
    python -m tests.bench.bench_mount --short    # CI: small sizes, one round, Debian 12's paramiko and the newest
    python -m tests.bench.bench_mount --short --paramiko debian12,2.12.0 --variants gevent,openssh  # cryptography's part
    python -m tests.bench.bench_mount --short --paramiko 2.12.0 --asbytes-fix both --variants gevent,openssh
    python -m tests.bench.bench_mount --paramiko current   # only the paramiko of this interpreter, no venv

Builds the topology itself, all on 127.0.0.1: an sshd plays the X2Go server;
python-x2go's outer paramiko connection logs into it with a command running
(as python-x2go always has); sshfs connects to the reverse-forwarded port
with X2Go's exact options.  Variants, each in its own process:

* ``gevent``  this library, gevent monkey-patched (how python-x2go runs)
* ``threads`` this library, plain threads
* ``gevent-gcm`` this library under gevent with ``outer_gcm=True`` (python-x2go's
  connection rekeyed to AES-GCM: what ``integrate.install()`` does)
* ``threads-gcm`` plain threads with ``outer_gcm=True`` (as ``x2go-sftp share`` runs:
  no gevent, its own connection on AES-GCM)
* ``openssh`` the all-OpenSSH tunnel: ``ssh -R`` (with a command running) to the
  same sshd, ending at a second local sshd whose sftp-server serves the folder
* ``legacy``  the 2014 design of python-x2go's sftpserver (tests/bench/legacy.py), under gevent
* ``forward`` the floor under any in-process design: python-x2go's connection
  (paramiko, gevent) only relays each forwarded channel to the local sshd, which
  does the inner SSH and SFTP in C; its "hop CPU" is the paramiko hop alone
* ``direct``  sshfs straight to the local sshd, no tunnel

Each paramiko release (``--paramiko``, default: the table of supported
releases as the distributions ship them, ``debian12`` (paramiko 2.12.0 with
cryptography 38.0.4), ``ubuntu24.04`` (2.12.0 with 41.0.7), ``debian13``
(3.5.1 with 43.0.0) and the newest; in ``--short`` mode ``debian12`` and the
newest; a bare version gets today's cryptography) gets its own venv
(tests/bench/venvs.py, kept under /tmp/x2go-sftp-bench-venvs) and runs every
variant that has a paramiko in it;
``openssh`` and ``direct`` run once per round, as the baseline of all.
``--asbytes-fix off`` (or ``both``) runs the workers with the opt-out
``X2GO_SFTP_ASBYTES_FIX=0`` (x2go_sftp/paramiko_compat.py: paramiko 2.x
formats the repr of every packet it sends).

Prints, per release, one table (median of the rounds, with the spread) and
the ratios against ``openssh`` measured in the same run, then the summary of
the issue: each release's read, write, create, ``ls -l``, one request as a
ratio of OpenSSH's, CPU per MB, and the outer hop's CPU against the
``forward`` variant's of the same release.  It never asserts speed: the exit
status only says whether the topology could be built.  Must run as root (FUSE
mounts, sshd).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench import topology as topo
from tests.bench import venvs

MiB = 1024 * 1024
MB = 1_000_000

# X2Go's x2gomountdirs runs sshfs with these options (tests/realpeers.py: sshfs_command).
X2GO_SSHFS_OPTS = "idmap=user,uid={uid},gid={gid},default_permissions,ServerAliveInterval=300"

# The unit of a single request, as in the issue: sshfs reads in 32 KiB requests.
REQUEST_SIZE = 32 * 1024
# Writes and reads through the mount use this buffer size (like cp / dd bs=1M).
IO_CHUNK = 1 * MiB
# The remote command that keeps the outer connection "in use", as python-x2go's sessions do.
# cat ends when its input does, that is with the connection (sshd does not kill a
# command without a terminal; a sleep would outlive the benchmark).
REMOTE_COMMAND = "cat"
# Extra mounts for the idle-RSS and concurrency measurements.
PARALLEL_MOUNTS = 8

VARIANTS = ("gevent", "threads", "gevent-gcm", "threads-gcm", "openssh", "legacy", "forward", "direct")
# Variants only on request (--variants, pairs --a/--b): "forward-gcm" is "forward" with python-x2go's
# connection rekeyed to AES-GCM as install() does, the floor under install()'s variant (gevent-gcm).
EXTRA_VARIANTS = ("forward-gcm",)
# Variants without a paramiko in them: measured once per round, the baseline of every release.
OPENSSH_ONLY = ("openssh", "direct")
# The workers' opt-out of the asbytes fix (x2go_sftp.paramiko_compat.ASBYTES_FIX_ENV; not
# imported here: the benchmark's own interpreter may hold another paramiko than the workers).
ASBYTES_FIX_ENV = "X2GO_SFTP_ASBYTES_FIX"
# Ablation variants: "gevent-no-hold", "threads-no-readahead+hold", ... (this
# library with the named optimisations off, see worker.disable), interleaved
# with the others round by round.
ABLATION_MARK = "-no-"


def is_variant(name: str) -> bool:
    base, mark, off = name.partition(ABLATION_MARK)
    return name in VARIANTS or name in EXTRA_VARIANTS or (bool(mark) and base in ("gevent", "threads", "gevent-gcm", "threads-gcm")
                                and bool(off))


@dataclass
class Sizes:
    seq_bytes: int
    create_files: int
    ls_files: int
    requests: int
    parallel_bytes: int
    new_channel_tries: int


FULL = Sizes(seq_bytes=512 * MiB, create_files=500, ls_files=2000, requests=200,
             parallel_bytes=64 * MiB, new_channel_tries=7)
SHORT = Sizes(seq_bytes=64 * MiB, create_files=100, ls_files=2000, requests=50,
              parallel_bytes=8 * MiB, new_channel_tries=3)


@dataclass
class Endpoint:
    """Where sshfs connects for one variant, and how to account for its CPU and memory."""

    port: int
    host_key_line: Callable[[int], str]
    pids: Callable[[], list[int]]
    single_process: int | None  # the library's process: RSS is exact; else PSS of pids()
    stop: Callable[[], None]
    # The process carrying the outer hop: the library's (everything), the relay's
    # (paramiko's hop alone) or OpenSSH's ssh -R client.
    hop_pids: Callable[[], list[int]] | None = None


@dataclass
class Result:
    values: dict[str, float] = field(default_factory=dict)


class Bench:
    def __init__(self, work: Path, sizes: Sizes, disable: str, profile_dir: Path | None,
                 settings: list[str] | None = None):
        self.settings = settings or []
        self.work = work
        self.sizes = sizes
        self.disable = disable
        self.profile_dir = profile_dir
        self.data = work / "data"
        self.data.mkdir()
        self.keys = topo.Keys(work / "keys")
        self.x2go = topo.start_sshd("x2go", work / "sshd-x2go", [self.keys.outer_client])
        self.local = topo.start_sshd("local", work / "sshd-local", [self.keys.session])
        self.x2go_known = work / "x2go_known_hosts"
        self.x2go_known.write_text(topo.known_hosts_line(self.x2go.port, self.x2go.host_key))
        self.mounts: list[Path] = []
        self.counter = 0
        # The paramiko release the workers run under: its venv's interpreter, extra
        # environment, and the label that prefixes profile names.
        self.python = sys.executable
        self.worker_env: dict[str, str] = {}
        self.label = ""

    def close(self) -> None:
        for mnt in self.mounts:
            unmount(mnt)
        self.x2go.stop()
        self.local.stop()

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}-{self.counter}"

    # -- endpoints ---------------------------------------------------------------
    def endpoint(self, variant: str) -> Endpoint:
        if variant in ("gevent-gcm", "threads-gcm"):
            return self._worker(variant.removesuffix("-gcm"), "--outer-gcm")
        if variant in ("gevent", "threads", "legacy"):
            return self._worker(variant)
        if variant in ("forward", "forward-gcm"):
            return self._relay(variant == "forward-gcm")
        if ABLATION_MARK in variant:
            base, _, off = variant.partition(ABLATION_MARK)
            gcm = ("--outer-gcm",) if base.endswith("-gcm") else ()
            return self._worker(base.removesuffix("-gcm"), *gcm, "--disable",
                                ",".join(filter(None, [self.disable, *off.split("+")])))
        if variant == "openssh":
            return self._openssh_tunnel()
        return self._direct()

    def _worker(self, mode: str, *extra: str) -> Endpoint:
        env = dict(os.environ, BENCH_EXPORT=str(self.data), PYTHONPATH=str(Path(__file__).parents[2]),
                   **self.worker_env)
        cmd = [self.python, "-m", "tests.bench.worker", mode, str(self.x2go.port), str(self.keys.workdir),
               *extra]
        if self.disable and mode != "legacy" and "--disable" not in extra:
            cmd += ["--disable", self.disable]
        if mode != "legacy":
            cmd += [f"--set={item}" for item in self.settings]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {mode} failed to start (exit {proc.wait()})")
        port = int(json.loads(line)["port"])
        host = self.keys.inner_host

        def stop() -> None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

        return Endpoint(port, lambda p: topo.known_hosts_line(p, host), lambda: [proc.pid], proc.pid, stop,
                        lambda: [proc.pid])

    def _relay(self, outer_gcm: bool = False) -> Endpoint:
        worker = self._worker("forward", "--target", str(self.local.port), *(("--outer-gcm",) if outer_gcm else ()))
        host = self.local.host_key

        def pids() -> list[int]:
            return worker.pids() + [p for p in topo.process_tree(self.local.process.pid)
                                    if p != self.local.process.pid]

        return Endpoint(worker.port, lambda p: topo.known_hosts_line(p, host), pids, None, worker.stop,
                        worker.pids)

    def _openssh_tunnel(self) -> Endpoint:
        port = topo.free_port()
        proc = subprocess.Popen(
            ["ssh", "-p", str(self.x2go.port), "-i", str(self.keys.outer_client_file),
             "-o", f"UserKnownHostsFile={self.x2go_known}", "-o", "StrictHostKeyChecking=yes",
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ExitOnForwardFailure=yes",
             "-R", f"127.0.0.1:{port}:127.0.0.1:{self.local.port}", "root@127.0.0.1", REMOTE_COMMAND],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # cat's input: open until stop
        topo.wait_for_port(port)
        host = self.local.host_key

        def pids() -> list[int]:
            return [proc.pid] + [p for p in topo.process_tree(self.local.process.pid)
                                 if p != self.local.process.pid]

        def stop() -> None:
            proc.terminate()
            proc.wait(10)
            if proc.stdin is not None:
                proc.stdin.close()

        return Endpoint(port, lambda p: topo.known_hosts_line(p, host), pids, None, stop, lambda: [proc.pid])

    def _direct(self) -> Endpoint:
        host = self.local.host_key

        def pids() -> list[int]:
            return [p for p in topo.process_tree(self.local.process.pid) if p != self.local.process.pid]

        return Endpoint(self.local.port, lambda p: topo.known_hosts_line(p, host), pids, None, lambda: None)

    # -- clients -----------------------------------------------------------------
    def ident(self, ep: Endpoint) -> Path:
        path = self.work / f"known-{ep.port}"
        path.write_text(ep.host_key_line(ep.port))
        return path

    def mount(self, ep: Endpoint) -> Path:
        mnt = self.work / self.fresh("mnt")
        mnt.mkdir()
        opts = X2GO_SSHFS_OPTS.format(uid=os.getuid(), gid=os.getgid())
        opts += f",IdentityFile={self.keys.session_file},UserKnownHostsFile={self.ident(ep)}"
        res = subprocess.run(["sshfs", "-o", opts, f"root@127.0.0.1:{self.data}", str(mnt),
                              "-p", str(ep.port)], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"sshfs failed: {res.stderr}")
        self.mounts.append(mnt)
        return mnt

    def unmount_all(self) -> None:
        for mnt in self.mounts:
            unmount(mnt)
        self.mounts.clear()

    def new_channel_ms(self, ep: Endpoint) -> float:
        ident = self.ident(ep)
        times = []
        for _ in range(self.sizes.new_channel_tries):
            t0 = time.perf_counter()
            res = subprocess.run(
                ["sftp", "-b", "-", "-P", str(ep.port), "-i", str(self.keys.session_file),
                 "-o", f"UserKnownHostsFile={ident}", "-o", "StrictHostKeyChecking=yes",
                 "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "root@127.0.0.1"],
                input="pwd\n", capture_output=True, text=True, timeout=60)
            times.append((time.perf_counter() - t0) * 1000)
            if res.returncode != 0:
                raise RuntimeError(f"sftp failed: {res.stderr}")
        return statistics.median(times)

    # -- workloads ---------------------------------------------------------------
    def local_file(self, size: int) -> str:
        """A fresh file in the export, written locally and left in the local page cache."""
        name = self.fresh("src") + ".bin"
        block = os.urandom(IO_CHUNK)
        with open(self.data / name, "wb") as f:
            for _ in range(size // IO_CHUNK):
                f.write(block)
        os.sync()
        return name

    def latency_ms(self, mnt: Path) -> float:
        name = self.local_file(max(IO_CHUNK, self.sizes.requests * REQUEST_SIZE))
        offsets = [i * REQUEST_SIZE for i in range(self.sizes.requests)]
        random.shuffle(offsets)
        fd = os.open(mnt / name, os.O_RDONLY)
        try:
            # No readahead: each pread becomes exactly one 32 KiB FUSE read, one SFTP READ.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            times = []
            for off in offsets:
                t0 = time.perf_counter()
                os.pread(fd, REQUEST_SIZE, off)
                times.append((time.perf_counter() - t0) * 1000)
        finally:
            os.close(fd)
        return statistics.median(times)

    def seq_read(self, mnt: Path, name: str) -> float:
        t0 = time.perf_counter()
        n = 0
        with open(mnt / name, "rb", buffering=0) as f:
            while chunk := f.read(IO_CHUNK):
                n += len(chunk)
        return n / MB / (time.perf_counter() - t0)

    def seq_write(self, mnt: Path) -> float:
        block = os.urandom(IO_CHUNK)
        t0 = time.perf_counter()
        with open(mnt / (self.fresh("dst") + ".bin"), "wb", buffering=0) as f:
            for _ in range(self.sizes.seq_bytes // IO_CHUNK):
                f.write(block)
        return self.sizes.seq_bytes / MB / (time.perf_counter() - t0)

    def create_files(self, mnt: Path) -> float:
        d = mnt / self.fresh("create")
        d.mkdir()
        t0 = time.perf_counter()
        for i in range(self.sizes.create_files):
            with open(d / f"f{i:05d}", "wb") as f:
                f.write(b"x" * 100)
        return time.perf_counter() - t0

    def ls_l(self, mnt: Path) -> float:
        name = self.fresh("ls")
        local = self.data / name
        local.mkdir()
        for i in range(self.sizes.ls_files):
            (local / f"entry-{i:05d}.txt").write_bytes(b"")
        t0 = time.perf_counter()
        subprocess.run(["ls", "-l", str(mnt / name)], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0

    def parallel(self, ep: Endpoint) -> tuple[float, float, float]:
        """Idle KiB per session, aggregate MB/s of PARALLEL_MOUNTS concurrent reads, min/max share."""
        before = self.memory_kib(ep)
        mnts = [self.mount(ep) for _ in range(PARALLEL_MOUNTS)]
        for m in mnts:
            os.stat(m)
        idle_kib = (self.memory_kib(ep) - before) / PARALLEL_MOUNTS
        names = [self.local_file(self.sizes.parallel_bytes) for _ in mnts]
        rates = [0.0] * len(mnts)
        start = threading.Barrier(len(mnts) + 1)

        def run(i: int) -> None:
            start.wait()
            rates[i] = self.seq_read(mnts[i], names[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(mnts))]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        aggregate = len(mnts) * self.sizes.parallel_bytes / MB / wall
        return idle_kib, aggregate, min(rates) / max(rates)

    def memory_kib(self, ep: Endpoint) -> int:
        if ep.single_process is not None:
            return topo.status_kib(ep.single_process, "VmRSS")
        return topo.pss_kib(ep.pids())

    # -- one variant ---------------------------------------------------------------
    def run_variant(self, variant: str) -> Result:
        ep = self.endpoint(variant)
        r = Result()
        try:
            r.values["new_channel_ms"] = self.new_channel_ms(ep)
            mnt = self.mount(ep)
            r.values["request_ms"] = self.latency_ms(mnt)
            src = self.local_file(self.sizes.seq_bytes)
            os.sync()
            mem0 = self.memory_kib(ep)
            if ep.single_process is not None:
                topo.reset_peak_rss(ep.single_process)
            cpu0 = topo.cpu_seconds(ep.pids())
            hop0 = topo.cpu_seconds(ep.hop_pids()) if ep.hop_pids else 0.0
            spy = self.start_profile(ep, variant, "read")
            r.values["read_mbs"] = self.seq_read(mnt, src)
            self.stop_profile(spy)
            os.sync()
            spy = self.start_profile(ep, variant, "write")
            r.values["write_mbs"] = self.seq_write(mnt)
            self.stop_profile(spy)
            cpu = topo.cpu_seconds(ep.pids()) - cpu0
            r.values["cpu_ms_per_mb"] = cpu * 1000 / (2 * self.sizes.seq_bytes / MB)
            if ep.hop_pids:
                hop = topo.cpu_seconds(ep.hop_pids()) - hop0
                r.values["hop_cpu_ms_per_mb"] = hop * 1000 / (2 * self.sizes.seq_bytes / MB)
            if ep.single_process is not None:
                peak = topo.status_kib(ep.single_process, "VmHWM")
            else:
                peak = self.memory_kib(ep)
            r.values["rss_growth_mib"] = (peak - mem0) / 1024
            os.sync()
            r.values["create_s"] = self.create_files(mnt)
            r.values["ls_s"] = self.ls_l(mnt)
            idle, aggregate, share = self.parallel(ep)
            r.values["idle_session_mib"] = idle / 1024
            r.values["parallel_mbs"] = aggregate
            r.values["parallel_vs_one"] = aggregate / r.values["read_mbs"]
            r.values["min_max_share"] = share
        finally:
            self.unmount_all()
            ep.stop()
            self.cleanup_data()
        return r

    def cleanup_data(self) -> None:
        for entry in self.data.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def start_profile(self, ep: Endpoint, variant: str, phase: str) -> subprocess.Popen[bytes] | None:
        # py-spy on PATH, or installed beside this interpreter (pip install py-spy in its venv).
        pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if self.profile_dir is None or ep.single_process is None or not pyspy:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        prefix = f"{self.label}-" if self.label else ""
        out = self.profile_dir / f"{prefix}{variant}-{phase}.txt"
        extra = os.environ.get("X2GO_BENCH_PYSPY", "").split()  # e.g. "--native -r 1000"
        return subprocess.Popen([pyspy, "record", "--format", "raw", "--nonblocking", "-r", "200", *extra,
                                 "-o", str(out), "-p", str(ep.single_process)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def stop_profile(spy: subprocess.Popen[bytes] | None) -> None:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)


def unmount(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# -- report -----------------------------------------------------------------------
COLUMNS = (
    # key, header, format, higher is better
    ("read_mbs", "seq read MB/s", "{:.0f}", True),
    ("write_mbs", "seq write MB/s", "{:.0f}", True),
    ("create_s", "create {n_create} files (s)", "{:.2f}", False),
    ("ls_s", "ls -l {n_ls} (s)", "{:.3f}", False),
    ("request_ms", "one 32 KiB request (ms)", "{:.2f}", False),
    ("cpu_ms_per_mb", "client CPU ms/MB", "{:.2f}", False),
    ("hop_cpu_ms_per_mb", "of it, the outer hop's process ms/MB", "{:.2f}", False),
    ("rss_growth_mib", "RSS growth moving {moved} (MiB)", "{:.1f}", False),
    ("idle_session_mib", "idle session (MiB)", "{:.2f}", False),
    ("new_channel_ms", "new channel serving SFTP (ms)", "{:.0f}", False),
    ("parallel_mbs", "8 mounts aggregate MB/s", "{:.0f}", True),
    ("parallel_vs_one", "8 mounts aggregate / one", "{:.2f}", True),
    ("min_max_share", "8 mounts min/max share", "{:.2f}", True),
)


def report(results: dict[str, list[Result]], sizes: Sizes) -> str:
    fmt_args = {"n_create": sizes.create_files, "n_ls": sizes.ls_files,
                "moved": f"{2 * sizes.seq_bytes // MiB} MiB"}
    variants = [v for v in VARIANTS if results.get(v)] + [v for v in results if v not in VARIANTS and results[v]]
    lines = []
    header = "| metric | " + " | ".join(variants) + " |"
    lines += [header, "|---" * (len(variants) + 1) + "|"]
    med: dict[str, dict[str, float]] = {}
    for key, title, fmt, _ in COLUMNS:
        cells = []
        for v in variants:
            vals = [r.values[key] for r in results[v] if key in r.values]
            if not vals:
                cells.append("-")
                continue
            m = statistics.median(vals)
            med.setdefault(v, {})[key] = m
            cell = fmt.format(m)
            if len(vals) > 1:
                cell += f" ({fmt.format(min(vals))}..{fmt.format(max(vals))})"
            cells.append(cell)
        lines.append(f"| {title.format(**fmt_args)} | " + " | ".join(cells) + " |")
    if "openssh" in med:
        lines += ["", "Ratio against the all-OpenSSH tunnel of this run (>1 means better than OpenSSH):", ""]
        lines += ["| metric | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
        for key, title, _, higher in COLUMNS[:5]:
            base = med["openssh"].get(key)
            cells = []
            for v in variants:
                val = med.get(v, {}).get(key)
                if not base or not val:
                    cells.append("-")
                else:
                    cells.append(f"{(val / base if higher else base / val):.2f}x")
            lines.append(f"| {title.format(**fmt_args)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def medians(results: list[Result]) -> dict[str, float]:
    """The median of each figure over the rounds."""
    keys = {k for r in results for k in r.values}
    return {k: statistics.median(r.values[k] for r in results if k in r.values) for k in keys}


# The table: figure, header, format of the absolute value, higher is better.
SUMMARY = (
    ("read_mbs", "read", "{:.0f} MB/s", True),
    ("write_mbs", "write", "{:.0f} MB/s", True),
    ("create_s", "create {n_create}", "{:.2f} s", False),
    ("ls_s", "ls -l {n_ls}", "{:.3f} s", False),
    ("request_ms", "one request", "{:.2f} ms", False),
)


def ratio(value: float | None, base: float | None, higher: bool) -> float | None:
    """``value`` against ``base`` so that > 1 always means better."""
    if not value or not base:
        return None
    return value / base if higher else base / value


def summary(runs: dict[str, dict[str, list[Result]]], baseline: dict[str, list[Result]], sizes: Sizes) -> str:
    """The issue's table: each release's variants against the all-OpenSSH tunnel of this run.

    Args:
        runs: per release label, the results of its variants.
        baseline: the results of the variants without paramiko (``openssh``, ``direct``).
    """
    fmt_args = {"n_create": sizes.create_files, "n_ls": sizes.ls_files}
    base = medians(baseline.get("openssh", []))
    head = [title.format(**fmt_args) for _, title, _, _ in SUMMARY]
    head += ["CPU ms/MB", "outer hop's CPU ms/MB", "hop CPU / forward's", "create, ls -l vs forward"]
    lines = ["| paramiko | variant | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    if base:
        cells = [fmt.format(base[key]) if key in base else "-" for key, _, fmt, _ in SUMMARY]
        cells += [f"{base.get('cpu_ms_per_mb', 0):.2f}", f"{base.get('hop_cpu_ms_per_mb', 0):.2f}", "", ""]
        lines.append("| OpenSSH | openssh (the baseline: 1.00x) | " + " | ".join(cells) + " |")
    for label, results in runs.items():
        forward = medians(results.get("forward", []))
        for variant, rs in results.items():
            if not rs:
                continue
            m = medians(rs)
            cells = []
            for key, _, fmt, higher in SUMMARY:
                r = ratio(m.get(key), base.get(key), higher)
                cells.append("-" if r is None else f"{r:.2f}x ({fmt.format(m[key])})")
            cells.append(f"{m['cpu_ms_per_mb']:.2f}" if "cpu_ms_per_mb" in m else "-")
            cells.append(f"{m['hop_cpu_ms_per_mb']:.2f}" if "hop_cpu_ms_per_mb" in m else "-")
            hop = forward.get("hop_cpu_ms_per_mb")
            # Lower CPU is better, but this column reads as "times the floor" (goal <= 1.15x).
            cells.append(f"{m['hop_cpu_ms_per_mb'] / hop:.2f}x" if hop and m.get("hop_cpu_ms_per_mb") else "-")
            vs = [ratio(m.get(k), forward.get(k), False) for k in ("create_s", "ls_s")]
            cells.append(", ".join("-" if r is None else f"{r:.2f}x" for r in vs))
            lines.append(f"| {label} | {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios against the all-OpenSSH tunnel of this run and, in the last column, against the "
              "`forward` variant of the same release: > 1 means faster.  \"hop CPU / forward's\": the CPU per "
              "MB of the process holding python-x2go's connection, as a multiple of the `forward` variant's "
              "(paramiko relaying to OpenSSH's C server: the floor).  Absolute values in brackets."]
    return "\n".join(lines)


@dataclass
class Config:
    """One paramiko release the workers run under, with or without the asbytes fix."""

    label: str
    release: venvs.Release
    env: dict[str, str]


def configs(names: list[str], asbytes_fix: str, refresh: bool) -> list[Config]:
    """Make (or reuse) each release's venv; one config per release and asbytes-fix setting."""
    out = []
    for name in names:
        release = venvs.ensure(name, refresh=refresh)
        # The paramiko release, and what it runs with: cryptography decides AES-GCM's cost per packet.
        where = f"{name}, " if name != release.version else ""
        label = f"{release.version} ({where}cryptography {release.cryptography})"
        if asbytes_fix in ("on", "both"):
            out.append(Config(label, release, {ASBYTES_FIX_ENV: "1"}))
        if asbytes_fix in ("off", "both"):
            out.append(Config(f"{label} without asbytes fix", release, {ASBYTES_FIX_ENV: "0"}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="small sizes, one round, Debian 12's paramiko and the newest (CI)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all variants (default 3, short 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--paramiko", default=None, metavar="R1,R2",
                        help="paramiko releases for the workers, each in its own venv: versions, 'newest', a "
                             f"distribution ({','.join(venvs.DISTRIBUTIONS)}: its paramiko, cryptography and "
                             "gevent), 'current' (this interpreter's; no venv) or 'system' (/usr/bin/python3 "
                             f"with the distribution's packages; no venv).  Default {','.join(venvs.SUPPORTED)}, "
                             f"short {','.join(venvs.SHORT)}")
    parser.add_argument("--asbytes-fix", choices=("on", "off", "both"), default="on",
                        help="run the workers with the paramiko 2.x asbytes fix (default), without it "
                             f"({ASBYTES_FIX_ENV}=0), or both")
    parser.add_argument("--refresh-venvs", action="store_true", help="rebuild the paramiko venvs from scratch")
    parser.add_argument("--disable", default="",
                        help="switch library optimisations off: nodelay,gcm,pipe,fit,readahead,hold,fastpath,ack,"
                             "asbytes,yield")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                        help="override an integer constant of x2go_sftp.tuning in the library workers")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy raw profiles of the library here")
    parser.add_argument("--json", type=Path, default=None, help="also write all raw figures here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_mount: needs root (FUSE mounts, sshd)", file=sys.stderr)
        return 2
    sizes = SHORT if args.short else FULL
    rounds = args.rounds or (1 if args.short else 3)
    variants = [v for v in args.variants.split(",") if v]
    unknown = {v for v in variants if not is_variant(v)}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    names = [n for n in (args.paramiko or ",".join(venvs.SHORT if args.short else venvs.SUPPORTED)).split(",") if n]
    plain = [v for v in variants if v in OPENSSH_ONLY]
    with_paramiko = [v for v in variants if v not in OPENSSH_ONLY]
    setups = configs(names, args.asbytes_fix, args.refresh_venvs) if with_paramiko else []
    for c in setups:
        print(f"# {c.label}: paramiko {c.release.version}, cryptography {c.release.cryptography} "
              f"in {c.release.python}", flush=True)
    baseline: dict[str, list[Result]] = {v: [] for v in plain}
    runs: dict[str, dict[str, list[Result]]] = {c.label: {v: [] for v in with_paramiko} for c in setups}
    with tempfile.TemporaryDirectory(prefix="x2go-bench-") as tmp:
        bench = Bench(Path(tmp), sizes, args.disable, args.profile, args.set)
        try:
            for rnd in range(rounds):
                # Round by round, the baseline and each release interleaved, so drifts of a
                # shared machine spread over all of them.
                steps = [(None, v) for v in plain] + [(c, v) for c in setups for v in with_paramiko]
                for config, v in steps:
                    bench.python = config.release.python if config else sys.executable
                    bench.worker_env = config.env if config else {}
                    bench.label = f"paramiko-{config.label}".replace(" ", "-") if config else ""
                    target = runs[config.label][v] if config else baseline[v]
                    t0 = time.monotonic()
                    try:
                        target.append(bench.run_variant(v))
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        # A variant that cannot serve is a finding, not the end of the run: the
                        # stock design cannot mount on paramiko 2.12 ("no mutual signature").
                        target.append(Result())
                        print(f"# round {rnd + 1}/{rounds} {config.label + ' ' if config else ''}{v}: "
                              f"FAILED: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
                              flush=True)
                        continue
                    print(f"# round {rnd + 1}/{rounds} {config.label + ' ' if config else ''}{v}: "
                          f"{time.monotonic() - t0:.0f}s "
                          + json.dumps({k: round(x, 3) for k, x in target[-1].values.items()}), flush=True)
        finally:
            bench.close()
    print()
    print(f"# {rounds} round(s), {'short' if args.short else 'full'} mode, load {os.getloadavg()[0]:.2f}"
          + (f", library optimisations disabled: {args.disable}" if args.disable else "")
          + (f", tuning overrides: {' '.join(args.set)}" if args.set else ""))
    for label, results in runs.items() or [("OpenSSH only", {})]:
        print()
        print(f"## paramiko {label}")
        print()
        print(report({**results, **baseline}, sizes))
    print()
    print("## Per paramiko release, against OpenSSH")
    print()
    print(summary(runs, baseline, sizes))
    if args.json:
        args.json.write_text(json.dumps({"openssh": {v: [r.values for r in rs] for v, rs in baseline.items()},
                                         **{label: {v: [r.values for r in rs] for v, rs in results.items()}
                                            for label, results in runs.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
