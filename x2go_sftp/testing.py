"""An in-process stand-in for the X2Go server's sshd, for the demo and for tests.

:class:`LoopbackX2GoServer` is a real paramiko SSH server on 127.0.0.1.  It
accepts any password (it stands for the X2Go server that python-x2go logged
into), grants ``tcpip-forward`` by listening on a loopback port itself, and
relays every connection to that port to the client as a ``forwarded-tcpip``
channel, exactly as sshd does for ``ssh -R``.  Real clients (paramiko's
SFTPClient, OpenSSH ``sftp``, sshfs) can therefore reach a tunnel through real
sockets.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import paramiko
from paramiko.common import (
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from . import log, paramiko_compat, tuning
from .rforward import relay

# Every thread of the stand-in server (it stands for another machine's sshd)
# is named with this prefix, so tests can count the client's threads apart.
SERVER_THREAD_PREFIX = "x2go-server-"


def _relay(sock: socket.socket, chan: paramiko.Channel) -> None:
    """sshd's side of one forwarded connection: copy until either side ends, then close both."""
    try:
        relay(sock, chan)
    except (OSError, EOFError):
        pass
    finally:
        with contextlib.suppress(OSError, EOFError):  # the transport died first
            chan.close()
        sock.close()


class _Forward:
    """One granted ``tcpip-forward``: a loopback listener feeding the client."""

    def __init__(self, transport: paramiko.Transport, address: str, port: int):
        self.transport = transport
        self.address = address
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.port: int = self.listener.getsockname()[1]
        self._closed = False
        self.relays: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True,
                                       name=f"{SERVER_THREAD_PREFIX}fwd-{self.port}")
        self.thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                chan = self.transport.open_forwarded_tcpip_channel(peer, (self.address, self.port))
            except Exception:
                sock.close()
                continue
            relay = threading.Thread(target=_relay, args=(sock, chan), daemon=True,
                                     name=f"{SERVER_THREAD_PREFIX}relay-{self.port}")
            self.relays = [t for t in self.relays if t.is_alive()] + [relay]
            relay.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


class _ServerPolicy(paramiko.ServerInterface):
    def __init__(self, owner: LoopbackX2GoServer, transport_ref: list[paramiko.Transport]):
        self.owner = owner
        self.transport_ref = transport_ref

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return (
            OPEN_SUCCEEDED if kind == "session" else OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        )

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        # Stands for python-x2go's x2go* commands: accept, answer nothing, exit 0.
        def finish() -> None:
            channel.send_exit_status(0)
            channel.close()

        threading.Thread(target=finish, daemon=True, name=f"{SERVER_THREAD_PREFIX}exec").start()
        return True

    def check_port_forward_request(self, address: str, port: int) -> int | bool:
        if self.owner.refuse_forwards:
            return False
        key = (address, port)
        with self.owner.lock:
            if port and any(f.port == port for f in self.owner.forwards.values()):
                return False  # already forwarded, as sshd answers
            try:
                fwd = _Forward(self.transport_ref[0], address, port)
            except OSError:
                return False
            self.owner.forwards[(address, fwd.port)] = fwd
            self.owner.forward_requests.append(key)
        return fwd.port

    def cancel_port_forward_request(self, address: str, port: int) -> None:
        with self.owner.lock:
            self.owner.cancel_requests.append((address, port))
            fwd = self.owner.forwards.pop((address, port), None)
        if fwd is not None:
            fwd.close()


class LoopbackX2GoServer:
    """A paramiko SSH server on 127.0.0.1 that grants and serves reverse forwards.

    Args:
        host_key: its host key (default: a fresh 2048-bit RSA key).
    """

    def __init__(self, host_key: paramiko.PKey | None = None):
        self.host_key = host_key or paramiko.RSAKey.generate(2048)
        self.lock = threading.Lock()
        self.forwards: dict[tuple[str, int], _Forward] = {}
        self.forward_requests: list[tuple[str, int]] = []
        self.cancel_requests: list[tuple[str, int]] = []
        self.refuse_forwards = False
        self.transports: list[paramiko.Transport] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"{SERVER_THREAD_PREFIX}accept")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as sshd does
            transport = paramiko.Transport(sock)
            transport.name = f"{SERVER_THREAD_PREFIX}transport"
            offer_gcm(transport)  # as sshd does (it stands for one)
            transport.add_server_key(self.host_key)
            ref: list[paramiko.Transport] = [transport]
            self.transports.append(transport)
            try:
                transport.start_server(server=_ServerPolicy(self, ref))
            except (paramiko.SSHException, EOFError, OSError):
                transport.close()

    def connect(self, username: str = "x2gouser") -> paramiko.Transport:
        """A client transport logged into this server, as python-x2go's control session."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        transport = paramiko.Transport(sock)
        transport.start_client()
        transport.auth_password(username, "secret")
        return transport

    def forwarded_port(self) -> int | None:
        """The port of the most recent forward (for port-0 requests)."""
        with self.lock:
            ports = [port for (_, port) in self.forwards]
        return ports[-1] if ports else None

    def close(self) -> None:
        """Stop listening, close every forward and transport."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self.lock:
            forwards, self.forwards = list(self.forwards.values()), {}
        for fwd in forwards:
            fwd.close()
        for transport in self.transports:
            transport.close()
        self._thread.join(5)
        for fwd in forwards:
            fwd.thread.join(5)
            for relay_thread in fwd.relays:
                relay_thread.join(5)
        for transport in self.transports:
            transport.join(5)

    def __enter__(self) -> LoopbackX2GoServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def offer_gcm(transport: paramiko.Transport) -> None:
    """Make ``transport`` offer AES-GCM after its other ciphers, as OpenSSH does.

    On paramiko before 3.3, which has none, with :func:`paramiko_compat.backport_gcm`.
    """
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    options.ciphers = offered + tuple(c for c in tuning.gcm_ciphers(transport) if c not in offered)


class ClientTransport(paramiko.Transport):
    """paramiko's client ``Transport`` that offers AES-GCM on every release, as OpenSSH's clients do.

    The inner server offers only AES-GCM (:data:`tuning.PREFERRED_CIPHERS`);
    paramiko before 3.3 has none, so there a plain paramiko client cannot
    reach it.  Its packetizer is bounded as the inner server's.
    """

    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        paramiko_compat.bound_packetizer(self)
        offer_gcm(self)


def inner_speaks_gcm() -> bool:
    """True if an inner transport on this paramiko can agree on AES-GCM (paramiko's own, or the backport)."""
    from .inner import InnerTransport  # inner imports the engine; testing stays light to import

    a, b = socket.socketpair()
    transport = InnerTransport(a)
    try:
        return "aes128-gcm@openssh.com" in paramiko_compat.supported_ciphers(transport)
    finally:
        transport.close()
        b.close()


def sftp_client(
    port: int, key: paramiko.PKey, username: str, host: str = "127.0.0.1"
) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    """Log into a tunnel's forwarded port with ``key`` and open an SFTP session."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as OpenSSH's client does
    transport = ClientTransport(sock)
    try:
        transport.start_client()
        transport.auth_publickey(username, key)
        client = paramiko.SFTPClient.from_transport(transport)
    except BaseException:
        transport.close()
        raise
    assert client is not None
    log.tagged(None, "testing")(f"sftp client on port {port}", loglevel=log.loglevel_DEBUG)
    return transport, client
