"""Test topology.

    SFTP client (paramiko / OpenSSH sftp / sshfs)
        -> 127.0.0.1:<forwarded port>  (listener of the in-process X2Go server)
        -> forwarded-tcpip channel on the outer SSH connection
        -> our tunnel (X2GoRevFwTunnelToSFTP) -> inner SSH server -> SFTP engine -> jail -> files

``x2go_server`` is :class:`x2go_sftp.testing.LoopbackX2GoServer` (a real paramiko
SSH server on loopback); ``outer`` is python-x2go's side of the connection to
it; ``make_tunnel`` starts tunnels on it and always stops them.  Fixtures for
real OpenSSH sshd / sftp / sshfs live in ``tests/realpeers.py``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import paramiko
import pytest

from x2go_sftp import X2GoRevFwTunnelToSFTP
from x2go_sftp.defaults import current_local_user
from x2go_sftp.testing import LoopbackX2GoServer, sftp_client

pytest_plugins = ["tests.realpeers"]


@pytest.fixture(scope="session")
def session_key() -> paramiko.RSAKey:
    """The X2Go session key sshfs authenticates with."""
    return paramiko.RSAKey.generate(2048)


@pytest.fixture(scope="session")
def other_key() -> paramiko.RSAKey:
    return paramiko.RSAKey.generate(2048)


@pytest.fixture(scope="session")
def host_key() -> paramiko.RSAKey:
    """The inner server's host key (3072 bits, as our default)."""
    return paramiko.RSAKey.generate(3072)


@pytest.fixture(scope="session")
def local_user() -> str:
    return current_local_user()


@pytest.fixture
def x2go_server() -> Iterator[LoopbackX2GoServer]:
    server = LoopbackX2GoServer()
    yield server
    server.close()


@pytest.fixture
def outer(x2go_server: LoopbackX2GoServer) -> Iterator[paramiko.Transport]:
    """python-x2go's control-session transport to the X2Go server."""
    transport = x2go_server.connect()
    yield transport
    transport.close()


@pytest.fixture
def export_dir(tmp_path: Any) -> str:
    d = tmp_path / "export"
    d.mkdir()
    (d / "hello.txt").write_text("hello\n")
    return str(d)


@pytest.fixture
def make_tunnel(
    outer: paramiko.Transport, session_key: paramiko.RSAKey, host_key: paramiko.RSAKey
) -> Iterator[Callable[..., X2GoRevFwTunnelToSFTP]]:
    """Start tunnels on ``outer``; each is stopped and joined at teardown."""
    tunnels: list[X2GoRevFwTunnelToSFTP] = []

    def make(exports: Any = (), **kwargs: Any) -> X2GoRevFwTunnelToSFTP:
        kwargs.setdefault("auth_key", session_key)
        kwargs.setdefault("host_key", host_key)
        transport = kwargs.pop("ssh_transport", outer)
        tunnel = X2GoRevFwTunnelToSFTP(kwargs.pop("server_port", 0), transport, exports=exports, **kwargs)
        tunnels.append(tunnel)
        tunnel.start()
        assert tunnel.wait_ready(30)
        return tunnel

    yield make
    for tunnel in tunnels:
        tunnel.stop_thread()
    for tunnel in tunnels:
        tunnel.join(10)
        assert not tunnel.is_alive()


@pytest.fixture
def connect(session_key: paramiko.RSAKey, local_user: str) -> Iterator[Callable[..., paramiko.SFTPClient]]:
    """Open SFTP sessions through a tunnel's forwarded port; closed at teardown."""
    opened: list[paramiko.Transport] = []

    def open_(
        tunnel: X2GoRevFwTunnelToSFTP, key: paramiko.PKey | None = None, username: str | None = None
    ) -> paramiko.SFTPClient:
        transport, client = sftp_client(tunnel.server_port, key or session_key, username or local_user)
        opened.append(transport)
        return client

    yield open_
    for transport in opened:
        transport.close()


@pytest.fixture
def sftp(
    make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
    connect: Callable[..., paramiko.SFTPClient],
    export_dir: str,
) -> paramiko.SFTPClient:
    """An SFTP session through a tunnel exporting ``export_dir``."""
    return connect(make_tunnel([export_dir]))


def _thread_names() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.ident is not None}


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail if the test leaves threads or file descriptors behind.

    Waits for new threads by joining them (bounded), never by sleeping.
    """
    threads_before = _thread_names()
    fds_before = set(os.listdir("/proc/self/fd"))
    yield
    for t in threading.enumerate():
        if t.ident not in threads_before and t is not threading.current_thread():
            t.join(10)
    leaked = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"
    fds_after = set(os.listdir("/proc/self/fd"))
    extra = []
    for fd in fds_after - fds_before:
        try:
            extra.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            continue  # the descriptor of the listdir itself
    assert not extra, f"file descriptors left open: {extra}"
