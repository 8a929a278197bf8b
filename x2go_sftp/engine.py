"""The SFTP protocol engine: SFTP v3 with OpenSSH's extensions, limits and fixes.

A subclass of paramiko's ``SFTPServer`` (so it plugs in as the ``sftp``
subsystem handler and still accepts any ``SFTPServerInterface``), with its own
framing, parser and request loop.  Differences from paramiko's stock engine:

* the OpenSSH extensions sshfs and sftp rely on are advertised and served
  with OpenSSH's names, versions and wire formats (posix-rename, statvfs,
  fstatvfs, hardlink, fsync, lsetstat, limits, expand-path, copy-data,
  home-directory, users-groups-by-id);
* requests are parsed strictly: a short field is a BAD_MESSAGE reply, never
  paramiko's silent zero padding;
* packets over :data:`MAX_PACKET_LENGTH` close the session; READ lengths are
  clamped; open handles are capped per session;
* READDIR streams from the directory in batches of at most
  :data:`READDIR_MAX_NAMES` names, within a byte budget sshfs accepts;
* paths are bytes on the wire and may be any bytes (undecodable ones pass
  through with ``surrogateescape``), as OpenSSH's sftp-server treats them;
* every status carries a useful message (the errno text);
* attributes and "ls -l" long names are encoded as OpenSSH does (times wrap
  to 32 bits instead of crashing a listing).

Extensions are switched on by capability: the engine looks for the optional
backend methods (``posix_rename``, ``hardlink``, ``statvfs``, ...) and
advertises only what the backend provides.  The wire formats are described
in ``docs/protocol.md``.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat as stat_mod
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_INIT,
    CMD_LSTAT,
    CMD_MKDIR,
    CMD_NAME,
    CMD_NAMES,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_READLINK,
    CMD_REALPATH,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_RMDIR,
    CMD_SETSTAT,
    CMD_STAT,
    CMD_STATUS,
    CMD_SYMLINK,
    CMD_VERSION,
    CMD_WRITE,
    SFTP_BAD_MESSAGE,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_FLAG_APPEND,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    SFTPError,
)
from paramiko.sftp_attr import SFTPAttributes
from paramiko.sftp_handle import SFTPHandle

from . import log, paramiko_compat
from .status import Status, from_oserror

SFTP_VERSION = 3

# OpenSSH sftp-server's SFTP_MAX_MSG_LENGTH (256 KiB).  A larger packet is a
# broken or hostile client; buffering it would let one peer pin memory.
MAX_PACKET_LENGTH = 256 * 1024

# OpenSSH: SFTP_MAX_MSG_LENGTH - 1024, so a DATA reply fits in one packet.
MAX_READ_LENGTH = MAX_PACKET_LENGTH - 1024
MAX_WRITE_LENGTH = MAX_PACKET_LENGTH - 1024

# Per-session cap on open handles.  OpenSSH runs one process per session and
# derives its cap from RLIMIT_NOFILE; all our sessions share one process (and
# its usual 1024 descriptors), so each gets a fixed share.  Reported to clients
# through limits@openssh.com; the next OPEN/OPENDIR past it fails cleanly.
# What all sessions hold together is bounded by budget.handle_fds (the
# backend charges each handle the descriptors it really holds).
MAX_OPEN_HANDLES = 256

# sshfs (MAX_REPLY_LEN in sshfs.c) drops the whole connection when a reply
# packet is longer than 128 KiB.  DATA replies are as long as the client asked
# for; every other reply we build is kept under this.
SSHFS_MAX_REPLY = 128 * 1024

# READDIR batch: OpenSSH sends at most 100 names a reply.  The byte budget keeps
# every reply far below SSHFS_MAX_REPLY even with 255-byte names, long user
# names and "ls -l" lines (one entry is under 1 KiB).
READDIR_MAX_NAMES = 100
READDIR_MAX_BYTES = 64 * 1024

# Exit statuses sent on the session channel when the subsystem ends, as sshd
# reports OpenSSH's sftp-server exiting: 0 at the client's EOF, 11 for an
# oversized packet (sftp_server_cleanup_exit(11)), 255 for any other fatal
# protocol error (fatal()).  scp and ssh treat a missing exit status as failure.
EXIT_OK = 0
EXIT_PACKET_TOO_LARGE = 11
EXIT_PROTOCOL_ERROR = 255

# copy-data moves data in chunks of this size between two open handles (as OpenSSH).
COPY_CHUNK = 64 * 1024

# Offsets, lengths and sizes travel as uint64 but off_t is signed 64-bit.
# OpenSSH casts the value to off_t, and lseek()/ftruncate() then answer EINVAL;
# we refuse larger values before the backend sees them, with FAILURE and a
# message (SFTP v3 has no INVALID_PARAMETER; OpenSSH sends its EINVAL as
# BAD_MESSAGE, but the message itself parsed fine).
MAX_OFFSET = 2**63 - 1

# users-groups-by-id@openssh.com: ids (uids + gids) per request.  OpenSSH
# bounds them only by the packet size (65,536 ids, each an NSS lookup), and
# pays in the session's own process; here every session shares one process,
# and 65k unknown ids cost seconds of CPU.  OpenSSH's sftp client asks for
# the distinct owners of one listing, a handful; 1024 distinct lookups take
# about 0.1 s.  Repeated ids are looked up once (the session's name cache).
MAX_IDS_PER_REQUEST = 1024

# Log lines a client can provoke, one limiter per kind for the whole process
# (so many sessions do not multiply the budget): bad input (INFO) and backend
# failures (ERROR).  Limits: log.LOG_BURST lines per log.LOG_INTERVAL.
_BAD_INPUT_LOG = log.RateLimiter()
_BACKEND_ERROR_LOG = log.RateLimiter()
_HANDLE_CAP_LOG = log.RateLimiter()

# statvfs@openssh.com flag bits (OpenSSH PROTOCOL, section 4.4).
SSH2_FXE_STATVFS_ST_RDONLY = 0x1
SSH2_FXE_STATVFS_ST_NOSUID = 0x2

# Files modified within half a year (OpenSSH's ls_file) show a time, older ones a year.
_RECENT_SECONDS = 365 * 24 * 60 * 60 // 2

# User/group name lookups cached per session for "ls -l" long names (NSS can be slow).
_NAME_CACHE_SIZE = 1024

# (name, version, backend capability that enables it, or None: always on)
EXTENSIONS: tuple[tuple[str, str, str | None], ...] = (
    ("posix-rename@openssh.com", "1", "posix_rename"),
    ("statvfs@openssh.com", "2", "statvfs"),
    ("fstatvfs@openssh.com", "2", None),
    ("hardlink@openssh.com", "1", "hardlink"),
    ("fsync@openssh.com", "1", None),
    ("lsetstat@openssh.com", "1", "lsetstat"),
    ("limits@openssh.com", "1", None),
    ("expand-path@openssh.com", "1", None),
    ("copy-data", "1", None),
    ("home-directory", "1", None),
    ("users-groups-by-id@openssh.com", "1", None),
)

# Input is taken from the channel in pieces up to this size and parsed from a
# local buffer: one channel read serves many small requests (and a WRITE's
# header and data), instead of two reads per request.
RECV_CHUNK = 256 * 1024

# paramiko's Channel sends at most out_max_packet_size - 64 bytes per packet.
_CHANNEL_PACKET_SLACK = 64

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U32_MASK = 0xFFFFFFFF
_U64_MASK = 0xFFFFFFFFFFFFFFFF
# ATTRS with size, uid/gid, permissions and times: what every stat() gives.
_ALL_ATTRS = struct.Struct(">IQIIIII")
_ALL_FLAGS = (SFTPAttributes.FLAG_SIZE | SFTPAttributes.FLAG_UIDGID | SFTPAttributes.FLAG_PERMISSIONS
              | SFTPAttributes.FLAG_AMTIME)


class PacketTooLarge(SFTPError):
    """The peer sent a packet over :data:`MAX_PACKET_LENGTH`."""


class BadMessage(ValueError):
    """A request whose fields do not parse (answered with SSH_FX_BAD_MESSAGE)."""


class InvalidArgument(ValueError):
    """A request that parses but carries a value we cannot act on (FAILURE, as EINVAL)."""


class ChannelGone(Exception):
    """Sending a reply failed: the client or the tunnel closed the channel."""


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _enc(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def _string(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


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
        return int(_U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def offset(self, what: str = "offset") -> int:
        """A uint64 offset or length that must fit ``off_t`` (:data:`MAX_OFFSET`)."""
        value = self.u64()
        if value > MAX_OFFSET:
            raise InvalidArgument(f"Invalid argument: {what} out of range")
        return value

    def string(self) -> bytes:
        return self._take(self.u32())

    def path(self) -> str:
        return _dec(self.string())

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
                attr.attr[_dec(self.string())] = self.string()
        return attr


def pack_attrs(attr: SFTPAttributes) -> bytes:
    """Encode ATTRS as OpenSSH does: present fields only, times and ids wrapped to 32 bits."""
    size, uid, gid, mode, atime, mtime = (attr.st_size, attr.st_uid, attr.st_gid, attr.st_mode,
                                          attr.st_atime, attr.st_mtime)
    if (size is not None and uid is not None and gid is not None and mode is not None
            and atime is not None and mtime is not None):
        return _ALL_ATTRS.pack(_ALL_FLAGS, int(size) & _U64_MASK, int(uid) & _U32_MASK, int(gid) & _U32_MASK,
                               int(mode) & _U32_MASK, int(atime) & _U32_MASK, int(mtime) & _U32_MASK)
    flags = 0
    out = [b""]
    if attr.st_size is not None:
        flags |= SFTPAttributes.FLAG_SIZE
        out.append(_U64.pack(int(attr.st_size) & _U64_MASK))
    if attr.st_uid is not None and attr.st_gid is not None:
        flags |= SFTPAttributes.FLAG_UIDGID
        out.append(_U32.pack(int(attr.st_uid) & _U32_MASK) + _U32.pack(int(attr.st_gid) & _U32_MASK))
    if attr.st_mode is not None:
        flags |= SFTPAttributes.FLAG_PERMISSIONS
        out.append(_U32.pack(int(attr.st_mode) & _U32_MASK))
    if attr.st_atime is not None and attr.st_mtime is not None:
        flags |= SFTPAttributes.FLAG_AMTIME
        # SFTP v3 times are uint32; OpenSSH truncates time_t the same way, so a
        # file dated before 1970 or after 2106 cannot break a whole listing.
        out.append(_U32.pack(int(attr.st_atime) & _U32_MASK) + _U32.pack(int(attr.st_mtime) & _U32_MASK))
    out[0] = _U32.pack(flags)
    return b"".join(out)


def _check_size(attr: SFTPAttributes) -> None:
    """InvalidArgument for a SETSTAT/FSETSTAT size ``off_t`` cannot hold (OpenSSH: EINVAL)."""
    if attr.st_size is not None and attr.st_size > MAX_OFFSET:
        raise InvalidArgument("Invalid argument: size out of range")


def _mode_string(mode: int) -> str:
    """``strmode(3)``: file type, nine permission letters and a trailing space."""
    kinds = {
        stat_mod.S_IFDIR: "d", stat_mod.S_IFCHR: "c", stat_mod.S_IFBLK: "b", stat_mod.S_IFREG: "-",
        stat_mod.S_IFLNK: "l", stat_mod.S_IFSOCK: "s", stat_mod.S_IFIFO: "p",
    }
    out = [kinds.get(stat_mod.S_IFMT(mode), "?")]
    for shift, special, on, off in ((6, stat_mod.S_ISUID, "s", "S"), (3, stat_mod.S_ISGID, "s", "S"),
                                    (0, stat_mod.S_ISVTX, "t", "T")):
        bits = (mode >> shift) & 7
        out.append("r" if bits & 4 else "-")
        out.append("w" if bits & 2 else "-")
        if mode & special:
            out.append(on if bits & 1 else off)
        else:
            out.append("x" if bits & 1 else "-")
    return "".join(out) + " "


def _date_string(mtime: int | None, now: float) -> str:
    if mtime is None:
        return ""
    try:
        when = time.localtime(mtime)
    except (OverflowError, OSError, ValueError):
        return ""
    if now - _RECENT_SECONDS < mtime <= now:
        return time.strftime("%b %e %H:%M", when)
    return time.strftime("%b %e  %Y", when)


class SFTPEngine(paramiko.SFTPServer):
    """SFTP v3 subsystem handler; pass it to ``Transport.set_subsystem_handler``.

    Args (from paramiko): the channel, the subsystem name, the SSH
    ``ServerInterface`` (its ``username``, if any, is the one user
    ``home-directory`` answers for), the ``SFTPServerInterface`` class and the
    arguments it is built with (``logger`` is used here too).
    """

    file_table: dict[bytes, SFTPHandle]
    folder_table: dict[bytes, SFTPHandle]

    # Hold replies while more requests are already buffered (see _send); off
    # only to measure what it buys.
    hold_replies = True

    def __init__(self, channel: paramiko.Channel, name: str, server: paramiko.ServerInterface,
                 sftp_si: type = paramiko.SFTPServerInterface, *args: Any,
                 session_observer: Any = None, **kwargs: Any):
        super().__init__(channel, name, server, sftp_si, *args, **kwargs)
        # Live figures for a watcher (x2go_sftp.share.MountCounters): told of this
        # session at its start and end, it reads the attributes below meanwhile.
        # Each is written by this session's thread only.
        self.session_observer = session_observer
        self.bytes_in = 0  # SFTP packets received, length fields included
        self.bytes_out = 0  # SFTP packets sent
        self.error_statuses: Counter[int] = Counter()  # STATUS replies other than OK and EOF, by code
        self.xlog = log.tagged(kwargs.get("logger"), "sftp")
        self.username: str | None = getattr(server, "username", None)
        # Unparsed input (from _in_pos on) and replies not yet sent, see _send().
        self._in = b""
        self._in_pos = 0
        self._out: list[bytes] = []
        self._out_len = 0
        # Where input comes from and replies go (a fastpath.SessionIO), if not the channel itself.
        self._io: Any = None
        self.requests: Counter[str] = Counter()
        self.exit_status = EXIT_OK
        self._names: dict[tuple[str, int], str] = {}
        # READDIR long names: mode and date strings repeat across a listing.
        self._modes: dict[int, str] = {}
        self._owners: dict[tuple[int, int], str] = {}
        self._dates: dict[tuple[int, bool], str] = {}
        self._handlers: dict[int, Callable[[int, Reader], None]] = {
            CMD_OPEN: self._do_open,
            CMD_CLOSE: self._do_close,
            CMD_READ: self._do_read,
            CMD_WRITE: self._do_write,
            CMD_REMOVE: self._do_path_status("remove"),
            CMD_RENAME: self._do_two_paths("rename"),
            CMD_MKDIR: self._do_path_attr("mkdir"),
            CMD_RMDIR: self._do_path_status("rmdir"),
            CMD_OPENDIR: self._do_opendir,
            CMD_READDIR: self._do_readdir,
            CMD_STAT: self._do_path_attrs("stat"),
            CMD_LSTAT: self._do_path_attrs("lstat"),
            CMD_FSTAT: self._do_fstat,
            CMD_SETSTAT: self._do_path_attr("chattr"),
            CMD_FSETSTAT: self._do_fsetstat,
            CMD_READLINK: self._do_readlink,
            CMD_SYMLINK: self._do_symlink,
            CMD_REALPATH: self._do_realpath,
            CMD_EXTENDED: self._do_extended,
        }
        extended: dict[str, Callable[[int, Reader], None]] = {
            "posix-rename@openssh.com": self._do_two_paths("posix_rename"),
            "statvfs@openssh.com": self._ext_statvfs,
            "fstatvfs@openssh.com": self._ext_fstatvfs,
            "hardlink@openssh.com": self._do_two_paths("hardlink"),
            "fsync@openssh.com": self._ext_fsync,
            "lsetstat@openssh.com": self._ext_lsetstat,
            "limits@openssh.com": self._ext_limits,
            "expand-path@openssh.com": self._ext_expand_path,
            "copy-data": self._ext_copy_data,
            "home-directory": self._ext_home_directory,
            "users-groups-by-id@openssh.com": self._ext_users_groups,
        }
        self.extensions = [
            (ext, version)
            for ext, version, needs in EXTENSIONS
            if needs is None or self._backend_has(needs)
        ]
        enabled = {ext for ext, _ in self.extensions}
        self._extended = {k: v for k, v in extended.items() if k in enabled}

    def _backend_has(self, method: str) -> bool:
        """True if the backend really implements ``method``.

        paramiko's own ``SFTPServerInterface`` has a ``posix_rename`` that only
        answers OP_UNSUPPORTED; advertising the extension on that would be a lie.
        """
        impl = getattr(type(self.server), method, None)
        return callable(impl) and impl is not getattr(paramiko.SFTPServerInterface, method, None)

    # -- framing -------------------------------------------------------------
    def _read_packet(self) -> tuple[int, bytes]:
        (size,) = _U32.unpack(self._read_all(4))
        if size > MAX_PACKET_LENGTH:
            raise PacketTooLarge(f"packet of {size} bytes exceeds {MAX_PACKET_LENGTH}")
        if size == 0:
            raise BadMessage("empty packet")
        data = self._read_all(size)
        self.bytes_in += 4 + size
        return data[0], data[1:]

    def _read_all(self, n: int) -> bytes:
        """The next ``n`` input bytes; sends the held replies before it would wait for input."""
        while len(self._in) - self._in_pos < n:
            if self._out and not self._input_ready():
                self._flush()
            chunk = (self._io or self.sock).recv(RECV_CHUNK)
            if chunk is None:
                continue  # a packet without input for us: look again at what is held
            if not chunk:
                raise EOFError()
            self._in = self._in[self._in_pos:] + chunk if self._in_pos < len(self._in) else chunk
            self._in_pos = 0
        start = self._in_pos
        self._in_pos = start + n
        return self._in[start:start + n]

    def _input_ready(self) -> bool:
        """True if the channel has input now (a socket without ``recv_ready`` never claims so)."""
        if self._io is not None:
            return bool(self._io.input_ready())
        ready = getattr(self.sock, "recv_ready", None)
        return bool(ready()) if ready is not None else False

    def _send(self, t: int, body: bytes) -> None:
        """Queue one reply; whole channel packets go out at once, the rest before we wait for input.

        While further requests are already buffered, their replies join this
        one: a run of WRITE replies leaves as one SSH packet instead of one
        each, and READ replies fill whole packets instead of a full one plus a
        runt each.  Nothing waits longer than the processing of requests that
        were already here (``_read_all`` flushes before it would block).
        """
        reply = _U32.pack(len(body) + 1) + bytes((t,)) + body
        self._out.append(reply)
        self._out_len += len(reply)
        if not self.hold_replies:
            self._flush()
        elif self._out_len >= self._packet_payload():
            self._flush(whole_packets=True)

    def _write_all(self, out: bytes) -> None:
        if self._io is not None:
            self._io.sendall(out)
        else:
            paramiko_compat.sftp_write_all(self, out)

    def _packet_payload(self) -> int:
        return max(getattr(self.sock, "out_max_packet_size", 32768) - _CHANNEL_PACKET_SLACK, 1024)

    def _flush(self, whole_packets: bool = False) -> None:
        """Send the queued replies (only whole channel packets' worth if ``whole_packets``)."""
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        keep = b""
        if whole_packets:
            cut = len(data) - len(data) % self._packet_payload()
            data, keep = data[:cut], data[cut:]
        self._out = [keep] if keep else []
        self._out_len = len(keep)
        self.bytes_out += len(data)
        try:
            self._write_all(data)
        except (OSError, EOFError) as e:
            raise ChannelGone(str(e) or type(e).__name__) from e

    def start_subsystem(self, name: str, transport: paramiko.Transport, channel: paramiko.Channel) -> None:
        self.sock = channel
        self._tell_observer("session_started")
        try:
            t, _ = self._read_packet()
            if t != CMD_INIT:
                raise BadMessage(f"expected INIT, got packet type {t}")
            body = [_U32.pack(SFTP_VERSION)]
            for ext_name, version in self.extensions:
                body.append(_string(ext_name.encode()) + _string(version.encode()))
            self._send(CMD_VERSION, b"".join(body))
        except (EOFError, ChannelGone):
            return
        except (SFTPError, BadMessage, OSError) as e:
            self._fatal(channel, f"during INIT: {e}", EXIT_PROTOCOL_ERROR)
            return
        self.server.session_started()
        self._serve(channel)

    def _serve(self, channel: paramiko.Channel) -> None:
        while True:
            try:
                t, data = self._read_packet()
            except EOFError:
                return
            except PacketTooLarge as e:
                self._fatal(channel, str(e), EXIT_PACKET_TOO_LARGE)
                return
            except BadMessage as e:
                self._fatal(channel, str(e), EXIT_PROTOCOL_ERROR)
                return
            except Exception as e:  # socket errors, a closed channel
                self.xlog(f"sFTP session on {channel} ended: {e}", loglevel=log.loglevel_DEBUG)
                return
            if len(data) < 4:
                self._fatal(channel, "packet without request id", EXIT_PROTOCOL_ERROR)
                return
            request_number = _U32.unpack_from(data)[0]
            # Lines a client can provoke at will are rate-limited process-wide.
            try:
                self._process(t, request_number, Reader(data, 4))
            except BadMessage as e:
                log.limited(self.xlog, _BAD_INPUT_LOG, f"sFTP {CMD_NAMES.get(t, t)} #{request_number}: {e}",
                            log.loglevel_INFO)
                if not self._try_status(request_number, Status(SFTP_BAD_MESSAGE, str(e))):
                    return
            except InvalidArgument as e:
                log.limited(self.xlog, _BAD_INPUT_LOG, f"sFTP {CMD_NAMES.get(t, t)} #{request_number}: {e}",
                            log.loglevel_INFO)
                if not self._try_status(request_number, Status(SFTP_FAILURE, str(e))):
                    return
            except ChannelGone as e:
                self.xlog(f"sFTP session on {channel} ended while replying: {e}", loglevel=log.loglevel_DEBUG)
                return
            except OSError as e:
                # A backend call that raised instead of returning a status.
                log.limited(self.xlog, _BAD_INPUT_LOG, f"sFTP request {CMD_NAMES.get(t, t)} failed: {e!r}",
                            log.loglevel_INFO)
                if not self._try_status(request_number, from_oserror(e)):
                    return
            except Exception as e:
                # A backend bug: answer, log it loudly (but not once per packet), keep serving.
                log.limited(self.xlog, _BACKEND_ERROR_LOG, f"sFTP request {CMD_NAMES.get(t, t)} failed: {e!r}",
                            log.loglevel_ERROR)
                if not self._try_status(request_number, Status(SFTP_FAILURE, "Internal error")):
                    return

    def _fatal(self, channel: paramiko.Channel, why: str, exit_status: int) -> None:
        """Log why the session ends; finish_subsystem() reports ``exit_status`` and closes."""
        self.xlog(f"closing sFTP session on {channel}: {why}", loglevel=log.loglevel_WARN)
        self.exit_status = exit_status

    def _try_status(self, request_number: int, status: Status) -> bool:
        try:
            self._send_status(request_number, status)
            return True
        except Exception:
            return False

    def _process(self, t: int, request_number: int, req: Reader) -> None:
        handler = self._handlers.get(t)
        if handler is None:
            # OpenSSH logs and drops an unknown request; an answer keeps the client from waiting forever.
            self.requests[f"unknown-{t}"] += 1
            self._send_status(request_number, Status(SFTP_OP_UNSUPPORTED, f"Unknown request type {t}"))
            return
        if t != CMD_EXTENDED:
            self.requests[CMD_NAMES.get(t, str(t))] += 1
            if self.xlog.enabled(log.loglevel_DEBUG_SFTPXFER):
                self.xlog(f"request {CMD_NAMES.get(t, t)} #{request_number}", loglevel=log.loglevel_DEBUG_SFTPXFER)
        handler(request_number, req)

    def finish_subsystem(self) -> None:
        """Close every handle this session still holds (each one, whatever the others do)."""
        if self._out:
            try:
                self._flush()  # replies to the requests before the one that ended the session
            except Exception:
                pass  # the channel is already gone
        try:
            self.server.session_ended()
        except Exception as e:
            self.xlog(f"session_ended failed: {e!r}", loglevel=log.loglevel_ERROR)
        tables: tuple[dict[bytes, SFTPHandle], ...] = (self.file_table, self.folder_table)
        self.file_table, self.folder_table = {}, {}
        for table in tables:
            for h in table.values():
                try:
                    h.close()
                except Exception as e:
                    self.xlog(f"closing a handle at session end failed: {e!r}", loglevel=log.loglevel_ERROR)
        if self.requests and self.xlog.enabled(log.loglevel_DEBUG):
            summary = " ".join(f"{k}={v}" for k, v in sorted(self.requests.items()))
            self.xlog(f"sFTP session ended; requests: {summary}", loglevel=log.loglevel_DEBUG)
        try:
            self.sock.send_exit_status(self.exit_status)
        except Exception:
            pass  # the channel is already gone
        try:
            self.sock.close()
        except Exception:
            pass
        self._tell_observer("session_ended")

    def _tell_observer(self, event: str) -> None:
        """Call ``session_observer.<event>(self)``; a failing observer never ends the session."""
        if self.session_observer is None:
            return
        try:
            getattr(self.session_observer, event)(self)
        except Exception as e:
            self.xlog(f"session observer's {event} failed: {e!r}", loglevel=log.loglevel_ERROR)

    # -- replies -------------------------------------------------------------
    def _send_status(self, request_number: int, code: int, desc: str | None = None) -> None:
        if desc is None:
            desc = getattr(code, "message", None)
        if desc is None:
            desc = Status(code).message
        if code != SFTP_OK and code != SFTP_EOF:
            self.error_statuses[int(code)] += 1
        self._send(CMD_STATUS, _U32.pack(request_number) + _U32.pack(int(code))
                   + _string(_enc(desc)) + _string(b""))

    def _send_names(self, request_number: int, entries: list[bytes]) -> None:
        """NAME reply from already encoded ``name, longname, attrs`` entries."""
        self._send(CMD_NAME, _U32.pack(request_number) + _U32.pack(len(entries)) + b"".join(entries))

    def _send_one_name(self, request_number: int, name: str) -> None:
        # As OpenSSH: the long name repeats the name; no attributes.
        raw = _enc(name)
        self._send_names(request_number, [_string(raw) + _string(raw) + _U32.pack(0)])

    def _send_attrs_or_status(self, request_number: int, resp: Any) -> None:
        if isinstance(resp, SFTPAttributes):
            self._send(CMD_ATTRS, _U32.pack(request_number) + pack_attrs(resp))
        else:
            self._send_status(request_number, resp)

    def _open_handles(self) -> int:
        return len(self.file_table) + len(self.folder_table)

    def _at_handle_cap(self, request_number: int) -> bool:
        if self._open_handles() < MAX_OPEN_HANDLES:
            return False
        log.limited(self.xlog, _HANDLE_CAP_LOG, f"refusing a handle: {MAX_OPEN_HANDLES} already open in this session",
                    log.loglevel_NOTICE)
        self._send_status(request_number, Status(SFTP_FAILURE, "Too many open handles"))
        return True

    def _register(self, request_number: int, handle: Any, folder: bool) -> None:
        if not isinstance(handle, SFTPHandle):
            self._send_status(request_number, handle)
            return
        name = b"hx%d" % self.next_handle
        self.next_handle += 1
        paramiko_compat.set_handle_name(handle, name)
        (self.folder_table if folder else self.file_table)[name] = handle
        self._send(CMD_HANDLE, _U32.pack(request_number) + _string(name))

    def _file(self, request_number: int, handle: bytes) -> SFTPHandle | None:
        f = self.file_table.get(handle)
        if f is None:
            self._send_status(request_number, Status(SFTP_FAILURE, "Invalid handle"))
        return f

    # -- requests ------------------------------------------------------------
    @staticmethod
    def _open_flags(pflags: int) -> int:
        if pflags & SFTP_FLAG_READ and pflags & SFTP_FLAG_WRITE:
            flags = os.O_RDWR
        elif pflags & SFTP_FLAG_WRITE:
            flags = os.O_WRONLY
        else:
            flags = os.O_RDONLY
        if pflags & SFTP_FLAG_APPEND:
            flags |= os.O_APPEND
        if pflags & SFTP_FLAG_CREATE:
            flags |= os.O_CREAT
        if pflags & SFTP_FLAG_TRUNC:
            flags |= os.O_TRUNC
        if pflags & SFTP_FLAG_EXCL:
            flags |= os.O_EXCL
        return flags

    def _do_open(self, request_number: int, req: Reader) -> None:
        path = req.path()
        flags = self._open_flags(req.u32())
        attr = req.attrs()
        if self._at_handle_cap(request_number):
            return
        self._register(request_number, self.server.open(path, flags, attr), folder=False)

    def _do_close(self, request_number: int, req: Reader) -> None:
        handle = req.handle()
        h = self.folder_table.pop(handle, None) or self.file_table.pop(handle, None)
        if h is None:
            # As OpenSSH (its close() of no handle fails with ENOENT).
            self._send_status(request_number, Status(SFTP_NO_SUCH_FILE, "Invalid handle"))
            return
        result = h.close()
        # close() may report a deferred write error (NFS, quota): pass it on.
        self._send_status(request_number, result if isinstance(result, int) else SFTP_OK)

    def _do_read(self, request_number: int, req: Reader) -> None:
        handle = req.handle()
        offset = req.offset()
        length = min(req.u32(), MAX_READ_LENGTH)
        f = self._file(request_number, handle)
        if f is None:
            return
        data = f.read(offset, length) if length else b""
        if isinstance(data, (bytes, bytearray, memoryview)):
            if not data:
                self._send_status(request_number, SFTP_EOF)
                return
            self._send(CMD_DATA, _U32.pack(request_number) + _string(bytes(data)))
        else:
            self._send_status(request_number, data)

    def _do_write(self, request_number: int, req: Reader) -> None:
        handle = req.handle()
        offset = req.offset()
        data = req.string()
        f = self._file(request_number, handle)
        if f is None:
            return
        self._send_status(request_number, f.write(offset, data))

    def _do_path_status(self, method: str) -> Callable[[int, Reader], None]:
        def handler(request_number: int, req: Reader) -> None:
            path = req.path()
            self._send_status(request_number, getattr(self.server, method)(path))
        return handler

    def _do_two_paths(self, method: str) -> Callable[[int, Reader], None]:
        def handler(request_number: int, req: Reader) -> None:
            old = req.path()
            new = req.path()
            self._send_status(request_number, getattr(self.server, method)(old, new))
        return handler

    def _do_path_attr(self, method: str) -> Callable[[int, Reader], None]:
        def handler(request_number: int, req: Reader) -> None:
            path = req.path()
            attr = req.attrs()
            if method == "chattr":
                _check_size(attr)
            self._send_status(request_number, getattr(self.server, method)(path, attr))
        return handler

    def _do_path_attrs(self, method: str) -> Callable[[int, Reader], None]:
        def handler(request_number: int, req: Reader) -> None:
            path = req.path()
            self._send_attrs_or_status(request_number, getattr(self.server, method)(path))
        return handler

    def _do_opendir(self, request_number: int, req: Reader) -> None:
        path = req.path()
        if self._at_handle_cap(request_number):
            return
        opendir = getattr(self.server, "opendir", None)
        if opendir is not None:
            self._register(request_number, opendir(path), folder=True)
            return
        # A plain SFTPServerInterface: it can only give us the whole list.
        listing = self.server.list_folder(path)
        if isinstance(listing, list):
            folder = SFTPHandle()
            paramiko_compat.set_folder_listing(folder, listing)
            self._register(request_number, folder, folder=True)
        else:
            self._send_status(request_number, listing)

    def _user_name(self, kind: str, ident: int, strict: bool = False) -> str:
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
            if len(self._names) >= _NAME_CACHE_SIZE:
                self._names.clear()
            self._names[key] = name
        if not name:
            if strict:
                raise KeyError(ident)
            return str(ident)
        return name

    def _date(self, mtime: float | None, now: float) -> str:
        """:func:`_date_string` of the whole second (a ``time_t``, as sftp-server has), remembered."""
        if mtime is None:
            return ""
        second = int(mtime)
        key = (second, now - _RECENT_SECONDS < second <= now)  # the same test _date_string makes
        text = self._dates.get(key)
        if text is None:
            if len(self._dates) >= _NAME_CACHE_SIZE:
                self._dates.clear()
            text = self._dates[key] = _date_string(second, now)
        return text

    def longname(self, attr: SFTPAttributes, now: float | None = None) -> bytes:
        """The "ls -l" line OpenSSH's sftp-server sends with each READDIR name."""
        mode = attr.st_mode or 0
        uid = attr.st_uid if attr.st_uid is not None else 0
        gid = attr.st_gid if attr.st_gid is not None else 0
        owner = self._owners.get((uid, gid))
        if owner is None:
            user, group = self._user_name("u", uid), self._user_name("g", gid)
            if len(self._owners) >= _NAME_CACHE_SIZE:
                self._owners.clear()
            owner = self._owners[(uid, gid)] = f"{user:<{max(len(user), 8)}} {group:<{max(len(group), 8)}}"
        mode_text = self._modes.get(mode)
        if mode_text is None:
            if len(self._modes) >= _NAME_CACHE_SIZE:
                self._modes.clear()
            mode_text = self._modes[mode] = _mode_string(mode)
        date = self._date(attr.st_mtime, time.time() if now is None else now)
        nlink = getattr(attr, "st_nlink", 1)
        line = f"{mode_text} {nlink:>3} {owner} {attr.st_size or 0:>8} {date} {attr.filename}"
        return _enc(line)

    def _do_readdir(self, request_number: int, req: Reader) -> None:
        handle = req.handle()
        folder = self.folder_table.get(handle)
        if folder is None:
            self._send_status(request_number, Status(SFTP_FAILURE, "Invalid handle"))
            return
        read_batch = getattr(folder, "read_batch", None)
        batch = read_batch(READDIR_MAX_NAMES) if read_batch is not None else paramiko_compat.next_folder_batch(folder)
        if not isinstance(batch, list):
            self._send_status(request_number, batch)
            return
        if not batch:
            self._send_status(request_number, SFTP_EOF)
            return
        entries: list[bytes] = []
        size = 0
        now = time.time()
        for i, attr in enumerate(batch[:READDIR_MAX_NAMES]):
            entry = _string(_enc(attr.filename)) + _string(self.longname(attr, now)) + pack_attrs(attr)
            if entries and size + len(entry) > READDIR_MAX_BYTES:
                # Over budget: hand the rest back for the next READDIR.
                push_back = getattr(folder, "push_back", None)
                if push_back is not None:
                    push_back(batch[i:])
                break
            entries.append(entry)
            size += len(entry)
        self._send_names(request_number, entries)

    def _do_fstat(self, request_number: int, req: Reader) -> None:
        f = self._file(request_number, req.handle())
        if f is not None:
            self._send_attrs_or_status(request_number, f.stat())

    def _do_fsetstat(self, request_number: int, req: Reader) -> None:
        handle = req.handle()
        attr = req.attrs()
        _check_size(attr)
        f = self._file(request_number, handle)
        if f is not None:
            self._send_status(request_number, f.chattr(attr))

    def _do_readlink(self, request_number: int, req: Reader) -> None:
        resp = self.server.readlink(req.path())
        if isinstance(resp, (str, bytes)):
            self._send_one_name(request_number, resp)  # type: ignore[arg-type]
        else:
            self._send_status(request_number, resp)

    def _do_symlink(self, request_number: int, req: Reader) -> None:
        # OpenSSH (and so sshfs and sftp) send the target first, then the link
        # path: the reverse of the draft.  paramiko's interface takes that order too.
        target = req.path()
        path = req.path()
        self._send_status(request_number, self.server.symlink(target, path))

    def _realpath(self, path: str) -> Any:
        if not path:
            path = "."  # as OpenSSH: an empty path is the current directory
        realpath = getattr(self.server, "realpath", None)
        if realpath is not None:
            return realpath(path)
        return self.server.canonicalize(path)

    def _send_path_or_status(self, request_number: int, resp: Any) -> None:
        if isinstance(resp, str):
            self._send_one_name(request_number, resp)
        else:
            self._send_status(request_number, resp)

    def _do_realpath(self, request_number: int, req: Reader) -> None:
        self._send_path_or_status(request_number, self._realpath(req.path()))

    # -- extensions ----------------------------------------------------------
    def _do_extended(self, request_number: int, req: Reader) -> None:
        name = _dec(req.string())
        handler = self._extended.get(name)
        self.requests[name if handler is not None else "unknown-extension"] += 1
        if self.xlog.enabled(log.loglevel_DEBUG_SFTPXFER):
            self.xlog(f"request EXTENDED {name} #{request_number}", loglevel=log.loglevel_DEBUG_SFTPXFER)
        if handler is None:
            self._send_status(request_number, Status(SFTP_OP_UNSUPPORTED, "Unsupported extended request"))
            return
        handler(request_number, req)

    def _send_statvfs(self, request_number: int, st: Any, read_only: bool) -> None:
        if not isinstance(st, os.statvfs_result):
            self._send_status(request_number, st)
            return
        flag = 0
        if st.f_flag & os.ST_RDONLY or read_only:
            flag |= SSH2_FXE_STATVFS_ST_RDONLY
        if st.f_flag & os.ST_NOSUID:
            flag |= SSH2_FXE_STATVFS_ST_NOSUID
        values = (st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail,
                  st.f_files, st.f_ffree, st.f_favail, st.f_fsid, flag, st.f_namemax)
        body = _U32.pack(request_number) + b"".join(_U64.pack(int(v) & _U64_MASK) for v in values)
        self._send(CMD_EXTENDED_REPLY, body)

    def _path_read_only(self, path: str) -> bool:
        exports = getattr(self.server, "exports", None)
        if exports is None:
            return False
        try:
            export, _ = exports.find(exports.normalize(path))
        except (OSError, ValueError):
            return False
        return bool(export.read_only)

    def _ext_statvfs(self, request_number: int, req: Reader) -> None:
        path = req.path()
        self._send_statvfs(request_number, self.server.statvfs(path), self._path_read_only(path))

    def _ext_fstatvfs(self, request_number: int, req: Reader) -> None:
        f = self._file(request_number, req.handle())
        if f is None:
            return
        statvfs = getattr(f, "statvfs", None)
        if statvfs is None:
            self._send_status(request_number, SFTP_OP_UNSUPPORTED)
            return
        read_only = getattr(f, "read_only", None)
        if read_only is None:
            read_only = getattr(getattr(f, "export", None), "read_only", False)
        self._send_statvfs(request_number, statvfs(), bool(read_only))

    def _ext_fsync(self, request_number: int, req: Reader) -> None:
        f = self.file_table.get(req.handle())
        if f is None:
            self._send_status(request_number, Status(SFTP_NO_SUCH_FILE, "Invalid handle"))  # as OpenSSH
            return
        fsync = getattr(f, "fsync", None)
        self._send_status(request_number, fsync() if fsync is not None else SFTP_OP_UNSUPPORTED)

    def _ext_lsetstat(self, request_number: int, req: Reader) -> None:
        path = req.path()
        attr = req.attrs()
        if paramiko_compat.attr_flags(attr) & SFTPAttributes.FLAG_SIZE:
            # As OpenSSH: a symlink has no size to set, so the request is malformed.
            self._send_status(request_number, Status(SFTP_BAD_MESSAGE, "lsetstat cannot set a size"))
            return
        self._send_status(request_number, self.server.lsetstat(path, attr))

    def _ext_limits(self, request_number: int, req: Reader) -> None:
        values = (MAX_PACKET_LENGTH, MAX_READ_LENGTH, MAX_WRITE_LENGTH, MAX_OPEN_HANDLES)
        self._send(CMD_EXTENDED_REPLY, _U32.pack(request_number) + b"".join(_U64.pack(v) for v in values))

    def _home(self) -> str | None:
        home = getattr(self.server, "home", None)
        if home is not None:
            result: str | None = home()
            return result
        resolved = self._realpath(".")
        return resolved if isinstance(resolved, str) else None

    def _ext_expand_path(self, request_number: int, req: Reader) -> None:
        path = req.path()
        if path.startswith("~"):
            user, sep, rest = path[1:].partition("/")
            if user and user != self.username:
                self._send_status(request_number, Status(SFTP_NO_SUCH_FILE, "No such user"))
                return
            home = self._home()
            if home is None:
                self._send_status(request_number, Status(SFTP_PERMISSION_DENIED, "Nothing is exported"))
                return
            path = home + "/" + rest if rest else home
        # Anything else (relative paths included) is a REALPATH against our home.
        self._send_path_or_status(request_number, self._realpath(path))

    def _ext_home_directory(self, request_number: int, req: Reader) -> None:
        user = _dec(req.string())
        if user and user != self.username:
            self._send_status(request_number, Status(SFTP_NO_SUCH_FILE, "No such user"))
            return
        home = self._home()
        if home is None:
            self._send_status(request_number, Status(SFTP_PERMISSION_DENIED, "Nothing is exported"))
            return
        self._send_one_name(request_number, home)

    def _ext_users_groups(self, request_number: int, req: Reader) -> None:
        def ids(blob: bytes) -> list[int]:
            if len(blob) % 4:
                raise BadMessage("id list is not a whole number of uint32")
            return [v for (v,) in _U32.iter_unpack(blob)]

        def names(values: list[int], lookup: Callable[[int], str]) -> bytes:
            out = []
            for v in values:
                try:
                    out.append(_string(_enc(lookup(v))))
                except (KeyError, OverflowError, ValueError):
                    out.append(_string(b""))  # as OpenSSH: unknown ids get an empty name
            return b"".join(out)

        uids = ids(req.string())
        gids = ids(req.string())
        if len(uids) + len(gids) > MAX_IDS_PER_REQUEST:
            self._send_status(request_number, Status(
                SFTP_FAILURE, f"Too many ids in one request (at most {MAX_IDS_PER_REQUEST})"))
            return
        # Through the session's cache: a repeated id costs one NSS lookup.
        users = names(uids, lambda u: self._user_name("u", u, strict=True))
        groups = names(gids, lambda g: self._user_name("g", g, strict=True))
        body = _U32.pack(request_number) + _string(users) + _string(groups)
        if len(body) + 5 > SSHFS_MAX_REPLY:
            self._send_status(request_number, Status(SFTP_FAILURE, "Too many ids in one request"))
            return
        self._send(CMD_EXTENDED_REPLY, body)

    def _ext_copy_data(self, request_number: int, req: Reader) -> None:
        src = req.handle()
        read_offset = req.offset("read offset")
        length = req.offset("length")
        dst = req.handle()
        write_offset = req.offset("write offset")
        fin = self._file(request_number, src)
        if fin is None:
            return
        fout = self._file(request_number, dst)
        if fout is None:
            return
        same_file = getattr(fin, "same_file", None)
        if src == dst or (same_file is not None and same_file(fout)):
            # As OpenSSH: copying a file onto itself could chase its own tail forever.
            self._send_status(request_number, Status(SFTP_FAILURE, "Source and destination are the same file"))
            return
        if getattr(fout, "writable", True) is False:
            self._send_status(request_number, Status(SFTP_PERMISSION_DENIED, "Handle not open for writing"))
            return
        copy_range = getattr(fin, "copy_range", None)
        if copy_range is not None and type(fin) is type(fout):
            # The backend copies by extents (holes stay holes): see backend.FileHandle.copy_range.
            self._send_status(request_number, copy_range(fout, read_offset, length, write_offset))
            return
        until_eof = length == 0
        remaining = length
        while until_eof or remaining > 0:
            want = COPY_CHUNK if until_eof else min(COPY_CHUNK, remaining)
            data = fin.read(read_offset, want)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                self._send_status(request_number, data)
                return
            if not data:
                break
            status = fout.write(write_offset, bytes(data))
            if status != SFTP_OK:
                self._send_status(request_number, status)
                return
            read_offset += len(data)
            write_offset += len(data)
            remaining -= len(data)
        # A source that ends before the requested length is EOF (draft-ietf-secsh-filexfer-extensions-00 7).
        self._send_status(request_number, SFTP_OK if until_eof or remaining <= 0 else SFTP_EOF)
