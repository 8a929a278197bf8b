"""A seeded fuzzer of SFTP v3 requests, sent through the whole tunnel by a logged-in client.

    python -m tests.fuzz_sftp --seed N --packets M [--batch K]

As python-x2go runs it, monkey-patched by gevent::

    python -c "from gevent import monkey; monkey.patch_all(); from tests.fuzz_sftp import main; main()" \
        --seed N --packets M

With ``--dir`` (an empty directory) two runs of one seed send the same bytes;
without it, the temporary directory's name is part of the absolute paths sent.

The topology is the test suite's (tests/conftest.py): a paramiko client logs
into a real :class:`~x2go_sftp.X2GoRevFwTunnelToSFTP` through the in-process
X2Go server (:class:`~x2go_sftp.testing.LoopbackX2GoServer`), with the session
key, and speaks SFTP on raw session channels, byte for byte, as
:class:`tests.jail_support.RawSFTP` does.  The files are a
:class:`tests.jail_support.Sandbox`: a writable export, a read-only export, and
secrets beside them (an ``outside`` directory, an ``export-evil`` sibling, a
sibling file) that no request may touch.

What is sent (:class:`Generator`; every choice comes from ``random.Random``
seeded with the seed and the session's number, so one seed always sends the
same bytes, given the handle names the session's opening requests got):

* well-formed requests of every type and extension, on real handles the
  session opened first, and mutations of them: bit flips, interesting
  numbers written over fields, truncation, splicing two requests, inserted,
  deleted and repeated bytes;
* every type byte 0..255 in turn, with garbage, empty and foreign payloads;
* truncated fields, and string lengths declared far beyond the packet
  (``0xFFFFFFFF``, ``0x7FFFFFFF``, one past the end, the engine's limit);
* packets of exactly the engine's length limit, and packets declaring more
  (the limit plus one up to ``0xFFFFFFFF``);
* bad, stale (closed) and foreign (another session's) handles, and file
  handles where directory handles belong and back;
* ATTRS with every combination of the four flags, the extended flag and
  unknown flag bits, extended pairs (more declared than sent too), and
  extreme values;
* reused request ids (0, ``0xFFFFFFFF``, the previous one);
* known extensions with garbage, unknown extension names (empty, invalid
  UTF-8, NUL, long);
* offsets and lengths near 2^31, 2^32, 2^63 and 2^64;
* paths with ``..``, absolute paths outside the exports, planted symlinks
  pointing out, NUL bytes, invalid UTF-8, names and paths at and past the
  length limits;
* malformed INITs, and framing errors that end a session: a packet declaring
  more than it sends followed by EOF, a partial length header, length 0, a
  body without a request id.

What is checked: every request with a well-formed frame gets exactly one
reply carrying its request id, in order, or the server closes the session at a
packet that is a protocol violation (counted as an expected close, by reason);
a request with neither a reply nor a close within :data:`HANG_DEADLINE` is a
hang.  Replies are counted by type and status code; "Internal error" replies
are listed with their packets.  Exceptions in any thread
(``threading.excepthook``, ``sys.unraisablehook``) and ERROR log lines of
``x2go_sftp`` and paramiko are crashes.  No reply byte may contain the
outside secret.  After each batch: another session opened before the batch
still answers, a fresh connection's session answers REALPATH and STAT,
threads and descriptors return to their baseline (joined and polled up to
:data:`SETTLE_DEADLINE`, never slept for), RSS is within
:data:`RSS_TOLERANCE` of its baseline, and a full snapshot of everything
outside the writable export (names, sizes, modes, owners, mtimes, atimes,
content hashes) is unchanged.

The process's file size limit is set to :data:`FILE_SIZE_LIMIT` while the
fuzzer runs, so a mutated WRITE offset or SETSTAT size cannot make a sparse
file of terabytes that a later ``copy-data`` would copy, zeros and all, for
hours (copy-data with length 0 copies to EOF, as in OpenSSH).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import random
import resource
import shutil
import signal
import socket
import stat as stat_mod
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from tests.jail_support import SECRET, Sandbox
from x2go_sftp import X2GoRevFwTunnelToSFTP, paramiko_compat
from x2go_sftp.defaults import current_local_user
from x2go_sftp.engine import MAX_PACKET_LENGTH, MAX_READ_LENGTH, MAX_WRITE_LENGTH
from x2go_sftp.exports import MAX_PATH_BYTES, Exports
from x2go_sftp.testing import ClientTransport, LoopbackX2GoServer

# -- limits of the fuzzer itself ----------------------------------------------------------
# A request with neither a reply nor a close within this many seconds is a hang.
# OpenSSH's sftp-server has no per-request deadline; the slowest legitimate
# request we send (copy-data of a FILE_SIZE_LIMIT file, or users-groups-by-id
# with a full packet of ids) takes well under a second, far below this on a
# loaded 2-core box.
HANG_DEADLINE = 60.0

# After a batch, threads and descriptors have this long to return to baseline.
# It covers paramiko's transport threads winding down (inner.TRANSPORT_JOIN_TIMEOUT
# is 5 s each) under load; the wait ends as soon as they are back.
SETTLE_DEADLINE = 60.0

# Once the threads are back, descriptors have this long to follow: a transport
# closes its socket before its thread returns, so this is only slack.
FD_SETTLE_DEADLINE = 5.0

# RSS may end a batch this far above its baseline: glibc keeps one malloc arena
# per thread that ever ran (up to 8 per core; measured: +36 MiB over the first
# batches of a 1,000,000-packet run, flat after, with malloc_trim; flat at +12
# MiB with MALLOC_ARENA_MAX=2), and paramiko's buffers reach the 2 MiB channel
# window.  A leak of one buffer per request (1,000 requests x 64 KiB) exceeds it.
RSS_TOLERANCE = 48 * 1024 * 1024

# Descriptors and threads must come back exactly.
FD_TOLERANCE = 0
THREAD_TOLERANCE = 0

# Requests in flight on a session: replies to a chunk are read before the next
# is sent.  The bytes stay far below the 2 MiB receive window the inner server
# gives, so a send can never wait on a server that waits on us.
CHUNK_PACKETS = 32
CHUNK_BYTES = 256 * 1024

# A session sends between 1 and this many fuzzed packets (fewer if one of them
# is a protocol violation that ends it).
MAX_SESSION_PACKETS = 1500

# Default packets per batch (the checks above run after each).
DEFAULT_BATCH = 20000

# While the fuzzer runs, no file may grow past this (RLIMIT_FSIZE; SIGXFSZ is
# ignored, so a write past it fails with EFBIG).  See the module docstring.
FILE_SIZE_LIMIT = 16 * 1024 * 1024

# Names the fuzz may create in the export come from pools of this size, so a
# batch cannot fill the export with an unbounded number of files.
NAME_POOL = 24

# Every client-side thread (our paramiko transports) carries this prefix.
CLIENT_THREAD_PREFIX = "fuzz-client"

# Entries in the export's listing directory: more than one READDIR reply (engine.READDIR_MAX_NAMES).
LISTING_ENTRIES = 600

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# SFTP v3 (draft-ietf-secsh-filexfer-02) packet types.
INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = range(1, 11)
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(11, 21)
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED, EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201
REPLY_TYPES = {STATUS: "STATUS", HANDLE: "HANDLE", DATA: "DATA", NAME: "NAME", ATTRS: "ATTRS",
               EXTENDED_REPLY: "EXTENDED_REPLY"}
TYPE_NAMES = {INIT: "INIT", VERSION: "VERSION", OPEN: "OPEN", CLOSE: "CLOSE", READ: "READ", WRITE: "WRITE",
              LSTAT: "LSTAT", FSTAT: "FSTAT", SETSTAT: "SETSTAT", FSETSTAT: "FSETSTAT", OPENDIR: "OPENDIR",
              READDIR: "READDIR", REMOVE: "REMOVE", MKDIR: "MKDIR", RMDIR: "RMDIR", REALPATH: "REALPATH",
              STAT: "STAT", RENAME: "RENAME", READLINK: "READLINK", SYMLINK: "SYMLINK", EXTENDED: "EXTENDED",
              **REPLY_TYPES}
STATUS_NAMES = {0: "OK", 1: "EOF", 2: "NO_SUCH_FILE", 3: "PERMISSION_DENIED", 4: "FAILURE",
                5: "BAD_MESSAGE", 6: "NO_CONNECTION", 7: "CONNECTION_LOST", 8: "OP_UNSUPPORTED"}
SSH_FX_FAILURE = 4
INTERNAL_ERROR_TEXT = "Internal error"

# pflags and attribute flags (draft 02, sections 6.3 and 5).
PF_READ, PF_WRITE, PF_APPEND, PF_CREAT, PF_TRUNC, PF_EXCL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
A_SIZE, A_UIDGID, A_PERM, A_TIME, A_EXT = 0x1, 0x2, 0x4, 0x8, 0x80000000
A_UNKNOWN_BITS = (0, 0x10, 0x100, 0x40000000, 0x7FFFFFF0)

KNOWN_EXTENSIONS = (
    b"posix-rename@openssh.com", b"statvfs@openssh.com", b"fstatvfs@openssh.com", b"hardlink@openssh.com",
    b"fsync@openssh.com", b"lsetstat@openssh.com", b"limits@openssh.com", b"expand-path@openssh.com",
    b"copy-data", b"home-directory", b"users-groups-by-id@openssh.com",
)
UNKNOWN_EXTENSIONS = (
    b"", b"x", b"check-file", b"check-file-name", b"space-available", b"vendor-id", b"foo@example.com",
    b"posix-rename@openssh.co", b"posix-rename@openssh.com\x00", b"\xff\xfe@openssh.com",
    b"copy-data\x00x", b"LIMITS@OPENSSH.COM", b"e" * 300, b"\x00" * 8,
)

U64_EDGES = (0, 1, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62,
             2**63 - 2, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1)
U32_EDGES = (0, 1, 2, 3, 4, 255, 256, 4096, 32768, 65535, 65536, MAX_READ_LENGTH, MAX_READ_LENGTH + 1,
             MAX_PACKET_LENGTH, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1)
LENGTH_LIES = (0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, MAX_PACKET_LENGTH, MAX_PACKET_LENGTH + 1, 0x10000)
TOO_LARGE = (MAX_PACKET_LENGTH + 1, MAX_PACKET_LENGTH + 4096, 2 * MAX_PACKET_LENGTH, 0x7FFFFFFF, 0x80000000,
             0xFFFFFFFF)


def _s(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


# -- packets ------------------------------------------------------------------------------
# A request is built as a list of fields, so that mutations can hit one field
# precisely (a string's length prefix, a cut inside a number).
Field = tuple[str, Any]  # ("u32", int) | ("u64", int) | ("str", bytes) | ("raw", bytes)


def encode(fields: list[Field]) -> bytes:
    """Serialise fields as SFTP does (big-endian numbers, u32-prefixed strings)."""
    out = []
    for kind, value in fields:
        if kind == "u32":
            out.append(_U32.pack(value & 0xFFFFFFFF))
        elif kind == "u64":
            out.append(_U64.pack(value & 0xFFFFFFFFFFFFFFFF))
        elif kind == "str":
            out.append(_s(value))
        else:
            out.append(value)
    return b"".join(out)


@dataclass
class Packet:
    """One thing sent on a session and what the server must do with it.

    ``expect`` is ``"reply"`` (exactly one reply with request id ``rid``),
    ``"close"`` (the server ends the session at this packet by itself) or
    ``"eof"`` (an unfinished packet: we send EOF after it and the server must close).
    """

    kind: str
    frame: bytes
    expect: str = "reply"
    rid: int | None = None
    reason: str = ""
    must_fail: bool = False  # names a place outside the exports: any success is an escape

    @property
    def type_byte(self) -> int | None:
        return self.frame[4] if len(self.frame) > 4 else None

    def describe(self, limit: int = 48) -> str:
        t = self.type_byte
        name = TYPE_NAMES.get(t, str(t)) if t is not None else "-"
        head = self.frame[:limit].hex()
        more = f"...(+{len(self.frame) - limit})" if len(self.frame) > limit else ""
        return f"{self.kind} type={name} frame={head}{more}"


def frame_body(kind: str, body: bytes) -> Packet:
    """Frame ``body`` with its true length and say what the server must answer."""
    frame = _U32.pack(len(body)) + body
    if len(body) > MAX_PACKET_LENGTH:
        return Packet(kind, frame, "close", reason="packet too large")
    if not body:
        return Packet(kind, frame, "close", reason="empty packet")
    if len(body) < 5:
        return Packet(kind, frame, "close", reason="no request id")
    return Packet(kind, frame, "reply", rid=_U32.unpack_from(body, 1)[0])


@dataclass
class Places:
    """The names the generator uses, as bytes, built from the sandbox's real paths."""

    base: bytes
    export: bytes
    ro: bytes
    good: list[bytes] = field(default_factory=list)
    new: list[bytes] = field(default_factory=list)
    ro_paths: list[bytes] = field(default_factory=list)
    hostile: list[bytes] = field(default_factory=list)
    weird: list[bytes] = field(default_factory=list)
    link_targets: list[bytes] = field(default_factory=list)
    # Outside the exports by their text alone (relative ones from the home,
    # the writable export): whatever the fuzz did inside, no request on them may succeed.
    outside: set[bytes] = field(default_factory=set)
    # Requests through the links fill_export plants, that must fail on a fresh export.
    escapes: list[tuple[int, bytes]] = field(default_factory=list)

    @classmethod
    def for_sandbox(cls, base: bytes, export: bytes, ro: bytes) -> Places:
        p = cls(base, export, ro)
        outside = base + b"/outside"
        p.good = [b"hello.txt", b"data.bin", b"sub", b"sub/inside.txt", b"sub/deeper", b"dir", b"dir/f7",
                  b"fifo", b".", b"", b"in", b"chain", b"dangling", export, export + b"/hello.txt",
                  export + b"/sub/", b"./sub/../hello.txt", b"sub//inside.txt", b"/" + export.lstrip(b"/")]
        p.new = ([b"n%d" % i for i in range(NAME_POOL)] + [b"sub/n%d" % i for i in range(NAME_POOL // 2)]
                 + [b"d%d" % i for i in range(NAME_POOL // 2)] + [b"d%d/n%d" % (i, i) for i in range(4)]
                 + [b"\xff\xfe%d" % i for i in range(3)] + [b"sp ace %d" % i for i in range(2)])
        p.ro_paths = [ro, ro + b"/ro.txt", ro + b"/rodir", ro + b"/rodir/x.txt", ro + b"/new", b"rolink",
                      b"rolink/ro.txt", ro + b"/../export/hello.txt"]
        p.hostile = [
            outside + b"/secret.txt", outside, outside + b"/dir/inner.txt", outside + b"/link",
            base + b"/sibling.txt", base + b"/export-evil/secret.txt", export + b"-evil/secret.txt", base,
            base + b"/", b"/", b"/etc/passwd", b"/etc", b"/proc/self/environ", b"/proc/self/fd/0",
            b"/proc/self/root" + outside, b"..", b"../outside/secret.txt", b"../../../../../../etc/passwd",
            b"sub/../../outside/secret.txt", b"./../export-evil", b"out", b"out/secret.txt", b"abs", b"up",
            b"up/outside/secret.txt", b"loop", b"loop/x", b"sub/up2/outside", export + b"/../outside/secret.txt",
            export + b"/../sibling.txt", b"~/../outside", b"%2e%2e/outside/secret.txt", b"..\\outside",
            b"/windrive/c/x", b"/uncpath/h/s",
        ]
        p.outside = {
            outside + b"/secret.txt", outside, outside + b"/dir/inner.txt", outside + b"/link",
            base + b"/sibling.txt", base + b"/export-evil/secret.txt", export + b"-evil/secret.txt", base,
            base + b"/", b"/", b"/etc/passwd", b"/etc", b"/proc/self/environ", b"/proc/self/fd/0",
            b"/proc/self/root" + outside, b"..", b"../outside/secret.txt", b"../../../../../../etc/passwd",
            b"sub/../../outside/secret.txt", b"./../export-evil", export + b"/../outside/secret.txt",
            export + b"/../sibling.txt", b"/windrive/c/x", b"/uncpath/h/s",
        }
        assert p.outside <= set(p.hostile)
        read = _U32.pack(PF_READ) + _U32.pack(0)
        write = _U32.pack(PF_WRITE | PF_CREAT | PF_TRUNC) + _U32.pack(0)
        p.escapes = [
            *[(OPEN, _s(name) + read) for name in (b"abs", b"out/secret.txt", b"up/outside/secret.txt",
                                                   b"sub/up2/outside/secret.txt", b"rolink/ro.txt", b"chain/../abs")],
            (OPEN, _s(b"abs") + write), (OPEN, _s(b"out/secret.txt") + write),
            *[(OPENDIR, _s(name)) for name in (b"out", b"up", b"sub/up2", b"rolink", b"out/dir")],
            *[(STAT, _s(name)) for name in (b"abs", b"out", b"up/sibling.txt", b"rolink")],
            (SETSTAT, _s(b"abs") + _U32.pack(A_PERM) + _U32.pack(0o600)),
            (REALPATH, _s(b"out/secret.txt")),
            (EXTENDED, _s(b"statvfs@openssh.com") + _s(b"out")),
            (EXTENDED, _s(b"hardlink@openssh.com") + _s(b"out/secret.txt") + _s(b"n0")),
            (RENAME, _s(b"out/secret.txt") + _s(b"n1")),
            (REMOVE, _s(b"out/secret.txt")),
            (MKDIR, _s(b"out/newdir") + _U32.pack(0)),
            (SYMLINK, _s(b"up/outside/secret.txt") + _s(b"n2")),
        ]
        long_name = b"x" * 255
        p.weird = [
            b"hello.txt\x00../../outside/secret.txt", b"\x00", b"sub\x00", b"\xff\xfe", b"\xc0\xae\xc0\xae/outside",
            b"\xed\xa0\x80", b"\x80", long_name, long_name + b"y", b"a/" * (MAX_PATH_BYTES // 2 - 1) + b"a",
            export + b"/" + b"b" * (MAX_PATH_BYTES - len(export)), b"c" * (MAX_PATH_BYTES + 1), b"//", b"/./././",
            b"~", b"~/", b"~root", b"~nobody/x", b" ", b"-", b"\n", b"*", b"sub/./.././sub/../..",
            b"d" * 70000,
        ]
        p.link_targets = [b"hello.txt", b"sub", b"../export/hello.txt", export + b"/hello.txt", outside,
                          outside + b"/secret.txt", b"../outside/secret.txt", b"..", b"../..", b"/", b"/etc/passwd",
                          b"up/outside", b"", b"\x00x", b"\xff", b"n0", b"loop", b"x" * 5000]
        return p


@dataclass
class Handles:
    """Handles a session's generator may use."""

    files: list[bytes] = field(default_factory=list)  # live, writable where the open allowed it
    ro_files: list[bytes] = field(default_factory=list)
    dirs: list[bytes] = field(default_factory=list)
    stale: list[bytes] = field(default_factory=list)  # closed: in this session or an earlier one
    foreign: list[bytes] = field(default_factory=list)  # live in another session

    def fabricated(self, rng: random.Random) -> bytes:
        return rng.choice((b"", b"h", b"hx", b"hx-1", b"hx999999999", b"hx0\x00", b"\x00" * 4, b"\xff" * 8,
                           b"hx" + b"9" * 300, rng.randbytes(rng.randrange(1, 64)), b"hx%d" % rng.randrange(64)))


class Generator:
    """Malformed and mutated SFTP v3 requests for one session, from one seeded RNG."""

    def __init__(self, rng: random.Random, places: Places, handles: Handles, type_cursor: int = 0,
                 attr_cursor: int = 0):
        self.rng = rng
        self.p = places
        self.h = handles
        self.rid = 0
        self.last_rid = 0
        self.recent: list[bytes] = []  # well-formed bodies, for splicing
        # Carried from session to session, so that every type byte and flag set comes in turn.
        self.type_cursor = type_cursor
        self.attr_cursor = attr_cursor
        self._valid: dict[str, Callable[[], tuple[int, list[Field]]]] = {
            "OPEN": self._open, "CLOSE": self._close, "READ": self._read, "WRITE": self._write,
            "LSTAT": lambda: (LSTAT, [("str", self.path())]), "FSTAT": lambda: (FSTAT, [("str", self.fh())]),
            "SETSTAT": lambda: (SETSTAT, [("str", self.path(write=True)), *self.attrs()]),
            "FSETSTAT": lambda: (FSETSTAT, [("str", self.fh()), *self.attrs()]),
            "OPENDIR": lambda: (OPENDIR, [("str", self.path())]), "READDIR": lambda: (READDIR, [("str", self.dh())]),
            "REMOVE": lambda: (REMOVE, [("str", self.path(write=True))]),
            "MKDIR": lambda: (MKDIR, [("str", self.path(write=True)), *self.attrs()]),
            "RMDIR": lambda: (RMDIR, [("str", self.path(write=True))]),
            "REALPATH": lambda: (REALPATH, [("str", self.path())]), "STAT": lambda: (STAT, [("str", self.path())]),
            "RENAME": lambda: (RENAME, [("str", self.path(write=True)), ("str", self.path(write=True))]),
            "READLINK": lambda: (READLINK, [("str", self.path())]),
            "SYMLINK": lambda: (SYMLINK, [("str", self.link_target()), ("str", self.path(write=True))]),
            **{ext.decode(): functools.partial(self._extended, ext) for ext in KNOWN_EXTENSIONS},
        }
        self.valid_names = sorted(self._valid)
        # (weight, maker): the mix of one session.
        self._makers: list[tuple[float, Callable[[], Packet]]] = [
            (24, self.make_valid), (30, self.make_mutated), (10, self.make_any_type), (7, self.make_bad_handle),
            (6, self.make_attrs), (7, self.make_hostile_path), (5, self.make_extension), (5, self.make_numbers),
            (6, self.make_length_lie), (0.15, self.make_at_limit),
        ]
        self._weights = [w for w, _ in self._makers]

    # -- values ----------------------------------------------------------------------------
    def path(self, write: bool = False) -> bytes:
        r = self.rng.random()
        if r < 0.45:
            return self.rng.choice(self.p.new if write and self.rng.random() < 0.6 else self.p.good)
        if r < 0.6:
            return self.rng.choice(self.p.ro_paths)
        if r < 0.85:
            return self.rng.choice(self.p.hostile)
        return self.rng.choice(self.p.weird)

    def link_target(self) -> bytes:
        return self.rng.choice(self.p.link_targets) if self.rng.random() < 0.8 else self.path()

    def fh(self) -> bytes:
        """A file handle: live mostly, otherwise any handle at all."""
        live = self.h.files + self.h.ro_files
        if live and self.rng.random() < 0.75:
            return self.rng.choice(live)
        return self.any_handle()

    def dh(self) -> bytes:
        if self.rng.random() < 0.75 and self.h.dirs:
            return self.rng.choice(self.h.dirs)
        return self.any_handle()

    def any_handle(self) -> bytes:
        pools = [x for x in (self.h.files, self.h.ro_files, self.h.dirs, self.h.stale, self.h.foreign) if x]
        if pools and self.rng.random() < 0.7:
            return self.rng.choice(self.rng.choice(pools))
        return self.h.fabricated(self.rng)

    def offset(self) -> int:
        if self.rng.random() < 0.8:
            return self.rng.choice((0, 0, self.rng.randrange(70000), self.rng.randrange(1 << 20)))
        return self.rng.choice(U64_EDGES)

    def length(self) -> int:
        if self.rng.random() < 0.8:
            return self.rng.choice((0, 1, 100, 4096, 32768, 65536, self.rng.randrange(MAX_READ_LENGTH)))
        return self.rng.choice(U32_EDGES)

    def data(self) -> bytes:
        r = self.rng.random()
        if r < 0.9:
            return self.rng.randbytes(self.rng.choice((0, 1, 17, 512, 4096, self.rng.randrange(8192))))
        return self.rng.randbytes(self.rng.choice((32768, 65536, MAX_WRITE_LENGTH // 2)))

    def attrs(self, flags: int | None = None, extreme: bool = False) -> list[Field]:
        """ATTRS fields; ``flags`` None: a plausible random set."""
        rng = self.rng
        if flags is None:
            flags = 0
            for bit in (A_SIZE, A_UIDGID, A_PERM, A_TIME):
                if rng.random() < 0.3:
                    flags |= bit
        out: list[Field] = [("u32", flags)]
        if flags & A_SIZE:
            out.append(("u64", rng.choice(U64_EDGES) if extreme else rng.choice((0, 1, 100, rng.randrange(1 << 20)))))
        if flags & A_UIDGID:
            pair = (rng.choice((0, 1, 65534, os.getuid(), 2**31, 2**32 - 1)), rng.choice((0, 1, 65534, os.getgid())))
            out += [("u32", pair[0] if extreme else os.getuid()), ("u32", pair[1] if extreme else os.getgid())]
        if flags & A_PERM:
            mode = rng.choice((*U32_EDGES, 0o7777, 0o4755, 0o170777, 0o100644, 0o40755)) if extreme else (
                rng.choice((0o644, 0o600, 0o755, 0o700, 0o444, 0o1777, 0o2755, 0o000)))
            out.append(("u32", mode))
        if flags & A_TIME:
            out += [("u32", rng.choice(U32_EDGES) if extreme else rng.randrange(1 << 31)),
                    ("u32", rng.choice(U32_EDGES) if extreme else rng.randrange(1 << 31))]
        if flags & A_EXT:
            pairs = rng.choice((0, 1, 2, 3))
            declared = pairs if rng.random() < 0.7 else rng.choice((pairs + 1, 0xFFFFFFFF, 0x7FFFFFFF, 1000))
            out.append(("u32", declared))
            for _ in range(pairs):
                out += [("str", rng.choice((b"", b"vendor@example.com", b"\xff", b"x" * 300, b"a\x00b"))),
                        ("str", rng.randbytes(rng.randrange(32)))]
        return out

    def ext_args(self, ext: bytes) -> list[Field]:
        """Well-formed arguments of a known extension."""
        rng = self.rng
        if ext in (b"posix-rename@openssh.com", b"hardlink@openssh.com"):
            return [("str", self.path(write=True)), ("str", self.path(write=True))]
        if ext == b"statvfs@openssh.com":
            return [("str", self.path())]
        if ext in (b"fstatvfs@openssh.com", b"fsync@openssh.com"):
            return [("str", self.fh())]
        if ext == b"lsetstat@openssh.com":
            return [("str", self.path(write=True)), *self.attrs()]
        if ext == b"expand-path@openssh.com":
            return [("str", rng.choice((b"~", b"~/sub", b"~/../outside", b"~root/x", b"", b"sub")) if
                     rng.random() < 0.6 else self.path())]
        if ext == b"copy-data":
            return [("str", self.fh()), ("u64", self.offset()), ("u64", rng.choice((0, 1, 4096, 65536, 1 << 20))),
                    ("str", self.fh()), ("u64", self.offset())]
        if ext == b"home-directory":
            return [("str", rng.choice((b"", current_local_user().encode(), b"root", b"nobody", b"\xff")))]
        if ext == b"users-groups-by-id@openssh.com":
            n, m = rng.randrange(8), rng.randrange(8)
            ids = b"".join(_U32.pack(rng.choice((0, 1, 65534, os.getuid(), 2**32 - 1, rng.randrange(1 << 32))))
                           for _ in range(n + m))
            return [("str", ids[: 4 * n]), ("str", ids[4 * n:])]
        return []  # limits@openssh.com

    def _extended(self, ext: bytes) -> tuple[int, list[Field]]:
        return EXTENDED, [("str", ext), *self.ext_args(ext)]

    def _open(self) -> tuple[int, list[Field]]:
        rng = self.rng
        pflags = rng.choice((PF_READ, PF_READ, PF_WRITE | PF_CREAT | PF_TRUNC, PF_READ | PF_WRITE,
                             PF_WRITE | PF_APPEND, PF_WRITE | PF_CREAT | PF_EXCL, rng.randrange(64)))
        return OPEN, [("str", self.path(write=bool(pflags & (PF_WRITE | PF_CREAT)))), ("u32", pflags), *self.attrs()]

    def _close(self) -> tuple[int, list[Field]]:
        # Closing a live handle makes it stale for the rest of the session
        # (decided here, not from the reply, so the stream stays seeded).
        pools = [x for x in (self.h.files, self.h.ro_files, self.h.dirs) if x]
        if pools and self.rng.random() < 0.3:
            pool = self.rng.choice(pools)
            h = pool.pop(self.rng.randrange(len(pool)))
            self.h.stale.append(h)
            return CLOSE, [("str", h)]
        return CLOSE, [("str", self.any_handle())]

    def _read(self) -> tuple[int, list[Field]]:
        return READ, [("str", self.fh()), ("u64", self.offset()), ("u32", self.length())]

    def _write(self) -> tuple[int, list[Field]]:
        return WRITE, [("str", self.fh()), ("u64", self.offset()), ("str", self.data())]

    # -- packets ---------------------------------------------------------------------------
    def next_rid(self) -> int:
        """Sequential request ids, with reuse mixed in (0, 0xFFFFFFFF, the previous id)."""
        self.rid = (self.rid + 1) & 0xFFFFFFFF
        r = self.rng.random()
        rid = self.rid
        if r < 0.03:
            rid = self.last_rid
        elif r < 0.05:
            rid = self.rng.choice((0, 0xFFFFFFFF, 0x7FFFFFFF))
        self.last_rid = rid
        return rid

    def body(self, t: int, fields: list[Field]) -> bytes:
        return bytes((t,)) + _U32.pack(self.next_rid()) + encode(fields)

    def request(self, name: str | None = None) -> tuple[str, int, list[Field]]:
        name = name or self.rng.choice(self.valid_names)
        t, fields = self._valid[name]()
        return name, t, fields

    def next(self) -> Packet:
        """The next packet of this session."""
        _, maker = self.rng.choices(self._makers, self._weights)[0]
        return maker()

    def make_valid(self) -> Packet:
        name, t, fields = self.request()
        body = self.body(t, fields)
        self.recent = [*self.recent, body][-16:]
        return frame_body(f"valid:{name}", body)

    def make_mutated(self) -> Packet:
        rng = self.rng
        name, t, fields = self.request()
        body = bytearray(self.body(t, fields))
        ops = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            op = rng.choice(("flip", "byte", "u32", "u64", "cut", "extend", "splice", "insert", "delete", "repeat",
                             "field"))
            ops.append(op)
            # Most mutations spare the type and request id so the session goes on.
            lo = 0 if rng.random() < 0.15 else min(5, len(body))
            if op == "field":
                body = bytearray(self._mutate_field(t, fields))
                continue
            if len(body) <= lo:
                body += rng.randbytes(4)
            at = rng.randrange(lo, len(body))
            if op == "flip":
                for _ in range(rng.randrange(1, 9)):
                    i = rng.randrange(lo, len(body))
                    body[i] ^= 1 << rng.randrange(8)
            elif op == "byte":
                body[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0x2F, 0x2E))
            elif op == "u32":
                body[at:at + 4] = _U32.pack(rng.choice(U32_EDGES))
            elif op == "u64":
                body[at:at + 8] = _U64.pack(rng.choice(U64_EDGES))
            elif op == "cut":
                del body[max(at, 1 if lo == 0 else lo):]
            elif op == "extend":
                body += rng.randbytes(rng.randrange(1, 64))
            elif op == "splice" and self.recent:
                other = rng.choice(self.recent)
                body = body[:at] + other[rng.randrange(len(other)):]
            elif op == "insert":
                body[at:at] = rng.randbytes(rng.randrange(1, 16))
            elif op == "delete":
                del body[at:at + rng.randrange(1, 16)]
            elif op == "repeat":
                body[at:at] = body[at:at + rng.randrange(1, 32)]
        return frame_body(f"mutated:{'+'.join(ops)}:{name}", bytes(body))

    def _mutate_field(self, t: int, fields: list[Field]) -> bytes:
        """Corrupt one field: a string's length prefix lies, or the packet ends inside the field."""
        rng = self.rng
        head = bytes((t,)) + _U32.pack(self.last_rid)
        if not fields:
            return head + rng.randbytes(rng.randrange(8))
        i = rng.randrange(len(fields))
        before, (kind, value), after = encode(fields[:i]), fields[i], encode(fields[i + 1:])
        whole = encode([(kind, value)])
        if kind == "str" and rng.random() < 0.5:
            lie = rng.choice((*LENGTH_LIES, len(value) + 1, len(value) + len(after) + 1, max(len(value) - 1, 0)))
            return head + before + _U32.pack(lie) + value + after
        if kind in ("u32", "u64") and rng.random() < 0.5:
            edge = rng.choice(U64_EDGES if kind == "u64" else U32_EDGES)
            return head + before + encode([(kind, edge)]) + after
        return head + before + whole[: rng.randrange(len(whole) or 1)]  # truncated inside this field

    def make_any_type(self) -> Packet:
        """Every type byte in turn (0..255), with empty, garbage or another request's payload."""
        t = self.type_cursor
        self.type_cursor = (self.type_cursor + 1) % 256
        r = self.rng.random()
        if r < 0.4:
            payload = self.rng.randbytes(self.rng.randrange(17))
        elif r < 0.7:
            payload = encode(self.request()[2])
        else:
            payload = self.rng.randbytes(self.rng.randrange(300))
        return frame_body(f"type:{t}", bytes((t,)) + _U32.pack(self.next_rid()) + payload)

    def make_bad_handle(self) -> Packet:
        rng = self.rng
        pools = {"stale": self.h.stale, "foreign": self.h.foreign, "dir-as-file": self.h.dirs,
                 "file-as-dir": self.h.files + self.h.ro_files}
        which = rng.choice(["fabricated", *[k for k, v in pools.items() if v]])
        h = self.h.fabricated(rng) if which == "fabricated" else rng.choice(pools[which])
        op = rng.choice(("CLOSE", "READ", "WRITE", "FSTAT", "FSETSTAT", "READDIR", "fsync", "fstatvfs", "copy-src",
                         "copy-dst"))
        table: dict[str, tuple[int, list[Field]]] = {
            "CLOSE": (CLOSE, [("str", h)]),
            "READ": (READ, [("str", h), ("u64", self.offset()), ("u32", self.length())]),
            "WRITE": (WRITE, [("str", h), ("u64", self.offset()), ("str", self.data())]),
            "FSTAT": (FSTAT, [("str", h)]),
            "FSETSTAT": (FSETSTAT, [("str", h), *self.attrs()]),
            "READDIR": (READDIR, [("str", h)]),
            "fsync": (EXTENDED, [("str", b"fsync@openssh.com"), ("str", h)]),
            "fstatvfs": (EXTENDED, [("str", b"fstatvfs@openssh.com"), ("str", h)]),
            "copy-src": (EXTENDED, [("str", b"copy-data"), ("str", h), ("u64", 0), ("u64", 4096), ("str", self.fh()),
                                    ("u64", 0)]),
            "copy-dst": (EXTENDED, [("str", b"copy-data"), ("str", self.fh()), ("u64", 0), ("u64", 4096), ("str", h),
                                    ("u64", 0)]),
        }
        t, fields = table[op]
        return frame_body(f"handle:{which}:{op}", self.body(t, fields))

    def make_attrs(self) -> Packet:
        """ATTRS with every flag combination in turn (the four, extended, unknown bits), extreme values."""
        c = self.attr_cursor
        self.attr_cursor = (self.attr_cursor + 1) % (32 * len(A_UNKNOWN_BITS))
        known = c % 32
        flags = (known & 0xF) | (A_EXT if known & 0x10 else 0) | A_UNKNOWN_BITS[c // 32]
        attrs = self.attrs(flags, extreme=self.rng.random() < 0.7)
        op = self.rng.choice(("SETSTAT", "FSETSTAT", "MKDIR", "OPEN", "lsetstat"))
        table: dict[str, tuple[int, list[Field]]] = {
            "SETSTAT": (SETSTAT, [("str", self.path(write=True)), *attrs]),
            "FSETSTAT": (FSETSTAT, [("str", self.fh()), *attrs]),
            "MKDIR": (MKDIR, [("str", self.path(write=True)), *attrs]),
            "OPEN": (OPEN, [("str", self.path(write=True)), ("u32", PF_WRITE | PF_CREAT), *attrs]),
            "lsetstat": (EXTENDED, [("str", b"lsetstat@openssh.com"), ("str", self.path(write=True)), *attrs]),
        }
        t, fields = table[op]
        return frame_body(f"attrs:{flags:#x}:{op}", self.body(t, fields))

    def make_hostile_path(self) -> Packet:
        """A path (or two) from the hostile and weird pools, in any path request."""
        rng = self.rng
        bad = rng.choice(self.p.hostile + self.p.weird + self.p.ro_paths)
        inside = rng.choice(self.p.good + self.p.new)
        op = rng.choice(("STAT", "LSTAT", "OPEN-r", "OPEN-w", "OPENDIR", "REMOVE", "RMDIR", "MKDIR", "SETSTAT",
                         "RENAME-out", "RENAME-in", "READLINK", "REALPATH", "SYMLINK-out", "SYMLINK-at",
                         "hardlink-in", "hardlink-out", "posix-rename", "statvfs", "lsetstat", "expand-path"))
        attrs = self.attrs()
        table: dict[str, tuple[int, list[Field]]] = {
            "STAT": (STAT, [("str", bad)]), "LSTAT": (LSTAT, [("str", bad)]),
            "OPEN-r": (OPEN, [("str", bad), ("u32", PF_READ), ("u32", 0)]),
            "OPEN-w": (OPEN, [("str", bad), ("u32", rng.choice((PF_WRITE | PF_CREAT | PF_TRUNC, PF_WRITE | PF_APPEND,
                                                                 PF_TRUNC, PF_CREAT))), ("u32", 0)]),
            "OPENDIR": (OPENDIR, [("str", bad)]), "REMOVE": (REMOVE, [("str", bad)]),
            "RMDIR": (RMDIR, [("str", bad)]), "MKDIR": (MKDIR, [("str", bad), *attrs]),
            "SETSTAT": (SETSTAT, [("str", bad), *attrs]),
            "RENAME-out": (RENAME, [("str", inside), ("str", bad)]),
            "RENAME-in": (RENAME, [("str", bad), ("str", inside)]),
            "READLINK": (READLINK, [("str", bad)]), "REALPATH": (REALPATH, [("str", bad)]),
            "SYMLINK-out": (SYMLINK, [("str", bad), ("str", inside)]),
            "SYMLINK-at": (SYMLINK, [("str", b"hello.txt"), ("str", bad)]),
            "hardlink-in": (EXTENDED, [("str", b"hardlink@openssh.com"), ("str", bad), ("str", inside)]),
            "hardlink-out": (EXTENDED, [("str", b"hardlink@openssh.com"), ("str", inside), ("str", bad)]),
            "posix-rename": (EXTENDED, [("str", b"posix-rename@openssh.com"), ("str", bad), ("str", inside)]),
            "statvfs": (EXTENDED, [("str", b"statvfs@openssh.com"), ("str", bad)]),
            "lsetstat": (EXTENDED, [("str", b"lsetstat@openssh.com"), ("str", bad), *attrs]),
            "expand-path": (EXTENDED, [("str", b"expand-path@openssh.com"), ("str", bad)]),
        }
        t, fields = table[op]
        p = frame_body(f"path:{op}", self.body(t, fields))
        # A relative symlink target is read from the link's directory, which may be below the home.
        p.must_fail = bad in self.p.outside and (op != "SYMLINK-out" or bad.startswith(b"/"))
        return p

    def make_extension(self) -> Packet:
        """Known extensions with garbage arguments, unknown names with anything."""
        rng = self.rng
        if rng.random() < 0.6:
            name = rng.choice(KNOWN_EXTENSIONS)
            args = encode(self.ext_args(name))
            r = rng.random()
            if r < 0.3:
                args = rng.randbytes(rng.randrange(40))
            elif r < 0.6 and args:
                args = args[: rng.randrange(len(args))]
            elif r < 0.8:
                args += rng.randbytes(rng.randrange(1, 40))
            kind = "known"
        else:
            name = rng.choice(UNKNOWN_EXTENSIONS)
            args = rng.randbytes(rng.randrange(64)) if rng.random() < 0.5 else encode(self.request()[2])
            kind = "unknown"
        return frame_body(f"ext:{kind}:{name[:32]!r}", self.body(EXTENDED, [("str", name), ("raw", args)]))

    def make_numbers(self) -> Packet:
        """Offsets and lengths at the edges of 31, 32, 63 and 64 bits."""
        rng = self.rng
        e64 = lambda: rng.choice(U64_EDGES)  # noqa: E731
        op = rng.choice(("READ", "WRITE", "copy-data", "SETSTAT", "FSETSTAT", "READ-len"))
        table: dict[str, tuple[int, list[Field]]] = {
            "READ": (READ, [("str", self.fh()), ("u64", e64()), ("u32", self.length())]),
            "READ-len": (READ, [("str", self.fh()), ("u64", 0), ("u32", rng.choice(U32_EDGES))]),
            "WRITE": (WRITE, [("str", self.fh()), ("u64", e64()), ("str", rng.randbytes(rng.choice((0, 1, 100))))]),
            "copy-data": (EXTENDED, [("str", b"copy-data"), ("str", self.fh()), ("u64", e64()),
                                     ("u64", e64()), ("str", self.fh()), ("u64", e64())]),
            "SETSTAT": (SETSTAT, [("str", self.path(write=True)), ("u32", A_SIZE), ("u64", e64())]),
            "FSETSTAT": (FSETSTAT, [("str", self.fh()), ("u32", A_SIZE), ("u64", e64())]),
        }
        t, fields = table[op]
        return frame_body(f"numbers:{op}", self.body(t, fields))

    def make_length_lie(self) -> Packet:
        """A string's declared length beyond the packet, or the packet cut inside a field."""
        name, t, fields = self.request()
        self.next_rid()
        return frame_body(f"lie:{name}", self._mutate_field(t, fields))

    def make_at_limit(self) -> Packet:
        """A packet of exactly the engine's limit (it must be served)."""
        rng = self.rng
        rid = self.next_rid()
        room = MAX_PACKET_LENGTH - 5
        op = rng.choice(("WRITE", "WRITE", "garbage", "STAT", "users-groups"))
        if op == "WRITE":
            h = self.fh()
            fields: list[Field] = [("str", h), ("u64", self.offset())]
            payload = encode(fields) + _s(rng.randbytes(room - len(encode(fields)) - 4))
            t = WRITE
        elif op == "STAT":
            t, payload = STAT, _s((b"a/" * room)[: room - 4])
        elif op == "users-groups":
            name = b"users-groups-by-id@openssh.com"
            n = (room - 4 - len(name) - 8) // 4
            ids = b"".join(_U32.pack(rng.randrange(1 << 32)) for _ in range(n))
            t, payload = EXTENDED, _s(name) + _s(ids[: 4 * (n // 2)]) + _s(ids[4 * (n // 2):])
        else:
            t = rng.randrange(256)
            payload = rng.randbytes(room)
        # Trailing bytes after the last field are ignored by the engine, as by OpenSSH.
        body = bytes((t,)) + _U32.pack(rid) + payload + bytes(room - len(payload))
        return frame_body(f"limit:{op}", body)

    def session_end(self) -> Packet:
        """A framing error that ends the session (the server must close)."""
        rng = self.rng
        name, t, fields = self.request()
        body = self.body(t, fields)
        op = rng.choice(("longer", "partial-header", "too-large", "zero", "no-id"))
        if op == "longer":
            frame = _U32.pack(len(body) + rng.choice((1, 4, 1000, MAX_PACKET_LENGTH - len(body)))) + body
            return Packet(f"end:{op}:{name}", frame, "eof", reason="EOF inside a packet")
        if op == "partial-header":
            return Packet(f"end:{op}", _U32.pack(len(body))[: rng.randrange(1, 4)], "eof",
                          reason="EOF inside a length")
        if op == "too-large":
            declared = rng.choice(TOO_LARGE)
            return Packet(f"end:{op}:{declared:#x}", _U32.pack(declared) + body[: rng.randrange(65)], "close",
                          reason="packet too large")
        if op == "zero":
            return Packet(f"end:{op}", _U32.pack(0), "close", reason="empty packet")
        n = rng.randrange(1, 5)
        return Packet(f"end:{op}", _U32.pack(n) + body[:n], "close", reason="no request id")

    def init(self) -> Packet:
        """The session's first packet: INIT version 3 mostly; odd versions, payloads and wrong types too."""
        rng = self.rng
        r = rng.random()
        if r < 0.95:
            return Packet("init", _U32.pack(5) + bytes((INIT,)) + _U32.pack(3), "version")
        if r < 0.975:
            version = rng.choice((0, 1, 2, 4, 5, 6, 0xFFFFFFFF))
            extra = rng.choice((b"", _s(b"foo@example.com") + _s(b"1"), rng.randbytes(rng.randrange(32))))
            body = bytes((INIT,)) + _U32.pack(version)[: rng.choice((0, 2, 4, 4))] + extra
            return Packet(f"init:v{version}", _U32.pack(len(body)) + body, "version")
        t = rng.choice([x for x in range(256) if x != INIT])
        body = bytes((t,)) + _U32.pack(3) + rng.randbytes(rng.randrange(16))
        return Packet(f"init:type{t}", _U32.pack(len(body)) + body, "close", reason="not INIT")


# -- the observers --------------------------------------------------------------------------
class Watch(logging.Handler):
    """Collects crashes: thread exceptions, unraisable exceptions, ERROR log lines; and close reasons."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread_crashes: list[str] = []
        self.errors: list[str] = []
        self.client_errors: list[str] = []
        self.close_reasons: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._old_excepthook: Any = None
        self._old_unraisable: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        with self._lock:
            if record.levelno >= logging.ERROR:
                line = f"{record.name} [{record.threadName}] {msg[:400]}"
                if (record.threadName or "").startswith(CLIENT_THREAD_PREFIX):
                    self.client_errors.append(line)
                else:
                    self.errors.append(line)
            elif "closing sFTP session" in msg:
                why = msg.rsplit(": ", 1)[-1]
                self.close_reasons["".join(c for c in why if not c.isdigit())[:60]] += 1
            elif record.name.startswith("x2go_sftp"):
                self.warnings["".join(c for c in msg if not c.isdigit())[:70]] += 1

    def _excepthook(self, args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        with self._lock:
            self.thread_crashes.append(f"thread {name}: {text[-1500:]}")

    def _unraisable(self, args: Any) -> None:
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        with self._lock:
            self.thread_crashes.append(f"unraisable in {args.object!r}: {text[-1500:]}")

    def __enter__(self) -> Watch:
        for name in ("x2go_sftp", "paramiko"):
            logging.getLogger(name).addHandler(self)
        self._old_excepthook, threading.excepthook = threading.excepthook, self._excepthook
        self._old_unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in ("x2go_sftp", "paramiko"):
            logging.getLogger(name).removeHandler(self)
        threading.excepthook = self._old_excepthook
        sys.unraisablehook = self._old_unraisable


@dataclass
class Resources:
    """What the whole process holds."""

    rss: int
    threads: int
    fds: int

    @classmethod
    def now(cls, trim: bool = False) -> Resources:
        """Current figures; ``trim``: first hand glibc's free memory back (see :func:`_malloc_trim`)."""
        if trim:
            _malloc_trim()
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return cls(rss, threading.active_count(), len(_fds()))


def _malloc_trim() -> None:
    """Return free heap memory of every glibc arena to the system, so RSS shows what is live.

    Each thread that mallocs gets an arena (up to 8 per core); freed blocks stay
    in it, so RSS after many short-lived server threads overstates what is held
    by tens of MiB.  Only the measurement calls this; the run itself is untouched.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor
    return out


# -- the client side -----------------------------------------------------------------------
class Closed(Exception):
    """The server closed the session (EOF on the channel)."""


class Hang(Exception):
    """No reply and no close within HANG_DEADLINE."""


class Wire:
    """Replies on one channel: framed, and scanned for the outside secret."""

    def __init__(self, chan: paramiko.Channel):
        self.chan = chan
        self.buf = bytearray()
        self.pos = 0
        self.secret_seen = False
        self._tail = b""

    def reply(self) -> tuple[int, bytes]:
        """The next reply (type, body after the type).  Raises Closed or Hang."""
        while True:
            have = len(self.buf) - self.pos
            if have >= 4:
                (n,) = _U32.unpack_from(self.buf, self.pos)
                if n == 0:
                    self.pos += 4
                    return -1, b""  # an empty reply: reported as an anomaly
                if have >= 4 + n:
                    start = self.pos + 4
                    t, body = self.buf[start], bytes(self.buf[start + 1:start + n])
                    self.pos = start + n
                    if self.pos > 1 << 20:
                        del self.buf[:self.pos]
                        self.pos = 0
                    return t, body
            try:
                chunk = self.chan.recv(1 << 20)
            except TimeoutError as e:
                raise Hang() from e
            if not chunk:
                raise Closed()
            if SECRET in self._tail + chunk[: len(SECRET)] or SECRET in chunk:
                self.secret_seen = True
            self._tail = chunk[-(len(SECRET) - 1):]
            self.buf += chunk


@dataclass
class Report:
    """Everything a run counted."""

    seed: int
    packets_wanted: int
    batch: int
    packets: int = 0  # fuzzed packets sent
    answered: int = 0
    setup_requests: int = 0
    sessions: int = 0
    connections: int = 0
    reconnects: int = 0
    batches: int = 0
    seconds: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    types_sent: set[int] = field(default_factory=set)
    replies: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    expected_closes: Counter[str] = field(default_factory=Counter)
    unexpected_closes: list[str] = field(default_factory=list)
    internal_errors: list[str] = field(default_factory=list)
    internal_error_kinds: Counter[str] = field(default_factory=Counter)
    hangs: list[str] = field(default_factory=list)
    escapes: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    connections_lost: list[str] = field(default_factory=list)
    secret_leaks: int = 0
    fresh_failures: list[str] = field(default_factory=list)
    foreign_failures: list[str] = field(default_factory=list)
    outside_changes: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    thread_crashes: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    client_error_lines: list[str] = field(default_factory=list)
    close_reasons: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    baseline: Resources | None = None
    peak: Resources | None = None
    final: Resources | None = None
    digest: str = ""
    commit: str = ""
    cipher: str = ""  # negotiated on the inner connection (AES-GCM: the engine reads through fastpath)

    @property
    def crashes(self) -> int:
        return len(self.thread_crashes) + len(self.error_lines)

    def failures(self) -> list[str]:
        """Every finding that makes the run fail, one line each."""
        out = []
        for name in ("escapes", "unexpected_closes", "internal_errors", "hangs", "anomalies", "connections_lost",
                     "fresh_failures", "foreign_failures", "outside_changes", "leaks", "thread_crashes",
                     "error_lines"):
            items = getattr(self, name)
            if items:
                out.append(f"{name}: {len(items)}, first: {items[0][:300]}")
        if self.secret_leaks:
            out.append(f"secret in replies: {self.secret_leaks} sessions")
        return out

    def summary(self) -> str:
        mib = 1024 * 1024
        rate = self.packets / self.seconds if self.seconds else 0.0
        lines = [
            f"x2go-sftp fuzz: seed {self.seed}, {self.packets_wanted} packets wanted, batch {self.batch}, "
            f"commit {self.commit or '?'}, paramiko {paramiko.__version__}, python {sys.version.split()[0]}, "
            f"inner cipher {self.cipher or '?'}",
            f"packets: {self.packets} fuzzed + {self.setup_requests} setup requests, {self.answered} answered; "
            f"{self.sessions} sessions on {self.connections} connections ({self.reconnects} reconnects), "
            f"{self.batches} batches; {self.seconds:.1f} s, {rate:.0f} packets/s",
            f"type bytes sent: {len(self.types_sent)}/256",
            "by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items())),
            "replies: " + ", ".join(f"{k} {v}" for k, v in sorted(self.replies.items())),
            "statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())),
            f"closes (protocol violations, expected): {sum(self.expected_closes.values())} "
            + str(dict(sorted(self.expected_closes.items()))),
            "  server's reasons: " + str(dict(sorted(self.close_reasons.items()))),
            f"unexpected closes: {len(self.unexpected_closes)}",
            f"internal errors: {len(self.internal_errors)} "
            + str(dict(self.internal_error_kinds.most_common(20))),
            f"crashes: {self.crashes} ({len(self.thread_crashes)} thread exceptions, "
            f"{len(self.error_lines)} ERROR log lines; client side: {len(self.client_error_lines)})",
            f"hangs: {len(self.hangs)}",
            f"anomalies (reply id/type/order): {len(self.anomalies)}; connections lost: {len(self.connections_lost)}",
            f"escapes (a request on a place outside that succeeded): {len(self.escapes)}; "
            f"secret bytes in replies: {self.secret_leaks}; fresh-session failures: {len(self.fresh_failures)}; "
            f"other-session failures: {len(self.foreign_failures)}; outside changes: {len(self.outside_changes)}",
            f"leaks: {len(self.leaks)}",
        ]
        if self.baseline and self.peak and self.final:
            b, p, f = self.baseline, self.peak, self.final
            lines.append(f"RSS MiB baseline {b.rss / mib:.1f}, max {p.rss / mib:.1f}, final {f.rss / mib:.1f}; "
                         f"threads {b.threads}/{p.threads}/{f.threads}; fds {b.fds}/{p.fds}/{f.fds} "
                         f"(baseline/max/final)")
        if self.warnings:
            lines.append("library warnings: " + str(dict(self.warnings.most_common(10))))
        lines.append(f"stream digest (seed + handles -> bytes): {self.digest}")
        for name in ("escapes", "internal_errors", "unexpected_closes", "hangs", "anomalies", "connections_lost",
                     "thread_crashes", "error_lines", "client_error_lines", "leaks", "outside_changes",
                     "fresh_failures", "foreign_failures"):
            for item in getattr(self, name)[:8]:
                lines.append(f"  {name}: {item[:600]}")
        failures = self.failures()
        lines.append("verdict: " + ("FAIL" if failures else "OK"))
        return "\n".join(lines)


class Session:
    """One SFTP session on a raw channel (INIT done by :meth:`start`)."""

    def __init__(self, transport: paramiko.Transport, deadline: float = HANG_DEADLINE):
        self.chan = transport.open_session(timeout=deadline)
        self.chan.settimeout(deadline)
        self.chan.invoke_subsystem("sftp")
        self.wire = Wire(self.chan)
        self.rid = 0x40000000  # setup ids, apart from the generator's

    def send(self, data: bytes) -> None:
        self.chan.sendall(data)

    def call(self, t: int, payload: bytes) -> tuple[int, bytes]:
        """A synchronous request; returns the reply's type and body after the id."""
        self.rid += 1
        body = bytes((t,)) + _U32.pack(self.rid) + payload
        self.chan.sendall(_U32.pack(len(body)) + body)
        rt, rbody = self.wire.reply()
        if len(rbody) < 4 or _U32.unpack_from(rbody)[0] != self.rid:
            raise AssertionError(f"reply to request {self.rid} carries {rbody[:4].hex()}")
        return rt, rbody[4:]

    def handle(self, t: int, payload: bytes) -> bytes | None:
        rt, body = self.call(t, payload)
        if rt == HANDLE:
            (n,) = _U32.unpack_from(body)
            return body[4:4 + n]
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.close()


# -- the rig ----------------------------------------------------------------------------------
def _make_writable(top: Path) -> None:
    """Give every directory under ``top`` (never through a symlink) its owner's rwx back."""
    if not top.is_symlink() and top.is_dir():
        os.chmod(top, 0o755)
    for root, dirs, _ in os.walk(top, followlinks=False):
        for d in dirs:
            p = os.path.join(root, d)
            if stat_mod.S_ISDIR(os.lstat(p).st_mode):
                os.chmod(p, 0o755)


def fill_export(export: Path, base: Path, ro: Path) -> None:
    """Empty the writable export and lay out the corpus every batch starts from."""
    _make_writable(export)
    for entry in os.scandir(export):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    (export / "hello.txt").write_text("hello\n")
    (export / "sub" / "deeper").mkdir(parents=True)
    (export / "sub" / "inside.txt").write_text("inside\n")
    (export / "data.bin").write_bytes(bytes(range(256)) * 256)
    (export / "dir").mkdir()
    for i in range(LISTING_ENTRIES):
        (export / "dir" / f"f{i}").write_bytes(b"%d\n" % i)
    os.mkfifo(export / "fifo")
    links = {"out": "../outside", "abs": str(base / "outside" / "secret.txt"), "up": "..", "loop": "loop",
             "in": "hello.txt", "rolink": str(ro), "dangling": "nowhere", "sub/up2": "../..",
             "chain": "c1", "c1": "c2", "c2": "sub/inside.txt"}
    for at, target in links.items():
        os.symlink(target, export / at)


class Rig:
    """The sandbox, the in-process X2Go server, python-x2go's connection and our tunnel."""

    def __init__(self, base: Path, deadline: float = HANG_DEADLINE):
        self.base = base
        self.deadline = deadline
        self.exports = Exports()
        self.sandbox = Sandbox(base, self.exports)
        fill_export(self.sandbox.export, base, self.sandbox.ro)
        self.places = Places.for_sandbox(str(base).encode(), str(self.sandbox.export).encode(),
                                         str(self.sandbox.ro).encode())
        self.key = paramiko.RSAKey.generate(2048)
        self.user = current_local_user()
        self.server = LoopbackX2GoServer()
        self.outer = self.server.connect()
        self.tunnel = X2GoRevFwTunnelToSFTP(0, self.outer, auth_key=self.key, exports=self.exports)
        self.tunnel.start()
        if not self.tunnel.wait_ready(30):
            self.close()
            raise RuntimeError("the tunnel did not become ready")
        self._n = 0

    def connect(self) -> paramiko.Transport:
        """A client connection logged in with the session key."""
        sock = socket.create_connection(("127.0.0.1", self.tunnel.server_port), timeout=self.deadline)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = ClientTransport(sock)
        self._n += 1
        transport.name = f"{CLIENT_THREAD_PREFIX}-{self._n}"
        try:
            transport.start_client(timeout=self.deadline)
            transport.auth_publickey(self.user, self.key)
        except BaseException:
            transport.close()
            raise
        return transport

    def close(self) -> None:
        self.tunnel.stop_thread()
        self.tunnel.join(10)
        self.outer.close()
        self.server.close()


def _join_new(threads: set[int | None], deadline: float) -> None:
    """Join every thread not in ``threads`` (by ident), up to ``deadline``."""
    for t in threading.enumerate():
        if t.ident not in threads and t is not threading.current_thread():
            t.join(max(deadline - time.monotonic(), 0))


def _close_transport(t: paramiko.Transport | None) -> None:
    if t is None:
        return
    t.close()
    if t.ident is not None and t is not threading.current_thread():
        t.join(10)


# -- the driver -----------------------------------------------------------------------------------
class Fuzzer:
    """Runs batches of sessions of fuzzed packets and checks the server after each batch.

    Args:
        seed: chooses every packet (with the session's number).
        packets: fuzzed packets to send in all.
        batch: packets between two rounds of checks.
        workdir: an empty directory for the sandbox (default: a temporary one, removed after).
        progress: called with one line after each batch.
        trace: a text file that gets one line per packet and its reply.
        hang_deadline: seconds a request may go without a reply or a close.
        settle_deadline: seconds the threads have to end after a batch.
    """

    def __init__(self, seed: int, packets: int, batch: int = DEFAULT_BATCH, workdir: str | None = None,
                 progress: Callable[[str], None] | None = None, trace: Any = None,
                 hang_deadline: float = HANG_DEADLINE, settle_deadline: float = SETTLE_DEADLINE):
        self.seed = seed
        self.report = Report(seed, packets, batch)
        self.workdir = workdir
        self.progress = progress or (lambda line: None)
        self.trace = trace
        self.hang_deadline = hang_deadline
        self.settle_deadline = settle_deadline
        self._digest = hashlib.sha256()
        self._session_no = 0
        self._stale: list[bytes] = []
        self._type_cursor = 0
        self._attr_cursor = 0

    # -- one session ---------------------------------------------------------------------------
    def _setup(self, s: Session, g: Generator) -> None:
        """Open the handles the session's fuzz starts from (synchronously, so they are known)."""
        rep = self.report
        for path, pflags, pool in ((b"data.bin", PF_READ | PF_WRITE, g.h.files),
                                   (b"hello.txt", PF_READ, g.h.files),
                                   (b"w%d" % g.rng.randrange(4), PF_READ | PF_WRITE | PF_CREAT, g.h.files),
                                   (self.rig.places.ro + b"/ro.txt", PF_READ, g.h.ro_files)):
            h = s.handle(OPEN, _s(path) + _U32.pack(pflags) + _U32.pack(0))
            rep.setup_requests += 1
            if h is not None:
                pool.append(h)
        for path in (b".", b"dir", self.rig.places.ro):
            h = s.handle(OPENDIR, _s(path))
            rep.setup_requests += 1
            if h is not None:
                g.h.dirs.append(h)
        self._digest.update(b"|".join(g.h.files + g.h.ro_files + g.h.dirs))
        if self.trace is not None:
            self.trace.write(f"session {self._session_no - 1} handles {g.h!r}\n")

    def _check_reply(self, p: Packet, t: int, body: bytes) -> None:
        rep = self.report
        if self.trace is not None:
            self.trace.write(f"{p.frame[:200].hex()} {p.kind} -> {t} {body[:80].hex()}\n")
        rep.answered += 1
        rep.replies[TYPE_NAMES.get(t, str(t))] += 1
        if t not in REPLY_TYPES:
            rep.anomalies.append(f"reply type {t} to {p.describe()}")
        if p.must_fail and (t != STATUS or body[4:8] == b"\0\0\0\0"):
            rep.escapes.append(f"{TYPE_NAMES.get(t, t)} {body[:64].hex()} to {p.describe(200)}")
        if len(body) < 4 or _U32.unpack_from(body)[0] != p.rid:
            rep.anomalies.append(f"reply id {body[:4].hex()} (want {p.rid}) to {p.describe()}")
            return
        if t == STATUS:
            if len(body) < 12:
                rep.anomalies.append(f"short STATUS {body.hex()} to {p.describe()}")
                return
            (code,) = _U32.unpack_from(body, 4)
            (n,) = _U32.unpack_from(body, 8)
            text = body[12:12 + n].decode("utf-8", "replace")
            rep.statuses[STATUS_NAMES.get(code, str(code))] += 1
            if code == SSH_FX_FAILURE and text == INTERNAL_ERROR_TEXT:
                rep.internal_errors.append(p.describe(96))
                kind = p.kind.split(":")
                rep.internal_error_kinds[f"{kind[0]}:{kind[-1]} {TYPE_NAMES.get(p.type_byte or -1, p.type_byte)}"] += 1

    def _exchange(self, s: Session, chunk: list[Packet]) -> bool:
        """Send a chunk, read what the server must answer; False once the session is over."""
        rep = self.report
        for p in chunk:
            self._digest.update(p.frame)
            rep.kinds[p.kind.split(":")[0]] += 1
            if p.type_byte is not None:
                rep.types_sent.add(p.type_byte)
        rep.packets += len(chunk)
        try:
            s.send(b"".join(p.frame for p in chunk))
            if chunk[-1].expect == "eof":
                s.chan.shutdown_write()
        except TimeoutError:
            rep.hangs.append(f"send blocked {self.hang_deadline}s; first of chunk: {chunk[0].describe()}")
            return False
        except (OSError, EOFError):
            pass  # the server closed while we sent: the replies below tell where
        for i, p in enumerate(chunk):
            try:
                if p.expect in ("close", "eof"):
                    try:
                        t, body = s.wire.reply()
                    except Closed:
                        rep.expected_closes[p.reason] += 1
                        return False
                    rep.anomalies.append(f"reply {t} instead of a close after {p.describe()}")
                    return False
                t, body = s.wire.reply()
            except Closed:
                rep.unexpected_closes.append(p.describe(96))
                return False
            except Hang:
                # The engine holds replies while requests wait in its buffer, so
                # the request that hangs is any of those still unanswered.
                rest = chunk[i:]
                rep.hangs.append(f"no reply or close within {self.hang_deadline:.0f} s; {len(rest)} unanswered: "
                                 + "; ".join(q.describe(64) for q in rest[:12]))
                return False
            self._check_reply(p, t, body)
        return True

    def _session(self, conn: paramiko.Transport, budget: int, foreign: list[bytes]) -> int:
        """One session of at most ``budget`` fuzzed packets; returns how many were sent."""
        rep = self.report
        rng = random.Random(f"{self.seed}/{self._session_no}")
        self._session_no += 1
        g = Generator(rng, self.rig.places, Handles(stale=list(self._stale[-32:]), foreign=list(foreign)),
                      self._type_cursor, self._attr_cursor)
        s = Session(conn, self.hang_deadline)
        rep.sessions += 1
        sent = 0
        try:
            first = g.init()
            self._digest.update(first.frame)
            s.send(first.frame)
            try:
                t, body = s.wire.reply()
            except Closed:
                if first.expect == "close":
                    rep.expected_closes[first.reason] += 1
                else:
                    rep.unexpected_closes.append(first.describe())
                return 0
            except Hang:
                rep.hangs.append(first.describe())
                return 0
            if first.expect != "version" or t != VERSION or body[:4] != _U32.pack(3):
                rep.anomalies.append(f"INIT answered with {t} {body[:8].hex()}: {first.describe()}")
                return 0
            try:
                self._setup(s, g)
            except Closed:
                rep.unexpected_closes.append("a well-formed setup request (OPEN/OPENDIR)")
                return 0
            except Hang:
                rep.hangs.append("a well-formed setup request (OPEN/OPENDIR)")
                return 0
            n = rng.randrange(1, min(budget, MAX_SESSION_PACKETS) + 1)
            end_with_violation = rng.random() < 0.2
            chunk: list[Packet] = []
            size = 0
            while sent < n:
                p = g.next() if sent < n - 1 or not end_with_violation else g.session_end()
                sent += 1
                chunk.append(p)
                size += len(p.frame)
                if p.expect != "reply" or len(chunk) >= CHUNK_PACKETS or size >= CHUNK_BYTES or sent >= n:
                    if not self._exchange(s, chunk):
                        return sent
                    chunk, size = [], 0
            return sent
        finally:
            if s.wire.secret_seen:
                rep.secret_leaks += 1
            self._stale = (self._stale + g.h.files + g.h.ro_files + g.h.dirs + g.h.stale)[-64:]
            self._type_cursor, self._attr_cursor = g.type_cursor, g.attr_cursor
            s.close()

    # -- one batch -------------------------------------------------------------------------------
    def _foreign(self, conn: paramiko.Transport) -> tuple[Session, list[bytes]]:
        """Another session, open during the whole batch; its handles are foreign to the fuzzed ones.

        On the freshly filled export it first tries the planted links pointing
        out (:attr:`Places.escapes`): each must fail; a handle got anyway is
        read, so that its bytes pass the secret scan.
        """
        s = Session(conn, self.hang_deadline)
        s.send(_U32.pack(5) + bytes((INIT,)) + _U32.pack(3))
        s.wire.reply()
        for t, payload in self.rig.places.escapes:
            rt, body = s.call(t, payload)
            if rt != STATUS or body[:4] == b"\0\0\0\0":
                self.report.escapes.append(f"probe {TYPE_NAMES[t]} {payload[:80]!r} answered "
                                           f"{TYPE_NAMES.get(rt, rt)} {body[:64].hex()}")
                if rt == HANDLE:
                    handle = body[4:4 + _U32.unpack_from(body)[0]]
                    s.call(READ if t == OPEN else READDIR, _s(handle) + (_U64.pack(0) + _U32.pack(4096)
                                                                          if t == OPEN else b""))
                    s.call(CLOSE, _s(handle))
        if s.wire.secret_seen:
            self.report.secret_leaks += 1
        handles = [h for h in (s.handle(OPEN, _s(b"hello.txt") + _U32.pack(PF_READ) + _U32.pack(0)),
                               s.handle(OPENDIR, _s(b"sub")),
                               s.handle(OPEN, _s(b"sub/inside.txt") + _U32.pack(PF_READ) + _U32.pack(0))) if h]
        return s, handles

    def _probe(self, s: Session, what: str, failures: list[str]) -> None:
        """A session must answer REALPATH and STAT of the export."""
        try:
            t, body = s.call(REALPATH, _s(b"."))
            if t != NAME:
                failures.append(f"{what}: REALPATH answered {t} {body[:40].hex()}")
            t, body = s.call(STAT, _s(self.rig.places.export))
            if t != ATTRS:
                failures.append(f"{what}: STAT answered {t} {body[:40].hex()}")
        except Exception as e:
            failures.append(f"{what}: {e!r}")

    def _connection(self, conn: paramiko.Transport | None) -> paramiko.Transport:
        if conn is not None and conn.is_active():
            return conn
        if conn is not None:
            self.report.connections_lost.append(f"client connection died: {conn.get_exception()!r}")
            _close_transport(conn)
        self.report.connections += 1
        conn = self.rig.connect()
        self.report.cipher = self.report.cipher or "/".join(paramiko_compat.negotiated_ciphers(conn))
        return conn

    def _batch(self, packets: int) -> None:
        rep = self.report
        foreign_conn = self._connection(None)
        conn = None
        try:
            foreign, foreign_handles = self._foreign(foreign_conn)
            end = rep.packets + packets
            while rep.packets < end:
                conn = self._connection(conn)
                try:
                    self._session(conn, end - rep.packets, foreign_handles)
                except paramiko.SSHException:
                    rep.reconnects += 1  # the server refused one more session on this connection
                    _close_transport(conn)
                    conn = None
                self._sample()
            self._probe(foreign, "session open across the batch", rep.foreign_failures)
            foreign.close()
        finally:
            _close_transport(conn)
            _close_transport(foreign_conn)
        fresh_conn = self._connection(None)
        try:
            fresh = Session(fresh_conn, self.hang_deadline)
            fresh.send(_U32.pack(5) + bytes((INIT,)) + _U32.pack(3))
            fresh.wire.reply()
            self._probe(fresh, "fresh session", rep.fresh_failures)
            fresh.close()
        except Exception as e:
            rep.fresh_failures.append(f"fresh session: {e!r}")
        finally:
            _close_transport(fresh_conn)

    def _sample(self) -> None:
        now = Resources.now()
        peak = self.report.peak
        self.report.peak = now if peak is None else Resources(max(peak.rss, now.rss), max(peak.threads, now.threads),
                                                              max(peak.fds, now.fds))

    def _settle(self, threads: set[int | None], fds: dict[int, str], rss: int, label: str) -> None:
        """Threads joined, descriptors polled back to baseline within the settle deadline; else a leak."""
        _join_new(threads, time.monotonic() + self.settle_deadline)
        deadline = time.monotonic() + FD_SETTLE_DEADLINE
        pause = threading.Event()
        while len(_fds()) > len(fds) + FD_TOLERANCE and time.monotonic() < deadline:
            pause.wait(0.02)  # descriptors closed by threads that just ended
        extra_threads = [t.name for t in threading.enumerate() if t.ident not in threads and t.is_alive()]
        if len(extra_threads) > THREAD_TOLERANCE:
            self.report.leaks.append(f"{label}: threads left running: {extra_threads[:10]}")
        now = _fds()
        if len(now) > len(fds) + FD_TOLERANCE:
            new = {fd: target for fd, target in now.items() if fds.get(fd) != target}
            self.report.leaks.append(f"{label}: {len(now) - len(fds)} more descriptors: {dict(list(new.items())[:10])}")
        # The figures of the last batch's settled process are the run's final ones.
        self.report.final = Resources.now(trim=True)
        current = self.report.final.rss
        if current > rss + RSS_TOLERANCE:
            self.report.leaks.append(f"{label}: RSS {current >> 20} MiB, baseline {rss >> 20} MiB")

    def _outside(self, before: dict[str, tuple[Any, ...]], label: str) -> None:
        after = self.rig.sandbox.snapshot()
        for path in sorted(set(before) | set(after)):
            if before.get(path) != after.get(path):
                self.report.outside_changes.append(f"{label}: {path}: {before.get(path)} -> {after.get(path)}")

    def run(self) -> Report:
        rep = self.report
        rep.commit = _commit()
        own_dir = self.workdir is None
        base = Path(tempfile.mkdtemp(prefix="x2go-fuzz-") if own_dir else self.workdir)  # type: ignore[arg-type]
        started = time.monotonic()
        with Watch() as watch, FileSizeLimit(FILE_SIZE_LIMIT):
            self.rig = Rig(base, self.hang_deadline)
            try:
                self.rig.sandbox.prime()
                outside = self.rig.sandbox.snapshot()
                # Baseline: the rig up and one full session served and gone (first-use costs paid).
                threads_pre = {t.ident for t in threading.enumerate()}
                warm = self.rig.connect()
                try:
                    s = Session(warm, self.hang_deadline)
                    s.send(_U32.pack(5) + bytes((INIT,)) + _U32.pack(3))
                    s.wire.reply()
                    self._probe(s, "warm-up session", rep.fresh_failures)
                    s.close()
                finally:
                    _close_transport(warm)
                _join_new(threads_pre, time.monotonic() + self.settle_deadline)
                threads0 = {t.ident for t in threading.enumerate()}
                fds0 = _fds()
                rep.baseline = Resources.now(trim=True)
                rep.peak = rep.baseline
                while rep.packets < rep.packets_wanted:
                    self._batch(min(rep.batch, rep.packets_wanted - rep.packets))
                    rep.batches += 1
                    label = f"batch {rep.batches}"
                    self._settle(threads0, fds0, rep.baseline.rss, label)
                    self._sample()
                    self._outside(outside, label)
                    if not self.rig.outer.is_active():
                        rep.connections_lost.append(f"{label}: python-x2go's connection died")
                        break
                    fill_export(self.rig.sandbox.export, base, self.rig.sandbox.ro)
                    now = Resources.now(trim=True)
                    self.progress(f"{label}: {rep.packets} packets, {rep.sessions} sessions, "
                                  f"{time.monotonic() - started:.0f} s, RSS {now.rss >> 20} MiB, "
                                  f"{now.threads} threads, {now.fds} fds, failures: {len(rep.failures())}")
            finally:
                self.rig.close()
                rep.seconds = time.monotonic() - started
                rep.thread_crashes = list(watch.thread_crashes)
                rep.error_lines = list(watch.errors)
                rep.client_error_lines = list(watch.client_errors)
                rep.close_reasons = watch.close_reasons
                rep.warnings = watch.warnings
                rep.digest = self._digest.hexdigest()[:16]
                if own_dir:
                    _make_writable(base)
                    shutil.rmtree(base, ignore_errors=True)
        return rep


class FileSizeLimit:
    """RLIMIT_FSIZE for the duration, with SIGXFSZ ignored (a write past it fails with EFBIG)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self) -> None:
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        hard = self.old[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (min(self.limit, hard) if hard >= 0 else self.limit, hard))
        self.old_handler = None
        if threading.current_thread() is threading.main_thread():
            self.old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def __exit__(self, *exc: Any) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        if self.old_handler is not None:
            signal.signal(signal.SIGXFSZ, self.old_handler)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip()[:12]
    except (OSError, subprocess.SubprocessError):
        return ""


def packet_stream(seed: int, places: Places, sessions: int, packets: int) -> Iterator[bytes]:
    """The frames the generator makes for ``sessions`` sessions with fixed handles (no server)."""
    for n in range(sessions):
        rng = random.Random(f"{seed}/{n}")
        handles = Handles(files=[b"hx0", b"hx1"], ro_files=[b"hx3"], dirs=[b"hx4", b"hx5"], stale=[b"hx9"],
                          foreign=[b"hx0", b"hx1"])
        g = Generator(rng, places, handles, n * 7, n * 5)
        yield g.init().frame
        for _ in range(packets):
            yield g.next().frame
        yield g.session_end().frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_sftp", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--packets", type=int, default=100000)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--dir", default=None, help="an empty directory for the sandbox (default: a temporary one)")
    parser.add_argument("--trace", default=None, help="write every packet and its reply to this file")
    parser.add_argument("--deadline", type=float, default=HANG_DEADLINE,
                        help=f"seconds for a reply (a hang) and for threads to end (a leak) (default {HANG_DEADLINE:.0f})")
    args = parser.parse_args(argv)
    trace = open(args.trace, "w") if args.trace else None  # noqa: SIM115
    try:
        fuzzer = Fuzzer(args.seed, args.packets, args.batch, args.dir,
                        progress=lambda line: print(line, file=sys.stderr, flush=True), trace=trace,
                        hang_deadline=args.deadline, settle_deadline=args.deadline)
        report = fuzzer.run()
    finally:
        if trace is not None:
            trace.close()
    print(report.summary(), flush=True)
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
