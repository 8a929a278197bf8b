"""The tunnel end to end over the in-process X2Go server: sessions, lifecycle, auth, routing."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import stat
import threading
from pathlib import Path

import paramiko
import pytest

from tests.netutil import LocalService
from x2go_sftp import X2GoRevFwTunnel, X2GoRevFwTunnelToSFTP, log, rforward
from x2go_sftp.testing import ClientTransport, sftp_client


def test_full_sftp_session(sftp: paramiko.SFTPClient, export_dir: str):
    assert sftp.normalize(".") == export_dir
    assert sftp.listdir(export_dir) == ["hello.txt"]
    payload = os.urandom(300_000)
    with sftp.open(export_dir + "/data.bin", "wb") as f:
        f.write(payload)
    with sftp.open("data.bin", "rb") as f:  # relative: against the first export
        assert f.read() == payload
    with open(os.path.join(export_dir, "data.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    sftp.mkdir(export_dir + "/sub", 0o750)
    assert stat.S_IMODE(os.stat(os.path.join(export_dir, "sub")).st_mode) == 0o750
    sftp.rename(export_dir + "/data.bin", export_dir + "/sub/moved.bin")
    assert os.path.getsize(os.path.join(export_dir, "sub", "moved.bin")) == len(payload)
    sftp.symlink("moved.bin", export_dir + "/sub/link")
    assert sftp.readlink(export_dir + "/sub/link") == "moved.bin"
    assert stat.S_ISLNK(sftp.lstat(export_dir + "/sub/link").st_mode)
    assert sftp.stat(export_dir + "/sub/link").st_size == len(payload)
    sftp.chmod(export_dir + "/sub/moved.bin", 0o600)
    sftp.utime(export_dir + "/sub/moved.bin", (1_000_000, 2_000_000))
    st = os.stat(os.path.join(export_dir, "sub", "moved.bin"))
    assert (stat.S_IMODE(st.st_mode), int(st.st_atime), int(st.st_mtime)) == (0o600, 1_000_000, 2_000_000)
    with sftp.open(export_dir + "/sub/moved.bin", "rb") as f:
        assert f.stat().st_size == len(payload)
    sftp.remove(export_dir + "/sub/link")
    sftp.remove(export_dir + "/sub/moved.bin")
    sftp.rmdir(export_dir + "/sub")
    assert os.listdir(export_dir) == ["hello.txt"]


def test_rmdir_is_never_recursive(sftp: paramiko.SFTPClient, export_dir: str):
    os.makedirs(os.path.join(export_dir, "full", "deeper"))
    with pytest.raises(OSError):
        sftp.rmdir(export_dir + "/full")
    assert os.path.isdir(os.path.join(export_dir, "full", "deeper"))


def test_errors_are_statuses_and_the_session_survives(sftp: paramiko.SFTPClient, export_dir: str):
    with pytest.raises(FileNotFoundError):
        sftp.remove(export_dir + "/missing")
    with pytest.raises(OSError):
        sftp.remove(export_dir)  # the export root itself
    with pytest.raises(FileNotFoundError):
        sftp.open(export_dir + "/missing/x", "wb")
    assert sftp.listdir(export_dir) == ["hello.txt"]  # still serving


@pytest.mark.parametrize(
    "path",
    ["/etc", "/", "/etc/passwd", "{e}/../../etc/passwd", "{e}/../", "//etc/passwd", "../../../../etc/passwd"],
)
def test_outside_paths_are_refused(sftp: paramiko.SFTPClient, export_dir: str, path: str):
    with pytest.raises(PermissionError):
        sftp.stat(path.format(e=export_dir))


def test_nothing_exported_refuses_everything(make_tunnel, connect, caplog: pytest.LogCaptureFixture):
    client = connect(make_tunnel([]))
    with caplog.at_level(logging.WARNING, logger="x2go_sftp"):
        for call in (
            lambda: client.listdir("/"),
            lambda: client.stat("/tmp"),
            lambda: client.open(f"/tmp/x2go-sftp-{os.getpid()}-must-not-exist", "wb"),
            lambda: client.listdir("."),
        ):
            with pytest.raises(PermissionError):
                call()
    assert not os.path.exists(f"/tmp/x2go-sftp-{os.getpid()}-must-not-exist")
    assert any("nothing is exported" in r.getMessage() for r in caplog.records)


def test_exports_added_and_removed_while_running(make_tunnel, connect, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "f").write_text("b")
    tunnel = make_tunnel([str(a)])
    client = connect(tunnel)
    with pytest.raises(PermissionError):
        client.listdir(str(b))
    tunnel.add_export(str(b), read_only=True)
    assert client.listdir(str(b)) == ["f"]
    with pytest.raises(PermissionError):
        client.open(str(b / "new"), "wb")
    tunnel.remove_export(str(b))
    with pytest.raises(PermissionError):
        client.listdir(str(b))


def test_pause_closes_sessions_refuses_new_and_resume_serves(make_tunnel, connect, x2go_server, export_dir):
    tunnel = make_tunnel([export_dir])
    port = tunnel.server_port
    client = connect(tunnel)
    assert client.listdir(export_dir) == ["hello.txt"]
    assert len(tunnel.open_channels) == 1
    tunnel.pause()
    # The cancel used the bind address of the request (the original sent '').
    assert ("127.0.0.1", port) in x2go_server.cancel_requests
    assert not tunnel.forwarding
    with pytest.raises((OSError, EOFError, paramiko.SSHException)):
        client.listdir(export_dir)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    for thread in list(tunnel.open_channels.values()):
        thread.join(10)
    assert tunnel.open_channels == {}
    tunnel.resume()
    assert tunnel.forwarding and tunnel.server_port == port
    assert connect(tunnel).listdir(export_dir) == ["hello.txt"]


def test_stop_thread_leaves_no_thread_or_fd(
    no_leaks, x2go_server, session_key, host_key, export_dir, local_user
):
    outer = x2go_server.connect()
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=session_key, exports=[export_dir], host_key=host_key)
    tunnel.start()
    assert tunnel.wait_ready(30) and tunnel.ready
    transport, client = sftp_client(tunnel.server_port, session_key, local_user)
    f = client.open(export_dir + "/open-at-stop", "wb")
    f.write(b"x")
    f.flush()
    port = tunnel.server_port
    assert len(tunnel.open_channels) == 1
    tunnel.stop_thread()
    tunnel.join(10)
    assert not tunnel.is_alive() and not tunnel.ready
    # The forward was cancelled for the address requested, and the running session was ended.
    assert ("127.0.0.1", port) in x2go_server.cancel_requests
    with pytest.raises((OSError, EOFError, paramiko.SSHException)):
        client.listdir(export_dir)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert tunnel.open_channels == {}
    assert (Path(export_dir) / "open-at-stop").read_bytes() == b"x"  # what was written before the stop
    transport.close()
    outer.close()
    x2go_server.close()


def test_explicit_del_as_python_x2go_calls_it(make_tunnel, export_dir):
    tunnel = make_tunnel([export_dir])
    tunnel.__del__()
    tunnel.join(10)
    assert not tunnel.is_alive()


def test_channel_without_auth_key_is_closed(make_tunnel, export_dir, session_key, local_user):
    tunnel = make_tunnel([export_dir], auth_key=None)
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        sftp_client(tunnel.server_port, session_key, local_user)


def _transport_to(tunnel: X2GoRevFwTunnelToSFTP) -> paramiko.Transport:
    transport = ClientTransport(socket.create_connection(("127.0.0.1", tunnel.server_port)))
    transport.start_client()
    return transport


def test_auth_accepts_only_the_session_key_for_the_local_user(
    make_tunnel, export_dir, session_key, other_key, local_user
):
    tunnel = make_tunnel([export_dir])
    for user, key in ((local_user, other_key), ("someoneelse", session_key)):
        transport = _transport_to(tunnel)
        try:
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_publickey(user, key)
        finally:
            transport.close()
    transport = _transport_to(tunnel)
    try:
        with pytest.raises(paramiko.BadAuthenticationType) as info:
            transport.auth_password(local_user, "anything")
        assert info.value.allowed_types == ["publickey"]
    finally:
        transport.close()


@pytest.mark.parametrize("sig", ["rsa-sha2-256", "rsa-sha2-512"])
def test_rsa_sha2_signatures(make_tunnel, export_dir, session_key, local_user, sig):
    tunnel = make_tunnel([export_dir])
    others = {"ssh-rsa", "rsa-sha2-256", "rsa-sha2-512"} - {sig}
    transport = ClientTransport(
        socket.create_connection(("127.0.0.1", tunnel.server_port)),
        disabled_algorithms={"pubkeys": sorted(others)},
    )
    try:
        transport.start_client()
        transport.auth_publickey(local_user, session_key)
        assert transport.is_authenticated()
    finally:
        transport.close()


def test_only_sessions_and_only_the_sftp_subsystem(make_tunnel, export_dir, session_key, local_user):
    tunnel = make_tunnel([export_dir])
    transport = _transport_to(tunnel)
    try:
        transport.auth_publickey(local_user, session_key)
        chan = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            chan.exec_command("id")
        chan = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            chan.invoke_shell()
        chan = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            chan.invoke_subsystem("netconf")
        with pytest.raises(paramiko.ChannelException):
            transport.open_channel("direct-tcpip", ("127.0.0.1", 22), ("127.0.0.1", 0))
    finally:
        transport.close()


def echo_back(conn: socket.socket) -> None:
    """Stands for the sound daemon a plain X2Go tunnel reaches: answers each piece with "echo:" + it."""
    while data := conn.recv(65536):
        conn.sendall(b"echo:" + data)


def test_two_tunnels_on_one_transport_get_only_their_own_channels(make_tunnel, outer, connect, export_dir):
    echo = LocalService(echo_back, name="echo-service")
    snd = X2GoRevFwTunnel(0, "127.0.0.1", echo.port, outer)
    snd.start()
    try:
        assert snd.wait_ready(30)
        sshfs = make_tunnel([export_dir])
        # python-x2go's registry shape; routing must also work through it.
        outer.reverse_tunnels = {
            "session-1": {"sshfs": (sshfs.server_port, sshfs), "snd": (snd.server_port, snd)}
        }
        clients, socks = [], []
        for _ in range(4):  # interleave connections to both ports
            s = socket.create_connection(("127.0.0.1", snd.server_port))
            socks.append(s)
            clients.append(connect(sshfs))
        for i, s in enumerate(socks):
            s.sendall(b"ping%d" % i)
            assert s.recv(100) == b"echo:ping%d" % i
            s.close()
        for c in clients:
            assert c.listdir(export_dir) == ["hello.txt"]
        assert all(isinstance(t, rforward.X2GoRevFwChannelThread) for t in snd.open_channels.values())
    finally:
        snd.stop_thread()
        snd.join(10)
        echo.close()
    assert not snd.is_alive()


def test_channel_for_an_unregistered_port_is_closed(
    make_tunnel, x2go_server, outer, export_dir, caplog: pytest.LogCaptureFixture
):
    make_tunnel([export_dir])  # installs our handler on the transport
    server_side = x2go_server.transports[-1]
    with caplog.at_level(logging.WARNING, logger="x2go_sftp"):
        try:
            chan = server_side.open_forwarded_tcpip_channel(("127.0.0.1", 5555), ("127.0.0.1", 1))
        except paramiko.SSHException:
            pass  # closed before paramiko's open_channel() saw it active
        else:
            assert chan.recv(10) == b""  # closed by the client side
    assert any("unregistered port 1" in r.getMessage() for r in caplog.records)


def test_legacy_notify_without_channel_takes_from_accept_queue(make_tunnel, outer, connect, export_dir):
    tunnel = make_tunnel([export_dir])

    def legacy_handler(chan, origin, server):  # python-x2go 0.6's own routing
        chan.get_transport()._queue_incoming_channel(chan)
        tunnel.notify()

    outer._tcp_handler = legacy_handler
    assert connect(tunnel).listdir(export_dir) == ["hello.txt"]


class FakeSession:
    def __init__(self) -> None:
        self.denied: list[int] = []

    def HOOK_rforward_request_denied(self, server_port: int) -> None:  # python-x2go's name
        self.denied.append(server_port)


def test_denied_forward_retries_once_then_calls_the_session_hook(make_tunnel, x2go_server, export_dir):
    x2go_server.refuse_forwards = True
    session = FakeSession()
    tunnel = make_tunnel([export_dir], server_port=31337, session_instance=session)
    assert tunnel.ready and not tunnel.forwarding  # settled, so python-x2go's wait loop ends
    assert session.denied == [31337]
    assert x2go_server.cancel_requests == [("127.0.0.1", 31337)]  # the one retry cleans up first


def test_denied_forward_without_session_logs_a_warning(
    make_tunnel, x2go_server, export_dir, caplog: pytest.LogCaptureFixture
):
    x2go_server.refuse_forwards = True
    with caplog.at_level(logging.WARNING, logger="x2go_sftp"):
        make_tunnel([export_dir], server_port=31338)
    assert any("31338 denied" in r.getMessage() for r in caplog.records)


def test_open_channels_are_tracked_and_forgotten(make_tunnel, export_dir, session_key, local_user):
    tunnel = make_tunnel([export_dir], loglevel=log.loglevel_DEFAULT)
    transport, client = sftp_client(tunnel.server_port, session_key, local_user)
    client.listdir(export_dir)
    ((key, thread),) = tunnel.open_channels.items()
    assert key.startswith("[127.0.0.1]:")
    transport.close()
    thread.join(10)
    assert not thread.is_alive() and tunnel.open_channels == {}


def test_subclass_written_for_the_original_keeps_working(
    outer, session_key, host_key, export_dir, local_user
):
    notified = []

    class Custom(X2GoRevFwTunnelToSFTP):
        def notify(self, chan=None):
            notified.append(chan is not None)
            super().notify(chan)

    tunnel = Custom(
        0, outer, session_key, None, None, log.loglevel_DEFAULT, exports=[export_dir], host_key=host_key
    )
    tunnel.start()
    try:
        assert tunnel.wait_ready(30)
        transport, client = sftp_client(tunnel.server_port, session_key, local_user)
        assert client.listdir(export_dir) == ["hello.txt"]
        transport.close()
        assert notified == [True]
    finally:
        tunnel.stop_thread()
        tunnel.join(10)


def test_handler_called_positionally_like_the_original(x2go_server, outer, session_key, local_user):
    """x2go_rev_forward_sftpchannel_handler(chan, auth_key, logger): serves, with nothing exported."""
    from x2go_sftp.sftpserver import x2go_rev_forward_sftpchannel_handler

    threads = []

    def handler(chan, origin, server):
        t = threading.Thread(
            target=x2go_rev_forward_sftpchannel_handler,
            args=(chan, session_key, log.X2GoLogger()),
            daemon=True,
        )
        threads.append(t)
        t.start()

    port = outer.request_port_forward("127.0.0.1", 0, handler=handler)
    transport, client = sftp_client(port, session_key, local_user)
    try:
        with pytest.raises(PermissionError):
            client.listdir("/")
    finally:
        transport.close()
        threads[0].join(10)
    assert not threads[0].is_alive()


def test_read_only_refusal_has_the_permission_errno(make_tunnel, connect, export_dir):
    client = connect(make_tunnel([(export_dir, True)]))
    with pytest.raises(PermissionError) as info:
        client.open(export_dir + "/hello.txt", "ab")
    assert info.value.errno == errno.EACCES
    assert Path(export_dir, "hello.txt").read_text() == "hello\n"


def test_a_fifo_in_the_export_cannot_hang_the_session(sftp: paramiko.SFTPClient, export_dir: str):
    """Opening a FIFO would block the server until a writer appears; it is refused instead."""
    os.mkfifo(os.path.join(export_dir, "pipe"))
    for mode in ("rb", "wb"):
        with pytest.raises(OSError):
            sftp.open(export_dir + "/pipe", mode)
    assert stat.S_ISFIFO(sftp.stat(export_dir + "/pipe").st_mode)
    assert sorted(sftp.listdir(export_dir)) == ["hello.txt", "pipe"]  # still serving
