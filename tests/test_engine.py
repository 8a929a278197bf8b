"""The SFTP engine at the protocol level: raw SFTP packets through the in-process topology.

Every test speaks the wire format itself (paramiko's client cannot send
truncated or oversized packets, unknown extensions, bogus handles or
arbitrary read lengths) on an ``sftp`` subsystem channel of a real paramiko
client, through the forwarded port of a real tunnel, to the real engine,
backend and jail.  Formats are OpenSSH's (PROTOCOL, sftp-server.c); see
docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import paramiko
import pytest

from tests.engine_support import PieceSocket
from x2go_sftp import engine as eng
from x2go_sftp.backend import DirHandle, JailedSFTPServer
from x2go_sftp.defaults import current_local_user
from x2go_sftp.exports import Exports
from x2go_sftp.testing import ClientTransport

# Packet types and flags (draft-ietf-secsh-filexfer-02).
INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(11, 21)
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
EXTENDED, EXTENDED_REPLY = 200, 201
FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED, FX_FAILURE, FX_BAD_MESSAGE = 0, 1, 2, 3, 4, 5
FX_OP_UNSUPPORTED = 8
F_READ, F_WRITE, F_APPEND, F_CREAT, F_TRUNC, F_EXCL = 1, 2, 4, 8, 0x10, 0x20
A_SIZE, A_UIDGID, A_PERM, A_TIME = 1, 2, 4, 8

REPLY_TIMEOUT = 30.0  # seconds a reply may take before the test fails (never a sleep)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def s(v: bytes | str) -> bytes:
    raw = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v
    return u32(len(raw)) + raw


def attrs(size: int | None = None, perm: int | None = None, times: tuple[int, int] | None = None) -> bytes:
    flags, out = 0, b""
    if size is not None:
        flags |= A_SIZE
        out += u64(size)
    if perm is not None:
        flags |= A_PERM
        out += u32(perm)
    if times is not None:
        flags |= A_TIME
        out += u32(times[0]) + u32(times[1])
    return u32(flags) + out


class Body:
    """Reads fields out of a reply body."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "reply shorter than its fields"
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.u32())

    def attrs(self) -> dict[str, int]:
        flags = self.u32()
        out: dict[str, int] = {"flags": flags}
        if flags & A_SIZE:
            out["size"] = self.u64()
        if flags & A_UIDGID:
            out["uid"], out["gid"] = self.u32(), self.u32()
        if flags & A_PERM:
            out["perm"] = self.u32()
        if flags & A_TIME:
            out["atime"], out["mtime"] = self.u32(), self.u32()
        return out

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


class RawSFTP:
    """A minimal SFTP v3 client that sends exactly the bytes a test gives it."""

    def __init__(self, chan: paramiko.Channel):
        self.chan = chan
        self.next_id = 1
        self.version = 0
        self.extensions: list[tuple[bytes, bytes]] = []
        self.reply_sizes: list[int] = []

    def send_raw(self, data: bytes) -> None:
        self.chan.sendall(data)

    def send(self, t: int, body: bytes) -> None:
        self.send_raw(u32(len(body) + 1) + bytes((t,)) + body)

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.chan.recv(n - len(out))
            if not chunk:
                raise EOFError("channel closed")
            out += chunk
        return out

    def recv(self) -> tuple[int, Body]:
        (size,) = struct.unpack(">I", self._recv_exact(4))
        self.reply_sizes.append(size)
        data = self._recv_exact(size)
        return data[0], Body(data[1:])

    def init(self) -> None:
        self.send(INIT, u32(3))
        t, body = self.recv()
        assert t == VERSION
        self.version = body.u32()
        while not body.done:
            self.extensions.append((body.string(), body.string()))

    def call(self, t: int, body: bytes) -> tuple[int, Body]:
        rid = self.next_id
        self.next_id += 1
        self.send(t, u32(rid) + body)
        rt, reply = self.recv()
        assert reply.u32() == rid
        return rt, reply

    def ext(self, name: str, body: bytes = b"") -> tuple[int, Body]:
        return self.call(EXTENDED, s(name) + body)

    def status(self, t: int, body: bytes) -> tuple[int, str]:
        rt, reply = self.call(t, body)
        assert rt == STATUS, f"expected STATUS, got {rt}"
        return reply.u32(), reply.string().decode()

    def ext_status(self, name: str, body: bytes = b"") -> tuple[int, str]:
        return self.status(EXTENDED, s(name) + body)

    def handle(self, t: int, body: bytes) -> bytes:
        rt, reply = self.call(t, body)
        if rt == STATUS:
            code = reply.u32()
            raise AssertionError(f"expected HANDLE, got status {code} {reply.string()!r}")
        assert rt == HANDLE
        return reply.string()

    def open(self, path: str | bytes, pflags: int = F_READ, attr: bytes = attrs()) -> bytes:
        return self.handle(OPEN, s(path) + u32(pflags) + attr)

    def opendir(self, path: str | bytes) -> bytes:
        return self.handle(OPENDIR, s(path))

    def close(self, handle: bytes) -> None:
        assert self.status(CLOSE, s(handle)) == (FX_OK, "Success")

    def read(self, handle: bytes, offset: int, length: int) -> bytes | int:
        rt, reply = self.call(READ, s(handle) + u64(offset) + u32(length))
        if rt == DATA:
            return reply.string()
        assert rt == STATUS
        return reply.u32()

    def write(self, handle: bytes, offset: int, data: bytes) -> int:
        return self.status(WRITE, s(handle) + u64(offset) + s(data))[0]

    def names(self, t: int, body: bytes) -> list[tuple[bytes, bytes, dict[str, int]]] | int:
        rt, reply = self.call(t, body)
        if rt == STATUS:
            return reply.u32()
        assert rt == NAME
        count = reply.u32()
        out = [(reply.string(), reply.string(), reply.attrs()) for _ in range(count)]
        assert reply.done
        return out

    def one_name(self, t: int, body: bytes) -> bytes | int:
        result = self.names(t, body)
        if isinstance(result, int):
            return result
        assert len(result) == 1
        return result[0][0]

    def attrs_of(self, t: int, body: bytes) -> dict[str, int] | int:
        rt, reply = self.call(t, body)
        if rt == STATUS:
            return reply.u32()
        assert rt == ATTRS
        return reply.attrs()

    def closed(self) -> bool:
        """True once the server has closed the channel (EOF), waiting for it without sleeping."""
        try:
            return self.chan.recv(1) == b""
        except OSError:
            return True


def open_raw(port: int, key: paramiko.PKey) -> tuple[paramiko.Transport, RawSFTP]:
    sock = socket.create_connection(("127.0.0.1", port))
    transport = ClientTransport(sock)
    transport.start_client()
    transport.auth_publickey(current_local_user(), key)
    chan = transport.open_session()
    chan.invoke_subsystem("sftp")
    chan.settimeout(REPLY_TIMEOUT)
    return transport, RawSFTP(chan)


@pytest.fixture
def tunnel(make_tunnel: Callable[..., Any], export_dir: str) -> Any:
    return make_tunnel([export_dir])


@pytest.fixture
def raw_factory(tunnel: Any, session_key: paramiko.RSAKey) -> Iterator[Callable[[], tuple[paramiko.Transport, RawSFTP]]]:
    transports: list[paramiko.Transport] = []

    def make() -> tuple[paramiko.Transport, RawSFTP]:
        transport, client = open_raw(tunnel.server_port, session_key)
        transports.append(transport)
        return transport, client

    yield make
    for t in transports:
        t.close()


@pytest.fixture
def raw(raw_factory: Callable[[], tuple[paramiko.Transport, RawSFTP]]) -> RawSFTP:
    _, client = raw_factory()
    client.init()
    return client


def P(export_dir: str, *names: str) -> str:
    return os.path.join(export_dir, *names)


# -- version, framing, malformed input --------------------------------------------------------

def test_version_and_extensions_as_openssh(raw: RawSFTP) -> None:
    assert raw.version == 3
    assert raw.extensions == [
        (b"posix-rename@openssh.com", b"1"),
        (b"statvfs@openssh.com", b"2"),
        (b"fstatvfs@openssh.com", b"2"),
        (b"hardlink@openssh.com", b"1"),
        (b"fsync@openssh.com", b"1"),
        (b"lsetstat@openssh.com", b"1"),
        (b"limits@openssh.com", b"1"),
        (b"expand-path@openssh.com", b"1"),
        (b"copy-data", b"1"),
        (b"home-directory", b"1"),
        (b"users-groups-by-id@openssh.com", b"1"),
    ]


def test_oversized_packet_closes_session_with_log_line(raw: RawSFTP, caplog: pytest.LogCaptureFixture,
                                                        export_dir: str) -> None:
    caplog.set_level(logging.WARNING, logger="x2go_sftp")
    h = raw.open(P(export_dir, "hello.txt"))
    # Only the length is sent: the engine must refuse it without waiting for (or buffering) the body.
    raw.send_raw(u32(eng.MAX_PACKET_LENGTH + 1))
    assert raw.closed()
    assert any("exceeds" in r.getMessage() and str(eng.MAX_PACKET_LENGTH) in r.getMessage()
               for r in caplog.records), caplog.text
    del h


def test_largest_packet_is_accepted(raw: RawSFTP, export_dir: str) -> None:
    h = raw.open(P(export_dir, "max.bin"), F_WRITE | F_CREAT)
    rid = raw.next_id
    raw.next_id += 1
    # type(1) + id(4) + handle string + offset(8) + data string = exactly MAX_PACKET_LENGTH
    overhead = 1 + 4 + 4 + len(h) + 8 + 4
    data = os.urandom(eng.MAX_PACKET_LENGTH - overhead)
    raw.send(WRITE, u32(rid) + s(h) + u64(0) + s(data))
    t, reply = raw.recv()
    assert (t, reply.u32(), reply.u32()) == (STATUS, rid, FX_OK)
    raw.close(h)
    assert Path(P(export_dir, "max.bin")).read_bytes() == data


def test_truncated_request_gets_bad_message_and_session_survives(raw: RawSFTP, export_dir: str) -> None:
    # OPEN whose path string claims 100 bytes but carries 3.
    assert raw.status(OPEN, u32(100) + b"abc") == (FX_BAD_MESSAGE, "truncated request")
    # OPEN without its ATTRS (paramiko's Message would have read zeros).
    assert raw.status(OPEN, s(P(export_dir, "hello.txt")) + u32(F_READ))[0] == FX_BAD_MESSAGE
    # READ without its length.
    h = raw.open(P(export_dir, "hello.txt"))
    assert raw.status(READ, s(h) + u64(0))[0] == FX_BAD_MESSAGE
    assert raw.read(h, 0, 100) == b"hello\n"


def test_packet_without_request_id_closes_session(raw: RawSFTP) -> None:
    raw.send_raw(u32(3) + bytes((STAT,)) + b"\0\0")
    assert raw.closed()


def test_exit_status_like_sshd_reports_sftp_server(
        raw_factory: Callable[[], tuple[paramiko.Transport, RawSFTP]]) -> None:
    # The client's EOF ends the session normally: exit status 0 (scp fails without one).
    _, client = raw_factory()
    client.init()
    client.chan.shutdown_write()
    assert client.closed() and client.chan.recv_exit_status() == 0
    # An oversized packet: 11, as OpenSSH's sftp-server exits.
    _, client = raw_factory()
    client.init()
    client.send_raw(u32(eng.MAX_PACKET_LENGTH + 1))
    assert client.closed() and client.chan.recv_exit_status() == 11
    # Any other framing error: 255.
    _, client = raw_factory()
    client.init()
    client.send_raw(u32(2) + bytes((STAT,)) + b"\0")
    assert client.closed() and client.chan.recv_exit_status() == 255


def test_empty_packet_closes_session(raw: RawSFTP) -> None:
    raw.send_raw(u32(0))
    assert raw.closed()


def test_first_packet_must_be_init(raw_factory: Callable[[], tuple[paramiko.Transport, RawSFTP]]) -> None:
    _, client = raw_factory()
    client.send(STAT, u32(1) + s("/"))
    assert client.closed()


def test_unknown_request_and_extension_are_op_unsupported(raw: RawSFTP) -> None:
    assert raw.status(99, b"whatever")[0] == FX_OP_UNSUPPORTED
    assert raw.ext_status("no-such@example.com", b"junk") == (FX_OP_UNSUPPORTED, "Unsupported extended request")
    # paramiko's stock server advertised check-file; OpenSSH does not, and neither do we.
    assert raw.ext_status("check-file-handle", s(b"hx1"))[0] == FX_OP_UNSUPPORTED


def test_bad_handles_fail_cleanly(raw: RawSFTP, export_dir: str) -> None:
    bogus = b"hx999999"
    assert raw.status(CLOSE, s(bogus)) == (FX_NO_SUCH_FILE, "Invalid handle")  # as OpenSSH
    assert raw.read(bogus, 0, 10) == FX_FAILURE
    assert raw.write(bogus, 0, b"x") == FX_FAILURE
    assert raw.attrs_of(FSTAT, s(bogus)) == FX_FAILURE
    assert raw.status(FSETSTAT, s(bogus) + attrs(perm=0o600))[0] == FX_FAILURE
    assert raw.names(READDIR, s(bogus)) == FX_FAILURE
    assert raw.ext_status("fsync@openssh.com", s(bogus))[0] == FX_NO_SUCH_FILE  # as OpenSSH
    assert raw.ext_status("fstatvfs@openssh.com", s(bogus))[0] == FX_FAILURE
    assert raw.status(CLOSE, s(b"x" * 100_000))[0] == FX_NO_SUCH_FILE
    # A directory handle is not a file handle and vice versa.
    d = raw.opendir(export_dir)
    f = raw.open(P(export_dir, "hello.txt"))
    assert raw.read(d, 0, 10) == FX_FAILURE
    assert raw.names(READDIR, s(f)) == FX_FAILURE
    # A closed handle is gone.
    raw.close(f)
    assert raw.read(f, 0, 10) == FX_FAILURE
    raw.close(d)


# -- READ / WRITE --------------------------------------------------------------------------------

def test_huge_read_length_is_clamped(raw: RawSFTP, export_dir: str) -> None:
    payload = os.urandom(1024 * 1024)
    Path(P(export_dir, "big.bin")).write_bytes(payload)
    h = raw.open(P(export_dir, "big.bin"))
    data = raw.read(h, 0, 0xFFFFFFFF)
    assert data == payload[:eng.MAX_READ_LENGTH] and eng.MAX_READ_LENGTH == 261120
    data = raw.read(h, 1000, 300_000)
    assert data == payload[1000:1000 + 261120]
    raw.close(h)


def test_read_at_and_past_eof_is_eof(raw: RawSFTP, export_dir: str) -> None:
    h = raw.open(P(export_dir, "hello.txt"))
    assert raw.read(h, 0, 4096) == b"hello\n"
    assert raw.read(h, 3, 4096) == b"lo\n"
    assert raw.read(h, 6, 4096) == FX_EOF
    assert raw.read(h, 1 << 40, 4096) == FX_EOF
    assert raw.read(h, 0, 0) == FX_EOF  # as OpenSSH: nothing read is EOF
    raw.close(h)


def test_write_at_offsets_and_append(raw: RawSFTP, export_dir: str) -> None:
    h = raw.open(P(export_dir, "w.bin"), F_WRITE | F_CREAT | F_TRUNC, attrs(perm=0o640))
    assert raw.write(h, 10, b"tail") == FX_OK
    assert raw.write(h, 0, b"head") == FX_OK
    raw.close(h)
    assert Path(P(export_dir, "w.bin")).read_bytes() == b"head" + b"\0" * 6 + b"tail"
    assert stat.S_IMODE(os.stat(P(export_dir, "w.bin")).st_mode) == 0o640 & ~_umask()
    h = raw.open(P(export_dir, "w.bin"), F_WRITE | F_APPEND)
    assert raw.write(h, 0, b"++") == FX_OK  # O_APPEND: the offset is ignored, as with OpenSSH
    raw.close(h)
    assert Path(P(export_dir, "w.bin")).read_bytes().endswith(b"tail++")
    # CREAT|EXCL on an existing file fails; on a new one works.
    assert raw.status(OPEN, s(P(export_dir, "w.bin")) + u32(F_WRITE | F_CREAT | F_EXCL) + attrs())[0] == FX_FAILURE
    raw.close(raw.open(P(export_dir, "new.bin"), F_WRITE | F_CREAT | F_EXCL))
    assert os.path.exists(P(export_dir, "new.bin"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- handles and the session ------------------------------------------------------------------

def test_limits_reports_our_caps(raw: RawSFTP) -> None:
    t, body = raw.ext("limits@openssh.com")
    assert t == EXTENDED_REPLY
    assert [body.u64() for _ in range(4)] == [256 * 1024, 261120, 261120, eng.MAX_OPEN_HANDLES]
    assert body.done


def test_handle_cap_next_open_fails_cleanly(raw: RawSFTP, export_dir: str) -> None:
    os.mkdir(P(export_dir, "d"))
    handles = [raw.open(P(export_dir, "hello.txt")) for _ in range(eng.MAX_OPEN_HANDLES - 1)]
    handles.append(raw.opendir(P(export_dir, "d")))
    assert raw.status(OPEN, s(P(export_dir, "hello.txt")) + u32(F_READ) + attrs()) == (
        FX_FAILURE, "Too many open handles")
    assert raw.status(OPENDIR, s(export_dir)) == (FX_FAILURE, "Too many open handles")
    # Every handle still works, and closing one makes room for exactly one more.
    assert raw.read(handles[0], 0, 5) == b"hello"
    raw.close(handles.pop())
    handles.append(raw.opendir(export_dir))
    assert raw.status(OPEN, s(P(export_dir, "hello.txt")) + u32(F_READ) + attrs())[0] == FX_FAILURE
    for h in handles:
        raw.close(h)


def _fds_under(path: str) -> int:
    real = os.path.realpath(path)
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == real or target.startswith(real + "/"):
            n += 1
    return n


def _wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Bounded polling of a real condition (exponential back-off, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def test_closing_session_closes_every_handle_and_fd(
        no_leaks: None, raw_factory: Callable[[], tuple[paramiko.Transport, RawSFTP]], export_dir: str) -> None:
    os.mkdir(P(export_dir, "sub"))
    for i in range(20):
        Path(P(export_dir, "sub", f"f{i}")).write_bytes(b"x" * i)
    baseline = _fds_under(export_dir)
    transport, client = raw_factory()
    client.init()
    for i in range(20):
        client.open(P(export_dir, "sub", f"f{i}"), F_READ | F_WRITE)
    for _ in range(5):
        d = client.opendir(P(export_dir, "sub"))
        assert isinstance(client.names(READDIR, s(d)), list)  # a listing in progress
    assert _fds_under(export_dir) >= baseline + 25
    transport.close()
    assert _wait_until(lambda: _fds_under(export_dir) == baseline), (
        f"{_fds_under(export_dir) - baseline} descriptors still open under the export")


def test_oversized_packet_also_releases_handles(raw: RawSFTP, export_dir: str) -> None:
    baseline = _fds_under(export_dir)
    for _ in range(10):
        raw.open(P(export_dir, "hello.txt"))
    assert _fds_under(export_dir) >= baseline + 10
    raw.send_raw(u32(0xFFFFFFFF))
    assert raw.closed()
    assert _wait_until(lambda: _fds_under(export_dir) == baseline)


# -- names and paths ---------------------------------------------------------------------------

def test_dot_relative_paths_and_home_resolve_to_first_export(
        make_tunnel: Callable[..., Any], session_key: paramiko.RSAKey, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "sub").mkdir(parents=True)
    second.mkdir()
    (first / "sub" / "f.txt").write_bytes(b"in first")
    tunnel = make_tunnel([str(first), str(second)])
    transport, raw = open_raw(tunnel.server_port, session_key)
    try:
        raw.init()
        home = str(first).encode()
        assert raw.one_name(REALPATH, s(".")) == home
        assert raw.one_name(REALPATH, s("")) == home
        assert raw.one_name(REALPATH, s("sub/../sub/f.txt")) == home + b"/sub/f.txt"
        assert raw.one_name(REALPATH, s(str(second))) == str(second).encode()
        assert raw.one_name(EXTENDED, s("home-directory") + s("")) == home
        assert raw.one_name(EXTENDED, s("home-directory") + s(current_local_user())) == home
        assert raw.status(EXTENDED, s("home-directory") + s("somebody-else"))[0] == FX_NO_SUCH_FILE
        assert raw.one_name(EXTENDED, s("expand-path@openssh.com") + s("~")) == home
        assert raw.one_name(EXTENDED, s("expand-path@openssh.com") + s("~/")) == home
        assert raw.one_name(EXTENDED, s("expand-path@openssh.com") + s("~/sub/f.txt")) == home + b"/sub/f.txt"
        assert raw.one_name(EXTENDED, s("expand-path@openssh.com") + s(f"~{current_local_user()}/sub")) == (
            home + b"/sub")
        assert raw.one_name(EXTENDED, s("expand-path@openssh.com") + s("sub")) == home + b"/sub"
        assert raw.one_name(EXTENDED, s("expand-path@openssh.com") + s("")) == home
        assert raw.status(EXTENDED, s("expand-path@openssh.com") + s("~nobody-like-this/x")) == (
            FX_NO_SUCH_FILE, "No such user")
        # Relative paths work for every request, e.g. STAT and OPEN.
        st = raw.attrs_of(STAT, s("sub/f.txt"))
        assert isinstance(st, dict) and st["size"] == 8
        h = raw.open("sub/f.txt")
        assert raw.read(h, 0, 100) == b"in first"
        # Outside every export: refused, whether or not it exists.
        assert raw.status(STAT, s("/etc/passwd"))[0] == FX_PERMISSION_DENIED
        assert raw.status(STAT, s("../../../../etc/passwd"))[0] == FX_PERMISSION_DENIED
    finally:
        transport.close()


def test_non_utf8_names_pass_through(raw: RawSFTP, export_dir: str) -> None:
    name = b"caf\xe9-\xff.bin"  # Latin-1, not UTF-8
    with open(os.path.join(export_dir.encode(), name), "wb") as f:
        f.write(b"latin")
    d = raw.opendir(export_dir)
    seen: set[bytes] = set()
    while isinstance(batch := raw.names(READDIR, s(d)), list):
        seen.update(n for n, _, _ in batch)
    assert batch == FX_EOF
    assert name in seen
    h = raw.open(export_dir.encode() + b"/" + name)
    assert raw.read(h, 0, 10) == b"latin"
    assert raw.status(RENAME, s(export_dir.encode() + b"/" + name) + s(export_dir.encode() + b"/\xfe"))[0] == FX_OK
    assert os.path.exists(os.path.join(export_dir.encode(), b"\xfe"))


def test_missing_and_denied_statuses_carry_errno_text(raw: RawSFTP, export_dir: str) -> None:
    assert raw.status(STAT, s(P(export_dir, "nope"))) == (FX_NO_SUCH_FILE, "No such file or directory")
    assert raw.status(OPEN, s(P(export_dir, "nope")) + u32(F_READ) + attrs()) == (
        FX_NO_SUCH_FILE, "No such file or directory")
    assert raw.status(STAT, s(P(export_dir, "hello.txt", "x"))) == (FX_NO_SUCH_FILE, "Not a directory")
    assert raw.status(REMOVE, s(P(export_dir, "nope"))) == (FX_NO_SUCH_FILE, "No such file or directory")
    assert raw.status(MKDIR, s(P(export_dir, "hello.txt")) + attrs()) == (FX_FAILURE, "File exists")
    assert raw.status(STAT, s("/")) == (FX_PERMISSION_DENIED, "Permission denied")
    assert raw.status(OPEN, s(export_dir) + u32(F_READ) + attrs()) == (FX_FAILURE, "Is a directory")


# -- RENAME, posix-rename, hardlink, RMDIR, SYMLINK ----------------------------------------------

def test_rename_never_overwrites(raw: RawSFTP, export_dir: str) -> None:
    a, b = P(export_dir, "a"), P(export_dir, "b")
    Path(a).write_bytes(b"A")
    Path(b).write_bytes(b"B")
    assert raw.status(RENAME, s(a) + s(b)) == (FX_FAILURE, "File exists")
    assert Path(a).read_bytes() == b"A" and Path(b).read_bytes() == b"B"
    assert os.stat(a).st_nlink == 1  # the link+unlink attempt left no extra name behind
    ino = os.stat(a).st_ino
    assert raw.status(RENAME, s(a) + s(P(export_dir, "c")))[0] == FX_OK
    assert not os.path.exists(a) and os.stat(P(export_dir, "c")).st_ino == ino
    assert os.stat(P(export_dir, "c")).st_nlink == 1
    # Directories and symlinks: never onto an existing name either.
    os.mkdir(P(export_dir, "d1"))
    os.mkdir(P(export_dir, "d2"))
    assert raw.status(RENAME, s(P(export_dir, "d1")) + s(P(export_dir, "d2")))[0] == FX_FAILURE
    assert raw.status(RENAME, s(P(export_dir, "d1")) + s(b))[0] == FX_FAILURE
    os.symlink("c", P(export_dir, "lnk"))
    assert raw.status(RENAME, s(P(export_dir, "lnk")) + s(b))[0] == FX_FAILURE
    assert raw.status(RENAME, s(P(export_dir, "lnk")) + s(P(export_dir, "lnk2")))[0] == FX_OK
    assert os.readlink(P(export_dir, "lnk2")) == "c"
    assert raw.status(RENAME, s(P(export_dir, "nope")) + s(P(export_dir, "x"))) == (
        FX_NO_SUCH_FILE, "No such file or directory")


def test_posix_rename_replaces_atomically(raw: RawSFTP, export_dir: str) -> None:
    a, b = P(export_dir, "a"), P(export_dir, "b")
    Path(a).write_bytes(b"new")
    Path(b).write_bytes(b"old")
    ino = os.stat(a).st_ino
    assert raw.ext_status("posix-rename@openssh.com", s(a) + s(b)) == (FX_OK, "Success")
    assert not os.path.exists(a)
    assert Path(b).read_bytes() == b"new" and os.stat(b).st_ino == ino
    os.mkdir(P(export_dir, "d"))
    os.mkdir(P(export_dir, "e"))
    Path(P(export_dir, "e", "x")).write_bytes(b"")
    assert raw.ext_status("posix-rename@openssh.com", s(P(export_dir, "d")) + s(P(export_dir, "e"))) == (
        FX_FAILURE, "Directory not empty")


def test_hardlink(raw: RawSFTP, export_dir: str) -> None:
    src, dst = P(export_dir, "hello.txt"), P(export_dir, "hl.txt")
    assert raw.ext_status("hardlink@openssh.com", s(src) + s(dst)) == (FX_OK, "Success")
    assert os.stat(src).st_ino == os.stat(dst).st_ino and os.stat(src).st_nlink == 2
    assert raw.ext_status("hardlink@openssh.com", s(src) + s(dst)) == (FX_FAILURE, "File exists")
    # Never out of the export.
    assert raw.ext_status("hardlink@openssh.com", s("/etc/passwd") + s(P(export_dir, "pw")))[0] == (
        FX_PERMISSION_DENIED)


def test_rmdir_only_empty(raw: RawSFTP, export_dir: str) -> None:
    os.makedirs(P(export_dir, "full", "inner"))
    Path(P(export_dir, "full", "f")).write_bytes(b"keep")
    assert raw.status(RMDIR, s(P(export_dir, "full"))) == (FX_FAILURE, "Directory not empty")
    assert Path(P(export_dir, "full", "f")).read_bytes() == b"keep"
    assert raw.status(RMDIR, s(P(export_dir, "full", "inner"))) == (FX_OK, "Success")
    assert not os.path.exists(P(export_dir, "full", "inner"))
    assert raw.status(RMDIR, s(P(export_dir, "hello.txt"))) == (FX_NO_SUCH_FILE, "Not a directory")
    assert raw.status(MKDIR, s(P(export_dir, "m")) + attrs(perm=0o700)) == (FX_OK, "Success")
    assert stat.S_IMODE(os.stat(P(export_dir, "m")).st_mode) == 0o700 & ~_umask()


def test_symlink_argument_order_as_openssh(raw: RawSFTP, export_dir: str) -> None:
    link = P(export_dir, "ln")
    # OpenSSH (and sshfs, sftp): target first, then the new link's path.
    assert raw.status(SYMLINK, s("hello.txt") + s(link)) == (FX_OK, "Success")
    assert os.readlink(link) == "hello.txt"
    assert raw.one_name(READLINK, s(link)) == b"hello.txt"
    st = raw.attrs_of(LSTAT, s(link))
    assert isinstance(st, dict) and stat.S_ISLNK(st["perm"])
    st = raw.attrs_of(STAT, s(link))
    assert isinstance(st, dict) and stat.S_ISREG(st["perm"]) and st["size"] == 6
    assert raw.status(SYMLINK, s("hello.txt") + s(link)) == (FX_FAILURE, "File exists")


# -- attributes --------------------------------------------------------------------------------

def test_setstat_size_truncates_and_extends_without_touching_other_bytes(raw: RawSFTP, export_dir: str) -> None:
    path = P(export_dir, "t.bin")
    payload = os.urandom(100_000)
    Path(path).write_bytes(payload)
    assert raw.status(SETSTAT, s(path) + attrs(size=40_000)) == (FX_OK, "Success")
    assert Path(path).read_bytes() == payload[:40_000]
    assert raw.status(SETSTAT, s(path) + attrs(size=50_000)) == (FX_OK, "Success")
    assert Path(path).read_bytes() == payload[:40_000] + b"\0" * 10_000
    h = raw.open(path, F_READ | F_WRITE)
    assert raw.status(FSETSTAT, s(h) + attrs(size=30_000)) == (FX_OK, "Success")
    assert raw.status(FSETSTAT, s(h) + attrs(size=30_001)) == (FX_OK, "Success")
    raw.close(h)
    assert Path(path).read_bytes() == payload[:30_000] + b"\0"
    assert raw.status(SETSTAT, s(export_dir) + attrs(size=0))[0] != FX_OK  # a directory has no size to set


def test_times_modes_sizes_round_trip(raw: RawSFTP, export_dir: str) -> None:
    path = P(export_dir, "hello.txt")
    when = (1_000_000_000, 1_234_567_890)
    assert raw.status(SETSTAT, s(path) + attrs(perm=0o751, times=when)) == (FX_OK, "Success")
    st = raw.attrs_of(STAT, s(path))
    assert isinstance(st, dict)
    assert (st["atime"], st["mtime"]) == when
    assert st["perm"] == stat.S_IFREG | 0o751 and st["size"] == 6
    local = os.stat(path)
    assert (int(local.st_atime), int(local.st_mtime)) == when
    assert (st["uid"], st["gid"]) == (local.st_uid, local.st_gid)
    # FSETSTAT and FSTAT agree with SETSTAT and STAT.
    h = raw.open(path, F_READ | F_WRITE)
    assert raw.status(FSETSTAT, s(h) + attrs(perm=0o600, times=(7, 8))) == (FX_OK, "Success")
    fst = raw.attrs_of(FSTAT, s(h))
    assert isinstance(fst, dict) and (fst["perm"], fst["atime"], fst["mtime"]) == (stat.S_IFREG | 0o600, 7, 8)
    raw.close(h)
    # setuid/setgid/sticky bits pass (07777, as OpenSSH), file type bits are ignored.
    os.mkdir(P(export_dir, "sticky"))
    assert raw.status(SETSTAT, s(P(export_dir, "sticky")) + attrs(perm=stat.S_IFREG | 0o1777))[0] == FX_OK
    assert stat.S_IMODE(os.stat(P(export_dir, "sticky")).st_mode) == 0o1777


def test_lsetstat_never_follows_and_refuses_size(raw: RawSFTP, export_dir: str) -> None:
    os.utime(P(export_dir, "hello.txt"), (500, 600))
    os.symlink("hello.txt", P(export_dir, "ln"))
    assert raw.ext_status("lsetstat@openssh.com", s(P(export_dir, "ln")) + attrs(times=(100, 200))) == (
        FX_OK, "Success")
    assert os.lstat(P(export_dir, "ln")).st_mtime == 200
    assert os.stat(P(export_dir, "hello.txt")).st_mtime == 600
    assert raw.ext_status("lsetstat@openssh.com", s(P(export_dir, "ln")) + attrs(size=0))[0] == FX_BAD_MESSAGE
    assert Path(P(export_dir, "hello.txt")).read_bytes() == b"hello\n"


def test_odd_timestamps_do_not_break_a_listing(raw: RawSFTP, export_dir: str) -> None:
    path = P(export_dir, "old.txt")
    Path(path).write_bytes(b"x")
    os.utime(path, (-86400, -86400))  # 1969: does not fit SFTP v3's uint32
    d = raw.opendir(export_dir)
    batch = raw.names(READDIR, s(d))
    assert isinstance(batch, list)
    entry = {n: (ln, a) for n, ln, a in batch}[b"old.txt"]
    assert entry[1]["mtime"] == (-86400) & 0xFFFFFFFF  # wrapped as OpenSSH's u_int32 does
    st = raw.attrs_of(STAT, s(path))
    assert isinstance(st, dict) and st["mtime"] == (-86400) & 0xFFFFFFFF


# -- READDIR -----------------------------------------------------------------------------------

def _list_all(raw: RawSFTP, path: str) -> list[list[tuple[bytes, bytes, dict[str, int]]]]:
    d = raw.opendir(path)
    batches = []
    while isinstance(batch := raw.names(READDIR, s(d)), list):
        batches.append(batch)
    assert batch == FX_EOF
    assert raw.names(READDIR, s(d)) == FX_EOF  # and stays at EOF
    raw.close(d)
    return batches


def test_readdir_batches_of_at_most_readdir_max_names(raw: RawSFTP, export_dir: str) -> None:
    """Short names: the byte budget would take more than READDIR_MAX_NAMES a reply; the count stops it."""
    os.mkdir(P(export_dir, "many"))
    count = 2 * eng.READDIR_MAX_NAMES + 100
    names = {f"file-{i:04d}" for i in range(count)}
    for n in names:
        Path(P(export_dir, "many", n)).write_bytes(n.encode())
    raw.reply_sizes.clear()
    batches = _list_all(raw, P(export_dir, "many"))
    assert [len(b) for b in batches] == [eng.READDIR_MAX_NAMES, eng.READDIR_MAX_NAMES, 102]  # with . and ..
    assert max(raw.reply_sizes) + 4096 < eng.READDIR_MAX_BYTES  # the count bound, not the byte budget
    listed = [n for b in batches for n, _, _ in b]
    assert sorted(listed) == sorted([b".", b".."] + [n.encode() for n in names])  # each exactly once
    for b in batches:
        for n, _, a in b:
            if n.startswith(b"file-"):
                assert a["size"] == len(n) and stat.S_ISREG(a["perm"])


def test_readdir_replies_stay_under_sshfs_limit(raw: RawSFTP, export_dir: str) -> None:
    os.mkdir(P(export_dir, "long"))
    names = {(f"{i:03d}" + "n" * 252) for i in range(400)}  # 255-byte names
    for n in names:
        Path(P(export_dir, "long", n)).write_bytes(b"")
    raw.reply_sizes.clear()
    batches = _list_all(raw, P(export_dir, "long"))
    assert max(raw.reply_sizes) < eng.SSHFS_MAX_REPLY
    assert max(raw.reply_sizes) <= eng.READDIR_MAX_BYTES + 64
    listed = [n for b in batches for n, _, _ in b]
    assert len(listed) == len(set(listed)) == 402
    assert set(listed) == {b".", b".."} | {n.encode() for n in names}


def test_readdir_longname_is_ls_l_like_openssh(raw: RawSFTP, export_dir: str) -> None:
    path = P(export_dir, "hello.txt")
    os.chmod(path, 0o4754)
    when = 1_500_000_000
    os.utime(path, (when, when))
    batch = _list_all(raw, export_dir)[0]
    longname = {n: ln for n, ln, _ in batch}[b"hello.txt"].decode()
    st = os.stat(path)
    user = pwd.getpwuid(st.st_uid).pw_name
    group = grp.getgrgid(st.st_gid).gr_name
    date = time.strftime("%b %e  %Y", time.localtime(when))
    expected = (f"-rwsr-xr--    1 {user:<8} {group:<8} {6:>8} {date} hello.txt")
    assert longname == expected


def test_readdir_longnames_of_many_files_each_their_own(raw: RawSFTP, export_dir: str) -> None:
    """The per-session caches behind long names (mode, owner, date) never lend one file's text to
    another: modes, owners, sizes, recent and old dates differ, and a second listing agrees."""
    d = P(export_dir, "mixed")
    os.mkdir(d)
    now = int(time.time())
    files = {f"f{i:02d}": (mode, when) for i, (mode, when) in enumerate(
        [(0o644, now - 60), (0o644, now - 60), (0o600, now - 3600), (0o4755, 1_500_000_000),
         (0o644, 1_500_000_000), (0o640, now - 86400), (0o644, now - 60 * 86400), (0o777, 86400)])}
    for name, (mode, when) in files.items():
        path = P(d, name)
        Path(path).write_bytes(b"x" * (mode % 97))  # sizes differ too
        os.chmod(path, mode)
        os.utime(path, (when, when))
    other = P(d, "nobody-owned")
    Path(other).write_bytes(b"")
    if os.geteuid() == 0:
        os.chown(other, 65534, 65534)
    for _ in range(2):
        listed = {n.decode(): ln.decode() for b in _list_all(raw, d) for n, ln, _ in b}
        for name in [*files, "nobody-owned"]:
            st = os.lstat(P(d, name))
            assert listed[name] == raw_longname(st, name, time.time()), name


def raw_longname(st: os.stat_result, name: str, now: float) -> str:
    """What OpenSSH's sftp-server (ls_file) prints, computed independently of the engine."""
    def ident(lookup: Any, num: int) -> str:
        try:
            return str(lookup(num)[0])
        except KeyError:
            return str(num)
    user, group = ident(pwd.getpwuid, st.st_uid), ident(grp.getgrgid, st.st_gid)
    mtime = int(st.st_mtime)  # a time_t, as sftp-server compares it
    recent = now - 365 * 24 * 3600 // 2 < mtime <= now
    date = time.strftime("%b %e %H:%M" if recent else "%b %e  %Y", time.localtime(mtime))
    return (f"{stat.filemode(st.st_mode)}  {st.st_nlink:>3} {user:<{max(len(user), 8)}} "
            f"{group:<{max(len(group), 8)}} {st.st_size:>8} {date} {name}")


class _Allow(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED


@contextlib.contextmanager
def engine_over_socketpair(sftp_si: type, **kwargs: Any) -> Iterator[RawSFTP]:
    """The engine with a chosen backend class on a paramiko server over a socketpair."""
    server_sock, client_sock = socket.socketpair()
    server_t = paramiko.Transport(server_sock)
    server_t.add_server_key(paramiko.RSAKey.generate(2048))
    server_t.set_subsystem_handler("sftp", eng.SFTPEngine, sftp_si=sftp_si, **kwargs)
    server_t.start_server(event=threading.Event(), server=_Allow())
    client_t = paramiko.Transport(client_sock)
    try:
        client_t.connect(username="u", password="p")
        chan = client_t.open_session()
        chan.invoke_subsystem("sftp")
        chan.settimeout(REPLY_TIMEOUT)
        raw = RawSFTP(chan)
        raw.init()
        yield raw
    finally:
        client_t.close()
        server_t.close()
        client_t.join(10)
        server_t.join(10)
        client_sock.close()
        server_sock.close()


class _RecordingDirHandle(DirHandle):
    asked: ClassVar[list[int]] = []
    given_back: ClassVar[list[int]] = []

    def read_stats(self, max_names: int) -> list[Any] | int:
        type(self).asked.append(max_names)
        return super().read_stats(max_names)

    def push_back(self, entries: list[tuple[str, os.stat_result]]) -> None:
        type(self).given_back.append(len(entries))
        super().push_back(entries)


def _opening_dirs_as(handle_class: type[DirHandle]) -> type[JailedSFTPServer]:
    """The real backend, its open directories of ``handle_class``."""

    class Server(JailedSFTPServer):
        def opendir(self, path: str) -> Any:
            handle = super().opendir(path)
            if isinstance(handle, DirHandle):
                handle.__class__ = handle_class
            return handle

    return Server


class _RecordingServer(_opening_dirs_as(_RecordingDirHandle)):  # type: ignore[misc]
    """The real backend, recording how the engine lists directories."""

    whole_listings = 0

    def list_folder(self, path: str) -> Any:
        type(self).whole_listings += 1
        return super().list_folder(path)


def test_readdir_streams_from_the_directory(tmp_path: Path) -> None:
    """The engine asks the open directory for one batch per READDIR, never for the whole listing."""
    export = tmp_path / "e"
    export.mkdir()
    for i in range(eng.READDIR_MAX_NAMES + 150):
        (export / f"f{i}").write_bytes(b"")
    _RecordingDirHandle.asked = []
    _RecordingServer.whole_listings = 0
    exports = Exports([str(export)])
    try:
        with engine_over_socketpair(_RecordingServer, exports=exports) as raw:
            d = raw.opendir(str(export))
            first = raw.names(READDIR, s(d))
            assert isinstance(first, list) and len(first) == eng.READDIR_MAX_NAMES
            # One reply's names, read a few at a time; never the whole directory.
            assert sum(_RecordingDirHandle.asked) == eng.READDIR_MAX_NAMES
            assert max(_RecordingDirHandle.asked) == eng.READDIR_READ_NAMES
            rest = _list_all(raw, str(export))
            assert sum(len(b) for b in rest) == eng.READDIR_MAX_NAMES + 152  # a listing of its own, . and .. too
            assert _RecordingServer.whole_listings == 0
    finally:
        exports.clear()


def test_readdir_gives_back_at_most_one_read_of_names(tmp_path: Path) -> None:
    """Long names: the byte budget ends each reply; an open directory keeps at most READDIR_READ_NAMES read ahead.

    Read all at once, each reply would read READDIR_MAX_NAMES names and give
    back the ~400 that do not fit, for every open directory of every session.
    """
    export = tmp_path / "e"
    export.mkdir()
    names = {f"{i:03d}" + "n" * 252 for i in range(600)}  # 255 bytes: about 100 names fill a reply
    for n in names:
        (export / n).write_bytes(b"")
    _RecordingDirHandle.asked, _RecordingDirHandle.given_back = [], []
    exports = Exports([str(export)])
    try:
        with engine_over_socketpair(_opening_dirs_as(_RecordingDirHandle), exports=exports) as raw:
            batches = _list_all(raw, str(export))
    finally:
        exports.clear()
    assert {n for b in batches for n, _, _ in b} == {b".", b".."} | {n.encode() for n in names}
    assert sum(len(b) for b in batches) == 602  # each name once
    assert len(batches) >= 6 and all(len(b) < eng.READDIR_MAX_NAMES for b in batches)  # the byte budget ended them
    assert _RecordingDirHandle.given_back and max(_RecordingDirHandle.given_back) < eng.READDIR_READ_NAMES
    assert max(_RecordingDirHandle.asked) <= eng.READDIR_READ_NAMES


class _HidingDirHandle(DirHandle):
    """A subclass that hides names: read_stats is the listing primitive, READDIR follows it."""

    def read_stats(self, max_names: int) -> list[Any] | int:
        batch = super().read_stats(max_names)
        return [(n, st) for n, st in batch if not n.startswith("secret")] if isinstance(batch, list) else batch


def test_readdir_follows_a_subclass_read_stats(tmp_path: Path) -> None:
    export = tmp_path / "e"
    export.mkdir()
    for name in ("plain", "secret-1", "secret-2", "other"):
        (export / name).write_bytes(b"")
    exports = Exports([str(export)])
    try:
        with engine_over_socketpair(_opening_dirs_as(_HidingDirHandle), exports=exports) as raw:
            listed = {n for b in _list_all(raw, str(export)) for n, _, _ in b}
            assert listed == {b".", b"..", b"plain", b"other"}
    finally:
        exports.clear()


# -- statvfs, fsync --------------------------------------------------------------------------------

def _statvfs_fields(body: Body) -> list[int]:
    values = [body.u64() for _ in range(11)]
    assert body.done
    return values


def test_statvfs_and_fstatvfs_wire_format(raw: RawSFTP, export_dir: str) -> None:
    local = os.statvfs(export_dir)
    t, body = raw.ext("statvfs@openssh.com", s(export_dir))
    assert t == EXTENDED_REPLY
    v = _statvfs_fields(body)
    # bsize frsize blocks bfree bavail files ffree favail fsid flag namemax (PROTOCOL 4.4)
    assert (v[0], v[1], v[2], v[5], v[8], v[10]) == (
        local.f_bsize, local.f_frsize, local.f_blocks, local.f_files, local.f_fsid, local.f_namemax)
    assert v[9] & 1 == (1 if local.f_flag & os.ST_RDONLY else 0)
    h = raw.open(P(export_dir, "hello.txt"))
    t, body = raw.ext("fstatvfs@openssh.com", s(h))
    assert t == EXTENDED_REPLY
    fv = _statvfs_fields(body)
    assert (fv[0], fv[2], fv[8], fv[10]) == (v[0], v[2], v[8], v[10])
    assert raw.ext_status("statvfs@openssh.com", s("/"))[0] == FX_PERMISSION_DENIED


def test_statvfs_reports_read_only_export(make_tunnel: Callable[..., Any], session_key: paramiko.RSAKey,
                                          export_dir: str) -> None:
    tunnel = make_tunnel([(export_dir, True)])
    transport, raw = open_raw(tunnel.server_port, session_key)
    try:
        raw.init()
        t, body = raw.ext("statvfs@openssh.com", s(export_dir))
        assert t == EXTENDED_REPLY and _statvfs_fields(body)[9] & 1 == 1
        assert raw.status(OPEN, s(P(export_dir, "x")) + u32(F_WRITE | F_CREAT) + attrs())[0] == FX_PERMISSION_DENIED
    finally:
        transport.close()


def test_fsync(raw: RawSFTP, export_dir: str) -> None:
    h = raw.open(P(export_dir, "s.bin"), F_WRITE | F_CREAT)
    assert raw.write(h, 0, b"durable") == FX_OK
    assert raw.ext_status("fsync@openssh.com", s(h)) == (FX_OK, "Success")
    raw.close(h)
    d = raw.opendir(export_dir)
    assert raw.ext_status("fsync@openssh.com", s(d))[0] == FX_NO_SUCH_FILE  # not a file handle


# -- users-groups-by-id, copy-data -------------------------------------------------------------------

def _packed(names: bytes) -> list[bytes]:
    body, out = Body(names), []
    while not body.done:
        out.append(body.string())
    return out


def test_users_groups_by_id(raw: RawSFTP) -> None:
    unknown = 3_999_999_999
    uid, gid = os.getuid(), os.getgid()
    t, body = raw.ext("users-groups-by-id@openssh.com",
                      s(u32(0) + u32(unknown) + u32(uid)) + s(u32(gid)))
    assert t == EXTENDED_REPLY
    users, groups = _packed(body.string()), _packed(body.string())
    assert body.done
    assert users == [b"root", b"", pwd.getpwuid(uid).pw_name.encode()]
    assert groups == [grp.getgrgid(gid).gr_name.encode()]
    t, body = raw.ext("users-groups-by-id@openssh.com", s(b"") + s(b""))
    assert (t, body.string(), body.string()) == (EXTENDED_REPLY, b"", b"")
    # An id list that is not a whole number of uint32s is malformed.
    assert raw.ext_status("users-groups-by-id@openssh.com", s(b"\0\0\0") + s(b""))[0] == FX_BAD_MESSAGE
    # More ids than one request may carry: refused (tests/test_bounds.py has the bound itself).
    many_roots = u32(0) * 20_000  # an 80 kB request whose answer ("root" x 20000) is 160 kB
    assert raw.ext_status("users-groups-by-id@openssh.com", s(many_roots) + s(b""))[0] == FX_FAILURE
    t, body = raw.ext("users-groups-by-id@openssh.com", s(u32(0) * eng.MAX_IDS_PER_REQUEST) + s(b""))
    assert t == EXTENDED_REPLY and _packed(body.string()) == [b"root"] * eng.MAX_IDS_PER_REQUEST


def test_copy_data(raw: RawSFTP, export_dir: str) -> None:
    payload = os.urandom(300_000)
    Path(P(export_dir, "src")).write_bytes(payload)
    src = raw.open(P(export_dir, "src"))
    dst = raw.open(P(export_dir, "dst"), F_WRITE | F_CREAT | F_TRUNC)
    # Whole file (length 0: until EOF), as OpenSSH's sftp "cp" asks.
    assert raw.ext_status("copy-data", s(src) + u64(0) + u64(0) + s(dst) + u64(0)) == (FX_OK, "Success")
    assert Path(P(export_dir, "dst")).read_bytes() == payload
    # A range to an offset; nothing else in the destination changes.
    assert raw.ext_status("copy-data", s(src) + u64(1000) + u64(70_000) + s(dst) + u64(5)) == (FX_OK, "Success")
    expected = payload[:5] + payload[1000:71_000] + payload[70_005:]
    assert Path(P(export_dir, "dst")).read_bytes() == expected
    # Asking for more than the source holds ends at EOF.
    assert raw.ext_status("copy-data", s(src) + u64(299_990) + u64(100) + s(dst) + u64(0))[0] == FX_EOF
    assert Path(P(export_dir, "dst")).read_bytes()[:10] == payload[299_990:]
    # Same handle, or the same file through two handles: refused.
    assert raw.ext_status("copy-data", s(src) + u64(0) + u64(0) + s(src) + u64(10))[0] == FX_FAILURE
    again = raw.open(P(export_dir, "src"), F_READ | F_WRITE)
    assert raw.ext_status("copy-data", s(src) + u64(0) + u64(0) + s(again) + u64(300_000))[0] == FX_FAILURE
    assert os.path.getsize(P(export_dir, "src")) == 300_000
    # A destination opened read-only: refused.
    ro = raw.open(P(export_dir, "hello.txt"))
    assert raw.ext_status("copy-data", s(src) + u64(0) + u64(0) + s(ro) + u64(0))[0] == FX_PERMISSION_DENIED
    assert raw.ext_status("copy-data", s(b"bogus") + u64(0) + u64(0) + s(dst) + u64(0))[0] == FX_FAILURE
    assert Path(P(export_dir, "hello.txt")).read_bytes() == b"hello\n"


def test_engine_works_with_plain_paramiko_interface(tmp_path: Path) -> None:
    """Any SFTPServerInterface still plugs in; extensions it cannot back are not advertised."""
    class Plain(paramiko.SFTPServerInterface):
        def canonicalize(self, path: str) -> str:
            return "/plain"

        def list_folder(self, path: str) -> Any:
            out = []
            for i in range(150):
                a = paramiko.SFTPAttributes()
                a.filename, a.st_size, a.st_mode = f"n{i}", i, stat.S_IFREG | 0o644
                out.append(a)
            return out

    with engine_over_socketpair(Plain) as raw:
        names = {n for n, _ in raw.extensions}
        assert b"posix-rename@openssh.com" not in names and b"hardlink@openssh.com" not in names
        assert b"limits@openssh.com" in names
        assert raw.one_name(REALPATH, s(".")) == b"/plain"
        assert raw.status(REMOVE, s("/x"))[0] == FX_OP_UNSUPPORTED
        assert sum(len(b) for b in _list_all(raw, "/plain")) == 150


def test_outside_paths_for_every_path_request(raw: RawSFTP, export_dir: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    o = str(outside)
    inside = P(export_dir, "hello.txt")
    cases = [
        (OPEN, s(o + "/secret") + u32(F_READ) + attrs()), (OPENDIR, s(o)), (STAT, s(o)), (LSTAT, s(o)),
        (SETSTAT, s(o) + attrs(perm=0o777)), (REMOVE, s(o + "/secret")), (MKDIR, s(o + "/d") + attrs()),
        (RMDIR, s(o)), (REALPATH, s(o)), (READLINK, s(o)), (RENAME, s(o + "/secret") + s(inside + ".x")),
        (RENAME, s(inside) + s(o + "/stolen")), (SYMLINK, s(o + "/secret") + s(P(export_dir, "l"))),
        (EXTENDED, s("posix-rename@openssh.com") + s(inside) + s(o + "/stolen")),
        (EXTENDED, s("hardlink@openssh.com") + s(o + "/secret") + s(inside + ".x")),
        (EXTENDED, s("statvfs@openssh.com") + s(o)),
        (EXTENDED, s("lsetstat@openssh.com") + s(o) + attrs(perm=0o777)),
        (EXTENDED, s("expand-path@openssh.com") + s(o)),
    ]
    for t, body in cases:
        code = raw.status(t, body)[0]
        assert code == FX_PERMISSION_DENIED, (t, body, code)
    assert sorted(os.listdir(o)) == ["secret"] and stat.S_IMODE(os.stat(o).st_mode) != 0o777
    assert (outside / "secret").read_bytes() == b"secret"
    assert hashlib.sha256(Path(inside).read_bytes()).hexdigest() == hashlib.sha256(b"hello\n").hexdigest()


# -- byte-for-byte against OpenSSH's sftp-server ---------------------------------------------------

OPENSSH_SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def _openssh_server(cwd: Path) -> tuple[subprocess.Popen[bytes], RawSFTP]:
    if not os.access(OPENSSH_SFTP_SERVER, os.X_OK):
        pytest.fail(f"{OPENSSH_SFTP_SERVER} is missing (apt-get install openssh-server)")
    ours_end, theirs_end = socket.socketpair()
    proc = subprocess.Popen([OPENSSH_SFTP_SERVER], stdin=theirs_end, stdout=theirs_end, cwd=cwd)
    theirs_end.close()
    ours_end.settimeout(REPLY_TIMEOUT)
    client = RawSFTP(ours_end)  # type: ignore[arg-type]  # a socket has recv/sendall too
    client.init()
    return proc, client


def _populate(root: Path) -> None:
    for child in root.iterdir():  # the export root itself must stay (we hold its descriptor)
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "f").write_bytes(b"x" * 1000)
    (root / "dir" / "g").write_bytes(b"y")
    os.symlink("f", root / "ln")
    os.chmod(root / "f", 0o4754)
    os.utime(root / "f", (1_500_000_000, 1_500_000_000))
    os.utime(root / "dir" / "sub", (0, 0))
    os.utime(root / "dir", (1_400_000_000, 1_400_000_000))  # fixed, so both runs compare equal


def _reply(client: RawSFTP, t: int, body: bytes) -> tuple[Any, ...]:
    rt, reply = client.call(t, body)
    if rt == STATUS:
        return ("STATUS", reply.u32())  # the code; messages differ on purpose (ours carry errno text)
    if rt == HANDLE:
        return ("HANDLE",)
    return (rt, reply.data[reply.pos:])


def _listing(client: RawSFTP, path: str) -> dict[bytes, tuple[bytes, dict[str, int]]]:
    h = client.opendir(path)
    out = {}
    while isinstance(batch := client.names(READDIR, s(h)), list):
        # atime is left out: listing a directory (ours first, then OpenSSH's) updates it.
        out.update({n: (ln, {k: v for k, v in a.items() if k != "atime"}) for n, ln, a in batch})
    client.close(h)
    return out


def test_replies_match_openssh_sftp_server(raw: RawSFTP, export_dir: str) -> None:
    """The same requests on the same files give byte-identical replies from OpenSSH and from us.

    Differences we keep on purpose are listed in docs/protocol.md and checked
    in the tests above (OPEN of a directory, READLINK of a non-link,
    home-directory, the ".." of an export root).
    """
    root = Path(export_dir)
    R = export_dir
    cases = [
        (STAT, s(R + "/f")), (LSTAT, s(R + "/ln")), (STAT, s(R + "/ln")), (STAT, s(R + "/dir")),
        (STAT, s(R + "/nope")), (STAT, s(R + "/f/x")), (LSTAT, s(R + "/nope/x")),
        (REALPATH, s(".")), (REALPATH, s("")), (REALPATH, s(R + "/dir/../f")), (REALPATH, s(R + "/nope")),
        (REALPATH, s(R + "/nope/x")), (REALPATH, s(R + "/ln")), (READLINK, s(R + "/ln")),
        (READLINK, s(R + "/nope")), (OPEN, s(R + "/nope") + u32(F_READ) + attrs()),
        (OPEN, s(R + "/f") + u32(F_WRITE | F_CREAT | F_EXCL) + attrs()), (OPENDIR, s(R + "/f")),
        (OPENDIR, s(R + "/nope")), (OPENDIR, s(R + "/dir")),
        (RMDIR, s(R + "/dir")), (RMDIR, s(R + "/f")), (RMDIR, s(R + "/nope")), (RMDIR, s(R + "/dir/sub")),
        (RENAME, s(R + "/dir/g") + s(R + "/f")), (RENAME, s(R + "/dir/sub") + s(R + "/f")),
        (RENAME, s(R + "/nope") + s(R + "/x")), (RENAME, s(R + "/dir/g") + s(R + "/new")),
        (RENAME, s(R + "/dir/sub") + s(R + "/newdir")), (RENAME, s(R + "/ln") + s(R + "/f")),
        (MKDIR, s(R + "/dir") + attrs()), (MKDIR, s(R + "/m") + attrs(perm=0o700)), (MKDIR, s(R + "/no/m") + attrs()),
        (REMOVE, s(R + "/dir")), (REMOVE, s(R + "/nope")), (REMOVE, s(R + "/ln")),
        (SETSTAT, s(R + "/dir") + attrs(size=0)), (SETSTAT, s(R + "/nope") + attrs(perm=0o600)),
        (SETSTAT, s(R + "/f") + attrs(size=10, perm=0o640, times=(5, 6))),
        (SYMLINK, s("f") + s(R + "/ln")), (SYMLINK, s("f") + s(R + "/ln2")),
        (CLOSE, s(b"\0\0\0\x09")), (READ, s(b"\0\0\0\x09") + u64(0) + u32(10)),
        (EXTENDED, s("hardlink@openssh.com") + s(R + "/f") + s(R + "/ln")),
        (EXTENDED, s("hardlink@openssh.com") + s(R + "/dir") + s(R + "/dir2")),
        (EXTENDED, s("hardlink@openssh.com") + s(R + "/f") + s(R + "/f2")),
        (EXTENDED, s("posix-rename@openssh.com") + s(R + "/dir/sub") + s(R + "/dir")),
        (EXTENDED, s("posix-rename@openssh.com") + s(R + "/dir/g") + s(R + "/f")),
        (EXTENDED, s("lsetstat@openssh.com") + s(R + "/f") + attrs(size=0)),
        (EXTENDED, s("lsetstat@openssh.com") + s(R + "/ln") + attrs(perm=0o600)),
        (EXTENDED, s("lsetstat@openssh.com") + s(R + "/ln") + attrs(times=(7, 8))),
        (EXTENDED, s("fsync@openssh.com") + s(b"\0\0\0\x09")),
        (EXTENDED, s("nope@example.com")),
        (EXTENDED, s("users-groups-by-id@openssh.com") + s(u32(0) + u32(3_999_999_999)) + s(u32(0))),
        (EXTENDED, s("expand-path@openssh.com") + s(R + "/dir/../f")),
    ]
    _populate(root)
    proc, theirs = _openssh_server(root)
    try:
        for t, body in cases:
            _populate(root)
            expected = _reply(theirs, t, body)
            after_openssh = {p: os.lstat(p) for p in (R + "/f", R + "/dir")}
            _populate(root)
            got = _reply(raw, t, body)
            assert got == expected, (t, body)
            if t in (SETSTAT, EXTENDED):
                # The effect on the file (mode, size, times) is the same too.
                now = {p: os.lstat(p) for p in (R + "/f", R + "/dir")}
                for p, st in now.items():
                    old = after_openssh[p]
                    # The two servers ran at different moments: a time the request did not
                    # set may differ by the second boundary between them, a set one (7, 8) cannot.
                    assert (st.st_mode, st.st_size) == (old.st_mode, old.st_size), (t, body, p)
                    assert abs(int(st.st_mtime) - int(old.st_mtime)) <= 1, (t, body, p)
        _populate(root)
        for path in (R, R + "/dir"):
            ours_list, theirs_list = _listing(raw, path), _listing(theirs, path)
            if path == R:  # the ".." of an export root is the root itself (never its parent)
                del ours_list[b".."], theirs_list[b".."]
            assert ours_list == theirs_list
    finally:
        proc.kill()
        proc.wait(10)
        theirs.chan.close()


# -- framing: requests cut anywhere in the input ---------------------------------------
def _serve_pieces(export: str, pieces: list[Any]) -> bytes:
    sock = PieceSocket(pieces)
    engine = eng.SFTPEngine(sock, "sftp", object(), JailedSFTPServer, exports=Exports([export]))
    engine.start_subsystem("sftp", None, sock)  # type: ignore[arg-type]
    engine.finish_subsystem()
    return bytes(sock.sent)


def _cut(stream: bytes, sizes: Callable[[int], int], view: bool) -> list[Any]:
    pieces: list[Any] = []
    pos = i = 0
    while pos < len(stream):
        n = sizes(i)
        piece = stream[pos:pos + n]
        pieces.append(memoryview(b"\xee" + piece + b"\xee")[1:-1] if view else piece)
        if i % 5 == 4:
            pieces.append(None)
        pos, i = pos + n, i + 1
    return pieces


def test_requests_cut_anywhere_in_the_input_get_the_same_replies(tmp_path: Path) -> None:
    """However the input is cut (one byte at a time, across every boundary, as views of larger
    buffers, with packets that bring nothing in between), every request is parsed the same."""
    export = tmp_path / "export"
    export.mkdir()

    def packet(t: int, body: bytes) -> bytes:
        return u32(len(body) + 1) + bytes((t,)) + body

    payloads = [b"", b"x", os.urandom(4099), os.urandom(32768), os.urandom(40000)]
    stream = packet(INIT, u32(3))
    stream += packet(OPEN, u32(1) + s(f"{export}/f") + u32(F_WRITE | F_CREAT | F_TRUNC) + u32(0))
    offset = 0
    for i, data in enumerate(payloads):
        stream += packet(WRITE, u32(10 + i) + s(b"hx1") + u64(offset) + s(data))
        offset += len(data)
    stream += packet(REALPATH, u32(30) + s("."))  # (attributes would carry the times of each run)
    stream += packet(CLOSE, u32(31) + s(b"hx1"))
    stream += packet(LSTAT, u32(32) + s(f"{export}/absent"))

    whole = _serve_pieces(str(export), [stream])
    assert (export / "f").read_bytes() == b"".join(payloads)
    replies = whole[9:]  # after VERSION's length, type and version
    assert replies.count(bytes((STATUS,))) >= len(payloads)
    cuttings = {
        "bytes": lambda i: 1,
        "sevens": lambda i: 7,
        "around packets": lambda i: (32700, 13, 5, 4099)[i % 4],
        "large": lambda i: 100_000,
    }
    for name, sizes in cuttings.items():
        for view in (False, True):
            (export / "f").unlink()
            assert _serve_pieces(str(export), _cut(stream, sizes, view)) == whole, (name, view)
            assert (export / "f").read_bytes() == b"".join(payloads), (name, view)
