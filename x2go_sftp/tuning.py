"""Speed settings for what this library owns: the outer socket option, the inner transport, channel buffers.

Each setting here was measured with ``python -m tests.bench.bench_mount``
(see docs/performance.md for the figures).  None of them changes what goes
over the wire semantically; all of them work on paramiko 2.12 .. 5.x, and each
falls back to paramiko's behaviour where a release lacks what it needs.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout

from . import defaults, fastpath, log, paramiko_compat

# Ciphers the inner server offers, best first.  OpenSSH's client picks by *its*
# order (chacha20-poly1305, aes*-ctr, then aes*-gcm), so to get GCM we must offer
# only GCM: it costs about a seventh of aes128-ctr + hmac-sha2-256 per byte
# (one AES-NI pass with GHASH instead of AES plus a separate SHA-256 pass).
# Every OpenSSH since 6.2 (2013) has it.  paramiko < 3.3 has no GCM of its own:
# the inner transport gets ours (paramiko_compat.backport_gcm, checked on 2.12);
# where neither is there, paramiko's default list stays.
PREFERRED_CIPHERS: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

# Receive window of the inner transport's channels: what one session may have
# buffered in our process.  8 MiB measured no better than paramiko's 2 MiB on
# loopback (the outer channel's 2 MiB window bounds the pipeline anyway), so we
# keep 2 MiB and the memory bound it gives per session.
INNER_WINDOW_SIZE = paramiko.common.DEFAULT_WINDOW_SIZE

# Largest packet we accept on inner channels.  OpenSSH's client sends session
# data in packets up to what we advertise (its own default is 32 KiB); 256 KiB
# would halve per-packet overhead on writes, but each inner packet then crosses
# the outer channel (32 KiB packets from sshd) in more pieces.  Measured: no
# gain, so we keep paramiko's 32 KiB.
INNER_MAX_PACKET_SIZE = paramiko.common.DEFAULT_MAX_PACKET_SIZE

# Replace paramiko's BufferedPipe on the channels we own with ChunkPipe.
USE_CHUNK_PIPE = True

# Under gevent's monkey patching, when python-x2go's transport greenlet feeds a
# forwarded channel whose session waits for input, and nothing more waits unread
# on the outer socket, it lets the session run first (``time.sleep(0)``: one
# switch through the hub) instead of going back to its socket first.  The
# transport's way back (paramiko's read loop, a gevent ``Timeout``, the wait on
# its socket) then comes after the reply instead of before it.  With more
# outer data already there the transport reads on as before, so the requests
# and replies of a burst stay batched.  Never with plain threads (the session
# thread runs beside the transport's there; round 6 measured a yield worse).
# Measured: docs/performance-notebook.md, round 13.  X2GO_SFTP_YIELD_TO_READER=0
# (or no, off, false), read for each new forwarded channel, switches it off.
YIELD_TO_READER = True
YIELD_ENV = "X2GO_SFTP_YIELD_TO_READER"


def yield_wanted() -> bool:
    """Whether a new forwarded channel's pipe yields to its reader (:data:`YIELD_TO_READER`): gevent only."""
    # time.sleep(0) lets the other greenlets run only where gevent patched "time".
    return YIELD_TO_READER and not defaults.opted_out(YIELD_ENV) and defaults.gevent_patched("time")


_INT = struct.Struct("i")  # FIONREAD's answer


def drained_check(sock: Any) -> Callable[[], bool] | None:
    """A test that nothing waits unread in ``sock``'s kernel buffer (``FIONREAD``), or None where there is none.

    None for anything that is not a descriptor the kernel answers ``FIONREAD``
    for (a ``ProxyCommand``, a closed socket, a platform without ``fcntl``).
    The test says False (not drained) if asking fails later, e.g. once the
    socket is closed.

    The kernel's answer goes into a ``bytearray`` of the test's own.  Given
    immutable ``bytes``, ``fcntl.ioctl`` first tries the argument as a
    writable buffer, builds and discards a ``TypeError`` for it (a formatted
    message included), and only then copies the bytes: twice the cost of the
    call (0.52 against 0.25 us here), on every small request under gevent.
    """
    answer = bytearray(_INT.size)
    try:
        import fcntl
        import termios

        fcntl.ioctl(sock.fileno(), termios.FIONREAD, answer, True)
    except Exception:  # any failure: no check, so no yield
        return None
    ioctl, fionread, fileno, unpack = fcntl.ioctl, termios.FIONREAD, sock.fileno, _INT.unpack_from

    def drained() -> bool:
        try:
            ioctl(fileno(), fionread, answer, True)
        except (OSError, ValueError):
            return False
        waiting: int = unpack(answer)[0]
        return waiting == 0

    return drained


# Bytes an inner SSH packet adds around CHANNEL_DATA payload, at most: message
# header (9), length and padding length (5), padding (<= 16 + 3) and a MAC of up
# to 64 bytes (hmac-sha2-512); rounded up.
INNER_PACKET_OVERHEAD = 128

# paramiko's Channel sends at most out_max_packet_size - 64 bytes per packet.
_PARAMIKO_PACKET_SLACK = 64

# Shrink inner data packets so each fits one packet of the outer channel.
FIT_INNER_PACKETS = True

# On channels we own, acknowledge received data (CHANNEL_WINDOW_ADJUST) once
# this fraction of the window has been consumed.  paramiko acknowledges every
# tenth: on a 2 MiB window, about five adjusts per MiB on each of the two
# channels a byte crosses here (the outer forwarded one and the inner session),
# each a whole packet through python-x2go's paramiko transport.  A quarter
# keeps seven eighths of the window usable on average (OpenSSH acknowledges at
# half) and sends two per MiB.
WINDOW_ACK_FRACTION = 4  # acknowledge every 1/4 of the window; 10 is paramiko's own

# Let the inner transport read the forwarded channel through ReadAheadSocket.
USE_READ_AHEAD = True

# What ReadAheadSocket asks the channel for at once: more than a few outer
# packets' worth gains nothing (the channel rarely holds more when we look).
READ_AHEAD_BYTES = 256 * 1024


def set_tcp_nodelay(transport: Any, logger: log.LoggerLike | None = None) -> bool:
    """Set TCP_NODELAY on the socket under a paramiko ``Transport``.

    paramiko never sets it.  Without it, the small tail packet that follows
    every full 32 KiB SSH packet waits for the peer's delayed ACK (40 ms on
    Linux), which is what made one 32 KiB SFTP read take ~40 ms.  Only the
    latency of small packets changes; nothing else on the connection does.

    Args:
        transport: the caller's transport (anything with a ``sock`` attribute).
        logger: an X2Go-style logger.

    Returns:
        True if the option is now set; False when the transport does not run
        over a TCP socket (a ProxyCommand, a Unix socket, a test double).
    """
    sock = getattr(transport, "sock", None)
    if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        log.tagged(logger, "tuning")(f"could not set TCP_NODELAY: {e}", loglevel=log.loglevel_DEBUG)
        return False
    return True


def set_window_ack_threshold(chan: paramiko.Channel) -> int:
    """Make ``chan`` (one of ours) acknowledge received data every 1/:data:`WINDOW_ACK_FRACTION` of its window.

    Only how often our side sends ``CHANNEL_WINDOW_ADJUST`` changes; the
    window itself, and so what the peer may send, stays as advertised.

    Returns:
        the new threshold in bytes.
    """
    with chan.lock:
        if chan.in_window_size > 0 and WINDOW_ACK_FRACTION > 0:
            chan.in_window_threshold = chan.in_window_size // WINDOW_ACK_FRACTION
        return int(chan.in_window_threshold)


def inner_transport_kwargs() -> dict[str, int]:
    """Keyword arguments for the inner ``paramiko.Transport`` constructor (window, packet size)."""
    return {"default_window_size": INNER_WINDOW_SIZE, "default_max_packet_size": INNER_MAX_PACKET_SIZE}


def gcm_ciphers(transport: paramiko.Transport) -> tuple[str, ...]:
    """The :data:`PREFERRED_CIPHERS` ``transport`` can agree on, best first.

    paramiko has AES-GCM from 3.3; before, ``transport`` is given
    :func:`paramiko_compat.backport_gcm` here (idempotent; nothing changes
    until a key exchange agrees on it; ``X2GO_SFTP_GCM_BACKPORT=0`` opts out).
    """
    paramiko_compat.backport_gcm(transport)
    supported = paramiko_compat.supported_ciphers(transport)
    return tuple(c for c in PREFERRED_CIPHERS if c in supported)


def prefer_fast_ciphers(transport: paramiko.Transport) -> tuple[str, ...]:
    """Offer only :func:`gcm_ciphers` on ``transport`` where it has them.

    Returns:
        the cipher list now offered (paramiko's default when it lacks them all).
    """
    options = transport.get_security_options()
    wanted = gcm_ciphers(transport)
    if wanted:
        options.ciphers = wanted
    return tuple(options.ciphers)


def fit_inner_packets(inner_chan: paramiko.Channel) -> int | None:
    """Cap ``inner_chan``'s outgoing data packets so each inner SSH packet fits one outer packet.

    The client (sshfs) allows 32 KiB packets and so does sshd on the outer
    forwarded channel; a full inner packet is 32 KiB *plus* its headers and MAC,
    so it crossed the outer channel as a full packet and a ~100-byte runt, and
    a 32 KiB READ reply went out as three outer packets (three sends, three TCP
    segments, three wake-ups of sshd).  Capped, it goes out as two.

    Returns:
        the new payload limit, or None if the transport's socket is not a
        channel (nothing to fit).
    """
    transport = inner_chan.get_transport()
    outer = getattr(transport, "sock", None)
    outer_max = getattr(outer, "out_max_packet_size", None)
    if not FIT_INNER_PACKETS or not isinstance(outer_max, int) or outer_max <= 0:
        return None
    outer_payload = outer_max - _PARAMIKO_PACKET_SLACK
    payload = outer_payload - INNER_PACKET_OVERHEAD
    if payload < 1024:  # an absurdly small outer packet: splitting is cheaper than tiny packets
        return None
    with inner_chan.lock:
        current = inner_chan.out_max_packet_size - _PARAMIKO_PACKET_SLACK
        if payload < current:
            inner_chan.out_max_packet_size = payload + _PARAMIKO_PACKET_SLACK
    return min(payload, current)


def rekey_outer_to_gcm(transport: paramiko.Transport, logger: log.LoggerLike | None = None) -> bool:
    """Opt-in: renegotiate the caller's transport to prefer AES-GCM, if both ends have it.

    The outer connection's cipher (paramiko's default aes128-ctr with
    hmac-sha2-256) is the largest single CPU cost left per byte moved.  This
    changes the caller's transport for all its channels, so it is never done
    unless asked for.  Old ciphers stay offered after GCM, so a server
    without GCM keeps the current choice.

    Returns:
        True if a rekey was done and the transport now uses GCM.
    """
    xlog = log.tagged(logger, "tuning")
    if not transport.is_active():
        return False
    gcm = gcm_ciphers(transport)  # paramiko < 3.3: the caller's transport gets the backport
    if not gcm:
        return False
    if all(c in gcm for c in paramiko_compat.negotiated_ciphers(transport)):
        return True  # already (another tunnel on this connection asked first): no second rekey
    options = transport.get_security_options()
    options.ciphers = gcm + tuple(c for c in options.ciphers if c not in gcm)
    try:
        transport.renegotiate_keys()
    except (paramiko.SSHException, OSError, EOFError) as e:
        xlog(f"outer rekey failed: {e}", loglevel=log.loglevel_WARN)
        return False
    now = paramiko_compat.negotiated_ciphers(transport)[0]
    xlog(f"outer transport now uses {now}", loglevel=log.loglevel_DEBUG)
    return now in gcm


# Generic in the stubs only (paramiko's class takes no subscript at run time); the base
# stays spelled BufferedPipe so tests/test_compat.py's scan knows this class for a pipe.
class ChunkPipe(BufferedPipe):  # type: ignore[type-arg]
    """A ``BufferedPipe`` that keeps fed data as a queue of chunks.

    paramiko's pipe appends to one ``array`` and deletes from its front on
    every read, moving everything still buffered (up to the whole channel
    window) each time; under sshfs writes that was the largest single cost.
    Here a read takes whole chunks where it can (no copy) and slices only the
    chunk it ends in.  Same interface and semantics as ``BufferedPipe``.

    With a ``limit`` (the receive window we gave the peer), data beyond it is
    a protocol violation: ``feed`` raises ``paramiko.SSHException`` (paramiko
    then closes the transport, as OpenSSH does on "rcvd too much data")
    instead of buffering without bound.  paramiko itself never checks.
    """

    def __init__(self, limit: int | None = None, feeder_drained: Callable[[], bool] | None = None) -> None:
        # paramiko's own fields are made but unused: every method is ours, on ours.
        super().__init__()
        self.limit = limit
        # See YIELD_TO_READER: whether the feeder's own input is drained (None: never yield).
        # use_chunk_pipe gives one under gevent only (yield_wanted).
        self._feeder_drained = feeder_drained
        self._reader_waits = False  # a reader is (or was about to be) blocked in read(): a hint
        self.yields = 0  # times feed() let the reader run first (tests, logs)
        # Taken three or four times per request; nothing under it waits or
        # switches greenlets (setting an Event does not): the operating
        # system's lock even under gevent (defaults.native_lock).
        self._mutex = defaults.native_lock()
        # Wakes a reader waiting for data, EOF or a handover: set by whoever brings
        # one, cleared (under the mutex) by a reader that found none.  An Event
        # rather than a Condition: under gevent a hand-off through gevent's
        # compiled Event costs half of one through threading.Condition (13 against
        # 28 us), and every small request crosses one; under threads the two cost
        # the same.
        self._arrived = threading.Event()
        self._ready: Any = None  # the event select() waits on (set_event)
        self._eof = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._offset = 0  # bytes of _chunks[0] already read
        self._handover = False  # see offer_handover()

    def offer_handover(self) -> None:
        """The transport's thread has parked (``fastpath``): once empty, ``read`` raises ``Handover``."""
        with self._mutex:
            self._handover = True
            self._arrived.set()

    def take_handover(self) -> bool:
        """Take a pending offer without reading (True if there was one)."""
        with self._mutex:
            offered, self._handover = self._handover, False
            return offered

    def set_event(self, event: Any) -> None:
        with self._mutex:
            self._ready = event
            # As BufferedPipe: start "set" when data or EOF is already there.
            if self._eof or self._size > 0:
                event.set()
            else:
                event.clear()

    def feed(self, data: bytes) -> None:
        with self._mutex:
            if self.limit is not None and self._size + len(data) > self.limit:
                raise paramiko.SSHException(
                    f"the peer sent {self._size + len(data)} bytes, more than the window of {self.limit}")
            if self._ready is not None:
                self._ready.set()
            if data:
                self._chunks.append(bytes(data))
                self._size += len(data)
            self._arrived.set()
            reader_waits = self._reader_waits
        if reader_waits and self._feeder_drained is not None and self._feeder_drained():
            self.yields += 1
            time.sleep(0)  # gevent's: the woken reader runs before this greenlet goes on

    def read_ready(self) -> bool:
        with self._mutex:
            return self._size > 0

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        deadline = None
        while True:
            with self._mutex:
                self._reader_waits = False
                if self._size:
                    out = self._take(nbytes)
                    if self._size == 0 and self._ready is not None and not self._eof:
                        self._ready.clear()
                    return out
                if self._eof:
                    return b""
                if timeout == 0.0:
                    raise PipeTimeout()
                if self._handover:
                    self._handover = False
                    raise fastpath.Handover()
                remaining = None
                if timeout is not None:
                    if deadline is None:
                        deadline = time.monotonic() + timeout
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise PipeTimeout()
                self._arrived.clear()  # whatever arrives after this sets it again
                self._reader_waits = True
            self._arrived.wait(remaining)

    def _take(self, nbytes: int) -> bytes:
        """Remove and return up to ``nbytes`` from the front (lock held, data present)."""
        chunks = self._chunks
        first = chunks[0]
        avail = len(first) - self._offset
        if nbytes >= avail and (len(chunks) == 1 or nbytes == avail):
            # The common cases: the rest of one chunk, often a whole one (no copy).
            chunks.popleft()
            out = first if self._offset == 0 else first[self._offset:]
            self._offset = 0
            self._size -= avail
            return out
        if nbytes < avail:
            out = first[self._offset:self._offset + nbytes]
            self._offset += nbytes
            self._size -= nbytes
            return out
        parts = []
        want = nbytes
        while want > 0 and chunks:
            first = chunks[0]
            avail = len(first) - self._offset
            if avail <= want:
                parts.append(first[self._offset:] if self._offset else first)
                chunks.popleft()
                self._offset = 0
                want -= avail
            else:
                parts.append(first[self._offset:self._offset + want])
                self._offset += want
                want = 0
        out = b"".join(parts)
        self._size -= len(out)
        return out

    def empty(self) -> bytes:
        with self._mutex:
            out = self._take(self._size) if self._size else b""
            if self._ready is not None and not self._eof:
                self._ready.clear()
            return out

    def close(self) -> None:
        with self._mutex:
            self._eof = True
            self._arrived.set()
            if self._ready is not None:
                self._ready.set()

    def __len__(self) -> int:
        with self._mutex:
            return self._size


def use_chunk_pipe(chan: paramiko.Channel, limit: int | None = None, yield_to_reader: bool = False) -> bool:
    """Give ``chan`` a :class:`ChunkPipe` for its incoming data, keeping anything already buffered.

    ``limit`` only for channels whose transport is ours (a violation closes it).
    ``yield_to_reader``: under gevent, the transport's greenlet lets a waiting
    reader run first when its socket is drained (:data:`YIELD_TO_READER`).

    Only safe from the thread of the channel's transport (the only thread that
    feeds the pipe), e.g. in a ``tcpip-forward`` handler or a subsystem
    handler's constructor; anywhere else nothing is changed.  Nothing changes
    either where :mod:`paramiko_compat` says this paramiko's pipe is unknown.

    Returns:
        True if the pipe was replaced.
    """
    transport = chan.get_transport()
    if not USE_CHUNK_PIPE or transport is None or threading.current_thread() is not transport:
        return False
    drained = drained_check(getattr(transport, "sock", None)) if yield_to_reader and yield_wanted() else None
    return paramiko_compat.swap_in_buffer(chan, ChunkPipe(limit, drained))


class ChannelSocket:
    """The forwarded channel as the inner transport's socket.

    ``send`` is :func:`paramiko_compat.channel_sender`'s: never a DATA packet
    after the channel's CLOSE, whichever thread closes it (a DATA packet
    after it makes OpenSSH's sshd drop python-x2go's whole connection).
    Everything else goes straight to the channel.
    """

    def __init__(self, chan: Any):
        self._chan = chan
        self.send: Callable[[bytes], int] = paramiko_compat.channel_sender(chan)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chan, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._chan!r}>"


class ReadAheadSocket(ChannelSocket):
    """:class:`ChannelSocket` that reads the channel in large pieces.

    paramiko's packetizer reads each SSH packet with two or three ``recv(n)``
    calls (first block, rest, MAC), each one a channel read taking the
    channel's locks and checking its window.  Here one channel read serves
    all of them, and every packet already buffered after it.
    """

    def __init__(self, chan: Any):
        super().__init__(chan)
        self._buf = b""
        self._pos = 0

    def recv(self, nbytes: int) -> bytes:
        """Up to ``nbytes``, from what was read ahead or else one channel read (same blocking, timeouts, EOF)."""
        if self._pos >= len(self._buf):
            data: bytes = self._chan.recv(max(nbytes, READ_AHEAD_BYTES))
            if len(data) <= nbytes:
                return data  # empty at EOF; nothing left over
            self._buf, self._pos = data, 0
        start = self._pos
        self._pos = start + nbytes
        if start == 0 and self._pos >= len(self._buf):
            out, self._buf, self._pos = self._buf, b"", 0
            return out
        return self._buf[start:self._pos]

    def recv_untimed(self, nbytes: int) -> bytes:
        """:meth:`recv`, but a wait for the channel ends only with data, EOF or the channel's close.

        For a channel's one reader (the fast path, while paramiko's thread is
        parked), under gevent: there each timed wait makes, starts and
        cancels a gevent ``Timeout``, once per small request.  A timeout is
        not needed for liveness: the channel's close, whether ours, the
        peer's or the end of python-x2go's connection (paramiko unlinks
        every channel then), closes its pipe, which wakes the reader with
        EOF.
        """
        chan = self._chan
        timeout = chan.gettimeout()
        if timeout is None or self._pos < len(self._buf):
            return self.recv(nbytes)
        chan.settimeout(None)
        try:
            return self.recv(nbytes)
        finally:
            chan.settimeout(timeout)

    def read_buffered(self) -> int:
        """Bytes read ahead and not yet taken."""
        return max(len(self._buf) - self._pos, 0)


def inner_socket(chan: Any) -> Any:
    """The inner transport's socket: ``chan`` as a :class:`ReadAheadSocket`, or a :class:`ChannelSocket` if read-ahead is off."""
    return ReadAheadSocket(chan) if USE_READ_AHEAD else ChannelSocket(chan)
