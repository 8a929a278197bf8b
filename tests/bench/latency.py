"""Where the time of one 32 KiB READ goes inside the library process (an experiment, not a test).

    python -m tests.bench.latency gevent      # or: threads
    python -m tests.bench.latency gevent --requests 400
    python -m tests.bench.latency gevent --small  # a small request instead: LSTAT of a name that does not exist

Builds the benchmark's topology (tests/bench/bench_mount.py: sshd as the
X2Go server, python-x2go's outer paramiko connection, sshfs with X2Go's
options), but starts the library worker through this module, which stamps
``time.perf_counter_ns()`` along each request's path: the outer transport
has decrypted the forwarded-channel packet, the inner transport (or the
engine, on the fast path) has decrypted the SFTP request, the engine starts it, ``pread`` returns, and
each reply packet has left through the outer transport.  It then reads
fresh 32 KiB blocks one at a time (``POSIX_FADV_RANDOM``: one FUSE read, one
SFTP READ each) and prints medians in microseconds next to the client-side
median.

The stamps wrap paramiko's ``Packetizer`` and the engine *in the worker
process only*, for measurement; the library itself never patches paramiko.
The wrappers add a few microseconds per packet.
"""

from __future__ import annotations

import sys

WORKER_FLAG = "--stamped-worker"

if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == WORKER_FLAG and sys.argv[2] == "gevent":
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

MSG_CHANNEL_DATA = 94
SFTP_READ = 5
SFTP_LSTAT = 7
SFTP_READDIR = 12


def stamped_worker(argv: list[str], out: Path, kind: int) -> None:
    """Run tests.bench.worker with stamps; write the medians to ``out`` at exit."""
    import paramiko
    from paramiko.packet import Packetizer

    from tests.bench import worker
    from x2go_sftp import backend, engine, fastpath

    ns = time.perf_counter_ns
    outer_ids: set[int] = set()
    last = {"outer_in": 0, "inner_in": 0}
    rows: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []

    read_message, send_message = Packetizer.read_message, Packetizer.send_message
    process, file_read, start_client = engine.SFTPEngine._process, backend.FileHandle.read, paramiko.Transport.start_client

    def stamped_read(self: Any) -> Any:
        msg = read_message(self)
        if msg[0] == MSG_CHANNEL_DATA:
            last["outer_in" if id(self) in outer_ids else "inner_in"] = ns()
        return msg

    lean_read = fastpath.SessionIO._read_packet
    from x2go_sftp import tuning

    feed, pipe_read = tuning.ChunkPipe.feed, tuning.ChunkPipe.read

    def stamped_feed(self: Any, data: bytes) -> None:
        last["fed"] = ns()
        feed(self, data)

    def stamped_pipe_read(self: Any, nbytes: int, timeout: Any = None) -> bytes:
        out = pipe_read(self, nbytes, timeout)
        last["woke"] = ns()
        return out

    tuning.ChunkPipe.feed, tuning.ChunkPipe.read = stamped_feed, stamped_pipe_read

    def stamped_lean_read(self: Any) -> Any:  # the inner packet, decrypted on the fast path
        plain, seq = lean_read(self)
        if len(plain) > 1 and plain[1] == MSG_CHANNEL_DATA:
            last["inner_in"] = ns()
        return plain, seq

    def stamped_send(self: Any, data: Any) -> None:
        send_message(self, data)
        if current and id(self) in outer_ids:
            current[0].setdefault("sent", []).append(ns())

    def stamped_process(self: Any, t: int, rid: int, req: Any) -> None:
        if current:
            rows.append(current.pop())
        current.append({"t": t, "engine": ns(), **last})
        process(self, t, rid, req)
        if current:
            current[0]["engine_done"] = ns()

    def stamped_file_read(self: Any, offset: int, length: int) -> Any:
        data = file_read(self, offset, length)
        if current:
            current[0]["pread_done"] = ns()
        return data

    def stamped_start_client(self: Any, *a: Any, **k: Any) -> Any:
        outer_ids.add(id(self.packetizer))
        return start_client(self, *a, **k)

    Packetizer.read_message, Packetizer.send_message = stamped_read, stamped_send

    def entry_stamp(cls: Any, name: str, label: str) -> None:
        """Stamp the first call of ``cls.name`` after the engine started the current request."""
        orig = getattr(cls, name)

        def wrapped(self: Any, *a: Any, **k: Any) -> Any:
            if current and label not in current[0]:
                current[0][label] = ns()
            return orig(self, *a, **k)

        setattr(cls, name, wrapped)

    # Along the reply's way out, in order (relative to the engine starting the request).
    reply_path = [(engine.SFTPEngine, "_flush", "engine flushes"),
                  (fastpath.SessionIO, "sendall", "fast path sendall"),
                  (fastpath.LeanPacketizer, "lean_send", "inner packet encrypted, sending"),
                  (paramiko.Channel, "send", "outer Channel.send"),
                  (paramiko.Transport, "_send_user_message", "outer _send_user_message"),
                  (Packetizer, "send_message", "outer send_message")]
    for cls, name, label in reply_path:
        entry_stamp(cls, name, label)
    fastpath.SessionIO._read_packet = stamped_lean_read
    engine.SFTPEngine._process, backend.FileHandle.read = stamped_process, stamped_file_read
    paramiko.Transport.start_client = stamped_start_client

    def dump() -> None:
        done = [r for r in rows + current if r["t"] == kind and r.get("sent") and r["outer_in"]
                and r["inner_in"] and ("pread_done" in r or kind != SFTP_READ)]

        def med(f: Any) -> int:
            return round(statistics.median(f(r) for r in done) / 1000) if done else -1

        out.write_text(json.dumps({
            "requests": len(done),
            "outer decrypted -> inner decrypted": med(lambda r: r["inner_in"] - r["outer_in"]),
            "outer decrypted -> fed to our pipe": med(lambda r: r.get("fed", 0) - r["outer_in"]),
            "fed -> reader woke": med(lambda r: r.get("woke", 0) - r.get("fed", 0)),
            "reader woke -> inner decrypted": med(lambda r: r["inner_in"] - r.get("woke", 0)),
            "inner decrypted -> engine starts": med(lambda r: r["engine"] - r["inner_in"]),
            "engine starts -> pread done": med(lambda r: r.get("pread_done", r["engine"]) - r["engine"]),
            "engine starts -> handler returned": med(lambda r: r["engine_done"] - r["engine"]),
            "pread done -> first outer packet sent": med(lambda r: r["sent"][0] - r.get("pread_done", r["engine"])),
            "first -> last outer packet sent": med(lambda r: r["sent"][-1] - r["sent"][0]),
            **{f"engine starts -> {label}": med(lambda r, label=label: r.get(label, r["engine"]) - r["engine"])
               for _, _, label in reply_path},
            "outer packets per reply": round(statistics.median(len(r["sent"]) for r in done)) if done else -1,
            "in process: outer decrypted -> last sent": med(lambda r: r["sent"][-1] - r["outer_in"]),
        }))

    atexit.register(dump)
    sys.argv = ["worker", *argv]
    worker.main()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("gevent", "threads"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--small", action="store_true",
                        help="time LSTAT of fresh names that do not exist (one small request and reply each)")
    parser.add_argument("--readdir", action="store_true",
                        help="time `ls -l` of fresh directories of 2000 files (--requests of them); stamps READDIR")
    args = parser.parse_args()
    from tests.bench import bench_mount as bm

    with tempfile.TemporaryDirectory(prefix="x2go-latency-") as tmp:
        stamps = Path(tmp) / "stamps.json"

        class StampedBench(bm.Bench):
            def _worker(self, mode: str, *extra: str) -> bm.Endpoint:
                real_popen = subprocess.Popen

                def popen(cmd: list[str], *a: Any, **k: Any) -> Any:
                    if cmd[1:3] == ["-m", "tests.bench.worker"]:
                        cmd = [cmd[0], "-m", "tests.bench.latency", WORKER_FLAG, *cmd[3:], f"--stamps={stamps}",
                               f"--kind={SFTP_LSTAT if args.small else SFTP_READDIR if args.readdir else SFTP_READ}"]
                    return real_popen(cmd, *a, **k)

                subprocess.Popen = popen  # type: ignore[misc]
                try:
                    return super()._worker(mode, *extra)
                finally:
                    subprocess.Popen = real_popen  # type: ignore[misc]

        (Path(tmp) / "work").mkdir()
        bench = StampedBench(Path(tmp) / "work", bm.SHORT, "", None)
        try:
            ep = bench.endpoint(args.mode)
            mnt = bench.mount(ep)
            times = []
            if args.readdir:
                for _ in range(args.requests):
                    times.append(int(bench.ls_l(mnt) * 1e9))
                what = "`ls -l` of 2000 files"
            elif args.small:
                for i in range(args.requests):
                    t0 = time.perf_counter_ns()
                    try:  # noqa: SIM105 (timed: contextlib.suppress would add its own cost to each sample)
                        os.stat(mnt / f"absent-{i}")
                    except FileNotFoundError:
                        pass
                    times.append(time.perf_counter_ns() - t0)
                what = "one stat of an absent name (LSTAT)"
            else:
                name = bench.local_file(args.requests * bm.REQUEST_SIZE)
                fd = os.open(mnt / name, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    for i in range(args.requests):
                        t0 = time.perf_counter_ns()
                        os.pread(fd, bm.REQUEST_SIZE, i * bm.REQUEST_SIZE)
                        times.append(time.perf_counter_ns() - t0)
                finally:
                    os.close(fd)
                what = "one 32 KiB pread"
            bench.unmount_all()
            ep.stop()
            print(f"{args.mode}: {what} through the mount, median {statistics.median(times) / 1000:.0f} us")
            for key, value in json.loads(stamps.read_text()).items():
                print(f"  {key}: {value}" + ("" if key in ("requests", "outer packets per reply") else " us"))
        finally:
            bench.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        rest = [a for a in sys.argv[2:] if not a.startswith(("--stamps=", "--kind="))]
        target = next(a for a in sys.argv if a.startswith("--stamps="))[len("--stamps="):]
        kind = int(next(a for a in sys.argv if a.startswith("--kind="))[len("--kind="):])
        stamped_worker(rest, Path(target), kind)
    else:
        sys.exit(main())
