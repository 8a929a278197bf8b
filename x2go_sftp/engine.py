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

The engine is three modules.  This one holds the session: framing, the
request loop and its error policy, dispatch, the replies, the handle tables
and the core v3 requests, with the limits they enforce.
:mod:`x2go_sftp.attrs` holds the fields (the strict :class:`Reader`,
:func:`pack_attrs`, "ls -l" long names and their caches) and
:mod:`x2go_sftp.extensions` one function per OpenSSH extension with the
capability that switches it on.  Their public names are importable from here
too (``__all__``).
"""

from __future__ import annotations

import contextlib
import os
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
    SFTPError,
)
from paramiko.sftp_attr import SFTPAttributes
from paramiko.sftp_handle import SFTPHandle

from . import log, paramiko_compat, writebehind
from .attrs import (
    MAX_OFFSET,
    U32,
    BadMessage,
    InvalidArgument,
    LongNames,
    Reader,
    check_size,
    decode,
    encode,
    pack_attrs,
    pack_string,
)
from .extensions import (
    COPY_CHUNK,
    EXTENSIONS,
    MAX_IDS_PER_REQUEST,
    SSH2_FXE_STATVFS_ST_NOSUID,
    SSH2_FXE_STATVFS_ST_RDONLY,
    Extension,
)
from .status import Status, from_oserror

# Names other modules import from here, wherever they are defined now.
__all__ = [
    "COPY_CHUNK",
    "EXIT_OK",
    "EXIT_PACKET_TOO_LARGE",
    "EXIT_PROTOCOL_ERROR",
    "EXTENSIONS",
    "MAX_IDS_PER_REQUEST",
    "MAX_OFFSET",
    "MAX_OPEN_HANDLES",
    "MAX_PACKET_LENGTH",
    "MAX_READ_LENGTH",
    "MAX_WRITE_LENGTH",
    "READDIR_MAX_BYTES",
    "READDIR_MAX_NAMES",
    "READDIR_READ_NAMES",
    "RECV_CHUNK",
    "SFTP_VERSION",
    "SSH2_FXE_STATVFS_ST_NOSUID",
    "SSH2_FXE_STATVFS_ST_RDONLY",
    "SSHFS_MAX_REPLY",
    "BadMessage",
    "ChannelGone",
    "Extension",
    "InvalidArgument",
    "LongNames",
    "PacketTooLarge",
    "Reader",
    "SFTPEngine",
    "pack_attrs",
]

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

# READDIR batch.  The byte budget is the bound that matters: it keeps every
# reply far below SSHFS_MAX_REPLY even with 255-byte names, long user names and
# "ls -l" lines (one entry is under 1 KiB).  OpenSSH's sftp-server stops at 100
# names a reply ("XXX check packet size instead", says its source); a round trip
# costs it little in C, but here each READDIR costs python-x2go's paramiko hop
# and our session about 150 us of CPU.  So the count only bounds the work one
# READDIR does (an lstat and an encoding per name, about 2 ms for 512), and the
# byte budget decides: ordinary names fill a reply at about 500, so a listing of
# 2000 takes 4 READDIRs instead of 20 (`ls -l` 0-8 % faster, with 4-18 % less
# CPU in python-x2go's process: docs/performance-notebook.md round 15).
READDIR_MAX_NAMES = 512
READDIR_MAX_BYTES = 64 * 1024
# Names a READDIR reads from the directory at a time.  Names read that the
# reply's byte budget cannot take go back to the open directory for the next
# READDIR, so an open directory holds at most this many read ahead (under
# 64 x 0.6 KiB with 255-byte names), whatever READDIR_MAX_NAMES is.  OpenSSH's
# sftp-server reads one name at a time and holds none.
READDIR_READ_NAMES = 64

# Exit statuses sent on the session channel when the subsystem ends, as sshd
# reports OpenSSH's sftp-server exiting: 0 at the client's EOF, 11 for an
# oversized packet (sftp_server_cleanup_exit(11)), 255 for any other fatal
# protocol error (fatal()).  scp and ssh treat a missing exit status as failure.
EXIT_OK = 0
EXIT_PACKET_TOO_LARGE = 11
EXIT_PROTOCOL_ERROR = 255

# Log lines a client can provoke, one limiter per kind for the whole process
# (so many sessions do not multiply the budget): bad input (INFO) and backend
# failures (ERROR).  Limits: log.LOG_BURST lines per log.LOG_INTERVAL.
_BAD_INPUT_LOG = log.RateLimiter()
_BACKEND_ERROR_LOG = log.RateLimiter()
_HANDLE_CAP_LOG = log.RateLimiter()

# Input is taken from the channel in pieces up to this size and parsed from a
# local buffer: one channel read serves many small requests (and a WRITE's
# header and data), instead of two reads per request.
RECV_CHUNK = 256 * 1024

# A reply's length and type; a DATA reply's length, type, request id and data length.
_REPLY_HEAD = struct.Struct(">IB")
_DATA_HEAD = struct.Struct(">IBII")

# paramiko's Channel sends at most out_max_packet_size - 64 bytes per packet.
_CHANNEL_PACKET_SLACK = 64


class PacketTooLarge(SFTPError):
    """The peer sent a packet over :data:`MAX_PACKET_LENGTH`."""


class ChannelGone(Exception):
    """Sending a reply failed: the client or the tunnel closed the channel."""


class SFTPEngine(paramiko.SFTPServer):
    """SFTP v3 subsystem handler; pass it to ``Transport.set_subsystem_handler``.

    Args (from paramiko): the channel, the subsystem name, the SSH
    ``ServerInterface`` (its ``username``, if any, is the one user
    ``home-directory`` answers for), the ``SFTPServerInterface`` class and the
    arguments it is built with (``logger`` is used here too).
    """

    file_table: dict[bytes, SFTPHandle]
    folder_table: dict[bytes, SFTPHandle]
    # paramiko's constructor sets it to the channel (start_subsystem again): never None here.
    sock: paramiko.Channel

    # Hold replies while more requests are already buffered (see _send); off
    # only to measure what it buys.
    hold_replies = True

    # WRITEs finished on a native thread while the session reads on
    # (x2go_sftp.writebehind): None is under gevent's monkey patching only;
    # True or False forces it.  Needs a backend handle with fd_for_write().
    write_behind: bool | None = None

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
        self._in = memoryview(b"")
        self._in_pos = 0
        self._out: list[bytes] = []
        self._out_len = 0
        # Where input comes from and replies go (a fastpath.SessionIO), if not the channel itself.
        self._io: Any = None
        # WRITEs waiting for the worker (made at the first one), if this session writes behind.
        self._behind_wanted = writebehind.wanted(self.write_behind)
        self._behind: writebehind.WriteBehind | None = None
        self.writes_behind = 0  # WRITEs that the worker finished
        self.requests: Counter[str] = Counter()
        self.exit_status = EXIT_OK
        # "ls -l" long names for READDIR and user/group names, with this session's caches.
        self.long_names = LongNames()
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
        # The extensions the backend can serve, each advertised in VERSION (extensions.py).
        enabled = [ext for ext in EXTENSIONS if ext.needs is None or self._backend_has(ext.needs)]
        self.extensions = [(ext.name, ext.version) for ext in enabled]
        self._extended: dict[str, Callable[[SFTPEngine, int, Reader], None]] = {
            ext.name: ext.serve for ext in enabled}

    def _backend_has(self, method: str) -> bool:
        """True if the backend really implements ``method``.

        paramiko's own ``SFTPServerInterface`` has a ``posix_rename`` that only
        answers OP_UNSUPPORTED; advertising the extension on that would be a lie.
        """
        impl = getattr(type(self.server), method, None)
        return callable(impl) and impl is not getattr(paramiko.SFTPServerInterface, method, None)

    # -- framing -------------------------------------------------------------
    def _read_packet(self) -> bytes:
        """The next packet, from its type byte on (its length checked and taken off)."""
        (size,) = U32.unpack(self._take(4))
        if size > MAX_PACKET_LENGTH:
            raise PacketTooLarge(f"packet of {size} bytes exceeds {MAX_PACKET_LENGTH}")
        if size == 0:
            raise BadMessage("empty packet")
        packet = self._take(size)
        self.bytes_in += 4 + size
        return packet

    def _take(self, n: int) -> bytes:
        """The next ``n`` input bytes, copied once at most; sends the held replies before it would wait for input.

        Input pieces (bytes, or views of the fast path's decrypted packets)
        are kept as views: a request inside one piece is one copy of itself,
        one spanning pieces one join of the parts, and nothing is copied to
        keep what follows it.
        """
        piece, pos = self._in, self._in_pos
        end = pos + n
        if end <= len(piece):
            self._in_pos = end
            return piece[pos:end].tobytes()
        parts = [piece[pos:]]
        need = end - len(piece)
        while True:
            if (self._out or (self._behind is not None and self._behind.pending)) and not self._input_ready():
                self._settle()
                self._flush()
            chunk = (self._io or self.sock).recv(RECV_CHUNK)
            if chunk is None:
                continue  # a packet without input for us: look again at what is held
            if not chunk:
                raise EOFError()
            view = memoryview(chunk)
            if len(view) >= need:
                parts.append(view[:need])
                self._in, self._in_pos = view, need
                return b"".join(parts)
            parts.append(view)
            need -= len(view)

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
        were already here (``_take`` flushes before it would block).
        """
        self._queue(_REPLY_HEAD.pack(len(body) + 1, t), body)

    def _queue(self, head: bytes, body: bytes) -> None:
        """Queue a reply as its head and body, uncopied: :meth:`_flush` joins what it sends, once."""
        self._out += (head, body)
        self._out_len += len(head) + len(body)
        if not self.hold_replies:
            self._flush()
        elif self._out_len >= self._packet_payload():
            self._flush(whole_packets=True)

    def _write_all(self, out: bytes | memoryview) -> None:
        if self._io is not None:
            self._io.sendall(out)
        else:
            paramiko_compat.sftp_write_all(self, bytes(out))  # always bytes here (no copy)

    def _packet_payload(self) -> int:
        return max(getattr(self.sock, "out_max_packet_size", 32768) - _CHANNEL_PACKET_SLACK, 1024)

    def _flush(self, whole_packets: bool = False) -> None:
        """Send the queued replies (only whole channel packets' worth if ``whole_packets``)."""
        data = b"".join(self._out)
        out: bytes | memoryview = data
        keep = b""
        if whole_packets:
            cut = len(data) - len(data) % self._packet_payload()
            if cut < len(data):
                keep = data[cut:]
                # The fast path takes a view; paramiko's channel gets bytes, as always.
                out = memoryview(data)[:cut] if self._io is not None else data[:cut]
        self._out = [keep] if keep else []
        self._out_len = len(keep)
        self.bytes_out += len(out)
        try:
            self._write_all(out)
        except (OSError, EOFError) as e:
            raise ChannelGone(str(e) or type(e).__name__) from e

    def start_subsystem(self, name: str, transport: paramiko.Transport, channel: paramiko.Channel) -> None:
        self.sock = channel
        self._tell_observer("session_started")
        try:
            t = self._read_packet()[0]
            if t != CMD_INIT:
                raise BadMessage(f"expected INIT, got packet type {t}")
            body = [U32.pack(SFTP_VERSION)]
            for ext_name, version in self.extensions:
                body.append(pack_string(ext_name.encode()) + pack_string(version.encode()))
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
                packet = self._read_packet()
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
            if len(packet) < 5:
                self._fatal(channel, "packet without request id", EXIT_PROTOCOL_ERROR)
                return
            t = packet[0]
            request_number = U32.unpack_from(packet, 1)[0]
            # Lines a client can provoke at will are rate-limited process-wide.
            try:
                self._process(t, request_number, Reader(packet, 5))
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
            self._settle()
            self._send_status(request_number, status)
            return True
        except Exception:
            return False

    def _process(self, t: int, request_number: int, req: Reader) -> None:
        if t != CMD_WRITE and self._behind is not None and self._behind.pending:
            self._settle()  # every other request sees the writes before it, and answers after them
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
        if self._behind is not None:
            # Every pending write is finished (answered if the channel still
            # takes it) before a handle is closed.
            behind, self._behind = self._behind, None
            try:
                results = behind.close()
            except BaseException:
                # Interrupted (a killed greenlet): the worker finishes its
                # queue on its own; the files stay open rather than let a
                # write land in a descriptor number reused meanwhile.
                self.file_table = {}
                raise
            with contextlib.suppress(Exception):  # the channel is already gone
                self._answer_writes(results)
        if self._out:
            with contextlib.suppress(Exception):  # the channel is already gone
                self._flush()  # replies to the requests before the one that ended the session
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
        with contextlib.suppress(Exception):  # the channel is already gone
            self.sock.send_exit_status(self.exit_status)
        with contextlib.suppress(Exception):
            self.sock.close()
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
        self._send(CMD_STATUS, U32.pack(request_number) + U32.pack(int(code))
                   + pack_string(encode(desc)) + pack_string(b""))

    def _send_names(self, request_number: int, entries: list[bytes]) -> None:
        """NAME reply from already encoded ``name, longname, attrs`` entries."""
        self._send(CMD_NAME, U32.pack(request_number) + U32.pack(len(entries)) + b"".join(entries))

    def _send_one_name(self, request_number: int, name: str | bytes) -> None:
        # As OpenSSH: the long name repeats the name; no attributes.
        raw = encode(name)
        self._send_names(request_number, [pack_string(raw) + pack_string(raw) + U32.pack(0)])

    def _send_attrs_or_status(self, request_number: int, resp: Any) -> None:
        if isinstance(resp, SFTPAttributes):
            self._send(CMD_ATTRS, U32.pack(request_number) + pack_attrs(resp))
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
        self._send(CMD_HANDLE, U32.pack(request_number) + pack_string(name))

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
        # paramiko declares SFTPHandle.close() to return None; a backend's may return a status.
        close: Callable[[], object] = h.close
        result = close()
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
            body = data if type(data) is bytes else bytes(data)
            self._queue(_DATA_HEAD.pack(len(body) + 9, CMD_DATA, request_number, len(body)), body)
        else:
            self._send_status(request_number, data)

    def _do_write(self, request_number: int, req: Reader) -> None:
        handle = req.handle()
        offset = req.offset()
        data = req.string()
        fd_for_write = getattr(self.file_table.get(handle), "fd_for_write", None)
        behind = self._behind
        if (fd_for_write is None or not self._behind_wanted
                or (len(data) < writebehind.MIN_BYTES and (behind is None or not behind.pending))):
            self._settle()
            f = self._file(request_number, handle)
            if f is None:
                return
            self._send_status(request_number, f.write(offset, data))
            return
        try:
            fd = fd_for_write(offset)
        except OSError as e:
            self._settle()
            self._send_status(request_number, from_oserror(e))
            return
        if behind is None:
            behind = self._behind = writebehind.WriteBehind()
        self._answer_writes(behind.completed())
        while not behind.has_room(len(data)):
            behind.wait()
            self._answer_writes(behind.completed())
        behind.submit(request_number, fd, data, offset)
        self.writes_behind += 1

    def _settle(self) -> None:
        """Wait for every pending WRITE and queue its reply."""
        behind = self._behind
        while behind is not None and behind.pending:
            behind.wait()
            self._answer_writes(behind.completed())

    def _answer_writes(self, results: list[tuple[int, OSError | None]]) -> None:
        for request_number, error in results:
            self._send_status(request_number, SFTP_OK if error is None else from_oserror(error))

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
                check_size(attr)
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

    def longname(self, attr: SFTPAttributes, now: float | None = None) -> bytes:
        """The "ls -l" line OpenSSH's sftp-server sends with each READDIR name (:class:`LongNames`)."""
        return self.long_names.longname(attr, now)

    def _do_readdir(self, request_number: int, req: Reader) -> None:
        handle = req.handle()
        folder = self.folder_table.get(handle)
        if folder is None:
            self._send_status(request_number, Status(SFTP_FAILURE, "Invalid handle"))
            return
        now = time.time()
        read_stats = getattr(folder, "read_stats", None)
        if read_stats is not None:
            # Our backend's DirHandle: each entry encoded straight from its lstat().
            entry_of = self.long_names.entry
            self._send_entries(request_number, folder, read_stats, lambda item: entry_of(item[0], item[1], now))
            return
        read_batch = getattr(folder, "read_batch", None)
        if read_batch is None:
            read_batch = lambda n: paramiko_compat.next_folder_batch(folder)  # noqa: E731
        longname = self.long_names.longname
        self._send_entries(request_number, folder, read_batch, lambda attr: (
            pack_string(encode(attr.filename)) + pack_string(longname(attr, now)) + pack_attrs(attr)))

    def _send_entries(self, request_number: int, folder: Any, read: Callable[[int], Any],
                      encode_entry: Callable[[Any], bytes]) -> None:
        """One NAME reply: up to :data:`READDIR_MAX_NAMES` names within :data:`READDIR_MAX_BYTES`; EOF at the end.

        Names are read :data:`READDIR_READ_NAMES` at a time (``read(n)``: a
        list, or a status when the directory fails); those that do not fit go
        back to the folder (``push_back``) for the next READDIR.  A folder
        that cannot take names back is read once per READDIR.
        """
        push_back = getattr(folder, "push_back", None)
        entries: list[bytes] = []
        size = 0
        while len(entries) < READDIR_MAX_NAMES:
            batch = read(min(READDIR_READ_NAMES, READDIR_MAX_NAMES - len(entries)))
            if not isinstance(batch, list):
                self._send_status(request_number, batch)  # the names read so far in this READDIR are lost
                return
            for i, item in enumerate(batch):
                entry = encode_entry(item)
                if entries and (size + len(entry) > READDIR_MAX_BYTES or len(entries) >= READDIR_MAX_NAMES):
                    if push_back is not None:
                        push_back(batch[i:])
                    self._send_names(request_number, entries)
                    return
                entries.append(entry)
                size += len(entry)
            if not batch or push_back is None:
                break
        if entries:
            self._send_names(request_number, entries)
        else:
            self._send_status(request_number, SFTP_EOF)

    def _do_fstat(self, request_number: int, req: Reader) -> None:
        f = self._file(request_number, req.handle())
        if f is not None:
            self._send_attrs_or_status(request_number, f.stat())

    def _do_fsetstat(self, request_number: int, req: Reader) -> None:
        handle = req.handle()
        attr = req.attrs()
        check_size(attr)
        f = self._file(request_number, handle)
        if f is not None:
            self._send_status(request_number, f.chattr(attr))

    def _do_readlink(self, request_number: int, req: Reader) -> None:
        resp = self.server.readlink(req.path())
        if isinstance(resp, (str, bytes)):
            self._send_one_name(request_number, resp)
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

    # -- extensions (each served by a function of extensions.py) ---------------
    def _do_extended(self, request_number: int, req: Reader) -> None:
        name = decode(req.string())
        handler = self._extended.get(name)
        self.requests[name if handler is not None else "unknown-extension"] += 1
        if self.xlog.enabled(log.loglevel_DEBUG_SFTPXFER):
            self.xlog(f"request EXTENDED {name} #{request_number}", loglevel=log.loglevel_DEBUG_SFTPXFER)
        if handler is None:
            self._send_status(request_number, Status(SFTP_OP_UNSUPPORTED, "Unsupported extended request"))
            return
        handler(self, request_number, req)
