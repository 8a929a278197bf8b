"""The inner SSH server: a paramiko server ``Transport`` over one forwarded channel.

sshfs on the X2Go server speaks SSH to us through the reverse-forwarded port;
each such connection arrives as a ``forwarded-tcpip`` channel of the outer
transport, and we run a complete SSH server over it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import paramiko
from paramiko.common import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA

from . import fastpath, log, paramiko_compat, tuning
from .auth import Login, SessionKeyAuth
from .backend import JailedSFTPServer
from .defaults import current_local_user, default_host_key
from .engine import SFTPEngine
from .exports import Exports
from .paramiko_compat import cancel_handshake_timer

# From a connection's arrival to its authenticated session channel: banner,
# key exchange, authentication and the channel open together (OpenSSH
# LoginGraceTime, 120 s there).  sshfs needs well under a second on loopback;
# 30 s leaves room for a loaded machine while a peer that connects and then
# dribbles or idles holds its slot (see auth.MAX_STARTUPS) for at most this long.
LOGIN_GRACE_TIME = 30.0

# Re-check interval while waiting on the inner transport: paramiko does not
# wake waiters when another thread closes a transport (pause(), the deadline).
ACCEPT_RECHECK = 0.25

# How long to wait for the inner transport's thread after closing it (it
# notices within paramiko's 0.1 s socket timeout).
TRANSPORT_JOIN_TIMEOUT = 5.0


class TunedSFTPEngine(SFTPEngine):
    """The SFTP engine on a session channel whose incoming buffer is a :class:`tuning.ChunkPipe`."""

    def __init__(self, channel: paramiko.Channel, *args: Any, **kwargs: Any):
        # paramiko builds subsystem handlers in the transport's own thread,
        # before it confirms the subsystem: the one safe moment to swap the pipe.
        # The window we gave the client bounds what it may have buffered here.
        tuning.use_chunk_pipe(channel, limit=channel.in_window_size)
        tuning.fit_inner_packets(channel)
        tuning.set_window_ack_threshold(channel)
        super().__init__(channel, *args, **kwargs)
        self.fast = fastpath.SessionIO(channel, kwargs.get("logger"))

    def start_subsystem(self, name: str, transport: paramiko.Transport, channel: paramiko.Channel) -> None:
        self._io = self.fast
        self.fast.start()
        try:
            super().start_subsystem(name, transport, channel)
        finally:
            self.fast.stop()
            self.xlog(f"fast path: {self.fast.stretches} stretches, {self.fast.packets_in} packets in, "
                      f"{self.fast.packets_out} out, {self.fast.handed_back} handed back, {self.fast.rekeys} rekeys",
                      loglevel=log.loglevel_DEBUG)


class InnerTransport(paramiko_compat.ExtInfoMarkerLast, paramiko.Transport):
    """Server ``Transport`` with the fixes our clients need and the bounds a hostile peer meets.

    On every paramiko release 2.12 .. 5.x, each through :mod:`paramiko_compat`
    (probed once per transport; off, with one INFO line, where it says no):

    * its packetizer is bounded (:class:`paramiko_compat.BoundedPacketizer`:
      OpenSSH's packet and identification limits; the fast path's
      ``LeanPacketizer`` builds on it);
    * channel data that could be stored without bound is never stored: every
      ``CHANNEL_EXTENDED_DATA`` is dropped unread, ``CHANNEL_DATA`` only
      reaches a running SFTP session (whose pipe the window bounds), and a
      ``CHANNEL_DATA`` string longer than its packet ends the connection;
    * the client's ``ext-info-c`` marker counts wherever it sits in its list;
    * it speaks AES-GCM where paramiko has none (before 3.3: Debian 12's
      2.12), so OpenSSH's clients agree on it as with newer paramiko
      (:func:`paramiko_compat.backport_gcm`), each direction on one OpenSSL
      context where cryptography would set one up per packet (38 to 42:
      Debian 12, Ubuntu 24.04; :mod:`x2go_sftp.aesgcm`).
    """

    def __init__(self, sock: Any, *args: Any, **kwargs: Any):
        super().__init__(sock, *args, **kwargs)
        self.compat = paramiko_compat.probe(self)
        self.discarded_messages = 0  # channel messages dropped unread (tests and logs)
        self._told_discard = False
        if not fastpath.install(self):
            paramiko_compat.bound_packetizer(self)
        paramiko_compat.backport_gcm(self)
        self._paramiko_feed = paramiko_compat.paramiko_channel_handler(MSG_CHANNEL_DATA)
        paramiko_compat.override_channel_handlers(self, {
            MSG_CHANNEL_DATA: self._on_channel_data,
            MSG_CHANNEL_EXTENDED_DATA: self._on_extended_data,
        })

    def _on_extended_data(self, chan: paramiko.Channel, m: paramiko.Message) -> None:
        """``CHANNEL_EXTENDED_DATA`` (a client's "stderr"): nothing here reads it, so it is dropped unread.

        paramiko would keep all of it (the window is never checked), and first
        pad a string shorter than it declares with up to 1 MiB of zeros.
        """
        self._discarded(chan, "EXTENDED_DATA")

    def _on_channel_data(self, chan: paramiko.Channel, m: paramiko.Message) -> None:
        """``CHANNEL_DATA``: into a running SFTP session's :class:`tuning.ChunkPipe`, or dropped unread.

        Raises:
            paramiko.SSHException: the string declares more bytes than the
                packet holds (paramiko would pad it with zeros); paramiko then
                closes the transport.
        """
        if not self.compat.may(paramiko_compat.CHUNK_PIPE) and self._paramiko_feed is not None:
            self._paramiko_feed(chan, m)  # no ChunkPipe on this paramiko: nothing to tell sessions apart
            return
        pipe = paramiko_compat.channel_in_buffer(chan)
        if not isinstance(pipe, tuning.ChunkPipe):
            self._discarded(chan, "DATA on a channel without a running sftp session")
            return
        size = m.get_int()
        data = m.get_remainder()
        if size > len(data):
            raise paramiko.SSHException(f"CHANNEL_DATA declares {size} bytes and carries {len(data)}")
        pipe.feed(data if size == len(data) else data[:size])

    def _discarded(self, chan: paramiko.Channel, what: str) -> None:
        self.discarded_messages += 1
        if not self._told_discard:  # once per connection: a client must not flood the log
            self._told_discard = True
            _discard_log(f"dropping {what} from the client on {chan} (and any more on this connection)",
                         loglevel=log.loglevel_INFO)


_discard_log = log.tagged(None, "inner", loglevel=log.loglevel_DEFAULT | log.loglevel_INFO)


def _wait_negotiated(transport: paramiko.Transport, negotiated: threading.Event, deadline: float) -> bool:
    """Wait until key exchange has ended (``negotiated`` set) or failed; False at the deadline."""
    while not negotiated.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if not transport.is_active():
            return True  # failed: the caller reads why
        negotiated.wait(min(remaining, ACCEPT_RECHECK))
    return True


def _accept_session(transport: paramiko.Transport, deadline: float | None) -> paramiko.Channel | None:
    """The next channel the client opens, or None once the transport dies or ``deadline`` passes.

    paramiko's accept() waits out its whole timeout when another thread
    closes the transport, so wait in short slices and re-check ``is_active``.
    """
    while transport.is_active():
        wait = ACCEPT_RECHECK
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                return None
        chan = transport.accept(wait)
        if chan is not None:
            return chan
    return None


def serve_channel(
    chan: paramiko.Channel,
    auth_key: paramiko.PKey,
    *,
    exports: Exports | None = None,
    host_key: paramiko.PKey | None = None,
    username: str | None = None,
    logger: log.LoggerLike | None = None,
    on_transport: Any = None,
    login_grace_time: float = LOGIN_GRACE_TIME,
    arrived: float | None = None,
    login: Login | None = None,
    session_observer: Any = None,
) -> None:
    """Run an SSH + SFTP server over ``chan`` until the client or the tunnel closes it.

    Args:
        chan: the forwarded channel (any socket-like object works).
        auth_key: the only key accepted.
        exports: what is served (none: every request is refused).
        host_key: our host key (default: the process-wide 3072-bit RSA key).
        username: the only user name accepted (default: the local user).
        logger: an X2Go-style logger.
        on_transport: called with the inner transport once it exists, so the
            owner can close it (pause/stop).
        login_grace_time: seconds from ``arrived`` to an authenticated session
            channel; the connection is closed when they run out.
        arrived: ``time.monotonic()`` when the channel arrived (default: now).
        login: this connection's slot in its tunnel's :class:`auth.LoginGate`;
            freed when the connection ends, and the connection closed if the
            tunnel already has its maximum of logged-in connections.
        session_observer: passed to each SFTP session's engine: its
            ``session_started(engine)`` / ``session_ended(engine)`` are called
            and it may read the engine's live figures in between.
    """
    logger = log.tagged(logger, "inner")
    deadline = (time.monotonic() if arrived is None else arrived) + login_grace_time
    transport = InnerTransport(tuning.inner_socket(chan), **tuning.inner_transport_kwargs())
    transport.daemon = True
    tuning.prefer_fast_ciphers(transport)
    try:
        if on_transport is not None:
            on_transport(transport)
        transport.add_server_key(host_key if host_key is not None else default_host_key())
        transport.set_subsystem_handler(
            "sftp", TunedSFTPEngine, sftp_si=JailedSFTPServer, exports=exports, logger=logger.wrapped,
            session_observer=session_observer,
        )
        server = SessionKeyAuth(auth_key, username or current_local_user(), logger=logger.wrapped,
                                transport=transport)
        # paramiko's own timeouts restart with every line and packet; the
        # deadline below is what bounds the whole login.
        transport.banner_timeout = login_grace_time
        transport.handshake_timeout = login_grace_time
        negotiated = threading.Event()
        try:
            transport.start_server(event=negotiated, server=server)
        except (paramiko.SSHException, EOFError, OSError, RuntimeError) as e:  # RuntimeError: no thread
            logger(f"inner SSH server on {chan} did not start: {e}", loglevel=log.loglevel_INFO)
            return
        if not _wait_negotiated(transport, negotiated, deadline):
            logger(f"no key exchange on {chan} within {login_grace_time}s: closing",
                   loglevel=log.loglevel_INFO)
            return
        if not transport.is_active():
            logger(f"inner SSH negotiation on {chan} failed: {transport.get_exception() or 'connection closed'}",
                   loglevel=log.loglevel_INFO)
            return
        # Keep the references: paramiko closes a Channel when it is garbage collected.
        session = _accept_session(transport, deadline)
        if session is None:
            if transport.is_active():
                logger(f"no authenticated session on {chan} within {login_grace_time}s: closing",
                       loglevel=log.loglevel_INFO)
            return
        if login is not None and not login.log_in():
            logger(f"refused a login on {chan}: the tunnel already has its {login.max_connections} "
                   f"logged-in connections", loglevel=log.loglevel_WARN)
            return
        # Further session channels (at most auth.MAX_SESSIONS at once) are
        # taken off paramiko's accept queue too, so closed ones do not pile up there.
        held = [session]
        while (extra := _accept_session(transport, None)) is not None:
            held = [c for c in held if not c.closed] + [extra]
        del session, held
    finally:
        if login is not None:
            login.done()
        transport.close()
        chan.close()
        if transport is not threading.current_thread() and transport.ident is not None:
            transport.join(TRANSPORT_JOIN_TIMEOUT)
        # A peer that sent only its banner would leave paramiko's handshake
        # timer thread running for the whole grace time after we are gone.
        cancel_handshake_timer(transport)
        logger(f"sFTP channel {chan} closed down", loglevel=log.loglevel_DEBUG)
