"""Folder sharing for X2Go: an SFTP server at the end of a reverse tunnel.

Drop-in for python-x2go's ``x2go.sftpserver``: same names, same signatures,
same threading model.  The X2Go server's sshfs connects to a port forwarded
back over python-x2go's SSH connection; each connection arrives here as a
channel, on which we run an SSH server that accepts only the session key and
serves only the exported folders over SFTP.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import paramiko

from . import log, paramiko_compat, rforward, tuning
from .auth import MAX_CONNECTIONS, MAX_STARTUPS, Login, LoginGate
from .exports import Exports
from .inner import LOGIN_GRACE_TIME, serve_channel

__NAME__ = "x2gosftpserver-pylib"


class X2GoRevFwSFTPChannelThread(rforward.X2GoRevFwChannelThread):
    """The thread serving one sshfs connection (a clone of ``X2GoRevFwChannelThread``)."""

    def __init__(self, channel: paramiko.Channel, remote: tuple[str, int] | None = None, **kwargs: Any):
        super().__init__(channel, remote, **kwargs)
        self.inner_transport: paramiko.Transport | None = None

    def close_channel(self) -> None:
        # Closing the inner transport ends the SSH session cleanly first.
        inner = self.inner_transport
        if inner is not None:
            inner.close()
        super().close_channel()


def x2go_rev_forward_sftpchannel_handler(
    chan: paramiko.Channel | None = None,
    auth_key: paramiko.PKey | None = None,
    logger: log.LoggerLike | None = None,
    *,
    exports: Exports | None = None,
    host_key: paramiko.PKey | None = None,
    username: str | None = None,
    thread: X2GoRevFwSFTPChannelThread | None = None,
    login_grace_time: float = LOGIN_GRACE_TIME,
    arrived: float | None = None,
    login: Login | None = None,
    session_observer: Any = None,
) -> None:
    """Serve SSH + SFTP on one forwarded channel until it closes.

    Args:
        chan: the forwarded channel.
        auth_key: the only key accepted; without one the channel is closed at once.
        logger: an ``X2GoLogger`` or compatible callable.
        exports: the folders to serve (none: every request is refused).
        host_key: the inner server's host key (default: a 3072-bit RSA key per process).
        username: the only user accepted (default: the local user).
        thread: the channel thread, told about the inner transport so pause() can close it.
        login_grace_time: seconds from ``arrived`` to an authenticated session (see :func:`inner.serve_channel`).
        arrived: ``time.monotonic()`` when the channel arrived (default: now).
        login: the connection's slot in its tunnel's :class:`auth.LoginGate`, freed when it ends.
        session_observer: told of each SFTP session (see :func:`inner.serve_channel`).
    """
    xlog = log.tagged(logger, __NAME__)
    if chan is None or auth_key is None:
        if login is not None:
            login.done()
        if chan is not None:
            xlog(f"sFTP channel {chan} closed because of missing authentication key",
                 loglevel=log.loglevel_DEBUG)
            chan.close()
        return

    def remember(transport: paramiko.Transport) -> None:
        if thread is not None:
            thread.inner_transport = transport

    serve_channel(chan, auth_key, exports=exports, host_key=host_key, username=username,
                  logger=logger, on_transport=remember, login_grace_time=login_grace_time,
                  arrived=arrived, login=login, session_observer=session_observer)


class X2GoRevFwTunnelToSFTP(rforward.X2GoRevFwTunnel):
    """A reverse forwarding tunnel with an SFTP server at its end.

    Args:
        server_port: the port on the X2Go server (sshfs connects there).
        ssh_transport: python-x2go's paramiko ``Transport`` to the X2Go server.
        auth_key: the session key sshfs authenticates with (any ``PKey``).
        session_instance: python-x2go's ``X2GoSession``, or None.
        logger: an ``X2GoLogger`` or compatible callable.
        loglevel: level mask of the logger created when ``logger`` is None.
        exports: folders to serve; ``str`` or ``(path, read_only)`` items.
            Nothing is served until something is exported: ``/`` never is by default.
        host_key: the inner server's host key (default: a 3072-bit RSA key per process).
        username: the only user sshfs may log in as (default: the local user).
        tcp_nodelay: set TCP_NODELAY on ``ssh_transport``'s socket (default).
            paramiko never does; without it every SFTP reply whose tail is a
            small SSH packet waits for a delayed ACK (~40 ms).  It changes
            only the latency of small packets on the connection; pass False
            to leave the socket as the caller made it.
        outer_gcm: opt-in: renegotiate ``ssh_transport`` to prefer AES-GCM
            (when the server has it; on paramiko < 3.3, which has none, the
            transport first gets :func:`~x2go_sftp.paramiko_compat.backport_gcm`),
            the cheapest cipher per byte.  Off by default: it changes the caller's connection.  The
            failure once seen inside real python-x2go (paramiko's issue 822:
            a channel close arriving while the rekey is under way hung
            paramiko's transport thread until the key exchange timed out) is
            handled on every tunnel's outer transport
            (:func:`~x2go_sftp.paramiko_compat.answer_close_after_kex`);
            see docs/performance.md for what it is worth.
        login_grace_time: seconds a connection has from its arrival to an
            authenticated session channel (default :data:`inner.LOGIN_GRACE_TIME`).
        max_startups: connections that may be logging in at once; more are
            closed on arrival (default :data:`auth.MAX_STARTUPS`).
        max_connections: logged-in connections at once; a login beyond it is
            closed (default :data:`auth.MAX_CONNECTIONS`).
        session_observer: optional; its ``session_started(engine)`` and
            ``session_ended(engine)`` are called for every SFTP session of this
            tunnel, whose live figures it may read meanwhile (see
            :class:`x2go_sftp.share.MountCounters`).
    """

    _log_tag = __NAME__

    def __init__(
        self,
        server_port: int,
        ssh_transport: paramiko.Transport,
        auth_key: paramiko.PKey | None = None,
        session_instance: Any = None,
        logger: log.LoggerLike | None = None,
        loglevel: int = log.loglevel_DEFAULT,
        *,
        exports: Any = (),
        host_key: paramiko.PKey | None = None,
        username: str | None = None,
        tcp_nodelay: bool = True,
        outer_gcm: bool = False,
        login_grace_time: float = LOGIN_GRACE_TIME,
        max_startups: int = MAX_STARTUPS,
        max_connections: int = MAX_CONNECTIONS,
        session_observer: Any = None,
    ):
        from .integrate import refuse_bare_swap  # not at the top: integrate imports this module
        refuse_bare_swap(type(self), logger)  # python-x2go's class without install(): refused loudly
        super().__init__(server_port, rforward.FORWARD_ADDRESS, 0, ssh_transport,
                         session_instance=session_instance, logger=logger, loglevel=loglevel)
        self.auth_key = auth_key if isinstance(auth_key, paramiko.PKey) else None
        self._owns_exports = not isinstance(exports, Exports)
        self.exports = exports if isinstance(exports, Exports) else Exports(exports)
        self.host_key = host_key
        self.username = username
        self.login_grace_time = login_grace_time
        self.session_observer = session_observer
        self.login_gate = LoginGate(max_startups, max_connections, logger=self.logger)
        if tcp_nodelay:
            tuning.set_tcp_nodelay(ssh_transport, self.logger)
        if ssh_transport is not None:
            # paramiko issue 822: a CLOSE during a rekey would hang python-x2go's connection.
            paramiko_compat.answer_close_after_kex(ssh_transport)
        if outer_gcm:
            tuning.rekey_outer_to_gcm(ssh_transport, self.logger)
        paramiko_compat.fix_speed_defects(self.logger)  # asbytes, MAC comparison: process-wide, same results

    def add_export(self, path: str, read_only: bool = False) -> None:
        """Serve the local directory ``path`` (absolute) from now on."""
        self.exports.add(path, read_only=read_only)
        self.logger(f"exporting {path}{' (read-only)' if read_only else ''}", loglevel=log.loglevel_INFO)

    def remove_export(self, path: str) -> None:
        """Stop serving ``path``; open handles under it stop working at once."""
        if self.exports.remove(path):
            self.logger(f"no longer exporting {path}", loglevel=log.loglevel_INFO)

    def notify(self, chan: paramiko.Channel | None = None) -> None:
        if chan is not None:
            # The tcpip-forward handler calls us in the outer transport's
            # thread, where the channel's buffer can be swapped safely.
            tuning.use_chunk_pipe(chan, yield_to_reader=True)
            tuning.set_window_ack_threshold(chan)
        super().notify(chan)

    def _start_channel_thread(self, chan: paramiko.Channel) -> None:
        arrived = time.monotonic()
        login = self.login_gate.admit()
        if login is None:  # too many connections logging in: no thread, no key exchange
            with contextlib.suppress(OSError, EOFError):  # the transport died first
                chan.close()
            return
        self.logger(f"sFTP channel {chan} for server port [127.0.0.1]:{self.server_port} is up",
                    loglevel=log.loglevel_DEBUG)
        kwargs: dict[str, Any] = {
            "chan": chan,
            "auth_key": self.auth_key,
            "logger": self.logger.wrapped,
            "exports": self.exports,
            "host_key": self.host_key,
            "username": self.username,
            "login_grace_time": self.login_grace_time,
            "arrived": arrived,
            "login": login,
            "session_observer": self.session_observer,
        }
        thread = X2GoRevFwSFTPChannelThread(chan, target=x2go_rev_forward_sftpchannel_handler,
                                            kwargs=kwargs)
        kwargs["thread"] = thread
        if not self._track(thread, chan):
            login.done()

    def stop_thread(self) -> None:
        """End the tunnel, close every session, and release the exports it created."""
        super().stop_thread()
        if self._owns_exports:
            self.exports.clear()
