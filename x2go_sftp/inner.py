"""The inner SSH server: a paramiko server ``Transport`` over one forwarded channel.

sshfs on the X2Go server speaks SSH to us through the reverse-forwarded port;
each such connection arrives as a ``forwarded-tcpip`` channel of the outer
transport, and we run a complete SSH server over it.
"""

from __future__ import annotations

import time
from typing import Any

import paramiko

from . import fastpath, log, tuning
from .auth import SessionKeyAuth
from .backend import JailedSFTPServer
from .defaults import current_local_user, default_host_key
from .engine import SFTPEngine
from .exports import Exports

# How long the SSH handshake and authentication may take before we give up on
# a channel (sshfs normally needs well under a second on loopback).
HANDSHAKE_TIMEOUT = 30.0
AUTH_TIMEOUT = 30.0

# Re-check interval while waiting for the authenticated session channel.
ACCEPT_RECHECK = 0.25


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


class InnerTransport(paramiko.Transport):
    """Server ``Transport`` with the fixes our clients need on every paramiko release."""

    def __init__(self, sock: Any, *args: Any, **kwargs: Any):
        super().__init__(sock, *args, **kwargs)
        fastpath.install(self)

    def _really_parse_kex_init(self, m: paramiko.Message, ignore_first_byte: bool = False) -> dict[str, Any]:
        parsed: dict[str, Any] = super()._really_parse_kex_init(m, ignore_first_byte)
        # paramiko < 3.3 only recognises "ext-info-c" as the *last* kex name;
        # OpenSSH >= 9.2 sends "kex-strict-c-v00@openssh.com" after it (Debian 12).
        # Without ext-info we never send server-sig-algs and OpenSSH >= 8.8
        # refuses to sign with RSA: "no mutual signature supported".  Moving the
        # marker to the end is harmless on releases that scan the whole list.
        kex = list(parsed["kex_algo_list"])
        info = [k for k in kex if k.startswith("ext-info-")]
        if info and kex[-1] != info[0]:
            kex.remove(info[0])
            kex.append(info[0])
            parsed["kex_algo_list"] = kex
        return parsed


def _accept_session(transport: paramiko.Transport, timeout: float) -> paramiko.Channel | None:
    """``Transport.accept`` that also returns soon after the transport dies.

    paramiko's accept() waits out its whole timeout when the transport dies
    without notifying (it skips the notify when close() came from another
    thread, e.g. our pause()), so wait in short slices and re-check ``active``.
    """
    deadline = time.monotonic() + timeout
    with transport.lock:
        while True:
            if transport.server_accepts:
                return transport.server_accepts.pop(0)
            remaining = deadline - time.monotonic()
            if not transport.active or remaining <= 0:
                return None
            transport.server_accept_cv.wait(min(remaining, ACCEPT_RECHECK))


def serve_channel(
    chan: paramiko.Channel,
    auth_key: paramiko.PKey,
    *,
    exports: Exports | None = None,
    host_key: paramiko.PKey | None = None,
    username: str | None = None,
    logger: log.LoggerLike | None = None,
    on_transport: Any = None,
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
    """
    logger = log.tagged(logger, "inner")
    transport = InnerTransport(tuning.inner_socket(chan), **tuning.inner_transport_kwargs())
    transport.daemon = True
    tuning.prefer_fast_ciphers(transport)
    try:
        if on_transport is not None:
            on_transport(transport)
        transport.add_server_key(host_key if host_key is not None else default_host_key())
        transport.set_subsystem_handler(
            "sftp", TunedSFTPEngine, sftp_si=JailedSFTPServer, exports=exports, logger=logger.wrapped
        )
        server = SessionKeyAuth(auth_key, username or current_local_user(), logger=logger.wrapped)
        transport.banner_timeout = HANDSHAKE_TIMEOUT
        transport.handshake_timeout = HANDSHAKE_TIMEOUT
        try:
            transport.start_server(server=server)
        except (paramiko.SSHException, EOFError, OSError) as e:
            logger(f"inner SSH negotiation on {chan} failed: {e}", loglevel=log.loglevel_INFO)
            return
        # The client must log in and open its session channel in time; a peer
        # that connects and idles is dropped instead of holding a thread.
        # Keep the reference: paramiko closes a Channel when it is garbage collected.
        session = _accept_session(transport, AUTH_TIMEOUT)
        if session is None:
            logger(f"no authenticated session on {chan} within {AUTH_TIMEOUT}s", loglevel=log.loglevel_INFO)
            return
        transport.join()
        del session
    finally:
        transport.close()
        chan.close()
        logger(f"sFTP channel {chan} closed down", loglevel=log.loglevel_DEBUG)
