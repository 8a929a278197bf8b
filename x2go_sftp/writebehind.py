"""A session's WRITEs finished on a native thread while the session reads on.

Under gevent's monkey patching (python-x2go's way) every greenlet of the
process shares one OS thread: python-x2go's connection, our inner SSH and
SFTP, and every ``pwrite()`` a WRITE makes.  A ``pwrite()`` is the file
system's work (about 1.4 ms of kernel time per MB on the benchmark's machine
once the page cache has filled: a fifth of what writing through a share costs
the process); OpenSSH's ``sftp-server`` does the same in a process of its own,
on another core.  Here one native thread per writing session does it, while
the session decrypts and parses the next request.  The thread only runs
``pwritev()`` and appends results: it never touches gevent, paramiko or a
lock of the session.

What the client sees is what a one-request-at-a-time server shows it:

* a WRITE's STATUS is sent only after its ``pwrite()`` returned, with that
  write's own result: nothing acknowledged can be lost to a failure the
  client was not told of;
* WRITEs run one at a time, in the order they arrived (one worker per
  session), so overlapping writes land as they would have;
* any other request first waits for every pending WRITE, whose replies are
  queued before its own: READ, FSTAT, FSYNC or CLOSE see every write before
  them, and a handle's descriptor is never closed under a pending write;
* replies leave in the order of the requests.

Contiguous WRITEs to one descriptor reach the kernel as one ``pwritev()``.
The worker is woken once :data:`WAKE_BYTES` have gathered, or when the
session is about to wait for its writes; it wakes the session only if the
session waits.  Woken for every WRITE, and waking the session's hub after
every batch, it cost more CPU than the ``pwrite()`` it took over (inside
the real python-x2go, notebook round 18).

On by default only under gevent's monkey patching (:func:`wanted`).  With
plain threads the session's own thread already leaves the core to paramiko's
while it sits in ``pwrite()``.  ``X2GO_SFTP_WRITE_BEHIND=0`` switches it off.
"""

from __future__ import annotations

import _thread
import collections
import errno
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from . import defaults

__all__ = ["MAX_PENDING_BYTES", "MAX_PENDING_WRITES", "MIN_BYTES", "WAKE_BYTES", "WriteBehind", "wanted"]

# At most this many WRITEs, holding at most this many bytes of data, wait for
# a session's worker; the next WRITE first waits for the oldest.  OpenSSH's
# sftp client keeps up to 64 requests of 32 KiB in flight (sftp -R 64 -B
# 32768, 2 MiB); a quarter of that is enough to keep the worker busy behind
# sshfs's 32 KiB writes, and bounds what a session holds (a single larger
# WRITE, up to engine.MAX_WRITE_LENGTH, is let through alone).
MAX_PENDING_WRITES = 16
MAX_PENDING_BYTES = 512 * 1024

# A smaller WRITE while none is pending is written at once, in the session:
# handing it to the worker and its result back costs more than its pwrite()
# (a created file's few bytes, followed by CLOSE, gain nothing from a thread).
MIN_BYTES = 8 * 1024

# Contiguous WRITEs go to the kernel as one pwritev() of at most this many
# buffers (Linux's IOV_MAX is 1024).
MAX_IOV = 64

# The worker is woken once this many bytes of WRITEs wait for it (four of
# sshfs's 32 KiB WRITEs), or at once when the session waits for results.
WAKE_BYTES = 128 * 1024

# Off (the worker woken for every WRITE, the session after every batch, as
# before notebook round 18) only to measure what waking lazily buys.
WAKE_LAZILY = True

# The opt-out, read for each new session.
ENV = "X2GO_SFTP_WRITE_BEHIND"


def wanted(setting: bool | None) -> bool:
    """Whether a new session writes behind: ``setting`` if not None, else under gevent only.

    ``X2GO_SFTP_WRITE_BEHIND=0`` (or ``no``, ``off``, ``false``) switches it off whatever ``setting`` says.
    """
    if defaults.opted_out(ENV):
        return False
    return defaults.gevent_patched() if setting is None else setting


class Write(NamedTuple):
    request_number: int
    fd: int
    data: bytes
    offset: int


class WriteBehind:
    """One session's worker: :meth:`submit` WRITEs, :meth:`completed` takes their results in order.

    Every method but the worker's own loop is called from the session's
    thread (or greenlet) only.  A result is ``(request_number, error)`` with
    ``error`` None on success, else the ``OSError`` the write failed with.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        start_native: Callable[..., Any] | None = None
        if defaults.gevent_patched():
            from gevent import get_hub
            from gevent.monkey import get_original

            allocate_lock: Callable[[], Any] = get_original("_thread", "allocate_lock")
            # threading.Thread would be a greenlet here: a native thread is gevent's original.
            start_native = get_original("_thread", "start_new_thread")
            # A native thread must not touch the hub's objects; an async
            # watcher is the one way in that is safe from any thread.
            self._event = threading.Event()  # gevent's, under the patching
            watcher = get_hub().loop.async_()
            watcher.start(self._event.set)
            self._watcher: Any = watcher
            self._signal: Callable[[], None] = watcher.send
        else:
            allocate_lock = _thread.allocate_lock
            self._event = threading.Event()
            self._watcher = None
            self._signal = self._event.set
        self._todo: collections.deque[Write] = collections.deque()
        self._done: collections.deque[tuple[int, OSError | None]] = collections.deque()
        # Released to wake the worker; at most one wake-up is ever pending.
        self._wake = allocate_lock()
        self._wake.acquire()
        self._stopping = False
        self._exited = False
        self._waiting = False  # the session waits for a result: the worker must wake it
        self._unwoken = 0  # bytes submitted since the worker was last woken
        self.pending = 0  # submitted, result not yet taken
        self.pending_bytes = 0
        self._sizes: collections.deque[int] = collections.deque()
        if start_native is not None:
            start_native(self._run, ())
        else:
            self._thread = threading.Thread(target=self._run, name="x2go-sftp-write-behind", daemon=True)
            self._thread.start()

    # -- the session's side --------------------------------------------------
    def submit(self, request_number: int, fd: int, data: bytes, offset: int) -> None:
        """Queue one WRITE (its descriptor valid until its result is taken)."""
        self._todo.append(Write(request_number, fd, data, offset))
        self.pending += 1
        self.pending_bytes += len(data)
        self._sizes.append(len(data))
        self._unwoken += len(data)
        if self._unwoken >= WAKE_BYTES or not WAKE_LAZILY:
            self._poke()

    def has_room(self, size: int) -> bool:
        """True if a WRITE of ``size`` bytes may be queued now (see :data:`MAX_PENDING_WRITES`)."""
        return self.pending == 0 or (self.pending < MAX_PENDING_WRITES
                                     and self.pending_bytes + size <= MAX_PENDING_BYTES)

    def completed(self) -> list[tuple[int, OSError | None]]:
        """Results that are in, oldest first (never waits)."""
        out = []
        done = self._done
        while done:
            out.append(done.popleft())
            self.pending -= 1
            self.pending_bytes -= self._sizes.popleft()
        return out

    def wait(self) -> None:
        """Wait until a result is in (returns at once if one is, or if nothing is pending)."""
        while self.pending and not self._done:
            self._poke()  # what has gathered is needed now
            self._event.clear()
            # Set before the last look at the results: the worker adds its results, then looks
            # at this flag, so either that look finds the flag or this one finds the results.
            self._waiting = True
            try:
                if self._done:
                    return
                self._event.wait()
            finally:
                self._waiting = False

    def close(self) -> list[tuple[int, OSError | None]]:
        """Wait for every pending write, end the worker; the results not yet taken."""
        out = []
        while self.pending:
            self.wait()
            out += self.completed()
        self._stopping = True
        self._poke()
        while not self._exited:
            self._event.clear()
            if self._exited:
                break
            self._event.wait()
        if self._thread is not None:
            self._thread.join()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
        return out

    def _poke(self) -> None:
        # Only the worker takes the lock, and only this thread releases it:
        # locked here means no wake-up is pending yet.
        self._unwoken = 0
        if self._wake.locked():
            self._wake.release()

    # -- the worker ------------------------------------------------------------
    def _run(self) -> None:
        todo, done = self._todo, self._done
        try:
            while True:
                if not todo:
                    if self._stopping:
                        return
                    self._wake.acquire()
                    continue
                batch = [todo.popleft() for _ in range(len(todo))]
                done.extend(write_batch(batch))
                if self._waiting or not WAKE_LAZILY:
                    self._signal()
        finally:
            self._exited = True
            self._signal()


def write_batch(batch: list[Write]) -> list[tuple[int, OSError | None]]:
    """Write ``batch`` in order, contiguous runs on one descriptor as one ``pwritev()`` each."""
    out: list[tuple[int, OSError | None]] = []
    i = 0
    while i < len(batch):
        first = batch[i]
        j = i + 1
        end = first.offset + len(first.data)
        while (j < len(batch) and j - i < MAX_IOV and batch[j].fd == first.fd
               and batch[j].offset == end):
            end += len(batch[j].data)
            j += 1
        out += _write_run(batch[i:j])
        i = j
    return out


def _write_run(run: list[Write]) -> list[tuple[int, OSError | None]]:
    """Contiguous writes to one descriptor; each gets its own result, as if written one by one."""
    out: list[tuple[int, OSError | None]] = []
    fd = run[0].fd
    views = [memoryview(w.data) for w in run]
    i = 0
    offset = run[0].offset
    while i < len(run):
        if not views[i]:  # an empty WRITE succeeds, as pwrite() of nothing does
            out.append((run[i].request_number, None))
            i += 1
            continue
        try:
            n = os.pwritev(fd, views[i:], offset)
            if n == 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        except OSError as e:
            # This write fails; the next ones are tried, each at its own offset.
            out.append((run[i].request_number, e))
            offset = run[i].offset + len(run[i].data)
            i += 1
            continue
        offset += n
        while i < len(run) and n >= len(views[i]):
            n -= len(views[i])
            out.append((run[i].request_number, None))
            i += 1
        if n:
            views[i] = views[i][n:]
    return out
