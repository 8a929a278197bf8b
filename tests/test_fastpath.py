"""The inner data fast path (x2go_sftp.fastpath): it carries the data, and gives way correctly.

Every test moves real data through the tunnel with a real paramiko client and
checks it byte for byte; the fast path's own counters (logged when a session
ends) show which path carried it.  Rekeys from either side, requests paramiko
must answer, a second channel, small windows and packets, a corrupted packet:
each must hand the transport back to paramiko at the right packet.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import paramiko
import pytest

from tests.netutil import CorruptingProxy
from x2go_sftp import X2GoRevFwTunnelToSFTP, fastpath, tuning
from x2go_sftp.defaults import current_local_user
from x2go_sftp.testing import ClientTransport, inner_speaks_gcm, sftp_client

# AES-GCM: paramiko's own from 3.3, the inner transport's backport before (checked on 2.12);
# AES-CTR + HMAC-SHA2 is every release's.
INNER_GCM = inner_speaks_gcm()

# The wires the fast path frames itself, as (cipher, MAC): what OpenSSH's clients agree with
# paramiko >= 3.5 (GCM, its MAC unused), with paramiko 2.12 (CTR + encrypt-then-MAC), and
# the plain RFC 4253 MAC (another client's choice).  The core tests run on each.
WIRES = {
    "gcm": ("aes128-gcm@openssh.com", None),
    "ctr-etm": ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    "ctr": ("aes256-ctr", "hmac-sha2-512"),
}

STATS = re.compile(r"fast path: (\d+) stretches, (\d+) packets in, (\d+) out, (\d+) handed back, (\d+) rekeys")


class FastLog:
    """A python-x2go style logger keeping the fast path's per-session counters."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.sessions: list[dict[str, int]] = []
        self.lines: list[str] = []

    def __call__(self, msg: str, loglevel: int = 0) -> None:
        m = STATS.search(str(msg))
        with self.cv:
            self.lines.append(str(msg))
            if m:
                keys = ("stretches", "packets_in", "packets_out", "handed_back", "rekeys")
                self.sessions.append(dict(zip(keys, map(int, m.groups()), strict=True)))
                self.cv.notify_all()

    def wait(self, n: int = 1, timeout: float = 30) -> list[dict[str, int]]:
        """The counters of the first ``n`` sessions, once they have ended."""
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.sessions) >= n, timeout), self.lines[-20:]
            return self.sessions[:n]


@pytest.fixture
def flog() -> FastLog:
    return FastLog()


@pytest.fixture(params=list(WIRES))
def wire(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The inner server offers only this wire's cipher, and both ends only its MAC."""
    cipher, mac = WIRES[request.param]
    if cipher in fastpath.FAST_CIPHERS and not INNER_GCM:
        pytest.skip(f"no {cipher} for the inner transport on paramiko {paramiko.__version__}")
    monkeypatch.setattr(tuning, "PREFERRED_CIPHERS", (cipher,))
    if mac:
        monkeypatch.setattr(paramiko.Transport, "_preferred_macs", (mac,))
    return str(request.param)


def on_wire(transport: paramiko.Transport, wire: str) -> None:
    """The client really negotiated ``wire`` both ways."""
    cipher, mac = WIRES[wire]
    assert (transport.local_cipher, transport.remote_cipher) == (cipher, cipher)
    if mac:
        assert (transport.local_mac, transport.remote_mac) == (mac, mac)


@pytest.fixture
def tunnel(make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP], export_dir: str, flog: FastLog) -> Any:
    return make_tunnel([export_dir], logger=flog)


@pytest.fixture
def client(tunnel: Any, session_key: paramiko.RSAKey,
           wire: str) -> Iterator[tuple[paramiko.Transport, paramiko.SFTPClient]]:
    transport, sftp = sftp_client(tunnel.server_port, session_key, current_local_user())
    on_wire(transport, wire)
    yield transport, sftp
    transport.close()


def roundtrip(sftp: paramiko.SFTPClient, path: str, size: int) -> None:
    """Write ``size`` random bytes through ``sftp``, read them back, compare with the local file too."""
    data = os.urandom(size)
    with sftp.open(path, "wb") as f:
        f.set_pipelined(True)
        f.write(data)
    with sftp.open(path, "rb") as f:
        assert f.read(size) == data
    with open(path, "rb") as local:
        assert local.read() == data


NOT_FAST = {"stretches": 0, "packets_in": 0, "packets_out": 0, "handed_back": 0, "rekeys": 0}


def inbound_engine(transport: paramiko.Transport) -> Any:
    return transport.packetizer._Packetizer__block_engine_in


def test_data_moves_on_the_fast_path(client: Any, export_dir: str, flog: FastLog) -> None:
    transport, sftp = client
    roundtrip(sftp, export_dir + "/a.bin", 2 << 20)
    transport.close()
    (stats,) = flog.wait()
    assert stats["stretches"] >= 1
    # 2 MiB each way in packets of at most 32 KiB: nearly every data packet went the fast way.
    assert stats["packets_in"] >= 60 and stats["packets_out"] >= 60


@pytest.mark.parametrize(("cipher", "mac"), [("aes128-cbc", "hmac-sha2-256"), ("aes256-ctr", "hmac-sha1"),
                                            ("aes128-ctr", "hmac-md5")])
def test_other_ciphers_and_macs_keep_paramikos_path(monkeypatch: pytest.MonkeyPatch, tunnel: Any,
                                                    session_key: Any, export_dir: str, flog: FastLog,
                                                    cipher: str, mac: str) -> None:
    monkeypatch.setattr(tuning, "PREFERRED_CIPHERS", (cipher,))
    monkeypatch.setattr(paramiko.Transport, "_preferred_macs", (mac,))
    transport, sftp = sftp_client(tunnel.server_port, session_key, current_local_user())
    try:
        assert (transport.remote_cipher, transport.remote_mac) == (cipher, mac)
        roundtrip(sftp, export_dir + "/b.bin", 300_000)
    finally:
        transport.close()
    (stats,) = flog.wait()
    assert stats == NOT_FAST


def test_client_rekeys_in_the_middle(client: Any, export_dir: str, flog: FastLog) -> None:
    transport, sftp = client
    transport.packetizer.REKEY_BYTES = 256 * 1024  # this client asks for new keys every 256 KiB
    before = inbound_engine(transport)
    roundtrip(sftp, export_dir + "/c.bin", 3 << 20)
    assert inbound_engine(transport) is not before  # keys really changed
    transport.close()
    (stats,) = flog.wait()
    # each KEXINIT was handed to paramiko, and the fast path came back after every exchange
    assert stats["handed_back"] >= 10 and stats["stretches"] >= 10
    assert stats["packets_in"] >= 60


def test_server_rekeys_in_the_middle(monkeypatch: pytest.MonkeyPatch, client: Any, export_dir: str,
                                     flog: FastLog) -> None:
    # The server's packetizer asks for new keys every 256 KiB.
    monkeypatch.setattr(fastpath.LeanPacketizer, "REKEY_BYTES", 256 * 1024)
    transport, sftp = client
    before = inbound_engine(transport)
    roundtrip(sftp, export_dir + "/d.bin", 3 << 20)
    assert inbound_engine(transport) is not before
    transport.close()
    (stats,) = flog.wait()
    assert stats["rekeys"] >= 5 and stats["stretches"] >= 5


def test_global_requests_are_answered_between_data(client: Any, export_dir: str, flog: FastLog) -> None:
    transport, sftp = client
    for i in range(3):
        roundtrip(sftp, f"{export_dir}/e{i}.bin", 200_000)
        # What OpenSSH's ServerAliveInterval sends: paramiko must see it and refuse it.
        assert transport.global_request("keepalive@openssh.com", wait=True) is None
        assert transport.is_active()
    roundtrip(sftp, export_dir + "/e.bin", 200_000)
    transport.close()
    (stats,) = flog.wait()
    assert stats["handed_back"] >= 3 and stats["stretches"] >= 4


@pytest.mark.parametrize("rekey_every", [None, 96 * 1024])
def test_small_client_window_and_packets(tunnel: Any, session_key: Any, export_dir: str, flog: FastLog,
                                         rekey_every: int | None, wire: str) -> None:
    sock = socket.create_connection(("127.0.0.1", tunnel.server_port))
    transport = ClientTransport(sock)
    try:
        transport.start_client()
        on_wire(transport, wire)
        transport.auth_publickey(current_local_user(), session_key)
        if rekey_every:  # key exchanges while the server waits for window to send into
            transport.packetizer.REKEY_BYTES = rekey_every
        chan = transport.open_session(window_size=65536, max_packet_size=4096)
        chan.invoke_subsystem("sftp")
        sftp = paramiko.SFTPClient(chan)
        roundtrip(sftp, export_dir + "/f.bin", 1 << 20)
    finally:
        transport.close()
    (stats,) = flog.wait()
    # every reply byte in packets of at most 4 KiB, sent only into the window the client opened
    assert stats["packets_out"] >= (1 << 20) // 4096
    if rekey_every:
        assert stats["handed_back"] >= 10


def test_two_sessions_on_one_connection(client: Any, export_dir: str, flog: FastLog) -> None:
    transport, first = client
    roundtrip(first, export_dir + "/g1.bin", 500_000)  # the first session is on the fast path
    second = paramiko.SFTPClient.from_transport(transport)
    assert second is not None
    for i in range(3):
        roundtrip(second, f"{export_dir}/g2-{i}.bin", 300_000)
        roundtrip(first, f"{export_dir}/g1-{i}.bin", 300_000)
    second.close()
    roundtrip(first, export_dir + "/g3.bin", 300_000)
    transport.close()
    stats = flog.wait(2)
    # the first session holds the data path; the second is served by paramiko's
    assert max(s["stretches"] for s in stats) >= 1
    assert min(s["stretches"] for s in stats) == 0


def test_corrupted_packet_ends_the_connection_cleanly(no_leaks: None, tunnel: Any, session_key: Any,
                                                      export_dir: str, flog: FastLog, wire: str) -> None:
    proxy = CorruptingProxy(tunnel.server_port, after=400_000)
    try:
        transport, sftp = sftp_client(proxy.port, session_key, current_local_user())
        try:
            on_wire(transport, wire)
            with pytest.raises((OSError, EOFError, paramiko.SSHException)):
                roundtrip(sftp, export_dir + "/h.bin", 2 << 20)
        finally:
            transport.close()
        (stats,) = flog.wait()
        assert stats["packets_in"] >= 1  # the bad packet met the fast path, not paramiko
        assert any("inner transport closed on the fast path" in line for line in flog.lines)
    finally:
        proxy.close()
    # the tunnel itself serves on
    transport, sftp = sftp_client(tunnel.server_port, session_key, current_local_user())
    try:
        roundtrip(sftp, export_dir + "/i.bin", 100_000)
    finally:
        transport.close()


class WindowFilled:
    """A raw SFTP client whose small window the server has filled: the engine now waits for window."""

    WINDOW = 32768

    def __init__(self, port: int, session_key: paramiko.RSAKey, export_dir: str):
        self.data = os.urandom(200_000)
        with open(export_dir + "/j.bin", "wb") as f:
            f.write(self.data)
        self.consumed = 0
        self.transport = ClientTransport(socket.create_connection(("127.0.0.1", port)))
        try:
            self.transport.start_client()
            self.transport.auth_publickey(current_local_user(), session_key)
            self.chan = chan = self.transport.open_session(window_size=self.WINDOW, max_packet_size=4096)
            chan.settimeout(30)
            chan.invoke_subsystem("sftp")
            self.request(1, struct.pack(">I", 3))  # INIT
            self.reply()
            path = (export_dir + "/j.bin").encode()
            self.request(3, struct.pack(">II", 1, len(path)) + path + struct.pack(">II", 1, 0))  # OPEN read
            handle_reply = self.reply()
            (hlen,) = struct.unpack_from(">I", handle_reply, 5)
            handle = handle_reply[9:9 + hlen]
            self.request(5, struct.pack(">II", 2, hlen) + handle + struct.pack(">QI", 0, len(self.data)))  # READ all
            # Do not read (reading opens the window): wait until the server has filled the window
            # (what was read so far is below paramiko's threshold for a window adjust).
            assert self.consumed < self.WINDOW // 10
            pipe = chan.in_buffer
            with pipe._lock:
                assert pipe._cv.wait_for(lambda: len(pipe._buffer) >= self.WINDOW - self.consumed, 30)
        except BaseException:
            self.transport.close()
            raise

    def request(self, t: int, body: bytes) -> None:
        self.chan.sendall(struct.pack(">IB", len(body) + 1, t) + body)

    def reply(self) -> bytes:
        head = recv_exact(self.chan, 4)
        body = recv_exact(self.chan, struct.unpack(">I", head)[0])
        self.consumed += 4 + len(body)
        return body


def test_messages_for_paramiko_while_waiting_for_window(tunnel: Any, session_key: Any, export_dir: str,
                                                        flog: FastLog, wire: str) -> None:
    """A message for paramiko arrives while the engine waits for the client to open its window:
    paramiko must take it and then read on (not park) so that the window adjust gets through."""
    client = WindowFilled(tunnel.server_port, session_key, export_dir)
    try:
        on_wire(client.transport, wire)
        client.transport.send_ignore(8)  # now the engine waits for window; this goes to paramiko
        body = client.reply()
        assert body[0] == 103 and body[9:] == client.data[:len(body) - 9]  # DATA, the file's first bytes
    finally:
        client.transport.close()
    (stats,) = flog.wait()
    assert stats["handed_back"] >= 1


def test_a_client_sending_past_its_window_is_cut_off(no_leaks: None, tunnel: Any, session_key: Any,
                                                     export_dir: str, flog: FastLog, wire: str) -> None:
    """While the engine waits for window, input is held unacknowledged: a client that ignores the
    window we gave it (2 MiB) must lose its connection, not fill our memory; the tunnel serves on."""
    client = WindowFilled(tunnel.server_port, session_key, export_dir)
    try:
        on_wire(client.transport, wire)
        chan = client.chan
        assert chan.out_window_size <= tuning.INNER_WINDOW_SIZE
        chan.out_window_size = 1 << 40  # this client pretends it may send without limit
        try:
            for _ in range(6):
                chan.sendall(b"\0" * (1 << 20))
        except (OSError, EOFError, paramiko.SSHException):
            pass  # cut off while sending
        # Everything the server sent before the cut is still readable; then the channel ends
        # (or the client's own window adjust fails on the closed connection).
        while True:
            try:
                if not chan.recv(65536):
                    break
            except TimeoutError:
                pytest.fail("the server kept a client that sent past its window")
            except (OSError, EOFError, paramiko.SSHException):
                break
        client.transport.join(30)  # its thread ends when the server has closed the connection
        assert not client.transport.is_alive(), "the server kept a client that sent past its window"
    finally:
        client.transport.close()
    (stats,) = flog.wait()
    assert stats["stretches"] >= 1  # the fast path held the input
    transport, sftp = sftp_client(tunnel.server_port, session_key, current_local_user())
    try:
        roundtrip(sftp, export_dir + "/after.bin", 100_000)
    finally:
        transport.close()


def recv_exact(chan: paramiko.Channel, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = chan.recv(n - len(out))
        assert chunk, "channel closed"
        out += chunk
    return out


# -- failing safe --------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "known"), [("FAST_CIPHERS", {"aes256-gcm@openssh.com"}),
                                                ("FAST_CTR_CIPHERS", {"aes256-ctr"}),
                                                ("FAST_MACS", {"hmac-sha2-512-etm@openssh.com"})])
def test_the_fast_path_needs_its_cipher_and_mac_by_name(monkeypatch: pytest.MonkeyPatch, tunnel: Any,
                                                        session_key: Any, export_dir: str, flog: FastLog,
                                                        setting: str, known: set[str]) -> None:
    """A cipher (or MAC) negotiated under a name the fast path does not list: paramiko carries the data."""
    wire = "gcm" if setting == "FAST_CIPHERS" else "ctr-etm"
    cipher, mac = WIRES[wire]
    if cipher in fastpath.FAST_CIPHERS and not INNER_GCM:
        pytest.skip(f"no {cipher} for the inner transport on paramiko {paramiko.__version__}")
    monkeypatch.setattr(tuning, "PREFERRED_CIPHERS", (cipher,))
    if mac:
        monkeypatch.setattr(paramiko.Transport, "_preferred_macs", (mac,))
    monkeypatch.setattr(fastpath, setting, frozenset(known))
    transport, sftp = sftp_client(tunnel.server_port, session_key, current_local_user())
    try:
        on_wire(transport, wire)
        roundtrip(sftp, export_dir + "/k.bin", 1 << 20)
    finally:
        transport.close()
    (stats,) = flog.wait()
    assert stats == NOT_FAST


def test_aes256_gcm_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch, tunnel: Any, session_key: Any,
                                        export_dir: str, flog: FastLog) -> None:
    if not INNER_GCM:
        pytest.skip(f"no AES-GCM for the inner transport on paramiko {paramiko.__version__}")
    monkeypatch.setattr(tuning, "PREFERRED_CIPHERS", ("aes256-gcm@openssh.com",))
    transport, sftp = sftp_client(tunnel.server_port, session_key, current_local_user())
    try:
        roundtrip(sftp, export_dir + "/l.bin", 1 << 20)
    finally:
        transport.close()
    (stats,) = flog.wait()
    assert transport.remote_cipher == "aes256-gcm@openssh.com"
    assert stats["stretches"] >= 1 and stats["packets_out"] >= 30


@pytest.mark.parametrize("hook", ["may_take_over", "offer"])
def test_a_failing_hook_switches_the_fast_path_off_not_the_connection(
        monkeypatch: pytest.MonkeyPatch, hook: str, client: Any, export_dir: str, flog: FastLog,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a hook paramiko's thread runs (from its third call on): paramiko reads on."""
    calls = []
    original = getattr(fastpath.SessionIO, hook)

    def failing(self: Any) -> bool:
        calls.append(1)
        if len(calls) >= 3:
            raise RuntimeError(f"bug in {hook}")
        return bool(original(self))

    monkeypatch.setattr(fastpath.SessionIO, hook, failing)
    transport, sftp = client
    for i in range(4):
        roundtrip(sftp, f"{export_dir}/m{i}.bin", 1 << 20)
        # paramiko must answer this: the fast path hands back, and paramiko asks the hooks again
        assert transport.global_request("keepalive@openssh.com", wait=True) is None
    assert transport.is_active()
    transport.close()
    flog.wait()
    assert len(calls) >= 3
    off = [r.getMessage() for r in caplog.records if "fast path off" in r.getMessage()]
    assert len(off) == 1 and f"bug in {hook}" in off[0]


class KexWatch:
    """Message types a client receives, in order: to check what the server sent during a key exchange."""

    def __init__(self, transport: paramiko.Transport):
        self.types: list[int] = []
        pk = transport.packetizer
        read = pk.read_message

        def recording() -> Any:
            ptype, m = read()
            self.types.append(ptype)
            return ptype, m

        pk.read_message = recording

    def violations(self) -> list[int]:
        """Non-kex messages between a server KEXINIT (after the first) and its NEWKEYS (RFC 4253 7.1)."""
        bad, in_kex, seen = [], False, 0
        for t in self.types:
            if t == 20:
                seen += 1
                in_kex = seen > 1
            elif t == 21:
                in_kex = False
            elif in_kex and t not in (1, 2, 3, 4) and not 30 <= t <= 49:
                bad.append(t)
        return bad


def test_no_data_is_sent_once_a_key_exchange_began(make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
                                                   session_key: Any, export_dir: str, flog: FastLog,
                                                   wire: str) -> None:
    """The server starts key exchanges while the fast path streams a large read: after its KEXINIT
    only key exchange messages may follow until NEWKEYS; the data waits and arrives intact."""
    tunnel = make_tunnel([export_dir], logger=flog)
    sock = socket.create_connection(("127.0.0.1", tunnel.server_port))
    transport = ClientTransport(sock)
    watch = KexWatch(transport)
    data = os.urandom(8 << 20)
    with open(export_dir + "/n.bin", "wb") as f:
        f.write(data)
    try:
        transport.start_client()
        on_wire(transport, wire)
        transport.auth_publickey(current_local_user(), session_key)
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        (thread,) = list(tunnel.open_channels.values())
        server = thread.inner_transport
        errors: list[BaseException] = []
        got = bytearray()
        with sftp.open(export_dir + "/n.bin", "rb") as f:
            f.prefetch()
            while len(got) < len(data):
                chunk = f.read(256 * 1024)
                assert chunk
                got += chunk
                if len(got) % (1 << 20) < 256 * 1024:  # about every MiB, the server rekeys (from a thread)
                    t = threading.Thread(target=lambda: _rekey(server, errors))
                    t.start()
                    t.join(30)
        assert bytes(got) == data
        assert not errors
        assert watch.types.count(20) >= 5  # the exchanges happened
        assert watch.violations() == []
    finally:
        transport.close()
    (stats,) = flog.wait()
    assert stats["stretches"] >= 2


def _rekey(server: paramiko.Transport, errors: list[BaseException]) -> None:
    try:
        server.renegotiate_keys()
    except BaseException as e:  # reported to the test's thread
        errors.append(e)
