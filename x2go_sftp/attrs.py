"""SFTP fields on the wire: the strict request reader, ATTRS, and "ls -l" long names.

The engine's vocabulary below the request level, kept apart from dispatch so
that each encoding can be read (and compared with OpenSSH's sftp-server) on
its own:

* :class:`Reader` takes fields from one request body and refuses a short one
  (:class:`BadMessage`), where paramiko's ``Message`` pads with zeros;
* :func:`pack_attrs` encodes ATTRS as OpenSSH does (present fields only, times
  and ids wrapped to 32 bits);
* :class:`LongNames` writes the "ls -l" line of each READDIR name as
  sftp-server's ``ls_file`` does, with the per-session caches that keep a large
  listing cheap (user and group lookups go through NSS, which can be slow).

Everything here is plain functions and classes with no reference to the
engine: :mod:`x2go_sftp.engine` and :mod:`x2go_sftp.extensions` build on it.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import struct
import time

from paramiko.sftp_attr import SFTPAttributes

from . import paramiko_compat

# Offsets, lengths and sizes travel as uint64 but off_t is signed 64-bit.
# OpenSSH casts the value to off_t, and lseek()/ftruncate() then answer EINVAL;
# we refuse larger values before the backend sees them, with FAILURE and a
# message (SFTP v3 has no INVALID_PARAMETER; OpenSSH sends its EINVAL as
# BAD_MESSAGE, but the message itself parsed fine).
MAX_OFFSET = 2**63 - 1

# Files modified within half a year (OpenSSH's ls_file) show a time, older ones a year.
RECENT_SECONDS = 365 * 24 * 60 * 60 // 2

# User/group name lookups cached per session for "ls -l" long names (NSS can be slow);
# each cache is emptied when it reaches this many entries.
NAME_CACHE_SIZE = 1024

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
U32_MASK = 0xFFFFFFFF
U64_MASK = 0xFFFFFFFFFFFFFFFF
# ATTRS with size, uid/gid, permissions and times: what every stat() gives.
_ALL_ATTRS = struct.Struct(">IQIIIII")
_ALL_FLAGS = (SFTPAttributes.FLAG_SIZE | SFTPAttributes.FLAG_UIDGID | SFTPAttributes.FLAG_PERMISSIONS
              | SFTPAttributes.FLAG_AMTIME)


class BadMessage(ValueError):
    """A request whose fields do not parse (answered with SSH_FX_BAD_MESSAGE)."""


class InvalidArgument(ValueError):
    """A request that parses but carries a value we cannot act on (FAILURE, as EINVAL)."""


def decode(raw: bytes) -> str:
    """A path or name from the wire: any bytes, undecodable ones kept by ``surrogateescape``."""
    return raw.decode("utf-8", "surrogateescape")


def encode(text: str | bytes) -> bytes:
    """The wire form of a path or name (the inverse of :func:`decode`)."""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def pack_string(data: bytes) -> bytes:
    """An SFTP ``string``: uint32 length, then the bytes."""
    return U32.pack(len(data)) + data


class Reader:
    """Strict reader of SFTP fields from one packet body.

    Unlike paramiko's ``Message`` (which pads a short packet with zeros), any
    field that runs past the end raises :class:`BadMessage`.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise BadMessage("truncated request")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def u32(self) -> int:
        return int(U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(U64.unpack(self._take(8))[0])

    def offset(self, what: str = "offset") -> int:
        """A uint64 offset or length that must fit ``off_t`` (:data:`MAX_OFFSET`)."""
        value = self.u64()
        if value > MAX_OFFSET:
            raise InvalidArgument(f"Invalid argument: {what} out of range")
        return value

    def string(self) -> bytes:
        return self._take(self.u32())

    def path(self) -> str:
        return decode(self.string())

    def handle(self) -> bytes:
        return self.string()

    def attrs(self) -> SFTPAttributes:
        """ATTRS as in draft-ietf-secsh-filexfer-02 section 5."""
        attr = SFTPAttributes()
        flags = self.u32()
        paramiko_compat.set_attr_flags(attr, flags)
        if flags & SFTPAttributes.FLAG_SIZE:
            attr.st_size = self.u64()
        if flags & SFTPAttributes.FLAG_UIDGID:
            attr.st_uid = self.u32()
            attr.st_gid = self.u32()
        if flags & SFTPAttributes.FLAG_PERMISSIONS:
            attr.st_mode = self.u32()
        if flags & SFTPAttributes.FLAG_AMTIME:
            attr.st_atime = self.u32()
            attr.st_mtime = self.u32()
        if flags & SFTPAttributes.FLAG_EXTENDED:
            for _ in range(self.u32()):
                # The stubs say str values; paramiko itself keeps the raw bytes (Message.get_string).
                attr.attr[decode(self.string())] = self.string()  # type: ignore[assignment]
        return attr


def pack_attrs(attr: SFTPAttributes) -> bytes:
    """Encode ATTRS as OpenSSH does: present fields only, times and ids wrapped to 32 bits."""
    size, uid, gid, mode, atime, mtime = (attr.st_size, attr.st_uid, attr.st_gid, attr.st_mode,
                                          attr.st_atime, attr.st_mtime)
    if (size is not None and uid is not None and gid is not None and mode is not None
            and atime is not None and mtime is not None):
        return _ALL_ATTRS.pack(_ALL_FLAGS, int(size) & U64_MASK, int(uid) & U32_MASK, int(gid) & U32_MASK,
                               int(mode) & U32_MASK, int(atime) & U32_MASK, int(mtime) & U32_MASK)
    flags = 0
    out = [b""]
    if size is not None:
        flags |= SFTPAttributes.FLAG_SIZE
        out.append(U64.pack(int(size) & U64_MASK))
    if uid is not None and gid is not None:
        flags |= SFTPAttributes.FLAG_UIDGID
        out.append(U32.pack(int(uid) & U32_MASK) + U32.pack(int(gid) & U32_MASK))
    if mode is not None:
        flags |= SFTPAttributes.FLAG_PERMISSIONS
        out.append(U32.pack(int(mode) & U32_MASK))
    if atime is not None and mtime is not None:
        flags |= SFTPAttributes.FLAG_AMTIME
        # SFTP v3 times are uint32; OpenSSH truncates time_t the same way, so a
        # file dated before 1970 or after 2106 cannot break a whole listing.
        out.append(U32.pack(int(atime) & U32_MASK) + U32.pack(int(mtime) & U32_MASK))
    out[0] = U32.pack(flags)
    return b"".join(out)


def check_size(attr: SFTPAttributes) -> None:
    """InvalidArgument for a SETSTAT/FSETSTAT size ``off_t`` cannot hold (OpenSSH: EINVAL)."""
    if attr.st_size is not None and attr.st_size > MAX_OFFSET:
        raise InvalidArgument("Invalid argument: size out of range")


def mode_string(mode: int) -> str:
    """``strmode(3)`` as sftp-server's ``ls_file`` uses it: ``stat.filemode`` and a trailing space.

    The two agree letter for letter (the type, "?" for an unknown one, and the
    set-id and sticky letters); strmode adds an eleventh column, always a space
    (reserved for an ACL marker), which the long name keeps.  Like the
    ``stat`` functions it raises OverflowError for a mode outside ``mode_t``.
    """
    return stat.filemode(mode) + " "


def date_string(mtime: int | None, now: float) -> str:
    """The date column of ``ls -l``: a time within half a year (:data:`RECENT_SECONDS`), else a year."""
    if mtime is None:
        return ""
    try:
        when = time.localtime(mtime)
    except (OverflowError, OSError, ValueError):
        return ""
    if now - RECENT_SECONDS < mtime <= now:
        return time.strftime("%b %e %H:%M", when)
    return time.strftime("%b %e  %Y", when)


class LongNames:
    """One session's "ls -l" long names and user/group names, through bounded caches.

    The columns that repeat across a listing (mode letters, link count and
    owner as one prefix, dates to the second) are remembered encoded, each
    cache emptied at :data:`NAME_CACHE_SIZE` entries so a hostile listing
    cannot grow it.  Used by one session's thread only.
    """

    def __init__(self) -> None:
        self._names: dict[tuple[str, int], str] = {}
        self._prefixes: dict[tuple[int, int, int, int], bytes] = {}
        self._dates: dict[tuple[int, bool], bytes] = {}

    def user_name(self, kind: str, ident: int, strict: bool = False) -> str:
        """User (``kind`` "u") or group name of ``ident``, through the session's cache.

        An unknown id is its number, or with ``strict`` a KeyError (cached too).
        """
        key = (kind, ident)
        name = self._names.get(key)
        if name is None:
            try:
                name = pwd.getpwuid(ident).pw_name if kind == "u" else grp.getgrgid(ident).gr_name
            except (KeyError, OverflowError, ValueError):
                name = ""
            if len(self._names) >= NAME_CACHE_SIZE:
                self._names.clear()
            self._names[key] = name
        if not name:
            if strict:
                raise KeyError(ident)
            return str(ident)
        return name

    def _prefix(self, mode: int, nlink: int, uid: int, gid: int) -> bytes:
        """The mode, link and "user group" columns of a long name, encoded and remembered."""
        key = (mode, nlink, uid, gid)
        prefix = self._prefixes.get(key)
        if prefix is None:
            if len(self._prefixes) >= NAME_CACHE_SIZE:
                self._prefixes.clear()
            user, group = self.user_name("u", uid), self.user_name("g", gid)
            prefix = self._prefixes[key] = encode(
                f"{mode_string(mode)} {nlink:>3} {user:<{max(len(user), 8)}} {group:<{max(len(group), 8)}}")
        return prefix

    def _date(self, mtime: float | None, now: float) -> bytes:
        """:func:`date_string` of the whole second (a ``time_t``, as sftp-server has), encoded and remembered."""
        if mtime is None:
            return b""
        second = int(mtime)
        key = (second, now - RECENT_SECONDS < second <= now)  # the same test date_string makes
        text = self._dates.get(key)
        if text is None:
            if len(self._dates) >= NAME_CACHE_SIZE:
                self._dates.clear()
            text = self._dates[key] = encode(date_string(second, now))
        return text

    def longname(self, attr: SFTPAttributes, now: float | None = None) -> bytes:
        """The "ls -l" line OpenSSH's sftp-server sends with each READDIR name."""
        prefix = self._prefix(attr.st_mode or 0, getattr(attr, "st_nlink", 1),
                              attr.st_uid if attr.st_uid is not None else 0,
                              attr.st_gid if attr.st_gid is not None else 0)
        date = self._date(attr.st_mtime, time.time() if now is None else now)
        return b"%s %8d %s %s" % (prefix, attr.st_size or 0, date, encode(attr.filename))

    def entry(self, name: str, st: os.stat_result, now: float) -> bytes:
        """One READDIR entry (name, long name, ATTRS) encoded straight from an ``lstat`` result.

        The same bytes as ``pack_string(name) + pack_string(longname) +
        pack_attrs`` of ``SFTPAttributes.from_stat(st)`` (a test holds the two
        equal), without building that object: a listing of thousands of names
        spends most of its time here.
        """
        raw = name.encode("utf-8", "surrogateescape")
        mode, uid, gid, size = st.st_mode, st.st_uid, st.st_gid, st.st_size
        mtime = int(st.st_mtime)
        long = b"%s %8d %s %s" % (self._prefix(mode, st.st_nlink, uid, gid), size, self._date(mtime, now), raw)
        return b"%s%s%s%s%s" % (
            U32.pack(len(raw)), raw, U32.pack(len(long)), long,
            _ALL_ATTRS.pack(_ALL_FLAGS, size & U64_MASK, uid & U32_MASK, gid & U32_MASK, mode & U32_MASK,
                            int(st.st_atime) & U32_MASK, mtime & U32_MASK))
