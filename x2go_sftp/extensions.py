"""The OpenSSH extensions the engine serves, one function each, switched on by capability.

Each extension is a plain function ``serve(engine, request_number, req)``: it
reads its fields from ``req`` (a :class:`~x2go_sftp.attrs.Reader` past the
extension name) and answers through the engine's reply helpers.  Functions
rather than methods of a mixin: an extension is a request handler and nothing
more, it keeps no state of its own, and ``mypy`` checks each against the one
engine it serves instead of against a mixin's assumed ``self``.  The
underscore helpers of :class:`~x2go_sftp.engine.SFTPEngine` they call are
private to this package, not to the engine's module.

:data:`EXTENSIONS` lists them in the order advertised in VERSION, with the
backend method each needs (Go pkg/sftp style: ``hardlink`` is advertised only
if the backend implements ``hardlink``).  Wire formats: OpenSSH's PROTOCOL,
draft-ietf-secsh-filexfer-extensions-00 for copy-data and home-directory, and
``docs/protocol.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

from paramiko.sftp import (
    CMD_EXTENDED_REPLY,
    SFTP_BAD_MESSAGE,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
)
from paramiko.sftp_attr import SFTPAttributes

from . import paramiko_compat
from .attrs import U32, U64, U64_MASK, BadMessage, Reader, decode, encode, pack_string
from .status import Status

if TYPE_CHECKING:
    from .engine import SFTPEngine

# copy-data moves data in chunks of this size between two open handles (as OpenSSH).
COPY_CHUNK = 64 * 1024

# users-groups-by-id@openssh.com: ids (uids + gids) per request.  OpenSSH
# bounds them only by the packet size (65,536 ids, each an NSS lookup), and
# pays in the session's own process; here every session shares one process,
# and 65k unknown ids cost seconds of CPU.  OpenSSH's sftp client asks for
# the distinct owners of one listing, a handful; 1024 distinct lookups take
# about 0.1 s.  Repeated ids are looked up once (the session's name cache).
MAX_IDS_PER_REQUEST = 1024

# statvfs@openssh.com flag bits (OpenSSH PROTOCOL, section 4.4).
SSH2_FXE_STATVFS_ST_RDONLY = 0x1
SSH2_FXE_STATVFS_ST_NOSUID = 0x2


# -- the backend capabilities that switch extensions on -----------------------------------
# Optional methods beyond paramiko's SFTPServerInterface; the engine checks that
# the backend's class really defines each before it advertises the extension.

class PosixRenamer(Protocol):
    def posix_rename(self, oldpath: str, newpath: str) -> int: ...


class Hardlinker(Protocol):
    def hardlink(self, oldpath: str, newpath: str) -> int: ...


class StatVFSer(Protocol):
    def statvfs(self, path: str) -> os.statvfs_result | int: ...


class LSetStater(Protocol):
    def lsetstat(self, path: str, attr: SFTPAttributes) -> int: ...


# -- the extensions -------------------------------------------------------------------------

def posix_rename(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """posix-rename@openssh.com: rename(2), replacing an existing target."""
    old = req.path()
    new = req.path()
    engine._send_status(request_number, cast(PosixRenamer, engine.server).posix_rename(old, new))


def hardlink(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """hardlink@openssh.com: link(2)."""
    old = req.path()
    new = req.path()
    engine._send_status(request_number, cast(Hardlinker, engine.server).hardlink(old, new))


def _send_statvfs(engine: SFTPEngine, request_number: int, st: Any, read_only: bool) -> None:
    if not isinstance(st, os.statvfs_result):
        engine._send_status(request_number, st)
        return
    flag = 0
    if st.f_flag & os.ST_RDONLY or read_only:
        flag |= SSH2_FXE_STATVFS_ST_RDONLY
    if st.f_flag & os.ST_NOSUID:
        flag |= SSH2_FXE_STATVFS_ST_NOSUID
    values = (st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail,
              st.f_files, st.f_ffree, st.f_favail, st.f_fsid, flag, st.f_namemax)
    body = U32.pack(request_number) + b"".join(U64.pack(int(v) & U64_MASK) for v in values)
    engine._send(CMD_EXTENDED_REPLY, body)


def _path_read_only(engine: SFTPEngine, path: str) -> bool:
    """True if ``path`` lies in a read-only export (reported as ST_RDONLY)."""
    exports = getattr(engine.server, "exports", None)
    if exports is None:
        return False
    try:
        export, _ = exports.find(exports.normalize(path))
    except (OSError, ValueError):
        return False
    return bool(export.read_only)


def statvfs(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """statvfs@openssh.com: statvfs(3) of a path, read-only if its export is."""
    path = req.path()
    _send_statvfs(engine, request_number, cast(StatVFSer, engine.server).statvfs(path),
                  _path_read_only(engine, path))


def fstatvfs(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """fstatvfs@openssh.com: statvfs of an open file's file system (OP_UNSUPPORTED if the handle cannot)."""
    f = engine._file(request_number, req.handle())
    if f is None:
        return
    statvfs = getattr(f, "statvfs", None)
    if statvfs is None:
        engine._send_status(request_number, SFTP_OP_UNSUPPORTED)
        return
    read_only = getattr(f, "read_only", None)
    if read_only is None:
        read_only = getattr(getattr(f, "export", None), "read_only", False)
    _send_statvfs(engine, request_number, statvfs(), bool(read_only))


def fsync(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """fsync@openssh.com: fsync(2) of an open file."""
    f = engine.file_table.get(req.handle())
    if f is None:
        engine._send_status(request_number, Status(SFTP_NO_SUCH_FILE, "Invalid handle"))  # as OpenSSH
        return
    fsync = getattr(f, "fsync", None)
    engine._send_status(request_number, fsync() if fsync is not None else SFTP_OP_UNSUPPORTED)


def lsetstat(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """lsetstat@openssh.com: SETSTAT that does not follow a final symlink."""
    path = req.path()
    attr = req.attrs()
    if paramiko_compat.attr_flags(attr) & SFTPAttributes.FLAG_SIZE:
        # As OpenSSH: a symlink has no size to set, so the request is malformed.
        engine._send_status(request_number, Status(SFTP_BAD_MESSAGE, "lsetstat cannot set a size"))
        return
    engine._send_status(request_number, cast(LSetStater, engine.server).lsetstat(path, attr))


def limits(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """limits@openssh.com: packet, read and write lengths and open handles (OpenSSH's order)."""
    # Imported here: the limits are the engine's own, and the engine imports this module.
    from .engine import MAX_OPEN_HANDLES, MAX_PACKET_LENGTH, MAX_READ_LENGTH, MAX_WRITE_LENGTH

    values = (MAX_PACKET_LENGTH, MAX_READ_LENGTH, MAX_WRITE_LENGTH, MAX_OPEN_HANDLES)
    engine._send(CMD_EXTENDED_REPLY, U32.pack(request_number) + b"".join(U64.pack(v) for v in values))


def _home(engine: SFTPEngine) -> str | None:
    """The session's home: the backend's ``home()``, else the real path of "."."""
    home = getattr(engine.server, "home", None)
    if home is not None:
        result: str | None = home()
        return result
    resolved = engine._realpath(".")
    return resolved if isinstance(resolved, str) else None


def expand_path(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """expand-path@openssh.com: REALPATH that also expands "~" and "~user" (our one user)."""
    path = req.path()
    if path.startswith("~"):
        user, _, rest = path[1:].partition("/")
        home = _home_of(engine, request_number, user)
        if home is None:
            return
        path = home + "/" + rest if rest else home
    # Anything else (relative paths included) is a REALPATH against our home.
    engine._send_path_or_status(request_number, engine._realpath(path))


def home_directory(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """home-directory: the home of the session's user (the only user we answer for)."""
    home = _home_of(engine, request_number, decode(req.string()))
    if home is not None:
        engine._send_one_name(request_number, home)


def _home_of(engine: SFTPEngine, request_number: int, user: str) -> str | None:
    """The home of ``user`` ("" or the session's user), or None after answering why there is none."""
    if user and user != engine.username:
        engine._send_status(request_number, Status(SFTP_NO_SUCH_FILE, "No such user"))
        return None
    home = _home(engine)
    if home is None:
        engine._send_status(request_number, Status(SFTP_PERMISSION_DENIED, "Nothing is exported"))
    return home


def users_groups_by_id(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """users-groups-by-id@openssh.com: names of uids and gids (empty for unknown ids), bounded."""
    # Imported here: the reply bound is the engine's, and the engine imports this module.
    from .engine import SSHFS_MAX_REPLY

    def ids(blob: bytes) -> list[int]:
        if len(blob) % 4:
            raise BadMessage("id list is not a whole number of uint32")
        return [v for (v,) in U32.iter_unpack(blob)]

    def names(values: list[int], lookup: Callable[[int], str]) -> bytes:
        out = []
        for v in values:
            try:
                out.append(pack_string(encode(lookup(v))))
            except (KeyError, OverflowError, ValueError):
                out.append(pack_string(b""))  # as OpenSSH: unknown ids get an empty name
        return b"".join(out)

    uids = ids(req.string())
    gids = ids(req.string())
    if len(uids) + len(gids) > MAX_IDS_PER_REQUEST:
        engine._send_status(request_number, Status(
            SFTP_FAILURE, f"Too many ids in one request (at most {MAX_IDS_PER_REQUEST})"))
        return
    # Through the session's cache: a repeated id costs one NSS lookup.
    user_name = engine.long_names.user_name
    users = names(uids, lambda u: user_name("u", u, strict=True))
    groups = names(gids, lambda g: user_name("g", g, strict=True))
    body = U32.pack(request_number) + pack_string(users) + pack_string(groups)
    if len(body) + 5 > SSHFS_MAX_REPLY:
        engine._send_status(request_number, Status(SFTP_FAILURE, "Too many ids in one request"))
        return
    engine._send(CMD_EXTENDED_REPLY, body)


def copy_data(engine: SFTPEngine, request_number: int, req: Reader) -> None:
    """copy-data: copy a range between two open files (whole source to EOF if length is 0)."""
    src = req.handle()
    read_offset = req.offset("read offset")
    length = req.offset("length")
    dst = req.handle()
    write_offset = req.offset("write offset")
    fin = engine._file(request_number, src)
    if fin is None:
        return
    fout = engine._file(request_number, dst)
    if fout is None:
        return
    same_file = getattr(fin, "same_file", None)
    if src == dst or (same_file is not None and same_file(fout)):
        # As OpenSSH: copying a file onto itself could chase its own tail forever.
        engine._send_status(request_number, Status(SFTP_FAILURE, "Source and destination are the same file"))
        return
    if getattr(fout, "writable", True) is False:
        engine._send_status(request_number, Status(SFTP_PERMISSION_DENIED, "Handle not open for writing"))
        return
    copy_range = getattr(fin, "copy_range", None)
    if copy_range is not None and type(fin) is type(fout):
        # The backend copies by extents (holes stay holes): see backend.FileHandle.copy_range.
        engine._send_status(request_number, copy_range(fout, read_offset, length, write_offset))
        return
    until_eof = length == 0
    remaining = length
    while until_eof or remaining > 0:
        want = COPY_CHUNK if until_eof else min(COPY_CHUNK, remaining)
        data = fin.read(read_offset, want)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            engine._send_status(request_number, data)
            return
        if not data:
            break
        status = fout.write(write_offset, bytes(data))
        if status != SFTP_OK:
            engine._send_status(request_number, status)
            return
        read_offset += len(data)
        write_offset += len(data)
        remaining -= len(data)
    # A source that ends before the requested length is EOF (draft-ietf-secsh-filexfer-extensions-00 7).
    engine._send_status(request_number, SFTP_OK if until_eof or remaining <= 0 else SFTP_EOF)


class Extension(NamedTuple):
    """One extension as advertised in VERSION, and what serves it."""

    name: str
    version: str
    needs: str | None  # the backend method that enables it, or None: always on
    serve: Callable[[SFTPEngine, int, Reader], None]


# In the order advertised (as OpenSSH's sftp-server lists them).
EXTENSIONS: tuple[Extension, ...] = (
    Extension("posix-rename@openssh.com", "1", "posix_rename", posix_rename),
    Extension("statvfs@openssh.com", "2", "statvfs", statvfs),
    Extension("fstatvfs@openssh.com", "2", None, fstatvfs),
    Extension("hardlink@openssh.com", "1", "hardlink", hardlink),
    Extension("fsync@openssh.com", "1", None, fsync),
    Extension("lsetstat@openssh.com", "1", "lsetstat", lsetstat),
    Extension("limits@openssh.com", "1", None, limits),
    Extension("expand-path@openssh.com", "1", None, expand_path),
    Extension("copy-data", "1", None, copy_data),
    Extension("home-directory", "1", None, home_directory),
    Extension("users-groups-by-id@openssh.com", "1", None, users_groups_by_id),
)
