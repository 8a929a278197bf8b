"""Hostile peers on the forwarded port: what anyone on the X2Go server can do without the key.

    local user of the X2Go server (no key) -> 127.0.0.1:<forwarded port>
        -> forwarded-tcpip channel on python-x2go's connection -> our tunnel

The port listens on the X2Go server's loopback, so every local user of that
multi-user machine can connect and speak (or not speak) SSH to the inner
server.  Each test here fails when the bound it checks is removed: the login
deadline (``inner.LOGIN_GRACE_TIME``), the pending-login cap
(``auth.MAX_STARTUPS``), the logged-in cap (``auth.MAX_CONNECTIONS``),
``auth.MAX_AUTH_TRIES``, ``auth.MAX_SESSIONS``, a thread that cannot start,
the relay of the plain TCP forward (no ``select()`` on channels) and its cap
(``rforward.MAX_RELAYS``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest

from tests.netutil import LocalService, echo
from tests.realpeers import RealSSHD, is_mounted, write_key_files
from x2go_sftp import X2GoRevFwTunnel, X2GoRevFwTunnelToSFTP, auth, log, rforward
from x2go_sftp.sftpserver import X2GoRevFwSFTPChannelThread
from x2go_sftp.testing import SERVER_THREAD_PREFIX, ClientTransport, sftp_client

# The login deadline of the tunnels in these tests (the default is 30 s).
GRACE = 1.0

# How long a test waits for something that the bound under test makes happen
# within GRACE (generous: the machine is shared).  Without the bound it never
# happens, and the wait ends in a failure.
SETTLE = 15.0

# Threads one pending connection may cost: its channel thread, the inner
# transport's thread, and paramiko's handshake timer (alive from the peer's
# banner to its first packet).
THREADS_PER_PENDING = 3

INFO_MASK = log.loglevel_DEFAULT | log.loglevel_INFO


# -- raw peers ---------------------------------------------------------------------------------

def kexinit_packet() -> bytes:
    """A client KEXINIT paramiko (2.12 .. 5.x) accepts, as an unencrypted SSH packet."""
    m = paramiko.Message()
    m.add_byte(bytes([20]))  # SSH_MSG_KEXINIT
    m.add_bytes(os.urandom(16))
    for names in (
        "curve25519-sha256@libssh.org,ecdh-sha2-nistp256,diffie-hellman-group14-sha256",
        "rsa-sha2-256,rsa-sha2-512,ssh-rsa",
        "aes128-gcm@openssh.com,aes128-ctr",
        "aes128-gcm@openssh.com,aes128-ctr",
        "hmac-sha2-256",
        "hmac-sha2-256",
        "none",
        "none",
        "",
        "",
    ):
        m.add_string(names)
    m.add_boolean(False)
    m.add_int(0)
    payload = m.asbytes()
    padding = 8 - (len(payload) + 5) % 8
    if padding < 4:
        padding += 8
    return struct.pack(">IB", len(payload) + 1 + padding, padding) + payload + bytes(padding)


def raw_peer(port: int, greeting: bytes = b"") -> socket.socket:
    """A TCP connection to the forwarded port that sends ``greeting`` and nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if greeting:
        sock.sendall(greeting)
    return sock


BANNER_AND_KEXINIT = b"SSH-2.0-quiet\r\n" + kexinit_packet()


def closed_by_peer(sock: socket.socket, timeout: float = 0.0) -> bool:
    """True once the far end has closed ``sock`` (waits up to ``timeout``); what it sent is discarded."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = max(deadline - time.monotonic(), 0.0)
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            return False
        try:
            if not sock.recv(65536):
                return True
        except OSError:  # reset
            return True


def wait_until(condition: Callable[[], bool], timeout: float = SETTLE, step: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        tick.wait(step)
    return True


def our_threads() -> list[threading.Thread]:
    """The threads of the client side (the stand-in X2Go server's own are left out)."""
    return [t for t in threading.enumerate() if not t.name.startswith((SERVER_THREAD_PREFIX, "flood"))]


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# -- before login ------------------------------------------------------------------------------

def test_quiet_peers_after_kexinit_are_dropped_by_the_deadline(
    no_leaks, make_tunnel, export_dir, caplog: pytest.LogCaptureFixture
):
    """20 peers send banner + KEXINIT and go quiet: each is closed at the login deadline.

    Without the deadline paramiko keeps them: its handshake timer stops at the first packet.
    """
    tunnel = make_tunnel([export_dir], login_grace_time=GRACE, max_startups=32, loglevel=INFO_MASK)
    with caplog.at_level(logging.INFO, logger="x2go_sftp"):
        peers = [raw_peer(tunnel.server_port, BANNER_AND_KEXINIT) for _ in range(20)]
        try:
            assert all(closed_by_peer(p, SETTLE) for p in peers)
            assert wait_until(lambda: tunnel.login_gate.pending == 0)
        finally:
            for p in peers:
                p.close()
    assert len(messages(caplog, "no key exchange on")) == 20


def test_a_first_line_dribbled_without_newline_is_dropped_by_the_deadline(no_leaks, make_tunnel, export_dir):
    """One byte of banner every 0.2 s, never a newline: paramiko's banner timeout restarts with each byte."""
    tunnel = make_tunnel([export_dir], login_grace_time=GRACE)
    peer = raw_peer(tunnel.server_port, b"SSH-2.0-")
    try:
        deadline = time.monotonic() + SETTLE
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                peer.sendall(b"x")
            except OSError:
                closed = True
                break
            closed = closed_by_peer(peer, 0.2)  # the attacker's pace; also reads our banner
        assert closed
    finally:
        peer.close()


def test_idle_peers_beyond_max_startups_are_closed_at_once_and_threads_stay_bounded(
    no_leaks, make_tunnel, export_dir, caplog: pytest.LogCaptureFixture
):
    """200 idle TCP peers: MAX_STARTUPS of them wait for the deadline, the rest are closed on arrival."""
    tunnel = make_tunnel([export_dir])  # the default deadline: the pending ones stay for the whole test
    baseline = len(our_threads())
    peers: list[socket.socket] = []
    with caplog.at_level(logging.WARNING, logger="x2go_sftp"):
        try:
            for _ in range(200):
                peers.append(raw_peer(tunnel.server_port))
            refused = 200 - auth.MAX_STARTUPS
            assert wait_until(lambda: sum(closed_by_peer(p) for p in peers) >= refused), (
                f"{tunnel.login_gate.pending} pending"
            )
            assert tunnel.login_gate.pending == auth.MAX_STARTUPS
            still_open = [p for p in peers if not closed_by_peer(p)]
            assert len(still_open) == auth.MAX_STARTUPS
            extra = len(our_threads()) - baseline
            assert extra <= THREADS_PER_PENDING * auth.MAX_STARTUPS, [t.name for t in our_threads()]
        finally:
            for p in peers:
                p.close()
        assert wait_until(lambda: tunnel.login_gate.pending == 0)
    # One burst of refusals: one line, not one per connection.
    assert len(messages(caplog, "refusing new connections")) == 1


def test_peers_that_send_a_banner_and_leave_leave_no_thread_behind(no_leaks, make_tunnel, export_dir):
    """paramiko's handshake timer thread starts at the peer's banner and would outlive the connection."""
    tunnel = make_tunnel([export_dir], login_grace_time=60.0)  # far beyond SETTLE
    baseline = len(our_threads())
    for _ in range(5):
        peers = [raw_peer(tunnel.server_port, b"SSH-2.0-gone\r\n") for _ in range(auth.MAX_STARTUPS)]
        for p in peers:  # our banner back shows the banner reached a running inner server
            p.settimeout(SETTLE)
            assert p.recv(4).startswith(b"SSH")
            p.close()
        assert wait_until(lambda: tunnel.login_gate.pending == 0)
    assert wait_until(lambda: len(our_threads()) <= baseline), [t.name for t in our_threads()]


def _transport_to(port: int) -> paramiko.Transport:
    transport = ClientTransport(socket.create_connection(("127.0.0.1", port)))
    transport.start_client(timeout=30)
    return transport


def test_max_auth_tries_closes_the_connection(no_leaks, make_tunnel, export_dir, session_key, other_key, local_user):
    tunnel = make_tunnel([export_dir])
    transport = _transport_to(tunnel.server_port)
    try:
        for _ in range(auth.MAX_AUTH_TRIES - 1):
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_publickey(local_user, other_key)
            assert transport.is_active()
        # The last allowed failure ends the connection instead of getting a reply (as OpenSSH).
        with pytest.raises(paramiko.SSHException):
            transport.auth_publickey(local_user, other_key)
        assert wait_until(lambda: not transport.is_active())
        with pytest.raises(paramiko.SSHException):
            transport.auth_publickey(local_user, session_key)
    finally:
        transport.close()
    # Up to the limit the key still logs in, and a first "none" (sent by OpenSSH clients) is free.
    transport = _transport_to(tunnel.server_port)
    try:
        with pytest.raises(paramiko.BadAuthenticationType):
            transport.auth_none(local_user)
        for _ in range(auth.MAX_AUTH_TRIES - 1):
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_publickey(local_user, other_key)
        transport.auth_publickey(local_user, session_key)
        assert transport.is_authenticated()
    finally:
        transport.close()
    assert wait_until(lambda: tunnel.login_gate.pending == 0 and tunnel.login_gate.logged_in == 0)


# -- after login -------------------------------------------------------------------------------

def test_session_channels_per_connection_are_capped(no_leaks, make_tunnel, export_dir, session_key, local_user):
    tunnel = make_tunnel([export_dir])
    transport = _transport_to(tunnel.server_port)
    try:
        transport.auth_publickey(local_user, session_key)
        chans = [transport.open_session(timeout=30) for _ in range(auth.MAX_SESSIONS)]
        chans[0].invoke_subsystem("sftp")
        client = paramiko.SFTPClient(chans[0])
        with pytest.raises(paramiko.ChannelException):
            transport.open_session(timeout=30)
        assert client.listdir(export_dir) == ["hello.txt"]
        # The cap counts open channels, not channels ever opened.
        for _ in range(20):
            chans[-1].close()

            def reopen() -> bool:
                try:
                    chans[-1] = transport.open_session(timeout=30)
                except paramiko.ChannelException:
                    return False
                return True

            assert wait_until(reopen)
        assert client.listdir(export_dir) == ["hello.txt"]
    finally:
        transport.close()


def test_logged_in_connections_per_tunnel_are_capped(no_leaks, make_tunnel, export_dir, session_key, local_user):
    tunnel = make_tunnel([export_dir], max_connections=2)
    opened = [sftp_client(tunnel.server_port, session_key, local_user) for _ in range(2)]
    try:
        transport = ClientTransport(socket.create_connection(("127.0.0.1", tunnel.server_port)))
        try:
            transport.start_client(timeout=30)
            transport.auth_publickey(local_user, session_key)  # the key is right ...
            with pytest.raises((paramiko.SSHException, EOFError, OSError)):
                paramiko.SFTPClient.from_transport(transport).listdir(export_dir)  # ... but the tunnel is full
        finally:
            transport.close()
        assert tunnel.login_gate.logged_in == 2
        for _, client in opened:
            assert client.listdir(export_dir) == ["hello.txt"]
        opened.pop()[0].close()
        assert wait_until(lambda: tunnel.login_gate.logged_in == 1)
        opened.append(sftp_client(tunnel.server_port, session_key, local_user))
        assert opened[-1][1].listdir(export_dir) == ["hello.txt"]
    finally:
        for transport, _ in opened:
            transport.close()


def test_a_thread_that_cannot_start_refuses_one_channel_and_the_tunnel_serves_on(
    no_leaks, make_tunnel, export_dir, session_key, local_user, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    tunnel = make_tunnel([export_dir])
    running, client = sftp_client(tunnel.server_port, session_key, local_user)  # stands for the real mount
    real_start = X2GoRevFwSFTPChannelThread.start
    faults = [RuntimeError("can't start new thread")]

    def start_or_fail(self: X2GoRevFwSFTPChannelThread) -> None:
        if faults:
            raise faults.pop()
        real_start(self)

    monkeypatch.setattr(X2GoRevFwSFTPChannelThread, "start", start_or_fail)
    try:
        with (caplog.at_level(logging.WARNING, logger="x2go_sftp"),
              pytest.raises((paramiko.SSHException, EOFError, OSError))):
            sftp_client(tunnel.server_port, session_key, local_user)
        assert not faults and messages(caplog, "could not start its thread")
        assert tunnel.is_alive() and tunnel.forwarding
        assert client.listdir(export_dir) == ["hello.txt"]  # the running session goes on
        transport, fresh = sftp_client(tunnel.server_port, session_key, local_user)  # new ones are served
        try:
            assert fresh.listdir(export_dir) == ["hello.txt"]
        finally:
            transport.close()
        assert tunnel.login_gate.pending == 0
    finally:
        running.close()


# -- the plain TCP forward (sound) -------------------------------------------------------------

def hang_up_early(conn: socket.socket) -> None:
    """Stands for the sound daemon: reads a little, answers a little, hangs up while data still arrives."""
    rng = random.Random()
    conn.settimeout(10)
    conn.recv(rng.randrange(1, 65536))
    conn.sendall(os.urandom(rng.randrange(1, 200_000)))


def _hostile_client(port: int, rounds: int, errors: list[BaseException]) -> None:
    """Connect, stream data, and hang up at a random moment (or be hung up on), ``rounds`` times."""
    rng = random.Random()
    chunk = os.urandom(32 * 1024)
    for _ in range(rounds):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                for _ in range(rng.randrange(1, 40)):
                    s.sendall(chunk)
                    readable, _, _ = select.select([s], [], [], 0)
                    if readable and not s.recv(65536):
                        break
        except OSError:
            pass  # hung up on, as intended
        except BaseException as e:  # pragma: no cover - reported by the test
            errors.append(e)


def test_plain_forward_survives_many_short_connections_closed_from_both_sides(
    no_leaks, x2go_server, outer: paramiko.Transport
):
    """The relay must never give a channel an OS pipe that another thread closes while paramiko feeds it.

    With ``select()`` on the channel (paramiko issues 1700, 2271) this ended the outer
    transport with "Bad file descriptor" in its own thread.
    """
    service = LocalService(hang_up_early, name="hangup-service")
    tunnel = X2GoRevFwTunnel(0, "127.0.0.1", service.port, outer)
    tunnel.start()
    server_side = x2go_server.transports[-1]
    try:
        assert tunnel.wait_ready(30) and tunnel.forwarding
        errors: list[BaseException] = []
        clients = [
            threading.Thread(target=_hostile_client, args=(tunnel.server_port, 25, errors), name=f"client-{i}")
            for i in range(12)
        ]
        for c in clients:
            c.start()
        for c in clients:
            c.join(100)
        assert not errors
        assert outer.is_active() and server_side.is_active()
        assert outer.get_exception() is None and server_side.get_exception() is None
        # ... and the forward still carries data end to end.
        with socket.create_connection(("127.0.0.1", tunnel.server_port), timeout=10) as s:
            s.sendall(b"x")
            assert s.recv(1)
    finally:
        tunnel.stop_thread()
        tunnel.join(10)
        service.close()
    assert not tunnel.is_alive()


def _echoes(s: socket.socket, word: bytes) -> bool:
    s.sendall(word)
    got = b""
    while len(got) < len(word):
        chunk = s.recv(len(word) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == word


def test_plain_forward_relays_at_most_max_relays_connections_and_refuses_the_rest(
    no_leaks, x2go_server, outer: paramiko.Transport, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    """Anyone on the X2Go server may connect to the sound port: past the cap, no thread and no socket.

    Without ``rforward.MAX_RELAYS`` every connection costs two threads and a socket in
    python-x2go's process, and the extra ones here would be relayed like the rest.
    """
    cap = 4
    monkeypatch.setattr(rforward, "MAX_RELAYS", cap)  # the default, as a tunnel made without max_relays reads it
    service = LocalService(echo, name="echo-service")
    tunnel = X2GoRevFwTunnel(0, "127.0.0.1", service.port, outer)
    tunnel.start()
    held: list[socket.socket] = []
    try:
        assert tunnel.wait_ready(30) and tunnel.forwarding
        for i in range(cap):
            s = socket.create_connection(("127.0.0.1", tunnel.server_port), timeout=SETTLE)
            held.append(s)
            assert _echoes(s, f"held-{i}".encode())
        assert len(tunnel.open_channels) == cap
        threads = len(our_threads())
        services = sum(h.is_alive() for h in service.handlers)
        with caplog.at_level(logging.WARNING):
            for i in range(3):
                with socket.create_connection(("127.0.0.1", tunnel.server_port), timeout=SETTLE) as extra:
                    assert closed_by_peer(extra, SETTLE), f"connection {cap + i + 1} was relayed"
        assert len(our_threads()) == threads  # no relay thread was started for them
        assert sum(h.is_alive() for h in service.handlers) == services  # and no socket to the service
        assert len(tunnel.open_channels) == cap
        assert any("refusing a connection" in r.getMessage() for r in caplog.records)
        # The relayed ones go on; one ends, and its place is free again.
        assert all(_echoes(s, b"still") for s in held)
        held.pop().close()
        assert wait_until(lambda: len(tunnel.open_channels) < cap)
        with socket.create_connection(("127.0.0.1", tunnel.server_port), timeout=SETTLE) as again:
            assert _echoes(again, b"again")
    finally:
        for s in held:
            s.close()
        tunnel.stop_thread()
        tunnel.join(10)
        service.close()
    assert not tunnel.is_alive()


def test_max_relays_is_a_bound_and_each_tunnel_may_set_its_own(outer: paramiko.Transport):
    assert 0 < rforward.MAX_RELAYS <= 1024
    assert X2GoRevFwTunnel(0, "127.0.0.1", 1, outer).max_relays == rforward.MAX_RELAYS
    assert X2GoRevFwTunnel(0, "127.0.0.1", 1, outer, max_relays=2).max_relays == 2


# -- a real mount under a flood ----------------------------------------------------------------

class Flood:
    """Keeps ``size`` pre-auth connections (banner + KEXINIT, then quiet) open; replaces each one closed."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.stop = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="flood")

    def _run(self) -> None:
        peers: list[socket.socket] = []
        try:
            while not self.stop.is_set():
                while len(peers) < self.size and not self.stop.is_set():
                    try:
                        peers.append(raw_peer(self.port, BANNER_AND_KEXINIT))
                        self.connections += 1
                    except OSError:
                        break
                readable, _, _ = select.select(peers, [], [], 0.05)
                for p in readable:
                    try:
                        gone = not p.recv(65536)
                    except OSError:
                        gone = True
                    if gone:
                        p.close()
                        peers.remove(p)
        finally:
            for p in peers:
                p.close()

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def _timed_ls(mnt, export_dir: str, name: str) -> float:
    """Make a new directory locally, list it through the mount (nothing cached); the seconds ``ls`` took."""
    os.makedirs(os.path.join(export_dir, name))
    for i in range(20):
        open(os.path.join(export_dir, name, f"f{i}"), "w").close()
    start = time.perf_counter()
    res = subprocess.run(["ls", "-l", str(mnt / name)], capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - start
    assert res.returncode == 0, res.stderr
    assert sum(f" f{i}\n" in res.stdout for i in range(20)) == 20, res.stdout
    return took


@pytest.mark.real
def test_pre_auth_flood_leaves_a_real_sshfs_mount_working(
    no_leaks, real_sshd: RealSSHD, session_key, host_key, tmp_path, export_dir, sshfs_mount,
    record_property,
):
    """200 pre-auth connections, replaced as fast as we close them, while sshfs works through the tunnel."""
    outer = real_sshd.connect()
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=session_key, exports=[export_dir], host_key=host_key)
    tunnel.start()
    mnt = None
    try:
        assert tunnel.wait_ready(30) and tunnel.forwarding
        keyfile, ident = write_key_files(tmp_path, session_key, host_key, tunnel.server_port)
        mnt = sshfs_mount(tunnel.server_port, keyfile, ident, export_dir)
        quiet = [_timed_ls(mnt, export_dir, f"quiet-{i}") for i in range(5)]
        baseline = len(our_threads())
        peak_pending = peak_threads = 0
        with Flood(tunnel.server_port, 200) as flood:
            assert wait_until(lambda: flood.connections >= 200, 60)
            flooded = []
            for i in range(10):
                flooded.append(_timed_ls(mnt, export_dir, f"flood-{i}"))
                peak_pending = max(peak_pending, tunnel.login_gate.pending)
                peak_threads = max(peak_threads, len(our_threads()) - baseline)
            (mnt / "written-during-flood").write_bytes(b"still here\n")
            connections = flood.connections
        record_property("ls_quiet_s", sorted(quiet))
        record_property("ls_flood_s", sorted(flooded))
        record_property("flood_connections", connections)
        record_property("peak_pending", peak_pending)
        record_property("peak_extra_threads", peak_threads)
        assert Path(export_dir, "written-during-flood").read_bytes() == b"still here\n"
        assert peak_pending <= auth.MAX_STARTUPS
        assert peak_threads <= THREADS_PER_PENDING * auth.MAX_STARTUPS
        assert tunnel.login_gate.logged_in == 1  # the mount's connection
    finally:
        if mnt is not None and is_mounted(mnt):
            subprocess.run(["umount", str(mnt)], capture_output=True)
        tunnel.stop_thread()
        tunnel.join(10)
        outer.close()


class StallingEvent:
    """``Transport.clear_to_send`` whose ``wait`` holds one chosen thread back until ``release_when()``.

    Every sender of channel messages, paramiko's ``Channel.send`` and ours
    alike, passes ``clear_to_send.wait`` after it checked that the channel is
    open and before it takes the transport's send lock: the gap in which a
    close from another thread can overtake it (a scheduler can stall a thread
    there for as long as it likes).  Everything else goes to the real Event.
    """

    def __init__(self, real: threading.Event, release_when: Callable[[], bool],
                 spare: tuple[threading.Thread, ...]) -> None:
        self._real = real
        self._release_when = release_when
        self._spare = spare
        self.armed = False
        self.stalled = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        me = threading.current_thread()
        if self.armed and me not in self._spare and not self.stalled.is_set():
            self.stalled.set()  # the first sender after arming, from one of the library's threads
            assert wait_until(self._release_when, 30), "the channel was never closed"
        return self._real.wait(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.real
def test_a_send_overtaken_by_the_channel_close_never_reaches_sshd(
    no_leaks, real_sshd: RealSSHD, session_key, host_key, export_dir, local_user,
):
    """A reply stalled while pause() closes its channel must not follow the CLOSE onto the wire.

    OpenSSH's sshd frees a channel once both CLOSEs are exchanged, and DATA for
    a freed channel makes it drop the whole connection: python-x2go's, with
    every X2Go channel on it.  Here the engine's reply is held back between
    its "is the channel open" check and the transport's send lock until the
    tunnel has closed the channel and sshd has answered the CLOSE.  paramiko's
    ``Channel.send`` then sends the stale DATA (sshd: "data packet referred to
    nonexistent channel"); :func:`paramiko_compat.channel_sender` looks again
    under the lock and drops it.
    """
    outer = real_sshd.connect()
    tunnel = X2GoRevFwTunnelToSFTP(0, outer, auth_key=session_key, exports=[export_dir], host_key=host_key)
    tunnel.start()
    client_transport = None
    asker = None
    try:
        assert tunnel.wait_ready(30) and tunnel.forwarding
        client_transport, sftp = sftp_client(tunnel.server_port, session_key, local_user)
        sftp.stat(".")  # the session is up (and on the fast path where it applies)
        (session,) = tunnel.open_channels.values()
        forwarded = session.channel
        # Spared: this thread (it closes the channel) and the transport's own.
        stall = StallingEvent(outer.clear_to_send, lambda: outer._channels.get(forwarded.chanid) is None,
                              spare=(threading.current_thread(), outer))
        outer.clear_to_send = stall

        def ask() -> None:
            with contextlib.suppress(Exception):  # the session is closed under it
                sftp.stat(".")

        asker = threading.Thread(target=ask, daemon=True, name="asker")
        stall.armed = True  # the next send on python-x2go's connection: the reply to this stat
        asker.start()
        assert stall.stalled.wait(30), "the reply was never sent"
        tunnel.pause()  # closes the session's channel; sshd answers with its CLOSE
        assert wait_until(lambda: outer._channels.get(forwarded.chanid) is None, 30)
        asker.join(30)
        # The stalled send has gone on by now: the connection must have survived it.
        probe = outer.open_session()
        probe.exec_command("true")
        assert probe.recv_exit_status() == 0
        probe.close()
        assert outer.is_active()
        assert "nonexistent channel" not in real_sshd.log()
    finally:
        if client_transport is not None:
            client_transport.close()
        if asker is not None:
            asker.join(30)
        tunnel.stop_thread()
        tunnel.join(10)
        outer.close()
