"""paramiko's internals in one place (x2go_sftp.paramiko_compat), failing safe, and the inner transport's bounds.

* No module but ``paramiko_compat`` names a private paramiko name.
* An unknown release or a missing name turns a trick off (one INFO line) and
  the session still works.
* Attacks, as a local user of the X2Go server would make them against the
  forwarded port (a raw socket, no key) or with the session key (a paramiko
  client ignoring the window): each must end with memory bounded, the
  connection closed (or the data dropped unread), no thread or descriptor
  left, and the tunnel serving a fresh session.  Peak RSS growth is measured
  with ``VmHWM`` after resetting it (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from paramiko.packet import Packetizer

from tests.test_hostile_peers import wait_until
from x2go_sftp import X2GoRevFwTunnelToSFTP, fastpath, inner, paramiko_compat, tuning
from x2go_sftp.defaults import current_local_user
from x2go_sftp.testing import ClientTransport, LoopbackX2GoServer, sftp_client

PACKAGE = Path(paramiko_compat.__file__).parent
HAS_GCM = "aes128-gcm@openssh.com" in paramiko_compat.supported_ciphers()
MiB = 1 << 20

# -- no private paramiko name outside paramiko_compat ---------------------------------------

# Private or undocumented paramiko names: those the package used before they moved into
# paramiko_compat, and their neighbours a change might reach for next.
KNOWN_PRIVATE = frozenset({
    # Transport
    "_channels", "_expected_packet", "in_kex", "_send_user_message", "_send_message", "_cipher_info",
    "_really_parse_kex_init", "_parse_kex_init", "_queue_incoming_channel", "_channel_handler_table",
    "_handler_table", "clear_to_send", "clear_to_send_lock", "local_cipher", "remote_cipher", "packetizer",
    "server_accepts", "server_accept_cv", "_preferred_ciphers", "_get_subsystem_handler",
    # Packetizer
    "_trigger_rekey", "_check_keepalive", "_read_timeout", "_build_packet", "_inc_iv_counter",
    # Channel
    "_check_add_window", "out_buffer_cv", "in_buffer", "in_stderr_buffer", "_feed", "_feed_extended",
    "_window_adjust", "_pipe",
    # SFTP server side
    "_flags", "_set_name", "_get_name", "_set_files", "_get_next_files",
    # PKey
    "_write_private_key",
})
# BufferedPipe's own fields: private wherever they are reached on a paramiko pipe.
PIPE_FIELDS = frozenset(vars(paramiko.buffered_pipe.BufferedPipe()))
PIPE_CLASSES = {"BufferedPipe", "ChunkPipe"}
PARAMIKO_CLASSES = (paramiko.Transport, paramiko.Channel, Packetizer, paramiko.buffered_pipe.BufferedPipe,
                    paramiko.SFTPServer, paramiko.sftp.BaseSFTP, paramiko.SFTPHandle, paramiko.SFTPAttributes,
                    paramiko.Message, paramiko.ServerInterface, paramiko.SFTPServerInterface, paramiko.PKey)

# Uses in modules this work does not own, to be routed through paramiko_compat by their owners.
# Each entry must still be needed (the test fails once it is not, so the list only shrinks).
NOT_YET_ROUTED: dict[tuple[str, str], str] = {}


def _private_uses(path: Path) -> set[tuple[str, int]]:
    """(name, line) of every private paramiko name ``path`` reaches."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[tuple[str, int]] = set()
    pipe_classes: list[tuple[int, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(b, ast.Name) and b.id in PIPE_CLASSES)
                or (isinstance(b, ast.Attribute) and b.attr in PIPE_CLASSES) for b in node.bases):
            pipe_classes.append((node.lineno, node.end_lineno or node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
            in_pipe = any(a <= node.lineno <= b for a, b in pipe_classes)
            via_super = (isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                         and node.value.func.id == "super")
            known = name in KNOWN_PRIVATE or "_Packetizer__" in name
            pipe_field = name in PIPE_FIELDS and (not on_self or in_pipe)
            inherited = via_super and name.startswith("_") and not name.startswith("__") and any(
                hasattr(c, name) for c in PARAMIKO_CLASSES)
            if known or pipe_field or inherited:
                found.add((name, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value in KNOWN_PRIVATE or "_Packetizer__" in node.value):
            found.add((node.value, node.lineno))
    return found


def test_no_private_paramiko_name_outside_paramiko_compat() -> None:
    offending = []
    still_needed = set()
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "paramiko_compat.py":
            continue
        for name, line in sorted(_private_uses(path)):
            if (path.name, name) in NOT_YET_ROUTED:
                still_needed.add((path.name, name))
                continue
            offending.append(f"{path.name}:{line}: {name}")
    assert not offending, "private paramiko names outside paramiko_compat:\n" + "\n".join(offending)
    assert still_needed == set(NOT_YET_ROUTED), f"no longer needed: {set(NOT_YET_ROUTED) - still_needed}"


def test_the_scan_sees_each_kind_of_use(tmp_path: Path) -> None:
    """The scan above can fail: each way of reaching a private name is caught."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "class P(BufferedPipe):\n"
        "    def f(self):\n"
        "        return self._lock\n"
        "def g(t, pk, pipe):\n"
        "    t._channels; pk._Packetizer__iv_in; pipe._closed; getattr(t, 'in_kex')\n"
        "class T(X):\n"
        "    def h(self):\n"
        "        return super()._really_parse_kex_init(1) or super()._send_status(1, 2)\n"
        "class Mine:\n"
        "    def i(self):\n"
        "        return self._lock, self._closed\n")
    names = {name for name, _ in _private_uses(sample)}
    assert names == {"_lock", "_channels", "_Packetizer__iv_in", "_closed", "in_kex",
                     "_really_parse_kex_init", "_send_status"}


# -- the probe ---------------------------------------------------------------------------------

def test_every_trick_was_checked_on_this_release_range() -> None:
    """The table names the releases each trick was checked on; the running one is among the known."""
    assert paramiko_compat.CHECKED_RELEASES == ((2, 12), (3, 5), (5, 1))
    for trick in paramiko_compat.TRICKS:
        assert trick.checked_on and all(r in paramiko_compat.CHECKED_RELEASES for r in trick.checked_on)
        release = paramiko_compat.PARAMIKO_RELEASE
        assert trick.known(release) or not trick.applies(release), trick
    assert not paramiko_compat.FAST_PATH.known((6, 0)) and paramiko_compat.FAST_PATH.known((5, 9))
    assert not paramiko_compat.BOUNDED_PACKETIZER.known((2, 11))


def _inner_transports(tunnel: X2GoRevFwTunnelToSFTP) -> list[Any]:
    return [t.inner_transport for t in list(tunnel.open_channels.values())
            if getattr(t, "inner_transport", None) is not None]


def _only_inner(tunnel: X2GoRevFwTunnelToSFTP) -> Any:
    (transport,) = _inner_transports(tunnel)
    return transport


def _roundtrip(sftp: paramiko.SFTPClient, path: str, size: int = 300_000) -> None:
    data = os.urandom(size)
    with sftp.open(path, "wb") as f:
        f.set_pipelined(True)
        f.write(data)
    with sftp.open(path, "rb") as f:
        assert f.read(size) == data


def _compat_lines(caplog: pytest.LogCaptureFixture, *transports: Any) -> list[str]:
    """The "off for this connection" lines, only those naming one of ``transports`` if given.

    (The loopback X2Go server relays its forwarded port with our ``relay``, so
    its own transport gets probed too: it stands for sshd, and is not counted.)
    """
    names = tuple(f"<paramiko.Transport at {hex(id(t) & 0xFFFFFFFF)} " for t in transports)
    return [r.getMessage() for r in caplog.records
            if r.name == "x2go_sftp.paramiko-compat" and "off for this connection" in r.getMessage()
            and (not names or any(n in r.getMessage() for n in names))]


def test_known_release_turns_every_trick_on(make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
                                            connect: Callable[..., paramiko.SFTPClient], export_dir: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="x2go_sftp")
    tunnel = make_tunnel([export_dir])
    _roundtrip(connect(tunnel), export_dir + "/known.bin")
    transport = _only_inner(tunnel)
    probe = paramiko_compat.probe(transport)
    assert probe is transport.compat  # probed once, cached on the transport
    for trick in paramiko_compat.TRICKS:
        assert probe.may(trick) == trick.applies(paramiko_compat.PARAMIKO_RELEASE), trick.name
    # the fast path frames AES-GCM (>= 3.5) and AES-CTR + HMAC-SHA2 (every release)
    assert type(transport.packetizer) is fastpath.LeanPacketizer
    # ... and writes through the ordered send, not the forwarded channel's own (see test_hostile_peers)
    assert transport.sock.send != transport.sock._chan.send
    assert _compat_lines(caplog) == []


def test_an_unknown_release_turns_every_trick_off_and_the_session_works(
        monkeypatch: pytest.MonkeyPatch, outer: paramiko.Transport, make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
        connect: Callable[..., paramiko.SFTPClient], export_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="x2go_sftp")
    monkeypatch.setattr(paramiko_compat, "PARAMIKO_RELEASE", (6, 0))
    tunnel = make_tunnel([export_dir])
    sftp = connect(tunnel)
    _roundtrip(sftp, export_dir + "/unknown.bin", 2 * MiB)
    assert sorted(sftp.listdir(export_dir)) == ["hello.txt", "unknown.bin"]
    transport = _only_inner(tunnel)
    assert type(transport.packetizer) is Packetizer  # paramiko's own, untouched
    assert "_channel_handler_table" not in vars(transport)
    assert not any(isinstance(c.in_buffer, tuning.ChunkPipe) for c in transport._channels.values())
    assert not any(paramiko_compat.probe(transport).allowed.values())
    # The inner transport writes through the forwarded channel's own send.
    assert transport.sock.send == transport.sock._chan.send
    # One line per transport probed: python-x2go's (its forwarded channel's pipe) and the inner one.
    lines = _compat_lines(caplog, outer, transport)
    assert len(lines) == 2
    for line in lines:
        assert "not checked on this release" in line
        for trick in paramiko_compat.TRICKS:
            # a trick that adds what 6.0 would have itself is off without a word
            assert (trick.name in line) == trick.applies((6, 0)), trick.name


def test_a_missing_name_turns_its_trick_off_and_the_session_works(
        monkeypatch: pytest.MonkeyPatch, outer: paramiko.Transport, make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP],
        connect: Callable[..., paramiko.SFTPClient], export_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """paramiko without ``Packetizer._trigger_rekey`` (only the fast path and the AES-GCM backport need it)."""
    caplog.set_level(logging.INFO, logger="x2go_sftp")
    monkeypatch.delattr(Packetizer, "_trigger_rekey")
    tunnel = make_tunnel([export_dir])
    _roundtrip(connect(tunnel), export_dir + "/missing.bin", 2 * MiB)
    transport = _only_inner(tunnel)
    probe = paramiko_compat.probe(transport)
    assert not probe.may(paramiko_compat.FAST_PATH) and not probe.may(paramiko_compat.FAST_PATH_CTR)
    assert not probe.may(paramiko_compat.GCM_BACKPORT)
    assert probe.may(paramiko_compat.BOUNDED_PACKETIZER) and probe.may(paramiko_compat.CHANNEL_GUARD)
    assert type(transport.packetizer) is paramiko_compat.BoundedPacketizer
    lines = _compat_lines(caplog, outer, transport)
    # One line per transport probed (python-x2go's and the inner one), naming only the tricks that
    # need the name and apply to this release: AES-GCM's fast path where paramiko has AES-GCM, the
    # backport where it has not (both quietly off elsewhere).
    named = ["fast path (AES-GCM)" if HAS_GCM else "AES-GCM where paramiko has none", "fast path (AES-CTR + HMAC-SHA2)"]
    assert len(lines) == 2
    for line in lines:
        reasons = line.split("): ", 1)[1].split("; ")
        assert sorted(reasons) == sorted(f"{name}: missing Packetizer._trigger_rekey" for name in named)


# -- attacks without the key: the bounded packetizer ------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class PeakRSS:
    """Peak RSS growth of this process over a block (``VmHWM``, reset on entry)."""

    def __enter__(self) -> PeakRSS:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.growth_mib = (_status_kib("VmHWM") - self.before) / 1024


def _name_list(*names: str) -> bytes:
    text = ",".join(names).encode()
    return struct.pack(">I", len(text)) + text


def _plain_packet(payload: bytes) -> bytes:
    pad = 8 - (5 + len(payload)) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack(">IB", 1 + len(payload) + pad, pad) + payload + b"\0" * pad


KEXINIT = _plain_packet(
    bytes((20,)) + os.urandom(16) + _name_list("curve25519-sha256", "diffie-hellman-group14-sha256")
    + _name_list("rsa-sha2-256", "ssh-rsa") + _name_list("aes128-gcm@openssh.com", "aes128-ctr") * 2
    + _name_list("hmac-sha2-256") * 2 + _name_list("none") * 2 + _name_list() * 2 + b"\0" + b"\0\0\0\0")


class RawPeer:
    """A local user of the X2Go server speaking raw bytes to the forwarded port (no key)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(60)  # a deadline for the test, never reached when it passes
        self.received = b""
        self.sent = 0
        self.send_error: BaseException | None = None
        self._sender: threading.Thread | None = None

    def banner(self) -> bytes:
        """Read the server's identification line."""
        while b"\n" not in self.received:
            chunk = self.sock.recv(4096)
            assert chunk, "closed before the server's identification"
            self.received += chunk
        return self.received.split(b"\n", 1)[0]

    def stream(self, head: bytes, total: int, piece: int = 64 * 1024) -> None:
        """Send ``head`` then ``total`` zero bytes from a thread, until done or the server cuts us off."""

        def run() -> None:
            try:
                self.sock.sendall(head)
                block = b"\0" * piece
                while self.sent < total:
                    self.sock.sendall(block)
                    self.sent += piece
            except OSError as e:
                self.send_error = e

        self._sender = threading.Thread(target=run, daemon=True)
        self._sender.start()

    def closed_by_server(self) -> bool:
        """Read until the server closes (True) or the deadline passes (False)."""
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self._sender is not None:
            self._sender.join(30)
        self.sock.close()


@pytest.fixture
def tunnel(make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP], export_dir: str) -> X2GoRevFwTunnelToSFTP:
    return make_tunnel([export_dir])


def _serves(tunnel: X2GoRevFwTunnelToSFTP, session_key: paramiko.PKey, export_dir: str) -> None:
    transport, sftp = sftp_client(tunnel.server_port, session_key, current_local_user())
    try:
        _roundtrip(sftp, export_dir + "/fresh.bin", 100_000)
    finally:
        transport.close()


def _all_inner_gone(tunnel: X2GoRevFwTunnelToSFTP) -> None:
    deadline = time.monotonic() + 30
    while tunnel.open_channels and time.monotonic() < deadline:
        for t in list(tunnel.open_channels.values()):
            t.join(0.5)
    assert not tunnel.open_channels, "the attacker's connection is still being served"


def test_a_huge_packet_is_refused_before_its_body(no_leaks: None, tunnel: X2GoRevFwTunnelToSFTP,
                                                  session_key: paramiko.PKey, export_dir: str) -> None:
    """banner + KEXINIT, then a packet header declaring 0x7FFFFFFC bytes, then 64 MiB."""
    peer = RawPeer(tunnel.server_port)
    try:
        with PeakRSS() as rss:
            assert peer.banner().startswith(b"SSH-2.0-")
            peer.sock.sendall(b"SSH-2.0-attacker\r\n" + KEXINIT)
            peer.stream(struct.pack(">IB", 0x7FFFFFFC, 4) + b"\0\0\0", 64 * MiB)
            assert peer.closed_by_server(), "a 2 GiB packet kept the connection open"
            peer._sender.join(30)
        assert peer.sent < 64 * MiB and peer.send_error is not None  # cut off mid-body
        print(f"huge packet: peak RSS growth {rss.growth_mib:.1f} MiB, {peer.sent / MiB:.1f} MiB sent before the cut")
        assert rss.growth_mib < 24
    finally:
        peer.close()
    _all_inner_gone(tunnel)
    _serves(tunnel, session_key, export_dir)


def test_a_long_identification_line_is_refused(no_leaks: None, tunnel: X2GoRevFwTunnelToSFTP,
                                               session_key: paramiko.PKey, export_dir: str) -> None:
    """A first line that never ends: cut after IDENT_MAX_LEN bytes, read in linear time."""
    peer = RawPeer(tunnel.server_port)
    try:
        with PeakRSS() as rss:
            peer.banner()
            peer.stream(b"SSH-2.0-", 16 * MiB, piece=4096)
            assert peer.closed_by_server(), "an endless identification line kept the connection open"
            peer._sender.join(30)
        assert peer.sent < 16 * MiB and peer.send_error is not None
        print(f"long identification: peak RSS growth {rss.growth_mib:.1f} MiB, "
              f"{peer.sent / MiB:.1f} MiB sent before the cut")
        assert rss.growth_mib < 24
        assert peer.received.count(b"\n") == 1  # the server's identification, and nothing after it
    finally:
        peer.close()
    _all_inner_gone(tunnel)
    _serves(tunnel, session_key, export_dir)


def test_no_lines_before_the_identification(no_leaks: None, tunnel: X2GoRevFwTunnelToSFTP,
                                            session_key: paramiko.PKey, export_dir: str) -> None:
    """As OpenSSH's server: a client sending anything but its identification first is dropped."""
    peer = RawPeer(tunnel.server_port)
    try:
        peer.banner()
        peer.sock.sendall(b"hello there\r\nSSH-2.0-late\r\n" + KEXINIT)
        assert peer.closed_by_server()
        _server_id, rest = peer.received.split(b"\n", 1)
        assert rest == b"", "the server went on to key exchange"
    finally:
        peer.close()
    _all_inner_gone(tunnel)
    _serves(tunnel, session_key, export_dir)


def test_an_identification_sent_byte_by_byte_has_one_deadline(no_leaks: None, host_key: paramiko.PKey) -> None:
    """paramiko restarts its banner timeout with every piece; ours counts once for the whole line."""
    ours, theirs = socket.socketpair()
    transport = inner.InnerTransport(ours)
    transport.banner_timeout = 0.5
    transport.add_server_key(host_key)
    stop = threading.Event()
    sent = []
    try:
        transport.start_server(event=threading.Event(), server=paramiko.ServerInterface())
        for byte in b"SSH-2.0-" + b"x" * 200:  # one byte per 0.1 s: 20 s in all, 40 times the timeout
            if not transport.is_active():
                break
            try:
                theirs.sendall(bytes((byte,)))
            except OSError:
                break
            sent.append(byte)
            stop.wait(0.1)  # the attacker's pace, not a synchronisation
        transport.join(10)
        assert not transport.is_alive(), "a peer trickling its identification was never dropped"
        assert len(sent) < 200
        assert isinstance(transport.get_exception(), paramiko.SSHException)
    finally:
        transport.close()
        transport.join(10)
        ours.close()
        theirs.close()


# -- attacks with the session key: the channel data guard ---------------------------------------

@pytest.fixture
def logged_in(tunnel: X2GoRevFwTunnelToSFTP, session_key: paramiko.PKey) -> Iterator[paramiko.Transport]:
    sock = socket.create_connection(("127.0.0.1", tunnel.server_port))
    transport = ClientTransport(sock)
    try:
        transport.start_client()
        transport.auth_publickey(current_local_user(), session_key)
        yield transport
    finally:
        transport.close()


def _sftp_channel(transport: paramiko.Transport) -> paramiko.Channel:
    chan = transport.open_session()
    chan.invoke_subsystem("sftp")
    chan.sendall(struct.pack(">IBI", 5, 1, 3))  # INIT v3
    head = b""
    while len(head) < 4:
        head += chan.recv(4 - len(head))
    (size,) = struct.unpack(">I", head)
    body = b""
    while len(body) < size:
        body += chan.recv(size - len(body))
    assert body[0] == 2  # VERSION: the session runs
    return chan


def _extended(chan: paramiko.Channel, declared: int, data: bytes) -> paramiko.Message:
    m = paramiko.Message()
    m.add_byte(bytes((paramiko.common.MSG_CHANNEL_EXTENDED_DATA,)))
    m.add_int(chan.remote_chanid)
    m.add_int(1)  # SSH_EXTENDED_DATA_STDERR
    m.add_int(declared)
    m.add_bytes(data)
    return m


def _wait_discarded(inner_transport: Any, n: int) -> None:
    deadline = time.monotonic() + 60
    while inner_transport.discarded_messages < n and time.monotonic() < deadline:
        inner_transport.join(0.05)  # returns at once while it runs; a bounded wait
    assert inner_transport.discarded_messages >= n


def test_extended_data_is_dropped_unread(no_leaks: None, tunnel: X2GoRevFwTunnelToSFTP, logged_in: Any,
                                         session_key: paramiko.PKey, export_dir: str) -> None:
    """32 MiB of stderr on the sftp channel, ignoring the window: nothing kept, the session goes on."""
    chan = _sftp_channel(logged_in)
    server = _only_inner(tunnel)
    chan.out_window_size = 1 << 40  # this client pretends it may send without limit
    with PeakRSS() as rss:
        block = b"e" * 32768
        for _ in range(32 * MiB // len(block)):
            chan.send_stderr(block)
        _wait_discarded(server, 32 * MiB // len(block))
    print(f"EXTENDED_DATA flood: peak RSS growth {rss.growth_mib:.1f} MiB for 32 MiB sent")
    assert rss.growth_mib < 24
    assert logged_in.is_active() and server.is_active()
    chan.close()
    logged_in.close()
    _all_inner_gone(tunnel)
    _serves(tunnel, session_key, export_dir)


def test_short_extended_data_is_not_padded(no_leaks: None, tunnel: X2GoRevFwTunnelToSFTP, logged_in: Any,
                                           session_key: paramiko.PKey, export_dir: str) -> None:
    """100 EXTENDED_DATA messages declaring 0xFFFFF bytes, 13 sent each (paramiko pads with zeros)."""
    chan = _sftp_channel(logged_in)
    server = _only_inner(tunnel)
    with PeakRSS() as rss:
        for _ in range(100):
            logged_in._send_user_message(_extended(chan, 0xFFFFF, b"thirteen byte"))
        _wait_discarded(server, 100)
    print(f"short EXTENDED_DATA: peak RSS growth {rss.growth_mib:.1f} MiB for 100 x 0xFFFFF declared")
    assert rss.growth_mib < 24
    chan.close()
    logged_in.close()
    _all_inner_gone(tunnel)
    _serves(tunnel, session_key, export_dir)


def test_data_without_a_running_sftp_session_is_dropped(no_leaks: None, tunnel: X2GoRevFwTunnelToSFTP,
                                                        logged_in: Any, session_key: paramiko.PKey,
                                                        export_dir: str) -> None:
    """32 MiB of DATA on a session channel with no subsystem, ignoring the window."""
    chan = logged_in.open_session()
    server = _only_inner(tunnel)
    chan.out_window_size = 1 << 40
    block = b"d" * 32768
    with PeakRSS() as rss:
        for _ in range(32 * MiB // len(block)):
            chan.sendall(block)
        _wait_discarded(server, 32 * MiB // len(block))
    print(f"DATA without a subsystem: peak RSS growth {rss.growth_mib:.1f} MiB for 32 MiB sent")
    assert rss.growth_mib < 24
    assert all(len(c.in_buffer) == 0 for c in server._channels.values())
    chan.close()
    logged_in.close()
    _all_inner_gone(tunnel)
    _serves(tunnel, session_key, export_dir)


def test_data_declaring_more_than_it_carries_ends_the_connection(
        no_leaks: None, tunnel: X2GoRevFwTunnelToSFTP, logged_in: Any, session_key: paramiko.PKey,
        export_dir: str) -> None:
    chan = _sftp_channel(logged_in)
    m = paramiko.Message()
    m.add_byte(bytes((paramiko.common.MSG_CHANNEL_DATA,)))
    m.add_int(chan.remote_chanid)
    m.add_int(0xFFFFF)  # paramiko would pad the 13 bytes with 1 MiB of zeros and feed the session
    m.add_bytes(b"thirteen byte")
    logged_in._send_user_message(m)
    logged_in.join(30)
    assert not logged_in.is_alive(), "the server kept a connection that sent a short CHANNEL_DATA string"
    _all_inner_gone(tunnel)
    _serves(tunnel, session_key, export_dir)


# -- paramiko issue 822: a CLOSE arriving while python-x2go's connection rekeys ------------


def _close_during_rekey(x2go_server: LoopbackX2GoServer, outer: paramiko.Transport) -> tuple[
        BaseException | None, paramiko.Channel]:
    """The X2Go server closes a command channel while our KEXINIT is out; what the rekey raised.

    The server's transport is held back from answering our KEXINIT (the test
    holds its send lock) until its CLOSE is on the wire, as happens when a
    python-x2go command ends just as a rekey starts.
    """
    chan = outer.open_session()
    server_t = x2go_server.transports[-1]
    assert wait_until(lambda: len(server_t._channels.values()) == 1, 10)
    (server_chan,) = server_t._channels.values()
    outer.clear_to_send_timeout = 5.0  # paramiko's 30 s, shortened: the failure is this timeout
    failure: list[BaseException] = []

    def rekey() -> None:
        try:
            outer.renegotiate_keys()
        except BaseException as e:
            failure.append(e)

    server_t.clear_to_send_lock.acquire()  # the server cannot send its KEXINIT yet
    try:
        rekeyer = threading.Thread(target=rekey, daemon=True, name="rekey")
        rekeyer.start()
        assert wait_until(lambda: not outer.clear_to_send.is_set(), 10)  # our KEXINIT is out
        close = paramiko.Message()
        close.add_byte(paramiko.common.cMSG_CHANNEL_CLOSE)
        close.add_int(server_chan.remote_chanid)
        server_t._send_message(close)  # straight to the packetizer, past the held lock
        assert wait_until(lambda: chan.closed, 10)  # our transport's thread has handled it
    finally:
        server_t.clear_to_send_lock.release()
    rekeyer.join(30)
    assert not rekeyer.is_alive()
    return (failure[0] if failure else None), chan


def test_a_close_during_a_rekey_is_answered_after_it_and_the_connection_lives(
        x2go_server: LoopbackX2GoServer, outer: paramiko.Transport,
        make_tunnel: Callable[..., X2GoRevFwTunnelToSFTP], export_dir: str) -> None:
    make_tunnel([export_dir])  # a tunnel on python-x2go's connection installs the handler
    error, chan = _close_during_rekey(x2go_server, outer)
    assert error is None
    assert chan.closed
    assert outer.is_active()
    # Our CLOSE went out after the key exchange: the server's side of the channel is closed too.
    server_t = x2go_server.transports[-1]
    assert wait_until(lambda: not server_t._channels.values(), 10)
    probe = outer.open_session()  # and the connection carries new channels
    assert wait_until(lambda: len(server_t._channels.values()) == 1, 10)
    probe.close()


def test_without_the_handler_paramiko_hangs_and_loses_the_connection(
        x2go_server: LoopbackX2GoServer, outer: paramiko.Transport) -> None:
    """What the handler prevents (paramiko's own behaviour: no tunnel on this transport)."""
    error, _ = _close_during_rekey(x2go_server, outer)
    assert error is not None
    assert not outer.is_active()
