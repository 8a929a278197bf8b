"""Reverse port forwarding over python-x2go's SSH connection (``x2go.rforward`` compatible).

python-x2go asks the X2Go server to listen on a port (``tcpip-forward``) and
receives every connection to it as a ``forwarded-tcpip`` channel on its one
SSH transport.  paramiko calls a single handler per transport for all such
channels; :func:`x2go_transport_tcp_handler` routes each to the tunnel that
owns its server port.

The original queued every channel on the transport's shared accept queue and
woke the matching tunnel, which then took *whichever* channel came first, so
the sound tunnel could take an sshfs channel.  Here the handler passes the
channel object itself to its tunnel; nothing shared is involved.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import socket
import threading
from collections.abc import Callable
from typing import Any

import paramiko

from . import log, paramiko_compat

# Bind address of the forward on the X2Go server: loopback only, as python-x2go.
FORWARD_ADDRESS = "127.0.0.1"

# How long pause()/stop_thread() wait for the server to confirm a cancel.
CANCEL_TIMEOUT = 10.0

# Relay buffer of the plain TCP forward (the original moved 1 KiB per syscall).
RELAY_CHUNK = 64 * 1024

# Connections one plain forward relays at once (X2Go's sound forward: each
# PulseAudio client on the X2Go server holds one; a desktop has a handful).
# Any local user of the X2Go server can connect to the forwarded port, no key
# needed, and each connection costs python-x2go's process two threads and a
# socket to the local service.  OpenSSH's ssh bounds the channels of one
# connection at CHANNELS_MAX_CHANNELS (16 * 1024, channels.c), each a
# descriptor of one process and no thread; we bound far lower because ours
# are threads.  Beyond it a new connection is closed at once, before its
# thread or socket exist; the ones being relayed go on.
MAX_RELAYS = 64

# How often a relay blocked reading its channel re-checks whether to stop
# (the other direction ended, or the tunnel was paused); closing the channel
# wakes it at once.
RELAY_RECHECK = 0.5

# Attribute on a paramiko Transport holding {server_port: tunnel} for tunnels
# that are not (or not yet) listed in python-x2go's ``reverse_tunnels``.
_REGISTRY_ATTR = "_x2go_sftp_tunnels"


def _registry(transport: Any) -> dict[int, X2GoRevFwTunnel]:
    reg = getattr(transport, _REGISTRY_ATTR, None)
    if reg is None:
        reg = {}
        setattr(transport, _REGISTRY_ATTR, reg)
    return reg


def find_tunnel(transport: Any, server_port: int) -> Any:
    """The tunnel registered on ``transport`` for ``server_port``, or None.

    Looks at our own per-transport registry, then at python-x2go's
    ``transport.reverse_tunnels`` (``{session: {'sshfs': (port, tunnel), 'snd': ...}}``).
    """
    tunnel = getattr(transport, _REGISTRY_ATTR, {}).get(int(server_port))
    if tunnel is not None:
        return tunnel
    rev_tuns = getattr(transport, "reverse_tunnels", None) or {}
    for entries in list(rev_tuns.values()):
        for entry in list((entries or {}).values()):
            if entry is None or entry[1] is None:
                continue
            try:
                if int(entry[0]) == int(server_port):
                    return entry[1]
            except (TypeError, ValueError):
                continue
    return None


def x2go_transport_tcp_handler(
    chan: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]
) -> None:
    """paramiko ``tcpip-forward`` handler: give ``chan`` to the tunnel of its server port.

    A channel for a port nobody registered is closed and logged.  Tunnels of
    other implementations (python-x2go's own) get the original protocol: the
    channel is queued on the transport and the tunnel is notified.
    """
    server_port = int(server[1])
    transport = chan.get_transport()
    tunnel = find_tunnel(transport, server_port)
    if tunnel is None:
        log.tagged(None, "rforward")(
            f"closing forwarded channel from {origin} for unregistered port {server_port}",
            loglevel=log.loglevel_WARN,
        )
        chan.close()
        return
    if isinstance(tunnel, X2GoRevFwTunnel):
        tunnel.notify(chan)
    else:
        paramiko_compat.queue_incoming_channel(transport, chan)
        tunnel.notify()


class X2GoRevFwChannelThread(threading.Thread):
    """A thread serving one forwarded channel (``x2go.rforward`` compatible)."""

    def __init__(self, channel: paramiko.Channel, remote: tuple[str, int] | None = None, **kwargs: Any):
        self.channel = channel
        if remote is not None:
            self.remote_host = remote[0]
            self.remote_port = remote[1]
        self.on_exit: Any = None
        threading.Thread.__init__(self, **kwargs)
        self.daemon = True

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.on_exit is not None:
                self.on_exit(self)

    def close_channel(self) -> None:
        """Close the channel this thread serves (its handler then returns)."""
        with contextlib.suppress(Exception):
            self.channel.close()


class X2GoRevFwTunnel(threading.Thread):
    """A reverse forwarded port on the X2Go server, relayed to ``remote_host:remote_port``.

    Args:
        server_port: the port the X2Go server listens on (on its loopback).
        remote_host: where to relay connections to, locally.
        remote_port: the local port to relay to.
        ssh_transport: python-x2go's paramiko ``Transport`` to the X2Go server.
        session_instance: python-x2go's ``X2GoSession`` (for its hooks), or None.
        logger: an ``X2GoLogger`` or compatible callable.
        loglevel: level mask of the logger created when ``logger`` is None.
        max_relays: connections relayed at once; more are closed on arrival
            (default :data:`MAX_RELAYS`).
    """

    _log_tag = "rforward"

    def __init__(
        self,
        server_port: int,
        remote_host: str,
        remote_port: int,
        ssh_transport: paramiko.Transport,
        session_instance: Any = None,
        logger: log.LoggerLike | None = None,
        loglevel: int = log.loglevel_DEFAULT,
        *,
        max_relays: int | None = None,
    ):
        self.logger = log.tagged(logger, self._log_tag, loglevel)
        self.max_relays = MAX_RELAYS if max_relays is None else max_relays
        self._refusals = log.RateLimiter()
        self.server_port = server_port
        self.remote_host = remote_host
        self.remote_port = remote_port
        self.ssh_transport = ssh_transport
        self.session_instance = session_instance
        self.open_channels: dict[str, X2GoRevFwChannelThread] = {}
        self.incoming_channel = threading.Condition()
        self.ready = False
        self._ready_event = threading.Event()
        self._pending: collections.deque[paramiko.Channel] = collections.deque()
        self._legacy_wakeups = 0
        self._accept_channels = True
        self._keepalive = True
        self._forwarded = False
        self._requested_port: int | None = None
        threading.Thread.__init__(self)
        self.daemon = True

    # -- forwarding ------------------------------------------------------------
    @property
    def forwarding(self) -> bool:
        """True while the server has granted our port forward."""
        return self._forwarded

    def _request_port_forwarding(self) -> bool:
        """Ask for the forward; on refusal cancel stale ones and retry once (as the original)."""
        _registry(self.ssh_transport)[int(self.server_port)] = self
        for attempt in (1, 2):
            try:
                self._requested_port = self.ssh_transport.request_port_forward(
                    FORWARD_ADDRESS, self.server_port, handler=x2go_transport_tcp_handler
                )
                if not self.server_port and self._requested_port:
                    # Port 0: the server picked one; route its channels to us.
                    registry = _registry(self.ssh_transport)
                    registry.pop(0, None)
                    self.server_port = self._requested_port
                    registry[int(self.server_port)] = self
                self._forwarded = True
                self.logger(
                    f"reverse forward [{FORWARD_ADDRESS}]:{self.server_port} granted",
                    loglevel=log.loglevel_DEBUG,
                )
                return True
            except paramiko.SSHException as e:
                if attempt == 1:
                    # A stale forward of an earlier run may hold the port.
                    self.cancel_port_forward(FORWARD_ADDRESS, self.server_port)
                    continue
                if self.session_instance is not None:
                    self.session_instance.HOOK_rforward_request_denied(server_port=self.server_port)
                else:
                    self.logger(
                        f"reverse forward of port {self.server_port} denied: {e}",
                        loglevel=log.loglevel_WARN,
                    )
        return False

    def cancel_port_forward(self, address: str, port: int) -> None:
        """Ask the server to drop the forward of ``address:port`` (waits at most CANCEL_TIMEOUT).

        Sends the global request directly: paramiko's own ``cancel_port_forward``
        also clears the transport's forwarding handler, which other tunnels on
        the same transport still need.
        """
        transport = self.ssh_transport
        if transport is None or not transport.is_active():
            return
        done = threading.Event()

        def cancel() -> None:
            try:
                transport.global_request("cancel-tcpip-forward", (address, port), wait=True)
            except Exception:
                pass
            finally:
                done.set()

        threading.Thread(target=cancel, daemon=True, name=f"cancel-forward-{port}").start()
        if not done.wait(CANCEL_TIMEOUT):
            self.logger(f"server did not confirm cancelling port {port}", loglevel=log.loglevel_WARN)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until :meth:`run` has settled the forward request (``ready``); True if it has."""
        return self._ready_event.wait(timeout)

    # -- lifecycle ------------------------------------------------------------
    def notify(self, chan: paramiko.Channel | None = None) -> None:
        """Hand an incoming channel to this tunnel.

        With no argument (the original protocol), the tunnel takes the next
        channel from the transport's accept queue instead.
        """
        with self.incoming_channel:
            if chan is not None:
                self._pending.append(chan)
            else:
                self._legacy_wakeups += 1
            self.incoming_channel.notify()

    def pause(self) -> None:
        """Stop accepting, cancel the forward and close every session this tunnel has open."""
        if self._accept_channels:
            self._accept_channels = False
            if self._forwarded:
                self._forwarded = False
                self.cancel_port_forward(FORWARD_ADDRESS, self.server_port)
            self.logger(f"paused tunnel on port {self.server_port}", loglevel=log.loglevel_DEBUG)
        self._close_open_channels()

    def resume(self) -> None:
        """Accept again and ask for the forward again."""
        if not self._accept_channels:
            self._accept_channels = True
            self._request_port_forwarding()
            self.logger(f"resumed tunnel on port {self.server_port}", loglevel=log.loglevel_DEBUG)

    def stop_thread(self) -> None:
        """End the tunnel: pause, then let :meth:`run` return."""
        self.pause()
        self._keepalive = False
        reg = getattr(self.ssh_transport, _REGISTRY_ATTR, None)
        if reg is not None and reg.get(int(self.server_port)) is self:
            del reg[int(self.server_port)]
        with self.incoming_channel:
            self.incoming_channel.notify_all()

    def __del__(self) -> None:
        # python-x2go calls tunnel.__del__() explicitly when a session ends.
        with contextlib.suppress(Exception):
            if getattr(self, "_keepalive", False) and self.is_alive():
                self.stop_thread()

    def _close_open_channels(self) -> None:
        for thread in list(self.open_channels.values()):
            thread.close_channel()
        with self.incoming_channel:
            pending, self._pending = list(self._pending), collections.deque()
        for chan in pending:
            try:
                chan.close()
            except Exception as e:  # the connection is gone already: nothing left to close on it
                self.logger(f"closing a pending channel on port {self.server_port}: {e!r}",
                            loglevel=log.loglevel_DEBUG)

    def _next_channel(self) -> paramiko.Channel | None:
        with self.incoming_channel:
            while self._keepalive and not self._pending and not self._legacy_wakeups:
                self.incoming_channel.wait()
            if not self._keepalive:
                return None
            if self._pending:
                return self._pending.popleft()
            self._legacy_wakeups -= 1
        return self.ssh_transport.accept(timeout=CANCEL_TIMEOUT)

    def run(self) -> None:
        """Request the forward, then serve channels until :meth:`stop_thread`."""
        if self._keepalive:
            self._request_port_forwarding()
        self.ready = True
        self._ready_event.set()
        try:
            while self._keepalive:
                chan = self._next_channel()
                if chan is None:
                    continue
                if not (self._accept_channels and self._keepalive):
                    chan.close()
                    continue
                self._start_channel_thread(chan)
        finally:
            self.ready = False
            self._close_open_channels()
            for thread in list(self.open_channels.values()):
                thread.join(CANCEL_TIMEOUT)

    def _start_channel_thread(self, chan: paramiko.Channel) -> None:
        # Only this thread adds to open_channels, so the count cannot pass the cap.
        if len(self.open_channels) >= self.max_relays:
            log.limited(self.logger, self._refusals,
                        f"refusing a connection to port {self.server_port}: {self.max_relays} are "
                        f"relayed already (limit max_relays)", loglevel=log.loglevel_WARN)
            with contextlib.suppress(OSError, EOFError):  # the transport died first
                chan.close()
            return
        thread = X2GoRevFwChannelThread(
            chan,
            (self.remote_host, self.remote_port),
            target=x2go_rev_forward_channel_handler,
            kwargs={
                "chan": chan,
                "addr": self.remote_host,
                "port": self.remote_port,
                "parent_thread": self,
                "logger": self.logger,
            },
        )
        self._track(thread, chan)

    def _track(self, thread: X2GoRevFwChannelThread, chan: paramiko.Channel) -> bool:
        """Remember ``thread`` as serving ``chan`` and start it; False if it could not start (``chan`` is closed)."""
        origin = chan.origin_addr
        key = f"[{origin[0]}]:{origin[1]}" if origin else f"chan-{chan.get_id()}"

        def forget(t: X2GoRevFwChannelThread) -> None:
            if self.open_channels.get(key) is t:
                del self.open_channels[key]

        thread.on_exit = forget
        self.open_channels[key] = thread
        try:
            thread.start()
        except RuntimeError as e:
            # "can't start new thread": out of threads or memory.  Refuse this
            # one channel; the tunnel and every session it serves go on.
            forget(thread)
            self.logger(f"refused channel {chan}: could not start its thread: {e}", loglevel=log.loglevel_WARN)
            with contextlib.suppress(OSError, EOFError):  # the transport died first
                chan.close()
            return False
        if not self._accept_channels:  # paused while we were starting it
            thread.close_channel()
        return True


def relay(sock: socket.socket, chan: paramiko.Channel, keep_going: Callable[[], bool] = lambda: True) -> None:
    """Copy bytes both ways between ``sock`` and ``chan`` until either side ends.

    Returns on EOF from either side or when ``keep_going()`` turns false (checked
    at least every :data:`RELAY_RECHECK` seconds; closing the channel wakes it
    at once).  Raises OSError/EOFError from the sockets; closing both is the
    caller's job.

    One thread per direction, each blocked in a plain ``recv``.  Never
    ``select()`` on the channel: that gives it an OS pipe which paramiko's
    transport thread writes to while another thread may be closing it (paramiko
    issues 1700, 2271), and the resulting EBADF ends the *outer* transport,
    python-x2go's whole connection.
    """
    state = _RelayState()
    chan.settimeout(RELAY_RECHECK)  # before the other direction may block in send()
    try:
        upstream = threading.Thread(target=_sock_to_chan, args=(sock, chan, state), daemon=True,
                                    name=f"{threading.current_thread().name}-up")
        upstream.start()
    except RuntimeError as e:  # "can't start new thread"
        raise OSError(errno.EAGAIN, f"cannot start the relay's thread: {e}") from e
    try:
        _chan_to_sock(sock, chan, state, keep_going)
    except BaseException as e:
        state.error = state.error or e
    finally:
        state.done.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the other direction's recv
        upstream.join()
    if state.error is not None:
        raise state.error


class _RelayState:
    """What the two directions of one :func:`relay` share."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


def _chan_to_sock(sock: socket.socket, chan: paramiko.Channel, state: _RelayState,
                  keep_going: Callable[[], bool]) -> None:
    while keep_going() and not state.done.is_set():
        try:
            data = chan.recv(RELAY_CHUNK)
        except TimeoutError:
            continue
        if not data:
            return
        sock.sendall(data)


def _sock_to_chan(sock: socket.socket, chan: paramiko.Channel, state: _RelayState) -> None:
    send = paramiko_compat.channel_sender(chan)  # never DATA after the channel's CLOSE (see there)
    try:
        while not state.done.is_set():
            data = sock.recv(RELAY_CHUNK)
            if not data:
                break
            while data:  # Channel.sendall loses count of what it sent when it times out
                try:
                    data = data[send(data):]
                except TimeoutError:
                    if state.done.is_set():
                        return
        if not state.done.is_set():
            # EOF from the socket: pass it on, so the far side can close and
            # wake the other direction before its next re-check.
            chan.shutdown_write()
    except (OSError, EOFError) as e:
        if not state.done.is_set():
            state.error = e
    finally:
        state.done.set()


def x2go_rev_forward_channel_handler(
    chan: paramiko.Channel | None = None,
    addr: str = "",
    port: int = 0,
    parent_thread: X2GoRevFwTunnel | None = None,
    logger: log.LoggerLike | None = None,
) -> None:
    """Relay bytes between ``chan`` and a new TCP connection to ``addr:port``.

    Ends when either side closes, or when the parent tunnel is paused (which
    closes the channel).
    """
    assert chan is not None
    xlog = log.tagged(logger, "rforward")
    try:
        fw_socket = socket.create_connection((addr, port))
    except OSError as e:
        xlog(f"reverse forwarding request to {addr}:{port} failed: {e!r}", loglevel=log.loglevel_INFO)
        chan.close()
        return
    fw_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    xlog(f"reverse tunnel open {chan.origin_addr!r} -> {(addr, port)!r}", loglevel=log.loglevel_INFO)
    try:
        relay(fw_socket, chan, lambda: parent_thread is None or parent_thread._accept_channels)
    except (OSError, EOFError) as e:
        xlog(f"reverse tunnel {chan} socket error: {e}", loglevel=log.loglevel_WARN)
    finally:
        with contextlib.suppress(OSError, EOFError):  # the transport died first
            chan.close()
        fw_socket.close()
    xlog(f"reverse tunnel {chan} closed", loglevel=log.loglevel_INFO)
