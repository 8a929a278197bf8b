"""Benchmark: the real python-x2go sharing a folder through X2Go's real sshfs mount, stock vs ours vs ours-gcm.

    python -m tests.bench.bench_x2go                           # 128 MiB, 3 rounds, every interpreter and mode
    python -m tests.bench.bench_x2go --size-mib 16 --rounds 1  # a quick look
    python -m tests.bench.bench_x2go --interpreters 5.1 --modes ours,ours-gcm --json /tmp/x2go.json

Builds what tests/test_x2go_integration.py builds, with its helpers: an sshd
on 127.0.0.1 plays the X2Go server (Debian's x2goserver scripts, HOME in a
temporary directory), and tests/x2go/driver.py runs the real python-x2go
(``X2GoClient``, ``X2GoSession.connect``, ``start_sshfs``,
``share_local_folder``) under each python-x2go interpreter:

* ``system``  Debian's /usr/bin/python3 with Debian's paramiko (2.12 on Debian 12)
* ``3.5.1``   a venv of it with paramiko 3.5.1 (.venv-x2go-paramiko3, as .ci/run makes it)
* ``5.1``     a venv of it with paramiko 5.1.0 (.venv-x2go-paramiko5)

and each mode:

* ``stock``     python-x2go as shipped (on paramiko 2.12 it cannot mount: reported as failed)
* ``ours``      after ``x2go_sftp.integrate.install()``: python-x2go's own connection is
  rekeyed to prefer AES-GCM (install()'s default, ``X2GO_SFTP_OUTER_GCM`` aside)
* ``ours-ctr``  after ``install(outer_gcm=False)``: python-x2go's cipher as negotiated
  (aes128-ctr with hmac-sha2-256 from paramiko)
* ``ours-gcm``  after ``install(outer_gcm=True)``: the same as ``ours`` whatever the environment
* ``ours-no-gcmctx``  ``ours`` with ``X2GO_SFTP_GCM_CONTEXT=0``: AES-GCM through
  cryptography's own ``AESGCM`` (matters on cryptography 38-42: Debian 12's 38.0.4)
* ``ours-no-wb``  ``ours`` with ``X2GO_SFTP_WRITE_BEHIND=0``: every WRITE in the session's greenlet

Each mode run is one fresh python-x2go process and X2Go session sharing one
fresh folder; x2gomountdirs mounts it with sshfs on the server side, and the
benchmark measures through that mount point: a sequential write of N MiB
(a new file, fsync'ed before the clock stops) and a sequential read of N MiB
(a new file written into the folder on the client side, never seen by the
mount, so every byte crosses the tunnel), in MB/s, and the CPU time of the
python-x2go process (/proc/PID/stat, all its threads) per MB moved.  Rounds
interleave interpreters and modes so drifts of a shared machine spread over
all of them.

Prints one table per interpreter (median of the rounds, with the spread),
the ratios against ``ours`` of the same run, and the outer cipher python-x2go's
connection ran in each mode.  It never asserts speed: the exit status only
says whether the topology (sshd + x2goserver + at least one python-x2go
interpreter) could be built.  Must run as root (sshd, FUSE mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.bench import topology as topo
from tests.test_x2go_integration import (
    DEBIAN_PYTHON,
    VENV_PYTHONS,
    Driver,
    X2GoServer,
    driver_config,
    forget_session,
    python_with_x2go,
    running_x2go_server,
    server_mounts,
)

MiB = 1024 * 1024
MB = 1_000_000

# Reads and writes through the mount use this buffer size (like cp / dd bs=1M).
IO_CHUNK = 1 * MiB

# --interpreters names -> the python-x2go interpreters tests/test_x2go_integration.py uses.
INTERPRETERS = {
    "system": DEBIAN_PYTHON,
    "3.5.1": VENV_PYTHONS["paramiko-3.5"],
    "5.1": VENV_PYTHONS["paramiko-5.1"],
}
MODES = ("stock", "ours", "ours-ctr", "ours-gcm", "ours-no-gcmctx", "ours-no-wb")
BASELINE = "ours"


# Failures the benchmark reports and goes on from: the helpers it borrows from the tests end
# a step with pytest.fail() (pytest's Failed, a BaseException), the rest with ordinary errors.
# Driver.expect() asserts the order of the driver's events.
FAILURES = (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError, AssertionError,
            pytest.fail.Exception)


class ModeFailed(RuntimeError):
    """A mode could not share the folder (the stock module on paramiko 2.12, for instance)."""


@dataclass
class Result:
    values: dict[str, float] = field(default_factory=dict)
    cipher: str = ""  # python-x2go's outer cipher, "sending/receiving"
    paramiko: str = ""
    error: str = ""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Bench:
    def __init__(self, work: Path, server: X2GoServer, size: int):
        self.work = work
        self.server = server
        self.size = size
        self.counter = 0

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}-{self.counter}"

    # -- one mode ------------------------------------------------------------------
    def run_mode(self, python: str, mode: str) -> Result:
        """One python-x2go process and session sharing one fresh folder, measured through its mount."""
        r = Result()
        work = self.work / self.fresh(mode)
        share = work / "share"
        share.mkdir(parents=True)
        extra: dict[str, Any] = {"printing": False, "mimebox": False}
        if mode == "ours-gcm":
            extra["outer_gcm"] = True
        elif mode == "ours-ctr":  # install(outer_gcm=False): python-x2go's cipher as negotiated
            extra["outer_gcm"] = False
        elif mode == "ours-no-gcmctx":  # ablation: cryptography's own AESGCM (x2go_sftp/aesgcm.py's opt-out)
            extra["env"] = {"X2GO_SFTP_GCM_CONTEXT": "0"}
        elif mode == "ours-no-wb":  # ablation: WRITEs in the session's greenlet (x2go_sftp/writebehind.py's opt-out)
            extra["env"] = {"X2GO_SFTP_WRITE_BEHIND": "0"}
        cfg = driver_config(self.server, work, "stock" if mode == "stock" else "ours", [str(share)], **extra)
        driver = Driver(python, cfg, work / "driver.stderr")
        sshfs_log = None
        try:
            if cfg["mode"] == "ours":
                driver.expect("installed")
            tunnel = driver.expect("tunnel")
            r.paramiko = tunnel["paramiko"]
            sshfs_log = Path(tunnel["remote_home"]) / ".x2go" / f"C-{cfg['session_name']}" / "sshfs-mounts.log"
            driver.send("next")
            shared = driver.expect("shared")
            ciphers = shared.get("ciphers") or {}
            local, remote = ciphers.get("local", "?"), ciphers.get("remote", "?")
            r.cipher = local if local == remote else f"{local}/{remote}"
            mnt = server_mounts().get(str(share))
            if not shared["shared"].get(str(share)) or mnt is None:
                raise ModeFailed("no mount")
            self.measure(Path(mnt), share, driver.proc.pid, r)
        except FAILURES as e:
            r.error = first_line(e)
        finally:
            driver.close()
            if r.error:
                r.error += why(driver.stderr_path, sshfs_log)
            forget_session(cfg["session_name"])
            shutil.rmtree(work, ignore_errors=True)
        return r

    def measure(self, mnt: Path, share: Path, pid: int, r: Result) -> None:
        block = os.urandom(IO_CHUNK)
        n_chunks = self.size // IO_CHUNK
        size = n_chunks * IO_CHUNK

        # Sequential write of a new file through the mount.
        name = self.fresh("dst") + ".bin"
        cpu0 = topo.cpu_seconds([pid])
        t0 = time.perf_counter()
        with open(mnt / name, "wb", buffering=0) as f:
            for _ in range(n_chunks):
                f.write(block)
            os.fsync(f.fileno())
        wall = time.perf_counter() - t0
        cpu = topo.cpu_seconds([pid]) - cpu0
        got = (share / name).stat().st_size
        if got != size:
            raise ModeFailed(f"wrote {size} bytes through the mount, {got} arrived")
        r.values["write_mbs"] = size / MB / wall
        r.values["write_cpu_ms_per_mb"] = cpu * 1000 / (size / MB)

        # Sequential read of a new file the mount has never seen: no page cache of the
        # mount holds any of it, so every byte crosses the tunnel.
        name = self.fresh("src") + ".bin"
        with open(share / name, "wb") as f:
            for _ in range(n_chunks):
                f.write(block)
        os.sync()
        cpu0 = topo.cpu_seconds([pid])
        t0 = time.perf_counter()
        n = 0
        with open(mnt / name, "rb", buffering=0) as f:
            while chunk := f.read(IO_CHUNK):
                n += len(chunk)
        wall = time.perf_counter() - t0
        cpu = topo.cpu_seconds([pid]) - cpu0
        if n != size:
            raise ModeFailed(f"read {n} of {size} bytes through the mount")
        r.values["read_mbs"] = size / MB / wall
        r.values["read_cpu_ms_per_mb"] = cpu * 1000 / (size / MB)
        r.values["cpu_ms_per_mb"] = (r.values["write_cpu_ms_per_mb"] + r.values["read_cpu_ms_per_mb"]) / 2


def why(driver_stderr: Path, sshfs_log: Path | None) -> str:
    """Why a mode failed: python-x2go's first warning or error, and x2gomountdirs' last sshfs error."""
    reasons = []
    try:
        lines = [ln.strip() for ln in driver_stderr.read_text(errors="replace").splitlines()]
    except OSError:
        lines = []
    marks = (" WARN: ", " ERROR: ", "Error: ", "Exception: ")
    said = next((ln for ln in lines if any(m in ln for m in marks)), None)
    if said:
        reasons.append(f"python-x2go: {said}")
    try:
        sshfs = [ln.strip() for ln in sshfs_log.read_text(errors="replace").splitlines() if ln.strip()] \
            if sshfs_log else []
    except OSError:
        sshfs = []
    if sshfs:
        reasons.append(f"sshfs: {sshfs[-1]}")
    return "".join(f"; {r}" for r in reasons)


# -- report -----------------------------------------------------------------------
COLUMNS = (
    # key, header, format, higher is better
    ("write_mbs", "seq write MB/s", "{:.1f}", True),
    ("read_mbs", "seq read MB/s", "{:.1f}", True),
    ("write_cpu_ms_per_mb", "python-x2go CPU ms/MB, write", "{:.2f}", False),
    ("read_cpu_ms_per_mb", "python-x2go CPU ms/MB, read", "{:.2f}", False),
    ("cpu_ms_per_mb", "python-x2go CPU ms/MB, both", "{:.2f}", False),
)


def report(results: dict[str, list[Result]]) -> str:
    modes = [m for m in MODES if m in results] + [m for m in results if m not in MODES]
    lines = ["| metric | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    med: dict[str, dict[str, float]] = {}
    for key, title, fmt, _ in COLUMNS:
        cells = []
        for m in modes:
            vals = [r.values[key] for r in results[m] if key in r.values]
            if not vals:
                cells.append("FAILED" if results[m] else "-")
                continue
            med.setdefault(m, {})[key] = statistics.median(vals)
            cell = fmt.format(med[m][key])
            if len(vals) > 1:
                cell += f" ({fmt.format(min(vals))}..{fmt.format(max(vals))})"
            cells.append(cell)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    cipher_cells = [", ".join(sorted({r.cipher for r in results[m] if r.cipher})) or "-" for m in modes]
    lines.append("| outer cipher (python-x2go's connection) | " + " | ".join(cipher_cells) + " |")
    base = med.get(BASELINE)
    if base:
        lines += ["", f"Ratio against `{BASELINE}` of this run (> 1 means better than `{BASELINE}`):", ""]
        lines += ["| metric | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
        for key, title, _, higher in COLUMNS:
            cells = []
            for m in modes:
                val, ref = med.get(m, {}).get(key), base.get(key)
                cells.append("-" if not val or not ref else f"{(val / ref if higher else ref / val):.2f}x")
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    failures = [(m, i + 1, r.error) for m in modes for i, r in enumerate(results[m]) if r.error]
    if failures:
        lines.append("")
        lines += [f"* {m}, round {rnd}: FAILED: {err}" for m, rnd, err in failures]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=128, help="MiB written and read per mode run (default 128)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all interpreters and modes (default 3)")
    parser.add_argument("--interpreters", default=",".join(INTERPRETERS),
                        help=f"python-x2go interpreters, of {','.join(INTERPRETERS)} (default all)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {','.join(MODES)} (default all)")
    parser.add_argument("--json", type=Path, default=None, help="also write all raw figures here")
    args = parser.parse_args(argv)
    interpreters = [i for i in args.interpreters.split(",") if i]
    modes = [m for m in args.modes.split(",") if m]
    if unknown := [i for i in interpreters if i not in INTERPRETERS]:
        parser.error(f"unknown interpreters {unknown}")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"unknown modes {unknown}")
    if args.size_mib < 1 or args.rounds < 1:
        parser.error("--size-mib and --rounds must be at least 1")
    if os.geteuid() != 0:
        print("bench_x2go: needs root (sshd, FUSE mounts)", file=sys.stderr)
        return 2

    # Each interpreter must import python-x2go (python_with_x2go makes a missing venv).
    pythons: dict[str, str] = {}
    for name in interpreters:
        try:
            pythons[name] = python_with_x2go(INTERPRETERS[name])
        except FAILURES as e:
            print(f"# {name}: FAILED: {first_line(e)}", flush=True)
            continue
        print(f"# {name}: {pythons[name]}", flush=True)
    if not pythons:
        print("bench_x2go: no python-x2go interpreter", file=sys.stderr)
        return 1

    results: dict[str, dict[str, list[Result]]] = {n: {m: [] for m in modes} for n in pythons}
    with tempfile.TemporaryDirectory(prefix="x2go-bench-x2go-") as tmp:
        try:
            with running_x2go_server(Path(tmp) / "x2goserver") as server:
                bench = Bench(Path(tmp) / "runs", server, args.size_mib * MiB)
                for rnd in range(args.rounds):
                    for name, python in pythons.items():
                        for mode in modes:
                            t0 = time.monotonic()
                            r = bench.run_mode(python, mode)
                            results[name][mode].append(r)
                            what = (f"FAILED: {r.error}" if r.error else
                                    json.dumps({k: round(x, 3) for k, x in r.values.items()}))
                            print(f"# round {rnd + 1}/{args.rounds} {name} {mode} (paramiko {r.paramiko or '?'}, "
                                  f"{r.cipher or '?'}): {time.monotonic() - t0:.0f}s {what}", flush=True)
        except pytest.fail.Exception as e:  # the X2Go server could not be built
            print(f"bench_x2go: no X2Go server: {first_line(e)}", file=sys.stderr)
            return 1

    print()
    print(f"# {args.rounds} round(s), {args.size_mib} MiB each way per run, load {os.getloadavg()[0]:.2f}")
    for name, by_mode in results.items():
        version = next((r.paramiko for rs in by_mode.values() for r in rs if r.paramiko), "?")
        print()
        print(f"## python-x2go on {name} ({pythons[name]}, paramiko {version})")
        print()
        print(report(by_mode))
    if args.json:
        args.json.write_text(json.dumps(
            {name: {m: [{"values": r.values, "cipher": r.cipher, "paramiko": r.paramiko, "error": r.error}
                        for r in rs] for m, rs in by_mode.items()} for name, by_mode in results.items()},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
