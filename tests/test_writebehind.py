"""WRITEs finished on a native thread (x2go_sftp.writebehind): the client sees a one-at-a-time server.

The engine runs on given input (all requests at once, as a pipelining client
sends them) with write-behind forced on, and again forced off; replies and
files must come out the same.  The worker is a real thread doing real
``pwritev()`` calls; where a test needs it held, a gate in front of
``write_batch`` holds it.  Under gevent: tests/test_gevent.py.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine_support import PieceSocket
from x2go_sftp import engine as eng
from x2go_sftp import writebehind
from x2go_sftp.backend import JailedSFTPServer
from x2go_sftp.exports import Exports

INIT, OPEN, CLOSE, READ, WRITE, FSTAT, STATUS, DATA = 1, 3, 4, 5, 6, 8, 101, 103
F_READ, F_WRITE, F_CREAT, F_TRUNC = 0x1, 0x2, 0x8, 0x10
WAIT = 30.0  # seconds a test waits for a thread before it fails (never a sleep)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def s(v: bytes | str) -> bytes:
    raw = v.encode() if isinstance(v, str) else v
    return u32(len(raw)) + raw


def packet(t: int, body: bytes) -> bytes:
    return u32(len(body) + 1) + bytes((t,)) + body


def serve(export: Path, stream: bytes, behind: bool | None) -> tuple[bytes, eng.SFTPEngine]:
    """Run one session on ``stream``; its replies (after VERSION) and the engine."""
    sock = PieceSocket([packet(INIT, u32(3)) + stream])
    engine_class = type("Engine", (eng.SFTPEngine,), {"write_behind": behind})
    engine = engine_class(sock, "sftp", object(), JailedSFTPServer, exports=Exports([str(export)]))
    engine.start_subsystem("sftp", None, sock)  # type: ignore[arg-type]
    engine.finish_subsystem()
    version_len = struct.unpack(">I", sock.sent[:4])[0]
    return bytes(sock.sent[4 + version_len:]), engine


def replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """(type, request id, rest) of each reply, in the order sent."""
    out = []
    pos = 0
    while pos < len(raw):
        (size,) = struct.unpack(">I", raw[pos:pos + 4])
        body = raw[pos + 4:pos + 4 + size]
        out.append((body[0], struct.unpack(">I", body[1:5])[0], body[5:]))
        pos += 4 + size
    return out


@pytest.fixture
def export(tmp_path: Path) -> Path:
    path = tmp_path / "export"
    path.mkdir()
    (path / "readonly").write_bytes(b"r" * 100)
    return path


def _mixed_stream(export: Path) -> tuple[bytes, bytes, bytes]:
    """Requests a pipelining client could send, what its READ must return and what "f" holds after them."""
    rnd = os.urandom(300_000)
    expect = bytearray()
    stream = packet(OPEN, u32(1) + s(f"{export}/f") + u32(F_READ | F_WRITE | F_CREAT | F_TRUNC) + u32(0))

    def write(rid: int, offset: int, data: bytes, handle: bytes = b"hx1") -> bytes:
        if handle == b"hx1":
            end = offset + len(data)
            if len(expect) < end:
                expect.extend(b"\0" * (end - len(expect)))
            expect[offset:end] = data
        return packet(WRITE, u32(rid) + s(handle) + u64(offset) + s(data))

    pos = 0
    for i in range(24):  # contiguous 32 KiB writes, as sshfs sends them
        stream += write(100 + i, pos, rnd[pos:pos + 32768])
        pos += 32768
    stream += write(200, 5, b"overwrites what came before")
    stream += write(201, 0, b"")  # an empty write
    stream += write(202, 0, b"x", handle=b"no-such-handle")  # answered at once, in its place
    stream += packet(WRITE, u32(203) + s(b"hx1") + u64(2**63) + s(b"x"))  # offset out of range
    stream += write(204, 900_000, rnd[:1000])  # a hole before it
    stream += packet(READ, u32(300) + s(b"hx1") + u64(0) + u32(65536))  # must see every write above
    at_read = bytes(expect[:65536])
    stream += packet(FSTAT, u32(301) + s(b"hx1"))
    for i in range(8):
        stream += write(400 + i, 32768 * i, rnd[100_000 + i:100_000 + i + 32768])
    stream += packet(WRITE, u32(500) + s(b"hx1") + u64(0) + u32(100))  # truncated: BAD_MESSAGE
    stream += packet(CLOSE, u32(501) + s(b"hx1"))
    # A handle not open for writing: each write fails in the worker (EBADF), each gets its own status.
    stream += packet(OPEN, u32(600) + s(f"{export}/readonly") + u32(F_READ) + u32(0))
    for i in range(3):
        stream += write(601 + i, 10 * i, b"no" * writebehind.MIN_BYTES, handle=b"hx2")
    stream += packet(CLOSE, u32(610) + s(b"hx2"))
    return stream, at_read, bytes(expect)


def test_replies_and_files_are_those_of_a_one_at_a_time_server(export: Path) -> None:
    stream, at_read, expect = _mixed_stream(export)
    plain, _ = serve(export, stream, behind=False)
    plain_file = (export / "f").read_bytes()
    (export / "f").unlink()
    behind, engine = serve(export, stream, behind=True)
    # Behind: the 32 KiB ones, the small ones while others were pending, the large ones that fail.
    assert engine.writes_behind == 24 + 2 + 8 + 3
    assert (export / "f").read_bytes() == plain_file == expect
    assert behind == plain
    got = replies(behind)
    assert [rid for _, rid, _ in got] == sorted(rid for _, rid, _ in got)  # in request order
    by_id = {rid: (t, rest) for t, rid, rest in got}
    assert by_id[300][0] == DATA and by_id[300][1][4:] == at_read
    for rid in (601, 602, 603):
        t, rest = by_id[rid]
        assert t == STATUS and struct.unpack(">I", rest[:4])[0] == 2  # NO_SUCH_FILE, as EBADF maps
        assert b"Bad file descriptor" in rest


def test_off_without_gevent_for_small_writes_and_when_opted_out(export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stream, _, _ = _mixed_stream(export)
    _, engine = serve(export, stream, behind=None)
    assert engine.writes_behind == 0
    small = (packet(OPEN, u32(1) + s(f"{export}/small") + u32(F_WRITE | F_CREAT) + u32(0))
             + packet(WRITE, u32(2) + s(b"hx1") + u64(0) + s(b"x" * 100)) + packet(CLOSE, u32(3) + s(b"hx1")))
    _, engine = serve(export, small, behind=True)
    assert engine.writes_behind == 0  # a created file's few bytes: written at once, no thread
    assert (export / "small").read_bytes() == b"x" * 100
    monkeypatch.setenv(writebehind.ENV, "0")
    _, engine = serve(export, stream, behind=True)
    assert engine.writes_behind == 0  # the opt-out wins


class _Gate:
    """Holds the worker in front of write_batch until opened; records the session's first wait."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.first_wait = threading.Event()
        self.pending_at_first_wait: tuple[int, int] | None = None
        real_batch, real_wait = writebehind.write_batch, writebehind.WriteBehind.wait

        def gated_batch(batch: list[writebehind.Write]) -> list[tuple[int, OSError | None]]:
            assert self.open.wait(WAIT)
            return real_batch(batch)

        def recording_wait(behind: writebehind.WriteBehind) -> None:
            if self.pending_at_first_wait is None:
                self.pending_at_first_wait = (behind.pending, behind.pending_bytes)
                self.first_wait.set()
            real_wait(behind)

        monkeypatch.setattr(writebehind, "write_batch", gated_batch)
        monkeypatch.setattr(writebehind.WriteBehind, "wait", recording_wait)


def _open_fds() -> set[tuple[str, str]]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            continue  # the descriptor of the listdir itself
    return out


def _serve_in_thread(export: Path, stream: bytes) -> Iterator[threading.Thread]:
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(serve(export, stream, behind=True)))
    t.start()
    yield t
    t.join(WAIT)
    assert not t.is_alive() and result


@pytest.mark.parametrize(("count", "size"), [(40, writebehind.MIN_BYTES), (6, 200 * 1024)])
def test_a_session_holds_a_bounded_number_of_pending_writes(
        export: Path, monkeypatch: pytest.MonkeyPatch, count: int, size: int) -> None:
    """With the worker held, the session stops taking WRITEs at MAX_PENDING_WRITES or MAX_PENDING_BYTES."""
    gate = _Gate(monkeypatch)
    stream = packet(OPEN, u32(1) + s(f"{export}/f") + u32(F_WRITE | F_CREAT) + u32(0))
    data = os.urandom(size)
    for i in range(count):
        stream += packet(WRITE, u32(10 + i) + s(b"hx1") + u64(i * size) + s(data))
    runs = _serve_in_thread(export, stream)
    next(runs)
    try:
        assert gate.first_wait.wait(WAIT)
        assert gate.pending_at_first_wait is not None
        pending, pending_bytes = gate.pending_at_first_wait
        assert pending <= writebehind.MAX_PENDING_WRITES
        assert pending_bytes <= writebehind.MAX_PENDING_BYTES
        assert pending < count  # it stopped before taking them all
    finally:
        gate.open.set()
        next(runs, None)
    assert (export / "f").read_bytes() == data * count


def test_session_end_waits_for_pending_writes_before_closing_files(
        export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session ended (by an oversized packet) with writes still held: every byte lands, then the
    handle and the worker go."""
    gate = _Gate(monkeypatch)
    stream = packet(OPEN, u32(1) + s(f"{export}/f") + u32(F_WRITE | F_CREAT) + u32(0))
    data = os.urandom(32768)
    for i in range(10):
        stream += packet(WRITE, u32(10 + i) + s(b"hx1") + u64(i * len(data)) + s(data))
    stream += u32(eng.MAX_PACKET_LENGTH + 1) + b"\0" * 16  # ends the session at once
    threads_before = set(threading.enumerate())
    runs = _serve_in_thread(export, stream)
    next(runs)
    try:
        assert gate.first_wait.wait(WAIT)  # the session's end waits for the worker
        assert gate.pending_at_first_wait is not None and gate.pending_at_first_wait[0] == 10
    finally:
        gate.open.set()
        next(runs, None)
    assert (export / "f").read_bytes() == data * 10
    assert not [fd for fd, target in _open_fds() if target == str(export / "f")]  # the handle is closed
    assert not [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]


# -- write_batch on its own ---------------------------------------------------------------------

def test_contiguous_writes_are_one_pwritev_and_each_gets_its_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.pwritev

    def counting(fd: int, buffers: Any, offset: int) -> int:
        calls.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counting)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    other = os.open(tmp_path / "g", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        W = writebehind.Write
        batch = [W(1, fd, b"a" * 10, 0), W(2, fd, b"b" * 10, 10), W(3, fd, b"", 20), W(4, fd, b"c" * 5, 20),
                 W(5, other, b"z", 0), W(6, fd, b"d", 100), W(7, -1, b"e", 0)]
        results = writebehind.write_batch(batch)
        assert [rid for rid, _ in results] == [1, 2, 3, 4, 5, 6, 7]
        assert [e for _, e in results[:6]] == [None] * 6
        error = results[6][1]
        assert isinstance(error, OSError) and error.errno == errno.EBADF
        assert calls == [4, 1, 1, 1]  # the run of four, g, the write at 100, the bad descriptor
        assert os.pread(fd, 200, 0) == b"a" * 10 + b"b" * 10 + b"c" * 5 + b"\0" * 75 + b"d"
        assert os.pread(other, 10, 0) == b"z"
    finally:
        os.close(fd)
        os.close(other)


_SHORT_WRITE = r"""
import json, os, resource, signal, sys
sys.path.insert(0, sys.argv[2])
from x2go_sftp import writebehind
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
W = writebehind.Write
results = writebehind.write_batch([W(1, fd, b"a" * 4096, 0), W(2, fd, b"b" * 4096, 4096), W(3, fd, b"c" * 10, 8192)])
print(json.dumps([[[rid, None if e is None else e.errno] for rid, e in results], os.fstat(fd).st_size]))
"""


def test_a_short_write_fails_that_write_and_the_next_as_one_at_a_time(tmp_path: Path) -> None:
    """A file size limit cuts the second write short: it and the third fail (EFBIG), the first holds."""
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", _SHORT_WRITE, str(tmp_path / "f"), root],
                         capture_output=True, text=True, timeout=WAIT, check=True).stdout
    results, size = json.loads(out)
    assert results == [[1, None], [2, errno.EFBIG], [3, errno.EFBIG]] and size == 6000
    data = (tmp_path / "f").read_bytes()
    assert data == b"a" * 4096 + b"b" * (6000 - 4096)


# -- waking: the worker per WAKE_BYTES, the session only while it waits ---------------------------

class _WatchedLock:
    """The worker's wake lock, counting the session's releases and telling when the worker sleeps again."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.releases = 0
        self.asleep = threading.Event()

    def locked(self) -> bool:
        return bool(self.lock.locked())

    def release(self) -> None:
        self.releases += 1
        self.asleep.clear()
        self.lock.release()

    def acquire(self) -> bool:
        self.asleep.set()
        return bool(self.lock.acquire())


class _WatchedEvent:
    """The session's event, telling when the session has begun to wait on it."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.waiting = threading.Event()

    def clear(self) -> None:
        self.event.clear()

    def set(self) -> None:
        self.event.set()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return self.event.wait(timeout)


def test_the_worker_wakes_per_wake_bytes_and_wakes_the_session_only_while_it_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_batch = writebehind.write_batch

    def gated_batch(batch: list[writebehind.Write]) -> list[tuple[int, OSError | None]]:
        assert gate.wait(WAIT)
        return real_batch(batch)

    monkeypatch.setattr(writebehind, "write_batch", gated_batch)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    behind = writebehind.WriteBehind()
    wake = _WatchedLock(behind._wake)
    event = _WatchedEvent(behind._event)
    signals: list[int] = []
    real_signal = behind._signal

    def counting_signal() -> None:
        signals.append(1)
        real_signal()

    behind._wake, behind._event, behind._signal = wake, event, counting_signal  # type: ignore[assignment]
    piece = writebehind.WAKE_BYTES // 4
    data = os.urandom(piece)
    try:
        gate.set()
        for i in range(3):
            behind.submit(i, fd, data, i * piece)
        assert wake.releases == 0  # gathering: the worker sleeps on
        behind.submit(3, fd, data, 3 * piece)
        assert wake.releases == 1  # WAKE_BYTES gathered
        assert wake.asleep.wait(WAIT)  # written, and asleep again
        assert signals == []  # the session was not waiting: nothing woke it
        assert behind.completed() == [(i, None) for i in range(4)]

        # A session that waits wakes the worker for what has gathered, and is woken by it.
        gate.clear()
        behind.submit(4, fd, data, 4 * piece)
        assert wake.releases == 1
        opener = threading.Thread(target=lambda: event.waiting.wait(WAIT) and gate.set())
        opener.start()
        session = threading.Thread(target=behind.wait)
        session.start()
        session.join(WAIT)
        opener.join(WAIT)
        assert not session.is_alive() and wake.releases == 2 and signals
        assert behind.completed() == [(4, None)]
        assert os.pread(fd, 5 * piece, 0) == data * 5
    finally:
        gate.set()
        behind.close()
        os.close(fd)
