"""Tools for the jail attack suites: one client API in two modes, and a sentinel.

* :class:`RawSFTP` speaks SFTP v3 itself over a real channel of our tunnel,
  so attacks can send exact bytes (NUL, invalid UTF-8, overlong names) and
  every reply byte is kept to prove no secret ever left the machine.
* :class:`BackendClient` calls :class:`~x2go_sftp.backend.JailedSFTPServer`
  directly with the same API.
* :class:`Sandbox` builds an export, a read-only export and an "outside"
  full of secrets next to them, and snapshots everything outside the
  writable export: listing, contents, modes, owners, mtimes and atimes
  (atimes are primed older than mtimes so that, under ``relatime``, any read
  or listing of an outside file or directory shows).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat as stat_mod
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
from paramiko.sftp import (
    SFTP_FLAG_APPEND,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_PERMISSION_DENIED,
)
from paramiko.sftp_attr import SFTPAttributes

from x2go_sftp import X2GoRevFwTunnelToSFTP
from x2go_sftp.backend import DirHandle, FileHandle, JailedSFTPServer
from x2go_sftp.defaults import current_local_user
from x2go_sftp.exports import Exports
from x2go_sftp.testing import LoopbackX2GoServer, sftp_client

# The bytes every outside file holds; no reply may ever contain them.
SECRET = b"SECRET-outside-7f3a9c"

# The one text every escape attempt gets on the wire.
DENIED_TEXT = "Permission denied"

READ, WRITE, CREATE, TRUNC, APPEND, EXCL = (
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_APPEND,
    SFTP_FLAG_EXCL,
)

# SFTP v3 packet types (draft-ietf-secsh-filexfer-02).
INIT, VERSION, OPEN, CLOSE, READ_, WRITE_, LSTAT, FSTAT, SETSTAT, FSETSTAT = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(11, 21)
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED, EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 0x1, 0x2, 0x4, 0x8
SFTP_EOF = 1

Path_ = str | bytes


class Refused(Exception):
    """A request answered with an SFTP status other than OK."""

    def __init__(self, code: int, text: str):
        super().__init__(code, text)
        self.code = code
        self.text = text

    @property
    def answer(self) -> tuple[int, str]:
        return self.code, self.text


def _b(p: Path_) -> bytes:
    return p if isinstance(p, bytes) else p.encode("utf-8", "surrogateescape")


def _s(p: Path_) -> str:
    return p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else p


# -- raw SFTP v3 over a channel ------------------------------------------------
def _string(v: Path_) -> bytes:
    b = _b(v)
    return struct.pack(">I", len(b)) + b


def _attrs(a: dict[str, int] | None) -> bytes:
    a = a or {}
    flags, body = 0, b""
    if "size" in a:
        flags |= ATTR_SIZE
        body += struct.pack(">Q", a["size"])
    if "uid" in a:
        flags |= ATTR_UIDGID
        body += struct.pack(">II", a["uid"], a["gid"])
    if "mode" in a:
        flags |= ATTR_PERMISSIONS
        body += struct.pack(">I", a["mode"])
    if "atime" in a:
        flags |= ATTR_ACMODTIME
        body += struct.pack(">II", a["atime"], a["mtime"])
    return struct.pack(">I", flags) + body


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u32(self) -> int:
        (v,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return int(v)

    def u64(self) -> int:
        (v,) = struct.unpack_from(">Q", self.data, self.pos)
        self.pos += 8
        return int(v)

    def string(self) -> bytes:
        n = self.u32()
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def attrs(self) -> dict[str, int]:
        flags = self.u32()
        out: dict[str, int] = {}
        if flags & ATTR_SIZE:
            out["size"] = self.u64()
        if flags & ATTR_UIDGID:
            out["uid"], out["gid"] = self.u32(), self.u32()
        if flags & ATTR_PERMISSIONS:
            out["mode"] = self.u32()
        if flags & ATTR_ACMODTIME:
            out["atime"], out["mtime"] = self.u32(), self.u32()
        return out


class RawSFTP:
    """A minimal SFTP v3 client that sends exactly the bytes it is given."""

    def __init__(self, channel: paramiko.Channel):
        self.chan = channel
        self.received = bytearray()
        self._req = 0
        self._send(INIT, struct.pack(">I", 3))
        t, _ = self._recv()
        assert t == VERSION

    def _send(self, t: int, payload: bytes) -> None:
        self.chan.sendall(struct.pack(">IB", len(payload) + 1, t) + payload)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.chan.recv(n - len(out))
            if not chunk:
                raise EOFError("channel closed")
            out += chunk
        return out

    def _recv(self) -> tuple[int, bytes]:
        (n,) = struct.unpack(">I", self._exact(4))
        data = self._exact(n)
        self.received += data
        return data[0], data[1:]

    def request(self, t: int, payload: bytes) -> tuple[int, _Reader]:
        self._req += 1
        self._send(t, struct.pack(">I", self._req) + payload)
        rt, body = self._recv()
        r = _Reader(body)
        assert r.u32() == self._req
        if rt == STATUS:
            code, text = r.u32(), r.string().decode("utf-8", "replace")
            if code != 0:
                raise Refused(code, text)
        return rt, r

    def pipelined(self, t: int, payloads: list[bytes]) -> list[int]:
        """Send one request of type ``t`` per payload, all at once, then read every reply: their types."""
        first = self._req + 1
        self._req += len(payloads)
        self.chan.sendall(b"".join(struct.pack(">IBI", 5 + len(p), t, first + i) + p for i, p in enumerate(payloads)))
        return [self._recv()[0] for _ in payloads]

    def close(self) -> None:
        self.chan.close()


@contextmanager
def served(exports: Exports, key: paramiko.PKey | None = None, host_key: paramiko.PKey | None = None,
           username: str | None = None) -> Iterator[paramiko.Transport]:
    """A tunnel serving ``exports`` on an in-process X2Go server, and a client logged into it.

    The same parts as conftest's ``make_tunnel``/``connect``, as one context:
    for a module that shares one session, and for scripts that run in an
    interpreter of their own (under gevent).  Keys are made when not given.
    """
    key = key or paramiko.RSAKey.generate(2048)
    host_key = host_key or paramiko.RSAKey.generate(2048)
    server = LoopbackX2GoServer()
    outer = server.connect()
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=key, exports=exports, host_key=host_key)
    tunnel.start()
    try:
        assert tunnel.wait_ready(30)
        transport, client = sftp_client(tunnel.server_port, key, username or current_local_user())
        client.close()
        try:
            yield transport
        finally:
            transport.close()
    finally:
        tunnel.stop_thread()
        tunnel.join(10)
        outer.close()
        server.close()
    assert not tunnel.is_alive()


class SFTPClientAPI:
    """The attack API over :class:`RawSFTP` (a real session through our tunnel)."""

    mode = "sftp"

    def __init__(self, raw: RawSFTP, home: str):
        self.raw = raw
        self.home = home

    @property
    def received(self) -> bytes:
        return bytes(self.raw.received)

    def _status(self, t: int, payload: bytes) -> None:
        self.raw.request(t, payload)

    def _attrs_of(self, t: int, payload: bytes) -> dict[str, int]:
        rt, r = self.raw.request(t, payload)
        assert rt == ATTRS
        return r.attrs()

    def _one_name(self, t: int, payload: bytes) -> str:
        rt, r = self.raw.request(t, payload)
        assert rt == NAME and r.u32() == 1
        return _s(r.string())

    def stat(self, p: Path_) -> dict[str, int]:
        return self._attrs_of(STAT, _string(p))

    def lstat(self, p: Path_) -> dict[str, int]:
        return self._attrs_of(LSTAT, _string(p))

    def open(self, p: Path_, pflags: int = READ, attrs: dict[str, int] | None = None) -> bytes:
        rt, r = self.raw.request(OPEN, _string(p) + struct.pack(">I", pflags) + _attrs(attrs))
        assert rt == HANDLE
        return r.string()

    def close(self, h: Any) -> None:
        self._status(CLOSE, _string(h))

    def read(self, h: Any, offset: int = 0, n: int = 65536) -> bytes:
        try:
            rt, r = self.raw.request(READ_, _string(h) + struct.pack(">QI", offset, n))
        except Refused as e:
            if e.code == SFTP_EOF:
                return b""
            raise
        assert rt == DATA
        return r.string()

    def write(self, h: Any, offset: int, data: bytes) -> None:
        self._status(WRITE_, _string(h) + struct.pack(">Q", offset) + _string(data))

    def fstat(self, h: Any) -> dict[str, int]:
        return self._attrs_of(FSTAT, _string(h))

    def fsetstat(self, h: Any, attrs: dict[str, int]) -> None:
        self._status(FSETSTAT, _string(h) + _attrs(attrs))

    def setstat(self, p: Path_, attrs: dict[str, int]) -> None:
        self._status(SETSTAT, _string(p) + _attrs(attrs))

    def lsetstat(self, p: Path_, attrs: dict[str, int]) -> None:
        self._status(EXTENDED, _string("lsetstat@openssh.com") + _string(p) + _attrs(attrs))

    def opendir(self, p: Path_) -> bytes:
        rt, r = self.raw.request(OPENDIR, _string(p))
        assert rt == HANDLE
        return r.string()

    def readdir(self, h: Any) -> list[tuple[str, dict[str, int]]]:
        try:
            _rt, r = self.raw.request(READDIR, _string(h))
        except Refused as e:
            if e.code == SFTP_EOF:
                return []
            raise
        out = []
        for _ in range(r.u32()):
            name = _s(r.string())
            r.string()
            out.append((name, r.attrs()))
        return out

    def remove(self, p: Path_) -> None:
        self._status(REMOVE, _string(p))

    def mkdir(self, p: Path_, attrs: dict[str, int] | None = None) -> None:
        self._status(MKDIR, _string(p) + _attrs(attrs))

    def rmdir(self, p: Path_) -> None:
        self._status(RMDIR, _string(p))

    def rename(self, a: Path_, b: Path_) -> None:
        self._status(RENAME, _string(a) + _string(b))

    def posix_rename(self, a: Path_, b: Path_) -> None:
        self._status(EXTENDED, _string("posix-rename@openssh.com") + _string(a) + _string(b))

    def hardlink(self, a: Path_, b: Path_) -> None:
        self._status(EXTENDED, _string("hardlink@openssh.com") + _string(a) + _string(b))

    def symlink(self, target: Path_, link: Path_) -> None:
        # OpenSSH's (and sshfs's) order: target first.
        self._status(SYMLINK, _string(target) + _string(link))

    def readlink(self, p: Path_) -> str:
        return self._one_name(READLINK, _string(p))

    def realpath(self, p: Path_) -> str:
        return self._one_name(REALPATH, _string(p))

    def expand_path(self, p: Path_) -> str:
        return self._one_name(EXTENDED, _string("expand-path@openssh.com") + _string(p))

    def statvfs(self, p: Path_) -> int:
        rt, r = self.raw.request(EXTENDED, _string("statvfs@openssh.com") + _string(p))
        assert rt == EXTENDED_REPLY
        return r.u64()


# -- the same API straight on the backend ------------------------------------
def _check(result: Any) -> Any:
    if isinstance(result, int) and not isinstance(result, bool) and int(result) != 0:
        raise Refused(int(result), getattr(result, "message", ""))
    return result


def _to_attr(a: dict[str, int] | None) -> SFTPAttributes:
    attr = SFTPAttributes()
    a = a or {}
    if "size" in a:
        attr.st_size = a["size"]
        attr._flags |= attr.FLAG_SIZE
    if "uid" in a:
        attr.st_uid, attr.st_gid = a["uid"], a["gid"]
        attr._flags |= attr.FLAG_UIDGID
    if "mode" in a:
        attr.st_mode = a["mode"]
        attr._flags |= attr.FLAG_PERMISSIONS
    if "atime" in a:
        attr.st_atime, attr.st_mtime = a["atime"], a["mtime"]
        attr._flags |= attr.FLAG_AMTIME
    return attr


def _from_attr(attr: Any) -> dict[str, int]:
    _check(attr)
    return {
        "size": attr.st_size,
        "uid": attr.st_uid,
        "gid": attr.st_gid,
        "mode": attr.st_mode,
        "atime": int(attr.st_atime),
        "mtime": int(attr.st_mtime),
    }


class BackendClient:
    """The attack API straight on :class:`JailedSFTPServer` (no SSH at all)."""

    mode = "backend"

    def __init__(self, exports: Exports):
        self.server = JailedSFTPServer(None, exports=exports)
        self.sink = bytearray()  # everything the backend handed back

    @property
    def received(self) -> bytes:
        return bytes(self.sink)

    def _keep(self, value: Any) -> Any:
        if isinstance(value, (bytes, str)):
            self.sink += _b(value)
        return value

    def stat(self, p: Path_) -> dict[str, int]:
        return _from_attr(self.server.stat(_s(p)))

    def lstat(self, p: Path_) -> dict[str, int]:
        return _from_attr(self.server.lstat(_s(p)))

    def open(self, p: Path_, pflags: int = READ, attrs: dict[str, int] | None = None) -> FileHandle:
        flags = paramiko.SFTPServer._convert_pflags(None, pflags)  # type: ignore[arg-type]
        return _check(self.server.open(_s(p), flags, _to_attr(attrs)))  # type: ignore[no-any-return]

    def close(self, h: Any) -> None:
        h.close()

    def read(self, h: Any, offset: int = 0, n: int = 65536) -> bytes:
        return self._keep(_check(h.read(offset, n)))  # type: ignore[no-any-return]

    def write(self, h: Any, offset: int, data: bytes) -> None:
        _check(h.write(offset, data))

    def fstat(self, h: Any) -> dict[str, int]:
        return _from_attr(h.stat())

    def fsetstat(self, h: Any, attrs: dict[str, int]) -> None:
        _check(h.chattr(_to_attr(attrs)))

    def setstat(self, p: Path_, attrs: dict[str, int]) -> None:
        _check(self.server.chattr(_s(p), _to_attr(attrs)))

    def lsetstat(self, p: Path_, attrs: dict[str, int]) -> None:
        _check(self.server.lsetstat(_s(p), _to_attr(attrs)))

    def opendir(self, p: Path_) -> DirHandle:
        return _check(self.server.opendir(_s(p)))  # type: ignore[no-any-return]

    def readdir(self, h: Any) -> list[tuple[str, dict[str, int]]]:
        batch = _check(h.read_batch(100))
        return [(self._keep(a.filename), _from_attr(a)) for a in batch]

    def remove(self, p: Path_) -> None:
        _check(self.server.remove(_s(p)))

    def mkdir(self, p: Path_, attrs: dict[str, int] | None = None) -> None:
        _check(self.server.mkdir(_s(p), _to_attr(attrs)))

    def rmdir(self, p: Path_) -> None:
        _check(self.server.rmdir(_s(p)))

    def rename(self, a: Path_, b: Path_) -> None:
        _check(self.server.rename(_s(a), _s(b)))

    def posix_rename(self, a: Path_, b: Path_) -> None:
        _check(self.server.posix_rename(_s(a), _s(b)))

    def hardlink(self, a: Path_, b: Path_) -> None:
        _check(self.server.hardlink(_s(a), _s(b)))

    def symlink(self, target: Path_, link: Path_) -> None:
        _check(self.server.symlink(_s(target), _s(link)))

    def readlink(self, p: Path_) -> str:
        return self._keep(_check(self.server.readlink(_s(p))))  # type: ignore[no-any-return]

    def realpath(self, p: Path_) -> str:
        return self._keep(_check(self.server.realpath(_s(p))))  # type: ignore[no-any-return]

    def expand_path(self, p: Path_) -> str:
        p = _s(p)
        if p == "~" or p.startswith("~/"):
            p = (self.server.home() or "/") + p[1:]
        return self.realpath(p)

    def statvfs(self, p: Path_) -> int:
        st = _check(self.server.statvfs(_s(p)))
        return int(st.f_bsize)


Client = SFTPClientAPI | BackendClient


def read_file(c: Client, p: Path_) -> bytes:
    """OPEN for reading, READ to EOF, CLOSE."""
    h = c.open(p, READ)
    try:
        out, off = b"", 0
        while True:
            chunk = c.read(h, off)
            if not chunk:
                return out
            out += chunk
            off += len(chunk)
    finally:
        c.close(h)


def listdir(c: Client, p: Path_) -> dict[str, dict[str, int]]:
    h = c.opendir(p)
    try:
        out: dict[str, dict[str, int]] = {}
        while True:
            batch = c.readdir(h)
            if not batch:
                return out
            out.update(batch)
    finally:
        c.close(h)


def refusal(fn: Callable[[], Any]) -> Refused:
    """Run a request that must fail; return its refusal."""
    try:
        result = fn()
    except Refused as e:
        return e
    raise AssertionError(f"request succeeded: {result!r}")


def denied(fn: Callable[[], Any]) -> Refused:
    """A request that must get PERMISSION_DENIED with the one uniform text."""
    e = refusal(fn)
    assert e.answer == (SFTP_PERMISSION_DENIED, DENIED_TEXT), e.answer
    return e


def no_such(fn: Callable[[], Any]) -> Refused:
    e = refusal(fn)
    assert e.code == SFTP_NO_SUCH_FILE, e.answer
    return e


# -- the sandbox and its sentinel -------------------------------------------
_NOATIME = getattr(os, "O_NOATIME", 0)
DAY_NS = 86400 * 10**9


def _open_noatime(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | _NOATIME | os.O_CLOEXEC | os.O_NOFOLLOW)
    except PermissionError:
        return os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)


@dataclass
class Sandbox:
    """``base/export`` (rw export, home), ``base/ro`` (read-only export) and secrets around them."""

    base: Path
    #: Reused when given (a long-lived tunnel's registry): cleared, then filled.
    exports: Exports = field(default_factory=Exports)

    def __post_init__(self) -> None:
        b = self.base
        self.export = b / "export"
        self.ro = b / "ro"
        self.outside = b / "outside"
        for d in (
            self.export / "sub" / "deeper",
            self.ro / "rodir",
            self.outside / "dir",
            self.outside / "empty",
            b / "export-evil",
        ):
            d.mkdir(parents=True, exist_ok=True)
        (self.export / "hello.txt").write_text("hello\n")
        (self.export / "sub" / "inside.txt").write_text("inside\n")
        (self.ro / "ro.txt").write_text("read only\n")
        (self.ro / "rodir" / "x.txt").write_text("x\n")
        for f in (
            self.outside / "secret.txt",
            self.outside / "dir" / "inner.txt",
            b / "export-evil" / "secret.txt",
            b / "sibling.txt",
        ):
            f.write_bytes(SECRET + b"\n")
        os.chmod(self.outside / "secret.txt", 0o640)
        os.symlink("secret.txt", self.outside / "link")
        self.exports.clear()
        self.exports.add(str(self.export))
        self.exports.add(str(self.ro), read_only=True)

    # names the attacks use
    def e(self, *parts: str) -> str:
        """Absolute SFTP name inside the writable export."""
        return "/".join([str(self.export), *parts])

    def o(self, *parts: str) -> str:
        """Absolute name outside the exports."""
        return "/".join([str(self.outside), *parts])

    def r(self, *parts: str) -> str:
        return "/".join([str(self.ro), *parts])

    def plant_link(self, at: str, target: str) -> None:
        """A symlink made by a local process (not through SFTP)."""
        os.symlink(target, os.path.join(self.export, at))

    def prime(self) -> None:
        """Set every watched atime a day before its mtime, so a read or listing changes it."""
        for path in self._watched():
            st = os.lstat(path)
            os.utime(path, ns=(st.st_mtime_ns - DAY_NS, st.st_mtime_ns), follow_symlinks=False)

    def _watched(self) -> list[str]:
        out = [str(self.base)]
        skip = {str(self.export)}
        stack = [str(self.base)]
        while stack:
            d = stack.pop()
            fd = _open_noatime(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                names = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            for n in names:
                p = os.path.join(d, n)
                if p in skip:
                    continue
                out.append(p)
                if stat_mod.S_ISDIR(os.lstat(p).st_mode):
                    stack.append(p)
        return out

    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """Full state of everything but the writable export; reading it changes nothing."""
        state: dict[str, tuple[Any, ...]] = {}
        for path in self._watched():
            st = os.lstat(path)
            # The read-only export's own atimes are not watched: reading it is allowed.
            atime = None if path.startswith(str(self.ro)) else st.st_atime_ns
            extra: Any = None
            if stat_mod.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
                # readlink touches the link's atime: put back what was recorded.
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            elif stat_mod.S_ISREG(st.st_mode):
                fd = _open_noatime(path, os.O_RDONLY)
                try:
                    extra = hashlib.sha256(os.read(fd, 1 << 20)).hexdigest()
                finally:
                    os.close(fd)
            state[path] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_nlink,
                st.st_mtime_ns,
                atime,
                extra,
            )
        return state


def assert_unchanged(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> None:
    assert set(after) == set(before), (
        f"created {set(after) - set(before)}, removed {set(before) - set(after)}"
    )
    changed = {p: (before[p], after[p]) for p in before if before[p] != after[p]}
    assert not changed, f"changed outside the writable export: {changed}"


def errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))
